//! Starting and stopping a hub: storage, the QUIC sync endpoint and the HTTP API.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use shelfsync_node::config::ConfigError;
use shelfsync_node::ratelimit::{Limiter, TokenKeys};
use shelfsync_shared::sync::SyncConfig;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::api::{router, ApiState};
use crate::config::HubConfig;
use crate::pki::Pki;
use crate::quic_server;
use crate::sqlite::SqliteOptions;
use crate::state::Hub;
use crate::storage::StorageError;

/// Why a hub could not start.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Storage could not be opened.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The PKI could not be loaded or used.
    #[error("pki: {0}")]
    Pki(String),
    /// An address could not be bound.
    #[error("cannot listen on {addr}: {message}")]
    Bind { addr: SocketAddr, message: String },
    /// Something else.
    #[error("{0}")]
    Other(String),
}

/// A running hub (in this process).
pub struct RunningHub {
    /// Where agents connect.
    pub quic_addr: SocketAddr,
    /// Where the HTTP API listens.
    pub http_addr: SocketAddr,
    /// Shared state.
    pub hub: Arc<Hub>,
    endpoint: quinn::Endpoint,
    shutdown: Option<oneshot::Sender<()>>,
    http: JoinHandle<std::io::Result<()>>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningHub {
    /// The API's base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.http_addr)
    }

    /// Closes every agent connection and the API, and waits for them.
    pub async fn stop(mut self) {
        self.hub.begin_stop();
        self.endpoint.close(quinn::VarInt::from_u32(0), b"hub shutting down");
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        for t in self.tasks.drain(..) {
            t.abort();
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), self.endpoint.wait_idle()).await;
        let _ = (&mut self.http).await;
    }
}

/// Opens the hub's state and starts serving. Returns once both endpoints listen.
pub async fn start(config: HubConfig) -> Result<RunningHub, HubError> {
    config.validate()?;
    let target = crate::db::Target::for_data_dir(&config.data_dir, config.storage.url.as_deref())?;
    tracing::info!(database = %target.describe(), "opening the hub's database");
    let opts = SqliteOptions {
        synchronous: config.storage.synchronous,
        group_commit_max: config.storage.group_commit_max,
        readers: config.storage.readers,
    };
    let engine_opts = crate::engine::EngineOptions {
        staleness: config.staleness.to_staleness(),
        ..crate::engine::EngineOptions::default()
    };
    let storage = crate::engine::Engine::open_target(&target, opts, engine_opts).await?;
    let pki = Arc::new(Pki::load(&config.pki_dir()).map_err(|e| HubError::Pki(e.to_string()))?);
    let storage = Arc::new(storage);
    let catalog = crate::catalog::HubCatalog::load(storage.as_ref()).await?;
    let hub = Hub::new(storage, catalog);
    if hub.storage.opened_restored() {
        crate::metrics::Metrics::inc(&hub.metrics.hub_rollbacks_total);
    }

    let server_config = quic_server::server_config(&hub, &pki).await.map_err(HubError::Pki)?;
    let endpoint = quinn::Endpoint::server(server_config, config.quic.listen)
        .map_err(|e| HubError::Bind { addr: config.quic.listen, message: e.to_string() })?;
    let quic_addr =
        endpoint.local_addr().map_err(|e| HubError::Bind { addr: config.quic.listen, message: e.to_string() })?;
    let sync = SyncConfig { coalesce: Duration::from_millis(config.sync.coalesce_ms), ..SyncConfig::default() };
    let mut tasks = vec![tokio::spawn(quic_server::serve(
        hub.clone(),
        endpoint.clone(),
        sync,
        config.quic.max_connections,
        Duration::from_millis(config.sync.probe_timeout_ms),
    ))];
    tasks.push(tokio::spawn(quic_server::watch_revocations(
        hub.clone(),
        endpoint.clone(),
        pki.clone(),
        Duration::from_secs(config.sync.revocation_check_secs),
    )));

    let listener = tokio::net::TcpListener::bind(config.http.listen)
        .await
        .map_err(|e| HubError::Bind { addr: config.http.listen, message: e.to_string() })?;
    let http_addr =
        listener.local_addr().map_err(|e| HubError::Bind { addr: config.http.listen, message: e.to_string() })?;
    tasks.push(tokio::spawn(watch_catalog_imports(hub.clone())));
    tasks.push(tokio::spawn(expire_leases(hub.clone(), Duration::from_millis(config.reservations.expiry_check_ms))));
    for w in &config.webhooks {
        tasks.push(tokio::spawn(crate::feed::run_webhook(hub.clone(), w.clone(), Duration::from_secs(30))));
    }
    let edge = hub.metrics.edge.clone();
    let limits = &config.http.rate_limit;
    let limiter = Limiter::new(limits.enabled, &limits.classes(), TokenKeys::Any, edge.clone());
    let app = router(
        ApiState {
            hub: hub.clone(),
            max_batch_skus: config.http.max_batch_skus,
            reservations: config.reservations.clone(),
            event_streams: Arc::new(tokio::sync::Semaphore::new(config.http.max_event_streams)),
            limiter,
            edge: edge.clone(),
        },
        config.http.max_body_bytes,
    );
    let app = app.layer(cors(&config.http.cors_allowed_origins));
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let http = tokio::spawn(shelfsync_node::http::serve(listener, app, config.serve_options(), edge, async move {
        let _ = shutdown_rx.await;
    }));
    tracing::info!(%quic_addr, %http_addr, writer = %hub.storage.hub_writer(), "hub listening");
    Ok(RunningHub { quic_addr, http_addr, hub, endpoint, shutdown: Some(shutdown_tx), http, tasks })
}

/// Expires due reservation leases, on time, and pushes the freed holds to the stores.
async fn expire_leases(hub: Arc<Hub>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match hub.storage.expire_due(shelfsync_node::now_ms()).await {
            Ok((stores, expired)) => {
                if expired > 0 {
                    tracing::debug!(expired, "reservations expired");
                    hub.metrics.reservations_expired(expired);
                }
                hub.holds_changed(&stores)
            }
            Err(e) => tracing::error!(error = %e, "expiring reservations"),
        }
    }
}

/// Picks up catalog edits made by another process (`shelfsync-hub catalog import`) and pushes them
/// to the stores.
async fn watch_catalog_imports(hub: Arc<Hub>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        match hub.catalog.refresh(hub.storage.as_ref()).await {
            Ok(true) => hub.catalog_changed(),
            Ok(false) => {}
            Err(e) => tracing::error!(error = %e, "picking up catalog changes"),
        }
    }
}

/// Cross-origin access for a browser storefront: only the configured origins (none by default),
/// the API's methods, the headers it reads (token, JSON body, idempotency and feed resumption),
/// and `Retry-After` readable. Preflights are answered here, before authentication.
fn cors(origins: &[String]) -> tower_http::cors::CorsLayer {
    use axum::http::{header, HeaderName, HeaderValue, Method};
    let origins: Vec<HeaderValue> =
        origins.iter().map(|o| HeaderValue::from_str(o).expect("validated in HubConfig::validate")).collect();
    tower_http::cors::CorsLayer::new()
        .allow_origin(origins)
        .allow_methods([Method::GET, Method::POST, Method::PUT, Method::PATCH, Method::DELETE])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            HeaderName::from_static("idempotency-key"),
            HeaderName::from_static("last-event-id"),
        ])
        .expose_headers([header::RETRY_AFTER])
        .max_age(Duration::from_secs(600))
}
