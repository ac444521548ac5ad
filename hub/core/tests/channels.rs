//! Sales channels at the decider (`hub/docs/channels.md`): a channel's available-to-sell from its
//! stores, buffer, cap and lag margin; live channels refused beyond it, lagged channels recorded
//! short with a `channel_oversell` conflict; the channel on reservations, their conflicts and the
//! feed; channel records rebuild the same state.

mod common;

use std::collections::HashSet;

use common::*;
use shelfsync_hub_core::{
    Buffer, Cap, Channel, ChannelId, Command, ConflictFilter, ConflictKind, Done, FeedData, FeedKind, Fulfil, Latency,
    Refusal, ReservationRequest,
};

fn ch(id: &str) -> ChannelId {
    id.parse().unwrap()
}

fn channel(id: &str) -> Channel {
    Channel { id: ch(id), ..Channel::web() }
}

fn put(h: &mut H, c: Channel) -> Done {
    h.ok(Command::PutChannel(c))
}

fn reserve_via(
    h: &mut H,
    id: u128,
    channel: &str,
    sku: &str,
    qty: u64,
    pickup: Option<&str>,
) -> shelfsync_hub_core::Outcome {
    h.apply(Command::Reserve(ReservationRequest {
        id: uid(id),
        key: None,
        lines: vec![line(sku, qty)],
        ttl_secs: 900,
        pickup_store: pickup.map(s),
        customer: None,
        channel: Some(ch(channel)),
    }))
}

fn ats(h: &H, channel: &str, sku: &str) -> shelfsync_hub_core::ChannelFigures {
    h.d.channel_figures(&ch(channel), &k(sku), h.now, &HashSet::new()).expect("a channel")
}

#[test]
fn ids_and_values_are_checked_and_web_always_exists() {
    assert!("amazon".parse::<ChannelId>().is_ok() && "ebay-de".parse::<ChannelId>().is_ok());
    for bad in ["", "Amazon", "-x", "a b", &"x".repeat(33)] {
        assert!(bad.parse::<ChannelId>().is_err(), "{bad}");
    }
    let mut h = H::new();
    h.stores(&["a"]);
    assert_eq!(h.d.channels().iter().map(|c| c.id.as_str()).collect::<Vec<_>>(), ["web"]);
    let bad = Channel { buffer: Buffer { units: 0, share_pct: 101 }, ..channel("amazon") };
    let err = h.apply(Command::PutChannel(bad)).unwrap_err();
    assert!(matches!(&err, Refusal::Invalid(m) if m.contains("buffer.share_pct")), "{err}");
    let lag0 = Channel { latency: Latency::Lagged { lag_secs: 0 }, ..channel("amazon") };
    assert!(matches!(h.apply(Command::PutChannel(lag0)), Err(Refusal::Invalid(m)) if m.contains("lag_secs")));
    let ghost = Channel { fulfil: Fulfil::Stores([s("zz")].into()), ..channel("amazon") };
    assert!(matches!(h.apply(Command::PutChannel(ghost)), Err(Refusal::UnknownStore(_))));
    assert!(matches!(h.apply(Command::RemoveChannel(ch("web"))), Err(Refusal::Invalid(_))));
    assert!(matches!(h.apply(Command::RemoveChannel(ch("app"))), Err(Refusal::NotFound(_))));
    assert!(
        matches!(reserve_via(&mut h, 1, "app", "X", 1, None), Err(Refusal::Invalid(m)) if m.contains("no channel app"))
    );
    put(&mut h, channel("app"));
    assert_eq!(h.d.channels().len(), 2);
    h.ok(Command::RemoveChannel(ch("app")));
    assert_eq!(h.d.channels().len(), 1);
    assert_eq!(h.rebuilt().snapshot(), h.d.snapshot());
}

#[test]
fn a_channels_ats_is_its_stores_less_buffer_within_its_cap() {
    let mut h = H::new();
    h.stores(&["a", "b", "c"]);
    h.stock("a", "X", 10);
    h.stock("b", "X", 6);
    h.stock("c", "X", 4);
    // The app ships from a and b only, keeps back 2 or 25 %, and may list at most half the chain.
    let app = Channel {
        fulfil: Fulfil::Stores([s("a"), s("b")].into()),
        buffer: Buffer { units: 2, share_pct: 25 },
        cap: Cap { units: None, share_pct: Some(50) },
        ..channel("app")
    };
    let head = h.d.feed_head();
    put(&mut h, app.clone());
    let f = ats(&h, "app", "X");
    assert_eq!((f.pool, f.buffer, f.cap, f.ats), (16, 4, Some(10), 10), "⌈25 % × 16⌉ = 4; half of 20 = 10");
    let events: Vec<_> = h.feed().into_iter().filter(|e| e.cursor > head).collect();
    assert!(matches!(&events[..], [e] if e.kind == FeedKind::ChannelAtsChanged), "{events:?}");
    assert_eq!(events[0].data_json()["ats"], 10);
    // web is untouched: every store, nothing withheld.
    assert_eq!(ats(&h, "web", "X").ats, 20);

    // A live channel is refused beyond its ats, and sources only from its stores.
    let err = reserve_via(&mut h, 1, "app", "X", 11, None).unwrap_err();
    assert!(matches!(err, Refusal::Unavailable { available: 10, .. }), "{err}");
    let Ok(Done::Reserved(w)) = reserve_via(&mut h, 2, "app", "X", 9, None) else { panic!("reserved") };
    assert!(w.view.allocations.iter().all(|a| a.store != s("c")), "{:?}", w.view.allocations);
    assert_eq!(w.view.channel, Some(ch("app")));
    assert_eq!(w.view.to_json()["channel"], "app");
    let Done::Reserved(web) = h.ok(Command::Reserve(ReservationRequest {
        id: uid(3),
        key: None,
        lines: vec![line("X", 1)],
        ttl_secs: 900,
        pickup_store: None,
        customer: None,
        channel: None,
    })) else {
        panic!("reserved")
    };
    assert_eq!(web.view.to_json()["channel"], "web");
    // What is left of a and b after both, less the buffer (the cap no longer binds).
    let f = ats(&h, "app", "X");
    assert_eq!(f.ats, f.pool - f.buffer, "{f:?}");
    // A pickup at a store outside the channel is refused.
    let err = reserve_via(&mut h, 4, "app", "X", 1, Some("c")).unwrap_err();
    assert!(matches!(&err, Refusal::Invalid(m) if m.contains("does not fulfil channel app")), "{err}");
    assert_eq!(h.rebuilt().snapshot(), h.d.snapshot());
}

#[test]
fn a_skus_own_buffer_replaces_the_channels_for_that_sku_only() {
    let mut h = H::new();
    h.stores(&["a"]);
    h.stock("a", "X", 10);
    h.stock("a", "Y", 10);
    let market = Channel {
        buffer: Buffer { units: 1, share_pct: 0 },
        sku_buffers: [(k("X"), 6)].into(),
        latency: Latency::Lagged { lag_secs: 300 },
        ..channel("market")
    };
    put(&mut h, market.clone());
    assert_eq!((ats(&h, "market", "X").buffer, ats(&h, "market", "X").ats), (6, 4), "X's own buffer");
    assert_eq!((ats(&h, "market", "Y").buffer, ats(&h, "market", "Y").ats), (1, 9), "the channel's for the rest");
    // Less than the channel's works too: the SKU's own number wins either way.
    put(&mut h, Channel { sku_buffers: [(k("Y"), 0)].into(), ..market });
    assert_eq!((ats(&h, "market", "X").ats, ats(&h, "market", "Y").ats), (9, 10));
    let too_many =
        Channel { sku_buffers: (0..=10_000).map(|i| (k(&format!("S{i}")), 1)).collect(), ..channel("market") };
    let err = h.apply(Command::PutChannel(too_many)).unwrap_err();
    assert!(matches!(&err, Refusal::Invalid(m) if m.contains("sku_buffers")), "{err}");
    assert_eq!(h.rebuilt().snapshot(), h.d.snapshot());
}

#[test]
fn a_lagged_channels_margin_counts_what_the_other_channels_reserve() {
    let mut h = H::new();
    h.stores(&["a"]);
    h.stock("a", "X", 100);
    put(&mut h, Channel { latency: Latency::Lagged { lag_secs: 600 }, ..channel("market") });
    assert_eq!(ats(&h, "market", "X").lag_margin, 0, "nobody sells or reserves X yet");
    // Its own orders are no reason to hold back from itself.
    for i in 0..5 {
        assert!(reserve_via(&mut h, 100 + i, "market", "X", 2, None).is_ok());
    }
    assert_eq!(ats(&h, "market", "X").lag_margin, 0);
    // The web reserving X fast is: while the listing is stale, those orders take its units.
    for i in 0..10 {
        assert!(reserve_via(&mut h, 200 + i, "web", "X", 2, None).is_ok());
    }
    let f = ats(&h, "market", "X");
    assert!(f.lag_margin > 0, "{f:?}");
    assert_eq!(f.ats, f.pool - f.lag_margin, "{f:?}");
    assert_eq!(ats(&h, "web", "X").lag_margin, 0, "a live channel keeps no margin");
    assert_eq!(h.rebuilt().snapshot(), h.d.snapshot(), "the demand is recorded");
}

#[test]
fn a_lagged_channel_keeps_a_margin_and_its_oversells_are_recorded_short() {
    let mut h = H::new();
    h.stores(&["a", "b"]);
    h.stock("a", "X", 12);
    h.stock("b", "X", 8);
    // Walk-ins at a sell 6 in a short while: a velocity the lag margin covers.
    h.now += 60_000;
    h.stock("a", "X", 6);
    let market = Channel {
        latency: Latency::Lagged { lag_secs: 600 },
        buffer: Buffer { units: 1, share_pct: 0 },
        ..channel("market")
    };
    put(&mut h, market);
    let f = ats(&h, "market", "X");
    assert_eq!(f.pool, 14);
    assert!(f.lag_margin > 0, "a store selling fast leaves a margin: {f:?}");
    assert_eq!(f.ats, 14 - 1 - f.lag_margin);

    // The marketplace sold 10 on a listing older than what happened since: within the pool, so
    // promised in full (the buffer and the margin are there for this), no conflict.
    let Ok(Done::Reserved(w)) = reserve_via(&mut h, 1, "market", "X", 10, None) else { panic!("recorded") };
    assert!(!w.view.short);
    assert!(h.d.conflicts(&ConflictFilter { limit: 10, ..Default::default() }).is_empty());
    // It sells 7 more: 4 are left; 3 are short at the store with the most on hand, and a
    // channel_oversell conflict says so. A web promise is never cut for it.
    let head = h.d.feed_head();
    let Ok(Done::Reserved(w)) = reserve_via(&mut h, 2, "market", "X", 7, None) else { panic!("recorded") };
    assert!(w.view.short);
    assert_eq!(w.view.lines[0].short, 3);
    let conflicts = h.d.conflicts(&ConflictFilter { limit: 10, ..Default::default() });
    assert_eq!(conflicts.len(), 1);
    let c = &conflicts[0];
    assert_eq!((c.kind, c.shortfall, c.reservations.clone()), (ConflictKind::ChannelOversell, 3, vec![uid(2)]));
    assert_eq!(c.details.as_ref().unwrap()["channel"], "market");
    let kinds = h.kinds_after(head);
    for k in [FeedKind::ReservationHeld, FeedKind::ReservationShort, FeedKind::ChannelOversell] {
        assert!(kinds.contains(&k), "{k:?} in {kinds:?}");
    }
    for st in ["a", "b"] {
        assert!(h.d.held(&s(st), &k("X")) as i64 <= h.d.on_hand(&s(st), &k("X")), "never promised twice at {st}");
    }
    assert!(h.feed().iter().any(|e| matches!(&e.data, FeedData::ChannelAts { figures, .. } if figures.ats == 0)));
    assert_eq!(h.rebuilt().snapshot(), h.d.snapshot());
}

#[test]
fn a_click_and_collect_channel_takes_only_orders_naming_a_store() {
    let mut h = H::new();
    h.stores(&["a", "b"]);
    h.stock("a", "X", 3);
    put(&mut h, Channel { fulfil: Fulfil::Pickup, ..channel("collect") });
    let err = reserve_via(&mut h, 1, "collect", "X", 1, None).unwrap_err();
    assert!(matches!(&err, Refusal::Invalid(m) if m.contains("pickup_store")), "{err}");
    let Ok(Done::Reserved(w)) = reserve_via(&mut h, 2, "collect", "X", 2, Some("a")) else { panic!("reserved") };
    assert_eq!(w.view.allocations[0].store, s("a"));
    // A revoked store leaves every channel's pool.
    let before = ats(&h, "collect", "X").pool;
    h.ok(Command::RevokeStore { store: s("a") });
    assert_eq!((before, ats(&h, "collect", "X").pool), (1, 0));
    assert_eq!(h.rebuilt().snapshot(), h.d.snapshot());
}
