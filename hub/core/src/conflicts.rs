//! Conflicts about a store's agents or the hub's files (recorded once per id, as the runtime
//! reports them), a person resolving a conflict, and the conflict list.

use serde::{Deserialize, Serialize};
use shelfsync_shared::{Sku, StoreId};
use uuid::Uuid;

use crate::command::{Done, Outcome, Refusal};
use crate::feed::{FeedData, FeedKind};
use crate::model::{AgentConflictKind, AllocationStatus, Conflict, ConflictStatus};
use crate::{Ctx, Decider};

/// Which conflicts to list.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConflictFilter {
    /// Only this store.
    pub store: Option<StoreId>,
    /// Only this SKU.
    pub sku: Option<Sku>,
    /// Only open or only resolved.
    pub status: Option<ConflictStatus>,
    /// Only conflicts listed after this one (the previous page's last id).
    pub after: Option<Uuid>,
    /// Most rows.
    pub limit: usize,
}

fn feed_kind(kind: AgentConflictKind) -> FeedKind {
    match kind {
        AgentConflictKind::StoreRolledBack => FeedKind::StoreRolledBack,
        AgentConflictKind::WriterCloned => FeedKind::WriterCloned,
        AgentConflictKind::DuplicateAgent => FeedKind::DuplicateAgent,
        AgentConflictKind::HubRolledBack => FeedKind::HubRolledBack,
    }
}

/// Records a conflict about a store's agents once per id, with a feed event.
pub(crate) fn agent_conflict(
    cx: &mut Ctx<'_>,
    id: Uuid,
    kind: AgentConflictKind,
    store: StoreId,
    resolution: String,
    details: serde_json::Value,
) -> Done {
    if cx.t.conflicts.contains_key(&id) {
        return Done::AgentConflict { new: false };
    }
    let c = Conflict {
        id,
        kind: kind.kind(),
        store,
        sku: None,
        shortfall: 0,
        reservations: Vec::new(),
        resolution,
        status: ConflictStatus::Open,
        detected_at_ms: cx.now,
        resolved_at_ms: None,
        details: Some(details),
    };
    cx.t.put_conflict(c.clone());
    cx.t.emit(feed_kind(kind), cx.now, FeedData::Conflict { conflict: c });
    Done::AgentConflict { new: true }
}

/// A person resolved an open conflict.
pub(crate) fn resolve(cx: &mut Ctx<'_>, id: Uuid, resolution: String) -> Outcome {
    match cx.t.conflicts.get(&id) {
        None => return Err(Refusal::NotFound(format!("no conflict {id}"))),
        Some(c) if c.status == ConflictStatus::Resolved => {
            return Err(Refusal::InvalidState(format!("conflict {id} is resolved already")));
        }
        Some(_) => {}
    }
    let c = cx.t.resolve_conflict(id, resolution, cx.now);
    cx.t.emit(FeedKind::ConflictResolved, cx.now, FeedData::Conflict { conflict: c.clone() });
    Ok(Done::ConflictResolved(c))
}

/// Settles the open oversell conflicts naming `reservation`, which just closed (released or
/// expired): a conflict whose reservations no longer wait for a short line has no cause left, so
/// it resolves itself, with a feed event.
pub(crate) fn settle_oversells(cx: &mut Ctx<'_>, reservation: Uuid) {
    let Some(ids) = cx.t.open_oversells.get(&reservation).cloned() else { return };
    for id in ids {
        let c = &cx.t.conflicts[&id];
        let owed = c.reservations.iter().any(|r| waits_for_short(cx, *r));
        if owed {
            continue;
        }
        let status = cx.t.reservations.get(&reservation).map(|r| r.status.as_str()).unwrap_or("closed");
        let resolution = format!("{}; reservation {reservation} {status}: nothing is owed any more", c.resolution);
        let c = cx.t.resolve_conflict(id, resolution, cx.now);
        cx.t.emit(FeedKind::OversellResolved, cx.now, FeedData::Conflict { conflict: c });
    }
}

/// Whether a reservation is still open with a line (partly) marked short.
fn waits_for_short(cx: &Ctx<'_>, reservation: Uuid) -> bool {
    cx.t.reservations.get(&reservation).is_some_and(|r| r.status.is_open())
        && cx.t.allocations_of(reservation).any(|a| cx.t.allocations[a].status == AllocationStatus::Short)
}

impl Decider {
    /// Conflicts, newest first (by detection time, then id), filtered.
    pub fn conflicts(&self, f: &ConflictFilter) -> Vec<Conflict> {
        let mut out: Vec<&Conflict> = self
            .t
            .conflicts
            .values()
            .filter(|c| f.store.as_ref().is_none_or(|s| *s == c.store))
            .filter(|c| f.sku.as_ref().is_none_or(|s| Some(s) == c.sku.as_ref()))
            .filter(|c| f.status.is_none_or(|s| s == c.status))
            .collect();
        let newest_first = |c: &Conflict| (std::cmp::Reverse(c.detected_at_ms), std::cmp::Reverse(c.id));
        out.sort_by_key(|c| newest_first(c));
        let start = match f.after.and_then(|id| self.t.conflicts.get(&id)) {
            Some(after) => out.partition_point(|c| newest_first(c) <= newest_first(after)),
            None => 0,
        };
        out.into_iter().skip(start).take(f.limit).cloned().collect()
    }

    /// One conflict.
    pub fn conflict(&self, id: Uuid) -> Option<Conflict> {
        self.t.conflicts.get(&id).cloned()
    }
}
