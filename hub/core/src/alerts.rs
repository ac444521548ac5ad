//! Availability events, edge-triggered stock alerts and the sales-velocity estimate.
//!
//! Every change of a cell's figures emits `availability_changed`; for catalogued SKUs it then
//! moves the cell's alert state, firing `low_stock`, `out_of_stock` or `back_in_stock` once per
//! crossing, never on every change.

use crate::availability::cell_available;
use crate::feed::{FeedData, FeedKind};
use crate::model::{AlertState, SkuIx, StoreIx, Velocity};
use crate::tables::Tables;

/// Emits `availability_changed` for a cell with its current figures, then its alerts.
pub(crate) fn emit_availability(t: &mut Tables, st: StoreIx, sk: SkuIx, now_ms: i64) {
    let (available, rule) = cell_available(t, st, sk);
    let (on_hand, held) = t.cell(st, sk).map_or((0, 0), |c| (c.on_hand, c.held));
    let (store, sku) = (t.store(st).id.clone(), t.sku(sk).sku.clone());
    t.emit(
        FeedKind::AvailabilityChanged,
        now_ms,
        FeedData::Availability { store, sku, on_hand, held, safety_stock: rule.safety_stock, available },
    );
    if rule.catalogued {
        alert(t, st, sk, available, rule.low_stock_threshold, now_ms);
    }
    crate::channels::emit_ats(t, sk, now_ms);
}

/// The alert state `available` puts a cell in.
pub fn alert_state(available: u64, low_stock_threshold: u64) -> AlertState {
    if available == 0 {
        AlertState::Out
    } else if low_stock_threshold > 0 && available <= low_stock_threshold {
        AlertState::Low
    } else {
        AlertState::Ok
    }
}

fn alert(t: &mut Tables, st: StoreIx, sk: SkuIx, available: u64, threshold: u64, now_ms: i64) {
    let state = alert_state(available, threshold);
    let before = t.cell(st, sk).map(|c| c.alert).unwrap_or_default();
    if before == state {
        return;
    }
    t.set_alert(st, sk, state);
    let data = FeedData::Alert {
        store: t.store(st).id.clone(),
        sku: t.sku(sk).sku.clone(),
        available,
        low_stock_threshold: threshold,
    };
    if before == AlertState::Out {
        t.emit(FeedKind::BackInStock, now_ms, data.clone());
    }
    match (before, state) {
        (_, AlertState::Out) => t.emit(FeedKind::OutOfStock, now_ms, data),
        (AlertState::Ok, AlertState::Low) => t.emit(FeedKind::LowStock, now_ms, data),
        _ => {}
    }
}

/// The velocity after `on_hand` moved from `old` to `new` at `now_ms`: the previous score decayed
/// by e^(−Δt/τ) plus the units that went. `None` when nothing went (rises do not count).
pub fn next_velocity(prev: Option<Velocity>, old: i64, new: i64, now_ms: i64, tau_ms: i64) -> Option<Velocity> {
    if new >= old {
        return None;
    }
    let sold = (old as f64) - (new as f64);
    let score = match prev {
        Some(v) => v.score * (-((now_ms - v.updated_at_ms).max(0) as f64) / tau_ms.max(1) as f64).exp() + sold,
        None => sold,
    };
    Some(Velocity { score, updated_at_ms: now_ms })
}

/// Updates a cell's sales-velocity estimate after `on_hand` moved from `old` to `new`.
pub(crate) fn record_velocity(t: &mut Tables, st: StoreIx, sk: SkuIx, old: i64, new: i64, now_ms: i64, tau_ms: i64) {
    let prev = t.cell(st, sk).and_then(|c| c.velocity);
    if let Some(v) = next_velocity(prev, old, new, now_ms, tau_ms) {
        t.set_velocity(st, sk, v);
    }
}
