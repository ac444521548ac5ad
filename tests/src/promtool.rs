//! `promtool check metrics`, for the tests of `/metrics`.

/// `promtool check metrics` on `text`, where promtool is installed; in CI (`CI` set) it must be.
pub fn check(what: &str, text: &str) {
    use std::io::Write as _;
    let child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            assert!(
                std::env::var_os("CI").is_none(),
                "promtool is not installed but CI is set: install Debian's prometheus package (.ci/run does)"
            );
            eprintln!("promtool not found: skipping `promtool check metrics` of the {what} (set up by .ci/run in CI)");
            return;
        }
        Err(e) => panic!("running promtool: {e}"),
    };
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool check metrics of the {what}:\n{report}\n{text}"
    );
}
