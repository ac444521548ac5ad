//! The change feed: every event the storefront, SSE clients and webhooks see, with a gap-free
//! cursor (head + 1 per event, in decision order) and typed data whose JSON is exactly the shape
//! today's hub emits.
//!
//! The decider keeps a bounded tail of the feed in memory (`Config::feed_retain`); older events
//! live only in storage, and [`FeedRead::Evicted`] tells the runtime to read them there.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use shelfsync_shared::{Sku, StoreId};
use uuid::Uuid;

use crate::model::{named_enum, Conflict};
use crate::view::ReservationView;
use crate::Decider;

named_enum! {
    /// What happened.
    pub enum FeedKind {
        /// A store's figures of a SKU changed.
        AvailabilityChanged => "availability_changed",
        /// A reservation was created.
        ReservationHeld => "reservation_held",
        /// A reservation was paid.
        ReservationCommitted => "reservation_committed",
        /// A reservation was cancelled.
        ReservationReleased => "reservation_released",
        /// A reservation's lease ran out.
        ReservationExpired => "reservation_expired",
        /// A store picked one of a reservation's holds.
        ReservationFulfilled => "reservation_fulfilled",
        /// Units of a reservation could not be supplied after an oversell.
        ReservationShort => "reservation_short",
        /// Held units beyond what a store has.
        OversellDetected => "oversell_detected",
        /// An oversell was settled by re-sourcing alone.
        OversellResolved => "oversell_resolved",
        /// `on_hand` fell below zero.
        NegativeStock => "negative_stock",
        /// A store sold a SKU the catalog does not list (or lists as inactive).
        UnknownSku => "unknown_sku",
        /// Available fell to the low-stock threshold.
        LowStock => "low_stock",
        /// Nothing available any more.
        OutOfStock => "out_of_stock",
        /// Available again after being out.
        BackInStock => "back_in_stock",
        /// See [`crate::ConflictKind::StoreRolledBack`].
        StoreRolledBack => "store_rolled_back",
        /// See [`crate::ConflictKind::WriterCloned`].
        WriterCloned => "writer_cloned",
        /// See [`crate::ConflictKind::DuplicateAgent`].
        DuplicateAgent => "duplicate_agent",
        /// See [`crate::ConflictKind::HubRolledBack`].
        HubRolledBack => "hub_rolled_back",
        /// A person resolved a conflict.
        ConflictResolved => "conflict_resolved",
        /// A transfer left its source: its units are incoming at the destination.
        TransferShipped => "transfer_shipped",
        /// A transfer arrived (what did not was booked as `transit_loss`).
        TransferReceived => "transfer_received",
        /// A transfer was called off: its units went back to the source.
        TransferCancelled => "transfer_cancelled",
        /// An adjustment was recorded: at a till (synced up) or by head office (a correction, or
        /// the `transit_loss` of a short receipt). The shrink report's rows, live.
        AdjustmentRecorded => "adjustment_recorded",
        /// A store granted online the right to more of its units (escrow).
        RightsGranted => "rights_granted",
        /// The hub gave online rights back to a store (low stock, or to cover an overdraft).
        RightsReturned => "rights_returned",
        /// A store sold units it had granted online (see [`crate::ConflictKind::EscrowOverdraft`]).
        EscrowOverdraft => "escrow_overdraft",
        /// A sales channel's available-to-sell of a SKU moved (`hub/docs/channels.md`).
        ChannelAtsChanged => "channel_ats_changed",
        /// A lagged channel's order took more than its stores had (see
        /// [`crate::ConflictKind::ChannelOversell`]).
        ChannelOversell => "channel_oversell",
    }
}

/// The facts of an event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeedData {
    /// `availability_changed`.
    Availability {
        /// Where.
        store: StoreId,
        /// What.
        sku: Sku,
        /// Physical units.
        on_hand: i64,
        /// Promised online.
        held: u64,
        /// Never offered online.
        safety_stock: u64,
        /// What may be promised (before any staleness discount).
        available: u64,
    },
    /// `low_stock`, `out_of_stock`, `back_in_stock`.
    Alert {
        /// Where.
        store: StoreId,
        /// What.
        sku: Sku,
        /// What may be promised.
        available: u64,
        /// The threshold in force.
        low_stock_threshold: u64,
    },
    /// `reservation_held|committed|released|expired`.
    Reservation {
        /// The reservation after the change.
        reservation: ReservationView,
    },
    /// `reservation_fulfilled`.
    Fulfilled {
        /// The reservation after the change.
        reservation: ReservationView,
        /// The hold the store picked.
        hold: Uuid,
        /// The store.
        store: StoreId,
    },
    /// `reservation_short`.
    Short {
        /// The reservation after the change.
        reservation: ReservationView,
        /// The oversold store.
        store: StoreId,
        /// What.
        sku: Sku,
        /// Units nobody could supply.
        short: u64,
    },
    /// Conflict events (`oversell_*`, `negative_stock`, `unknown_sku`, agent conflicts, resolved).
    Conflict {
        /// The conflict as recorded.
        conflict: Conflict,
    },
    /// `adjustment_recorded`.
    Adjustment {
        /// Where.
        store: StoreId,
        /// What.
        sku: Sku,
        /// Change of on_hand.
        delta: i64,
        /// The reason code and note, as stored (`code` or `code: note`).
        reason: Option<String>,
        /// The journal line: request id and line (a store restored from a backup may send a line
        /// again; this pair names it).
        id: Uuid,
        /// Line within the request.
        line: u32,
        /// When it happened (the caller's `occurred_at`).
        occurred_at_ms: i64,
        /// `store` (a till) or `hub` (head office).
        by: String,
    },
    /// `rights_granted`, `rights_returned`.
    Rights {
        /// Where.
        store: StoreId,
        /// What.
        sku: Sku,
        /// Units transferred by this change.
        qty: u64,
        /// Online's rights after it (`granted − returned − consumed`).
        granted: u64,
        /// Promised online there.
        held: u64,
        /// Physical units (hub's view).
        on_hand: i64,
    },
    /// `channel_ats_changed`.
    ChannelAts {
        /// What.
        sku: Sku,
        /// The channel's figures after the change (without any staleness discount).
        figures: crate::channels::ChannelFigures,
    },
    /// `transfer_shipped|received|cancelled`.
    Transfer {
        /// The transfer after the change.
        transfer: crate::transfers::Transfer,
    },
}

/// One entry of the change feed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FeedEvent {
    /// Gap-free position (1, 2, 3...).
    pub cursor: u64,
    /// What happened.
    pub kind: FeedKind,
    /// When it was decided.
    pub at_ms: i64,
    /// The facts.
    pub data: FeedData,
}

impl FeedEvent {
    /// The event's `data` as today's hub writes it.
    pub fn data_json(&self) -> Value {
        match &self.data {
            FeedData::Availability { store, sku, on_hand, held, safety_stock, available } => json!({
                "store": store, "sku": sku, "on_hand": on_hand, "held": held,
                "safety_stock": safety_stock, "available": available,
            }),
            FeedData::Alert { store, sku, available, low_stock_threshold } => json!({
                "store": store, "sku": sku, "available": available, "low_stock_threshold": low_stock_threshold,
            }),
            FeedData::Reservation { reservation } => json!({"reservation": reservation.to_json()}),
            FeedData::Fulfilled { reservation, hold, store } => {
                json!({"reservation": reservation.to_json(), "hold": hold, "store": store})
            }
            FeedData::Short { reservation, store, sku, short } => {
                json!({"reservation": reservation.to_json(), "store": store, "sku": sku, "short": short})
            }
            FeedData::Conflict { conflict } => json!({"conflict": conflict.to_json()}),
            FeedData::Transfer { transfer } => json!({"transfer": transfer.to_json()}),
            FeedData::ChannelAts { sku, figures: f } => json!({
                "channel": f.channel, "sku": sku, "ats": f.ats, "pool": f.pool, "buffer": f.buffer,
                "lag_margin": f.lag_margin, "cap": f.cap,
            }),
            FeedData::Rights { store, sku, qty, granted, held, on_hand } => json!({
                "store": store, "sku": sku, "qty": qty, "granted": granted, "held": held, "on_hand": on_hand,
            }),
            FeedData::Adjustment { store, sku, delta, reason, id, line, occurred_at_ms, by } => {
                let r = shelfsync_shared::Reason::parse_stored(reason.as_deref().unwrap_or(""));
                json!({
                    "store": store, "sku": sku, "delta": delta, "reason": r.code.as_str(), "note": r.note,
                    "id": id, "line": line, "occurred_at": shelfsync_shared::rfc3339(*occurred_at_ms), "by": by,
                })
            }
        }
    }
}

/// An answer to [`Decider::changes_after`].
#[derive(Clone, Debug, PartialEq)]
pub enum FeedRead {
    /// The events after the cursor, oldest first (empty: nothing new).
    Events(Vec<FeedEvent>),
    /// Events after the cursor are no longer in memory; read storage from `cursor + 1`. The
    /// oldest retained cursor is given.
    Evicted {
        /// Oldest cursor still in memory.
        oldest: u64,
    },
}

impl Decider {
    /// The newest cursor (0 when nothing happened yet).
    pub fn feed_head(&self) -> u64 {
        self.t.feed_head
    }

    /// Up to `limit` events after `cursor`, oldest first.
    pub fn changes_after(&self, cursor: u64, limit: usize) -> FeedRead {
        let Some(first) = self.t.feed.front().map(|e| e.cursor) else {
            // Nothing retained: either nothing happened, or everything was evicted.
            return if cursor >= self.t.feed_head {
                FeedRead::Events(Vec::new())
            } else {
                FeedRead::Evicted { oldest: self.t.feed_head + 1 }
            };
        };
        if cursor.saturating_add(1) < first {
            return FeedRead::Evicted { oldest: first };
        }
        let skip = usize::try_from(cursor.saturating_add(1) - first).unwrap_or(usize::MAX);
        FeedRead::Events(self.t.feed.iter().skip(skip).take(limit).cloned().collect())
    }
}
