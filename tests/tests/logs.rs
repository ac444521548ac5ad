//! The hub binary's logs with `log.format = "json"` on a pipe: every stderr line is one JSON
//! object without escape codes, a request produces a request-log line with its route template,
//! status and token name, and an agent that stops normally is not a warning.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use shelfsync_tests::procs::{bin, wait_until, Proc};
use tokio::io::{AsyncBufReadExt, BufReader};

const DEADLINE: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_on_a_pipe_with_a_request_log() {
    let dir = tempfile::tempdir().unwrap();
    let hd = dir.path().join("hub");
    let hd = hd.to_str().unwrap();
    Proc::run_ok("shelfsync-hub", &["init", "--data-dir", hd]).await;
    let token = Proc::run_ok(
        "shelfsync-hub",
        &["token", "create", "--role", "admin", "--name", "ops-laptop", "--data-dir", hd],
    )
    .await
    .trim()
    .to_owned();
    let mut child = tokio::process::Command::new(bin("shelfsync-hub"))
        .args(["serve", "--data-dir", hd, "--quic-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
        .env("SHELFSYNC_HUB__LOG__FORMAT", "json")
        .env("SHELFSYNC_HUB__LOG__FILTER", "info")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let lines: Arc<Mutex<Vec<String>>> = Arc::default();
    let stderr = child.stderr.take().unwrap();
    let sink = lines.clone();
    let reader = tokio::spawn(async move {
        let mut r = BufReader::new(stderr).lines();
        while let Ok(Some(l)) = r.next_line().await {
            sink.lock().unwrap().push(l);
        }
    });
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut url, mut quic) = (String::new(), String::new());
    while url.is_empty() {
        let l = tokio::time::timeout(DEADLINE, out.next_line()).await.unwrap().unwrap().expect("hub announces itself");
        if let Some((_, a)) = l.split_once("quic on ") {
            quic = a.trim().to_owned();
        }
        if let Some((_, u)) = l.split_once("listening on ") {
            url = u.trim().to_owned();
        }
    }
    tokio::spawn(async move { while let Ok(Some(_)) = out.next_line().await {} });

    let http = reqwest::Client::new();
    let r = http.get(format!("{url}/v1/availability?sku=SKU-1")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = http.get(format!("{url}/v1/stores")).send().await.unwrap();
    assert_eq!(r.status(), 401);

    let find = |pred: &dyn Fn(&Value) -> bool| -> Option<Value> {
        lines.lock().unwrap().iter().filter_map(|l| serde_json::from_str::<Value>(l).ok()).find(|v| pred(v))
    };
    let ok = wait_until("a request-log line for the availability request", DEADLINE, || async {
        find(&|v| v["target"] == "shelfsync::request" && v["span"]["route"] == "/v1/availability")
    })
    .await;
    assert_eq!(ok["level"], "INFO", "{ok}");
    assert_eq!(ok["fields"]["status"], 200, "{ok}");
    assert!(ok["fields"]["ms"].is_number(), "{ok}");
    assert_eq!(ok["span"]["method"], "GET", "{ok}");
    assert_eq!(ok["span"]["token"], "ops-laptop", "the token's name, never the token: {ok}");
    let refused = wait_until("a request-log line for the refused request", DEADLINE, || async {
        find(&|v| v["target"] == "shelfsync::request" && v["span"]["route"] == "/v1/stores")
    })
    .await;
    assert_eq!(refused["fields"]["status"], 401, "{refused}");
    assert!(refused["span"].get("token").is_none(), "no token name without a valid token: {refused}");

    // A store connects and its agent stops normally: that is no warning at the hub.
    let bundle = dir.path().join("bundle");
    Proc::run_ok(
        "shelfsync-hub",
        &["store", "add", "store-7", "--out", bundle.to_str().unwrap(), "--hub-addr", &quic, "--data-dir", hd],
    )
    .await;
    let ad = dir.path().join("agent");
    Proc::run_ok(
        "shelfsync-agent",
        &["init", "--bundle", bundle.to_str().unwrap(), "--data-dir", ad.to_str().unwrap()],
    )
    .await;
    let agent =
        Proc::start("shelfsync-agent", &["run", "--data-dir", ad.to_str().unwrap(), "--listen", "127.0.0.1:0"], &[])
            .await;
    wait_until("the hub to log the store's connection", DEADLINE, || async {
        find(&|v| v["fields"]["message"] == "store connected" && v["fields"]["store"] == "store-7")
    })
    .await;
    agent.stop().await;
    wait_until("the hub to log the store's departure", DEADLINE, || async {
        find(&|v| {
            v["fields"]["peer"].as_str().is_some_and(|p| p.contains("store-7"))
                && v["fields"]["message"].as_str().is_some_and(|m| m.starts_with("sync connection"))
        })
    })
    .await;

    let _ = std::process::Command::new("kill").arg("-TERM").arg(child.id().unwrap().to_string()).status();
    let status = tokio::time::timeout(DEADLINE, child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "{status}");
    tokio::time::timeout(DEADLINE, reader).await.unwrap().unwrap();
    let lines = lines.lock().unwrap();
    assert!(lines.len() >= 4, "{lines:?}");
    for l in lines.iter().filter(|l| l.contains("store-7")) {
        println!("{l}");
    }
    for l in lines.iter() {
        assert!(!l.contains('\u{1b}'), "an escape code in a piped log line: {l:?}");
        let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["timestamp"].is_string() && v["level"].is_string(), "{l}");
        let about_store = l.contains("store-7");
        assert!(
            !(about_store && matches!(v["level"].as_str(), Some("WARN" | "ERROR"))),
            "a normal agent stop is not a warning at the hub: {l}"
        );
    }
}
