//! The PostgreSQL server the `_postgres` variants of the end-to-end tests run on
//! (`shelfsync_tests::pg`): one server per test process, a distinct database per caller, and no
//! server left behind when the test process dies, even by `kill -9`.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use shelfsync_tests::pg;
use shelfsync_tests::procs::wait_until;
use tokio::io::{AsyncBufReadExt, BufReader};

/// Set in the child process of [`a_killed_test_process_leaves_no_server`].
const CHILD_ENV: &str = "SHELFSYNC_PG_HARNESS_CHILD";

/// Two concurrent callers get two databases on one server; each is usable and sees only its own
/// rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_fresh_databases_are_distinct_and_usable() {
    let (a, b) = tokio::join!(pg::fresh_database(), pg::fresh_database());
    assert_ne!(a, b);
    let port = pg::server().await.port();
    for url in [&a, &b] {
        assert!(url.starts_with(&format!("postgres://shelfsync@127.0.0.1:{port}/t_")), "{url}");
    }
    assert!(std::ptr::eq(pg::server().await, pg::server().await), "one server per process");

    let (ca, cb) = tokio::join!(pg::connect(&a), pg::connect(&b));
    for (client, value) in [(&ca, "in a"), (&cb, "in b")] {
        client.batch_execute("CREATE TABLE probe (id bigint PRIMARY KEY, value text NOT NULL)").await.unwrap();
        let n = client.execute("INSERT INTO probe VALUES (1, $1)", &[&value]).await.unwrap();
        assert_eq!(n, 1);
    }
    for (client, url, value) in [(&ca, &a, "in a"), (&cb, &b, "in b")] {
        let rows = client.query("SELECT value FROM probe", &[]).await.unwrap();
        let values: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        assert_eq!(values, vec![value.to_owned()], "only its own row");
        let name: String = client.query_one("SELECT current_database()", &[]).await.unwrap().get(0);
        assert!(url.ends_with(&format!("/{name}")), "{url} vs {name}");
    }
}

/// A test process that dies by `kill -9` with a server running leaves nothing: the watchdog stops
/// the server and removes its temp dir.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_test_process_leaves_no_server() {
    let mut child = spawn_child(Stdio::piped());
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let announce = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            // libtest may have printed `test child_holds_a_server ... ` on the same line.
            if let Some((_, rest)) = line.split_once("child server: ") {
                return Some(rest.to_owned());
            }
        }
        None
    })
    .await
    .expect("the child announces its server within 60 s")
    .expect("the child announces its server before exiting");
    let (url, dir) = announce.split_once(' ').unwrap();
    let dir = Path::new(dir).to_owned();
    let data = dir.join("data");
    assert!(data.join("PG_VERSION").is_file(), "{} is a PostgreSQL cluster", data.display());
    pg::connect(url).await.query_one("SELECT 1", &[]).await.expect("the child's server answers");
    let postmaster = |(_, cmdline): &(u32, String)| !cmdline.contains("shelfsync-pg-watchdog");
    assert!(processes_naming(&data).iter().any(postmaster), "postgres runs on {}", data.display());

    child.start_kill().unwrap();
    child.wait().await.unwrap();
    // Neither the server nor its watchdog (whose command line names the dir too) is left.
    wait_until("the child's server and watchdog to stop and its files to go", Duration::from_secs(30), || async {
        (processes_naming(&dir).is_empty() && !dir.exists()).then_some(())
    })
    .await;
    assert!(tokio_postgres::connect(url, tokio_postgres::NoTls).await.is_err(), "nothing answers at {url}");
}

/// A test process killed by `kill -9` while its server starts (`initdb` or the server's own
/// start-up, whichever the kill hits) leaves nothing either.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_test_process_killed_during_start_up_leaves_nothing() {
    let mut child = spawn_child(Stdio::null());
    let pid = child.id().unwrap();
    // The watchdog names the test's PID, then the temp dir: `shelfsync-pg-watchdog <pid> <dir> ...`.
    let needle = format!("shelfsync-pg-watchdog {pid} ");
    let dir = wait_until("the child's watchdog", Duration::from_secs(30), || async {
        processes_naming(Path::new(&needle)).into_iter().find_map(|(_, cmdline)| {
            let rest = cmdline.split_once(&needle)?.1;
            Some(Path::new(rest.split(' ').next()?).to_owned())
        })
    })
    .await;
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    wait_until("the child's server and watchdog to stop and its files to go", Duration::from_secs(30), || async {
        (processes_naming(&dir).is_empty() && !dir.exists()).then_some(())
    })
    .await;
}

/// This test executable again, running only [`child_holds_a_server`] (with [`CHILD_ENV`] set).
fn spawn_child(stdout: Stdio) -> tokio::process::Child {
    tokio::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_holds_a_server", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Not a test of its own: the child process of the two tests above (with [`CHILD_ENV`] set)
/// starts a server, announces it and waits to be killed. Without it, a no-op.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_holds_a_server() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let url = pg::fresh_database().await;
    let dir = pg::server().await.dir().to_owned();
    println!("child server: {url} {}", dir.display());
    std::future::pending::<()>().await;
}

/// PIDs and command lines (arguments joined by spaces) of the processes whose command line
/// contains `path` (the postmaster's `-D <dir>/data`, the watchdog's `<dir>`), from /proc.
fn processes_naming(path: &Path) -> Vec<(u32, String)> {
    let needle = path.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline.contains(&needle).then_some((pid, cmdline))
        })
        .collect()
}
