//! The dashboard's overview: per-store figures, reservations by status, alerts, open conflicts
//! and the per-minute series read back from the feed.

mod common;

use std::collections::HashMap;

use common::*;
use shelfsync_hub_core::{Action, Command, OverviewQuery};

fn query(minutes: u32, acked: &[(&str, u64)]) -> OverviewQuery {
    OverviewQuery { minutes, acked: acked.iter().map(|(s_, a)| (s(s_), *a)).collect::<HashMap<_, _>>() }
}

#[test]
fn the_chain_at_a_glance() {
    let mut h = H::new();
    h.stores(&["a", "b", "gone"]);
    h.catalog("X", Some(rule(0, 5, 0, true)));
    h.now = T0 - T0 % 60_000; // a whole minute, so buckets are easy to name
    h.stock("a", "X", 10);
    h.advance(1_000);
    h.reserved(1, vec![line("X", 3)]);
    h.stock("a", "X", 8); // 2 sold
    h.advance(120_000);
    h.stock("a", "X", 5); // 3 sold: 5 − 3 held = 2 available, at the threshold: low
    h.restock(9, "b", vec![line("Y", 4)]).unwrap();
    h.stock("gone", "X", 7);
    h.ok(Command::RevokeStore { store: s("gone") });
    h.ok(Command::SetConnected { store: s("a"), connected: true });

    let o = h.d.overview(&query(5, &[]), h.now);
    assert_eq!(o.feed_head, h.d.feed_head());
    assert_eq!(o.skus, 2);
    let ids: Vec<String> = o.stores.iter().map(|x| x.id.to_string()).collect();
    assert_eq!(ids, ["a", "b", "gone"]);
    let a = &o.stores[0];
    assert!(a.connected && !a.revoked);
    assert_eq!((a.on_hand, a.held, a.available, a.low_stock, a.out_of_stock), (5, 3, 2, 1, 0));
    assert_eq!(a.unsynced_hub_changes, 0, "nothing from head office for a");
    let b = &o.stores[1];
    assert_eq!((b.on_hand, b.available, b.unsynced_hub_changes), (4, 4, 1), "the restock has not been acked");
    assert!(o.stores[2].revoked);
    assert_eq!((o.low_stock, o.out_of_stock), (1, 0), "a revoked store's cells are not counted");
    assert_eq!((o.reservations.held, o.reservations.units_held, o.reservations.short), (1, 3, 0));

    // The restock acked by b's agent: nothing waiting any more.
    let acked = h.d.counter_head();
    let o2 = h.d.overview(&query(5, &[("b", acked)]), h.now);
    assert_eq!(o2.stores[1].unsynced_hub_changes, 0);

    // Series: five whole minutes ending with the current one; sales where they happened.
    let sr = &o.series;
    assert_eq!((sr.buckets, sr.bucket_ms, sr.start_ms), (5, 60_000, h.now - 1_000 - 4 * 60_000));
    assert_eq!(sr.sold[&s("a")], [0, 0, 2, 0, 3]);
    assert_eq!(sr.sold[&s("b")], [0, 0, 0, 0, 0], "a restock is no sale");
    assert_eq!(sr.reserved[&s("a")], [0, 0, 3, 0, 0]);
    assert!(!sr.truncated);

    // A paid reservation, and one cut short by an oversell, are counted as such.
    h.act(1, Action::Commit, None).unwrap();
    h.stock("a", "X", 1); // 3 held, 1 there: 2 short (no other store has X to spare)
    let o3 = h.d.overview(&query(1, &[]), h.now);
    assert_eq!((o3.reservations.committed, o3.reservations.short, o3.reservations.units_short), (1, 1, 2));
    assert_eq!(o3.open_conflicts.get("oversell"), Some(&1));
    assert_eq!(o3.stores[0].open_conflicts, 1);
    assert_eq!(o3.series.sold[&s("a")], [7], "3 and 4 units sold this minute");
}
