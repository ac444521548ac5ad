//! A hub on a PostgreSQL database of several partitions (`init --partitions N`): it holds its
//! share of the partitions' leases ([`crate::cluster::keep`]), runs one decider per partition it
//! holds, each following the sync plane's merges of its SKUs ([`crate::syncplane`]), and hands
//! partitions over as hubs join and leave. Any hub's deciders stay fenced by their partition's
//! epoch, so a hub that lost a partition cannot write for it.
//!
//! **The API.** Any hub answers any request: one about one partition is served here when this
//! hub holds the partition (that partition's own API over its decider), else forwarded whole
//! over the internal API ([`crate::internal`]) to the hub that does, with the caller's token
//! (which that hub checks). A request's partition is its SKU's: `/v1/availability/{sku}`,
//! `/v1/catalog/{sku}`, a reservation's or a restock's lines, and a reservation's own routes by
//! the partition that holds it. During a hand-over the request waits for the new holder (at
//! most a lease and a second), as with one partition. Requests over several partitions are
//! split into parts or gathered from every partition (`split`); the change feed is every
//! partition's, merged (`feed`).
//!
//! **Agents** connect to any hub: their sessions run over the sync plane
//! ([`crate::plane::Plane`]), whoever decides for their SKUs.
//!
//! **Warm standbys**: every partition this hub does not decide is kept warm, and taken over
//! from there.
//!
//! **`/metrics`** is this process's: one set of counters shared by every decider it runs and
//! its agents' sessions, with the chain's figures read from the database at the scrape.

// The fronts answer with a response either way: an error is the answer to send as is.
#![allow(clippy::result_large_err)]

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

mod feed;
mod split;

pub use split::MIGRATION as SPLIT_MIGRATION;

/// Marks a hub's answer "I do not hold that partition (any more)": nothing was decided.
const NOT_HELD: &str = "x-shelfsync-not-held";

/// On a request between hubs: the partition it is for (a part of a gathered answer).
const PARTITION: &str = "x-shelfsync-partition";

/// Most bytes of one partition's part of a gathered answer.
const PART_MAX_BYTES: usize = 64 << 20;

/// How often a live feed (`/v1/events`) asks the partitions for new events when it has none.
const EVENTS_POLL: Duration = Duration::from_millis(200);

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
    /// At which epoch, and whether its decider was taken over warm.
    epoch: i64,
    warm: bool,
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

/// The progress of this hub's warm standby of each partition it does not decide.
type Standbys = Arc<Mutex<BTreeMap<Partition, watch::Receiver<crate::standby::Progress>>>>;

/// A running hub on a partitioned database.
pub struct PartitionedNode {
    /// Where agents connect.
    pub quic_addr: SocketAddr,
    /// Where the HTTP API listens.
    pub http_addr: SocketAddr,
    /// This hub's id in the `hubs` table.
    pub hub_id: String,
    keeper: Keeper,
    held: HeldMap,
    endpoint: quinn::Endpoint,
    shutdown: Option<oneshot::Sender<()>>,
    stopping: watch::Sender<bool>,
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
        self.stopping.send_replace(true);
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
    let db = crate::postgres::connect(&url).await?;
    let partitions = crate::postgres::PgStorage::partitions(&db).await?;
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
    let held: HeldMap = Arc::default();
    let standbys = Standbys::default();
    // One set of metrics for the whole process: every decider's API and the agents' sessions
    // count in it, and the front's listener is its HTTP edge.
    let edge = Arc::new(shelfsync_node::http::EdgeStats::default());
    let metrics = Arc::new(crate::metrics::Metrics::with_edge(edge.clone()));
    let deciders = Deciders {
        config: config.clone(),
        metrics: metrics.clone(),
        standbys: standbys.clone(),
        partitions,
        target,
        url: url.clone(),
        lease,
        wake,
    };
    tasks.push(tokio::spawn(follow_leases(events, keeper.clone(), held.clone(), deciders)));
    // Agents: merged into the database here, whoever decides for their SKUs.
    let (sql, opts) = crate::server::storage_options(&config);
    let target = crate::db::Target::Postgres(url.clone());
    let plane = Arc::new(crate::plane::Plane::open(&target, sql, PLANE_CONNECTIONS, opts.escrow).await?);
    let catalog = crate::catalog::HubCatalog::load(plane.as_ref()).await?;
    let agents = crate::state::Hub::with_ledger(plane, catalog, metrics.clone());
    let pki = Arc::new(pki);
    tasks.extend(crate::server::serve_agents(&config, &agents, &pki, &endpoint).await?);
    tasks.push(tokio::spawn(crate::plane::follow_heads(agents.clone(), heads_rx, HEADS_POLL)));
    let (stopping_tx, stopping_rx) = watch::channel(false);
    let front = Front {
        hub_id: hub_id.clone(),
        partitions,
        held: held.clone(),
        standbys,
        leases: keeper.watch(),
        db: Arc::new(db),
        peers: crate::internal::client(&creds).map_err(HubError::Pki)?,
        lease,
        max_body_bytes: config.http.max_body_bytes,
        streams: Arc::new(tokio::sync::Semaphore::new(config.http.max_event_streams)),
        stopping: stopping_rx,
        agents,
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
        stopping: stopping_tx,
        http,
        tasks,
    })
}

/// What a hub needs to start a partition's decider.
struct Deciders {
    config: HubConfig,
    /// The process's metrics, shared by every decider's API.
    metrics: Arc<crate::metrics::Metrics>,
    /// How far the warm standby of each partition not decided here is.
    standbys: Standbys,
    partitions: shelfsync_hub_core::Partitions,
    target: crate::db::Target,
    url: String,
    lease: Duration,
    wake: watch::Receiver<()>,
}

/// Opens a decider for every partition gained, drains and drops one handed over (then lets
/// the keeper give it up), and drops one lost.
///
/// Every partition this hub does not decide is kept warm (a [`crate::standby::Follower`]
/// tailing its record log), so taking it over costs what the follower had not read yet rather
/// than a load of the partition.
async fn follow_leases(mut events: mpsc::Receiver<LeaseEvent>, keeper: Keeper, held: HeldMap, d: Deciders) {
    let opts = crate::server::storage_options(&d.config).1;
    let follow = |p: Partition| {
        let (tx, rx) = watch::channel(None);
        d.standbys.lock().expect("standbys lock").insert(p, rx);
        crate::standby::Follower::start_reporting(d.url.clone(), opts, p, tx)
    };
    // `storage.warm_standby = false`: every takeover loads the partition from the tables.
    let keep_warm = d.config.storage.warm_standby;
    let mut warm: BTreeMap<Partition, crate::standby::Follower> =
        d.partitions.all().filter(|_| keep_warm).map(|p| (p, follow(p))).collect();
    while let Some(event) = events.recv().await {
        match event {
            LeaseEvent::Gained { partition, epoch, .. } => {
                d.standbys.lock().expect("standbys lock").remove(&partition);
                let standby = match warm.remove(&partition) {
                    Some(f) => f.stop().await,
                    None => None,
                };
                match open(&d, partition, epoch, standby).await {
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
                }
            }
            LeaseEvent::Releasing(partition) => {
                let gone = held.lock().expect("held lock").remove(&partition);
                // Its queued commits finish or are fenced off once the next holder's epoch is in
                // place; nothing of them is lost (a merge not applied stays logged).
                gone.into_iter().for_each(Held::stop);
                tracing::info!(partition, "handed the partition over (another hub's share)");
                keeper.released(partition).await;
                if keep_warm {
                    warm.insert(partition, follow(partition));
                }
            }
            LeaseEvent::Lost(partition) => {
                let gone = held.lock().expect("held lock").remove(&partition);
                gone.into_iter().for_each(Held::stop);
                if keep_warm {
                    warm.insert(partition, follow(partition));
                }
                tracing::warn!(
                    partition,
                    "lost the partition's lease (another hub took it over); stopped deciding for it"
                );
            }
        }
    }
}

/// Opens partition `partition`'s decider at `epoch`, with its API and its tasks.
async fn open(
    d: &Deciders,
    partition: Partition,
    epoch: i64,
    warm: Option<crate::standby::Warm>,
) -> Result<Held, HubError> {
    let (sql, opts) = crate::server::storage_options(&d.config);
    let fence = Fence::holding(d.lease, epoch);
    let engine = Arc::new(Engine::open_target(&d.target, sql, opts, Some(fence), warm, partition).await?);
    let engine_warm = engine.opened_warm();
    let client = crate::postgres::connect(&d.url).await?;
    let catalog = crate::catalog::HubCatalog::load_for_takeover(engine.as_ref()).await?;
    let hub = crate::state::Hub::with_ledger(engine.clone(), catalog, d.metrics.clone());
    let app = crate::server::api_app(&d.config, &hub);
    let every = Duration::from_millis(d.config.reservations.expiry_check_ms);
    let tasks = vec![
        tokio::spawn(crate::syncplane::apply_forever(engine, client, partition, APPLY_POLL, d.wake.clone())),
        tokio::spawn(crate::server::expire_leases(hub.clone(), every)),
        tokio::spawn(crate::server::watch_catalog_imports(hub)),
    ];
    Ok(Held { app, epoch, warm: engine_warm, tasks })
}

/// State of a partitioned hub's HTTP fronts (public and internal).
#[derive(Clone)]
struct Front {
    hub_id: String,
    partitions: shelfsync_hub_core::Partitions,
    held: HeldMap,
    standbys: Standbys,
    leases: watch::Receiver<BTreeMap<Partition, i64>>,
    /// For who holds what, and which partition holds a reservation.
    db: Arc<tokio_postgres::Client>,
    /// The internal API's client.
    peers: reqwest::Client,
    lease: Duration,
    max_body_bytes: usize,
    /// Slots for live feeds (`/v1/events`).
    streams: Arc<tokio::sync::Semaphore>,
    /// Set when the hub stops: live feeds end.
    stopping: watch::Receiver<bool>,
    /// The agents' sessions here (which stores are connected) and the process's metrics.
    agents: Arc<crate::state::Hub<crate::plane::Plane>>,
}

impl Front {
    /// A partition held here (none: partition 0, wherever it is held), for what every
    /// partition answers alike.
    fn local_partition(&self) -> Partition {
        self.held.lock().expect("held lock").keys().next().copied().unwrap_or(0)
    }
}

/// Where a request goes.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    /// To this partition's decider.
    Partition(Partition),
    /// `GET /v1/changes`: every partition's page, merged.
    Changes,
    /// `GET /v1/events`: every partition's feed, merged, live.
    Events,
    /// `POST /v1/restocks` of lines of several partitions (its body).
    SplitRestock(serde_json::Value),
    /// `POST /v1/restocks/batch` of lines of several partitions (its body).
    SplitRestockBatch(serde_json::Value),
    /// `POST /v1/reservations` or `/v1/transfers` of lines of several partitions (its body).
    SplitWhole(split::Whole, serde_json::Value),
    /// A split reservation's or transfer's own route: its id and parts (partition, part key).
    WholeParts(split::Whole, String, Vec<(Partition, String)>),
    /// `GET /v1/availability?sku=…`: each partition asked for its SKUs.
    AvailabilityBatch,
    /// A list over every partition, in this order.
    List(split::Order),
    /// `GET /v1/overview`: every partition's figures, added up.
    Overview,
    /// A change every partition's decider makes alike (a sales channel's `PUT` or `DELETE`).
    Everywhere,
    /// `GET /metrics`: this hub process's.
    Metrics,
    /// What every partition answers alike (tokens, stores, the API's description, and what
    /// no route serves: a 404 or 405): one held here if any.
    Any,
    /// The database could not say where a request goes (why).
    Unavailable(String),
}

/// The partition of a set of SKUs, if they share one (`None`: several).
fn one_partition<'a>(
    parts: shelfsync_hub_core::Partitions,
    skus: impl IntoIterator<Item = &'a str>,
) -> Option<Partition> {
    let mut seen: Option<Partition> = None;
    for s in skus {
        let Ok(sku) = s.parse::<shelfsync_shared::Sku>() else {
            // The partition's API says what is wrong with it.
            return Some(seen.unwrap_or(0));
        };
        let p = parts.of(&sku);
        if seen.is_some_and(|q| q != p) {
            return None;
        }
        seen = Some(p);
    }
    Some(seen.unwrap_or(0))
}

/// Where a reservation's or a transfer's own route goes: the partition whose row `sql` finds
/// by the UUID `id` names (a UUID, or the key it was made with), else its parts if it was
/// split, else partition 0 (whose API answers 404, or 422 for a malformed id).
async fn whole_route(front: &Front, whole: split::Whole, id: &str, sql: &str) -> Route {
    let uuid = shelfsync_shared::key::IdempotencyKey::parse(id).map(|k| k.id().to_string()).unwrap_or_default();
    match front.db.query_opt(sql, &[&uuid]).await {
        Ok(Some(r)) => Route::Partition(Partition::try_from(r.get::<_, i16>(0)).unwrap_or(0)),
        Ok(None) => match split::parts_of(front, whole, id).await {
            Ok(parts) if !parts.is_empty() => Route::WholeParts(whole, id.to_string(), parts),
            Ok(_) => Route::Partition(0),
            Err(e) => Route::Unavailable(format!("cannot find the parts: {e}")),
        },
        Err(e) => Route::Unavailable(format!("cannot find the partition: {e}")),
    }
}

/// Which partition decides a request (`body`: its JSON, for the lines).
async fn route(front: &Front, method: &axum::http::Method, uri: &axum::http::Uri, body: &[u8]) -> Route {
    use axum::http::Method;
    let path = uri.path();
    let segs: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    // The body's JSON, for the routes that read it (a body that is not JSON goes to a
    // partition's API, which says so).
    let json = || serde_json::from_slice::<serde_json::Value>(body).unwrap_or_default();
    let skus = |lines: &serde_json::Value| -> Vec<String> {
        lines.as_array().into_iter().flatten().filter_map(|l| l["sku"].as_str().map(str::to_owned)).collect()
    };
    // One partition's, or split (`split` makes the route from the body).
    let by_lines = |v: serde_json::Value, skus: Vec<String>, split: fn(serde_json::Value) -> Route| match one_partition(
        front.partitions,
        skus.iter().map(String::as_str),
    ) {
        Some(p) => Route::Partition(p),
        None => split(v),
    };
    match (method, segs.as_slice()) {
        (&Method::GET, ["v1", "availability", sku]) | (_, ["v1", "catalog", sku]) => {
            Route::Partition(one_partition(front.partitions, [*sku]).unwrap_or(0))
        }
        (&Method::GET, ["v1", "availability"]) => Route::AvailabilityBatch,
        (&Method::POST, ["v1", "reservations"]) => {
            let v = json();
            let skus = skus(&v["lines"]);
            by_lines(v, skus, |v| Route::SplitWhole(split::Whole::Reservation, v))
        }
        (&Method::POST, ["v1", "transfers"]) => {
            let v = json();
            let skus = skus(&v["lines"]);
            by_lines(v, skus, |v| Route::SplitWhole(split::Whole::Transfer, v))
        }
        (&Method::POST, ["v1", "restocks"]) => {
            let v = json();
            let skus = skus(&v["lines"]);
            by_lines(v, skus, Route::SplitRestock)
        }
        (&Method::POST, ["v1", "restocks", "batch"]) => {
            let v = json();
            let skus = v["restocks"].as_array().into_iter().flatten().flat_map(|e| skus(&e["lines"])).collect();
            by_lines(v, skus, Route::SplitRestockBatch)
        }
        (&Method::POST, ["v1", "stores", _, "adjustments"]) => {
            Route::Partition(one_partition(front.partitions, json()["sku"].as_str()).unwrap_or(0))
        }
        (&Method::GET, ["v1", "transfers"]) => Route::List(split::Order::NewestFirst("shipped_at")),
        (_, ["v1", "reservations", id, ..]) => {
            // By its UUID, which the id names (a UUID, or the key it was made with).
            let sql = "SELECT partition FROM decisions WHERE kind = 'reservation' AND key = $1 LIMIT 1";
            whole_route(front, split::Whole::Reservation, id, sql).await
        }
        (_, ["v1", "transfers", id, ..]) => {
            let sql = "SELECT partition FROM transfers WHERE id = $1 LIMIT 1";
            whole_route(front, split::Whole::Transfer, id, sql).await
        }
        (&Method::GET, ["v1", "conflicts"]) => {
            let sku = axum::extract::Query::<Vec<(String, String)>>::try_from_uri(uri)
                .ok()
                .and_then(|q| q.0.into_iter().find(|(k, _)| k == "sku").map(|(_, v)| v));
            match sku {
                Some(sku) => Route::Partition(one_partition(front.partitions, [sku.as_str()]).unwrap_or(0)),
                None => Route::List(split::Order::NewestFirst("detected_at")),
            }
        }
        (&Method::GET, ["v1", "reservations"]) => Route::List(split::Order::NewestFirst("created_at")),
        (&Method::GET, ["v1", "overview"]) => Route::Overview,
        (&Method::PUT | &Method::DELETE, ["v1", "channels", _]) => Route::Everywhere,
        (&Method::GET, ["metrics"]) => Route::Metrics,
        (&Method::GET, ["v1", "stores", _, "stock"]) => Route::List(split::Order::BySku),
        (&Method::POST, ["v1", "conflicts", id, "resolve"]) => {
            let row = front
                .db
                .query_opt("SELECT partition FROM decisions WHERE kind = 'conflict' AND key = $1 LIMIT 1", &[id])
                .await;
            match row {
                Ok(r) => Route::Partition(r.map_or(0, |r| Partition::try_from(r.get::<_, i16>(0)).unwrap_or(0))),
                Err(e) => Route::Unavailable(format!("cannot find the conflict's partition: {e}")),
            }
        }
        (&Method::GET, ["v1", "changes"]) => Route::Changes,
        (&Method::GET, ["v1", "events"]) => Route::Events,
        // The rest every partition answers alike: tokens, stores, catalog pages, the shrink
        // report, the API's description, the dashboard page, a catalog import (the catalog is
        // one document: the partition importing it decides its SKUs' rules at once, the others
        // pick the document up within a second, as after an edit by the CLI), and what no route
        // serves (a 404 or 405).
        _ => Route::Any,
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

fn unavailable(why: String) -> axum::response::Response {
    error(axum::http::StatusCode::SERVICE_UNAVAILABLE, "no_active_hub", format!("{why}; retry"), "1")
}

/// `/healthz` with the partitions this hub decides; a request about one partition served here
/// or forwarded to its holder; one over several split or gathered.
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
        let deciding: Vec<serde_json::Value> = front
            .held
            .lock()
            .expect("held lock")
            .iter()
            .map(|(p, h)| serde_json::json!({"partition": p, "epoch": h.epoch, "warm": h.warm}))
            .collect();
        let standby: Vec<serde_json::Value> = front
            .standbys
            .lock()
            .expect("standbys lock")
            .iter()
            .filter_map(|(p, rx)| {
                let (cursor, records) = (*rx.borrow())?;
                Some(serde_json::json!({"partition": p, "record_log": cursor, "records": records}))
            })
            .collect();
        return axum::Json(serde_json::json!({
            "status": "ok",
            "role": "partitioned",
            "hub": front.hub_id,
            "partitions": partitions,
            "deciding": deciding,
            "standby": standby,
        }))
        .into_response();
    }
    let (parts, body) = req.into_parts();
    // A catalog import's CSV may be larger than any other body.
    let limit = if parts.uri.path() == "/v1/catalog-imports" {
        crate::api::CATALOG_IMPORT_MAX_BYTES
    } else {
        front.max_body_bytes
    };
    let body = match axum::body::to_bytes(body, limit).await {
        Ok(b) => b,
        Err(e) => return error(axum::http::StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", e.to_string(), "1"),
    };
    // A front's request for one partition's part of a gathered answer (only hubs reach the
    // internal door).
    let pinned = (!may_forward)
        .then(|| parts.headers.get(PARTITION)?.to_str().ok()?.parse::<Partition>().ok())
        .flatten()
        .filter(|p| *p < front.partitions.count());
    let partition = match pinned {
        Some(p) => p,
        None => match route(&front, &parts.method, &parts.uri, &body).await {
            Route::Partition(p) => p,
            Route::Changes => return feed::changes(&front, &parts).await.unwrap_or_else(|r| r),
            Route::Events => return feed::events(front, parts).await.unwrap_or_else(|r| r),
            Route::SplitRestock(json) => return split::restock(&front, &parts, json).await,
            Route::SplitRestockBatch(json) => return split::restock_batch(&front, &parts, json).await,
            Route::SplitWhole(whole, json) => return split::all_or_none(&front, &parts, whole, json).await,
            Route::WholeParts(whole, id, split) => {
                return split::on_parts(&front, &parts, whole, &id, split, &body).await;
            }
            Route::AvailabilityBatch => return split::availability(&front, &parts).await,
            Route::List(order) => return split::gather_list(&front, &parts, order).await,
            Route::Overview => return split::overview(&front, &parts).await,
            Route::Everywhere => return split::everywhere(&front, &parts, &body).await,
            Route::Metrics => return metrics(&front, &parts).await.unwrap_or_else(|r| r),
            Route::Any => front.local_partition(),
            Route::Unavailable(why) => return unavailable(why),
        },
    };
    to_partition(&front, partition, parts, body, may_forward).await
}

/// Serves a request on `partition`'s decider: here when this hub holds it, else forwarded to
/// the hub that does (waiting out a hand-over, at most a lease and a second).
async fn to_partition(
    front: &Front,
    partition: Partition,
    parts: axum::http::request::Parts,
    body: axum::body::Bytes,
    may_forward: bool,
) -> axum::response::Response {
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
                return unavailable(format!("no hub decides partition {partition} (a takeover is under way); retry"));
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
            if !crate::server::hop_by_hop(name) && name != PARTITION {
                out = out.header(name, value);
            }
        }
        out = out.header(PARTITION, partition.to_string());
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

/// A `method` of `path` for one partition with the caller's headers, except what belongs to
/// the whole request (its idempotency key, its body's length, where a feed resumes); `json`:
/// it carries a JSON body.
fn sub_request_with(
    parts: &axum::http::request::Parts,
    method: axum::http::Method,
    path: &str,
    json: bool,
) -> axum::http::request::Parts {
    let mut b = axum::http::Request::builder().method(method).uri(path);
    for (name, value) in parts.headers.iter() {
        let skip = crate::server::hop_by_hop(name)
            || name == axum::http::header::CONTENT_LENGTH
            || name == axum::http::header::CONTENT_TYPE
            || name.as_str() == "last-event-id"
            || name.as_str() == "idempotency-key"
            || name == PARTITION;
        if !skip {
            b = b.header(name, value);
        }
    }
    if json {
        b = b.header(axum::http::header::CONTENT_TYPE, "application/json");
    }
    b.body(()).expect("a request of valid parts").into_parts().0
}

/// Partition `p`'s answer to `GET path` as JSON, or its answer as is when that is not a 200.
async fn part_json(
    front: &Front,
    p: Partition,
    parts: &axum::http::request::Parts,
    path: &str,
) -> Result<serde_json::Value, axum::response::Response> {
    let a = split::call(front, p, parts, axum::http::Method::GET, path, None, None).await;
    if a.status == axum::http::StatusCode::OK {
        Ok(a.body)
    } else {
        Err(a.into_response())
    }
}

/// `GET /metrics` on a partitioned hub: this process's counters (every decider it runs, its
/// agents' sessions, its HTTP edge: one set, shared) and, read from the database at the
/// scrape, the chain's stores (connected: to this hub), open conflicts of every partition and
/// the feed's events over every partition. The caller's token is checked by a partition's API
/// (the role `/v1/stores` wants, as `/metrics` on one hub).
async fn metrics(
    front: &Front,
    parts: &axum::http::request::Parts,
) -> Result<axum::response::Response, axum::response::Response> {
    part_json(front, front.local_partition(), parts, "/v1/stores").await?;
    let unavailable = |e: tokio_postgres::Error| {
        error(axum::http::StatusCode::SERVICE_UNAVAILABLE, "unavailable", e.to_string(), "1")
    };
    let now_ms = shelfsync_node::now_ms();
    let rows = front
        .db
        .query(
            "SELECT s.id, s.last_seen_ms, s.revoked_at_ms IS NOT NULL,
                    GREATEST(COALESCE(q.counter, 0) - COALESCE((SELECT MAX(acked) FROM peers p WHERE p.store = s.id), 0), 0)
             FROM stores s LEFT JOIN store_seqs q ON q.store = s.id ORDER BY s.id",
            &[],
        )
        .await
        .map_err(unavailable)?;
    let stores = rows
        .iter()
        .map(|r| {
            let store: String = r.get(0);
            let connected = store.parse().ok().is_some_and(|id| front.agents.live(&id).is_some());
            crate::metrics::StoreGauge {
                connected,
                last_seen_age_secs: r.get::<_, Option<i64>>(1).map(|t| (now_ms - t).max(0) as f64 / 1000.0),
                unacked_entries: (r.get::<_, i64>(3).max(0) as u64).min(crate::metrics::UNACKED_COUNT_MAX as u64),
                revoked: r.get(2),
                // The rights live in every partition's rows; not summed at a scrape here.
                escrow_granted: None,
                store,
            }
        })
        .collect();
    let open: BTreeMap<String, i64> = front
        .db
        .query(
            "SELECT body::jsonb->>'kind', COUNT(*) FROM decisions
             WHERE kind = 'conflict' AND body::jsonb->>'status' = 'open' GROUP BY 1",
            &[],
        )
        .await
        .map_err(unavailable)?
        .iter()
        .filter_map(|r| Some((r.get::<_, Option<String>>(0)?, r.get(1))))
        .collect();
    let conflicts_open = shelfsync_hub_core::ConflictKind::ALL
        .iter()
        .map(|k| (k.as_str(), open.get(k.as_str()).copied().unwrap_or(0).max(0) as u64))
        .collect();
    let feed_head: i64 = front
        .db
        .query_one(
            "SELECT COALESCE(SUM(m), 0)::int8 FROM (SELECT MAX(cursor) AS m FROM feed GROUP BY partition) h",
            &[],
        )
        .await
        .map_err(unavailable)?
        .get(0);
    // Channels' available-to-sell is every decider's to sum: not shown on a partitioned hub.
    let snapshot = crate::metrics::Snapshot {
        stores,
        conflicts_open,
        feed_head: feed_head.max(0) as u64,
        channel_ats: Vec::new(),
    };
    Ok(crate::metrics::render(&front.agents.metrics, snapshot))
}
