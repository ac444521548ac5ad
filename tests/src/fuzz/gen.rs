//! Structured inputs drawn from fuzz bytes: identifiers from small pools (so frames name the
//! session's own store, its writers and the hub often enough to get past the first checks),
//! numbers biased towards the edges, and every frame type of the wire protocol.

use arbitrary::{Result, Unstructured};
use shelfsync_shared::counter::{PnEntry, StateDigest};
use shelfsync_shared::lineage::{Boot, Checkpoint, HubLineage, RetireReason};
use shelfsync_shared::mac::EntryMac;
use shelfsync_shared::wire::{
    Ack, CatalogDoc, CatalogFrame, Delta, DeltaLineage, DigestMsg, ErrorMsg, Frame, FrameV1, Hello, Hold, HoldStatus,
    HoldsSnapshot, IncomingLine, IncomingSnapshot, IncomingTransfer, JournalBatch, Retirement, RightsSnapshot, Welcome,
    WireEntry, WireRights, PROTOCOL_VERSION,
};
use shelfsync_shared::{
    EscrowPolicy, EventFlag, EventKind, Incarnation, JournalEvent, NodeId, RightsKind, Sku, StoreId, WriterId,
};
use uuid::Uuid;

/// The store of the session under test.
pub const STORE: &str = "s1";
/// Another store.
pub const OTHER_STORE: &str = "s2";

/// Most items in a generated collection: fuzz inputs are small, and limits are tested by the
/// codec's own tests; a few items exercise every path.
const ITEMS_MAX: usize = 6;

/// The session's store.
pub fn store() -> StoreId {
    STORE.parse().expect("valid store id")
}

/// A number: usually small (so sequences line up), sometimes at an edge, sometimes anything.
pub fn num(u: &mut Unstructured) -> Result<u64> {
    Ok(match u.int_in_range(0u8..=15)? {
        0..=9 => u.int_in_range(0..=12)?,
        10 => u64::MAX,
        11 => u64::MAX - 1,
        12 => i64::MAX as u64,
        13 => i64::MAX as u64 + 1,
        _ => u.arbitrary()?,
    })
}

/// A signed number biased like [`num`].
pub fn inum(u: &mut Unstructured) -> Result<i64> {
    Ok(match u.int_in_range(0u8..=7)? {
        0..=4 => u.int_in_range(-12..=12)?,
        5 => i64::MIN,
        6 => i64::MAX,
        _ => u.arbitrary()?,
    })
}

/// A short vector of items.
pub fn vec_of<T>(u: &mut Unstructured, mut item: impl FnMut(&mut Unstructured) -> Result<T>) -> Result<Vec<T>> {
    let n = u.int_in_range(0..=ITEMS_MAX)?;
    (0..n).map(|_| item(u)).collect()
}

/// A short string (any UTF-8).
pub fn text(u: &mut Unstructured) -> Result<String> {
    let n = u.int_in_range(0..=40)?;
    let mut s = String::new();
    for _ in 0..n {
        s.push(u.arbitrary()?);
    }
    Ok(s)
}

/// A store id: this session's, another, the reserved name's neighbour, or made up.
pub fn store_id(u: &mut Unstructured) -> Result<StoreId> {
    let s = match u.int_in_range(0u8..=5)? {
        0..=2 => STORE.to_owned(),
        3 => OTHER_STORE.to_owned(),
        4 => "hub-1".to_owned(),
        _ => text(u)?,
    };
    Ok(s.parse().unwrap_or_else(|_| store()))
}

/// A SKU from a small pool, or made up.
pub fn sku(u: &mut Unstructured) -> Result<Sku> {
    let s = match u.int_in_range(0u8..=4)? {
        0 => "A".to_owned(),
        1 => "B".to_owned(),
        2 => "HSS-001".to_owned(),
        3 => "x".repeat(64),
        _ => text(u)?,
    };
    Ok(s.parse().unwrap_or_else(|_| "A".parse().expect("valid sku")))
}

/// An incarnation from a small pool, or anything.
pub fn incarnation(u: &mut Unstructured) -> Result<Incarnation> {
    Ok(Incarnation::from_u64(if u.ratio(3, 4)? { u.int_in_range(1..=3)? } else { u.arbitrary()? }))
}

/// A writer: mostly this store's or the hub's, sometimes another store's.
pub fn writer(u: &mut Unstructured) -> Result<WriterId> {
    let node = match u.int_in_range(0u8..=4)? {
        0..=1 => NodeId::Store(store()),
        2..=3 => NodeId::Hub,
        _ => NodeId::Store(store_id(u)?),
    };
    Ok(WriterId::new(node, incarnation(u)?))
}

/// One of this store's writers.
pub fn own_writer(u: &mut Unstructured) -> Result<WriterId> {
    Ok(WriterId::new(NodeId::Store(store()), incarnation(u)?))
}

/// One of the hub's writers.
pub fn hub_writer(u: &mut Unstructured) -> Result<WriterId> {
    Ok(WriterId::new(NodeId::Hub, incarnation(u)?))
}

/// A counter entry.
pub fn entry(u: &mut Unstructured) -> Result<PnEntry> {
    Ok(PnEntry { p: num(u)?, n: num(u)? })
}

/// A chain value from a small pool (so checkpoints match sometimes), or anything.
pub fn checkpoint(u: &mut Unstructured) -> Result<Checkpoint> {
    let chain = match u.int_in_range(0u8..=3)? {
        0 => [0; 16],
        1 => [1; 16],
        2 => [2; 16],
        _ => u.arbitrary()?,
    };
    Ok(Checkpoint { ordinal: num(u)?, chain })
}

/// A boot.
pub fn boot(u: &mut Unstructured) -> Result<Boot> {
    Ok(Boot { id: u.int_in_range(0..=4)?, at: checkpoint(u)? })
}

/// What a hub knows of a writer's lineage (within the documented limits).
pub fn hub_lineage(u: &mut Unstructured) -> Result<HubLineage> {
    Ok(HubLineage {
        head: checkpoint(u)?,
        points: vec_of(u, checkpoint)?,
        boots: vec_of(u, boot)?,
        head_boots: vec_of(u, boot)?,
    })
}

/// A digest: usually empty or one of two values, so digests match sometimes.
pub fn digest(u: &mut Unstructured) -> Result<StateDigest> {
    Ok(match u.int_in_range(0u8..=3)? {
        0 => StateDigest::default(),
        1 => StateDigest { count: 1, hash: 1 },
        _ => StateDigest { count: num(u)?, hash: u.arbitrary()? },
    })
}

/// A tag.
pub fn mac(u: &mut Unstructured) -> Result<EntryMac> {
    u.arbitrary()
}

/// A UUID from a small pool, or anything.
pub fn uuid(u: &mut Unstructured) -> Result<Uuid> {
    Ok(Uuid::from_u128(if u.ratio(1, 2)? { u.int_in_range(0..=3)? } else { u.arbitrary()? }))
}

/// A retirement report.
pub fn retirement(u: &mut Unstructured) -> Result<Retirement> {
    Ok(Retirement {
        old: if u.ratio(7, 8)? { own_writer(u)? } else { writer(u)? },
        new: if u.ratio(7, 8)? { own_writer(u)? } else { writer(u)? },
        reason: RetireReason::RolledBack,
        fork_ordinal: num(u)?,
        hub_ordinal: num(u)?,
        own_ordinal: num(u)?,
        moved: num(u)?,
        ambiguous: num(u)?,
        window_ms: if u.arbitrary()? { Some((inum(u)?, inum(u)?)) } else { None },
        at_ms: inum(u)?,
    })
}

/// A protocol version: usually ours.
fn protocol(u: &mut Unstructured) -> Result<u32> {
    Ok(if u.ratio(7, 8)? { PROTOCOL_VERSION } else { u.arbitrary()? })
}

/// An agent's `Hello`.
pub fn hello(u: &mut Unstructured) -> Result<Hello> {
    Ok(Hello {
        protocol: protocol(u)?,
        store: store_id(u)?,
        writer: if u.ratio(7, 8)? { own_writer(u)? } else { writer(u)? },
        hub_writer: if u.arbitrary()? { Some(hub_writer(u)?) } else { None },
        applied: num(u)?,
        journal_applied: num(u)?,
        acked: num(u)?,
        journal_acked: num(u)?,
        lineage: checkpoint(u)?,
        boots: vec_of(u, boot)?,
        retired: vec_of(u, retirement)?,
    })
}

/// A hub's `Welcome`.
pub fn welcome(u: &mut Unstructured) -> Result<Welcome> {
    Ok(Welcome {
        protocol: protocol(u)?,
        hub_writer: if u.ratio(7, 8)? { hub_writer(u)? } else { writer(u)? },
        applied: num(u)?,
        journal_applied: num(u)?,
        lineage: hub_lineage(u)?,
        hub_entries: digest(u)?,
    })
}

/// A delta whose references mostly hold (writer indexes, tag indexes), sometimes not.
pub fn delta(u: &mut Unstructured) -> Result<Delta> {
    let writers = vec_of(u, writer)?;
    let writers_len = writers.len();
    let entries = vec_of(u, |u| {
        let w = u.int_in_range(0..=writers.len() as u32)?;
        Ok(WireEntry { sku: sku(u)?, writer: w, p: num(u)?, n: num(u)? })
    })?;
    let macs = vec_of(u, |u| Ok((u.int_in_range(0..=entries.len() as u32)?, mac(u)?)))?;
    let after = num(u)?;
    let upto = if u.ratio(3, 4)? { after.saturating_add(u.int_in_range(0..=4)?) } else { num(u)? };
    Ok(Delta {
        after,
        upto,
        writers,
        entries,
        fulfilled: vec_of(u, uuid)?,
        lineage: if u.arbitrary()? {
            Some(DeltaLineage { head: checkpoint(u)?, boots: vec_of(u, boot)? })
        } else {
            None
        },
        macs,
        rights: vec_of(u, |u| wire_rights(u, writers_len))?,
    })
}

/// A rights entry naming one of `writers` writers (sometimes one past the end).
fn wire_rights(u: &mut Unstructured, writers: usize) -> Result<WireRights> {
    let kind = match u.int_in_range(0u8..=2)? {
        0 => RightsKind::Granted,
        1 => RightsKind::Returned,
        _ => RightsKind::Consumed,
    };
    Ok(WireRights { sku: sku(u)?, writer: u.int_in_range(0..=writers as u32)?, kind, total: num(u)? })
}

/// A rights snapshot (the policy sometimes out of range).
pub fn rights_snapshot(u: &mut Unstructured) -> Result<RightsSnapshot> {
    let writers = vec_of(u, writer)?;
    let n = writers.len();
    let escrow = if u.arbitrary()? {
        let share = if u.ratio(7, 8)? { f64::from(u.int_in_range(0u8..=100)?) / 100.0 } else { 1.5 };
        let max = if u.arbitrary()? { Some(num(u)?) } else { None };
        Some(EscrowPolicy { share, max, keep: u.int_in_range(0..=5)? })
    } else {
        None
    };
    Ok(RightsSnapshot { escrow, writers, entries: vec_of(u, |u| wire_rights(u, n))? })
}

/// A journal event, mostly of this store.
pub fn event(u: &mut Unstructured) -> Result<JournalEvent> {
    let kinds = EventKind::ALL;
    let flags = [EventFlag::UnknownSku, EventFlag::NegativeStock, EventFlag::DipsIntoHolds, EventFlag::InactiveSku];
    Ok(JournalEvent {
        id: uuid(u)?,
        line: u.int_in_range(0..=3)?,
        kind: *u.choose(&kinds)?,
        store: store_id(u)?,
        sku: sku(u)?,
        delta: inum(u)?,
        reason: if u.arbitrary()? { Some(text(u)?) } else { None },
        occurred_at_ms: inum(u)?,
        recorded_at_ms: inum(u)?,
        writer: writer(u)?,
        flags: vec_of(u, |u| u.choose(&flags).copied())?,
    })
}

/// A journal batch.
pub fn journal(u: &mut Unstructured) -> Result<JournalBatch> {
    let after = num(u)?;
    let upto = if u.ratio(3, 4)? { after.saturating_add(u.int_in_range(0..=4)?) } else { num(u)? };
    Ok(JournalBatch { after, upto, events: vec_of(u, event)? })
}

/// A hold.
pub fn hold(u: &mut Unstructured) -> Result<Hold> {
    Ok(Hold {
        id: uuid(u)?,
        reservation: uuid(u)?,
        sku: sku(u)?,
        qty: num(u)?,
        status: if u.arbitrary()? { HoldStatus::Held } else { HoldStatus::Committed },
        expires_at_ms: if u.arbitrary()? { Some(inum(u)?) } else { None },
    })
}

/// A transfer on its way to the store under test.
pub fn incoming(u: &mut Unstructured) -> Result<IncomingTransfer> {
    Ok(IncomingTransfer {
        id: uuid(u)?,
        from: OTHER_STORE.parse().expect("a store id"),
        lines: vec_of(u, |u| Ok(IncomingLine { sku: sku(u)?, qty: num(u)? }))?,
        shipped_at_ms: inum(u)?,
    })
}

/// A catalog document.
pub fn catalog_doc(u: &mut Unstructured) -> Result<CatalogDoc> {
    Ok(if u.arbitrary()? { CatalogDoc::Catalog } else { CatalogDoc::Overrides })
}

/// Any frame of the protocol. Not necessarily valid: callers validate as the codec would.
pub fn frame(u: &mut Unstructured) -> Result<Frame> {
    let f = match u.int_in_range(0u8..=14)? {
        0 => FrameV1::Hello(hello(u)?),
        1 => FrameV1::Welcome(welcome(u)?),
        2 => FrameV1::Delta(delta(u)?),
        3 => FrameV1::Ack(Ack { upto: num(u)? }),
        4 => FrameV1::Digest(DigestMsg { head: num(u)?, applied: num(u)?, digest: digest(u)? }),
        5 => FrameV1::Resync,
        6 => FrameV1::Journal(journal(u)?),
        7 => FrameV1::JournalAck(Ack { upto: num(u)? }),
        8 => FrameV1::Error(ErrorMsg { code: u.int_in_range(0..=8)?, message: text(u)? }),
        9 => FrameV1::Holds(HoldsSnapshot { version: num(u)?, holds: vec_of(u, hold)? }),
        10 => {
            let n = u.int_in_range(0..=64)?;
            FrameV1::Catalog(CatalogFrame { doc: catalog_doc(u)?, last: u.arbitrary()?, bytes: u.bytes(n)?.to_vec() })
        }
        11 => FrameV1::Ping(num(u)?),
        12 => FrameV1::Incoming(IncomingSnapshot { version: num(u)?, transfers: vec_of(u, incoming)? }),
        13 => FrameV1::Rights(rights_snapshot(u)?),
        _ => FrameV1::Pong(num(u)?),
    };
    Ok(Frame::V1(f))
}
