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
    WebhookConfig { url: url.into(), secret: "0123456789abcdef-secret".into(), kinds: vec![] }
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
