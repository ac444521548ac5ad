//! Counts ordered by `occurred_at` (agent/src/counts.rs), on a real SQLite file: whatever order
//! the same events arrive in (POS changes uploaded late, hub restocks whose journal lines trail
//! their counter entries, counts from a handheld), `on_hand` ends where the rule says:
//! the newest count plus every change that occurred after it.

use proptest::prelude::*;
use shelfsync_agent::db::{Db, DbOptions};
use shelfsync_agent::ledger::{self, Change, Line, RecordRequest};
use shelfsync_agent::replica;
use shelfsync_shared::wire::{Delta, JournalBatch};
use shelfsync_shared::{EventKind, Incarnation, JournalEvent, NodeId, PnEntry, Sku, WriterId};
use uuid::Uuid;

/// Minutes after this base (a day ago, so every time is in the past).
fn base() -> i64 {
    shelfsync_node::now_ms() - 24 * 3600 * 1000
}

#[derive(Clone, Debug)]
enum Ev {
    /// A POS change (sale < 0, return > 0, adjustment either) at minute `at`.
    Pos { id: u128, delta: i64, adjust: bool, at: i64 },
    /// A count of `n` at minute `at`.
    Count { id: u128, n: i64, at: i64 },
    /// A hub restock of `qty` at minute `at`; its journal line arrives `lag` steps after its
    /// counter entry.
    Restock { id: u128, qty: i64, at: i64, lag: usize },
}

impl Ev {
    fn at(&self) -> i64 {
        match self {
            Ev::Pos { at, .. } | Ev::Count { at, .. } | Ev::Restock { at, .. } => *at,
        }
    }
}

fn ev() -> impl Strategy<Value = Ev> {
    prop_oneof![
        4 => (any::<u128>(), -5i64..=5, any::<bool>(), 0i64..60).prop_filter_map("zero", |(id, delta, adjust, at)| {
            (delta != 0).then_some(Ev::Pos { id, delta, adjust, at })
        }),
        2 => (any::<u128>(), 0i64..40, 0i64..60).prop_map(|(id, n, at)| Ev::Count { id, n, at }),
        2 => (any::<u128>(), 1i64..20, 0i64..60, 0usize..6).prop_map(|(id, qty, at, lag)| Ev::Restock { id, qty, at, lag }),
    ]
}

/// The rule, as a pure function of the event set.
fn model(events: &[Ev]) -> i64 {
    let newest = events
        .iter()
        .filter_map(|e| match e {
            Ev::Count { id, n, at } => Some((*at, Uuid::from_u128(*id).into_bytes(), *n)),
            _ => None,
        })
        .max();
    let delta = |e: &Ev| match e {
        Ev::Pos { delta, .. } => *delta,
        Ev::Restock { qty, .. } => *qty,
        Ev::Count { .. } => 0,
    };
    match newest {
        None => events.iter().map(delta).sum(),
        Some((t, _, n)) => n + events.iter().filter(|e| e.at() > t).map(delta).sum::<i64>(),
    }
}

const SKU: &str = "CNT-1";

/// Delivers `events` to a fresh agent in the order given and returns its on_hand.
async fn deliver(events: &[Ev]) -> i64 {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.db");
    let store: shelfsync_shared::StoreId = "store-1".parse().unwrap();
    Db::create(&path, &store, DbOptions::default()).unwrap();
    let db = Db::open(&path, DbOptions::default()).unwrap();
    let hub = WriterId::new(NodeId::Hub, Incarnation::from_u64(7));
    let sku: Sku = SKU.parse().unwrap();
    let minute = |m: i64| base() / 60_000 * 60_000 + m * 60_000;

    // The hub's counter entry grows in the hub's order; a restock's journal line trails it.
    let mut hub_entry = PnEntry::default();
    let mut hub_seq = 0u64;
    let mut trailing: Vec<(usize, JournalEvent)> = Vec::new();
    let mut journal_seq = 0u64;
    let send_journal = |e: JournalEvent, seq: u64| {
        let db = db.clone();
        let hub = hub.clone();
        async move {
            replica::apply_journal(&db, hub, JournalBatch { after: seq - 1, upto: seq, events: vec![e] })
                .await
                .unwrap();
        }
    };
    for (step, e) in events.iter().enumerate() {
        match e {
            Ev::Pos { id, delta, adjust, at } => {
                let change = match (*adjust, *delta) {
                    (true, d) => Change::Adjustment { sku: sku.clone(), delta: d, reason: "correction".into() },
                    (false, d) if d < 0 => Change::Sale { lines: vec![Line { sku: sku.clone(), qty: (-d) as u64 }] },
                    (false, d) => Change::Return { lines: vec![Line { sku: sku.clone(), qty: d as u64 }] },
                };
                let req =
                    RecordRequest { id: Uuid::from_u128(*id), key: None, change, occurred_at_ms: Some(minute(*at)) };
                ledger::record(&db, req).await.unwrap();
            }
            Ev::Count { id, n, at } => {
                let change = Change::Count { sku: sku.clone(), counted: *n };
                let req =
                    RecordRequest { id: Uuid::from_u128(*id), key: None, change, occurred_at_ms: Some(minute(*at)) };
                ledger::record(&db, req).await.unwrap();
            }
            Ev::Restock { id, qty, at, lag } => {
                hub_entry.p += *qty as u64;
                hub_seq += 1;
                let delta = Delta::build(hub_seq - 1, hub_seq, [(&sku, &hub, hub_entry)]);
                replica::apply_delta(&db, hub.clone(), delta).await.unwrap();
                let line = JournalEvent {
                    id: Uuid::from_u128(*id),
                    line: 0,
                    kind: EventKind::Restock,
                    store: store.clone(),
                    sku: sku.clone(),
                    delta: *qty,
                    reason: None,
                    occurred_at_ms: minute(*at),
                    recorded_at_ms: minute(*at),
                    writer: hub.clone(),
                    flags: Vec::new(),
                };
                trailing.push((step + lag, line));
            }
        }
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut trailing).into_iter().partition(|(s, _)| *s <= step);
        trailing = later;
        for (_, line) in due {
            journal_seq += 1;
            send_journal(line, journal_seq).await;
        }
    }
    for (_, line) in std::mem::take(&mut trailing) {
        journal_seq += 1;
        send_journal(line, journal_seq).await;
    }
    let on_hand = ledger::stock(&db, sku.clone()).await.unwrap().map(|v| v.on_hand).unwrap_or(0);
    // The sums the agent keeps line by line are the journal's, and nothing is left to correct.
    let (kept, scanned) = db
        .read(move |conn| {
            Ok::<_, shelfsync_agent::db::DbError>((
                shelfsync_agent::counts::shortfall(conn, &sku)?,
                shelfsync_agent::counts::shortfall_by_scan(conn, &sku)?,
            ))
        })
        .await
        .unwrap();
    assert_eq!((kept, scanned), (0, 0), "kept sums against a scan of the journal");
    drop(db);
    on_hand
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Any arrival order of the same events yields the same `on_hand`: the rule's.
    #[test]
    fn any_arrival_order_gives_the_rule_s_on_hand(
        events in prop::collection::vec(ev(), 1..14),
        shuffle in any::<u64>(),
    ) {
        use rand::seq::SliceRandom;
        use rand::SeedableRng;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let want = model(&events);
        // Restocks keep the hub's order among themselves (the hub's entry only grows); the
        // rest arrives in any order.
        let mut order = events.clone();
        order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(shuffle));
        let restocks: Vec<Ev> = events.iter().filter(|e| matches!(e, Ev::Restock { .. })).cloned().collect();
        let mut r = restocks.into_iter();
        for e in order.iter_mut() {
            if matches!(e, Ev::Restock { .. }) {
                *e = r.next().unwrap();
            }
        }
        prop_assert_eq!(rt.block_on(deliver(&order)), want, "arrival order {:?}", order);
        prop_assert_eq!(rt.block_on(deliver(&events)), want, "in time order of generation");
    }
}

/// The example: sold 2 (7 → 5), then a count of 7 taken an hour before the sales is
/// uploaded: on_hand stays 5, and the answer says the count has −2 on top.
#[tokio::test]
async fn a_backdated_count_does_not_bring_sold_stock_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.db");
    Db::create(&path, &"store-1".parse().unwrap(), DbOptions::default()).unwrap();
    let db = Db::open(&path, DbOptions::default()).unwrap();
    let sku: Sku = SKU.parse().unwrap();
    let now = shelfsync_node::now_ms();
    let rec = |change: Change, at: i64| {
        let db = db.clone();
        async move {
            let req = RecordRequest { id: Uuid::now_v7(), key: None, change, occurred_at_ms: Some(at) };
            ledger::record(&db, req).await.unwrap().1
        }
    };
    rec(Change::Adjustment { sku: sku.clone(), delta: 7, reason: "found".into() }, now - 7_200_000).await;
    let sold = rec(Change::Sale { lines: vec![Line { sku: sku.clone(), qty: 2 }] }, now - 60_000).await;
    assert_eq!(sold.lines[0].on_hand, 5);
    let counted = rec(Change::Count { sku: sku.clone(), counted: 7 }, now - 3_600_000).await;
    let line = &counted.lines[0];
    assert_eq!((line.on_hand, line.delta, line.previous_on_hand), (5, 0, Some(5)), "{counted:?}");
    let count = line.count.as_ref().unwrap();
    assert_eq!((count.counted, count.changes_after, count.superseded_by.is_none()), (7, -2, true));

    // A sale that happened before the count, uploaded now, is already inside it.
    let late = rec(Change::Sale { lines: vec![Line { sku: sku.clone(), qty: 1 }] }, now - 5_400_000).await;
    assert_eq!(late.lines[0].on_hand, 5, "{late:?}");
    assert!(late.lines[0].absorbed_by_count_at.is_some());
    // An older count than the one that stands changes nothing and says so.
    let old = rec(Change::Count { sku: sku.clone(), counted: 100 }, now - 6_000_000).await;
    assert_eq!((old.lines[0].on_hand, old.lines[0].delta), (5, 0));
    assert!(old.lines[0].count.as_ref().unwrap().superseded_by.is_some());
    // A newer count takes over: 4 now.
    let newer = rec(Change::Count { sku: sku.clone(), counted: 4 }, now - 1_000).await;
    assert_eq!((newer.lines[0].on_hand, newer.lines[0].delta), (4, -1));
}

/// Two live agents of one store (a store may run several): one counts, the other uploads a sale
/// that happened before the count. Only the counting agent corrects, so the corrections settle
/// after one exchange instead of each agent answering the other's forever.
#[tokio::test]
async fn two_agents_of_a_store_settle_on_one_correction() {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let store: shelfsync_shared::StoreId = "store-1".parse().unwrap();
    let dbs: Vec<Db> = dirs
        .iter()
        .map(|d| {
            let p = d.path().join("agent.db");
            Db::create(&p, &store, DbOptions::default()).unwrap();
            Db::open(&p, DbOptions::default()).unwrap()
        })
        .collect();
    let sku: Sku = SKU.parse().unwrap();
    let now = shelfsync_node::now_ms();
    let rec = |db: &Db, change: Change, at: i64| {
        let db = db.clone();
        async move {
            let req = RecordRequest { id: Uuid::now_v7(), key: None, change, occurred_at_ms: Some(at) };
            ledger::record(&db, req).await.unwrap()
        }
    };
    rec(&dbs[0], Change::Count { sku: sku.clone(), counted: 10 }, now - 60_000).await;
    rec(&dbs[1], Change::Sale { lines: vec![Line { sku: sku.clone(), qty: 1 }] }, now - 120_000).await;
    // Exchange everything each has written (as the hub would relay it) until nothing new moves.
    let mut rounds = 0;
    loop {
        rounds += 1;
        assert!(rounds <= 4, "the agents keep correcting each other");
        let mut moved = 0;
        for (from, to) in [(0usize, 1usize), (1, 0)] {
            let j = replica::read_journal(&dbs[from], 0, 10_000).await.unwrap();
            let d = replica::read_delta(&dbs[from], 0, 10_000, false).await.unwrap();
            let before = ledger::status(&dbs[to]).await.unwrap().journal_events;
            let writer = dbs[from].identity().writer;
            let delta = Delta::build(0, d.upto, d.entries.iter().map(|(s, w, e)| (s, w, *e)));
            replica::apply_delta(&dbs[to], writer.clone(), delta).await.unwrap();
            let batch = JournalBatch { after: 0, upto: j.upto, events: j.events };
            replica::apply_journal(&dbs[to], writer, batch).await.unwrap();
            moved += ledger::status(&dbs[to]).await.unwrap().journal_events - before;
        }
        if moved == 0 {
            break;
        }
    }
    for db in &dbs {
        assert_eq!(ledger::stock(db, sku.clone()).await.unwrap().unwrap().on_hand, 10, "the count saw the sale");
    }
}
