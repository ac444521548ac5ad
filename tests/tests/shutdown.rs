//! `SIGTERM` stops the real hub and agent binaries promptly whatever is connected: open SSE
//! streams end, agents' QUIC connections close, POS writes in flight finish (and are on disk) or
//! are refused, and the process exits 0.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use shelfsync_tests::cluster::Cluster;
use shelfsync_tests::procs::wait_until;
use uuid::Uuid;

/// What the issue asks for; a noisy shared machine gets one more second before the test fails.
const TARGET: Duration = Duration::from_secs(2);
const ALLOWED: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_stops_the_hub_with_event_streams_and_agents_connected() {
    let mut c = Cluster::start(2).await;
    c.restock(0, "S", 10).await;
    c.converged(&["S"], Duration::from_secs(30)).await;
    // Two SSE clients, one of them mid-read.
    let http = reqwest::Client::new();
    let mut streams = Vec::new();
    for _ in 0..2 {
        let r =
            http.get(format!("{}/v1/events?after=0", c.hub_url())).bearer_auth(&c.admin_token).send().await.unwrap();
        assert_eq!(r.status(), 200);
        streams.push(r);
    }
    let first = streams[0].chunk().await.expect("bytes").expect("an event");
    assert!(!first.is_empty());
    let readers: Vec<_> = streams
        .into_iter()
        .map(|mut s| {
            tokio::spawn(async move {
                // Reads until the hub ends the stream (Ok) or cuts it (Err): either way it ends.
                loop {
                    match s.chunk().await {
                        Ok(Some(_)) => {}
                        Ok(None) => return "ended",
                        Err(_) => return "cut",
                    }
                }
            })
        })
        .collect();

    let (status, took) = c.hub.take().unwrap().terminate(Duration::from_secs(10)).await;
    println!("hub exited {status} {took:?} after SIGTERM (target {TARGET:?})");
    assert!(status.success(), "hub exit status {status}");
    assert!(took <= ALLOWED, "the hub took {took:?} to stop (target {TARGET:?})");
    for r in readers {
        let how = tokio::time::timeout(Duration::from_secs(2), r).await.expect("the SSE stream ended").unwrap();
        assert_eq!(how, "ended", "the hub ends event streams cleanly");
    }
    // The agents noticed and keep selling offline; a restarted hub takes them back.
    assert_eq!(c.sell(0, "S", 1).await, 201);
    c.start_hub().await;
    c.converged(&["S"], Duration::from_secs(30)).await;
    assert_eq!(c.hub_on_hand("S").await.get("store-0"), Some(&9));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_stops_the_agent_and_every_acknowledged_sale_is_kept() {
    let mut c = Cluster::start(1).await;
    c.restock(0, "T", 100_000).await;
    c.converged(&["T"], Duration::from_secs(30)).await;
    let url = c.agent_url(0);
    let acked: Arc<Mutex<HashSet<Uuid>>> = Arc::default();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (url, acked) = (url.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            loop {
                let id = Uuid::now_v7();
                let body = json!({"id": id, "lines": [{"sku": "T", "qty": 1}]});
                match http.post(format!("{url}/v1/sales")).json(&body).send().await {
                    Ok(r) if r.status().is_success() => {
                        acked.lock().unwrap().insert(id);
                    }
                    // Refused while stopping (503) or the listener is gone: the POS retries later.
                    Ok(_) | Err(_) => break,
                }
            }
        }));
    }
    wait_until("sales in flight", Duration::from_secs(30), || async {
        (acked.lock().unwrap().len() >= 50).then_some(())
    })
    .await;
    let (status, took) = c.agents[0].take().unwrap().terminate(Duration::from_secs(10)).await;
    println!("agent exited {status} {took:?} after SIGTERM (target {TARGET:?})");
    assert!(status.success(), "agent exit status {status}");
    assert!(took <= ALLOWED, "the agent took {took:?} to stop (target {TARGET:?})");
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(10), t).await.expect("writers stop").unwrap();
    }
    let acked = acked.lock().unwrap().len() as i64;
    // Restarted on the same files: exactly the acknowledged sales are there, and reach the hub.
    c.start_agent(0).await;
    assert_eq!(c.agent_on_hand(0, "T").await, 100_000 - acked);
    c.converged(&["T"], Duration::from_secs(30)).await;
    assert_eq!(c.hub_on_hand("T").await.get("store-0"), Some(&(100_000 - acked)));
}
