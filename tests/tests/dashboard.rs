//! The headquarters dashboard in a real browser: a live hub with two stores, an oversell conflict
//! and an offline store; headless Chromium (through chromedriver) shows the stores, the conflict,
//! the catalog with names, and a change made after the page loaded on the live feed; a wrong
//! token is refused at the top of the page. `GET /v1/overview`, which the page reads, is checked
//! through the API first. Screenshots go to a temp dir, and to `SHELFSYNC_SCREENSHOT_DIR` when set.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use shelfsync_tests::browser::Browser;
use shelfsync_tests::cluster::Cluster;
use shelfsync_tests::procs::wait_until;
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(60);

async fn page_text(b: &Browser, selector: &str, what: &str, want: &[&str]) -> String {
    wait_until(what, DEADLINE, || async {
        let t = b.text(selector).await;
        want.iter().all(|w| t.contains(w)).then_some(t)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dashboard_shows_the_chain_live_in_a_real_browser() {
    // First, so a machine without Chromium fails at once, saying what to install.
    let b = Browser::start().await;
    let mut c = Cluster::start(2).await;
    let (s, v) = c.hub_post("/v1/tokens", json!({"role": "viewer", "name": "dashboard"})).await;
    assert_eq!(s, 201, "{v}");
    let viewer = v["token"].as_str().unwrap().to_owned();
    let amazon =
        json!({"fulfil": {"stores": ["store-1"]}, "buffer": {"units": 1}, "latency": {"lagged": {"lag_secs": 600}}});
    let (s, v) = c.hub_call(Method::PUT, "/v1/channels/amazon", Some(amazon)).await;
    assert_eq!(s, 201, "{v}");
    for (sku, name, threshold) in [("OAK-1", "Oak shelf", 5), ("PINE-2", "Pine board", 0)] {
        let (s, v) = c
            .hub_call(
                Method::PUT,
                &format!("/v1/catalog/{sku}"),
                Some(json!({"name": name, "low_stock_threshold": threshold})),
            )
            .await;
        assert_eq!(s, 200, "{v}");
    }

    // An oversell nobody can cover: the web reserves both oak shelves of store-0, the till sells one.
    c.restock(0, "OAK-1", 2).await;
    c.restock(1, "PINE-2", 5).await;
    c.converged(&["OAK-1", "PINE-2"], DEADLINE).await;
    let (s, r) =
        c.hub_post("/v1/reservations", json!({"id": Uuid::now_v7(), "lines": [{"sku": "OAK-1", "qty": 2}]})).await;
    assert_eq!(s, 201, "{r}");
    assert_eq!(c.sell(0, "OAK-1", 1).await, 201);
    wait_until("the oversell conflict", DEADLINE, || async {
        let v = c.hub_get("/v1/conflicts?status=open").await;
        v["items"].as_array().unwrap().iter().any(|x| x["kind"] == "oversell" && x["store"] == "store-0").then_some(())
    })
    .await;
    c.stop_agent(1).await; // store-1 goes dark

    // The figures the page shows, through the API.
    let o = wait_until("the overview to show store-1 offline and store-0's restock acknowledged", DEADLINE, || async {
        let o = c.hub_get("/v1/overview").await;
        (o["stores"][1]["connected"] == false && o["stores"][0]["unsynced_hub_changes"] == 0).then_some(o)
    })
    .await;
    assert_eq!(o["stores"][0]["id"], "store-0", "{o}");
    assert_eq!(o["stores"][0]["connected"], true, "{o}");
    assert_eq!(o["stores"][0]["open_conflicts"], 1, "{o}");
    assert_eq!(o["stores"][0]["out_of_stock"], 1, "OAK-1: on hand 1, held 1 → nothing offered: {o}");
    assert_eq!(o["open_conflicts"], json!({"oversell": 1}), "{o}");
    assert_eq!(o["out_of_stock"], 1, "{o}");
    let res = &o["reservations"];
    assert_eq!((res["held"].as_u64(), res["short"].as_u64(), res["units_short"].as_u64()), (Some(1), Some(1), Some(1)));
    assert_eq!(res["units_held"], 1, "{o}");
    let sum = |v: &Value| v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).sum::<u64>();
    assert_eq!(sum(&o["series"]["sold"]["store-0"]), 1, "one oak shelf sold: {o}");
    assert_eq!(sum(&o["series"]["sold"]["store-1"]), 0, "{o}");
    assert_eq!(sum(&o["series"]["reserved"]["store-0"]), 2, "two reserved online: {o}");
    assert_eq!(o["series"]["buckets"], 30);
    let (s, e) = c.hub_call(Method::GET, "/v1/overview?minutes=0", None).await;
    assert_eq!(
        (s, e["error"].as_str(), e["parameter"].as_str()),
        (422, Some("invalid_request"), Some("minutes")),
        "{e}"
    );
    let pine = c.hub_get("/v1/catalog?q=pINe").await;
    assert_eq!(pine["items"].as_array().unwrap().len(), 1, "{pine}");
    assert_eq!(pine["items"][0]["name"], "Pine board");
    let (s, e) = c.hub_call(Method::GET, &format!("/v1/catalog?q={}", "x".repeat(129)), None).await;
    assert_eq!((s, e["parameter"].as_str()), (422, Some("q")), "{e}");

    // The page, in the browser.
    let head_at_load = o["feed_head"].as_u64().unwrap();
    b.goto(&format!("{}/?token={viewer}", c.hub_url())).await;
    let stores = page_text(&b, "#stores", "both stores on the page", &["store-0", "store-1"]).await;
    let row = |id: &'static str| {
        let b = &b;
        async move { b.text(&format!("#stores tr[data-store='{id}']")).await }
    };
    assert!(row("store-0").await.contains("online"), "{stores}");
    assert!(row("store-1").await.contains("offline"), "{stores}");
    let url = b.eval("return location.href", vec![]).await;
    assert!(!url.as_str().unwrap().contains("token="), "the token leaves the address bar: {url}");
    page_text(&b, "#conflicts", "the open oversell on the page", &["oversell", "store-0", "OAK-1"]).await;
    page_text(&b, "#tiles", "the glance tiles", &["Open conflicts", "Stores online", "1 / 2", "Reservations short"])
        .await;
    // The catalog with names, before anyone types anything; then the search narrows it.
    page_text(&b, "#stock", "the catalog listed", &["Oak shelf", "Pine board"]).await;
    b.type_into("#search", "pine").await;
    wait_until("the search to narrow the list", DEADLINE, || async {
        let t = b.text("#stock").await;
        (t.contains("Pine board") && !t.contains("Oak shelf")).then_some(())
    })
    .await;
    // Each channel's figures: its configuration and reservations, and per SKU what it may promise.
    let channels =
        page_text(&b, "#channels", "the sales channels", &["amazon", "store-1", "lagged 600 s", "web (defaults)"])
            .await;
    let web = b.text("#channels tr[data-channel='web']").await;
    assert!(web.contains("every store") && web.contains("live"), "{channels}");
    page_text(&b, "#stock", "what each channel may promise", &["Pine board", "amazon ", "web "]).await;
    let lines: u64 =
        b.eval("return document.querySelectorAll('#chart-sold polyline').length", vec![]).await.as_u64().unwrap();
    assert_eq!(lines, 2, "one line per store in the sales chart");

    // The feed is live from now: a change made after the page loaded shows up, and nothing older.
    page_text(&b, "#live", "the feed to connect", &["live"]).await;
    c.restock(0, "PINE-2", 3).await;
    page_text(
        &b,
        "#feed",
        "the restock on the live feed",
        &["availability_changed", "store-0", "PINE-2", "Pine board"],
    )
    .await;
    let cursors = b
        .eval("return [...document.querySelectorAll('#feed tr[data-cursor]')].map(e => +e.dataset.cursor)", vec![])
        .await;
    let cursors: Vec<u64> = cursors.as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    assert!(
        !cursors.is_empty() && cursors.iter().all(|c| *c > head_at_load),
        "only events after the page loaded: {cursors:?} vs head {head_at_load}"
    );

    let shots = tempfile::tempdir().unwrap();
    let mut dirs = vec![shots.path().to_owned()];
    if let Some(d) = std::env::var_os("SHELFSYNC_SCREENSHOT_DIR") {
        dirs.push(d.into());
    }
    b.eval("document.getElementById('search').value = ''; document.getElementById('search').dispatchEvent(new Event('input'));", vec![]).await;
    page_text(&b, "#stock", "the full list again", &["Oak shelf", "Pine board"]).await;
    for d in &dirs {
        let p = b.save_screenshot(d, "dashboard.png").await;
        let png = std::fs::read(&p).unwrap();
        assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "{} is a real screenshot", p.display());
    }

    // A wrong token is refused, clearly, at the top, and the sign-in form comes back.
    b.eval("sessionStorage.clear()", vec![]).await;
    b.goto(&format!("{}/?token=ss_not-a-real-token", c.hub_url())).await;
    let err = page_text(&b, "#error", "the refusal at the top", &["token was refused"]).await;
    assert!(err.contains("unknown token"), "{err}");
    let login_shown =
        b.eval("return getComputedStyle(document.getElementById('login')).display !== 'none'", vec![]).await;
    assert_eq!(login_shown, true);
    let app_shown = b.eval("return getComputedStyle(document.getElementById('app')).display !== 'none'", vec![]).await;
    assert_eq!(app_shown, false, "no data without a valid token");
    for d in &dirs {
        b.save_screenshot(d, "dashboard-wrong-token.png").await;
    }
    // The sign-in form takes a good token.
    b.type_into("#token", &viewer).await;
    b.click("#login button").await;
    page_text(&b, "#stores", "the stores after signing in", &["store-0", "store-1"]).await;
    assert_eq!(b.text("#error").await, "", "the error is gone once signed in");

    // Resolving a conflict from the page: a viewer token is told it needs an admin one; with an
    // admin token the note becomes the resolution and the row goes away.
    page_text(&b, "#conflicts", "the oversell for the viewer", &["oversell"]).await;
    b.type_into("#conflicts tr[data-kind='oversell'] input.note", "refunded the customer").await;
    b.click("#conflicts tr[data-kind='oversell'] button").await;
    page_text(&b, "#conflicts", "the refusal for a viewer", &["needs an admin token"]).await;
    b.eval("sessionStorage.clear()", vec![]).await;
    b.goto(&format!("{}/?token={}", c.hub_url(), c.admin_token)).await;
    page_text(&b, "#conflicts", "the oversell for the admin", &["oversell"]).await;
    b.type_into("#conflicts tr[data-kind='oversell'] input.note", "refunded the customer").await;
    b.click("#conflicts tr[data-kind='oversell'] button").await;
    page_text(&b, "#conflicts", "no open conflict left", &["no open conflicts"]).await;
    let v = c.hub_get("/v1/conflicts?status=resolved").await;
    let resolved = v["items"].as_array().unwrap().iter().find(|x| x["kind"] == "oversell").cloned().unwrap();
    assert_eq!(resolved["resolution"], "refunded the customer (resolved by unnamed)", "{v}");
}
