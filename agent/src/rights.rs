//! Escrow rights at the store (`hub/docs/escrow.md`, `shelfsync_shared::rights`): while connected
//! and the hub runs escrow, the store grants online the right to some of its units; the POS sells
//! only the rest (`sellable`), a sale beyond it is still recorded but flagged
//! `escrow_overdraft`; fulfilling an online hold consumes the rights its units carried.
//!
//! Entries are grow-only totals per (SKU, writer, kind), kept in `rights`. The store's own
//! writers' granted and consumed entries take a place in the counter sequence (`seq`), so they
//! ride the same deltas, acks and resends as counter entries; entries learnt from the hub (its
//! returns, and this store's own of earlier lives) have `seq` 0 and are never sent back.

use rusqlite::{params, Connection};
use shelfsync_node::catalog::escrow_rule;
use shelfsync_shared::wire::RightsSnapshot;
use shelfsync_shared::{EscrowPolicy, EscrowRule, Rights, RightsKind, Sku, StoreId, WriterId};

use crate::db::{self, Db, DbError, Identity};

/// Migration 7: the rights and the policy the hub last told.
pub const MIGRATION: &str = "
    CREATE TABLE rights (
        sku TEXT NOT NULL, writer TEXT NOT NULL, kind TEXT NOT NULL,
        total INTEGER NOT NULL CHECK (total >= 0), seq INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (sku, writer, kind)) WITHOUT ROWID;
    CREATE INDEX rights_seq ON rights(seq) WHERE seq > 0;
    CREATE TABLE escrow (id INTEGER PRIMARY KEY CHECK (id = 1), policy TEXT);
    INSERT INTO escrow (id, policy) VALUES (1, NULL);";

pub(crate) fn kind_of(s: &str) -> Result<RightsKind, DbError> {
    RightsKind::parse(s).ok_or_else(|| DbError::Corrupt(format!("rights kind {s:?}")))
}

/// The escrow policy the hub last told (`None`: escrow is off).
pub fn policy(conn: &Connection) -> Result<Option<EscrowPolicy>, DbError> {
    let raw: Option<String> =
        conn.prepare_cached("SELECT policy FROM escrow WHERE id = 1")?.query_row([], |r| r.get(0))?;
    raw.map(|p| serde_json::from_str(&p).map_err(|e| DbError::Corrupt(format!("escrow policy: {e}")))).transpose()
}

/// A SKU's rights as this store knows them.
pub fn rights_of(conn: &Connection, store: &StoreId, sku: &Sku) -> Result<Rights, DbError> {
    let mut r = Rights::default();
    let mut stmt = conn.prepare_cached("SELECT writer, kind, total FROM rights WHERE sku = ?1")?;
    let mut rows = stmt.query([sku.as_str()])?;
    while let Some(row) = rows.next()? {
        let (w, k): (String, String) = (row.get(0)?, row.get(1)?);
        r.merge_entry(store, &db::writer_col(w)?, kind_of(&k)?, row.get(2)?)
            .map_err(|e| DbError::Corrupt(format!("rights of {sku}: {e}")))?;
    }
    Ok(r)
}

/// Sets an entry to `total` if that is more than it holds; `seq`: the place in the counter
/// sequence (0: learnt from the hub, never sent). Returns whether it grew.
fn raise(conn: &Connection, sku: &Sku, w: &WriterId, k: RightsKind, total: u64, seq: u64) -> Result<bool, DbError> {
    let n = conn
        .prepare_cached(
            "INSERT INTO rights (sku, writer, kind, total, seq) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (sku, writer, kind) DO UPDATE SET total = excluded.total,
                 seq = CASE WHEN excluded.seq > 0 THEN excluded.seq ELSE rights.seq END
             WHERE excluded.total > rights.total",
        )?
        .execute(params![sku.as_str(), w.to_string(), k.as_str(), total, seq])?;
    Ok(n > 0)
}

/// What a SKU's figures are with escrow: units online holds the rights to (as this store knows:
/// never less than the truth), and the store's own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Escrowed {
    /// Online's rights (`granted − returned − consumed`), at least 0.
    pub granted: u64,
    /// The store's own rights (`on_hand − granted`; negative after an overdraft).
    pub own: i64,
}

impl Escrowed {
    /// The figures of `rights` for a SKU with `on_hand`.
    pub fn of(rights: &Rights, on_hand: i64) -> Escrowed {
        Escrowed { granted: u64::try_from(rights.online()).unwrap_or(0), own: rights.own(on_hand) }
    }
}

/// A SKU's rights when escrow concerns it (`None`: escrow is off and nothing was granted).
pub fn escrow_of(conn: &Connection, store: &StoreId, sku: &Sku) -> Result<Option<Rights>, DbError> {
    let r = rights_of(conn, store, sku)?;
    if r.entries().next().is_none() && policy(conn)?.is_none() {
        return Ok(None);
    }
    Ok(Some(r))
}

/// A SKU's escrow figures given its `on_hand` (`None`: escrow is off and nothing was granted).
pub fn escrowed(conn: &Connection, store: &StoreId, sku: &Sku, on_hand: i64) -> Result<Option<Escrowed>, DbError> {
    Ok(escrow_of(conn, store, sku)?.map(|r| Escrowed::of(&r, on_hand)))
}

/// Grants what the policy in force asks of every SKU with units (only while connected: the
/// callers are the live sync session's writes). The policy of a SKU is the chain's (from the hub)
/// under the catalog's rule for the SKU under this store's override, as the replicas have them.
/// Returns the units granted per SKU.
pub fn grant_due(conn: &Connection, me: &Identity) -> Result<Vec<(Sku, u64)>, DbError> {
    let Some(chain) = policy(conn)? else { return Ok(Vec::new()) };
    let candidates: Vec<(String, i64, EscrowRule, EscrowRule)> = conn
        .prepare_cached(
            "SELECT s.sku, s.on_hand, i.escrow_share_pct, i.escrow_max, i.escrow_keep,
                    o.escrow_share_pct, o.escrow_max, o.escrow_keep
             FROM stock s
             LEFT JOIN catalog_items i ON i.sku = s.sku
             LEFT JOIN catalog_overrides o ON o.store = ?1 AND o.sku = s.sku
             WHERE s.on_hand > 0 ORDER BY s.sku",
        )?
        .query_map([me.store.as_str()], |r| {
            let item = escrow_rule([r.get(2)?, r.get(3)?, r.get(4)?]);
            Ok((r.get(0)?, r.get(1)?, item, escrow_rule([r.get(5)?, r.get(6)?, r.get(7)?])))
        })?
        .collect::<Result<_, _>>()?;
    let mut granted = Vec::new();
    for (sku, on_hand, item, own) in candidates {
        let policy = chain.effective(&item, &own);
        if on_hand <= policy.keep as i64 {
            continue;
        }
        let sku = db::sku_col(sku)?;
        let mut r = rights_of(conn, &me.store, &sku)?;
        let held = crate::holds::held(conn, &sku)?;
        let q = policy.grant_wanted(&r, on_hand, held);
        if q == 0 {
            continue;
        }
        let total = r
            .grant(&me.store, &me.writer, on_hand, policy.keep, q)
            .map_err(|e| DbError::Corrupt(format!("granting {q} of {sku}: {e}")))?;
        raise(conn, &sku, &me.writer, RightsKind::Granted, total, db::next_seq(conn)?)?;
        granted.push((sku, q));
    }
    if !granted.is_empty() {
        tracing::debug!(
            skus = granted.len(),
            units = granted.iter().map(|g| g.1).sum::<u64>(),
            "granted online rights"
        );
    }
    Ok(granted)
}

/// A fulfilment of `qty` units of an online hold: the rights they carried leave with them (at
/// most what online holds here, as this store knows it). Call before the counter change, so the
/// consumption reaches the hub no later than the sale it explains.
pub fn consume(conn: &Connection, me: &Identity, sku: &Sku, qty: u64) -> Result<u64, DbError> {
    if policy(conn)?.is_none() {
        return Ok(0);
    }
    let mut r = rights_of(conn, &me.store, sku)?;
    let q = qty.min(u64::try_from(r.online()).unwrap_or(0));
    if q == 0 {
        return Ok(0);
    }
    let total = r.consume(&me.store, &me.writer, q).map_err(|e| DbError::Corrupt(format!("consuming {sku}: {e}")))?;
    raise(conn, sku, &me.writer, RightsKind::Consumed, total, db::next_seq(conn)?)?;
    Ok(q)
}

/// Merges the hub's view of the store's rights, keeps its policy, and grants what is due.
pub async fn apply_snapshot(db: &Db, snapshot: RightsSnapshot) -> Result<(), DbError> {
    let current = db.current();
    db.write(move |conn| {
        let me = current.get();
        let policy = snapshot.escrow.map(|p| serde_json::to_string(&p).expect("policies serialise"));
        conn.prepare_cached("UPDATE escrow SET policy = ?1 WHERE id = 1")?.execute([policy])?;
        for (sku, w, k, total) in snapshot.entries() {
            if !k.authored_by(&me.store, w) {
                tracing::warn!(%sku, writer = %w, ?k, "the hub sent a rights entry of another store's writer; ignored");
                continue;
            }
            raise(conn, sku, w, k, total, 0)?;
        }
        grant_due(conn, &me)?;
        Ok(())
    })
    .await
}
