//! Reconciliation after `on_hand` of a (store, SKU) changed at the hub.
//!
//! - Negative stock: one open `negative_stock` conflict per cell while `on_hand < 0` ("ask the
//!   store to recount"); it resolves itself when stock is back at or above zero.
//! - Oversell (`held > max(on_hand, 0)`): deterministic, newest holds first. Each hold taken is
//!   shrunk (or closed as `moved`); a shipped line is re-sourced to other stores with available
//!   units (the most available first, or whatever there is store by store when that is not
//!   enough), a pickup line (or what nobody can supply) is marked `short` at the oversold store.
//!   Every oversell is a conflict: resolved when re-sourcing covered it all, open otherwise.
//!
//! Afterwards `held ≤ max(on_hand, 0)` holds again for the cell.

use std::collections::{BTreeMap, BTreeSet};

use shelfsync_shared::StoreId;
use uuid::Uuid;

use crate::alerts::emit_availability;
use crate::feed::{FeedData, FeedKind};
use crate::model::{AllocationStatus, Conflict, ConflictKind, ConflictStatus, SkuIx, StoreIx};
use crate::sourcing::{partial, source, Scope, Taken};
use crate::view::build;
use crate::Ctx;

/// Reconciles a cell whose `on_hand` was just refreshed. Returns the stores whose holds changed.
pub(crate) fn reconcile(cx: &mut Ctx<'_>, st: StoreIx, sk: SkuIx) -> Vec<StoreId> {
    let now = cx.now;
    let (store, sku) = (cx.t.store(st).id.clone(), cx.t.sku(sk).sku.clone());
    let cell = cx.t.cell(st, sk).expect("reconciled cells exist");
    let (on_hand, held_now) = (cell.on_hand, cell.held);

    match (on_hand < 0, cx.t.open_conflict(&store, &sku, ConflictKind::NegativeStock)) {
        (true, None) => {
            let c = Conflict {
                id: cx.t.mint(now),
                kind: ConflictKind::NegativeStock,
                store: store.clone(),
                sku: Some(sku.clone()),
                shortfall: on_hand.unsigned_abs(),
                reservations: Vec::new(),
                resolution: "ask the store to recount".into(),
                status: ConflictStatus::Open,
                detected_at_ms: now,
                resolved_at_ms: None,
                details: None,
            };
            cx.t.put_conflict(c.clone());
            cx.t.emit(FeedKind::NegativeStock, now, FeedData::Conflict { conflict: c });
        }
        (false, Some(id)) => {
            cx.t.resolve_conflict(id, "stock is back at or above zero".into(), now);
        }
        _ => {}
    }

    let have = on_hand.max(0) as u64;
    if held_now <= have {
        return Vec::new();
    }
    let shortfall = held_now - have;
    let mut remaining = shortfall;
    // Newest holds first.
    let allocs: Vec<Uuid> = cx.t.cell(st, sk).expect("exists").open.values().rev().copied().collect();
    let mut touched: BTreeSet<Uuid> = BTreeSet::new();
    let mut changed_stores: BTreeMap<StoreId, StoreIx> = BTreeMap::new();
    let mut resourced: Vec<(StoreId, u64)> = Vec::new();
    let mut short_total = 0u64;
    // Re-sourced units are allocated at once (raising `held` there), so sourcing sees them gone:
    // nothing else to subtract.
    let taken = Taken::new();
    for aid in allocs {
        if remaining == 0 {
            break;
        }
        let a = &cx.t.allocations[&aid];
        let (res, line, qty, status) = (a.reservation, a.line, a.qty, a.status);
        let pickup = cx.t.reservations[&res].pickup_store.is_some();
        // A channel's reservation is re-sourced only among the stores that fulfil the channel.
        let among = crate::channels::among_of(cx.t, cx.t.reservations[&res].channel.as_ref());
        touched.insert(res);
        let take_qty = qty.min(remaining);
        remaining -= take_qty;
        // Shrink (or close) the allocation at the oversold store.
        if take_qty == qty {
            cx.t.set_alloc_status(aid, AllocationStatus::Moved, now);
        } else {
            cx.t.shrink_alloc(aid, take_qty, now);
        }
        let mut found = 0u64;
        if !pickup {
            let m = cx.moment();
            let scope = Scope { only: None, exclude: Some(st), among: among.as_ref() };
            let plan = source(cx.t, sk, take_qty, scope, &taken, m)
                // Not enough anywhere: take what there is, the rest is short.
                .unwrap_or_else(|_| partial(cx.t, sk, take_qty, scope, &taken, m));
            for (s, q) in plan {
                cx.t.insert_alloc(res, line, s, sk, q, status, now);
                let name = cx.t.store(s).id.clone();
                changed_stores.insert(name.clone(), s);
                emit_availability(cx.t, s, sk, now);
                resourced.push((name, q));
                found += q;
            }
        }
        if found < take_qty {
            let short = take_qty - found;
            cx.t.insert_alloc(res, line, st, sk, short, AllocationStatus::Short, now);
            short_total += short;
            let view = build(cx.t, &cx.t.reservations[&res]);
            cx.t.emit(
                FeedKind::ReservationShort,
                now,
                FeedData::Short { reservation: view, store: store.clone(), sku: sku.clone(), short },
            );
        }
    }
    changed_stores.insert(store.clone(), st);
    for s in changed_stores.values() {
        cx.t.bump_holds(*s);
    }
    let moved: Vec<String> = resourced.iter().map(|(s, q)| format!("{q} to {s}")).collect();
    let resolution = match (moved.is_empty(), short_total) {
        (false, 0) => format!("re-sourced {}", moved.join(", ")),
        (true, n) => format!("{n} marked short"),
        (false, n) => format!("re-sourced {}; {n} marked short", moved.join(", ")),
    };
    let resolved = short_total == 0;
    // The sales channels whose promises it touched (a channel's reader of the feed sees it).
    let channels: std::collections::BTreeSet<&str> = touched
        .iter()
        .filter_map(|r| cx.t.reservations.get(r))
        .map(|r| r.channel.as_ref().map_or(crate::channels::WEB, |c| c.as_str()))
        .collect();
    let details = Some(serde_json::json!({ "channels": channels }));
    let c = Conflict {
        id: cx.t.mint(now),
        kind: ConflictKind::Oversell,
        store: store.clone(),
        sku: Some(sku),
        shortfall,
        reservations: touched.into_iter().collect(),
        resolution,
        status: if resolved { ConflictStatus::Resolved } else { ConflictStatus::Open },
        detected_at_ms: now,
        resolved_at_ms: resolved.then_some(now),
        details,
    };
    cx.t.put_conflict(c.clone());
    cx.t.emit(FeedKind::OversellDetected, now, FeedData::Conflict { conflict: c.clone() });
    if resolved {
        cx.t.emit(FeedKind::OversellResolved, now, FeedData::Conflict { conflict: c });
    }
    emit_availability(cx.t, st, sk, now);
    changed_stores.into_keys().collect()
}
