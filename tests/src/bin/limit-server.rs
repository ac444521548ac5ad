//! The "limit line" of `scripts/bench-reservations.sh`: the least server that does the hub's
//! shape of work for `POST /v1/reservations`, to show what this machine allows.
//!
//! - HTTP/1.1 (axum, tokio), the hub's request body (`id`, `lines`, optional `ttl_secs`,
//!   `pickup_store`, `customer`; unknown fields refused) and its JSON error shape;
//! - a bearer token compared in constant time with the one in `SHELFSYNC_LIMIT_TOKEN` (401 JSON
//!   otherwise), checked before the body is read, as the hub's role middleware does;
//! - the decision in memory on one dedicated thread that owns `sku -> available`, fed by a bounded
//!   channel: all lines of a reservation or none (409 `insufficient_stock`), one id once (a second
//!   request with a used id is refused with 409 `duplicate_id`; there is no replay);
//! - durability: a writer thread takes everything queued, inserts one row per reservation in one
//!   transaction on SQLite (`journal_mode=WAL`, `synchronous=FULL`), commits, and only then are
//!   the callers answered 201 with the reservation as JSON. A failed commit gives the units back
//!   and answers 503.
//!
//! No sourcing across stores, allocation rows, holds, feed events, metrics or rate limits: the
//! hub's extra work is what the gap between the two lines is made of.
//!
//! `SHELFSYNC_LIMIT_TOKEN=secret limit-server --db FILE [--stock SKU=UNITS]...` binds
//! 127.0.0.1:0, prints `http://127.0.0.1:PORT` on a line of its own on stdout, and exits when
//! its stdin reaches end of file (so a script's coprocess stops with the script) or on a signal.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::PathBuf;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use shelfsync_node::http::{bearer, constant_time_eq, ApiError, ApiJson};
use shelfsync_shared::qty::{LINES_MAX, LINE_QTY_MAX};
use shelfsync_shared::{Sku, StoreId};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

/// Reservations waiting for the decider (the bounded queue in front of it).
const DECIDER_QUEUE: usize = 1024;
/// Decided reservations waiting for the writer.
const WRITER_QUEUE: usize = 4096;
/// Most reservations in one transaction.
const GROUP_COMMIT_MAX: usize = 1024;
/// Lease length when the request names none, and the longest allowed (the hub's defaults).
const DEFAULT_TTL_SECS: u64 = 900;
const MAX_TTL_SECS: u64 = 7 * 24 * 3600;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LineBody {
    sku: String,
    qty: i64,
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

/// Why a reservation was not taken.
enum Refusal {
    Short { sku: Sku, available: u64 },
    Duplicate,
    Failed(String),
}

/// A reservation on its way to the decider.
struct Ask {
    id: Uuid,
    lines: Vec<(Sku, u64)>,
    /// The row as the writer stores it.
    row: Row,
    reply: oneshot::Sender<Result<(), Refusal>>,
}

struct Row {
    lines_json: String,
    created_at_ms: i64,
    expires_at_ms: i64,
}

/// A decided reservation on its way to the writer.
struct Decided {
    ask: Ask,
}

#[derive(Clone)]
struct App {
    token: Arc<[u8]>,
    decider: mpsc::Sender<Ask>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

async fn require_token(State(app): State<App>, req: Request, next: Next) -> Response {
    match bearer(req.headers()) {
        None => ApiError::unauthorized("missing Authorization: Bearer <token>").into_response(),
        Some(t) if constant_time_eq(t.as_bytes(), &app.token) => next.run(req).await,
        Some(_) => ApiError::unauthorized("unknown token").into_response(),
    }
}

async fn post_reservation(State(app): State<App>, ApiJson(b): ApiJson<ReservationBody>) -> Result<Response, ApiError> {
    let id = Uuid::parse_str(&b.id).map_err(|_| {
        ApiError::invalid(format!("id must be a UUID, got {:?}", b.id.chars().take(64).collect::<String>()))
    })?;
    if b.lines.is_empty() {
        return Err(ApiError::invalid("lines must not be empty"));
    }
    if b.lines.len() > LINES_MAX {
        return Err(ApiError::invalid(format!("lines has {} entries; the limit is {LINES_MAX}", b.lines.len())));
    }
    let mut lines = Vec::with_capacity(b.lines.len());
    for (i, l) in b.lines.iter().enumerate() {
        let sku: Sku = l.sku.parse().map_err(|e| ApiError::invalid(format!("lines[{i}].sku: {e}")))?;
        if l.qty < 1 || l.qty as u64 > LINE_QTY_MAX {
            return Err(ApiError::invalid(format!(
                "lines[{i}].qty must be between 1 and {LINE_QTY_MAX}, got {}",
                l.qty
            )));
        }
        lines.push((sku, l.qty as u64));
    }
    let ttl = b.ttl_secs.unwrap_or(DEFAULT_TTL_SECS);
    if ttl == 0 || ttl > MAX_TTL_SECS {
        return Err(ApiError::invalid(format!("ttl_secs must be between 1 and {MAX_TTL_SECS}, got {ttl}")));
    }
    let pickup_store = match &b.pickup_store {
        Some(s) => Some(s.parse::<StoreId>().map_err(|e| ApiError::invalid(format!("pickup_store: {e}")))?),
        None => None,
    };
    if let Some(c) = &b.customer {
        if c.is_empty() || c.len() > 128 {
            return Err(ApiError::invalid(format!("customer must be 1 to 128 bytes, got {}", c.len())));
        }
    }
    let created_at_ms = now_ms();
    let expires_at_ms = created_at_ms + ttl as i64 * 1000;
    let lines_value: Vec<Value> = lines.iter().map(|(s, q)| json!({"sku": s.as_str(), "qty": q})).collect();
    let view = json!({
        "id": id,
        "status": "held",
        "pickup_store": pickup_store.as_ref().map(|s| s.as_str()),
        "customer": b.customer,
        "created_at_ms": created_at_ms,
        "expires_at_ms": expires_at_ms,
        "lines": lines_value,
    });
    let row =
        Row { lines_json: serde_json::to_string(&view["lines"]).expect("serialises"), created_at_ms, expires_at_ms };
    let (reply, answer) = oneshot::channel();
    app.decider
        .send(Ask { id, lines, row, reply })
        .await
        .map_err(|_| ApiError::unavailable("the decider has stopped"))?;
    match answer.await {
        Ok(Ok(())) => Ok((StatusCode::CREATED, Json(view)).into_response()),
        Ok(Err(Refusal::Short { sku, available })) => {
            Err(ApiError::conflict("insufficient_stock", format!("only {available} of {sku} available"))
                .with("sku", sku.as_str())
                .with("available", available))
        }
        Ok(Err(Refusal::Duplicate)) => {
            Err(ApiError::conflict("duplicate_id", format!("reservation {id} exists (limit-server does not replay)")))
        }
        Ok(Err(Refusal::Failed(m))) => Err(ApiError::unavailable(format!("not stored: {m}"))),
        Err(_) => Err(ApiError::unavailable("the writer has stopped")),
    }
}

/// The single decider: owns the stock, takes a reservation whole or refuses it, passes what it
/// took to the writer. Units of reservations whose commit failed come back on `returned`.
fn decider(
    mut asks: mpsc::Receiver<Ask>,
    returned: std_mpsc::Receiver<(Uuid, Vec<(Sku, u64)>)>,
    writer: std_mpsc::SyncSender<Decided>,
    mut stock: HashMap<Sku, u64>,
) {
    let mut ids: HashSet<Uuid> = HashSet::new();
    let mut need: Vec<(Sku, u64)> = Vec::new();
    while let Some(ask) = asks.blocking_recv() {
        while let Ok((id, lines)) = returned.try_recv() {
            ids.remove(&id);
            for (sku, q) in lines {
                *stock.entry(sku).or_default() += q;
            }
        }
        if !ids.insert(ask.id) {
            let _ = ask.reply.send(Err(Refusal::Duplicate));
            continue;
        }
        // Lines naming the same SKU add up.
        need.clear();
        for (sku, q) in &ask.lines {
            match need.iter_mut().find(|(s, _)| s == sku) {
                Some((_, n)) => *n += q,
                None => need.push((sku.clone(), *q)),
            }
        }
        let short = need.iter().find_map(|(sku, q)| {
            let available = stock.get(sku).copied().unwrap_or(0);
            (available < *q).then(|| (sku.clone(), available))
        });
        if let Some((sku, available)) = short {
            ids.remove(&ask.id);
            let _ = ask.reply.send(Err(Refusal::Short { sku, available }));
            continue;
        }
        for (sku, q) in &need {
            *stock.get_mut(sku).expect("checked above") -= q;
        }
        if writer.send(Decided { ask }).is_err() {
            return;
        }
    }
}

/// The single writer: everything queued goes into one transaction; answers after the commit.
fn writer(
    mut conn: rusqlite::Connection,
    decided: std_mpsc::Receiver<Decided>,
    returned: std_mpsc::Sender<(Uuid, Vec<(Sku, u64)>)>,
) {
    let mut batch: Vec<Decided> = Vec::with_capacity(GROUP_COMMIT_MAX);
    while let Ok(first) = decided.recv() {
        batch.push(first);
        while batch.len() < GROUP_COMMIT_MAX {
            match decided.try_recv() {
                Ok(d) => batch.push(d),
                Err(_) => break,
            }
        }
        let stored = (|| -> rusqlite::Result<()> {
            let tx = conn.transaction()?;
            {
                let mut insert = tx.prepare_cached(
                    "INSERT INTO reservations (id, status, lines, created_at_ms, expires_at_ms)
                     VALUES (?1, 'held', ?2, ?3, ?4)",
                )?;
                for d in &batch {
                    let r = &d.ask.row;
                    insert.execute(rusqlite::params![
                        d.ask.id.as_bytes(),
                        r.lines_json,
                        r.created_at_ms,
                        r.expires_at_ms
                    ])?;
                }
            }
            tx.commit()
        })();
        match stored {
            Ok(()) => {
                for d in batch.drain(..) {
                    let _ = d.ask.reply.send(Ok(()));
                }
            }
            Err(e) => {
                eprintln!("limit-server: commit of {} reservations failed: {e}", batch.len());
                for d in batch.drain(..) {
                    let _ = returned.send((d.ask.id, d.ask.lines));
                    let _ = d.ask.reply.send(Err(Refusal::Failed(e.to_string())));
                }
            }
        }
    }
}

fn open_db(path: &PathBuf) -> anyhow::Result<rusqlite::Connection> {
    let conn = rusqlite::Connection::open(path)?;
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    anyhow::ensure!(mode.eq_ignore_ascii_case("wal"), "journal_mode is {mode}, not WAL");
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS reservations (
            id BLOB PRIMARY KEY, status TEXT NOT NULL, lines TEXT NOT NULL,
            created_at_ms INTEGER NOT NULL, expires_at_ms INTEGER NOT NULL) WITHOUT ROWID;",
    )?;
    Ok(conn)
}

fn main() {
    // One line saying why, not a backtrace: a script shows it when the server does not start.
    if let Err(e) = run() {
        eprintln!("limit-server: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    let usage = "usage: SHELFSYNC_LIMIT_TOKEN=... limit-server --db FILE [--stock SKU=UNITS]...";
    let token = std::env::var("SHELFSYNC_LIMIT_TOKEN")
        .map_err(|_| anyhow::anyhow!("SHELFSYNC_LIMIT_TOKEN is not set; {usage}"))?;
    anyhow::ensure!(!token.is_empty(), "SHELFSYNC_LIMIT_TOKEN is empty");
    let (mut db, mut stock) = (None, HashMap::new());
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--db" => db = Some(PathBuf::from(args.next().ok_or_else(|| anyhow::anyhow!(usage))?)),
            "--stock" => {
                let v = args.next().ok_or_else(|| anyhow::anyhow!(usage))?;
                let (sku, units) =
                    v.split_once('=').ok_or_else(|| anyhow::anyhow!("--stock wants SKU=UNITS, got {v}"))?;
                stock.insert(
                    sku.parse::<Sku>().map_err(|e| anyhow::anyhow!("--stock {v}: {e}"))?,
                    units.parse::<u64>()?,
                );
            }
            _ => anyhow::bail!("unknown argument {a}; {usage}"),
        }
    }
    let db = db.ok_or_else(|| anyhow::anyhow!(usage))?;
    let conn = open_db(&db).map_err(|e| anyhow::anyhow!("opening {}: {e}", db.display()))?;

    let (ask_tx, ask_rx) = mpsc::channel(DECIDER_QUEUE);
    let (decided_tx, decided_rx) = std_mpsc::sync_channel(WRITER_QUEUE);
    let (returned_tx, returned_rx) = std_mpsc::channel();
    std::thread::Builder::new()
        .name("decider".into())
        .spawn(move || decider(ask_rx, returned_rx, decided_tx, stock))?;
    std::thread::Builder::new().name("writer".into()).spawn(move || writer(conn, decided_rx, returned_tx))?;
    // Stop with whoever started us: end of file on stdin.
    std::thread::Builder::new().name("stdin".into()).spawn(|| {
        let mut sink = [0u8; 256];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
        std::process::exit(0);
    })?;

    let app = App { token: token.into_bytes().into(), decider: ask_tx };
    let router = Router::new()
        .route("/v1/reservations", post(post_reservation))
        .route_layer(middleware::from_fn_with_state(app.clone(), require_token))
        .route("/healthz", axum::routing::get(|| async { Json(json!({"status": "ok"})) }))
        .fallback(shelfsync_node::http::no_route)
        .layer(axum::extract::DefaultBodyLimit::max(64 * 1024))
        .layer(middleware::from_fn(shelfsync_node::http::json_errors))
        .with_state(app);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        println!("http://{}", listener.local_addr()?);
        axum::serve(listener, router).await?;
        anyhow::Ok(())
    })
}
