//! The `journal` table's row codec, the same in the agent's and the hub's databases: one
//! [`JournalEvent`] per row, grow-only by id and line.

use rusqlite::{params, Connection};
use shelfsync_shared::{EventFlag, EventKind, JournalEvent};
use uuid::Uuid;

use crate::db::{self, DbError};

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
