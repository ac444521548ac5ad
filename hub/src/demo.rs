//! `shelfsync-hub demo`: a hub and three stores over real QUIC on loopback, in a temp dir. The
//! stores are real `shelfsync-agent` processes, set up and driven as a user would: `init --bundle`,
//! `run --config`, then their HTTP API. Seeds stock, sells, takes one store offline (it keeps
//! selling), brings it back, and checks that the hub converges to exactly what the stores recorded.

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
        Ok(Agent { bin: bin.to_owned(), dir, child: None, api: None })
    }

    /// Writes `agent.toml` and runs `shelfsync-agent run --config agent.toml`; waits for its
    /// `listening on URL` line. Logs go to `agent.log` in the data dir.
    async fn start(&mut self, sync: bool) -> anyhow::Result<()> {
        let config = self.dir.join("agent.toml");
        let text = toml::to_string(&json!({
            "data_dir": self.dir,
            "api": {"listen": "127.0.0.1:0"},
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
    let mut cfg = HubConfig::default();
    cfg.data_dir = hub_dir.clone();
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

    println!("Shelfsync demo — hub and {} stores on loopback, data in {}", STORES.len(), tmp.path().display());
    println!("  hub API        {}", hub.url());
    println!("  dashboard      {}/  (paste the admin token)", hub.url());
    println!("  QUIC sync      {}", hub.quic_addr);
    for (s, a) in STORES.iter().zip(&agents) {
        println!("  {s} POS API {}", a.api().base());
    }
    println!("  store agents   {} processes of {} (logs: <data>/store-*/agent.log)", agents.len(), agent_bin.display());
    println!("  admin token    {admin_token}");
    println!("  storefront token {storefront_token}");
    println!("try:  curl -H 'Authorization: Bearer {storefront_token}' {}/v1/availability/HSS-001", hub.url());
    println!("      curl -H 'Authorization: Bearer {admin_token}' {}/v1/stores", hub.url());
    println!("      cargo run -q -p shelfsync-agent -- --agent {} sell HSS-001 1", agents[0].api().base());

    let mut shutdown = std::pin::pin!(shutdown);
    let scenario = tokio::select! {
        r = scenario(&hub_api, &mut agents) => Some(r),
        _ = &mut shutdown => None,
    };
    let result = match scenario {
        None => Ok(()),
        Some(Err(e)) => Err(e),
        Some(Ok(())) => {
            // Keep trading in the background until stopped.
            let trade_clients: Vec<ApiClient> = agents.iter().map(Agent::api).collect();
            let trading = tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(11);
                loop {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    let i = rng.random_range(0..trade_clients.len());
                    let sku = SKUS[rng.random_range(0..SKUS.len())];
                    let _ = sell(&trade_clients[i], sku, 1).await;
                }
            });
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

/// Restocks, sells, takes store-003 offline (it keeps selling) and brings it back; fails unless
/// the hub converges to exactly the stores' counts.
async fn scenario(hub_api: &ApiClient, agents: &mut [Agent]) -> anyhow::Result<()> {
    let clients = |agents: &[Agent]| -> Vec<ApiClient> { agents.iter().map(Agent::api).collect() };
    let mut api = clients(agents);

    // Head office restocks every store; the restocks travel down to the stores.
    for s in STORES {
        let lines: Vec<Value> = SKUS.iter().map(|sku| json!({"sku": sku, "qty": 50})).collect();
        hub_api
            .post("/v1/restocks", &json!({"id": Uuid::now_v7(), "store": s, "lines": lines, "reason": "opening stock"}))
            .await?;
    }
    wait_for("restocks to reach every store", Duration::from_secs(30), async || {
        let (a, h) = views(hub_api, &api).await?;
        Ok(a == h && a.iter().all(|row| row.iter().all(|v| *v == 50)))
    })
    .await?;
    println!("[demo] restocked 50 of each SKU at every store; the stores have them");

    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut sold = 0u64;
    for _ in 0..60 {
        let i = rng.random_range(0..STORES.len());
        sell(&api[i], SKUS[rng.random_range(0..SKUS.len())], rng.random_range(1..=2)).await?;
        sold += 1;
    }
    println!("[demo] {sold} sales recorded at the stores");

    // store-003 loses its link to headquarters but keeps selling: its agent process stops and
    // comes back with sync switched off in its config.
    let offline = 2;
    agents[offline].stop().await?;
    agents[offline].start(false).await?;
    api = clients(agents);
    for _ in 0..40 {
        sell(&api[offline], SKUS[rng.random_range(0..SKUS.len())], 1).await?;
    }
    let (a, h) = views(hub_api, &api).await?;
    println!(
        "[demo] {} is offline and sold 40 more; the hub still sees {:?}, the store {:?}",
        STORES[offline], h[offline], a[offline]
    );

    agents[offline].stop().await?;
    agents[offline].start(true).await?;
    api = clients(agents);
    wait_for("the returning store to converge", Duration::from_secs(60), async || {
        let (a, h) = views(hub_api, &api).await?;
        Ok(a == h)
    })
    .await
    .context("the hub did not converge")?;
    let (a, _) = views(hub_api, &api).await?;
    println!("[demo] {} is back; the hub converged to exactly the stores' counts: {:?}", STORES[offline], a);
    Ok(())
}
