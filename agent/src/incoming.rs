//! Transfers on their way to this store: the hub's snapshot of what other stores shipped here
//! and nobody received yet. The POS sees them as `incoming` (never part of `on_hand` or
//! `sellable`: the units are on a truck); receiving happens at head office, whose counter
//! change then arrives with the next delta and the transfer leaves the next snapshot.

use rusqlite::{params, Connection};
use serde::{Deserialize, Serialize};
use shelfsync_shared::wire::IncomingSnapshot;
use shelfsync_shared::{rfc3339, Sku, StoreId};
use uuid::Uuid;

use crate::db::{self, Db, DbError};

/// Schema of incoming transfers (migration 6 of the agent database).
pub const MIGRATION: &str = "CREATE TABLE incoming (
        id BLOB NOT NULL, line INTEGER NOT NULL, from_store TEXT NOT NULL, sku TEXT NOT NULL,
        qty INTEGER NOT NULL, shipped_at_ms INTEGER NOT NULL,
        PRIMARY KEY (id, line)) WITHOUT ROWID;
     CREATE INDEX incoming_sku ON incoming(sku);
     ALTER TABLE hub_link ADD COLUMN incoming_version INTEGER NOT NULL DEFAULT 0;";

/// Units of `sku` on their way to this store.
pub fn incoming(conn: &Connection, sku: &Sku) -> Result<u64, DbError> {
    let v: Option<u64> =
        conn.prepare_cached("SELECT SUM(qty) FROM incoming WHERE sku = ?1")?.query_row([sku.as_str()], |r| r.get(0))?;
    Ok(v.unwrap_or(0))
}

/// One SKU of a transfer on its way.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncomingLineView {
    /// What.
    pub sku: Sku,
    /// Units shipped.
    pub qty: u64,
}

/// A transfer on its way, as the POS sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncomingView {
    /// The transfer id (head office receives it by this id).
    pub id: Uuid,
    /// The store that shipped it.
    pub from: StoreId,
    /// What is on its way.
    pub lines: Vec<IncomingLineView>,
    /// When it was shipped (RFC 3339).
    pub shipped_at: String,
}

/// Every transfer on its way here, oldest first.
pub async fn list(db: &Db) -> Result<Vec<IncomingView>, DbError> {
    db.read(|conn| {
        let mut stmt = conn.prepare_cached(
            "SELECT id, from_store, sku, qty, shipped_at_ms FROM incoming ORDER BY shipped_at_ms, id, line",
        )?;
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?, r.get(3)?, r.get(4)?))
            })?
            .collect::<Result<Vec<(Vec<u8>, String, String, u64, i64)>, _>>()?;
        let mut out: Vec<IncomingView> = Vec::new();
        for (id, from, sku, qty, at) in rows {
            let id = Uuid::from_slice(&id).map_err(|e| DbError::Corrupt(format!("incoming transfer id: {e}")))?;
            let line = IncomingLineView { sku: db::sku_col(sku)?, qty };
            match out.last_mut() {
                Some(v) if v.id == id => v.lines.push(line),
                _ => {
                    let from = from.parse().map_err(|e| DbError::Corrupt(format!("incoming from {from:?}: {e}")))?;
                    out.push(IncomingView { id, from, lines: vec![line], shipped_at: rfc3339(at) });
                }
            }
        }
        Ok(out)
    })
    .await
}

/// Replaces the transfers on their way here with the hub's snapshot (snapshots arrive in order
/// on the state stream, and a new connection always brings a fresh one, as for holds).
pub async fn apply_snapshot(db: &Db, snapshot: IncomingSnapshot) -> Result<(), DbError> {
    db.write(move |conn| {
        conn.prepare_cached("DELETE FROM incoming")?.execute([])?;
        for t in &snapshot.transfers {
            for (i, l) in t.lines.iter().enumerate() {
                conn.prepare_cached(
                    "INSERT OR REPLACE INTO incoming (id, line, from_store, sku, qty, shipped_at_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )?
                .execute(params![
                    t.id.as_bytes().as_slice(),
                    i as i64,
                    t.from.as_str(),
                    l.sku.as_str(),
                    l.qty,
                    t.shipped_at_ms
                ])?;
            }
        }
        conn.prepare_cached("UPDATE hub_link SET incoming_version = ?1 WHERE id = 1")?.execute([snapshot.version])?;
        Ok(())
    })
    .await
}
