//! Requests whose lines span several partitions, split into one part per partition, each part
//! an ordinary request to that partition's decider under a derived idempotency key
//! (`{key}/p{partition}`), so a retry of the whole request replays the parts already decided
//! and decides the rest.
//!
//! - **Restocks and batches of restocks**: every part recorded, the answer their lines in the
//!   request's order. A part refused (an unknown store: every part is refused the same; a
//!   batch's stores are checked first) answers the refusal; parts recorded before stay
//!   recorded, and the same request again completes it.
//! - **Reservations and transfers**: all lines or none, as with one partition. Parts are made
//!   one partition after the other; when one is refused (not enough stock), the parts made so
//!   far are undone (released, cancelled) and the refusal answered. The split is recorded first
//!   (`request_parts`), so `/v1/reservations/{id or key}` and `/v1/transfers/{id or key}` find
//!   the parts on any hub, and commit, extend, cancel and receive reach every part. A hub that
//!   dies between two parts leaves the first made (a reservation held until its TTL) unless
//!   the caller retries (it completes the whole) or cancels it.
//! - **Availability of several SKUs**: each partition's SKUs asked of it, the answers in the
//!   request's order.

use std::collections::BTreeMap;

use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use shelfsync_hub_core::Partition;
use shelfsync_shared::key::{IdempotencyKey, KEY_MAX_LEN};

use super::{error, to_partition, Front, PART_MAX_BYTES};

/// Schema (PostgreSQL migration 7): how the partitioned hubs split requests that are all or
/// none (`kind`: reservation or transfer; `id` and `key`: the whole's).
pub const MIGRATION: &str = "
    CREATE TABLE request_parts (
        kind TEXT NOT NULL, id TEXT NOT NULL, key TEXT NOT NULL, partition SMALLINT NOT NULL,
        part_key TEXT NOT NULL, PRIMARY KEY (kind, id, partition));
    CREATE INDEX request_parts_key ON request_parts (kind, key);";

/// Partition `p`'s part of the request with idempotency key `key`.
pub(super) fn part_key(key: &str, p: Partition) -> String {
    format!("{key}/p{p}")
}

/// `s` as one segment of a path (a part's key holds a `/`).
pub(super) fn segment(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// A partition's answer: status, its `Retry-After` if any, its JSON.
pub(super) struct PartAnswer {
    pub(super) status: StatusCode,
    retry_after: Option<axum::http::HeaderValue>,
    pub(super) body: Value,
}

impl PartAnswer {
    fn ok(&self) -> bool {
        self.status.is_success()
    }

    pub(super) fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body)).into_response();
        if let Some(v) = self.retry_after {
            r.headers_mut().insert(axum::http::header::RETRY_AFTER, v);
        }
        r
    }
}

/// Sends `method path` (with `body` as JSON, and the idempotency key `key` if any) to
/// partition `p`, with the caller's headers.
pub(super) async fn call(
    front: &Front,
    p: Partition,
    parts: &axum::http::request::Parts,
    method: Method,
    path: &str,
    body: Option<&Value>,
    key: Option<&str>,
) -> PartAnswer {
    let bytes = body.map(|b| axum::body::Bytes::from(b.to_string())).unwrap_or_default();
    let mut req = super::sub_request_with(parts, method, path, body.is_some());
    if let Some(v) = key.and_then(|k| axum::http::HeaderValue::from_str(k).ok()) {
        req.headers.insert("idempotency-key", v);
    }
    let resp = to_partition(front, p, req, bytes, true).await;
    let (status, retry_after) = (resp.status(), resp.headers().get(axum::http::header::RETRY_AFTER).cloned());
    let body = match axum::body::to_bytes(resp.into_body(), PART_MAX_BYTES).await {
        Ok(b) if b.is_empty() => Value::Null,
        Ok(b) => match serde_json::from_slice(&b) {
            Ok(v) => v,
            Err(e) => {
                return PartAnswer {
                    status: StatusCode::BAD_GATEWAY,
                    retry_after: None,
                    body: json!({"error": "bad_gateway",
                        "message": format!("partition {p} answered something that is not JSON: {e}")}),
                };
            }
        },
        Err(e) => {
            return PartAnswer {
                status: StatusCode::SERVICE_UNAVAILABLE,
                retry_after: Some(axum::http::HeaderValue::from_static("1")),
                body: json!({"error": "no_active_hub", "message": format!("partition {p}'s answer broke off: {e}")}),
            };
        }
    };
    PartAnswer { status, retry_after, body }
}

fn invalid(message: String, field: &str) -> Response {
    shelfsync_node::http::ApiError::invalid(message).with("field", field.to_owned()).into_response()
}

/// The request's idempotency key (the APIs' one rule: its body's `id` or the
/// `Idempotency-Key` header), short enough to derive its parts' keys from.
fn request_key(parts: &axum::http::request::Parts, body: &Value) -> Result<IdempotencyKey, Response> {
    let key =
        shelfsync_node::http::required_key(body["id"].as_str(), &parts.headers).map_err(IntoResponse::into_response)?;
    let longest = part_key(key.as_str(), Partition::MAX).len();
    if longest > KEY_MAX_LEN {
        return Err(invalid(
            format!(
                "id is {} characters long; lines of several SKU partitions take ids of at most {}",
                key.as_str().len(),
                KEY_MAX_LEN - (longest - key.as_str().len())
            ),
            "id",
        ));
    }
    Ok(key)
}

/// The body's lines by the partition of their SKU (a line without a valid SKU goes to
/// partition 0, whose API says what is wrong with it).
pub(super) fn lines_by_partition(front: &Front, body: &Value) -> BTreeMap<Partition, Vec<Value>> {
    let mut out: BTreeMap<Partition, Vec<Value>> = BTreeMap::new();
    for line in body["lines"].as_array().into_iter().flatten() {
        let p = line["sku"].as_str().and_then(|s| s.parse().ok()).map_or(0, |sku| front.partitions.of(&sku));
        out.entry(p).or_default().push(line.clone());
    }
    out
}

/// Sorts `items` (answers with a `sku`) in the order of the request's `lines` (each with a
/// `sku`; a SKU's items stay in their order).
fn in_request_order(items: &mut [Value], lines: &Value) {
    let mut at: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for (i, l) in lines.as_array().into_iter().flatten().enumerate() {
        at.entry(l["sku"].as_str().unwrap_or_default()).or_insert(i);
    }
    items.sort_by_key(|v| v["sku"].as_str().and_then(|s| at.get(s).copied()).unwrap_or(usize::MAX));
}

/// `body` for partition `p`: its lines, under the part's key.
fn part_body(body: &Value, key: &IdempotencyKey, p: Partition, lines: &[Value]) -> Value {
    let mut b = body.clone();
    b["id"] = json!(part_key(key.as_str(), p));
    b["lines"] = json!(lines);
    b
}

/// `POST /v1/restocks` whose lines span partitions.
pub(super) async fn restock(front: &Front, parts: &axum::http::request::Parts, body: Value) -> Response {
    let key = match request_key(parts, &body) {
        Ok(k) => k,
        Err(r) => return r,
    };
    let bodies = lines_by_partition(front, &body).into_iter().map(|(p, lines)| (p, part_body(&body, &key, p, &lines)));
    let answers = match in_parts(front, parts, &key, "/v1/restocks", bodies.collect()).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    let mut lines: Vec<Value> =
        answers.iter().flat_map(|(_, a)| a.body["lines"].as_array().cloned().unwrap_or_default()).collect();
    in_request_order(&mut lines, &body["lines"]);
    let mut out = parts_answer(&key, &answers);
    out["lines"] = json!(lines);
    (parts_status(&answers), axum::Json(out)).into_response()
}

/// `POST /v1/restocks/batch` whose entries' lines span partitions: one batch per partition
/// (each entry with its lines of that partition's SKUs). The stores are checked first (every
/// part would refuse an unknown or revoked one), so such a batch records nothing. Answered per
/// entry in the request's order, as with one partition.
pub(super) async fn restock_batch(front: &Front, parts: &axum::http::request::Parts, body: Value) -> Response {
    let key = match request_key(parts, &body) {
        Ok(k) => k,
        Err(r) => return r,
    };
    let entries = body["restocks"].as_array().cloned().unwrap_or_default();
    let stores: Vec<String> = entries.iter().filter_map(|e| e["store"].as_str().map(str::to_owned)).collect();
    let live: std::collections::BTreeSet<String> =
        match front.db.query("SELECT id FROM stores WHERE id = ANY($1) AND revoked_at_ms IS NULL", &[&stores]).await {
            Ok(rows) => rows.iter().map(|r| r.get(0)).collect(),
            Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", format!("the stores: {e}"), "1"),
        };
    if let Some((i, s)) = stores.iter().enumerate().find(|(_, s)| !live.contains(*s)) {
        return shelfsync_node::http::ApiError::not_found(format!("no store {s} (or it is revoked)"))
            .with("field", format!("restocks[{i}].store"))
            .into_response();
    }
    // Per partition, its entries (with their lines of its SKUs) and which request entry each is.
    let mut bodies: BTreeMap<Partition, (Vec<Value>, Vec<usize>)> = BTreeMap::new();
    for (i, e) in entries.iter().enumerate() {
        for (p, lines) in lines_by_partition(front, e) {
            let mut part = e.clone();
            part["lines"] = json!(lines);
            let slot = bodies.entry(p).or_default();
            slot.0.push(part);
            slot.1.push(i);
        }
    }
    let calls = bodies
        .iter()
        .map(|(p, (restocks, _))| (*p, json!({"id": part_key(key.as_str(), *p), "restocks": restocks})))
        .collect();
    let answers = match in_parts(front, parts, &key, "/v1/restocks/batch", calls).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    let mut merged: Vec<Value> =
        entries.iter().enumerate().map(|(i, e)| json!({"id": key.item(i), "store": e["store"], "lines": []})).collect();
    for (p, a) in &answers {
        let index = &bodies[p].1;
        for (j, entry) in a.body["restocks"].as_array().into_iter().flatten().enumerate() {
            if let Some(&i) = index.get(j) {
                let lines = merged[i]["lines"].as_array_mut().expect("built above");
                lines.extend(entry["lines"].as_array().cloned().unwrap_or_default());
            }
        }
    }
    for (m, e) in merged.iter_mut().zip(&entries) {
        if let Some(lines) = m["lines"].as_array_mut() {
            in_request_order(lines, &e["lines"]);
        }
    }
    let mut out = parts_answer(&key, &answers);
    out["restocks"] = json!(merged);
    (parts_status(&answers), axum::Json(out)).into_response()
}

/// Records a request as its parts (`bodies`, by partition), the first alone (a request every
/// part would refuse is refused once). A part refused after others were recorded answers the
/// refusal; the same request again replays the recorded parts and decides the rest.
async fn in_parts(
    front: &Front,
    parts: &axum::http::request::Parts,
    key: &IdempotencyKey,
    path: &str,
    bodies: BTreeMap<Partition, Value>,
) -> Result<Vec<(Partition, PartAnswer)>, Response> {
    let mut answers = Vec::with_capacity(bodies.len());
    for (i, (p, pb)) in bodies.iter().enumerate() {
        let a = call(front, *p, parts, Method::POST, path, Some(pb), None).await;
        if !a.ok() {
            if i > 0 {
                tracing::error!(key = key.as_str(), partition = p, status = %a.status, path,
                    "a request over several partitions is recorded in part; the same request again completes it");
            }
            return Err(a.into_response());
        }
        answers.push((*p, a));
    }
    Ok(answers)
}

/// 201 if any part was recorded now, else 200 (a retry).
fn parts_status(answers: &[(Partition, PartAnswer)]) -> StatusCode {
    if answers.iter().any(|(_, a)| a.status == StatusCode::CREATED) {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    }
}

/// What every answer of parts says: the whole's id and key, its kind, when, and its parts.
fn parts_answer(key: &IdempotencyKey, answers: &[(Partition, PartAnswer)]) -> Value {
    let recorded_at = answers.iter().filter_map(|(_, a)| a.body["recorded_at"].as_str()).max().unwrap_or_default();
    let kind = answers.first().map(|(_, a)| a.body["kind"].clone()).unwrap_or(Value::Null);
    let parts: Vec<Value> =
        answers.iter().map(|(p, a)| json!({"partition": p, "id": a.body["id"], "key": a.body["key"]})).collect();
    json!({"id": key.id(), "key": key.as_str(), "kind": kind, "recorded_at": recorded_at, "parts": parts})
}

/// What is split all or none: a cart's reservation, or a transfer between two stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Whole {
    /// `/v1/reservations`.
    Reservation,
    /// `/v1/transfers`.
    Transfer,
}

impl Whole {
    fn kind(self) -> &'static str {
        match self {
            Whole::Reservation => "reservation",
            Whole::Transfer => "transfer",
        }
    }

    fn base(self) -> &'static str {
        match self {
            Whole::Reservation => "/v1/reservations",
            Whole::Transfer => "/v1/transfers",
        }
    }

    /// Statuses a part cannot leave (an earlier attempt under the key was undone).
    fn ended(self, status: &str) -> bool {
        match self {
            Whole::Reservation => matches!(status, "released" | "expired"),
            Whole::Transfer => status == "cancelled",
        }
    }

    /// Undoes a part made before one that was refused: (method, path under the part).
    fn undo(self) -> (Method, &'static str) {
        match self {
            Whole::Reservation => (Method::DELETE, ""),
            Whole::Transfer => (Method::POST, "/cancel"),
        }
    }

    /// Statuses in the order a whole goes through them (any other is an end).
    fn progress(self) -> &'static [&'static str] {
        match self {
            Whole::Reservation => &["held", "committed", "fulfilled"],
            Whole::Transfer => &["in_transit", "received"],
        }
    }
}

/// The parts of a split `whole` known by `id` (its UUID or its key): (partition, part key).
pub(super) async fn parts_of(front: &Front, whole: Whole, id: &str) -> Result<Vec<(Partition, String)>, String> {
    let uuid = IdempotencyKey::parse(id).map(|k| k.id().to_string()).unwrap_or_default();
    let rows = front
        .db
        .query(
            "SELECT partition, part_key FROM request_parts WHERE kind = $1 AND (id = $2 OR key = $3)
             ORDER BY partition",
            &[&whole.kind(), &uuid, &id],
        )
        .await
        .map_err(|e| e.to_string())?;
    Ok(rows.iter().filter_map(|r| Some((Partition::try_from(r.get::<_, i16>(0)).ok()?, r.get(1)))).collect())
}

/// `POST /v1/reservations` or `/v1/transfers` whose lines span partitions: all parts or none.
pub(super) async fn all_or_none(
    front: &Front,
    parts: &axum::http::request::Parts,
    whole: Whole,
    body: Value,
) -> Response {
    let key = match request_key(parts, &body) {
        Ok(k) => k,
        Err(r) => return r,
    };
    let by_part = lines_by_partition(front, &body);
    // The split first: whoever asks for it later finds every part.
    let ps: Vec<i16> = by_part.keys().map(|p| *p as i16).collect();
    let part_keys: Vec<String> = by_part.keys().map(|p| part_key(key.as_str(), *p)).collect();
    let recorded = front
        .db
        .execute(
            "INSERT INTO request_parts (kind, id, key, partition, part_key)
             SELECT $1, $2, $3, p, k FROM unnest($4::int2[], $5::text[]) AS u(p, k) ON CONFLICT DO NOTHING",
            &[&whole.kind(), &key.id().to_string(), &key.as_str(), &ps, &part_keys],
        )
        .await;
    if let Err(e) = recorded {
        return error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", format!("recording the split: {e}"), "1");
    }
    let mut made: Vec<(Partition, PartAnswer)> = Vec::with_capacity(by_part.len());
    for (p, lines) in &by_part {
        let pb = part_body(&body, &key, *p, lines);
        let a = call(front, *p, parts, Method::POST, whole.base(), Some(&pb), None).await;
        // A part decided before and since undone (an earlier attempt under this key was
        // refused): so is the whole.
        let ended = a.ok() && whole.ended(a.body["status"].as_str().unwrap_or_default());
        if !a.ok() || ended {
            for (q, _) in &made {
                let (method, tail) = whole.undo();
                let path = format!("{}/{}{tail}", whole.base(), segment(&part_key(key.as_str(), *q)));
                let r = call(front, *q, parts, method, &path, None, None).await;
                if !r.ok() {
                    tracing::error!(key = key.as_str(), partition = q, status = %r.status, kind = whole.kind(),
                        "could not undo a part of a refused request over several partitions; undo it by its key");
                }
            }
            if ended {
                return shelfsync_node::http::ApiError::new(
                    StatusCode::CONFLICT,
                    "idempotency_conflict",
                    format!(
                        "{} {} was refused or undone before (its part in partition {p} is {}); use a new id",
                        whole.kind(),
                        key.as_str(),
                        a.body["status"].as_str().unwrap_or("?")
                    ),
                )
                .into_response();
            }
            return a.into_response();
        }
        made.push((*p, a));
    }
    let created = made.iter().any(|(_, a)| a.status == StatusCode::CREATED);
    let view = merged_view(whole, &key, made);
    (if created { StatusCode::CREATED } else { StatusCode::OK }, axum::Json(view)).into_response()
}

/// Where a whole stands given its parts' statuses: ended if any part ended, else the least
/// advanced.
fn merged_status<'a>(whole: Whole, statuses: impl Iterator<Item = &'a str>) -> &'a str {
    let progress = whole.progress();
    let all: Vec<&str> = statuses.collect();
    if let Some(ended) = all.iter().find(|s| !progress.contains(s)) {
        return ended;
    }
    all.into_iter().min_by_key(|s| progress.iter().position(|p| p == s)).unwrap_or(progress[0])
}

/// One whole's view from its parts' views: the parts' lines (and allocations), the earliest
/// start and expiry, the latest end.
fn merged_view(whole: Whole, key: &IdempotencyKey, parts: Vec<(Partition, PartAnswer)>) -> Value {
    let views: Vec<(Partition, Value)> = parts.into_iter().map(|(p, a)| (p, a.body)).collect();
    let status = merged_status(whole, views.iter().map(|(_, v)| v["status"].as_str().unwrap_or("?")));
    let cat = |field: &str| -> Vec<Value> {
        views.iter().flat_map(|(_, v)| v[field].as_array().cloned().unwrap_or_default()).collect()
    };
    let min_str = |field: &str| views.iter().filter_map(|(_, v)| v[field].as_str()).min().map(str::to_owned);
    let max_str = |field: &str| views.iter().filter_map(|(_, v)| v[field].as_str()).max().map(str::to_owned);
    let first = views.first().map(|(_, v)| v.clone()).unwrap_or_default();
    let parts: Vec<Value> = views
        .iter()
        .map(|(p, v)| json!({"partition": p, "key": v["key"], "id": v["id"], "status": v["status"]}))
        .collect();
    match whole {
        Whole::Reservation => json!({
            "id": key.id(),
            "key": key.as_str(),
            "status": status,
            "short": views.iter().any(|(_, v)| v["short"] == json!(true)),
            "pickup_store": first["pickup_store"],
            "customer": first["customer"],
            "created_at": min_str("created_at"),
            "expires_at": min_str("expires_at"),
            "allocations": cat("allocations"),
            "lines": cat("lines"),
            "parts": parts,
        }),
        Whole::Transfer => json!({
            "id": key.id(),
            "key": key.as_str(),
            "from": first["from"],
            "to": first["to"],
            "status": status,
            "reason": first["reason"],
            "lines": cat("lines"),
            "shipped_at": min_str("shipped_at"),
            "received_at": (status == "received").then(|| max_str("received_at")).flatten(),
            "cancelled_at": max_str("cancelled_at"),
            "parts": parts,
        }),
    }
}

/// A split whole's own route (`GET`, a reservation's `DELETE`, `…/commit`, `…/extend`, a
/// transfer's `…/receive`, `…/cancel`): sent to every part (a body's lines to the part of
/// their SKU), the answer merged (the first refusal answered as is).
pub(super) async fn on_parts(
    front: &Front,
    parts: &axum::http::request::Parts,
    whole: Whole,
    id: &str,
    split: Vec<(Partition, String)>,
    body: &[u8],
) -> Response {
    let tail: String = {
        let path = parts.uri.path().trim_end_matches('/');
        let segs: Vec<&str> = path.split('/').collect();
        // /v1/{reservations,transfers}/{id}[/action]
        segs.get(4).map(|s| format!("/{s}")).unwrap_or_default()
    };
    let json_body: Option<Value> = (!body.is_empty()).then(|| serde_json::from_slice(body).ok()).flatten();
    let key_text = split
        .first()
        .and_then(|(p, k)| k.strip_suffix(&format!("/p{p}")))
        .map(str::to_owned)
        .unwrap_or_else(|| id.to_owned());
    let Ok(key) = IdempotencyKey::parse(&key_text) else {
        return invalid(format!("a {} split under a key that does not parse: {key_text}", whole.kind()), "id");
    };
    // The action's own key, if it has one, derived per part as the whole's.
    let action_key = parts.headers.get("idempotency-key").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let by_part = json_body.as_ref().filter(|b| b["lines"].is_array()).map(|b| lines_by_partition(front, b));
    let answers = futures_util::future::join_all(split.iter().map(|(p, k)| {
        let path = format!("{}/{}{tail}", whole.base(), segment(k));
        let body = json_body.as_ref().map(|b| match &by_part {
            Some(lines) => {
                let mut b = b.clone();
                b["lines"] = json!(lines.get(p).cloned().unwrap_or_default());
                b
            }
            None => b.clone(),
        });
        let key = action_key.as_deref().map(|a| part_key(a, *p));
        let method = parts.method.clone();
        async move { (*p, call(front, *p, parts, method, &path, body.as_ref(), key.as_deref()).await) }
    }))
    .await;
    if let Some(i) = answers.iter().position(|(_, a)| !a.ok()) {
        let (_, a) = answers.into_iter().nth(i).expect("found");
        return a.into_response();
    }
    axum::Json(merged_view(whole, &key, answers)).into_response()
}

/// `GET /v1/availability?sku=…` over several partitions: each partition asked for its SKUs,
/// the items in the request's order.
pub(super) async fn availability(front: &Front, parts: &axum::http::request::Parts) -> Response {
    let query: Vec<(String, String)> = match axum::extract::Query::try_from_uri(&parts.uri) {
        Ok(axum::extract::Query(q)) => q,
        Err(e) => return invalid(format!("the query: {}", e.body_text()), "query"),
    };
    let mut by_part: BTreeMap<Partition, Vec<(String, String)>> = BTreeMap::new();
    let (mut skus, mut rest) = (Vec::new(), Vec::new());
    for (k, v) in query {
        if k == "sku" {
            let p = v.parse().map_or(0, |sku| front.partitions.of(&sku));
            by_part.entry(p).or_default().push((k, v.clone()));
            skus.push(json!({ "sku": v }));
        } else {
            rest.push((k, v));
        }
    }
    if by_part.len() <= 1 {
        let p = by_part.keys().next().copied().unwrap_or(0);
        let path = parts.uri.path_and_query().map(|x| x.as_str()).unwrap_or("/").to_owned();
        return call(front, p, parts, Method::GET, &path, None, None).await.into_response();
    }
    let answers = futures_util::future::join_all(by_part.into_iter().map(|(p, mut q)| {
        q.extend(rest.iter().cloned());
        let path = format!("/v1/availability?{}", serde_urlencoded::to_string(&q).unwrap_or_default());
        async move { call(front, p, parts, Method::GET, &path, None, None).await }
    }))
    .await;
    let mut items = Vec::new();
    for a in answers {
        if !a.ok() {
            return a.into_response();
        }
        items.extend(a.body["items"].as_array().cloned().unwrap_or_default());
    }
    in_request_order(&mut items, &json!(skus));
    axum::Json(json!({ "items": items })).into_response()
}

/// How a gathered list is ordered, and so how its pages resume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Order {
    /// Newest first by this time field; each partition resumes after its own last item (the
    /// page's `next` is opaque: one id per partition).
    NewestFirst(&'static str),
    /// By SKU; every partition resumes after the same SKU (`next` is that SKU).
    BySku,
}

/// The prefix of a position in a gathered newest-first list (its format's version).
const LIST_PREFIX: &str = "g1.";

fn list_position(s: &str, partitions: usize) -> Result<Vec<Option<String>>, String> {
    use base64::Engine as _;
    let bad =
        || format!("after must be the next of a page of this list; got {:?}", s.chars().take(64).collect::<String>());
    let rest = s.strip_prefix(LIST_PREFIX).ok_or_else(bad)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(rest).map_err(|_| bad())?;
    let v: Vec<Option<String>> = postcard::from_bytes(&bytes).map_err(|_| bad())?;
    if v.len() != partitions {
        return Err(bad());
    }
    Ok(v)
}

fn encode_list_position(v: &[Option<String>]) -> String {
    use base64::Engine as _;
    let bytes = postcard::to_stdvec(v).expect("ids serialise");
    format!("{LIST_PREFIX}{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// A list over every partition (`GET /v1/conflicts`, `/v1/reservations`,
/// `/v1/stores/{id}/stock`): each partition asked for a page from where the client stands in
/// it, the pages merged in the list's order (each partition's own order kept), `limit` items.
pub(super) async fn gather_list(front: &Front, parts: &axum::http::request::Parts, order: Order) -> Response {
    let query: Vec<(String, String)> = match axum::extract::Query::try_from_uri(&parts.uri) {
        Ok(axum::extract::Query(q)) => q,
        Err(e) => return invalid(format!("the query: {}", e.body_text()), "query"),
    };
    let mut limit = 100usize;
    let mut after: Option<String> = None;
    let mut rest = Vec::new();
    for (k, v) in query {
        match k.as_str() {
            "limit" => match v.parse::<usize>() {
                Ok(l) if (1..=1000).contains(&l) => limit = l,
                _ => return invalid(format!("limit must be 1 to 1000; got {v:?}"), "limit"),
            },
            "after" => after = Some(v),
            _ => rest.push((k, v)),
        }
    }
    let n = usize::from(front.partitions.count());
    let afters: Vec<Option<String>> = match (order, after) {
        (_, None) => vec![None; n],
        (Order::BySku, Some(a)) => vec![Some(a); n],
        (Order::NewestFirst(_), Some(a)) => match list_position(&a, n) {
            Ok(v) => v,
            Err(m) => return invalid(m, "after"),
        },
    };
    let path = parts.uri.path().to_owned();
    let answers = futures_util::future::join_all(front.partitions.all().map(|p| {
        let mut q = rest.clone();
        q.push(("limit".into(), limit.to_string()));
        if let Some(a) = &afters[usize::from(p)] {
            q.push(("after".into(), a.clone()));
        }
        let path = format!("{path}?{}", serde_urlencoded::to_string(&q).unwrap_or_default());
        async move { call(front, p, parts, Method::GET, &path, None, None).await }
    }))
    .await;
    let mut pages: Vec<std::collections::VecDeque<Value>> = Vec::with_capacity(n);
    let mut more: Vec<bool> = Vec::with_capacity(n);
    for a in answers {
        if !a.ok() {
            return a.into_response();
        }
        more.push(!a.body["next"].is_null());
        pages.push(a.body["items"].as_array().cloned().unwrap_or_default().into());
    }
    let key = |v: &Value| -> String {
        match order {
            Order::NewestFirst(field) => v[field].as_str().unwrap_or_default().to_owned(),
            Order::BySku => v["sku"].as_str().unwrap_or_default().to_owned(),
        }
    };
    let mut items = Vec::with_capacity(limit);
    let mut last: Vec<Option<String>> = afters;
    while items.len() < limit {
        let heads = pages.iter().enumerate().filter_map(|(p, page)| page.front().map(|v| (key(v), p)));
        let next = match order {
            Order::NewestFirst(_) => heads.max_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1))),
            Order::BySku => heads.min(),
        };
        let Some((_, p)) = next else { break };
        let item = pages[p].pop_front().expect("a head");
        last[p] = Some(match order {
            Order::NewestFirst(_) => item["id"].as_str().unwrap_or_default().to_owned(),
            Order::BySku => item["sku"].as_str().unwrap_or_default().to_owned(),
        });
        items.push(item);
    }
    let remaining = pages.iter().zip(&more).any(|(page, more)| !page.is_empty() || *more);
    let next = remaining.then(|| match order {
        Order::NewestFirst(_) => json!(encode_list_position(&last)),
        Order::BySku => json!(items.last().map(|i| i["sku"].clone()).unwrap_or(Value::Null)),
    });
    axum::Json(json!({ "items": items, "next": next })).into_response()
}

/// Adds `b`'s numbers into `a`, field by field (objects of numbers: per key).
fn add_numbers(a: &mut Value, b: &Value) {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                match a.get_mut(k) {
                    Some(x) => add_numbers(x, v),
                    None => {
                        a.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (a @ Value::Number(_), Value::Number(b)) => {
            *a = json!(a.as_i64().unwrap_or(0) + b.as_i64().unwrap_or(0));
        }
        _ => {}
    }
}

/// Adds `b` into `a` element by element (series of the same buckets).
fn add_series(a: &mut Value, b: &Value) {
    if let (Some(a), Some(b)) = (a.as_array_mut(), b.as_array()) {
        for (x, y) in a.iter_mut().zip(b) {
            add_numbers(x, y);
        }
    }
}

/// `GET /v1/overview` over every partition: each partition's figures of its SKUs, added up
/// per store and for the chain; `feed_head` a position over every partition.
/// A change of what every partition's decider holds alike (a sales channel): made on each
/// partition in turn, the first partition's answer when all agree, else the first refusal (the
/// same request again completes it: a channel's `PUT` and `DELETE` are idempotent per
/// partition, a `DELETE` already made answers 404 there and counts as done).
pub(super) async fn everywhere(front: &Front, parts: &axum::http::request::Parts, body: &[u8]) -> Response {
    let path = parts.uri.path().to_owned();
    let json: Option<Value> = if body.is_empty() {
        None
    } else {
        match serde_json::from_slice(body) {
            Ok(v) => Some(v),
            // The partition's API says what is wrong with it.
            Err(_) => return call_raw(front, 0, parts, body).await,
        }
    };
    let deleting = parts.method == Method::DELETE;
    let (mut ok, mut gone): (Option<PartAnswer>, Option<PartAnswer>) = (None, None);
    for p in front.partitions.all() {
        let a = call(front, p, parts, parts.method.clone(), &path, json.as_ref(), None).await;
        if a.ok() {
            ok.get_or_insert(a);
        } else if deleting && a.status == StatusCode::NOT_FOUND {
            // Removed there by an earlier try of the same request.
            gone.get_or_insert(a);
        } else {
            return a.into_response();
        }
    }
    ok.or(gone).map_or_else(|| StatusCode::NOT_FOUND.into_response(), PartAnswer::into_response)
}

/// Sends the request as it came (its bytes) to partition `p`.
async fn call_raw(front: &Front, p: Partition, parts: &axum::http::request::Parts, body: &[u8]) -> Response {
    let req = super::sub_request_with(parts, parts.method.clone(), parts.uri.path(), true);
    super::to_partition(front, p, req, axum::body::Bytes::copy_from_slice(body), true).await
}

pub(super) async fn overview(front: &Front, parts: &axum::http::request::Parts) -> Response {
    let path = parts.uri.path_and_query().map(|x| x.as_str()).unwrap_or("/v1/overview").to_owned();
    let answers = futures_util::future::join_all(front.partitions.all().map(|p| {
        let path = path.clone();
        async move { (p, call(front, p, parts, Method::GET, &path, None, None).await) }
    }))
    .await;
    let mut head = shelfsync_hub_core::FeedPosition::start(front.partitions);
    let mut out: Option<Value> = None;
    let mut stores: BTreeMap<String, Value> = BTreeMap::new();
    for (p, a) in answers {
        if !a.ok() {
            return a.into_response();
        }
        let o = a.body;
        head.advance(p, o["feed_head"].as_u64().unwrap_or(0));
        for s in o["stores"].as_array().into_iter().flatten() {
            let id = s["id"].as_str().unwrap_or_default().to_owned();
            match stores.get_mut(&id) {
                None => {
                    stores.insert(id, s.clone());
                }
                Some(t) => {
                    for f in [
                        "skus",
                        "on_hand",
                        "held",
                        "available",
                        "unseen_sales_estimate",
                        "unsynced_hub_changes",
                        "low_stock",
                        "out_of_stock",
                        "open_conflicts",
                    ] {
                        add_numbers(&mut t[f], &s[f]);
                    }
                    // The same store seen by every partition: the latest contact, the shortest silence.
                    if s["last_seen"].as_str() > t["last_seen"].as_str() {
                        t["last_seen"] = s["last_seen"].clone();
                    }
                    if s["silent_secs"].as_i64() < t["silent_secs"].as_i64() {
                        t["silent_secs"] = s["silent_secs"].clone();
                    }
                    t["connected"] = json!(t["connected"] == json!(true) || s["connected"] == json!(true));
                }
            }
        }
        match &mut out {
            None => out = Some(o),
            Some(t) => {
                for f in ["skus", "reservations", "channels", "open_conflicts", "low_stock", "out_of_stock"] {
                    add_numbers(&mut t[f], &o[f]);
                }
                for f in ["sold", "reserved"] {
                    add_series(&mut t["series"][f], &o["series"][f]);
                }
                if o["series"]["truncated"] == json!(true) {
                    t["series"]["truncated"] = json!(true);
                }
            }
        }
    }
    let mut out = out.unwrap_or_else(|| json!({}));
    out["feed_head"] = json!(head.encode());
    out["stores"] = json!(stores.into_values().collect::<Vec<_>>());
    out["partitions"] = json!(front.partitions.count());
    axum::Json(out).into_response()
}
