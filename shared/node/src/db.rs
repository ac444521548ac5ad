//! SQLite helpers both binaries' stores use: the storage error, the wake-up [`Heads`], opening a
//! connection, migrations, the `meta` table and parsing ids read back from the database.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags, OptionalExtension};
use shelfsync_shared::{CounterError, Sku, WriterId};

use crate::config::Synchronous;
use crate::sqlite::SqliteError;

/// Storage failures. Cloneable so one failed group commit can answer every request in it.
#[derive(Clone, Debug, thiserror::Error)]
pub enum DbError {
    /// SQLite said no.
    #[error("database error: {0}")]
    Sqlite(String),
    /// `run` before `init`.
    #[error("no agent database at {0}; run `shelfsync-agent init` first")]
    NotInitialized(PathBuf),
    /// `init` twice.
    #[error("an agent database already exists at {0}")]
    AlreadyExists(PathBuf),
    /// The database was made by a newer agent.
    #[error("database schema version {found} is newer than this agent understands ({known})")]
    TooNew { found: u32, known: u32 },
    /// Something in the file is not what this agent wrote.
    #[error("database content is invalid: {0}")]
    Corrupt(String),
    /// The storage thread has stopped.
    #[error("the storage thread has stopped")]
    Closed,
    /// Counter arithmetic refused a change.
    #[error(transparent)]
    Counter(#[from] CounterError),
}

impl From<SqliteError> for DbError {
    fn from(e: SqliteError) -> Self {
        match e {
            SqliteError::Sqlite(m) => DbError::Sqlite(m),
            SqliteError::Closed => DbError::Closed,
        }
    }
}

impl From<rusqlite::Error> for DbError {
    fn from(e: rusqlite::Error) -> Self {
        DbError::Sqlite(e.to_string())
    }
}

/// Highest local sequences, published after every commit so the sync client can ship at once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Heads {
    /// Counter sequence.
    pub counter: u64,
    /// Journal sequence.
    pub journal: u64,
    /// Hub only: bumped whenever a store's holds change (the agent leaves it at 0).
    pub holds: u64,
    /// Bumped when the catalog documents change locally (agent: its overrides; hub: the catalog).
    pub catalog: u64,
    /// Hub only: bumped to ask a store's connections whether their agents are alive.
    pub ping: u64,
}

/// Opens a connection in WAL mode with the given durability.
pub fn open_conn(path: &Path, flags: OpenFlags, sync: Synchronous) -> Result<Connection, DbError> {
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", sync.pragma())?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
}

/// Applies the migrations `PRAGMA user_version` says have not run yet, each in its own transaction.
pub fn migrate(conn: &mut Connection, migrations: &[&str]) -> Result<(), DbError> {
    let version: u32 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let known = migrations.len() as u32;
    if version > known {
        return Err(DbError::TooNew { found: version, known });
    }
    for (i, sql) in migrations.iter().enumerate().skip(version as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as u32)?;
        tx.commit()?;
    }
    Ok(())
}

/// One `meta` value.
pub fn meta_get(conn: &Connection, key: &str) -> Result<Option<String>, DbError> {
    Ok(conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0)).optional()?)
}

/// Sets one `meta` value.
pub fn meta_set(conn: &Connection, key: &str, value: &str) -> Result<(), DbError> {
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        [key, value],
    )?;
    Ok(())
}

/// Parses a SKU read back from the database.
pub fn sku_col(s: String) -> Result<Sku, DbError> {
    s.parse().map_err(|e| DbError::Corrupt(format!("sku in database: {e}")))
}

/// Parses a writer read back from the database.
pub fn writer_col(s: String) -> Result<WriterId, DbError> {
    s.parse().map_err(|e| DbError::Corrupt(format!("writer in database: {e}")))
}

/// How a storage failure answers an HTTP request (the agent's handlers use `?` on it).
impl From<DbError> for crate::http::ApiError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::Counter(c) => crate::http::ApiError::invalid(c.to_string()),
            DbError::Closed => crate::http::ApiError::unavailable("the agent is shutting down"),
            other => crate::http::ApiError::internal(other),
        }
    }
}
