//! The sync plane of a partitioned PostgreSQL database, below the processes: agents' deltas
//! merged by any hub straight into the database (`hub/src/syncplane.rs`). What an agent and a
//! partition's decider read back must hold every merged entry exactly once, whichever hubs
//! merged concurrently, and a cloned writer's second connection must not merge past the first.

use std::collections::BTreeMap;

use shelfsync_hub::db::{HubDb, Target};
use shelfsync_hub::storage::StorageError;
use shelfsync_hub::syncplane::{self, AgentDelta, SyncPlane};
use shelfsync_hub_core::Partitions;
use shelfsync_shared::id::{Incarnation, NodeId};
use shelfsync_shared::lineage::Checkpoint;
use shelfsync_shared::wire::DeltaLineage;
use shelfsync_shared::{PnEntry, Sku, StoreId, WriterId};

const PARTS: u16 = 4;

async fn database() -> (String, Partitions) {
    let url = shelfsync_tests::pg::fresh_database().await;
    let parts = Partitions::new(PARTS).unwrap();
    HubDb::create(&Target::Postgres(url.clone()), parts).await.unwrap();
    (url, parts)
}

async fn client(url: &str) -> tokio_postgres::Client {
    shelfsync_tests::pg::connect(url).await
}

async fn plane(url: &str) -> SyncPlane {
    SyncPlane::connect(url).await.unwrap()
}

fn store() -> StoreId {
    "store-1".parse().unwrap()
}

fn writer(n: u64) -> WriterId {
    WriterId::new(NodeId::Store(store()), Incarnation::from_u64(n))
}

fn sku(i: usize) -> Sku {
    format!("SKU-{i:03}").parse().unwrap()
}

fn delta(w: &WriterId, entries: Vec<(Sku, PnEntry)>, upto: u64) -> AgentDelta {
    AgentDelta {
        store: store(),
        peer: w.clone(),
        entries: entries.into_iter().map(|(s, e)| (s, w.clone(), e)).collect(),
        fulfilled: Vec::new(),
        rights: Vec::new(),
        upto,
        lineage_base: None,
        lineage: None,
        pusher_boots: Vec::new(),
        at_ms: 1_700_000_000_000,
    }
}

/// Every counter row of the store: (SKU, writer) → entry.
async fn stored(c: &tokio_postgres::Client) -> BTreeMap<(String, String), PnEntry> {
    c.query("SELECT sku, writer, p, n FROM counters WHERE store = 'store-1'", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| ((r.get(0), r.get(1)), PnEntry { p: r.get::<_, i64>(2) as u64, n: r.get::<_, i64>(3) as u64 }))
        .collect()
}

/// A delta is split by partition into the merge logs; merged again, or with entries that do not
/// grow, it changes nothing and logs nothing; a grown entry is logged once, in its partition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_is_merged_once_and_each_partition_logs_its_own_skus() {
    let (url, parts) = database().await;
    let mut sp = plane(&url).await;
    let c = client(&url).await;
    let w = writer(1);
    let entries: Vec<(Sku, PnEntry)> = (0..20).map(|i| (sku(i), PnEntry { p: 10 + i as u64, n: 1 })).collect();
    let mut d = delta(&w, entries.clone(), 20);
    d.fulfilled = vec![uuid::Uuid::from_u128(7)];
    let first = sp.merge(parts, d.clone()).await.unwrap();
    assert_eq!((first.grown.len(), first.head), (20, 20));
    let touched: Vec<u16> = parts.all().filter(|p| entries.iter().any(|(s, _)| parts.of(s) == *p)).collect();
    assert!(touched.len() > 1, "20 SKUs spread over several of {PARTS} partitions: {touched:?}");
    assert_eq!(first.parts, touched);
    for p in parts.all() {
        let log = syncplane::tail(&c, p, 100).await.unwrap();
        let want: Vec<&Sku> = entries.iter().filter(|(s, _)| parts.of(s) == p).map(|(s, _)| s).collect();
        if want.is_empty() {
            assert!(log.is_empty(), "partition {p} has none of these SKUs: {log:?}");
            continue;
        }
        assert_eq!(log.len(), 1, "partition {p}");
        let syncplane::LogRow { store: st, seq, part, .. } = &log[0];
        assert_eq!((st, *seq), (&store(), 20), "keyed by the store's sequence after the merge");
        assert_eq!(part.entries.iter().map(|(s, ..)| s).collect::<Vec<_>>(), want, "partition {p}");
        assert_eq!(part.fulfilled, vec![uuid::Uuid::from_u128(7)], "every part carries the fulfilled holds");
    }

    // Again, and stale: nothing changes, nothing is logged, the store's sequence stays.
    let again = sp.merge(parts, d).await.unwrap();
    assert_eq!((again.grown.len(), again.head, again.parts.len()), (0, 20, 0));
    let stale = delta(&w, vec![(sku(3), PnEntry { p: 1, n: 0 })], 21);
    assert_eq!(sp.merge(parts, stale).await.unwrap().grown.len(), 0);
    assert_eq!(stored(&c).await[&(sku(3).to_string(), w.to_string())], PnEntry { p: 13, n: 1 }, "never goes back");

    // The decider of sku(3)'s partition applies its row (and deletes it in that commit).
    let p3 = parts.of(&sku(3));
    c.execute(syncplane::APPLIED, &[&(p3 as i16), &"store-1", &syncplane::LogKind::Delta.col(), &20i64]).await.unwrap();
    assert!(syncplane::tail(&c, p3, 100).await.unwrap().is_empty(), "applied: nothing left to apply");

    // One entry grows: logged once, in its partition.
    let grown = delta(&w, vec![(sku(3), PnEntry { p: 13, n: 2 })], 22);
    let m = sp.merge(parts, grown).await.unwrap();
    assert_eq!((m.grown.len(), m.parts.clone()), (1, vec![p3]));
    let log = syncplane::tail(&c, p3, 100).await.unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].seq, m.head);
    assert_eq!(log[0].part.entries, vec![(sku(3), w.clone(), PnEntry { p: 13, n: 2 })]);
    assert!(m.head > 20, "the store's sequence moved on: {}", m.head);

    // What the agent reads back (another writer's view: this writer's own entries excluded).
    let page = syncplane::read_delta(&c, &store(), None, 0, 1000).await.unwrap();
    assert_eq!(page.entries.len(), 20);
    assert_eq!(page.upto, m.head);
    let mine = syncplane::read_delta(&c, &store(), Some(&w), 0, 1000).await.unwrap();
    assert!(mine.entries.is_empty(), "an agent is not sent its own entries");
    let (applied, _) = syncplane::peer(&c, &store(), &w).await.unwrap();
    assert_eq!(applied, 22, "the applied watermark is the last delta's");
}

/// Two connections of one writer (a cloned machine, on one hub or two) welcomed at the same
/// history: whichever merges first wins; the other waits on the writer's row and then fails
/// its compare-and-set instead of merging past the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_clones_second_connection_fails_instead_of_merging_past_the_first() {
    let (url, parts) = database().await;
    let w = writer(2);
    // The writer's row exists, and a third session holds it while both deltas arrive.
    plane(&url).await.merge(parts, delta(&w, Vec::new(), 0)).await.unwrap();
    let mut holder = client(&url).await;
    let hold = holder.transaction().await.unwrap();
    hold.execute("SELECT 1 FROM peers WHERE store = 'store-1' AND writer = $1 FOR UPDATE", &[&w.to_string()])
        .await
        .unwrap();
    let copy = |n: u64| {
        let (url, w) = (url.clone(), w.clone());
        tokio::spawn(async move {
            let mut d = delta(&w, vec![(sku(n as usize), PnEntry { p: n, n: 0 })], n);
            d.lineage_base = Some(Checkpoint::ZERO);
            let head = Checkpoint::ZERO.next(&uuid::Uuid::from_u128(n.into()), 0, &sku(n as usize), n as i64);
            d.lineage = Some(DeltaLineage { head, boots: Vec::new() });
            plane(&url).await.merge(parts, d).await
        })
    };
    let (a, b) = (copy(1), copy(2));
    // Both are waiting on the writer's row.
    let probe = client(&url).await;
    shelfsync_tests::procs::wait_until("both merges waiting on the writer's row", std::time::Duration::from_secs(20), || async {
        let waiting: i64 = probe
            .query_one("SELECT COUNT(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%INTO peers%'", &[])
            .await
            .unwrap()
            .get(0);
        (waiting == 2).then_some(())
    })
    .await;
    hold.rollback().await.unwrap();
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    let forked = [&a, &b].iter().filter(|r| matches!(r, Err(StorageError::Forked(_)))).count();
    assert_eq!((a.is_ok() as u8 + b.is_ok() as u8, forked), (1, 1), "one wins, one is refused: {a:?} {b:?}");
    let c = client(&url).await;
    assert_eq!(stored(&c).await.len(), 1, "only the winner's entry was merged");
}

/// Four writers of one store merging concurrently (four agents, through any hubs), while a
/// reader follows the store's sequence as an agent does: it reads every entry, once each time it
/// changed, never one below its watermark later, and ends with exactly the database's state;
/// each partition's log, read the same way, adds up to the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reader_following_the_store_sequence_misses_nothing_under_concurrent_merges() {
    let (url, parts) = database().await;
    let mut merges = tokio::task::JoinSet::new();
    for k in 0..4u64 {
        let url = url.clone();
        merges.spawn(async move {
            let mut sp = plane(&url).await;
            let w = writer(10 + k);
            for round in 1..=40u64 {
                let entries =
                    (0..5).map(|i| (sku(((round * 7 + i * 3 + k) % 30) as usize), PnEntry { p: round, n: round / 2 }));
                sp.merge(parts, delta(&w, entries.collect(), round)).await.unwrap();
            }
        });
    }
    let reader = client(&url).await;
    let mut seen: BTreeMap<(String, String), PnEntry> = BTreeMap::new();
    let (mut after, mut last_seq) = (0u64, 0u64);
    let mut read = async |seen: &mut BTreeMap<_, _>, after: &mut u64| loop {
        let page = syncplane::read_delta(&reader, &store(), None, *after, 50).await.unwrap();
        for (seq, s, w, e) in &page.entries {
            assert!(*seq > last_seq, "sequence {seq} after {last_seq}: read twice or out of order");
            last_seq = *seq;
            let slot: &mut PnEntry = seen.entry((s.to_string(), w.to_string())).or_default();
            *slot = slot.join(*e);
        }
        *after = page.upto;
        if page.entries.len() < 50 {
            return;
        }
    };
    while !merges.is_empty() {
        read(&mut seen, &mut after).await;
        if let Some(r) = merges.try_join_next() {
            r.unwrap();
        }
        tokio::task::yield_now().await;
    }
    read(&mut seen, &mut after).await;
    let c = client(&url).await;
    let want = stored(&c).await;
    assert_eq!(seen, want, "the reader holds exactly what was merged");
    let (digest, head) = syncplane::digest(&c, &store()).await.unwrap();
    assert_eq!((digest.count, head), (want.len() as u64, after));

    let mut logged: BTreeMap<(String, String), PnEntry> = BTreeMap::new();
    for p in parts.all() {
        let log = syncplane::tail(&c, p, 100_000).await.unwrap();
        let keys: Vec<(StoreId, u64)> = log.iter().map(|r| (r.store.clone(), r.seq)).collect();
        assert!(keys.windows(2).all(|w| w[0] < w[1]), "partition {p}'s log in each store's order");
        for syncplane::LogRow { part, .. } in log {
            for (s, w, e) in part.entries {
                assert_eq!(parts.of(&s), p, "{s} logged in partition {p}");
                let slot = logged.entry((s.to_string(), w.to_string())).or_default();
                *slot = slot.join(e);
            }
        }
    }
    assert_eq!(logged, want, "the partitions' logs add up to what was merged");
}

/// Wake-ups between hubs: a listener hears of a store's change once the transaction that made it
/// commits (a merge, here), never of one that rolled back; when its connection breaks it
/// reconnects and says Resync (it may have missed some), then hears again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_hears_of_commits_not_rollbacks_and_resyncs_after_a_break() {
    use shelfsync_hub::notify::{Notice, NOTIFY};
    let (url, parts) = database().await;
    let mut rx = shelfsync_hub::notify::listen(url.clone());
    let mut next = async || {
        tokio::time::timeout(std::time::Duration::from_secs(20), rx.recv())
            .await
            .expect("a notice within the deadline")
            .expect("the listener runs")
    };
    assert_eq!(next().await, Notice::Resync, "connected: follow everything from the tables");
    let mut c = client(&url).await;
    plane(&url).await.merge(parts, delta(&writer(1), vec![(sku(1), PnEntry { p: 1, n: 0 })], 1)).await.unwrap();
    assert_eq!(next().await, Notice::Store(store()), "another hub's merge");

    let tx = c.transaction().await.unwrap();
    tx.execute(NOTIFY, &[&"store-9"]).await.unwrap();
    tx.rollback().await.unwrap();
    c.execute(NOTIFY, &[&"store-2"]).await.unwrap();
    assert_eq!(next().await, Notice::Store("store-2".parse().unwrap()), "the rolled-back change was never heard");

    let killed: i64 = c
        .query_one(
            "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE application_name = 'shelfsync-listener' AND datname = current_database()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(killed, 1);
    assert_eq!(next().await, Notice::Resync, "after a break, re-read everything");
    c.execute(NOTIFY, &[&"store-3"]).await.unwrap();
    assert_eq!(next().await, Notice::Store("store-3".parse().unwrap()), "and it hears again");
}

/// Escrow rights ride the merge log to the partition deciding their SKU: a delta of rights alone
/// still logs a row (under a sequence of its own), each partition gets only its SKUs' rights,
/// and the deciders' rights rows come back for the store's agents in one snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rights_reach_the_partition_of_their_sku_and_come_back_from_the_rows() {
    use shelfsync_shared::RightsKind;
    let (url, parts) = database().await;
    let mut sp = plane(&url).await;
    let c = client(&url).await;
    let w = writer(1);
    let first = sp.merge(parts, delta(&w, vec![(sku(0), PnEntry { p: 10, n: 0 })], 1)).await.unwrap();
    let skus: Vec<Sku> = (0..12).map(sku).collect();
    let mut d = delta(&w, Vec::new(), 2);
    d.rights = skus.iter().map(|s| (s.clone(), w.clone(), RightsKind::Granted, 3)).collect();
    let m = sp.merge(parts, d.clone()).await.unwrap();
    assert!(m.grown.is_empty(), "no counter entry grew");
    assert!(m.head > first.head, "rights alone take a sequence of their own: {} after {}", m.head, first.head);
    let touched: Vec<u16> = parts.all().filter(|p| skus.iter().any(|s| parts.of(s) == *p)).collect();
    assert_eq!(m.parts, touched);
    for p in parts.all() {
        let rows = syncplane::tail(&c, p, 100).await.unwrap();
        let rights: Vec<&Sku> = rows.iter().flat_map(|r| r.part.rights.iter().map(|(s, ..)| s)).collect();
        let want: Vec<&Sku> = skus.iter().filter(|s| parts.of(s) == p).collect();
        assert_eq!(rights, want, "partition {p}");
        assert!(rows.iter().all(|r| r
            .part
            .rights
            .iter()
            .all(|(_, wr, k, t)| *wr == w && *k == RightsKind::Granted && *t == 3)));
    }

    // What the deciders record (a `rights` decision row per cell) is what the store's agents get.
    let key = format!("{}\u{1f}{}", store(), sku(4));
    let body = serde_json::to_string(&vec![(w.clone(), RightsKind::Granted, 3u64)]).unwrap();
    c.execute(
        "INSERT INTO decisions (partition, kind, key, body) VALUES ($1, 'rights', $2, $3)",
        &[&(parts.of(&sku(4)) as i16), &key, &body],
    )
    .await
    .unwrap();
    let back = syncplane::rights_entries(&c, &store()).await.unwrap();
    assert_eq!(back, vec![(sku(4), vec![(w.clone(), RightsKind::Granted, 3)])]);
    let other: StoreId = "store-10".parse().unwrap();
    assert!(
        syncplane::rights_entries(&c, &other).await.unwrap().is_empty(),
        "a store id that is a prefix of another's"
    );
}
