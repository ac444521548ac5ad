//! Test support for Shelfsync's end-to-end tests and benchmarks.

pub mod browser;
pub mod cluster;
pub mod fuzz;
pub mod inproc;
pub mod procs;
pub mod proxy;
pub mod webhook;
