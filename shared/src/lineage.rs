//! Writer lineage: which history a writer's counter entries summarise, so that a database restored
//! from old files or copied to a second machine can never silently reuse its writer.
//!
//! A PN-counter entry (p, n) is only ever raised by its writer, and replicas merge by max. That is
//! sound while each writer has one history. Put back an old copy of a store's files, or start a
//! second copy, and the same writer now has two histories that both grow from a common prefix:
//! max-merge keeps the larger of the two and silently drops the other's sales. To notice, every
//! change a writer makes gets an *ordinal* (1, 2, 3, …) and a *chain* value, a hash over the
//! previous chain value and the change, so equal chains at an ordinal mean equal histories up to
//! there. Deltas carry the writer's [`Checkpoint`] (ordinal and chain at the delta's end); the hub
//! keeps the latest and a few older ones. On connect the agent checks the hub's checkpoints
//! against its own history ([`judge`]): if the hub has merged a history that is not a prefix of
//! the agent's, the two forked, and the agent moves its changes after the fork point to a fresh
//! writer before it ships anything.
//!
//! Where the fork happened is known exactly when a copy was *started* from the files (a restore,
//! a clone): every start of the agent records a [`Boot`] (a random id and the checkpoint it
//! started at), and a fork lies at the first boot of this copy that the hub never heard of. A fork inside a running process
//! (a VM resumed from a memory snapshot) has no boot to mark it; then the fork point falls back to
//! the last checkpoint both sides share, and the changes between that and the next checkpoint the
//! hub holds are reported as ambiguous.
//!
//! Pure functions only: the host looks up its own chain values and passes them in.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::id::{Incarnation, Sku, WriterId};

/// A chain value: the first 16 bytes of SHA-256 over the previous value and one change.
pub type Chain = [u8; 16];

/// The chain value before a writer's first change.
pub const GENESIS: Chain = [0; 16];

/// Most checkpoints a `Welcome` carries, and the hub keeps, per writer.
pub const CHECKPOINTS_MAX: usize = 64;

/// Most boot checkpoints an agent reports at once.
pub const BOOTS_MAX: usize = 32;

/// A writer's history up to `ordinal` changes, summarised by `chain`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Checkpoint {
    /// How many changes the writer had made.
    pub ordinal: u64,
    /// The chain value after the last of them.
    pub chain: Chain,
}

impl Checkpoint {
    /// No changes yet.
    pub const ZERO: Checkpoint = Checkpoint { ordinal: 0, chain: GENESIS };

    /// The checkpoint after one more change.
    pub fn next(&self, id: &Uuid, line: u32, sku: &Sku, delta: i64) -> Checkpoint {
        Checkpoint { ordinal: self.ordinal + 1, chain: extend(&self.chain, id, line, sku, delta) }
    }
}

/// The chain value after `prev` and one change (the journal event's id and line, SKU and delta).
pub fn extend(prev: &Chain, id: &Uuid, line: u32, sku: &Sku, delta: i64) -> Chain {
    let mut h = Sha256::new();
    h.update(b"shelfsync-lineage-v1");
    h.update(prev);
    h.update(id.as_bytes());
    h.update(line.to_be_bytes());
    h.update((sku.as_str().len() as u32).to_be_bytes());
    h.update(sku.as_str().as_bytes());
    h.update(delta.to_be_bytes());
    let full = h.finalize();
    let mut out = [0u8; 16];
    out.copy_from_slice(&full[..16]);
    out
}

/// A start of the agent on its files: a random id and where the writer's history stood.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Boot {
    /// Drawn at random at every start, so two copies started from the same files differ.
    pub id: u64,
    /// The writer's history at the start.
    pub at: Checkpoint,
}

/// What the hub knows of a writer's history: the latest checkpoint it merged and some older ones
/// (boots the writer reported, earlier deltas), all on the history the hub merged.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HubLineage {
    /// The latest checkpoint merged (`ZERO` if none).
    pub head: Checkpoint,
    /// Older checkpoints on the same history, at most [`CHECKPOINTS_MAX`].
    pub points: Vec<Checkpoint>,
    /// Boots of copies whose data the hub merged, at most [`CHECKPOINTS_MAX`]; their checkpoints
    /// are among `points` (or the head).
    pub boots: Vec<Boot>,
    /// The latest starts (at most [`BOOTS_MAX`], oldest first) of the copy whose delta set the
    /// head: which starts that history shares with ours tells where the two parted.
    #[serde(default)]
    pub head_boots: Vec<Boot>,
}

impl HubLineage {
    /// Records a newer head (from a copy whose latest starts are `pusher_boots`) and the boots
    /// that came with it, keeping the newest points.
    pub fn advance(&mut self, head: Checkpoint, boots: &[Boot], pusher_boots: &[Boot]) {
        if head.ordinal >= self.head.ordinal {
            if self.head.ordinal > 0 {
                self.points.push(self.head);
            }
            self.head = head;
            self.head_boots = pusher_boots.iter().rev().take(BOOTS_MAX).rev().copied().collect();
        }
        for b in boots.iter().filter(|b| b.at.ordinal <= self.head.ordinal) {
            if b.at.ordinal > 0 {
                self.points.push(b.at);
            }
            self.boots.push(*b);
        }
        self.points.sort();
        self.points.dedup();
        self.points.retain(|p| *p != self.head);
        if self.points.len() > CHECKPOINTS_MAX {
            // Keep a spread: always the oldest few (close to where old copies fork) and the newest.
            let drop = self.points.len() - CHECKPOINTS_MAX;
            self.points.drain(8..8 + drop);
        }
        self.boots.sort_by_key(|b| (b.at.ordinal, b.id));
        self.boots.dedup();
        let skip = self.boots.len().saturating_sub(CHECKPOINTS_MAX);
        self.boots.drain(..skip);
    }
}

impl HubLineage {}

/// Why a writer must be retired.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RetireReason {
    /// The hub has merged changes of this writer that this database does not have: its files
    /// were put back from an older copy, or another copy of them ran on.
    RolledBack,
}

impl RetireReason {
    /// The snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            RetireReason::RolledBack => "rolled_back",
        }
    }
}

/// The outcome of [`judge`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// This history extends what the hub merged: keep the writer.
    Continue,
    /// Retire the writer: changes with ordinal above `at` were made only by this copy and move to
    /// a fresh writer; up to `at` this copy and the hub's history agree.
    Fork {
        /// The last ordinal both histories share.
        at: u64,
        /// How many of this copy's changes after `at` might also be in the hub's history (0 when
        /// a boot or a shared checkpoint pins the fork exactly).
        ambiguous: u64,
        /// Why.
        reason: RetireReason,
    },
}

/// The writer that takes over `old`'s changes after a fork at `at`, the first of them being
/// `first_moved` (event id and line). Derived, not drawn: a copy whose files are put back to a
/// time before it retired `old` makes the same decision again and must land on the same writer,
/// or the changes it moves a second time would be counted twice. Two copies that forked at the
/// same point have different first changes, so they get different writers. When nothing moves
/// there is nothing to count twice, and two copies retiring at the same point must not share a
/// writer: `fresh` (drawn by the caller) decides then.
pub fn successor(old: &WriterId, at: &Checkpoint, first_moved: Option<(Uuid, u32)>, fresh: u64) -> WriterId {
    let Some((id, line)) = first_moved else {
        return WriterId::new(old.node().clone(), Incarnation::from_u64(fresh));
    };
    let mut h = Sha256::new();
    h.update(b"shelfsync-successor-v1");
    h.update(old.to_string().as_bytes());
    h.update(at.ordinal.to_be_bytes());
    h.update(at.chain);
    h.update(id.as_bytes());
    h.update(line.to_be_bytes());
    let full = h.finalize();
    let mut n = [0u8; 8];
    n.copy_from_slice(&full[..8]);
    WriterId::new(old.node().clone(), Incarnation::from_u64(u64::from_be_bytes(n)))
}

/// Decides whether a writer whose own history has head `own` (and chain values `own_chain(k)` for
/// every `k ≤ own.ordinal`, and `own_boots`) may keep writing, given what the hub merged (`hub`).
pub fn judge(
    own: Checkpoint,
    own_chain: impl Fn(u64) -> Option<Chain>,
    own_boots: &[Boot],
    hub: &HubLineage,
) -> Verdict {
    let matches =
        |p: &Checkpoint| p.ordinal == 0 || (p.ordinal <= own.ordinal && own_chain(p.ordinal) == Some(p.chain));
    let extends = matches(&hub.head);
    if extends {
        return Verdict::Continue;
    }
    let reason = RetireReason::RolledBack;
    let points = hub.points.iter().chain(std::iter::once(&hub.head));
    let lo = points.clone().filter(|p| matches(p)).map(|p| p.ordinal).max().unwrap_or(0);
    // The first point above `lo` is where the histories are known to differ (or the hub is ahead).
    let hi = points.filter(|p| p.ordinal > lo).map(|p| p.ordinal).min().unwrap_or(u64::MAX);
    // The other history is the one the hub merged; it kept its pusher's starts. The first start
    // only one of the two has is where a copy of the files was made (every copy starts there):
    // up to it both hold the same history, after it each its own. (A start older than what the
    // other side still lists proves nothing.)
    let other: &[Boot] = &hub.head_boots;
    if !other.is_empty() {
        let horizon = |list: &[Boot]| if list.len() >= BOOTS_MAX { list[0].at.ordinal } else { 0 };
        let (theirs_from, ours_from) = (horizon(other), horizon(own_boots));
        let in_other = |b: &Boot| other.iter().any(|o| o.id == b.id);
        let in_ours = |o: &Boot| own_boots.iter().any(|b| b.id == o.id);
        let parted = own_boots
            .iter()
            .filter(|b| !in_other(b) && b.at.ordinal >= theirs_from)
            .chain(other.iter().filter(|o| !in_ours(o) && o.at.ordinal >= ours_from))
            .map(|b| b.at.ordinal)
            .min();
        if let Some(parted) = parted {
            // What the hub merged of ours up to `lo` stays; nothing past where the histories
            // are known to differ (`hi`) can be shared.
            let at = lo.max(parted).min(hi.saturating_sub(1)).min(own.ordinal);
            return Verdict::Fork { at, ambiguous: 0, reason };
        }
    }
    // Another copy was started from the files at `lo` (a boot the hub knows and we do not):
    // everything we did after it is ours alone.
    let split_there = hub.boots.iter().any(|h| h.at.ordinal == lo && !own_boots.iter().any(|b| b.id == h.id));
    if split_there {
        return Verdict::Fork { at: lo, ambiguous: 0, reason };
    }
    // A start of ours the hub never heard of, where the histories may part: this copy was
    // started from files there, so everything after it is ours alone.
    let known = |b: &Boot| hub.boots.iter().any(|h| h.id == b.id);
    let ours = own_boots
        .iter()
        .filter(|b| !known(b) && b.at.ordinal >= lo && b.at.ordinal < hi && b.at.ordinal <= own.ordinal);
    if let Some(at) = ours.map(|b| b.at.ordinal).min() {
        return Verdict::Fork { at, ambiguous: 0, reason };
    }
    let ambiguous = own.ordinal.min(hi.saturating_sub(1)).saturating_sub(lo);
    Verdict::Fork { at: lo, ambiguous, reason }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A history of `n` changes with a distinguishing `tag`, after `prefix`.
    fn history(prefix: &[Checkpoint], n: u64, tag: u128) -> Vec<Checkpoint> {
        let mut out = prefix.to_vec();
        let sku: Sku = "A".parse().unwrap();
        for i in 0..n {
            let last = out.last().copied().unwrap_or(Checkpoint::ZERO);
            out.push(last.next(&Uuid::from_u128(tag * 1_000_000 + i as u128), 0, &sku, -1));
        }
        out
    }

    fn own_of(h: &[Checkpoint]) -> (Checkpoint, impl Fn(u64) -> Option<Chain> + '_) {
        let head = h.last().copied().unwrap_or(Checkpoint::ZERO);
        (head, move |k: u64| if k == 0 { Some(GENESIS) } else { h.get(k as usize - 1).map(|c| c.chain) })
    }

    /// What the hub knows after deltas ending at `deltas` and the final one at `upto`, with boots
    /// reported at `boots` (ids 1000 + ordinal: never ours).
    fn hub_of(h: &[Checkpoint], upto: usize, deltas: &[usize], boots: &[usize]) -> HubLineage {
        let mut l = HubLineage::default();
        for &d in deltas {
            l.advance(h[d - 1], &[], &[]);
        }
        let boots: Vec<_> = boots.iter().map(|&i| Boot { id: 1000 + i as u64, at: h[i - 1] }).collect();
        l.advance(h[upto - 1], &boots, &[]);
        l
    }

    /// Our boots at these ordinals (ids = ordinal: differ from the hub's).
    fn boots_at(h: &[Checkpoint], at: &[u64]) -> Vec<Boot> {
        at.iter().map(|&o| Boot { id: o, at: if o == 0 { Checkpoint::ZERO } else { h[o as usize - 1] } }).collect()
    }

    #[test]
    fn a_history_that_extends_the_hubs_continues() {
        let h = history(&[], 10, 1);
        let (own, chain) = own_of(&h);
        assert_eq!(judge(own, &chain, &[], &hub_of(&h, 7, &[3], &[])), Verdict::Continue);
        assert_eq!(judge(own, &chain, &[], &HubLineage::default()), Verdict::Continue);
    }

    #[test]
    fn a_restored_copy_forks_at_its_boot() {
        // Common prefix of 5; the original went on to 9 and synced; the restored copy booted at 5
        // and sold 3 more.
        let prefix = history(&[], 5, 1);
        let original = history(&prefix, 4, 2);
        let copy = history(&prefix, 3, 3);
        let (own, chain) = own_of(&copy);
        let hub = hub_of(&original, 9, &[], &[2]);
        // Our boot at 2 is the one the hub knows (same id); the one at 5 is new.
        let boots = [Boot { id: 1002, at: copy[1] }, Boot { id: 5, at: copy[4] }];
        assert_eq!(
            judge(own, &chain, &boots, &hub),
            Verdict::Fork { at: 5, ambiguous: 0, reason: RetireReason::RolledBack }
        );
        // Rolled back with nothing new: everything up to the boot is shared, nothing moves.
        let (own, chain) = own_of(&prefix);
        assert_eq!(
            judge(own, &chain, &boots, &hub),
            Verdict::Fork { at: 5, ambiguous: 0, reason: RetireReason::RolledBack }
        );
    }

    #[test]
    fn the_original_of_a_clone_forks_at_the_clones_boot() {
        // The clone booted at 5, reached the hub first (reporting that boot) and went on to 8;
        // the original never restarted and sold 2 more.
        let prefix = history(&[], 5, 1);
        let clone = history(&prefix, 3, 2);
        let original = history(&prefix, 2, 3);
        let (own, chain) = own_of(&original);
        let hub = hub_of(&clone, 8, &[], &[5]);
        assert_eq!(
            judge(own, &chain, &boots_at(&original, &[1]), &hub),
            Verdict::Fork { at: 5, ambiguous: 0, reason: RetireReason::RolledBack }
        );
    }

    /// A copy started from the very first files (nothing written yet) forks at 0, and shared
    /// starts at the same ordinal do not confuse it.
    /// The clone reached the hub first; the original restarted after the copy was taken. Its
    /// restart is no fork point: the clone's start is.
    #[test]
    fn a_restart_after_the_split_is_not_the_fork() {
        let prefix = history(&[], 10, 1);
        let clone = history(&prefix, 5, 2);
        let original = history(&prefix, 6, 3);
        let (own, chain) = own_of(&original);
        let hub = hub_of(&clone, 15, &[], &[10]);
        assert_eq!(
            judge(own, &chain, &boots_at(&original, &[13]), &hub),
            Verdict::Fork { at: 10, ambiguous: 0, reason: RetireReason::RolledBack }
        );
    }

    /// A clone started at 6 and reported it; the original then went on past the clone's head and
    /// pushed; the clone restarted at 8. Its restart is no fork point: it parted from the
    /// original (whose starts the hub kept with its head) at 6.
    #[test]
    fn a_copy_parts_from_the_pusher_of_the_hubs_head_where_their_starts_part() {
        let prefix = history(&[], 6, 1);
        let original = history(&prefix, 5, 2);
        let clone = history(&prefix, 4, 3);
        let (own, chain) = own_of(&clone);
        let start = Boot { id: 1, at: Checkpoint::ZERO };
        let clone_start = Boot { id: 2, at: prefix[5] };
        let mut hub = HubLineage::default();
        hub.advance(prefix[5], &[clone_start], &[start, clone_start]); // the clone pushed 6
        hub.advance(original[10], &[], &[start]); // the original pushed 11
        let boots = [start, clone_start, Boot { id: 3, at: clone[7] }];
        assert_eq!(
            judge(own, &chain, &boots, &hub),
            Verdict::Fork { at: 6, ambiguous: 0, reason: RetireReason::RolledBack }
        );
    }

    #[test]
    fn boots_are_told_apart_by_id() {
        let prefix = history(&[], 4, 1);
        let original = history(&prefix, 3, 2);
        let copy = history(&prefix, 2, 3);
        let (own, chain) = own_of(&copy);
        // The original restarted at 4 twice and reported it; the copy has those two boots (it
        // is a copy of the files) and one of its own at 4.
        let shared = [Boot { id: 77, at: prefix[3] }, Boot { id: 78, at: prefix[3] }];
        let mut hub = HubLineage::default();
        hub.advance(original[6], &shared, &[]);
        let mut boots = shared.to_vec();
        boots.push(Boot { id: 79, at: prefix[3] });
        assert_eq!(
            judge(own, &chain, &boots, &hub),
            Verdict::Fork { at: 4, ambiguous: 0, reason: RetireReason::RolledBack }
        );
        // Started from empty files: everything is ours.
        let fresh = history(&[], 3, 4);
        let (own, chain) = own_of(&fresh);
        assert_eq!(
            judge(own, &chain, &[Boot { id: 5, at: Checkpoint::ZERO }], &hub),
            Verdict::Fork { at: 0, ambiguous: 0, reason: RetireReason::RolledBack }
        );
    }

    #[test]
    fn without_a_boot_the_fork_falls_back_to_the_last_shared_point() {
        let prefix = history(&[], 5, 1);
        let a = history(&prefix, 4, 2);
        let b = history(&prefix, 6, 3);
        let (own, chain) = own_of(&b);
        // The hub has checkpoints at 3 (a delta, shared) and 9 (a's head).
        let hub = hub_of(&a, 9, &[3], &[]);
        // b's changes 4..=8 could be a's too as far as anyone can tell (4 and 5 are).
        assert_eq!(
            judge(own, &chain, &[], &hub),
            Verdict::Fork { at: 3, ambiguous: 5, reason: RetireReason::RolledBack }
        );
        // Had a copy been started at 3 (a boot the hub knows, not ours), nothing is ambiguous.
        let hub = hub_of(&a, 9, &[], &[3]);
        assert_eq!(
            judge(own, &chain, &[], &hub),
            Verdict::Fork { at: 3, ambiguous: 0, reason: RetireReason::RolledBack }
        );
    }

    /// Any two histories with a common prefix: the fork point is never past the prefix, and with a
    /// boot at the split it is exactly the prefix.
    #[test]
    fn the_fork_point_never_passes_the_shared_prefix() {
        for p in 0..6u64 {
            for (na, nb) in [(0, 3), (3, 0), (2, 2), (5, 1)] {
                let prefix = history(&[], p, 1);
                let a = history(&prefix, na, 2);
                let b = history(&prefix, nb, 3);
                if na == 0 {
                    continue; // b extends a: nothing forked
                }
                let (own, chain) = own_of(&b);
                let hub = hub_of(&a, a.len(), &[], &[]);
                match judge(own, &chain, &boots_at(&b, &[p]), &hub) {
                    Verdict::Fork { at, ambiguous: 0, .. } if p > 0 => assert_eq!(at, p),
                    Verdict::Fork { at, .. } => assert!(at <= p),
                    Verdict::Continue => panic!("b ({nb} after {p}) does not extend a ({na} after {p})"),
                }
            }
        }
    }

    #[test]
    fn successors_are_derived() {
        let store: crate::id::StoreId = "s1".parse().unwrap();
        let w = WriterId::new(crate::id::NodeId::Store(store.clone()), Incarnation::from_u64(7));
        let h = history(&[], 3, 1);
        let a = successor(&w, &h[1], Some((Uuid::from_u128(5), 0)), 1);
        assert_eq!(a, successor(&w, &h[1], Some((Uuid::from_u128(5), 0)), 2), "the same decision, the same writer");
        assert!(a.is_store(&store));
        assert_ne!(a, w);
        assert_ne!(a, successor(&w, &h[1], Some((Uuid::from_u128(6), 0)), 1), "another branch");
        assert_ne!(a, successor(&w, &h[2], Some((Uuid::from_u128(5), 0)), 1), "another fork point");
        assert_ne!(successor(&w, &h[1], None, 1), successor(&w, &h[1], None, 2), "nothing moved: drawn");
    }

    #[test]
    fn advance_keeps_points_bounded_and_sorted() {
        let h = history(&[], 500, 1);
        let mut l = HubLineage::default();
        for (i, c) in h.iter().enumerate() {
            let boots = if i % 3 == 0 { vec![Boot { id: i as u64, at: h[i / 2] }] } else { vec![] };
            l.advance(*c, &boots, &[]);
        }
        assert_eq!(l.head, h[499]);
        assert!(l.points.len() <= CHECKPOINTS_MAX);
        assert!(l.points.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(l.points[0], h[0], "the oldest points are kept");
        // An older head does not move it back.
        l.advance(h[10], &[], &[]);
        assert_eq!(l.head, h[499]);
    }
}
