//! A hub and agents in this process, on real sockets (QUIC and HTTP on loopback), for benchmarks
//! and tests that need to look inside (storage, stock events, traffic counters).

use std::path::PathBuf;

use shelfsync_agent::config::AgentConfig;
use shelfsync_agent::db::{Db, DbOptions};
use shelfsync_agent::server::RunningAgent;
use shelfsync_hub::admin;
use shelfsync_hub::config::HubConfig;
use shelfsync_hub::server::RunningHub;
use shelfsync_hub::storage::Role;
use shelfsync_node::bundle::Bundle;
use shelfsync_node::config::Synchronous;
use shelfsync_shared::StoreId;

/// An in-process chain.
pub struct Chain {
    /// Everything lives here.
    pub dir: tempfile::TempDir,
    /// The hub.
    pub hub: RunningHub,
    /// An admin token.
    pub admin_token: String,
    /// Store ids.
    pub stores: Vec<StoreId>,
    /// Agents (None while stopped).
    pub agents: Vec<Option<RunningAgent>>,
    /// Durability of the agents.
    pub agent_sync: Synchronous,
}

impl Chain {
    /// A hub and `n` agents (`store-000`...), all connected.
    pub async fn start(n: usize, agent_sync: Synchronous, hub_sync: Synchronous) -> anyhow::Result<Chain> {
        Self::start_with(n, agent_sync, hub_sync, true).await
    }

    /// A hub and `n` agents, syncing (connected) or not.
    pub async fn start_with(
        n: usize,
        agent_sync: Synchronous,
        hub_sync: Synchronous,
        sync: bool,
    ) -> anyhow::Result<Chain> {
        let dir = tempfile::tempdir()?;
        let hub_dir = dir.path().join("hub");
        admin::init(&hub_dir).await?;
        let admin_token = admin::create_token(&hub_dir, Role::Admin).await?;
        let mut cfg = HubConfig::default();
        cfg.data_dir = hub_dir.clone();
        cfg.quic.listen = "127.0.0.1:0".parse()?;
        cfg.http.listen = "127.0.0.1:0".parse()?;
        cfg.storage.synchronous = hub_sync;
        cfg.log.filter = "warn".into();
        // Benchmarks drive the hub from one token as fast as it goes: load, not abuse.
        cfg.http.rate_limit = shelfsync_hub::config::HubRateLimits::raised(10_000_000);
        let hub = shelfsync_hub::server::start(cfg).await?;
        let mut chain = Chain { dir, hub, admin_token, stores: Vec::new(), agents: Vec::new(), agent_sync };
        for i in 0..n {
            let store: StoreId = format!("store-{i:03}").parse()?;
            let bundle = chain.dir.path().join(format!("bundle-{i}"));
            admin::add_store(&hub_dir, &store, &bundle, &chain.hub.quic_addr.to_string()).await?;
            let agent_dir = chain.agent_dir(i);
            Bundle::copy(&bundle, &agent_dir.join("bundle"))?;
            let db_path = agent_dir.join("agent.db");
            let s = store.clone();
            tokio::task::spawn_blocking(move || Db::create(&db_path, &s, DbOptions::default())).await??;
            chain.stores.push(store);
            chain.agents.push(None);
            chain.start_agent(i, sync).await?;
        }
        Ok(chain)
    }

    /// A store's data dir.
    pub fn agent_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("agent-{i}"))
    }

    /// Starts agent `i`, syncing or not.
    pub async fn start_agent(&mut self, i: usize, sync: bool) -> anyhow::Result<()> {
        let mut c = AgentConfig::default();
        c.data_dir = self.agent_dir(i);
        c.api.listen = "127.0.0.1:0".parse()?;
        c.storage.synchronous = self.agent_sync;
        c.sync.enabled = sync;
        c.sync.backoff_ms_min = 20;
        c.sync.backoff_ms_max = 500;
        c.api.rate_limit = shelfsync_agent::config::AgentRateLimits::raised(10_000_000);
        if let Some(ms) = std::env::var("SHELFSYNC_BENCH_COALESCE_MS").ok().and_then(|v| v.parse().ok()) {
            c.sync.coalesce_ms = ms;
        }
        self.agents[i] = Some(shelfsync_agent::server::start(c).await?);
        Ok(())
    }

    /// Stops agent `i`.
    pub async fn stop_agent(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some(a) = self.agents[i].take() {
            a.stop().await?;
        }
        Ok(())
    }

    /// Agent `i`.
    pub fn agent(&self, i: usize) -> &RunningAgent {
        self.agents[i].as_ref().expect("agent running")
    }

    /// Waits until every agent reports `connected`.
    pub async fn all_connected(&self) {
        for a in self.agents.iter().flatten() {
            let mut rx = a.sync.clone();
            let _ = rx.wait_for(|s| s.state == shelfsync_agent::status::SyncState::Connected).await;
        }
    }

    /// Stops everything.
    pub async fn stop(self) {
        for a in self.agents.into_iter().flatten() {
            let _ = a.stop().await;
        }
        self.hub.stop().await;
    }
}
