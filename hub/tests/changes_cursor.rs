//! The change feed's stored query takes any cursor a client can send (`?after=`,
//! `Last-Event-ID`): cursors are SQLite integers, so one beyond `i64::MAX` finds nothing, where
//! binding it used to fail and answer 500 (found by the `hub_bodies` fuzz target).

use shelfsync_hub::persist::{feed_after, write};
use shelfsync_hub::sqlite::{db_path, SqliteStorage};
use shelfsync_hub_core::{FeedData, FeedEvent, FeedKind, Record};

#[test]
fn a_cursor_beyond_i64_finds_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(dir.path());
    SqliteStorage::create(&path).unwrap();
    let conn = rusqlite::Connection::open(&path).unwrap();
    let data = FeedData::Availability {
        store: "s1".parse().unwrap(),
        sku: "A".parse().unwrap(),
        on_hand: 1,
        held: 0,
        safety_stock: 0,
        available: 1,
    };
    write(&conn, &[Record::Feed(FeedEvent { cursor: 1, kind: FeedKind::AvailabilityChanged, at_ms: 0, data })])
        .unwrap();
    assert_eq!(feed_after(&conn, 0, 10).unwrap().len(), 1);
    for after in [1, i64::MAX as u64, i64::MAX as u64 + 1, 18_441_044_100_551_055_161, u64::MAX] {
        assert!(feed_after(&conn, after, 10).unwrap().is_empty(), "after {after}");
    }
}
