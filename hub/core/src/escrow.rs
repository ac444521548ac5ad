//! Escrow rights at the hub (`hub/docs/escrow.md`): a store grants online the right to some of
//! its units (`shelfsync_shared::rights`), the hub promises only within them in escrow mode, gives
//! unreserved rights back when the store runs low, and covers an overdraft — a store that sold
//! units it had granted — by giving the rights back at once, opening an `escrow_overdraft`
//! conflict; the oversell reconciliation that follows cuts any hold beyond what is left.

use serde::{Deserialize, Serialize};
use shelfsync_shared::{EscrowPolicy, RightsKind, Sku, StoreId, WriterId};

use crate::command::Refusal;
use crate::feed::{FeedData, FeedKind};
use crate::model::{Conflict, ConflictKind, ConflictStatus, SkuIx, StoreIx};
use crate::Ctx;

/// Escrow at the hub: whether online promises only within granted rights, and the chain's policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Escrow {
    /// Online promises only within the rights stores granted (else as without escrow; rights
    /// are still merged, shown and overdrafts covered).
    pub enabled: bool,
    /// The chain's policy: what stores grant and the hub gives back, unless the catalog (per SKU)
    /// or a store's overrides say otherwise. The hub gives back unreserved rights when a store's
    /// own fall below `keep` or online's lie beyond the target.
    pub policy: EscrowPolicy,
}

/// A rights entry as a store sends it: (SKU, writer, kind, total).
pub type RightsUpdate = (Sku, WriterId, RightsKind, u64);

/// Checks a store's rights entries before anything is written: only the store's own writers'
/// grants and consumptions (the hub's returns are the hub's).
pub(crate) fn plan(store: &StoreId, rights: &[RightsUpdate]) -> Result<(), Refusal> {
    for (sku, writer, kind, _) in rights {
        if *kind == RightsKind::Returned || !kind.authored_by(store, writer) {
            return Err(Refusal::Invalid(format!(
                "rights of {sku}: writer {writer} may not write {} rights of store {store}",
                kind.as_str()
            )));
        }
    }
    Ok(())
}

/// Merges a store's planned rights entries; returns the cells whose rights grew. Grants are told
/// to the feed once the cell is settled (see [`settle`]).
pub(crate) fn merge(cx: &mut Ctx<'_>, st: StoreIx, rights: &[RightsUpdate]) -> Vec<(SkuIx, u64)> {
    let store = cx.t.store(st).id.clone();
    let mut grown: Vec<(SkuIx, u64)> = Vec::new();
    for (sku, writer, kind, total) in rights {
        let sk = cx.t.intern_sku(sku);
        let before = cx.t.cell(st, sk).map_or(0, |c| c.rights.entry(writer, *kind));
        if *total <= before {
            continue;
        }
        cx.t.rights_mut(st, sk).merge_entry(&store, writer, *kind, *total).expect("planned");
        let granted = if *kind == RightsKind::Granted { total - before } else { 0 };
        match grown.iter_mut().find(|(s, _)| *s == sk) {
            Some(g) => g.1 += granted,
            None => grown.push((sk, granted)),
        }
    }
    grown
}

fn emit_rights(cx: &mut Ctx<'_>, kind: FeedKind, st: StoreIx, sk: SkuIx, qty: u64) {
    let cell = cx.t.cell(st, sk).expect("settled cells exist");
    let data = FeedData::Rights {
        store: cx.t.store(st).id.clone(),
        sku: cx.t.sku(sk).sku.clone(),
        qty,
        granted: u64::try_from(cell.rights.online()).unwrap_or(0),
        held: cell.held,
        on_hand: cell.on_hand,
    };
    cx.t.emit(kind, cx.now, data);
}

/// After a cell's `on_hand` or rights changed (before the oversell reconciliation): covers an
/// overdraft (online holds more rights than the store has units) by giving the difference back —
/// with an `escrow_overdraft` conflict when the store's own sale caused it (`by_store`), silently
/// when a hub change did (a transfer out of the store is the hub's own decision) — then, in escrow
/// mode, gives unreserved rights back when the store's own fell below the policy's `keep`, and
/// with escrow off (turned off since the store granted) gives every unreserved right back.
/// `granted`: units the store granted in this change (told to the feed). Returns whether the hub
/// gave rights back: the store's holds version moved, so its agents hear of it with its holds.
pub(crate) fn settle(cx: &mut Ctx<'_>, st: StoreIx, sk: SkuIx, granted: u64, by_store: bool) -> bool {
    if granted > 0 {
        emit_rights(cx, FeedKind::RightsGranted, st, sk, granted);
    }
    let Some(cell) = cx.t.cell(st, sk) else { return false };
    if cell.rights.entries().next().is_none() {
        return false;
    }
    let mut gave = false;
    let (on_hand, held) = (cell.on_hand, cell.held);
    let (store, hub) = (cx.t.store(st).id.clone(), cx.t.hub_writer.clone());
    let over = cell.rights.excess(on_hand);
    if over > 0 {
        cx.t.rights_mut(st, sk).cover(&store, &hub, on_hand).expect("the hub's writer returns");
        emit_rights(cx, FeedKind::RightsReturned, st, sk, over);
        gave = true;
        if by_store {
            overdraft_conflict(cx, st, sk, over, on_hand);
        }
    }
    {
        let cell = cx.t.cell(st, sk).expect("exists");
        // Without escrow (turned off since the store granted), every unreserved right goes back.
        let q = if cx.t.escrow {
            policy(cx, st, sk).return_wanted(&cell.rights, on_hand, held)
        } else {
            u64::try_from(cell.rights.online()).unwrap_or(0).saturating_sub(held)
        };
        if q > 0 {
            cx.t.rights_mut(st, sk).give_back(&store, &hub, held, q).expect("within the unreserved rights");
            emit_rights(cx, FeedKind::RightsReturned, st, sk, q);
            gave = true;
        }
    }
    if gave {
        cx.t.bump_holds(st);
    }
    gave
}

/// The escrow policy in force at a (store, SKU): the chain's, under the SKU's catalog rule, under
/// the store's override.
pub(crate) fn policy(cx: &Ctx<'_>, st: StoreIx, sk: SkuIx) -> EscrowPolicy {
    let rule = crate::availability::effective(cx.t, &cx.t.store(st).id, sk).escrow;
    rule.over(cx.cfg.escrow.policy)
}

fn overdraft_conflict(cx: &mut Ctx<'_>, st: StoreIx, sk: SkuIx, over: u64, on_hand: i64) {
    let (store, sku, now) = (cx.t.store(st).id.clone(), cx.t.sku(sk).sku.clone(), cx.now);
    let cell = cx.t.cell(st, sk).expect("exists");
    let details = serde_json::json!({
        "rights_broken": over,
        "on_hand": on_hand,
        "held": cell.held,
        "granted": cell.rights.total(RightsKind::Granted),
        "returned": cell.rights.total(RightsKind::Returned),
        "consumed": cell.rights.total(RightsKind::Consumed),
    });
    let conflict = match cx.t.open_conflict(&store, &sku, ConflictKind::EscrowOverdraft) {
        Some(id) => {
            let mut c = cx.t.conflicts[&id].clone();
            c.shortfall += over;
            c.details = Some(details);
            c
        }
        None => Conflict {
            id: cx.t.mint(now),
            kind: ConflictKind::EscrowOverdraft,
            store,
            sku: Some(sku),
            shortfall: over,
            reservations: Vec::new(),
            resolution: "the store sold units it had granted online; the rights went back to it and \
                         holds beyond its stock were cut (see the oversell conflict, if any)"
                .into(),
            status: ConflictStatus::Open,
            detected_at_ms: now,
            resolved_at_ms: None,
            details: Some(details),
        },
    };
    cx.t.put_conflict(conflict.clone());
    cx.t.emit(FeedKind::EscrowOverdraft, now, FeedData::Conflict { conflict });
}

impl crate::Decider {
    /// The escrow rights of a (store, SKU) as the hub has them (empty if none).
    pub fn rights(&self, store: &StoreId, sku: &Sku) -> shelfsync_shared::Rights {
        self.t.cell_by_name(store, sku).map(|c| c.rights.clone()).unwrap_or_default()
    }

    /// A store's cells with escrow rights, in SKU order. Rights only exist where the store has a
    /// counter entry (it grants from its units), so the store's own entry index finds them.
    fn rights_cells(&self, store: &StoreId) -> Vec<(&Sku, &shelfsync_shared::Rights)> {
        let Some(&st) = self.t.store_ix.get(store) else { return Vec::new() };
        let skus: std::collections::BTreeSet<SkuIx> =
            self.t.store(st).entries_by_seq.values().map(|(sk, _)| *sk).collect();
        let mut out: Vec<(&Sku, &shelfsync_shared::Rights)> = skus
            .into_iter()
            .filter_map(|sk| self.t.cell(st, sk).map(|c| (&self.t.sku(sk).sku, &c.rights)))
            .filter(|(_, r)| r.entries().next().is_some())
            .collect();
        out.sort_by(|a, b| a.0.cmp(b.0));
        out
    }

    /// Every SKU of a store with escrow rights, with them, in SKU order (what the store's agent
    /// learns the hub's returns from).
    pub fn store_rights(&self, store: &StoreId) -> Vec<(Sku, shelfsync_shared::Rights)> {
        self.rights_cells(store).into_iter().map(|(sku, r)| (sku.clone(), r.clone())).collect()
    }

    /// Units online holds the rights to at a store, over its SKUs (`/metrics`).
    pub fn granted_at(&self, store: &StoreId) -> u64 {
        self.rights_cells(store).iter().map(|(_, r)| u64::try_from(r.online()).unwrap_or(0)).sum()
    }
}
