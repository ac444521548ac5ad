//! Stock changes coming in: a store's merged counter entries with the holds it picked (one
//! merge), and the hub's own restocks and transfers. Each changed (store, SKU) is refreshed,
//! announced and reconciled in the same command, so a picked unit is never counted both as held
//! and as gone, and no change of `on_hand` goes unreconciled.
//!
//! Both commands plan first (entry bounds, sums, stock of a transfer's source) and only then
//! write, so a refusal leaves nothing behind.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use shelfsync_shared::journal::{EventKind, JournalEvent};
use shelfsync_shared::qty::{ADJUST_DELTA_MAX, LINES_MAX, LINE_QTY_MAX, REASON_MAX_LEN};
use shelfsync_shared::{PnEntry, Sku, StoreId, WriterId};
use uuid::Uuid;

use crate::alerts::{emit_availability, record_velocity};
use crate::command::{Done, HubChange, HubChangeRequest, HubChanged, Merged, Outcome, Refusal, RESTOCK_BATCH_MAX};
use crate::feed::{FeedData, FeedKind};
use crate::model::{
    AllocationStatus, ChangedLine, HubChangeKind, HubChangeResponse, HubRequest, QtyLine, ReservationStatus, SkuIx,
    StoreIx,
};
use crate::reconcile::reconcile;
use crate::stores::require;
use crate::tables::Tables;
use crate::view::build;
use crate::{Ctx, Decider};
use shelfsync_shared::fingerprint_of;

fn invalid(e: impl std::fmt::Display) -> Refusal {
    Refusal::Invalid(e.to_string())
}

/// The hub's entry of `writer` for (store, sku) (zero if none).
pub(crate) fn entry_of(t: &Tables, st: StoreIx, sku: &Sku, writer: &WriterId) -> PnEntry {
    let (Some(sk), Some(w)) = (t.sku_ix.get(sku), t.writer_ix.get(writer)) else { return PnEntry::default() };
    t.cell(st, *sk).and_then(|c| c.slots.iter().find(|s| s.writer == *w)).map_or(PnEntry::default(), |s| s.entry)
}

/// `on_hand` of (store, sku) as the tables hold it (0 for a cell never seen).
pub(crate) fn on_hand_of(t: &Tables, st: StoreIx, sku: &Sku) -> i64 {
    t.sku_ix.get(sku).and_then(|sk| t.cell(st, *sk)).map_or(0, |c| c.on_hand)
}

/// Plans hub-authored changes `(store, sku, delta)` in order before any is written: each hub
/// entry stays within its bounds and each `on_hand` within i64, so a refusal leaves nothing.
pub(crate) fn plan_hub_changes<'a>(
    t: &Tables,
    changes: impl IntoIterator<Item = (StoreIx, &'a Sku, i64)>,
) -> Result<(), Refusal> {
    let hub = &t.hub_writer;
    let mut planned: HashMap<(StoreIx, &Sku), (PnEntry, i128)> = HashMap::new();
    for (st, sku, delta) in changes {
        let (entry, sum) = match planned.get(&(st, sku)) {
            Some(p) => *p,
            None => (entry_of(t, st, sku, hub), i128::from(on_hand_of(t, st, sku))),
        };
        let next = entry.apply(hub, delta).map_err(invalid)?;
        let sum = sum + i128::from(delta);
        i64::try_from(sum).map_err(|_| invalid(shelfsync_shared::CounterError::ValueOverflow))?;
        planned.insert((st, sku), (next, sum));
    }
    Ok(())
}

/// One hub-authored change of a cell with its journal line.
pub(crate) struct HubLine<'a> {
    pub st: StoreIx,
    pub sku: &'a Sku,
    pub delta: i64,
    pub kind: EventKind,
    pub reason: Option<String>,
    /// The journal event's id and line.
    pub id: Uuid,
    pub line: u32,
}

/// Writes one planned hub-authored change: the hub writer's entry and its journal line (told to
/// the feed when it is an adjustment). The caller refreshes, announces and reconciles the cell.
pub(crate) fn write_hub_line(cx: &mut Ctx<'_>, l: HubLine<'_>) -> SkuIx {
    let hub = cx.t.hub_writer.clone();
    let sk = cx.t.intern_sku(l.sku);
    let w = cx.t.intern_writer(&hub);
    let next = entry_of(cx.t, l.st, l.sku, &hub).apply(&hub, l.delta).expect("planned");
    cx.t.put_entry(l.st, sk, w, next);
    let event = JournalEvent {
        id: l.id,
        line: l.line,
        kind: l.kind,
        store: cx.t.store(l.st).id.clone(),
        sku: l.sku.clone(),
        delta: l.delta,
        reason: l.reason,
        occurred_at_ms: cx.now,
        recorded_at_ms: cx.now,
        writer: hub,
        flags: Vec::new(),
    };
    cx.t.note_journal(event, true, cx.now);
    sk
}

/// `on_hand` of (store, sku) with some entries replaced, refusing a sum outside i64.
fn planned_sum(t: &Tables, st: StoreIx, sku: &Sku, planned: &[(&WriterId, PnEntry)]) -> Result<i64, Refusal> {
    let mut total: i128 = 0;
    let mut seen: BTreeSet<&WriterId> = BTreeSet::new();
    let planned_of = |w: &WriterId| planned.iter().rev().find(|(pw, _)| *pw == w).map(|(_, e)| *e);
    if let Some(cell) = t.sku_ix.get(sku).and_then(|sk| t.cell(st, *sk)) {
        for s in &cell.slots {
            let w = t.writer(s.writer);
            seen.insert(w);
            total += planned_of(w).unwrap_or(s.entry).value();
        }
    }
    for (w, _) in planned {
        if seen.insert(w) {
            total += planned_of(w).expect("listed").value();
        }
    }
    i64::try_from(total).map_err(|_| invalid(shelfsync_shared::CounterError::ValueOverflow))
}

/// Merges a store's changed entries and closes the holds it picked.
pub(crate) fn merge(
    cx: &mut Ctx<'_>,
    store: &StoreId,
    entries: &[(Sku, WriterId, PnEntry)],
    fulfilled: &[Uuid],
    rights: &[crate::escrow::RightsUpdate],
) -> Outcome {
    let st = require(cx.t, store)?;
    crate::escrow::plan(store, rights)?;
    let mut planned: HashMap<(&Sku, &WriterId), PnEntry> = HashMap::new();
    let mut changes: Vec<(&Sku, &WriterId, PnEntry)> = Vec::new();
    for (sku, writer, incoming) in entries {
        incoming.check(writer).map_err(invalid)?;
        let current = planned.get(&(sku, writer)).copied().unwrap_or_else(|| entry_of(cx.t, st, sku, writer));
        if !current.covers(*incoming) {
            let next = current.join(*incoming);
            planned.insert((sku, writer), next);
            changes.push((sku, writer, next));
        }
    }
    // The planned entries per SKU (a delta holds few writers per SKU, often one).
    let mut by_sku: BTreeMap<&Sku, Vec<(&WriterId, PnEntry)>> = BTreeMap::new();
    for (sku, writer, next) in &changes {
        by_sku.entry(*sku).or_default().push((*writer, *next));
    }
    for (sku, planned) in &by_sku {
        planned_sum(cx.t, st, sku, planned)?;
    }
    let counted: BTreeSet<&Sku> = by_sku.keys().copied().collect();

    for (sku, writer, next) in &changes {
        let (sk, w) = (cx.t.intern_sku(sku), cx.t.intern_writer(writer));
        cx.t.put_entry(st, sk, w, *next);
    }
    // Rights before the holds and on_hand move: a fulfilment's consumption lands with its sale.
    let granted = crate::escrow::merge(cx, st, rights);
    let mut touched: BTreeSet<&Sku> = counted.clone();
    for (sku, ..) in rights {
        if granted.iter().any(|(sk, _)| cx.t.sku(*sk).sku == *sku) {
            touched.insert(sku);
        }
    }
    let mut holds_changed: BTreeSet<StoreId> = BTreeSet::new();
    // Close the picked holds before on_hand is refreshed: one command lowers both.
    let picked = fulfil(cx, st, fulfilled);
    if !picked.is_empty() {
        holds_changed.insert(store.clone());
    }
    let mut changed = Vec::with_capacity(touched.len());
    for sku in touched {
        let sk = cx.t.sku_ix[sku];
        let (old, new) = cx.t.refresh(st, sk);
        record_velocity(cx.t, st, sk, old, new, cx.now, cx.cfg.staleness.tau_ms);
        let grant = granted.iter().find(|(s, _)| *s == sk).map_or(0, |g| g.1);
        if crate::escrow::settle(cx, st, sk, grant, true) {
            holds_changed.insert(store.clone());
        }
        emit_availability(cx.t, st, sk, cx.now);
        holds_changed.extend(reconcile(cx, st, sk));
        if counted.contains(sku) {
            changed.push((sku.clone(), new));
        }
    }
    // A picked hold frees its units for the channels even when the same delta did not move
    // on_hand (a pick the counter already had).
    for sk in picked {
        crate::channels::emit_ats(cx.t, sk, cx.now);
    }
    // Last contact only moves forward (commands are stamped on arrival, decided in queue order).
    let seen = cx.t.store(st).last_seen_ms.map_or(cx.now, |at| at.max(cx.now));
    if cx.t.store(st).last_seen_ms != Some(seen) {
        cx.t.store_mut(st).last_seen_ms = Some(seen);
    }
    Ok(Done::Merged(Merged {
        changed,
        entries_changed: changes.len(),
        holds_changed: holds_changed.into_iter().collect(),
        counter_head: cx.t.counter_seq,
    }))
}

/// Closes holds a store picked. Unknown ids (or another store's) are skipped; a hold the hub had
/// already closed (moved, released, expired) is still marked fulfilled: the customer got the
/// goods. Returns the SKUs of the holds that changed.
fn fulfil(cx: &mut Ctx<'_>, st: StoreIx, holds: &[Uuid]) -> BTreeSet<SkuIx> {
    let now = cx.now;
    let store = cx.t.store(st).id.clone();
    let mut any = BTreeSet::new();
    for h in holds {
        let Some(a) = cx.t.allocations.get(h).filter(|a| a.store == store) else { continue };
        if a.status == AllocationStatus::Fulfilled {
            continue;
        }
        let (res, sk) = (a.reservation, cx.t.sku_ix[&a.sku]);
        cx.t.set_alloc_status(*h, AllocationStatus::Fulfilled, now);
        any.insert(sk);
        let open = cx.t.allocations_of(res).any(|a| cx.t.allocations[a].status.is_open());
        if !open && cx.t.reservations[&res].status.is_open() {
            cx.t.set_reservation(res, ReservationStatus::Fulfilled, None, now);
        }
        let view = build(cx.t, &cx.t.reservations[&res]);
        cx.t.emit(
            FeedKind::ReservationFulfilled,
            now,
            FeedData::Fulfilled { reservation: view, hold: *h, store: store.clone() },
        );
    }
    if !any.is_empty() {
        cx.t.bump_holds(st);
    }
    any
}

fn validate_lines(lines: &[QtyLine], reason: Option<&String>) -> Result<(), Refusal> {
    if lines.is_empty() {
        return Err(invalid("lines must not be empty"));
    }
    if lines.len() > LINES_MAX {
        return Err(invalid(format!("lines has {} entries; the limit is {LINES_MAX}", lines.len())));
    }
    for (i, l) in lines.iter().enumerate() {
        if l.qty < 1 || l.qty > LINE_QTY_MAX {
            return Err(invalid(format!("lines[{i}].qty must be between 1 and {LINE_QTY_MAX}, got {}", l.qty)));
        }
    }
    check_reason("reason", reason)
}

fn check_reason(what: &str, reason: Option<&String>) -> Result<(), Refusal> {
    match reason {
        Some(r) if r.len() > REASON_MAX_LEN => {
            Err(invalid(format!("{what} is {} bytes long; the limit is {REASON_MAX_LEN}", r.len())))
        }
        _ => Ok(()),
    }
}

/// Checks a request's shape (the API checks the same, naming fields; commands from elsewhere
/// get here too) and says which kind it is.
fn validate_change(req: &HubChangeRequest) -> Result<HubChangeKind, Refusal> {
    match &req.change {
        HubChange::Restock { lines, .. } => validate_lines(lines, req.reason.as_ref()).map(|()| HubChangeKind::Restock),
        HubChange::Transfer { lines, .. } => {
            validate_lines(lines, req.reason.as_ref()).map(|()| HubChangeKind::Transfer)
        }
        HubChange::Adjust { delta, .. } => {
            if *delta == 0 || delta.abs() > ADJUST_DELTA_MAX {
                return Err(invalid(format!(
                    "delta must be non-zero and between -{ADJUST_DELTA_MAX} and {ADJUST_DELTA_MAX}, got {delta}"
                )));
            }
            if req.reason.is_none() {
                return Err(invalid("an adjustment needs a reason"));
            }
            check_reason("reason", req.reason.as_ref())?;
            Ok(HubChangeKind::Adjustment)
        }
        HubChange::RestockBatch { restocks } => {
            if restocks.is_empty() || restocks.len() > RESTOCK_BATCH_MAX {
                return Err(invalid(format!(
                    "restocks must have 1 to {RESTOCK_BATCH_MAX} entries, got {}",
                    restocks.len()
                )));
            }
            if req.reason.is_some() {
                return Err(invalid("a batch restock has a reason per entry"));
            }
            for (i, r) in restocks.iter().enumerate() {
                validate_lines(&r.lines, r.reason.as_ref()).map_err(|e| invalid(format!("restocks[{i}]: {e}")))?;
            }
            Ok(HubChangeKind::RestockBatch)
        }
    }
}

/// One planned change of a hub entry.
struct Move<'a> {
    st: StoreIx,
    sku: &'a Sku,
    delta: i64,
    reason: Option<String>,
    /// The journal event's id (the request's, or a batch entry's own).
    event: Uuid,
    kind: EventKind,
    /// The batch entry it belongs to.
    entry: Option<u32>,
}

/// A restock, a transfer's shipment, an adjustment or a batch restock, idempotent by id. Writes
/// the hub writer's entries; all or nothing.
pub(crate) fn hub_change(cx: &mut Ctx<'_>, req: &HubChangeRequest) -> Result<HubChanged, Refusal> {
    let kind = validate_change(req)?;
    let fingerprint = fingerprint_of(&(&req.change, &req.reason));
    if let Some(earlier) = cx.t.hub_requests.get(&req.id) {
        if earlier.kind != kind || earlier.fingerprint != fingerprint {
            return Err(Refusal::IdempotencyConflict { id: req.id, kind: earlier.kind.as_str().into() });
        }
        return Ok(HubChanged {
            created: false,
            response: earlier.response.clone(),
            stores: Vec::new(),
            holds_changed: Vec::new(),
            counter_head: cx.t.counter_seq,
            transfer: cx.t.transfers.get(&req.id).and_then(crate::transfers::Transfer::as_shipped),
        });
    }
    if let HubChange::Transfer { from, to, lines } = &req.change {
        return ship(cx, req, from, to, lines, fingerprint);
    }
    let mv = |st, sku, delta, reason, kind| Move { st, sku, delta, reason, event: req.id, kind, entry: None };
    let mut moves: Vec<Move<'_>> = Vec::new();
    match &req.change {
        HubChange::Restock { store, lines } => {
            let st = require(cx.t, store)?;
            for l in lines {
                moves.push(mv(st, &l.sku, l.qty as i64, req.reason.clone(), EventKind::Restock));
            }
        }
        HubChange::Transfer { .. } => unreachable!("shipments are decided by ship, above"),
        HubChange::Adjust { store, sku, delta, expected_on_hand } => {
            let st = require(cx.t, store)?;
            // Compare-and-set in the same decision as the change: nothing can come between.
            let on_hand = on_hand_of(cx.t, st, sku);
            if let Some(expected) = *expected_on_hand {
                if expected != on_hand {
                    return Err(Refusal::StaleQuantity { store: store.clone(), sku: sku.clone(), expected, on_hand });
                }
            }
            moves.push(mv(st, sku, *delta, req.reason.clone(), EventKind::Adjustment));
        }
        HubChange::RestockBatch { restocks } => {
            let key = shelfsync_shared::IdempotencyKey::from_uuid(req.id);
            for (i, r) in restocks.iter().enumerate() {
                let st = require(cx.t, &r.store).map_err(|e| match e {
                    Refusal::UnknownStore(s) => invalid(format!("restocks[{i}].store: unknown store {s}")),
                    Refusal::Revoked(s) => invalid(format!("restocks[{i}].store: store {s} is revoked")),
                    other => other,
                })?;
                for l in &r.lines {
                    moves.push(Move {
                        st,
                        sku: &l.sku,
                        delta: l.qty as i64,
                        reason: r.reason.clone(),
                        event: key.item(i),
                        kind: EventKind::Restock,
                        entry: Some(i as u32),
                    });
                }
            }
        }
    }
    plan_hub_changes(cx.t, moves.iter().map(|m| (m.st, m.sku, m.delta)))?;

    let now = cx.now;
    let mut changed_lines = Vec::new();
    let mut stores: Vec<StoreId> = Vec::new();
    let mut line_no: BTreeMap<(Uuid, StoreIx), u32> = BTreeMap::new();
    let mut holds_changed: BTreeSet<StoreId> = BTreeSet::new();
    for m in moves {
        let Move { st, sku, delta, reason, event, kind: journal_kind, entry } = m;
        let n = line_no.entry((event, st)).or_default();
        let line = HubLine { st, sku, delta, kind: journal_kind, reason, id: event, line: *n };
        let sk = write_hub_line(cx, line);
        let (_, on_hand) = cx.t.refresh(st, sk);
        if crate::escrow::settle(cx, st, sk, 0, false) {
            holds_changed.insert(cx.t.store(st).id.clone());
        }
        emit_availability(cx.t, st, sk, now);
        holds_changed.extend(reconcile(cx, st, sk));
        let store = cx.t.store(st).id.clone();
        *n += 1;
        if !stores.contains(&store) {
            stores.push(store.clone());
        }
        changed_lines.push(ChangedLine { store, sku: sku.clone(), delta, on_hand, entry });
    }
    let key = req.key.clone().filter(|k| *k != req.id.to_string());
    let response = HubChangeResponse { id: req.id, key, kind, lines: changed_lines, recorded_at_ms: now };
    cx.t.put_hub_request(HubRequest { id: req.id, kind, fingerprint, response: response.clone() });
    Ok(HubChanged {
        created: true,
        response,
        stores,
        holds_changed: holds_changed.into_iter().collect(),
        counter_head: cx.t.counter_seq,
        transfer: None,
    })
}

/// Ships a transfer (see `transfers`): refused when `from` has fewer on hand than the lines
/// take, counting earlier lines of the same SKU.
fn ship(
    cx: &mut Ctx<'_>,
    req: &HubChangeRequest,
    from: &StoreId,
    to: &StoreId,
    lines: &[QtyLine],
    fingerprint: Vec<u8>,
) -> Result<HubChanged, Refusal> {
    if from == to {
        return Err(invalid("from and to must be different stores"));
    }
    let f = require(cx.t, from)?;
    require(cx.t, to)?;
    let mut taken: HashMap<&Sku, i64> = HashMap::new();
    for l in lines {
        let have = on_hand_of(cx.t, f, &l.sku);
        let already = taken.entry(&l.sku).or_default();
        if have - *already < l.qty as i64 {
            return Err(Refusal::InsufficientStock {
                store: from.clone(),
                sku: l.sku.clone(),
                on_hand: have - *already,
                wanted: l.qty,
            });
        }
        *already += l.qty as i64;
    }
    let (booked, transfer) = crate::transfers::ship(cx, req.id, from, to, lines, req.reason.as_ref())?;
    let kind = HubChangeKind::Transfer;
    let key = req.key.clone().filter(|k| *k != req.id.to_string());
    let response = HubChangeResponse { id: req.id, key, kind, lines: booked.lines, recorded_at_ms: cx.now };
    cx.t.put_hub_request(HubRequest { id: req.id, kind, fingerprint, response: response.clone() });
    Ok(HubChanged {
        created: true,
        response,
        stores: vec![from.clone()],
        holds_changed: booked.holds.into_iter().collect(),
        counter_head: cx.t.counter_seq,
        transfer: Some(transfer),
    })
}

/// A page of a store's counter entries for its agent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EntriesPage {
    /// (hub sequence, sku, writer, entry), by sequence.
    pub entries: Vec<(u64, Sku, WriterId, PnEntry)>,
    /// The watermark the agent acks once it applied the page.
    pub upto: u64,
}

impl Decider {
    /// Entries of `store` changed after hub sequence `after` (all writers but `exclude`), at most
    /// `limit`, by sequence. `upto` is the last sequence of a full page, else the counter head.
    pub fn entries_since(&self, store: &StoreId, after: u64, exclude: Option<&WriterId>, limit: usize) -> EntriesPage {
        let Some(&st) = self.t.store_ix.get(store) else {
            return EntriesPage { entries: Vec::new(), upto: self.t.counter_seq.max(after) };
        };
        let mut entries = Vec::new();
        for (&seq, &(sk, w)) in self.t.store(st).entries_by_seq.range(after.saturating_add(1)..) {
            if entries.len() == limit {
                break;
            }
            let writer = self.t.writer(w);
            if Some(writer) == exclude {
                continue;
            }
            let slot = self.t.cell(st, sk).and_then(|c| c.slots.iter().find(|s| s.writer == w)).expect("indexed");
            entries.push((seq, self.t.sku(sk).sku.clone(), writer.clone(), slot.entry));
        }
        let upto = match entries.last() {
            Some((seq, ..)) if entries.len() == limit => *seq,
            _ => self.t.counter_seq.max(after),
        };
        EntriesPage { entries, upto }
    }

    /// The hub counter sequence head.
    pub fn counter_head(&self) -> u64 {
        self.t.counter_seq
    }

    /// The merged entry of one writer at (store, SKU) (zero when there is none).
    pub fn entry(&self, store: &StoreId, sku: &Sku, writer: &WriterId) -> PnEntry {
        let (Some(cell), Some(w)) = (self.t.cell_by_name(store, sku), self.t.writer_ix.get(writer)) else {
            return PnEntry::default();
        };
        cell.slots.iter().find(|s| s.writer == *w).map_or(PnEntry::default(), |s| s.entry)
    }

    /// Every merged entry of a store (any order), for digests.
    pub fn store_entries(&self, store: &StoreId) -> Vec<(Sku, WriterId, PnEntry)> {
        let Some(&st) = self.t.store_ix.get(store) else { return Vec::new() };
        self.t
            .store(st)
            .entries_by_seq
            .values()
            .map(|&(sk, w)| {
                let slot = self.t.cell(st, sk).and_then(|c| c.slots.iter().find(|s| s.writer == w)).expect("indexed");
                (self.t.sku(sk).sku.clone(), self.t.writer(w).clone(), slot.entry)
            })
            .collect()
    }

    /// `on_hand` of a SKU at every store with a counter of it (revoked ones too), by store id.
    pub fn stock_of(&self, sku: &Sku) -> Vec<(StoreId, i64)> {
        let Some(&sk) = self.t.sku_ix.get(sku) else { return Vec::new() };
        let mut out: Vec<(StoreId, i64)> = self
            .t
            .sku(sk)
            .stores
            .iter()
            .filter_map(|&st| self.t.cell(st, sk).map(|c| (self.t.store(st).id.clone(), c.on_hand)))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// A page of one store's `on_hand` and `incoming` by SKU, SKUs after `after` in order: those
    /// it has a counter of or units of on their way (`None`: unknown store).
    pub fn store_stock(&self, store: &StoreId, after: Option<&Sku>, limit: usize) -> Option<Vec<(Sku, i64, u64)>> {
        let &st = self.t.store_ix.get(store)?;
        // A cell has one index entry per writer: the map keeps each SKU once, in SKU order.
        let mut skus: BTreeMap<&Sku, SkuIx> =
            self.t.store(st).entries_by_seq.values().map(|&(sk, _)| (&self.t.sku(sk).sku, sk)).collect();
        for (_, id) in self.t.in_transit_to.get(&st).into_iter().flatten() {
            for l in &self.t.transfers[id].lines {
                skus.insert(&l.sku, self.t.sku_ix[&l.sku]);
            }
        }
        let out = skus
            .into_iter()
            .filter(|(s, _)| after.is_none_or(|a| *s > a))
            .take(limit)
            .map(|(s, sk)| {
                let on_hand = self.t.cell(st, sk).map_or(0, |c| c.on_hand);
                let incoming = self.t.incoming.get(&sk).and_then(|m| m.get(&st)).copied().unwrap_or(0);
                (s.clone(), on_hand, incoming)
            })
            .collect();
        Some(out)
    }
}
