//! Sales channels through the running hub (`hub/docs/channels.md`, step 2): head office adds and
//! changes channels with the CLI (`shelfsync-hub channel ...`, over the HTTP API), binds tokens
//! to them, and each channel's token sees its own available-to-sell and reserves for it; the
//! channels outlive a restart; on a partitioned database a channel reaches every partition.
//!
//! The single-hub test runs twice, as `<name>_sqlite` and `<name>_postgres`.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use shelfsync_tests::both_backends;
use shelfsync_tests::cluster::Cluster;
use shelfsync_tests::procs::{wait_until, Proc};
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(60);

/// A request to the hub with `token`: (status, body).
async fn call(c: &Cluster, token: &str, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut r = reqwest::Client::new().request(method, format!("{}{path}", c.hub_url())).bearer_auth(token);
    if let Some(b) = body {
        r = r.json(&b);
    }
    let r = r.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// `shelfsync-hub channel <args> --url .. --token <admin>`: (success, stdout + stderr).
async fn channel_cli(c: &Cluster, args: &[&str]) -> (bool, String) {
    let url = c.hub_url();
    let all: Vec<&str> = ["channel"]
        .iter()
        .copied()
        .chain(args.iter().copied())
        .chain(["--url", &url, "--token", &c.admin_token])
        .collect();
    let out = Proc::output_env("shelfsync-hub", &all, &c.hub_backend_env()).await;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// `token create` on the hub's storage: (success, the token or the error).
async fn token(c: &Cluster, args: &[&str]) -> (bool, String) {
    let args: Vec<&str> = ["token", "create"].iter().copied().chain(args.iter().copied()).collect();
    let out = c.hub_admin_output(&args).await;
    let text = if out.status.success() { out.stdout } else { out.stderr };
    (out.status.success(), String::from_utf8_lossy(&text).trim().to_owned())
}

both_backends! {
    async fn channels_bind_tokens_to_their_own_available_to_sell() {
        let mut c = Cluster::start(2).await;
        c.restock(0, "A", 10).await;
        c.restock(1, "A", 6).await;

        // Head office adds an app with a buffer and a marketplace that only store-0 fulfils.
        let (ok, out) = channel_cli(&c, &["add", "app", "--buffer", "2"]).await;
        assert!(ok && out.contains("channel app added"), "{out}");
        let (ok, out) = channel_cli(&c, &["add", "amazon", "--stores", "store-0", "--lagged", "600", "--buffer", "1"]).await;
        assert!(ok, "{out}");
        let (ok, out) = channel_cli(&c, &["add", "app"]).await;
        assert!(!ok && out.contains("channel app exists"), "{out}");
        let (ok, out) = channel_cli(&c, &["add", "ebay", "--stores", "store-9"]).await;
        assert!(!ok && out.contains("store-9"), "a store that does not exist is named: {out}");
        let (ok, out) = channel_cli(&c, &["add", "Bad_Id"]).await;
        assert!(!ok && out.contains("channel id"), "{out}");
        let (ok, out) = channel_cli(&c, &["set", "app", "--cap", "5"]).await;
        assert!(ok && out.contains("cap 5"), "{out}");
        let app = c.hub_get("/v1/channels/app").await;
        assert_eq!((app["buffer"]["units"].as_u64(), app["cap"]["units"].as_u64()), (Some(2), Some(5)), "set keeps the rest: {app}");
        let (ok, out) = channel_cli(&c, &["list", "--json"]).await;
        assert!(ok, "{out}");
        let list: Vec<Value> = serde_json::from_str(&out).unwrap();
        let ids: Vec<(&str, bool)> = list.iter().map(|c| (c["id"].as_str().unwrap(), c["configured"] == true)).collect();
        assert_eq!(ids, [("amazon", true), ("app", true), ("web", false)]);

        // Tokens are bound to a channel that exists; admin tokens are chain-wide.
        let (ok, amazon) = token(&c, &["--role", "storefront", "--channel", "amazon", "--name", "amazon connector"]).await;
        assert!(ok, "{amazon}");
        let (ok, app_token) = token(&c, &["--role", "storefront", "--channel", "app"]).await;
        assert!(ok, "{app_token}");
        let (ok, web) = token(&c, &["--role", "storefront"]).await;
        assert!(ok, "{web}");
        let (ok, e) = token(&c, &["--role", "admin", "--channel", "app"]).await;
        assert!(!ok && e.contains("chain-wide"), "{e}");
        let (ok, e) = token(&c, &["--role", "storefront", "--channel", "nosuch"]).await;
        assert!(!ok && e.contains("no channel nosuch"), "{e}");
        let listed = c.hub_get("/v1/tokens").await;
        let named = listed["items"].as_array().unwrap().iter().find(|t| t["name"] == "amazon connector").unwrap().clone();
        assert_eq!(named["channel"], "amazon", "{named}");

        // Each channel's token sees its own available-to-sell.
        let (s, v) = call(&c, &app_token, Method::GET, "/v1/availability/A", None).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!((v["available"].as_u64(), v["channel"]["id"].as_str()), (Some(5), Some("app")), "capped at 5: {v}");
        assert_eq!(v["channel"]["pool"], 16);
        let (s, v) = call(&c, &amazon, Method::GET, "/v1/availability?sku=A", None).await;
        assert_eq!(s, 200, "{v}");
        let item = &v["items"][0];
        assert_eq!(item["available"], 9, "store-0's 10 less a buffer of 1: {item}");
        let stores: Vec<&str> = item["stores"].as_array().unwrap().iter().map(|s| s["store"].as_str().unwrap()).collect();
        assert_eq!(stores, ["store-0"], "only the channel's stores");
        // One SKU's own buffer replaces the channel's for it, until cleared.
        let (ok, out) = channel_cli(&c, &["set", "amazon", "--sku-buffer", "A=4", "--sku-buffer", "B=2"]).await;
        assert!(ok && out.contains("+2 SKUs"), "{out}");
        let (_, v) = call(&c, &amazon, Method::GET, "/v1/availability/A", None).await;
        assert_eq!((v["channel"]["buffer"].as_u64(), v["available"].as_u64()), (Some(4), Some(6)), "{v}");
        let (ok, out) = channel_cli(&c, &["set", "amazon", "--clear-sku-buffer", "A"]).await;
        assert!(ok, "{out}");
        assert_eq!(c.hub_get("/v1/channels/amazon").await["sku_buffers"], json!({"B": 2}));
        let (_, v) = call(&c, &amazon, Method::GET, "/v1/availability/A", None).await;
        assert_eq!(v["available"], 9, "{v}");
        let (ok, out) = channel_cli(&c, &["set", "amazon", "--sku-buffer", "A"]).await;
        assert!(!ok && out.contains("SKU=UNITS"), "{out}");
        let (s, v) = call(&c, &amazon, Method::GET, "/v1/availability/A?channel=app", None).await;
        assert_eq!((s, v["error"].as_str()), (403, Some("forbidden")), "{v}");
        let (s, v) = call(&c, &web, Method::GET, "/v1/availability/A", None).await;
        assert_eq!((s, v["available"].as_u64(), v["channel"]["id"].as_str()), (200, Some(16), Some("web")), "{v}");
        let all = c.hub_get("/v1/availability/A?channel=all").await;
        let side: Vec<(&str, u64)> = all["channels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| (f["id"].as_str().unwrap(), f["ats"].as_u64().unwrap()))
            .collect();
        assert_eq!(side, [("amazon", 9), ("app", 5), ("web", 16)], "{all}");
        assert_eq!(all["available"], 16, "the chain's figure stays");
        let (s, v) = call(&c, &c.admin_token, Method::GET, "/v1/availability/A?channel=nosuch", None).await;
        assert_eq!(s, 404, "{v}");

        // The app (live) is refused beyond its ats; its reservation carries its channel.
        let order = |qty: u64, channel: Option<&str>| {
            let mut b = json!({"id": Uuid::now_v7(), "lines": [{"sku": "A", "qty": qty}]});
            if let Some(ch) = channel {
                b["channel"] = json!(ch);
            }
            b
        };
        let (s, v) = call(&c, &app_token, Method::POST, "/v1/reservations", Some(order(6, None))).await;
        assert_eq!((s, v["available"].as_u64()), (409, Some(5)), "{v}");
        let (s, v) = call(&c, &app_token, Method::POST, "/v1/reservations", Some(order(5, None))).await;
        assert_eq!((s, v["channel"].as_str()), (201, Some("app")), "{v}");
        let (s, v) = call(&c, &amazon, Method::POST, "/v1/reservations", Some(order(1, Some("app")))).await;
        assert_eq!(s, 403, "a channel's token reserves for its channel only: {v}");
        // The marketplace (lagged) cannot refuse: 12 from store-0's 10 is recorded, 2 short,
        // with a conflict naming the channel.
        let (s, v) = call(&c, &amazon, Method::POST, "/v1/reservations", Some(order(12, None))).await;
        assert_eq!((s, v["channel"].as_str()), (201, Some("amazon")), "{v}");
        let conflicts = c.hub_get("/v1/conflicts?status=open").await;
        let over = conflicts["items"].as_array().unwrap().iter().find(|k| k["kind"] == "channel_oversell").cloned();
        assert!(over.is_some_and(|k| k["details"]["channel"] == "amazon"), "{conflicts}");

        // Each channel's feed: what is about it and about no channel, never another channel's.
        let about = |v: &Value, ch: &str| -> usize {
            v["items"].as_array().unwrap().iter().filter(|e| {
                let d = &e["data"];
                [&d["channel"], &d["reservation"]["channel"], &d["conflict"]["details"]["channel"]].iter().any(|c| *c == ch)
            }).count()
        };
        let (s, mine) = call(&c, &amazon, Method::GET, "/v1/changes?limit=1000", None).await;
        assert_eq!(s, 200, "{mine}");
        assert!(about(&mine, "amazon") >= 3, "its reservation, oversell and ats changes: {mine}");
        assert_eq!(about(&mine, "app"), 0, "{mine}");
        assert!(mine["items"].as_array().unwrap().iter().any(|e| e["kind"] == "availability_changed"), "chain events stay");
        let all = c.hub_get("/v1/changes?limit=1000").await;
        assert!(about(&all, "app") > 0 && about(&all, "amazon") > 0);
        assert_eq!(mine["cursor"], all["cursor"], "a channel's reader goes on past what it does not see");
        let app_feed = c.hub_get("/v1/changes?limit=1000&channel=app").await;
        assert_eq!((about(&app_feed, "amazon"), about(&app_feed, "app") > 0), (0, true));
        let (s, marked) = call(&c, &amazon, Method::GET, "/v1/changes?limit=1000&hidden=mark", None).await;
        assert_eq!(s, 200);
        let items = marked["items"].as_array().unwrap();
        assert_eq!(items.len(), all["items"].as_array().unwrap().len(), "one placeholder per event not seen");
        assert!(items.iter().filter(|e| e["kind"] == "hidden").all(|e| e["data"].is_null()));
        let (s, v) = call(&c, &amazon, Method::GET, "/v1/changes?channel=app", None).await;
        assert_eq!(s, 403, "{v}");
        // A walk-in at store-0 takes a unit the marketplace was promised: the oversell names the
        // channels whose promises it touched, and the marketplace's feed shows it.
        assert_eq!(c.sell(0, "A", 1).await, 201);
        let over = wait_until("the oversell at store-0", DEADLINE, || async {
            let v = c.hub_get("/v1/conflicts?store=store-0").await;
            v["items"].as_array().unwrap().iter().find(|k| k["kind"] == "oversell").cloned()
        })
        .await;
        assert!(over["details"]["channels"].as_array().unwrap().contains(&json!("amazon")), "{over}");
        let (_, mine) = call(&c, &amazon, Method::GET, "/v1/changes?limit=1000", None).await;
        assert!(mine["items"].as_array().unwrap().iter().any(|e| e["kind"] == "oversell_detected"), "{mine}");

        // Channels and bound tokens outlive a restart.
        c.stop_hub().await;
        c.start_hub().await;
        let v = wait_until("the hub to answer the app's token", DEADLINE, || async {
            let (s, v) = call(&c, &app_token, Method::GET, "/v1/availability/A", None).await;
            (s == 200).then_some(v)
        })
        .await;
        assert_eq!(v["channel"]["buffer"], 2, "{v}");

        // A removed channel's tokens are told so; web cannot be removed.
        let (ok, out) = channel_cli(&c, &["remove", "app"]).await;
        assert!(ok, "{out}");
        let (s, v) = call(&c, &app_token, Method::GET, "/v1/availability/A", None).await;
        assert_eq!(s, 404, "{v}");
        assert!(v["message"].as_str().unwrap().contains("no channel app"), "{v}");
        let (ok, out) = channel_cli(&c, &["remove", "web"]).await;
        assert!(!ok && out.contains("web always exists"), "{out}");

        // The API binds tokens too.
        let (s, v) =
            c.hub_post("/v1/tokens", json!({"role": "viewer", "name": "amazon report", "channel": "amazon"})).await;
        assert_eq!((s, v["channel"].as_str()), (201, Some("amazon")), "{v}");
        let (s, v) = c.hub_post("/v1/tokens", json!({"role": "storefront", "channel": "app"})).await;
        assert_eq!(s, 404, "a removed channel: {v}");
    }
}

/// On a database of two partitions shared by two hubs, a channel put through one hub is every
/// partition's: each SKU's availability through the other hub shows it, and its removal too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_channel_reaches_every_partition() {
    use shelfsync_tests::hubs::{one_sku_per_partition, HubSet};
    let set = HubSet::start_with(2, 1, 2, Vec::new()).await;
    let skus = one_sku_per_partition(2);
    for (i, sku) in skus.iter().enumerate() {
        let body = json!({"id": format!("restock-{i}"), "store": "store-0", "lines": [{"sku": sku, "qty": 10}]});
        let (s, v) = set.call(i, Method::POST, "/v1/restocks", &set.admin, Some(body)).await.unwrap();
        assert_eq!(s, 201, "{v}");
    }
    let body = json!({"buffer": {"units": 3}, "latency": {"lagged": {"lag_secs": 300}}});
    let (s, v) = set.call(0, Method::PUT, "/v1/channels/amazon", &set.admin, Some(body.clone())).await.unwrap();
    assert_eq!(s, 201, "{v}");
    let (s, v) = set.call(1, Method::PUT, "/v1/channels/amazon", &set.admin, Some(body)).await.unwrap();
    assert_eq!(s, 200, "a second put replaces: {v}");
    for sku in &skus {
        let (s, v) = set
            .call(1, Method::GET, &format!("/v1/availability/{sku}?channel=amazon"), &set.admin, None)
            .await
            .unwrap();
        assert_eq!(s, 200, "{v}");
        assert_eq!((v["channel"]["buffer"].as_u64(), v["available"].as_u64()), (Some(3), Some(7)), "{sku}: {v}");
    }
    // A channel's token reads the feeds of every partition as its channel's view.
    let (s, t) = set
        .call(0, Method::POST, "/v1/tokens", &set.admin, Some(json!({"role": "storefront", "channel": "amazon"})))
        .await
        .unwrap();
    assert_eq!(s, 201, "{t}");
    let amazon = t["token"].as_str().unwrap().to_owned();
    for sku in &skus {
        let order = json!({"id": Uuid::now_v7(), "lines": [{"sku": sku, "qty": 1}]});
        let (s, v) = set.call(0, Method::POST, "/v1/reservations", &amazon, Some(order.clone())).await.unwrap();
        assert_eq!((s, v["channel"].as_str()), (201, Some("amazon")), "{v}");
        let order = json!({"id": Uuid::now_v7(), "lines": [{"sku": sku, "qty": 1}]});
        let (s, v) = set.call(1, Method::POST, "/v1/reservations", &set.admin, Some(order)).await.unwrap();
        assert_eq!((s, v["channel"].as_str()), (201, Some("web")), "{v}");
    }
    let held = |v: &Value, ch: &str| {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["kind"] == "reservation_held" && e["data"]["reservation"]["channel"] == ch)
            .count()
    };
    let (s, mine) = set.call(1, Method::GET, "/v1/changes?limit=1000", &amazon, None).await.unwrap();
    assert_eq!(s, 200, "{mine}");
    assert_eq!((held(&mine, "amazon"), held(&mine, "web")), (2, 0), "{mine}");
    let (_, all) = set.call(1, Method::GET, "/v1/changes?limit=1000", &set.admin, None).await.unwrap();
    assert_eq!((held(&all, "amazon"), held(&all, "web")), (2, 2));
    assert_eq!(mine["cursor"], all["cursor"], "past what it does not see, in every partition");
    assert!(mine["items"].as_array().unwrap().iter().all(|e| e["kind"] != "hidden"), "placeholders stay between hubs");

    let (s, v) = set.call(1, Method::DELETE, "/v1/channels/amazon", &set.admin, None).await.unwrap();
    assert_eq!(s, 200, "{v}");
    for sku in &skus {
        let (s, v) = set
            .call(0, Method::GET, &format!("/v1/availability/{sku}?channel=amazon"), &set.admin, None)
            .await
            .unwrap();
        assert_eq!(s, 404, "{sku}: removed everywhere: {v}");
    }
    let (s, v) = set.call(0, Method::DELETE, "/v1/channels/amazon", &set.admin, None).await.unwrap();
    assert_eq!(s, 404, "{v}");
    set.shutdown().await;
}
