//! API tokens through the real CLI while a real hub process runs: a revocation written by another
//! process refuses the token's very next request.

use std::time::Duration;

use serde_json::Value;
use shelfsync_tests::cluster::Cluster;
use shelfsync_tests::procs::{bin, wait_until, Proc};
use tokio::process::Command;

async fn hub_cli(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin("shelfsync-hub")).args(args).output().await.unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_tokens_are_named_listed_and_revoked_while_the_hub_runs() {
    let c = Cluster::start(0).await;
    let hd = c.hub_dir();
    let d = hd.to_str().unwrap();
    let out = Proc::run_ok(
        "shelfsync-hub",
        &["token", "create", "--role", "viewer", "--name", "pos feed", "--expires-in", "30d", "--data-dir", d],
    )
    .await;
    assert_eq!(out.lines().count(), 1, "only the token is printed: {out}");
    let secret = out.trim().to_owned();
    assert!(secret.starts_with("ss_"), "{secret}");
    let http = reqwest::Client::new();
    let get = |token: String| {
        let url = format!("{}/v1/availability?sku=A", c.hub_url());
        let http = http.clone();
        async move {
            let r = http.get(url).bearer_auth(token).send().await.unwrap();
            let s = r.status().as_u16();
            (s, r.json::<Value>().await.unwrap())
        }
    };
    assert_eq!(get(secret.clone()).await.0, 200);

    // The table and the JSON list show every token, never a secret.
    let table = Proc::run_ok("shelfsync-hub", &["token", "list", "--data-dir", d]).await;
    assert!(!table.contains(&secret) && !table.contains(&c.admin_token), "{table}");
    let header = table.lines().next().unwrap();
    for col in ["ID", "NAME", "ROLE", "STATUS", "CREATED", "LAST USED", "EXPIRES", "REVOKED"] {
        assert!(header.contains(col), "{header}");
    }
    let row = table.lines().find(|l| l.contains("pos feed")).expect("the named token is listed");
    assert!(row.contains("viewer") && row.contains("active"), "{row}");
    assert!(table.lines().any(|l| l.contains("unnamed") && l.contains("admin")), "the cluster's admin token: {table}");
    let listed = || async {
        let json = Proc::run_ok("shelfsync-hub", &["token", "list", "--json", "--data-dir", d]).await;
        assert!(!json.contains(&secret), "{json}");
        let all: Vec<Value> = serde_json::from_str(&json).unwrap();
        all.into_iter().find(|t| t["name"] == "pos feed").unwrap()
    };
    let mine = listed().await;
    assert_eq!((mine["role"].as_str(), mine["status"].as_str()), (Some("viewer"), Some("active")));
    assert!(mine["expires_at"].is_string() && mine["revoked_at"].is_null(), "{mine}");
    let used = wait_until("last use recorded", Duration::from_secs(10), || async {
        let t = listed().await;
        t["last_used_at"].as_str().map(str::to_owned)
    })
    .await;
    assert!(!used.is_empty());

    // Revoked from another process: refused on the very next request, no wait.
    let id = mine["id"].as_str().unwrap().to_owned();
    let out = Proc::run_ok("shelfsync-hub", &["token", "revoke", &id, "--data-dir", d]).await;
    assert!(out.contains(&id) && out.contains("revoked"), "{out}");
    let (s, v) = get(secret.clone()).await;
    assert_eq!((s, v["error"].as_str()), (401, Some("token_revoked")), "{v}");
    assert_eq!(listed().await["status"], "revoked");
    assert_eq!(get(c.admin_token.clone()).await.0, 200, "other tokens keep working");

    // Mistakes are refused with a message and change nothing.
    let (ok, _, err) = hub_cli(&["token", "revoke", "nope", "--data-dir", d]).await;
    assert!(!ok && err.contains("not a token id"), "{err}");
    let (ok, _, err) = hub_cli(&["token", "revoke", &uuid::Uuid::now_v7().to_string(), "--data-dir", d]).await;
    assert!(!ok && err.contains("no token"), "{err}");
    let (ok, out, err) = hub_cli(&["token", "create", "--role", "viewer", "--expires-in", "3w", "--data-dir", d]).await;
    assert!(!ok && out.is_empty() && err.contains("--expires-in"), "{err}");
    let n = serde_json::from_str::<Vec<Value>>(
        &Proc::run_ok("shelfsync-hub", &["token", "list", "--json", "--data-dir", d]).await,
    )
    .unwrap()
    .len();
    assert_eq!(n, 2, "the admin token and the revoked one");
}
