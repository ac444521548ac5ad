//! A throwaway PostgreSQL server for the tests: started at most once per test process, on demand,
//! in a fresh temp dir on a free loopback port, and stopped (its files removed) by a watchdog
//! once the test process is gone, however it ended (`kill -9` included).
//!
//! Each test takes its own database from [`fresh_database`]. The binaries come from
//! `$SHELFSYNC_PG_BIN`, else the newest `/usr/lib/postgresql/*/bin`, else `initdb` on `PATH`; with
//! none of them every caller panics with how to install PostgreSQL (the PostgreSQL variants of the
//! tests never skip). PostgreSQL refuses to run as root: when the tests do, the server runs as the
//! `postgres` user (else `nobody`) while its watchdog stays with the test's user, so that it can
//! watch the test process.

use std::ffi::{CStr, CString, OsString};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

/// Environment variable naming a directory that holds `initdb` and `postgres`; it wins over the
/// binaries found on the system.
pub const PG_BIN_ENV: &str = "SHELFSYNC_PG_BIN";

/// The superuser `initdb` creates and every test database belongs to (trust authentication: no
/// password).
pub const PG_USER: &str = "shelfsync";

/// A role (created by [`tls_only_role`]) that `pg_hba.conf` lets in over TLS only: plain-text
/// connections as it are rejected. Every server this module starts has TLS on (its own CA,
/// [`PgServer::ca_file`]).
pub const TLS_USER: &str = "tlsonly";

/// Creates [`TLS_USER`] (a superuser, so that it can create a hub's tables) if it does not exist.
pub async fn tls_only_role() {
    let server = server().await;
    let admin = connect(&server.url("postgres")).await;
    let sql = format!(
        "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{TLS_USER}') THEN \
         CREATE ROLE {TLS_USER} LOGIN SUPERUSER; END IF; END $$"
    );
    if let Err(e) = admin.batch_execute(&sql).await {
        panic!("creating the role {TLS_USER}: {e:?}\nserver log (end):\n{}", server.log_tail());
    }
}

/// How long `initdb` plus the server's start may take before a real connection works.
const READY_DEADLINE: Duration = Duration::from_secs(60);

/// How many ports to try when the free port we picked was taken before PostgreSQL bound it.
const PORT_ATTEMPTS: usize = 5;

/// The watchdog, run by `/bin/sh` as the test's own user. `$1` is the test's PID, `$2` the temp
/// dir, `$3` the directory of the binaries, `$4` the port, `$5` the superuser to create; the rest
/// is what runs a command as the server's user (`setpriv ... --` when the test runs as root, else
/// nothing).
///
/// It runs `initdb` (a failure leaves `initdb.failed` with the status, and `initdb.log`), then
/// the server in the background (if it dies, `postgres.exited` gets its status; its log is
/// `postgres.log`). Once the test process is gone, at any point, or on SIGTERM, it stops whatever
/// runs (SIGINT, which is a fast shutdown for the server; SIGKILL after 10 s) and removes the temp
/// dir. It lives in its own process group so that a harness killing the test's group (Ctrl-C, a
/// timeout) still leaves it to clean up, and it waits for its children, so none is left a zombie.
const WATCHDOG: &str = r#"
testpid=$1
dir=$2
bin=$3
port=$4
user=$5
shift 5
trap '' INT HUP
child=
stop() {
  trap '' TERM
  if [ -n "$child" ]; then
    kill -INT "$child" 2>/dev/null
    n=0
    while kill -0 "$child" 2>/dev/null && [ "$n" -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
    kill -KILL "$child" 2>/dev/null
    wait "$child" 2>/dev/null
  fi
  rm -rf "$dir"
  exit 0
}
trap stop TERM
alive() { kill -0 "$testpid" 2>/dev/null; }

"$@" "$bin/initdb" -A trust -U "$user" --no-sync -E UTF8 --locale=C -D "$dir/data" \
  >"$dir/initdb.log" 2>&1 </dev/null &
child=$!
while kill -0 "$child" 2>/dev/null; do
  alive || stop
  sleep 0.1
done
wait "$child"
status=$?
child=
if [ "$status" -ne 0 ]; then
  echo "$status" >"$dir/initdb.failed"
else
  # The TLS-only role: over TLS it gets in, in plain text it is turned away.
  "$@" /bin/sh -c 'cp "$1/pg_hba.conf" "$1/pg_hba.orig" &&
    { printf "%s\n" "hostssl all tlsonly 127.0.0.1/32 trust" "host all tlsonly 127.0.0.1/32 reject";
      cat "$1/pg_hba.orig"; } >"$1/pg_hba.conf"' sh "$dir/data"
  "$@" "$bin/postgres" -D "$dir/data" -h 127.0.0.1 -p "$port" -k "$dir/sock" \
    $SHELFSYNC_PG_SPEED -c max_connections=300 \
    -c ssl=on -c ssl_cert_file="$dir/tls/server.crt" -c ssl_key_file="$dir/tls/server.key" \
    >>"$dir/postgres.log" 2>&1 </dev/null &
  child=$!
fi
while alive; do
  if [ -n "$child" ] && ! kill -0 "$child" 2>/dev/null; then
    wait "$child"
    echo "$?" >"$dir/postgres.exited"
    child=
  fi
  sleep 0.2
done
stop
"#;

static DURABLE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Makes the server this process starts durable (fsync and synchronous commit on, PostgreSQL's
/// defaults), for benchmarks; tests run it without (faster, and nothing outlives them). Call
/// before the first [`server`].
pub fn set_durable(durable: bool) {
    DURABLE.store(durable, std::sync::atomic::Ordering::Relaxed);
}

/// The running server of this test process.
#[derive(Debug)]
pub struct PgServer {
    port: u16,
    dir: PathBuf,
    watchdog_pid: u32,
}

impl PgServer {
    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The temp dir holding `data/` (the cluster), `sock/` (the unix socket) and `postgres.log`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The PID of the watchdog shell that stops the server when the test process is gone.
    pub fn watchdog_pid(&self) -> u32 {
        self.watchdog_pid
    }

    /// A URL for `database` as [`PG_USER`] (what the hub takes in `SHELFSYNC_HUB_DATABASE_URL`).
    pub fn url(&self, database: &str) -> String {
        format!("postgres://{PG_USER}@127.0.0.1:{}/{database}", self.port)
    }

    /// A URL for `database` as [`TLS_USER`], which the server lets in over TLS only, with no
    /// TLS parameters (add `?sslmode=…&sslrootcert=…`).
    pub fn tls_user_url(&self, database: &str) -> String {
        format!("postgres://{TLS_USER}@127.0.0.1:{}/{database}", self.port)
    }

    /// The CA certificate (PEM) that signed the server's certificate (for 127.0.0.1).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("tls").join("ca.pem")
    }

    /// The end of the server's log (its stderr), for error messages.
    pub fn log_tail(&self) -> String {
        log_tail(&self.dir)
    }
}

/// The server, or why it could not be started (every later caller gets the same message).
static SERVER: OnceLock<Result<PgServer, String>> = OnceLock::new();

/// Numbers the databases of this process.
static NEXT_DATABASE: AtomicU64 = AtomicU64::new(0);

/// This process's server, started on first use (concurrent first callers wait for the same one).
///
/// Panics, naming the cause and including the server's log where there is one, when no server can
/// be started: missing binaries, a failed `initdb`, or no connection within 60 s.
pub async fn server() -> &'static PgServer {
    // The start blocks (initdb, polling): keep it off the test's async workers.
    let started = tokio::task::spawn_blocking(|| SERVER.get_or_init(start))
        .await
        .expect("the PostgreSQL start-up thread panicked");
    match started {
        Ok(server) => server,
        Err(e) => panic!("{e}"),
    }
}

/// Creates a new, empty database on this process's server (starting it first if needed) and
/// returns its URL, `postgres://shelfsync@127.0.0.1:PORT/t_<n>_<pid>`. Safe to call from many
/// tests at once; every call gets its own database.
pub async fn fresh_database() -> String {
    let server = server().await;
    let name = format!("t_{}_{}", NEXT_DATABASE.fetch_add(1, Ordering::Relaxed), std::process::id());
    let admin = connect(&server.url("postgres")).await;
    if let Err(e) = admin.batch_execute(&format!("CREATE DATABASE {name}")).await {
        panic!("CREATE DATABASE {name} failed: {e:?}\nserver log (end):\n{}", server.log_tail());
    }
    server.url(&name)
}

/// A connection to `url`, driven by a task on the current runtime (it ends when the client is
/// dropped). Panics with the error if the connection fails.
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting to {url}: {e:?}"));
    tokio::spawn(async move {
        // An error here is the server going away under a test; the client's next call reports it.
        let _ = connection.await;
    });
    client
}

/// Who runs `initdb` and `postgres` when the tests run as root.
struct RunAs {
    name: String,
    uid: libc::uid_t,
    gid: libc::gid_t,
    setpriv: PathBuf,
}

/// How one start attempt ended, short of a fatal error.
enum Attempt {
    Ready(PgServer),
    /// Another process took the port between our probe and PostgreSQL's bind; the log says so.
    PortTaken(String),
}

/// Starts the server: finds the binaries, then tries a few free ports.
fn start() -> Result<PgServer, String> {
    let bin = find_bin_dir()?;
    let run_as = run_as()?;
    // A runtime of our own for the readiness probe: this runs on a blocking thread, and the first
    // caller's runtime may end before the server does.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("building a runtime for the PostgreSQL readiness probe: {e}"))?;
    let mut last_log = String::new();
    for _ in 0..PORT_ATTEMPTS {
        match start_once(&rt, &bin, run_as.as_ref())? {
            Attempt::Ready(server) => return Ok(server),
            Attempt::PortTaken(log) => last_log = log,
        }
    }
    Err(format!(
        "PostgreSQL found its port taken {PORT_ATTEMPTS} times in a row (another process binds ports as fast as we \
         pick them?); last server log:\n{last_log}"
    ))
}

/// One attempt: a fresh temp dir, then the watchdog, which runs `initdb` and the server on a
/// free port, and a wait until a real connection works.
fn start_once(rt: &tokio::runtime::Runtime, bin: &Path, run_as: Option<&RunAs>) -> Result<Attempt, String> {
    let base = if run_as.is_some() { PathBuf::from("/tmp") } else { std::env::temp_dir() };
    let dir = tempfile::Builder::new()
        .prefix("shelfsync-pg-")
        .tempdir_in(&base)
        .map_err(|e| format!("creating a temp dir for PostgreSQL in {}: {e}", base.display()))?
        .keep();
    let sock = dir.join("sock");
    let fail = |msg: String| {
        let _ = std::fs::remove_dir_all(&dir);
        msg
    };
    std::fs::create_dir(&sock).map_err(|e| fail(format!("creating {}: {e}", sock.display())))?;
    for d in [&dir, &sock] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| fail(format!("chmod 0700 {}: {e}", d.display())))?;
        if let Some(r) = run_as {
            std::os::unix::fs::chown(d, Some(r.uid), Some(r.gid))
                .map_err(|e| fail(format!("chown {} to {}: {e}", d.display(), r.name)))?;
        }
    }
    write_tls(&dir.join("tls"), run_as).map_err(|e| fail(format!("writing the server's TLS files: {e}")))?;
    let port = free_port().map_err(|e| fail(format!("finding a free port on 127.0.0.1: {e}")))?;

    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(WATCHDOG)
        .arg("shelfsync-pg-watchdog")
        .arg(std::process::id().to_string())
        .arg(&dir)
        .arg(bin)
        .arg(port.to_string())
        .arg(PG_USER);
    if let Some(r) = run_as {
        cmd.arg(&r.setpriv)
            .arg(format!("--reuid={}", r.uid))
            .arg(format!("--regid={}", r.gid))
            .arg("--clear-groups")
            .arg("--");
    }
    let speed = if DURABLE.load(std::sync::atomic::Ordering::Relaxed) {
        ""
    } else {
        "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    };
    cmd.current_dir(&dir)
        .env("SHELFSYNC_PG_SPEED", speed)
        .env("LC_ALL", "C")
        .env_remove("PGDATA")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0);
    // Never waited for: it outlives this process by design (then init, or whichever subreaper
    // adopts it, reaps it).
    let watchdog = cmd.spawn().map_err(|e| fail(format!("spawning the PostgreSQL watchdog (/bin/sh): {e}")))?;
    let server = PgServer { port, dir: dir.clone(), watchdog_pid: watchdog.id() };
    drop(watchdog);

    let who = run_as.map(|r| format!(" as {}", r.name)).unwrap_or_default();
    match rt.block_on(wait_ready(&server)) {
        Ok(()) => Ok(Attempt::Ready(server)),
        Err(Failure::PortTaken) => {
            let log = server.log_tail();
            stop_now(&server);
            Ok(Attempt::PortTaken(log))
        }
        Err(Failure::Initdb(status)) => {
            let log = std::fs::read_to_string(dir.join("initdb.log")).unwrap_or_default();
            stop_now(&server);
            Err(format!("{}/initdb{who} failed (exit status {status}) in {}:\n{log}", bin.display(), dir.display()))
        }
        Err(Failure::Fatal(why)) => {
            let log = server.log_tail();
            let initdb_log = std::fs::read_to_string(dir.join("initdb.log")).unwrap_or_default();
            stop_now(&server);
            Err(format!(
                "PostgreSQL ({}{who}) did not start on 127.0.0.1:{port}: {why}\nserver log (end):\n{log}\n\
                 initdb log:\n{initdb_log}",
                bin.display()
            ))
        }
    }
}

/// A CA (`ca.pem`) and a certificate for 127.0.0.1 it signed (`server.crt`, `server.key`), in
/// `dir`, readable by the server only.
fn write_tls(dir: &Path, run_as: Option<&RunAs>) -> Result<(), String> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let e = |e: rcgen::Error| e.to_string();
    let ca_key = KeyPair::generate().map_err(e)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(e)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "shelfsync test PostgreSQL CA");
    let ca = ca.self_signed(&ca_key).map_err(e)?;
    let key = KeyPair::generate().map_err(e)?;
    let cert = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .map_err(e)?
        .signed_by(&key, &ca, &ca_key)
        .map_err(e)?;
    std::fs::create_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for (name, body, mode) in
        [("ca.pem", ca.pem(), 0o644), ("server.crt", cert.pem(), 0o644), ("server.key", key.serialize_pem(), 0o600)]
    {
        let path = dir.join(name);
        std::fs::write(&path, body).map_err(|e| format!("{}: {e}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    for path in [dir.to_owned(), dir.join("ca.pem"), dir.join("server.crt"), dir.join("server.key")] {
        if let Some(r) = run_as {
            std::os::unix::fs::chown(&path, Some(r.uid), Some(r.gid))
                .map_err(|e| format!("chown {} to {}: {e}", path.display(), r.name))?;
        }
    }
    Ok(())
}

/// Why a start attempt failed.
enum Failure {
    /// Another process took the port.
    PortTaken,
    /// `initdb` failed with this exit status.
    Initdb(String),
    /// Anything else, explained.
    Fatal(String),
}

/// Polls (every 50 ms, for at most [`READY_DEADLINE`]) until `initdb` is done and a TCP connect
/// and then a real PostgreSQL session work, with our server (its `data_directory`).
async fn wait_ready(server: &PgServer) -> Result<(), Failure> {
    let deadline = tokio::time::Instant::now() + READY_DEADLINE;
    let initdb_failed = server.dir.join("initdb.failed");
    let exited = server.dir.join("postgres.exited");
    let want_dir = server.dir.join("data").to_string_lossy().into_owned();
    loop {
        if let Ok(status) = std::fs::read_to_string(&initdb_failed) {
            return Err(Failure::Initdb(status.trim().to_owned()));
        }
        if let Ok(status) = std::fs::read_to_string(&exited) {
            let log = server.log_tail();
            if log.contains("could not create any TCP/IP sockets") || log.contains("Address already in use") {
                return Err(Failure::PortTaken);
            }
            return Err(Failure::Fatal(format!("postgres exited during start-up with status {}", status.trim())));
        }
        let last_error = match tokio::net::TcpStream::connect(("127.0.0.1", server.port)).await {
            Err(e) => format!("TCP connect: {e}"),
            Ok(_) => match probe(&server.url("postgres")).await {
                Ok(dir) if dir == want_dir => return Ok(()),
                // Another server answers on this port; ours will report a failed bind.
                Ok(dir) => format!("another server (data directory {dir}) answers on this port"),
                Err(e) => e,
            },
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(Failure::Fatal(format!("no connection within {READY_DEADLINE:?} (last error: {last_error})")));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One real session: the server's `data_directory`.
async fn probe(url: &str) -> Result<String, String> {
    let (client, connection) = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_postgres::connect(&format!("{url}?connect_timeout=5"), tokio_postgres::NoTls),
    )
    .await
    .map_err(|_| "connect: no answer within 5 s".to_owned())?
    .map_err(|e| format!("connect: {e}"))?;
    let driver = tokio::spawn(connection);
    let row = client.query_one("SHOW data_directory", &[]).await.map_err(|e| format!("SHOW data_directory: {e}"));
    drop(client);
    let _ = driver.await;
    Ok(row?.get::<_, String>(0))
}

/// Asks the watchdog to stop the server and remove its files now (it does the same by itself once
/// this process is gone).
fn stop_now(server: &PgServer) {
    // SAFETY: kill(2) with a PID we spawned and a valid signal; no memory is involved.
    unsafe {
        libc::kill(server.watchdog_pid as libc::pid_t, libc::SIGTERM);
    }
}

/// The last 80 lines of `postgres.log` in `dir` (or a note that there is none).
fn log_tail(dir: &Path) -> String {
    match std::fs::read_to_string(dir.join("postgres.log")) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(80)..].join("\n")
        }
        Err(e) => format!("(no log at {}: {e})", dir.join("postgres.log").display()),
    }
}

/// A port on 127.0.0.1 nobody listens on right now (the OS's pick for port 0).
fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The directory holding `initdb` and `postgres`: `$SHELFSYNC_PG_BIN`, else the highest version of
/// `/usr/lib/postgresql/*/bin` (Debian's layout), else where `initdb` on `PATH` really lives.
fn find_bin_dir() -> Result<PathBuf, String> {
    let complete = |d: &Path| d.join("initdb").is_file() && d.join("postgres").is_file();
    if let Some(d) = std::env::var_os(PG_BIN_ENV) {
        let d = PathBuf::from(d);
        return if complete(&d) {
            Ok(d)
        } else {
            Err(format!("{PG_BIN_ENV}={} does not hold both `initdb` and `postgres`", d.display()))
        };
    }
    let mut versions: Vec<(Vec<u32>, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.split('.').map(|p| p.parse().ok()).collect::<Option<Vec<u32>>>()?;
            let bin = e.path().join("bin");
            complete(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    if let Some(initdb) = on_path("initdb") {
        // Follow symlinks (/usr/local/bin/initdb -> /usr/lib/postgresql/N/bin/initdb): `postgres`
        // sits next to the real file.
        let real = std::fs::canonicalize(&initdb).unwrap_or(initdb);
        if let Some(d) = real.parent().filter(|d| complete(d)) {
            return Ok(d.to_path_buf());
        }
    }
    Err(format!(
        "PostgreSQL is not installed: the `_postgres` variants of the end-to-end tests need its server binaries \
         (looked at ${PG_BIN_ENV}, /usr/lib/postgresql/*/bin and `initdb` on PATH). Install them with \
         `apt-get install postgresql` (Debian/Ubuntu; .ci/run does this), or set {PG_BIN_ENV} to a directory holding \
         `initdb` and `postgres`."
    ))
}

/// The first `name` on `PATH`.
fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| OsString::from("/usr/local/bin:/usr/bin:/bin"));
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file())
}

/// As root, the unprivileged user to run PostgreSQL as (`postgres`, else `nobody`) and the
/// `setpriv` that switches to it; `None` when the tests do not run as root.
fn run_as() -> Result<Option<RunAs>, String> {
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let (name, uid, gid) =
        ["postgres", "nobody"].into_iter().find_map(|n| lookup_user(n).map(|(u, g)| (n.to_owned(), u, g))).ok_or(
            "the tests run as root and PostgreSQL refuses to, but neither a `postgres` nor a `nobody` user exists",
        )?;
    let setpriv = on_path("setpriv")
        .or_else(|| ["/usr/bin/setpriv", "/bin/setpriv"].into_iter().map(PathBuf::from).find(|p| p.is_file()))
        .ok_or(
            "the tests run as root, so PostgreSQL must run as another user, which needs `setpriv` \
             (apt-get install util-linux)",
        )?;
    Ok(Some(RunAs { name, uid, gid, setpriv }))
}

/// uid and gid of a user, from the password database.
fn lookup_user(name: &str) -> Option<(libc::uid_t, libc::gid_t)> {
    let cname = CString::new(name).ok()?;
    // SAFETY: an all-zero passwd is a valid value to be overwritten; getpwnam_r writes only into
    // `pwd` and `buf` (whose length we pass) and points `result` at `pwd` or null.
    unsafe {
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut buf = vec![0 as libc::c_char; 16 * 1024];
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwnam_r(cname.as_ptr(), &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result);
        if rc != 0 || result.is_null() {
            return None;
        }
        debug_assert_eq!(CStr::from_ptr(pwd.pw_name).to_str().ok(), Some(name));
        Some((pwd.pw_uid, pwd.pw_gid))
    }
}
