//! The README's main command works: `shelfsync-hub demo` seeds, sells, takes a store offline,
//! brings it back and verifies convergence.

use shelfsync_tests::procs::bin;

#[tokio::test]
async fn demo_runs_and_converges() {
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        tokio::process::Command::new(bin("shelfsync-hub")).args(["demo", "--for-secs", "1"]).output(),
    )
    .await
    .expect("demo finished within 120 s")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "demo failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("hub API        http://127.0.0.1:"), "{stdout}");
    assert!(stdout.contains("the hub converged to exactly the stores' counts"), "{stdout}");
    assert!(stdout.contains("[demo] stopped"), "{stdout}");
}
