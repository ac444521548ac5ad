//! Hubs on PostgreSQL, next to PostgreSQL itself, in one run on one durable server (fsync and
//! synchronous commit on):
//!
//! 1. the hot SKU: 64 clients each reserving 1 unit of one SKU through one hub, next to 64
//!    clients running the same check-and-decrement as a plain `UPDATE … WHERE qty >= 1`;
//! 2. distinct SKUs (a SKU per client) through 1, 2 and 3 hubs (clients spread over them; one
//!    hub decides, the others forward);
//! 3. the same distinct SKUs over 6 SKU partitions shared by 1, 2 and 3 hubs (each hub decides
//!    its share; a request about another hub's partition is forwarded to it);
//!    then, on 3 hubs, a partition's failover: `kill -9` of the hub deciding one SKU's
//!    partition, until a survivor answers a reservation of it 201 (warm standbys, then cold);
//! 4. failover: `kill -9` of the active hub, then the time until a reservation sent to a
//!    survivor is answered 201 (three times).
//!
//! Hubs run as release processes: `cargo build --release -p shelfsync-hub -p shelfsync-agent &&
//! cargo bench -p shelfsync-tests --bench postgres` (`SHELFSYNC_BENCH_QUICK=1`: 1 s rounds).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;
use shelfsync_tests::hubs::HubSet;
use uuid::Uuid;

#[path = "../src/bin/reserve-load/load.rs"]
#[allow(dead_code)]
mod load;

/// `clients` tasks reserving 1 unit each back to back for `secs`, client `c` on hub
/// `hubs[c % len]` and SKU `sku(c)`.
async fn round(
    set: &HubSet,
    hubs: &[usize],
    clients: usize,
    secs: u64,
    sku: impl Fn(usize) -> String,
) -> anyhow::Result<load::Round> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let lat = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let url = format!("{}/v1/reservations", set.http[hubs[c % hubs.len()]]);
        let (token, lat, sku) = (set.storefront.clone(), lat.clone(), sku(c));
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut mine = Vec::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                let r = http
                    .post(&url)
                    .bearer_auth(&token)
                    .json(&json!({"id": Uuid::now_v7(), "lines": [{"sku": sku, "qty": 1}]}))
                    .send()
                    .await?;
                let status = r.status();
                let body = r.bytes().await?;
                anyhow::ensure!(status == 201, "POST {url} answered {status}: {}", String::from_utf8_lossy(&body));
                mine.push(t.elapsed());
            }
            lat.lock().unwrap().extend(mine);
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let l = std::mem::take(&mut *lat.lock().unwrap());
    summarise(start.elapsed(), l)
}

fn summarise(elapsed: Duration, mut l: Vec<Duration>) -> anyhow::Result<load::Round> {
    anyhow::ensure!(!l.is_empty(), "nothing completed");
    l.sort();
    let pct = |p: f64| l[((l.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1e3;
    Ok(load::Round { rate: l.len() as f64 / elapsed.as_secs_f64(), p50_ms: pct(0.5), p99_ms: pct(0.99) })
}

/// The same check-and-decrement in plain SQL: `clients` connections, one `UPDATE` each at a time.
async fn plain_update(url: &str, clients: usize, secs: u64) -> anyhow::Result<load::Round> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let lat = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (url, lat) = (url.to_owned(), lat.clone());
        tasks.push(tokio::spawn(async move {
            let db = shelfsync_tests::pg::connect(&url).await;
            let stmt = db.prepare("UPDATE plain_stock SET qty = qty - 1 WHERE sku = 'HOT' AND qty >= 1").await?;
            let mut mine = Vec::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                anyhow::ensure!(db.execute(&stmt, &[]).await? == 1, "the plain stock ran dry");
                mine.push(t.elapsed());
            }
            lat.lock().unwrap().extend(mine);
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let l = std::mem::take(&mut *lat.lock().unwrap());
    summarise(start.elapsed(), l)
}

async fn restock(set: &HubSet, skus: &[String], qty: u64) -> anyhow::Result<()> {
    let lines: Vec<_> = skus.iter().map(|s| json!({"sku": s, "qty": qty})).collect();
    let body = json!({"id": Uuid::now_v7(), "store": set.stores[0], "lines": lines});
    let (status, v) = set.call(0, Method::POST, "/v1/restocks", &set.admin, Some(body)).await.expect("hub answers");
    anyhow::ensure!(status == 201, "restock: {status} {v}");
    Ok(())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let (clients, secs, rounds) = load::params();
    // SHELFSYNC_BENCH_PG_FAST=1: fsync and synchronous commit off (how much of the figure is the
    // disk's flush).
    let durable = std::env::var_os("SHELFSYNC_BENCH_PG_FAST").is_none();
    shelfsync_tests::pg::set_durable(durable);
    let mut set = HubSet::start(3, 1).await;
    let stock = (secs * 60_000).min(100_000);

    // 1. The hot SKU, through one hub, next to plain SQL.
    let active = set.active().await;
    let mut hub = Vec::new();
    let mut plain = Vec::new();
    let url = shelfsync_tests::pg::fresh_database().await;
    let db = shelfsync_tests::pg::connect(&url).await;
    db.batch_execute("CREATE TABLE plain_stock (sku TEXT PRIMARY KEY, qty BIGINT NOT NULL)").await?;
    for _ in 0..rounds {
        restock(&set, &["HOT".to_owned()], stock).await?;
        hub.push(round(&set, &[active], clients, secs, |_| "HOT".to_owned()).await?);
        db.execute(
            "INSERT INTO plain_stock VALUES ('HOT', 10000000) ON CONFLICT (sku) DO UPDATE SET qty = 10000000",
            &[],
        )
        .await?;
        plain.push(plain_update(&url, clients, secs).await?);
    }
    let mode = if durable { "fsync on, synchronous_commit on" } else { "fsync OFF, synchronous_commit OFF" };
    println!("hot SKU, one PostgreSQL server ({mode}), medians of {rounds} rounds of {secs} s:");
    println!("  {}", load::line("hub on pg", clients, &hub, "HTTP + JSON + auth, decider, one commit per batch"));
    println!("  {}", load::line("plain UPDATE", clients, &plain, "tokio-postgres, prepared, autocommit"));

    // 2. Distinct SKUs over 1, 2, 3 hubs.
    let skus: Vec<String> = (0..clients).map(|c| format!("D-{c:03}")).collect();
    println!("distinct SKUs (one per client), clients spread over the hubs:");
    for n in 1..=3usize {
        let hubs: Vec<usize> = std::iter::once(active).chain((0..3).filter(|h| *h != active)).take(n).collect();
        let mut done = Vec::new();
        for _ in 0..rounds {
            restock(&set, &skus, stock / clients as u64 + 1000).await?;
            let skus = skus.clone();
            done.push(round(&set, &hubs, clients, secs, move |c| skus[c].clone()).await?);
        }
        let note =
            if n == 1 { "the active hub".to_owned() } else { format!("the active hub and {} forwarding", n - 1) };
        println!("  {}", load::line(&format!("{n} hub(s)"), clients, &done, &note));
    }

    // 2b. The same over 6 SKU partitions, each hub deciding its share (a request about another
    // hub's partition forwarded to it over the internal API).
    println!("distinct SKUs (one per client) over 6 partitions, clients spread over the hubs:");
    for n in 1..=3usize {
        let parted = HubSet::start_with(n, 1, 6, Vec::new()).await;
        shelfsync_tests::procs::wait_until(
            "the hubs hold every partition",
            std::time::Duration::from_secs(60),
            || async {
                let held =
                    parted.sql_i64("SELECT COUNT(*) FROM leases WHERE owner IS NOT NULL AND expires_at > now()").await;
                let owners = parted
                    .sql_i64("SELECT COUNT(DISTINCT owner) FROM leases WHERE owner IS NOT NULL AND expires_at > now()")
                    .await;
                (held == 6 && owners == n as i64).then_some(())
            },
        )
        .await;
        let hubs: Vec<usize> = (0..n).collect();
        let mut done = Vec::new();
        for _ in 0..rounds {
            for sku in &skus {
                restock(&parted, std::slice::from_ref(sku), stock / clients as u64 + 1000).await?;
            }
            let skus = skus.clone();
            done.push(round(&parted, &hubs, clients, secs, move |c| skus[c].clone()).await?);
        }
        let note = format!("{n} hub(s) deciding 6 partitions between them");
        println!("  {}", load::line(&format!("{n} hub(s)"), clients, &done, &note));
        if n == 3 {
            // 3b. A partition's failover: kill -9 of the hub deciding a SKU's partition, with
            // warm standbys of every partition (the default), then with none.
            let mut parted = parted;
            let records = parted.sql_i64("SELECT (SELECT COUNT(*) FROM decisions) + (SELECT COUNT(*) FROM feed)").await;
            partition_failover(&mut parted, true, records).await?;
            parted.hub_env.push(("SHELFSYNC_HUB__STORAGE__WARM_STANDBY".into(), "false".into()));
            for i in 0..3 {
                if let Some(h) = parted.hubs[i].take() {
                    h.kill9().await;
                }
                parted.start_hub(i).await;
            }
            partition_failover(&mut parted, false, records).await?;
            parted.shutdown().await;
        } else {
            parted.shutdown().await;
        }
    }

    // 3. Failover: kill -9 the active hub, then reserve through a survivor until it answers 201;
    // with warm standbys (the default), then with cold ones (every hub restarted without).
    let records = set.sql_i64("SELECT (SELECT COUNT(*) FROM decisions) + (SELECT COUNT(*) FROM feed)").await;
    for warm in [true, false] {
        if !warm {
            set.hub_env.push(("SHELFSYNC_HUB__STORAGE__WARM_STANDBY".into(), "false".into()));
            for i in 0..3 {
                if let Some(h) = set.hubs[i].take() {
                    h.kill9().await;
                }
                set.start_hub(i).await;
            }
            // One of them takes the lease once the old one expires, and loads every record.
            let until = Instant::now() + Duration::from_secs(60);
            while let Err(e) = restock(&set, &["F".to_owned()], 1).await {
                anyhow::ensure!(Instant::now() < until, "no hub took over after the restart: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        failover(&mut set, warm, records).await?;
    }
    set.shutdown().await;
    Ok(())
}

/// Three `kill -9`s of the hub deciding SKU `F`'s partition (6 partitions over 3 hubs), each
/// timed to the first reservation of `F` a survivor answers 201.
async fn partition_failover(set: &mut HubSet, warm: bool, records: i64) -> anyhow::Result<()> {
    let part = shelfsync_hub_core::Partitions::new(6).map_err(anyhow::Error::msg)?.of(&"F".parse()?);
    let mut times = Vec::new();
    for _ in 0..3 {
        let until = Instant::now() + Duration::from_secs(60);
        while let Err(e) = restock(set, &["F".to_owned()], 1000).await {
            anyhow::ensure!(Instant::now() < until, "no hub decides F's partition: {e}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let owner = shelfsync_tests::procs::wait_until("F's partition decided", Duration::from_secs(60), || async {
            let addr = set
                .db_query_opt_string(
                    "SELECT h.http_addr FROM leases l JOIN hubs h ON h.id = l.owner
                     WHERE l.partition = $1 AND l.expires_at > now()",
                    i32::from(part),
                )
                .await?;
            set.http.iter().position(|u| !u.is_empty() && u.ends_with(&addr))
        })
        .await;
        times.push(kill_and_reserve(set, owner).await);
    }
    let (median, runs) = median_of(times);
    println!(
        "partition failover, {} standbys (6 partitions over 3 hubs; kill -9 of the hub deciding F's partition -> \
         first reservation of F answered 201 through a survivor, {records} decisions and feed events over all \
         partitions): median {:.2} s, runs {:?} s (lease {} s)",
        if warm { "warm" } else { "cold" },
        median,
        runs,
        shelfsync_hub::cluster::LEASE.as_secs(),
    );
    Ok(())
}

/// Three `kill -9`s of the active hub, each timed to the first reservation a survivor answers 201.
async fn failover(set: &mut HubSet, warm: bool, records: i64) -> anyhow::Result<()> {
    let mut times = Vec::new();
    for _ in 0..3 {
        restock(set, &["F".to_owned()], 1000).await?;
        let active = set.active().await;
        times.push(kill_and_reserve(set, active).await);
    }
    let (median, runs) = median_of(times);
    println!(
        "failover, {} standbys (kill -9 of the active hub → first reservation answered 201 through a survivor, \
         {records} decisions and feed events stored): median {:.2} s, runs {:?} s (lease {} s, renewed every {} ms)",
        if warm { "warm" } else { "cold" },
        median,
        runs,
        shelfsync_hub::cluster::LEASE.as_secs(),
        shelfsync_hub::cluster::TICK.as_millis()
    );
    Ok(())
}

/// `kill -9` of hub `victim`, then reservations of `F` through the next hub until one is
/// answered 201; the seconds that took. The victim is started again.
async fn kill_and_reserve(set: &mut HubSet, victim: usize) -> f64 {
    let survivor = (victim + 1) % set.hubs.len();
    set.hubs[victim].take().expect("the hub to kill running").kill9().await;
    let killed = Instant::now();
    let body = json!({"id": Uuid::now_v7(), "lines": [{"sku": "F", "qty": 1}]});
    loop {
        if let Some((201, _)) =
            set.call(survivor, Method::POST, "/v1/reservations", &set.storefront, Some(body.clone())).await
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = killed.elapsed().as_secs_f64();
    set.start_hub(victim).await;
    took
}

/// The median of three runs and the runs, sorted, to the hundredth.
fn median_of(mut times: Vec<f64>) -> (f64, Vec<f64>) {
    times.sort_by(|a, b| a.total_cmp(b));
    (times[times.len() / 2], times.iter().map(|t| (t * 100.0).round() / 100.0).collect())
}
