//! Sourcing: which stores supply a quantity of a SKU. The most available first (as the
//! storefront is offered, staleness discount included), ties by store id, splitting across stores
//! when one has too few. Units already chosen earlier in the same command (`taken`) are not
//! offered twice.

use std::collections::{BTreeSet, HashMap, HashSet};

use shelfsync_shared::StoreId;

use crate::availability::{cell_figures, live_stores_of, Staleness};
use crate::model::{SkuIx, StoreIx};
use crate::tables::Tables;

/// Units chosen earlier in this command, per cell.
pub(crate) type Taken = HashMap<(StoreIx, SkuIx), u64>;

/// What sourcing sees of the moment: the time and who is connected.
#[derive(Clone, Copy)]
pub(crate) struct Moment<'a> {
    pub now_ms: i64,
    pub connected: &'a HashSet<StoreId>,
    pub staleness: Staleness,
}

/// Which stores may supply: every store, or a sales channel's list.
pub(crate) type Among<'a> = Option<&'a BTreeSet<StoreId>>;

/// Available units per store (not revoked, with a cell, among `among`), in store-id order, after
/// `taken`.
fn offers(t: &Tables, sk: SkuIx, taken: &Taken, m: Moment<'_>, among: Among<'_>) -> Vec<(StoreIx, u64)> {
    live_stores_of(t, sk)
        .filter(|st| among.is_none_or(|a| a.contains(&t.store(*st).id)))
        .map(|st| {
            let f = cell_figures(t, st, sk, m.now_ms, m.connected, m.staleness);
            (st, f.available.saturating_sub(taken.get(&(st, sk)).copied().unwrap_or(0)))
        })
        .collect()
}

/// Which stores a plan may use: `only` one, all but `exclude`, among a sales channel's.
#[derive(Clone, Copy, Default)]
pub(crate) struct Scope<'a> {
    pub only: Option<StoreIx>,
    pub exclude: Option<StoreIx>,
    pub among: Among<'a>,
}

/// A plan for `qty` of `sk` within `scope`. `Err(total)` is what could be promised when that is
/// less than `qty`.
pub(crate) fn source(
    t: &Tables,
    sk: SkuIx,
    qty: u64,
    scope: Scope<'_>,
    taken: &Taken,
    m: Moment<'_>,
) -> Result<Vec<(StoreIx, u64)>, u64> {
    let Scope { only, exclude, among } = scope;
    let mut cands: Vec<(StoreIx, u64)> = offers(t, sk, taken, m, among)
        .into_iter()
        .filter(|(st, a)| only.is_none_or(|o| o == *st) && exclude != Some(*st) && *a > 0)
        .collect();
    // Already in store-id order: a stable sort by available keeps ties by id.
    cands.sort_by_key(|c| std::cmp::Reverse(c.1));
    let total = cands.iter().fold(0u64, |acc, c| acc.saturating_add(c.1));
    if total < qty {
        return Err(total);
    }
    let mut need = qty;
    let mut plan = Vec::new();
    for (st, avail) in cands {
        if need == 0 {
            break;
        }
        let take = avail.min(need);
        plan.push((st, take));
        need -= take;
    }
    Ok(plan)
}

/// When no plan covers `qty`: whatever there is within `scope`, store by store in id order (not
/// most available first). Reconciliation re-sources what it can with it, a lagged channel's order
/// takes what its stores have.
pub(crate) fn partial(
    t: &Tables,
    sk: SkuIx,
    qty: u64,
    scope: Scope<'_>,
    taken: &Taken,
    m: Moment<'_>,
) -> Vec<(StoreIx, u64)> {
    let Scope { only, exclude, among } = scope;
    let mut need = qty;
    let mut plan = Vec::new();
    for (st, avail) in offers(t, sk, taken, m, among) {
        if only.is_some_and(|o| o != st) || Some(st) == exclude || need == 0 {
            continue;
        }
        let a = avail.min(need);
        if a > 0 {
            plan.push((st, a));
            need -= a;
        }
    }
    plan
}

/// Records a plan's units as taken.
pub(crate) fn take(taken: &mut Taken, sk: SkuIx, plan: &[(StoreIx, u64)]) {
    for (st, q) in plan {
        *taken.entry((*st, sk)).or_default() += q;
    }
}
