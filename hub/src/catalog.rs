//! The hub's side of the catalog: the authoritative catalog document (edited by the admin API,
//! CSV imports and the CLI), each store's overrides replica, and the automerge sync towards the
//! stores. The documents belong to one actor thread ([`HubCatalog`] is its handle), so automerge
//! work never runs on an async worker; changes persist in the order they were made.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use shelfsync_node::catalog::{self as cat, CatalogError, CatalogItem, CatalogPatch, TrackedDoc, CATALOG_DOC};
use shelfsync_shared::wire::CatalogDoc;
use shelfsync_shared::{Sku, StoreId, WriterId};
use tokio::sync::Mutex;

use crate::storage::{CatalogCommit, StorageError, StorageResult};

/// Where the catalog documents persist: the running hub's engine (the decider takes the new
/// rules in the same batch) or, for the admin CLI, the database alone.
pub trait CatalogStore: Sync {
    /// Loads a replicated document.
    fn load_doc(&self, name: String) -> impl std::future::Future<Output = StorageResult<TrackedDoc>> + Send;
    /// Chunks of a document after `after`.
    fn doc_chunks_after(
        &self,
        doc: String,
        after: i64,
    ) -> impl std::future::Future<Output = StorageResult<Vec<(i64, Vec<u8>)>>> + Send;
    /// The persisted automerge sync state of (`doc`, `peer`).
    fn sync_state(
        &self,
        doc: String,
        peer: String,
    ) -> impl std::future::Future<Output = StorageResult<automerge::sync::State>> + Send;
    /// Persists a catalog change; returns the stores whose holds changed (a running hub's decider
    /// gave escrow rights back under the new rules: their agents are told).
    fn catalog_commit(&self, c: CatalogCommit)
        -> impl std::future::Future<Output = StorageResult<Vec<StoreId>>> + Send;
    /// The database under it.
    fn hub_db(&self) -> &crate::db::HubDb;
}

impl CatalogStore for crate::db::HubDb {
    fn load_doc(&self, name: String) -> impl std::future::Future<Output = StorageResult<TrackedDoc>> + Send {
        crate::db::HubDb::load_doc(self, name)
    }
    fn doc_chunks_after(
        &self,
        doc: String,
        after: i64,
    ) -> impl std::future::Future<Output = StorageResult<Vec<(i64, Vec<u8>)>>> + Send {
        crate::db::HubDb::doc_chunks_after(self, doc, after)
    }
    fn sync_state(
        &self,
        doc: String,
        peer: String,
    ) -> impl std::future::Future<Output = StorageResult<automerge::sync::State>> + Send {
        crate::db::HubDb::sync_state(self, doc, peer)
    }
    async fn catalog_commit(&self, c: CatalogCommit) -> StorageResult<Vec<StoreId>> {
        // The database alone (the admin CLI): the running hub's decider picks the change up.
        crate::db::HubDb::catalog_commit(self, c).await.map(|()| Vec::new())
    }
    fn hub_db(&self) -> &crate::db::HubDb {
        self
    }
}

impl CatalogStore for crate::engine::Engine {
    fn load_doc(&self, name: String) -> impl std::future::Future<Output = StorageResult<TrackedDoc>> + Send {
        self.db().load_doc(name)
    }
    fn doc_chunks_after(
        &self,
        doc: String,
        after: i64,
    ) -> impl std::future::Future<Output = StorageResult<Vec<(i64, Vec<u8>)>>> + Send {
        self.db().doc_chunks_after(doc, after)
    }
    fn sync_state(
        &self,
        doc: String,
        peer: String,
    ) -> impl std::future::Future<Output = StorageResult<automerge::sync::State>> + Send {
        self.db().sync_state(doc, peer)
    }
    fn catalog_commit(
        &self,
        c: CatalogCommit,
    ) -> impl std::future::Future<Output = StorageResult<Vec<StoreId>>> + Send {
        crate::engine::Engine::catalog_commit(self, c)
    }
    fn hub_db(&self) -> &crate::db::HubDb {
        self.db()
    }
}

/// Most rows in one CSV import.
pub const IMPORT_ROWS_MAX: usize = 200_000;

/// The documents, owned by the catalog's actor thread: every automerge operation (edits,
/// merges of chunks and of stores' sync messages, message generation) runs there, never on an
/// async worker.
struct Docs {
    catalog: TrackedDoc,
    overrides: HashMap<StoreId, TrackedDoc>,
}

type DocsJob = Box<dyn FnOnce(&mut Docs) + Send>;

/// The catalog at the hub: a handle to the actor thread that owns the documents.
pub struct HubCatalog {
    jobs: std::sync::mpsc::Sender<DocsJob>,
    /// Serialises the changes that persist (edits, picked-up chunks, received messages), so
    /// chunks persist in the order the documents made them.
    persist: Mutex<()>,
    /// The newest catalog chunk this process has loaded.
    seen: AtomicI64,
    /// The newest chunk of any store's overrides this process has looked at.
    overrides_seen: AtomicI64,
}

/// What [`HubCatalog::refresh`] picked up.
#[derive(Debug, Default)]
pub struct Refreshed {
    /// The catalog changed (the stores are told).
    pub catalog_changed: bool,
    /// Stores whose holds changed (the decider gave escrow rights back under new rules).
    pub holds: Vec<StoreId>,
}

/// One edit of a catalog entry.
#[derive(Clone, Debug)]
pub enum Edit {
    /// Replace the whole entry.
    Put(CatalogItem),
    /// Change some fields.
    Patch(CatalogPatch),
}

impl HubCatalog {
    /// Loads the catalog document and starts the actor thread that owns it (it stops when the
    /// handle is dropped).
    pub async fn load(storage: &impl CatalogStore) -> StorageResult<Arc<HubCatalog>> {
        // Overrides documents load when a store connects, or when they change (`refresh`).
        let overrides_seen = storage.hub_db().newest_chunk().await?;
        Self::load_after(storage, overrides_seen).await
    }

    /// [`HubCatalog::load`] for a partition's decider taking over: its first [`refresh`] loads
    /// every store's overrides document whole and hands the decider all their rows. Its state
    /// came from the records its partition's deciders wrote, and a store's override merged by
    /// another hub while none of them followed the documents (between a hand-over and this
    /// load) is in no record: only the documents are sure to have it. Handing the decider rows
    /// it has already changes nothing.
    ///
    /// [`refresh`]: HubCatalog::refresh
    pub async fn load_for_takeover(storage: &impl CatalogStore) -> StorageResult<Arc<HubCatalog>> {
        Self::load_after(storage, 0).await
    }

    async fn load_after(storage: &impl CatalogStore, overrides_seen: i64) -> StorageResult<Arc<HubCatalog>> {
        let doc = storage.load_doc(CATALOG_DOC.into()).await?;
        let seen = storage.doc_chunks_after(CATALOG_DOC.into(), 0).await?.last().map_or(0, |c| c.0);
        let (jobs, rx) = std::sync::mpsc::channel::<DocsJob>();
        let mut docs = Docs { catalog: doc, overrides: HashMap::new() };
        std::thread::Builder::new()
            .name("hub-catalog".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job(&mut docs);
                }
            })
            .map_err(|e| StorageError::Backend(format!("spawning the catalog thread: {e}")))?;
        Ok(Arc::new(HubCatalog {
            jobs,
            persist: Mutex::new(()),
            seen: AtomicI64::new(seen),
            overrides_seen: AtomicI64::new(overrides_seen),
        }))
    }

    /// Runs `f` on the documents (on the actor thread).
    async fn with_docs<R: Send + 'static>(&self, f: impl FnOnce(&mut Docs) -> R + Send + 'static) -> R {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: DocsJob = Box::new(move |docs| {
            let _ = tx.send(f(docs));
        });
        self.jobs.send(job).expect("the catalog thread runs while the hub does");
        rx.await.expect("the catalog thread answers every job")
    }

    /// Applies edits (all or none: any invalid entry refuses the whole batch) and persists them.
    /// Returns the entries after the edits and the stores whose holds changed.
    pub async fn edit(
        &self,
        storage: &impl CatalogStore,
        edits: Vec<(Sku, Edit)>,
    ) -> StorageResult<(Vec<(Sku, CatalogItem)>, Vec<StoreId>)> {
        let _order = self.persist.lock().await;
        let (planned, commit) = self
            .with_docs(move |docs| -> StorageResult<_> {
                let doc = &mut docs.catalog;
                // Validate everything against the current document before touching it.
                let mut planned = Vec::with_capacity(edits.len());
                for (i, (sku, e)) in edits.iter().enumerate() {
                    let item = match e {
                        Edit::Put(item) => {
                            item.validate().map_err(|err| StorageError::Invalid(prefix(edits.len(), i, sku, err)))?;
                            item.clone()
                        }
                        Edit::Patch(p) => p
                            .apply_to(cat::read_item(&doc.doc, sku.as_str()))
                            .map_err(|err| StorageError::Invalid(prefix(edits.len(), i, sku, err)))?,
                    };
                    planned.push((sku.clone(), item));
                }
                for (sku, item) in &planned {
                    cat::write_item(&mut doc.doc, sku.as_str(), item)?;
                }
                let write = doc.take_write();
                let skus: BTreeSet<String> = planned.iter().map(|(s, _)| s.to_string()).collect();
                let items = cat::item_rows(&doc.doc, &skus);
                Ok((planned, CatalogCommit { write, items, ..Default::default() }))
            })
            .await?;
        // `seen` is left to `refresh`: another process may have appended a chunk just before ours,
        // and re-reading our own chunk there is a no-op merge.
        let holds = storage.catalog_commit(commit).await?;
        Ok((planned, holds))
    }

    /// Picks up what other processes changed: catalog chunks (the `catalog import` CLI, another
    /// hub's API) and stores' overrides (merged by the hub their agent is connected to, on a
    /// database several hubs share), so this process's decider applies them too.
    pub async fn refresh(&self, storage: &impl CatalogStore) -> StorageResult<Refreshed> {
        let catalog = self.refresh_catalog(storage).await?;
        let overrides = self.refresh_overrides(storage).await?;
        let catalog_changed = catalog.is_some();
        // A store named twice is woken twice: harmless.
        let holds = catalog.into_iter().flatten().chain(overrides).collect();
        Ok(Refreshed { catalog_changed, holds })
    }

    /// Stores' overrides chunks appended since the last look: merged into the documents this
    /// process holds (a document it does not hold yet is loaded whole, and all its rows count as
    /// changed), their rows and the decider's overrides updated. Returns the stores whose holds
    /// changed.
    async fn refresh_overrides(&self, storage: &impl CatalogStore) -> StorageResult<Vec<StoreId>> {
        let after = self.overrides_seen.load(Ordering::SeqCst);
        let chunks = storage.hub_db().override_chunks_after(after).await?;
        let Some(last) = chunks.last().map(|c| c.0) else { return Ok(Vec::new()) };
        let mut by_store: std::collections::BTreeMap<StoreId, Vec<Vec<u8>>> = Default::default();
        for (_, doc, bytes) in chunks {
            match cat::overrides_store(&doc) {
                Some(store) => by_store.entry(store).or_default().push(bytes),
                None => tracing::warn!(doc, "a document named like overrides of no valid store id; skipped"),
            }
        }
        let _order = self.persist.lock().await;
        let mut holds = Vec::new();
        for (store, chunks) in by_store {
            let s = store.clone();
            let held = self.with_docs(move |docs| docs.overrides.contains_key(&s)).await;
            // Loaded whole (it holds these chunks already), or merged into the one held here.
            let whole = if held { None } else { Some(storage.load_doc(cat::overrides_doc(&store)).await?) };
            let s = store.clone();
            let rows = self
                .with_docs(move |docs| -> StorageResult<_> {
                    let d = match (docs.overrides.entry(s), whole) {
                        (std::collections::hash_map::Entry::Vacant(v), Some(d)) => {
                            let rows = cat::override_rows(&d.doc, &cat::override_skus(&d.doc));
                            v.insert(d);
                            return Ok(rows);
                        }
                        // A store's session loaded it meanwhile: merge into that one.
                        (std::collections::hash_map::Entry::Occupied(o), _) => o.into_mut(),
                        (std::collections::hash_map::Entry::Vacant(_), None) => {
                            unreachable!("documents are never dropped")
                        }
                    };
                    let before = d.doc.get_heads();
                    for bytes in &chunks {
                        d.doc.load_incremental(bytes).map_err(CatalogError::from)?;
                    }
                    // Already persisted: mark as saved.
                    let _ = d.doc.save_incremental();
                    let after_heads = d.doc.get_heads();
                    if before == after_heads {
                        return Ok(Vec::new());
                    }
                    let skus = cat::changed_skus(&mut d.doc, &before, &after_heads, 0);
                    Ok(cat::override_rows(&d.doc, &skus))
                })
                .await?;
            if !rows.is_empty() {
                let commit = CatalogCommit { overrides: Some((store.clone(), rows)), ..Default::default() };
                holds.extend(storage.catalog_commit(commit).await?);
            }
        }
        self.overrides_seen.fetch_max(last, Ordering::SeqCst);
        Ok(holds)
    }

    /// Catalog chunks appended since the last look. Returns the stores whose holds changed if
    /// the catalog changed.
    async fn refresh_catalog(&self, storage: &impl CatalogStore) -> StorageResult<Option<Vec<StoreId>>> {
        let after = self.seen.load(Ordering::SeqCst);
        let chunks = storage.doc_chunks_after(CATALOG_DOC.into(), after).await?;
        let Some(last) = chunks.last().map(|c| c.0) else { return Ok(None) };
        let _order = self.persist.lock().await;
        let commit = self
            .with_docs(move |docs| -> StorageResult<_> {
                let doc = &mut docs.catalog;
                let before = doc.doc.get_heads();
                for (_, bytes) in &chunks {
                    doc.doc.load_incremental(bytes).map_err(CatalogError::from)?;
                }
                // Already persisted: mark as saved.
                let _ = doc.doc.save_incremental();
                let after_heads = doc.doc.get_heads();
                if before == after_heads {
                    return Ok(None);
                }
                let skus = cat::changed_skus(&mut doc.doc, &before, &after_heads, 1);
                Ok(Some(CatalogCommit { items: cat::item_rows(&doc.doc, &skus), ..Default::default() }))
            })
            .await?;
        self.seen.fetch_max(last, Ordering::SeqCst);
        match commit {
            None => Ok(None),
            Some(c) => Ok(Some(storage.catalog_commit(c).await?)),
        }
    }

    /// A store connected: its persisted sync states and the first messages.
    ///
    /// Sync states are kept per agent writer: a store may run several agents (or, after a
    /// retirement, a new writer on the same files), and each holds its own copy of the documents.
    pub async fn connected(
        &self,
        storage: &impl CatalogStore,
        store: &StoreId,
        peer: &WriterId,
    ) -> StorageResult<PeerSync> {
        let catalog_state = storage.sync_state(CATALOG_DOC.into(), peer.to_string()).await?;
        let overrides_state = storage.sync_state(cat::overrides_doc(store), peer.to_string()).await?;
        let s = store.clone();
        if !self.with_docs(move |docs| docs.overrides.contains_key(&s)).await {
            let d = storage.load_doc(cat::overrides_doc(store)).await?;
            let s = store.clone();
            self.with_docs(move |docs| {
                docs.overrides.entry(s).or_insert(d);
            })
            .await;
        }
        Ok(PeerSync { store: store.clone(), peer: peer.to_string(), catalog_state, overrides_state })
    }

    /// The catalog changed: the next message for this peer.
    pub async fn catalog_message(&self, peer: &mut PeerSync) -> Option<Vec<u8>> {
        let mut state = std::mem::take(&mut peer.catalog_state);
        let (m, state) = self
            .with_docs(move |docs| {
                let m = cat::generate(&mut docs.catalog.doc, &mut state);
                (m, state)
            })
            .await;
        peer.catalog_state = state;
        m
    }

    /// First messages for a new connection (both documents).
    pub async fn first_messages(&self, peer: &mut PeerSync) -> Vec<(CatalogDoc, Vec<u8>)> {
        let mut out = Vec::new();
        if let Some(m) = self.catalog_message(peer).await {
            out.push((CatalogDoc::Catalog, m));
        }
        let (store, mut state) = (peer.store.clone(), std::mem::take(&mut peer.overrides_state));
        let (m, state) = self
            .with_docs(move |docs| {
                let m = docs.overrides.get_mut(&store).and_then(|d| cat::generate(&mut d.doc, &mut state));
                (m, state)
            })
            .await;
        peer.overrides_state = state;
        if let Some(m) = m {
            out.push((CatalogDoc::Overrides, m));
        }
        out
    }

    /// A sync message from a store. The catalog is read-only for stores (a message carrying
    /// changes is refused); the store's overrides merge here and take effect in availability.
    /// Returns the reply and the stores whose holds changed.
    pub async fn message(
        &self,
        storage: &impl CatalogStore,
        peer: &mut PeerSync,
        doc: CatalogDoc,
        bytes: &[u8],
    ) -> Result<(Option<Vec<u8>>, Vec<StoreId>), CatalogError> {
        let store = peer.store.clone();
        let who = peer.peer.clone();
        let bytes = bytes.to_vec();
        let _order = self.persist.lock().await;
        let (reply, commit) = match doc {
            CatalogDoc::Catalog => {
                let mut state = std::mem::take(&mut peer.catalog_state);
                let (r, state) = self
                    .with_docs(move |docs| {
                        let r = cat::receive(&mut docs.catalog.doc, &mut state, &bytes, 1, false)
                            .map(|_| cat::generate(&mut docs.catalog.doc, &mut state));
                        (r, state)
                    })
                    .await;
                let states = vec![(CATALOG_DOC.to_string(), who, state.encode())];
                peer.catalog_state = state;
                (r?, CatalogCommit { sync_states: states, ..Default::default() })
            }
            CatalogDoc::Overrides => {
                let mut state = std::mem::take(&mut peer.overrides_state);
                let s = store.clone();
                let (r, state) = self
                    .with_docs(move |docs| {
                        let d = docs
                            .overrides
                            .entry(s.clone())
                            .or_insert_with(|| TrackedDoc::empty(&cat::overrides_doc(&s)));
                        let r = cat::receive(&mut d.doc, &mut state, &bytes, 0, true).map(|changed| {
                            let write = d.take_write();
                            let rows = cat::override_rows(&d.doc, &changed);
                            (cat::generate(&mut d.doc, &mut state), write, rows)
                        });
                        (r, state)
                    })
                    .await;
                let states = vec![(cat::overrides_doc(&store), who, state.encode())];
                peer.overrides_state = state;
                let (reply, write, rows) = r?;
                let overrides = (!rows.is_empty()).then(|| (store.clone(), rows));
                (reply, CatalogCommit { write, overrides, sync_states: states, ..Default::default() })
            }
        };
        let holds = storage.catalog_commit(commit).await.map_err(storage_to_catalog)?;
        Ok((reply, holds))
    }

    /// Approximate memory held by the catalog document (its saved size is a lower bound; used by
    /// the benchmark next to the process's resident set).
    pub async fn saved_len(&self) -> usize {
        self.with_docs(|docs| docs.catalog.doc.save().len()).await
    }
}

fn storage_to_catalog(e: StorageError) -> CatalogError {
    CatalogError::Db(shelfsync_node::db::DbError::Sqlite(e.to_string()))
}

fn prefix(n: usize, i: usize, sku: &Sku, err: CatalogError) -> String {
    if n == 1 {
        err.to_string()
    } else {
        format!("entry {} ({sku}): {err}", i + 1)
    }
}

/// A store's sync states for the catalog stream.
pub struct PeerSync {
    store: StoreId,
    /// The agent writer the sync states belong to.
    peer: String,
    catalog_state: automerge::sync::State,
    overrides_state: automerge::sync::State,
}

/// A CSV problem, naming the row (1 = header) and column.
#[derive(Debug, thiserror::Error)]
#[error("row {row}, column {column}: {message}")]
pub struct CsvError {
    /// 1-based line of the file (the header is row 1).
    pub row: usize,
    /// Column name (or number when there is none).
    pub column: String,
    /// What is wrong.
    pub message: String,
}

const COLUMNS: [&str; 10] = [
    "sku",
    "name",
    "barcodes",
    "safety_stock",
    "low_stock_threshold",
    "max_per_customer",
    "active",
    "escrow_share_pct",
    "escrow_max",
    "escrow_keep",
];

/// Parses a catalog CSV: a header naming columns from `sku,name,barcodes,safety_stock,
/// low_stock_threshold,max_per_customer,active,escrow_share_pct,escrow_max,escrow_keep` (`sku`
/// and `name` required, the rest optional), barcodes separated by `|`, `active` as
/// true/false/yes/no/1/0, an empty escrow value as the chain's. Every row is checked before
/// anything is applied.
pub fn parse_csv(text: &str) -> Result<Vec<(Sku, CatalogItem)>, CsvError> {
    let mut reader = csv::ReaderBuilder::new().has_headers(true).trim(csv::Trim::All).from_reader(text.as_bytes());
    let headers =
        reader.headers().map_err(|e| CsvError { row: 1, column: "-".into(), message: e.to_string() })?.clone();
    let mut index = HashMap::new();
    for (i, h) in headers.iter().enumerate() {
        if !COLUMNS.contains(&h) {
            return Err(CsvError {
                row: 1,
                column: h.to_owned(),
                message: format!("unknown column; expected some of {}", COLUMNS.join(", ")),
            });
        }
        if index.insert(h.to_owned(), i).is_some() {
            return Err(CsvError { row: 1, column: h.to_owned(), message: "column appears twice".into() });
        }
    }
    for required in ["sku", "name"] {
        if !index.contains_key(required) {
            return Err(CsvError { row: 1, column: required.into(), message: "required column is missing".into() });
        }
    }
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (n, rec) in reader.records().enumerate() {
        let row = n + 2;
        let rec = rec.map_err(|e| CsvError { row, column: "-".into(), message: e.to_string() })?;
        if out.len() >= IMPORT_ROWS_MAX {
            return Err(CsvError { row, column: "-".into(), message: format!("more than {IMPORT_ROWS_MAX} rows") });
        }
        let field = |c: &str| index.get(c).and_then(|i| rec.get(*i)).unwrap_or("");
        let err = |c: &str, m: String| CsvError { row, column: c.into(), message: m };
        let sku: Sku = field("sku").parse().map_err(|e| err("sku", format!("{e}")))?;
        if !seen.insert(sku.clone()) {
            return Err(err("sku", format!("{sku} appears more than once")));
        }
        let opt = |c: &str| -> Result<Option<u64>, CsvError> {
            let v = field(c);
            if v.is_empty() {
                return Ok(None);
            }
            let n = v.parse::<u64>();
            n.map(Some).map_err(|_| err(c, format!("{} is not a whole number", shelfsync_shared::id::quote(v))))
        };
        let num = |c: &str| opt(c).map(Option::unwrap_or_default);
        let active = match field("active").to_ascii_lowercase().as_str() {
            "" | "true" | "yes" | "1" => true,
            "false" | "no" | "0" => false,
            other => return Err(err("active", format!("{} is not true/false", shelfsync_shared::id::quote(other)))),
        };
        let barcodes: Vec<String> =
            field("barcodes").split('|').map(str::trim).filter(|b| !b.is_empty()).map(str::to_owned).collect();
        let item = CatalogItem {
            name: field("name").to_owned(),
            barcodes,
            safety_stock: num("safety_stock")?,
            low_stock_threshold: num("low_stock_threshold")?,
            max_per_customer: num("max_per_customer")?,
            active,
            escrow: cat::escrow_rule([opt("escrow_share_pct")?, opt("escrow_max")?, opt("escrow_keep")?]),
        };
        if let Err(e) = item.validate() {
            // Name the column the rule is about (`escrow.keep` is the column `escrow_keep`).
            let msg = e.to_string().replacen("escrow.", "escrow_", 1);
            let column = COLUMNS.iter().find(|c| msg.starts_with(*c)).copied().unwrap_or("-");
            return Err(err(column, msg));
        }
        out.push((sku, item));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_parses_and_names_row_and_column() {
        let ok = "sku,name,barcodes,safety_stock,active\nA-1,Apple,400|401,2,yes\nB-2,Banana,,0,false\n";
        let rows = parse_csv(ok).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].1.barcodes, vec!["400", "401"]);
        assert!(!rows[1].1.active);
        let e = parse_csv("sku,name,safety_stock\nA,Apple,x\n").unwrap_err();
        assert_eq!((e.row, e.column.as_str()), (2, "safety_stock"));
        let rows = parse_csv("sku,name,escrow_share_pct,escrow_keep\nA,Apple,40,\nB,Banana,,2\n").unwrap();
        assert_eq!(rows[0].1.escrow, shelfsync_shared::EscrowRule { share_pct: Some(40), max: None, keep: None });
        assert_eq!(rows[1].1.escrow, shelfsync_shared::EscrowRule { share_pct: None, max: None, keep: Some(2) });
        let e = parse_csv("sku,name,escrow_share_pct\nA,Apple,150\n").unwrap_err();
        assert_eq!((e.row, e.column.as_str()), (2, "escrow_share_pct"), "{e}");
        let e = parse_csv("sku,name\nA,Apple\nbad/sku,B\n").unwrap_err();
        assert_eq!((e.row, e.column.as_str()), (3, "sku"));
        let e = parse_csv("sku,name,colour\n").unwrap_err();
        assert_eq!((e.row, e.column.as_str()), (1, "colour"));
        let e = parse_csv("sku\nA\n").unwrap_err();
        assert_eq!(e.column, "name");
        let e = parse_csv("sku,name\nA,\n").unwrap_err();
        assert_eq!((e.row, e.column.as_str()), (2, "name"));
        let e = parse_csv("sku,name\nA,x\nA,y\n").unwrap_err();
        assert!(e.to_string().contains("row 3, column sku"), "{e}");
    }
}
