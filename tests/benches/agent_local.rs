//! Local sale latency and throughput through the agent's HTTP API.
//!
//! `cargo bench -p shelfsync-tests --bench agent_local`
//!
//! Prints p50/p99 latency of one client posting sales one at a time, with SQLite
//! `synchronous=FULL` (the default: every acknowledged sale survives power loss) and `NORMAL`,
//! then sustained sales/s with 1, 8 and 64 concurrent clients. Each figure is the median of
//! several rounds; the machine is shared, so compare figures of the same run only.

use std::time::{Duration, Instant};

use serde_json::json;
use shelfsync_agent::config::AgentConfig;
use shelfsync_agent::db::{Db, DbOptions};
use shelfsync_agent::server::{start, RunningAgent};
use shelfsync_node::config::Synchronous;
use uuid::Uuid;

const ROUNDS: usize = 5;

async fn agent(sync: Synchronous, dir: &std::path::Path) -> RunningAgent {
    let mut config = AgentConfig::default();
    config.data_dir = dir.to_owned();
    config.api.listen = "127.0.0.1:0".parse().unwrap();
    // Throughput is the point here: thousands of sales a second from one address.
    config.api.rate_limit = shelfsync_agent::config::AgentRateLimits::raised(10_000_000);
    config.storage.synchronous = sync;
    config.log.filter = "warn".into();
    Db::create(&config.db_path(), &"bench-store".parse().unwrap(), DbOptions::default()).unwrap();
    start(config).await.unwrap()
}

async fn one_sale(http: &reqwest::Client, url: &str, sku: &str) {
    let body = json!({"id": Uuid::now_v7(), "lines": [{"sku": sku, "qty": 1}]});
    let r = http.post(url).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 201);
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

async fn latency(agent: &RunningAgent, n: usize) -> (f64, f64) {
    let http = reqwest::Client::new();
    let url = format!("{}/v1/sales", agent.url());
    for _ in 0..50 {
        one_sale(&http, &url, "WARM").await;
    }
    let (mut p50s, mut p99s) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let mut samples = Vec::with_capacity(n);
        for i in 0..n {
            let t = Instant::now();
            one_sale(&http, &url, &format!("SKU-{}", i % 100)).await;
            samples.push(t.elapsed());
        }
        samples.sort();
        p50s.push(percentile(&samples, 0.50).as_secs_f64() * 1e3);
        p99s.push(percentile(&samples, 0.99).as_secs_f64() * 1e3);
    }
    (median(p50s), median(p99s))
}

async fn throughput(agent: &RunningAgent, clients: usize, per_round: Duration) -> f64 {
    let url = format!("{}/v1/sales", agent.url());
    let mut rates = Vec::new();
    for _ in 0..ROUNDS {
        let deadline = Instant::now() + per_round;
        let start = Instant::now();
        let mut tasks = Vec::new();
        for c in 0..clients {
            let url = url.clone();
            tasks.push(tokio::spawn(async move {
                let http = reqwest::Client::new();
                let mut n = 0u64;
                while Instant::now() < deadline {
                    one_sale(&http, &url, &format!("SKU-{}", (c + n as usize) % 100)).await;
                    n += 1;
                }
                n
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await.unwrap();
        }
        rates.push(total as f64 / start.elapsed().as_secs_f64());
    }
    median(rates)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    // `cargo bench` passes --bench; a quick mode for smoke runs.
    let quick = std::env::args().any(|a| a == "--quick") || std::env::var_os("SHELFSYNC_BENCH_QUICK").is_some();
    let (n, per_round) = if quick { (200, Duration::from_millis(300)) } else { (1000, Duration::from_secs(2)) };
    println!("agent local sales through HTTP on 127.0.0.1 (median of {ROUNDS} rounds; {n} sequential sales per latency round)");
    println!(
        "{:<10} {:>10} {:>10} {:>12} {:>12} {:>12}",
        "sync", "p50 ms", "p99 ms", "1 client/s", "8 clients/s", "64 clients/s"
    );
    for sync in [Synchronous::Full, Synchronous::Normal] {
        let dir = tempfile::tempdir().unwrap();
        let a = agent(sync, dir.path()).await;
        let (p50, p99) = latency(&a, n).await;
        let t1 = throughput(&a, 1, per_round).await;
        let t8 = throughput(&a, 8, per_round).await;
        let t64 = throughput(&a, 64, per_round).await;
        println!("{:<10} {:>10.3} {:>10.3} {:>12.0} {:>12.0} {:>12.0}", sync.pragma(), p50, p99, t1, t8, t64);
        a.stop().await.unwrap();
    }
}
