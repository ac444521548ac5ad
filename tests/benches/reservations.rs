//! Durable hot-SKU reservations through the hub's HTTP API: 64 clients each reserving 1 unit of
//! one SKU as fast as they can. Prints reservations/s and latency percentiles (median of rounds).
//!
//! `cargo bench -p shelfsync-tests --bench reservations`; `scripts/bench-reservations.sh` runs it
//! next to PostgreSQL and Redis doing the same check-and-decrement on this machine.

use serde_json::json;
use shelfsync_node::config::Synchronous;
use shelfsync_tests::inproc::Chain;
use uuid::Uuid;

// The load generator, shared with the `reserve-load` binary that drives `limit-server`.
#[path = "../src/bin/reserve-load/load.rs"]
mod load;

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    // SHELFSYNC_BENCH_CLIENTS (64), SHELFSYNC_BENCH_SECS (5), SHELFSYNC_BENCH_ROUNDS (3); QUICK: 1 s, 1 round.
    let (clients, secs, rounds) = load::params();
    let chain = Chain::start(1, Synchronous::Normal, Synchronous::Full).await?;
    let url = chain.hub.url();
    let token =
        shelfsync_hub::admin::create_token(&chain.dir.path().join("hub"), shelfsync_hub::storage::Role::Storefront)
            .await?;
    let admin = chain.admin_token.clone();
    let http = reqwest::Client::new();
    let mut done = Vec::new();
    for _ in 0..rounds {
        // Stock for the round, topped up before every round so the SKU never runs dry (every
        // answer must be 201; reservations hold their units for the whole run): 50 000 units a
        // second of the round, in restocks of at most 100 000 (the most one line may carry).
        let (store, sku) = (&chain.stores[0], load::HOT_SKU);
        for _ in 0..(secs * 50_000).div_ceil(100_000) {
            let r = http
                .post(format!("{url}/v1/restocks"))
                .bearer_auth(&admin)
                .json(&json!({"id": Uuid::now_v7(), "store": store, "lines": [{"sku": sku, "qty": 100000}]}))
                .send()
                .await?;
            anyhow::ensure!(r.status() == 201, "restock failed: {}", r.status());
        }
        done.push(load::round(&url, &token, clients, secs).await?);
    }
    println!(
        "{}",
        load::line("shelfsync-hub", clients, &done, "HTTP + JSON + auth, SQLite synchronous=FULL, group commit")
    );
    chain.stop().await;
    Ok(())
}
