//! The README's main command works: `shelfsync-hub demo` tells its story (a named catalog, a
//! flash sale, a store that goes dark and is oversold, the oversell found and reconciled), prints
//! a viewer token and the URLs, and the hub converges; the milestones are checked through the
//! hub's HTTP API with the viewer token the demo printed, while it runs.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use shelfsync_tests::procs::{bin, wait_until};
use tokio::io::{AsyncBufReadExt, BufReader};

fn after<'a>(lines: &'a [String], prefix: &str) -> Option<&'a str> {
    lines.iter().find_map(|l| l.trim_start().strip_prefix(prefix)).map(str::trim)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_tells_its_story_and_converges() {
    let mut child = tokio::process::Command::new(bin("shelfsync-hub"))
        .args(["demo", "--for-secs", "5"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
    let sink = lines.clone();
    let reader = tokio::spawn(async move {
        while let Ok(Some(l)) = out.next_line().await {
            sink.lock().unwrap().push(l);
        }
    });
    // Drained as it comes, so the demo never blocks on a full pipe.
    let mut err = child.stderr.take().unwrap();
    let stderr = tokio::spawn(async move {
        let mut s = String::new();
        let _ = tokio::io::AsyncReadExt::read_to_string(&mut err, &mut s).await;
        s
    });
    let deadline = Duration::from_secs(120);
    let (hub, token) = wait_until("the demo to print its URLs and viewer token", deadline, || async {
        let l = lines.lock().unwrap();
        let hub = after(&l, "hub API")?.to_owned();
        let token = after(&l, "viewer token")?.split_whitespace().next()?.to_owned();
        // Every store's line too: they are printed after the token, and read as they come.
        let stores = ["store-001", "store-002", "store-003"];
        stores.iter().all(|s| l.iter().any(|x| x.contains(s) && x.contains("POS API "))).then_some(())?;
        Some((hub, token))
    })
    .await;
    assert!(hub.starts_with("http://127.0.0.1:"), "{hub}");
    {
        let l = lines.lock().unwrap();
        assert_eq!(after(&l, "dashboard"), Some(format!("{hub}/?token={token}").as_str()), "{l:?}");
        for s in ["store-001", "store-002", "store-003"] {
            assert!(l.iter().any(|x| x.contains(s) && x.contains("POS API http://127.0.0.1:")), "{s} URL: {l:?}");
        }
    }
    let http = reqwest::Client::new();
    let get = |path: &str| {
        let req = http.get(format!("{hub}{path}")).bearer_auth(&token);
        async move {
            let r = req.send().await.ok()?;
            r.status().is_success().then_some(())?;
            r.json::<Value>().await.ok()
        }
    };

    // The catalog has names.
    let catalog = wait_until("the named catalog", deadline, || async {
        let c = get("/v1/catalog").await?;
        (c["items"].as_array()?.len() == 4).then_some(c)
    })
    .await;
    let jacket = catalog["items"].as_array().unwrap().iter().find(|i| i["sku"] == "JKT-010").unwrap().clone();
    assert_eq!(jacket["name"], "Rain jacket, navy", "{catalog}");
    // The flash sale's reservations.
    wait_until("the flash sale's reservations", deadline, || async {
        let o = get("/v1/overview").await?;
        let r = &o["reservations"];
        (r["held"].as_u64()? + r["committed"].as_u64()? >= 13 && r["committed"].as_u64()? >= 8).then_some(())
    })
    .await;
    // store-003 went dark and was oversold; the hub re-sourced what it could and marked the pickup short.
    let conflict = wait_until("the oversell conflict at store-003", deadline, || async {
        let v = get("/v1/conflicts?store=store-003&sku=JKT-010").await?;
        v["items"].as_array()?.iter().find(|c| c["kind"] == "oversell").cloned()
    })
    .await;
    assert_eq!(conflict["shortfall"], 4, "20 jackets, 14 promised online, 10 sold at the till: {conflict}");
    let resolution = conflict["resolution"].as_str().unwrap();
    let (moved, short) = resolution.split_once("; ").unwrap_or_else(|| panic!("re-sourced and short: {conflict}"));
    let moved: u64 = moved
        .strip_prefix("re-sourced ")
        .unwrap_or_else(|| panic!("{conflict}"))
        .split(", ")
        .map(|m| m.split_once(" to ").and_then(|(n, _)| n.parse::<u64>().ok()).unwrap_or_else(|| panic!("{conflict}")))
        .sum();
    assert_eq!((moved, short), (2, "2 marked short"), "two shipped jackets re-sourced, the pickup short: {conflict}");
    assert_eq!(conflict["status"], "open", "a short pickup needs a person: {conflict}");

    let status = tokio::time::timeout(deadline, child.wait()).await.expect("demo finished").unwrap();
    reader.await.unwrap();
    let stderr = stderr.await.unwrap();
    let stdout = lines.lock().unwrap().join("\n");
    assert!(status.success(), "demo failed: {stderr}\n{stdout}");
    for milestone in [
        "[demo] 1/6 catalog",
        "[demo] 4/6 flash sale",
        "[demo] 5/6 store-003 went dark",
        "[demo] 6/6 oversell at store-003",
    ] {
        assert!(stdout.contains(milestone), "{milestone} missing:\n{stdout}");
    }
    assert!(stdout.contains("the hub converged to exactly the stores' counts"), "{stdout}");
    assert!(stdout.contains("[demo] stopped"), "{stdout}");
}
