//! Webhook delivery against an in-process hub on real sockets: one cursor per URL, and a redirect
//! is a failed delivery that is retried, never followed.

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::json;
use shelfsync_hub::admin;
use shelfsync_hub::config::HubConfig;
use shelfsync_hub::feed::WebhookConfig;
use shelfsync_hub::server::{start, RunningHub};
use shelfsync_hub::storage::Role;
use shelfsync_tests::procs::wait_until;
use shelfsync_tests::webhook::WebhookSink;
use uuid::Uuid;

fn hook(url: &str) -> WebhookConfig {
    WebhookConfig { url: url.into(), secret: "0123456789abcdef-secret".into(), ..Default::default() }
}

async fn hub(dir: &tempfile::TempDir, webhooks: Vec<WebhookConfig>) -> Result<RunningHub, String> {
    let d = dir.path().join("hub");
    if !d.exists() {
        admin::init(&d).await.unwrap();
        admin::add_store(&d, &"store-a".parse().unwrap(), &dir.path().join("bundle"), "127.0.0.1:7443").await.unwrap();
    }
    let mut cfg = HubConfig { data_dir: d, webhooks, ..HubConfig::default() };
    cfg.quic.listen = "127.0.0.1:0".parse().unwrap();
    cfg.http.listen = "127.0.0.1:0".parse().unwrap();
    start(cfg).await.map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_is_a_failed_delivery_and_is_not_followed() {
    let elsewhere = WebhookSink::start(0).await;
    let sink = WebhookSink::start_answering(2, format!("307 Temporary Redirect\r\nlocation: {}", elsewhere.url)).await;
    let dir = tempfile::tempdir().unwrap();
    let h = hub(&dir, vec![hook(&sink.url)]).await.unwrap();
    let admin = admin::create_token(&dir.path().join("hub"), Role::Admin).await.unwrap();
    let r = reqwest::Client::new()
        .post(format!("{}/v1/restocks", h.url()))
        .bearer_auth(&admin)
        .json(&json!({"id": Uuid::now_v7(), "store": "store-a", "lines": [{"sku": "A", "qty": 3}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    wait_until("the delivery after two redirects", Duration::from_secs(30), || async {
        (!sink.received.lock().unwrap().is_empty()).then_some(())
    })
    .await;
    assert_eq!(sink.refused.load(Ordering::SeqCst), 2, "both redirects were attempts of their own");
    assert!(elsewhere.received.lock().unwrap().is_empty(), "the redirect target got a signed event");
    assert_eq!(h.hub.metrics.webhook_failures_total.get(), 2);
    assert!(h.hub.metrics.webhook_deliveries_total.get() >= 1);
    let first = sink.received.lock().unwrap()[0].clone();
    assert_eq!(first.header("x-shelfsync-event"), Some("availability_changed"));
    h.stop().await;
}

#[tokio::test]
async fn two_webhooks_with_one_url_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let e = hub(&dir, vec![hook("http://127.0.0.1:9/a"), hook("http://127.0.0.1:9/b"), hook("http://127.0.0.1:9/a")])
        .await
        .err()
        .expect("duplicate webhook URLs are refused");
    assert!(e.contains("webhooks[2] repeats the URL of webhooks[0]") && e.contains("http://127.0.0.1:9/a"), "{e}");
}

/// A marketplace connector's "set quantity to N" hook: one update per SKU per `every_secs`, the
/// newest quantity winning; with thresholds only when one is crossed. Signed like every hook.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channels_quantity_hook_sends_the_newest_quantity_coalesced() {
    let every = WebhookSink::start(0).await;
    let crossing = WebhookSink::start(0).await;
    let dir = tempfile::tempdir().unwrap();
    let quantity = |url: &str, thresholds: Vec<u64>| WebhookConfig {
        channel: Some("amazon".into()),
        every_secs: Some(1),
        thresholds,
        ..hook(url)
    };
    let h = hub(&dir, vec![quantity(&every.url, vec![]), quantity(&crossing.url, vec![5])]).await.unwrap();
    let admin = admin::create_token(&dir.path().join("hub"), Role::Admin).await.unwrap();
    let http = reqwest::Client::new();
    let call = |method: reqwest::Method, path: &str, body: serde_json::Value| {
        http.request(method, format!("{}{path}", h.url())).bearer_auth(&admin).json(&body).send()
    };
    let r = call(reqwest::Method::PUT, "/v1/channels/amazon", json!({"latency": {"lagged": {"lag_secs": 300}}}))
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let restock = |qty: u64| json!({"id": Uuid::now_v7(), "store": "store-a", "lines": [{"sku": "A", "qty": qty}]});
    assert_eq!(call(reqwest::Method::POST, "/v1/restocks", restock(10)).await.unwrap().status(), 201);
    let quantities = |sink: &WebhookSink| -> Vec<u64> {
        sink.received
            .lock()
            .unwrap()
            .iter()
            .map(|d| serde_json::from_slice::<serde_json::Value>(&d.body).unwrap()["quantity"].as_u64().unwrap())
            .collect()
    };
    wait_until("the first quantity", Duration::from_secs(30), || async { (quantities(&every) == [10]).then_some(()) })
        .await;
    // Three restocks decided together: one update, with the newest quantity.
    let one = json!({"store": "store-a", "lines": [{"sku": "A", "qty": 1}]});
    let batch = json!({"id": Uuid::now_v7(), "restocks": [one, one, one]});
    let r = call(reqwest::Method::POST, "/v1/restocks/batch", batch).await.unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    wait_until("the newest quantity", Duration::from_secs(30), || async {
        (quantities(&every).last() == Some(&13)).then_some(())
    })
    .await;
    assert_eq!(quantities(&every), [10, 13], "coalesced: 11 and 12 are never sent");
    let d = every.received.lock().unwrap()[1].clone();
    assert_eq!(d.header("x-shelfsync-event"), Some("channel_quantity"));
    assert_eq!(
        d.header("x-shelfsync-signature"),
        Some(shelfsync_hub::feed::signature("0123456789abcdef-secret", &d.body).as_str())
    );
    let body: serde_json::Value = serde_json::from_slice(&d.body).unwrap();
    assert_eq!((body["channel"].as_str(), body["sku"].as_str()), (Some("amazon"), Some("A")), "{body}");

    // With a threshold of 5: 13 stays on the same side as 10 (nothing sent); 3 crosses it.
    let r = call(
        reqwest::Method::POST,
        "/v1/reservations",
        json!({"id": Uuid::now_v7(), "channel": "amazon", "lines": [{"sku": "A", "qty": 10}]}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 201);
    wait_until("the crossing", Duration::from_secs(30), || async {
        (quantities(&crossing).last() == Some(&3)).then_some(())
    })
    .await;
    assert_eq!(quantities(&crossing), [10, 3]);
    wait_until("every change reaches the other hook", Duration::from_secs(30), || async {
        (quantities(&every).last() == Some(&3)).then_some(())
    })
    .await;
    h.stop().await;
}

#[tokio::test]
async fn a_quantity_hooks_settings_are_checked_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let bad = WebhookConfig {
        channel: Some("amazon".into()),
        kinds: vec!["reservation_held".into()],
        ..hook("http://127.0.0.1:9/q")
    };
    let e = hub(&dir, vec![bad]).await.err().expect("kinds on a quantity hook are refused");
    assert!(e.contains("webhooks[0]") && e.contains("leave kinds out"), "{e}");
    let bad = WebhookConfig { every_secs: Some(5), ..hook("http://127.0.0.1:9/q") };
    let e = hub(&dir, vec![bad]).await.err().expect("every_secs without a channel is refused");
    assert!(e.contains("set channel too"), "{e}");
}
