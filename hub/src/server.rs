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

/// Storage options from the config.
pub(crate) fn storage_options(config: &HubConfig) -> (SqliteOptions, crate::engine::EngineOptions) {
    (
        SqliteOptions {
            synchronous: config.storage.synchronous,
            group_commit_max: config.storage.group_commit_max,
            readers: config.storage.readers,
        },
        crate::engine::EngineOptions {
            staleness: config.staleness.to_staleness(),
            escrow: config.escrow.to_escrow(),
            ..crate::engine::EngineOptions::default()
        },
    )
}

/// Opens the decider on `target` (fenced by `fence` on a shared database) and the catalog.
async fn open_hub(
    config: &HubConfig,
    target: &crate::db::Target,
    fence: Option<crate::cluster::Fence>,
    edge: Option<Arc<shelfsync_node::http::EdgeStats>>,
    warm: Option<crate::standby::Warm>,
) -> Result<Arc<Hub>, HubError> {
    tracing::info!(database = %target.describe(), "opening the hub's database");
    let (opts, engine_opts) = storage_options(config);
    let storage = Arc::new(crate::engine::Engine::open_target(target, opts, engine_opts, fence, warm, 0).await?);
    let catalog = crate::catalog::HubCatalog::load(storage.as_ref()).await?;
    let metrics = match edge {
        Some(edge) => crate::metrics::Metrics::with_edge(edge),
        None => crate::metrics::Metrics::default(),
    };
    let hub = Hub::with_metrics(storage, catalog, metrics);
    if hub.storage.opened_restored() {
        crate::metrics::Metrics::inc(&hub.metrics.hub_rollbacks_total);
    }
    Ok(hub)
}

/// Binds the QUIC endpoint (with a configuration from the PKI; an active hub sets its own with
/// the revocation list) and the HTTP listener.
pub(crate) async fn bind(
    config: &HubConfig,
    pki: &Pki,
) -> Result<(quinn::Endpoint, SocketAddr, tokio::net::TcpListener, SocketAddr), HubError> {
    let server_config = pki.server_config(Vec::new()).map_err(|e| HubError::Pki(e.to_string()))?;
    let endpoint = quinn::Endpoint::server(server_config, config.quic.listen)
        .map_err(|e| HubError::Bind { addr: config.quic.listen, message: e.to_string() })?;
    let quic_addr =
        endpoint.local_addr().map_err(|e| HubError::Bind { addr: config.quic.listen, message: e.to_string() })?;
    let listener = tokio::net::TcpListener::bind(config.http.listen)
        .await
        .map_err(|e| HubError::Bind { addr: config.http.listen, message: e.to_string() })?;
    let http_addr =
        listener.local_addr().map_err(|e| HubError::Bind { addr: config.http.listen, message: e.to_string() })?;
    Ok((endpoint, quic_addr, listener, http_addr))
}

/// Starts what an active hub runs beside its API on a bound endpoint (agent sync, revocation
/// checks, catalog pick-up, reservation expiry, webhooks) and returns its API.
async fn activate(
    config: &HubConfig,
    hub: &Arc<Hub>,
    pki: &Arc<Pki>,
    endpoint: &quinn::Endpoint,
) -> Result<(axum::Router, Vec<JoinHandle<()>>), HubError> {
    let mut tasks = serve_agents(config, hub, pki, endpoint).await?;
    tasks.push(tokio::spawn(expire_leases(hub.clone(), Duration::from_millis(config.reservations.expiry_check_ms))));
    for w in &config.webhooks {
        tasks.push(tokio::spawn(crate::feed::run_webhook(hub.clone(), w.clone(), Duration::from_secs(30))));
    }
    Ok((api_app(config, hub), tasks))
}

/// Serves agents on `endpoint` from `hub`'s ledger: their sync sessions, revocations of their
/// certificates, and the catalog changes other processes made.
pub(crate) async fn serve_agents<L: crate::ledger::AgentLedger>(
    config: &HubConfig,
    hub: &Arc<Hub<L>>,
    pki: &Arc<Pki>,
    endpoint: &quinn::Endpoint,
) -> Result<Vec<JoinHandle<()>>, HubError> {
    endpoint.set_server_config(Some(quic_server::server_config(hub, pki).await.map_err(HubError::Pki)?));
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
    tasks.push(tokio::spawn(watch_catalog_imports(hub.clone())));
    Ok(tasks)
}

/// The public API of `hub` (authentication, rate limits, CORS).
pub(crate) fn api_app(config: &HubConfig, hub: &Arc<Hub>) -> axum::Router {
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
            edge,
        },
        config.http.max_body_bytes,
    );
    app.layer(cors(&config.http.cors_allowed_origins))
}

/// Opens the hub's state and starts serving. Returns once both endpoints listen. (On a
/// PostgreSQL database shared with other hubs, run [`start_clustered`] instead.)
pub async fn start(config: HubConfig) -> Result<RunningHub, HubError> {
    config.validate()?;
    let target = crate::db::Target::for_data_dir(&config.data_dir, config.storage.url.as_deref())?;
    let hub = open_hub(&config, &target, None, None, None).await?;
    let pki = Arc::new(Pki::load(&config.pki_dir()).map_err(|e| HubError::Pki(e.to_string()))?);
    let (endpoint, quic_addr, listener, http_addr) = bind(&config, &pki).await?;
    let (app, tasks) = activate(&config, &hub, &pki, &endpoint).await?;
    let edge = hub.metrics.edge.clone();
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let http = tokio::spawn(shelfsync_node::http::serve(listener, app, config.serve_options(), edge, async move {
        let _ = shutdown_rx.await;
    }));
    tracing::info!(%quic_addr, %http_addr, writer = %hub.storage.hub_writer(), "hub listening");
    Ok(RunningHub { quic_addr, http_addr, hub, endpoint, shutdown: Some(shutdown_tx), http, tasks })
}

/// A hub among several on one PostgreSQL database ([`crate::cluster`]): active (it holds the
/// lease and decides) or standing by (it forwards HTTP requests to the active hub and refuses
/// agents, which fail over to the next address in their bundle) until it takes the lease over.
pub struct ClusterNode {
    /// Where agents connect.
    pub quic_addr: SocketAddr,
    /// Where the HTTP API listens.
    pub http_addr: SocketAddr,
    /// This hub's id in the `hubs` table.
    pub hub_id: String,
    coord: Arc<crate::cluster::Coordinator>,
    fence: crate::cluster::Fence,
    active: ActiveSlot,
    endpoint: quinn::Endpoint,
    shutdown: Option<oneshot::Sender<()>>,
    http: JoinHandle<std::io::Result<()>>,
    tasks: Arc<std::sync::Mutex<Vec<JoinHandle<()>>>>,
}

impl ClusterNode {
    /// The API's base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.http_addr)
    }

    /// Whether this hub holds the lease and decides.
    pub fn is_active(&self) -> bool {
        self.active.read().expect("active lock").is_some()
    }

    /// Stops serving; an active hub gives its lease up so a standby takes over at once.
    pub async fn stop(mut self) {
        let hub = self.active.read().expect("active lock").as_ref().map(|(h, _)| h.clone());
        if let Some(h) = &hub {
            h.begin_stop();
        }
        self.endpoint.close(quinn::VarInt::from_u32(0), b"hub shutting down");
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        for t in self.tasks.lock().expect("tasks lock").drain(..) {
            t.abort();
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), self.endpoint.wait_idle()).await;
        let _ = (&mut self.http).await;
        if hub.is_some() && !shelfsync_node::fatal::is_stopping() {
            if let Err(e) = self.coord.release(self.fence.epoch()).await {
                tracing::warn!(error = %e, "could not release the lease; a standby takes over when it expires");
            }
        }
    }
}

/// The active hub and its API, once this hub decides.
type ActiveSlot = Arc<std::sync::RwLock<Option<(Arc<Hub>, axum::Router)>>>;

/// State of a clustered hub's HTTP front: the active API once this hub decides, else how to
/// reach the hub that does.
#[derive(Clone)]
struct Front {
    /// How long a lease lasts (a takeover takes at most that, and a tick).
    lease: Duration,
    /// This hub's id (a lease it holds while still loading is waited for, not forwarded to).
    me: String,
    active: ActiveSlot,
    owners: Arc<tokio_postgres::Client>,
    /// Plain HTTP, for a deciding hub of an older version (no internal API).
    client: reqwest::Client,
    /// The internal API's client ([`crate::internal`]).
    peers: reqwest::Client,
    max_body_bytes: usize,
    /// How far this hub's warm decider is while it stands by.
    warm: tokio::sync::watch::Receiver<crate::standby::Progress>,
}

/// Marks a request forwarded by a standby (a hub that is not active answers it 503 instead of
/// forwarding again).
const FORWARDED: &str = "x-shelfsync-forwarded-by";

/// Starts a hub on a PostgreSQL database shared with other hubs. Returns once both endpoints
/// listen; the hub becomes active when it takes the lease (at once if nobody holds it).
pub async fn start_clustered(config: HubConfig) -> Result<ClusterNode, HubError> {
    config.validate()?;
    let target = crate::db::Target::for_data_dir(&config.data_dir, config.storage.url.as_deref())?;
    let crate::db::Target::Postgres(url) = target.clone() else {
        return Err(HubError::Other("several hubs share a PostgreSQL database; this data dir's is SQLite".into()));
    };
    let pki = Arc::new(Pki::load(&config.pki_dir()).map_err(|e| HubError::Pki(e.to_string()))?);
    // Migrations first (a fresh database gets the coordination tables).
    crate::postgres::PgStorage::migrate(&url).await?;
    let partitions = crate::postgres::PgStorage::partitions(&crate::postgres::connect(&url).await?).await?;
    if partitions != shelfsync_hub_core::Partitions::ONE {
        return Err(HubError::Other(format!(
            "this database was made with {} partitions: a hub serves it with `partitioned::start_partitioned`",
            partitions.count()
        )));
    }
    let (endpoint, quic_addr, listener, http_addr) = bind(&config, &pki).await?;
    let lease = Duration::from_millis(config.storage.lease_ms);
    let coord = Arc::new(
        crate::cluster::Coordinator::join(
            &url,
            &http_addr.to_string(),
            &quic_addr.to_string(),
            lease,
            Duration::from_millis(config.storage.lease_renew_ms),
        )
        .await?,
    );
    // The hubs' internal API: where a standby's forwarded requests arrive.
    let creds = pki.peer_credentials().map_err(|e| HubError::Pki(e.to_string()))?;
    let internal_at = config.http.internal_listen.unwrap_or(SocketAddr::new(http_addr.ip(), 0));
    let internal_listener = tokio::net::TcpListener::bind(internal_at)
        .await
        .map_err(|e| HubError::Bind { addr: internal_at, message: e.to_string() })?;
    let internal_addr =
        internal_listener.local_addr().map_err(|e| HubError::Bind { addr: internal_at, message: e.to_string() })?;
    let owners = crate::postgres::connect(&url).await?;
    crate::internal::advertise(&owners, &coord.hub_id, internal_addr).await?;
    let active: ActiveSlot = Arc::default();
    let (warm_tx, warm) = tokio::sync::watch::channel(None);
    let front = Front {
        warm,
        me: coord.hub_id.clone(),
        lease,
        active: active.clone(),
        owners: Arc::new(owners),
        client: reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .build()
            .map_err(|e| HubError::Other(e.to_string()))?,
        peers: crate::internal::client(&creds).map_err(HubError::Pki)?,
        max_body_bytes: config.http.max_body_bytes,
    };
    let internal_app = axum::Router::new().fallback(internal_door).with_state(front.clone());
    let internal_tls = creds.server_config().map_err(|e| HubError::Pki(e.to_string()))?;
    let app = axum::Router::new().fallback(front_door).with_state(front);
    let edge = Arc::new(shelfsync_node::http::EdgeStats::default());
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let http =
        tokio::spawn(shelfsync_node::http::serve(listener, app, config.serve_options(), edge.clone(), async move {
            let _ = shutdown_rx.await;
        }));
    let tasks: Arc<std::sync::Mutex<Vec<JoinHandle<()>>>> = Arc::default();
    tasks.lock().expect("tasks lock").push(tokio::spawn(crate::internal::serve(
        internal_listener,
        internal_tls,
        internal_app,
        std::future::pending(),
    )));
    let (activated_tx, activated_rx) = tokio::sync::watch::channel(false);
    tasks.lock().expect("tasks lock").push(tokio::spawn(refuse_agents(endpoint.clone(), activated_rx)));
    let fence = crate::cluster::Fence::new(coord.lease);
    let takeover = {
        let (config, endpoint, active, more_tasks, fence, pki) =
            (config.clone(), endpoint.clone(), active.clone(), tasks.clone(), fence.clone(), pki.clone());
        let edge = edge.clone();
        move |epoch: i64, warm: Option<crate::standby::Warm>| async move {
            let hub = open_hub(&config, &target, Some(fence), Some(edge), warm).await?;
            hub.metrics.lease_epoch.set(epoch);
            let _ = activated_tx.send(true);
            let (app, more) = activate(&config, &hub, &pki, &endpoint).await?;
            more_tasks.lock().expect("tasks lock").extend(more);
            tracing::info!(epoch, writer = %hub.storage.hub_writer(), "this hub is active: it decides");
            *active.write().expect("active lock") = Some((hub, app));
            Ok::<(), HubError>(())
        }
    };
    // A free lease is taken before this returns: a lone hub is active once it listens.
    // The lease is renewed from the moment it is taken, while the decider loads.
    match crate::cluster::acquire_now(&coord, &fence).await? {
        Some(epoch) => {
            tasks.lock().expect("tasks lock").push(tokio::spawn(crate::cluster::hold(coord.clone(), epoch)));
            takeover(epoch, None).await?;
        }
        None => {
            let (coord, fence, more_tasks) = (coord.clone(), fence.clone(), tasks.clone());
            // A standby keeps a decider loaded (warm), so a takeover reads only the last moments.
            let follower = config.storage.warm_standby.then(|| {
                crate::standby::Follower::start_reporting(url.to_owned(), storage_options(&config).1, 0, warm_tx)
            });
            tasks.lock().expect("tasks lock").push(tokio::spawn(async move {
                let epoch = crate::cluster::acquire(&coord, &fence).await;
                more_tasks.lock().expect("tasks lock").push(tokio::spawn(crate::cluster::hold(coord, epoch)));
                let warm = match follower {
                    Some(f) => f.stop().await,
                    None => None,
                };
                if let Err(e) = takeover(epoch, warm).await {
                    shelfsync_node::fatal::stop(&format!("taking over as the active hub failed: {e}"));
                }
            }));
        }
    }
    tracing::info!(
        %quic_addr,
        %http_addr,
        %internal_addr,
        hub = %coord.hub_id,
        "hub listening (clustered: standing by until it holds the lease)"
    );
    Ok(ClusterNode {
        quic_addr,
        http_addr,
        hub_id: coord.hub_id.clone(),
        coord,
        fence,
        active,
        endpoint,
        shutdown: Some(shutdown_tx),
        http,
        tasks,
    })
}

/// A standby refuses agents at once (they try the next hub of their bundle) until it is active.
pub(crate) async fn refuse_agents(endpoint: quinn::Endpoint, mut activated: tokio::sync::watch::Receiver<bool>) {
    loop {
        if *activated.borrow() {
            return;
        }
        tokio::select! {
            incoming = endpoint.accept() => match incoming {
                Some(i) => {
                    tracing::debug!(peer = %i.remote_address(), "refusing an agent: this hub stands by");
                    i.refuse();
                }
                None => return,
            },
            changed = activated.changed() => if changed.is_err() { return },
        }
    }
}

/// A request another hub forwarded over the internal API: served when this hub decides, else
/// 503 (it is never forwarded again: the lease is changing hands, and the sender retries).
async fn internal_door(
    axum::extract::State(front): axum::extract::State<Front>,
    req: axum::extract::Request,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let app = front.active.read().expect("active lock").as_ref().map(|(_, app)| app.clone());
    match app {
        Some(mut app) => match tower_service::Service::call(&mut app, req).await {
            Ok(r) => r,
            Err(never) => match never {},
        },
        None => {
            let mut r = (
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                axum::Json(serde_json::json!({
                    "error": "no_active_hub",
                    "message": "this hub does not decide (the lease is changing hands); retry",
                })),
            )
                .into_response();
            r.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from_static("1"));
            r
        }
    }
}

/// Headers that belong to one HTTP/1.1 hop and are not carried over (HTTP/2 forbids them).
pub(crate) fn hop_by_hop(name: &axum::http::HeaderName) -> bool {
    use axum::http::header;
    [
        header::HOST,
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::TE,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
    ]
    .contains(name)
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

/// Every HTTP request of a clustered hub: served here when active, else forwarded to the active
/// hub (over the internal API, [`crate::internal`]) with the caller's credentials (which that hub checks), streamed both ways. During a
/// takeover (nobody holds the lease, or its holder died and the lease has not expired yet) the
/// request waits for the new active hub, up to the lease's length and a second, instead of
/// failing; it is sent on only once a hub answers, so it is never decided twice.
async fn front_door(
    axum::extract::State(front): axum::extract::State<Front>,
    req: axum::extract::Request,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let local = |front: &Front| front.active.read().expect("active lock").as_ref().map(|(_, app)| app.clone());
    // Each hub answers its own liveness (a load balancer checks every hub), with its role.
    if req.method() == axum::http::Method::GET && req.uri().path() == "/healthz" {
        let body = match local(&front) {
            Some(_) => serde_json::json!({ "status": "ok", "role": "active", "hub": front.me }),
            // Whether a takeover would read only the last moments (warm) or every record.
            None => {
                let warm = *front.warm.borrow();
                serde_json::json!({
                    "status": "ok",
                    "role": "standby",
                    "hub": front.me,
                    "warm": warm.is_some(),
                    "warm_records": warm.map_or(0, |(_, records)| records),
                })
            }
        };
        return axum::Json(body).into_response();
    }
    if let Some(mut app) = local(&front) {
        return match tower_service::Service::call(&mut app, req).await {
            Ok(r) => r,
            Err(never) => match never {},
        };
    }
    let unavailable = |message: String| {
        let mut r = (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({ "error": "no_active_hub", "message": message })),
        )
            .into_response();
        r.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from_static("1"));
        r
    };
    if req.headers().contains_key(FORWARDED) {
        return unavailable("this hub stands by and was forwarded a request; the lease is changing hands".into());
    }
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, front.max_body_bytes).await {
        Ok(b) => b,
        Err(e) => {
            return (
                axum::http::StatusCode::PAYLOAD_TOO_LARGE,
                axum::Json(serde_json::json!({ "error": "payload_too_large", "message": e.to_string() })),
            )
                .into_response();
        }
    };
    let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/").to_owned();
    let deadline = tokio::time::Instant::now() + front.lease + Duration::from_secs(1);
    loop {
        if let Some(mut app) = local(&front) {
            let req = axum::extract::Request::from_parts(parts, axum::body::Body::from(body));
            return match tower_service::Service::call(&mut app, req).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
        }
        let late = tokio::time::Instant::now() >= deadline;
        let owner = match crate::internal::decider(&front.owners, crate::cluster::PARTITION).await {
            // This hub took the lease and is loading the decider: serve here in a moment.
            Ok(Some(o)) if o.hub == front.me && !late => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            Ok(Some(o)) => o,
            Ok(None) if !late => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Ok(None) => return unavailable("no hub holds the lease (a takeover is under way); retry".into()),
            Err(e) => return unavailable(format!("cannot read who holds the lease: {e}")),
        };
        let mut out = match owner.internal_addr {
            Some(addr) => front.peers.request(parts.method.clone(), format!("https://{addr}{path}")),
            None => front.client.request(parts.method.clone(), format!("http://{}{path}", owner.http_addr)),
        };
        for (name, value) in parts.headers.iter() {
            if !hop_by_hop(name) {
                out = out.header(name, value);
            }
        }
        match out.header(FORWARDED, "standby").body(body.clone()).send().await {
            Ok(resp) => {
                let mut r = axum::response::Response::builder().status(resp.status());
                for (name, value) in resp.headers() {
                    if !hop_by_hop(name) {
                        r = r.header(name, value);
                    }
                }
                return r
                    .body(axum::body::Body::from_stream(resp.bytes_stream()))
                    .unwrap_or_else(|e| unavailable(format!("forwarding: {e}")));
            }
            // Not connected: the request never reached the owner, so it may go to the next one.
            Err(e) if e.is_connect() && !late => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => return unavailable(format!("the active hub ({}) did not answer: {e}", owner.hub)),
        }
    }
}

/// Expires due reservation leases, on time, and pushes the freed holds to the stores.
pub(crate) async fn expire_leases(hub: Arc<Hub>, every: Duration) {
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
pub(crate) async fn watch_catalog_imports<L: crate::ledger::AgentLedger>(hub: Arc<Hub<L>>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        match hub.catalog.refresh(hub.storage.as_ref()).await {
            Ok(r) => {
                if r.catalog_changed {
                    hub.catalog_changed();
                }
                hub.holds_changed(&r.holds);
            }
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
