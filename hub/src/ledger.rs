//! What an agent's sync session needs of the hub's storage ([`AgentLedger`]), answered by one
//! decider's [`Engine`] (SQLite, PostgreSQL of one partition) or by the sync plane of a
//! partitioned database ([`crate::plane::Plane`]). The session itself
//! ([`crate::quic_server`]) is the same for both: authentication, the handshake, clone and
//! duplicate detection, holds pushes and the catalog do not know which one answers.

use std::future::Future;

use shelfsync_hub_core::AgentConflictKind;
use shelfsync_shared::counter::StateDigest;
use shelfsync_shared::lineage::{Boot, Checkpoint};
use shelfsync_shared::sync::{DeltaRead, JournalRead};
use shelfsync_shared::wire::{Delta, HoldsSnapshot, IncomingSnapshot, JournalBatch, Retirement, RightsSnapshot};
use shelfsync_shared::{StoreId, WriterId};

use crate::catalog::CatalogStore;
use crate::engine::Engine;
use crate::storage::{Applied, HubHeads, PeerMarks, StorageResult};

/// The storage side of agents' sync sessions. Sequences (`heads`, `read_delta`, `applied`)
/// are the ledger's own: the hub's for one decider, the store's on the sync plane; a session
/// only ever compares them with what the same ledger said, under the same [`Self::life`].
pub trait AgentLedger: CatalogStore + Send + Sync + 'static {
    /// The writer whose life the stores' watermarks refer to.
    fn life(&self) -> WriterId;
    /// The heads a session of `store` follows.
    fn heads(&self, store: &StoreId) -> impl Future<Output = StorageResult<HubHeads>> + Send;
    /// Fails unless `serial` is a live certificate of `store`.
    fn check_cert(&self, store: StoreId, serial: String) -> impl Future<Output = StorageResult<()>> + Send;
    /// Every revoked certificate (serial, when).
    fn revoked_serials(&self) -> impl Future<Output = StorageResult<Vec<(String, i64)>>> + Send;
    /// The stores table changed under the hub (a revocation by the CLI).
    fn stores_changed(&self) -> impl Future<Output = StorageResult<()>> + Send;
    /// Records retirements an agent reports; how many were new.
    fn record_retirements(
        &self,
        store: StoreId,
        reports: Vec<Retirement>,
        now_ms: i64,
    ) -> impl Future<Output = StorageResult<u64>> + Send;
    /// What the hub applied from an agent writer.
    fn lookup_peer(&self, store: StoreId, writer: WriterId) -> impl Future<Output = StorageResult<PeerMarks>> + Send;
    /// Records a conflict about a store's agents; whether it was new.
    fn agent_conflict(
        &self,
        kind: AgentConflictKind,
        store: StoreId,
        key: String,
        details: serde_json::Value,
        now_ms: i64,
    ) -> impl Future<Output = StorageResult<bool>> + Send;
    /// Digest of the hub-authored entries of `store`.
    fn hub_entries_digest(&self, store: StoreId) -> impl Future<Output = StorageResult<StateDigest>> + Send;
    /// The holds a store keeps for the online channel.
    fn holds_snapshot(&self, store: StoreId) -> impl Future<Output = StorageResult<HoldsSnapshot>> + Send;
    /// The store's escrow rights as the hub has them, with the policy stores grant by.
    fn rights_snapshot(&self, store: StoreId) -> impl Future<Output = StorageResult<RightsSnapshot>> + Send;
    /// Transfers on their way to `store` (`None`: this ledger does not carry transfers).
    fn incoming_snapshot(&self, store: StoreId)
        -> impl Future<Output = StorageResult<Option<IncomingSnapshot>>> + Send;
    /// The store was seen.
    fn touch_store(&self, store: StoreId, at_ms: i64) -> impl Future<Output = StorageResult<()>> + Send;
    /// Entries of `store` above `after`, tagged.
    fn read_delta(
        &self,
        store: StoreId,
        exclude: Option<WriterId>,
        after: u64,
        limit: usize,
    ) -> impl Future<Output = StorageResult<DeltaRead>> + Send;
    /// Merges an agent's delta (authenticated here: tags, own writers, lineage).
    fn apply_delta(
        &self,
        store: StoreId,
        peer: WriterId,
        delta: Delta,
        lineage_base: Option<Checkpoint>,
        pusher_boots: Vec<Boot>,
        now_ms: i64,
    ) -> impl Future<Output = StorageResult<Applied>> + Send;
    /// An agent writer acked the ledger's counter sequence up to `upto`.
    fn set_acked(&self, store: StoreId, peer: WriterId, upto: u64) -> impl Future<Output = StorageResult<()>> + Send;
    /// `store`'s journal events above `after` not written by `peer`.
    fn read_journal(
        &self,
        store: StoreId,
        peer: Option<WriterId>,
        after: u64,
        limit: usize,
    ) -> impl Future<Output = StorageResult<JournalRead>> + Send;
    /// Stores an agent's journal batch.
    fn apply_journal(
        &self,
        store: StoreId,
        peer: WriterId,
        batch: JournalBatch,
    ) -> impl Future<Output = StorageResult<()>> + Send;
    /// An agent writer acked the journal up to `upto`.
    fn set_journal_acked(
        &self,
        store: StoreId,
        peer: WriterId,
        upto: u64,
    ) -> impl Future<Output = StorageResult<()>> + Send;
    /// Digest of `store`'s entries and the sequence it covers.
    fn digest(&self, store: StoreId) -> impl Future<Output = StorageResult<(StateDigest, u64)>> + Send;
    /// A store's first connection to this hub opened, or its last one closed.
    fn set_connected(&self, store: &StoreId, connected: bool);
    /// Takes a new life (the files are older than what a store saw); the new writer.
    fn reincarnate(&self, why: String, now_ms: i64) -> impl Future<Output = StorageResult<WriterId>> + Send;
}

impl AgentLedger for Engine {
    fn life(&self) -> WriterId {
        Engine::hub_writer(self)
    }
    async fn heads(&self, _store: &StoreId) -> StorageResult<HubHeads> {
        Engine::heads(self).await
    }
    fn check_cert(&self, store: StoreId, serial: String) -> impl Future<Output = StorageResult<()>> + Send {
        Engine::check_cert(self, store, serial)
    }
    fn revoked_serials(&self) -> impl Future<Output = StorageResult<Vec<(String, i64)>>> + Send {
        Engine::revoked_serials(self)
    }
    fn stores_changed(&self) -> impl Future<Output = StorageResult<()>> + Send {
        Engine::sync_stores(self)
    }
    fn record_retirements(
        &self,
        store: StoreId,
        reports: Vec<Retirement>,
        now_ms: i64,
    ) -> impl Future<Output = StorageResult<u64>> + Send {
        Engine::record_retirements(self, store, reports, now_ms)
    }
    fn lookup_peer(&self, store: StoreId, writer: WriterId) -> impl Future<Output = StorageResult<PeerMarks>> + Send {
        Engine::lookup_peer(self, store, writer)
    }
    fn agent_conflict(
        &self,
        kind: AgentConflictKind,
        store: StoreId,
        key: String,
        details: serde_json::Value,
        now_ms: i64,
    ) -> impl Future<Output = StorageResult<bool>> + Send {
        Engine::agent_conflict(self, kind, store, key, details, now_ms)
    }
    fn hub_entries_digest(&self, store: StoreId) -> impl Future<Output = StorageResult<StateDigest>> + Send {
        Engine::hub_entries_digest(self, store)
    }
    fn holds_snapshot(&self, store: StoreId) -> impl Future<Output = StorageResult<HoldsSnapshot>> + Send {
        Engine::holds_snapshot(self, store)
    }
    async fn incoming_snapshot(&self, store: StoreId) -> StorageResult<Option<IncomingSnapshot>> {
        Engine::incoming_snapshot(self, store).await.map(Some)
    }
    fn rights_snapshot(&self, store: StoreId) -> impl Future<Output = StorageResult<RightsSnapshot>> + Send {
        Engine::rights_snapshot(self, store)
    }
    fn touch_store(&self, store: StoreId, at_ms: i64) -> impl Future<Output = StorageResult<()>> + Send {
        Engine::touch_store(self, store, at_ms)
    }
    fn read_delta(
        &self,
        store: StoreId,
        exclude: Option<WriterId>,
        after: u64,
        limit: usize,
    ) -> impl Future<Output = StorageResult<DeltaRead>> + Send {
        Engine::read_delta(self, store, exclude, after, limit)
    }
    fn apply_delta(
        &self,
        store: StoreId,
        peer: WriterId,
        delta: Delta,
        lineage_base: Option<Checkpoint>,
        pusher_boots: Vec<Boot>,
        now_ms: i64,
    ) -> impl Future<Output = StorageResult<Applied>> + Send {
        Engine::apply_delta(self, store, peer, delta, lineage_base, pusher_boots, now_ms)
    }
    fn set_acked(&self, store: StoreId, peer: WriterId, upto: u64) -> impl Future<Output = StorageResult<()>> + Send {
        Engine::set_acked(self, store, peer, upto)
    }
    fn read_journal(
        &self,
        store: StoreId,
        peer: Option<WriterId>,
        after: u64,
        limit: usize,
    ) -> impl Future<Output = StorageResult<JournalRead>> + Send {
        Engine::read_journal(self, store, peer, after, limit)
    }
    fn apply_journal(
        &self,
        store: StoreId,
        peer: WriterId,
        batch: JournalBatch,
    ) -> impl Future<Output = StorageResult<()>> + Send {
        Engine::apply_journal(self, store, peer, batch)
    }
    fn set_journal_acked(
        &self,
        store: StoreId,
        peer: WriterId,
        upto: u64,
    ) -> impl Future<Output = StorageResult<()>> + Send {
        Engine::set_journal_acked(self, store, peer, upto)
    }
    fn digest(&self, store: StoreId) -> impl Future<Output = StorageResult<(StateDigest, u64)>> + Send {
        Engine::digest(self, store)
    }
    fn set_connected(&self, store: &StoreId, connected: bool) {
        Engine::set_connected(self, store, connected)
    }
    fn reincarnate(&self, why: String, now_ms: i64) -> impl Future<Output = StorageResult<WriterId>> + Send {
        Engine::reincarnate(self, why, now_ms)
    }
}
