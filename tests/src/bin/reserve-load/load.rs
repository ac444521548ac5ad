//! The hot-SKU reservation load generator, shared by `benches/reservations.rs` (against an
//! in-process hub) and the `reserve-load` binary (against any server at a URL, such as
//! `limit-server`): `clients` tasks, each with its own HTTP connection, post
//! `{"id": <fresh UUIDv7>, "lines": [{"sku": "HOT", "qty": 1}]}` to `POST /v1/reservations` with a
//! bearer token, back to back, for `secs` seconds. Every answer must be 201.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use uuid::Uuid;

/// The SKU every client reserves.
pub const HOT_SKU: &str = "HOT";

/// One round's figures.
pub struct Round {
    /// Reservations answered 201 per second of wall time.
    pub rate: f64,
    /// Latency percentiles in milliseconds (request sent → answer read).
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// Clients, seconds per round and rounds, from the environment: `SHELFSYNC_BENCH_CLIENTS`
/// (default 64), `SHELFSYNC_BENCH_SECS` (5), `SHELFSYNC_BENCH_ROUNDS` (3); `SHELFSYNC_BENCH_QUICK`
/// makes the defaults 1 s and 1 round.
pub fn params() -> (usize, u64, usize) {
    let quick = std::env::var_os("SHELFSYNC_BENCH_QUICK").is_some();
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    let clients = env("SHELFSYNC_BENCH_CLIENTS").unwrap_or(64).max(1) as usize;
    let secs = env("SHELFSYNC_BENCH_SECS").unwrap_or(if quick { 1 } else { 5 }).max(1);
    let rounds = env("SHELFSYNC_BENCH_ROUNDS").unwrap_or(if quick { 1 } else { 3 }).max(1) as usize;
    (clients, secs, rounds)
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1e3
}

/// The middle value (upper middle for an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// One round against `base_url` (no trailing slash). Fails on the first answer that is not 201,
/// with its status and body.
pub async fn round(base_url: &str, token: &str, clients: usize, secs: u64) -> anyhow::Result<Round> {
    let url = format!("{base_url}/v1/reservations");
    let deadline = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let lat = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (url, token, lat) = (url.clone(), token.to_owned(), lat.clone());
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut mine = Vec::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                let r = http
                    .post(&url)
                    .bearer_auth(&token)
                    .json(&json!({"id": Uuid::now_v7(), "lines": [{"sku": HOT_SKU, "qty": 1}]}))
                    .send()
                    .await?;
                let status = r.status();
                // Read the whole answer, as a real client would (and so the connection is reused).
                let body = r.bytes().await?;
                anyhow::ensure!(status == 201, "POST {url} answered {status}: {}", String::from_utf8_lossy(&body));
                mine.push(t.elapsed());
            }
            lat.lock().unwrap().extend(mine);
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let mut l = std::mem::take(&mut *lat.lock().unwrap());
    anyhow::ensure!(!l.is_empty(), "no reservation completed in {secs} s");
    l.sort();
    Ok(Round { rate: l.len() as f64 / elapsed, p50_ms: pct(&l, 0.5), p99_ms: pct(&l, 0.99) })
}

/// The result line `scripts/bench-reservations.sh` greps for (medians over the rounds).
pub fn line(label: &str, clients: usize, rounds: &[Round], note: &str) -> String {
    let rate = median(rounds.iter().map(|r| r.rate).collect());
    let p50 = median(rounds.iter().map(|r| r.p50_ms).collect());
    let p99 = median(rounds.iter().map(|r| r.p99_ms).collect());
    format!("{label:<15}{clients} clients  {rate:>8.0} reservations/s  p50 {p50:>6.2} ms  p99 {p99:>6.2} ms  ({note})")
}
