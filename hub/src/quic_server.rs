//! The hub's QUIC endpoint: authenticates each agent by its certificate (the store id comes from
//! the certificate, never from a message), refuses unknown and revoked certificates, and runs one
//! [`HubSession`] per connection through [`shelfsync_node::quic::drive`].

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shelfsync_node::quic::{drive, DriveError, EffectHost, FrameStats};
use shelfsync_shared::sync::{Effect, HubSession, PeerAccept, SessionError, SyncConfig};
use shelfsync_shared::wire::close_code;
use shelfsync_shared::StoreId;

use crate::ledger::AgentLedger;
use crate::metrics::Metrics;
use crate::pki::{self, Pki};
use crate::state::{Hub, Pongs, StockChange};
use crate::storage::{AgentConflictKind, StorageError};
use shelfsync_hub_core::Refusal;

/// Builds the server TLS config with a CRL of every revoked certificate.
pub async fn server_config<L: AgentLedger>(hub: &Hub<L>, pki: &Pki) -> Result<quinn::ServerConfig, String> {
    let revoked = hub.storage.revoked_serials().await.map_err(|e| e.to_string())?;
    let crls = if revoked.is_empty() { Vec::new() } else { vec![pki.crl(&revoked).map_err(|e| e.to_string())?] };
    pki.server_config(crls).map_err(|e| e.to_string())
}

/// Accepts agent connections until the endpoint closes.
pub async fn serve<L: AgentLedger>(
    hub: Arc<Hub<L>>,
    endpoint: quinn::Endpoint,
    sync: SyncConfig,
    max_connections: usize,
    probe_timeout: Duration,
) {
    let open = Arc::new(AtomicUsize::new(0));
    while let Some(incoming) = endpoint.accept().await {
        if open.load(Ordering::Relaxed) >= max_connections {
            Metrics::inc(&hub.metrics.connections_refused_total);
            tracing::warn!(peer = %incoming.remote_address(), max_connections, "refusing connection: at the limit");
            incoming.refuse();
            continue;
        }
        let (hub, sync, open) = (hub.clone(), sync.clone(), open.clone());
        open.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            handle(hub, incoming, sync, probe_timeout).await;
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// Periodically closes connections of revoked stores and refreshes the endpoint's CRL, so a
/// `store revoke` made by the CLI (another process) takes effect on a running hub.
pub async fn watch_revocations<L: AgentLedger>(
    hub: Arc<Hub<L>>,
    endpoint: quinn::Endpoint,
    pki: Arc<Pki>,
    every: Duration,
) {
    let mut known = hub.storage.revoked_serials().await.map(|r| r.len()).unwrap_or(0);
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let revoked = match hub.storage.revoked_serials().await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot read revocations");
                continue;
            }
        };
        if revoked.len() != known {
            known = revoked.len();
            // The decider stops offering revoked stores online.
            if let Err(e) = hub.storage.stores_changed().await {
                tracing::error!(error = %e, "cannot bring the decider in line with the stores table");
            }
            match server_config(&hub, &pki).await {
                Ok(cfg) => endpoint.set_server_config(Some(cfg)),
                Err(e) => tracing::error!(error = %e, "cannot rebuild the TLS config with the new CRL"),
            }
        }
        for (store, live) in hub.all_live() {
            if revoked.iter().any(|(serial, _)| *serial == live.serial) {
                tracing::warn!(%store, "closing the connection of a revoked store");
                live.conn.close(quinn::VarInt::from_u32(close_code::REVOKED), b"certificate revoked");
            }
        }
    }
}

fn refusal_code(e: &StorageError) -> u32 {
    match e {
        StorageError::Refused(Refusal::Revoked(_)) => close_code::REVOKED,
        StorageError::Invalid(_)
        | StorageError::Refused(Refusal::Invalid(_))
        | StorageError::Refused(Refusal::UnknownStore(_)) => close_code::UNAUTHORIZED,
        _ => close_code::INTERNAL,
    }
}

async fn handle<L: AgentLedger>(
    hub: Arc<Hub<L>>,
    incoming: quinn::Incoming,
    sync: SyncConfig,
    probe_timeout: Duration,
) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            Metrics::inc(&hub.metrics.connections_refused_total);
            tracing::warn!(peer = %remote, error = %e, "TLS handshake failed");
            return;
        }
    };
    let ident = match pki::peer_identity(&conn) {
        Ok(i) => i,
        Err(e) => {
            Metrics::inc(&hub.metrics.connections_refused_total);
            tracing::warn!(peer = %remote, error = %e, "refusing a connection without a usable store certificate");
            conn.close(quinn::VarInt::from_u32(close_code::UNAUTHORIZED), b"no usable store certificate");
            return;
        }
    };
    let store = ident.store.clone();
    let peer = format!("store {store} at {remote}");
    if let Err(e) = hub.storage.check_cert(store.clone(), ident.serial_hex.clone()).await {
        Metrics::inc(&hub.metrics.connections_refused_total);
        let code = refusal_code(&e);
        tracing::warn!(peer, serial = %ident.serial_hex, error = %e, code = close_code::name(code), "refusing connection");
        conn.close(quinn::VarInt::from_u32(code), e.to_string().as_bytes());
        return;
    }
    let (send, recv) = match tokio::time::timeout(Duration::from_secs(30), conn.accept_bi()).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(peer, error = %e, "connection ended before the state stream opened");
            return;
        }
        Err(_) => {
            tracing::warn!(peer, "no state stream within 30 s; closing");
            conn.close(quinn::VarInt::from_u32(close_code::PROTOCOL_VIOLATION), b"no hello");
            return;
        }
    };
    // Subscribe before reading the heads: a change committed in between still wakes this session.
    let wake = hub.subscribe(&store, Default::default());
    let heads = match hub.storage.heads(&store).await {
        Ok(h) => h,
        Err(e) => {
            tracing::error!(peer, error = %e, "cannot read heads");
            conn.close(quinn::VarInt::from_u32(close_code::INTERNAL), b"storage error");
            return;
        }
    };
    hub.notify(std::slice::from_ref(&store), heads);
    let mut session = HubSession::new(sync, store.clone(), hub.storage.life(), heads.counter, heads.journal);
    let ping_seen = wake.borrow().ping;
    let (conn_id, pongs) = hub.connected(&store, conn.clone(), ident.serial_hex.clone());
    hub.metrics.connections_open.inc();
    let mut host = HubHost {
        hub: hub.clone(),
        store: store.clone(),
        conn_id,
        peer: None,
        remote: remote.to_string(),
        pongs,
        ping_seen,
        probe_timeout,
        holds_seen: 0,
        holds_dirty: false,
        holds_pushed: None,
        catalog: None,
        catalog_seen: 0,
    };
    let stats = Arc::new(FrameStats::default());
    let result = drive(&conn, send, recv, &mut session, &mut host, wake, stats, &peer).await;
    hub.metrics.connections_open.dec();
    // last_seen stays at the last frame that carried data: a connection that died silently was
    // not "seen" until its idle timeout.
    hub.disconnected(&store, conn_id);
    match result {
        Ok(()) => tracing::info!(peer, "sync connection closed"),
        Err(DriveError::Session(e)) => {
            match e.code {
                close_code::UNAUTHORIZED => Metrics::inc(&hub.metrics.connections_unauthorized_total),
                close_code::PROTOCOL_VIOLATION | close_code::VERSION_MISMATCH => {
                    Metrics::inc(&hub.metrics.connections_protocol_errors_total)
                }
                _ => {}
            }
            match e.code {
                // Expected ends, each already logged (and recorded) where it was decided.
                close_code::DUPLICATE_AGENT | close_code::FORKED => {
                    tracing::info!(peer, error = %e, "sync session ended")
                }
                _ => tracing::warn!(peer, error = %e, "sync session ended with an error"),
            }
        }
        // The agent stopped normally (its close code is `normal`): no error, nothing to count.
        Err(DriveError::Connection(quinn::ConnectionError::ApplicationClosed(c)))
            if c.error_code.into_inner() == u64::from(close_code::NORMAL) =>
        {
            tracing::info!(peer, reason = %String::from_utf8_lossy(&c.reason), "sync connection closed by the store")
        }
        // A stream the agent reset with the normal code as it stopped is the same ordinary end.
        Err(DriveError::Io(shelfsync_node::quic::FrameIoError::Read(quinn::ReadError::Reset(code))))
            if code.into_inner() == u64::from(close_code::NORMAL) =>
        {
            tracing::info!(peer, "sync connection closed by the store")
        }
        Err(DriveError::Io(e)) => {
            Metrics::inc(&hub.metrics.connections_protocol_errors_total);
            tracing::warn!(peer, error = %e, "sync stream error");
        }
        Err(DriveError::Connection(e)) => tracing::info!(peer, reason = %e, "sync connection lost"),
    }
}

struct HubHost<L: AgentLedger> {
    hub: Arc<Hub<L>>,
    store: StoreId,
    /// This connection in the registry of live connections.
    /// The agent's writer once the session is established (the journal it is sent skips it).
    peer: Option<shelfsync_shared::WriterId>,
    conn_id: u64,
    remote: String,
    /// Answers of this connection's agent to liveness probes.
    pongs: Arc<Pongs>,
    /// The probe counter last acted on.
    ping_seen: u64,
    probe_timeout: Duration,
    /// The holds wake-up counter last acted on.
    holds_seen: u64,
    /// A holds change not yet pushed.
    holds_dirty: bool,
    /// When the last snapshot went out.
    holds_pushed: Option<Instant>,
    /// Catalog sync with this store (after `Established`).
    catalog: Option<crate::catalog::PeerSync>,
    /// The catalog wake-up counter last acted on.
    catalog_seen: u64,
}

/// Least time between two holds snapshots to one store: a burst of reservations becomes one push.
const HOLDS_PUSH_INTERVAL: Duration = Duration::from_millis(50);

impl<L: AgentLedger> HubHost<L> {
    /// The agent said who it is: record what it reports, notice when it has seen more of this
    /// hub's life than the hub's files hold, decide whether it may join the store's live agents,
    /// and welcome it with what the hub holds of its writer.
    async fn lookup_peer(
        &mut self,
        session: &mut HubSession,
        hello: shelfsync_shared::wire::Hello,
    ) -> Result<(), SessionError> {
        let (hub, store) = (self.hub.clone(), self.store.clone());
        let now_ms = shelfsync_node::now_ms();
        if !hello.retired.is_empty() {
            let new = hub
                .storage
                .record_retirements(store.clone(), hello.retired.clone(), now_ms)
                .await
                .map_err(|e| internal("recording retirements", e))?;
            hub.metrics.retirements_total.inc_by(new);
            for r in hello.retired.iter().take(new as usize) {
                tracing::warn!(%store, old = %r.old, new = %r.new, reason = r.reason.as_str(), fork = r.fork_ordinal,
                    moved = r.moved, ambiguous = r.ambiguous,
                    "a store's files forked (restored or copied): its later changes count under a new writer");
            }
        }
        let life = hub.storage.life();
        if hello.hub_writer.as_ref() == Some(&life) {
            let heads = hub.storage.heads(&store).await.map_err(|e| internal("reading heads", e))?;
            if hello.applied > heads.counter || hello.journal_applied > heads.journal {
                let why = format!(
                    "store {store} applied this hub's changes up to {} (journal {}), its files end at {} ({})",
                    hello.applied, hello.journal_applied, heads.counter, heads.journal
                );
                hub.reincarnate(&store, &life, why).await.map_err(|e| internal("taking a new life", e))?;
                return Err(SessionError {
                    code: close_code::NORMAL,
                    message: "the hub took a new life; reconnect".into(),
                    from_peer: false,
                });
            }
        }
        hub.said_hello(&store, self.conn_id, hello.writer.clone(), hello.boots.clone());
        let marks =
            hub.storage.lookup_peer(store.clone(), hello.writer.clone()).await.map_err(|e| internal("lookup", e))?;
        let alive = hub.probe(&store, self.conn_id, self.probe_timeout).await;
        let writers: Vec<String> = alive.iter().filter_map(|c| c.writer.as_ref().map(ToString::to_string)).collect();
        if let Some(twin) = alive.iter().find(|c| c.writer.as_ref() == Some(&hello.writer)) {
            // Two live copies of one database. The newcomer waits (it keeps selling offline under
            // the writer); when it can connect, the lineage check moves what it did on its own to
            // a successor, exactly.
            Metrics::inc(&hub.metrics.writer_clones_total);
            let details = serde_json::json!({
                "writer": hello.writer.to_string(),
                "live_since": shelfsync_shared::rfc3339(twin.since_ms),
                "copy_address": self.remote,
            });
            let _ = hub
                .storage
                .agent_conflict(
                    AgentConflictKind::WriterCloned,
                    store.clone(),
                    hello.writer.to_string(),
                    details,
                    now_ms,
                )
                .await;
            tracing::warn!(%store, writer = %hello.writer, "a second live connection presents the same writer: its files are a copy; refused while the first is live");
            return Err(session.refuse(
                close_code::DUPLICATE_AGENT,
                format!(
                    "another live agent of store {store} presents the same writer {}: these files are a copy of a running \
                     store; refused until head office switches one off",
                    hello.writer
                ),
            ));
        }
        if alive.len() as u32 >= marks.max_agents {
            Metrics::inc(&hub.metrics.duplicate_agents_total);
            let mut key = writers.clone();
            key.push(hello.writer.to_string());
            key.sort();
            let details = serde_json::json!({
                "live_writers": writers,
                "refused_writer": hello.writer.to_string(),
                "refused_address": self.remote,
                "max_agents": marks.max_agents,
            });
            let _ = hub
                .storage
                .agent_conflict(AgentConflictKind::DuplicateAgent, store.clone(), key.join(" "), details, now_ms)
                .await;
            tracing::warn!(%store, refused = %hello.writer, live = ?writers, "refusing a second live agent of the store");
            return Err(session.refuse(
                close_code::DUPLICATE_AGENT,
                format!(
                    "store {store} already has a live agent ({}); this one is refused until head office switches one off \
                     or allows several agents for the store",
                    writers.join(", ")
                ),
            ));
        }
        let hub_entries =
            hub.storage.hub_entries_digest(store.clone()).await.map_err(|e| internal("digest of hub entries", e))?;
        session.accept(
            Instant::now(),
            PeerAccept {
                applied: marks.applied,
                journal_applied: marks.journal_applied,
                lineage: marks.lineage,
                hub_entries,
            },
        )
    }

    async fn push_holds(&mut self, session: &mut HubSession) -> Result<(), SessionError> {
        self.holds_dirty = false;
        self.holds_pushed = Some(Instant::now());
        let snapshot =
            self.hub.storage.holds_snapshot(self.store.clone()).await.map_err(|e| internal("reading holds", e))?;
        session.send_holds(snapshot);
        // Transfers on their way here travel with the holds (same version, same wake-up).
        let incoming = self
            .hub
            .storage
            .incoming_snapshot(self.store.clone())
            .await
            .map_err(|e| internal("reading incoming transfers", e))?;
        if let Some(incoming) = incoming {
            session.send_incoming(incoming);
        }
        // So do the store's escrow rights: the hub's returns move the holds version.
        let rights =
            self.hub.storage.rights_snapshot(self.store.clone()).await.map_err(|e| internal("reading rights", e))?;
        session.send_rights(rights);
        Ok(())
    }
}

fn internal(what: &str, e: StorageError) -> SessionError {
    let code = match e {
        StorageError::Forked(_) => close_code::FORKED,
        StorageError::Invalid(_)
        | StorageError::Refused(Refusal::Invalid(_) | Refusal::UnknownStore(_) | Refusal::Revoked(_)) => {
            close_code::UNAUTHORIZED
        }
        _ => close_code::INTERNAL,
    };
    SessionError { code, message: format!("{what}: {e}"), from_peer: false }
}

impl<L: AgentLedger> EffectHost<HubSession> for HubHost<L> {
    async fn effect(&mut self, session: &mut HubSession, effect: Effect) -> Result<(), SessionError> {
        let (hub, store) = (self.hub.clone(), self.store.clone());
        let (hub, store) = (&hub, &store);
        let now = Instant::now;
        match effect {
            Effect::LookupPeer { hello } => self.lookup_peer(session, hello).await?,
            Effect::Pong { nonce } => self.pongs.answered(nonce),
            Effect::Established { peer } => {
                Metrics::inc(&hub.metrics.connections_accepted_total);
                tracing::info!(%store, writer = %peer, "store connected");
                self.peer = Some(peer.clone());
                let _ = hub.storage.touch_store(store.clone(), shelfsync_node::now_ms()).await;
                self.push_holds(session).await?;
                let mut peer = hub
                    .catalog
                    .connected(hub.storage.as_ref(), store, &peer)
                    .await
                    .map_err(|e| internal("catalog", e))?;
                for (doc, m) in hub.catalog.first_messages(&mut peer).await {
                    session.send_catalog(doc, m);
                }
                self.catalog = Some(peer);
            }
            Effect::CatalogMessage { doc, bytes } => {
                let Some(peer) = self.catalog.as_mut() else {
                    return Err(SessionError {
                        code: close_code::PROTOCOL_VIOLATION,
                        message: "catalog message before the handshake".into(),
                        from_peer: false,
                    });
                };
                let (reply, holds) =
                    hub.catalog.message(hub.storage.as_ref(), peer, doc, &bytes).await.map_err(|e| {
                        let code = match e {
                            shelfsync_node::catalog::CatalogError::Forbidden(_) => close_code::UNAUTHORIZED,
                            shelfsync_node::catalog::CatalogError::Invalid(_) => close_code::PROTOCOL_VIOLATION,
                            _ => close_code::INTERNAL,
                        };
                        SessionError { code, message: format!("catalog: {e}"), from_peer: false }
                    })?;
                hub.holds_changed(&holds);
                if let Some(r) = reply {
                    session.send_catalog(doc, r);
                }
            }
            Effect::ReadDelta { after, limit, full } => {
                let exclude = if full { None } else { session.peer().cloned() };
                let read = hub
                    .storage
                    .read_delta(store.clone(), exclude, after, limit)
                    .await
                    .map_err(|e| internal("reading a delta", e))?;
                session.delta_read(now(), read)?;
            }
            Effect::ApplyDelta { peer, delta, lineage_base } => {
                let upto = delta.upto;
                let merge_started = Instant::now();
                let applied = hub
                    .storage
                    .apply_delta(
                        store.clone(),
                        peer,
                        delta,
                        lineage_base,
                        session.hello().map(|h| h.boots.clone()).unwrap_or_default(),
                        shelfsync_node::now_ms(),
                    )
                    .await
                    .map_err(|e| internal("applying a delta", e))?;
                Metrics::inc(&hub.metrics.deltas_applied_total);
                hub.metrics.merge_seconds.observe(merge_started.elapsed().as_secs_f64());
                hub.metrics.entries_merged_total.inc_by(applied.entries_changed as u64);
                if applied.recovered > 0 {
                    hub.metrics.hub_entries_recovered_total.inc_by(applied.recovered);
                    tracing::warn!(%store, entries = applied.recovered, "the store gave back entries the hub lacked (tags verified)");
                }
                hub.stock_changed(applied.changed.iter().map(|(sku, on_hand)| StockChange {
                    store: store.clone(),
                    sku: sku.clone(),
                    on_hand: *on_hand,
                }));
                hub.holds_changed(&applied.holds_changed);
                session.delta_applied(now(), upto)?;
                if applied.own_lost {
                    let life = hub.storage.life();
                    let why = format!(
                        "store {store} gave back entries of the hub's current writer {life} that its files lack"
                    );
                    hub.reincarnate(store, &life, why).await.map_err(|e| internal("taking a new life", e))?;
                    return Err(SessionError {
                        code: close_code::NORMAL,
                        message: "the hub took a new life; reconnect".into(),
                        from_peer: false,
                    });
                }
                // The merged entries took new hub sequences; telling our own session lets its
                // outbox skip them (they came from this agent) so digests stay comparable.
                session.local_head(now(), applied.heads.counter, applied.heads.journal);
                // Another agent of the same store (one allowed several) must hear of them.
                if applied.entries_changed > 0 && hub.agents(store).len() > 1 {
                    hub.notify(std::slice::from_ref(store), applied.heads);
                }
            }
            Effect::Acked { peer, upto } => {
                hub.storage.set_acked(store.clone(), peer, upto).await.map_err(|e| internal("recording an ack", e))?;
            }
            Effect::ReadJournal { after, limit } => {
                let read = hub
                    .storage
                    .read_journal(store.clone(), self.peer.clone(), after, limit)
                    .await
                    .map_err(|e| internal("reading the journal", e))?;
                session.journal_read(now(), read)?;
            }
            Effect::ApplyJournal { peer, batch } => {
                let upto = batch.upto;
                hub.storage
                    .apply_journal(store.clone(), peer, batch)
                    .await
                    .map_err(|e| internal("storing journal events", e))?;
                Metrics::inc(&hub.metrics.journal_batches_applied_total);
                session.journal_applied(now(), upto)?;
            }
            Effect::JournalAcked { peer, upto } => {
                hub.storage
                    .set_journal_acked(store.clone(), peer, upto)
                    .await
                    .map_err(|e| internal("recording a journal ack", e))?;
            }
            Effect::ComputeDigest => {
                let (digest, head) =
                    hub.storage.digest(store.clone()).await.map_err(|e| internal("computing the digest", e))?;
                session.digest_computed(now(), digest, head)?;
            }
            Effect::ApplyHolds { .. }
            | Effect::ApplyIncoming { .. }
            | Effect::ApplyRights { .. }
            | Effect::CheckLineage { .. } => {}
            Effect::DigestCompared { matched } => {
                if matched {
                    Metrics::inc(&hub.metrics.digests_matched_total);
                } else {
                    Metrics::inc(&hub.metrics.digests_mismatched_total);
                    tracing::warn!(%store, "anti-entropy digests differ; full resync started");
                }
            }
        }
        Ok(())
    }

    async fn heads_changed(
        &mut self,
        session: &mut HubSession,
        heads: shelfsync_node::db::Heads,
    ) -> Result<(), SessionError> {
        if heads.ping != self.ping_seen {
            self.ping_seen = heads.ping;
            session.ping(heads.ping);
        }
        if heads.catalog != self.catalog_seen {
            self.catalog_seen = heads.catalog;
            if let Some(peer) = self.catalog.as_mut() {
                if let Some(m) = self.hub.catalog.catalog_message(peer).await {
                    session.send_catalog(shelfsync_shared::wire::CatalogDoc::Catalog, m);
                }
            }
        }
        if heads.holds != self.holds_seen {
            self.holds_seen = heads.holds;
            self.holds_dirty = true;
            let due = self.holds_pushed.is_none_or(|t| t.elapsed() >= HOLDS_PUSH_INTERVAL);
            if due && session.is_established() {
                self.push_holds(session).await?;
            }
        }
        Ok(())
    }

    fn poll_deadline(&self) -> Option<Instant> {
        if self.holds_dirty {
            Some(self.holds_pushed.map_or_else(Instant::now, |t| t + HOLDS_PUSH_INTERVAL))
        } else {
            None
        }
    }

    async fn on_deadline(&mut self, session: &mut HubSession) -> Result<(), SessionError> {
        if self.holds_dirty && session.is_established() {
            self.push_holds(session).await?;
        }
        Ok(())
    }
}
