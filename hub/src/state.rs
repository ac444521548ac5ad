//! What the hub's tasks share: storage, the registry of live agent connections, the per-store
//! change notifications that wake their sync sessions, and metrics.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use shelfsync_agent::db::Heads;
use shelfsync_shared::{Sku, StoreId};
use tokio::sync::{broadcast, watch};

use crate::metrics::Metrics;
use crate::storage::{HubHeads, HubStorage};

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
pub struct Hub {
    /// Durable state.
    pub storage: Arc<dyn HubStorage>,
    /// The catalog documents.
    pub catalog: Arc<crate::catalog::HubCatalog>,
    /// Counters.
    pub metrics: Metrics,
    live: Mutex<HashMap<StoreId, LiveConn>>,
    wakers: Mutex<HashMap<StoreId, watch::Sender<Heads>>>,
    next_conn: AtomicU64,
    stock_events: broadcast::Sender<StockChange>,
    /// Per token id: when this process last asked storage to record a use (throttles those writes).
    token_uses: Mutex<HashMap<uuid::Uuid, i64>>,
}

/// Most tokens whose last write of "last used" this process remembers.
const TOKEN_USES_MAX: usize = 10_000;

impl Hub {
    /// Wraps a storage.
    pub fn new(storage: Arc<dyn HubStorage>, catalog: Arc<crate::catalog::HubCatalog>) -> Arc<Hub> {
        Arc::new(Hub {
            storage,
            catalog,
            metrics: Metrics::default(),
            live: Mutex::default(),
            wakers: Mutex::default(),
            next_conn: AtomicU64::new(1),
            stock_events: broadcast::channel(STOCK_EVENTS_CAPACITY).0,
            token_uses: Mutex::default(),
        })
    }

    /// Registers a connection of `store`, closing an older one of the same store (the agent has
    /// reconnected before the hub noticed the old one die). Returns the registry id.
    pub fn connected(&self, store: &StoreId, conn: quinn::Connection, serial: String) -> u64 {
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let since_ms = jiff::Timestamp::now().as_millisecond();
        let old = self.live.lock().expect("live lock").insert(store.clone(), LiveConn { id, conn, serial, since_ms });
        if let Some(old) = old {
            old.conn.close(quinn::VarInt::from_u32(0), b"superseded by a newer connection");
        }
        id
    }

    /// Forgets connection `id` of `store` (if it is still the registered one).
    pub fn disconnected(&self, store: &StoreId, id: u64) {
        let mut live = self.live.lock().expect("live lock");
        if live.get(store).is_some_and(|c| c.id == id) {
            live.remove(store);
        }
    }

    /// The live connection of a store.
    pub fn live(&self, store: &StoreId) -> Option<LiveConn> {
        self.live.lock().expect("live lock").get(store).cloned()
    }

    /// Judges a presented API token now. Every call reads the token's row (one primary-key read
    /// on a reader thread), so a revocation or expiry written by any process counts from the very
    /// next request. A valid token's last use is recorded in the background, at most once per
    /// [`crate::tokens::LAST_USED_RESOLUTION_MS`] per token.
    pub async fn authenticate(&self, token: &str) -> Result<crate::tokens::Verdict, crate::storage::StorageError> {
        let found = self.storage.token_by_hash(crate::api::token_hash(token)).await?;
        let now = jiff::Timestamp::now().as_millisecond();
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

    /// The time and the set of connected stores, for availability and reconciliation.
    pub fn now(&self) -> crate::reserve::Now {
        crate::reserve::Now {
            ms: jiff::Timestamp::now().as_millisecond(),
            connected: self.live.lock().expect("live lock").keys().cloned().collect(),
        }
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
        self.live.lock().expect("live lock").iter().map(|(s, c)| (s.clone(), c.clone())).collect()
    }

    /// A receiver that wakes when `store`'s data at the hub changes.
    pub fn subscribe(&self, store: &StoreId, now: HubHeads) -> watch::Receiver<Heads> {
        let mut wakers = self.wakers.lock().expect("wakers lock");
        wakers
            .entry(store.clone())
            .or_insert_with(|| {
                watch::channel(Heads { counter: now.counter, journal: now.journal, holds: 0, catalog: 0 }).0
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
