//! The change feed's query takes any cursor a client can send (`?after=`, `Last-Event-ID`):
//! cursors are SQLite integers, so one beyond `i64::MAX` finds nothing, where binding it used to
//! fail and answer 500 (found by the `hub_bodies` fuzz target).

use shelfsync_hub::reserve::changes_after;
use shelfsync_hub::sqlite::{db_path, SqliteStorage};

#[test]
fn a_cursor_beyond_i64_finds_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(dir.path());
    SqliteStorage::create(&path).unwrap();
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute("INSERT INTO changes (cursor, kind, at_ms, data) VALUES (1, 'availability_changed', 0, '{}')", [])
        .unwrap();
    assert_eq!(changes_after(&conn, 0, 10).unwrap().len(), 1);
    for after in [1, i64::MAX as u64, i64::MAX as u64 + 1, 18_441_044_100_551_055_161, u64::MAX] {
        assert!(changes_after(&conn, after, 10).unwrap().is_empty(), "after {after}");
    }
}
