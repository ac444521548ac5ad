//! Sync benchmarks: end-to-end propagation latency, a burst of one sale at every store, catch-up after a long offline period (next
//! to automerge syncing the same changes as `Counter` increments), and hub merge throughput (next to
//! a raw baseline: the same rows as batched SQLite upserts, `SHELFSYNC_BENCH_REPS` runs of each).
//!
//! `cargo bench -p shelfsync-tests --bench sync` (set `SHELFSYNC_BENCH_QUICK=1` for a smoke run).
//! Everything runs in this process on loopback sockets; figures are medians where rounds repeat.
//! The machine is shared: compare figures within one run.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use automerge::sync::SyncDoc;
use automerge::transaction::Transactable;
use automerge::{AutoCommit, ReadDoc, ScalarValue, ROOT};
use serde_json::json;
use shelfsync_agent::ledger::{self, Change, Line, RecordRequest};
use shelfsync_node::config::Synchronous;
use shelfsync_shared::wire::Delta;
use shelfsync_shared::{Incarnation, NodeId, PnEntry, Sku, WriterId};
use shelfsync_tests::inproc::Chain;
use uuid::Uuid;

fn quick() -> bool {
    std::env::var_os("SHELFSYNC_BENCH_QUICK").is_some()
}

/// `SHELFSYNC_BENCH_ONLY=burst` (or `propagation`, `catch-up`, `automerge`, `merge`) runs one section.
fn section(name: &str) -> bool {
    std::env::var("SHELFSYNC_BENCH_ONLY").map_or(true, |only| only == name)
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1e3
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Latencies of one propagation run: the whole way, and its two legs.
struct Propagation {
    samples: usize,
    /// Sale sent → committed at the hub: p50, p99.
    total: (f64, f64),
    /// Sale sent → the agent's answer (its own commit, fsync included): p50, p99.
    local: (f64, f64),
    /// The agent's answer → committed at the hub (sync, the hub's decision and commit): p50, p99.
    sync: (f64, f64),
}

/// Sale sent to an agent's API → the new on_hand committed at the hub (the hub's stock event).
async fn propagation(n: usize, rounds: usize) -> anyhow::Result<Propagation> {
    let chain = Chain::start(n, Synchronous::Full, Synchronous::Full).await?;
    chain.all_connected().await;
    let http = reqwest::Client::new();
    let urls: Vec<String> = (0..n).map(|i| format!("{}/v1/sales", chain.agent(i).url())).collect();
    let (mut samples, mut local, mut sync) = (Vec::new(), Vec::new(), Vec::new());
    let mut events = chain.hub.hub.stock_events();
    for round in 0..rounds {
        let expected = -(round as i64 + 1);
        let started: Arc<std::sync::Mutex<HashMap<String, (Instant, Option<Instant>)>>> = Arc::default();
        let mut tasks = Vec::new();
        for (i, url) in urls.iter().enumerate() {
            let (http, url, started, store) = (http.clone(), url.clone(), started.clone(), chain.stores[i].to_string());
            tasks.push(tokio::spawn(async move {
                let body = json!({"id": Uuid::now_v7(), "lines": [{"sku": "P", "qty": 1}]});
                started.lock().unwrap().insert(store.clone(), (Instant::now(), None));
                let r = http.post(url).json(&body).send().await.unwrap();
                assert_eq!(r.status(), 201);
                started.lock().unwrap().get_mut(&store).expect("started").1 = Some(Instant::now());
            }));
        }
        let mut seen = HashMap::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while seen.len() < n {
            let ev = tokio::time::timeout_at(deadline, events.recv()).await??;
            if ev.sku.as_str() == "P" && ev.on_hand == expected {
                seen.insert(ev.store.to_string(), Instant::now());
            }
        }
        for t in tasks {
            t.await?;
        }
        let started = started.lock().unwrap();
        for (store, at) in seen {
            let (t0, acked) = started[&store];
            let acked = acked.expect("answered");
            samples.push(at - t0);
            local.push(acked - t0);
            sync.push(at.saturating_duration_since(acked));
        }
    }
    for v in [&mut samples, &mut local, &mut sync] {
        v.sort();
    }
    let p = |v: &[Duration]| (pct(v, 0.5), pct(v, 0.99));
    let out = Propagation { samples: samples.len(), total: p(&samples), local: p(&local), sync: p(&sync) };
    chain.stop().await;
    Ok(out)
}

/// Resident set of this process, bytes.
fn rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:").map(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().unwrap_or(0))
        })
        .unwrap_or(0)
        * 1024
}

/// What a burst run measured.
struct Burst {
    /// First sale → every store's new on_hand committed at the hub: median, slowest round.
    total: (f64, f64),
    /// First sale → every agent's own commit done: median round.
    local: f64,
    /// Resident memory that connecting the stores added, per store (hub and agent side of each
    /// connection together: an upper bound of the hub's share).
    per_connection: u64,
}

/// One sale at every store at once (recorded straight into each agent's ledger, so the HTTP
/// client is not what is measured): time from the first sale to the last store's new on_hand
/// committed at the hub. Median over `rounds`, and the slowest round. The agents start without
/// sync and connect afterwards, so the memory the connections take can be read in between.
async fn burst(n: usize, rounds: usize) -> anyhow::Result<Burst> {
    let mut chain = Chain::start_with(n, Synchronous::Normal, Synchronous::Full, false).await?;
    let before = rss();
    for i in 0..n {
        chain.stop_agent(i).await?;
        chain.start_agent(i, true).await?;
    }
    chain.all_connected().await;
    let per_connection = rss().saturating_sub(before) / n as u64;
    let mut events = chain.hub.hub.stock_events();
    let (mut samples, mut locals) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let expected = -(round as i64 + 1);
        let dbs: Vec<_> = (0..n).map(|i| chain.agent(i).db.clone()).collect();
        let started = Instant::now();
        let mut recorded = Vec::with_capacity(n);
        for db in dbs {
            recorded.push(tokio::spawn(async move {
                let lines = vec![Line { sku: "B".parse().unwrap(), qty: 1 }];
                let req = RecordRequest {
                    id: Uuid::now_v7(),
                    key: None,
                    change: Change::Sale { lines },
                    occurred_at_ms: None,
                };
                ledger::record(&db, req).await.unwrap();
                Instant::now()
            }));
        }
        let mut pending: std::collections::HashSet<String> = chain.stores.iter().map(|s| s.to_string()).collect();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while !pending.is_empty() {
            let ev = tokio::time::timeout_at(deadline, events.recv()).await??;
            if ev.sku.as_str() == "B" && ev.on_hand == expected {
                pending.remove(ev.store.as_str());
            }
        }
        samples.push(started.elapsed());
        let mut last = started;
        for r in recorded {
            last = last.max(r.await?);
        }
        locals.push(last - started);
    }
    samples.sort();
    locals.sort();
    let out = Burst { total: (pct(&samples, 0.5), pct(&samples, 1.0)), local: pct(&locals, 0.5), per_connection };
    chain.stop().await;
    Ok(out)
}

struct CatchUp {
    sales: usize,
    skus: usize,
    counters_ms: f64,
    journal_ms: f64,
    state_bytes: u64,
    journal_bytes: u64,
    udp_bytes: u64,
}

/// An agent offline for `sales` sales over `skus` SKUs comes back: time until the hub's stock is
/// exact, time until the journal is complete, and bytes on the wire.
async fn catch_up(sales: usize, skus: usize) -> anyhow::Result<CatchUp> {
    let mut chain = Chain::start(1, Synchronous::Normal, Synchronous::Full).await?;
    chain.all_connected().await;
    chain.stop_agent(0).await?;
    chain.start_agent(0, false).await?;
    let names: Vec<Sku> = (0..skus).map(|i| format!("C-{i:06}").parse().unwrap()).collect();
    let lines_per_request = 100;
    let requests = sales / lines_per_request;
    let db = chain.agent(0).db.clone();
    let workers = 16;
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (db, names) = (db.clone(), names.clone());
        tasks.push(tokio::spawn(async move {
            for k in (w..requests).step_by(workers) {
                let lines = (0..lines_per_request)
                    .map(|j| Line { sku: names[(k * lines_per_request + j) % names.len()].clone(), qty: 1 })
                    .collect();
                let req = RecordRequest {
                    id: Uuid::now_v7(),
                    key: None,
                    change: Change::Sale { lines },
                    occurred_at_ms: None,
                };
                ledger::record(&db, req).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let per_sku = (sales / skus) as i64;
    chain.stop_agent(0).await?;

    let storage = chain.hub.hub.storage.clone();
    let start = Instant::now();
    chain.start_agent(0, true).await?;
    // Counters: every SKU at the hub reaches −per_sku.
    loop {
        let rows = storage.stock_of(names.clone()).await?;
        if rows.len() == skus && rows.iter().all(|r| r.on_hand == -per_sku) {
            break;
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(600), "counters did not converge");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let counters_ms = start.elapsed().as_secs_f64() * 1e3;
    let state_bytes_at_counters = {
        let f = &chain.agent(0).sync_stats.frames;
        f.sent_state.load(std::sync::atomic::Ordering::Relaxed)
            + f.received_state.load(std::sync::atomic::Ordering::Relaxed)
    };
    loop {
        if storage.journal_count(Some(chain.stores[0].clone())).await? as usize >= sales {
            break;
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(1200), "journal did not complete");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let journal_ms = start.elapsed().as_secs_f64() * 1e3;
    let stats = &chain.agent(0).sync_stats;
    let (tx, rx) = stats.udp_bytes();
    let journal_bytes = stats.frames.sent_journal.load(std::sync::atomic::Ordering::Relaxed);
    let out = CatchUp {
        sales,
        skus,
        counters_ms,
        journal_ms,
        state_bytes: state_bytes_at_counters,
        journal_bytes,
        udp_bytes: tx + rx,
    };
    chain.stop().await;
    Ok(out)
}

/// The same offline period as automerge `Counter` increments: one document, one counter per SKU,
/// a change per 100 increments (one POS request), then automerge's sync protocol to a replica that
/// had the document before the store went offline.
fn automerge_catch_up(sales: usize, skus: usize) -> anyhow::Result<(f64, u64, f64)> {
    let names: Vec<String> = (0..skus).map(|i| format!("C-{i:06}")).collect();
    let mut store = AutoCommit::new();
    for n in &names {
        store.put(ROOT, n.as_str(), ScalarValue::counter(0))?;
    }
    store.commit();
    let mut hub = store.fork();
    let record = Instant::now();
    for k in 0..sales / 100 {
        for j in 0..100 {
            store.increment(ROOT, names[(k * 100 + j) % skus].as_str(), -1)?;
        }
        store.commit();
    }
    let record_ms = record.elapsed().as_secs_f64() * 1e3;
    let (mut s_store, mut s_hub) = (automerge::sync::State::new(), automerge::sync::State::new());
    let start = Instant::now();
    let mut bytes = 0u64;
    loop {
        let mut progressed = false;
        if let Some(m) = store.sync().generate_sync_message(&mut s_store) {
            let enc = m.encode();
            bytes += enc.len() as u64;
            hub.sync().receive_sync_message(&mut s_hub, automerge::sync::Message::decode(&enc)?)?;
            progressed = true;
        }
        if let Some(m) = hub.sync().generate_sync_message(&mut s_hub) {
            let enc = m.encode();
            bytes += enc.len() as u64;
            store.sync().receive_sync_message(&mut s_store, automerge::sync::Message::decode(&enc)?)?;
            progressed = true;
        }
        if !progressed {
            break;
        }
    }
    let sync_ms = start.elapsed().as_secs_f64() * 1e3;
    let check = hub.get(ROOT, names[0].as_str())?.and_then(|(v, _)| v.to_i64());
    anyhow::ensure!(check == Some(-((sales / skus) as i64)), "automerge replica has {check:?}");
    Ok((sync_ms, bytes, record_ms))
}

/// Deltas of 4096 fresh entries per store, applied straight to the hub's storage by `stores`
/// concurrent sessions (group commit), synchronous=FULL.
async fn merge_throughput(stores: usize, deltas_per_store: usize) -> anyhow::Result<f64> {
    let chain = Chain::start(stores, Synchronous::Normal, Synchronous::Full).await?;
    let storage = chain.hub.hub.storage.clone();
    // The agents stay idle; the benchmark writes as if it were them, with fresh writers.
    let skus: Vec<Sku> = (0..4096).map(|i| format!("M-{i:05}").parse().unwrap()).collect();
    // An agent's QUIC session is what makes the hub's decider learn a store the admin CLI added;
    // writing as the agents without their sessions, the benchmark tells it directly (untimed).
    storage.sync_stores().await?;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..stores {
        let (storage, skus, store) = (storage.clone(), skus.clone(), chain.stores[s].clone());
        tasks.push(tokio::spawn(async move {
            let writer = WriterId::new(NodeId::Store(store.clone()), Incarnation::from_u64(0xbe9c + s as u64));
            for r in 0..deltas_per_store {
                let e = PnEntry { p: 0, n: r as u64 + 1 };
                let delta = Delta::build(0, (r as u64 + 1) * 4096, skus.iter().map(|k| (k, &writer, e)));
                storage
                    .apply_delta(store.clone(), writer.clone(), delta, None, Vec::new(), Default::default())
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let rate = (stores * deltas_per_store * 4096) as f64 / start.elapsed().as_secs_f64();
    chain.stop().await;
    Ok(rate)
}

/// The raw baseline for `merge_throughput(stores, deltas_per_store)`: the same (store, sku, writer,
/// p, n, seq) rows, as plain SQLite upserts into a table shaped like the hub's `counters` (same
/// primary key, `WITHOUT ROWID`, unique index on seq, index on (store, seq)), WAL and
/// synchronous=FULL, one transaction per 4096-row batch (one delta), one prepared
/// `INSERT ... ON CONFLICT DO UPDATE`. Deltas of the stores are interleaved as the hub's concurrent
/// sessions interleave them. Rows/s; what the hub adds per entry (reading the current entry,
/// stock, velocity, alerts, feed, peers, the channel to its writer thread) is the gap.
fn raw_upserts(stores: usize, deltas_per_store: usize) -> anyhow::Result<f64> {
    const BATCH: usize = 4096;
    let dir = tempfile::tempdir()?;
    let mut conn = rusqlite::Connection::open(dir.path().join("raw.db"))?;
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    anyhow::ensure!(mode.eq_ignore_ascii_case("wal"), "journal_mode is {mode}");
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.execute_batch(
        "CREATE TABLE counters (
            store TEXT NOT NULL, sku TEXT NOT NULL, writer TEXT NOT NULL,
            p INTEGER NOT NULL CHECK (p >= 0), n INTEGER NOT NULL CHECK (n >= 0), seq INTEGER NOT NULL,
            PRIMARY KEY (store, sku, writer)) WITHOUT ROWID;
         CREATE UNIQUE INDEX counters_seq ON counters(seq);
         CREATE INDEX counters_store_seq ON counters(store, seq);",
    )?;
    // The same strings the hub stores (store ids as `Chain` names them, writers as in `merge_throughput`).
    let skus: Vec<String> = (0..BATCH).map(|i| format!("M-{i:05}")).collect();
    let mut ids = Vec::new();
    for s in 0..stores {
        let store: shelfsync_shared::StoreId = format!("store-{s:03}").parse()?;
        let writer = WriterId::new(NodeId::Store(store.clone()), Incarnation::from_u64(0xbe9c + s as u64));
        ids.push((store.as_str().to_owned(), writer.to_string()));
    }
    let start = Instant::now();
    let mut seq: u64 = 1;
    for r in 0..deltas_per_store {
        for (store, writer) in &ids {
            let tx = conn.transaction()?;
            {
                let mut upsert = tx.prepare_cached(
                    "INSERT INTO counters (store, sku, writer, p, n, seq) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (store, sku, writer) DO UPDATE SET p = excluded.p, n = excluded.n, seq = excluded.seq",
                )?;
                for sku in &skus {
                    upsert.execute(rusqlite::params![store, sku, writer, 0u64, r as u64 + 1, seq])?;
                    seq += 1;
                }
            }
            tx.commit()?;
        }
    }
    let rate = (stores * deltas_per_store * BATCH) as f64 / start.elapsed().as_secs_f64();
    let rows: i64 = conn.query_row("SELECT COUNT(*) FROM counters", [], |r| r.get(0))?;
    anyhow::ensure!(rows as usize == stores * BATCH, "raw baseline holds {rows} rows");
    Ok(rate)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let q = quick();
    if section("propagation") {
        println!(
        "== end-to-end propagation: sale sent to an agent's API -> committed at the hub (synchronous=FULL both ends)"
    );
        println!(
            "{:<8} {:>8} {:>10} {:>10}   {:>22}   {:>22}",
            "agents", "samples", "p50 ms", "p99 ms", "agent commit p50/p99", "then to hub p50/p99"
        );
        for (n, rounds) in [(1, if q { 50 } else { 300 }), (50, if q { 4 } else { 20 })] {
            let p = propagation(n, rounds).await?;
            println!(
                "{n:<8} {:>8} {:>10.2} {:>10.2}   {:>10.2} / {:>9.2}   {:>10.2} / {:>9.2}",
                p.samples, p.total.0, p.total.1, p.local.0, p.local.1, p.sync.0, p.sync.1
            );
        }
    }

    if section("burst") {
        println!("\n== burst: one sale at every store at once -> all committed at the hub (agents NORMAL, hub FULL)");
        println!(
            "{:<8} {:>8} {:>14} {:>14} {:>20} {:>22}",
            "stores", "rounds", "median ms", "slowest ms", "agents done (med ms)", "KiB per connection"
        );
        // `SHELFSYNC_BENCH_BURST=1000:10` runs one size (for a profile).
        let bursts: Vec<(usize, usize)> = match std::env::var("SHELFSYNC_BENCH_BURST") {
            Ok(v) => {
                let (n, r) = v.split_once(':').expect("SHELFSYNC_BENCH_BURST=STORES:ROUNDS");
                vec![(n.parse()?, r.parse()?)]
            }
            Err(_) if q => vec![(50, 3)],
            Err(_) => vec![(200, 5), (1000, 3)],
        };
        for (n, rounds) in bursts {
            let b = burst(n, rounds).await?;
            println!(
                "{n:<8} {rounds:>8} {:>14.1} {:>14.1} {:>20.1} {:>22.1}",
                b.total.0,
                b.total.1,
                b.local,
                b.per_connection as f64 / 1024.0
            );
        }
    }

    if section("catch-up") {
        println!("\n== catch-up after an offline period (agent synchronous=NORMAL for the set-up; hub FULL)");
        println!(
            "{:<10} {:>7} {:>14} {:>16} {:>14} {:>16} {:>12}",
            "sales", "skus", "counters ms", "counter MiB", "journal ms", "journal MiB", "UDP MiB"
        );
        let sizes: &[usize] = if q { &[100_000] } else { &[100_000, 1_000_000] };
        for &sales in sizes {
            let c = catch_up(sales, 10_000).await?;
            println!(
                "{:<10} {:>7} {:>14.0} {:>16.2} {:>14.0} {:>16.2} {:>12.2}",
                c.sales,
                c.skus,
                c.counters_ms,
                mib(c.state_bytes),
                c.journal_ms,
                mib(c.journal_bytes),
                mib(c.udp_bytes)
            );
        }
    }

    if section("automerge") {
        println!(
            "\n== the same changes as automerge Counter increments (one change per 100 increments), sync to a replica"
        );
        println!("{:<10} {:>7} {:>14} {:>16} {:>16}", "sales", "skus", "sync ms", "sync MiB", "record ms");
        let am_sizes: &[usize] = if q { &[100_000] } else { &[100_000, 1_000_000] };
        for &sales in am_sizes {
            let (ms, bytes, record_ms) = automerge_catch_up(sales, 10_000)?;
            println!("{:<10} {:>7} {:>14.0} {:>16.2} {:>16.0}", sales, 10_000, ms, mib(bytes), record_ms);
        }
    }

    if section("merge") {
        // Repetitions (`SHELFSYNC_BENCH_REPS`, default 5): each runs the raw baseline, then the hub.
        let reps: usize = std::env::var("SHELFSYNC_BENCH_REPS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(if q { 1 } else { 5 })
            .max(1);
        println!(
            "\n== hub merge throughput (4096-entry deltas straight into storage, synchronous=FULL) next to raw SQLite \
             upserts of the same rows (one transaction per 4096, WAL, FULL); medians of {reps} runs [min-max]"
        );
        println!(
            "{:<8} {:>16} {:>20} {:>16} {:>20} {:>9}",
            "stores", "hub entries/s", "[min-max]", "raw rows/s", "[min-max]", "hub/raw"
        );
        for stores in [1, 8] {
            let deltas = if q { 3 } else { 20 };
            let (mut hub, mut raw) = (Vec::new(), Vec::new());
            for _ in 0..reps {
                raw.push(raw_upserts(stores, deltas)?);
                hub.push(merge_throughput(stores, deltas).await?);
            }
            let range = |v: &[f64]| {
                let (lo, hi) = v.iter().fold((f64::MAX, 0f64), |(lo, hi), &x| (lo.min(x), hi.max(x)));
                format!("[{lo:.0}-{hi:.0}]")
            };
            let (h, r) = (median(hub.clone()), median(raw.clone()));
            println!("{stores:<8} {h:>16.0} {:>20} {r:>16.0} {:>20} {:>8.1}%", range(&hub), range(&raw), 100.0 * h / r);
        }
        println!("(target: hub >= 50% of raw)");
    }

    Ok(())
}
