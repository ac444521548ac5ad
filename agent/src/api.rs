//! The agent's local HTTP API for the point of sale (DESIGN §7).

use shelfsync_node::now_ms;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use shelfsync_shared::id::quote;
use shelfsync_shared::Sku;
use tokio::sync::watch;
use uuid::Uuid;

use crate::db::{Db, DbError};
use crate::ledger::{self, Change, LedgerError, Line, Outcome, RecordRequest};
use crate::status::SyncStatus;
use axum::http::HeaderMap;
use shelfsync_node::http::{bearer, constant_time_eq, required_key, ApiError, ApiJson, ApiPath, ApiQuery};

/// Largest page of `GET /v1/stock`.
pub const STOCK_PAGE_MAX: usize = 1000;
/// Default page of `GET /v1/stock`.
pub const STOCK_PAGE_DEFAULT: usize = 100;

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    /// The ledger.
    pub db: Db,
    /// Live sync state.
    pub sync: watch::Receiver<SyncStatus>,
    /// Required bearer token, if any.
    pub token: Option<Arc<str>>,
    /// The catalog replica and this store's overrides.
    pub catalog: Arc<crate::catalog::AgentCatalog>,
    /// Host check, rate limits and the edge's counters.
    pub guard: Arc<crate::guard::Guard>,
    /// What `/metrics` shows.
    pub metrics: Arc<crate::metrics::AgentMetrics>,
}

/// The router, apart from `main` so tests can drive it. Every route is registered with its
/// OpenAPI description (`routes!`), so `/openapi.json` lists exactly what is served.
pub fn router(state: AppState, max_body_bytes: usize) -> Router {
    use utoipa_axum::router::OpenApiRouter;
    use utoipa_axum::routes;
    let v1 = OpenApiRouter::new()
        .routes(routes!(post_sale))
        .routes(routes!(post_return))
        .routes(routes!(post_adjustment))
        .routes(routes!(post_count))
        .routes(routes!(post_batch))
        .routes(routes!(get_stock_page))
        .routes(routes!(get_stock))
        .routes(routes!(get_status))
        .routes(routes!(get_holds))
        .routes(routes!(get_incoming))
        .routes(routes!(get_catalog))
        .routes(routes!(put_overrides))
        .routes(routes!(post_fulfil))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    let metrics = OpenApiRouter::new()
        .routes(routes!(get_metrics))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    let (router, doc) = OpenApiRouter::with_openapi(<crate::openapi::AgentDoc as utoipa::OpenApi>::openapi())
        .nest("/v1", v1)
        .merge(metrics)
        .routes(routes!(healthz))
        .routes(routes!(get_openapi))
        .split_for_parts();
    let _ = OPENAPI.set(serde_json::to_value(&doc).expect("the document serialises"));
    let app = router
        .fallback(shelfsync_node::http::no_route)
        .method_not_allowed_fallback(|| async { shelfsync_node::http::method_not_allowed() })
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(middleware::from_fn_with_state(state.guard.clone(), crate::guard::check))
        // Outermost, so the guard's 403/429 and anything axum makes leave as JSON too.
        .layer(middleware::from_fn(shelfsync_node::http::json_errors))
        .layer(middleware::from_fn_with_state(state.metrics.http.clone(), shelfsync_node::observe::track_http));
    shelfsync_node::observe::with_request_log(app).with_state(state)
}

#[utoipa::path(
    get,
    path = "/healthz",
    summary = "Liveness",
    responses((status = 200, description = "Alive", body = crate::openapi::Health))
)]
async fn healthz() -> Json<serde_json::Value> {
    shelfsync_node::http::healthz().await
}

#[utoipa::path(
    get,
    path = "/openapi.json",
    summary = "This document",
    responses((status = 200, description = "OpenAPI 3.1", body = Object))
)]
async fn get_openapi() -> Json<serde_json::Value> {
    Json(OPENAPI.get().cloned().unwrap_or(serde_json::Value::Null))
}

/// The document, made once by [`router`].
static OPENAPI: std::sync::OnceLock<serde_json::Value> = std::sync::OnceLock::new();

/// The agent API's OpenAPI document (as served at `/openapi.json`).
pub fn openapi_json() -> Option<&'static serde_json::Value> {
    OPENAPI.get()
}

/// `GET /metrics`: changes recorded, commit latency, sync state, what is unsynced, the HTTP edge
/// and the process, in the Prometheus text format.
#[utoipa::path(
    get,
    path = "/metrics",
    summary = "Prometheus metrics (text exposition format)",
    responses((status = 200, description = "Metrics", body = String), (status = 401, description = "A token is configured and this request lacks it", body = crate::openapi::Error), (status = 429, description = "Over the rate limit", body = crate::openapi::Error)),
    security((), ("bearer" = []))
)]
async fn get_metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let ledger = ledger::status(&state.db).await?;
    let sync = state.sync.borrow().clone();
    Ok(crate::metrics::render(&state.metrics, ledger, sync))
}

async fn require_token(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(expected) = &state.token {
        match bearer(req.headers()) {
            Some(got) if constant_time_eq(got.as_bytes(), expected.as_bytes()) => {}
            Some(_) => return ApiError::unauthorized("bearer token is not valid for this agent").into_response(),
            None => return ApiError::unauthorized("missing Authorization: Bearer <token>").into_response(),
        }
    }
    next.run(req).await
}

impl From<LedgerError> for ApiError {
    fn from(e: LedgerError) -> Self {
        match e {
            LedgerError::IdempotencyConflict { .. } => ApiError::conflict("idempotency_conflict", e.to_string()),
            LedgerError::Invalid(m) => ApiError::invalid(m),
            LedgerError::Counter(c) => ApiError::invalid(c.to_string()),
            LedgerError::Db(d) => d.into(),
        }
    }
}

fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id).map_err(|_| ApiError::invalid(format!("id must be a UUID, got {}", quote(&truncate(id)))))
}

fn parse_sku(field: &str, sku: &str) -> Result<Sku, ApiError> {
    sku.parse().map_err(|e| ApiError::invalid(format!("{field}: {e}")))
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

/// Earliest `occurred_at` accepted: 2000-01-01T00:00:00Z. Older is a broken POS clock.
pub const OCCURRED_AT_MIN_MS: i64 = 946_684_800_000;

/// `occurred_at`: strict RFC 3339 (`2025-03-01T14:05:09Z`, `2025-03-01T15:05:09.250+01:00`),
/// from [`OCCURRED_AT_MIN_MS`] to [`ledger::OCCURRED_AT_FUTURE_MAX_MS`] after `now_ms`.
fn parse_time(at: Option<&str>, now_ms: i64) -> Result<Option<i64>, ApiError> {
    let Some(s) = at else { return Ok(None) };
    let bad = |why: String| ApiError::invalid(format!("occurred_at {why}")).with("field", "occurred_at");
    let ms =
        parse_rfc3339(s).map_err(|why| bad(format!("{} is not an RFC 3339 timestamp: {why}", quote(&truncate(s)))))?;
    if ms < OCCURRED_AT_MIN_MS {
        return Err(bad(format!("{} is before 2000-01-01T00:00:00Z", quote(&truncate(s)))));
    }
    if ms > now_ms.saturating_add(ledger::OCCURRED_AT_FUTURE_MAX_MS) {
        return Err(bad(format!("{} is more than 24 hours in the future", quote(&truncate(s)))));
    }
    Ok(Some(ms))
}

/// Strict RFC 3339, one parser for the agent and the hub (moved to `shared::fmt`).
pub use shelfsync_shared::fmt::parse_rfc3339;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct LineBody {
    sku: String,
    qty: i64,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct LinesBody {
    /// The idempotency key (or send it as the `Idempotency-Key` header).
    id: Option<String>,
    lines: Vec<LineBody>,
    occurred_at: Option<String>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct AdjustmentBody {
    /// The idempotency key (or send it as the `Idempotency-Key` header).
    id: Option<String>,
    sku: String,
    delta: i64,
    /// A reason code: damaged, theft, expired, lost, internal_use, returned_to_vendor,
    /// transit_loss, found, correction or other.
    reason: String,
    /// Free text (required with `other`).
    note: Option<String>,
    occurred_at: Option<String>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct CountBody {
    /// The idempotency key (or send it as the `Idempotency-Key` header).
    id: Option<String>,
    sku: String,
    counted: i64,
    occurred_at: Option<String>,
}

/// An adjustment with its reason code checked against the delta's sign.
fn adjustment(sku: Sku, delta: i64, reason: &str, note: Option<String>) -> Result<Change, ApiError> {
    let reason = shelfsync_node::http::adjustment_reason(delta, reason, note)?;
    Ok(Change::Adjustment { sku, delta, reason: reason.to_stored() })
}

fn parse_lines(lines: &[LineBody]) -> Result<Vec<Line>, ApiError> {
    if lines.len() > shelfsync_shared::qty::LINES_MAX {
        return Err(ApiError::invalid(format!(
            "lines has {} entries; the limit is {}",
            lines.len(),
            shelfsync_shared::qty::LINES_MAX
        )));
    }
    lines
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let sku = parse_sku(&format!("lines[{i}].sku"), &l.sku)?;
            let max = shelfsync_shared::qty::LINE_QTY_MAX;
            if l.qty < 1 || l.qty as u64 > max {
                return Err(ApiError::invalid(format!("lines[{i}].qty must be between 1 and {max}, got {}", l.qty)));
            }
            Ok(Line { sku, qty: l.qty as u64 })
        })
        .collect()
}

async fn record(state: &AppState, req: RecordRequest) -> Result<Response, ApiError> {
    let (kind, sold) = match &req.change {
        Change::Sale { lines } => ("sale", lines.iter().map(|l| l.qty).sum()),
        Change::Return { .. } => ("return", 0),
        Change::Adjustment { .. } => ("adjustment", 0),
        Change::Count { .. } => ("count", 0),
    };
    let (outcome, response) = ledger::record(&state.db, req).await?;
    state.metrics.change(kind, outcome == Outcome::Created, sold);
    // Every POS call: DEBUG, so a busy store's INFO log stays readable.
    tracing::debug!(kind, created = outcome == Outcome::Created, "change recorded");
    let status = match outcome {
        Outcome::Created => StatusCode::CREATED,
        Outcome::Replayed => StatusCode::OK,
    };
    Ok((status, Json(response)).into_response())
}

#[utoipa::path(
    post,
    path = "/sales",
    summary = "Record a sale (one transaction for all lines)",
    request_body = LinesBody,
    responses((status = 201, description = "Sale recorded (on disk)", body = crate::openapi::Recorded), (status = 200, description = "A retry: the first answer", body = crate::openapi::Recorded), (status = 409, description = "The id was used for a different request", body = crate::openapi::Error), (status = 422, description = "Invalid request (names what is wrong)", body = crate::openapi::Error), (status = 401, description = "A token is configured and this request lacks it", body = crate::openapi::Error), (status = 429, description = "Over the rate limit", body = crate::openapi::Error)),
    security((), ("bearer" = []))
)]
async fn post_sale(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<LinesBody>,
) -> Result<Response, ApiError> {
    let key = required_key(body.id.as_deref(), &headers)?;
    let change = Change::Sale { lines: parse_lines(&body.lines)? };
    let req = RecordRequest::new(&key, change, parse_time(body.occurred_at.as_deref(), now_ms())?);
    record(&state, req).await
}

#[utoipa::path(
    post,
    path = "/returns",
    summary = "Record a return",
    request_body = LinesBody,
    responses((status = 201, description = "Return recorded (on disk)", body = crate::openapi::Recorded), (status = 200, description = "A retry: the first answer", body = crate::openapi::Recorded), (status = 409, description = "The id was used for a different request", body = crate::openapi::Error), (status = 422, description = "Invalid request (names what is wrong)", body = crate::openapi::Error), (status = 401, description = "A token is configured and this request lacks it", body = crate::openapi::Error), (status = 429, description = "Over the rate limit", body = crate::openapi::Error)),
    security((), ("bearer" = []))
)]
async fn post_return(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<LinesBody>,
) -> Result<Response, ApiError> {
    let key = required_key(body.id.as_deref(), &headers)?;
    let change = Change::Return { lines: parse_lines(&body.lines)? };
    let req = RecordRequest::new(&key, change, parse_time(body.occurred_at.as_deref(), now_ms())?);
    record(&state, req).await
}

#[utoipa::path(
    post,
    path = "/adjustments",
    summary = "Record an adjustment (damaged, found, ...) with a reason",
    request_body = AdjustmentBody,
    responses((status = 201, description = "Adjustment recorded (on disk)", body = crate::openapi::Recorded), (status = 200, description = "A retry: the first answer", body = crate::openapi::Recorded), (status = 409, description = "The id was used for a different request", body = crate::openapi::Error), (status = 422, description = "Invalid request (names what is wrong)", body = crate::openapi::Error), (status = 401, description = "A token is configured and this request lacks it", body = crate::openapi::Error), (status = 429, description = "Over the rate limit", body = crate::openapi::Error)),
    security((), ("bearer" = []))
)]
async fn post_adjustment(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<AdjustmentBody>,
) -> Result<Response, ApiError> {
    let key = required_key(body.id.as_deref(), &headers)?;
    let change = adjustment(parse_sku("sku", &body.sku)?, body.delta, &body.reason, body.note)?;
    let req = RecordRequest::new(&key, change, parse_time(body.occurred_at.as_deref(), now_ms())?);
    record(&state, req).await
}

#[utoipa::path(
    post,
    path = "/counts",
    summary = "Record a physical count",
    request_body = CountBody,
    responses((status = 201, description = "Count recorded (on disk)", body = crate::openapi::Recorded), (status = 200, description = "A retry: the first answer", body = crate::openapi::Recorded), (status = 409, description = "The id was used for a different request", body = crate::openapi::Error), (status = 422, description = "Invalid request (names what is wrong)", body = crate::openapi::Error), (status = 401, description = "A token is configured and this request lacks it", body = crate::openapi::Error), (status = 429, description = "Over the rate limit", body = crate::openapi::Error)),
    security((), ("bearer" = []))
)]
async fn post_count(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<CountBody>,
) -> Result<Response, ApiError> {
    let key = required_key(body.id.as_deref(), &headers)?;
    let change = Change::Count { sku: parse_sku("sku", &body.sku)?, counted: body.counted };
    let req = RecordRequest::new(&key, change, parse_time(body.occurred_at.as_deref(), now_ms())?);
    record(&state, req).await
}

/// One change of a batch.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum BatchItem {
    /// A physical count.
    Count { sku: String, counted: i64, occurred_at: Option<String> },
    /// An adjustment with a reason code.
    Adjustment { sku: String, delta: i64, reason: String, note: Option<String>, occurred_at: Option<String> },
    /// A sale.
    Sale { lines: Vec<LineBody>, occurred_at: Option<String> },
    /// A return.
    Return { lines: Vec<LineBody>, occurred_at: Option<String> },
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct BatchBody {
    /// The batch's idempotency key (or send it as the `Idempotency-Key` header).
    id: Option<String>,
    /// Default `occurred_at` of the items that do not say (a stocktake's time).
    occurred_at: Option<String>,
    /// 1 to 100 changes.
    items: Vec<BatchItem>,
}

/// Parses item `i` of a batch; errors name `items[i]`.
fn batch_item(i: usize, item: BatchItem, default_at: Option<i64>, now: i64) -> Result<(Change, Option<i64>), ApiError> {
    let at = |s: Option<String>| -> Result<Option<i64>, ApiError> { Ok(parse_time(s.as_deref(), now)?.or(default_at)) };
    let named = |e: ApiError| {
        let mut e = e;
        e.message = format!("items[{i}]: {}", e.message);
        e.with("item", i)
    };
    let (change, occurred) = match item {
        BatchItem::Count { sku, counted, occurred_at } => {
            (Change::Count { sku: parse_sku("sku", &sku).map_err(named)?, counted }, at(occurred_at).map_err(named)?)
        }
        BatchItem::Adjustment { sku, delta, reason, note, occurred_at } => {
            let sku = parse_sku("sku", &sku).map_err(named)?;
            (adjustment(sku, delta, &reason, note).map_err(named)?, at(occurred_at).map_err(named)?)
        }
        BatchItem::Sale { lines, occurred_at } => {
            (Change::Sale { lines: parse_lines(&lines).map_err(named)? }, at(occurred_at).map_err(named)?)
        }
        BatchItem::Return { lines, occurred_at } => {
            (Change::Return { lines: parse_lines(&lines).map_err(named)? }, at(occurred_at).map_err(named)?)
        }
    };
    Ok((change, occurred))
}

#[utoipa::path(
    post,
    path = "/batch",
    summary = "Record up to 100 counts, adjustments, sales and returns in one transaction (all or none), under one idempotency key",
    request_body = BatchBody,
    responses((status = 201, description = "All recorded (on disk)", body = crate::openapi::BatchRecorded), (status = 200, description = "A retry: the first answer", body = crate::openapi::BatchRecorded), (status = 409, description = "The key was used for a different request", body = crate::openapi::Error), (status = 422, description = "An item is invalid (named items[i]); nothing was recorded", body = crate::openapi::Error), (status = 401, description = "A token is configured and this request lacks it", body = crate::openapi::Error), (status = 429, description = "Over the rate limit", body = crate::openapi::Error)),
    security((), ("bearer" = []))
)]
async fn post_batch(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<BatchBody>,
) -> Result<Response, ApiError> {
    let key = required_key(body.id.as_deref(), &headers)?;
    let now = now_ms();
    if body.items.len() > ledger::BATCH_MAX {
        return Err(ApiError::invalid(format!(
            "items has {} entries; the limit is {}",
            body.items.len(),
            ledger::BATCH_MAX
        )));
    }
    let default_at = parse_time(body.occurred_at.as_deref(), now)?;
    let items = body
        .items
        .into_iter()
        .enumerate()
        .map(|(i, item)| batch_item(i, item, default_at, now))
        .collect::<Result<Vec<_>, _>>()?;
    let (outcome, response) = ledger::record_batch(&state.db, ledger::BatchRequest { key, items }).await?;
    if outcome == Outcome::Created {
        for r in &response.items {
            let sold = if r.kind == shelfsync_shared::EventKind::Sale {
                r.lines.iter().map(|l| l.delta.unsigned_abs()).sum()
            } else {
                0
            };
            state.metrics.change(r.kind.as_str(), true, sold);
        }
    }
    tracing::debug!(items = response.items.len(), created = outcome == Outcome::Created, "batch recorded");
    let status = if outcome == Outcome::Created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(response)).into_response())
}

#[utoipa::path(
    get,
    path = "/stock/{sku}",
    summary = "One SKU's stock here",
    params(("sku" = String, Path, description = "The SKU")),
    responses((status = 200, description = "Figures", body = crate::openapi::Stock), (status = 404, description = "Unknown here: not in the catalog and never stocked", body = crate::openapi::Error), (status = 422, description = "Invalid request (names what is wrong)", body = crate::openapi::Error), (status = 401, description = "A token is configured and this request lacks it", body = crate::openapi::Error), (status = 429, description = "Over the rate limit", body = crate::openapi::Error)),
    security((), ("bearer" = []))
)]
async fn get_stock(State(state): State<AppState>, ApiPath(sku): ApiPath<String>) -> Result<Response, ApiError> {
    let sku = parse_sku("sku", &sku)?;
    match ledger::stock(&state.db, sku.clone()).await? {
        Some(view) => Ok(Json(view).into_response()),
        None => Err(ApiError::not_found(format!(
            "sku {sku} is unknown here: not in this store's catalog and never stocked at this store"
        ))),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PageQuery {
    after: Option<String>,
    limit: Option<usize>,
}

#[derive(Serialize)]
struct StockPage {
    items: Vec<ledger::StockView>,
    next: Option<String>,
}

#[utoipa::path(
    get,
    path = "/stock",
    summary = "This store's stock, a page by SKU",
    params(("after" = Option<String>, Query, description = "The previous page's next"), ("limit" = Option<usize>, Query, description = "1..1000")),
    responses((status = 200, description = "A page", body = crate::openapi::StockPage), (status = 422, description = "Invalid request (names what is wrong)", body = crate::openapi::Error), (status = 401, description = "A token is configured and this request lacks it", body = crate::openapi::Error), (status = 429, description = "Over the rate limit", body = crate::openapi::Error)),
    security((), ("bearer" = []))
)]
async fn get_stock_page(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<StockPage>, ApiError> {
    let limit = shelfsync_node::http::page_limit(q.limit, STOCK_PAGE_DEFAULT, STOCK_PAGE_MAX)?;
    let after = q.after.as_deref().map(|s| parse_sku("after", s)).transpose()?;
    let items = ledger::stock_page(&state.db, after, limit + 1).await?;
    let (items, next) = shelfsync_node::http::page(items, limit, |v| v.sku.to_string());
    Ok(Json(StockPage { items, next }))
}

#[utoipa::path(
    get,
    path = "/status",
    summary = "The ledger and the link to the hub",
    responses((status = 200, description = "Status", body = crate::openapi::Status), (status = 401, description = "A token is configured and this request lacks it", body = crate::openapi::Error), (status = 429, description = "Over the rate limit", body = crate::openapi::Error)),
    security((), ("bearer" = []))
)]
async fn get_status(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let ledger = ledger::status(&state.db).await?;
    let id = state.db.identity();
    let sync = state.sync.borrow().clone();
    Ok(Json(json!({
        "store": id.store,
        "writer": id.writer,
        "incarnation_started_at": shelfsync_shared::rfc3339(id.incarnation_started_ms),
        "skus": ledger.skus,
        "journal_events": ledger.journal_events,
        "unsynced_changes": ledger.unsynced_changes,
        "unsynced_events": ledger.unsynced_events,
        "counter_head": ledger.counter_head,
        "journal_head": ledger.journal_head,
        "last_sync_at": ledger.last_sync_ms.map(shelfsync_shared::rfc3339),
        "sync": sync,
    })))
}

#[utoipa::path(
    get,
    path = "/holds",
    summary = "Online holds to pick here, by SKU (all of them up to 4096 a page: the most a store is sent)",
    params(("after" = Option<String>, Query, description = "The previous page's next (a hold id)"), ("limit" = Option<usize>, Query, description = "1..4096 (default 4096)")),
    responses((status = 200, description = "Holds", body = crate::openapi::HoldList), (status = 422, description = "Invalid request (names what is wrong)", body = crate::openapi::Error), (status = 401, description = "A token is configured and this request lacks it", body = crate::openapi::Error), (status = 429, description = "Over the rate limit", body = crate::openapi::Error)),
    security((), ("bearer" = []))
)]
async fn get_holds(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let max = shelfsync_shared::wire::HOLDS_MAX;
    let limit = shelfsync_node::http::page_limit(q.limit, max, max)?;
    let after = q.after.as_deref().map(|a| parse_id(a).map_err(|e| e.with("parameter", "after"))).transpose()?;
    let (items, next) = shelfsync_node::http::page_after(crate::holds::list(&state.db).await?, after, limit, |h| h.id)?;
    Ok(Json(json!({ "items": items, "next": next })))
}

#[utoipa::path(
    get,
    path = "/incoming",
    summary = "Transfers on their way here from other stores (head office receives them), oldest first (all of them up to 1024 a page: the most a store is sent)",
    params(("after" = Option<String>, Query, description = "The previous page's next (a transfer id)"), ("limit" = Option<usize>, Query, description = "1..1024 (default 1024)")),
    responses((status = 200, description = "Transfers in transit to this store", body = crate::openapi::IncomingList), (status = 422, description = "Invalid request (names what is wrong)", body = crate::openapi::Error), (status = 401, description = "A token is configured and this request lacks it", body = crate::openapi::Error), (status = 429, description = "Over the rate limit", body = crate::openapi::Error)),
    security((), ("bearer" = []))
)]
async fn get_incoming(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let max = shelfsync_shared::wire::INCOMING_TRANSFERS_MAX;
    let limit = shelfsync_node::http::page_limit(q.limit, max, max)?;
    let after = q.after.as_deref().map(|a| parse_id(a).map_err(|e| e.with("parameter", "after"))).transpose()?;
    let (items, next) =
        shelfsync_node::http::page_after(crate::incoming::list(&state.db).await?, after, limit, |t| t.id)?;
    Ok(Json(json!({ "items": items, "next": next })))
}

#[utoipa::path(
    post,
    path = "/holds/{id}/fulfil",
    summary = "The store picked a hold's units (idempotent by hold id)",
    params(("id" = String, Path, description = "Hold id (UUID)")),
    responses((status = 201, description = "Picked", body = crate::openapi::Fulfilled), (status = 200, description = "A retry", body = crate::openapi::Fulfilled), (status = 404, description = "No such hold here", body = crate::openapi::Error), (status = 422, description = "Invalid request (names what is wrong)", body = crate::openapi::Error), (status = 401, description = "A token is configured and this request lacks it", body = crate::openapi::Error), (status = 429, description = "Over the rate limit", body = crate::openapi::Error)),
    security((), ("bearer" = []))
)]
async fn post_fulfil(State(state): State<AppState>, ApiPath(id): ApiPath<String>) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    match crate::holds::fulfil(&state.db, id).await? {
        Some((outcome, response)) => {
            let status = if outcome == Outcome::Created { StatusCode::CREATED } else { StatusCode::OK };
            Ok((status, Json(response)).into_response())
        }
        None => Err(ApiError::not_found(format!("no hold {id} at this store"))),
    }
}

#[utoipa::path(
    get,
    path = "/catalog/{sku}",
    summary = "A catalog entry with this store's overrides",
    params(("sku" = String, Path, description = "The SKU")),
    responses((status = 200, description = "The entry", body = crate::openapi::CatalogEntry), (status = 404, description = "Not in this store's catalog", body = crate::openapi::Error), (status = 422, description = "Invalid request (names what is wrong)", body = crate::openapi::Error), (status = 401, description = "A token is configured and this request lacks it", body = crate::openapi::Error), (status = 429, description = "Over the rate limit", body = crate::openapi::Error)),
    security((), ("bearer" = []))
)]
async fn get_catalog(
    State(state): State<AppState>,
    ApiPath(sku): ApiPath<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let sku = parse_sku("sku", &sku)?;
    let store = state.db.identity().store.clone();
    let s2 = sku.clone();
    let view = state.db.read(move |conn| shelfsync_node::catalog::view(conn, &s2, Some(&store))).await?;
    match view {
        Some(v) => Ok(Json(serde_json::to_value(v).expect("serialises"))),
        None => Err(ApiError::not_found(format!("sku {sku} is not in the catalog this store has"))),
    }
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct OverridesBody {
    safety_stock: Option<u64>,
    low_stock_threshold: Option<u64>,
    /// This store's escrow values for the SKU (over the catalog's and the chain's; absent or
    /// `{}`: none).
    #[serde(default)]
    #[schema(value_type = Option<crate::openapi::EscrowRule>)]
    escrow: shelfsync_shared::EscrowRule,
}

#[utoipa::path(
    put,
    path = "/catalog/{sku}/overrides",
    summary = "Set this store's safety stock / low-stock threshold / escrow values for a SKU",
    params(("sku" = String, Path, description = "The SKU")),
    request_body = OverridesBody,
    responses((status = 200, description = "The entry after", body = Object), (status = 422, description = "Invalid request (names what is wrong)", body = crate::openapi::Error), (status = 401, description = "A token is configured and this request lacks it", body = crate::openapi::Error), (status = 429, description = "Over the rate limit", body = crate::openapi::Error)),
    security((), ("bearer" = []))
)]
async fn put_overrides(
    State(state): State<AppState>,
    ApiPath(sku): ApiPath<String>,
    ApiJson(b): ApiJson<OverridesBody>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let sku = parse_sku("sku", &sku)?;
    let o = shelfsync_node::catalog::Overrides {
        safety_stock: b.safety_stock,
        low_stock_threshold: b.low_stock_threshold,
        escrow: b.escrow,
    };
    state.catalog.set_overrides(&state.db, &sku, o).await.map_err(|e| match e {
        shelfsync_node::catalog::CatalogError::Invalid(m) => ApiError::invalid(m),
        other => ApiError::internal(other),
    })?;
    let store = state.db.identity().store.clone();
    let s2 = sku.clone();
    let (view, overrides) = state
        .db
        .read(move |conn| {
            Ok::<_, DbError>((
                shelfsync_node::catalog::view(conn, &s2, Some(&store))?,
                shelfsync_node::catalog::store_overrides(conn, &store, &s2)?,
            ))
        })
        .await?;
    Ok(Json(match view {
        Some(v) => serde_json::to_value(v).expect("serialises"),
        None => {
            json!({"sku": sku, "overrides": overrides, "note": "not in the catalog yet; the overrides apply once it is"})
        }
    }))
}
