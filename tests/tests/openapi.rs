//! `/openapi.json` of the hub and of the agent: every route DESIGN §7 names is in it, every
//! documented operation is really served, and real responses (successes and errors) validate
//! against the schemas the document gives for their status.

use reqwest::Method;
use serde_json::{json, Value};
use shelfsync_tests::cluster::Cluster;
use uuid::Uuid;

/// Validates `body` against the schema `doc` gives for (`template`, `method`, `status`).
fn validate(doc: &Value, method: &Method, template: &str, status: u16, body: &Value) {
    let errors = mismatches(doc, method, template, status, body);
    assert!(errors.is_empty(), "{method} {template} {status} does not match the document: {errors:?}\n{body}");
}

/// How `body` departs from the schema `doc` gives for (`template`, `method`, `status`).
fn mismatches(doc: &Value, method: &Method, template: &str, status: u16, body: &Value) -> Vec<String> {
    let op = &doc["paths"][template][method.as_str().to_lowercase()];
    assert!(op.is_object(), "{method} {template} is not in the document");
    let resp = &op["responses"][status.to_string()];
    assert!(resp.is_object(), "{method} {template} answered {status}, which the document does not list: {body}");
    let schema = &resp["content"]["application/json"]["schema"];
    assert!(schema.is_object(), "{method} {template} {status} has no JSON schema");
    let root = json!({ "$ref": "#/x", "x": schema, "components": doc["components"] });
    let v = jsonschema::validator_for(&root).unwrap_or_else(|e| panic!("{method} {template}: bad schema: {e}"));
    v.iter_errors(body).map(|e| format!("{} at {}", e, e.instance_path)).collect()
}

struct Api<'a> {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
    doc: &'a Value,
    /// (method, template) seen answered.
    called: std::cell::RefCell<Vec<(String, String)>>,
}

impl Api<'_> {
    /// Calls `path` (an instance of `template`) and validates the answer; returns status and body.
    async fn call(&self, method: Method, template: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self.http.request(method.clone(), format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let json = r.headers().get("content-type").is_some_and(|c| c.to_str().unwrap().starts_with("application/json"));
        let text = r.text().await.unwrap();
        let body = if json { serde_json::from_str(&text).unwrap() } else { Value::String(text) };
        if json {
            validate(self.doc, &method, template, status, &body);
        }
        self.called.borrow_mut().push((method.as_str().to_lowercase(), template.to_owned()));
        (status, body)
    }
}

fn operations(doc: &Value) -> Vec<(String, String)> {
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            ops.push((method.clone(), path.clone()));
        }
    }
    ops.sort();
    ops
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn both_documents_list_every_route_and_real_answers_match_them() {
    let c = Cluster::start(2).await;
    let http = reqwest::Client::new();
    let hub_doc: Value = http.get(format!("{}/openapi.json", c.hub_url())).send().await.unwrap().json().await.unwrap();
    let agent_doc: Value =
        http.get(format!("{}/openapi.json", c.agent_url(0))).send().await.unwrap().json().await.unwrap();
    assert!(hub_doc["openapi"].as_str().unwrap().starts_with("3."), "{hub_doc}");

    // Every route DESIGN §7 names.
    let hub_routes = [
        ("get", "/v1/availability/{sku}"),
        ("get", "/v1/availability"),
        ("get", "/v1/stores"),
        ("get", "/v1/stores/{id}/stock"),
        ("post", "/v1/restocks"),
        ("post", "/v1/transfers"),
        ("get", "/v1/transfers"),
        ("get", "/v1/transfers/{id}"),
        ("post", "/v1/transfers/{id}/receive"),
        ("post", "/v1/transfers/{id}/cancel"),
        ("post", "/v1/reservations"),
        ("get", "/v1/reservations"),
        ("get", "/v1/reservations/{id}"),
        ("post", "/v1/reservations/{id}/commit"),
        ("post", "/v1/reservations/{id}/extend"),
        ("delete", "/v1/reservations/{id}"),
        ("get", "/v1/conflicts"),
        ("post", "/v1/conflicts/{id}/resolve"),
        ("get", "/v1/changes"),
        ("get", "/v1/events"),
        ("get", "/v1/overview"),
        ("get", "/metrics"),
        ("get", "/openapi.json"),
        ("get", "/healthz"),
        ("get", "/"),
    ];
    let agent_routes = [
        ("post", "/v1/sales"),
        ("post", "/v1/returns"),
        ("post", "/v1/adjustments"),
        ("post", "/v1/counts"),
        ("post", "/v1/batch"),
        ("get", "/v1/stock"),
        ("get", "/v1/stock/{sku}"),
        ("get", "/v1/holds"),
        ("post", "/v1/holds/{id}/fulfil"),
        ("get", "/v1/incoming"),
        ("get", "/v1/status"),
        ("get", "/healthz"),
        ("get", "/metrics"),
        ("get", "/openapi.json"),
    ];
    let (hub_ops, agent_ops) = (operations(&hub_doc), operations(&agent_doc));
    for (m, p) in hub_routes {
        assert!(hub_ops.contains(&(m.into(), p.into())), "hub document lacks {m} {p}: {hub_ops:?}");
    }
    for (m, p) in agent_routes {
        assert!(agent_ops.contains(&(m.into(), p.into())), "agent document lacks {m} {p}: {agent_ops:?}");
    }

    let hub = Api {
        http: http.clone(),
        base: c.hub_url(),
        token: Some(c.admin_token.clone()),
        doc: &hub_doc,
        called: Default::default(),
    };
    let agent =
        Api { http: http.clone(), base: c.agent_url(0), token: None, doc: &agent_doc, called: Default::default() };

    // Hub, as head office and the storefront would use it.
    let (s, _) = hub
        .call(
            Method::PUT,
            "/v1/catalog/{sku}",
            "/v1/catalog/DOC-1",
            Some(json!({"name": "Documented mug", "low_stock_threshold": 2})),
        )
        .await;
    assert_eq!(s, 200);
    let (s, _) =
        hub.call(Method::PATCH, "/v1/catalog/{sku}", "/v1/catalog/DOC-1", Some(json!({"safety_stock": 1}))).await;
    assert_eq!(s, 200);
    let (s, _) = hub
        .call(
            Method::POST,
            "/v1/restocks",
            "/v1/restocks",
            Some(json!({"id": Uuid::now_v7(), "store": "store-0", "lines": [{"sku": "DOC-1", "qty": 10}]})),
        )
        .await;
    assert_eq!(s, 201);
    let tid = Uuid::now_v7();
    let (s, _) = hub
        .call(
            Method::POST,
            "/v1/transfers",
            "/v1/transfers",
            Some(json!({"id": tid, "from": "store-0", "to": "store-1", "lines": [{"sku": "DOC-1", "qty": 2}]})),
        )
        .await;
    assert_eq!(s, 201);
    let batch = json!({"id": "doc-wave-1", "restocks": [
        {"store": "store-0", "lines": [{"sku": "DOC-1", "qty": 1}]},
        {"store": "store-1", "lines": [{"sku": "DOC-1", "qty": 1}], "reason": "wave 1"},
    ]});
    let (s, _) = hub.call(Method::POST, "/v1/restocks/batch", "/v1/restocks/batch", Some(batch.clone())).await;
    assert_eq!(s, 201);
    assert_eq!(hub.call(Method::POST, "/v1/restocks/batch", "/v1/restocks/batch", Some(batch)).await.0, 200);
    let (s, _) = hub
        .call(
            Method::POST,
            "/v1/restocks/batch",
            "/v1/restocks/batch",
            Some(json!({"id": "doc-wave-2", "restocks": []})),
        )
        .await;
    assert_eq!(s, 422);
    let adjust = "/v1/stores/{id}/adjustments";
    let adj = json!({"id": "doc-fix-1", "sku": "DOC-1", "delta": -1, "reason": "damaged", "note": "chipped", "expected_on_hand": 9});
    assert_eq!(hub.call(Method::POST, adjust, "/v1/stores/store-0/adjustments", Some(adj)).await.0, 201);
    let stale = json!({"id": "doc-fix-2", "sku": "DOC-1", "delta": 1, "reason": "found", "expected_on_hand": 100});
    let (s, e) = hub.call(Method::POST, adjust, "/v1/stores/store-0/adjustments", Some(stale)).await;
    assert_eq!((s, e["on_hand"].as_i64()), (409, Some(8)), "{e}");
    let nowhere = json!({"id": "doc-fix-3", "sku": "DOC-1", "delta": 1, "reason": "found"});
    assert_eq!(hub.call(Method::POST, adjust, "/v1/stores/store-9/adjustments", Some(nowhere)).await.0, 404);
    let tpath = format!("/v1/transfers/{tid}");
    assert_eq!(hub.call(Method::GET, "/v1/transfers/{id}", &tpath, None).await.0, 200);
    let receive = format!("{tpath}/receive");
    let (s, _) = hub
        .call(
            Method::POST,
            "/v1/transfers/{id}/receive",
            &receive,
            Some(json!({"lines": [{"sku": "DOC-1", "qty": 2}]})),
        )
        .await;
    assert_eq!(s, 200);
    // A transfer the other way stays in transit until store-0's agent lists it, then is called off.
    let back = Uuid::now_v7();
    let body = json!({"id": back, "from": "store-1", "to": "store-0", "lines": [{"sku": "DOC-1", "qty": 1}]});
    assert_eq!(hub.call(Method::POST, "/v1/transfers", "/v1/transfers", Some(body)).await.0, 201);
    shelfsync_tests::procs::wait_until(
        "the transfer at store-0's agent",
        std::time::Duration::from_secs(30),
        || async {
            let (_, v) = agent.call(Method::GET, "/v1/incoming", "/v1/incoming", None).await;
            (v["items"].as_array().unwrap().len() == 1).then_some(())
        },
    )
    .await;
    assert_eq!(
        hub.call(Method::GET, "/v1/transfers", "/v1/transfers?store=store-0&status=in_transit", None).await.0,
        200
    );
    let cancel = format!("/v1/transfers/{back}/cancel");
    assert_eq!(hub.call(Method::POST, "/v1/transfers/{id}/cancel", &cancel, None).await.0, 200);
    let again = format!("/v1/transfers/{back}/receive");
    assert_eq!(hub.call(Method::POST, "/v1/transfers/{id}/receive", &again, None).await.0, 409);
    assert_eq!(hub.call(Method::GET, "/v1/transfers", "/v1/transfers?status=lost", None).await.0, 422);
    c.converged(&["DOC-1"], std::time::Duration::from_secs(30)).await;
    let rid = Uuid::now_v7();
    let (s, _) = hub
        .call(
            Method::POST,
            "/v1/reservations",
            "/v1/reservations",
            Some(json!({"id": rid, "lines": [{"sku": "DOC-1", "qty": 1}], "customer": "c-1"})),
        )
        .await;
    assert_eq!(s, 201);
    let rpath = format!("/v1/reservations/{rid}");
    let (s, view) = hub.call(Method::GET, "/v1/reservations/{id}", &rpath, None).await;
    assert_eq!(s, 200);
    // The schemas have teeth: a body missing a field or with a wrong type does not validate.
    let mut bad = view.clone();
    bad.as_object_mut().unwrap().remove("status");
    assert!(!mismatches(&hub_doc, &Method::GET, "/v1/reservations/{id}", 200, &bad).is_empty());
    let mut bad = view.clone();
    bad["lines"][0]["qty"] = json!("one");
    assert!(!mismatches(&hub_doc, &Method::GET, "/v1/reservations/{id}", 200, &bad).is_empty());
    let extend = format!("{rpath}/extend");
    assert_eq!(hub.call(Method::POST, "/v1/reservations/{id}/extend", &extend, Some(json!({}))).await.0, 200);
    let commit = format!("{rpath}/commit");
    assert_eq!(hub.call(Method::POST, "/v1/reservations/{id}/commit", &commit, None).await.0, 200);
    assert_eq!(hub.call(Method::DELETE, "/v1/reservations/{id}", &rpath, None).await.0, 200);
    assert_eq!(hub.call(Method::GET, "/v1/availability/{sku}", "/v1/availability/DOC-1", None).await.0, 200);
    assert_eq!(hub.call(Method::GET, "/v1/availability/{sku}", "/v1/availability/NONE", None).await.0, 404);
    assert_eq!(hub.call(Method::GET, "/v1/availability", "/v1/availability?sku=DOC-1&sku=NONE", None).await.0, 200);
    assert_eq!(
        hub.call(Method::GET, "/v1/availability", "/v1/availability?sku=DOC-1&store=store-1", None).await.0,
        200
    );
    assert_eq!(hub.call(Method::GET, "/v1/reservations", "/v1/reservations?customer=c-1", None).await.0, 200);
    assert_eq!(hub.call(Method::GET, "/v1/reservations", "/v1/reservations?status=lost", None).await.0, 422);
    assert_eq!(hub.call(Method::GET, "/v1/stores", "/v1/stores", None).await.0, 200);
    assert_eq!(hub.call(Method::GET, "/v1/stores/{id}/stock", "/v1/stores/store-0/stock?limit=1", None).await.0, 200);
    let shrink = "/v1/stores/{id}/adjustments";
    let (s, report) = hub.call(Method::GET, shrink, "/v1/stores/store-0/adjustments?reason=damaged", None).await;
    assert_eq!((s, report["items"][0]["note"].as_str()), (200, Some("chipped")), "{report}");
    assert_eq!(hub.call(Method::GET, shrink, "/v1/stores/store-0/adjustments?reason=broken", None).await.0, 422);
    assert_eq!(hub.call(Method::GET, shrink, "/v1/stores/store-9/adjustments", None).await.0, 404);
    assert_eq!(hub.call(Method::GET, "/v1/catalog", "/v1/catalog?q=mug", None).await.0, 200);
    assert_eq!(hub.call(Method::GET, "/v1/overview", "/v1/overview?minutes=5", None).await.0, 200);
    assert_eq!(hub.call(Method::GET, "/v1/overview", "/v1/overview?minutes=0", None).await.0, 422);
    assert_eq!(hub.call(Method::GET, "/v1/catalog/{sku}", "/v1/catalog/DOC-1", None).await.0, 200);
    assert_eq!(hub.call(Method::GET, "/v1/changes", "/v1/changes?limit=50", None).await.0, 200);
    // A conflict to list and resolve: a sale below zero.
    assert_eq!(c.sell(1, "DOC-2", 1).await, 201);
    let cid = shelfsync_tests::procs::wait_until("a conflict", std::time::Duration::from_secs(30), || async {
        let (_, v) = hub.call(Method::GET, "/v1/conflicts", "/v1/conflicts?status=open", None).await;
        v["items"].as_array().unwrap().iter().find(|x| x["kind"] == "negative_stock").map(|x| x["id"].clone())
    })
    .await;
    let resolve = format!("/v1/conflicts/{}/resolve", cid.as_str().unwrap());
    let (s, _) =
        hub.call(Method::POST, "/v1/conflicts/{id}/resolve", &resolve, Some(json!({"note": "recounted"}))).await;
    assert_eq!(s, 200);
    let (s, t) =
        hub.call(Method::POST, "/v1/tokens", "/v1/tokens", Some(json!({"role": "viewer", "name": "doc"}))).await;
    assert_eq!(s, 201);
    assert_eq!(hub.call(Method::GET, "/v1/tokens", "/v1/tokens", None).await.0, 200);
    let tpath = format!("/v1/tokens/{}", t["id"].as_str().unwrap());
    assert_eq!(hub.call(Method::DELETE, "/v1/tokens/{id}", &tpath, None).await.0, 200);
    // Sales channels: configured, shown, seen side by side in availability, removed.
    let body =
        json!({"fulfil": {"stores": ["store-0"]}, "buffer": {"units": 1}, "latency": {"lagged": {"lag_secs": 300}}});
    let (s, _) = hub.call(Method::PUT, "/v1/channels/{id}", "/v1/channels/amazon", Some(body.clone())).await;
    assert_eq!(s, 201);
    let (s, _) = hub.call(Method::PUT, "/v1/channels/{id}", "/v1/channels/amazon", Some(body)).await;
    assert_eq!(s, 200);
    let (s, _) = hub
        .call(Method::PUT, "/v1/channels/{id}", "/v1/channels/amazon", Some(json!({"cap": {"share_pct": 101}})))
        .await;
    assert_eq!(s, 422);
    assert_eq!(hub.call(Method::GET, "/v1/channels", "/v1/channels", None).await.0, 200);
    assert_eq!(hub.call(Method::GET, "/v1/channels/{id}", "/v1/channels/web", None).await.0, 200);
    assert_eq!(hub.call(Method::GET, "/v1/channels/{id}", "/v1/channels/nosuch", None).await.0, 404);
    let (s, v) = hub.call(Method::GET, "/v1/availability/{sku}", "/v1/availability/DOC-1?channel=all", None).await;
    assert_eq!(s, 200);
    assert_eq!(v["channels"].as_array().map(Vec::len), Some(2), "amazon and web: {v}");
    let (s, _) = hub.call(Method::GET, "/v1/availability", "/v1/availability?sku=DOC-1&channel=amazon", None).await;
    assert_eq!(s, 200);
    assert_eq!(hub.call(Method::DELETE, "/v1/channels/{id}", "/v1/channels/amazon", None).await.0, 200);
    assert_eq!(hub.call(Method::DELETE, "/v1/channels/{id}", "/v1/channels/amazon", None).await.0, 404);
    assert_eq!(hub.call(Method::GET, "/healthz", "/healthz", None).await.0, 200);
    assert_eq!(hub.call(Method::GET, "/openapi.json", "/openapi.json", None).await.0, 200);
    assert_eq!(hub.call(Method::GET, "/metrics", "/metrics", None).await.0, 200);
    assert_eq!(hub.call(Method::GET, "/", "/", None).await.0, 200);
    // Errors validate too.
    let too_long = format!("/v1/reservations/{}", "k".repeat(129));
    let (s, _) = hub.call(Method::GET, "/v1/reservations/{id}", &too_long, None).await;
    assert_eq!(s, 422);
    let (s, _) = hub.call(Method::GET, "/v1/reservations/{id}", "/v1/reservations/order-nope", None).await;
    assert_eq!(s, 404);
    let (s, _) =
        hub.call(Method::GET, "/v1/reservations/{id}", &format!("/v1/reservations/{}", Uuid::now_v7()), None).await;
    assert_eq!(s, 404);
    let (s, _) = hub.call(Method::POST, "/v1/conflicts/{id}/resolve", &resolve, Some(json!({"note": "again"}))).await;
    assert_eq!(s, 409);
    let anon = Api {
        token: None,
        ..Api { http: http.clone(), base: c.hub_url(), token: None, doc: &hub_doc, called: Default::default() }
    };
    assert_eq!(anon.call(Method::GET, "/v1/stores", "/v1/stores", None).await.0, 401);
    // Every documented hub operation was called here, except the SSE stream (its own tests)
    // and the CSV import (text/csv body; tests/tests/catalog.rs).
    let called = hub.called.borrow().clone();
    for op in &hub_ops {
        let skip = op.1 == "/v1/events" || op.1 == "/v1/catalog-imports";
        assert!(skip || called.contains(op), "{op:?} is documented but this test never called it");
    }

    // Agent, as a POS would use it.
    let sale = json!({"id": Uuid::now_v7(), "lines": [{"sku": "DOC-1", "qty": 1}]});
    assert_eq!(agent.call(Method::POST, "/v1/sales", "/v1/sales", Some(sale.clone())).await.0, 201);
    assert_eq!(agent.call(Method::POST, "/v1/sales", "/v1/sales", Some(sale)).await.0, 200);
    let ret = json!({"id": Uuid::now_v7(), "lines": [{"sku": "DOC-1", "qty": 1}]});
    assert_eq!(agent.call(Method::POST, "/v1/returns", "/v1/returns", Some(ret)).await.0, 201);
    let adj = json!({"id": Uuid::now_v7(), "sku": "DOC-1", "delta": -1, "reason": "damaged"});
    assert_eq!(agent.call(Method::POST, "/v1/adjustments", "/v1/adjustments", Some(adj)).await.0, 201);
    // The till's adjustment reaches the hub's shrink report beside head office's.
    let by_store = shelfsync_tests::procs::wait_until(
        "the store's adjustment in the hub's report",
        std::time::Duration::from_secs(30),
        || async {
            let (_, v) =
                hub.call(Method::GET, "/v1/stores/{id}/adjustments", "/v1/stores/store-0/adjustments", None).await;
            let items = v["items"].as_array().unwrap().clone();
            items.iter().any(|i| i["by"] == "store").then_some(items)
        },
    )
    .await;
    let store_adj = by_store.iter().find(|i| i["by"] == "store").unwrap();
    assert_eq!((store_adj["reason"].as_str(), store_adj["delta"].as_i64()), (Some("damaged"), Some(-1)), "{store_adj}");
    assert!(by_store.iter().any(|i| i["by"] == "hub"), "{by_store:?}");
    // And the feed told it, with its reason code apart from its note.
    let (_, feed) = hub.call(Method::GET, "/v1/changes", "/v1/changes?limit=1000", None).await;
    let told =
        feed["items"].as_array().unwrap().iter().any(|e| {
            e["kind"] == "adjustment_recorded" && e["data"]["by"] == "store" && e["data"]["reason"] == "damaged"
        });
    assert!(told, "the till's adjustment is on the feed: {feed}");
    let count = json!({"id": "handheld-7/0001", "sku": "DOC-1", "counted": 7});
    assert_eq!(agent.call(Method::POST, "/v1/counts", "/v1/counts", Some(count)).await.0, 201);
    let batch = json!({"id": "stocktake-doc", "items": [
        {"type": "count", "sku": "DOC-1", "counted": 8},
        {"type": "adjustment", "sku": "DOC-1", "delta": -1, "reason": "expired", "note": "best before"},
        {"type": "sale", "lines": [{"sku": "DOC-1", "qty": 1}]},
        {"type": "return", "lines": [{"sku": "DOC-1", "qty": 1}]},
    ]});
    assert_eq!(agent.call(Method::POST, "/v1/batch", "/v1/batch", Some(batch.clone())).await.0, 201);
    assert_eq!(agent.call(Method::POST, "/v1/batch", "/v1/batch", Some(batch)).await.0, 200);
    let bad = json!({"id": "stocktake-bad", "items": [{"type": "count", "sku": "DOC-1", "counted": -1}]});
    assert_eq!(agent.call(Method::POST, "/v1/batch", "/v1/batch", Some(bad)).await.0, 422);
    assert_eq!(agent.call(Method::GET, "/v1/stock", "/v1/stock", None).await.0, 200);
    assert_eq!(agent.call(Method::GET, "/v1/stock/{sku}", "/v1/stock/DOC-1", None).await.0, 200);
    assert_eq!(agent.call(Method::GET, "/v1/stock/{sku}", "/v1/stock/NEVER", None).await.0, 404);
    assert_eq!(agent.call(Method::GET, "/v1/status", "/v1/status", None).await.0, 200);
    assert_eq!(agent.call(Method::GET, "/v1/catalog/{sku}", "/v1/catalog/DOC-1", None).await.0 / 100, 2);
    let o = json!({"safety_stock": 1});
    assert_eq!(
        agent.call(Method::PUT, "/v1/catalog/{sku}/overrides", "/v1/catalog/DOC-1/overrides", Some(o)).await.0,
        200
    );
    // A hold to pick.
    let rid = Uuid::now_v7();
    let body = json!({"id": rid, "lines": [{"sku": "DOC-1", "qty": 1}], "pickup_store": "store-0"});
    assert_eq!(hub.call(Method::POST, "/v1/reservations", "/v1/reservations", Some(body)).await.0, 201);
    let hold =
        shelfsync_tests::procs::wait_until("the hold at the store", std::time::Duration::from_secs(30), || async {
            let (_, v) = agent.call(Method::GET, "/v1/holds", "/v1/holds", None).await;
            v["items"].as_array().unwrap().iter().find(|h| h["reservation"] == rid.to_string()).map(|h| h["id"].clone())
        })
        .await;
    let fulfil = format!("/v1/holds/{}/fulfil", hold.as_str().unwrap());
    assert_eq!(agent.call(Method::POST, "/v1/holds/{id}/fulfil", &fulfil, None).await.0, 201);
    assert_eq!(agent.call(Method::GET, "/healthz", "/healthz", None).await.0, 200);
    assert_eq!(agent.call(Method::GET, "/metrics", "/metrics", None).await.0, 200);
    assert_eq!(agent.call(Method::POST, "/v1/sales", "/v1/sales", Some(json!({"id": "x", "lines": []}))).await.0, 422);
    let called = agent.called.borrow().clone();
    for op in &agent_ops {
        assert!(op.1 == "/openapi.json" || called.contains(op), "{op:?} is documented but this test never called it");
    }
}
