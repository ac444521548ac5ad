//! The hub's HTTP API (DESIGN §7): availability for the storefront, stores and stock for
//! headquarters, hub-authored restocks and transfers, metrics. Bearer tokens with roles.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use shelfsync_node::http::{
    bearer, page, page_limit, request_key, required_key, ApiBytes, ApiError, ApiJson, ApiPath, ApiQuery,
};
use shelfsync_shared::id::quote;
use shelfsync_shared::qty::{LINES_MAX, LINE_QTY_MAX, REASON_MAX_LEN};
use shelfsync_shared::rfc3339;
use shelfsync_shared::{IdempotencyKey, Reason, Sku, StoreId};
use utoipa_axum::router::UtoipaMethodRouterExt as _;
use uuid::Uuid;

use crate::metrics::Metrics;
use crate::state::Hub;
use crate::storage::{HubChange, HubChangeRequest, QtyLine, Role, StorageError};
use crate::tokens::{NewToken, Verdict};
use shelfsync_hub_core::Refusal;

/// Largest page of a store's stock.
pub const STOCK_PAGE_MAX: usize = 1000;

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    /// The hub.
    pub hub: Arc<Hub>,
    /// Most SKUs per batch availability query.
    pub max_batch_skus: usize,
    /// Reservation lease limits.
    pub reservations: crate::config::ReservationsSection,
    /// Slots for concurrent `GET /v1/events` streams.
    pub event_streams: Arc<tokio::sync::Semaphore>,
    /// Request rate limits (`[http.rate_limit]`).
    pub limiter: Arc<shelfsync_node::ratelimit::Limiter>,
    /// The HTTP edge's counters (connections, timeouts, 429s).
    pub edge: Arc<shelfsync_node::http::EdgeStats>,
}

/// Hashes a token for storage and lookup (tokens are never stored in clear).
pub fn token_hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// A new random token: `ss_` and 64 hex digits.
pub fn new_token() -> String {
    let bytes: [u8; 32] = rand::random();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("ss_{hex}")
}

/// The router, apart from `main` so tests can drive it. Every route is registered with its
/// OpenAPI description (`routes!`), so `/openapi.json` lists exactly what is served.
pub fn router(state: ApiState, max_body_bytes: usize) -> Router {
    use utoipa_axum::router::OpenApiRouter;
    use utoipa_axum::routes;
    let viewer = OpenApiRouter::new()
        .routes(routes!(get_availability_batch))
        .routes(routes!(get_availability))
        .routes(routes!(get_stores))
        .routes(routes!(get_store_stock))
        .routes(routes!(get_adjustments))
        .routes(routes!(get_metrics))
        .routes(routes!(get_conflicts))
        .routes(routes!(get_catalog_page))
        .routes(routes!(get_overview))
        .routes(routes!(get_catalog_item))
        .routes(routes!(get_changes))
        .routes(routes!(get_transfers))
        .routes(routes!(get_transfer))
        .routes(routes!(crate::feed::get_events))
        .routes(routes!(crate::channels::get_channels))
        .routes(routes!(crate::channels::get_channel))
        .route_layer(middleware::from_fn_with_state((state.clone(), Role::Viewer), require_role));
    let storefront = OpenApiRouter::new()
        .routes(routes!(post_reservation, get_reservations))
        .routes(routes!(get_reservation, delete_reservation))
        .routes(routes!(post_commit))
        .routes(routes!(post_extend))
        .route_layer(middleware::from_fn_with_state((state.clone(), Role::Storefront), require_role));
    let admin = OpenApiRouter::new()
        .routes(routes!(post_restock))
        .routes(routes!(post_restock_batch))
        .routes(routes!(post_adjustment))
        .routes(routes!(post_transfer))
        .routes(routes!(post_transfer_receive))
        .routes(routes!(post_transfer_cancel))
        .routes(routes!(put_catalog_item, patch_catalog_item))
        .routes(routes!(post_catalog_import).layer(DefaultBodyLimit::max(CATALOG_IMPORT_MAX_BYTES)))
        .routes(routes!(get_tokens, post_token))
        .routes(routes!(delete_token))
        .routes(routes!(post_resolve_conflict))
        .routes(routes!(crate::channels::put_channel, crate::channels::delete_channel))
        .route_layer(middleware::from_fn_with_state((state.clone(), Role::Admin), require_role));
    let public = OpenApiRouter::new().routes(routes!(healthz)).routes(routes!(dashboard)).routes(routes!(get_openapi));
    let (router, doc) = OpenApiRouter::with_openapi(<crate::openapi::HubDoc as utoipa::OpenApi>::openapi())
        .merge(viewer)
        .merge(storefront)
        .merge(admin)
        .merge(public)
        .split_for_parts();
    let _ = OPENAPI.set(serde_json::to_value(&doc).expect("the document serialises"));
    let app = router
        .fallback(shelfsync_node::http::no_route)
        .method_not_allowed_fallback(|| async { shelfsync_node::http::method_not_allowed() })
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(middleware::from_fn_with_state(state.limiter.clone(), crate::edge::rate_limit))
        .layer(middleware::from_fn_with_state(state.clone(), count_requests))
        .layer(middleware::from_fn(shelfsync_node::http::json_errors))
        // Outside the JSON errors, so what is timed and logged is what the client got.
        .layer(middleware::from_fn_with_state(state.hub.metrics.http.clone(), shelfsync_node::observe::track_http));
    shelfsync_node::observe::with_request_log(app).with_state(state)
}

async fn count_requests(State(state): State<ApiState>, req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    Metrics::inc(&state.hub.metrics.http_requests_total);
    if matches!(resp.status(), StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
        Metrics::inc(&state.hub.metrics.http_unauthorized_total);
    }
    resp
}

/// Who made an authenticated request (the role layer puts it in the request's extensions).
#[derive(Clone, Debug)]
pub(crate) struct Caller {
    /// The token's name.
    pub(crate) token_name: String,
    /// The sales channel it acts for (`None`: chain-wide).
    pub(crate) channel: Option<shelfsync_hub_core::ChannelId>,
}

async fn require_role(State((state, min)): State<(ApiState, Role)>, req: Request, next: Next) -> Response {
    let Some(token) = bearer(req.headers()) else {
        return ApiError::unauthorized("missing Authorization: Bearer <token>").into_response();
    };
    match state.hub.authenticate(token).await {
        Ok(Verdict::Valid(t)) if t.role >= min => {
            shelfsync_node::observe::record_token_name(&t.name);
            let mut req = req;
            let channel = t.channel();
            req.extensions_mut().insert(Caller { token_name: t.name, channel });
            next.run(req).await
        }
        Ok(Verdict::Valid(t)) => ApiError::forbidden(format!(
            "this endpoint needs the {} role; the token has {}",
            min.as_str(),
            t.role.as_str()
        ))
        .into_response(),
        Ok(refused) => refusal(&refused).into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// The 401 for a token that is not valid: `token_revoked` and `token_expired` say why (only
/// someone holding the token learns it), anything else is a plain `unauthorized`.
pub(crate) fn refusal(v: &Verdict) -> ApiError {
    match v {
        Verdict::Revoked(t) => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "token_revoked",
            format!("this token ({}) was revoked at {}", t.name, rfc3339(t.revoked_at_ms.unwrap_or_default())),
        ),
        Verdict::Expired(t) => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "token_expired",
            format!("this token ({}) expired at {}", t.name, rfc3339(t.expires_at_ms.unwrap_or_default())),
        ),
        Verdict::Unknown | Verdict::Valid(_) => ApiError::unauthorized("unknown token"),
    }
}

impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::Refused(r) => refused(r),
            StorageError::Invalid(m) => ApiError::invalid(m),
            StorageError::Busy => ApiError::unavailable(e.to_string()).retry_after(1),
            StorageError::Stopped(m) => ApiError::unavailable(m).retry_after(5),
            // Only sync produces `Forked`; an API call never should.
            StorageError::Backend(_) | StorageError::Corrupt(_) | StorageError::Forked(_) => ApiError::internal(e),
        }
    }
}

/// The answer to a decision the decider refused.
fn refused(r: Refusal) -> ApiError {
    let message = r.to_string();
    match r {
        Refusal::UnknownStore(s) => ApiError::not_found(format!("unknown store {s}")),
        Refusal::Revoked(s) => ApiError::conflict("store_revoked", format!("store {s} is revoked")),
        Refusal::StoreExists(_) => ApiError::conflict("store_exists", message),
        Refusal::IdempotencyConflict { .. } => ApiError::conflict("idempotency_conflict", message),
        Refusal::InsufficientStock { store, sku, on_hand, .. } => ApiError::conflict("insufficient_stock", message)
            .with("store", store.to_string())
            .with("sku", sku.to_string())
            .with("available", on_hand.max(0)),
        Refusal::Unavailable { sku, available, store } => {
            let err = ApiError::conflict("insufficient_stock", message)
                .with("sku", sku.to_string())
                .with("available", available);
            match store {
                Some(s) => err.with("store", s.to_string()),
                None => err,
            }
        }
        Refusal::StaleQuantity { store, sku, expected, on_hand } => ApiError::conflict("stale_quantity", message)
            .with("store", store.to_string())
            .with("sku", sku.to_string())
            .with("expected_on_hand", expected)
            .with("on_hand", on_hand),
        Refusal::LimitExceeded { sku, limit, already } => ApiError::conflict("limit_exceeded", message)
            .with("sku", sku.to_string())
            .with("limit", limit)
            .with("already", already),
        Refusal::NotFound(m) => ApiError::not_found(m),
        Refusal::InvalidState(m) => ApiError::conflict("invalid_state", m),
        Refusal::Invalid(m) => ApiError::invalid(m),
    }
}

fn parse_sku(field: &str, s: &str) -> Result<Sku, ApiError> {
    s.parse().map_err(|e| ApiError::invalid(format!("{field}: {e}")))
}

fn parse_store(field: &str, s: &str) -> Result<StoreId, ApiError> {
    s.parse().map_err(|e| ApiError::invalid(format!("{field}: {e}")))
}

/// `?channel=` of a single SKU's availability.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChannelQuery {
    channel: Option<String>,
}

#[derive(Serialize)]
struct StoreAvailability {
    store: StoreId,
    on_hand: i64,
    held: u64,
    incoming: u64,
    safety_stock: u64,
    raw_available: u64,
    staleness_discount: u64,
    granted: u64,
    available: u64,
    last_seen: Option<String>,
    silent_secs: i64,
    connected: bool,
}

#[derive(Serialize)]
struct SkuAvailability {
    sku: Sku,
    known: bool,
    on_hand: i64,
    held: u64,
    incoming: u64,
    raw_available: u64,
    granted: u64,
    available: u64,
    stores: Vec<StoreAvailability>,
    /// A channel's view: its figures (`available` is then its `ats`, the stores its stores).
    #[serde(skip_serializing_if = "Option::is_none")]
    channel: Option<crate::channels::FiguresView>,
    /// `channel=all`: every channel's figures side by side.
    #[serde(skip_serializing_if = "Option::is_none")]
    channels: Option<Vec<crate::channels::FiguresView>>,
}

async fn availability(
    state: &ApiState,
    skus: Vec<Sku>,
    view: &crate::channels::View,
) -> Result<Vec<SkuAvailability>, ApiError> {
    use crate::channels::View;
    let now = shelfsync_node::now_ms();
    let (chans, rows) = state.hub.storage.availability_view(skus, view.wanted(), now).await?;
    Ok(rows
        .into_iter()
        .map(|row| {
            let mut stores: Vec<StoreAvailability> = row
                .stores
                .into_iter()
                .map(|f| StoreAvailability {
                    connected: state.hub.live(&f.store).is_some(),
                    store: f.store,
                    on_hand: f.on_hand,
                    held: f.held,
                    incoming: f.incoming,
                    safety_stock: f.safety_stock,
                    raw_available: f.raw_available,
                    staleness_discount: f.staleness_discount,
                    granted: f.granted,
                    available: f.available,
                    last_seen: f.last_seen_ms.map(rfc3339),
                    silent_secs: f.silent_ms / 1000,
                })
                .collect();
            let mut figures = row.channels.into_iter();
            let (channel, channels) = match view {
                View::Chain => (None, None),
                View::One(_) => {
                    // Only the channel's stores; what it may promise is its `ats`.
                    if let Some(ch) = chans.first() {
                        stores.retain(|s| ch.fulfils(&s.store));
                    }
                    (figures.next(), None)
                }
                View::All => (None, Some(figures.map(Into::into).collect())),
            };
            let sum = |f: fn(&StoreAvailability) -> u64| stores.iter().map(f).fold(0u64, u64::saturating_add);
            let available = match &channel {
                Some(f) => f.ats,
                None => sum(|s| s.available),
            };
            SkuAvailability {
                on_hand: stores.iter().map(|s| s.on_hand).fold(0i64, i64::saturating_add),
                held: sum(|s| s.held),
                incoming: sum(|s| s.incoming),
                raw_available: sum(|s| s.raw_available),
                granted: sum(|s| s.granted),
                available,
                channel: channel.map(Into::into),
                channels,
                stores,
                sku: row.sku,
                known: row.known,
            }
        })
        .collect())
}

#[utoipa::path(
    get,
    path = "/v1/availability/{sku}",
    tag = "viewer",
    summary = "Availability of one SKU in every store",
    params(("sku" = String, Path, description = "The SKU"), ("channel" = Option<String>, Query, description = "A channel's view (its available-to-sell), or all for every channel side by side; a token bound to a channel sees its own only")),
    responses((status = 200, description = "Figures", body = crate::openapi::SkuAvailability), (status = 404, description = "A SKU neither in the catalog nor ever stocked anywhere, or no such channel", body = crate::openapi::Error), (status = 422, description = "Invalid request (names what is wrong)", body = crate::openapi::Error), (status = 401, description = "No valid token", body = crate::openapi::Error), (status = 403, description = "The token's role may not", body = crate::openapi::Error), (status = 429, description = "Over the rate limit", body = crate::openapi::Error)),
    security(("bearer" = []))
)]
async fn get_availability(
    State(state): State<ApiState>,
    axum::Extension(caller): axum::Extension<Caller>,
    ApiPath(sku): ApiPath<String>,
    ApiQuery(q): ApiQuery<ChannelQuery>,
) -> Result<Json<Value>, ApiError> {
    let sku = parse_sku("sku", &sku)?;
    let view = crate::channels::View::of(&caller, q.channel.as_deref())?;
    let one = availability(&state, vec![sku], &view).await?.remove(0);
    if !one.known {
        // The agent answers the same: a SKU nobody ever catalogued or stocked is not "0 on hand".
        return Err(ApiError::not_found(format!("sku {} is not in the catalog and no store ever stocked it", one.sku)));
    }
    Ok(Json(serde_json::to_value(one).expect("serialises")))
}

#[utoipa::path(
    get,
    path = "/v1/availability",
    tag = "viewer",
    summary = "Availability of several SKUs",
    params(("sku" = Vec<String>, Query, description = "Repeat for each SKU (sku=A&sku=B)"), ("store" = Option<String>, Query, description = "Only this store's figures (click-and-collect); the totals are that store's"), ("channel" = Option<String>, Query, description = "A channel's view (its available-to-sell), or all for every channel side by side; a token bound to a channel sees its own only")),
    responses((status = 200, description = "Figures per SKU", body = crate::openapi::AvailabilityList), (status = 404, description = "No such store or channel", body = crate::openapi::Error), (status = 422, description = "Invalid request (names what is wrong)", body = crate::openapi::Error), (status = 401, description = "No valid token", body = crate::openapi::Error), (status = 403, description = "The token's role may not", body = crate::openapi::Error), (status = 429, description = "Over the rate limit", body = crate::openapi::Error)),
    security(("bearer" = []))
)]
async fn get_availability_batch(
    State(state): State<ApiState>,
    axum::Extension(caller): axum::Extension<Caller>,
    ApiQuery(q): ApiQuery<Vec<(String, String)>>,
) -> Result<Json<Value>, ApiError> {
    let mut skus = Vec::new();
    let mut store: Option<StoreId> = None;
    let mut channel: Option<String> = None;
    for (k, v) in q {
        match k.as_str() {
            "sku" => {
                let sku = parse_sku("sku", &v)?;
                if !skus.contains(&sku) {
                    skus.push(sku);
                }
            }
            "store" if store.is_none() => store = Some(parse_store("store", &v)?),
            "store" => return Err(ApiError::invalid("give store at most once").with("parameter", "store")),
            "channel" if channel.is_none() => channel = Some(v),
            "channel" => return Err(ApiError::invalid("give channel at most once").with("parameter", "channel")),
            _ => {
                return Err(ApiError::invalid(format!(
                    "unknown query parameter {}; use sku=A&sku=B and optionally store=S and channel=C",
                    quote(&k)
                )));
            }
        }
    }
    if skus.is_empty() {
        return Err(ApiError::invalid("give at least one sku=... parameter"));
    }
    if skus.len() > state.max_batch_skus {
        return Err(ApiError::invalid(format!("{} skus asked; the limit is {}", skus.len(), state.max_batch_skus)));
    }
    let view = crate::channels::View::of(&caller, channel.as_deref())?;
    let mut items = availability(&state, skus, &view).await?;
    if let Some(store) = store {
        // One store's figures (click-and-collect): the totals are that store's.
        if !state.hub.storage.stores().await?.iter().any(|s| s.id == store) {
            return Err(ApiError::not_found(format!("no store {store}")));
        }
        for item in &mut items {
            item.stores.retain(|s| s.store == store);
            item.on_hand = item.stores.iter().map(|s| s.on_hand).sum();
            item.held = item.stores.iter().map(|s| s.held).sum();
            item.incoming = item.stores.iter().map(|s| s.incoming).sum();
            item.raw_available = item.stores.iter().map(|s| s.raw_available).sum();
            item.granted = item.stores.iter().map(|s| s.granted).sum();
            // A channel promises at most its `ats` there too.
            let here: u64 = item.stores.iter().map(|s| s.available).sum();
            item.available = item.channel.as_ref().map_or(here, |c| here.min(c.ats()));
        }
    }
    Ok(Json(json!({ "items": items })))
}

#[utoipa::path(
    get,
    path = "/v1/stores",
    tag = "viewer",
    summary = "Every store with its connection and sync marks, by id (all of them up to 1000 a page)",
    params(("after" = Option<String>, Query, description = "The previous page's next (a store id)"), ("limit" = Option<usize>, Query, description = "1..1000 (default 1000)")),
    responses((status = 200, description = "Stores", body = crate::openapi::StoreList), (status = 422, description = "Invalid request (names what is wrong)", body = crate::openapi::Error), (status = 401, description = "No valid token", body = crate::openapi::Error), (status = 403, description = "The token's role may not", body = crate::openapi::Error), (status = 429, description = "Over the rate limit", body = crate::openapi::Error)),
    security(("bearer" = []))
)]
async fn get_stores(
    State(state): State<ApiState>,
    ApiQuery(q): ApiQuery<ShortListQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = page_limit(q.limit, SHORT_LIST_MAX, SHORT_LIST_MAX)?;
    let after =
        q.after.as_deref().map(|a| parse_store("after", a).map_err(|e| e.with("parameter", "after"))).transpose()?;
    let (stores, next) =
        shelfsync_node::http::page_after(state.hub.storage.stores().await?, after, limit, |s| s.id.clone())?;
    let items: Vec<Value> = stores
        .into_iter()
        .map(|s| {
            let live = state.hub.live(&s.id);
            let agents: Vec<Value> = state
                .hub
                .agents(&s.id)
                .iter()
                .map(|c| json!({"writer": c.writer, "connected_since": rfc3339(c.since_ms)}))
                .collect();
            json!({
                "id": s.id,
                "connected": live.is_some(),
                "connected_since": live.map(|l| rfc3339(l.since_ms)),
                "agents": agents,
                "last_seen": s.last_seen_ms.map(rfc3339),
                "created_at": rfc3339(s.created_at_ms),
                "revoked": s.revoked_at_ms.is_some(),
                "journal_events": s.journal_events,
                "writers": s.writers.iter().map(|w| json!({
                    "writer": w.writer,
                    "applied": w.applied,
                    "acked": w.acked,
                    "journal_applied": w.journal_applied,
                    "journal_acked": w.journal_acked,
                    "last_seen": w.last_seen_ms.map(rfc3339),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    Ok(Json(json!({ "items": items, "next": next })))
}

/// Largest (and default) page of the short lists: stores, tokens.
pub const SHORT_LIST_MAX: usize = 1000;

/// `after` and `limit` of a short list (default: all of it up to [`SHORT_LIST_MAX`]).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ShortListQuery {
    after: Option<String>,
    limit: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PageQuery {
    after: Option<String>,
    limit: Option<usize>,
}

#[utoipa::path(
    get,
    path = "/v1/stores/{id}/stock",
    tag = "viewer",
    summary = "One store's stock, a page by SKU",
    params(("id" = String, Path, description = "Store id"), ("after" = Option<String>, Query, description = "The previous page's next"), ("limit" = Option<usize>, Query, description = "1..1000 (default 100)")),
    responses((status = 200, description = "A page", body = crate::openapi::StoreStockPage), (status = 422, description = "Invalid request (names what is wrong)", body = crate::openapi::Error), (status = 401, description = "No valid token", body = crate::openapi::Error), (status = 403, description = "The token's role may not", body = crate::openapi::Error), (status = 429, description = "Over the rate limit", body = crate::openapi::Error)),
    security(("bearer" = []))
)]
async fn get_store_stock(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<Value>, ApiError> {
    let store = parse_store("store", &id)?;
    let limit = page_limit(q.limit, 100, STOCK_PAGE_MAX)?;
    let after = q.after.as_deref().map(|s| parse_sku("after", s)).transpose()?;
    let rows = state.hub.storage.store_stock(store.clone(), after, limit + 1).await?;
    let (rows, next) = page(rows, limit, |r| r.sku.to_string());
    let skus: Vec<Sku> = rows.iter().map(|r| r.sku.clone()).collect();
    let figs: HashMap<Sku, (u64, u64)> = state
        .hub
        .storage
        .availability(skus, shelfsync_node::now_ms())
        .await?
        .into_iter()
        .filter_map(|(sku, f)| f.into_iter().find(|f| f.store == store).map(|f| (sku, (f.held, f.available))))
        .collect();
    let items: Vec<Value> = rows
        .into_iter()
        .map(|r| {
            let (held, available) = figs.get(&r.sku).copied().unwrap_or((0, 0));
            json!({"sku": r.sku, "on_hand": r.on_hand, "held": held, "incoming": r.incoming, "available": available})
        })
        .collect();
    Ok(Json(json!({"store": store, "items": items, "next": next})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AdjustmentQuery {
    reason: Option<String>,
    from: Option<String>,
    to: Option<String>,
    after: Option<String>,
    limit: Option<usize>,
}

/// Largest page of the shrink report.
pub const ADJUSTMENTS_PAGE_MAX: usize = 1000;

fn parse_time(parameter: &str, s: &str) -> Result<i64, ApiError> {
    shelfsync_shared::fmt::parse_rfc3339(s).map_err(|why| {
        ApiError::invalid(format!(
            "{parameter} is not an RFC 3339 timestamp ({why}): {}",
            quote(&s.chars().take(64).collect::<String>())
        ))
        .with("parameter", parameter)
    })
}

/// `GET /v1/stores/{id}/adjustments`: the shrink report. Every adjustment event of the store
/// (the tills' own, synced up, and head office's), newest `occurred_at` first, with its reason
/// code and note, and totals per code over the whole filter (not just the page).
#[utoipa::path(
    get,
    path = "/v1/stores/{id}/adjustments",
    tag = "viewer",
    summary = "A store's adjustments (shrink report): newest occurred_at first, a page at a time, with totals per reason code over the whole filter",
    params(
        ("id" = String, Path, description = "Store id"),
        ("reason" = Option<String>, Query, description = "Only this reason code (damaged, theft, expired, lost, internal_use, returned_to_vendor, transit_loss, found, correction, other)"),
        ("from" = Option<String>, Query, description = "RFC 3339: occurred at or after"),
        ("to" = Option<String>, Query, description = "RFC 3339: occurred before"),
        ("after" = Option<String>, Query, description = "The previous page's next"),
        ("limit" = Option<usize>, Query, description = "1..1000 (default 100)")
    ),
    responses((status = 200, description = "A page", body = crate::openapi::AdjustmentPage), (status = 404, description = "No such store", body = crate::openapi::Error), (status = 422, description = "Invalid request (names the parameter; an unknown reason lists the codes)", body = crate::openapi::Error), (status = 401, description = "No valid token", body = crate::openapi::Error), (status = 403, description = "The token's role may not", body = crate::openapi::Error), (status = 429, description = "Over the rate limit", body = crate::openapi::Error)),
    security(("bearer" = []))
)]
async fn get_adjustments(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<AdjustmentQuery>,
) -> Result<Json<Value>, ApiError> {
    use shelfsync_shared::ReasonCode;
    let store = parse_store("id", &id)?;
    let limit = page_limit(q.limit, 100, ADJUSTMENTS_PAGE_MAX)?;
    let reason = q
        .reason
        .as_deref()
        .map(|r| {
            ReasonCode::parse(r).ok_or_else(|| {
                ApiError::invalid(format!(
                    "reason must be one of {}; got {}",
                    ReasonCode::list(),
                    quote(&r.chars().take(64).collect::<String>())
                ))
                .with("parameter", "reason")
            })
        })
        .transpose()?;
    let from_ms = q.from.as_deref().map(|s| parse_time("from", s)).transpose()?;
    let to_ms = q.to.as_deref().map(|s| parse_time("to", s)).transpose()?;
    if let (Some(f), Some(t)) = (from_ms, to_ms) {
        if f > t {
            return Err(ApiError::invalid("from is after to").with("parameter", "from"));
        }
    }
    let after = q
        .after
        .as_deref()
        .map(|a| {
            a.parse::<u64>().ok().filter(|n| *n <= i64::MAX as u64).ok_or_else(|| {
                ApiError::invalid(format!(
                    "after must be the previous page's next (a whole number), got {}",
                    quote(&a.chars().take(64).collect::<String>())
                ))
                .with("parameter", "after")
            })
        })
        .transpose()?;
    if !state.hub.storage.stores().await?.iter().any(|s| s.id == store) {
        return Err(ApiError::not_found(format!("no store {store}")));
    }
    let filter =
        crate::sqlite::AdjustmentFilter { store: store.clone(), reason, from_ms, to_ms, after, limit: limit + 1 };
    let report = state.hub.storage.adjustments(filter).await?;
    if report.after_unknown {
        return Err(ApiError::invalid(format!("after names no adjustment of {store}")).with("parameter", "after"));
    }
    let (rows, next) = page(report.rows, limit, |(seq, _)| *seq);
    let items: Vec<Value> = rows
        .iter()
        .map(|(seq, e)| {
            let r = e.reason.as_deref().map(Reason::parse_stored);
            json!({
                "cursor": seq,
                "id": e.id,
                "line": e.line,
                "sku": e.sku,
                "delta": e.delta,
                "reason": r.as_ref().map_or(ReasonCode::Other, |r| r.code).as_str(),
                "note": r.and_then(|r| r.note),
                "occurred_at": rfc3339(e.occurred_at_ms),
                "recorded_at": rfc3339(e.recorded_at_ms),
                "writer": e.writer,
                "by": if e.writer.is_hub() { "hub" } else { "store" },
            })
        })
        .collect();
    let totals: Vec<Value> = report
        .totals
        .iter()
        .map(|(code, units, events)| json!({"reason": code.as_str(), "units": units, "events": events}))
        .collect();
    Ok(Json(json!({"store": store, "order": "newest_first", "items": items, "next": next, "totals": totals})))
}

#[utoipa::path(
    get,
    path = "/healthz",
    tag = "public",
    summary = "Liveness",
    responses((status = 200, description = "Alive", body = crate::openapi::Health))
)]
async fn healthz() -> axum::Json<Value> {
    shelfsync_node::http::healthz().await
}

#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "public",
    summary = "This document",
    responses((status = 200, description = "OpenAPI 3.1", body = Object))
)]
async fn get_openapi() -> Json<Value> {
    Json(OPENAPI.get().cloned().unwrap_or(Value::Null))
}

/// The document, made once by [`router`] (every router makes the same one).
static OPENAPI: std::sync::OnceLock<Value> = std::sync::OnceLock::new();

/// The hub API's OpenAPI document (as served at `/openapi.json`).
pub fn openapi_json() -> Option<&'static Value> {
    OPENAPI.get()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OverviewParams {
    minutes: Option<u32>,
}

/// `GET /v1/overview`: the chain at a glance, for the dashboard (the decider's figures, with the
/// live connections and the stores' acknowledgements the runtime keeps).
#[utoipa::path(
    get,
    path = "/v1/overview",
    tag = "viewer",
    summary = "The chain at a glance (the dashboard's figures): stores, reservations, conflicts, stock alerts, units sold and reserved per minute",
    params(("minutes" = Option<u32>, Query, description = "How far back the per-minute series goes (default 30)")),
    responses((status = 200, description = "Figures", body = crate::openapi::Overview), (status = 422, description = "Invalid request (names what is wrong)", body = crate::openapi::Error), (status = 401, description = "No valid token", body = crate::openapi::Error), (status = 403, description = "The token's role may not", body = crate::openapi::Error), (status = 429, description = "Over the rate limit", body = crate::openapi::Error)),
    security(("bearer" = []))
)]
async fn get_overview(
    State(state): State<ApiState>,
    ApiQuery(p): ApiQuery<OverviewParams>,
) -> Result<Json<Value>, ApiError> {
    let minutes = p.minutes.unwrap_or(30);
    if minutes == 0 || minutes > shelfsync_hub_core::OVERVIEW_MINUTES_MAX {
        return Err(ApiError::invalid(format!(
            "minutes must be between 1 and {}, got {minutes}",
            shelfsync_hub_core::OVERVIEW_MINUTES_MAX
        ))
        .with("parameter", "minutes"));
    }
    let infos = state.hub.storage.stores().await?;
    let acked = infos.iter().map(|s| (s.id.clone(), s.writers.iter().map(|w| w.acked).max().unwrap_or(0))).collect();
    let journal: HashMap<StoreId, u64> = infos.iter().map(|s| (s.id.clone(), s.journal_events)).collect();
    let now = shelfsync_node::now_ms();
    let o = state.hub.storage.overview(shelfsync_hub_core::OverviewQuery { minutes, acked }, now).await?;
    let stores: Vec<Value> = o
        .stores
        .iter()
        .map(|s| {
            let connected = state.hub.live(&s.id).is_some();
            json!({
                "id": s.id,
                "connected": connected,
                "revoked": s.revoked,
                "last_seen": s.last_seen_ms.map(rfc3339),
                "silent_secs": if connected { 0 } else { s.silent_ms / 1000 },
                "skus": s.skus,
                "on_hand": s.on_hand,
                "held": s.held,
                "available": s.available,
                "unseen_sales_estimate": s.unseen_sales_estimate,
                "unsynced_hub_changes": s.unsynced_hub_changes,
                "low_stock": s.low_stock,
                "out_of_stock": s.out_of_stock,
                "open_conflicts": s.open_conflicts,
                "journal_events": journal.get(&s.id).copied().unwrap_or(0),
            })
        })
        .collect();
    Ok(Json(json!({
        "at": rfc3339(now),
        "feed_head": o.feed_head,
        "skus": o.skus,
        "stores": stores,
        "reservations": o.reservations,
        "channels": o.channels,
        "open_conflicts": o.open_conflicts,
        "low_stock": o.low_stock,
        "out_of_stock": o.out_of_stock,
        "series": {
            "start": rfc3339(o.series.start_ms),
            "start_ms": o.series.start_ms,
            "bucket_secs": o.series.bucket_ms / 1000,
            "buckets": o.series.buckets,
            "sold": o.series.sold,
            "reserved": o.series.reserved,
            "truncated": o.series.truncated,
        },
    })))
}

/// The dashboard page (static; it asks for a token and calls the API with it).
#[utoipa::path(
    get,
    path = "/",
    tag = "public",
    summary = "The dashboard (HTML; it asks for a token, or takes ?token=)",
    responses((status = 200, description = "The page", body = String))
)]
async fn dashboard() -> axum::response::Html<&'static str> {
    axum::response::Html(include_str!("dashboard.html"))
}

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "viewer",
    summary = "Prometheus metrics (text exposition format)",
    responses((status = 200, description = "Metrics", body = String), (status = 401, description = "No valid token", body = crate::openapi::Error), (status = 403, description = "The token's role may not", body = crate::openapi::Error), (status = 429, description = "Over the rate limit", body = crate::openapi::Error)),
    security(("bearer" = []))
)]
async fn get_metrics(State(state): State<ApiState>) -> Result<Response, ApiError> {
    let crate::storage::MetricsRead { stores, unacked, conflicts_open, channel_ats } =
        state.hub.storage.metrics_snapshot().await?;
    let now_ms = shelfsync_node::now_ms();
    let stores = stores
        .iter()
        .zip(unacked)
        .map(|(s, (unacked_entries, granted))| crate::metrics::StoreGauge {
            escrow_granted: Some(granted),
            store: s.id.to_string(),
            connected: state.hub.live(&s.id).is_some(),
            last_seen_age_secs: s.last_seen_ms.map(|t| (now_ms - t).max(0) as f64 / 1000.0),
            unacked_entries,
            revoked: s.revoked_at_ms.is_some(),
        })
        .collect();
    let feed_head = *state.hub.storage.change_head().borrow();
    let snapshot = crate::metrics::Snapshot { stores, conflicts_open, feed_head, channel_ats };
    Ok(crate::metrics::render(&state.hub.metrics, snapshot))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct LineBody {
    sku: String,
    qty: i64,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct RestockBody {
    /// Idempotency key (or send it as the `Idempotency-Key` header): 1..128 printable ASCII.
    id: Option<String>,
    store: String,
    lines: Vec<LineBody>,
    reason: Option<String>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct TransferBody {
    /// Idempotency key (or send it as the `Idempotency-Key` header): 1..128 printable ASCII.
    id: Option<String>,
    from: String,
    to: String,
    lines: Vec<LineBody>,
    reason: Option<String>,
}

/// Lines of a batch entry: the same rules, errors naming `restocks[i].…`.
fn parse_lines_at(at: &str, lines: &[LineBody]) -> Result<Vec<QtyLine>, ApiError> {
    parse_lines(lines)
        .map_err(|e| ApiError { message: format!("{at}.{}", e.message), ..e }.with("field", at.to_owned()))
}

fn parse_lines(lines: &[LineBody]) -> Result<Vec<QtyLine>, ApiError> {
    if lines.is_empty() {
        return Err(ApiError::invalid("lines must not be empty"));
    }
    if lines.len() > LINES_MAX {
        return Err(ApiError::invalid(format!("lines has {} entries; the limit is {LINES_MAX}", lines.len())));
    }
    lines
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let sku = parse_sku(&format!("lines[{i}].sku"), &l.sku)?;
            if l.qty < 1 || l.qty as u64 > LINE_QTY_MAX {
                return Err(ApiError::invalid(format!(
                    "lines[{i}].qty must be between 1 and {LINE_QTY_MAX}, got {}",
                    l.qty
                )));
            }
            Ok(QtyLine { sku, qty: l.qty as u64 })
        })
        .collect()
}

fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| {
        ApiError::invalid(format!("id must be a UUID, got {}", quote(&id.chars().take(64).collect::<String>())))
    })
}

/// A reservation or transfer named in a path: its id, or the idempotency key it was made with (a
/// storefront's own order number, a shipment's delivery note), which stands for the same id.
fn keyed_id(id: &str) -> Result<Uuid, ApiError> {
    IdempotencyKey::parse(id).map(|k| k.id()).map_err(|e| ApiError::invalid(format!("id {e}")).with("field", "id"))
}

fn check_reason(reason: &Option<String>) -> Result<(), ApiError> {
    match reason {
        Some(r) if r.len() > REASON_MAX_LEN => {
            Err(ApiError::invalid(format!("reason is {} bytes long; the limit is {REASON_MAX_LEN}", r.len())))
        }
        _ => Ok(()),
    }
}

/// A 409 `idempotency_conflict` names the key as the caller sent it, not only the UUID it maps to.
fn name_key(e: ApiError, key: Option<&str>) -> ApiError {
    match key {
        Some(k) if e.code == "idempotency_conflict" => {
            let message = format!("{} (key {})", e.message, quote(k));
            ApiError { message, ..e }
        }
        _ => e,
    }
}

async fn hub_change(state: &ApiState, req: HubChangeRequest) -> Result<Response, ApiError> {
    let key = req.key.clone();
    let outcome = state
        .hub
        .storage
        .hub_change(req, shelfsync_node::now_ms())
        .await
        .map_err(|e| name_key(e.into(), key.as_deref()))?;
    state.hub.holds_changed(&outcome.holds_changed);
    tracing::debug!(created = outcome.created, lines = outcome.response.lines.len(), "hub change recorded");
    if outcome.created {
        Metrics::inc(&state.hub.metrics.hub_changes_total);
        state.hub.notify(&outcome.stores, outcome.heads);
        state.hub.stock_changed(outcome.response.lines.iter().map(|l| crate::state::StockChange {
            store: l.store.clone(),
            sku: l.sku.clone(),
            on_hand: l.on_hand,
        }));
    }
    let status = if outcome.created { StatusCode::CREATED } else { StatusCode::OK };
    // A transfer's shipment answers the transfer as shipped (a retry too), with the key it was
    // sent under, as every keyed write does.
    let body = match &outcome.transfer {
        Some(t) => {
            let mut v = t.to_json();
            let key = key.unwrap_or_else(|| outcome.response.id.to_string());
            v.as_object_mut().expect("a transfer is an object").insert("key".into(), Value::String(key));
            v
        }
        None => outcome.response.to_json(),
    };
    Ok((status, Json(body)).into_response())
}

#[utoipa::path(
    post,
    path = "/v1/restocks",
    tag = "admin",
    summary = "Send units to a store (idempotent by key: the body's id or Idempotency-Key)",
    params(("Idempotency-Key" = Option<String>, Header, description = "The idempotency key, instead of (or equal to) the body's id: 1..128 printable ASCII")),
    request_body = RestockBody,
    responses((status = 201, description = "Recorded", body = crate::openapi::HubChange), (status = 200, description = "A retry: the first answer", body = crate::openapi::HubChange), (status = 409, description = "The id was used for another request", body = crate::openapi::Error), (status = 422, description = "Invalid request (names what is wrong)", body = crate::openapi::Error), (status = 401, description = "No valid token", body = crate::openapi::Error), (status = 403, description = "The token's role may not", body = crate::openapi::Error), (status = 429, description = "Over the rate limit", body = crate::openapi::Error)),
    security(("bearer" = []))
)]
async fn post_restock(
    State(state): State<ApiState>,
    headers: axum::http::HeaderMap,
    ApiJson(b): ApiJson<RestockBody>,
) -> Result<Response, ApiError> {
    let key = required_key(b.id.as_deref(), &headers)?;
    check_reason(&b.reason)?;
    let req = HubChangeRequest {
        id: key.id(),
        key: Some(key.as_str().to_owned()),
        change: HubChange::Restock { store: parse_store("store", &b.store)?, lines: parse_lines(&b.lines)? },
        reason: b.reason,
    };
    hub_change(&state, req).await
}

#[utoipa::path(
    post,
    path = "/v1/transfers",
    tag = "admin",
    summary = "Ship units from one store to another (idempotent by key: the body's id or Idempotency-Key): they leave from at once and are incoming at to until received",
    params(("Idempotency-Key" = Option<String>, Header, description = "The idempotency key, instead of (or equal to) the body's id: 1..128 printable ASCII")),
    request_body = TransferBody,
    responses((status = 201, description = "Shipped: the transfer, in transit", body = crate::openapi::Transfer), (status = 200, description = "A retry: the first answer", body = crate::openapi::Transfer), (status = 404, description = "No such store", body = crate::openapi::Error), (status = 409, description = "The id was used for another request, or not enough at from", body = crate::openapi::Error), (status = 422, description = "Invalid request (names what is wrong)", body = crate::openapi::Error), (status = 401, description = "No valid token", body = crate::openapi::Error), (status = 403, description = "The token's role may not", body = crate::openapi::Error), (status = 429, description = "Over the rate limit", body = crate::openapi::Error)),
    security(("bearer" = []))
)]
async fn post_transfer(
    State(state): State<ApiState>,
    headers: axum::http::HeaderMap,
    ApiJson(b): ApiJson<TransferBody>,
) -> Result<Response, ApiError> {
    let key = required_key(b.id.as_deref(), &headers)?;
    check_reason(&b.reason)?;
    let (from, to) = (parse_store("from", &b.from)?, parse_store("to", &b.to)?);
    if from == to {
        return Err(ApiError::invalid("from and to must be different stores"));
    }
    let req = HubChangeRequest {
        id: key.id(),
        key: Some(key.as_str().to_owned()),
        change: HubChange::Transfer { from, to, lines: parse_lines(&b.lines)? },
        reason: b.reason,
    };
    hub_change(&state, req).await
}

#[derive(Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct ReceiveBody {
    /// Units that arrived per shipped SKU (every shipped SKU, qty 0 when none did); absent:
    /// everything shipped arrived.
    lines: Option<Vec<LineBody>>,
}

/// The lines of a receipt: every shipped SKU once, 0..=shipped units (checked by the decider).
fn parse_receipt_lines(lines: &[LineBody]) -> Result<Vec<QtyLine>, ApiError> {
    if lines.len() > LINES_MAX {
        return Err(ApiError::invalid(format!("lines has {} entries; the limit is {LINES_MAX}", lines.len())));
    }
    lines
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let sku = parse_sku(&format!("lines[{i}].sku"), &l.sku)?;
            if l.qty < 0 || l.qty as u64 > LINE_QTY_MAX {
                return Err(ApiError::invalid(format!(
                    "lines[{i}].qty must be between 0 and {LINE_QTY_MAX}, got {}",
                    l.qty
                )));
            }
            Ok(QtyLine { sku, qty: l.qty as u64 })
        })
        .collect()
}

fn transfer_key(headers: &axum::http::HeaderMap) -> Result<Option<String>, ApiError> {
    Ok(shelfsync_node::http::request_key(None, headers)?.map(|k| k.as_str().to_owned()))
}

async fn transfer_changed(
    state: &ApiState,
    r: Result<crate::storage::TransferOutcome, StorageError>,
) -> Result<Response, ApiError> {
    let outcome = r?;
    let c = &outcome.changed;
    state.hub.holds_changed(&c.holds_changed);
    if c.created {
        Metrics::inc(&state.hub.metrics.hub_changes_total);
        state.hub.notify(&c.stores, outcome.heads);
        state.hub.stock_changed(c.lines.iter().map(|l| crate::state::StockChange {
            store: l.store.clone(),
            sku: l.sku.clone(),
            on_hand: l.on_hand,
        }));
    }
    tracing::debug!(transfer = %c.transfer.id, status = c.transfer.status.as_str(), created = c.created, "transfer closed");
    Ok(Json(c.transfer.to_json()).into_response())
}

#[utoipa::path(
    post,
    path = "/v1/transfers/{id}/receive",
    tag = "admin",
    summary = "Receive a transfer at its destination: on_hand gains what was shipped, and what did not arrive is booked there as a transit_loss adjustment (once; an identical retry answers the same)",
    params(("id" = String, Path, description = "Transfer id (UUID) or the key it was shipped under"), ("Idempotency-Key" = Option<String>, Header, description = "Optional; the same key with another body is 409 idempotency_conflict")),
    request_body = ReceiveBody,
    responses((status = 200, description = "The transfer, received", body = crate::openapi::Transfer), (status = 404, description = "No such transfer", body = crate::openapi::Error), (status = 409, description = "Received already with other quantities, or cancelled", body = crate::openapi::Error), (status = 422, description = "Invalid request (more than shipped, a SKU not shipped or missing)", body = crate::openapi::Error), (status = 401, description = "No valid token", body = crate::openapi::Error), (status = 403, description = "The token's role may not", body = crate::openapi::Error), (status = 429, description = "Over the rate limit", body = crate::openapi::Error)),
    security(("bearer" = []))
)]
async fn post_transfer_receive(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
    headers: axum::http::HeaderMap,
    ApiBytes(body): ApiBytes,
) -> Result<Response, ApiError> {
    let id = keyed_id(&id)?;
    let key = transfer_key(&headers)?;
    // The body is optional: none (or `{}`) receives everything shipped.
    let b: ReceiveBody = if body.iter().all(u8::is_ascii_whitespace) {
        ReceiveBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| match e.classify() {
            serde_json::error::Category::Data => ApiError::invalid(e.to_string()),
            _ => ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", e.to_string()),
        })?
    };
    let lines = b.lines.as_deref().map(parse_receipt_lines).transpose()?;
    let r = state.hub.storage.receive_transfer(id, lines, key, shelfsync_node::now_ms()).await;
    transfer_changed(&state, r).await
}

#[utoipa::path(
    post,
    path = "/v1/transfers/{id}/cancel",
    tag = "admin",
    summary = "Cancel a transfer in transit: its units go back to the source (a retry answers the same)",
    params(("id" = String, Path, description = "Transfer id (UUID) or the key it was shipped under"), ("Idempotency-Key" = Option<String>, Header, description = "Optional")),
    responses((status = 200, description = "The transfer, cancelled", body = crate::openapi::Transfer), (status = 404, description = "No such transfer", body = crate::openapi::Error), (status = 409, description = "Received already", body = crate::openapi::Error), (status = 422, description = "Invalid request (names what is wrong)", body = crate::openapi::Error), (status = 401, description = "No valid token", body = crate::openapi::Error), (status = 403, description = "The token's role may not", body = crate::openapi::Error), (status = 429, description = "Over the rate limit", body = crate::openapi::Error)),
    security(("bearer" = []))
)]
async fn post_transfer_cancel(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    let id = keyed_id(&id)?;
    let key = transfer_key(&headers)?;
    let r = state.hub.storage.cancel_transfer(id, key, shelfsync_node::now_ms()).await;
    transfer_changed(&state, r).await
}

#[utoipa::path(
    get,
    path = "/v1/transfers/{id}",
    tag = "viewer",
    summary = "A transfer",
    params(("id" = String, Path, description = "Transfer id (UUID) or the key it was shipped under")),
    responses((status = 200, description = "The transfer", body = crate::openapi::Transfer), (status = 404, description = "No such transfer", body = crate::openapi::Error), (status = 422, description = "Invalid request (names what is wrong)", body = crate::openapi::Error), (status = 401, description = "No valid token", body = crate::openapi::Error), (status = 403, description = "The token's role may not", body = crate::openapi::Error), (status = 429, description = "Over the rate limit", body = crate::openapi::Error)),
    security(("bearer" = []))
)]
async fn get_transfer(State(state): State<ApiState>, ApiPath(id): ApiPath<String>) -> Result<Json<Value>, ApiError> {
    let id = keyed_id(&id)?;
    match state.hub.storage.transfer(id).await? {
        Some(t) => Ok(Json(t.to_json())),
        None => Err(ApiError::not_found(format!("no transfer {id}"))),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TransferQuery {
    store: Option<String>,
    status: Option<String>,
    after: Option<String>,
    limit: Option<usize>,
}

/// Largest page of `/v1/transfers`.
pub const TRANSFERS_PAGE_MAX: usize = 1000;

#[utoipa::path(
    get,
    path = "/v1/transfers",
    tag = "viewer",
    summary = "Transfers, newest first, a page at a time (by store, from or to; by status)",
    params(
        ("store" = Option<String>, Query, description = "Only transfers from or to this store"),
        ("status" = Option<String>, Query, description = "in_transit, received or cancelled"),
        ("after" = Option<String>, Query, description = "The previous page's next (a transfer id)"),
        ("limit" = Option<usize>, Query, description = "1..1000 (default 100)")
    ),
    responses((status = 200, description = "A page", body = crate::openapi::TransferPage), (status = 422, description = "Invalid request (names what is wrong)", body = crate::openapi::Error), (status = 401, description = "No valid token", body = crate::openapi::Error), (status = 403, description = "The token's role may not", body = crate::openapi::Error), (status = 429, description = "Over the rate limit", body = crate::openapi::Error)),
    security(("bearer" = []))
)]
async fn get_transfers(
    State(state): State<ApiState>,
    ApiQuery(q): ApiQuery<TransferQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = page_limit(q.limit, 100, TRANSFERS_PAGE_MAX)?;
    let store =
        q.store.as_deref().map(|s| parse_store("store", s).map_err(|e| e.with("parameter", "store"))).transpose()?;
    let status = match q.status.as_deref() {
        None => None,
        Some(s) => Some(shelfsync_hub_core::TransferStatus::parse(s).ok_or_else(|| {
            ApiError::invalid(format!("status must be in_transit, received or cancelled; got {}", quote(s)))
                .with("parameter", "status")
        })?),
    };
    let after = match q.after.as_deref() {
        None => None,
        Some(a) => {
            let id = parse_id(a).map_err(|e| e.with("parameter", "after"))?;
            if state.hub.storage.transfer(id).await?.is_none() {
                return Err(ApiError::invalid(format!("after names no transfer: {id}")).with("parameter", "after"));
            }
            Some(id)
        }
    };
    let filter = shelfsync_hub_core::TransferFilter { store, status, after, limit: limit + 1 };
    let (rows, next) = page(state.hub.storage.transfers(filter).await?, limit, |t| t.id);
    let items: Vec<Value> = rows.iter().map(|t| t.to_json()).collect();
    Ok(Json(json!({ "items": items, "next": next })))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct RestockBatchEntry {
    store: String,
    lines: Vec<LineBody>,
    reason: Option<String>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct RestockBatchBody {
    /// Idempotency key (or the `Idempotency-Key` header): one for the whole batch.
    id: Option<String>,
    /// 1..100 stores' deliveries, answered in this order.
    restocks: Vec<RestockBatchEntry>,
}

#[utoipa::path(
    post,
    path = "/v1/restocks/batch",
    tag = "admin",
    summary = "Deliveries to several stores under one key: all entries or none, answered per entry in order",
    params(("Idempotency-Key" = Option<String>, Header, description = "The idempotency key, instead of (or equal to) the body's id: 1..128 printable ASCII")),
    request_body = RestockBatchBody,
    responses((status = 201, description = "Recorded", body = crate::openapi::RestockBatch), (status = 200, description = "A retry: the first answer", body = crate::openapi::RestockBatch), (status = 409, description = "The key was used for another request", body = crate::openapi::Error), (status = 422, description = "Invalid request (names restocks[i]... when an entry is wrong, unknown stores included); nothing recorded", body = crate::openapi::Error), (status = 401, description = "No valid token", body = crate::openapi::Error), (status = 403, description = "The token's role may not", body = crate::openapi::Error), (status = 429, description = "Over the rate limit", body = crate::openapi::Error)),
    security(("bearer" = []))
)]
async fn post_restock_batch(
    State(state): State<ApiState>,
    headers: axum::http::HeaderMap,
    ApiJson(b): ApiJson<RestockBatchBody>,
) -> Result<Response, ApiError> {
    use shelfsync_hub_core::{RestockEntry, RESTOCK_BATCH_MAX};
    let key = required_key(b.id.as_deref(), &headers)?;
    if b.restocks.is_empty() || b.restocks.len() > RESTOCK_BATCH_MAX {
        return Err(ApiError::invalid(format!(
            "restocks must have 1 to {RESTOCK_BATCH_MAX} entries, got {}",
            b.restocks.len()
        ))
        .with("field", "restocks"));
    }
    let mut restocks = Vec::with_capacity(b.restocks.len());
    for (i, r) in b.restocks.into_iter().enumerate() {
        let at = format!("restocks[{i}]");
        let store =
            parse_store(&format!("{at}.store"), &r.store).map_err(|e| e.with("field", format!("{at}.store")))?;
        let lines = parse_lines_at(&at, &r.lines)?;
        check_reason(&r.reason).map_err(|e| ApiError { message: format!("{at}.{}", e.message), ..e })?;
        restocks.push(RestockEntry { store, lines, reason: r.reason });
    }
    let req = HubChangeRequest {
        id: key.id(),
        key: Some(key.as_str().to_owned()),
        change: HubChange::RestockBatch { restocks },
        reason: None,
    };
    hub_change(&state, req).await
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct AdjustmentBody {
    /// Idempotency key (or the `Idempotency-Key` header).
    id: Option<String>,
    sku: String,
    /// Non-zero, at most 1,000,000 either way; its sign must fit the reason.
    delta: i64,
    /// A reason code: damaged, theft, expired, lost, internal_use, returned_to_vendor,
    /// transit_loss, found, correction, other.
    reason: String,
    /// Free text (required with `other`).
    note: Option<String>,
    /// Compare-and-set: refuse with 409 `stale_quantity` unless the hub's on_hand is this now.
    expected_on_hand: Option<i64>,
}

#[utoipa::path(
    post,
    path = "/v1/stores/{id}/adjustments",
    tag = "admin",
    summary = "A head-office correction of a store's count, with a reason code; optionally compare-and-set on the hub's on_hand",
    params(("id" = String, Path, description = "Store id"), ("Idempotency-Key" = Option<String>, Header, description = "The idempotency key, instead of (or equal to) the body's id: 1..128 printable ASCII")),
    request_body = AdjustmentBody,
    responses((status = 201, description = "Recorded", body = crate::openapi::HubChange), (status = 200, description = "A retry: the first answer", body = crate::openapi::HubChange), (status = 404, description = "No such store", body = crate::openapi::Error), (status = 409, description = "stale_quantity (on_hand is not expected_on_hand; the body has on_hand), or the key was used for another request", body = crate::openapi::StaleQuantity), (status = 422, description = "Invalid request (names what is wrong)", body = crate::openapi::Error), (status = 401, description = "No valid token", body = crate::openapi::Error), (status = 403, description = "The token's role may not", body = crate::openapi::Error), (status = 429, description = "Over the rate limit", body = crate::openapi::Error)),
    security(("bearer" = []))
)]
async fn post_adjustment(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
    headers: axum::http::HeaderMap,
    ApiJson(b): ApiJson<AdjustmentBody>,
) -> Result<Response, ApiError> {
    let key = required_key(b.id.as_deref(), &headers)?;
    let store = parse_store("id", &id)?;
    let sku = parse_sku("sku", &b.sku).map_err(|e| e.with("field", "sku"))?;
    let reason = shelfsync_node::http::adjustment_reason(b.delta, &b.reason, b.note)?;
    let req = HubChangeRequest {
        id: key.id(),
        key: Some(key.as_str().to_owned()),
        change: HubChange::Adjust { store, sku, delta: b.delta, expected_on_hand: b.expected_on_hand },
        reason: Some(reason.to_stored()),
    };
    hub_change(&state, req).await
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct ReservationBody {
    /// Idempotency key = the reservation's name (or the `Idempotency-Key` header): 1..128
    /// printable ASCII, e.g. the storefront's order number.
    id: Option<String>,
    lines: Vec<LineBody>,
    ttl_secs: Option<u64>,
    pickup_store: Option<String>,
    customer: Option<String>,
    /// The sales channel (a token bound to one reserves for it; an admin token may name any;
    /// default web).
    channel: Option<String>,
}

fn check_ttl(state: &ApiState, ttl: Option<u64>) -> Result<u64, ApiError> {
    let r = &state.reservations;
    let ttl = ttl.unwrap_or(r.default_ttl_secs);
    if ttl == 0 || ttl > r.max_ttl_secs {
        return Err(ApiError::invalid(format!("ttl_secs must be between 1 and {}, got {ttl}", r.max_ttl_secs)));
    }
    Ok(ttl)
}

#[utoipa::path(
    post,
    path = "/v1/reservations",
    tag = "storefront",
    summary = "Reserve units (all lines or none); a retry with the same key (body id or Idempotency-Key) answers the first result",
    params(("Idempotency-Key" = Option<String>, Header, description = "The idempotency key, instead of (or equal to) the body's id: 1..128 printable ASCII")),
    request_body = ReservationBody,
    responses((status = 201, description = "Reserved", body = crate::openapi::Reservation), (status = 200, description = "A retry: the first answer", body = crate::openapi::Reservation), (status = 409, description = "Not enough stock, or the id was used for another request", body = crate::openapi::Error), (status = 422, description = "Invalid request (names what is wrong)", body = crate::openapi::Error), (status = 401, description = "No valid token", body = crate::openapi::Error), (status = 403, description = "The token's role may not", body = crate::openapi::Error), (status = 429, description = "Over the rate limit", body = crate::openapi::Error), (status = 503, description = "The hub is busy or stopping (Retry-After)", body = crate::openapi::Error)),
    security(("bearer" = []))
)]
async fn post_reservation(
    State(state): State<ApiState>,
    axum::Extension(caller): axum::Extension<Caller>,
    headers: axum::http::HeaderMap,
    ApiJson(b): ApiJson<ReservationBody>,
) -> Result<Response, ApiError> {
    let asked = b.channel.as_deref().map(|c| crate::channels::parse_channel("channel", c)).transpose()?;
    let channel = match (caller.channel, asked) {
        (Some(own), Some(c)) if c != own => {
            return Err(ApiError::forbidden(format!(
                "this token belongs to channel {own}: it cannot reserve for channel {c}"
            )))
        }
        (own, asked) => own.or(asked),
    };
    let key = required_key(b.id.as_deref(), &headers)?;
    let id = key.id();
    let lines = parse_lines(&b.lines)?;
    let ttl_secs = check_ttl(&state, b.ttl_secs)?;
    let pickup_store = b.pickup_store.as_deref().map(|s| parse_store("pickup_store", s)).transpose()?;
    if let Some(c) = &b.customer {
        if c.is_empty() || c.len() > shelfsync_hub_core::CUSTOMER_MAX_LEN {
            return Err(ApiError::invalid(format!(
                "customer must be 1 to {} bytes, got {}",
                shelfsync_hub_core::CUSTOMER_MAX_LEN,
                c.len()
            )));
        }
    }
    let req = shelfsync_hub_core::ReservationRequest {
        id,
        key: Some(key.as_str().to_owned()),
        lines,
        ttl_secs,
        pickup_store,
        customer: b.customer,
        channel,
    };
    let w = counted(&state, "create", state.hub.storage.create_reservation(req, shelfsync_node::now_ms()).await)
        .map_err(|e| name_key(e, Some(key.as_str())))?;
    if w.created {
        let channel = w.view.channel.as_ref().map_or(shelfsync_hub_core::WEB, |c| c.as_str());
        let short: u64 = w.view.lines.iter().map(|l| l.short).sum();
        state.hub.metrics.channel_reservation(channel, short);
        if short > 0 {
            // A lagged channel sold what its stores did not have: a conflict is open for it.
            tracing::warn!(channel, reservation = %w.view.id, short, "channel oversold: units recorded short");
        }
    }
    state.hub.holds_changed(&w.stores);
    let status = if w.created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(w.view.to_json())).into_response())
}

#[utoipa::path(
    get,
    path = "/v1/reservations/{id}",
    tag = "storefront",
    summary = "A reservation",
    params(("id" = String, Path, description = "Reservation id (UUID), or the idempotency key it was made with")),
    responses((status = 200, description = "The reservation", body = crate::openapi::Reservation), (status = 404, description = "No such reservation", body = crate::openapi::Error), (status = 422, description = "Invalid request (names what is wrong)", body = crate::openapi::Error), (status = 401, description = "No valid token", body = crate::openapi::Error), (status = 403, description = "The token's role may not", body = crate::openapi::Error), (status = 429, description = "Over the rate limit", body = crate::openapi::Error)),
    security(("bearer" = []))
)]
async fn get_reservation(State(state): State<ApiState>, ApiPath(id): ApiPath<String>) -> Result<Json<Value>, ApiError> {
    let rid = keyed_id(&id)?;
    match state.hub.storage.reservation(rid).await? {
        Some(v) => Ok(Json(v.to_json())),
        None => Err(ApiError::not_found(format!("no reservation {}", quote(&id)))),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReservationQuery {
    customer: Option<String>,
    status: Option<String>,
    short: Option<bool>,
    after: Option<String>,
    limit: Option<usize>,
}

/// Largest page of `/v1/reservations`.
pub const RESERVATIONS_PAGE_MAX: usize = 1000;

#[utoipa::path(
    get,
    path = "/v1/reservations",
    tag = "storefront",
    summary = "Reservations, newest first, a page at a time (by customer, by status, the short ones)",
    params(
        ("customer" = Option<String>, Query, description = "Only this customer's"),
        ("status" = Option<String>, Query, description = "held, committed, fulfilled, released or expired"),
        ("short" = Option<bool>, Query, description = "Only those with (true) or without (false) a line marked short"),
        ("after" = Option<String>, Query, description = "The previous page's next (a reservation id)"),
        ("limit" = Option<usize>, Query, description = "1..1000 (default 100)")
    ),
    responses((status = 200, description = "A page", body = crate::openapi::ReservationPage), (status = 422, description = "Invalid request (names what is wrong)", body = crate::openapi::Error), (status = 401, description = "No valid token", body = crate::openapi::Error), (status = 403, description = "The token's role may not", body = crate::openapi::Error), (status = 429, description = "Over the rate limit", body = crate::openapi::Error)),
    security(("bearer" = []))
)]
async fn get_reservations(
    State(state): State<ApiState>,
    ApiQuery(q): ApiQuery<ReservationQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = page_limit(q.limit, 100, RESERVATIONS_PAGE_MAX)?;
    let status = match q.status.as_deref() {
        None => None,
        Some(s) => Some(shelfsync_hub_core::ReservationStatus::parse(s).ok_or_else(|| {
            ApiError::invalid(format!(
                "status must be held, committed, fulfilled, released or expired; got {}",
                quote(s)
            ))
            .with("parameter", "status")
        })?),
    };
    if let Some(c) = &q.customer {
        if c.is_empty() || c.len() > shelfsync_hub_core::CUSTOMER_MAX_LEN {
            return Err(ApiError::invalid(format!(
                "customer must be 1 to {} bytes, got {}",
                shelfsync_hub_core::CUSTOMER_MAX_LEN,
                c.len()
            ))
            .with("parameter", "customer"));
        }
    }
    let after = match q.after.as_deref() {
        None => None,
        Some(a) => {
            let id = parse_id(a).map_err(|e| e.with("parameter", "after"))?;
            if state.hub.storage.reservation(id).await?.is_none() {
                return Err(ApiError::invalid(format!("after names no reservation: {id}")).with("parameter", "after"));
            }
            Some(id)
        }
    };
    let filter =
        shelfsync_hub_core::ReservationFilter { customer: q.customer, status, short: q.short, after, limit: limit + 1 };
    let (rows, next) = page(state.hub.storage.reservations(filter).await?, limit, |r| r.id);
    let items: Vec<Value> = rows.iter().map(|r| r.to_json()).collect();
    Ok(Json(json!({ "items": items, "next": next })))
}

async fn act(
    state: &ApiState,
    id: &str,
    action: shelfsync_hub_core::Action,
    headers: &axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    let id = keyed_id(id)?;
    // The action's own key (optional): the same rule as every write, kept by its UUID.
    let key = request_key(None, headers)?;
    let name = match action {
        shelfsync_hub_core::Action::Extend { .. } => "extend",
        shelfsync_hub_core::Action::Commit => "commit",
        shelfsync_hub_core::Action::Release => "release",
    };
    let decided = state.hub.storage.act(id, action, key.as_ref().map(|k| k.id().to_string()), shelfsync_node::now_ms());
    let w = counted(state, name, decided.await).map_err(|e| match &key {
        Some(k) if e.code == "idempotency_conflict" => ApiError::conflict(
            "idempotency_conflict",
            format!("Idempotency-Key {} was already used for a different action", quote(k.as_str())),
        ),
        _ => e,
    })?;
    state.hub.holds_changed(&w.stores);
    Ok(Json(w.view.to_json()).into_response())
}

/// Counts a reservation call in `shelfsync_hub_reservations_total{action, outcome}`: `ok` or the
/// error code it is answered with (`insufficient_stock`, `not_found`, ...).
fn counted<T>(state: &ApiState, action: &'static str, r: Result<T, StorageError>) -> Result<T, ApiError> {
    match r {
        Ok(v) => {
            tracing::debug!(action, "reservation call done");
            state.hub.metrics.reservation(action, "ok");
            Ok(v)
        }
        Err(e) => {
            let e = ApiError::from(e);
            tracing::debug!(action, outcome = e.code, "reservation call refused");
            state.hub.metrics.reservation(action, e.code);
            Err(e)
        }
    }
}

#[derive(Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct ExtendBody {
    ttl_secs: Option<u64>,
}

#[utoipa::path(
    post,
    path = "/v1/reservations/{id}/extend",
    tag = "storefront",
    summary = "Extend an unpaid lease",
    params(("id" = String, Path, description = "Reservation id (UUID), or the idempotency key it was made with"), ("Idempotency-Key" = Option<String>, Header, description = "1..128 printable ASCII; makes a retry answer the first result")),
    request_body = ExtendBody,
    responses((status = 200, description = "The reservation", body = crate::openapi::Reservation), (status = 404, description = "No such reservation", body = crate::openapi::Error), (status = 409, description = "Not held", body = crate::openapi::Error), (status = 422, description = "Invalid request (names what is wrong)", body = crate::openapi::Error), (status = 401, description = "No valid token", body = crate::openapi::Error), (status = 403, description = "The token's role may not", body = crate::openapi::Error), (status = 429, description = "Over the rate limit", body = crate::openapi::Error)),
    security(("bearer" = []))
)]
async fn post_extend(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
    headers: axum::http::HeaderMap,
    ApiJson(b): ApiJson<ExtendBody>,
) -> Result<Response, ApiError> {
    let ttl_secs = check_ttl(&state, b.ttl_secs)?;
    act(&state, &id, shelfsync_hub_core::Action::Extend { ttl_secs }, &headers).await
}

#[utoipa::path(
    post,
    path = "/v1/reservations/{id}/commit",
    tag = "storefront",
    summary = "Commit (paid): the lease no longer lapses",
    params(("id" = String, Path, description = "Reservation id (UUID), or the idempotency key it was made with"), ("Idempotency-Key" = Option<String>, Header, description = "1..128 printable ASCII; makes a retry answer the first result")),
    responses((status = 200, description = "The reservation", body = crate::openapi::Reservation), (status = 404, description = "No such reservation", body = crate::openapi::Error), (status = 409, description = "Released or expired", body = crate::openapi::Error), (status = 422, description = "Invalid request (names what is wrong)", body = crate::openapi::Error), (status = 401, description = "No valid token", body = crate::openapi::Error), (status = 403, description = "The token's role may not", body = crate::openapi::Error), (status = 429, description = "Over the rate limit", body = crate::openapi::Error)),
    security(("bearer" = []))
)]
async fn post_commit(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    act(&state, &id, shelfsync_hub_core::Action::Commit, &headers).await
}

#[utoipa::path(
    delete,
    path = "/v1/reservations/{id}",
    tag = "storefront",
    summary = "Release a reservation",
    params(("id" = String, Path, description = "Reservation id (UUID), or the idempotency key it was made with"), ("Idempotency-Key" = Option<String>, Header, description = "1..128 printable ASCII; makes a retry answer the first result")),
    responses((status = 200, description = "The reservation", body = crate::openapi::Reservation), (status = 404, description = "No such reservation", body = crate::openapi::Error), (status = 409, description = "Fulfilled or expired", body = crate::openapi::Error), (status = 422, description = "Invalid request (names what is wrong)", body = crate::openapi::Error), (status = 401, description = "No valid token", body = crate::openapi::Error), (status = 403, description = "The token's role may not", body = crate::openapi::Error), (status = 429, description = "Over the rate limit", body = crate::openapi::Error)),
    security(("bearer" = []))
)]
async fn delete_reservation(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    act(&state, &id, shelfsync_hub_core::Action::Release, &headers).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConflictQuery {
    store: Option<String>,
    sku: Option<String>,
    status: Option<String>,
    after: Option<String>,
    limit: Option<usize>,
}

/// Largest page of `/v1/conflicts`.
pub const CONFLICTS_PAGE_MAX: usize = 1000;

#[utoipa::path(
    get,
    path = "/v1/conflicts",
    tag = "viewer",
    summary = "Conflicts, newest first, a page at a time",
    params(("store" = Option<String>, Query, description = "Only this store"), ("sku" = Option<String>, Query, description = "Only this SKU"), ("status" = Option<String>, Query, description = "open or resolved"), ("after" = Option<String>, Query, description = "The previous page's next (a conflict id)"), ("limit" = Option<usize>, Query, description = "1..1000 (default 100)")),
    responses((status = 200, description = "A page", body = crate::openapi::ConflictPage), (status = 422, description = "Invalid request (names what is wrong)", body = crate::openapi::Error), (status = 401, description = "No valid token", body = crate::openapi::Error), (status = 403, description = "The token's role may not", body = crate::openapi::Error), (status = 429, description = "Over the rate limit", body = crate::openapi::Error)),
    security(("bearer" = []))
)]
async fn get_conflicts(
    State(state): State<ApiState>,
    ApiQuery(q): ApiQuery<ConflictQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = page_limit(q.limit, 100, CONFLICTS_PAGE_MAX)?;
    let after = match q.after.as_deref() {
        None => None,
        Some(a) => {
            let id = Uuid::parse_str(a).map_err(|_| {
                ApiError::invalid(format!("after must be a conflict id (a UUID), got {}", quote(a)))
                    .with("parameter", "after")
            })?;
            if state.hub.storage.conflict(id).await?.is_none() {
                return Err(ApiError::invalid(format!("after names no conflict: {id}")).with("parameter", "after"));
            }
            Some(id)
        }
    };
    if let Some(s) = &q.status {
        if s != "open" && s != "resolved" {
            return Err(ApiError::invalid(format!("status must be open or resolved, got {}", quote(s))));
        }
    }
    let filter = crate::storage::ConflictFilter {
        store: q.store.as_deref().map(|s| parse_store("store", s)).transpose()?,
        sku: q.sku.as_deref().map(|s| parse_sku("sku", s)).transpose()?,
        status: q.status.as_deref().and_then(shelfsync_hub_core::ConflictStatus::parse),
        after,
        // One more than asked: whether there is a next page.
        limit: limit + 1,
    };
    let (rows, next) = page(state.hub.storage.conflicts(filter).await?, limit, |c| c.id);
    let items: Vec<Value> = rows.iter().map(|c| c.to_json()).collect();
    Ok(Json(json!({ "items": items, "next": next })))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct ResolveBody {
    /// What head office did about it (shown as the conflict's resolution).
    note: String,
}

/// `POST /v1/conflicts/{id}/resolve` (admin): a person closes an open conflict with a note; the
/// note and the token's name become its resolution, with a `conflict_resolved` feed event.
#[utoipa::path(
    post,
    path = "/v1/conflicts/{id}/resolve",
    tag = "admin",
    summary = "Resolve an open conflict with a note",
    params(("id" = String, Path, description = "Conflict id (UUID)")),
    request_body = ResolveBody,
    responses((status = 200, description = "The conflict after", body = crate::openapi::Conflict), (status = 404, description = "No such conflict", body = crate::openapi::Error), (status = 409, description = "Resolved already", body = crate::openapi::Error), (status = 422, description = "Invalid request (names what is wrong)", body = crate::openapi::Error), (status = 401, description = "No valid token", body = crate::openapi::Error), (status = 403, description = "The token's role may not", body = crate::openapi::Error), (status = 429, description = "Over the rate limit", body = crate::openapi::Error)),
    security(("bearer" = []))
)]
async fn post_resolve_conflict(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
    axum::Extension(caller): axum::Extension<Caller>,
    ApiJson(b): ApiJson<ResolveBody>,
) -> Result<Json<Value>, ApiError> {
    let id = Uuid::parse_str(&id)
        .map_err(|_| ApiError::invalid(format!("id must be a conflict id (a UUID), got {}", quote(&id))))?;
    let note = b.note.trim();
    if note.is_empty() {
        return Err(ApiError::invalid("note must say what was done (it is empty)"));
    }
    if note.len() > REASON_MAX_LEN {
        return Err(ApiError::invalid(format!("note is {} bytes long; the limit is {REASON_MAX_LEN}", note.len())));
    }
    let resolution = format!("{note} (resolved by {})", caller.token_name);
    let c = state.hub.storage.resolve_conflict(id, resolution, shelfsync_node::now_ms()).await?;
    Ok(Json(c.to_json()))
}

/// Largest page of the change feed.
pub const CHANGES_PAGE_MAX: usize = 1000;

/// Largest change cursor (cursors are SQL integers).
pub use shelfsync_hub_core::CURSOR_MAX;

/// Parses a change cursor given as `what` (`after`, `Last-Event-ID`): 0 to [`CURSOR_MAX`].
pub(crate) fn parse_cursor(what: &str, s: &str) -> Result<u64, ApiError> {
    s.trim().parse::<u64>().ok().filter(|c| *c <= CURSOR_MAX).ok_or_else(|| {
        ApiError::invalid(format!(
            "{what} must be a change cursor, a whole number from 0 to {CURSOR_MAX}; got {}",
            quote(&s.chars().take(64).collect::<String>())
        ))
        .with("parameter", what)
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ChangesQuery {
    after: Option<String>,
    limit: Option<usize>,
    /// One channel's view (admins and unbound viewers; a channel's token has its own).
    channel: Option<String>,
    /// What becomes of events the reader may not see: `skip` (default) or `mark`.
    hidden: Option<String>,
}

#[utoipa::path(
    get,
    path = "/v1/changes",
    tag = "viewer",
    summary = "The change feed after a cursor (gap-free); next is null once caught up, cursor always says where to resume",
    params(("after" = Option<String>, Query, description = "A cursor (default 0)"), ("limit" = Option<usize>, Query, description = "1..1000 (default 100)"), ("channel" = Option<String>, Query, description = "Only what a channel's reader sees: events about that channel and about none (a token bound to a channel always reads its own)"), ("hidden" = Option<String>, Query, description = "skip (default) leaves out events the reader may not see; mark shows each as {cursor, kind: hidden, at}")),
    responses((status = 200, description = "Events", body = crate::openapi::ChangePage), (status = 422, description = "Invalid request (names what is wrong)", body = crate::openapi::Error), (status = 401, description = "No valid token", body = crate::openapi::Error), (status = 403, description = "The token's role may not", body = crate::openapi::Error), (status = 429, description = "Over the rate limit", body = crate::openapi::Error)),
    security(("bearer" = []))
)]
async fn get_changes(
    State(state): State<ApiState>,
    axum::Extension(caller): axum::Extension<Caller>,
    ApiQuery(q): ApiQuery<ChangesQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = page_limit(q.limit, 100, CHANGES_PAGE_MAX)?;
    let after = q.after.as_deref().map(|a| parse_cursor("after", a)).transpose()?.unwrap_or(0);
    let view = crate::channels::View::of(&caller, q.channel.as_deref())?;
    let mark = match q.hidden.as_deref() {
        None | Some("skip") => false,
        Some("mark") => true,
        Some(h) => return Err(ApiError::invalid(format!("hidden must be skip or mark, got {}", quote(h)))),
    };
    // The committed head before reading: a page that reaches it is caught up (`next` null), and
    // a feed reader keeps tailing from `cursor`.
    let head = *state.hub.storage.change_head().borrow();
    let read = state.hub.storage.changes_after(after, limit).await?;
    // Where the page ends: the last event read, seen or not (a channel's reader skips the
    // others' events and goes on after them).
    let cursor = read.last().map(|e| e.cursor).unwrap_or(after);
    let next = (read.len() == limit && cursor < head).then_some(cursor);
    let items: Vec<crate::engine::ChangeEvent> = read
        .into_iter()
        .filter_map(|e| match (view.sees(&e), mark) {
            (true, _) => Some(e),
            (false, true) => Some(crate::channels::hidden(&e)),
            (false, false) => None,
        })
        .collect();
    Ok(Json(json!({ "items": items, "next": next, "cursor": cursor })))
}

/// Largest CSV import body.
pub const CATALOG_IMPORT_MAX_BYTES: usize = 32 << 20;

fn catalog_error(e: StorageError) -> ApiError {
    match e {
        StorageError::Invalid(m) => ApiError::invalid(m),
        other => other.into(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogQuery {
    after: Option<String>,
    limit: Option<usize>,
    /// Only entries whose SKU or name contains this (ignoring ASCII case).
    q: Option<String>,
}

/// Longest catalog search text, in bytes.
pub const CATALOG_SEARCH_MAX_LEN: usize = 128;

#[utoipa::path(
    get,
    path = "/v1/catalog",
    tag = "viewer",
    summary = "The catalog, a page by SKU",
    params(("after" = Option<String>, Query, description = "The previous page's next"), ("q" = Option<String>, Query, description = "Only entries whose SKU or name contains this (ASCII case ignored), at most 128 bytes"), ("limit" = Option<usize>, Query, description = "1..1000 (default 100)")),
    responses((status = 200, description = "A page", body = crate::openapi::CatalogPage), (status = 422, description = "Invalid request (names what is wrong)", body = crate::openapi::Error), (status = 401, description = "No valid token", body = crate::openapi::Error), (status = 403, description = "The token's role may not", body = crate::openapi::Error), (status = 429, description = "Over the rate limit", body = crate::openapi::Error)),
    security(("bearer" = []))
)]
async fn get_catalog_page(
    State(state): State<ApiState>,
    ApiQuery(q): ApiQuery<CatalogQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = page_limit(q.limit, 100, STOCK_PAGE_MAX)?;
    let after = q.after.as_deref().map(|s| parse_sku("after", s)).transpose()?;
    let search = q.q.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty());
    let items = match search {
        Some(text) if text.len() > CATALOG_SEARCH_MAX_LEN => {
            return Err(ApiError::invalid(format!(
                "q is {} bytes long; the limit is {CATALOG_SEARCH_MAX_LEN}",
                text.len()
            ))
            .with("parameter", "q"));
        }
        Some(text) => state.hub.storage.catalog_search(text, after, limit + 1).await?,
        None => state.hub.storage.catalog_page(after, limit + 1).await?,
    };
    let (items, next) = page(items, limit, |v| v.sku.to_string());
    Ok(Json(json!({ "items": items, "next": next })))
}

#[utoipa::path(
    get,
    path = "/v1/catalog/{sku}",
    tag = "viewer",
    summary = "One catalog entry",
    params(("sku" = String, Path, description = "The SKU")),
    responses((status = 200, description = "The entry", body = crate::openapi::CatalogEntry), (status = 404, description = "No such SKU in the catalog", body = crate::openapi::Error), (status = 422, description = "Invalid request (names what is wrong)", body = crate::openapi::Error), (status = 401, description = "No valid token", body = crate::openapi::Error), (status = 403, description = "The token's role may not", body = crate::openapi::Error), (status = 429, description = "Over the rate limit", body = crate::openapi::Error)),
    security(("bearer" = []))
)]
async fn get_catalog_item(
    State(state): State<ApiState>,
    ApiPath(sku): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let sku = parse_sku("sku", &sku)?;
    match state.hub.storage.catalog_item(sku.clone()).await? {
        Some(v) => Ok(Json(serde_json::to_value(v).expect("serialises"))),
        None => Err(ApiError::not_found(format!("sku {sku} is not in the catalog"))),
    }
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct PutItemBody {
    name: String,
    #[serde(default)]
    barcodes: Vec<String>,
    #[serde(default)]
    safety_stock: u64,
    #[serde(default)]
    low_stock_threshold: u64,
    #[serde(default)]
    max_per_customer: u64,
    #[serde(default = "yes")]
    active: bool,
    /// How much of each store's stock online gets the rights to (over the chain's `[escrow]`).
    #[serde(default)]
    #[schema(value_type = Option<crate::openapi::EscrowRule>)]
    escrow: shelfsync_shared::EscrowRule,
}

fn yes() -> bool {
    true
}

async fn catalog_edit(state: &ApiState, sku: Sku, edit: crate::catalog::Edit) -> Result<Json<Value>, ApiError> {
    let (done, holds) =
        state.hub.catalog.edit(state.hub.storage.as_ref(), vec![(sku.clone(), edit)]).await.map_err(catalog_error)?;
    state.hub.catalog_changed();
    state.hub.holds_changed(&holds);
    let item = done.into_iter().next().map(|(_, i)| i);
    Ok(Json(json!({"sku": sku, "item": item})))
}

#[utoipa::path(
    put,
    path = "/v1/catalog/{sku}",
    tag = "admin",
    summary = "Create or replace a catalog entry",
    params(("sku" = String, Path, description = "The SKU")),
    request_body = PutItemBody,
    responses((status = 200, description = "The entry after", body = crate::openapi::CatalogEdited), (status = 422, description = "Invalid request (names what is wrong)", body = crate::openapi::Error), (status = 401, description = "No valid token", body = crate::openapi::Error), (status = 403, description = "The token's role may not", body = crate::openapi::Error), (status = 429, description = "Over the rate limit", body = crate::openapi::Error)),
    security(("bearer" = []))
)]
async fn put_catalog_item(
    State(state): State<ApiState>,
    ApiPath(sku): ApiPath<String>,
    ApiJson(b): ApiJson<PutItemBody>,
) -> Result<Json<Value>, ApiError> {
    let sku = parse_sku("sku", &sku)?;
    let item = crate::storage::CatalogItem {
        name: b.name,
        barcodes: b.barcodes,
        safety_stock: b.safety_stock,
        low_stock_threshold: b.low_stock_threshold,
        max_per_customer: b.max_per_customer,
        active: b.active,
        escrow: b.escrow,
    };
    catalog_edit(&state, sku, crate::catalog::Edit::Put(item)).await
}

#[utoipa::path(
    patch,
    path = "/v1/catalog/{sku}",
    tag = "admin",
    summary = "Change some fields of a catalog entry",
    params(("sku" = String, Path, description = "The SKU")),
    request_body = Object,
    responses((status = 200, description = "The entry after", body = crate::openapi::CatalogEdited), (status = 404, description = "No such SKU in the catalog", body = crate::openapi::Error), (status = 422, description = "Invalid request (names what is wrong)", body = crate::openapi::Error), (status = 401, description = "No valid token", body = crate::openapi::Error), (status = 403, description = "The token's role may not", body = crate::openapi::Error), (status = 429, description = "Over the rate limit", body = crate::openapi::Error)),
    security(("bearer" = []))
)]
async fn patch_catalog_item(
    State(state): State<ApiState>,
    ApiPath(sku): ApiPath<String>,
    ApiJson(p): ApiJson<shelfsync_node::catalog::CatalogPatch>,
) -> Result<Json<Value>, ApiError> {
    let sku = parse_sku("sku", &sku)?;
    catalog_edit(&state, sku, crate::catalog::Edit::Patch(p)).await
}

#[utoipa::path(
    post,
    path = "/v1/catalog-imports",
    tag = "admin",
    summary = "Import a CSV (sku,name,barcodes,safety_stock,low_stock_threshold,max_per_customer,active,escrow_share_pct,escrow_max,escrow_keep): all rows or none",
    request_body(content = String, content_type = "text/csv"),
    responses((status = 200, description = "Imported", body = crate::openapi::Imported), (status = 413, description = "Over the import limit", body = crate::openapi::Error), (status = 415, description = "Not text/csv", body = crate::openapi::Error), (status = 422, description = "Invalid request (names what is wrong)", body = crate::openapi::Error), (status = 401, description = "No valid token", body = crate::openapi::Error), (status = 403, description = "The token's role may not", body = crate::openapi::Error), (status = 429, description = "Over the rate limit", body = crate::openapi::Error)),
    security(("bearer" = []))
)]
async fn post_catalog_import(
    State(state): State<ApiState>,
    headers: axum::http::HeaderMap,
    body: Result<ApiBytes, ApiError>,
) -> Result<Json<Value>, ApiError> {
    let ct = headers.get(axum::http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if !ct.starts_with("text/csv") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "expected Content-Type: text/csv",
        ));
    }
    let ApiBytes(body) = body.map_err(|mut e| {
        if e.status == StatusCode::PAYLOAD_TOO_LARGE {
            e.message = format!("the CSV is over the import limit of {} MiB", CATALOG_IMPORT_MAX_BYTES >> 20);
        }
        e
    })?;
    let text = std::str::from_utf8(&body).map_err(|e| ApiError::invalid(format!("the CSV is not UTF-8: {e}")))?;
    let rows = crate::catalog::parse_csv(text).map_err(|e| {
        let (row, column) = (e.row, e.column.clone());
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_csv", e.to_string())
            .with("row", row)
            .with("column", column)
    })?;
    let n = rows.len();
    let edits = rows.into_iter().map(|(sku, item)| (sku, crate::catalog::Edit::Put(item))).collect();
    let (_, holds) = state.hub.catalog.edit(state.hub.storage.as_ref(), edits).await.map_err(catalog_error)?;
    state.hub.catalog_changed();
    state.hub.holds_changed(&holds);
    Ok(Json(json!({ "imported": n })))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct TokenBody {
    /// viewer, storefront or admin.
    #[schema(value_type = String)]
    role: Role,
    name: Option<String>,
    expires_in: Option<String>,
    /// The sales channel a storefront or viewer token acts for (a storefront token without one
    /// is web's).
    channel: Option<String>,
}

/// `POST /v1/tokens`: a new token; the answer carries its secret, the only time it is shown.
#[utoipa::path(
    post,
    path = "/v1/tokens",
    tag = "admin",
    summary = "Create a token (its secret is in this answer only)",
    request_body = TokenBody,
    responses((status = 201, description = "Created", body = crate::openapi::Token), (status = 422, description = "Invalid request (names what is wrong)", body = crate::openapi::Error), (status = 401, description = "No valid token", body = crate::openapi::Error), (status = 403, description = "The token's role may not", body = crate::openapi::Error), (status = 429, description = "Over the rate limit", body = crate::openapi::Error)),
    security(("bearer" = []))
)]
async fn post_token(State(state): State<ApiState>, ApiJson(b): ApiJson<TokenBody>) -> Result<Response, ApiError> {
    let name = b.name.unwrap_or_else(|| crate::tokens::DEFAULT_NAME.to_owned());
    crate::tokens::check_name(&name).map_err(ApiError::invalid)?;
    let expires_in_secs =
        b.expires_in.as_deref().map(crate::tokens::parse_expires_in).transpose().map_err(ApiError::invalid)?;
    let channel = crate::tokens::check_channel(b.role, b.channel.as_deref()).map_err(ApiError::invalid)?;
    if let Some(c) = &channel {
        if !state.hub.storage.channels().await?.iter().any(|(ch, _)| &ch.id == c) {
            return Err(ApiError::not_found(format!("no channel {c}; add it first (PUT /v1/channels/{c})")));
        }
    }
    let secret = new_token();
    let t = state
        .hub
        .storage
        .add_token(NewToken { hash: token_hash(&secret), name, role: b.role, expires_in_secs, channel })
        .await?;
    let mut v = serde_json::to_value(t.view(shelfsync_node::now_ms())).expect("serialises");
    v["token"] = Value::String(secret);
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

/// `GET /v1/tokens`: every token, never a secret.
#[utoipa::path(
    get,
    path = "/v1/tokens",
    tag = "admin",
    summary = "Every token (never a secret)",
    params(("after" = Option<String>, Query, description = "The previous page's next (a token id)"), ("limit" = Option<usize>, Query, description = "1..1000 (default 1000)")),
    responses((status = 422, description = "Invalid request (names what is wrong)", body = crate::openapi::Error), (status = 200, description = "Tokens", body = crate::openapi::TokenList), (status = 401, description = "No valid token", body = crate::openapi::Error), (status = 403, description = "The token's role may not", body = crate::openapi::Error), (status = 429, description = "Over the rate limit", body = crate::openapi::Error)),
    security(("bearer" = []))
)]
async fn get_tokens(
    State(state): State<ApiState>,
    ApiQuery(q): ApiQuery<ShortListQuery>,
) -> Result<Json<Value>, ApiError> {
    let now = shelfsync_node::now_ms();
    let limit = page_limit(q.limit, SHORT_LIST_MAX, SHORT_LIST_MAX)?;
    let after = q
        .after
        .as_deref()
        .map(|a| {
            Uuid::parse_str(a).map_err(|_| {
                ApiError::invalid(format!("after must be a token id (a UUID), got {}", quote(a)))
                    .with("parameter", "after")
            })
        })
        .transpose()?;
    let (tokens, next) = shelfsync_node::http::page_after(state.hub.storage.tokens().await?, after, limit, |t| t.id)?;
    let items: Vec<_> = tokens.iter().map(|t| t.view(now)).collect();
    Ok(Json(json!({ "items": items, "next": next })))
}

/// `DELETE /v1/tokens/{id}`: revokes; the token's next request is refused.
#[utoipa::path(
    delete,
    path = "/v1/tokens/{id}",
    tag = "admin",
    summary = "Revoke a token",
    params(("id" = String, Path, description = "Token id (UUID)")),
    responses((status = 200, description = "The token after", body = crate::openapi::Token), (status = 404, description = "No such token", body = crate::openapi::Error), (status = 422, description = "Invalid request (names what is wrong)", body = crate::openapi::Error), (status = 401, description = "No valid token", body = crate::openapi::Error), (status = 403, description = "The token's role may not", body = crate::openapi::Error), (status = 429, description = "Over the rate limit", body = crate::openapi::Error)),
    security(("bearer" = []))
)]
async fn delete_token(State(state): State<ApiState>, ApiPath(id): ApiPath<String>) -> Result<Json<Value>, ApiError> {
    let id = Uuid::parse_str(&id)
        .map_err(|_| ApiError::invalid(format!("id must be a token id (a UUID), got {}", quote(&id))))?;
    match state.hub.storage.revoke_token(id).await? {
        Some(t) => Ok(Json(serde_json::to_value(t.view(shelfsync_node::now_ms())).expect("serialises"))),
        None => Err(ApiError::not_found(format!("no token {id}"))),
    }
}
