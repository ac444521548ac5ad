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
