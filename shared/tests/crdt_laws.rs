//! Property tests of the PN-counter CRDT laws, of convergence under any delivery order with
//! duplication, loss-then-retransmission and reordering, and of the codec.

use std::collections::BTreeMap;

use proptest::prelude::*;
use shelfsync_shared::counter::{CounterMap, PnCounter, PnEntry, ENTRY_COMPONENT_MAX};
use shelfsync_shared::lineage::{Boot, Checkpoint};
use shelfsync_shared::wire::{self, CodecError, Delta, DeltaLineage, Frame, FrameV1, JournalBatch, WireEntry};
use shelfsync_shared::{EventFlag, EventKind, Incarnation, JournalEvent, NodeId, Sku, StoreId, WriterId};

fn writer(i: u8) -> WriterId {
    let store: StoreId = format!("s{}", i % 3).parse().unwrap();
    WriterId::new(NodeId::Store(store), Incarnation::from_u64(i as u64))
}

fn sku(i: u8) -> Sku {
    format!("K{i}").parse().unwrap()
}

// ---- lattice laws ----

fn entry() -> impl Strategy<Value = PnEntry> {
    (0..=ENTRY_COMPONENT_MAX, 0..=ENTRY_COMPONENT_MAX).prop_map(|(p, n)| PnEntry { p, n })
}

/// A counter built from arbitrary (writer, delta) changes, each stamped with the next sequence.
fn counter_from(ops: &[(u8, i32)]) -> PnCounter {
    let mut c = PnCounter::new();
    for (seq, (w, d)) in ops.iter().enumerate() {
        c.apply(&writer(*w), *d as i64, seq as u64 + 1).unwrap();
    }
    c
}

fn state(c: &PnCounter) -> BTreeMap<WriterId, PnEntry> {
    c.entries().map(|(w, e, _)| (w.clone(), e)).collect()
}

fn ops() -> impl Strategy<Value = Vec<(u8, i32)>> {
    prop::collection::vec((0u8..6, -50i32..50), 0..30)
}

/// A map of several SKUs' counters, from arbitrary local changes.
fn map_from(ops: &[(u8, u8, i32)]) -> CounterMap {
    let mut m = CounterMap::new();
    for (k, w, d) in ops {
        m.apply(&sku(*k), &writer(*w), *d as i64).unwrap();
    }
    m
}

fn merged(into: &CounterMap, from: &CounterMap) -> CounterMap {
    let mut m = into.clone();
    let d = from.delta_since(0);
    m.merge(d.iter().map(|(_, k, w, e)| (k, w, *e))).unwrap();
    m
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn entry_join_is_a_semilattice(a in entry(), b in entry(), c in entry()) {
        prop_assert_eq!(a.join(b), b.join(a));
        prop_assert_eq!(a.join(b).join(c), a.join(b.join(c)));
        prop_assert_eq!(a.join(a), a);
        let ab = a.join(b);
        prop_assert!(ab.covers(a) && ab.covers(b), "the join is an upper bound");
        prop_assert_eq!(a.covers(b), a.join(b) == a, "covers is the lattice order");
        prop_assert!(a.check(&writer(0)).is_ok());
    }

    #[test]
    fn merge_is_commutative(a in ops(), b in ops()) {
        let (ca, cb) = (counter_from(&a), counter_from(&b));
        let mut ab = ca.clone();
        ab.merge(&cb, 100).unwrap();
        let mut ba = cb.clone();
        ba.merge(&ca, 100).unwrap();
        prop_assert_eq!(state(&ab), state(&ba));
        prop_assert_eq!(ab.value().unwrap(), ba.value().unwrap());
    }

    #[test]
    fn merge_is_associative(a in ops(), b in ops(), c in ops()) {
        let (ca, cb, cc) = (counter_from(&a), counter_from(&b), counter_from(&c));
        let mut left = ca.clone();
        left.merge(&cb, 100).unwrap();
        left.merge(&cc, 101).unwrap();
        let mut bc = cb.clone();
        bc.merge(&cc, 100).unwrap();
        let mut right = ca.clone();
        right.merge(&bc, 101).unwrap();
        prop_assert_eq!(state(&left), state(&right));
        prop_assert_eq!(left.value().unwrap(), right.value().unwrap());
    }

    #[test]
    fn merge_is_idempotent(a in ops(), b in ops()) {
        let (ca, cb) = (counter_from(&a), counter_from(&b));
        let mut once = ca.clone();
        once.merge(&cb, 100).unwrap();
        let mut twice = once.clone();
        let changed = twice.merge(&cb, 101).unwrap();
        prop_assert!(!changed, "a second merge changes nothing");
        prop_assert_eq!(&twice, &once, "not even a sequence number");
        let mut self_merge = ca.clone();
        prop_assert!(!self_merge.merge(&ca, 102).unwrap());
        prop_assert_eq!(self_merge, ca);
    }

    /// The same laws for whole replicas (many SKUs sharing one sequence), compared by state.
    #[test]
    fn map_merge_laws(
        a in prop::collection::vec((0u8..4, 0u8..6, -9i32..9), 0..20),
        b in prop::collection::vec((0u8..4, 0u8..6, -9i32..9), 0..20),
        c in prop::collection::vec((0u8..4, 0u8..6, -9i32..9), 0..20),
    ) {
        let (ma, mb, mc) = (map_from(&a), map_from(&b), map_from(&c));
        prop_assert_eq!(merged(&ma, &mb).state(), merged(&mb, &ma).state());
        prop_assert_eq!(merged(&merged(&ma, &mb), &mc).state(), merged(&ma, &merged(&mb, &mc)).state());
        let ab = merged(&ma, &mb);
        prop_assert_eq!(&merged(&ab, &mb), &ab, "re-merging changes nothing, not even the head");
        for k in 0..4 {
            prop_assert_eq!(merged(&ma, &mb).value(&sku(k)), merged(&mb, &ma).value(&sku(k)));
        }
    }
}

// ---- convergence under any delivery ----

#[derive(Clone, Debug)]
enum Op {
    /// Replica `at` changes SKU `sku` by `delta`, as its own writer.
    Change { at: usize, sku: u8, delta: i32 },
    /// `from` ships everything changed since `to`'s last ack of `from`'s sequence.
    Send { from: usize, to: usize },
    /// One in-flight delta arrives (any of them: reordering). `keep` leaves a copy in flight
    /// (duplication); `ack_lost` means the sender never hears of it (so it resends).
    Deliver { pick: usize, keep: bool, ack_lost: bool },
    /// One in-flight delta is lost; its range is resent because nobody acked it.
    Lose { pick: usize },
}

fn op(replicas: usize) -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..replicas, 0u8..4, -20i32..20).prop_map(|(at, sku, delta)| Op::Change { at, sku, delta }),
        3 => (0..replicas, 0..replicas).prop_map(|(from, to)| Op::Send { from, to }),
        4 => (any::<usize>(), prop::bool::weighted(0.2), prop::bool::weighted(0.2))
            .prop_map(|(pick, keep, ack_lost)| Op::Deliver { pick, keep, ack_lost }),
        1 => any::<usize>().prop_map(|pick| Op::Lose { pick }),
    ]
}

fn script() -> impl Strategy<Value = (usize, Vec<Op>)> {
    (3usize..6).prop_flat_map(|n| (Just(n), prop::collection::vec(op(n), 1..200)))
}

struct Message {
    from: usize,
    to: usize,
    /// The sender's head when it read the delta: the watermark an ack confirms.
    upto: u64,
    entries: Vec<(Sku, WriterId, PnEntry)>,
}

/// Ships `from`'s delta since `to`'s ack to the network.
fn send(maps: &[CounterMap], acked: &[Vec<u64>], from: usize, to: usize) -> Message {
    let entries = maps[from].delta_since(acked[to][from]).into_iter().map(|(_, k, w, e)| (k, w, e)).collect();
    Message { from, to, upto: maps[from].head(), entries }
}

/// Merges a message; the receiver acks it (if the ack arrives) by raising the sender's watermark.
fn deliver(maps: &mut [CounterMap], acked: &mut [Vec<u64>], m: &Message, ack_lost: bool) -> usize {
    let changed = maps[m.to].merge(m.entries.iter().map(|(k, w, e)| (k, w, *e))).unwrap();
    if !ack_lost {
        acked[m.to][m.from] = acked[m.to][m.from].max(m.upto);
    }
    changed
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(192))]

    /// Three to five replicas, each writing only its own entries, ship `delta_since(ack)` to each
    /// other; deltas are delivered in any order, duplicated, or lost and then covered by the next
    /// delta from the unacked watermark. After the network drops whatever is still in flight and the
    /// replicas gossip deltas from their watermarks until nothing changes, every replica holds the
    /// same entries, each writer's entry is exactly what it wrote, each SKU's value is the sum of
    /// all changes made to it, and a final full-state exchange has nothing left to add.
    #[test]
    fn replicas_converge_under_any_delivery((replicas, script) in script()) {
        let writers: Vec<WriterId> = (0..replicas as u8).map(writer).collect();
        let mut maps: Vec<CounterMap> = (0..replicas).map(|_| CounterMap::new()).collect();
        // acked[to][from]: how far `to` has acknowledged `from`'s sequence.
        let mut acked = vec![vec![0u64; replicas]; replicas];
        let mut in_flight: Vec<Message> = Vec::new();
        let mut values: BTreeMap<Sku, i64> = BTreeMap::new();
        let mut written: BTreeMap<(Sku, WriterId), PnEntry> = BTreeMap::new();
        for op in script {
            match op {
                Op::Change { at, sku: k, delta } => {
                    maps[at].apply(&sku(k), &writers[at], delta as i64).unwrap();
                    *values.entry(sku(k)).or_default() += delta as i64;
                    if delta != 0 {
                        let e = written.entry((sku(k), writers[at].clone())).or_default();
                        *e = e.apply(&writers[at], delta as i64).unwrap();
                    }
                }
                Op::Send { from, to } if from != to => in_flight.push(send(&maps, &acked, from, to)),
                Op::Send { .. } => {}
                Op::Deliver { pick, keep, ack_lost } if !in_flight.is_empty() => {
                    let i = pick % in_flight.len();
                    deliver(&mut maps, &mut acked, &in_flight[i], ack_lost);
                    if !keep {
                        in_flight.swap_remove(i);
                    }
                }
                Op::Lose { pick } if !in_flight.is_empty() => {
                    in_flight.swap_remove(pick % in_flight.len());
                }
                Op::Deliver { .. } | Op::Lose { .. } => {}
            }
        }
        // Heal: what is still in flight is lost. Then replicas gossip around a ring (each sends
        // only to its successor), so entries must be relayed: a replica that merged a newer entry
        // must ship it onwards even though its peer acked the older one.
        in_flight.clear();
        let mut rounds = 0;
        loop {
            let mut changed = 0;
            for from in 0..replicas {
                let m = send(&maps, &acked, from, (from + 1) % replicas);
                changed += deliver(&mut maps, &mut acked, &m, false);
            }
            if changed == 0 {
                break;
            }
            rounds += 1;
            // In one round everything reaches replica 0; in the next, everyone.
            prop_assert!(rounds <= 2, "ring gossip from the watermarks settles in two rounds");
        }
        for m in &maps[1..] {
            prop_assert_eq!(m.state(), maps[0].state());
        }
        let expected: BTreeMap<_, _> = written.into_iter().filter(|(_, e)| *e != PnEntry::default()).collect();
        prop_assert_eq!(maps[0].state(), expected, "each writer's entry is exactly what it wrote");
        for (k, v) in &values {
            for m in &maps {
                prop_assert_eq!(m.value(k).unwrap(), *v);
            }
        }
        // The watermark deltas left nothing behind.
        let full: Vec<_> = maps.iter().map(|m| m.delta_since(0)).collect();
        for (to, map) in maps.iter_mut().enumerate() {
            for (from, d) in full.iter().enumerate() {
                if from != to {
                    prop_assert_eq!(map.merge(d.iter().map(|(_, k, w, e)| (k, w, *e))).unwrap(), 0);
                }
            }
        }
    }
}

// ---- codec ----

fn any_sku() -> impl Strategy<Value = Sku> {
    "[A-Za-z0-9][A-Za-z0-9._-]{0,63}".prop_map(|s| s.parse().unwrap())
}

fn any_store() -> impl Strategy<Value = StoreId> {
    "[a-z0-9][a-z0-9-]{0,62}".prop_filter_map("hub is reserved", |s| s.parse().ok())
}

fn any_writer() -> impl Strategy<Value = WriterId> {
    (prop::option::weighted(0.8, any_store()), any::<u64>()).prop_map(|(store, inc)| {
        let node = store.map_or(NodeId::Hub, NodeId::Store);
        WriterId::new(node, Incarnation::from_u64(inc))
    })
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    (any::<u64>(), any::<u64>()).prop_map(|(a, b)| (a.min(b), a.max(b)))
}

/// Any valid delta frame: writer table, entries pointing into it, fulfilled holds.
fn any_delta() -> impl Strategy<Value = Delta> {
    (prop::collection::vec(any_writer(), 1..8), range()).prop_flat_map(|(writers, (after, upto))| {
        let n = writers.len() as u32;
        let entries = prop::collection::vec(
            (any_sku(), 0..n, any::<u64>(), any::<u64>()).prop_map(|(sku, writer, p, n)| WireEntry {
                sku,
                writer,
                p,
                n,
            }),
            0..40,
        );
        let fulfilled = prop::collection::vec(any::<u128>().prop_map(uuid::Uuid::from_u128), 0..6);
        let lineage = prop::option::of(
            (
                any::<u64>(),
                any::<[u8; 16]>(),
                prop::collection::vec((any::<u64>(), any::<u64>(), any::<[u8; 16]>()), 0..4),
            )
                .prop_map(|(ordinal, chain, boots)| DeltaLineage {
                    head: Checkpoint { ordinal, chain },
                    boots: boots
                        .into_iter()
                        .map(|(id, ordinal, chain)| Boot { id, at: Checkpoint { ordinal, chain } })
                        .collect(),
                }),
        );
        (Just(writers), entries, fulfilled, lineage, any::<[u8; 16]>()).prop_map(
            move |(writers, entries, fulfilled, lineage, tag)| {
                // Every other entry tagged, as a store giving back hub entries would.
                let macs = (0..entries.len() as u32).step_by(2).map(|i| (i, tag)).collect();
                // Rights entries of the same writers, one per counter entry.
                let rights = entries
                    .iter()
                    .map(|e: &shelfsync_shared::wire::WireEntry| shelfsync_shared::wire::WireRights {
                        sku: e.sku.clone(),
                        writer: e.writer,
                        kind: shelfsync_shared::RightsKind::Granted,
                        total: e.p,
                    })
                    .collect();
                Delta { after, upto, writers, entries, fulfilled, lineage, macs, rights }
            },
        )
    })
}

fn any_event() -> impl Strategy<Value = JournalEvent> {
    let kinds = EventKind::ALL;
    (
        (any::<u128>(), any::<u32>(), prop::sample::select(kinds.to_vec()), any_store(), any_sku(), any::<i64>()),
        (prop::option::of("[ -~]{0,200}"), any::<i64>(), any::<i64>(), any_writer(), 0u32..8),
    )
        .prop_map(|((id, line, kind, store, sku, delta), (reason, occurred, recorded, writer, flags))| {
            JournalEvent {
                id: uuid::Uuid::from_u128(id),
                line,
                kind,
                store,
                sku,
                delta,
                reason,
                occurred_at_ms: occurred,
                recorded_at_ms: recorded,
                writer,
                flags: EventFlag::from_bits(flags),
            }
        })
}

fn round_trip(frame: &Frame) -> Result<(), TestCaseError> {
    let bytes = wire::encode(frame).map_err(|e| TestCaseError::fail(format!("encode: {e}")))?;
    let (back, used) = wire::decode(&bytes).unwrap().expect("a whole frame");
    prop_assert_eq!(used, bytes.len());
    prop_assert_eq!(&back, frame);
    // A frame split anywhere is "need more bytes", never an error or a different frame.
    for cut in [0, 3, 4, bytes.len() / 2, bytes.len() - 1] {
        prop_assert_eq!(wire::decode(&bytes[..cut]).unwrap(), None);
    }
    // Two frames back to back decode one at a time.
    let mut two = bytes.clone();
    two.extend_from_slice(&bytes);
    prop_assert_eq!(wire::decode(&two).unwrap(), Some((frame.clone(), bytes.len())));
    Ok(())
}

/// Whatever `decode` makes of arbitrary bytes, it does not panic, and a frame it accepts is valid
/// and re-encodes to a frame that decodes the same.
fn decode_is_total(bytes: &[u8]) -> Result<(), TestCaseError> {
    match wire::decode(bytes) {
        Ok(None) => {
            let declared = bytes.get(..4).map(|h| u32::from_be_bytes(h.try_into().unwrap()) as usize);
            prop_assert!(declared.is_none_or(|len| bytes.len() < 4 + len), "None only when bytes are missing");
        }
        Ok(Some((frame, used))) => {
            prop_assert!(used <= bytes.len());
            prop_assert!(frame.validate().is_ok());
            let again = wire::encode(&frame).unwrap();
            prop_assert_eq!(wire::decode(&again).unwrap().map(|(f, _)| f), Some(frame));
        }
        Err(_) => {}
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn delta_frames_round_trip(delta in any_delta()) {
        round_trip(&Frame::V1(FrameV1::Delta(delta.clone())))?;
        // Interning through `Delta::build` resolves to the same entries.
        let rows: Vec<(Sku, WriterId, PnEntry)> = delta.entries().map(|(k, w, e)| (k.clone(), w.clone(), e)).collect();
        let rebuilt = Delta::build(delta.after, delta.upto, rows.iter().map(|(k, w, e)| (k, w, *e)));
        let resolved: Vec<_> = rebuilt.entries().map(|(k, w, e)| (k.clone(), w.clone(), e)).collect();
        prop_assert_eq!(resolved, rows);
        prop_assert!(rebuilt.writers.len() <= delta.writers.len());
        round_trip(&Frame::V1(FrameV1::Delta(rebuilt)))?;
    }

    #[test]
    fn journal_frames_round_trip(events in prop::collection::vec(any_event(), 0..12), (after, upto) in range()) {
        round_trip(&Frame::V1(FrameV1::Journal(JournalBatch { after, upto, events })))?;
    }

    #[test]
    fn decoding_garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        decode_is_total(&bytes)?;
        let _ = wire::decode_body(&bytes);
        // With a correct length prefix the garbage reaches the deserializer.
        let mut framed = (bytes.len() as u32).to_be_bytes().to_vec();
        framed.extend_from_slice(&bytes);
        decode_is_total(&framed)?;
        if bytes.is_empty() {
            prop_assert_eq!(wire::decode(&framed), Err(CodecError::Empty));
        }
    }

    /// Damaged real frames: flipped, truncated or extended bodies behind a fitting length prefix.
    #[test]
    fn decoding_damaged_frames_never_panics(
        delta in any_delta(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
        tail in prop::collection::vec(any::<u8>(), 0..8),
    ) {
        let bytes = wire::encode(&Frame::V1(FrameV1::Delta(delta))).unwrap();
        let mut body = bytes[4..].to_vec();
        for (at, x) in &flips {
            let i = at.index(body.len());
            body[i] ^= x;
        }
        body.truncate(cut.index(body.len() + 1));
        body.extend_from_slice(&tail);
        let mut framed = (body.len() as u32).to_be_bytes().to_vec();
        framed.extend_from_slice(&body);
        decode_is_total(&framed)?;
    }
}

#[test]
fn decode_refuses_oversized_and_broken_frames() {
    // The length prefix alone refuses an oversized frame: no need to wait for its bytes.
    let huge = ((wire::FRAME_MAX_BYTES + 1) as u32).to_be_bytes();
    assert!(matches!(wire::decode(&huge), Err(CodecError::TooLarge { .. })));
    // An entry naming a writer the table does not have is refused, not resolved out of bounds.
    let k = sku(0);
    let mut delta = Delta::build(0, 1, [(&k, &writer(1), PnEntry { p: 1, n: 0 })]);
    delta.entries[0].writer = 1;
    let mut raw = postcard::to_stdvec(&Frame::V1(FrameV1::Delta(delta))).unwrap();
    let mut framed = (raw.len() as u32).to_be_bytes().to_vec();
    framed.append(&mut raw);
    assert!(matches!(wire::decode(&framed), Err(CodecError::Limit(_))));
    // Trailing bytes inside a frame are an error.
    let mut body = postcard::to_stdvec(&Frame::V1(FrameV1::Resync)).unwrap();
    body.push(0);
    assert!(matches!(wire::decode_body(&body), Err(CodecError::Malformed(_))));
}
