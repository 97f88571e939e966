//! `cargo xtask fuzz`: builds the targets in `fuzz/` with libFuzzer's instrumentation on the
//! pinned stable toolchain and runs a campaign, one target after another at `nice 19`.
//!
//! No cargo-fuzz and no nightly: without a sanitizer, the instrumentation is stable rustc
//! flags (`-Cpasses=sancov-module` and LLVM's `-sanitizer-coverage-*` options, the set
//! cargo-fuzz passes) plus `--cfg fuzzing`, and `libfuzzer-sys` builds libFuzzer itself. The
//! code under test is safe Rust, so a sanitizer would mostly slow the search down;
//! `--sanitizer address` adds AddressSanitizer (a `-Z` flag, so `RUSTC_BOOTSTRAP=1`) for the
//! unsafe code in dependencies.
//!
//! Inputs that reach new coverage go to `target/fuzz-work/<target>/`, never straight into the
//! committed seeds; `--merge` minimizes them into `fuzz/corpus/<target>/` with libFuzzer's
//! `-merge=1` (only inputs with coverage the corpus lacks are added). Crashes go to
//! `fuzz/artifacts/<target>/`, where the corpus replay test (`cargo test -p proxy-userspace
//! fuzz_replay`) picks them up, so a crash fails `./x test` until it is fixed.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// `--sanitizer`.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Sanitizer {
    /// Coverage instrumentation only (stable flags).
    None,
    /// AddressSanitizer too (`-Zsanitizer=address` through `RUSTC_BOOTSTRAP=1`).
    Address,
}

/// What `cargo xtask fuzz` was asked.
pub struct Options {
    /// The campaign's total length, split evenly among the targets.
    pub minutes: f64,
    /// The targets to run; all of `fuzz/Cargo.toml`'s when empty.
    pub targets: Vec<String>,
    /// Merge the work corpus into the committed one afterwards.
    pub merge: bool,
    pub sanitizer: Sanitizer,
}

/// One target's figures, from libFuzzer's last status line and final stats.
#[derive(Default)]
struct Figures {
    execs: u64,
    execs_per_sec: u64,
    cov: u64,
    ft: u64,
    corpus: u64,
    /// Inputs libFuzzer kept in the work directory during this run.
    new_inputs: usize,
    crashes: Vec<PathBuf>,
    exit_ok: bool,
}

pub fn run(root: &Path, opts: &Options) -> Result<()> {
    let fuzz_dir = root.join("fuzz");
    let all = targets(&fuzz_dir)?;
    let chosen: Vec<String> = if opts.targets.is_empty() {
        all.clone()
    } else {
        for t in &opts.targets {
            if !all.contains(t) {
                bail!("no fuzz target {t}; there are: {}", all.join(", "));
            }
        }
        opts.targets.clone()
    };
    if !(opts.minutes >= 0.0 && opts.minutes.is_finite()) {
        bail!("--minutes must be a number of minutes, 0 or more");
    }
    let bin_dir = build(root, &fuzz_dir, opts.sanitizer)?;
    let work = root.join("target/fuzz-work");
    let per_target = opts.minutes * 60.0 / chosen.len() as f64;
    let seconds = per_target.round() as u64;
    let mut results = Vec::new();
    if seconds > 0 {
        eprintln!(
            "fuzz: {} min in total, {seconds} s for each of {} (one after another, nice 19)",
            opts.minutes,
            chosen.join(", ")
        );
        for target in &chosen {
            let figures = campaign(&bin_dir, &fuzz_dir, &work, target, seconds)?;
            results.push((target.clone(), figures));
        }
        print_table(&results, seconds);
    }
    if opts.merge {
        for target in &chosen {
            merge(&bin_dir, &fuzz_dir, &work, target)?;
        }
    }
    let crashed: Vec<&str> = results
        .iter()
        .filter(|(_, f)| !f.crashes.is_empty() || !f.exit_ok)
        .map(|(t, _)| t.as_str())
        .collect();
    if !crashed.is_empty() {
        bail!(
            "crashes in {} (inputs under fuzz/artifacts/; `cargo test -p proxy-userspace fuzz_replay` replays them)",
            crashed.join(", ")
        );
    }
    Ok(())
}

/// The `[[bin]]` names in `fuzz/Cargo.toml`.
fn targets(fuzz_dir: &Path) -> Result<Vec<String>> {
    let manifest = fs::read_to_string(fuzz_dir.join("Cargo.toml"))
        .with_context(|| format!("reading {}/Cargo.toml", fuzz_dir.display()))?;
    let mut in_bin = false;
    let mut names = Vec::new();
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            in_bin = line == "[[bin]]";
        } else if in_bin && let Some(value) = line.strip_prefix("name = ") {
            names.push(value.trim_matches('"').to_owned());
        }
    }
    if names.is_empty() {
        bail!("fuzz/Cargo.toml names no [[bin]] targets");
    }
    Ok(names)
}

/// This machine's target triple, from `rustc -vV`.
fn host_triple(root: &Path) -> Result<String> {
    let out = Command::new("rustc")
        .current_dir(root)
        .arg("-vV")
        .output()
        .context("running rustc -vV")?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
        .context("rustc -vV printed no host")
}

/// Builds every target with coverage instrumentation and returns the directory of the binaries.
fn build(root: &Path, fuzz_dir: &Path, sanitizer: Sanitizer) -> Result<PathBuf> {
    let triple = host_triple(root)?;
    let mut flags = vec![
        "--cfg",
        "fuzzing",
        "-Cpasses=sancov-module",
        "-Cllvm-args=-sanitizer-coverage-level=4",
        "-Cllvm-args=-sanitizer-coverage-inline-8bit-counters",
        "-Cllvm-args=-sanitizer-coverage-pc-table",
        "-Cllvm-args=-sanitizer-coverage-trace-compares",
        // Overflow and debug assertions are findings too.
        "-Cdebug-assertions",
        "-Coverflow-checks",
    ];
    let target_dir = root.join(match sanitizer {
        Sanitizer::None => "target/fuzz",
        Sanitizer::Address => "target/fuzz-asan",
    });
    let mut cmd = Command::new("nice");
    cmd.args(["-n", "19"])
        .arg(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .current_dir(fuzz_dir)
        // The fuzz targets need no eBPF object, and building it needs bpf-linker.
        .env("SPLICED_SKIP_EBPF", "1")
        .env_remove("RUSTFLAGS");
    if sanitizer == Sanitizer::Address {
        flags.extend([
            "-Zsanitizer=address",
            // std is not rebuilt with the sanitizer; libFuzzer only needs our code instrumented.
            "-Cunsafe-allow-abi-mismatch=sanitizer",
        ]);
        cmd.env("RUSTC_BOOTSTRAP", "1");
    }
    cmd.env("CARGO_ENCODED_RUSTFLAGS", flags.join("\x1f"))
        // --target keeps the flags off build scripts and proc macros.
        .args([
            "build",
            "--release",
            "--locked",
            "--bins",
            "--target",
            &triple,
        ])
        .arg("--target-dir")
        .arg(&target_dir);
    crate::run(&mut cmd)?;
    Ok(target_dir.join(triple).join("release"))
}

/// Files directly in `dir`.
fn files(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default()
}

/// Runs one target for `seconds`, its log in `target/fuzz-work/<target>.log`.
fn campaign(
    bin_dir: &Path,
    fuzz_dir: &Path,
    work: &Path,
    target: &str,
    seconds: u64,
) -> Result<Figures> {
    let corpus = fuzz_dir.join("corpus").join(target);
    let new = work.join(target);
    let artifacts = fuzz_dir.join("artifacts").join(target);
    for dir in [&corpus, &new, &artifacts] {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let before = files(&artifacts);
    let kept_before = files(&new);
    let log_path = work.join(format!("{target}.log"));
    let mut log =
        fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let mut cmd = Command::new("nice");
    cmd.args(["-n", "19"])
        .arg(bin_dir.join(target))
        // The first directory gets the new inputs; the committed corpus is only read.
        .arg(&new)
        .arg(&corpus)
        .arg(format!("-max_total_time={seconds}"))
        .arg("-print_final_stats=1")
        .arg("-timeout=10")
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    eprintln!("fuzz: {target} for {seconds} s, log {}", log_path.display());
    let mut child = cmd.spawn().with_context(|| format!("starting {target}"))?;
    let stderr = child.stderr.take().context("no stderr")?;
    let mut figures = Figures::default();
    let mut last_status = Instant::now();
    for line in BufReader::new(stderr).lines() {
        let line = line?;
        writeln!(log, "{line}")?;
        read_line(&line, &mut figures);
        // A progress line now and then, so a long campaign shows it is alive.
        if line.contains(" cov: ") && last_status.elapsed() >= Duration::from_secs(60) {
            eprintln!("fuzz: {target}: {line}");
            last_status = Instant::now();
        }
    }
    figures.exit_ok = child.wait()?.success();
    figures.new_inputs = files(&new)
        .iter()
        .filter(|p| !kept_before.contains(p))
        .count();
    figures.crashes = files(&artifacts)
        .into_iter()
        .filter(|p| !before.contains(p))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| !n.starts_with("slow-unit-"))
        })
        .collect();
    if !figures.exit_ok || !figures.crashes.is_empty() {
        eprintln!("fuzz: {target} CRASHED; the end of its log:");
        let text = fs::read_to_string(&log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        for line in lines.iter().skip(lines.len().saturating_sub(40)) {
            eprintln!("  {line}");
        }
    }
    Ok(figures)
}

/// Takes the figures from a libFuzzer status line (`#123 pulse cov: 456 ft: 789 corp: 10/2Kb
/// exec/s: 1000 rss: 40Mb`) or a final stat (`stat::number_of_executed_units: 123`).
fn read_line(line: &str, figures: &mut Figures) {
    if let Some(rest) = line.strip_prefix("stat::") {
        let Some((key, value)) = rest.split_once(':') else {
            return;
        };
        let Ok(value) = value.trim().parse::<u64>() else {
            return;
        };
        match key {
            "number_of_executed_units" => figures.execs = value,
            "average_exec_per_sec" => figures.execs_per_sec = value,
            _ => {}
        }
        return;
    }
    if !line.starts_with('#') || !line.contains(" cov: ") {
        return;
    }
    let words: Vec<&str> = line.split_whitespace().collect();
    let after = |key: &str| -> Option<u64> {
        let at = words.iter().position(|w| *w == key)?;
        let value = words.get(at + 1)?;
        // corp: 10/2Kb is entries/size.
        value.split('/').next()?.parse().ok()
    };
    if let Some(v) = after("cov:") {
        figures.cov = v;
    }
    if let Some(v) = after("ft:") {
        figures.ft = v;
    }
    if let Some(v) = after("corp:") {
        figures.corpus = v;
    }
    if let Some(v) = words
        .first()
        .and_then(|w| w.trim_start_matches('#').parse().ok())
    {
        figures.execs = figures.execs.max(v);
    }
}

fn print_table(results: &[(String, Figures)], seconds: u64) {
    println!(
        "\nfuzz results ({seconds} s per target; cov = covered edges, ft = libFuzzer features, \
         corpus = libFuzzer's corpus at the end, new inputs = files kept in target/fuzz-work/):\n"
    );
    println!(
        "| target | executions | exec/s | cov | ft | corpus | new inputs | crashes |\n|---|---:|---:|---:|---:|---:|---:|---:|"
    );
    for (target, f) in results {
        let crashes = if f.exit_ok || !f.crashes.is_empty() {
            f.crashes.len()
        } else {
            1
        };
        println!(
            "| {target} | {} | {} | {} | {} | {} | {} | {crashes} |",
            f.execs, f.execs_per_sec, f.cov, f.ft, f.corpus, f.new_inputs
        );
        for c in &f.crashes {
            println!("  crash: {}", c.display());
        }
    }
}

/// Adds to `fuzz/corpus/<target>/` the work corpus's inputs that reach coverage it lacks.
fn merge(bin_dir: &Path, fuzz_dir: &Path, work: &Path, target: &str) -> Result<()> {
    let corpus = fuzz_dir.join("corpus").join(target);
    let new = work.join(target);
    if files(&new).is_empty() {
        eprintln!("fuzz: {target}: nothing to merge in {}", new.display());
        return Ok(());
    }
    let before = files(&corpus).len();
    let log_path = work.join(format!("{target}.merge.log"));
    let log = fs::File::create(&log_path)?;
    let status = Command::new("nice")
        .args(["-n", "19"])
        .arg(bin_dir.join(target))
        .arg("-merge=1")
        .arg(&corpus)
        .arg(&new)
        .stdout(Stdio::null())
        .stderr(log)
        .status()
        .with_context(|| format!("merging {target}"))?;
    if !status.success() {
        bail!(
            "merging {target} failed: {status}; see {}",
            log_path.display()
        );
    }
    let after = files(&corpus).len();
    eprintln!(
        "fuzz: {target}: merged {} inputs into fuzz/corpus/{target}/ ({before} -> {after})",
        after.saturating_sub(before)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzer_lines() {
        let mut f = Figures::default();
        for line in [
            "#2\tINITED cov: 100 ft: 120 corp: 40/9Kb exec/s: 0 rss: 30Mb",
            "#524288\tpulse  cov: 812 ft: 3456 corp: 611/80Kb lim: 4096 exec/s: 17476 rss: 400Mb",
            "#900000\tDONE   cov: 815 ft: 3500 corp: 620/81Kb lim: 4096 exec/s: 15000 rss: 401Mb",
            "Done 900000 runs in 60 second(s)",
            "stat::number_of_executed_units: 900001",
            "stat::average_exec_per_sec:     15000",
        ] {
            read_line(line, &mut f);
        }
        assert_eq!(
            (f.execs, f.execs_per_sec, f.cov, f.ft, f.corpus),
            (900001, 15000, 815, 3500, 620)
        );
    }
}
