//! Transfers between stores, in transit (modelled on Square's and Shopify's inventory
//! transfers): shipping takes the units out of the source's `on_hand` at once and records them as
//! `incoming` at the destination; receiving puts what arrived into the destination's `on_hand`
//! and books what did not as a `transit_loss` adjustment there, in the same command; cancelling
//! gives the units back to the source. `incoming` is never part of `available`: the storefront
//! is never offered units on a truck.
//!
//! Every counter change is the hub writer's, like restocks, so stores learn of them through the
//! usual deltas; the destination's agent also gets the transfers on their way to it
//! ([`Decider::incoming_snapshot`]), pushed with its holds (same version).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use shelfsync_shared::journal::EventKind;
use shelfsync_shared::qty::LINES_MAX;
use shelfsync_shared::wire::{
    IncomingLine, IncomingSnapshot, IncomingTransfer, INCOMING_LINES_MAX, INCOMING_TRANSFERS_MAX,
};
use shelfsync_shared::{fingerprint_of, rfc3339, Reason, ReasonCode, Sku, StoreId};
use uuid::Uuid;

use crate::alerts::emit_availability;
use crate::command::Refusal;
use crate::feed::{FeedData, FeedKind};
use crate::model::{named_enum, ChangedLine, QtyLine, StoreIx};
use crate::reconcile::reconcile;
use crate::stores::require;
use crate::{Ctx, Decider};

named_enum! {
    /// Where a transfer between two stores is.
    pub enum TransferStatus {
        /// Shipped: gone from the source, not yet at the destination (its `incoming`).
        InTransit => "in_transit",
        /// Received at the destination (what did not arrive was booked as `transit_loss`).
        Received => "received",
        /// Called off before it arrived: the units went back to the source.
        Cancelled => "cancelled",
    }
}

/// One SKU of a transfer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferLine {
    /// What.
    pub sku: Sku,
    /// Units that left the source.
    pub shipped: u64,
    /// Units that arrived (once received).
    pub received: Option<u64>,
}

/// The request that closed a transfer (receive or cancel), so a retry gets the same answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Closing {
    /// SHA-256 of what was asked (the quantities received, or the cancellation).
    pub fingerprint: Vec<u8>,
    /// The caller's Idempotency-Key, if it sent one.
    pub key: Option<String>,
}

/// A transfer row.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transfer {
    /// Id (= the ship request's idempotency id).
    pub id: Uuid,
    /// The store that ships.
    pub from: StoreId,
    /// The store that receives.
    pub to: StoreId,
    /// Where it is.
    pub status: TransferStatus,
    /// Per SKU (lines of one SKU in the request are added up), in request order.
    pub lines: Vec<TransferLine>,
    /// Free text from the ship request.
    pub reason: Option<String>,
    /// When it was shipped.
    pub shipped_at_ms: i64,
    /// When it was received.
    pub received_at_ms: Option<i64>,
    /// When it was cancelled.
    pub cancelled_at_ms: Option<i64>,
    /// The receive or cancel request that closed it.
    pub closed_by: Option<Closing>,
    /// Recorded before transfers travelled: the units moved at once (it counts as received).
    #[serde(default)]
    pub legacy: bool,
}

impl Transfer {
    /// The transfer as its shipment answered (a retry of the shipment gets this again):
    /// in transit, nothing received. `None` for a transfer recorded before transfers travelled
    /// (its first answer is its stored restock-style answer).
    pub fn as_shipped(&self) -> Option<Transfer> {
        if self.legacy {
            return None;
        }
        let mut t = self.clone();
        t.status = TransferStatus::InTransit;
        t.received_at_ms = None;
        t.cancelled_at_ms = None;
        t.closed_by = None;
        for l in &mut t.lines {
            l.received = None;
        }
        Some(t)
    }

    /// The API's JSON shape (times as RFC 3339; per line `lost` once received).
    pub fn to_json(&self) -> Value {
        let lines: Vec<Value> = self
            .lines
            .iter()
            .map(|l| {
                json!({
                    "sku": l.sku,
                    "shipped": l.shipped,
                    "received": l.received,
                    "lost": l.received.map(|r| l.shipped - r),
                })
            })
            .collect();
        json!({
            "id": self.id,
            "from": self.from,
            "to": self.to,
            "status": self.status.as_str(),
            "reason": self.reason,
            "lines": lines,
            "shipped_at": rfc3339(self.shipped_at_ms),
            "received_at": self.received_at_ms.map(rfc3339),
            "cancelled_at": self.cancelled_at_ms.map(rfc3339),
        })
    }
}

/// What a receive or cancel did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransferChanged {
    /// First time (false: a retry, answered with the transfer as it stands).
    pub created: bool,
    /// The transfer after the command.
    pub transfer: Transfer,
    /// Counter changes, per store and SKU in the order applied (a received line with a loss
    /// shows its net change).
    pub lines: Vec<ChangedLine>,
    /// Stores whose counters changed.
    pub stores: Vec<StoreId>,
    /// Stores whose holds or incoming transfers changed (their agents get new snapshots).
    pub holds_changed: Vec<StoreId>,
    /// The hub counter sequence head after the command.
    pub counter_head: u64,
}

/// Which transfers to list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TransferFilter {
    /// Only transfers from or to this store.
    pub store: Option<StoreId>,
    /// Only transfers in this state.
    pub status: Option<TransferStatus>,
    /// Only transfers listed after this one (the previous page's last id).
    pub after: Option<Uuid>,
    /// Most rows.
    pub limit: usize,
}

/// The transfer's lines: one per SKU, quantities added up, in first-appearance order.
pub(crate) fn lines_of(lines: &[QtyLine]) -> Vec<TransferLine> {
    let mut out: Vec<TransferLine> = Vec::new();
    for l in lines {
        match out.iter_mut().find(|t| t.sku == l.sku) {
            Some(t) => t.shipped += l.qty,
            None => out.push(TransferLine { sku: l.sku.clone(), shipped: l.qty, received: None }),
        }
    }
    out
}

/// A transfer from before shipping and receiving were apart, rebuilt from its stored answer
/// (its lines: negative at the source, positive at the destination). `None` if it does not read
/// as one.
pub(crate) fn legacy(id: Uuid, lines: &[ChangedLine], at_ms: i64) -> Option<Transfer> {
    let from = lines.iter().find(|l| l.delta < 0)?.store.clone();
    let to = lines.iter().find(|l| l.delta > 0)?.store.clone();
    let shipped: Vec<QtyLine> = lines
        .iter()
        .filter(|l| l.store == from && l.delta < 0)
        .map(|l| QtyLine { sku: l.sku.clone(), qty: l.delta.unsigned_abs() })
        .collect();
    let mut lines = lines_of(&shipped);
    for l in &mut lines {
        l.received = Some(l.shipped);
    }
    Some(Transfer {
        id,
        from,
        to,
        status: TransferStatus::Received,
        lines,
        reason: None,
        shipped_at_ms: at_ms,
        received_at_ms: Some(at_ms),
        cancelled_at_ms: None,
        closed_by: None,
        legacy: true,
    })
}

fn invalid(e: impl std::fmt::Display) -> Refusal {
    Refusal::Invalid(e.to_string())
}

/// The hub's counter changes at one store, each with its journal event.
struct Booking<'a> {
    st: StoreIx,
    /// (sku, delta, kind, reason) in order.
    events: Vec<(&'a Sku, i64, EventKind, Option<String>)>,
}

/// Writes a booking under the hub's writer: one journal event per change (lines from
/// `first_line`, id `id`), then each touched cell refreshed, announced and reconciled once.
/// Plans first (entry bounds, sums): a refusal leaves nothing behind.
fn book(cx: &mut Ctx<'_>, id: Uuid, first_line: u32, b: Booking<'_>) -> Result<Booked, Refusal> {
    let st = b.st;
    crate::merge::plan_hub_changes(cx.t, b.events.iter().map(|(sku, delta, _, _)| (st, *sku, *delta)))?;
    let now = cx.now;
    let store = cx.t.store(st).id.clone();
    let mut net: Vec<(Sku, i64)> = Vec::new();
    for (n, (sku, delta, kind, reason)) in b.events.into_iter().enumerate() {
        let line = first_line + n as u32;
        crate::merge::write_hub_line(cx, crate::merge::HubLine { st, sku, delta, kind, reason, id, line });
        match net.iter_mut().find(|(s, _)| s == sku) {
            Some((_, d)) => *d += delta,
            None => net.push((sku.clone(), delta)),
        }
    }
    let mut out = Booked { lines: Vec::with_capacity(net.len()), holds: BTreeSet::new() };
    for (sku, delta) in net {
        let sk = cx.t.sku_ix[&sku];
        let (_, on_hand) = cx.t.refresh(st, sk);
        if crate::escrow::settle(cx, st, sk, 0, false) {
            out.holds.insert(store.clone());
        }
        emit_availability(cx.t, st, sk, now);
        out.holds.extend(reconcile(cx, st, sk));
        out.lines.push(ChangedLine { store: store.clone(), sku, delta, on_hand, entry: None });
    }
    Ok(out)
}

/// What [`book`] changed: the net change per SKU, and the stores whose holds reconciliation
/// moved.
pub(crate) struct Booked {
    pub lines: Vec<ChangedLine>,
    pub holds: BTreeSet<StoreId>,
}

/// Ships a transfer: the units leave `from` now (the caller checked its stock); `to` sees them
/// as incoming. Returns the source's changed lines.
pub(crate) fn ship(
    cx: &mut Ctx<'_>,
    id: Uuid,
    from: &StoreId,
    to: &StoreId,
    lines: &[QtyLine],
    reason: Option<&String>,
) -> Result<(Booked, Transfer), Refusal> {
    let (f, d) = (require(cx.t, from)?, require(cx.t, to)?);
    let why = Some(match reason {
        Some(r) => format!("to {to}: {r}"),
        None => format!("to {to}"),
    });
    // One event per SKU (lines of one SKU added up), so a cancellation's events follow them.
    let per_sku = lines_of(lines);
    let events = per_sku.iter().map(|l| (&l.sku, -(l.shipped as i64), EventKind::Transfer, why.clone())).collect();
    let mut changed = book(cx, id, 0, Booking { st: f, events })?;
    let transfer = Transfer {
        id,
        from: from.clone(),
        to: to.clone(),
        status: TransferStatus::InTransit,
        lines: per_sku.clone(),
        reason: reason.cloned(),
        shipped_at_ms: cx.now,
        received_at_ms: None,
        cancelled_at_ms: None,
        closed_by: None,
        legacy: false,
    };
    cx.t.put_transfer(transfer.clone());
    cx.t.bump_holds(d);
    changed.holds.insert(to.clone());
    cx.t.emit(FeedKind::TransferShipped, cx.now, FeedData::Transfer { transfer: transfer.clone() });
    Ok((changed, transfer))
}

fn replay(cx: &Ctx<'_>, t: &Transfer) -> TransferChanged {
    TransferChanged {
        created: false,
        transfer: t.clone(),
        lines: Vec::new(),
        stores: Vec::new(),
        holds_changed: Vec::new(),
        counter_head: cx.t.counter_seq,
    }
}

/// Refuses a second, different request on a closed transfer.
fn closed(t: &Transfer, fingerprint: &[u8], key: Option<&String>, asked: &str) -> Result<bool, Refusal> {
    match &t.closed_by {
        Some(c) if c.fingerprint == fingerprint => Ok(true),
        Some(c) if key.is_some() && c.key.as_ref() == key => {
            Err(Refusal::IdempotencyConflict { id: t.id, kind: format!("transfer {asked}") })
        }
        _ => {
            let what = match t.status {
                TransferStatus::Received if asked == "receive" => "was received already, with other quantities",
                TransferStatus::Received => "was received; it can no longer be cancelled",
                TransferStatus::Cancelled => "was cancelled",
                TransferStatus::InTransit => unreachable!("only closed transfers"),
            };
            Err(Refusal::InvalidState(format!("transfer {} {what}", t.id)))
        }
    }
}

/// Receives a transfer at its destination: `lines` says how many of each shipped SKU arrived
/// (`None`: everything shipped).
pub(crate) fn receive(
    cx: &mut Ctx<'_>,
    id: Uuid,
    lines: Option<&[QtyLine]>,
    key: Option<String>,
) -> Result<TransferChanged, Refusal> {
    let t = cx.t.transfers.get(&id).ok_or_else(|| Refusal::NotFound(format!("no transfer {id}")))?.clone();
    let received: Vec<u64> = match lines {
        None => t.lines.iter().map(|l| l.shipped).collect(),
        Some(lines) => {
            if lines.len() > LINES_MAX {
                return Err(invalid(format!("lines has {} entries; the limit is {LINES_MAX}", lines.len())));
            }
            let mut got: Vec<Option<u64>> = vec![None; t.lines.len()];
            for (i, l) in lines.iter().enumerate() {
                let Some(at) = t.lines.iter().position(|s| s.sku == l.sku) else {
                    return Err(invalid(format!("lines[{i}].sku {} was not shipped in transfer {id}", l.sku)));
                };
                if got[at].is_some() {
                    return Err(invalid(format!("lines[{i}].sku {} is listed twice", l.sku)));
                }
                let shipped = t.lines[at].shipped;
                if l.qty > shipped {
                    return Err(invalid(format!(
                        "lines[{i}].qty is {} but only {shipped} of {} were shipped; record extra units as a found \
                         adjustment at the store",
                        l.qty, l.sku
                    )));
                }
                got[at] = Some(l.qty);
            }
            if let Some(missing) = got.iter().position(Option::is_none) {
                return Err(invalid(format!(
                    "lines must name every shipped SKU; {} is missing (qty 0 if none arrived)",
                    t.lines[missing].sku
                )));
            }
            got.into_iter().map(|g| g.expect("checked")).collect()
        }
    };
    let skus: Vec<(&Sku, u64)> = t.lines.iter().zip(&received).map(|(l, r)| (&l.sku, *r)).collect();
    let fingerprint = fingerprint_of(&("receive", &skus));
    if t.status != TransferStatus::InTransit {
        closed(&t, &fingerprint, key.as_ref(), "receive")?;
        return Ok(replay(cx, &t));
    }
    let d = require(cx.t, &t.to)?;
    let why = Some(match &t.reason {
        Some(r) => format!("from {}: {r}", t.from),
        None => format!("from {}", t.from),
    });
    let loss_reason = Reason { code: ReasonCode::TransitLoss, note: Some(format!("transfer {id} from {}", t.from)) };
    let mut events = Vec::new();
    for (l, got) in t.lines.iter().zip(&received) {
        events.push((&l.sku, l.shipped as i64, EventKind::Transfer, why.clone()));
        if *got < l.shipped {
            events.push((&l.sku, -((l.shipped - got) as i64), EventKind::Adjustment, Some(loss_reason.to_stored())));
        }
    }
    let changed = book(cx, id, 0, Booking { st: d, events })?;
    let mut after = t.clone();
    after.status = TransferStatus::Received;
    after.received_at_ms = Some(cx.now);
    for (l, got) in after.lines.iter_mut().zip(&received) {
        l.received = Some(*got);
    }
    after.closed_by = Some(Closing { fingerprint, key });
    Ok(close(cx, d, after, FeedKind::TransferReceived, changed))
}

/// Cancels a transfer in transit: the units go back to the source.
pub(crate) fn cancel(cx: &mut Ctx<'_>, id: Uuid, key: Option<String>) -> Result<TransferChanged, Refusal> {
    let t = cx.t.transfers.get(&id).ok_or_else(|| Refusal::NotFound(format!("no transfer {id}")))?.clone();
    let fingerprint = fingerprint_of(&("cancel", id));
    if t.status != TransferStatus::InTransit {
        closed(&t, &fingerprint, key.as_ref(), "cancel")?;
        return Ok(replay(cx, &t));
    }
    let f = require(cx.t, &t.from)?;
    let d = cx.t.store_ix[&t.to];
    // The shipment wrote lines 0..n (one per SKU) at the source; the return follows them.
    let first = t.lines.len() as u32;
    let why = Some(match &t.reason {
        Some(r) => format!("cancelled transfer to {}: {r}", t.to),
        None => format!("cancelled transfer to {}", t.to),
    });
    let events = t.lines.iter().map(|l| (&l.sku, l.shipped as i64, EventKind::Transfer, why.clone())).collect();
    let changed = book(cx, id, first, Booking { st: f, events })?;
    let mut after = t.clone();
    after.status = TransferStatus::Cancelled;
    after.cancelled_at_ms = Some(cx.now);
    after.closed_by = Some(Closing { fingerprint, key });
    Ok(close(cx, d, after, FeedKind::TransferCancelled, changed))
}

fn close(cx: &mut Ctx<'_>, to: StoreIx, after: Transfer, kind: FeedKind, booked: Booked) -> TransferChanged {
    let Booked { lines, mut holds } = booked;
    cx.t.put_transfer(after.clone());
    cx.t.bump_holds(to);
    holds.insert(after.to.clone());
    cx.t.emit(kind, cx.now, FeedData::Transfer { transfer: after.clone() });
    let mut stores: Vec<StoreId> = Vec::new();
    for l in &lines {
        if !stores.contains(&l.store) {
            stores.push(l.store.clone());
        }
    }
    TransferChanged {
        created: true,
        transfer: after,
        lines,
        stores,
        holds_changed: holds.into_iter().collect(),
        counter_head: cx.t.counter_seq,
    }
}

impl Decider {
    /// One transfer.
    pub fn transfer(&self, id: Uuid) -> Option<Transfer> {
        self.t.transfers.get(&id).cloned()
    }

    /// Transfers, newest first (by ship time, then id), filtered.
    pub fn transfers(&self, f: &TransferFilter) -> Vec<Transfer> {
        let mut out: Vec<&Transfer> = self
            .t
            .transfers
            .values()
            .filter(|t| f.store.as_ref().is_none_or(|s| *s == t.from || *s == t.to))
            .filter(|t| f.status.is_none_or(|s| s == t.status))
            .collect();
        let newest_first = |t: &Transfer| (std::cmp::Reverse(t.shipped_at_ms), std::cmp::Reverse(t.id));
        out.sort_by_key(|t| newest_first(t));
        let start = match f.after.and_then(|id| self.t.transfers.get(&id)) {
            Some(after) => out.partition_point(|t| newest_first(t) <= newest_first(after)),
            None => 0,
        };
        out.into_iter().skip(start).take(f.limit).cloned().collect()
    }

    /// Units of a SKU on their way to a store (shipped to it, not yet received or cancelled).
    pub fn incoming(&self, store: &StoreId, sku: &Sku) -> u64 {
        let (Some(st), Some(sk)) = (self.t.store_ix.get(store), self.t.sku_ix.get(sku)) else { return 0 };
        self.t.incoming.get(sk).and_then(|m| m.get(st)).copied().unwrap_or(0)
    }

    /// The transfers on their way to a store, as pushed to its agent ([`incoming_snapshot`]).
    pub fn incoming_snapshot(&self, store: &StoreId) -> IncomingSnapshot {
        let Some(&st) = self.t.store_ix.get(store) else {
            return IncomingSnapshot { version: 0, transfers: Vec::new() };
        };
        let transfers = self.t.in_transit_to.get(&st).into_iter().flatten().map(|(_, id)| &self.t.transfers[id]);
        incoming_snapshot(self.t.store(st).holds_version, transfers)
    }

    /// Per SKU, the units on their way to a store (SKUs in order).
    pub fn incoming_of_store(&self, store: &StoreId) -> BTreeMap<Sku, u64> {
        let mut out = BTreeMap::new();
        let Some(&st) = self.t.store_ix.get(store) else { return out };
        for (_, id) in self.t.in_transit_to.get(&st).into_iter().flatten() {
            for l in &self.t.transfers[id].lines {
                *out.entry(l.sku.clone()).or_insert(0) += l.shipped;
            }
        }
        out
    }
}

/// The transfers on their way to a store as pushed to its agent: `transfers` oldest first, as
/// many whole ones as the frame's limits allow; `version` is the store's holds version (the
/// deciders bump it when a transfer to it ships or closes).
pub fn incoming_snapshot<'a>(version: u64, transfers: impl IntoIterator<Item = &'a Transfer>) -> IncomingSnapshot {
    let (mut out, mut lines_total) = (Vec::new(), 0);
    for t in transfers {
        if out.len() == INCOMING_TRANSFERS_MAX || lines_total + t.lines.len() > INCOMING_LINES_MAX {
            break;
        }
        lines_total += t.lines.len();
        out.push(IncomingTransfer {
            id: t.id,
            from: t.from.clone(),
            lines: t.lines.iter().map(|l| IncomingLine { sku: l.sku.clone(), qty: l.shipped }).collect(),
            shipped_at_ms: t.shipped_at_ms,
        });
    }
    IncomingSnapshot { version, transfers: out }
}
