//! Reservations: sourcing, pickup, limits, idempotency, the action state table, expiry, holds.

mod common;

use common::*;
use shelfsync_hub_core::{Action, AllocationStatus, Command, Done, FeedKind, Refusal, ReservationStatus, Written};
use shelfsync_shared::wire::HoldStatus;

fn placed(w: &Written, line: usize) -> Vec<(String, u64)> {
    w.view.lines[line].allocations.iter().map(|a| (a.store.to_string(), a.qty)).collect()
}

#[test]
fn sourcing_takes_the_most_available_first_ties_by_store_id_and_splits() {
    let mut h = H::new();
    h.stores(&["c", "b", "a"]);
    h.stock("a", "X", 5);
    h.stock("b", "X", 5);
    h.stock("c", "X", 8);
    let w = h.reserved(1, vec![line("X", 10)]);
    assert_eq!(placed(&w, 0), [("c".into(), 8), ("a".into(), 2)]);
    assert_eq!((h.d.held(&s("c"), &k("X")), h.d.held(&s("a"), &k("X")), h.d.held(&s("b"), &k("X"))), (8, 2, 0));
    assert_eq!(w.stores, [s("a"), s("c")]);
    assert_eq!(w.view.status, ReservationStatus::Held);
    assert_eq!(w.view.expires_at_ms, Some(T0 + 900_000));
}

#[test]
fn lines_of_one_request_do_not_take_the_same_units_twice() {
    let mut h = H::new();
    h.stores(&["a", "b"]);
    h.stock("a", "X", 5);
    h.stock("b", "X", 5);
    let w = h.reserved(1, vec![line("X", 4), line("X", 4)]);
    assert_eq!(placed(&w, 0), [("a".into(), 4)]);
    assert_eq!(placed(&w, 1), [("b".into(), 4)]);
    // Eight of ten are promised: two are left.
    let refused = h.reserve(2, vec![line("X", 3)], None, None);
    assert_eq!(refused, Err(Refusal::Unavailable { sku: k("X"), available: 2, store: None }));
}

#[test]
fn all_or_nothing_and_a_refusal_changes_nothing() {
    let mut h = H::new();
    h.stores(&["a"]);
    h.stock("a", "X", 5);
    h.stock("a", "Y", 1);
    let before = h.d.snapshot();
    let n = h.records.len();
    let refused = h.reserve(1, vec![line("X", 3), line("Y", 2)], None, None);
    assert_eq!(refused, Err(Refusal::Unavailable { sku: k("Y"), available: 1, store: None }));
    assert_eq!(h.d.snapshot(), before);
    assert_eq!(h.records.len(), n);
    assert_eq!(
        h.reserve(2, vec![line("Z", 1)], None, None).unwrap_err(),
        Refusal::Unavailable { sku: k("Z"), available: 0, store: None }
    );
}

#[test]
fn pickup_restricts_to_that_store() {
    let mut h = H::new();
    h.stores(&["a", "b", "gone"]);
    h.stock("a", "X", 9);
    h.stock("b", "X", 3);
    let w = match h.reserve(1, vec![line("X", 2)], Some("b"), None) {
        Ok(Done::Reserved(w)) => w,
        other => panic!("{other:?}"),
    };
    assert_eq!(placed(&w, 0), [("b".into(), 2)]);
    assert_eq!(w.view.pickup_store, Some(s("b")));
    assert_eq!(
        h.reserve(2, vec![line("X", 2)], Some("b"), None),
        Err(Refusal::Unavailable { sku: k("X"), available: 1, store: Some(s("b")) })
    );
    assert_eq!(h.reserve(3, vec![line("X", 1)], Some("nowhere"), None), Err(Refusal::UnknownStore(s("nowhere"))));
    h.ok(Command::RevokeStore { store: s("gone") });
    assert_eq!(h.reserve(4, vec![line("X", 1)], Some("gone"), None), Err(Refusal::Revoked(s("gone"))));
}

#[test]
fn revoked_stores_are_not_offered() {
    let mut h = H::new();
    h.stores(&["a", "b"]);
    h.stock("a", "X", 9);
    h.stock("b", "X", 3);
    h.ok(Command::RevokeStore { store: s("a") });
    let figures = h.d.figures(&k("X"), h.now, h.d.connected());
    assert_eq!(figures.iter().map(|f| f.store.to_string()).collect::<Vec<_>>(), ["b"]);
    assert_eq!(
        h.reserve(1, vec![line("X", 4)], None, None).unwrap_err(),
        Refusal::Unavailable { sku: k("X"), available: 3, store: None }
    );
}

#[test]
fn per_customer_limits_count_held_committed_and_fulfilled() {
    let mut h = H::new();
    h.stores(&["a"]);
    h.stock("a", "X", 50);
    h.catalog("X", Some(rule(0, 0, 3, true)));
    assert!(h.reserve(1, vec![line("X", 2)], None, Some("ann")).is_ok());
    assert_eq!(
        h.reserve(2, vec![line("X", 1), line("X", 1)], None, Some("ann")),
        Err(Refusal::LimitExceeded { sku: k("X"), limit: 3, already: 2 })
    );
    // Someone else is not limited by Ann; a request without a customer is limited on its own.
    assert!(h.reserve(3, vec![line("X", 3)], None, Some("bob")).is_ok());
    assert_eq!(
        h.reserve(4, vec![line("X", 4)], None, None),
        Err(Refusal::LimitExceeded { sku: k("X"), limit: 3, already: 0 })
    );
    // Released units no longer count; paid ones do.
    h.act(1, Action::Release, None).unwrap();
    assert!(h.reserve(5, vec![line("X", 3)], None, Some("ann")).is_ok());
    h.act(5, Action::Commit, None).unwrap();
    assert!(matches!(h.reserve(6, vec![line("X", 1)], None, Some("ann")), Err(Refusal::LimitExceeded { .. })));
}

#[test]
fn same_id_same_body_replays_the_first_answer_other_body_conflicts() {
    let mut h = H::new();
    h.stores(&["a"]);
    h.stock("a", "X", 5);
    let first = h.reserved(1, vec![line("X", 2)]);
    h.act(1, Action::Commit, None).unwrap();
    let n = h.records.len();
    match h.reserve(1, vec![line("X", 2)], None, None) {
        Ok(Done::Reserved(w)) => {
            assert!(!w.created);
            assert_eq!(w.view, first.view, "the first answer, not the current state");
            assert!(w.stores.is_empty());
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(h.records.len(), n, "a replay records nothing");
    assert_eq!(
        h.reserve(1, vec![line("X", 3)], None, None),
        Err(Refusal::IdempotencyConflict { id: uid(1), kind: "reservation".into() })
    );
}

/// A reservation of one unit at `a` brought to `status`.
fn in_state(h: &mut H, id: u128, status: ReservationStatus) {
    let w = h.reserved(id, vec![line("X", 1)]);
    match status {
        ReservationStatus::Held => {}
        ReservationStatus::Committed => {
            h.act(id, Action::Commit, None).unwrap();
        }
        ReservationStatus::Released => {
            h.act(id, Action::Release, None).unwrap();
        }
        ReservationStatus::Expired => {
            h.advance(900_000);
            h.ok(Command::ExpireDue);
        }
        ReservationStatus::Fulfilled => {
            let on_hand = h.d.on_hand(&s("a"), &k("X"));
            let cmd = h.stock_cmd("a", "X", on_hand - 1, vec![w.view.allocations[0].hold]);
            h.ok(cmd);
        }
    }
    assert_eq!(h.d.reservation(uid(id)).unwrap().status, status);
}

#[test]
fn the_action_state_table() {
    use ReservationStatus as S;
    let table = [
        (S::Held, Action::Extend { ttl_secs: 60 }, Ok(S::Held)),
        (S::Committed, Action::Extend { ttl_secs: 60 }, Ok(S::Committed)),
        (S::Fulfilled, Action::Extend { ttl_secs: 60 }, Err(())),
        (S::Released, Action::Extend { ttl_secs: 60 }, Err(())),
        (S::Expired, Action::Extend { ttl_secs: 60 }, Err(())),
        (S::Held, Action::Commit, Ok(S::Committed)),
        (S::Committed, Action::Commit, Ok(S::Committed)),
        (S::Fulfilled, Action::Commit, Ok(S::Fulfilled)),
        (S::Released, Action::Commit, Err(())),
        (S::Expired, Action::Commit, Err(())),
        (S::Held, Action::Release, Ok(S::Released)),
        (S::Committed, Action::Release, Ok(S::Released)),
        (S::Fulfilled, Action::Release, Err(())),
        (S::Released, Action::Release, Ok(S::Released)),
        (S::Expired, Action::Release, Err(())),
    ];
    for (i, (from, action, want)) in table.into_iter().enumerate() {
        let mut h = H::new();
        h.stores(&["a"]);
        h.stock("a", "X", 10);
        in_state(&mut h, i as u128, from);
        let before = h.d.snapshot();
        match (h.act(i as u128, action, None), want) {
            (Ok(Done::Acted(w)), Ok(to)) => {
                assert_eq!(w.view.status, to, "{from} {action:?}");
                assert!(w.created);
            }
            (Err(Refusal::InvalidState(m)), Err(())) => {
                assert_eq!(m, format!("reservation {} is {from}; it cannot be {}", uid(i as u128), action.done()));
                assert_eq!(h.d.snapshot(), before);
            }
            (got, want) => panic!("{from} {action:?}: got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn commit_keeps_units_held_and_drops_the_lease_release_gives_them_back() {
    let mut h = H::new();
    h.stores(&["a"]);
    h.stock("a", "X", 10);
    let w = h.reserved(1, vec![line("X", 4)]);
    let head = h.d.feed_head();
    h.act(1, Action::Commit, None).unwrap();
    let v = h.d.reservation(uid(1)).unwrap();
    assert_eq!((v.status, v.expires_at_ms), (ReservationStatus::Committed, None));
    assert_eq!(v.allocations[0].status, AllocationStatus::Committed);
    assert_eq!(h.d.held(&s("a"), &k("X")), 4);
    assert_eq!(h.kinds_after(head), [FeedKind::ReservationCommitted], "commit changes no figures");
    let snap = h.d.holds_snapshot(&s("a"));
    assert_eq!(snap.holds[0].status, HoldStatus::Committed);
    assert_eq!(snap.holds[0].expires_at_ms, None);
    let head = h.d.feed_head();
    h.act(1, Action::Release, None).unwrap();
    assert_eq!(h.d.held(&s("a"), &k("X")), 0);
    assert_eq!(h.kinds_after(head), [FeedKind::AvailabilityChanged, FeedKind::ReservationReleased]);
    assert!(h.d.holds_snapshot(&s("a")).holds.is_empty());
    assert_eq!(h.d.reservation(uid(1)).unwrap().lines[0].allocations[0].hold, w.view.allocations[0].hold);
}

#[test]
fn extend_moves_the_lease_and_bumps_the_holds_of_its_stores() {
    let mut h = H::new();
    h.stores(&["a"]);
    h.stock("a", "X", 10);
    h.reserved(1, vec![line("X", 4)]);
    let v0 = h.d.holds_snapshot(&s("a")).version;
    h.advance(1000);
    let head = h.d.feed_head();
    match h.act(1, Action::Extend { ttl_secs: 3600 }, None) {
        Ok(Done::Acted(w)) => assert_eq!(w.stores, [s("a")]),
        other => panic!("{other:?}"),
    }
    assert_eq!(h.d.reservation(uid(1)).unwrap().expires_at_ms, Some(h.now + 3_600_000));
    let snap = h.d.holds_snapshot(&s("a"));
    assert_eq!((snap.version, snap.holds[0].expires_at_ms), (v0 + 1, Some(h.now + 3_600_000)));
    assert!(h.kinds_after(head).is_empty(), "an extension is not a feed event");
    assert!(matches!(h.act(1, Action::Extend { ttl_secs: 0 }, None), Err(Refusal::Invalid(_))));
}

#[test]
fn actions_replay_under_their_idempotency_key() {
    let mut h = H::new();
    h.stores(&["a"]);
    h.stock("a", "X", 10);
    h.reserved(1, vec![line("X", 1)]);
    h.reserved(2, vec![line("X", 1)]);
    let first = match h.act(1, Action::Commit, Some("k1")) {
        Ok(Done::Acted(w)) => w,
        other => panic!("{other:?}"),
    };
    h.act(1, Action::Release, None).unwrap();
    match h.act(1, Action::Commit, Some("k1")) {
        Ok(Done::Acted(w)) => {
            assert!(!w.created);
            assert_eq!(w.view, first.view);
        }
        other => panic!("{other:?}"),
    }
    let conflict = h.act(2, Action::Commit, Some("k1")).unwrap_err();
    assert_eq!(
        conflict,
        Refusal::IdempotencyConflict { id: uid(2), kind: "action under Idempotency-Key \"k1\"".into() }
    );
    // The key is looked at before the reservation.
    assert!(matches!(h.act(99, Action::Commit, Some("k1")), Err(Refusal::IdempotencyConflict { .. })));
    assert_eq!(h.act(99, Action::Commit, None), Err(Refusal::NotFound(format!("no reservation {}", uid(99)))));
}

#[test]
fn due_leases_expire_in_batches_and_give_units_back() {
    let mut cfg = config(false);
    cfg.expire_batch_max = 2;
    let mut h = H::with(cfg);
    h.stores(&["a"]);
    h.stock("a", "X", 10);
    for id in 1..=3 {
        h.reserved(id, vec![line("X", 1)]);
    }
    h.ok(Command::Act { id: uid(3), action: Action::Extend { ttl_secs: 7200 }, key: None });
    h.reserved(4, vec![line("X", 1)]);
    h.advance(900_000 - 1);
    assert_eq!(h.ok(Command::ExpireDue), Done::Expired(Default::default()));
    h.advance(1);
    let Done::Expired(e) = h.ok(Command::ExpireDue) else { panic!() };
    assert_eq!((e.expired, e.more, e.stores.clone()), (2, true, vec![s("a")]));
    let Done::Expired(e) = h.ok(Command::ExpireDue) else { panic!() };
    assert_eq!((e.expired, e.more), (1, false));
    assert_eq!(h.d.reservation(uid(3)).unwrap().status, ReservationStatus::Held);
    assert_eq!(h.d.held(&s("a"), &k("X")), 1);
    let v = h.d.reservation(uid(1)).unwrap();
    assert_eq!((v.status, v.expires_at_ms), (ReservationStatus::Expired, Some(T0 + 900_000)));
    assert_eq!(v.lines[0].allocations[0].status, AllocationStatus::Expired);
}

#[test]
fn holds_snapshots_list_open_allocations_by_creation() {
    let mut h = H::new();
    h.stores(&["a", "b"]);
    h.stock("a", "X", 3);
    h.stock("b", "X", 1);
    h.stock("a", "Y", 3);
    assert_eq!(h.d.holds_snapshot(&s("a")).version, 0);
    let w1 = h.reserved(1, vec![line("Y", 1), line("X", 4)]);
    let w2 = h.reserved(2, vec![line("Y", 2)]);
    h.act(2, Action::Commit, None).unwrap();
    let snap = h.d.holds_snapshot(&s("a"));
    let ids: Vec<_> = snap.holds.iter().map(|x| x.id).collect();
    let w1_at_a: Vec<_> = w1.view.allocations.iter().filter(|a| a.store == s("a")).map(|a| a.hold).collect();
    assert_eq!(ids, [w1_at_a[0], w1_at_a[1], w2.view.allocations[0].hold]);
    assert_eq!(snap.holds[0].expires_at_ms, Some(T0 + 900_000));
    assert_eq!(snap.holds[2].status, HoldStatus::Committed);
    assert_eq!(h.d.holds_snapshot(&s("b")).holds.len(), 1);
    // One bump per (store, sku) reserved, one per store committed.
    assert_eq!(snap.version, 4);
}
