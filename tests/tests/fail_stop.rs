//! Fail-stop of the hub's runtime: when a batch of decisions cannot be committed, the hub answers
//! the waiting callers 503, writes nothing more and exits non-zero; a restart reloads exactly what
//! was committed (the refused request was never applied and can be sent again).

use std::time::Duration;

use serde_json::{json, Value};
use shelfsync_tests::procs::Proc;

async fn serve(hd: &str) -> Proc {
    Proc::start(
        "shelfsync-hub",
        &["serve", "--data-dir", hd, "--quic-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"],
        &[],
    )
    .await
}

async fn restock(http: &reqwest::Client, url: &str, token: &str, id: &str) -> (u16, Value) {
    let r = http
        .post(format!("{url}/v1/restocks"))
        .bearer_auth(token)
        .json(&json!({"id": id, "store": "s1", "lines": [{"sku": "A", "qty": 5}]}))
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .expect("the hub answers");
    let status = r.status().as_u16();
    let retry_after = r.headers().get("retry-after").is_some();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    if status == 503 {
        assert!(retry_after, "a 503 says when to retry: {body}");
    }
    (status, body)
}

#[tokio::test]
async fn a_failed_commit_stops_the_hub_and_a_restart_reloads_what_was_committed() {
    let dir = tempfile::tempdir().unwrap();
    let hd = dir.path().join("hub");
    let hd = hd.to_str().unwrap();
    Proc::run_ok("shelfsync-hub", &["init", "--data-dir", hd]).await;
    let token = Proc::run_ok("shelfsync-hub", &["token", "create", "--role", "admin", "--data-dir", hd]).await;
    let token = token.trim();
    let bundle = dir.path().join("bundle");
    Proc::run_ok(
        "shelfsync-hub",
        &["store", "add", "s1", "--out", bundle.to_str().unwrap(), "--hub-addr", "127.0.0.1:7443", "--data-dir", hd],
    )
    .await;
    let http = reqwest::Client::new();
    let hub = serve(hd).await;
    let first = uuid::Uuid::now_v7().to_string();
    assert_eq!(restock(&http, &hub.url, token, &first).await.0, 201);

    // Another process takes the database's write lock and keeps it past the hub's busy timeout:
    // the hub's next commit fails.
    let lock = rusqlite::Connection::open(dir.path().join("hub/hub.db")).unwrap();
    lock.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let second = uuid::Uuid::now_v7().to_string();
    let (status, body) = restock(&http, &hub.url, token, &second).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "unavailable", "{body}");
    let exit = hub.exited(Duration::from_secs(30)).await;
    assert!(!exit.success(), "a fail-stop exits non-zero: {exit}");
    lock.execute_batch("ROLLBACK").unwrap();
    drop(lock);

    // The restart has the committed restock and not the refused one, which can be sent again.
    let hub = serve(hd).await;
    let stock: Value = http
        .get(format!("{}/v1/stores/s1/stock", hub.url))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stock["items"][0]["on_hand"], 5, "{stock}");
    assert_eq!(restock(&http, &hub.url, token, &first).await.0, 200, "the first restock replays");
    assert_eq!(restock(&http, &hub.url, token, &second).await.0, 201, "the refused restock was never applied");
    hub.stop().await;
}
