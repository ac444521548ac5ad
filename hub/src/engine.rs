//! The hub's runtime around the decider (DESIGN §5a): one thread owns the
//! [`Decider`](shelfsync_hub_core::Decider) and takes every decision; storage only persists.
//!
//! ```text
//! HTTP / QUIC tasks ──Job──▶ bounded queue ──▶ decider thread: apply a batch of jobs in order
//!        ▲                   (full: 503)              │ records + extra writes of the batch
//!        │                                            ▼
//!        └──── answers, after the commit ◀── SQLite writer: one transaction, one fsync per group
//! ```
//!
//! **Pipeline.** The decider thread drains up to `batch_max` jobs, applies them, hands the
//! batch's records (and the runtime's own rows written with them: peer watermarks and lineage,
//! catalog chunks, journal events) to the writer thread, and goes on with the next batch while
//! that one commits. Callers are answered by the writer after their batch's commit.
//!
//! **Invariants.**
//! - An answer is sent only after everything decided before it is durable: reads are jobs too,
//!   answered after the batches before them commit, so no reader sees an uncommitted decision.
//! - A failed commit is fatal (fail-stop, [`shelfsync_node::fatal`]): memory is ahead of the files,
//!   so the batch's callers and everyone after get 503, nothing more is written, and the process
//!   exits non-zero; a restart reloads the committed rows.
//! - The queue is bounded: when it is full a caller gets [`StorageError::Busy`] (503 with
//!   `Retry-After`) at once; memory never grows with load.
//! - Writes of other processes (the admin CLI) go to SQL only; the runtime reconciles the decider
//!   with them ([`Engine::sync_stores`], catalog chunks) before it relies on them.

use shelfsync_node::now_ms;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, RwLock};

use sha2::{Digest as _, Sha256};
use shelfsync_hub_core::{
    AgentConflictKind, CatalogRule, Channel, ChannelId, Command, Config, Decider, Done, FeedRead, HubChangeRequest,
    Loader, Refusal, ReservationRequest, ReservationView, Staleness, StoreFigures, Written,
};
use shelfsync_node::fatal;
use shelfsync_shared::counter::StateDigest;
use shelfsync_shared::lineage::{Boot, Checkpoint, HubLineage, RetireReason};
use shelfsync_shared::mac::MacKey;
use shelfsync_shared::sync::{DeltaRead, JournalRead};
use shelfsync_shared::wire::{Delta, HoldsSnapshot, IncomingSnapshot, JournalBatch, Retirement, RightsSnapshot};
use shelfsync_shared::{EventFlag, Incarnation, NodeId, Sku, StoreId, WriterId};
use tokio::sync::{oneshot, watch};
use uuid::Uuid;

use crate::db::{Commit, Committer, HubDb, SideWrite, Target};
use crate::storage::*;
use shelfsync_node::catalog::CatalogView;

/// How the runtime runs.
#[derive(Clone, Copy, Debug)]
pub struct EngineOptions {
    /// How silent stores are discounted online.
    pub staleness: Staleness,
    /// Jobs waiting for the decider at most (beyond: 503).
    pub queue_max: usize,
    /// Jobs decided per batch at most.
    pub batch_max: usize,
    /// Feed events kept in memory.
    pub feed_retain: usize,
    /// Escrow rights: on or off, and the chain's policy.
    pub escrow: shelfsync_hub_core::Escrow,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            staleness: Staleness::default(),
            queue_max: 16_384,
            batch_max: 1024,
            feed_retain: 100_000,
            escrow: shelfsync_hub_core::Escrow::default(),
        }
    }
}

impl EngineOptions {
    /// The decider's configuration, starting as `hub_writer`.
    pub fn decider_config(&self, hub_writer: WriterId) -> Config {
        Config {
            staleness: self.staleness,
            feed_retain: self.feed_retain,
            escrow: self.escrow,
            ..Config::new(hub_writer)
        }
    }
}

/// A row the runtime writes in the same transaction as a batch's records.
type Extra = crate::db::SideWrite;
type Reply = Box<dyn FnOnce(Result<(), StorageError>) + Send>;
type Job = Box<dyn FnOnce(&mut State, &mut Vec<Extra>) -> Reply + Send>;

/// What an agent writer's merges depend on, kept beside the decider.
#[derive(Clone, Debug, Default)]
struct PeerState {
    lineage: HubLineage,
    journal_applied: u64,
}

/// What the decider thread owns.
struct State {
    d: Decider,
    peers: HashMap<(StoreId, WriterId), PeerState>,
}

impl State {
    fn decide(&mut self, cmd: Command, now_ms: i64) -> StorageResult<Done> {
        self.d.apply(cmd, now_ms).map_err(StorageError::from)
    }
}

/// Stores whose sync connection opened or closed since the decider last looked (it discounts
/// silent stores); drained at the start of every batch, so no change is lost or reordered.
type Connectivity = Arc<std::sync::Mutex<Vec<(StoreId, bool)>>>;

/// Counter entries as a delta carries them: (SKU, writer, entry).
pub type StoreEntries = Vec<(Sku, WriterId, shelfsync_shared::PnEntry)>;

/// The entries of a store's delta the store may give: its own writers' entries, and others'
/// only with the tag the hub put on them (the indexes of those in the second list). Whichever
/// hub merges the delta checks this first (`Engine::apply_delta`, and the sync plane's caller).
pub fn authenticate(key: &MacKey, store: &StoreId, delta: &Delta) -> StorageResult<(StoreEntries, Vec<usize>)> {
    let tags: HashMap<u32, shelfsync_shared::mac::EntryMac> = delta.macs.iter().copied().collect();
    let mut entries = Vec::with_capacity(delta.entries.len());
    let mut tagged = Vec::new();
    for (i, (sku, writer, incoming)) in delta.entries().enumerate() {
        match tags.get(&(i as u32)) {
            Some(t) if !key.verify(store, sku, writer, incoming, t) => {
                return Err(StorageError::Invalid(format!(
                    "store {store} gave back an entry of {writer} for {sku} whose tag does not match; \
                     a store cannot make up entries it was not sent"
                )));
            }
            Some(_) => tagged.push(entries.len()),
            None if !writer.is_store(store) => {
                return Err(StorageError::Invalid(format!("writer {writer} may not write store {store}")));
            }
            None => {}
        }
        incoming.check(writer)?;
        entries.push((sku.clone(), writer.clone(), incoming));
    }
    Ok((entries, tagged))
}

/// Fails unless every event is the store's own (its store, one of its writers): what a store may
/// send in its journal, whichever hub takes it.
pub fn journal_belongs(store: &StoreId, events: &[shelfsync_shared::journal::JournalEvent]) -> StorageResult<()> {
    match events.iter().find(|e| e.store != *store || !e.writer.is_store(store)) {
        Some(e) => Err(StorageError::Invalid(format!("journal event {} does not belong to store {store}", e.id))),
        None => Ok(()),
    }
}

/// A conflict id derived from what makes two reports "the same".
fn conflict_id(parts: &[&str]) -> Uuid {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u32).to_be_bytes());
        h.update(p.as_bytes());
    }
    let mut b = [0u8; 16];
    b.copy_from_slice(&h.finalize()[..16]);
    uuid::Builder::from_random_bytes(b).into_uuid()
}

/// What head office should do about a conflict of `kind`.
fn agent_conflict_resolution(kind: AgentConflictKind) -> String {
    match kind {
        AgentConflictKind::DuplicateAgent => {
            "a second agent of this store was refused: switch one off (or allow several with `store agents`)"
        }
        AgentConflictKind::WriterCloned => {
            "the store's files run on two machines: the copy is refused while the other is live (it keeps selling \
             offline); switch one off, and its sales arrive under a new writer"
        }
        AgentConflictKind::StoreRolledBack => {
            "the store's files were put back; its later sales count under a new writer"
        }
        AgentConflictKind::HubRolledBack => "the hub's files are older than what the store saw",
    }
    .to_owned()
}

/// The decider's command for what a hub noticed about `store`'s agents (the sync plane's notes).
pub(crate) fn agent_note_cmd(store: &StoreId, note: &crate::syncplane::AgentNote) -> Command {
    match note {
        crate::syncplane::AgentNote::Conflict { kind, key, details } => {
            let details = serde_json::from_str(details).unwrap_or_else(|_| serde_json::json!({ "raw": details }));
            agent_conflict_cmd(*kind, store.clone(), key, agent_conflict_resolution(*kind), details)
        }
        crate::syncplane::AgentNote::Retired(r) => retirement_cmd(store, r),
    }
}

fn agent_conflict_cmd(
    kind: AgentConflictKind,
    store: StoreId,
    key: &str,
    resolution: String,
    details: serde_json::Value,
) -> Command {
    Command::AgentConflict { id: conflict_id(&[kind.as_str(), store.as_str(), key]), kind, store, resolution, details }
}

/// `hub_rolled_back` for every store that is not revoked: each must be checked.
fn hub_rolled_back(st: &mut State, old: &WriterId, new: &WriterId, why: &str, now: i64) -> StorageResult<()> {
    st.decide(Command::SetHubWriter { writer: new.clone() }, now)?;
    let details = serde_json::json!({"old_writer": old.to_string(), "new_writer": new.to_string(), "why": why});
    let stores: Vec<StoreId> = st.d.stores().into_iter().filter(|s| s.revoked_at_ms.is_none()).map(|s| s.id).collect();
    for s in stores {
        st.decide(
            agent_conflict_cmd(
                AgentConflictKind::HubRolledBack,
                s,
                &old.to_string(),
                "the hub's files are older than what this store saw: restocks and transfers authored after them \
                 come back from the store (verified); check the store's stock"
                    .into(),
                details.clone(),
            ),
            now,
        )?;
    }
    Ok(())
}

/// A new hub life: the decider records the writer itself (`SetHubWriter` → `meta.writer`) and a
/// `hub_rolled_back` conflict per store that is not revoked; the batch also notes when the life
/// began and that the files are no longer an unopened restored copy.
fn new_life(
    old: WriterId,
    new: WriterId,
    why: String,
    now: i64,
) -> impl FnOnce(&mut State, &mut Vec<Extra>) -> StorageResult<()> + Send + 'static {
    move |st, extras| {
        hub_rolled_back(st, &old, &new, &why, now)?;
        extras.push(SideWrite::NewLife { at_ms: now_ms() });
        Ok(())
    }
}

/// The running hub's state: the decider thread, the storage threads, and the runtime's view.
pub struct Engine {
    db: HubDb,
    queue: SyncSender<Job>,
    hub_writer: Arc<RwLock<WriterId>>,
    key: MacKey,
    change_head: watch::Receiver<u64>,
    connectivity: Connectivity,
    /// Whether these files were a restored backup (a new life was taken when they opened).
    opened_restored: bool,
    /// Loaded from a warm standby's decider (the record log), not from the tables.
    opened_warm: bool,
}

impl Engine {
    /// Opens the hub's SQLite database, loads the decider from it and starts the decider thread.
    /// Blocking.
    pub fn open(
        path: &std::path::Path,
        sql: crate::sqlite::SqliteOptions,
        opts: EngineOptions,
    ) -> StorageResult<Engine> {
        let started = std::time::Instant::now();
        let opened = crate::sqlite::SqliteStorage::open_with(path, sql, Some(opts.feed_retain))?;
        Self::start(opened, opts, started)
    }

    /// Opens the hub's database wherever it is, loads `partition`'s decider from it and starts
    /// the decider thread (partition 0: the whole chain, unless the database has several).
    /// A warm standby's decider (`warm`) only reads what was committed since it last looked.
    pub async fn open_target(
        target: &Target,
        sql: crate::sqlite::SqliteOptions,
        opts: EngineOptions,
        fence: Option<crate::cluster::Fence>,
        warm: Option<crate::standby::Warm>,
        partition: shelfsync_hub_core::Partition,
    ) -> StorageResult<Engine> {
        let started = std::time::Instant::now();
        let load = match warm {
            Some(w) => crate::db::Load::Warm(Box::new(w)),
            None => crate::db::Load::All { feed_retain: opts.feed_retain },
        };
        let opened = HubDb::open_partition(target, sql, load, fence, partition).await?;
        tokio::task::spawn_blocking(move || Self::start(opened, opts, started))
            .await
            .map_err(|e| StorageError::Backend(format!("starting the decider: {e}")))?
    }

    /// Loads the decider from an opened database and starts its thread. Blocking (a restored
    /// copy takes a new life before this returns).
    fn start(opened: crate::db::Opened, opts: EngineOptions, started: std::time::Instant) -> StorageResult<Engine> {
        let db = opened.storage;
        let hub_writer = db.hub_writer();
        let records = opened.records.len();
        let warm = opened.loader.is_some();
        // The records include `meta.writer`, so the decider starts with the stored writer.
        let mut loader = opened
            .loader
            .unwrap_or_else(|| Loader::new(opts.decider_config(hub_writer.clone()), rand::random::<u128>()));
        loader.load(opened.records).map_err(|e| StorageError::Corrupt(format!("loading the decider: {e}")))?;
        let total = loader.records();
        let d = loader.finish();
        tracing::info!(records, total, warm, ms = started.elapsed().as_millis() as u64, "loaded the decider");
        let peers = opened
            .peers
            .into_iter()
            .map(|(store, writer, journal_applied, lineage)| ((store, writer), PeerState { lineage, journal_applied }))
            .collect();
        let (head_tx, change_head) = watch::channel(d.feed_head());
        let (queue, rx) = mpsc::sync_channel::<Job>(opts.queue_max.max(1));
        let committer = db.committer();
        let batch_max = opts.batch_max.max(1);
        let state = State { d, peers };
        let connectivity = Connectivity::default();
        let conn = connectivity.clone();
        std::thread::Builder::new()
            .name("hub-decider".into())
            .spawn(move || decide_loop(state, rx, committer, batch_max, head_tx, conn))
            .map_err(|e| StorageError::Backend(format!("spawning the decider thread: {e}")))?;
        let engine = Engine {
            key: db.mac_key(),
            db,
            queue,
            hub_writer: Arc::new(RwLock::new(hub_writer)),
            change_head,
            connectivity,
            opened_restored: opened.restored_from.is_some(),
            opened_warm: warm,
        };
        if let Some(old) = opened.restored_from {
            tracing::warn!(old = %old, "hub database was restored from a backup; minting a new writer incarnation; stores give back what it lost");
            engine.reincarnate_blocking("opened a restored backup".to_owned())?;
        }
        Ok(engine)
    }

    /// Whether the decider was taken over from a warm standby rather than loaded cold.
    pub fn opened_warm(&self) -> bool {
        self.opened_warm
    }

    /// Whether the files opened were a restored backup (this hub took a new life for it).
    pub fn opened_restored(&self) -> bool {
        self.opened_restored
    }

    /// Runs `f` on the decider thread inside the next batch; answers after its batch commits.
    async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut State, &mut Vec<Extra>) -> R + Send + 'static,
    ) -> StorageResult<R> {
        self.enqueue(f)?.await.map_err(|_| stopped())?
    }

    fn enqueue<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut State, &mut Vec<Extra>) -> R + Send + 'static,
    ) -> StorageResult<oneshot::Receiver<StorageResult<R>>> {
        if fatal::is_stopping() {
            return Err(stopped());
        }
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |st, extras| {
            let r = f(st, extras);
            Box::new(move |res: Result<(), StorageError>| {
                let _ = tx.send(res.map(|()| r));
            })
        });
        match self.queue.try_send(job) {
            Ok(()) => Ok(rx),
            Err(TrySendError::Full(_)) => Err(StorageError::Busy),
            Err(TrySendError::Disconnected(_)) => Err(stopped()),
        }
    }

    /// [`Engine::reincarnate`] at start, before any task runs.
    fn reincarnate_blocking(&self, why: String) -> StorageResult<()> {
        let new = WriterId::new(NodeId::Hub, Incarnation::from_u64(rand::random::<u64>()));
        let rx = self.enqueue(new_life(self.hub_writer(), new.clone(), why, now_ms()))?;
        rx.blocking_recv().map_err(|_| stopped())???;
        *self.hub_writer.write().expect("hub writer lock") = new;
        Ok(())
    }

    /// A store's first sync connection opened (`true`) or its last one closed: the decider stops
    /// or starts discounting it as silent from the next batch on.
    pub fn set_connected(&self, store: &StoreId, connected: bool) {
        self.connectivity.lock().expect("connectivity lock").push((store.clone(), connected));
    }

    /// The persistence layer (SQL reads and the admin's writes).
    pub fn db(&self) -> &HubDb {
        &self.db
    }

    /// The hub's writer in this database's life.
    pub fn hub_writer(&self) -> WriterId {
        self.hub_writer.read().expect("hub writer lock").clone()
    }

    /// Takes a new life: the files turned out older than what stores saw of the current one.
    /// Records a `hub_rolled_back` conflict per store; returns the new writer.
    pub async fn reincarnate(&self, why: String, now_ms: i64) -> StorageResult<WriterId> {
        let new = WriterId::new(NodeId::Hub, Incarnation::from_u64(rand::random::<u64>()));
        self.run(new_life(self.hub_writer(), new.clone(), why, now_ms)).await??;
        *self.hub_writer.write().expect("hub writer lock") = new.clone();
        Ok(new)
    }

    /// Records a conflict about a store's agents (idempotent per `key`), with an event on the feed.
    pub async fn agent_conflict(
        &self,
        kind: AgentConflictKind,
        store: StoreId,
        key: String,
        details: serde_json::Value,
        now_ms: i64,
    ) -> StorageResult<bool> {
        let cmd = agent_conflict_cmd(kind, store, &key, agent_conflict_resolution(kind), details);
        match self.run(move |st, _| st.decide(cmd, now_ms)).await?? {
            Done::AgentConflict { new } => Ok(new),
            other => Err(unexpected(other)),
        }
    }

    /// Records the retirements an agent reports (one `store_rolled_back` conflict each,
    /// idempotent). Returns how many were new.
    pub async fn record_retirements(
        &self,
        store: StoreId,
        reports: Vec<Retirement>,
        now_ms: i64,
    ) -> StorageResult<u64> {
        let cmds: Vec<Command> = reports.iter().map(|r| retirement_cmd(&store, r)).collect();
        self.run(move |st, _| {
            let mut new = 0;
            for c in cmds {
                if let Done::AgentConflict { new: true } = st.decide(c, now_ms)? {
                    new += 1;
                }
            }
            Ok(new)
        })
        .await?
    }

    /// Digest of the hub-authored entries of `store` (for `Welcome`).
    pub async fn hub_entries_digest(&self, store: StoreId) -> StorageResult<StateDigest> {
        self.run(move |st, _| {
            let mut d = StateDigest::default();
            for (sku, w, e) in st.d.store_entries(&store) {
                if w.is_hub() {
                    d.add(&sku, &w, e);
                }
            }
            d
        })
        .await
    }

    /// Registers a store with its first certificate.
    pub async fn add_store(&self, store: StoreId, cert: CertRecord) -> StorageResult<()> {
        self.db.add_store(store.clone(), cert).await?;
        self.ensure_store(store).await
    }

    /// Makes sure the decider knows a store the database has (added by another process).
    async fn ensure_store(&self, store: StoreId) -> StorageResult<()> {
        self.run(move |st, _| match st.decide(Command::AddStore { store }, now_ms()) {
            Ok(_) | Err(StorageError::Refused(Refusal::StoreExists(_))) => Ok(()),
            Err(e) => Err(e),
        })
        .await?
    }

    /// Brings the decider in line with the stores table, which the admin CLI writes directly:
    /// stores added there are registered, stores revoked there are revoked.
    pub async fn sync_stores(&self) -> StorageResult<()> {
        let rows = self.db.store_rows().await?;
        self.run(move |st, _| {
            for (id, revoked) in rows {
                let known = st.d.store(&id);
                if known.is_none() {
                    st.decide(Command::AddStore { store: id.clone() }, now_ms())?;
                }
                if revoked && known.is_none_or(|k| k.revoked_at_ms.is_none()) {
                    st.decide(Command::RevokeStore { store: id }, now_ms())?;
                }
            }
            Ok(())
        })
        .await?
    }

    /// Runs `attempt`; when it is refused for an unknown store, brings the decider in line with
    /// the stores table (the admin CLI may have added the store while this hub runs) and runs it
    /// once more.
    async fn knowing_new_stores<T, F, Fut>(&self, attempt: F) -> StorageResult<T>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = StorageResult<T>>,
    {
        match attempt().await {
            Err(StorageError::Refused(Refusal::UnknownStore(_))) => {
                self.sync_stores().await?;
                attempt().await
            }
            r => r,
        }
    }

    /// How many agents of a store may be connected at once.
    pub async fn set_max_agents(&self, store: StoreId, max: u32) -> StorageResult<()> {
        self.db.set_max_agents(store, max).await
    }

    /// Revokes a store and all its certificates; returns the revoked serials.
    pub async fn revoke_store(&self, store: StoreId) -> StorageResult<Vec<String>> {
        let serials = self.db.revoke_store(store).await?;
        self.sync_stores().await?;
        Ok(serials)
    }

    /// Every revoked certificate serial with its revocation time (for the CRL).
    pub async fn revoked_serials(&self) -> StorageResult<Vec<(String, i64)>> {
        self.db.revoked_serials().await
    }

    /// Whether a connecting certificate is acceptable: known, for that store, not revoked.
    pub async fn check_cert(&self, store: StoreId, serial: String) -> StorageResult<()> {
        self.db.check_cert(store.clone(), serial).await?;
        self.ensure_store(store).await
    }

    /// All stores, with their writers' watermarks.
    pub async fn stores(&self) -> StorageResult<Vec<StoreInfo>> {
        // Through the decider first: its last contacts are committed when this answers.
        self.run(|_, _| ()).await?;
        self.db.stores().await
    }

    /// Records contact with a store.
    pub async fn touch_store(&self, store: StoreId, at_ms: i64) -> StorageResult<()> {
        self.run(move |st, _| st.decide(Command::StoreSeen { store, at_ms }, at_ms).map(|_| ())).await?
    }

    /// Stores a new API token (its hash only) and returns its record.
    pub async fn add_token(&self, token: crate::tokens::NewToken) -> StorageResult<crate::tokens::TokenInfo> {
        self.db.add_token(token).await
    }

    /// The token with this hash, whatever its status.
    pub async fn token_by_hash(&self, hash: Vec<u8>) -> StorageResult<Option<crate::tokens::TokenInfo>> {
        self.db.token_by_hash(hash).await
    }

    /// Every token, oldest first.
    pub async fn tokens(&self) -> StorageResult<Vec<crate::tokens::TokenInfo>> {
        self.db.tokens().await
    }

    /// Revokes a token by id; `None` if there is none.
    pub async fn revoke_token(&self, id: Uuid) -> StorageResult<Option<crate::tokens::TokenInfo>> {
        self.db.revoke_token(id).await
    }

    /// Records that a token was used at `at_ms`.
    pub async fn touch_token(&self, id: Uuid, at_ms: i64) -> StorageResult<()> {
        self.db.touch_token(id, at_ms).await
    }

    /// Current global heads.
    pub async fn heads(&self) -> StorageResult<HubHeads> {
        let counter = self.run(|st, _| st.d.counter_head()).await?;
        Ok(HubHeads { counter, journal: self.db.journal_head() })
    }

    /// What the hub applied from an agent writer (zero if never seen).
    pub async fn lookup_peer(&self, store: StoreId, writer: WriterId) -> StorageResult<PeerMarks> {
        self.db.lookup_peer(store, writer).await
    }

    /// Merges an agent's delta: checks the tags of entries it gives back and that its own entries
    /// are its writers', compares-and-sets the writer's history head, merges (closing the holds it
    /// fulfilled and reconciling any oversell) and records `delta.upto` as applied, in one batch.
    pub async fn apply_delta(
        &self,
        store: StoreId,
        peer: WriterId,
        delta: Delta,
        lineage_base: Option<Checkpoint>,
        pusher_boots: Vec<Boot>,
        now_ms: i64,
    ) -> StorageResult<Applied> {
        let (entries, tagged) = authenticate(&self.key, &store, &delta)?;
        let me = self.hub_writer();
        let (upto, lineage, fulfilled) = (delta.upto, delta.lineage.clone(), delta.fulfilled.clone());
        let rights: Vec<_> = delta.rights().map(|(s, w, k, t)| (s.clone(), w.clone(), k, t)).collect();
        let mut applied = self.run(move |st, extras| {
            let key = (store.clone(), peer.clone());
            let mut ps = st.peers.get(&key).cloned().unwrap_or_default();
            if st.d.store(&store).is_none() {
                return Err(Refusal::UnknownStore(store).into());
            }
            // Compare-and-set on the writer's history, before anything changes.
            if let Some(base) = lineage_base.filter(|b| *b != ps.lineage.head) {
                return Err(StorageError::Forked(format!(
                    "another connection moved {peer}'s history from change {} to {} since this one was welcomed; reconnect",
                    base.ordinal, ps.lineage.head.ordinal
                )));
            }
            let (mut recovered, mut own_lost) = (0, false);
            for &i in &tagged {
                let (sku, w, e) = &entries[i];
                if !st.d.entry(&store, sku, w).covers(*e) {
                    recovered += 1;
                    own_lost |= *w == me;
                }
            }
            let cmd = Command::Merge { store: store.clone(), entries, fulfilled, rights };
            let merged = match st.decide(cmd, now_ms)? {
                Done::Merged(m) => m,
                other => return Err(unexpected(other)),
            };
            if let Some(l) = &lineage {
                ps.lineage.advance(l.head, &l.boots, &pusher_boots);
            }
            let lineage_row = lineage.is_some().then(|| postcard::to_stdvec(&ps.lineage).expect("lineage serialises"));
            st.peers.insert(key, ps);
            extras.push(SideWrite::PeerApplied { store, peer, upto, at_ms: now_ms, lineage: lineage_row });
            Ok(Applied {
                holds_changed: merged.holds_changed,
                changed: merged.changed,
                entries_changed: merged.entries_changed,
                heads: HubHeads { counter: merged.counter_head, journal: 0 },
                recovered,
                own_lost,
            })
        })
        .await??;
        // Read after the commit: the writer publishes the journal head once the batch is durable.
        applied.heads.journal = self.db.journal_head();
        Ok(applied)
    }

    /// Applies one row of this partition's merge log (`crate::syncplane::tail`): a delta's
    /// entries of its SKUs and the holds the store fulfilled (`Merge`), or a journal batch's
    /// flagged SKUs and adjustments; and deletes that row in the same commit. Applying a row
    /// again (a crash before that commit) changes nothing: the entries are already joined,
    /// fulfilled holds stay fulfilled, a flagged SKU's conflict is open already, and an
    /// adjustment reaches the feed once per (id, line).
    pub async fn apply_merged(
        &self,
        partition: shelfsync_hub_core::Partition,
        row: crate::syncplane::LogRow,
        now_ms: i64,
    ) -> StorageResult<shelfsync_hub_core::Merged> {
        // A store the admin CLI added since this decider loaded: learnt on the way.
        self.knowing_new_stores(|| {
            let row = row.clone();
            async move {
                self.run(move |st, extras| {
                    let crate::syncplane::LogRow { store, kind, seq, part } = row;
                    let mut merged = shelfsync_hub_core::Merged::default();
                    if !part.entries.is_empty() || !part.fulfilled.is_empty() || !part.rights.is_empty() {
                        let cmd = Command::Merge {
                            store: store.clone(),
                            entries: part.entries,
                            fulfilled: part.fulfilled,
                            rights: part.rights,
                        };
                        merged = match st.decide(cmd, now_ms)? {
                            Done::Merged(m) => m,
                            other => return Err(unexpected(other)),
                        };
                    }
                    if !part.flagged.is_empty() {
                        st.decide(Command::JournalSkus { store: store.clone(), skus: part.flagged }, now_ms)?;
                    }
                    if !part.adjustments.is_empty() {
                        st.decide(
                            Command::JournalAdjustments { store: store.clone(), events: part.adjustments },
                            now_ms,
                        )?;
                    }
                    for note in &part.notes {
                        st.decide(agent_note_cmd(&store, note), now_ms)?;
                    }
                    extras.push(SideWrite::MergeApplied { partition, store, kind: kind.col(), upto: seq });
                    Ok(merged)
                })
                .await?
            }
        })
        .await
    }

    /// Entries of `store` above `after` (all writers except `exclude`), sequence order, each with
    /// the hub's tag.
    pub async fn read_delta(
        &self,
        store: StoreId,
        exclude: Option<WriterId>,
        after: u64,
        limit: usize,
    ) -> StorageResult<DeltaRead> {
        let s = store.clone();
        let page = self.run(move |st, _| st.d.entries_since(&s, after, exclude.as_ref(), limit)).await?;
        let entries: Vec<_> = page.entries.into_iter().map(|(_, k, w, e)| (k, w, e)).collect();
        let macs =
            entries.iter().enumerate().map(|(i, (k, w, e))| (i as u32, self.key.tag(&store, k, w, *e))).collect();
        Ok(DeltaRead { upto: page.upto, entries, macs, ..DeltaRead::default() })
    }

    /// Records that an agent writer acked hub counter sequences up to `upto`.
    pub async fn set_acked(&self, store: StoreId, peer: WriterId, upto: u64) -> StorageResult<()> {
        self.db.set_acked(store, peer, upto).await
    }

    /// Stores an agent's journal events and records `batch.upto`; SKUs the store flagged as
    /// unknown or inactive open `unknown_sku` conflicts (once: a resent batch opens none).
    pub async fn apply_journal(&self, store: StoreId, peer: WriterId, batch: JournalBatch) -> StorageResult<()> {
        journal_belongs(&store, &batch.events)?;
        self.run(move |st, extras| {
            if st.d.store(&store).is_none() {
                return Err(Refusal::UnknownStore(store).into());
            }
            let key = (store.clone(), peer.clone());
            let ps = st.peers.entry(key).or_default();
            if batch.upto > ps.journal_applied {
                ps.journal_applied = batch.upto;
                let skus: Vec<Sku> = batch
                    .events
                    .iter()
                    .filter(|e| e.flags.contains(&EventFlag::UnknownSku) || e.flags.contains(&EventFlag::InactiveSku))
                    .map(|e| e.sku.clone())
                    .collect();
                if !skus.is_empty() {
                    st.decide(Command::JournalSkus { store: store.clone(), skus }, now_ms())?;
                }
                // The tills' adjustments reach the feed once (this range is new for the peer).
                let adjustments: Vec<_> = batch
                    .events
                    .iter()
                    .filter(|e| e.kind == shelfsync_shared::EventKind::Adjustment)
                    .cloned()
                    .collect();
                if !adjustments.is_empty() {
                    st.decide(Command::JournalAdjustments { store: store.clone(), events: adjustments }, now_ms())?;
                }
            }
            extras.push(SideWrite::PeerJournal { store, peer, upto: batch.upto, events: batch.events });
            Ok(())
        })
        .await?
    }

    /// `store`'s journal events above `after` not written by `peer` (the agent being sent them).
    pub async fn read_journal(
        &self,
        store: StoreId,
        peer: Option<WriterId>,
        after: u64,
        limit: usize,
    ) -> StorageResult<JournalRead> {
        self.db.read_journal(store, peer, after, limit).await
    }

    /// Records that an agent writer acked hub journal sequences up to `upto`.
    pub async fn set_journal_acked(&self, store: StoreId, peer: WriterId, upto: u64) -> StorageResult<()> {
        self.db.set_journal_acked(store, peer, upto).await
    }

    /// Digest of `store`'s entries and the highest sequence among them.
    pub async fn digest(&self, store: StoreId) -> StorageResult<(StateDigest, u64)> {
        self.run(move |st, _| {
            let page = st.d.entries_since(&store, 0, None, usize::MAX);
            let mut d = StateDigest::default();
            let mut head = 0;
            for (seq, k, w, e) in &page.entries {
                d.add(k, w, *e);
                head = head.max(*seq);
            }
            (d, head)
        })
        .await
    }

    /// A restock or transfer, idempotent by id.
    pub async fn hub_change(&self, req: HubChangeRequest, now_ms: i64) -> StorageResult<HubChangeOutcome> {
        let outcome = self
            .knowing_new_stores(|| {
                let req = req.clone();
                async move {
                    self.run(move |st, _| match st.decide(Command::HubChange(req), now_ms)? {
                        Done::HubChanged(c) => Ok(c),
                        other => Err(unexpected(other)),
                    })
                    .await?
                }
            })
            .await?;
        Ok(HubChangeOutcome {
            created: outcome.created,
            response: outcome.response,
            stores: outcome.stores,
            // Read after the commit, which published the journal events this change wrote.
            heads: HubHeads { counter: outcome.counter_head, journal: self.db.journal_head() },
            holds_changed: outcome.holds_changed,
            transfer: outcome.transfer,
        })
    }

    /// Receives a transfer at its destination (`lines`: what arrived; `None`: everything).
    pub async fn receive_transfer(
        &self,
        id: Uuid,
        lines: Option<Vec<QtyLine>>,
        key: Option<String>,
        now_ms: i64,
    ) -> StorageResult<TransferOutcome> {
        self.transfer_command(Command::ReceiveTransfer { id, lines, key }, now_ms).await
    }

    /// Cancels a transfer in transit: its units go back to the source.
    pub async fn cancel_transfer(&self, id: Uuid, key: Option<String>, now_ms: i64) -> StorageResult<TransferOutcome> {
        self.transfer_command(Command::CancelTransfer { id, key }, now_ms).await
    }

    async fn transfer_command(&self, cmd: Command, now_ms: i64) -> StorageResult<TransferOutcome> {
        let changed = self
            .run(move |st, _| match st.decide(cmd, now_ms)? {
                Done::TransferChanged(c) => Ok(c),
                other => Err(unexpected(other)),
            })
            .await??;
        // Read after the commit, which published the journal events this change wrote.
        let heads = HubHeads { counter: changed.counter_head, journal: self.db.journal_head() };
        Ok(TransferOutcome { changed, heads })
    }

    /// One transfer.
    pub async fn transfer(&self, id: Uuid) -> StorageResult<Option<shelfsync_hub_core::Transfer>> {
        self.run(move |st, _| st.d.transfer(id)).await
    }

    /// Transfers, newest first, filtered.
    pub async fn transfers(
        &self,
        filter: shelfsync_hub_core::TransferFilter,
    ) -> StorageResult<Vec<shelfsync_hub_core::Transfer>> {
        self.run(move |st, _| st.d.transfers(&filter)).await
    }

    /// The transfers on their way to a store, as pushed to its agent.
    pub async fn incoming_snapshot(&self, store: StoreId) -> StorageResult<IncomingSnapshot> {
        self.run(move |st, _| st.d.incoming_snapshot(&store)).await
    }

    /// Reserves all lines or none (idempotent by reservation id).
    pub async fn create_reservation(&self, req: ReservationRequest, now_ms: i64) -> StorageResult<Written> {
        self.knowing_new_stores(|| {
            let req = req.clone();
            async move {
                self.run(move |st, _| match st.decide(Command::Reserve(req), now_ms)? {
                    Done::Reserved(w) => Ok(w),
                    other => Err(unexpected(other)),
                })
                .await?
            }
        })
        .await
    }

    /// Reservations, newest first, filtered.
    pub async fn reservations(
        &self,
        filter: shelfsync_hub_core::ReservationFilter,
    ) -> StorageResult<Vec<ReservationView>> {
        self.run(move |st, _| st.d.reservations(&filter)).await
    }

    /// A reservation's current state.
    pub async fn reservation(&self, id: Uuid) -> StorageResult<Option<ReservationView>> {
        self.run(move |st, _| st.d.reservation(id)).await
    }

    /// Extend, commit or release (idempotent under `key`).
    pub async fn act(
        &self,
        id: Uuid,
        action: shelfsync_hub_core::Action,
        key: Option<String>,
        now_ms: i64,
    ) -> StorageResult<Written> {
        self.run(move |st, _| match st.decide(Command::Act { id, action, key }, now_ms)? {
            Done::Acted(w) => Ok(w),
            other => Err(unexpected(other)),
        })
        .await?
    }

    /// Expires due leases; returns the stores whose holds changed and how many reservations
    /// expired.
    pub async fn expire_due(&self, now_ms: i64) -> StorageResult<(Vec<StoreId>, u64)> {
        let mut stores = Vec::new();
        let mut expired = 0u64;
        loop {
            let e = match self.run(move |st, _| st.decide(Command::ExpireDue, now_ms)).await?? {
                Done::Expired(e) => e,
                other => return Err(unexpected(other)),
            };
            stores.extend(e.stores);
            expired += e.expired as u64;
            if !e.more {
                break;
            }
        }
        stores.sort();
        stores.dedup();
        Ok((stores, expired))
    }

    /// A store's open holds.
    pub async fn holds_snapshot(&self, store: StoreId) -> StorageResult<HoldsSnapshot> {
        self.run(move |st, _| st.d.holds_snapshot(&store)).await
    }

    /// The store's escrow rights as the decider has them, with the policy stores grant by.
    pub async fn rights_snapshot(&self, store: StoreId) -> StorageResult<RightsSnapshot> {
        self.run(move |st, _| {
            let rights = st.d.store_rights(&store);
            let escrow = st.d.config().escrow;
            let entries = rights.iter().flat_map(|(sku, r)| r.entries().map(move |(w, k, t)| (sku, w, k, t)));
            RightsSnapshot::build(escrow.enabled.then_some(escrow.policy), entries)
        })
        .await
    }

    /// Per SKU, every store's figures (raw and offered availability).
    pub async fn availability(&self, skus: Vec<Sku>, now_ms: i64) -> StorageResult<Vec<(Sku, Vec<StoreFigures>)>> {
        Ok(self.availability_known(skus, now_ms).await?.into_iter().map(|(s, _, f)| (s, f)).collect())
    }

    /// [`Engine::availability`] with whether the hub knows each SKU (catalogued or ever stocked).
    pub async fn availability_known(
        &self,
        skus: Vec<Sku>,
        now_ms: i64,
    ) -> StorageResult<Vec<(Sku, bool, Vec<StoreFigures>)>> {
        let (_, rows) = self.availability_view(skus, Some(Vec::new()), now_ms).await?;
        Ok(rows.into_iter().map(|r| (r.sku, r.known, r.stores)).collect())
    }

    /// Per SKU, every store's figures and those of the channels asked for (`None`: every
    /// channel), read at one moment; with the channels' configuration. An unknown channel is
    /// refused (`NotFound`).
    pub async fn availability_view(
        &self,
        skus: Vec<Sku>,
        channels: Option<Vec<ChannelId>>,
        now_ms: i64,
    ) -> StorageResult<(Vec<Channel>, Vec<SkuView>)> {
        self.run(move |st, _| {
            let chans: Vec<Channel> = match channels {
                None => st.d.channels(),
                Some(ids) => ids
                    .iter()
                    .map(|id| {
                        st.d.channel(id)
                            .ok_or_else(|| StorageError::Refused(Refusal::NotFound(format!("no channel {id}"))))
                    })
                    .collect::<StorageResult<_>>()?,
            };
            let connected = st.d.connected();
            let rows = skus
                .into_iter()
                .map(|sku| SkuView {
                    stores: st.d.figures(&sku, now_ms, connected),
                    known: st.d.knows_sku(&sku),
                    channels: chans
                        .iter()
                        .filter_map(|c| st.d.channel_figures(&c.id, &sku, now_ms, connected))
                        .collect(),
                    sku,
                })
                .collect();
            Ok((chans, rows))
        })
        .await?
    }

    /// Configures a sales channel (new, or replacing its configuration).
    pub async fn put_channel(&self, ch: Channel, now_ms: i64) -> StorageResult<Channel> {
        self.run(move |st, _| match st.decide(Command::PutChannel(ch), now_ms)? {
            Done::ChannelPut(c) => Ok(c),
            other => Err(unexpected(other)),
        })
        .await?
    }

    /// Removes a sales channel (not `web`).
    pub async fn remove_channel(&self, id: ChannelId, now_ms: i64) -> StorageResult<()> {
        self.run(move |st, _| match st.decide(Command::RemoveChannel(id), now_ms)? {
            Done::ChannelRemoved(_) => Ok(()),
            other => Err(unexpected(other)),
        })
        .await?
    }

    /// Every channel (`web` included), with whether each is configured.
    pub async fn channels(&self) -> StorageResult<Vec<(Channel, bool)>> {
        self.run(|st, _| {
            let configured = st.d.configured_channels();
            st.d.channels()
                .into_iter()
                .map(|c| {
                    let set = configured.contains(&c.id);
                    (c, set)
                })
                .collect()
        })
        .await
    }

    /// Conflicts, newest first.
    pub async fn conflicts(&self, filter: ConflictFilter) -> StorageResult<Vec<shelfsync_hub_core::Conflict>> {
        self.run(move |st, _| st.d.conflicts(&filter)).await
    }

    /// One conflict.
    pub async fn conflict(&self, id: Uuid) -> StorageResult<Option<shelfsync_hub_core::Conflict>> {
        self.run(move |st, _| st.d.conflict(id)).await
    }

    /// A person resolved an open conflict (`resolution` says what was done).
    pub async fn resolve_conflict(
        &self,
        id: Uuid,
        resolution: String,
        now_ms: i64,
    ) -> StorageResult<shelfsync_hub_core::Conflict> {
        self.run(move |st, _| match st.decide(Command::ResolveConflict { id, resolution }, now_ms)? {
            Done::ConflictResolved(c) => Ok(c),
            other => Err(unexpected(other)),
        })
        .await?
    }

    /// Change feed events after `cursor` (older ones than the decider keeps come from storage).
    pub async fn changes_after(&self, cursor: u64, limit: usize) -> StorageResult<Vec<ChangeEvent>> {
        let events = match self.run(move |st, _| st.d.changes_after(cursor, limit)).await? {
            FeedRead::Events(e) => e,
            FeedRead::Evicted { .. } => self.db.feed_after(cursor, limit).await?,
        };
        Ok(events.iter().map(ChangeEvent::from).collect())
    }

    /// The newest committed change cursor.
    pub fn change_head(&self) -> watch::Receiver<u64> {
        self.change_head.clone()
    }

    /// A webhook's delivery cursor.
    pub async fn webhook_cursor(&self, url: String) -> StorageResult<Option<u64>> {
        self.db.webhook_cursor(url).await
    }

    /// Records a webhook's delivery cursor.
    pub async fn set_webhook_cursor(&self, url: String, cursor: u64) -> StorageResult<()> {
        self.db.set_webhook_cursor(url, cursor).await
    }

    /// Persists catalog document changes, their materialised rows and sync states with the
    /// decider's new rules, in one batch. Returns the stores whose holds changed (the new rules
    /// gave escrow rights back).
    pub async fn catalog_commit(&self, c: CatalogCommit) -> StorageResult<Vec<StoreId>> {
        let items: Vec<(Sku, Option<CatalogRule>)> = c
            .items
            .iter()
            .map(|(sku, item)| {
                Ok((sku.parse::<Sku>().map_err(|e| StorageError::Invalid(format!("{e}")))?, item.as_ref().map(rule_of)))
            })
            .collect::<StorageResult<_>>()?;
        let overrides = match &c.overrides {
            Some((store, rows)) => Some((
                store.clone(),
                rows.iter()
                    .map(|(sku, o)| {
                        Ok((
                            sku.parse::<Sku>().map_err(|e| StorageError::Invalid(format!("{e}")))?,
                            shelfsync_hub_core::Overrides {
                                safety_stock: o.safety_stock,
                                low_stock_threshold: o.low_stock_threshold,
                                escrow: o.escrow,
                            },
                        ))
                    })
                    .collect::<StorageResult<Vec<_>>>()?,
            )),
            None => None,
        };
        self.run(move |st, extras| {
            let mut holds = Vec::new();
            if !items.is_empty() || overrides.is_some() {
                if let Done::CatalogApplied(a) = st.decide(Command::CatalogChanged { items, overrides }, now_ms())? {
                    holds = a.holds;
                }
            }
            extras.push(SideWrite::Catalog(c));
            Ok(holds)
        })
        .await?
    }

    /// One catalog entry (materialised).
    pub async fn catalog_item(&self, sku: Sku) -> StorageResult<Option<CatalogView>> {
        self.db.catalog_item(sku).await
    }

    /// A page of catalog entries in SKU order.
    pub async fn catalog_page(&self, after: Option<Sku>, limit: usize) -> StorageResult<Vec<CatalogView>> {
        self.db.catalog_page(after, limit).await
    }

    /// A page of the catalog entries whose SKU or name contains `q`.
    pub async fn catalog_search(&self, q: String, after: Option<Sku>, limit: usize) -> StorageResult<Vec<CatalogView>> {
        self.db.catalog_search(q, after, limit).await
    }

    /// The chain at a glance (the dashboard's figures), as of `now_ms`.
    pub async fn overview(
        &self,
        q: shelfsync_hub_core::OverviewQuery,
        now_ms: i64,
    ) -> StorageResult<shelfsync_hub_core::Overview> {
        self.run(move |st, _| st.d.overview(&q, now_ms)).await
    }

    /// A store's adjustment events and totals per reason code (the shrink report).
    pub async fn adjustments(
        &self,
        filter: crate::sqlite::AdjustmentFilter,
    ) -> StorageResult<crate::sqlite::AdjustmentReport> {
        self.db.adjustments(filter).await
    }

    /// Journal events held (of one store, or all).
    pub async fn journal_count(&self, store: Option<StoreId>) -> StorageResult<u64> {
        self.db.journal_count(store).await
    }

    /// Online backup to a new file; the copy takes a new hub life when opened.
    pub async fn backup(&self, to: std::path::PathBuf) -> StorageResult<()> {
        self.db.backup(to).await
    }

    /// What `/metrics` shows of the decider's state, in one read: every store (with its
    /// watermarks) and, per store, the hub entries its current writer has not acked (at most
    /// [`crate::metrics::UNACKED_COUNT_MAX`]) and the units online holds escrow rights to; open
    /// conflicts per kind.
    #[allow(clippy::type_complexity)]
    pub async fn metrics_snapshot(&self) -> StorageResult<MetricsRead> {
        let stores = self.stores().await?;
        let marks: Vec<(StoreId, Option<WriterId>, u64)> = stores
            .iter()
            .map(|s| match s.writers.iter().max_by_key(|w| w.last_seen_ms) {
                Some(w) => (s.id.clone(), Some(w.writer.clone()), w.acked),
                None => (s.id.clone(), None, 0),
            })
            .collect();
        let read = self
            .run(move |st, _| {
                let unacked = marks
                    .iter()
                    .map(|(store, writer, acked)| {
                        let page =
                            st.d.entries_since(store, *acked, writer.as_ref(), crate::metrics::UNACKED_COUNT_MAX);
                        (page.entries.len() as u64, st.d.granted_at(store))
                    })
                    .collect::<Vec<_>>();
                let open = st.d.conflicts(&ConflictFilter {
                    status: Some(shelfsync_hub_core::ConflictStatus::Open),
                    limit: usize::MAX,
                    ..ConflictFilter::default()
                });
                let conflicts = shelfsync_hub_core::ConflictKind::ALL
                    .iter()
                    .map(|k| (k.as_str(), open.iter().filter(|c| c.kind == *k).count() as u64))
                    .collect::<Vec<_>>();
                let channels = st.d.ats_totals().into_iter().map(|(c, n)| (c.to_string(), n)).collect();
                (unacked, conflicts, channels)
            })
            .await?;
        let (unacked, conflicts_open, channel_ats) = read;
        Ok(MetricsRead { stores, unacked, conflicts_open, channel_ats })
    }

    /// Stock of some SKUs at every store that has them.
    pub async fn stock_of(&self, skus: Vec<Sku>) -> StorageResult<Vec<StoreStock>> {
        self.run(move |st, _| {
            skus.iter()
                .flat_map(|sku| {
                    st.d.stock_of(sku).into_iter().map(|(store, on_hand)| StoreStock {
                        incoming: st.d.incoming(&store, sku),
                        store,
                        sku: sku.clone(),
                        on_hand,
                    })
                })
                .collect()
        })
        .await
    }

    /// A page of one store's stock in SKU order.
    pub async fn store_stock(
        &self,
        store: StoreId,
        after: Option<Sku>,
        limit: usize,
    ) -> StorageResult<Vec<StoreStock>> {
        self.knowing_new_stores(|| {
            let (store, after) = (store.clone(), after.clone());
            async move {
                self.run(move |st, _| match st.d.store_stock(&store, after.as_ref(), limit) {
                    None => Err(Refusal::UnknownStore(store).into()),
                    Some(rows) => Ok(rows
                        .into_iter()
                        .map(|(sku, on_hand, incoming)| StoreStock { store: store.clone(), sku, on_hand, incoming })
                        .collect()),
                })
                .await?
            }
        })
        .await
    }
}

/// The decider's rule of a catalog entry.
fn rule_of(item: &shelfsync_node::catalog::CatalogItem) -> CatalogRule {
    CatalogRule {
        safety_stock: item.safety_stock,
        low_stock_threshold: item.low_stock_threshold,
        max_per_customer: item.max_per_customer,
        active: item.active,
        escrow: item.escrow,
    }
}

fn retirement_cmd(store: &StoreId, r: &Retirement) -> Command {
    let kind = match r.reason {
        RetireReason::RolledBack => AgentConflictKind::StoreRolledBack,
    };
    let window = r
        .window_ms
        .map(|(a, b)| serde_json::json!({"from": shelfsync_shared::rfc3339(a), "to": shelfsync_shared::rfc3339(b)}));
    let details = serde_json::json!({
        "old_writer": r.old.to_string(),
        "new_writer": r.new.to_string(),
        "fork_ordinal": r.fork_ordinal,
        "hub_ordinal": r.hub_ordinal,
        "store_ordinal": r.own_ordinal,
        "moved_changes": r.moved,
        "ambiguous_changes": r.ambiguous,
        "moved_window": window,
        "retired_at": shelfsync_shared::rfc3339(r.at_ms),
    });
    let resolution = if r.ambiguous > 0 {
        format!(
            "the store's files forked from what the hub had; {} later changes now count under {}; up to {} \
             of them may be counted twice: recount the SKUs they touched",
            r.moved, r.new, r.ambiguous
        )
    } else {
        format!(
            "the store's files forked from what the hub had (changes {} to {} of {} are the store's own); \
             {} later changes now count under {}; nothing is lost or counted twice",
            r.fork_ordinal + 1,
            r.own_ordinal,
            r.old,
            r.moved,
            r.new
        )
    };
    agent_conflict_cmd(kind, store.clone(), &format!("{} {}", r.old, r.new), resolution, details)
}

fn stopped() -> StorageError {
    StorageError::Stopped(
        "the hub is stopping after a storage failure (fail-stop); retry against the restarted hub".into(),
    )
}

fn unexpected(done: Done) -> StorageError {
    StorageError::Backend(format!("the decider answered {done:?} to a different command"))
}

/// The decider thread: batches of jobs, decided in order, committed by the writer thread while
/// the next batch is decided.
fn decide_loop(
    mut st: State,
    rx: Receiver<Job>,
    committer: Committer,
    batch_max: usize,
    feed: watch::Sender<u64>,
    connectivity: Connectivity,
) {
    let feed = Arc::new(feed);
    let in_flight = Arc::new(AtomicUsize::new(0));
    while let Ok(first) = rx.recv() {
        if fatal::is_stopping() {
            // Dropping the jobs answers their callers (503); nothing more is decided.
            drop(first);
            while rx.try_recv().is_ok() {}
            continue;
        }
        let changes = std::mem::take(&mut *connectivity.lock().expect("connectivity lock"));
        for (store, connected) in changes {
            let _ = st.d.apply(Command::SetConnected { store, connected }, 0);
        }
        let mut replies: Vec<Reply> = Vec::new();
        let mut extras: Vec<Extra> = Vec::new();
        replies.push(first(&mut st, &mut extras));
        while replies.len() < batch_max {
            match rx.try_recv() {
                Ok(job) => replies.push(job(&mut st, &mut extras)),
                Err(_) => break,
            }
        }
        let records = st.d.take_records();
        if records.is_empty() && extras.is_empty() && in_flight.load(Ordering::Acquire) == 0 {
            // Reads only, and everything decided before is committed and answered.
            for r in replies {
                r(Ok(()));
            }
            continue;
        }
        let head = st.d.feed_head();
        in_flight.fetch_add(1, Ordering::AcqRel);
        let (feed, flight) = (feed.clone(), in_flight.clone());
        let submitted = committer.submit(
            Commit { records, side: extras },
            Box::new(move |result| {
                match result {
                    Ok(()) => {
                        feed.send_if_modified(|h| std::mem::replace(h, head) != head);
                        for r in replies {
                            r(Ok(()));
                        }
                    }
                    Err(e) => {
                        fatal::stop(&format!("committing decided state failed: {e}"));
                        for r in replies {
                            r(Err(stopped()));
                        }
                    }
                }
                flight.fetch_sub(1, Ordering::AcqRel);
            }),
        );
        if let Err(e) = submitted {
            fatal::stop(&format!("the storage writer is gone: {e}"));
        }
    }
}

/// One entry of the change feed as the API shows it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ChangeEvent {
    /// Monotonic, gap-free position.
    pub cursor: u64,
    /// What happened.
    pub kind: String,
    /// RFC 3339.
    pub at: String,
    /// Details.
    pub data: serde_json::Value,
}

impl From<&shelfsync_hub_core::FeedEvent> for ChangeEvent {
    fn from(e: &shelfsync_hub_core::FeedEvent) -> Self {
        ChangeEvent {
            cursor: e.cursor,
            kind: e.kind.as_str().to_owned(),
            at: shelfsync_shared::rfc3339(e.at_ms),
            data: e.data_json(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sqlite::SqliteOptions;
    use shelfsync_node::http::ApiError;

    fn engine(dir: &std::path::Path, queue_max: usize) -> Engine {
        let path = dir.join("hub.db");
        crate::sqlite::SqliteStorage::create(&path).unwrap();
        Engine::open(&path, SqliteOptions::default(), EngineOptions { queue_max, ..EngineOptions::default() }).unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_queue_answers_busy_at_once_and_loses_nothing_it_took() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(dir.path(), 2);
        // Hold the decider inside a job until the test lets go.
        let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
        let (gate_tx, gate_rx) = std::sync::mpsc::channel::<()>();
        let held = e
            .enqueue(move |_, _| {
                started_tx.send(()).unwrap();
                gate_rx.recv().unwrap();
            })
            .unwrap();
        started_rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
        let add = |s: &str| {
            let store: StoreId = s.parse().unwrap();
            e.enqueue(move |st, _| st.decide(Command::AddStore { store }, 1))
        };
        let (a, b) = (add("s1").unwrap(), add("s2").unwrap());
        let refused = add("s3");
        assert!(matches!(refused, Err(StorageError::Busy)), "a full queue refuses at once");
        let api = ApiError::from(StorageError::Busy);
        assert_eq!((api.status.as_u16(), api.retry_after_secs), (503, Some(1)));
        gate_tx.send(()).unwrap();
        held.await.unwrap().unwrap();
        a.await.unwrap().unwrap().unwrap();
        b.await.unwrap().unwrap().unwrap();
        let stores: Vec<String> =
            e.run(|st, _| st.d.stores()).await.unwrap().into_iter().map(|s| s.id.to_string()).collect();
        assert_eq!(stores, ["s1", "s2"], "what was taken is decided; the refused one is not");
        // ...and committed: the stores table has them once the answers came.
        let rows: Vec<String> = e.db.store_rows().await.unwrap().into_iter().map(|(s, _)| s.to_string()).collect();
        assert_eq!(rows, ["s1", "s2"]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reads_wait_for_the_commit_of_what_they_see() {
        let dir = tempfile::tempdir().unwrap();
        let e = engine(dir.path(), 64);
        let store: StoreId = "s1".parse().unwrap();
        // A write and a read queued back to back: the read sees the write, and is answered only
        // once the write's batch is durable (the row is in the table when the read answers).
        let s = store.clone();
        let write = e.enqueue(move |st, _| st.decide(Command::AddStore { store: s }, 1)).unwrap();
        let s = store.clone();
        let read = e.enqueue(move |st, _| st.d.store(&s).is_some()).unwrap();
        assert!(read.await.unwrap().unwrap(), "the read sees the decision before it");
        let conn = rusqlite::Connection::open(dir.path().join("hub.db")).unwrap();
        let n: i64 = conn.query_row("SELECT COUNT(*) FROM stores WHERE id = 's1'", [], |r| r.get(0)).unwrap();
        assert_eq!(n, 1, "and that decision was committed before the read was answered");
        write.await.unwrap().unwrap().unwrap();
    }
}
