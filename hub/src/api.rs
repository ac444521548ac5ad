//! The hub's HTTP API (DESIGN §7): availability for the storefront, stores and stock for
//! headquarters, hub-authored restocks and transfers, metrics. Bearer tokens with roles.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use shelfsync_node::http::{bearer, ApiBytes, ApiError, ApiJson, ApiPath, ApiQuery};
use shelfsync_shared::id::quote;
use shelfsync_shared::qty::{LINES_MAX, LINE_QTY_MAX, REASON_MAX_LEN};
use shelfsync_shared::rfc3339;
use shelfsync_shared::{Sku, StoreId};
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

/// The router, apart from `main` so tests can drive it.
pub fn router(state: ApiState, max_body_bytes: usize) -> Router {
    let viewer = Router::new()
        .route("/v1/availability", get(get_availability_batch))
        .route("/v1/availability/{sku}", get(get_availability))
        .route("/v1/stores", get(get_stores))
        .route("/v1/stores/{id}/stock", get(get_store_stock))
        .route("/metrics", get(get_metrics))
        .route("/v1/conflicts", get(get_conflicts))
        .route("/v1/catalog", get(get_catalog_page))
        .route("/v1/catalog/{sku}", get(get_catalog_item))
        .route("/v1/changes", get(get_changes))
        .route("/v1/events", get(crate::feed::get_events))
        .route_layer(middleware::from_fn_with_state((state.clone(), Role::Viewer), require_role));
    let storefront = Router::new()
        .route("/v1/reservations", post(post_reservation))
        .route("/v1/reservations/{id}", get(get_reservation).delete(delete_reservation))
        .route("/v1/reservations/{id}/commit", post(post_commit))
        .route("/v1/reservations/{id}/extend", post(post_extend))
        .route_layer(middleware::from_fn_with_state((state.clone(), Role::Storefront), require_role));
    let admin = Router::new()
        .route("/v1/restocks", post(post_restock))
        .route("/v1/transfers", post(post_transfer))
        .route("/v1/catalog/{sku}", axum::routing::put(put_catalog_item).patch(patch_catalog_item))
        .route("/v1/catalog-imports", post(post_catalog_import).layer(DefaultBodyLimit::max(CATALOG_IMPORT_MAX_BYTES)))
        .route("/v1/tokens", get(get_tokens).post(post_token))
        .route("/v1/tokens/{id}", axum::routing::delete(delete_token))
        .route_layer(middleware::from_fn_with_state((state.clone(), Role::Admin), require_role));
    let app = Router::new()
        .merge(viewer)
        .merge(storefront)
        .merge(admin)
        .route("/healthz", get(shelfsync_node::http::healthz))
        .route("/", get(dashboard))
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

async fn require_role(State((state, min)): State<(ApiState, Role)>, req: Request, next: Next) -> Response {
    let Some(token) = bearer(req.headers()) else {
        return ApiError::unauthorized("missing Authorization: Bearer <token>").into_response();
    };
    match state.hub.authenticate(token).await {
        Ok(Verdict::Valid(t)) if t.role >= min => {
            shelfsync_node::observe::record_token_name(&t.name);
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

#[derive(Serialize)]
struct StoreAvailability {
    store: StoreId,
    on_hand: i64,
    held: u64,
    safety_stock: u64,
    raw_available: u64,
    staleness_discount: u64,
    available: u64,
    last_seen: Option<String>,
    silent_secs: i64,
    connected: bool,
}

#[derive(Serialize)]
struct SkuAvailability {
    sku: Sku,
    on_hand: i64,
    held: u64,
    raw_available: u64,
    available: u64,
    stores: Vec<StoreAvailability>,
}

async fn availability(state: &ApiState, skus: Vec<Sku>) -> Result<Vec<SkuAvailability>, ApiError> {
    let now = shelfsync_node::now_ms();
    let rows = state.hub.storage.availability(skus, now).await?;
    Ok(rows
        .into_iter()
        .map(|(sku, figs)| {
            let stores: Vec<StoreAvailability> = figs
                .into_iter()
                .map(|f| StoreAvailability {
                    connected: state.hub.live(&f.store).is_some(),
                    store: f.store,
                    on_hand: f.on_hand,
                    held: f.held,
                    safety_stock: f.safety_stock,
                    raw_available: f.raw_available,
                    staleness_discount: f.staleness_discount,
                    available: f.available,
                    last_seen: f.last_seen_ms.map(rfc3339),
                    silent_secs: f.silent_ms / 1000,
                })
                .collect();
            SkuAvailability {
                on_hand: stores.iter().map(|s| s.on_hand).fold(0i64, i64::saturating_add),
                held: stores.iter().map(|s| s.held).fold(0u64, u64::saturating_add),
                raw_available: stores.iter().map(|s| s.raw_available).fold(0u64, u64::saturating_add),
                available: stores.iter().map(|s| s.available).fold(0u64, u64::saturating_add),
                stores,
                sku,
            }
        })
        .collect())
}

async fn get_availability(
    State(state): State<ApiState>,
    ApiPath(sku): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let sku = parse_sku("sku", &sku)?;
    let mut all = availability(&state, vec![sku]).await?;
    Ok(Json(serde_json::to_value(all.remove(0)).expect("serialises")))
}

async fn get_availability_batch(
    State(state): State<ApiState>,
    ApiQuery(q): ApiQuery<Vec<(String, String)>>,
) -> Result<Json<Value>, ApiError> {
    let mut skus = Vec::new();
    for (k, v) in q {
        if k != "sku" {
            return Err(ApiError::invalid(format!("unknown query parameter {}; use sku=A&sku=B", quote(&k))));
        }
        let sku = parse_sku("sku", &v)?;
        if !skus.contains(&sku) {
            skus.push(sku);
        }
    }
    if skus.is_empty() {
        return Err(ApiError::invalid("give at least one sku=... parameter"));
    }
    if skus.len() > state.max_batch_skus {
        return Err(ApiError::invalid(format!("{} skus asked; the limit is {}", skus.len(), state.max_batch_skus)));
    }
    let items = availability(&state, skus).await?;
    Ok(Json(json!({ "items": items })))
}

async fn get_stores(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let stores = state.hub.storage.stores().await?;
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
    Ok(Json(json!({ "items": items })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PageQuery {
    after: Option<String>,
    limit: Option<usize>,
}

async fn get_store_stock(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<Value>, ApiError> {
    let store = parse_store("store", &id)?;
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > STOCK_PAGE_MAX {
        return Err(ApiError::invalid(format!("limit must be between 1 and {STOCK_PAGE_MAX}, got {limit}")));
    }
    let after = q.after.as_deref().map(|s| parse_sku("after", s)).transpose()?;
    let rows = state.hub.storage.store_stock(store.clone(), after, limit).await?;
    let next = (rows.len() == limit).then(|| rows.last().map(|r| r.sku.to_string())).flatten();
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
            json!({"sku": r.sku, "on_hand": r.on_hand, "held": held, "available": available})
        })
        .collect();
    Ok(Json(json!({"store": store, "items": items, "next": next})))
}

/// The dashboard page (static; it asks for a token and calls the API with it).
async fn dashboard() -> axum::response::Html<&'static str> {
    axum::response::Html(include_str!("dashboard.html"))
}

async fn get_metrics(State(state): State<ApiState>) -> Result<Response, ApiError> {
    let (stores, unacked, conflicts_open) = state.hub.storage.metrics_snapshot().await?;
    let now_ms = shelfsync_node::now_ms();
    let stores = stores
        .iter()
        .zip(unacked)
        .map(|(s, unacked_entries)| crate::metrics::StoreGauge {
            store: s.id.to_string(),
            connected: state.hub.live(&s.id).is_some(),
            last_seen_age_secs: s.last_seen_ms.map(|t| (now_ms - t).max(0) as f64 / 1000.0),
            unacked_entries,
            revoked: s.revoked_at_ms.is_some(),
        })
        .collect();
    let feed_head = *state.hub.storage.change_head().borrow();
    let snapshot = crate::metrics::Snapshot { stores, conflicts_open, feed_head };
    Ok(crate::metrics::render(&state.hub.metrics, snapshot))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LineBody {
    sku: String,
    qty: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RestockBody {
    id: String,
    store: String,
    lines: Vec<LineBody>,
    reason: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TransferBody {
    id: String,
    from: String,
    to: String,
    lines: Vec<LineBody>,
    reason: Option<String>,
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

fn check_reason(reason: &Option<String>) -> Result<(), ApiError> {
    match reason {
        Some(r) if r.len() > REASON_MAX_LEN => {
            Err(ApiError::invalid(format!("reason is {} bytes long; the limit is {REASON_MAX_LEN}", r.len())))
        }
        _ => Ok(()),
    }
}

async fn hub_change(state: &ApiState, req: HubChangeRequest) -> Result<Response, ApiError> {
    let outcome = state.hub.storage.hub_change(req, shelfsync_node::now_ms()).await?;
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
    Ok((status, Json(outcome.response.to_json())).into_response())
}

async fn post_restock(State(state): State<ApiState>, ApiJson(b): ApiJson<RestockBody>) -> Result<Response, ApiError> {
    check_reason(&b.reason)?;
    let req = HubChangeRequest {
        id: parse_id(&b.id)?,
        change: HubChange::Restock { store: parse_store("store", &b.store)?, lines: parse_lines(&b.lines)? },
        reason: b.reason,
    };
    hub_change(&state, req).await
}

async fn post_transfer(State(state): State<ApiState>, ApiJson(b): ApiJson<TransferBody>) -> Result<Response, ApiError> {
    check_reason(&b.reason)?;
    let (from, to) = (parse_store("from", &b.from)?, parse_store("to", &b.to)?);
    if from == to {
        return Err(ApiError::invalid("from and to must be different stores"));
    }
    let req = HubChangeRequest {
        id: parse_id(&b.id)?,
        change: HubChange::Transfer { from, to, lines: parse_lines(&b.lines)? },
        reason: b.reason,
    };
    hub_change(&state, req).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReservationBody {
    id: String,
    lines: Vec<LineBody>,
    ttl_secs: Option<u64>,
    pickup_store: Option<String>,
    customer: Option<String>,
}

fn check_ttl(state: &ApiState, ttl: Option<u64>) -> Result<u64, ApiError> {
    let r = &state.reservations;
    let ttl = ttl.unwrap_or(r.default_ttl_secs);
    if ttl == 0 || ttl > r.max_ttl_secs {
        return Err(ApiError::invalid(format!("ttl_secs must be between 1 and {}, got {ttl}", r.max_ttl_secs)));
    }
    Ok(ttl)
}

async fn post_reservation(
    State(state): State<ApiState>,
    ApiJson(b): ApiJson<ReservationBody>,
) -> Result<Response, ApiError> {
    let id = parse_id(&b.id)?;
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
    let req = shelfsync_hub_core::ReservationRequest { id, lines, ttl_secs, pickup_store, customer: b.customer };
    let w = counted(&state, "create", state.hub.storage.create_reservation(req, shelfsync_node::now_ms()).await)?;
    state.hub.holds_changed(&w.stores);
    let status = if w.created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(w.view.to_json())).into_response())
}

async fn get_reservation(State(state): State<ApiState>, ApiPath(id): ApiPath<String>) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&id)?;
    match state.hub.storage.reservation(id).await? {
        Some(v) => Ok(Json(v.to_json())),
        None => Err(ApiError::not_found(format!("no reservation {id}"))),
    }
}

fn idempotency_key(headers: &axum::http::HeaderMap) -> Result<Option<String>, ApiError> {
    match headers.get("idempotency-key") {
        None => Ok(None),
        Some(v) => {
            let k = v.to_str().map_err(|_| ApiError::invalid("Idempotency-Key must be ASCII"))?;
            if k.is_empty() || k.len() > 128 {
                return Err(ApiError::invalid("Idempotency-Key must be 1 to 128 characters"));
            }
            Ok(Some(k.to_owned()))
        }
    }
}

async fn act(
    state: &ApiState,
    id: &str,
    action: shelfsync_hub_core::Action,
    headers: &axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    let id = parse_id(id)?;
    let key = idempotency_key(headers)?;
    let name = match action {
        shelfsync_hub_core::Action::Extend { .. } => "extend",
        shelfsync_hub_core::Action::Commit => "commit",
        shelfsync_hub_core::Action::Release => "release",
    };
    let w = counted(state, name, state.hub.storage.act(id, action, key, shelfsync_node::now_ms()).await)?;
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

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ExtendBody {
    ttl_secs: Option<u64>,
}

async fn post_extend(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
    headers: axum::http::HeaderMap,
    ApiJson(b): ApiJson<ExtendBody>,
) -> Result<Response, ApiError> {
    let ttl_secs = check_ttl(&state, b.ttl_secs)?;
    act(&state, &id, shelfsync_hub_core::Action::Extend { ttl_secs }, &headers).await
}

async fn post_commit(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    act(&state, &id, shelfsync_hub_core::Action::Commit, &headers).await
}

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
    limit: Option<usize>,
}

async fn get_conflicts(
    State(state): State<ApiState>,
    ApiQuery(q): ApiQuery<ConflictQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > 1000 {
        return Err(ApiError::invalid(format!("limit must be between 1 and 1000, got {limit}")));
    }
    if let Some(s) = &q.status {
        if s != "open" && s != "resolved" {
            return Err(ApiError::invalid(format!("status must be open or resolved, got {}", quote(s))));
        }
    }
    let filter = crate::storage::ConflictFilter {
        store: q.store.as_deref().map(|s| parse_store("store", s)).transpose()?,
        sku: q.sku.as_deref().map(|s| parse_sku("sku", s)).transpose()?,
        status: q.status.as_deref().and_then(shelfsync_hub_core::ConflictStatus::parse),
        limit,
    };
    let items: Vec<Value> = state.hub.storage.conflicts(filter).await?.iter().map(|c| c.to_json()).collect();
    Ok(Json(json!({ "items": items })))
}

/// Largest page of the change feed.
pub const CHANGES_PAGE_MAX: usize = 1000;

/// Largest change cursor (cursors are SQLite integers).
pub const CURSOR_MAX: u64 = i64::MAX as u64;

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
}

async fn get_changes(
    State(state): State<ApiState>,
    ApiQuery(q): ApiQuery<ChangesQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > CHANGES_PAGE_MAX {
        return Err(ApiError::invalid(format!("limit must be between 1 and {CHANGES_PAGE_MAX}, got {limit}")));
    }
    let after = q.after.as_deref().map(|a| parse_cursor("after", a)).transpose()?.unwrap_or(0);
    let items = state.hub.storage.changes_after(after, limit).await?;
    let next = items.last().map(|e| e.cursor).unwrap_or(after);
    Ok(Json(json!({ "items": items, "next": next })))
}

/// Largest CSV import body.
pub const CATALOG_IMPORT_MAX_BYTES: usize = 32 << 20;

fn catalog_error(e: StorageError) -> ApiError {
    match e {
        StorageError::Invalid(m) => ApiError::invalid(m),
        other => other.into(),
    }
}

async fn get_catalog_page(
    State(state): State<ApiState>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > STOCK_PAGE_MAX {
        return Err(ApiError::invalid(format!("limit must be between 1 and {STOCK_PAGE_MAX}, got {limit}")));
    }
    let after = q.after.as_deref().map(|s| parse_sku("after", s)).transpose()?;
    let items = state.hub.storage.catalog_page(after, limit).await?;
    let next = (items.len() == limit).then(|| items.last().map(|v| v.sku.to_string())).flatten();
    Ok(Json(json!({ "items": items, "next": next })))
}

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

#[derive(Deserialize)]
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
}

fn yes() -> bool {
    true
}

async fn catalog_edit(state: &ApiState, sku: Sku, edit: crate::catalog::Edit) -> Result<Json<Value>, ApiError> {
    let done =
        state.hub.catalog.edit(state.hub.storage.as_ref(), vec![(sku.clone(), edit)]).await.map_err(catalog_error)?;
    state.hub.catalog_changed();
    let item = done.into_iter().next().map(|(_, i)| i);
    Ok(Json(json!({"sku": sku, "item": item})))
}

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
    };
    catalog_edit(&state, sku, crate::catalog::Edit::Put(item)).await
}

async fn patch_catalog_item(
    State(state): State<ApiState>,
    ApiPath(sku): ApiPath<String>,
    ApiJson(p): ApiJson<shelfsync_node::catalog::CatalogPatch>,
) -> Result<Json<Value>, ApiError> {
    let sku = parse_sku("sku", &sku)?;
    catalog_edit(&state, sku, crate::catalog::Edit::Patch(p)).await
}

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
    state.hub.catalog.edit(state.hub.storage.as_ref(), edits).await.map_err(catalog_error)?;
    state.hub.catalog_changed();
    Ok(Json(json!({ "imported": n })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenBody {
    role: Role,
    name: Option<String>,
    expires_in: Option<String>,
}

/// `POST /v1/tokens`: a new token; the answer carries its secret, the only time it is shown.
async fn post_token(State(state): State<ApiState>, ApiJson(b): ApiJson<TokenBody>) -> Result<Response, ApiError> {
    let name = b.name.unwrap_or_else(|| crate::tokens::DEFAULT_NAME.to_owned());
    crate::tokens::check_name(&name).map_err(ApiError::invalid)?;
    let expires_in_secs =
        b.expires_in.as_deref().map(crate::tokens::parse_expires_in).transpose().map_err(ApiError::invalid)?;
    let secret = new_token();
    let t = state
        .hub
        .storage
        .add_token(NewToken { hash: token_hash(&secret), name, role: b.role, expires_in_secs })
        .await?;
    let mut v = serde_json::to_value(t.view(shelfsync_node::now_ms())).expect("serialises");
    v["token"] = Value::String(secret);
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

/// `GET /v1/tokens`: every token, never a secret.
async fn get_tokens(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let now = shelfsync_node::now_ms();
    let items: Vec<_> = state.hub.storage.tokens().await?.iter().map(|t| t.view(now)).collect();
    Ok(Json(json!({ "items": items })))
}

/// `DELETE /v1/tokens/{id}`: revokes; the token's next request is refused.
async fn delete_token(State(state): State<ApiState>, ApiPath(id): ApiPath<String>) -> Result<Json<Value>, ApiError> {
    let id = Uuid::parse_str(&id)
        .map_err(|_| ApiError::invalid(format!("id must be a token id (a UUID), got {}", quote(&id))))?;
    match state.hub.storage.revoke_token(id).await? {
        Some(t) => Ok(Json(serde_json::to_value(t.view(shelfsync_node::now_ms())).expect("serialises"))),
        None => Err(ApiError::not_found(format!("no token {id}"))),
    }
}
