//! Escrow rights at the decider (`hub/docs/escrow.md`): online promises only within the rights a
//! store granted; an overdraft is covered and flagged; the hub gives back at low stock.

mod common;

use common::*;
use shelfsync_hub_core::{Command, ConflictFilter, ConflictKind, ConflictStatus, Done, Escrow, FeedKind, Refusal};
use shelfsync_shared::{EscrowPolicy, RightsKind};

fn escrow_h(keep: u64) -> H {
    escrow_share(0.3, keep)
}

fn escrow_share(share: f64, keep: u64) -> H {
    let mut c = config(false);
    c.escrow = Escrow { enabled: true, policy: EscrowPolicy { share, max: None, keep } };
    H::with(c)
}

/// A merge of the store's own entry bringing on_hand to `target`, with rights entries of its
/// writer (granted, consumed totals).
fn merge(
    h: &mut H,
    store: &str,
    sku: &str,
    target: i64,
    granted: u64,
    consumed: u64,
    fulfilled: Vec<uuid::Uuid>,
) -> Done {
    let Command::Merge { store: st, entries, fulfilled, .. } = h.stock_cmd(store, sku, target, fulfilled) else {
        unreachable!()
    };
    let mut rights = vec![(k(sku), writer(store), RightsKind::Granted, granted)];
    if consumed > 0 {
        rights.push((k(sku), writer(store), RightsKind::Consumed, consumed));
    }
    h.ok(Command::Merge { store: st, entries, fulfilled, rights })
}

fn overdrafts(h: &H) -> Vec<shelfsync_hub_core::Conflict> {
    h.d.conflicts(&ConflictFilter { limit: 100, ..Default::default() })
        .into_iter()
        .filter(|c| c.kind == ConflictKind::EscrowOverdraft)
        .collect()
}

#[test]
fn online_promises_only_within_granted_rights() {
    let mut h = escrow_h(1);
    h.stores(&["a", "b"]);
    h.stock("a", "X", 10);
    h.stock("b", "X", 10);
    // Nothing granted: nothing offered, whatever is on hand.
    let f = h.d.figures(&k("X"), h.now, &Default::default());
    assert_eq!(f.iter().map(|f| (f.granted, f.available)).collect::<Vec<_>>(), [(0, 0), (0, 0)]);
    assert!(matches!(h.reserve(1, vec![line("X", 1)], None, None), Err(Refusal::Unavailable { available: 0, .. })));

    let head = h.d.feed_head();
    merge(&mut h, "a", "X", 10, 3, 0, vec![]);
    assert_eq!(h.kinds_after(head), [FeedKind::RightsGranted, FeedKind::AvailabilityChanged]);
    let f = &h.d.figures(&k("X"), h.now, &Default::default())[0];
    assert_eq!((f.on_hand, f.granted, f.raw_available, f.available), (10, 3, 10, 3));
    let rights = h.d.store_rights(&s("a"));
    assert_eq!((rights.len(), rights[0].1.online(), h.d.granted_at(&s("a"))), (1, 3, 3));
    assert!(h.d.store_rights(&s("b")).is_empty(), "b granted nothing");
    h.reserved(2, vec![line("X", 2)]);
    assert!(matches!(h.reserve(3, vec![line("X", 2)], None, None), Err(Refusal::Unavailable { available: 1, .. })));
    // A grant applied twice changes nothing.
    let before = h.d.snapshot();
    merge(&mut h, "a", "X", 10, 3, 0, vec![]);
    assert_eq!(h.d.snapshot().cells, before.cells);
    assert_eq!(h.rebuilt().snapshot(), h.d.snapshot());
}

#[test]
fn a_store_cannot_return_rights_nor_write_another_stores() {
    let mut h = escrow_h(1);
    h.stores(&["a", "b"]);
    h.stock("a", "X", 10);
    let before = h.d.snapshot();
    for (w, kind) in
        [(writer("a"), RightsKind::Returned), (writer("b"), RightsKind::Granted), (hub_writer(), RightsKind::Returned)]
    {
        let cmd =
            Command::Merge { store: s("a"), entries: vec![], fulfilled: vec![], rights: vec![(k("X"), w, kind, 5)] };
        let err = h.apply(cmd).unwrap_err();
        assert!(matches!(&err, Refusal::Invalid(m) if m.contains("may not write")), "{err}");
    }
    assert_eq!(h.d.snapshot(), before);
}

#[test]
fn an_overdraft_gives_the_rights_back_flags_it_and_cuts_what_is_gone() {
    let mut h = escrow_share(0.4, 0);
    h.stores(&["a"]);
    h.stock("a", "X", 10);
    merge(&mut h, "a", "X", 10, 4, 0, vec![]);
    h.reserved(1, vec![line("X", 2)]);
    // The store sells 9 offline: its own rights were 6, it broke 3 of online's 4, one unit is left.
    let head = h.d.feed_head();
    merge(&mut h, "a", "X", 1, 4, 0, vec![]);
    let r = h.d.rights(&s("a"), &k("X"));
    assert_eq!((r.online(), r.total(RightsKind::Returned)), (1, 3));
    let c = &overdrafts(&h)[0];
    assert_eq!((c.shortfall, c.status), (3, ConflictStatus::Open));
    assert_eq!(c.details.as_ref().unwrap()["rights_broken"], 3);
    assert_eq!(h.d.held(&s("a"), &k("X")), 1, "the hold beyond the one unit left was cut");
    let kinds = h.kinds_after(head);
    for k in
        [FeedKind::RightsReturned, FeedKind::EscrowOverdraft, FeedKind::OversellDetected, FeedKind::ReservationShort]
    {
        assert!(kinds.contains(&k), "{k:?} in {kinds:?}");
    }
    // A second overdraft of the same cell adds to the open conflict.
    h.restock(9, "a", vec![line("X", 5)]).unwrap();
    merge(&mut h, "a", "X", 6, 5, 0, vec![]);
    merge(&mut h, "a", "X", 0, 5, 0, vec![]);
    let c = overdrafts(&h);
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].shortfall, 3 + 2, "granted 1 more (online 2), then sold everything");
    assert_eq!(h.rebuilt().snapshot(), h.d.snapshot());
}

#[test]
fn a_fulfilment_consumes_online_rights_without_an_overdraft() {
    let mut h = escrow_h(0);
    h.stores(&["a"]);
    h.stock("a", "X", 10);
    merge(&mut h, "a", "X", 10, 3, 0, vec![]);
    let w = h.reserved(1, vec![line("X", 3)]);
    let hold = w.view.allocations[0].hold;
    merge(&mut h, "a", "X", 7, 3, 3, vec![hold]);
    let r = h.d.rights(&s("a"), &k("X"));
    assert_eq!((r.online(), h.d.held(&s("a"), &k("X"))), (0, 0));
    assert!(overdrafts(&h).is_empty());
    assert_eq!(h.d.reservation(uid(1)).unwrap().status.to_string(), "fulfilled");
}

#[test]
fn the_hub_gives_unreserved_rights_back_when_the_store_runs_low() {
    let mut h = escrow_h(2);
    h.stores(&["a"]);
    h.stock("a", "X", 10);
    merge(&mut h, "a", "X", 10, 3, 0, vec![]);
    h.reserved(1, vec![line("X", 1)]);
    // Sold 6 within its own 7: own 1 < keep 2 → one unreserved unit goes back (not the held one).
    let head = h.d.feed_head();
    merge(&mut h, "a", "X", 4, 3, 0, vec![]);
    let r = h.d.rights(&s("a"), &k("X"));
    assert_eq!((r.online(), r.own(4)), (2, 2));
    assert!(h.kinds_after(head).contains(&FeedKind::RightsReturned));
    assert!(overdrafts(&h).is_empty());
    // Sold 3 more (own 2 → −1): online had 1 unreserved; the store broke rights → covered.
    merge(&mut h, "a", "X", 1, 3, 0, vec![]);
    let r = h.d.rights(&s("a"), &k("X"));
    assert_eq!(r.online(), 1);
    assert_eq!(h.d.held(&s("a"), &k("X")), 1);
    assert_eq!(overdrafts(&h)[0].shortfall, 1);
}

#[test]
fn without_escrow_rights_do_not_limit_and_unreserved_ones_go_back() {
    // Granted while escrow was on; the hub now runs without it (a restart with a new config).
    let mut on = escrow_share(0.4, 1);
    on.stores(&["a"]);
    on.stock("a", "X", 10);
    merge(&mut on, "a", "X", 10, 4, 0, vec![]);
    on.reserved(1, vec![line("X", 1)]);
    let mut cfg = on.d.config().clone();
    cfg.escrow.enabled = false;
    let d = shelfsync_hub_core::Decider::from_records(cfg, 42, on.records.clone()).unwrap();
    let mut h = H { d, now: on.now, agent: on.agent.clone(), records: on.records.clone() };
    let f = &h.d.figures(&k("X"), h.now, &Default::default())[0];
    assert_eq!((f.granted, f.available), (4, 9), "granted is shown, not a limit");
    // The cell's next change gives the 3 unreserved rights back; the held one stays.
    h.stock("a", "X", 9);
    let r = h.d.rights(&s("a"), &k("X"));
    assert_eq!((r.online(), r.total(RightsKind::Returned)), (1, 3));
    assert!(overdrafts(&h).is_empty());
}

#[test]
fn a_skus_rule_and_a_stores_override_replace_the_chains_policy() {
    use shelfsync_hub_core::Overrides;
    use shelfsync_shared::EscrowRule;
    let mut h = escrow_h(1);
    h.stores(&["a", "b"]);
    let half = EscrowRule { share_pct: Some(50), ..Default::default() };
    let mut r = rule(0, 0, 0, true);
    r.escrow = half;
    h.ok(Command::CatalogChanged { items: vec![(k("X"), Some(r))], overrides: None });
    h.stock("a", "X", 10);
    h.stock("b", "X", 10);
    // Half of 10 is the SKU's target: a grant of 5 stays (the chain's 30 % would give 2 back).
    merge(&mut h, "a", "X", 10, 5, 0, vec![]);
    merge(&mut h, "b", "X", 10, 5, 0, vec![]);
    assert_eq!((h.d.rights(&s("a"), &k("X")).online(), h.d.rights(&s("b"), &k("X")).online()), (5, 5));
    h.reserved(1, vec![line("X", 2)]);
    let held_a = h.d.held(&s("a"), &k("X"));

    // Store a keeps 9 for walk-ins: the hub gives back what brings its own to 9, never a held unit.
    let keep9 = Overrides { escrow: EscrowRule { keep: Some(9), ..Default::default() }, ..Default::default() };
    let head = h.d.feed_head();
    let Done::CatalogApplied(applied) =
        h.ok(Command::CatalogChanged { items: vec![], overrides: Some((s("a"), vec![(k("X"), keep9)])) })
    else {
        panic!("a catalog change")
    };
    assert_eq!(applied.holds, [s("a")], "a's agent hears of the return");
    let ra = h.d.rights(&s("a"), &k("X"));
    assert_eq!(ra.online() as u64, 5 - (5 - held_a).min(4), "own was 5, short 4, within the unreserved");
    assert!(h.kinds_after(head).contains(&FeedKind::RightsReturned));
    assert_eq!(h.d.rights(&s("b"), &k("X")).online(), 5, "b has no override");

    // Head office lowers the SKU to 10 %: b's unreserved rights beyond the new target go back.
    let held_b = h.d.held(&s("b"), &k("X"));
    let mut r = rule(0, 0, 0, true);
    r.escrow = EscrowRule { share_pct: Some(10), ..Default::default() };
    let Done::CatalogApplied(applied) =
        h.ok(Command::CatalogChanged { items: vec![(k("X"), Some(r))], overrides: None })
    else {
        panic!("a catalog change")
    };
    assert!(applied.holds.contains(&s("b")));
    assert_eq!(h.d.rights(&s("b"), &k("X")).online() as u64, held_b + 1, "target ⌈10 % × 10⌉ = 1 unreserved");
    assert!(overdrafts(&h).is_empty());
    assert_eq!(h.rebuilt().snapshot(), h.d.snapshot());
}
