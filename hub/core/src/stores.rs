//! Stores as the decider knows them: registered, revoked, last heard from; and the hub's own
//! counter writer. Certificates and agent writers' watermarks stay in the runtime.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use shelfsync_shared::{StoreId, WriterId};

use crate::command::{Done, Outcome, Refusal};
use crate::model::{Store, StoreIx};
use crate::tables::Tables;
use crate::{Ctx, Decider};

/// A registered store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreView {
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

impl From<&Store> for StoreView {
    fn from(s: &Store) -> Self {
        StoreView {
            id: s.id.clone(),
            added_at_ms: s.added_at_ms,
            revoked_at_ms: s.revoked_at_ms,
            last_seen_ms: s.last_seen_ms,
            holds_version: s.holds_version,
        }
    }
}

pub(crate) fn empty_store(id: StoreId, added_at_ms: i64) -> Store {
    Store {
        id,
        added_at_ms,
        revoked_at_ms: None,
        last_seen_ms: None,
        holds_version: 0,
        open: BTreeMap::new(),
        entries_by_seq: BTreeMap::new(),
    }
}

/// A registered store that is not revoked, or why not.
pub(crate) fn require(t: &Tables, store: &StoreId) -> Result<StoreIx, Refusal> {
    match t.store_ix.get(store) {
        None => Err(Refusal::UnknownStore(store.clone())),
        Some(ix) if t.store(*ix).revoked_at_ms.is_some() => Err(Refusal::Revoked(store.clone())),
        Some(ix) => Ok(*ix),
    }
}

pub(crate) fn add(cx: &mut Ctx<'_>, store: StoreId) -> Outcome {
    if cx.t.store_ix.contains_key(&store) {
        return Err(Refusal::StoreExists(store));
    }
    cx.t.insert_store(empty_store(store, cx.now));
    Ok(Done::StoreAdded)
}

pub(crate) fn revoke(cx: &mut Ctx<'_>, store: &StoreId) -> Outcome {
    let Some(&ix) = cx.t.store_ix.get(store) else { return Err(Refusal::UnknownStore(store.clone())) };
    if cx.t.store(ix).revoked_at_ms.is_some() {
        return Ok(Done::StoreRevoked { newly: false });
    }
    cx.t.store_mut(ix).revoked_at_ms = Some(cx.now);
    // Its units leave every channel's pool.
    if !cx.t.channels.is_empty() {
        let mut skus: Vec<crate::model::SkuIx> =
            cx.t.cells.keys().filter(|(st, _)| *st == ix).map(|(_, sk)| *sk).collect();
        skus.sort();
        for sk in skus {
            crate::channels::emit_ats(cx.t, sk, cx.now);
        }
    }
    Ok(Done::StoreRevoked { newly: true })
}

pub(crate) fn seen(cx: &mut Ctx<'_>, store: &StoreId, at_ms: i64) -> Outcome {
    let Some(&ix) = cx.t.store_ix.get(store) else { return Err(Refusal::UnknownStore(store.clone())) };
    // As the hub always did: MAX(COALESCE(last_seen, 0), at).
    let next = cx.t.store(ix).last_seen_ms.unwrap_or(0).max(at_ms);
    if cx.t.store(ix).last_seen_ms != Some(next) {
        cx.t.store_mut(ix).last_seen_ms = Some(next);
    }
    Ok(Done::StoreSeen)
}

pub(crate) fn set_hub_writer(cx: &mut Ctx<'_>, writer: WriterId) -> Outcome {
    if !writer.is_hub() {
        return Err(Refusal::Invalid(format!("writer {writer} is not a hub writer")));
    }
    if cx.t.hub_writer != writer {
        cx.t.hub_writer = writer;
        cx.t.dirty.hub_writer = true;
    }
    Ok(Done::HubWriterSet)
}

impl Decider {
    /// Every registered store, by id.
    pub fn stores(&self) -> Vec<StoreView> {
        let mut out: Vec<StoreView> = self.t.stores.iter().map(StoreView::from).collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// One registered store.
    pub fn store(&self, id: &StoreId) -> Option<StoreView> {
        self.t.store_ix.get(id).map(|ix| StoreView::from(self.t.store(*ix)))
    }
}
