//! HTTP plumbing shared by the agent's and the hub's APIs: one [`ApiError`] that renders as
//! `{"error": code, "message": ...}` with the right status, a JSON extractor whose rejections
//! become such errors instead of axum's plain-text ones, and [`serve`], the accept loop both
//! binaries use (connection caps, header-read and idle timeouts, graceful drain).

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde::de::DeserializeOwned;
use serde_json::{json, Map, Value};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// An error answer. Every handler returns `Result<_, ApiError>`.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code.
    pub code: &'static str,
    /// For humans; names what is wrong.
    pub message: String,
    /// Extra fields merged into the body (e.g. `available`).
    pub details: Map<String, Value>,
    /// `Retry-After` in seconds (503s say when to come back).
    pub retry_after_secs: Option<u64>,
}

impl ApiError {
    /// Any status and code.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into(), details: Map::new(), retry_after_secs: None }
    }
    /// Adds a field to the body.
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.details.insert(key.to_owned(), value.into());
        self
    }
    /// 400: the request cannot be parsed.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
    /// 401: no or unknown credentials.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }
    /// 403: credentials fine, role insufficient.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }
    /// 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    /// 409 with a specific code.
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }
    /// 422: parsed, but breaks a rule.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", message)
    }
    /// 500: our fault; the message is logged, the client gets a generic one.
    pub fn internal(message: impl std::fmt::Display) -> Self {
        tracing::error!(error = %message, "internal error answering a request");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error; see the server log")
    }
    /// 503: a dependency is not available right now; come back in a second.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message).retry_after(1)
    }
    /// Sets `Retry-After`.
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after_secs = Some(secs);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = Map::new();
        body.insert("error".into(), Value::String(self.code.into()));
        body.insert("message".into(), Value::String(self.message));
        body.extend(self.details);
        let mut r = (self.status, axum::Json(Value::Object(body))).into_response();
        if let Some(s) = self.retry_after_secs {
            r.headers_mut().insert(axum::http::header::RETRY_AFTER, s.into());
        }
        r
    }
}

/// JSON body extractor with [`ApiError`] rejections: 400 for malformed JSON, 413 for a body over
/// the limit, 415 for a missing content type, 422 for well-formed JSON of the wrong shape.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(r: JsonRejection) -> ApiError {
    let status = r.status();
    let text = r.body_text();
    match status {
        StatusCode::PAYLOAD_TOO_LARGE => too_large(),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => {
            ApiError::new(status, "unsupported_media_type", "expected Content-Type: application/json")
        }
        StatusCode::UNPROCESSABLE_ENTITY => ApiError::invalid(text),
        _ => ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", text),
    }
}

/// Query-string extractor with [`ApiError`] rejections (422 naming the parameter).
pub struct ApiQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(q) => Ok(ApiQuery(q.0)),
            Err(r) => Err(query_rejection(r)),
        }
    }
}

fn query_rejection(r: QueryRejection) -> ApiError {
    ApiError::invalid(r.body_text())
}

/// Path-parameter extractor with [`ApiError`] rejections: a path whose parameters cannot be
/// decoded (invalid percent-encoding, not UTF-8) is `400 bad_request`, not axum's plain text.
pub struct ApiPath<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(p) => Ok(ApiPath(p.0)),
            Err(r) if r.status().is_server_error() => Err(ApiError::internal(r.body_text())),
            Err(r) => Err(ApiError::bad_request(format!("the URL path cannot be decoded: {}", r.body_text()))),
        }
    }
}

/// Raw body extractor with [`ApiError`] rejections (413 `payload_too_large`).
pub struct ApiBytes(pub axum::body::Bytes);

impl<S> FromRequest<S> for ApiBytes
where
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match axum::body::Bytes::from_request(req, state).await {
            Ok(b) => Ok(ApiBytes(b)),
            Err(r) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(too_large()),
            Err(r) => Err(ApiError::bad_request(format!("cannot read the request body: {}", r.body_text()))),
        }
    }
}

fn too_large() -> ApiError {
    ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", "request body is over the size limit")
}

/// The stable error code of a status, for errors that were not made by an [`ApiError`].
pub fn code_for(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::REQUEST_TIMEOUT => "request_timeout",
        StatusCode::CONFLICT => "conflict",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::URI_TOO_LONG => "uri_too_long",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UNPROCESSABLE_ENTITY => "invalid_request",
        StatusCode::TOO_MANY_REQUESTS => "too_many_requests",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        StatusCode::GATEWAY_TIMEOUT => "timeout",
        s if s.is_server_error() => "internal",
        _ => "error",
    }
}

/// Middleware (outermost on both routers): any error answer that is not JSON yet, whatever made
/// it (an extractor, a layer, axum itself), leaves as `{"error": code, "message": ...}` with the
/// same status and headers, so no client ever has to parse plain text.
pub async fn json_errors(req: Request, next: axum::middleware::Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/json"));
    if is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.map(|b| String::from_utf8_lossy(&b).trim().to_owned());
    let message = match text {
        Ok(t) if !t.is_empty() => t,
        _ => status.canonical_reason().unwrap_or("error").to_owned(),
    };
    if status.is_server_error() {
        tracing::error!(%status, error = %message, "error answer made outside the handlers");
    }
    let mut out = ApiError::new(status, code_for(status), message).into_response();
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
}

/// The bearer token of a request, if any.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token.trim())
}

/// Compares secrets in time independent of where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Fallback for unknown routes.
pub async fn no_route() -> ApiError {
    ApiError::not_found("no such endpoint")
}

/// Answer for a known path with the wrong method.
pub fn method_not_allowed() -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed on this endpoint")
}

/// A list's `limit`: `default` when absent, else 1 ..= `max`; otherwise a 422 naming `limit`.
pub fn page_limit(limit: Option<usize>, default: usize, max: usize) -> Result<usize, ApiError> {
    let limit = limit.unwrap_or(default);
    if limit == 0 || limit > max {
        return Err(
            ApiError::invalid(format!("limit must be between 1 and {max}, got {limit}")).with("parameter", "limit")
        );
    }
    Ok(limit)
}

/// One page of a list read with `limit + 1` rows: the first `limit` rows, and `next` (the key of
/// the last one shown) only when there are more, so `next` is null exactly on the last page.
pub fn page<T, K>(mut rows: Vec<T>, limit: usize, key: impl Fn(&T) -> K) -> (Vec<T>, Option<K>) {
    let next = (rows.len() > limit).then(|| key(&rows[limit - 1]));
    rows.truncate(limit);
    (rows, next)
}

/// The request's idempotency key, one rule for both APIs: the body's `id` or the
/// `Idempotency-Key` header, either any 1..128 printable ASCII characters (a receipt number, an
/// order number or a UUID). Given both, they must be the same key: neither silently wins, and a
/// client that sends two different keys learns it at once (422). `None` when neither is given.
pub fn request_key(
    body_id: Option<&str>,
    headers: &HeaderMap,
) -> Result<Option<shelfsync_shared::IdempotencyKey>, ApiError> {
    use shelfsync_shared::IdempotencyKey;
    let header = match headers.get("idempotency-key") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .map_err(|_| ApiError::invalid("Idempotency-Key has a character that is not printable ASCII"))
                .and_then(|k| {
                    IdempotencyKey::parse(k)
                        .map_err(|e| ApiError::invalid(format!("Idempotency-Key {e}")).with("field", "Idempotency-Key"))
                })?,
        ),
    };
    let body = body_id
        .map(|k| IdempotencyKey::parse(k).map_err(|e| ApiError::invalid(format!("id {e}")).with("field", "id")))
        .transpose()?;
    match (body, header) {
        (Some(b), Some(h)) if b != h => Err(ApiError::invalid(format!(
            "id {} and Idempotency-Key {} name different requests; send one, or the same key in both",
            shelfsync_shared::id::quote(b.as_str()),
            shelfsync_shared::id::quote(h.as_str())
        ))
        .with("field", "id")),
        (Some(k), _) | (None, Some(k)) => Ok(Some(k)),
        (None, None) => Ok(None),
    }
}

/// An adjustment's `delta`, `reason` code and `note`, one check for both APIs: the delta is
/// non-zero and within ±[`shelfsync_shared::qty::ADJUST_DELTA_MAX`], the code is one of the set
/// and fits the delta's sign, `other` has a note. The 422 names the field at fault.
pub fn adjustment_reason(delta: i64, code: &str, note: Option<String>) -> Result<shelfsync_shared::Reason, ApiError> {
    use shelfsync_shared::qty::{check_range, QtyError, ADJUST_DELTA_MAX};
    use shelfsync_shared::ReasonError;
    if delta == 0 {
        return Err(ApiError::invalid(QtyError::Zero { field: "delta" }.to_string()).with("field", "delta"));
    }
    check_range("delta", delta, -ADJUST_DELTA_MAX, ADJUST_DELTA_MAX)
        .map_err(|e| ApiError::invalid(e.to_string()).with("field", "delta"))?;
    shelfsync_shared::Reason::new(code, note, delta).map_err(|e| {
        let field = match e {
            ReasonError::NoteRequired | ReasonError::NoteTooLong(_) => "note",
            ReasonError::UnknownCode { .. } | ReasonError::WrongSign { .. } => "reason",
        };
        ApiError::invalid(e.to_string()).with("field", field)
    })
}

/// [`request_key`] where a key is required (every write that creates something).
pub fn required_key(body_id: Option<&str>, headers: &HeaderMap) -> Result<shelfsync_shared::IdempotencyKey, ApiError> {
    request_key(body_id, headers)?.ok_or_else(|| {
        ApiError::invalid("an idempotency key is required: the body's id or an Idempotency-Key header")
            .with("field", "id")
    })
}

/// A page of a short list held in memory, in its order, after the row whose key is `after`
/// (`422` naming `after` when no row has it), with `next` as [`page`] gives it.
pub fn page_after<T, K: PartialEq + std::fmt::Display>(
    rows: Vec<T>,
    after: Option<K>,
    limit: usize,
    key: impl Fn(&T) -> K,
) -> Result<(Vec<T>, Option<K>), ApiError> {
    let start = match after {
        None => 0,
        Some(a) => {
            let at = rows.iter().position(|r| key(r) == a).ok_or_else(|| {
                ApiError::invalid(format!("after names nothing in this list: {a}")).with("parameter", "after")
            })?;
            at + 1
        }
    };
    let rows: Vec<T> = rows.into_iter().skip(start).take(limit + 1).collect();
    Ok(page(rows, limit, key))
}

/// `{"status": "ok"}`.
pub async fn healthz() -> axum::Json<Value> {
    axum::Json(json!({"status": "ok"}))
}

// ---------------------------------------------------------------------------------------------
// Serving: one accept loop for both binaries, with the limits axum::serve does not have.
// ---------------------------------------------------------------------------------------------

/// How long connections may take to finish after shutdown starts before they are dropped.
pub const DRAIN_SECS: u64 = 5;

/// Limits of the HTTP edge (from `[api]` at the agent and `[http]` at the hub).
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Time a client has to send a request's headers, counted from the connection's start or from
    /// the end of the previous response (so it is also how long a keep-alive connection may idle).
    pub header_read_timeout: Duration,
    /// A connection on which no byte moves either way for this long while no request is being
    /// handled (a stalled body upload, a client that stopped reading) is closed.
    pub idle_timeout: Duration,
    /// Most connections open at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// Most connections open at once from one client address (IPv6: one /64); more are answered
    /// 429 and closed. 0 = only `max_connections` applies.
    pub max_connections_per_ip: usize,
    /// How long open connections get to finish after shutdown starts.
    pub drain: Duration,
}

/// Counters of the HTTP edge, shown in each binary's `/metrics` ([`crate::observe`]).
#[derive(Debug, Default)]
pub struct EdgeStats {
    /// Connections open now.
    pub connections_open: AtomicU64,
    /// Connections accepted and served.
    pub connections_accepted_total: AtomicU64,
    /// Connections closed at once because a connection cap was reached.
    pub connections_refused_total: AtomicU64,
    /// Connections closed for a header-read or idle timeout.
    pub connections_timed_out_total: AtomicU64,
    /// Requests answered `429 rate_limited`.
    pub rate_limited_total: AtomicU64,
    /// Requests answered `403 forbidden_host` (agent only).
    pub forbidden_host_total: AtomicU64,
}

/// The key a client address is counted under: IPv4 as is (IPv4-mapped IPv6 too), IPv6 by its
/// /64, since one host usually owns a whole /64.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// The client address of a request served by [`serve`] (unspecified when the router is driven
/// without a socket, as in `oneshot` tests).
pub fn peer_ip(req: &Request) -> IpAddr {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
        .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
}

/// Open-connection counts, in total and per client address.
struct Slots {
    max: usize,
    max_per_ip: usize,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// Why a connection was not taken.
enum Refusal {
    Full,
    PerIp,
}

/// One open connection's place; gives it back when dropped.
struct Slot {
    slots: Arc<Slots>,
    ip: IpAddr,
    stats: Arc<EdgeStats>,
}

impl Slots {
    fn take(self: &Arc<Self>, ip: IpAddr, stats: &Arc<EdgeStats>) -> Result<Slot, Refusal> {
        let ip = client_key(ip);
        let mut open = self.open.lock().expect("slots lock");
        if open.0 >= self.max {
            return Err(Refusal::Full);
        }
        let mine = open.1.entry(ip).or_insert(0);
        if self.max_per_ip > 0 && *mine >= self.max_per_ip {
            return Err(Refusal::PerIp);
        }
        *mine += 1;
        open.0 += 1;
        stats.connections_open.fetch_add(1, Ordering::Relaxed);
        Ok(Slot { slots: self.clone(), ip, stats: stats.clone() })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().expect("slots lock");
        open.0 -= 1;
        if let Some(n) = open.1.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.1.remove(&self.ip);
            }
        }
        self.stats.connections_open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// When a connection last moved a byte, and whether the server (not the client) owes the next
/// move: a request in flight whose body has been read in full.
struct Activity {
    started: Instant,
    last_io_ms: AtomicU64,
    /// Requests handed to the router whose response is not ready yet.
    in_flight: AtomicU64,
    /// Of those, requests whose body the client has not finished sending.
    bodies_pending: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        self.last_io_ms.store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    fn last_io(&self) -> Instant {
        self.started + Duration::from_millis(self.last_io_ms.load(Ordering::Relaxed))
    }
    /// The server is working on a request: silence is ours, not the client's.
    fn busy(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) > self.bodies_pending.load(Ordering::Relaxed)
    }
}

/// A request body that tells [`Activity`] when the client has sent all of it (or the handler
/// stopped reading it), so a stalled upload counts as idle but a slow handler does not.
struct TrackedBody {
    inner: hyper::body::Incoming,
    activity: Arc<Activity>,
    pending: bool,
}

impl TrackedBody {
    fn done(&mut self) {
        if std::mem::take(&mut self.pending) {
            self.activity.bodies_pending.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl hyper::body::Body for TrackedBody {
    type Data = hyper::body::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        if matches!(r, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) || this.inner.is_end_stream() {
            this.done();
        }
        r
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for TrackedBody {
    fn drop(&mut self) {
        self.done();
    }
}

/// The socket, noting every byte that moves.
struct Tracked {
    stream: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Tracked {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.stream).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.touch();
        }
        r
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.stream).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        r
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// The router as a hyper service for one connection: it tells handlers the client's address
/// (`ConnectInfo<SocketAddr>`) and counts requests in flight; while one is being handled after
/// its body arrived, the connection is not idle.
#[derive(Clone)]
struct ConnService {
    router: Router,
    peer: SocketAddr,
    activity: Arc<Activity>,
}

struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

impl hyper::service::Service<hyper::Request<hyper::body::Incoming>> for ConnService {
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, std::convert::Infallible>> + Send>>;

    fn call(&self, req: hyper::Request<hyper::body::Incoming>) -> Self::Future {
        use hyper::body::Body as _;
        let activity = self.activity.clone();
        let mut req = req.map(|inner| {
            let pending = !inner.is_end_stream();
            if pending {
                activity.bodies_pending.fetch_add(1, Ordering::Relaxed);
            }
            axum::body::Body::new(TrackedBody { inner, activity, pending })
        });
        req.extensions_mut().insert(ConnectInfo(self.peer));
        self.activity.in_flight.fetch_add(1, Ordering::Relaxed);
        let guard = InFlight(self.activity.clone());
        let fut = tower_service::Service::call(&mut self.router.clone(), req);
        Box::pin(async move {
            let resp = fut.await;
            drop(guard);
            resp
        })
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets open connections finish their
/// requests for up to `opts.drain` and drops the rest.
///
/// Unlike `axum::serve` it bounds what a client can hold: connections are capped in total and per
/// client address (over a cap the connection gets a canned JSON 503/429 and is closed at once, so
/// the accept queue keeps draining and file descriptors stay bounded), headers must arrive
/// within `header_read_timeout`, and a connection that moves no byte for `idle_timeout` while no
/// request is being handled is closed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    opts: ServeOptions,
    stats: Arc<EdgeStats>,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    fd_headroom(opts.max_connections);
    let slots = Arc::new(Slots {
        max: opts.max_connections.max(1),
        max_per_ip: opts.max_connections_per_ip,
        open: Mutex::new((0, HashMap::new())),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            _ = &mut shutdown => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => match slots.take(peer.ip(), &stats) {
                    Ok(slot) => {
                        stats.connections_accepted_total.fetch_add(1, Ordering::Relaxed);
                        let _ = stream.set_nodelay(true);
                        let conn = connection(stream, peer, app.clone(), opts.clone(), stop_rx.clone(), stats.clone());
                        conns.spawn(async move {
                            conn.await;
                            drop(slot);
                        });
                    }
                    Err(why) => {
                        stats.connections_refused_total.fetch_add(1, Ordering::Relaxed);
                        refuse(stream, why);
                    }
                },
                Err(e) => {
                    // Out of file descriptors (or memory): back off instead of spinning; the
                    // caps above are meant to keep this from happening.
                    if !matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::ConnectionReset
                    ) {
                        tracing::warn!(error = %e, "accepting an HTTP connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            },
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(opts.drain, async { while conns.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(open = conns.len(), "closing HTTP connections still open after the drain period");
        conns.shutdown().await;
    }
    Ok(())
}

/// File descriptors kept for everything but HTTP connections (SQLite, QUIC, logs, webhooks).
const FD_RESERVE: u64 = 256;

/// Raises the soft open-file limit to the hard one (as Go's runtime does), and warns when the
/// connection cap still does not fit: then `accept` would fail with EMFILE before the cap is
/// reached, which is the outage the cap exists to prevent.
fn fd_headroom(max_connections: usize) {
    #[cfg(unix)]
    {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
                return;
            }
            if lim.rlim_cur < lim.rlim_max {
                let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                    lim = raised;
                }
            }
        }
        let need = max_connections as u64 + FD_RESERVE;
        if lim.rlim_cur < need {
            tracing::warn!(
                open_files_limit = lim.rlim_cur,
                max_connections,
                "the open-file limit is below the HTTP connection cap plus {FD_RESERVE}; raise LimitNOFILE or \
                 lower max_connections"
            );
        }
    }
    #[cfg(not(unix))]
    let _ = max_connections;
}

/// Answers a connection over a cap without reading it, and closes it. Best effort: the write
/// never waits, so a refused client holds nothing.
fn refuse(stream: TcpStream, why: Refusal) {
    let (status, code, message) = match why {
        Refusal::Full => {
            ("503 Service Unavailable", "too_many_connections", "the server has too many open connections")
        }
        Refusal::PerIp => {
            ("429 Too Many Requests", "too_many_connections", "too many open connections from your address")
        }
    };
    let body = json!({"error": code, "message": message}).to_string();
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.try_write(format!("{head}{body}").as_bytes());
}

/// One connection, from accept to close.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    router: Router,
    opts: ServeOptions,
    mut stop: watch::Receiver<bool>,
    stats: Arc<EdgeStats>,
) {
    let activity = Arc::new(Activity {
        started: Instant::now(),
        last_io_ms: AtomicU64::new(0),
        in_flight: AtomicU64::new(0),
        bodies_pending: AtomicU64::new(0),
    });
    let io = hyper_util::rt::TokioIo::new(Tracked { stream, activity: activity.clone() });
    let service = ConnService { router, peer, activity: activity.clone() };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(opts.header_read_timeout).keep_alive(true);
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let mut draining = false;
    if *stop.borrow_and_update() {
        draining = true;
        conn.as_mut().graceful_shutdown();
    }
    loop {
        // While the server works on a request the connection is not idle; look again later.
        let since = if activity.busy() { Instant::now() } else { activity.last_io() };
        let idle_at = tokio::time::Instant::from_std(since + opts.idle_timeout);
        tokio::select! {
            done = conn.as_mut() => {
                if let Err(e) = done {
                    if e.is_timeout() {
                        stats.connections_timed_out_total.fetch_add(1, Ordering::Relaxed);
                    }
                    tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
                }
                return;
            }
            _ = stop.changed(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = tokio::time::sleep_until(idle_at) => {
                if activity.last_io().elapsed() >= opts.idle_timeout && !activity.busy() {
                    stats.connections_timed_out_total.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%peer, "closing an idle HTTP connection");
                    return;
                }
            }
        }
    }
}
