//! The types the hub's operations take and answer ([`crate::engine::Engine`]), and their errors.

use serde::{Deserialize, Serialize};
use shelfsync_shared::{Sku, StoreId, WriterId};

pub use crate::engine::ChangeEvent;
pub use shelfsync_hub_core::{
    Action, AgentConflictKind, ConflictFilter, HubChangeRequest, HubChangeResponse, ReservationRequest,
    ReservationView, StoreFigures, Written,
};

pub use shelfsync_node::catalog::{CatalogItem, CatalogView, DocWrite, Overrides, TrackedDoc};

/// What one catalog change writes.
#[derive(Debug, Default)]
pub struct CatalogCommit {
    /// New document chunk, if the document changed.
    pub write: Option<DocWrite>,
    /// Materialised catalog rows to rewrite (`None`: removed).
    pub items: Vec<(String, Option<CatalogItem>)>,
    /// A store's materialised override rows to rewrite.
    pub overrides: Option<(StoreId, Vec<(String, Overrides)>)>,
    /// Sync states to persist: (doc, peer, encoded state).
    pub sync_states: Vec<(String, String, Vec<u8>)>,
}

/// Why a hub operation failed: the decider refused it, its input is invalid, or storage failed.
#[derive(Clone, Debug, thiserror::Error)]
pub enum StorageError {
    /// The backend failed.
    #[error("storage: {0}")]
    Backend(String),
    /// The decider refused the command (it changed nothing).
    #[error(transparent)]
    Refused(#[from] shelfsync_hub_core::Refusal),
    /// The request breaks a rule checked outside the decider (a tag, a writer, a catalog field).
    #[error("{0}")]
    Invalid(String),
    /// Another connection moved an agent writer's history since this one was welcomed (two
    /// copies of a store's files racing): nothing was written; the agent must reconnect.
    #[error("{0}")]
    Forked(String),
    /// Data in storage is not what the hub wrote.
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
    /// The decider's queue is full: come back in a moment.
    #[error("the hub is busy: too many requests are waiting; retry in a second")]
    Busy,
    /// The hub is failing-stop after a storage failure.
    #[error("{0}")]
    Stopped(String),
}

/// Result alias.
pub type StorageResult<T> = Result<T, StorageError>;

/// Roles of API tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read-only: availability, stores, stock, conflicts, metrics.
    Viewer,
    /// The online storefront: what a viewer may, plus reservations and the change feed.
    Storefront,
    /// Headquarters: everything, including restocks and transfers.
    Admin,
}

impl Role {
    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Storefront => "storefront",
            Role::Admin => "admin",
        }
    }
    /// Parses the lowercase name.
    pub fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "viewer" => Role::Viewer,
            "storefront" => Role::Storefront,
            "admin" => Role::Admin,
            _ => return None,
        })
    }
}

/// What the hub durably holds of one agent writer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerMarks {
    /// Highest agent counter sequence applied.
    pub applied: u64,
    /// Highest agent journal sequence stored.
    pub journal_applied: u64,
    /// What the hub merged of the writer's history.
    pub lineage: shelfsync_shared::lineage::HubLineage,
    /// How many agents of the store may be connected at once (1 unless configured).
    pub max_agents: u32,
}

/// Global heads of the hub's sequences after a write.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HubHeads {
    /// Counter sequence.
    pub counter: u64,
    /// Journal sequence.
    pub journal: u64,
}

/// What applying an agent's delta changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Stores whose holds changed (fulfilments, oversell reconciliation).
    pub holds_changed: Vec<StoreId>,
    /// SKUs whose `on_hand` changed, with the new value.
    pub changed: Vec<(Sku, i64)>,
    /// Entries that changed.
    pub entries_changed: usize,
    /// Heads after the commit.
    pub heads: HubHeads,
    /// Entries the hub lacked that the store gave back (tagged: the hub had sent them once).
    pub recovered: u64,
    /// Some of them were the hub's current writer's: its own files lost them.
    pub own_lost: bool,
}

pub use shelfsync_hub_core::{ChangedLine, HubChange, QtyLine};

/// Outcome of a hub change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubChangeOutcome {
    /// First time (false: replay of an earlier identical request).
    pub created: bool,
    /// The answer.
    pub response: HubChangeResponse,
    /// Stores whose counters changed, and the heads after the commit.
    pub stores: Vec<StoreId>,
    /// Heads after the commit.
    pub heads: HubHeads,
    /// Stores whose holds changed (a transfer can oversell its source), or whose incoming
    /// transfers did (a shipment's destination).
    pub holds_changed: Vec<StoreId>,
    /// A transfer's shipment: the transfer.
    pub transfer: Option<shelfsync_hub_core::Transfer>,
}

/// Outcome of receiving or cancelling a transfer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransferOutcome {
    /// What the decider did.
    pub changed: shelfsync_hub_core::TransferChanged,
    /// Heads after the commit.
    pub heads: HubHeads,
}

/// What `/metrics` reads through the engine at a scrape.
#[derive(Clone, Debug)]
pub struct MetricsRead {
    /// Every store.
    pub stores: Vec<StoreInfo>,
    /// Per store (same order): hub entries its agent has not acked (capped), units granted online.
    pub unacked: Vec<(u64, u64)>,
    /// Open conflicts per kind.
    pub conflicts_open: Vec<(&'static str, u64)>,
    /// Each configured channel's available-to-sell over every SKU.
    pub channel_ats: Vec<(String, u64)>,
}

/// A SKU's figures at one moment: every store's, and those of the channels asked for.
#[derive(Clone, Debug)]
pub struct SkuView {
    /// The SKU.
    pub sku: Sku,
    /// Whether the hub knows it (catalogued or ever stocked).
    pub known: bool,
    /// Every store's figures.
    pub stores: Vec<StoreFigures>,
    /// Each channel's available-to-sell, in the order asked.
    pub channels: Vec<shelfsync_hub_core::ChannelFigures>,
}

/// One store's row of a SKU's stock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreStock {
    /// Where.
    pub store: StoreId,
    /// What.
    pub sku: Sku,
    /// Σp − Σn.
    pub on_hand: i64,
    /// Units on their way to the store (transfers in transit).
    pub incoming: u64,
}

/// A registered store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreInfo {
    /// Id.
    pub id: StoreId,
    /// When registered (ms).
    pub created_at_ms: i64,
    /// When revoked (ms).
    pub revoked_at_ms: Option<i64>,
    /// Last time the hub heard from it (ms).
    pub last_seen_ms: Option<i64>,
    /// Per agent writer: what the hub applied and what the agent acked.
    pub writers: Vec<WriterMarks>,
    /// Journal events held for this store (its own and hub-authored).
    pub journal_events: u64,
}

/// Watermarks of one agent writer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriterMarks {
    /// The agent writer.
    pub writer: WriterId,
    /// Highest agent counter sequence the hub applied.
    pub applied: u64,
    /// Highest hub counter sequence the agent acked.
    pub acked: u64,
    /// Highest agent journal sequence the hub stored.
    pub journal_applied: u64,
    /// Highest hub journal sequence the agent acked.
    pub journal_acked: u64,
    /// Last contact (ms).
    pub last_seen_ms: Option<i64>,
}

/// A certificate on record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertRecord {
    /// Hex serial.
    pub serial: String,
    /// The store it names.
    pub store: StoreId,
    /// SHA-256 of the DER, hex.
    pub fingerprint: String,
    /// Revocation time.
    pub revoked_at_ms: Option<i64>,
}
