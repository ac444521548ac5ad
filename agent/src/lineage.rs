//! The agent's side of writer lineage ([`shelfsync_shared::lineage`]): every own change gets an
//! ordinal and a chain value in the same transaction as its journal row, every start of the agent
//! on its files records a boot, and a writer whose history the hub shows to have forked (the files
//! were put back, or copied to a second machine) is retired: its changes after the fork move to a
//! derived successor writer before anything is shipped, so no acknowledged sale is swallowed by
//! max-merge and none is counted twice.

use rusqlite::{params, Connection, OptionalExtension};
use shelfsync_shared::lineage::{self, Boot, Chain, Checkpoint, HubLineage, Verdict};
use shelfsync_shared::wire::Retirement;
use shelfsync_shared::{PnEntry, Sku, WriterId};
use uuid::Uuid;

use crate::db::{self, DbError};

/// Schema for lineage: ordinals and chain values on own journal rows, the head per writer, boots,
/// retired writers, and the tags of entries the hub sent.
pub const MIGRATION: &str = "
    ALTER TABLE journal ADD COLUMN ordinal INTEGER;
    ALTER TABLE journal ADD COLUMN chain BLOB;
    CREATE UNIQUE INDEX journal_lineage ON journal(writer, ordinal) WHERE ordinal IS NOT NULL;
    CREATE TABLE lineage (writer TEXT PRIMARY KEY, ordinal INTEGER NOT NULL, chain BLOB NOT NULL) WITHOUT ROWID;
    CREATE TABLE boots (
        n INTEGER PRIMARY KEY AUTOINCREMENT, id INTEGER NOT NULL, writer TEXT NOT NULL,
        ordinal INTEGER NOT NULL, chain BLOB NOT NULL, at_ms INTEGER NOT NULL);
    CREATE INDEX boots_writer ON boots(writer, n);
    CREATE TABLE retired (
        old TEXT PRIMARY KEY, new TEXT NOT NULL, cut_ordinal INTEGER NOT NULL, report TEXT NOT NULL,
        reported INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID;
    ALTER TABLE counters ADD COLUMN mac BLOB;";

/// Most boots kept per writer.
const BOOTS_KEPT: i64 = 64;

fn chain_col(v: Vec<u8>) -> Result<Chain, DbError> {
    v.try_into().map_err(|v: Vec<u8>| DbError::Corrupt(format!("lineage chain of {} bytes", v.len())))
}

/// `writer`'s history so far.
pub fn head(conn: &Connection, writer: &WriterId) -> Result<Checkpoint, DbError> {
    let row: Option<(u64, Vec<u8>)> = conn
        .prepare_cached("SELECT ordinal, chain FROM lineage WHERE writer = ?1")?
        .query_row([writer.to_string()], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    match row {
        Some((ordinal, chain)) => Ok(Checkpoint { ordinal, chain: chain_col(chain)? }),
        None => Ok(Checkpoint::ZERO),
    }
}

fn set_head(conn: &Connection, writer: &WriterId, c: Checkpoint) -> Result<(), DbError> {
    conn.prepare_cached(
        "INSERT INTO lineage (writer, ordinal, chain) VALUES (?1, ?2, ?3)
         ON CONFLICT (writer) DO UPDATE SET ordinal = excluded.ordinal, chain = excluded.chain",
    )?
    .execute(params![writer.to_string(), c.ordinal, c.chain.as_slice()])?;
    Ok(())
}

/// The next change of `writer` (an own journal event): returns its checkpoint, to be stored on
/// the journal row in the same transaction.
pub fn next(
    conn: &Connection,
    writer: &WriterId,
    id: &Uuid,
    line: u32,
    sku: &Sku,
    delta: i64,
) -> Result<Checkpoint, DbError> {
    let c = head(conn, writer)?.next(id, line, sku, delta);
    set_head(conn, writer, c)?;
    Ok(c)
}

/// `writer`'s chain value after `ordinal` changes, if it made that many.
fn chain_at(conn: &Connection, writer: &WriterId, ordinal: u64) -> Result<Option<Chain>, DbError> {
    if ordinal == 0 {
        return Ok(Some(lineage::GENESIS));
    }
    let v: Option<Vec<u8>> = conn
        .prepare_cached("SELECT chain FROM journal WHERE writer = ?1 AND ordinal = ?2")?
        .query_row(params![writer.to_string(), ordinal], |r| r.get(0))
        .optional()?;
    v.map(chain_col).transpose()
}

/// The boots of `writer`'s history here, oldest first.
pub fn boots(conn: &Connection, writer: &WriterId) -> Result<Vec<Boot>, DbError> {
    let rows = conn
        .prepare_cached("SELECT id, ordinal, chain FROM boots WHERE writer = ?1 ORDER BY n")?
        .query_map([writer.to_string()], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, u64>(1)?, r.get::<_, Vec<u8>>(2)?)))?
        .collect::<Result<Vec<_>, _>>()?;
    rows.into_iter()
        .map(|(id, ordinal, chain)| Ok(Boot { id: id as u64, at: Checkpoint { ordinal, chain: chain_col(chain)? } }))
        .collect()
}

fn add_boot(conn: &Connection, writer: &WriterId, id: u64, at: Checkpoint, now_ms: i64) -> Result<(), DbError> {
    conn.prepare_cached("INSERT INTO boots (id, writer, ordinal, chain, at_ms) VALUES (?1, ?2, ?3, ?4, ?5)")?
        .execute(params![id as i64, writer.to_string(), at.ordinal, at.chain.as_slice(), now_ms])?;
    conn.prepare_cached(
        "DELETE FROM boots WHERE writer = ?1 AND n NOT IN (SELECT n FROM boots WHERE writer = ?1 ORDER BY n DESC LIMIT ?2)",
    )?
    .execute(params![writer.to_string(), BOOTS_KEPT])?;
    Ok(())
}

/// One own change as the journal holds it.
struct OwnRow {
    seq: i64,
    id: Uuid,
    line: u32,
    sku: Sku,
    delta: i64,
    recorded_ms: i64,
}

/// Own changes of `writer` selected by `filter` (a condition on the journal row, `?2` bound to
/// `bound`), in `order`.
fn own_rows(
    conn: &Connection,
    writer: &WriterId,
    filter: &str,
    bound: u64,
    order: &str,
) -> Result<Vec<OwnRow>, DbError> {
    let sql = format!(
        "SELECT seq, id, line, sku, delta, recorded_at_ms FROM journal WHERE writer = ?1 AND {filter} ORDER BY {order}"
    );
    let rows = conn
        .prepare(&sql)?
        .query_map(params![writer.to_string(), bound], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?, r.get(2)?, r.get::<_, String>(3)?, r.get(4)?, r.get(5)?))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    rows.into_iter()
        .map(|(seq, id, line, sku, delta, recorded_ms)| {
            let id = Uuid::from_slice(&id).map_err(|e| DbError::Corrupt(format!("journal id: {e}")))?;
            Ok(OwnRow { seq, id, line, sku: db::sku_col(sku)?, delta, recorded_ms })
        })
        .collect()
}

/// At every start: gives own changes made before lineage existed their ordinals (an upgraded
/// database), and records the boot of `writer` where its history stands.
pub fn start(conn: &Connection, writer: &WriterId, now_ms: i64) -> Result<(), DbError> {
    let missing: u64 = conn.query_row(
        "SELECT COUNT(*) FROM journal WHERE writer = ?1 AND ordinal IS NULL",
        [writer.to_string()],
        |r| r.get(0),
    )?;
    if missing > 0 {
        for r in own_rows(conn, writer, "ordinal IS NULL AND ?2 = ?2", 0, "seq")? {
            let c = next(conn, writer, &r.id, r.line, &r.sku, r.delta)?;
            conn.execute(
                "UPDATE journal SET ordinal = ?2, chain = ?3 WHERE seq = ?1",
                params![r.seq, c.ordinal, c.chain.as_slice()],
            )?;
        }
        tracing::info!(%writer, changes = missing, "gave the changes of an older database their lineage");
    }
    let at = head(conn, writer)?;
    add_boot(conn, writer, rand::random(), at, now_ms)?;
    Ok(())
}

/// The first column of every row of `sql`, as text.
fn texts(conn: &Connection, sql: &str) -> Result<Vec<String>, DbError> {
    Ok(conn.prepare_cached(sql)?.query_map([], |r| r.get::<_, String>(0))?.collect::<Result<Vec<_>, _>>()?)
}

/// Retirements this database made that no hub has acknowledged yet.
pub fn pending_reports(conn: &Connection) -> Result<Vec<Retirement>, DbError> {
    texts(conn, "SELECT report FROM retired WHERE reported = 0 ORDER BY old")?
        .iter()
        .map(|r| serde_json::from_str(r).map_err(|e| DbError::Corrupt(format!("retirement report: {e}"))))
        .collect()
}

/// A hub recorded the pending retirements (it answered our `Hello`).
pub fn reports_delivered(conn: &Connection) -> Result<(), DbError> {
    conn.execute("UPDATE retired SET reported = 1 WHERE reported = 0", [])?;
    Ok(())
}

/// Writers this database retired (their entries are ours to ship; nobody writes them again).
pub fn retired_writers(conn: &Connection) -> Result<Vec<WriterId>, DbError> {
    texts(conn, "SELECT old FROM retired")?.into_iter().map(db::writer_col).collect()
}

/// Judges `me`'s history against what the hub merged (`hub`) and, if it forked, retires
/// `me` in this transaction: its changes after the fork point move to the successor writer (journal
/// rows, ordinals, counter entries with fresh sequences), its boots in that stretch go along, the
/// successor starts here with a boot of its own, the hub watermarks start over, and a report
/// waits for the next `Hello`. Returns the report, or `None` if `me` may keep writing.
pub fn judge_and_retire(
    conn: &Connection,
    me: &WriterId,
    hub: &HubLineage,
    now_ms: i64,
) -> Result<Option<(Retirement, WriterId)>, DbError> {
    let own = head(conn, me)?;
    let own_boots = boots(conn, me)?;
    // The judge asks for chain values at the hub's points only; look those up first.
    let mut wanted: Vec<u64> = hub.points.iter().chain(std::iter::once(&hub.head)).map(|p| p.ordinal).collect();
    wanted.retain(|&o| o <= own.ordinal);
    let mut chains = std::collections::HashMap::new();
    for o in wanted {
        if let Some(c) = chain_at(conn, me, o)? {
            chains.insert(o, c);
        }
    }
    let verdict = lineage::judge(own, |o| chains.get(&o).copied(), &own_boots, hub);
    let Verdict::Fork { at, ambiguous, reason } = verdict else { return Ok(None) };

    let cut = Checkpoint { ordinal: at, chain: chain_at(conn, me, at)?.unwrap_or(lineage::GENESIS) };
    let moved = own_rows(conn, me, "ordinal > ?2", at, "ordinal")?;
    let new = lineage::successor(me, &cut, moved.first().map(|m| (m.id, m.line)), rand::random());

    // Journal rows and ordinals move; their sums per SKU move between the counter entries.
    let mut sums: std::collections::BTreeMap<Sku, PnEntry> = Default::default();
    let mut chain = Checkpoint::ZERO;
    let mut ordinals = Vec::with_capacity(moved.len());
    let mut window: Option<(i64, i64)> = None;
    for m in &moved {
        chain = chain.next(&m.id, m.line, &m.sku, m.delta);
        ordinals.push(chain);
        conn.prepare_cached("UPDATE journal SET writer = ?2, ordinal = ?3, chain = ?4 WHERE seq = ?1")?
            .execute(params![m.seq, new.to_string(), chain.ordinal, chain.chain.as_slice()])?;
        let s = sums.entry(m.sku.clone()).or_default();
        *s = s.apply(&new, m.delta)?;
        let at = m.recorded_ms;
        window = Some(window.map_or((at, at), |(a, b)| (a.min(at), b.max(at))));
    }
    let mut seq = db::next_seq(conn)?;
    for (sku, s) in &sums {
        let old = db::entry(conn, sku, me)?.unwrap_or_default();
        let left = PnEntry {
            p: old
                .p
                .checked_sub(s.p)
                .ok_or_else(|| DbError::Corrupt(format!("{me}'s entry for {sku} is below its journal")))?,
            n: old
                .n
                .checked_sub(s.n)
                .ok_or_else(|| DbError::Corrupt(format!("{me}'s entry for {sku} is below its journal")))?,
        };
        db::put_entry(conn, sku, me, left, seq)?;
        db::put_entry(conn, sku, &new, *s, seq + 1)?;
        seq += 2;
        db::refresh_stock(conn, sku)?;
    }
    set_head(conn, &new, chain)?;
    // Starts of these files inside the moved stretch stay starts of the new history (another
    // copy that makes the same decision derives the same writer; boots tell the two apart).
    for b in own_boots.iter().filter(|b| b.at.ordinal >= at) {
        let k = (b.at.ordinal - at) as usize;
        let c = if k == 0 { Checkpoint::ZERO } else { ordinals[k - 1] };
        conn.execute(
            "UPDATE boots SET writer = ?2, ordinal = ?3, chain = ?4 WHERE writer = ?1 AND id = ?5",
            params![me.to_string(), new.to_string(), c.ordinal, c.chain.as_slice(), b.id as i64],
        )?;
    }
    add_boot(conn, &new, rand::random(), chain, now_ms)?;
    let report = Retirement {
        old: me.clone(),
        new: new.clone(),
        reason,
        fork_ordinal: at,
        hub_ordinal: hub.head.ordinal,
        own_ordinal: own.ordinal,
        moved: moved.len() as u64,
        ambiguous,
        window_ms: window,
        at_ms: now_ms,
    };
    switch_writer(conn, &report, at)?;
    Ok(Some((report, new)))
}

/// An explicit restore (`shelfsync-agent restore`): retires `me` where its history stands in the
/// backup, before the restored files make any change, so every change from now on is a new
/// writer's and none can collide with what the original files did after the backup. Nothing
/// moves; `me`'s entries stay as the backup had them and are shipped as a retired writer's (the
/// hub max-merges them with what it holds of `me`); the watermarks start over, and a report
/// (`rolled_back`, fork at the backup's head, hub ordinal 0: not known at restore) waits for the
/// next `Hello`.
pub fn retire_restored(conn: &Connection, me: &WriterId, now_ms: i64) -> Result<(Retirement, WriterId), DbError> {
    let own = head(conn, me)?;
    let new = lineage::successor(me, &own, None, rand::random());
    add_boot(conn, &new, rand::random(), Checkpoint::ZERO, now_ms)?;
    let report = Retirement {
        old: me.clone(),
        new: new.clone(),
        reason: lineage::RetireReason::RolledBack,
        fork_ordinal: own.ordinal,
        hub_ordinal: 0,
        own_ordinal: own.ordinal,
        moved: 0,
        ambiguous: 0,
        window_ms: None,
        at_ms: now_ms,
    };
    switch_writer(conn, &report, own.ordinal)?;
    Ok((report, new))
}

/// Records a retirement (its report waits for the next `Hello`) and makes its new writer the one
/// these files record under from now on. Everything is shipped anew under the new writer; the
/// hub's entries of the old one come back down (they are another writer's now) and max-merge
/// with what this copy kept of it.
fn switch_writer(conn: &Connection, report: &Retirement, cut_ordinal: u64) -> Result<(), DbError> {
    conn.execute(
        "INSERT INTO retired (old, new, cut_ordinal, report) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (old) DO UPDATE SET new = excluded.new, cut_ordinal = excluded.cut_ordinal, report = excluded.report, reported = 0",
        params![
            report.old.to_string(),
            report.new.to_string(),
            cut_ordinal,
            serde_json::to_string(report).expect("reports serialise")
        ],
    )?;
    db::meta_set(conn, "writer", &report.new.to_string())?;
    db::meta_set(conn, "incarnation_started_ms", &report.at_ms.to_string())?;
    conn.execute(
        "UPDATE hub_link SET hub_writer = NULL, applied = 0, journal_applied = 0, acked = 0, journal_acked = 0 WHERE id = 1",
        [],
    )?;
    Ok(())
}
