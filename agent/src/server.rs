//! Starting and stopping an agent: open the ledger, serve the POS API, run the sync client.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::api::{router, AppState};
use crate::config::{AgentConfig, ConfigError};
use crate::db::{Db, DbError, DbOptions};
use crate::status::SyncStatus;

/// Why an agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The ledger could not be opened.
    #[error(transparent)]
    Db(#[from] DbError),
    /// The API address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    /// Something else at start-up.
    #[error("{0}")]
    Other(String),
}

/// A running agent (in this process).
pub struct RunningAgent {
    /// Where the POS API listens.
    pub addr: SocketAddr,
    /// The ledger.
    pub db: Db,
    /// Live sync state.
    pub sync: watch::Receiver<SyncStatus>,
    /// Sync traffic counters.
    pub sync_stats: Arc<crate::sync::SyncStats>,
    shutdown: Option<oneshot::Sender<()>>,
    server: JoinHandle<std::io::Result<()>>,
    sync_task: Option<JoinHandle<()>>,
}

impl RunningAgent {
    /// Stops serving, waits for in-flight requests, stops syncing.
    pub async fn stop(mut self) -> Result<(), StartError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.sync_task.take() {
            self.sync_stats.close().await;
            task.abort();
            let _ = task.await;
        }
        match (&mut self.server).await {
            Ok(r) => r.map_err(|e| StartError::Other(format!("API server: {e}"))),
            Err(e) => Err(StartError::Other(format!("API server task: {e}"))),
        }
    }

    /// The API's base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Opens the ledger and starts serving. Returns once the API is listening.
pub async fn start(config: AgentConfig) -> Result<RunningAgent, StartError> {
    config.validate()?;
    let opts = DbOptions { synchronous: config.storage.synchronous, group_commit_max: config.storage.group_commit_max };
    let path = config.db_path();
    let db = tokio::task::spawn_blocking(move || Db::open(&path, opts))
        .await
        .map_err(|e| StartError::Other(format!("opening the database: {e}")))??;
    let listener = tokio::net::TcpListener::bind(config.api.listen)
        .await
        .map_err(|source| StartError::Bind { addr: config.api.listen, source })?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind { addr: config.api.listen, source })?;

    let (sync_tx, sync_rx) = watch::channel(SyncStatus::disabled());
    let catalog = crate::catalog::AgentCatalog::load(&db)
        .await
        .map_err(|e| StartError::Other(format!("loading the catalog: {e}")))?;
    let sync_stats = Arc::new(crate::sync::SyncStats::default());
    let sync_task = crate::sync::spawn(&config, db.clone(), sync_tx, sync_stats.clone(), catalog.clone())?;

    let token = (!config.api.token.is_empty()).then(|| Arc::<str>::from(config.api.token.as_str()));
    let metrics = Arc::new(crate::metrics::AgentMetrics::new(db.commit_seconds()));
    let stats = metrics.edge.clone();
    let limits = &config.api.rate_limit;
    let limiter = shelfsync_node::ratelimit::Limiter::new(
        limits.enabled,
        &[("writes", limits.writes), ("reads", limits.reads)],
        shelfsync_node::ratelimit::TokenKeys::Only(token.clone()),
        stats.clone(),
    );
    let hosts = crate::guard::HostPolicy::new(addr, &config.api.allowed_hosts);
    let guard = Arc::new(crate::guard::Guard { hosts, limiter, stats: stats.clone() });
    let state = AppState { db: db.clone(), sync: sync_rx.clone(), token, catalog, guard, metrics };
    let app = router(state, config.api.max_body_bytes);
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let opts = config.serve_options();
    let server = tokio::spawn(shelfsync_node::http::serve(listener, app, opts, stats, async move {
        let _ = shutdown_rx.await;
    }));
    tracing::info!(%addr, store = %db.identity().store, writer = %db.identity().writer, "agent API listening");
    Ok(RunningAgent { addr, db, sync: sync_rx, sync_stats, shutdown: Some(shutdown_tx), server, sync_task })
}
