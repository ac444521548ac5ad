//! Shelfsync's runtime plumbing, shared by the store agent and the hub so that neither binary
//! imports the other.
//!
//! - [`sqlite`]: one group-committing writer thread and reader threads per database; [`db`] the
//!   storage error, the wake-up [`db::Heads`], connections, migrations and `meta`; [`journal`] the
//!   `journal` table's row codec; [`dbfile`] the database file on disk (integrity check at start,
//!   private permissions).
//! - [`quic`]: frame I/O on quinn streams and the driver that runs a sans-IO session on them.
//! - [`http`]: `ApiError`, the JSON extractors and the accept loop (connection caps, timeouts);
//!   [`ratelimit`] request rate limits; [`observe`] metrics and the request log both serve.
//! - [`client`]: a small JSON client of either binary's HTTP API (CLIs, the demo, tests).
//! - [`config`]: TOML loading with environment overrides and validation helpers; [`cli`] tracing
//!   set-up, the shutdown signal and the async `main` wrapper.
//! - [`bundle`]: a store's credential bundle (the hub's admin writes it, the agent reads it);
//!   [`catalog`] the automerge catalog documents both sides replicate.
//! - [`backup`]: one-file backups of a data dir and restores into a new one; [`datadir`] where an
//!   admin verb's data dir comes from (`--data-dir` or `--config`); [`clidocs`] shell completions
//!   and man pages from a binary's clap command.
//! - [`fatal`]: fail-stop when a process can no longer trust its state; [`now_ms`] the clock.

pub mod backup;
pub mod bundle;
pub mod catalog;
pub mod cli;
pub mod clidocs;
pub mod client;
pub mod config;
pub mod datadir;
pub mod db;
pub mod dbfile;
pub mod fatal;
pub mod http;
pub mod journal;
pub mod observe;
pub mod quic;
pub mod ratelimit;
pub mod sqlite;

/// Milliseconds since the Unix epoch, from the system clock (the one clock read both binaries
/// share; `shelfsync-shared` and the decider take time as an argument).
pub fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}
