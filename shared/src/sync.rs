//! Sans-IO sync sessions: [`AgentSession`] and [`HubSession`] take frames and `now` in and hand
//! frames, timers and effects out. They never touch a socket, a disk or the clock, so the network
//! code only moves bytes between QUIC streams and these state machines, and a seeded simulator can
//! drive thousands of partitions, losses and crashes in milliseconds.
//!
//! Each direction of a connection is a watermark protocol over the sender's local sequence:
//! the sender ships "entries changed in `(after, upto]`", the receiver merges them durably and only
//! then acks `upto`. A frame whose `after` is beyond what the receiver has seen reveals a gap
//! (something was lost), which closes the connection; the next connection resumes from the
//! receiver's durable watermark, which it states in `Hello`/`Welcome`. Merging is idempotent, so
//! resending a range is always safe.
//!
//! The host fulfils [`Effect`]s in the order they are polled and reports back through the matching
//! method (`delta_read`, `delta_applied`, ...).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::counter::{PnEntry, StateDigest};
use crate::id::{Sku, StoreId, WriterId};
use crate::journal::JournalEvent;
use crate::lineage::{Boot, Checkpoint, HubLineage, BOOTS_MAX};
use crate::mac::EntryMac;
use crate::wire::{
    close_code, Ack, CatalogDoc, CatalogFrame, Delta, DeltaLineage, DigestMsg, ErrorMsg, Frame, FrameV1, Hello,
    HoldsSnapshot, IncomingSnapshot, JournalBatch, Retirement, RightsSnapshot, Welcome, CATALOG_MESSAGE_MAX,
    CATALOG_PART_MAX, DELTA_ENTRIES_MAX, JOURNAL_BATCH_MAX, MESSAGE_MAX_LEN, PROTOCOL_VERSION, RETIRED_MAX,
};

/// Timing and flow-control knobs of a session.
#[derive(Clone, Debug)]
pub struct SyncConfig {
    /// How long a local change waits for company before it is shipped (coalesces bursts).
    pub coalesce: Duration,
    /// How often the agent offers an anti-entropy digest.
    pub digest_interval: Duration,
    /// How soon the agent tries again when it was too busy to take a digest.
    pub digest_retry: Duration,
    /// Most unacknowledged frames in flight per direction and kind. At the hub it must not exceed
    /// [`EARLY_JOURNAL_MAX`].
    pub window: usize,
    /// Most entries per delta frame.
    pub delta_limit: usize,
    /// Most events per journal batch.
    pub journal_limit: usize,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            coalesce: Duration::ZERO,
            digest_interval: Duration::from_secs(30),
            digest_retry: Duration::from_secs(1),
            window: 4,
            delta_limit: DELTA_ENTRIES_MAX,
            journal_limit: JOURNAL_BATCH_MAX,
        }
    }
}

/// Most journal batches an agent holds that arrived before the hub's `Welcome`. The journal has
/// its own stream, so its first batches may overtake the `Welcome`; the hub sends at most its
/// window of them before it needs an ack, which the agent can only send once established.
pub const EARLY_JOURNAL_MAX: usize = 16;

/// Most frames an agent holds that arrived while its host checks the hub's view of its lineage
/// (the hub starts shipping right after its `Welcome`).
pub const EARLY_FRAMES_MAX: usize = 256;

/// Which QUIC stream a frame belongs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamKind {
    /// The bidirectional state stream: handshake, deltas, acks, digests.
    State,
    /// The unidirectional, lower-priority catalog stream (automerge sync messages).
    Catalog,
    /// The unidirectional, lower-priority journal stream.
    Journal,
}

/// A frame to send.
#[derive(Clone, Debug, PartialEq)]
pub struct Transmit {
    /// Where.
    pub stream: StreamKind,
    /// What.
    pub frame: Frame,
}

/// The answer to [`Effect::ReadDelta`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeltaRead {
    /// The read covers every local sequence up to here: the sequence of the last entry when the
    /// limit was reached, the local head otherwise (read in the same snapshot as the entries).
    pub upto: u64,
    /// The entries, in sequence order.
    pub entries: Vec<(Sku, WriterId, PnEntry)>,
    /// Agent only: holds fulfilled with their counter change in this range.
    pub fulfilled: Vec<uuid::Uuid>,
    /// Agent only: its writer's lineage head when the entries were read (same snapshot). Every
    /// delta carries it, so whatever the hub merges of a writer is tied to one history.
    pub lineage: Option<Checkpoint>,
    /// Tags of hub-authored entries, by index into `entries` (hub: every hub entry; agent: hub
    /// entries it returns in a full read).
    pub macs: Vec<(u32, EntryMac)>,
    /// Agent only: its writers' escrow rights entries (granted, consumed totals) changed in this
    /// range (they share the counter sequence).
    pub rights: Vec<(Sku, WriterId, crate::rights::RightsKind, u64)>,
}

/// The answer to [`Effect::ReadJournal`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JournalRead {
    /// As [`DeltaRead::upto`], over the journal sequence.
    pub upto: u64,
    /// The events, in sequence order.
    pub events: Vec<JournalEvent>,
}

/// Work for the host. Fulfil in the order polled.
#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    /// Hub only: an agent writer said hello. Record its retirement reports, look up what the hub
    /// durably applied from it and merged of its lineage, check that no other live agent holds
    /// the store, and call [`HubSession::accept`] (or fail the session).
    LookupPeer {
        /// The agent's `Hello` (writer, lineage, retirements, what it holds of the hub).
        hello: Hello,
    },
    /// Agent only: the hub welcomed us. Judge our writer's history against what the hub merged
    /// ([`crate::lineage::judge`]): if it extends the hub's, call [`AgentSession::lineage_ok`];
    /// otherwise retire the writer durably and end the connection.
    CheckLineage {
        /// What the hub merged of our writer's history.
        hub: HubLineage,
        /// Digest of the hub-authored entries of this store at the hub: if ours differs, answer
        /// `lineage_ok(.., true)` to give them back.
        hub_entries: StateDigest,
    },
    /// Hub only: the agent answered a [`HubSession::ping`].
    Pong {
        /// The nonce it echoed.
        nonce: u64,
    },
    /// The handshake is complete.
    Established {
        /// The peer's writer.
        peer: WriterId,
    },
    /// Read local counter entries the peer should have with sequence above `after`, at most
    /// `limit`, in sequence order; answer with `delta_read`. At the hub, `full` means "include the
    /// agent's own current writer too" (a resync), which normal deltas leave out to avoid echoes;
    /// at the agent it means "include the hub-authored entries with their tags" (giving back what
    /// a restored hub may have lost).
    ReadDelta {
        /// Exclusive lower bound.
        after: u64,
        /// Most entries.
        limit: usize,
        /// Full-state resend.
        full: bool,
    },
    /// Merge these entries durably, record `delta.upto` as applied from `peer` in the same
    /// transaction, then call `delta_applied`.
    ApplyDelta {
        /// Whose sequence `delta.upto` is in.
        peer: WriterId,
        /// The entries.
        delta: Delta,
        /// Hub only, when the delta carries the writer's lineage: the head the hub must still hold
        /// for the writer (what this connection was welcomed with, or its previous delta set).
        /// If another connection moved it meanwhile (two copies racing), refuse the delta with
        /// close code `forked`: the agent reconnects and is judged again.
        lineage_base: Option<Checkpoint>,
    },
    /// The peer durably holds our counter entries up to `upto` (persist for status).
    Acked {
        /// Who acked.
        peer: WriterId,
        /// Up to where.
        upto: u64,
    },
    /// Read local journal events the peer should have, above `after`; answer with `journal_read`.
    ReadJournal {
        /// Exclusive lower bound.
        after: u64,
        /// Most events.
        limit: usize,
    },
    /// Store these events durably (grow-only set by id), record `batch.upto` as applied from
    /// `peer`, then call `journal_applied`.
    ApplyJournal {
        /// Whose journal sequence.
        peer: WriterId,
        /// The events.
        batch: JournalBatch,
    },
    /// The peer durably holds our journal up to `upto`.
    JournalAcked {
        /// Who acked.
        peer: WriterId,
        /// Up to where.
        upto: u64,
    },
    /// Compute the digest of this store's counter entries together with the local sequence they
    /// were read at (agent: the head; hub: the highest sequence among this store's entries) and
    /// call `digest_computed`.
    ComputeDigest,
    /// A complete automerge sync message for one of the catalog documents: feed it to the
    /// document's sync state and answer with `send_catalog`.
    CatalogMessage {
        /// Which document.
        doc: CatalogDoc,
        /// The encoded automerge sync message.
        bytes: Vec<u8>,
    },
    /// Agent only: replace the store's holds with this snapshot (durably; no ack is sent, a new
    /// connection always brings a fresh snapshot).
    ApplyHolds {
        /// The hub's holds for this store.
        snapshot: HoldsSnapshot,
    },
    /// Agent only: replace the store's incoming transfers with this snapshot (durably; no ack,
    /// as for holds).
    ApplyIncoming {
        /// The transfers on their way to this store.
        snapshot: IncomingSnapshot,
    },
    /// Agent only: merge the hub's view of the store's escrow rights and keep its policy
    /// (durably; no ack: entries are grow-only totals, a new connection brings a fresh snapshot).
    ApplyRights {
        /// The hub's rights of this store and the escrow policy.
        snapshot: RightsSnapshot,
    },
    /// The hub compared digests (for metrics and logs).
    DigestCompared {
        /// Whether they were equal. If not, a full resync has started.
        matched: bool,
    },
}

/// Why a session ended. The host closes the connection with `code` and logs `message`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{} (code {code}){}: {message}", close_code::name(*code), if *from_peer { ", said the peer" } else { "" })]
pub struct SessionError {
    /// One of [`close_code`].
    pub code: u32,
    /// What went wrong.
    pub message: String,
    /// The peer closed with this error (we received an `Error` frame).
    pub from_peer: bool,
}

impl SessionError {
    fn new(code: u32, message: impl Into<String>) -> Self {
        SessionError { code, message: message.into(), from_peer: false }
    }
    fn violation(message: impl Into<String>) -> Self {
        Self::new(close_code::PROTOCOL_VIOLATION, message)
    }
}

/// One direction of shipping: a watermark over the local sequence.
#[derive(Debug)]
struct Outbox {
    head: u64,
    /// Everything up to here was read (possibly finding nothing for the peer).
    sent: u64,
    /// `upto` of the last frame actually sent: the next frame's `after`. Ranges that held
    /// nothing for the peer are covered by the next frame that does carry something.
    transmitted: u64,
    max_sent: u64,
    acked: u64,
    inflight: VecDeque<u64>,
    reading: bool,
    restart_pending: bool,
    full_until: u64,
    due: Option<Instant>,
}

impl Outbox {
    fn new(head: u64) -> Self {
        Outbox {
            head,
            sent: 0,
            transmitted: 0,
            max_sent: 0,
            acked: 0,
            inflight: VecDeque::new(),
            reading: false,
            restart_pending: false,
            full_until: 0,
            due: None,
        }
    }

    fn start(&mut self, now: Instant, from: u64) {
        self.sent = from;
        self.transmitted = from;
        self.max_sent = from;
        self.acked = from;
        self.due = None;
        self.arm(now, Duration::ZERO);
    }

    fn arm(&mut self, now: Instant, delay: Duration) {
        if self.head > self.sent && self.due.is_none() && !self.reading {
            self.due = Some(now + delay);
        }
    }

    fn notify(&mut self, now: Instant, head: u64, coalesce: Duration) {
        self.head = self.head.max(head);
        self.arm(now, coalesce);
    }

    fn poll_read(&mut self, now: Instant, window: usize) -> Option<(u64, bool)> {
        if self.reading || self.inflight.len() >= window || self.due.is_none_or(|d| d > now) {
            return None;
        }
        self.due = None;
        if self.head <= self.sent {
            return None;
        }
        self.reading = true;
        Some((self.sent, self.sent < self.full_until))
    }

    /// Returns the `after` of the frame to send, if the read produced one.
    fn read_done(&mut self, now: Instant, upto: u64, nonempty: bool) -> Result<Option<u64>, SessionError> {
        if !self.reading {
            return Err(SessionError::new(close_code::INTERNAL, "host answered a read nobody asked for"));
        }
        self.reading = false;
        if upto < self.sent {
            return Err(SessionError::new(
                close_code::INTERNAL,
                format!("host read up to {upto}, below what was already sent ({})", self.sent),
            ));
        }
        let after = self.transmitted;
        self.head = self.head.max(upto);
        self.sent = upto;
        if nonempty {
            self.transmitted = upto;
            self.max_sent = self.max_sent.max(upto);
            self.inflight.push_back(upto);
        } else if self.inflight.is_empty() {
            // Nothing in flight and nothing new for the peer: it holds all it needs up to here.
            self.acked = self.acked.max(upto);
        }
        if self.restart_pending {
            self.restart_pending = false;
            self.full_until = self.full_until.max(self.head);
            self.sent = 0;
            self.transmitted = 0;
        }
        self.arm(now, Duration::ZERO);
        Ok(nonempty.then_some(after))
    }

    fn tolerate_acks_upto(&mut self, claim: u64) {
        self.max_sent = self.max_sent.max(claim);
    }

    fn ack(&mut self, now: Instant, upto: u64) -> Result<bool, SessionError> {
        if upto > self.max_sent {
            return Err(SessionError::violation(format!("ack of {upto} beyond what was sent ({})", self.max_sent)));
        }
        while self.inflight.front().is_some_and(|u| *u <= upto) {
            self.inflight.pop_front();
        }
        let before = self.acked;
        self.acked = self.acked.max(upto);
        if self.inflight.is_empty() && !self.reading {
            self.acked = self.acked.max(self.sent);
        }
        self.arm(now, Duration::ZERO);
        Ok(self.acked > before)
    }

    /// Resend everything from the start (anti-entropy found a difference).
    fn restart_full(&mut self, now: Instant) {
        if self.reading {
            self.restart_pending = true;
        } else {
            self.full_until = self.full_until.max(self.head).max(self.sent);
            self.sent = 0;
            self.transmitted = 0;
            self.due = None;
            self.arm(now, Duration::ZERO);
        }
    }

    fn idle(&self) -> bool {
        !self.reading && self.inflight.is_empty() && self.sent >= self.head && self.acked >= self.sent
    }

    /// When a read is due, if one could start then. While a read is out or the window is full,
    /// its answer or the ack that frees the window starts the next read; a timer that fired then
    /// would find nothing to do, again and again, and spin the host's loop.
    fn timer(&self, window: usize) -> Option<Instant> {
        if self.reading || self.inflight.len() >= window {
            None
        } else {
            self.due
        }
    }
}

/// One direction of receiving.
#[derive(Debug, Default)]
struct Inbox {
    received: u64,
    applied: u64,
    /// A frame arrived on this connection.
    started: bool,
}

impl Inbox {
    fn receive(&mut self, what: &str, after: u64, upto: u64) -> Result<(), SessionError> {
        if !std::mem::replace(&mut self.started, true) && after < self.received {
            // The sender resumes below what we recorded: our record stems from another copy of
            // its files (whose sequence numbers went their own way) or it lost data. From here
            // on, only what this connection brings counts, or a lost frame would go unnoticed and
            // our acks would vouch for what we never got.
            self.received = after;
            self.applied = after;
        }
        if after > self.received {
            return Err(SessionError::violation(format!(
                "{what} starts after {after} but only {} was received: a frame was lost",
                self.received
            )));
        }
        self.received = self.received.max(upto);
        Ok(())
    }

    fn applied(&mut self, upto: u64) -> Result<u64, SessionError> {
        if upto > self.received {
            return Err(SessionError::new(
                close_code::INTERNAL,
                format!("host applied {upto}, beyond what was received"),
            ));
        }
        self.applied = self.applied.max(upto);
        Ok(self.applied)
    }

    fn settled(&self) -> bool {
        self.applied >= self.received
    }
}

/// What both sessions share: the two outboxes, two inboxes, and the queues to the host.
#[derive(Debug)]
struct Link {
    config: SyncConfig,
    peer: Option<WriterId>,
    counters_out: Outbox,
    journal_out: Outbox,
    counters_in: Inbox,
    journal_in: Inbox,
    transmits: VecDeque<Transmit>,
    effects: VecDeque<Effect>,
    failed: bool,
    /// Catalog sync messages being reassembled, per document.
    catalog_parts: std::collections::HashMap<CatalogDoc, Vec<u8>>,
}

impl Link {
    fn new(config: SyncConfig, head: u64, journal_head: u64) -> Self {
        Link {
            config,
            peer: None,
            counters_out: Outbox::new(head),
            journal_out: Outbox::new(journal_head),
            counters_in: Inbox::default(),
            journal_in: Inbox::default(),
            transmits: VecDeque::new(),
            effects: VecDeque::new(),
            failed: false,
            catalog_parts: std::collections::HashMap::new(),
        }
    }

    fn send(&mut self, stream: StreamKind, frame: FrameV1) {
        self.transmits.push_back(Transmit { stream, frame: Frame::V1(frame) });
    }

    fn fail(&mut self, err: SessionError) -> SessionError {
        if !self.failed && !err.from_peer {
            // Cut to the frame's limit, at a character boundary (a host's message may be any text).
            let mut end = err.message.len().min(MESSAGE_MAX_LEN);
            while !err.message.is_char_boundary(end) {
                end -= 1;
            }
            let message = err.message[..end].to_owned();
            self.send(StreamKind::State, FrameV1::Error(ErrorMsg { code: err.code, message }));
        }
        self.failed = true;
        err
    }

    fn peer(&self) -> WriterId {
        self.peer.clone().expect("established sessions know their peer")
    }

    fn drive(&mut self, now: Instant) {
        if self.peer.is_none() || self.failed {
            return;
        }
        if let Some((after, full)) = self.counters_out.poll_read(now, self.config.window) {
            self.effects.push_back(Effect::ReadDelta { after, limit: self.config.delta_limit, full });
        }
        if let Some((after, _)) = self.journal_out.poll_read(now, self.config.window) {
            self.effects.push_back(Effect::ReadJournal { after, limit: self.config.journal_limit });
        }
    }

    fn established(&mut self, now: Instant, peer: WriterId, counters_from: u64, journal_from: u64) {
        self.peer = Some(peer.clone());
        self.counters_out.start(now, counters_from);
        self.journal_out.start(now, journal_from);
        self.effects.push_back(Effect::Established { peer });
    }

    /// Frames both roles handle the same way once established.
    fn handle_common(
        &mut self,
        now: Instant,
        frame: FrameV1,
        lineage_base: Option<Checkpoint>,
    ) -> Result<Option<FrameV1>, SessionError> {
        // Catalog messages stand alone (automerge's sync protocol is its own handshake), so they
        // are reassembled even if they overtake the Welcome on their own stream.
        if let FrameV1::Catalog(part) = frame {
            let buf = self.catalog_parts.entry(part.doc).or_default();
            if buf.len() + part.bytes.len() > CATALOG_MESSAGE_MAX {
                return Err(SessionError::violation(format!("catalog sync message over {CATALOG_MESSAGE_MAX} bytes")));
            }
            buf.extend_from_slice(&part.bytes);
            if part.last {
                let bytes = std::mem::take(buf);
                self.effects.push_back(Effect::CatalogMessage { doc: part.doc, bytes });
            }
            return Ok(None);
        }
        if self.peer.is_none() {
            return Ok(Some(frame));
        }
        match frame {
            FrameV1::Delta(delta) => {
                self.counters_in.receive("delta", delta.after, delta.upto)?;
                self.effects.push_back(Effect::ApplyDelta { peer: self.peer(), delta, lineage_base });
            }
            FrameV1::Ack(Ack { upto }) => {
                if self.counters_out.ack(now, upto)? {
                    self.effects.push_back(Effect::Acked { peer: self.peer(), upto: self.counters_out.acked });
                }
            }
            FrameV1::Journal(batch) => {
                self.journal_in.receive("journal batch", batch.after, batch.upto)?;
                self.effects.push_back(Effect::ApplyJournal { peer: self.peer(), batch });
            }
            FrameV1::JournalAck(Ack { upto }) => {
                if self.journal_out.ack(now, upto)? {
                    self.effects.push_back(Effect::JournalAcked { peer: self.peer(), upto: self.journal_out.acked });
                }
            }
            FrameV1::Error(e) => {
                return Err(SessionError { code: e.code, message: e.message, from_peer: true });
            }
            other => return Ok(Some(other)),
        }
        Ok(None)
    }

    fn send_catalog(&mut self, doc: CatalogDoc, bytes: Vec<u8>) {
        let parts: Vec<&[u8]> = if bytes.is_empty() { vec![&[][..]] } else { bytes.chunks(CATALOG_PART_MAX).collect() };
        let n = parts.len();
        for (i, p) in parts.into_iter().enumerate() {
            let frame = CatalogFrame { doc, last: i + 1 == n, bytes: p.to_vec() };
            self.send(StreamKind::Catalog, FrameV1::Catalog(frame));
        }
    }

    /// Returns whether a frame went out.
    fn delta_read(
        &mut self,
        now: Instant,
        read: DeltaRead,
        lineage: Option<DeltaLineage>,
    ) -> Result<bool, SessionError> {
        let nonempty = !read.entries.is_empty() || !read.fulfilled.is_empty() || !read.rights.is_empty();
        if let Some(after) = self.counters_out.read_done(now, read.upto, nonempty)? {
            if let Some((i, _)) = read.macs.iter().find(|(i, _)| *i as usize >= read.entries.len()) {
                return Err(SessionError::new(
                    close_code::INTERNAL,
                    format!("host tagged entry #{i} of {}", read.entries.len()),
                ));
            }
            let mut delta = Delta::build(after, read.upto, read.entries.iter().map(|(s, w, e)| (s, w, *e)))
                .with_rights(read.rights.iter().map(|(s, w, k, t)| (s, w, *k, *t)));
            delta.fulfilled = read.fulfilled;
            delta.lineage = lineage;
            delta.macs = read.macs;
            self.send(StreamKind::State, FrameV1::Delta(delta));
            return Ok(true);
        }
        Ok(false)
    }

    fn delta_applied(&mut self, upto: u64) -> Result<(), SessionError> {
        let applied = self.counters_in.applied(upto)?;
        self.send(StreamKind::State, FrameV1::Ack(Ack { upto: applied }));
        Ok(())
    }

    fn journal_read(&mut self, now: Instant, read: JournalRead) -> Result<(), SessionError> {
        if let Some(after) = self.journal_out.read_done(now, read.upto, !read.events.is_empty())? {
            self.send(
                StreamKind::Journal,
                FrameV1::Journal(JournalBatch { after, upto: read.upto, events: read.events }),
            );
        }
        Ok(())
    }

    fn journal_applied(&mut self, upto: u64) -> Result<(), SessionError> {
        let applied = self.journal_in.applied(upto)?;
        self.send(StreamKind::State, FrameV1::JournalAck(Ack { upto: applied }));
        Ok(())
    }

    fn poll_timeout(&self) -> Option<Instant> {
        // Nothing is read before the handshake (which arms the outboxes anew) or after a failure.
        if self.peer.is_none() || self.failed {
            return None;
        }
        let window = self.config.window;
        [self.counters_out.timer(window), self.journal_out.timer(window)].into_iter().flatten().min()
    }
}

macro_rules! common_api {
    () => {
        /// The next frame to send.
        pub fn poll_transmit(&mut self) -> Option<Transmit> {
            self.link.transmits.pop_front()
        }

        /// The next piece of work for the host.
        pub fn poll_effect(&mut self) -> Option<Effect> {
            self.link.effects.pop_front()
        }

        /// The host made local changes: the counter and journal heads are now these.
        pub fn local_head(&mut self, now: Instant, counter_head: u64, journal_head: u64) {
            let coalesce = self.link.config.coalesce;
            self.link.counters_out.notify(now, counter_head, coalesce);
            self.link.journal_out.notify(now, journal_head, coalesce);
            self.drive(now);
        }

        /// Answer to [`Effect::ApplyDelta`]: the entries up to `upto` are durable.
        pub fn delta_applied(&mut self, now: Instant, upto: u64) -> Result<(), SessionError> {
            let r = self.link.delta_applied(upto);
            self.check(now, r)
        }

        /// Answer to [`Effect::ReadJournal`].
        pub fn journal_read(&mut self, now: Instant, read: JournalRead) -> Result<(), SessionError> {
            let r = self.link.journal_read(now, read);
            self.check(now, r)
        }

        /// Answer to [`Effect::ApplyJournal`]: the events up to `upto` are durable.
        pub fn journal_applied(&mut self, now: Instant, upto: u64) -> Result<(), SessionError> {
            let r = self.link.journal_applied(upto);
            self.check(now, r)
        }

        /// Sends an automerge sync message for a catalog document (split into frames as needed).
        pub fn send_catalog(&mut self, doc: CatalogDoc, bytes: Vec<u8>) {
            self.link.send_catalog(doc, bytes);
        }

        /// The peer's writer, once the handshake is complete.
        pub fn peer(&self) -> Option<&WriterId> {
            self.link.peer.as_ref()
        }

        /// Whether the handshake is complete and the session has not failed.
        pub fn is_established(&self) -> bool {
            self.link.peer.is_some() && !self.link.failed
        }

        /// Highest local counter sequence the peer acked on this connection.
        pub fn acked(&self) -> u64 {
            self.link.counters_out.acked
        }

        /// Highest local journal sequence the peer acked on this connection.
        pub fn journal_acked(&self) -> u64 {
            self.link.journal_out.acked
        }

        /// Highest peer counter sequence durably applied here.
        pub fn applied(&self) -> u64 {
            self.link.counters_in.applied
        }

        /// Whether nothing is in flight in either direction.
        pub fn is_idle(&self) -> bool {
            self.link.counters_out.idle()
                && self.link.journal_out.idle()
                && self.link.counters_in.settled()
                && self.link.journal_in.settled()
                && self.link.effects.is_empty()
                && self.link.transmits.is_empty()
        }

        fn check(&mut self, now: Instant, r: Result<(), SessionError>) -> Result<(), SessionError> {
            match r {
                Ok(()) => {
                    self.drive(now);
                    Ok(())
                }
                Err(e) => Err(self.link.fail(e)),
            }
        }
    };
}

/// The agent's end of a sync connection.
#[derive(Debug)]
pub struct AgentSession {
    link: Link,
    store: StoreId,
    writer: WriterId,
    hub_writer: Option<WriterId>,
    next_digest: Option<Instant>,
    digesting: bool,
    /// Boots the hub does not know yet (its `Welcome` lists those it knows): every delta of this
    /// connection carries them, so none is lost with one frame.
    boots: Vec<Boot>,
    /// The `Welcome` whose lineage the host is checking.
    checking: Option<Welcome>,
    /// Frames that arrived before the handshake completed: journal batches that overtook the
    /// `Welcome` (at most [`EARLY_JOURNAL_MAX`]), and anything the hub sent while the host checked
    /// its lineage (at most [`EARLY_FRAMES_MAX`]). Replayed in order once established.
    early: Vec<FrameV1>,
}

/// What an agent knows durably about its hub and itself when it connects.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AgentResume {
    /// The hub incarnation the watermarks below refer to.
    pub hub_writer: Option<WriterId>,
    /// Highest hub counter sequence durably applied.
    pub applied: u64,
    /// Highest hub journal sequence durably stored.
    pub journal_applied: u64,
    /// Local counter head.
    pub head: u64,
    /// Local journal head.
    pub journal_head: u64,
    /// The writer's own history so far.
    pub lineage: Checkpoint,
    /// The most recent boots of this database (the last [`BOOTS_MAX`] are sent).
    pub boots: Vec<Boot>,
    /// Retirements no hub has acknowledged yet (at most [`RETIRED_MAX`] are sent).
    pub retired: Vec<Retirement>,
    /// Highest local counter sequence this database recorded as acked by the hub (sent in
    /// `Hello`; see [`Hello::acked`]).
    pub acked: u64,
    /// As `acked`, for the journal.
    pub journal_acked: u64,
}

impl AgentSession {
    /// Starts a session on a fresh connection; the `Hello` is queued at once.
    pub fn new(config: SyncConfig, store: StoreId, writer: WriterId, resume: AgentResume) -> Self {
        let mut link = Link::new(config, resume.head, resume.journal_head);
        link.counters_in.received = resume.applied;
        link.counters_in.applied = resume.applied;
        link.journal_in.received = resume.journal_applied;
        link.journal_in.applied = resume.journal_applied;
        let mut retired = resume.retired;
        retired.truncate(RETIRED_MAX);
        let mut boots = resume.boots;
        let skip = boots.len().saturating_sub(BOOTS_MAX);
        boots.drain(..skip);
        link.send(
            StreamKind::State,
            FrameV1::Hello(Hello {
                protocol: PROTOCOL_VERSION,
                store: store.clone(),
                writer: writer.clone(),
                hub_writer: resume.hub_writer.clone(),
                applied: resume.applied,
                journal_applied: resume.journal_applied,
                acked: resume.acked,
                journal_acked: resume.journal_acked,
                lineage: resume.lineage,
                boots: boots.clone(),
                retired,
            }),
        );
        AgentSession {
            link,
            store,
            writer,
            hub_writer: resume.hub_writer,
            next_digest: None,
            digesting: false,
            boots,
            checking: None,
            early: Vec::new(),
        }
    }

    common_api!();

    /// The store this agent is.
    pub fn store(&self) -> &StoreId {
        &self.store
    }

    /// Answer to [`Effect::ReadDelta`]. Deltas carry the boots the hub does not know yet.
    pub fn delta_read(&mut self, now: Instant, read: DeltaRead) -> Result<(), SessionError> {
        let lineage = read.lineage.map(|head| DeltaLineage { head, boots: self.boots.clone() });
        let r = self.link.delta_read(now, read, lineage);
        self.check(now, r.map(|_| ()))
    }

    /// Answer to [`Effect::CheckLineage`]: our history extends what the hub merged; the handshake
    /// completes and the frames that waited are handled. `return_hub_entries`: we hold hub
    /// entries the hub does not (its digest differs), so the first reads are full ones.
    pub fn lineage_ok(&mut self, now: Instant, return_hub_entries: bool) -> Result<(), SessionError> {
        let r = self.establish(now, return_hub_entries);
        self.check(now, r)
    }

    fn establish(&mut self, now: Instant, return_hub_entries: bool) -> Result<(), SessionError> {
        let Some(w) = self.checking.take() else {
            return Err(SessionError::new(close_code::INTERNAL, "lineage checked but no welcome is waiting"));
        };
        self.boots.retain(|b| !w.lineage.boots.iter().any(|k| k.id == b.id));
        if self.hub_writer.as_ref() != Some(&w.hub_writer) {
            // Our watermarks refer to another life of the hub: take everything anew.
            self.link.counters_in = Inbox::default();
            self.link.journal_in = Inbox::default();
            self.hub_writer = Some(w.hub_writer.clone());
        }
        let from = if w.applied <= self.link.counters_out.head { w.applied } else { 0 };
        let jfrom = if w.journal_applied <= self.link.journal_out.head { w.journal_applied } else { 0 };
        self.link.established(now, w.hub_writer, from, jfrom);
        // A hub that claims more than we have (it applied from another copy of this writer that
        // has since retired, or our own lost data) acks up to its claim; we resend everything.
        self.link.counters_out.tolerate_acks_upto(w.applied);
        self.link.journal_out.tolerate_acks_upto(w.journal_applied);
        if return_hub_entries {
            self.link.counters_out.restart_full(now);
        }
        self.next_digest = Some(now);
        for frame in std::mem::take(&mut self.early) {
            self.handle_established(now, frame)?;
        }
        Ok(())
    }

    /// Feeds one received frame.
    pub fn handle_frame(&mut self, now: Instant, frame: Frame) -> Result<(), SessionError> {
        let r = self.handle_inner(now, frame);
        self.check(now, r)
    }

    fn handle_inner(&mut self, now: Instant, frame: Frame) -> Result<(), SessionError> {
        let Frame::V1(frame) = frame;
        if self.link.peer.is_some() {
            return self.handle_established(now, frame);
        }
        let Some(frame) = self.link.handle_common(now, frame, None)? else { return Ok(()) };
        match frame {
            FrameV1::Welcome(w) if self.checking.is_none() => {
                if w.protocol != PROTOCOL_VERSION {
                    return Err(SessionError::new(
                        close_code::VERSION_MISMATCH,
                        format!("hub speaks protocol {}, this agent speaks {PROTOCOL_VERSION}", w.protocol),
                    ));
                }
                if !w.hub_writer.is_hub() {
                    return Err(SessionError::violation(format!("welcome names {} as the hub's writer", w.hub_writer)));
                }
                self.link
                    .effects
                    .push_back(Effect::CheckLineage { hub: w.lineage.clone(), hub_entries: w.hub_entries });
                self.checking = Some(w);
                Ok(())
            }
            FrameV1::Error(e) => Err(SessionError { code: e.code, message: e.message, from_peer: true }),
            FrameV1::Journal(batch) if self.checking.is_none() => {
                if self.early.len() >= EARLY_JOURNAL_MAX {
                    return Err(SessionError::violation(format!(
                        "more than {EARLY_JOURNAL_MAX} journal batches before the welcome"
                    )));
                }
                self.early.push(FrameV1::Journal(batch));
                Ok(())
            }
            other if self.checking.is_some() => {
                if self.early.len() >= EARLY_FRAMES_MAX {
                    return Err(SessionError::violation(format!(
                        "more than {EARLY_FRAMES_MAX} frames while the welcome was being checked"
                    )));
                }
                self.early.push(other);
                Ok(())
            }
            other => Err(SessionError::violation(format!("unexpected {} from the hub", frame_name(&other)))),
        }
    }

    fn handle_established(&mut self, now: Instant, frame: FrameV1) -> Result<(), SessionError> {
        let Some(frame) = self.link.handle_common(now, frame, None)? else { return Ok(()) };
        match frame {
            FrameV1::Resync => {
                self.link.counters_out.restart_full(now);
                Ok(())
            }
            FrameV1::Holds(snapshot) => {
                if let Some(h) = snapshot.holds.iter().find(|h| h.qty == 0) {
                    return Err(SessionError::violation(format!("hold {} has no units", h.id)));
                }
                self.link.effects.push_back(Effect::ApplyHolds { snapshot });
                Ok(())
            }
            FrameV1::Incoming(snapshot) => {
                let empty =
                    snapshot.transfers.iter().find(|t| t.lines.is_empty() || t.lines.iter().any(|l| l.qty == 0));
                if let Some(t) = empty {
                    return Err(SessionError::violation(format!(
                        "incoming transfer {} has a line without units",
                        t.id
                    )));
                }
                self.link.effects.push_back(Effect::ApplyIncoming { snapshot });
                Ok(())
            }
            FrameV1::Rights(snapshot) => {
                self.link.effects.push_back(Effect::ApplyRights { snapshot });
                Ok(())
            }
            FrameV1::Ping(nonce) => {
                self.link.send(StreamKind::State, FrameV1::Pong(nonce));
                Ok(())
            }
            FrameV1::Error(e) => Err(SessionError { code: e.code, message: e.message, from_peer: true }),
            other => Err(SessionError::violation(format!("unexpected {} from the hub", frame_name(&other)))),
        }
    }

    /// Timers fired.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.drive(now);
    }

    /// When the session next wants `handle_timeout`.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let digest = if self.digesting || !self.is_established() { None } else { self.next_digest };
        [self.link.poll_timeout(), digest].into_iter().flatten().min()
    }

    /// Answer to [`Effect::ComputeDigest`]: the digest of all the store's counter entries here,
    /// and the local head it was taken at.
    pub fn digest_computed(&mut self, now: Instant, digest: StateDigest, head: u64) -> Result<(), SessionError> {
        self.digesting = false;
        let quiet =
            head == self.link.counters_out.acked && self.link.counters_out.idle() && self.link.counters_in.settled();
        if quiet {
            self.link.send(
                StreamKind::State,
                FrameV1::Digest(DigestMsg { head, applied: self.link.counters_in.applied, digest }),
            );
            self.next_digest = Some(now + self.link.config.digest_interval);
        } else {
            self.next_digest = Some(now + self.link.config.digest_retry);
        }
        self.drive(now);
        Ok(())
    }

    fn drive(&mut self, now: Instant) {
        self.link.drive(now);
        if self.link.peer.is_some()
            && !self.link.failed
            && !self.digesting
            && self.next_digest.is_some_and(|t| t <= now)
        {
            self.digesting = true;
            self.next_digest = None;
            self.link.effects.push_back(Effect::ComputeDigest);
        }
    }

    /// This agent's writer.
    pub fn writer(&self) -> &WriterId {
        &self.writer
    }
}

/// The hub's answer to [`Effect::LookupPeer`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerAccept {
    /// Highest agent counter sequence the hub durably applied from this writer.
    pub applied: u64,
    /// Highest agent journal sequence the hub durably stored from this writer.
    pub journal_applied: u64,
    /// What the hub merged of the writer's history.
    pub lineage: HubLineage,
    /// Digest of the hub-authored entries of the store here (the agent gives back its own if
    /// they differ).
    pub hub_entries: StateDigest,
}

/// The hub's end of one agent's connection.
#[derive(Debug)]
pub struct HubSession {
    link: Link,
    store: StoreId,
    hub_writer: WriterId,
    hello: Option<Hello>,
    pending_digest: Option<DigestMsg>,
    /// The agent writer's history must not go below this (what the hub merged).
    lineage_floor: Checkpoint,
}

impl HubSession {
    /// A session for a connection whose certificate names `store`.
    pub fn new(config: SyncConfig, store: StoreId, hub_writer: WriterId, head: u64, journal_head: u64) -> Self {
        HubSession {
            link: Link::new(config, head, journal_head),
            store,
            hub_writer,
            hello: None,
            pending_digest: None,
            lineage_floor: Checkpoint::ZERO,
        }
    }

    common_api!();

    /// The store on the other end (from its certificate).
    pub fn store(&self) -> &StoreId {
        &self.store
    }

    /// Answer to [`Effect::ReadDelta`] (`read.macs` tags every hub-authored entry).
    pub fn delta_read(&mut self, now: Instant, read: DeltaRead) -> Result<(), SessionError> {
        let r = self.link.delta_read(now, read, None);
        self.check(now, r.map(|_| ()))
    }

    /// Refuses the agent (say, another live agent holds the store): queues an `Error` frame with
    /// `code` and ends the session. Returns the error for the host to log.
    pub fn refuse(&mut self, code: u32, message: impl Into<String>) -> SessionError {
        self.link.fail(SessionError::new(code, message))
    }

    /// Asks the agent whether it is alive; it answers with [`Effect::Pong`]. Only on an
    /// established session.
    pub fn ping(&mut self, nonce: u64) {
        if self.is_established() {
            self.link.send(StreamKind::State, FrameV1::Ping(nonce));
        }
    }

    /// Feeds one received frame.
    pub fn handle_frame(&mut self, now: Instant, frame: Frame) -> Result<(), SessionError> {
        let r = self.handle_inner(now, frame);
        self.check(now, r)
    }

    /// Returns the lineage head the hub must still hold for the writer when it applies `d`.
    fn authorize_delta(&mut self, d: &Delta) -> Result<Option<Checkpoint>, SessionError> {
        // A store may only write its own writers' entries, and return hub entries with their tags
        // (the host verifies the tags).
        if let Some(w) = d.writers.iter().find(|w| !w.is_store(&self.store) && !w.is_hub()) {
            return Err(SessionError::new(
                close_code::UNAUTHORIZED,
                format!("store {} sent entries of writer {w}, which is not one of its own", self.store),
            ));
        }
        let tagged: std::collections::HashSet<u32> = d.macs.iter().map(|(i, _)| *i).collect();
        if let Some((i, e)) = d
            .entries
            .iter()
            .enumerate()
            .find(|(i, e)| d.writers[e.writer as usize].is_hub() && !tagged.contains(&(*i as u32)))
        {
            return Err(SessionError::new(
                close_code::UNAUTHORIZED,
                format!(
                    "store {} sent an untagged entry of hub writer {} for {} (entry #{i})",
                    self.store, d.writers[e.writer as usize], e.sku
                ),
            ));
        }
        if let Some(l) = &d.lineage {
            let floor = self.lineage_floor;
            if l.head.ordinal < floor.ordinal || (l.head.ordinal == floor.ordinal && l.head.chain != floor.chain) {
                return Err(SessionError::new(
                    close_code::FORKED,
                    format!(
                        "store {}'s writer is at change {} but the hub merged change {} of another history \
                         (restored or copied files)",
                        self.store, l.head.ordinal, floor.ordinal
                    ),
                ));
            }
            self.lineage_floor = l.head;
            return Ok(Some(floor));
        }
        Ok(None)
    }

    fn handle_inner(&mut self, now: Instant, frame: Frame) -> Result<(), SessionError> {
        let Frame::V1(frame) = frame;
        // Authorisation first: a store may only write its own writers' entries and events.
        let mut lineage_base = None;
        match &frame {
            FrameV1::Delta(d) => lineage_base = self.authorize_delta(d)?,
            FrameV1::Journal(b) => {
                if let Some(e) = b.events.iter().find(|e| e.store != self.store || !e.writer.is_store(&self.store)) {
                    return Err(SessionError::new(
                        close_code::UNAUTHORIZED,
                        format!(
                            "store {} sent journal event {} of store {} by {}",
                            self.store, e.id, e.store, e.writer
                        ),
                    ));
                }
            }
            _ => {}
        }
        let Some(frame) = self.link.handle_common(now, frame, lineage_base)? else { return Ok(()) };
        match frame {
            FrameV1::Hello(h) if self.hello.is_none() => {
                if h.protocol != PROTOCOL_VERSION {
                    return Err(SessionError::new(
                        close_code::VERSION_MISMATCH,
                        format!("agent speaks protocol {}, this hub speaks {PROTOCOL_VERSION}", h.protocol),
                    ));
                }
                if h.store != self.store {
                    return Err(SessionError::new(
                        close_code::UNAUTHORIZED,
                        format!("certificate names store {} but hello claims {}", self.store, h.store),
                    ));
                }
                let foreign = std::iter::once(&h.writer)
                    .chain(h.retired.iter().flat_map(|r| [&r.old, &r.new]))
                    .find(|w| !w.is_store(&self.store));
                if let Some(w) = foreign {
                    return Err(SessionError::new(
                        close_code::UNAUTHORIZED,
                        format!("store {} claims writer {w}", self.store),
                    ));
                }
                self.link.effects.push_back(Effect::LookupPeer { hello: h.clone() });
                self.hello = Some(h);
                Ok(())
            }
            FrameV1::Digest(d) if self.link.peer.is_some() => {
                // Compare only when both sides describe the same moment: we applied all the agent
                // had, and the agent applied all we sent. Otherwise wait for the next digest.
                // The agent sends a digest only when the hub has acked all it wrote, so "we applied
                // everything received" covers the agent's side; the agent must have applied the
                // last frame we sent, and nothing may be in flight from us.
                let out = &self.link.counters_out;
                // A digest older than deltas already received describes a past state: skip it.
                let comparable = self.link.counters_in.settled()
                    && d.head >= self.link.counters_in.received
                    && out.idle()
                    && d.applied == out.transmitted
                    && self.pending_digest.is_none();
                if comparable {
                    self.pending_digest = Some(d);
                    self.link.effects.push_back(Effect::ComputeDigest);
                }
                Ok(())
            }
            FrameV1::Pong(nonce) if self.link.peer.is_some() => {
                self.link.effects.push_back(Effect::Pong { nonce });
                Ok(())
            }
            // Before the handshake completes `handle_common` passes errors through; after it,
            // it handles them itself.
            FrameV1::Error(e) => Err(SessionError { code: e.code, message: e.message, from_peer: true }),
            other => {
                Err(SessionError::violation(format!("unexpected {} from store {}", frame_name(&other), self.store)))
            }
        }
    }

    /// Sends the store's current holds (call after `Established` and whenever they change).
    pub fn send_holds(&mut self, snapshot: HoldsSnapshot) {
        if self.is_established() {
            self.link.send(StreamKind::State, FrameV1::Holds(snapshot));
        }
    }

    /// Sends the store's escrow rights as the hub has them (after `Established` and whenever
    /// they change; with the holds).
    pub fn send_rights(&mut self, snapshot: RightsSnapshot) {
        if self.is_established() {
            self.link.send(StreamKind::State, FrameV1::Rights(snapshot));
        }
    }

    /// Sends the transfers on their way to the store (after `Established` and whenever they
    /// change).
    pub fn send_incoming(&mut self, snapshot: IncomingSnapshot) {
        if self.is_established() {
            self.link.send(StreamKind::State, FrameV1::Incoming(snapshot));
        }
    }

    /// The agent's `Hello`, once received.
    pub fn hello(&self) -> Option<&Hello> {
        self.hello.as_ref()
    }

    /// Answer to [`Effect::LookupPeer`]: what the hub durably holds of this agent writer.
    pub fn accept(&mut self, now: Instant, acc: PeerAccept) -> Result<(), SessionError> {
        let Some(h) = self.hello.clone() else {
            return Err(self.link.fail(SessionError::new(close_code::INTERNAL, "accept before hello")));
        };
        if self.link.peer.is_some() {
            // A second answer would restart both directions from the lookup's watermarks.
            return Err(self.link.fail(SessionError::new(close_code::INTERNAL, "accept after the handshake")));
        }
        let PeerAccept { applied, journal_applied, mut lineage, hub_entries } = acc;
        // Our record may stem from another copy of the agent's files, whose sequence numbers
        // went their own way after the copy: trust no more than this copy says we acked.
        let applied = applied.min(h.acked);
        let journal_applied = journal_applied.min(h.journal_acked);
        self.link.counters_in.received = applied;
        self.link.counters_in.applied = applied;
        self.link.journal_in.received = journal_applied;
        self.link.journal_in.applied = journal_applied;
        self.lineage_floor = lineage.head;
        let same_hub = h.hub_writer.as_ref() == Some(&self.hub_writer);
        let from = if same_hub && h.applied <= self.link.counters_out.head { h.applied } else { 0 };
        let jfrom = if same_hub && h.journal_applied <= self.link.journal_out.head { h.journal_applied } else { 0 };
        let skip = lineage.points.len().saturating_sub(crate::lineage::CHECKPOINTS_MAX);
        lineage.points.drain(..skip);
        self.link.send(
            StreamKind::State,
            FrameV1::Welcome(Welcome {
                protocol: PROTOCOL_VERSION,
                hub_writer: self.hub_writer.clone(),
                applied,
                journal_applied,
                lineage,
                hub_entries,
            }),
        );
        self.link.established(now, h.writer, from, jfrom);
        if same_hub {
            // As at the agent: an agent claiming more than we have acks up to its claim.
            self.link.counters_out.tolerate_acks_upto(h.applied);
            self.link.journal_out.tolerate_acks_upto(h.journal_applied);
        }
        self.drive(now);
        Ok(())
    }

    /// Answer to [`Effect::ComputeDigest`]: the digest of the store's counters at the hub and the
    /// highest hub sequence among them.
    pub fn digest_computed(&mut self, now: Instant, digest: StateDigest, store_head: u64) -> Result<(), SessionError> {
        let Some(remote) = self.pending_digest.take() else { return Ok(()) };
        if store_head > self.link.counters_out.sent {
            // Something changed here since; the next digest will tell.
            return Ok(());
        }
        let matched = remote.digest == digest;
        if !matched {
            self.link.send(StreamKind::State, FrameV1::Resync);
            self.link.counters_out.restart_full(now);
        }
        self.link.effects.push_back(Effect::DigestCompared { matched });
        self.drive(now);
        Ok(())
    }

    /// Timers fired.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.drive(now);
    }

    /// When the session next wants `handle_timeout`.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.link.poll_timeout()
    }

    fn drive(&mut self, now: Instant) {
        self.link.drive(now);
    }
}

fn frame_name(f: &FrameV1) -> &'static str {
    match f {
        FrameV1::Hello(_) => "hello",
        FrameV1::Welcome(_) => "welcome",
        FrameV1::Delta(_) => "delta",
        FrameV1::Ack(_) => "ack",
        FrameV1::Digest(_) => "digest",
        FrameV1::Resync => "resync",
        FrameV1::Journal(_) => "journal batch",
        FrameV1::JournalAck(_) => "journal ack",
        FrameV1::Error(_) => "error",
        FrameV1::Holds(_) => "holds",
        FrameV1::Catalog(_) => "catalog",
        FrameV1::Ping(_) => "ping",
        FrameV1::Pong(_) => "pong",
        FrameV1::Incoming(_) => "incoming",
        FrameV1::Rights(_) => "rights",
    }
}
