//! The agent's sync client: connects to the hub over QUIC with the store's certificate, resumes
//! from the durable watermarks, and lets [`shelfsync_node::quic::drive`] move frames between the streams
//! and an [`AgentSession`]. Reconnects forever: the store works the same with the hub unreachable
//! for days.
//!
//! Reconnecting after an outage, however long, takes about a second once the link is back:
//! - transient failures back off exponentially from `sync.backoff_ms_min` but only up to
//!   `sync.backoff_ms_max` (1 s), with full jitter ([`backoff`]), so 10,000 stores knock about
//!   once a second each, spread evenly, and the hub's handshake limits pace any rush;
//! - an attempt never waits on one lost handshake: while a handshake is unanswered a new one
//!   starts every ~1 s (at most [`HANDSHAKES_PENDING_MAX`] in flight), so QUIC's own growing
//!   retransmission timer for the first packet cannot hold the store off for seconds;
//! - a connection on which nothing has arrived for [`STALL_AFTER`] is given up (the transport
//!   sends a keep-alive every second, so a live link is never that quiet), instead of waiting
//!   for the idle timeout and the growing retransmission timer of a dead path;
//! - permanent refusals (certificate refused or revoked, CA mismatch, another agent of the store)
//!   are logged at ERROR once per episode and retried only every `sync.refused_retry_ms`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shelfsync_shared::sync::{AgentSession, Effect, SessionError, SyncConfig};
use shelfsync_shared::wire::close_code;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::AgentConfig;
use crate::db::{Db, DbError};
use crate::replica;
use crate::server::StartError;
use crate::status::{SyncState, SyncStatus};
use shelfsync_node::bundle::Bundle;
use shelfsync_node::quic::{drive, DriveError, EffectHost, FrameStats};

/// Traffic of the sync client over its lifetime: frame payload per stream kind, and UDP bytes
/// (QUIC framing, TLS, retransmissions included) of every connection so far.
#[derive(Debug, Default)]
pub struct SyncStats {
    /// Frame counters, cumulative over connections.
    pub frames: Arc<FrameStats>,
    udp_sent_closed: std::sync::atomic::AtomicU64,
    udp_received_closed: std::sync::atomic::AtomicU64,
    current: std::sync::Mutex<Option<quinn::Connection>>,
    endpoint: std::sync::Mutex<Option<quinn::Endpoint>>,
}

impl SyncStats {
    /// UDP bytes (sent, received) so far, the live connection included.
    pub fn udp_bytes(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        let live = self.current.lock().expect("stats lock").as_ref().map(|c| c.stats().udp_tx.bytes);
        let live_rx = self.current.lock().expect("stats lock").as_ref().map(|c| c.stats().udp_rx.bytes);
        (
            self.udp_sent_closed.load(Relaxed) + live.unwrap_or(0),
            self.udp_received_closed.load(Relaxed) + live_rx.unwrap_or(0),
        )
    }

    /// Closes the connection cleanly (the hub learns at once that the store left) and waits,
    /// briefly, for the close to go out.
    pub async fn close(&self) {
        let ep = self.endpoint.lock().expect("stats lock").clone();
        if let Some(ep) = ep {
            ep.close(quinn::VarInt::from_u32(0), b"agent stopping");
            let _ = tokio::time::timeout(Duration::from_secs(1), ep.wait_idle()).await;
        }
    }

    fn connection_started(&self, conn: &quinn::Connection) {
        *self.current.lock().expect("stats lock") = Some(conn.clone());
    }

    fn connection_ended(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        if let Some(c) = self.current.lock().expect("stats lock").take() {
            let s = c.stats();
            self.udp_sent_closed.fetch_add(s.udp_tx.bytes, Relaxed);
            self.udp_received_closed.fetch_add(s.udp_rx.bytes, Relaxed);
        }
    }
}

/// Starts the sync client if this agent has a bundle and sync is enabled.
pub fn spawn(
    config: &AgentConfig,
    db: Db,
    status: watch::Sender<SyncStatus>,
    stats: Arc<SyncStats>,
    catalog: Arc<crate::catalog::AgentCatalog>,
) -> Result<Option<JoinHandle<()>>, StartError> {
    if !config.sync.enabled || !config.bundle_dir().exists() {
        return Ok(None);
    }
    let bundle = Bundle::load(&config.bundle_dir()).map_err(|e| StartError::Other(e.to_string()))?;
    if bundle.store_id != db.identity().store {
        return Err(StartError::Other(format!(
            "bundle in {} is for store {} but this database is store {}",
            config.bundle_dir().display(),
            bundle.store_id,
            db.identity().store
        )));
    }
    let hub_addr = if config.sync.hub_addr.is_empty() { bundle.hub_addr.clone() } else { config.sync.hub_addr.clone() };
    let client_config = bundle.client_config().map_err(|e| StartError::Other(e.to_string()))?;
    let hub_addrs: Vec<String> = hub_addr.split(',').map(|a| a.trim().to_owned()).filter(|a| !a.is_empty()).collect();
    let client = SyncClient {
        db,
        handshake_phase: if hub_addrs.len() > 1 { HANDSHAKE_PHASE_FAILOVER } else { HANDSHAKE_PHASE },
        hub_addrs,
        current: AtomicUsize::new(0),
        server_name: bundle.server_name.clone(),
        client_config,
        session_config: SyncConfig {
            coalesce: Duration::from_millis(config.sync.coalesce_ms),
            digest_interval: Duration::from_secs(config.sync.digest_interval_secs),
            ..SyncConfig::default()
        },
        backoff_min: Duration::from_millis(config.sync.backoff_ms_min),
        backoff_max: Duration::from_millis(config.sync.backoff_ms_max),
        refused_retry: Duration::from_millis(config.sync.refused_retry_ms),
        status,
        stats,
        catalog,
    };
    Ok(Some(tokio::spawn(client.run())))
}

struct SyncClient {
    db: Db,
    /// The hubs this store may sync with (one, or several sharing a database): the agent stays
    /// with one while it answers and moves to the next when it does not.
    hub_addrs: Vec<String>,
    /// Index of the hub tried now.
    current: AtomicUsize,
    /// How long a handshake may go unanswered before the next hub is tried.
    handshake_phase: Duration,
    server_name: String,
    client_config: quinn::ClientConfig,
    session_config: SyncConfig,
    backoff_min: Duration,
    backoff_max: Duration,
    refused_retry: Duration,
    status: watch::Sender<SyncStatus>,
    stats: Arc<SyncStats>,
    catalog: Arc<crate::catalog::AgentCatalog>,
}

/// The reconnect delay after the n-th transient failure in a row: exponential from `min`, capped
/// at `max`, with full jitter (uniform over `[0, cap]`, never below `min / 2`), so a fleet of
/// stores cut off together spreads its attempts evenly instead of knocking in lockstep. With the
/// default 1 s cap a store tries about once a second however long the outage, so it is back
/// within about a second of the link healing.
pub fn backoff(min: Duration, max: Duration, attempt: u32, jitter: f64) -> Duration {
    let exp = min.saturating_mul(1u32 << attempt.min(20)).min(max);
    exp.mul_f64(jitter.clamp(0.0, 1.0)).max(min / 2)
}

/// A connection on which nothing arrived for this long is given up and replaced. The transport
/// sends a keep-alive after 1 s of silence, which the hub acknowledges, so a live link is never
/// this quiet; a dead one would otherwise be noticed only at the 30 s idle timeout, and QUIC's
/// retransmission timer, doubling all through an outage, could hold data back for seconds more.
pub const STALL_AFTER: Duration = Duration::from_millis(2500);

/// Most handshakes in flight at once while the hub does not answer.
pub const HANDSHAKES_PENDING_MAX: usize = 3;

/// How long one connection attempt keeps starting handshakes before it reports failure.
const HANDSHAKE_PHASE: Duration = Duration::from_secs(10);

/// [`HANDSHAKE_PHASE`] when the bundle names several hubs: a dead one is given up sooner, since
/// another may answer.
const HANDSHAKE_PHASE_FAILOVER: Duration = Duration::from_secs(3);

/// Gap between handshakes while earlier ones go unanswered: uniform in 0.5 .. 1 s.
fn handshake_gap() -> Duration {
    Duration::from_millis(500).mul_f64(1.0 + rand::random::<f64>())
}

impl SyncClient {
    /// The hub tried now.
    fn hub_addr(&self) -> String {
        self.hub_addrs[self.current.load(Ordering::Relaxed) % self.hub_addrs.len()].clone()
    }

    async fn run(self) {
        if self.hub_addrs.is_empty() {
            tracing::error!("no hub address: set sync.hub_addr or give the bundle one; the store sells offline");
            return;
        }
        self.status.send_modify(|s| {
            s.state = SyncState::Connecting;
            s.hub_addr = Some(self.hub_addr());
        });
        let mut endpoint: Option<quinn::Endpoint> = None;
        let mut failures = 0u32;
        let mut refused_before = false;
        loop {
            self.status.send_modify(|s| {
                // A refused agent stays `refused` while it tries again: only a connection the hub
                // accepts ends that episode.
                if !refused_before {
                    s.state = SyncState::Connecting;
                }
                s.attempts += 1;
            });
            let outcome = self.connect_once(&mut endpoint).await;
            let established = self.status.borrow().state == SyncState::Connected;
            let (error, kind) = match outcome {
                Ok(()) => ("connection closed".to_owned(), Ended::Other),
                Err((e, kind)) => (e, kind),
            };
            let refused = matches!(kind, Ended::Refused | Ended::Permanent);
            match kind {
                Ended::Retired => {
                    tracing::warn!(hub = %self.hub_addr(), reason = %error, "sync connection ended; reconnecting under the new writer")
                }
                // Logged once per episode at ERROR: head office must resolve it.
                Ended::Refused if !refused_before => tracing::error!(
                    hub = %self.hub_addr(),
                    reason = %error,
                    retry_secs = self.refused_retry.as_secs(),
                    "the hub refuses this agent: another agent of this store is connected; \
                     it keeps selling offline and retries, but head office must switch one of them off"
                ),
                Ended::Permanent if !refused_before => tracing::error!(
                    hub = %self.hub_addr(),
                    reason = %error,
                    retry_secs = self.refused_retry.as_secs(),
                    "the hub refuses this store's credentials (certificate unknown, revoked, or from another hub's CA); \
                     the store keeps selling offline and retries slowly, but its bundle must be fixed"
                ),
                Ended::Refused | Ended::Permanent => {
                    tracing::debug!(hub = %self.hub_addr(), reason = %error, "still refused")
                }
                Ended::Other if established => {
                    tracing::warn!(hub = %self.hub_addr(), error = %error, "sync connection lost; reconnecting")
                }
                Ended::Other => {
                    tracing::info!(hub = %self.hub_addr(), error = %error, "cannot reach the hub; retrying")
                }
            }
            refused_before = refused;
            // A hub that cannot be reached (or stands by and refuses) hands over to the next one;
            // the back-off grows only once every hub was tried.
            let several = self.hub_addrs.len() > 1;
            if several && kind == Ended::Other {
                let next = (self.current.load(Ordering::Relaxed) + 1) % self.hub_addrs.len();
                self.current.store(next, Ordering::Relaxed);
                tracing::info!(hub = %self.hub_addr(), "trying the next hub of the bundle");
            }
            self.status.send_modify(|s| {
                s.state = if refused { SyncState::Refused } else { SyncState::Connecting };
                s.connected_since = None;
                s.last_error = Some(error);
                s.hub_addr = Some(self.hub_addr());
            });
            failures = if established { 0 } else { failures.saturating_add(1) };
            let round_failures = if several && kind == Ended::Other {
                // Within a round of the hubs, retry at once; between rounds, back off.
                if !(failures as usize).is_multiple_of(self.hub_addrs.len()) {
                    0
                } else {
                    failures / self.hub_addrs.len() as u32
                }
            } else {
                failures
            };
            let delay = match kind {
                // The writer changed: ship under the new one at once.
                Ended::Retired => Duration::ZERO,
                // Someone has to act first: no point knocking often.
                Ended::Refused | Ended::Permanent => self.refused_retry.mul_f64(0.75 + 0.25 * rand::random::<f64>()),
                Ended::Other if round_failures == 0 && failures > 0 => Duration::ZERO,
                Ended::Other => backoff(self.backoff_min, self.backoff_max, round_failures, rand::random::<f64>()),
            };
            tokio::time::sleep(delay).await;
        }
    }

    async fn connect_once(&self, endpoint: &mut Option<quinn::Endpoint>) -> Result<(), (String, Ended)> {
        self.connect_inner(endpoint).await.map_err(|e| {
            let kind = if e.contains(RETIRED_MARK) {
                Ended::Retired
            } else if e.contains(close_code::name(close_code::DUPLICATE_AGENT)) {
                Ended::Refused
            } else if is_permanent(&e) {
                Ended::Permanent
            } else {
                Ended::Other
            };
            (e, kind)
        })
    }

    async fn connect_inner(&self, endpoint: &mut Option<quinn::Endpoint>) -> Result<(), String> {
        let hub_addr = self.hub_addr();
        let addr: SocketAddr = tokio::net::lookup_host(&hub_addr)
            .await
            .map_err(|e| format!("resolving {hub_addr}: {e}"))?
            .next()
            .ok_or_else(|| format!("{hub_addr} resolves to no address"))?;
        let ep = match endpoint {
            Some(ep) => ep.clone(),
            None => {
                let bind: SocketAddr =
                    if addr.is_ipv4() { "0.0.0.0:0".parse().unwrap() } else { "[::]:0".parse().unwrap() };
                let ep = quinn::Endpoint::client(bind).map_err(|e| format!("binding a UDP socket: {e}"))?;
                *self.stats.endpoint.lock().expect("stats lock") = Some(ep.clone());
                endpoint.insert(ep).clone()
            }
        };
        let conn = self.handshake(&ep, addr).await?;
        // A refused certificate still completes the handshake here; the refusal arrives on the
        // first stream operation, so "connected" waits for the hub's Welcome.
        let (send, recv) = conn.open_bi().await.map_err(|e| format!("opening the state stream: {e}"))?;
        let resume = replica::resume(&self.db).await.map_err(|e| format!("reading watermarks: {e}"))?;
        let id = self.db.identity();
        let mut session = AgentSession::new(self.session_config.clone(), id.store.clone(), id.writer.clone(), resume);
        let catalog_seen = self.db.heads().borrow().catalog;
        let mut host =
            AgentHost { db: self.db.clone(), status: self.status.clone(), catalog: self.catalog.clone(), catalog_seen };
        let peer = format!("hub {addr}");
        self.stats.connection_started(&conn);
        let frames = self.stats.frames.clone();
        let watchdog = tokio::spawn(stall_watchdog(conn.clone()));
        let result = drive(&conn, send, recv, &mut session, &mut host, self.db.heads(), frames, &peer).await;
        // The watchdog ends only by closing a silent connection.
        let stalled = watchdog.is_finished();
        watchdog.abort();
        self.stats.connection_ended();
        match result {
            Ok(()) => Ok(()),
            Err(DriveError::Session(e)) => Err(describe_session_error(&e)),
            Err(DriveError::Connection(quinn::ConnectionError::ApplicationClosed(c))) => {
                let code = c.error_code.into_inner() as u32;
                Err(format!(
                    "hub closed the connection: {} ({})",
                    close_code::name(code),
                    String::from_utf8_lossy(&c.reason)
                ))
            }
            Err(_) if stalled => {
                Err(format!("nothing from the hub for {} ms: the link is down", STALL_AFTER.as_millis()))
            }
            Err(e) => Err(e.to_string()),
        }
    }
}

impl SyncClient {
    /// Completes a QUIC handshake with the hub. While one goes unanswered (the hub or the link is
    /// down), another starts every ~1 s, keeping at most [`HANDSHAKES_PENDING_MAX`] in flight:
    /// the first to finish wins and the rest are dropped. A handshake that fails outright (a TLS
    /// refusal) ends the attempt at once.
    async fn handshake(&self, ep: &quinn::Endpoint, addr: SocketAddr) -> Result<quinn::Connection, String> {
        let mut pending = tokio::task::JoinSet::new();
        let mut order = std::collections::VecDeque::new();
        let until = tokio::time::Instant::now() + self.handshake_phase;
        let mut next = tokio::time::Instant::now();
        loop {
            let now = tokio::time::Instant::now();
            if now >= until {
                return Err(format!("handshake with {addr}: no answer within {} s", self.handshake_phase.as_secs()));
            }
            if now >= next {
                if order.len() >= HANDSHAKES_PENDING_MAX {
                    if let Some(oldest) = order.pop_front() {
                        tokio::task::AbortHandle::abort(&oldest);
                    }
                }
                let connecting = ep
                    .connect_with(self.client_config.clone(), addr, &self.server_name)
                    .map_err(|e| format!("connecting to {addr}: {e}"))?;
                order.push_back(pending.spawn(connecting));
                next = now + handshake_gap();
            }
            tokio::select! {
                done = pending.join_next(), if !pending.is_empty() => match done {
                    Some(Ok(Ok(conn))) => return Ok(conn),
                    Some(Ok(Err(e))) => return Err(format!("handshake with {addr}: {e}")),
                    // Aborted as the oldest of too many.
                    Some(Err(_)) | None => {}
                },
                _ = tokio::time::sleep_until(next.min(until)) => {}
            }
        }
    }
}

/// Closes `conn` once nothing has arrived on it for [`STALL_AFTER`].
async fn stall_watchdog(conn: quinn::Connection) {
    let mut seen = conn.stats().udp_rx.datagrams;
    let mut quiet_since = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = conn.stats().udp_rx.datagrams;
        if now != seen {
            seen = now;
            quiet_since = tokio::time::Instant::now();
        } else if quiet_since.elapsed() >= STALL_AFTER {
            tracing::debug!("nothing from the hub for {STALL_AFTER:?}; giving the connection up");
            conn.close(quinn::VarInt::from_u32(close_code::NORMAL), b"hub silent");
            return;
        }
    }
}

/// Whether a failure is the hub refusing this store's credentials (or this agent not trusting
/// the hub's), which retrying soon cannot fix: the certificate was revoked or is unknown, or
/// the two sides' CAs do not match.
fn is_permanent(e: &str) -> bool {
    e.contains(close_code::name(close_code::REVOKED))
        || e.contains(close_code::name(close_code::UNAUTHORIZED))
        || e.contains("cryptographic handshake failed")
        || e.contains("invalid peer certificate")
        || e.contains("certificate")
}

/// How a connection ended, for the reconnect policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ended {
    /// This agent retired its writer: reconnect at once.
    Retired,
    /// The hub refuses a second agent of the store.
    Refused,
    /// The credentials are refused (revoked, unknown, another CA): retry slowly.
    Permanent,
    /// Anything else: back off.
    Other,
}

/// Marks the session error that ends a connection after a retirement.
const RETIRED_MARK: &str = "retired writer";

fn describe_session_error(e: &SessionError) -> String {
    if e.from_peer {
        format!("hub refused: {} ({})", close_code::name(e.code), e.message)
    } else {
        format!("{} ({})", close_code::name(e.code), e.message)
    }
}

struct AgentHost {
    db: Db,
    status: watch::Sender<SyncStatus>,
    catalog: Arc<crate::catalog::AgentCatalog>,
    catalog_seen: u64,
}

fn internal(what: &str, e: DbError) -> SessionError {
    SessionError { code: close_code::INTERNAL, message: format!("{what}: {e}"), from_peer: false }
}

impl EffectHost<AgentSession> for AgentHost {
    async fn effect(&mut self, session: &mut AgentSession, effect: Effect) -> Result<(), SessionError> {
        match effect {
            Effect::Established { peer } => {
                tracing::info!(hub = %peer, "connected to the hub");
                let since = shelfsync_shared::rfc3339(shelfsync_node::now_ms());
                self.status.send_modify(|s| {
                    s.state = SyncState::Connected;
                    s.hub_writer = Some(peer.to_string());
                    s.connected_since = Some(since);
                    s.last_error = None;
                });
                let first = self.catalog.connected(&self.db).await.map_err(|e| SessionError {
                    code: close_code::INTERNAL,
                    message: format!("catalog: {e}"),
                    from_peer: false,
                })?;
                for (doc, m) in first {
                    session.send_catalog(doc, m);
                }
            }
            Effect::ReadDelta { after, limit, full } => {
                let read = replica::read_delta(&self.db, after, limit, full)
                    .await
                    .map_err(|e| internal("reading a delta", e))?;
                session.delta_read(Instant::now(), read)?;
            }
            Effect::CheckLineage { hub, hub_entries } => {
                let hub_head = hub.head.ordinal;
                match replica::check_lineage(&self.db, hub).await.map_err(|e| internal("checking lineage", e))? {
                    None => {
                        // The hub recorded what our Hello reported; it need not come again.
                        replica::reports_delivered(&self.db).await.map_err(|e| internal("recording reports", e))?;
                        let ours = replica::hub_entries_digest(&self.db).await.map_err(|e| internal("digest", e))?;
                        if ours != hub_entries {
                            tracing::info!("the hub's entries differ from ours; giving back what we hold of them");
                        }
                        session.lineage_ok(Instant::now(), ours != hub_entries)?;
                    }
                    Some(r) => {
                        let what = "the hub has merged a history of this writer that these files do not have \
                                    (they were restored from an older copy, or another copy of them ran on)";
                        tracing::warn!(
                            old = %r.old, new = %r.new, fork_ordinal = r.fork_ordinal, hub_ordinal = hub_head,
                            own_ordinal = r.own_ordinal, moved = r.moved, ambiguous = r.ambiguous,
                            "{what}: retired the writer; its changes after the fork now count under the new writer"
                        );
                        if r.ambiguous > 0 {
                            tracing::error!(
                                ambiguous = r.ambiguous,
                                "the fork point is not certain: up to this many changes may be counted twice; \
                                 a recount of the affected SKUs is advised"
                            );
                        }
                        self.status.send_modify(|s| s.writer = Some(r.new.to_string()));
                        return Err(SessionError {
                            code: close_code::FORKED,
                            message: format!("{RETIRED_MARK} {} after a fork; now {}", r.old, r.new),
                            from_peer: false,
                        });
                    }
                }
            }
            Effect::ApplyDelta { peer, delta, .. } => {
                let upto = delta.upto;
                replica::apply_delta(&self.db, peer, delta).await.map_err(|e| internal("applying a delta", e))?;
                session.delta_applied(Instant::now(), upto)?;
            }
            Effect::Acked { upto, .. } => {
                replica::set_acked(&self.db, upto).await.map_err(|e| internal("recording an ack", e))?;
            }
            Effect::ReadJournal { after, limit } => {
                let read = replica::read_journal(&self.db, after, limit)
                    .await
                    .map_err(|e| internal("reading the journal", e))?;
                session.journal_read(Instant::now(), read)?;
            }
            Effect::ApplyJournal { peer, batch } => {
                let upto = batch.upto;
                replica::apply_journal(&self.db, peer, batch)
                    .await
                    .map_err(|e| internal("storing journal events", e))?;
                session.journal_applied(Instant::now(), upto)?;
            }
            Effect::JournalAcked { upto, .. } => {
                replica::set_journal_acked(&self.db, upto).await.map_err(|e| internal("recording a journal ack", e))?;
            }
            Effect::ComputeDigest => {
                let (digest, head) =
                    replica::digest(&self.db).await.map_err(|e| internal("computing the digest", e))?;
                session.digest_computed(Instant::now(), digest, head)?;
            }
            Effect::CatalogMessage { doc, bytes } => {
                let reply = self.catalog.message(&self.db, doc, &bytes).await.map_err(|e| SessionError {
                    code: if matches!(e, shelfsync_node::catalog::CatalogError::Invalid(_)) {
                        close_code::PROTOCOL_VIOLATION
                    } else {
                        close_code::INTERNAL
                    },
                    message: format!("catalog: {e}"),
                    from_peer: false,
                })?;
                if let Some(r) = reply {
                    session.send_catalog(doc, r);
                }
            }
            Effect::ApplyHolds { snapshot } => {
                crate::holds::apply_snapshot(&self.db, snapshot).await.map_err(|e| internal("storing holds", e))?;
            }
            Effect::ApplyIncoming { snapshot } => {
                crate::incoming::apply_snapshot(&self.db, snapshot)
                    .await
                    .map_err(|e| internal("storing incoming transfers", e))?;
            }
            Effect::ApplyRights { snapshot } => {
                crate::rights::apply_snapshot(&self.db, snapshot)
                    .await
                    .map_err(|e| internal("storing escrow rights", e))?;
            }
            Effect::LookupPeer { .. } | Effect::DigestCompared { .. } | Effect::Pong { .. } => {}
        }
        Ok(())
    }

    async fn heads_changed(&mut self, session: &mut AgentSession, heads: crate::db::Heads) -> Result<(), SessionError> {
        if heads.catalog != self.catalog_seen {
            self.catalog_seen = heads.catalog;
            if session.is_established() {
                if let Some(m) = self.catalog.local_change().await {
                    session.send_catalog(shelfsync_shared::wire::CatalogDoc::Overrides, m);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let (min, max) = (Duration::from_millis(200), Duration::from_secs(1));
        assert_eq!(backoff(min, max, 0, 1.0), min);
        assert_eq!(backoff(min, max, 0, 0.0), min / 2, "never a busy loop");
        assert_eq!(backoff(min, max, 2, 1.0), Duration::from_millis(800));
        // However long the outage, the next attempt is at most the cap away...
        assert_eq!(backoff(min, max, 3, 1.0), max);
        assert_eq!(backoff(min, max, 1000, 1.0), max);
        // ...and spread over the whole range (full jitter), so a fleet does not knock in step.
        assert_eq!(backoff(min, max, 1000, 0.5), max / 2);
        assert_eq!(backoff(min, max, 1000, 0.0), min / 2);
    }

    #[test]
    fn credential_refusals_are_permanent_and_the_rest_transient() {
        assert!(is_permanent("hub closed the connection: revoked (certificate revoked)"));
        assert!(is_permanent("hub refused: unauthorized (unknown store)"));
        assert!(is_permanent("handshake with 127.0.0.1:1: the cryptographic handshake failed: error 48"));
        assert!(!is_permanent("handshake with 127.0.0.1:1: no answer within 10 s"));
        assert!(!is_permanent("connection: timed out"));
        assert!(!is_permanent("hub closed the connection: internal (storage error)"));
    }
}
