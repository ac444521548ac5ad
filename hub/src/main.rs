//! `shelfsync-hub`: headquarters' command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use shelfsync_hub::config::HubConfig;
use shelfsync_hub::storage::Role;
use shelfsync_hub::{admin, demo, server};
use shelfsync_node::clidocs::Shell;
use shelfsync_node::datadir::DataDirArgs;
use shelfsync_shared::StoreId;

#[derive(Parser)]
#[command(name = "shelfsync-hub", version, about = "Shelfsync hub: one true view of every store's stock")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create the hub database and its private certificate authority.
    Init {
        #[command(flatten)]
        dir: DataDirArgs,
        /// Keep the hub's data in this PostgreSQL database (postgres://user@host:port/db) instead
        /// of the embedded SQLite file; the data dir remembers it (its `database-url` file).
        #[arg(long, value_name = "URL", env = "SHELFSYNC_HUB_DATABASE_URL")]
        database_url: Option<String>,
        /// Split the chain's SKUs into this many partitions, each decided by one hub at a time
        /// (PostgreSQL only; fixed for the database's life).
        #[arg(long, value_name = "N", default_value_t = 1)]
        partitions: u16,
    },
    /// Manage stores.
    Store {
        #[command(subcommand)]
        cmd: StoreCmd,
    },
    /// Manage API tokens.
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
    /// Run the hub: QUIC sync endpoint and HTTP API.
    Serve {
        /// TOML config file (see config/hub.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Overrides data_dir.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Overrides storage.url (PostgreSQL; default: what the data dir says, else SQLite).
        #[arg(long, value_name = "URL", env = "SHELFSYNC_HUB_DATABASE_URL")]
        database_url: Option<String>,
        /// Overrides quic.listen.
        #[arg(long)]
        quic_listen: Option<SocketAddr>,
        /// Overrides http.listen.
        #[arg(long)]
        http_listen: Option<SocketAddr>,
    },
    /// Manage the catalog.
    Catalog {
        #[command(subcommand)]
        cmd: CatalogCmd,
    },
    /// Back up the whole hub into one file: database, CA and keys, hub certificate, and the
    /// config file if --config is given (safe while the hub runs; the file is 0600).
    Backup {
        #[command(flatten)]
        dir: DataDirArgs,
        /// Destination file (must not exist).
        #[arg(long)]
        to: PathBuf,
    },
    /// Restore a backup into a new or empty data dir (checked in full first; nothing is written
    /// if it is damaged). The restored hub takes a new incarnation when it starts; stores give
    /// back what the backup lacks.
    Restore {
        /// The backup file (made by `shelfsync-hub backup`).
        #[arg(long)]
        from: PathBuf,
        #[command(flatten)]
        dir: DataDirArgs,
    },
    /// A summary of the hub: stores, tokens, database size, journal position; live figures from
    /// a running hub when its URL is given.
    Status {
        #[command(flatten)]
        dir: DataDirArgs,
        /// A running hub's HTTP URL, e.g. http://127.0.0.1:8080.
        #[arg(long)]
        url: Option<String>,
        /// A viewer (or admin) token of the running hub, to read its /metrics.
        #[arg(long, env = "SHELFSYNC_HUB_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// JSON instead of a summary.
        #[arg(long)]
        json: bool,
    },
    /// Sales channels of the running hub (web, app, marketplaces, click-and-collect), through
    /// its HTTP API: the hub decides them.
    Channel {
        #[command(subcommand)]
        cmd: ChannelCmd,
    },
    /// Conflicts of the running hub (through its HTTP API: the hub decides them).
    Conflicts {
        #[command(subcommand)]
        cmd: ConflictsCmd,
    },
    /// Print a shell completion script.
    #[command(hide = true)]
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: Shell,
    },
    /// Write man pages (one per command) into a directory.
    #[command(hide = true)]
    Man {
        /// The directory (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
    /// A hub and three in-process stores selling over real QUIC on loopback.
    Demo {
        /// Exit after this many seconds of trading (default: run until Ctrl-C).
        #[arg(long)]
        for_secs: Option<u64>,
    },
}

#[derive(Subcommand)]
enum StoreCmd {
    /// Register a store and write its credential bundle for `shelfsync-agent init --bundle`.
    Add {
        /// The store id, e.g. store-012.
        id: String,
        /// Directory to write the bundle into.
        #[arg(long)]
        out: PathBuf,
        /// The address agents dial (host:port of the hub's QUIC endpoint); several hubs sharing
        /// one database: repeat the flag or separate with commas (agents fail over in order).
        #[arg(long, default_value = "127.0.0.1:7443", value_delimiter = ',')]
        hub_addr: Vec<String>,
        #[command(flatten)]
        dir: DataDirArgs,
    },
    /// Revoke every certificate of a store; a running hub drops it within seconds.
    Revoke {
        /// The store id.
        id: String,
        #[command(flatten)]
        dir: DataDirArgs,
    },
    /// How many agents of a store may be connected at once (default 1: a second one is refused
    /// as a duplicate). Raise it for a store that runs several agents on purpose.
    Agents {
        /// The store id.
        id: String,
        /// Agents allowed at once: 1 .. 64.
        max: u32,
        #[command(flatten)]
        dir: DataDirArgs,
    },
}

/// Where the running hub is and how to talk to it.
#[derive(clap::Args)]
struct HubApiArgs {
    /// The running hub's HTTP URL (default: http.listen of --config, else http://127.0.0.1:8080).
    #[arg(long)]
    url: Option<String>,
    /// The hub config file, to find http.listen.
    #[arg(long)]
    config: Option<PathBuf>,
    /// An API token of the running hub (admin to resolve, any role to list).
    #[arg(long, env = "SHELFSYNC_HUB_TOKEN", hide_env_values = true)]
    token: String,
}

impl HubApiArgs {
    fn base(&self) -> anyhow::Result<String> {
        if let Some(u) = &self.url {
            return Ok(u.trim_end_matches('/').to_owned());
        }
        let cfg = HubConfig::load(self.config.as_deref())?;
        Ok(format!("http://{}", cfg.http.listen))
    }

    /// Calls the hub; the JSON answer, or the hub's error message.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<serde_json::Value> {
        let url = format!("{}{path}", self.base()?);
        let mut req = reqwest::Client::new().request(method, &url).bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.map_err(|e| anyhow::anyhow!("{url}: {e} (is the hub running? --url)"))?;
        let status = r.status();
        let v: serde_json::Value = r.json().await.map_err(|e| anyhow::anyhow!("{url}: answer is not JSON: {e}"))?;
        if !status.is_success() {
            anyhow::bail!("{url}: {status}: {}", v["message"].as_str().unwrap_or("(no message)"));
        }
        Ok(v)
    }
}

#[derive(Subcommand)]
enum ConflictsCmd {
    /// List conflicts, newest first (all pages).
    List {
        /// Only open or only resolved ones.
        #[arg(long, value_parser = ["open", "resolved"])]
        status: Option<String>,
        /// JSON (one array) instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: HubApiArgs,
    },
    /// Resolve an open conflict with a note saying what was done.
    Resolve {
        /// The conflict id (`conflicts list` shows them).
        id: String,
        /// What head office did about it.
        #[arg(long)]
        note: String,
        #[command(flatten)]
        api: HubApiArgs,
    },
}

#[derive(Subcommand)]
enum ChannelCmd {
    /// Add a channel (refused if it exists: `channel set` changes one).
    Add {
        /// The channel id: 1 to 32 of a-z 0-9 - (web, app, amazon, ebay-de).
        id: String,
        #[command(flatten)]
        flags: ChannelFlags,
        #[command(flatten)]
        api: HubApiArgs,
    },
    /// Change some of a channel's settings (the others stay).
    Set {
        /// The channel id.
        id: String,
        #[command(flatten)]
        flags: ChannelFlags,
        #[command(flatten)]
        api: HubApiArgs,
    },
    /// List every channel.
    List {
        /// JSON (one array) instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: HubApiArgs,
    },
    /// Remove a channel (not web): its tokens are refused from then on.
    Remove {
        /// The channel id.
        id: String,
        #[command(flatten)]
        api: HubApiArgs,
    },
}

/// A channel's settings on the command line (each one given replaces that setting).
#[derive(clap::Args)]
struct ChannelFlags {
    /// Only these stores fulfil it (comma separated).
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["pickup", "all_stores"])]
    stores: Option<Vec<String>>,
    /// Click-and-collect: only reservations naming a pickup store.
    #[arg(long, conflicts_with = "all_stores")]
    pickup: bool,
    /// Every store fulfils it (the default).
    #[arg(long)]
    all_stores: bool,
    /// Units of each SKU it may not promise.
    #[arg(long, value_name = "UNITS")]
    buffer: Option<u64>,
    /// Percentage of its stores' availability of each SKU it may not promise (the larger of the
    /// two buffers counts).
    #[arg(long, value_name = "PCT")]
    buffer_pct: Option<u64>,
    /// At most this many units of each SKU.
    #[arg(long, value_name = "UNITS", conflicts_with = "no_cap")]
    cap: Option<u64>,
    /// At most this percentage of the chain's availability of each SKU.
    #[arg(long, value_name = "PCT", conflicts_with = "no_cap")]
    cap_pct: Option<u64>,
    /// No cap.
    #[arg(long)]
    no_cap: bool,
    /// A lagged channel (a marketplace): its listing may be this many seconds old, and it cannot
    /// refuse an order.
    #[arg(long, value_name = "SECS", conflicts_with = "live")]
    lagged: Option<u64>,
    /// A live channel (it asks at checkout; the default).
    #[arg(long)]
    live: bool,
    /// One SKU's own buffer, instead of the channel's: SKU=UNITS (repeat the flag for several).
    #[arg(long, value_name = "SKU=UNITS")]
    sku_buffer: Vec<String>,
    /// Drop a SKU's own buffer (the channel's applies again); repeat for several.
    #[arg(long, value_name = "SKU")]
    clear_sku_buffer: Vec<String>,
}

impl ChannelFlags {
    /// Applies the flags given to a channel's JSON (as `GET /v1/channels/{id}` shows it).
    fn apply(&self, c: &mut serde_json::Value) -> anyhow::Result<()> {
        use serde_json::json;
        if !c["sku_buffers"].is_object() {
            c["sku_buffers"] = json!({});
        }
        for b in &self.sku_buffer {
            let Some((sku, units)) = b.split_once('=') else {
                anyhow::bail!("--sku-buffer {b}: give SKU=UNITS, e.g. HOT-1=5");
            };
            let units: u64 =
                units.parse().map_err(|_| anyhow::anyhow!("--sku-buffer {b}: {units} is not a whole number"))?;
            c["sku_buffers"][sku] = json!(units);
        }
        for sku in &self.clear_sku_buffer {
            if let Some(m) = c["sku_buffers"].as_object_mut() {
                m.remove(sku);
            }
        }
        if let Some(s) = &self.stores {
            c["fulfil"] = json!({ "stores": s });
        }
        if self.pickup {
            c["fulfil"] = json!("pickup");
        }
        if self.all_stores {
            c["fulfil"] = json!("all");
        }
        if let Some(u) = self.buffer {
            c["buffer"]["units"] = json!(u);
        }
        if let Some(p) = self.buffer_pct {
            c["buffer"]["share_pct"] = json!(p);
        }
        if self.no_cap {
            c["cap"] = json!({});
        }
        if let Some(u) = self.cap {
            c["cap"]["units"] = json!(u);
        }
        if let Some(p) = self.cap_pct {
            c["cap"]["share_pct"] = json!(p);
        }
        if let Some(l) = self.lagged {
            c["latency"] = json!({ "lagged": { "lag_secs": l } });
        }
        if self.live {
            c["latency"] = json!("live");
        }
        Ok(())
    }
}

/// A channel's settings in a few words, for tables and messages.
fn channel_summary(c: &serde_json::Value) -> [String; 4] {
    let fulfil = match &c["fulfil"] {
        serde_json::Value::String(s) => s.clone(),
        v => format!(
            "stores: {}",
            v["stores"].as_array().into_iter().flatten().filter_map(|s| s.as_str()).collect::<Vec<_>>().join(",")
        ),
    };
    let own = c["sku_buffers"].as_object().map_or(0, |m| m.len());
    let buffer = format!(
        "{} / {}%{}",
        c["buffer"]["units"],
        c["buffer"]["share_pct"],
        if own > 0 { format!(" (+{own} SKUs)") } else { String::new() }
    );
    let cap = match (c["cap"]["units"].as_u64(), c["cap"]["share_pct"].as_u64()) {
        (None, None) => "-".to_owned(),
        (u, p) => {
            [u.map(|u| u.to_string()), p.map(|p| format!("{p}%"))].into_iter().flatten().collect::<Vec<_>>().join(" / ")
        }
    };
    let latency = match c["latency"]["lagged"]["lag_secs"].as_u64() {
        Some(s) => format!("lagged {s}s"),
        None => "live".to_owned(),
    };
    [fulfil, buffer, cap, latency]
}

#[derive(Subcommand)]
enum CatalogCmd {
    /// Import a CSV (sku,name,barcodes,safety_stock,low_stock_threshold,max_per_customer,active,escrow_share_pct,escrow_max,escrow_keep).
    /// All rows or none; a running hub picks the change up within a second.
    Import {
        /// The CSV file.
        file: PathBuf,
        #[command(flatten)]
        dir: DataDirArgs,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Create an API token; prints only the token (shown this once; the hub keeps its hash).
    Create {
        /// What the token may do.
        #[arg(long, value_enum)]
        role: Role,
        /// A name to tell tokens apart (default `unnamed`).
        #[arg(long)]
        name: Option<String>,
        /// Lifetime: a number and s, m, h or d (e.g. 30d, 12h, 90m). Default: no expiry.
        #[arg(long)]
        expires_in: Option<String>,
        /// The sales channel a storefront or viewer token acts for (it must exist; a storefront
        /// token without one is web's).
        #[arg(long)]
        channel: Option<String>,
        #[command(flatten)]
        dir: DataDirArgs,
    },
    /// List tokens: id, name, role, status, created, last used, expiry, revocation (never secrets).
    List {
        /// JSON (one array) instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        dir: DataDirArgs,
    },
    /// Revoke a token by id; a running hub refuses it from its next request on.
    Revoke {
        /// The token id (`token list` shows them).
        id: String,
        #[command(flatten)]
        dir: DataDirArgs,
    },
}

fn main() -> ExitCode {
    shelfsync_node::cli::run_main(dispatch(Cli::parse()))
}

/// The hub `serve` runs: alone, one of several on a database, or deciding for partitions.
enum Running {
    One(server::RunningHub),
    Clustered(server::ClusterNode),
    Partitioned(shelfsync_hub::partitioned::PartitionedNode),
}

fn store_id(s: &str) -> anyhow::Result<StoreId> {
    s.parse().map_err(|e| anyhow::anyhow!("store id {s:?}: {e}"))
}

/// The data dir of an admin verb: `--data-dir`, else the `data_dir` of `--config`.
fn data_dir(dir: &DataDirArgs) -> anyhow::Result<PathBuf> {
    Ok(dir.resolve(|c| HubConfig::load(Some(c)).map(|cfg| cfg.data_dir))?)
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Init { dir, database_url, partitions } => {
            let data_dir = data_dir(&dir)?;
            let partitions =
                shelfsync_hub_core::Partitions::new(partitions).map_err(|m| anyhow::anyhow!("--partitions: {m}"))?;
            let writer = admin::init_with(&data_dir, database_url.as_deref(), partitions).await?;
            let target = shelfsync_hub::db::Target::for_data_dir(&data_dir, None)?;
            println!("initialised hub {writer} in {} ({})", data_dir.display(), target.describe());
        }
        Cmd::Store { cmd: StoreCmd::Add { id, out, hub_addr, dir } } => {
            let data_dir = data_dir(&dir)?;
            let store = store_id(&id)?;
            let hub_addr = hub_addr.iter().map(|a| a.trim()).collect::<Vec<_>>().join(",");
            shelfsync_node::bundle::check_hub_addrs(&hub_addr).map_err(|m| anyhow::anyhow!("--hub-addr: {m}"))?;
            admin::add_store(&data_dir, &store, &out, &hub_addr).await?;
            println!("store {store} registered; bundle written to {}", out.display());
        }
        Cmd::Store { cmd: StoreCmd::Agents { id, max, dir } } => {
            let data_dir = data_dir(&dir)?;
            let store = store_id(&id)?;
            admin::set_max_agents(&data_dir, &store, max).await?;
            println!("store {store} may have {max} agent(s) connected at once");
        }
        Cmd::Store { cmd: StoreCmd::Revoke { id, dir } } => {
            let data_dir = data_dir(&dir)?;
            let store = store_id(&id)?;
            let n = admin::revoke_store(&data_dir, &store).await?;
            println!("store {store} revoked ({n} certificate(s))");
        }
        Cmd::Token { cmd: TokenCmd::Create { role, name, expires_in, channel, dir } } => {
            let data_dir = data_dir(&dir)?;
            let (_, secret) =
                admin::create_named_token(&data_dir, role, name.as_deref(), expires_in.as_deref(), channel.as_deref())
                    .await?;
            println!("{secret}");
        }
        Cmd::Token { cmd: TokenCmd::List { json, dir } } => {
            let data_dir = data_dir(&dir)?;
            let now = shelfsync_node::now_ms();
            let views: Vec<_> = admin::list_tokens(&data_dir).await?.iter().map(|t| t.view(now)).collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&views)?);
            } else {
                print_tokens(&views);
            }
        }
        Cmd::Token { cmd: TokenCmd::Revoke { id, dir } } => {
            let data_dir = data_dir(&dir)?;
            let t = admin::revoke_token(&data_dir, &id).await?;
            println!("token {} ({}) revoked", t.id, t.name);
        }
        Cmd::Serve { config, data_dir, database_url, quic_listen, http_listen } => {
            let mut cfg = HubConfig::load(config.as_deref())?;
            if let Some(d) = data_dir {
                cfg.data_dir = d;
            }
            if let Some(u) = database_url {
                cfg.storage.url = Some(u);
            }
            if let Some(a) = quic_listen {
                cfg.quic.listen = a;
            }
            if let Some(a) = http_listen {
                cfg.http.listen = a;
            }
            shelfsync_node::cli::init_tracing(&cfg.log.filter, cfg.log.format);
            let target = shelfsync_hub::db::Target::for_data_dir(&cfg.data_dir, cfg.storage.url.as_deref())?;
            // On PostgreSQL a hub may have company: it decides while it holds the lease (or, on a
            // database of several partitions, its share of the partitions' leases).
            let clustered = matches!(target, shelfsync_hub::db::Target::Postgres(_));
            let partitioned = shelfsync_hub::partitioned::partition_count(&target).await?.count() > 1;
            let running = match (clustered, partitioned) {
                (_, true) => Running::Partitioned(shelfsync_hub::partitioned::start_partitioned(cfg).await?),
                (true, false) => Running::Clustered(server::start_clustered(cfg).await?),
                (false, false) => Running::One(server::start(cfg).await?),
            };
            let (quic, url) = match &running {
                Running::One(hub) => (hub.quic_addr, hub.url()),
                Running::Clustered(node) => (node.quic_addr, node.url()),
                Running::Partitioned(node) => (node.quic_addr, node.url()),
            };
            // Machine-readable lines, so scripts and tests learn the bound ports.
            println!("shelfsync-hub quic on {quic}");
            println!("shelfsync-hub listening on {url}");
            let fatal = tokio::select! {
                _ = shelfsync_node::cli::shutdown_signal() => None,
                reason = shelfsync_node::fatal::stopped() => Some(reason),
            };
            tracing::info!("shutting down");
            match running {
                Running::One(hub) => hub.stop().await,
                Running::Clustered(node) => node.stop().await,
                Running::Partitioned(node) => node.stop().await,
            }
            if let Some(reason) = fatal {
                anyhow::bail!("fail-stop: {reason}; restart the hub: it reloads what was committed");
            }
        }
        Cmd::Catalog { cmd: CatalogCmd::Import { file, dir } } => {
            let data_dir = data_dir(&dir)?;
            let text = std::fs::read_to_string(&file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let n = admin::import_catalog(&data_dir, &text).await?;
            println!("imported {n} catalog entries from {}", file.display());
        }
        Cmd::Backup { dir, to } => {
            let data_dir = data_dir(&dir)?;
            admin::backup_with_config(&data_dir, &to, dir.config.as_deref()).await?;
            println!("backed up {} to {}", data_dir.display(), to.display());
        }
        Cmd::Restore { from, dir } => {
            let data_dir = data_dir(&dir)?;
            let r = admin::restore(&from, &data_dir)?;
            println!(
                "restored {} (made {} under hub writer {}) into {}; the hub takes a new incarnation when it \
                 starts, and stores give back what the backup lacks",
                from.display(),
                shelfsync_shared::rfc3339(r.created_at_ms),
                r.writer,
                data_dir.display()
            );
            if let Some((was, now)) = r.config {
                println!("the config it was made with ({was}) is in {}", now.display());
            }
        }
        Cmd::Status { dir, url, token, json } => {
            let data_dir = data_dir(&dir)?;
            status(&data_dir, url, token, json).await?;
        }
        Cmd::Conflicts { cmd: ConflictsCmd::List { status, json, api } } => {
            let mut items = Vec::new();
            let mut after: Option<String> = None;
            loop {
                let mut q = vec!["limit=1000".to_owned()];
                q.extend(status.as_ref().map(|s| format!("status={s}")));
                q.extend(after.as_ref().map(|a| format!("after={a}")));
                let page = api.call(reqwest::Method::GET, &format!("/v1/conflicts?{}", q.join("&")), None).await?;
                items.extend(page["items"].as_array().cloned().unwrap_or_default());
                match page["next"].as_str() {
                    Some(n) => after = Some(n.to_owned()),
                    None => break,
                }
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&items)?);
            } else {
                println!(
                    "{:<36}  {:<17}  {:<8}  {:<12}  {:<12}  {:<24}  RESOLUTION",
                    "ID", "KIND", "STATUS", "STORE", "SKU", "DETECTED"
                );
                for c in &items {
                    let s = |k: &str| c[k].as_str().unwrap_or("-").to_owned();
                    println!(
                        "{:<36}  {:<17}  {:<8}  {:<12}  {:<12}  {:<24}  {}",
                        s("id"),
                        s("kind"),
                        s("status"),
                        s("store"),
                        s("sku"),
                        s("detected_at"),
                        s("resolution")
                    );
                }
            }
        }
        Cmd::Channel { cmd: ChannelCmd::Add { id, flags, api } } => {
            let path = format!("/v1/channels/{id}");
            // `web` exists unconfigured: adding it configures it.
            let existing = api.call(reqwest::Method::GET, "/v1/channels", None).await?;
            let taken = existing["items"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["id"] == id.as_str() && c["configured"] == true);
            if taken {
                anyhow::bail!("channel {id} exists; `channel set {id} ...` changes it");
            }
            let mut c = serde_json::json!({});
            flags.apply(&mut c)?;
            let c = api.call(reqwest::Method::PUT, &path, Some(c)).await?;
            let [fulfil, buffer, cap, latency] = channel_summary(&c);
            println!("channel {id} added: {fulfil}; buffer {buffer}; cap {cap}; {latency}");
        }
        Cmd::Channel { cmd: ChannelCmd::Set { id, flags, api } } => {
            let path = format!("/v1/channels/{id}");
            let mut c = api.call(reqwest::Method::GET, &path, None).await?;
            flags.apply(&mut c)?;
            let body = serde_json::json!({
                "fulfil": c["fulfil"], "buffer": c["buffer"], "cap": c["cap"], "latency": c["latency"],
                "sku_buffers": c["sku_buffers"],
            });
            let c = api.call(reqwest::Method::PUT, &path, Some(body)).await?;
            let [fulfil, buffer, cap, latency] = channel_summary(&c);
            println!("channel {id} set: {fulfil}; buffer {buffer}; cap {cap}; {latency}");
        }
        Cmd::Channel { cmd: ChannelCmd::List { json, api } } => {
            let v = api.call(reqwest::Method::GET, "/v1/channels", None).await?;
            let items = v["items"].as_array().cloned().unwrap_or_default();
            if json {
                println!("{}", serde_json::to_string_pretty(&items)?);
            } else {
                println!(
                    "{:<16}  {:<24}  {:<12}  {:<12}  {:<12}  CONFIGURED",
                    "ID", "FULFIL", "BUFFER", "CAP", "LATENCY"
                );
                for c in &items {
                    let [fulfil, buffer, cap, latency] = channel_summary(c);
                    let set = if c["configured"] == true { "yes" } else { "no (defaults)" };
                    println!(
                        "{:<16}  {:<24}  {:<12}  {:<12}  {:<12}  {set}",
                        c["id"].as_str().unwrap_or("-"),
                        fulfil,
                        buffer,
                        cap,
                        latency
                    );
                }
            }
        }
        Cmd::Channel { cmd: ChannelCmd::Remove { id, api } } => {
            api.call(reqwest::Method::DELETE, &format!("/v1/channels/{id}"), None).await?;
            println!("channel {id} removed");
        }
        Cmd::Conflicts { cmd: ConflictsCmd::Resolve { id, note, api } } => {
            let path = format!("/v1/conflicts/{id}/resolve");
            let c = api.call(reqwest::Method::POST, &path, Some(serde_json::json!({ "note": note }))).await?;
            println!(
                "conflict {} resolved: {}",
                c["id"].as_str().unwrap_or(&id),
                c["resolution"].as_str().unwrap_or("")
            );
        }
        Cmd::Completions { shell } => {
            shelfsync_node::clidocs::completions(Cli::command(), shell, &mut std::io::stdout());
        }
        Cmd::Man { out } => {
            for p in shelfsync_node::clidocs::man_pages(Cli::command(), &out)? {
                println!("{}", p.display());
            }
        }
        Cmd::Demo { for_secs } => {
            shelfsync_node::cli::init_tracing("warn", shelfsync_node::cli::LogFormat::Text);
            demo::run(for_secs, shelfsync_node::cli::shutdown_signal()).await?;
        }
    }
    Ok(())
}

/// `token list` as a table; times to the second, `-` when there is none.
fn print_tokens(views: &[shelfsync_hub::tokens::TokenView]) {
    let t = |s: &Option<String>| {
        s.as_deref()
            .map(|s| s.get(..19).map(|d| format!("{d}Z")).unwrap_or_else(|| s.to_owned()))
            .unwrap_or_else(|| "-".into())
    };
    println!(
        "{:<36}  {:<24}  {:<10}  {:<12}  {:<7}  {:<20}  {:<20}  {:<20}  {:<20}",
        "ID", "NAME", "ROLE", "CHANNEL", "STATUS", "CREATED", "LAST USED", "EXPIRES", "REVOKED"
    );
    for v in views {
        println!(
            "{:<36}  {:<24}  {:<10}  {:<12}  {:<7}  {:<20}  {:<20}  {:<20}  {:<20}",
            v.id,
            v.name,
            v.role.as_str(),
            v.channel.as_ref().map_or("-", |c| c.as_str()),
            v.status.as_str(),
            t(&Some(v.created_at.clone())),
            t(&v.last_used_at),
            t(&v.expires_at),
            t(&v.revoked_at)
        );
    }
}

/// `status`: the data dir's figures, and a running hub's if `url` answers.
async fn status(
    data_dir: &std::path::Path,
    url: Option<String>,
    token: Option<String>,
    json: bool,
) -> anyhow::Result<()> {
    let d = admin::dir_status(data_dir).await?;
    let live = match &url {
        Some(u) => Some(live_figures(u, token.as_deref()).await),
        None => None,
    };
    if json {
        let mut v = serde_json::to_value(&d)?;
        if let (Some(u), Some(l)) = (&url, &live) {
            v["live"] = match l {
                Ok(m) => serde_json::json!({ "url": u, "reachable": true, "metrics": m }),
                Err(e) => serde_json::json!({ "url": u, "reachable": false, "error": e }),
            };
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("hub data dir   {}", d.data_dir);
    println!(
        "hub writer     {}{}",
        d.hub_writer,
        if d.restored_copy { "  (restored: takes a new incarnation when it starts)" } else { "" }
    );
    println!("stores         {} registered, {} revoked", d.stores, d.stores_revoked);
    let tokens: Vec<String> = d.tokens.iter().map(|(k, v)| format!("{v} {k}")).collect();
    println!("tokens         {}", if tokens.is_empty() { "none".to_owned() } else { tokens.join(", ") });
    println!("database       {}, {:.1} MiB", d.database, d.database_bytes as f64 / (1 << 20) as f64);
    println!("journal        head {}, {} events", d.journal_head, d.journal_events);
    if let Some(c) = &d.cluster {
        println!(
            "lease          epoch {}, {}",
            c.epoch,
            if c.lease_expires_in_secs > 0.0 {
                format!("expires in {:.1} s", c.lease_expires_in_secs)
            } else {
                format!("expired {:.1} s ago: no hub decides", -c.lease_expires_in_secs)
            }
        );
        if c.leases.len() > 1 {
            for l in &c.leases {
                println!(
                    "partition {:<4} epoch {}, {}",
                    l.partition,
                    l.epoch,
                    match (&l.owner, l.expires_in_secs > 0.0) {
                        (Some(o), true) => format!("held by {o}, expires in {:.1} s", l.expires_in_secs),
                        (Some(o), false) => format!("expired {:.1} s ago (last held by {o})", -l.expires_in_secs),
                        (None, _) => "never held".to_owned(),
                    }
                );
            }
        }
        for h in &c.hubs {
            let role = match (c.leases.len(), h.active) {
                (1, true) => "  ACTIVE".to_owned(),
                (1, false) => "  standby".to_owned(),
                (_, _) if h.partitions.is_empty() => "  holds no partition".to_owned(),
                (_, _) => format!(
                    "  holds partitions {}",
                    h.partitions.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
                ),
            };
            println!(
                "hub            {} http {} quic {} internal {}  heard {:.1} s ago{role}",
                h.id,
                h.http_addr,
                h.quic_addr,
                h.internal_addr.as_deref().unwrap_or("-"),
                h.heartbeat_age_secs,
            );
        }
    }
    match (&url, &live) {
        (Some(u), Some(Ok(m))) => {
            println!("running hub    {u}: up");
            for (k, v) in m {
                println!("  {k:<40} {v}");
            }
        }
        (Some(u), Some(Err(e))) => println!("running hub    {u}: not reachable ({e})"),
        _ => println!("running hub    (give --url and --token for live figures)"),
    }
    Ok(())
}

/// The unlabelled figures of a running hub's `/metrics` (connections, rates, totals); with no
/// token only whether it answers `/healthz`.
async fn live_figures(url: &str, token: Option<&str>) -> Result<std::collections::BTreeMap<String, f64>, String> {
    let client =
        reqwest::Client::builder().timeout(std::time::Duration::from_secs(5)).build().map_err(|e| e.to_string())?;
    let base = url.trim_end_matches('/');
    let health = client.get(format!("{base}/healthz")).send().await.map_err(|e| e.to_string())?;
    if !health.status().is_success() {
        return Err(format!("/healthz answered {}", health.status()));
    }
    let Some(token) = token else { return Ok(Default::default()) };
    let text = client
        .get(format!("{base}/metrics"))
        .bearer_auth(token)
        .send()
        .await
        .map_err(|e| e.to_string())?
        .text()
        .await
        .map_err(|e| e.to_string())?;
    Ok(text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.contains('{'))
        .filter_map(|l| l.split_once(' ').and_then(|(k, v)| Some((k.to_owned(), v.trim().parse().ok()?))))
        .filter(|(k, _): &(String, f64)| !k.ends_with("_bucket") && !k.ends_with("_sum"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_argument_has_help() {
        Cli::command().debug_assert();
        let missing = shelfsync_node::clidocs::args_without_help(&Cli::command());
        assert!(missing.is_empty(), "arguments without help text: {missing:#?}");
    }
}
