//! Replays inputs through one fuzz target on any toolchain, to look into a finding:
//! `SHELFSYNC_FUZZ_TRACE=1 cargo run -p shelfsync-tests --example fuzz_replay -- hub_session FILE...`
//! (the trace prints every frame, effect and answer, or every request and its answer).

fn main() {
    let mut args = std::env::args().skip(1);
    let names: Vec<&str> = shelfsync_tests::fuzz::TARGETS.iter().map(|(n, _)| *n).collect();
    let Some(target) = args.next() else {
        eprintln!("usage: fuzz_replay <{}> FILE...", names.join("|"));
        std::process::exit(2);
    };
    let Some((_, run)) = shelfsync_tests::fuzz::TARGETS.iter().find(|(n, _)| *n == target) else {
        eprintln!("no target {target:?}; targets: {}", names.join(", "));
        std::process::exit(2);
    };
    for file in args {
        let data = std::fs::read(&file).unwrap_or_else(|e| panic!("{file}: {e}"));
        eprintln!("== {file} ({} bytes)", data.len());
        run(&data);
    }
}
