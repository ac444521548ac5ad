//! A hub on a PostgreSQL database of several partitions (`init --partitions N`): it holds its
//! share of the partitions' leases ([`crate::cluster::keep`]), runs one decider per partition it
//! holds, each following the sync plane's merges of its SKUs ([`crate::syncplane`]), and hands
//! partitions over as hubs join and leave. Any hub's deciders stay fenced by their partition's
//! epoch, so a hub that lost a partition cannot write for it.
//!
//! **Built so far, and what is not.** The leases, the deciders and the merges they apply are
//! real. The public API's router by partition and the agents' QUIC path through the sync plane
//! are not built yet (`hub/docs/scale-out.md`, "Not built yet"): the HTTP API answers `/healthz`
//! (with the partitions this hub decides) and 503 `not_built` for everything else, saying so,
//! and agents are refused (they try the next hub of their bundle, and keep selling offline).

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

/// How often a decider looks at its merge log when no wake-up came.
const APPLY_POLL: Duration = Duration::from_millis(200);

/// A partition this hub decides for.
struct Held {
    engine: Arc<Engine>,
    apply: JoinHandle<()>,
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
        for h in held {
            h.apply.abort();
            drop(h.engine);
        }
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
    let (keeper, events) = crate::cluster::keep(coord, partitions);
    let mut tasks = Vec::new();
    // Any store's change anywhere wakes the deciders (each reads only its own rows).
    let (wake_tx, wake) = watch::channel(());
    let mut notices = crate::notify::listen(url.clone());
    tasks.push(tokio::spawn(async move {
        while notices.recv().await.is_some() {
            let _ = wake_tx.send(());
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
    let deciders = Deciders { config: config.clone(), target, url, lease, wake, changed: changed_tx };
    tasks.push(tokio::spawn(follow_leases(events, keeper.clone(), held.clone(), deciders)));
    // Agents: refused until their path through the sync plane is served here.
    let (never_tx, never) = watch::channel(false);
    let refusing = endpoint.clone();
    tasks.push(tokio::spawn(async move {
        let _open = never_tx;
        crate::server::refuse_agents(refusing, never).await
    }));
    let front = Front { hub_id: hub_id.clone(), held: keeper.watch() };
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
    let (sql, opts) = crate::server::storage_options(&d.config);
    while let Some(event) = events.recv().await {
        match event {
            LeaseEvent::Gained { partition, epoch, .. } => {
                let fence = Fence::holding(d.lease, epoch);
                let opened = Engine::open_target(&d.target, sql, opts, Some(fence), None, partition).await;
                let client = crate::postgres::connect(&d.url).await;
                match (opened, client) {
                    (Ok(engine), Ok(client)) => {
                        let engine = Arc::new(engine);
                        let apply = tokio::spawn(crate::syncplane::apply_forever(
                            engine.clone(),
                            client,
                            partition,
                            APPLY_POLL,
                            d.wake.clone(),
                            d.changed.clone(),
                        ));
                        tracing::info!(partition, epoch, "deciding for the partition");
                        held.lock().expect("held lock").insert(partition, Held { engine, apply });
                    }
                    (Err(e), _) | (_, Err(e)) => {
                        // Holding a lease without deciding would stall the partition: stop, so
                        // that another hub takes it once the lease expires.
                        shelfsync_node::fatal::stop(&format!("could not open partition {partition}'s decider: {e}"));
                        return;
                    }
                }
            }
            LeaseEvent::Releasing(partition) => {
                let gone = held.lock().expect("held lock").remove(&partition);
                if let Some(h) = gone {
                    h.apply.abort();
                    // Its queued commits finish or are fenced off once the next holder's epoch
                    // is in place; nothing of them is lost (a merge not applied stays logged).
                    drop(h.engine);
                }
                tracing::info!(partition, "handed the partition over (another hub's share)");
                keeper.released(partition).await;
            }
            LeaseEvent::Lost(partition) => {
                if let Some(h) = held.lock().expect("held lock").remove(&partition) {
                    h.apply.abort();
                }
                tracing::warn!(
                    partition,
                    "lost the partition's lease (another hub took it over); stopped deciding for it"
                );
            }
        }
    }
}

/// State of a partitioned hub's HTTP front.
#[derive(Clone)]
struct Front {
    hub_id: String,
    held: watch::Receiver<BTreeMap<Partition, i64>>,
}

/// `/healthz` with the partitions this hub decides; 503 `not_built` for the rest of the API.
async fn front_door(
    axum::extract::State(front): axum::extract::State<Front>,
    req: axum::extract::Request,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    if req.method() == axum::http::Method::GET && req.uri().path() == "/healthz" {
        let partitions: Vec<Partition> = front.held.borrow().keys().copied().collect();
        return axum::Json(serde_json::json!({
            "status": "ok",
            "role": "partitioned",
            "hub": front.hub_id,
            "partitions": partitions,
        }))
        .into_response();
    }
    let mut r = (
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        axum::Json(serde_json::json!({
            "error": "not_built",
            "message": "this hub decides for SKU partitions; routing the API to them is not built yet \
                        (hub/docs/scale-out.md): make the database with one partition to serve the API",
        })),
    )
        .into_response();
    r.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from_static("60"));
    r
}
