//! Start-up at scale: a hub database with `STORES × SKUS` (store, sku) counters (default
//! 100 × 10,000 = 1M), then the time to open it (read every row, rebuild the decider, start the
//! threads) and the resident memory the loaded decider holds per counter.
//!
//! `cargo bench -p shelfsync-hub --bench load` (`SHELFSYNC_BENCH_LOAD=STORES:SKUS` to resize).

use std::time::Instant;

use shelfsync_hub::engine::{Engine, EngineOptions};
use shelfsync_hub::sqlite::{SqliteOptions, SqliteStorage};
use shelfsync_hub_core::{EntryRecord, Record, StoreRecord};
use shelfsync_shared::{Incarnation, NodeId, PnEntry, StoreId, WriterId};

fn status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(field).map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0)))
        .unwrap_or(0)
}

fn main() {
    let (stores, skus) = match std::env::var("SHELFSYNC_BENCH_LOAD") {
        Ok(v) => {
            let (a, b) = v.split_once(':').expect("SHELFSYNC_BENCH_LOAD=STORES:SKUS");
            (a.parse().unwrap(), b.parse().unwrap())
        }
        Err(_) => (100usize, 10_000usize),
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hub.db");
    SqliteStorage::create(&path).unwrap();
    let t = Instant::now();
    {
        let mut conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL").unwrap();
        let mut seq = 0u64;
        for s in 0..stores {
            let store: StoreId = format!("store-{s:04}").parse().unwrap();
            let writer = WriterId::new(NodeId::Store(store.clone()), Incarnation::from_u64(s as u64 + 1));
            let mut records = vec![Record::Store(StoreRecord {
                id: store.clone(),
                added_at_ms: 1,
                revoked_at_ms: None,
                last_seen_ms: Some(1),
                holds_version: 0,
            })];
            for k in 0..skus {
                seq += 1;
                records.push(Record::Entry(EntryRecord {
                    store: store.clone(),
                    sku: format!("SKU-{k:06}").parse().unwrap(),
                    writer: writer.clone(),
                    entry: PnEntry { p: 100 + (k as u64 % 7), n: (k as u64 % 5) },
                    seq,
                }));
            }
            let tx = conn.transaction().unwrap();
            shelfsync_hub::persist::write(&tx, &records).unwrap();
            tx.commit().unwrap();
        }
    }
    let counters = stores * skus;
    let file = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    println!("== hub start-up with {counters} (store, sku) counters ({stores} stores x {skus} SKUs)");
    println!(
        "set-up: wrote the rows in {:.1} s; database {:.0} MiB",
        t.elapsed().as_secs_f64(),
        file as f64 / 1048576.0
    );
    let before = status_kib("VmRSS:");
    let t = Instant::now();
    let engine = Engine::open(&path, SqliteOptions::default(), EngineOptions::default()).unwrap();
    let load = t.elapsed();
    // Let the allocator hand back what loading used transiently (the record list).
    let after = status_kib("VmRSS:");
    let peak = status_kib("VmHWM:");
    let per = (after.saturating_sub(before) * 1024) as f64 / counters as f64;
    println!("{:<28} {:>12}", "load (open + rebuild) ms", load.as_millis());
    println!("{:<28} {:>12.0}", "resident after load MiB", after as f64 / 1024.0);
    println!("{:<28} {:>12.0}", "of which the decider MiB", after.saturating_sub(before) as f64 / 1024.0);
    println!("{:<28} {:>12.0}", "bytes per counter", per);
    println!("{:<28} {:>12.0}", "peak resident MiB", peak as f64 / 1024.0);
    drop(engine);
}
