//! Wire messages and their codec: a u32 big-endian length prefix, then a postcard-encoded
//! [`Frame`]. The protocol version lives in the type (`Frame::V1`), and every frame and collection
//! has a hard limit, checked on encode *and* decode.

use serde::{Deserialize, Serialize};

use crate::counter::{PnEntry, StateDigest};
use crate::id::{Sku, StoreId, WriterId};
use crate::journal::JournalEvent;
use crate::lineage::{Boot, Checkpoint, HubLineage, RetireReason, BOOTS_MAX, CHECKPOINTS_MAX};
use crate::mac::EntryMac;
use crate::qty::REASON_MAX_LEN;
use crate::rights::{EscrowPolicy, RightsKind};

/// The protocol version exchanged in `Hello`/`Welcome`. Version 2 added writer lineage,
/// retirement reports, authenticated hub entries and liveness probes; version 3 the store's
/// incoming transfers (`Incoming`), a frame a version-2 agent could not decode; version 4 escrow
/// rights (`Delta::rights` agent → hub, `Rights` hub → agent; `hub/docs/escrow.md`).
pub const PROTOCOL_VERSION: u32 = 4;
/// Most retirement reports in one `Hello`.
pub const RETIRED_MAX: usize = 16;
/// TLS application protocol name.
pub const ALPN: &[u8] = b"shelfsync/1";
/// Most entries in one rights snapshot (a writer's granted and consumed, the hub's returned,
/// per SKU).
pub const RIGHTS_MAX: usize = 16_384;
/// Largest encoded frame body, in bytes.
pub const FRAME_MAX_BYTES: usize = 1 << 20;
/// Most counter entries in one delta frame.
pub const DELTA_ENTRIES_MAX: usize = 4096;
/// Most distinct writers in one delta frame.
pub const DELTA_WRITERS_MAX: usize = 1024;
/// Most events in one journal batch.
pub const JOURNAL_BATCH_MAX: usize = 512;
/// Longest error message in an `Error` frame.
pub const MESSAGE_MAX_LEN: usize = 1024;
/// Most fulfilled holds named in one delta frame.
pub const DELTA_FULFILLED_MAX: usize = 1024;
/// Most holds in one holds snapshot.
pub const HOLDS_MAX: usize = 4096;
/// Most transfers in one incoming snapshot.
pub const INCOMING_TRANSFERS_MAX: usize = 1024;
/// Most lines, over all its transfers, in one incoming snapshot.
pub const INCOMING_LINES_MAX: usize = 4096;
/// Most bytes of an automerge sync message in one catalog frame (larger messages are split).
pub const CATALOG_PART_MAX: usize = 512 * 1024;
/// Most bytes of one reassembled automerge sync message.
pub const CATALOG_MESSAGE_MAX: usize = 64 << 20;

/// QUIC application close codes. The same numbers appear in logs on both sides.
pub mod close_code {
    /// Orderly shutdown.
    pub const NORMAL: u32 = 0;
    /// A frame could not be decoded, broke a limit, or came out of order.
    pub const PROTOCOL_VIOLATION: u32 = 1;
    /// The peers speak different protocol versions.
    pub const VERSION_MISMATCH: u32 = 2;
    /// The peer tried to write what its identity does not allow.
    pub const UNAUTHORIZED: u32 = 3;
    /// The peer's certificate has been revoked.
    pub const REVOKED: u32 = 4;
    /// The local side failed (storage error); the peer should retry later.
    pub const INTERNAL: u32 = 5;
    /// Another agent of the same store is connected and alive; this one is refused until an
    /// operator resolves it (or the store is allowed several agents).
    pub const DUPLICATE_AGENT: u32 = 6;
    /// The writer's history is behind or beside what the hub merged (a restored or cloned
    /// database); the agent must reconnect, which makes it retire the writer.
    pub const FORKED: u32 = 7;

    /// A name for logs.
    pub fn name(code: u32) -> &'static str {
        match code {
            NORMAL => "normal",
            PROTOCOL_VIOLATION => "protocol_violation",
            VERSION_MISMATCH => "version_mismatch",
            UNAUTHORIZED => "unauthorized",
            REVOKED => "revoked",
            INTERNAL => "internal",
            DUPLICATE_AGENT => "duplicate_agent",
            FORKED => "forked",
            _ => "unknown",
        }
    }
}

/// Everything that crosses the sync connection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Frame {
    /// Protocol version 1.
    V1(FrameV1),
}

/// Version 1 messages.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum FrameV1 {
    /// Agent → hub, first frame on the state stream.
    Hello(Hello),
    /// Hub → agent, answer to `Hello`.
    Welcome(Welcome),
    /// Counter entries changed in a range of the sender's sequence (both ways, state stream).
    Delta(Delta),
    /// The receiver durably applied the sender's counter deltas up to `upto`.
    Ack(Ack),
    /// Anti-entropy fingerprint (agent → hub).
    Digest(DigestMsg),
    /// "Our digests differ": both sides resend their full state for this store.
    Resync,
    /// Journal events in a range of the sender's journal sequence (journal stream).
    Journal(JournalBatch),
    /// The receiver durably stored the sender's journal events up to `upto` (state stream).
    JournalAck(Ack),
    /// The sender is about to close the connection, and why.
    Error(ErrorMsg),
    /// Hub → agent: every open hold (online reservation) allocated to this store, replacing the
    /// previous snapshot (state stream).
    Holds(HoldsSnapshot),
    /// Part of an automerge sync message for one of the catalog documents (catalog stream).
    Catalog(CatalogFrame),
    /// Hub → agent: "are you alive?" (state stream); the agent answers `Pong` with the same nonce.
    Ping(u64),
    /// Agent → hub: the answer to `Ping`.
    Pong(u64),
    /// Hub → agent: every transfer on its way to this store (shipped, not yet received or
    /// cancelled), replacing the previous snapshot (state stream; protocol version 3).
    Incoming(IncomingSnapshot),
    /// Hub → agent: the store's escrow rights as the hub has them and the chain's escrow policy
    /// (state stream; protocol version 4). Entries are grow-only totals: the agent merges them
    /// (a per-writer maximum), so a late or repeated snapshot changes nothing.
    Rights(RightsSnapshot),
}

/// One escrow rights entry; `writer` indexes the frame's writer table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireRights {
    /// The SKU (the store is the connection's).
    pub sku: Sku,
    /// Index into the frame's writer table.
    pub writer: u32,
    /// What the entry counts.
    pub kind: RightsKind,
    /// The entry's total.
    pub total: u64,
}

/// The store's escrow rights as the hub has them, with the policy stores grant by.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RightsSnapshot {
    /// `None`: escrow is off at the hub (the store grants nothing, consumes nothing).
    pub escrow: Option<EscrowPolicy>,
    /// Writer table.
    pub writers: Vec<WriterId>,
    /// Entries.
    pub entries: Vec<WireRights>,
}

impl RightsSnapshot {
    /// Builds a snapshot, interning writers.
    pub fn build<'a>(
        escrow: Option<EscrowPolicy>,
        entries: impl IntoIterator<Item = (&'a Sku, &'a WriterId, RightsKind, u64)>,
    ) -> RightsSnapshot {
        let mut writers = Vec::new();
        let entries = entries.into_iter().map(|(sku, w, kind, total)| WireRights {
            sku: sku.clone(),
            writer: intern(&mut writers, w),
            kind,
            total,
        });
        let entries = entries.collect();
        RightsSnapshot { escrow, writers, entries }
    }

    /// Entries with their writers resolved. Call only on validated frames.
    pub fn entries(&self) -> impl Iterator<Item = (&Sku, &WriterId, RightsKind, u64)> {
        self.entries.iter().map(|e| (&e.sku, &self.writers[e.writer as usize], e.kind, e.total))
    }
}

fn intern(writers: &mut Vec<WriterId>, w: &WriterId) -> u32 {
    match writers.iter().position(|x| x == w) {
        Some(i) => i as u32,
        None => {
            writers.push(w.clone());
            (writers.len() - 1) as u32
        }
    }
}

/// Which replicated document a catalog frame is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CatalogDoc {
    /// The hub's catalog (hub → store; a store may not change it).
    Catalog,
    /// The connected store's overrides (store → hub).
    Overrides,
}

/// One part of an automerge sync message; parts of one message are consecutive on the stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogFrame {
    /// Which document.
    pub doc: CatalogDoc,
    /// Whether this part completes the message.
    pub last: bool,
    /// The bytes (at most [`CATALOG_PART_MAX`]).
    pub bytes: Vec<u8>,
}

/// Whether a hold is merely reserved or paid for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HoldStatus {
    /// Reserved by an online order, not yet paid; expires.
    Held,
    /// Paid; waits to be picked.
    Committed,
}

impl HoldStatus {
    /// The snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            HoldStatus::Held => "held",
            HoldStatus::Committed => "committed",
        }
    }

    /// Parses the snake_case name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "held" => Some(HoldStatus::Held),
            "committed" => Some(HoldStatus::Committed),
            _ => None,
        }
    }
}

/// Units of one SKU promised to one online reservation at this store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    /// The hold (allocation) id; the store fulfils by this id.
    pub id: uuid::Uuid,
    /// The reservation it belongs to.
    pub reservation: uuid::Uuid,
    /// What.
    pub sku: Sku,
    /// How many.
    pub qty: u64,
    /// Reserved or paid.
    pub status: HoldStatus,
    /// When an unpaid hold lapses (ms), if it does.
    pub expires_at_ms: Option<i64>,
}

/// All open holds of a store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldsSnapshot {
    /// Increases with every change at the hub.
    pub version: u64,
    /// The holds.
    pub holds: Vec<Hold>,
}

/// One SKU of a transfer on its way.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncomingLine {
    /// What.
    pub sku: Sku,
    /// Units shipped (at least 1).
    pub qty: u64,
}

/// A transfer shipped to this store by another, not yet received.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncomingTransfer {
    /// The transfer id (the hub's `POST /v1/transfers/{id}/receive` takes it).
    pub id: uuid::Uuid,
    /// The store that shipped it.
    pub from: StoreId,
    /// What is on its way.
    pub lines: Vec<IncomingLine>,
    /// When it was shipped (ms).
    pub shipped_at_ms: i64,
}

/// Every transfer on its way to a store, oldest first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncomingSnapshot {
    /// Increases with every change at the hub (shared with the holds snapshot's).
    pub version: u64,
    /// The transfers, at most [`INCOMING_TRANSFERS_MAX`] with at most [`INCOMING_LINES_MAX`]
    /// lines in all.
    pub transfers: Vec<IncomingTransfer>,
}

/// First frame of an agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Highest protocol version the agent speaks.
    pub protocol: u32,
    /// The store the agent claims to be (must match its certificate).
    pub store: StoreId,
    /// The agent's current writer.
    pub writer: WriterId,
    /// The hub incarnation `applied` and `journal_applied` refer to, if the agent ever synced.
    pub hub_writer: Option<WriterId>,
    /// Highest hub counter sequence the agent durably applied.
    pub applied: u64,
    /// Highest hub journal sequence the agent durably stored.
    pub journal_applied: u64,
    /// Highest counter sequence of this writer the agent recorded as acked by a hub. A hub's
    /// own record may stem from another copy of these files whose sequence numbers went their
    /// own way; the hub resumes from the lower of the two.
    pub acked: u64,
    /// As `acked`, for the journal.
    pub journal_acked: u64,
    /// The writer's own history so far (see [`crate::lineage`]).
    pub lineage: Checkpoint,
    /// The latest starts of the agent on these files, at most [`BOOTS_MAX`].
    pub boots: Vec<Boot>,
    /// Writers this database retired that no hub has acknowledged yet, at most [`RETIRED_MAX`].
    pub retired: Vec<Retirement>,
}

impl Hello {
    /// The first `Hello` of a writer that has never synced: nothing applied, acked or retired.
    pub fn fresh(store: StoreId, writer: WriterId) -> Hello {
        Hello {
            protocol: PROTOCOL_VERSION,
            store,
            writer,
            hub_writer: None,
            applied: 0,
            journal_applied: 0,
            acked: 0,
            journal_acked: 0,
            lineage: Checkpoint::default(),
            boots: Vec::new(),
            retired: Vec::new(),
        }
    }
}

/// An agent retired a writer because its history forked (a restored or cloned database).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retirement {
    /// The retired writer.
    pub old: WriterId,
    /// The writer that took over.
    pub new: WriterId,
    /// Why.
    pub reason: RetireReason,
    /// The last ordinal this copy shared with the hub's history of `old`.
    pub fork_ordinal: u64,
    /// The ordinal of `old` the hub had merged.
    pub hub_ordinal: u64,
    /// The ordinal this copy had reached.
    pub own_ordinal: u64,
    /// Changes this copy made after the fork, moved to `new`.
    pub moved: u64,
    /// Of those, how many might also be in the hub's history (see [`crate::lineage::Verdict`]).
    pub ambiguous: u64,
    /// When the first and the last moved change was recorded (ms), if any moved.
    pub window_ms: Option<(i64, i64)>,
    /// When the agent retired the writer (ms).
    pub at_ms: i64,
}

/// The hub's answer to `Hello`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The protocol version the connection will use.
    pub protocol: u32,
    /// The hub's current writer.
    pub hub_writer: WriterId,
    /// Highest counter sequence of this agent writer the hub durably applied.
    pub applied: u64,
    /// Highest journal sequence of this agent writer the hub durably stored.
    pub journal_applied: u64,
    /// What the hub merged of this writer's history.
    pub lineage: HubLineage,
    /// Digest of the hub-authored entries of this store at the hub. An agent that holds others
    /// (the hub lost some: it runs from restored files) sends back every hub entry it holds, with
    /// its tag.
    pub hub_entries: StateDigest,
}

/// The lineage part of an agent's delta.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaLineage {
    /// The agent writer's history at the end of this delta's range.
    pub head: Checkpoint,
    /// Boots of the agent (first delta of a connection only), at most [`BOOTS_MAX`].
    pub boots: Vec<Boot>,
}

/// One counter entry in a delta; `writer` indexes [`Delta::writers`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireEntry {
    /// The counter's SKU (the store is the connection's).
    pub sku: Sku,
    /// Index into the frame's writer table.
    pub writer: u32,
    /// Units ever added by the writer.
    pub p: u64,
    /// Units ever removed by the writer.
    pub n: u64,
}

/// All entries the sender changed with sequence in `(after, upto]` that the receiver should have.
/// Writers are interned so a frame of many SKUs names each writer once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delta {
    /// The receiver must already have applied everything up to here.
    pub after: u64,
    /// This frame completes the range up to here.
    pub upto: u64,
    /// Writer table.
    pub writers: Vec<WriterId>,
    /// Entries.
    pub entries: Vec<WireEntry>,
    /// Agent → hub: holds the store fulfilled whose counter change lies in this range. The hub
    /// closes them in the same transaction that merges the entries, so `available` never counts a
    /// picked unit twice.
    pub fulfilled: Vec<uuid::Uuid>,
    /// Agent → hub: the agent writer's lineage, when this delta completes everything it wrote.
    pub lineage: Option<DeltaLineage>,
    /// Tags of hub-authored entries, by index into `entries` (hub → agent on every hub entry;
    /// agent → hub when it returns them).
    pub macs: Vec<(u32, EntryMac)>,
    /// Agent → hub: escrow rights entries (its writers' granted and consumed totals) changed in
    /// this range; their writers are in `writers` too.
    pub rights: Vec<WireRights>,
}

impl Delta {
    /// Builds a frame, interning writers.
    pub fn build<'a>(
        after: u64,
        upto: u64,
        entries: impl IntoIterator<Item = (&'a Sku, &'a WriterId, PnEntry)>,
    ) -> Delta {
        let mut writers: Vec<WriterId> = Vec::new();
        let mut wire = Vec::new();
        for (sku, writer, e) in entries {
            let idx = intern(&mut writers, writer);
            wire.push(WireEntry { sku: sku.clone(), writer: idx, p: e.p, n: e.n });
        }
        Delta {
            after,
            upto,
            writers,
            entries: wire,
            fulfilled: Vec::new(),
            lineage: None,
            macs: Vec::new(),
            rights: Vec::new(),
        }
    }

    /// Adds escrow rights entries, interning their writers.
    pub fn with_rights<'a>(
        mut self,
        rights: impl IntoIterator<Item = (&'a Sku, &'a WriterId, RightsKind, u64)>,
    ) -> Delta {
        for (sku, w, kind, total) in rights {
            let writer = intern(&mut self.writers, w);
            self.rights.push(WireRights { sku: sku.clone(), writer, kind, total });
        }
        self
    }

    /// Rights entries with their writers resolved. Call only on validated frames.
    pub fn rights(&self) -> impl Iterator<Item = (&Sku, &WriterId, RightsKind, u64)> {
        self.rights.iter().map(|e| (&e.sku, &self.writers[e.writer as usize], e.kind, e.total))
    }

    /// Entries with their writers resolved. Call only on validated frames.
    pub fn entries(&self) -> impl Iterator<Item = (&Sku, &WriterId, PnEntry)> {
        self.entries.iter().map(|e| (&e.sku, &self.writers[e.writer as usize], PnEntry { p: e.p, n: e.n }))
    }
}

/// Acknowledges a range of the peer's sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// Everything up to here is durable at the sender of the ack.
    pub upto: u64,
}

/// Anti-entropy fingerprint of the store's counters as the agent sees them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DigestMsg {
    /// The agent's sequence when the digest was taken (all of it acked by the hub).
    pub head: u64,
    /// The hub sequence the agent had applied when the digest was taken.
    pub applied: u64,
    /// The fingerprint.
    pub digest: StateDigest,
}

/// Journal events with sender journal sequence in `(after, upto]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalBatch {
    /// The receiver must already have stored everything up to here.
    pub after: u64,
    /// This batch completes the range up to here.
    pub upto: u64,
    /// Events.
    pub events: Vec<JournalEvent>,
}

/// Why the sender is closing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorMsg {
    /// One of [`close_code`].
    pub code: u32,
    /// For humans.
    pub message: String,
}

/// Codec failures. Each names the limit or rule broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[allow(missing_docs)] // each variant is documented by its #[error] text
pub enum CodecError {
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("empty frame")]
    Empty,
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("frame breaks a limit: {0}")]
    Limit(String),
    #[error("the peer speaks protocol version {found}; this side speaks {PROTOCOL_VERSION}")]
    Version { found: u32 },
}

impl Frame {
    /// Checks every collection limit and internal reference.
    pub fn validate(&self) -> Result<(), CodecError> {
        let limit = |what: &str, len: usize, max: usize| {
            if len > max {
                Err(CodecError::Limit(format!("{what} has {len} items; the limit is {max}")))
            } else {
                Ok(())
            }
        };
        let Frame::V1(f) = self;
        match f {
            FrameV1::Delta(d) => {
                limit("delta entries", d.entries.len(), DELTA_ENTRIES_MAX)?;
                limit("delta writers", d.writers.len(), DELTA_WRITERS_MAX)?;
                limit("delta fulfilled holds", d.fulfilled.len(), DELTA_FULFILLED_MAX)?;
                if d.upto < d.after {
                    return Err(CodecError::Limit(format!("delta range ({}, {}] is backwards", d.after, d.upto)));
                }
                limit("delta tags", d.macs.len(), d.entries.len())?;
                if let Some((i, _)) = d.macs.iter().find(|(i, _)| *i as usize >= d.entries.len()) {
                    return Err(CodecError::Limit(format!("delta tag names entry #{i} of {}", d.entries.len())));
                }
                if let Some(l) = &d.lineage {
                    limit("delta boots", l.boots.len(), BOOTS_MAX)?;
                }
                if let Some(e) = d.entries.iter().find(|e| e.writer as usize >= d.writers.len()) {
                    return Err(CodecError::Limit(format!(
                        "delta entry for {} names writer #{} of {}",
                        e.sku,
                        e.writer,
                        d.writers.len()
                    )));
                }
                limit("delta rights", d.rights.len(), DELTA_ENTRIES_MAX)?;
                check_rights_writers("delta", &d.rights, d.writers.len())?;
            }
            FrameV1::Rights(r) => {
                limit("rights entries", r.entries.len(), RIGHTS_MAX)?;
                limit("rights writers", r.writers.len(), DELTA_WRITERS_MAX)?;
                check_rights_writers("rights", &r.entries, r.writers.len())?;
                if let Some(p) = &r.escrow {
                    p.validate().map_err(|e| CodecError::Limit(format!("escrow policy: {e}")))?;
                }
            }
            FrameV1::Journal(j) => {
                limit("journal batch", j.events.len(), JOURNAL_BATCH_MAX)?;
                if j.upto < j.after {
                    return Err(CodecError::Limit(format!("journal range ({}, {}] is backwards", j.after, j.upto)));
                }
                if let Some(e) = j.events.iter().find(|e| e.reason.as_ref().is_some_and(|r| r.len() > REASON_MAX_LEN)) {
                    return Err(CodecError::Limit(format!(
                        "journal event {} has a reason over {REASON_MAX_LEN} bytes",
                        e.id
                    )));
                }
            }
            FrameV1::Error(e) => limit("error message bytes", e.message.len(), MESSAGE_MAX_LEN)?,
            FrameV1::Holds(h) => limit("holds", h.holds.len(), HOLDS_MAX)?,
            FrameV1::Incoming(i) => {
                limit("incoming transfers", i.transfers.len(), INCOMING_TRANSFERS_MAX)?;
                let lines: usize = i.transfers.iter().map(|t| t.lines.len()).sum();
                limit("incoming lines", lines, INCOMING_LINES_MAX)?;
            }
            FrameV1::Catalog(c) => limit("catalog frame bytes", c.bytes.len(), CATALOG_PART_MAX)?,
            FrameV1::Hello(h) => {
                limit("retired writers", h.retired.len(), RETIRED_MAX)?;
                limit("hello boots", h.boots.len(), BOOTS_MAX)?;
            }
            FrameV1::Welcome(w) => {
                limit("lineage points", w.lineage.points.len(), CHECKPOINTS_MAX)?;
                limit("lineage boots", w.lineage.boots.len(), CHECKPOINTS_MAX)?;
            }
            _ => {}
        }
        Ok(())
    }
}

fn check_rights_writers(what: &str, rights: &[WireRights], writers: usize) -> Result<(), CodecError> {
    match rights.iter().find(|e| e.writer as usize >= writers) {
        Some(e) => {
            Err(CodecError::Limit(format!("{what} rights entry for {} names writer #{} of {writers}", e.sku, e.writer)))
        }
        None => Ok(()),
    }
}

/// Encodes one frame with its length prefix.
pub fn encode(frame: &Frame) -> Result<Vec<u8>, CodecError> {
    frame.validate()?;
    let mut out = postcard::to_extend(frame, vec![0u8; 4]).map_err(|e| CodecError::Malformed(e.to_string()))?;
    let len = out.len() - 4;
    if len > FRAME_MAX_BYTES {
        return Err(CodecError::TooLarge { len, max: FRAME_MAX_BYTES });
    }
    out[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// Reads a length prefix, refusing frames over the limit before anything is allocated.
pub fn decode_len(header: [u8; 4]) -> Result<usize, CodecError> {
    let len = u32::from_be_bytes(header) as usize;
    if len == 0 {
        return Err(CodecError::Empty);
    }
    if len > FRAME_MAX_BYTES {
        return Err(CodecError::TooLarge { len, max: FRAME_MAX_BYTES });
    }
    Ok(len)
}

/// Decodes and validates one frame body (without its length prefix).
pub fn decode_body(body: &[u8]) -> Result<Frame, CodecError> {
    if body.len() > FRAME_MAX_BYTES {
        return Err(CodecError::TooLarge { len: body.len(), max: FRAME_MAX_BYTES });
    }
    let (frame, rest): (Frame, &[u8]) = match postcard::take_from_bytes(body) {
        Ok(x) => x,
        Err(e) => {
            return Err(handshake_version(body)
                .map_or_else(|| CodecError::Malformed(e.to_string()), |found| CodecError::Version { found }));
        }
    };
    if !rest.is_empty() {
        return Err(CodecError::Malformed(format!("{} trailing bytes", rest.len())));
    }
    frame.validate()?;
    Ok(frame)
}

/// If `body` starts like a `Hello` or `Welcome` of another protocol version (whose layout may
/// differ), that version: a peer of another version gets a clear answer, not "malformed".
fn handshake_version(body: &[u8]) -> Option<u32> {
    // postcard: variant indices and u32 are varints. Frame::V1 = 0; Hello = 0, Welcome = 1; and
    // both start with their `protocol`.
    let [0, 0 | 1, rest @ ..] = body else { return None };
    let (found, _): (u32, _) = postcard::take_from_bytes(rest).ok()?;
    (found != PROTOCOL_VERSION).then_some(found)
}

/// Decodes one length-prefixed frame from the front of `buf`; returns it and the bytes used, or
/// `None` if more bytes are needed.
pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, CodecError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = decode_len([buf[0], buf[1], buf[2], buf[3]])?;
    if buf.len() < 4 + len {
        return Ok(None);
    }
    Ok(Some((decode_body(&buf[4..4 + len])?, 4 + len)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::{Incarnation, NodeId};

    fn writer(i: u64) -> WriterId {
        WriterId::new(NodeId::Store("s1".parse().unwrap()), Incarnation::from_u64(i))
    }

    #[test]
    fn round_trip_and_interning() {
        let sku_a: Sku = "A".parse().unwrap();
        let sku_b: Sku = "B".parse().unwrap();
        let (w1, w2) = (writer(1), writer(2));
        let d = Delta::build(
            3,
            9,
            [
                (&sku_a, &w1, PnEntry { p: 1, n: 2 }),
                (&sku_b, &w1, PnEntry { p: 5, n: 0 }),
                (&sku_b, &w2, PnEntry { p: 0, n: 7 }),
            ],
        );
        assert_eq!(d.writers.len(), 2);
        let frame = Frame::V1(FrameV1::Delta(d.clone()));
        let bytes = encode(&frame).unwrap();
        let (back, used) = decode(&bytes).unwrap().unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(back, frame);
        assert_eq!(d.entries().count(), 3);
        assert_eq!(decode(&bytes[..bytes.len() - 1]).unwrap(), None);
    }

    #[test]
    fn limits_on_decode() {
        assert_eq!(
            decode_len(((FRAME_MAX_BYTES + 1) as u32).to_be_bytes()),
            Err(CodecError::TooLarge { len: FRAME_MAX_BYTES + 1, max: FRAME_MAX_BYTES })
        );
        assert_eq!(decode_len([0; 4]), Err(CodecError::Empty));
        assert!(matches!(decode_body(&[7, 1, 2]), Err(CodecError::Malformed(_))));
        let bad = Frame::V1(FrameV1::Delta(Delta {
            after: 0,
            upto: 1,
            fulfilled: vec![],
            lineage: None,
            macs: vec![],
            writers: vec![],
            entries: vec![WireEntry { sku: "A".parse().unwrap(), writer: 0, p: 1, n: 0 }],
            rights: vec![],
        }));
        assert!(matches!(encode(&bad), Err(CodecError::Limit(_))));
        // Bypass encode's check to prove decode checks too.
        let mut raw = vec![0u8; 4];
        raw.extend(postcard::to_stdvec(&bad).unwrap());
        let len = (raw.len() - 4) as u32;
        raw[..4].copy_from_slice(&len.to_be_bytes());
        assert!(matches!(decode(&raw), Err(CodecError::Limit(m)) if m.contains("writer #0 of 0")));
        let (sku, w) = ("A".parse::<Sku>().unwrap(), writer(1));
        let entries = std::iter::repeat_n((&sku, &w, PnEntry::default()), DELTA_ENTRIES_MAX + 1);
        let too_many = Frame::V1(FrameV1::Delta(Delta::build(0, 1, entries)));
        assert!(matches!(encode(&too_many), Err(CodecError::Limit(m)) if m.contains("4097 items")));
        let mut tagged = Delta::build(0, 1, [(&sku, &w, PnEntry::default())]);
        tagged.macs = vec![(1, [0; 16])];
        assert!(
            matches!(encode(&Frame::V1(FrameV1::Delta(tagged))), Err(CodecError::Limit(m)) if m.contains("entry #1 of 1"))
        );
    }

    /// Rights travel both ways (in a delta and as a snapshot) and their limits hold.
    #[test]
    fn rights_round_trip_and_limits() {
        let (sku, w) = ("A".parse::<Sku>().unwrap(), writer(1));
        let hub = WriterId::new(NodeId::Hub, Incarnation::from_u64(3));
        let d = Delta::build(0, 2, [(&sku, &w, PnEntry { p: 5, n: 0 })])
            .with_rights([(&sku, &w, RightsKind::Granted, 2), (&sku, &w, RightsKind::Consumed, 1)]);
        assert_eq!(d.writers.len(), 1, "the rights' writer is interned with the entries'");
        let frame = Frame::V1(FrameV1::Delta(d.clone()));
        let (back, _) = decode(&encode(&frame).unwrap()).unwrap().unwrap();
        assert_eq!(back, frame);
        assert_eq!(
            d.rights().map(|(_, _, k, t)| (k, t)).collect::<Vec<_>>(),
            [(RightsKind::Granted, 2), (RightsKind::Consumed, 1)]
        );

        let policy = EscrowPolicy { share: 0.25, max: Some(10), keep: 2 };
        let snap = RightsSnapshot::build(
            Some(policy),
            [(&sku, &w, RightsKind::Granted, 4), (&sku, &hub, RightsKind::Returned, 1)],
        );
        let frame = Frame::V1(FrameV1::Rights(snap.clone()));
        let (back, _) = decode(&encode(&frame).unwrap()).unwrap().unwrap();
        assert_eq!(back, frame);
        assert_eq!(snap.entries().map(|(_, w, _, _)| w.clone()).collect::<Vec<_>>(), [w.clone(), hub]);

        let mut bad = snap.clone();
        bad.entries[0].writer = 7;
        assert!(
            matches!(encode(&Frame::V1(FrameV1::Rights(bad))), Err(CodecError::Limit(m)) if m.contains("writer #7 of 2"))
        );
        let mut bad = snap;
        bad.escrow = Some(EscrowPolicy { share: 2.0, max: None, keep: 0 });
        assert!(matches!(encode(&Frame::V1(FrameV1::Rights(bad))), Err(CodecError::Limit(m)) if m.contains("share")));
        let many = std::iter::repeat_n((&sku, &w, RightsKind::Granted, 1), RIGHTS_MAX + 1);
        let big = Frame::V1(FrameV1::Rights(RightsSnapshot::build(None, many)));
        assert!(matches!(encode(&big), Err(CodecError::Limit(m)) if m.contains("rights entries")));
    }

    /// An incoming snapshot round-trips and its limits hold both ways.
    #[test]
    fn incoming_snapshots_are_bounded() {
        let t = |lines: usize| IncomingTransfer {
            id: uuid::Uuid::from_u128(7),
            from: "s2".parse().unwrap(),
            lines: (0..lines).map(|_| IncomingLine { sku: "A".parse().unwrap(), qty: 3 }).collect(),
            shipped_at_ms: 1,
        };
        let ok = Frame::V1(FrameV1::Incoming(IncomingSnapshot { version: 4, transfers: vec![t(2), t(1)] }));
        let bytes = encode(&ok).unwrap();
        assert_eq!(decode(&bytes).unwrap(), Some((ok, bytes.len())));
        let too_many = Frame::V1(FrameV1::Incoming(IncomingSnapshot {
            version: 4,
            transfers: (0..=INCOMING_LINES_MAX / 100).map(|_| t(100)).collect(),
        }));
        assert!(matches!(encode(&too_many), Err(CodecError::Limit(m)) if m.contains("incoming lines")));
    }

    /// A peer of protocol version 1 (whose `Hello` had fewer fields) is told the version, not
    /// "malformed".
    #[test]
    fn another_version_is_named() {
        #[derive(Serialize)]
        enum OldFrame {
            V1(OldFrameV1),
        }
        #[derive(Serialize)]
        enum OldFrameV1 {
            Hello {
                protocol: u32,
                store: String,
                writer: String,
                hub_writer: Option<String>,
                applied: u64,
                journal_applied: u64,
            },
        }
        let old = OldFrame::V1(OldFrameV1::Hello {
            protocol: 1,
            store: "s1".into(),
            writer: "s1@0000000000000001".into(),
            hub_writer: None,
            applied: 0,
            journal_applied: 0,
        });
        let body = postcard::to_stdvec(&old).unwrap();
        assert_eq!(decode_body(&body), Err(CodecError::Version { found: 1 }));
        assert!(CodecError::Version { found: 1 }.to_string().contains("protocol version 1"));
        // Garbage is still just malformed.
        assert!(matches!(decode_body(&[0, 0, PROTOCOL_VERSION as u8]), Err(CodecError::Malformed(_))));
    }
}
