//! The product catalog as automerge documents, shared by the agent and the hub.
//!
//! - `catalog`: owned by the hub, replicated to every store. `ROOT.skus[sku]` is a map
//!   `{name, barcodes[], safety_stock, low_stock_threshold, max_per_customer, active,
//!   escrow_share_pct?, escrow_max?, escrow_keep?}`.
//! - `overrides/<store>`: owned by one store, replicated to the hub. `ROOT[sku]` is a map
//!   `{safety_stock?, low_stock_threshold?, escrow_share_pct?, escrow_max?, escrow_keep?}`. Each
//!   store writes only its own document, so the security boundary is the document, and a
//!   store's edits merge with head office's by construction: the hub's value and the store's
//!   override both survive, the override wins.
//!
//! Documents persist as automerge chunks (a full save plus incremental saves) in SQLite, with
//! each peer's `sync::State`, and are *materialised* into plain tables (`catalog_items`,
//! `catalog_overrides`) in the same transaction, so SQL (stock answers, availability, limits)
//! reads the catalog without touching automerge.

use std::collections::BTreeSet;

use automerge::transaction::Transactable;
use automerge::{AutoCommit, ChangeHash, ObjType, PatchAction, Prop, ReadDoc, ScalarValue, Value, ROOT};
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use shelfsync_shared::{EscrowRule, Sku, StoreId};

use crate::db::DbError;

/// Name of the hub-owned catalog document.
pub const CATALOG_DOC: &str = "catalog";
/// Most bytes in a product name.
pub const NAME_MAX_LEN: usize = 200;
/// Most barcodes per SKU.
pub const BARCODES_MAX: usize = 16;
/// Most bytes in a barcode.
pub const BARCODE_MAX_LEN: usize = 64;
/// Largest safety stock, threshold or per-customer limit.
pub const QTY_FIELD_MAX: u64 = 1_000_000;
/// Incremental chunks kept before a document is compacted into one full save.
const CHUNKS_BEFORE_COMPACTION: i64 = 256;

/// Schema (agent migration 3, hub migration 3).
pub const MIGRATION: &str = "
    CREATE TABLE doc_chunks (seq INTEGER PRIMARY KEY AUTOINCREMENT, doc TEXT NOT NULL, bytes BLOB NOT NULL);
    CREATE INDEX doc_chunks_doc ON doc_chunks(doc, seq);
    CREATE TABLE doc_sync (doc TEXT NOT NULL, peer TEXT NOT NULL, state BLOB NOT NULL, PRIMARY KEY (doc, peer)) WITHOUT ROWID;
    CREATE TABLE catalog_items (
        sku TEXT PRIMARY KEY, name TEXT NOT NULL, barcodes TEXT NOT NULL, safety_stock INTEGER NOT NULL,
        low_stock_threshold INTEGER NOT NULL, max_per_customer INTEGER NOT NULL, active INTEGER NOT NULL) WITHOUT ROWID;
    CREATE TABLE catalog_overrides (
        store TEXT NOT NULL, sku TEXT NOT NULL, safety_stock INTEGER, low_stock_threshold INTEGER,
        PRIMARY KEY (store, sku)) WITHOUT ROWID;";

/// Schema (agent migration 8, hub migration 9): the escrow rule of a SKU and of a store's
/// override (`NULL`: the level below applies).
pub const ESCROW_MIGRATION: &str = "
    ALTER TABLE catalog_items ADD COLUMN escrow_share_pct INTEGER;
    ALTER TABLE catalog_items ADD COLUMN escrow_max INTEGER;
    ALTER TABLE catalog_items ADD COLUMN escrow_keep INTEGER;
    ALTER TABLE catalog_overrides ADD COLUMN escrow_share_pct INTEGER;
    ALTER TABLE catalog_overrides ADD COLUMN escrow_max INTEGER;
    ALTER TABLE catalog_overrides ADD COLUMN escrow_keep INTEGER;";

/// The document keys (and SQL columns) of an [`EscrowRule`]'s fields, in order.
pub const ESCROW_KEYS: [&str; 3] = ["escrow_share_pct", "escrow_max", "escrow_keep"];

/// The same as one SQL column list (for queries written elsewhere: the hub's loaders).
pub const ESCROW_COLUMNS: &str = "escrow_share_pct, escrow_max, escrow_keep";

/// An escrow rule's fields, in [`ESCROW_KEYS`] order.
pub fn escrow_fields(r: &EscrowRule) -> [Option<u64>; 3] {
    [r.share_pct, r.max, r.keep]
}

/// An escrow rule from its fields, in [`ESCROW_KEYS`] order.
pub fn escrow_rule([share_pct, max, keep]: [Option<u64>; 3]) -> EscrowRule {
    EscrowRule { share_pct, max, keep }
}

/// What every store's overrides document is named after.
pub const OVERRIDES_PREFIX: &str = "overrides/";

/// The overrides document of a store.
pub fn overrides_doc(store: &StoreId) -> String {
    format!("{OVERRIDES_PREFIX}{store}")
}

/// The store an overrides document belongs to (`None`: not an overrides document).
pub fn overrides_store(doc: &str) -> Option<StoreId> {
    doc.strip_prefix(OVERRIDES_PREFIX)?.parse().ok()
}

/// Catalog failures.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// A field breaks a rule; the message names it.
    #[error("{0}")]
    Invalid(String),
    /// Automerge refused.
    #[error("catalog document: {0}")]
    Doc(#[from] automerge::AutomergeError),
    /// The peer tried to change what it may only read.
    #[error("{0}")]
    Forbidden(String),
    /// Storage.
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<rusqlite::Error> for CatalogError {
    fn from(e: rusqlite::Error) -> Self {
        CatalogError::Db(e.into())
    }
}

/// One catalog entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogItem {
    /// Display name.
    pub name: String,
    /// Scannable codes.
    pub barcodes: Vec<String>,
    /// Units never offered online (per store unless overridden).
    pub safety_stock: u64,
    /// At or below this many available units a `low_stock` event fires (0: never).
    pub low_stock_threshold: u64,
    /// Most units one customer may reserve (0: no limit).
    pub max_per_customer: u64,
    /// Whether it is sold at all.
    pub active: bool,
    /// How much of a store's stock online gets the rights to (over the chain's `[escrow]`).
    #[serde(default, skip_serializing_if = "EscrowRule::is_empty")]
    pub escrow: EscrowRule,
}

impl CatalogItem {
    /// Checks every field; the message names the field.
    pub fn validate(&self) -> Result<(), CatalogError> {
        let bad = |m: String| Err(CatalogError::Invalid(m));
        if self.name.trim().is_empty() {
            return bad("name must not be empty".into());
        }
        if self.name.len() > NAME_MAX_LEN {
            return bad(format!("name is {} bytes long; the limit is {NAME_MAX_LEN}", self.name.len()));
        }
        if self.barcodes.len() > BARCODES_MAX {
            return bad(format!("barcodes has {} entries; the limit is {BARCODES_MAX}", self.barcodes.len()));
        }
        for (i, b) in self.barcodes.iter().enumerate() {
            if b.is_empty() || b.len() > BARCODE_MAX_LEN || !b.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
                return bad(format!(
                    "barcodes[{i}] must be 1 to {BARCODE_MAX_LEN} of A-Z a-z 0-9 -, got {}",
                    shelfsync_shared::id::quote(b)
                ));
            }
        }
        for (field, v) in [
            ("safety_stock", self.safety_stock),
            ("low_stock_threshold", self.low_stock_threshold),
            ("max_per_customer", self.max_per_customer),
        ] {
            if v > QTY_FIELD_MAX {
                return bad(format!("{field} must be at most {QTY_FIELD_MAX}, got {v}"));
            }
        }
        self.escrow.validate().map_err(CatalogError::Invalid)
    }
}

/// A partial update of a catalog entry (absent fields stay).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogPatch {
    /// New name.
    pub name: Option<String>,
    /// New barcodes.
    pub barcodes: Option<Vec<String>>,
    /// New safety stock.
    pub safety_stock: Option<u64>,
    /// New threshold.
    pub low_stock_threshold: Option<u64>,
    /// New limit.
    pub max_per_customer: Option<u64>,
    /// New active flag.
    pub active: Option<bool>,
    /// New escrow rule (replaces the whole rule; `{}` clears it).
    pub escrow: Option<EscrowRule>,
}

impl CatalogPatch {
    /// The entry after the patch (a new SKU needs at least a name).
    pub fn apply_to(&self, base: Option<CatalogItem>) -> Result<CatalogItem, CatalogError> {
        let mut item = match base {
            Some(b) => b,
            None => CatalogItem {
                name: self.name.clone().ok_or_else(|| CatalogError::Invalid("a new sku needs a name".into()))?,
                barcodes: vec![],
                safety_stock: 0,
                low_stock_threshold: 0,
                max_per_customer: 0,
                active: true,
                escrow: EscrowRule::default(),
            },
        };
        if let Some(v) = &self.name {
            item.name = v.clone();
        }
        if let Some(v) = &self.barcodes {
            item.barcodes = v.clone();
        }
        if let Some(v) = self.safety_stock {
            item.safety_stock = v;
        }
        if let Some(v) = self.low_stock_threshold {
            item.low_stock_threshold = v;
        }
        if let Some(v) = self.max_per_customer {
            item.max_per_customer = v;
        }
        if let Some(v) = self.active {
            item.active = v;
        }
        if let Some(v) = self.escrow {
            item.escrow = v;
        }
        item.validate()?;
        Ok(item)
    }
}

/// A store's overrides of one SKU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Overrides {
    /// Safety stock at this store.
    pub safety_stock: Option<u64>,
    /// Low-stock threshold at this store.
    pub low_stock_threshold: Option<u64>,
    /// Escrow values at this store (over the SKU's and the chain's).
    #[serde(default, skip_serializing_if = "EscrowRule::is_empty")]
    pub escrow: EscrowRule,
}

fn map_at(doc: &AutoCommit, obj: &automerge::ObjId, key: &str) -> Option<automerge::ObjId> {
    match doc.get(obj, key).ok().flatten() {
        Some((Value::Object(ObjType::Map), id)) => Some(id),
        _ => None,
    }
}

fn list_at(doc: &AutoCommit, obj: &automerge::ObjId, key: &str) -> Option<automerge::ObjId> {
    match doc.get(obj, key).ok().flatten() {
        Some((Value::Object(ObjType::List), id)) => Some(id),
        _ => None,
    }
}

fn scalar(doc: &AutoCommit, obj: &automerge::ObjId, key: &str) -> Option<ScalarValue> {
    match doc.get(obj, key).ok().flatten() {
        Some((Value::Scalar(s), _)) => Some(s.into_owned()),
        _ => None,
    }
}

fn u64_at(doc: &AutoCommit, obj: &automerge::ObjId, key: &str) -> Option<u64> {
    scalar(doc, obj, key).and_then(|s| s.to_u64().or_else(|| s.to_i64().and_then(|v| u64::try_from(v).ok())))
}

/// The `skus` map of a catalog document (created if missing).
fn skus_obj(doc: &mut AutoCommit) -> Result<automerge::ObjId, CatalogError> {
    match map_at(doc, &ROOT, "skus") {
        Some(id) => Ok(id),
        None => Ok(doc.put_object(ROOT, "skus", ObjType::Map)?),
    }
}

/// Reads one entry from a catalog document.
pub fn read_item(doc: &AutoCommit, sku: &str) -> Option<CatalogItem> {
    let skus = map_at(doc, &ROOT, "skus")?;
    let m = map_at(doc, &skus, sku)?;
    let barcodes = list_at(doc, &m, "barcodes")
        .map(|l| {
            (0..doc.length(&l))
                .filter_map(|i| match doc.get(&l, i).ok().flatten() {
                    Some((Value::Scalar(s), _)) => s.to_str().map(str::to_owned),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    Some(CatalogItem {
        name: scalar(doc, &m, "name").and_then(|s| s.to_str().map(str::to_owned)).unwrap_or_default(),
        barcodes,
        safety_stock: u64_at(doc, &m, "safety_stock").unwrap_or(0),
        low_stock_threshold: u64_at(doc, &m, "low_stock_threshold").unwrap_or(0),
        max_per_customer: u64_at(doc, &m, "max_per_customer").unwrap_or(0),
        active: scalar(doc, &m, "active").and_then(|s| s.to_bool()).unwrap_or(true),
        escrow: read_escrow(doc, &m),
    })
}

fn read_escrow(doc: &AutoCommit, m: &automerge::ObjId) -> EscrowRule {
    escrow_rule(ESCROW_KEYS.map(|k| u64_at(doc, m, k)))
}

/// Writes an escrow rule's fields into a map: set values put, unset ones deleted.
fn write_escrow(doc: &mut AutoCommit, m: &automerge::ObjId, r: &EscrowRule) -> Result<(), CatalogError> {
    let before = read_escrow(doc, m);
    for ((key, v), was) in ESCROW_KEYS.iter().zip(escrow_fields(r)).zip(escrow_fields(&before)) {
        match v {
            _ if v == was => {}
            Some(v) => doc.put(m, *key, v)?,
            None => doc.delete(m, *key)?,
        }
    }
    Ok(())
}

/// Writes one entry into a catalog document, field by field (so concurrent edits of different
/// fields of one SKU both survive; the same field is last-writer-wins).
pub fn write_item(doc: &mut AutoCommit, sku: &str, item: &CatalogItem) -> Result<(), CatalogError> {
    let skus = skus_obj(doc)?;
    let before = read_item(doc, sku);
    let m = match map_at(doc, &skus, sku) {
        Some(m) => m,
        None => doc.put_object(&skus, sku, ObjType::Map)?,
    };
    let unchanged = |f: &dyn Fn(&CatalogItem) -> bool| before.as_ref().is_some_and(f);
    if !unchanged(&|b| b.name == item.name) {
        doc.put(&m, "name", item.name.as_str())?;
    }
    if !unchanged(&|b| b.barcodes == item.barcodes) {
        let l = doc.put_object(&m, "barcodes", ObjType::List)?;
        for (i, b) in item.barcodes.iter().enumerate() {
            doc.insert(&l, i, b.as_str())?;
        }
    }
    if !unchanged(&|b| b.safety_stock == item.safety_stock) {
        doc.put(&m, "safety_stock", item.safety_stock)?;
    }
    if !unchanged(&|b| b.low_stock_threshold == item.low_stock_threshold) {
        doc.put(&m, "low_stock_threshold", item.low_stock_threshold)?;
    }
    if !unchanged(&|b| b.max_per_customer == item.max_per_customer) {
        doc.put(&m, "max_per_customer", item.max_per_customer)?;
    }
    if !unchanged(&|b| b.active == item.active) {
        doc.put(&m, "active", item.active)?;
    }
    write_escrow(doc, &m, &item.escrow)
}

/// Reads a store's overrides of one SKU from its overrides document.
pub fn read_overrides(doc: &AutoCommit, sku: &str) -> Overrides {
    match map_at(doc, &ROOT, sku) {
        Some(m) => Overrides {
            safety_stock: u64_at(doc, &m, "safety_stock"),
            low_stock_threshold: u64_at(doc, &m, "low_stock_threshold"),
            escrow: read_escrow(doc, &m),
        },
        None => Overrides::default(),
    }
}

/// Sets (or, with `None`, clears) a store's overrides of one SKU.
pub fn write_overrides(doc: &mut AutoCommit, sku: &str, o: &Overrides) -> Result<(), CatalogError> {
    for (field, v) in [("safety_stock", o.safety_stock), ("low_stock_threshold", o.low_stock_threshold)] {
        if v.is_some_and(|v| v > QTY_FIELD_MAX) {
            return Err(CatalogError::Invalid(format!("{field} must be at most {QTY_FIELD_MAX}")));
        }
    }
    o.escrow.validate().map_err(CatalogError::Invalid)?;
    let m = match map_at(doc, &ROOT, sku) {
        Some(m) => m,
        None => doc.put_object(ROOT, sku, ObjType::Map)?,
    };
    for (field, v) in [("safety_stock", o.safety_stock), ("low_stock_threshold", o.low_stock_threshold)] {
        match v {
            Some(v) => doc.put(&m, field, v)?,
            None => {
                if doc.get(&m, field)?.is_some() {
                    doc.delete(&m, field)?
                }
            }
        }
    }
    write_escrow(doc, &m, &o.escrow)
}

/// SKUs whose entries changed between two sets of heads. `depth` is where the SKU key sits in
/// the path: 1 in the catalog (`skus/<sku>`), 0 in an overrides document (`<sku>`).
pub fn changed_skus(
    doc: &mut AutoCommit,
    before: &[ChangeHash],
    after: &[ChangeHash],
    depth: usize,
) -> BTreeSet<String> {
    let patches = doc.diff(before, after);
    skus_of(patches, depth)
}

/// The SKU keys that patches touch (see [`changed_skus`]).
pub fn skus_of(patches: Vec<automerge::Patch>, depth: usize) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for p in patches {
        let mut keys: Vec<String> = p
            .path
            .iter()
            .map(|(_, prop)| match prop {
                Prop::Map(k) => k.clone(),
                Prop::Seq(i) => i.to_string(),
            })
            .collect();
        match &p.action {
            PatchAction::PutMap { key, .. } | PatchAction::DeleteMap { key } => keys.push(key.clone()),
            PatchAction::Conflict { prop: Prop::Map(k) } => keys.push(k.clone()),
            _ => {}
        }
        if depth == 1 && keys.first().map(String::as_str) != Some("skus") {
            continue;
        }
        if let Some(k) = keys.get(depth) {
            out.insert(k.clone());
        }
    }
    out
}

/// All SKUs in a catalog document, in order.
pub fn all_skus(doc: &AutoCommit) -> Vec<String> {
    match map_at(doc, &ROOT, "skus") {
        Some(s) => doc.keys(&s).collect(),
        None => Vec::new(),
    }
}

/// All SKUs a store's overrides document has entries for.
pub fn override_skus(doc: &AutoCommit) -> BTreeSet<String> {
    doc.keys(ROOT).collect()
}

/// A document with the bookkeeping to persist it incrementally.
pub struct TrackedDoc {
    /// Its name (`catalog`, `overrides/<store>`).
    pub name: String,
    /// The document.
    pub doc: AutoCommit,
    chunks: i64,
}

/// What to write to persist a document's latest changes.
#[derive(Debug)]
pub struct DocWrite {
    /// Document name.
    pub name: String,
    /// The incremental chunk.
    pub chunk: Vec<u8>,
    /// A full save replacing every chunk (compaction), now and then.
    pub full: Option<Vec<u8>>,
}

impl TrackedDoc {
    /// Loads a document from its chunks (an empty document if there are none).
    pub fn load(conn: &Connection, name: &str) -> Result<TrackedDoc, CatalogError> {
        let mut stmt = conn.prepare_cached("SELECT bytes FROM doc_chunks WHERE doc = ?1 ORDER BY seq")?;
        let chunks = stmt.query_map([name], |r| r.get::<_, Vec<u8>>(0))?.collect::<Result<Vec<_>, _>>()?;
        Self::from_chunks(name, &chunks)
    }

    /// A document from its stored chunks, oldest first (whatever stored them).
    pub fn from_chunks(name: &str, chunks: &[Vec<u8>]) -> Result<TrackedDoc, CatalogError> {
        let mut doc = AutoCommit::new();
        for c in chunks {
            doc.load_incremental(c)?;
        }
        // Mark everything loaded as saved, so the next save is incremental from here.
        let _ = doc.save_incremental();
        Ok(TrackedDoc { name: name.to_owned(), doc, chunks: chunks.len() as i64 })
    }

    /// An empty document that is not persisted yet.
    pub fn empty(name: &str) -> TrackedDoc {
        TrackedDoc { name: name.to_owned(), doc: AutoCommit::new(), chunks: 0 }
    }

    /// The changes since the last call, to persist (`None` if nothing changed).
    pub fn take_write(&mut self) -> Option<DocWrite> {
        let chunk = self.doc.save_incremental();
        if chunk.is_empty() {
            return None;
        }
        self.chunks += 1;
        let full = (self.chunks > CHUNKS_BEFORE_COMPACTION).then(|| {
            self.chunks = 1;
            self.doc.save()
        });
        Some(DocWrite { name: self.name.clone(), chunk, full })
    }
}

/// Persists a document write (in the caller's transaction).
pub fn write_chunk(conn: &Connection, w: &DocWrite) -> Result<(), CatalogError> {
    match &w.full {
        Some(full) => {
            conn.execute("DELETE FROM doc_chunks WHERE doc = ?1", [&w.name])?;
            conn.prepare_cached("INSERT INTO doc_chunks (doc, bytes) VALUES (?1, ?2)")?
                .execute(params![w.name, full])?;
        }
        None => {
            conn.prepare_cached("INSERT INTO doc_chunks (doc, bytes) VALUES (?1, ?2)")?
                .execute(params![w.name, w.chunk])?;
        }
    }
    Ok(())
}

/// Chunks of `doc` written after `after` by someone else (another process), with their sequence.
pub fn chunks_after(conn: &Connection, doc: &str, after: i64) -> Result<Vec<(i64, Vec<u8>)>, CatalogError> {
    let mut stmt = conn.prepare_cached("SELECT seq, bytes FROM doc_chunks WHERE doc = ?1 AND seq > ?2 ORDER BY seq")?;
    let rows = stmt.query_map(params![doc, after], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Chunks of every store's overrides document written after `after`, with their sequence and
/// document, in order.
pub fn override_chunks_after(conn: &Connection, after: i64) -> Result<Vec<(i64, String, Vec<u8>)>, CatalogError> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, doc, bytes FROM doc_chunks WHERE seq > ?1 AND substr(doc, 1, length(?2)) = ?2 ORDER BY seq",
    )?;
    let rows = stmt
        .query_map(params![after, OVERRIDES_PREFIX], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}

/// The newest chunk sequence of any document (0 if none).
pub fn newest_chunk(conn: &Connection) -> Result<i64, CatalogError> {
    Ok(conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM doc_chunks", [], |r| r.get(0))?)
}

/// The newest chunk sequence of `doc` (0 if none).
pub fn last_chunk(conn: &Connection, doc: &str) -> Result<i64, CatalogError> {
    Ok(conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM doc_chunks WHERE doc = ?1", [doc], |r| r.get(0))?)
}

/// The persisted sync state of (`doc`, `peer`), fresh if none.
pub fn load_sync_state(conn: &Connection, doc: &str, peer: &str) -> Result<automerge::sync::State, CatalogError> {
    let bytes: Option<Vec<u8>> = conn
        .prepare_cached("SELECT state FROM doc_sync WHERE doc = ?1 AND peer = ?2")?
        .query_row([doc, peer], |r| r.get(0))
        .optional()?;
    Ok(bytes.and_then(|b| automerge::sync::State::decode(&b).ok()).unwrap_or_default())
}

/// Persists the sync state of (`doc`, `peer`).
pub fn save_sync_state(
    conn: &Connection,
    doc: &str,
    peer: &str,
    state: &automerge::sync::State,
) -> Result<(), CatalogError> {
    conn.prepare_cached(
        "INSERT INTO doc_sync (doc, peer, state) VALUES (?1, ?2, ?3)
         ON CONFLICT (doc, peer) DO UPDATE SET state = excluded.state",
    )?
    .execute(params![doc, peer, state.encode()])?;
    Ok(())
}

/// Materialised rows of `skus` from a catalog document (`None`: not in the catalog).
pub fn item_rows(doc: &AutoCommit, skus: &BTreeSet<String>) -> Vec<(String, Option<CatalogItem>)> {
    skus.iter().map(|s| (s.clone(), read_item(doc, s))).collect()
}

/// Writes materialised catalog rows.
pub fn write_item_rows(conn: &Connection, rows: &[(String, Option<CatalogItem>)]) -> Result<(), CatalogError> {
    for (sku, item) in rows {
        match item {
            Some(i) => {
                conn.prepare_cached(
                    "INSERT INTO catalog_items (sku, name, barcodes, safety_stock, low_stock_threshold, max_per_customer, active,
                       escrow_share_pct, escrow_max, escrow_keep)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
                     ON CONFLICT (sku) DO UPDATE SET name = excluded.name, barcodes = excluded.barcodes,
                       safety_stock = excluded.safety_stock, low_stock_threshold = excluded.low_stock_threshold,
                       max_per_customer = excluded.max_per_customer, active = excluded.active,
                       escrow_share_pct = excluded.escrow_share_pct, escrow_max = excluded.escrow_max,
                       escrow_keep = excluded.escrow_keep",
                )?
                .execute(params![
                    sku,
                    i.name,
                    serde_json::to_string(&i.barcodes).expect("serialises"),
                    i.safety_stock,
                    i.low_stock_threshold,
                    i.max_per_customer,
                    i.active,
                    i.escrow.share_pct,
                    i.escrow.max,
                    i.escrow.keep
                ])?;
            }
            None => {
                conn.prepare_cached("DELETE FROM catalog_items WHERE sku = ?1")?.execute([sku])?;
            }
        }
    }
    Ok(())
}

/// Materialised override rows of `skus` from a store's overrides document.
pub fn override_rows(doc: &AutoCommit, skus: &BTreeSet<String>) -> Vec<(String, Overrides)> {
    skus.iter().map(|s| (s.clone(), read_overrides(doc, s))).collect()
}

/// Writes a store's materialised override rows.
pub fn write_override_rows(
    conn: &Connection,
    store: &StoreId,
    rows: &[(String, Overrides)],
) -> Result<(), CatalogError> {
    for (sku, o) in rows {
        if *o == Overrides::default() {
            conn.prepare_cached("DELETE FROM catalog_overrides WHERE store = ?1 AND sku = ?2")?
                .execute([store.as_str(), sku])?;
        } else {
            conn.prepare_cached(
                "INSERT INTO catalog_overrides (store, sku, safety_stock, low_stock_threshold,
                   escrow_share_pct, escrow_max, escrow_keep) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (store, sku) DO UPDATE SET safety_stock = excluded.safety_stock,
                   low_stock_threshold = excluded.low_stock_threshold, escrow_share_pct = excluded.escrow_share_pct,
                   escrow_max = excluded.escrow_max, escrow_keep = excluded.escrow_keep",
            )?
            .execute(params![
                store.as_str(),
                sku,
                o.safety_stock,
                o.low_stock_threshold,
                o.escrow.share_pct,
                o.escrow.max,
                o.escrow.keep
            ])?;
        }
    }
    Ok(())
}

/// A catalog entry as read from the materialised tables, with a store's overrides.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogView {
    /// The SKU.
    pub sku: Sku,
    /// The head-office entry.
    #[serde(flatten)]
    pub item: CatalogItem,
    /// This store's overrides (absent at the hub's catalog listing).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overrides: Option<Overrides>,
    /// What applies here: the override if set, else the catalog value.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub effective: Option<Effective>,
}

/// The values in force at a store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Effective {
    /// Safety stock in force.
    pub safety_stock: u64,
    /// Threshold in force.
    pub low_stock_threshold: u64,
    /// Escrow values in force (the store's over the SKU's; what is unset here is the chain's).
    #[serde(default, skip_serializing_if = "EscrowRule::is_empty")]
    pub escrow: EscrowRule,
}

/// A `catalog_items` row: sku, name, barcodes (JSON), safety stock, threshold, max per customer,
/// active, escrow rule.
pub type ItemRow = (String, String, String, u64, u64, u64, bool, EscrowRule);

/// A `catalog_items` row as an entry.
pub fn item_from_row(row: ItemRow) -> Result<(Sku, CatalogItem), DbError> {
    let (sku, name, barcodes, safety_stock, low_stock_threshold, max_per_customer, active, escrow) = row;
    Ok((
        crate::db::sku_col(sku)?,
        CatalogItem {
            name,
            barcodes: serde_json::from_str(&barcodes).map_err(|e| DbError::Corrupt(format!("barcodes: {e}")))?,
            safety_stock,
            low_stock_threshold,
            max_per_customer,
            active,
            escrow,
        },
    ))
}

/// The columns of [`ItemRow`], in order.
pub const ITEM_COLUMNS: &str = "sku, name, barcodes, safety_stock, low_stock_threshold, max_per_customer, active, \
                                escrow_share_pct, escrow_max, escrow_keep";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ItemRow> {
    let escrow = escrow_rule([r.get(7)?, r.get(8)?, r.get(9)?]);
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?, escrow))
}

/// One entry from the materialised tables, with `store`'s overrides if given.
pub fn view(conn: &Connection, sku: &Sku, store: Option<&StoreId>) -> Result<Option<CatalogView>, DbError> {
    let r = conn
        .prepare_cached(&format!("SELECT {ITEM_COLUMNS} FROM catalog_items WHERE sku = ?1"))?
        .query_row([sku.as_str()], row)
        .optional()?;
    let Some(r) = r else { return Ok(None) };
    let (sku, item) = item_from_row(r)?;
    let overrides = store.map(|s| store_overrides(conn, s, &sku)).transpose()?;
    Ok(Some(CatalogView::new(sku, item, overrides)))
}

impl CatalogView {
    /// An entry with a store's overrides (and what is in force there), or without.
    pub fn new(sku: Sku, item: CatalogItem, overrides: Option<Overrides>) -> CatalogView {
        let effective = overrides.map(|o| Effective {
            safety_stock: o.safety_stock.unwrap_or(item.safety_stock),
            low_stock_threshold: o.low_stock_threshold.unwrap_or(item.low_stock_threshold),
            escrow: o.escrow.or(&item.escrow),
        });
        CatalogView { sku, item, overrides, effective }
    }
}

/// A page of entries in SKU order.
pub fn page(conn: &Connection, after: Option<&Sku>, limit: usize) -> Result<Vec<CatalogView>, DbError> {
    let mut stmt =
        conn.prepare_cached(&format!("SELECT {ITEM_COLUMNS} FROM catalog_items WHERE sku > ?1 ORDER BY sku LIMIT ?2"))?;
    let rows = stmt
        .query_map(params![after.map(|s| s.as_str()).unwrap_or(""), limit as i64], row)?
        .collect::<Result<Vec<_>, _>>()?;
    rows.into_iter()
        .map(|r| item_from_row(r).map(|(sku, item)| CatalogView { sku, item, overrides: None, effective: None }))
        .collect()
}

/// A page of the entries whose SKU or name contains `q` (ignoring ASCII case), in SKU order.
pub fn search(conn: &Connection, q: &str, after: Option<&Sku>, limit: usize) -> Result<Vec<CatalogView>, DbError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {ITEM_COLUMNS} FROM catalog_items WHERE sku > ?1
           AND (instr(lower(sku), lower(?3)) > 0 OR instr(lower(name), lower(?3)) > 0)
         ORDER BY sku LIMIT ?2"
    ))?;
    let rows = stmt
        .query_map(params![after.map(|s| s.as_str()).unwrap_or(""), limit as i64, q], row)?
        .collect::<Result<Vec<_>, _>>()?;
    rows.into_iter()
        .map(|r| item_from_row(r).map(|(sku, item)| CatalogView { sku, item, overrides: None, effective: None }))
        .collect()
}

/// A store's materialised overrides of one SKU.
pub fn store_overrides(conn: &Connection, store: &StoreId, sku: &Sku) -> Result<Overrides, DbError> {
    Ok(conn
        .prepare_cached(
            "SELECT safety_stock, low_stock_threshold, escrow_share_pct, escrow_max, escrow_keep
             FROM catalog_overrides WHERE store = ?1 AND sku = ?2",
        )?
        .query_row([store.as_str(), sku.as_str()], |r| {
            Ok(Overrides {
                safety_stock: r.get(0)?,
                low_stock_threshold: r.get(1)?,
                escrow: escrow_rule([r.get(2)?, r.get(3)?, r.get(4)?]),
            })
        })
        .optional()?
        .unwrap_or_default())
}

/// How a SKU stands in the materialised catalog: `None` when there is no catalog at all (a
/// standalone store), else whether it is listed and active.
pub fn standing(conn: &Connection, sku: &Sku) -> Result<Option<(bool, bool)>, DbError> {
    let any: bool = conn.query_row("SELECT EXISTS (SELECT 1 FROM catalog_items)", [], |r| r.get(0))?;
    if !any {
        return Ok(None);
    }
    let active: Option<bool> = conn
        .prepare_cached("SELECT active FROM catalog_items WHERE sku = ?1")?
        .query_row([sku.as_str()], |r| r.get(0))
        .optional()?;
    Ok(Some((active.is_some(), active.unwrap_or(false))))
}

/// The display name of a SKU, if catalogued.
pub fn name_of(conn: &Connection, sku: &Sku) -> Result<Option<String>, DbError> {
    Ok(conn
        .prepare_cached("SELECT name FROM catalog_items WHERE sku = ?1")?
        .query_row([sku.as_str()], |r| r.get(0))
        .optional()?)
}

/// Generates the next automerge sync message for a peer, if there is anything to say.
pub fn generate(doc: &mut AutoCommit, state: &mut automerge::sync::State) -> Option<Vec<u8>> {
    use automerge::sync::SyncDoc;
    doc.sync().generate_sync_message(state).map(|m| m.encode())
}

/// Applies a peer's sync message. With `allow_changes` false, a message that carries changes is
/// refused (a store may not change the hub's catalog). Returns the SKUs whose entries changed
/// (`depth` as in [`changed_skus`]).
pub fn receive(
    doc: &mut AutoCommit,
    state: &mut automerge::sync::State,
    bytes: &[u8],
    depth: usize,
    allow_changes: bool,
) -> Result<BTreeSet<String>, CatalogError> {
    use automerge::sync::SyncDoc;
    let msg =
        automerge::sync::Message::decode(bytes).map_err(|e| CatalogError::Invalid(format!("sync message: {e}")))?;
    if !allow_changes {
        // A read-only peer may send chunks (an empty document, changes it got from us), but no
        // change we do not already have.
        for chunk in msg.changes.iter() {
            let mut theirs = automerge::Automerge::new();
            theirs.load_incremental(chunk).map_err(|e| CatalogError::Invalid(format!("sync message changes: {e}")))?;
            if theirs.get_changes(&[]).iter().any(|c| doc.get_change_by_hash(&c.hash()).is_none()) {
                return Err(CatalogError::Forbidden("the peer tried to change a document it may only read".into()));
            }
        }
    }
    // Patches are logged while the changes apply, which costs what the changes cost; diffing two
    // heads afterwards would walk the whole document.
    let mut log = automerge::PatchLog::active();
    doc.sync().receive_sync_message_log_patches(state, msg, &mut log)?;
    Ok(skus_of(doc.make_patches(&mut log), depth))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(name: &str, safety: u64) -> CatalogItem {
        CatalogItem {
            name: name.into(),
            barcodes: vec!["400123".into()],
            safety_stock: safety,
            low_stock_threshold: 3,
            max_per_customer: 2,
            active: true,
            escrow: EscrowRule::default(),
        }
    }

    #[test]
    fn items_round_trip_and_changes_are_found() {
        let mut d = AutoCommit::new();
        let h0 = d.get_heads();
        write_item(&mut d, "A", &item("Apple", 1)).unwrap();
        write_item(&mut d, "B", &item("Banana", 0)).unwrap();
        let h1 = d.get_heads();
        assert_eq!(read_item(&d, "A"), Some(item("Apple", 1)));
        assert_eq!(changed_skus(&mut d, &h0, &h1, 1), ["A".to_string(), "B".to_string()].into());
        write_item(&mut d, "B", &item("Banana", 4)).unwrap();
        let h2 = d.get_heads();
        assert_eq!(changed_skus(&mut d, &h1, &h2, 1), ["B".to_string()].into());
        assert_eq!(all_skus(&d), vec!["A", "B"]);
    }

    #[test]
    fn concurrent_edits_of_different_fields_both_survive() {
        let mut hq = AutoCommit::new();
        write_item(&mut hq, "A", &item("Apple", 1)).unwrap();
        let mut other = hq.fork();
        let mut a = read_item(&hq, "A").unwrap();
        a.name = "Green apple".into();
        write_item(&mut hq, "A", &a).unwrap();
        let mut b = read_item(&other, "A").unwrap();
        b.safety_stock = 9;
        write_item(&mut other, "A", &b).unwrap();
        hq.merge(&mut other).unwrap();
        let merged = read_item(&hq, "A").unwrap();
        assert_eq!((merged.name.as_str(), merged.safety_stock), ("Green apple", 9));
    }

    #[test]
    fn overrides_set_and_clear() {
        let mut d = AutoCommit::new();
        let h0 = d.get_heads();
        write_overrides(&mut d, "A", &Overrides { safety_stock: Some(5), ..Default::default() }).unwrap();
        assert_eq!(read_overrides(&d, "A").safety_stock, Some(5));
        let h1 = d.get_heads();
        assert_eq!(changed_skus(&mut d, &h0, &h1, 0), ["A".to_string()].into());
        write_overrides(&mut d, "A", &Overrides::default()).unwrap();
        assert_eq!(read_overrides(&d, "A"), Overrides::default());
    }

    #[test]
    fn escrow_rules_round_trip_through_documents_and_tables() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(MIGRATION).unwrap();
        conn.execute_batch(ESCROW_MIGRATION).unwrap();
        let mut d = AutoCommit::new();
        let mut a = item("Apple", 1);
        a.escrow = EscrowRule { share_pct: Some(50), max: None, keep: Some(2) };
        write_item(&mut d, "A", &a).unwrap();
        assert_eq!(read_item(&d, "A"), Some(a.clone()));
        // Clearing one value removes its key; the others stay.
        let h = d.get_heads();
        a.escrow.keep = None;
        write_item(&mut d, "A", &a).unwrap();
        assert_eq!(read_item(&d, "A").unwrap().escrow, EscrowRule { share_pct: Some(50), ..Default::default() });
        let h2 = d.get_heads();
        assert_eq!(changed_skus(&mut d, &h, &h2, 1), ["A".to_string()].into());
        write_item_rows(&conn, &item_rows(&d, &["A".to_string()].into())).unwrap();
        let store: StoreId = "store-1".parse().unwrap();
        let mut o = AutoCommit::new();
        let ov = Overrides { escrow: EscrowRule { keep: Some(4), ..Default::default() }, ..Default::default() };
        write_overrides(&mut o, "A", &ov).unwrap();
        assert_eq!(read_overrides(&o, "A"), ov);
        write_override_rows(&conn, &store, &override_rows(&o, &["A".to_string()].into())).unwrap();
        let v = view(&conn, &"A".parse().unwrap(), Some(&store)).unwrap().unwrap();
        assert_eq!(v.item, a);
        assert_eq!(v.effective.unwrap().escrow, EscrowRule { share_pct: Some(50), max: None, keep: Some(4) });
        let bad = Overrides { escrow: EscrowRule { share_pct: Some(120), ..Default::default() }, ..Default::default() };
        assert!(write_overrides(&mut o, "A", &bad).unwrap_err().to_string().contains("escrow.share_pct"));
        let patch: CatalogPatch = serde_json::from_str(r#"{"escrow": {"max": 6}}"#).unwrap();
        assert_eq!(patch.apply_to(Some(a)).unwrap().escrow, EscrowRule { max: Some(6), ..Default::default() });
    }

    #[test]
    fn validation_names_the_field() {
        let mut i = item("x", 0);
        i.barcodes = vec!["bad code".into()];
        assert!(i.validate().unwrap_err().to_string().contains("barcodes[0]"));
        let p = CatalogPatch { safety_stock: Some(5), ..Default::default() };
        assert!(p.apply_to(None).unwrap_err().to_string().contains("needs a name"));
    }
}
