//! What the hub's tasks share: storage, the registry of live agent connections, the per-store
//! change notifications that wake their sync sessions, and metrics.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use shelfsync_node::db::Heads;
use shelfsync_shared::{Sku, StoreId};
use tokio::sync::{broadcast, watch};

use crate::engine::Engine;
use crate::ledger::AgentLedger;
use crate::metrics::Metrics;
use crate::storage::{HubHeads, StorageError};
use shelfsync_shared::lineage::Boot;
use shelfsync_shared::WriterId;

/// One live agent connection.
#[derive(Clone)]
pub struct LiveConn {
    /// Registry id of this connection.
    pub id: u64,
    /// The QUIC connection (to close it on revocation).
    pub conn: quinn::Connection,
    /// Serial of the certificate it authenticated with.
    pub serial: String,
    /// When it connected (ms).
    pub since_ms: i64,
    /// The agent's writer and starts, once it said hello.
    pub writer: Option<WriterId>,
    /// The agent's latest starts (from its hello).
    pub boots: Vec<Boot>,
    /// Answers to liveness probes.
    pub pongs: Arc<Pongs>,
}

/// The last probe nonce a connection's agent answered, and a wake-up for whoever waits on it.
#[derive(Debug, Default)]
pub struct Pongs {
    last: AtomicU64,
    notify: tokio::sync::Notify,
}

impl Pongs {
    /// The agent answered probe `nonce`.
    pub fn answered(&self, nonce: u64) {
        self.last.fetch_max(nonce, Ordering::Relaxed);
        self.notify.notify_waiters();
    }
}

/// A store's `on_hand` of a SKU changed at the hub (after the commit).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StockChange {
    /// Where.
    pub store: StoreId,
    /// What.
    pub sku: Sku,
    /// The new value.
    pub on_hand: i64,
}

/// Capacity of the stock change broadcast; slow subscribers see `Lagged` and must re-read.
pub const STOCK_EVENTS_CAPACITY: usize = 16_384;

/// State shared by every hub task.
pub struct Hub<L = Engine> {
    /// Durable state: one decider's engine, or the sync plane of a partitioned database.
    pub storage: Arc<L>,
    /// The catalog documents.
    pub catalog: Arc<crate::catalog::HubCatalog>,
    /// Counters.
    pub metrics: Arc<Metrics>,
    live: Mutex<HashMap<StoreId, Vec<LiveConn>>>,
    /// Serialises taking a new life (several stores may reveal the same restore at once).
    reincarnating: tokio::sync::Mutex<()>,
    /// Wakes whoever waits for a connection to finish (its last write done).
    ended: tokio::sync::Notify,
    wakers: Mutex<HashMap<StoreId, watch::Sender<Heads>>>,
    next_conn: AtomicU64,
    stock_events: broadcast::Sender<StockChange>,
    /// Per token id: when this process last asked storage to record a use (throttles those writes).
    token_uses: Mutex<HashMap<uuid::Uuid, i64>>,
    /// Set when the hub begins to stop: long-lived answers (event streams) end at once.
    stopping: watch::Sender<bool>,
}

/// Most tokens whose last write of "last used" this process remembers.
const TOKEN_USES_MAX: usize = 10_000;

impl Hub {
    /// Wraps a storage.
    pub fn new(storage: Arc<Engine>, catalog: Arc<crate::catalog::HubCatalog>) -> Arc<Hub> {
        Self::with_metrics(storage, catalog, Metrics::default())
    }

    /// [`Hub::new`] with its metrics made already (sharing an HTTP edge's counters).
    pub fn with_metrics(storage: Arc<Engine>, catalog: Arc<crate::catalog::HubCatalog>, metrics: Metrics) -> Arc<Hub> {
        Hub::with_ledger(storage, catalog, Arc::new(metrics))
    }

    /// Judges a presented API token now. Every call reads the token's row (one primary-key read
    /// on a reader thread), so a revocation or expiry written by any process counts from the very
    /// next request. A valid token's last use is recorded in the background, at most once per
    /// [`crate::tokens::LAST_USED_RESOLUTION_MS`] per token.
    pub async fn authenticate(&self, token: &str) -> Result<crate::tokens::Verdict, crate::storage::StorageError> {
        let found = self.storage.token_by_hash(crate::api::token_hash(token)).await?;
        let now = shelfsync_node::now_ms();
        let verdict = crate::tokens::Verdict::of(found, now);
        if let crate::tokens::Verdict::Valid(t) = &verdict {
            self.note_token_use(t, now);
        }
        Ok(verdict)
    }

    fn note_token_use(&self, t: &crate::tokens::TokenInfo, now: i64) {
        use crate::tokens::LAST_USED_RESOLUTION_MS as RES;
        if t.last_used_at_ms.is_some_and(|at| now - at < RES) {
            return;
        }
        {
            // Requests racing past the check above before the first write lands write once.
            let mut uses = self.token_uses.lock().expect("token uses lock");
            if uses.get(&t.id).is_some_and(|at| now - at < RES) {
                return;
            }
            if uses.len() >= TOKEN_USES_MAX {
                uses.retain(|_, at| now - *at < RES);
            }
            uses.insert(t.id, now);
        }
        let (storage, id) = (self.storage.clone(), t.id);
        tokio::spawn(async move {
            if let Err(e) = storage.touch_token(id, now).await {
                tracing::warn!(token = %id, error = %e, "cannot record a token's last use");
            }
        });
    }
}

impl<L: AgentLedger> Hub<L> {
    /// Wraps a ledger: what the agents' sessions read and write.
    /// `metrics` may be shared (a partitioned hub's deciders and agent sessions count in one).
    pub fn with_ledger(
        storage: Arc<L>,
        catalog: Arc<crate::catalog::HubCatalog>,
        metrics: Arc<Metrics>,
    ) -> Arc<Hub<L>> {
        Arc::new(Hub {
            storage,
            catalog,
            metrics,
            live: Mutex::default(),
            reincarnating: tokio::sync::Mutex::new(()),
            ended: tokio::sync::Notify::new(),
            wakers: Mutex::default(),
            next_conn: AtomicU64::new(1),
            stock_events: broadcast::channel(STOCK_EVENTS_CAPACITY).0,
            token_uses: Mutex::default(),
            stopping: watch::channel(false).0,
        })
    }

    /// The hub begins to stop: event streams end (cleanly) instead of holding the shutdown.
    pub fn begin_stop(&self) {
        self.stopping.send_replace(true);
    }

    /// Resolves once the hub begins to stop.
    pub async fn stopped(&self) {
        let mut rx = self.stopping.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Registers a connection of `store`. Whether it may stay is decided once its agent says who
    /// it is ([`Hub::said_hello`], [`Hub::probe`]). Returns the registry id and its pongs.
    pub fn connected(&self, store: &StoreId, conn: quinn::Connection, serial: String) -> (u64, Arc<Pongs>) {
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let since_ms = shelfsync_node::now_ms();
        let pongs = Arc::new(Pongs::default());
        let c = LiveConn { id, conn, serial, since_ms, writer: None, boots: Vec::new(), pongs: pongs.clone() };
        let mut live = self.live.lock().expect("live lock");
        let conns = live.entry(store.clone()).or_default();
        if conns.is_empty() {
            // Under the lock: connectivity changes reach the decider in the order they happen.
            self.storage.set_connected(store, true);
        }
        conns.push(c);
        (id, pongs)
    }

    /// Connection `id` of `store` said hello as `writer`.
    pub fn said_hello(&self, store: &StoreId, id: u64, writer: WriterId, boots: Vec<Boot>) {
        if let Some(c) =
            self.live.lock().expect("live lock").get_mut(store).and_then(|v| v.iter_mut().find(|c| c.id == id))
        {
            c.writer = Some(writer);
            c.boots = boots;
        }
    }

    /// Forgets connection `id` of `store` (its session and every write it started are done).
    pub fn disconnected(&self, store: &StoreId, id: u64) {
        {
            let mut live = self.live.lock().expect("live lock");
            if let Some(v) = live.get_mut(store) {
                v.retain(|c| c.id != id);
                if v.is_empty() {
                    live.remove(store);
                    self.storage.set_connected(store, false);
                }
            }
        }
        self.ended.notify_waiters();
    }

    /// Waits (at most `limit`) until connection `id` of `store` has finished.
    async fn finished(&self, store: &StoreId, id: u64, limit: std::time::Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let waiting = self.ended.notified();
            if !self.agents(store).iter().any(|c| c.id == id) {
                return;
            }
            tokio::select! {
                _ = waiting => {}
                _ = tokio::time::sleep_until(deadline) => return,
            }
        }
    }

    /// The (oldest) live connection of a store.
    pub fn live(&self, store: &StoreId) -> Option<LiveConn> {
        self.live.lock().expect("live lock").get(store).and_then(|v| v.first().cloned())
    }

    /// Every live connection of a store.
    pub fn agents(&self, store: &StoreId) -> Vec<LiveConn> {
        self.live.lock().expect("live lock").get(store).cloned().unwrap_or_default()
    }

    /// Asks every other connection of `store` that said hello whether its agent is alive (a
    /// `Ping` it must answer within four round trips plus 250 ms, at most `timeout`). Connections that do not answer are closed: their
    /// agent is gone (it restarted before the hub noticed). Returns the live ones.
    pub async fn probe(&self, store: &StoreId, except: u64, timeout: std::time::Duration) -> Vec<LiveConn> {
        let others: Vec<LiveConn> =
            self.agents(store).into_iter().filter(|c| c.id != except && c.writer.is_some()).collect();
        if others.is_empty() {
            return others;
        }
        let nonce = {
            let wakers = self.wakers.lock().expect("wakers lock");
            let Some(w) = wakers.get(store) else { return others };
            let mut n = 0;
            w.send_modify(|h| {
                h.ping += 1;
                n = h.ping;
            });
            n
        };
        let start = tokio::time::Instant::now();
        let mut alive = Vec::new();
        for c in others {
            // A live agent answers within a few round trips; a crashed one never does, and its
            // successor should not wait long: give each connection what its path needs.
            let wait = timeout.min(c.conn.rtt() * 4 + std::time::Duration::from_millis(250));
            tracing::debug!(%store, rtt = ?c.conn.rtt(), ?wait, "probing a live connection of the store");
            let deadline = start + wait;
            let answered = loop {
                let waiting = c.pongs.notify.notified();
                if c.pongs.last.load(Ordering::Relaxed) >= nonce {
                    break true;
                }
                if c.conn.close_reason().is_some() {
                    break false;
                }
                tokio::select! {
                    _ = waiting => {}
                    _ = tokio::time::sleep_until(deadline) => break c.pongs.last.load(Ordering::Relaxed) >= nonce,
                }
            };
            if answered {
                alive.push(c);
            } else {
                tracing::info!(%store, writer = ?c.writer.as_ref().map(ToString::to_string), "closing a connection whose agent no longer answers");
                c.conn.close(quinn::VarInt::from_u32(0), b"superseded: did not answer a probe");
                // What it was writing commits (or fails) before the newcomer reads the store's
                // state: two sessions of one writer never overlap.
                self.finished(store, c.id, std::time::Duration::from_secs(10)).await;
            }
        }
        alive
    }

    /// The hub's files turned out older than what a store saw of its current life: take a new
    /// life (storage records the conflict) and close every connection, so every store starts its
    /// watermarks over and gives back the entries it holds. Only once per life, however many
    /// stores reveal it at once. Returns whether this call did it.
    pub async fn reincarnate(&self, seen_by: &StoreId, life: &WriterId, why: String) -> Result<bool, StorageError> {
        let _one = self.reincarnating.lock().await;
        if self.storage.life() != *life {
            return Ok(false);
        }
        let new = self.storage.reincarnate(why.clone(), shelfsync_node::now_ms()).await?;
        Metrics::inc(&self.metrics.hub_rollbacks_total);
        tracing::error!(store = %seen_by, old = %life, new = %new, reason = %why,
            "the hub's files are older than what a store saw of them (restored or copied); took a new life: \
             every store reconnects and gives back the hub's entries it holds");
        for (_, c) in self.all_live() {
            c.conn.close(quinn::VarInt::from_u32(0), b"the hub took a new life; reconnect");
        }
        Ok(true)
    }

    /// Stores whose holds changed: wakes their sessions to send a new snapshot.
    pub fn holds_changed(&self, stores: &[StoreId]) {
        let wakers = self.wakers.lock().expect("wakers lock");
        for s in stores {
            if let Some(w) = wakers.get(s) {
                w.send_modify(|h| h.holds += 1);
            }
        }
    }

    /// The catalog changed: wakes every store's session to send it.
    pub fn catalog_changed(&self) {
        for w in self.wakers.lock().expect("wakers lock").values() {
            w.send_modify(|h| h.catalog += 1);
        }
    }

    /// Every live connection.
    pub fn all_live(&self) -> Vec<(StoreId, LiveConn)> {
        self.live
            .lock()
            .expect("live lock")
            .iter()
            .flat_map(|(s, v)| v.iter().map(|c| (s.clone(), c.clone())))
            .collect()
    }

    /// A receiver that wakes when `store`'s data at the hub changes.
    pub fn subscribe(&self, store: &StoreId, now: HubHeads) -> watch::Receiver<Heads> {
        let mut wakers = self.wakers.lock().expect("wakers lock");
        wakers
            .entry(store.clone())
            .or_insert_with(|| {
                watch::channel(Heads { counter: now.counter, journal: now.journal, holds: 0, catalog: 0, ping: 0 }).0
            })
            .subscribe()
    }

    /// Every committed change of a store's `on_hand`, as it happens.
    pub fn stock_events(&self) -> broadcast::Receiver<StockChange> {
        self.stock_events.subscribe()
    }

    /// Publishes committed stock changes.
    pub fn stock_changed(&self, changes: impl IntoIterator<Item = StockChange>) {
        for c in changes {
            let _ = self.stock_events.send(c);
        }
    }

    /// `stores`' data changed; the heads are now `heads`. Wakes their sessions.
    pub fn notify(&self, stores: &[StoreId], heads: HubHeads) {
        let wakers = self.wakers.lock().expect("wakers lock");
        for s in stores {
            if let Some(w) = wakers.get(s) {
                w.send_modify(|h| {
                    h.counter = h.counter.max(heads.counter);
                    h.journal = h.journal.max(heads.journal);
                });
            }
        }
    }
}
