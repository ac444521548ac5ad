//! Counts ordered by `occurred_at` (Square's rule): a count says "there were N at time T"; every
//! change that occurred after T applies on top of it, every change that occurred at or before T is
//! inside it, and a count older than a newer count changes nothing. So a count uploaded late by a
//! handheld, or a sale backdated by an offline till, gives the `on_hand` it would have given on
//! time, whatever order the events arrive in.
//!
//! How it composes with the PN-counter: `on_hand` stays the sum of the counter entries. Every
//! `count` journal line is a *correction* by the agent's own writer; the newest count of a SKU
//! (its *anchor*: greatest `occurred_at`, then greatest id and line) fixes what the corrections
//! must add up to:
//!
//! ```text
//! Σ corrections = N − Σ { non-count deltas with occurred_at ≤ T }
//! ⇒ on_hand = Σ non-count deltas + Σ corrections = N + Σ { non-count deltas with occurred_at > T }
//! ```
//!
//! Whenever that sum is off, because a count arrived, or a change with `occurred_at ≤ T` arrived
//! (a backdated sale here, a hub journal event, a line of an earlier life of this store), the agent
//! writes the difference as one more `count` line (reason `rebase`, occurred at T) on its own
//! counter, in the same transaction. The counter stays a CRDT (only the owner writes its entry,
//! entries only grow); only the agent that owns the store computes corrections; the hub merges
//! them like any other change. A counter change whose journal line has not arrived yet (the
//! journal syncs after the counters) counts as "after T" until its line arrives and says when it
//! happened; then the next correction puts it in its place.
//!
//! Restocks and transfers carry the hub's time as their `occurred_at`. A transfer's units reach
//! `on_hand` only when received, so a count taken before the truck came in never swallows them.

use rusqlite::{params, Connection, OptionalExtension};
use shelfsync_shared::{EventKind, JournalEvent, Sku, UnixMs, WriterId};
use uuid::Uuid;

use crate::db::{self, DbError, Identity};
use crate::ledger::LedgerError;

/// Schema: the anchor of every counted SKU with the two sums its corrections need, kept up to
/// date line by line (so a backdated sale costs one row, not a scan of the SKU's history), and a
/// covering index for the scans a new anchor makes.
pub const MIGRATION: &str = "
    CREATE TABLE count_anchors (
        sku TEXT PRIMARY KEY, at_ms INTEGER NOT NULL, counted INTEGER NOT NULL,
        id BLOB NOT NULL, line INTEGER NOT NULL, writer TEXT NOT NULL,
        inside INTEGER NOT NULL, corrections INTEGER NOT NULL) WITHOUT ROWID;
    CREATE INDEX journal_sku_kind_at ON journal(sku, kind, occurred_at_ms, delta);";

/// The kinds that are changes (everything but counts), for index range scans.
const CHANGE_KINDS: &str = "('adjustment', 'fulfilment', 'restock', 'return', 'sale', 'transfer')";

/// Journal reason of a count line that states a quantity: `counted N`.
const COUNTED: &str = "counted ";
/// Journal reason of a correction written because the anchor's sum was off.
pub const REBASE: &str = "rebase";

/// The reason stored on a count's own line.
pub fn counted_reason(n: i64) -> String {
    format!("{COUNTED}{n}")
}

/// The quantity a count line states, if it is a count (not a rebase, not a count from before
/// counts were ordered by time, which recorded no quantity).
pub fn counted_of(reason: Option<&str>) -> Option<i64> {
    reason?.strip_prefix(COUNTED)?.parse().ok()
}

/// The newest count of a SKU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Anchor {
    /// When it was counted.
    pub at_ms: UnixMs,
    /// What was counted.
    pub counted: i64,
    /// Its request id and line (the tie-break between counts of the same millisecond).
    pub id: Uuid,
    /// Line within the request.
    pub line: u32,
    /// Who recorded it: that writer's agent keeps the corrections right (see [`rebase`]).
    pub writer: WriterId,
    /// Σ of the changes (not counts) that occurred at or before `at_ms`, as the journal holds them.
    pub inside: i64,
    /// Σ of every count line's delta (the corrections so far).
    pub corrections: i64,
}

impl Anchor {
    fn order(&self) -> (UnixMs, [u8; 16], u32) {
        (self.at_ms, *self.id.as_bytes(), self.line)
    }
}

/// The SKU's anchor, if it was ever counted.
pub fn anchor(conn: &Connection, sku: &Sku) -> Result<Option<Anchor>, DbError> {
    type Row = (i64, i64, Vec<u8>, u32, String, i64, i64);
    let row: Option<Row> = conn
        .prepare_cached(
            "SELECT at_ms, counted, id, line, writer, inside, corrections FROM count_anchors WHERE sku = ?1",
        )?
        .query_row([sku.as_str()], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?))
        })
        .optional()?;
    row.map(|(at_ms, counted, id, line, writer, inside, corrections)| {
        let id = Uuid::from_slice(&id).map_err(|e| DbError::Corrupt(format!("count anchor id: {e}")))?;
        Ok(Anchor { at_ms, counted, id, line, writer: db::writer_col(writer)?, inside, corrections })
    })
    .transpose()
}

/// Σ of the changes (not counts) of `sku` that occurred in `(after, upto]` (index only).
fn changes_between(conn: &Connection, sku: &Sku, after: Option<UnixMs>, upto: UnixMs) -> Result<i64, DbError> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT COALESCE(SUM(delta), 0) FROM journal
             WHERE sku = ?1 AND kind IN {CHANGE_KINDS} AND occurred_at_ms > ?2 AND occurred_at_ms <= ?3"
        ))?
        .query_row(params![sku.as_str(), after.unwrap_or(i64::MIN), upto], |r| r.get(0))?)
}

/// Makes `a` (its sums ignored) the SKU's anchor if it is newer than the current one, with the
/// sums as the journal holds them now. Returns whether it is now the anchor.
pub fn offer(conn: &Connection, sku: &Sku, a: &Anchor) -> Result<bool, DbError> {
    let current = anchor(conn, sku)?;
    if current.as_ref().is_some_and(|cur| cur.order() >= a.order()) {
        return Ok(false);
    }
    // A newer anchor is later in time: carry the sums over and add what lies between.
    let (inside, corrections) = match &current {
        Some(cur) => (cur.inside + changes_between(conn, sku, Some(cur.at_ms), a.at_ms)?, cur.corrections),
        None => (
            changes_between(conn, sku, None, a.at_ms)?,
            conn.prepare_cached("SELECT COALESCE(SUM(delta), 0) FROM journal WHERE sku = ?1 AND kind = 'count'")?
                .query_row([sku.as_str()], |r| r.get(0))?,
        ),
    };
    conn.prepare_cached(
        "INSERT INTO count_anchors (sku, at_ms, counted, id, line, writer, inside, corrections)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT (sku) DO UPDATE SET at_ms = excluded.at_ms, counted = excluded.counted,
             id = excluded.id, line = excluded.line, writer = excluded.writer,
             inside = excluded.inside, corrections = excluded.corrections",
    )?
    .execute(params![
        sku.as_str(),
        a.at_ms,
        a.counted,
        a.id.as_bytes().as_slice(),
        a.line,
        a.writer.to_string(),
        inside,
        corrections
    ])?;
    Ok(true)
}

/// A journal line of `sku` was just stored: the anchor's sums take it in. Returns the anchor
/// (after) when the line falls inside it or is a count, i.e. when a correction may be due.
pub fn note_line(
    conn: &Connection,
    sku: &Sku,
    kind: EventKind,
    occurred_at_ms: UnixMs,
    delta: i64,
) -> Result<Option<Anchor>, DbError> {
    let Some(mut a) = anchor(conn, sku)? else { return Ok(None) };
    let column = if kind == EventKind::Count {
        a.corrections += delta;
        "corrections"
    } else if occurred_at_ms <= a.at_ms {
        a.inside += delta;
        "inside"
    } else {
        return Ok(None);
    };
    if delta != 0 {
        conn.prepare_cached(&format!("UPDATE count_anchors SET {column} = {column} + ?2 WHERE sku = ?1"))?
            .execute(params![sku.as_str(), delta])?;
    }
    Ok(Some(a))
}

fn note(conn: &Connection, e: &JournalEvent) -> Result<Option<Anchor>, DbError> {
    note_line(conn, &e.sku, e.kind, e.occurred_at_ms, e.delta)
}

/// Whether this agent keeps `a`'s corrections: it recorded the count, or the writer that did is
/// one this database retired (an earlier life of these files). A count of another live agent of
/// the store (a store may run several) is that agent's to keep; if both corrected, each would
/// answer the other's correction and they would never settle.
fn keeps(conn: &Connection, me: &Identity, a: &Anchor) -> Result<bool, DbError> {
    if a.writer == me.writer {
        return Ok(true);
    }
    Ok(conn
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM retired WHERE old = ?1)")?
        .query_row([a.writer.to_string()], |r| r.get(0))?)
}

/// What the corrections still lack: `N − Σ{changes ≤ T} − Σ corrections` (0 without a count).
pub fn shortfall(conn: &Connection, sku: &Sku) -> Result<i64, DbError> {
    Ok(anchor(conn, sku)?.map_or(0, |a| a.counted - a.inside - a.corrections))
}

/// [`shortfall`] recomputed from the whole journal, for tests that check the kept sums.
pub fn shortfall_by_scan(conn: &Connection, sku: &Sku) -> Result<i64, DbError> {
    let Some(a) = anchor(conn, sku)? else { return Ok(0) };
    let corrections: i64 = conn
        .prepare_cached("SELECT COALESCE(SUM(delta), 0) FROM journal WHERE sku = ?1 AND kind = 'count'")?
        .query_row([sku.as_str()], |r| r.get(0))?;
    Ok(a.counted - changes_between(conn, sku, None, a.at_ms)? - corrections)
}

/// Σ of the non-count changes that occurred after `at_ms` (what a count at `at_ms` has on top).
pub fn changes_after(conn: &Connection, sku: &Sku, at_ms: UnixMs) -> Result<i64, DbError> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT COALESCE(SUM(delta), 0) FROM journal WHERE sku = ?1 AND kind IN {CHANGE_KINDS} AND occurred_at_ms > ?2"
        ))?
        .query_row(params![sku.as_str(), at_ms], |r| r.get(0))?)
}

/// Writes the correction the anchor needs, if any and if this agent keeps the anchor, as a
/// `rebase` count line of `me` occurred at the anchor's time. Returns the delta written (0 when
/// the sum was right or the anchor is another live agent's).
pub fn rebase(conn: &Connection, me: &Identity, sku: &Sku, now: UnixMs) -> Result<i64, LedgerError> {
    let Some(a) = anchor(conn, sku)? else { return Ok(0) };
    if !keeps(conn, me, &a)? {
        return Ok(0);
    }
    let need = shortfall(conn, sku)?;
    if need == 0 {
        return Ok(0);
    }
    let at = a.at_ms;
    let entry = db::entry(conn, sku, &me.writer)?.unwrap_or_default().apply(&me.writer, need)?;
    db::put_entry(conn, sku, &me.writer, entry, db::next_seq(conn)?)?;
    db::refresh_stock(conn, sku)?;
    let line = JournalEvent {
        id: Uuid::now_v7(),
        line: 0,
        kind: EventKind::Count,
        store: me.store.clone(),
        sku: sku.clone(),
        delta: need,
        reason: Some(REBASE.into()),
        occurred_at_ms: at,
        recorded_at_ms: now,
        writer: me.writer.clone(),
        flags: Vec::new(),
    };
    crate::replica::insert_own_event(conn, &line)?;
    note(conn, &line)?;
    tracing::debug!(%sku, need, "count rebased");
    Ok(need)
}

/// After a journal line was stored (own or from the hub; the ledger notes the lines of its own
/// requests itself, with [`note_line`]): the anchor's sums take it in, a count line offers itself as the
/// anchor, and a line inside the anchor (or any count) rebases. Returns the anchor's time when
/// the line fell inside it.
pub fn settle_line(
    conn: &Connection,
    me: &Identity,
    e: &JournalEvent,
    now: UnixMs,
) -> Result<Option<UnixMs>, LedgerError> {
    let inside = note(conn, e)?;
    if e.kind == EventKind::Count {
        if let Some(counted) = counted_of(e.reason.as_deref()) {
            let a = Anchor {
                at_ms: e.occurred_at_ms,
                counted,
                id: e.id,
                line: e.line,
                writer: e.writer.clone(),
                inside: 0,
                corrections: 0,
            };
            offer(conn, &e.sku, &a)?;
        }
    }
    let Some(a) = anchor(conn, &e.sku)? else { return Ok(None) };
    if e.kind != EventKind::Count && inside.is_none() {
        return Ok(None);
    }
    rebase(conn, me, &e.sku, now)?;
    Ok(Some(a.at_ms))
}
