//! Edges of the sync sessions that fuzzing found (`tests/fuzz` in the workspace): a host loop must
//! never spin on a timer that stays in the past, and a failing session's `Error` frame must be
//! made whatever text the host refuses with.

use std::time::{Duration, Instant};

use shelfsync_shared::counter::PnEntry;
use shelfsync_shared::sync::{
    AgentResume, AgentSession, DeltaRead, Effect, HubSession, PeerAccept, StreamKind, SyncConfig,
};
use shelfsync_shared::wire::{self, close_code, Ack, Frame, FrameV1, Hello, MESSAGE_MAX_LEN};
use shelfsync_shared::{Incarnation, NodeId, Sku, StoreId, WriterId};

fn store() -> StoreId {
    "s1".parse().unwrap()
}

fn agent_writer() -> WriterId {
    WriterId::new(NodeId::Store(store()), Incarnation::from_u64(1))
}

fn hub_writer() -> WriterId {
    WriterId::new(NodeId::Hub, Incarnation::from_u64(9))
}

fn hello() -> Frame {
    Frame::V1(FrameV1::Hello(Hello::fresh(store(), agent_writer())))
}

/// After `handle_timeout(now)`, the next timer is not due yet: the host's loop sleeps until it.
fn assert_not_spinning(next: Option<Instant>, now: Instant, what: &str) {
    assert!(next.is_none_or(|t| t > now), "{what}: a timer is still due after handle_timeout: the host would spin");
}

#[test]
fn no_timer_stays_in_the_past() {
    let now = Instant::now();
    // Local changes before the handshake: nothing can be read until the peer is known.
    let mut agent = AgentSession::new(SyncConfig::default(), store(), agent_writer(), AgentResume::default());
    agent.local_head(now, 5, 5);
    agent.handle_timeout(now);
    assert_not_spinning(agent.poll_timeout(), now, "agent before the welcome");
    let mut hub = HubSession::new(SyncConfig::default(), store(), hub_writer(), 0, 0);
    hub.local_head(now, 5, 0);
    hub.handle_timeout(now);
    assert_not_spinning(hub.poll_timeout(), now, "hub before the hello");

    // With the window full, the next read waits for an ack, not for a timer.
    let config = SyncConfig { window: 1, delta_limit: 1, ..SyncConfig::default() };
    let mut hub = HubSession::new(config, store(), hub_writer(), 0, 0);
    hub.handle_frame(now, hello()).unwrap();
    assert!(matches!(hub.poll_effect(), Some(Effect::LookupPeer { .. })));
    hub.accept(now, PeerAccept::default()).unwrap();
    hub.local_head(now, 3, 0);
    let sku: Sku = "A".parse().unwrap();
    let mut reads = 0;
    while let Some(e) = hub.poll_effect() {
        if let Effect::ReadDelta { after, .. } = e {
            reads += 1;
            let entries = vec![(sku.clone(), hub_writer(), PnEntry { p: after + 1, n: 0 })];
            hub.delta_read(now, DeltaRead { upto: after + 1, entries, ..DeltaRead::default() }).unwrap();
        }
    }
    assert_eq!(reads, 1, "one frame in flight fills a window of one");
    hub.handle_timeout(now);
    assert_not_spinning(hub.poll_timeout(), now, "hub with its window full");
    // The ack frees the window and the next read starts at once.
    hub.handle_frame(now, Frame::V1(FrameV1::Ack(Ack { upto: 1 }))).unwrap();
    let effects: Vec<Effect> = std::iter::from_fn(|| hub.poll_effect()).collect();
    assert!(effects.iter().any(|e| matches!(e, Effect::ReadDelta { after: 1, .. })), "{effects:?}");

    // After a failure nothing is read either.
    let mut hub = HubSession::new(SyncConfig::default(), store(), hub_writer(), 5, 0);
    hub.handle_frame(now, hello()).unwrap();
    let _ = hub.refuse(close_code::DUPLICATE_AGENT, "another agent is connected");
    let later = now + Duration::from_secs(1);
    hub.local_head(later, 9, 0);
    hub.handle_timeout(later);
    assert_not_spinning(hub.poll_timeout(), later, "a failed session");
}

#[test]
fn an_error_message_is_cut_at_a_character_boundary() {
    let mut hub = HubSession::new(SyncConfig::default(), store(), hub_writer(), 0, 0);
    // 3-byte characters: the limit falls inside one.
    let message = "€".repeat(MESSAGE_MAX_LEN);
    let err = hub.refuse(close_code::DUPLICATE_AGENT, message.clone());
    assert_eq!(err.message, message, "the host logs all of it");
    let t = std::iter::from_fn(|| hub.poll_transmit()).last().expect("an Error frame");
    assert_eq!(t.stream, StreamKind::State);
    let Frame::V1(FrameV1::Error(e)) = &t.frame else { panic!("{:?}", t.frame) };
    assert!(e.message.len() <= MESSAGE_MAX_LEN && e.message.len() > MESSAGE_MAX_LEN - 3);
    assert!(message.starts_with(&e.message));
    wire::encode(&t.frame).expect("the frame is within the limit");
}

/// `accept` answers the one `LookupPeer`; a second call is a host bug, reported, not a second
/// handshake that would restart both directions.
#[test]
fn a_second_accept_is_refused() {
    let now = Instant::now();
    let mut hub = HubSession::new(SyncConfig::default(), store(), hub_writer(), 0, 0);
    hub.handle_frame(now, hello()).unwrap();
    hub.accept(now, PeerAccept::default()).unwrap();
    let effects: Vec<Effect> = std::iter::from_fn(|| hub.poll_effect()).collect();
    assert_eq!(effects.iter().filter(|e| matches!(e, Effect::Established { .. })).count(), 1);
    while hub.poll_transmit().is_some() {}
    let err = hub.accept(now, PeerAccept { applied: 7, ..PeerAccept::default() }).unwrap_err();
    assert_eq!(err.code, close_code::INTERNAL);
    assert!(!std::iter::from_fn(|| hub.poll_effect()).any(|e| matches!(e, Effect::Established { .. })));
    let last = std::iter::from_fn(|| hub.poll_transmit()).last().expect("an Error frame");
    assert!(matches!(last.frame, Frame::V1(FrameV1::Error(ref e)) if e.code == close_code::INTERNAL));
}
