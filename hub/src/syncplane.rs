//! The sync plane of a partitioned database: agents' deltas merged straight into PostgreSQL by
//! whichever hub the agent reached, and everything an agent reads back, by the store's own
//! sequence (`hub/docs/scale-out.md`, "Step 3, revised").
//!
//! The counters are a CRDT: merging is a component-wise maximum, so any hub may merge any delta
//! without asking a decider, and merging twice changes nothing. What needs ordering is ordered by
//! row locks, taken in one order by every transaction (no deadlock between them):
//!
//! 1. the agent writer's `peers` row: the lineage compare-and-set. A cloned agent's second
//!    connection, on this hub or another, waits for the first merge and then fails it;
//! 2. the store's `store_seqs` row: the store's sequence. Entries are stamped under it, so a
//!    store's sequence follows commit order, and a reader that read the head `h` never later
//!    finds a new row at or below `h` (gaps are allowed; going back is not);
//!
//! Each partition's decider learns of merges from its `merge_log` rows ([`tail`]), one per merge
//! that grew an entry of its SKUs, keyed by (partition, store, the store's sequence after the
//! merge): in order per store, which is all a merge needs (stores are independent). The decider
//! deletes the rows it applied in the commit that applies them ([`APPLIED`]), so the log holds
//! only what is still to apply, and no lock orders merges of different stores: the sync plane
//! scales with stores, not with one sequence.
//!
//! The single-decider path (SQLite, PostgreSQL with one partition) does not use this module.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use shelfsync_hub_core::{Partition, Partitions};
use shelfsync_shared::counter::StateDigest;
use shelfsync_shared::journal::JournalEvent;
use shelfsync_shared::lineage::{Boot, Checkpoint, HubLineage};
use shelfsync_shared::wire::DeltaLineage;
use shelfsync_shared::{PnEntry, Sku, StoreId, WriterId};

use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Statement};
use uuid::Uuid;

use crate::storage::{StorageError, StorageResult};

/// Schema (PostgreSQL migration 5): the store sequences, the partitions' merge logs, and which
/// partition and store sequence each counter row has.
pub const MIGRATION: &str = "
    ALTER TABLE counters ADD COLUMN partition SMALLINT NOT NULL DEFAULT 0;
    ALTER TABLE counters ADD COLUMN store_seq BIGINT;
    CREATE INDEX counters_store_seq ON counters(store, store_seq) WHERE store_seq IS NOT NULL;
    CREATE TABLE store_seqs (
        store TEXT PRIMARY KEY, counter BIGINT NOT NULL DEFAULT 0, journal BIGINT NOT NULL DEFAULT 0);
    CREATE TABLE merge_log (
        partition SMALLINT NOT NULL, store TEXT NOT NULL, kind SMALLINT NOT NULL, seq BIGINT NOT NULL,
        body BYTEA NOT NULL, at TIMESTAMPTZ NOT NULL DEFAULT now(), PRIMARY KEY (partition, store, kind, seq));
    ALTER TABLE journal ADD COLUMN store_seq BIGINT;
    CREATE INDEX journal_store_store_seq ON journal(store, store_seq) WHERE store_seq IS NOT NULL;";

/// What a partition's decider runs in the commit that applied one merge-log row (arguments:
/// partition, store, kind, the row's sequence). One row each: a row applied later never takes
/// an earlier one it did not apply with it.
pub const APPLIED: &str = "DELETE FROM merge_log WHERE partition = $1 AND store = $2 AND kind = $3 AND seq = $4";

/// What a merge-log row comes from, and so which of the store's sequences numbers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogKind {
    /// An agent's delta (the store's counter sequence).
    Delta = 0,
    /// An agent's journal batch (the store's journal sequence).
    Journal = 1,
    /// What a hub noticed about a store's agents (conflicts, retirements), for the home
    /// partition's decider ([`HOME`]); numbered at random (they need no order).
    Agent = 2,
}

impl LogKind {
    /// The `kind` column.
    pub fn col(self) -> i16 {
        self as i16
    }

    fn of(v: i16) -> StorageResult<LogKind> {
        match v {
            0 => Ok(LogKind::Delta),
            1 => Ok(LogKind::Journal),
            2 => Ok(LogKind::Agent),
            _ => Err(StorageError::Corrupt(format!("merge_log.kind {v}"))),
        }
    }
}

/// Most entries one delta may bring (the wire's own limit is lower; this guards the SQL arrays).
pub const ENTRIES_MAX: usize = 100_000;

/// An agent's delta, authenticated by the caller (certificate, tags, own writers), to merge.
#[derive(Clone, Debug)]
pub struct AgentDelta {
    /// The store (from the agent's certificate).
    pub store: StoreId,
    /// The agent writer that sent it.
    pub peer: WriterId,
    /// Entries in the order received.
    pub entries: Vec<(Sku, WriterId, PnEntry)>,
    /// Holds the store fulfilled in this range.
    pub fulfilled: Vec<Uuid>,
    /// The store's escrow rights entries in this range (the deciders merge them; grow-only).
    pub rights: Vec<shelfsync_hub_core::RightsUpdate>,
    /// The agent's sequence this delta completes.
    pub upto: u64,
    /// The writer's history head the connection was welcomed with: the merge fails if another
    /// connection moved it since.
    pub lineage_base: Option<Checkpoint>,
    /// The writer's history at the end of this delta, when it completes everything it wrote.
    pub lineage: Option<DeltaLineage>,
    /// Latest starts of the copy that sent it.
    pub pusher_boots: Vec<Boot>,
    /// When.
    pub at_ms: i64,
}

/// What one partition's decider takes from a merge: the entries of its SKUs that grew, and the
/// holds the store fulfilled (every part carries them all; a decider ignores holds it never made).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergePart {
    /// Entries that grew.
    pub entries: Vec<(Sku, WriterId, PnEntry)>,
    /// Fulfilled holds.
    pub fulfilled: Vec<Uuid>,
    /// SKUs of this partition the store flagged unknown or inactive in new journal events.
    pub flagged: Vec<Sku>,
    /// The tills' adjustments of this partition's SKUs among new journal events.
    pub adjustments: Vec<JournalEvent>,
    /// What a hub noticed about the store's agents (home partition only).
    pub notes: Vec<AgentNote>,
    /// The store's escrow rights entries of this partition's SKUs.
    pub rights: Vec<shelfsync_hub_core::RightsUpdate>,
}

/// The partition whose decider records what concerns a store's agents rather than a SKU
/// (duplicate or cloned agents, retired writers).
pub const HOME: Partition = 0;

/// What a hub noticed about a store's agents, recorded by the home partition's decider as a
/// conflict (idempotent: the same report makes the same conflict).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentNote {
    /// A duplicate or cloned agent (`kind` as named on the API), `key` what makes two reports
    /// the same, `details` its JSON.
    Conflict {
        /// Which.
        kind: shelfsync_hub_core::AgentConflictKind,
        /// Two reports with the same key are one conflict.
        key: String,
        /// JSON.
        details: String,
    },
    /// An agent retired a writer (its files forked).
    Retired(shelfsync_shared::wire::Retirement),
}

/// What a merge did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Merged {
    /// The entries that grew, as (SKU, writer) (the rest were known already).
    pub grown: Vec<(Sku, WriterId)>,
    /// The store's sequence after it.
    pub head: u64,
    /// The partitions given a merge-log row (each at `head`).
    pub parts: Vec<Partition>,
}

fn part_col(p: Partition) -> i16 {
    i16::try_from(p).expect("at most Partitions::MAX partitions")
}

fn big(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn unsigned(v: i64, what: &str) -> StorageResult<u64> {
    u64::try_from(v).map_err(|_| StorageError::Corrupt(format!("{what} is negative: {v}")))
}

/// The statements of a merge, prepared once per connection.
struct Statements {
    lock_peer: Statement,
    lock_store: Statement,
    insert_journal: Statement,
    bump_journal: Statement,
    journal_applied: Statement,
    upsert: Statement,
    bump_store: Statement,
    notify: Statement,
    log: Statement,
    applied: Statement,
}

/// A connection that merges agents' deltas ([`SyncPlane::merge`]), its statements prepared.
pub struct SyncPlane {
    client: Client,
    stmts: Statements,
}

impl SyncPlane {
    /// Connects and prepares.
    pub async fn connect(url: &str) -> StorageResult<SyncPlane> {
        let client = crate::postgres::connect(url).await?;
        let (lock_peer, lock_store, upsert, bump_store, notify, log, applied) = tokio::try_join!(
            // Upserts that always touch the row: they take its lock and return it in one trip.
            client.prepare(
                "INSERT INTO peers (store, writer) VALUES ($1, $2)
                 ON CONFLICT (store, writer) DO UPDATE SET store = excluded.store RETURNING lineage"
            ),
            client.prepare(
                "INSERT INTO store_seqs (store) VALUES ($1)
                 ON CONFLICT (store) DO UPDATE SET store = excluded.store RETURNING counter, journal"
            ),
            client.prepare(
                "INSERT INTO counters (store, sku, writer, p, n, seq, partition, store_seq)
                 SELECT $1, s, w, p, n, q, pt, q
                 FROM unnest($2::text[], $3::text[], $4::int8[], $5::int8[], $6::int2[], $7::int8[]) AS u(s, w, p, n, pt, q)
                 ON CONFLICT (store, sku, writer) DO UPDATE SET
                     p = GREATEST(counters.p, excluded.p), n = GREATEST(counters.n, excluded.n),
                     seq = excluded.seq, store_seq = excluded.store_seq, partition = excluded.partition
                 WHERE counters.p < excluded.p OR counters.n < excluded.n
                 RETURNING sku, writer"
            ),
            client.prepare("UPDATE store_seqs SET counter = $2 WHERE store = $1"),
            client.prepare(crate::notify::NOTIFY),
            client.prepare(
                "INSERT INTO merge_log (partition, store, kind, seq, body)
                 SELECT pt, $1, $5, $2, b FROM unnest($3::int2[], $4::bytea[]) AS u(pt, b)"
            ),
            client.prepare(
                "UPDATE peers SET applied = GREATEST(applied, $3), last_seen_ms = $4, lineage = COALESCE($5, lineage)
                 WHERE store = $1 AND writer = $2"
            ),
        )?;
        let (insert_journal, bump_journal, journal_applied) = tokio::try_join!(
            // A resent event is stored once (its number is skipped: numbers only need to grow).
            client.prepare(
                "INSERT INTO journal (id, line, kind, store, sku, delta, reason, occurred_at_ms, recorded_at_ms,
                                      writer, flags, partition, store_seq)
                 SELECT id, line, kind, store, sku, delta, reason, occurred_at_ms, recorded_at_ms, writer, flags, pt, q
                 FROM unnest($1::bytea[], $2::int4[], $3::text[], $4::text[], $5::text[], $6::int8[], $7::text[],
                             $8::int8[], $9::int8[], $10::text[], $11::int4[], $12::int2[], $13::int8[])
                      WITH ORDINALITY AS t(id, line, kind, store, sku, delta, reason, occurred_at_ms, recorded_at_ms,
                                           writer, flags, pt, q, n)
                 ORDER BY n
                 ON CONFLICT (store, id, line) DO NOTHING
                 RETURNING id, line"
            ),
            client.prepare("UPDATE store_seqs SET journal = $2 WHERE store = $1"),
            client.prepare(
                "UPDATE peers SET journal_applied = GREATEST(journal_applied, $3) WHERE store = $1 AND writer = $2"
            ),
        )?;
        let stmts = Statements {
            lock_peer,
            lock_store,
            insert_journal,
            bump_journal,
            journal_applied,
            upsert,
            bump_store,
            notify,
            log,
            applied,
        };
        Ok(SyncPlane { client, stmts })
    }

    /// The connection, for reads ([`read_delta`], [`digest`], [`tail`], [`peer`]).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Merges `d` in one transaction (see the module documentation for the locks, in order),
    /// in five round trips: begin; both locks, pipelined; the upsert; the sequence, the wake-up,
    /// the merge log and the watermark, pipelined; commit. Merging the same delta again changes
    /// nothing and writes no merge-log row.
    pub async fn merge(&mut self, partitions: Partitions, d: AgentDelta) -> StorageResult<Merged> {
        if d.entries.len() > ENTRIES_MAX {
            return Err(StorageError::Invalid(format!(
                "a delta of {} entries is more than {ENTRIES_MAX}",
                d.entries.len()
            )));
        }
        // One row per (SKU, writer): the upsert may touch a row once per statement.
        let mut joined: BTreeMap<(Sku, WriterId), PnEntry> = BTreeMap::new();
        for (sku, writer, e) in d.entries {
            let slot = joined.entry((sku, writer)).or_default();
            *slot = slot.join(e);
        }
        let st = &self.stmts;
        let (store, peer) = (d.store.as_str(), d.peer.to_string());
        let tx = self.client.transaction().await?;
        // The writer's row first, then the store's: every merge locks in this order.
        let (peer_args, store_args): ([&(dyn ToSql + Sync); 2], [&(dyn ToSql + Sync); 1]) = ([&store, &peer], [&store]);
        let (peer_row, store_row) =
            tokio::try_join!(tx.query_one(&st.lock_peer, &peer_args), tx.query_one(&st.lock_store, &store_args))?;
        let mut lineage = crate::sqlite::lineage_col(peer_row.get(0))?;
        if let Some(base) = d.lineage_base.filter(|b| *b != lineage.head) {
            return Err(StorageError::Forked(format!(
                "another connection moved {}'s history from change {} to {} since this one was welcomed; reconnect",
                d.peer, base.ordinal, lineage.head.ordinal
            )));
        }
        let head: i64 = store_row.get(0);
        let n = joined.len();
        let (mut skus, mut writers, mut ps, mut ns, mut parts, mut seqs) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for (i, ((sku, writer), e)) in joined.iter().enumerate() {
            skus.push(sku.as_str().to_owned());
            writers.push(writer.to_string());
            ps.push(big(e.p));
            ns.push(big(e.n));
            parts.push(part_col(partitions.of(sku)));
            seqs.push(head + 1 + i as i64);
        }
        let grown = tx.query(&st.upsert, &[&store, &skus, &writers, &ps, &ns, &parts, &seqs]).await?;
        let grown: BTreeSet<(String, String)> =
            grown.iter().map(|r| (r.get::<_, String>(0), r.get::<_, String>(1))).collect();
        let mut by_part: BTreeMap<Partition, MergePart> = BTreeMap::new();
        let mut grown_keys = Vec::with_capacity(grown.len());
        for ((sku, writer), e) in &joined {
            if grown.contains(&(sku.as_str().to_owned(), writer.to_string())) {
                grown_keys.push((sku.clone(), writer.clone()));
                let part = by_part
                    .entry(partitions.of(sku))
                    .or_insert_with(|| MergePart { fulfilled: d.fulfilled.clone(), ..MergePart::default() });
                part.entries.push((sku.clone(), writer.clone(), *e));
            }
        }
        // Rights are grow-only totals the deciders merge by maximum: every one goes along, under
        // a sequence of their own (a delta of rights alone still needs a merge-log row).
        for r in &d.rights {
            by_part
                .entry(partitions.of(&r.0))
                .or_insert_with(|| MergePart { fulfilled: d.fulfilled.clone(), ..MergePart::default() })
                .rights
                .push(r.clone());
        }
        let new_head = if by_part.is_empty() { head } else { head + n as i64 + i64::from(!d.rights.is_empty()) };
        let lineage_row = d.lineage.as_ref().map(|l| {
            lineage.advance(l.head, &l.boots, &d.pusher_boots);
            postcard::to_stdvec(&lineage).expect("lineage serialises")
        });
        let log_parts: Vec<i16> = by_part.keys().map(|p| part_col(*p)).collect();
        let log_bodies: Vec<Vec<u8>> =
            by_part.values().map(|part| postcard::to_stdvec(part).expect("merge parts serialise")).collect();
        let upto = big(d.upto);
        let applied_args: [&(dyn ToSql + Sync); 5] = [&store, &peer, &upto, &d.at_ms, &lineage_row];
        let watermark = tx.execute(&st.applied, &applied_args);
        if by_part.is_empty() {
            watermark.await?;
        } else {
            let bump_args: [&(dyn ToSql + Sync); 2] = [&store, &new_head];
            let kind = LogKind::Delta.col();
            let log_args: [&(dyn ToSql + Sync); 5] = [&store, &new_head, &log_parts, &log_bodies, &kind];
            // The wake-up: the hubs other agents of the store are connected to read the entries.
            tokio::try_join!(
                tx.execute(&st.bump_store, &bump_args),
                tx.execute(&st.notify, &store_args),
                tx.execute(&st.log, &log_args),
                watermark,
            )?;
        }
        tx.commit().await?;
        Ok(Merged {
            head: unsigned(new_head, "store_seqs.counter")?,
            parts: by_part.into_keys().collect(),
            grown: grown_keys,
        })
    }

    /// Logs `notes` about `store`'s agents for the home partition's decider ([`HOME`]), with
    /// the store's wake-up.
    pub async fn note(&mut self, store: &StoreId, notes: Vec<AgentNote>) -> StorageResult<()> {
        if notes.is_empty() {
            return Ok(());
        }
        let body = postcard::to_stdvec(&MergePart { notes, ..MergePart::default() }).expect("notes serialise");
        let seq = (rand::random::<u64>() >> 1) as i64;
        let kind = LogKind::Agent.col();
        let (parts, bodies) = (vec![part_col(HOME)], vec![body]);
        let tx = self.client.transaction().await?;
        let log_args: [&(dyn ToSql + Sync); 5] = [&store.as_str(), &seq, &parts, &bodies, &kind];
        let store_args: [&(dyn ToSql + Sync); 1] = [&store.as_str()];
        tokio::try_join!(tx.execute(&self.stmts.log, &log_args), tx.execute(&self.stmts.notify, &store_args))?;
        tx.commit().await?;
        Ok(())
    }

    /// Stores an agent's journal batch in one transaction (the writer's row, then the store's,
    /// as [`SyncPlane::merge`]): new events numbered by the store's journal sequence, the
    /// partitions told of the SKUs flagged unknown or inactive and of the tills' adjustments
    /// (a merge-log row of kind journal each), the writer's journal watermark. A resent batch
    /// stores nothing again and tells no decider twice.
    pub async fn append_journal(
        &mut self,
        partitions: Partitions,
        store: &StoreId,
        peer: &WriterId,
        batch: shelfsync_shared::wire::JournalBatch,
    ) -> StorageResult<JournalAppended> {
        crate::engine::journal_belongs(store, &batch.events)?;
        if batch.events.len() > ENTRIES_MAX {
            return Err(StorageError::Invalid(format!("a journal batch of {} events is too long", batch.events.len())));
        }
        let st = &self.stmts;
        let (store_s, peer_s) = (store.as_str(), peer.to_string());
        let tx = self.client.transaction().await?;
        let (peer_args, store_args): ([&(dyn ToSql + Sync); 2], [&(dyn ToSql + Sync); 1]) =
            ([&store_s, &peer_s], [&store_s]);
        let (_, store_row) =
            tokio::try_join!(tx.query_one(&st.lock_peer, &peer_args), tx.query_one(&st.lock_store, &store_args))?;
        let head: i64 = store_row.get(1);
        let n = batch.events.len();
        let rows: Vec<crate::postgres::JournalRow> = batch.events.iter().map(crate::postgres::journal_row).collect();
        let parts: Vec<i16> = batch.events.iter().map(|e| part_col(partitions.of(&e.sku))).collect();
        let seqs: Vec<i64> = (0..n as i64).map(|i| head + 1 + i).collect();
        let ids: Vec<Vec<u8>> = rows.iter().map(|r| r.0.clone()).collect();
        let lines: Vec<i32> = rows.iter().map(|r| r.1).collect();
        let kinds: Vec<&str> = rows.iter().map(|r| r.2.as_str()).collect();
        let stores: Vec<&str> = rows.iter().map(|r| r.3.as_str()).collect();
        let skus: Vec<&str> = rows.iter().map(|r| r.4.as_str()).collect();
        let deltas: Vec<i64> = rows.iter().map(|r| r.5).collect();
        let reasons: Vec<Option<&str>> = rows.iter().map(|r| r.6.as_deref()).collect();
        let occurred: Vec<i64> = rows.iter().map(|r| r.7).collect();
        let recorded: Vec<i64> = rows.iter().map(|r| r.8).collect();
        let writers: Vec<&str> = rows.iter().map(|r| r.9.as_str()).collect();
        let flags: Vec<i32> = rows.iter().map(|r| r.10).collect();
        let inserted = tx
            .query(
                &st.insert_journal,
                &[
                    &ids, &lines, &kinds, &stores, &skus, &deltas, &reasons, &occurred, &recorded, &writers, &flags,
                    &parts, &seqs,
                ],
            )
            .await?;
        let new: BTreeSet<(Vec<u8>, i32)> = inserted.iter().map(|r| (r.get(0), r.get(1))).collect();
        let mut by_part: BTreeMap<Partition, MergePart> = BTreeMap::new();
        for e in batch.events.iter().filter(|e| new.contains(&(e.id.as_bytes().to_vec(), e.line as i32))) {
            use shelfsync_shared::journal::{EventFlag, EventKind};
            let flagged = e.flags.contains(&EventFlag::UnknownSku) || e.flags.contains(&EventFlag::InactiveSku);
            let adjustment = e.kind == EventKind::Adjustment;
            if flagged || adjustment {
                let part = by_part.entry(partitions.of(&e.sku)).or_default();
                if flagged && !part.flagged.contains(&e.sku) {
                    part.flagged.push(e.sku.clone());
                }
                if adjustment {
                    part.adjustments.push(e.clone());
                }
            }
        }
        let new_head = if new.is_empty() { head } else { head + n as i64 };
        let upto = big(batch.upto);
        let applied_args: [&(dyn ToSql + Sync); 3] = [&store_s, &peer_s, &upto];
        let watermark = tx.execute(&st.journal_applied, &applied_args);
        if new.is_empty() {
            watermark.await?;
        } else {
            let kind = LogKind::Journal.col();
            let log_parts: Vec<i16> = by_part.keys().map(|p| part_col(*p)).collect();
            let log_bodies: Vec<Vec<u8>> =
                by_part.values().map(|p| postcard::to_stdvec(p).expect("merge parts serialise")).collect();
            let bump_args: [&(dyn ToSql + Sync); 2] = [&store_s, &new_head];
            let log_args: [&(dyn ToSql + Sync); 5] = [&store_s, &new_head, &log_parts, &log_bodies, &kind];
            tokio::try_join!(
                tx.execute(&st.bump_journal, &bump_args),
                tx.execute(&st.notify, &store_args),
                tx.execute(&st.log, &log_args),
                watermark,
            )?;
        }
        tx.commit().await?;
        Ok(JournalAppended {
            added: new.len(),
            head: unsigned(new_head, "store_seqs.journal")?,
            parts: by_part.into_keys().collect(),
        })
    }
}

/// A page of a store's entries in the store's sequence.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EntriesPage {
    /// (store sequence, SKU, writer, entry), ascending.
    pub entries: Vec<(u64, Sku, WriterId, PnEntry)>,
    /// Everything up to here has been read (the next read starts after it).
    pub upto: u64,
}

/// `store`'s entries above `after`, except `exclude`'s (the agent being sent them), at most
/// `limit`. The head is read first: a row committed later has a higher sequence.
pub async fn read_delta(
    c: &Client,
    store: &StoreId,
    exclude: Option<&WriterId>,
    after: u64,
    limit: usize,
) -> StorageResult<EntriesPage> {
    let head = store_head(c, store).await?;
    let exclude = exclude.map(|w| w.to_string()).unwrap_or_default();
    let rows = c
        .query(
            "SELECT store_seq, sku, writer, p, n FROM counters
             WHERE store = $1 AND store_seq > $2 AND store_seq <= $3 AND writer <> $4 ORDER BY store_seq LIMIT $5",
            &[&store.as_str(), &big(after), &big(head), &exclude, &(limit as i64)],
        )
        .await?;
    let mut entries = Vec::with_capacity(rows.len());
    for r in &rows {
        entries.push((
            unsigned(r.get(0), "counters.store_seq")?,
            shelfsync_node::db::sku_col(r.get(1))?,
            shelfsync_node::db::writer_col(r.get(2))?,
            PnEntry { p: unsigned(r.get(3), "counters.p")?, n: unsigned(r.get(4), "counters.n")? },
        ));
    }
    let upto = match entries.last() {
        Some((seq, ..)) if entries.len() == limit => *seq,
        _ => head.max(after),
    };
    Ok(EntriesPage { entries, upto })
}

/// The store's sequence head (0: nothing merged yet).
pub async fn store_head(c: &Client, store: &StoreId) -> StorageResult<u64> {
    Ok(store_heads(c, store).await?.counter)
}

/// The store's sequences: its counter entries' and its journal's (0: nothing yet).
pub async fn store_heads(c: &Client, store: &StoreId) -> StorageResult<crate::storage::HubHeads> {
    let row = c.query_opt("SELECT counter, journal FROM store_seqs WHERE store = $1", &[&store.as_str()]).await?;
    Ok(match row {
        None => crate::storage::HubHeads::default(),
        Some(r) => crate::storage::HubHeads {
            counter: unsigned(r.get(0), "store_seqs.counter")?,
            journal: unsigned(r.get(1), "store_seqs.journal")?,
        },
    })
}

/// Digest of every entry of `store`, and the store's sequence head it covers, read from one
/// snapshot.
pub async fn digest(c: &Client, store: &StoreId) -> StorageResult<(StateDigest, u64)> {
    digest_of(c, store, "SELECT sku, writer, p, n FROM counters WHERE store = $1").await
}

/// Digest of the entries of `store` the partitions' hub writers authored (what an agent that
/// holds others must give back), and the store's sequence head it covers.
pub async fn hub_entries_digest(c: &Client, store: &StoreId) -> StorageResult<(StateDigest, u64)> {
    digest_of(c, store, "SELECT sku, writer, p, n FROM counters WHERE store = $1 AND writer LIKE 'hub@%'").await
}

async fn digest_of(c: &Client, store: &StoreId, rows: &str) -> StorageResult<(StateDigest, u64)> {
    crate::postgres::in_snapshot(c, async {
        let head = store_head(c, store).await?;
        let mut d = StateDigest::default();
        for r in c.query(rows, &[&store.as_str()]).await? {
            let entry = PnEntry { p: unsigned(r.get(2), "counters.p")?, n: unsigned(r.get(3), "counters.n")? };
            d.add(&shelfsync_node::db::sku_col(r.get(0))?, &shelfsync_node::db::writer_col(r.get(1))?, entry);
        }
        Ok((d, head))
    })
    .await
}

/// One row of a partition's merge log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogRow {
    /// The store.
    pub store: StoreId,
    /// Delta or journal.
    pub kind: LogKind,
    /// The store's sequence (of that kind) after the merge.
    pub seq: u64,
    /// What the partition's decider applies.
    pub part: MergePart,
}

/// Partition `partition`'s merges still to apply, at most `limit`, each store's in its order:
/// what its decider applies (then deletes, [`APPLIED`]).
pub async fn tail(c: &Client, partition: Partition, limit: usize) -> StorageResult<Vec<LogRow>> {
    let rows = c
        .query(
            "SELECT store, kind, seq, body FROM merge_log WHERE partition = $1 ORDER BY store, kind, seq LIMIT $2",
            &[&part_col(partition), &(limit as i64)],
        )
        .await?;
    rows.iter()
        .map(|r| {
            let store = crate::sqlite::store_col(r.get(0))?;
            let kind = LogKind::of(r.get(1))?;
            let seq = unsigned(r.get(2), "merge_log.seq")?;
            let body: Vec<u8> = r.get(3);
            let part = postcard::from_bytes(&body)
                .map_err(|e| StorageError::Corrupt(format!("merge_log {partition}/{store}/{kind:?}/{seq}: {e}")))?;
            Ok(LogRow { store, kind, seq, part })
        })
        .collect()
}

/// What the hub holds of an agent writer: (applied, lineage).
pub async fn peer(c: &Client, store: &StoreId, writer: &WriterId) -> StorageResult<(u64, HubLineage)> {
    let row = c
        .query_opt(
            "SELECT applied, lineage FROM peers WHERE store = $1 AND writer = $2",
            &[&store.as_str(), &writer.to_string()],
        )
        .await?;
    match row {
        None => Ok((0, HubLineage::default())),
        Some(r) => Ok((unsigned(r.get(0), "peers.applied")?, crate::sqlite::lineage_col(r.get(1))?)),
    }
}

/// Most merge-log rows a decider applies per read.
pub const APPLY_PAGE: usize = 256;

/// Applies one page of partition `partition`'s merge log to its decider (each row a `Merge`, in
/// order; the decider batches them into few commits), and returns what they changed.
pub async fn apply_page(
    engine: &crate::engine::Engine,
    c: &Client,
    partition: Partition,
    limit: usize,
) -> StorageResult<Vec<shelfsync_hub_core::Merged>> {
    let rows = tail(c, partition, limit).await?;
    let now = shelfsync_node::now_ms();
    let applied =
        futures_util::future::join_all(rows.into_iter().map(|r| engine.apply_merged(partition, r, now))).await;
    applied.into_iter().collect()
}

/// Keeps partition `partition`'s decider up to date with the sync plane: a page whenever woken
/// (a store changed, `crate::notify`) and at least every `poll`. What it changes reaches the
/// stores' sessions through the database (their holds versions and sequences, followed by
/// `crate::plane::follow_heads`) and the feed. Runs until the engine stops.
pub async fn apply_forever(
    engine: std::sync::Arc<crate::engine::Engine>,
    c: Client,
    partition: Partition,
    poll: std::time::Duration,
    mut wake: tokio::sync::watch::Receiver<()>,
) {
    loop {
        match apply_page(&engine, &c, partition, APPLY_PAGE).await {
            Ok(merged) if merged.len() == APPLY_PAGE => continue,
            Ok(_) => {}
            Err(StorageError::Stopped(_)) => return,
            Err(e) => tracing::error!(partition, error = %e, "applying the sync plane's merges"),
        }
        tokio::select! {
            _ = tokio::time::sleep(poll) => {}
            r = wake.changed() => if r.is_err() { return },
        }
    }
}

/// The holds of `store` over every partition, as an agent gets them: the open allocations the
/// partitions' deciders committed (their rows in `decisions`), each with its reservation's
/// expiry, and as version the sum of the partitions' holds versions of the store (each only
/// grows, so the sum grows with every change anywhere). Read from one snapshot, so a hub that
/// decides none of them sends a store what every partition decided.
pub async fn holds_snapshot(c: &Client, store: &StoreId) -> StorageResult<shelfsync_shared::wire::HoldsSnapshot> {
    use shelfsync_hub_core::{Allocation, AllocationStatus, Reservation};
    use shelfsync_shared::wire::{Hold, HoldStatus, HoldsSnapshot, HOLDS_MAX};
    let (version, rows) = crate::postgres::in_snapshot(c, async {
        let version = holds_version(c, store).await?;
        let rows = c
            .query(
                "SELECT a.body, r.body FROM decisions a
                 LEFT JOIN decisions r ON r.partition = a.partition AND r.kind = 'reservation'
                     AND r.key = a.body::jsonb->>'reservation'
                 WHERE a.kind = 'allocation' AND a.body::jsonb->>'store' = $1
                     AND a.body::jsonb->>'status' IN ('held', 'committed')
                 LIMIT $2",
                &[&store.as_str(), &(HOLDS_MAX as i64)],
            )
            .await?;
        Ok((version, rows))
    })
    .await?;
    let mut holds = Vec::with_capacity(rows.len());
    for r in &rows {
        let a: Allocation = serde_json::from_str(&r.get::<_, String>(0))
            .map_err(|e| StorageError::Corrupt(format!("an allocation row: {e}")))?;
        let reservation: Option<Reservation> = r
            .get::<_, Option<String>>(1)
            .map(|b| serde_json::from_str(&b))
            .transpose()
            .map_err(|e| StorageError::Corrupt(format!("a reservation row: {e}")))?;
        let status = if a.status == AllocationStatus::Held { HoldStatus::Held } else { HoldStatus::Committed };
        let expires_at_ms = match status {
            HoldStatus::Held => reservation.and_then(|r| r.expires_at_ms),
            HoldStatus::Committed => None,
        };
        holds.push(Hold { id: a.id, reservation: a.reservation, sku: a.sku, qty: a.qty, status, expires_at_ms });
    }
    holds.sort_by_key(|h| h.id);
    Ok(HoldsSnapshot { version, holds })
}

/// What [`SyncPlane::append_journal`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JournalAppended {
    /// Events stored (the rest were stored already).
    pub added: usize,
    /// The store's journal sequence after it.
    pub head: u64,
    /// The partitions given a merge-log row (flagged SKUs or adjustments).
    pub parts: Vec<Partition>,
}

/// `store`'s journal events above `after` in the store's journal sequence, except `exclude`'s
/// (the agent being sent them), at most `limit`; the head read first, as [`read_delta`].
pub async fn read_journal(
    c: &Client,
    store: &StoreId,
    exclude: Option<&WriterId>,
    after: u64,
    limit: usize,
) -> StorageResult<shelfsync_shared::sync::JournalRead> {
    let head = store_heads(c, store).await?.journal;
    let exclude = exclude.map(|w| w.to_string()).unwrap_or_default();
    let rows = c
        .query(
            "SELECT store_seq, id, line, kind, store, sku, delta, reason, occurred_at_ms, recorded_at_ms, writer, flags
             FROM journal WHERE store = $1 AND store_seq > $2 AND store_seq <= $3 AND writer <> $4
             ORDER BY store_seq LIMIT $5",
            &[&store.as_str(), &big(after), &big(head), &exclude, &(limit as i64)],
        )
        .await?;
    let mut events = Vec::with_capacity(rows.len());
    let mut last = after;
    for r in &rows {
        last = unsigned(r.get(0), "journal.store_seq")?;
        events.push(crate::postgres::journal_event(r)?);
    }
    let upto = if events.len() == limit { last } else { head.max(after) };
    Ok(shelfsync_shared::sync::JournalRead { upto, events })
}

/// The store's escrow rights as the deciders recorded them (every partition's rows).
pub async fn rights_entries(
    c: &Client,
    store: &StoreId,
) -> StorageResult<Vec<(Sku, shelfsync_hub_core::RightsEntries)>> {
    let prefix = format!("{store}\u{1f}");
    let rows = c
        .query(
            "SELECT key, body FROM decisions WHERE kind = 'rights' AND starts_with(key, $1) ORDER BY key LIMIT $2",
            &[&prefix, &(shelfsync_shared::wire::RIGHTS_MAX as i64)],
        )
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        if let shelfsync_hub_core::Record::Rights { sku, rights, .. } =
            crate::persist::decision_record("rights", &r.get::<_, String>(0), &r.get::<_, String>(1))?
        {
            out.push((sku, rights));
        }
    }
    Ok(out)
}

/// The transfers on their way to `store` over every partition, as its agent gets them
/// ([`shelfsync_hub_core::incoming_snapshot`]), versioned as [`holds_snapshot`] is. One snapshot.
pub async fn incoming_snapshot(c: &Client, store: &StoreId) -> StorageResult<shelfsync_shared::wire::IncomingSnapshot> {
    let (version, rows) = crate::postgres::in_snapshot(c, async {
        let version = holds_version(c, store).await?;
        let rows = c
            .query(
                "SELECT body FROM transfers WHERE to_store = $1 AND status = 'in_transit'
                 ORDER BY shipped_at_ms, id LIMIT $2",
                &[&store.as_str(), &(shelfsync_shared::wire::INCOMING_TRANSFERS_MAX as i64)],
            )
            .await?;
        Ok((version, rows))
    })
    .await?;
    let transfers = rows
        .iter()
        .map(|r| {
            serde_json::from_str::<shelfsync_hub_core::Transfer>(&r.get::<_, String>(0))
                .map_err(|e| StorageError::Corrupt(format!("a transfer row: {e}")))
        })
        .collect::<StorageResult<Vec<_>>>()?;
    Ok(shelfsync_hub_core::incoming_snapshot(version, &transfers))
}

/// What `store`'s holds version is over every partition: the sum of each partition's (each
/// only grows, so the sum grows with every change anywhere).
pub const HOLDS_VERSION: &str = "SELECT COALESCE(SUM(holds_version), 0)::int8 FROM store_parts WHERE store = $1";

async fn holds_version(c: &Client, store: &StoreId) -> StorageResult<u64> {
    unsigned(c.query_one(HOLDS_VERSION, &[&store.as_str()]).await?.get(0), "store_parts.holds_version")
}
