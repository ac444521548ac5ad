//! Persistence of the decider's records in SQLite: [`write`] upserts one batch's records inside
//! the runtime's transaction, [`load`] reads every row back as records at start. No business rule
//! lives here: rows are what the decider decided, keyed naturally.
//!
//! | record                         | table                                            |
//! |--------------------------------|--------------------------------------------------|
//! | `Store`                        | `stores` (revocation and last contact only move forward) |
//! | `Entry`                        | `counters` (store, sku, writer → p, n, seq)      |
//! | `Journal`                      | `journal` (hub-authored events, shipped to stores) |
//! | `Feed`                         | `feed` (cursor → event)                          |
//! | reservations, allocations, conflicts, velocity, alerts, idempotent answers | `decisions` (kind, key → JSON row) |
//! | `CatalogRule`, `Overrides`     | none: the catalog's materialised rows (`catalog_items`, `catalog_overrides`) are written by the catalog code in the same transaction, and read back as rules |
//! | `Transfer`                     | `transfers` (id, stores, status, ship time; the row as JSON) |
//! | `HubWriter`, `IdCounter`       | `meta`                                           |

use rusqlite::{params, Connection};
use shelfsync_hub_core::{CatalogRule, FeedEvent, Overrides, Record, StoreRecord};
use shelfsync_node::catalog::{escrow_rule, ESCROW_COLUMNS};
use shelfsync_node::db as adb;
use shelfsync_node::journal::insert_event;
use shelfsync_shared::{EscrowRule, PnEntry, Sku, StoreId};

use crate::storage::{StorageError, StorageResult};

/// Schema (migration 6 of the hub database): the decider's rows.
pub const MIGRATION: &str = "
    CREATE TABLE decisions (
        kind TEXT NOT NULL, key TEXT NOT NULL, body TEXT NOT NULL, PRIMARY KEY (kind, key)) WITHOUT ROWID;
    CREATE TABLE feed (cursor INTEGER PRIMARY KEY, kind TEXT NOT NULL, at_ms INTEGER NOT NULL, body TEXT NOT NULL);
    ALTER TABLE stores ADD COLUMN holds_version INTEGER NOT NULL DEFAULT 0;";

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("records serialise")
}

fn put(conn: &Connection, kind: &str, key: &str, body: String) -> StorageResult<()> {
    conn.prepare_cached(
        "INSERT INTO decisions (kind, key, body) VALUES (?1, ?2, ?3)
         ON CONFLICT (kind, key) DO UPDATE SET body = excluded.body",
    )?
    .execute(params![kind, key, body])?;
    Ok(())
}

fn cell_key(store: &StoreId, sku: &Sku) -> String {
    format!("{store}\u{1f}{sku}")
}

/// Schema (migration 8 of the hub database): transfers between stores, typed columns for what
/// people query (who, which state, when) and the decider's row as JSON. Transfers recorded
/// before it exist only as their `hub_request` answers; the decider reads those as received.
pub const TRANSFERS_MIGRATION: &str = "
    CREATE TABLE transfers (
        id TEXT PRIMARY KEY, from_store TEXT NOT NULL, to_store TEXT NOT NULL, status TEXT NOT NULL,
        shipped_at_ms INTEGER NOT NULL, body TEXT NOT NULL) WITHOUT ROWID;
    CREATE INDEX transfers_to_status ON transfers(to_store, status);
    CREATE INDEX transfers_from ON transfers(from_store);";

/// One row write of a decided record, whatever the engine: what [`write`] (SQLite) and
/// `crate::postgres` turn into their SQL. Records without rows of their own (catalog rules and
/// overrides: the catalog code writes those rows) give none.
pub enum RowWrite<'a> {
    /// `stores` (revocation and last contact only move forward).
    Store(&'a StoreRecord),
    /// `counters`.
    Entry(&'a shelfsync_hub_core::EntryRecord),
    /// `decisions` (kind, key → JSON body).
    Decision {
        /// Kind of row.
        kind: &'static str,
        /// Natural key.
        key: String,
        /// The record as JSON.
        body: String,
    },
    /// `transfers`.
    Transfer(&'a shelfsync_hub_core::Transfer, String),
    /// `feed`.
    Feed(&'a FeedEvent, String),
    /// `journal` (hub-authored events; insert once per (store, id, line)).
    Journal(&'a shelfsync_shared::JournalEvent),
    /// `meta`.
    Meta(&'static str, String),
}

/// The row writes of one batch of records, in order.
pub fn rows(records: &[Record]) -> impl Iterator<Item = RowWrite<'_>> {
    records.iter().filter_map(|r| {
        let decision = |kind, key: String, body| Some(RowWrite::Decision { kind, key, body });
        match r {
            Record::Store(s) => Some(RowWrite::Store(s)),
            Record::Entry(e) => Some(RowWrite::Entry(e)),
            Record::Velocity { store, sku, velocity } => decision("velocity", cell_key(store, sku), json(velocity)),
            Record::Alert { store, sku, state } => decision("alert", cell_key(store, sku), json(state)),
            Record::Rights { store, sku, rights } => decision("rights", cell_key(store, sku), json(rights)),
            Record::CatalogRule { .. } | Record::Overrides { .. } => None,
            // A removed channel stays as a `null` row (there are at most a few dozen).
            Record::Channel { id, channel } => decision("channel", id.to_string(), json(channel)),
            Record::ChannelDemand { channel, sku, velocity } => {
                decision("channel_demand", format!("{channel}/{sku}"), json(velocity))
            }
            Record::Reservation(x) => decision("reservation", x.id.to_string(), json(x)),
            Record::Allocation(x) => decision("allocation", x.id.to_string(), json(x)),
            Record::Conflict(x) => decision("conflict", x.id.to_string(), json(x)),
            Record::HubRequest(x) => decision("hub_request", x.id.to_string(), json(x)),
            Record::ActionRequest(x) => decision("action_request", x.key.clone(), json(x)),
            Record::Transfer(x) => Some(RowWrite::Transfer(x, json(x))),
            Record::Feed(e) => Some(RowWrite::Feed(e, json(e))),
            Record::Journal(e) => Some(RowWrite::Journal(e)),
            Record::HubWriter(w) => Some(RowWrite::Meta("writer", w.to_string())),
            Record::IdCounter(n) => Some(RowWrite::Meta("id_counter", n.to_string())),
        }
    })
}

/// Writes one batch of records (inside the caller's transaction).
pub fn write(conn: &Connection, records: &[Record]) -> StorageResult<()> {
    for row in rows(records) {
        match row {
            RowWrite::Store(s) => {
                conn.prepare_cached(
                    "INSERT INTO stores (id, created_at_ms, revoked_at_ms, last_seen_ms, holds_version)
                     VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (id) DO UPDATE SET
                        revoked_at_ms = COALESCE(stores.revoked_at_ms, excluded.revoked_at_ms),
                        last_seen_ms = COALESCE(MAX(stores.last_seen_ms, excluded.last_seen_ms),
                                                stores.last_seen_ms, excluded.last_seen_ms),
                        holds_version = excluded.holds_version",
                )?
                .execute(params![
                    s.id.as_str(),
                    s.added_at_ms,
                    s.revoked_at_ms,
                    s.last_seen_ms,
                    s.holds_version
                ])?;
            }
            RowWrite::Entry(e) => {
                conn.prepare_cached(
                    "INSERT INTO counters (store, sku, writer, p, n, seq) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (store, sku, writer) DO UPDATE SET p = excluded.p, n = excluded.n, seq = excluded.seq",
                )?
                .execute(params![
                    e.store.as_str(),
                    e.sku.as_str(),
                    e.writer.to_string(),
                    e.entry.p,
                    e.entry.n,
                    e.seq
                ])?;
            }
            RowWrite::Decision { kind, key, body } => put(conn, kind, &key, body)?,
            RowWrite::Transfer(x, body) => {
                conn.prepare_cached(
                    "INSERT INTO transfers (id, from_store, to_store, status, shipped_at_ms, body)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (id) DO UPDATE SET status = excluded.status, body = excluded.body",
                )?
                .execute(params![
                    x.id.to_string(),
                    x.from.as_str(),
                    x.to.as_str(),
                    x.status.as_str(),
                    x.shipped_at_ms,
                    body
                ])?;
            }
            RowWrite::Feed(e, body) => {
                conn.prepare_cached("INSERT INTO feed (cursor, kind, at_ms, body) VALUES (?1, ?2, ?3, ?4)")?
                    .execute(params![e.cursor, e.kind.as_str(), e.at_ms, body])?;
            }
            RowWrite::Journal(e) => {
                insert_event(conn, e)?;
            }
            RowWrite::Meta(key, value) => adb::meta_set(conn, key, &value)?,
        }
    }
    Ok(())
}

fn parse<T: serde::de::DeserializeOwned>(kind: &str, key: &str, body: &str) -> StorageResult<T> {
    serde_json::from_str(body).map_err(|e| StorageError::Corrupt(format!("decisions row {kind}/{key}: {e}")))
}

fn cell_of(key: &str) -> StorageResult<(StoreId, Sku)> {
    let (store, sku) =
        key.split_once('\u{1f}').ok_or_else(|| StorageError::Corrupt(format!("decisions key {key:?}")))?;
    let store = store.parse().map_err(|e| StorageError::Corrupt(format!("decisions key {key:?}: {e}")))?;
    let sku = sku.parse().map_err(|e| StorageError::Corrupt(format!("decisions key {key:?}: {e}")))?;
    Ok((store, sku))
}

fn col<T: std::str::FromStr>(what: &str, s: String) -> StorageResult<T>
where
    T::Err: std::fmt::Display,
{
    s.parse().map_err(|e| StorageError::Corrupt(format!("{what} {s:?}: {e}")))
}

/// Appends one record per row of `sql`.
fn each_row(
    conn: &Connection,
    sql: &str,
    out: &mut Vec<Record>,
    record: impl Fn(&rusqlite::Row<'_>) -> StorageResult<Record>,
) -> StorageResult<()> {
    let mut stmt = conn.prepare(sql)?;
    let mut rows = stmt.query([])?;
    while let Some(r) = rows.next()? {
        out.push(record(r)?);
    }
    Ok(())
}

/// A `stores` row as a record.
pub fn store_record(
    id: String,
    added_at_ms: i64,
    revoked_at_ms: Option<i64>,
    last_seen_ms: Option<i64>,
    holds_version: u64,
) -> StorageResult<Record> {
    Ok(Record::Store(StoreRecord { id: col("store", id)?, added_at_ms, revoked_at_ms, last_seen_ms, holds_version }))
}

/// A `counters` row as a record.
pub fn entry_record(store: String, sku: String, writer: String, p: u64, n: u64, seq: u64) -> StorageResult<Record> {
    Ok(Record::Entry(shelfsync_hub_core::EntryRecord {
        store: col("store", store)?,
        sku: col("sku", sku)?,
        writer: adb::writer_col(writer)?,
        entry: PnEntry { p, n },
        seq,
    }))
}

/// A `catalog_items` row as the decider's rule.
pub fn rule_record(
    sku: String,
    safety_stock: u64,
    low_stock_threshold: u64,
    max_per_customer: u64,
    active: bool,
    escrow: EscrowRule,
) -> StorageResult<Record> {
    Ok(Record::CatalogRule {
        sku: col("sku", sku)?,
        rule: Some(CatalogRule { safety_stock, low_stock_threshold, max_per_customer, active, escrow }),
    })
}

/// A `catalog_overrides` row as a record.
pub fn overrides_record(
    store: String,
    sku: String,
    safety_stock: Option<u64>,
    low_stock_threshold: Option<u64>,
    escrow: EscrowRule,
) -> StorageResult<Record> {
    Ok(Record::Overrides {
        store: col("store", store)?,
        sku: col("sku", sku)?,
        overrides: Overrides { safety_stock, low_stock_threshold, escrow },
    })
}

/// A `decisions` row as a record.
pub fn decision_record(kind: &str, key: &str, body: &str) -> StorageResult<Record> {
    Ok(match kind {
        "velocity" => {
            let (store, sku) = cell_of(key)?;
            Record::Velocity { store, sku, velocity: parse(kind, key, body)? }
        }
        "alert" => {
            let (store, sku) = cell_of(key)?;
            Record::Alert { store, sku, state: parse(kind, key, body)? }
        }
        "rights" => {
            let (store, sku) = cell_of(key)?;
            Record::Rights { store, sku, rights: parse(kind, key, body)? }
        }
        "channel" => Record::Channel {
            id: key
                .parse()
                .map_err(|e: String| StorageError::Corrupt(format!("decisions row channel {key:?}: {e}")))?,
            channel: parse(kind, key, body)?,
        },
        "channel_demand" => {
            let bad = |m: String| StorageError::Corrupt(format!("decisions row channel_demand {key:?}: {m}"));
            let (c, sku) = key.split_once('/').ok_or_else(|| bad("no /".into()))?;
            Record::ChannelDemand {
                channel: c.parse().map_err(bad)?,
                sku: sku.parse().map_err(|e| bad(format!("{e}")))?,
                velocity: parse(kind, key, body)?,
            }
        }
        "reservation" => Record::Reservation(parse(kind, key, body)?),
        "allocation" => Record::Allocation(parse(kind, key, body)?),
        "conflict" => Record::Conflict(parse(kind, key, body)?),
        "hub_request" => Record::HubRequest(parse(kind, key, body)?),
        "action_request" => Record::ActionRequest(parse(kind, key, body)?),
        other => return Err(StorageError::Corrupt(format!("unknown decisions kind {other:?}"))),
    })
}

/// A `transfers` row as a record.
pub fn transfer_record(id: &str, body: &str) -> StorageResult<Record> {
    Ok(Record::Transfer(parse("transfer", id, body)?))
}

/// A `feed` row's event.
pub fn feed_event(body: &str) -> StorageResult<FeedEvent> {
    parse("feed", "", body)
}

/// The `meta` rows the decider reads, as records.
pub fn meta_records(writer: Option<String>, id_counter: Option<String>) -> StorageResult<Vec<Record>> {
    let mut out = Vec::new();
    if let Some(w) = writer {
        out.push(Record::HubWriter(col("meta.writer", w)?));
    }
    if let Some(n) = id_counter {
        out.push(Record::IdCounter(col("meta.id_counter", n)?));
    }
    Ok(out)
}

/// Every row as records, in an order [`shelfsync_hub_core::Decider::from_records`] accepts
/// (stores first), with at most `feed_retain` of the newest feed events.
pub fn load(conn: &Connection, feed_retain: usize) -> StorageResult<Vec<Record>> {
    let mut out = Vec::new();
    let sql = "SELECT id, created_at_ms, revoked_at_ms, last_seen_ms, holds_version FROM stores ORDER BY id";
    each_row(conn, sql, &mut out, |r| store_record(r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))?;
    each_row(conn, "SELECT store, sku, writer, p, n, seq FROM counters", &mut out, |r| {
        entry_record(r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)
    })?;
    let sql = format!(
        "SELECT sku, safety_stock, low_stock_threshold, max_per_customer, active, {ESCROW_COLUMNS} FROM catalog_items"
    );
    each_row(conn, &sql, &mut out, |r| {
        let escrow = escrow_rule([r.get(5)?, r.get(6)?, r.get(7)?]);
        rule_record(r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, escrow)
    })?;
    let sql = format!("SELECT store, sku, safety_stock, low_stock_threshold, {ESCROW_COLUMNS} FROM catalog_overrides");
    each_row(conn, &sql, &mut out, |r| {
        let escrow = escrow_rule([r.get(4)?, r.get(5)?, r.get(6)?]);
        overrides_record(r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, escrow)
    })?;
    each_row(conn, "SELECT kind, key, body FROM decisions", &mut out, |r| {
        let (kind, key, body): (String, String, String) = (r.get(0)?, r.get(1)?, r.get(2)?);
        decision_record(&kind, &key, &body)
    })?;
    each_row(conn, "SELECT id, body FROM transfers", &mut out, |r| {
        let (id, body): (String, String) = (r.get(0)?, r.get(1)?);
        transfer_record(&id, &body)
    })?;
    let mut events = feed_rows(conn, "SELECT body FROM feed ORDER BY cursor DESC LIMIT ?1", [feed_retain as i64])?;
    events.reverse();
    out.extend(events.into_iter().map(Record::Feed));
    out.extend(meta_records(adb::meta_get(conn, "writer")?, adb::meta_get(conn, "id_counter")?)?);
    Ok(out)
}

fn feed_rows(conn: &Connection, sql: &str, args: impl rusqlite::Params) -> StorageResult<Vec<FeedEvent>> {
    conn.prepare_cached(sql)?.query_map(args, |r| r.get::<_, String>(0))?.map(|b| feed_event(&b?)).collect()
}

/// Feed events after `cursor` from storage (for cursors older than the decider keeps).
pub fn feed_after(conn: &Connection, cursor: u64, limit: usize) -> StorageResult<Vec<FeedEvent>> {
    let cursor = i64::try_from(cursor).unwrap_or(i64::MAX);
    feed_rows(conn, "SELECT body FROM feed WHERE cursor > ?1 ORDER BY cursor LIMIT ?2", params![cursor, limit as i64])
}

/// Open reservations and conflicts that a hub from before the decider wrote in its own tables
/// (databases below migration 6). The decider cannot read them: such a database must be settled
/// (reservations committed or released, conflicts resolved) by the hub that wrote it.
pub fn legacy_open_rows(conn: &Connection) -> StorageResult<i64> {
    let version: u32 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if !(2..6).contains(&version) {
        return Ok(0);
    }
    Ok(conn.query_row(
        "SELECT (SELECT COUNT(*) FROM reservations WHERE status IN ('held', 'committed'))
              + (SELECT COUNT(*) FROM conflicts WHERE status = 'open')",
        [],
        |r| r.get(0),
    )?)
}
