//! Test support for Shelfsync's end-to-end tests and benchmarks.

pub mod procs;
