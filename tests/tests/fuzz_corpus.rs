//! Replays the committed fuzz corpus (`tests/fuzz/corpus/<target>/`) and the kept crash inputs
//! (`tests/fuzz/regressions/<target>/`) through the fuzz targets, on any toolchain: what the
//! campaign found interesting, and what once crashed, must keep passing.

use std::path::{Path, PathBuf};

use shelfsync_tests::fuzz::{Target, TARGETS};

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<PathBuf> = entries.map(|e| e.expect("dir entry").path()).filter(|p| p.is_file()).collect();
    files.sort();
    files
}

fn replay(target: &str, run: Target, files: &[PathBuf]) -> Vec<String> {
    let mut failed = Vec::new();
    for f in files {
        let data = std::fs::read(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        if std::panic::catch_unwind(|| run(&data)).is_err() {
            failed.push(format!("{target}: {}", f.display()));
        }
    }
    failed
}

#[test]
fn every_target_passes_its_corpus_and_regressions() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut failed = Vec::new();
    for (name, run) in TARGETS {
        let started = std::time::Instant::now();
        let corpus = inputs(&root.join("corpus").join(name));
        assert!(corpus.len() >= 10, "{name}: the committed corpus has only {} inputs", corpus.len());
        failed.extend(replay(name, *run, &corpus));
        failed.extend(replay(name, *run, &inputs(&root.join("regressions").join(name))));
        eprintln!("{name}: {} corpus inputs in {:?}", corpus.len(), started.elapsed());
    }
    assert!(failed.is_empty(), "inputs that fail:\n{}", failed.join("\n"));
}

/// Every target has a libFuzzer entry point and a corpus folder, under the same name.
#[test]
fn targets_match_the_fuzz_crate() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).expect("tests/fuzz/Cargo.toml");
    for (name, _) in TARGETS {
        let src = std::fs::read_to_string(root.join("fuzz_targets").join(format!("{name}.rs")))
            .unwrap_or_else(|e| panic!("fuzz_targets/{name}.rs: {e}"));
        assert!(
            src.contains(&format!("shelfsync_tests::fuzz::{name}(")),
            "fuzz_targets/{name}.rs calls another target"
        );
        assert!(manifest.contains(&format!("name = \"{name}\"")), "tests/fuzz/Cargo.toml has no [[bin]] {name}");
    }
}
