//! Several hubs on one PostgreSQL database, as real processes: the active hub killed in the middle
//! of a reservation burst, a paused hub fenced off, and the change feed read through a standby.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};
use shelfsync_tests::hubs::HubSet;
use shelfsync_tests::procs::wait_until;

const HOT: &str = "HOT-1";

/// Hub settings for the partitioned tests: a 1 s lease renewed every 200 ms, so takeovers
/// come within the tests' patience.
fn short_leases() -> Vec<(String, String)> {
    vec![
        ("SHELFSYNC_HUB__STORAGE__LEASE_MS".to_owned(), "1000".to_owned()),
        ("SHELFSYNC_HUB__STORAGE__LEASE_RENEW_MS".to_owned(), "200".to_owned()),
    ]
}
const DEADLINE: Duration = Duration::from_secs(60);

/// Reserves one unit under `key` through hub `first`, moving to the next hub while a hub does not
/// answer or answers 503 (a storefront retrying with the same key: never decided twice). The
/// final status.
async fn reserve(set: &HubSet, first: usize, key: &str, stop_at: Instant) -> Option<u16> {
    let body = json!({"id": key, "lines": [{"sku": HOT, "qty": 1}], "ttl_secs": 3600});
    let mut i = first;
    loop {
        match set.call(i, Method::POST, "/v1/reservations", &set.storefront, Some(body.clone())).await {
            Some((s, _)) if s != 503 => return Some(s),
            _ if Instant::now() > stop_at => return None,
            _ => {
                i = (i + 1) % set.http.len();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// 3 hubs, 6 stores; storefront clients on every hub; `kill -9` of the active hub in the middle of
/// a burst on one SKU while the stores keep selling it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_active_hub_mid_burst_loses_no_reservation_and_promises_no_unit_twice() {
    let set = HubSet::start(3, 6).await;
    let active = set.active().await;
    for s in 0..6 {
        let body = json!({"id": format!("stock-{s}"), "store": set.stores[s], "lines": [{"sku": HOT, "qty": 20}]});
        let (status, v) = set.call(s % 3, Method::POST, "/v1/restocks", &set.admin, Some(body)).await.unwrap();
        assert_eq!(status, 201, "{v}");
    }
    for s in 0..6 {
        wait_until("the restock at every store", DEADLINE, || async {
            (set.agent_on_hand(s, HOT).await == 20).then_some(())
        })
        .await;
    }

    // The burst: 12 storefront clients, 4 per hub, each reserving one unit at a time.
    let answered: Arc<Mutex<BTreeMap<String, u16>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let set = Arc::new(tokio::sync::RwLock::new(set));
    let mut clients = Vec::new();
    for c in 0..12usize {
        let (set, answered, stop) = (set.clone(), answered.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("order-{c}-{n}");
                n += 1;
                let stop_at = Instant::now() + Duration::from_secs(30);
                let status = reserve(&*set.read().await, c % 3, &key, stop_at).await;
                if let Some(s) = status {
                    answered.lock().unwrap().insert(key, s);
                }
            }
        }));
    }
    // The stores sell too, through the hub change.
    let mut sold = [0i64; 6];
    for round in 0..3 {
        for (s, n) in sold.iter_mut().enumerate() {
            if set.read().await.sell(s, HOT, 1).await == 201 {
                *n += 1;
            }
        }
        if round == 0 {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    // Kill the active hub mid-burst.
    let (old_epoch, expiry_in, read_at) = {
        let mut w = set.write().await;
        w.hubs[active].take().expect("active hub running").kill9().await;
        let (_, epoch, expiry_in) = w.lease().await;
        assert!(epoch >= 1);
        (epoch, expiry_in, Instant::now())
    };
    for _ in 0..3 {
        for (s, n) in sold.iter_mut().enumerate() {
            if set.read().await.sell(s, HOT, 1).await == 201 {
                *n += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let new_active = {
        let set = set.read().await;
        wait_until("a surviving hub to take the lease", DEADLINE, || async {
            let (owner, epoch, left) = set.lease().await;
            let owner = owner.filter(|_| epoch > old_epoch && left > 0.0)?;
            set.http.iter().position(|h| *h == owner)
        })
        .await
    };
    assert_ne!(new_active, active, "a surviving hub holds the lease");
    // Within the lease's expiry and a second (by the database's clock).
    let gap = set.read().await.takeover_gap(expiry_in, read_at).await;
    assert!(gap <= 1.0, "the takeover came {gap:.2} s after the dead hub's lease expired");
    // Keep the burst going on the survivors for a moment, then stop it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let set = Arc::try_unwrap(set).ok().expect("no client holds the set").into_inner();
    let answered = std::mem::take(&mut *answered.lock().unwrap());
    let created: Vec<&String> = answered.iter().filter(|(_, s)| **s == 201 || **s == 200).map(|(k, _)| k).collect();
    assert!(created.len() > 20, "the burst made reservations: {answered:?}");

    // Every reservation answered 201 is there, on every surviving hub.
    for key in &created {
        for h in (0..3).filter(|h| *h != active) {
            let (status, v) =
                set.call(h, Method::GET, &format!("/v1/reservations/{key}"), &set.admin, None).await.unwrap();
            assert_eq!(status, 200, "reservation {key} through hub {h}: {v}");
        }
    }

    // The stores' sales are counted exactly once, at the hub and at the stores (agents of the
    // dead hub failed over).
    let want: Vec<i64> = sold.iter().map(|n| 20 - n).collect();
    wait_until("the stores' counts at the hub", DEADLINE, || async {
        let (_, v) = set.call(new_active, Method::GET, &format!("/v1/availability/{HOT}"), &set.admin, None).await?;
        let got: Vec<i64> = set
            .stores
            .iter()
            .map(|id| {
                v["stores"]
                    .as_array()
                    .and_then(|a| a.iter().find(|x| x["store"] == json!(id)))
                    .map_or(i64::MIN, |x| x["on_hand"].as_i64().unwrap())
            })
            .collect();
        (got == want).then_some(())
    })
    .await;
    for (s, want) in want.iter().enumerate() {
        assert_eq!(set.agent_on_hand(s, HOT).await, *want, "store {s}'s own count");
    }

    // No unit promised twice: held ≤ on_hand at every store, or an open conflict says why.
    let (_, v) = set.call(new_active, Method::GET, &format!("/v1/availability/{HOT}"), &set.admin, None).await.unwrap();
    let (_, conflicts) =
        set.call(new_active, Method::GET, "/v1/conflicts?status=open&limit=500", &set.admin, None).await.unwrap();
    let conflicted: BTreeSet<String> = conflicts["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["sku"] == json!(HOT))
        .map(|c| c["store"].as_str().unwrap_or_default().to_owned())
        .collect();
    let mut held_total = 0;
    for st in v["stores"].as_array().unwrap() {
        let (held, on_hand) = (st["held"].as_i64().unwrap(), st["on_hand"].as_i64().unwrap());
        held_total += held;
        let store = st["store"].as_str().unwrap();
        assert!(
            held <= on_hand || conflicted.contains(store),
            "store {store}: held {held} > on_hand {on_hand}, no conflict"
        );
    }
    assert!(held_total > 0, "{v}");
    set.shutdown().await;
}

fn answered_now(n: &std::sync::atomic::AtomicUsize) -> usize {
    n.load(Ordering::Relaxed)
}

/// A hub paused past its lease (SIGSTOP) cannot write when it resumes (SIGCONT): the other hub
/// took over, the paused one's first commit is fenced off and it stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_hub_cannot_write_after_it_resumes() {
    let mut set = HubSet::start(2, 1).await;
    let a = set.active().await;
    let b = 1 - a;
    let body = |k: &str| json!({"id": k, "store": "store-0", "lines": [{"sku": "P-1", "qty": 5}]});
    let (s, v) = set.call(a, Method::POST, "/v1/restocks", &set.admin, Some(body("before"))).await.unwrap();
    assert_eq!(s, 201, "{v}");
    let (_, epoch_a, _) = set.lease().await;
    // Pause it while it commits: a steady stream of restocks (another SKU) keeps its writer in
    // transactions, so the pause usually lands inside one, holding the lease row's share lock.
    let load = {
        let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().unwrap();
        let mut tasks = tokio::task::JoinSet::new();
        for c in 0..8 {
            let (url, token, client, answered) =
                (set.http[a].clone(), set.admin.clone(), client.clone(), answered.clone());
            tasks.spawn(async move {
                for n in 0.. {
                    let body =
                        json!({"id": format!("load-{c}-{n}"), "store": "store-0", "lines": [{"sku": "L-1", "qty": 1}]});
                    let sent = client.post(format!("{url}/v1/restocks")).bearer_auth(&token).json(&body).send().await;
                    match sent {
                        Ok(r) if r.status() == 201 => answered.fetch_add(1, Ordering::Relaxed),
                        _ => return,
                    };
                }
            });
        }
        wait_until("restocks flowing", DEADLINE, || async { (answered.load(Ordering::Relaxed) >= 50).then_some(()) })
            .await;
        (tasks, answered)
    };
    // Pause it until the pause lands inside a commit past its fence check (its session idles in a
    // transaction holding the lease row's share lock), so the test checks that such a paused hub
    // cannot stall the takeover.
    let mid_commit = "SELECT COUNT(*) FROM pg_locks l JOIN pg_stat_activity s ON s.pid = l.pid \
                      WHERE s.state = 'idle in transaction' AND l.relation = 'leases'::regclass";
    let hub_a = set.hubs[a].as_ref().unwrap();
    let mut tries = 0;
    loop {
        hub_a.signal(libc::SIGSTOP);
        let settled = Instant::now() + Duration::from_millis(300);
        let mut caught = false;
        while Instant::now() < settled && !caught {
            caught = set.sql_i64(mid_commit).await > 0;
        }
        if caught {
            break;
        }
        tries += 1;
        assert!(tries < 200, "never paused the hub inside a commit");
        hub_a.signal(libc::SIGCONT);
        let resumed = answered_now(&load.1);
        wait_until("restocks flowing again", DEADLINE, || async {
            (answered_now(&load.1) > resumed + 5).then_some(())
        })
        .await;
    }
    load.0.join_all().await;
    // The other hub takes the lease over once it expires.
    wait_until("the standby to take over", DEADLINE, || async {
        let (owner, epoch, _) = set.lease().await;
        (epoch > epoch_a && owner.as_deref() == Some(set.http[b].as_str())).then_some(())
    })
    .await;
    let (s, v) = set.call(b, Method::POST, "/v1/restocks", &set.admin, Some(body("during"))).await.unwrap();
    assert_eq!(s, 201, "{v}");
    let decisions_before = set.sql_i64("SELECT COUNT(*) FROM decisions").await;

    // Resume the paused hub and ask it to decide at once: it still believes it is active.
    set.hubs[a].as_ref().unwrap().signal(libc::SIGCONT);
    let answer = set.call(a, Method::POST, "/v1/restocks", &set.admin, Some(body("after"))).await;
    assert!(!matches!(answer, Some((201, _)) | Some((200, _))), "the fenced hub decided: {answer:?}");
    let status = set.hubs[a].take().unwrap().exited(DEADLINE).await;
    assert!(!status.success(), "the fenced hub stops (fail-stop), it does not carry on");
    assert_eq!(
        set.sql_i64("SELECT COUNT(*) FROM decisions").await,
        decisions_before,
        "nothing was written by the fenced hub"
    );
    let (s, _) = set.call(b, Method::GET, "/v1/stores/store-0/stock", &set.admin, None).await.unwrap();
    assert_eq!(s, 200);
    let (_, v) = set.call(b, Method::GET, "/v1/availability/P-1", &set.admin, None).await.unwrap();
    assert_eq!(v["on_hand"], json!(10), "the restocks before and during the pause, not the fenced one: {v}");
    set.shutdown().await;
}

/// An SSE client on a standby hub gets every event decided on the active hub (and on the
/// standby, forwarded), each once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_decided_on_one_hub_reach_a_client_of_another_once_in_order() {
    let set = HubSet::start(2, 1).await;
    let active = set.active().await;
    let standby = 1 - active;
    let mut resp = reqwest::Client::new()
        .get(format!("{}/v1/events?after=0", set.http[standby]))
        .bearer_auth(&set.storefront)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    for n in 0..10 {
        let via = if n % 2 == 0 { active } else { standby };
        let body = json!({"id": format!("r-{n}"), "store": "store-0", "lines": [{"sku": format!("S-{n}"), "qty": 1}]});
        let (s, v) = set.call(via, Method::POST, "/v1/restocks", &set.admin, Some(body)).await.unwrap();
        assert_eq!(s, 201, "{v}");
    }
    let (_, feed) = set.call(active, Method::GET, "/v1/changes?after=0&limit=1000", &set.admin, None).await.unwrap();
    let want: Vec<u64> = feed["items"].as_array().unwrap().iter().map(|e| e["cursor"].as_u64().unwrap()).collect();
    assert!(want.len() >= 10, "{feed}");
    let mut text = String::new();
    let mut got: Vec<u64> = Vec::new();
    tokio::time::timeout(DEADLINE, async {
        while got.len() < want.len() {
            let chunk = resp.chunk().await.expect("stream chunk").expect("stream open");
            text.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = text.find("\n\n") {
                let event: String = text.drain(..end + 2).collect();
                if let Some(id) = event.lines().find_map(|l| l.strip_prefix("id:")) {
                    got.push(id.trim().parse().unwrap());
                }
            }
        }
    })
    .await
    .expect("every event within the deadline");
    assert_eq!(got, want, "each event once, in order");
    let kinds: Vec<Value> = feed["items"].as_array().unwrap().iter().map(|e| e["kind"].clone()).collect();
    assert!(kinds.contains(&json!("availability_changed")), "{kinds:?}");

    // Each hub answers its own liveness, with its role.
    for (i, role) in [(active, "active"), (standby, "standby")] {
        let (s, v) = set.call(i, Method::GET, "/healthz", "", None).await.unwrap();
        assert_eq!((s, v["status"].clone(), v["role"].clone()), (200, json!("ok"), json!(role)), "{v}");
    }
    // The standby says whether it is warm: its decider follows the active hub's commits.
    let decided = feed["items"].as_array().unwrap().len() as u64;
    wait_until("the standby warm with what was decided", DEADLINE, || async {
        let (_, v) = set.call(standby, Method::GET, "/healthz", "", None).await.unwrap();
        (v["warm"] == json!(true) && v["warm_records"].as_u64().unwrap_or(0) >= decided).then_some(())
    })
    .await;

    // Head office sees who decides: `status` lists both hubs, the active one marked, and the
    // active hub's metrics carry its lease epoch.
    let dir = set.dir.path().join("hub-0");
    let status =
        shelfsync_tests::procs::Proc::run_ok("shelfsync-hub", &["status", "--data-dir", dir.to_str().unwrap()]).await;
    let active_addr = set.http[active].trim_start_matches("http://");
    let hub_lines: Vec<&str> = status.lines().filter(|l| l.starts_with("hub            ")).collect();
    assert_eq!(hub_lines.len(), 2, "{status}");
    assert!(hub_lines.iter().any(|l| l.contains(active_addr) && l.ends_with("ACTIVE")), "{status}");
    assert!(status.contains("lease          epoch 1, expires in"), "{status}");
    let metrics = reqwest::Client::new()
        .get(format!("{}/metrics", set.http[standby]))
        .bearer_auth(&set.admin)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let accepted: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("shelfsync_hub_http_connections_accepted"))
        .and_then(|rest| rest.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(accepted > 0.0, "the active hub's metrics count its HTTP connections: {accepted}");
    assert!(
        metrics.lines().any(|l| l == "shelfsync_hub_lease_epoch 1"),
        "the active hub's /metrics, through the standby"
    );
    set.shutdown().await;
}

/// A standby forwards over the hubs' internal API: one HTTP/2 connection carries a burst of
/// forwarded requests (the active hub's public listener sees none of them, so its per-address
/// caps never count them), and that port takes only hubs: a hub's certificate gets through to
/// the API (which still wants the caller's token), a store's certificate from the same CA and
/// a client without one are turned away.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_standby_forwards_over_one_connection_that_only_hubs_may_open() {
    let set = HubSet::start(2, 1).await;
    let active = set.active().await;
    let standby = 1 - active;
    let accepted = |i: usize| {
        let url = format!("{}/metrics", set.http[i]);
        let token = set.admin.clone();
        async move {
            let text = reqwest::Client::new().get(url).bearer_auth(token).send().await.unwrap().text().await.unwrap();
            text.lines()
                .find_map(|l| l.strip_prefix("shelfsync_hub_http_connections_accepted_total "))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or_else(|| panic!("no connections_accepted in {text}"))
        }
    };
    let before = accepted(active).await;
    let client = reqwest::Client::new();
    let mut burst = tokio::task::JoinSet::new();
    for n in 0..40 {
        let req = client
            .post(format!("{}/v1/restocks", set.http[standby]))
            .bearer_auth(&set.admin)
            .json(&json!({"id": format!("burst-{n}"), "store": "store-0", "lines": [{"sku": "B", "qty": 1}]}));
        burst.spawn(async move { req.send().await.map(|r| r.status().as_u16()) });
    }
    while let Some(r) = burst.join_next().await {
        assert_eq!(r.unwrap().unwrap(), 201, "every forwarded restock decided");
    }
    let after = accepted(active).await;
    assert!(
        after - before <= 1.0,
        "40 forwarded requests opened {} public connections at the active hub (only this probe's should count)",
        after - before - 1.0
    );

    // Who may open the internal port.
    let db = shelfsync_tests::pg::connect(&set.database_url).await;
    let addr: String = db
        .query_one("SELECT h.internal_addr FROM leases l JOIN hubs h ON h.id = l.owner WHERE l.partition = 0", &[])
        .await
        .unwrap()
        .get(0);
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    let pki = shelfsync_hub::pki::Pki::load(&set.dir.path().join("hub-0").join("pki")).unwrap();
    let hub = shelfsync_hub::internal::client(&pki.peer_credentials().unwrap()).unwrap();
    let url = format!("https://{addr}/v1/stores");
    assert_eq!(hub.get(&url).send().await.unwrap().status(), 401, "a hub gets through; the API wants a token");
    assert_eq!(hub.get(&url).bearer_auth(&set.admin).send().await.unwrap().status(), 200);
    let store_cert = pki.issue_store(&"store-0".parse().unwrap()).unwrap();
    let as_store = |with_cert: bool| {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(rustls::pki_types::CertificateDer::from_pem_slice(pki.ca_cert_pem().as_bytes()).unwrap()).unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots);
        let mut tls = if with_cert {
            builder
                .with_client_auth_cert(
                    vec![rustls::pki_types::CertificateDer::from_pem_slice(store_cert.cert_pem.as_bytes()).unwrap()],
                    rustls::pki_types::PrivateKeyDer::from_pem_slice(store_cert.key_pem.as_bytes()).unwrap(),
                )
                .unwrap()
        } else {
            builder.with_no_client_auth()
        };
        tls.alpn_protocols = vec![b"h2".to_vec()];
        reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .http2_prior_knowledge()
            .resolve(shelfsync_hub::pki::HUB_PEER_NAME, addr)
            .build()
            .unwrap()
    };
    let named = format!("https://{}:{}/v1/stores", shelfsync_hub::pki::HUB_PEER_NAME, addr.port());
    for (with_cert, who) in [(true, "a store's certificate"), (false, "no certificate")] {
        let r = as_store(with_cert).get(&named).bearer_auth(&set.admin).send().await;
        assert!(r.is_err(), "{who} on the internal port: {r:?}");
    }
    set.shutdown().await;
}

/// The fence itself, below the processes: a commit made under an epoch the lease has moved past
/// writes nothing and fails; under the current epoch it is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_under_a_stale_epoch_writes_nothing() {
    use shelfsync_hub::cluster::Fence;
    use shelfsync_hub::db::{Commit, HubDb, Target};
    let url = shelfsync_tests::pg::fresh_database().await;
    let target = Target::Postgres(url.clone());
    HubDb::create(&target, shelfsync_hub_core::Partitions::ONE).await.unwrap();
    let db = shelfsync_tests::pg::connect(&url).await;
    db.execute("UPDATE leases SET epoch = 7, owner = 'me', expires_at = now() + interval '1 minute'", &[])
        .await
        .unwrap();
    let commit = |db: &HubDb, n: u64| {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let records = vec![shelfsync_hub_core::Record::IdCounter(n)];
        db.committer().submit(Commit { records, side: Vec::new() }, Box::new(move |r| tx.send(r).unwrap())).unwrap();
        rx
    };
    let id_counter = || async {
        db.query_opt("SELECT value FROM meta WHERE key = 'id_counter'", &[])
            .await
            .unwrap()
            .map(|r| r.get::<_, String>(0))
    };
    let opts = shelfsync_hub::sqlite::SqliteOptions::default();
    let current = HubDb::open_fenced(&target, opts, None, Some(Fence::at(7))).await.unwrap().storage;
    commit(&current, 11).await.unwrap().expect("the lease's own epoch commits");
    assert_eq!(id_counter().await.as_deref(), Some("11"));
    let stale = HubDb::open_fenced(&target, opts, None, Some(Fence::at(6))).await.unwrap().storage;
    let err = commit(&stale, 12).await.unwrap().expect_err("a stale epoch is fenced off");
    assert!(err.contains("fenced"), "{err}");
    assert_eq!(id_counter().await.as_deref(), Some("11"), "nothing of the fenced batch was written");
}

/// `init` against a database that holds a hub already refuses, names it, and leaves nothing
/// half-made; `status` says where the data is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_refuses_a_database_that_holds_a_hub() {
    use shelfsync_tests::procs::Proc;
    let url = shelfsync_tests::pg::fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    let (first, second) = (dir.path().join("first"), dir.path().join("second"));
    Proc::run_ok("shelfsync-hub", &["init", "--data-dir", first.to_str().unwrap(), "--database-url", &url]).await;
    let out = Proc::output_env(
        "shelfsync-hub",
        &["init", "--data-dir", second.to_str().unwrap(), "--database-url", &url],
        &[],
    )
    .await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("a hub database already exists at postgres://"), "{err}");
    assert!(!second.exists(), "nothing of the refused init stays behind");
    let status = Proc::run_ok("shelfsync-hub", &["status", "--data-dir", first.to_str().unwrap()]).await;
    assert!(status.contains("database       postgres postgres://shelfsync@127.0.0.1:"), "{status}");
}

/// `init --partitions` fixes the partition count: `status` lists one lease per partition;
/// SQLite and counts out of range are refused before anything is made; and a hub refuses to
/// serve several partitions (not built yet) rather than serve them wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_fixes_the_partitions_and_status_lists_their_leases() {
    use shelfsync_tests::procs::Proc;
    let url = shelfsync_tests::pg::fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("hub");
    let d = data.to_str().unwrap();
    let refused = |args: Vec<String>, needle: &'static str| async move {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = Proc::output_env("shelfsync-hub", &args, &[]).await;
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(err.contains(needle), "{args:?}: {err}");
    };
    let sqlite = dir.path().join("sqlite");
    refused(
        vec!["init".into(), "--data-dir".into(), sqlite.display().to_string(), "--partitions".into(), "2".into()],
        "2 partitions need PostgreSQL storage",
    )
    .await;
    assert!(!sqlite.exists(), "nothing of the refused init stays behind");
    refused(
        vec![
            "init".into(),
            "--data-dir".into(),
            d.into(),
            "--database-url".into(),
            url.clone(),
            "--partitions".into(),
            "0".into(),
        ],
        "--partitions: a partition count must be between 1 and 256, not 0",
    )
    .await;
    Proc::run_ok("shelfsync-hub", &["init", "--data-dir", d, "--database-url", &url, "--partitions", "6"]).await;
    let status = Proc::run_ok("shelfsync-hub", &["status", "--data-dir", d]).await;
    let lines: Vec<&str> = status.lines().filter(|l| l.starts_with("partition ")).collect();
    assert_eq!(lines.len(), 6, "{status}");
    for (p, l) in lines.iter().enumerate() {
        assert!(l.starts_with(&format!("partition {p:<4} epoch 0, never held")), "{status}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&Proc::run_ok("shelfsync-hub", &["status", "--data-dir", d, "--json"]).await).unwrap();
    let parts: Vec<i64> =
        json["cluster"]["leases"].as_array().unwrap().iter().map(|l| l["partition"].as_i64().unwrap()).collect();
    assert_eq!(parts, (0..6).collect::<Vec<i64>>(), "{json}");
}

/// Three hubs on a database of 6 partitions share them 2/2/2, each partition's decider applying
/// the sync plane's merges of its SKUs whichever hub merged them; when one hub is killed the
/// two others take its partitions over (3/3) once their leases expire and apply what was merged
/// meanwhile; nothing merged is left unapplied. The API says plainly what is not built yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hubs_share_the_partitions_and_take_over_a_dead_hubs_share() {
    use shelfsync_hub::syncplane::{AgentDelta, SyncPlane};
    use shelfsync_hub_core::Partitions;
    use shelfsync_shared::id::{Incarnation, NodeId};
    use shelfsync_shared::{PnEntry, WriterId};
    let env = short_leases();
    let mut set = HubSet::start_with(3, 1, 6, env).await;
    let url = set.database_url.clone();
    let db = shelfsync_tests::pg::connect(&url).await;
    let shares = || async {
        let rows = db
            .query(
                "SELECT owner, COUNT(*) FROM leases WHERE expires_at > now() AND owner IS NOT NULL GROUP BY owner",
                &[],
            )
            .await
            .unwrap();
        let mut counts: Vec<i64> = rows.iter().map(|r| r.get(1)).collect();
        counts.sort();
        counts
    };
    wait_until("the hubs hold 2 partitions each", DEADLINE, || async { (shares().await == [2, 2, 2]).then_some(()) })
        .await;
    let http = reqwest::Client::new();
    let health = |u: String| {
        let http = http.clone();
        async move { http.get(format!("{u}/healthz")).send().await.unwrap().json::<serde_json::Value>().await.unwrap() }
    };
    for h in set.hubs.iter().flatten() {
        let v = health(h.url.clone()).await;
        assert_eq!(
            (v["role"].as_str(), v["partitions"].as_array().map(Vec::len)),
            (Some("partitioned"), Some(2)),
            "{v}"
        );
        let r = http.get(format!("{}/v1/nothing-here", h.url)).send().await.unwrap();
        assert_eq!(r.status(), 404, "what no route serves is a partition API's 404");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["error"], "not_found", "{v}");
        let r = http.get(format!("{}/v1/availability/A", h.url)).send().await.unwrap();
        assert_eq!(r.status(), 401, "one SKU's request reaches its partition's API, which wants a token");
    }

    // An agent's deltas, merged by "any hub" (here the test itself, through the sync plane).
    let parts = Partitions::new(6).unwrap();
    let store: shelfsync_shared::StoreId = "store-0".parse().unwrap();
    let agent = WriterId::new(NodeId::Store(store.clone()), Incarnation::from_u64(1));
    let mut plane = SyncPlane::connect(&url).await.unwrap();
    let mut upto = 0;
    let mut merge = async |round: u64| {
        upto += 1;
        let entries = (0..24)
            .map(|i| (format!("SKU-{i:02}").parse().unwrap(), agent.clone(), PnEntry { p: 0, n: round }))
            .collect();
        let d = AgentDelta {
            store: store.clone(),
            peer: agent.clone(),
            entries,
            fulfilled: Vec::new(),
            rights: Vec::new(),
            upto,
            lineage_base: None,
            lineage: None,
            pusher_boots: Vec::new(),
            at_ms: shelfsync_node::now_ms(),
        };
        let merged = plane.merge(parts, d).await.unwrap();
        assert_eq!(merged.parts.len(), 6, "24 SKUs touch every partition");
    };
    let drained = || async {
        let left: i64 = db.query_one("SELECT COUNT(*) FROM merge_log", &[]).await.unwrap().get(0);
        (left == 0).then_some(())
    };
    merge(1).await;
    wait_until("every partition's decider applied its merges", DEADLINE, drained).await;

    // Kill one hub: its two partitions go to the others once their leases expire.
    let leases = || async {
        db.query("SELECT partition, owner, epoch FROM leases ORDER BY partition", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get::<_, i32>(0), (r.get::<_, String>(1), r.get::<_, i64>(2))))
            .collect::<BTreeMap<i32, (String, i64)>>()
    };
    let before = leases().await;
    let victim = set.hubs[1].take().unwrap();
    let victim_id = health(victim.url.clone()).await["hub"].as_str().unwrap().to_owned();
    victim.kill9().await;
    merge(2).await;
    wait_until("the survivors hold 3 partitions each", DEADLINE, || async { (shares().await == [3, 3]).then_some(()) })
        .await;
    wait_until("the merges made while the partitions changed hands applied", DEADLINE, drained).await;
    merge(3).await;
    wait_until("and what comes after", DEADLINE, drained).await;
    let after = leases().await;
    for (p, (owner, epoch)) in &before {
        let (now_owner, now_epoch) = &after[p];
        if *owner == victim_id {
            assert_eq!((now_owner != owner, *now_epoch), (true, epoch + 1), "partition {p} taken over once");
        } else {
            assert_eq!((now_owner, now_epoch), (owner, epoch), "partition {p} stayed where it was");
        }
    }
    set.shutdown().await;
}

/// A warm standby (loaded once, then following the record log) rebuilds exactly the decider a
/// cold start loads from the tables, after every kind of decision; one that fell behind the
/// trimmed log loads the tables instead, and gets the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_warm_standby_rebuilds_the_decider_a_cold_start_loads() {
    use shelfsync_hub::db::{HubDb, Load, Target};
    use shelfsync_hub::engine::EngineOptions;
    use shelfsync_hub::standby::Follower;
    use shelfsync_hub_core::{Decider, Loader};
    let mut set = HubSet::start(1, 2).await;
    let opts = EngineOptions::default();
    let following = Follower::start(set.database_url.clone(), opts);
    let fell_behind = Follower::start(set.database_url.clone(), opts);
    let misled = Follower::start(set.database_url.clone(), opts);
    wait_until("the standbys warm", DEADLINE, || async {
        (following.cursor().is_some() && fell_behind.cursor().is_some() && misled.cursor().is_some()).then_some(())
    })
    .await;

    let admin = set.admin.clone();
    let ok = |expect: u16, (s, v): (u16, Value)| assert_eq!(s, expect, "{v}");
    let call = |method: Method, path: String, body: Option<Value>| {
        let set = &set;
        let token = if path.starts_with("/v1/reservations") { set.storefront.clone() } else { admin.clone() };
        async move { set.call(0, method, &path, &token, body).await.unwrap() }
    };
    ok(
        200,
        call(Method::PUT, "/v1/catalog/W-1".into(), Some(json!({"name": "Warm mug", "low_stock_threshold": 2}))).await,
    );
    for (store, qty) in [("store-0", 12), ("store-1", 6)] {
        let body = json!({"id": format!("stock-{store}"), "store": store, "lines": [{"sku": "W-1", "qty": qty}]});
        ok(201, call(Method::POST, "/v1/restocks".into(), Some(body)).await);
    }
    let mut ids = Vec::new();
    for n in 0..6 {
        let body =
            json!({"id": format!("w-{n}"), "lines": [{"sku": "W-1", "qty": 1}], "customer": format!("c-{}", n % 2)});
        let (s, v) = call(Method::POST, "/v1/reservations".into(), Some(body)).await;
        assert_eq!(s, 201, "{v}");
        ids.push(v["id"].as_str().unwrap().to_owned());
    }
    ok(200, call(Method::POST, format!("/v1/reservations/{}/commit", ids[0]), None).await);
    ok(200, call(Method::DELETE, format!("/v1/reservations/{}", ids[1]), None).await);
    let stop_early = fell_behind.stop().await.expect("the second standby was warm");
    let transfer =
        json!({"id": uuid::Uuid::now_v7(), "from": "store-0", "to": "store-1", "lines": [{"sku": "W-1", "qty": 2}]});
    ok(201, call(Method::POST, "/v1/transfers".into(), Some(transfer)).await);
    let adj = json!({"id": "fix-1", "sku": "W-1", "delta": -1, "reason": "damaged"});
    ok(201, call(Method::POST, "/v1/stores/store-0/adjustments".into(), Some(adj)).await);
    assert_eq!(set.sell(1, "W-1", 2).await, 201);
    wait_until("the store's sale at the hub", DEADLINE, || async {
        let (_, v) = call(Method::GET, "/v1/stores/store-1/stock".into(), None).await;
        let sold = v["items"]
            .as_array()
            .and_then(|items| items.iter().find(|i| i["sku"] == "W-1").map(|i| i["on_hand"].as_i64() == Some(4)));
        (sold == Some(true)).then_some(())
    })
    .await;

    // Stop the hub (nothing more is committed), let the first standby catch up, then compare.
    set.hubs[0].take().unwrap().kill9().await;
    let head = set.sql_i64("SELECT COALESCE(MAX(seq), 0) FROM record_log").await;
    wait_until("the standbys at the log's end", DEADLINE, || async {
        (following.cursor() >= Some(head) && misled.cursor() >= Some(head)).then_some(())
    })
    .await;
    let warm = following.stop().await.expect("the standby was warm");
    let misled = misled.stop().await.expect("the third standby was warm");
    assert!(warm.records() > 0);
    let target = Target::Postgres(set.database_url.clone());
    let sql = shelfsync_hub::sqlite::SqliteOptions::default();
    let finish = |opened: shelfsync_hub::db::Opened| -> Decider {
        let writer = opened.storage.hub_writer();
        let mut l = opened.loader.unwrap_or_else(|| Loader::new(opts.decider_config(writer), 1));
        l.load(opened.records).unwrap();
        l.finish()
    };
    let opened = HubDb::open_fenced(&target, sql, Load::Warm(Box::new(warm)), None).await.unwrap();
    assert!(opened.loader.is_some(), "taken over warm");
    let warm = finish(opened);
    let cold = finish(HubDb::open_fenced(&target, sql, Some(opts.feed_retain), None).await.unwrap());
    assert!(cold.snapshot().reservations.len() >= 6);
    assert_eq!(warm.snapshot(), cold.snapshot(), "warm and cold load the same decider");

    // The log trimmed past where the other standby stopped: it loads the tables.
    set.sql_i64("UPDATE record_log_floor SET floor = (SELECT MAX(seq) FROM record_log) RETURNING floor").await;
    let opened = HubDb::open_fenced(&target, sql, Load::Warm(Box::new(stop_early)), None).await.unwrap();
    assert!(opened.loader.is_none(), "fell behind: loaded cold");
    assert_eq!(finish(opened).snapshot(), cold.snapshot());

    // A commit that did not go through the record log (a hub of an older version, say): the
    // warm decider's heads differ from the database's, so it is not trusted.
    set.sql_i64(
        "INSERT INTO feed (cursor, kind, at_ms, body)
         SELECT cursor + 1, kind, at_ms, body FROM feed ORDER BY cursor DESC LIMIT 1 RETURNING cursor",
    )
    .await;
    let cold = finish(HubDb::open_fenced(&target, sql, Some(opts.feed_retain), None).await.unwrap());
    let opened = HubDb::open_fenced(&target, sql, Load::Warm(Box::new(misled)), None).await.unwrap();
    assert!(opened.loader.is_none(), "a warm decider that missed a commit is not used");
    assert_eq!(finish(opened).snapshot(), cold.snapshot());
    set.shutdown().await;
}

/// A hub reaches PostgreSQL over TLS, verified against the CA the URL names (`sslrootcert`),
/// and refuses what it cannot verify: a role the server lets in over TLS only is turned away in
/// plain text, accepted over TLS, and the hub's sessions show as encrypted on the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_reaches_postgres_over_verified_tls_only_when_asked_and_verifiable() {
    use shelfsync_tests::pg;
    use shelfsync_tests::procs::Proc;
    pg::tls_only_role().await;
    let plain_url = pg::fresh_database().await;
    let server = pg::server().await;
    let database = plain_url.rsplit('/').next().unwrap();
    let base = server.tls_user_url(database);
    let dir = tempfile::tempdir().unwrap();
    let init = |name: &str, url: String| {
        let data = dir.path().join(name);
        async move {
            let out = Proc::output_env(
                "shelfsync-hub",
                &["init", "--data-dir", data.to_str().unwrap(), "--database-url", &url],
                &[],
            )
            .await;
            (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned(), data)
        }
    };

    let (ok, err, _) = init("plain", base.clone()).await;
    assert!(!ok && err.contains("no encryption"), "plain text is turned away by the server: {err}");
    let (ok, err, _) = init("unverifiable", format!("{base}?sslmode=verify-full")).await;
    assert!(!ok && err.contains("needs sslrootcert"), "{err}");
    let other_ca = dir.path().join("other-ca.pem");
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    std::fs::write(&other_ca, params.self_signed(&key).unwrap().pem()).unwrap();
    let (ok, err, _) = init("wrong-ca", format!("{base}?sslmode=require&sslrootcert={}", other_ca.display())).await;
    assert!(!ok && err.contains("certificate"), "a server the CA did not sign is refused: {err}");

    let url = format!("{base}?sslmode=verify-full&sslrootcert={}", server.ca_file().display());
    let (ok, err, data) = init("tls", url).await;
    assert!(ok, "{err}");
    let d = data.to_str().unwrap();
    let token = Proc::run_ok("shelfsync-hub", &["token", "create", "--role", "admin", "--data-dir", d]).await;
    let hub = Proc::start(
        "shelfsync-hub",
        &["serve", "--data-dir", d, "--quic-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"],
        &[],
    )
    .await;
    let body = json!({"id": "tls-1", "store": "store-0", "lines": [{"sku": "T-1", "qty": 3}]});
    let client = reqwest::Client::new();
    Proc::run_ok(
        "shelfsync-hub",
        &["store", "add", "store-0", "--out", dir.path().join("b").to_str().unwrap(), "--data-dir", d],
    )
    .await;
    let r = client.post(format!("{}/v1/restocks", hub.url)).bearer_auth(token.trim()).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let admin = pg::connect(&plain_url).await;
    let encrypted: i64 = admin
        .query_one(
            "SELECT COUNT(*) FROM pg_stat_activity a JOIN pg_stat_ssl s ON s.pid = a.pid
             WHERE a.usename = $1 AND a.datname = current_database() AND s.ssl",
            &[&pg::TLS_USER],
        )
        .await
        .unwrap()
        .get(0);
    assert!(encrypted > 0, "the hub's sessions are encrypted");
    hub.kill9().await;
}

/// Reservations on a partitioned chain, through any hub: 3 hubs on 6 partitions, storefront
/// clients on every hub reserving the hot SKU (forwarded to the hub deciding its partition over
/// the internal API), and `kill -9` of that hub mid-burst. Every reservation answered 201 is
/// still there afterwards, through any survivor; no unit is promised twice (held counts every
/// answered reservation and at most one undetermined per client, within on_hand); a survivor
/// decides the partition within a lease and a second; the other partitions keep answering
/// meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partitions_hub_dies_mid_burst_and_no_answered_reservation_is_lost() {
    use shelfsync_hub_core::Partitions;
    let env = short_leases();
    let mut set = HubSet::start_with(3, 6, 6, env).await;
    let (url, urls) = (set.database_url.clone(), set.http.clone());
    let (admin, storefront) = (set.admin.clone(), set.storefront.clone());
    let db = shelfsync_tests::pg::connect(&url).await;
    wait_until("the hubs decide 2 partitions each", DEADLINE, || async {
        let rows = db
            .query("SELECT COUNT(*) FROM leases WHERE owner IS NOT NULL AND expires_at > now() GROUP BY owner", &[])
            .await
            .unwrap();
        (rows.len() == 3 && rows.iter().all(|r| r.get::<_, i64>(0) == 2)).then_some(())
    })
    .await;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(20)).build().unwrap();
    let call = {
        let (http, urls) = (http.clone(), urls.clone());
        move |i: usize, method: Method, path: String, token: String, body: Option<Value>| {
            let (http, base) = (http.clone(), urls[i].clone());
            async move {
                let mut r = http.request(method, format!("{base}{path}")).bearer_auth(token);
                if let Some(b) = body {
                    r = r.json(&b);
                }
                let resp = r.send().await.ok()?;
                let status = resp.status().as_u16();
                Some((status, resp.json::<Value>().await.unwrap_or(Value::Null)))
            }
        }
    };
    // One SKU per partition, restocked through the hubs in turn (each request one partition's).
    let parts = Partitions::new(6).unwrap();
    let skus = shelfsync_tests::hubs::one_sku_per_partition(6);
    for (i, sku) in skus.iter().enumerate() {
        let body = json!({"id": format!("restock-{i}"), "store": "store-0", "lines": [{"sku": sku, "qty": 100_000}]});
        let (s, v) = call(i % 3, Method::POST, "/v1/restocks".into(), admin.clone(), Some(body)).await.unwrap();
        assert_eq!(s, 201, "restock of {sku} through hub {}: {v}", i % 3);
    }
    let hot = skus[0].clone();
    // The hot SKU is at every store (store 0's was restocked above).
    const STOCK: i64 = 20_000;
    for st in 1..6 {
        let body = json!({"id": format!("hot-{st}"), "store": set.stores[st], "lines": [{"sku": hot, "qty": STOCK}]});
        let (s, v) = call(st % 3, Method::POST, "/v1/restocks".into(), admin.clone(), Some(body)).await.unwrap();
        assert_eq!(s, 201, "{v}");
    }
    let start: Vec<i64> = (0..6).map(|st| if st == 0 { 100_000 } else { STOCK }).collect();
    for (st, want) in start.iter().enumerate() {
        wait_until("the hot SKU at every store", DEADLINE, || async {
            (set.agent_on_hand(st, &hot).await == *want).then_some(())
        })
        .await;
    }
    let hot_part = parts.of(&hot.parse().unwrap());
    let owner_url: String = db
        .query_one(
            "SELECT h.http_addr FROM leases l JOIN hubs h ON h.id = l.owner WHERE l.partition = $1",
            &[&i32::from(hot_part)],
        )
        .await
        .unwrap()
        .get(0);
    let victim = urls.iter().position(|u| u.ends_with(&owner_url)).expect("the hot partition's hub is one of ours");
    // The other hubs keep the hot partition warm (a standby decider tailing its record log).
    for h in (0..3).filter(|h| *h != victim) {
        wait_until("the hot partition warm on every other hub", DEADLINE, || async {
            let (_, v) = call(h, Method::GET, "/healthz".into(), String::new(), None).await?;
            let warm = v["standby"].as_array()?.iter().any(|s| s["partition"] == json!(hot_part));
            warm.then_some(())
        })
        .await;
    }

    // The burst: clients on every hub; a client whose hub stops answering moves to the next.
    let stop_at = Instant::now() + Duration::from_secs(8);
    let answered: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut clients = tokio::task::JoinSet::new();
    for c in 0..9usize {
        let (call, answered, hot, token) = (call.clone(), answered.clone(), hot.clone(), storefront.clone());
        clients.spawn(async move {
            let mut n = 0;
            let mut at = c % 3;
            while Instant::now() < stop_at {
                n += 1;
                let key = format!("r-{c}-{n}");
                let body = json!({"id": key, "lines": [{"sku": hot, "qty": 1}], "ttl_secs": 3600});
                loop {
                    match call(at, Method::POST, "/v1/reservations".into(), token.clone(), Some(body.clone())).await {
                        // 200: a retry of one decided before (its answer was lost with a hub).
                        Some((201 | 200, _)) => {
                            answered.lock().unwrap().push(key.clone());
                            break;
                        }
                        Some((s, v)) if s != 503 => panic!("reservation {key}: {s} {v}"),
                        _ if Instant::now() > stop_at => break,
                        _ => {
                            at = (at + 1) % 3;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            }
        });
    }
    // The stores sell the hot SKU too, before and after the kill.
    let mut sold = [0i64; 6];
    for (st, n) in sold.iter_mut().enumerate() {
        assert_eq!(set.sell(st, &hot, 1).await, 201);
        *n += 1;
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let before_kill = answered.lock().unwrap().len();
    assert!(before_kill > 0, "reservations were answered before the kill");
    set.hubs[victim].take().unwrap().kill9().await;
    let killed_at = Instant::now();
    for (st, n) in sold.iter_mut().enumerate() {
        assert_eq!(set.sell(st, &hot, 2).await, 201, "store {st} sells while its hub may be gone");
        *n += 2;
    }
    // Another partition keeps answering while the hot one changes hands.
    let other = (victim + 1) % 3;
    let (s, v) =
        call(other, Method::GET, format!("/v1/availability/{}", skus[1]), storefront.clone(), None).await.unwrap();
    assert_eq!(s, 200, "{v}");
    let taken = wait_until("a survivor decides the hot partition", DEADLINE, || async {
        let r = db
            .query_one(
                "SELECT owner IS NOT NULL AND expires_at > now(), epoch FROM leases WHERE partition = $1",
                &[&i32::from(hot_part)],
            )
            .await
            .unwrap();
        (r.get::<_, bool>(0) && r.get::<_, i64>(1) >= 2).then(Instant::now)
    })
    .await;
    assert!(
        taken.duration_since(killed_at) <= Duration::from_millis(1000 + 1000 + 500),
        "taken over {:?} after the kill (lease 1 s + 1 s)",
        taken.duration_since(killed_at)
    );
    while clients.join_next().await.is_some() {}
    let answered = answered.lock().unwrap().clone();
    assert!(answered.len() > before_kill, "reservations were answered after the takeover too");
    // The survivor that took it over did so from its warm standby, not from the tables.
    let mut taken_warm = None;
    for h in (0..3).filter(|h| *h != victim) {
        let (_, v) = call(h, Method::GET, "/healthz".into(), String::new(), None).await.unwrap();
        if let Some(d) = v["deciding"].as_array().unwrap().iter().find(|d| d["partition"] == json!(hot_part)) {
            taken_warm = Some(d["warm"].clone());
        }
    }
    assert_eq!(taken_warm, Some(json!(true)), "the hot partition was taken over warm");

    // Every answered reservation is there, through any survivor, and held counts them exactly.
    let survivors: Vec<usize> = (0..3).filter(|i| *i != victim).collect();
    let stored: BTreeSet<String> = db
        .query("SELECT body::jsonb->>'key' FROM decisions WHERE kind = 'reservation'", &[])
        .await
        .unwrap()
        .iter()
        .filter_map(|r| r.get::<_, Option<String>>(0))
        .collect();
    let lost: Vec<&String> = answered.iter().filter(|k| !stored.contains(*k)).collect();
    assert!(lost.is_empty(), "answered but not stored: {lost:?}");
    // And through the API of any survivor (a sample: the first, the last, and around the kill).
    let sample: Vec<&String> = answered
        .iter()
        .take(5)
        .chain(answered.iter().skip(before_kill.saturating_sub(5)).take(10))
        .chain(answered.iter().rev().take(5))
        .collect();
    for (k, key) in sample.into_iter().enumerate() {
        let via = survivors[k % 2];
        let (s, v) = call(via, Method::GET, format!("/v1/reservations/{key}"), storefront.clone(), None).await.unwrap();
        assert_eq!(s, 200, "reservation {key} answered 201 is there (through hub {via}): {v}");
    }
    let (s, v) =
        call(survivors[0], Method::GET, format!("/v1/availability/{hot}"), storefront.clone(), None).await.unwrap();
    assert_eq!(s, 200, "{v}");
    // Held counts every answered reservation, and at most one more per client (one it sent
    // when the burst ended, decided but never answered); no store promised a unit twice.
    let mut held = 0;
    for f in v["stores"].as_array().unwrap() {
        let (h, on_hand) = (f["held"].as_i64().unwrap(), f["on_hand"].as_i64().unwrap());
        assert!(h <= on_hand, "no unit promised twice: {v}");
        held += h as u64;
    }
    let answered_n = answered.len() as u64;
    assert!((answered_n..=answered_n + 9).contains(&held), "held {held} for {answered_n} answered: {v}");
    // The agents of the dead hub failed over: every sale counted once, at the hub and at the
    // stores.
    let want: Vec<i64> = start.iter().zip(sold).map(|(s, n)| s - n).collect();
    for via in &survivors {
        wait_until("the stores' counts through every survivor", DEADLINE, || async {
            (on_hand_at(&set, *via, &hot).await? == want).then_some(())
        })
        .await;
    }
    for (st, want) in want.iter().enumerate() {
        assert_eq!(set.agent_on_hand(st, &hot).await, *want, "store {st}'s own count");
    }
    set.shutdown().await;
}

/// Agents on a partitioned database: each store's agent syncs with whichever hub it reached,
/// whoever decides for its SKUs. Restocks decided on any hub reach the stores, sales reach
/// every partition's decider, holds reach the store through the hub it is connected to, and
/// when that hub dies the agent moves to another and nothing is counted twice or lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agents_sync_through_any_hub_of_a_partitioned_database_and_fail_over() {
    let env = short_leases();
    let mut set = HubSet::start_with(3, 3, 6, env).await;
    let skus = shelfsync_tests::hubs::one_sku_per_partition(6);
    // Two SKUs of different partitions, very likely decided on different hubs.
    let (a, b) = (skus[1].clone(), skus[4].clone());
    for s in 0..3 {
        for (k, sku) in [&a, &b].into_iter().enumerate() {
            let body =
                json!({"id": format!("restock-{s}-{k}"), "store": set.stores[s], "lines": [{"sku": sku, "qty": 50}]});
            let (status, v) = set.call(s, Method::POST, "/v1/restocks", &set.admin, Some(body)).await.unwrap();
            assert_eq!(status, 201, "{v}");
        }
    }
    for s in 0..3 {
        for sku in [&a, &b] {
            wait_until("the restocks at every store", DEADLINE, || async {
                (set.agent_on_hand(s, sku).await == 50).then_some(())
            })
            .await;
        }
    }
    // The stores sell; every hub's view of every partition counts each sale once.
    let mut sold_a = [0i64; 3];
    for (s, n) in sold_a.iter_mut().enumerate() {
        assert_eq!(set.sell(s, &a, s as u64 + 1).await, 201);
        *n += s as i64 + 1;
        assert_eq!(set.sell(s, &b, 2).await, 201);
    }
    let want_a: Vec<i64> = sold_a.iter().map(|n| 50 - n).collect();
    for hub in 0..3 {
        wait_until("every hub sees the sales of partition a", DEADLINE, || async {
            (on_hand_at(&set, hub, &a).await? == want_a).then_some(())
        })
        .await;
        wait_until("every hub sees the sales of partition b", DEADLINE, || async {
            (on_hand_at(&set, hub, &b).await? == vec![48, 48, 48]).then_some(())
        })
        .await;
    }
    // A reservation decided by a's partition holds units at stores, whichever hub they reach.
    let body = json!({"id": "web-1", "lines": [{"sku": a, "qty": 5}], "ttl_secs": 3600});
    let (status, v) = set.call(2, Method::POST, "/v1/reservations", &set.storefront, Some(body)).await.unwrap();
    assert_eq!(status, 201, "{v}");
    wait_until("the holds at the stores", DEADLINE, || async { (held_at_stores(&set, &a).await == 5).then_some(()) })
        .await;

    // A transfer of both SKUs (two partitions) from store 1 to store 2: one transfer in two
    // parts, on its way to store 2's agent, received through another hub.
    let t = json!({"id": "move-1", "from": "store-1", "to": "store-2",
        "lines": [{"sku": a, "qty": 3}, {"sku": b, "qty": 2}]});
    let (s, v) = set.call(1, Method::POST, "/v1/transfers", &set.admin, Some(t)).await.unwrap();
    assert_eq!(
        (s, v["status"].clone(), v["parts"].as_array().map(Vec::len)),
        (201, json!("in_transit"), Some(2)),
        "{v}"
    );
    wait_until("the transfer on its way to store 2", DEADLINE, || async {
        let (ia, ib) =
            (set.agent_stock(2, &a).await["incoming"].clone(), set.agent_stock(2, &b).await["incoming"].clone());
        (ia == json!(3) && ib == json!(2)).then_some(())
    })
    .await;
    let (s, v) = set.call(2, Method::POST, "/v1/transfers/move-1/receive", &set.admin, None).await.unwrap();
    assert_eq!((s, v["status"].clone()), (200, json!("received")), "{v}");
    let mut want_a = want_a;
    want_a[1] -= 3;
    want_a[2] += 3;
    let want_b = vec![48, 46, 50];
    for hub in 0..3 {
        wait_until("every hub sees the transfer received", DEADLINE, || async {
            (on_hand_at(&set, hub, &a).await? == want_a && on_hand_at(&set, hub, &b).await? == want_b).then_some(())
        })
        .await;
    }
    for st in 1..3 {
        wait_until("the stores' own counts after the transfer", DEADLINE, || async {
            (set.agent_on_hand(st, &a).await == want_a[st] && set.agent_on_hand(st, &b).await == want_b[st])
                .then_some(())
        })
        .await;
    }

    // Store 0's agent reached hub 0 first (its bundle's order). Kill that hub; the agent fails
    // over, keeps its holds, and what it sells meanwhile and after is counted once.
    set.hubs[0].take().unwrap().kill9().await;
    assert_eq!(set.sell(0, &a, 2).await, 201, "the store sells while its hub is gone");
    want_a[0] -= 2;
    for hub in [1, 2] {
        wait_until("the survivors count the failed-over store's sale", DEADLINE, || async {
            (on_hand_at(&set, hub, &a).await? == want_a).then_some(())
        })
        .await;
    }
    let connected_at: i64 = shelfsync_tests::pg::connect(&set.database_url)
        .await
        .query_one("SELECT COUNT(*) FROM peers WHERE store = 'store-0'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(connected_at, 1, "one writer of store 0, whichever hub it synced with");
    assert_eq!(set.sell(0, &a, 1).await, 201);
    want_a[0] -= 1;
    wait_until("the sale after the failover", DEADLINE, || async {
        (on_hand_at(&set, 1, &a).await? == want_a).then_some(())
    })
    .await;
    for s in 0..3 {
        assert_eq!(set.agent_on_hand(s, &a).await, want_a[s], "store {s}'s own count of {a}");
        assert_eq!(set.agent_on_hand(s, &b).await, want_b[s], "store {s}'s own count of {b}");
    }
    assert_eq!(held_at_stores(&set, &a).await, 5, "the holds stay at the stores");
    set.shutdown().await;
}

/// Each store's `on_hand` of `sku` as hub `hub` answers it (None: it did not answer).
async fn on_hand_at(set: &HubSet, hub: usize, sku: &str) -> Option<Vec<i64>> {
    let (_, v) = set.call(hub, Method::GET, &format!("/v1/availability/{sku}"), &set.admin, None).await?;
    let got = set
        .stores
        .iter()
        .map(|id| {
            v["stores"]
                .as_array()
                .and_then(|x| x.iter().find(|st| st["store"] == json!(id)))
                .map_or(i64::MIN, |st| st["on_hand"].as_i64().unwrap_or(i64::MIN))
        })
        .collect();
    Some(got)
}

/// Units of `sku` held at the stores whose agents run, as the agents report them.
async fn held_at_stores(set: &HubSet, sku: &str) -> i64 {
    let mut held = 0;
    for s in (0..set.stores.len()).filter(|s| set.agents[*s].is_some()) {
        held += set.agent_stock(s, sku).await["held"].as_i64().unwrap_or(0);
    }
    held
}

/// The change feed of a partitioned database, read on one hub while other hubs decide: an SSE
/// client gets every partition's events once, each partition in its own order, and its event
/// ids are positions over every partition that `/v1/changes` on any other hub resumes from
/// with nothing missed or repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partitioned_feed_reaches_a_client_of_any_hub_once_in_each_partitions_order() {
    let mut set = HubSet::start_with(3, 1, 6, Vec::new()).await;
    let skus = shelfsync_tests::hubs::one_sku_per_partition(6);
    let mut resp = reqwest::Client::new()
        .get(format!("{}/v1/events?after=0", set.http[0]))
        .bearer_auth(&set.storefront)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // Restocks of every partition's SKU, through the other hubs.
    for round in 0..3 {
        for (i, sku) in skus.iter().enumerate() {
            let via = 1 + (i + round) % 2;
            let body = json!({"id": format!("r-{round}-{i}"), "store": "store-0", "lines": [{"sku": sku, "qty": 1}]});
            let (s, v) = set.call(via, Method::POST, "/v1/restocks", &set.admin, Some(body)).await.unwrap();
            assert_eq!(s, 201, "{v}");
        }
    }
    // What was decided, read page by page through hub 2 (small pages: the cursor resumes).
    let key = |e: &Value| (e["partition"].as_u64().unwrap(), e["partition_cursor"].as_u64().unwrap());
    let read_all = |after: String, via: usize| {
        let set = &set;
        async move {
            let (mut after, mut all) = (after, Vec::new());
            loop {
                let (s, page) = set
                    .call(via, Method::GET, &format!("/v1/changes?after={after}&limit=7"), &set.admin, None)
                    .await
                    .unwrap();
                assert_eq!(s, 200, "{page}");
                all.extend(page["items"].as_array().unwrap().iter().cloned());
                after = page["cursor"].as_str().unwrap().to_owned();
                if page["next"].is_null() {
                    return (all, after);
                }
            }
        }
    };
    let want = wait_until("every restock on the feed", DEADLINE, || async {
        let (all, _) = read_all("0".into(), 2).await;
        let restocked = all.iter().filter(|e| e["kind"] == json!("availability_changed")).count();
        (restocked >= 18).then_some(all)
    })
    .await;
    let want_keys: Vec<(u64, u64)> = want.iter().map(key).collect();
    let distinct: BTreeSet<(u64, u64)> = want_keys.iter().copied().collect();
    assert_eq!(distinct.len(), want_keys.len(), "no event twice across pages");
    assert_eq!(want_keys.iter().map(|k| k.0).collect::<BTreeSet<_>>().len(), 6, "every partition's events");

    let mut text = String::new();
    let mut got: Vec<(u64, u64)> = Vec::new();
    let mut ids: Vec<String> = Vec::new();
    tokio::time::timeout(DEADLINE, async {
        while got.len() < want_keys.len() {
            let chunk = resp.chunk().await.expect("stream chunk").expect("stream open");
            text.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = text.find("\n\n") {
                let event: String = text.drain(..end + 2).collect();
                let id = event.lines().find_map(|l| l.strip_prefix("id:")).map(|s| s.trim().to_owned());
                let data = event.lines().find_map(|l| l.strip_prefix("data:")).map(|s| s.trim().to_owned());
                if let (Some(id), Some(data)) = (id, data) {
                    let v: Value = serde_json::from_str(&data).unwrap();
                    assert_eq!(v["cursor"], json!(id), "an event's id is its cursor");
                    got.push(key(&v));
                    ids.push(id);
                }
            }
        }
    })
    .await
    .expect("every event within the deadline");
    assert_eq!(got.iter().copied().collect::<BTreeSet<_>>(), distinct, "each event once");
    assert_eq!(got.len(), want_keys.len(), "each event once");
    for p in 0..6u64 {
        let order: Vec<u64> = got.iter().filter(|k| k.0 == p).map(|k| k.1).collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "partition {p} in its order: {order:?}");
    }
    // An id from the stream on hub 0 resumes on hub 1: exactly what came after it.
    let (rest, _) = read_all(ids[4].clone(), 1).await;
    let rest: BTreeSet<(u64, u64)> = rest.iter().map(key).collect();
    assert_eq!(rest, got[5..].iter().copied().collect::<BTreeSet<_>>(), "resumed with nothing missed or repeated");
    // A cursor that is not one a hub gave out is refused, naming the parameter.
    let (s, v) = set.call(1, Method::GET, "/v1/changes?after=p1.zz", &set.admin, None).await.unwrap();
    assert_eq!((s, v["error"].clone(), v["parameter"].clone()), (422, json!("invalid_request"), json!("after")), "{v}");
    drop(resp);
    set.hubs[0].take().unwrap().kill9().await;
    set.shutdown().await;
}

/// Requests over SKUs of several partitions, on two hubs: a restock and a cart of several SKUs
/// are split into one part per partition and answered as one; a cart one part of which cannot
/// be held holds nothing; the parts are found, committed and read through any hub by the
/// request's key or id.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_over_several_partitions_are_split_and_answered_as_one() {
    let set = HubSet::start_with(2, 1, 6, Vec::new()).await;
    let skus = shelfsync_tests::hubs::one_sku_per_partition(6);
    let lines: Vec<Value> = skus.iter().rev().map(|s| json!({"sku": s, "qty": 10})).collect();
    let body = json!({"id": "delivery-1", "store": "store-0", "lines": lines});
    let (s, first) = set.call(0, Method::POST, "/v1/restocks", &set.admin, Some(body.clone())).await.unwrap();
    assert_eq!(s, 201, "{first}");
    let answered: Vec<&str> = first["lines"].as_array().unwrap().iter().map(|l| l["sku"].as_str().unwrap()).collect();
    let asked: Vec<&str> = skus.iter().rev().map(String::as_str).collect();
    assert_eq!(answered, asked, "the lines in the request's order: {first}");
    assert_eq!(first["parts"].as_array().unwrap().len(), 6, "{first}");
    // A retry, through the other hub, replays every part.
    let (s, again) = set.call(1, Method::POST, "/v1/restocks", &set.admin, Some(body)).await.unwrap();
    assert_eq!((s, &again["lines"], &again["id"]), (200, &first["lines"], &first["id"]), "{again}");

    // Availability of every SKU at once, through either hub, in the order asked.
    let query: Vec<String> = skus.iter().map(|s| format!("sku={s}")).collect();
    let (s, v) = set
        .call(1, Method::GET, &format!("/v1/availability?{}", query.join("&")), &set.storefront, None)
        .await
        .unwrap();
    assert_eq!(s, 200, "{v}");
    let got: Vec<(String, i64)> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["sku"].as_str().unwrap().to_owned(), i["on_hand"].as_i64().unwrap()))
        .collect();
    assert_eq!(got, skus.iter().map(|s| (s.clone(), 10)).collect::<Vec<_>>(), "{v}");
    // A batch of deliveries over several partitions; one naming an unknown store records nothing.
    let night = |id: &str, store: &str| {
        json!({"id": id, "restocks": [
            {"store": "store-0", "lines": [{"sku": skus[5], "qty": 1}, {"sku": skus[2], "qty": 1}]},
            {"store": store, "lines": [{"sku": skus[2], "qty": 1}]}]})
    };
    let (s, v) =
        set.call(0, Method::POST, "/v1/restocks/batch", &set.admin, Some(night("night-0", "store-9"))).await.unwrap();
    assert_eq!((s, v["field"].clone()), (404, json!("restocks[1].store")), "{v}");
    let (s, v) =
        set.call(1, Method::POST, "/v1/restocks/batch", &set.admin, Some(night("night-1", "store-0"))).await.unwrap();
    assert_eq!(s, 201, "{v}");
    let per_entry: Vec<Vec<&str>> = v["restocks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["lines"].as_array().unwrap().iter().map(|l| l["sku"].as_str().unwrap()).collect())
        .collect();
    assert_eq!(
        per_entry,
        [vec![skus[5].as_str(), skus[2].as_str()], vec![skus[2].as_str()]],
        "per entry, in order: {v}"
    );
    for (sku, want) in [(&skus[5], 11), (&skus[2], 12)] {
        let (_, a) = set.call(0, Method::GET, &format!("/v1/availability/{sku}"), &set.admin, None).await.unwrap();
        assert_eq!(a["on_hand"], json!(want), "{a}");
    }
    let (s, again) =
        set.call(0, Method::POST, "/v1/restocks/batch", &set.admin, Some(night("night-1", "store-0"))).await.unwrap();
    assert_eq!((s, &again["restocks"]), (200, &v["restocks"]), "a retry replays every part: {again}");
    // The chain at a glance adds every partition's figures up.
    let (s, o) = set.call(1, Method::GET, "/v1/overview", &set.admin, None).await.unwrap();
    assert_eq!((s, o["skus"].clone()), (200, json!(6)), "{o}");
    let store0 = o["stores"].as_array().unwrap().iter().find(|x| x["id"] == json!("store-0")).unwrap();
    assert_eq!(store0["on_hand"], json!(63), "{o}");
    assert!(o["feed_head"].as_str().is_some_and(|h| h.starts_with("p1.")), "a position over every partition: {o}");

    // A cart of two partitions' SKUs.
    let cart =
        json!({"id": "cart-1", "lines": [{"sku": skus[0], "qty": 3}, {"sku": skus[3], "qty": 2}], "ttl_secs": 600});
    let (s, r) = set.call(1, Method::POST, "/v1/reservations", &set.storefront, Some(cart)).await.unwrap();
    assert_eq!((s, r["status"].clone(), r["key"].clone()), (201, json!("held"), json!("cart-1")), "{r}");
    assert_eq!(r["parts"].as_array().unwrap().len(), 2, "{r}");
    let held: i64 = r["allocations"].as_array().unwrap().iter().map(|a| a["qty"].as_i64().unwrap()).sum();
    assert_eq!(held, 5, "{r}");
    for path in ["/v1/reservations/cart-1".to_owned(), format!("/v1/reservations/{}", r["id"].as_str().unwrap())] {
        let (s, v) = set.call(0, Method::GET, &path, &set.storefront, None).await.unwrap();
        assert_eq!((s, &v["id"], &v["status"]), (200, &r["id"], &json!("held")), "{path}: {v}");
    }
    let held_of = |sku: String| {
        let set = &set;
        async move {
            let (_, v) =
                set.call(0, Method::GET, &format!("/v1/availability/{sku}"), &set.storefront, None).await.unwrap();
            v["held"].as_i64().unwrap()
        }
    };
    assert_eq!((held_of(skus[0].clone()).await, held_of(skus[3].clone()).await), (3, 2));

    // A cart one part of which cannot be held holds nothing.
    let short = json!({"id": "cart-2", "lines": [{"sku": skus[1], "qty": 1}, {"sku": skus[2], "qty": 1000}]});
    let (s, v) = set.call(0, Method::POST, "/v1/reservations", &set.storefront, Some(short)).await.unwrap();
    assert_eq!(s, 409, "{v}");
    assert_eq!(held_of(skus[1].clone()).await, 0, "the part held before the refusal was released");

    // Committed through the other hub: every part.
    let (s, v) = set.call(0, Method::POST, "/v1/reservations/cart-1/commit", &set.storefront, None).await.unwrap();
    assert_eq!((s, v["status"].clone()), (200, json!("committed")), "{v}");
    let statuses: Vec<&Value> = v["parts"].as_array().unwrap().iter().map(|p| &p["status"]).collect();
    assert_eq!(statuses, [&json!("committed"), &json!("committed")], "{v}");
    // A head-office correction goes to its SKU's partition, through either hub.
    let adj = json!({"id": "fix-1", "sku": skus[4], "delta": -1, "reason": "damaged"});
    let (s, v) = set.call(1, Method::POST, "/v1/stores/store-0/adjustments", &set.admin, Some(adj)).await.unwrap();
    assert_eq!(s, 201, "{v}");
    let (_, v) = set.call(0, Method::GET, &format!("/v1/availability/{}", skus[4]), &set.admin, None).await.unwrap();
    assert_eq!(v["on_hand"], json!(9), "{v}");
    // A catalog import through one hub sets the rules of SKUs of every partition.
    let csv = format!("sku,name,safety_stock\n{},One,2\n{},Five,3\n", skus[1], skus[5]);
    let r = reqwest::Client::new()
        .post(format!("{}/v1/catalog-imports", set.http[0]))
        .bearer_auth(&set.admin)
        .header("content-type", "text/csv")
        .body(csv)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    for (sku, safety) in [(&skus[1], 2), (&skus[5], 3)] {
        wait_until("the imported rule in its partition", DEADLINE, || async {
            let (_, v) = set.call(1, Method::GET, &format!("/v1/availability/{sku}"), &set.admin, None).await?;
            let st = v["stores"].as_array()?.iter().find(|x| x["store"] == json!("store-0"))?.clone();
            (st["safety_stock"] == json!(safety)).then_some(())
        })
        .await;
    }
    // Each hub's /metrics: its process's counters (every decider it runs, its agents'
    // sessions), the chain's stores and every partition's open conflicts, for a viewer only.
    let scrape = |token: String| {
        let url = format!("{}/metrics", set.http[1]);
        async move { reqwest::Client::new().get(url).bearer_auth(token).send().await.unwrap() }
    };
    assert_eq!(scrape("nope".into()).await.status(), 401);
    let text = scrape(set.admin.clone()).await.text().await.unwrap();
    shelfsync_tests::promtool::check("partitioned hub's metrics", &text);
    for want in [
        "shelfsync_hub_reservations_total{",
        "shelfsync_hub_stores 1",
        "shelfsync_hub_store_connected{store=\"store-0\"}",
    ] {
        assert!(text.contains(want), "{want} in:\n{text}");
    }
    // What every partition answers alike is answered by any hub.
    let (s, v) = set.call(1, Method::GET, "/v1/tokens", &set.admin, None).await.unwrap();
    assert_eq!(s, 200, "{v}");

    // Lists over every partition, a page at a time, each item once, in the list's order.
    let (reservations, _) = read_pages(&set, 0, "/v1/reservations", "limit=1", &set.admin).await;
    let keys: BTreeSet<String> = reservations.iter().map(|r| r["key"].as_str().unwrap().to_owned()).collect();
    let want: BTreeSet<String> = ["cart-1/p0", "cart-1/p3", "cart-2/p1"].into_iter().map(String::from).collect();
    assert_eq!((keys, reservations.len()), (want, 3), "{reservations:?}");
    let created: Vec<&str> = reservations.iter().map(|r| r["created_at"].as_str().unwrap()).collect();
    assert!(created.windows(2).all(|w| w[0] >= w[1]), "newest first: {created:?}");
    let (stock, _) = read_pages(&set, 1, "/v1/stores/store-0/stock", "limit=2", &set.admin).await;
    let stocked: Vec<&str> = stock.iter().map(|r| r["sku"].as_str().unwrap()).collect();
    let mut sorted = skus.clone();
    sorted.sort();
    assert_eq!(stocked, sorted, "by SKU, each once");
    // The store sells two partitions' SKUs it never saw and its catalog does not list: a
    // conflict in each partition.
    let parts = shelfsync_hub_core::Partitions::new(6).unwrap();
    let unknown = |p: u16| (0..).map(|i| format!("NEW-{i}")).find(|s| parts.of(&s.parse().unwrap()) == p).unwrap();
    let (u0, u3) = (unknown(0), unknown(3));
    assert_eq!(set.sell(0, &u0, 1).await, 201);
    assert_eq!(set.sell(0, &u3, 1).await, 201);
    let conflicts = wait_until("a conflict in each partition", DEADLINE, || async {
        let (all, _) = read_pages(&set, 1, "/v1/conflicts", "limit=1", &set.admin).await;
        (all.len() >= 2).then_some(all)
    })
    .await;
    let conflicted: BTreeSet<&str> = conflicts.iter().map(|c| c["sku"].as_str().unwrap_or("")).collect();
    assert!(conflicted.contains(u0.as_str()) && conflicted.contains(u3.as_str()), "{conflicts:?}");
    let ids: BTreeSet<&str> = conflicts.iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), conflicts.len(), "each conflict once");
    let one = conflicts.iter().find(|c| c["sku"] == json!(u3)).unwrap();
    let (s, v) = set.call(0, Method::GET, &format!("/v1/conflicts?sku={u3}"), &set.admin, None).await.unwrap();
    let of_u3 = v["items"].as_array().unwrap();
    assert!(s == 200 && !of_u3.is_empty() && of_u3.iter().all(|c| c["sku"] == json!(u3)), "{v}");
    let path = format!("/v1/conflicts/{}/resolve", one["id"].as_str().unwrap());
    let (s, v) =
        set.call(0, Method::POST, &path, &set.admin, Some(json!({"note": "added to the catalog"}))).await.unwrap();
    assert_eq!((s, v["status"].clone()), (200, json!("resolved")), "{v}");
    set.shutdown().await;
}

/// Every item of a list through hub `via`, following `next` (the last page's body too).
async fn read_pages(set: &HubSet, via: usize, path: &str, query: &str, token: &str) -> (Vec<Value>, Value) {
    let (mut items, mut after): (Vec<Value>, Option<String>) = (Vec::new(), None);
    for _ in 0..1000 {
        let q = match &after {
            Some(a) => format!("{query}&after={a}"),
            None => query.to_owned(),
        };
        let (s, page) = set.call(via, Method::GET, &format!("{path}?{q}"), token, None).await.unwrap();
        assert_eq!(s, 200, "{path}?{q}: {page}");
        items.extend(page["items"].as_array().unwrap().iter().cloned());
        match page["next"].as_str() {
            Some(n) => after = Some(n.to_owned()),
            None => return (items, page),
        }
    }
    panic!("{path}: more than 1000 pages");
}
