//! Property tests of the PN-counter CRDT laws, of convergence under any delivery order with
//! duplication, loss-then-retransmission and reordering, and of the codec.

use std::collections::BTreeMap;

use proptest::prelude::*;
use shelfsync_shared::counter::{CounterMap, PnCounter, PnEntry};
use shelfsync_shared::wire::{self, Delta, Frame, FrameV1};
use shelfsync_shared::{Incarnation, NodeId, Sku, StoreId, WriterId};

fn writer(i: u8) -> WriterId {
    let store: StoreId = format!("s{}", i % 3).parse().unwrap();
    WriterId::new(NodeId::Store(store), Incarnation::from_u64(i as u64))
}

fn sku(i: u8) -> Sku {
    format!("K{i}").parse().unwrap()
}

/// A counter built from arbitrary (writer, delta) changes, each writer raising only its own entry.
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

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

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
    }

    #[test]
    fn merge_is_idempotent(a in ops(), b in ops()) {
        let (ca, cb) = (counter_from(&a), counter_from(&b));
        let mut once = ca.clone();
        once.merge(&cb, 100).unwrap();
        let mut twice = once.clone();
        let changed = twice.merge(&cb, 101).unwrap();
        prop_assert!(!changed, "a second merge changes nothing");
        prop_assert_eq!(state(&once), state(&twice));
        let mut self_merge = ca.clone();
        prop_assert!(!self_merge.merge(&ca, 102).unwrap());
    }

    /// Three or more replicas make local changes and ship `delta_since` in any interleaving, with
    /// deltas duplicated, lost (then re-sent from an older watermark) and reordered. After a final
    /// exchange every replica holds the same state, and each SKU's value is the sum of all the
    /// local changes made to it.
    #[test]
    fn replicas_converge_under_any_delivery(
        replicas in 3usize..6,
        script in prop::collection::vec((0u8..6, 0u8..6, 0u8..4, -20i32..20, 0u8..10), 1..120),
    ) {
        let mut maps: Vec<CounterMap> = (0..replicas).map(|_| CounterMap::new()).collect();
        let writers: Vec<WriterId> = (0..replicas as u8).map(writer).collect();
        // What replica `to` has certainly received from `from` (its watermark in `from`'s seq).
        let mut acked = vec![vec![0u64; replicas]; replicas];
        let mut in_flight: Vec<(usize, Vec<(Sku, WriterId, PnEntry)>)> = Vec::new();
        let mut truth: BTreeMap<Sku, i64> = BTreeMap::new();
        for (from, to, k, delta, action) in script {
            let (from, to) = (from as usize % replicas, to as usize % replicas);
            match action {
                0..=3 => {
                    if delta != 0 {
                        maps[from].apply(&sku(k), &writers[from], delta as i64).unwrap();
                        *truth.entry(sku(k)).or_default() += delta as i64;
                    }
                }
                4..=6 if from != to => {
                    // Ship everything changed since the last ack; the ack may be lost (then the
                    // next delta resends from the older watermark).
                    let d: Vec<_> = maps[from].delta_since(acked[to][from]).into_iter().map(|(_, s, w, e)| (s, w, e)).collect();
                    in_flight.push((to, d.clone()));
                    if action == 4 {
                        in_flight.push((to, d)); // duplicated
                    }
                    if action != 6 {
                        acked[to][from] = maps[from].head();
                    }
                }
                7 if !in_flight.is_empty() => {
                    // Deliver a random in-flight delta (reordering).
                    let idx = (k as usize + delta.unsigned_abs() as usize) % in_flight.len();
                    let (dst, d) = in_flight.swap_remove(idx);
                    maps[dst].merge(d.iter().map(|(s, w, e)| (s, w, *e))).unwrap();
                }
                8 if !in_flight.is_empty() => {
                    in_flight.swap_remove(k as usize % in_flight.len()); // lost
                }
                _ => {}
            }
        }
        // Heal: full exchange between every pair.
        for from in 0..replicas {
            let all: Vec<_> = maps[from].delta_since(0).into_iter().map(|(_, s, w, e)| (s, w, e)).collect();
            for (to, map) in maps.iter_mut().enumerate() {
                if to != from {
                    map.merge(all.iter().map(|(s, w, e)| (s, w, *e))).unwrap();
                }
            }
        }
        for m in &maps[1..] {
            prop_assert_eq!(m.state(), maps[0].state());
        }
        for (k, expected) in &truth {
            prop_assert_eq!(maps[0].value(k).unwrap(), *expected);
        }
    }

    #[test]
    fn delta_frames_round_trip(entries in prop::collection::vec((0u8..20, 0u8..6, any::<u32>(), any::<u32>()), 0..50), after in 0u64..1000, extra in 0u64..1000) {
        let rows: Vec<(Sku, WriterId, PnEntry)> =
            entries.iter().map(|(k, w, p, n)| (sku(*k), writer(*w), PnEntry { p: *p as u64, n: *n as u64 })).collect();
        let delta = Delta::build(after, after + extra, rows.iter().map(|(s, w, e)| (s, w, *e)));
        let frame = Frame::V1(FrameV1::Delta(delta.clone()));
        let bytes = wire::encode(&frame).unwrap();
        let (back, used) = wire::decode(&bytes).unwrap().unwrap();
        prop_assert_eq!(used, bytes.len());
        prop_assert_eq!(&back, &frame);
        let resolved: Vec<_> = delta.entries().map(|(s, w, e)| (s.clone(), w.clone(), e)).collect();
        prop_assert_eq!(resolved, rows);
    }

    #[test]
    fn decoding_garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = wire::decode(&bytes);
        let _ = wire::decode_body(&bytes);
    }
}
