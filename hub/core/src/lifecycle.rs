//! The reservation lease: reserve (idempotent by id, all lines or none, per-customer limits),
//! extend / commit / release (idempotent under an Idempotency-Key), expiry of due leases, and what
//! a store is shown of it (holds snapshots).
//!
//! State table of actions (anything else is `InvalidState`):
//!
//! | action  | held            | committed         | fulfilled | released | expired |
//! |---------|-----------------|-------------------|-----------|----------|---------|
//! | extend  | new expiry      | no-op (paid)      | refused   | refused  | refused |
//! | commit  | → committed     | no-op             | no-op     | refused  | refused |
//! | release | → released      | → released        | refused   | no-op    | refused |

use std::collections::{BTreeMap, BTreeSet};

use shelfsync_shared::qty::{LINES_MAX, LINE_QTY_MAX};
use shelfsync_shared::wire::{Hold, HoldStatus, HoldsSnapshot, HOLDS_MAX};
use shelfsync_shared::{Sku, StoreId};
use uuid::Uuid;

use shelfsync_shared::fingerprint_of;

use crate::alerts::emit_availability;
use crate::channels::{Basis, Channel, Fulfil, WEB};
use crate::command::{Action, Expired, Refusal, ReservationRequest, Written, CUSTOMER_MAX_LEN, TTL_SECS_MAX};
use crate::feed::{FeedData, FeedKind};
use crate::model::{ActionRequest, AllocationStatus, Reservation, ReservationStatus, SkuIx, StoreIx};
use crate::sourcing::{partial, source, take, Scope, Taken};
use crate::tables::Tables;
use crate::view::{build, ReservationView};
use crate::{Ctx, Decider};

fn check_ttl(ttl_secs: u64) -> Result<i64, Refusal> {
    if ttl_secs == 0 || ttl_secs > TTL_SECS_MAX {
        return Err(Refusal::Invalid(format!("ttl_secs must be between 1 and {TTL_SECS_MAX}, got {ttl_secs}")));
    }
    Ok(ttl_secs as i64 * 1000)
}

fn validate(req: &ReservationRequest) -> Result<i64, Refusal> {
    if req.lines.is_empty() {
        return Err(Refusal::Invalid("lines must not be empty".into()));
    }
    if req.lines.len() > LINES_MAX {
        return Err(Refusal::Invalid(format!("lines has {} entries; the limit is {LINES_MAX}", req.lines.len())));
    }
    for (i, l) in req.lines.iter().enumerate() {
        if l.qty < 1 || l.qty > LINE_QTY_MAX {
            return Err(Refusal::Invalid(format!(
                "lines[{i}].qty must be between 1 and {LINE_QTY_MAX}, got {}",
                l.qty
            )));
        }
    }
    if let Some(c) = &req.customer {
        if c.is_empty() || c.len() > CUSTOMER_MAX_LEN {
            return Err(Refusal::Invalid(format!("customer must be 1 to {CUSTOMER_MAX_LEN} bytes, got {}", c.len())));
        }
    }
    check_ttl(req.ttl_secs)
}

/// Units of `sku` a customer holds, has paid for or has received.
fn customer_has(t: &Tables, customer: &str, sku: &Sku) -> u64 {
    let Some(reservations) = t.by_customer.get(customer) else { return 0 };
    reservations
        .iter()
        .flat_map(|r| t.allocations_of(*r))
        .map(|a| &t.allocations[a])
        .filter(|a| {
            a.sku == *sku
                && matches!(
                    a.status,
                    AllocationStatus::Held | AllocationStatus::Committed | AllocationStatus::Fulfilled
                )
        })
        .fold(0u64, |acc, a| acc.saturating_add(a.qty))
}

/// Reserves all lines or none.
pub(crate) fn reserve(cx: &mut Ctx<'_>, req: &ReservationRequest) -> Result<Written, Refusal> {
    let ttl_ms = validate(req)?;
    // A `web` request fingerprints as before channels (a retry across the upgrade replays).
    let channel = req.channel.clone().filter(|c| !c.is_web());
    let fingerprint = match &channel {
        None => fingerprint_of(&(&req.lines, req.ttl_secs, &req.pickup_store, &req.customer)),
        Some(c) => fingerprint_of(&(&req.lines, req.ttl_secs, &req.pickup_store, &req.customer, c)),
    };
    if let Some(r) = cx.t.reservations.get(&req.id) {
        if r.fingerprint != fingerprint {
            return Err(Refusal::IdempotencyConflict { id: req.id, kind: "reservation".into() });
        }
        return Ok(Written { created: false, view: r.first_response.clone(), stores: Vec::new() });
    }
    let pickup = match &req.pickup_store {
        None => None,
        Some(p) => match cx.t.store_ix.get(p) {
            None => return Err(Refusal::UnknownStore(p.clone())),
            Some(ix) if cx.t.store(*ix).revoked_at_ms.is_some() => return Err(Refusal::Revoked(p.clone())),
            Some(ix) => Some(*ix),
        },
    };
    // The configured channel, if any (`None`: `web` as it is unconfigured, every store, no
    // limit); a configured one promises within its available-to-sell (buffer, cap, lag margin).
    let ch: Option<Channel> = match &channel {
        Some(id) => Some(cx.t.channels.get(id).cloned().ok_or_else(|| Refusal::Invalid(format!("no channel {id}")))?),
        None => cx.t.channels.get(WEB).cloned(),
    };
    if let Some(ch) = &ch {
        match (&ch.fulfil, &req.pickup_store) {
            (Fulfil::Pickup, None) => {
                return Err(Refusal::Invalid(format!("channel {} is click-and-collect: name a pickup_store", ch.id)))
            }
            (_, Some(p)) if !ch.fulfils(p) => {
                return Err(Refusal::Invalid(format!("store {p} does not fulfil channel {}", ch.id)));
            }
            _ => {}
        }
    }
    let among = ch.as_ref().and_then(Channel::among);
    let live = ch.as_ref().is_none_or(Channel::is_live);
    // Per-customer limits from the catalog, over all lines of a SKU.
    let mut asked: BTreeMap<&Sku, u64> = BTreeMap::new();
    for l in &req.lines {
        *asked.entry(&l.sku).or_default() += l.qty;
    }
    for (sku, qty) in asked {
        let limit = cx.t.sku_ix.get(sku).and_then(|ix| cx.t.sku(*ix).rule).map_or(0, |r| r.max_per_customer);
        if limit == 0 {
            continue;
        }
        let already = req.customer.as_deref().map_or(0, |c| customer_has(cx.t, c, sku));
        if already.saturating_add(qty) > limit {
            return Err(Refusal::LimitExceeded { sku: sku.clone(), limit, already });
        }
    }
    // Plan every line before anything is written. A lagged channel (a marketplace) cannot
    // refuse: what its stores cannot supply is recorded short at one of them (`short`).
    let mut taken = Taken::new();
    let mut plans: Vec<(SkuIx, Vec<(StoreIx, u64)>)> = Vec::with_capacity(req.lines.len());
    let mut shorts: Vec<(usize, StoreIx, u64, crate::channels::ChannelFigures)> = Vec::new();
    let mut promised: BTreeMap<SkuIx, u64> = BTreeMap::new();
    for (i, l) in req.lines.iter().enumerate() {
        let unavailable =
            |available| Refusal::Unavailable { sku: l.sku.clone(), available, store: req.pickup_store.clone() };
        let Some(&sk) = cx.t.sku_ix.get(&l.sku) else { return Err(unavailable(0)) };
        let m = cx.moment();
        let ats = ch.as_ref().map(|ch| {
            let basis = Basis::Read { now_ms: m.now_ms, connected: m.connected, staleness: m.staleness };
            crate::channels::figures(cx.t, ch, sk, basis)
        });
        let before = promised.get(&sk).copied().unwrap_or(0);
        if let Some(f) = ats.as_ref().filter(|_| live) {
            let left = f.ats.saturating_sub(before);
            if l.qty > left {
                return Err(unavailable(left));
            }
        }
        let scope = Scope { only: pickup, exclude: None, among };
        let plan = match source(cx.t, sk, l.qty, scope, &taken, m) {
            Ok(plan) => plan,
            Err(_) if !live => {
                let plan = partial(cx.t, sk, l.qty, scope, &taken, m);
                let found: u64 = plan.iter().map(|p| p.1).sum();
                let Some(at) = pickup.or_else(|| short_store(cx.t, sk, among)) else {
                    return Err(unavailable(0));
                };
                let f = ats.clone().expect("a lagged channel is configured");
                shorts.push((i, at, l.qty - found, f));
                plan
            }
            Err(total) => return Err(unavailable(total)),
        };
        take(&mut taken, sk, &plan);
        *promised.entry(sk).or_default() += l.qty;
        plans.push((sk, plan));
    }

    let now = cx.now;
    let mut r = Reservation {
        id: req.id,
        key: req.key.clone().filter(|k| *k != req.id.to_string()),
        status: ReservationStatus::Held,
        pickup_store: req.pickup_store.clone(),
        customer: req.customer.clone(),
        channel: channel.clone(),
        created_at_ms: now,
        expires_at_ms: Some(now.saturating_add(ttl_ms)),
        updated_at_ms: now,
        fingerprint,
        first_response: placeholder(req.id, now),
        lines: req.lines.clone(),
    };
    let mut stores = BTreeSet::new();
    for (i, (sk, plan)) in plans.iter().enumerate() {
        for (st, q) in plan {
            cx.t.insert_alloc(req.id, i as u32, *st, *sk, *q, AllocationStatus::Held, now);
            stores.insert(cx.t.store(*st).id.clone());
        }
    }
    for (line, at, short, _) in &shorts {
        cx.t.insert_alloc(req.id, *line as u32, *at, plans[*line].0, *short, AllocationStatus::Short, now);
    }
    r.first_response = build(cx.t, &r);
    let view = r.first_response.clone();
    cx.t.insert_reservation(r);
    cx.t.emit(FeedKind::ReservationHeld, now, FeedData::Reservation { reservation: view.clone() });
    for (line, at, short, f) in shorts {
        let ch = ch.as_ref().expect("a lagged channel is configured");
        crate::channels::oversell(cx, ch, req.id, plans[line].0, at, short, &f);
    }
    // How fast this channel reserves each SKU: part of the other channels' lag margins.
    let mut asked_by_sku: BTreeMap<SkuIx, u64> = BTreeMap::new();
    for (i, (sk, _)) in plans.iter().enumerate() {
        *asked_by_sku.entry(*sk).or_default() += req.lines[i].qty;
    }
    let by = channel.clone().unwrap_or_else(crate::channels::ChannelId::web);
    for (sk, qty) in asked_by_sku {
        let prev = cx.t.demand_of(sk, &by);
        let qty = i64::try_from(qty).unwrap_or(i64::MAX);
        if let Some(v) = crate::alerts::next_velocity(prev, qty, 0, now, cx.cfg.staleness.tau_ms) {
            cx.t.set_demand(sk, by.clone(), v);
        }
    }
    let touched: BTreeMap<(StoreId, Sku), (StoreIx, SkuIx)> =
        taken.keys().map(|&(st, sk)| ((cx.t.store(st).id.clone(), cx.t.sku(sk).sku.clone()), (st, sk))).collect();
    for (st, sk) in touched.into_values() {
        cx.t.bump_holds(st);
        emit_availability(cx.t, st, sk, now);
    }
    Ok(Written { created: true, view, stores: stores.into_iter().collect() })
}

/// Where a lagged channel's unsupplied units are recorded: the store among `among` with the most
/// `on_hand` of the SKU (ties by id), `None` when no such store has it at all.
fn short_store(t: &Tables, sk: SkuIx, among: Option<&std::collections::BTreeSet<StoreId>>) -> Option<StoreIx> {
    crate::availability::live_stores_of(t, sk)
        .filter(|st| among.is_none_or(|a| a.contains(&t.store(*st).id)))
        .max_by_key(|st| (t.cell(*st, sk).map_or(i64::MIN, |c| c.on_hand), std::cmp::Reverse(t.store(*st).id.clone())))
}

fn placeholder(id: Uuid, now: i64) -> ReservationView {
    ReservationView {
        id,
        key: None,
        status: ReservationStatus::Held,
        short: false,
        pickup_store: None,
        customer: None,
        channel: None,
        created_at_ms: now,
        expires_at_ms: None,
        allocations: Vec::new(),
        lines: Vec::new(),
    }
}

/// Moves a reservation and its open allocations to `to` (committed, released or expired).
/// Returns the stores whose holds changed.
pub(crate) fn transition(cx: &mut Ctx<'_>, id: Uuid, to: ReservationStatus) -> Vec<StoreId> {
    let (alloc_to, kind) = match to {
        ReservationStatus::Committed => (AllocationStatus::Committed, FeedKind::ReservationCommitted),
        ReservationStatus::Released => (AllocationStatus::Released, FeedKind::ReservationReleased),
        ReservationStatus::Expired => (AllocationStatus::Expired, FeedKind::ReservationExpired),
        s => unreachable!("no transition to {s}"),
    };
    let now = cx.now;
    let open: Vec<Uuid> = cx.t.allocations_of(id).copied().filter(|a| cx.t.allocations[a].status.is_open()).collect();
    let mut stores: BTreeMap<StoreId, StoreIx> = BTreeMap::new();
    let mut touched: BTreeMap<(StoreId, Sku), (StoreIx, SkuIx)> = BTreeMap::new();
    for a in open {
        let (store, sku) = (cx.t.allocations[&a].store.clone(), cx.t.allocations[&a].sku.clone());
        let (st, sk) = (cx.t.store_ix[&store], cx.t.sku_ix[&sku]);
        cx.t.set_alloc_status(a, alloc_to, now);
        stores.insert(store.clone(), st);
        touched.insert((store, sku), (st, sk));
    }
    let r = &cx.t.reservations[&id];
    let expires = if to == ReservationStatus::Committed { None } else { r.expires_at_ms };
    cx.t.set_reservation(id, to, expires, now);
    for st in stores.values() {
        cx.t.bump_holds(*st);
    }
    if to != ReservationStatus::Committed {
        for (st, sk) in touched.values() {
            emit_availability(cx.t, *st, *sk, now);
        }
    }
    let view = build(cx.t, &cx.t.reservations[&id]);
    cx.t.emit(kind, now, FeedData::Reservation { reservation: view });
    if to != ReservationStatus::Committed {
        crate::conflicts::settle_oversells(cx, id);
    }
    stores.into_keys().collect()
}

/// Applies a lifecycle action. `key` makes a retry return the first answer.
pub(crate) fn act(cx: &mut Ctx<'_>, id: Uuid, action: Action, key: Option<String>) -> Result<Written, Refusal> {
    let extend_ms = match action {
        Action::Extend { ttl_secs } => check_ttl(ttl_secs)?,
        _ => 0,
    };
    let fingerprint = fingerprint_of(&(id, action));
    if let Some(key) = &key {
        if let Some(earlier) = cx.t.action_requests.get(key) {
            if earlier.fingerprint != fingerprint {
                let kind = format!("action under Idempotency-Key {}", shelfsync_shared::id::quote(key));
                return Err(Refusal::IdempotencyConflict { id, kind });
            }
            return Ok(Written { created: false, view: earlier.response.clone(), stores: Vec::new() });
        }
    }
    let Some(status) = cx.t.reservations.get(&id).map(|r| r.status) else {
        return Err(Refusal::NotFound(format!("no reservation {id}")));
    };
    use ReservationStatus as S;
    let stores = match (action, status) {
        (Action::Extend { .. }, S::Held) => {
            cx.t.set_reservation(id, S::Held, Some(cx.now.saturating_add(extend_ms)), cx.now);
            let stores: BTreeMap<StoreId, StoreIx> =
                cx.t.allocations_of(id)
                    .map(|a| &cx.t.allocations[a])
                    .filter(|a| a.status.is_open())
                    .map(|a| (a.store.clone(), cx.t.store_ix[&a.store]))
                    .collect();
            for st in stores.values() {
                cx.t.bump_holds(*st);
            }
            stores.into_keys().collect()
        }
        (Action::Extend { .. }, S::Committed) => Vec::new(), // paid leases do not lapse
        (Action::Commit, S::Held) => transition(cx, id, S::Committed),
        (Action::Commit, S::Committed | S::Fulfilled) => Vec::new(),
        (Action::Release, S::Held | S::Committed) => transition(cx, id, S::Released),
        (Action::Release, S::Released) => Vec::new(),
        (a, s) => {
            return Err(Refusal::InvalidState(format!("reservation {id} is {s}; it cannot be {}", a.done())));
        }
    };
    let view = build(cx.t, &cx.t.reservations[&id]);
    if let Some(key) = key {
        cx.t.put_action_request(ActionRequest { key, fingerprint, response: view.clone() });
    }
    Ok(Written { created: true, view, stores })
}

/// Expires held reservations whose lease ended, earliest first, at most the configured batch.
pub(crate) fn expire_due(cx: &mut Ctx<'_>) -> Expired {
    let now = cx.now;
    let due: Vec<Uuid> =
        cx.t.expiry.iter().take_while(|(at, _)| *at <= now).take(cx.cfg.expire_batch_max).map(|(_, id)| *id).collect();
    let mut stores = BTreeSet::new();
    for id in &due {
        stores.extend(transition(cx, *id, ReservationStatus::Expired));
    }
    let more = cx.t.expiry.first().is_some_and(|(at, _)| *at <= now);
    Expired { expired: due.len(), stores: stores.into_iter().collect(), more }
}

/// Which reservations to list (`GET /v1/reservations`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReservationFilter {
    /// Only this customer's.
    pub customer: Option<String>,
    /// Only in this state.
    pub status: Option<ReservationStatus>,
    /// Only those with (or without) a line marked short.
    pub short: Option<bool>,
    /// Only those listed after this one (the previous page's last id).
    pub after: Option<Uuid>,
    /// Most rows.
    pub limit: usize,
}

impl Decider {
    /// Reservations, newest first (creation time, then id), filtered; a customer's come from
    /// its index, the others from a scan.
    pub fn reservations(&self, f: &ReservationFilter) -> Vec<ReservationView> {
        let newest_first = |r: &Reservation| (std::cmp::Reverse(r.created_at_ms), std::cmp::Reverse(r.id));
        let mut rows: Vec<&Reservation> = match &f.customer {
            Some(c) => {
                self.t.by_customer.get(c).into_iter().flatten().filter_map(|id| self.t.reservations.get(id)).collect()
            }
            None => self.t.reservations.values().collect(),
        };
        rows.retain(|r| f.status.is_none_or(|s| s == r.status));
        rows.sort_by_key(|r| newest_first(r));
        let start = match f.after.and_then(|id| self.t.reservations.get(&id)) {
            Some(after) => rows.partition_point(|r| newest_first(r) <= newest_first(after)),
            None => 0,
        };
        rows.into_iter()
            .skip(start)
            .map(|r| build(&self.t, r))
            .filter(|v| f.short.is_none_or(|s| s == v.short))
            .take(f.limit)
            .collect()
    }

    /// A reservation's current view.
    pub fn reservation(&self, id: Uuid) -> Option<ReservationView> {
        self.t.reservations.get(&id).map(|r| build(&self.t, r))
    }

    /// The open holds of a store, as pushed to its agent: by creation, at most [`HOLDS_MAX`];
    /// unpaid ones with their expiry.
    pub fn holds_snapshot(&self, store: &StoreId) -> HoldsSnapshot {
        let Some(&st) = self.t.store_ix.get(store) else { return HoldsSnapshot { version: 0, holds: Vec::new() } };
        let s = self.t.store(st);
        let holds = s
            .open
            .values()
            .take(HOLDS_MAX)
            .map(|id| {
                let a = &self.t.allocations[id];
                let status = if a.status == AllocationStatus::Held { HoldStatus::Held } else { HoldStatus::Committed };
                let expires_at_ms = match status {
                    HoldStatus::Held => self.t.reservations.get(&a.reservation).and_then(|r| r.expires_at_ms),
                    HoldStatus::Committed => None,
                };
                Hold { id: a.id, reservation: a.reservation, sku: a.sku.clone(), qty: a.qty, status, expires_at_ms }
            })
            .collect();
        HoldsSnapshot { version: s.holds_version, holds }
    }
}
