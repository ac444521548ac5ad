//! `/metrics` of a live hub with a store connected and of that store's live agent, after some
//! activity: the key series exist with the right labels and values, the text passes
//! `promtool check metrics` (required in CI), an ordinary agent stop is not a protocol error,
//! and the Grafana dashboard only queries metrics that exist.

use std::time::Duration;

use serde_json::{json, Value};
use shelfsync_tests::cluster::Cluster;
use shelfsync_tests::procs::{wait_for, wait_until};

const DEADLINE: Duration = Duration::from_secs(30);

/// The value of one series, given its name and labels exactly as rendered (`name{a="b"}`).
fn series(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' ')?.trim().parse().ok())
}

fn must(text: &str, name_and_labels: &str) -> f64 {
    series(text, name_and_labels).unwrap_or_else(|| panic!("{name_and_labels} missing from\n{text}"))
}

async fn hub_metrics(c: &Cluster) -> String {
    let r = reqwest::Client::new()
        .get(format!("{}/metrics", c.hub_url()))
        .bearer_auth(&c.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/plain; version=0.0.4"));
    r.text().await.unwrap()
}

async fn agent_metrics(c: &Cluster, i: usize) -> String {
    reqwest::get(format!("{}/metrics", c.agent_url(i))).await.unwrap().text().await.unwrap()
}

use shelfsync_tests::promtool::check as promtool_check;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_and_agent_metrics_after_activity() {
    let mut c = Cluster::start(1).await;
    c.restock(0, "A", 50).await;
    // The store has no catalog, so "unknown" means "never seen here": once the restock is there,
    // "A" is known. (Selling before it arrived would flag "A" or not, by a race.) A count of a
    // SKU the store never saw opens the one unknown_sku conflict, without negative stock.
    c.settled(0, "A", 50, DEADLINE).await;
    assert_eq!(c.count(0, "U", 1).await, 201);
    for _ in 0..3 {
        assert_eq!(c.sell(0, "A", 2).await, 201);
    }
    c.converged(&["A"], DEADLINE).await;
    assert_eq!(c.hub_get("/v1/availability/A").await["on_hand"], 44);
    let (s, v) = c
        .hub_post(
            "/v1/reservations",
            json!({"id": uuid::Uuid::now_v7(), "lines": [{"sku": "A", "qty": 1}], "ttl_secs": 600}),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let (s, _) = c
        .hub_post("/v1/reservations", json!({"id": uuid::Uuid::now_v7(), "lines": [{"sku": "A", "qty": 10_000}]}))
        .await;
    assert_eq!(s, 409);
    let (s, v) = c
        .hub_post(
            "/v1/reservations",
            json!({"id": uuid::Uuid::now_v7(), "lines": [{"sku": "A", "qty": 1}], "ttl_secs": 1}),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let (s, _) = c.hub_call(reqwest::Method::GET, "/no/such/path/12345", None).await;
    assert_eq!(s, 404);

    // Wait until the agent acked the restock and the hub acked its sales (gauges settle).
    let text = wait_for("the hub's view of the store to settle", DEADLINE, || async {
        let t = hub_metrics(&c).await;
        let expired = series(&t, r#"shelfsync_hub_reservations_total{action="expire",outcome="ok"}"#);
        // The unknown_sku conflict comes with the journal, which syncs after the counters.
        let unknown = series(&t, r#"shelfsync_hub_conflicts_open{kind="unknown_sku"}"#);
        let unacked = series(&t, r#"shelfsync_hub_store_unacked_entries{store="store-0"}"#);
        if unacked == Some(0.0) && expired == Some(1.0) && unknown == Some(1.0) {
            return Ok(t);
        }
        let agent = c.agent_status(0).await;
        Err(format!("unacked {unacked:?}, expired {expired:?}, unknown_sku {unknown:?}; the agent's status: {agent}"))
    })
    .await;
    assert_eq!(must(&text, r#"shelfsync_hub_store_connected{store="store-0"}"#), 1.0);
    let age = must(&text, r#"shelfsync_hub_store_last_seen_age_seconds{store="store-0"}"#);
    assert!((0.0..60.0).contains(&age), "{age}");
    assert_eq!(must(&text, "shelfsync_hub_connections_open"), 1.0);
    assert_eq!(must(&text, "shelfsync_hub_stores"), 1.0);
    assert!(must(&text, "shelfsync_hub_deltas_applied_total") >= 1.0);
    assert!(must(&text, "shelfsync_hub_entries_merged_total") >= 1.0);
    assert!(must(&text, "shelfsync_hub_merge_duration_seconds_count") >= 1.0);
    assert_eq!(must(&text, r#"shelfsync_hub_reservations_total{action="create",outcome="ok"}"#), 2.0);
    assert_eq!(must(&text, r#"shelfsync_hub_reservations_total{action="create",outcome="insufficient_stock"}"#), 1.0);
    for kind in ["oversell", "negative_stock", "duplicate_agent", "writer_cloned"] {
        assert_eq!(must(&text, &format!(r#"shelfsync_hub_conflicts_open{{kind="{kind}"}}"#)), 0.0);
    }
    // "U" was never seen at the store (and there is no catalog): its count opened one unknown_sku
    // conflict; "A", restocked before it was sold, opened none.
    assert_eq!(must(&text, r#"shelfsync_hub_conflicts_open{kind="unknown_sku"}"#), 1.0);
    assert!(must(&text, "shelfsync_hub_feed_head") >= 1.0);
    assert_eq!(must(&text, "shelfsync_hub_hub_changes_total"), 1.0);
    // Request durations by route template, never by raw path.
    assert!(
        must(
            &text,
            r#"shelfsync_hub_http_request_duration_seconds_count{route="/v1/restocks",method="POST",status="201"}"#
        ) >= 1.0
    );
    assert!(
        must(
            &text,
            r#"shelfsync_hub_http_request_duration_seconds_count{route="/v1/availability/{sku}",method="GET",status="200"}"#
        ) >= 1.0
    );
    assert!(
        must(
            &text,
            r#"shelfsync_hub_http_request_duration_seconds_count{route="unmatched",method="GET",status="404"}"#
        ) >= 1.0
    );
    assert!(!text.contains("12345"), "a raw path became a label");
    assert!(must(&text, "shelfsync_hub_http_connections_accepted_total") >= 1.0);
    process_and_build(&text, "hub");
    promtool_check("hub's metrics", &text);

    let text = wait_until("the agent's changes to be acked", DEADLINE, || async {
        let t = agent_metrics(&c, 0).await;
        (series(&t, "shelfsync_agent_unsynced_changes") == Some(0.0)).then_some(t)
    })
    .await;
    assert_eq!(must(&text, r#"shelfsync_agent_changes_total{kind="sale",outcome="created"}"#), 3.0);
    assert_eq!(must(&text, "shelfsync_agent_units_sold_total"), 6.0);
    assert_eq!(must(&text, "shelfsync_agent_sync_connected"), 1.0);
    assert_eq!(must(&text, "shelfsync_agent_sync_refused"), 0.0);
    let age = must(&text, "shelfsync_agent_last_sync_age_seconds");
    assert!((0.0..60.0).contains(&age), "{age}");
    assert!(must(&text, "shelfsync_agent_commit_duration_seconds_count") >= 3.0);
    assert!(
        must(
            &text,
            r#"shelfsync_agent_http_request_duration_seconds_count{route="/v1/sales",method="POST",status="201"}"#
        ) >= 3.0
    );
    process_and_build(&text, "agent");
    promtool_check("agent's metrics", &text);

    // An ordinary stop closes the connection normally: the hub sees the store go, and does not
    // count it as a protocol error.
    let errors_before = c.metric("connections_protocol_errors_total").await;
    c.stop_agent(0).await;
    let text = wait_until("the hub to see the store leave", DEADLINE, || async {
        let t = hub_metrics(&c).await;
        (series(&t, r#"shelfsync_hub_store_connected{store="store-0"}"#) == Some(0.0)).then_some(t)
    })
    .await;
    assert_eq!(must(&text, "shelfsync_hub_connections_open"), 0.0);
    assert_eq!(c.metric("connections_protocol_errors_total").await, errors_before);
}

fn process_and_build(text: &str, binary: &str) {
    assert!(must(text, "process_resident_memory_bytes") > 1e6);
    assert!(must(text, "process_open_fds") >= 3.0);
    assert!(must(text, "process_max_fds") >= must(text, "process_open_fds"));
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let start = must(text, "process_start_time_seconds");
    assert!(start > now - 600.0 && start <= now + 1.0, "{start} vs {now}");
    // CPU time (in clock ticks, so possibly still 0) is never negative and never more than every
    // core busy since the process started.
    let cpu = must(text, "process_cpu_seconds_total");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    assert!(cpu >= 0.0 && cpu <= (now - start + 1.0) * cores, "cpu {cpu} s over {} s", now - start);
    let build = format!(r#"shelfsync_build_info{{binary="{binary}",version="{}"}}"#, env!("CARGO_PKG_VERSION"));
    assert_eq!(must(text, &build), 1.0);
}

/// Every PromQL expression of `config/grafana-shelfsync.json` names only metrics the binaries
/// export (checked against the names this file's live test asserts plus the source's list).
#[test]
fn grafana_dashboard_queries_existing_metrics() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/grafana-shelfsync.json");
    let dash: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).expect("valid JSON");
    let known: Vec<&str> = KNOWN_METRICS.to_vec();
    let mut exprs = Vec::new();
    collect_exprs(&dash, &mut exprs);
    assert!(exprs.len() >= 10, "the dashboard has panels with queries: {exprs:?}");
    for e in &exprs {
        let names = metric_names(e);
        assert!(!names.is_empty(), "no metric in {e}");
        for n in names {
            assert!(known.contains(&n.as_str()), "{e} uses {n}, which no binary exports");
        }
    }
    assert!(dash["panels"].as_array().is_some_and(|p| !p.is_empty()));
    assert!(dash["title"].is_string());
}

/// Series names (histograms with their `_bucket`/`_sum`/`_count`) the hub and agent export.
const KNOWN_METRICS: &[&str] = &[
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_virtual_memory_bytes",
    "process_open_fds",
    "process_max_fds",
    "process_start_time_seconds",
    "process_threads",
    "shelfsync_build_info",
    "shelfsync_hub_store_connected",
    "shelfsync_hub_store_last_seen_age_seconds",
    "shelfsync_hub_store_unacked_entries",
    "shelfsync_hub_store_revoked",
    "shelfsync_hub_stores",
    "shelfsync_hub_conflicts_open",
    "shelfsync_hub_feed_head",
    "shelfsync_hub_connections_open",
    "shelfsync_hub_connections_accepted_total",
    "shelfsync_hub_connections_refused_total",
    "shelfsync_hub_connections_unauthorized_total",
    "shelfsync_hub_connections_protocol_errors_total",
    "shelfsync_hub_deltas_applied_total",
    "shelfsync_hub_entries_merged_total",
    "shelfsync_hub_merge_duration_seconds_bucket",
    "shelfsync_hub_merge_duration_seconds_count",
    "shelfsync_hub_merge_duration_seconds_sum",
    "shelfsync_hub_reservations_total",
    "shelfsync_hub_webhook_delivery_lag_seconds_bucket",
    "shelfsync_hub_webhook_lag_events",
    "shelfsync_hub_webhook_deliveries_total",
    "shelfsync_hub_webhook_failures_total",
    "shelfsync_hub_http_request_duration_seconds_bucket",
    "shelfsync_hub_http_request_duration_seconds_count",
    "shelfsync_hub_http_rate_limited_total",
    "shelfsync_hub_http_connections_open",
    "shelfsync_hub_digests_mismatched_total",
    "shelfsync_agent_unsynced_changes",
    "shelfsync_agent_unsynced_events",
    "shelfsync_agent_sync_connected",
    "shelfsync_agent_sync_refused",
    "shelfsync_agent_last_sync_age_seconds",
    "shelfsync_agent_changes_total",
    "shelfsync_agent_units_sold_total",
    "shelfsync_agent_commit_duration_seconds_bucket",
    "shelfsync_agent_http_request_duration_seconds_bucket",
];

fn collect_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if k == "expr" {
                    out.push(x.as_str().expect("expr is a string").to_owned());
                } else {
                    collect_exprs(x, out);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| collect_exprs(x, out)),
        _ => {}
    }
}

/// Identifiers in a PromQL expression that look like our metric names.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut cur = String::new();
    let mut in_braces = false;
    let mut in_quotes = false;
    for ch in expr.chars().chain(std::iter::once(' ')) {
        if in_quotes {
            in_quotes = ch != '"';
            continue;
        }
        if ch.is_ascii_alphanumeric() || ch == '_' || ch == ':' {
            cur.push(ch);
            continue;
        }
        if !in_braces && (cur.starts_with("shelfsync_") || cur.starts_with("process_")) {
            names.push(cur.clone());
        }
        cur.clear();
        match ch {
            '"' => in_quotes = true,
            '{' => in_braces = true,
            '}' => in_braces = false,
            _ => {}
        }
    }
    names
}
