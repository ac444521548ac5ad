//! The agent's side of replication, as storage operations: what the sync client reads to ship to
//! the hub, and how it durably applies what the hub sends.

use rusqlite::{params, Connection};
use shelfsync_shared::counter::StateDigest;
use shelfsync_shared::lineage::HubLineage;
use shelfsync_shared::mac::EntryMac;
use shelfsync_shared::sync::{AgentResume, DeltaRead, JournalRead};
use shelfsync_shared::wire::{Delta, JournalBatch, Retirement};
use shelfsync_shared::{JournalEvent, RightsKind, Sku, StoreId, WriterId};

use crate::db::{self, Db, DbError};
use shelfsync_node::journal::{event_from_row, insert_event};

/// What the agent durably knows about its hub and itself, for `Hello`.
pub async fn resume(db: &Db) -> Result<AgentResume, DbError> {
    let current = db.current();
    db.read(move |conn| {
        let tx = conn.unchecked_transaction()?;
        let me = current.get().writer;
        let (hub_writer, applied, journal_applied, acked, journal_acked): (Option<String>, u64, u64, u64, u64) = tx
            .query_row(
                "SELECT hub_writer, applied, journal_applied, acked, journal_acked FROM hub_link WHERE id = 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )?;
        let h = db::heads(&tx)?;
        let resume = AgentResume {
            hub_writer: hub_writer.map(db::writer_col).transpose()?,
            applied,
            journal_applied,
            head: h.counter,
            journal_head: h.journal,
            lineage: crate::lineage::head(&tx, &me)?,
            boots: crate::lineage::boots(&tx, &me)?,
            retired: crate::lineage::pending_reports(&tx)?,
            // What the hub acked can never be beyond what this copy holds.
            acked: acked.min(h.counter),
            journal_acked: journal_acked.min(h.journal),
        };
        tx.finish()?;
        Ok(resume)
    })
    .await
}

/// Entries to ship above `after`, in sequence order, at most `limit`: the current writer's and
/// those of writers this database retired; in a `full` read also every entry the hub sent down,
/// with its tag (so a hub restored from older files gets back what it lost). The current
/// writer's lineage goes along, read in the same snapshot.
pub async fn read_delta(db: &Db, after: u64, limit: usize, full: bool) -> Result<DeltaRead, DbError> {
    let current = db.current();
    db.read(move |conn| {
        let tx = conn.unchecked_transaction()?; // one snapshot for entries, lineage and head
        let me = current.get().writer;
        let mut ours: std::collections::HashSet<String> =
            crate::lineage::retired_writers(&tx)?.iter().map(|w| w.to_string()).collect();
        ours.insert(me.to_string());
        // Escrow rights of this store's writers share the sequence: merged in by it, and counted
        // against the same limit (every rights row with a place is this database's own).
        let mut rights: std::collections::VecDeque<(u64, Sku, WriterId, RightsKind, u64)> = tx
            .prepare_cached("SELECT seq, sku, writer, kind, total FROM rights WHERE seq > ?1 ORDER BY seq LIMIT ?2")?
            .query_map(params![after, limit as i64 + 1], |r| {
                Ok((r.get(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?, r.get::<_, String>(3)?, r.get(4)?))
            })?
            .map(|row| {
                let (seq, sku, w, k, total) = row?;
                Ok((seq, db::sku_col(sku)?, db::writer_col(w)?, crate::rights::kind_of(&k)?, total))
            })
            .collect::<Result<_, DbError>>()?;
        let mut stmt =
            tx.prepare_cached("SELECT sku, writer, p, n, seq, mac FROM counters WHERE seq > ?1 ORDER BY seq")?;
        let mut rows = stmt.query(params![after])?;
        let mut read = DeltaRead::default();
        let mut more = false;
        let take_rights = |read: &mut DeltaRead, rights: &mut std::collections::VecDeque<_>, below: u64| -> bool {
            while rights.front().is_some_and(|r: &(u64, Sku, WriterId, RightsKind, u64)| r.0 < below) {
                if read.entries.len() + read.rights.len() == limit {
                    return true;
                }
                let (seq, sku, w, k, total) = rights.pop_front().expect("checked");
                read.rights.push((sku, w, k, total));
                read.upto = seq;
            }
            false
        };
        while let Some(r) = rows.next()? {
            let writer: String = r.get(1)?;
            let mac: Option<Vec<u8>> = r.get(5)?;
            let tag: Option<EntryMac> =
                if ours.contains(&writer) || !full { None } else { mac.and_then(|m| m.try_into().ok()) };
            if !ours.contains(&writer) && tag.is_none() {
                continue;
            }
            let (p, n, seq): (u64, u64, u64) = (r.get(2)?, r.get(3)?, r.get(4)?);
            if take_rights(&mut read, &mut rights, seq) || read.entries.len() + read.rights.len() == limit {
                more = true;
                break;
            }
            if let Some(tag) = tag {
                read.macs.push((read.entries.len() as u32, tag));
            }
            read.entries.push((db::sku_col(r.get(0)?)?, db::writer_col(writer)?, shelfsync_shared::PnEntry { p, n }));
            read.upto = seq;
        }
        if !more {
            more = take_rights(&mut read, &mut rights, u64::MAX);
        }
        drop(rows);
        drop(stmt);
        if !more {
            read.upto = db::heads(&tx)?.counter.max(after);
        }
        read.fulfilled = crate::holds::fulfilled_between(&tx, after, read.upto)?;
        read.lineage = Some(crate::lineage::head(&tx, &me)?);
        tx.finish()?;
        Ok(read)
    })
    .await
}

/// Digest of the hub-authored entries held here (compared with the hub's in `Welcome`).
pub async fn hub_entries_digest(db: &Db) -> Result<StateDigest, DbError> {
    db.read(|conn| {
        let mut d = StateDigest::default();
        let mut stmt =
            conn.prepare_cached("SELECT sku, writer, p, n FROM counters WHERE substr(writer, 1, 4) = 'hub@'")?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            d.add(
                &db::sku_col(r.get(0)?)?,
                &db::writer_col(r.get(1)?)?,
                shelfsync_shared::PnEntry { p: r.get(2)?, n: r.get(3)? },
            );
        }
        Ok(d)
    })
    .await
}

/// Judges the current writer's history against the hub's (a write job, so nothing else writes in
/// between) and retires it if it forked. `Some(report)`: the writer changed; the connection must
/// start over.
pub async fn check_lineage(db: &Db, hub: HubLineage) -> Result<Option<Retirement>, DbError> {
    let current = db.current();
    db.write(move |conn| {
        let me = current.get().writer;
        let now = shelfsync_node::now_ms();
        match crate::lineage::judge_and_retire(conn, &me, &hub, now)? {
            Some((report, new)) => {
                current.set_writer(new, now);
                Ok(Some(report))
            }
            None => Ok(None),
        }
    })
    .await
}

/// The hub answered our `Hello`, so it recorded the retirements it carried.
pub async fn reports_delivered(db: &Db) -> Result<(), DbError> {
    db.write(crate::lineage::reports_delivered).await
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

/// Merges the hub's entries durably (keeping the hub's tag of each entry that now holds the
/// hub's value) and records `delta.upto` as applied, in one transaction.
pub async fn apply_delta(db: &Db, peer: WriterId, delta: Delta) -> Result<(), DbError> {
    let current = db.current();
    db.write(move |conn| {
        adopt_hub(conn, &peer)?;
        let tags: std::collections::HashMap<u32, EntryMac> = delta.macs.iter().copied().collect();
        let mut touched = std::collections::BTreeSet::new();
        let mut seq = db::next_seq(conn)?;
        for (i, (sku, writer, incoming)) in delta.entries().enumerate() {
            incoming.check(writer)?;
            let current = db::entry(conn, sku, writer)?.unwrap_or_default();
            if !current.covers(incoming) {
                db::put_entry(conn, sku, writer, current.join(incoming), seq)?;
                seq += 1;
                touched.insert(sku.clone());
            }
            if let Some(tag) = tags.get(&(i as u32)).filter(|_| incoming.covers(current)) {
                conn.prepare_cached("UPDATE counters SET mac = ?3 WHERE sku = ?1 AND writer = ?2")?
                    .execute(params![sku.as_str(), writer.to_string(), tag.as_slice()])?;
            }
        }
        for sku in &touched {
            db::refresh_stock(conn, sku)?;
        }
        // A restock (or any hub change) is a moment to grant online its share, while connected.
        if !touched.is_empty() {
            crate::rights::grant_due(conn, &current.get())?;
        }
        let now = shelfsync_node::now_ms();
        conn.execute(
            "UPDATE hub_link SET applied = MAX(applied, ?1), last_sync_ms = ?2 WHERE id = 1",
            params![delta.upto, now],
        )?;
        Ok(())
    })
    .await
}

fn own_prefix(store: &StoreId) -> String {
    format!("{store}@")
}

/// This store's own journal events above `after`: written here (they have a lineage ordinal),
/// not the lines of the store's other lives the hub sent for the counts.
pub async fn read_journal(db: &Db, after: u64, limit: usize) -> Result<JournalRead, DbError> {
    let prefix = own_prefix(&db.identity().store);
    db.read(move |conn| {
        let tx = conn.unchecked_transaction()?;
        let mut stmt = tx.prepare_cached(
            "SELECT seq, id, line, kind, store, sku, delta, reason, occurred_at_ms, recorded_at_ms, writer, flags
             FROM journal WHERE seq > ?1 AND substr(writer, 1, ?2) = ?3 AND ordinal IS NOT NULL
             ORDER BY seq LIMIT ?4",
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
    let current = db.current();
    db.write(move |conn| {
        adopt_hub(conn, &peer)?;
        let me = current.get();
        let now = shelfsync_node::now_ms();
        for e in &batch.events {
            if e.store != store {
                return Err(DbError::Corrupt(format!("hub sent journal event {} of store {}", e.id, e.store)));
            }
            // A line that falls inside a count (or is one) moves what the count's corrections
            // must add up to (crate::counts).
            if insert_event(conn, e)? {
                crate::counts::settle_line(conn, &me, e, now).map_err(|e| match e {
                    crate::ledger::LedgerError::Db(d) => d,
                    other => DbError::Corrupt(format!("count correction: {other}")),
                })?;
            }
        }
        conn.execute("UPDATE hub_link SET journal_applied = MAX(journal_applied, ?1) WHERE id = 1", [batch.upto])?;
        Ok(())
    })
    .await
}

/// Inserts one of this agent's own events (current writer) with its place in the writer's
/// lineage. Returns whether it was new.
pub fn insert_own_event(conn: &Connection, e: &JournalEvent) -> Result<bool, DbError> {
    if !insert_event(conn, e)? {
        return Ok(false);
    }
    let c = crate::lineage::next(conn, &e.writer, &e.id, e.line, &e.sku, e.delta)?;
    conn.prepare_cached("UPDATE journal SET ordinal = ?3, chain = ?4 WHERE id = ?1 AND line = ?2")?
        .execute(params![e.id.as_bytes().as_slice(), e.line, c.ordinal, c.chain.as_slice()])?;
    Ok(true)
}

/// The hub durably holds our counter entries up to `upto`.
pub async fn set_acked(db: &Db, upto: u64) -> Result<(), DbError> {
    let now = shelfsync_node::now_ms();
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
