//! The PN-counter CRDT that holds every store's on-hand stock, and the digest that compares replicas.
//!
//! A counter is a map writer → (p, n). Only a writer raises its own entry; everyone else learns it
//! by merge, which takes the entry-wise maximum. Merge is therefore commutative, associative and
//! idempotent: deltas may arrive late, twice or out of order and every replica still converges.
//! Each entry remembers the replica-local sequence number of its last change, so a replica can
//! ship "everything changed since the peer's ack" instead of its whole state.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::id::{Sku, WriterId};

/// Largest value either half of an entry may reach: SQLite stores integers as i64, and the sum
/// over writers must stay representable.
pub const ENTRY_COMPONENT_MAX: u64 = i64::MAX as u64;

/// Errors of counter arithmetic. Nothing wraps: an operation that would overflow is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[allow(missing_docs)] // each variant is documented by its #[error] text
pub enum CounterError {
    #[error("change of {delta} would overflow the {half} half of writer {writer}'s entry")]
    EntryOverflow { writer: WriterId, half: &'static str, delta: i64 },
    #[error("entry of writer {writer} has a component above {max}")]
    EntryTooLarge { writer: WriterId, max: u64 },
    #[error("counter value is outside the i64 range")]
    ValueOverflow,
}

/// One writer's contribution: everything it ever added (`p`) and removed (`n`).
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub struct PnEntry {
    /// Units ever added by this writer.
    pub p: u64,
    /// Units ever removed by this writer.
    pub n: u64,
}

impl PnEntry {
    /// The least upper bound of two entries (component-wise max).
    pub fn join(self, other: PnEntry) -> PnEntry {
        PnEntry { p: self.p.max(other.p), n: self.n.max(other.n) }
    }

    /// Whether `self` already contains everything `other` knows.
    pub fn covers(self, other: PnEntry) -> bool {
        self.p >= other.p && self.n >= other.n
    }

    /// `p − n` without overflow.
    pub fn value(self) -> i128 {
        self.p as i128 - self.n as i128
    }

    /// This entry after the writer applied `delta` locally.
    pub fn apply(self, writer: &WriterId, delta: i64) -> Result<PnEntry, CounterError> {
        let mut next = self;
        let (half, slot) = if delta >= 0 { ("p", &mut next.p) } else { ("n", &mut next.n) };
        *slot = slot
            .checked_add(delta.unsigned_abs())
            .filter(|v| *v <= ENTRY_COMPONENT_MAX)
            .ok_or_else(|| CounterError::EntryOverflow { writer: writer.clone(), half, delta })?;
        Ok(next)
    }

    /// Refuses entries no honest writer can have produced.
    pub fn check(self, writer: &WriterId) -> Result<(), CounterError> {
        if self.p > ENTRY_COMPONENT_MAX || self.n > ENTRY_COMPONENT_MAX {
            return Err(CounterError::EntryTooLarge { writer: writer.clone(), max: ENTRY_COMPONENT_MAX });
        }
        Ok(())
    }
}

/// Sums entries into a signed value, refusing (not wrapping) a result outside i64.
pub fn sum_entries<'a>(entries: impl IntoIterator<Item = &'a PnEntry>) -> Result<i64, CounterError> {
    let mut total: i128 = 0;
    for e in entries {
        total = total.checked_add(e.value()).ok_or(CounterError::ValueOverflow)?;
    }
    i64::try_from(total).map_err(|_| CounterError::ValueOverflow)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Slot {
    entry: PnEntry,
    seq: u64,
}

/// A delta-state PN-counter: per-writer entries, each stamped with the replica-local sequence
/// number of its last change. The caller supplies sequence numbers so that many counters of one
/// replica can share one sequence (the sync watermark).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PnCounter {
    slots: BTreeMap<WriterId, Slot>,
}

impl PnCounter {
    /// An empty counter (value 0).
    pub fn new() -> Self {
        Self::default()
    }

    /// `writer` changes the value by `delta` locally; the entry is stamped with `seq`.
    /// Returns the writer's new entry, which is also the delta to ship.
    /// A zero change changes nothing (no entry, no sequence).
    pub fn apply(&mut self, writer: &WriterId, delta: i64, seq: u64) -> Result<PnEntry, CounterError> {
        let current = self.slots.get(writer).map(|s| s.entry).unwrap_or_default();
        if delta == 0 {
            return Ok(current);
        }
        let entry = current.apply(writer, delta)?;
        self.slots.insert(writer.clone(), Slot { entry, seq });
        Ok(entry)
    }

    /// Merges one remote entry. Returns whether anything changed; only a change takes `seq`.
    pub fn merge_entry(&mut self, writer: &WriterId, entry: PnEntry, seq: u64) -> Result<bool, CounterError> {
        entry.check(writer)?;
        match self.slots.get_mut(writer) {
            Some(slot) if slot.entry.covers(entry) => Ok(false),
            Some(slot) => {
                slot.entry = slot.entry.join(entry);
                slot.seq = seq;
                Ok(true)
            }
            None if entry == PnEntry::default() => Ok(false),
            None => {
                self.slots.insert(writer.clone(), Slot { entry, seq });
                Ok(true)
            }
        }
    }

    /// Merges a whole remote counter (state-based merge). Returns whether anything changed.
    pub fn merge(&mut self, other: &PnCounter, seq: u64) -> Result<bool, CounterError> {
        let mut changed = false;
        for (writer, slot) in &other.slots {
            changed |= self.merge_entry(writer, slot.entry, seq)?;
        }
        Ok(changed)
    }

    /// Entries changed after local sequence `since`, in writer order.
    pub fn delta_since(&self, since: u64) -> Vec<(WriterId, PnEntry)> {
        self.slots.iter().filter(|(_, s)| s.seq > since).map(|(w, s)| (w.clone(), s.entry)).collect()
    }

    /// Σp − Σn.
    pub fn value(&self) -> Result<i64, CounterError> {
        sum_entries(self.slots.values().map(|s| &s.entry))
    }

    /// The entry of one writer (zero if it never wrote).
    pub fn entry(&self, writer: &WriterId) -> PnEntry {
        self.slots.get(writer).map(|s| s.entry).unwrap_or_default()
    }

    /// All entries with their sequence numbers.
    pub fn entries(&self) -> impl Iterator<Item = (&WriterId, PnEntry, u64)> {
        self.slots.iter().map(|(w, s)| (w, s.entry, s.seq))
    }

    /// Whether no writer ever wrote.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

/// An order-independent fingerprint of a set of counter entries: the count and the wrapping sum
/// of a per-entry hash. Two replicas holding the same entries have the same digest whatever order
/// they learnt them in, and the digest can be kept up to date entry by entry.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub struct StateDigest {
    /// Number of entries.
    pub count: u64,
    /// Wrapping sum of the first 128 bits of SHA-256 over each entry's canonical bytes.
    pub hash: u128,
}

impl StateDigest {
    fn entry_hash(sku: &Sku, writer: &WriterId, entry: PnEntry) -> u128 {
        let mut h = Sha256::new();
        h.update(sku.as_str().as_bytes());
        h.update([0u8]);
        h.update(writer.to_string().as_bytes());
        h.update([0u8]);
        h.update(entry.p.to_be_bytes());
        h.update(entry.n.to_be_bytes());
        let out = h.finalize();
        let mut first = [0u8; 16];
        first.copy_from_slice(&out[..16]);
        u128::from_be_bytes(first)
    }

    /// Adds one entry.
    pub fn add(&mut self, sku: &Sku, writer: &WriterId, entry: PnEntry) {
        self.count += 1;
        self.hash = self.hash.wrapping_add(Self::entry_hash(sku, writer, entry));
    }

    /// Removes an entry added before (used when an entry changes: remove old, add new).
    pub fn remove(&mut self, sku: &Sku, writer: &WriterId, entry: PnEntry) {
        self.count = self.count.wrapping_sub(1);
        self.hash = self.hash.wrapping_sub(Self::entry_hash(sku, writer, entry));
    }

    /// Adds the entries of another digest (of disjoint entries: another partition's SKUs).
    pub fn absorb(&mut self, other: StateDigest) {
        self.count = self.count.wrapping_add(other.count);
        self.hash = self.hash.wrapping_add(other.hash);
    }
}

/// Many counters of one replica sharing one sequence, keyed by SKU: the in-memory model of a
/// store's stock (the agent and hub keep the same shape in SQLite). Used by tests and simulators.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CounterMap {
    seq: u64,
    counters: BTreeMap<Sku, PnCounter>,
}

impl CounterMap {
    /// Empty.
    pub fn new() -> Self {
        Self::default()
    }

    /// Highest sequence number handed out.
    pub fn head(&self) -> u64 {
        self.seq
    }

    /// A local change by `writer`; returns the new entry.
    pub fn apply(&mut self, sku: &Sku, writer: &WriterId, delta: i64) -> Result<PnEntry, CounterError> {
        if delta == 0 {
            return Ok(self.counters.get(sku).map(|c| c.entry(writer)).unwrap_or_default());
        }
        let counter = self.counters.entry(sku.clone()).or_default();
        let entry = counter.apply(writer, delta, self.seq + 1)?;
        self.seq += 1;
        Ok(entry)
    }

    /// Merges remote entries; each changed entry takes a fresh sequence number.
    /// Returns the number of entries that changed.
    pub fn merge<'a>(
        &mut self,
        entries: impl IntoIterator<Item = (&'a Sku, &'a WriterId, PnEntry)>,
    ) -> Result<usize, CounterError> {
        let mut changed = 0;
        for (sku, writer, entry) in entries {
            entry.check(writer)?;
            let counter = self.counters.entry(sku.clone()).or_default();
            if counter.merge_entry(writer, entry, self.seq + 1)? {
                self.seq += 1;
                changed += 1;
            }
        }
        Ok(changed)
    }

    /// Entries changed after `since`, ordered by their sequence number (so any prefix is a valid
    /// watermark), with that number.
    pub fn delta_since(&self, since: u64) -> Vec<(u64, Sku, WriterId, PnEntry)> {
        let mut out: Vec<_> = self
            .counters
            .iter()
            .flat_map(|(sku, c)| {
                c.entries()
                    .filter(move |(_, _, seq)| *seq > since)
                    .map(move |(w, e, seq)| (seq, sku.clone(), w.clone(), e))
            })
            .collect();
        out.sort_by_key(|(seq, ..)| *seq);
        out
    }

    /// The value of one SKU's counter.
    pub fn value(&self, sku: &Sku) -> Result<i64, CounterError> {
        self.counters.get(sku).map_or(Ok(0), |c| c.value())
    }

    /// The counter of one SKU, if any writer ever touched it.
    pub fn get(&self, sku: &Sku) -> Option<&PnCounter> {
        self.counters.get(sku)
    }

    /// All SKUs with a counter.
    pub fn skus(&self) -> impl Iterator<Item = &Sku> {
        self.counters.keys()
    }

    /// Digest over all entries.
    pub fn digest(&self) -> StateDigest {
        let mut d = StateDigest::default();
        for (sku, c) in &self.counters {
            for (w, e, _) in c.entries() {
                d.add(sku, w, e);
            }
        }
        d
    }

    /// Entries without sequence numbers, for comparing replicas.
    pub fn state(&self) -> BTreeMap<(Sku, WriterId), PnEntry> {
        self.counters
            .iter()
            .flat_map(|(sku, c)| c.entries().map(move |(w, e, _)| ((sku.clone(), w.clone()), e)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::{Incarnation, NodeId};

    fn w(n: u64) -> WriterId {
        WriterId::new(NodeId::Store("s".parse().unwrap()), Incarnation::from_u64(n))
    }

    #[test]
    fn apply_and_value() {
        let mut c = PnCounter::new();
        c.apply(&w(1), 5, 1).unwrap();
        c.apply(&w(1), -2, 2).unwrap();
        c.apply(&w(2), -7, 3).unwrap();
        assert_eq!(c.value().unwrap(), -4);
        assert_eq!(c.entry(&w(1)), PnEntry { p: 5, n: 2 });
        assert_eq!(c.delta_since(2), vec![(w(2), PnEntry { p: 0, n: 7 })]);
    }

    #[test]
    fn overflow_is_refused_not_wrapped() {
        let mut c = PnCounter::new();
        c.apply(&w(1), i64::MAX, 1).unwrap();
        let err = c.apply(&w(1), 1, 2).unwrap_err();
        assert!(matches!(err, CounterError::EntryOverflow { half: "p", .. }), "{err}");
        assert_eq!(c.value().unwrap(), i64::MAX);
        c.apply(&w(2), i64::MAX, 3).unwrap();
        assert_eq!(c.value(), Err(CounterError::ValueOverflow));
        let bad = PnEntry { p: u64::MAX, n: 0 };
        assert!(matches!(c.merge_entry(&w(3), bad, 4), Err(CounterError::EntryTooLarge { .. })));
    }

    #[test]
    fn merge_takes_max_and_only_stamps_changes() {
        let mut c = PnCounter::new();
        c.apply(&w(1), 3, 1).unwrap();
        assert!(!c.merge_entry(&w(1), PnEntry { p: 2, n: 0 }, 9).unwrap());
        assert_eq!(c.delta_since(1), vec![]);
        assert!(c.merge_entry(&w(1), PnEntry { p: 2, n: 4 }, 10).unwrap());
        assert_eq!(c.entry(&w(1)), PnEntry { p: 3, n: 4 });
        assert_eq!(c.delta_since(9).len(), 1);
    }

    #[test]
    fn digest_is_order_independent_and_incremental() {
        let sku: Sku = "A".parse().unwrap();
        let mut a = StateDigest::default();
        a.add(&sku, &w(1), PnEntry { p: 1, n: 0 });
        a.add(&sku, &w(2), PnEntry { p: 0, n: 1 });
        let mut b = StateDigest::default();
        b.add(&sku, &w(2), PnEntry { p: 0, n: 1 });
        b.add(&sku, &w(1), PnEntry { p: 1, n: 0 });
        assert_eq!(a, b);
        b.remove(&sku, &w(2), PnEntry { p: 0, n: 1 });
        b.add(&sku, &w(2), PnEntry { p: 0, n: 2 });
        assert_ne!(a, b);
        assert_eq!(b.count, 2);
    }
}
