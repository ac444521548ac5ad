//! `reserve-load URL LABEL [NOTE]`: the hot-SKU reservation load of `benches/reservations.rs`
//! against a server that is already running at URL (for `scripts/bench-reservations.sh`, which
//! points it at `limit-server`). The bearer token comes from `SHELFSYNC_BENCH_TOKEN`; clients,
//! seconds and rounds from `SHELFSYNC_BENCH_CLIENTS` / `_SECS` / `_ROUNDS` (64, 5, 3, as for the hub).
//! Prints one line, `LABEL  N clients  R reservations/s  p50 .. ms  p99 .. ms  (NOTE)`, medians of
//! the rounds. The server must have stock for every reservation: any answer but 201 fails the run.

mod load;

fn main() {
    // One line saying why, not a backtrace: a script shows it when the run fails.
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    if let Err(e) = rt.block_on(run()) {
        eprintln!("reserve-load: {e:#}");
        std::process::exit(1);
    }
}

async fn run() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: SHELFSYNC_BENCH_TOKEN=... reserve-load URL LABEL [NOTE]";
    let url = args.next().ok_or_else(|| anyhow::anyhow!(usage))?;
    let label = args.next().ok_or_else(|| anyhow::anyhow!(usage))?;
    let note = args.next().unwrap_or_default();
    let token = std::env::var("SHELFSYNC_BENCH_TOKEN")
        .map_err(|_| anyhow::anyhow!("SHELFSYNC_BENCH_TOKEN is not set; {usage}"))?;
    let (clients, secs, rounds) = load::params();
    let mut done = Vec::new();
    for _ in 0..rounds {
        done.push(load::round(url.trim_end_matches('/'), &token, clients, secs).await?);
    }
    println!("{}", load::line(&label, clients, &done, &note));
    Ok(())
}
