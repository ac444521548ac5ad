//! `shelfsync-hub demo`: a hub and three in-process stores over real QUIC on loopback, in a temp
//! dir. Seeds stock, sells, takes one store offline (it keeps selling), brings it back, and checks
//! that the hub converges to exactly what the stores recorded.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use rand::{RngExt, SeedableRng};
use serde_json::{json, Value};
use shelfsync_agent::bundle::Bundle;
use shelfsync_agent::client::ApiClient;
use shelfsync_agent::config::AgentConfig;
use shelfsync_agent::db::{Db, DbOptions};
use shelfsync_agent::server::RunningAgent;
use shelfsync_shared::StoreId;
use uuid::Uuid;

use crate::config::HubConfig;
use crate::storage::Role;
use crate::{admin, server};

const STORES: [&str; 3] = ["store-001", "store-002", "store-003"];
const SKUS: [&str; 4] = ["HSS-001", "HSS-002", "JKT-010", "MUG-100"];

async fn start_agent(dir: &Path, sync: bool) -> anyhow::Result<RunningAgent> {
    let mut c = AgentConfig::default();
    c.data_dir = dir.to_owned();
    c.api.listen = "127.0.0.1:0".parse()?;
    c.sync.enabled = sync;
    c.sync.backoff_ms_min = 100;
    c.sync.backoff_ms_max = 2000;
    Ok(shelfsync_agent::server::start(c).await?)
}

async fn wait_for(
    what: &str,
    deadline: Duration,
    mut f: impl AsyncFnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let until = tokio::time::Instant::now() + deadline;
    loop {
        if f().await? {
            return Ok(());
        }
        if tokio::time::Instant::now() > until {
            bail!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn sell(agent: &ApiClient, sku: &str, qty: u64) -> anyhow::Result<()> {
    agent.post("/v1/sales", &json!({"id": Uuid::now_v7(), "lines": [{"sku": sku, "qty": qty}]})).await?;
    Ok(())
}

/// Every store's on_hand per SKU as the agents see it, and as the hub sees it.
async fn views(hub: &ApiClient, agents: &[ApiClient]) -> anyhow::Result<(Vec<Vec<i64>>, Vec<Vec<i64>>)> {
    let mut at_agents = Vec::new();
    for a in agents {
        let mut row = Vec::new();
        for sku in SKUS {
            let v = a.get(&format!("/v1/stock/{sku}")).await.map(|v| v["on_hand"].as_i64().unwrap_or(0)).unwrap_or(0);
            row.push(v);
        }
        at_agents.push(row);
    }
    let mut at_hub = vec![vec![0; SKUS.len()]; STORES.len()];
    for (j, sku) in SKUS.iter().enumerate() {
        let v = hub.get(&format!("/v1/availability/{sku}")).await?;
        for s in v["stores"].as_array().into_iter().flatten() {
            if let Some(i) = STORES.iter().position(|x| Some(*x) == s["store"].as_str()) {
                at_hub[i][j] = s["on_hand"].as_i64().unwrap_or(0);
            }
        }
    }
    Ok((at_agents, at_hub))
}

/// Runs the demo until `shutdown` resolves, or for `for_secs` then exits (non-zero if the hub
/// did not converge).
pub async fn run(for_secs: Option<u64>, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    let tmp = tempfile::Builder::new().prefix("shelfsync-demo-").tempdir()?;
    let hub_dir = tmp.path().join("hub");
    admin::init(&hub_dir).await?;
    let admin_token = admin::create_token(&hub_dir, Role::Admin).await?;
    let storefront_token = admin::create_token(&hub_dir, Role::Storefront).await?;
    let mut cfg = HubConfig::default();
    cfg.data_dir = hub_dir.clone();
    cfg.quic.listen = "127.0.0.1:0".parse()?;
    cfg.http.listen = "127.0.0.1:0".parse()?;
    let hub = server::start(cfg).await?;
    let hub_api = ApiClient::new(hub.url(), Some(admin_token.clone()));

    let mut agents = Vec::new();
    let mut dirs = Vec::new();
    for s in STORES {
        let store: StoreId = s.parse()?;
        let bundle_dir = tmp.path().join(format!("{s}-bundle"));
        admin::add_store(&hub_dir, &store, &bundle_dir, &hub.quic_addr.to_string()).await?;
        let dir = tmp.path().join(s);
        Bundle::copy(&bundle_dir, &dir.join("bundle"))?;
        let db_path = dir.join("agent.db");
        tokio::task::spawn_blocking(move || Db::create(&db_path, &store, DbOptions::default())).await??;
        agents.push(Some(start_agent(&dir, true).await?));
        dirs.push(dir);
    }
    let client = |a: &Option<RunningAgent>| ApiClient::new(a.as_ref().expect("running").url(), None);
    let mut clients: Vec<ApiClient> = agents.iter().map(client).collect();

    println!("Shelfsync demo — hub and {} stores on loopback, data in {}", STORES.len(), tmp.path().display());
    println!("  hub API        {}", hub.url());
    println!("  dashboard      {}/  (paste the admin token)", hub.url());
    println!("  QUIC sync      {}", hub.quic_addr);
    for (s, c) in STORES.iter().zip(&clients) {
        println!("  {s} POS API {}", c.base());
    }
    println!("  admin token    {admin_token}");
    println!("  storefront token {storefront_token}");
    println!("try:  curl -H 'Authorization: Bearer {storefront_token}' {}/v1/availability/HSS-001", hub.url());
    println!("      curl -H 'Authorization: Bearer {admin_token}' {}/v1/stores", hub.url());
    println!("      cargo run -q -p shelfsync-agent -- --agent {} sell HSS-001 1", clients[0].base());

    // Head office restocks every store; the restocks travel down to the stores.
    for s in STORES {
        let lines: Vec<Value> = SKUS.iter().map(|sku| json!({"sku": sku, "qty": 50})).collect();
        hub_api
            .post("/v1/restocks", &json!({"id": Uuid::now_v7(), "store": s, "lines": lines, "reason": "opening stock"}))
            .await?;
    }
    wait_for("restocks to reach every store", Duration::from_secs(30), async || {
        let (a, h) = views(&hub_api, &clients).await?;
        Ok(a == h && a.iter().all(|row| row.iter().all(|v| *v == 50)))
    })
    .await?;
    println!("[demo] restocked 50 of each SKU at every store; the stores have them");

    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut sold = 0u64;
    for _ in 0..60 {
        let i = rng.random_range(0..STORES.len());
        sell(&clients[i], SKUS[rng.random_range(0..SKUS.len())], rng.random_range(1..=2)).await?;
        sold += 1;
    }
    println!("[demo] {sold} sales recorded at the stores");

    // store-003 loses its link to headquarters but keeps selling.
    let offline = 2;
    agents[offline].take().expect("running").stop().await?;
    agents[offline] = Some(start_agent(&dirs[offline], false).await?);
    clients[offline] = client(&agents[offline]);
    for _ in 0..40 {
        sell(&clients[offline], SKUS[rng.random_range(0..SKUS.len())], 1).await?;
    }
    let (a, h) = views(&hub_api, &clients).await?;
    println!(
        "[demo] {} is offline and sold 40 more; the hub still sees {:?}, the store {:?}",
        STORES[offline], h[offline], a[offline]
    );

    agents[offline].take().expect("running").stop().await?;
    agents[offline] = Some(start_agent(&dirs[offline], true).await?);
    clients[offline] = client(&agents[offline]);
    wait_for("the returning store to converge", Duration::from_secs(60), async || {
        let (a, h) = views(&hub_api, &clients).await?;
        Ok(a == h)
    })
    .await
    .context("the hub did not converge")?;
    let (a, _) = views(&hub_api, &clients).await?;
    println!("[demo] {} is back; the hub converged to exactly the stores' counts: {:?}", STORES[offline], a);

    // Keep trading in the background until stopped.
    let trade_clients = clients.clone();
    let trading = tokio::spawn(async move {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let i = rng.random_range(0..trade_clients.len());
            let sku = SKUS[rng.random_range(0..SKUS.len())];
            let _ = sell(&trade_clients[i], sku, 1).await;
        }
    });
    match for_secs {
        Some(s) => tokio::time::sleep(Duration::from_secs(s)).await,
        None => {
            println!("[demo] stores keep selling; press Ctrl-C to stop");
            shutdown.await;
        }
    }
    trading.abort();
    for a in agents.into_iter().flatten() {
        a.stop().await?;
    }
    hub.stop().await;
    println!("[demo] stopped");
    Ok(())
}
