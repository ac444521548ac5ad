//! Shelfsync hub: merges every store into one availability view and serves headquarters and the
//! online storefront.
//!
//! - [`engine`]: the runtime around the decider (`shelfsync-hub-core`): one decider thread, a
//!   bounded queue, batches group-committed by the storage writer, answers after the commit.
//! - [`persist`]: the decider's records as SQLite rows; [`sqlite`] the database (opening,
//!   migrations, the rows outside the decider); [`storage`] the operations' types and errors.
//! - [`pki`]: the private CA that identifies stores.
//! - [`quic_server`]: authenticates agents and runs their sync sessions.
//! - [`api`]: the HTTP API; [`edge`]: its rate-limit classes; [`metrics`]: Prometheus counters;
//!   [`state`]: what tasks share.
//! - [`tokens`]: API tokens (names, expiry, revocation, last use).
//! - [`admin`]: verbs on the data directory; [`server`]: start-up; [`config`]: configuration.

pub mod admin;
pub mod api;
pub mod catalog;
pub mod channels;
pub mod cluster;
pub mod config;
pub mod db;
pub mod demo;
pub mod edge;
pub mod engine;
pub mod feed;
pub mod internal;
pub mod ledger;
pub mod metrics;
pub mod notify;
pub mod openapi;
pub mod partitioned;
pub mod persist;
pub mod pki;
pub mod plane;
pub mod postgres;
pub mod quic_server;
pub mod server;
pub mod sqlite;
pub mod standby;
pub mod state;
pub mod storage;
pub mod syncplane;
pub mod tokens;
