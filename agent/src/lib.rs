//! Shelfsync store agent: an offline-first stock ledger beside the point of sale.
//!
//! - [`db`]: the agent's SQLite store (schema, identity, counters) on the group-committing threads
//!   of [`shelfsync_node::sqlite`].
//! - [`ledger`]: sales, returns, adjustments and counts, idempotent by the caller's key; [`counts`]
//!   counts ordered by `occurred_at`; [`holds`]
//!   online holds the hub pushes down; [`replica`] what replication reads and applies.
//! - [`api`]: the local HTTP API for the POS (on [`shelfsync_node::http`]); [`guard`] the agent's
//!   Host/Origin check.
//! - [`catalog`]: the agent's replicas of the catalog documents ([`shelfsync_node::catalog`]).
//! - [`sync`]: the QUIC client that keeps the hub up to date; [`lineage`] the ordinals, boots
//!   and retirements that keep a restored or copied database from reusing its writer.
//! - [`backup`]: `backup` and `restore` of the whole data dir (database and bundle; a restore
//!   takes a new writer at once).
//! - [`config`], [`server`], [`status`]: configuration, start-up and the sync status.

pub mod api;
pub mod backup;
pub mod catalog;
pub mod config;
pub mod counts;
pub mod db;
pub mod guard;
pub mod holds;
pub mod incoming;
pub mod ledger;
pub mod lineage;
pub mod metrics;
pub mod openapi;
pub mod replica;
pub mod rights;
pub mod server;
pub mod status;
pub mod sync;
