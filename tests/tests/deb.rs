//! The Debian package, installed on this machine: `dpkg -i`, the files where they belong, the
//! unit checked by `systemd-analyze verify`, spliced started the way the unit starts it and
//! serving through the test namespaces, a reload and a stop the way the unit does them, then
//! `dpkg --purge` leaving nothing behind.
//!
//! **No real systemd starts the unit here.** On the test machines systemd is installed but is
//! not PID 1, so `systemctl start` cannot work. Instead the test reads the installed unit and
//! runs its `ExecStartPre=` and `ExecStart=` lines itself, as root limited to the unit's
//! `CapabilityBoundingSet=` (with `setpriv`) and with its `LimitNOFILE=` (with `prlimit`; capped
//! at the test's own hard limit where the test lacks CAP_SYS_RESOURCE to raise it, as in the CI
//! sandbox), in the proxy's network namespace, with `NOTIFY_SOCKET` and `WATCHDOG_USEC` (from
//! `WatchdogSec=`) pointing at a socket the test reads. The sandboxing options (`Protect*=`,
//! `Private*=`, `Restrict*=`) are checked here only by `systemd-analyze verify`; a real
//! systemd runs them in `contrib/systemd/nspawn-check`, by hand (see the README).
//!
//! The package comes from `$SPLICED_DEB`, which `cargo xtask test` sets after packing it once
//! (so this test does not rebuild anything); without it, from `target/debian/`, as
//! `cargo xtask deb` leaves it. A package older than the release binary is refused as stale.
//!
//! The test refuses to run if a `spliced` package is already installed, and a guard purges
//! the package (and stops what the test started) however the test ends.
//!
//! Run as root: `cargo xtask deb && cargo test --release -p spliced-tests --test deb`.
use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr},
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use nix::sys::{
    resource::{Resource, getrlimit},
    signal::Signal,
};
use spliced_tests::{
    BACKEND_V6, Ns, Service, World,
    raw::{self, Behavior, TestBackend, simple_hello, spawn},
    require_root,
};

const PACKAGE: &str = "spliced";
const UNIT: &str = "/lib/systemd/system/spliced.service";
const CONFIG: &str = "/etc/spliced/spliced.toml";
/// The site file the test adds, as an administrator would.
const SITE_FILE: &str = "/etc/spliced/sites/echo.toml";
const PINS: &str = "/sys/fs/bpf/spliced";
const ECHO_PORT: u16 = 9340;
const IO: Duration = Duration::from_secs(10);

/// Every file the package installs (man pages compressed, as Debian ships them).
const FILES: &[&str] = &[
    "/usr/bin/spliced",
    UNIT,
    CONFIG,
    "/etc/spliced/sites/README",
    "/usr/share/man/man8/spliced.8.gz",
    "/usr/share/man/man8/spliced-run.8.gz",
    "/usr/share/man/man8/spliced-check.8.gz",
    "/usr/share/man/man8/spliced-upgrade.8.gz",
    "/usr/share/bash-completion/completions/spliced",
    "/usr/share/zsh/vendor-completions/_spliced",
    "/usr/share/fish/vendor_completions.d/spliced.fish",
    "/usr/share/doc/spliced/copyright",
];

/// What enabling the unit leaves outside the package's own files (deb-systemd-helper).
const ENABLE_LINK: &str = "/etc/systemd/system/multi-user.target.wants/spliced.service";

/// The package to install: `$SPLICED_DEB`, else the newest `target/debian/spliced_*.deb`.
fn package() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("SPLICED_DEB") {
        return Ok(PathBuf::from(path));
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debian");
    let newest = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with("spliced_") && name.ends_with(".deb")
        })
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .max();
    let Some((built, path)) = newest else {
        bail!(
            "no package in {}: run `cargo xtask deb` (or set SPLICED_DEB)",
            dir.display()
        );
    };
    let bin = spliced_tests::spliced_bin()?;
    if std::fs::metadata(&bin)?.modified()? > built {
        bail!(
            "{} is older than {}: run `cargo xtask deb` again",
            path.display(),
            bin.display()
        );
    }
    Ok(path)
}

/// `dpkg-query`'s status of the package, empty when dpkg does not know it.
fn package_status() -> Result<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", PACKAGE])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Runs `cmd`, failing with its output unless it succeeds; returns standard output.
fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Purges the package when dropped, unless disarmed, so a failing test does not leave it
/// installed; removes the site file the test added first.
struct Installed {
    armed: bool,
}

impl Installed {
    fn purge() -> Result<String> {
        let _ = std::fs::remove_file(SITE_FILE);
        run(Command::new("dpkg").args(["--purge", PACKAGE]))
    }
}

impl Drop for Installed {
    fn drop(&mut self) {
        if self.armed
            && let Err(e) = Installed::purge()
        {
            eprintln!("purging the package after a failure: {e:#}");
        }
    }
}

/// The values of `key=` in the unit's `[Service]` section, in order.
fn directives<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines()
        .filter_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
        .map(str::trim)
        .collect()
}

/// One `Exec*=` line as an argument vector: the `-@:+!` prefixes dropped (this runs
/// everything as root in any case), `$MAINPID` replaced. The unit uses no quoting.
fn command_line(line: &str, main_pid: Option<u32>) -> Vec<String> {
    line.trim_start_matches(['-', '@', ':', '+', '!'])
        .split_whitespace()
        .map(|word| match (word, main_pid) {
            ("$MAINPID", Some(pid)) => pid.to_string(),
            _ => word.to_owned(),
        })
        .collect()
}

/// `CapabilityBoundingSet=CAP_A CAP_B` as setpriv's `-all,+a,+b`.
fn bounding_set(unit: &str) -> Result<String> {
    let caps = directives(unit, "CapabilityBoundingSet");
    let [caps] = caps.as_slice() else {
        bail!("expected one CapabilityBoundingSet= line, found {caps:?}");
    };
    let mut set = String::from("-all");
    for cap in caps.split_whitespace() {
        let name = cap
            .strip_prefix("CAP_")
            .with_context(|| format!("{cap} in CapabilityBoundingSet="))?;
        set.push_str(",+");
        set.push_str(&name.to_lowercase());
    }
    Ok(set)
}

/// The capabilities `CapabilityBoundingSet=` names, as a bit mask (the kernel's numbers).
fn bounding_mask(unit: &str) -> Result<u64> {
    const NUMBERS: &[(&str, u32)] = &[
        ("CAP_NET_BIND_SERVICE", 10),
        ("CAP_NET_ADMIN", 12),
        ("CAP_SYS_RESOURCE", 24),
        ("CAP_PERFMON", 38),
        ("CAP_BPF", 39),
    ];
    let caps = directives(unit, "CapabilityBoundingSet");
    let mut mask = 0;
    for cap in caps.iter().flat_map(|c| c.split_whitespace()) {
        let (_, bit) = NUMBERS
            .iter()
            .find(|(name, _)| *name == cap)
            .with_context(|| format!("the test does not know {cap}'s number"))?;
        mask |= 1u64 << bit;
    }
    Ok(mask)
}

/// The effective capabilities of process `pid` (`CapEff:` in its status).
fn effective_caps(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .context("no CapEff: line")?;
    Ok(u64::from_str_radix(hex.trim(), 16)?)
}

/// `WatchdogSec=30s` (or `30`) in microseconds, as systemd passes it in `WATCHDOG_USEC`.
fn watchdog_usec(unit: &str) -> Result<u64> {
    let value = directives(unit, "WatchdogSec");
    let [value] = value.as_slice() else {
        bail!("expected one WatchdogSec= line, found {value:?}");
    };
    let seconds: u64 = value
        .strip_suffix('s')
        .unwrap_or(value)
        .parse()
        .with_context(|| format!("WatchdogSec={value} (the test reads whole seconds)"))?;
    Ok(seconds * 1_000_000)
}

/// Reads notifications until one has the line `line`.
fn wait_notify(socket: &UnixDatagram, line: &str, seen: &mut Vec<String>) -> Result<String> {
    let deadline = Instant::now() + IO;
    let mut buf = vec![0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        ensure!(!left.is_zero(), "no {line} within {IO:?}; got {seen:#?}");
        socket.set_read_timeout(Some(left))?;
        let n = match socket.recv(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e.into()),
        };
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        seen.push(text.clone());
        if text.lines().any(|l| l == line) {
            return Ok(text);
        }
    }
}

/// A hello and then `len` bytes of a pattern through the proxy; the echo must match exactly.
fn echo_through(world: &World, len: usize) -> Result<()> {
    let mut stream = raw::connect(world, 443, IO)?;
    let mut sent = simple_hello("echo.example");
    sent.extend((0..len).map(|i| (i % 251) as u8));
    let mut writer = stream.try_clone()?;
    let up = sent.clone();
    let wrote = spawn(move || {
        writer.write_all(&up)?;
        writer.shutdown(Shutdown::Write)?;
        Ok(())
    });
    let mut got = Vec::new();
    stream.read_to_end(&mut got)?;
    raw::result(&wrote, IO, "the client's writer")?;
    ensure!(
        got == sent,
        "the echo differs: {}",
        raw::difference(&got, &sent)
    );
    Ok(())
}

/// Whether a process named spliced listens on TCP port `port` in this (the host's) network
/// namespace: the postinst must not have started one.
fn spliced_listens_here(port: u16) -> Result<bool> {
    let out = run(Command::new("ss").args(["-Hltnp", &format!("sport = :{port}")]))?;
    Ok(out.contains("\"spliced\""))
}

/// Install, check the files, run the unit's commands in the proxy namespace, serve, reload,
/// stop, purge, check that nothing is left.
#[test]
fn the_package_installs_serves_through_its_unit_and_purges_cleanly() -> Result<()> {
    require_root()?;
    let deb = package()?;
    let before = package_status()?;
    ensure!(
        before.is_empty() || before.ends_with("not-installed"),
        "a spliced package is already on this machine ({before}); this test installs and \
         purges its own, so remove that one first"
    );
    ensure!(
        !Path::new("/run/systemd/system").exists(),
        "systemd runs this machine: the postinst would start the unit with the example \
         configuration; this test is written for machines (like CI's) where it does not"
    );
    ensure!(
        !Path::new(PINS).exists(),
        "{PINS} exists: another spliced uses the default pin directory here"
    );
    let world = World::new()?;
    let _echo = TestBackend::start(&world, ECHO_PORT, Behavior::Echo)?;

    let mut guard = Installed { armed: true };
    run(Command::new("dpkg").arg("-i").arg(&deb))?;
    ensure!(package_status()? == "install ok installed");
    for file in FILES {
        ensure!(Path::new(file).is_file(), "{file} was not installed");
    }
    let conffiles = run(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", PACKAGE]))?;
    ensure!(
        conffiles.contains(CONFIG),
        "{CONFIG} is not a conffile: {conffiles}"
    );
    ensure!(
        Path::new(ENABLE_LINK).exists(),
        "the postinst did not enable the unit ({ENABLE_LINK} is missing)"
    );
    ensure!(
        !spliced_listens_here(443)? && !spliced_listens_here(80)?,
        "the postinst started spliced although systemd is not PID 1"
    );
    // The example configuration is valid as shipped.
    run(Command::new("/usr/bin/spliced").args(["check", "--config", CONFIG]))?;
    // The man page and completions are the real ones.
    let man = run(Command::new("man").args(["-P", "cat", "8", "spliced"]))?;
    ensure!(
        man.contains("spliced-run(8)") && man.contains("RELOADING=1"),
        "man 8 spliced:\n{man}"
    );
    run(Command::new("bash").args([
        "-c",
        "source /usr/share/bash-completion/completions/spliced && complete -p spliced",
    ]))?;

    let unit = std::fs::read_to_string(UNIT)?;
    if Path::new("/usr/bin/systemd-analyze").exists() {
        let out = Command::new("systemd-analyze")
            .args(["verify", UNIT])
            .output()?;
        let said = String::from_utf8_lossy(&out.stderr);
        ensure!(
            out.status.success() && said.trim().is_empty(),
            "systemd-analyze verify {UNIT} ({}): {said}",
            out.status
        );
    }
    ensure!(directives(&unit, "Type") == ["notify"], "{unit}");

    // The administrator's configuration: the namespaces' addresses, a site file, and the XDP
    // edge filter, so the capability bounding set is shown to be enough for it too.
    let backend = SocketAddr::new(BACKEND_V6, ECHO_PORT);
    std::fs::write(
        CONFIG,
        "include = [\"sites/*.toml\"]\n\n[[listen]]\naddress = \"0.0.0.0:443\"\n\
         protocol = \"tls\"\n\n[xdp]\ninterfaces = [\"eth0\"]\n",
    )?;
    std::fs::write(
        SITE_FILE,
        format!("[[site]]\nhostnames = [\"echo.example\"]\nbackend = \"{backend}\"\n"),
    )?;

    for line in directives(&unit, "ExecStartPre") {
        run(&mut unit_command(&world, &unit, &command_line(line, None))?)?;
    }
    let notify_path = world.dir().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path)?;
    let exec_start = directives(&unit, "ExecStart");
    let [exec_start] = exec_start.as_slice() else {
        bail!("expected one ExecStart= line, found {exec_start:?}");
    };
    let mut cmd = unit_command(&world, &unit, &command_line(exec_start, None))?;
    cmd.env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", watchdog_usec(&unit)?.to_string());
    let mut spliced = Service::start("spliced", cmd, world.dir())?;
    let mut seen = Vec::new();
    let ready =
        wait_notify(&notify, "READY=1", &mut seen).with_context(|| spliced.stderr_text())?;
    ensure!(
        ready.contains("kernel path attached"),
        "the eBPF side did not load with the unit's capabilities: {ready}\n{}",
        spliced.stderr_text()
    );
    ensure!(
        Path::new(PINS).join("SPLICED_PEERS").exists(),
        "no pins in {PINS}"
    );
    let pid = spliced.pid().context("no PID")?;
    let granted = effective_caps(pid)?;
    let allowed = bounding_mask(&unit)?;
    ensure!(
        granted & !allowed == 0,
        "spliced ran with capabilities outside CapabilityBoundingSet=: {:#x}",
        granted & !allowed
    );
    // Past the 256 KiB hand-off, so the kernel path carries part of it.
    echo_through(&world, 1 << 20)?;

    // `systemctl reload`: the check, then SIGHUP to the main process.
    for line in directives(&unit, "ExecReload") {
        let argv = command_line(line, Some(pid));
        let (program, args) = argv.split_first().context("an empty ExecReload= line")?;
        run(Command::new(program).args(args))?;
    }
    wait_notify(&notify, "RELOADING=1", &mut seen)?;
    wait_notify(&notify, "READY=1", &mut seen)?;
    echo_through(&world, 4096)?;

    // `systemctl stop`: KillSignal=SIGTERM.
    ensure!(directives(&unit, "KillSignal") == ["SIGTERM"], "{unit}");
    let status = spliced.stop(Signal::SIGTERM, IO)?;
    ensure!(
        status.success(),
        "spliced exited with {status}: {}",
        spliced.stderr_text()
    );
    wait_notify(&notify, "STOPPING=1", &mut seen)?;
    ensure!(
        !Path::new(PINS).exists(),
        "{PINS} is left after a clean stop"
    );

    let said = Installed::purge()?;
    guard.armed = false;
    ensure!(
        package_status()?.is_empty() || package_status()?.ends_with("not-installed"),
        "after purge: {}",
        package_status()?
    );
    let left: Vec<&str> = FILES
        .iter()
        .copied()
        .chain([
            "/etc/spliced",
            ENABLE_LINK,
            "/var/lib/systemd/deb-systemd-helper-enabled/spliced.service.dsh-also",
            "/var/lib/systemd/deb-systemd-helper-enabled/multi-user.target.wants/spliced.service",
            "/var/lib/systemd/deb-systemd-helper-masked/spliced.service",
            "/etc/systemd/system/spliced.service",
            PINS,
        ])
        .filter(|p| Path::new(p).symlink_metadata().is_ok())
        .collect();
    ensure!(
        left.is_empty(),
        "left after purge: {left:?}\ndpkg said: {said}"
    );
    Ok(())
}

/// A command that runs `argv` in the proxy's network namespace but this mount namespace (so
/// the pins land in the real `/sys/fs/bpf`, as under systemd), with the unit's `LimitNOFILE=`
/// and as root limited to its `CapabilityBoundingSet=`.
fn unit_command(world: &World, unit: &str, argv: &[String]) -> Result<Command> {
    let nofile = directives(unit, "LimitNOFILE");
    let [nofile] = nofile.as_slice() else {
        bail!("expected one LimitNOFILE= line, found {nofile:?}");
    };
    let nofile: u64 = nofile
        .parse()
        .with_context(|| format!("LimitNOFILE={nofile}"))?;
    // Raising the hard limit needs CAP_SYS_RESOURCE, which systemd has and the test may not
    // (the CI sandbox drops it): then the test runs with its own hard limit, said on stderr.
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if hard < nofile {
        eprintln!(
            "deb: LimitNOFILE={nofile} is above this process's hard limit {hard}; using {hard}"
        );
    }
    let nofile = nofile.min(hard);
    let (program, args) = argv.split_first().context("an empty Exec line")?;
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/var/run/netns/{}", world.name(Ns::Proxy)))
        .args([
            "--",
            "prlimit",
            &format!("--nofile={nofile}:{nofile}"),
            "--",
        ])
        .args([
            "setpriv",
            &format!("--bounding-set={}", bounding_set(unit)?),
            "--",
        ])
        .arg(program)
        .args(args);
    Ok(cmd)
}
