//! An in-process hub with two registered stores and a token per role, for the API tests.
#![allow(dead_code)] // each test binary uses its own subset

use shelfsync_hub::admin;
use shelfsync_hub::config::HubConfig;
use shelfsync_hub::server::{start, RunningHub};
use shelfsync_hub::storage::Role;

pub struct H {
    pub hub: RunningHub,
    pub admin: String,
    pub viewer: String,
    pub storefront: String,
    pub http: reqwest::Client,
    pub dir: tempfile::TempDir,
}

/// A hub in a temp dir on 127.0.0.1:0 with `store-a` and `store-b`; `tune` adjusts the config.
pub async fn hub_with(tune: impl FnOnce(&mut HubConfig)) -> H {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("hub");
    admin::init(&d).await.unwrap();
    for s in ["store-a", "store-b"] {
        admin::add_store(&d, &s.parse().unwrap(), &dir.path().join(s), "127.0.0.1:7443").await.unwrap();
    }
    let admin_token = admin::create_token(&d, Role::Admin).await.unwrap();
    let viewer = admin::create_token(&d, Role::Viewer).await.unwrap();
    let storefront = admin::create_token(&d, Role::Storefront).await.unwrap();
    let mut cfg = HubConfig::default();
    cfg.data_dir = d;
    cfg.quic.listen = "127.0.0.1:0".parse().unwrap();
    cfg.http.listen = "127.0.0.1:0".parse().unwrap();
    tune(&mut cfg);
    let hub = start(cfg).await.unwrap();
    H { hub, admin: admin_token, viewer, storefront, http: reqwest::Client::new(), dir }
}

impl H {
    /// Stops the hub and starts it again on the same data dir (new ports): what it answers
    /// afterwards comes from storage.
    pub async fn restart(self, tune: impl FnOnce(&mut HubConfig)) -> H {
        let H { hub, admin, viewer, storefront, http, dir } = self;
        hub.stop().await;
        let mut cfg = HubConfig { data_dir: dir.path().join("hub"), ..Default::default() };
        cfg.quic.listen = "127.0.0.1:0".parse().unwrap();
        cfg.http.listen = "127.0.0.1:0".parse().unwrap();
        tune(&mut cfg);
        let hub = start(cfg).await.unwrap();
        H { hub, admin, viewer, storefront, http, dir }
    }
}

impl H {
    /// One HTTP call on the hub: `token` as bearer, `body` as JSON, `key` as `Idempotency-Key`.
    /// Answers the status and the body (JSON, or the text as a JSON string).
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<serde_json::Value>,
        key: Option<&str>,
    ) -> (reqwest::StatusCode, serde_json::Value) {
        let method: reqwest::Method = method.parse().expect("an HTTP method");
        let mut req = self.http.request(method, format!("{}{path}", self.hub.url()));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        if let Some(k) = key {
            req = req.header("Idempotency-Key", k);
        }
        let r = req.send().await.unwrap();
        let status = r.status();
        let text = r.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
    }
}
