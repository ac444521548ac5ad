//! Crash durability of the real agent binary: stream sales, `kill -9` it mid-stream, restart on
//! the same data dir. Every sale that got a 2xx is there, and none is counted twice.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use shelfsync_tests::procs::Proc;
use uuid::Uuid;

async fn start(dir: &str) -> Proc {
    Proc::start("shelfsync-agent", &["run", "--data-dir", dir, "--listen", "127.0.0.1:0"], &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_sales_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    Proc::run_ok("shelfsync-agent", &["init", "--store-id", "store-crash", "--data-dir", d]).await;
    let agent = start(d).await;
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{}/v1/counts", agent.url))
        .json(&json!({"id": Uuid::now_v7(), "sku": "A", "counted": 1_000_000}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);

    let acked: Arc<Mutex<HashSet<Uuid>>> = Arc::default();
    let attempted: Arc<Mutex<HashSet<Uuid>>> = Arc::default();
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let (http, url, acked, attempted) = (http.clone(), agent.url.clone(), acked.clone(), attempted.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let id = Uuid::now_v7();
                attempted.lock().unwrap().insert(id);
                let body = json!({"id": id, "lines": [{"sku": "A", "qty": 1}]});
                match http.post(format!("{url}/v1/sales")).json(&body).send().await {
                    Ok(r) if r.status().is_success() => {
                        acked.lock().unwrap().insert(id);
                    }
                    Ok(r) => panic!("unexpected status {}", r.status()),
                    Err(_) => return, // the agent died under us
                }
            }
        }));
    }
    // Let a few hundred sales through, then pull the plug while requests are in flight.
    shelfsync_tests::procs::wait_until("300 acknowledged sales", std::time::Duration::from_secs(60), || {
        let n = acked.lock().unwrap().len();
        async move { (n >= 300).then_some(()) }
    })
    .await;
    agent.kill9().await;
    for t in tasks {
        t.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let attempted = attempted.lock().unwrap().clone();

    let agent = start(d).await;
    let status: Value = http.get(format!("{}/v1/status", agent.url)).send().await.unwrap().json().await.unwrap();
    let stock: Value = http.get(format!("{}/v1/stock/A", agent.url)).send().await.unwrap().json().await.unwrap();
    let recorded_sales = status["journal_events"].as_i64().unwrap() - 1;
    let on_hand = stock["on_hand"].as_i64().unwrap();
    assert_eq!(on_hand, 1_000_000 - recorded_sales, "each recorded sale counted exactly once");
    assert!(recorded_sales >= acked.len() as i64, "lost acknowledged sales: {recorded_sales} < {}", acked.len());
    assert!(recorded_sales <= attempted.len() as i64);

    // Every acknowledged id is there: a retry is answered as a replay (200), not recorded anew.
    for id in &acked {
        let r = http
            .post(format!("{}/v1/sales", agent.url))
            .json(&json!({"id": id, "lines": [{"sku": "A", "qty": 1}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "acknowledged sale {id} was not on disk after kill -9");
    }
    let stock: Value = http.get(format!("{}/v1/stock/A", agent.url)).send().await.unwrap().json().await.unwrap();
    assert_eq!(stock["on_hand"].as_i64().unwrap(), on_hand, "retries changed nothing");
    agent.stop().await;
}
