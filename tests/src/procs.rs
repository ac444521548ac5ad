//! Real processes for end-to-end tests: locate the workspace's binaries, start them, learn their
//! bound address from their first stdout line, and kill them (`kill -9`) when a crash is the point.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Path of a binary built by this workspace (`target/<profile>/<name>`).
///
/// `cargo test --workspace` builds every package's binaries because the agent and hub packages
/// have integration tests; this never runs cargo itself.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test-binary>
    let profile_dir = exe.parent().and_then(|d| d.parent()).expect("target/<profile>");
    let path = profile_dir.join(name);
    assert!(
        path.exists(),
        "{} is missing; build it first (cargo build -p {name} or cargo test --workspace)",
        path.display()
    );
    path
}

/// Polls `check` until it returns `Some` or `deadline` passes.
pub async fn wait_until<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let until = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= until {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// [`wait_until`], where `check` says what it saw when it is not there yet (`Err`): a timeout
/// names the last of it.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let until = tokio::time::Instant::now() + deadline;
    loop {
        let seen = match check().await {
            Ok(v) => return v,
            Err(seen) => seen,
        };
        if tokio::time::Instant::now() >= until {
            panic!("timed out after {deadline:?} waiting for {what}; last seen: {seen}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A running child process that announced `... listening on <url>` on stdout.
pub struct Proc {
    child: Child,
    /// stdout lines seen before the announcement.
    pub early_lines: Vec<String>,
    /// The URL from the announcement line.
    pub url: String,
    /// What was started, for messages.
    pub name: String,
}

impl Proc {
    /// Runs a command to completion and returns its stdout; panics with stderr on failure.
    pub async fn run_ok(bin_name: &str, args: &[&str]) -> String {
        Self::run_ok_env(bin_name, args, &[]).await
    }

    /// As [`Proc::run_ok`], with extra environment variables for the command.
    pub async fn run_ok_env(bin_name: &str, args: &[&str], envs: &[(&str, &str)]) -> String {
        let out = Self::output_env(bin_name, args, envs).await;
        assert!(
            out.status.success(),
            "{bin_name} {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stdout).expect("utf-8 stdout")
    }

    /// Runs a command to completion with extra environment variables and returns its status and
    /// output whatever they are (for commands expected to fail).
    pub async fn output_env(bin_name: &str, args: &[&str], envs: &[(&str, &str)]) -> std::process::Output {
        Command::new(bin(bin_name))
            .args(args)
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .output()
            .await
            .unwrap_or_else(|e| panic!("spawning {bin_name}: {e}"))
    }

    /// Starts `bin_name args...` and waits (up to 30 s) for its `listening on URL` line.
    pub async fn start(bin_name: &str, args: &[&str], envs: &[(&str, &str)]) -> Proc {
        let mut cmd = Command::new(bin(bin_name));
        cmd.args(args)
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawning {bin_name}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let mut early_lines = Vec::new();
        let announce = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.expect("reading stdout") {
                if let Some((_, url)) = line.split_once("listening on ") {
                    return Some(url.trim().to_owned());
                }
                early_lines.push(line);
            }
            None
        })
        .await;
        let url = match announce {
            Ok(Some(url)) => url,
            Ok(None) => panic!("{bin_name} {args:?} exited before announcing its address"),
            Err(_) => panic!("{bin_name} {args:?} did not announce its address within 30 s"),
        };
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Proc { child, early_lines, url, name: bin_name.to_owned() }
    }

    /// The process id (None once it was reaped).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Sends a signal (`libc::SIGSTOP`, `libc::SIGCONT`, ...) without waiting.
    pub fn signal(&self, sig: i32) {
        let pid = self.pid().expect("process running") as i32;
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(rc, 0, "kill({pid}, {sig}): {}", std::io::Error::last_os_error());
    }

    /// The rest of an early stdout line after `prefix` (e.g. `"quic on "`).
    pub fn extra_line(&self, prefix: &str) -> Option<String> {
        self.early_lines.iter().find_map(|l| l.split_once(prefix).map(|(_, rest)| rest.trim().to_owned()))
    }

    /// Waits (at most `deadline`) for the process to exit by itself; its status.
    pub async fn exited(mut self, deadline: Duration) -> std::process::ExitStatus {
        match tokio::time::timeout(deadline, self.child.wait()).await {
            Ok(s) => s.expect("waiting for the child"),
            Err(_) => {
                let _ = self.child.start_kill();
                panic!("{} did not exit within {deadline:?}", self.name)
            }
        }
    }

    /// `kill -9`: no shutdown, no flush, no goodbye.
    pub async fn kill9(mut self) {
        self.child.start_kill().expect("SIGKILL");
        let _ = self.child.wait().await;
    }

    /// SIGTERM; how it exited and how long that took (at most `deadline`, else it panics).
    pub async fn terminate(mut self, deadline: Duration) -> (std::process::ExitStatus, Duration) {
        let pid = self.child.id().expect("running");
        let t0 = std::time::Instant::now();
        let _ = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
        match tokio::time::timeout(deadline, self.child.wait()).await {
            Ok(s) => (s.expect("waiting for the child"), t0.elapsed()),
            Err(_) => {
                let _ = self.child.start_kill();
                panic!("{} still running {deadline:?} after SIGTERM", self.name)
            }
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
        }
        let status = tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await;
        match status {
            Ok(Ok(s)) => assert!(s.success() || s.code().is_none(), "{} exited with {s}", self.name),
            _ => {
                let _ = self.child.start_kill();
            }
        }
    }
}
