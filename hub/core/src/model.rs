//! The decider's data: interned ids, stores, (store, SKU) cells, catalog rules, reservations and
//! their allocations, conflicts, and every status or kind as an enum with its stable snake_case
//! name (the strings today's database and API use).
//!
//! These are plain rows. Who may change them, and how their indexes stay in step, lives in
//! `tables.rs`; what they mean lives in the module of each concern.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use shelfsync_shared::{EscrowRule, PnEntry, Sku, StoreId};
use uuid::Uuid;

use crate::view::ReservationView;

/// Declares a fieldless enum with `as_str`, `parse` and `ALL`, serialised as its snake_case name.
macro_rules! named_enum {
    ($(#[$m:meta])* pub enum $name:ident { $($(#[$vm:meta])* $v:ident => $s:literal,)+ }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($(#[$vm])* $v,)+ }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$v,)+];

            /// The stable snake_case name (database column, JSON, feed).
            pub fn as_str(self) -> &'static str {
                match self { $($name::$v => $s,)+ }
            }

            /// Parses the snake_case name.
            pub fn parse(s: &str) -> Option<Self> {
                match s { $($s => Some($name::$v),)+ _ => None }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}
pub(crate) use named_enum;

named_enum! {
    /// Where a reservation is in its lease lifecycle.
    pub enum ReservationStatus {
        /// Reserved, unpaid; lapses at `expires_at_ms`.
        Held => "held",
        /// Paid; waits to be picked.
        Committed => "committed",
        /// Every open allocation was picked by its store.
        Fulfilled => "fulfilled",
        /// Cancelled by the storefront.
        Released => "released",
        /// The lease ran out unpaid.
        Expired => "expired",
    }
}

impl ReservationStatus {
    /// Whether the reservation still promises units.
    pub fn is_open(self) -> bool {
        matches!(self, ReservationStatus::Held | ReservationStatus::Committed)
    }
}

named_enum! {
    /// What became of units of one line promised at one store.
    pub enum AllocationStatus {
        /// Promised, unpaid (counts in `held`).
        Held => "held",
        /// Promised, paid (counts in `held`).
        Committed => "committed",
        /// Picked by the store.
        Fulfilled => "fulfilled",
        /// Given back by the storefront.
        Released => "released",
        /// The lease ran out.
        Expired => "expired",
        /// Units no store could supply after an oversell (recorded at the oversold store).
        Short => "short",
        /// Taken away from an oversold store (re-sourced or marked short in new allocations).
        Moved => "moved",
    }
}

impl AllocationStatus {
    /// Whether the units count in the store's `held` total.
    pub fn is_open(self) -> bool {
        matches!(self, AllocationStatus::Held | AllocationStatus::Committed)
    }
}

named_enum! {
    /// What a conflict is about.
    pub enum ConflictKind {
        /// Held units beyond what a store has.
        Oversell => "oversell",
        /// `on_hand` below zero.
        NegativeStock => "negative_stock",
        /// A store sold a SKU the catalog does not list (or lists as inactive).
        UnknownSku => "unknown_sku",
        /// A store's files were put back from an older copy.
        StoreRolledBack => "store_rolled_back",
        /// A store's files run on two machines.
        WriterCloned => "writer_cloned",
        /// A second live agent of a store that allows one.
        DuplicateAgent => "duplicate_agent",
        /// The hub's files are older than what its stores saw.
        HubRolledBack => "hub_rolled_back",
        /// A store sold units it had granted online (escrow): the rights went back to cover
        /// the sale, holds beyond what is left were cut.
        EscrowOverdraft => "escrow_overdraft",
        /// A lagged sales channel (a marketplace) sold more than its stores had: the units
        /// beyond were recorded short (`hub/docs/channels.md`).
        ChannelOversell => "channel_oversell",
    }
}

named_enum! {
    /// Conflicts about a store's agents or the hub's files rather than a SKU (reported by the
    /// runtime, which sees connections and lineage).
    pub enum AgentConflictKind {
        /// See [`ConflictKind::StoreRolledBack`].
        StoreRolledBack => "store_rolled_back",
        /// See [`ConflictKind::WriterCloned`].
        WriterCloned => "writer_cloned",
        /// See [`ConflictKind::DuplicateAgent`].
        DuplicateAgent => "duplicate_agent",
        /// See [`ConflictKind::HubRolledBack`].
        HubRolledBack => "hub_rolled_back",
    }
}

impl AgentConflictKind {
    /// The conflict kind it records.
    pub fn kind(self) -> ConflictKind {
        match self {
            AgentConflictKind::StoreRolledBack => ConflictKind::StoreRolledBack,
            AgentConflictKind::WriterCloned => ConflictKind::WriterCloned,
            AgentConflictKind::DuplicateAgent => ConflictKind::DuplicateAgent,
            AgentConflictKind::HubRolledBack => ConflictKind::HubRolledBack,
        }
    }
}

named_enum! {
    /// Whether a conflict still needs a person.
    pub enum ConflictStatus {
        /// Needs a person.
        Open => "open",
        /// Settled (automatically or by a person).
        Resolved => "resolved",
    }
}

named_enum! {
    /// Edge-triggered stock alert state of one (store, SKU).
    #[derive(Default)]
    pub enum AlertState {
        /// Above the low-stock threshold.
        #[default]
        Ok => "ok",
        /// At or below the threshold, above zero.
        Low => "low",
        /// Nothing available.
        Out => "out",
    }
}

named_enum! {
    /// Which hub-authored stock change a request was.
    pub enum HubChangeKind {
        /// Units delivered to a store.
        Restock => "restock",
        /// Units moved between stores.
        Transfer => "transfer",
        /// A head-office correction of one store's count.
        Adjustment => "adjustment",
        /// Deliveries to several stores at once.
        RestockBatch => "restock_batch",
    }
}

/// Index of a registered store in the decider's tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StoreIx(pub(crate) u32);

/// Index of a SKU in the decider's tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SkuIx(pub(crate) u32);

/// Index of a counter writer in the decider's tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WriterIx(pub(crate) u32);

/// The catalog's rule for a SKU (the materialised part of the catalog document the decider needs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogRule {
    /// Units never offered online (per store unless overridden).
    pub safety_stock: u64,
    /// At or below this many available units a `low_stock` event fires (0: never).
    pub low_stock_threshold: u64,
    /// Most units one customer may hold, pay for or receive (0: no limit).
    pub max_per_customer: u64,
    /// Whether it is sold at all (inactive: never offered online).
    pub active: bool,
    /// The SKU's escrow values over the chain's policy.
    #[serde(default)]
    pub escrow: EscrowRule,
}

/// A store's overrides of catalog values (`None`: the catalog's value applies).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Overrides {
    /// Safety stock at this store.
    pub safety_stock: Option<u64>,
    /// Low-stock threshold at this store.
    pub low_stock_threshold: Option<u64>,
    /// Escrow values at this store over the SKU's.
    #[serde(default)]
    pub escrow: EscrowRule,
}

/// One line of a reservation, restock or transfer.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct QtyLine {
    /// The product.
    pub sku: Sku,
    /// Units (positive).
    pub qty: u64,
}

/// A registered store.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Store {
    pub id: StoreId,
    pub added_at_ms: i64,
    pub revoked_at_ms: Option<i64>,
    pub last_seen_ms: Option<i64>,
    /// Increases with every change of the store's holds (its agent gets a new snapshot).
    pub holds_version: u64,
    /// Open allocations at this store by creation sequence (holds snapshots).
    pub open: BTreeMap<u64, Uuid>,
    /// Counter entries of this store by their hub sequence (deltas to the agent).
    pub entries_by_seq: BTreeMap<u64, (SkuIx, WriterIx)>,
}

/// Sales-velocity estimate of one (store, SKU): units sold, decaying with e^(−t/τ).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Velocity {
    /// Decayed units sold as of `updated_at_ms`.
    pub score: f64,
    /// When the score was last updated.
    pub updated_at_ms: i64,
}

/// One merged counter entry of a cell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Slot {
    pub writer: WriterIx,
    pub entry: PnEntry,
    /// Hub counter sequence of the entry's last change.
    pub seq: u64,
}

/// What the hub knows of one SKU at one store. A cell exists once a counter entry of it exists.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Cell {
    pub slots: Vec<Slot>,
    /// Σp − Σn over `slots` (refreshed when the hub takes the change in).
    pub on_hand: i64,
    /// Σ qty of open allocations here.
    pub held: u64,
    pub velocity: Option<Velocity>,
    pub alert: AlertState,
    /// Open allocations here by creation sequence (reconciliation takes the newest first).
    pub open: BTreeMap<u64, Uuid>,
    /// Escrow rights (`hub/docs/escrow.md`): what the store granted online.
    pub rights: shelfsync_shared::Rights,
}

/// A SKU the decider has met, with its catalog rule and the stores that have a cell of it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct SkuInfo {
    pub sku: Sku,
    pub rule: Option<CatalogRule>,
    /// Stores with a cell of this SKU, ordered by store id.
    pub stores: Vec<StoreIx>,
}

/// A reservation row.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reservation {
    /// Id (= the caller's idempotency id).
    pub id: Uuid,
    /// The idempotency key as sent, when it is not the id itself (rows from before keys: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Lifecycle state.
    pub status: ReservationStatus,
    /// Pickup store, if one was named.
    pub pickup_store: Option<StoreId>,
    /// Customer reference (per-customer limits).
    pub customer: Option<String>,
    /// The sales channel it came through (`None`: `web`, as every reservation from before
    /// channels).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<crate::channels::ChannelId>,
    /// When it was created.
    pub created_at_ms: i64,
    /// When an unpaid lease lapses.
    pub expires_at_ms: Option<i64>,
    /// Last change.
    pub updated_at_ms: i64,
    /// SHA-256 of the request body (same id, other body: idempotency conflict).
    pub fingerprint: Vec<u8>,
    /// The answer to the first request (replays get it again).
    pub first_response: ReservationView,
    /// What was asked, line by line.
    pub lines: Vec<QtyLine>,
}

/// An allocation row: units of one line promised (or once promised) at one store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    /// The hold id the store fulfils by.
    pub id: Uuid,
    /// Its reservation.
    pub reservation: Uuid,
    /// Line of the reservation.
    pub line: u32,
    /// Where.
    pub store: StoreId,
    /// What.
    pub sku: Sku,
    /// How many.
    pub qty: u64,
    /// What became of it.
    pub status: AllocationStatus,
    /// Global creation order (holds snapshots, newest-first reconciliation).
    pub created_seq: u64,
    /// Last change.
    pub updated_at_ms: i64,
}

/// A conflict row.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Conflict {
    /// Id.
    pub id: Uuid,
    /// What it is about.
    pub kind: ConflictKind,
    /// Where.
    pub store: StoreId,
    /// What (`None` for conflicts about a store's agents or the hub's files).
    pub sku: Option<Sku>,
    /// Units promised beyond what is there (oversell) or below zero (negative stock).
    pub shortfall: u64,
    /// Reservations touched.
    pub reservations: Vec<Uuid>,
    /// What was done, or what to do.
    pub resolution: String,
    /// Open or resolved.
    pub status: ConflictStatus,
    /// When it was found.
    pub detected_at_ms: i64,
    /// When it was settled.
    pub resolved_at_ms: Option<i64>,
    /// Kind-specific facts (writers, fork points...).
    pub details: Option<serde_json::Value>,
}

/// One line of a restock or transfer at one store, as answered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangedLine {
    /// Where.
    pub store: StoreId,
    /// What.
    pub sku: Sku,
    /// Change of `on_hand`.
    pub delta: i64,
    /// `on_hand` after.
    pub on_hand: i64,
    /// Which entry of a batch restock it belongs to (none outside batches).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry: Option<u32>,
}

/// The answer to a restock or transfer (kept for idempotent replays).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HubChangeResponse {
    /// The request id.
    pub id: Uuid,
    /// The idempotency key as sent, when it is not the id itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Restock or transfer.
    pub kind: HubChangeKind,
    /// Per store and SKU, in the order applied.
    pub lines: Vec<ChangedLine>,
    /// When it was recorded.
    pub recorded_at_ms: i64,
}

/// A stored restock/transfer request (idempotency by id).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HubRequest {
    /// The request id.
    pub id: Uuid,
    /// What it was.
    pub kind: HubChangeKind,
    /// SHA-256 of the body.
    pub fingerprint: Vec<u8>,
    /// The first answer.
    pub response: HubChangeResponse,
}

/// A stored lifecycle action under an Idempotency-Key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ActionRequest {
    /// The caller's key.
    pub key: String,
    /// SHA-256 of (reservation id, action).
    pub fingerprint: Vec<u8>,
    /// The first answer.
    pub response: ReservationView,
}
