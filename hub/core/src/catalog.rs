//! The catalog as the decider needs it: per-SKU rules (safety stock, low-stock threshold,
//! per-customer limit, active) and per-store overrides, materialised by the runtime from the
//! automerge documents; and `unknown_sku` conflicts for what stores sell outside it.

use shelfsync_shared::{Sku, StoreId};

use crate::alerts::emit_availability;
use crate::command::{CatalogApplied, Done, Outcome};
use crate::feed::{FeedData, FeedKind};
use crate::model::{CatalogRule, Conflict, ConflictKind, ConflictStatus, Overrides, SkuIx, StoreIx};
use crate::stores::require;
use crate::Ctx;

/// Stores the changed rules and overrides, resolves `unknown_sku` conflicts of SKUs now
/// catalogued and active, gives back escrow rights the new rules no longer grant online, and
/// announces the figures of every cell whose rules changed.
pub(crate) fn changed(
    cx: &mut Ctx<'_>,
    items: &[(Sku, Option<CatalogRule>)],
    overrides: Option<&(StoreId, Vec<(Sku, Overrides)>)>,
) -> Outcome {
    let now = cx.now;
    for (sku, rule) in items {
        cx.t.set_rule(sku, *rule);
    }
    let (mut resolved, mut holds) = (Vec::new(), Vec::new());
    for (sku, _) in items {
        let sk = cx.t.sku_ix[sku];
        if cx.t.sku(sk).rule.is_some_and(|r| r.active) {
            let mut open: Vec<(StoreId, uuid::Uuid)> =
                cx.t.open_conflicts
                    .iter()
                    .filter(|((_, k, kind), _)| k == sku && *kind == ConflictKind::UnknownSku)
                    .map(|((s, _, _), id)| (s.clone(), *id))
                    .collect();
            open.sort();
            for (_, id) in open {
                cx.t.resolve_conflict(id, "the sku is in the catalog now".into(), now);
                resolved.push(id);
            }
        }
        // Every store with a counter of the SKU, revoked or not, in store-id order.
        for st in cx.t.sku(sk).stores.clone() {
            settle(cx, st, sk, &mut holds);
            emit_availability(cx.t, st, sk, now);
        }
    }
    if let Some((store, rows)) = overrides {
        for (sku, o) in rows {
            cx.t.set_overrides(store, sku, *o);
        }
        if let Some(&st) = cx.t.store_ix.get(store) {
            for (sku, _) in rows {
                if let Some(&sk) = cx.t.sku_ix.get(sku) {
                    if cx.t.cell(st, sk).is_some() {
                        settle(cx, st, sk, &mut holds);
                        emit_availability(cx.t, st, sk, now);
                    }
                }
            }
        }
    }
    Ok(Done::CatalogApplied(CatalogApplied { resolved, holds }))
}

/// A rule changed: the escrow policy of the cell may have (a lower share, a higher `keep`), so
/// the hub gives back what it no longer should hold. Stores whose holds changed go to `holds`.
fn settle(cx: &mut Ctx<'_>, st: StoreIx, sk: SkuIx, holds: &mut Vec<StoreId>) {
    if crate::escrow::settle(cx, st, sk, 0, false) {
        let store = cx.t.store(st).id.clone();
        if !holds.contains(&store) {
            holds.push(store);
        }
    }
}

/// Opens an `unknown_sku` conflict per (store, SKU) while none is open, for SKUs a store flagged
/// that the hub's catalog does not list, or lists as inactive.
pub(crate) fn journal_skus(cx: &mut Ctx<'_>, store: &StoreId, skus: &[Sku]) -> Outcome {
    require(cx.t, store)?;
    let now = cx.now;
    let mut opened = Vec::new();
    for sku in skus {
        let why = match cx.t.sku_ix.get(sku).and_then(|sk| cx.t.sku(*sk).rule) {
            None => "not in the catalog",
            Some(r) if !r.active => "inactive in the catalog",
            Some(_) => continue,
        };
        if cx.t.open_conflict(store, sku, ConflictKind::UnknownSku).is_some() {
            continue;
        }
        let c = Conflict {
            id: cx.t.mint(now),
            kind: ConflictKind::UnknownSku,
            store: store.clone(),
            sku: Some(sku.clone()),
            shortfall: 0,
            reservations: Vec::new(),
            resolution: format!("{why}: add it to the catalog (or reactivate it), or correct the store's records"),
            status: ConflictStatus::Open,
            detected_at_ms: now,
            resolved_at_ms: None,
            details: None,
        };
        opened.push(c.id);
        cx.t.put_conflict(c.clone());
        cx.t.emit(FeedKind::UnknownSku, now, FeedData::Conflict { conflict: c });
    }
    Ok(Done::UnknownSkus(opened))
}
