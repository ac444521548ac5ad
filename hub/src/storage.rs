//! The hub's state behind a storage trait (DESIGN §10). SQLite ([`crate::sqlite::SqliteStorage`])
//! is the embedded default; the trait is the seam where a PostgreSQL implementation would let
//! several stateless hubs share one database.
//!
//! Every method is one transaction. Writes answer only after their commit is durable.

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use shelfsync_shared::counter::StateDigest;
use shelfsync_shared::sync::{DeltaRead, JournalRead};
use shelfsync_shared::wire::{Delta, JournalBatch};
use shelfsync_shared::{Sku, StoreId, WriterId};
use tokio::sync::watch;
use uuid::Uuid;

pub use crate::reserve::{
    Action, ChangeEvent, Conflict, Now, ReservationRequest, ReservationView, StoreFigures, Written,
};
use shelfsync_shared::wire::HoldsSnapshot;

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

/// Which conflicts to list.
#[derive(Clone, Debug, Default)]
pub struct ConflictFilter {
    /// Only this store.
    pub store: Option<StoreId>,
    /// Only this SKU.
    pub sku: Option<Sku>,
    /// `open` or `resolved`.
    pub status: Option<String>,
    /// Most rows.
    pub limit: usize,
}

/// Storage failures and refusals of hub operations.
#[derive(Clone, Debug, thiserror::Error)]
pub enum StorageError {
    /// The backend failed.
    #[error("storage: {0}")]
    Backend(String),
    /// No such store.
    #[error("unknown store {0}")]
    UnknownStore(StoreId),
    /// The store exists already.
    #[error("store {0} already exists")]
    StoreExists(StoreId),
    /// The store's certificates are revoked.
    #[error("store {0} is revoked")]
    Revoked(StoreId),
    /// Same idempotency id, different body.
    #[error("request id {id} was already used for a different {kind} request")]
    IdempotencyConflict {
        /// The id.
        id: Uuid,
        /// What it was used for.
        kind: String,
    },
    /// Not enough stock for a transfer.
    #[error("store {store} has {on_hand} of {sku}, fewer than the {wanted} to transfer")]
    InsufficientStock {
        /// From where.
        store: StoreId,
        /// What.
        sku: Sku,
        /// What the hub believes is there.
        on_hand: i64,
        /// What was asked.
        wanted: u64,
    },
    /// The request breaks a rule.
    #[error("{0}")]
    Invalid(String),
    /// Not enough units can be promised.
    #[error("only {available} of {sku} available{}", store.as_ref().map(|s| format!(" at {s}")).unwrap_or_default())]
    Unavailable {
        /// What.
        sku: Sku,
        /// How many could be promised.
        available: u64,
        /// The pickup store, if one was named.
        store: Option<StoreId>,
    },
    /// No such thing.
    #[error("{0}")]
    NotFound(String),
    /// A per-customer limit from the catalog.
    #[error("at most {limit} of {sku} per customer; this customer already has {already}")]
    LimitExceeded {
        /// What.
        sku: Sku,
        /// The catalog's limit.
        limit: u64,
        /// What the customer holds, paid or received already.
        already: u64,
    },
    /// The thing is in a state that does not allow this.
    #[error("{0}")]
    InvalidState(String),
    /// Another connection moved an agent writer's history since this one was welcomed (two
    /// copies of a store's files racing): nothing was written; the agent must reconnect.
    #[error("{0}")]
    Forked(String),
    /// Data in storage is not what the hub wrote.
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
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

/// Kinds of conflicts about a store's agents rather than a SKU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgentConflict {
    /// An agent found its writer's history forked (files put back from an older copy) and
    /// moved its later changes to a new writer.
    StoreRolledBack,
    /// Two live connections presented one writer (the files were copied to a second machine).
    WriterCloned,
    /// A second live agent of a store that allows one was refused.
    DuplicateAgent,
    /// The hub found it runs on files older than what its stores saw, and took a new life.
    HubRolledBack,
}

impl AgentConflict {
    /// The snake_case name (conflict kind and feed event kind).
    pub fn as_str(self) -> &'static str {
        match self {
            AgentConflict::StoreRolledBack => "store_rolled_back",
            AgentConflict::WriterCloned => "writer_cloned",
            AgentConflict::DuplicateAgent => "duplicate_agent",
            AgentConflict::HubRolledBack => "hub_rolled_back",
        }
    }
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

/// Answer to a restock or transfer (stored for idempotent replays).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HubChangeResponse {
    /// The request id.
    pub id: Uuid,
    /// `restock` or `transfer`.
    pub kind: String,
    /// Per store and SKU.
    pub lines: Vec<ChangedLine>,
    /// RFC 3339.
    pub recorded_at: String,
}

/// A hub-authored change with its idempotency id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HubChangeRequest {
    /// Idempotency id.
    pub id: Uuid,
    /// What.
    pub change: HubChange,
    /// Free text.
    pub reason: Option<String>,
}

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
    /// Stores whose holds changed (a transfer can oversell its source).
    pub holds_changed: Vec<StoreId>,
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

/// The hub's state.
pub trait HubStorage: Send + Sync + 'static {
    /// The hub's writer in this database's life.
    fn hub_writer(&self) -> WriterId;
    /// Takes a new life: the files turned out older than what stores saw of the current one.
    /// Records a `hub_rolled_back` conflict; returns the new writer.
    fn reincarnate(&self, why: String, now_ms: i64) -> BoxFuture<'_, StorageResult<WriterId>>;
    /// Records a conflict about a store's agents (idempotent per `key`), with an event on the feed.
    fn agent_conflict(
        &self,
        kind: AgentConflict,
        store: StoreId,
        key: String,
        details: serde_json::Value,
        now_ms: i64,
    ) -> BoxFuture<'_, StorageResult<bool>>;
    /// Records the retirements an agent reports (one `store_rolled_back`/`writer_cloned` conflict
    /// each, idempotent). Returns how many were new.
    fn record_retirements(
        &self,
        store: StoreId,
        reports: Vec<shelfsync_shared::wire::Retirement>,
        now_ms: i64,
    ) -> BoxFuture<'_, StorageResult<u64>>;
    /// Digest of the hub-authored entries of `store` (for `Welcome`).
    fn hub_entries_digest(&self, store: StoreId) -> BoxFuture<'_, StorageResult<StateDigest>>;

    /// Registers a store with its first certificate.
    fn add_store(&self, store: StoreId, cert: CertRecord) -> BoxFuture<'_, StorageResult<()>>;
    /// How many agents of a store may be connected at once.
    fn set_max_agents(&self, store: StoreId, max: u32) -> BoxFuture<'_, StorageResult<()>>;
    /// Revokes a store and all its certificates; returns the revoked serials.
    fn revoke_store(&self, store: StoreId) -> BoxFuture<'_, StorageResult<Vec<String>>>;
    /// Every revoked certificate serial with its revocation time (for the CRL).
    fn revoked_serials(&self) -> BoxFuture<'_, StorageResult<Vec<(String, i64)>>>;
    /// Whether a connecting certificate is acceptable: known, for that store, not revoked.
    fn check_cert(&self, store: StoreId, serial: String) -> BoxFuture<'_, StorageResult<()>>;
    /// All stores.
    fn stores(&self) -> BoxFuture<'_, StorageResult<Vec<StoreInfo>>>;
    /// Records contact with a store.
    fn touch_store(&self, store: StoreId, at_ms: i64) -> BoxFuture<'_, StorageResult<()>>;

    /// Stores a new API token (its hash only) and returns its record.
    fn add_token(&self, token: crate::tokens::NewToken) -> BoxFuture<'_, StorageResult<crate::tokens::TokenInfo>>;
    /// The token with this hash, whatever its status (one point read: it runs on every request).
    fn token_by_hash(&self, hash: Vec<u8>) -> BoxFuture<'_, StorageResult<Option<crate::tokens::TokenInfo>>>;
    /// Every token, oldest first.
    fn tokens(&self) -> BoxFuture<'_, StorageResult<Vec<crate::tokens::TokenInfo>>>;
    /// Revokes a token by id; `None` if there is none.
    fn revoke_token(&self, id: Uuid) -> BoxFuture<'_, StorageResult<Option<crate::tokens::TokenInfo>>>;
    /// Records that a token was used at `at_ms`.
    fn touch_token(&self, id: Uuid, at_ms: i64) -> BoxFuture<'_, StorageResult<()>>;

    /// Current global heads.
    fn heads(&self) -> BoxFuture<'_, StorageResult<HubHeads>>;
    /// What the hub applied from an agent writer (zero if never seen).
    fn lookup_peer(&self, store: StoreId, writer: WriterId) -> BoxFuture<'_, StorageResult<PeerMarks>>;
    /// Merges an agent's delta (verifying the tags of entries it gives back, advancing the peer's
    /// lineage; `pusher_boots` are the agent's latest starts, from its hello), closes the holds it fulfilled, reconciles any oversell and records `delta.upto`
    /// as applied, in one transaction.
    fn apply_delta(
        &self,
        store: StoreId,
        peer: WriterId,
        delta: Delta,
        lineage_base: Option<shelfsync_shared::lineage::Checkpoint>,
        pusher_boots: Vec<shelfsync_shared::lineage::Boot>,
        now: Now,
    ) -> BoxFuture<'_, StorageResult<Applied>>;
    /// Entries of `store` above `after` (all writers except `exclude`), sequence order, each with
    /// the hub's tag.
    fn read_delta(
        &self,
        store: StoreId,
        exclude: Option<WriterId>,
        after: u64,
        limit: usize,
    ) -> BoxFuture<'_, StorageResult<DeltaRead>>;
    /// Records that an agent writer acked hub counter sequences up to `upto`.
    fn set_acked(&self, store: StoreId, peer: WriterId, upto: u64) -> BoxFuture<'_, StorageResult<()>>;
    /// Stores an agent's journal events and records `batch.upto`.
    fn apply_journal(&self, store: StoreId, peer: WriterId, batch: JournalBatch) -> BoxFuture<'_, StorageResult<()>>;
    /// Hub-authored journal events of `store` above `after`.
    fn read_journal(&self, store: StoreId, after: u64, limit: usize) -> BoxFuture<'_, StorageResult<JournalRead>>;
    /// Records that an agent writer acked hub journal sequences up to `upto`.
    fn set_journal_acked(&self, store: StoreId, peer: WriterId, upto: u64) -> BoxFuture<'_, StorageResult<()>>;
    /// Digest of `store`'s entries and the highest sequence among them.
    fn digest(&self, store: StoreId) -> BoxFuture<'_, StorageResult<(StateDigest, u64)>>;

    /// A restock or transfer, idempotent by id.
    fn hub_change(&self, req: HubChangeRequest, now: Now) -> BoxFuture<'_, StorageResult<HubChangeOutcome>>;

    /// Reserves all lines or none (idempotent by reservation id).
    fn create_reservation(&self, req: ReservationRequest, now: Now) -> BoxFuture<'_, StorageResult<Written>>;
    /// A reservation's current state.
    fn reservation(&self, id: Uuid) -> BoxFuture<'_, StorageResult<Option<ReservationView>>>;
    /// Extend, commit or release (idempotent under `key`).
    fn act(&self, id: Uuid, action: Action, key: Option<String>, now_ms: i64) -> BoxFuture<'_, StorageResult<Written>>;
    /// Expires due leases; returns the stores whose holds changed.
    fn expire_due(&self, now_ms: i64) -> BoxFuture<'_, StorageResult<Vec<StoreId>>>;
    /// A store's open holds.
    fn holds_snapshot(&self, store: StoreId) -> BoxFuture<'_, StorageResult<HoldsSnapshot>>;
    /// Per SKU, every store's figures (raw and offered availability).
    fn availability(&self, skus: Vec<Sku>, now: Now) -> BoxFuture<'_, StorageResult<Vec<(Sku, Vec<StoreFigures>)>>>;
    /// Conflicts, newest first.
    fn conflicts(&self, filter: ConflictFilter) -> BoxFuture<'_, StorageResult<Vec<Conflict>>>;
    /// Change feed events after `cursor`.
    fn changes_after(&self, cursor: u64, limit: usize) -> BoxFuture<'_, StorageResult<Vec<ChangeEvent>>>;
    /// The newest change cursor, updated after every commit.
    fn change_head(&self) -> watch::Receiver<u64>;
    /// A webhook's delivery cursor.
    fn webhook_cursor(&self, url: String) -> BoxFuture<'_, StorageResult<Option<u64>>>;
    /// Records a webhook's delivery cursor.
    fn set_webhook_cursor(&self, url: String, cursor: u64) -> BoxFuture<'_, StorageResult<()>>;

    /// Loads a replicated document.
    fn load_doc(&self, name: String) -> BoxFuture<'_, StorageResult<TrackedDoc>>;
    /// The persisted automerge sync state of (`doc`, `peer`).
    fn sync_state(&self, doc: String, peer: String) -> BoxFuture<'_, StorageResult<automerge::sync::State>>;
    /// Persists catalog document changes, their materialised rows and sync states in one
    /// transaction, re-evaluating availability and alerts of the SKUs touched. Returns the newest
    /// chunk sequence of the catalog document.
    fn catalog_commit(&self, c: CatalogCommit) -> BoxFuture<'_, StorageResult<i64>>;
    /// Chunks of a document after `after` (to pick up edits made by another process).
    fn doc_chunks_after(&self, doc: String, after: i64) -> BoxFuture<'_, StorageResult<Vec<(i64, Vec<u8>)>>>;
    /// One catalog entry (materialised).
    fn catalog_item(&self, sku: Sku) -> BoxFuture<'_, StorageResult<Option<CatalogView>>>;
    /// A page of catalog entries in SKU order.
    fn catalog_page(&self, after: Option<Sku>, limit: usize) -> BoxFuture<'_, StorageResult<Vec<CatalogView>>>;
    /// Stock of some SKUs at every store that has them.
    fn stock_of(&self, skus: Vec<Sku>) -> BoxFuture<'_, StorageResult<Vec<StoreStock>>>;
    /// A page of one store's stock in SKU order.
    fn store_stock(
        &self,
        store: StoreId,
        after: Option<Sku>,
        limit: usize,
    ) -> BoxFuture<'_, StorageResult<Vec<StoreStock>>>;
    /// Journal events held for a store (count).
    fn journal_count(&self, store: Option<StoreId>) -> BoxFuture<'_, StorageResult<u64>>;
    /// Online backup to a new file; the copy mints a new hub incarnation when opened.
    fn backup(&self, to: std::path::PathBuf) -> BoxFuture<'_, StorageResult<()>>;
}
