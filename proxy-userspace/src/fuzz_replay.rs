//! Replays every fuzz target's committed inputs through the target's check, on stable and
//! without instrumentation, so `cargo test` (and `./x test`) fails when a check fails on any
//! seed or kept crash: `fuzz/corpus/<target>/` (seeds, inputs a campaign merged in, and
//! `regression-*` crashes kept after their fix) and `fuzz/artifacts/<target>/` (crashes a
//! campaign found and nobody has fixed yet).

use std::{
    panic::{AssertUnwindSafe, catch_unwind},
    path::{Path, PathBuf},
};

/// A fuzz target's check: returns if the input is handled as it must be, panics otherwise.
type Check = fn(&[u8]);

/// Every target in `fuzz/Cargo.toml` with the check its `fuzz_target!` runs.
const TARGETS: [(&str, Check); 5] = [
    ("hello_tls", crate::hello::fuzz_check_tls),
    ("hello_http", crate::hello::fuzz_check_http),
    ("http_requests", crate::http1::fuzz_check_requests),
    ("preface_roundtrip", crate::preface::fuzz_check_roundtrip),
    ("preface_receive", crate::preface::fuzz_check_receive),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// The files directly in `dir`, sorted; none if `dir` does not exist.
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Runs `target`'s check on each of its inputs and fails naming every input whose check
/// panicked; a target without seeds fails too.
fn replay(target: &str) {
    let (_, check) = TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .unwrap_or_else(|| panic!("no check for {target}"));
    let seeds = inputs(&fuzz_dir().join("corpus").join(target));
    assert!(
        !seeds.is_empty(),
        "fuzz/corpus/{target}/ has no seeds (`cargo xtask fuzz-seeds` writes them)"
    );
    let crashes = inputs(&fuzz_dir().join("artifacts").join(target));
    let mut failed = Vec::new();
    for path in seeds.iter().chain(&crashes) {
        let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if catch_unwind(AssertUnwindSafe(|| check(&data))).is_err() {
            failed.push(path.display().to_string());
        }
    }
    assert!(
        failed.is_empty(),
        "{target}: the check failed on {} of {} inputs (the panics are printed above):\n{}",
        failed.len(),
        seeds.len() + crashes.len(),
        failed.join("\n")
    );
}

#[test]
fn hello_tls_corpus() {
    replay("hello_tls");
}

#[test]
fn hello_http_corpus() {
    replay("hello_http");
}

#[test]
fn http_requests_corpus() {
    replay("http_requests");
}

#[test]
fn preface_roundtrip_corpus() {
    replay("preface_roundtrip");
}

#[test]
fn preface_receive_corpus() {
    replay("preface_receive");
}

/// A target added to `fuzz/Cargo.toml` must be added to [`TARGETS`] (and get seeds), or its
/// corpus would never be replayed.
#[test]
fn every_fuzz_target_is_replayed() {
    let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml"))
        .unwrap_or_else(|e| panic!("fuzz/Cargo.toml: {e}"));
    let mut in_bin = false;
    let mut names = Vec::new();
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            in_bin = line == "[[bin]]";
        } else if in_bin && let Some(value) = line.strip_prefix("name = ") {
            names.push(value.trim_matches('"').to_owned());
        }
    }
    let mut known: Vec<String> = TARGETS.iter().map(|(n, _)| (*n).to_owned()).collect();
    names.sort();
    known.sort();
    assert_eq!(
        names, known,
        "fuzz/Cargo.toml's targets and the replayed ones differ"
    );
}
