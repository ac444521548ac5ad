//! The decider's storage on a PostgreSQL database of several partitions, below the processes
//! (`hub/src/postgres.rs`): each partition's decider persists and loads its own rows only, under
//! its own lease and hub writer; the entries its hub writer authors are numbered by their store's
//! sequence, in commit order across partitions and the sync plane; a database of one partition
//! writes as it always did.

use std::collections::{BTreeMap, BTreeSet};

use shelfsync_hub::cluster::Fence;
use shelfsync_hub::db::{HubDb, Load, Opened, Target};
use shelfsync_hub::engine::{Engine, EngineOptions};
use shelfsync_hub::sqlite::SqliteOptions;
use shelfsync_hub::standby::Follower;
use shelfsync_hub::storage::CertRecord;
use shelfsync_hub::syncplane::{self, AgentDelta};
use shelfsync_hub_core::{
    Decider, HubChange, HubChangeRequest, Loader, Partition, Partitions, QtyLine, ReservationRequest,
};
use shelfsync_shared::id::{Incarnation, NodeId};
use shelfsync_shared::wire::Delta;
use shelfsync_shared::{PnEntry, Sku, StoreId, WriterId};
use shelfsync_tests::procs::wait_until;
use tokio_postgres::Client;
use uuid::Uuid;

const PARTS: u16 = 4;
/// The two partitions driven side by side (0 and 3 only get the sync plane's rows).
const LEFT: Partition = 1;
const RIGHT: Partition = 2;
const DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

fn store(name: &str) -> StoreId {
    name.parse().unwrap()
}

/// `n` SKUs of partition `p`.
fn skus_of(parts: Partitions, p: Partition, n: usize) -> Vec<Sku> {
    (0..).map(|i| format!("SKU-{i:04}").parse::<Sku>().unwrap()).filter(|s| parts.of(s) == p).take(n).collect()
}

fn restock(id: u128, at: &str, skus: &[Sku]) -> HubChangeRequest {
    HubChangeRequest {
        id: Uuid::from_u128(id),
        key: None,
        change: HubChange::Restock {
            store: store(at),
            lines: skus.iter().map(|s| QtyLine { sku: s.clone(), qty: 10 }).collect(),
        },
        reason: None,
    }
}

fn reserve(id: u128, at: &str, sku: &Sku, qty: u64) -> ReservationRequest {
    ReservationRequest {
        id: Uuid::from_u128(id),
        key: None,
        lines: vec![QtyLine { sku: sku.clone(), qty }],
        ttl_secs: 600,
        pickup_store: Some(store(at)),
        customer: None,
        channel: None,
    }
}

/// Takes partition `p`'s lease for this test, at epoch 1.
async fn take_lease(db: &Client, p: Partition) -> Fence {
    let n = db
        .execute(
            "UPDATE leases SET owner = $2, epoch = 1, expires_at = now() + interval '1 minute', taken_at = now()
             WHERE partition = $1",
            &[&i32::from(p), &format!("test-{p}")],
        )
        .await
        .unwrap();
    assert_eq!(n, 1, "partition {p} has a lease row");
    Fence::at(1)
}

async fn add_stores(target: &Target, names: &[&str]) {
    let admin = HubDb::open(target, SqliteOptions::default(), None).await.unwrap().storage;
    for (i, name) in names.iter().enumerate() {
        let cert = CertRecord {
            serial: format!("{i:02x}"),
            store: store(name),
            fingerprint: format!("fp-{name}"),
            revoked_at_ms: None,
        };
        admin.add_store(store(name), cert).await.unwrap();
    }
}

/// A fresh database of [`PARTS`] partitions with `stores` registered, and a connection to it.
async fn database(stores: &[&str]) -> (String, Target, Partitions, Client) {
    let url = shelfsync_tests::pg::fresh_database().await;
    let target = Target::Postgres(url.clone());
    let parts = Partitions::new(PARTS).unwrap();
    HubDb::create(&target, parts).await.unwrap();
    add_stores(&target, stores).await;
    let db = shelfsync_tests::pg::connect(&url).await;
    (url, target, parts, db)
}

/// The decider an opened database holds (warm, or loaded from its records).
fn decider(opened: Opened, opts: EngineOptions) -> Decider {
    let writer = opened.storage.hub_writer();
    let mut l = opened.loader.unwrap_or_else(|| Loader::new(opts.decider_config(writer), 1));
    l.load(opened.records).unwrap();
    l.finish()
}

/// Counter rows of the hub writers: store → [(store sequence, SKU, writer, partition)], by
/// store sequence.
async fn hub_rows(db: &Client) -> BTreeMap<String, Vec<(i64, String, String, i16)>> {
    let mut out: BTreeMap<String, Vec<(i64, String, String, i16)>> = BTreeMap::new();
    for r in db
        .query(
            "SELECT store, store_seq, sku, writer, partition, seq FROM counters WHERE writer LIKE 'hub@%'
             ORDER BY store, store_seq",
            &[],
        )
        .await
        .unwrap()
    {
        let (seq, store_seq): (i64, i64) = (r.get(5), r.get(1));
        assert_eq!(seq, store_seq, "a partition's hub entry's counter sequence is its store sequence");
        out.entry(r.get(0)).or_default().push((store_seq, r.get(2), r.get(3), r.get(4)));
    }
    out
}

/// Two partitions of a 4-partition database, each under its own lease and driven through its own
/// engine, write only their own rows: reopened cold, each loads exactly the decider its record log
/// rebuilds (nothing of the other partition, nor of the sync plane's rows of other partitions),
/// answers as it did live, and keeps its own holds versions. The hub writers' entries carry
/// store sequences 1, 2, 3… per store in commit order, shared with the sync plane's merges and
/// unique under concurrent commits of both partitions.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_partitions_side_by_side_persist_and_load_only_their_own_state() {
    let (url, target, parts, db) = database(&["store-a", "store-b", "store-c"]).await;
    let (sql, opts) = (SqliteOptions::default(), EngineOptions::default());
    let (a, b) = (skus_of(parts, LEFT, 30), skus_of(parts, RIGHT, 30));
    let (others0, others3) = (skus_of(parts, 0, 1), skus_of(parts, 3, 1));

    // Standbys of both partitions, warm before anything is decided.
    let warm_left = Follower::start_partition(url.clone(), opts, LEFT);
    let warm_right = Follower::start_partition(url.clone(), opts, RIGHT);
    wait_until("the standbys warm", DEADLINE, || async {
        (warm_left.cursor().is_some() && warm_right.cursor().is_some()).then_some(())
    })
    .await;

    let (fence_left, fence_right) = (take_lease(&db, LEFT).await, take_lease(&db, RIGHT).await);
    let left = Engine::open_target(&target, sql, opts, Some(fence_left), None, LEFT).await.unwrap();
    let right = Engine::open_target(&target, sql, opts, Some(fence_right), None, RIGHT).await.unwrap();
    assert_ne!(left.hub_writer(), right.hub_writer(), "each partition is its own hub writer");
    let now = shelfsync_node::now_ms();

    // One commit after the other, both partitions and the sync plane on the same stores.
    left.hub_change(restock(1_001, "store-a", &a[0..2]), now).await.unwrap();
    right.hub_change(restock(2_001, "store-a", &b[0..1]), now).await.unwrap();
    let agent = WriterId::new(NodeId::Store(store("store-a")), Incarnation::from_u64(7));
    let merged = syncplane::SyncPlane::connect(&url)
        .await
        .unwrap()
        .merge(
            parts,
            AgentDelta {
                store: store("store-a"),
                peer: agent.clone(),
                entries: vec![
                    (others0[0].clone(), agent.clone(), PnEntry { p: 5, n: 1 }),
                    (others3[0].clone(), agent.clone(), PnEntry { p: 4, n: 0 }),
                ],
                fulfilled: Vec::new(),
                rights: Vec::new(),
                upto: 2,
                lineage_base: None,
                lineage: None,
                pusher_boots: Vec::new(),
                at_ms: now,
            },
        )
        .await
        .unwrap();
    assert_eq!(merged.head, 5, "the sync plane numbers after the partitions' three entries");
    left.hub_change(restock(1_002, "store-b", &a[0..1]), now).await.unwrap();
    right.hub_change(restock(2_002, "store-b", &b[0..2]), now).await.unwrap();
    left.hub_change(restock(1_003, "store-a", &a[2..3]), now).await.unwrap();
    // Both partitions at once on one store: every entry its own number.
    let (l, r) = (&left, &right);
    let (a_c, b_c) = (&a[10..30], &b[10..30]);
    tokio::join!(
        async move {
            for (i, sku) in a_c.iter().enumerate() {
                l.hub_change(restock(1_100 + i as u128, "store-c", std::slice::from_ref(sku)), now).await.unwrap();
            }
        },
        async move {
            for (i, sku) in b_c.iter().enumerate() {
                r.hub_change(restock(2_100 + i as u128, "store-c", std::slice::from_ref(sku)), now).await.unwrap();
            }
        }
    );
    let held_left = left.create_reservation(reserve(1_500, "store-a", &a[0], 2), now).await.unwrap();
    let held_right = right.create_reservation(reserve(2_500, "store-b", &b[0], 3), now).await.unwrap();
    assert!(held_left.created && held_right.created);

    // The store sequences.
    let rows = hub_rows(&db).await;
    let (lw, rw) = (left.hub_writer().to_string(), right.hub_writer().to_string());
    let brief = |store: &str| -> Vec<(i64, String, String)> {
        rows[store].iter().map(|(q, s, w, _)| (*q, s.clone(), w.clone())).collect()
    };
    let store_a = brief("store-a");
    assert_eq!(
        store_a.iter().map(|(q, _, w)| (*q, w.as_str())).collect::<Vec<_>>(),
        vec![(1, lw.as_str()), (2, lw.as_str()), (3, rw.as_str()), (6, lw.as_str())],
        "store-a: the left commit's two entries, the right's, the sync plane's two (4, 5), the left's again"
    );
    let skus_a: Vec<String> = store_a.into_iter().map(|(_, s, _)| s).collect();
    assert_eq!(BTreeSet::from_iter(skus_a[..2].to_vec()), BTreeSet::from([a[0].to_string(), a[1].to_string()]));
    assert_eq!(skus_a[2..], [b[0].to_string(), a[2].to_string()]);
    let agent_seqs: Vec<i64> = db
        .query("SELECT store_seq FROM counters WHERE writer = $1 ORDER BY store_seq", &[&agent.to_string()])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(agent_seqs, vec![4, 5]);
    let store_b: Vec<(i64, String)> = brief("store-b").into_iter().map(|(q, _, w)| (q, w)).collect();
    assert_eq!(store_b, vec![(1, lw.clone()), (2, rw.clone()), (3, rw.clone())]);
    let store_c = &rows["store-c"];
    assert_eq!(store_c.iter().map(|(q, ..)| *q).collect::<Vec<_>>(), (1..=40).collect::<Vec<i64>>());
    for (writer, skus, p) in [(&lw, a_c, LEFT), (&rw, b_c, RIGHT)] {
        let mine: Vec<String> = store_c.iter().filter(|(_, _, w, _)| w == writer).map(|(_, s, ..)| s.clone()).collect();
        let want: Vec<String> = skus.iter().map(|s| s.to_string()).collect();
        assert_eq!(mine, want, "partition {p}'s entries numbered in its commit order");
        assert!(store_c.iter().filter(|(_, _, w, _)| w == writer).all(|(.., part)| *part == p as i16));
    }
    let heads: Vec<(String, i64)> = db
        .query("SELECT store, counter FROM store_seqs ORDER BY store", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(heads, vec![("store-a".into(), 6), ("store-b".into(), 3), ("store-c".into(), 40)]);

    // Each partition's rows are its own; the stores' holds versions are per partition.
    for table in ["decisions", "feed", "transfers", "record_log"] {
        let sql = format!("SELECT COUNT(*) FROM {table} WHERE partition NOT IN (1, 2)");
        assert_eq!(db.query_one(&sql, &[]).await.unwrap().get::<_, i64>(0), 0, "{table}");
    }
    let holds: Vec<(i16, String, i64)> = db
        .query("SELECT partition, store, holds_version FROM store_parts WHERE holds_version > 0 ORDER BY 1, 2", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(holds.iter().map(|(p, s, _)| (*p, s.as_str())).collect::<Vec<_>>(), [(1, "store-a"), (2, "store-b")]);
    let global: i64 = db.query_one("SELECT COALESCE(MAX(holds_version), 0) FROM stores", &[]).await.unwrap().get(0);
    assert_eq!(global, 0, "several partitions leave stores.holds_version alone");

    // What each answers live, then reopened.
    let all: Vec<Sku> = a.iter().chain(&b).cloned().collect();
    let live_left = left.availability_known(all.clone(), now).await.unwrap();
    let live_right = right.availability_known(all.clone(), now).await.unwrap();
    let stores = ["store-a", "store-b", "store-c"];
    let mut live_holds = BTreeMap::new();
    for (p, engine) in [(LEFT, &left), (RIGHT, &right)] {
        for s in stores {
            live_holds.insert((p, s), engine.holds_snapshot(store(s)).await.unwrap());
        }
    }
    assert!(live_holds[&(LEFT, "store-a")].version > 0 && live_holds[&(RIGHT, "store-b")].version > 0);
    for (p, head) in [(LEFT, &warm_left), (RIGHT, &warm_right)] {
        let end: i64 = db
            .query_one("SELECT COALESCE(MAX(seq), 0) FROM record_log WHERE partition = $1", &[&(p as i16)])
            .await
            .unwrap()
            .get(0);
        wait_until("the standby at its log's end", DEADLINE, || async { (head.cursor() >= Some(end)).then_some(()) })
            .await;
    }
    let (warm_left, warm_right) = (warm_left.stop().await.unwrap(), warm_right.stop().await.unwrap());
    assert_eq!((warm_left.partition(), warm_right.partition()), (LEFT, RIGHT));
    drop((left, right));

    for (p, warm, live, mine, theirs, reservation, writer) in [
        (LEFT, warm_left, &live_left, &a, &b, held_left.view.id, &lw),
        (RIGHT, warm_right, &live_right, &b, &a, held_right.view.id, &rw),
    ] {
        let opened = HubDb::open_partition(&target, sql, Load::Warm(Box::new(warm)), None, p).await.unwrap();
        assert!(opened.loader.is_some(), "partition {p} taken over warm");
        let warm = decider(opened, opts).snapshot();
        let cold = decider(HubDb::open_partition(&target, sql, Some(opts.feed_retain), None, p).await.unwrap(), opts)
            .snapshot();
        let foreign: Vec<&(StoreId, Sku)> = cold.cells.keys().filter(|(_, sku)| parts.of(sku) != p).collect();
        assert!(foreign.is_empty(), "partition {p} loads its own SKUs only, not {foreign:?}");
        assert!(!cold.cells.is_empty() && !cold.feed.is_empty());
        assert_eq!(cold.hub_writer.to_string(), *writer);
        assert_eq!(warm, cold, "partition {p}: its tables hold exactly what its decider committed");
        assert_eq!(cold.reservations.keys().copied().collect::<Vec<_>>(), vec![reservation]);
        assert!(
            cold.hub_requests.keys().all(|id| id.as_u128() / 1000 == u128::from(p)),
            "{:?}",
            cold.hub_requests.keys()
        );
        let reopened = Engine::open_target(&target, sql, opts, None, None, p).await.unwrap();
        for s in stores {
            let holds = reopened.holds_snapshot(store(s)).await.unwrap();
            assert_eq!(holds, live_holds[&(p, s)], "partition {p}: {s}'s holds and their version, as live");
        }
        let again = reopened.availability_known(all.clone(), now).await.unwrap();
        for ((sku, known, figures), (_, live_known, live_figures)) in again.iter().zip(live.iter()) {
            if mine.contains(sku) {
                assert_eq!((known, figures), (live_known, live_figures), "partition {p}, {sku}: as it answered live");
            } else {
                assert!(theirs.contains(sku) && !known, "partition {p} knows nothing of {sku}");
            }
        }
    }

    // An agent's delta merged by a partition's decider (the single-decider path) is not written
    // by the decider's writer in a partitioned database: the sync plane writes those rows.
    let left = Engine::open_target(&target, sql, opts, Some(Fence::at(1)), None, LEFT).await.unwrap();
    let writer = WriterId::new(NodeId::Store(store("store-b")), Incarnation::from_u64(9));
    let delta = Delta::build(0, 1, [(&a[5], &writer, PnEntry { p: 3, n: 0 })]);
    left.apply_delta(store("store-b"), writer.clone(), delta, None, Vec::new(), now).await.unwrap();
    let written: i64 =
        db.query_one("SELECT COUNT(*) FROM counters WHERE writer = $1", &[&writer.to_string()]).await.unwrap().get(0);
    assert_eq!(written, 0);
}

/// A database of one partition writes as before partitions: counter rows in partition 0 without
/// a store sequence (store writers' entries included), the writer in `meta.writer`, the holds
/// version in `stores` as in `store_parts`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_partition_writes_as_before() {
    let url = shelfsync_tests::pg::fresh_database().await;
    let target = Target::Postgres(url.clone());
    HubDb::create(&target, Partitions::ONE).await.unwrap();
    add_stores(&target, &["store-a"]).await;
    let db = shelfsync_tests::pg::connect(&url).await;
    let (sql, opts) = (SqliteOptions::default(), EngineOptions::default());
    let engine = Engine::open_target(&target, sql, opts, None, None, 0).await.unwrap();
    let sku: Sku = "MUG-1".parse().unwrap();
    let now = shelfsync_node::now_ms();
    engine.hub_change(restock(1, "store-a", std::slice::from_ref(&sku)), now).await.unwrap();
    let writer = WriterId::new(NodeId::Store(store("store-a")), Incarnation::from_u64(3));
    let delta = Delta::build(0, 1, [(&sku, &writer, PnEntry { p: 0, n: 2 })]);
    engine.apply_delta(store("store-a"), writer.clone(), delta, None, Vec::new(), now).await.unwrap();
    engine.create_reservation(reserve(2, "store-a", &sku, 1), now).await.unwrap();
    let rows: Vec<(String, i16, Option<i64>)> = db
        .query("SELECT writer, partition, store_seq FROM counters ORDER BY seq", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(rows, vec![(engine.hub_writer().to_string(), 0, None), (writer.to_string(), 0, None)]);
    let keys: Vec<String> = db
        .query("SELECT key FROM meta WHERE key LIKE 'writer%' OR key LIKE 'id_counter%' ORDER BY key", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(keys, ["id_counter", "writer"]);
    let (global, part): (i64, i64) = {
        let r = db
            .query_one(
                "SELECT s.holds_version, p.holds_version FROM stores s JOIN store_parts p ON p.store = s.id
                 WHERE s.id = 'store-a' AND p.partition = 0",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert!(global > 0 && global == part, "{global} {part}");
    let unpartitioned: i64 = db
        .query_one(
            "SELECT (SELECT COUNT(*) FROM decisions WHERE partition <> 0) + (SELECT COUNT(*) FROM feed WHERE partition <> 0)
                  + (SELECT COUNT(*) FROM record_log WHERE partition <> 0)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(unpartitioned, 0);
}

/// The sync plane reaches the deciders: an agent's delta merged by any hub (here, straight
/// through `SyncPlane`) is applied by each partition's decider to its own SKUs only, its sale
/// fulfils the hold the store picked, and the merge log empties; rows applied again (a crash
/// before the applying commit) change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_partitions_decider_applies_the_sync_planes_merges_of_its_skus() {
    let (url, target, parts, db) = database(&["store-a"]).await;
    let (sql, opts) = (SqliteOptions::default(), EngineOptions::default());
    let now = shelfsync_node::now_ms();
    let mut engines = Vec::new();
    let mut skus = Vec::new();
    for p in parts.all() {
        let fence = take_lease(&db, p).await;
        let e = Engine::open_target(&target, sql, opts, Some(fence), None, p).await.unwrap();
        let sku = skus_of(parts, p, 1).remove(0);
        e.hub_change(restock(9_000 + u128::from(p), "store-a", std::slice::from_ref(&sku)), now).await.unwrap();
        engines.push(e);
        skus.push(sku);
    }
    // A standby of partition 2 follows its commits (warm) through all of it.
    let warm2 = Follower::start_partition(url.clone(), opts, 2);
    wait_until("the standby warm", DEADLINE, || async { warm2.cursor().is_some().then_some(()) }).await;
    // A reservation held at the store in partition 2, which the store then picks and sells.
    let held = engines[2].create_reservation(reserve(7_000, "store-a", &skus[2], 2), now).await.unwrap();
    let hold = held.view.allocations[0].hold;
    let agent = WriterId::new(NodeId::Store(store("store-a")), Incarnation::from_u64(3));
    let sales = |units: &dyn Fn(usize) -> u64| -> Vec<(Sku, WriterId, PnEntry)> {
        skus.iter().enumerate().map(|(i, s)| (s.clone(), agent.clone(), PnEntry { p: 0, n: units(i) })).collect()
    };
    let delta = AgentDelta {
        store: store("store-a"),
        peer: agent.clone(),
        entries: sales(&|i| if i == 2 { 2 } else { i as u64 + 1 }),
        rights: Vec::new(),
        fulfilled: vec![hold],
        upto: 4,
        lineage_base: None,
        lineage: None,
        pusher_boots: Vec::new(),
        at_ms: now,
    };
    let merged = syncplane::SyncPlane::connect(&url).await.unwrap().merge(parts, delta).await.unwrap();
    assert_eq!(merged.parts, parts.all().collect::<Vec<_>>(), "one row per partition");
    let log_rows = db.query("SELECT partition, store, seq, body FROM merge_log ORDER BY partition", &[]).await.unwrap();
    assert_eq!(log_rows.len(), usize::from(PARTS));

    for (p, e) in engines.iter().enumerate() {
        let applied = syncplane::apply_page(e, &db, p as Partition, 100).await.unwrap();
        assert_eq!(applied.len(), 1, "partition {p} applied its one row");
        assert_eq!(applied[0].changed.iter().map(|(s, _)| s).collect::<Vec<_>>(), vec![&skus[p]], "its SKU only");
    }
    let left: i64 = db.query_one("SELECT COUNT(*) FROM merge_log", &[]).await.unwrap().get(0);
    assert_eq!(left, 0, "the applying commits deleted the rows");

    async fn figures(e: &Engine, sku: Sku, now: i64) -> (i64, u64) {
        let a = e.availability(vec![sku], now).await.unwrap();
        let f = &a[0].1[0];
        (f.on_hand, f.held)
    }
    for (p, e) in engines.iter().enumerate() {
        let sold = if p == 2 { 2 } else { p as i64 + 1 };
        assert_eq!(
            figures(e, skus[p].clone(), now).await,
            (10 - sold, 0),
            "partition {p}: the sale counted, no hold left"
        );
        for (q, other) in skus.iter().enumerate().filter(|(q, _)| *q != p) {
            let a = e.availability(vec![other.clone()], now).await.unwrap();
            assert!(a[0].1.iter().all(|f| f.on_hand == 0), "partition {p} knows nothing of partition {q}'s {other}");
        }
    }
    // The standby rebuilds exactly what a cold load of partition 2 gives.
    let head = db.query_one("SELECT MAX(seq) FROM record_log WHERE partition = 2", &[]).await.unwrap().get::<_, i64>(0);
    wait_until("the standby caught up", DEADLINE, || async { (warm2.cursor() >= Some(head)).then_some(()) }).await;
    let warm = warm2.stop().await.unwrap();
    let opened = HubDb::open_partition(&target, sql, Load::Warm(Box::new(warm)), None, 2).await.unwrap();
    assert!(opened.loader.is_some(), "taken over warm");
    let warm = decider(opened, opts).snapshot();
    let cold = decider(HubDb::open_partition(&target, sql, Some(opts.feed_retain), None, 2).await.unwrap(), opts);
    // In a partitioned database agents resume from the stores' sequences (the sync plane's);
    // the decider's own numbering of the entries it merged is not used, and a cold load takes
    // the stored numbers instead. Everything else must be equal.
    fn unnumbered(mut s: shelfsync_hub_core::Snapshot) -> shelfsync_hub_core::Snapshot {
        for c in s.cells.values_mut() {
            c.entries.values_mut().for_each(|(_, seq)| *seq = 0);
        }
        for i in s.store_indexes.values_mut() {
            i.entries.iter_mut().for_each(|(seq, ..)| *seq = 0);
            i.entries.sort();
        }
        s.heads.1 = 0;
        s
    }
    assert_eq!(unnumbered(warm), unnumbered(cold.snapshot()), "warm and cold agree after the sync plane's merges");
    let r = engines[2].reservation(Uuid::from_u128(7_000)).await.unwrap().unwrap();
    assert_eq!(
        format!("{:?}", r.lines[0].allocations[0].status),
        "Fulfilled",
        "the store's sale of the held units fulfilled the hold: {r:?}"
    );

    // Applied again (the rows come back, as after a crash before the applying commit): nothing moves.
    let feed_before: i64 = db.query_one("SELECT COUNT(*) FROM feed", &[]).await.unwrap().get(0);
    for r in &log_rows {
        let (p, s, seq, body): (i16, String, i64, Vec<u8>) = (r.get(0), r.get(1), r.get(2), r.get(3));
        db.execute(
            "INSERT INTO merge_log (partition, store, kind, seq, body) VALUES ($1, $2, 0, $3, $4)",
            &[&p, &s, &seq, &body],
        )
        .await
        .unwrap();
    }
    for (p, e) in engines.iter().enumerate() {
        let again = syncplane::apply_page(e, &db, p as Partition, 100).await.unwrap();
        assert!(again.iter().all(|m| m.changed.is_empty() && m.holds_changed.is_empty()), "partition {p}: {again:?}");
        let sold = if p == 2 { 2 } else { p as i64 + 1 };
        assert_eq!(figures(e, skus[p].clone(), now).await, (10 - sold, 0));
    }
    let feed_after: i64 = db.query_one("SELECT COUNT(*) FROM feed", &[]).await.unwrap().get(0);
    assert_eq!(feed_after, feed_before, "no event for a merge applied twice");
}

/// A store's holds as any hub reads them from the database (`syncplane::holds_snapshot`): every
/// partition's open holds at the store, with their expiry, and a version that grows with a
/// change in any partition; the same as the deciders hold, through holds made, paid, extended
/// and cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn any_hub_reads_a_stores_holds_of_every_partition_from_the_database() {
    use shelfsync_hub_core::Action;
    let (_, target, parts, db) = database(&["store-a", "store-b"]).await;
    let (sql, opts) = (SqliteOptions::default(), EngineOptions::default());
    let now = shelfsync_node::now_ms();
    let (a, b) = (skus_of(parts, LEFT, 3), skus_of(parts, RIGHT, 3));
    let left = Engine::open_target(&target, sql, opts, Some(take_lease(&db, LEFT).await), None, LEFT).await.unwrap();
    let right = Engine::open_target(&target, sql, opts, Some(take_lease(&db, RIGHT).await), None, RIGHT).await.unwrap();
    left.hub_change(restock(1, "store-a", &a), now).await.unwrap();
    right.hub_change(restock(2, "store-a", &b), now).await.unwrap();
    right.hub_change(restock(3, "store-b", &b), now).await.unwrap();
    let check = |what: &'static str| {
        let (left, right, db) = (&left, &right, &db);
        async move {
            let (l, r) = (
                left.holds_snapshot(store("store-a")).await.unwrap(),
                right.holds_snapshot(store("store-a")).await.unwrap(),
            );
            let mut want: Vec<_> = l.holds.iter().chain(r.holds.iter()).cloned().collect();
            want.sort_by_key(|h| h.id);
            let got = syncplane::holds_snapshot(db, &store("store-a")).await.unwrap();
            assert_eq!(got.holds, want, "{what}: the holds of both partitions");
            assert_eq!(got.version, l.version + r.version, "{what}: the version is the partitions' sum");
            got
        }
    };
    // The hub writers' entries of the store, over both partitions, as an agent compares them.
    let mut both = left.hub_entries_digest(store("store-a")).await.unwrap();
    both.absorb(right.hub_entries_digest(store("store-a")).await.unwrap());
    let (read, head) = syncplane::hub_entries_digest(&db, &store("store-a")).await.unwrap();
    assert_eq!((read, read.count, head), (both, 6, 6), "six restocked entries, numbered 1..6");
    let empty = check("nothing held").await;
    assert!(empty.holds.is_empty());
    for (i, sku) in a.iter().enumerate() {
        left.create_reservation(reserve(100 + i as u128, "store-a", sku, 1), now).await.unwrap();
    }
    right.create_reservation(reserve(200, "store-a", &b[0], 2), now).await.unwrap();
    right.create_reservation(reserve(201, "store-b", &b[1], 1), now).await.unwrap();
    let held = check("four holds at store-a, one elsewhere").await;
    assert_eq!(held.holds.len(), 4);
    assert!(held.version > empty.version);
    left.act(Uuid::from_u128(100), Action::Commit, None, now).await.unwrap();
    left.act(Uuid::from_u128(101), Action::Release, None, now).await.unwrap();
    right.act(Uuid::from_u128(200), Action::Extend { ttl_secs: 3600 }, None, now).await.unwrap();
    let after = check("one paid, one cancelled, one extended").await;
    assert_eq!(after.holds.len(), 3);
    assert!(after.version > held.version);
    let paid = after.holds.iter().find(|h| h.reservation == Uuid::from_u128(100)).unwrap();
    assert_eq!((format!("{:?}", paid.status), paid.expires_at_ms), ("Committed".to_owned(), None));
    let extended = after.holds.iter().find(|h| h.reservation == Uuid::from_u128(200)).unwrap();
    assert_eq!(extended.expires_at_ms, Some(now + 3_600_000));
}

/// A store's journal through the sync plane: any hub stores an agent's batch numbered by the
/// store's journal sequence, shared with the events the partitions' hub writers record
/// (restocks), so an agent following that sequence gets every other writer's events once, in
/// order; the partitions hear of the SKUs flagged unknown (a conflict opens in the SKU's
/// partition) and of the tills' adjustments (the feed of that partition), once even when the
/// batch comes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stores_journal_goes_through_the_sync_plane_to_the_right_partitions() {
    use shelfsync_shared::journal::{EventFlag, EventKind, JournalEvent};
    use shelfsync_shared::wire::JournalBatch;
    let (url, target, parts, db) = database(&["store-a"]).await;
    let (sql, opts) = (SqliteOptions::default(), EngineOptions::default());
    let now = shelfsync_node::now_ms();
    let mut engines = Vec::new();
    for p in parts.all() {
        engines.push(Engine::open_target(&target, sql, opts, Some(take_lease(&db, p).await), None, p).await.unwrap());
    }
    let (sold, adjusted) = (skus_of(parts, 0, 1).remove(0), skus_of(parts, 1, 1).remove(0));
    let unknown: Sku = (0..).map(|i| format!("ZZ-{i}").parse::<Sku>().unwrap()).find(|s| parts.of(s) == 3).unwrap();
    engines[0].hub_change(restock(1, "store-a", std::slice::from_ref(&sold)), now).await.unwrap();
    engines[1].hub_change(restock(2, "store-a", std::slice::from_ref(&adjusted)), now).await.unwrap();

    let agent = WriterId::new(NodeId::Store(store("store-a")), Incarnation::from_u64(5));
    let event = |n: u128, kind: EventKind, sku: &Sku, delta: i64, flags: Vec<EventFlag>| JournalEvent {
        id: Uuid::from_u128(n),
        line: 0,
        kind,
        store: store("store-a"),
        sku: sku.clone(),
        delta,
        reason: (kind == EventKind::Adjustment).then(|| "damaged".to_owned()),
        occurred_at_ms: now,
        recorded_at_ms: now,
        writer: agent.clone(),
        flags,
    };
    let batch = JournalBatch {
        after: 0,
        upto: 3,
        events: vec![
            event(501, EventKind::Sale, &sold, -1, vec![]),
            event(502, EventKind::Adjustment, &adjusted, -2, vec![]),
            event(503, EventKind::Sale, &unknown, -1, vec![EventFlag::UnknownSku]),
        ],
    };
    let mut plane = syncplane::SyncPlane::connect(&url).await.unwrap();
    let stored = plane.append_journal(parts, &store("store-a"), &agent, batch.clone()).await.unwrap();
    assert_eq!(
        (stored.added, stored.parts.clone()),
        (3, vec![1, 3]),
        "the adjustment's and the unknown SKU's partitions"
    );
    let again = plane.append_journal(parts, &store("store-a"), &agent, batch).await.unwrap();
    assert_eq!((again.added, again.parts.len(), again.head), (0, 0, stored.head), "a resent batch stores nothing");

    // Another writer of the store (a second agent) follows the store's journal sequence.
    let all = syncplane::read_journal(&db, &store("store-a"), None, 0, 100).await.unwrap();
    let ids: Vec<u128> = all.events.iter().map(|e| e.id.as_u128()).collect();
    assert_eq!(ids.len(), 5, "two restocks by the partitions' hub writers and three of the agent: {ids:?}");
    assert_eq!(&ids[2..], &[501, 502, 503], "in the order stored");
    assert_eq!(all.upto, stored.head);
    let others = syncplane::read_journal(&db, &store("store-a"), Some(&agent), 0, 100).await.unwrap();
    assert_eq!(others.events.len(), 2, "an agent is not sent its own events");
    let paged = syncplane::read_journal(&db, &store("store-a"), None, 0, 2).await.unwrap();
    let rest = syncplane::read_journal(&db, &store("store-a"), None, paged.upto, 100).await.unwrap();
    let resumed: Vec<u128> = paged.events.iter().chain(rest.events.iter()).map(|e| e.id.as_u128()).collect();
    assert_eq!(resumed, ids, "resuming from a page's end misses and repeats nothing");

    // The partitions apply what concerns them.
    for (p, e) in engines.iter().enumerate() {
        syncplane::apply_page(e, &db, p as Partition, 100).await.unwrap();
    }
    let left: i64 = db.query_one("SELECT COUNT(*) FROM merge_log", &[]).await.unwrap().get(0);
    assert_eq!(left, 0);
    let filter = |sku: &Sku| shelfsync_hub_core::ConflictFilter {
        store: None,
        sku: Some(sku.clone()),
        status: None,
        after: None,
        limit: 10,
    };
    let conflicts = engines[3].conflicts(filter(&unknown)).await.unwrap();
    assert_eq!(conflicts.len(), 1, "an unknown_sku conflict in the SKU's partition: {conflicts:?}");
    assert!(engines[0].conflicts(filter(&unknown)).await.unwrap().is_empty(), "and nowhere else");
    async fn kinds(e: &Engine) -> Vec<String> {
        e.changes_after(0, 100).await.unwrap().into_iter().map(|c| c.kind).collect()
    }
    assert!(
        kinds(&engines[1]).await.contains(&"adjustment_recorded".to_owned()),
        "the adjustment reached partition 1's feed"
    );
    assert!(!kinds(&engines[0]).await.contains(&"adjustment_recorded".to_owned()));
}
