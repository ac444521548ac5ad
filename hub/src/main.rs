//! `shelfsync-hub`: headquarters' command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use shelfsync_hub::config::HubConfig;
use shelfsync_hub::storage::Role;
use shelfsync_hub::{admin, demo, server};
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
        #[arg(long)]
        data_dir: PathBuf,
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
        #[arg(long)]
        data_dir: Option<PathBuf>,
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
    /// Online backup of the hub database (safe while the hub runs).
    Backup {
        #[arg(long)]
        data_dir: PathBuf,
        /// Destination file (must not exist).
        #[arg(long)]
        to: PathBuf,
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
        id: String,
        /// Directory to write the bundle into.
        #[arg(long)]
        out: PathBuf,
        /// The address agents dial (host:port of the hub's QUIC endpoint).
        #[arg(long, default_value = "127.0.0.1:7443")]
        hub_addr: String,
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Revoke every certificate of a store; a running hub drops it within seconds.
    Revoke {
        id: String,
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// How many agents of a store may be connected at once (default 1: a second one is refused
    /// as a duplicate). Raise it for a store that runs several agents on purpose.
    Agents {
        id: String,
        /// 1 .. 64.
        max: u32,
        #[arg(long)]
        data_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum CatalogCmd {
    /// Import a CSV (sku,name,barcodes,safety_stock,low_stock_threshold,max_per_customer,active).
    /// All rows or none; a running hub picks the change up within a second.
    Import {
        file: PathBuf,
        #[arg(long)]
        data_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Create an API token; prints only the token (shown this once; the hub keeps its hash).
    Create {
        #[arg(long, value_enum)]
        role: Role,
        /// A name to tell tokens apart (default `unnamed`).
        #[arg(long)]
        name: Option<String>,
        /// Lifetime: a number and s, m, h or d (e.g. 30d, 12h, 90m). Default: no expiry.
        #[arg(long)]
        expires_in: Option<String>,
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// List tokens: id, name, role, status, created, last used, expiry, revocation (never secrets).
    List {
        /// JSON (one array) instead of a table.
        #[arg(long)]
        json: bool,
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Revoke a token by id; a running hub refuses it from its next request on.
    Revoke {
        id: String,
        #[arg(long)]
        data_dir: PathBuf,
    },
}

fn main() -> ExitCode {
    shelfsync_node::cli::run_main(dispatch(Cli::parse()))
}

fn store_id(s: &str) -> anyhow::Result<StoreId> {
    s.parse().map_err(|e| anyhow::anyhow!("store id {s:?}: {e}"))
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Init { data_dir } => {
            let writer = admin::init(&data_dir).await?;
            println!("initialised hub {writer} in {}", data_dir.display());
        }
        Cmd::Store { cmd: StoreCmd::Add { id, out, hub_addr, data_dir } } => {
            let store = store_id(&id)?;
            admin::add_store(&data_dir, &store, &out, &hub_addr).await?;
            println!("store {store} registered; bundle written to {}", out.display());
        }
        Cmd::Store { cmd: StoreCmd::Agents { id, max, data_dir } } => {
            let store = store_id(&id)?;
            admin::set_max_agents(&data_dir, &store, max).await?;
            println!("store {store} may have {max} agent(s) connected at once");
        }
        Cmd::Store { cmd: StoreCmd::Revoke { id, data_dir } } => {
            let store = store_id(&id)?;
            let n = admin::revoke_store(&data_dir, &store).await?;
            println!("store {store} revoked ({n} certificate(s))");
        }
        Cmd::Token { cmd: TokenCmd::Create { role, name, expires_in, data_dir } } => {
            let (_, secret) =
                admin::create_named_token(&data_dir, role, name.as_deref(), expires_in.as_deref()).await?;
            println!("{secret}");
        }
        Cmd::Token { cmd: TokenCmd::List { json, data_dir } } => {
            let now = shelfsync_node::now_ms();
            let views: Vec<_> = admin::list_tokens(&data_dir).await?.iter().map(|t| t.view(now)).collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&views)?);
            } else {
                print_tokens(&views);
            }
        }
        Cmd::Token { cmd: TokenCmd::Revoke { id, data_dir } } => {
            let t = admin::revoke_token(&data_dir, &id).await?;
            println!("token {} ({}) revoked", t.id, t.name);
        }
        Cmd::Serve { config, data_dir, quic_listen, http_listen } => {
            let mut cfg = HubConfig::load(config.as_deref())?;
            if let Some(d) = data_dir {
                cfg.data_dir = d;
            }
            if let Some(a) = quic_listen {
                cfg.quic.listen = a;
            }
            if let Some(a) = http_listen {
                cfg.http.listen = a;
            }
            shelfsync_node::cli::init_tracing(&cfg.log.filter, cfg.log.format);
            let hub = server::start(cfg).await?;
            // Machine-readable lines, so scripts and tests learn the bound ports.
            println!("shelfsync-hub quic on {}", hub.quic_addr);
            println!("shelfsync-hub listening on {}", hub.url());
            let fatal = tokio::select! {
                _ = shelfsync_node::cli::shutdown_signal() => None,
                reason = shelfsync_node::fatal::stopped() => Some(reason),
            };
            tracing::info!("shutting down");
            hub.stop().await;
            if let Some(reason) = fatal {
                anyhow::bail!("fail-stop: {reason}; restart the hub: it reloads what was committed");
            }
        }
        Cmd::Catalog { cmd: CatalogCmd::Import { file, data_dir } } => {
            let text = std::fs::read_to_string(&file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let n = admin::import_catalog(&data_dir, &text).await?;
            println!("imported {n} catalog entries from {}", file.display());
        }
        Cmd::Backup { data_dir, to } => {
            admin::backup(&data_dir, &to).await?;
            println!("backed up to {}", to.display());
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
        "{:<36}  {:<24}  {:<10}  {:<7}  {:<20}  {:<20}  {:<20}  {:<20}",
        "ID", "NAME", "ROLE", "STATUS", "CREATED", "LAST USED", "EXPIRES", "REVOKED"
    );
    for v in views {
        println!(
            "{:<36}  {:<24}  {:<10}  {:<7}  {:<20}  {:<20}  {:<20}  {:<20}",
            v.id,
            v.name,
            v.role.as_str(),
            v.status.as_str(),
            t(&Some(v.created_at.clone())),
            t(&v.last_used_at),
            t(&v.expires_at),
            t(&v.revoked_at)
        );
    }
}
