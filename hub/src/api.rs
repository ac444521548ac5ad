//! The hub's HTTP API (DESIGN §7): availability for the storefront, stores and stock for
//! headquarters, hub-authored restocks and transfers, metrics. Bearer tokens with roles.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use shelfsync_agent::http::{bearer, ApiError, ApiJson, ApiQuery};
use shelfsync_agent::ledger::rfc3339;
use shelfsync_shared::qty::{LINES_MAX, LINE_QTY_MAX, REASON_MAX_LEN};
use shelfsync_shared::{Sku, StockFigures, StoreId};
use uuid::Uuid;

use crate::metrics::Metrics;
use crate::state::Hub;
use crate::storage::{HubChange, HubChangeRequest, QtyLine, Role, StorageError};

/// Largest page of a store's stock.
pub const STOCK_PAGE_MAX: usize = 1000;

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    /// The hub.
    pub hub: Arc<Hub>,
    /// Most SKUs per batch availability query.
    pub max_batch_skus: usize,
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
        .route_layer(middleware::from_fn_with_state((state.clone(), Role::Viewer), require_role));
    let admin = Router::new()
        .route("/v1/restocks", post(post_restock))
        .route("/v1/transfers", post(post_transfer))
        .route_layer(middleware::from_fn_with_state((state.clone(), Role::Admin), require_role));
    Router::new()
        .merge(viewer)
        .merge(admin)
        .route("/healthz", get(shelfsync_agent::http::healthz))
        .fallback(shelfsync_agent::http::no_route)
        .method_not_allowed_fallback(|| async { shelfsync_agent::http::method_not_allowed() })
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), count_requests))
        .with_state(state)
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
    match state.hub.storage.token_role(token_hash(token)).await {
        Ok(Some(role)) if role >= min => next.run(req).await,
        Ok(Some(role)) => ApiError::forbidden(format!(
            "this endpoint needs the {} role; the token has {}",
            min.as_str(),
            role.as_str()
        ))
        .into_response(),
        Ok(None) => ApiError::unauthorized("unknown or revoked token").into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::UnknownStore(s) => ApiError::not_found(format!("unknown store {s}")),
            StorageError::Revoked(s) => ApiError::conflict("store_revoked", format!("store {s} is revoked")),
            StorageError::StoreExists(_) => ApiError::conflict("store_exists", e.to_string()),
            StorageError::IdempotencyConflict { .. } => ApiError::conflict("idempotency_conflict", e.to_string()),
            StorageError::InsufficientStock { ref store, ref sku, on_hand, .. } => {
                let (store, sku) = (store.to_string(), sku.to_string());
                ApiError::conflict("insufficient_stock", e.to_string())
                    .with("store", store)
                    .with("sku", sku)
                    .with("available", on_hand.max(0))
            }
            StorageError::Invalid(m) => ApiError::invalid(m),
            StorageError::Backend(_) | StorageError::Corrupt(_) => ApiError::internal(e),
        }
    }
}

fn parse_sku(field: &str, s: &str) -> Result<Sku, ApiError> {
    s.parse().map_err(|e| ApiError::invalid(format!("{field}: {e}")))
}

fn parse_store(field: &str, s: &str) -> Result<StoreId, ApiError> {
    s.parse().map_err(|e| ApiError::invalid(format!("{field}: {e}")))
}

/// One store's figures for a SKU.
#[derive(Serialize)]
struct StoreAvailability {
    store: StoreId,
    on_hand: i64,
    held: u64,
    available: u64,
    last_seen: Option<String>,
    connected: bool,
}

#[derive(Serialize)]
struct SkuAvailability {
    sku: Sku,
    on_hand: i64,
    held: u64,
    available: u64,
    stores: Vec<StoreAvailability>,
}

async fn availability(state: &ApiState, skus: Vec<Sku>) -> Result<Vec<SkuAvailability>, ApiError> {
    let hub = &state.hub;
    let stores = hub.storage.stores().await?;
    let info: HashMap<StoreId, (Option<i64>, Option<i64>)> =
        stores.into_iter().map(|s| (s.id, (s.revoked_at_ms, s.last_seen_ms))).collect();
    let rows = hub.storage.stock_of(skus.clone()).await?;
    let mut by_sku: BTreeMap<Sku, Vec<StoreAvailability>> = skus.iter().map(|s| (s.clone(), Vec::new())).collect();
    for row in rows {
        let Some((revoked, last_seen)) = info.get(&row.store) else { continue };
        if revoked.is_some() {
            continue; // a revoked store offers nothing online
        }
        let f = StockFigures { on_hand: row.on_hand, held: 0, safety_stock: 0 };
        by_sku.entry(row.sku.clone()).or_default().push(StoreAvailability {
            connected: hub.live(&row.store).is_some(),
            store: row.store,
            on_hand: f.on_hand,
            held: f.held,
            available: f.available(),
            last_seen: last_seen.map(rfc3339),
        });
    }
    Ok(skus
        .into_iter()
        .map(|sku| {
            let stores = by_sku.remove(&sku).unwrap_or_default();
            SkuAvailability {
                on_hand: stores.iter().map(|s| s.on_hand).fold(0i64, i64::saturating_add),
                held: stores.iter().map(|s| s.held).sum(),
                available: stores.iter().map(|s| s.available).fold(0u64, u64::saturating_add),
                stores,
                sku,
            }
        })
        .collect())
}

async fn get_availability(State(state): State<ApiState>, Path(sku): Path<String>) -> Result<Json<Value>, ApiError> {
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
            return Err(ApiError::invalid(format!("unknown query parameter {k:?}; use sku=A&sku=B")));
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
            json!({
                "id": s.id,
                "connected": live.is_some(),
                "connected_since": live.map(|l| rfc3339(l.since_ms)),
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
    Path(id): Path<String>,
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
    let items: Vec<Value> = rows
        .into_iter()
        .map(|r| {
            let f = StockFigures { on_hand: r.on_hand, held: 0, safety_stock: 0 };
            json!({"sku": r.sku, "on_hand": f.on_hand, "held": f.held, "available": f.available()})
        })
        .collect();
    Ok(Json(json!({"store": store, "items": items, "next": next})))
}

async fn get_metrics(State(state): State<ApiState>) -> Response {
    ([("content-type", "text/plain; version=0.0.4")], state.hub.metrics.render()).into_response()
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
    Uuid::parse_str(id)
        .map_err(|_| ApiError::invalid(format!("id must be a UUID, got {:?}", id.chars().take(64).collect::<String>())))
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
    let outcome = state.hub.storage.hub_change(req).await?;
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
    Ok((status, Json(outcome.response)).into_response())
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
