//! The OpenAPI document of the agent's local HTTP API (the POS's), served at `/openapi.json`.
//!
//! As at the hub, the router is built with `utoipa_axum::OpenApiRouter`, so every route carries
//! its description; the schemas below describe the JSON the handlers write and
//! `tests/tests/openapi.rs` validates real responses against them.

use serde::Serialize;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

/// Top-level description; the paths come from the router.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Shelfsync agent API",
        description = "The store's point of sale: sales, returns, adjustments and counts recorded durably \
                       (a 2xx means on disk), stock, online holds to pick, sync status. Listens on loopback \
                       by default; a bearer token is needed when `api.token` is set. Errors are JSON \
                       {\"error\": code, \"message\": text}.",
        license(name = "Apache-2.0")
    ),
    modifiers(&Bearer),
)]
pub struct AgentDoc;

struct Bearer;

impl Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme("bearer", SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
    }
}

/// An error: a stable code and a sentence for people.
#[derive(Serialize, ToSchema)]
pub struct Error {
    pub error: String,
    pub message: String,
}

/// An online hold at this store.
#[derive(Serialize, ToSchema)]
pub struct Hold {
    /// Fulfil by this id.
    pub id: uuid::Uuid,
    pub reservation: uuid::Uuid,
    pub sku: String,
    pub qty: u64,
    /// held (unpaid) or committed (paid).
    pub status: String,
    #[schema(nullable = false)]
    pub expires_at: Option<String>,
    #[schema(nullable = false)]
    pub fulfilled_at: Option<String>,
}

/// What one line did.
#[derive(Serialize, ToSchema)]
pub struct LineResult {
    pub sku: String,
    /// Change of on_hand this line made.
    pub delta: i64,
    pub on_hand: i64,
    pub held: u64,
    /// on_hand − held; with escrow, at most the store's own rights (on_hand − granted).
    pub sellable: i64,
    /// Units granted online (escrow rights), 0 without escrow.
    pub granted: u64,
    /// A sale beyond the store's own rights: the granted units it took (flag
    /// `escrow_overdraft`). Absent when 0.
    #[schema(nullable = false)]
    pub rights_broken: Option<u64>,
    /// For counts: what the store believed before.
    #[schema(nullable = false)]
    pub previous_on_hand: Option<i64>,
    /// For counts: how the count was applied (on_hand = counted + changes_after, unless a newer
    /// count stands).
    #[schema(nullable = false)]
    pub count: Option<CountResult>,
    /// For a change that occurred at or before the SKU's newest count: that count's time (the
    /// count already saw it on the shelf, so on_hand did not move).
    #[schema(nullable = false)]
    pub absorbed_by_count_at: Option<String>,
    /// e.g. negative_stock, dips_into_holds, unknown_sku.
    pub flags: Vec<String>,
    #[schema(nullable = false)]
    pub endangered_holds: Option<Vec<Hold>>,
}

/// How a count was applied.
#[derive(Serialize, ToSchema)]
pub struct CountResult {
    pub counted: i64,
    /// The count's occurred_at.
    pub counted_at: String,
    /// Σ of the changes that occurred after the count (applied on top of it).
    pub changes_after: i64,
    /// A newer count stands (its time): this one changed nothing.
    #[schema(nullable = false)]
    pub superseded_by: Option<String>,
}

/// `POST /v1/batch`: one result per item, in order.
#[derive(Serialize, ToSchema)]
pub struct BatchRecorded {
    /// The batch's id (its key's UUID).
    pub id: uuid::Uuid,
    /// The batch's idempotency key as sent.
    pub key: String,
    pub recorded_at: String,
    pub items: Vec<Recorded>,
    pub flags: Vec<String>,
}

/// What the POS gets back (and again on a retry with the same id).
#[derive(Serialize, ToSchema)]
pub struct Recorded {
    /// The request's id: the key itself when it is a UUID, else the UUID derived from it.
    pub id: uuid::Uuid,
    /// The idempotency key as sent.
    #[schema(nullable = false)]
    pub key: Option<String>,
    /// sale, return, adjustment, count, fulfilment.
    pub kind: String,
    pub occurred_at: String,
    pub recorded_at: String,
    pub lines: Vec<LineResult>,
    pub flags: Vec<String>,
}

/// One SKU here.
#[derive(Serialize, ToSchema)]
pub struct Stock {
    pub sku: String,
    pub on_hand: i64,
    pub held: u64,
    /// on_hand − held; with escrow, at most the store's own rights (on_hand − granted).
    pub sellable: i64,
    /// Units granted online (escrow rights), 0 without escrow.
    pub granted: u64,
    /// Units on their way here from other stores (not on hand, not sellable).
    pub incoming: u64,
    /// The catalog's name, when the store's catalog lists it.
    #[schema(nullable = false)]
    pub name: Option<String>,
}

/// `GET /v1/stock`: a page by SKU.
#[derive(Serialize, ToSchema)]
pub struct StockPage {
    pub items: Vec<Stock>,
    pub next: Option<String>,
}

/// One SKU of a transfer on its way here.
#[derive(Serialize, ToSchema)]
pub struct IncomingLine {
    pub sku: String,
    pub qty: u64,
}

/// A transfer on its way here.
#[derive(Serialize, ToSchema)]
pub struct Incoming {
    /// The transfer id (head office receives it by this id).
    pub id: uuid::Uuid,
    /// The store that shipped it.
    pub from: String,
    pub lines: Vec<IncomingLine>,
    /// RFC 3339.
    pub shipped_at: String,
}

/// `GET /v1/incoming`.
#[derive(Serialize, ToSchema)]
pub struct IncomingList {
    pub items: Vec<Incoming>,
    /// Pass as `after` for the next page; null on the last.
    pub next: Option<uuid::Uuid>,
}

/// `GET /v1/holds`.
#[derive(Serialize, ToSchema)]
pub struct HoldList {
    pub items: Vec<Hold>,
    /// Pass as `after` for the next page; null on the last.
    pub next: Option<uuid::Uuid>,
}

/// `POST /v1/holds/{id}/fulfil`.
#[derive(Serialize, ToSchema)]
pub struct Fulfilled {
    pub hold: Hold,
    pub on_hand: i64,
    pub held: u64,
    pub sellable: i64,
}

/// The link to the hub.
#[derive(Serialize, ToSchema)]
pub struct Sync {
    /// e.g. connecting, connected, disconnected, refused.
    pub state: String,
    pub hub_addr: Option<String>,
    pub hub_writer: Option<String>,
    pub connected_since: Option<String>,
    pub last_error: Option<String>,
    pub attempts: u64,
    pub writer: Option<String>,
}

/// `GET /v1/status`.
#[derive(Serialize, ToSchema)]
pub struct Status {
    pub store: String,
    pub writer: String,
    pub incarnation_started_at: String,
    pub skus: u64,
    pub journal_events: u64,
    pub unsynced_changes: u64,
    pub unsynced_events: u64,
    pub counter_head: u64,
    pub journal_head: u64,
    pub last_sync_at: Option<String>,
    pub sync: Sync,
}

/// A catalog entry with this store's overrides and what applies here.
#[derive(Serialize, ToSchema)]
pub struct CatalogEntry {
    pub sku: String,
    pub name: String,
    pub barcodes: Vec<String>,
    pub safety_stock: u64,
    pub low_stock_threshold: u64,
    pub max_per_customer: u64,
    pub active: bool,
    /// The SKU's escrow values over the chain's (absent when it sets none).
    #[schema(nullable = false)]
    pub escrow: Option<EscrowRule>,
    #[schema(value_type = Option<Object>, nullable = false)]
    pub overrides: Option<serde_json::Value>,
    #[schema(value_type = Option<Object>, nullable = false)]
    pub effective: Option<serde_json::Value>,
}

/// A SKU's or this store's escrow values over the chain's policy (from the hub): each set value
/// replaces the one below (chain ← SKU ← store); an absent one leaves it.
#[derive(Serialize, ToSchema)]
pub struct EscrowRule {
    /// Share of on_hand granted online, in percent (0..=100; 0: nothing online).
    #[schema(nullable = false)]
    pub share_pct: Option<u64>,
    /// At most this many unreserved units online (0: no cap).
    #[schema(nullable = false)]
    pub max: Option<u64>,
    /// Units the store always keeps for walk-ins.
    #[schema(nullable = false)]
    pub keep: Option<u64>,
}

/// `GET /healthz`.
#[derive(Serialize, ToSchema)]
pub struct Health {
    pub status: String,
}
