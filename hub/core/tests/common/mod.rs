//! Test harness: a decider with a clock the test moves, shorthand ids, and stock set through the
//! stores' own counter entries (as agents would send them).
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};

use shelfsync_hub_core::{
    Action, AllocationStatus, CatalogRule, Command, Config, ConflictKind, Decider, Done, FeedEvent, FeedKind, FeedRead,
    HubChange, HubChangeRequest, Outcome, QtyLine, Record, ReservationRequest, ReservationStatus, Snapshot, Staleness,
    Written,
};
use shelfsync_shared::{Incarnation, NodeId, PnEntry, Sku, StoreId, WriterId};
use uuid::Uuid;

pub const T0: i64 = 1_700_000_000_000;

pub fn s(name: &str) -> StoreId {
    name.parse().unwrap()
}

pub fn k(name: &str) -> Sku {
    name.parse().unwrap()
}

pub fn writer(store: &str) -> WriterId {
    WriterId::new(NodeId::Store(s(store)), Incarnation::from_u64(1))
}

pub fn hub_writer() -> WriterId {
    WriterId::new(NodeId::Hub, Incarnation::from_u64(0xab))
}

pub fn uid(n: u128) -> Uuid {
    Uuid::from_u128(n)
}

pub fn line(sku: &str, qty: u64) -> QtyLine {
    QtyLine { sku: k(sku), qty }
}

pub fn rule(safety: u64, threshold: u64, max_per_customer: u64, active: bool) -> CatalogRule {
    CatalogRule {
        safety_stock: safety,
        low_stock_threshold: threshold,
        max_per_customer,
        active,
        escrow: Default::default(),
    }
}

pub fn config(staleness: bool) -> Config {
    let mut c = Config::new(hub_writer());
    c.staleness = Staleness { enabled: staleness, ..Staleness::default() };
    c
}

pub struct H {
    pub d: Decider,
    pub now: i64,
    /// Each store's own writer entry per SKU, as its agent holds it.
    pub agent: HashMap<(StoreId, Sku), PnEntry>,
    pub records: Vec<Record>,
}

impl H {
    pub fn new() -> H {
        H::with(config(false))
    }

    pub fn with(config: Config) -> H {
        H { d: Decider::new(config, 42), now: T0, agent: HashMap::new(), records: Vec::new() }
    }

    pub fn apply(&mut self, cmd: Command) -> Outcome {
        let out = self.d.apply(cmd, self.now);
        self.records.extend(self.d.take_records());
        out
    }

    pub fn ok(&mut self, cmd: Command) -> Done {
        let c = format!("{cmd:?}");
        self.apply(cmd).unwrap_or_else(|e| panic!("{c} refused: {e}"))
    }

    pub fn stores(&mut self, names: &[&str]) {
        for n in names {
            self.ok(Command::AddStore { store: s(n) });
        }
    }

    pub fn advance(&mut self, ms: i64) {
        self.now += ms;
    }

    /// The store's agent entries that bring its on_hand of `sku` to `target`.
    pub fn stock_cmd(&mut self, store: &str, sku: &str, target: i64, fulfilled: Vec<Uuid>) -> Command {
        let diff = target - self.d.on_hand(&s(store), &k(sku));
        let e = self.agent.entry((s(store), k(sku))).or_default();
        if diff >= 0 {
            e.p += diff as u64;
        } else {
            e.n += diff.unsigned_abs();
        }
        Command::Merge { store: s(store), entries: vec![(k(sku), writer(store), *e)], fulfilled, rights: vec![] }
    }

    pub fn stock(&mut self, store: &str, sku: &str, target: i64) -> Done {
        let cmd = self.stock_cmd(store, sku, target, Vec::new());
        self.ok(cmd)
    }

    pub fn reserve(&mut self, id: u128, lines: Vec<QtyLine>, pickup: Option<&str>, customer: Option<&str>) -> Outcome {
        self.apply(Command::Reserve(ReservationRequest {
            id: uid(id),
            key: None,
            lines,
            ttl_secs: 900,
            pickup_store: pickup.map(s),
            customer: customer.map(str::to_owned),
            channel: None,
        }))
    }

    pub fn reserved(&mut self, id: u128, lines: Vec<QtyLine>) -> Written {
        match self.reserve(id, lines, None, None) {
            Ok(Done::Reserved(w)) => w,
            other => panic!("reserve: {other:?}"),
        }
    }

    pub fn act(&mut self, id: u128, action: Action, key: Option<&str>) -> Outcome {
        self.apply(Command::Act { id: uid(id), action, key: key.map(str::to_owned) })
    }

    pub fn restock(&mut self, id: u128, store: &str, lines: Vec<QtyLine>) -> Outcome {
        self.apply(Command::HubChange(HubChangeRequest {
            id: uid(id),
            key: None,
            change: HubChange::Restock { store: s(store), lines },
            reason: None,
        }))
    }

    pub fn catalog(&mut self, sku: &str, r: Option<CatalogRule>) {
        self.ok(Command::CatalogChanged { items: vec![(k(sku), r)], overrides: None });
    }

    pub fn feed(&self) -> Vec<FeedEvent> {
        match self.d.changes_after(0, usize::MAX) {
            FeedRead::Events(e) => e,
            FeedRead::Evicted { .. } => panic!("feed evicted"),
        }
    }

    /// Kinds of the events after `cursor`.
    pub fn kinds_after(&self, cursor: u64) -> Vec<FeedKind> {
        self.feed().into_iter().filter(|e| e.cursor > cursor).map(|e| e.kind).collect()
    }

    pub fn rebuilt(&self) -> Decider {
        Decider::from_records(self.d.config().clone(), 42, self.records.clone()).expect("records load")
    }
}

/// What storage keeps of a record history: one row per key (the last), deleted rows gone,
/// journal rows not read back, loaded table by table (stores first, feed by cursor).
pub fn rows(records: &[Record]) -> Vec<Record> {
    use std::collections::BTreeMap;
    let mut table: BTreeMap<(u8, String), Record> = BTreeMap::new();
    for r in records {
        let key = match r {
            Record::Store(s) => (0, s.id.to_string()),
            Record::CatalogRule { sku, .. } => (1, sku.to_string()),
            Record::Overrides { store, sku, .. } => (2, format!("{store}/{sku}")),
            Record::Channel { id, .. } => (2, format!("channel/{id}")),
            Record::ChannelDemand { channel, sku, .. } => (4, format!("demand/{channel}/{sku}")),
            Record::Entry(e) => (3, format!("{}/{}/{}", e.store, e.sku, e.writer)),
            Record::Velocity { store, sku, .. } => (4, format!("{store}/{sku}")),
            Record::Alert { store, sku, .. } => (5, format!("{store}/{sku}")),
            Record::Rights { store, sku, .. } => (5, format!("rights/{store}/{sku}")),
            Record::Reservation(r) => (6, r.id.to_string()),
            Record::Allocation(a) => (7, a.id.to_string()),
            Record::Conflict(c) => (8, c.id.to_string()),
            Record::HubRequest(q) => (9, q.id.to_string()),
            Record::ActionRequest(q) => (10, q.key.clone()),
            Record::Transfer(t) => (10, format!("transfer/{}", t.id)),
            Record::Feed(e) => (11, format!("{:020}", e.cursor)),
            Record::HubWriter(_) => (12, String::new()),
            Record::IdCounter(_) => (13, String::new()),
            Record::Journal(_) => continue,
        };
        table.insert(key, r.clone());
    }
    table
        .into_values()
        .filter(|r| {
            !matches!(r, Record::CatalogRule { rule: None, .. } | Record::Channel { channel: None, .. })
                && !matches!(r, Record::Overrides { overrides, .. } if *overrides == Default::default())
        })
        .collect()
}

impl H {
    /// A decider rebuilt from the rows storage would hold.
    pub fn reloaded(&self) -> Decider {
        Decider::from_records(self.d.config().clone(), 42, rows(&self.records)).expect("rows load")
    }
}

macro_rules! ensure {
    ($cond:expr, $($why:tt)*) => {
        if !$cond {
            return Err(format!($($why)*));
        }
    };
}

/// The invariants of the decider's state after every command (DESIGN §5a, `hub/core/src/lib.rs`):
/// held = Σ open allocations = what the holds snapshots list; held ≤ max(on_hand, 0); every
/// short allocation named by an
/// oversell conflict; every reservation all lines or none (not counting `moved` allocations, nor
/// those in `late_moved`: picked by the store after the hub had moved them); open allocations in
/// their reservation's status.
pub fn check_state(d: &Decider, snap: &Snapshot, late_moved: &HashSet<Uuid>) -> Result<(), String> {
    let mut open: BTreeMap<(StoreId, Sku), u64> = BTreeMap::new();
    for a in snap.allocations.values().filter(|a| a.status.is_open()) {
        *open.entry((a.store.clone(), a.sku.clone())).or_default() += a.qty;
    }
    let mut listed: BTreeMap<(StoreId, Sku), u64> = BTreeMap::new();
    for s in d.stores() {
        for h in d.holds_snapshot(&s.id).holds {
            *listed.entry((s.id.clone(), h.sku)).or_default() += h.qty;
        }
    }
    for ((store, sku), c) in &snap.cells {
        let key = (store.clone(), sku.clone());
        let want = open.remove(&key).unwrap_or(0);
        ensure!(c.held == want, "held of {store}/{sku} is {} but its open allocations hold {want}", c.held);
        ensure!(c.held <= c.on_hand.max(0) as u64, "{store}/{sku} holds {} of {} on hand", c.held, c.on_hand);
        let l = listed.remove(&key).unwrap_or(0);
        ensure!(l == c.held, "the holds snapshot of {store} lists {l} of {sku}, held is {}", c.held);
    }
    ensure!(open.is_empty(), "open allocations outside any cell: {open:?}");
    ensure!(listed.values().all(|q| *q == 0), "holds listed outside any cell: {listed:?}");
    for a in snap.allocations.values().filter(|a| a.status == AllocationStatus::Short) {
        let named = snap.conflicts.values().any(|c| {
            matches!(c.kind, ConflictKind::Oversell | ConflictKind::ChannelOversell)
                && c.store == a.store
                && c.sku.as_ref() == Some(&a.sku)
                && c.reservations.contains(&a.reservation)
        });
        ensure!(named, "short allocation {} without its oversell conflict", a.id);
    }
    for r in snap.reservations.values() {
        let allocs: Vec<_> = snap
            .reservation_allocations
            .get(&r.id)
            .map(|ids| ids.iter().map(|id| &snap.allocations[id]).collect())
            .unwrap_or_default();
        for (i, l) in r.lines.iter().enumerate() {
            let covered: u64 = allocs
                .iter()
                .filter(|a| a.line == i as u32 && a.status != AllocationStatus::Moved && !late_moved.contains(&a.id))
                .map(|a| a.qty)
                .sum();
            ensure!(covered == l.qty, "reservation {} line {i} covers {covered} of {}", r.id, l.qty);
        }
        let want = match r.status {
            ReservationStatus::Held => Some(AllocationStatus::Held),
            ReservationStatus::Committed => Some(AllocationStatus::Committed),
            _ => None,
        };
        for a in allocs.iter().filter(|a| a.status.is_open()) {
            ensure!(Some(a.status) == want, "allocation {} is {} in a {} reservation", a.id, a.status, r.status);
        }
    }
    Ok(())
}
