//! The HTTP APIs of the agent and the hub, driven through their real routers (`router(state)`,
//! in process, no socket) on databases in a temp dir: arbitrary JSON bodies, query strings and
//! path segments at every endpoint that takes them. Every answer must be a clean one: never a
//! panic, never a 500, and every error a JSON `{"error", "message"}` body.
//!
//! The input's first byte picks the endpoint, the second the credentials, content type and path
//! segment; the rest is the body (or the query string). The state lives across inputs (so an id
//! used twice meets the idempotency rules) and is rebuilt every [`REQUESTS_PER_STATE`] (agent) or [`HUB_REQUESTS_PER_STATE`] (hub)
//! requests so the databases stay small.

use std::cell::RefCell;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use serde_json::Value;
use shelfsync_agent::db::{Db, DbOptions};
use shelfsync_hub::sqlite::{db_path, SqliteOptions};
use shelfsync_hub::storage::{CertRecord, Role};
use shelfsync_node::config::Synchronous;
use shelfsync_node::ratelimit::{Limiter, RateLimit, TokenKeys};
use shelfsync_shared::StoreId;
use tower_service::Service;

/// Requests served by one agent state before it is rebuilt.
pub const REQUESTS_PER_STATE: u64 = 20_000;
/// The same for the hub, whose catalog document grows with every edit (automerge keeps its
/// history): small documents keep a request in the tens of microseconds.
pub const HUB_REQUESTS_PER_STATE: u64 = 500;
/// The agent's and hub's default body limit.
const BODY_MAX_BYTES: usize = 64 * 1024;
/// Longest CSV the hub target imports.
const CSV_MAX_BYTES: usize = 200;
const AGENT_HOST: &str = "127.0.0.1:7070";
const AGENT_TOKEN: &str = "fuzz-agent-token-0123456789abcdef0123456789abcdef";

/// Path segments: valid SKUs, ids and store ids, and ones that break each rule.
const SEGMENTS: &[&str] = &[
    "HSS-001",
    "A",
    "0193a0b4-0000-7000-8000-000000000001",
    "0193a0b4-0000-7000-8000-000000000002",
    "s1",
    "s2",
    "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
    "%C3%A9t%C3%A9",
    ".hidden",
    "a%2Fb",
    "%FF%FE",
    "hub",
    "0",
    "not-a-uuid",
    "%00",
    "HSS-001%20",
];

/// Idempotency keys for reservation actions.
const KEYS: &[&str] = &["k1", "k2", "", "\u{7f}"];

thread_local! {
    static RT: tokio::runtime::Runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime");
    static AGENT: RefCell<Option<AgentApi>> = const { RefCell::new(None) };
    static HUB: RefCell<Option<HubApi>> = const { RefCell::new(None) };
}

/// One request to the agent's API.
pub fn agent(data: &[u8]) {
    let [pick, flags, rest @ ..] = data else { return };
    RT.with(|rt| {
        AGENT.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.as_ref().is_none_or(|a| a.served >= REQUESTS_PER_STATE) {
                *slot = None; // the old state's threads and files go first
                *slot = Some(rt.block_on(AgentApi::new()));
            }
            let api = slot.as_mut().expect("state");
            api.served += 1;
            let req = agent_request(*pick, *flags, rest);
            if let Some(req) = req {
                rt.block_on(check(&mut api.router, req));
            }
        })
    });
}

/// One request to the hub's API.
pub fn hub(data: &[u8]) {
    let [pick, flags, rest @ ..] = data else { return };
    RT.with(|rt| {
        HUB.with(|cell| {
            let mut slot = cell.borrow_mut();
            if slot.as_ref().is_none_or(|a| a.served >= HUB_REQUESTS_PER_STATE) {
                *slot = None;
                *slot = Some(rt.block_on(HubApi::new()));
            }
            let api = slot.as_mut().expect("state");
            api.served += 1;
            if let Some(req) = hub_request(api, *pick, *flags, rest) {
                rt.block_on(check(&mut api.router, req));
            }
        })
    });
}

/// Sends one request and checks the answer is a clean one.
async fn check(router: &mut Router, req: Request<Body>) {
    let what = format!("{} {}", req.method(), req.uri());
    let resp = router.call(req).await.expect("the router is infallible");
    let status = resp.status();
    let ct = resp.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let body = axum::body::to_bytes(resp.into_body(), usize::MAX).await.expect("the body is in memory");
    if tracing() {
        eprintln!("{what} -> {status} {}", String::from_utf8_lossy(&body));
    }
    assert_ne!(status, StatusCode::INTERNAL_SERVER_ERROR, "{what}: 500 {}", String::from_utf8_lossy(&body));
    if status.is_client_error() || status.is_server_error() {
        let v: Value = serde_json::from_slice(&body)
            .unwrap_or_else(|e| panic!("{what}: {status} with a body that is not JSON ({e}): {body:?}"));
        assert!(v["error"].is_string() && v["message"].is_string(), "{what}: {status} error body {v}");
    } else if ct.starts_with("application/json") {
        serde_json::from_slice::<Value>(&body).unwrap_or_else(|e| panic!("{what}: {status}, invalid JSON ({e})"));
    }
}

/// `SHELFSYNC_FUZZ_TRACE=1` prints every request and its answer.
fn tracing() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("SHELFSYNC_FUZZ_TRACE").is_some())
}

/// Percent-encodes everything but unreserved characters, `=` and `&`, so any bytes make a query.
fn query(bytes: &[u8]) -> String {
    let mut q = String::with_capacity(bytes.len() * 3);
    for &b in bytes {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'=' | b'&') {
            q.push(b as char);
        } else {
            q.push_str(&format!("%{b:02X}"));
        }
    }
    q
}

/// A temp dir in memory where there is one (`/dev/shm`): checkpoints then cost no disk I/O.
fn scratch() -> tempfile::TempDir {
    tempfile::tempdir_in("/dev/shm").or_else(|_| tempfile::tempdir()).expect("temp dir")
}

fn segment(flags: u8) -> &'static str {
    SEGMENTS[(flags >> 4) as usize % SEGMENTS.len()]
}

/// Builds a request; `None` if the bytes cannot form one (never the case for bodies).
fn build(method: Method, uri: &str, flags: u8, auth: Option<&str>, body: &[u8], json: bool) -> Option<Request<Body>> {
    let mut b = Request::builder().method(method).uri(uri).header(header::HOST, AGENT_HOST);
    if let Some(token) = auth {
        b = b.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    // Mostly the right content type; sometimes none or another.
    match (flags >> 2) & 3 {
        1 => {}
        2 => b = b.header(header::CONTENT_TYPE, if json { "text/plain" } else { "application/json" }),
        _ => b = b.header(header::CONTENT_TYPE, if json { "application/json" } else { "text/csv" }),
    }
    b.body(Body::from(body.to_vec())).ok()
}

struct AgentApi {
    router: Router,
    served: u64,
    _sync: tokio::sync::watch::Sender<shelfsync_agent::status::SyncStatus>,
    _dir: tempfile::TempDir,
}

impl AgentApi {
    async fn new() -> AgentApi {
        let dir = scratch();
        let path = dir.path().join("agent.db");
        let store: StoreId = "s1".parse().expect("store id");
        let opts = DbOptions { synchronous: Synchronous::Normal, group_commit_max: 256 };
        Db::create(&path, &store, opts).expect("agent database");
        let db = Db::open(&path, opts).expect("agent database opens");
        let (tx, rx) = tokio::sync::watch::channel(shelfsync_agent::status::SyncStatus::disabled());
        let catalog = shelfsync_agent::catalog::AgentCatalog::load(&db).await.expect("catalog");
        let stats = Arc::new(shelfsync_node::http::EdgeStats::default());
        let limit = RateLimit { per_sec: 1, burst: 1 };
        let token: Arc<str> = Arc::from(AGENT_TOKEN);
        // Limits off: a fuzzer is load by design, and the limiter has its own tests.
        let limiter = Limiter::new(
            false,
            &[("writes", limit), ("reads", limit)],
            TokenKeys::Only(Some(token.clone())),
            stats.clone(),
        );
        let hosts = shelfsync_agent::guard::HostPolicy::new(AGENT_HOST.parse().expect("address"), &[]);
        let guard = Arc::new(shelfsync_agent::guard::Guard { hosts, limiter, stats });
        let metrics = Arc::new(shelfsync_agent::metrics::AgentMetrics::new(db.commit_seconds()));
        let state = shelfsync_agent::api::AppState { db, sync: rx, token: Some(token), catalog, guard, metrics };
        AgentApi { router: shelfsync_agent::api::router(state, BODY_MAX_BYTES), served: 0, _sync: tx, _dir: dir }
    }
}

fn agent_request(pick: u8, flags: u8, rest: &[u8]) -> Option<Request<Body>> {
    let auth = match flags & 3 {
        0 => None,
        1 => Some("wrong"),
        _ => Some(AGENT_TOKEN),
    };
    let seg = segment(flags);
    let post = |path: &str| build(Method::POST, path, flags, auth, rest, true);
    match pick % 12 {
        0 | 1 => post("/v1/sales"),
        2 => post("/v1/returns"),
        3 => post("/v1/adjustments"),
        4 => post("/v1/counts"),
        5 => build(Method::PUT, &format!("/v1/catalog/{seg}/overrides"), flags, auth, rest, true),
        6 => post(&format!("/v1/holds/{seg}/fulfil")),
        7 => build(Method::GET, &format!("/v1/stock?{}", query(rest)), flags, auth, &[], true),
        8 => build(Method::GET, &format!("/v1/stock/{seg}"), flags, auth, &[], true),
        9 => build(Method::GET, &format!("/v1/catalog/{seg}"), flags, auth, &[], true),
        10 => {
            let path = ["/v1/status", "/v1/holds", "/metrics", "/healthz"][(flags >> 4) as usize % 4];
            build(Method::GET, path, flags, auth, &[], true)
        }
        // Any method and path: routing, 404s and 405s.
        _ => {
            let methods = [Method::GET, Method::POST, Method::PUT, Method::DELETE, Method::PATCH];
            let path = String::from_utf8_lossy(rest.split(|b| *b == b' ').next().unwrap_or_default()).into_owned();
            build(
                methods[(flags >> 4) as usize % methods.len()].clone(),
                &format!("/{}", query_path(&path)),
                flags,
                auth,
                &[],
                true,
            )
        }
    }
}

/// Keeps `/` and percent-encodes what a path may not hold.
fn query_path(s: &str) -> String {
    s.split('/').map(|p| query(p.as_bytes())).collect::<Vec<_>>().join("/")
}

struct HubApi {
    router: Router,
    served: u64,
    tokens: [String; 3],
    _dir: tempfile::TempDir,
}

impl HubApi {
    async fn new() -> HubApi {
        let dir = scratch();
        let data = dir.path().join("hub");
        shelfsync_hub::admin::init(&data).await.expect("hub data dir");
        let mut tokens = Vec::new();
        for role in [Role::Viewer, Role::Storefront, Role::Admin] {
            tokens.push(shelfsync_hub::admin::create_token(&data, role).await.expect("token"));
        }
        let tokens: [String; 3] = tokens.try_into().expect("three tokens");
        let path = db_path(&data);
        let opts = SqliteOptions { synchronous: Synchronous::Normal, readers: 1, ..SqliteOptions::default() };
        let engine = shelfsync_hub::engine::Engine::open(&path, opts, Default::default()).expect("hub database opens");
        let storage = Arc::new(engine);
        for s in ["s1", "s2"] {
            let store: StoreId = s.parse().expect("store id");
            let cert = CertRecord {
                serial: format!("{s}-serial"),
                store: store.clone(),
                fingerprint: s.into(),
                revoked_at_ms: None,
            };
            storage.add_store(store, cert).await.expect("store added");
        }
        let catalog = shelfsync_hub::catalog::HubCatalog::load(storage.as_ref()).await.expect("catalog");
        let hub = shelfsync_hub::state::Hub::new(storage, catalog);
        let edge = Arc::new(shelfsync_node::http::EdgeStats::default());
        let limit = RateLimit { per_sec: 1, burst: 1 };
        let limiter = Limiter::new(false, &[("writes", limit), ("reads", limit)], TokenKeys::Any, edge.clone());
        let state = shelfsync_hub::api::ApiState {
            hub,
            max_batch_skus: 100,
            reservations: shelfsync_hub::config::ReservationsSection::default(),
            event_streams: Arc::new(tokio::sync::Semaphore::new(4)),
            limiter,
            edge,
        };
        let mut api =
            HubApi { router: shelfsync_hub::api::router(state, BODY_MAX_BYTES), served: 0, tokens, _dir: dir };
        // Stock and a catalog entry, so reservations can succeed and meet the limits.
        let admin = api.tokens[2].clone();
        for (method, uri, body) in [
            (Method::PUT, "/v1/catalog/HSS-001", r#"{"name":"Hex socket","max_per_customer":5}"#),
            (
                Method::POST,
                "/v1/restocks",
                r#"{"id":"0193a0b4-0000-7000-8000-0000000000f1","store":"s1","lines":[{"sku":"HSS-001","qty":50},{"sku":"A","qty":5}]}"#,
            ),
            (
                Method::POST,
                "/v1/restocks",
                r#"{"id":"0193a0b4-0000-7000-8000-0000000000f2","store":"s2","lines":[{"sku":"HSS-001","qty":7}]}"#,
            ),
            // A transfer in transit under an id the path segments name, to receive or cancel.
            (
                Method::POST,
                "/v1/transfers",
                r#"{"id":"0193a0b4-0000-7000-8000-000000000002","from":"s1","to":"s2","lines":[{"sku":"HSS-001","qty":3}]}"#,
            ),
        ] {
            let req = build(method, uri, 0, Some(&admin), body.as_bytes(), true).expect("request");
            let resp = api.router.call(req).await.expect("infallible");
            assert!(resp.status().is_success(), "seeding the hub: {uri} answered {}", resp.status());
        }
        api
    }
}

fn hub_request(api: &HubApi, pick: u8, flags: u8, rest: &[u8]) -> Option<Request<Body>> {
    // Mostly the token the endpoint needs (admin covers all); sometimes too weak, none, unknown.
    let auth = match flags & 3 {
        0 => None,
        1 => Some(if pick & 0x80 != 0 { "ss_unknown" } else { api.tokens[0].as_str() }),
        2 => Some(api.tokens[1].as_str()),
        _ => Some(api.tokens[2].as_str()),
    };
    let seg = segment(flags);
    let json = |m: Method, path: &str| build(m, path, flags, auth, rest, true);
    let get_q = |path: &str| build(Method::GET, &format!("{path}?{}", query(rest)), flags, auth, &[], true);
    let mut req = match pick % 16 {
        0 | 1 => json(Method::POST, "/v1/reservations"),
        2 => json(Method::POST, &format!("/v1/reservations/{seg}/extend")),
        3 => json(Method::POST, &format!("/v1/reservations/{seg}/commit")),
        4 => json(Method::DELETE, &format!("/v1/reservations/{seg}")),
        // Batch restocks and head-office adjustments share the slots of their older kin.
        5 if pick & 0x80 != 0 => json(Method::POST, "/v1/restocks/batch"),
        5 => json(Method::POST, "/v1/restocks"),
        6 if pick & 0x80 != 0 => json(Method::POST, &format!("/v1/stores/{seg}/adjustments")),
        6 => match pick >> 6 {
            0 => json(Method::POST, "/v1/transfers"),
            1 => json(Method::POST, &format!("/v1/transfers/{seg}/receive")),
            2 => json(Method::POST, &format!("/v1/transfers/{seg}/cancel")),
            _ => get_q("/v1/transfers"),
        },
        7 => json(Method::PUT, &format!("/v1/catalog/{seg}")),
        8 => json(Method::PATCH, &format!("/v1/catalog/{seg}")),
        // The import's path on this branch, and its name on main. A few rows at most: every row
        // is an automerge edit (slow under coverage instrumentation), and the parser's rules
        // show in the first rows.
        9 => {
            let path = if pick & 0x80 == 0 { "/v1/catalog/import" } else { "/v1/catalog-imports" };
            build(Method::POST, path, flags, auth, &rest[..rest.len().min(CSV_MAX_BYTES)], false)
        }
        10 => get_q("/v1/availability"),
        11 => get_q("/v1/conflicts"),
        12 => get_q("/v1/changes"),
        13 => get_q("/v1/catalog"),
        14 if pick & 0x80 != 0 => get_q(&format!("/v1/stores/{seg}/adjustments")),
        14 => get_q(&format!("/v1/stores/{seg}/stock")),
        // API tokens (on main).
        15 if pick & 0x40 != 0 => match pick >> 7 {
            0 => json(Method::POST, "/v1/tokens"),
            _ => json(Method::DELETE, &format!("/v1/tokens/{seg}")),
        },
        _ => {
            let paths =
                ["/v1/availability/", "/v1/reservations/", "/v1/catalog/", "/v1/stores", "/v1/tokens", "/v1/overview"];
            let p = paths[(pick as usize >> 4) % paths.len()];
            build(Method::GET, &format!("{p}{}", if p.ends_with('/') { seg } else { "" }), flags, auth, &[], true)
        }
    }?;
    let transfer_act = pick % 16 == 6 && matches!(pick >> 6, 1 | 2);
    if (matches!(pick % 16, 2..=4) || transfer_act) && flags & 0x0c == 0 {
        if let Ok(v) = KEYS[(pick as usize >> 4) % KEYS.len()].parse() {
            req.headers_mut().insert("idempotency-key", v);
        }
    }
    Some(req)
}
