//! The POS API through a real socket on 127.0.0.1:0 with a real SQLite file in a temp dir.

use std::collections::HashSet;

use rand::{RngExt, SeedableRng};
use reqwest::StatusCode;
use serde_json::{json, Value};
use shelfsync_agent::config::AgentConfig;
use shelfsync_agent::db::{Db, DbOptions};
use shelfsync_agent::server::{start, RunningAgent};
use uuid::Uuid;

struct Harness {
    agent: RunningAgent,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

async fn harness_with(mutate: impl FnOnce(&mut AgentConfig)) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let mut config = AgentConfig::default();
    config.data_dir = dir.path().to_owned();
    config.api.listen = "127.0.0.1:0".parse().unwrap();
    mutate(&mut config);
    Db::create(&config.db_path(), &"store-1".parse().unwrap(), DbOptions::default()).unwrap();
    let agent = start(config).await.unwrap();
    Harness { agent, http: reqwest::Client::new(), _dir: dir }
}

async fn harness() -> Harness {
    harness_with(|_| {}).await
}

impl Harness {
    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let r = self.http.post(format!("{}{path}", self.agent.url())).json(&body).send().await.unwrap();
        let status = r.status();
        (status, r.json().await.unwrap())
    }

    async fn post_keyed(&self, path: &str, key: &str, body: Value) -> (StatusCode, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.agent.url()))
            .header("Idempotency-Key", key)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status();
        (status, r.json().await.unwrap())
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        let r = self.http.get(format!("{}{path}", self.agent.url())).send().await.unwrap();
        let status = r.status();
        (status, r.json().await.unwrap())
    }

    async fn on_hand(&self, sku: &str) -> i64 {
        let (s, v) = self.get(&format!("/v1/stock/{sku}")).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v["on_hand"].as_i64().unwrap()
    }

    async fn status(&self) -> Value {
        self.get("/v1/status").await.1
    }
}

fn id() -> String {
    Uuid::now_v7().to_string()
}

fn sale(id: &str, sku: &str, qty: i64) -> Value {
    json!({"id": id, "lines": [{"sku": sku, "qty": qty}]})
}

#[tokio::test]
async fn sale_return_adjust_count_move_on_hand() {
    let h = harness().await;
    let (s, v) = h.post("/v1/counts", json!({"id": id(), "sku": "HSS-001", "counted": 10})).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["lines"][0]["delta"], 10);
    assert_eq!(v["lines"][0]["previous_on_hand"], 0);

    let (s, v) = h
        .post("/v1/sales", json!({"id": id(), "lines": [{"sku": "HSS-001", "qty": 2}, {"sku": "HSS-001", "qty": 1}]}))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["lines"][0]["on_hand"], 8);
    assert_eq!(v["lines"][1]["on_hand"], 7);
    assert_eq!(v["lines"][1]["sellable"], 7);
    assert_eq!(v["lines"][1]["held"], 0);
    assert_eq!(v["flags"], json!([]));

    let (s, v) = h.post("/v1/returns", sale(&id(), "HSS-001", 1)).await;
    assert_eq!((s, v["lines"][0]["on_hand"].as_i64()), (StatusCode::CREATED, Some(8)));
    let (s, v) =
        h.post("/v1/adjustments", json!({"id": id(), "sku": "HSS-001", "delta": -3, "reason": "damaged"})).await;
    assert_eq!((s, v["lines"][0]["on_hand"].as_i64()), (StatusCode::CREATED, Some(5)));

    // A count is the difference to what the store believed.
    let (s, v) = h.post("/v1/counts", json!({"id": id(), "sku": "HSS-001", "counted": 4})).await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(v["lines"][0]["delta"], -1);
    assert_eq!(v["lines"][0]["previous_on_hand"], 5);
    assert_eq!(h.on_hand("HSS-001").await, 4);

    let (s, v) = h.get("/v1/stock/HSS-001").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v, json!({"sku": "HSS-001", "on_hand": 4, "held": 0, "sellable": 4, "granted": 0, "incoming": 0}));
    let st = h.status().await;
    assert_eq!(st["journal_events"], 6);
    assert_eq!(st["skus"], 1);
    assert_eq!(st["store"], "store-1");
    assert!(st["writer"].as_str().unwrap().starts_with("store-1@"));
    assert_eq!(st["sync"]["state"], "disabled");
}

#[tokio::test]
async fn unknown_sku_sale_is_accepted_and_flagged() {
    let h = harness().await;
    let (s, v) = h.get("/v1/stock/NEVER-SEEN").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(v["error"], "not_found");
    let (s, v) = h.post("/v1/sales", sale(&id(), "NEVER-SEEN", 2)).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["lines"][0]["on_hand"], -2);
    assert_eq!(v["flags"], json!(["unknown_sku", "negative_stock"]));
    assert_eq!(h.on_hand("NEVER-SEEN").await, -2);
    // Now known: a second sale is only negative.
    let (_, v) = h.post("/v1/sales", sale(&id(), "NEVER-SEEN", 1)).await;
    assert_eq!(v["flags"], json!(["negative_stock"]));
}

#[tokio::test]
async fn idempotent_by_id() {
    let h = harness().await;
    h.post("/v1/counts", json!({"id": id(), "sku": "A", "counted": 10})).await;
    let sid = id();
    let (s1, v1) = h.post("/v1/sales", sale(&sid, "A", 3)).await;
    let (s2, v2) = h.post("/v1/sales", sale(&sid, "A", 3)).await;
    assert_eq!((s1, s2), (StatusCode::CREATED, StatusCode::OK));
    assert_eq!(v1, v2, "a retry gets the first answer");
    assert_eq!(h.on_hand("A").await, 7);
    let (s, v) = h.post("/v1/sales", sale(&sid, "A", 4)).await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert_eq!(v["error"], "idempotency_conflict");
    assert!(v["message"].as_str().unwrap().contains(&sid));
    // Same id at another endpoint is a different body too.
    let (s, v) = h.post("/v1/returns", sale(&sid, "A", 3)).await;
    assert_eq!((s, v["error"].as_str()), (StatusCode::CONFLICT, Some("idempotency_conflict")));
    assert_eq!(h.on_hand("A").await, 7);
    assert_eq!(h.status().await["journal_events"], 2);
}

/// Idempotency keys as integrators send them: a receipt number in the body's id or in an
/// Idempotency-Key header, one key space, same body → the first answer, different body → 409.
#[tokio::test]
async fn any_key_by_body_or_header_means_one_request() {
    let h = harness().await;
    let receipt = "R-0042/till 3";
    let (s, first) = h.post("/v1/sales", sale(receipt, "KEY-1", 1)).await;
    assert_eq!(s, StatusCode::CREATED, "{first}");
    assert_eq!(first["key"], receipt);
    let id = Uuid::parse_str(first["id"].as_str().unwrap()).unwrap();
    assert_eq!(id, shelfsync_shared::IdempotencyKey::parse(receipt).unwrap().id(), "the documented derivation");
    let (s, again) = h.post("/v1/sales", sale(receipt, "KEY-1", 1)).await;
    assert_eq!((s, &again), (StatusCode::OK, &first));
    // The same key in the header is the same request.
    let (s, v) = h.post_keyed("/v1/sales", receipt, json!({"lines": [{"sku": "KEY-1", "qty": 1}]})).await;
    assert_eq!((s, &v), (StatusCode::OK, &first));
    let (s, v) = h.post_keyed("/v1/sales", receipt, sale(receipt, "KEY-1", 1)).await;
    assert_eq!((s, &v), (StatusCode::OK, &first), "both, equal");
    let (s, v) = h.post("/v1/sales", sale(receipt, "KEY-1", 2)).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert_eq!(v["error"], "idempotency_conflict");
    assert!(v["message"].as_str().unwrap().contains(receipt), "{v}");
    let (s, v) = h.post_keyed("/v1/counts", receipt, json!({"sku": "KEY-1", "counted": 3})).await;
    assert_eq!(s, StatusCode::CONFLICT, "another kind under the same key: {v}");
    let (s, v) = h.post_keyed("/v1/sales", "R-0043", sale("R-0044", "KEY-1", 1)).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(v["message"].as_str().unwrap().contains("name different requests"), "{v}");
    let (s, v) = h.post_keyed("/v1/sales", &"k".repeat(129), json!({"lines": [{"sku": "KEY-1", "qty": 1}]})).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(v["message"].as_str().unwrap().contains("Idempotency-Key is 129 characters"), "{v}");
    // A UUID key is the UUID itself, as it always was.
    let u = Uuid::now_v7();
    let (s, v) = h
        .post_keyed("/v1/returns", &u.to_string().to_uppercase(), json!({"lines": [{"sku": "KEY-1", "qty": 1}]}))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!((v["id"].as_str(), v["key"].as_str()), (Some(u.to_string().as_str()), Some(u.to_string().as_str())));
    assert_eq!(h.on_hand("KEY-1").await, 0, "one sale and one return, nothing else");
}

/// A stocktake in one call: counts, adjustments and sales under one key, one transaction.
#[tokio::test]
async fn a_batch_records_all_or_nothing_with_a_result_per_item() {
    let h = harness().await;
    let ago = |mins: i64| shelfsync_shared::rfc3339(shelfsync_node::now_ms() - mins * 60_000);
    let (s, _) =
        h.post("/v1/counts", json!({"id": id(), "sku": "BAT-A", "counted": 10, "occurred_at": ago(120)})).await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, _) = h.post("/v1/sales", sale(&id(), "BAT-A", 3)).await;
    assert_eq!(s, StatusCode::CREATED);
    let an_hour_ago = ago(60);
    // The handheld counted A before the 3 were sold; the batch's occurred_at is the stocktake's.
    let body = json!({"id": "stocktake-2026-12-01", "occurred_at": an_hour_ago, "items": [
        {"type": "count", "sku": "BAT-A", "counted": 9},
        {"type": "count", "sku": "BAT-B", "counted": 4},
        {"type": "adjustment", "sku": "BAT-B", "delta": -1, "reason": "damaged", "note": "crushed box", "occurred_at": ago(30)},
        {"type": "sale", "lines": [{"sku": "BAT-C", "qty": 2}]},
        {"type": "return", "lines": [{"sku": "BAT-C", "qty": 1}], "occurred_at": an_hour_ago},
    ]});
    let (s, v) = h.post("/v1/batch", body.clone()).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let items = v["items"].as_array().unwrap();
    assert_eq!(items.len(), 5);
    assert_eq!(v["key"], "stocktake-2026-12-01");
    let ids: HashSet<&str> = items.iter().map(|i| i["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 5, "each item has its own id");
    assert_eq!(items[0]["lines"][0]["on_hand"], 6, "counted 9 an hour ago, 3 sold since: {v}");
    assert_eq!(items[0]["lines"][0]["count"]["changes_after"], -3);
    assert_eq!(items[2]["lines"][0]["on_hand"], 3, "{v}");
    assert_eq!((h.on_hand("BAT-A").await, h.on_hand("BAT-B").await, h.on_hand("BAT-C").await), (6, 3, -1));
    let (s, again) = h.post("/v1/batch", body.clone()).await;
    assert_eq!((s, &again), (StatusCode::OK, &v));
    let mut other = body.clone();
    other["items"][1]["counted"] = json!(5);
    let (s, e) = h.post("/v1/batch", other).await;
    assert_eq!((s, e["error"].as_str()), (StatusCode::CONFLICT, Some("idempotency_conflict")), "{e}");

    // One bad item refuses the whole batch and names it; nothing of it is kept.
    let bad = json!({"id": "stocktake-2", "items": [
        {"type": "count", "sku": "BAT-D", "counted": 4},
        {"type": "adjustment", "sku": "BAT-D", "delta": -1, "reason": "broken"},
    ]});
    let (s, e) = h.post("/v1/batch", bad).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
    assert!(e["message"].as_str().unwrap().starts_with("items[1]: reason must be one of"), "{e}");
    let (s, _) = h.get("/v1/stock/BAT-D").await;
    assert_eq!(s, StatusCode::NOT_FOUND, "nothing of a refused batch is kept");
    // Negative stock inside a batch does not refuse it (the goods were sold); limits do.
    let many: Vec<Value> = (0..101).map(|i| json!({"type": "count", "sku": format!("M-{i}"), "counted": 1})).collect();
    let (s, e) = h.post("/v1/batch", json!({"id": id(), "items": many})).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(e["message"].as_str().unwrap().contains("limit is 100"), "{e}");
    let (s, e) = h.post("/v1/batch", json!({"id": id(), "items": [{"type": "stocktake", "sku": "A"}]})).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
    let (s, e) = h.post("/v1/batch", json!({"id": id(), "items": []})).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
    assert!(e["message"].as_str().unwrap().contains("items must not be empty"), "{e}");
    for bad in ["/v1/holds?limit=0", "/v1/holds?after=not-a-hold", "/v1/incoming?colour=red"] {
        let (s, e) = h.get(bad).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {e}");
    }
    let (s, e) = h.get(&format!("/v1/holds?after={}", Uuid::now_v7())).await;
    assert_eq!((s, e["parameter"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("after")), "{e}");
    let (s, e) = h.get("/v1/holds").await;
    assert_eq!((s, e["next"].is_null()), (StatusCode::OK, true), "{e}");
    let (s, e) = h.get("/v1/stock/NEVER-SEEN").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(e["message"].as_str().unwrap().contains("unknown here"), "{e}");
}

#[tokio::test]
async fn bad_requests_are_refused_and_change_nothing() {
    let h = harness_with(|c| c.api.max_body_bytes = 4096).await;
    h.post("/v1/counts", json!({"id": id(), "sku": "A", "counted": 5})).await;
    let before = h.status().await["journal_events"].clone();
    let cases: Vec<(&str, Value, StatusCode, &str)> = vec![
        ("/v1/sales", json!({"id": id(), "lines": []}), StatusCode::UNPROCESSABLE_ENTITY, "lines must not be empty"),
        (
            "/v1/sales",
            json!({"id": id(), "lines": [{"sku": "A", "qty": 1}, {"sku": "B", "qty": 0}]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "lines[1].qty must be between 1",
        ),
        (
            "/v1/sales",
            json!({"id": id(), "lines": [{"sku": "A", "qty": 100001}]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "lines[0].qty",
        ),
        (
            "/v1/sales",
            json!({"id": id(), "lines": [{"sku": "a/b", "qty": 1}]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "lines[0].sku",
        ),
        (
            "/v1/sales",
            json!({"id": id(), "lines": [{"sku": "x".repeat(65), "qty": 1}]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "the limit is 64",
        ),
        (
            "/v1/sales",
            json!({"id": id(), "lines": [{"sku": "A", "qty": 1}], "occurred_at": "yesterday"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "occurred_at",
        ),
        (
            "/v1/sales",
            json!({"id": id(), "lines": [{"sku": "A", "qty": 1}], "occurred_at": "2999-01-01T00:00:00Z"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "in the future",
        ),
        (
            "/v1/sales",
            json!({"id": id(), "lines": [{"sku": "A", "qty": "two"}]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "qty",
        ),
        (
            "/v1/sales",
            json!({"id": id(), "lines": [{"sku": "A", "qty": 1}], "store": "x"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown field",
        ),
        (
            "/v1/adjustments",
            json!({"id": id(), "sku": "A", "delta": 0, "reason": "damaged"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "delta must not be zero",
        ),
        (
            "/v1/adjustments",
            json!({"id": id(), "sku": "A", "delta": -1, "reason": " "}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "reason must be one of damaged, theft, expired, lost",
        ),
        (
            "/v1/adjustments",
            json!({"id": id(), "sku": "A", "delta": 2000000, "reason": "found"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "delta must be between",
        ),
        (
            "/v1/adjustments",
            json!({"id": id(), "sku": "A", "delta": -1, "reason": "shelf fell over"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "(put free text in note)",
        ),
        (
            "/v1/adjustments",
            json!({"id": id(), "sku": "A", "delta": 1, "reason": "theft"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "reason theft only removes units",
        ),
        (
            "/v1/adjustments",
            json!({"id": id(), "sku": "A", "delta": -1, "reason": "found"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "reason found only adds units",
        ),
        (
            "/v1/adjustments",
            json!({"id": id(), "sku": "A", "delta": 1, "reason": "other"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "needs a note",
        ),
        (
            "/v1/adjustments",
            json!({"id": id(), "sku": "A", "delta": -1, "reason": "lost", "note": "r".repeat(201)}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "note is 201 bytes",
        ),
        (
            "/v1/sales",
            json!({"lines": [{"sku": "A", "qty": 1}]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "an idempotency key is required",
        ),
        (
            "/v1/sales",
            json!({"id": "k".repeat(129), "lines": [{"sku": "A", "qty": 1}]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "id is 129 characters long; the limit is 128",
        ),
        (
            "/v1/counts",
            json!({"id": "till\u{7}1", "sku": "A", "counted": 1}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "not printable ASCII at position 5",
        ),
        (
            "/v1/counts",
            json!({"id": "", "sku": "A", "counted": 1}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "id must not be empty",
        ),
        (
            "/v1/counts",
            json!({"id": id(), "sku": "A", "counted": -1}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "counted must be between 0",
        ),
    ];
    for (path, body, status, needle) in cases {
        let (s, v) = h.post(path, body.clone()).await;
        assert_eq!(s, status, "{path} {body} -> {v}");
        assert!(v["message"].as_str().unwrap().contains(needle), "{path} {body}: {v} lacks {needle:?}");
        assert!(v["error"].is_string());
    }
    let lines: Vec<Value> = (0..101).map(|_| json!({"sku": "A", "qty": 1})).collect();
    let (s, v) = h.post("/v1/sales", json!({"id": id(), "lines": lines})).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(v["message"].as_str().unwrap().contains("limit is 100"), "{v}");

    // Malformed JSON, wrong content type, oversized body.
    let url = format!("{}/v1/sales", h.agent.url());
    let r = h.http.post(&url).header("content-type", "application/json").body("{\"id\":").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "invalid_json");
    let r = h.http.post(&url).body("{}").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let big = json!({"id": id(), "lines": [{"sku": "A", "qty": 1}], "pad": "x".repeat(8000)});
    let r = h.http.post(&url).json(&big).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "payload_too_large");

    // Query and path validation; unknown routes.
    let (s, v) = h.get("/v1/stock?limit=0").await;
    assert_eq!((s, v["error"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_request")));
    let (s, _) = h.get("/v1/stock?limit=abc").await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    let (s, _) = h.get("/v1/stock/bad%2Fsku").await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    let (s, v) = h.get("/v1/nothing").await;
    assert_eq!((s, v["error"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")));

    assert_eq!(h.on_hand("A").await, 5, "no refused request changed stock");
    assert_eq!(h.status().await["journal_events"], before, "no refused request reached the journal");
}

#[tokio::test]
async fn token_is_required_when_configured() {
    let h = harness_with(|c| c.api.token = "s3cret".into()).await;
    let url = format!("{}/v1/stock", h.agent.url());
    let r = h.http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "unauthorized");
    let r = h.http.get(&url).bearer_auth("wrong").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = h.http.get(&url).bearer_auth("s3cret").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = h.http.get(format!("{}/healthz", h.agent.url())).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK, "health checks need no token");
}

#[tokio::test]
async fn stock_pages_in_sku_order() {
    let h = harness().await;
    for i in 0..25 {
        h.post("/v1/counts", json!({"id": id(), "sku": format!("SKU-{i:03}"), "counted": i})).await;
    }
    let mut seen = Vec::new();
    let mut path = "/v1/stock?limit=10".to_string();
    loop {
        let (s, v) = h.get(&path).await;
        assert_eq!(s, StatusCode::OK);
        for item in v["items"].as_array().unwrap() {
            seen.push(item["sku"].as_str().unwrap().to_owned());
        }
        match v["next"].as_str() {
            Some(next) => path = format!("/v1/stock?limit=10&after={next}"),
            None => break,
        }
    }
    let expected: Vec<String> = (0..25).map(|i| format!("SKU-{i:03}")).collect();
    assert_eq!(seen, expected);
    // A page that ends exactly at the last row says so: no next.
    let (_, v) = h.get("/v1/stock?limit=25").await;
    assert_eq!((v["items"].as_array().unwrap().len(), &v["next"]), (25, &Value::Null), "{v}");
}

/// 8 concurrent clients each post 500 sales and randomly re-send ids already used (their own and
/// each other's): on_hand falls by exactly the number of distinct sales, and the journal holds
/// exactly that many rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idempotency_under_concurrent_retries() {
    // A deliberate load test: thousands of writes from one address in a second or two.
    let h = harness_with(|c| c.api.rate_limit = shelfsync_agent::config::AgentRateLimits::raised(1_000_000)).await;
    let (s, _) = h.post("/v1/counts", json!({"id": id(), "sku": "HOT", "counted": 100000})).await;
    assert_eq!(s, StatusCode::CREATED);
    let ids: Vec<Vec<String>> = (0..8).map(|_| (0..500).map(|_| id()).collect()).collect();
    let url = format!("{}/v1/sales", h.agent.url());
    let mut tasks = Vec::new();
    for (client, mine) in ids.iter().cloned().enumerate() {
        let (url, http, all) = (url.clone(), h.http.clone(), ids.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(client as u64);
            let mut sent = HashSet::new();
            for sid in &mine {
                let mut batch = vec![sid.clone()];
                if rng.random_bool(0.3) {
                    let other = &all[rng.random_range(0..8)];
                    batch.push(other[rng.random_range(0..other.len())].clone());
                }
                for sid in batch {
                    let r = http.post(&url).json(&sale(&sid, "HOT", 1)).send().await.unwrap();
                    assert!(r.status() == StatusCode::CREATED || r.status() == StatusCode::OK, "{}", r.status());
                    sent.insert(sid);
                }
            }
            sent
        }));
    }
    let mut distinct = HashSet::new();
    for t in tasks {
        distinct.extend(t.await.unwrap());
    }
    let n = distinct.len() as i64;
    assert!(n >= 4000, "every client's own ids were sent");
    assert_eq!(h.on_hand("HOT").await, 100000 - n);
    assert_eq!(h.status().await["journal_events"].as_i64().unwrap(), n + 1);
}

/// A backup keeps its writer and its history: when the copy is started, the hub judges that
/// history (`tests/tests/restore_clone.rs`); a fresh writer here would freeze the old one's entries
/// unchecked. Opening it records a start of its own.
#[tokio::test]
async fn backup_copy_keeps_its_writer_and_history() {
    let h = harness().await;
    h.post("/v1/sales", sale(&id(), "A", 1)).await;
    let to = h._dir.path().join("copy.db");
    h.agent.db.backup(to.clone()).await.unwrap();
    let original = h.agent.db.identity();
    let restored = tokio::task::spawn_blocking(move || Db::open(&to, DbOptions::default())).await.unwrap().unwrap();
    assert_eq!(restored.identity().store, original.store);
    assert_eq!(restored.identity().writer, original.writer);
    // The restored copy still holds the sale recorded before the backup, with its place in the
    // writer's history, and the start on the copy is recorded where that history stood.
    let stock = shelfsync_agent::ledger::stock(&restored, "A".parse().unwrap()).await.unwrap().unwrap();
    assert_eq!(stock.on_hand, -1);
    let resume = shelfsync_agent::replica::resume(&restored).await.unwrap();
    assert_eq!(resume.lineage.ordinal, 1);
    assert_eq!(resume.boots.last().unwrap().at, resume.lineage, "a boot where the copy started");
    assert!(resume.boots.len() >= 2, "the original's start and the copy's: {:?}", resume.boots);
    let ids: std::collections::HashSet<u64> = resume.boots.iter().map(|b| b.id).collect();
    assert_eq!(ids.len(), resume.boots.len(), "every start has its own id");
}

/// `occurred_at` is strict RFC 3339 within [2000-01-01, now + 24 h] on every POS write, refused
/// with 422 naming the field.
#[tokio::test]
async fn occurred_at_is_strict_rfc_3339_and_bounded() {
    let h = harness().await;
    let bodies = |at: &str| {
        vec![
            ("/v1/sales", json!({"id": id(), "lines": [{"sku": "A", "qty": 1}], "occurred_at": at})),
            ("/v1/returns", json!({"id": id(), "lines": [{"sku": "A", "qty": 1}], "occurred_at": at})),
            ("/v1/adjustments", json!({"id": id(), "sku": "A", "delta": 1, "reason": "found", "occurred_at": at})),
            ("/v1/counts", json!({"id": id(), "sku": "A", "counted": 3, "occurred_at": at})),
        ]
    };
    let tomorrow_plus = (jiff::Timestamp::now() + jiff::SignedDuration::from_hours(25)).to_string();
    for (at, needle) in [
        ("0001-01-01T00:00:00Z", "before 2000-01-01"),
        ("1999-12-31T23:59:59.999Z", "before 2000-01-01"),
        ("2025-03-01T14:05:09+25:00", "offset"),
        ("2025-03-01T14:05:09-24:00", "offset"),
        ("2025-03-01T14:05:09", "offset is required"),
        ("2025-03-01", "'T'"),
        ("2025-03-01T14:05Z", "seconds"),
        ("2025-02-29T10:00:00Z", "calendar date"),
        ("1740837909", "expected '-'"),
        (tomorrow_plus.as_str(), "24 hours in the future"),
    ] {
        for (path, body) in bodies(at) {
            let (s, v) = h.post(path, body).await;
            assert_eq!(
                (s, v["error"].as_str()),
                (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_request")),
                "{path} {at}: {v}"
            );
            assert_eq!(v["field"], "occurred_at", "{path} {at}: {v}");
            let m = v["message"].as_str().unwrap();
            assert!(m.starts_with("occurred_at") && m.contains(needle), "{path} {at}: {m} lacks {needle:?}");
        }
    }
    assert_eq!(h.status().await["journal_events"], 0, "nothing refused was recorded");
    for at in ["2000-01-01T00:00:00Z", "2025-03-01T15:05:09.250+01:00", "2025-03-01t14:05:09z"] {
        for (path, body) in bodies(at) {
            let (s, v) = h.post(path, body).await;
            assert_eq!(s, StatusCode::CREATED, "{path} {at}: {v}");
        }
    }
    let (_, v) = h
        .post(
            "/v1/sales",
            json!({"id": id(), "lines": [{"sku": "A", "qty": 1}], "occurred_at": "2025-03-01T15:05:09.250+01:00"}),
        )
        .await;
    assert_eq!(v["occurred_at"], "2025-03-01T14:05:09.25Z");
}

#[tokio::test]
async fn every_error_is_json_on_every_route() {
    let h = harness_with(|c| c.api.max_body_bytes = 4096).await;
    let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(5000));
    type Case<'a> = (&'a str, &'a str, Option<&'a str>, String, StatusCode, &'a str);
    let cases: Vec<Case> = vec![
        ("GET", "/v1/nothing", None, String::new(), StatusCode::NOT_FOUND, "not_found"),
        ("GET", "/", None, String::new(), StatusCode::NOT_FOUND, "not_found"),
        ("GET", "/v1/sales", None, String::new(), StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
        ("DELETE", "/v1/stock/A", None, String::new(), StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
        ("POST", "/healthz", None, String::new(), StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
        (
            "POST",
            "/v1/sales",
            Some("application/json"),
            big.clone(),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
        (
            "PUT",
            "/v1/catalog/A/overrides",
            Some("application/json"),
            big,
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
        (
            "POST",
            "/v1/counts",
            Some("text/plain"),
            "{}".into(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        ("POST", "/v1/counts", Some("application/json"), "{".into(), StatusCode::BAD_REQUEST, "invalid_json"),
        ("GET", "/v1/stock/%FF", None, String::new(), StatusCode::BAD_REQUEST, "bad_request"),
        ("POST", "/v1/holds/%C3%28/fulfil", None, String::new(), StatusCode::BAD_REQUEST, "bad_request"),
        ("GET", "/v1/stock?limit=abc", None, String::new(), StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
        ("GET", "/v1/stock?colour=red", None, String::new(), StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
    ];
    for (method, path, ct, body, status, code) in cases {
        let mut req = h.http.request(method.parse().unwrap(), format!("{}{path}", h.agent.url())).body(body);
        if let Some(ct) = ct {
            req = req.header("content-type", ct);
        }
        let r = req.send().await.unwrap();
        let s = r.status();
        let got_ct = r.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
        let text = r.text().await.unwrap();
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{method} {path}: not JSON: {text}"));
        assert_eq!((s, v["error"].as_str()), (status, Some(code)), "{method} {path}: {v}");
        assert!(got_ct.starts_with("application/json"), "{method} {path}: {got_ct}");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{method} {path}: {v}");
    }
}

#[cfg(unix)]
fn mode(p: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// The ledger, its WAL and SHM, its directory and its backups are private to the service user,
/// also when an older install left them readable: they are tightened on open.
#[cfg(unix)]
#[tokio::test]
async fn database_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("store");
    let db = data.join("agent.db");
    Db::create(&db, &"store-1".parse().unwrap(), DbOptions::default()).unwrap();
    assert_eq!((mode(&data), mode(&db)), (0o700, 0o600));
    let mut config = AgentConfig { data_dir: data.clone(), ..AgentConfig::default() };
    config.api.listen = "127.0.0.1:0".parse().unwrap();
    let agent = start(config.clone()).await.unwrap();
    let r = reqwest::Client::new()
        .post(format!("{}/v1/sales", agent.url()))
        .json(&sale(&id(), "A", 1))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    for f in ["agent.db", "agent.db-wal", "agent.db-shm"] {
        assert_eq!(mode(&data.join(f)), 0o600, "{f}");
    }
    let backup = dir.path().join("backup.db");
    agent.db.backup(backup.clone()).await.unwrap();
    assert_eq!(mode(&backup), 0o600, "backups hold the same data");
    agent.stop().await.unwrap();

    // An install made before: world-readable files and directory, a readable bundle.
    std::fs::create_dir(data.join("bundle")).unwrap();
    std::fs::write(data.join("bundle/store.key"), "secret").unwrap();
    for (p, m) in [
        (data.clone(), 0o755),
        (db.clone(), 0o644),
        (data.join("bundle"), 0o755),
        (data.join("bundle/store.key"), 0o644),
    ] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(m)).unwrap();
    }
    let reopened = tokio::task::spawn_blocking(move || Db::open(&db, DbOptions::default())).await.unwrap().unwrap();
    assert_eq!(
        [mode(&data), mode(reopened.path()), mode(&data.join("bundle")), mode(&data.join("bundle/store.key"))],
        [0o700, 0o600, 0o700, 0o600]
    );
}
