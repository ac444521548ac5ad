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
}

#[utoipa::path(
    get,
    path = "/v1/events",
    tag = "viewer",
    summary = "The change feed live (Server-Sent Events; ids are cursors, Last-Event-ID resumes)",
    params(("after" = Option<String>, Query, description = "Start after this cursor (default: from now)"), ("Last-Event-ID" = Option<String>, Header, description = "Resume after this cursor")),
    responses((status = 200, description = "text/event-stream of change events", body = String), (status = 429, description = "Too many open streams", body = crate::openapi::Error), (status = 422, description = "Invalid request (names what is wrong)", body = crate::openapi::Error), (status = 401, description = "No valid token", body = crate::openapi::Error)),
    security(("bearer" = []))
)]
/// `GET /v1/events`: SSE from `Last-Event-ID` (or `?after=`), else from now.
pub(crate) async fn get_events(
    State(state): State<ApiState>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<EventsQuery>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
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
            let (hub, token) = (hub.clone(), token.clone());
            async move {
                loop {
                    if let Some(ev) = buf.pop_front() {
                        cursor = ev.cursor;
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
                            buf.extend(v)
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
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// `http://` URL to POST events to (terminate TLS in a sidecar or proxy).
    pub url: String,
    /// HMAC-SHA256 key for the `X-Shelfsync-Signature` header.
    pub secret: String,
    /// Event kinds to deliver; empty = all.
    #[serde(default)]
    pub kinds: Vec<String>,
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
    let storage = hub.storage.clone();
    // A redirect is a failed delivery (logged and retried): following it would send signed
    // events wherever the endpoint, or whoever answers for it, points.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("http client");
    let mut head = storage.change_head();
    let mut cursor = loop {
        match storage.webhook_cursor(cfg.url.clone()).await {
            Ok(Some(c)) => break c,
            Ok(None) => {
                // A new endpoint starts from now rather than replaying all history.
                let now = *head.borrow();
                if storage.set_webhook_cursor(cfg.url.clone(), now).await.is_ok() {
                    break now;
                }
            }
            Err(e) => tracing::error!(url = %cfg.url, error = %e, "reading the webhook cursor"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
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

async fn deliver(hub: &Hub, client: &reqwest::Client, cfg: &WebhookConfig, ev: &ChangeEvent, backoff_max: Duration) {
    let body = serde_json::to_vec(ev).expect("events serialise");
    let sig = signature(&cfg.secret, &body);
    let mut delay = Duration::from_millis(100);
    let mut attempt = 1u32;
    loop {
        let r = client
            .post(&cfg.url)
            .header("content-type", "application/json")
            .header("x-shelfsync-event-id", ev.cursor.to_string())
            .header("x-shelfsync-event", ev.kind.as_str())
            .header("x-shelfsync-signature", &sig)
            .body(body.clone())
            .send()
            .await;
        match r {
            Ok(resp) if resp.status().is_success() => {
                Metrics::inc(&hub.metrics.webhook_deliveries_total);
                if let Ok(at) = ev.at.parse::<jiff::Timestamp>() {
                    let lag_ms = shelfsync_node::now_ms().saturating_sub(at.as_millisecond()).max(0);
                    hub.metrics.webhook_delivery_seconds.observe(lag_ms as f64 / 1000.0);
                }
                return;
            }
            Ok(resp) if resp.status().is_redirection() => {
                let to = resp.headers().get("location").and_then(|l| l.to_str().ok()).unwrap_or("").to_owned();
                tracing::warn!(url = %cfg.url, cursor = ev.cursor, status = %resp.status(), location = %to, attempt,
                    "webhook answered with a redirect, which is not followed; retrying (point the webhook at the final URL)")
            }
            Ok(resp) => {
                tracing::warn!(url = %cfg.url, cursor = ev.cursor, status = %resp.status(), attempt, "webhook refused; retrying")
            }
            Err(e) => {
                tracing::warn!(url = %cfg.url, cursor = ev.cursor, error = %e, attempt, "webhook unreachable; retrying")
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
