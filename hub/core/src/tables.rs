//! The decider's tables and the only code that writes them: every primitive here keeps the
//! derived indexes (held totals, open allocations by store and cell, the expiry queue, open
//! conflicts, entries by sequence) in step with the rows, and marks what it touched so the
//! command's records can be produced from the final state when it ends.
//!
//! Primitives assume the command was validated: a broken bookkeeping rule here is a bug, and it
//! panics (fail-stop) rather than write a half-true state.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use shelfsync_shared::{counter::sum_entries, PnEntry, Sku, StoreId, WriterId};
use uuid::Uuid;

use crate::feed::{FeedData, FeedEvent, FeedKind};
use crate::model::{
    ActionRequest, AlertState, Allocation, AllocationStatus, Cell, Conflict, ConflictKind, ConflictStatus, HubRequest,
    Overrides, Reservation, ReservationStatus, SkuInfo, SkuIx, Slot, Store, StoreIx, Velocity, WriterIx,
};
pub(crate) use crate::records::Dirty;
use crate::transfers::{Transfer, TransferStatus};

/// Conflict kinds that are open at most once per (store, SKU), found through the index.
pub(crate) fn indexed(kind: ConflictKind) -> bool {
    matches!(kind, ConflictKind::NegativeStock | ConflictKind::UnknownSku | ConflictKind::EscrowOverdraft)
}

/// All state the decider persists, with its indexes.
#[derive(Clone, Debug)]
pub(crate) struct Tables {
    pub seed: u128,
    pub feed_retain: usize,
    pub stores: Vec<Store>,
    pub store_ix: HashMap<StoreId, StoreIx>,
    pub skus: Vec<SkuInfo>,
    pub sku_ix: HashMap<Sku, SkuIx>,
    pub writers: Vec<WriterId>,
    pub writer_ix: HashMap<WriterId, WriterIx>,
    pub cells: HashMap<(StoreIx, SkuIx), Cell>,
    pub overrides: HashMap<StoreId, HashMap<Sku, Overrides>>,
    pub reservations: HashMap<Uuid, Reservation>,
    pub allocations: HashMap<Uuid, Allocation>,
    /// Allocation ids of each reservation, by creation.
    pub res_allocs: HashMap<Uuid, Vec<Uuid>>,
    pub by_customer: HashMap<String, Vec<Uuid>>,
    /// Held reservations by (expiry, id).
    pub expiry: BTreeSet<(i64, Uuid)>,
    pub conflicts: HashMap<Uuid, Conflict>,
    /// Open conflicts about a SKU, by (store, SKU, kind).
    pub open_conflicts: HashMap<(StoreId, Sku, ConflictKind), Uuid>,
    /// Open oversell conflicts by each reservation they name (what settles them when it closes).
    pub open_oversells: HashMap<Uuid, BTreeSet<Uuid>>,
    pub hub_requests: HashMap<Uuid, HubRequest>,
    pub action_requests: HashMap<String, ActionRequest>,
    pub transfers: HashMap<Uuid, Transfer>,
    /// Transfers in transit by destination, by (ship time, id).
    pub in_transit_to: HashMap<StoreIx, BTreeSet<(i64, Uuid)>>,
    /// Units in transit per SKU and destination.
    pub incoming: HashMap<SkuIx, BTreeMap<StoreIx, u64>>,
    pub feed: VecDeque<FeedEvent>,
    pub feed_head: u64,
    pub counter_seq: u64,
    pub alloc_seq: u64,
    pub id_counter: u64,
    pub hub_writer: WriterId,
    /// Escrow mode (`Config::escrow`): online promises only within granted rights.
    pub escrow: bool,
    /// Time constant of the sales velocity (`Config::staleness`), for channels' lag margins.
    pub tau_ms: i64,
    /// Configured sales channels (`web` only when configured; else its defaults apply).
    pub channels: BTreeMap<crate::channels::ChannelId, crate::channels::Channel>,
    /// Each configured channel's last announced `ats` per SKU (absent: 0); derived, rebuilt on load.
    pub channel_ats: BTreeMap<crate::channels::ChannelId, HashMap<SkuIx, u64>>,
    /// Per SKU, how fast each channel reserves it (a record per (SKU, channel)).
    pub channel_demand: HashMap<SkuIx, BTreeMap<crate::channels::ChannelId, crate::model::Velocity>>,
    pub dirty: Dirty,
}

impl Tables {
    pub fn new(seed: u128, feed_retain: usize, hub_writer: WriterId) -> Tables {
        Tables {
            seed,
            feed_retain,
            stores: Vec::new(),
            store_ix: HashMap::new(),
            skus: Vec::new(),
            sku_ix: HashMap::new(),
            writers: Vec::new(),
            writer_ix: HashMap::new(),
            cells: HashMap::new(),
            overrides: HashMap::new(),
            reservations: HashMap::new(),
            allocations: HashMap::new(),
            res_allocs: HashMap::new(),
            by_customer: HashMap::new(),
            expiry: BTreeSet::new(),
            conflicts: HashMap::new(),
            open_conflicts: HashMap::new(),
            open_oversells: HashMap::new(),
            hub_requests: HashMap::new(),
            action_requests: HashMap::new(),
            transfers: HashMap::new(),
            in_transit_to: HashMap::new(),
            incoming: HashMap::new(),
            feed: VecDeque::new(),
            feed_head: 0,
            counter_seq: 0,
            alloc_seq: 0,
            id_counter: 0,
            hub_writer,
            escrow: false,
            tau_ms: 1,
            channels: BTreeMap::new(),
            channel_ats: BTreeMap::new(),
            channel_demand: HashMap::new(),
            dirty: Dirty::default(),
        }
    }

    // ---- lookups -------------------------------------------------------------------------

    pub fn store(&self, ix: StoreIx) -> &Store {
        &self.stores[ix.0 as usize]
    }

    pub fn sku(&self, ix: SkuIx) -> &SkuInfo {
        &self.skus[ix.0 as usize]
    }

    pub fn writer(&self, ix: WriterIx) -> &WriterId {
        &self.writers[ix.0 as usize]
    }

    pub fn cell(&self, st: StoreIx, sk: SkuIx) -> Option<&Cell> {
        self.cells.get(&(st, sk))
    }

    pub fn cell_by_name(&self, store: &StoreId, sku: &Sku) -> Option<&Cell> {
        self.cell(*self.store_ix.get(store)?, *self.sku_ix.get(sku)?)
    }

    pub fn allocations_of(&self, res: Uuid) -> impl Iterator<Item = &Uuid> {
        self.res_allocs.get(&res).into_iter().flatten()
    }

    pub fn overrides_of(&self, store: &StoreId, sku: &Sku) -> Option<&Overrides> {
        self.overrides.get(store)?.get(sku)
    }

    pub fn open_conflict(&self, store: &StoreId, sku: &Sku, kind: ConflictKind) -> Option<Uuid> {
        self.open_conflicts.get(&(store.clone(), sku.clone(), kind)).copied()
    }

    // ---- ids, stores, catalog --------------------------------------------------------------

    /// A fresh id (allocation or conflict), deterministic in (seed, counter, time).
    pub fn mint(&mut self, now_ms: i64) -> Uuid {
        self.id_counter += 1;
        self.dirty.ids = true;
        crate::ids::mint(self.seed, self.id_counter, now_ms)
    }

    pub fn intern_sku(&mut self, sku: &Sku) -> SkuIx {
        if let Some(ix) = self.sku_ix.get(sku) {
            return *ix;
        }
        let ix = SkuIx(u32::try_from(self.skus.len()).expect("fewer than 2^32 SKUs"));
        self.skus.push(SkuInfo { sku: sku.clone(), rule: None, stores: Vec::new() });
        self.sku_ix.insert(sku.clone(), ix);
        ix
    }

    pub fn intern_writer(&mut self, w: &WriterId) -> WriterIx {
        if let Some(ix) = self.writer_ix.get(w) {
            return *ix;
        }
        let ix = WriterIx(u32::try_from(self.writers.len()).expect("fewer than 2^32 writers"));
        self.writers.push(w.clone());
        self.writer_ix.insert(w.clone(), ix);
        ix
    }

    pub fn insert_store(&mut self, store: Store) -> StoreIx {
        let ix = StoreIx(u32::try_from(self.stores.len()).expect("fewer than 2^32 stores"));
        self.store_ix.insert(store.id.clone(), ix);
        self.stores.push(store);
        self.dirty.stores.insert(ix);
        ix
    }

    pub fn store_mut(&mut self, ix: StoreIx) -> &mut Store {
        self.dirty.stores.insert(ix);
        &mut self.stores[ix.0 as usize]
    }

    /// Marks a store's holds as changed (its agent gets a new snapshot).
    pub fn bump_holds(&mut self, ix: StoreIx) {
        self.store_mut(ix).holds_version += 1;
    }

    pub fn set_rule(&mut self, sku: &Sku, rule: Option<crate::model::CatalogRule>) {
        let ix = self.intern_sku(sku);
        self.skus[ix.0 as usize].rule = rule;
        self.dirty.catalog.insert(ix);
    }

    pub fn set_overrides(&mut self, store: &StoreId, sku: &Sku, o: Overrides) {
        if o == Overrides::default() {
            if let Some(m) = self.overrides.get_mut(store) {
                m.remove(sku);
                if m.is_empty() {
                    self.overrides.remove(store);
                }
            }
        } else {
            self.overrides.entry(store.clone()).or_default().insert(sku.clone(), o);
        }
        self.dirty.overrides.insert((store.clone(), sku.clone()));
    }

    // ---- cells and counter entries ----------------------------------------------------------

    /// The cell, created (and listed under its SKU in store-id order) if it did not exist.
    pub fn cell_mut(&mut self, st: StoreIx, sk: SkuIx) -> &mut Cell {
        if !self.cells.contains_key(&(st, sk)) {
            let name = &self.stores[st.0 as usize].id;
            let list = &self.skus[sk.0 as usize].stores;
            let at = list.binary_search_by(|ix| self.stores[ix.0 as usize].id.cmp(name)).unwrap_err();
            self.skus[sk.0 as usize].stores.insert(at, st);
        }
        self.cells.entry((st, sk)).or_default()
    }

    /// Stores a merged entry under the next hub counter sequence.
    pub fn put_entry(&mut self, st: StoreIx, sk: SkuIx, w: WriterIx, entry: PnEntry) {
        self.counter_seq += 1;
        let seq = self.counter_seq;
        let cell = self.cell_mut(st, sk);
        let old = match cell.slots.iter_mut().find(|s| s.writer == w) {
            Some(slot) => {
                let old = slot.seq;
                *slot = Slot { writer: w, entry, seq };
                Some(old)
            }
            None => {
                cell.slots.push(Slot { writer: w, entry, seq });
                None
            }
        };
        let index = &mut self.stores[st.0 as usize].entries_by_seq;
        if let Some(old) = old {
            index.remove(&old);
        }
        index.insert(seq, (sk, w));
        self.dirty.entries.insert((st, sk, w));
    }

    /// A cell's escrow rights to change (marked for its record).
    pub fn rights_mut(&mut self, st: StoreIx, sk: SkuIx) -> &mut shelfsync_shared::Rights {
        self.dirty.rights.insert((st, sk));
        &mut self.cell_mut(st, sk).rights
    }

    /// Recomputes `on_hand` from the entries; returns (before, after). The sum was checked
    /// when the command was planned.
    pub fn refresh(&mut self, st: StoreIx, sk: SkuIx) -> (i64, i64) {
        let cell = self.cell_mut(st, sk);
        let old = cell.on_hand;
        cell.on_hand = sum_entries(cell.slots.iter().map(|s| &s.entry)).expect("sum checked when planned");
        (old, cell.on_hand)
    }

    pub fn set_velocity(&mut self, st: StoreIx, sk: SkuIx, v: Velocity) {
        self.cell_mut(st, sk).velocity = Some(v);
        self.dirty.velocity.insert((st, sk));
    }

    pub fn put_channel(&mut self, ch: crate::channels::Channel) {
        self.dirty.channels.insert(ch.id.clone());
        self.channels.insert(ch.id.clone(), ch);
    }

    pub fn remove_channel(&mut self, id: &crate::channels::ChannelId) {
        self.channels.remove(id);
        self.channel_ats.remove(id);
        self.dirty.channels.insert(id.clone());
    }

    /// How fast `channel` reserves SKU `sk`, if it ever did.
    pub fn demand_of(&self, sk: SkuIx, channel: &crate::channels::ChannelId) -> Option<crate::model::Velocity> {
        self.channel_demand.get(&sk)?.get(channel).copied()
    }

    pub fn set_demand(&mut self, sk: SkuIx, channel: crate::channels::ChannelId, v: crate::model::Velocity) {
        self.dirty.channel_demand.insert((sk, channel.clone()));
        self.channel_demand.entry(sk).or_default().insert(channel, v);
    }

    /// A channel's last announced `ats` of a SKU (0 when none was).
    pub fn announced_ats(&self, id: &crate::channels::ChannelId, sk: SkuIx) -> u64 {
        self.channel_ats.get(id).and_then(|m| m.get(&sk)).copied().unwrap_or(0)
    }

    /// Derived: not a record.
    pub fn set_channel_ats(&mut self, id: &crate::channels::ChannelId, sk: SkuIx, ats: u64) {
        if ats == 0 {
            if let Some(m) = self.channel_ats.get_mut(id) {
                m.remove(&sk);
            }
        } else {
            self.channel_ats.entry(id.clone()).or_default().insert(sk, ats);
        }
    }

    pub fn set_alert(&mut self, st: StoreIx, sk: SkuIx, a: AlertState) {
        self.cell_mut(st, sk).alert = a;
        self.dirty.alerts.insert((st, sk));
    }

    // ---- reservations and allocations ---------------------------------------------------------

    pub fn insert_reservation(&mut self, r: Reservation) {
        if let Some(c) = &r.customer {
            self.by_customer.entry(c.clone()).or_default().push(r.id);
        }
        if let (ReservationStatus::Held, Some(at)) = (r.status, r.expires_at_ms) {
            self.expiry.insert((at, r.id));
        }
        self.dirty.reservations.insert(r.id);
        self.reservations.insert(r.id, r);
    }

    /// Changes a reservation's status and lease, keeping the expiry queue in step.
    pub fn set_reservation(&mut self, id: Uuid, status: ReservationStatus, expires_at_ms: Option<i64>, now_ms: i64) {
        let r = self.reservations.get_mut(&id).expect("reservation exists");
        if let (ReservationStatus::Held, Some(at)) = (r.status, r.expires_at_ms) {
            self.expiry.remove(&(at, id));
        }
        r.status = status;
        r.expires_at_ms = expires_at_ms;
        r.updated_at_ms = now_ms;
        if let (ReservationStatus::Held, Some(at)) = (status, expires_at_ms) {
            self.expiry.insert((at, id));
        }
        self.dirty.reservations.insert(id);
    }

    /// A new allocation; open ones count in their cell's `held`.
    #[allow(clippy::too_many_arguments)]
    pub fn insert_alloc(
        &mut self,
        reservation: Uuid,
        line: u32,
        st: StoreIx,
        sk: SkuIx,
        qty: u64,
        status: AllocationStatus,
        now_ms: i64,
    ) -> Uuid {
        assert!(qty > 0, "allocations hold at least one unit");
        let id = self.mint(now_ms);
        self.alloc_seq += 1;
        let seq = self.alloc_seq;
        let a = Allocation {
            id,
            reservation,
            line,
            store: self.store(st).id.clone(),
            sku: self.sku(sk).sku.clone(),
            qty,
            status,
            created_seq: seq,
            updated_at_ms: now_ms,
        };
        if status.is_open() {
            self.open_index(st, sk, seq, id, qty, true);
        }
        self.res_allocs.entry(reservation).or_default().push(id);
        self.allocations.insert(id, a);
        self.dirty.allocations.insert(id);
        id
    }

    pub(crate) fn open_index(&mut self, st: StoreIx, sk: SkuIx, seq: u64, id: Uuid, qty: u64, open: bool) {
        let cell = self.cell_mut(st, sk);
        if open {
            cell.held += qty;
            cell.open.insert(seq, id);
            self.stores[st.0 as usize].open.insert(seq, id);
        } else {
            cell.held = cell.held.checked_sub(qty).expect("held covers its open allocations");
            cell.open.remove(&seq);
            self.stores[st.0 as usize].open.remove(&seq);
        }
    }

    pub(crate) fn alloc_cell(&self, a: &Allocation) -> (StoreIx, SkuIx) {
        (self.store_ix[&a.store], self.sku_ix[&a.sku])
    }

    /// Moves an allocation to `status`; closing an open one gives its units back.
    pub fn set_alloc_status(&mut self, id: Uuid, status: AllocationStatus, now_ms: i64) {
        let a = self.allocations.get(&id).expect("allocation exists");
        let (was_open, qty, seq) = (a.status.is_open(), a.qty, a.created_seq);
        let (st, sk) = self.alloc_cell(a);
        assert!(was_open || !status.is_open(), "a closed allocation never reopens");
        if was_open && !status.is_open() {
            self.open_index(st, sk, seq, id, qty, false);
        }
        let a = self.allocations.get_mut(&id).expect("allocation exists");
        a.status = status;
        a.updated_at_ms = now_ms;
        self.dirty.allocations.insert(id);
    }

    /// Takes `by` units off an open allocation (it stays open with the rest).
    pub fn shrink_alloc(&mut self, id: Uuid, by: u64, now_ms: i64) {
        let a = self.allocations.get(&id).expect("allocation exists");
        assert!(a.status.is_open() && by < a.qty, "shrinking leaves an open allocation");
        let (st, sk) = self.alloc_cell(a);
        let cell = self.cell_mut(st, sk);
        cell.held = cell.held.checked_sub(by).expect("held covers its open allocations");
        let a = self.allocations.get_mut(&id).expect("allocation exists");
        a.qty -= by;
        a.updated_at_ms = now_ms;
        self.dirty.allocations.insert(id);
    }

    // ---- conflicts, requests, feed ---------------------------------------------------------

    /// Inserts or replaces a conflict row, keeping the open-conflict index in step.
    pub fn put_conflict(&mut self, c: Conflict) {
        if let Some(sku) = c.sku.as_ref().filter(|_| indexed(c.kind)) {
            let key = (c.store.clone(), sku.clone(), c.kind);
            match c.status {
                ConflictStatus::Open => {
                    self.open_conflicts.insert(key, c.id);
                }
                ConflictStatus::Resolved => {
                    if self.open_conflicts.get(&key) == Some(&c.id) {
                        self.open_conflicts.remove(&key);
                    }
                }
            }
        }
        if c.kind == ConflictKind::Oversell {
            self.index_oversell(&c);
        }
        self.dirty.conflicts.insert(c.id);
        self.conflicts.insert(c.id, c);
    }

    /// Keeps [`Tables::open_oversells`] in step with one oversell conflict row.
    pub fn index_oversell(&mut self, c: &Conflict) {
        for r in &c.reservations {
            match c.status {
                ConflictStatus::Open => {
                    self.open_oversells.entry(*r).or_default().insert(c.id);
                }
                ConflictStatus::Resolved => {
                    if let Some(set) = self.open_oversells.get_mut(r) {
                        set.remove(&c.id);
                        if set.is_empty() {
                            self.open_oversells.remove(r);
                        }
                    }
                }
            }
        }
    }

    /// Marks an open conflict resolved.
    pub fn resolve_conflict(&mut self, id: Uuid, resolution: String, now_ms: i64) -> Conflict {
        let mut c = self.conflicts.get(&id).expect("conflict exists").clone();
        c.status = ConflictStatus::Resolved;
        c.resolution = resolution;
        c.resolved_at_ms = Some(now_ms);
        self.put_conflict(c.clone());
        c
    }

    pub fn put_hub_request(&mut self, r: HubRequest) {
        self.dirty.hub_requests.insert(r.id);
        self.hub_requests.insert(r.id, r);
    }

    /// Inserts or replaces a transfer row, keeping the in-transit indexes in step.
    pub fn put_transfer(&mut self, t: Transfer) {
        if let Some(old) = self.transfers.remove(&t.id) {
            self.index_transfer(&old, false);
        }
        self.index_transfer(&t, true);
        self.dirty.transfers.insert(t.id);
        self.transfers.insert(t.id, t);
    }

    /// Adds (or takes away) a transfer's part of the in-transit indexes.
    pub fn index_transfer(&mut self, t: &Transfer, add: bool) {
        if t.status != TransferStatus::InTransit {
            return;
        }
        let to = self.store_ix[&t.to];
        let at = self.in_transit_to.entry(to).or_default();
        if add {
            at.insert((t.shipped_at_ms, t.id));
        } else {
            at.remove(&(t.shipped_at_ms, t.id));
            if at.is_empty() {
                self.in_transit_to.remove(&to);
            }
        }
        for l in &t.lines {
            let sk = self.intern_sku(&l.sku);
            let per_store = self.incoming.entry(sk).or_default();
            let units = per_store.entry(to).or_default();
            if add {
                *units += l.shipped;
            } else {
                *units = units.checked_sub(l.shipped).expect("incoming covers its transfers");
                if *units == 0 {
                    per_store.remove(&to);
                    if per_store.is_empty() {
                        self.incoming.remove(&sk);
                    }
                }
            }
        }
    }

    pub fn put_action_request(&mut self, r: ActionRequest) {
        self.dirty.action_requests.insert(r.key.clone());
        self.action_requests.insert(r.key.clone(), r);
    }

    /// Appends an event to the feed (the next cursor, gap-free).
    pub fn emit(&mut self, kind: FeedKind, at_ms: i64, data: FeedData) {
        self.feed_head += 1;
        let e = FeedEvent { cursor: self.feed_head, kind, at_ms, data };
        self.dirty.feed.push(e.clone());
        self.push_feed(e);
    }

    /// Records a journal line the hub stores (its own, or one a store synced up) and, for an
    /// adjustment, tells the feed (`adjustment_recorded`).
    pub fn note_journal(&mut self, e: shelfsync_shared::JournalEvent, own: bool, now_ms: i64) {
        if e.kind == shelfsync_shared::EventKind::Adjustment {
            let by = if e.writer.is_hub() { "hub" } else { "store" };
            let data = crate::feed::FeedData::Adjustment {
                store: e.store.clone(),
                sku: e.sku.clone(),
                delta: e.delta,
                reason: e.reason.clone(),
                id: e.id,
                line: e.line,
                occurred_at_ms: e.occurred_at_ms,
                by: by.into(),
            };
            self.emit(crate::feed::FeedKind::AdjustmentRecorded, now_ms, data);
        }
        if own {
            self.dirty.journal.push(e);
        }
    }

    pub fn push_feed(&mut self, e: FeedEvent) {
        self.feed.push_back(e);
        while self.feed.len() > self.feed_retain {
            self.feed.pop_front();
        }
    }
}
