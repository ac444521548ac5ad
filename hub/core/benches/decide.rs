//! How fast the decider decides, in memory, with no storage: reservations on one hot SKU spread
//! over 50 stores (reserve, then commit or release), and merges of store deltas (one changed
//! entry per SKU, with the velocity, alert, feed and reconciliation work each brings).
//!
//! `cargo bench -p shelfsync-hub-core --bench decide`. Medians of 5 rounds; the machine is shared.

use std::time::Instant;

use shelfsync_hub_core::{Action, Command, Config, Decider, HubChange, HubChangeRequest, QtyLine, ReservationRequest};
use shelfsync_shared::{Incarnation, NodeId, PnEntry, Sku, StoreId, WriterId};
use uuid::Uuid;

const STORES: usize = 50;

fn store(i: usize) -> StoreId {
    format!("store-{i:03}").parse().unwrap()
}

fn decider() -> Decider {
    let hub = WriterId::new(NodeId::Hub, Incarnation::from_u64(1));
    let mut d = Decider::new(Config::new(hub), 7);
    for i in 0..STORES {
        d.apply(Command::AddStore { store: store(i) }, 0).unwrap();
    }
    d.take_records();
    d
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Reserve one unit of a hot SKU, then commit every other one and release the rest.
fn reservations(n: usize) -> f64 {
    let mut d = decider();
    let hot: Sku = "HOT".parse().unwrap();
    for i in 0..STORES {
        let lines = vec![QtyLine { sku: hot.clone(), qty: 100_000 }];
        let req = HubChangeRequest {
            id: Uuid::from_u128(i as u128 + 1),
            key: None,
            change: HubChange::Restock { store: store(i), lines },
            reason: None,
        };
        d.apply(Command::HubChange(req), 1).unwrap();
    }
    d.take_records();
    let mut records = 0usize;
    let start = Instant::now();
    for i in 0..n {
        let id = Uuid::from_u128(1 << 64 | i as u128);
        let req = ReservationRequest {
            id,
            key: None,
            lines: vec![QtyLine { sku: hot.clone(), qty: 1 }],
            ttl_secs: 900,
            pickup_store: None,
            customer: None,
            channel: None,
        };
        d.apply(Command::Reserve(req), 2 + i as i64).unwrap();
        let action = if i % 2 == 0 { Action::Commit } else { Action::Release };
        d.apply(Command::Act { id, action, key: None }, 2 + i as i64).unwrap();
        records += d.take_records().len();
    }
    let secs = start.elapsed().as_secs_f64();
    std::hint::black_box(records);
    n as f64 / secs
}

/// Deltas of `per` entries (one per SKU) from every store in turn, on-hand going down.
fn merges(rounds: usize, per: usize) -> f64 {
    let mut d = decider();
    let skus: Vec<Sku> = (0..per).map(|k| format!("S-{k:05}").parse().unwrap()).collect();
    let writers: Vec<WriterId> =
        (0..STORES).map(|i| WriterId::new(NodeId::Store(store(i)), Incarnation::from_u64(9))).collect();
    let start = Instant::now();
    let mut entries_total = 0usize;
    for r in 0..rounds {
        for (i, writer) in writers.iter().enumerate() {
            let entries: Vec<(Sku, WriterId, PnEntry)> =
                skus.iter().map(|k| (k.clone(), writer.clone(), PnEntry { p: 100, n: r as u64 + 1 })).collect();
            entries_total += entries.len();
            d.apply(Command::Merge { store: store(i), entries, fulfilled: vec![], rights: vec![] }, 10 + r as i64)
                .unwrap();
            std::hint::black_box(d.take_records().len());
        }
    }
    entries_total as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let quick = std::env::var_os("SHELFSYNC_BENCH_QUICK").is_some();
    let (n, rounds) = if quick { (2_000, 2) } else { (50_000, 5) };
    let res = median((0..rounds).map(|_| reservations(n)).collect());
    println!("decider: reserve + commit/release on one hot SKU over {STORES} stores  {res:>12.0} reservations/s (median of {rounds})");
    let m = median((0..rounds).map(|_| merges(if quick { 2 } else { 10 }, 1000)).collect());
    println!("decider: merges of 1000-entry deltas from {STORES} stores             {m:>12.0} entries/s (median of {rounds})");
}
