//! The chain simulator (issue 13, `hub/docs/escrow.md`): a deterministic, seeded, sans-IO model of
//! a retail chain whose hub is the real decider ([`shelfsync_hub_core::Decider`]), with simulated
//! minutes and simulated stores, run once per [`Policy`] against the same demand and measured
//! against an omniscient allocator.
//!
//! **The world** (one per seed, shared by every policy and the omniscient allocator, drawn from
//! RNGs of its own so every run sees identical arrivals):
//! - stores of different sizes, SKUs with a skewed popularity (Zipf-like), a par level per
//!   (store, SKU) from its expected demand over a restock cycle, initial stock between half and all
//!   of par;
//! - walk-in sales at each store as Poisson arrivals on a daily curve (open 08:00–22:00), one unit
//!   each; online orders chain-wide all day on their own curve (one unit, sometimes two, shipped
//!   from a store), and a flash sale: the hottest `flash_skus` SKUs get `flash_factor` × their
//!   online demand for one hour (by default 19:00 on the last day);
//! - darkness: each store alternates lit and dark spells (dark spells exponential around
//!   `dark_mean_min`, clipped to 5 min–8 h; lit spells sized so the long-run dark share is `dark`);
//! - restocks: every `restock_every_days` at 06:00 (staggered by store), each SKU up to par (units
//!   promised online and not yet picked count as gone). The quantity depends on what a policy left
//!   on the shelf; the rule and the times are the same for all.
//!
//! **A store** keeps its own ledger: its writer's PN entry per SKU (sales and picks), the hub
//! writer's entries it has heard of (restocks), the holds it knows and its escrow rights; and the
//! true units on its shelves, kept apart. A lit store syncs every minute: it merges what changed
//! (own entries, picked holds, its rights totals), learns the hub's entries (restocks) and the
//! rights the hub gave back, picks committed holds due (30–120 min after it learnt of them) and, in
//! escrow modes, tops online's rights up with [`EscrowPolicy::grant_wanted`] (picks and grants
//! travel with the next minute's merge). The hub pushes a lit store its holds as soon as they
//! change (as the runtime does); a dark store sends nothing and learns nothing, but keeps selling,
//! and syncs the moment it is back (before anything else happens in that minute).
//!
//! **The omniscient allocator** ([`omniscient_world`]) plays the same arrivals against the true
//! shelves; its served online orders are the yardstick of "of omni".
//!
//! **At the till**: without escrow a store sells while `on_hand − known unpicked holds > 0` in its
//! own ledger (a dark store does not know holds made while it is dark: that is where oversells come
//! from); with escrow only from its own rights (`Rights::own`), else the sale is lost — unless the
//! store ignores its rights (probability `overdraft`) and sells anyway. Nobody sells a unit that is
//! not physically there.
//!
//! **Measured**: promises made and broken (an accepted online order later cut `short`), online
//! orders served against the omniscient allocator's, walk-ins served and lost, conflicts by kind,
//! customer waits, overdraft units, and the ground truth after a final sync with every store lit:
//! the decider's `on_hand` of every (store, SKU) equals the store's ledger and its true units.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use shelfsync_hub_core::{
    Action, AllocationStatus, Buffer, Cap, Channel, ChannelId, Command, Config, ConflictFilter, ConflictKind,
    ConflictStatus, Decider, Done, Escrow, Fulfil, HubChange, HubChangeRequest, Latency, Outcome, QtyLine, Refusal,
    ReservationRequest, ReservationStatus, Staleness,
};
use shelfsync_shared::wire::HoldStatus;
use shelfsync_shared::{EscrowPolicy, Incarnation, NodeId, PnEntry, Rights, RightsKind, Sku, StoreId, WriterId};
use uuid::Uuid;

/// Decider time of minute 0 (2026-01-01 00:00 UTC): `now_ms = BASE_MS + minute × 60 000`.
pub const BASE_MS: i64 = 1_767_225_600_000;
const DAY: u32 = 1440;
/// Walk-ins per hour of the day (stores open 08:00–22:00).
const WALKIN_CURVE: [f64; 24] = [
    0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.6, 0.8, 0.9, 1.1, 1.4, 1.3, 1.0, 0.9, 1.0, 1.3, 1.5, 1.3, 1.0, 0.7, 0.0,
    0.0,
];
/// Online orders per hour of the day (an evening peak, quiet nights).
const ONLINE_CURVE: [f64; 24] = [
    0.5, 0.3, 0.2, 0.2, 0.2, 0.3, 0.5, 0.8, 1.0, 1.1, 1.1, 1.2, 1.3, 1.2, 1.1, 1.1, 1.2, 1.4, 1.6, 1.8, 1.9, 1.8, 1.4,
    0.9,
];
/// Hour of the restock deliveries.
const RESTOCK_HOUR: u32 = 6;
/// Share of online orders for two units.
const TWO_UNIT_ORDERS: f64 = 0.1;
/// Zipf exponent of SKU popularity.
const POPULARITY_SKEW: f64 = 0.8;
/// Dark spells are clipped to this range (minutes).
const DARK_MIN: f64 = 5.0;
const DARK_MAX: f64 = 480.0;
/// Minutes between two `ExpireDue`.
const EXPIRE_EVERY: u32 = 5;

// ---- configuration ----------------------------------------------------------------------------

/// What to simulate.
#[derive(Clone, Debug, PartialEq)]
pub struct SimConfig {
    /// Stores in the chain.
    pub stores: usize,
    /// SKUs in the range (every store carries every SKU).
    pub skus: usize,
    /// Simulated days (from midnight).
    pub days: u32,
    /// Long-run share of stores dark at any time (0 ≤ dark < 1).
    pub dark: f64,
    /// Mean length of a dark spell in minutes (exponential, clipped to 5 min–8 h).
    pub dark_mean_min: f64,
    /// Seed of everything.
    pub seed: u64,
    /// Hot SKUs in the flash sale (at most every SKU).
    pub flash_skus: usize,
    /// Online demand of the flash SKUs during the flash hour, × their usual.
    pub flash_factor: f64,
    /// First minute of the flash hour (`None`: 19:00 on the last day).
    pub flash_start_min: Option<u32>,
    /// Walk-in units per average store and day.
    pub walkins_per_store_day: f64,
    /// Online units per walk-in unit, chain-wide.
    pub online_per_walkin: f64,
    /// Par levels are kept within this range.
    pub par_min: i64,
    /// See `par_min`.
    pub par_max: i64,
    /// Days between two restocks of a store.
    pub restock_every_days: u32,
    /// Escrow: share of on-hand online should be able to promise.
    pub share: f64,
    /// Escrow: units the store always keeps for walk-ins.
    pub keep: u64,
    /// Escrow: most unreserved units online holds per (store, SKU) (`None`: no cap).
    pub max: Option<u64>,
    /// Escrow: probability that a store sells at the till beyond its own rights (the goods are on
    /// the shelf) instead of turning the customer away.
    pub overdraft: f64,
    /// Shortest delay from learning of a committed hold to picking it (minutes).
    pub pick_delay_min: u32,
    /// Longest such delay.
    pub pick_delay_max: u32,
    /// A marketplace selling the same SKUs from every store, its orders as a share of the web's
    /// (0: none). It shows a listing refreshed every `market_refresh_min` from its channel's
    /// available-to-sell and cannot refuse an order it listed (`hub/docs/channels.md`).
    pub market: f64,
    /// Minutes between two refreshes of the marketplace's listing (how stale it may be).
    pub market_refresh_min: u32,
    /// Units of every SKU the marketplace channel may not list (its buffer).
    pub market_buffer: u64,
    /// Whether the marketplace channel is configured as lagged by its refresh (a lag margin) with
    /// its buffer; else it lists everything its stores have.
    pub market_protect: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            stores: 20,
            skus: 200,
            days: 2,
            dark: 0.1,
            dark_mean_min: 90.0,
            seed: 7,
            flash_skus: 3,
            flash_factor: 20.0,
            flash_start_min: None,
            walkins_per_store_day: 300.0,
            online_per_walkin: 0.25,
            par_min: 4,
            par_max: 30,
            restock_every_days: 2,
            share: 0.3,
            keep: 1,
            max: None,
            overdraft: 0.0,
            pick_delay_min: 30,
            pick_delay_max: 120,
            market: 0.0,
            market_refresh_min: 10,
            market_buffer: 1,
            market_protect: true,
        }
    }
}

impl SimConfig {
    /// Checks the values; the error names the command-line flag.
    pub fn validate(&self) -> Result<(), String> {
        let prob = |flag: &str, v: f64, hi_open: bool| {
            let ok = v >= 0.0 && if hi_open { v < 1.0 } else { v <= 1.0 };
            if ok {
                Ok(())
            } else {
                Err(format!("--{flag} must be between 0 and 1{}, got {v}", if hi_open { " (exclusive)" } else { "" }))
            }
        };
        if self.stores == 0 {
            return Err("--stores must be at least 1".into());
        }
        if self.skus == 0 {
            return Err("--skus must be at least 1".into());
        }
        if self.days == 0 || self.days > 365 {
            return Err(format!("--days must be between 1 and 365, got {}", self.days));
        }
        prob("dark", self.dark, true)?;
        prob("share", self.share, false)?;
        prob("overdraft", self.overdraft, false)?;
        if self.dark_mean_min.is_nan() || self.dark_mean_min < 1.0 {
            return Err(format!("--dark-mean must be at least 1 (minutes), got {}", self.dark_mean_min));
        }
        if self.flash_factor.is_nan() || self.flash_factor < 1.0 {
            return Err(format!("--flash-factor must be at least 1, got {}", self.flash_factor));
        }
        if let Some(at) = self.flash_start_min {
            if at >= self.days * DAY {
                return Err(format!("--flash-at must be a minute before the end ({}), got {at}", self.days * DAY));
            }
        }
        if self.walkins_per_store_day.is_nan() || self.walkins_per_store_day < 0.0 {
            return Err(format!("--walkins must not be negative, got {}", self.walkins_per_store_day));
        }
        if self.online_per_walkin.is_nan() || self.online_per_walkin < 0.0 {
            return Err(format!("--online must not be negative, got {}", self.online_per_walkin));
        }
        if self.par_min < 1 || self.par_max < self.par_min || self.par_max > 100_000 {
            return Err(format!(
                "--par-min and --par-max must satisfy 1 <= par-min <= par-max <= 100000, got {} and {}",
                self.par_min, self.par_max
            ));
        }
        if self.market.is_nan() || self.market < 0.0 {
            return Err(format!("--market must not be negative, got {}", self.market));
        }
        if self.market_refresh_min == 0 || self.market_refresh_min > 1440 {
            return Err(format!(
                "--market-refresh must be between 1 and 1440 (minutes), got {}",
                self.market_refresh_min
            ));
        }
        if self.restock_every_days == 0 {
            return Err("--restock-every must be at least 1 (days)".into());
        }
        if self.pick_delay_max < self.pick_delay_min {
            return Err(format!(
                "--pick-max ({}) must not be below --pick-min ({})",
                self.pick_delay_max, self.pick_delay_min
            ));
        }
        Ok(())
    }

    fn policy(&self) -> EscrowPolicy {
        EscrowPolicy { share: self.share, max: self.max, keep: self.keep }
    }

    fn minutes(&self) -> u32 {
        self.days * DAY
    }
}

/// How the chain protects online promises.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Policy {
    /// Online promises whatever the hub last heard a store has.
    Off,
    /// As `Off`, discounting silent stores by their recent sales (`Staleness` on).
    Staleness,
    /// Online promises only within the rights stores granted (escrow on, staleness off).
    Escrow,
    /// Both.
    EscrowStaleness,
}

impl Policy {
    /// Every policy, in table order.
    pub const ALL: [Policy; 4] = [Policy::Off, Policy::Staleness, Policy::Escrow, Policy::EscrowStaleness];

    /// The name on the command line and in the table.
    pub fn name(self) -> &'static str {
        match self {
            Policy::Off => "off",
            Policy::Staleness => "staleness",
            Policy::Escrow => "escrow",
            Policy::EscrowStaleness => "escrow+staleness",
        }
    }

    /// Parses [`Policy::name`].
    pub fn parse(s: &str) -> Option<Policy> {
        Policy::ALL.into_iter().find(|p| p.name() == s)
    }

    /// Whether online promises only within rights (and stores grant).
    pub fn escrow(self) -> bool {
        matches!(self, Policy::Escrow | Policy::EscrowStaleness)
    }

    /// Whether the staleness discount is on.
    pub fn staleness(self) -> bool {
        matches!(self, Policy::Staleness | Policy::EscrowStaleness)
    }
}

// ---- randomness -------------------------------------------------------------------------------

/// splitmix64: a seed means the same run forever, whatever the `rand` crate does.
#[derive(Clone, Debug)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64, stream: u64) -> Rng {
        let mut r = Rng(seed ^ stream.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x6a09_e667_f3bc_c908);
        r.next();
        r
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u32, hi: u32) -> u32 {
        lo + (self.next() % u64::from(hi - lo + 1)) as u32
    }

    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }

    fn exp(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.unit()).ln()
    }

    /// Poisson with mean `lambda` (Knuth's product for small means, a rounded normal beyond).
    fn poisson(&mut self, lambda: f64) -> u32 {
        if lambda <= 0.0 {
            return 0;
        }
        if lambda > 200.0 {
            let (u1, u2) = (1.0 - self.unit(), self.unit());
            let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
            return (lambda + z * lambda.sqrt()).round().max(0.0) as u32;
        }
        let limit = (-lambda).exp();
        let (mut k, mut p) = (0u32, self.unit());
        while p > limit {
            k += 1;
            p *= self.unit();
        }
        k
    }

    /// An index drawn by the cumulative weights `cdf` (last = 1).
    fn pick_cdf(&mut self, cdf: &[f64]) -> usize {
        let u = self.unit();
        cdf.partition_point(|c| *c <= u).min(cdf.len() - 1)
    }
}

// ---- the world --------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum Arrival {
    /// A walk-in customer wants one unit of `sku` at `store`; `u` decides whether the store would
    /// sell beyond its rights (`u < overdraft`).
    WalkIn { store: usize, sku: usize, u: f64 },
    /// An online order, shipped from a store.
    Online { sku: usize, qty: u64 },
    /// A marketplace customer wants `qty` of `sku` (sold if the marketplace lists it).
    Market { sku: usize, qty: u64 },
}

/// Everything a run does not decide: the chain, its stock and every arrival.
#[derive(Clone, Debug)]
pub struct World {
    cfg: SimConfig,
    stores: Vec<StoreId>,
    skus: Vec<Sku>,
    /// Par level per store, SKU.
    par: Vec<Vec<i64>>,
    /// Units at the start per store, SKU.
    initial: Vec<Vec<i64>>,
    /// Arrivals by minute, in arrival order within a minute.
    arrivals: Vec<(u32, Arrival)>,
    /// Per store: minutes at which it goes (lit = true) up or down, in order.
    toggles: Vec<Vec<(u32, bool)>>,
    /// Per store: whether it is lit at minute 0.
    lit_at_start: Vec<bool>,
    /// (minute, store) of each restock, in order.
    restocks: Vec<(u32, usize)>,
    /// The flash SKUs and the flash hour.
    flash: Vec<usize>,
    flash_window: (u32, u32),
}

impl World {
    /// Draws the world of `cfg` (which must be valid).
    pub fn new(cfg: &SimConfig) -> World {
        let minutes = cfg.minutes();
        let mut rng = Rng::new(cfg.seed, 1);
        let stores: Vec<StoreId> = (0..cfg.stores).map(|i| format!("store-{i:03}").parse().expect("id")).collect();
        let skus: Vec<Sku> = (0..cfg.skus).map(|i| format!("SKU-{i:04}").parse().expect("sku")).collect();
        // Popularity: a random rank per SKU, Zipf weights by rank.
        let mut rank: Vec<usize> = (0..cfg.skus).collect();
        for i in (1..rank.len()).rev() {
            let j = (rng.next() % (i as u64 + 1)) as usize;
            rank.swap(i, j);
        }
        let weight: Vec<f64> = rank.iter().map(|r| 1.0 / ((*r + 1) as f64).powf(POPULARITY_SKEW)).collect();
        let total: f64 = weight.iter().sum();
        let pop: Vec<f64> = weight.iter().map(|w| w / total).collect();
        let cdf: Vec<f64> = pop
            .iter()
            .scan(0.0, |acc, p| {
                *acc += p;
                Some(*acc)
            })
            .collect();
        let size: Vec<f64> = (0..cfg.stores).map(|_| rng.uniform(0.6, 1.4)).collect();
        let cycle_days = f64::from(cfg.restock_every_days);
        let mut par = Vec::with_capacity(cfg.stores);
        let mut initial = Vec::with_capacity(cfg.stores);
        for sz in &size {
            let (mut p_row, mut i_row) = (Vec::with_capacity(cfg.skus), Vec::with_capacity(cfg.skus));
            for p in &pop {
                let demand = cfg.walkins_per_store_day * sz * p * (1.0 + cfg.online_per_walkin) * cycle_days;
                let par = ((demand * rng.uniform(0.8, 1.3)).round() as i64).clamp(cfg.par_min, cfg.par_max);
                let start = ((par as f64 * rng.uniform(0.5, 1.0)).round() as i64).clamp(1, par);
                p_row.push(par);
                i_row.push(start);
            }
            par.push(p_row);
            initial.push(i_row);
        }
        let mut by_pop: Vec<usize> = (0..cfg.skus).collect();
        by_pop.sort_by_key(|k| rank[*k]);
        let flash: Vec<usize> = by_pop.into_iter().take(cfg.flash_skus).collect();
        let flash_start = cfg.flash_start_min.unwrap_or((cfg.days - 1) * DAY + 19 * 60);
        let flash_window = (flash_start, (flash_start + 60).min(minutes));

        // Demand.
        let mut rng = Rng::new(cfg.seed, 2);
        let walk_sum: f64 = WALKIN_CURVE.iter().sum::<f64>() * 60.0;
        let online_sum: f64 = ONLINE_CURVE.iter().sum::<f64>() * 60.0;
        let online_orders_day =
            cfg.online_per_walkin * cfg.walkins_per_store_day * size.iter().sum::<f64>() / (1.0 + TWO_UNIT_ORDERS);
        let mut arrivals = Vec::new();
        let mut minute_batch = Vec::new();
        for m in 0..minutes {
            let h = ((m % DAY) / 60) as usize;
            for (s, sz) in size.iter().enumerate() {
                let lambda = cfg.walkins_per_store_day * sz * WALKIN_CURVE[h] / walk_sum;
                for _ in 0..rng.poisson(lambda) {
                    let sku = rng.pick_cdf(&cdf);
                    minute_batch.push(Arrival::WalkIn { store: s, sku, u: rng.unit() });
                }
            }
            let lambda = online_orders_day * ONLINE_CURVE[h] / online_sum;
            for _ in 0..rng.poisson(lambda) {
                let sku = rng.pick_cdf(&cdf);
                let qty = if rng.unit() < TWO_UNIT_ORDERS { 2 } else { 1 };
                minute_batch.push(Arrival::Online { sku, qty });
            }
            if (flash_window.0..flash_window.1).contains(&m) {
                for &f in &flash {
                    let extra = (cfg.flash_factor - 1.0) * online_orders_day * pop[f] * ONLINE_CURVE[h] / online_sum;
                    for _ in 0..rng.poisson(extra) {
                        let qty = if rng.unit() < TWO_UNIT_ORDERS { 2 } else { 1 };
                        minute_batch.push(Arrival::Online { sku: f, qty });
                    }
                }
            }
            for i in (1..minute_batch.len()).rev() {
                let j = (rng.next() % (i as u64 + 1)) as usize;
                minute_batch.swap(i, j);
            }
            arrivals.extend(minute_batch.drain(..).map(|a| (m, a)));
        }

        // The marketplace's demand, from a stream of its own (the other arrivals stay as they are
        // without it), after the minute's other arrivals.
        if cfg.market > 0.0 {
            let mut rng = Rng::new(cfg.seed, 5);
            let mut market = Vec::new();
            for m in 0..minutes {
                let h = ((m % DAY) / 60) as usize;
                let lambda = cfg.market * online_orders_day * ONLINE_CURVE[h] / online_sum;
                for _ in 0..rng.poisson(lambda) {
                    let sku = rng.pick_cdf(&cdf);
                    let qty = if rng.unit() < TWO_UNIT_ORDERS { 2 } else { 1 };
                    market.push((m, Arrival::Market { sku, qty }));
                }
            }
            arrivals.extend(market);
            arrivals.sort_by_key(|(m, _)| *m);
        }

        // Darkness: alternating spells; lit spells sized for the long-run dark share.
        let mut rng = Rng::new(cfg.seed, 3);
        let d = cfg.dark_mean_min;
        let dark_mean = DARK_MIN + d * ((-DARK_MIN / d).exp() - (-DARK_MAX / d).exp());
        let lit_mean = if cfg.dark > 0.0 { dark_mean * (1.0 - cfg.dark) / cfg.dark } else { f64::INFINITY };
        let mut toggles = Vec::with_capacity(cfg.stores);
        let mut lit_at_start = Vec::with_capacity(cfg.stores);
        for _ in 0..cfg.stores {
            let mut lit = cfg.dark == 0.0 || rng.unit() >= cfg.dark;
            lit_at_start.push(lit);
            let mut t = 0.0f64;
            let mut row = Vec::new();
            loop {
                let spell = if lit { rng.exp(lit_mean) } else { rng.exp(d).clamp(DARK_MIN, DARK_MAX) };
                t += spell.max(1.0);
                if !t.is_finite() || t >= f64::from(minutes) {
                    break;
                }
                lit = !lit;
                row.push((t as u32, lit));
            }
            // Two toggles in one minute cancel out.
            let mut clean: Vec<(u32, bool)> = Vec::with_capacity(row.len());
            for (m, l) in row {
                match clean.last() {
                    Some(&(pm, _)) if pm == m => {
                        clean.pop();
                    }
                    _ => clean.push((m, l)),
                }
            }
            toggles.push(clean);
        }

        // Restocks: every `restock_every_days` at 06:00, staggered by store.
        let mut restocks = Vec::new();
        let offsets: Vec<u32> = (0..cfg.stores).map(|_| rng.range(0, cfg.restock_every_days - 1)).collect();
        for day in 0..cfg.days {
            for (s, o) in offsets.iter().enumerate() {
                if (day + o) % cfg.restock_every_days == 0 {
                    restocks.push((day * DAY + RESTOCK_HOUR * 60, s));
                }
            }
        }
        World {
            cfg: cfg.clone(),
            stores,
            skus,
            par,
            initial,
            arrivals,
            toggles,
            lit_at_start,
            restocks,
            flash,
            flash_window,
        }
    }

    /// The configuration it was drawn from.
    pub fn config(&self) -> &SimConfig {
        &self.cfg
    }

    /// Marketplace orders over the run.
    pub fn market_orders(&self) -> u64 {
        self.arrivals.iter().filter(|(_, a)| matches!(a, Arrival::Market { .. })).count() as u64
    }

    /// Online orders over the run.
    pub fn online_orders(&self) -> u64 {
        self.arrivals.iter().filter(|(_, a)| matches!(a, Arrival::Online { .. })).count() as u64
    }

    /// Walk-in customers over the run.
    pub fn walkins(&self) -> u64 {
        self.arrivals.iter().filter(|(_, a)| matches!(a, Arrival::WalkIn { .. })).count() as u64
    }

    /// The flash SKUs and the flash hour's first minute.
    pub fn flash(&self) -> (Vec<Sku>, u32) {
        (self.flash.iter().map(|k| self.skus[*k].clone()).collect(), self.flash_window.0)
    }

    /// Initial units over the chain.
    pub fn initial_units(&self) -> i64 {
        self.initial.iter().flatten().sum()
    }

    /// Whether store `s` is lit at `minute` (after that minute's changes).
    fn lit_at(&self, s: usize, minute: u32) -> bool {
        let done = self.toggles[s].partition_point(|(at, _)| *at <= minute);
        match done {
            0 => self.lit_at_start[s],
            n => self.toggles[s][n - 1].1,
        }
    }
}

// ---- reports ----------------------------------------------------------------------------------

/// What one policy did.
#[derive(Clone, Debug)]
pub struct Report {
    /// The policy.
    pub policy: Policy,
    /// Online orders placed.
    pub online_orders: u64,
    /// Promises made: reservations accepted (and paid at once).
    pub promised: u64,
    /// Orders refused at once (nothing available).
    pub refused: u64,
    /// Promises broken: accepted orders later cut short (some allocation `short`).
    pub broken: u64,
    /// Of which cut short at a store that was dark when the order was placed (the rest: at a lit
    /// store, by a sale the hub had not heard of yet within the minute).
    pub broken_at_dark: u64,
    /// Online orders served: promised − broken.
    pub served: u64,
    /// The omniscient allocator's served online orders, same demand.
    pub omniscient_served: u64,
    /// Walk-in customers.
    pub walkins: u64,
    /// Walk-ins sold a unit.
    pub walkins_served: u64,
    /// Walk-ins turned away (nothing the store could sell them).
    pub walkins_lost: u64,
    /// Oversell conflicts opened.
    pub oversells: u64,
    /// Of which resolved at once by re-sourcing (no promise broken).
    pub oversells_resourced: u64,
    /// `escrow_overdraft` conflicts opened.
    pub overdraft_conflicts: u64,
    /// `negative_stock` conflicts opened.
    pub negative_stock: u64,
    /// Units sold at tills beyond the store's own rights (as the store saw them).
    pub overdraft_units: u64,
    /// Units granted online by the stores.
    pub granted_units: u64,
    /// Units delivered by restocks.
    pub restocked_units: u64,
    /// Units picked for online orders.
    pub picked_units: u64,
    /// Picks put off because the units were not on the shelf (should be 0).
    pub blocked_picks: u64,
    /// Orders fully picked before the end.
    pub fulfilled: u64,
    /// Orders neither fulfilled nor broken at the end (waiting for their store).
    pub open_at_end: u64,
    /// Median wait from order to its last pick, minutes (fulfilled orders).
    pub wait_median_min: Option<u32>,
    /// Worst such wait.
    pub wait_worst_min: Option<u32>,
    /// The ground-truth check after the final sync (`Err`: what differs).
    pub truth: Result<(), String>,
    /// Wall-clock time of the run.
    pub elapsed: Duration,
    /// Marketplace customers.
    pub market_orders: u64,
    /// Marketplace orders it sold (listed) and sent to the hub: promises it made.
    pub market_promised: u64,
    /// Of which some units were never supplied (`short`, at once or later).
    pub market_broken: u64,
    /// `channel_oversell` conflicts (marketplace orders beyond the stores' stock when they came).
    pub market_oversells: u64,
}

impl Report {
    /// Broken marketplace promises per 10 000 it made.
    pub fn market_broken_per_10k(&self) -> f64 {
        if self.market_promised == 0 {
            0.0
        } else {
            self.market_broken as f64 * 10_000.0 / self.market_promised as f64
        }
    }

    /// Broken promises per 10 000 accepted online orders.
    pub fn broken_per_10k(&self) -> f64 {
        if self.promised == 0 {
            0.0
        } else {
            self.broken as f64 * 10_000.0 / self.promised as f64
        }
    }

    /// Served online orders as a share of the omniscient allocator's (1.0 = as many).
    pub fn share_of_omniscient(&self) -> f64 {
        if self.omniscient_served == 0 {
            1.0
        } else {
            self.served as f64 / self.omniscient_served as f64
        }
    }
}

/// What the omniscient allocator did with the same demand.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OmniReport {
    /// Online orders placed.
    pub online_orders: u64,
    /// Served (never broken: it sees every shelf).
    pub served: u64,
    /// Walk-in customers.
    pub walkins: u64,
    /// Walk-ins sold a unit.
    pub walkins_served: u64,
    /// Walk-ins turned away.
    pub walkins_lost: u64,
    /// Units delivered by restocks.
    pub restocked_units: u64,
    /// Marketplace customers.
    pub market_orders: u64,
    /// Of which served (from the true shelves, like online orders).
    pub market_served: u64,
}

// ---- the omniscient allocator -------------------------------------------------------------------

/// The same demand against the true shelves: an online order takes free units first come first
/// served from the store with the most (units leave at once, so a promise never breaks), a walk-in
/// any unit of its store; restocks fill up to par.
pub fn omniscient_world(w: &World) -> OmniReport {
    let mut units = w.initial.clone();
    let mut r = OmniReport::default();
    let mut restocks = w.restocks.iter().peekable();
    let mut arrivals = w.arrivals.iter().peekable();
    for m in 0..w.cfg.minutes() {
        while let Some(&&(_, s)) = restocks.peek().filter(|(at, _)| *at == m) {
            restocks.next();
            for (u, par) in units[s].iter_mut().zip(&w.par[s]) {
                let q = (par - *u).max(0);
                *u += q;
                r.restocked_units += q as u64;
            }
        }
        while let Some(&&(_, a)) = arrivals.peek().filter(|(at, _)| *at == m) {
            arrivals.next();
            match a {
                Arrival::WalkIn { store, sku, .. } => {
                    r.walkins += 1;
                    if units[store][sku] > 0 {
                        units[store][sku] -= 1;
                        r.walkins_served += 1;
                    } else {
                        r.walkins_lost += 1;
                    }
                }
                Arrival::Online { sku, qty } | Arrival::Market { sku, qty } => {
                    let market = matches!(a, Arrival::Market { .. });
                    if market {
                        r.market_orders += 1;
                    } else {
                        r.online_orders += 1;
                    }
                    let total: i64 = units.iter().map(|row| row[sku]).sum();
                    if total < qty as i64 {
                        continue;
                    }
                    let mut need = qty as i64;
                    while need > 0 {
                        // The most free units, ties by store order.
                        let s =
                            (0..units.len()).max_by_key(|s| (units[*s][sku], std::cmp::Reverse(*s))).expect("stores");
                        let take = need.min(units[s][sku]);
                        units[s][sku] -= take;
                        need -= take;
                    }
                    if market {
                        r.market_served += 1;
                    } else {
                        r.served += 1;
                    }
                }
            }
        }
    }
    r
}

/// [`omniscient_world`] of the world of `cfg`.
pub fn omniscient(cfg: &SimConfig) -> OmniReport {
    omniscient_world(&World::new(cfg))
}

// ---- the stores -------------------------------------------------------------------------------

/// A hold as the store knows it.
#[derive(Clone, Copy, Debug)]
struct KnownHold {
    sku: usize,
    qty: u64,
    reservation: Uuid,
    committed: bool,
    /// When the store picks it (minute).
    due: u32,
}

struct Store {
    id: StoreId,
    writer: WriterId,
    lit: bool,
    /// True units on the shelves.
    units: Vec<i64>,
    /// The store's own writer's entries.
    own: Vec<PnEntry>,
    /// The hub writer's entries as the store has heard of them.
    hub: Vec<PnEntry>,
    /// Escrow rights as the store knows them.
    rights: Vec<Rights>,
    /// Hub counter sequence applied.
    applied: u64,
    /// Open holds it knows, less the ones it picked.
    holds: BTreeMap<Uuid, KnownHold>,
    /// Units of those holds per SKU.
    held: Vec<u64>,
    /// Picked, not yet merged.
    fulfilled: Vec<Uuid>,
    picked: HashSet<Uuid>,
    /// SKUs whose own entry changed since the last merge.
    dirty_entries: BTreeSet<usize>,
    /// SKUs whose own rights entries changed since the last merge.
    dirty_rights: BTreeSet<usize>,
    /// SKUs whose grant to online should be looked at again.
    grant_check: BTreeSet<usize>,
    /// Came back from dark: take the holds snapshot after the merge.
    reconnected: bool,
}

impl Store {
    /// `on_hand` in the store's own ledger.
    fn on_hand(&self, k: usize) -> i64 {
        (self.own[k].value() + self.hub[k].value()) as i64
    }
}

/// Tallies of one run.
#[derive(Default)]
struct Tally {
    online_orders: u64,
    promised: u64,
    refused: u64,
    walkins: u64,
    walkins_served: u64,
    walkins_lost: u64,
    overdraft_units: u64,
    granted_units: u64,
    restocked_units: u64,
    picked_units: u64,
    blocked_picks: u64,
    market_orders: u64,
    market_promised: u64,
}

/// The marketplace's channel.
const MARKET: &str = "market";

struct Run<'w> {
    w: &'w World,
    policy: Policy,
    escrow: EscrowPolicy,
    d: Decider,
    minute: u32,
    stores: Vec<Store>,
    store_ix: HashMap<StoreId, usize>,
    sku_ix: HashMap<Sku, usize>,
    /// Pick delays and the like (depends on what the policy does, so not shared).
    rng: Rng,
    next_id: u128,
    /// Accepted orders: (order minute, last pick minute).
    orders: BTreeMap<Uuid, (u32, Option<u32>)>,
    /// Orders the marketplace sold, sent to the hub: order minute.
    market_orders: BTreeMap<Uuid, u32>,
    /// What the marketplace lists per SKU (its last refresh, less what it sold since).
    listing: Vec<u64>,
    t: Tally,
}

fn hub_writer() -> WriterId {
    WriterId::new(NodeId::Hub, Incarnation::from_u64(0xab))
}

impl<'w> Run<'w> {
    fn new(w: &'w World, policy: Policy) -> Run<'w> {
        let cfg = &w.cfg;
        let mut config = Config::new(hub_writer());
        config.staleness = Staleness { enabled: policy.staleness(), ..Staleness::default() };
        config.escrow = Escrow { enabled: policy.escrow(), policy: cfg.policy() };
        config.feed_retain = 1024;
        let n = cfg.skus;
        let stores = w
            .stores
            .iter()
            .enumerate()
            .map(|(s, id)| Store {
                id: id.clone(),
                writer: WriterId::new(NodeId::Store(id.clone()), Incarnation::from_u64(1)),
                lit: true,
                units: w.initial[s].clone(),
                own: w.initial[s].iter().map(|u| PnEntry { p: *u as u64, n: 0 }).collect(),
                hub: vec![PnEntry::default(); n],
                rights: vec![Rights::default(); n],
                applied: 0,
                holds: BTreeMap::new(),
                held: vec![0; n],
                fulfilled: Vec::new(),
                picked: HashSet::new(),
                dirty_entries: (0..n).collect(),
                dirty_rights: BTreeSet::new(),
                grant_check: if policy.escrow() { (0..n).collect() } else { BTreeSet::new() },
                reconnected: false,
            })
            .collect();
        Run {
            w,
            policy,
            escrow: cfg.policy(),
            d: Decider::new(config, u128::from(cfg.seed)),
            minute: 0,
            stores,
            store_ix: w.stores.iter().enumerate().map(|(i, s)| (s.clone(), i)).collect(),
            sku_ix: w.skus.iter().enumerate().map(|(i, s)| (s.clone(), i)).collect(),
            rng: Rng::new(cfg.seed, 4),
            next_id: 1,
            orders: BTreeMap::new(),
            market_orders: BTreeMap::new(),
            listing: vec![0; n],
            t: Tally::default(),
        }
    }

    fn now(&self) -> i64 {
        BASE_MS + i64::from(self.minute) * 60_000
    }

    fn apply(&mut self, cmd: Command) -> Outcome {
        let out = self.d.apply(cmd, self.now());
        // Storage is not simulated: drop the records.
        drop(self.d.take_records());
        out
    }

    fn ok(&mut self, cmd: Command) -> Done {
        let what = format!("{cmd:?}");
        self.apply(cmd).unwrap_or_else(|e| panic!("the decider refused {}: {e}", &what[..what.len().min(300)]))
    }

    fn mint(&mut self) -> Uuid {
        self.next_id += 1;
        Uuid::from_u128(self.next_id)
    }

    // -- the store's side of a sync --

    /// Sends what changed at the store; learns the rights of those SKUs back.
    fn merge(&mut self, si: usize) {
        let skus = &self.w.skus;
        let st = &mut self.stores[si];
        if st.dirty_entries.is_empty() && st.dirty_rights.is_empty() && st.fulfilled.is_empty() {
            return;
        }
        let entries: Vec<(Sku, WriterId, PnEntry)> =
            st.dirty_entries.iter().map(|&k| (skus[k].clone(), st.writer.clone(), st.own[k])).collect();
        let mut rights = Vec::new();
        for &k in &st.dirty_rights {
            for kind in [RightsKind::Granted, RightsKind::Consumed] {
                let total = st.rights[k].entry(&st.writer, kind);
                if total > 0 {
                    rights.push((skus[k].clone(), st.writer.clone(), kind, total));
                }
            }
        }
        let touched: BTreeSet<usize> = st.dirty_entries.union(&st.dirty_rights).copied().collect();
        st.dirty_entries.clear();
        st.dirty_rights.clear();
        let fulfilled = std::mem::take(&mut st.fulfilled);
        let store = st.id.clone();
        let Done::Merged(merged) = self.ok(Command::Merge { store, entries, fulfilled, rights }) else {
            unreachable!("a merge answers Merged")
        };
        // The hub closed the picked holds: the next snapshot no longer lists them.
        self.stores[si].picked.clear();
        if self.policy.escrow() {
            self.learn_rights(si, touched);
        }
        self.push_holds(&merged.holds_changed);
    }

    /// The hub's returns of `skus` at the store, merged into its replica.
    fn learn_rights(&mut self, si: usize, skus: impl IntoIterator<Item = usize>) {
        for k in skus {
            let hub = self.d.rights(&self.stores[si].id, &self.w.skus[k]);
            let st = &mut self.stores[si];
            for (writer, kind, total) in hub.entries().filter(|(_, kind, _)| *kind == RightsKind::Returned) {
                if st.rights[k].merge_entry(&st.id, writer, kind, total).expect("the hub's returns") {
                    st.grant_check.insert(k);
                }
            }
        }
    }

    /// The hub's own entries (restocks) the store has not heard of yet.
    fn learn_entries(&mut self, si: usize) {
        const PAGE: usize = 1000;
        let mut learnt = BTreeSet::new();
        loop {
            let st = &self.stores[si];
            let page = self.d.entries_since(&st.id, st.applied, Some(&st.writer), PAGE);
            let full = page.entries.len() == PAGE;
            let st = &mut self.stores[si];
            for (_, sku, writer, entry) in page.entries {
                assert!(writer.is_hub(), "only the hub writes a store's entries besides its own: {writer}");
                let k = self.sku_ix[&sku];
                st.hub[k] = st.hub[k].join(entry);
                learnt.insert(k);
            }
            st.applied = page.upto;
            if !full {
                break;
            }
        }
        if self.policy.escrow() && !learnt.is_empty() {
            self.stores[si].grant_check.extend(learnt.iter().copied());
            self.learn_rights(si, learnt);
        }
    }

    /// The hub pushes the holds snapshot to each of `stores` that is lit.
    fn push_holds(&mut self, stores: &[StoreId]) {
        for s in stores {
            let si = self.store_ix[s];
            if self.stores[si].lit {
                self.refresh_holds(si);
            }
        }
    }

    fn refresh_holds(&mut self, si: usize) {
        let snap = self.d.holds_snapshot(&self.stores[si].id);
        let (lo, hi) = (self.w.cfg.pick_delay_min, self.w.cfg.pick_delay_max);
        let minute = self.minute;
        let st = &mut self.stores[si];
        let mut next = BTreeMap::new();
        for h in snap.holds {
            if st.picked.contains(&h.id) {
                continue;
            }
            let sku = self.sku_ix[&h.sku];
            let due = match st.holds.get(&h.id) {
                Some(old) => old.due,
                None => minute + self.rng.range(lo, hi),
            };
            let committed = h.status == HoldStatus::Committed;
            next.insert(h.id, KnownHold { sku, qty: h.qty, reservation: h.reservation, committed, due });
        }
        let old = std::mem::replace(&mut st.holds, next);
        for h in old.values() {
            st.held[h.sku] -= h.qty;
            st.grant_check.insert(h.sku);
        }
        for h in st.holds.values() {
            st.held[h.sku] += h.qty;
            st.grant_check.insert(h.sku);
        }
        if !self.policy.escrow() {
            st.grant_check.clear();
        }
    }

    /// Picks the committed holds that are due (and on the shelf).
    fn pick(&mut self, si: usize) {
        let minute = self.minute;
        let escrow = self.policy.escrow();
        let st = &mut self.stores[si];
        let due: Vec<Uuid> =
            st.holds.iter().filter(|(_, h)| h.committed && h.due <= minute).map(|(id, _)| *id).collect();
        for id in due {
            let h = st.holds[&id];
            if st.units[h.sku] < h.qty as i64 {
                self.t.blocked_picks += 1;
                continue;
            }
            st.holds.remove(&id);
            st.held[h.sku] -= h.qty;
            st.units[h.sku] -= h.qty as i64;
            st.own[h.sku].n += h.qty;
            st.dirty_entries.insert(h.sku);
            if escrow {
                st.rights[h.sku].consume(&st.id, &st.writer, h.qty).expect("the store's own writer");
                st.dirty_rights.insert(h.sku);
                st.grant_check.insert(h.sku);
            }
            st.fulfilled.push(id);
            st.picked.insert(id);
            self.t.picked_units += h.qty;
            if let Some(o) = self.orders.get_mut(&h.reservation) {
                o.1 = Some(o.1.map_or(minute, |m| m.max(minute)));
            }
        }
    }

    /// Tops online's rights up (escrow modes).
    fn grant(&mut self, si: usize) {
        let keep = self.escrow.keep;
        let st = &mut self.stores[si];
        for k in std::mem::take(&mut st.grant_check) {
            let on_hand = st.on_hand(k);
            let q = self.escrow.grant_wanted(&st.rights[k], on_hand, st.held[k]);
            if q > 0 {
                st.rights[k].grant(&st.id, &st.writer, on_hand, keep, q).expect("within the store's own rights");
                st.dirty_rights.insert(k);
                self.t.granted_units += q;
            }
        }
    }

    /// One minute's sync of a lit store: send, learn, then pick and grant (sent next minute).
    fn sync(&mut self, si: usize) {
        self.merge(si);
        if std::mem::take(&mut self.stores[si].reconnected) {
            self.refresh_holds(si);
        }
        self.learn_entries(si);
        self.pick(si);
        if self.policy.escrow() {
            self.grant(si);
        }
    }

    // -- events --

    fn set_lit(&mut self, si: usize, lit: bool) {
        let store = self.stores[si].id.clone();
        self.stores[si].lit = lit;
        self.ok(Command::SetConnected { store: store.clone(), connected: lit });
        if lit {
            self.stores[si].reconnected = true;
        } else {
            // The connection closing is the last contact.
            let at_ms = self.now();
            self.ok(Command::StoreSeen { store, at_ms });
        }
    }

    fn walk_in(&mut self, si: usize, k: usize, u: f64) {
        self.t.walkins += 1;
        let escrow = self.policy.escrow();
        let overdraft = self.w.cfg.overdraft;
        let st = &mut self.stores[si];
        let on_hand = st.on_hand(k);
        let allowed = if escrow { st.rights[k].own(on_hand) >= 1 } else { on_hand - st.held[k] as i64 >= 1 };
        let sell = st.units[k] >= 1 && (allowed || (escrow && u < overdraft));
        if !sell {
            self.t.walkins_lost += 1;
            return;
        }
        if escrow && !allowed {
            self.t.overdraft_units += st.rights[k].overdraft(on_hand, 1);
        }
        st.units[k] -= 1;
        st.own[k].n += 1;
        st.dirty_entries.insert(k);
        self.t.walkins_served += 1;
    }

    /// An order of `qty` of SKU `k` through `channel` (`None`: the web), paid at once; `None` when
    /// the hub refused it (nothing available).
    fn order(&mut self, k: usize, qty: u64, channel: Option<ChannelId>) -> Option<Uuid> {
        let id = self.mint();
        let req = ReservationRequest {
            id,
            key: None,
            lines: vec![QtyLine { sku: self.w.skus[k].clone(), qty }],
            ttl_secs: 900,
            pickup_store: None,
            customer: None,
            channel,
        };
        match self.apply(Command::Reserve(req)) {
            Ok(Done::Reserved(_)) => {}
            Err(Refusal::Unavailable { .. }) => return None,
            other => panic!("reserve: {other:?}"),
        }
        let Done::Acted(w) = self.ok(Command::Act { id, action: Action::Commit, key: None }) else {
            unreachable!("an action answers Acted")
        };
        self.push_holds(&w.stores);
        Some(id)
    }

    fn online(&mut self, k: usize, qty: u64) {
        self.t.online_orders += 1;
        match self.order(k, qty, None) {
            Some(id) => {
                self.t.promised += 1;
                self.orders.insert(id, (self.minute, None));
            }
            None => self.t.refused += 1,
        }
    }

    /// The marketplace's listing from its channel's available-to-sell now.
    fn refresh_listing(&mut self) {
        let connected: HashSet<StoreId> = self.stores.iter().filter(|s| s.lit).map(|s| s.id.clone()).collect();
        let market: ChannelId = MARKET.parse().expect("an id");
        for (k, sku) in self.w.skus.iter().enumerate() {
            let f = self.d.channel_figures(&market, sku, self.now(), &connected).expect("the channel exists");
            self.listing[k] = f.ats;
        }
    }

    /// A marketplace customer: sold if listed (the marketplace cannot ask the hub first), then
    /// sent to the hub through its channel, paid.
    fn market(&mut self, k: usize, qty: u64) {
        self.t.market_orders += 1;
        if self.listing[k] < qty {
            return;
        }
        self.listing[k] -= qty;
        let id = self
            .order(k, qty, Some(MARKET.parse().expect("an id")))
            .expect("a lagged channel's order is recorded whatever it asks");
        self.t.market_promised += 1;
        self.market_orders.insert(id, self.minute);
    }

    fn restock(&mut self, si: usize) {
        let store = self.stores[si].id.clone();
        let mut lines = Vec::new();
        for k in 0..self.w.skus.len() {
            // Up to par counting units promised online as gone.
            let free = self.stores[si].units[k] - self.d.held(&store, &self.w.skus[k]) as i64;
            let q = self.w.par[si][k] - free.max(0);
            if q > 0 {
                lines.push((k, q));
            }
        }
        for chunk in lines.chunks(shelfsync_shared::qty::LINES_MAX) {
            let id = self.mint();
            let req = HubChangeRequest {
                id,
                key: None,
                change: HubChange::Restock {
                    store: store.clone(),
                    lines: chunk.iter().map(|&(k, q)| QtyLine { sku: self.w.skus[k].clone(), qty: q as u64 }).collect(),
                },
                reason: Some("delivery".into()),
            };
            let Done::HubChanged(c) = self.ok(Command::HubChange(req)) else { unreachable!("a restock answers") };
            // The goods arrive; the store's ledger learns the hub's entry at its next sync.
            for &(k, q) in chunk {
                self.stores[si].units[k] += q;
                self.t.restocked_units += q as u64;
            }
            self.push_holds(&c.holds_changed);
        }
    }

    // -- the run --

    fn setup(&mut self) {
        for si in 0..self.stores.len() {
            let store = self.stores[si].id.clone();
            self.ok(Command::AddStore { store: store.clone() });
            self.ok(Command::SetConnected { store, connected: true });
        }
        for si in 0..self.stores.len() {
            if self.policy.escrow() {
                self.grant(si);
            }
            self.merge(si);
        }
        for si in 0..self.stores.len() {
            if !self.w.lit_at_start[si] {
                self.set_lit(si, false);
            }
        }
        let cfg = &self.w.cfg;
        if cfg.market > 0.0 {
            let protect = cfg.market_protect;
            let market = Channel {
                id: MARKET.parse().expect("an id"),
                fulfil: Fulfil::All,
                buffer: Buffer { units: if protect { cfg.market_buffer } else { 0 }, share_pct: 0 },
                cap: Cap::default(),
                latency: Latency::Lagged { lag_secs: if protect { u64::from(cfg.market_refresh_min) * 60 } else { 1 } },
                sku_buffers: Default::default(),
            };
            self.ok(Command::PutChannel(market));
            self.refresh_listing();
        }
    }

    fn simulate(&mut self) {
        let w = self.w;
        let mut toggles: Vec<std::iter::Peekable<std::slice::Iter<'_, (u32, bool)>>> =
            w.toggles.iter().map(|t| t.iter().peekable()).collect();
        let mut restocks = w.restocks.iter().peekable();
        let mut arrivals = w.arrivals.iter().peekable();
        for m in 0..w.cfg.minutes() {
            self.minute = m;
            for (si, t) in toggles.iter_mut().enumerate() {
                while let Some(&&(_, lit)) = t.peek().filter(|(at, _)| *at == m) {
                    t.next();
                    self.set_lit(si, lit);
                    if lit {
                        // The agent's first delta follows the handshake at once: sync now, not at
                        // the end of the minute (the decider counts a connected store as not
                        // silent, whatever it has not sent yet).
                        self.sync(si);
                    }
                }
            }
            while let Some(&&(_, si)) = restocks.peek().filter(|(at, _)| *at == m) {
                restocks.next();
                self.restock(si);
            }
            while let Some(&&(_, a)) = arrivals.peek().filter(|(at, _)| *at == m) {
                arrivals.next();
                match a {
                    Arrival::WalkIn { store, sku, u } => self.walk_in(store, sku, u),
                    Arrival::Online { sku, qty } => self.online(sku, qty),
                    Arrival::Market { sku, qty } => self.market(sku, qty),
                }
            }
            if w.cfg.market > 0.0 && m % w.cfg.market_refresh_min == 0 {
                self.refresh_listing();
            }
            if m % EXPIRE_EVERY == 0 {
                let Done::Expired(e) = self.ok(Command::ExpireDue) else { unreachable!("expiry answers") };
                self.push_holds(&e.stores);
            }
            for si in 0..self.stores.len() {
                if self.stores[si].lit {
                    self.sync(si);
                }
            }
        }
        self.minute = w.cfg.minutes();
    }

    /// Every store lit, synced until nothing is left to send; then the ground truth.
    fn final_sync(&mut self) -> Result<(), String> {
        for si in 0..self.stores.len() {
            if !self.stores[si].lit {
                self.set_lit(si, true);
            }
        }
        for _ in 0..2 {
            for si in 0..self.stores.len() {
                self.merge(si);
                if std::mem::take(&mut self.stores[si].reconnected) {
                    self.refresh_holds(si);
                }
                self.learn_entries(si);
            }
        }
        let mut bad = Vec::new();
        let mut true_total = 0i64;
        for st in &self.stores {
            for (k, sku) in self.w.skus.iter().enumerate() {
                let (hub, ledger, truth) = (self.d.on_hand(&st.id, sku), st.on_hand(k), st.units[k]);
                true_total += truth;
                if hub != truth || ledger != truth {
                    bad.push(format!("{}/{sku}: hub {hub}, store ledger {ledger}, true {truth}", st.id));
                }
            }
            if !st.dirty_entries.is_empty() || !st.dirty_rights.is_empty() || !st.fulfilled.is_empty() {
                bad.push(format!("{}: changes left unsent", st.id));
            }
        }
        let expected = self.w.initial_units() + self.t.restocked_units as i64
            - self.t.walkins_served as i64
            - self.t.picked_units as i64;
        if expected != true_total {
            bad.push(format!("units on the shelves {true_total}, expected {expected} from the sales and deliveries"));
        }
        match bad.first() {
            None => Ok(()),
            Some(first) => Err(format!("{} mismatches, first: {first}", bad.len())),
        }
    }

    fn report(mut self, omni: &OmniReport, started: Instant) -> Report {
        self.simulate();
        let truth = self.final_sync();
        let (mut broken, mut broken_dark, mut fulfilled, mut open) = (0u64, 0u64, 0u64, 0u64);
        let mut waits = Vec::new();
        for (id, (at, picked)) in &self.orders {
            let v = self.d.reservation(*id).expect("accepted reservations exist");
            if v.short {
                broken += 1;
                let cut_at_dark = v
                    .lines
                    .iter()
                    .flat_map(|l| &l.allocations)
                    .any(|a| a.status == AllocationStatus::Short && !self.w.lit_at(self.store_ix[&a.store], *at));
                if cut_at_dark {
                    broken_dark += 1;
                }
            } else if v.status == ReservationStatus::Fulfilled {
                fulfilled += 1;
                waits.push(picked.expect("a fulfilled order was picked") - at);
            } else {
                open += 1;
            }
        }
        waits.sort_unstable();
        let market_broken = self
            .market_orders
            .keys()
            .filter(|id| self.d.reservation(**id).expect("recorded orders exist").short)
            .count() as u64;
        let conflicts = self.d.conflicts(&ConflictFilter { limit: usize::MAX, ..Default::default() });
        let count = |kind: ConflictKind| conflicts.iter().filter(|c| c.kind == kind).count() as u64;
        let t = &self.t;
        Report {
            policy: self.policy,
            online_orders: t.online_orders,
            promised: t.promised,
            refused: t.refused,
            broken,
            broken_at_dark: broken_dark,
            served: t.promised - broken,
            omniscient_served: omni.served,
            walkins: t.walkins,
            walkins_served: t.walkins_served,
            walkins_lost: t.walkins_lost,
            oversells: count(ConflictKind::Oversell),
            oversells_resourced: conflicts
                .iter()
                .filter(|c| c.kind == ConflictKind::Oversell && c.status == ConflictStatus::Resolved)
                .count() as u64,
            overdraft_conflicts: count(ConflictKind::EscrowOverdraft),
            negative_stock: count(ConflictKind::NegativeStock),
            overdraft_units: t.overdraft_units,
            granted_units: t.granted_units,
            restocked_units: t.restocked_units,
            picked_units: t.picked_units,
            blocked_picks: t.blocked_picks,
            fulfilled,
            open_at_end: open,
            wait_median_min: waits.get(waits.len() / 2).copied(),
            wait_worst_min: waits.last().copied(),
            truth,
            elapsed: started.elapsed(),
            market_orders: t.market_orders,
            market_promised: t.market_promised,
            market_broken,
            market_oversells: count(ConflictKind::ChannelOversell),
        }
    }
}

/// Runs `policy` on `w`, comparing with the omniscient allocator's `omni` (of the same world).
pub fn run_world(w: &World, policy: Policy, omni: &OmniReport) -> Report {
    let started = Instant::now();
    let mut run = Run::new(w, policy);
    run.setup();
    run.report(omni, started)
}

/// Runs `policy` on the world of `cfg` (which must be valid).
pub fn run(cfg: &SimConfig, policy: Policy) -> Report {
    let w = World::new(cfg);
    let omni = omniscient_world(&w);
    run_world(&w, policy, &omni)
}

/// Every policy of `policies` and the omniscient allocator on one world.
pub fn run_all(cfg: &SimConfig, policies: &[Policy]) -> (Vec<Report>, OmniReport) {
    run_all_world(&World::new(cfg), policies)
}

/// Every policy of `policies` and the omniscient allocator on `w`.
pub fn run_all_world(w: &World, policies: &[Policy]) -> (Vec<Report>, OmniReport) {
    let omni = omniscient_world(w);
    (policies.iter().map(|p| run_world(w, *p, &omni)).collect(), omni)
}

/// Several seeds' runs of the same policies added up: counts summed, the median wait the median
/// of the runs' medians, the worst wait the worst, the ground truth failed if any run's failed.
pub fn sum(runs: Vec<(Vec<Report>, OmniReport)>) -> (Vec<Report>, OmniReport) {
    let mut runs = runs.into_iter();
    let Some((mut total, mut omni)) = runs.next() else { return (Vec::new(), OmniReport::default()) };
    let mut medians: Vec<Vec<u32>> = total.iter().map(|r| r.wait_median_min.into_iter().collect()).collect();
    for (reports, o) in runs {
        omni.online_orders += o.online_orders;
        omni.served += o.served;
        omni.walkins += o.walkins;
        omni.walkins_served += o.walkins_served;
        omni.walkins_lost += o.walkins_lost;
        omni.restocked_units += o.restocked_units;
        omni.market_orders += o.market_orders;
        omni.market_served += o.market_served;
        for ((t, r), m) in total.iter_mut().zip(reports).zip(&mut medians) {
            assert_eq!(t.policy, r.policy, "the same policies in every run");
            t.online_orders += r.online_orders;
            t.promised += r.promised;
            t.refused += r.refused;
            t.broken += r.broken;
            t.broken_at_dark += r.broken_at_dark;
            t.served += r.served;
            t.omniscient_served += r.omniscient_served;
            t.walkins += r.walkins;
            t.walkins_served += r.walkins_served;
            t.walkins_lost += r.walkins_lost;
            t.oversells += r.oversells;
            t.oversells_resourced += r.oversells_resourced;
            t.overdraft_conflicts += r.overdraft_conflicts;
            t.negative_stock += r.negative_stock;
            t.overdraft_units += r.overdraft_units;
            t.granted_units += r.granted_units;
            t.restocked_units += r.restocked_units;
            t.picked_units += r.picked_units;
            t.blocked_picks += r.blocked_picks;
            t.fulfilled += r.fulfilled;
            t.open_at_end += r.open_at_end;
            m.extend(r.wait_median_min);
            t.wait_worst_min = t.wait_worst_min.max(r.wait_worst_min);
            if t.truth.is_ok() {
                t.truth = r.truth;
            }
            t.elapsed += r.elapsed;
            t.market_orders += r.market_orders;
            t.market_promised += r.market_promised;
            t.market_broken += r.market_broken;
            t.market_oversells += r.market_oversells;
        }
    }
    for (t, mut m) in total.iter_mut().zip(medians) {
        m.sort_unstable();
        t.wait_median_min = m.get(m.len() / 2).copied();
    }
    (total, omni)
}

/// The reports as an aligned table, one row per policy and the omniscient allocator's last.
pub fn table(reports: &[Report], omni: &OmniReport) -> String {
    let head = [
        "policy",
        "orders",
        "promised",
        "broken",
        "at dark",
        "per 10k",
        "served",
        "of omni",
        "walk-ins",
        "lost",
        "oversell",
        "resourced",
        "overdraft",
        "neg",
        "od units",
        "wait p50",
        "wait max",
        "open",
        "truth",
        "secs",
    ];
    let mut rows: Vec<Vec<String>> = vec![head.iter().map(|s| (*s).to_owned()).collect()];
    let mins = |m: Option<u32>| m.map_or("-".to_owned(), |m| format!("{m}m"));
    for r in reports {
        rows.push(vec![
            r.policy.name().to_owned(),
            r.online_orders.to_string(),
            r.promised.to_string(),
            r.broken.to_string(),
            r.broken_at_dark.to_string(),
            format!("{:.1}", r.broken_per_10k()),
            r.served.to_string(),
            format!("{:.1}%", 100.0 * r.share_of_omniscient()),
            r.walkins_served.to_string(),
            r.walkins_lost.to_string(),
            r.oversells.to_string(),
            r.oversells_resourced.to_string(),
            r.overdraft_conflicts.to_string(),
            r.negative_stock.to_string(),
            r.overdraft_units.to_string(),
            mins(r.wait_median_min),
            mins(r.wait_worst_min),
            r.open_at_end.to_string(),
            if r.truth.is_ok() { "ok".to_owned() } else { "FAIL".to_owned() },
            format!("{:.1}", r.elapsed.as_secs_f64()),
        ]);
    }
    let mut last = vec!["omniscient".to_owned(), omni.online_orders.to_string(), omni.served.to_string(), "0".into()];
    last.extend(["0".to_owned(), "0.0".to_owned(), omni.served.to_string(), "100.0%".into()]);
    last.extend([omni.walkins_served.to_string(), omni.walkins_lost.to_string()]);
    last.extend(std::iter::repeat_n("-".to_owned(), head.len() - last.len()));
    rows.push(last);
    aligned(&rows)
}

/// The channels side by side per policy: the web's promises (the storefront asks the hub) and
/// the marketplace's (it sells on its listing and cannot refuse), broken per 10 000 each.
pub fn channel_table(reports: &[Report], omni: &OmniReport) -> String {
    let head = [
        "policy",
        "web promised",
        "broken",
        "per 10k",
        "market orders",
        "sold",
        "broken",
        "per 10k",
        "of omni",
        "ch oversell",
    ];
    let mut rows: Vec<Vec<String>> = vec![head.iter().map(|s| (*s).to_owned()).collect()];
    for r in reports {
        let served = r.market_promised - r.market_broken;
        let of_omni = if omni.market_served == 0 { 1.0 } else { served as f64 / omni.market_served as f64 };
        rows.push(vec![
            r.policy.name().to_owned(),
            r.promised.to_string(),
            r.broken.to_string(),
            format!("{:.1}", r.broken_per_10k()),
            r.market_orders.to_string(),
            r.market_promised.to_string(),
            r.market_broken.to_string(),
            format!("{:.1}", r.market_broken_per_10k()),
            format!("{:.1}%", 100.0 * of_omni),
            r.market_oversells.to_string(),
        ]);
    }
    aligned(&rows)
}

fn aligned(rows: &[Vec<String>]) -> String {
    let cols = rows[0].len();
    let widths: Vec<usize> = (0..cols).map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c == 0 {
                let _ = write!(line, "{cell:<w$}", w = widths[c]);
            } else {
                let _ = write!(line, "  {cell:>w$}", w = widths[c]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}
