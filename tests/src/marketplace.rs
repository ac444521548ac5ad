//! A fake marketplace for the sales-channel tests (`hub/docs/channels.md`): what a connector
//! between the hub and a marketplace such as Amazon does, on loopback.
//!
//! - It takes the hub's "set quantity to N" updates (a `[[webhooks]]` entry with `channel`)
//!   at `POST /quantity`, checks their signature, and shows each on its listing only `lag`
//!   later, as a marketplace that refreshes its listings every few minutes does.
//! - Its customers buy against what the listing shows: an order for more than is listed is
//!   refused there; an order within the listing takes it off the listing and is sent to the
//!   hub with the channel's token, where it cannot be refused any more (a lagged channel).
//!
//! The lag can change while it runs (a test shows the listing first, then freezes it).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use serde_json::{json, Value};
use tokio::task::JoinHandle;

/// What the marketplace holds.
#[derive(Default)]
struct Listing {
    /// Quantity shown per SKU.
    shown: HashMap<String, u64>,
    /// Updates received, not shown yet: (when they show, SKU, quantity).
    pending: Vec<(Instant, String, u64)>,
    /// Updates received so far.
    received: u64,
    /// How late updates show.
    lag: Duration,
}

impl Listing {
    /// Shows the updates whose time came, in the order they arrived.
    fn settle(&mut self, now: Instant) {
        let (due, later): (Vec<_>, Vec<_>) = self.pending.drain(..).partition(|(at, _, _)| *at <= now);
        self.pending = later;
        for (_, sku, q) in due {
            self.shown.insert(sku, q);
        }
    }
}

/// What became of a customer's order.
#[derive(Debug)]
pub enum Sold {
    /// The marketplace took it and the hub recorded it: the reservation's JSON (its lines may
    /// be short: units the chain's stores did not have).
    Recorded(Value),
    /// More than the listing showed: refused on the marketplace (never reached the hub).
    NotListed {
        /// What the listing showed.
        shown: u64,
    },
}

/// The fake marketplace; its server stops when dropped.
pub struct Marketplace {
    /// `http://127.0.0.1:port/quantity`: where the hub's quantity hook posts.
    pub url: String,
    listing: Arc<Mutex<Listing>>,
    http: reqwest::Client,
    task: JoinHandle<()>,
}

impl Drop for Marketplace {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Marketplace {
    /// Starts on 127.0.0.1:0, checking updates against the hook's `secret`, showing them `lag`
    /// late.
    pub async fn start(secret: &str, lag: Duration) -> Marketplace {
        let listing = Arc::new(Mutex::new(Listing { lag, ..Listing::default() }));
        let (l, secret) = (listing.clone(), secret.to_owned());
        let app = axum::Router::new().route(
            "/quantity",
            axum::routing::post(move |headers: HeaderMap, body: Bytes| {
                let (l, secret) = (l.clone(), secret.clone());
                async move {
                    let sig = headers.get("x-shelfsync-signature").and_then(|v| v.to_str().ok()).unwrap_or("");
                    if sig != shelfsync_hub::feed::signature(&secret, &body) {
                        return StatusCode::UNAUTHORIZED;
                    }
                    let Ok(v) = serde_json::from_slice::<Value>(&body) else { return StatusCode::BAD_REQUEST };
                    let (Some(sku), Some(q)) = (v["sku"].as_str(), v["quantity"].as_u64()) else {
                        return StatusCode::BAD_REQUEST;
                    };
                    let mut l = l.lock().unwrap();
                    let at = Instant::now() + l.lag;
                    l.pending.push((at, sku.to_owned(), q));
                    l.received += 1;
                    StatusCode::NO_CONTENT
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/quantity", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Marketplace { url, listing, http: reqwest::Client::new(), task }
    }

    /// From now on, updates received show this late.
    pub fn set_lag(&self, lag: Duration) {
        self.listing.lock().unwrap().lag = lag;
    }

    /// What the listing shows of `sku` now.
    pub fn shown(&self, sku: &str) -> u64 {
        let mut l = self.listing.lock().unwrap();
        l.settle(Instant::now());
        l.shown.get(sku).copied().unwrap_or(0)
    }

    /// Updates received so far.
    pub fn received(&self) -> u64 {
        self.listing.lock().unwrap().received
    }

    /// A customer orders `qty` of `sku`: refused beyond the listing, else taken off it and
    /// sent to the hub at `hub_url` with the channel's `token`.
    pub async fn order(&self, hub_url: &str, token: &str, sku: &str, qty: u64) -> Sold {
        {
            let mut l = self.listing.lock().unwrap();
            l.settle(Instant::now());
            let shown = l.shown.get(sku).copied().unwrap_or(0);
            if shown < qty {
                return Sold::NotListed { shown };
            }
            l.shown.insert(sku.to_owned(), shown - qty);
        }
        let body = json!({"id": uuid::Uuid::now_v7(), "lines": [{"sku": sku, "qty": qty}]});
        let r =
            self.http.post(format!("{hub_url}/v1/reservations")).bearer_auth(token).json(&body).send().await.unwrap();
        let status = r.status();
        let v: Value = r.json().await.unwrap();
        assert_eq!(status, 201, "a lagged channel's order is always recorded: {v}");
        Sold::Recorded(v)
    }
}
