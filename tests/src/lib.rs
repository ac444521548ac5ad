//! Test support for Shelfsync's end-to-end tests and benchmarks.

pub mod backend;
pub mod browser;
pub mod chainsim;
pub mod cluster;
pub mod fuzz;
pub mod hubs;
pub mod inproc;
pub mod marketplace;
pub mod pg;
pub mod procs;
pub mod promtool;
pub mod proxy;
pub mod webhook;

/// What [`both_backends!`] expands to needs; not an API.
#[doc(hidden)]
pub mod __private {
    pub use paste;
}
