//! Durable hot-SKU reservations through the hub's HTTP API: 64 clients each reserving 1 unit of
//! one SKU as fast as they can. Prints reservations/s and latency percentiles (median of rounds).
//!
//! `cargo bench -p shelfsync-tests --bench reservations`; `scripts/bench-reservations.sh` runs it
//! next to PostgreSQL and Redis doing the same check-and-decrement on this machine.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use shelfsync_node::config::Synchronous;
use shelfsync_tests::inproc::Chain;
use uuid::Uuid;

fn pct(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1e3
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let quick = std::env::var_os("SHELFSYNC_BENCH_QUICK").is_some();
    let clients: usize = std::env::var("SHELFSYNC_BENCH_CLIENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(64);
    let secs = if quick { 1 } else { 5 };
    let rounds = if quick { 1 } else { 3 };
    let chain = Chain::start(1, Synchronous::Normal, Synchronous::Full).await?;
    let url = chain.hub.url();
    let token =
        shelfsync_hub::admin::create_token(&chain.dir.path().join("hub"), shelfsync_hub::storage::Role::Storefront)
            .await?;
    let admin = chain.admin_token.clone();
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{url}/v1/restocks"))
        .bearer_auth(&admin)
        .json(&json!({"id": Uuid::now_v7(), "store": chain.stores[0], "lines": [{"sku": "HOT", "qty": 100000}]}))
        .send()
        .await?;
    anyhow::ensure!(r.status() == 201, "restock failed: {}", r.status());
    let (mut rates, mut p50s, mut p99s) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        // Top up between rounds so the SKU never runs dry (reservations hold units).
        if round > 0 {
            http.post(format!("{url}/v1/restocks"))
                .bearer_auth(&admin)
                .json(
                    &json!({"id": Uuid::now_v7(), "store": chain.stores[0], "lines": [{"sku": "HOT", "qty": 100000}]}),
                )
                .send()
                .await?;
        }
        let deadline = Instant::now() + Duration::from_secs(secs);
        let start = Instant::now();
        let lat = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for _ in 0..clients {
            let (url, token, lat) = (url.clone(), token.clone(), lat.clone());
            tasks.push(tokio::spawn(async move {
                let http = reqwest::Client::new();
                let mut mine = Vec::new();
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let r = http
                        .post(format!("{url}/v1/reservations"))
                        .bearer_auth(&token)
                        .json(&json!({"id": Uuid::now_v7(), "lines": [{"sku": "HOT", "qty": 1}]}))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 201);
                    mine.push(t.elapsed());
                }
                lat.lock().unwrap().extend(mine);
            }));
        }
        for t in tasks {
            t.await?;
        }
        let elapsed = start.elapsed().as_secs_f64();
        let mut l = lat.lock().unwrap().clone();
        l.sort();
        rates.push(l.len() as f64 / elapsed);
        p50s.push(pct(&l, 0.5));
        p99s.push(pct(&l, 0.99));
    }
    println!(
        "shelfsync-hub  {clients} clients  {:>8.0} reservations/s  p50 {:>6.2} ms  p99 {:>6.2} ms  (HTTP + JSON + auth, SQLite synchronous=FULL, group commit)",
        median(rates),
        median(p50s),
        median(p99s)
    );
    chain.stop().await;
    Ok(())
}
