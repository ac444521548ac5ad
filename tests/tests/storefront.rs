//! The online storefront against real hub and agent processes: oversell reconciliation, holds at
//! the store, leases, and the change feed.
//!
//! Every test runs twice, as `<name>_sqlite` and `<name>_postgres`: the hub on SQLite, then on a
//! PostgreSQL database of its own (`shelfsync_tests::both_backends!`).

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use shelfsync_tests::both_backends;
use shelfsync_tests::cluster::Cluster;
use shelfsync_tests::procs::wait_until;
use shelfsync_tests::webhook::WebhookSink;
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(60);

async fn reserve(c: &Cluster, body: Value) -> (u16, Value) {
    c.hub_post("/v1/reservations", body).await
}

both_backends! {
    /// Store S holds stock and goes offline; the web reserves 4 from S (ship-from-store) and 2 for
    /// pickup at S; S sells 3 at the POS offline; S reconnects: the oversell is detected, the
    /// ship-from-store line is re-sourced to the other store, the pickup line is marked short, the
    /// conflict is recorded, the events are on the feed and a webhook receives them.
    ///
    /// S starts with 6 units rather than the 5 of the wording: with 5, the second reservation
    /// (2 more at S after 4 promised) must be refused, because the hub never promises more than it
    /// believes is there.
    async fn oversell_while_offline_is_reconciled() {
        let sink = WebhookSink::start(1).await; // the first delivery fails: retries must follow
        let hooks = format!(
            "[{{ url = \"{}\", secret = \"0123456789abcdef-secret\", kinds = [\"oversell_detected\", \"reservation_short\"] }}]",
            sink.url
        );
        let mut c = Cluster::start_full(2, vec![], vec![("SHELFSYNC_HUB__WEBHOOKS".into(), hooks)]).await;
        let feed_start = c.hub_get("/v1/changes?limit=1000").await["cursor"].as_u64().unwrap();
        c.restock(0, "X", 6).await;
        c.restock(1, "X", 5).await;
        c.converged(&["X"], DEADLINE).await;

        c.kill_agent(0).await; // S is offline now
        let ship = Uuid::now_v7();
        let (s, r1) = reserve(&c, json!({"id": ship, "lines": [{"sku": "X", "qty": 4}]})).await;
        assert_eq!(s, 201, "{r1}");
        assert_eq!(r1["status"], "held");
        assert_eq!(
            r1["allocations"],
            json!([{"hold": r1["allocations"][0]["hold"], "store": "store-0", "sku": "X", "qty": 4, "status": "held"}]),
            "sourced from the store with the most available"
        );
        let pickup = Uuid::now_v7();
        let (s, r2) =
            reserve(&c, json!({"id": pickup, "lines": [{"sku": "X", "qty": 2}], "pickup_store": "store-0"})).await;
        assert_eq!(s, 201, "{r2}");
        // Nothing more can be promised at S.
        let (s, e) =
            reserve(&c, json!({"id": Uuid::now_v7(), "lines": [{"sku": "X", "qty": 1}], "pickup_store": "store-0"})).await;
        assert_eq!((s, e["error"].as_str(), e["available"].as_u64()), (409, Some("insufficient_stock"), Some(0)), "{e}");

        // S sells 3 at the POS while offline (the agent runs without the hub).
        c.agent_env = vec![("SHELFSYNC_AGENT__SYNC__ENABLED".into(), "false".into())];
        c.start_agent(0).await;
        for _ in 0..3 {
            assert_eq!(c.sell(0, "X", 1).await, 201);
        }
        c.kill_agent(0).await;
        c.agent_env.clear();
        c.start_agent(0).await;

        let conflict = wait_until("the oversell to be reconciled", DEADLINE, || async {
            let v = c.hub_get("/v1/conflicts?store=store-0&sku=X").await;
            v["items"].as_array().unwrap().iter().find(|x| x["kind"] == "oversell").cloned()
        })
        .await;
        assert_eq!(conflict["shortfall"], 3, "{conflict}");
        assert_eq!(conflict["status"], "open", "a short pickup needs a person: {conflict}");
        assert_eq!(conflict["resolution"], "re-sourced 1 to store-1; 2 marked short", "{conflict}");
        let touched: Vec<String> =
            conflict["reservations"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()).collect();
        assert!(touched.contains(&ship.to_string()) && touched.contains(&pickup.to_string()), "{conflict}");

        // Newest holds first: the pickup (newest) is short; the ship line lost 1 unit at S, found at store-1.
        let p = c.hub_get(&format!("/v1/reservations/{pickup}")).await;
        assert_eq!(p["short"], true);
        assert_eq!(p["lines"][0]["short"], 2, "{p}");
        let sh = c.hub_get(&format!("/v1/reservations/{ship}")).await;
        assert_eq!(sh["short"], false, "{sh}");
        let open: Vec<(String, u64)> = sh["allocations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| (a["store"].as_str().unwrap().to_owned(), a["qty"].as_u64().unwrap()))
            .collect();
        assert_eq!(open, vec![("store-0".into(), 3), ("store-1".into(), 1)], "{sh}");

        // No unit is promised twice: held never exceeds on_hand at S now, and store-1 holds the moved unit.
        let a = c.hub_get("/v1/availability/X").await;
        let s0 = a["stores"].as_array().unwrap().iter().find(|s| s["store"] == "store-0").unwrap().clone();
        assert_eq!(
            (s0["on_hand"].as_i64(), s0["held"].as_u64(), s0["available"].as_u64()),
            (Some(3), Some(3), Some(0)),
            "{a}"
        );
        let s1 = a["stores"].as_array().unwrap().iter().find(|s| s["store"] == "store-1").unwrap().clone();
        assert_eq!((s1["held"].as_u64(), s1["available"].as_u64()), (Some(1), Some(4)), "{a}");

        // The store sees its holds.
        wait_until("holds at the store", DEADLINE, || async {
            let h: Value = reqwest::get(format!("{}/v1/holds", c.agent_url(0))).await.unwrap().json().await.unwrap();
            let qty: u64 = h["items"].as_array().unwrap().iter().map(|x| x["qty"].as_u64().unwrap()).sum();
            (qty == 3).then_some(())
        })
        .await;

        // The feed has it all, in order and gap-free.
        let feed = c.hub_get(&format!("/v1/changes?after={feed_start}&limit=1000")).await;
        let items = feed["items"].as_array().unwrap();
        let cursors: Vec<u64> = items.iter().map(|i| i["cursor"].as_u64().unwrap()).collect();
        assert!(cursors.windows(2).all(|w| w[1] == w[0] + 1), "gap-free: {cursors:?}");
        let kinds: Vec<&str> = items.iter().map(|i| i["kind"].as_str().unwrap()).collect();
        for k in ["reservation_held", "availability_changed", "oversell_detected", "reservation_short"] {
            assert!(kinds.contains(&k), "{k} missing from {kinds:?}");
        }
        assert!(!kinds.contains(&"oversell_resolved"), "a short pickup is not resolved");

        // The webhook got them, signed, after a refused first attempt.
        let deliveries = wait_until("webhook deliveries", DEADLINE, || async {
            let d = sink.received.lock().unwrap().clone();
            (d.len() >= 2).then_some(d)
        })
        .await;
        assert!(sink.refused.load(std::sync::atomic::Ordering::SeqCst) >= 1);
        let first = deliveries
            .iter()
            .find(|d| d.header("x-shelfsync-event") == Some("oversell_detected"))
            .expect("oversell delivered");
        let expected_sig = shelfsync_hub::feed::signature("0123456789abcdef-secret", &first.body);
        assert_eq!(first.header("x-shelfsync-signature"), Some(expected_sig.as_str()));
        let body: Value = serde_json::from_slice(&first.body).unwrap();
        assert_eq!(first.header("x-shelfsync-event-id").unwrap(), body["cursor"].to_string());
        assert_eq!(body["data"]["conflict"]["shortfall"], 3);
        assert!(deliveries.iter().any(|d| d.header("x-shelfsync-event") == Some("reservation_short")));
    }
}

both_backends! {
    /// Leases: expiry releases the units on time, extend keeps them, commit then fulfil at the store
    /// lowers on_hand exactly once and closes the hold in the same merge.
    async fn leases_expire_extend_commit_and_fulfil() {
        let c = Cluster::start(1).await;
        c.restock(0, "L", 10).await;
        c.converged(&["L"], DEADLINE).await;
        let avail = || async { c.hub_get("/v1/availability/L").await["available"].as_u64().unwrap() };

        let short_lived = Uuid::now_v7();
        let (s, v) = reserve(&c, json!({"id": short_lived, "lines": [{"sku": "L", "qty": 3}], "ttl_secs": 1})).await;
        assert_eq!(s, 201, "{v}");
        let extended = Uuid::now_v7();
        let created = tokio::time::Instant::now();
        let (s, _) = reserve(&c, json!({"id": extended, "lines": [{"sku": "L", "qty": 2}], "ttl_secs": 2})).await;
        assert_eq!(s, 201);
        let (s, v) =
            c.hub_call(Method::POST, &format!("/v1/reservations/{extended}/extend"), Some(json!({"ttl_secs": 600}))).await;
        assert_eq!((s, v["status"].as_str()), (200, Some("held")), "{v}");
        assert_eq!(avail().await, 5);
        wait_until("the short lease to expire", DEADLINE, || async {
            let v = c.hub_get(&format!("/v1/reservations/{short_lived}")).await;
            (v["status"] == "expired").then_some(())
        })
        .await;
        assert_eq!(avail().await, 8, "expired units are available again; the extended lease keeps its 2");
        // Past the extended lease's original 2 s (plus the expiry check's period): still held.
        tokio::time::sleep_until(created + Duration::from_millis(2600)).await;
        assert_eq!(c.hub_get(&format!("/v1/reservations/{extended}")).await["status"], "held");
        assert_eq!(avail().await, 8);
        let (s, v) = c.hub_call(Method::POST, &format!("/v1/reservations/{short_lived}/commit"), None).await;
        assert_eq!((s, v["error"].as_str()), (409, Some("invalid_state")), "an expired lease cannot be paid");

        // Pay, then the store picks it.
        let (s, v) = c.hub_call(Method::POST, &format!("/v1/reservations/{extended}/commit"), None).await;
        assert_eq!((s, v["status"].as_str()), (200, Some("committed")), "{v}");
        let hold = v["allocations"][0]["hold"].as_str().unwrap().to_owned();
        let http = reqwest::Client::new();
        wait_until("the hold at the store", DEADLINE, || async {
            let h: Value = http.get(format!("{}/v1/holds", c.agent_url(0))).send().await.unwrap().json().await.unwrap();
            h["items"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x["id"] == hold.as_str() && x["status"] == "committed")
                .then_some(())
        })
        .await;
        let st: Value = http.get(format!("{}/v1/stock/L", c.agent_url(0))).send().await.unwrap().json().await.unwrap();
        assert_eq!((st["on_hand"].as_i64(), st["held"].as_u64(), st["sellable"].as_i64()), (Some(10), Some(2), Some(8)));

        let url = format!("{}/v1/holds/{hold}/fulfil", c.agent_url(0));
        let r = http.post(&url).send().await.unwrap();
        assert_eq!(r.status(), 201);
        let f: Value = r.json().await.unwrap();
        assert_eq!((f["on_hand"].as_i64(), f["held"].as_u64()), (Some(8), Some(0)), "{f}");
        let again = http.post(&url).send().await.unwrap();
        assert_eq!(again.status(), 200, "fulfilling twice is a replay");
        let st: Value = http.get(format!("{}/v1/stock/L", c.agent_url(0))).send().await.unwrap().json().await.unwrap();
        assert_eq!(st["on_hand"], 8, "lowered exactly once");

        let v = wait_until("the hub to close the reservation", DEADLINE, || async {
            let v = c.hub_get(&format!("/v1/reservations/{extended}")).await;
            (v["status"] == "fulfilled").then_some(v)
        })
        .await;
        assert_eq!(v["lines"][0]["allocations"][0]["status"], "fulfilled");
        let a = c.hub_get("/v1/availability/L").await;
        assert_eq!(
            (a["on_hand"].as_i64(), a["held"].as_u64(), a["available"].as_u64()),
            (Some(8), Some(0), Some(8)),
            "{a}"
        );
        let conflicts = c.hub_get("/v1/conflicts?sku=L").await;
        assert_eq!(conflicts["items"].as_array().unwrap().len(), 0, "a fulfilment is no oversell: {conflicts}");

        // A POS sale that dips into held units still happens, names the hold it endangers, and (once
        // synced) is an oversell the hub reconciles.
        c.restock(0, "M", 2).await;
        let (s, m) = reserve(&c, json!({"id": Uuid::now_v7(), "lines": [{"sku": "M", "qty": 2}]})).await;
        assert_eq!(s, 201, "{m}");
        let m_hold = m["allocations"][0]["hold"].as_str().unwrap().to_owned();
        wait_until("the M hold at the store", DEADLINE, || async {
            let h: Value = http.get(format!("{}/v1/holds", c.agent_url(0))).send().await.unwrap().json().await.unwrap();
            h["items"].as_array().unwrap().iter().any(|x| x["id"] == m_hold.as_str()).then_some(())
        })
        .await;
        let r = http
            .post(format!("{}/v1/sales", c.agent_url(0)))
            .json(&json!({"id": Uuid::now_v7(), "lines": [{"sku": "M", "qty": 1}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let sale: Value = r.json().await.unwrap();
        assert!(sale["flags"].as_array().unwrap().contains(&json!("dips_into_holds")), "{sale}");
        assert_eq!(sale["lines"][0]["endangered_holds"][0]["id"], m_hold.as_str(), "{sale}");
        assert_eq!(sale["lines"][0]["sellable"], -1);
        wait_until("the M oversell at the hub", DEADLINE, || async {
            let v = c.hub_get("/v1/conflicts?sku=M&status=open").await;
            v["items"].as_array().unwrap().iter().any(|x| x["kind"] == "oversell" && x["shortfall"] == 1).then_some(())
        })
        .await;
        // The customer gives up the short reservation: nothing is owed, so the oversell settles itself.
        let (s, _) = c.hub_call(Method::DELETE, &format!("/v1/reservations/{}", m["id"].as_str().unwrap()), None).await;
        assert_eq!(s, 200);
        let settled = c.hub_get("/v1/conflicts?sku=M").await;
        let oversell = settled["items"].as_array().unwrap().iter().find(|x| x["kind"] == "oversell").unwrap().clone();
        assert_eq!(oversell["status"], "resolved", "{settled}");
        assert!(oversell["resolution"].as_str().unwrap().contains("released"), "{oversell}");
        let journal: Value = http.get(format!("{}/v1/status", c.agent_url(0))).send().await.unwrap().json().await.unwrap();
        assert!(journal["journal_events"].as_u64().unwrap() >= 4);
        // Releasing a fulfilled reservation is refused.
        let (s, _) = c.hub_call(Method::DELETE, &format!("/v1/reservations/{extended}"), None).await;
        assert_eq!(s, 409);
    }
}

both_backends! {
    /// A store that goes dark is offered online minus its recent sales velocity × silence.
    async fn a_silent_store_offers_less_online() {
        let hub_env = vec![
            ("SHELFSYNC_HUB__STALENESS__GRACE_SECS".to_string(), "0".to_string()),
            ("SHELFSYNC_HUB__STALENESS__VELOCITY_WINDOW_SECS".to_string(), "10".to_string()),
        ];
        let mut c = Cluster::start_full(1, vec![], hub_env).await;
        c.restock(0, "V", 100).await;
        for _ in 0..20 {
            assert_eq!(c.sell(0, "V", 1).await, 201);
        }
        c.converged(&["V"], DEADLINE).await;
        let a = c.hub_get("/v1/availability/V").await;
        assert_eq!(
            (a["stores"][0]["staleness_discount"].as_u64(), a["available"].as_u64()),
            (Some(0), Some(80)),
            "connected: no discount"
        );
        c.stop_agent(0).await; // a clean goodbye: the hub knows at once the store is gone
                               // 20 units sold within a 10 s window is ~2 units/s: after a few seconds of silence the offer shrinks.
        let a = wait_until("a staleness discount", DEADLINE, || async {
            let a = c.hub_get("/v1/availability/V").await;
            (a["stores"][0]["staleness_discount"].as_u64().unwrap() >= 2).then_some(a)
        })
        .await;
        let s = &a["stores"][0];
        assert_eq!(s["connected"], false);
        assert_eq!(s["raw_available"], 80, "{a}");
        assert_eq!(s["available"].as_u64().unwrap(), 80 - s["staleness_discount"].as_u64().unwrap());
        assert!(s["last_seen"].is_string());
        // Reservations see the discounted figure.
        let offered = s["available"].as_u64().unwrap();
        let (st, e) = reserve(&c, json!({"id": Uuid::now_v7(), "lines": [{"sku": "V", "qty": 80}]})).await;
        assert_eq!(st, 409, "{e}");
        assert!(e["available"].as_u64().unwrap() <= offered, "reservations see the discounted figure: {e} vs {a}");
    }
}

both_backends! {
    /// Head office closes a conflict by hand (with a note and who did it); the list pages with
    /// `after`/`next` like the other lists.
    async fn an_admin_resolves_a_conflict_and_the_list_pages() {
        let c = Cluster::start(1).await;
        // Three SKUs sold below zero: three open negative-stock conflicts.
        for sku in ["N1", "N2", "N3"] {
            assert_eq!(c.sell(0, sku, 2).await, 201);
            wait_until("the negative stock conflict", DEADLINE, || async {
                let v = c.hub_get(&format!("/v1/conflicts?sku={sku}&status=open")).await;
                v["items"].as_array().unwrap().iter().any(|x| x["kind"] == "negative_stock").then_some(())
            })
            .await;
        }
        let open = c.hub_get("/v1/conflicts?status=open&sku=N2").await;
        let id = open["items"].as_array().unwrap().iter().find(|x| x["kind"] == "negative_stock").unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let open_before = c.hub_get("/v1/conflicts?status=open").await["items"].as_array().unwrap().len();

        let path = format!("/v1/conflicts/{id}/resolve");
        let (s, v) = c.hub_post(&path, json!({"note": ""})).await;
        assert_eq!((s, v["error"].as_str()), (422, Some("invalid_request")), "{v}");
        let (s, v) = c.hub_post(&path, json!({"note": "recounted: two units found in the back room"})).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["status"], "resolved");
        assert_eq!(v["resolution"], "recounted: two units found in the back room (resolved by unnamed)");
        let (s, v) = c.hub_post(&path, json!({"note": "again"})).await;
        assert_eq!(s, 409, "resolving twice: {v}");
        let (s, v) = c.hub_post(&format!("/v1/conflicts/{}/resolve", Uuid::now_v7()), json!({"note": "x"})).await;
        assert_eq!(s, 404, "{v}");
        let (s, v) = c.hub_post("/v1/conflicts/not-an-id/resolve", json!({"note": "x"})).await;
        assert_eq!(s, 422, "{v}");
        // A viewer cannot.
        let viewer = c.hub_admin(&["token", "create", "--role", "viewer"]).await;
        let r = reqwest::Client::new()
            .post(format!("{}{path}", c.hub_url()))
            .bearer_auth(viewer.trim())
            .json(&json!({"note": "x"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403);
        // It is on the feed.
        let feed = c.hub_get("/v1/changes?limit=1000").await;
        assert!(feed["items"].as_array().unwrap().iter().any(|e| e["kind"] == "conflict_resolved"), "{feed}");
        let open = c.hub_get("/v1/conflicts?status=open").await;
        assert_eq!(open["items"].as_array().unwrap().len(), open_before - 1, "{open}");
        // The same from the command line, through the running hub.
        let n3 = c.hub_get("/v1/conflicts?status=open&sku=N3").await["items"][0]["id"].as_str().unwrap().to_owned();
        let url = c.hub_url();
        let out = c
            .hub_cli(&["conflicts", "resolve", &n3, "--note", "written off", "--url", &url, "--token", &c.admin_token])
            .await;
        assert!(out.contains("resolved: written off"), "{out}");
        let out = c
            .hub_cli(&["conflicts", "list", "--status", "open", "--json", "--url", &url, "--token", &c.admin_token])
            .await;
        let listed: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(listed.as_array().unwrap().len(), open_before - 2, "{out}");
        assert!(listed.as_array().unwrap().iter().all(|x| x["id"] != n3.as_str()));

        // Paging: one per page, newest first, `next` null on the last page.
        let all = c.hub_get("/v1/conflicts").await;
        assert_eq!(all["next"], Value::Null);
        let mut seen = Vec::new();
        let mut q = "/v1/conflicts?limit=1".to_string();
        loop {
            let page = c.hub_get(&q).await;
            seen.extend(page["items"].as_array().unwrap().iter().map(|x| x["id"].clone()));
            match page["next"].as_str() {
                Some(n) => q = format!("/v1/conflicts?limit=1&after={n}"),
                None => break,
            }
        }
        assert_eq!(
            &seen,
            all["items"].as_array().unwrap().iter().map(|x| &x["id"]).cloned().collect::<Vec<_>>().as_slice()
        );
        assert!(seen.len() >= 3, "{seen:?}");
        let (s, v) = c.hub_call(Method::GET, &format!("/v1/conflicts?after={}", Uuid::now_v7()), None).await;
        assert_eq!(s, 422, "an unknown cursor: {v}");
    }
}
