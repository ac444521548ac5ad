//! The live change feed: Server-Sent Events whose ids are the feed's cursors (`Last-Event-ID`
//! resumes exactly where a client left off), and webhooks POSTed at least once, in order, with
//! an HMAC-SHA256 signature.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use shelfsync_node::http::{ApiError, ApiQuery};

use crate::api::{parse_cursor, ApiState};
use crate::engine::ChangeEvent;
use crate::metrics::Metrics;
use crate::state::Hub;

/// Events read from storage per round trip.
const FEED_BATCH: usize = 500;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EventsQuery {
    after: Option<String>,
    /// One channel's view (admins and unbound viewers; a channel's token has its own).
    channel: Option<String>,
}

#[utoipa::path(
    get,
    path = "/v1/events",
    tag = "viewer",
    summary = "The change feed live (Server-Sent Events; ids are cursors, Last-Event-ID resumes)",
    params(("after" = Option<String>, Query, description = "Start after this cursor (default: from now)"), ("channel" = Option<String>, Query, description = "Only what a channel's reader sees (a token bound to a channel always reads its own)"), ("Last-Event-ID" = Option<String>, Header, description = "Resume after this cursor")),
    responses((status = 200, description = "text/event-stream of change events", body = String), (status = 429, description = "Too many open streams", body = crate::openapi::Error), (status = 422, description = "Invalid request (names what is wrong)", body = crate::openapi::Error), (status = 401, description = "No valid token", body = crate::openapi::Error)),
    security(("bearer" = []))
)]
/// `GET /v1/events`: SSE from `Last-Event-ID` (or `?after=`), else from now.
pub(crate) async fn get_events(
    State(state): State<ApiState>,
    axum::Extension(caller): axum::Extension<crate::api::Caller>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<EventsQuery>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let view = crate::channels::View::of(&caller, q.channel.as_deref())?;
    let permit = state.event_streams.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(
            axum::http::StatusCode::TOO_MANY_REQUESTS,
            "too_many_streams",
            "too many open event streams; use GET /v1/changes or retry later",
        )
    })?;
    let storage = state.hub.storage.clone();
    let head = storage.change_head();
    // The stream outlives the request that opened it: its token is checked again before every
    // batch, so a revoked or expired token stops receiving events.
    let token = shelfsync_node::http::bearer(&headers).unwrap_or_default().to_owned();
    let hub = state.hub.clone();
    let start = match (headers.get("last-event-id"), q.after) {
        (Some(v), _) => {
            let v = v.to_str().map_err(|_| {
                ApiError::invalid("Last-Event-ID must be a change cursor (a whole number)")
                    .with("parameter", "Last-Event-ID")
            })?;
            parse_cursor("Last-Event-ID", v)?
        }
        (None, Some(a)) => parse_cursor("after", &a)?,
        (None, None) => *head.borrow(),
    };
    let stream = futures_util::stream::unfold(
        (start, VecDeque::<ChangeEvent>::new(), head, storage, permit),
        move |(mut cursor, mut buf, mut head, storage, permit)| {
            let (hub, token, view) = (hub.clone(), token.clone(), view.clone());
            async move {
                loop {
                    if let Some(ev) = buf.pop_front() {
                        cursor = cursor.max(ev.cursor);
                        let data = serde_json::to_string(&ev).expect("events serialise");
                        let e = Event::default().id(ev.cursor.to_string()).event(ev.kind.clone()).data(data);
                        return Some((Ok(e), (cursor, buf, head, storage, permit)));
                    }
                    // Mark the head seen before reading, so a commit between the read and the wait
                    // still wakes us.
                    head.borrow_and_update();
                    match storage.changes_after(cursor, FEED_BATCH).await {
                        Ok(v) if !v.is_empty() => {
                            match hub.authenticate(&token).await {
                                Ok(crate::tokens::Verdict::Valid(_)) => {}
                                Ok(_) => {
                                    tracing::info!("closing an event stream: its token is no longer valid");
                                    return None;
                                }
                                Err(e) => {
                                    tracing::error!(error = %e, "checking an event stream's token");
                                    return None;
                                }
                            }
                            // A channel's reader: only what it may see (the next read starts after
                            // the last event read all the same).
                            if let Some(last) = v.last() {
                                cursor = last.cursor;
                            }
                            buf.extend(v.into_iter().filter(|e| view.sees(e)))
                        }
                        Ok(_) => {
                            tokio::select! {
                                changed = head.changed() => {
                                    if changed.is_err() {
                                        return None;
                                    }
                                }
                                // The hub is stopping: end the stream cleanly; the client resumes
                                // from its last event id on the hub that comes back.
                                _ = hub.stopped() => return None,
                            }
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "reading the change feed for an SSE client");
                            return None;
                        }
                    }
                }
            }
        },
    );
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// One webhook endpoint (`[[webhooks]]` in hub.toml).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// `http://` URL to POST events to (terminate TLS in a sidecar or proxy).
    pub url: String,
    /// HMAC-SHA256 key for the `X-Shelfsync-Signature` header.
    pub secret: String,
    /// Event kinds to deliver; empty = all.
    #[serde(default)]
    pub kinds: Vec<String>,
    /// A sales channel's "set quantity to N" hook (a marketplace connector): instead of feed
    /// events it gets `channel_quantity` updates of that channel's available-to-sell per SKU,
    /// coalesced (see [`run_quantity_hook`]).
    #[serde(default)]
    pub channel: Option<String>,
    /// With `channel`: at most one update per SKU per this many seconds (default 60), the
    /// newest quantity winning.
    #[serde(default)]
    pub every_secs: Option<u64>,
    /// With `channel`: only updates that cross one of these quantities (a quantity `q` is on
    /// the side of `t` it reaches: `q >= t` or not); empty: every change.
    #[serde(default)]
    pub thresholds: Vec<u64>,
}

/// Default spacing of one SKU's quantity updates.
pub const QUANTITY_EVERY_SECS_DEFAULT: u64 = 60;
/// Longest spacing of one SKU's quantity updates (a day).
pub const QUANTITY_EVERY_SECS_MAX: u64 = 86_400;
/// Most thresholds of a quantity hook.
pub const THRESHOLDS_MAX: usize = 64;

impl WebhookConfig {
    /// Checks the channel hook's settings; the message names the field.
    pub fn check_channel(&self) -> Result<(), String> {
        let Some(c) = &self.channel else {
            if self.every_secs.is_some() || !self.thresholds.is_empty() {
                return Err("every_secs and thresholds are for a channel's quantity hook: set channel too".into());
            }
            return Ok(());
        };
        c.parse::<shelfsync_hub_core::ChannelId>().map_err(|e| format!("channel: {e}"))?;
        if !self.kinds.is_empty() {
            return Err("a channel's quantity hook sends channel_quantity updates only: leave kinds out".into());
        }
        if self.every_secs.is_some_and(|e| e == 0 || e > QUANTITY_EVERY_SECS_MAX) {
            return Err(format!("every_secs must be between 1 and {QUANTITY_EVERY_SECS_MAX}"));
        }
        if self.thresholds.len() > THRESHOLDS_MAX {
            return Err(format!("at most {THRESHOLDS_MAX} thresholds, got {}", self.thresholds.len()));
        }
        Ok(())
    }
}

/// `sha256=<hex>` of HMAC-SHA256(secret, body).
pub fn signature(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(body);
    let out = mac.finalize().into_bytes();
    format!("sha256={}", out.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

/// Delivers the feed to one endpoint forever: in order, at least once (the cursor is saved after
/// delivery), retrying with exponential backoff up to `backoff_max`.
pub async fn run_webhook(hub: Arc<Hub>, cfg: WebhookConfig, backoff_max: Duration) {
    if let Some(channel) = cfg.channel.as_deref().and_then(|c| c.parse().ok()) {
        return run_quantity_hook(hub, cfg.clone(), channel, backoff_max).await;
    }
    let storage = hub.storage.clone();
    let client = hook_client();
    let mut head = storage.change_head();
    let mut cursor = start_cursor(&hub, &cfg).await;
    hub.metrics.webhook_cursor.get_or_create(&vec![("url", cfg.url.clone())]).set(cursor as i64);
    loop {
        let now_head = *head.borrow_and_update();
        let url = vec![("url", cfg.url.clone())];
        hub.metrics.webhook_lag_events.get_or_create(&url).set(now_head.saturating_sub(cursor) as i64);
        let events = match storage.changes_after(cursor, 100).await {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(url = %cfg.url, error = %e, "reading the change feed for a webhook");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if events.is_empty() {
            if head.changed().await.is_err() {
                return;
            }
            continue;
        }
        for ev in events {
            if cfg.kinds.is_empty() || cfg.kinds.contains(&ev.kind) {
                deliver(&hub, &client, &cfg, &ev, backoff_max).await;
            }
            cursor = ev.cursor;
            hub.metrics.webhook_cursor.get_or_create(&vec![("url", cfg.url.clone())]).set(cursor as i64);
        }
        if let Err(e) = storage.set_webhook_cursor(cfg.url.clone(), cursor).await {
            tracing::error!(url = %cfg.url, error = %e, "saving the webhook cursor");
        }
    }
}

/// The webhooks' HTTP client. A redirect is a failed delivery (logged and retried): following
/// it would send signed events wherever the endpoint, or whoever answers for it, points.
fn hook_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("http client")
}

/// Where an endpoint's delivery resumes: its saved cursor, else (a new endpoint) the feed's
/// head now, rather than replaying all history.
async fn start_cursor(hub: &Hub, cfg: &WebhookConfig) -> u64 {
    let storage = &hub.storage;
    loop {
        match storage.webhook_cursor(cfg.url.clone()).await {
            Ok(Some(c)) => return c,
            Ok(None) => {
                let now = *storage.change_head().borrow();
                if storage.set_webhook_cursor(cfg.url.clone(), now).await.is_ok() {
                    return now;
                }
            }
            Err(e) => tracing::error!(url = %cfg.url, error = %e, "reading the webhook cursor"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// One SKU's state in a quantity hook.
#[derive(Default)]
struct SkuQuantity {
    /// The last quantity delivered, and when.
    sent: Option<(u64, tokio::time::Instant)>,
    /// The newest quantity not delivered yet: (quantity, its event's cursor, its time), and the
    /// cursor of the first event it stands for (the saved cursor stays before it).
    pending: Option<(u64, u64, String, u64)>,
}

/// Which side of each threshold `q` is on (how many thresholds it reaches).
fn band(thresholds: &[u64], q: u64) -> usize {
    thresholds.iter().filter(|t| q >= **t).count()
}

/// A channel's quantity hook ("set quantity to N", for a marketplace connector): follows the
/// channel's `channel_ats_changed` events and POSTs `{"channel", "sku", "quantity", "cursor",
/// "at"}` (event `channel_quantity`) per SKU: at most one per `every_secs`, the newest quantity
/// winning, and with `thresholds` only when the quantity crossed one since the last update.
/// At least once: the saved cursor never passes an event whose quantity is still to be sent
/// (after a restart the newest quantities are sent again; setting a quantity twice is harmless).
pub async fn run_quantity_hook(
    hub: Arc<Hub>,
    cfg: WebhookConfig,
    channel: shelfsync_hub_core::ChannelId,
    backoff_max: Duration,
) {
    let storage = hub.storage.clone();
    let client = hook_client();
    let every = Duration::from_secs(cfg.every_secs.unwrap_or(QUANTITY_EVERY_SECS_DEFAULT));
    let mut head = storage.change_head();
    let mut read = start_cursor(&hub, &cfg).await;
    let mut saved = read;
    let mut skus: std::collections::HashMap<String, SkuQuantity> = std::collections::HashMap::new();
    let url = vec![("url", cfg.url.clone())];
    loop {
        let now_head = *head.borrow_and_update();
        hub.metrics.webhook_lag_events.get_or_create(&url).set(now_head.saturating_sub(read) as i64);
        match storage.changes_after(read, FEED_BATCH).await {
            Ok(events) => {
                for ev in &events {
                    if ev.kind != "channel_ats_changed" || ev.data["channel"] != channel.as_str() {
                        continue;
                    }
                    let (Some(sku), Some(q)) = (ev.data["sku"].as_str(), ev.data["ats"].as_u64()) else { continue };
                    let st = skus.entry(sku.to_owned()).or_default();
                    let first = st.pending.as_ref().map_or(ev.cursor, |p| p.3);
                    st.pending = Some((q, ev.cursor, ev.at.clone(), first));
                }
                if let Some(last) = events.last() {
                    read = last.cursor;
                }
            }
            Err(e) => {
                tracing::error!(url = %cfg.url, error = %e, "reading the change feed for a quantity hook");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        }
        // Send what is due; the others wait for their SKU's spacing.
        let now = tokio::time::Instant::now();
        let mut next_due: Option<tokio::time::Instant> = None;
        for (sku, st) in skus.iter_mut() {
            let Some((q, cursor, at, _)) = st.pending.clone() else { continue };
            if let Some((_, when)) = st.sent {
                if now < when + every {
                    next_due = Some(next_due.map_or(when + every, |d| d.min(when + every)));
                    continue;
                }
            }
            let crossed = match st.sent {
                None => true,
                Some((last, _)) if cfg.thresholds.is_empty() => last != q,
                Some((last, _)) => band(&cfg.thresholds, last) != band(&cfg.thresholds, q),
            };
            if crossed {
                let body =
                    serde_json::json!({"channel": channel, "sku": sku, "quantity": q, "cursor": cursor, "at": at});
                let body = serde_json::to_vec(&body).expect("serialises");
                post_signed(&hub, &client, &cfg, cursor, "channel_quantity", &at, body, backoff_max).await;
                st.sent = Some((q, tokio::time::Instant::now()));
            }
            st.pending = None;
        }
        // Saved: up to the first event still to be sent, else everything read.
        let keep =
            skus.values().filter_map(|s| s.pending.as_ref().map(|p| p.3.saturating_sub(1))).min().unwrap_or(read);
        if keep != saved {
            match storage.set_webhook_cursor(cfg.url.clone(), keep).await {
                Ok(()) => saved = keep,
                Err(e) => tracing::error!(url = %cfg.url, error = %e, "saving the quantity hook's cursor"),
            }
            hub.metrics.webhook_cursor.get_or_create(&url).set(keep as i64);
        }
        if read < *head.borrow() {
            continue;
        }
        match next_due {
            Some(due) => {
                tokio::select! {
                    changed = head.changed() => if changed.is_err() { return },
                    _ = tokio::time::sleep_until(due) => {}
                }
            }
            None => {
                if head.changed().await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn deliver(hub: &Hub, client: &reqwest::Client, cfg: &WebhookConfig, ev: &ChangeEvent, backoff_max: Duration) {
    let body = serde_json::to_vec(ev).expect("events serialise");
    post_signed(hub, client, cfg, ev.cursor, &ev.kind, &ev.at, body, backoff_max).await
}

/// POSTs a signed body until the endpoint takes it (2xx), backing off up to `backoff_max`.
#[allow(clippy::too_many_arguments)]
async fn post_signed(
    hub: &Hub,
    client: &reqwest::Client,
    cfg: &WebhookConfig,
    id: u64,
    kind: &str,
    at: &str,
    body: Vec<u8>,
    backoff_max: Duration,
) {
    let sig = signature(&cfg.secret, &body);
    let mut delay = Duration::from_millis(100);
    let mut attempt = 1u32;
    loop {
        let r = client
            .post(&cfg.url)
            .header("content-type", "application/json")
            .header("x-shelfsync-event-id", id.to_string())
            .header("x-shelfsync-event", kind)
            .header("x-shelfsync-signature", &sig)
            .body(body.clone())
            .send()
            .await;
        match r {
            Ok(resp) if resp.status().is_success() => {
                Metrics::inc(&hub.metrics.webhook_deliveries_total);
                if let Ok(at) = at.parse::<jiff::Timestamp>() {
                    let lag_ms = shelfsync_node::now_ms().saturating_sub(at.as_millisecond()).max(0);
                    hub.metrics.webhook_delivery_seconds.observe(lag_ms as f64 / 1000.0);
                }
                return;
            }
            Ok(resp) if resp.status().is_redirection() => {
                let to = resp.headers().get("location").and_then(|l| l.to_str().ok()).unwrap_or("").to_owned();
                tracing::warn!(url = %cfg.url, cursor = id, status = %resp.status(), location = %to, attempt,
                    "webhook answered with a redirect, which is not followed; retrying (point the webhook at the final URL)")
            }
            Ok(resp) => {
                tracing::warn!(url = %cfg.url, cursor = id, status = %resp.status(), attempt, "webhook refused; retrying")
            }
            Err(e) => {
                tracing::warn!(url = %cfg.url, cursor = id, error = %e, attempt, "webhook unreachable; retrying")
            }
        }
        Metrics::inc(&hub.metrics.webhook_failures_total);
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(backoff_max);
        attempt = attempt.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn signature_is_rfc_4231_hmac_sha256() {
        // RFC 4231 test case 2.
        assert_eq!(
            super::signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
