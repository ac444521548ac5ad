//! Sync between real hub and agent processes on loopback.
//!
//! Every test runs twice, as `<name>_sqlite` and `<name>_postgres`: the hub on SQLite, then on a
//! PostgreSQL database of its own (`shelfsync_tests::both_backends!`).

use std::time::Duration;

use shelfsync_tests::both_backends;
use shelfsync_tests::cluster::Cluster;
use shelfsync_tests::procs::wait_until;

const DEADLINE: Duration = Duration::from_secs(60);

both_backends! {
    async fn sale_reaches_the_hub_and_restock_reaches_the_store() {
        let c = Cluster::start(2).await;
        wait_until("both agents connected", DEADLINE, || async {
            let a = c.agent_status(0).await["sync"]["state"] == "connected";
            let b = c.agent_status(1).await["sync"]["state"] == "connected";
            (a && b).then_some(())
        })
        .await;

        c.restock(0, "HSS-001", 10).await;
        wait_until("restock at the store", DEADLINE, || async {
            (c.agent_on_hand(0, "HSS-001").await == 10).then_some(())
        })
        .await;
        assert_eq!(c.sell(0, "HSS-001", 3).await, 201);
        wait_until("sale at the hub", DEADLINE, || async {
            (c.hub_on_hand("HSS-001").await.get("store-0") == Some(&7)).then_some(())
        })
        .await;
        let v = c.hub_get("/v1/availability/HSS-001").await;
        assert_eq!(v["on_hand"], 7);
        assert_eq!(v["available"], 7);
        let s0 = &v["stores"][0];
        assert_eq!(s0["store"], "store-0");
        assert_eq!(s0["connected"], true);
        assert!(s0["last_seen"].is_string());

        // A store never restocked sells anyway: the hub shows the negative on-hand, offers nothing.
        assert_eq!(c.sell(1, "HSS-001", 2).await, 201);
        let stores = wait_until("negative stock at the hub", DEADLINE, || async {
            let h = c.hub_on_hand("HSS-001").await;
            (h.get("store-1") == Some(&-2)).then_some(h)
        })
        .await;
        assert_eq!(stores.get("store-0"), Some(&7));
        let v = c.hub_get("/v1/availability?sku=HSS-001&sku=NOPE").await;
        assert_eq!(v["items"][0]["available"], 7);
        assert_eq!(v["items"][1]["stores"].as_array().unwrap().len(), 0);

        // A transfer ships units from one store and, once received, they are at the other; both
        // stores see it.
        let id = uuid::Uuid::now_v7();
        let (s, body) = c
            .hub_post(
                "/v1/transfers",
                serde_json::json!({"id": id, "from": "store-0", "to": "store-1", "lines": [{"sku": "HSS-001", "qty": 4}]}),
            )
            .await;
        assert_eq!(s, 201, "{body}");
        let (s, body) = c.hub_post(&format!("/v1/transfers/{id}/receive"), serde_json::json!({})).await;
        assert_eq!((s, body["status"].as_str()), (200, Some("received")), "{body}");
        let (s, body) = c
            .hub_post(
                "/v1/transfers",
                serde_json::json!({"id": uuid::Uuid::now_v7(), "from": "store-0", "to": "store-1", "lines": [{"sku": "HSS-001", "qty": 4}]}),
            )
            .await;
        assert_eq!((s, body["error"].as_str()), (409, Some("insufficient_stock")), "{body}");
        let all = c.converged(&["HSS-001"], DEADLINE).await;
        assert_eq!(all[&("store-0".into(), "HSS-001".into())], 3);
        assert_eq!(all[&("store-1".into(), "HSS-001".into())], 2);

        let stores = c.hub_get("/v1/stores").await;
        let s0 = &stores["items"][0];
        assert_eq!(s0["id"], "store-0");
        assert_eq!(s0["connected"], true);
        assert!(s0["writers"][0]["applied"].as_u64().unwrap() >= 1);
        wait_until("journals synced", DEADLINE, || async {
            let st = c.hub_get("/v1/stores").await;
            // store-0: restock + sale + transfer out; store-1: sale + transfer in.
            let j0 = st["items"][0]["journal_events"].as_u64().unwrap();
            let j1 = st["items"][1]["journal_events"].as_u64().unwrap();
            let a0 = c.agent_status(0).await["journal_events"].as_u64().unwrap();
            let a1 = c.agent_status(1).await["journal_events"].as_u64().unwrap();
            (j0 == 3 && j1 == 2 && a0 == 3 && a1 == 2).then_some(())
        })
        .await;
        assert!(c.metric("deltas_applied_total").await >= 2);
    }
}

both_backends! {
    /// Hub down, 1,000 sales at two stores, hub back: exact convergence. Then an agent is killed
    /// with `kill -9` in the middle of syncing a burst and restarted: nothing lost or doubled.
    async fn offline_sales_converge_exactly_and_kill_9_loses_nothing() {
        let mut c = Cluster::start(2).await;
        for i in 0..2 {
            c.restock(i, "A", 1000).await;
            c.restock(i, "B", 1000).await;
        }
        c.converged(&["A", "B"], DEADLINE).await;
        c.stop_hub().await;

        let skus = ["A", "B"];
        let mut tasks = Vec::new();
        for i in 0..2 {
            let url = c.agent_url(i);
            tasks.push(tokio::spawn(async move {
                let http = reqwest::Client::new();
                for n in 0..500 {
                    let body = serde_json::json!({"id": uuid::Uuid::now_v7(), "lines": [{"sku": skus[n % 2], "qty": 1}]});
                    let r = http.post(format!("{url}/v1/sales")).json(&body).send().await.unwrap();
                    assert_eq!(r.status(), 201);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        for i in 0..2 {
            let st = c.agent_status(i).await;
            assert_eq!(st["sync"]["state"], "connecting", "hub is down");
            assert!(st["unsynced_changes"].as_u64().unwrap() > 0);
        }
        c.start_hub().await;
        let all = c.converged(&["A", "B"], DEADLINE).await;
        for store in ["store-0", "store-1"] {
            assert_eq!(all[&(store.into(), "A".into())], 750, "{all:?}");
            assert_eq!(all[&(store.into(), "B".into())], 750, "{all:?}");
        }
        wait_until("nothing left unsynced", DEADLINE, || async {
            let st = c.agent_status(0).await;
            (st["unsynced_changes"] == 0 && st["unsynced_events"] == 0).then_some(())
        })
        .await;

        // A burst of sales, then kill -9 while it is being shipped.
        let url = c.agent_url(1);
        let http = reqwest::Client::new();
        for n in 0..300 {
            let body = serde_json::json!({"id": uuid::Uuid::now_v7(), "lines": [{"sku": skus[n % 2], "qty": 1}]});
            assert_eq!(http.post(format!("{url}/v1/sales")).json(&body).send().await.unwrap().status(), 201);
        }
        c.kill_agent(1).await;
        c.start_agent(1).await;
        let all = c.converged(&["A", "B"], DEADLINE).await;
        assert_eq!(all[&("store-1".into(), "A".into())], 600);
        assert_eq!(all[&("store-1".into(), "B".into())], 600);
        assert_eq!(all[&("store-0".into(), "A".into())], 750);
        wait_until("journals complete at the hub", DEADLINE, || async {
            let st = c.hub_get("/v1/stores").await;
            // 2 restocks + 500 sales at store-0; 2 restocks + 800 sales at store-1.
            let j: Vec<u64> =
                st["items"].as_array().unwrap().iter().map(|s| s["journal_events"].as_u64().unwrap()).collect();
            (j == vec![502, 802]).then_some(())
        })
        .await;
    }
}

both_backends! {
    /// The hub loses a store's entry behind everyone's back (a bad restore, a bug): the agent's
    /// anti-entropy digest on reconnect differs, a full resync follows, and the hub is whole again.
    async fn anti_entropy_repairs_a_damaged_hub() {
        let mut c = Cluster::start(1).await;
        c.restock(0, "D", 20).await;
        for _ in 0..5 {
            assert_eq!(c.sell(0, "D", 1).await, 201);
        }
        c.converged(&["D"], DEADLINE).await;
        // Acked too: an entry the agent still had to resend would carry its totals again and
        // repair the hub without any digest.
        wait_until("the agent's changes acked", DEADLINE, || async {
            (c.agent_status(0).await["unsynced_changes"] == 0).then_some(())
        })
        .await;
        c.stop_hub().await;
        let n = c.hub_sql("DELETE FROM counters WHERE store = 'store-0' AND writer LIKE 'store-0@%'").await;
        assert_eq!(n, 1);
        c.start_hub().await;
        let all = c.converged(&["D"], DEADLINE).await;
        assert_eq!(all[&("store-0".into(), "D".into())], 15);
        // Seen at least once (a busy hub under load may take a second digest before the
        // resync it started has finished).
        let mismatched = c.metric("digests_mismatched_total").await;
        assert!(mismatched >= 1, "the mismatch is visible to head office: {mismatched}");
    }
}

both_backends! {
    /// A store whose database is lost re-seeds from the hub with a new incarnation and loses nothing
    /// the hub had; its new sales count on top, its old writer's entries are never reused.
    async fn a_lost_store_database_reseeds_from_the_hub() {
        let mut c = Cluster::start(1).await;
        c.restock(0, "R", 50).await;
        for _ in 0..7 {
            assert_eq!(c.sell(0, "R", 1).await, 201);
        }
        c.converged(&["R"], DEADLINE).await;
        let old_writer = c.agent_status(0).await["writer"].as_str().unwrap().to_owned();
        c.kill_agent(0).await;
        std::fs::remove_dir_all(c.agent_dir(0)).unwrap();
        let bundle = c.dir.path().join("bundle-0");
        shelfsync_tests::procs::Proc::run_ok(
            "shelfsync-agent",
            &["init", "--bundle", bundle.to_str().unwrap(), "--data-dir", c.agent_dir(0).to_str().unwrap()],
        )
        .await;
        c.start_agent(0).await;
        let st = c.agent_status(0).await;
        assert_ne!(st["writer"].as_str().unwrap(), old_writer, "a new incarnation");
        wait_until("the store to re-seed", DEADLINE, || async { (c.agent_on_hand(0, "R").await == 43).then_some(()) })
            .await;
        for _ in 0..3 {
            assert_eq!(c.sell(0, "R", 1).await, 201);
        }
        let all = c.converged(&["R"], DEADLINE).await;
        assert_eq!(all[&("store-0".into(), "R".into())], 40);
        let stores = c.hub_get("/v1/stores").await;
        assert_eq!(stores["items"][0]["writers"].as_array().unwrap().len(), 2, "both incarnations are on record");
    }
}

both_backends! {
    /// Counts by `occurred_at` across an offline period (issue 11): store 0 learns everything late
    /// and out of order (a restock made while it was away, then, offline, a sale and a handheld count
    /// taken before the restock); store 1 gets the same events on time. Both end at the rule's figure
    /// (count + changes after it) at the agent and at the hub.
    async fn a_late_count_gives_the_on_time_figure_at_store_and_hub() {
        let mut c = Cluster::start(2).await;
        let sku = "LATE-1";
        let at = |ms_ago: i64| shelfsync_shared::rfc3339(shelfsync_node::now_ms() - ms_ago);
        let count_at = at(3_600_000); // the handheld's count, an hour ago
        let post = |base: String, path: &'static str, body: serde_json::Value| {
            let url = format!("{base}{path}");
            async move {
                let r = reqwest::Client::new().post(url).json(&body).send().await.unwrap();
                let s = r.status().as_u16();
                (s, r.json::<serde_json::Value>().await.unwrap())
            }
        };

        // On time, at store 1: the count, then the restock, then the sale.
        let (s, v) = post(
            c.agent_url(1),
            "/v1/counts",
            serde_json::json!({"id": "hh-1", "sku": sku, "counted": 12, "occurred_at": count_at}),
        )
        .await;
        assert_eq!(s, 201, "{v}");
        c.restock(1, sku, 5).await;
        c.settled(1, sku, 17, DEADLINE).await;
        assert_eq!(c.sell(1, sku, 2).await, 201);
        c.settled(1, sku, 15, DEADLINE).await;

        // Late, at store 0: the restock while the store is away...
        c.stop_agent(0).await;
        c.restock(0, sku, 5).await;
        c.stop_hub().await;
        c.start_agent(0).await;
        // ...then, offline, the sale and the count that was taken an hour ago.
        assert_eq!(c.sell(0, sku, 2).await, 201);
        let (s, v) = post(
            c.agent_url(0),
            "/v1/counts",
            serde_json::json!({"id": "hh-0", "sku": sku, "counted": 12, "occurred_at": count_at}),
        )
        .await;
        assert_eq!(s, 201, "{v}");
        assert_eq!(v["lines"][0]["on_hand"], 10, "offline: the count and the sale after it: {v}");
        assert_eq!(v["lines"][0]["count"]["changes_after"], -2, "{v}");
        c.start_hub().await;
        // The restock the store had not seen was made after the count: it lands on top.
        c.settled(0, sku, 15, DEADLINE).await;
        c.settled(1, sku, 15, DEADLINE).await;
    }
}
