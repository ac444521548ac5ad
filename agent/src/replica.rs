//! The agent's side of replication, as storage operations: what the sync client reads to ship to
//! the hub, and how it durably applies what the hub sends.

use rusqlite::{params, Connection};
use shelfsync_shared::counter::StateDigest;
use shelfsync_shared::sync::{AgentResume, DeltaRead, JournalRead};
use shelfsync_shared::wire::{Delta, JournalBatch};
use shelfsync_shared::{EventFlag, EventKind, JournalEvent, StoreId, WriterId};
use uuid::Uuid;

use crate::db::{self, Db, DbError};

/// What the agent durably knows about its hub, for `Hello`.
pub async fn resume(db: &Db) -> Result<AgentResume, DbError> {
    db.read(|conn| {
        let (hub_writer, applied, journal_applied): (Option<String>, u64, u64) =
            conn.query_row("SELECT hub_writer, applied, journal_applied FROM hub_link WHERE id = 1", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?;
        let h = db::heads(conn)?;
        Ok(AgentResume {
            hub_writer: hub_writer.map(db::writer_col).transpose()?,
            applied,
            journal_applied,
            head: h.counter,
            journal_head: h.journal,
        })
    })
    .await
}

fn own_prefix(store: &StoreId) -> String {
    format!("{store}@")
}

/// Entries of this store's own writers (any incarnation) with sequence above `after`.
pub async fn read_delta(db: &Db, after: u64, limit: usize) -> Result<DeltaRead, DbError> {
    let prefix = own_prefix(&db.identity().store);
    db.read(move |conn| {
        let tx = conn.unchecked_transaction()?; // one snapshot for entries and head
        let mut stmt = tx.prepare_cached(
            "SELECT sku, writer, p, n, seq FROM counters
             WHERE seq > ?1 AND substr(writer, 1, ?2) = ?3 ORDER BY seq LIMIT ?4",
        )?;
        let rows = stmt.query_map(params![after, prefix.len() as i64, prefix, limit as i64], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, u64>(2)?,
                r.get::<_, u64>(3)?,
                r.get::<_, u64>(4)?,
            ))
        })?;
        let mut entries = Vec::new();
        let mut last = after;
        for row in rows {
            let (sku, writer, p, n, seq) = row?;
            entries.push((db::sku_col(sku)?, db::writer_col(writer)?, shelfsync_shared::PnEntry { p, n }));
            last = seq;
        }
        drop(stmt);
        let upto = if entries.len() == limit { last } else { db::heads(&tx)?.counter.max(after) };
        let fulfilled = crate::holds::fulfilled_between(&tx, after, upto)?;
        tx.finish()?;
        Ok(DeltaRead { upto, entries, fulfilled })
    })
    .await
}

/// Records that a (possibly new) hub incarnation is the peer; a new one resets the watermarks.
fn adopt_hub(conn: &Connection, peer: &WriterId) -> Result<(), DbError> {
    conn.execute(
        "UPDATE hub_link SET applied = 0, journal_applied = 0, hub_writer = ?1
         WHERE id = 1 AND (hub_writer IS NULL OR hub_writer <> ?1)",
        [peer.to_string()],
    )?;
    Ok(())
}

/// Merges the hub's entries durably and records `delta.upto` as applied, in one transaction.
pub async fn apply_delta(db: &Db, peer: WriterId, delta: Delta) -> Result<(), DbError> {
    db.write(move |conn| {
        adopt_hub(conn, &peer)?;
        let mut touched = std::collections::BTreeSet::new();
        let mut seq = db::next_seq(conn)?;
        for (sku, writer, incoming) in delta.entries() {
            incoming.check(writer)?;
            let current = db::entry(conn, sku, writer)?.unwrap_or_default();
            if !current.covers(incoming) {
                db::put_entry(conn, sku, writer, current.join(incoming), seq)?;
                seq += 1;
                touched.insert(sku.clone());
            }
        }
        for sku in &touched {
            db::refresh_stock(conn, sku)?;
        }
        let now = jiff::Timestamp::now().as_millisecond();
        conn.execute(
            "UPDATE hub_link SET applied = MAX(applied, ?1), last_sync_ms = ?2 WHERE id = 1",
            params![delta.upto, now],
        )?;
        Ok(())
    })
    .await
}

/// Maps one journal row (selected by column name) to an event.
pub fn event_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<JournalEvent, DbError>> {
    let id: Vec<u8> = r.get("id")?;
    let kind: String = r.get("kind")?;
    let store: String = r.get("store")?;
    let sku: String = r.get("sku")?;
    let writer: String = r.get("writer")?;
    let flags: u32 = r.get("flags")?;
    let line: u32 = r.get("line")?;
    let delta: i64 = r.get("delta")?;
    let reason: Option<String> = r.get("reason")?;
    let occurred_at_ms: i64 = r.get("occurred_at_ms")?;
    let recorded_at_ms: i64 = r.get("recorded_at_ms")?;
    Ok((|| {
        Ok(JournalEvent {
            id: Uuid::from_slice(&id).map_err(|e| DbError::Corrupt(format!("journal id: {e}")))?,
            line,
            kind: EventKind::parse(&kind).ok_or_else(|| DbError::Corrupt(format!("journal kind {kind:?}")))?,
            store: store.parse().map_err(|e| DbError::Corrupt(format!("journal store: {e}")))?,
            sku: db::sku_col(sku)?,
            delta,
            reason,
            occurred_at_ms,
            recorded_at_ms,
            writer: db::writer_col(writer)?,
            flags: EventFlag::from_bits(flags),
        })
    })())
}

/// This store's own journal events above `after`.
pub async fn read_journal(db: &Db, after: u64, limit: usize) -> Result<JournalRead, DbError> {
    let prefix = own_prefix(&db.identity().store);
    db.read(move |conn| {
        let tx = conn.unchecked_transaction()?;
        let mut stmt = tx.prepare_cached(
            "SELECT seq, id, line, kind, store, sku, delta, reason, occurred_at_ms, recorded_at_ms, writer, flags
             FROM journal WHERE seq > ?1 AND substr(writer, 1, ?2) = ?3 ORDER BY seq LIMIT ?4",
        )?;
        let mut rows = stmt.query(params![after, prefix.len() as i64, prefix, limit as i64])?;
        let mut events = Vec::new();
        let mut last = after;
        while let Some(r) = rows.next()? {
            last = r.get("seq")?;
            events.push(event_from_row(r)??);
        }
        drop(rows);
        drop(stmt);
        let upto = if events.len() == limit { last } else { db::heads(&tx)?.journal.max(after) };
        tx.finish()?;
        Ok(JournalRead { upto, events })
    })
    .await
}

/// Stores the hub's journal events (grow-only by id and line) and records `batch.upto`.
pub async fn apply_journal(db: &Db, peer: WriterId, batch: JournalBatch) -> Result<(), DbError> {
    let store = db.identity().store.clone();
    db.write(move |conn| {
        adopt_hub(conn, &peer)?;
        for e in &batch.events {
            if e.store != store {
                return Err(DbError::Corrupt(format!("hub sent journal event {} of store {}", e.id, e.store)));
            }
            insert_event(conn, e)?;
        }
        conn.execute("UPDATE hub_link SET journal_applied = MAX(journal_applied, ?1) WHERE id = 1", [batch.upto])?;
        Ok(())
    })
    .await
}

/// Inserts one journal event unless an event with the same id and line exists; returns whether
/// it was new.
pub fn insert_event(conn: &Connection, e: &JournalEvent) -> Result<bool, DbError> {
    conn.prepare_cached(
        "INSERT OR IGNORE INTO journal (id, line, kind, store, sku, delta, reason, occurred_at_ms, recorded_at_ms, writer, flags)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
    )?
    .execute(params![
        e.id.as_bytes().as_slice(),
        e.line,
        e.kind.as_str(),
        e.store.as_str(),
        e.sku.as_str(),
        e.delta,
        e.reason,
        e.occurred_at_ms,
        e.recorded_at_ms,
        e.writer.to_string(),
        EventFlag::to_bits(&e.flags),
    ])?;
    Ok(conn.changes() > 0)
}

/// The hub durably holds our counter entries up to `upto`.
pub async fn set_acked(db: &Db, upto: u64) -> Result<(), DbError> {
    let now = jiff::Timestamp::now().as_millisecond();
    db.write(move |conn| {
        conn.execute("UPDATE hub_link SET acked = ?1, last_sync_ms = ?2 WHERE id = 1", params![upto, now])?;
        Ok(())
    })
    .await
}

/// The hub durably holds our journal up to `upto`.
pub async fn set_journal_acked(db: &Db, upto: u64) -> Result<(), DbError> {
    db.write(move |conn| {
        conn.execute("UPDATE hub_link SET journal_acked = ?1 WHERE id = 1", [upto])?;
        Ok(())
    })
    .await
}

/// Digest of every counter entry here (all writers: this is the store's whole state) and the head
/// it was taken at.
pub async fn digest(db: &Db) -> Result<(StateDigest, u64), DbError> {
    db.read(|conn| {
        let tx = conn.unchecked_transaction()?;
        let mut d = StateDigest::default();
        {
            let mut stmt = tx.prepare_cached("SELECT sku, writer, p, n FROM counters")?;
            let mut rows = stmt.query([])?;
            while let Some(r) = rows.next()? {
                let sku = db::sku_col(r.get(0)?)?;
                let writer = db::writer_col(r.get(1)?)?;
                d.add(&sku, &writer, shelfsync_shared::PnEntry { p: r.get(2)?, n: r.get(3)? });
            }
        }
        let head = db::heads(&tx)?.counter;
        tx.finish()?;
        Ok((d, head))
    })
    .await
}
