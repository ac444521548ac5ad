//! Online holds at the store: the hub's snapshot of units promised to online reservations here,
//! and their fulfilment (the store picks the units: a `fulfilment` event lowers `on_hand`, and the
//! next delta tells the hub which holds it closes).

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use shelfsync_shared::wire::{HoldStatus, HoldsSnapshot};
use shelfsync_shared::{EventFlag, EventKind, Sku, StockFigures};
use uuid::Uuid;

use crate::db::{self, Db, DbError};
use crate::ledger::{LedgerError, Outcome};
use shelfsync_shared::rfc3339;

/// Schema of holds (migration 2 of the agent database).
pub const MIGRATION: &str = "CREATE TABLE holds (
        id BLOB PRIMARY KEY, reservation BLOB NOT NULL, sku TEXT NOT NULL, qty INTEGER NOT NULL,
        status TEXT NOT NULL, expires_at_ms INTEGER,
        fulfilled_at_ms INTEGER, fulfilled_seq INTEGER) WITHOUT ROWID;
     CREATE INDEX holds_sku ON holds(sku);
     CREATE INDEX holds_fulfilled ON holds(fulfilled_seq);
     ALTER TABLE hub_link ADD COLUMN holds_version INTEGER NOT NULL DEFAULT 0;";

/// Units of `sku` promised online and not yet picked.
pub fn held(conn: &Connection, sku: &Sku) -> Result<u64, DbError> {
    let v: Option<u64> = conn
        .prepare_cached("SELECT SUM(qty) FROM holds WHERE sku = ?1 AND fulfilled_at_ms IS NULL")?
        .query_row([sku.as_str()], |r| r.get(0))?;
    Ok(v.unwrap_or(0))
}

/// One hold as the POS sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldView {
    /// Fulfil by this id.
    pub id: Uuid,
    /// The online reservation.
    pub reservation: Uuid,
    /// What.
    pub sku: Sku,
    /// How many.
    pub qty: u64,
    /// `held` (unpaid) or `committed` (paid).
    pub status: String,
    /// When an unpaid hold lapses.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// When the store picked it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fulfilled_at: Option<String>,
}

fn hold_row(
    r: &rusqlite::Row<'_>,
) -> rusqlite::Result<(Vec<u8>, Vec<u8>, String, u64, String, Option<i64>, Option<i64>)> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?))
}

fn to_view(row: (Vec<u8>, Vec<u8>, String, u64, String, Option<i64>, Option<i64>)) -> Result<HoldView, DbError> {
    let (id, reservation, sku, qty, status, expires, fulfilled) = row;
    let uuid = |b: &[u8]| Uuid::from_slice(b).map_err(|e| DbError::Corrupt(format!("hold id: {e}")));
    Ok(HoldView {
        id: uuid(&id)?,
        reservation: uuid(&reservation)?,
        sku: db::sku_col(sku)?,
        qty,
        status,
        expires_at: expires.map(rfc3339),
        fulfilled_at: fulfilled.map(rfc3339),
    })
}

const SELECT: &str = "SELECT id, reservation, sku, qty, status, expires_at_ms, fulfilled_at_ms FROM holds";

/// Open holds of one SKU, newest reservations last.
pub fn open_for(conn: &Connection, sku: &Sku) -> Result<Vec<HoldView>, DbError> {
    let mut stmt = conn.prepare_cached(&format!("{SELECT} WHERE sku = ?1 AND fulfilled_at_ms IS NULL ORDER BY id"))?;
    let rows = stmt.query_map([sku.as_str()], hold_row)?.collect::<Result<Vec<_>, _>>()?;
    rows.into_iter().map(to_view).collect()
}

/// Every hold the store knows: open ones and those picked but not yet acknowledged by the hub.
pub async fn list(db: &Db) -> Result<Vec<HoldView>, DbError> {
    db.read(|conn| {
        let mut stmt = conn.prepare_cached(&format!("{SELECT} ORDER BY sku, id"))?;
        let rows = stmt.query_map([], hold_row)?.collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(to_view).collect()
    })
    .await
}

/// Holds fulfilled with their counter change in `(after, upto]`.
pub fn fulfilled_between(conn: &Connection, after: u64, upto: u64) -> Result<Vec<Uuid>, DbError> {
    let mut stmt = conn.prepare_cached(
        "SELECT id FROM holds WHERE fulfilled_seq > ?1 AND fulfilled_seq <= ?2 ORDER BY fulfilled_seq",
    )?;
    let rows = stmt.query_map(params![after, upto], |r| r.get::<_, Vec<u8>>(0))?.collect::<Result<Vec<_>, _>>()?;
    rows.iter().map(|b| Uuid::from_slice(b).map_err(|e| DbError::Corrupt(format!("hold id: {e}")))).collect()
}

/// Replaces the store's holds with the hub's snapshot, keeping holds picked here whose pick the
/// hub has not acknowledged yet.
pub async fn apply_snapshot(db: &Db, snapshot: HoldsSnapshot) -> Result<(), DbError> {
    db.write(move |conn| {
        let acked: u64 = conn.query_row("SELECT acked FROM hub_link WHERE id = 1", [], |r| r.get(0))?;
        // Picked holds stay until the hub has the pick.
        conn.prepare_cached("DELETE FROM holds WHERE fulfilled_at_ms IS NOT NULL AND fulfilled_seq <= ?1")?
            .execute([acked])?;
        // Snapshots repeat most of the previous one: write only what changed.
        type Row = (u64, String, Option<i64>);
        let mut open: std::collections::HashMap<Vec<u8>, Row> = conn
            .prepare_cached("SELECT id, qty, status, expires_at_ms FROM holds WHERE fulfilled_at_ms IS NULL")?
            .query_map([], |r| Ok((r.get::<_, Vec<u8>>(0)?, (r.get(1)?, r.get(2)?, r.get(3)?))))?
            .collect::<Result<_, _>>()?;
        for h in &snapshot.holds {
            let row: Row = (h.qty, h.status.as_str().to_owned(), h.expires_at_ms);
            match open.remove(h.id.as_bytes().as_slice()) {
                Some(old) if old == row => {}
                Some(_) => {
                    conn.prepare_cached("UPDATE holds SET qty = ?2, status = ?3, expires_at_ms = ?4 WHERE id = ?1")?
                        .execute(params![h.id.as_bytes().as_slice(), row.0, row.1, row.2])?;
                }
                None => {
                    conn.prepare_cached(
                        "INSERT INTO holds (id, reservation, sku, qty, status, expires_at_ms)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (id) DO NOTHING",
                    )?
                    .execute(params![
                        h.id.as_bytes().as_slice(),
                        h.reservation.as_bytes().as_slice(),
                        h.sku.as_str(),
                        h.qty,
                        h.status.as_str(),
                        h.expires_at_ms
                    ])?;
                }
            }
        }
        // Open holds the hub no longer lists are gone (released, expired, moved).
        for id in open.keys() {
            conn.prepare_cached("DELETE FROM holds WHERE id = ?1 AND fulfilled_at_ms IS NULL")?.execute([id])?;
        }
        conn.prepare_cached("UPDATE hub_link SET holds_version = ?1 WHERE id = 1")?.execute([snapshot.version])?;
        Ok(())
    })
    .await
}

/// What `POST /v1/holds/{id}/fulfil` answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FulfilResponse {
    /// The hold.
    pub hold: HoldView,
    /// `on_hand` after the pick.
    pub on_hand: i64,
    /// Units still held for other orders.
    pub held: u64,
    /// `on_hand − held`.
    pub sellable: i64,
}

/// The store picked a hold's units: records a `fulfilment` event (idempotent by hold id) that
/// lowers `on_hand` and marks the hold so the next delta closes it at the hub.
pub async fn fulfil(db: &Db, id: Uuid) -> Result<Option<(Outcome, FulfilResponse)>, LedgerError> {
    let current = db.current();
    let now = shelfsync_node::now_ms();
    db.write(move |conn| {
        let me = current.get();
        let row = conn
            .prepare_cached(&format!("{SELECT} WHERE id = ?1"))?
            .query_row([id.as_bytes().as_slice()], hold_row)
            .optional()?;
        let Some(row) = row else { return Ok(None) };
        let already = row.6.is_some();
        let hold = to_view(row)?;
        let outcome = if already {
            Outcome::Replayed
        } else {
            if HoldStatus::parse(&hold.status).is_none() {
                return Err(LedgerError::Invalid(format!("hold {id} is {}; it cannot be fulfilled", hold.status)));
            }
            let delta = -(hold.qty as i64);
            // The rights the units carried leave with them, no later than the sale.
            crate::rights::consume(conn, &me, &hold.sku, hold.qty)?;
            let entry = db::entry(conn, &hold.sku, &me.writer)?.unwrap_or_default().apply(&me.writer, delta)?;
            let seq = db::next_seq(conn)?;
            db::put_entry(conn, &hold.sku, &me.writer, entry, seq)?;
            let on_hand = db::refresh_stock(conn, &hold.sku)?;
            conn.execute(
                "UPDATE holds SET fulfilled_at_ms = ?2, fulfilled_seq = ?3 WHERE id = ?1",
                params![id.as_bytes().as_slice(), now, seq],
            )?;
            let flags = if on_hand < 0 { vec![EventFlag::NegativeStock] } else { vec![] };
            let event = shelfsync_shared::JournalEvent {
                id,
                line: 0,
                kind: EventKind::Fulfilment,
                store: me.store.clone(),
                sku: hold.sku.clone(),
                delta,
                reason: Some(format!("online reservation {}", hold.reservation)),
                occurred_at_ms: now,
                recorded_at_ms: now,
                writer: me.writer.clone(),
                flags,
            };
            crate::replica::insert_own_event(conn, &event)?;
            crate::counts::settle_line(conn, &me, &event, now)?;
            Outcome::Created
        };
        let hold = to_view(
            conn.prepare_cached(&format!("{SELECT} WHERE id = ?1"))?.query_row([id.as_bytes().as_slice()], hold_row)?,
        )?;
        let on_hand = db::on_hand(conn, &hold.sku)?.unwrap_or(0);
        let f = StockFigures { on_hand, held: held(conn, &hold.sku)?, safety_stock: 0 };
        Ok(Some((outcome, FulfilResponse { hold, on_hand, held: f.held, sellable: f.sellable() })))
    })
    .await
}
