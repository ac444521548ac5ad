//! The hub's HTTP API in process, on a real socket: roles, idempotency, validation, limits.

use std::str::FromStr;

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
        self.request(method, path, token, body, None).await
    }
}

#[tokio::test]
async fn tokens_and_roles_are_enforced() {
    let h = hub().await;
    let (s, v) = h.call("GET", "/v1/availability?sku=A", None, None).await;
    assert_eq!((s, v["error"].as_str()), (StatusCode::UNAUTHORIZED, Some("unauthorized")));
    let (s, _) = h.call("GET", "/v1/availability?sku=A", Some("ss_not_a_token"), None).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    for t in [&h.viewer, &h.storefront, &h.admin] {
        let (s, _) = h.call("GET", "/v1/availability?sku=A", Some(t), None).await;
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

    // A transfer ships now and arrives when received.
    let tr_id = Uuid::now_v7();
    let tr = json!({"id": tr_id, "from": "store-a", "to": "store-b", "lines": [{"sku": "A", "qty": 3}]});
    let (s, v) = h.call("POST", "/v1/transfers", t, Some(tr)).await;
    assert_eq!((s, v["status"].as_str()), (StatusCode::CREATED, Some("in_transit")), "{v}");
    assert_eq!(v["lines"].as_array().unwrap().len(), 1);
    let (s, v) = h.call("POST", &format!("/v1/transfers/{tr_id}/receive"), t, None).await;
    assert_eq!((s, v["status"].as_str()), (StatusCode::OK, Some("received")), "{v}");
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
            json!({"id": "", "store": "store-a", "lines": [{"sku": "A", "qty": 1}]}),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "/v1/restocks",
            json!({"store": "store-a", "lines": [{"sku": "A", "qty": 1}]}),
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
    let (s, v) = h.call("GET", "/v1/stores?colour=red", t, None).await;
    assert_eq!((s, v["error"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_request")), "{v}");
    let (s, v) = h.call("GET", "/v1/stores", t, None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["items"].as_array().unwrap().len(), 2);
    assert!(v["next"].is_null(), "all stores fit the default page: {v}");
    // The short lists page like every other list.
    let (_, v) = h.call("GET", "/v1/stores?limit=1", t, None).await;
    assert_eq!((v["items"][0]["id"].as_str(), v["next"].as_str()), (Some("store-a"), Some("store-a")), "{v}");
    let (_, v) = h.call("GET", "/v1/stores?limit=1&after=store-a", t, None).await;
    assert_eq!((v["items"][0]["id"].as_str(), v["next"].is_null()), (Some("store-b"), true), "{v}");
    for bad in ["/v1/stores?after=store-z", "/v1/stores?limit=0", "/v1/stores?after=Bad%20Id"] {
        let (s, v) = h.call("GET", bad, t, None).await;
        assert_eq!((s, v["parameter"].is_string()), (StatusCode::UNPROCESSABLE_ENTITY, true), "{bad}: {v}");
    }
    let (_, all) = h.call("GET", "/v1/tokens", t, None).await;
    let ids: Vec<&str> = all["items"].as_array().unwrap().iter().map(|t| t["id"].as_str().unwrap()).collect();
    assert!(ids.len() >= 3 && all["next"].is_null(), "{all}");
    let (_, v) = h.call("GET", "/v1/tokens?limit=1", t, None).await;
    assert_eq!(v["next"].as_str(), Some(ids[0]), "{v}");
    let (_, v) = h.call("GET", &format!("/v1/tokens?limit=100&after={}", ids[0]), t, None).await;
    assert_eq!(v["items"].as_array().unwrap().len(), ids.len() - 1, "{v}");
    let (s, _) = h.call("GET", "/v1/tokens?colour=red", t, None).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    h.hub.stop().await;
}

impl H {
    /// A call with an `Idempotency-Key` header.
    async fn keyed(&self, method: &str, path: &str, key: &str, body: Option<Value>) -> (StatusCode, Value) {
        self.request(method, path, Some(&self.admin), body, Some(key)).await
    }
}

/// One rule for idempotency keys at every hub write: the body's `id` or the `Idempotency-Key`
/// header, any 1..128 printable ASCII; same key and body → the first answer, another body → 409;
/// both given and different → 422. A reservation is addressable by its key, and keeps it.
#[tokio::test]
async fn idempotency_keys_are_any_printable_ascii_by_body_or_header() {
    let h = hub().await;
    let t = Some(h.admin.as_str());
    let delivery = json!({"store": "store-a", "lines": [{"sku": "K", "qty": 4}]});
    let mut with_id = delivery.clone();
    with_id["id"] = json!("delivery-0042");
    let (s1, first) = h.call("POST", "/v1/restocks", t, Some(with_id.clone())).await;
    assert_eq!(s1, StatusCode::CREATED, "{first}");
    let id = Uuid::parse_str(first["id"].as_str().unwrap()).unwrap();
    assert_eq!((first["key"].as_str(), id.get_version_num()), (Some("delivery-0042"), 8), "{first}");
    // Header only, and both equal: the same request, the first answer.
    let (s, again) = h.keyed("POST", "/v1/restocks", "delivery-0042", Some(delivery.clone())).await;
    assert_eq!((s, &again), (StatusCode::OK, &first));
    let (s, again) = h.keyed("POST", "/v1/restocks", "delivery-0042", Some(with_id.clone())).await;
    assert_eq!((s, &again), (StatusCode::OK, &first));
    // Same key, other body.
    let (s, e) = h
        .keyed(
            "POST",
            "/v1/restocks",
            "delivery-0042",
            Some(json!({"store": "store-a", "lines": [{"sku": "K", "qty": 5}]})),
        )
        .await;
    assert_eq!((s, e["error"].as_str()), (StatusCode::CONFLICT, Some("idempotency_conflict")), "{e}");
    // Two different keys, too long, control characters: 422 naming the field.
    let (s, e) = h.keyed("POST", "/v1/restocks", "delivery-0043", Some(with_id.clone())).await;
    assert_eq!((s, e["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("id")), "{e}");
    assert!(e["message"].as_str().unwrap().contains("delivery-0043"), "{e}");
    for bad in ["x".repeat(129), "line\nbreak".to_owned(), "nul\u{0}".to_owned()] {
        let mut b = delivery.clone();
        b["id"] = json!(bad);
        let (s, e) = h.call("POST", "/v1/restocks", t, Some(b)).await;
        assert_eq!((s, e["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("id")), "{bad:?}: {e}");
    }
    let (s, e) = h.keyed("POST", "/v1/restocks", "tab\there", Some(delivery.clone())).await;
    assert_eq!((s, e["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("Idempotency-Key")), "{e}");
    let (s, e) = h.keyed("POST", "/v1/restocks", &"k".repeat(129), Some(delivery.clone())).await;
    assert_eq!((s, e["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("Idempotency-Key")), "{e}");
    let (_, v) = h.call("GET", "/v1/availability/K", t, None).await;
    assert_eq!(v["on_hand"], 4, "only the first request changed stock: {v}");

    // A UUID key is that UUID; its key is its own spelling.
    let u = Uuid::now_v7();
    let tr = json!({"from": "store-a", "to": "store-b", "lines": [{"sku": "K", "qty": 1}]});
    let (s, v) = h.keyed("POST", "/v1/transfers", &u.to_string().to_uppercase(), Some(tr)).await;
    assert_eq!(
        (s, v["id"].as_str(), v["key"].as_str()),
        (StatusCode::CREATED, Some(u.to_string().as_str()), Some(u.to_string().as_str())),
        "{v}"
    );

    // A storefront names the reservation by its order number, and finds it by it.
    let order = json!({"lines": [{"sku": "K", "qty": 1}]});
    let (s, r) = h.keyed("POST", "/v1/reservations", "order-1234", Some(order.clone())).await;
    assert_eq!((s, r["key"].as_str()), (StatusCode::CREATED, Some("order-1234")), "{r}");
    let rid = r["id"].as_str().unwrap().to_owned();
    let (s, again) = h
        .call(
            "POST",
            "/v1/reservations",
            Some(&h.storefront),
            Some(json!({"id": "order-1234", "lines": [{"sku": "K", "qty": 1}]})),
        )
        .await;
    assert_eq!((s, again["id"].as_str()), (StatusCode::OK, Some(rid.as_str())));
    let (s, e) =
        h.keyed("POST", "/v1/reservations", "order-1234", Some(json!({"lines": [{"sku": "K", "qty": 2}]}))).await;
    assert_eq!((s, e["error"].as_str()), (StatusCode::CONFLICT, Some("idempotency_conflict")), "{e}");
    for path in ["/v1/reservations/order-1234".to_owned(), format!("/v1/reservations/{rid}")] {
        let (s, g) = h.call("GET", &path, Some(&h.storefront), None).await;
        assert_eq!(
            (s, g["id"].as_str(), g["key"].as_str()),
            (StatusCode::OK, Some(rid.as_str()), Some("order-1234")),
            "{path}: {g}"
        );
    }
    let (s, _) = h.call("GET", "/v1/reservations/order-9999", Some(&h.storefront), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // Actions by the order number, under their own keys.
    let (s, c1) = h.keyed("POST", "/v1/reservations/order-1234/commit", "pay-1234", None).await;
    assert_eq!((s, c1["status"].as_str()), (StatusCode::OK, Some("committed")), "{c1}");
    let (s, c2) = h.keyed("POST", "/v1/reservations/order-1234/commit", "pay-1234", None).await;
    assert_eq!((s, &c2), (StatusCode::OK, &c1));
    let (s, e) = h.keyed("DELETE", "/v1/reservations/order-1234", "pay-1234", None).await;
    assert_eq!((s, e["error"].as_str()), (StatusCode::CONFLICT, Some("idempotency_conflict")), "{e}");
    let (s, e) = h.keyed("DELETE", "/v1/reservations/order-1234", "", None).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{e}");

    // The key is stored with the reservation and the restock's answer: a restart keeps both.
    let h = h.restart(|cfg| cfg.http.max_body_bytes = 4096).await;
    let (s, g) = h.call("GET", "/v1/reservations/order-1234", Some(&h.storefront), None).await;
    assert_eq!(
        (s, g["key"].as_str(), g["status"].as_str()),
        (StatusCode::OK, Some("order-1234"), Some("committed")),
        "{g}"
    );
    let (s, again) = h.call("POST", "/v1/restocks", Some(&h.admin), Some(with_id)).await;
    assert_eq!((s, &again), (StatusCode::OK, &first));
}

/// Head office corrects a store's count with a reason code; `expected_on_hand` makes it a
/// compare-and-set decided with the change, so a correction made on stale figures is refused
/// with the current figure and records nothing.
#[tokio::test]
async fn head_office_adjustments_check_reasons_and_compare_and_set() {
    let h = hub().await;
    let t = Some(h.admin.as_str());
    let restock = json!({"id": "delivery-1", "store": "store-a", "lines": [{"sku": "ADJ", "qty": 10}]});
    assert_eq!(h.call("POST", "/v1/restocks", t, Some(restock)).await.0, StatusCode::CREATED);
    let body = json!({"id": "fix-1", "sku": "ADJ", "delta": -3, "reason": "damaged", "note": "pallet dropped", "expected_on_hand": 10});
    let (s, first) = h.call("POST", "/v1/stores/store-a/adjustments", t, Some(body.clone())).await;
    assert_eq!(s, StatusCode::CREATED, "{first}");
    assert_eq!((first["kind"].as_str(), first["key"].as_str()), (Some("adjustment"), Some("fix-1")));
    assert_eq!((first["lines"][0]["delta"].as_i64(), first["lines"][0]["on_hand"].as_i64()), (Some(-3), Some(7)));
    // A retry is the first answer, though on_hand is no longer 10.
    let (s, again) = h.call("POST", "/v1/stores/store-a/adjustments", t, Some(body)).await;
    assert_eq!((s, &again), (StatusCode::OK, &first));
    // Stale: nothing recorded, the current figure in the answer.
    let stale = json!({"id": "fix-2", "sku": "ADJ", "delta": 2, "reason": "found", "expected_on_hand": 10});
    let (s, e) = h.call("POST", "/v1/stores/store-a/adjustments", t, Some(stale)).await;
    assert_eq!(
        (s, e["error"].as_str(), e["on_hand"].as_i64()),
        (StatusCode::CONFLICT, Some("stale_quantity"), Some(7)),
        "{e}"
    );
    assert_eq!(h.call("GET", "/v1/availability/ADJ", t, None).await.1["on_hand"], 7);
    // The same key with the figure it now knows goes through (the refusal recorded nothing).
    let fresh = json!({"id": "fix-2", "sku": "ADJ", "delta": 2, "reason": "found", "expected_on_hand": 7});
    let (s, v) = h.call("POST", "/v1/stores/store-a/adjustments", t, Some(fresh)).await;
    assert_eq!((s, v["lines"][0]["on_hand"].as_i64()), (StatusCode::CREATED, Some(9)), "{v}");
    // Without expected_on_hand it just applies; a store that has never had the SKU starts at 0.
    let (s, v) = h
        .keyed(
            "POST",
            "/v1/stores/store-b/adjustments",
            "fix-3",
            Some(json!({"sku": "ADJ", "delta": 4, "reason": "correction", "expected_on_hand": 0})),
        )
        .await;
    assert_eq!((s, v["lines"][0]["on_hand"].as_i64()), (StatusCode::CREATED, Some(4)), "{v}");

    let cases = [
        ("store-z", json!({"id": "z", "sku": "ADJ", "delta": -1, "reason": "theft"}), StatusCode::NOT_FOUND, None),
        (
            "store-a",
            json!({"id": "b1", "sku": "ADJ", "delta": 0, "reason": "theft"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("delta"),
        ),
        (
            "store-a",
            json!({"id": "b2", "sku": "ADJ", "delta": 1_000_001, "reason": "found"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("delta"),
        ),
        (
            "store-a",
            json!({"id": "b3", "sku": "ADJ", "delta": 1, "reason": "theft"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("reason"),
        ),
        (
            "store-a",
            json!({"id": "b4", "sku": "ADJ", "delta": -1, "reason": "broken"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("reason"),
        ),
        (
            "store-a",
            json!({"id": "b5", "sku": "ADJ", "delta": -1, "reason": "other"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("note"),
        ),
        ("store-a", json!({"sku": "ADJ", "delta": -1, "reason": "lost"}), StatusCode::UNPROCESSABLE_ENTITY, Some("id")),
        (
            "store-a",
            json!({"id": "b6", "sku": "bad sku", "delta": -1, "reason": "lost"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("sku"),
        ),
    ];
    for (store, body, status, field) in cases {
        let (s, e) = h.call("POST", &format!("/v1/stores/{store}/adjustments"), t, Some(body.clone())).await;
        assert_eq!((s, e["field"].as_str()), (status, field), "{body}: {e}");
    }
    let (_, e) = h
        .call(
            "POST",
            "/v1/stores/store-a/adjustments",
            t,
            Some(json!({"id": "b4", "sku": "ADJ", "delta": -1, "reason": "broken"})),
        )
        .await;
    assert!(e["message"].as_str().unwrap().contains("damaged, theft"), "the codes are listed: {e}");
    let (s, _) = h
        .call(
            "POST",
            "/v1/stores/store-a/adjustments",
            Some(&h.storefront),
            Some(json!({"id": "r", "sku": "ADJ", "delta": -1, "reason": "lost"})),
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(h.call("GET", "/v1/availability/ADJ", t, None).await.1["on_hand"], 13, "refusals changed nothing");
}

/// The shrink report: a store's adjustments newest first, paged by the one convention, filtered
/// by reason code and time, with totals over the whole filter.
#[tokio::test]
async fn the_shrink_report_pages_filters_and_totals() {
    let h = hub().await;
    let (a, v) = (Some(h.admin.as_str()), Some(h.viewer.as_str()));
    let restock =
        json!({"id": "r1", "store": "store-a", "lines": [{"sku": "S1", "qty": 50}, {"sku": "S2", "qty": 50}]});
    assert_eq!(h.call("POST", "/v1/restocks", a, Some(restock)).await.0, StatusCode::CREATED);
    let made = [
        ("S1", -2, "damaged", Some("crushed")),
        ("S2", -1, "theft", None),
        ("S1", 3, "found", Some("back room")),
        ("S2", -4, "damaged", None),
        ("S1", -1, "expired", None),
    ];
    let mut ids = Vec::new();
    for (i, (sku, delta, reason, note)) in made.iter().enumerate() {
        let body = json!({"id": format!("adj-{i}"), "sku": sku, "delta": delta, "reason": reason, "note": note});
        let (s, r) = h.call("POST", "/v1/stores/store-a/adjustments", a, Some(body)).await;
        assert_eq!(s, StatusCode::CREATED, "{r}");
        ids.push(r["id"].as_str().unwrap().to_owned());
    }
    let other = json!({"id": "adj-b", "sku": "S1", "delta": -9, "reason": "lost"});
    assert_eq!(h.call("POST", "/v1/stores/store-b/adjustments", a, Some(other)).await.0, StatusCode::CREATED);

    // Newest first, every page by the one convention; restocks are not adjustments.
    let (mut after, mut seen) = (None::<u64>, Vec::new());
    loop {
        let q = after.map(|n| format!("&after={n}")).unwrap_or_default();
        let (s, page) = h.call("GET", &format!("/v1/stores/store-a/adjustments?limit=2{q}"), v, None).await;
        assert_eq!((s, page["order"].as_str()), (StatusCode::OK, Some("newest_first")), "{page}");
        assert_eq!(page["totals"].as_array().unwrap().len(), 4, "totals cover the whole filter: {page}");
        for i in page["items"].as_array().unwrap() {
            assert_eq!(
                (i["by"].as_str(), i["writer"].as_str().map(|w| w.starts_with("hub@"))),
                (Some("hub"), Some(true))
            );
            seen.push((
                i["id"].as_str().unwrap().to_owned(),
                i["reason"].as_str().unwrap().to_owned(),
                i["note"].clone(),
            ));
        }
        match page["next"].as_u64() {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    let want: Vec<_> = ids.iter().rev().cloned().collect();
    assert_eq!(seen.iter().map(|s| s.0.clone()).collect::<Vec<_>>(), want);
    assert_eq!((seen[4].1.as_str(), &seen[4].2), ("damaged", &json!("crushed")));
    assert_eq!((seen[3].1.as_str(), &seen[3].2), ("theft", &Value::Null));

    let (_, all) = h.call("GET", "/v1/stores/store-a/adjustments", v, None).await;
    let totals: Vec<(&str, i64, u64)> = all["totals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["reason"].as_str().unwrap(), t["units"].as_i64().unwrap(), t["events"].as_u64().unwrap()))
        .collect();
    assert_eq!(totals, [("damaged", -6, 2), ("theft", -1, 1), ("expired", -1, 1), ("found", 3, 1)]);
    assert_eq!(all["next"], Value::Null);

    let (_, damaged) = h.call("GET", "/v1/stores/store-a/adjustments?reason=damaged&limit=1", v, None).await;
    assert_eq!(damaged["items"].as_array().unwrap().len(), 1);
    assert_eq!(damaged["items"][0]["sku"], "S2", "the newest damaged one: {damaged}");
    assert!(damaged["next"].is_u64());
    assert_eq!(damaged["totals"], json!([{"reason": "damaged", "units": -6, "events": 2}]));
    let (_, none) = h.call("GET", "/v1/stores/store-a/adjustments?reason=other", v, None).await;
    assert_eq!((none["items"].as_array().unwrap().len(), &none["totals"]), (0, &json!([])));

    // Time bounds on occurred_at: [from, to).
    let oldest = all["items"][4]["occurred_at"].as_str().unwrap().to_owned();
    let (_, future) = h.call("GET", "/v1/stores/store-a/adjustments?from=2999-01-01T00:00:00Z", v, None).await;
    assert_eq!(future["items"].as_array().unwrap().len(), 0);
    let (_, upto) = h
        .call("GET", &format!("/v1/stores/store-a/adjustments?from={oldest}&to=2999-01-01T00:00:00%2B01:00"), v, None)
        .await;
    assert_eq!(upto["items"].as_array().unwrap().len(), 5, "{upto}");
    let (_, before) = h.call("GET", &format!("/v1/stores/store-a/adjustments?to={oldest}"), v, None).await;
    assert_eq!(before["items"].as_array().unwrap().len(), 0, "to is exclusive: {before}");

    let bad = [
        ("/v1/stores/store-a/adjustments?reason=broken", "reason"),
        ("/v1/stores/store-a/adjustments?from=yesterday", "from"),
        ("/v1/stores/store-a/adjustments?to=2025-03-01T14:05:09", "to"),
        ("/v1/stores/store-a/adjustments?from=2025-03-02T00:00:00Z&to=2025-03-01T00:00:00Z", "from"),
        ("/v1/stores/store-a/adjustments?after=x", "after"),
        ("/v1/stores/store-a/adjustments?after=123456", "after"),
        ("/v1/stores/store-a/adjustments?limit=0", "limit"),
    ];
    for (path, parameter) in bad {
        let (s, e) = h.call("GET", path, v, None).await;
        assert_eq!(
            (s, e["error"].as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_request")),
            "{path}: {e}"
        );
        if parameter != "limit" {
            assert_eq!(e["parameter"].as_str(), Some(parameter), "{path}: {e}");
        }
    }
    let (_, e) = h.call("GET", "/v1/stores/store-a/adjustments?reason=broken", v, None).await;
    assert!(e["message"].as_str().unwrap().contains("damaged, theft, expired"), "{e}");
    let (s, _) = h.call("GET", "/v1/stores/store-a/adjustments?sku=S1", v, None).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "unknown parameters are refused");
    let (s, _) = h.call("GET", "/v1/stores/store-z/adjustments", v, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

/// A batch restock is one request under one key: every entry or none, answered per entry.
#[tokio::test]
async fn batch_restocks_are_all_or_nothing_under_one_key() {
    let h = hub_with(|cfg| cfg.http.max_body_bytes = 64 * 1024).await;
    let t = Some(h.admin.as_str());
    let batch = json!({"id": "wave-7", "restocks": [
        {"store": "store-a", "lines": [{"sku": "BA", "qty": 3}, {"sku": "BB", "qty": 1}], "reason": "wave 7"},
        {"store": "store-b", "lines": [{"sku": "BA", "qty": 5}]},
        {"store": "store-a", "lines": [{"sku": "BA", "qty": 2}]},
    ]});
    let (s, first) = h.call("POST", "/v1/restocks/batch", t, Some(batch.clone())).await;
    assert_eq!(s, StatusCode::CREATED, "{first}");
    assert_eq!((first["kind"].as_str(), first["key"].as_str()), (Some("restock_batch"), Some("wave-7")));
    let entries = first["restocks"].as_array().unwrap();
    let got: Vec<(&str, usize, i64)> = entries
        .iter()
        .map(|e| {
            (
                e["store"].as_str().unwrap(),
                e["lines"].as_array().unwrap().len(),
                e["lines"][0]["on_hand"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, [("store-a", 2, 3), ("store-b", 1, 5), ("store-a", 1, 5)], "{first}");
    assert_ne!(entries[0]["id"], entries[2]["id"], "each entry is its own journal event");
    let (s, again) =
        h.keyed("POST", "/v1/restocks/batch", "wave-7", Some(json!({"restocks": batch["restocks"]}))).await;
    assert_eq!((s, &again), (StatusCode::OK, &first));
    let mut other = batch.clone();
    other["restocks"][1]["lines"][0]["qty"] = json!(6);
    let (s, e) = h.call("POST", "/v1/restocks/batch", t, Some(other)).await;
    assert_eq!((s, e["error"].as_str()), (StatusCode::CONFLICT, Some("idempotency_conflict")), "{e}");

    // Any bad entry refuses the whole batch, naming it; nothing recorded.
    let ok = json!({"store": "store-a", "lines": [{"sku": "BC", "qty": 1}]});
    let bad = [
        (json!({"store": "store-z", "lines": [{"sku": "BC", "qty": 1}]}), "restocks[1].store"),
        (json!({"store": "Bad Store", "lines": [{"sku": "BC", "qty": 1}]}), "restocks[1].store"),
        (json!({"store": "store-b", "lines": []}), "restocks[1]"),
        (json!({"store": "store-b", "lines": [{"sku": "BC", "qty": 0}]}), "restocks[1]"),
        (json!({"store": "store-b", "lines": [{"sku": "BC", "qty": 1}], "reason": "x".repeat(201)}), "restocks[1]"),
    ];
    for (i, (entry, field)) in bad.into_iter().enumerate() {
        let body = json!({"id": format!("bad-{i}"), "restocks": [ok.clone(), entry]});
        let (s, e) = h.call("POST", "/v1/restocks/batch", t, Some(body)).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{e}");
        assert!(e["message"].as_str().unwrap().starts_with(field), "{field}: {e}");
    }
    let too_many: Vec<Value> = (0..101).map(|_| ok.clone()).collect();
    let (s, e) = h.call("POST", "/v1/restocks/batch", t, Some(json!({"id": "big", "restocks": too_many}))).await;
    assert_eq!((s, e["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("restocks")), "{e}");
    let (s, e) = h.call("POST", "/v1/restocks/batch", t, Some(json!({"id": "none", "restocks": []}))).await;
    assert_eq!((s, e["field"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("restocks")), "{e}");
    let (_, v) = h.call("GET", "/v1/availability?sku=BC&sku=BA", t, None).await;
    assert_eq!((v["items"][0]["known"].as_bool(), v["items"][1]["on_hand"].as_i64()), (Some(false), Some(10)), "{v}");
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
    let open = |path: std::path::PathBuf| {
        tokio::task::spawn_blocking(move || {
            shelfsync_hub::engine::Engine::open(
                &path,
                shelfsync_hub::sqlite::SqliteOptions::default(),
                Default::default(),
            )
        })
    };
    let restored = open(to.clone()).await.unwrap().unwrap();
    let new_life = restored.hub_writer();
    assert_ne!(new_life, live_writer, "a restored hub must not reuse its writer");
    let rows = restored.stock_of(vec!["A".parse().unwrap()]).await.unwrap();
    assert_eq!(rows[0].on_hand, 5, "the backup holds what was committed");
    drop(restored);
    // The new life is on disk: opened again, the copy keeps it (and takes no further life).
    let again = open(to).await.unwrap().unwrap();
    assert_eq!(again.hub_writer(), new_life, "the restored copy's new writer was persisted");
}

/// Any method, raw body and content type; returns status, content type and the body as JSON
/// (or as a JSON string when it is not JSON).
async fn raw(
    h: &H,
    method: &str,
    path: &str,
    token: Option<&str>,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> (StatusCode, String, Value) {
    let mut req = h.http.request(method.parse().unwrap(), format!("{}{path}", h.hub.url())).body(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    let r = req.send().await.unwrap();
    let status = r.status();
    let ct = r.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    let text = r.text().await.unwrap();
    (status, ct, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

#[tokio::test]
async fn admin_api_creates_lists_and_revokes_tokens() {
    let h = hub().await;
    let t = Some(h.admin.as_str());
    // Only admins manage tokens.
    let (s, v) = h.call("GET", "/v1/tokens", Some(&h.storefront), None).await;
    assert_eq!((s, v["error"].as_str()), (StatusCode::FORBIDDEN, Some("forbidden")));
    let (s, v) = h
        .call("POST", "/v1/tokens", t, Some(json!({"role": "storefront", "name": "web shop", "expires_in": "30d"})))
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let secret = v["token"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("ss_") && secret.len() == 67, "{secret}");
    assert_eq!(
        (v["name"].as_str(), v["role"].as_str(), v["status"].as_str()),
        (Some("web shop"), Some("storefront"), Some("active"))
    );
    let id = v["id"].as_str().unwrap().to_owned();
    let created = jiff::Timestamp::from_str(v["created_at"].as_str().unwrap()).unwrap();
    let expires = jiff::Timestamp::from_str(v["expires_at"].as_str().unwrap()).unwrap();
    assert_eq!((expires - created).get_seconds(), 30 * 86_400);
    let (s, _) = h
        .call(
            "POST",
            "/v1/reservations",
            Some(&secret),
            Some(json!({"id": Uuid::now_v7(), "lines": [{"sku": "A", "qty": 1}]})),
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT, "the new token is a storefront token (and there is no stock)");

    // The list never shows a secret; it shows the tokens the harness made (unnamed) and this one.
    let (s, raw_list) = h.call("GET", "/v1/tokens", t, None).await;
    assert_eq!(s, StatusCode::OK);
    let text = raw_list.to_string();
    for secret in [&secret, &h.admin, &h.viewer, &h.storefront] {
        assert!(!text.contains(secret.as_str()), "a secret leaked into the list: {text}");
    }
    let items = raw_list["items"].as_array().unwrap();
    assert_eq!(items.len(), 4);
    assert!(items.iter().all(|i| i.get("token").is_none() && i.get("hash").is_none()), "{text}");
    assert_eq!(items.iter().filter(|i| i["name"] == "unnamed").count(), 3);
    let mine = items.iter().find(|i| i["id"] == id.as_str()).unwrap();
    assert_eq!((mine["revoked_at"].is_null(), mine["status"].as_str()), (true, Some("active")));

    // Revoked: its very next request is refused, saying why.
    let (s, v) = h.raw_delete(&format!("/v1/tokens/{id}")).await;
    assert_eq!((s, v["status"].as_str()), (StatusCode::OK, Some("revoked")), "{v}");
    let (s, v) = h.call("GET", "/v1/availability?sku=A", Some(&secret), None).await;
    assert_eq!((s, v["error"].as_str()), (StatusCode::UNAUTHORIZED, Some("token_revoked")), "{v}");
    assert!(v["message"].as_str().unwrap().contains("web shop"), "{v}");
    let (s, v) = h.raw_delete(&format!("/v1/tokens/{id}")).await;
    assert_eq!((s, v["status"].as_str()), (StatusCode::OK, Some("revoked")), "revoking twice is harmless");
    let (s, v) = h.raw_delete(&format!("/v1/tokens/{}", Uuid::now_v7())).await;
    assert_eq!((s, v["error"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")));
    let (s, v) = h.raw_delete("/v1/tokens/not-an-id").await;
    assert_eq!((s, v["error"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_request")));

    for (body, needle) in [
        (json!({"role": "owner"}), "unknown variant"),
        (json!({"role": "viewer", "name": ""}), "name must not be empty"),
        (json!({"role": "viewer", "name": "x".repeat(65)}), "limit is 64"),
        (json!({"role": "viewer", "expires_in": "3 weeks"}), "expires_in"),
        (json!({"role": "viewer", "expires_in": "0m"}), "between 1s"),
        (json!({"role": "viewer", "secret": "mine"}), "unknown field"),
    ] {
        let (s, v) = h.call("POST", "/v1/tokens", t, Some(body.clone())).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {v}");
        assert!(v["message"].as_str().unwrap().contains(needle), "{body}: {v}");
    }
    let (_, v) = h.call("GET", "/v1/tokens", t, None).await;
    assert_eq!(v["items"].as_array().unwrap().len(), 4, "refused requests created nothing");
}

#[tokio::test]
async fn an_expired_token_is_refused() {
    let h = hub().await;
    let (s, v) = h
        .call(
            "POST",
            "/v1/tokens",
            Some(&h.admin),
            Some(json!({"role": "viewer", "name": "brief", "expires_in": "1s"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let secret = v["token"].as_str().unwrap().to_owned();
    let expires = jiff::Timestamp::from_str(v["expires_at"].as_str().unwrap()).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (s, v) = h.call("GET", "/v1/availability?sku=A", Some(&secret), None).await;
        if s != StatusCode::OK {
            assert_eq!((s, v["error"].as_str()), (StatusCode::UNAUTHORIZED, Some("token_expired")), "{v}");
            assert!(jiff::Timestamp::now() >= expires, "refused before its expiry");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the token never expired");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let (_, v) = h.call("GET", "/v1/tokens", Some(&h.admin), None).await;
    let brief = v["items"].as_array().unwrap().iter().find(|i| i["name"] == "brief").unwrap().clone();
    assert_eq!(brief["status"], "expired");
}

#[tokio::test]
async fn last_use_is_recorded_without_a_write_per_request() {
    let h = hub().await;
    let last_used = || async {
        let (_, v) = h.call("GET", "/v1/tokens", Some(&h.admin), None).await;
        let items = v["items"].as_array().unwrap().clone();
        let viewer = items.iter().find(|i| i["role"] == "viewer").expect("the harness's viewer token");
        viewer["last_used_at"].as_str().map(str::to_owned)
    };
    assert_eq!(last_used().await, None, "never used yet");
    let (s, _) = h.call("GET", "/v1/availability?sku=A", Some(&h.viewer), None).await;
    assert_eq!(s, StatusCode::OK);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let first = loop {
        if let Some(t) = last_used().await {
            break t;
        }
        assert!(std::time::Instant::now() < deadline, "last use never recorded");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    // More requests within the minute leave the recorded time alone (no write per request).
    let first_ts = jiff::Timestamp::from_str(&first).unwrap();
    while jiff::Timestamp::now() < first_ts + jiff::SignedDuration::from_millis(20) {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    for _ in 0..20 {
        let (s, _) = h.call("GET", "/v1/availability?sku=A", Some(&h.viewer), None).await;
        assert_eq!(s, StatusCode::OK);
    }
    // Whatever the background writer had in flight has landed once a later write commits.
    let (s, _) = h.call("POST", "/v1/tokens", Some(&h.admin), Some(json!({"role": "viewer"}))).await;
    assert_eq!(s, StatusCode::CREATED);
    assert_eq!(last_used().await.as_deref(), Some(first.as_str()));
}

#[tokio::test]
async fn every_error_is_json_on_every_route() {
    let h = hub().await;
    let (a, v) = (Some(h.admin.as_str()), Some(h.viewer.as_str()));
    let json_ct = Some("application/json");
    let big_json = format!("{{\"pad\":\"{}\"}}", "x".repeat(5000)).into_bytes();
    let big_csv = {
        let mut b = b"sku,name\n".to_vec();
        b.resize(33 << 20, b'a');
        b
    };
    type Case<'a> = (&'a str, &'a str, Option<&'a str>, Option<&'a str>, Vec<u8>, StatusCode, &'a str);
    let cases: Vec<Case> = vec![
        ("GET", "/v1/nothing", v, None, vec![], StatusCode::NOT_FOUND, "not_found"),
        ("GET", "/nothing", None, None, vec![], StatusCode::NOT_FOUND, "not_found"),
        ("DELETE", "/healthz", None, None, vec![], StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
        ("PUT", "/v1/availability/A", v, json_ct, b"{}".to_vec(), StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
        ("GET", "/v1/restocks", a, None, vec![], StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
        ("DELETE", "/v1/catalog/A", a, None, vec![], StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
        ("GET", "/v1/catalog-imports", a, None, vec![], StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
        ("POST", "/v1/restocks", a, json_ct, big_json.clone(), StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
        ("POST", "/v1/reservations", a, json_ct, big_json, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
        (
            "POST",
            "/v1/catalog-imports",
            a,
            Some("text/csv"),
            big_csv,
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
        ),
        (
            "POST",
            "/v1/catalog-imports",
            a,
            json_ct,
            b"{}".to_vec(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            "POST",
            "/v1/restocks",
            a,
            Some("text/plain"),
            b"{}".to_vec(),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        ("POST", "/v1/restocks", a, json_ct, b"{\"id\":".to_vec(), StatusCode::BAD_REQUEST, "invalid_json"),
        ("GET", "/v1/availability/%FF", v, None, vec![], StatusCode::BAD_REQUEST, "bad_request"),
        ("GET", "/v1/reservations/%C3%28", a, None, vec![], StatusCode::BAD_REQUEST, "bad_request"),
        ("GET", "/v1/changes?limit=abc", v, None, vec![], StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
        ("GET", "/v1/conflicts?colour=red", v, None, vec![], StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
        (
            "GET",
            "/v1/stores/store-a/stock?limit=-1",
            v,
            None,
            vec![],
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        ("GET", "/v1/availability", v, None, vec![], StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
        ("GET", "/v1/availability?sku=A", None, None, vec![], StatusCode::UNAUTHORIZED, "unauthorized"),
        ("GET", "/metrics", Some("ss_wrong"), None, vec![], StatusCode::UNAUTHORIZED, "unauthorized"),
        ("POST", "/v1/tokens", v, json_ct, b"{}".to_vec(), StatusCode::FORBIDDEN, "forbidden"),
    ];
    for (method, path, token, ct, body, status, code) in cases {
        let (s, got_ct, body) = raw(&h, method, path, token, ct, body).await;
        assert_eq!((s, body["error"].as_str()), (status, Some(code)), "{method} {path}: {body}");
        assert!(got_ct.starts_with("application/json"), "{method} {path}: content type {got_ct}");
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{method} {path}: {body}");
    }
    let (_, _, body) = raw(&h, "POST", "/v1/catalog-imports", a, Some("text/csv"), vec![b'x'; (32 << 20) + 1]).await;
    assert!(body["message"].as_str().unwrap().contains("32 MiB"), "{body}");
}

#[tokio::test]
async fn change_cursors_out_of_range_are_refused_naming_the_parameter() {
    let h = hub().await;
    let v = Some(h.viewer.as_str());
    for bad in ["9223372036854775808", "18446744073709551615", "18446744073709551616", "-1", "1e3", "abc"] {
        let (s, _, body) = raw(&h, "GET", &format!("/v1/changes?after={bad}"), v, None, vec![]).await;
        assert_eq!(
            (s, body["error"].as_str(), body["parameter"].as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_request"), Some("after")),
            "{bad}: {body}"
        );
        assert!(body["message"].as_str().unwrap().contains("9223372036854775807"), "{body}");
        let (s, _, body) = raw(&h, "GET", &format!("/v1/events?after={bad}"), v, None, vec![]).await;
        assert_eq!((s, body["parameter"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("after")), "{bad}: {body}");
        let r = h
            .http
            .get(format!("{}/v1/events", h.hub.url()))
            .bearer_auth(&h.viewer)
            .header("Last-Event-ID", bad)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY, "Last-Event-ID {bad}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(
            (body["error"].as_str(), body["parameter"].as_str()),
            (Some("invalid_request"), Some("Last-Event-ID")),
            "{body}"
        );
    }
    let (s, _, body) = raw(&h, "GET", "/v1/changes?after=9223372036854775807", v, None, vec![]).await;
    assert_eq!((s, body["items"].as_array().map(Vec::len)), (StatusCode::OK, Some(0)), "{body}");
    assert_eq!((&body["next"], body["cursor"].as_u64()), (&Value::Null, Some(9223372036854775807)), "{body}");
}

/// `/v1/changes` pages like every list (`next` null exactly when the page reached the head) and
/// stays tail-able: `cursor` says where to resume, also on the last page.
#[tokio::test]
async fn the_change_feed_pages_to_its_head_and_resumes_from_cursor() {
    let h = hub().await;
    let (a, v) = (Some(h.admin.as_str()), Some(h.viewer.as_str()));
    for i in 0..3 {
        let body = json!({"id": Uuid::now_v7(), "store": "store-a", "lines": [{"sku": format!("F{i}"), "qty": 1}]});
        assert_eq!(h.call("POST", "/v1/restocks", a, Some(body)).await.0, StatusCode::CREATED);
    }
    let (_, all) = h.call("GET", "/v1/changes?limit=1000", v, None).await;
    let head = all["cursor"].as_u64().unwrap();
    assert_eq!(all["next"], Value::Null, "one page reaches the head: {all}");
    assert!(all["items"].as_array().unwrap().len() >= 3);
    let (mut after, mut seen) = (0u64, Vec::new());
    loop {
        let (s, page) = h.call("GET", &format!("/v1/changes?after={after}&limit=2"), v, None).await;
        assert_eq!(s, StatusCode::OK, "{page}");
        seen.extend(page["items"].as_array().unwrap().iter().map(|i| i["cursor"].as_u64().unwrap()));
        after = page["cursor"].as_u64().unwrap();
        match page["next"].as_u64() {
            Some(n) => assert_eq!(n, after, "next is the cursor to ask after"),
            None => break,
        }
    }
    assert_eq!(seen, (1..=head).collect::<Vec<_>>(), "gap-free, every event once");
    assert_eq!(after, head);
    // Caught up: an empty page keeps the cursor; the next change is after it.
    let (_, empty) = h.call("GET", &format!("/v1/changes?after={head}"), v, None).await;
    assert_eq!(
        (empty["items"].as_array().unwrap().len(), &empty["next"], empty["cursor"].as_u64()),
        (0, &Value::Null, Some(head))
    );
    let body = json!({"id": Uuid::now_v7(), "store": "store-a", "lines": [{"sku": "F9", "qty": 1}]});
    assert_eq!(h.call("POST", "/v1/restocks", a, Some(body)).await.0, StatusCode::CREATED);
    let (_, more) = h.call("GET", &format!("/v1/changes?after={head}"), v, None).await;
    assert_eq!(more["items"][0]["cursor"].as_u64(), Some(head + 1), "{more}");
}

/// A SKU nobody catalogued or stocked is a 404 alone (the agent answers the same) and
/// `"known": false` in a batch; a catalogued SKU that no store has yet is known, with zeros.
#[tokio::test]
async fn unknown_skus_are_404_alone_and_flagged_in_a_batch() {
    let h = hub().await;
    let (a, v) = (Some(h.admin.as_str()), Some(h.viewer.as_str()));
    let body = json!({"id": Uuid::now_v7(), "store": "store-a", "lines": [{"sku": "STOCKED", "qty": 2}]});
    assert_eq!(h.call("POST", "/v1/restocks", a, Some(body)).await.0, StatusCode::CREATED);
    let (s, _) = h.raw_json("PUT", "/v1/catalog/LISTED", json!({"name": "Listed, not yet delivered"})).await;
    assert_eq!(s, StatusCode::OK);

    let (s, e) = h.call("GET", "/v1/availability/NOPE-1", v, None).await;
    assert_eq!((s, e["error"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")), "{e}");
    assert!(e["message"].as_str().unwrap().contains("NOPE-1"), "the message names the SKU: {e}");
    let (s, one) = h.call("GET", "/v1/availability/STOCKED", v, None).await;
    assert_eq!((s, one["known"].as_bool(), one["on_hand"].as_i64()), (StatusCode::OK, Some(true), Some(2)), "{one}");
    let (s, one) = h.call("GET", "/v1/availability/LISTED", v, None).await;
    assert_eq!((s, one["known"].as_bool(), one["on_hand"].as_i64()), (StatusCode::OK, Some(true), Some(0)), "{one}");

    let (s, batch) = h.call("GET", "/v1/availability?sku=STOCKED&sku=NOPE-1&sku=LISTED", v, None).await;
    assert_eq!(s, StatusCode::OK, "{batch}");
    let known: Vec<(&str, bool)> = batch["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["sku"].as_str().unwrap(), i["known"].as_bool().unwrap()))
        .collect();
    assert_eq!(known, [("STOCKED", true), ("NOPE-1", false), ("LISTED", true)]);
    assert_eq!(batch["items"][1]["on_hand"], 0);
}

#[tokio::test]
async fn a_sku_named_import_is_addressable() {
    let h = hub().await;
    let a = Some(h.admin.as_str());
    let (s, v) = h.raw_json("PUT", "/v1/catalog/import", json!({"name": "Import duty sticker"})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, v) = h.call("GET", "/v1/catalog/import", a, None).await;
    assert_eq!((s, v["name"].as_str()), (StatusCode::OK, Some("Import duty sticker")), "{v}");
    let (s, v) = h.raw_json("PATCH", "/v1/catalog/import", json!({"safety_stock": 2})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let (s, _, v) = raw(
        &h,
        "POST",
        "/v1/catalog-imports",
        a,
        Some("text/csv"),
        b"sku,name\nimport,Import duty sticker v2\nexport,Export label\n".to_vec(),
    )
    .await;
    assert_eq!((s, v["imported"].as_u64()), (StatusCode::OK, Some(2)), "{v}");
    let (_, v) = h.call("GET", "/v1/catalog/import", a, None).await;
    assert_eq!(v["name"], "Import duty sticker v2");
    // The old import path is gone: it is the SKU's own URL now.
    let (s, _, v) = raw(&h, "POST", "/v1/catalog/import", a, Some("text/csv"), b"sku,name\n".to_vec()).await;
    assert_eq!((s, v["error"].as_str()), (StatusCode::METHOD_NOT_ALLOWED, Some("method_not_allowed")), "{v}");
}

impl H {
    async fn raw_delete(&self, path: &str) -> (StatusCode, Value) {
        let (s, _, v) = raw(self, "DELETE", path, Some(&self.admin), None, vec![]).await;
        (s, v)
    }
    async fn raw_json(&self, method: &str, path: &str, body: Value) -> (StatusCode, Value) {
        let (s, _, v) =
            raw(self, method, path, Some(&self.admin), Some("application/json"), body.to_string().into_bytes()).await;
        (s, v)
    }
}

/// CORS: off by default; with `http.cors_allowed_origins`, a listed origin gets its preflight
/// answered without a token and may read answers; any other origin gets no CORS headers.
#[tokio::test]
async fn cors_lets_only_configured_origins_in() {
    let acao =
        |r: &reqwest::Response| r.headers().get("access-control-allow-origin").map(|v| v.to_str().unwrap().to_owned());
    let preflight = |h: &H, origin: &str| {
        h.http
            .request(reqwest::Method::OPTIONS, format!("{}/v1/reservations", h.hub.url()))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "authorization,content-type,idempotency-key")
            .send()
    };
    // Default: nobody.
    let h = hub_with(|_| {}).await;
    let r = preflight(&h, "https://shop.example.com").await.unwrap();
    assert_eq!(acao(&r), None);
    h.hub.stop().await;

    let h = hub_with(|c| c.http.cors_allowed_origins = vec!["https://shop.example.com".into()]).await;
    let r = preflight(&h, "https://shop.example.com").await.unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    assert_eq!(acao(&r).as_deref(), Some("https://shop.example.com"));
    let methods = r.headers()["access-control-allow-methods"].to_str().unwrap().to_owned();
    assert!(methods.contains("POST") && methods.contains("DELETE"), "{methods}");
    let allowed = r.headers()["access-control-allow-headers"].to_str().unwrap().to_lowercase();
    assert!(allowed.contains("authorization") && allowed.contains("idempotency-key"), "{allowed}");
    // Another origin: no CORS headers, so the browser refuses.
    let r = preflight(&h, "https://evil.example.net").await.unwrap();
    assert_eq!(acao(&r), None);
    // A real call from the listed origin still needs its token, and can read the answer.
    let r = h
        .http
        .get(format!("{}/v1/availability?sku=X", h.hub.url()))
        .header("origin", "https://shop.example.com")
        .bearer_auth(&h.storefront)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(acao(&r).as_deref(), Some("https://shop.example.com"));
    let r = h
        .http
        .get(format!("{}/v1/availability?sku=X", h.hub.url()))
        .header("origin", "https://shop.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    h.hub.stop().await;

    // A malformed origin is refused at start, naming the key.
    let mut cfg = shelfsync_hub::config::HubConfig::default();
    cfg.http.cors_allowed_origins = vec!["https://shop.example.com/".into()];
    let e = cfg.validate().unwrap_err().to_string();
    assert!(e.contains("http.cors_allowed_origins"), "{e}");
}

/// `GET /v1/reservations` by customer, status and shortness, newest first, paged like every
/// list; `GET /v1/availability?sku=..&store=..` gives one store's figures (click-and-collect).
#[tokio::test]
async fn reservations_list_and_availability_for_one_store() {
    let h = hub().await;
    let a = Some(h.admin.as_str());
    let sf = Some(h.storefront.as_str());
    for (store, qty) in [("store-a", 10), ("store-b", 5)] {
        let body = json!({"id": Uuid::now_v7(), "store": store, "lines": [{"sku": "A", "qty": qty}]});
        assert_eq!(h.call("POST", "/v1/restocks", a, Some(body)).await.0, StatusCode::CREATED);
    }
    let mut ids = Vec::new();
    for (customer, qty) in [("c1", 2), ("c2", 1), ("c1", 1)] {
        let id = Uuid::now_v7();
        let body = json!({"id": id, "lines": [{"sku": "A", "qty": qty}], "customer": customer});
        assert_eq!(h.call("POST", "/v1/reservations", sf, Some(body)).await.0, StatusCode::CREATED);
        ids.push(id.to_string());
        tokio::time::sleep(std::time::Duration::from_millis(2)).await; // distinct creation times
    }
    assert_eq!(h.call("DELETE", &format!("/v1/reservations/{}", ids[2]), sf, None).await.0, StatusCode::OK);
    let list = |q: &str| {
        let q = q.to_owned();
        let h = &h;
        async move {
            let (s, v) = h.call("GET", &format!("/v1/reservations{q}"), sf, None).await;
            assert_eq!(s, StatusCode::OK, "{q}: {v}");
            let got: Vec<String> =
                v["items"].as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap().to_owned()).collect();
            (got, v["next"].clone())
        }
    };
    assert_eq!(list("?customer=c1").await, (vec![ids[2].clone(), ids[0].clone()], Value::Null));
    assert_eq!(list("?customer=c1&status=held").await.0, vec![ids[0].clone()]);
    assert_eq!(list("?status=released").await.0, vec![ids[2].clone()]);
    assert_eq!(list("?short=true").await.0, Vec::<String>::new());
    assert_eq!(list("?customer=nobody").await.0, Vec::<String>::new());
    // Paging: one a page, newest first, next null on the last.
    let (mut seen, mut q) = (Vec::new(), "?limit=1".to_owned());
    loop {
        let (page, next) = list(&q).await;
        seen.extend(page);
        match next.as_str() {
            Some(n) => q = format!("?limit=1&after={n}"),
            None => break,
        }
    }
    assert_eq!(seen, vec![ids[2].clone(), ids[1].clone(), ids[0].clone()]);
    for (q, param) in [
        ("?status=lost", "status"),
        ("?limit=0", "limit"),
        (&*format!("?after={}", Uuid::now_v7()), "after"),
        ("?after=x", "after"),
    ] {
        let (s, v) = h.call("GET", &format!("/v1/reservations{q}"), sf, None).await;
        assert_eq!((s, v["parameter"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some(param)), "{q}: {v}");
    }
    let (s, _) = h.call("GET", "/v1/reservations?colour=red", sf, None).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    let (s, _) = h.call("GET", "/v1/reservations", Some(&h.viewer), None).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "customer references are for the storefront");

    // One store's availability.
    let v = h.call("GET", "/v1/availability?sku=A&store=store-b", Some(&h.viewer), None).await.1;
    let item = &v["items"][0];
    assert_eq!(item["stores"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!((item["stores"][0]["store"].as_str(), item["on_hand"].as_i64()), (Some("store-b"), Some(5)), "{v}");
    let (s, _) = h.call("GET", "/v1/availability?sku=A&store=store-z", Some(&h.viewer), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, v) = h.call("GET", "/v1/availability?sku=A&store=store-a&store=store-b", Some(&h.viewer), None).await;
    assert_eq!((s, v["parameter"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("store")), "{v}");
}
