//! Records: the typed rows a command's decisions become, for the runtime to persist in one
//! transaction per batch, and the rebuild of a decider from them.
//!
//! Every record is an upsert keyed naturally (a store by id, an entry by (store, sku, writer), a
//! reservation, allocation or conflict by id, a feed event by cursor...), carrying the full row
//! as it stands when the command ends. Journal events are the one record the decider never reads
//! back: they are the hub-authored audit trail the runtime stores and ships to the stores.
//! Derived values (held totals, `on_hand`, open-allocation and expiry indexes, the counter and
//! allocation sequences, the feed head) are recomputed on rebuild, so replaying the records also
//! checks the live bookkeeping (`Decider::snapshot` compares the two).

use std::collections::{BTreeSet, HashMap};

use serde::{Deserialize, Serialize};
use shelfsync_shared::counter::sum_entries;
use shelfsync_shared::journal::JournalEvent;
use shelfsync_shared::{PnEntry, Rights, RightsKind, Sku, StoreId, WriterId};
use uuid::Uuid;

use crate::feed::FeedEvent;
use crate::model::{
    ActionRequest, AlertState, Allocation, CatalogRule, Conflict, ConflictKind, ConflictStatus, HubChangeKind,
    HubRequest, Overrides, Reservation, ReservationStatus, SkuIx, Slot, StoreIx, Velocity, WriterIx,
};
use crate::stores::empty_store;
use crate::tables::{indexed, Tables};
use crate::{Config, Decider};

/// A store row.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreRecord {
    /// Id.
    pub id: StoreId,
    /// When registered.
    pub added_at_ms: i64,
    /// When revoked.
    pub revoked_at_ms: Option<i64>,
    /// Last contact.
    pub last_seen_ms: Option<i64>,
    /// Version of its holds snapshot.
    pub holds_version: u64,
}

/// A counter entry row.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryRecord {
    /// Where.
    pub store: StoreId,
    /// What.
    pub sku: Sku,
    /// Whose.
    pub writer: WriterId,
    /// The merged entry.
    pub entry: PnEntry,
    /// Hub counter sequence of its last change.
    pub seq: u64,
}

/// A cell's escrow rights as a row: every (writer, kind, total).
pub type RightsEntries = Vec<(WriterId, RightsKind, u64)>;

pub(crate) fn rights_entries(r: &Rights) -> RightsEntries {
    r.entries().map(|(w, k, q)| (w.clone(), k, q)).collect()
}

/// One row to persist.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Record {
    /// A store (by id).
    Store(StoreRecord),
    /// A counter entry (by store, sku, writer).
    Entry(EntryRecord),
    /// Sales velocity of a cell (by store, sku).
    Velocity {
        /// Where.
        store: StoreId,
        /// What.
        sku: Sku,
        /// The estimate.
        velocity: Velocity,
    },
    /// Escrow rights of a cell (by store, sku): every entry.
    Rights {
        /// Where.
        store: StoreId,
        /// What.
        sku: Sku,
        /// Every (writer, kind, total).
        rights: RightsEntries,
    },
    /// Alert state of a cell (by store, sku).
    Alert {
        /// Where.
        store: StoreId,
        /// What.
        sku: Sku,
        /// The state.
        state: AlertState,
    },
    /// A catalog rule (by sku; `None`: removed).
    CatalogRule {
        /// What.
        sku: Sku,
        /// The rule.
        rule: Option<CatalogRule>,
    },
    /// A store's overrides of a SKU (by store, sku; all `None`: removed).
    Overrides {
        /// Where.
        store: StoreId,
        /// What.
        sku: Sku,
        /// The overrides.
        overrides: Overrides,
    },
    /// A sales channel (by id; `None`: removed).
    Channel {
        /// Which.
        id: crate::channels::ChannelId,
        /// Its configuration.
        channel: Option<crate::channels::Channel>,
    },
    /// How fast a sales channel reserves a SKU (by channel, sku): what a lagged channel's margin
    /// counts of the other channels' demand.
    ChannelDemand {
        /// Which channel (`web` for reservations naming none).
        channel: crate::channels::ChannelId,
        /// What.
        sku: Sku,
        /// Decayed units reserved.
        velocity: Velocity,
    },
    /// A reservation (by id).
    Reservation(Reservation),
    /// An allocation (by id).
    Allocation(Allocation),
    /// A conflict (by id).
    Conflict(Conflict),
    /// A feed event (by cursor; appended).
    Feed(FeedEvent),
    /// A restock/transfer request and its answer (by id).
    HubRequest(HubRequest),
    /// An action under an Idempotency-Key and its answer (by key).
    ActionRequest(ActionRequest),
    /// A transfer between stores (by id).
    Transfer(crate::transfers::Transfer),
    /// A hub-authored journal event (by id, line; appended). Not read back.
    Journal(JournalEvent),
    /// The hub's counter writer.
    HubWriter(WriterId),
    /// How many ids the decider has minted.
    IdCounter(u64),
}

/// Turns what the last command touched into records (final rows), in a fixed order.
pub(crate) fn flush(t: &mut Tables, out: &mut Vec<Record>) {
    let d = std::mem::take(&mut t.dirty);
    for st in d.stores {
        let s = t.store(st);
        out.push(Record::Store(StoreRecord {
            id: s.id.clone(),
            added_at_ms: s.added_at_ms,
            revoked_at_ms: s.revoked_at_ms,
            last_seen_ms: s.last_seen_ms,
            holds_version: s.holds_version,
        }));
    }
    for sk in d.catalog {
        out.push(Record::CatalogRule { sku: t.sku(sk).sku.clone(), rule: t.sku(sk).rule });
    }
    for (store, sku) in d.overrides {
        let overrides = t.overrides_of(&store, &sku).copied().unwrap_or_default();
        out.push(Record::Overrides { store, sku, overrides });
    }
    for id in d.channels {
        let channel = t.channels.get(&id).cloned();
        out.push(Record::Channel { id, channel });
    }
    for (sk, channel) in d.channel_demand {
        let velocity = t.demand_of(sk, &channel).expect("dirty demand exists");
        out.push(Record::ChannelDemand { channel, sku: t.sku(sk).sku.clone(), velocity });
    }
    for (st, sk, w) in d.entries {
        let slot = t.cell(st, sk).and_then(|c| c.slots.iter().find(|s| s.writer == w)).expect("dirty entry exists");
        out.push(Record::Entry(EntryRecord {
            store: t.store(st).id.clone(),
            sku: t.sku(sk).sku.clone(),
            writer: t.writer(w).clone(),
            entry: slot.entry,
            seq: slot.seq,
        }));
    }
    for (st, sk) in d.velocity {
        let velocity = t.cell(st, sk).and_then(|c| c.velocity).expect("dirty velocity exists");
        out.push(Record::Velocity { store: t.store(st).id.clone(), sku: t.sku(sk).sku.clone(), velocity });
    }
    for (st, sk) in d.rights {
        let rights = t.cell(st, sk).map(|c| rights_entries(&c.rights)).unwrap_or_default();
        out.push(Record::Rights { store: t.store(st).id.clone(), sku: t.sku(sk).sku.clone(), rights });
    }
    for (st, sk) in d.alerts {
        let state = t.cell(st, sk).map(|c| c.alert).unwrap_or_default();
        out.push(Record::Alert { store: t.store(st).id.clone(), sku: t.sku(sk).sku.clone(), state });
    }
    out.extend(d.reservations.iter().map(|id| Record::Reservation(t.reservations[id].clone())));
    out.extend(d.allocations.iter().map(|id| Record::Allocation(t.allocations[id].clone())));
    out.extend(d.conflicts.iter().map(|id| Record::Conflict(t.conflicts[id].clone())));
    out.extend(d.hub_requests.iter().map(|id| Record::HubRequest(t.hub_requests[id].clone())));
    out.extend(d.action_requests.iter().map(|k| Record::ActionRequest(t.action_requests[k].clone())));
    out.extend(d.transfers.iter().map(|id| Record::Transfer(t.transfers[id].clone())));
    out.extend(d.journal.into_iter().map(Record::Journal));
    out.extend(d.feed.into_iter().map(Record::Feed));
    if d.hub_writer {
        out.push(Record::HubWriter(t.hub_writer.clone()));
    }
    if d.ids {
        out.push(Record::IdCounter(t.id_counter));
    }
}

/// Records that do not fit together.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    /// A row names a store no store record registered.
    #[error("record names unknown store {0}")]
    UnknownStore(StoreId),
    /// A row breaks a rule its writer would have refused.
    #[error("corrupt record: {0}")]
    Corrupt(String),
}

fn store_ix(t: &Tables, id: &StoreId) -> Result<crate::model::StoreIx, LoadError> {
    t.store_ix.get(id).copied().ok_or_else(|| LoadError::UnknownStore(id.clone()))
}

fn load(t: &mut Tables, r: Record) -> Result<(), LoadError> {
    match r {
        Record::Store(s) => {
            let ix = match t.store_ix.get(&s.id) {
                Some(ix) => *ix,
                None => t.insert_store(empty_store(s.id.clone(), s.added_at_ms)),
            };
            let row = t.store_mut(ix);
            row.added_at_ms = s.added_at_ms;
            row.revoked_at_ms = s.revoked_at_ms;
            row.last_seen_ms = s.last_seen_ms;
            row.holds_version = s.holds_version;
        }
        Record::Entry(e) => {
            let st = store_ix(t, &e.store)?;
            let (sk, w) = (t.intern_sku(&e.sku), t.intern_writer(&e.writer));
            let cell = t.cell_mut(st, sk);
            let old = match cell.slots.iter_mut().find(|s| s.writer == w) {
                Some(slot) => Some(std::mem::replace(slot, Slot { writer: w, entry: e.entry, seq: e.seq }).seq),
                None => {
                    cell.slots.push(Slot { writer: w, entry: e.entry, seq: e.seq });
                    None
                }
            };
            let index = &mut t.stores[st.0 as usize].entries_by_seq;
            if let Some(old) = old {
                index.remove(&old);
            }
            index.insert(e.seq, (sk, w));
            t.counter_seq = t.counter_seq.max(e.seq);
        }
        Record::Velocity { store, sku, velocity } => {
            let (st, sk) = (store_ix(t, &store)?, t.intern_sku(&sku));
            t.set_velocity(st, sk, velocity);
        }
        Record::Rights { store, sku, rights } => {
            let (st, sk) = (store_ix(t, &store)?, t.intern_sku(&sku));
            let cell = t.cell_mut(st, sk);
            for (w, k, q) in rights {
                cell.rights.merge_entry(&store, &w, k, q).map_err(|e| LoadError::Corrupt(e.to_string()))?;
            }
        }
        Record::Alert { store, sku, state } => {
            let (st, sk) = (store_ix(t, &store)?, t.intern_sku(&sku));
            t.set_alert(st, sk, state);
        }
        Record::CatalogRule { sku, rule } => t.set_rule(&sku, rule),
        Record::Overrides { store, sku, overrides } => t.set_overrides(&store, &sku, overrides),
        Record::Channel { id, channel } => match channel {
            Some(c) if c.id == id => t.put_channel(c),
            Some(c) => return Err(LoadError::Corrupt(format!("channel row {id} holds channel {}", c.id))),
            None => t.remove_channel(&id),
        },
        Record::ChannelDemand { channel, sku, velocity } => {
            let sk = t.intern_sku(&sku);
            t.set_demand(sk, channel, velocity);
        }
        Record::Reservation(r) => {
            t.reservations.insert(r.id, r);
        }
        Record::Allocation(a) => {
            store_ix(t, &a.store)?;
            t.intern_sku(&a.sku);
            t.alloc_seq = t.alloc_seq.max(a.created_seq);
            t.allocations.insert(a.id, a);
        }
        Record::Conflict(c) => {
            t.conflicts.insert(c.id, c);
        }
        // An append by cursor: an event loaded before is not appended again.
        Record::Feed(e) if e.cursor <= t.feed_head => {}
        Record::Feed(e) => {
            t.feed_head = e.cursor;
            t.push_feed(e);
        }
        Record::HubRequest(r) => {
            t.hub_requests.insert(r.id, r);
        }
        Record::ActionRequest(r) => {
            t.action_requests.insert(r.key.clone(), r);
        }
        Record::Transfer(x) => {
            store_ix(t, &x.from)?;
            store_ix(t, &x.to)?;
            t.transfers.insert(x.id, x);
        }
        Record::Journal(_) => {}
        Record::HubWriter(w) => t.hub_writer = w,
        Record::IdCounter(n) => t.id_counter = n,
    }
    Ok(())
}

/// What one command touched: the keys whose final rows become its records.
#[derive(Clone, Debug, Default)]
pub(crate) struct Dirty {
    pub stores: BTreeSet<StoreIx>,
    pub entries: BTreeSet<(StoreIx, SkuIx, WriterIx)>,
    pub velocity: BTreeSet<(StoreIx, SkuIx)>,
    pub alerts: BTreeSet<(StoreIx, SkuIx)>,
    pub rights: BTreeSet<(StoreIx, SkuIx)>,
    pub catalog: BTreeSet<SkuIx>,
    pub overrides: BTreeSet<(StoreId, Sku)>,
    pub channels: BTreeSet<crate::channels::ChannelId>,
    pub channel_demand: BTreeSet<(SkuIx, crate::channels::ChannelId)>,
    pub reservations: BTreeSet<Uuid>,
    pub allocations: BTreeSet<Uuid>,
    pub conflicts: BTreeSet<Uuid>,
    pub hub_requests: BTreeSet<Uuid>,
    pub action_requests: BTreeSet<String>,
    pub transfers: BTreeSet<Uuid>,
    pub journal: Vec<JournalEvent>,
    pub feed: Vec<FeedEvent>,
    pub hub_writer: bool,
    pub ids: bool,
}

impl Dirty {
    pub fn is_empty(&self) -> bool {
        self.stores.is_empty()
            && self.entries.is_empty()
            && self.velocity.is_empty()
            && self.alerts.is_empty()
            && self.rights.is_empty()
            && self.catalog.is_empty()
            && self.overrides.is_empty()
            && self.channels.is_empty()
            && self.channel_demand.is_empty()
            && self.reservations.is_empty()
            && self.allocations.is_empty()
            && self.conflicts.is_empty()
            && self.hub_requests.is_empty()
            && self.action_requests.is_empty()
            && self.transfers.is_empty()
            && self.journal.is_empty()
            && self.feed.is_empty()
            && !self.hub_writer
            && !self.ids
    }
}

/// Rebuilds every derived index from the rows (after loading records).
pub(crate) fn reindex(t: &mut Tables) {
    t.by_customer.clear();
    t.expiry.clear();
    t.res_allocs.clear();
    t.open_conflicts.clear();
    t.open_oversells.clear();
    for cell in t.cells.values_mut() {
        cell.held = 0;
        cell.open.clear();
        cell.on_hand = sum_entries(cell.slots.iter().map(|s| &s.entry)).unwrap_or(0);
    }
    for s in &mut t.stores {
        s.open.clear();
    }
    t.in_transit_to.clear();
    t.incoming.clear();
    let transfers: Vec<crate::transfers::Transfer> = t.transfers.values().cloned().collect();
    for tr in &transfers {
        t.index_transfer(tr, true);
    }
    let mut ids: Vec<&Reservation> = t.reservations.values().collect();
    ids.sort_by_key(|r| (r.created_at_ms, r.id));
    let mut by_customer: HashMap<String, Vec<Uuid>> = HashMap::new();
    for r in ids {
        if let Some(c) = &r.customer {
            by_customer.entry(c.clone()).or_default().push(r.id);
        }
        if let (ReservationStatus::Held, Some(at)) = (r.status, r.expires_at_ms) {
            t.expiry.insert((at, r.id));
        }
    }
    t.by_customer = by_customer;
    let mut allocs: Vec<(u64, Uuid)> = t.allocations.values().map(|a| (a.created_seq, a.id)).collect();
    allocs.sort();
    t.alloc_seq = allocs.last().map_or(0, |(s, _)| *s).max(t.alloc_seq);
    for (seq, id) in allocs {
        let a = &t.allocations[&id];
        let (res, qty, open) = (a.reservation, a.qty, a.status.is_open());
        let (st, sk) = t.alloc_cell(a);
        t.res_allocs.entry(res).or_default().push(id);
        if open {
            t.open_index(st, sk, seq, id, qty, true);
        }
    }
    let open: Vec<Conflict> = t
        .conflicts
        .values()
        .filter(|c| c.status == ConflictStatus::Open && c.sku.is_some() && indexed(c.kind))
        .cloned()
        .collect();
    for c in open {
        t.open_conflicts.insert((c.store, c.sku.expect("filtered"), c.kind), c.id);
    }
    let oversells: Vec<Conflict> = t
        .conflicts
        .values()
        .filter(|c| c.status == ConflictStatus::Open && c.kind == ConflictKind::Oversell)
        .cloned()
        .collect();
    for c in &oversells {
        t.index_oversell(c);
    }
}

/// A decider being loaded: records go in, in commit order, possibly over a long time (a warm
/// standby follows a live hub's commits this way), and [`Loader::finish`] rebuilds the indexes
/// once. Loading a record is an upsert by its key (a feed event, an append by cursor), so a
/// prefix of the history followed by the rest loads the same state as the whole at once.
#[derive(Debug)]
pub struct Loader {
    d: Decider,
    records: usize,
}

impl Loader {
    /// An empty decider to load into. `seed` makes the ids it mints unique to this hub's life.
    pub fn new(config: Config, seed: u128) -> Loader {
        Loader { d: Decider::new(config, seed), records: 0 }
    }

    /// Loads `records`, which follow the ones loaded before in commit order.
    pub fn load(&mut self, records: impl IntoIterator<Item = Record>) -> Result<(), LoadError> {
        for r in records {
            load(&mut self.d.t, r)?;
            self.records += 1;
        }
        Ok(())
    }

    /// How many records were loaded.
    pub fn records(&self) -> usize {
        self.records
    }

    /// The heads the records loaded so far reached: (feed cursor, counter sequence, ids minted).
    /// Storage holds the same heads when nothing it committed was missed, a cheap check of a
    /// decider loaded over time.
    pub fn heads(&self) -> (u64, u64, u64) {
        (self.d.t.feed_head, self.d.t.counter_seq, self.d.t.id_counter)
    }

    /// The decider, its indexes rebuilt.
    pub fn finish(self) -> Decider {
        let mut d = self.d;
        // Transfers recorded before they travelled moved at once: they count as received.
        let legacy: Vec<crate::transfers::Transfer> =
            d.t.hub_requests
                .values()
                .filter(|r| r.kind == HubChangeKind::Transfer && !d.t.transfers.contains_key(&r.id))
                .filter_map(|r| crate::transfers::legacy(r.id, &r.response.lines, r.response.recorded_at_ms))
                .collect();
        for tr in legacy {
            d.t.transfers.insert(tr.id, tr);
        }
        reindex(&mut d.t);
        crate::channels::rebuild_ats(&mut d.t);
        d.t.dirty = Dirty::default();
        d
    }
}

impl Decider {
    /// Rebuilds a decider from records in commit order (the rows storage holds, loaded back as
    /// records). The feed may be only its newest part.
    pub fn from_records(
        config: Config,
        seed: u128,
        records: impl IntoIterator<Item = Record>,
    ) -> Result<Decider, LoadError> {
        let mut l = Loader::new(config, seed);
        l.load(records)?;
        Ok(l.finish())
    }
}
