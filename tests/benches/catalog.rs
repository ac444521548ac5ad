//! Catalog benchmarks: a 20,000-SKU catalog reaching a store (time, bytes), the bytes one edit
//! sends afterwards, and the hub's memory for a 100,000-SKU catalog.
//!
//! `cargo bench -p shelfsync-tests --bench catalog`

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use shelfsync_hub::catalog::Edit;
use shelfsync_node::catalog::CatalogItem;
use shelfsync_node::config::Synchronous;
use shelfsync_shared::Sku;
use shelfsync_tests::inproc::Chain;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn items(n: usize) -> Vec<(Sku, Edit)> {
    (0..n)
        .map(|i| {
            (
                format!("SKU-{i:06}").parse().unwrap(),
                Edit::Put(CatalogItem {
                    name: format!("Product number {i}"),
                    barcodes: vec![format!("400{i:010}")],
                    safety_stock: (i % 4) as u64,
                    low_stock_threshold: 5,
                    max_per_customer: 0,
                    active: true,
                    escrow: Default::default(),
                }),
            )
        })
        .collect()
}

async fn catalog_rows(chain: &Chain) -> u64 {
    chain
        .agent(0)
        .db
        .read(|conn| {
            conn.query_row("SELECT COUNT(*) FROM catalog_items", [], |r| r.get::<_, u64>(0))
                .map_err(shelfsync_node::db::DbError::from)
        })
        .await
        .unwrap()
}

fn received(chain: &Chain) -> u64 {
    chain.agent(0).sync_stats.frames.received_journal.load(Relaxed)
}

async fn wait<F: std::future::Future<Output = bool>>(mut f: impl FnMut() -> F) {
    let until = Instant::now() + Duration::from_secs(600);
    while !f().await {
        assert!(Instant::now() < until, "timed out");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let quick = std::env::var_os("SHELFSYNC_BENCH_QUICK").is_some();
    let n = if quick { 2_000 } else { 20_000 };
    let mut chain = Chain::start(1, Synchronous::Normal, Synchronous::Normal).await?;
    chain.all_connected().await;
    chain.stop_agent(0).await?;
    let hub = chain.hub.hub.clone();
    let t = Instant::now();
    for batch in items(n).chunks(5_000) {
        hub.catalog.edit(hub.storage.as_ref(), batch.to_vec()).await?;
    }
    let import_ms = t.elapsed().as_secs_f64() * 1e3;
    // The store comes (back) with an empty catalog: everything must travel.
    chain.start_agent(0, true).await?;
    let t = Instant::now();
    wait(|| async { catalog_rows(&chain).await == n as u64 }).await;
    let reach_ms = t.elapsed().as_secs_f64() * 1e3;
    let initial_bytes = received(&chain);

    // One edit afterwards, once the initial exchange has gone quiet.
    let mut last = received(&chain);
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = received(&chain);
        if now == last {
            break;
        }
        last = now;
    }
    let before = received(&chain);
    let t = Instant::now();
    let sku: Sku = "SKU-000042".parse()?;
    hub.catalog
        .edit(
            hub.storage.as_ref(),
            vec![(
                sku.clone(),
                Edit::Patch(shelfsync_node::catalog::CatalogPatch {
                    name: Some("Renamed".into()),
                    ..Default::default()
                }),
            )],
        )
        .await?;
    hub.catalog_changed();
    let db = chain.agent(0).db.clone();
    wait(|| {
        let db = db.clone();
        async move {
            db.read(|conn| {
                conn.query_row("SELECT name FROM catalog_items WHERE sku = 'SKU-000042'", [], |r| r.get::<_, String>(0))
                    .map_err(shelfsync_node::db::DbError::from)
            })
            .await
            .map(|n| n == "Renamed")
            .unwrap_or(false)
        }
    })
    .await;
    let edit_ms = t.elapsed().as_secs_f64() * 1e3;
    // Let the automerge exchange finish (the store's reply and any last message).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let edit_bytes = received(&chain) - before;
    println!("catalog of {n} SKUs: hub import {import_ms:.0} ms; reaches a new store in {reach_ms:.0} ms with {:.2} MiB of catalog frames", initial_bytes as f64 / 1048576.0);
    println!("one edit afterwards: {edit_bytes} bytes hub -> store, visible at the store in {edit_ms:.1} ms");
    chain.stop().await;

    // Memory of the hub's catalog at 100,000 SKUs (resident set growth of this process while the
    // hub builds and holds the document; the allocator keeps some slack, so this is an upper bound).
    let big = if quick { 10_000 } else { 100_000 };
    let chain = Chain::start(0, Synchronous::Normal, Synchronous::Normal).await?;
    let hub = chain.hub.hub.clone();
    let rss0 = rss_kib();
    let t = Instant::now();
    for batch in items(big).chunks(10_000) {
        hub.catalog.edit(hub.storage.as_ref(), batch.to_vec()).await?;
    }
    let secs = t.elapsed().as_secs_f64();
    let rss1 = rss_kib();
    let saved = hub.catalog.saved_len().await;
    println!(
        "hub catalog of {big} SKUs: built in {secs:.1} s; resident set +{:.1} MiB ({:.0} bytes/SKU); saved document {:.1} MiB",
        (rss1.saturating_sub(rss0)) as f64 / 1024.0,
        (rss1.saturating_sub(rss0)) as f64 * 1024.0 / big as f64,
        saved as f64 / 1048576.0
    );
    chain.stop().await;
    Ok(())
}
