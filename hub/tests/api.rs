//! The hub's HTTP API in process, on a real socket: roles, idempotency, validation, limits.

use reqwest::StatusCode;
use serde_json::{json, Value};
use shelfsync_hub::admin;
use uuid::Uuid;

mod common;
use common::{hub_with, H};

async fn hub() -> H {
    hub_with(|cfg| {
        cfg.http.max_body_bytes = 4096;
        cfg.http.max_batch_skus = 3;
    })
    .await
}

impl H {
    async fn call(&self, method: &str, path: &str, token: Option<&str>, body: Option<Value>) -> (StatusCode, Value) {
        let url = format!("{}{path}", self.hub.url());
        let mut req = match method {
            "GET" => self.http.get(url),
            "POST" => self.http.post(url),
            _ => unreachable!(),
        };
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.unwrap();
        let status = r.status();
        let text = r.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }
}

#[tokio::test]
async fn tokens_and_roles_are_enforced() {
    let h = hub().await;
    let (s, v) = h.call("GET", "/v1/availability/A", None, None).await;
    assert_eq!((s, v["error"].as_str()), (StatusCode::UNAUTHORIZED, Some("unauthorized")));
    let (s, _) = h.call("GET", "/v1/availability/A", Some("ss_not_a_token"), None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    for t in [&h.viewer, &h.storefront, &h.admin] {
        let (s, _) = h.call("GET", "/v1/availability/A", Some(t), None).await;
        assert_eq!(s, StatusCode::OK);
    }
    let restock = json!({"id": Uuid::now_v7(), "store": "store-a", "lines": [{"sku": "A", "qty": 1}]});
    for t in [&h.viewer, &h.storefront] {
        let (s, v) = h.call("POST", "/v1/restocks", Some(t), Some(restock.clone())).await;
        assert_eq!((s, v["error"].as_str()), (StatusCode::FORBIDDEN, Some("forbidden")), "{v}");
        assert!(v["message"].as_str().unwrap().contains("admin"));
    }
    let (s, _) = h.call("POST", "/v1/restocks", Some(&h.admin), Some(restock)).await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, _) = h.call("GET", "/healthz", None, None).await;
    assert_eq!(s, StatusCode::OK);
    let (s, page) = h.call("GET", "/", None, None).await;
    assert_eq!(s, StatusCode::OK, "the dashboard page itself is static; its data needs a token");
    assert!(page.as_str().unwrap().contains("Shelfsync — headquarters"));
    let (s, v) = h.call("GET", "/metrics", Some(&h.viewer), None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(v.as_str().unwrap().contains("shelfsync_hub_http_unauthorized_total 4"), "{v}");
}

#[tokio::test]
async fn restocks_and_transfers_are_idempotent_and_validated() {
    let h = hub().await;
    let t = Some(h.admin.as_str());
    let id = Uuid::now_v7();
    let body = json!({"id": id, "store": "store-a", "lines": [{"sku": "A", "qty": 5}, {"sku": "B", "qty": 2}], "reason": "delivery 17"});
    let (s1, v1) = h.call("POST", "/v1/restocks", t, Some(body.clone())).await;
    let (s2, v2) = h.call("POST", "/v1/restocks", t, Some(body)).await;
    assert_eq!((s1, s2), (StatusCode::CREATED, StatusCode::OK));
    assert_eq!(v1, v2);
    assert_eq!(v1["lines"][0]["on_hand"], 5);
    let (s, v) = h
        .call("POST", "/v1/restocks", t, Some(json!({"id": id, "store": "store-a", "lines": [{"sku": "A", "qty": 6}]})))
        .await;
    assert_eq!((s, v["error"].as_str()), (StatusCode::CONFLICT, Some("idempotency_conflict")));

    let (s, v) = h.call("GET", "/v1/availability/A", t, None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["on_hand"], 5, "the replay changed nothing: {v}");
    assert_eq!(v["stores"][0]["connected"], false);

    let tr = json!({"id": Uuid::now_v7(), "from": "store-a", "to": "store-b", "lines": [{"sku": "A", "qty": 3}]});
    let (s, v) = h.call("POST", "/v1/transfers", t, Some(tr)).await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["lines"].as_array().unwrap().len(), 2);
    let (_, v) = h.call("GET", "/v1/availability?sku=A&sku=B", t, None).await;
    assert_eq!(v["items"][0]["on_hand"], 5);
    assert_eq!(v["items"][0]["stores"].as_array().unwrap().len(), 2);
    assert_eq!(v["items"][1]["on_hand"], 2);

    let too_many = json!({"id": Uuid::now_v7(), "from": "store-a", "to": "store-b", "lines": [{"sku": "A", "qty": 1}, {"sku": "A", "qty": 2}]});
    let (s, v) = h.call("POST", "/v1/transfers", t, Some(too_many)).await;
    assert_eq!(
        (s, v["error"].as_str(), v["available"].as_i64()),
        (StatusCode::CONFLICT, Some("insufficient_stock"), Some(1)),
        "{v}"
    );

    let cases = [
        (
            "/v1/restocks",
            json!({"id": Uuid::now_v7(), "store": "nowhere", "lines": [{"sku": "A", "qty": 1}]}),
            StatusCode::NOT_FOUND,
        ),
        (
            "/v1/restocks",
            json!({"id": Uuid::now_v7(), "store": "Bad Store", "lines": [{"sku": "A", "qty": 1}]}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "/v1/restocks",
            json!({"id": Uuid::now_v7(), "store": "store-a", "lines": []}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "/v1/restocks",
            json!({"id": Uuid::now_v7(), "store": "store-a", "lines": [{"sku": "A", "qty": 0}]}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "/v1/restocks",
            json!({"id": "x", "store": "store-a", "lines": [{"sku": "A", "qty": 1}]}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "/v1/transfers",
            json!({"id": Uuid::now_v7(), "from": "store-a", "to": "store-a", "lines": [{"sku": "A", "qty": 1}]}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "/v1/restocks",
            json!({"id": Uuid::now_v7(), "store": "store-a", "lines": [{"sku": "A", "qty": 1}], "pad": "x".repeat(5000)}),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
    ];
    for (path, body, status) in cases {
        let (s, v) = h.call("POST", path, t, Some(body.clone())).await;
        assert_eq!(s, status, "{path} {body}: {v}");
        assert!(v["error"].is_string() && v["message"].is_string(), "{v}");
    }
    let (s, v) = h.call("GET", "/v1/availability?sku=A&sku=B&sku=C&sku=D", t, None).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(v["message"].as_str().unwrap().contains("limit is 3"));
    let (s, _) = h.call("GET", "/v1/availability?store=x", t, None).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    let (s, _) = h.call("GET", "/v1/stores/nowhere/stock", t, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, v) = h.call("GET", "/v1/stores/store-a/stock?limit=1", t, None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["items"][0]["sku"], "A");
    assert_eq!(v["next"], "A");
    let (_, v) = h.call("GET", "/v1/stores/store-a/stock?limit=1&after=A", t, None).await;
    assert_eq!(v["items"][0]["sku"], "B");
    let (s, v) = h.call("GET", "/v1/stores", t, None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["items"].as_array().unwrap().len(), 2);
    h.hub.stop().await;
}

#[tokio::test]
async fn backup_copy_takes_a_new_hub_incarnation() {
    let h = hub().await;
    let t = Some(h.admin.as_str());
    let (s, _) = h
        .call(
            "POST",
            "/v1/restocks",
            t,
            Some(json!({"id": Uuid::now_v7(), "store": "store-a", "lines": [{"sku": "A", "qty": 5}]})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let data_dir = h.dir.path().join("hub");
    let to = h.dir.path().join("backup.db");
    admin::backup(&data_dir, &to).await.unwrap();
    let live_writer = h.hub.hub.storage.hub_writer().clone();
    let restored = tokio::task::spawn_blocking(move || {
        shelfsync_hub::sqlite::SqliteStorage::open(&to, shelfsync_hub::sqlite::SqliteOptions::default())
    })
    .await
    .unwrap()
    .unwrap();
    use shelfsync_hub::storage::HubStorage;
    assert_ne!(restored.hub_writer(), live_writer, "a restored hub must not reuse its writer");
    let rows = restored.stock_of(vec!["A".parse().unwrap()]).await.unwrap();
    assert_eq!(rows[0].on_hand, 5, "the backup holds what was committed");
}
