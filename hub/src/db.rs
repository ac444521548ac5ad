//! The hub's storage, whatever the engine: [`HubDb`] is SQLite (embedded, the default: one file in
//! the data dir) or PostgreSQL (`storage.url = "postgres://…"`, `--database-url`). Both persist the
//! same records ([`crate::persist::rows`]) and the same side writes ([`SideWrite`]), commit one
//! transaction per decided batch (group commit), and answer the same reads. The decider and the
//! runtime above never see which one it is.

use std::path::{Path, PathBuf};

use shelfsync_hub_core::{Partition, Partitions, Record};
use shelfsync_shared::lineage::HubLineage;
use shelfsync_shared::mac::MacKey;
use shelfsync_shared::sync::JournalRead;
use shelfsync_shared::{JournalEvent, Sku, StoreId, WriterId};
use uuid::Uuid;

use crate::postgres::PgStorage;
use crate::sqlite::{AdjustmentFilter, AdjustmentReport, SqliteOptions, SqliteStorage};
use crate::storage::*;

/// Where the hub's database is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// `hub.db` in the data dir.
    Sqlite(PathBuf),
    /// A PostgreSQL database (`postgres://user@host:port/db`).
    Postgres(String),
}

/// The file in a data dir that says where its database is when it is not the embedded one
/// (written by `init --database-url`; 0600: the URL may hold a password).
pub const URL_FILE: &str = "database-url";

impl Target {
    /// Where a data dir's database is: `url` if given, else what the data dir's [`URL_FILE`]
    /// says, else the embedded SQLite database.
    pub fn for_data_dir(data_dir: &Path, url: Option<&str>) -> Result<Target, StorageError> {
        if url.is_some_and(|u| !u.trim().is_empty()) {
            return Target::new(data_dir, url);
        }
        let file = data_dir.join(URL_FILE);
        match std::fs::read_to_string(&file) {
            Ok(text) => Target::new(data_dir, Some(text.trim())).map_err(|e| match e {
                StorageError::Invalid(m) => StorageError::Invalid(format!("{}: {m}", file.display())),
                other => other,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Target::new(data_dir, None),
            Err(e) => Err(StorageError::Backend(format!("{}: {e}", file.display()))),
        }
    }

    /// The target for a data dir and an optional database URL (which wins).
    pub fn new(data_dir: &Path, url: Option<&str>) -> Result<Target, StorageError> {
        match url.map(str::trim).filter(|u| !u.is_empty()) {
            None => Ok(Target::Sqlite(crate::sqlite::db_path(data_dir))),
            Some(u) if u.starts_with("postgres://") || u.starts_with("postgresql://") => {
                Ok(Target::Postgres(u.to_owned()))
            }
            Some(u) => Err(StorageError::Invalid(format!(
                "database URL {} is not a PostgreSQL URL (postgres://user@host:port/database); leave it unset \
                 for the embedded SQLite database",
                redact(u)
            ))),
        }
    }

    /// Whether a database here may have `partitions` (several need PostgreSQL).
    pub fn check_partitions(&self, partitions: Partitions) -> StorageResult<()> {
        match self {
            Target::Sqlite(_) if partitions != Partitions::ONE => Err(StorageError::Invalid(format!(
                "{} partitions need PostgreSQL storage (--database-url): one SQLite hub decides for the whole chain",
                partitions.count()
            ))),
            _ => Ok(()),
        }
    }

    /// How to name it in logs (no password).
    pub fn describe(&self) -> String {
        match self {
            Target::Sqlite(p) => format!("sqlite {}", p.display()),
            Target::Postgres(u) => format!("postgres {}", redact(u)),
        }
    }
}

/// A database URL without its password.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s + 3 => {
            let userinfo = &url[s + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// What the runtime writes beside the decider's records, in the same transaction.
#[derive(Debug)]
pub enum SideWrite {
    /// A new hub life began now: note when, and that the files are no longer an unopened
    /// restored copy.
    NewLife {
        /// When.
        at_ms: i64,
    },
    /// An agent writer's delta was merged up to `upto` (its lineage row if it moved).
    PeerApplied {
        /// The store.
        store: StoreId,
        /// The agent writer.
        peer: WriterId,
        /// Its counter sequence merged.
        upto: u64,
        /// Contact time.
        at_ms: i64,
        /// The writer's lineage as the hub holds it (postcard), if it moved.
        lineage: Option<Vec<u8>>,
    },
    /// An agent writer's journal events, stored up to `upto`.
    PeerJournal {
        /// The store.
        store: StoreId,
        /// The agent writer.
        peer: WriterId,
        /// Its journal sequence stored.
        upto: u64,
        /// The events (stored once per (store, id, line)).
        events: Vec<JournalEvent>,
    },
    /// A catalog change's rows.
    Catalog(CatalogCommit),
    /// A partition's decider applied a store's merges from the sync plane up to `upto`
    /// (partitioned PostgreSQL databases only: `crate::syncplane`): their merge-log rows go.
    MergeApplied {
        /// The partition.
        partition: shelfsync_hub_core::Partition,
        /// The store.
        store: StoreId,
        /// Which log: `crate::syncplane::LogKind` as its column.
        kind: i16,
        /// The row's store sequence.
        upto: u64,
    },
}

/// One decided batch to commit in one transaction.
pub struct Commit {
    /// The decider's records.
    pub records: Vec<Record>,
    /// The runtime's rows.
    pub side: Vec<SideWrite>,
}

/// Called once the batch is durable (or failed: nothing of it is).
pub type CommitDone = Box<dyn FnOnce(Result<(), String>) + Send>;

/// The handle the decider thread commits through (cheap to clone).
#[derive(Clone)]
pub enum Committer {
    /// SQLite's writer thread.
    Sqlite(shelfsync_node::sqlite::SqliteThreads),
    /// PostgreSQL's writer task.
    Postgres(crate::postgres::PgCommitter),
}

impl Committer {
    /// Queues a batch; `done` runs after its commit, in submission order.
    pub fn submit(&self, commit: Commit, done: CommitDone) -> Result<(), String> {
        match self {
            Committer::Sqlite(t) => crate::sqlite::submit(t, commit, done),
            Committer::Postgres(p) => p.submit(commit, done),
        }
    }
}

/// An opened database with the rows the runtime loads.
pub struct Opened {
    /// The database.
    pub storage: HubDb,
    /// The decider's rows as records (none when `loader` holds them already).
    pub records: Vec<Record>,
    /// A warm standby's decider, brought up to date with the database.
    pub loader: Option<shelfsync_hub_core::Loader>,
    /// Per agent writer: (store, writer, journal applied, lineage).
    pub peers: Vec<(StoreId, WriterId, u64, HubLineage)>,
    /// The copy was made by `backup` (or is a restored file): the writer it ran as, which must be
    /// retired.
    pub restored_from: Option<String>,
}

/// What opening a database loads for the decider.
pub enum Load {
    /// Nothing (admin verbs).
    Nothing,
    /// Every record, with the newest `feed_retain` feed events.
    All {
        /// Feed events kept in memory.
        feed_retain: usize,
    },
    /// A warm standby's decider, brought up to date with what it has not read yet (PostgreSQL;
    /// on SQLite, as `All`). If it fell too far behind, or missed a commit, every record.
    Warm(Box<crate::standby::Warm>),
}

impl From<Option<usize>> for Load {
    fn from(feed_retain: Option<usize>) -> Load {
        match feed_retain {
            Some(feed_retain) => Load::All { feed_retain },
            None => Load::Nothing,
        }
    }
}

/// The hub's database.
pub enum HubDb {
    /// Embedded.
    Sqlite(SqliteStorage),
    /// PostgreSQL.
    Postgres(PgStorage),
}

macro_rules! both {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            HubDb::Sqlite($s) => $e,
            HubDb::Postgres($s) => $e,
        }
    };
}

impl HubDb {
    /// Creates a new hub database (refuses to overwrite one); returns the hub's first writer.
    /// `partitions`: how many partitions the chain's SKUs are split into (PostgreSQL only; one
    /// SQLite hub decides for the whole chain).
    pub async fn create(target: &Target, partitions: Partitions) -> StorageResult<WriterId> {
        target.check_partitions(partitions)?;
        match target {
            Target::Sqlite(path) => {
                let path = path.clone();
                tokio::task::spawn_blocking(move || SqliteStorage::create(&path))
                    .await
                    .map_err(|e| StorageError::Backend(e.to_string()))?
            }
            Target::Postgres(url) => PgStorage::create(url, partitions).await,
        }
    }

    /// Opens an existing database; reads the decider's rows when `load` says how many of the
    /// newest feed events to keep (`None`: read nothing, for admin verbs).
    pub async fn open(target: &Target, opts: SqliteOptions, load: Option<usize>) -> StorageResult<Opened> {
        Self::open_fenced(target, opts, load, None).await
    }

    /// [`HubDb::open`], with every commit fenced by the lease `fence` holds (PostgreSQL only:
    /// [`crate::cluster`]), loading what `load` says: [`HubDb::open_partition`] of partition 0.
    pub async fn open_fenced(
        target: &Target,
        opts: SqliteOptions,
        load: impl Into<Load>,
        fence: Option<crate::cluster::Fence>,
    ) -> StorageResult<Opened> {
        Self::open_partition(target, opts, load, fence, 0).await
    }

    /// [`HubDb::open_fenced`] for `partition`'s decider: it loads that partition's rows (and the
    /// global ones), its commits write that partition's rows, and `fence` is that partition's
    /// lease. SQLite has one partition, 0.
    pub async fn open_partition(
        target: &Target,
        opts: SqliteOptions,
        load: impl Into<Load>,
        fence: Option<crate::cluster::Fence>,
        partition: Partition,
    ) -> StorageResult<Opened> {
        let load = load.into();
        match target {
            Target::Sqlite(_) if partition != 0 => Err(StorageError::Invalid(format!(
                "partition {partition} does not exist: a SQLite hub decides for the whole chain (partition 0)"
            ))),
            Target::Sqlite(path) => {
                let path = path.clone();
                let load = match load {
                    Load::Nothing => None,
                    Load::All { feed_retain } => Some(feed_retain),
                    Load::Warm(w) => Some(w.feed_retain),
                };
                tokio::task::spawn_blocking(move || SqliteStorage::open_with(&path, opts, load))
                    .await
                    .map_err(|e| StorageError::Backend(e.to_string()))?
            }
            Target::Postgres(url) => PgStorage::open(url, opts, load, fence, partition).await,
        }
    }

    /// The handle the decider thread commits through.
    pub fn committer(&self) -> Committer {
        match self {
            HubDb::Sqlite(s) => Committer::Sqlite(s.threads()),
            HubDb::Postgres(p) => Committer::Postgres(p.committer()),
        }
    }

    /// Which engine.
    pub fn engine_name(&self) -> &'static str {
        match self {
            HubDb::Sqlite(_) => "sqlite",
            HubDb::Postgres(_) => "postgres",
        }
    }

    /// The hub's tag key.
    pub fn mac_key(&self) -> MacKey {
        both!(self, s => s.mac_key())
    }

    /// The writer this database ran as when opened.
    pub fn hub_writer(&self) -> WriterId {
        both!(self, s => s.hub_writer())
    }

    /// The journal's newest committed sequence.
    pub fn journal_head(&self) -> u64 {
        both!(self, s => s.journal_head())
    }

    /// Every store id and whether it is revoked.
    pub async fn store_rows(&self) -> StorageResult<Vec<(StoreId, bool)>> {
        both!(self, s => s.store_rows().await)
    }

    /// Feed events after `cursor` from storage (for cursors older than the decider keeps).
    pub async fn feed_after(&self, cursor: u64, limit: usize) -> StorageResult<Vec<shelfsync_hub_core::FeedEvent>> {
        both!(self, s => s.feed_after(cursor, limit).await)
    }

    /// Persists a catalog change made without a running hub (the admin CLI).
    pub async fn catalog_commit(&self, c: CatalogCommit) -> StorageResult<()> {
        both!(self, s => s.catalog_commit(c).await)
    }

    /// Registers a store and its first certificate.
    pub async fn add_store(&self, store: StoreId, cert: CertRecord) -> StorageResult<()> {
        both!(self, s => s.add_store(store, cert).await)
    }

    /// How many agents of a store may be connected at once.
    pub async fn set_max_agents(&self, store: StoreId, max: u32) -> StorageResult<()> {
        both!(self, s => s.set_max_agents(store, max).await)
    }

    /// Revokes a store and its certificates; returns their serials.
    pub async fn revoke_store(&self, store: StoreId) -> StorageResult<Vec<String>> {
        both!(self, s => s.revoke_store(store).await)
    }

    /// Revoked certificate serials with their revocation time.
    pub async fn revoked_serials(&self) -> StorageResult<Vec<(String, i64)>> {
        both!(self, s => s.revoked_serials().await)
    }

    /// Whether a connecting certificate is acceptable: known, for that store, not revoked.
    pub async fn check_cert(&self, store: StoreId, serial: String) -> StorageResult<()> {
        both!(self, s => s.check_cert(store, serial).await)
    }

    /// All stores with their writers' watermarks, by id.
    pub async fn stores(&self) -> StorageResult<Vec<StoreInfo>> {
        both!(self, s => s.stores().await)
    }

    /// Stores a new API token (its hash only) and returns its record.
    pub async fn add_token(&self, token: crate::tokens::NewToken) -> StorageResult<crate::tokens::TokenInfo> {
        both!(self, s => s.add_token(token).await)
    }

    /// Whether a channel is configured (its decider record is there and not removed): for the
    /// CLI, which has no decider, before it binds a token to the channel.
    pub async fn channel_exists(&self, id: shelfsync_hub_core::ChannelId) -> StorageResult<bool> {
        both!(self, s => s.channel_exists(id).await)
    }

    /// The token with this hash, whatever its status.
    pub async fn token_by_hash(&self, hash: Vec<u8>) -> StorageResult<Option<crate::tokens::TokenInfo>> {
        both!(self, s => s.token_by_hash(hash).await)
    }

    /// Every token, oldest first.
    pub async fn tokens(&self) -> StorageResult<Vec<crate::tokens::TokenInfo>> {
        both!(self, s => s.tokens().await)
    }

    /// Revokes a token by id; `None` if there is none.
    pub async fn revoke_token(&self, id: Uuid) -> StorageResult<Option<crate::tokens::TokenInfo>> {
        both!(self, s => s.revoke_token(id).await)
    }

    /// Records that a token was used at `at_ms`.
    pub async fn touch_token(&self, id: Uuid, at_ms: i64) -> StorageResult<()> {
        both!(self, s => s.touch_token(id, at_ms).await)
    }

    /// What the hub applied from an agent writer (zero if never seen).
    pub async fn lookup_peer(&self, store: StoreId, writer: WriterId) -> StorageResult<PeerMarks> {
        both!(self, s => s.lookup_peer(store, writer).await)
    }

    /// Records that an agent writer acked hub counter sequences up to `upto`.
    pub async fn set_acked(&self, store: StoreId, peer: WriterId, upto: u64) -> StorageResult<()> {
        both!(self, s => s.set_acked(store, peer, upto).await)
    }

    /// `store`'s journal events above `after` that `peer` did not write.
    pub async fn read_journal(
        &self,
        store: StoreId,
        peer: Option<WriterId>,
        after: u64,
        limit: usize,
    ) -> StorageResult<JournalRead> {
        both!(self, s => s.read_journal(store, peer, after, limit).await)
    }

    /// Records that an agent writer acked hub journal sequences up to `upto`.
    pub async fn set_journal_acked(&self, store: StoreId, peer: WriterId, upto: u64) -> StorageResult<()> {
        both!(self, s => s.set_journal_acked(store, peer, upto).await)
    }

    /// Loads a replicated document.
    pub async fn load_doc(&self, name: String) -> StorageResult<TrackedDoc> {
        both!(self, s => s.load_doc(name).await)
    }

    /// The persisted automerge sync state of (`doc`, `peer`).
    pub async fn sync_state(&self, doc: String, peer: String) -> StorageResult<automerge::sync::State> {
        both!(self, s => s.sync_state(doc, peer).await)
    }

    /// Chunks of a document after `after` (to pick up edits made by another process).
    pub async fn doc_chunks_after(&self, doc: String, after: i64) -> StorageResult<Vec<(i64, Vec<u8>)>> {
        both!(self, s => s.doc_chunks_after(doc, after).await)
    }

    /// Chunks of every store's overrides document after `after` (to pick up what stores
    /// connected to another process changed): (sequence, document, bytes).
    pub async fn override_chunks_after(&self, after: i64) -> StorageResult<Vec<(i64, String, Vec<u8>)>> {
        both!(self, s => s.override_chunks_after(after).await)
    }

    /// The newest chunk sequence of any document.
    pub async fn newest_chunk(&self) -> StorageResult<i64> {
        both!(self, s => s.newest_chunk().await)
    }

    /// One catalog entry (materialised).
    pub async fn catalog_item(&self, sku: Sku) -> StorageResult<Option<CatalogView>> {
        both!(self, s => s.catalog_item(sku).await)
    }

    /// A page of catalog entries in SKU order.
    pub async fn catalog_page(&self, after: Option<Sku>, limit: usize) -> StorageResult<Vec<CatalogView>> {
        both!(self, s => s.catalog_page(after, limit).await)
    }

    /// A page of the catalog entries whose SKU or name contains `q`.
    pub async fn catalog_search(&self, q: String, after: Option<Sku>, limit: usize) -> StorageResult<Vec<CatalogView>> {
        both!(self, s => s.catalog_search(q, after, limit).await)
    }

    /// A webhook's delivery cursor.
    pub async fn webhook_cursor(&self, url: String) -> StorageResult<Option<u64>> {
        both!(self, s => s.webhook_cursor(url).await)
    }

    /// Records a webhook's delivery cursor (never backwards).
    pub async fn set_webhook_cursor(&self, url: String, cursor: u64) -> StorageResult<()> {
        both!(self, s => s.set_webhook_cursor(url, cursor).await)
    }

    /// A store's adjustment events for the shrink report.
    pub async fn adjustments(&self, f: AdjustmentFilter) -> StorageResult<AdjustmentReport> {
        both!(self, s => s.adjustments(f).await)
    }

    /// Bytes the database takes on disk (SQLite: the file and its write-ahead log).
    pub async fn size_bytes(&self) -> StorageResult<u64> {
        both!(self, s => s.size_bytes().await)
    }

    /// Journal events held (of one store, or all).
    pub async fn journal_count(&self, store: Option<StoreId>) -> StorageResult<u64> {
        both!(self, s => s.journal_count(store).await)
    }

    /// Online backup of the database alone.
    pub async fn backup(&self, to: PathBuf) -> StorageResult<()> {
        self.backup_with(to, Vec::new(), String::new(), None).await
    }

    /// Online backup to a new file holding the database and `files` (SQLite only: a
    /// PostgreSQL-backed hub is backed up by the database's own tools).
    pub async fn backup_with(
        &self,
        to: PathBuf,
        files: Vec<shelfsync_node::backup::BackupFile>,
        source_dir: String,
        config_path: Option<String>,
    ) -> StorageResult<()> {
        match self {
            HubDb::Sqlite(s) => s.backup_with(to, files, source_dir, config_path).await,
            HubDb::Postgres(_) => Err(StorageError::Invalid(
                "this hub keeps its data in PostgreSQL: back it up with PostgreSQL's own tools (pg_dump, or base \
                 backups with WAL archiving); `shelfsync-hub backup` copies the embedded SQLite database only"
                    .into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_and_passwords_never_logged() {
        let dir = Path::new("/d");
        assert_eq!(Target::new(dir, None).unwrap(), Target::Sqlite(PathBuf::from("/d/hub.db")));
        assert_eq!(Target::new(dir, Some("  ")).unwrap(), Target::Sqlite(PathBuf::from("/d/hub.db")));
        let t = Target::new(dir, Some("postgres://hub:s3cret@db:5432/shelfsync")).unwrap();
        assert_eq!(t.describe(), "postgres postgres://hub:***@db:5432/shelfsync");
        let e = Target::new(dir, Some("mysql://hub:s3cret@db/x")).unwrap_err().to_string();
        assert!(e.contains("not a PostgreSQL URL") && !e.contains("s3cret"), "{e}");
    }
}
