//! The figures: what a store has, what is promised, what the catalog keeps back, and what the
//! storefront may still promise. `available`, `sellable` and the staleness discount are written
//! here once; the feed, sourcing, reconciliation and queries all call these.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use shelfsync_shared::{Sku, StockFigures, StoreId};

use crate::model::{SkuIx, StoreIx};
use crate::tables::Tables;
use crate::Decider;

/// How silent stores are discounted online.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Staleness {
    /// Whether to discount at all.
    pub enabled: bool,
    /// Silence shorter than this costs nothing.
    pub grace_ms: i64,
    /// Time constant of the sales velocity estimate (units sold decay with e^(−t/τ)).
    pub tau_ms: i64,
}

impl Default for Staleness {
    fn default() -> Self {
        Staleness { enabled: true, grace_ms: 60_000, tau_ms: 3_600_000 }
    }
}

/// One store's figures for one SKU.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreFigures {
    /// Where.
    pub store: StoreId,
    /// Physical units (hub's view).
    pub on_hand: i64,
    /// Units promised to open online reservations here.
    pub held: u64,
    /// Units on their way here from other stores (transfers in transit); never part of
    /// `available`.
    pub incoming: u64,
    /// Units never offered online.
    pub safety_stock: u64,
    /// `max(0, on_hand − held − safety_stock)` (0 for an inactive SKU).
    pub raw_available: u64,
    /// Buffer for a silent store: recent sales velocity × silence.
    pub staleness_discount: u64,
    /// Units the store granted online (escrow rights: granted − returned − consumed), whether
    /// or not escrow is on.
    pub granted: u64,
    /// What the storefront may promise: `raw_available − staleness_discount`, never below 0;
    /// in escrow mode also at most `granted − held`.
    pub available: u64,
    /// Last contact (ms).
    pub last_seen_ms: Option<i64>,
    /// How long the store has been silent (0 while connected).
    pub silent_ms: i64,
}

/// The catalog values in force for one (store, SKU).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Effective {
    /// Store override, else catalog, else 0.
    pub safety_stock: u64,
    /// Store override, else catalog, else 0.
    pub low_stock_threshold: u64,
    /// Catalog's flag; an uncatalogued SKU counts as active.
    pub active: bool,
    /// Whether the catalog lists the SKU (alerts fire only for catalogued SKUs).
    pub catalogued: bool,
    /// Escrow values: the store's override, else the catalog's (the chain's policy under both).
    pub escrow: shelfsync_shared::EscrowRule,
}

pub(crate) fn effective(t: &Tables, store: &StoreId, sk: SkuIx) -> Effective {
    let rule = t.sku(sk).rule;
    let o = t.overrides_of(store, &t.sku(sk).sku).copied().unwrap_or_default();
    Effective {
        safety_stock: o.safety_stock.or(rule.map(|r| r.safety_stock)).unwrap_or(0),
        low_stock_threshold: o.low_stock_threshold.or(rule.map(|r| r.low_stock_threshold)).unwrap_or(0),
        active: rule.is_none_or(|r| r.active),
        catalogued: rule.is_some(),
        escrow: o.escrow.or(&rule.map(|r| r.escrow).unwrap_or_default()),
    }
}

/// What the storefront may still promise: `max(0, on_hand − held − safety_stock)`, nothing of an
/// inactive SKU.
pub fn available(on_hand: i64, held: u64, safety_stock: u64, active: bool) -> u64 {
    if active {
        StockFigures { on_hand, held, safety_stock }.available()
    } else {
        0
    }
}

/// In escrow mode, what online may promise of a store: `available` within the unreserved
/// rights the store granted (`granted − held`).
pub fn offered(available: u64, granted: i64, held: u64) -> u64 {
    available.min(u64::try_from(granted).unwrap_or(0).saturating_sub(held))
}

/// What a store can sell without touching an online promise: `on_hand − held`.
pub fn sellable(on_hand: i64, held: u64) -> i64 {
    StockFigures { on_hand, held, safety_stock: 0 }.sellable()
}

/// How sure the staleness discount is to cover what a silent store sold: the share of silences
/// in which sales at the store's recent rate stay within it. The chain simulator (`chain-sim`)
/// measured 1.45 broken promises per 10 000 orders at 0.99 and 0.36 at 0.999, serving 99.9 % of
/// what an omniscient allocator serves (README, "Oversell safety").
pub const DISCOUNT_CONFIDENCE: f64 = 0.999;

/// Units a silent store may have sold since it went dark: at its recent rate over the silence
/// beyond the grace period, sales are Poisson with mean `rate × silence`; the discount is the
/// [`DISCOUNT_CONFIDENCE`] quantile of that (the mean alone, rounded up, under-covers whenever a
/// store sells faster than average — about half the time), never more than `raw`.
pub fn staleness_discount(st: Staleness, velocity_score: f64, silent_ms: i64, raw: u64) -> u64 {
    if !st.enabled || silent_ms <= st.grace_ms {
        return 0;
    }
    let rate_per_ms = velocity_score / st.tau_ms.max(1) as f64;
    poisson_quantile(rate_per_ms * (silent_ms - st.grace_ms) as f64, DISCOUNT_CONFIDENCE).min(raw)
}

/// The smallest `k` with `P(X ≤ k) ≥ q` for `X ~ Poisson(mean)` (a normal approximation for
/// large means, where summing the terms would underflow).
pub fn poisson_quantile(mean: f64, q: f64) -> u64 {
    if mean.is_nan() || mean <= 0.0 {
        return 0;
    }
    if mean > 500.0 {
        // The normal quantile's z for the usual confidences (rounded up to the next listed one).
        let z = [(0.9, 1.282), (0.95, 1.645), (0.99, 2.326), (0.999, 3.090)]
            .iter()
            .find(|(c, _)| q <= *c)
            .map_or(3.719, |(_, z)| *z);
        return (mean + z * mean.sqrt() + 0.5).ceil() as u64;
    }
    let (mut k, mut term) = (0u64, (-mean).exp());
    let mut cdf = term;
    while cdf < q && k < 10_000 {
        k += 1;
        term *= mean / k as f64;
        cdf += term;
    }
    k
}

/// `available` of a cell as the feed reports it (no staleness discount), with the rule used.
pub(crate) fn cell_available(t: &Tables, st: StoreIx, sk: SkuIx) -> (u64, Effective) {
    let rule = effective(t, &t.store(st).id, sk);
    let Some(c) = t.cell(st, sk) else { return (0, rule) };
    let a = available(c.on_hand, c.held, rule.safety_stock, rule.active);
    (if t.escrow { offered(a, c.rights.online(), c.held) } else { a }, rule)
}

/// Figures of one cell for the storefront, as of `now_ms`.
pub(crate) fn cell_figures(
    t: &Tables,
    st: StoreIx,
    sk: SkuIx,
    now_ms: i64,
    connected: &HashSet<StoreId>,
    staleness: Staleness,
) -> StoreFigures {
    let store = t.store(st);
    // A store may have units of a SKU on their way before it has a counter of it.
    let empty = crate::model::Cell::default();
    let cell = t.cell(st, sk).unwrap_or(&empty);
    let rule = effective(t, &store.id, sk);
    let raw = available(cell.on_hand, cell.held, rule.safety_stock, rule.active);
    let silent_ms =
        if connected.contains(&store.id) { 0 } else { store.last_seen_ms.map_or(0, |at| (now_ms - at).max(0)) };
    let score = cell.velocity.map_or(0.0, |v| v.score);
    let discount = staleness_discount(staleness, score, silent_ms, raw);
    let granted = cell.rights.online();
    let offer = if t.escrow { offered(raw - discount, granted, cell.held) } else { raw - discount };
    StoreFigures {
        store: store.id.clone(),
        on_hand: cell.on_hand,
        held: cell.held,
        incoming: t.incoming.get(&sk).and_then(|m| m.get(&st)).copied().unwrap_or(0),
        safety_stock: rule.safety_stock,
        raw_available: raw,
        staleness_discount: discount,
        granted: u64::try_from(granted).unwrap_or(0),
        available: offer,
        last_seen_ms: store.last_seen_ms,
        silent_ms,
    }
}

/// Stores (not revoked) with a cell of `sk`, in store-id order.
pub(crate) fn live_stores_of(t: &Tables, sk: SkuIx) -> impl Iterator<Item = StoreIx> + '_ {
    t.sku(sk).stores.iter().copied().filter(|st| t.store(*st).revoked_at_ms.is_none())
}

impl Decider {
    /// Figures of `sku` at every store (not revoked) that has a counter for it or units of it
    /// on their way, by store id. `connected` are the stores with a live sync connection (they
    /// are not silent).
    pub fn figures(&self, sku: &Sku, now_ms: i64, connected: &HashSet<StoreId>) -> Vec<StoreFigures> {
        let Some(&sk) = self.t.sku_ix.get(sku) else { return Vec::new() };
        let mut stores: Vec<StoreIx> = live_stores_of(&self.t, sk).collect();
        let incoming_only = self
            .t
            .incoming
            .get(&sk)
            .into_iter()
            .flat_map(|m| m.keys().copied())
            .filter(|st| self.t.cell(*st, sk).is_none() && self.t.store(*st).revoked_at_ms.is_none());
        let before = stores.len();
        stores.extend(incoming_only);
        if stores.len() > before {
            stores.sort_by(|a, b| self.t.store(*a).id.cmp(&self.t.store(*b).id));
        }
        stores.into_iter().map(|st| cell_figures(&self.t, st, sk, now_ms, connected, self.config.staleness)).collect()
    }

    /// Whether the hub knows `sku`: it is in the catalog (active or not) or some store ever had
    /// a counter of it. An unknown SKU is a typo or a product of another system; reads say so.
    pub fn knows_sku(&self, sku: &Sku) -> bool {
        self.t.sku_ix.get(sku).is_some_and(|&sk| {
            let info = self.t.sku(sk);
            info.rule.is_some() || !info.stores.is_empty()
        })
    }

    /// The hub's `on_hand` of a SKU at a store (0 when it has no counter).
    pub fn on_hand(&self, store: &StoreId, sku: &Sku) -> i64 {
        self.t.cell_by_name(store, sku).map_or(0, |c| c.on_hand)
    }

    /// Units of a SKU promised to open reservations at a store.
    pub fn held(&self, store: &StoreId, sku: &Sku) -> u64 {
        self.t.cell_by_name(store, sku).map_or(0, |c| c.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poisson_quantiles() {
        assert_eq!(poisson_quantile(0.0, 0.999), 0);
        assert_eq!(poisson_quantile(0.0005, 0.999), 0, "P(X = 0) covers 99.95 %");
        assert_eq!(poisson_quantile(0.1, 0.99), 1);
        assert_eq!(poisson_quantile(5.0, 0.99), 11);
        assert_eq!(poisson_quantile(5.0, 0.999), 13);
        assert_eq!(poisson_quantile(100.0, 0.999), 132);
        let big = poisson_quantile(1000.0, 0.999);
        assert!((1097..=1100).contains(&big), "{big}");
        assert_eq!(poisson_quantile(f64::NAN, 0.999), 0);
    }
}
