//! A storage job that panics stops the process (fail-stop) instead of leaving a writer that
//! answers errors forever.

use shelfsync_node::sqlite::{SqliteError, SqliteThreads};

#[tokio::test]
async fn a_panicking_write_job_fails_the_process_stop() {
    shelfsync_node::fatal::no_backstop_exit();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch("CREATE TABLE t (x INTEGER)").unwrap();
    let threads = SqliteThreads::spawn("t", conn, vec![], 16, Box::new(|_| {})).unwrap();
    threads.write(|c| c.execute("INSERT INTO t VALUES (1)", []).map(|_| ()).map_err(SqliteError::from)).await.unwrap();
    assert!(!shelfsync_node::fatal::is_stopping());

    let r: Result<(), SqliteError> = threads.write(|_| panic!("a bug in a storage job")).await;
    assert!(matches!(r, Err(SqliteError::Closed)), "{r:?}");
    let reason =
        tokio::time::timeout(std::time::Duration::from_secs(5), shelfsync_node::fatal::stopped()).await.unwrap();
    assert!(shelfsync_node::fatal::is_stopping(), "the panic started a fail-stop");
    assert!(reason.contains("panicked"), "{reason}");
    // Nothing is written any more, and nobody waits forever.
    let r: Result<(), SqliteError> =
        threads.write(|c| c.execute("INSERT INTO t VALUES (2)", []).map(|_| ()).map_err(SqliteError::from)).await;
    assert!(matches!(r, Err(SqliteError::Closed)), "{r:?}");
    let n: i64 =
        rusqlite::Connection::open(&path).unwrap().query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0)).unwrap();
    assert_eq!(n, 1, "the panicking job's transaction was rolled back");
}
