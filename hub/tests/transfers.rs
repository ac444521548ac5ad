//! Transfers in transit over the hub's HTTP API, in process on a real socket: ship, incoming
//! (never available), partial receipt with a `transit_loss` adjustment, receive once, cancel,
//! reads, bad input, and what survives a restart.

use reqwest::StatusCode;
use serde_json::{json, Value};
use shelfsync_hub::config::HubConfig;
use shelfsync_hub::server::start;
use uuid::Uuid;

mod common;
use common::{hub_with, H};

async fn call(h: &H, method: &str, path: &str, token: &str, body: Option<Value>) -> (StatusCode, Value) {
    call_with(h, method, path, token, body, None).await
}

async fn call_with(
    h: &H,
    method: &str,
    path: &str,
    token: &str,
    body: Option<Value>,
    key: Option<&str>,
) -> (StatusCode, Value) {
    h.request(method, path, Some(token), body, key).await
}

async fn restock(h: &H, store: &str, lines: Value) {
    let (s, v) =
        call(h, "POST", "/v1/restocks", &h.admin, Some(json!({"id": Uuid::now_v7(), "store": store, "lines": lines})))
            .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
}

/// The figures of one store for one SKU.
async fn at(h: &H, store: &str, sku: &str) -> Value {
    let (s, v) = call(h, "GET", &format!("/v1/availability/{sku}"), &h.viewer, None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v["stores"].as_array().unwrap().iter().find(|f| f["store"] == store).cloned().unwrap_or(Value::Null)
}

/// The hub's journal rows of a transfer at a store: (kind, sku, delta, reason).
fn journal(h: &H, store: &str, id: Uuid) -> Vec<(String, String, i64, Option<String>)> {
    let conn = rusqlite::Connection::open(h.dir.path().join("hub").join("hub.db")).unwrap();
    let mut stmt = conn
        .prepare("SELECT kind, sku, delta, reason FROM journal WHERE store = ?1 AND id = ?2 ORDER BY line")
        .unwrap();
    stmt.query_map(rusqlite::params![store, id.as_bytes().as_slice()], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
    })
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

#[tokio::test]
async fn a_transfer_is_incoming_until_received_and_the_shortfall_is_a_transit_loss() {
    let h = hub_with(|_| {}).await;
    restock(&h, "store-a", json!([{"sku": "A", "qty": 10}, {"sku": "B", "qty": 4}])).await;
    let (_, head) = call(&h, "GET", "/v1/changes?after=0&limit=1000", &h.viewer, None).await;
    let cursor = head["items"].as_array().unwrap().last().unwrap()["cursor"].as_u64().unwrap();

    let id = Uuid::now_v7();
    let ship = json!({"id": id, "from": "store-a", "to": "store-b", "lines": [{"sku": "A", "qty": 6}, {"sku": "B", "qty": 4}], "reason": "rebalance"});
    let (s, v) = call(&h, "POST", "/v1/transfers", &h.admin, Some(ship.clone())).await;
    assert_eq!((s, v["status"].as_str()), (StatusCode::CREATED, Some("in_transit")), "{v}");
    assert_eq!(
        (v["from"].as_str(), v["to"].as_str(), v["received_at"].is_null()),
        (Some("store-a"), Some("store-b"), true)
    );
    assert_eq!(
        v["lines"],
        json!([{"sku": "A", "shipped": 6, "received": null, "lost": null}, {"sku": "B", "shipped": 4, "received": null, "lost": null}])
    );
    let (s, again) = call(&h, "POST", "/v1/transfers", &h.admin, Some(ship.clone())).await;
    assert_eq!((s, &again), (StatusCode::OK, &v), "a retry answers the first answer");
    let shipped = v;

    // Gone from a at once; incoming at b, never available, not on hand.
    let (a, b) = (at(&h, "store-a", "A").await, at(&h, "store-b", "A").await);
    assert_eq!((a["on_hand"].as_i64(), a["incoming"].as_u64()), (Some(4), Some(0)), "{a}");
    assert_eq!(
        (b["on_hand"].as_i64(), b["incoming"].as_u64(), b["available"].as_u64()),
        (Some(0), Some(6), Some(0)),
        "{b}"
    );
    let (_, all) = call(&h, "GET", "/v1/availability/A", &h.viewer, None).await;
    assert_eq!(
        (all["on_hand"].as_i64(), all["incoming"].as_u64(), all["available"].as_u64()),
        (Some(4), Some(6), Some(4)),
        "{all}"
    );
    let (s, stock) = call(&h, "GET", "/v1/stores/store-b/stock", &h.viewer, None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        stock["items"][0],
        json!({"sku": "A", "on_hand": 0, "held": 0, "incoming": 6, "available": 0}),
        "{stock}"
    );
    // Nothing of it can be reserved at b.
    let (s, v) = call(
        &h,
        "POST",
        "/v1/reservations",
        &h.storefront,
        Some(json!({"id": Uuid::now_v7(), "lines": [{"sku": "B", "qty": 1}], "pickup_store": "store-b"})),
    )
    .await;
    assert_eq!((s, v["error"].as_str()), (StatusCode::CONFLICT, Some("insufficient_stock")), "{v}");

    // Reads.
    let (s, got) = call(&h, "GET", &format!("/v1/transfers/{id}"), &h.viewer, None).await;
    assert_eq!((s, got["status"].as_str()), (StatusCode::OK, Some("in_transit")));
    let (_, list) = call(&h, "GET", "/v1/transfers?store=store-b&status=in_transit", &h.viewer, None).await;
    assert_eq!((list["items"].as_array().unwrap().len(), &list["next"]), (1, &Value::Null), "{list}");
    let (_, list) = call(&h, "GET", "/v1/transfers?status=received", &h.viewer, None).await;
    assert!(list["items"].as_array().unwrap().is_empty(), "{list}");

    // Bad receipts change nothing.
    let path = format!("/v1/transfers/{id}/receive");
    for (body, why) in [
        (json!({"lines": [{"sku": "A", "qty": 7}, {"sku": "B", "qty": 4}]}), "more than shipped"),
        (json!({"lines": [{"sku": "A", "qty": 6}]}), "B is missing"),
        (
            json!({"lines": [{"sku": "A", "qty": 6}, {"sku": "B", "qty": 4}, {"sku": "C", "qty": 1}]}),
            "C was not shipped",
        ),
        (json!({"lines": [{"sku": "A", "qty": -1}, {"sku": "B", "qty": 4}]}), "negative"),
        (json!({"lines": [{"sku": "A", "qty": 6}, {"sku": "A", "qty": 0}, {"sku": "B", "qty": 4}]}), "A twice"),
        (json!({"lines": [{"sku": "A", "qty": 6}], "colour": "red"}), "unknown field"),
    ] {
        let (s, v) = call(&h, "POST", &path, &h.admin, Some(body)).await;
        assert_eq!((s, v["error"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_request")), "{why}: {v}");
    }
    assert_eq!(at(&h, "store-b", "A").await["incoming"], 6);

    // 5 of 6 A arrive, all B: on_hand rises by what arrived; the missing unit is a transit loss.
    let receipt = json!({"lines": [{"sku": "B", "qty": 4}, {"sku": "A", "qty": 5}]});
    let (s, r) = call_with(&h, "POST", &path, &h.admin, Some(receipt.clone()), Some("receive-1")).await;
    assert_eq!((s, r["status"].as_str()), (StatusCode::OK, Some("received")), "{r}");
    assert_eq!(r["lines"][0], json!({"sku": "A", "shipped": 6, "received": 5, "lost": 1}));
    let b = at(&h, "store-b", "A").await;
    assert_eq!(
        (b["on_hand"].as_i64(), b["incoming"].as_u64(), b["available"].as_u64()),
        (Some(5), Some(0), Some(5)),
        "{b}"
    );
    assert_eq!(at(&h, "store-b", "B").await["on_hand"], 4);
    let loss = shelfsync_shared::Reason {
        code: shelfsync_shared::ReasonCode::TransitLoss,
        note: Some(format!("transfer {id} from store-a")),
    }
    .to_stored();
    assert_eq!(
        journal(&h, "store-b", id),
        [
            ("transfer".into(), "A".into(), 6, Some("from store-a: rebalance".into())),
            ("adjustment".into(), "A".into(), -1, Some(loss)),
            ("transfer".into(), "B".into(), 4, Some("from store-a: rebalance".into())),
        ]
    );
    assert_eq!(
        journal(&h, "store-a", id),
        [
            ("transfer".into(), "A".into(), -6, Some("to store-b: rebalance".into())),
            ("transfer".into(), "B".into(), -4, Some("to store-b: rebalance".into())),
        ]
    );

    // Receive once: the same receipt again answers the same; another is refused.
    let (s, again) = call(&h, "POST", &path, &h.admin, Some(receipt)).await;
    assert_eq!((s, &again), (StatusCode::OK, &r));
    let (s, v) = call(&h, "POST", &path, &h.admin, None).await;
    assert_eq!((s, v["error"].as_str()), (StatusCode::CONFLICT, Some("invalid_state")), "{v}");
    let (s, v) = call_with(&h, "POST", &path, &h.admin, None, Some("receive-1")).await;
    assert_eq!((s, v["error"].as_str()), (StatusCode::CONFLICT, Some("idempotency_conflict")), "{v}");
    let (s, v) = call(&h, "POST", &format!("/v1/transfers/{id}/cancel"), &h.admin, None).await;
    assert_eq!((s, v["error"].as_str()), (StatusCode::CONFLICT, Some("invalid_state")), "{v}");
    assert_eq!(at(&h, "store-b", "A").await["on_hand"], 5, "nothing was booked twice");
    let (s, again) = call(&h, "POST", "/v1/transfers", &h.admin, Some(ship)).await;
    assert_eq!(
        (s, &again),
        (StatusCode::OK, &shipped),
        "a late retry of the shipment: its first answer, nothing shipped"
    );
    assert_eq!(at(&h, "store-a", "A").await["on_hand"], 4);

    // The feed says what happened.
    let (_, feed) = call(&h, "GET", &format!("/v1/changes?after={cursor}&limit=1000"), &h.viewer, None).await;
    let kinds: Vec<&str> = feed["items"].as_array().unwrap().iter().filter_map(|e| e["kind"].as_str()).collect();
    assert!(kinds.contains(&"transfer_shipped") && kinds.contains(&"transfer_received"), "{kinds:?}");
    let shipped = feed["items"].as_array().unwrap().iter().find(|e| e["kind"] == "transfer_shipped").unwrap();
    assert_eq!(shipped["data"]["transfer"]["id"], json!(id));
    h.hub.stop().await;
}

#[tokio::test]
async fn a_cancelled_transfer_returns_its_units_and_everything_survives_a_restart() {
    let h = hub_with(|_| {}).await;
    restock(&h, "store-a", json!([{"sku": "A", "qty": 5}])).await;
    let (first, second) = (Uuid::now_v7(), Uuid::now_v7());
    for id in [first, second] {
        let body = json!({"id": id, "from": "store-a", "to": "store-b", "lines": [{"sku": "A", "qty": 2}]});
        let (s, v) = call(&h, "POST", "/v1/transfers", &h.admin, Some(body)).await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
    }
    assert_eq!(at(&h, "store-a", "A").await["on_hand"], 1);
    assert_eq!(at(&h, "store-b", "A").await["incoming"], 4);
    let (s, v) = call(&h, "POST", &format!("/v1/transfers/{first}/cancel"), &h.admin, None).await;
    assert_eq!(
        (s, v["status"].as_str(), v["cancelled_at"].is_string()),
        (StatusCode::OK, Some("cancelled"), true),
        "{v}"
    );
    let (s, again) = call(&h, "POST", &format!("/v1/transfers/{first}/cancel"), &h.admin, None).await;
    assert_eq!((s, &again), (StatusCode::OK, &v));
    let (s, e) = call(&h, "POST", &format!("/v1/transfers/{first}/receive"), &h.admin, None).await;
    assert_eq!((s, e["error"].as_str()), (StatusCode::CONFLICT, Some("invalid_state")), "{e}");
    assert_eq!(at(&h, "store-a", "A").await["on_hand"], 3);
    assert_eq!(at(&h, "store-b", "A").await["incoming"], 2);

    // Pages: newest first, next null on the last page.
    let (_, p1) = call(&h, "GET", "/v1/transfers?store=store-a&limit=1", &h.viewer, None).await;
    assert_eq!((p1["items"][0]["id"].clone(), p1["next"].clone()), (json!(second), json!(second)), "{p1}");
    let (_, p2) =
        call(&h, "GET", &format!("/v1/transfers?store=store-a&limit=1&after={second}"), &h.viewer, None).await;
    assert_eq!((p2["items"][0]["id"].clone(), p2["next"].clone()), (json!(first), Value::Null), "{p2}");

    // 404s and 422s.
    let nobody = Uuid::now_v7();
    for (method, path) in [
        ("GET", format!("/v1/transfers/{nobody}")),
        ("POST", format!("/v1/transfers/{nobody}/receive")),
        ("POST", format!("/v1/transfers/{nobody}/cancel")),
    ] {
        let (s, v) = call(&h, method, &path, &h.admin, None).await;
        assert_eq!((s, v["error"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")), "{path}: {v}");
    }
    let body = json!({"id": Uuid::now_v7(), "from": "store-a", "to": "nowhere", "lines": [{"sku": "A", "qty": 1}]});
    let (s, v) = call(&h, "POST", "/v1/transfers", &h.admin, Some(body)).await;
    assert_eq!((s, v["error"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")), "{v}");
    // A path names a transfer by id or by the key it was shipped under: an unknown key is a 404,
    // a key that cannot be one is a 422.
    let (s, v) = call(&h, "GET", "/v1/transfers/delivery-note-77", &h.viewer, None).await;
    assert_eq!((s, v["error"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")), "{v}");
    for path in [
        format!("/v1/transfers/{}", "k".repeat(129)),
        "/v1/transfers?status=lost".to_owned(),
        "/v1/transfers?store=Bad%20Store".to_owned(),
        format!("/v1/transfers?after={nobody}"),
        "/v1/transfers?limit=0".to_owned(),
        "/v1/transfers?colour=red".to_owned(),
    ] {
        let (s, v) = call(&h, "GET", &path, &h.viewer, None).await;
        assert_eq!(
            (s, v["error"].as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_request")),
            "{path}: {v}"
        );
    }
    let (s, v) = call_with(&h, "POST", &format!("/v1/transfers/{second}/cancel"), &h.admin, None, Some("")).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "an empty Idempotency-Key: {v}");
    let (s, v) = call(&h, "POST", &format!("/v1/transfers/{second}/receive"), &h.viewer, None).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{v}");

    // A restart reads every transfer back, with its incoming.
    let H { hub, admin, viewer, storefront, http, dir } = h;
    hub.stop().await;
    let mut cfg = HubConfig { data_dir: dir.path().join("hub"), ..HubConfig::default() };
    cfg.quic.listen = "127.0.0.1:0".parse().unwrap();
    cfg.http.listen = "127.0.0.1:0".parse().unwrap();
    let h = H { hub: start(cfg).await.unwrap(), admin, viewer, storefront, http, dir };
    assert_eq!(at(&h, "store-b", "A").await["incoming"], 2);
    let (_, v) = call(&h, "GET", &format!("/v1/transfers/{first}"), &h.viewer, None).await;
    assert_eq!(v["status"], "cancelled");
    let (s, v) = call(&h, "POST", &format!("/v1/transfers/{second}/receive"), &h.admin, Some(json!({}))).await;
    assert_eq!((s, v["status"].as_str()), (StatusCode::OK, Some("received")), "{v}");
    let b = at(&h, "store-b", "A").await;
    assert_eq!((b["on_hand"].as_i64(), b["incoming"].as_u64()), (Some(2), Some(0)), "{b}");
    h.hub.stop().await;
}
