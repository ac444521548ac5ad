//! Records: rebuilding from the rows storage keeps, continuing the id sequence, determinism, the
//! feed's bounded tail.

mod common;

use common::*;
use shelfsync_hub_core::{Action, Command, Decider, FeedRead, LoadError, Loader, Record, StoreRecord};

/// A short history touching every kind of record.
fn scenario(h: &mut H) {
    h.stores(&["a", "b"]);
    h.catalog("X", Some(rule(1, 2, 5, true)));
    h.stock("a", "X", 6);
    h.stock("b", "X", 2);
    h.reserved(1, vec![line("X", 4)]);
    h.act(1, Action::Commit, Some("pay-1")).unwrap();
    h.restock(2, "b", vec![line("Y", 3)]).unwrap();
    h.advance(1000);
    h.stock("a", "X", 1);
    h.ok(Command::JournalSkus { store: s("a"), skus: vec![k("Z")] });
    h.ok(Command::CatalogChanged {
        items: vec![],
        overrides: Some((
            s("b"),
            vec![(
                k("X"),
                shelfsync_hub_core::Overrides {
                    safety_stock: Some(0),
                    low_stock_threshold: None,
                    escrow: Default::default(),
                },
            )],
        )),
    });
}

#[test]
fn the_rows_storage_keeps_rebuild_the_same_decider_which_mints_the_same_next_ids() {
    let mut h = H::new();
    scenario(&mut h);
    assert_eq!(h.reloaded().snapshot(), h.d.snapshot(), "from the rows");
    let rebuilt = h.rebuilt();
    assert_eq!(rebuilt.snapshot(), h.d.snapshot(), "from the history");
    // Continue both: same decisions, same ids.
    let mut other = H { d: rebuilt, now: h.now, agent: h.agent.clone(), records: Vec::new() };
    let before = h.records.len();
    for x in [&mut h, &mut other] {
        x.reserved(9, vec![line("X", 1)]);
        x.stock("b", "X", -1);
    }
    assert_eq!(other.records, h.records[before..]);
}

/// A warm standby: the rows as they stood at some point, then every record committed after, in
/// pieces, builds the live decider, at any split point; and records loaded twice change nothing.
#[test]
fn the_rows_of_a_moment_then_the_records_after_it_rebuild_the_live_decider() {
    let mut h = H::new();
    scenario(&mut h);
    let history = h.records.clone();
    for split in 0..=history.len() {
        let mut l = Loader::new(h.d.config().clone(), 42);
        l.load(rows(&history[..split])).unwrap();
        for piece in history[split..].chunks(3) {
            l.load(piece.iter().cloned()).unwrap();
        }
        assert_eq!(l.records(), rows(&history[..split]).len() + history.len() - split);
        assert_eq!(l.finish().snapshot(), h.d.snapshot(), "split at {split}");
    }
    // The same tail read twice (a standby's poll repeated).
    for from in 0..history.len() {
        let mut twice = Loader::new(h.d.config().clone(), 42);
        twice.load(history.iter().cloned()).unwrap();
        twice.load(history[from..].iter().cloned()).unwrap();
        assert_eq!(twice.finish().snapshot(), h.d.snapshot(), "the tail from {from} loaded twice");
    }
}

#[test]
fn a_rebuild_needs_the_stores_first() {
    let mut h = H::new();
    scenario(&mut h);
    let entries: Vec<Record> = h.records.iter().filter(|r| matches!(r, Record::Entry(_))).cloned().collect();
    let err = Decider::from_records(config(false), 42, entries).unwrap_err();
    assert!(matches!(err, LoadError::UnknownStore(_)));
    let store = Record::Store(StoreRecord {
        id: s("a"),
        added_at_ms: 0,
        revoked_at_ms: None,
        last_seen_ms: None,
        holds_version: 0,
    });
    assert!(Decider::from_records(config(false), 42, [store]).is_ok());
}

#[test]
fn same_seed_same_commands_same_records_other_seed_other_ids() {
    let (mut a, mut b) = (H::new(), H::new());
    scenario(&mut a);
    scenario(&mut b);
    assert_eq!(a.records, b.records);
    let mut c = H { d: Decider::new(config(false), 43), ..H::new() };
    scenario(&mut c);
    assert_ne!(a.records, c.records);
    assert_eq!(a.records.len(), c.records.len());
}

#[test]
fn the_feed_keeps_a_bounded_tail_and_says_when_to_read_storage() {
    let mut cfg = config(false);
    cfg.feed_retain = 3;
    let mut h = H::with(cfg.clone());
    h.stores(&["a"]);
    for n in 1..=5 {
        h.stock("a", "X", n);
    }
    assert_eq!(h.d.feed_head(), 5);
    assert_eq!(h.d.changes_after(1, 10), FeedRead::Evicted { oldest: 3 });
    let FeedRead::Events(e) = h.d.changes_after(2, 10) else { panic!() };
    assert_eq!(e.iter().map(|e| e.cursor).collect::<Vec<_>>(), [3, 4, 5]);
    let FeedRead::Events(e) = h.d.changes_after(3, 1) else { panic!() };
    assert_eq!(e[0].cursor, 4);
    assert_eq!(h.d.changes_after(5, 10), FeedRead::Events(vec![]));
    assert_eq!(h.d.changes_after(u64::MAX, 10), FeedRead::Events(vec![]));
    // Storage may hand back only the newest events.
    let newest: Vec<Record> =
        h.records.iter().filter(|r| !matches!(r, Record::Feed(e) if e.cursor < 4)).cloned().collect();
    let d = Decider::from_records(cfg, 42, newest).unwrap();
    assert_eq!(d.feed_head(), 5);
    assert_eq!(d.changes_after(2, 10), FeedRead::Evicted { oldest: 4 });
}
