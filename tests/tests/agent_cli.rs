//! The agent's CLI verbs against a running agent binary.

use shelfsync_tests::procs::{bin, Proc};
use tokio::process::Command;

async fn cli(url: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin("shelfsync-agent")).arg("--agent").arg(url).args(args).output().await.unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn cli_verbs_talk_to_the_running_agent() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let out = Proc::run_ok("shelfsync-agent", &["init", "--store-id", "store-cli", "--data-dir", d]).await;
    assert!(out.contains("store-cli@"), "{out}");
    // A second init refuses to overwrite the ledger.
    let again = Command::new(bin("shelfsync-agent"))
        .args(["init", "--store-id", "store-cli", "--data-dir", d])
        .output()
        .await
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));

    let agent = Proc::start("shelfsync-agent", &["run", "--data-dir", d, "--listen", "127.0.0.1:0"], &[]).await;
    let url_owned = agent.url.clone();
    let url = url_owned.as_str();
    assert!(cli(url, &["count", "HSS-001", "10"]).await.0);
    let (ok, out, _) = cli(url, &["sell", "HSS-001", "3"]).await;
    assert!(ok && out.contains("on_hand 7"), "{out}");
    let (ok, out, _) = cli(url, &["adjust", "HSS-001", "-2", "--reason", "damaged", "--note", "dropped"]).await;
    assert!(ok && out.contains("on_hand 5"), "{out}");
    let (ok, _, err) = cli(url, &["adjust", "HSS-001", "-2", "--reason", "dropped it"]).await;
    assert!(!ok && err.contains("reason must be one of"), "{err}");
    let (ok, out, _) = cli(url, &["return", "HSS-001", "1"]).await;
    assert!(ok && out.contains("on_hand 6"), "{out}");
    let (ok, out, _) = cli(url, &["--json", "stock", "HSS-001"]).await;
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(ok);
    assert_eq!(v["on_hand"], 6);
    let (ok, out, _) = cli(url, &["stock"]).await;
    assert!(ok && out.contains("HSS-001"), "{out}");
    let (ok, out, _) = cli(url, &["--json", "status"]).await;
    assert!(ok && out.contains("\"store\": \"store-cli\""), "{out}");

    // Failures exit non-zero with the server's message.
    let (ok, _, err) = cli(url, &["sell", "HSS-001", "0"]).await;
    assert!(!ok);
    assert!(err.contains("422") && err.contains("qty must be between 1"), "{err}");
    let (ok, _, err) = cli(url, &["stock", "NOPE"]).await;
    assert!(!ok && err.contains("unknown here"), "{err}");
    // Any key will do: a receipt number.
    let id = "R-0042/till 3".to_owned();
    assert!(cli(url, &["sell", "HSS-001", "1", "--id", &id]).await.0);
    let (ok, _, err) = cli(url, &["sell", "HSS-001", "2", "--id", &id]).await;
    assert!(!ok && err.contains("idempotency_conflict"), "{err}");
    agent.stop().await;
    let (ok, _, err) = cli(url, &["status"]).await;
    assert!(!ok && err.contains("cannot reach"), "{err}");
}
