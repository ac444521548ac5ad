//! The hub's SQLite database: migrations, opening (integrity check, restored copies), and the
//! rows the runtime keeps outside the decider (certificates, tokens, agent writers' watermarks
//! and lineage, journals, catalog documents, webhook cursors) on one group-committing writer
//! thread and a few reader threads ([`SqliteThreads`]). The decider's rows are in
//! [`crate::persist`]; the admin CLI writes here directly while a hub runs (WAL arbitrates).

use shelfsync_node::now_ms;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use shelfsync_node::catalog;
use shelfsync_node::config::Synchronous;
use shelfsync_node::db::{self as adb, DbError};
use shelfsync_node::dbfile;
use shelfsync_node::journal::event_from_row;
use shelfsync_node::sqlite::{AfterCommit, SqliteError, SqliteThreads};
use shelfsync_shared::lineage::HubLineage;
use shelfsync_shared::mac::MacKey;
use shelfsync_shared::sync::JournalRead;
use shelfsync_shared::{Incarnation, NodeId, Sku, StoreId, WriterId};
use uuid::Uuid;

use crate::storage::*;
use shelfsync_hub_core::Refusal;

/// Migration 2 (reservations, holds, conflicts, the change feed in SQL, as hubs before the
/// decider kept them; read since only to refuse a database with open rows there).
const MIGRATION_2: &str = "
     CREATE TABLE reservations (
        id BLOB PRIMARY KEY, status TEXT NOT NULL, pickup_store TEXT, customer TEXT,
        created_at_ms INTEGER NOT NULL, expires_at_ms INTEGER, updated_at_ms INTEGER NOT NULL,
        fingerprint BLOB NOT NULL, first_response TEXT NOT NULL) WITHOUT ROWID;
     CREATE INDEX reservations_expiry ON reservations(status, expires_at_ms);
     CREATE TABLE reservation_lines (
        reservation BLOB NOT NULL, line INTEGER NOT NULL, sku TEXT NOT NULL, qty INTEGER NOT NULL,
        PRIMARY KEY (reservation, line)) WITHOUT ROWID;
     CREATE TABLE allocations (
        id BLOB PRIMARY KEY, reservation BLOB NOT NULL, line INTEGER NOT NULL,
        store TEXT NOT NULL, sku TEXT NOT NULL, qty INTEGER NOT NULL CHECK (qty > 0),
        status TEXT NOT NULL, created_seq INTEGER NOT NULL, updated_at_ms INTEGER NOT NULL) WITHOUT ROWID;
     CREATE INDEX allocations_open ON allocations(store, sku, status);
     CREATE INDEX allocations_reservation ON allocations(reservation, line);
     CREATE INDEX allocations_seq ON allocations(created_seq);
     CREATE TABLE held_totals (
        store TEXT NOT NULL, sku TEXT NOT NULL, qty INTEGER NOT NULL CHECK (qty >= 0),
        PRIMARY KEY (store, sku)) WITHOUT ROWID;
     CREATE TABLE store_holds (store TEXT PRIMARY KEY, version INTEGER NOT NULL) WITHOUT ROWID;
     CREATE TABLE conflicts (
        id BLOB PRIMARY KEY, kind TEXT NOT NULL, store TEXT NOT NULL, sku TEXT NOT NULL,
        shortfall INTEGER NOT NULL, reservations TEXT NOT NULL, resolution TEXT NOT NULL,
        status TEXT NOT NULL, detected_at_ms INTEGER NOT NULL, resolved_at_ms INTEGER) WITHOUT ROWID;
     CREATE INDEX conflicts_find ON conflicts(store, sku, kind, status);
     CREATE TABLE changes (
        cursor INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, at_ms INTEGER NOT NULL, data TEXT NOT NULL);
     CREATE TABLE velocity (
        store TEXT NOT NULL, sku TEXT NOT NULL, score REAL NOT NULL, updated_at_ms INTEGER NOT NULL,
        PRIMARY KEY (store, sku)) WITHOUT ROWID;
     CREATE TABLE stock_alerts (
        store TEXT NOT NULL, sku TEXT NOT NULL, state TEXT NOT NULL, PRIMARY KEY (store, sku)) WITHOUT ROWID;
     CREATE TABLE webhook_cursors (url TEXT PRIMARY KEY, cursor INTEGER NOT NULL) WITHOUT ROWID;
     CREATE TABLE action_requests (
        key TEXT PRIMARY KEY, fingerprint BLOB NOT NULL, response TEXT NOT NULL) WITHOUT ROWID;";

pub(crate) const MIGRATIONS: &[&str] = &[
    // 1: stores, counters, journal, idempotency, tokens.
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
     CREATE TABLE stores (
        id TEXT PRIMARY KEY, created_at_ms INTEGER NOT NULL,
        revoked_at_ms INTEGER, last_seen_ms INTEGER) WITHOUT ROWID;
     CREATE TABLE certs (
        serial TEXT PRIMARY KEY, store TEXT NOT NULL REFERENCES stores(id),
        fingerprint TEXT NOT NULL, issued_at_ms INTEGER NOT NULL, revoked_at_ms INTEGER) WITHOUT ROWID;
     CREATE TABLE counters (
        store TEXT NOT NULL, sku TEXT NOT NULL, writer TEXT NOT NULL,
        p INTEGER NOT NULL CHECK (p >= 0), n INTEGER NOT NULL CHECK (n >= 0), seq INTEGER NOT NULL,
        PRIMARY KEY (store, sku, writer)) WITHOUT ROWID;
     CREATE UNIQUE INDEX counters_seq ON counters(seq);
     CREATE INDEX counters_store_seq ON counters(store, seq);
     CREATE TABLE stock (
        store TEXT NOT NULL, sku TEXT NOT NULL, on_hand INTEGER NOT NULL,
        PRIMARY KEY (store, sku)) WITHOUT ROWID;
     CREATE INDEX stock_sku ON stock(sku, store);
     CREATE TABLE peers (
        store TEXT NOT NULL, writer TEXT NOT NULL,
        applied INTEGER NOT NULL DEFAULT 0, journal_applied INTEGER NOT NULL DEFAULT 0,
        acked INTEGER NOT NULL DEFAULT 0, journal_acked INTEGER NOT NULL DEFAULT 0,
        last_seen_ms INTEGER,
        PRIMARY KEY (store, writer)) WITHOUT ROWID;
     CREATE TABLE journal (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id BLOB NOT NULL, line INTEGER NOT NULL, kind TEXT NOT NULL, store TEXT NOT NULL,
        sku TEXT NOT NULL, delta INTEGER NOT NULL, reason TEXT,
        occurred_at_ms INTEGER NOT NULL, recorded_at_ms INTEGER NOT NULL,
        writer TEXT NOT NULL, flags INTEGER NOT NULL DEFAULT 0,
        UNIQUE (store, id, line));
     CREATE INDEX journal_store_seq ON journal(store, seq);
     CREATE TABLE requests (
        id BLOB PRIMARY KEY, kind TEXT NOT NULL, fingerprint BLOB NOT NULL,
        response TEXT NOT NULL, recorded_at_ms INTEGER NOT NULL) WITHOUT ROWID;
     CREATE TABLE tokens (
        hash BLOB PRIMARY KEY, role TEXT NOT NULL, created_at_ms INTEGER NOT NULL,
        revoked_at_ms INTEGER) WITHOUT ROWID;",
    // 2: reservations, holds, conflicts, the change feed.
    MIGRATION_2,
    // 3: the catalog documents and their materialised rows.
    shelfsync_node::catalog::MIGRATION,
    // 4: token ids, names, expiry and last use.
    crate::tokens::MIGRATION,
    // 5: writer lineage per agent writer, details of conflicts about agents, agents per store.
    "ALTER TABLE peers ADD COLUMN lineage BLOB;
     ALTER TABLE conflicts ADD COLUMN details TEXT;
     ALTER TABLE stores ADD COLUMN max_agents INTEGER NOT NULL DEFAULT 1;",
    // 6: the decider's rows (reservations, allocations, conflicts, velocity, alerts, answers as
    // typed JSON rows) and its feed; the older decision tables stay, unread.
    crate::persist::MIGRATION,
    // 7: a store's adjustments by when they happened (the shrink report), only those rows.
    "CREATE INDEX journal_adjustments ON journal(store, occurred_at_ms, seq) WHERE kind = 'adjustment';",
    // 8: transfers between stores (shipped, received, cancelled).
    crate::persist::TRANSFERS_MIGRATION,
    // 9: escrow rules of catalog entries and of stores' overrides.
    shelfsync_node::catalog::ESCROW_MIGRATION,
    // 10: the sales channel of a token.
    crate::tokens::CHANNEL_MIGRATION,
];

/// One argument of a query built at run time.
#[derive(Clone, Debug)]
pub(crate) enum Arg {
    /// An integer.
    Int(i64),
    /// Text.
    Text(String),
}

/// What differs between the SQL of the two engines, for queries built at run time.
pub(crate) struct Dialect {
    /// The function finding a substring (`instr`, `strpos`: both take (haystack, needle)).
    pub strpos: &'static str,
    /// The `n`th (1-based) placeholder.
    pub placeholder: fn(usize) -> String,
}

/// SQLite's.
pub(crate) const SQLITE: Dialect = Dialect { strpos: "instr", placeholder: |n| format!("?{n}") };

/// The shrink report's queries ([`AdjustmentFilter`]) in one dialect: the same SQL for both
/// engines but for [`Dialect`].
pub(crate) struct AdjustmentSql {
    dialect: &'static Dialect,
    code: String,
    filter: String,
    /// The arguments of every query built so far, in placeholder order.
    pub args: Vec<Arg>,
}

impl AdjustmentSql {
    /// The filter of `f` (store, period, reason code).
    pub fn new(f: &AdjustmentFilter, dialect: &'static Dialect) -> AdjustmentSql {
        use shelfsync_shared::ReasonCode;
        // The reason code of a stored reason string (`code` or `code: note`; anything that is not
        // a code is folded into `other` by the caller, as `Reason::parse_stored` does).
        let code = format!(
            "CASE WHEN reason IS NULL THEN 'other' WHEN {p}(reason, ': ') > 0 \
             THEN substr(reason, 1, {p}(reason, ': ') - 1) ELSE reason END",
            p = dialect.strpos
        );
        let mut q = AdjustmentSql { dialect, code, filter: String::new(), args: Vec::new() };
        q.filter = format!("store = {} AND kind = 'adjustment'", q.arg(Arg::Text(f.store.to_string())));
        if let Some(from) = f.from_ms {
            let p = q.arg(Arg::Int(from));
            q.filter.push_str(&format!(" AND occurred_at_ms >= {p}"));
        }
        if let Some(to) = f.to_ms {
            let p = q.arg(Arg::Int(to));
            q.filter.push_str(&format!(" AND occurred_at_ms < {p}"));
        }
        match f.reason {
            None => {}
            Some(ReasonCode::Other) => {
                let codes: Vec<String> = ReasonCode::ALL
                    .iter()
                    .filter(|c| **c != ReasonCode::Other)
                    .map(|c| format!("'{}'", c.as_str()))
                    .collect();
                q.filter.push_str(&format!(" AND {} NOT IN ({})", q.code, codes.join(", ")));
            }
            Some(code) => {
                let p = q.arg(Arg::Text(code.as_str().into()));
                q.filter.push_str(&format!(" AND {} = {p}", q.code));
            }
        }
        q
    }

    fn arg(&mut self, a: Arg) -> String {
        self.args.push(a);
        (self.dialect.placeholder)(self.args.len())
    }

    /// (code, Σ delta, events) per code over the whole filter.
    pub fn totals(&self) -> String {
        format!(
            "SELECT {} AS code, CAST(SUM(delta) AS BIGINT), COUNT(*) FROM journal WHERE {} GROUP BY code",
            self.code, self.filter
        )
    }

    /// The time of the adjustment `after` names (arguments: seq, store).
    pub fn after_row(&self) -> String {
        format!(
            "SELECT occurred_at_ms FROM journal WHERE seq = {} AND store = {} AND kind = 'adjustment'",
            (self.dialect.placeholder)(1),
            (self.dialect.placeholder)(2)
        )
    }

    /// The page, newest first, below `after` (its time and sequence) when given.
    pub fn page(&mut self, after: Option<(i64, u64)>, limit: usize) -> String {
        if let Some((at, seq)) = after {
            let (a, b) = (self.arg(Arg::Int(at)), self.arg(Arg::Int(i64::try_from(seq).unwrap_or(i64::MAX))));
            self.filter.push_str(&format!(" AND (occurred_at_ms, seq) < ({a}, {b})"));
        }
        let l = self.arg(Arg::Int(limit as i64));
        format!(
            "SELECT seq, id, line, kind, store, sku, delta, reason, occurred_at_ms, recorded_at_ms, writer, flags
             FROM journal WHERE {} ORDER BY occurred_at_ms DESC, seq DESC LIMIT {l}",
            self.filter
        )
    }

    /// Totals rows as the report's, in the documented order.
    pub fn fold_totals(
        rows: impl IntoIterator<Item = (String, i64, u64)>,
    ) -> Vec<(shelfsync_shared::ReasonCode, i64, u64)> {
        use shelfsync_shared::ReasonCode;
        let mut totals: std::collections::BTreeMap<ReasonCode, (i64, u64)> = Default::default();
        for (code, units, n) in rows {
            let t = totals.entry(ReasonCode::parse(&code).unwrap_or(ReasonCode::Other)).or_default();
            t.0 = t.0.saturating_add(units);
            t.1 += n;
        }
        ReasonCode::ALL.iter().filter_map(|c| totals.get(c).map(|(u, n)| (*c, *u, *n))).collect()
    }
}

/// What a shrink report asks for.
#[derive(Clone, Debug)]
pub struct AdjustmentFilter {
    /// The store.
    pub store: StoreId,
    /// Only this reason code.
    pub reason: Option<shelfsync_shared::ReasonCode>,
    /// `occurred_at` at or after (Unix ms).
    pub from_ms: Option<i64>,
    /// `occurred_at` before (Unix ms).
    pub to_ms: Option<i64>,
    /// Only rows after this one (a journal sequence from the previous page) in report order.
    pub after: Option<u64>,
    /// Rows to read.
    pub limit: usize,
}

/// A page of a store's adjustment events, newest `occurred_at` first, with totals over the
/// whole filter.
#[derive(Clone, Debug, Default)]
pub struct AdjustmentReport {
    /// (journal sequence, event).
    pub rows: Vec<(u64, shelfsync_shared::JournalEvent)>,
    /// Per reason code present: (code, Σ delta, events), in the documented order.
    pub totals: Vec<(shelfsync_shared::ReasonCode, i64, u64)>,
    /// `after` named no adjustment of the store.
    pub after_unknown: bool,
}

impl From<DbError> for StorageError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::Corrupt(m) => StorageError::Corrupt(m),
            DbError::Counter(c) => StorageError::Invalid(c.to_string()),
            other => StorageError::Backend(other.to_string()),
        }
    }
}

impl From<SqliteError> for StorageError {
    fn from(e: SqliteError) -> Self {
        StorageError::Backend(e.to_string())
    }
}

impl From<rusqlite::Error> for StorageError {
    fn from(e: rusqlite::Error) -> Self {
        StorageError::Backend(e.to_string())
    }
}

impl From<shelfsync_node::catalog::CatalogError> for StorageError {
    fn from(e: shelfsync_node::catalog::CatalogError) -> Self {
        use shelfsync_node::catalog::CatalogError as C;
        match e {
            C::Invalid(m) | C::Forbidden(m) => StorageError::Invalid(m),
            C::Doc(d) => StorageError::Corrupt(format!("catalog document: {d}")),
            C::Db(d) => d.into(),
        }
    }
}

impl From<shelfsync_shared::CounterError> for StorageError {
    fn from(e: shelfsync_shared::CounterError) -> Self {
        StorageError::Invalid(e.to_string())
    }
}

/// Options for opening the hub database.
#[derive(Clone, Copy, Debug)]
pub struct SqliteOptions {
    /// Durability.
    pub synchronous: Synchronous,
    /// Most writes per group commit.
    pub group_commit_max: usize,
    /// Reader threads.
    pub readers: usize,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions { synchronous: Synchronous::Full, group_commit_max: 512, readers: 2 }
    }
}

/// The hub database: its threads and what was read at opening.
pub struct SqliteStorage {
    path: PathBuf,
    threads: SqliteThreads,
    hub_writer: WriterId,
    /// Tags the entries the hub sends, so stores can give them back after a restore.
    key: MacKey,
    /// The journal's newest sequence, refreshed after every commit.
    journal_head: Arc<AtomicU64>,
}

pub use crate::db::Opened;

/// How to get a good hub database back, for refusals at start-up.
fn recovery_advice(path: &Path) -> String {
    format!(
        "To recover, move {p} (with any {p}-wal and {p}-shm) aside and copy the latest backup made by \
         `shelfsync-hub backup --to F` to {p}; it takes a new hub incarnation when opened, and stores \
         resend what the backup lacks",
        p = path.display()
    )
}

/// The hub database file in a data dir.
pub fn db_path(data_dir: &Path) -> PathBuf {
    data_dir.join("hub.db")
}

fn mint(conn: &Connection) -> Result<WriterId, StorageError> {
    let writer = WriterId::new(NodeId::Hub, Incarnation::from_u64(rand::random::<u64>()));
    adb::meta_set(conn, "writer", &writer.to_string())?;
    adb::meta_set(conn, "incarnation_started_ms", &now_ms().to_string())?;
    conn.execute("DELETE FROM meta WHERE key = 'restored_copy'", [])?;
    Ok(writer)
}

impl SqliteStorage {
    /// Creates a new hub database (refuses to overwrite one).
    pub fn create(path: &Path) -> Result<WriterId, StorageError> {
        let exists = || StorageError::Invalid(format!("a hub database already exists at {}", path.display()));
        if path.exists() {
            return Err(exists());
        }
        dbfile::create_private_file(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => exists(),
            _ => StorageError::Backend(format!("creating {}: {e}", path.display())),
        })?;
        let mut conn = adb::open_conn(path, OpenFlags::default(), Synchronous::Full)?;
        adb::migrate(&mut conn, MIGRATIONS)?;
        let tx = conn.transaction()?;
        let w = mint(&tx)?;
        tx.commit()?;
        Ok(w)
    }

    /// Opens an existing hub database, reads the decider's rows when `load` says how many of the
    /// newest feed events to keep (`None`: read nothing, for admin verbs), and starts its threads.
    /// Blocking.
    pub fn open_with(path: &Path, opts: SqliteOptions, load: Option<usize>) -> Result<Opened, StorageError> {
        dbfile::check_existing(path, &recovery_advice(path)).map_err(|e| match e {
            dbfile::FileError::Missing(_) => StorageError::Invalid(format!(
                "no hub database at {}; run `shelfsync-hub init --data-dir` first",
                path.display()
            )),
            dbfile::FileError::Unusable(m) => StorageError::Corrupt(m),
        })?;
        dbfile::tighten_install(path, &path.parent().map(|d| vec![d.join("pki")]).unwrap_or_default());
        let mut conn = adb::open_conn(path, OpenFlags::SQLITE_OPEN_READ_WRITE, opts.synchronous)?;
        let legacy = crate::persist::legacy_open_rows(&conn)?;
        if legacy > 0 {
            return Err(StorageError::Invalid(format!(
                "{} holds {legacy} open reservations or conflicts written by a hub from before the in-memory \
                 decider; settle them (commit or release, resolve) with that version, then open it with this one",
                path.display()
            )));
        }
        adb::migrate(&mut conn, MIGRATIONS)?;
        let (hub_writer, key, restored_from) = {
            let tx = conn.transaction()?;
            let key = mac_key(&tx)?;
            let w: WriterId = adb::meta_get(&tx, "writer")?
                .ok_or_else(|| StorageError::Corrupt("meta.writer missing".into()))?
                .parse()
                .map_err(|e| StorageError::Corrupt(format!("meta.writer: {e}")))?;
            let restored = adb::meta_get(&tx, "restored_copy")?.map(|_| w.to_string());
            tx.commit()?;
            (w, key, restored)
        };
        let (records, peers) = if let Some(feed_retain) = load {
            (crate::persist::load(&conn, feed_retain)?, load_peers(&conn)?)
        } else {
            (Vec::new(), Vec::new())
        };
        let mut readers = Vec::new();
        for _ in 0..opts.readers.max(1) {
            readers.push(adb::open_conn(path, OpenFlags::SQLITE_OPEN_READ_ONLY, opts.synchronous)?);
        }
        let journal = Arc::new(AtomicU64::new(journal_head(&conn)?));
        let jh = journal.clone();
        // Publish the journal's head after every commit (sessions ship hub events up to it).
        let after_commit: AfterCommit = Box::new(move |conn| match journal_head(conn) {
            Ok(h) => {
                jh.fetch_max(h, Ordering::AcqRel);
            }
            Err(e) => tracing::error!(error = %e, "cannot read the journal head"),
        });
        let threads = SqliteThreads::spawn("hub", conn, readers, opts.group_commit_max, after_commit)
            .map_err(|e| StorageError::Backend(format!("spawning storage threads: {e}")))?;
        Ok(Opened {
            storage: crate::db::HubDb::Sqlite(SqliteStorage {
                path: path.to_owned(),
                threads,
                hub_writer,
                key,
                journal_head: journal,
            }),
            records,
            loader: None,
            peers,
            restored_from,
        })
    }

    /// The storage threads (the runtime submits its batches to the writer).
    pub fn threads(&self) -> SqliteThreads {
        self.threads.clone()
    }

    /// The hub's tag key.
    pub fn mac_key(&self) -> MacKey {
        self.key.clone()
    }

    /// The writer this database ran as when opened.
    pub fn hub_writer(&self) -> WriterId {
        self.hub_writer.clone()
    }

    /// The journal's newest committed sequence.
    pub fn journal_head(&self) -> u64 {
        self.journal_head.load(Ordering::Acquire)
    }

    async fn write<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> StorageResult<R> + Send + 'static,
    ) -> StorageResult<R> {
        self.threads.write(f).await
    }

    async fn read<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> StorageResult<R> + Send + 'static,
    ) -> StorageResult<R> {
        self.threads.read(f).await
    }

    /// Every store id and whether it is revoked.
    pub async fn store_rows(&self) -> StorageResult<Vec<(StoreId, bool)>> {
        self.read(|conn| {
            conn.prepare_cached("SELECT id, revoked_at_ms IS NOT NULL FROM stores ORDER BY id")?
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, bool>(1)?)))?
                .map(|row| {
                    let (id, revoked) = row?;
                    Ok((store_col(id)?, revoked))
                })
                .collect()
        })
        .await
    }

    /// Feed events after `cursor` from the `feed` table.
    pub async fn feed_after(&self, cursor: u64, limit: usize) -> StorageResult<Vec<shelfsync_hub_core::FeedEvent>> {
        self.read(move |conn| crate::persist::feed_after(conn, cursor, limit)).await
    }

    /// Persists a catalog change alone (the admin CLI, with no decider in the process: a running
    /// hub picks the chunk up and decides on it).
    pub async fn catalog_commit(&self, c: CatalogCommit) -> StorageResult<()> {
        self.write(move |conn| write_catalog(conn, &c)).await
    }
}

/// Writes a catalog change: the document chunk, materialised rows, sync states.
pub fn write_catalog(conn: &Connection, c: &CatalogCommit) -> StorageResult<()> {
    if let Some(w) = &c.write {
        catalog::write_chunk(conn, w)?;
    }
    catalog::write_item_rows(conn, &c.items)?;
    if let Some((store, rows)) = &c.overrides {
        catalog::write_override_rows(conn, store, rows)?;
    }
    for (doc, peer, state) in &c.sync_states {
        conn.prepare_cached(
            "INSERT INTO doc_sync (doc, peer, state) VALUES (?1, ?2, ?3)
             ON CONFLICT (doc, peer) DO UPDATE SET state = excluded.state",
        )?
        .execute(params![doc, peer, state])?;
    }
    Ok(())
}

/// Queues one decided batch on the writer thread: the records and the side writes in one
/// transaction (group-committed with the batches queued beside it).
pub fn submit(threads: &SqliteThreads, commit: crate::db::Commit, done: crate::db::CommitDone) -> Result<(), String> {
    threads
        .submit(
            move |conn| {
                if shelfsync_node::fatal::is_stopping() {
                    return Err(SqliteError::Closed);
                }
                crate::persist::write(conn, &commit.records).map_err(|e| SqliteError::Sqlite(e.to_string()))?;
                for w in &commit.side {
                    write_side(conn, w).map_err(|e| SqliteError::Sqlite(e.to_string()))?;
                }
                Ok(())
            },
            move |result| done(result.map_err(|e| e.to_string())),
        )
        .map_err(|e| e.to_string())
}

/// Writes one side write (inside the caller's transaction).
pub fn write_side(conn: &Connection, w: &crate::db::SideWrite) -> StorageResult<()> {
    use crate::db::SideWrite;
    match w {
        SideWrite::NewLife { at_ms } => {
            adb::meta_set(conn, "incarnation_started_ms", &at_ms.to_string())?;
            conn.execute("DELETE FROM meta WHERE key = 'restored_copy'", [])?;
        }
        SideWrite::PeerApplied { store, peer, upto, at_ms, lineage } => {
            ensure_peer(conn, store, peer)?;
            conn.prepare_cached(
                "UPDATE peers SET applied = MAX(applied, ?3), last_seen_ms = ?4, lineage = COALESCE(?5, lineage)
                 WHERE store = ?1 AND writer = ?2",
            )?
            .execute(params![store.as_str(), peer.to_string(), upto, at_ms, lineage])?;
        }
        SideWrite::PeerJournal { store, peer, upto, events } => {
            for e in events {
                shelfsync_node::journal::insert_event(conn, e)?;
            }
            ensure_peer(conn, store, peer)?;
            conn.prepare_cached(
                "UPDATE peers SET journal_applied = MAX(journal_applied, ?3) WHERE store = ?1 AND writer = ?2",
            )?
            .execute(params![store.as_str(), peer.to_string(), upto])?;
        }
        SideWrite::Catalog(c) => write_catalog(conn, c)?,
        SideWrite::MergeApplied { .. } => {
            return Err(StorageError::Invalid(
                "the sync plane's merge log exists only in a partitioned PostgreSQL database".into(),
            ))
        }
    }
    Ok(())
}

fn load_peers(conn: &Connection) -> StorageResult<Vec<(StoreId, WriterId, u64, HubLineage)>> {
    let mut stmt = conn.prepare("SELECT store, writer, journal_applied, lineage FROM peers")?;
    let rows = stmt.query_map([], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, u64>(2)?, r.get::<_, Option<Vec<u8>>>(3)?))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (s, w, j, l) = row?;
        out.push((store_col(s)?, adb::writer_col(w)?, j, lineage_col(l)?));
    }
    Ok(out)
}

fn journal_head(conn: &Connection) -> StorageResult<u64> {
    Ok(conn.query_row("SELECT MAX(seq) FROM journal", [], |r| r.get::<_, Option<u64>>(0))?.unwrap_or(0))
}

/// The hub's tag key, made once and kept in the database (a restored copy keeps it, so the
/// entries it sent before can be given back).
fn mac_key(conn: &Connection) -> StorageResult<MacKey> {
    let hex = match adb::meta_get(conn, "mac_key")? {
        Some(h) => h,
        None => {
            let bytes: [u8; 32] = rand::random();
            let h: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            adb::meta_set(conn, "mac_key", &h)?;
            h
        }
    };
    parse_mac_key(&hex)
}

/// The tag key from its stored hex.
pub(crate) fn parse_mac_key(hex: &str) -> StorageResult<MacKey> {
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2).unwrap_or("zz"), 16))
        .collect::<Result<_, _>>()
        .map_err(|e| StorageError::Corrupt(format!("meta.mac_key: {e}")))?;
    let bytes: [u8; 32] = bytes.try_into().map_err(|_| StorageError::Corrupt("meta.mac_key is not 32 bytes".into()))?;
    Ok(MacKey::from_bytes(bytes))
}

fn store_exists(conn: &Connection, store: &StoreId) -> StorageResult<Option<Option<i64>>> {
    Ok(conn
        .prepare_cached("SELECT revoked_at_ms FROM stores WHERE id = ?1")?
        .query_row([store.as_str()], |r| r.get(0))
        .optional()?)
}

fn require_store(conn: &Connection, store: &StoreId) -> StorageResult<()> {
    match store_exists(conn, store)? {
        None => Err(Refusal::UnknownStore(store.clone()).into()),
        Some(Some(_)) => Err(Refusal::Revoked(store.clone()).into()),
        Some(None) => Ok(()),
    }
}

pub(crate) fn store_col(s: String) -> StorageResult<StoreId> {
    s.parse().map_err(|e| StorageError::Corrupt(format!("store id in database: {e}")))
}

pub(crate) fn lineage_col(v: Option<Vec<u8>>) -> StorageResult<HubLineage> {
    v.map(|b| postcard::from_bytes(&b).map_err(|e| StorageError::Corrupt(format!("peer lineage: {e}"))))
        .transpose()
        .map(Option::unwrap_or_default)
}

fn ensure_peer(conn: &Connection, store: &StoreId, writer: &WriterId) -> StorageResult<()> {
    conn.prepare_cached("INSERT OR IGNORE INTO peers (store, writer) VALUES (?1, ?2)")?
        .execute(params![store.as_str(), writer.to_string()])?;
    Ok(())
}

impl SqliteStorage {
    /// Registers a store with its first certificate (refused when it exists).
    pub async fn add_store(&self, store: StoreId, cert: CertRecord) -> StorageResult<()> {
        self.write(move |conn| {
            if store_exists(conn, &store)?.is_some() {
                return Err(Refusal::StoreExists(store).into());
            }
            let now = now_ms();
            conn.execute("INSERT INTO stores (id, created_at_ms) VALUES (?1, ?2)", params![store.as_str(), now])?;
            conn.execute(
                "INSERT INTO certs (serial, store, fingerprint, issued_at_ms) VALUES (?1, ?2, ?3, ?4)",
                params![cert.serial, store.as_str(), cert.fingerprint, now],
            )?;
            Ok(())
        })
        .await
    }

    /// How many agents of a store may be connected at once.
    pub async fn set_max_agents(&self, store: StoreId, max: u32) -> StorageResult<()> {
        self.write(move |conn| {
            require_store(conn, &store)?;
            conn.execute("UPDATE stores SET max_agents = ?2 WHERE id = ?1", params![store.as_str(), max])?;
            Ok(())
        })
        .await
    }

    /// Revokes a store and all its certificates; returns the revoked serials.
    pub async fn revoke_store(&self, store: StoreId) -> StorageResult<Vec<String>> {
        self.write(move |conn| {
            if store_exists(conn, &store)?.is_none() {
                return Err(Refusal::UnknownStore(store).into());
            }
            let now = now_ms();
            conn.execute(
                "UPDATE stores SET revoked_at_ms = COALESCE(revoked_at_ms, ?2) WHERE id = ?1",
                params![store.as_str(), now],
            )?;
            conn.execute(
                "UPDATE certs SET revoked_at_ms = COALESCE(revoked_at_ms, ?2) WHERE store = ?1",
                params![store.as_str(), now],
            )?;
            let serials = conn
                .prepare("SELECT serial FROM certs WHERE store = ?1")?
                .query_map([store.as_str()], |r| r.get(0))?
                .collect::<Result<Vec<String>, _>>()?;
            Ok(serials)
        })
        .await
    }

    /// Every revoked certificate serial with its revocation time (for the CRL).
    pub async fn revoked_serials(&self) -> StorageResult<Vec<(String, i64)>> {
        self.read(|conn| {
            Ok(conn
                .prepare("SELECT serial, revoked_at_ms FROM certs WHERE revoked_at_ms IS NOT NULL ORDER BY serial")?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// Whether a connecting certificate is acceptable: known, for that store, not revoked.
    pub async fn check_cert(&self, store: StoreId, serial: String) -> StorageResult<()> {
        self.read(move |conn| {
            require_store(conn, &store)?;
            let row: Option<(String, Option<i64>)> = conn
                .query_row("SELECT store, revoked_at_ms FROM certs WHERE serial = ?1", [&serial], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .optional()?;
            match row {
                None => Err(StorageError::Invalid(format!("certificate {serial} was never issued to store {store}"))),
                Some((owner, _)) if owner != store.as_str() => {
                    Err(StorageError::Invalid(format!("certificate {serial} belongs to store {owner}, not {store}")))
                }
                Some((_, Some(_))) => Err(Refusal::Revoked(store).into()),
                Some((_, None)) => Ok(()),
            }
        })
        .await
    }

    /// All stores with their writers' watermarks, by id.
    pub async fn stores(&self) -> StorageResult<Vec<StoreInfo>> {
        self.read(|conn| {
            let mut out = Vec::new();
            let rows = conn
                .prepare("SELECT id, created_at_ms, revoked_at_ms, last_seen_ms FROM stores ORDER BY id")?
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
                .collect::<Result<Vec<_>, _>>()?;
            let mut peers = conn.prepare(
                "SELECT writer, applied, acked, journal_applied, journal_acked, last_seen_ms FROM peers
                 WHERE store = ?1 ORDER BY last_seen_ms DESC",
            )?;
            for (id, created_at_ms, revoked_at_ms, last_seen_ms) in rows {
                let writers = peers
                    .query_map([&id], |r| {
                        Ok((r.get::<_, String>(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?))
                    })?
                    .map(|row| {
                        let (w, applied, acked, journal_applied, journal_acked, last_seen_ms) = row?;
                        Ok(WriterMarks {
                            writer: adb::writer_col(w)?,
                            applied,
                            acked,
                            journal_applied,
                            journal_acked,
                            last_seen_ms,
                        })
                    })
                    .collect::<StorageResult<Vec<_>>>()?;
                let journal_events: u64 =
                    conn.query_row("SELECT COUNT(*) FROM journal WHERE store = ?1", [&id], |r| r.get(0))?;
                out.push(StoreInfo {
                    id: store_col(id)?,
                    created_at_ms,
                    revoked_at_ms,
                    last_seen_ms,
                    writers,
                    journal_events,
                });
            }
            Ok(out)
        })
        .await
    }

    /// Stores a new API token (its hash only) and returns its record.
    pub async fn add_token(&self, token: crate::tokens::NewToken) -> StorageResult<crate::tokens::TokenInfo> {
        self.write(move |conn| crate::tokens::insert(conn, &token, now_ms())).await
    }

    /// Whether a channel's record is there and not removed (`null`).
    pub async fn channel_exists(&self, id: shelfsync_hub_core::ChannelId) -> StorageResult<bool> {
        self.read(move |conn| {
            let body: Option<String> = conn
                .query_row("SELECT body FROM decisions WHERE kind = 'channel' AND key = ?1", [id.as_str()], |r| {
                    r.get(0)
                })
                .optional()?;
            Ok(body.is_some_and(|b| b != "null"))
        })
        .await
    }

    /// The token with this hash, whatever its status (one point read: it runs on every request).
    pub async fn token_by_hash(&self, hash: Vec<u8>) -> StorageResult<Option<crate::tokens::TokenInfo>> {
        self.read(move |conn| crate::tokens::by_hash(conn, &hash)).await
    }

    /// Every token, oldest first.
    pub async fn tokens(&self) -> StorageResult<Vec<crate::tokens::TokenInfo>> {
        self.read(crate::tokens::list).await
    }

    /// Revokes a token by id; `None` if there is none.
    pub async fn revoke_token(&self, id: Uuid) -> StorageResult<Option<crate::tokens::TokenInfo>> {
        self.write(move |conn| crate::tokens::revoke(conn, id, now_ms())).await
    }

    /// Records that a token was used at `at_ms`.
    pub async fn touch_token(&self, id: Uuid, at_ms: i64) -> StorageResult<()> {
        self.write(move |conn| crate::tokens::touch(conn, id, at_ms)).await
    }

    /// What the hub applied from an agent writer (zero if never seen).
    pub async fn lookup_peer(&self, store: StoreId, writer: WriterId) -> StorageResult<PeerMarks> {
        self.read(move |conn| {
            let row: Option<(u64, u64, Option<Vec<u8>>)> = conn
                .prepare_cached("SELECT applied, journal_applied, lineage FROM peers WHERE store = ?1 AND writer = ?2")?
                .query_row(params![store.as_str(), writer.to_string()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .optional()?;
            let max_agents: u32 = conn
                .query_row("SELECT max_agents FROM stores WHERE id = ?1", [store.as_str()], |r| r.get(0))
                .optional()?
                .unwrap_or(1);
            let (applied, journal_applied, lineage) = row.unwrap_or_default();
            Ok(PeerMarks { applied, journal_applied, lineage: lineage_col(lineage)?, max_agents })
        })
        .await
    }

    /// Records that an agent writer acked hub counter sequences up to `upto`.
    pub async fn set_acked(&self, store: StoreId, peer: WriterId, upto: u64) -> StorageResult<()> {
        self.write(move |conn| {
            ensure_peer(conn, &store, &peer)?;
            conn.prepare_cached("UPDATE peers SET acked = ?3, last_seen_ms = ?4 WHERE store = ?1 AND writer = ?2")?
                .execute(params![store.as_str(), peer.to_string(), upto, now_ms()])?;
            Ok(())
        })
        .await
    }

    /// `store`'s journal events above `after` that `peer` did not write: the hub's, and those of
    /// the store's other lives (a restored or re-seeded agent needs them to order its counts by
    /// time, agent/src/counts.rs).
    pub async fn read_journal(
        &self,
        store: StoreId,
        peer: Option<WriterId>,
        after: u64,
        limit: usize,
    ) -> StorageResult<JournalRead> {
        self.read(move |conn| {
            let tx = conn.unchecked_transaction()?;
            let mut stmt = tx.prepare_cached(
                "SELECT seq, id, line, kind, store, sku, delta, reason, occurred_at_ms, recorded_at_ms, writer, flags
                 FROM journal WHERE store = ?1 AND seq > ?2 AND writer <> ?4 ORDER BY seq LIMIT ?3",
            )?;
            let peer = peer.map(|p| p.to_string()).unwrap_or_default();
            let mut rows = stmt.query(params![store.as_str(), after, limit as i64, peer])?;
            let mut events = Vec::new();
            let mut last = after;
            while let Some(r) = rows.next()? {
                last = r.get("seq")?;
                events.push(event_from_row(r)??);
            }
            drop(rows);
            drop(stmt);
            let upto = if events.len() == limit { last } else { journal_head(&tx)?.max(after) };
            tx.finish()?;
            Ok(JournalRead { upto, events })
        })
        .await
    }

    /// Records that an agent writer acked hub journal sequences up to `upto`.
    pub async fn set_journal_acked(&self, store: StoreId, peer: WriterId, upto: u64) -> StorageResult<()> {
        self.write(move |conn| {
            ensure_peer(conn, &store, &peer)?;
            conn.prepare_cached("UPDATE peers SET journal_acked = ?3 WHERE store = ?1 AND writer = ?2")?
                .execute(params![store.as_str(), peer.to_string(), upto])?;
            Ok(())
        })
        .await
    }

    /// Loads a replicated document.
    pub async fn load_doc(&self, name: String) -> StorageResult<TrackedDoc> {
        self.read(move |conn| Ok(TrackedDoc::load(conn, &name)?)).await
    }

    /// The persisted automerge sync state of (`doc`, `peer`).
    pub async fn sync_state(&self, doc: String, peer: String) -> StorageResult<automerge::sync::State> {
        self.read(move |conn| Ok(catalog::load_sync_state(conn, &doc, &peer)?)).await
    }

    /// Chunks of a document after `after` (to pick up edits made by another process).
    pub async fn doc_chunks_after(&self, doc: String, after: i64) -> StorageResult<Vec<(i64, Vec<u8>)>> {
        self.read(move |conn| Ok(catalog::chunks_after(conn, &doc, after)?)).await
    }

    /// Chunks of every store's overrides document after `after`: (sequence, document, bytes).
    pub async fn override_chunks_after(&self, after: i64) -> StorageResult<Vec<(i64, String, Vec<u8>)>> {
        self.read(move |conn| Ok(catalog::override_chunks_after(conn, after)?)).await
    }

    /// The newest chunk sequence of any document.
    pub async fn newest_chunk(&self) -> StorageResult<i64> {
        self.read(|conn| Ok(catalog::newest_chunk(conn)?)).await
    }

    /// One catalog entry (materialised).
    pub async fn catalog_item(&self, sku: Sku) -> StorageResult<Option<CatalogView>> {
        self.read(move |conn| Ok(catalog::view(conn, &sku, None)?)).await
    }

    /// A page of catalog entries in SKU order.
    pub async fn catalog_page(&self, after: Option<Sku>, limit: usize) -> StorageResult<Vec<CatalogView>> {
        self.read(move |conn| Ok(catalog::page(conn, after.as_ref(), limit)?)).await
    }

    /// A page of the catalog entries whose SKU or name contains `q`.
    pub async fn catalog_search(&self, q: String, after: Option<Sku>, limit: usize) -> StorageResult<Vec<CatalogView>> {
        self.read(move |conn| Ok(catalog::search(conn, &q, after.as_ref(), limit)?)).await
    }

    /// A webhook's delivery cursor.
    pub async fn webhook_cursor(&self, url: String) -> StorageResult<Option<u64>> {
        self.read(move |conn| {
            Ok(conn.query_row("SELECT cursor FROM webhook_cursors WHERE url = ?1", [url], |r| r.get(0)).optional()?)
        })
        .await
    }

    /// Records a webhook's delivery cursor.
    pub async fn set_webhook_cursor(&self, url: String, cursor: u64) -> StorageResult<()> {
        self.write(move |conn| {
            conn.execute(
                "INSERT INTO webhook_cursors (url, cursor) VALUES (?1, ?2)
                 ON CONFLICT (url) DO UPDATE SET cursor = MAX(cursor, excluded.cursor)",
                params![url, cursor],
            )?;
            Ok(())
        })
        .await
    }

    /// A store's adjustment events (agent- and hub-authored) for the shrink report: newest
    /// `occurred_at` first (ties: latest recorded first), through the partial index
    /// `journal_adjustments`; totals per reason code over the whole filter in the same read.
    pub async fn adjustments(&self, f: AdjustmentFilter) -> StorageResult<AdjustmentReport> {
        use rusqlite::types::Value as Sql;
        fn sql(args: &[Arg]) -> Vec<Sql> {
            args.iter()
                .map(|a| match a {
                    Arg::Int(i) => Sql::Integer(*i),
                    Arg::Text(t) => Sql::Text(t.clone()),
                })
                .collect()
        }
        self.read(move |conn| {
            let tx = conn.unchecked_transaction()?;
            let mut q = AdjustmentSql::new(&f, &SQLITE);
            let totals = tx
                .prepare(&q.totals())?
                .query_map(rusqlite::params_from_iter(sql(&q.args)), |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<Result<Vec<_>, _>>()?;
            let mut report = AdjustmentReport { totals: AdjustmentSql::fold_totals(totals), ..Default::default() };
            let after = match f.after {
                None => None,
                Some(after) => {
                    let at: Option<i64> = tx
                        .query_row(
                            &q.after_row(),
                            params![i64::try_from(after).unwrap_or(i64::MAX), f.store.as_str()],
                            |r| r.get(0),
                        )
                        .optional()?;
                    let Some(at) = at else {
                        report.after_unknown = true;
                        return Ok(report);
                    };
                    Some((at, after))
                }
            };
            let page = q.page(after, f.limit);
            let mut stmt = tx.prepare(&page)?;
            let mut rows = stmt.query(rusqlite::params_from_iter(sql(&q.args)))?;
            while let Some(r) = rows.next()? {
                let seq: u64 = r.get("seq")?;
                report.rows.push((seq, event_from_row(r)??));
            }
            drop(rows);
            drop(stmt);
            tx.finish()?;
            Ok(report)
        })
        .await
    }

    /// Bytes of the database file with its write-ahead log.
    pub async fn size_bytes(&self) -> StorageResult<u64> {
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        Ok(size(&self.path) + size(&dbfile::companion(&self.path, "-wal")))
    }

    /// Whether the database is a restored copy no hub has opened yet.
    pub async fn restored_copy(&self) -> StorageResult<bool> {
        self.read(|conn| Ok(adb::meta_get(conn, "restored_copy")?.is_some())).await
    }

    /// Journal events held (of one store, or all).
    pub async fn journal_count(&self, store: Option<StoreId>) -> StorageResult<u64> {
        self.read(move |conn| {
            Ok(match store {
                Some(s) => {
                    conn.query_row("SELECT COUNT(*) FROM journal WHERE store = ?1", [s.as_str()], |r| r.get(0))?
                }
                None => conn.query_row("SELECT COUNT(*) FROM journal", [], |r| r.get(0))?,
            })
        })
        .await
    }

    /// Online backup of the database alone (no PKI: `restore` refuses it, but it opens as a hub
    /// database); the copy takes a new hub incarnation when opened.
    pub async fn backup(&self, to: PathBuf) -> StorageResult<()> {
        self.backup_with(to, Vec::new(), String::new(), None).await
    }

    /// Online backup to a new file (0600; refused if it exists) holding the database and `files`
    /// (the PKI, the config; see [`shelfsync_node::backup`]); the copy takes a new hub incarnation
    /// when opened.
    pub async fn backup_with(
        &self,
        to: PathBuf,
        files: Vec<shelfsync_node::backup::BackupFile>,
        source_dir: String,
        config_path: Option<String>,
    ) -> StorageResult<()> {
        let manifest = shelfsync_node::backup::Manifest {
            format_version: shelfsync_node::backup::FORMAT_VERSION,
            kind: "hub".into(),
            writer: self.hub_writer.to_string(),
            created_at_ms: now_ms(),
            source_dir,
            db_file: "hub.db".into(),
            config_path,
        };
        self.read(move |conn| {
            shelfsync_node::backup::write(conn, &to, &manifest, &files, |copy| {
                adb::meta_set(copy, "restored_copy", "1").map_err(|e| e.to_string())
            })
            .map_err(|e| match e {
                shelfsync_node::backup::BackupError::Exists(_) => StorageError::Invalid(e.to_string()),
                other => StorageError::Backend(other.to_string()),
            })
        })
        .await
    }
}
