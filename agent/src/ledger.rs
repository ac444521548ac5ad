//! The POS operations: sales, returns, adjustments and counts, each one idempotent by the
//! caller's id, recorded as journal events and counter changes in one transaction.

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use shelfsync_shared::qty::{check_range, ADJUST_DELTA_MAX, COUNT_MAX, LINES_MAX, LINE_QTY_MAX, REASON_MAX_LEN};
use shelfsync_shared::{fingerprint_of, rfc3339};
use shelfsync_shared::{EventFlag, EventKind, QtyError, Sku, StockFigures, StoreId, UnixMs};
use uuid::Uuid;

use crate::counts;
use crate::db::{self, Db, DbError, Identity};

/// How far in the future a caller's `occurred_at` may be (clock skew allowance).
pub const OCCURRED_AT_FUTURE_MAX_MS: i64 = 24 * 3600 * 1000;

/// Why a POS request was refused. Nothing of a refused request is kept.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// Same key, different body.
    #[error("idempotency key {key} was already used for a different {kind} request")]
    IdempotencyConflict { key: String, kind: String },
    /// The request breaks a rule; the message names the field.
    #[error("{0}")]
    Invalid(String),
    /// Counter arithmetic refused (overflow).
    #[error("{0}")]
    Counter(#[from] shelfsync_shared::CounterError),
    /// Storage failed.
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<rusqlite::Error> for LedgerError {
    fn from(e: rusqlite::Error) -> Self {
        LedgerError::Db(e.into())
    }
}

impl From<QtyError> for LedgerError {
    fn from(e: QtyError) -> Self {
        LedgerError::Invalid(e.to_string())
    }
}

/// One line of a sale or return.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    /// The product.
    pub sku: Sku,
    /// Units, 1 to [`LINE_QTY_MAX`].
    pub qty: u64,
}

/// What a request changes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Change {
    /// Units leave with a customer.
    Sale { lines: Vec<Line> },
    /// Units come back from a customer.
    Return { lines: Vec<Line> },
    /// A correction with a reason.
    Adjustment { sku: Sku, delta: i64, reason: String },
    /// A physical count.
    Count { sku: Sku, counted: i64 },
}

impl Change {
    /// The journal kind.
    pub fn kind(&self) -> EventKind {
        match self {
            Change::Sale { .. } => EventKind::Sale,
            Change::Return { .. } => EventKind::Return,
            Change::Adjustment { .. } => EventKind::Adjustment,
            Change::Count { .. } => EventKind::Count,
        }
    }

    /// Checks every limit; the message names the field.
    pub fn validate(&self) -> Result<(), LedgerError> {
        match self {
            Change::Sale { lines } | Change::Return { lines } => {
                if lines.is_empty() {
                    return Err(LedgerError::Invalid("lines must not be empty".into()));
                }
                if lines.len() > LINES_MAX {
                    return Err(LedgerError::Invalid(format!(
                        "lines has {} entries; the limit is {LINES_MAX}",
                        lines.len()
                    )));
                }
                for (i, l) in lines.iter().enumerate() {
                    let qty = i64::try_from(l.qty).unwrap_or(i64::MAX);
                    check_range("qty", qty, 1, LINE_QTY_MAX as i64)
                        .map_err(|e| LedgerError::Invalid(format!("lines[{i}]: {e}")))?;
                }
            }
            Change::Adjustment { delta, reason, .. } => {
                if *delta == 0 {
                    return Err(QtyError::Zero { field: "delta" }.into());
                }
                check_range("delta", *delta, -ADJUST_DELTA_MAX, ADJUST_DELTA_MAX)?;
                if reason.trim().is_empty() {
                    return Err(LedgerError::Invalid("reason must not be empty".into()));
                }
                if reason.len() > REASON_MAX_LEN {
                    return Err(LedgerError::Invalid(format!(
                        "reason is {} bytes long; the limit is {REASON_MAX_LEN}",
                        reason.len()
                    )));
                }
            }
            Change::Count { counted, .. } => {
                check_range("counted", *counted, 0, COUNT_MAX)?;
            }
        }
        Ok(())
    }
}

/// A POS request: the caller's idempotency key, the change, and optionally when it happened.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordRequest {
    /// The id of the request and its journal lines: the caller's key's UUID
    /// ([`shelfsync_shared::IdempotencyKey::id`]).
    pub id: Uuid,
    /// The key as the caller sent it, echoed in the answer (`None`: the id itself).
    pub key: Option<String>,
    /// The change.
    pub change: Change,
    /// When it happened (the caller's clock); defaults to when it was recorded.
    pub occurred_at_ms: Option<UnixMs>,
}

impl RecordRequest {
    /// A request under `key`.
    pub fn new(key: &shelfsync_shared::IdempotencyKey, change: Change, occurred_at_ms: Option<UnixMs>) -> Self {
        RecordRequest { id: key.id(), key: Some(key.as_str().to_owned()), change, occurred_at_ms }
    }

    /// The key to name in messages.
    pub fn key(&self) -> String {
        self.key.clone().unwrap_or_else(|| self.id.to_string())
    }

    /// A stable hash of everything that makes two requests "the same request".
    pub fn fingerprint(&self) -> Vec<u8> {
        fingerprint_of(&(&self.change, self.occurred_at_ms))
    }
}

/// The outcome of one line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineResult {
    /// The product.
    pub sku: Sku,
    /// Change of `on_hand` this line made.
    pub delta: i64,
    /// `on_hand` after the line.
    pub on_hand: i64,
    /// Units held for online orders.
    pub held: u64,
    /// `on_hand − held`; with escrow, at most the store's own rights (`on_hand − granted`).
    pub sellable: i64,
    /// Units granted online (escrow rights), 0 without escrow.
    #[serde(default)]
    pub granted: u64,
    /// A sale beyond the store's own rights: the granted units it took (flag `escrow_overdraft`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rights_broken: u64,
    /// For counts: what the store believed before.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_on_hand: Option<i64>,
    /// For counts: how the count stands among the SKU's counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<CountResult>,
    /// For other changes that occurred at or before the SKU's newest count: that count's time.
    /// The count already saw this change on the shelf, so `on_hand` did not move.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub absorbed_by_count_at: Option<String>,
    /// Things to look at.
    pub flags: Vec<EventFlag>,
    /// Online holds of this SKU the line dipped into (the store may not be able to serve them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endangered_holds: Vec<crate::holds::HoldView>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// How a count was applied ([`crate::counts`]): `on_hand = counted + changes_after`, unless a
/// newer count stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountResult {
    /// What was counted.
    pub counted: i64,
    /// When (the request's `occurred_at`), RFC 3339.
    pub counted_at: String,
    /// Σ of the changes that occurred after the count, applied on top of it.
    pub changes_after: i64,
    /// Set when a newer count already stands: its time. This count then changes nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub superseded_by: Option<String>,
}

/// What the POS gets back (and gets again on a retry).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordResponse {
    /// The request id (the key's UUID; the journal's id of its lines).
    pub id: Uuid,
    /// The idempotency key as sent (equal to `id` for a UUID key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// What kind of change.
    pub kind: EventKind,
    /// RFC 3339.
    pub occurred_at: String,
    /// RFC 3339.
    pub recorded_at: String,
    /// One result per line.
    pub lines: Vec<LineResult>,
    /// Union of the lines' flags.
    pub flags: Vec<EventFlag>,
}

/// Whether the request was new or a retry of an earlier one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// First time: recorded now.
    Created,
    /// Seen before with the same body: nothing changed.
    Replayed,
}

fn check_request(change: &Change, occurred_at_ms: Option<UnixMs>, now: UnixMs) -> Result<(), LedgerError> {
    change.validate()?;
    if let Some(at) = occurred_at_ms {
        if at > now + OCCURRED_AT_FUTURE_MAX_MS {
            return Err(LedgerError::Invalid(format!(
                "occurred_at {} is more than 24 hours in the future",
                rfc3339(at)
            )));
        }
    }
    Ok(())
}

/// Records a POS request durably (group-committed). Answers after the commit.
pub async fn record(db: &Db, req: RecordRequest) -> Result<(Outcome, RecordResponse), LedgerError> {
    let now = shelfsync_node::now_ms();
    check_request(&req.change, req.occurred_at_ms, now)?;
    let current = db.current();
    // The writer is read inside the job: a retirement earlier in the queue has changed it.
    db.write(move |conn| record_in(conn, &current.get(), &req, now)).await
}

/// Most changes in one batch (Square's batch limit).
pub const BATCH_MAX: usize = 100;
/// Most sale/return lines over all changes of one batch.
pub const BATCH_LINES_MAX: usize = 1000;

/// Several changes under one idempotency key, recorded in one transaction: all or none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchRequest {
    /// The batch's id (the key's UUID); item `i` is recorded under `IdempotencyKey::item(i)`.
    pub key: shelfsync_shared::IdempotencyKey,
    /// The changes, in order, each with its `occurred_at`.
    pub items: Vec<(Change, Option<UnixMs>)>,
}

/// What a batch answers (and answers again on a retry).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchResponse {
    /// The batch's id.
    pub id: Uuid,
    /// Its key as sent.
    pub key: String,
    /// RFC 3339.
    pub recorded_at: String,
    /// One result per change, in order (each with its own id).
    pub items: Vec<RecordResponse>,
    /// Union of the items' flags.
    pub flags: Vec<EventFlag>,
}

/// Records a batch durably in one transaction; any invalid item refuses the whole batch, naming
/// it (`items[3]: ...`).
pub async fn record_batch(db: &Db, batch: BatchRequest) -> Result<(Outcome, BatchResponse), LedgerError> {
    let now = shelfsync_node::now_ms();
    if batch.items.is_empty() {
        return Err(LedgerError::Invalid("items must not be empty".into()));
    }
    if batch.items.len() > BATCH_MAX {
        return Err(LedgerError::Invalid(format!("items has {} entries; the limit is {BATCH_MAX}", batch.items.len())));
    }
    let lines: usize = batch
        .items
        .iter()
        .map(|(c, _)| match c {
            Change::Sale { lines } | Change::Return { lines } => lines.len(),
            _ => 1,
        })
        .sum();
    if lines > BATCH_LINES_MAX {
        return Err(LedgerError::Invalid(format!("the batch has {lines} lines; the limit is {BATCH_LINES_MAX}")));
    }
    for (i, (change, at)) in batch.items.iter().enumerate() {
        check_request(change, *at, now).map_err(|e| LedgerError::Invalid(format!("items[{i}]: {e}")))?;
    }
    let current = db.current();
    db.write(move |conn| {
        let me = current.get();
        let id = batch.key.id();
        let fingerprint = fingerprint_of(&batch.items);
        let earlier: Option<(String, Vec<u8>, String)> = conn
            .prepare_cached("SELECT kind, fingerprint, response FROM requests WHERE id = ?1")?
            .query_row([id.as_bytes().as_slice()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()
            .map_err(DbError::from)?;
        if let Some((kind, fp, response)) = earlier {
            if kind != "batch" || fp != fingerprint {
                return Err(LedgerError::IdempotencyConflict { key: batch.key.to_string(), kind });
            }
            let response = serde_json::from_str(&response)
                .map_err(|e| DbError::Corrupt(format!("stored response of batch {id}: {e}")))?;
            return Ok((Outcome::Replayed, response));
        }
        let mut items = Vec::with_capacity(batch.items.len());
        for (i, (change, at)) in batch.items.iter().enumerate() {
            let req = RecordRequest { id: batch.key.item(i), key: None, change: change.clone(), occurred_at_ms: *at };
            let (_, r) = record_in(conn, &me, &req, now).map_err(|e| match e {
                LedgerError::Invalid(m) => LedgerError::Invalid(format!("items[{i}]: {m}")),
                LedgerError::Counter(c) => LedgerError::Invalid(format!("items[{i}]: {c}")),
                other => other,
            })?;
            items.push(r);
        }
        let mut flags: Vec<EventFlag> = items.iter().flat_map(|r| r.flags.iter().copied()).collect();
        flags.sort();
        flags.dedup();
        let response = BatchResponse { id, key: batch.key.to_string(), recorded_at: rfc3339(now), items, flags };
        conn.prepare_cached(
            "INSERT INTO requests (id, kind, fingerprint, response, recorded_at_ms) VALUES (?1, 'batch', ?2, ?3, ?4)",
        )
        .map_err(DbError::from)?
        .execute(params![
            id.as_bytes().as_slice(),
            fingerprint,
            serde_json::to_string(&response).expect("responses serialise"),
            now
        ])
        .map_err(DbError::from)?;
        Ok((Outcome::Created, response))
    })
    .await
}

fn record_in(
    conn: &Connection,
    me: &Identity,
    req: &RecordRequest,
    now: UnixMs,
) -> Result<(Outcome, RecordResponse), LedgerError> {
    let fingerprint = req.fingerprint();
    let kind = req.change.kind();
    let earlier: Option<(String, Vec<u8>, String)> = conn
        .prepare_cached("SELECT kind, fingerprint, response FROM requests WHERE id = ?1")?
        .query_row([req.id.as_bytes().as_slice()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()
        .map_err(DbError::from)?;
    if let Some((earlier_kind, earlier_fp, response)) = earlier {
        if earlier_kind != kind.as_str() || earlier_fp != fingerprint {
            return Err(LedgerError::IdempotencyConflict { key: req.key(), kind: earlier_kind });
        }
        let mut response: RecordResponse = serde_json::from_str(&response)
            .map_err(|e| DbError::Corrupt(format!("stored response of {}: {e}", req.id)))?;
        if response.key.is_none() {
            response.key = req.key.clone(); // answered before keys were echoed
        }
        return Ok((Outcome::Replayed, response));
    }

    let occurred = req.occurred_at_ms.unwrap_or(now);
    let (lines, reason): (Vec<(Sku, Option<i64>, Option<i64>)>, Option<&str>) = match &req.change {
        Change::Sale { lines } => (lines.iter().map(|l| (l.sku.clone(), Some(-(l.qty as i64)), None)).collect(), None),
        Change::Return { lines } => (lines.iter().map(|l| (l.sku.clone(), Some(l.qty as i64), None)).collect(), None),
        Change::Adjustment { sku, delta, reason } => (vec![(sku.clone(), Some(*delta), None)], Some(reason.as_str())),
        Change::Count { sku, counted } => (vec![(sku.clone(), None, Some(*counted))], None),
    };

    let mut results = Vec::with_capacity(lines.len());
    for (line_no, (sku, delta, counted)) in lines.into_iter().enumerate() {
        let before = db::on_hand(conn, &sku)?;
        let seen = before.is_some();
        // With a catalog, "unknown" means "not in it"; a store without one (standalone) falls
        // back to "never seen here".
        let standing = shelfsync_node::catalog::standing(conn, &sku)?;
        let known = match standing {
            Some((listed, _)) => listed,
            None => seen,
        };
        let inactive = matches!(standing, Some((true, false)));
        let before = before.unwrap_or(0);
        let line = line_no as u32;
        // Escrow: a sale beyond the store's own rights takes units granted online. It happens
        // (the goods are here) and is flagged; the hub covers it and reconciles.
        // Read once: the line moves on_hand, not the rights.
        let rights = crate::rights::escrow_of(conn, &me.store, &sku)?;
        let rights_broken = match (&delta, &rights) {
            (Some(d), Some(r)) if *d < 0 => r.overdraft(before, d.unsigned_abs()),
            _ => 0,
        };
        // A count is a correction: what makes the corrections add up to its quantity as of its
        // time (crate::counts); 0 when a newer count already stands.
        let (delta, reason, superseded) = match (delta, counted) {
            (Some(d), _) => (d, reason.map(str::to_owned), None),
            (None, Some(c)) => {
                let mine = counts::Anchor {
                    at_ms: occurred,
                    counted: c,
                    id: req.id,
                    line,
                    writer: me.writer.clone(),
                    inside: 0,
                    corrections: 0,
                };
                let newest = counts::offer(conn, &sku, &mine)?;
                let superseded = (!newest).then(|| counts::anchor(conn, &sku)).transpose()?.flatten();
                let delta = if newest { counts::shortfall(conn, &sku)? } else { 0 };
                (delta, Some(counts::counted_reason(c)), superseded)
            }
            (None, None) => unreachable!("every line has a delta or a count"),
        };
        if delta != 0 {
            let current = db::entry(conn, &sku, &me.writer)?.unwrap_or_default();
            let next = current.apply(&me.writer, delta)?;
            db::put_entry(conn, &sku, &me.writer, next, db::next_seq(conn)?)?;
        }
        let lineage = crate::lineage::next(conn, &me.writer, &req.id, line, &sku, delta)?;
        conn.prepare_cached(
            "INSERT INTO journal (id, line, kind, store, sku, delta, reason, occurred_at_ms, recorded_at_ms, writer, flags, ordinal, chain)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, 0, ?11, ?12)",
        )
        .map_err(DbError::from)?
        .execute(params![
            req.id.as_bytes().as_slice(),
            line_no as i64,
            kind.as_str(),
            me.store.as_str(),
            sku.as_str(),
            delta,
            reason,
            occurred,
            now,
            me.writer.to_string(),
            lineage.ordinal,
            lineage.chain.as_slice(),
        ])
        .map_err(DbError::from)?;
        // The newest count's sums take the line in. A change that occurred at or before that
        // count is inside it: the count's correction takes it back out, in this transaction.
        let noted = counts::note_line(conn, &sku, kind, occurred, delta)?;
        let absorbed = match (counted, noted) {
            (None, Some(a)) => {
                counts::rebase(conn, me, &sku, now)?;
                Some(a.at_ms)
            }
            _ => None,
        };
        let on_hand = if delta != 0 || !seen || absorbed.is_some() { db::refresh_stock(conn, &sku)? } else { before };
        let figures = StockFigures { on_hand, held: crate::holds::held(conn, &sku)?, safety_stock: 0 };
        let mut flags = Vec::new();
        if !known {
            flags.push(EventFlag::UnknownSku);
        }
        if inactive {
            flags.push(EventFlag::InactiveSku);
        }
        if on_hand < 0 {
            flags.push(EventFlag::NegativeStock);
        }
        if rights_broken > 0 {
            flags.push(EventFlag::EscrowOverdraft);
            tracing::warn!(%sku, rights_broken, "sale beyond the store's own rights: it took units granted online");
        }
        let escrow = rights.as_ref().map(|r| crate::rights::Escrowed::of(r, on_hand));
        // A sale that leaves fewer units than are promised online still happens (the goods are
        // here), but the POS is told which online orders it endangers.
        let endangered = if delta < 0 && figures.held > 0 && figures.sellable() < 0 {
            flags.push(EventFlag::DipsIntoHolds);
            crate::holds::open_for(conn, &sku)?
        } else {
            Vec::new()
        };
        if !flags.is_empty() {
            conn.prepare_cached("UPDATE journal SET flags = ?3 WHERE id = ?1 AND line = ?2")
                .map_err(DbError::from)?
                .execute(params![req.id.as_bytes().as_slice(), line_no as i64, EventFlag::to_bits(&flags)])
                .map_err(DbError::from)?;
        }
        let count = match counted {
            Some(c) => Some(CountResult {
                counted: c,
                counted_at: rfc3339(occurred),
                // The newest count stands under everything after it: what is on top is what
                // on_hand shows beyond it (also changes whose journal lines are still on their
                // way). A superseded count is told from the journal.
                changes_after: match superseded {
                    None => on_hand - c,
                    Some(_) => counts::changes_after(conn, &sku, occurred)?,
                },
                superseded_by: superseded.map(|a| rfc3339(a.at_ms)),
            }),
            None => None,
        };
        results.push(LineResult {
            sku,
            delta,
            on_hand,
            held: figures.held,
            sellable: escrow.map_or(figures.sellable(), |e| figures.sellable().min(e.own)),
            granted: escrow.map_or(0, |e| e.granted),
            rights_broken,
            previous_on_hand: counted.map(|_| before),
            count,
            absorbed_by_count_at: absorbed.map(rfc3339),
            flags,
            endangered_holds: endangered,
        });
    }
    let mut all_flags: Vec<EventFlag> = results.iter().flat_map(|l| l.flags.iter().copied()).collect();
    all_flags.sort();
    all_flags.dedup();
    let response = RecordResponse {
        id: req.id,
        key: req.key.clone(),
        kind,
        occurred_at: rfc3339(occurred),
        recorded_at: rfc3339(now),
        lines: results,
        flags: all_flags,
    };
    conn.prepare_cached(
        "INSERT INTO requests (id, kind, fingerprint, response, recorded_at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
    )
    .map_err(DbError::from)?
    .execute(params![
        req.id.as_bytes().as_slice(),
        kind.as_str(),
        fingerprint,
        serde_json::to_string(&response).expect("responses serialise"),
        now
    ])
    .map_err(DbError::from)?;
    Ok((Outcome::Created, response))
}

/// What `GET /v1/stock/{sku}` shows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockView {
    /// The product.
    pub sku: Sku,
    /// Physical units.
    pub on_hand: i64,
    /// Units held for online orders.
    pub held: u64,
    /// `on_hand − held`; with escrow, at most the store's own rights (`on_hand − granted`).
    pub sellable: i64,
    /// Units granted online (escrow rights), 0 without escrow.
    #[serde(default)]
    pub granted: u64,
    /// Units on their way here from other stores (not on hand, not sellable).
    pub incoming: u64,
    /// The catalog's name for it, if the store has a catalog that lists it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

fn view(conn: &Connection, store: &StoreId, sku: Sku, on_hand: i64) -> Result<StockView, DbError> {
    let f = StockFigures { on_hand, held: crate::holds::held(conn, &sku)?, safety_stock: 0 };
    let incoming = crate::incoming::incoming(conn, &sku)?;
    let escrow = crate::rights::escrowed(conn, store, &sku, on_hand)?;
    Ok(StockView {
        name: shelfsync_node::catalog::name_of(conn, &sku)?,
        sku,
        on_hand,
        held: f.held,
        sellable: escrow.map_or(f.sellable(), |e| f.sellable().min(e.own)),
        granted: escrow.map_or(0, |e| e.granted),
        incoming,
    })
}

/// One SKU's stock, or `None` if it is unknown here: neither in the store's catalog, nor ever
/// stocked, nor on its way (the hub answers the same way: known means catalogued or stocked).
pub async fn stock(db: &Db, sku: Sku) -> Result<Option<StockView>, DbError> {
    let store = db.identity().store;
    db.read(move |conn| {
        let on_hand = match db::on_hand(conn, &sku)? {
            Some(n) => Some(n),
            None => {
                let listed = shelfsync_node::catalog::standing(conn, &sku)?.is_some_and(|(listed, _)| listed);
                (listed || crate::incoming::incoming(conn, &sku)? > 0).then_some(0)
            }
        };
        on_hand.map(|on_hand| view(conn, &store, sku, on_hand)).transpose()
    })
    .await
}

/// A page of stock in SKU order, starting after `after`.
pub async fn stock_page(db: &Db, after: Option<Sku>, limit: usize) -> Result<Vec<StockView>, DbError> {
    let store = db.identity().store;
    db.read(move |conn| {
        // SKUs on hand, and SKUs only on their way here.
        let mut stmt = conn.prepare_cached(
            "SELECT sku, on_hand FROM stock WHERE sku > ?1
             UNION SELECT DISTINCT sku, 0 FROM incoming WHERE sku > ?1 AND sku NOT IN (SELECT sku FROM stock)
             ORDER BY sku LIMIT ?2",
        )?;
        let after = after.map(String::from).unwrap_or_default();
        let rows =
            stmt.query_map(params![after, limit as i64], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (sku, on_hand) = row?;
            out.push(view(conn, &store, db::sku_col(sku)?, on_hand)?);
        }
        Ok(out)
    })
    .await
}

/// Ledger figures for `/v1/status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerStatus {
    /// SKUs the store has seen.
    pub skus: u64,
    /// Journal events held (own and hub-authored).
    pub journal_events: u64,
    /// Own counter entries changed since the hub's last ack.
    pub unsynced_changes: u64,
    /// Own journal events not yet acked by the hub.
    pub unsynced_events: u64,
    /// Local counter sequence.
    pub counter_head: u64,
    /// Local journal sequence.
    pub journal_head: u64,
    /// Last time the hub acked something (ms).
    pub last_sync_ms: Option<i64>,
}

/// Status figures.
pub async fn status(db: &Db) -> Result<LedgerStatus, DbError> {
    let store_prefix = format!("{}@", db.identity().store);
    db.read(move |conn| {
        let count = |sql: &str| -> Result<u64, DbError> { Ok(conn.query_row(sql, [], |r| r.get(0))?) };
        let (acked, journal_acked, last_sync_ms): (u64, u64, Option<i64>) =
            conn.query_row("SELECT acked, journal_acked, last_sync_ms FROM hub_link WHERE id = 1", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?;
        let h = db::heads(conn)?;
        let unsynced_changes: u64 = conn.query_row(
            "SELECT COUNT(*) FROM counters WHERE seq > ?1 AND substr(writer, 1, ?2) = ?3",
            params![acked, store_prefix.len() as i64, store_prefix],
            |r| r.get(0),
        )?;
        let unsynced_events: u64 = conn.query_row(
            "SELECT COUNT(*) FROM journal WHERE seq > ?1 AND substr(writer, 1, ?2) = ?3 AND ordinal IS NOT NULL",
            params![journal_acked, store_prefix.len() as i64, store_prefix],
            |r| r.get(0),
        )?;
        Ok(LedgerStatus {
            skus: count("SELECT COUNT(*) FROM stock")?,
            journal_events: count("SELECT COUNT(*) FROM journal")?,
            unsynced_changes,
            unsynced_events,
            counter_head: h.counter,
            journal_head: h.journal,
            last_sync_ms,
        })
    })
    .await
}
