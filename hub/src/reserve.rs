//! Online reservations against store stock, as SQL inside the storage transaction: sourcing,
//! the lease lifecycle, holds snapshots for the stores, oversell reconciliation, conflicts,
//! staleness-aware availability and the gap-free change feed.
//!
//! Every decision (is there enough? which stores?) is taken inside the write transaction that
//! records it, so two reservations can never both take the last unit: the storage's single writer
//! is the serialisation point, and group commit gives many decisions one fsync.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use shelfsync_shared::rfc3339;
use shelfsync_shared::wire::{Hold, HoldStatus, HoldsSnapshot, HOLDS_MAX};
use shelfsync_shared::{Sku, StoreId};
use uuid::Uuid;

pub use shelfsync_hub_core::{Action, ReservationRequest, Staleness, StoreFigures};

use crate::storage::{StorageError, StorageResult};

/// Schema (migration 2 of the hub database).
pub const MIGRATION: &str = "
     CREATE TABLE reservations (
        id BLOB PRIMARY KEY, status TEXT NOT NULL, pickup_store TEXT, customer TEXT,
        created_at_ms INTEGER NOT NULL, expires_at_ms INTEGER, updated_at_ms INTEGER NOT NULL,
        fingerprint BLOB NOT NULL, first_response TEXT NOT NULL) WITHOUT ROWID;
     CREATE INDEX reservations_expiry ON reservations(status, expires_at_ms);
     CREATE TABLE reservation_lines (
        reservation BLOB NOT NULL, line INTEGER NOT NULL, sku TEXT NOT NULL, qty INTEGER NOT NULL,
        PRIMARY KEY (reservation, line)) WITHOUT ROWID;
     CREATE TABLE allocations (
        id BLOB PRIMARY KEY, reservation BLOB NOT NULL, line INTEGER NOT NULL,
        store TEXT NOT NULL, sku TEXT NOT NULL, qty INTEGER NOT NULL CHECK (qty > 0),
        status TEXT NOT NULL, created_seq INTEGER NOT NULL, updated_at_ms INTEGER NOT NULL) WITHOUT ROWID;
     CREATE INDEX allocations_open ON allocations(store, sku, status);
     CREATE INDEX allocations_reservation ON allocations(reservation, line);
     CREATE INDEX allocations_seq ON allocations(created_seq);
     CREATE TABLE held_totals (
        store TEXT NOT NULL, sku TEXT NOT NULL, qty INTEGER NOT NULL CHECK (qty >= 0),
        PRIMARY KEY (store, sku)) WITHOUT ROWID;
     CREATE TABLE store_holds (store TEXT PRIMARY KEY, version INTEGER NOT NULL) WITHOUT ROWID;
     CREATE TABLE conflicts (
        id BLOB PRIMARY KEY, kind TEXT NOT NULL, store TEXT NOT NULL, sku TEXT NOT NULL,
        shortfall INTEGER NOT NULL, reservations TEXT NOT NULL, resolution TEXT NOT NULL,
        status TEXT NOT NULL, detected_at_ms INTEGER NOT NULL, resolved_at_ms INTEGER) WITHOUT ROWID;
     CREATE INDEX conflicts_find ON conflicts(store, sku, kind, status);
     CREATE TABLE changes (
        cursor INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, at_ms INTEGER NOT NULL, data TEXT NOT NULL);
     CREATE TABLE velocity (
        store TEXT NOT NULL, sku TEXT NOT NULL, score REAL NOT NULL, updated_at_ms INTEGER NOT NULL,
        PRIMARY KEY (store, sku)) WITHOUT ROWID;
     CREATE TABLE stock_alerts (
        store TEXT NOT NULL, sku TEXT NOT NULL, state TEXT NOT NULL, PRIMARY KEY (store, sku)) WITHOUT ROWID;
     CREATE TABLE webhook_cursors (url TEXT PRIMARY KEY, cursor INTEGER NOT NULL) WITHOUT ROWID;
     CREATE TABLE action_requests (
        key TEXT PRIMARY KEY, fingerprint BLOB NOT NULL, response TEXT NOT NULL) WITHOUT ROWID;";

/// Longest TTL of a reservation lease.
pub const TTL_SECS_MAX: u64 = 7 * 24 * 3600;
/// Default lease.
pub const TTL_SECS_DEFAULT: u64 = 900;
/// Longest customer reference.
pub const CUSTOMER_MAX_LEN: usize = 128;

/// What the caller knows that storage does not: the time and which stores are connected now.
#[derive(Clone, Debug, Default)]
pub struct Now {
    /// Milliseconds since the epoch.
    pub ms: i64,
    /// Stores with a live sync connection (they are not silent).
    pub connected: HashSet<StoreId>,
}

fn store_col(s: String) -> StorageResult<StoreId> {
    s.parse().map_err(|e| StorageError::Corrupt(format!("store id in database: {e}")))
}

fn sku_col(s: String) -> StorageResult<Sku> {
    s.parse().map_err(|e| StorageError::Corrupt(format!("sku in database: {e}")))
}

fn uuid_col(b: &[u8]) -> StorageResult<Uuid> {
    Uuid::from_slice(b).map_err(|e| StorageError::Corrupt(format!("uuid in database: {e}")))
}

/// Units of `sku` at `store` promised to open reservations. Kept as a running total (changed with
/// every allocation that opens, shrinks or closes) so a hot SKU with thousands of open holds
/// costs one row read, not a scan.
pub fn held(conn: &Connection, store: &StoreId, sku: &Sku) -> StorageResult<u64> {
    let v: Option<u64> = conn
        .prepare_cached("SELECT qty FROM held_totals WHERE store = ?1 AND sku = ?2")?
        .query_row(params![store.as_str(), sku.as_str()], |r| r.get(0))
        .optional()?;
    Ok(v.unwrap_or(0))
}

fn adjust_held(conn: &Connection, store: &StoreId, sku: &Sku, delta: i64) -> StorageResult<()> {
    if delta >= 0 {
        conn.prepare_cached(
            "INSERT INTO held_totals (store, sku, qty) VALUES (?1, ?2, ?3)
             ON CONFLICT (store, sku) DO UPDATE SET qty = qty + excluded.qty",
        )?
        .execute(params![store.as_str(), sku.as_str(), delta])?;
    } else {
        // The CHECK (qty >= 0) catches any bookkeeping slip instead of letting it go negative.
        let n = conn
            .prepare_cached("UPDATE held_totals SET qty = qty + ?3 WHERE store = ?1 AND sku = ?2")?
            .execute(params![store.as_str(), sku.as_str(), delta])?;
        if n == 0 {
            return Err(StorageError::Corrupt(format!("no held total for {store}/{sku} to lower")));
        }
    }
    Ok(())
}

fn is_open(status: &str) -> bool {
    status == "held" || status == "committed"
}

/// Figures of `sku` at every (unrevoked) store that has a counter for it.
pub fn figures(conn: &Connection, sku: &Sku, now: &Now, st: Staleness) -> StorageResult<Vec<StoreFigures>> {
    let mut stmt = conn.prepare_cached(
        "SELECT s.store, s.on_hand, st.last_seen_ms, v.score, v.updated_at_ms,
                COALESCE(h.qty, 0), COALESCE(co.safety_stock, ci.safety_stock, 0), COALESCE(ci.active, 1)
         FROM stock s JOIN stores st ON st.id = s.store
         LEFT JOIN velocity v ON v.store = s.store AND v.sku = s.sku
         LEFT JOIN held_totals h ON h.store = s.store AND h.sku = s.sku
         LEFT JOIN catalog_items ci ON ci.sku = s.sku
         LEFT JOIN catalog_overrides co ON co.store = s.store AND co.sku = s.sku
         WHERE s.sku = ?1 AND st.revoked_at_ms IS NULL ORDER BY s.store",
    )?;
    let rows = stmt
        .query_map([sku.as_str()], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, Option<i64>>(2)?,
                r.get::<_, Option<f64>>(3)?,
                r.get::<_, Option<i64>>(4)?,
                r.get::<_, u64>(5)?,
                r.get::<_, u64>(6)?,
                r.get::<_, bool>(7)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut out = Vec::with_capacity(rows.len());
    for (store, on_hand, last_seen_ms, score, _updated, held, safety_stock, active) in rows {
        let store = store_col(store)?;
        // An inactive SKU is not offered online at all.
        let raw = shelfsync_hub_core::available(on_hand, held, safety_stock, active);
        let silent_ms =
            if now.connected.contains(&store) { 0 } else { last_seen_ms.map_or(0, |t| (now.ms - t).max(0)) };
        // Units this store probably sold since it went dark: its recent rate × the silence.
        let discount = shelfsync_hub_core::staleness_discount(st, score.unwrap_or(0.0), silent_ms, raw);
        out.push(StoreFigures {
            store,
            on_hand,
            held,
            safety_stock,
            raw_available: raw,
            staleness_discount: discount,
            available: raw - discount,
            last_seen_ms,
            silent_ms,
        });
    }
    Ok(out)
}

/// Updates a store's sales-velocity estimate after `on_hand` moved from `old` to `new`.
pub fn record_velocity(
    conn: &Connection,
    store: &StoreId,
    sku: &Sku,
    old: i64,
    new: i64,
    now_ms: i64,
    tau_ms: i64,
) -> StorageResult<()> {
    if new >= old {
        return Ok(());
    }
    let sold = (old - new) as f64;
    let prev: Option<(f64, i64)> = conn
        .prepare_cached("SELECT score, updated_at_ms FROM velocity WHERE store = ?1 AND sku = ?2")?
        .query_row(params![store.as_str(), sku.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let score = match prev {
        Some((score, at)) => score * (-((now_ms - at).max(0) as f64) / tau_ms.max(1) as f64).exp() + sold,
        None => sold,
    };
    conn.prepare_cached(
        "INSERT INTO velocity (store, sku, score, updated_at_ms) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (store, sku) DO UPDATE SET score = excluded.score, updated_at_ms = excluded.updated_at_ms",
    )?
    .execute(params![store.as_str(), sku.as_str(), score, now_ms])?;
    Ok(())
}

/// Appends one event to the change feed (in the caller's transaction, so cursors are gap-free in
/// commit order).
pub fn emit(conn: &Connection, kind: &str, now_ms: i64, data: Value) -> StorageResult<()> {
    conn.prepare_cached("INSERT INTO changes (kind, at_ms, data) VALUES (?1, ?2, ?3)")?.execute(params![
        kind,
        now_ms,
        data.to_string()
    ])?;
    Ok(())
}

/// Emits `availability_changed` for `sku` at `store` with its current figures.
pub fn emit_availability(conn: &Connection, store: &StoreId, sku: &Sku, now_ms: i64) -> StorageResult<()> {
    let on_hand: i64 = conn
        .prepare_cached("SELECT on_hand FROM stock WHERE store = ?1 AND sku = ?2")?
        .query_row(params![store.as_str(), sku.as_str()], |r| r.get(0))
        .optional()?
        .unwrap_or(0);
    let held = held(conn, store, sku)?;
    let rule: Option<(u64, u64, bool)> = conn
        .prepare_cached(
            "SELECT COALESCE(co.safety_stock, ci.safety_stock), COALESCE(co.low_stock_threshold, ci.low_stock_threshold), ci.active
             FROM catalog_items ci LEFT JOIN catalog_overrides co ON co.store = ?1 AND co.sku = ci.sku WHERE ci.sku = ?2",
        )?
        .query_row(params![store.as_str(), sku.as_str()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    let (safety, threshold, active) = rule.unwrap_or((0, 0, true));
    let available = shelfsync_hub_core::available(on_hand, held, safety, active);
    emit(
        conn,
        "availability_changed",
        now_ms,
        json!({"store": store, "sku": sku, "on_hand": on_hand, "held": held, "safety_stock": safety, "available": available}),
    )?;
    if rule.is_some() {
        alert(conn, store, sku, available, threshold, now_ms)?;
    }
    Ok(())
}

/// Low-stock alerts, edge-triggered per (store, SKU): `low_stock` when available falls to the
/// threshold or below, `out_of_stock` when it reaches zero, `back_in_stock` when it leaves zero.
/// Each fires once per crossing, not on every change.
fn alert(
    conn: &Connection,
    store: &StoreId,
    sku: &Sku,
    available: u64,
    threshold: u64,
    now_ms: i64,
) -> StorageResult<()> {
    let state = if available == 0 {
        "out"
    } else if threshold > 0 && available <= threshold {
        "low"
    } else {
        "ok"
    };
    let before: String = conn
        .prepare_cached("SELECT state FROM stock_alerts WHERE store = ?1 AND sku = ?2")?
        .query_row(params![store.as_str(), sku.as_str()], |r| r.get(0))
        .optional()?
        .unwrap_or_else(|| "ok".into());
    if before == state {
        return Ok(());
    }
    conn.prepare_cached(
        "INSERT INTO stock_alerts (store, sku, state) VALUES (?1, ?2, ?3)
         ON CONFLICT (store, sku) DO UPDATE SET state = excluded.state",
    )?
    .execute(params![store.as_str(), sku.as_str(), state])?;
    let data = json!({"store": store, "sku": sku, "available": available, "low_stock_threshold": threshold});
    if before == "out" {
        emit(conn, "back_in_stock", now_ms, data.clone())?;
    }
    match (before.as_str(), state) {
        (_, "out") => emit(conn, "out_of_stock", now_ms, data)?,
        ("ok", "low") => emit(conn, "low_stock", now_ms, data)?,
        _ => {}
    }
    Ok(())
}

/// Records an `unknown_sku` conflict (a store sold something the catalog does not list, or lists
/// as inactive), once per (store, SKU) while open.
pub fn unknown_sku(conn: &Connection, store: &StoreId, sku: &Sku, why: &str, now_ms: i64) -> StorageResult<()> {
    if open_conflict(conn, store, sku, "unknown_sku")?.is_some() {
        return Ok(());
    }
    let c = Conflict {
        id: Uuid::now_v7(),
        kind: "unknown_sku".into(),
        store: store.clone(),
        sku: Some(sku.clone()),
        shortfall: 0,
        reservations: vec![],
        resolution: format!("{why}: add it to the catalog (or reactivate it), or correct the store's records"),
        status: "open".into(),
        detected_at: rfc3339(now_ms),
        resolved_at: None,
        details: None,
    };
    insert_conflict(conn, &c, now_ms, None)?;
    emit(conn, "unknown_sku", now_ms, json!({"conflict": c}))
}

/// Resolves open `unknown_sku` conflicts of SKUs that are now catalogued and active.
pub fn resolve_known(conn: &Connection, sku: &Sku, now_ms: i64) -> StorageResult<()> {
    conn.prepare_cached(
        "UPDATE conflicts SET status = 'resolved', resolved_at_ms = ?2, resolution = 'the sku is in the catalog now'
         WHERE kind = 'unknown_sku' AND sku = ?1 AND status = 'open'
           AND EXISTS (SELECT 1 FROM catalog_items WHERE sku = ?1 AND active)",
    )?
    .execute(params![sku.as_str(), now_ms])?;
    Ok(())
}

/// The catalog's per-customer limit of a SKU (0: none).
fn customer_limit(conn: &Connection, sku: &Sku) -> StorageResult<u64> {
    Ok(conn
        .prepare_cached("SELECT max_per_customer FROM catalog_items WHERE sku = ?1")?
        .query_row([sku.as_str()], |r| r.get(0))
        .optional()?
        .unwrap_or(0))
}

/// Units of `sku` a customer holds, has paid for or has received.
fn customer_has(conn: &Connection, customer: &str, sku: &Sku) -> StorageResult<u64> {
    let v: Option<u64> = conn
        .prepare_cached(
            "SELECT SUM(a.qty) FROM allocations a JOIN reservations r ON r.id = a.reservation
             WHERE r.customer = ?1 AND a.sku = ?2 AND a.status IN ('held', 'committed', 'fulfilled')",
        )?
        .query_row(params![customer, sku.as_str()], |r| r.get(0))?;
    Ok(v.unwrap_or(0))
}

/// Marks a store's holds as changed (its agent gets a new snapshot).
pub fn bump_holds(conn: &Connection, store: &StoreId) -> StorageResult<()> {
    conn.prepare_cached(
        "INSERT INTO store_holds (store, version) VALUES (?1, 1) ON CONFLICT (store) DO UPDATE SET version = version + 1",
    )?
    .execute([store.as_str()])?;
    Ok(())
}

/// The open holds of a store, as pushed to its agent.
pub fn holds_snapshot(conn: &Connection, store: &StoreId) -> StorageResult<HoldsSnapshot> {
    let version: u64 = conn
        .prepare_cached("SELECT version FROM store_holds WHERE store = ?1")?
        .query_row([store.as_str()], |r| r.get(0))
        .optional()?
        .unwrap_or(0);
    let mut stmt = conn.prepare_cached(
        "SELECT a.id, a.reservation, a.sku, a.qty, a.status, r.expires_at_ms FROM allocations a
         JOIN reservations r ON r.id = a.reservation
         WHERE a.store = ?1 AND a.status IN ('held', 'committed') ORDER BY a.created_seq LIMIT ?2",
    )?;
    let rows = stmt
        .query_map(params![store.as_str(), HOLDS_MAX as i64], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, u64>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, Option<i64>>(5)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut holds = Vec::with_capacity(rows.len());
    for (id, res, sku, qty, status, expires) in rows {
        let status =
            HoldStatus::parse(&status).ok_or_else(|| StorageError::Corrupt(format!("hold status {status:?}")))?;
        holds.push(Hold {
            id: uuid_col(&id)?,
            reservation: uuid_col(&res)?,
            sku: sku_col(sku)?,
            qty,
            status,
            expires_at_ms: if status == HoldStatus::Held { expires } else { None },
        });
    }
    Ok(HoldsSnapshot { version, holds })
}

/// One allocation of a line to a store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocationView {
    /// The hold id the store fulfils by.
    pub hold: Uuid,
    /// Where.
    pub store: StoreId,
    /// What.
    pub sku: Sku,
    /// How many.
    pub qty: u64,
    /// `held`, `committed`, `fulfilled`, `released`, `expired`, `short` or `moved`.
    pub status: String,
}

/// One reservation line and what became of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineView {
    /// What.
    pub sku: Sku,
    /// How many were asked.
    pub qty: u64,
    /// Units no store could supply after an oversell.
    pub short: u64,
    /// Where the units are (or were).
    pub allocations: Vec<AllocationView>,
}

/// A reservation as the storefront sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservationView {
    /// Id.
    pub id: Uuid,
    /// `held`, `committed`, `fulfilled`, `released` or `expired`.
    pub status: String,
    /// Whether some units could not be supplied after an oversell.
    pub short: bool,
    /// Pickup store.
    pub pickup_store: Option<StoreId>,
    /// Customer reference.
    pub customer: Option<String>,
    /// RFC 3339.
    pub created_at: String,
    /// When an unpaid lease lapses (RFC 3339).
    pub expires_at: Option<String>,
    /// Open allocations, flat (`store`, `sku`, `qty`).
    pub allocations: Vec<AllocationView>,
    /// Per line.
    pub lines: Vec<LineView>,
}

/// Loads a reservation's current view.
pub fn view(conn: &Connection, id: Uuid) -> StorageResult<Option<ReservationView>> {
    let row: Option<(String, Option<String>, Option<String>, i64, Option<i64>)> = conn
        .prepare_cached(
            "SELECT status, pickup_store, customer, created_at_ms, expires_at_ms FROM reservations WHERE id = ?1",
        )?
        .query_row([id.as_bytes().as_slice()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))
        .optional()?;
    let Some((status, pickup, customer, created, expires)) = row else { return Ok(None) };
    let lines_rows = conn
        .prepare_cached("SELECT line, sku, qty FROM reservation_lines WHERE reservation = ?1 ORDER BY line")?
        .query_map([id.as_bytes().as_slice()], |r| {
            Ok((r.get::<_, u32>(0)?, r.get::<_, String>(1)?, r.get::<_, u64>(2)?))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let allocs = conn
        .prepare_cached(
            "SELECT id, line, store, sku, qty, status FROM allocations WHERE reservation = ?1 ORDER BY line, created_seq",
        )?
        .query_map([id.as_bytes().as_slice()], |r| {
            Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, u32>(1)?, r.get::<_, String>(2)?, r.get::<_, String>(3)?, r.get::<_, u64>(4)?, r.get::<_, String>(5)?))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut lines: Vec<LineView> = Vec::new();
    for (_, sku, qty) in &lines_rows {
        lines.push(LineView { sku: sku_col(sku.clone())?, qty: *qty, short: 0, allocations: Vec::new() });
    }
    let mut open = Vec::new();
    for (aid, line, store, sku, qty, st) in allocs {
        let a = AllocationView { hold: uuid_col(&aid)?, store: store_col(store)?, sku: sku_col(sku)?, qty, status: st };
        if a.status == "held" || a.status == "committed" {
            open.push(a.clone());
        }
        if let Some(l) = lines.get_mut(line as usize) {
            if a.status == "short" {
                l.short += a.qty;
            }
            l.allocations.push(a);
        }
    }
    let short = lines.iter().any(|l| l.short > 0);
    Ok(Some(ReservationView {
        id,
        status,
        short,
        pickup_store: pickup.map(store_col).transpose()?,
        customer,
        created_at: rfc3339(created),
        expires_at: expires.map(rfc3339),
        allocations: open,
        lines,
    }))
}

fn next_alloc_seq(conn: &Connection) -> StorageResult<i64> {
    Ok(conn.query_row("SELECT COALESCE(MAX(created_seq), 0) + 1 FROM allocations", [], |r| r.get(0))?)
}

fn insert_alloc(
    conn: &Connection,
    reservation: Uuid,
    line: usize,
    store: &StoreId,
    sku: &Sku,
    qty: u64,
    status: &str,
    now_ms: i64,
) -> StorageResult<Uuid> {
    let id = Uuid::now_v7();
    let seq = next_alloc_seq(conn)?;
    conn.prepare_cached(
        "INSERT INTO allocations (id, reservation, line, store, sku, qty, status, created_seq, updated_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?
    .execute(params![
        id.as_bytes().as_slice(),
        reservation.as_bytes().as_slice(),
        line as i64,
        store.as_str(),
        sku.as_str(),
        qty,
        status,
        seq,
        now_ms
    ])?;
    if is_open(status) {
        adjust_held(conn, store, sku, qty as i64)?;
    }
    Ok(id)
}

/// Chooses stores for `qty` of `sku`: the most available first, ties by store id; splits when one
/// store has too few. `taken` holds units already chosen in this transaction; `exclude` a store to
/// leave out. Returns the plan, or the total that was available.
fn source(
    conn: &Connection,
    sku: &Sku,
    qty: u64,
    only: Option<&StoreId>,
    exclude: Option<&StoreId>,
    taken: &HashMap<(StoreId, Sku), u64>,
    now: &Now,
    st: Staleness,
) -> StorageResult<Result<Vec<(StoreId, u64)>, u64>> {
    let mut cands: Vec<(StoreId, u64)> = figures(conn, sku, now, st)?
        .into_iter()
        .filter(|f| only.is_none_or(|o| *o == f.store) && exclude != Some(&f.store))
        .map(|f| {
            let t = taken.get(&(f.store.clone(), sku.clone())).copied().unwrap_or(0);
            (f.store, f.available.saturating_sub(t))
        })
        .filter(|(_, a)| *a > 0)
        .collect();
    cands.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let total: u64 = cands.iter().map(|c| c.1).sum();
    if total < qty {
        return Ok(Err(total));
    }
    let mut need = qty;
    let mut plan = Vec::new();
    for (store, avail) in cands {
        if need == 0 {
            break;
        }
        let take = avail.min(need);
        plan.push((store, take));
        need -= take;
    }
    Ok(Ok(plan))
}

/// Outcome of a reservation write.
#[derive(Clone, Debug)]
pub struct Written {
    /// First time (else a replay).
    pub created: bool,
    /// The answer.
    pub view: ReservationView,
    /// Stores whose holds changed.
    pub stores: Vec<StoreId>,
}

/// Reserves all lines or none.
pub fn create(conn: &Connection, req: &ReservationRequest, now: &Now, st: Staleness) -> StorageResult<Written> {
    let fingerprint = shelfsync_shared::fingerprint_of(&(&req.lines, req.ttl_secs, &req.pickup_store, &req.customer));
    let earlier: Option<(Vec<u8>, String)> = conn
        .prepare_cached("SELECT fingerprint, first_response FROM reservations WHERE id = ?1")?
        .query_row([req.id.as_bytes().as_slice()], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    if let Some((fp, first)) = earlier {
        if fp != fingerprint {
            return Err(StorageError::IdempotencyConflict { id: req.id, kind: "reservation".into() });
        }
        let view =
            serde_json::from_str(&first).map_err(|e| StorageError::Corrupt(format!("stored reservation: {e}")))?;
        return Ok(Written { created: false, view, stores: Vec::new() });
    }
    if let Some(p) = &req.pickup_store {
        match conn
            .query_row("SELECT revoked_at_ms FROM stores WHERE id = ?1", [p.as_str()], |r| r.get::<_, Option<i64>>(0))
            .optional()?
        {
            None => return Err(StorageError::UnknownStore(p.clone())),
            Some(Some(_)) => return Err(StorageError::Revoked(p.clone())),
            Some(None) => {}
        }
    }
    // Per-customer limits from the catalog.
    let mut asked: BTreeMap<Sku, u64> = BTreeMap::new();
    for l in &req.lines {
        *asked.entry(l.sku.clone()).or_default() += l.qty;
    }
    for (sku, qty) in &asked {
        let limit = customer_limit(conn, sku)?;
        if limit == 0 {
            continue;
        }
        let already = match &req.customer {
            Some(c) => customer_has(conn, c, sku)?,
            None => 0,
        };
        if already + qty > limit {
            return Err(StorageError::LimitExceeded { sku: sku.clone(), limit, already });
        }
    }
    let mut taken: HashMap<(StoreId, Sku), u64> = HashMap::new();
    let mut plans = Vec::new();
    for l in &req.lines {
        match source(conn, &l.sku, l.qty, req.pickup_store.as_ref(), None, &taken, now, st)? {
            Ok(plan) => {
                for (s, q) in &plan {
                    *taken.entry((s.clone(), l.sku.clone())).or_default() += q;
                }
                plans.push(plan);
            }
            Err(available) => {
                return Err(StorageError::Unavailable {
                    sku: l.sku.clone(),
                    available,
                    store: req.pickup_store.clone(),
                })
            }
        }
    }
    let expires = now.ms + (req.ttl_secs as i64) * 1000;
    conn.prepare_cached(
        "INSERT INTO reservations (id, status, pickup_store, customer, created_at_ms, expires_at_ms, updated_at_ms, fingerprint, first_response)
         VALUES (?1, 'held', ?2, ?3, ?4, ?5, ?4, ?6, '')",
    )?
    .execute(params![
        req.id.as_bytes().as_slice(),
        req.pickup_store.as_ref().map(|s| s.as_str()),
        req.customer,
        now.ms,
        expires,
        fingerprint
    ])?;
    let mut stores = BTreeSet::new();
    for (i, (l, plan)) in req.lines.iter().zip(&plans).enumerate() {
        conn.prepare_cached("INSERT INTO reservation_lines (reservation, line, sku, qty) VALUES (?1, ?2, ?3, ?4)")?
            .execute(params![req.id.as_bytes().as_slice(), i as i64, l.sku.as_str(), l.qty])?;
        for (store, q) in plan {
            insert_alloc(conn, req.id, i, store, &l.sku, *q, "held", now.ms)?;
            stores.insert(store.clone());
        }
    }
    let view = view(conn, req.id)?.expect("just inserted");
    conn.execute(
        "UPDATE reservations SET first_response = ?2 WHERE id = ?1",
        params![req.id.as_bytes().as_slice(), serde_json::to_string(&view).expect("serialises")],
    )?;
    emit(conn, "reservation_held", now.ms, json!({"reservation": view}))?;
    let touched: BTreeSet<(StoreId, Sku)> = taken.keys().cloned().collect();
    for (s, k) in &touched {
        bump_holds(conn, s)?;
        emit_availability(conn, s, k, now.ms)?;
    }
    Ok(Written { created: true, view, stores: stores.into_iter().collect() })
}

fn open_allocs(conn: &Connection, id: Uuid) -> StorageResult<Vec<(Uuid, StoreId, Sku, u64)>> {
    let rows = conn
        .prepare_cached(
            "SELECT id, store, sku, qty FROM allocations WHERE reservation = ?1 AND status IN ('held', 'committed')",
        )?
        .query_map([id.as_bytes().as_slice()], |r| {
            Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?, r.get::<_, u64>(3)?))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    rows.into_iter().map(|(a, s, k, q)| Ok((uuid_col(&a)?, store_col(s)?, sku_col(k)?, q))).collect()
}

/// Moves a reservation and its open allocations to `to` (`committed`, `released`, `expired`).
fn transition(conn: &Connection, id: Uuid, to: &str, now_ms: i64) -> StorageResult<Vec<StoreId>> {
    let allocs = open_allocs(conn, id)?;
    conn.prepare_cached("UPDATE allocations SET status = ?2, updated_at_ms = ?3 WHERE reservation = ?1 AND status IN ('held', 'committed')")?
        .execute(params![id.as_bytes().as_slice(), to, now_ms])?;
    let expires = if to == "committed" { None } else { Some(()) };
    conn.prepare_cached(
        "UPDATE reservations SET status = ?2, updated_at_ms = ?3,
         expires_at_ms = CASE WHEN ?4 THEN expires_at_ms ELSE NULL END WHERE id = ?1",
    )?
    .execute(params![id.as_bytes().as_slice(), to, now_ms, expires.is_some()])?;
    let mut stores = BTreeSet::new();
    let mut touched = BTreeSet::new();
    for (_, s, k, q) in allocs {
        if !is_open(to) {
            adjust_held(conn, &s, &k, -(q as i64))?;
        }
        stores.insert(s.clone());
        touched.insert((s, k));
    }
    for s in &stores {
        bump_holds(conn, s)?;
    }
    if to != "committed" {
        for (s, k) in &touched {
            emit_availability(conn, s, k, now_ms)?;
        }
    }
    if let Some(v) = view(conn, id)? {
        emit(conn, &format!("reservation_{to}"), now_ms, json!({"reservation": v}))?;
    }
    Ok(stores.into_iter().collect())
}

/// Applies a lifecycle action. `key` makes a retry return the first answer.
pub fn act(conn: &Connection, id: Uuid, action: Action, key: Option<&str>, now_ms: i64) -> StorageResult<Written> {
    let fingerprint = shelfsync_shared::fingerprint_of(&(id, action));
    if let Some(key) = key {
        let earlier: Option<(Vec<u8>, String)> = conn
            .prepare_cached("SELECT fingerprint, response FROM action_requests WHERE key = ?1")?
            .query_row([key], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        if let Some((fp, resp)) = earlier {
            if fp != fingerprint {
                return Err(StorageError::IdempotencyConflict {
                    id,
                    kind: format!("action under Idempotency-Key {}", shelfsync_shared::id::quote(key)),
                });
            }
            let view = serde_json::from_str(&resp).map_err(|e| StorageError::Corrupt(format!("stored action: {e}")))?;
            return Ok(Written { created: false, view, stores: Vec::new() });
        }
    }
    let Some(current) = view(conn, id)? else { return Err(StorageError::NotFound(format!("no reservation {id}"))) };
    let state = current.status.as_str();
    let stores = match (action, state) {
        (Action::Extend { ttl_secs }, "held") => {
            conn.execute(
                "UPDATE reservations SET expires_at_ms = ?2, updated_at_ms = ?3 WHERE id = ?1",
                params![id.as_bytes().as_slice(), now_ms + ttl_secs as i64 * 1000, now_ms],
            )?;
            let stores: BTreeSet<StoreId> = open_allocs(conn, id)?.into_iter().map(|(_, s, _, _)| s).collect();
            for s in &stores {
                bump_holds(conn, s)?;
            }
            stores.into_iter().collect()
        }
        (Action::Extend { .. }, "committed") => Vec::new(), // paid leases do not lapse
        (Action::Commit, "held") => transition(conn, id, "committed", now_ms)?,
        (Action::Commit, "committed" | "fulfilled") => Vec::new(),
        (Action::Release, "held" | "committed") => transition(conn, id, "released", now_ms)?,
        (Action::Release, "released") => Vec::new(),
        (a, s) => {
            return Err(StorageError::InvalidState(format!("reservation {id} is {s}; it cannot be {}", a.done())));
        }
    };
    let view = view(conn, id)?.expect("exists");
    if let Some(key) = key {
        conn.execute(
            "INSERT INTO action_requests (key, fingerprint, response) VALUES (?1, ?2, ?3)",
            params![key, fingerprint, serde_json::to_string(&view).expect("serialises")],
        )?;
    }
    Ok(Written { created: true, view, stores })
}

/// Expires every held reservation whose lease ended; returns the stores whose holds changed.
pub fn expire_due(conn: &Connection, now_ms: i64) -> StorageResult<Vec<StoreId>> {
    let due = conn
        .prepare_cached("SELECT id FROM reservations WHERE status = 'held' AND expires_at_ms <= ?1 LIMIT 1000")?
        .query_map([now_ms], |r| r.get::<_, Vec<u8>>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    let mut stores = BTreeSet::new();
    for id in due {
        stores.extend(transition(conn, uuid_col(&id)?, "expired", now_ms)?);
    }
    Ok(stores.into_iter().collect())
}

/// Closes holds a store picked (fulfilment markers in its delta). Returns whether any changed.
pub fn fulfil(conn: &Connection, store: &StoreId, holds: &[Uuid], now_ms: i64) -> StorageResult<bool> {
    let mut any = false;
    for h in holds {
        let row: Option<(Vec<u8>, String, String, u64)> = conn
            .prepare_cached("SELECT reservation, status, sku, qty FROM allocations WHERE id = ?1 AND store = ?2")?
            .query_row(params![h.as_bytes().as_slice(), store.as_str()], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .optional()?;
        let Some((res, status, sku, qty)) = row else {
            tracing::warn!(%store, hold = %h, "store fulfilled a hold the hub does not know at that store");
            continue;
        };
        if status == "fulfilled" {
            continue;
        }
        if is_open(&status) {
            adjust_held(conn, store, &sku_col(sku)?, -(qty as i64))?;
        } else {
            // The hub had already moved, released or expired it, but the customer got the goods.
            tracing::warn!(%store, hold = %h, %status, "store fulfilled a hold the hub had closed");
        }
        conn.prepare_cached("UPDATE allocations SET status = 'fulfilled', updated_at_ms = ?2 WHERE id = ?1")?
            .execute(params![h.as_bytes().as_slice(), now_ms])?;
        any = true;
        let res = uuid_col(&res)?;
        let open: u64 = conn.query_row(
            "SELECT COUNT(*) FROM allocations WHERE reservation = ?1 AND status IN ('held', 'committed')",
            [res.as_bytes().as_slice()],
            |r| r.get(0),
        )?;
        if open == 0 {
            conn.execute(
                "UPDATE reservations SET status = 'fulfilled', updated_at_ms = ?2, expires_at_ms = NULL
                 WHERE id = ?1 AND status IN ('held', 'committed')",
                params![res.as_bytes().as_slice(), now_ms],
            )?;
        }
        if let Some(v) = view(conn, res)? {
            emit(conn, "reservation_fulfilled", now_ms, json!({"reservation": v, "hold": h, "store": store}))?;
        }
    }
    if any {
        bump_holds(conn, store)?;
    }
    Ok(any)
}

fn open_conflict(conn: &Connection, store: &StoreId, sku: &Sku, kind: &str) -> StorageResult<Option<Uuid>> {
    let id: Option<Vec<u8>> = conn
        .prepare_cached("SELECT id FROM conflicts WHERE store = ?1 AND sku = ?2 AND kind = ?3 AND status = 'open'")?
        .query_row(params![store.as_str(), sku.as_str(), kind], |r| r.get(0))
        .optional()?;
    id.map(|b| uuid_col(&b)).transpose()
}

/// A recorded conflict.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conflict {
    /// Id.
    pub id: Uuid,
    /// `oversell`, `negative_stock`, `unknown_sku`; about a store's agents and files rather than
    /// a SKU: `store_rolled_back`, `writer_cloned`, `duplicate_agent`, `hub_rolled_back`.
    pub kind: String,
    /// Where.
    pub store: StoreId,
    /// What (`None` for conflicts about a store's agents or the hub's files).
    pub sku: Option<Sku>,
    /// Units promised beyond what is there (oversell) or below zero (negative stock).
    pub shortfall: u64,
    /// Reservations touched.
    pub reservations: Vec<Uuid>,
    /// What was done.
    pub resolution: String,
    /// `open` (needs a person) or `resolved`.
    pub status: String,
    /// RFC 3339.
    pub detected_at: String,
    /// RFC 3339.
    pub resolved_at: Option<String>,
    /// Kind-specific facts (writers, fork points, the window of moved changes...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<Value>,
}

/// Inserts a conflict unless one with its id exists; returns whether it was new.
pub fn insert_conflict_once(conn: &Connection, c: &Conflict, detected_ms: i64) -> StorageResult<bool> {
    let exists: Option<i64> = conn
        .prepare_cached("SELECT 1 FROM conflicts WHERE id = ?1")?
        .query_row([c.id.as_bytes().as_slice()], |r| r.get(0))
        .optional()?;
    if exists.is_some() {
        return Ok(false);
    }
    insert_conflict(conn, c, detected_ms, None)?;
    Ok(true)
}

fn insert_conflict(conn: &Connection, c: &Conflict, detected_ms: i64, resolved_ms: Option<i64>) -> StorageResult<()> {
    conn.prepare_cached(
        "INSERT INTO conflicts (id, kind, store, sku, shortfall, reservations, resolution, status, detected_at_ms, resolved_at_ms, details)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
    )?
    .execute(params![
        c.id.as_bytes().as_slice(),
        c.kind,
        c.store.as_str(),
        c.sku.as_ref().map_or("", |s| s.as_str()),
        c.shortfall,
        serde_json::to_string(&c.reservations).expect("serialises"),
        c.resolution,
        c.status,
        detected_ms,
        resolved_ms,
        c.details.as_ref().map(|d| d.to_string()),
    ])?;
    Ok(())
}

/// After `on_hand` of (store, sku) changed at the hub: surfaces negative stock and reconciles an
/// oversell (held > on_hand) deterministically, newest holds first: a shipped line is re-sourced
/// to other stores with available units; a pickup line (or one nobody can supply) is marked
/// short. Everything is recorded as a conflict and on the change feed. Returns the stores whose
/// holds changed.
pub fn reconcile(
    conn: &Connection,
    store: &StoreId,
    sku: &Sku,
    on_hand: i64,
    now: &Now,
    st: Staleness,
) -> StorageResult<Vec<StoreId>> {
    let mut changed_stores = BTreeSet::new();
    // Negative stock: one open conflict per (store, sku) until it is back at or above zero.
    let open_negative = open_conflict(conn, store, sku, "negative_stock")?;
    match (on_hand < 0, open_negative) {
        (true, None) => {
            let c = Conflict {
                id: Uuid::now_v7(),
                kind: "negative_stock".into(),
                store: store.clone(),
                sku: Some(sku.clone()),
                shortfall: on_hand.unsigned_abs(),
                reservations: vec![],
                resolution: "ask the store to recount".into(),
                status: "open".into(),
                detected_at: rfc3339(now.ms),
                resolved_at: None,
                details: None,
            };
            insert_conflict(conn, &c, now.ms, None)?;
            emit(conn, "negative_stock", now.ms, json!({"conflict": c}))?;
        }
        (false, Some(id)) => {
            conn.execute(
                "UPDATE conflicts SET status = 'resolved', resolved_at_ms = ?2, resolution = 'stock is back at or above zero' WHERE id = ?1",
                params![id.as_bytes().as_slice(), now.ms],
            )?;
        }
        _ => {}
    }

    let held_now = held(conn, store, sku)?;
    let have = on_hand.max(0) as u64;
    if held_now <= have {
        return Ok(Vec::new());
    }
    let shortfall = held_now - have;
    let mut remaining = shortfall;
    // Newest holds first.
    let allocs = conn
        .prepare_cached(
            "SELECT a.id, a.reservation, a.line, a.qty, a.status, r.pickup_store FROM allocations a
             JOIN reservations r ON r.id = a.reservation
             WHERE a.store = ?1 AND a.sku = ?2 AND a.status IN ('held', 'committed')
             ORDER BY a.created_seq DESC",
        )?
        .query_map(params![store.as_str(), sku.as_str()], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, u64>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, Option<String>>(5)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut touched: BTreeMap<Uuid, ()> = BTreeMap::new();
    let mut resourced: Vec<(StoreId, u64)> = Vec::new();
    let mut short_total = 0u64;
    let mut taken: HashMap<(StoreId, Sku), u64> = HashMap::new();
    for (aid, res, line, qty, status, pickup) in allocs {
        if remaining == 0 {
            break;
        }
        let (aid, res) = (uuid_col(&aid)?, uuid_col(&res)?);
        touched.insert(res, ());
        let take = qty.min(remaining);
        remaining -= take;
        // Shrink (or close) the allocation at the oversold store.
        adjust_held(conn, store, sku, -(take as i64))?;
        if take == qty {
            conn.execute(
                "UPDATE allocations SET status = 'moved', updated_at_ms = ?2 WHERE id = ?1",
                params![aid.as_bytes().as_slice(), now.ms],
            )?;
        } else {
            conn.execute(
                "UPDATE allocations SET qty = qty - ?2, updated_at_ms = ?3 WHERE id = ?1",
                params![aid.as_bytes().as_slice(), take, now.ms],
            )?;
        }
        let mut found = 0u64;
        if pickup.is_none() {
            let plan = match source(conn, sku, take, None, Some(store), &taken, now, st)? {
                Ok(plan) => plan,
                // Not enough anywhere: take what there is, the rest is short.
                Err(_) => {
                    let mut partial = Vec::new();
                    let mut need = take;
                    for f in figures(conn, sku, now, st)? {
                        if f.store == *store || need == 0 {
                            continue;
                        }
                        let t = taken.get(&(f.store.clone(), sku.clone())).copied().unwrap_or(0);
                        let a = f.available.saturating_sub(t).min(need);
                        if a > 0 {
                            partial.push((f.store, a));
                            need -= a;
                        }
                    }
                    partial
                }
            };
            for (s, q) in plan {
                insert_alloc(conn, res, line as usize, &s, sku, q, &status, now.ms)?;
                *taken.entry((s.clone(), sku.clone())).or_default() += q;
                changed_stores.insert(s.clone());
                emit_availability(conn, &s, sku, now.ms)?;
                resourced.push((s, q));
                found += q;
            }
        }
        if found < take {
            insert_alloc(conn, res, line as usize, store, sku, take - found, "short", now.ms)?;
            short_total += take - found;
            if let Some(v) = view(conn, res)? {
                emit(
                    conn,
                    "reservation_short",
                    now.ms,
                    json!({"reservation": v, "store": store, "sku": sku, "short": take - found}),
                )?;
            }
        }
    }
    changed_stores.insert(store.clone());
    for s in &changed_stores {
        bump_holds(conn, s)?;
    }
    let moved: Vec<String> = resourced.iter().map(|(s, q)| format!("{q} to {s}")).collect();
    let resolution = match (moved.is_empty(), short_total) {
        (false, 0) => format!("re-sourced {}", moved.join(", ")),
        (true, n) => format!("{n} marked short"),
        (false, n) => format!("re-sourced {}; {n} marked short", moved.join(", ")),
    };
    let resolved = short_total == 0;
    let c = Conflict {
        id: Uuid::now_v7(),
        kind: "oversell".into(),
        store: store.clone(),
        sku: Some(sku.clone()),
        shortfall,
        reservations: touched.keys().copied().collect(),
        resolution,
        status: if resolved { "resolved" } else { "open" }.into(),
        detected_at: rfc3339(now.ms),
        resolved_at: resolved.then(|| rfc3339(now.ms)),
        details: None,
    };
    insert_conflict(conn, &c, now.ms, resolved.then_some(now.ms))?;
    emit(conn, "oversell_detected", now.ms, json!({"conflict": c}))?;
    if resolved {
        emit(conn, "oversell_resolved", now.ms, json!({"conflict": c}))?;
    }
    emit_availability(conn, store, sku, now.ms)?;
    Ok(changed_stores.into_iter().collect())
}

/// Conflicts, newest first, filtered.
pub fn conflicts(
    conn: &Connection,
    store: Option<&StoreId>,
    sku: Option<&Sku>,
    status: Option<&str>,
    limit: usize,
) -> StorageResult<Vec<Conflict>> {
    let rows = conn
        .prepare_cached(
            "SELECT id, kind, store, sku, shortfall, reservations, resolution, status, detected_at_ms, resolved_at_ms, details
             FROM conflicts WHERE (?1 IS NULL OR store = ?1) AND (?2 IS NULL OR sku = ?2) AND (?3 IS NULL OR status = ?3)
             ORDER BY detected_at_ms DESC, id DESC LIMIT ?4",
        )?
        .query_map(params![store.map(|s| s.as_str()), sku.map(|s| s.as_str()), status, limit as i64], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, u64>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, String>(6)?,
                r.get::<_, String>(7)?,
                r.get::<_, i64>(8)?,
                r.get::<_, Option<i64>>(9)?,
                r.get::<_, Option<String>>(10)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    rows.into_iter()
        .map(|(id, kind, store, sku, shortfall, res, resolution, status, detected, resolved, details)| {
            Ok(Conflict {
                id: uuid_col(&id)?,
                kind,
                store: store_col(store)?,
                sku: if sku.is_empty() { None } else { Some(sku_col(sku)?) },
                details: details
                    .map(|d| serde_json::from_str(&d))
                    .transpose()
                    .map_err(|e| StorageError::Corrupt(format!("conflict details: {e}")))?,
                shortfall,
                reservations: serde_json::from_str(&res)
                    .map_err(|e| StorageError::Corrupt(format!("conflict reservations: {e}")))?,
                resolution,
                status,
                detected_at: rfc3339(detected),
                resolved_at: resolved.map(rfc3339),
            })
        })
        .collect()
}

/// One entry of the change feed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChangeEvent {
    /// Monotonic, gap-free position.
    pub cursor: u64,
    /// What happened.
    pub kind: String,
    /// RFC 3339.
    pub at: String,
    /// Details.
    pub data: Value,
}

/// Events after `cursor`, oldest first.
pub fn changes_after(conn: &Connection, cursor: u64, limit: usize) -> StorageResult<Vec<ChangeEvent>> {
    // Cursors are SQLite integers: none lies after i64::MAX (binding a larger u64 would fail).
    let cursor = i64::try_from(cursor).unwrap_or(i64::MAX);
    let rows = conn
        .prepare_cached("SELECT cursor, kind, at_ms, data FROM changes WHERE cursor > ?1 ORDER BY cursor LIMIT ?2")?
        .query_map(params![cursor, limit as i64], |r| {
            Ok((r.get::<_, u64>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?, r.get::<_, String>(3)?))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    rows.into_iter()
        .map(|(cursor, kind, at, data)| {
            Ok(ChangeEvent {
                cursor,
                kind,
                at: rfc3339(at),
                data: serde_json::from_str(&data)
                    .map_err(|e| StorageError::Corrupt(format!("change {cursor}: {e}")))?,
            })
        })
        .collect()
}

/// The newest cursor (0 when the feed is empty).
pub fn changes_head(conn: &Connection) -> StorageResult<u64> {
    Ok(conn.query_row("SELECT COALESCE(MAX(cursor), 0) FROM changes", [], |r| r.get(0))?)
}
