//! Fail-stop. When a process can no longer trust its own state — a commit of decided state
//! failed, a storage thread panicked mid-transaction — it must stop rather than keep answering
//! errors (or worse, answers that disagree with its files). [`stop`] logs the cause at ERROR,
//! wakes [`stopped`] so `main` shuts down in order and exits non-zero, and, as a backstop, exits
//! the process with [`EXIT_CODE`] if that has not happened within [`GRACE`]. A restart reloads
//! from what was committed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use tokio::sync::watch;

/// Exit status of a fail-stop (`EX_SOFTWARE`).
pub const EXIT_CODE: i32 = 70;

/// How long an orderly stop may take before the backstop exits.
pub const GRACE: Duration = Duration::from_secs(5);

static STOPPING: AtomicBool = AtomicBool::new(false);
static BACKSTOP: AtomicBool = AtomicBool::new(true);
static REASON: OnceLock<watch::Sender<Option<String>>> = OnceLock::new();

fn channel() -> &'static watch::Sender<Option<String>> {
    REASON.get_or_init(|| watch::channel(None).0)
}

/// Whether the process is failing-stop.
pub fn is_stopping() -> bool {
    STOPPING.load(Ordering::SeqCst)
}

/// Stops the process because of `reason` (once; later calls only log).
pub fn stop(reason: &str) {
    tracing::error!(
        reason,
        "fail-stop: this process can no longer trust its state; stopping (a restart reloads what was committed)"
    );
    if STOPPING.swap(true, Ordering::SeqCst) {
        return;
    }
    channel().send_replace(Some(reason.to_owned()));
    if BACKSTOP.load(Ordering::SeqCst) {
        let _ = std::thread::Builder::new().name("fail-stop".into()).spawn(|| {
            std::thread::sleep(GRACE);
            eprintln!("error: fail-stop: orderly shutdown took longer than {GRACE:?}; exiting");
            std::process::exit(EXIT_CODE);
        });
    }
}

/// Turns the backstop exit off, for a test that provokes a fail-stop inside its own process and
/// checks what the stopping code answers.
pub fn no_backstop_exit() {
    BACKSTOP.store(false, Ordering::SeqCst);
}

/// Resolves with the reason once [`stop`] was called.
pub async fn stopped() -> String {
    let mut rx = channel().subscribe();
    // The sender lives in a static: it is never dropped, so waiting ends only with a reason.
    let reason = rx.wait_for(Option::is_some).await.expect("the fail-stop channel lives forever");
    reason.clone().unwrap_or_default()
}
