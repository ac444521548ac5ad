//! The crate graph keeps the direction DESIGN §2 and STYLE §10 draw: `shared` ← `shared/node`,
//! `hub/core` ← `agent`, `hub`; the hub never imports the store agent nor the agent the hub, and
//! the pure crates stay free of SQL, sockets and runtimes. Read from `cargo metadata`, so a
//! manifest change that breaks a rule fails here.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

/// I/O and runtime crates the pure crates must not depend on.
const IO_CRATES: [&str; 8] = ["tokio", "rusqlite", "quinn", "axum", "hyper", "reqwest", "governor", "rustls"];

/// Each workspace package's direct dependencies, as (name, kind) with kind "normal", "dev" or
/// "build".
fn workspace_deps() -> BTreeMap<String, Vec<(String, String)>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let out = std::process::Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--no-deps", "--offline", "--manifest-path"])
        .arg(&manifest)
        .output()
        .expect("running cargo metadata");
    assert!(out.status.success(), "cargo metadata failed: {}", String::from_utf8_lossy(&out.stderr));
    let meta: Value = serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON");
    let mut packages = BTreeMap::new();
    for p in meta["packages"].as_array().expect("packages") {
        let deps = p["dependencies"]
            .as_array()
            .expect("dependencies")
            .iter()
            .map(|d| {
                let name = d["name"].as_str().expect("dependency name").to_owned();
                let kind = d["kind"].as_str().unwrap_or("normal").to_owned();
                (name, kind)
            })
            .collect();
        packages.insert(p["name"].as_str().expect("package name").to_owned(), deps);
    }
    packages
}

fn deps_of<'a>(all: &'a BTreeMap<String, Vec<(String, String)>>, package: &str) -> &'a [(String, String)] {
    all.get(package).unwrap_or_else(|| panic!("{package} is not a workspace member"))
}

fn depends_on(all: &BTreeMap<String, Vec<(String, String)>>, package: &str, dep: &str) -> bool {
    deps_of(all, package).iter().any(|(name, _)| name == dep)
}

#[test]
fn the_binaries_do_not_import_each_other() {
    let all = workspace_deps();
    assert!(!depends_on(&all, "shelfsync-hub", "shelfsync-agent"), "the hub must not depend on the agent");
    assert!(!depends_on(&all, "shelfsync-agent", "shelfsync-hub"), "the agent must not depend on the hub");
    for binary in ["shelfsync-agent", "shelfsync-hub"] {
        assert!(depends_on(&all, binary, "shelfsync-node"), "{binary} gets its plumbing from shelfsync-node");
    }
    for up in ["shelfsync-agent", "shelfsync-hub", "shelfsync-hub-core", "shelfsync-tests"] {
        assert!(!depends_on(&all, "shelfsync-node", up), "shelfsync-node must not depend on {up}");
    }
}

#[test]
fn the_decider_depends_on_shared_and_plain_data_crates_only() {
    let all = workspace_deps();
    // Plain data: encodings and hashes (the partition map's SipHash, the feed cursor's postcard
    // and base64), no I/O.
    let plain = [
        "shelfsync-shared",
        "base64",
        "jiff",
        "postcard",
        "serde",
        "serde_json",
        "sha2",
        "siphasher",
        "thiserror",
        "uuid",
    ];
    for (name, kind) in deps_of(&all, "shelfsync-hub-core") {
        if kind == "dev" {
            assert!(!IO_CRATES.contains(&name.as_str()), "shelfsync-hub-core dev-depends on {name}");
            continue;
        }
        assert!(
            plain.contains(&name.as_str()),
            "shelfsync-hub-core depends on {name}; the decider takes shelfsync-shared and plain data crates only"
        );
    }
}

#[test]
fn shared_does_no_io() {
    let all = workspace_deps();
    for (name, _) in deps_of(&all, "shelfsync-shared") {
        assert!(!IO_CRATES.contains(&name.as_str()), "shelfsync-shared depends on {name}");
        assert!(!name.starts_with("shelfsync-"), "shelfsync-shared depends on {name}; it is the bottom of the graph");
    }
}
