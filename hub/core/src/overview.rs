//! The chain at a glance, for the dashboard: per store what it holds, promises and lacks, the
//! reservations by status, open conflicts by kind, and per-minute series of units sold and
//! reserved, all read from the decider's state and the feed it retains.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use shelfsync_shared::{Sku, StoreId};

use crate::availability::{cell_figures, effective};
use crate::feed::{FeedData, FeedKind};
use crate::model::{AlertState, AllocationStatus, ConflictStatus, ReservationStatus};
use crate::Decider;

/// Longest window of the per-minute series.
pub const OVERVIEW_MINUTES_MAX: u32 = 180;

const MINUTE_MS: i64 = 60_000;

/// How far before the window the series look for a cell's previous figures.
const LOOKBACK_MS: i64 = 3_600_000;

/// What [`Decider::overview`] is asked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OverviewQuery {
    /// Minutes of series, the current one last (1 to [`OVERVIEW_MINUTES_MAX`]).
    pub minutes: u32,
    /// Per store, the highest hub counter sequence its agents have acknowledged (the runtime
    /// keeps the watermarks); what the hub wrote for the store beyond it has not reached it.
    pub acked: HashMap<StoreId, u64>,
}

/// One store at a glance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreSummary {
    /// Id.
    pub id: StoreId,
    /// Whether it is revoked.
    pub revoked: bool,
    /// Whether it has a live sync connection (as last told by `SetConnected`).
    pub connected: bool,
    /// Last contact (ms).
    pub last_seen_ms: Option<i64>,
    /// How long it has been silent (0 while connected).
    pub silent_ms: i64,
    /// SKUs it has a counter of.
    pub skus: u64,
    /// Σ on_hand over its SKUs (the hub's view).
    pub on_hand: i64,
    /// Units promised to open reservations here.
    pub held: u64,
    /// What the storefront may promise here now (after any staleness discount).
    pub available: u64,
    /// Units the hub assumes a silent store sold unseen (Σ staleness discount).
    pub unseen_sales_estimate: u64,
    /// Catalogued SKUs at or below their low-stock threshold (not out).
    pub low_stock: u64,
    /// Catalogued SKUs with nothing available.
    pub out_of_stock: u64,
    /// Open conflicts about it.
    pub open_conflicts: u64,
    /// Head-office counter changes (restocks, transfers) the store has not acknowledged yet.
    pub unsynced_hub_changes: u64,
}

/// Reservations by status, and units they promise.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservationCounts {
    /// Reserved, unpaid.
    pub held: u64,
    /// Paid, waiting to be picked.
    pub committed: u64,
    /// Picked.
    pub fulfilled: u64,
    /// Cancelled.
    pub released: u64,
    /// Lapsed.
    pub expired: u64,
    /// Reservations (any status) with units no store could supply after an oversell.
    pub short: u64,
    /// Units promised by open allocations.
    pub units_held: u64,
    /// Units marked short.
    pub units_short: u64,
}

/// Per-minute series, oldest minute first.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Series {
    /// Start of the first minute (ms, a whole minute).
    pub start_ms: i64,
    /// Length of a bucket (ms).
    pub bucket_ms: i64,
    /// Buckets per series.
    pub buckets: u32,
    /// Per store, units its on_hand went down by (POS sales, picks, transfers out) per minute.
    pub sold: BTreeMap<StoreId, Vec<u64>>,
    /// Per store, units reserved online per minute (where the new reservations were sourced).
    pub reserved: BTreeMap<StoreId, Vec<u64>>,
    /// Whether the series start before the oldest feed event the decider keeps in memory (the
    /// first minutes may then be incomplete).
    pub truncated: bool,
}

/// The chain at a glance.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Overview {
    /// The newest change cursor: `GET /v1/events?after=` this shows what happens from now.
    pub feed_head: u64,
    /// SKUs with a counter at some store.
    pub skus: u64,
    /// Every registered store, by id.
    pub stores: Vec<StoreSummary>,
    /// Reservations by status.
    pub reservations: ReservationCounts,
    /// The same per sales channel (`web` for reservations from before channels).
    pub channels: BTreeMap<String, ReservationCounts>,
    /// Open conflicts by kind.
    pub open_conflicts: BTreeMap<String, u64>,
    /// Cells (store, catalogued SKU) at or below their low-stock threshold, not counting revoked stores.
    pub low_stock: u64,
    /// Cells with nothing available, not counting revoked stores.
    pub out_of_stock: u64,
    /// Units sold and reserved per minute.
    pub series: Series,
}

impl Decider {
    /// The chain at a glance as of `now_ms` (see [`Overview`]).
    pub fn overview(&self, q: &OverviewQuery, now_ms: i64) -> Overview {
        let t = &self.t;
        let mut stores: Vec<StoreSummary> = t
            .stores
            .iter()
            .map(|s| {
                let acked = q.acked.get(&s.id).copied().unwrap_or(0);
                let unsynced = s
                    .entries_by_seq
                    .range(acked.saturating_add(1)..)
                    .filter(|(_, (_, w))| t.writer(*w).is_hub())
                    .count() as u64;
                let connected = self.connected.contains(&s.id);
                StoreSummary {
                    id: s.id.clone(),
                    revoked: s.revoked_at_ms.is_some(),
                    connected,
                    last_seen_ms: s.last_seen_ms,
                    silent_ms: if connected { 0 } else { s.last_seen_ms.map_or(0, |at| (now_ms - at).max(0)) },
                    skus: 0,
                    on_hand: 0,
                    held: 0,
                    available: 0,
                    unseen_sales_estimate: 0,
                    low_stock: 0,
                    out_of_stock: 0,
                    open_conflicts: 0,
                    unsynced_hub_changes: unsynced,
                }
            })
            .collect();
        let (mut low, mut out) = (0, 0);
        for (&(st, sk), cell) in &t.cells {
            let sum = &mut stores[st.0 as usize];
            sum.skus += 1;
            sum.on_hand = sum.on_hand.saturating_add(cell.on_hand);
            sum.held += cell.held;
            if sum.revoked {
                continue;
            }
            let f = cell_figures(t, st, sk, now_ms, &self.connected, self.config.staleness);
            sum.available += f.available;
            sum.unseen_sales_estimate += f.staleness_discount;
            if effective(t, &sum.id, sk).catalogued {
                match cell.alert {
                    AlertState::Low => {
                        sum.low_stock += 1;
                        low += 1;
                    }
                    AlertState::Out => {
                        sum.out_of_stock += 1;
                        out += 1;
                    }
                    AlertState::Ok => {}
                }
            }
        }
        let mut open_conflicts = BTreeMap::new();
        for c in t.conflicts.values().filter(|c| c.status == ConflictStatus::Open) {
            *open_conflicts.entry(c.kind.as_str().to_owned()).or_insert(0) += 1;
            if let Some(&ix) = t.store_ix.get(&c.store) {
                stores[ix.0 as usize].open_conflicts += 1;
            }
        }
        let mut reservations = ReservationCounts::default();
        let mut channels: BTreeMap<String, ReservationCounts> = BTreeMap::new();
        let channel_of =
            |r: &crate::model::Reservation| r.channel.as_ref().map_or(crate::channels::WEB, |c| c.as_str()).to_owned();
        for r in t.reservations.values() {
            let per = channels.entry(channel_of(r)).or_default();
            for counts in [&mut reservations, per] {
                let slot = match r.status {
                    ReservationStatus::Held => &mut counts.held,
                    ReservationStatus::Committed => &mut counts.committed,
                    ReservationStatus::Fulfilled => &mut counts.fulfilled,
                    ReservationStatus::Released => &mut counts.released,
                    ReservationStatus::Expired => &mut counts.expired,
                };
                *slot += 1;
            }
        }
        let mut short = std::collections::HashSet::new();
        for a in t.allocations.values() {
            let per = t.reservations.get(&a.reservation).map(channel_of).and_then(|c| channels.get_mut(&c));
            let mut both: Vec<&mut ReservationCounts> = std::iter::once(&mut reservations).chain(per).collect();
            for counts in both.iter_mut() {
                if a.status.is_open() {
                    counts.units_held += a.qty;
                }
                if a.status == AllocationStatus::Short {
                    counts.units_short += a.qty;
                }
            }
            if a.status == AllocationStatus::Short && short.insert(a.reservation) {
                if let Some(c) = t.reservations.get(&a.reservation).map(channel_of).and_then(|c| channels.get_mut(&c)) {
                    c.short += 1;
                }
            }
        }
        reservations.short = short.len() as u64;
        stores.sort_by(|a, b| a.id.cmp(&b.id));
        let ids: Vec<StoreId> = stores.iter().map(|s| s.id.clone()).collect();
        Overview {
            feed_head: t.feed_head,
            skus: t.skus.iter().filter(|s| !s.stores.is_empty()).count() as u64,
            stores,
            reservations,
            channels,
            open_conflicts,
            low_stock: low,
            out_of_stock: out,
            series: self.series(&ids, q.minutes.clamp(1, OVERVIEW_MINUTES_MAX), now_ms),
        }
    }

    /// Per-minute units sold and reserved, from the feed the decider retains. A sale is a fall of
    /// a cell's `on_hand` between two of its `availability_changed` events (or from 0 when the
    /// feed is complete from its first event).
    fn series(&self, stores: &[StoreId], buckets: u32, now_ms: i64) -> Series {
        let start_ms = (now_ms.div_euclid(MINUTE_MS) - i64::from(buckets) + 1) * MINUTE_MS;
        let zero = || vec![0u64; buckets as usize];
        let mut sold: BTreeMap<StoreId, Vec<u64>> = stores.iter().map(|s| (s.clone(), zero())).collect();
        let mut reserved = sold.clone();
        let bucket = |at_ms: i64| -> Option<usize> {
            let b = (at_ms - start_ms).div_euclid(MINUTE_MS);
            (0..i64::from(buckets)).contains(&b).then_some(b as usize)
        };
        let feed = &self.t.feed;
        let complete = feed.front().is_none_or(|e| e.cursor == 1);
        let truncated = !complete && feed.front().is_some_and(|e| e.at_ms > start_ms);
        // Walk from the newest event back: an event's fall is its on_hand below the one before it
        // of the same cell, so each cell waits for its previous event. Stop once every cell seen in
        // the window has found its previous event, or the retained feed ends.
        let mut waiting: HashMap<(&StoreId, &Sku), (i64, usize)> = HashMap::new();
        let mut walked_all = true;
        for e in feed.iter().rev() {
            let in_window = bucket(e.at_ms);
            if e.at_ms < start_ms && (waiting.is_empty() || e.at_ms < start_ms - LOOKBACK_MS) {
                // A cell quiet for longer than the look-back before the window: its first fall in
                // the window is not counted (this read runs on the decider thread; keep it short).
                walked_all = false;
                break;
            }
            match (&e.kind, &e.data) {
                (FeedKind::AvailabilityChanged, FeedData::Availability { store, sku, on_hand, .. }) => {
                    let key = (store, sku);
                    if let Some((later_on_hand, b)) = waiting.remove(&key) {
                        if later_on_hand < *on_hand {
                            if let Some(v) = sold.get_mut(store) {
                                v[b] += (*on_hand - later_on_hand) as u64;
                            }
                        }
                    }
                    if let Some(b) = in_window {
                        waiting.insert(key, (*on_hand, b));
                    }
                }
                (FeedKind::ReservationHeld, FeedData::Reservation { reservation }) => {
                    if let Some(b) = in_window {
                        for a in &reservation.allocations {
                            if let Some(v) = reserved.get_mut(&a.store) {
                                v[b] += a.qty;
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        // Cells whose first event lies in the window: from 0 when the feed is complete.
        if complete && walked_all {
            for ((store, _), (on_hand, b)) in waiting {
                if on_hand < 0 {
                    if let Some(v) = sold.get_mut(store) {
                        v[b] += on_hand.unsigned_abs();
                    }
                }
            }
        }
        Series { start_ms, bucket_ms: MINUTE_MS, buckets, sold, reserved, truncated }
    }
}
