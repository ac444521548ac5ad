//! Reservations and the change feed against an in-process hub on real sockets.

use std::collections::HashSet;
use std::sync::Arc;

use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::{json, Value};
use uuid::Uuid;

mod common;
use common::{hub_with, H};

async fn hub() -> H {
    hub_with(|_| {}).await
}

impl H {
    async fn post(&self, token: &str, path: &str, body: Value) -> (StatusCode, Value) {
        let r =
            self.http.post(format!("{}{path}", self.hub.url())).bearer_auth(token).json(&body).send().await.unwrap();
        let s = r.status();
        (s, r.json().await.unwrap_or(Value::Null))
    }
    async fn get(&self, path: &str) -> Value {
        let r = self.http.get(format!("{}{path}", self.hub.url())).bearer_auth(&self.admin).send().await.unwrap();
        assert!(r.status().is_success(), "{path}: {}", r.status());
        r.json().await.unwrap()
    }
    async fn restock(&self, store: &str, sku: &str, qty: u64) {
        let (s, v) = self
            .post(
                &self.admin,
                "/v1/restocks",
                json!({"id": Uuid::now_v7(), "store": store, "lines": [{"sku": sku, "qty": qty}]}),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
    }
}

/// 64 concurrent clients each reserving 1 unit of a SKU with 100 available: exactly 100 succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hot_sku_never_allocates_more_than_is_available() {
    let h = Arc::new(hub().await);
    h.restock("store-a", "HOT", 60).await;
    h.restock("store-b", "HOT", 40).await;
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let h = h.clone();
        tasks.push(tokio::spawn(async move {
            let mut won = 0;
            loop {
                let (s, v) = h
                    .post(
                        &h.storefront,
                        "/v1/reservations",
                        json!({"id": Uuid::now_v7(), "lines": [{"sku": "HOT", "qty": 1}]}),
                    )
                    .await;
                match s {
                    StatusCode::CREATED => won += 1,
                    StatusCode::CONFLICT => {
                        assert_eq!(v["error"], "insufficient_stock");
                        assert_eq!(v["sku"], "HOT");
                        return won;
                    }
                    other => panic!("unexpected {other}: {v}"),
                }
            }
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    assert_eq!(total, 100);
    let a = h.get("/v1/availability/HOT").await;
    assert_eq!((a["held"].as_u64(), a["available"].as_u64()), (Some(100), Some(0)), "{a}");
    for s in a["stores"].as_array().unwrap() {
        assert_eq!(s["held"], s["on_hand"], "never more held than on hand: {a}");
    }
}

#[tokio::test]
async fn reservations_are_idempotent_validated_and_split() {
    let h = hub().await;
    h.restock("store-a", "S", 3).await;
    h.restock("store-b", "S", 2).await;
    let id = Uuid::now_v7();
    let body = json!({"id": id, "lines": [{"sku": "S", "qty": 4}], "customer": "c-1"});
    let (s1, v1) = h.post(&h.storefront, "/v1/reservations", body.clone()).await;
    assert_eq!(s1, StatusCode::CREATED, "{v1}");
    let split: Vec<(String, u64)> = v1["allocations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["store"].as_str().unwrap().into(), a["qty"].as_u64().unwrap()))
        .collect();
    assert_eq!(split, vec![("store-a".into(), 3), ("store-b".into(), 1)], "most available first, split when needed");
    assert!(v1["expires_at"].is_string());
    let (s2, v2) = h.post(&h.storefront, "/v1/reservations", body).await;
    assert_eq!((s2, &v2), (StatusCode::OK, &v1), "same body, same answer");
    let (s3, v3) =
        h.post(&h.storefront, "/v1/reservations", json!({"id": id, "lines": [{"sku": "S", "qty": 1}]})).await;
    assert_eq!((s3, v3["error"].as_str()), (StatusCode::CONFLICT, Some("idempotency_conflict")));

    // All or nothing: the second line cannot be served, so the first is not taken either.
    let (s, v) = h
        .post(
            &h.storefront,
            "/v1/reservations",
            json!({"id": Uuid::now_v7(), "lines": [{"sku": "S", "qty": 1}, {"sku": "NONE", "qty": 1}]}),
        )
        .await;
    assert_eq!((s, v["sku"].as_str(), v["available"].as_u64()), (StatusCode::CONFLICT, Some("NONE"), Some(0)), "{v}");
    assert_eq!(h.get("/v1/availability/S").await["available"], 1);

    for (body, needle) in [
        (json!({"id": Uuid::now_v7(), "lines": [{"sku": "S", "qty": 1}], "ttl_secs": 0}), "ttl_secs"),
        (json!({"id": Uuid::now_v7(), "lines": [{"sku": "S", "qty": 1}], "ttl_secs": 99999999}), "ttl_secs"),
        (json!({"id": Uuid::now_v7(), "lines": [{"sku": "S", "qty": 1}], "pickup_store": "No Such"}), "pickup_store"),
        (json!({"id": Uuid::now_v7(), "lines": []}), "lines"),
        (json!({"id": Uuid::now_v7(), "lines": [{"sku": "S", "qty": 1}], "customer": ""}), "customer"),
    ] {
        let (s, v) = h.post(&h.storefront, "/v1/reservations", body.clone()).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {v}");
        assert!(v["message"].as_str().unwrap().contains(needle), "{v}");
    }
    let (s, _) = h
        .post(
            &h.storefront,
            "/v1/reservations",
            json!({"id": Uuid::now_v7(), "lines": [{"sku": "S", "qty": 1}], "pickup_store": "store-z"}),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // Extend under an idempotency key: a retry gets the first answer; the key with another body is refused.
    let url = format!("{}/v1/reservations/{id}/extend", h.hub.url());
    let send = |ttl: u64| {
        h.http
            .post(&url)
            .bearer_auth(&h.storefront)
            .header("Idempotency-Key", "ext-1")
            .json(&json!({"ttl_secs": ttl}))
            .send()
    };
    let a: Value = send(600).await.unwrap().json().await.unwrap();
    let b: Value = send(600).await.unwrap().json().await.unwrap();
    assert_eq!(a["expires_at"], b["expires_at"]);
    assert_eq!(send(700).await.unwrap().status(), StatusCode::CONFLICT);

    // Release gives the units back; a second release answers the same.
    let del = || h.http.delete(format!("{}/v1/reservations/{id}", h.hub.url())).bearer_auth(&h.storefront).send();
    let r = del().await.unwrap();
    let status = r.status();
    let r: Value = r.json().await.unwrap_or(Value::Null);
    assert_eq!((status, &r["status"]), (StatusCode::OK, &json!("released")), "{r}");
    assert_eq!(del().await.unwrap().status(), StatusCode::OK);
    assert_eq!(h.get("/v1/availability/S").await["available"], 5);
    // A released lease cannot be extended or paid; the answer says so in words, not Rust Debug text.
    for (action, body, done) in [("extend", json!({"ttl_secs": 60}), "extended"), ("commit", json!({}), "committed")] {
        let (s, v) = h.post(&h.storefront, &format!("/v1/reservations/{id}/{action}"), body).await;
        assert_eq!((s, v["error"].as_str()), (StatusCode::CONFLICT, Some("invalid_state")), "{v}");
        let m = v["message"].as_str().unwrap();
        assert_eq!(m, format!("reservation {id} is released; it cannot be {done}"));
    }
    let r = h
        .http
        .post(&url)
        .bearer_auth(&h.storefront)
        .header("Idempotency-Key", "ext-1")
        .json(&json!({"ttl_secs": 900}))
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    assert!(v["message"].as_str().unwrap().contains(r#"Idempotency-Key "ext-1""#), "{v}");
    let r = h
        .http
        .get(format!("{}/v1/reservations/{}", h.hub.url(), Uuid::now_v7()))
        .bearer_auth(&h.storefront)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

async fn sse_events(h: &H, last_event_id: Option<u64>, n: usize) -> Vec<(u64, String)> {
    let mut req = h.http.get(format!("{}/v1/events", h.hub.url())).bearer_auth(&h.admin);
    if let Some(id) = last_event_id {
        req = req.header("Last-Event-ID", id.to_string());
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut stream = resp.bytes_stream();
    let mut buf = String::new();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while out.len() < n {
        let chunk =
            tokio::time::timeout_at(deadline, stream.next()).await.expect("events within 30 s").unwrap().unwrap();
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let mut id = None;
            let mut kind = None;
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    id = v.trim().parse().ok();
                }
                if let Some(v) = line.strip_prefix("event:") {
                    kind = Some(v.trim().to_owned());
                }
            }
            if let (Some(id), Some(kind)) = (id, kind) {
                out.push((id, kind));
            }
        }
    }
    out.truncate(n);
    out
}

/// An SSE client that disconnects and resumes with Last-Event-ID misses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_resumes_from_last_event_id_without_gaps() {
    let h = hub().await;
    for i in 0..3 {
        h.restock("store-a", &format!("E{i}"), 1).await;
    }
    let first = sse_events(&h, Some(0), 3).await;
    assert_eq!(first.iter().map(|e| e.0).collect::<Vec<_>>(), vec![1, 2, 3]);
    let last = first.last().unwrap().0;
    // While disconnected, more happens.
    for i in 3..8 {
        h.restock("store-b", &format!("E{i}"), 1).await;
    }
    let (s, _) = h
        .post(&h.storefront, "/v1/reservations", json!({"id": Uuid::now_v7(), "lines": [{"sku": "E0", "qty": 1}]}))
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let feed = h.get(&format!("/v1/changes?after={last}&limit=1000")).await;
    let expected: Vec<(u64, String)> = feed["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["cursor"].as_u64().unwrap(), i["kind"].as_str().unwrap().to_owned()))
        .collect();
    assert!(expected.len() >= 7);
    let resumed = sse_events(&h, Some(last), expected.len()).await;
    assert_eq!(resumed, expected, "the resumed stream is exactly the feed after the last seen id");
    let kinds: HashSet<&str> = expected.iter().map(|e| e.1.as_str()).collect();
    assert!(kinds.contains("reservation_held") && kinds.contains("availability_changed"));

    // Live: a client waiting at the head gets the next event as it happens.
    let head = feed["cursor"].as_u64().unwrap();
    let h = Arc::new(h);
    let h2 = h.clone();
    let waiter = tokio::spawn(async move { sse_events(&h2, Some(head), 1).await });
    h.restock("store-a", "LIVE", 1).await;
    let got = waiter.await.unwrap();
    assert_eq!(got[0].0, head + 1);

    let r = h
        .http
        .get(format!("{}/v1/events", h.hub.url()))
        .bearer_auth(&h.admin)
        .header("Last-Event-ID", "x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let r = h.http.get(format!("{}/v1/changes?limit=0", h.hub.url())).bearer_auth(&h.admin).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
}

/// An open event stream outlives the request that checked its token: once the token is revoked,
/// the stream ends before it sends anything that happened afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_stream_ends_when_its_token_is_revoked() {
    let h = hub().await;
    let (s, t) = h.post(&h.admin, "/v1/tokens", json!({"role": "viewer", "name": "sse client"})).await;
    assert_eq!(s, StatusCode::CREATED, "{t}");
    let secret = t["token"].as_str().unwrap().to_owned();
    let head = h.get("/v1/changes?limit=1").await["cursor"].as_u64().unwrap();
    let resp = h.http.get(format!("{}/v1/events?after={head}", h.hub.url())).bearer_auth(&secret).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut stream = resp.bytes_stream();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    h.restock("store-a", "BEFORE", 1).await;
    let mut seen = String::new();
    while !seen.contains("BEFORE") {
        let chunk = tokio::time::timeout_at(deadline, stream.next()).await.expect("an event").unwrap().unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    let r = h
        .http
        .delete(format!("{}/v1/tokens/{}", h.hub.url(), t["id"].as_str().unwrap()))
        .bearer_auth(&h.admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    h.restock("store-a", "AFTER", 1).await;
    let mut after = String::new();
    while let Some(Ok(chunk)) =
        tokio::time::timeout_at(deadline, stream.next()).await.expect("the stream ends within 30 s")
    {
        after.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(!after.contains("AFTER"), "a revoked token still received events: {after}");
}

/// Stopping the hub ends an open event stream cleanly (the body completes; the client resumes
/// from its last event id) instead of holding the shutdown until the drain period cuts it off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_hub_ends_event_streams_cleanly() {
    let h = hub().await;
    let resp = h.http.get(format!("{}/v1/events", h.hub.url())).bearer_auth(&h.admin).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut stream = resp.bytes_stream();
    let H { hub, .. } = h;
    let stopping = tokio::spawn(hub.stop());
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let end = loop {
        match tokio::time::timeout_at(deadline, stream.next()).await.expect("the stream ends within 30 s") {
            Some(Ok(_keep_alive)) => continue,
            other => break other,
        }
    };
    assert!(end.is_none(), "the stream ended with an error rather than cleanly: {end:?}");
    stopping.await.unwrap();
}
