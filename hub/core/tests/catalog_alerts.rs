//! Catalog rules, alerts, unknown SKUs, agent conflicts and the feed's JSON.

mod common;

use common::*;
use serde_json::json;
use shelfsync_hub_core::{
    AgentConflictKind, Command, ConflictFilter, ConflictKind, ConflictStatus, Done, FeedKind, Overrides, Refusal,
};

fn alert_kinds(h: &H, after: u64) -> Vec<FeedKind> {
    h.kinds_after(after)
        .into_iter()
        .filter(|k| matches!(k, FeedKind::LowStock | FeedKind::OutOfStock | FeedKind::BackInStock))
        .collect()
}

#[test]
fn alerts_fire_once_per_crossing() {
    let mut h = H::new();
    h.stores(&["a"]);
    h.catalog("X", Some(rule(0, 3, 0, true)));
    h.stock("a", "X", 10);
    let steps: [(i64, &[FeedKind]); 7] = [
        (3, &[FeedKind::LowStock]),
        (2, &[]),
        (0, &[FeedKind::OutOfStock]),
        (2, &[FeedKind::BackInStock]), // out → low: back, not low again
        (9, &[]),
        (1, &[FeedKind::LowStock]),
        (0, &[FeedKind::OutOfStock]),
    ];
    for (on_hand, want) in steps {
        let head = h.d.feed_head();
        h.stock("a", "X", on_hand);
        assert_eq!(alert_kinds(&h, head), want, "to {on_hand}");
    }
    let head = h.d.feed_head();
    h.stock("a", "X", 20);
    assert_eq!(alert_kinds(&h, head), [FeedKind::BackInStock]);
    let e = h.feed().into_iter().rev().find(|e| e.kind == FeedKind::BackInStock).unwrap();
    assert_eq!(e.data_json(), json!({"store": "a", "sku": "X", "available": 20, "low_stock_threshold": 3}));
}

#[test]
fn uncatalogued_skus_raise_no_alerts_and_reservations_move_alerts_too() {
    let mut h = H::new();
    h.stores(&["a"]);
    h.stock("a", "X", 1);
    h.stock("a", "X", 0);
    assert!(alert_kinds(&h, 0).is_empty());
    h.catalog("Y", Some(rule(0, 0, 0, true)));
    h.stock("a", "Y", 2);
    let head = h.d.feed_head();
    h.reserved(1, vec![line("Y", 2)]);
    assert_eq!(h.kinds_after(head), [FeedKind::ReservationHeld, FeedKind::AvailabilityChanged, FeedKind::OutOfStock]);
}

#[test]
fn safety_stock_overrides_and_inactive_skus_shape_what_is_offered() {
    let mut h = H::new();
    h.stores(&["a", "b"]);
    h.stock("a", "X", 10);
    h.stock("b", "X", 10);
    let head = h.d.feed_head();
    h.catalog("X", Some(rule(2, 0, 0, true)));
    let avail: Vec<_> = h
        .feed()
        .into_iter()
        .filter(|e| e.cursor > head && e.kind == FeedKind::AvailabilityChanged)
        .map(|e| e.data_json())
        .collect();
    assert_eq!(
        avail,
        [
            json!({"store": "a", "sku": "X", "on_hand": 10, "held": 0, "safety_stock": 2, "available": 8}),
            json!({"store": "b", "sku": "X", "on_hand": 10, "held": 0, "safety_stock": 2, "available": 8}),
        ]
    );
    let head = h.d.feed_head();
    h.ok(Command::CatalogChanged {
        items: vec![],
        overrides: Some((
            s("b"),
            vec![(k("X"), Overrides { safety_stock: Some(5), low_stock_threshold: None, escrow: Default::default() })],
        )),
    });
    assert_eq!(h.kinds_after(head), [FeedKind::AvailabilityChanged], "only b's cell");
    let f = h.d.figures(&k("X"), h.now, h.d.connected());
    assert_eq!(f.iter().map(|f| (f.safety_stock, f.available)).collect::<Vec<_>>(), [(2, 8), (5, 5)]);
    h.catalog("X", Some(rule(2, 0, 0, false)));
    assert!(h.d.figures(&k("X"), h.now, h.d.connected()).iter().all(|f| f.available == 0));
    assert!(matches!(h.reserve(1, vec![line("X", 1)], None, None), Err(Refusal::Unavailable { available: 0, .. })));
    // Overrides removed: back to the catalog.
    h.ok(Command::CatalogChanged {
        items: vec![(k("X"), Some(rule(2, 0, 0, true)))],
        overrides: Some((s("b"), vec![(k("X"), Overrides::default())])),
    });
    assert_eq!(h.d.figures(&k("X"), h.now, h.d.connected())[1].available, 8);
}

#[test]
fn unknown_skus_open_once_per_store_and_resolve_when_catalogued() {
    let mut h = H::new();
    h.stores(&["a", "b"]);
    h.catalog("OFF", Some(rule(0, 0, 0, false)));
    let Done::UnknownSkus(opened) =
        h.ok(Command::JournalSkus { store: s("a"), skus: vec![k("NEW"), k("NEW"), k("OFF")] })
    else {
        panic!()
    };
    assert_eq!(opened.len(), 2);
    let Done::UnknownSkus(again) = h.ok(Command::JournalSkus { store: s("a"), skus: vec![k("NEW")] }) else { panic!() };
    assert!(again.is_empty());
    h.ok(Command::JournalSkus { store: s("b"), skus: vec![k("NEW")] });
    let all = h.d.conflicts(&ConflictFilter { status: Some(ConflictStatus::Open), limit: 10, ..Default::default() });
    assert_eq!(all.len(), 3);
    let off = all.iter().find(|c| c.sku == Some(k("OFF"))).unwrap();
    assert_eq!(
        off.resolution,
        "inactive in the catalog: add it to the catalog (or reactivate it), or correct the store's records"
    );
    assert!(all.iter().any(|c| c.resolution.starts_with("not in the catalog: ")));
    // Catalogued but inactive resolves nothing; active resolves every store's.
    h.catalog("NEW", Some(rule(0, 0, 0, false)));
    assert_eq!(
        h.d.conflicts(&ConflictFilter { status: Some(ConflictStatus::Open), limit: 10, ..Default::default() }).len(),
        3
    );
    let Done::CatalogApplied(applied) =
        h.ok(Command::CatalogChanged { items: vec![(k("NEW"), Some(rule(0, 0, 0, true)))], overrides: None })
    else {
        panic!()
    };
    assert_eq!(applied.resolved.len(), 2);
    let c = h.d.conflict(applied.resolved[0]).unwrap();
    assert_eq!((c.status, c.resolution.as_str()), (ConflictStatus::Resolved, "the sku is in the catalog now"));
    // A catalogued active SKU is not unknown.
    let Done::UnknownSkus(none) = h.ok(Command::JournalSkus { store: s("a"), skus: vec![k("NEW")] }) else { panic!() };
    assert!(none.is_empty());
    assert_eq!(h.apply(Command::JournalSkus { store: s("z"), skus: vec![] }), Err(Refusal::UnknownStore(s("z"))));
}

#[test]
fn agent_conflicts_are_recorded_once_and_people_resolve_conflicts() {
    let mut h = H::new();
    h.stores(&["a"]);
    let cmd = Command::AgentConflict {
        id: uid(50),
        kind: AgentConflictKind::WriterCloned,
        store: s("a"),
        resolution: "switch one off".into(),
        details: json!({"writer": "a@1"}),
    };
    assert_eq!(h.ok(cmd.clone()), Done::AgentConflict { new: true });
    h.advance(5);
    assert_eq!(h.ok(cmd), Done::AgentConflict { new: false });
    let e = h.feed().into_iter().find(|e| e.kind == FeedKind::WriterCloned).unwrap();
    assert_eq!(
        e.data_json(),
        json!({"conflict": {
            "id": uid(50), "kind": "writer_cloned", "store": "a", "sku": null, "shortfall": 0, "reservations": [],
            "resolution": "switch one off", "status": "open", "detected_at": "2023-11-14T22:13:20Z", "resolved_at": null,
            "details": {"writer": "a@1"},
        }})
    );
    h.stock("a", "X", -1);
    let list = h.d.conflicts(&ConflictFilter { limit: 10, ..Default::default() });
    assert_eq!(
        list.iter().map(|c| c.kind).collect::<Vec<_>>(),
        [ConflictKind::NegativeStock, ConflictKind::WriterCloned]
    );
    let Done::ConflictResolved(c) = h.ok(Command::ResolveConflict { id: uid(50), resolution: "done".into() }) else {
        panic!()
    };
    assert_eq!((c.status, c.resolved_at_ms), (ConflictStatus::Resolved, Some(h.now)));
    assert_eq!(h.kinds_after(h.d.feed_head() - 1), [FeedKind::ConflictResolved]);
    assert!(matches!(
        h.apply(Command::ResolveConflict { id: uid(50), resolution: "x".into() }),
        Err(Refusal::InvalidState(_))
    ));
    assert!(matches!(
        h.apply(Command::ResolveConflict { id: uid(51), resolution: "x".into() }),
        Err(Refusal::NotFound(_))
    ));
    // A person resolving a negative-stock conflict lets the next crossing open a new one.
    let neg = h.d.conflicts(&ConflictFilter { sku: Some(k("X")), limit: 10, ..Default::default() })[0].id;
    h.ok(Command::ResolveConflict { id: neg, resolution: "recounted".into() });
    h.stock("a", "X", -2);
    assert_eq!(
        h.d.conflicts(&ConflictFilter {
            sku: Some(k("X")),
            status: Some(ConflictStatus::Open),
            limit: 10,
            ..Default::default()
        })
        .len(),
        1
    );
}

#[test]
fn reservation_events_carry_todays_json() {
    let mut h = H::new();
    h.stores(&["a"]);
    h.stock("a", "X", 5);
    let w = h.reserve(1, vec![line("X", 2)], Some("a"), Some("ann")).unwrap();
    let Done::Reserved(w) = w else { panic!() };
    let e = h.feed().into_iter().find(|e| e.kind == FeedKind::ReservationHeld).unwrap();
    let hold = w.view.allocations[0].hold;
    let alloc = json!({"hold": hold, "store": "a", "sku": "X", "qty": 2, "status": "held"});
    assert_eq!(
        e.data_json(),
        json!({"reservation": {
            "id": uid(1), "key": uid(1).to_string(), "status": "held", "short": false, "pickup_store": "a", "customer": "ann", "channel": "web",
            "created_at": "2023-11-14T22:13:20Z", "expires_at": "2023-11-14T22:28:20Z",
            "allocations": [alloc.clone()],
            "lines": [{"sku": "X", "qty": 2, "short": 0, "allocations": [alloc]}],
        }})
    );
    let cmd = h.stock_cmd("a", "X", 3, vec![hold]);
    h.ok(cmd);
    let e = h.feed().into_iter().find(|e| e.kind == FeedKind::ReservationFulfilled).unwrap();
    let json = e.data_json();
    assert_eq!((json["hold"].clone(), json["store"].clone()), (json!(hold), json!("a")));
    assert_eq!(json["reservation"]["status"], "fulfilled");
    assert_eq!(json["reservation"]["expires_at"], serde_json::Value::Null);
}
