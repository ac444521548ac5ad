//! `shelfsync-hub-core`: the hub's decider (DESIGN §5a). One deterministic state machine, in
//! memory, takes every decision the hub makes: merged on-hand per (store, SKU), held totals,
//! reservations and their allocations, holds snapshots for the stores, oversell reconciliation,
//! conflicts, stock alerts, sales velocity, the staleness discount and the change feed.
//!
//! ```text
//! runtime ──Command, now_ms──▶ Decider::apply ──▶ Outcome (answer)      ──▶ caller, after commit
//!                                     └──────────▶ take_records() ─────▶ storage, one transaction
//! ```
//!
//! The runtime (in `hub/`) owns one `Decider`, applies a batch of commands, hands the batch's
//! [`Record`]s to storage to commit in one transaction, and only then answers the callers and
//! publishes. On start it rebuilds the decider with [`Decider::from_records`].
//!
//! **Invariants** (checked after every step by the property test in `tests/properties.rs`):
//! - `held(store, sku)` is the sum of the open (held or committed) allocations there, and the
//!   store's holds snapshot lists exactly those.
//! - `held ≤ max(on_hand, 0)` in every cell after every command: `on_hand` only changes in
//!   `Merge` and `HubChange`, and both reconcile each changed cell at once (re-sourcing, else
//!   marking units short); reservations and re-sourcing only take what `available` offers.
//! - Every `short` allocation has an oversell conflict of its cell naming its reservation (open
//!   unless a person resolved it), or, for a lagged sales channel's order beyond its stores'
//!   stock, a `channel_oversell` conflict naming it.
//! - A reservation takes only from the stores of its sales channel; a live channel's within the
//!   channel's available-to-sell (`channels`).
//! - A reservation is all lines or none: per line, the allocations that are not `moved` add up to
//!   the line's quantity (an allocation shrunk by reconciliation keeps the rest; one a store
//!   fulfilled after the hub had moved it counts as moved). Open allocations carry their
//!   reservation's status; a closed reservation has none.
//! - Per-customer limits hold when a reservation is made.
//! - A store's `incoming` of a SKU is the sum shipped to it by transfers in transit, and is
//!   never part of `available`.
//! - The feed's cursors are 1, 2, 3... without gaps, in memory and in the records.
//! - A refused command changes nothing and produces no records.
//! - Same seed, commands and times give the same outcomes, ids and records; loading the rows the
//!   records leave ([`Decider::from_records`]) rebuilds an equal state ([`Decider::snapshot`]).
//!
//! **What it does not do**: no I/O, no clock (time is an argument), no randomness beyond the seed.
//! Certificates, writer authorisation, entry MACs and lineage checks, the catalog's automerge
//! documents, journal storage and webhooks stay in the runtime; the decider takes their results
//! as commands (`Merge` with authenticated entries, `CatalogChanged` with materialised rules,
//! `JournalSkus` with flagged SKUs, `AgentConflict` with what the sync layer found).
#![warn(missing_docs)]

mod alerts;
mod availability;
mod catalog;
mod channels;
mod command;
mod conflicts;
mod cursor;
mod escrow;
mod feed;
mod ids;
mod lifecycle;
mod merge;
mod model;
mod overview;
mod partition;
mod reconcile;
mod records;
mod snapshot;
mod sourcing;
mod stores;
mod tables;
mod transfers;
mod view;

use std::collections::HashSet;

use shelfsync_shared::{StoreId, WriterId};

pub use alerts::{alert_state, next_velocity};
pub use availability::{available, offered, sellable, staleness_discount, Staleness, StoreFigures};
pub use channels::{
    Buffer, Cap, Channel, ChannelFigures, ChannelId, Fulfil, Latency, CHANNELS_MAX, CHANNEL_ID_MAX_LEN, LAG_SECS_MAX,
    WEB,
};
pub use command::{
    Action, CatalogApplied, Command, Done, Expired, HubChange, HubChangeRequest, HubChanged, Merged, Outcome, Refusal,
    ReservationRequest, RestockEntry, Written, CUSTOMER_MAX_LEN, RESTOCK_BATCH_MAX, TTL_SECS_MAX,
};
pub use conflicts::ConflictFilter;
pub use cursor::{merge_feeds, FeedPosition, Positioned, CURSOR_MAX};
pub use escrow::{Escrow, RightsUpdate};
pub use feed::{FeedData, FeedEvent, FeedKind, FeedRead};
pub use ids::mint as mint_id;
pub use lifecycle::ReservationFilter;
pub use merge::EntriesPage;
pub use model::{
    ActionRequest, AgentConflictKind, AlertState, Allocation, AllocationStatus, CatalogRule, ChangedLine, Conflict,
    ConflictKind, ConflictStatus, HubChangeKind, HubChangeResponse, HubRequest, Overrides, QtyLine, Reservation,
    ReservationStatus, Velocity,
};
pub use overview::{Overview, OverviewQuery, ReservationCounts, Series, StoreSummary, OVERVIEW_MINUTES_MAX};
pub use partition::{Partition, Partitions};
pub use records::{EntryRecord, LoadError, Loader, Record, RightsEntries, StoreRecord};
pub use snapshot::{CellSnapshot, Snapshot, StoreIndexes};
pub use stores::StoreView;
pub use transfers::{
    incoming_snapshot, Closing, Transfer, TransferChanged, TransferFilter, TransferLine, TransferStatus,
};
pub use view::{AllocationView, LineView, ReservationView};

use crate::sourcing::Moment;
use crate::tables::Tables;

/// Most reservations one `ExpireDue` expires (the outcome says whether more are due).
pub const EXPIRE_BATCH_MAX: usize = 1000;

/// What the decider is told at start.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// How silent stores are discounted online.
    pub staleness: Staleness,
    /// The hub's counter writer at start (a `HubWriter` record or `SetHubWriter` replaces it).
    pub hub_writer: WriterId,
    /// Most reservations one `ExpireDue` expires.
    pub expire_batch_max: usize,
    /// Feed events kept in memory (older ones are read from storage).
    pub feed_retain: usize,
    /// Escrow: whether online promises only within the rights stores granted, and the chain's
    /// policy (what the hub gives back at low stock).
    pub escrow: Escrow,
}

impl Config {
    /// Defaults for everything but the hub's writer.
    pub fn new(hub_writer: WriterId) -> Config {
        Config {
            staleness: Staleness::default(),
            hub_writer,
            expire_batch_max: EXPIRE_BATCH_MAX,
            feed_retain: 100_000,
            escrow: Escrow::default(),
        }
    }
}

/// The hub's decider. See the crate documentation.
#[derive(Clone, Debug)]
pub struct Decider {
    config: Config,
    t: Tables,
    /// Stores with a live sync connection now (not persisted: after a restart nobody is).
    connected: HashSet<StoreId>,
    records: Vec<Record>,
}

/// What a command sees while it runs.
pub(crate) struct Ctx<'a> {
    pub t: &'a mut Tables,
    pub cfg: &'a Config,
    pub connected: &'a HashSet<StoreId>,
    pub now: i64,
}

impl Ctx<'_> {
    pub fn moment(&self) -> Moment<'_> {
        Moment { now_ms: self.now, connected: self.connected, staleness: self.cfg.staleness }
    }
}

impl Decider {
    /// An empty decider. `seed` makes the ids it mints unique to this hub's life.
    pub fn new(config: Config, seed: u128) -> Decider {
        let mut t = Tables::new(seed, config.feed_retain, config.hub_writer.clone());
        t.escrow = config.escrow.enabled;
        t.tau_ms = config.staleness.tau_ms;
        Decider { config, t, connected: HashSet::new(), records: Vec::new() }
    }

    /// Decides one command at `now_ms`. A refusal changes nothing; anything else appends the
    /// records of what changed (see [`Decider::take_records`]).
    pub fn apply(&mut self, cmd: Command, now_ms: i64) -> Outcome {
        assert!(self.t.dirty.is_empty(), "the previous command's records were flushed");
        if let Command::SetConnected { store, connected } = cmd {
            if connected {
                self.connected.insert(store);
            } else {
                self.connected.remove(&store);
            }
            return Ok(Done::Connected);
        }
        let mut cx = Ctx { t: &mut self.t, cfg: &self.config, connected: &self.connected, now: now_ms };
        let out = command::dispatch(&mut cx, cmd);
        if out.is_err() {
            assert!(self.t.dirty.is_empty(), "a refused command changed state: {out:?}");
        }
        records::flush(&mut self.t, &mut self.records);
        out
    }

    /// The records of every change since the last call, in decision order.
    pub fn take_records(&mut self) -> Vec<Record> {
        std::mem::take(&mut self.records)
    }

    /// Stores with a live sync connection, as last told by `SetConnected`.
    pub fn connected(&self) -> &HashSet<StoreId> {
        &self.connected
    }

    /// The hub's current counter writer.
    pub fn hub_writer(&self) -> &WriterId {
        &self.t.hub_writer
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }
}
