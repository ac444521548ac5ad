//! Oversell reconciliation and negative stock.

mod common;

use common::*;
use shelfsync_hub_core::{
    AllocationStatus, Command, ConflictFilter, ConflictKind, ConflictStatus, Done, FeedKind, HubChange,
    HubChangeRequest,
};

fn conflicts(h: &H, kind: ConflictKind) -> Vec<shelfsync_hub_core::Conflict> {
    h.d.conflicts(&ConflictFilter { limit: 100, ..Default::default() }).into_iter().filter(|c| c.kind == kind).collect()
}

#[test]
fn newest_holds_first_and_a_shipped_line_is_re_sourced() {
    let mut h = H::new();
    h.stores(&["a", "b"]);
    h.stock("a", "X", 10);
    h.stock("b", "X", 3);
    let w1 = h.reserved(1, vec![line("X", 4)]);
    let w2 = h.reserved(2, vec![line("X", 3)]);
    assert!(w1.view.allocations.iter().chain(&w2.view.allocations).all(|a| a.store == s("a")));
    let head = h.d.feed_head();
    let Done::Merged(m) = h.stock("a", "X", 5) else { panic!() };
    assert_eq!(m.holds_changed, [s("a"), s("b")]);
    // r2 (newest) gives up 2 of its 3 units at a; b supplies them.
    let v2 = h.d.reservation(uid(2)).unwrap();
    let placed: Vec<_> = v2.lines[0].allocations.iter().map(|a| (a.store.to_string(), a.qty, a.status)).collect();
    assert_eq!(placed, [("a".into(), 1, AllocationStatus::Held), ("b".into(), 2, AllocationStatus::Held)]);
    assert_eq!(h.d.reservation(uid(1)).unwrap().allocations[0].qty, 4, "the older hold is untouched");
    assert_eq!((h.d.held(&s("a"), &k("X")), h.d.held(&s("b"), &k("X"))), (5, 2));
    let c = &conflicts(&h, ConflictKind::Oversell)[0];
    assert_eq!((c.shortfall, c.status, c.resolution.as_str()), (2, ConflictStatus::Resolved, "re-sourced 2 to b"));
    assert_eq!(c.reservations, [uid(2)]);
    assert_eq!(c.resolved_at_ms, Some(h.now));
    assert_eq!(
        h.kinds_after(head),
        [
            FeedKind::AvailabilityChanged, // a after the sale
            FeedKind::AvailabilityChanged, // b after re-sourcing
            FeedKind::OversellDetected,
            FeedKind::OversellResolved,
            FeedKind::AvailabilityChanged, // a after reconciliation
        ]
    );
}

#[test]
fn a_whole_hold_taken_is_moved() {
    let mut h = H::new();
    h.stores(&["a", "b"]);
    h.stock("a", "X", 10);
    h.stock("b", "X", 3);
    h.reserved(1, vec![line("X", 2)]);
    h.stock("a", "X", 0);
    let v = h.d.reservation(uid(1)).unwrap();
    let st: Vec<_> = v.lines[0].allocations.iter().map(|a| (a.store.to_string(), a.qty, a.status)).collect();
    assert_eq!(st, [("a".into(), 2, AllocationStatus::Moved), ("b".into(), 2, AllocationStatus::Held)]);
    assert_eq!(v.allocations.len(), 1);
}

#[test]
fn a_pickup_line_is_marked_short_and_the_conflict_stays_open() {
    let mut h = H::new();
    h.stores(&["a", "b"]);
    h.stock("a", "X", 5);
    h.stock("b", "X", 9);
    h.reserve(1, vec![line("X", 4)], Some("a"), None).unwrap();
    let head = h.d.feed_head();
    h.stock("a", "X", 2);
    let v = h.d.reservation(uid(1)).unwrap();
    assert!(v.short);
    assert_eq!(v.lines[0].short, 2);
    assert_eq!(h.d.held(&s("a"), &k("X")), 2);
    assert_eq!(h.d.held(&s("b"), &k("X")), 0, "pickup is never re-sourced");
    let c = &conflicts(&h, ConflictKind::Oversell)[0];
    assert_eq!((c.status, c.resolution.as_str(), c.resolved_at_ms), (ConflictStatus::Open, "2 marked short", None));
    assert_eq!(
        h.kinds_after(head),
        [
            FeedKind::AvailabilityChanged,
            FeedKind::ReservationShort,
            FeedKind::OversellDetected,
            FeedKind::AvailabilityChanged,
        ]
    );
    let short = h.feed().into_iter().find(|e| e.kind == FeedKind::ReservationShort).unwrap();
    let json = short.data_json();
    assert_eq!((json["store"].as_str(), json["sku"].as_str(), json["short"].as_u64()), (Some("a"), Some("X"), Some(2)));
    assert_eq!(json["reservation"]["short"], true);
}

#[test]
fn what_nobody_can_supply_is_short_the_rest_re_sourced_store_by_store() {
    let mut h = H::new();
    h.stores(&["a", "b", "c"]);
    h.stock("a", "X", 10);
    h.stock("b", "X", 1);
    h.stock("c", "X", 1);
    h.reserved(1, vec![line("X", 8)]);
    h.stock("a", "X", 3);
    let c = &conflicts(&h, ConflictKind::Oversell)[0];
    assert_eq!((c.shortfall, c.status), (5, ConflictStatus::Open));
    assert_eq!(c.resolution, "re-sourced 1 to b, 1 to c; 3 marked short");
    let v = h.d.reservation(uid(1)).unwrap();
    assert_eq!(v.lines[0].short, 3);
    let total: u64 = v.lines[0].allocations.iter().filter(|a| a.status != AllocationStatus::Moved).map(|a| a.qty).sum();
    assert_eq!(total, 8, "every unit of the line is somewhere");
}

#[test]
fn a_transfer_that_oversells_its_source_reconciles_it() {
    let mut h = H::new();
    h.stores(&["a", "b"]);
    h.stock("a", "X", 5);
    h.reserve(1, vec![line("X", 4)], Some("a"), None).unwrap();
    // The hub's on_hand allows the transfer; the holds do not stop it.
    let Done::HubChanged(c) = h.ok(Command::HubChange(HubChangeRequest {
        id: uid(7),
        key: None,
        change: HubChange::Transfer { from: s("a"), to: s("b"), lines: vec![line("X", 3)] },
        reason: None,
    })) else {
        panic!()
    };
    // a's holds were cut; b's agent gets the units on their way.
    assert_eq!(c.holds_changed, [s("a"), s("b")]);
    assert_eq!(h.d.held(&s("a"), &k("X")), 2);
    assert_eq!(h.d.reservation(uid(1)).unwrap().lines[0].short, 2);
}

#[test]
fn negative_stock_opens_once_and_resolves_itself() {
    let mut h = H::new();
    h.stores(&["a"]);
    let head = h.d.feed_head();
    h.stock("a", "X", -2);
    h.stock("a", "X", -3);
    let open = conflicts(&h, ConflictKind::NegativeStock);
    assert_eq!(open.len(), 1);
    assert_eq!(
        (open[0].shortfall, open[0].status, open[0].resolution.as_str()),
        (2, ConflictStatus::Open, "ask the store to recount")
    );
    assert_eq!(h.kinds_after(head).iter().filter(|k| **k == FeedKind::NegativeStock).count(), 1);
    let head = h.d.feed_head();
    h.stock("a", "X", 0);
    let c = h.d.conflict(open[0].id).unwrap();
    assert_eq!(
        (c.status, c.resolution.as_str(), c.resolved_at_ms),
        (ConflictStatus::Resolved, "stock is back at or above zero", Some(h.now))
    );
    assert!(!h.kinds_after(head).contains(&FeedKind::NegativeStock));
    h.stock("a", "X", -1);
    assert_eq!(conflicts(&h, ConflictKind::NegativeStock).len(), 2, "a new crossing, a new conflict");
}

/// Found by the chain simulator (`tests/sim.rs`): reconciliation counted units it re-sourced to a
/// store twice against that store, so when one oversell moved several holds, later ones went
/// `short` although another store still offered units.
#[test]
fn reconcile_uses_what_other_stores_have() {
    let mut h = H::new();
    h.stores(&["a", "b"]);
    h.stock("a", "X", 2);
    h.reserved(1, vec![line("X", 1)]); // shipped, from a (the only store with stock)
    h.reserved(2, vec![line("X", 1)]);
    h.stock("b", "X", 2);
    h.stock("a", "X", 0); // a sells both units at the counter
    let snap = h.d.snapshot();
    let short: u64 = snap.allocations.values().filter(|a| a.status == AllocationStatus::Short).map(|a| a.qty).sum();
    let b = h.d.figures(&k("X"), h.now, &Default::default()).into_iter().find(|f| f.store == s("b")).expect("b");
    assert_eq!((short, b.available, b.held), (0, 0, 2), "1 unit short while b still offers {}", b.available);
}

#[test]
fn an_oversell_settles_itself_when_its_short_reservation_is_released_or_expires() {
    for release in [true, false] {
        let mut h = H::new();
        h.stores(&["a", "b"]);
        h.stock("a", "X", 5);
        h.reserve(1, vec![line("X", 4)], Some("a"), None).unwrap();
        h.stock("a", "X", 2);
        let open = conflicts(&h, ConflictKind::Oversell);
        assert_eq!((open.len(), open[0].status), (1, ConflictStatus::Open));
        let head = h.d.feed_head();
        if release {
            h.act(1, shelfsync_hub_core::Action::Release, None).unwrap();
        } else {
            h.advance(3_600_000);
            h.ok(Command::ExpireDue);
        }
        let c = &conflicts(&h, ConflictKind::Oversell)[0];
        let how = if release { "released" } else { "expired" };
        assert_eq!(c.status, ConflictStatus::Resolved, "{how}");
        assert!(c.resolution.starts_with("2 marked short; reservation"), "{}", c.resolution);
        assert!(c.resolution.contains(how), "{}", c.resolution);
        assert_eq!(c.resolved_at_ms, Some(h.now));
        assert!(h.kinds_after(head).contains(&FeedKind::OversellResolved), "{how}");
        // The settled state reloads as it was: nothing stays indexed as open.
        let r = h.reloaded();
        assert_eq!(
            r.conflicts(&ConflictFilter { status: Some(ConflictStatus::Open), limit: 9, ..Default::default() }),
            []
        );
    }
}

#[test]
fn an_oversell_naming_two_reservations_stays_open_while_one_still_waits() {
    let mut h = H::new();
    h.stores(&["a"]);
    h.stock("a", "X", 6);
    h.reserve(1, vec![line("X", 3)], Some("a"), None).unwrap();
    h.reserve(2, vec![line("X", 3)], Some("a"), None).unwrap();
    h.stock("a", "X", 0);
    let c = conflicts(&h, ConflictKind::Oversell)[0].clone();
    assert_eq!(c.reservations.len(), 2);
    h.act(2, shelfsync_hub_core::Action::Release, None).unwrap();
    assert_eq!(conflicts(&h, ConflictKind::Oversell)[0].status, ConflictStatus::Open, "r1 still waits");
    // A reload keeps the index: releasing the other one settles it.
    let mut reloaded = H { d: h.reloaded(), ..h };
    reloaded.act(1, shelfsync_hub_core::Action::Release, None).unwrap();
    assert_eq!(conflicts(&reloaded, ConflictKind::Oversell)[0].status, ConflictStatus::Resolved);
}

#[test]
fn conflicts_page_newest_first_after_an_id() {
    let mut h = H::new();
    h.stores(&["a"]);
    for i in 0..7 {
        h.stock("a", "X", -1 - i); // opens a negative_stock conflict; back to 0 resolves it
        h.stock("a", "X", 0);
        h.advance(1);
    }
    let all = h.d.conflicts(&ConflictFilter { limit: 100, ..Default::default() });
    assert_eq!(all.len(), 7);
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = h.d.conflicts(&ConflictFilter { after, limit: 3, ..Default::default() });
        if page.is_empty() {
            break;
        }
        after = page.last().map(|c| c.id);
        seen.extend(page.into_iter().map(|c| c.id));
    }
    assert_eq!(seen, all.iter().map(|c| c.id).collect::<Vec<_>>());
}
