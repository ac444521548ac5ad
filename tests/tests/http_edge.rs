//! The HTTP edge of both servers, through real sockets: slow and stalled clients cannot starve
//! the hub (connection caps, header-read and idle timeouts), floods get 429 with `Retry-After`
//! (per token, per address), and the agent's POS API refuses a `Host` or `Origin` that is not
//! itself (DNS rebinding) and an exposed listener with a weak token.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use shelfsync_agent::config::AgentConfig;
use shelfsync_agent::db::{Db, DbOptions};
use shelfsync_agent::server::RunningAgent;
use shelfsync_hub::admin;
use shelfsync_hub::config::HubConfig;
use shelfsync_hub::server::RunningHub;
use shelfsync_hub::storage::Role;
use shelfsync_node::config::RateLimit;
use shelfsync_tests::procs::{wait_until, Proc};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use uuid::Uuid;

/// Generous bound for "still answers" liveness checks.
const PROMPT: Duration = Duration::from_secs(5);
const DEADLINE: Duration = Duration::from_secs(20);

/// The address the attackers use; the storefront comes from another one.
const ATTACKER: &str = "127.0.0.1";
const STOREFRONT: &str = "127.0.0.2";

struct Hub {
    hub: RunningHub,
    viewer: String,
    storefront: String,
    _dir: tempfile::TempDir,
}

async fn hub_with(tune: impl FnOnce(&mut HubConfig)) -> Hub {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("hub");
    admin::init(&d).await.unwrap();
    let viewer = admin::create_token(&d, Role::Viewer).await.unwrap();
    let storefront = admin::create_token(&d, Role::Storefront).await.unwrap();
    let mut cfg = HubConfig { data_dir: d, ..HubConfig::default() };
    cfg.quic.listen = "127.0.0.1:0".parse().unwrap();
    cfg.http.listen = "127.0.0.1:0".parse().unwrap();
    cfg.log.filter = "warn".into();
    tune(&mut cfg);
    let hub = shelfsync_hub::server::start(cfg).await.unwrap();
    Hub { hub, viewer, storefront, _dir: dir }
}

struct Agent {
    agent: RunningAgent,
    _dir: tempfile::TempDir,
}

async fn agent_with(tune: impl FnOnce(&mut AgentConfig)) -> Agent {
    let dir = tempfile::tempdir().unwrap();
    let mut config = AgentConfig { data_dir: dir.path().to_owned(), ..AgentConfig::default() };
    config.api.listen = "127.0.0.1:0".parse().unwrap();
    config.sync.enabled = false;
    tune(&mut config);
    Db::create(&config.db_path(), &"store-1".parse().unwrap(), DbOptions::default()).unwrap();
    let agent = shelfsync_agent::server::start(config).await.unwrap();
    Agent { agent, _dir: dir }
}

/// An HTTP client whose connections come from `ip`.
fn client_from(ip: &str) -> reqwest::Client {
    reqwest::Client::builder().local_address(ip.parse::<IpAddr>().unwrap()).build().unwrap()
}

/// Lets this test process hold a few thousand sockets (the server under test shares it).
fn raise_fd_limit(want: u64) {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        if lim.rlim_cur < want {
            let raised = libc::rlimit { rlim_cur: want.min(lim.rlim_max), rlim_max: lim.rlim_max };
            libc::setrlimit(libc::RLIMIT_NOFILE, &raised);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        }
    }
    assert!(lim.rlim_cur >= want, "need {want} open files for this test, the hard limit is {}", lim.rlim_max);
}

/// `n` connections from `from` to `to`, each sending half a request line and then nothing.
async fn stall(to: SocketAddr, from: &str, n: usize) -> Vec<TcpStream> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(from.parse().unwrap(), 0)).unwrap();
        let mut s = socket.connect(to).await.unwrap();
        // A refused connection may already be closed: the write is allowed to fail.
        let _ = s.write_all(b"GET /v1/availability/A HTTP/1.1\r\nHost: x\r\nX-Slow").await;
        out.push(s);
    }
    out
}

/// Reads until the server closes (EOF or reset); what was read, or `None` if it stayed open.
async fn closed_by_server(s: &mut TcpStream, within: Duration) -> Option<String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(within, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    read.ok().map(|_| String::from_utf8_lossy(&got).into_owned())
}

/// Whether a raw answer to a connection over a cap is JSON like every other error answer.
fn is_json_refusal(answer: &str) -> bool {
    let Some((head, body)) = answer.split_once("\r\n\r\n") else { return false };
    let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    head.to_ascii_lowercase().contains("content-type: application/json")
        && v["error"] == "too_many_connections"
        && v["message"].is_string()
}

/// One of the hub's metrics, asked from the storefront's address.
async fn hub_metric(h: &Hub, name: &str) -> u64 {
    let text = client_from(STOREFRONT)
        .get(format!("{}/metrics", h.hub.url()))
        .bearer_auth(&h.viewer)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("shelfsync_hub_{name} ")))
        .unwrap_or_else(|| panic!("metric {name} missing"))
        .parse()
        .unwrap()
}

/// 2,000 connections from one address that send half a request and stall (the issue's attack,
/// scaled to a test) take at most `max_connections_per_ip` of the hub's connections; the rest
/// are closed at once, and a storefront from another address is answered promptly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_clients_from_one_address_leave_the_storefront_served() {
    raise_fd_limit(8192);
    let h = hub_with(|c| {
        c.http.max_connections = 1024;
        c.http.max_connections_per_ip = 256;
    })
    .await;
    let attackers = stall(h.hub.http_addr, ATTACKER, 2000).await;

    let storefront = client_from(STOREFRONT);
    let answer = tokio::time::timeout(
        PROMPT,
        storefront.get(format!("{}/v1/availability?sku=A", h.hub.url())).bearer_auth(&h.storefront).send(),
    )
    .await
    .expect("the storefront is answered while 2,000 stalled connections are open")
    .unwrap();
    assert_eq!(answer.status(), 200);

    wait_until("the hub to refuse the connections over the per-address cap", DEADLINE, || async {
        (hub_metric(&h, "http_connections_refused_total").await >= 2000 - 256).then_some(())
    })
    .await;
    let open = hub_metric(&h, "http_connections_open").await;
    assert!((256..=256 + 4).contains(&open), "the attacker holds at most its 256 connections: {open} open");
    // A refused attacker was closed at once (with a 429 if it got to read it).
    let mut last = attackers.into_iter().last().unwrap();
    let seen = closed_by_server(&mut last, PROMPT).await.expect("a refused connection is closed at once");
    assert!(seen.is_empty() || (seen.starts_with("HTTP/1.1 429") && is_json_refusal(&seen)), "{seen}");
    h.hub.stop().await;
}

/// Stalled clients from many addresses fill the hub's total cap: over it, connections get a JSON
/// 503 and are closed; the stalled ones are cut off by the header-read timeout, after which the
/// storefront is served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_header_timeout_frees_a_full_hub() {
    raise_fd_limit(4096);
    let h = hub_with(|c| {
        c.http.max_connections = 200;
        c.http.max_connections_per_ip = 0;
        c.http.header_read_timeout_secs = 1;
    })
    .await;
    let mut attackers = stall(h.hub.http_addr, ATTACKER, 400).await;
    for (i, a) in attackers.iter_mut().enumerate() {
        let seen = closed_by_server(a, DEADLINE).await;
        let seen = seen.unwrap_or_else(|| panic!("stalled connection {i} is still open"));
        assert!(seen.is_empty() || (seen.starts_with("HTTP/1.1 503") && is_json_refusal(&seen)), "{seen}");
    }
    let storefront = client_from(STOREFRONT);
    let status = wait_until("the storefront to be served again", DEADLINE, || async {
        let r =
            storefront.get(format!("{}/v1/availability?sku=A", h.hub.url())).bearer_auth(&h.storefront).send().await;
        r.ok().map(|r| r.status())
    })
    .await;
    assert_eq!(status, 200);
    assert!(hub_metric(&h, "http_connections_timed_out_total").await >= 190);
    assert!(hub_metric(&h, "http_connections_refused_total").await >= 190);
    h.hub.stop().await;
}

/// A raw request on a fresh connection; the status line and the body.
async fn raw(addr: SocketAddr, request: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(PROMPT, s.read_to_end(&mut out)).await.expect("answered").unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.lines().next().unwrap_or("").to_owned();
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

/// A connection that sends nothing, or stalls in the middle of a body, is closed by the agent
/// once it has been silent for the configured time; a normal client meanwhile is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_closes_silent_and_stalled_connections() {
    let a = agent_with(|c| {
        c.api.header_read_timeout_secs = 1;
        c.api.idle_timeout_secs = 1;
    })
    .await;
    let addr = a.agent.addr;
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let mut stalled_body = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/sales HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n",
        addr.port()
    );
    stalled_body.write_all(format!("{head}{{\"id\": \"{}\",", Uuid::now_v7()).as_bytes()).await.unwrap();

    let (status, _) =
        raw(addr, &format!("GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n\r\n", addr.port()))
            .await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");

    // A kept-alive connection that asks nothing more is closed too, after its answer.
    let mut kept_alive = TcpStream::connect(addr).await.unwrap();
    kept_alive
        .write_all(format!("GET /healthz HTTP/1.1\r\nHost: localhost:{}\r\n\r\n", addr.port()).as_bytes())
        .await
        .unwrap();
    let seen = closed_by_server(&mut kept_alive, DEADLINE).await.expect("idle keep-alive connection closed");
    assert!(seen.starts_with("HTTP/1.1 200") && seen.contains(r#"{"status":"ok"}"#), "{seen}");

    assert_eq!(closed_by_server(&mut silent, DEADLINE).await.as_deref(), Some(""), "silent connection closed");
    let seen = closed_by_server(&mut stalled_body, DEADLINE).await.expect("stalled upload closed");
    assert!(!seen.contains("201"), "a half-sent sale is never recorded: {seen}");
    let status: Value = reqwest::get(format!("{}/v1/status", a.agent.url())).await.unwrap().json().await.unwrap();
    assert_eq!(status["journal_events"], 0);
    let metrics = reqwest::get(format!("{}/metrics", a.agent.url())).await.unwrap().text().await.unwrap();
    let timed_out: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("shelfsync_agent_http_connections_timed_out_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(timed_out >= 3, "{metrics}");
    a.agent.stop().await.unwrap();
}

/// The answers of `n` requests made by `workers` concurrent clients: (status, Retry-After, body).
async fn flood(
    n: usize,
    workers: usize,
    make: impl Fn(&reqwest::Client, usize) -> reqwest::RequestBuilder + Send + Sync + 'static,
) -> Vec<(u16, Option<u64>, Value)> {
    let make = Arc::new(make);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (make, next) = (make.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    return out;
                }
                let r = make(&http, i).send().await.unwrap();
                let retry = r.headers().get("retry-after").map(|v| v.to_str().unwrap().parse().unwrap());
                let status = r.status().as_u16();
                out.push((status, retry, r.json().await.unwrap_or(Value::Null)));
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

fn limited(answers: &[(u16, Option<u64>, Value)]) -> usize {
    let mut n = 0;
    for (status, retry, body) in answers {
        if *status == 429 {
            n += 1;
            assert_eq!(body["error"], "rate_limited", "{body}");
            assert!(body["message"].as_str().unwrap().contains("/s"), "{body}");
            assert!(retry.is_some_and(|s| s >= 1), "429 without Retry-After");
        }
    }
    n
}

/// With the default limits, a flood of 5,000 reads from one token and 1,000 requests without a
/// token are answered 429 with Retry-After, and neither touches another token's allowance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_get_429_per_token_and_per_address() {
    let h = hub_with(|_| {}).await;
    let url = h.hub.url();

    let (u, t) = (url.clone(), h.viewer.clone());
    let answers = flood(5000, 32, move |http, _| http.get(format!("{u}/v1/availability?sku=A")).bearer_auth(&t)).await;
    let n = limited(&answers);
    assert!(n > 0, "5,000 reads from one token got no 429");
    assert!(answers.iter().all(|a| a.0 == 200 || a.0 == 429), "only 200 or 429");

    let u = url.clone();
    let answers = flood(1000, 16, move |http, _| http.get(format!("{u}/healthz"))).await;
    assert!(limited(&answers) > 0, "1,000 requests without a token got no 429");

    // Made-up tokens are each a fresh key, but their 401s are charged to the address.
    let u = url.clone();
    let answers =
        flood(400, 8, move |http, i| http.get(format!("{u}/v1/stores")).bearer_auth(format!("ss_made_up_{i}"))).await;
    assert!(limited(&answers) > 0, "a flood of made-up tokens got no 429");
    assert!(answers.iter().all(|a| a.0 == 401 || a.0 == 429));

    // Another token (same address) is unaffected.
    let r = reqwest::Client::new()
        .post(format!("{url}/v1/reservations"))
        .bearer_auth(&h.storefront)
        .json(&json!({"id": Uuid::now_v7(), "lines": [{"sku": "A", "qty": 1}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409, "the storefront token has its own allowance (and there is no stock)");
    let rate_limited = hub_metric(&h, "http_rate_limited_total").await;
    assert!(rate_limited >= 3, "429s are counted: {rate_limited}");
    h.hub.stop().await;
}

/// Tokens are judged on every request, and a request refused with 401 because its token is
/// revoked or expired is charged to its address like one with a made-up token: a flood with dead
/// tokens gets JSON 429s with Retry-After, while a valid token from the same address keeps its
/// own allowance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_and_expired_tokens_are_charged_to_their_address() {
    let h = hub_with(|c| c.http.rate_limit.unauthenticated = RateLimit::new(1, 20)).await;
    let d = h._dir.path().join("hub");
    let (leaked, revoked) = admin::create_named_token(&d, Role::Viewer, Some("leaked"), None, None).await.unwrap();
    admin::revoke_token(&d, &leaked.id.to_string()).await.unwrap();
    let (short, expired) = admin::create_named_token(&d, Role::Viewer, Some("short"), Some("1s"), None).await.unwrap();
    let expires_at_ms = short.expires_at_ms.expect("an expiry");
    wait_until("the short-lived token to expire", DEADLINE, || async {
        let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
        (now_ms > expires_at_ms as u128).then_some(())
    })
    .await;

    let url = h.hub.url();
    let http = reqwest::Client::new();
    for (token, code) in [(&revoked, "token_revoked"), (&expired, "token_expired")] {
        let r = http.get(format!("{url}/v1/stores")).bearer_auth(token).send().await.unwrap();
        assert_eq!(r.status(), 401);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"], code, "{v}");
    }

    let u = url.clone();
    let dead = [revoked, expired];
    let answers = flood(120, 4, move |http, i| http.get(format!("{u}/v1/stores")).bearer_auth(&dead[i % 2])).await;
    assert!(limited(&answers) >= 60, "dead tokens dodged the per-address limit");
    for (status, _, body) in &answers {
        match status {
            401 => assert!(body["error"] == "token_revoked" || body["error"] == "token_expired", "{body}"),
            429 => {}
            other => panic!("{other}: {body}"),
        }
    }

    let r = http.get(format!("{url}/v1/stores")).bearer_auth(&h.viewer).send().await.unwrap();
    assert_eq!(r.status(), 200, "a valid token from the same address has its own allowance");
    h.hub.stop().await;
}

/// Agent limits are configurable per class; a 429 sale changes nothing and names its limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_writes_over_the_limit_get_429_and_change_nothing() {
    let a = agent_with(|c| c.api.rate_limit.writes = RateLimit::new(1, 10)).await;
    let u = a.agent.url();
    let answers = flood(40, 1, move |http, _| {
        http.post(format!("{u}/v1/sales")).json(&json!({"id": Uuid::now_v7(), "lines": [{"sku": "A", "qty": 1}]}))
    })
    .await;
    let n = limited(&answers);
    let created = answers.iter().filter(|a| a.0 == 201).count();
    assert!(n >= 20 && created >= 10 && n + created == 40, "{n} limited, {created} created");
    let stock: Value = reqwest::get(format!("{}/v1/stock/A", a.agent.url())).await.unwrap().json().await.unwrap();
    assert_eq!(stock["on_hand"], -(created as i64), "only the accepted sales count");
    // Reads have their own allowance.
    assert_eq!(reqwest::get(format!("{}/v1/status", a.agent.url())).await.unwrap().status(), 200);
    a.agent.stop().await.unwrap();
}

/// Host and Origin must name the agent: its address or loopback, with its port.
#[tokio::test]
async fn the_agent_refuses_foreign_host_and_origin() {
    let a = agent_with(|c| c.api.allowed_hosts = vec!["pos-box.example".into()]).await;
    let addr = a.agent.addr;
    let port = addr.port();
    let get = |host: &str, extra: &str| {
        format!("GET /v1/stock?limit=1 HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n")
    };
    for host in [format!("127.0.0.1:{port}"), format!("localhost:{port}"), format!("pos-box.example:{port}")] {
        let (status, body) = raw(addr, &get(&host, "")).await;
        assert!(status.starts_with("HTTP/1.1 200"), "{host}: {status} {body}");
    }
    for host in [format!("rebound.example:{port}"), "127.0.0.1:1".to_string(), "localhost".to_string()] {
        let (status, body) = raw(addr, &get(&host, "")).await;
        assert!(status.starts_with("HTTP/1.1 403"), "{host}: {status}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"], "forbidden_host");
        assert_eq!(v["host"], host.as_str());
        assert!(v["message"].as_str().unwrap().contains(&host), "{v}");
    }
    let host = format!("127.0.0.1:{port}");
    let (status, body) = raw(addr, &get(&host, "Origin: http://rebound.example\r\n")).await;
    assert!(status.starts_with("HTTP/1.1 403") && body.contains("forbidden_host"), "{status} {body}");
    let (status, _) = raw(addr, &get(&host, "Origin: null\r\n")).await;
    assert!(status.starts_with("HTTP/1.1 403"), "{status}");
    let (status, _) = raw(addr, &get(&host, &format!("Origin: http://localhost:{port}\r\n"))).await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    // Writes too, and nothing is recorded.
    let sale = json!({"id": Uuid::now_v7(), "lines": [{"sku": "A", "qty": 1}]}).to_string();
    let post = format!(
        "POST /v1/sales HTTP/1.1\r\nHost: rebound.example:{port}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{sale}",
        sale.len()
    );
    let (status, _) = raw(addr, &post).await;
    assert!(status.starts_with("HTTP/1.1 403"), "{status}");
    let status: Value = reqwest::get(format!("{}/v1/status", a.agent.url())).await.unwrap().json().await.unwrap();
    assert_eq!(status["journal_events"], 0);
    a.agent.stop().await.unwrap();
}

/// A listener reachable from the network needs a strong token: in process and through the CLI.
#[tokio::test]
async fn an_exposed_agent_refuses_a_weak_token() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = AgentConfig { data_dir: dir.path().to_owned(), ..AgentConfig::default() };
    config.api.listen = "0.0.0.0:0".parse().unwrap();
    config.api.token = "x".into();
    let err = shelfsync_agent::server::start(config.clone()).await.err().expect("refused").to_string();
    assert!(err.contains("api.token"), "{err}");
    config.api.token = String::new();
    let err = shelfsync_agent::server::start(config).await.err().expect("refused").to_string();
    assert!(err.contains("api.token"), "{err}");

    let d = dir.path().to_str().unwrap();
    Proc::run_ok("shelfsync-agent", &["init", "--store-id", "store-9", "--data-dir", d]).await;
    let out = tokio::process::Command::new(shelfsync_tests::procs::bin("shelfsync-agent"))
        .args(["run", "--data-dir", d, "--listen", "0.0.0.0:0"])
        .env("SHELFSYNC_AGENT__API__TOKEN", "x")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("api.token"), "{stderr}");
}
