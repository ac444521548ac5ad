//! A hub on a PostgreSQL database of several partitions (`init --partitions N`): it holds its
//! share of the partitions' leases ([`crate::cluster::keep`]), runs one decider per partition it
//! holds, each following the sync plane's merges of its SKUs ([`crate::syncplane`]), and hands
//! partitions over as hubs join and leave. Any hub's deciders stay fenced by their partition's
//! epoch, so a hub that lost a partition cannot write for it.
//!
//! **The API.** Any hub answers any request about one partition: served here when this hub
//! holds the partition (that partition's own API over its decider), else forwarded whole over
//! the internal API ([`crate::internal`]) to the hub that does, with the caller's token (which
//! that hub checks). A request's partition is its SKU's: `/v1/availability/{sku}`,
//! `/v1/catalog/{sku}`, a reservation's or a restock's lines (all of one partition), and a
//! reservation's own routes by the partition that holds it. During a hand-over the request
//! waits for the new holder (at most a lease and a second), as with one partition.
//!
//! **Not built yet** (`hub/docs/scale-out.md`, "Not built yet"): requests over several
//! partitions (lines of several, lists, the feed) answer 503 `not_built`, saying so; agents are
//! refused (they try the next hub of their bundle, and keep selling offline) until their path
//! through the sync plane is served here.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shelfsync_hub_core::Partition;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::cluster::{Fence, Keeper, LeaseEvent};
use crate::config::HubConfig;
use crate::engine::Engine;
use crate::pki::Pki;
use crate::server::HubError;

/// Marks a hub's answer "I do not hold that partition (any more)": nothing was decided.
const NOT_HELD: &str = "x-shelfsync-not-held";

/// Connections of this hub's sync plane (merges of the agents connected here, their reads).
const PLANE_CONNECTIONS: usize = 4;

/// How often the sessions of the stores connected here look for what the deciders committed
/// for them (holds, restocks).
const HEADS_POLL: Duration = Duration::from_millis(100);

/// How often a decider looks at its merge log when no wake-up came.
const APPLY_POLL: Duration = Duration::from_millis(200);

/// A partition this hub decides for.
struct Held {
    app: axum::Router,
    /// The merge-log follower, reservation expiry and catalog pick-up.
    tasks: Vec<JoinHandle<()>>,
}

impl Held {
    /// Stops its tasks; its decider stops once the API's last request is done.
    fn stop(self) {
        for t in self.tasks {
            t.abort();
        }
    }
}

type HeldMap = Arc<Mutex<BTreeMap<Partition, Held>>>;

/// A running hub on a partitioned database.
pub struct PartitionedNode {
    /// Where agents connect (refused for now).
    pub quic_addr: SocketAddr,
    /// Where the HTTP API listens.
    pub http_addr: SocketAddr,
    /// This hub's id in the `hubs` table.
    pub hub_id: String,
    keeper: Keeper,
    held: HeldMap,
    endpoint: quinn::Endpoint,
    shutdown: Option<oneshot::Sender<()>>,
    http: JoinHandle<std::io::Result<()>>,
    tasks: Vec<JoinHandle<()>>,
}

impl PartitionedNode {
    /// The API's base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.http_addr)
    }

    /// Stops deciding and gives every lease up, so other hubs take the partitions at once.
    pub async fn stop(mut self) {
        self.endpoint.close(quinn::VarInt::from_u32(0), b"hub shutting down");
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        for t in self.tasks.drain(..) {
            t.abort();
        }
        let held: Vec<Held> = std::mem::take(&mut *self.held.lock().expect("held lock")).into_values().collect();
        held.into_iter().for_each(Held::stop);
        let _ = (&mut self.http).await;
        if !shelfsync_node::fatal::is_stopping() {
            if let Err(e) = self.keeper.stop().await {
                tracing::warn!(error = %e, "could not give the leases up; other hubs take them when they expire");
            }
        }
    }
}

/// How many partitions the database at `target` has (one for SQLite).
pub async fn partition_count(target: &crate::db::Target) -> Result<shelfsync_hub_core::Partitions, HubError> {
    match target {
        crate::db::Target::Sqlite(_) => Ok(shelfsync_hub_core::Partitions::ONE),
        crate::db::Target::Postgres(url) => {
            Ok(crate::postgres::PgStorage::partitions(&crate::postgres::connect(url).await?).await?)
        }
    }
}

/// Starts a hub on a partitioned database. Returns once both endpoints listen; it decides for
/// the partitions it takes from then on.
pub async fn start_partitioned(config: HubConfig) -> Result<PartitionedNode, HubError> {
    config.validate()?;
    let target = crate::db::Target::for_data_dir(&config.data_dir, config.storage.url.as_deref())?;
    let crate::db::Target::Postgres(url) = target.clone() else {
        return Err(HubError::Other("partitions live in a PostgreSQL database; this data dir's is SQLite".into()));
    };
    let pki = Pki::load(&config.pki_dir()).map_err(|e| HubError::Pki(e.to_string()))?;
    crate::postgres::PgStorage::migrate(&url).await?;
    let partitions = crate::postgres::PgStorage::partitions(&crate::postgres::connect(&url).await?).await?;
    let (endpoint, quic_addr, listener, http_addr) = crate::server::bind(&config, &pki).await?;
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
    let hub_id = coord.hub_id.clone();
    // The hubs' internal API, advertised before any lease is taken: where other hubs forward
    // requests about the partitions held here.
    let creds = pki.peer_credentials().map_err(|e| HubError::Pki(e.to_string()))?;
    let internal_at = config.http.internal_listen.unwrap_or(SocketAddr::new(http_addr.ip(), 0));
    let internal_listener = tokio::net::TcpListener::bind(internal_at)
        .await
        .map_err(|e| HubError::Bind { addr: internal_at, message: e.to_string() })?;
    let internal_addr =
        internal_listener.local_addr().map_err(|e| HubError::Bind { addr: internal_at, message: e.to_string() })?;
    let db = crate::postgres::connect(&url).await?;
    crate::internal::advertise(&db, &hub_id, internal_addr).await?;
    let (keeper, events) = crate::cluster::keep(coord, partitions);
    let mut tasks = Vec::new();
    // Any store's change anywhere wakes the deciders (each reads only its own rows).
    let (wake_tx, wake) = watch::channel(());
    // And the sessions of the stores connected here (`crate::plane::follow_heads`).
    let mut notices = crate::notify::listen(url.clone());
    let (heads_tx, heads_rx) = mpsc::channel(crate::notify::QUEUE);
    tasks.push(tokio::spawn(async move {
        while let Some(n) = notices.recv().await {
            let _ = wake_tx.send(());
            if let Err(mpsc::error::TrySendError::Full(_)) = heads_tx.try_send(n) {
                // The sessions' follower is behind: its next poll reads every store anyway.
            }
        }
    }));
    // What the merges changed: for the stores' holds and the live feeds, once those are served
    // here; counted meanwhile.
    let (changed_tx, mut changed) = mpsc::channel::<Vec<shelfsync_hub_core::Merged>>(64);
    tasks.push(tokio::spawn(async move {
        while let Some(m) = changed.recv().await {
            tracing::debug!(merges = m.len(), "applied the sync plane's merges");
        }
    }));
    let held: HeldMap = Arc::default();
    let deciders = Deciders { config: config.clone(), target, url: url.clone(), lease, wake, changed: changed_tx };
    tasks.push(tokio::spawn(follow_leases(events, keeper.clone(), held.clone(), deciders)));
    // Agents: merged into the database here, whoever decides for their SKUs.
    let (sql, _) = crate::server::storage_options(&config);
    let plane = Arc::new(
        crate::plane::Plane::open(&crate::db::Target::Postgres(url.clone()), sql, PLANE_CONNECTIONS).await?,
    );
    let catalog = crate::catalog::HubCatalog::load(plane.as_ref()).await?;
    let agents = crate::state::Hub::with_ledger(plane, catalog, crate::metrics::Metrics::default());
    let pki = Arc::new(pki);
    tasks.extend(crate::server::serve_agents(&config, &agents, &pki, &endpoint).await?);
    tasks.push(tokio::spawn(crate::plane::follow_heads(agents, heads_rx, HEADS_POLL)));
    let front = Front {
        hub_id: hub_id.clone(),
        partitions,
        held: held.clone(),
        leases: keeper.watch(),
        db: Arc::new(db),
        peers: crate::internal::client(&creds).map_err(HubError::Pki)?,
        lease,
        max_body_bytes: config.http.max_body_bytes,
    };
    let internal_tls = creds.server_config().map_err(|e| HubError::Pki(e.to_string()))?;
    let internal_app = axum::Router::new().fallback(internal_door).with_state(front.clone());
    tasks.push(tokio::spawn(crate::internal::serve(
        internal_listener,
        internal_tls,
        internal_app,
        std::future::pending(),
    )));
    let app = axum::Router::new().fallback(front_door).with_state(front);
    let edge = Arc::new(shelfsync_node::http::EdgeStats::default());
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let http = tokio::spawn(shelfsync_node::http::serve(listener, app, config.serve_options(), edge, async move {
        let _ = shutdown_rx.await;
    }));
    tracing::info!(%quic_addr, %http_addr, hub = %hub_id, partitions = partitions.count(), "hub listening (partitioned)");
    Ok(PartitionedNode {
        quic_addr,
        http_addr,
        hub_id,
        keeper,
        held,
        endpoint,
        shutdown: Some(shutdown_tx),
        http,
        tasks,
    })
}

/// What a hub needs to start a partition's decider.
struct Deciders {
    config: HubConfig,
    target: crate::db::Target,
    url: String,
    lease: Duration,
    wake: watch::Receiver<()>,
    changed: mpsc::Sender<Vec<shelfsync_hub_core::Merged>>,
}

/// Opens a decider for every partition gained, drains and drops one handed over (then lets
/// the keeper give it up), and drops one lost.
async fn follow_leases(mut events: mpsc::Receiver<LeaseEvent>, keeper: Keeper, held: HeldMap, d: Deciders) {
    while let Some(event) = events.recv().await {
        match event {
            LeaseEvent::Gained { partition, epoch, .. } => match open(&d, partition, epoch).await {
                Ok(h) => {
                    tracing::info!(partition, epoch, "deciding for the partition");
                    held.lock().expect("held lock").insert(partition, h);
                }
                Err(e) => {
                    // Holding a lease without deciding would stall the partition: stop, so that
                    // another hub takes it once the lease expires.
                    shelfsync_node::fatal::stop(&format!("could not open partition {partition}'s decider: {e}"));
                    return;
                }
            },
            LeaseEvent::Releasing(partition) => {
                let gone = held.lock().expect("held lock").remove(&partition);
                // Its queued commits finish or are fenced off once the next holder's epoch is in
                // place; nothing of them is lost (a merge not applied stays logged).
                gone.into_iter().for_each(Held::stop);
                tracing::info!(partition, "handed the partition over (another hub's share)");
                keeper.released(partition).await;
            }
            LeaseEvent::Lost(partition) => {
                let gone = held.lock().expect("held lock").remove(&partition);
                gone.into_iter().for_each(Held::stop);
                tracing::warn!(
                    partition,
                    "lost the partition's lease (another hub took it over); stopped deciding for it"
                );
            }
        }
    }
}

/// Opens partition `partition`'s decider at `epoch`, with its API and its tasks.
async fn open(d: &Deciders, partition: Partition, epoch: i64) -> Result<Held, HubError> {
    let (sql, opts) = crate::server::storage_options(&d.config);
    let fence = Fence::holding(d.lease, epoch);
    let engine = Arc::new(Engine::open_target(&d.target, sql, opts, Some(fence), None, partition).await?);
    let client = crate::postgres::connect(&d.url).await?;
    let catalog = crate::catalog::HubCatalog::load(engine.as_ref()).await?;
    let hub = crate::state::Hub::new(engine.clone(), catalog);
    let app = crate::server::api_app(&d.config, &hub);
    let every = Duration::from_millis(d.config.reservations.expiry_check_ms);
    let tasks = vec![
        tokio::spawn(crate::syncplane::apply_forever(
            engine,
            client,
            partition,
            APPLY_POLL,
            d.wake.clone(),
            d.changed.clone(),
        )),
        tokio::spawn(crate::server::expire_leases(hub.clone(), every)),
        tokio::spawn(crate::server::watch_catalog_imports(hub)),
    ];
    Ok(Held { app, tasks })
}

/// State of a partitioned hub's HTTP fronts (public and internal).
#[derive(Clone)]
struct Front {
    hub_id: String,
    partitions: shelfsync_hub_core::Partitions,
    held: HeldMap,
    leases: watch::Receiver<BTreeMap<Partition, i64>>,
    /// For who holds what, and which partition holds a reservation.
    db: Arc<tokio_postgres::Client>,
    /// The internal API's client.
    peers: reqwest::Client,
    lease: Duration,
    max_body_bytes: usize,
}

/// Where a request goes.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    /// To this partition's decider.
    Partition(Partition),
    /// Not served on a partitioned database yet (why).
    NotBuilt(String),
}

/// The partition of a set of SKUs, if they share one.
fn one_partition<'a>(parts: shelfsync_hub_core::Partitions, skus: impl IntoIterator<Item = &'a str>) -> Route {
    let mut seen: Option<Partition> = None;
    for s in skus {
        let Ok(sku) = s.parse::<shelfsync_shared::Sku>() else {
            // The partition's API says what is wrong with it.
            return Route::Partition(seen.unwrap_or(0));
        };
        let p = parts.of(&sku);
        if seen.is_some_and(|q| q != p) {
            return Route::NotBuilt(
                "lines of SKUs of several partitions (split them into one request per partition for now)".into(),
            );
        }
        seen = Some(p);
    }
    Route::Partition(seen.unwrap_or(0))
}

/// Which partition decides a request (`body`: its JSON, for the lines).
async fn route(front: &Front, method: &axum::http::Method, path: &str, body: &[u8]) -> Route {
    use axum::http::Method;
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    let lines = || -> Vec<String> {
        let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        v["lines"]
            .as_array()
            .map(|ls| ls.iter().filter_map(|l| l["sku"].as_str().map(str::to_owned)).collect())
            .unwrap_or_default()
    };
    match (method, segs.as_slice()) {
        (&Method::GET, ["v1", "availability", sku]) | (_, ["v1", "catalog", sku]) => {
            one_partition(front.partitions, [*sku])
        }
        (&Method::POST, ["v1", "reservations"]) | (&Method::POST, ["v1", "restocks"]) => {
            let skus = lines();
            one_partition(front.partitions, skus.iter().map(String::as_str))
        }
        (_, ["v1", "reservations", id, ..]) => {
            let row = front
                .db
                .query_opt(
                    "SELECT partition FROM decisions WHERE kind = 'reservation' AND key = $1 LIMIT 1",
                    &[&id.to_string()],
                )
                .await;
            match row {
                Ok(Some(r)) => Route::Partition(Partition::try_from(r.get::<_, i16>(0)).unwrap_or(0)),
                // Unknown (or malformed): partition 0's API answers 404 (or 400).
                Ok(None) => Route::Partition(0),
                Err(e) => Route::NotBuilt(format!("cannot find the reservation's partition: {e}")),
            }
        }
        _ => Route::NotBuilt(format!("{method} {path} over every partition")),
    }
}

fn error(
    status: axum::http::StatusCode,
    code: &str,
    message: String,
    retry_secs: &'static str,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let mut r = (status, axum::Json(serde_json::json!({ "error": code, "message": message }))).into_response();
    r.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from_static(retry_secs));
    r
}

fn not_built(why: String) -> axum::response::Response {
    error(
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        "not_built",
        format!(
            "this hub decides for SKU partitions; {why} is not built yet (hub/docs/scale-out.md): \
             make the database with one partition to serve the whole API"
        ),
        "60",
    )
}

/// `/healthz` with the partitions this hub decides; a request about one partition served here
/// or forwarded to its holder; 503 `not_built` for the rest.
async fn front_door(
    axum::extract::State(front): axum::extract::State<Front>,
    req: axum::extract::Request,
) -> axum::response::Response {
    serve(front, req, true).await
}

/// A request another hub forwarded: served when this hub holds its partition, else 503 (never
/// forwarded again).
async fn internal_door(
    axum::extract::State(front): axum::extract::State<Front>,
    req: axum::extract::Request,
) -> axum::response::Response {
    serve(front, req, false).await
}

async fn serve(front: Front, req: axum::extract::Request, may_forward: bool) -> axum::response::Response {
    use axum::response::IntoResponse;
    if req.method() == axum::http::Method::GET && req.uri().path() == "/healthz" {
        let partitions: Vec<Partition> = front.leases.borrow().keys().copied().collect();
        return axum::Json(serde_json::json!({
            "status": "ok",
            "role": "partitioned",
            "hub": front.hub_id,
            "partitions": partitions,
        }))
        .into_response();
    }
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, front.max_body_bytes).await {
        Ok(b) => b,
        Err(e) => return error(axum::http::StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", e.to_string(), "1"),
    };
    let partition = match route(&front, &parts.method, parts.uri.path(), &body).await {
        Route::Partition(p) => p,
        Route::NotBuilt(why) => return not_built(why),
    };
    let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/").to_owned();
    let deadline = tokio::time::Instant::now() + front.lease + Duration::from_secs(1);
    let unavailable = |m: String| error(axum::http::StatusCode::SERVICE_UNAVAILABLE, "no_active_hub", m, "1");
    loop {
        let local = front.held.lock().expect("held lock").get(&partition).map(|h| h.app.clone());
        if let Some(mut app) = local {
            let req = axum::extract::Request::from_parts(parts, axum::body::Body::from(body));
            return match tower_service::Service::call(&mut app, req).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
        }
        let late = tokio::time::Instant::now() >= deadline;
        if !may_forward {
            let mut r =
                unavailable(format!("this hub does not decide partition {partition} (it is changing hands); retry"));
            // Nothing was decided: the forwarding hub may ask the next holder.
            r.headers_mut().insert(NOT_HELD, axum::http::HeaderValue::from_static("1"));
            return r;
        }
        let owner = match crate::internal::decider(&front.db, i32::from(partition)).await {
            // Taken here and loading, or nobody's during a takeover: wait a little.
            Ok(Some(o)) if o.hub == front.hub_id && !late => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            Ok(None) if !late => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Ok(Some(o)) if o.hub != front.hub_id => o,
            Ok(_) => {
                return unavailable(format!("no hub decides partition {partition} (a takeover is under way); retry"))
            }
            Err(e) => return unavailable(format!("cannot read who decides partition {partition}: {e}")),
        };
        let Some(addr) = owner.internal_addr else {
            return unavailable(format!(
                "the hub deciding partition {partition} has no internal API (an older version?)"
            ));
        };
        let mut out = front.peers.request(parts.method.clone(), format!("https://{addr}{path}"));
        for (name, value) in parts.headers.iter() {
            if !crate::server::hop_by_hop(name) {
                out = out.header(name, value);
            }
        }
        match out.body(body.clone()).send().await {
            // It handed the partition over (or lost it) meanwhile, deciding nothing: ask again.
            Ok(resp) if resp.headers().contains_key(NOT_HELD) && !late => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(resp) => {
                let mut r = axum::response::Response::builder().status(resp.status());
                for (name, value) in resp.headers() {
                    if !crate::server::hop_by_hop(name) {
                        r = r.header(name, value);
                    }
                }
                return r
                    .body(axum::body::Body::from_stream(resp.bytes_stream()))
                    .unwrap_or_else(|e| unavailable(format!("forwarding: {e}")));
            }
            // Not connected: the request never reached the holder, so it may go to the next one.
            Err(e) if e.is_connect() && !late => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => return unavailable(format!("the hub deciding partition {partition} did not answer: {e}")),
        }
    }
}
