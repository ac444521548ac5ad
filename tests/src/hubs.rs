//! Several hub processes on one PostgreSQL database (from [`crate::pg`]) with store agents whose
//! bundles name every hub, all real processes on loopback: for the failover tests.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};

use crate::cluster::{copy_dir, RAISED_AGENT_LIMITS, RAISED_HUB_LIMITS};
use crate::procs::{wait_until, Proc};

/// Hubs sharing a database, and agents.
pub struct HubSet {
    /// Everything lives here.
    pub dir: tempfile::TempDir,
    /// The shared database.
    pub database_url: String,
    /// Hub processes by index (None once killed or stopped).
    pub hubs: Vec<Option<Proc>>,
    /// Each hub's QUIC address (fixed: the bundles name them).
    pub quic: Vec<String>,
    /// Each hub's HTTP base URL (from its last start).
    pub http: Vec<String>,
    /// An admin token.
    pub admin: String,
    /// A storefront token.
    pub storefront: String,
    /// Store ids.
    pub stores: Vec<String>,
    /// Agents by store index.
    pub agents: Vec<Option<Proc>>,
    /// More environment for the hubs started from now on (configuration overrides).
    pub hub_env: Vec<(String, String)>,
    client: reqwest::Client,
    db: tokio_postgres::Client,
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").expect("bind udp").local_addr().expect("local addr").port()
}

impl HubSet {
    /// `n_hubs` hubs (one data dir each, copies of the first: same CA, same database) and
    /// `n_stores` stores whose bundles name every hub, starting at a different one per store.
    pub async fn start(n_hubs: usize, n_stores: usize) -> HubSet {
        Self::start_with(n_hubs, n_stores, 1, Vec::new()).await
    }

    /// [`HubSet::start`] on a database of `partitions` partitions, the hubs started with `env`
    /// too. With several partitions the stores are registered but no agent runs (a hub on a
    /// partitioned database does not serve agents yet).
    pub async fn start_with(n_hubs: usize, n_stores: usize, partitions: u16, env: Vec<(String, String)>) -> HubSet {
        let dir = tempfile::tempdir().expect("tempdir");
        let database_url = crate::pg::fresh_database().await;
        let hub0 = dir.path().join("hub-0");
        let h0 = hub0.to_str().unwrap();
        let count = partitions.to_string();
        Proc::run_ok(
            "shelfsync-hub",
            &["init", "--data-dir", h0, "--database-url", &database_url, "--partitions", &count],
        )
        .await;
        for i in 1..n_hubs {
            copy_dir(&hub0, &dir.path().join(format!("hub-{i}")));
        }
        let token = |role: &'static str| {
            let h0 = h0.to_owned();
            async move {
                Proc::run_ok("shelfsync-hub", &["token", "create", "--role", role, "--data-dir", &h0])
                    .await
                    .trim()
                    .to_owned()
            }
        };
        let (admin, storefront) = (token("admin").await, token("storefront").await);
        let quic: Vec<String> = (0..n_hubs).map(|_| format!("127.0.0.1:{}", free_udp_port())).collect();
        let db = crate::pg::connect(&database_url).await;
        let mut set = HubSet {
            dir,
            database_url,
            hubs: (0..n_hubs).map(|_| None).collect(),
            quic,
            http: vec![String::new(); n_hubs],
            admin,
            storefront,
            stores: (0..n_stores).map(|i| format!("store-{i}")).collect(),
            agents: (0..n_stores).map(|_| None).collect(),
            hub_env: env,
            client: reqwest::Client::builder().timeout(Duration::from_secs(20)).build().unwrap(),
            db,
        };
        for i in 0..n_hubs {
            set.start_hub(i).await;
        }
        for s in 0..n_stores {
            let order: Vec<String> = (0..n_hubs).map(|k| set.quic[(s + k) % n_hubs].clone()).collect();
            let bundle = set.dir.path().join(format!("bundle-{s}"));
            Proc::run_ok(
                "shelfsync-hub",
                &[
                    "store",
                    "add",
                    &set.stores[s],
                    "--out",
                    bundle.to_str().unwrap(),
                    "--hub-addr",
                    &order.join(","),
                    "--data-dir",
                    h0,
                ],
            )
            .await;
            let ad = set.agent_dir(s);
            Proc::run_ok(
                "shelfsync-agent",
                &["init", "--bundle", bundle.to_str().unwrap(), "--data-dir", ad.to_str().unwrap()],
            )
            .await;
            let agent = Proc::start(
                "shelfsync-agent",
                &["run", "--data-dir", ad.to_str().unwrap(), "--listen", "127.0.0.1:0"],
                &RAISED_AGENT_LIMITS,
            )
            .await;
            set.agents[s] = Some(agent);
        }
        set
    }

    /// A store's agent data dir.
    pub fn agent_dir(&self, s: usize) -> PathBuf {
        self.dir.path().join(format!("agent-{s}"))
    }

    /// Starts hub `i` on its QUIC address.
    pub async fn start_hub(&mut self, i: usize) {
        let d = self.dir.path().join(format!("hub-{i}"));
        let hub = Proc::start(
            "shelfsync-hub",
            &[
                "serve",
                "--data-dir",
                d.to_str().unwrap(),
                "--quic-listen",
                &self.quic[i],
                "--http-listen",
                "127.0.0.1:0",
            ],
            &[("SHELFSYNC_HUB__SYNC__REVOCATION_CHECK_SECS", "1")]
                .into_iter()
                .chain(RAISED_HUB_LIMITS.iter().copied())
                .chain(self.hub_env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .collect::<Vec<_>>(),
        )
        .await;
        self.http[i] = hub.url.clone();
        self.hubs[i] = Some(hub);
    }

    /// The lease as the database holds it: (owner's HTTP URL, epoch, seconds until it expires,
    /// by the database's clock).
    pub async fn lease(&self) -> (Option<String>, i64, f64) {
        let r = self
            .db
            .query_one(
                "SELECT h.http_addr, l.epoch, EXTRACT(EPOCH FROM (l.expires_at - now()))::float8
                 FROM leases l LEFT JOIN hubs h ON h.id = l.owner WHERE l.partition = 0",
                &[],
            )
            .await
            .expect("reading the lease");
        (r.get::<_, Option<String>>(0).map(|a| format!("http://{a}")), r.get(1), r.get(2))
    }

    /// Seconds between the expiry of epoch `old`'s lease, as last renewed, and the takeover that
    /// ended it (database clock). Call once the takeover happened; `old_expiry` was read after
    /// the old owner stopped renewing.
    pub async fn takeover_gap(&self, old_expiry_in: f64, read_at: std::time::Instant) -> f64 {
        let r = self
            .db
            .query_one("SELECT EXTRACT(EPOCH FROM (now() - taken_at))::float8 FROM leases WHERE partition = 0", &[])
            .await
            .expect("reading the lease");
        let taken_ago: f64 = r.get(0);
        let since_read = read_at.elapsed().as_secs_f64();
        // The old lease expired `old_expiry_in` after the read; the new one was taken
        // `since_read - taken_ago` after it.
        (since_read - taken_ago) - old_expiry_in
    }

    /// Index of the active hub (the lease's owner), waiting until there is one.
    pub async fn active(&self) -> usize {
        wait_until("a hub to hold the lease", Duration::from_secs(30), || async {
            let (owner, _, left) = self.lease().await;
            let owner = owner.filter(|_| left > 0.0)?;
            self.http.iter().position(|h| *h == owner)
        })
        .await
    }

    /// The first column of the first row of `sql` with one integer argument, if any.
    pub async fn db_query_opt_string(&self, sql: &str, arg: i32) -> Option<String> {
        self.db.query_opt(sql, &[&arg]).await.unwrap_or_else(|e| panic!("{sql}: {e}")).map(|r| r.get(0))
    }

    /// Runs one statement on the shared database.
    pub async fn sql_i64(&self, sql: &str) -> i64 {
        self.db.query_one(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}")).get(0)
    }

    /// A request to hub `i`: (status, body), or None if it did not answer.
    pub async fn call(
        &self,
        i: usize,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> Option<(u16, Value)> {
        let mut r = self.client.request(method, format!("{}{path}", self.http[i])).bearer_auth(token);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.ok()?;
        let status = resp.status().as_u16();
        Some((status, resp.json().await.unwrap_or(Value::Null)))
    }

    /// A store's agent API URL.
    pub fn agent_url(&self, s: usize) -> String {
        self.agents[s].as_ref().expect("agent running").url.clone()
    }

    /// Sells `qty` of `sku` at store `s` (through its agent); the status.
    pub async fn sell(&self, s: usize, sku: &str, qty: u64) -> u16 {
        let body = json!({"id": uuid::Uuid::now_v7(), "lines": [{"sku": sku, "qty": qty}]});
        let r = self.client.post(format!("{}/v1/sales", self.agent_url(s))).json(&body).send().await.unwrap();
        r.status().as_u16()
    }

    /// A store agent's own `on_hand` of `sku`.
    pub async fn agent_on_hand(&self, s: usize, sku: &str) -> i64 {
        self.agent_stock(s, sku).await["on_hand"].as_i64().unwrap_or(i64::MIN)
    }

    /// A store agent's figures of `sku` (`on_hand`, `held`, `sellable`).
    pub async fn agent_stock(&self, s: usize, sku: &str) -> Value {
        let r = self.client.get(format!("{}/v1/stock/{sku}", self.agent_url(s))).send().await.unwrap();
        r.json::<Value>().await.unwrap()
    }

    /// Kills every process (the test is over).
    pub async fn shutdown(mut self) {
        for a in self.agents.iter_mut().filter_map(Option::take) {
            a.kill9().await;
        }
        for h in self.hubs.iter_mut().filter_map(Option::take) {
            h.kill9().await;
        }
    }
}

/// The first SKU (`SKU-000`, `SKU-001`, ...) of each of `count` partitions, by partition.
pub fn one_sku_per_partition(count: u16) -> Vec<String> {
    let parts = shelfsync_hub_core::Partitions::new(count).expect("a partition count");
    (0..count)
        .map(|p| (0..).map(|i| format!("SKU-{i:03}")).find(|s| parts.of(&s.parse().unwrap()) == p).unwrap())
        .collect()
}
