//! Shelfsync store agent: an offline-first stock ledger beside the point of sale.
//!
//! - [`db`]: the SQLite store and the threads that own it (group commit); [`dbfile`]: the
//!   database file on disk (integrity check at start, private permissions).
//! - [`ledger`]: sales, returns, adjustments and counts, idempotent by the caller's id.
//! - [`api`]: the local HTTP API for the POS; [`http`] the error and extractor plumbing and the
//!   accept loop (connection caps, timeouts) both binaries serve with; [`guard`] the agent's
//!   Host/Origin check; [`ratelimit`] request rate limits (both binaries).
//! - [`sync`]: the QUIC client that keeps the hub up to date; [`lineage`] the ordinals, boots
//!   and retirements that keep a restored or copied database from reusing its writer.
//! - [`client`]: a typed client of the API (used by the CLI, tests and benchmarks).
//! - [`config`], [`server`]: configuration and start-up.

pub mod api;
pub mod bundle;
pub mod catalog;
pub mod cli;
pub mod client;
pub mod config;
pub mod db;
pub mod dbfile;
pub mod guard;
pub mod holds;
pub mod http;
pub mod ledger;
pub mod lineage;
pub mod quic;
pub mod ratelimit;
pub mod replica;
pub mod server;
pub mod sqlite;
pub mod status;
pub mod sync;
