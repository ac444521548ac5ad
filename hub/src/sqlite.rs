//! [`HubStorage`] on SQLite: one group-committing writer thread and a few reader threads
//! ([`SqliteThreads`]), WAL, migrations in code.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use sha2::{Digest as _, Sha256};
use shelfsync_node::config::Synchronous;
use shelfsync_node::db::{self as adb, DbError};
use shelfsync_node::dbfile;
use shelfsync_node::journal::{event_from_row, insert_event};
use shelfsync_node::sqlite::{AfterCommit, SqliteError, SqliteThreads};
use tokio::sync::watch;
use uuid::Uuid;

use crate::reserve::{self, Staleness};
use shelfsync_node::catalog;
use shelfsync_shared::counter::{sum_entries, StateDigest};
use shelfsync_shared::lineage::{HubLineage, RetireReason};
use shelfsync_shared::mac::{EntryMac, MacKey};
use shelfsync_shared::sync::{DeltaRead, JournalRead};
use shelfsync_shared::wire::{Delta, JournalBatch};
use shelfsync_shared::{EventKind, Incarnation, JournalEvent, NodeId, PnEntry, Sku, StoreId, WriterId};

use crate::storage::*;

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
    crate::reserve::MIGRATION,
    // 3: the catalog documents and their materialised rows.
    shelfsync_node::catalog::MIGRATION,
    // 4: token ids, names, expiry and last use.
    crate::tokens::MIGRATION,
    // 5: writer lineage per agent writer, details of conflicts about agents, agents per store.
    "ALTER TABLE peers ADD COLUMN lineage BLOB;
     ALTER TABLE conflicts ADD COLUMN details TEXT;
     ALTER TABLE stores ADD COLUMN max_agents INTEGER NOT NULL DEFAULT 1;",
];

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

fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

/// Options for opening the hub database.
#[derive(Clone, Copy, Debug)]
pub struct SqliteOptions {
    /// How silent stores are discounted online.
    pub staleness: Staleness,
    /// Durability.
    pub synchronous: Synchronous,
    /// Most writes per group commit.
    pub group_commit_max: usize,
    /// Reader threads.
    pub readers: usize,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            staleness: Staleness::default(),
            synchronous: Synchronous::Full,
            group_commit_max: 512,
            readers: 2,
        }
    }
}

/// The SQLite implementation of [`HubStorage`].
pub struct SqliteStorage {
    threads: SqliteThreads,
    hub_writer: std::sync::RwLock<WriterId>,
    /// Tags the entries the hub sends, so stores can give them back after a restore.
    key: MacKey,
    staleness: Staleness,
    change_head: watch::Receiver<u64>,
}

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

    /// Opens an existing hub database and starts its threads. Blocking.
    pub fn open(path: &Path, opts: SqliteOptions) -> Result<SqliteStorage, StorageError> {
        dbfile::check_existing(path, &recovery_advice(path)).map_err(|e| match e {
            dbfile::FileError::Missing(_) => StorageError::Invalid(format!(
                "no hub database at {}; run `shelfsync-hub init --data-dir` first",
                path.display()
            )),
            dbfile::FileError::Unusable(m) => StorageError::Corrupt(m),
        })?;
        dbfile::tighten_install(path, &path.parent().map(|d| vec![d.join("pki")]).unwrap_or_default());
        let mut conn = adb::open_conn(path, OpenFlags::SQLITE_OPEN_READ_WRITE, opts.synchronous)?;
        adb::migrate(&mut conn, MIGRATIONS)?;
        let (hub_writer, key) = {
            let tx = conn.transaction()?;
            let key = mac_key(&tx)?;
            let w = if adb::meta_get(&tx, "restored_copy")?.is_some() {
                let old = adb::meta_get(&tx, "writer")?.unwrap_or_default();
                let w = mint(&tx)?;
                tracing::warn!(old = %old, writer = %w, "hub database was restored from a backup; minted a new writer incarnation; stores give back what it lost");
                let details = serde_json::json!({"old_writer": old, "new_writer": w.to_string(), "why": "opened a restored backup"});
                hub_rolled_back(&tx, &old, details, now_ms())?;
                w
            } else {
                let w =
                    adb::meta_get(&tx, "writer")?.ok_or_else(|| StorageError::Corrupt("meta.writer missing".into()))?;
                w.parse().map_err(|e| StorageError::Corrupt(format!("meta.writer: {e}")))?
            };
            tx.commit()?;
            (w, key)
        };
        let mut readers = Vec::new();
        for _ in 0..opts.readers.max(1) {
            readers.push(adb::open_conn(path, OpenFlags::SQLITE_OPEN_READ_ONLY, opts.synchronous)?);
        }
        let (head_tx, change_head) = watch::channel(reserve::changes_head(&conn)?);
        // Wake change-feed readers (SSE, webhooks) after every commit that appended events.
        let after_commit: AfterCommit = Box::new(move |conn| match reserve::changes_head(conn) {
            Ok(h) => {
                head_tx.send_if_modified(|old| std::mem::replace(old, h) != h);
            }
            Err(e) => tracing::error!(error = %e, "cannot read the change feed head"),
        });
        let threads = SqliteThreads::spawn("hub", conn, readers, opts.group_commit_max, after_commit)
            .map_err(|e| StorageError::Backend(format!("spawning storage threads: {e}")))?;
        Ok(SqliteStorage {
            threads,
            hub_writer: std::sync::RwLock::new(hub_writer),
            key,
            staleness: opts.staleness,
            change_head,
        })
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
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2).unwrap_or("zz"), 16))
        .collect::<Result<_, _>>()
        .map_err(|e| StorageError::Corrupt(format!("meta.mac_key: {e}")))?;
    let bytes: [u8; 32] = bytes.try_into().map_err(|_| StorageError::Corrupt("meta.mac_key is not 32 bytes".into()))?;
    Ok(MacKey::from_bytes(bytes))
}

/// A conflict id derived from what makes two reports "the same".
fn conflict_id(parts: &[&str]) -> Uuid {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u32).to_be_bytes());
        h.update(p.as_bytes());
    }
    let mut b = [0u8; 16];
    b.copy_from_slice(&h.finalize()[..16]);
    uuid::Builder::from_random_bytes(b).into_uuid()
}

/// Records a conflict about a store's agents (or the hub's files), once per `key`, with a feed
/// event. Returns whether it was new.
fn agent_conflict_in(
    conn: &Connection,
    kind: AgentConflict,
    store: &StoreId,
    key: &str,
    resolution: String,
    details: serde_json::Value,
    now_ms: i64,
) -> StorageResult<bool> {
    let c = reserve::Conflict {
        id: conflict_id(&[kind.as_str(), store.as_str(), key]),
        kind: kind.as_str().into(),
        store: store.clone(),
        sku: None,
        shortfall: 0,
        reservations: vec![],
        resolution,
        status: "open".into(),
        detected_at: shelfsync_shared::rfc3339(now_ms),
        resolved_at: None,
        details: Some(details),
    };
    let new = reserve::insert_conflict_once(conn, &c, now_ms)?;
    if new {
        reserve::emit(conn, kind.as_str(), now_ms, serde_json::json!({"conflict": c}))?;
    }
    Ok(new)
}

/// The hub runs on files older than its previous life reached: one `hub_rolled_back` conflict per
/// retired hub writer, recorded for every store (each must be checked).
fn hub_rolled_back(conn: &Connection, old: &str, details: serde_json::Value, now_ms: i64) -> StorageResult<()> {
    let stores = conn
        .prepare("SELECT id FROM stores WHERE revoked_at_ms IS NULL")?
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    for s in stores {
        agent_conflict_in(
            conn,
            AgentConflict::HubRolledBack,
            &store_col(s)?,
            old,
            "the hub's files are older than what this store saw: restocks and transfers authored after them \
             come back from the store (verified); check the store's stock"
                .into(),
            details.clone(),
            now_ms,
        )?;
    }
    Ok(())
}

fn heads(conn: &Connection) -> StorageResult<HubHeads> {
    let counter: Option<u64> = conn.query_row("SELECT MAX(seq) FROM counters", [], |r| r.get(0))?;
    let journal: Option<u64> = conn.query_row("SELECT MAX(seq) FROM journal", [], |r| r.get(0))?;
    Ok(HubHeads { counter: counter.unwrap_or(0), journal: journal.unwrap_or(0) })
}

fn entry(conn: &Connection, store: &StoreId, sku: &Sku, writer: &WriterId) -> StorageResult<PnEntry> {
    Ok(conn
        .prepare_cached("SELECT p, n FROM counters WHERE store = ?1 AND sku = ?2 AND writer = ?3")?
        .query_row(params![store.as_str(), sku.as_str(), writer.to_string()], |r| {
            Ok(PnEntry { p: r.get(0)?, n: r.get(1)? })
        })
        .optional()?
        .unwrap_or_default())
}

/// The next free counter sequence. A job takes it once and counts up: jobs run one at a time on
/// the writer connection, so nobody else can take the same numbers.
fn next_seq(conn: &Connection) -> StorageResult<u64> {
    Ok(conn.query_row("SELECT COALESCE(MAX(seq), 0) + 1 FROM counters", [], |r| r.get(0))?)
}

fn put_entry(
    conn: &Connection,
    store: &StoreId,
    sku: &Sku,
    writer: &WriterId,
    e: PnEntry,
    seq: u64,
) -> StorageResult<()> {
    conn.prepare_cached(
        "INSERT INTO counters (store, sku, writer, p, n, seq) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (store, sku, writer) DO UPDATE SET p = excluded.p, n = excluded.n, seq = excluded.seq",
    )?
    .execute(params![store.as_str(), sku.as_str(), writer.to_string(), e.p, e.n, seq])?;
    Ok(())
}

fn refresh_stock(conn: &Connection, store: &StoreId, sku: &Sku) -> StorageResult<i64> {
    let entries = conn
        .prepare_cached("SELECT p, n FROM counters WHERE store = ?1 AND sku = ?2")?
        .query_map(params![store.as_str(), sku.as_str()], |r| Ok(PnEntry { p: r.get(0)?, n: r.get(1)? }))?
        .collect::<Result<Vec<_>, _>>()?;
    let value = sum_entries(&entries)?;
    conn.prepare_cached(
        "INSERT INTO stock (store, sku, on_hand) VALUES (?1, ?2, ?3)
         ON CONFLICT (store, sku) DO UPDATE SET on_hand = excluded.on_hand",
    )?
    .execute(params![store.as_str(), sku.as_str(), value])?;
    Ok(value)
}

fn on_hand_row(conn: &Connection, store: &StoreId, sku: &Sku) -> StorageResult<bool> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM stock WHERE store = ?1 AND sku = ?2")?
        .query_row(params![store.as_str(), sku.as_str()], |_| Ok(()))
        .optional()?
        .is_some())
}

fn on_hand(conn: &Connection, store: &StoreId, sku: &Sku) -> StorageResult<i64> {
    Ok(conn
        .prepare_cached("SELECT on_hand FROM stock WHERE store = ?1 AND sku = ?2")?
        .query_row(params![store.as_str(), sku.as_str()], |r| r.get(0))
        .optional()?
        .unwrap_or(0))
}

fn store_exists(conn: &Connection, store: &StoreId) -> StorageResult<Option<Option<i64>>> {
    Ok(conn
        .prepare_cached("SELECT revoked_at_ms FROM stores WHERE id = ?1")?
        .query_row([store.as_str()], |r| r.get(0))
        .optional()?)
}

fn require_store(conn: &Connection, store: &StoreId) -> StorageResult<()> {
    match store_exists(conn, store)? {
        None => Err(StorageError::UnknownStore(store.clone())),
        Some(Some(_)) => Err(StorageError::Revoked(store.clone())),
        Some(None) => Ok(()),
    }
}

fn sku_col(s: String) -> StorageResult<Sku> {
    Ok(adb::sku_col(s)?)
}

fn store_col(s: String) -> StorageResult<StoreId> {
    s.parse().map_err(|e| StorageError::Corrupt(format!("store id in database: {e}")))
}

fn lineage_col(v: Option<Vec<u8>>) -> StorageResult<HubLineage> {
    v.map(|b| postcard::from_bytes(&b).map_err(|e| StorageError::Corrupt(format!("peer lineage: {e}"))))
        .transpose()
        .map(Option::unwrap_or_default)
}

fn ensure_peer(conn: &Connection, store: &StoreId, writer: &WriterId) -> StorageResult<()> {
    conn.prepare_cached("INSERT OR IGNORE INTO peers (store, writer) VALUES (?1, ?2)")?
        .execute(params![store.as_str(), writer.to_string()])?;
    Ok(())
}

impl HubStorage for SqliteStorage {
    fn hub_writer(&self) -> WriterId {
        self.hub_writer.read().expect("hub writer lock").clone()
    }

    fn reincarnate(&self, why: String, now_ms: i64) -> BoxFuture<'_, StorageResult<WriterId>> {
        async move {
            let old = self.hub_writer();
            let new = self
                .write(move |conn| {
                    let w = mint(conn)?;
                    let details =
                        serde_json::json!({"old_writer": old.to_string(), "new_writer": w.to_string(), "why": why});
                    hub_rolled_back(conn, &old.to_string(), details, now_ms)?;
                    Ok(w)
                })
                .await?;
            *self.hub_writer.write().expect("hub writer lock") = new.clone();
            Ok(new)
        }
        .boxed()
    }

    fn agent_conflict(
        &self,
        kind: AgentConflict,
        store: StoreId,
        key: String,
        details: serde_json::Value,
        now_ms: i64,
    ) -> BoxFuture<'_, StorageResult<bool>> {
        let resolution = match kind {
            AgentConflict::DuplicateAgent => {
                "a second agent of this store was refused: switch one off (or allow several with `store agents`)"
            }
            AgentConflict::WriterCloned => {
                "the store's files run on two machines: the copy is refused while the other is live (it keeps selling \
                 offline); switch one off, and its sales arrive under a new writer"
            }
            AgentConflict::StoreRolledBack => {
                "the store's files were put back; its later sales count under a new writer"
            }
            AgentConflict::HubRolledBack => "the hub's files are older than what the store saw",
        }
        .to_owned();
        self.write(move |conn| agent_conflict_in(conn, kind, &store, &key, resolution, details, now_ms)).boxed()
    }

    fn record_retirements(
        &self,
        store: StoreId,
        reports: Vec<shelfsync_shared::wire::Retirement>,
        now_ms: i64,
    ) -> BoxFuture<'_, StorageResult<u64>> {
        self.write(move |conn| {
            let mut new = 0;
            for r in &reports {
                let kind = match r.reason {
                    RetireReason::RolledBack => AgentConflict::StoreRolledBack,
                };
                let window = r.window_ms.map(|(a, b)| {
                    serde_json::json!({"from": shelfsync_shared::rfc3339(a), "to": shelfsync_shared::rfc3339(b)})
                });
                let details = serde_json::json!({
                    "old_writer": r.old.to_string(),
                    "new_writer": r.new.to_string(),
                    "fork_ordinal": r.fork_ordinal,
                    "hub_ordinal": r.hub_ordinal,
                    "store_ordinal": r.own_ordinal,
                    "moved_changes": r.moved,
                    "ambiguous_changes": r.ambiguous,
                    "moved_window": window,
                    "retired_at": shelfsync_shared::rfc3339(r.at_ms),
                });
                let resolution = if r.ambiguous > 0 {
                    format!(
                        "the store's files forked from what the hub had; {} later changes now count under {}; up to {} \
                         of them may be counted twice: recount the SKUs they touched",
                        r.moved, r.new, r.ambiguous
                    )
                } else {
                    format!(
                        "the store's files forked from what the hub had (changes {} to {} of {} are the store's own); \
                         {} later changes now count under {}; nothing is lost or counted twice",
                        r.fork_ordinal + 1,
                        r.own_ordinal,
                        r.old,
                        r.moved,
                        r.new
                    )
                };
                let key = format!("{} {}", r.old, r.new);
                if agent_conflict_in(conn, kind, &store, &key, resolution, details, now_ms)? {
                    new += 1;
                }
            }
            Ok(new)
        })
        .boxed()
    }

    fn hub_entries_digest(&self, store: StoreId) -> BoxFuture<'_, StorageResult<StateDigest>> {
        self.read(move |conn| {
            let mut d = StateDigest::default();
            let mut stmt = conn.prepare_cached(
                "SELECT sku, writer, p, n FROM counters WHERE store = ?1 AND substr(writer, 1, 4) = 'hub@'",
            )?;
            let mut rows = stmt.query([store.as_str()])?;
            while let Some(r) = rows.next()? {
                d.add(&sku_col(r.get(0)?)?, &adb::writer_col(r.get(1)?)?, PnEntry { p: r.get(2)?, n: r.get(3)? });
            }
            Ok(d)
        })
        .boxed()
    }

    fn add_store(&self, store: StoreId, cert: CertRecord) -> BoxFuture<'_, StorageResult<()>> {
        self.write(move |conn| {
            if store_exists(conn, &store)?.is_some() {
                return Err(StorageError::StoreExists(store));
            }
            let now = now_ms();
            conn.execute("INSERT INTO stores (id, created_at_ms) VALUES (?1, ?2)", params![store.as_str(), now])?;
            conn.execute(
                "INSERT INTO certs (serial, store, fingerprint, issued_at_ms) VALUES (?1, ?2, ?3, ?4)",
                params![cert.serial, store.as_str(), cert.fingerprint, now],
            )?;
            Ok(())
        })
        .boxed()
    }

    fn set_max_agents(&self, store: StoreId, max: u32) -> BoxFuture<'_, StorageResult<()>> {
        self.write(move |conn| {
            require_store(conn, &store)?;
            conn.execute("UPDATE stores SET max_agents = ?2 WHERE id = ?1", params![store.as_str(), max])?;
            Ok(())
        })
        .boxed()
    }

    fn revoke_store(&self, store: StoreId) -> BoxFuture<'_, StorageResult<Vec<String>>> {
        self.write(move |conn| {
            if store_exists(conn, &store)?.is_none() {
                return Err(StorageError::UnknownStore(store));
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
        .boxed()
    }

    fn revoked_serials(&self) -> BoxFuture<'_, StorageResult<Vec<(String, i64)>>> {
        self.read(|conn| {
            Ok(conn
                .prepare("SELECT serial, revoked_at_ms FROM certs WHERE revoked_at_ms IS NOT NULL ORDER BY serial")?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<Vec<_>, _>>()?)
        })
        .boxed()
    }

    fn check_cert(&self, store: StoreId, serial: String) -> BoxFuture<'_, StorageResult<()>> {
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
                Some((_, Some(_))) => Err(StorageError::Revoked(store)),
                Some((_, None)) => Ok(()),
            }
        })
        .boxed()
    }

    fn stores(&self) -> BoxFuture<'_, StorageResult<Vec<StoreInfo>>> {
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
        .boxed()
    }

    fn touch_store(&self, store: StoreId, at_ms: i64) -> BoxFuture<'_, StorageResult<()>> {
        self.write(move |conn| {
            conn.execute(
                "UPDATE stores SET last_seen_ms = MAX(COALESCE(last_seen_ms, 0), ?2) WHERE id = ?1",
                params![store.as_str(), at_ms],
            )?;
            Ok(())
        })
        .boxed()
    }

    fn add_token(&self, token: crate::tokens::NewToken) -> BoxFuture<'_, StorageResult<crate::tokens::TokenInfo>> {
        self.write(move |conn| crate::tokens::insert(conn, &token, now_ms())).boxed()
    }

    fn token_by_hash(&self, hash: Vec<u8>) -> BoxFuture<'_, StorageResult<Option<crate::tokens::TokenInfo>>> {
        self.read(move |conn| crate::tokens::by_hash(conn, &hash)).boxed()
    }

    fn tokens(&self) -> BoxFuture<'_, StorageResult<Vec<crate::tokens::TokenInfo>>> {
        self.read(crate::tokens::list).boxed()
    }

    fn revoke_token(&self, id: Uuid) -> BoxFuture<'_, StorageResult<Option<crate::tokens::TokenInfo>>> {
        self.write(move |conn| crate::tokens::revoke(conn, id, now_ms())).boxed()
    }

    fn touch_token(&self, id: Uuid, at_ms: i64) -> BoxFuture<'_, StorageResult<()>> {
        self.write(move |conn| crate::tokens::touch(conn, id, at_ms)).boxed()
    }

    fn heads(&self) -> BoxFuture<'_, StorageResult<HubHeads>> {
        self.read(heads).boxed()
    }

    fn lookup_peer(&self, store: StoreId, writer: WriterId) -> BoxFuture<'_, StorageResult<PeerMarks>> {
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
        .boxed()
    }

    fn apply_delta(
        &self,
        store: StoreId,
        peer: WriterId,
        delta: Delta,
        lineage_base: Option<shelfsync_shared::lineage::Checkpoint>,
        pusher_boots: Vec<shelfsync_shared::lineage::Boot>,
        now: Now,
    ) -> BoxFuture<'_, StorageResult<Applied>> {
        let st = self.staleness;
        let (key, me) = (self.key.clone(), self.hub_writer());
        self.write(move |conn| {
            require_store(conn, &store)?;
            // Compare-and-set on the writer's history, before anything is written.
            let held: Option<Option<Vec<u8>>> = conn
                .prepare_cached("SELECT lineage FROM peers WHERE store = ?1 AND writer = ?2")?
                .query_row(params![store.as_str(), peer.to_string()], |r| r.get(0))
                .optional()?;
            let mut lineage = lineage_col(held.flatten())?;
            if let Some(base) = lineage_base.filter(|b| *b != lineage.head) {
                return Err(StorageError::Forked(format!(
                    "another connection moved {peer}'s history from change {} to {} since this one was welcomed; reconnect",
                    base.ordinal, lineage.head.ordinal
                )));
            }
            let mut holds_changed = BTreeSet::new();
            let mut touched = BTreeSet::new();
            let mut entries_changed = 0;
            let (mut recovered, mut own_lost) = (0, false);
            let tags: std::collections::HashMap<u32, EntryMac> = delta.macs.iter().copied().collect();
            let mut seq = next_seq(conn)?;
            for (i, (sku, writer, incoming)) in delta.entries().enumerate() {
                // A store writes its own writers' entries; anything else it may only give back with
                // the tag the hub put on it (checked here: the session cannot).
                let tag = tags.get(&(i as u32));
                match tag {
                    Some(t) if !key.verify(&store, sku, writer, incoming, t) => {
                        return Err(StorageError::Invalid(format!(
                            "store {store} gave back an entry of {writer} for {sku} whose tag does not match; \
                             a store cannot make up entries it was not sent"
                        )));
                    }
                    None if !writer.is_store(&store) => {
                        return Err(StorageError::Invalid(format!("writer {writer} may not write store {store}")));
                    }
                    _ => {}
                }
                incoming.check(writer)?;
                let current = entry(conn, &store, sku, writer)?;
                if !current.covers(incoming) {
                    put_entry(conn, &store, sku, writer, current.join(incoming), seq)?;
                    seq += 1;
                    touched.insert(sku.clone());
                    entries_changed += 1;
                    if tag.is_some() {
                        recovered += 1;
                        own_lost |= *writer == me;
                    }
                }
            }
            if let Some(l) = &delta.lineage {
                lineage.advance(l.head, &l.boots, &pusher_boots);
                ensure_peer(conn, &store, &peer)?;
                conn.prepare_cached("UPDATE peers SET lineage = ?3 WHERE store = ?1 AND writer = ?2")?.execute(
                    params![
                        store.as_str(),
                        peer.to_string(),
                        postcard::to_stdvec(&lineage).expect("lineage serialises")
                    ],
                )?;
            }
            // Close the holds the store picked in the same transaction that lowers on_hand, so a
            // picked unit is never counted both as held and as gone.
            if reserve::fulfil(conn, &store, &delta.fulfilled, now.ms)? {
                holds_changed.insert(store.clone());
            }
            let mut changed = Vec::with_capacity(touched.len());
            for sku in touched {
                let old = on_hand(conn, &store, &sku)?;
                let v = refresh_stock(conn, &store, &sku)?;
                reserve::record_velocity(conn, &store, &sku, old, v, now.ms, st.tau_ms)?;
                reserve::emit_availability(conn, &store, &sku, now.ms)?;
                holds_changed.extend(reserve::reconcile(conn, &store, &sku, v, &now, st)?);
                changed.push((sku, v));
            }
            let now = now.ms;
            ensure_peer(conn, &store, &peer)?;
            conn.prepare_cached(
                "UPDATE peers SET applied = MAX(applied, ?3), last_seen_ms = ?4 WHERE store = ?1 AND writer = ?2",
            )?
            .execute(params![store.as_str(), peer.to_string(), delta.upto, now])?;
            conn.prepare_cached("UPDATE stores SET last_seen_ms = ?2 WHERE id = ?1")?
                .execute(params![store.as_str(), now])?;
            Ok(Applied {
                changed,
                entries_changed,
                heads: heads(conn)?,
                holds_changed: holds_changed.into_iter().collect(),
                recovered,
                own_lost,
            })
        })
        .boxed()
    }

    fn read_delta(
        &self,
        store: StoreId,
        exclude: Option<WriterId>,
        after: u64,
        limit: usize,
    ) -> BoxFuture<'_, StorageResult<DeltaRead>> {
        let key = self.key.clone();
        self.read(move |conn| {
            let tx = conn.unchecked_transaction()?;
            let exclude = exclude.map(|w| w.to_string()).unwrap_or_default();
            let mut stmt = tx.prepare_cached(
                "SELECT sku, writer, p, n, seq FROM counters
                 WHERE store = ?1 AND seq > ?2 AND writer <> ?3 ORDER BY seq LIMIT ?4",
            )?;
            let rows = stmt.query_map(params![store.as_str(), after, exclude, limit as i64], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get(2)?, r.get(3)?, r.get::<_, u64>(4)?))
            })?;
            let mut entries = Vec::new();
            let mut last = after;
            for row in rows {
                let (sku, writer, p, n, seq) = row?;
                entries.push((sku_col(sku)?, adb::writer_col(writer)?, PnEntry { p, n }));
                last = seq;
            }
            drop(stmt);
            let upto = if entries.len() == limit { last } else { heads(&tx)?.counter.max(after) };
            tx.finish()?;
            let macs = entries.iter().enumerate().map(|(i, (k, w, e))| (i as u32, key.tag(&store, k, w, *e))).collect();
            Ok(DeltaRead { upto, entries, macs, ..DeltaRead::default() })
        })
        .boxed()
    }

    fn set_acked(&self, store: StoreId, peer: WriterId, upto: u64) -> BoxFuture<'_, StorageResult<()>> {
        self.write(move |conn| {
            ensure_peer(conn, &store, &peer)?;
            conn.prepare_cached("UPDATE peers SET acked = ?3, last_seen_ms = ?4 WHERE store = ?1 AND writer = ?2")?
                .execute(params![store.as_str(), peer.to_string(), upto, now_ms()])?;
            Ok(())
        })
        .boxed()
    }

    fn apply_journal(&self, store: StoreId, peer: WriterId, batch: JournalBatch) -> BoxFuture<'_, StorageResult<()>> {
        self.write(move |conn| {
            require_store(conn, &store)?;
            for e in &batch.events {
                if e.store != store || !e.writer.is_store(&store) {
                    return Err(StorageError::Invalid(format!(
                        "journal event {} does not belong to store {store}",
                        e.id
                    )));
                }
                // A resent event (a reconnect) must not reopen a conflict someone resolved.
                let new = insert_event(conn, e)?;
                if !new {
                    continue;
                }
                if e.flags.contains(&shelfsync_shared::EventFlag::UnknownSku) {
                    reserve::unknown_sku(conn, &store, &e.sku, "not in the catalog", now_ms())?;
                } else if e.flags.contains(&shelfsync_shared::EventFlag::InactiveSku) {
                    reserve::unknown_sku(conn, &store, &e.sku, "inactive in the catalog", now_ms())?;
                }
            }
            ensure_peer(conn, &store, &peer)?;
            conn.prepare_cached(
                "UPDATE peers SET journal_applied = MAX(journal_applied, ?3) WHERE store = ?1 AND writer = ?2",
            )?
            .execute(params![store.as_str(), peer.to_string(), batch.upto])?;
            Ok(())
        })
        .boxed()
    }

    fn read_journal(&self, store: StoreId, after: u64, limit: usize) -> BoxFuture<'_, StorageResult<JournalRead>> {
        self.read(move |conn| {
            let tx = conn.unchecked_transaction()?;
            let mut stmt = tx.prepare_cached(
                "SELECT seq, id, line, kind, store, sku, delta, reason, occurred_at_ms, recorded_at_ms, writer, flags
                 FROM journal WHERE store = ?1 AND seq > ?2 AND substr(writer, 1, 4) = 'hub@' ORDER BY seq LIMIT ?3",
            )?;
            let mut rows = stmt.query(params![store.as_str(), after, limit as i64])?;
            let mut events = Vec::new();
            let mut last = after;
            while let Some(r) = rows.next()? {
                last = r.get("seq")?;
                events.push(event_from_row(r)??);
            }
            drop(rows);
            drop(stmt);
            let upto = if events.len() == limit { last } else { heads(&tx)?.journal.max(after) };
            tx.finish()?;
            Ok(JournalRead { upto, events })
        })
        .boxed()
    }

    fn set_journal_acked(&self, store: StoreId, peer: WriterId, upto: u64) -> BoxFuture<'_, StorageResult<()>> {
        self.write(move |conn| {
            ensure_peer(conn, &store, &peer)?;
            conn.prepare_cached("UPDATE peers SET journal_acked = ?3 WHERE store = ?1 AND writer = ?2")?
                .execute(params![store.as_str(), peer.to_string(), upto])?;
            Ok(())
        })
        .boxed()
    }

    fn digest(&self, store: StoreId) -> BoxFuture<'_, StorageResult<(StateDigest, u64)>> {
        self.read(move |conn| {
            let tx = conn.unchecked_transaction()?;
            let mut d = StateDigest::default();
            let mut head = 0u64;
            {
                let mut stmt = tx.prepare_cached("SELECT sku, writer, p, n, seq FROM counters WHERE store = ?1")?;
                let mut rows = stmt.query([store.as_str()])?;
                while let Some(r) = rows.next()? {
                    let sku = sku_col(r.get(0)?)?;
                    let writer = adb::writer_col(r.get(1)?)?;
                    d.add(&sku, &writer, PnEntry { p: r.get(2)?, n: r.get(3)? });
                    head = head.max(r.get(4)?);
                }
            }
            tx.finish()?;
            Ok((d, head))
        })
        .boxed()
    }

    fn hub_change(&self, req: HubChangeRequest, now: Now) -> BoxFuture<'_, StorageResult<HubChangeOutcome>> {
        let (hub, st) = (self.hub_writer(), self.staleness);
        self.write(move |conn| hub_change_in(conn, &hub, &req, &now, st)).boxed()
    }

    fn create_reservation(&self, req: ReservationRequest, now: Now) -> BoxFuture<'_, StorageResult<Written>> {
        let st = self.staleness;
        self.write(move |conn| reserve::create(conn, &req, &now, st)).boxed()
    }

    fn reservation(&self, id: Uuid) -> BoxFuture<'_, StorageResult<Option<ReservationView>>> {
        self.read(move |conn| reserve::view(conn, id)).boxed()
    }

    fn act(&self, id: Uuid, action: Action, key: Option<String>, now_ms: i64) -> BoxFuture<'_, StorageResult<Written>> {
        self.write(move |conn| reserve::act(conn, id, action, key.as_deref(), now_ms)).boxed()
    }

    fn expire_due(&self, now_ms: i64) -> BoxFuture<'_, StorageResult<Vec<StoreId>>> {
        self.write(move |conn| reserve::expire_due(conn, now_ms)).boxed()
    }

    fn holds_snapshot(&self, store: StoreId) -> BoxFuture<'_, StorageResult<shelfsync_shared::wire::HoldsSnapshot>> {
        self.read(move |conn| reserve::holds_snapshot(conn, &store)).boxed()
    }

    fn availability(&self, skus: Vec<Sku>, now: Now) -> BoxFuture<'_, StorageResult<Vec<(Sku, Vec<StoreFigures>)>>> {
        let st = self.staleness;
        self.read(move |conn| {
            let tx = conn.unchecked_transaction()?;
            let out = skus
                .into_iter()
                .map(|sku| Ok((sku.clone(), reserve::figures(&tx, &sku, &now, st)?)))
                .collect::<StorageResult<Vec<_>>>()?;
            tx.finish()?;
            Ok(out)
        })
        .boxed()
    }

    fn conflicts(&self, f: ConflictFilter) -> BoxFuture<'_, StorageResult<Vec<Conflict>>> {
        self.read(move |conn| reserve::conflicts(conn, f.store.as_ref(), f.sku.as_ref(), f.status.as_deref(), f.limit))
            .boxed()
    }

    fn changes_after(&self, cursor: u64, limit: usize) -> BoxFuture<'_, StorageResult<Vec<ChangeEvent>>> {
        self.read(move |conn| reserve::changes_after(conn, cursor, limit)).boxed()
    }

    fn load_doc(&self, name: String) -> BoxFuture<'_, StorageResult<TrackedDoc>> {
        self.read(move |conn| Ok(TrackedDoc::load(conn, &name)?)).boxed()
    }

    fn sync_state(&self, doc: String, peer: String) -> BoxFuture<'_, StorageResult<automerge::sync::State>> {
        self.read(move |conn| Ok(catalog::load_sync_state(conn, &doc, &peer)?)).boxed()
    }

    fn catalog_commit(&self, c: CatalogCommit) -> BoxFuture<'_, StorageResult<i64>> {
        self.write(move |conn| {
            let now = now_ms();
            if let Some(w) = &c.write {
                catalog::write_chunk(conn, w)?;
            }
            catalog::write_item_rows(conn, &c.items)?;
            for (sku, _) in &c.items {
                let sku = sku_col(sku.clone())?;
                reserve::resolve_known(conn, &sku, now)?;
                let stores = conn
                    .prepare_cached("SELECT store FROM stock WHERE sku = ?1")?
                    .query_map([sku.as_str()], |r| r.get::<_, String>(0))?
                    .collect::<Result<Vec<_>, _>>()?;
                for s in stores {
                    reserve::emit_availability(conn, &store_col(s)?, &sku, now)?;
                }
            }
            if let Some((store, rows)) = &c.overrides {
                catalog::write_override_rows(conn, store, rows)?;
                for (sku, _) in rows {
                    let sku = sku_col(sku.clone())?;
                    if on_hand_row(conn, store, &sku)? {
                        reserve::emit_availability(conn, store, &sku, now)?;
                    }
                }
            }
            for (doc, peer, state) in &c.sync_states {
                conn.prepare_cached(
                    "INSERT INTO doc_sync (doc, peer, state) VALUES (?1, ?2, ?3)
                     ON CONFLICT (doc, peer) DO UPDATE SET state = excluded.state",
                )?
                .execute(params![doc, peer, state])?;
            }
            Ok(catalog::last_chunk(conn, catalog::CATALOG_DOC)?)
        })
        .boxed()
    }

    fn doc_chunks_after(&self, doc: String, after: i64) -> BoxFuture<'_, StorageResult<Vec<(i64, Vec<u8>)>>> {
        self.read(move |conn| Ok(catalog::chunks_after(conn, &doc, after)?)).boxed()
    }

    fn catalog_item(&self, sku: Sku) -> BoxFuture<'_, StorageResult<Option<CatalogView>>> {
        self.read(move |conn| Ok(catalog::view(conn, &sku, None)?)).boxed()
    }

    fn catalog_page(&self, after: Option<Sku>, limit: usize) -> BoxFuture<'_, StorageResult<Vec<CatalogView>>> {
        self.read(move |conn| Ok(catalog::page(conn, after.as_ref(), limit)?)).boxed()
    }

    fn change_head(&self) -> watch::Receiver<u64> {
        self.change_head.clone()
    }

    fn webhook_cursor(&self, url: String) -> BoxFuture<'_, StorageResult<Option<u64>>> {
        self.read(move |conn| {
            Ok(conn.query_row("SELECT cursor FROM webhook_cursors WHERE url = ?1", [url], |r| r.get(0)).optional()?)
        })
        .boxed()
    }

    fn set_webhook_cursor(&self, url: String, cursor: u64) -> BoxFuture<'_, StorageResult<()>> {
        self.write(move |conn| {
            conn.execute(
                "INSERT INTO webhook_cursors (url, cursor) VALUES (?1, ?2)
                 ON CONFLICT (url) DO UPDATE SET cursor = MAX(cursor, excluded.cursor)",
                params![url, cursor],
            )?;
            Ok(())
        })
        .boxed()
    }

    fn stock_of(&self, skus: Vec<Sku>) -> BoxFuture<'_, StorageResult<Vec<StoreStock>>> {
        self.read(move |conn| {
            let mut out = Vec::new();
            let mut stmt = conn.prepare_cached("SELECT store, on_hand FROM stock WHERE sku = ?1 ORDER BY store")?;
            for sku in skus {
                let rows = stmt.query_map([sku.as_str()], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
                for row in rows {
                    let (store, on_hand) = row?;
                    out.push(StoreStock { store: store_col(store)?, sku: sku.clone(), on_hand });
                }
            }
            Ok(out)
        })
        .boxed()
    }

    fn store_stock(
        &self,
        store: StoreId,
        after: Option<Sku>,
        limit: usize,
    ) -> BoxFuture<'_, StorageResult<Vec<StoreStock>>> {
        self.read(move |conn| {
            if store_exists(conn, &store)?.is_none() {
                return Err(StorageError::UnknownStore(store));
            }
            let after = after.map(String::from).unwrap_or_default();
            let rows = conn
                .prepare_cached("SELECT sku, on_hand FROM stock WHERE store = ?1 AND sku > ?2 ORDER BY sku LIMIT ?3")?
                .query_map(params![store.as_str(), after, limit as i64], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            rows.into_iter()
                .map(|(sku, on_hand)| Ok(StoreStock { store: store.clone(), sku: sku_col(sku)?, on_hand }))
                .collect()
        })
        .boxed()
    }

    fn journal_count(&self, store: Option<StoreId>) -> BoxFuture<'_, StorageResult<u64>> {
        self.read(move |conn| {
            Ok(match store {
                Some(s) => {
                    conn.query_row("SELECT COUNT(*) FROM journal WHERE store = ?1", [s.as_str()], |r| r.get(0))?
                }
                None => conn.query_row("SELECT COUNT(*) FROM journal", [], |r| r.get(0))?,
            })
        })
        .boxed()
    }

    fn backup(&self, to: PathBuf) -> BoxFuture<'_, StorageResult<()>> {
        self.read(move |conn| {
            dbfile::create_private_file(&to).map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => StorageError::Invalid(format!("{} already exists", to.display())),
                _ => StorageError::Backend(format!("creating {}: {e}", to.display())),
            })?;
            conn.backup(rusqlite::MAIN_DB, &to, None)?;
            let copy = Connection::open(&to)?;
            adb::meta_set(&copy, "restored_copy", "1")?;
            Ok(())
        })
        .boxed()
    }
}

fn hub_change_in(
    conn: &Connection,
    hub: &WriterId,
    req: &HubChangeRequest,
    now_ctx: &Now,
    st: Staleness,
) -> StorageResult<HubChangeOutcome> {
    let kind = match &req.change {
        HubChange::Restock { .. } => EventKind::Restock,
        HubChange::Transfer { .. } => EventKind::Transfer,
    };
    let fingerprint = shelfsync_shared::fingerprint_of(&(&req.change, &req.reason));
    let earlier: Option<(String, Vec<u8>, String)> = conn
        .prepare_cached("SELECT kind, fingerprint, response FROM requests WHERE id = ?1")?
        .query_row([req.id.as_bytes().as_slice()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    if let Some((k, fp, response)) = earlier {
        if k != kind.as_str() || fp != fingerprint {
            return Err(StorageError::IdempotencyConflict { id: req.id, kind: k });
        }
        let response: HubChangeResponse =
            serde_json::from_str(&response).map_err(|e| StorageError::Corrupt(format!("stored response: {e}")))?;
        return Ok(HubChangeOutcome {
            created: false,
            response,
            stores: Vec::new(),
            heads: heads(conn)?,
            holds_changed: Vec::new(),
        });
    }
    // (store, sku, delta, reason) per side.
    let mut moves: Vec<(StoreId, Sku, i64, Option<String>)> = Vec::new();
    match &req.change {
        HubChange::Restock { store, lines } => {
            require_store(conn, store)?;
            for l in lines {
                moves.push((store.clone(), l.sku.clone(), l.qty as i64, req.reason.clone()));
            }
        }
        HubChange::Transfer { from, to, lines } => {
            require_store(conn, from)?;
            require_store(conn, to)?;
            for l in lines {
                let have = on_hand(conn, from, &l.sku)?;
                let already: i64 =
                    moves.iter().filter(|(s, k, d, _)| s == from && k == &l.sku && *d < 0).map(|(_, _, d, _)| -d).sum();
                if have - already < l.qty as i64 {
                    return Err(StorageError::InsufficientStock {
                        store: from.clone(),
                        sku: l.sku.clone(),
                        on_hand: have - already,
                        wanted: l.qty,
                    });
                }
                let why = |dir: &str, other: &StoreId| {
                    Some(match &req.reason {
                        Some(r) => format!("{dir} {other}: {r}"),
                        None => format!("{dir} {other}"),
                    })
                };
                moves.push((from.clone(), l.sku.clone(), -(l.qty as i64), why("to", to)));
                moves.push((to.clone(), l.sku.clone(), l.qty as i64, why("from", from)));
            }
        }
    }
    let now = now_ms();
    let mut lines = Vec::new();
    let mut stores: Vec<StoreId> = Vec::new();
    let mut line_no: std::collections::HashMap<StoreId, u32> = Default::default();
    let mut holds_changed = BTreeSet::new();
    let mut seq = next_seq(conn)?;
    for (store, sku, delta, reason) in moves {
        let next = entry(conn, &store, &sku, hub)?.apply(hub, delta)?;
        put_entry(conn, &store, &sku, hub, next, seq)?;
        seq += 1;
        let on_hand = refresh_stock(conn, &store, &sku)?;
        reserve::emit_availability(conn, &store, &sku, now)?;
        holds_changed.extend(reserve::reconcile(conn, &store, &sku, on_hand, now_ctx, st)?);
        let n = line_no.entry(store.clone()).or_default();
        insert_event(
            conn,
            &JournalEvent {
                id: req.id,
                line: *n,
                kind,
                store: store.clone(),
                sku: sku.clone(),
                delta,
                reason,
                occurred_at_ms: now,
                recorded_at_ms: now,
                writer: hub.clone(),
                flags: Vec::new(),
            },
        )?;
        *n += 1;
        if !stores.contains(&store) {
            stores.push(store.clone());
        }
        lines.push(ChangedLine { store, sku, delta, on_hand });
    }
    let response = HubChangeResponse {
        id: req.id,
        kind: kind.as_str().to_owned(),
        lines,
        recorded_at: shelfsync_shared::rfc3339(now),
    };
    conn.prepare_cached(
        "INSERT INTO requests (id, kind, fingerprint, response, recorded_at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![
        req.id.as_bytes().as_slice(),
        kind.as_str(),
        fingerprint,
        serde_json::to_string(&response).expect("serialises"),
        now
    ])?;
    Ok(HubChangeOutcome {
        created: true,
        response,
        stores,
        heads: heads(conn)?,
        holds_changed: holds_changed.into_iter().collect(),
    })
}
