//! The agent's SQLite store: schema, migrations, identity and the row-level helpers, on top of
//! [`shelfsync_node::sqlite::SqliteThreads`] (one group-committing writer thread, one reader thread).

use shelfsync_node::now_ms;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use shelfsync_shared::counter::sum_entries;
use shelfsync_shared::{Incarnation, NodeId, PnEntry, Sku, StoreId, WriterId};
use tokio::sync::watch;

use shelfsync_node::config::Synchronous;
pub use shelfsync_node::db::{meta_get, meta_set, migrate, open_conn, sku_col, writer_col, DbError, Heads};
use shelfsync_node::dbfile;
use shelfsync_node::sqlite::{AfterCommit, SqliteThreads};

/// Schema migrations, applied in order; `PRAGMA user_version` counts how many ran.
pub(crate) const MIGRATIONS: &[&str] = &[
    // 1: the ledger.
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
     CREATE TABLE counters (
        sku TEXT NOT NULL, writer TEXT NOT NULL,
        p INTEGER NOT NULL CHECK (p >= 0), n INTEGER NOT NULL CHECK (n >= 0),
        seq INTEGER NOT NULL,
        PRIMARY KEY (sku, writer)) WITHOUT ROWID;
     CREATE UNIQUE INDEX counters_seq ON counters(seq);
     CREATE TABLE stock (sku TEXT PRIMARY KEY, on_hand INTEGER NOT NULL) WITHOUT ROWID;
     CREATE TABLE requests (
        id BLOB PRIMARY KEY, kind TEXT NOT NULL, fingerprint BLOB NOT NULL,
        response TEXT NOT NULL, recorded_at_ms INTEGER NOT NULL) WITHOUT ROWID;
     CREATE TABLE journal (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id BLOB NOT NULL, line INTEGER NOT NULL, kind TEXT NOT NULL, store TEXT NOT NULL,
        sku TEXT NOT NULL, delta INTEGER NOT NULL, reason TEXT,
        occurred_at_ms INTEGER NOT NULL, recorded_at_ms INTEGER NOT NULL,
        writer TEXT NOT NULL, flags INTEGER NOT NULL DEFAULT 0,
        UNIQUE (id, line));
     CREATE TABLE hub_link (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        hub_writer TEXT, applied INTEGER NOT NULL DEFAULT 0, journal_applied INTEGER NOT NULL DEFAULT 0,
        acked INTEGER NOT NULL DEFAULT 0, journal_acked INTEGER NOT NULL DEFAULT 0,
        last_sync_ms INTEGER);
     INSERT INTO hub_link (id) VALUES (1);",
    // 2: online holds pushed down by the hub.
    crate::holds::MIGRATION,
    // 3: the catalog replica and this store's overrides.
    shelfsync_node::catalog::MIGRATION,
    // 4: writer lineage (ordinals and chains of own changes, boots, retired writers, entry tags).
    crate::lineage::MIGRATION,
    // 5: counts ordered by occurred_at (the anchor of each counted SKU).
    crate::counts::MIGRATION,
    // 6: transfers on their way to this store, pushed down by the hub.
    crate::incoming::MIGRATION,
    // 7: escrow rights and the hub's escrow policy.
    crate::rights::MIGRATION,
    // 8: escrow rules of catalog entries and of this store's overrides.
    shelfsync_node::catalog::ESCROW_MIGRATION,
];

/// Who this database is. The writer changes when the agent retires a forked one
/// ([`crate::lineage`]); read it inside the write job that uses it ([`Db::current`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The store.
    pub store: StoreId,
    /// The writer of this database's life.
    pub writer: WriterId,
    /// When this incarnation began.
    pub incarnation_started_ms: i64,
}

/// How to open the database.
#[derive(Clone, Copy, Debug)]
pub struct DbOptions {
    /// `PRAGMA synchronous`.
    pub synchronous: Synchronous,
    /// Most jobs per group commit.
    pub group_commit_max: usize,
}

impl Default for DbOptions {
    fn default() -> Self {
        DbOptions { synchronous: Synchronous::Full, group_commit_max: 256 }
    }
}

/// Handle to the storage threads. Cheap to clone.
#[derive(Clone)]
pub struct Db {
    inner: Arc<Inner>,
}

/// The live identity, shared with the storage jobs: a job reads the writer when it runs, so
/// once a retirement committed its place in the queue, no later write uses the old writer.
#[derive(Clone, Debug)]
pub struct Current(Arc<std::sync::RwLock<Identity>>);

impl Current {
    /// Who this database is now.
    pub fn get(&self) -> Identity {
        self.0.read().expect("identity lock").clone()
    }

    /// A retirement changed the writer (called inside its write job).
    pub fn set_writer(&self, writer: WriterId, started_ms: i64) {
        let mut id = self.0.write().expect("identity lock");
        id.writer = writer;
        id.incarnation_started_ms = started_ms;
    }
}

struct Inner {
    threads: SqliteThreads,
    identity: Current,
    heads: watch::Receiver<Heads>,
    path: PathBuf,
}

/// How to get a good agent database back, for refusals at start-up.
fn recovery_advice(path: &Path) -> String {
    let dir = path.parent().map(|d| d.display().to_string()).unwrap_or_else(|| ".".into());
    format!(
        "To recover a store that syncs with a hub, move the data dir aside (mv {dir} {dir}.damaged) and \
         re-seed it from the hub with `shelfsync-agent init --bundle {dir}.damaged/bundle --data-dir {dir}` \
         (a new writer incarnation; nothing the hub has is lost); otherwise put a copy made by \
         `shelfsync-agent backup` in its place"
    )
}

fn mint_incarnation(conn: &Connection, store: &StoreId) -> Result<Identity, DbError> {
    let incarnation = Incarnation::from_u64(rand::random::<u64>());
    let writer = WriterId::new(NodeId::Store(store.clone()), incarnation);
    let started = now_ms();
    meta_set(conn, "store_id", store.as_str())?;
    meta_set(conn, "writer", &writer.to_string())?;
    meta_set(conn, "incarnation_started_ms", &started.to_string())?;
    conn.execute("DELETE FROM meta WHERE key = 'restored_copy'", [])?;
    Ok(Identity { store: store.clone(), writer, incarnation_started_ms: started })
}

pub(crate) fn load_identity(conn: &Connection) -> Result<Identity, DbError> {
    let get = |k: &str| meta_get(conn, k)?.ok_or_else(|| DbError::Corrupt(format!("meta key {k} is missing")));
    let store: StoreId = get("store_id")?.parse().map_err(|e| DbError::Corrupt(format!("store_id: {e}")))?;
    let writer: WriterId = get("writer")?.parse().map_err(|e| DbError::Corrupt(format!("writer: {e}")))?;
    let started =
        get("incarnation_started_ms")?.parse().map_err(|e| DbError::Corrupt(format!("incarnation_started_ms: {e}")))?;
    if !writer.is_store(&store) {
        return Err(DbError::Corrupt(format!("writer {writer} does not belong to store {store}")));
    }
    Ok(Identity { store, writer, incarnation_started_ms: started })
}

/// The counter sequence's head: the highest place of a counter entry or of an escrow rights
/// entry of this store's writers (both ride the same deltas).
pub fn counter_head(conn: &Connection) -> Result<u64, DbError> {
    let head: Option<u64> = conn
        .prepare_cached(
            "SELECT MAX(s) FROM (SELECT MAX(seq) AS s FROM counters UNION ALL SELECT MAX(seq) FROM rights)",
        )?
        .query_row([], |r| r.get(0))?;
    Ok(head.unwrap_or(0))
}

/// Reads the current heads.
pub fn heads(conn: &Connection) -> Result<Heads, DbError> {
    let counter = counter_head(conn)?;
    let journal: Option<u64> = conn.query_row("SELECT MAX(seq) FROM journal", [], |r| r.get(0))?;
    let catalog: u64 = conn.query_row(
        "SELECT COALESCE(MAX(seq), 0) FROM doc_chunks WHERE doc = ?1",
        [crate::catalog::LOCAL_OVERRIDES_DOC],
        |r| r.get(0),
    )?;
    Ok(Heads { counter, journal: journal.unwrap_or(0), holds: 0, catalog, ping: 0 })
}

impl Db {
    /// Creates a new database for `store` with a fresh writer incarnation. Blocking.
    pub fn create(path: &Path, store: &StoreId, opts: DbOptions) -> Result<Identity, DbError> {
        if path.exists() {
            return Err(DbError::AlreadyExists(path.to_owned()));
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            dbfile::create_private_dir(dir).map_err(|e| DbError::Sqlite(format!("creating {}: {e}", dir.display())))?;
        }
        dbfile::create_private_file(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => DbError::AlreadyExists(path.to_owned()),
            _ => DbError::Sqlite(format!("creating {}: {e}", path.display())),
        })?;
        let mut conn = open_conn(path, OpenFlags::default(), opts.synchronous)?;
        migrate(&mut conn, MIGRATIONS)?;
        let tx = conn.transaction()?;
        let identity = mint_incarnation(&tx, store)?;
        tx.commit()?;
        Ok(identity)
    }

    /// Opens an existing database and starts its threads. Blocking; call from `spawn_blocking`
    /// or before the runtime starts. A database restored from a backup takes a new incarnation.
    pub fn open(path: &Path, opts: DbOptions) -> Result<Db, DbError> {
        dbfile::check_existing(path, &recovery_advice(path)).map_err(|e| match e {
            dbfile::FileError::Missing(p) => DbError::NotInitialized(p),
            dbfile::FileError::Unusable(m) => DbError::Corrupt(m),
        })?;
        let bundle = path.parent().map(|d| vec![d.join("bundle")]).unwrap_or_default();
        dbfile::tighten_install(path, &bundle);
        let mut conn = open_conn(path, OpenFlags::SQLITE_OPEN_READ_WRITE, opts.synchronous)?;
        migrate(&mut conn, MIGRATIONS)?;
        let identity = {
            let tx = conn.transaction()?;
            let identity = load_identity(&tx)?;
            if meta_get(&tx, "restored_copy")?.is_some() {
                // The writer stays: the hub checks this copy's history on connect, and if it forked
                // from what the hub merged, the changes made since the restore move to a new writer
                // then (a new writer now would freeze the old one's entries, which may hold changes
                // the hub's history of it does not).
                tx.execute("DELETE FROM meta WHERE key = 'restored_copy'", [])?;
                tracing::warn!(writer = %identity.writer, "database was restored from a backup; the hub will check its history on connect");
            }
            crate::lineage::start(&tx, &identity.writer, now_ms())?;
            tx.commit()?;
            identity
        };
        let reader_conn = open_conn(path, OpenFlags::SQLITE_OPEN_READ_ONLY, opts.synchronous)?;
        let initial = heads(&conn)?;
        let (heads_tx, heads_rx) = watch::channel(initial);
        let after_commit: AfterCommit = Box::new(move |conn| match heads(conn) {
            Ok(h) => {
                heads_tx.send_if_modified(|old| std::mem::replace(old, h) != h);
            }
            Err(e) => tracing::error!(error = %e, "cannot read heads"),
        });
        let threads = SqliteThreads::spawn("agent", conn, vec![reader_conn], opts.group_commit_max, after_commit)
            .map_err(|e| DbError::Sqlite(format!("spawning storage threads: {e}")))?;
        let identity = Current(Arc::new(std::sync::RwLock::new(identity)));
        Ok(Db { inner: Arc::new(Inner { threads, identity, heads: heads_rx, path: path.to_owned() }) })
    }

    /// How long each group commit took (for `/metrics`).
    pub fn commit_seconds(&self) -> prometheus_client::metrics::histogram::Histogram {
        self.inner.threads.commit_seconds.clone()
    }

    /// Who this database is now.
    pub fn identity(&self) -> Identity {
        self.inner.identity.get()
    }

    /// The live identity, to read inside a write job.
    pub fn current(&self) -> Current {
        self.inner.identity.clone()
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Heads, updated after every commit.
    pub fn heads(&self) -> watch::Receiver<Heads> {
        self.inner.heads.clone()
    }

    /// Runs `f` inside the next group commit; answers only after the commit is durable.
    pub async fn write<R, E>(&self, f: impl FnOnce(&Connection) -> Result<R, E> + Send + 'static) -> Result<R, E>
    where
        R: Send + 'static,
        E: From<DbError> + Send + 'static,
    {
        let r: Result<Result<R, E>, DbError> = self.inner.threads.write(move |conn| Ok(f(conn))).await;
        r.map_err(E::from)?
    }

    /// Runs `f` on the reader connection.
    pub async fn read<R, E>(&self, f: impl FnOnce(&Connection) -> Result<R, E> + Send + 'static) -> Result<R, E>
    where
        R: Send + 'static,
        E: From<DbError> + Send + 'static,
    {
        let r: Result<Result<R, E>, DbError> = self.inner.threads.read(move |conn| Ok(f(conn))).await;
        r.map_err(E::from)?
    }

    /// Copies the live database to `to` with SQLite's online backup API. The copy is marked as
    /// restored, so whoever opens it logs so; its writer's history is checked by the hub.
    pub async fn backup(&self, to: PathBuf) -> Result<(), DbError> {
        self.read(move |conn| {
            dbfile::create_private_file(&to).map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => DbError::AlreadyExists(to.clone()),
                _ => DbError::Sqlite(format!("creating {}: {e}", to.display())),
            })?;
            conn.backup(rusqlite::MAIN_DB, &to, None)?;
            let copy = Connection::open(&to)?;
            meta_set(&copy, "restored_copy", "1")?;
            Ok(())
        })
        .await
    }
}

/// A stock row as the agent sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StockRow {
    /// The SKU.
    pub sku: Sku,
    /// Σp − Σn over all writers.
    pub on_hand: i64,
}

/// `on_hand` of one SKU, or `None` if the store never saw it.
pub fn on_hand(conn: &Connection, sku: &Sku) -> Result<Option<i64>, DbError> {
    Ok(conn.query_row("SELECT on_hand FROM stock WHERE sku = ?1", [sku.as_str()], |r| r.get(0)).optional()?)
}

/// Recomputes the materialised `on_hand` of `sku` from its counter entries.
pub fn refresh_stock(conn: &Connection, sku: &Sku) -> Result<i64, DbError> {
    let mut stmt = conn.prepare_cached("SELECT p, n FROM counters WHERE sku = ?1")?;
    let entries = stmt
        .query_map([sku.as_str()], |r| Ok(PnEntry { p: r.get(0)?, n: r.get(1)? }))?
        .collect::<Result<Vec<_>, _>>()?;
    let value = sum_entries(&entries)?;
    conn.prepare_cached(
        "INSERT INTO stock (sku, on_hand) VALUES (?1, ?2) ON CONFLICT (sku) DO UPDATE SET on_hand = excluded.on_hand",
    )?
    .execute(params![sku.as_str(), value])?;
    Ok(value)
}

/// One counter entry.
pub fn entry(conn: &Connection, sku: &Sku, writer: &WriterId) -> Result<Option<PnEntry>, DbError> {
    Ok(conn
        .prepare_cached("SELECT p, n FROM counters WHERE sku = ?1 AND writer = ?2")?
        .query_row(params![sku.as_str(), writer.to_string()], |r| Ok(PnEntry { p: r.get(0)?, n: r.get(1)? }))
        .optional()?)
}

/// The next free counter sequence. A job takes it once and counts up: jobs run one at a time on
/// the writer connection, so nobody else can take the same numbers.
pub fn next_seq(conn: &Connection) -> Result<u64, DbError> {
    Ok(counter_head(conn)? + 1)
}

/// Writes one entry stamped with `seq` (from [`next_seq`]).
pub fn put_entry(conn: &Connection, sku: &Sku, writer: &WriterId, e: PnEntry, seq: u64) -> Result<u64, DbError> {
    conn.prepare_cached(
        "INSERT INTO counters (sku, writer, p, n, seq) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (sku, writer) DO UPDATE SET p = excluded.p, n = excluded.n, seq = excluded.seq",
    )?
    .execute(params![sku.as_str(), writer.to_string(), e.p, e.n, seq])?;
    Ok(seq)
}
