//! Escrow rights end to end (`hub/docs/escrow.md`) against real hub and agent processes: a
//! connected store grants online its share, the hub promises only within it, the store's POS
//! sells only the rest, a sale beyond it is recorded, flagged and reconciled at the hub, a
//! fulfilment consumes the rights its units carried, and the rights survive a hub restart.
//!
//! Every test runs twice, as `<name>_sqlite` and `<name>_postgres`.

use std::time::Duration;

use serde_json::{json, Value};
use shelfsync_tests::both_backends;
use shelfsync_tests::cluster::Cluster;
use shelfsync_tests::procs::wait_until;
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(60);

fn escrow_env() -> Vec<(String, String)> {
    [
        ("SHELFSYNC_HUB__ESCROW__ENABLED", "true"),
        ("SHELFSYNC_HUB__ESCROW__SHARE", "0.3"),
        ("SHELFSYNC_HUB__ESCROW__KEEP", "1"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// The hub's figures of SKU `sku` at the only store: (on_hand, held, granted, available).
async fn hub_figures(c: &Cluster, sku: &str) -> (i64, u64, u64, u64) {
    let v = c.hub_get(&format!("/v1/availability?sku={sku}")).await;
    let s = &v["items"][0]["stores"][0];
    (
        s["on_hand"].as_i64().unwrap_or(0),
        s["held"].as_u64().unwrap_or(0),
        s["granted"].as_u64().unwrap_or(0),
        s["available"].as_u64().unwrap_or(0),
    )
}

async fn agent_stock(c: &Cluster, sku: &str) -> Value {
    reqwest::get(format!("{}/v1/stock/{sku}", c.agent_url(0))).await.unwrap().json().await.unwrap()
}

both_backends! {
    async fn a_store_grants_online_its_share_and_an_overdraft_is_reconciled() {
        let mut c = Cluster::start_full(1, vec![], escrow_env()).await;
        let feed_start = c.hub_get("/v1/changes?limit=1000").await["cursor"].as_u64().unwrap();
        c.restock(0, "A", 10).await;
        // The restock reaches the store, which grants 30 % of it (3) while connected.
        let f = wait_until("the store to grant its share", DEADLINE, || async {
            let f = hub_figures(&c, "A").await;
            (f.2 == 3).then_some(f)
        })
        .await;
        assert_eq!(f, (10, 0, 3, 3), "online is offered exactly the granted units");
        let st = agent_stock(&c, "A").await;
        assert_eq!((st["granted"].as_u64(), st["sellable"].as_i64()), (Some(3), Some(7)), "{st}");

        // Online takes 2; the store tops online up to 3 unreserved again (from its own 7).
        let (s, r) = c.hub_post("/v1/reservations", json!({"id": Uuid::now_v7(), "lines": [{"sku": "A", "qty": 2}]})).await;
        assert_eq!(s, 201, "{r}");
        let res = r["id"].as_str().unwrap().to_owned();
        let hold = r["allocations"][0]["hold"].as_str().unwrap().to_owned();
        let (s, _) = c.hub_call(reqwest::Method::POST, &format!("/v1/reservations/{res}/commit"), None).await;
        assert_eq!(s, 200);
        let f = wait_until("the store to top online up", DEADLINE, || async {
            let f = hub_figures(&c, "A").await;
            (f.2 == 5).then_some(f)
        })
        .await;
        assert_eq!(f, (10, 2, 5, 3));
        let st = wait_until("the agent to know the hold", DEADLINE, || async {
            let st = agent_stock(&c, "A").await;
            (st["held"] == 2).then_some(st)
        })
        .await;
        assert_eq!((st["granted"].as_u64(), st["sellable"].as_i64()), (Some(5), Some(5)), "{st}");

        // A walk-in takes 6 at the till: one beyond the store's own 5. Recorded and flagged.
        let sale = json!({"id": Uuid::now_v7(), "lines": [{"sku": "A", "qty": 6}]});
        let r = reqwest::Client::new().post(format!("{}/v1/sales", c.agent_url(0))).json(&sale).send().await.unwrap();
        assert_eq!(r.status(), 201);
        let r: Value = r.json().await.unwrap();
        assert_eq!(r["lines"][0]["rights_broken"], 1, "{r}");
        assert!(r["flags"].as_array().unwrap().iter().any(|f| f == "escrow_overdraft"), "{r}");
        assert_eq!(r["lines"][0]["on_hand"], 4);

        // The hub covers it: the broken right goes back (online 4 = on hand), the store's own
        // fell below keep (1) so one more unreserved right goes back; the hold (2) stands.
        let conflict = wait_until("an escrow_overdraft conflict", DEADLINE, || async {
            c.conflicts(0).await.into_iter().find(|x| x["kind"] == "escrow_overdraft")
        })
        .await;
        assert_eq!((conflict["shortfall"].as_u64(), conflict["status"].as_str()), (Some(1), Some("open")), "{conflict}");
        let f = wait_until("the hub to give rights back", DEADLINE, || async {
            let f = hub_figures(&c, "A").await;
            (f.0 == 4 && f.2 == 3).then_some(f)
        })
        .await;
        assert_eq!(f, (4, 2, 3, 1));
        let st = wait_until("the agent to hear of the returns", DEADLINE, || async {
            let st = agent_stock(&c, "A").await;
            (st["granted"] == 3).then_some(st)
        })
        .await;
        assert_eq!(st["sellable"], 1, "{st}");
        let feed = c.hub_get(&format!("/v1/changes?after={feed_start}&limit=1000")).await;
        let kinds: Vec<&str> = feed["items"].as_array().unwrap().iter().filter_map(|e| e["kind"].as_str()).collect();
        for k in ["rights_granted", "rights_returned", "escrow_overdraft"] {
            assert!(kinds.contains(&k), "{k} in {kinds:?}");
        }

        // The store ships the online order: its 2 units take their rights with them.
        let r = reqwest::Client::new().post(format!("{}/v1/holds/{hold}/fulfil", c.agent_url(0))).send().await.unwrap();
        assert_eq!(r.status(), 201);
        let f = wait_until("the hub to take the fulfilment in", DEADLINE, || async {
            let f = hub_figures(&c, "A").await;
            (f.0 == 2 && f.1 == 0).then_some(f)
        })
        .await;
        assert_eq!((f.2, f.3), (1, 1), "online keeps 1 of the store's 2: {f:?}");
        let overdrafts: Vec<Value> =
            c.conflicts(0).await.into_iter().filter(|x| x["kind"] == "escrow_overdraft").collect();
        assert_eq!(overdrafts.len(), 1);
        assert_eq!(overdrafts[0]["shortfall"], 1, "a fulfilment is no overdraft");

        // Head office sees it in /metrics: what the store granted, the overdraft conflict.
        let metrics = c.hub_metrics().await;
        let value = |series: &str| -> f64 {
            metrics
                .lines()
                .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
                .unwrap_or_else(|| panic!("{series} missing from {metrics}"))
        };
        assert_eq!(value(r#"shelfsync_hub_store_escrow_granted_units{store="store-0"} "#), 1.0);
        assert_eq!(value(r#"shelfsync_hub_conflicts_open{kind="escrow_overdraft"} "#), 1.0);

        // The rights are stored: a restarted hub offers the same.
        c.stop_hub().await;
        c.start_hub().await;
        let f = wait_until("the hub back", DEADLINE, || async {
            let f = hub_figures(&c, "A").await;
            (f.0 == 2).then_some(f)
        })
        .await;
        assert_eq!((f.2, f.3), (1, 1));
        let st = agent_stock(&c, "A").await;
        assert_eq!((st["on_hand"].as_i64(), st["granted"].as_u64(), st["sellable"].as_i64()), (Some(2), Some(1), Some(1)), "{st}");
    }
}

both_backends! {
    async fn a_skus_catalog_rule_and_a_stores_override_set_what_online_gets() {
        let c = Cluster::start_full(1, vec![], escrow_env()).await;
        // Head office grants online half of every store's B (the chain's share is 30 %).
        let item = json!({"name": "Boots", "escrow": {"share_pct": 50}});
        let (s, r) = c.hub_call(reqwest::Method::PUT, "/v1/catalog/B", Some(item)).await;
        assert_eq!(s, 200, "{r}");
        assert_eq!(r["item"]["escrow"], json!({"share_pct": 50}), "{r}");
        let bad = json!({"name": "Boots", "escrow": {"share_pct": 120}});
        let (s, r) = c.hub_call(reqwest::Method::PUT, "/v1/catalog/B", Some(bad)).await;
        assert_eq!((s, r["error"].as_str()), (422, Some("invalid_request")), "{r}");
        assert!(r["message"].as_str().unwrap().contains("escrow.share_pct"), "{r}");
        let catalog = |path: &'static str| {
            let url = format!("{}{path}", c.agent_url(0));
            async move { reqwest::get(url).await.unwrap().json::<Value>().await.unwrap() }
        };
        wait_until("the store to have the rule", DEADLINE, || async {
            (catalog("/v1/catalog/B").await["escrow"]["share_pct"] == 50).then_some(())
        })
        .await;
        c.restock(0, "B", 10).await;
        let f = wait_until("the store to grant half", DEADLINE, || async {
            let f = hub_figures(&c, "B").await;
            (f.0 == 10 && f.2 == 5).then_some(f)
        })
        .await;
        assert_eq!(f, (10, 0, 5, 5));

        // The store keeps 8 for walk-ins (its own override): the hub gives back 3.
        let url = format!("{}/v1/catalog/B/overrides", c.agent_url(0));
        let r = reqwest::Client::new().put(&url).json(&json!({"escrow": {"keep": 8}})).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["effective"]["escrow"], json!({"share_pct": 50, "keep": 8}), "{v}");
        let bad = reqwest::Client::new().put(&url).json(&json!({"escrow": {"keeps": 8}})).send().await.unwrap();
        assert_eq!(bad.status(), 422);
        let f = wait_until("the hub to honour the store's keep", DEADLINE, || async {
            let f = hub_figures(&c, "B").await;
            (f.2 == 2).then_some(f)
        })
        .await;
        assert_eq!(f, (10, 0, 2, 2));
        let st = wait_until("the agent to hear of the return", DEADLINE, || async {
            let st = agent_stock(&c, "B").await;
            (st["granted"] == 2).then_some(st)
        })
        .await;
        assert_eq!(st["sellable"], 8, "{st}");

        // Head office lowers B to 10 %: online keeps ⌈10 % × 10⌉ = 1, the other right goes back,
        // and the store, once it has the new rule, does not grant it again.
        let (s, r) = c.hub_call(reqwest::Method::PATCH, "/v1/catalog/B", Some(json!({"escrow": {"share_pct": 10}}))).await;
        assert_eq!(s, 200, "{r}");
        wait_until("the store to have the new rule", DEADLINE, || async {
            (catalog("/v1/catalog/B").await["escrow"]["share_pct"] == 10).then_some(())
        })
        .await;
        let (f, st) = wait_until("both sides to settle at one right", DEADLINE, || async {
            let (f, st) = (hub_figures(&c, "B").await, agent_stock(&c, "B").await);
            (f.2 == 1 && st["granted"] == 1).then_some((f, st))
        })
        .await;
        assert_eq!((f.3, st["sellable"].as_i64()), (1, Some(9)), "{st}");
        let csv = "sku,name,escrow_share_pct,escrow_keep\nC,Coat,40,\nD,Dress,,2\n";
        let r = reqwest::Client::new()
            .post(format!("{}/v1/catalog-imports", c.hub_url()))
            .bearer_auth(&c.admin_token)
            .header("content-type", "text/csv")
            .body(csv)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(c.hub_get("/v1/catalog/C").await["escrow"], json!({"share_pct": 40}));
        assert_eq!(c.hub_get("/v1/catalog/D").await["escrow"], json!({"keep": 2}));
    }
}

/// On a database of two partitions shared by two hubs, a store's override reaches the decider
/// of every partition, also the one the hub its agent talks to does not hold: each hub picks up
/// the overrides other hubs merged (`HubCatalog::refresh`), gives back what the store now keeps,
/// and the store hears of it through the sync plane.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stores_override_reaches_every_partitions_decider() {
    use shelfsync_tests::hubs::{one_sku_per_partition, HubSet};
    let mut env = escrow_env();
    env.retain(|(k, _)| !k.ends_with("SHARE"));
    env.push(("SHELFSYNC_HUB__ESCROW__SHARE".into(), "0.5".into()));
    let set = HubSet::start_with(2, 1, 2, env).await;
    let skus = one_sku_per_partition(2);
    let figures = |sku: String| {
        let set = &set;
        async move {
            let path = format!("/v1/availability/{sku}");
            let (s, v) = set.call(1, reqwest::Method::GET, &path, &set.admin, None).await?;
            let st = v["stores"].as_array()?.iter().find(|s| s["store"] == "store-0")?.clone();
            (s == 200).then(|| {
                (
                    st["on_hand"].as_i64().unwrap_or(0),
                    st["granted"].as_u64().unwrap_or(0),
                    st["safety_stock"].as_u64().unwrap_or(0),
                )
            })
        }
    };
    for (i, sku) in skus.iter().enumerate() {
        let body = json!({"id": format!("restock-{i}"), "store": "store-0", "lines": [{"sku": sku, "qty": 10}]});
        let (s, v) = set.call(i, reqwest::Method::POST, "/v1/restocks", &set.admin, Some(body)).await.unwrap();
        assert_eq!(s, 201, "{v}");
    }
    for sku in &skus {
        wait_until("the store to grant half of each SKU", DEADLINE, || async {
            figures(sku.clone()).await.filter(|f| f.0 == 10 && f.1 == 5)
        })
        .await;
    }
    for sku in &skus {
        let url = format!("{}/v1/catalog/{sku}/overrides", set.agent_url(0));
        let body = json!({"safety_stock": 1, "escrow": {"keep": 8}});
        let r = reqwest::Client::new().put(&url).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    for sku in &skus {
        let f = wait_until("every partition to apply the store's override", DEADLINE, || async {
            figures(sku.clone()).await.filter(|f| f.1 == 2)
        })
        .await;
        assert_eq!(f, (10, 2, 1), "{sku}: own back to 8, the safety stock in force");
        wait_until("the store to hear of the return", DEADLINE, || async {
            (set.agent_stock(0, sku).await["granted"] == 2).then_some(())
        })
        .await;
    }
    set.shutdown().await;
}
