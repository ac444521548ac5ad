//! The catalog end to end: automerge replication to the stores (also across an offline period),
//! store overrides merging with head-office edits, CSV imports, and the catalog driving
//! availability, limits, alerts and unknown-SKU conflicts.
//!
//! Every test runs twice, as `<name>_sqlite` and `<name>_postgres`: the hub on SQLite, then on a
//! PostgreSQL database of its own (`shelfsync_tests::both_backends!`).

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use shelfsync_tests::both_backends;
use shelfsync_tests::cluster::Cluster;
use shelfsync_tests::procs::wait_until;
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(60);

async fn agent_get(c: &Cluster, i: usize, path: &str) -> (u16, Value) {
    let r = reqwest::get(format!("{}{path}", c.agent_url(i))).await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

async fn put_item(c: &Cluster, sku: &str, body: Value) {
    let (s, v) = c.hub_call(Method::PUT, &format!("/v1/catalog/{sku}"), Some(body)).await;
    assert_eq!(s, 200, "{v}");
}

both_backends! {
    async fn catalog_reaches_stores_and_overrides_merge() {
        let mut c = Cluster::start(1).await;
        put_item(&c, "HSS-001", json!({"name": "Hex socket set", "barcodes": ["4006381333931"], "safety_stock": 1})).await;
        let v = wait_until("the catalog at the store", DEADLINE, || async {
            let (s, v) = agent_get(&c, 0, "/v1/catalog/HSS-001").await;
            (s == 200).then_some(v)
        })
        .await;
        assert_eq!(v["name"], "Hex socket set");
        assert_eq!(v["barcodes"], json!(["4006381333931"]));
        assert_eq!(v["effective"]["safety_stock"], 1);

        // Offline: head office renames and changes safety stock; the store sets its own override.
        c.stop_agent(0).await;
        let (s, v) = c
            .hub_call(
                Method::PATCH,
                "/v1/catalog/HSS-001",
                Some(json!({"name": "Hex socket set, 12 pc", "safety_stock": 2})),
            )
            .await;
        assert_eq!(s, 200, "{v}");
        c.agent_env = vec![("SHELFSYNC_AGENT__SYNC__ENABLED".into(), "false".into())];
        c.start_agent(0).await;
        let r = reqwest::Client::new()
            .put(format!("{}/v1/catalog/HSS-001/overrides", c.agent_url(0)))
            .json(&json!({"safety_stock": 5}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let (_, v) = agent_get(&c, 0, "/v1/catalog/HSS-001").await;
        assert_eq!(
            (v["name"].as_str(), v["effective"]["safety_stock"].as_u64()),
            (Some("Hex socket set"), Some(5)),
            "offline: old name, own override: {v}"
        );
        c.stop_agent(0).await;
        c.agent_env.clear();
        c.start_agent(0).await;

        // Both edits survive: head office's name and safety stock, and the store's override, which wins there.
        let v = wait_until("the offline edit at the store", DEADLINE, || async {
            let (_, v) = agent_get(&c, 0, "/v1/catalog/HSS-001").await;
            (v["name"] == "Hex socket set, 12 pc").then_some(v)
        })
        .await;
        assert_eq!(v["safety_stock"], 2, "{v}");
        assert_eq!(v["overrides"]["safety_stock"], 5);
        assert_eq!(v["effective"]["safety_stock"], 5);
        let hub_item = c.hub_get("/v1/catalog/HSS-001").await;
        assert_eq!(
            (hub_item["name"].as_str(), hub_item["safety_stock"].as_u64()),
            (Some("Hex socket set, 12 pc"), Some(2))
        );

        // The store's override reached the hub and drives what the storefront is offered there.
        c.restock(0, "HSS-001", 10).await;
        let a = wait_until("the override at the hub", DEADLINE, || async {
            let a = c.hub_get("/v1/availability/HSS-001").await;
            (a["stores"][0]["safety_stock"] == 5).then_some(a)
        })
        .await;
        assert_eq!(a["stores"][0]["available"], 5, "{a}");
        // Stock answers at the store carry the name.
        let st = wait_until("the restock at the store", DEADLINE, || async {
            let (s, v) = agent_get(&c, 0, "/v1/stock/HSS-001").await;
            (s == 200).then_some(v)
        })
        .await;
        assert_eq!(st["name"], "Hex socket set, 12 pc");
    }
}

both_backends! {
    async fn csv_imports_are_all_or_nothing_and_name_the_problem() {
        let c = Cluster::start(1).await;
        let http = reqwest::Client::new();
        let import = |body: &'static str| {
            http.post(format!("{}/v1/catalog-imports", c.hub_url()))
                .bearer_auth(&c.admin_token)
                .header("content-type", "text/csv")
                .body(body)
                .send()
        };
        let r = import("sku,name,safety_stock\nA-1,Apple,1\nB-2,Banana,lots\n").await.unwrap();
        assert_eq!(r.status(), 422);
        let v: Value = r.json().await.unwrap();
        assert_eq!(
            (v["error"].as_str(), v["row"].as_u64(), v["column"].as_str()),
            (Some("invalid_csv"), Some(3), Some("safety_stock")),
            "{v}"
        );
        assert_eq!(c.hub_get("/v1/catalog").await["items"].as_array().unwrap().len(), 0, "an invalid file changes nothing");
        let r = import("sku,name,barcodes,active\nA-1,Apple,111|222,yes\nB-2,Banana,,no\n").await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.json::<Value>().await.unwrap()["imported"], 2);
        let page = c.hub_get("/v1/catalog?limit=1").await;
        assert_eq!((page["items"][0]["sku"].as_str(), page["next"].as_str()), (Some("A-1"), Some("A-1")));
        let r = http
            .post(format!("{}/v1/catalog-imports", c.hub_url()))
            .bearer_auth(&c.admin_token)
            .body("sku,name\n")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 415);

        // The CLI imports into the data dir while the hub runs; the hub picks it up and the store gets it.
        let csv = c.dir.path().join("more.csv");
        std::fs::write(&csv, "sku,name,low_stock_threshold\nC-3,Cherry,4\n").unwrap();
        let out = c.hub_admin(&["catalog", "import", csv.to_str().unwrap()]).await;
        assert!(out.contains("imported 1"), "{out}");
        wait_until("the CLI import at the store", DEADLINE, || async {
            let (s, v) = agent_get(&c, 0, "/v1/catalog/C-3").await;
            (s == 200 && v["low_stock_threshold"] == 4).then_some(())
        })
        .await;
        let bad = c.dir.path().join("bad.csv");
        std::fs::write(&bad, "sku,name\nok-1,x\nnot ok,y\n").unwrap();
        let out = c.hub_admin_output(&["catalog", "import", bad.to_str().unwrap()]).await;
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("row 3, column sku"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

both_backends! {
    async fn catalog_drives_offers_limits_alerts_and_unknown_skus() {
        let c = Cluster::start(1).await;
        put_item(&c, "LIM", json!({"name": "Limited", "safety_stock": 3, "max_per_customer": 2, "low_stock_threshold": 5}))
            .await;
        put_item(&c, "OLD", json!({"name": "Discontinued", "active": false})).await;
        c.restock(0, "LIM", 10).await;
        c.restock(0, "OLD", 4).await;
        c.converged(&["LIM"], DEADLINE).await;
        let feed_start = c.hub_get("/v1/changes?limit=1000").await["cursor"].as_u64().unwrap();

        // Safety stock: 10 on hand, 3 never offered.
        assert_eq!(c.hub_get("/v1/availability/LIM").await["available"], 7);
        assert_eq!(c.hub_get("/v1/availability/OLD").await["available"], 0, "inactive SKUs are not offered online");
        let (s, v) = c.hub_post("/v1/reservations", json!({"id": Uuid::now_v7(), "lines": [{"sku": "LIM", "qty": 2}, {"sku": "LIM", "qty": 1}], "customer": "ann"})).await;
        assert_eq!((s, v["error"].as_str(), v["limit"].as_u64()), (409, Some("limit_exceeded"), Some(2)), "{v}");
        let (s, v) = c
            .hub_post(
                "/v1/reservations",
                json!({"id": Uuid::now_v7(), "lines": [{"sku": "LIM", "qty": 2}], "customer": "ann"}),
            )
            .await;
        assert_eq!(s, 201, "{v}");
        let (s, v) = c
            .hub_post(
                "/v1/reservations",
                json!({"id": Uuid::now_v7(), "lines": [{"sku": "LIM", "qty": 1}], "customer": "ann"}),
            )
            .await;
        assert_eq!((s, v["already"].as_u64()), (409, Some(2)), "{v}");
        let (s, v) = c
            .hub_post(
                "/v1/reservations",
                json!({"id": Uuid::now_v7(), "lines": [{"sku": "LIM", "qty": 6}], "customer": "bob"}),
            )
            .await;
        assert_eq!((s, v["error"].as_str()), (409, Some("limit_exceeded")), "{v}");

        // Alerts, once per crossing: available is 10 − 2 held − 3 safety = 5 (low), then down to 0 and back.
        for _ in 0..5 {
            assert_eq!(c.sell(0, "LIM", 1).await, 201); // 4, 3, 2, 1, 0 available
        }
        // The hub sees merged state: let it see the bottom before the return, or it never crosses.
        wait_until("the sales at the hub", DEADLINE, || async {
            (c.hub_on_hand("LIM").await.get("store-0") == Some(&5)).then_some(())
        })
        .await;
        let r = reqwest::Client::new()
            .post(format!("{}/v1/returns", c.agent_url(0)))
            .json(&json!({"id": Uuid::now_v7(), "lines": [{"sku": "LIM", "qty": 2}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201); // back to 2
        let kinds = wait_until("alerts on the feed", DEADLINE, || async {
            let f = c.hub_get(&format!("/v1/changes?after={feed_start}&limit=1000")).await;
            let kinds: Vec<String> = f["items"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e["data"]["sku"] == "LIM")
                .map(|e| e["kind"].as_str().unwrap().to_owned())
                .filter(|k| k == "low_stock" || k == "out_of_stock" || k == "back_in_stock")
                .collect();
            kinds.contains(&"back_in_stock".to_string()).then_some(kinds)
        })
        .await;
        assert_eq!(kinds, vec!["low_stock", "out_of_stock", "back_in_stock"], "each crossing once");

        // Unknown and inactive SKUs at the POS: recorded, flagged, and listed as conflicts at the hub.
        let r = reqwest::Client::new()
            .post(format!("{}/v1/sales", c.agent_url(0)))
            .json(&json!({"id": Uuid::now_v7(), "lines": [{"sku": "NOT-LISTED", "qty": 1}, {"sku": "OLD", "qty": 1}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let sale: Value = r.json().await.unwrap();
        assert!(sale["lines"][0]["flags"].as_array().unwrap().contains(&json!("unknown_sku")), "{sale}");
        assert!(sale["lines"][1]["flags"].as_array().unwrap().contains(&json!("inactive_sku")), "{sale}");
        let conflicts = wait_until("unknown_sku conflicts", DEADLINE, || async {
            let v = c.hub_get("/v1/conflicts?status=open").await;
            let skus: Vec<String> = v["items"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|x| x["kind"] == "unknown_sku")
                .map(|x| x["sku"].as_str().unwrap().to_owned())
                .collect();
            (skus.len() == 2).then_some(skus)
        })
        .await;
        assert!(conflicts.contains(&"NOT-LISTED".into()) && conflicts.contains(&"OLD".into()));
        // Listing it resolves the conflict.
        put_item(&c, "NOT-LISTED", json!({"name": "Now listed"})).await;
        let v = c.hub_get("/v1/conflicts?sku=NOT-LISTED").await;
        let unknown: Vec<&Value> = v["items"].as_array().unwrap().iter().filter(|x| x["kind"] == "unknown_sku").collect();
        assert_eq!(unknown.len(), 1, "{v}");
        assert_eq!(unknown[0]["status"], "resolved", "{v}");
    }
}
