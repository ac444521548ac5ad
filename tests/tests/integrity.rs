//! Start-up against damaged, empty and missing databases with the real binaries and real files:
//! refused with a message naming the file and how to recover, and nothing written. Also: the
//! hub's files are private (0600, directories 0700), and older installs are tightened.

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Duration;

use serde_json::json;
use shelfsync_tests::procs::{bin, Proc};
use tokio::process::Command;
use uuid::Uuid;

/// Runs a binary that is expected to refuse to start; returns its stderr.
async fn refused(bin_name: &str, args: &[&str]) -> String {
    let child = Command::new(bin(bin_name)).args(args).kill_on_drop(true).output();
    let out = tokio::time::timeout(Duration::from_secs(30), child)
        .await
        .unwrap_or_else(|_| panic!("{bin_name} {args:?} started instead of refusing"))
        .unwrap();
    assert!(!out.status.success(), "{bin_name} {args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Folds the WAL into the database file (the processes are stopped), so the damage below hits
/// pages SQLite will read.
fn checkpoint(db: &Path) {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())).unwrap();
}

/// Writes garbage over two pages in the middle of the file.
fn damage(db: &Path) -> u64 {
    let len = std::fs::metadata(db).unwrap().len();
    let pages = len / 4096;
    assert!(pages >= 16, "fill the database first: only {pages} pages");
    let mut f = std::fs::OpenOptions::new().write(true).open(db).unwrap();
    f.seek(SeekFrom::Start(pages / 2 * 4096)).unwrap();
    f.write_all(&[0x5a; 8192]).unwrap();
    f.sync_all().unwrap();
    len
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_refuses_a_damaged_database_and_says_how_to_recover() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("agent");
    let ds = d.to_str().unwrap();
    Proc::run_ok("shelfsync-agent", &["init", "--store-id", "store-7", "--data-dir", ds]).await;
    let agent = Proc::start("shelfsync-agent", &["run", "--data-dir", ds, "--listen", "127.0.0.1:0"], &[]).await;
    let http = reqwest::Client::new();
    for i in 0..30 {
        let lines: Vec<_> = (0..100).map(|j| json!({"sku": format!("SKU-{i:02}-{j:03}"), "qty": 1})).collect();
        let r = http
            .post(format!("{}/v1/sales", agent.url))
            .json(&json!({"id": Uuid::now_v7(), "lines": lines}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
    agent.stop().await;
    let db = d.join("agent.db");
    checkpoint(&db);
    // Before the damage it starts; after, it must not.
    damage(&db);
    let err = refused("shelfsync-agent", &["run", "--data-dir", ds, "--listen", "127.0.0.1:0"]).await;
    assert!(err.contains(&format!("{} is damaged", db.display())), "{err}");
    assert!(err.contains("quick_check") && err.contains("Refusing to start"), "{err}");
    assert!(err.contains(&format!("shelfsync-agent init --bundle {ds}.damaged/bundle --data-dir {ds}")), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hub_refuses_a_damaged_database_and_says_how_to_recover() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("hub");
    let ds = d.to_str().unwrap();
    Proc::run_ok("shelfsync-hub", &["init", "--data-dir", ds]).await;
    Proc::run_ok(
        "shelfsync-hub",
        &["store", "add", "store-1", "--out", dir.path().join("b").to_str().unwrap(), "--data-dir", ds],
    )
    .await;
    let admin = Proc::run_ok("shelfsync-hub", &["token", "create", "--role", "admin", "--data-dir", ds])
        .await
        .trim()
        .to_owned();
    let serve = ["serve", "--data-dir", ds, "--quic-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"];
    let hub = Proc::start("shelfsync-hub", &serve, &[]).await;
    let http = reqwest::Client::new();
    for i in 0..20 {
        let lines: Vec<_> = (0..100).map(|j| json!({"sku": format!("SKU-{i:02}-{j:03}"), "qty": 5})).collect();
        let r = http
            .post(format!("{}/v1/restocks", hub.url))
            .bearer_auth(&admin)
            .json(&json!({"id": Uuid::now_v7(), "store": "store-1", "lines": lines}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
    hub.stop().await;
    let db = d.join("hub.db");
    checkpoint(&db);
    damage(&db);
    let err = refused("shelfsync-hub", &serve).await;
    assert!(err.contains(&format!("{} is damaged", db.display())), "{err}");
    assert!(err.contains("quick_check") && err.contains("Refusing to start"), "{err}");
    assert!(err.contains("shelfsync-hub backup --to"), "{err}");
    // Admin verbs refuse it too rather than writing into a damaged file.
    let err = refused("shelfsync-hub", &["token", "create", "--role", "viewer", "--data-dir", ds]).await;
    assert!(err.contains("is damaged"), "{err}");
}

#[tokio::test]
async fn an_empty_database_file_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("agent");
    std::fs::create_dir(&a).unwrap();
    std::fs::File::create(a.join("agent.db")).unwrap();
    let err = refused("shelfsync-agent", &["run", "--data-dir", a.to_str().unwrap(), "--listen", "127.0.0.1:0"]).await;
    assert!(err.contains(&format!("{} is empty (0 bytes)", a.join("agent.db").display())), "{err}");
    assert!(err.contains("shelfsync-agent init --bundle"), "{err}");
    assert_eq!(entries(&a), ["agent.db"], "no WAL, no SHM, no schema written");
    assert_eq!(std::fs::metadata(a.join("agent.db")).unwrap().len(), 0);

    let h = dir.path().join("hub");
    Proc::run_ok("shelfsync-hub", &["init", "--data-dir", h.to_str().unwrap()]).await;
    std::fs::remove_file(h.join("hub.db")).unwrap();
    std::fs::File::create(h.join("hub.db")).unwrap();
    let serve =
        ["serve", "--data-dir", h.to_str().unwrap(), "--quic-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"];
    let err = refused("shelfsync-hub", &serve).await;
    assert!(err.contains(&format!("{} is empty (0 bytes)", h.join("hub.db").display())), "{err}");
    assert_eq!(entries(&h), ["hub.db", "pki"]);
    assert_eq!(std::fs::metadata(h.join("hub.db")).unwrap().len(), 0);
}

#[tokio::test]
async fn starting_on_an_uninitialised_data_dir_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("never-initialised");
    let err =
        refused("shelfsync-agent", &["run", "--data-dir", missing.to_str().unwrap(), "--listen", "127.0.0.1:0"]).await;
    assert!(err.contains("run `shelfsync-agent init` first"), "{err}");
    let err = refused(
        "shelfsync-hub",
        &[
            "serve",
            "--data-dir",
            missing.to_str().unwrap(),
            "--quic-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ],
    )
    .await;
    assert!(err.contains("run `shelfsync-hub init"), "{err}");
    assert!(!missing.exists(), "nothing was created");
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let err =
        refused("shelfsync-agent", &["run", "--data-dir", empty.to_str().unwrap(), "--listen", "127.0.0.1:0"]).await;
    assert!(err.contains("shelfsync-agent init"), "{err}");
    assert_eq!(entries(&empty), Vec::<String>::new());
}

#[cfg(unix)]
fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_files_are_private_and_older_installs_are_tightened() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("hub");
    let ds = d.to_str().unwrap();
    Proc::run_ok("shelfsync-hub", &["init", "--data-dir", ds]).await;
    assert_eq!(
        [mode(&d), mode(&d.join("hub.db")), mode(&d.join("pki")), mode(&d.join("pki/ca.key"))],
        [0o700, 0o600, 0o700, 0o600]
    );
    let bundle = dir.path().join("bundle");
    Proc::run_ok("shelfsync-hub", &["store", "add", "store-1", "--out", bundle.to_str().unwrap(), "--data-dir", ds])
        .await;
    assert_eq!([mode(&bundle), mode(&bundle.join("store.key"))], [0o700, 0o600], "the bundle holds a private key");
    let serve = ["serve", "--data-dir", ds, "--quic-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"];
    let hub = Proc::start("shelfsync-hub", &serve, &[]).await;
    for f in ["hub.db-wal", "hub.db-shm"] {
        assert_eq!(mode(&d.join(f)), 0o600, "{f}");
    }
    let backup = dir.path().join("hub-backup.db");
    Proc::run_ok("shelfsync-hub", &["backup", "--to", backup.to_str().unwrap(), "--data-dir", ds]).await;
    assert_eq!(mode(&backup), 0o600);
    hub.stop().await;

    // As an older version left them: readable by everyone.
    for (p, m) in [(d.clone(), 0o755), (d.join("hub.db"), 0o644), (d.join("pki"), 0o755), (d.join("pki/ca.key"), 0o644)]
    {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(m)).unwrap();
    }
    let hub = Proc::start("shelfsync-hub", &serve, &[]).await;
    assert_eq!(
        [mode(&d), mode(&d.join("hub.db")), mode(&d.join("pki")), mode(&d.join("pki/ca.key"))],
        [0o700, 0o600, 0o700, 0o600]
    );
    hub.stop().await;
}
