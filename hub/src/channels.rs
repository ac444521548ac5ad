//! Sales channels over the HTTP API (`hub/docs/channels.md`): head office configures them
//! (`PUT`/`DELETE /v1/channels/{id}`, admin), anyone may list them; a token bound to a channel
//! sees availability as that channel's available-to-sell and reserves for it.
//!
//! The decider keeps the channels ([`shelfsync_hub_core::Channel`] records); this module only
//! checks requests and shapes answers. On a partitioned database every partition's decider holds
//! the same channels: the front sends a change to each (`crate::partitioned`).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use shelfsync_hub_core::{Buffer, Cap, Channel, ChannelFigures, ChannelId, Fulfil, Latency};
use shelfsync_node::http::{ApiError, ApiJson, ApiPath};

use crate::api::{ApiState, Caller};

/// A channel as the API shows it: its configuration, and whether head office configured it
/// (`web` exists unconfigured, with its defaults).
#[derive(Serialize)]
pub(crate) struct ChannelView {
    #[serde(flatten)]
    channel: Channel,
    configured: bool,
}

/// `PUT /v1/channels/{id}`: the whole configuration (what is left out takes its default).
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ChannelBody {
    /// `"all"` (default), `{"stores": ["store-001", ...]}` or `"pickup"` (click-and-collect).
    #[serde(default)]
    #[schema(value_type = Value)]
    fulfil: Fulfil,
    /// `{"units": N, "share_pct": P}`: withheld per SKU, the larger of the two (default none).
    #[serde(default)]
    #[schema(value_type = Object)]
    buffer: Buffer,
    /// `{"units": N, "share_pct": P}`: at most this much per SKU, each optional (default none).
    #[serde(default)]
    #[schema(value_type = Object)]
    cap: Cap,
    /// `"live"` (default) or `{"lagged": {"lag_secs": S}}` (a marketplace listing S seconds late).
    #[serde(default)]
    #[schema(value_type = Value)]
    latency: Latency,
    /// `{"SKU": units}`: per SKU, units withheld instead of `buffer` (default none).
    #[serde(default)]
    #[schema(value_type = Object)]
    sku_buffers: std::collections::BTreeMap<shelfsync_shared::Sku, u64>,
}

pub(crate) fn parse_channel(field: &str, s: &str) -> Result<ChannelId, ApiError> {
    s.parse().map_err(|e| ApiError::invalid(format!("{field}: {e}")))
}

#[utoipa::path(
    get,
    path = "/v1/channels",
    tag = "viewer",
    summary = "Every sales channel (web included), by id",
    responses((status = 200, description = "Channels", body = crate::openapi::ChannelList), (status = 401, description = "No valid token", body = crate::openapi::Error), (status = 403, description = "The token's role may not", body = crate::openapi::Error), (status = 429, description = "Over the rate limit", body = crate::openapi::Error)),
    security(("bearer" = []))
)]
pub(crate) async fn get_channels(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let items: Vec<ChannelView> = state
        .hub
        .storage
        .channels()
        .await?
        .into_iter()
        .map(|(channel, configured)| ChannelView { channel, configured })
        .collect();
    Ok(Json(json!({ "items": items })))
}

async fn one(state: &ApiState, id: &ChannelId) -> Result<Option<ChannelView>, ApiError> {
    Ok(state
        .hub
        .storage
        .channels()
        .await?
        .into_iter()
        .find(|(c, _)| &c.id == id)
        .map(|(channel, configured)| ChannelView { channel, configured }))
}

#[utoipa::path(
    get,
    path = "/v1/channels/{id}",
    tag = "viewer",
    summary = "One sales channel",
    params(("id" = String, Path, description = "The channel id (web, app, amazon, ...)")),
    responses((status = 200, description = "The channel", body = crate::openapi::Channel), (status = 404, description = "No such channel", body = crate::openapi::Error), (status = 422, description = "Invalid request (names what is wrong)", body = crate::openapi::Error), (status = 401, description = "No valid token", body = crate::openapi::Error), (status = 403, description = "The token's role may not", body = crate::openapi::Error), (status = 429, description = "Over the rate limit", body = crate::openapi::Error)),
    security(("bearer" = []))
)]
pub(crate) async fn get_channel(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_channel("id", &id)?;
    let view = one(&state, &id).await?.ok_or_else(|| ApiError::not_found(format!("no channel {id}")))?;
    Ok(Json(serde_json::to_value(view).expect("serialises")))
}

#[utoipa::path(
    put,
    path = "/v1/channels/{id}",
    tag = "admin",
    summary = "Configure a sales channel (all of it: what is left out takes its default)",
    params(("id" = String, Path, description = "The channel id: 1 to 32 of a-z 0-9 -")),
    request_body = ChannelBody,
    responses((status = 201, description = "Added", body = crate::openapi::Channel), (status = 200, description = "Replaced", body = crate::openapi::Channel), (status = 404, description = "A listed store does not exist", body = crate::openapi::Error), (status = 422, description = "Invalid request (names what is wrong)", body = crate::openapi::Error), (status = 401, description = "No valid token", body = crate::openapi::Error), (status = 403, description = "The token's role may not", body = crate::openapi::Error), (status = 429, description = "Over the rate limit", body = crate::openapi::Error)),
    security(("bearer" = []))
)]
pub(crate) async fn put_channel(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
    ApiJson(b): ApiJson<ChannelBody>,
) -> Result<Response, ApiError> {
    let id = parse_channel("id", &id)?;
    let existed = one(&state, &id).await?.is_some_and(|v| v.configured);
    let ch =
        Channel { id, fulfil: b.fulfil, buffer: b.buffer, cap: b.cap, latency: b.latency, sku_buffers: b.sku_buffers };
    let channel = state.hub.storage.put_channel(ch, shelfsync_node::now_ms()).await?;
    tracing::info!(channel = %channel.id, "channel configured");
    let status = if existed { StatusCode::OK } else { StatusCode::CREATED };
    Ok((status, Json(serde_json::to_value(ChannelView { channel, configured: true }).expect("serialises")))
        .into_response())
}

#[utoipa::path(
    delete,
    path = "/v1/channels/{id}",
    tag = "admin",
    summary = "Remove a sales channel (not web); its tokens are refused from then on, its reservations keep its name",
    params(("id" = String, Path, description = "The channel id")),
    responses((status = 200, description = "Removed", body = crate::openapi::ChannelRemoved), (status = 404, description = "No such channel", body = crate::openapi::Error), (status = 422, description = "Invalid request, or web (names what is wrong)", body = crate::openapi::Error), (status = 401, description = "No valid token", body = crate::openapi::Error), (status = 403, description = "The token's role may not", body = crate::openapi::Error), (status = 429, description = "Over the rate limit", body = crate::openapi::Error)),
    security(("bearer" = []))
)]
pub(crate) async fn delete_channel(
    State(state): State<ApiState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_channel("id", &id)?;
    state.hub.storage.remove_channel(id.clone(), shelfsync_node::now_ms()).await?;
    tracing::info!(channel = %id, "channel removed");
    Ok(Json(json!({ "id": id, "removed": true })))
}

/// Which channels an availability answer shows, from the caller's token and the query.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) enum View {
    /// The chain's figures only (an admin or an unbound viewer asking for no channel).
    #[default]
    Chain,
    /// One channel's: `available` is its available-to-sell, the stores are its stores.
    One(ChannelId),
    /// The chain's figures with every channel's side by side.
    All,
}

impl View {
    /// The view for `caller` asking `channel=` (a channel id, or `all`). A token bound to a
    /// channel sees only its own.
    pub(crate) fn of(caller: &Caller, asked: Option<&str>) -> Result<View, ApiError> {
        let asked = match asked {
            None => None,
            Some("all") => Some(View::All),
            Some(s) => Some(View::One(parse_channel("channel", s)?)),
        };
        match (&caller.channel, asked) {
            (None, None) => Ok(View::Chain),
            (None, Some(v)) => Ok(v),
            (Some(own), None) => Ok(View::One(own.clone())),
            (Some(own), Some(View::One(c))) if &c == own => Ok(View::One(c)),
            (Some(own), Some(_)) => Err(ApiError::forbidden(format!(
                "this token belongs to channel {own}: it sees that channel's availability only"
            ))),
        }
    }

    /// The channels whose figures to ask the decider for (`None`: every one; empty: none).
    pub(crate) fn wanted(&self) -> Option<Vec<ChannelId>> {
        match self {
            View::Chain => Some(Vec::new()),
            View::One(c) => Some(vec![c.clone()]),
            View::All => None,
        }
    }
}

/// A channel's figures of one SKU, as the API shows them.
#[derive(Serialize)]
pub(crate) struct FiguresView {
    id: ChannelId,
    pool: u64,
    buffer: u64,
    lag_margin: u64,
    cap: Option<u64>,
    ats: u64,
}

impl FiguresView {
    /// What the channel may promise.
    pub(crate) fn ats(&self) -> u64 {
        self.ats
    }
}

impl From<ChannelFigures> for FiguresView {
    fn from(f: ChannelFigures) -> Self {
        FiguresView { id: f.channel, pool: f.pool, buffer: f.buffer, lag_margin: f.lag_margin, cap: f.cap, ats: f.ats }
    }
}

/// The kind of a placeholder for a feed event its reader may not see (`hidden=mark`): its
/// cursor and time only, so a reader gathering several partitions' feeds keeps its place.
pub const HIDDEN: &str = "hidden";

/// The channel a feed event is about, if any: a reservation's, a channel's figures', a
/// conflict's (`channel_oversell`).
pub(crate) fn event_channel(ev: &crate::engine::ChangeEvent) -> Option<&str> {
    let d = &ev.data;
    d["channel"]
        .as_str()
        .or_else(|| d["reservation"]["channel"].as_str())
        .or_else(|| d["conflict"]["details"]["channel"].as_str())
}

impl View {
    /// Whether a feed reader of this view sees `ev`: a channel's reader sees what is about its
    /// channel and what is about none (stock, stores, the catalog); the others see everything.
    pub(crate) fn sees(&self, ev: &crate::engine::ChangeEvent) -> bool {
        let View::One(c) = self else { return true };
        // An oversell names every channel whose promises it touched.
        if let Some(list) = ev.data["conflict"]["details"]["channels"].as_array() {
            return list.iter().any(|e| e == c.as_str());
        }
        event_channel(ev).is_none_or(|e| e == c.as_str())
    }
}

/// `ev` as a reader who may not see it gets it with `hidden=mark`.
pub(crate) fn hidden(ev: &crate::engine::ChangeEvent) -> crate::engine::ChangeEvent {
    crate::engine::ChangeEvent { cursor: ev.cursor, kind: HIDDEN.to_owned(), at: ev.at.clone(), data: Value::Null }
}
