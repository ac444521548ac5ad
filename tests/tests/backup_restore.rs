//! `backup` and `restore` of whole data dirs, with real processes on loopback: a hub backed up
//! while stores sell, stopped, restored into a new data dir and started on the same QUIC port —
//! the stores reconnect with the bundles they have, and the hub ends with every sale exactly once;
//! a store restored from its backup takes a new writer at once and nothing is counted twice; and
//! a restore refuses a non-empty target or a damaged backup without writing anything.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use shelfsync_tests::cluster::Cluster;
use shelfsync_tests::procs::{bin, wait_until, Proc};

const SETTLE: Duration = Duration::from_secs(30);

async fn journal_events(c: &Cluster, store: &str) -> u64 {
    let stores = c.hub_get("/v1/stores").await;
    stores["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == store)
        .and_then(|s| s["journal_events"].as_u64())
        .unwrap_or(0)
}

/// Runs a command that must fail; its stderr.
async fn run_fail(bin_name: &str, args: &[&str]) -> String {
    let out = tokio::process::Command::new(bin(bin_name)).args(args).output().await.expect("spawn");
    assert!(!out.status.success(), "{bin_name} {args:?} should have failed: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// Every file under `dir` with its size and modification time, to show nothing was touched.
fn listing(dir: &Path) -> Vec<(PathBuf, u64, std::time::SystemTime)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let m = e.metadata().unwrap();
            if m.is_dir() {
                stack.push(e.path());
            } else {
                out.push((e.path(), m.len(), m.modified().unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// Nothing named like a restore's work dir is left in `dir`.
fn no_leftovers(dir: &Path) {
    let left: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".restore-"))
        .collect();
    assert!(left.is_empty(), "a failed restore left {left:?}");
}

/// A copy of `backup` cut to half its length.
fn truncated(backup: &Path) -> PathBuf {
    let bytes = std::fs::read(backup).unwrap();
    let cut = backup.with_extension("truncated");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    cut
}

/// The refusals of `restore`: into a non-empty dir, and from a truncated backup; neither writes.
async fn restore_refuses(binary: &str, backup: &Path, full_dir: &Path, scratch: &Path) {
    let before = listing(full_dir);
    let err =
        run_fail(binary, &["restore", "--from", backup.to_str().unwrap(), "--data-dir", full_dir.to_str().unwrap()])
            .await;
    assert!(err.contains("is not empty") && err.contains(full_dir.to_str().unwrap()), "{err}");
    assert_eq!(listing(full_dir), before, "the non-empty dir is untouched");

    let cut = truncated(backup);
    let target = scratch.join("from-truncated");
    let err =
        run_fail(binary, &["restore", "--from", cut.to_str().unwrap(), "--data-dir", target.to_str().unwrap()]).await;
    assert!(err.contains(cut.to_str().unwrap()) && err.contains("Nothing was written"), "{err}");
    assert!(!target.exists(), "a damaged backup creates nothing");
    no_leftovers(scratch);
}

/// Two stores sell; the hub is backed up while it runs; they sell more; the hub is stopped and
/// restored from the backup into a NEW data dir and started on the same QUIC port. The stores
/// reconnect with their bundles, give back what the backup lacked, sell on, and the hub ends with
/// every sale exactly once under a new incarnation.
#[tokio::test]
async fn a_hub_restored_into_a_new_dir_ends_with_every_sale_once() {
    let mut c = Cluster::start(2).await;
    for i in 0..2 {
        assert_eq!(c.count(i, "A", 100).await, 201);
        c.sell_n(i, "A", 10).await;
        c.settled(i, "A", 90, SETTLE).await;
    }
    let hd = c.hub_dir();
    let backup = c.dir.path().join("hub.backup");
    let out = Proc::run_ok(
        "shelfsync-hub",
        &["backup", "--to", backup.to_str().unwrap(), "--data-dir", hd.to_str().unwrap()],
    )
    .await;
    assert!(out.contains("backed up"), "{out}");
    assert_eq!(mode(&backup), 0o600, "a backup holds the CA's key");
    let old_status: Value = serde_json::from_str(
        &Proc::run_ok("shelfsync-hub", &["status", "--json", "--data-dir", hd.to_str().unwrap()]).await,
    )
    .unwrap();
    let old_writer = old_status["hub_writer"].as_str().unwrap().to_owned();

    // After the backup: sales the restored hub must get back from the stores.
    c.sell_n(0, "A", 7).await;
    c.sell_n(1, "A", 4).await;
    c.settled(0, "A", 83, SETTLE).await;
    c.settled(1, "A", 86, SETTLE).await;
    c.stop_hub().await;

    restore_refuses("shelfsync-hub", &backup, &hd, c.dir.path()).await;

    let new_dir = c.dir.path().join("hub-new-machine");
    let out = Proc::run_ok(
        "shelfsync-hub",
        &["restore", "--from", backup.to_str().unwrap(), "--data-dir", new_dir.to_str().unwrap()],
    )
    .await;
    assert!(out.contains("new incarnation"), "{out}");
    assert_eq!(mode(&new_dir), 0o700);
    for f in ["hub.db", "pki/ca.key", "pki/hub.key"] {
        assert_eq!(mode(&new_dir.join(f)), 0o600, "{f}");
    }
    let restored: Value = serde_json::from_str(
        &Proc::run_ok("shelfsync-hub", &["status", "--json", "--data-dir", new_dir.to_str().unwrap()]).await,
    )
    .unwrap();
    assert_eq!(restored["restored_copy"], true, "{restored}");
    assert_eq!(restored["stores"], 2, "{restored}");

    // The old machine is gone; the new one serves on the same address.
    std::fs::rename(&hd, c.dir.path().join("hub-lost")).unwrap();
    c.hub_data_dir = new_dir.clone();
    c.start_hub().await;
    c.settled(0, "A", 83, SETTLE).await;
    c.settled(1, "A", 86, SETTLE).await;
    c.sell_n(0, "A", 3).await;
    c.sell_n(1, "A", 2).await;
    c.settled(0, "A", 80, SETTLE).await;
    c.settled(1, "A", 84, SETTLE).await;
    // Every sale once in the journal: the count, 10 before the backup, those after, those since.
    for (store, want) in [("store-0", 1 + 10 + 7 + 3), ("store-1", 1 + 10 + 4 + 2)] {
        wait_until(&format!("the hub's journal of {store} to hold every sale once"), SETTLE, || async {
            (journal_events(&c, store).await == want).then_some(())
        })
        .await;
    }

    let now: Value = serde_json::from_str(
        &Proc::run_ok("shelfsync-hub", &["status", "--json", "--data-dir", new_dir.to_str().unwrap()]).await,
    )
    .unwrap();
    assert_ne!(now["hub_writer"].as_str().unwrap(), old_writer, "the restored hub took a new incarnation");
    assert_eq!(now["restored_copy"], false, "{now}");
    let conflicts = c.conflicts(0).await;
    assert!(conflicts.iter().any(|x| x["kind"] == "hub_rolled_back"), "{conflicts:?}");
    assert_eq!(c.metric("hub_rollbacks_total").await, 1, "the new life is counted");
}

/// A store backed up while it runs sells on (the hub gets those sales), is restored from the
/// backup into a new data dir and run: it records under a new writer from the first sale, and the
/// hub counts every sale exactly once.
#[tokio::test]
async fn a_store_restored_from_its_backup_takes_a_new_writer_and_counts_every_sale_once() {
    let mut c = Cluster::start(1).await;
    assert_eq!(c.count(0, "A", 50).await, 201);
    c.sell_n(0, "A", 5).await;
    c.settled(0, "A", 45, SETTLE).await;
    let old_writer = c.agent_status(0).await["writer"].as_str().unwrap().to_owned();
    let ad = c.agent_dir(0);
    let backup = c.dir.path().join("agent.backup");
    Proc::run_ok("shelfsync-agent", &["backup", "--to", backup.to_str().unwrap(), "--data-dir", ad.to_str().unwrap()])
        .await;
    assert_eq!(mode(&backup), 0o600, "a backup holds the store's key");

    c.sell_n(0, "A", 4).await;
    c.settled(0, "A", 41, SETTLE).await;
    c.stop_agent(0).await;

    restore_refuses("shelfsync-agent", &backup, &ad, c.dir.path()).await;

    // A new machine: the next agent slot, restored from the backup.
    let k = c.agents.len();
    c.stores.push(c.stores[0].clone());
    c.agents.push(None);
    let new_dir = c.agent_dir(k);
    let out = Proc::run_ok(
        "shelfsync-agent",
        &["restore", "--from", backup.to_str().unwrap(), "--data-dir", new_dir.to_str().unwrap()],
    )
    .await;
    assert!(out.contains(&format!("writer {old_writer} retired")), "{out}");
    for f in ["agent.db", "bundle/store.key"] {
        assert_eq!(mode(&new_dir.join(f)), 0o600, "{f}");
    }
    c.start_agent(k).await;
    let writer = c.agent_status(k).await["writer"].as_str().unwrap().to_owned();
    assert_ne!(writer, old_writer, "the restored store has a new incarnation before it even connects");
    c.settled(k, "A", 41, SETTLE).await;
    c.sell_n(k, "A", 2).await;
    c.settled(k, "A", 39, SETTLE).await;
    wait_until("the hub's journal to hold every sale once", SETTLE, || async {
        (journal_events(&c, "store-0").await == 1 + 5 + 4 + 2).then_some(())
    })
    .await;
    assert_eq!(c.agent_status(k).await["writer"].as_str().unwrap(), writer, "no second retirement");
    let conflicts = c.conflicts(0).await;
    let rolled = conflicts.iter().find(|x| x["kind"] == "store_rolled_back").expect("a store_rolled_back conflict");
    assert_eq!(rolled["details"]["old_writer"], old_writer.as_str(), "{rolled}");
    assert_eq!(rolled["details"]["moved_changes"], 0, "{rolled}");

    // The readable status names the new writer; --json is the API's answer.
    let url = c.agent_url(k);
    let text = Proc::run_ok("shelfsync-agent", &["status", "--agent", &url]).await;
    assert!(text.contains("writer") && text.contains(&writer) && text.contains("connected"), "{text}");
    let json: Value =
        serde_json::from_str(&Proc::run_ok("shelfsync-agent", &["status", "--json", "--agent", &url]).await).unwrap();
    assert_eq!(json["writer"], writer.as_str());
}
