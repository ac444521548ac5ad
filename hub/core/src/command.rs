//! What the decider is asked ([`Command`]), what it answers ([`Done`]) and why it refuses
//! ([`Refusal`], the business refusals of today's `StorageError`), with the dispatch that routes
//! each command to the module that owns its concern.

use serde::{Deserialize, Serialize};
use shelfsync_shared::{PnEntry, Sku, StoreId, WriterId};
use uuid::Uuid;

use crate::model::{AgentConflictKind, CatalogRule, Conflict, HubChangeResponse, Overrides, QtyLine};
use crate::view::ReservationView;
use crate::Ctx;

/// Longest TTL of a reservation lease.
pub const TTL_SECS_MAX: u64 = 7 * 24 * 3600;
/// Longest customer reference, in bytes.
pub const CUSTOMER_MAX_LEN: usize = 128;

/// A request to reserve (the body of `POST /v1/reservations`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservationRequest {
    /// Idempotency id = reservation id.
    pub id: Uuid,
    /// The idempotency key as the caller sent it (`None`: the id itself), shown with the
    /// reservation so a storefront finds its own order number there.
    #[serde(default)]
    pub key: Option<String>,
    /// What.
    pub lines: Vec<QtyLine>,
    /// Lease length.
    pub ttl_secs: u64,
    /// Pickup at this store (else ship from the stores with the most available).
    pub pickup_store: Option<StoreId>,
    /// Who (for per-customer limits).
    pub customer: Option<String>,
    /// Through which sales channel (`None`: `web`).
    #[serde(default)]
    pub channel: Option<crate::channels::ChannelId>,
}

/// A lifecycle action on a reservation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// Lengthen the lease to now + ttl.
    Extend {
        /// Seconds from now.
        ttl_secs: u64,
    },
    /// Paid.
    Commit,
    /// Cancelled by the storefront.
    Release,
}

impl Action {
    /// The past participle, for messages: `extended`, `committed`, `released`.
    pub fn done(self) -> &'static str {
        match self {
            Action::Extend { .. } => "extended",
            Action::Commit => "committed",
            Action::Release => "released",
        }
    }
}

/// Most stores in one batch restock.
pub const RESTOCK_BATCH_MAX: usize = 100;

/// One store's part of a batch restock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestockEntry {
    /// Where.
    pub store: StoreId,
    /// What.
    pub lines: Vec<QtyLine>,
    /// Free text (delivery note).
    pub reason: Option<String>,
}

/// A hub-authored change of store stock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HubChange {
    /// Units delivered to a store.
    Restock {
        /// Where.
        store: StoreId,
        /// What.
        lines: Vec<QtyLine>,
    },
    /// Units moved from one store to another.
    Transfer {
        /// From.
        from: StoreId,
        /// To.
        to: StoreId,
        /// What.
        lines: Vec<QtyLine>,
    },
    /// A head-office correction of one store's count (the request's reason holds the stored
    /// reason code and note).
    Adjust {
        /// Where.
        store: StoreId,
        /// What.
        sku: Sku,
        /// Change of `on_hand` (non-zero, at most `ADJUST_DELTA_MAX` either way).
        delta: i64,
        /// Compare-and-set: refuse (`StaleQuantity`) unless the hub's `on_hand` is this now.
        expected_on_hand: Option<i64>,
    },
    /// Deliveries to several stores, all or none (each entry's journal events carry the
    /// entry's own id, derived from the request's).
    RestockBatch {
        /// Per store, in order.
        restocks: Vec<RestockEntry>,
    },
}

/// A hub-authored change with its idempotency id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HubChangeRequest {
    /// Idempotency id.
    pub id: Uuid,
    /// The idempotency key as the caller sent it (`None`: the id itself).
    #[serde(default)]
    pub key: Option<String>,
    /// What.
    pub change: HubChange,
    /// Free text.
    pub reason: Option<String>,
}

/// Everything the decider can be asked.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Registers a store.
    AddStore {
        /// Id.
        store: StoreId,
    },
    /// Revokes a store: it is no longer offered online and may not sync (idempotent).
    RevokeStore {
        /// Id.
        store: StoreId,
    },
    /// Contact with a store at `at_ms` (last seen only moves forward).
    StoreSeen {
        /// Id.
        store: StoreId,
        /// When.
        at_ms: i64,
    },
    /// A store's sync connection opened or closed. Not persisted: after a restart no store is
    /// connected.
    SetConnected {
        /// Id.
        store: StoreId,
        /// Whether it is connected now.
        connected: bool,
    },
    /// The hub took a new writer incarnation.
    SetHubWriter {
        /// The new writer.
        writer: WriterId,
    },
    /// A store's changed counter entries (authenticated by the runtime) and the holds it picked.
    Merge {
        /// The store.
        store: StoreId,
        /// Entries in the order received.
        entries: Vec<(Sku, WriterId, PnEntry)>,
        /// Holds (allocation ids) the store fulfilled.
        fulfilled: Vec<Uuid>,
        /// The store's escrow rights entries (grants and consumptions) in the same delta.
        #[serde(default)]
        rights: Vec<crate::escrow::RightsUpdate>,
    },
    /// Reserves all lines or none.
    Reserve(ReservationRequest),
    /// Extend, commit or release a reservation (idempotent under `key`).
    Act {
        /// The reservation.
        id: Uuid,
        /// What.
        action: Action,
        /// The caller's Idempotency-Key.
        key: Option<String>,
    },
    /// Expires held reservations whose lease ended.
    ExpireDue,
    /// A restock, or a transfer's shipment, idempotent by id.
    HubChange(HubChangeRequest),
    /// A transfer arrived at its destination (`lines`: how many of each shipped SKU arrived;
    /// `None`: everything). Once only; a retry with the same quantities gets the same answer.
    ReceiveTransfer {
        /// The transfer.
        id: Uuid,
        /// Units that arrived per SKU (quantity 0 allowed).
        lines: Option<Vec<QtyLine>>,
        /// The caller's Idempotency-Key.
        key: Option<String>,
    },
    /// A transfer in transit is called off: its units go back to the source.
    CancelTransfer {
        /// The transfer.
        id: Uuid,
        /// The caller's Idempotency-Key.
        key: Option<String>,
    },
    /// Adds or replaces a sales channel (`hub/docs/channels.md`).
    PutChannel(crate::channels::Channel),
    /// Removes a sales channel (not `web`).
    RemoveChannel(crate::channels::ChannelId),
    /// The materialised catalog changed: rules (`None`: removed) and one store's overrides.
    CatalogChanged {
        /// Rules by SKU.
        items: Vec<(Sku, Option<CatalogRule>)>,
        /// A store's overrides by SKU (all-`None` overrides: removed).
        overrides: Option<(StoreId, Vec<(Sku, Overrides)>)>,
    },
    /// SKUs of newly stored journal events that the store flagged as unknown or inactive.
    JournalSkus {
        /// The store.
        store: StoreId,
        /// The SKUs.
        skus: Vec<Sku>,
    },
    /// Adjustment lines a store synced up (newly stored): each becomes an `adjustment_recorded`
    /// feed event. The runtime stores the lines themselves.
    JournalAdjustments {
        /// The store.
        store: StoreId,
        /// The lines (only adjustments are told; others are ignored).
        events: Vec<shelfsync_shared::JournalEvent>,
    },
    /// A conflict about a store's agents or the hub's files, recorded once per id.
    AgentConflict {
        /// Id (derived by the runtime from what makes two reports the same).
        id: Uuid,
        /// What.
        kind: AgentConflictKind,
        /// Where.
        store: StoreId,
        /// What to do about it.
        resolution: String,
        /// Kind-specific facts.
        details: serde_json::Value,
    },
    /// A person resolved an open conflict.
    ResolveConflict {
        /// The conflict.
        id: Uuid,
        /// What was done.
        resolution: String,
    },
}

/// What a merge changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Merged {
    /// SKUs whose entries changed, with the new `on_hand`, in SKU order.
    pub changed: Vec<(Sku, i64)>,
    /// Entries that changed.
    pub entries_changed: usize,
    /// Stores whose holds changed (fulfilments, reconciliation).
    pub holds_changed: Vec<StoreId>,
    /// The hub counter sequence head after the merge.
    pub counter_head: u64,
}

/// The answer to a reservation or lifecycle action.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Written {
    /// First time (false: a replay of the first answer).
    pub created: bool,
    /// The answer.
    pub view: ReservationView,
    /// Stores whose holds changed.
    pub stores: Vec<StoreId>,
}

/// What one `ExpireDue` did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Expired {
    /// Reservations expired.
    pub expired: usize,
    /// Stores whose holds changed.
    pub stores: Vec<StoreId>,
    /// More leases are due (the batch cap was reached): call again.
    pub more: bool,
}

/// The answer to a restock or transfer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubChanged {
    /// First time (false: a replay).
    pub created: bool,
    /// The answer.
    pub response: HubChangeResponse,
    /// Stores whose counters changed, in first-change order.
    pub stores: Vec<StoreId>,
    /// Stores whose holds changed (a transfer can oversell its source).
    pub holds_changed: Vec<StoreId>,
    /// The hub counter sequence head after the change.
    pub counter_head: u64,
    /// A transfer's shipment: the transfer as shipped (also on a retry, whatever became of it
    /// since).
    pub transfer: Option<crate::transfers::Transfer>,
}

/// What a catalog change did beyond storing the rules.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CatalogApplied {
    /// `unknown_sku` conflicts resolved because their SKU is catalogued and active now.
    pub resolved: Vec<Uuid>,
    /// Stores whose holds changed (the hub gave escrow rights back under the new rules).
    pub holds: Vec<StoreId>,
}

/// A decision.
#[derive(Clone, Debug, PartialEq)]
pub enum Done {
    /// `AddStore`.
    StoreAdded,
    /// `RevokeStore` (`newly`: it was not revoked before).
    StoreRevoked {
        /// Whether this call revoked it.
        newly: bool,
    },
    /// `StoreSeen`.
    StoreSeen,
    /// `SetConnected`.
    Connected,
    /// `SetHubWriter`.
    HubWriterSet,
    /// `Merge`.
    Merged(Merged),
    /// `Reserve`.
    Reserved(Written),
    /// `Act`.
    Acted(Written),
    /// `ExpireDue`.
    Expired(Expired),
    /// `HubChange`.
    HubChanged(HubChanged),
    /// `ReceiveTransfer`, `CancelTransfer`.
    TransferChanged(crate::transfers::TransferChanged),
    /// `CatalogChanged`.
    CatalogApplied(CatalogApplied),
    /// `JournalSkus`: the `unknown_sku` conflicts opened.
    UnknownSkus(Vec<Uuid>),
    /// `JournalAdjustments`: how many feed events it made.
    AdjustmentsNoted(usize),
    /// `AgentConflict` (`new`: not recorded before).
    AgentConflict {
        /// Whether it was new.
        new: bool,
    },
    /// `ResolveConflict`: the conflict after.
    ConflictResolved(Conflict),
    /// `PutChannel`: the channel as stored.
    ChannelPut(crate::channels::Channel),
    /// `RemoveChannel`.
    ChannelRemoved(crate::channels::ChannelId),
}

/// Why a command was refused. A refused command changed nothing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No such store.
    #[error("unknown store {0}")]
    UnknownStore(StoreId),
    /// The store exists already.
    #[error("store {0} already exists")]
    StoreExists(StoreId),
    /// The store is revoked.
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
    /// Compare-and-set of an adjustment failed: the hub's `on_hand` is not what the caller saw.
    #[error("store {store} has {on_hand} of {sku} on hand, not the {expected} expected; nothing was changed")]
    StaleQuantity {
        /// Where.
        store: StoreId,
        /// What.
        sku: Sku,
        /// What the caller expected.
        expected: i64,
        /// What the hub has.
        on_hand: i64,
    },
    /// Not enough stock for a transfer.
    #[error("store {store} has {on_hand} of {sku}, fewer than the {wanted} to transfer")]
    InsufficientStock {
        /// From where.
        store: StoreId,
        /// What.
        sku: Sku,
        /// What the hub believes is there (after earlier lines of the same transfer).
        on_hand: i64,
        /// What was asked.
        wanted: u64,
    },
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
    /// No such thing.
    #[error("{0}")]
    NotFound(String),
    /// The thing is in a state that does not allow this.
    #[error("{0}")]
    InvalidState(String),
    /// The request breaks a rule.
    #[error("{0}")]
    Invalid(String),
}

/// The answer to one command.
pub type Outcome = Result<Done, Refusal>;

pub(crate) fn dispatch(cx: &mut Ctx<'_>, cmd: Command) -> Outcome {
    match cmd {
        Command::AddStore { store } => crate::stores::add(cx, store),
        Command::RevokeStore { store } => crate::stores::revoke(cx, &store),
        Command::StoreSeen { store, at_ms } => crate::stores::seen(cx, &store, at_ms),
        Command::SetConnected { .. } => Ok(Done::Connected),
        Command::SetHubWriter { writer } => crate::stores::set_hub_writer(cx, writer),
        Command::Merge { store, entries, fulfilled, rights } => {
            crate::merge::merge(cx, &store, &entries, &fulfilled, &rights)
        }
        Command::Reserve(req) => crate::lifecycle::reserve(cx, &req).map(Done::Reserved),
        Command::Act { id, action, key } => crate::lifecycle::act(cx, id, action, key).map(Done::Acted),
        Command::ExpireDue => Ok(Done::Expired(crate::lifecycle::expire_due(cx))),
        Command::HubChange(req) => crate::merge::hub_change(cx, &req).map(Done::HubChanged),
        Command::ReceiveTransfer { id, lines, key } => {
            crate::transfers::receive(cx, id, lines.as_deref(), key).map(Done::TransferChanged)
        }
        Command::CancelTransfer { id, key } => crate::transfers::cancel(cx, id, key).map(Done::TransferChanged),
        Command::CatalogChanged { items, overrides } => crate::catalog::changed(cx, &items, overrides.as_ref()),
        Command::PutChannel(ch) => crate::channels::put(cx, &ch),
        Command::RemoveChannel(id) => crate::channels::remove(cx, &id),
        Command::JournalSkus { store, skus } => crate::catalog::journal_skus(cx, &store, &skus),
        Command::JournalAdjustments { store, events } => {
            crate::stores::require(cx.t, &store)?;
            let mut n = 0;
            for e in events {
                if e.store == store && e.kind == shelfsync_shared::EventKind::Adjustment {
                    cx.t.note_journal(e, false, cx.now);
                    n += 1;
                }
            }
            Ok(Done::AdjustmentsNoted(n))
        }
        Command::AgentConflict { id, kind, store, resolution, details } => {
            Ok(crate::conflicts::agent_conflict(cx, id, kind, store, resolution, details))
        }
        Command::ResolveConflict { id, resolution } => crate::conflicts::resolve(cx, id, resolution),
    }
}
