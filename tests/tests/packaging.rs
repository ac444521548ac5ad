//! What an operator installs and types: the systemd units (hardened, verified by
//! `systemd-analyze` when it is installed), shell completions and man pages generated from the
//! CLIs, `--config` as the way to name a data dir for admin verbs, the hub's `status`, and the
//! licence file the manifests name.

use std::path::{Path, PathBuf};

use serde_json::Value;
use shelfsync_tests::procs::{bin, Proc};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

async fn run_fail(bin_name: &str, args: &[&str]) -> String {
    let out = tokio::process::Command::new(bin(bin_name)).args(args).output().await.expect("spawn");
    assert!(!out.status.success(), "{bin_name} {args:?} should have failed: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `[Service]` keys of a unit file, in order (a key may repeat).
fn service_keys(text: &str) -> Vec<(String, String)> {
    let mut section = String::new();
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        if line.starts_with('[') {
            section = line.to_owned();
            continue;
        }
        if section == "[Service]" {
            let (k, v) = line.split_once('=').unwrap_or_else(|| panic!("not key=value: {line}"));
            out.push((k.to_owned(), v.to_owned()));
        }
    }
    out
}

#[test]
fn systemd_units_are_hardened_and_verify() {
    for (role, verb, state) in [("hub", "serve", "shelfsync-hub"), ("agent", "run", "shelfsync-agent")] {
        let path = repo().join(format!("config/shelfsync-{role}.service"));
        let text = std::fs::read_to_string(&path).unwrap();
        let keys = service_keys(&text);
        let get = |k: &str| keys.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
        assert!(get("DynamicUser") == Some("yes") || get("User").is_some(), "{role}: a dedicated or dynamic user");
        for (k, v) in [
            ("ProtectSystem", "strict"),
            ("ProtectHome", "yes"),
            ("NoNewPrivileges", "yes"),
            ("PrivateTmp", "yes"),
            ("Restart", "on-failure"),
            ("StateDirectory", state),
            ("StateDirectoryMode", "0700"),
        ] {
            assert_eq!(get(k), Some(v), "{role}: {k}");
        }
        assert!(get("RestartSec").is_some(), "{role}: a delay between restarts");
        let exec = get("ExecStart").unwrap();
        assert_eq!(exec, format!("/usr/bin/shelfsync-{role} {verb} --config /etc/shelfsync/{role}.toml"));

        // systemd's own check, with ExecStart pointed at the binary this build made.
        let Ok(analyze) = which("systemd-analyze") else { continue };
        let dir = tempfile::tempdir().unwrap();
        let unit = dir.path().join(format!("shelfsync-{role}.service"));
        let built = bin(&format!("shelfsync-{role}"));
        std::fs::write(&unit, text.replace(&format!("/usr/bin/shelfsync-{role}"), built.to_str().unwrap())).unwrap();
        let out = std::process::Command::new(analyze).arg("verify").arg(&unit).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && stderr.trim().is_empty(), "systemd-analyze verify {role}: {stderr}");
    }
}

fn which(name: &str) -> Result<PathBuf, ()> {
    std::env::var_os("PATH")
        .and_then(|p| std::env::split_paths(&p).map(|d| d.join(name)).find(|c| c.is_file()))
        .ok_or(())
}

#[tokio::test]
async fn completions_and_man_pages_come_from_the_clis() {
    for name in ["shelfsync-hub", "shelfsync-agent"] {
        for shell in ["bash", "zsh", "fish"] {
            let script = Proc::run_ok(name, &["completions", shell]).await;
            assert!(script.contains(name) && script.contains("restore"), "{name} {shell}: {script:.200}");
        }
        let dir = tempfile::tempdir().unwrap();
        let listed = Proc::run_ok(name, &["man", "--out", dir.path().to_str().unwrap()]).await;
        for page in [format!("{name}.1"), format!("{name}-backup.1"), format!("{name}-restore.1")] {
            let text = std::fs::read_to_string(dir.path().join(&page)).unwrap_or_else(|e| panic!("{page}: {e}"));
            assert!(text.contains(".TH"), "{page} is a man page");
            assert!(listed.contains(&page), "{listed}");
        }
        let root = std::fs::read_to_string(dir.path().join(format!("{name}.1"))).unwrap();
        assert!(!root.contains("completions"), "the packaging verbs stay hidden");
    }
    let dir = tempfile::tempdir().unwrap();
    Proc::run_ok("shelfsync-hub", &["man", "--out", dir.path().to_str().unwrap()]).await;
    let hub_restore = std::fs::read_to_string(dir.path().join("shelfsync-hub-token-create.1"));
    assert!(hub_restore.unwrap().contains("expires"), "nested verbs get pages too");
}

#[tokio::test]
async fn admin_verbs_find_the_data_dir_in_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("hub");
    let config = dir.path().join("hub.toml");
    std::fs::write(&config, format!("data_dir = {:?}\n", data.to_str().unwrap())).unwrap();
    let c = config.to_str().unwrap();
    Proc::run_ok("shelfsync-hub", &["init", "--config", c]).await;
    assert!(data.join("hub.db").exists() && data.join("pki/ca.key").exists());
    let token = Proc::run_ok("shelfsync-hub", &["token", "create", "--role", "viewer", "--config", c]).await;
    assert!(token.trim().starts_with("ss_"), "{token}");
    let list = Proc::run_ok("shelfsync-hub", &["token", "list", "--json", "--config", c]).await;
    assert_eq!(serde_json::from_str::<Value>(&list).unwrap().as_array().unwrap().len(), 1);

    // --data-dir wins over the config's data_dir.
    let elsewhere = dir.path().join("elsewhere");
    let err =
        run_fail("shelfsync-hub", &["token", "list", "--config", c, "--data-dir", elsewhere.to_str().unwrap()]).await;
    assert!(err.contains(elsewhere.to_str().unwrap()), "{err}");
    // Neither: a clear error, for both binaries.
    let err = run_fail("shelfsync-hub", &["token", "list"]).await;
    assert!(err.contains("--data-dir") && err.contains("--config"), "{err}");
    let err = run_fail("shelfsync-agent", &["backup", "--to", "/nonexistent/x"]).await;
    assert!(err.contains("--data-dir") && err.contains("--config"), "{err}");
    // A config that is not there is named.
    let err = run_fail("shelfsync-hub", &["token", "list", "--config", "/nonexistent/hub.toml"]).await;
    assert!(err.contains("/nonexistent/hub.toml"), "{err}");

    // The backup takes the config along; restore puts it beside the data.
    let backup = dir.path().join("hub.backup");
    Proc::run_ok("shelfsync-hub", &["backup", "--to", backup.to_str().unwrap(), "--config", c]).await;
    let restored = dir.path().join("restored");
    let out = Proc::run_ok(
        "shelfsync-hub",
        &["restore", "--from", backup.to_str().unwrap(), "--data-dir", restored.to_str().unwrap()],
    )
    .await;
    assert!(out.contains(c), "{out}");
    assert_eq!(
        std::fs::read_to_string(restored.join("config/hub.toml")).unwrap(),
        std::fs::read_to_string(&config).unwrap()
    );

    // The agent's verbs read it too.
    let agent_cfg = dir.path().join("agent.toml");
    let agent_data = dir.path().join("agent");
    std::fs::write(&agent_cfg, format!("data_dir = {:?}\n", agent_data.to_str().unwrap())).unwrap();
    Proc::run_ok("shelfsync-agent", &["init", "--store-id", "store-007", "--config", agent_cfg.to_str().unwrap()])
        .await;
    assert!(agent_data.join("agent.db").exists());

    // The hub's status: a summary, and JSON for machines.
    let text = Proc::run_ok("shelfsync-hub", &["status", "--config", c]).await;
    assert!(text.contains("stores") && text.contains("0 registered") && text.contains("1 active"), "{text}");
    let json: Value =
        serde_json::from_str(&Proc::run_ok("shelfsync-hub", &["status", "--json", "--config", c]).await).unwrap();
    assert_eq!(json["stores"], 0);
    assert_eq!(json["tokens"]["active"], 1, "{json}");
    assert!(json["database_bytes"].as_u64().unwrap() > 0);
}

#[test]
fn the_licence_matches_the_manifest() {
    let manifest = std::fs::read_to_string(repo().join("Cargo.toml")).unwrap();
    assert!(manifest.contains("license = \"Apache-2.0\""));
    let licence = std::fs::read_to_string(repo().join("LICENSE")).unwrap();
    assert!(licence.contains("Apache License") && licence.contains("Version 2.0, January 2004"));
    assert!(licence.contains("END OF TERMS AND CONDITIONS"), "the full text");
}
