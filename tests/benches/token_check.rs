//! What checking an API token in storage on every request costs (so a revocation written by any
//! process counts from the next request): the check alone, sequential and with 64 concurrent
//! callers, and an authenticated request next to an unauthenticated one over HTTP. For scale, the
//! lookup the former in-process 5 s cache did instead is timed too.
//!
//! `cargo bench -p shelfsync-tests --bench token_check`

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shelfsync_hub::tokens::Verdict;
use shelfsync_node::config::Synchronous;
use shelfsync_tests::inproc::Chain;

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    us(sorted[((sorted.len() as f64 - 1.0) * p).round() as usize])
}

async fn http_p50(http: &reqwest::Client, url: &str, token: Option<&str>, n: usize) -> (f64, f64) {
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let mut req = http.get(url);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let t = Instant::now();
        let r = req.send().await.unwrap();
        assert!(r.status().is_success(), "{url}: {}", r.status());
        r.bytes().await.unwrap();
        lat.push(t.elapsed());
    }
    lat.sort();
    (pct(&lat, 0.5), pct(&lat, 0.99))
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let quick = std::env::var_os("SHELFSYNC_BENCH_QUICK").is_some();
    let n = if quick { 2_000 } else { 20_000 };
    let chain = Chain::start(0, Synchronous::Normal, Synchronous::Full).await?;
    let hub = chain.hub.hub.clone();
    let token = chain.admin_token.clone();
    for _ in 0..1000 {
        assert!(matches!(hub.authenticate(&token).await?, Verdict::Valid(_)));
    }

    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let v = hub.authenticate(&token).await?;
        lat.push(t.elapsed());
        assert!(matches!(v, Verdict::Valid(_)));
    }
    lat.sort();
    println!("| token check in storage, 1 caller | {:.1} µs p50 | {:.1} µs p99 |", pct(&lat, 0.5), pct(&lat, 0.99));

    let clients = 64;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (hub, token) = (hub.clone(), token.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..n / clients {
                assert!(matches!(hub.authenticate(&token).await.unwrap(), Verdict::Valid(_)));
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let rate = (n / clients * clients) as f64 / start.elapsed().as_secs_f64();
    println!("| token check in storage, {clients} callers | {rate:.0} checks/s | {:.1} µs each |", 1e6 / rate);

    // What the former cache did per request: a hash and a map lookup under a mutex.
    let cache: Arc<Mutex<HashMap<Vec<u8>, u8>>> = Arc::default();
    cache.lock().unwrap().insert(shelfsync_hub::api::token_hash(&token), 1);
    let t = Instant::now();
    for _ in 0..n {
        let h = shelfsync_hub::api::token_hash(&token);
        assert!(cache.lock().unwrap().get(&h).is_some());
    }
    println!("| in-memory lookup (the former 5 s cache) | {:.2} µs each |", us(t.elapsed()) / n as f64);

    let http = reqwest::Client::new();
    let base = chain.hub.url();
    let m = n / 4;
    http_p50(&http, &format!("{base}/healthz"), None, 500).await;
    let (h50, h99) = http_p50(&http, &format!("{base}/healthz"), None, m).await;
    let (a50, a99) = http_p50(&http, &format!("{base}/metrics"), Some(&token), m).await;
    println!("| HTTP GET /healthz (no token) | {h50:.0} µs p50 | {h99:.0} µs p99 |");
    println!("| HTTP GET /metrics (token checked) | {a50:.0} µs p50 | {a99:.0} µs p99 |");
    chain.stop().await;
    Ok(())
}
