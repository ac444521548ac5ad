#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shelfsync_tests::fuzz::hub_session(data));
