//! The change feed's public cursor when the chain's SKUs are split into partitions
//! (`hub/docs/scale-out.md`, "Step 3, concretely" item 6).
//!
//! Each partition's decider numbers its own events 1, 2, 3... without gaps. A client's position
//! is one cursor per partition, handed out opaque: `p1.` and the base64url of the positions
//! (postcard). With one partition it stays the plain number it always was, and a plain number
//! given to a partitioned hub means "partition 0 at that cursor, the others from the start", so
//! a client of one partition keeps working. Resuming from any position, on any hub, yields
//! every later event of every partition once, each partition in its own order.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::feed::FeedEvent;
use crate::partition::{Partition, Partitions};

/// The largest cursor of one partition (what storage can hold).
pub const CURSOR_MAX: u64 = i64::MAX as u64;

/// The prefix of a cursor over several partitions (its format's version).
const PREFIX: &str = "p1.";

/// A position in the feed of every partition.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FeedPosition(Vec<u64>);

impl FeedPosition {
    /// Before every event.
    pub fn start(partitions: Partitions) -> FeedPosition {
        FeedPosition(vec![0; usize::from(partitions.count())])
    }

    /// Every partition at `cursors` (one each).
    pub fn of(cursors: Vec<u64>) -> Result<FeedPosition, String> {
        Partitions::new(u16::try_from(cursors.len()).unwrap_or(u16::MAX))?;
        match cursors.iter().find(|c| **c > CURSOR_MAX) {
            Some(c) => Err(format!("a cursor of {c} is more than {CURSOR_MAX}")),
            None => Ok(FeedPosition(cursors)),
        }
    }

    /// Reads a cursor a client was given by a hub whose feed has `partitions`. The message
    /// says what is wrong, for the API to return.
    pub fn parse(s: &str, partitions: Partitions) -> Result<FeedPosition, String> {
        let s = s.trim();
        if let Some(rest) = s.strip_prefix(PREFIX) {
            let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(rest)
                .map_err(|_| "a cursor that is not one this hub gave out (bad encoding)".to_owned())?;
            let cursors: Vec<u64> = postcard::from_bytes(&bytes)
                .map_err(|_| "a cursor that is not one this hub gave out (bad contents)".to_owned())?;
            if cursors.len() != usize::from(partitions.count()) {
                return Err(format!(
                    "a cursor of a feed with {} partitions; this hub's has {}",
                    cursors.len(),
                    partitions.count()
                ));
            }
            return FeedPosition::of(cursors);
        }
        match s.parse::<u64>() {
            Ok(c) if c <= CURSOR_MAX => {
                let mut p = FeedPosition::start(partitions);
                p.0[0] = c;
                Ok(p)
            }
            _ => Err(format!(
                "a change cursor is a whole number from 0 to {CURSOR_MAX}, or a cursor this hub gave out; got {:?}",
                s.chars().take(64).collect::<String>()
            )),
        }
    }

    /// The cursor to give a client: the plain number with one partition, else opaque.
    pub fn encode(&self) -> String {
        match self.0.as_slice() {
            [only] => only.to_string(),
            all => {
                let bytes = postcard::to_stdvec(all).expect("cursors serialise");
                format!("{PREFIX}{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
            }
        }
    }

    /// Where `partition` stands.
    pub fn get(&self, partition: Partition) -> u64 {
        self.0.get(usize::from(partition)).copied().unwrap_or(0)
    }

    /// Moves `partition` to `cursor` (never back).
    pub fn advance(&mut self, partition: Partition, cursor: u64) {
        if let Some(c) = self.0.get_mut(usize::from(partition)) {
            *c = (*c).max(cursor);
        }
    }

    /// How many partitions.
    pub fn partitions(&self) -> usize {
        self.0.len()
    }
}

/// A feed event as [`merge_feeds`] orders it.
pub trait Positioned {
    /// Its partition's cursor.
    fn cursor(&self) -> u64;
    /// When it was decided.
    fn at_ms(&self) -> i64;
}

impl Positioned for FeedEvent {
    fn cursor(&self) -> u64 {
        self.cursor
    }
    fn at_ms(&self) -> i64 {
        self.at_ms
    }
}

/// Merges the partitions' next events into one stream from `from`: `pages[p]` holds partition
/// `p`'s events after `from.get(p)`, ascending. Events come out by decision time (ties by
/// partition), each partition in its own order, at most `limit`, each with the position just
/// after it (what a client resumes from). Events at or before `from` are skipped.
pub fn merge_feeds<E: Positioned>(from: &FeedPosition, pages: Vec<Vec<E>>, limit: usize) -> Vec<(E, FeedPosition)> {
    let mut pos = from.clone();
    let mut heads: Vec<std::iter::Peekable<std::vec::IntoIter<E>>> =
        pages.into_iter().map(|p| p.into_iter().peekable()).collect();
    let mut out = Vec::new();
    while out.len() < limit {
        // Skip what the client has seen.
        for (p, h) in heads.iter_mut().enumerate() {
            let p = Partition::try_from(p).expect("at most Partitions::MAX");
            while h.peek().is_some_and(|e| e.cursor() <= pos.get(p)) {
                h.next();
            }
        }
        let next =
            heads.iter_mut().enumerate().filter_map(|(p, h)| h.peek().map(|e| (e.at_ms(), p))).min().map(|(_, p)| p);
        let Some(p) = next else { break };
        let event = heads[p].next().expect("peeked");
        pos.advance(Partition::try_from(p).expect("at most Partitions::MAX"), event.cursor());
        out.push((event, pos.clone()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Event `cursor` of partition `p` (its store names the partition).
    fn event(p: usize, cursor: u64, at_ms: i64) -> FeedEvent {
        FeedEvent {
            cursor,
            at_ms,
            kind: crate::FeedKind::LowStock,
            data: crate::FeedData::Alert {
                store: format!("s{p}").parse().unwrap(),
                sku: format!("S{cursor}").parse().unwrap(),
                available: cursor,
                low_stock_threshold: 1,
            },
        }
    }

    #[test]
    fn one_partition_keeps_the_plain_number() {
        let one = Partitions::ONE;
        let p = FeedPosition::parse("42", one).unwrap();
        assert_eq!((p.encode(), p.get(0)), ("42".to_owned(), 42));
        let two = FeedPosition::of(vec![1, 2]).unwrap().encode();
        assert!(FeedPosition::parse(&two, one).unwrap_err().contains("with 2 partitions; this hub's has 1"));
    }

    #[test]
    fn a_plain_number_on_a_partitioned_feed_is_partition_zero() {
        let p = FeedPosition::parse("7", Partitions::new(3).unwrap()).unwrap();
        assert_eq!((p.get(0), p.get(1), p.get(2)), (7, 0, 0));
        assert!(p.encode().starts_with("p1."), "{}", p.encode());
    }

    #[test]
    fn bad_cursors_say_what_is_wrong() {
        let three = Partitions::new(3).unwrap();
        for (bad, says) in [
            ("p1.***", "bad encoding"),
            ("p1.____", "bad contents"),
            ("-1", "a whole number from 0"),
            ("9223372036854775808", "a whole number from 0"),
            ("abc", "got \"abc\""),
        ] {
            let e = FeedPosition::parse(bad, three).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    proptest! {
        #[test]
        fn positions_round_trip(cursors in proptest::collection::vec(0..=CURSOR_MAX, 2..8)) {
            let parts = Partitions::new(cursors.len() as u16).unwrap();
            let p = FeedPosition::of(cursors).unwrap();
            prop_assert_eq!(FeedPosition::parse(&p.encode(), parts).unwrap(), p);
        }

        /// Resuming from the position after any event, by any reader, gives exactly the rest:
        /// every event once, each partition in its own order.
        #[test]
        fn resuming_anywhere_misses_and_repeats_nothing(
            sizes in proptest::collection::vec(0usize..12, 1..5),
            times in proptest::collection::vec(0i64..20, 60),
            limit in 1usize..7,
        ) {
            let parts = Partitions::new(sizes.len() as u16).unwrap();
            let mut t = times.into_iter().cycle();
            let feeds: Vec<Vec<FeedEvent>> = sizes
                .iter()
                .enumerate()
                .map(|(p, n)| {
                    let mut at = 0;
                    (1..=*n as u64).map(|c| { at += t.next().unwrap(); event(p, c, at) }).collect()
                })
                .collect();
            let page = |from: &FeedPosition| {
                let pages = feeds
                    .iter()
                    .enumerate()
                    .map(|(p, f)| f.iter().filter(|e| e.cursor > from.get(p as u16)).cloned().collect())
                    .collect();
                merge_feeds(from, pages, limit)
            };
            // Read it all in pages of `limit`, resuming from the encoded cursor each time.
            let mut from = FeedPosition::start(parts);
            let mut got: Vec<(usize, u64)> = Vec::new();
            loop {
                let batch = page(&from);
                if batch.is_empty() { break; }
                for (e, after) in &batch {
                    let crate::FeedData::Alert { store, .. } = &e.data else { unreachable!() };
                    let p: usize = store.as_str()[1..].parse().unwrap();
                    prop_assert_eq!(after.get(p as u16), e.cursor, "the position after an event is at it");
                    got.push((p, e.cursor));
                }
                from = FeedPosition::parse(&batch.last().unwrap().1.encode(), parts).unwrap();
            }
            let total: usize = sizes.iter().sum();
            prop_assert_eq!(got.len(), total, "every event once");
            for p in 0..sizes.len() {
                let mine: Vec<u64> = got.iter().filter(|(q, _)| *q == p).map(|(_, c)| *c).collect();
                prop_assert_eq!(mine, (1..=sizes[p] as u64).collect::<Vec<_>>(), "partition {} in order", p);
            }
        }
    }
}
