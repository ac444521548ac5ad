//! A marketplace connector end to end (`hub/docs/channels.md`, step 4): the hub's quantity
//! hook feeds a fake marketplace whose listing shows what it is told only after a lag, whose
//! customers buy against that listing, and whose orders the hub cannot refuse (a lagged
//! channel). A flash sale on the web channel takes the same SKU meanwhile.
//!
//! Without a buffer the marketplace sells units the web already promised: the hub records
//! every unit its stores did not have as short, each with a `channel_oversell` conflict, and
//! never cuts a web promise for it. With a buffer as large as the flash sale, nothing is
//! promised twice.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use shelfsync_hub::admin;
use shelfsync_hub::config::HubConfig;
use shelfsync_hub::feed::WebhookConfig;
use shelfsync_hub::server::start;
use shelfsync_hub::storage::Role;
use shelfsync_tests::marketplace::{Marketplace, Sold};
use shelfsync_tests::procs::wait_until;
use uuid::Uuid;

const SECRET: &str = "marketplace-hook-secret";
const DEADLINE: Duration = Duration::from_secs(30);
/// Units in stock at the start of each sale.
const STOCK: u64 = 20;
/// Units the web's flash sale takes.
const FLASH: u64 = 15;
/// Units the marketplace's customers try to buy while its listing is stale.
const MARKET: u64 = 10;

struct Chain {
    url: String,
    admin: String,
    web: String,
    amazon: String,
    http: reqwest::Client,
}

impl Chain {
    async fn call(&self, token: &str, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut r = self.http.request(method, format!("{}{path}", self.url)).bearer_auth(token);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let r = r.send().await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    async fn restock(&self, sku: &str, qty: u64) {
        let body = json!({"id": Uuid::now_v7(), "store": "store-0", "lines": [{"sku": sku, "qty": qty}]});
        let (s, v) = self.call(&self.admin, Method::POST, "/v1/restocks", Some(body)).await;
        assert_eq!(s, 201, "{v}");
    }

    /// The flash sale: `FLASH` web customers buy one each; every one is promised in full.
    async fn flash_sale(&self, sku: &str) {
        for _ in 0..FLASH {
            let body = json!({"id": Uuid::now_v7(), "lines": [{"sku": sku, "qty": 1}]});
            let (s, v) = self.call(&self.web, Method::POST, "/v1/reservations", Some(body)).await;
            assert_eq!((s, v["short"].as_bool()), (201, Some(false)), "{v}");
        }
    }

    /// What the hub has promised of `sku` (open allocations, not short), what it recorded
    /// short, by channel: (promised, short) for web and for amazon.
    async fn promised(&self, sku: &str) -> [(u64, u64); 2] {
        let (s, v) = self.call(&self.admin, Method::GET, "/v1/reservations?limit=1000", None).await;
        assert_eq!(s, 200, "{v}");
        let mut out = [(0, 0); 2];
        for r in v["items"].as_array().unwrap() {
            let i = if r["channel"] == "amazon" { 1 } else { 0 };
            for l in r["lines"].as_array().unwrap().iter().filter(|l| l["sku"] == sku) {
                out[i].1 += l["short"].as_u64().unwrap();
                out[i].0 += l["qty"].as_u64().unwrap() - l["short"].as_u64().unwrap();
            }
        }
        out
    }

    /// Open `channel_oversell` conflicts of `sku`: their total shortfall.
    async fn oversold(&self, sku: &str) -> (usize, u64) {
        let (_, v) = self.call(&self.admin, Method::GET, &format!("/v1/conflicts?status=open&sku={sku}"), None).await;
        let mine: Vec<&Value> =
            v["items"].as_array().unwrap().iter().filter(|c| c["kind"] == "channel_oversell").collect();
        assert!(mine.iter().all(|c| c["details"]["channel"] == "amazon"), "{v}");
        (mine.len(), mine.iter().map(|c| c["shortfall"].as_u64().unwrap()).sum())
    }
}

/// One sale: the listing shows `listed` (lag 0), then freezes (a long lag) while the web sells
/// its flash sale and the marketplace's customers buy against the stale listing. Returns
/// (orders the marketplace took, units it took).
async fn sale(c: &Chain, m: &Marketplace, sku: &str, listed: u64) -> (usize, u64) {
    m.set_lag(Duration::ZERO);
    c.restock(sku, STOCK).await;
    wait_until("the marketplace to list the stock", DEADLINE, || async { (m.shown(sku) == listed).then_some(()) })
        .await;
    m.set_lag(Duration::from_secs(3600));
    c.flash_sale(sku).await;
    let (mut orders, mut units) = (0, 0);
    for _ in 0..MARKET {
        match m.order(&c.url, &c.amazon, sku, 1).await {
            Sold::Recorded(r) => {
                assert_eq!(r["channel"], "amazon", "{r}");
                orders += 1;
                units += 1;
            }
            Sold::NotListed { shown } => assert_eq!(shown, 0),
        }
    }
    (orders, units)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lagged_marketplace_and_a_web_flash_sale_never_promise_a_unit_twice_unrecorded() {
    let m = Marketplace::start(SECRET, Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("hub");
    admin::init(&d).await.unwrap();
    admin::add_store(&d, &"store-0".parse().unwrap(), &dir.path().join("bundle"), "127.0.0.1:7443").await.unwrap();
    let hook = WebhookConfig {
        url: m.url.clone(),
        secret: SECRET.into(),
        channel: Some("amazon".into()),
        every_secs: Some(1),
        ..Default::default()
    };
    let mut cfg = HubConfig { data_dir: d.clone(), webhooks: vec![hook], ..HubConfig::default() };
    cfg.quic.listen = "127.0.0.1:0".parse().unwrap();
    cfg.http.listen = "127.0.0.1:0".parse().unwrap();
    let h = start(cfg).await.unwrap();
    let admin_token = admin::create_token(&d, Role::Admin).await.unwrap();
    let web = admin::create_token(&d, Role::Storefront).await.unwrap();
    let mut c = Chain { url: h.url(), admin: admin_token, web, amazon: String::new(), http: reqwest::Client::new() };
    let channel = json!({"fulfil": {"stores": ["store-0"]}, "latency": {"lagged": {"lag_secs": 600}}});
    let (s, v) = c.call(&c.admin, Method::PUT, "/v1/channels/amazon", Some(channel)).await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = c
        .call(
            &c.admin,
            Method::POST,
            "/v1/tokens",
            Some(json!({"role": "storefront", "channel": "amazon", "name": "amazon connector"})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    c.amazon = v["token"].as_str().unwrap().to_owned();

    // Bare: the marketplace lists everything and sells 10 after the web took 15 of 20.
    let (orders, units) = sale(&c, &m, "BARE", STOCK).await;
    assert_eq!((orders, units), (MARKET as usize, MARKET), "the stale listing showed 20");
    let [web, market] = c.promised("BARE").await;
    assert_eq!(web, (FLASH, 0), "no web promise is cut for the marketplace");
    assert_eq!(market, (STOCK - FLASH, MARKET - (STOCK - FLASH)), "what was left, and the rest short");
    assert!(web.0 + market.0 <= STOCK, "no unit promised twice");
    assert_eq!(
        c.oversold("BARE").await,
        ((MARKET - (STOCK - FLASH)) as usize, MARKET - (STOCK - FLASH)),
        "every oversold unit is a conflict"
    );
    let (_, v) = c.call(&c.amazon, Method::GET, "/v1/availability/BARE", None).await;
    assert_eq!(v["available"], 0, "{v}");

    // Protected: a buffer as large as the flash sale; the listing shows only the rest.
    let channel = json!({"fulfil": {"stores": ["store-0"]}, "buffer": {"units": FLASH}, "latency": {"lagged": {"lag_secs": 600}}});
    let (s, v) = c.call(&c.admin, Method::PUT, "/v1/channels/amazon", Some(channel)).await;
    assert_eq!(s, 200, "{v}");
    let (orders, units) = sale(&c, &m, "BUFFERED", STOCK - FLASH).await;
    assert_eq!(
        (orders, units),
        ((STOCK - FLASH) as usize, STOCK - FLASH),
        "the listing's 5, the other customers refused there"
    );
    let [web, market] = c.promised("BUFFERED").await;
    assert_eq!((web, market), ((FLASH, 0), (STOCK - FLASH, 0)));
    assert_eq!(c.oversold("BUFFERED").await, (0, 0), "nothing promised twice");
    assert!(m.received() >= 2, "the hook told the marketplace each SKU's quantity");

    // Head office sees it per channel in /metrics.
    let text =
        c.http.get(format!("{}/metrics", c.url)).bearer_auth(&c.admin).send().await.unwrap().text().await.unwrap();
    let value = |line: &str| -> f64 {
        let l = text.lines().find(|l| l.starts_with(line)).unwrap_or_else(|| panic!("{line} missing:\n{text}"));
        l.rsplit(' ').next().unwrap().parse().unwrap()
    };
    let oversold = MARKET - (STOCK - FLASH);
    assert_eq!(value("shelfsync_hub_channel_oversell_units_total{channel=\"amazon\"}"), oversold as f64);
    assert_eq!(value("shelfsync_hub_channel_reservations_total{channel=\"web\"}"), (2 * FLASH) as f64);
    assert_eq!(value("shelfsync_hub_channel_reservations_total{channel=\"amazon\"}"), (MARKET + STOCK - FLASH) as f64);
    assert_eq!(value("shelfsync_hub_conflicts_open{kind=\"channel_oversell\"}"), oversold as f64);
    assert_eq!(value("shelfsync_hub_channel_ats_units{channel=\"amazon\"}"), 0.0, "both SKUs sold out for it");
    // And on the overview (the dashboard's channels table).
    let (_, o) = c.call(&c.admin, Method::GET, "/v1/overview", None).await;
    let per = &o["channels"];
    assert_eq!((per["web"]["held"].as_u64(), per["web"]["units_short"].as_u64()), (Some(2 * FLASH), Some(0)), "{o}");
    assert_eq!(
        (per["amazon"]["units_short"].as_u64(), per["amazon"]["short"].as_u64()),
        (Some(oversold), Some(oversold)),
        "{o}"
    );
    h.stop().await;
}
