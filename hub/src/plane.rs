//! The agents' side of a partitioned database: an [`AgentLedger`] over the sync plane
//! ([`crate::syncplane`]). Whichever hub an agent reaches merges its deltas and journal into
//! PostgreSQL itself and reads back, by the store's own sequence, what any hub's deciders wrote
//! for the store (restocks, holds); no decider is on the agent's path, and no hub forwards a
//! delta. Each partition's decider applies the merges of its SKUs from its merge log.
//!
//! What concerns a store's agents rather than a SKU (a duplicate or cloned agent, a retired
//! writer) goes to the home partition's decider as a note ([`crate::syncplane::HOME`]).
//!
//! **Not carried here yet** (`hub/docs/scale-out.md`): a new life after the database is
//! restored from an older copy (refused with an error, see [`Plane`]'s `reincarnate`), and
//! which stores are connected (the deciders judge a store's silence by when its last merge
//! arrived).

use std::collections::BTreeSet;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use shelfsync_hub_core::{AgentConflictKind, Command, Partitions};
use shelfsync_shared::counter::StateDigest;
use shelfsync_shared::lineage::{Boot, Checkpoint};
use shelfsync_shared::mac::MacKey;
use shelfsync_shared::sync::{DeltaRead, JournalRead};
use shelfsync_shared::wire::{Delta, HoldsSnapshot, IncomingSnapshot, JournalBatch, Retirement, RightsSnapshot};
use shelfsync_shared::{StoreId, WriterId};
use tokio::sync::{mpsc, Mutex};

use crate::catalog::CatalogStore;
use crate::db::HubDb;
use crate::ledger::AgentLedger;
use crate::notify::Notice;
use crate::state::Hub;
use crate::storage::{Applied, CatalogCommit, HubHeads, PeerMarks, StorageError, StorageResult};
use crate::syncplane::{AgentDelta, AgentNote, SyncPlane, HOME};

/// The sync plane as the agents' sessions use it.
pub struct Plane {
    partitions: Partitions,
    /// Partition [`HOME`]'s database handle, loading nothing: certificates, the agent writers'
    /// marks and acks, the catalog's documents.
    db: HubDb,
    /// Connections that merge and read; a store always uses the same one.
    conns: Vec<Mutex<SyncPlane>>,
    key: MacKey,
    /// The home partition's writer: the life the stores' watermarks refer to.
    life: WriterId,
    /// Every partition's writer: a store giving back one of their entries that the database
    /// lacks reveals a database older than what the store saw.
    writers: BTreeSet<WriterId>,
    /// Escrow on or off and the policy stores grant by (told to agents with their rights).
    escrow: shelfsync_hub_core::Escrow,
}

impl Plane {
    /// Opens the plane of the partitioned database at `target`, with `connections` connections.
    pub async fn open(
        target: &crate::db::Target,
        opts: crate::sqlite::SqliteOptions,
        connections: usize,
        escrow: shelfsync_hub_core::Escrow,
    ) -> StorageResult<Plane> {
        let crate::db::Target::Postgres(url) = target else {
            return Err(StorageError::Invalid("the sync plane lives in a partitioned PostgreSQL database".into()));
        };
        let db = HubDb::open_partition(target, opts, crate::db::Load::Nothing, None, HOME).await?.storage;
        let mut conns = Vec::with_capacity(connections.max(1));
        for _ in 0..connections.max(1) {
            conns.push(Mutex::new(SyncPlane::connect(url).await?));
        }
        let (partitions, writers) = {
            let c = conns[0].get_mut().client();
            let partitions = crate::postgres::PgStorage::partitions(c).await?;
            let mut writers = BTreeSet::new();
            for p in partitions.all() {
                writers.insert(crate::postgres::partition_writer(c, p).await?);
            }
            (partitions, writers)
        };
        Ok(Plane { partitions, key: db.mac_key(), life: db.hub_writer(), db, conns, writers, escrow })
    }

    /// The connection `store` uses: one store's merges are sequential anyway.
    fn conn(&self, store: &StoreId) -> &Mutex<SyncPlane> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        store.hash(&mut h);
        &self.conns[(h.finish() % self.conns.len() as u64) as usize]
    }

    /// Logs `notes` for the home partition's decider; how many it had not recorded yet.
    async fn note(&self, store: &StoreId, notes: Vec<AgentNote>) -> StorageResult<u64> {
        let ids: Vec<String> = notes
            .iter()
            .filter_map(|n| match crate::engine::agent_note_cmd(store, n) {
                Command::AgentConflict { id, .. } => Some(id.to_string()),
                _ => None,
            })
            .collect();
        let mut conn = self.conn(store).lock().await;
        let known = conn
            .client()
            .query_one("SELECT count(*) FROM decisions WHERE kind = 'conflict' AND key = ANY($1)", &[&ids])
            .await?
            .get::<_, i64>(0);
        conn.note(store, notes).await?;
        Ok((ids.len() as u64).saturating_sub(u64::try_from(known).unwrap_or(0)))
    }
}

impl CatalogStore for Plane {
    fn load_doc(
        &self,
        name: String,
    ) -> impl std::future::Future<Output = StorageResult<shelfsync_node::catalog::TrackedDoc>> + Send {
        self.db.load_doc(name)
    }
    fn doc_chunks_after(
        &self,
        doc: String,
        after: i64,
    ) -> impl std::future::Future<Output = StorageResult<Vec<(i64, Vec<u8>)>>> + Send {
        self.db.doc_chunks_after(doc, after)
    }
    fn sync_state(
        &self,
        doc: String,
        peer: String,
    ) -> impl std::future::Future<Output = StorageResult<automerge::sync::State>> + Send {
        self.db.sync_state(doc, peer)
    }
    async fn catalog_commit(&self, c: CatalogCommit) -> StorageResult<Vec<StoreId>> {
        // The partitions' deciders hold the rules; their holds versions reach the agents by the
        // plane's poll of `store_parts`.
        self.db.catalog_commit(c).await.map(|()| Vec::new())
    }
    fn hub_db(&self) -> &crate::db::HubDb {
        &self.db
    }
}

impl AgentLedger for Plane {
    fn life(&self) -> WriterId {
        self.life.clone()
    }

    async fn heads(&self, store: &StoreId) -> StorageResult<HubHeads> {
        crate::syncplane::store_heads(self.conn(store).lock().await.client(), store).await
    }

    fn check_cert(
        &self,
        store: StoreId,
        serial: String,
    ) -> impl std::future::Future<Output = StorageResult<()>> + Send {
        self.db.check_cert(store, serial)
    }

    fn revoked_serials(&self) -> impl std::future::Future<Output = StorageResult<Vec<(String, i64)>>> + Send {
        self.db.revoked_serials()
    }

    async fn stores_changed(&self) -> StorageResult<()> {
        // Each partition's decider learns of revocations itself (`apply_merged` reads new stores;
        // revoked certificates are refused here by `check_cert`).
        Ok(())
    }

    async fn record_retirements(&self, store: StoreId, reports: Vec<Retirement>, _now_ms: i64) -> StorageResult<u64> {
        self.note(&store, reports.into_iter().map(AgentNote::Retired).collect()).await
    }

    fn lookup_peer(
        &self,
        store: StoreId,
        writer: WriterId,
    ) -> impl std::future::Future<Output = StorageResult<PeerMarks>> + Send {
        self.db.lookup_peer(store, writer)
    }

    async fn agent_conflict(
        &self,
        kind: AgentConflictKind,
        store: StoreId,
        key: String,
        details: serde_json::Value,
        _now_ms: i64,
    ) -> StorageResult<bool> {
        let note = AgentNote::Conflict { kind, key, details: details.to_string() };
        Ok(self.note(&store, vec![note]).await? > 0)
    }

    async fn hub_entries_digest(&self, store: StoreId) -> StorageResult<StateDigest> {
        let conn = self.conn(&store).lock().await;
        Ok(crate::syncplane::hub_entries_digest(conn.client(), &store).await?.0)
    }

    async fn holds_snapshot(&self, store: StoreId) -> StorageResult<HoldsSnapshot> {
        let conn = self.conn(&store).lock().await;
        crate::syncplane::holds_snapshot(conn.client(), &store).await
    }

    async fn rights_snapshot(&self, store: StoreId) -> StorageResult<RightsSnapshot> {
        let rows = {
            let conn = self.conn(&store).lock().await;
            crate::syncplane::rights_entries(conn.client(), &store).await?
        };
        let entries = rows.iter().flat_map(|(sku, r)| r.iter().map(move |(w, k, t)| (sku, w, *k, *t)));
        Ok(RightsSnapshot::build(self.escrow.enabled.then_some(self.escrow.policy), entries))
    }

    async fn incoming_snapshot(&self, store: StoreId) -> StorageResult<Option<IncomingSnapshot>> {
        let conn = self.conn(&store).lock().await;
        crate::syncplane::incoming_snapshot(conn.client(), &store).await.map(Some)
    }

    async fn touch_store(&self, store: StoreId, at_ms: i64) -> StorageResult<()> {
        let conn = self.conn(&store).lock().await;
        conn.client()
            .execute(
                "UPDATE stores SET last_seen_ms = GREATEST(COALESCE(last_seen_ms, 0), $2) WHERE id = $1",
                &[&store.as_str(), &at_ms],
            )
            .await?;
        Ok(())
    }

    async fn read_delta(
        &self,
        store: StoreId,
        exclude: Option<WriterId>,
        after: u64,
        limit: usize,
    ) -> StorageResult<DeltaRead> {
        let page = {
            let conn = self.conn(&store).lock().await;
            crate::syncplane::read_delta(conn.client(), &store, exclude.as_ref(), after, limit).await?
        };
        let entries: Vec<_> = page.entries.into_iter().map(|(_, k, w, e)| (k, w, e)).collect();
        let macs =
            entries.iter().enumerate().map(|(i, (k, w, e))| (i as u32, self.key.tag(&store, k, w, *e))).collect();
        Ok(DeltaRead { upto: page.upto, entries, macs, ..DeltaRead::default() })
    }

    async fn apply_delta(
        &self,
        store: StoreId,
        peer: WriterId,
        delta: Delta,
        lineage_base: Option<Checkpoint>,
        pusher_boots: Vec<Boot>,
        now_ms: i64,
    ) -> StorageResult<Applied> {
        let (entries, tagged) = crate::engine::authenticate(&self.key, &store, &delta)?;
        let tagged: BTreeSet<(shelfsync_shared::Sku, WriterId)> =
            tagged.iter().map(|&i| (entries[i].0.clone(), entries[i].1.clone())).collect();
        let d = AgentDelta {
            store: store.clone(),
            peer,
            entries,
            rights: delta.rights().map(|(s, w, k, t)| (s.clone(), w.clone(), k, t)).collect(),
            fulfilled: delta.fulfilled,
            upto: delta.upto,
            lineage_base,
            lineage: delta.lineage,
            pusher_boots,
            at_ms: now_ms,
        };
        let merged = self.conn(&store).lock().await.merge(self.partitions, d).await?;
        let recovered: Vec<&(shelfsync_shared::Sku, WriterId)> =
            merged.grown.iter().filter(|k| tagged.contains(*k)).collect();
        Ok(Applied {
            // The deciders close holds and announce stock as they apply the merge.
            holds_changed: Vec::new(),
            changed: Vec::new(),
            entries_changed: merged.grown.len(),
            heads: HubHeads { counter: merged.head, journal: 0 },
            recovered: recovered.len() as u64,
            own_lost: recovered.iter().any(|(_, w)| self.writers.contains(w)),
        })
    }

    fn set_acked(
        &self,
        store: StoreId,
        peer: WriterId,
        upto: u64,
    ) -> impl std::future::Future<Output = StorageResult<()>> + Send {
        self.db.set_acked(store, peer, upto)
    }

    async fn read_journal(
        &self,
        store: StoreId,
        peer: Option<WriterId>,
        after: u64,
        limit: usize,
    ) -> StorageResult<JournalRead> {
        let conn = self.conn(&store).lock().await;
        crate::syncplane::read_journal(conn.client(), &store, peer.as_ref(), after, limit).await
    }

    async fn apply_journal(&self, store: StoreId, peer: WriterId, batch: JournalBatch) -> StorageResult<()> {
        self.conn(&store).lock().await.append_journal(self.partitions, &store, &peer, batch).await.map(|_| ())
    }

    fn set_journal_acked(
        &self,
        store: StoreId,
        peer: WriterId,
        upto: u64,
    ) -> impl std::future::Future<Output = StorageResult<()>> + Send {
        self.db.set_journal_acked(store, peer, upto)
    }

    async fn digest(&self, store: StoreId) -> StorageResult<(StateDigest, u64)> {
        let conn = self.conn(&store).lock().await;
        crate::syncplane::digest(conn.client(), &store).await
    }

    fn set_connected(&self, _store: &StoreId, _connected: bool) {}

    async fn reincarnate(&self, why: String, _now_ms: i64) -> StorageResult<WriterId> {
        Err(StorageError::Backend(format!(
            "{why}: the partitioned database is older than what the store saw (restored from an older copy?); \
             a new life for a partitioned database is not built: restore the newest copy of the database"
        )))
    }
}

/// Keeps the sessions of the stores connected to this hub up to date with what any hub did:
/// a merge's notice (`crate::notify`) refreshes its store at once, and every `poll` one query
/// reads every connected store's sequences and holds version (the deciders' commits, holds
/// and restocks, send no notice: the reservation path stays free of it).
pub async fn follow_heads(hub: Arc<Hub<Plane>>, mut notices: mpsc::Receiver<Notice>, poll: Duration) {
    let mut holds_seen: std::collections::HashMap<StoreId, i64> = std::collections::HashMap::new();
    let mut tick = tokio::time::interval(poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // One store (a merge's notice), or every store (a tick, or notices were missed).
        let only: Option<StoreId> = tokio::select! {
            n = notices.recv() => match n {
                None => return,
                Some(Notice::Store(s)) => Some(s),
                Some(Notice::Resync) => None,
            },
            _ = tick.tick() => None,
        };
        let live: BTreeSet<StoreId> = hub.all_live().into_iter().map(|(s, _)| s).collect();
        holds_seen.retain(|s, _| live.contains(s));
        let stores: Vec<String> = match only {
            Some(s) if live.contains(&s) => vec![s.to_string()],
            Some(_) => Vec::new(),
            None => live.iter().map(ToString::to_string).collect(),
        };
        if stores.is_empty() {
            continue;
        }
        let rows = {
            let conn = hub.storage.conns[0].lock().await;
            conn.client()
                .query(
                    "SELECT u.s, COALESCE(q.counter, 0), COALESCE(q.journal, 0),
                            COALESCE((SELECT SUM(p.holds_version) FROM store_parts p WHERE p.store = u.s), 0)::int8
                     FROM unnest($1::text[]) AS u(s) LEFT JOIN store_seqs q ON q.store = u.s",
                    &[&stores],
                )
                .await
        };
        let rows = match rows {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "reading the connected stores' heads");
                continue;
            }
        };
        for r in rows {
            let Ok(store) = r.get::<_, String>(0).parse::<StoreId>() else { continue };
            let heads =
                HubHeads { counter: r.get::<_, i64>(1).max(0) as u64, journal: r.get::<_, i64>(2).max(0) as u64 };
            hub.notify(std::slice::from_ref(&store), heads);
            let holds: i64 = r.get(3);
            if holds_seen.insert(store.clone(), holds) != Some(holds) {
                hub.holds_changed(std::slice::from_ref(&store));
            }
        }
    }
}
