//! A hub and store agents as real processes on loopback, for end-to-end tests: set-up through the
//! real CLIs (`init`, `store add`, `token create`, `init --bundle`), then `serve` and `run`.
//!
//! The hub stores in SQLite in its data dir, or, when [`backend::current`] is
//! [`Backend::Postgres`], in a fresh PostgreSQL database: then every hub process the cluster runs
//! gets [`DATABASE_URL_ENV`]. Tests run hub admin verbs through [`Cluster::hub_admin`] and
//! [`Cluster::hub_cli`] so they need not know which.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};
use uuid::Uuid;

use crate::backend::{self, Backend};
use crate::procs::{wait_until, Proc};

/// The hub's database URL variable (its `--database-url`); set for every hub process of a
/// PostgreSQL cluster, never for a SQLite one.
pub const DATABASE_URL_ENV: &str = "SHELFSYNC_HUB_DATABASE_URL";

/// A request rate no test client reaches: these tests poll the hub and drive agents as fast as they
/// can from one token, which is load, not abuse. (Extra `hub_env`/`agent_env` entries come later
/// and win, so a test can put a default limit back.)
const RAISED: &str = "{ per_sec = 1000000, burst = 1000000 }";

/// Raised rate limits for the hub process, every class.
pub const RAISED_HUB_LIMITS: [(&str, &str); 5] = [
    ("SHELFSYNC_HUB__HTTP__RATE_LIMIT__UNAUTHENTICATED", RAISED),
    ("SHELFSYNC_HUB__HTTP__RATE_LIMIT__READS", RAISED),
    ("SHELFSYNC_HUB__HTTP__RATE_LIMIT__WRITES", RAISED),
    ("SHELFSYNC_HUB__HTTP__RATE_LIMIT__ADMIN", RAISED),
    ("SHELFSYNC_HUB__HTTP__RATE_LIMIT__EVENTS", RAISED),
];

/// Raised rate limits for agent processes, every class.
pub const RAISED_AGENT_LIMITS: [(&str, &str); 2] =
    [("SHELFSYNC_AGENT__API__RATE_LIMIT__WRITES", RAISED), ("SHELFSYNC_AGENT__API__RATE_LIMIT__READS", RAISED)];

/// A running hub plus its stores' data dirs and agents.
pub struct Cluster {
    /// Everything lives here.
    pub dir: tempfile::TempDir,
    /// The hub process (None while stopped).
    pub hub: Option<Proc>,
    /// The hub's QUIC address (kept across restarts).
    pub quic_addr: String,
    /// An admin token.
    pub admin_token: String,
    /// Store ids.
    pub stores: Vec<String>,
    /// Running agents by index (None while stopped).
    pub agents: Vec<Option<Proc>>,
    /// Extra environment for agents (e.g. pointing them at a proxy).
    pub agent_env: Vec<(String, String)>,
    /// Extra environment for the hub (config overrides).
    pub hub_env: Vec<(String, String)>,
    /// The hub's data dir (`<dir>/hub`; a test that restores the hub elsewhere points it there).
    pub hub_data_dir: PathBuf,
    /// The hub's PostgreSQL database (from [`crate::pg::fresh_database`]) when the test runs under
    /// [`Backend::Postgres`]; `None` for SQLite.
    pub database_url: Option<String>,
    http: reqwest::Client,
}

impl Cluster {
    /// Initialises a hub, registers `n` stores (`store-0`, ...), starts the hub and the agents.
    pub async fn start(n: usize) -> Cluster {
        Self::start_with(n, Vec::new()).await
    }

    /// As [`Cluster::start`], with extra agent environment.
    pub async fn start_with(n: usize, agent_env: Vec<(String, String)>) -> Cluster {
        Self::start_full(n, agent_env, Vec::new()).await
    }

    /// As [`Cluster::start`], with extra agent and hub environment.
    pub async fn start_full(n: usize, agent_env: Vec<(String, String)>, hub_env: Vec<(String, String)>) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let hub_dir = dir.path().join("hub");
        let database_url = match backend::current() {
            Backend::Sqlite => None,
            Backend::Postgres => Some(crate::pg::fresh_database().await),
        };
        let mut c = Cluster {
            dir,
            hub: None,
            quic_addr: "127.0.0.1:0".into(),
            admin_token: String::new(),
            stores: (0..n).map(|i| format!("store-{i}")).collect(),
            agents: (0..n).map(|_| None).collect(),
            agent_env,
            hub_env,
            hub_data_dir: hub_dir,
            database_url,
            http: reqwest::Client::new(),
        };
        c.hub_admin(&["init"]).await;
        c.admin_token = c.hub_admin(&["token", "create", "--role", "admin"]).await.trim().to_owned();
        c.start_hub().await;
        for i in 0..n {
            let bundle = c.dir.path().join(format!("bundle-{i}"));
            let store = c.stores[i].clone();
            c.hub_admin(&["store", "add", &store, "--out", bundle.to_str().unwrap(), "--hub-addr", &c.quic_addr]).await;
            let ad = c.agent_dir(i);
            Proc::run_ok(
                "shelfsync-agent",
                &["init", "--bundle", bundle.to_str().unwrap(), "--data-dir", ad.to_str().unwrap()],
            )
            .await;
            c.start_agent(i).await;
        }
        c.assert_hub_stores_in_its_database().await;
        c
    }

    /// Under PostgreSQL, panics unless the hub created tables in its database: a hub that ignores
    /// [`DATABASE_URL_ENV`] would run the `_postgres` variant on SQLite and pass it for nothing.
    async fn assert_hub_stores_in_its_database(&self) {
        let Some(url) = &self.database_url else { return };
        let db = crate::pg::connect(url).await;
        let tables: i64 = db
            .query_one(
                "SELECT count(*) FROM pg_catalog.pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema')",
                &[],
            )
            .await
            .unwrap_or_else(|e| panic!("counting the tables of {url}: {e:?}"))
            .get(0);
        assert!(
            tables > 0,
            "the hub was given {DATABASE_URL_ENV}={url} but created no table there after init, token create, serve \
             and store add: this shelfsync-hub does not store in PostgreSQL"
        );
    }

    /// A second agent of store `i` on a copy of its files (`cp -a` of the data dir; the agent
    /// should be stopped, as an operator copies a stopped machine's disk). Returns its index; it
    /// is not started.
    pub fn add_copy(&mut self, i: usize) -> usize {
        let k = self.agents.len();
        copy_dir(&self.agent_dir(i), &self.agent_dir(k));
        self.stores.push(self.stores[i].clone());
        self.agents.push(None);
        k
    }

    /// A second agent of store `i`, initialised from its bundle into a fresh data dir (another
    /// writer of the same store). Returns its index; it is not started.
    pub async fn add_agent_of(&mut self, i: usize) -> usize {
        let k = self.agents.len();
        let bundle = self.dir.path().join(format!("bundle-{i}"));
        let ad = self.agent_dir(k);
        Proc::run_ok(
            "shelfsync-agent",
            &["init", "--bundle", bundle.to_str().unwrap(), "--data-dir", ad.to_str().unwrap()],
        )
        .await;
        self.stores.push(self.stores[i].clone());
        self.agents.push(None);
        k
    }

    /// The hub's data dir.
    pub fn hub_dir(&self) -> PathBuf {
        self.hub_data_dir.clone()
    }

    /// A store's data dir.
    pub fn agent_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("agent-{i}"))
    }

    /// The environment every `shelfsync-hub` process of this cluster gets from its backend:
    /// [`DATABASE_URL_ENV`] for PostgreSQL, nothing for SQLite.
    pub fn hub_backend_env(&self) -> Vec<(&str, &str)> {
        self.database_url.iter().map(|url| (DATABASE_URL_ENV, url.as_str())).collect()
    }

    /// Runs a hub admin verb on this cluster's hub storage: `shelfsync-hub <args> --data-dir
    /// <hub dir>` with [`Cluster::hub_backend_env`]; its stdout. Panics with stderr if it fails.
    pub async fn hub_admin(&self, args: &[&str]) -> String {
        let args = self.with_data_dir(args);
        Proc::run_ok_env("shelfsync-hub", &args, &self.hub_backend_env()).await
    }

    /// As [`Cluster::hub_admin`], for a verb expected to fail: its status and output, unchecked.
    pub async fn hub_admin_output(&self, args: &[&str]) -> std::process::Output {
        let args = self.with_data_dir(args);
        Proc::output_env("shelfsync-hub", &args, &self.hub_backend_env()).await
    }

    /// Runs `shelfsync-hub <args>` as given (e.g. a verb that talks to the running hub with
    /// `--url`), with [`Cluster::hub_backend_env`]; its stdout. Panics with stderr if it fails.
    pub async fn hub_cli(&self, args: &[&str]) -> String {
        Proc::run_ok_env("shelfsync-hub", args, &self.hub_backend_env()).await
    }

    /// `args` followed by `--data-dir <hub dir>`.
    fn with_data_dir<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        let hd = self.hub_data_dir.to_str().expect("a UTF-8 hub data dir");
        args.iter().copied().chain(["--data-dir", hd]).collect()
    }

    /// Runs one SQL statement on the hub's database behind its back (the hub should be stopped),
    /// whichever the backend: `hub.db` in the data dir for SQLite, [`Cluster::database_url`] for
    /// PostgreSQL. Returns the number of rows it changed. Keep the SQL portable (both dialects).
    pub async fn hub_sql(&self, sql: &str) -> u64 {
        match &self.database_url {
            None => {
                let db = rusqlite::Connection::open(self.hub_dir().join("hub.db")).expect("open hub.db");
                db.execute(sql, []).unwrap_or_else(|e| panic!("{sql} on hub.db: {e}")) as u64
            }
            Some(url) => {
                let db = crate::pg::connect(url).await;
                db.execute(sql, &[]).await.unwrap_or_else(|e| panic!("{sql} on {url}: {e:?}"))
            }
        }
    }

    /// Starts (or restarts) the hub on the same QUIC address.
    pub async fn start_hub(&mut self) {
        assert!(self.hub.is_none(), "hub already running");
        let hd = self.hub_dir();
        let hub = Proc::start(
            "shelfsync-hub",
            &[
                "serve",
                "--data-dir",
                hd.to_str().unwrap(),
                "--quic-listen",
                &self.quic_addr,
                "--http-listen",
                "127.0.0.1:0",
            ],
            &[("SHELFSYNC_HUB__SYNC__REVOCATION_CHECK_SECS", "1")]
                .into_iter()
                .chain(RAISED_HUB_LIMITS.iter().copied())
                .chain(self.hub_backend_env())
                .chain(self.hub_env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .collect::<Vec<_>>(),
        )
        .await;
        if self.quic_addr.ends_with(":0") {
            self.quic_addr = hub.extra_line("quic on ").expect("hub announces its QUIC address");
        }
        self.hub = Some(hub);
    }

    /// Stops the hub cleanly.
    pub async fn stop_hub(&mut self) {
        self.hub.take().expect("hub running").stop().await;
    }

    /// Starts a store's agent.
    pub async fn start_agent(&mut self, i: usize) {
        assert!(self.agents[i].is_none());
        let ad = self.agent_dir(i);
        let mut env: Vec<(&str, &str)> =
            vec![("SHELFSYNC_AGENT__SYNC__BACKOFF_MS_MAX", "500"), ("SHELFSYNC_AGENT__SYNC__BACKOFF_MS_MIN", "50")];
        // Refused agents retry every minute in production; tests watch them retry.
        env.push(("SHELFSYNC_AGENT__SYNC__REFUSED_RETRY_MS", "500"));
        env.extend(RAISED_AGENT_LIMITS.iter().copied());
        env.extend(self.agent_env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let p = Proc::start(
            "shelfsync-agent",
            &["run", "--data-dir", ad.to_str().unwrap(), "--listen", "127.0.0.1:0"],
            &env,
        )
        .await;
        self.agents[i] = Some(p);
    }

    /// Stops a store's agent cleanly (SIGTERM).
    pub async fn stop_agent(&mut self, i: usize) {
        self.agents[i].take().expect("agent running").stop().await;
    }

    /// `kill -9` a store's agent.
    pub async fn kill_agent(&mut self, i: usize) {
        self.agents[i].take().expect("agent running").kill9().await;
    }

    /// The hub's API URL.
    pub fn hub_url(&self) -> String {
        self.hub.as_ref().expect("hub running").url.clone()
    }

    /// A store agent's API URL.
    pub fn agent_url(&self, i: usize) -> String {
        self.agents[i].as_ref().expect("agent running").url.clone()
    }

    /// GET on the hub with the admin token.
    pub async fn hub_get(&self, path: &str) -> Value {
        let r = self.http.get(format!("{}{path}", self.hub_url())).bearer_auth(&self.admin_token).send().await.unwrap();
        assert!(r.status().is_success(), "GET {path}: {}", r.status());
        r.json().await.unwrap()
    }

    /// A call on the hub with the admin token; returns status and body.
    pub async fn hub_call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.hub_url())).bearer_auth(&self.admin_token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    /// POST on the hub with the admin token; returns status and body.
    pub async fn hub_post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.hub_url()))
            .bearer_auth(&self.admin_token)
            .json(&body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    /// A sale of `qty` × `sku` at store `i`; returns the HTTP status.
    pub async fn sell(&self, i: usize, sku: &str, qty: u64) -> u16 {
        let body = json!({"id": Uuid::now_v7(), "lines": [{"sku": sku, "qty": qty}]});
        let r = self.http.post(format!("{}/v1/sales", self.agent_url(i))).json(&body).send().await.unwrap();
        r.status().as_u16()
    }

    /// A physical count of `sku` at store `i`; returns the HTTP status.
    pub async fn count(&self, i: usize, sku: &str, counted: i64) -> u16 {
        let body = json!({"id": Uuid::now_v7(), "sku": sku, "counted": counted});
        let r = self.http.post(format!("{}/v1/counts", self.agent_url(i))).json(&body).send().await.unwrap();
        r.status().as_u16()
    }

    /// Conflicts the hub records for store `i` (any status).
    pub async fn conflicts(&self, i: usize) -> Vec<Value> {
        let v = self.hub_get(&format!("/v1/conflicts?store={}", self.stores[i])).await;
        v["items"].as_array().cloned().unwrap_or_default()
    }

    /// A restock at the hub.
    pub async fn restock(&self, i: usize, sku: &str, qty: u64) {
        let (s, v) = self
            .hub_post(
                "/v1/restocks",
                json!({"id": Uuid::now_v7(), "store": self.stores[i], "lines": [{"sku": sku, "qty": qty}]}),
            )
            .await;
        assert_eq!(s, 201, "{v}");
    }

    /// `on_hand` of a SKU at a store's agent (0 if never seen).
    pub async fn agent_on_hand(&self, i: usize, sku: &str) -> i64 {
        let r = self.http.get(format!("{}/v1/stock/{sku}", self.agent_url(i))).send().await.unwrap();
        if r.status() == 404 {
            return 0;
        }
        r.json::<Value>().await.unwrap()["on_hand"].as_i64().unwrap()
    }

    /// `on_hand` of a SKU per store as the hub sees it.
    pub async fn hub_on_hand(&self, sku: &str) -> BTreeMap<String, i64> {
        // The batch form: a SKU no store has yet is `known: false` there, where alone it is a 404.
        let v = self.hub_get(&format!("/v1/availability?sku={sku}")).await;
        v["items"][0]["stores"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| (s["store"].as_str().unwrap().to_owned(), s["on_hand"].as_i64().unwrap()))
            .collect()
    }

    /// Sells `n` single units of `sku` at agent `i`, each acknowledged.
    pub async fn sell_n(&self, i: usize, sku: &str, n: usize) {
        for _ in 0..n {
            assert_eq!(self.sell(i, sku, 1).await, 201, "every sale is acknowledged");
        }
    }

    /// Waits (at most `deadline`) until the hub shows `want` of `sku` at store `i` and agent `i`
    /// agrees.
    pub async fn settled(&self, i: usize, sku: &str, want: i64, deadline: Duration) {
        wait_until(&format!("{} to show {want} of {sku} at hub and store", self.stores[i]), deadline, || async {
            let at_hub = self.hub_on_hand(sku).await.get(&self.stores[i]).copied().unwrap_or(0);
            let at_agent = self.agent_on_hand(i, sku).await;
            (at_hub == want && at_agent == want).then_some(())
        })
        .await;
    }

    /// One of the hub's Prometheus metrics (`shelfsync_hub_<name>`).
    pub async fn metric(&self, name: &str) -> u64 {
        let text = self.hub_metrics().await;
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("shelfsync_hub_{name} ")))
            .unwrap_or_else(|| panic!("metric {name} missing from {text}"))
            .parse()
            .unwrap()
    }

    /// The hub's `/metrics` text (as the admin).
    pub async fn hub_metrics(&self) -> String {
        let r =
            self.http.get(format!("{}/metrics", self.hub_url())).bearer_auth(&self.admin_token).send().await.unwrap();
        r.text().await.unwrap()
    }

    /// An agent's `/v1/status`.
    pub async fn agent_status(&self, i: usize) -> Value {
        self.http.get(format!("{}/v1/status", self.agent_url(i))).send().await.unwrap().json().await.unwrap()
    }

    /// Waits until the hub's view of `skus` at store `i` equals that agent's.
    pub async fn converged_store(&self, i: usize, skus: &[&str], deadline: Duration) {
        wait_until("hub and agent to agree", deadline, || async {
            for sku in skus {
                let at_hub = self.hub_on_hand(sku).await.get(&self.stores[i]).copied().unwrap_or(0);
                if self.agent_on_hand(i, sku).await != at_hub {
                    return None;
                }
            }
            Some(())
        })
        .await
    }

    /// Waits until the hub's view of `skus` equals every running agent's, and returns it.
    pub async fn converged(&self, skus: &[&str], deadline: Duration) -> BTreeMap<(String, String), i64> {
        wait_until("hub and agents to agree", deadline, || async {
            let mut all = BTreeMap::new();
            for sku in skus {
                let hub = self.hub_on_hand(sku).await;
                for (i, store) in self.stores.iter().enumerate() {
                    if self.agents[i].is_none() {
                        continue;
                    }
                    let at_agent = self.agent_on_hand(i, sku).await;
                    let at_hub = hub.get(store).copied().unwrap_or(0);
                    if at_agent != at_hub {
                        return None;
                    }
                    all.insert((store.clone(), sku.to_string()), at_hub);
                }
            }
            Some(all)
        })
        .await
    }
}

/// Copies a directory tree (files and subdirectories), like `cp -a` for what the tests need.
pub fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("create the copy");
    for entry in std::fs::read_dir(from).expect("read the data dir") {
        let entry = entry.expect("dir entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy a file");
        }
    }
}

/// Replaces the contents of `dir` by those of `with` (a data dir put back from a copy).
pub fn replace_dir(dir: &std::path::Path, with: &std::path::Path) {
    std::fs::remove_dir_all(dir).expect("remove the data dir");
    copy_dir(with, dir);
}
