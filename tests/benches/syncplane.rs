//! The sync plane (`hub/src/syncplane.rs`) on one durable PostgreSQL server (fsync and
//! synchronous commit on), next to the same rows upserted as plain SQL, in one run:
//!
//! 1. agents' deltas (20 entries each, of 2 000 SKUs over 6 partitions) merged through 1, 2, 4
//!    and 8 connections (as several hubs would), each connection for its own stores: does it
//!    scale with connections, since only a store's own rows order its merges?
//! 2. the same deltas as one plain `INSERT … ON CONFLICT DO UPDATE SET p = GREATEST(…)` each
//!    (the CRDT merge alone: no writer row, no store sequence, no merge log);
//! 3. 8 connections merging into ONE store (8 agents of a store, or a hot store through several
//!    hubs): they wait on the store's sequence row.
//!
//! `cargo bench -p shelfsync-tests --bench syncplane` (`SHELFSYNC_BENCH_QUICK=1`: 1 s rounds).

use std::time::{Duration, Instant};

use shelfsync_hub::db::{HubDb, Target};
use shelfsync_hub::syncplane::{AgentDelta, SyncPlane};
use shelfsync_hub_core::Partitions;
use shelfsync_shared::id::{Incarnation, NodeId};
use shelfsync_shared::{PnEntry, Sku, StoreId, WriterId};

#[path = "../src/bin/reserve-load/load.rs"]
#[allow(dead_code)]
mod load;

const SKUS: usize = 2000;
const ENTRIES: usize = 20;

fn delta(store: usize, writer: u64, round: u64, salt: usize) -> AgentDelta {
    let st: StoreId = format!("store-{store}").parse().unwrap();
    let w = WriterId::new(NodeId::Store(st.clone()), Incarnation::from_u64(writer));
    let entries = (0..ENTRIES)
        .map(|i| {
            let sku: Sku = format!("SKU-{:05}", (salt * 7919 + i * 101) % SKUS).parse().unwrap();
            (sku, w.clone(), PnEntry { p: round + 100, n: round })
        })
        .collect();
    AgentDelta {
        store: st,
        peer: w,
        entries,
        fulfilled: Vec::new(),
        rights: Vec::new(),
        upto: round,
        lineage_base: None,
        lineage: None,
        pusher_boots: Vec::new(),
        at_ms: 1_700_000_000_000,
    }
}

/// `conns` connections merging back to back for `secs`; connection `c` sends deltas of store
/// `store(c)` as writer `c`. Plain: the bare upsert instead of the sync plane.
async fn round(url: &str, parts: Partitions, conns: usize, secs: u64, one_store: bool, plain: bool) -> load::Round {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..conns {
        let url = url.to_owned();
        tasks.spawn(async move {
            let db = shelfsync_tests::pg::connect(&url).await;
            let mut plane = SyncPlane::connect(&url).await.unwrap();
            let upsert = db
                .prepare(
                    "INSERT INTO plain_counters (store, sku, writer, p, n)
                     SELECT $1, s, w, p, n FROM unnest($2::text[], $3::text[], $4::int8[], $5::int8[]) AS u(s, w, p, n)
                     ON CONFLICT (store, sku, writer) DO UPDATE SET
                        p = GREATEST(plain_counters.p, excluded.p), n = GREATEST(plain_counters.n, excluded.n)",
                )
                .await
                .unwrap();
            let mut lat = Vec::new();
            let mut n = 0u64;
            // A fresh writer per round, so every delta grows every entry it brings.
            let writer = rand::random::<u32>() as u64 * 64 + c as u64;
            while Instant::now() < deadline {
                n += 1;
                let store = if one_store { 0 } else { c };
                let d = delta(store, writer, n, n as usize * 31 + c);
                let t = Instant::now();
                if plain {
                    let skus: Vec<String> = d.entries.iter().map(|(s, ..)| s.to_string()).collect();
                    let ws: Vec<String> = d.entries.iter().map(|(_, w, _)| w.to_string()).collect();
                    let ps: Vec<i64> = d.entries.iter().map(|(.., e)| e.p as i64).collect();
                    let ns: Vec<i64> = d.entries.iter().map(|(.., e)| e.n as i64).collect();
                    db.execute(&upsert, &[&d.store.as_str(), &skus, &ws, &ps, &ns]).await.unwrap();
                } else {
                    plane.merge(parts, d).await.unwrap();
                }
                lat.push(t.elapsed());
            }
            lat
        });
    }
    let mut all = Vec::new();
    while let Some(l) = tasks.join_next().await {
        all.extend(l.unwrap());
    }
    let elapsed = start.elapsed();
    all.sort();
    let pct = |p: f64| all[((all.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1e3;
    load::Round { rate: all.len() as f64 / elapsed.as_secs_f64(), p50_ms: pct(0.5), p99_ms: pct(0.99) }
}

fn line(label: &str, conns: usize, rounds: &[load::Round], note: &str) -> String {
    let rate = load::median(rounds.iter().map(|r| r.rate).collect());
    let p50 = load::median(rounds.iter().map(|r| r.p50_ms).collect());
    let p99 = load::median(rounds.iter().map(|r| r.p99_ms).collect());
    format!(
        "{label:<14}{conns} conn  {rate:>7.0} deltas/s ({:>7.0} entries/s)  p50 {p50:>6.2} ms  p99 {p99:>6.2} ms  ({note})",
        rate * ENTRIES as f64
    )
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let (_, secs, rounds) = load::params();
    shelfsync_tests::pg::set_durable(true);
    let url = shelfsync_tests::pg::fresh_database().await;
    let parts = Partitions::new(6).unwrap();
    HubDb::create(&Target::Postgres(url.clone()), parts).await.unwrap();
    let db = shelfsync_tests::pg::connect(&url).await;
    db.batch_execute(
        "CREATE TABLE plain_counters (store TEXT NOT NULL, sku TEXT NOT NULL, writer TEXT NOT NULL,
         p BIGINT NOT NULL, n BIGINT NOT NULL, PRIMARY KEY (store, sku, writer))",
    )
    .await
    .unwrap();
    println!(
        "agents' deltas of {ENTRIES} entries, one PostgreSQL server (fsync on, synchronous_commit on), \
         6 partitions, medians of {rounds} rounds of {secs} s:"
    );
    for conns in [1, 2, 4, 8] {
        let mut sync = Vec::new();
        let mut plain = Vec::new();
        for _ in 0..rounds {
            sync.push(round(&url, parts, conns, secs, false, false).await);
            plain.push(round(&url, parts, conns, secs, false, true).await);
        }
        println!("  {}", line("sync plane", conns, &sync, "a store per connection"));
        println!("  {}", line("plain upsert", conns, &plain, "the same rows, GREATEST, autocommit"));
    }
    let mut hot = Vec::new();
    for _ in 0..rounds {
        hot.push(round(&url, parts, 8, secs, true, false).await);
    }
    println!("  {}", line("sync plane", 8, &hot, "ONE store, 8 writers: they take turns on its sequence row"));
    // The merge log is what the deciders would have applied and deleted.
    let left: i64 = db.query_one("SELECT COUNT(*) FROM merge_log", &[]).await.unwrap().get(0);
    println!("  merge-log rows written (a decider would apply and delete them): {left}");
}
