//! Stock coming in: merges with fulfilments, velocity and staleness, restocks and transfers.

mod common;

use common::*;
use shelfsync_hub_core::{
    Command, Done, FeedKind, HubChange, HubChangeKind, HubChangeRequest, Record, Refusal, ReservationStatus, Staleness,
    TransferStatus,
};
use shelfsync_shared::journal::EventKind;
use shelfsync_shared::PnEntry;

#[test]
fn a_fulfilment_closes_the_hold_and_lowers_on_hand_in_one_merge() {
    let mut h = H::new();
    h.stores(&["a", "b"]);
    h.stock("a", "X", 5);
    h.stock("b", "X", 1);
    let w = h.reserved(1, vec![line("X", 6)]);
    assert_eq!(h.d.held(&s("a"), &k("X")), 5);
    let at_a = w.view.allocations.iter().find(|a| a.store == s("a")).unwrap().hold;
    let head = h.d.feed_head();
    let cmd = h.stock_cmd("a", "X", 0, vec![at_a]);
    let Done::Merged(m) = h.ok(cmd) else { panic!() };
    assert_eq!(m.changed, [(k("X"), 0)]);
    assert_eq!(m.holds_changed, [s("a")]);
    assert_eq!(h.d.held(&s("a"), &k("X")), 0);
    assert_eq!(h.kinds_after(head), [FeedKind::ReservationFulfilled, FeedKind::AvailabilityChanged]);
    assert!(h.d.conflicts(&Default::default()).is_empty(), "no oversell: the hold closed with the sale");
    // One store still holds its part.
    assert_eq!(h.d.reservation(uid(1)).unwrap().status, ReservationStatus::Held);
    let at_b = w.view.allocations.iter().find(|a| a.store == s("b")).unwrap().hold;
    let cmd = h.stock_cmd("b", "X", 0, vec![at_b, at_b, uid(777)]);
    h.ok(cmd);
    let v = h.d.reservation(uid(1)).unwrap();
    assert_eq!((v.status, v.expires_at_ms, v.allocations.len()), (ReservationStatus::Fulfilled, None, 0));
}

#[test]
fn a_store_cannot_fulfil_another_stores_hold() {
    let mut h = H::new();
    h.stores(&["a", "b"]);
    h.stock("a", "X", 5);
    let w = h.reserved(1, vec![line("X", 2)]);
    let cmd = h.stock_cmd("b", "X", 0, vec![w.view.allocations[0].hold]);
    let Done::Merged(m) = h.ok(cmd) else { panic!() };
    assert!(m.holds_changed.is_empty());
    assert_eq!(h.d.held(&s("a"), &k("X")), 2);
}

#[test]
fn merging_is_idempotent_and_sequences_only_changes() {
    let mut h = H::new();
    h.stores(&["a"]);
    let e = PnEntry { p: 7, n: 2 };
    let cmd =
        Command::Merge { store: s("a"), entries: vec![(k("X"), writer("a"), e)], fulfilled: vec![], rights: vec![] };
    let Done::Merged(m) = h.ok(cmd.clone()) else { panic!() };
    assert_eq!((m.entries_changed, m.counter_head, m.changed.clone()), (1, 1, vec![(k("X"), 5)]));
    let head = h.d.feed_head();
    let Done::Merged(m) = h.ok(cmd) else { panic!() };
    assert_eq!((m.entries_changed, m.counter_head), (0, 1));
    assert!(m.changed.is_empty());
    assert_eq!(h.d.feed_head(), head);
    // Entry-wise max: an older entry changes nothing, a newer half does.
    let older = PnEntry { p: 6, n: 3 };
    let cmd = Command::Merge {
        store: s("a"),
        entries: vec![(k("X"), writer("a"), older)],
        fulfilled: vec![],
        rights: vec![],
    };
    let Done::Merged(m) = h.ok(cmd) else { panic!() };
    assert_eq!(m.changed, [(k("X"), 4)]);
    assert_eq!(h.d.entries_since(&s("a"), 0, None, 10).entries, [(2, k("X"), writer("a"), PnEntry { p: 7, n: 3 })]);
}

#[test]
fn merges_from_unknown_or_revoked_stores_and_impossible_entries_are_refused() {
    let mut h = H::new();
    h.stores(&["a"]);
    let e = PnEntry { p: 1, n: 0 };
    let merge = |store: &str, e: PnEntry| Command::Merge {
        store: s(store),
        entries: vec![(k("X"), writer(store), e)],
        fulfilled: vec![],
        rights: vec![],
    };
    assert_eq!(h.apply(merge("z", e)), Err(Refusal::UnknownStore(s("z"))));
    let before = h.d.snapshot();
    assert!(matches!(h.apply(merge("a", PnEntry { p: u64::MAX, n: 0 })), Err(Refusal::Invalid(_))));
    let big = PnEntry { p: i64::MAX as u64, n: 0 };
    let two = Command::Merge {
        store: s("a"),
        entries: vec![(k("X"), writer("a"), big), (k("X"), writer("b"), big)],
        fulfilled: vec![],
        rights: vec![],
    };
    assert!(matches!(h.apply(two), Err(Refusal::Invalid(_))), "the sum would leave i64");
    assert_eq!(h.d.snapshot(), before);
    h.ok(Command::RevokeStore { store: s("a") });
    assert_eq!(h.apply(merge("a", e)), Err(Refusal::Revoked(s("a"))));
}

#[test]
fn velocity_counts_only_what_went_and_decays() {
    let mut h = H::with(config(true));
    h.stores(&["a"]);
    h.stock("a", "X", 100);
    h.stock("a", "X", 90);
    let velocity = |h: &H| {
        h.records
            .iter()
            .rev()
            .find_map(|r| match r {
                Record::Velocity { velocity, .. } => Some(*velocity),
                _ => None,
            })
            .unwrap()
    };
    assert_eq!(velocity(&h).score, 10.0);
    h.advance(3_600_000);
    h.stock("a", "X", 95); // a rise does not count
    assert_eq!(velocity(&h).updated_at_ms, T0);
    h.stock("a", "X", 94);
    let v = velocity(&h);
    assert!((v.score - (10.0 * (-1f64).exp() + 1.0)).abs() < 1e-9, "{v:?}");
}

#[test]
fn a_silent_store_is_discounted_by_what_it_may_have_sold_in_its_silence() {
    let mut h = H::with(config(true));
    h.stores(&["a"]);
    h.stock("a", "X", 100);
    h.stock("a", "X", 90); // velocity 10 per τ = 1 h, last seen now
    let st = Staleness::default();
    h.advance(st.grace_ms + st.tau_ms / 2);
    let f = &h.d.figures(&k("X"), h.now, h.d.connected())[0];
    assert_eq!(
        (f.raw_available, f.staleness_discount, f.available, f.silent_ms),
        (90, 13, 77, st.grace_ms + st.tau_ms / 2),
        "5 sales expected in the silence; 13 cover 99.9 % of silences"
    );
    let connected = [s("a")].into_iter().collect();
    assert_eq!(h.d.figures(&k("X"), h.now, &connected)[0].available, 90);
    // Sourcing uses the discounted figure, and the connected set the decider was told.
    assert!(matches!(h.reserve(1, vec![line("X", 78)], None, None), Err(Refusal::Unavailable { available: 77, .. })));
    h.ok(Command::SetConnected { store: s("a"), connected: true });
    assert!(h.reserve(1, vec![line("X", 78)], None, None).is_ok());
    // The discount never exceeds what there is.
    h.advance(100 * st.tau_ms);
    let f = &h.d.figures(&k("X"), h.now, &Default::default())[0];
    assert_eq!((f.raw_available, f.staleness_discount, f.available), (12, 12, 0));
}

#[test]
fn store_seen_only_moves_forward() {
    let mut h = H::new();
    h.stores(&["a"]);
    h.ok(Command::StoreSeen { store: s("a"), at_ms: T0 + 10 });
    h.ok(Command::StoreSeen { store: s("a"), at_ms: T0 });
    assert_eq!(h.d.store(&s("a")).unwrap().last_seen_ms, Some(T0 + 10));
    assert_eq!(h.apply(Command::StoreSeen { store: s("z"), at_ms: T0 }), Err(Refusal::UnknownStore(s("z"))));
}

#[test]
fn restocks_write_the_hub_entry_journal_and_replay() {
    let mut h = H::new();
    h.stores(&["a"]);
    h.stock("a", "X", 2);
    let Ok(Done::HubChanged(c)) = h.restock(9, "a", vec![line("X", 5), line("Y", 1)]) else { panic!() };
    assert!(c.created);
    assert_eq!(c.response.kind, HubChangeKind::Restock);
    assert_eq!(c.response.lines.iter().map(|l| (l.delta, l.on_hand)).collect::<Vec<_>>(), [(5, 7), (1, 1)]);
    assert_eq!(c.stores, [s("a")]);
    let journal: Vec<_> = h
        .records
        .iter()
        .filter_map(|r| match r {
            Record::Journal(e) => Some((e.line, e.kind, e.delta, e.writer.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(journal, [(0, EventKind::Restock, 5, hub_writer()), (1, EventKind::Restock, 1, hub_writer())]);
    let page = h.d.entries_since(&s("a"), 0, Some(&writer("a")), 10);
    assert_eq!(
        page.entries.iter().map(|e| (e.0, e.3)).collect::<Vec<_>>(),
        [(2, PnEntry { p: 5, n: 0 }), (3, PnEntry { p: 1, n: 0 })]
    );
    assert_eq!(page.upto, 3);
    let full = h.d.entries_since(&s("a"), 0, None, 2);
    assert_eq!((full.entries.len(), full.upto), (2, 2));
    let n = h.records.len();
    let Ok(Done::HubChanged(again)) = h.restock(9, "a", vec![line("X", 5), line("Y", 1)]) else { panic!() };
    assert!(!again.created);
    assert_eq!(again.response, c.response);
    assert_eq!(h.records.len(), n);
    assert_eq!(
        h.restock(9, "a", vec![line("X", 6)]),
        Err(Refusal::IdempotencyConflict { id: uid(9), kind: "restock".into() })
    );
    assert_eq!(h.restock(10, "z", vec![line("X", 6)]), Err(Refusal::UnknownStore(s("z"))));
    assert!(matches!(h.restock(11, "a", vec![line("X", 0)]), Err(Refusal::Invalid(_))));
}

fn transfer_cmd(id: u128, from: &str, to: &str, lines: Vec<shelfsync_hub_core::QtyLine>) -> Command {
    Command::HubChange(HubChangeRequest {
        id: uid(id),
        key: None,
        change: HubChange::Transfer { from: s(from), to: s(to), lines },
        reason: Some("rebalance".into()),
    })
}

fn journal_after(h: &H, from: usize) -> Vec<(String, u32, EventKind, i64, String)> {
    h.records[from..]
        .iter()
        .filter_map(|r| match r {
            Record::Journal(e) => Some((e.store.to_string(), e.line, e.kind, e.delta, e.reason.clone().unwrap())),
            _ => None,
        })
        .collect()
}

#[test]
fn a_transfer_ships_from_the_source_and_is_incoming_at_the_destination() {
    let mut h = H::new();
    h.stores(&["a", "b"]);
    h.stock("a", "X", 5);
    let transfer = |lines| transfer_cmd(5, "a", "b", lines);
    let before = h.d.snapshot();
    assert_eq!(
        h.apply(transfer(vec![line("X", 3), line("X", 3)])),
        Err(Refusal::InsufficientStock { store: s("a"), sku: k("X"), on_hand: 2, wanted: 3 })
    );
    assert_eq!(h.d.snapshot(), before);
    let head = h.d.feed_head();
    let mark = h.records.len();
    let Done::HubChanged(c) = h.ok(transfer(vec![line("X", 3), line("X", 2)])) else { panic!() };
    assert_eq!(c.response.kind, HubChangeKind::Transfer);
    assert_eq!(c.stores, [s("a")]);
    assert!(c.holds_changed.contains(&s("b")), "b's agent gets its incoming");
    let t = c.transfer.expect("a shipment answers its transfer");
    assert_eq!((t.status, t.lines.len(), t.lines[0].shipped), (TransferStatus::InTransit, 1, 5));
    assert_eq!((h.d.on_hand(&s("a"), &k("X")), h.d.on_hand(&s("b"), &k("X"))), (0, 0));
    assert_eq!(h.d.incoming(&s("b"), &k("X")), 5);
    let at_b: Vec<_> = h.d.figures(&k("X"), h.now, h.d.connected()).into_iter().filter(|f| f.store == s("b")).collect();
    assert_eq!((at_b[0].incoming, at_b[0].available, at_b[0].on_hand), (5, 0, 0), "incoming is never available");
    let snap = h.d.incoming_snapshot(&s("b"));
    assert_eq!((snap.transfers.len(), snap.transfers[0].lines[0].qty), (1, 5));
    assert!(h.d.incoming_snapshot(&s("a")).transfers.is_empty());
    assert_eq!(journal_after(&h, mark), [("a".into(), 0, EventKind::Transfer, -5, "to b: rebalance".into()),]);
    assert!(h.kinds_after(head).contains(&FeedKind::TransferShipped));
    assert_eq!(
        h.apply(transfer(vec![line("X", 3), line("X", 3)])),
        Err(Refusal::IdempotencyConflict { id: uid(5), kind: "transfer".into() })
    );
    assert_eq!(h.reloaded().snapshot(), h.d.snapshot());
}

#[test]
fn a_partial_receipt_books_the_loss_once() {
    let mut h = H::new();
    h.stores(&["a", "b"]);
    h.stock("a", "X", 5);
    h.stock("a", "Y", 2);
    h.ok(transfer_cmd(5, "a", "b", vec![line("X", 4), line("Y", 2)]));
    let receive = |lines: Option<Vec<_>>, key: Option<&str>| Command::ReceiveTransfer {
        id: uid(5),
        lines,
        key: key.map(str::to_owned),
    };
    let before = h.d.snapshot();
    for bad in [vec![line("X", 5), line("Y", 2)], vec![line("X", 3)], vec![line("X", 3), line("Z", 1)]] {
        assert!(matches!(h.apply(receive(Some(bad), None)), Err(Refusal::Invalid(_))));
    }
    assert_eq!(h.d.snapshot(), before);
    assert!(matches!(
        h.apply(Command::ReceiveTransfer { id: uid(6), lines: None, key: None }),
        Err(Refusal::NotFound(_))
    ));
    let mark = h.records.len();
    let Done::TransferChanged(c) = h.ok(receive(Some(vec![line("Y", 2), line("X", 3)]), Some("k1"))) else { panic!() };
    assert!(c.created);
    assert_eq!(c.transfer.status, TransferStatus::Received);
    assert_eq!((h.d.on_hand(&s("b"), &k("X")), h.d.on_hand(&s("b"), &k("Y"))), (3, 2));
    assert_eq!((h.d.incoming(&s("b"), &k("X")), h.d.incoming(&s("b"), &k("Y"))), (0, 0));
    let loss = shelfsync_shared::Reason {
        code: shelfsync_shared::ReasonCode::TransitLoss,
        note: Some(format!("transfer {} from a", uid(5))),
    }
    .to_stored();
    assert_eq!(
        journal_after(&h, mark),
        [
            ("b".into(), 0, EventKind::Transfer, 4, "from a: rebalance".into()),
            ("b".into(), 1, EventKind::Adjustment, -1, loss),
            ("b".into(), 2, EventKind::Transfer, 2, "from a: rebalance".into()),
        ]
    );
    // The same receipt again: the same answer, nothing changes.
    let snap = h.d.snapshot();
    let Done::TransferChanged(again) = h.ok(receive(Some(vec![line("X", 3), line("Y", 2)]), None)) else { panic!() };
    assert!(!again.created);
    assert_eq!(again.transfer, c.transfer);
    assert_eq!(h.d.snapshot(), snap);
    // Another receipt: refused; under the same key: an idempotency conflict.
    assert!(matches!(h.apply(receive(None, None)), Err(Refusal::InvalidState(_))));
    assert!(matches!(h.apply(receive(None, Some("k1"))), Err(Refusal::IdempotencyConflict { .. })));
    assert!(matches!(h.apply(Command::CancelTransfer { id: uid(5), key: None }), Err(Refusal::InvalidState(_))));
    assert_eq!(h.reloaded().snapshot(), h.d.snapshot());
}

#[test]
fn a_cancelled_transfer_goes_back_to_its_source() {
    let mut h = H::new();
    h.stores(&["a", "b"]);
    h.stock("a", "X", 5);
    h.ok(transfer_cmd(5, "a", "b", vec![line("X", 2), line("X", 1)]));
    assert_eq!(h.d.on_hand(&s("a"), &k("X")), 2);
    let mark = h.records.len();
    let head = h.d.feed_head();
    let Done::TransferChanged(c) = h.ok(Command::CancelTransfer { id: uid(5), key: None }) else { panic!() };
    assert_eq!(c.transfer.status, TransferStatus::Cancelled);
    assert_eq!((h.d.on_hand(&s("a"), &k("X")), h.d.incoming(&s("b"), &k("X"))), (5, 0));
    assert_eq!(
        journal_after(&h, mark),
        [("a".into(), 1, EventKind::Transfer, 3, "cancelled transfer to b: rebalance".into())]
    );
    assert!(h.kinds_after(head).contains(&FeedKind::TransferCancelled));
    let Done::TransferChanged(again) = h.ok(Command::CancelTransfer { id: uid(5), key: None }) else { panic!() };
    assert!(!again.created);
    assert!(matches!(
        h.apply(Command::ReceiveTransfer { id: uid(5), lines: None, key: None }),
        Err(Refusal::InvalidState(_))
    ));
    assert_eq!(h.reloaded().snapshot(), h.d.snapshot());
}

#[test]
fn transfers_recorded_before_they_travelled_read_as_received() {
    use shelfsync_hub_core::{ChangedLine, HubChangeResponse, HubRequest};
    let mut h = H::new();
    h.stores(&["a", "b"]);
    let mut rows = h.records.clone();
    let lines = vec![
        ChangedLine { store: s("a"), sku: k("X"), delta: -3, on_hand: 2, entry: None },
        ChangedLine { store: s("b"), sku: k("X"), delta: 3, on_hand: 3, entry: None },
    ];
    let response =
        HubChangeResponse { id: uid(9), key: None, kind: HubChangeKind::Transfer, lines, recorded_at_ms: 1_000 };
    rows.push(Record::HubRequest(HubRequest {
        id: uid(9),
        kind: HubChangeKind::Transfer,
        fingerprint: vec![1],
        response,
    }));
    let d = shelfsync_hub_core::Decider::from_records(h.d.config().clone(), 42, rows).unwrap();
    let t = d.transfer(uid(9)).expect("the old transfer is listed");
    assert_eq!((t.status, &t.from, &t.to, t.lines[0].received), (TransferStatus::Received, &s("a"), &s("b"), Some(3)));
    assert_eq!(d.incoming(&s("b"), &k("X")), 0);
}

#[test]
fn a_new_hub_writer_writes_new_entries() {
    let mut h = H::new();
    h.stores(&["a"]);
    h.restock(1, "a", vec![line("X", 2)]).unwrap();
    let next =
        shelfsync_shared::WriterId::new(shelfsync_shared::NodeId::Hub, shelfsync_shared::Incarnation::from_u64(2));
    h.ok(Command::SetHubWriter { writer: next.clone() });
    h.restock(2, "a", vec![line("X", 3)]).unwrap();
    let page = h.d.entries_since(&s("a"), 0, None, 10);
    assert_eq!(
        page.entries.iter().map(|e| (e.2.clone(), e.3.p)).collect::<Vec<_>>(),
        [(hub_writer(), 2), (next.clone(), 3)]
    );
    assert_eq!(h.d.on_hand(&s("a"), &k("X")), 5);
    assert!(matches!(h.apply(Command::SetHubWriter { writer: writer("a") }), Err(Refusal::Invalid(_))));
    assert_eq!(h.rebuilt().hub_writer(), &next);
}

#[test]
fn an_adjustment_compares_and_sets_in_the_same_decision() {
    let mut h = H::new();
    h.stores(&["a"]);
    h.stock("a", "X", 5);
    let adjust = |id: u128, delta: i64, expected_on_hand: Option<i64>| {
        Command::HubChange(HubChangeRequest {
            id: uid(id),
            key: Some(format!("fix-{id}")),
            change: HubChange::Adjust { store: s("a"), sku: k("X"), delta, expected_on_hand },
            reason: Some("damaged: wet".into()),
        })
    };
    let before = h.d.snapshot();
    assert_eq!(
        h.apply(adjust(1, -2, Some(4))),
        Err(Refusal::StaleQuantity { store: s("a"), sku: k("X"), expected: 4, on_hand: 5 })
    );
    assert_eq!(h.d.snapshot(), before, "a stale adjustment changes nothing");
    let Done::HubChanged(c) = h.ok(adjust(1, -2, Some(5))) else { panic!() };
    assert_eq!((c.response.kind, c.response.key.as_deref()), (HubChangeKind::Adjustment, Some("fix-1")));
    assert_eq!(h.d.on_hand(&s("a"), &k("X")), 3);
    let journal: Vec<_> = h
        .records
        .iter()
        .filter_map(|r| match r {
            Record::Journal(e) => Some((e.kind, e.delta, e.reason.clone(), e.writer.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(journal, [(EventKind::Adjustment, -2, Some("damaged: wet".into()), hub_writer())]);
    // A replay answers the first result even though on_hand moved on.
    let Done::HubChanged(again) = h.ok(adjust(1, -2, Some(5))) else { panic!() };
    assert_eq!((again.created, again.response), (false, c.response));
    assert!(matches!(h.apply(adjust(2, 0, None)), Err(Refusal::Invalid(_))));
    assert_eq!(h.rebuilt().snapshot(), h.d.snapshot());
}

/// Adjustments reach the feed: head office's when made, a till's when its lines sync up (only
/// adjustments, only the store's own), with the reason code and note apart.
#[test]
fn adjustments_reach_the_feed_with_their_reason() {
    let mut h = H::new();
    h.stores(&["a", "b"]);
    h.stock("a", "X", 5);
    let head = h.d.feed_head();
    h.ok(Command::HubChange(HubChangeRequest {
        id: uid(1),
        key: None,
        change: HubChange::Adjust { store: s("a"), sku: k("X"), delta: -1, expected_on_hand: None },
        reason: Some("theft: shelf 4".into()),
    }));
    let till = |kind, delta, reason: &str| shelfsync_shared::JournalEvent {
        id: uid(2),
        line: 0,
        kind,
        store: s("a"),
        sku: k("X"),
        delta,
        reason: Some(reason.into()),
        occurred_at_ms: 1_000,
        recorded_at_ms: 1_000,
        writer: writer("a"),
        flags: Vec::new(),
    };
    let Done::AdjustmentsNoted(n) = h.ok(Command::JournalAdjustments {
        store: s("a"),
        events: vec![till(EventKind::Adjustment, 2, "found"), till(EventKind::Sale, -1, "")],
    }) else {
        panic!()
    };
    assert_eq!(n, 1, "a sale line is not an adjustment");
    assert_eq!(
        h.apply(Command::JournalAdjustments { store: s("z"), events: vec![] }),
        Err(Refusal::UnknownStore(s("z")))
    );
    let told: Vec<serde_json::Value> = h
        .feed()
        .into_iter()
        .filter(|e| e.cursor > head && e.kind == FeedKind::AdjustmentRecorded)
        .map(|e| e.data_json())
        .collect();
    assert_eq!(told.len(), 2, "{told:?}");
    assert_eq!(
        (told[0]["by"].as_str(), told[0]["reason"].as_str(), told[0]["note"].as_str(), told[0]["delta"].as_i64()),
        (Some("hub"), Some("theft"), Some("shelf 4"), Some(-1))
    );
    assert_eq!(
        (told[1]["by"].as_str(), told[1]["reason"].as_str(), told[1]["note"].is_null(), told[1]["delta"].as_i64()),
        (Some("store"), Some("found"), true, Some(2))
    );
    assert_eq!(h.rebuilt().snapshot(), h.d.snapshot());
}

#[test]
fn a_batch_restock_is_all_entries_or_none() {
    use shelfsync_hub_core::RestockEntry;
    let mut h = H::new();
    h.stores(&["a", "b"]);
    let batch = |stores: &[&str]| {
        Command::HubChange(HubChangeRequest {
            id: uid(3),
            key: None,
            change: HubChange::RestockBatch {
                restocks: stores
                    .iter()
                    .map(|st| RestockEntry { store: s(st), lines: vec![line("X", 2)], reason: None })
                    .collect(),
            },
            reason: None,
        })
    };
    let before = h.d.snapshot();
    let Err(Refusal::Invalid(m)) = h.apply(batch(&["a", "z"])) else { panic!() };
    assert!(m.starts_with("restocks[1].store"), "{m}");
    assert_eq!(h.d.snapshot(), before);
    let Done::HubChanged(c) = h.ok(batch(&["a", "b", "a"])) else { panic!() };
    assert_eq!(c.stores, [s("a"), s("b")]);
    assert_eq!((h.d.on_hand(&s("a"), &k("X")), h.d.on_hand(&s("b"), &k("X"))), (4, 2));
    let ids: Vec<_> = h
        .records
        .iter()
        .filter_map(|r| match r {
            Record::Journal(e) => Some((e.id, e.line)),
            _ => None,
        })
        .collect();
    assert_eq!(ids.len(), 3);
    assert!(ids.iter().all(|(id, line)| *id != uid(3) && *line == 0), "each entry is its own event: {ids:?}");
    assert_eq!(h.rebuilt().snapshot(), h.d.snapshot());
}

#[test]
fn answers_stored_before_keys_read_back_with_the_id_as_key() {
    let old = serde_json::json!({
        "id": uid(4), "kind": "restock", "fingerprint": [1, 2, 3],
        "response": {"id": uid(4), "kind": "restock", "recorded_at_ms": 5,
                     "lines": [{"store": "a", "sku": "X", "delta": 1, "on_hand": 1}]},
    });
    let r: shelfsync_hub_core::HubRequest = serde_json::from_value(old).unwrap();
    assert_eq!((r.response.key.as_deref(), r.response.lines[0].entry), (None, None));
    assert_eq!(r.response.to_json()["key"], uid(4).to_string());
    assert!(r.response.to_json()["lines"][0].get("entry").is_none(), "restock answers keep their shape");
}
