//! `shelfsync-agent`: the store agent's command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{CommandFactory, Parser, Subcommand};
use serde_json::{json, Value};
use shelfsync_agent::backup;
use shelfsync_agent::config::AgentConfig;
use shelfsync_agent::db::{Db, DbOptions};
use shelfsync_node::bundle::Bundle;
use shelfsync_node::clidocs::Shell;
use shelfsync_node::client::ApiClient;
use shelfsync_node::datadir::DataDirArgs;
use uuid::Uuid;

#[derive(Parser)]
#[command(
    name = "shelfsync-agent",
    version,
    about = "Shelfsync store agent: an offline-first stock ledger beside the point of sale"
)]
struct Cli {
    /// The running agent's API (for sell, return, count, adjust, stock, status).
    #[arg(long, global = true, env = "SHELFSYNC_AGENT_URL", default_value = "http://127.0.0.1:7070")]
    agent: String,
    /// Bearer token of the agent's API, if it requires one.
    #[arg(long, global = true, env = "SHELFSYNC_AGENT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print the server's raw JSON answer.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create the store's database (standalone with --store-id, or from a hub bundle).
    Init {
        /// The store id, e.g. store-012 (standalone: no hub).
        #[arg(long, required_unless_present = "bundle", conflicts_with = "bundle")]
        store_id: Option<String>,
        /// A credential bundle written by `shelfsync-hub store add`.
        #[arg(long)]
        bundle: Option<PathBuf>,
        #[command(flatten)]
        dir: DataDirArgs,
    },
    /// Run the agent: the POS API and the sync client.
    Run {
        /// TOML config file (see config/agent.toml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Overrides `data_dir`.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Overrides `api.listen`.
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Record a sale of QTY units.
    Sell {
        /// The SKU.
        sku: String,
        /// Units (positive).
        qty: i64,
        /// Idempotency key: any 1..128 printable ASCII characters, e.g. the receipt number
        /// (a new UUIDv7 if omitted).
        #[arg(long)]
        id: Option<String>,
    },
    /// Record a customer return of QTY units.
    Return {
        /// The SKU.
        sku: String,
        /// Units (positive).
        qty: i64,
        /// Idempotency key: any 1..128 printable ASCII characters, e.g. the receipt number
        /// (a new UUIDv7 if omitted).
        #[arg(long)]
        id: Option<String>,
    },
    /// Record a physical count of N units.
    Count {
        /// The SKU.
        sku: String,
        /// Units counted on the shelf.
        n: i64,
        /// When it was counted (RFC 3339; default now). Changes after this time apply on top.
        #[arg(long)]
        at: Option<String>,
        /// Idempotency key: any 1..128 printable ASCII characters, e.g. the receipt number
        /// (a new UUIDv7 if omitted).
        #[arg(long)]
        id: Option<String>,
    },
    /// Record an adjustment of DELTA units (negative for shrinkage).
    Adjust {
        /// The SKU.
        sku: String,
        /// Units to add (negative to take away).
        #[arg(allow_hyphen_values = true)]
        delta: i64,
        /// Reason code: damaged, theft, expired, lost, internal_use, returned_to_vendor,
        /// transit_loss, found, correction or other.
        #[arg(long)]
        reason: String,
        /// Free text (required with `other`).
        #[arg(long)]
        note: Option<String>,
        /// Idempotency key: any 1..128 printable ASCII characters, e.g. the receipt number
        /// (a new UUIDv7 if omitted).
        #[arg(long)]
        id: Option<String>,
    },
    /// Show stock of one SKU, or list all.
    Stock {
        /// One SKU (default: list all).
        sku: Option<String>,
        /// List from after this SKU.
        #[arg(long)]
        after: Option<String>,
        /// Page size.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Show the agent's identity, ledger and sync state (a summary; --json for machines).
    Status,
    /// Back up the whole data dir into one file: the database and the bundle (safe while the
    /// agent runs; the file is 0600).
    Backup {
        #[command(flatten)]
        dir: DataDirArgs,
        /// Destination file (must not exist).
        #[arg(long)]
        to: PathBuf,
    },
    /// Restore a backup into a new or empty data dir (checked in full first). The restored store
    /// records under a new writer incarnation at once, so nothing is counted twice.
    Restore {
        /// The backup file (made by `shelfsync-agent backup`).
        #[arg(long)]
        from: PathBuf,
        #[command(flatten)]
        dir: DataDirArgs,
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
}

fn main() -> ExitCode {
    shelfsync_node::cli::run_main(dispatch(Cli::parse()))
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let client = ApiClient::new(cli.agent.clone(), cli.token.clone());
    let id = |id: Option<String>| id.unwrap_or_else(|| Uuid::now_v7().to_string());
    let is_status = matches!(cli.cmd, Cmd::Status);
    let answer = match cli.cmd {
        Cmd::Init { store_id, bundle, dir } => return init(store_id, bundle, data_dir(&dir)?),
        Cmd::Run { config, data_dir, listen } => {
            let mut cfg = AgentConfig::load(config.as_deref())?;
            if let Some(d) = data_dir {
                cfg.data_dir = d;
            }
            if let Some(l) = listen {
                cfg.api.listen = l;
            }
            shelfsync_node::cli::init_tracing(&cfg.log.filter, cfg.log.format);
            let agent = shelfsync_agent::server::start(cfg).await?;
            // One machine-readable line, so scripts and tests learn the bound port.
            println!("shelfsync-agent listening on {}", agent.url());
            shelfsync_node::cli::shutdown_signal().await;
            tracing::info!("shutting down");
            agent.stop().await?;
            return Ok(());
        }
        Cmd::Backup { dir, to } => {
            let data_dir = data_dir(&dir)?;
            let (d, t) = (data_dir.clone(), to.clone());
            let writer = tokio::task::spawn_blocking(move || backup::backup(&d, &t)).await??;
            println!("backed up {} (writer {writer}) to {}", data_dir.display(), to.display());
            return Ok(());
        }
        Cmd::Restore { from, dir } => {
            let data_dir = data_dir(&dir)?;
            let (f, d) = (from.clone(), data_dir.clone());
            let r = tokio::task::spawn_blocking(move || backup::restore(&f, &d)).await??;
            println!(
                "restored {} (made {}) into {}; writer {} retired, the store records as {} from now on{}",
                from.display(),
                shelfsync_shared::rfc3339(r.created_at_ms),
                data_dir.display(),
                r.old,
                r.new,
                if r.bundle { "; it gives the hub what the backup holds and the hub lacks" } else { "" }
            );
            return Ok(());
        }
        Cmd::Completions { shell } => {
            shelfsync_node::clidocs::completions(Cli::command(), shell, &mut std::io::stdout());
            return Ok(());
        }
        Cmd::Man { out } => {
            for p in shelfsync_node::clidocs::man_pages(Cli::command(), &out)? {
                println!("{}", p.display());
            }
            return Ok(());
        }
        Cmd::Sell { sku, qty, id: i } => {
            client.post("/v1/sales", &json!({"id": id(i), "lines": [{"sku": sku, "qty": qty}]})).await?.1
        }
        Cmd::Return { sku, qty, id: i } => {
            client.post("/v1/returns", &json!({"id": id(i), "lines": [{"sku": sku, "qty": qty}]})).await?.1
        }
        Cmd::Count { sku, n, at, id: i } => {
            client.post("/v1/counts", &json!({"id": id(i), "sku": sku, "counted": n, "occurred_at": at})).await?.1
        }
        Cmd::Adjust { sku, delta, reason, note, id: i } => {
            let body = json!({"id": id(i), "sku": sku, "delta": delta, "reason": reason, "note": note});
            client.post("/v1/adjustments", &body).await?.1
        }
        Cmd::Stock { sku: Some(sku), .. } => client.get(&format!("/v1/stock/{sku}")).await?,
        Cmd::Stock { sku: None, after, limit } => {
            let mut path = format!("/v1/stock?limit={limit}");
            if let Some(a) = after {
                path.push_str(&format!("&after={a}"));
            }
            client.get(&path).await?
        }
        Cmd::Status => client.get("/v1/status").await?,
    };
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
    } else if is_status {
        print_status(&answer);
    } else {
        print_human(&answer);
    }
    Ok(())
}

/// The data dir of a verb: `--data-dir`, else the `data_dir` of `--config`.
fn data_dir(dir: &DataDirArgs) -> anyhow::Result<PathBuf> {
    Ok(dir.resolve(|c| AgentConfig::load(Some(c)).map(|cfg| cfg.data_dir))?)
}

/// `status` as a readable summary of `/v1/status`.
fn print_status(v: &Value) {
    let s = |v: &Value, k: &str| match v.get(k) {
        None | Some(Value::Null) => "-".to_owned(),
        Some(Value::String(x)) => x.clone(),
        Some(x) => x.to_string(),
    };
    let sync = v.get("sync").cloned().unwrap_or(Value::Null);
    println!("store          {}", s(v, "store"));
    println!("writer         {} (since {})", s(v, "writer"), s(v, "incarnation_started_at"));
    println!("ledger         {} SKUs, {} journal events", s(v, "skus"), s(v, "journal_events"));
    println!(
        "not yet synced {} counter changes, {} journal events (last sync {})",
        s(v, "unsynced_changes"),
        s(v, "unsynced_events"),
        s(v, "last_sync_at")
    );
    let state = s(&sync, "state");
    let hub = s(&sync, "hub_addr");
    match state.as_str() {
        "disabled" => println!("hub            none (standalone)"),
        "connected" => println!(
            "hub            {hub}: connected since {} ({})",
            s(&sync, "connected_since"),
            s(&sync, "hub_writer")
        ),
        _ => println!("hub            {hub}: {state} after {} attempts", s(&sync, "attempts")),
    }
    if let Some(e) = sync.get("last_error").and_then(Value::as_str) {
        println!("last error     {e}");
    }
}

fn print_human(v: &Value) {
    let s = |v: &Value, k: &str| v.get(k).map(|x| x.as_str().map(str::to_owned).unwrap_or_else(|| x.to_string()));
    if let Some(lines) = v.get("lines").and_then(Value::as_array) {
        for l in lines {
            let flags = l.get("flags").and_then(Value::as_array).filter(|f| !f.is_empty());
            println!(
                "{} {:>6}  on_hand {}  held {}  granted {}  sellable {}{}",
                s(l, "sku").unwrap_or_default(),
                s(l, "delta").unwrap_or_default(),
                s(l, "on_hand").unwrap_or_default(),
                s(l, "held").unwrap_or_default(),
                s(l, "granted").unwrap_or_default(),
                s(l, "sellable").unwrap_or_default(),
                flags.map(|f| format!("  flags {}", Value::Array(f.clone()))).unwrap_or_default(),
            );
        }
    } else if let Some(items) = v.get("items").and_then(Value::as_array) {
        println!(
            "{:<24} {:>10} {:>8} {:>8} {:>10} {:>10}",
            "SKU", "ON_HAND", "HELD", "GRANTED", "SELLABLE", "INCOMING"
        );
        for i in items {
            println!(
                "{:<24} {:>10} {:>8} {:>8} {:>10} {:>10}",
                s(i, "sku").unwrap_or_default(),
                s(i, "on_hand").unwrap_or_default(),
                s(i, "held").unwrap_or_default(),
                s(i, "granted").unwrap_or_default(),
                s(i, "sellable").unwrap_or_default(),
                s(i, "incoming").unwrap_or_default()
            );
        }
        if let Some(next) = v.get("next").and_then(Value::as_str) {
            println!("(more: --after {next})");
        }
    } else {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    }
}

fn init(store_id: Option<String>, bundle: Option<PathBuf>, data_dir: PathBuf) -> anyhow::Result<()> {
    let path = data_dir.join("agent.db");
    if path.exists() {
        bail!("an agent database already exists at {}", path.display());
    }
    let store = match (store_id, bundle) {
        (Some(s), None) => s.parse().with_context(|| format!("--store-id {s:?}"))?,
        (None, Some(b)) => {
            let bundle = Bundle::copy(&b, &data_dir.join("bundle"))?;
            println!(
                "bundle for store {} (hub {}) copied into {}",
                bundle.store_id,
                bundle.hub_addr,
                data_dir.display()
            );
            bundle.store_id
        }
        _ => bail!("give exactly one of --store-id or --bundle"),
    };
    let identity = Db::create(&path, &store, DbOptions::default())?;
    println!("initialised store {} (writer {}) in {}", identity.store, identity.writer, path.display());
    Ok(())
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
