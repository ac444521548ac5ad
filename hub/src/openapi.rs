//! The OpenAPI document of the hub's HTTP API, served at `/openapi.json`.
//!
//! The document is collected from the handlers themselves: the router is built with
//! `utoipa_axum::OpenApiRouter`, so a route exists only together with its `#[utoipa::path]`
//! description, and `tests/tests/openapi.rs` validates real responses against the schemas here.
//! The schemas below describe the JSON the handlers write (several build it with `json!`), so
//! they are doc types only: the validation test is what keeps them and the handlers in step.

use serde::Serialize;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

/// Top-level description; the paths come from the router.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Shelfsync hub API",
        description = "Head office and the online storefront: availability across every store, \
                       reservations, restocks and transfers, conflicts, the change feed, catalog and tokens. \
                       Bearer tokens have roles: viewer < storefront < admin. Errors are JSON \
                       {\"error\": code, \"message\": text}.",
        license(name = "Apache-2.0")
    ),
    modifiers(&Bearer),
    tags(
        (name = "viewer", description = "Read-only: any valid token."),
        (name = "storefront", description = "Reservations: storefront or admin tokens."),
        (name = "admin", description = "Head office writes: admin tokens."),
        (name = "public", description = "No token needed."),
    )
)]
pub struct HubDoc;

/// Adds the bearer security scheme every authenticated route names.
struct Bearer;

impl Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme("bearer", SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
    }
}

/// An error: a stable code and a sentence for people; some carry more fields (e.g. `parameter`).
#[derive(Serialize, ToSchema)]
pub struct Error {
    /// Stable code (`invalid_request`, `not_found`, `unauthorized`, ...).
    pub error: String,
    /// What is wrong, for people.
    pub message: String,
}

/// One store's figures for a SKU.
#[derive(Serialize, ToSchema)]
pub struct StoreAvailability {
    pub store: String,
    pub on_hand: i64,
    pub held: u64,
    /// Units on their way here (transfers in transit); never part of available.
    pub incoming: u64,
    pub safety_stock: u64,
    pub raw_available: u64,
    pub staleness_discount: u64,
    /// Units the store granted online (escrow rights: granted − returned − consumed). With
    /// `[escrow] enabled`, `available` is at most `granted − held`.
    pub granted: u64,
    pub available: u64,
    /// RFC 3339; null when the store never synced.
    pub last_seen: Option<String>,
    pub silent_secs: i64,
    pub connected: bool,
}

/// A SKU across the chain.
#[derive(Serialize, ToSchema)]
pub struct SkuAvailability {
    pub sku: String,
    /// Whether the hub knows the SKU (in the catalog, or ever stocked somewhere); an unknown
    /// one has zeros everywhere (in a batch; alone it is a 404).
    pub known: bool,
    pub on_hand: i64,
    pub held: u64,
    /// Units on their way between stores (transfers in transit).
    pub incoming: u64,
    pub raw_available: u64,
    /// Units the stores granted online (escrow rights).
    pub granted: u64,
    /// What the storefront may promise (a channel's view: the channel's `ats`).
    pub available: u64,
    /// The stores (a channel's view: the channel's stores).
    pub stores: Vec<StoreAvailability>,
    /// A channel's view (a token bound to a channel, or `channel=ID`): its figures.
    #[schema(nullable = false)]
    pub channel: Option<ChannelFigures>,
    /// `channel=all`: every channel's figures side by side.
    #[schema(nullable = false)]
    pub channels: Option<Vec<ChannelFigures>>,
}

/// A channel's available-to-sell of a SKU, and how it came about.
#[derive(Serialize, ToSchema)]
pub struct ChannelFigures {
    /// The channel.
    pub id: String,
    /// What its stores have available (after safety stock, staleness and escrow).
    pub pool: u64,
    /// Withheld by its buffer.
    pub buffer: u64,
    /// Withheld for what may sell while a lagged channel's listing is stale.
    pub lag_margin: u64,
    /// Its cap, if any.
    pub cap: Option<u64>,
    /// What it may promise: min(cap, pool − buffer − lag_margin).
    pub ats: u64,
}

/// A sales channel.
#[derive(Serialize, ToSchema)]
pub struct Channel {
    /// 1 to 32 of a-z 0-9 -.
    pub id: String,
    /// `"all"`, `{"stores": [ids]}` or `"pickup"`.
    #[schema(value_type = Value)]
    pub fulfil: serde_json::Value,
    /// `{"units", "share_pct"}`.
    #[schema(value_type = Object)]
    pub buffer: serde_json::Value,
    /// `{"units", "share_pct"}`, each null when not set.
    #[schema(value_type = Object)]
    pub cap: serde_json::Value,
    /// `"live"` or `{"lagged": {"lag_secs"}}`.
    #[schema(value_type = Value)]
    pub latency: serde_json::Value,
    /// Per SKU, units withheld instead of `buffer` (left out when none).
    #[schema(value_type = Option<Object>, nullable = false)]
    pub sku_buffers: Option<serde_json::Value>,
    /// Whether head office configured it (web exists unconfigured, with its defaults).
    pub configured: bool,
}

/// `GET /v1/channels`.
#[derive(Serialize, ToSchema)]
pub struct ChannelList {
    pub items: Vec<Channel>,
}

/// `DELETE /v1/channels/{id}`.
#[derive(Serialize, ToSchema)]
pub struct ChannelRemoved {
    pub id: String,
    pub removed: bool,
}

/// `GET /v1/availability?sku=..`.
#[derive(Serialize, ToSchema)]
pub struct AvailabilityList {
    pub items: Vec<SkuAvailability>,
}

/// A connected agent.
#[derive(Serialize, ToSchema)]
pub struct AgentLink {
    pub writer: String,
    pub connected_since: String,
}

/// What the hub has from one writer of a store.
#[derive(Serialize, ToSchema)]
pub struct WriterMarks {
    pub writer: String,
    pub applied: u64,
    pub acked: u64,
    pub journal_applied: u64,
    pub journal_acked: u64,
    pub last_seen: Option<String>,
}

/// A registered store.
#[derive(Serialize, ToSchema)]
pub struct Store {
    pub id: String,
    pub connected: bool,
    pub connected_since: Option<String>,
    pub agents: Vec<AgentLink>,
    pub last_seen: Option<String>,
    pub created_at: String,
    pub revoked: bool,
    pub journal_events: u64,
    pub writers: Vec<WriterMarks>,
}

/// `GET /v1/stores`.
#[derive(Serialize, ToSchema)]
pub struct StoreList {
    pub items: Vec<Store>,
    /// Pass as `after` for the next page; null on the last.
    pub next: Option<String>,
}

/// One SKU at one store.
#[derive(Serialize, ToSchema)]
pub struct StockRow {
    pub sku: String,
    pub on_hand: i64,
    pub held: u64,
    /// Units on their way here (transfers in transit); never part of available.
    pub incoming: u64,
    pub available: u64,
}

/// `GET /v1/stores/{id}/stock`: a page by SKU.
#[derive(Serialize, ToSchema)]
pub struct StoreStockPage {
    pub store: String,
    pub items: Vec<StockRow>,
    /// Pass as `after` for the next page; null on the last.
    pub next: Option<String>,
}

/// What a restock or transfer did to one (store, SKU).
#[derive(Serialize, ToSchema)]
pub struct ChangedLine {
    pub store: String,
    pub sku: String,
    /// Change of on_hand at that store.
    pub delta: i64,
    /// on_hand after.
    pub on_hand: i64,
}

/// A recorded restock or transfer.
#[derive(Serialize, ToSchema)]
pub struct HubChange {
    pub id: uuid::Uuid,
    /// The idempotency key as sent (the id's own spelling when the key was that UUID).
    pub key: String,
    /// `restock`, `transfer` or `adjustment`.
    pub kind: String,
    /// Per store and SKU, in the order applied.
    pub lines: Vec<ChangedLine>,
    pub recorded_at: String,
}

/// A 409 of an adjustment: `stale_quantity` carries the hub's current `on_hand` (and
/// `idempotency_conflict` is a plain error).
#[derive(Serialize, ToSchema)]
pub struct StaleQuantity {
    /// `stale_quantity` or `idempotency_conflict`.
    pub error: String,
    pub message: String,
    pub store: Option<String>,
    pub sku: Option<String>,
    /// What the request expected.
    pub expected_on_hand: Option<i64>,
    /// The hub's on_hand now: decide again and retry (a refused request recorded nothing).
    pub on_hand: Option<i64>,
}

/// One line of a batch entry.
#[derive(Serialize, ToSchema)]
pub struct BatchLine {
    pub sku: String,
    pub delta: i64,
    /// on_hand after, at that store.
    pub on_hand: i64,
}

/// One store's part of a batch restock.
#[derive(Serialize, ToSchema)]
pub struct BatchEntry {
    /// The entry's journal event id (derived from the batch's).
    pub id: uuid::Uuid,
    pub store: String,
    pub lines: Vec<BatchLine>,
}

/// A recorded batch restock, per entry in the order sent.
#[derive(Serialize, ToSchema)]
pub struct RestockBatch {
    pub id: uuid::Uuid,
    /// The idempotency key as sent.
    pub key: String,
    /// `restock_batch`.
    pub kind: String,
    pub restocks: Vec<BatchEntry>,
    pub recorded_at: String,
}

/// One adjustment event of a store.
#[derive(Serialize, ToSchema)]
pub struct Adjustment {
    /// Position in the hub's journal (what `next` is made of).
    pub cursor: u64,
    /// The journal event id (the request's idempotency id) and its line.
    pub id: uuid::Uuid,
    pub line: u32,
    pub sku: String,
    /// Change of on_hand (negative: units gone).
    pub delta: i64,
    /// The reason code (reasons from before codes read as `other`).
    pub reason: String,
    pub note: Option<String>,
    pub occurred_at: String,
    pub recorded_at: String,
    /// The writer that recorded it (`store-001@…` at the till, `hub@…` from head office).
    pub writer: String,
    /// `store` or `hub`.
    pub by: String,
}

/// Units and events of one reason code over the whole filter.
#[derive(Serialize, ToSchema)]
pub struct ReasonTotal {
    pub reason: String,
    /// Σ delta.
    pub units: i64,
    pub events: u64,
}

/// `GET /v1/stores/{id}/adjustments`.
#[derive(Serialize, ToSchema)]
pub struct AdjustmentPage {
    pub store: String,
    /// Always `newest_first` (by occurred_at, then latest recorded).
    pub order: String,
    pub items: Vec<Adjustment>,
    /// Pass as `after` for the next page; null on the last.
    pub next: Option<u64>,
    /// Per reason code present, in the documented order, over every page of the filter.
    pub totals: Vec<ReasonTotal>,
}

/// One SKU of a transfer.
#[derive(Serialize, ToSchema)]
pub struct TransferLine {
    pub sku: String,
    /// Units that left the source.
    pub shipped: u64,
    /// Units that arrived; null until received.
    pub received: Option<u64>,
    /// shipped − received, booked at the destination as a transit_loss adjustment; null until
    /// received.
    pub lost: Option<u64>,
}

/// A transfer between two stores.
#[derive(Serialize, ToSchema)]
pub struct Transfer {
    pub id: uuid::Uuid,
    /// The idempotency key it was shipped under (in the answer to the shipment and its retries).
    #[schema(nullable = false)]
    pub key: Option<String>,
    pub from: String,
    pub to: String,
    /// in_transit, received or cancelled.
    pub status: String,
    pub reason: Option<String>,
    /// One per SKU.
    pub lines: Vec<TransferLine>,
    pub shipped_at: String,
    pub received_at: Option<String>,
    pub cancelled_at: Option<String>,
}

/// `GET /v1/transfers`: newest first.
#[derive(Serialize, ToSchema)]
pub struct TransferPage {
    pub items: Vec<Transfer>,
    /// Pass as `after` for the next page; null on the last.
    pub next: Option<uuid::Uuid>,
}

/// Units of a line promised at one store.
#[derive(Serialize, ToSchema)]
pub struct Allocation {
    /// The hold id the store fulfils by.
    pub hold: uuid::Uuid,
    pub store: String,
    pub sku: String,
    pub qty: u64,
    /// held, committed, fulfilled, released, expired, moved, short.
    pub status: String,
}

/// A reservation line.
#[derive(Serialize, ToSchema)]
pub struct Line {
    pub sku: String,
    pub qty: u64,
    /// Units no store could supply after an oversell.
    pub short: u64,
    pub allocations: Vec<Allocation>,
}

/// A reservation.
#[derive(Serialize, ToSchema)]
pub struct Reservation {
    pub id: uuid::Uuid,
    /// The idempotency key it was made with (the id's own spelling when the key was that UUID);
    /// `/v1/reservations/{key}` finds it too.
    pub key: String,
    /// held, committed, fulfilled, released, expired.
    pub status: String,
    pub short: bool,
    pub pickup_store: Option<String>,
    pub customer: Option<String>,
    /// The sales channel it came through (`web` for every reservation from before channels).
    pub channel: String,
    pub created_at: String,
    pub expires_at: Option<String>,
    /// Open allocations, flat.
    pub allocations: Vec<Allocation>,
    pub lines: Vec<Line>,
}

/// `GET /v1/reservations`: newest first.
#[derive(Serialize, ToSchema)]
pub struct ReservationPage {
    pub items: Vec<Reservation>,
    /// Pass as `after` for the next page; null on the last.
    pub next: Option<uuid::Uuid>,
}

/// A conflict for head office.
#[derive(Serialize, ToSchema)]
pub struct Conflict {
    pub id: uuid::Uuid,
    /// oversell, negative_stock, unknown_sku, store_rolled_back, writer_cloned, duplicate_agent,
    /// hub_rolled_back.
    pub kind: String,
    pub store: String,
    pub sku: Option<String>,
    pub shortfall: u64,
    pub reservations: Vec<uuid::Uuid>,
    /// What was (or should be) done.
    pub resolution: String,
    /// open or resolved.
    pub status: String,
    pub detected_at: String,
    pub resolved_at: Option<String>,
    /// Kind-specific facts.
    #[schema(value_type = Option<Object>)]
    pub details: Option<serde_json::Value>,
}

/// `GET /v1/conflicts`: newest first.
#[derive(Serialize, ToSchema)]
pub struct ConflictPage {
    pub items: Vec<Conflict>,
    /// Pass as `after` for the next page; null on the last.
    pub next: Option<uuid::Uuid>,
}

/// A change feed event.
#[derive(Serialize, ToSchema)]
pub struct Change {
    /// Gap-free position; pass as `after`, or as `Last-Event-ID` on `/v1/events`.
    pub cursor: u64,
    pub kind: String,
    pub at: String,
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
}

/// `GET /v1/changes`.
#[derive(Serialize, ToSchema)]
pub struct ChangePage {
    pub items: Vec<Change>,
    /// The cursor of the next page, or null when this page reached the feed's head (caught up).
    pub next: Option<u64>,
    /// Where to resume tailing, always: the last item's cursor, or `after` when there was none.
    pub cursor: u64,
}

/// A catalog entry.
#[derive(Serialize, ToSchema)]
pub struct CatalogEntry {
    pub sku: String,
    pub name: String,
    pub barcodes: Vec<String>,
    pub safety_stock: u64,
    pub low_stock_threshold: u64,
    pub max_per_customer: u64,
    pub active: bool,
    /// The SKU's escrow values over the chain's `[escrow]` (absent when it sets none).
    pub escrow: Option<EscrowRule>,
}

/// A SKU's or a store's escrow values over the chain's policy: each set value replaces the one
/// below (chain ← SKU ← store); an absent one leaves it.
#[derive(Serialize, ToSchema)]
pub struct EscrowRule {
    /// Share of on_hand granted online, in percent (0..=100; 0: nothing online).
    pub share_pct: Option<u64>,
    /// At most this many unreserved units online (0: no cap).
    pub max: Option<u64>,
    /// Units the store always keeps for walk-ins.
    pub keep: Option<u64>,
}

/// `GET /v1/catalog`: a page by SKU.
#[derive(Serialize, ToSchema)]
pub struct CatalogPage {
    pub items: Vec<CatalogEntry>,
    pub next: Option<String>,
}

/// The answer to a catalog edit: the entry after it (null when it was removed).
#[derive(Serialize, ToSchema)]
pub struct CatalogEdited {
    pub sku: String,
    #[schema(value_type = Option<Object>)]
    pub item: Option<serde_json::Value>,
}

/// `POST /v1/catalog-imports`.
#[derive(Serialize, ToSchema)]
pub struct Imported {
    pub imported: u64,
}

/// A token (never its secret, except once in the answer to its creation).
#[derive(Serialize, ToSchema)]
pub struct Token {
    pub id: uuid::Uuid,
    pub name: String,
    /// viewer, storefront or admin.
    pub role: String,
    /// The sales channel it acts for (null: chain-wide; a storefront token is always a channel's).
    pub channel: Option<String>,
    /// active, expired or revoked.
    pub status: String,
    pub created_at: String,
    pub last_used_at: Option<String>,
    pub expires_at: Option<String>,
    pub revoked_at: Option<String>,
    /// Only in the answer to `POST /v1/tokens`.
    #[schema(nullable = false)]
    pub token: Option<String>,
}

/// `GET /v1/tokens`.
#[derive(Serialize, ToSchema)]
pub struct TokenList {
    pub items: Vec<Token>,
    /// Pass as `after` for the next page; null on the last.
    pub next: Option<uuid::Uuid>,
}

/// `GET /healthz`.
#[derive(Serialize, ToSchema)]
pub struct Health {
    pub status: String,
}

/// One store at a glance.
#[derive(Serialize, ToSchema)]
pub struct OverviewStore {
    pub id: String,
    pub connected: bool,
    pub revoked: bool,
    pub last_seen: Option<String>,
    /// Seconds since its last data while it is offline (0 while connected).
    pub silent_secs: i64,
    pub skus: u64,
    pub on_hand: i64,
    pub held: u64,
    pub available: u64,
    /// Sales it probably made that the hub has not seen (velocity × silence).
    pub unseen_sales_estimate: u64,
    /// Restocks and transfers it has not confirmed yet.
    pub unsynced_hub_changes: u64,
    pub low_stock: u64,
    pub out_of_stock: u64,
    pub open_conflicts: u64,
    pub journal_events: u64,
}

/// Reservations by status.
#[derive(Serialize, ToSchema)]
pub struct ReservationCounts {
    pub held: u64,
    pub committed: u64,
    pub fulfilled: u64,
    pub released: u64,
    pub expired: u64,
    /// Open reservations with a line marked short.
    pub short: u64,
    pub units_held: u64,
    pub units_short: u64,
}

/// Units sold and reserved per minute, per store.
#[derive(Serialize, ToSchema)]
pub struct Series {
    pub start: String,
    pub start_ms: i64,
    pub bucket_secs: i64,
    pub buckets: u32,
    /// Per store id, one count per bucket.
    pub sold: std::collections::BTreeMap<String, Vec<u64>>,
    pub reserved: std::collections::BTreeMap<String, Vec<u64>>,
    /// Whether the decider's in-memory feed did not reach back to `start`.
    pub truncated: bool,
}

/// `GET /v1/overview`.
#[derive(Serialize, ToSchema)]
pub struct Overview {
    pub at: String,
    /// Open `/v1/events?after=feed_head` to follow from now.
    pub feed_head: u64,
    pub skus: u64,
    pub stores: Vec<OverviewStore>,
    pub reservations: ReservationCounts,
    /// The same per sales channel.
    pub channels: std::collections::BTreeMap<String, ReservationCounts>,
    /// Open conflicts by kind.
    pub open_conflicts: std::collections::BTreeMap<String, u64>,
    pub low_stock: u64,
    pub out_of_stock: u64,
    pub series: Series,
}
