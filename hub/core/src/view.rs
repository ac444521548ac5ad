//! What callers see: the reservation view (built from the rows), and the JSON shapes today's API
//! and feed use for reservations, conflicts and restock/transfer answers (RFC 3339 times,
//! snake_case statuses), produced from the typed values in exactly one place.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use shelfsync_shared::{Sku, StoreId};
use uuid::Uuid;

use crate::model::{AllocationStatus, Conflict, HubChangeResponse, Reservation, ReservationStatus};
use crate::tables::Tables;

use shelfsync_shared::rfc3339;

/// One allocation of a line to a store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocationView {
    /// The hold id the store fulfils by.
    pub hold: Uuid,
    /// Where.
    pub store: StoreId,
    /// What.
    pub sku: Sku,
    /// How many.
    pub qty: u64,
    /// What became of it.
    pub status: AllocationStatus,
}

/// One reservation line and what became of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineView {
    /// What.
    pub sku: Sku,
    /// How many were asked.
    pub qty: u64,
    /// Units no store could supply after an oversell.
    pub short: u64,
    /// Where the units are (or were), by creation.
    pub allocations: Vec<AllocationView>,
}

/// A reservation as the storefront sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservationView {
    /// Id.
    pub id: Uuid,
    /// The idempotency key as sent, when it is not the id itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Lifecycle state.
    pub status: ReservationStatus,
    /// Whether some units could not be supplied after an oversell.
    pub short: bool,
    /// Pickup store.
    pub pickup_store: Option<StoreId>,
    /// Customer reference.
    pub customer: Option<String>,
    /// The sales channel (`None`: `web`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<crate::channels::ChannelId>,
    /// Creation time.
    pub created_at_ms: i64,
    /// When an unpaid lease lapses.
    pub expires_at_ms: Option<i64>,
    /// Open allocations, flat.
    pub allocations: Vec<AllocationView>,
    /// Per line.
    pub lines: Vec<LineView>,
}

/// The key an answer shows: as sent, or the id's own spelling when the key was the id.
fn key_of(id: Uuid, key: Option<&str>) -> String {
    key.map_or_else(|| id.to_string(), str::to_owned)
}

impl ReservationView {
    /// Today's JSON shape (`created_at`/`expires_at` as RFC 3339).
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "key": key_of(self.id, self.key.as_deref()),
            "status": self.status.as_str(),
            "short": self.short,
            "pickup_store": self.pickup_store,
            "customer": self.customer,
            "channel": self.channel.as_ref().map_or(crate::channels::WEB, |c| c.as_str()),
            "created_at": rfc3339(self.created_at_ms),
            "expires_at": self.expires_at_ms.map(rfc3339),
            "allocations": self.allocations,
            "lines": self.lines,
        })
    }
}

impl Conflict {
    /// Today's JSON shape (`detected_at`/`resolved_at` as RFC 3339, `details` only when known).
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "id": self.id,
            "kind": self.kind.as_str(),
            "store": self.store,
            "sku": self.sku,
            "shortfall": self.shortfall,
            "reservations": self.reservations,
            "resolution": self.resolution,
            "status": self.status.as_str(),
            "detected_at": rfc3339(self.detected_at_ms),
            "resolved_at": self.resolved_at_ms.map(rfc3339),
        });
        if let (Some(d), Some(map)) = (&self.details, v.as_object_mut()) {
            map.insert("details".into(), d.clone());
        }
        v
    }
}

impl HubChangeResponse {
    /// Today's JSON shape (`kind` as a string, `recorded_at` as RFC 3339). A batch restock
    /// answers per entry, in order: `restocks: [{id, store, lines}]` (`id`: the entry's journal
    /// event id, derived from the request's).
    pub fn to_json(&self) -> Value {
        if self.kind == crate::model::HubChangeKind::RestockBatch {
            let mut entries: Vec<Value> = Vec::new();
            for l in &self.lines {
                let i = l.entry.unwrap_or_default() as usize;
                while entries.len() <= i {
                    let n = entries.len();
                    entries.push(json!({
                        "id": shelfsync_shared::IdempotencyKey::from_uuid(self.id).item(n),
                        "store": l.store,
                        "lines": [],
                    }));
                }
                let line = json!({"sku": l.sku, "delta": l.delta, "on_hand": l.on_hand});
                entries[i]["lines"].as_array_mut().expect("built above").push(line);
            }
            return json!({
                "id": self.id,
                "key": key_of(self.id, self.key.as_deref()),
                "kind": self.kind.as_str(),
                "restocks": entries,
                "recorded_at": rfc3339(self.recorded_at_ms),
            });
        }
        json!({
            "id": self.id,
            "key": key_of(self.id, self.key.as_deref()),
            "kind": self.kind.as_str(),
            "lines": self.lines,
            "recorded_at": rfc3339(self.recorded_at_ms),
        })
    }
}

/// Builds the view of a reservation from its rows: lines in order, each line's allocations by
/// creation, `short` summed per line, open allocations flat.
pub(crate) fn build(t: &Tables, r: &Reservation) -> ReservationView {
    let mut lines: Vec<LineView> = r
        .lines
        .iter()
        .map(|l| LineView { sku: l.sku.clone(), qty: l.qty, short: 0, allocations: Vec::new() })
        .collect();
    let mut open = Vec::new();
    for aid in t.allocations_of(r.id) {
        let a = &t.allocations[aid];
        let v = AllocationView { hold: a.id, store: a.store.clone(), sku: a.sku.clone(), qty: a.qty, status: a.status };
        if a.status.is_open() {
            open.push((a.line, v.clone()));
        }
        if let Some(l) = lines.get_mut(a.line as usize) {
            if a.status == AllocationStatus::Short {
                l.short += a.qty;
            }
            l.allocations.push(v);
        }
    }
    // Allocations are kept by creation; views list them by line, then creation.
    open.sort_by_key(|(line, _)| *line);
    let short = lines.iter().any(|l| l.short > 0);
    ReservationView {
        id: r.id,
        key: r.key.clone(),
        status: r.status,
        short,
        pickup_store: r.pickup_store.clone(),
        customer: r.customer.clone(),
        channel: r.channel.clone(),
        created_at_ms: r.created_at_ms,
        expires_at_ms: r.expires_at_ms,
        allocations: open.into_iter().map(|(_, v)| v).collect(),
        lines,
    }
}
