//! `shelfsync-hub demo`: a hub and three stores over real QUIC on loopback, in a temp dir. The
//! stores are real `shelfsync-agent` processes, set up and driven as a user would: `init --bundle`,
//! `run --config`, then their HTTP API. The story, meant to be watched on the dashboard: a catalog
//! with names, opening stock, everyday sales, an online flash sale of rain jackets, a store that
//! goes dark and sells jackets promised online, its return with the oversell found and
//! reconciled, and a check that the hub converged to exactly what the stores recorded; then the
//! stores keep trading until Ctrl-C.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use rand::{RngExt, SeedableRng};
use serde_json::{json, Value};
use shelfsync_node::client::ApiClient;
use shelfsync_shared::StoreId;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use uuid::Uuid;

use crate::config::HubConfig;
use crate::storage::Role;
use crate::{admin, server};

const STORES: [&str; 3] = ["store-001", "store-002", "store-003"];
const SKUS: [&str; 4] = ["HSS-001", "HSS-002", "JKT-010", "MUG-100"];
/// The catalog: SKU, name, low-stock threshold.
const CATALOG: [(&str, &str, u64); 4] = [
    ("HSS-001", "Hiking socks, merino (pair)", 10),
    ("HSS-002", "Hiking socks, cotton (pair)", 10),
    ("JKT-010", "Rain jacket, navy", 3),
    ("MUG-100", "Enamel camp mug", 10),
];
/// The flash-sale SKU.
const JACKET: &str = "JKT-010";
const AGENT: &str = "shelfsync-agent";

/// The agent binary beside this executable; under `cargo run`, built first if missing.
fn agent_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the hub executable")?;
    let dir = exe.parent().context("the hub executable has no directory")?.to_owned();
    let path = dir.join(format!("{AGENT}{}", std::env::consts::EXE_SUFFIX));
    if path.exists() {
        return Ok(path);
    }
    // The directory is cargo's profile directory (target/release, target/debug, ...): build the
    // agent with the same profile so it lands beside us.
    let profile = dir.file_name().and_then(|n| n.to_str()).unwrap_or("debug").to_owned();
    let profile_args: Vec<String> = match profile.as_str() {
        "debug" => vec![],
        "release" => vec!["--release".into()],
        other => vec!["--profile".into(), other.into()],
    };
    let shown = format!("cargo build {}-p {AGENT}", profile_args.iter().map(|a| format!("{a} ")).collect::<String>());
    let Some(cargo) = std::env::var_os("CARGO") else {
        bail!("{} is missing; build it first with `{shown}`", path.display());
    };
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    println!("[demo] {AGENT} is not built yet; building it: {shown}");
    let status = std::process::Command::new(cargo)
        .arg("build")
        .args(&profile_args)
        .args(["-p", AGENT, "--manifest-path"])
        .arg(&manifest)
        .stdout(Stdio::null())
        .status()
        .with_context(|| format!("running `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    if !path.exists() {
        bail!("`{shown}` finished but {} is still missing", path.display());
    }
    Ok(path)
}

/// One store's agent: its data dir and, while it runs, its process.
struct Agent {
    bin: PathBuf,
    dir: PathBuf,
    child: Option<Child>,
    api: Option<ApiClient>,
    /// The POS API port, chosen at the first start and kept, so the store's URL stays the same.
    port: u16,
}

impl Agent {
    /// `shelfsync-agent init --bundle BUNDLE --data-dir DIR`.
    async fn init(bin: &Path, dir: PathBuf, bundle: &Path) -> anyhow::Result<Agent> {
        let out = Command::new(bin)
            .arg("init")
            .arg("--bundle")
            .arg(bundle)
            .arg("--data-dir")
            .arg(&dir)
            .stdin(Stdio::null())
            .output()
            .await
            .with_context(|| format!("running {}", bin.display()))?;
        if !out.status.success() {
            bail!("{AGENT} init failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(Agent { bin: bin.to_owned(), dir, child: None, api: None, port: 0 })
    }

    /// Writes `agent.toml` and runs `shelfsync-agent run --config agent.toml`; waits for its
    /// `listening on URL` line. Logs go to `agent.log` in the data dir.
    async fn start(&mut self, sync: bool) -> anyhow::Result<()> {
        let config = self.dir.join("agent.toml");
        let text = toml::to_string(&json!({
            "data_dir": self.dir,
            "api": {"listen": format!("127.0.0.1:{}", self.port)},
            "sync": {"enabled": sync, "backoff_ms_min": 100, "backoff_ms_max": 2000},
            "log": {"filter": "info"},
        }))?;
        std::fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;
        let log_path = self.dir.join("agent.log");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("run")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true);
        #[cfg(target_os = "linux")]
        // SAFETY: prctl is async-signal-safe; it only asks the kernel to SIGTERM the agent if the
        // hub dies without running its destructors (kill -9), so no agent outlives the demo.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let mut child = cmd.spawn().with_context(|| format!("starting {}", self.bin.display()))?;
        let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let announced = tokio::time::timeout(Duration::from_secs(30), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some((_, url)) = line.split_once("listening on ") {
                    return Some(url.trim().to_owned());
                }
            }
            None
        })
        .await;
        let Ok(Some(url)) = announced else {
            let _ = child.kill().await;
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            bail!("{AGENT} in {} did not start; its log:\n{}", self.dir.display(), log.trim());
        };
        // Keep draining stdout so the agent never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        if let Some(port) = url.rsplit(':').next().and_then(|p| p.trim_end_matches('/').parse().ok()) {
            self.port = port;
        }
        self.api = Some(ApiClient::new(url, None));
        self.child = Some(child);
        Ok(())
    }

    /// The running agent's API.
    fn api(&self) -> ApiClient {
        self.api.clone().expect("the agent is running")
    }

    /// Stops the process as a service manager would (SIGTERM, then SIGKILL after 20 s).
    async fn stop(&mut self) -> anyhow::Result<()> {
        self.api = None;
        let Some(mut child) = self.child.take() else { return Ok(()) };
        #[cfg(unix)]
        if let Some(pid) = child.id() {
            // SAFETY: plain kill(2) on our own child, which has not been reaped yet.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        }
        #[cfg(not(unix))]
        let _ = child.start_kill();
        match tokio::time::timeout(Duration::from_secs(20), child.wait()).await {
            Ok(status) => {
                let status = status?;
                if !status.success() {
                    bail!("{AGENT} in {} exited with {status}", self.dir.display());
                }
            }
            Err(_) => {
                child.kill().await?;
                bail!("{AGENT} in {} did not stop within 20 s; killed it", self.dir.display());
            }
        }
        Ok(())
    }
}

async fn wait_for(
    what: &str,
    deadline: Duration,
    mut f: impl AsyncFnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let until = tokio::time::Instant::now() + deadline;
    loop {
        if f().await? {
            return Ok(());
        }
        if tokio::time::Instant::now() > until {
            bail!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn sell(agent: &ApiClient, sku: &str, qty: u64) -> anyhow::Result<()> {
    agent.post("/v1/sales", &json!({"id": Uuid::now_v7(), "lines": [{"sku": sku, "qty": qty}]})).await?;
    Ok(())
}

/// Every store's on_hand per SKU as the agents see it, and as the hub sees it.
async fn views(hub: &ApiClient, agents: &[ApiClient]) -> anyhow::Result<(Vec<Vec<i64>>, Vec<Vec<i64>>)> {
    let mut at_agents = Vec::new();
    for a in agents {
        let mut row = Vec::new();
        for sku in SKUS {
            let v = a.get(&format!("/v1/stock/{sku}")).await.map(|v| v["on_hand"].as_i64().unwrap_or(0)).unwrap_or(0);
            row.push(v);
        }
        at_agents.push(row);
    }
    let mut at_hub = vec![vec![0; SKUS.len()]; STORES.len()];
    for (j, sku) in SKUS.iter().enumerate() {
        let v = hub.get(&format!("/v1/availability/{sku}")).await?;
        for s in v["stores"].as_array().into_iter().flatten() {
            if let Some(i) = STORES.iter().position(|x| Some(*x) == s["store"].as_str()) {
                at_hub[i][j] = s["on_hand"].as_i64().unwrap_or(0);
            }
        }
    }
    Ok((at_agents, at_hub))
}

/// Runs the demo until `shutdown` resolves, or for `for_secs` then exits (non-zero if the hub
/// did not converge). The agent processes stop with it, also when `shutdown` comes early.
pub async fn run(for_secs: Option<u64>, shutdown: impl std::future::Future<Output = ()>) -> anyhow::Result<()> {
    let agent_bin = agent_binary()?;
    let tmp = tempfile::Builder::new().prefix("shelfsync-demo-").tempdir()?;
    let hub_dir = tmp.path().join("hub");
    admin::init(&hub_dir).await?;
    let admin_token = admin::create_token(&hub_dir, Role::Admin).await?;
    let storefront_token = admin::create_token(&hub_dir, Role::Storefront).await?;
    let mut cfg = HubConfig { data_dir: hub_dir.clone(), ..HubConfig::default() };
    cfg.quic.listen = "127.0.0.1:0".parse()?;
    cfg.http.listen = "127.0.0.1:0".parse()?;
    let hub = server::start(cfg).await?;
    let hub_api = ApiClient::new(hub.url(), Some(admin_token.clone()));

    let mut agents = Vec::new();
    for s in STORES {
        let store: StoreId = s.parse()?;
        let bundle_dir = tmp.path().join(format!("{s}-bundle"));
        admin::add_store(&hub_dir, &store, &bundle_dir, &hub.quic_addr.to_string()).await?;
        let mut agent = Agent::init(&agent_bin, tmp.path().join(s), &bundle_dir).await?;
        agent.start(true).await?;
        agents.push(agent);
    }

    let viewer_token = admin::create_token(&hub_dir, Role::Viewer).await?;
    let hub_url = hub.url();
    println!("Shelfsync demo — hub and {} stores on loopback, data in {}", STORES.len(), tmp.path().display());
    println!("  dashboard      {hub_url}/?token={viewer_token}");
    println!("  viewer token   {viewer_token}  (paste it into the dashboard at {hub_url}/)");
    println!("  hub API        {hub_url}");
    println!("  QUIC sync      {}", hub.quic_addr);
    for (s, a) in STORES.iter().zip(&agents) {
        println!("  {s}      POS API {}   stock at the hub {hub_url}/v1/stores/{s}/stock", a.api().base());
    }
    println!("  store agents   {} processes of {} (logs: <data>/store-*/agent.log)", agents.len(), agent_bin.display());
    println!("  admin token    {admin_token}");
    println!("  storefront token {storefront_token}");
    println!("try:  curl -H 'Authorization: Bearer {storefront_token}' {hub_url}/v1/availability/{JACKET}");
    println!("      curl -H 'Authorization: Bearer {admin_token}' {hub_url}/v1/overview");
    println!("      cargo run -q -p shelfsync-agent -- --agent {} sell HSS-001 1", agents[0].api().base());
    // Watched by a person (until Ctrl-C): pause between the acts so the dashboard can show each.
    let pace = if for_secs.is_none() { Duration::from_secs(6) } else { Duration::ZERO };

    let mut shutdown = std::pin::pin!(shutdown);
    let scenario = tokio::select! {
        r = scenario(&hub_api, &mut agents, pace) => Some(r),
        _ = &mut shutdown => None,
    };
    let result = match scenario {
        None => Ok(()),
        Some(Err(e)) => Err(e),
        Some(Ok(())) => {
            // Keep trading in the background until stopped.
            let trade_clients: Vec<ApiClient> = agents.iter().map(Agent::api).collect();
            let trading = tokio::spawn(trade(hub_api.clone(), trade_clients));
            match for_secs {
                Some(s) => tokio::time::sleep(Duration::from_secs(s)).await,
                None => {
                    println!("[demo] stores keep selling; press Ctrl-C to stop");
                    shutdown.await;
                }
            }
            trading.abort();
            Ok(())
        }
    };
    let mut stopped = Ok(());
    for a in &mut agents {
        let r = a.stop().await;
        if stopped.is_ok() {
            stopped = r;
        }
    }
    hub.stop().await;
    result?;
    stopped?;
    println!("[demo] stopped");
    Ok(())
}

/// Keeps the chain busy until aborted: a sale at a random store every half second, an online
/// reservation now and then (short leases, so some lapse), and a restock when a shelf runs low.
async fn trade(hub_api: ApiClient, stores: Vec<ApiClient>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for tick in 0u64.. {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let i = rng.random_range(0..stores.len());
        let sku = SKUS[rng.random_range(0..SKUS.len())];
        let _ = sell(&stores[i], sku, 1).await;
        if tick % 5 == 0 {
            let body = json!({"id": Uuid::now_v7(), "lines": [{"sku": SKUS[rng.random_range(0..SKUS.len())], "qty": 1}],
                "ttl_secs": 90, "customer": format!("web-{}", rng.random_range(100..999))});
            if let Ok((_, r)) = hub_api.post("/v1/reservations", &body).await {
                if rng.random_range(0..3) == 0 {
                    let id = r["id"].as_str().unwrap_or_default();
                    let _ = hub_api.post(&format!("/v1/reservations/{id}/commit"), &json!({})).await;
                }
            }
        }
        if tick % 120 == 119 {
            for s in STORES {
                let lines: Vec<Value> = SKUS.iter().map(|sku| json!({"sku": sku, "qty": 8})).collect();
                let body = json!({"id": Uuid::now_v7(), "store": s, "lines": lines, "reason": "weekly delivery"});
                let _ = hub_api.post("/v1/restocks", &body).await;
            }
        }
    }
}

async fn reserve(hub_api: &ApiClient, qty: u64, customer: &str, pickup: Option<&str>) -> anyhow::Result<Value> {
    let (_, r) = hub_api
        .post(
            "/v1/reservations",
            &json!({"id": Uuid::now_v7(), "lines": [{"sku": JACKET, "qty": qty}], "ttl_secs": 3600,
                "customer": customer, "pickup_store": pickup}),
        )
        .await
        .with_context(|| format!("reserving {qty} {JACKET} for {customer}"))?;
    Ok(r)
}

/// The story (see the module docs); fails unless every act happens and the hub converges to
/// exactly the stores' counts. `pace` is a pause between acts for a person watching.
async fn scenario(hub_api: &ApiClient, agents: &mut [Agent], pace: Duration) -> anyhow::Result<()> {
    let clients = |agents: &[Agent]| -> Vec<ApiClient> { agents.iter().map(Agent::api).collect() };
    let mut api = clients(agents);

    // 1. The catalog, with names the dashboard shows.
    for (sku, name, low) in CATALOG {
        hub_api
            .call(
                reqwest::Method::PUT,
                &format!("/v1/catalog/{sku}"),
                Some(&json!({"name": name, "low_stock_threshold": low, "max_per_customer": 4})),
            )
            .await
            .with_context(|| format!("adding {sku} to the catalog"))?;
    }
    println!("[demo] 1/6 catalog: {}", CATALOG.map(|(sku, name, _)| format!("{sku} {name}")).join(", "));

    // 2. Opening stock from head office; the restocks travel down to the stores. store-003 is the
    //    flagship: it gets most of the jackets.
    let opening = |store: usize, sku: &str| -> i64 {
        match (store, sku) {
            (2, JACKET) => 20,
            (_, JACKET) => 8,
            _ => 40,
        }
    };
    for (i, s) in STORES.iter().enumerate() {
        let lines: Vec<Value> = SKUS.iter().map(|sku| json!({"sku": sku, "qty": opening(i, sku)})).collect();
        hub_api
            .post("/v1/restocks", &json!({"id": Uuid::now_v7(), "store": s, "lines": lines, "reason": "opening stock"}))
            .await?;
    }
    wait_for("restocks to reach every store", Duration::from_secs(30), async || {
        let (a, h) = views(hub_api, &api).await?;
        Ok(a == h && a.iter().enumerate().all(|(i, row)| row.iter().zip(SKUS).all(|(v, sku)| *v == opening(i, sku))))
    })
    .await?;
    println!(
        "[demo] 2/6 opening stock delivered: 40 of each product per store, rain jackets 8/8/20; the stores have them"
    );
    tokio::time::sleep(pace).await;

    // 3. An ordinary morning at the tills (no jackets: they are kept for the flash sale).
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let everyday: Vec<&str> = SKUS.iter().copied().filter(|s| *s != JACKET).collect();
    for _ in 0..60 {
        let i = rng.random_range(0..STORES.len());
        sell(&api[i], everyday[rng.random_range(0..everyday.len())], rng.random_range(1..=2)).await?;
    }
    println!("[demo] 3/6 60 sales at the tills");
    tokio::time::sleep(pace).await;

    // 4. The flash sale online: twelve shoppers reserve a jacket each (sourced from the store
    //    with the most, store-003), eight pay at once, and one more wants two to collect there.
    let mut sourced = std::collections::BTreeMap::<String, u64>::new();
    for n in 1..=12 {
        let r = reserve(hub_api, 1, &format!("flash-{n:02}"), None).await?;
        for a in r["allocations"].as_array().into_iter().flatten() {
            *sourced.entry(a["store"].as_str().unwrap_or("?").to_owned()).or_default() +=
                a["qty"].as_u64().unwrap_or(0);
        }
        if n <= 8 {
            let id = r["id"].as_str().unwrap_or_default().to_owned();
            hub_api.post(&format!("/v1/reservations/{id}/commit"), &json!({})).await?;
        }
    }
    reserve(hub_api, 2, "pickup-anna", Some(STORES[2])).await?;
    println!(
        "[demo] 4/6 flash sale: 12 jackets reserved online (8 paid), sourced from {sourced:?}; 2 more reserved for pickup at {}",
        STORES[2]
    );
    tokio::time::sleep(pace).await;

    // 5. store-003 loses its link to headquarters but keeps selling: its agent process stops and
    //    comes back with sync switched off. At the till it sells ten jackets, more than it has
    //    left that were not promised online.
    let offline = 2;
    agents[offline].stop().await?;
    agents[offline].start(false).await?;
    api = clients(agents);
    for _ in 0..10 {
        sell(&api[offline], JACKET, 1).await?;
    }
    for _ in 0..20 {
        sell(&api[offline], everyday[rng.random_range(0..everyday.len())], 1).await?;
    }
    let (a, h) = views(hub_api, &api).await?;
    println!(
        "[demo] 5/6 {} went dark and sold 10 jackets and 20 other items at the till; the hub still sees {:?}, the store has {:?}",
        STORES[offline], h[offline], a[offline]
    );
    tokio::time::sleep(pace * 2).await;

    // 6. It comes back: the hub finds the oversell, re-sources what it can to other stores and
    //    marks the rest short for a person to sort out.
    agents[offline].stop().await?;
    agents[offline].start(true).await?;
    api = clients(agents);
    wait_for("the returning store to converge", Duration::from_secs(60), async || {
        let (a, h) = views(hub_api, &api).await?;
        Ok(a == h)
    })
    .await
    .context("the hub did not converge")?;
    let mut conflict = Value::Null;
    wait_for("the oversell conflict", Duration::from_secs(30), async || {
        let v = hub_api.get(&format!("/v1/conflicts?store={}&sku={JACKET}", STORES[offline])).await?;
        if let Some(c) = v["items"].as_array().into_iter().flatten().find(|c| c["kind"] == "oversell") {
            conflict = c.clone();
            return Ok(true);
        }
        Ok(false)
    })
    .await?;
    println!(
        "[demo] 6/6 oversell at {}: {} jackets promised that were not there; reconciled: {} (conflict {}, {})",
        STORES[offline],
        conflict["shortfall"],
        conflict["resolution"].as_str().unwrap_or(""),
        conflict["id"].as_str().unwrap_or(""),
        if conflict["status"] == "open" {
            "open: the short pickup needs a person; resolve it on the dashboard with the admin token, or it settles itself once the pickup is released"
        } else {
            "resolved"
        }
    );
    let (a, _) = views(hub_api, &api).await?;
    println!("[demo] {} is back; the hub converged to exactly the stores' counts: {:?}", STORES[offline], a);
    Ok(())
}
