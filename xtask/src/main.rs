//! `cargo xtask`: the project's tasks, so README commands stay short and CI runs the same steps.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::Parser;

mod bench;
mod bench_conns;
mod bench_crossover;
mod bench_http;
mod bench_idle;
mod bench_stall;
mod bench_xdp;
mod demo;
mod fuzz;
mod fuzz_seeds;
mod proxies;
mod report;

#[derive(Parser)]
#[command(about = "spliced project tasks")]
enum Task {
    /// Build the eBPF object alone and print where it is.
    BuildEbpf,
    /// Build the release `spliced` binary (it embeds the eBPF object).
    Build,
    /// Build, then run `spliced` with the given arguments.
    Run {
        /// Arguments passed to `spliced`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build the release binary and pack it as a Debian package (with cargo-deb): the unit,
    /// an example configuration, man pages and completions. Prints the package's path.
    Deb,
    /// Lint and run every test: fmt, clippy, unit tests, end-to-end tests (root).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Fuzz every target in `fuzz/` (or those named) with libFuzzer on the stable toolchain
    /// and print executions, coverage, corpus size and crashes per target.
    Fuzz {
        /// The campaign's total length in minutes, split evenly among the targets, which run
        /// one after another (0 with `--merge`: only merge).
        #[arg(long)]
        minutes: f64,
        /// Run only this target (repeatable).
        #[arg(long = "target")]
        targets: Vec<String>,
        /// Afterwards, add the inputs found (kept in `target/fuzz-work/`) that reach new
        /// coverage to the committed corpus in `fuzz/corpus/`, with libFuzzer's `-merge=1`.
        #[arg(long)]
        merge: bool,
        /// `address` adds AddressSanitizer (through `RUSTC_BOOTSTRAP=1`), for unsafe code in
        /// dependencies; slower.
        #[arg(long, value_enum, default_value = "none")]
        sanitizer: fuzz::Sanitizer,
    },
    /// (Re)write the fuzz targets' seed corpus in `fuzz/corpus/` (captured real ClientHellos
    /// are kept once they exist).
    FuzzSeeds,
    /// Show an IPv4 client reaching an IPv6-only nginx through spliced, in namespaces.
    Demo,
    /// Throughput and CPU per GiB of each engine next to a direct connection, then SYNs per
    /// second the XDP filter drops on one core next to what the stack handles, then header
    /// mode's keep-alive requests per second, in one run.
    Bench {
        /// A short run: 256 MiB per transfer, 3 rounds; 1 s of SYNs, 1 round (instead of
        /// 1 GiB, 5 rounds; 3 s of SYNs, 3 rounds).
        #[arg(long)]
        quick: bool,
        /// Run only one part.
        #[arg(long, value_enum)]
        only: Option<BenchPart>,
        /// With `--only throughput` or `--only connections`: only the contenders whose name
        /// contains this text (e.g. "engine splice", "packet", "direct"), to profile one
        /// alone; nothing is written.
        #[arg(long, requires = "only")]
        contender: Option<String>,
    },
}

/// The parts of `cargo xtask bench`.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum BenchPart {
    /// Throughput and CPU per GiB of each forwarding engine.
    Throughput,
    /// Short connections per second, added latency, memory of idle connections.
    Connections,
    /// The packet engine's crossover: connections per second and proxy CPU per connection
    /// for downloads of 64 B to 16 MiB, with `packet.after` at 0, 64 KiB, 256 KiB, 1 MiB and
    /// 4 MiB, next to splice.
    Crossover,
    /// SYNs per second dropped by XDP next to those the stack handles, on one core.
    Xdp,
    /// Keep-alive requests per second, CPU per request and added latency of header mode
    /// (`forwarded_header`) next to HAProxy and nginx adding X-Forwarded-For.
    Http,
    /// What a stalled reader lets a sockmap sender park, with and without a useful backlog
    /// limit (only with `--only`: it parks gigabytes of kernel memory).
    SockmapStall,
}

fn main() -> Result<()> {
    match Task::parse() {
        Task::BuildEbpf => {
            let object = build_ebpf()?;
            println!("{}", object.display());
        }
        Task::Build => {
            println!("{}", build_spliced()?.display());
        }
        Task::Run { args } => {
            let bin = build_spliced()?;
            let status = Command::new(&bin).args(args).status()?;
            std::process::exit(status.code().unwrap_or(1));
        }
        Task::Deb => {
            let bin = build_spliced()?;
            println!("{}", build_deb(&bin)?.display());
        }
        Task::Test { args } => test(&args)?,
        Task::Bench {
            quick,
            only,
            contender,
        } => {
            let bin = build_spliced()?;
            // SAFETY: no other thread runs yet; the harness reads it to find the binary.
            unsafe { std::env::set_var("SPLICED_BIN", &bin) };
            let mut parts = Vec::new();
            if only.is_none() || only == Some(BenchPart::Throughput) {
                let opts = if quick {
                    bench::Options {
                        bytes: 256 << 20,
                        rounds: 3,
                        contender: contender.clone(),
                    }
                } else {
                    bench::Options {
                        bytes: 1 << 30,
                        rounds: 5,
                        contender: contender.clone(),
                    }
                };
                parts.push(bench::run(&bin, &opts)?);
            }
            if only.is_none() || only == Some(BenchPart::Connections) {
                let (rounds, seconds, idle) = if quick { (1, 1, 1000) } else { (3, 2, 9000) };
                parts.push(bench_conns::part(
                    rounds,
                    std::time::Duration::from_secs(seconds),
                    idle,
                    contender.as_deref(),
                )?);
            }
            if only.is_none() || only == Some(BenchPart::Crossover) {
                let (rounds, seconds) = if quick { (1, 0.5) } else { (3, 2.0) };
                parts.push(bench_crossover::part(
                    rounds,
                    std::time::Duration::from_secs_f64(seconds),
                )?);
            }
            if only.is_none() || only == Some(BenchPart::Xdp) {
                let opts = if quick {
                    bench_xdp::Options {
                        seconds: std::time::Duration::from_secs(1),
                        rounds: 1,
                    }
                } else {
                    bench_xdp::Options {
                        seconds: std::time::Duration::from_secs(3),
                        rounds: 3,
                    }
                };
                parts.push(bench_xdp::run(&opts)?);
            }
            if only.is_none() || only == Some(BenchPart::Http) {
                let opts = if quick {
                    bench_http::Options {
                        seconds: std::time::Duration::from_secs(1),
                        rounds: 1,
                        latency_requests: 200,
                    }
                } else {
                    bench_http::Options {
                        seconds: std::time::Duration::from_secs(5),
                        rounds: 3,
                        latency_requests: 5000,
                    }
                };
                parts.push(bench_http::part(&opts)?);
            }
            if only == Some(BenchPart::SockmapStall) {
                parts.push(bench_stall::part()?);
            }
            if let Some(table) = report::bar_table(&parts) {
                println!("\nThe bars in issues 6, 14 and 15, against this run:\n\n{table}");
            }
            // Only a full run of every part is the record; quick and partial runs just print.
            if !quick && only.is_none() {
                report::write(&root(), "cargo xtask bench", &parts)?;
                eprintln!("bench: wrote docs/benchmarks.md and docs/benchmarks.svg");
            }
        }
        Task::Fuzz {
            minutes,
            targets,
            merge,
            sanitizer,
        } => fuzz::run(
            &root(),
            &fuzz::Options {
                minutes,
                targets,
                merge,
                sanitizer,
            },
        )?,
        Task::FuzzSeeds => fuzz_seeds::write(&root().join("fuzz"))?,
        Task::Demo => {
            let bin = build_spliced()?;
            demo::run(&bin)?;
        }
    }
    Ok(())
}

fn root() -> PathBuf {
    // xtask lives one level below the workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root());
    cmd
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: {cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Runs `cmd`, echoing its output, and adds up the `test result:` lines it prints.
fn run_counting(cmd: &mut Command) -> Result<(u64, u64)> {
    use std::io::BufRead as _;
    eprintln!("xtask: {cmd:?}");
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let (mut passed, mut failed) = (0, 0);
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |word: &str| -> u64 {
                rest.split(';')
                    .find_map(|part| {
                        part.trim()
                            .strip_suffix(word)?
                            .trim()
                            .rsplit(' ')
                            .next()?
                            .parse()
                            .ok()
                    })
                    .unwrap_or(0)
            };
            passed += count("passed");
            failed += count("failed");
        }
    }
    let status = child.wait()?;
    if !status.success() && failed == 0 {
        bail!("{cmd:?} failed: {status}");
    }
    Ok((passed, failed))
}

/// Builds `proxy-ebpf` for the bpf target the same way `proxy-userspace/build.rs` does, into
/// `target/bpf`, and returns the object's path.
fn build_ebpf() -> Result<PathBuf> {
    let target_dir = root().join("target").join("bpf");
    let arch_cfg = format!("--cfg=bpf_target_arch=\"{}\"", bpf_target_arch());
    run(cargo()
        .current_dir(root().join("proxy-ebpf"))
        // Only this nested build may use -Z build-std.
        .env("RUSTC_BOOTSTRAP", "1")
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            [arch_cfg.as_str(), "-Cdebuginfo=2", "-Clink-arg=--btf"].join("\x1f"),
        )
        .args([
            "build",
            "--release",
            "--bins",
            "--target",
            "bpfel-unknown-none",
        ])
        .args(["-Z", "build-std=core", "--target-dir"])
        .arg(&target_dir))?;
    let object = target_dir.join("bpfel-unknown-none/release/proxy-ebpf");
    if !object.is_file() {
        bail!("the build succeeded but {} is missing", object.display());
    }
    Ok(object)
}

/// The architecture the eBPF programs are built for (their `pt_regs` layout and helpers):
/// this host's, named as aya-build names it, which folds every riscv64 variant into one.
fn bpf_target_arch() -> &'static str {
    match std::env::consts::ARCH {
        arch if arch.starts_with("riscv64") => "riscv64",
        arch => arch,
    }
}

/// Builds the release binary and returns its path.
fn build_spliced() -> Result<PathBuf> {
    run(cargo().args([
        "build",
        "--release",
        "--package",
        "proxy-userspace",
        "--bin",
        "spliced",
    ]))?;
    Ok(root().join("target/release/spliced"))
}

/// The cargo-deb that `./x` installs; another version may lay the package out differently.
const CARGO_DEB: &str = "cargo-deb 3.8.0";

/// Packs `bin` (the release build) as a Debian package with cargo-deb, as
/// `[package.metadata.deb]` in `proxy-userspace/Cargo.toml` describes it, and returns the
/// package's path. The man pages and completions come from `bin` itself
/// (`spliced generate-docs`), so they match the binary in the package.
fn build_deb(bin: &Path) -> Result<PathBuf> {
    let version = cargo()
        .args(["deb", "--version"])
        .output()
        .context("running cargo deb")?;
    let version = String::from_utf8_lossy(&version.stdout);
    if version.trim() != CARGO_DEB {
        bail!(
            "cargo xtask deb needs {CARGO_DEB} (found {:?}); `./x` installs it",
            version.trim()
        );
    }
    // cargo-deb finds assets named target/release/... in the real target directory.
    let docs = root().join("target/release/deb-docs");
    if docs.exists() {
        std::fs::remove_dir_all(&docs).with_context(|| format!("emptying {}", docs.display()))?;
    }
    run(Command::new(bin)
        .args(["generate-docs", "--out-dir"])
        .arg(&docs)
        // It lists the files it wrote; only the package's path is this task's output.
        .stdout(std::process::Stdio::null()))?;
    // Debian ships man pages compressed; cargo-deb compresses only the files it did not build.
    let man = docs.join("man8");
    for page in std::fs::read_dir(&man).with_context(|| format!("reading {}", man.display()))? {
        run(Command::new("gzip").args(["-9nf"]).arg(page?.path()))?;
    }
    let out = cargo()
        .args([
            "deb",
            "--package",
            "proxy-userspace",
            "--no-build",
            "--strip",
        ])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running cargo deb")?;
    if !out.status.success() {
        bail!("cargo deb failed: {}", out.status);
    }
    // cargo-deb prints the package's path last.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let deb = stdout
        .lines()
        .rev()
        .find(|l| l.trim_end().ends_with(".deb"))
        .with_context(|| format!("cargo deb did not say where the package is: {stdout}"))?;
    Ok(PathBuf::from(deb.trim()))
}

fn test(extra: &[String]) -> Result<()> {
    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--exclude",
        "proxy-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    run(cargo()
        .current_dir(root().join("proxy-ebpf"))
        .env("RUSTC_BOOTSTRAP", "1")
        .args([
            "clippy",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ])
        .args(["--target-dir"])
        .arg(root().join("target/bpf-clippy"))
        .args(["--", "-D", "warnings"]))?;
    let bin = build_spliced()?;
    // tests/deb.rs installs this package instead of building its own.
    let deb = build_deb(&bin)?;
    // The end-to-end tests run this binary; release, because they move gigabytes.
    let mut cmd = cargo();
    cmd.env("SPLICED_BIN", &bin)
        .env("SPLICED_DEB", &deb)
        .args([
            "test",
            "--workspace",
            "--exclude",
            "proxy-ebpf",
            "--release",
            "--no-fail-fast",
        ])
        .args(extra);
    let (passed, failed) = run_counting(&mut cmd)?;
    // cargo ends with the (empty) doc-test summaries; say the total plainly at the end.
    println!("\nresult: {passed} passed, {failed} failed");
    if failed > 0 || passed == 0 {
        bail!("{failed} tests failed, {passed} passed");
    }
    Ok(())
}
