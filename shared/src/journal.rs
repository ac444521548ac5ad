//! The journal: every stock change as an immutable event, synced as a grow-only set keyed by
//! (request id, line).

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::id::{Sku, StoreId, WriterId};

/// Milliseconds since the Unix epoch (UTC). The clock is read by the caller, never here.
pub type UnixMs = i64;

/// What kind of change an event records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// Units sold at the POS (negative delta).
    Sale,
    /// Units returned by a customer (positive delta).
    Return,
    /// A correction with a reason (damage, theft, found stock).
    Adjustment,
    /// A physical count, recorded as the difference to what the store believed.
    Count,
    /// Units delivered by head office (hub-authored).
    Restock,
    /// Units moved between stores (hub-authored; one event per side).
    Transfer,
    /// Units picked for an online order (closes a hold).
    Fulfilment,
}

impl EventKind {
    /// Every kind, in declaration order.
    pub const ALL: [EventKind; 7] = [
        EventKind::Sale,
        EventKind::Return,
        EventKind::Adjustment,
        EventKind::Count,
        EventKind::Restock,
        EventKind::Transfer,
        EventKind::Fulfilment,
    ];

    /// The snake_case name used in JSON and SQL.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Sale => "sale",
            EventKind::Return => "return",
            EventKind::Adjustment => "adjustment",
            EventKind::Count => "count",
            EventKind::Restock => "restock",
            EventKind::Transfer => "transfer",
            EventKind::Fulfilment => "fulfilment",
        }
    }

    /// Parses the snake_case name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "sale" => EventKind::Sale,
            "return" => EventKind::Return,
            "adjustment" => EventKind::Adjustment,
            "count" => EventKind::Count,
            "restock" => EventKind::Restock,
            "transfer" => EventKind::Transfer,
            "fulfilment" => EventKind::Fulfilment,
            _ => return None,
        })
    }
}

/// Something about an event that someone should look at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventFlag {
    /// The SKU is not in the catalog (or, for a store without a catalog, was never seen there).
    UnknownSku,
    /// The change left `on_hand` below zero.
    NegativeStock,
    /// The change dipped into units promised to online reservations.
    DipsIntoHolds,
    /// The catalog lists the SKU as inactive.
    InactiveSku,
    /// A sale took units the store had granted online (escrow): the goods were here, so it was
    /// recorded; the hub covers it and reconciles (`hub/docs/escrow.md`).
    EscrowOverdraft,
}

impl EventFlag {
    /// Bit in the compact flag set stored in SQLite.
    pub fn bit(self) -> u32 {
        match self {
            EventFlag::UnknownSku => 1,
            EventFlag::NegativeStock => 2,
            EventFlag::DipsIntoHolds => 4,
            EventFlag::InactiveSku => 8,
            EventFlag::EscrowOverdraft => 16,
        }
    }

    /// Flags from a bit set.
    pub fn from_bits(bits: u32) -> Vec<EventFlag> {
        [
            EventFlag::UnknownSku,
            EventFlag::NegativeStock,
            EventFlag::DipsIntoHolds,
            EventFlag::InactiveSku,
            EventFlag::EscrowOverdraft,
        ]
        .into_iter()
        .filter(|f| bits & f.bit() != 0)
        .collect()
    }

    /// The bit set of some flags.
    pub fn to_bits(flags: &[EventFlag]) -> u32 {
        flags.iter().fold(0, |acc, f| acc | f.bit())
    }
}

/// One immutable journal event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalEvent {
    /// The caller's idempotency id of the request that made this event.
    pub id: Uuid,
    /// Line of that request (0 for single-line requests).
    pub line: u32,
    /// What happened.
    pub kind: EventKind,
    /// Where.
    pub store: StoreId,
    /// Which product.
    pub sku: Sku,
    /// Change of `on_hand`.
    pub delta: i64,
    /// Free text (adjustments, transfers), at most [`crate::qty::REASON_MAX_LEN`] bytes.
    pub reason: Option<String>,
    /// When it happened, as the caller says.
    pub occurred_at_ms: UnixMs,
    /// When the writer recorded it.
    pub recorded_at_ms: UnixMs,
    /// Who recorded it.
    pub writer: WriterId,
    /// Things to look at.
    pub flags: Vec<EventFlag>,
}
