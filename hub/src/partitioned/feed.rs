//! The change feed of a partitioned database: every partition's feed gathered and merged by
//! decision time, each partition in its own order, under positions over every partition
//! (`shelfsync_hub_core::FeedPosition`, opaque `p1.…`) that resume on any hub.

use std::time::Duration;

use shelfsync_hub_core::Partition;

use super::{error, part_json, Front, EVENTS_POLL};

/// One partition's feed event, as its API returned it, for [`shelfsync_hub_core::merge_feeds`].
struct PartEvent {
    cursor: u64,
    at_ms: i64,
    item: serde_json::Value,
}

impl shelfsync_hub_core::Positioned for PartEvent {
    fn cursor(&self) -> u64 {
        self.cursor
    }
    fn at_ms(&self) -> i64 {
        self.at_ms
    }
}

/// Every partition's feed after `from`, at most `limit` each, merged: (events each with the
/// position after it, whether that is everything committed). Events the caller may not see (a
/// channel's reader) come as `hidden` placeholders, so positions go on past them: the caller
/// drops them ([`is_hidden`]) and keeps their positions.
async fn gather_feed(
    front: &Front,
    parts: &axum::http::request::Parts,
    from: &shelfsync_hub_core::FeedPosition,
    limit: usize,
    channel: Option<&str>,
) -> Result<(Vec<(serde_json::Value, shelfsync_hub_core::FeedPosition)>, bool), axum::response::Response> {
    let channel = channel.map(|c| format!("&channel={}", super::split::segment(c))).unwrap_or_default();
    let pages = futures_util::future::join_all(front.partitions.all().map(|p| {
        let channel = &channel;
        async move {
            let path = format!("/v1/changes?after={}&limit={limit}&hidden=mark{channel}", from.get(p));
            (p, part_json(front, p, parts, &path).await)
        }
    }))
    .await;
    let (mut events, mut complete, mut total) = (Vec::with_capacity(pages.len()), true, 0);
    for (p, page) in pages {
        let page = page?;
        complete &= page["next"].is_null();
        let items = page["items"].as_array().cloned().unwrap_or_default();
        total += items.len();
        let mut part = Vec::with_capacity(items.len());
        for mut item in items {
            let cursor = item["cursor"].as_u64().unwrap_or(0);
            let at_ms = item["at"].as_str().and_then(|a| shelfsync_shared::fmt::parse_rfc3339(a).ok()).unwrap_or(0);
            item["partition"] = serde_json::json!(p);
            item["partition_cursor"] = serde_json::json!(cursor);
            part.push(PartEvent { cursor, at_ms, item });
        }
        events.push(part);
    }
    let merged = shelfsync_hub_core::merge_feeds(from, events, limit);
    let caught_up = complete && merged.len() == total;
    let out = merged
        .into_iter()
        .map(|(mut e, pos)| {
            e.item["cursor"] = serde_json::json!(pos.encode());
            (e.item, pos)
        })
        .collect();
    Ok((out, caught_up))
}

/// A placeholder for an event the caller may not see.
fn is_hidden(item: &serde_json::Value) -> bool {
    item["kind"] == crate::channels::HIDDEN
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ChangesQuery {
    after: Option<String>,
    limit: Option<usize>,
    channel: Option<String>,
}

/// The position a client gave as `what`.
fn position(front: &Front, what: &str, s: &str) -> Result<shelfsync_hub_core::FeedPosition, axum::response::Response> {
    use axum::response::IntoResponse;
    shelfsync_hub_core::FeedPosition::parse(s, front.partitions).map_err(|m| {
        shelfsync_node::http::ApiError::invalid(format!("{what}: {m}")).with("parameter", what).into_response()
    })
}

/// `GET /v1/changes` over every partition: each partition's page after the client's position,
/// merged by decision time (each partition in its own order); cursors are positions over
/// every partition, opaque, good on any hub.
pub(super) async fn changes(
    front: &Front,
    parts: &axum::http::request::Parts,
) -> Result<axum::response::Response, axum::response::Response> {
    use axum::response::IntoResponse;
    let invalid = |m: String, what: &str| {
        shelfsync_node::http::ApiError::invalid(m).with("parameter", what.to_owned()).into_response()
    };
    let axum::extract::Query(q) = axum::extract::Query::<ChangesQuery>::try_from_uri(&parts.uri)
        .map_err(|e| invalid(format!("the query: {}", e.body_text()), "query"))?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=crate::api::CHANGES_PAGE_MAX).contains(&limit) {
        return Err(invalid(format!("limit must be 1 to {}; got {limit}", crate::api::CHANGES_PAGE_MAX), "limit"));
    }
    let from = match q.after.as_deref() {
        None => shelfsync_hub_core::FeedPosition::start(front.partitions),
        Some(a) => position(front, "after", a)?,
    };
    let (items, caught_up) = gather_feed(front, parts, &from, limit, q.channel.as_deref()).await?;
    let cursor = items.last().map_or_else(|| from.encode(), |(_, pos)| pos.encode());
    let next = (!caught_up).then(|| cursor.clone());
    let items: Vec<serde_json::Value> = items.into_iter().map(|(i, _)| i).filter(|i| !is_hidden(i)).collect();
    Ok(axum::Json(serde_json::json!({ "items": items, "next": next, "cursor": cursor })).into_response())
}

/// Every partition's newest feed cursor (what "from now" starts after).
async fn feed_heads(front: &Front) -> Result<shelfsync_hub_core::FeedPosition, axum::response::Response> {
    let rows =
        front.db.query("SELECT partition, MAX(cursor) FROM feed GROUP BY partition", &[]).await.map_err(|e| {
            error(axum::http::StatusCode::SERVICE_UNAVAILABLE, "unavailable", format!("the feed: {e}"), "1")
        })?;
    let mut pos = shelfsync_hub_core::FeedPosition::start(front.partitions);
    for r in rows {
        if let (Ok(p), Some(c)) = (Partition::try_from(r.get::<_, i16>(0)), r.get::<_, Option<i64>>(1)) {
            pos.advance(p, c.max(0) as u64);
        }
    }
    Ok(pos)
}

/// `GET /v1/events` over every partition: Server-Sent Events whose ids are positions over
/// every partition (`Last-Event-ID` resumes on any hub, nothing missed or repeated). The
/// partitions are asked for new events every [`EVENTS_POLL`] while there are none; the
/// caller's token goes with every ask, so a revoked token ends the stream.
pub(super) async fn events(
    front: Front,
    parts: axum::http::request::Parts,
) -> Result<axum::response::Response, axum::response::Response> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    use axum::response::IntoResponse;
    let permit = front.streams.clone().try_acquire_owned().map_err(|_| {
        shelfsync_node::http::ApiError::new(
            axum::http::StatusCode::TOO_MANY_REQUESTS,
            "too_many_streams",
            "too many open event streams; use GET /v1/changes or retry later",
        )
        .into_response()
    })?;
    let axum::extract::Query(q) = axum::extract::Query::<ChangesQuery>::try_from_uri(&parts.uri).map_err(|e| {
        shelfsync_node::http::ApiError::invalid(format!("the query: {}", e.body_text())).into_response()
    })?;
    let start = match (parts.headers.get("last-event-id"), q.after) {
        (Some(v), _) => position(&front, "Last-Event-ID", v.to_str().unwrap_or("?"))?,
        (None, Some(a)) => position(&front, "after", &a)?,
        (None, None) => feed_heads(&front).await?,
    };
    // The first page before answering: a bad token is a 401, not an empty stream.
    let channel = q.channel;
    let (first, _) = gather_feed(&front, &parts, &start, crate::api::CHANGES_PAGE_MAX, channel.as_deref()).await?;
    let buf: std::collections::VecDeque<_> = first.into();
    let stopping = front.stopping.clone();
    let stream = futures_util::stream::unfold((start, buf, front, parts, permit), move |state| {
        let mut stopping = stopping.clone();
        let channel = channel.clone();
        async move {
            let (mut pos, mut buf, front, parts, permit) = state;
            loop {
                if let Some((item, at)) = buf.pop_front() {
                    pos = at;
                    if is_hidden(&item) {
                        continue;
                    }
                    // Its cursor is the position after it, encoded once (`gather_feed`).
                    let id = item["cursor"].as_str().unwrap_or_default().to_owned();
                    let kind = item["kind"].as_str().unwrap_or("change").to_owned();
                    let e = Event::default().id(id).event(kind).data(item.to_string());
                    return Some((Ok::<_, std::convert::Infallible>(e), (pos, buf, front, parts, permit)));
                }
                if *stopping.borrow() {
                    return None;
                }
                match gather_feed(&front, &parts, &pos, crate::api::CHANGES_PAGE_MAX, channel.as_deref()).await {
                    Ok((items, _)) if !items.is_empty() => buf.extend(items),
                    Ok(_) => {
                        tokio::select! {
                            _ = tokio::time::sleep(EVENTS_POLL) => {}
                            _ = stopping.changed() => return None,
                        }
                    }
                    Err(resp) => {
                        tracing::info!(status = %resp.status(), "closing an event stream: a partition refused it");
                        return None;
                    }
                }
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response())
}
