//! A canonical picture of the whole state, keyed by real ids (never by interning order), for
//! comparing deciders: the live one against one rebuilt from its records, and a state before and
//! after a refused command. Derived indexes are included, so a bookkeeping slip in the live
//! decider shows up as a difference from the rebuilt one.

use std::collections::{BTreeMap, BTreeSet};

use shelfsync_shared::{PnEntry, Sku, StoreId, WriterId};
use uuid::Uuid;

use crate::feed::FeedEvent;
use crate::model::{
    ActionRequest, AlertState, Allocation, CatalogRule, Conflict, ConflictKind, HubRequest, Overrides, Reservation,
    Velocity,
};
use crate::stores::StoreView;
use crate::Decider;

/// One cell, canonically.
#[derive(Clone, Debug, PartialEq)]
pub struct CellSnapshot {
    /// Entries by writer, with their hub sequence.
    pub entries: BTreeMap<WriterId, (PnEntry, u64)>,
    /// Σp − Σn.
    pub on_hand: i64,
    /// Held total.
    pub held: u64,
    /// Velocity estimate.
    pub velocity: Option<Velocity>,
    /// Alert state.
    pub alert: AlertState,
    /// Open allocations by creation sequence.
    pub open: Vec<(u64, Uuid)>,
    /// Escrow rights: every (writer, kind, total).
    pub rights: crate::records::RightsEntries,
}

/// A store's indexes, canonically.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreIndexes {
    /// Open allocations by creation sequence.
    pub open: Vec<(u64, Uuid)>,
    /// Counter entries by hub sequence.
    pub entries: Vec<(u64, Sku, WriterId)>,
}

/// The whole state, canonically. Two deciders with equal snapshots decide alike.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    /// Stores.
    pub stores: BTreeMap<StoreId, StoreView>,
    /// Per store: its indexes.
    pub store_indexes: BTreeMap<StoreId, StoreIndexes>,
    /// Cells.
    pub cells: BTreeMap<(StoreId, Sku), CellSnapshot>,
    /// Per SKU, the stores with a cell, in order.
    pub sku_stores: BTreeMap<Sku, Vec<StoreId>>,
    /// Catalog rules.
    pub catalog: BTreeMap<Sku, CatalogRule>,
    /// Store overrides.
    pub overrides: BTreeMap<(StoreId, Sku), Overrides>,
    /// Configured sales channels.
    pub channels: BTreeMap<crate::channels::ChannelId, crate::channels::Channel>,
    /// Each channel's last announced `ats` per SKU (derived: equal after a rebuild).
    pub channel_ats: BTreeMap<(crate::channels::ChannelId, Sku), u64>,
    /// How fast each channel reserves each SKU.
    pub channel_demand: BTreeMap<(crate::channels::ChannelId, Sku), crate::model::Velocity>,
    /// Reservations.
    pub reservations: BTreeMap<Uuid, Reservation>,
    /// Allocation ids of each reservation, by creation.
    pub reservation_allocations: BTreeMap<Uuid, Vec<Uuid>>,
    /// Reservations of each customer.
    pub customers: BTreeMap<String, BTreeSet<Uuid>>,
    /// Held reservations by (expiry, id).
    pub expiry: Vec<(i64, Uuid)>,
    /// Allocations.
    pub allocations: BTreeMap<Uuid, Allocation>,
    /// Conflicts.
    pub conflicts: BTreeMap<Uuid, Conflict>,
    /// Open negative-stock and unknown-SKU conflicts by cell.
    pub open_conflicts: BTreeMap<(StoreId, Sku, ConflictKind), Uuid>,
    /// Restock/transfer requests.
    pub hub_requests: BTreeMap<Uuid, HubRequest>,
    /// Actions under Idempotency-Keys.
    pub action_requests: BTreeMap<String, ActionRequest>,
    /// Transfers.
    pub transfers: BTreeMap<Uuid, crate::transfers::Transfer>,
    /// Transfers in transit by destination, by (ship time, id).
    pub in_transit: BTreeMap<StoreId, Vec<(i64, Uuid)>>,
    /// Units in transit per (destination, SKU).
    pub incoming: BTreeMap<(StoreId, Sku), u64>,
    /// The retained feed.
    pub feed: Vec<FeedEvent>,
    /// Sequences and counters: feed head, counter head, allocation sequence, ids minted.
    pub heads: (u64, u64, u64, u64),
    /// The hub's writer.
    pub hub_writer: WriterId,
}

impl Decider {
    /// The canonical picture of the state (everything but the volatile connected set).
    pub fn snapshot(&self) -> Snapshot {
        let t = &self.t;
        let store_name = |ix: crate::model::StoreIx| t.store(ix).id.clone();
        let stores = t.stores.iter().map(|s| (s.id.clone(), StoreView::from(s))).collect();
        let store_indexes = t
            .stores
            .iter()
            .map(|s| {
                let open = s.open.iter().map(|(q, id)| (*q, *id)).collect();
                let entries =
                    s.entries_by_seq.iter().map(|(q, (sk, w))| (*q, t.sku(*sk).sku.clone(), t.writer(*w).clone()));
                (s.id.clone(), StoreIndexes { open, entries: entries.collect() })
            })
            .collect();
        let cells = t
            .cells
            .iter()
            .map(|((st, sk), c)| {
                let snap = CellSnapshot {
                    entries: c.slots.iter().map(|s| (t.writer(s.writer).clone(), (s.entry, s.seq))).collect(),
                    on_hand: c.on_hand,
                    held: c.held,
                    velocity: c.velocity,
                    alert: c.alert,
                    open: c.open.iter().map(|(q, id)| (*q, *id)).collect(),
                    rights: crate::records::rights_entries(&c.rights),
                };
                ((store_name(*st), t.sku(*sk).sku.clone()), snap)
            })
            .collect();
        let sku_stores = t
            .skus
            .iter()
            .filter(|s| !s.stores.is_empty())
            .map(|s| (s.sku.clone(), s.stores.iter().map(|st| store_name(*st)).collect()))
            .collect();
        let catalog = t.skus.iter().filter_map(|s| s.rule.map(|r| (s.sku.clone(), r))).collect();
        let overrides = t
            .overrides
            .iter()
            .flat_map(|(store, m)| m.iter().map(move |(sku, o)| ((store.clone(), sku.clone()), *o)))
            .collect();
        Snapshot {
            stores,
            store_indexes,
            cells,
            sku_stores,
            catalog,
            overrides,
            channels: t.channels.clone(),
            channel_ats: t
                .channel_ats
                .iter()
                .flat_map(|(c, m)| m.iter().map(move |(sk, n)| ((c.clone(), t.sku(*sk).sku.clone()), *n)))
                .collect(),
            channel_demand: t
                .channel_demand
                .iter()
                .flat_map(|(sk, m)| m.iter().map(move |(c, v)| ((c.clone(), t.sku(*sk).sku.clone()), *v)))
                .collect(),
            reservations: t.reservations.iter().map(|(k, v)| (*k, v.clone())).collect(),
            reservation_allocations: t.res_allocs.iter().map(|(k, v)| (*k, v.clone())).collect(),
            customers: t.by_customer.iter().map(|(k, v)| (k.clone(), v.iter().copied().collect())).collect(),
            expiry: t.expiry.iter().copied().collect(),
            allocations: t.allocations.iter().map(|(k, v)| (*k, v.clone())).collect(),
            conflicts: t.conflicts.iter().map(|(k, v)| (*k, v.clone())).collect(),
            open_conflicts: t.open_conflicts.iter().map(|(k, v)| (k.clone(), *v)).collect(),
            hub_requests: t.hub_requests.iter().map(|(k, v)| (*k, v.clone())).collect(),
            action_requests: t.action_requests.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            transfers: t.transfers.iter().map(|(k, v)| (*k, v.clone())).collect(),
            in_transit: t
                .in_transit_to
                .iter()
                .map(|(st, set)| (store_name(*st), set.iter().copied().collect()))
                .collect(),
            incoming: t
                .incoming
                .iter()
                .flat_map(|(sk, m)| m.iter().map(move |(st, n)| ((store_name(*st), t.sku(*sk).sku.clone()), *n)))
                .collect(),
            feed: t.feed.iter().cloned().collect(),
            heads: (t.feed_head, t.counter_seq, t.alloc_seq, t.id_counter),
            hub_writer: t.hub_writer.clone(),
        }
    }
}
