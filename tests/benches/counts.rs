//! What ordering counts by `occurred_at` costs at the store (agent/src/counts.rs), straight on
//! the ledger (no HTTP), `synchronous=FULL`, with a SKU's history of 0, 10 000 and 100 000 sales:
//!
//! - a plain sale of a SKU never counted (the path every till takes);
//! - a sale of a counted SKU that happened after the count (one more index lookup);
//! - a sale backdated inside the count (the count takes it back out: a correction line);
//! - a count an hour late and a count on time, each the SKU's newest (they add what lies
//!   between the previous count and theirs);
//! - the first count of the SKU (once: it sums the SKU's whole history up to its time; one run).
//!
//! `cargo bench -p shelfsync-tests --bench counts` prints the median of 200 of each (per history);
//! the machine is shared, so compare figures of the same run only.

use std::time::Instant;

use shelfsync_agent::db::{Db, DbOptions};
use shelfsync_agent::ledger::{self, BatchRequest, Change, Line, RecordRequest};
use shelfsync_shared::{IdempotencyKey, Sku};
use uuid::Uuid;

const SAMPLES: usize = 200;

fn median_us(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

async fn timed(db: &Db, change: Change, at: Option<i64>) -> f64 {
    let t = Instant::now();
    ledger::record(db, RecordRequest { id: Uuid::now_v7(), key: None, change, occurred_at_ms: at }).await.unwrap();
    t.elapsed().as_secs_f64() * 1e6
}

fn sale(sku: &Sku) -> Change {
    Change::Sale { lines: vec![Line { sku: sku.clone(), qty: 1 }] }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick") || std::env::var_os("SHELFSYNC_BENCH_QUICK").is_some();
    let histories: &[usize] = if quick { &[0, 1_000] } else { &[0, 10_000, 100_000] };
    let samples = if quick { 20 } else { SAMPLES };
    println!("counts ordered by occurred_at, on the ledger (synchronous=FULL), median µs of {samples} each");
    println!(
        "{:>9} {:>12} {:>14} {:>15} {:>12} {:>12} {:>12}",
        "history", "plain sale", "counted, after", "backdated sale", "count", "late count", "first count"
    );
    for &history in histories {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        Db::create(&path, &"bench-store".parse().unwrap(), DbOptions::default()).unwrap();
        let db = Db::open(&path, DbOptions::default()).unwrap();
        let now = shelfsync_node::now_ms();
        let (plain, counted): (Sku, Sku) = ("PLAIN".parse().unwrap(), "COUNTED".parse().unwrap());
        // The history: `history` sales of each SKU over the last two hours, 100 per batch.
        for b in 0..history / 100 {
            let items = (0..100)
                .flat_map(|i| {
                    let at = now - 7_200_000 + ((b * 100 + i) as i64 * 7_000_000 / history.max(1) as i64);
                    [(sale(&plain), Some(at)), (sale(&counted), Some(at))]
                })
                .collect::<Vec<_>>();
            for chunk in items.chunks(100) {
                let key = IdempotencyKey::from_uuid(Uuid::now_v7());
                ledger::record_batch(&db, BatchRequest { key, items: chunk.to_vec() }).await.unwrap();
            }
        }
        // One count an hour and a half ago anchors COUNTED.
        let first = timed(&db, Change::Count { sku: counted.clone(), counted: 1_000_000 }, Some(now - 5_400_000)).await;
        let (mut a, mut b, mut c, mut d, mut e) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let n = 1_000_000;
        for _ in 0..samples {
            a.push(timed(&db, sale(&plain), None).await);
            b.push(timed(&db, sale(&counted), None).await);
            c.push(timed(&db, sale(&counted), Some(now - 6_000_000)).await);
        }
        // Late counts, each the newest so far (an hour and a half to an hour ago), then on time.
        for i in 0..samples {
            let at = now - 5_400_000 + 1 + (i as i64 * 1_800_000 / samples as i64);
            e.push(timed(&db, Change::Count { sku: counted.clone(), counted: n }, Some(at)).await);
        }
        for _ in 0..samples {
            d.push(timed(&db, Change::Count { sku: counted.clone(), counted: n }, None).await);
        }
        println!(
            "{:>9} {:>12.0} {:>14.0} {:>15.0} {:>12.0} {:>12.0} {:>12.0}",
            history,
            median_us(a),
            median_us(b),
            median_us(c),
            median_us(d),
            median_us(e),
            first
        );
    }
}
