//! What the sockmap engine leaves in the kernel, as `bpftool` and `/proc` show it: maps empty
//! and descriptors back to their baseline after every kind of ending, maps readable by name,
//! pins replaced when stale and removed at exit, and what happens without the privileges to
//! load the programs.
//!
//! Run as root (network namespaces, eBPF) with a release build of the proxy:
//! `cargo build --release -p proxy-userspace && cargo test --release -p spliced-tests --test sockmap_kernel`.
use std::{
    io::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    sync::mpsc,
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use nix::sys::signal::Signal;
use spliced_tests::{
    Ns, World,
    raw::{
        self, Behavior, End, Stream, TestBackend, echo, expect_hello, receive_first, receive_rest,
        result, simple_hello, spawn,
    },
    sockmap::*,
    spliced::{Launch, Spliced, field},
    wait_for,
};

/// `bpftool ARGS` inside spliced's mount namespace, where its pins are.
fn bpftool_in(pid: u32, args: &[&str]) -> Result<String> {
    let out = Command::new("nsenter")
        .args(["--target", &pid.to_string(), "--mount", "--net", "bpftool"])
        .args(args)
        .output()
        .context("running nsenter bpftool")?;
    ensure!(
        out.status.success(),
        "bpftool {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// How many entries the pinned map has (the dump of a socket hash lists keys whose values
/// cannot be read back; they count too).
fn map_len(pid: u32, map: &str) -> Result<usize> {
    let json = bpftool_in(
        pid,
        &["map", "dump", "pinned", &format!("{PIN_DIR}/{map}"), "-j"],
    )?;
    let entries: Vec<serde_json::Value> =
        serde_json::from_str(&json).with_context(|| format!("parsing bpftool's {json:?}"))?;
    Ok(entries.len())
}

/// The maps spliced pinned (read in its mount namespace).
fn pinned_maps(pid: u32) -> Result<Vec<String>> {
    let out = Command::new("nsenter")
        .args(["--target", &pid.to_string(), "--mount", "ls", PIN_DIR])
        .output()?;
    ensure!(
        out.status.success(),
        "listing {PIN_DIR}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let mut maps: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    maps.sort();
    Ok(maps)
}

/// Entries in every per-connection map: [`CONNECTION_MAPS`] and any other pinned map that is
/// not one of [`GLOBAL_MAPS`].
fn map_lens(pid: u32) -> Result<Vec<(String, usize)>> {
    let pinned = pinned_maps(pid)?;
    for m in CONNECTION_MAPS {
        ensure!(
            pinned.iter().any(|p| p == m),
            "{m} is not pinned: {pinned:?}"
        );
    }
    pinned
        .into_iter()
        .filter(|m| !GLOBAL_MAPS.contains(&m.as_str()))
        .map(|m| {
            let n = map_len(pid, &m)?;
            Ok((m, n))
        })
        .collect()
}

/// spliced's descriptors as (not pipe ends, pipe ends). Pipes are counted apart because the
/// splice engine (which carries a direction that left the kernel) keeps up to 64 empty pipes
/// for reuse (`tests/resources.rs` checks that pool).
fn fd_count(pid: u32) -> Result<(usize, usize)> {
    let files = spliced_tests::open_files(pid)?;
    Ok((files.other, files.pipe_ends))
}

/// spliced's TCP sockets as `ss` lists them in the proxy namespace (listeners included).
fn tcp_sockets(world: &World, pid: u32) -> Result<Vec<String>> {
    let out = world.command(Ns::Proxy, "ss").args(["-Htanp"]).output()?;
    let owner = format!("pid={pid},");
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&owner))
        .map(str::to_owned)
        .collect())
}

/// After connections that end normally, by reset, by the backend's half-close, by an early
/// half-close, and after one that was paused, the maps are empty and spliced holds no more
/// descriptors or sockets than before.
#[test]
fn connections_leave_nothing_behind() -> Result<()> {
    let world = World::new()?;
    let spliced = start(&world, "sockmap_backlog_limit = \"256KiB\"")?;
    let pid = spliced.pid().context("no pid")?;
    let _echo = TestBackend::start(&world, ECHO_PORT, Behavior::Echo)?;
    let greeting = b"bye for now\r\n".to_vec();
    let _closes = TestBackend::start(
        &world,
        CLOSES_PORT,
        Behavior::ServerClosesFirst {
            greeting: greeting.clone(),
        },
    )?;
    let hello = simple_hello("echo.example");
    // Warm up (the runtime starts threads and the event reader lazily), then take the baseline.
    let me = roundtrip(&world, "echo.example", b"warm-up")?;
    spliced.log_line_for(me, LOG_WAIT)?;
    wait_for("empty maps after the warm-up", LOG_WAIT, || {
        Ok(map_lens(pid)?.iter().all(|(_, n)| *n == 0))
    })?;
    let fds_before = fd_count(pid)?;
    let sockets_before = tcp_sockets(&world, pid)?;

    // A connection whose client does not read while the echo comes back: both directions
    // leave the kernel. It half-closes only after reading everything, and it is done before
    // the others start (a half-close while paused is what
    // `paused_half_closed_connections_do_not_stall_others` is about).
    let mut stuck = raw::connect(&world, 443, IO)?;
    stuck.write_all(&hello)?;
    expect_hello(&mut stuck, &hello)?;
    let mut writer = stuck.try_clone()?;
    let (read_tx, read_rx) = mpsc::channel::<()>();
    let sender = spawn(move || {
        raw::send_stream(&mut writer, 51, 4 * MIB)?;
        read_rx.recv_timeout(IO).context("waiting for the echo")?;
        writer.shutdown(Shutdown::Write)?;
        Ok(())
    });
    wait_for("the stuck connection to be paused", LOG_WAIT, || {
        Ok(detached(&spliced, "backend")? > 0)
    })?;
    let seen = map_lens(pid)?;
    eprintln!("map entries with one paused connection open: {seen:?}");
    let entries = |map: &str| seen.iter().find(|(m, _)| m == map).map(|(_, n)| *n);
    ensure!(
        entries("SPLICED_PEERS") == Some(2)
            && entries("SPLICED_HOLD") == Some(2)
            && entries("SPLICED_SOCKS").is_some_and(|n| n <= 1),
        "one open connection with one direction out of the kernel: {seen:?}"
    );
    let verifier = receive_first(&mut stuck, 51, 4 * MIB, 4 * MIB as usize)
        .context("the paused connection")?;
    let _ = read_tx.send(());
    receive_rest(&mut stuck, verifier).context("the paused connection's end")?;
    result(&sender, IO, "the paused connection's sender")?;
    drop(stuck);

    // Normal connections.
    for i in 0..8 {
        roundtrip(&world, "echo.example", &Stream::prefix(i, 256 * 1024))?;
    }
    // Clients that reset mid-transfer.
    for i in 0..4 {
        let mut client = raw::connect(&world, 443, IO)?;
        client.write_all(&hello)?;
        expect_hello(&mut client, &hello)?;
        client.write_all(&Stream::prefix(100 + i, 256 * 1024))?;
        let _ = raw::read_exactly(&mut client, 1024)?;
        raw::reset(client)?;
    }
    // Backends that half-close first.
    for _ in 0..4 {
        let mut client = raw::connect(&world, 443, IO)?;
        client.write_all(&simple_hello("closes.example"))?;
        let (got, end) = raw::read_to_end(&mut client, 1 << 16);
        ensure!(end == End::Eof && got == greeting, "{got:02x?} {end:?}");
        raw::send_stream(&mut client, 7, 64 * KIB)?;
        client.shutdown(Shutdown::Write)?;
    }
    // Clients that half-close right after the hello (they cannot enter the map).
    for _ in 0..4 {
        let mut client = raw::connect(&world, 443, IO)?;
        client.write_all(&hello)?;
        client.shutdown(Shutdown::Write)?;
        let (got, end) = raw::read_to_end(&mut client, 1 << 16);
        ensure!(
            end == End::Eof && got == hello,
            "{} bytes, {end:?}",
            got.len()
        );
    }

    let mut state = String::new();
    let settled = wait_for("spliced to be back to its baseline", LOG_WAIT, || {
        let maps = map_lens(pid)?;
        let fds = fd_count(pid)?;
        let sockets = tcp_sockets(&world, pid)?;
        state = format!(
            "maps {maps:?}; descriptors (other, pipe ends) {fds:?} (before {fds_before:?}); {} TCP \
             sockets (before {}):\n{}",
            sockets.len(),
            sockets_before.len(),
            sockets.join("\n")
        );
        Ok(maps.iter().all(|(_, n)| *n == 0)
            && fds.0 == fds_before.0
            && fds.1 <= fds_before.1 + 128
            && sockets.len() == sockets_before.len())
    });
    settled.with_context(|| state.clone())?;
    eprintln!("after the batch: {state}");
    Ok(())
}

/// During a live connection `bpftool map dump` shows the peer map with its field names (the
/// maps carry BTF) and byte counts that match what moved, and the counters.
#[test]
fn bpftool_reads_the_maps_by_name() -> Result<()> {
    const DATA: usize = 100_000;
    let world = World::new()?;
    let mut spliced = start(&world, "")?;
    let pid = spliced.pid().context("no pid")?;
    let _echo = TestBackend::start(&world, ECHO_PORT, Behavior::Echo)?;
    let hello = simple_hello("echo.example");
    let mut client = raw::connect(&world, 443, IO)?;
    let me = client.local_addr()?;
    client.write_all(&hello)?;
    expect_hello(&mut client, &hello)?;
    let data = Stream::prefix(61, DATA);
    client.write_all(&data)?;
    ensure!(
        raw::read_exactly(&mut client, DATA)? == data,
        "echo differs"
    );

    let show = bpftool_in(
        pid,
        &["map", "show", "pinned", &format!("{PIN_DIR}/SPLICED_PEERS")],
    )?;
    ensure!(
        show.contains("btf_id"),
        "SPLICED_PEERS has no BTF according to bpftool:\n{show}"
    );
    let text = bpftool_in(
        pid,
        &["map", "dump", "pinned", &format!("{PIN_DIR}/SPLICED_PEERS")],
    )?;
    eprintln!("bpftool map dump pinned {PIN_DIR}/SPLICED_PEERS:\n{text}");
    ensure!(
        text.contains("\"peer\"") && text.contains("\"redirected\""),
        "the dump does not name the fields:\n{text}"
    );
    // With BTF the text dump is JSON; check that the numbers mean what they say.
    let entries: Vec<serde_json::Value> = serde_json::from_str(&text)?;
    ensure!(entries.len() == 2, "expected 2 entries:\n{text}");
    let key = |e: &serde_json::Value| e["key"].as_u64();
    let peer = |e: &serde_json::Value| e["value"]["peer"].as_u64();
    let redirected = |e: &serde_json::Value| e["value"]["redirected"].as_u64();
    ensure!(
        peer(&entries[0]) == key(&entries[1]) && peer(&entries[1]) == key(&entries[0]),
        "the two sockets are not each other's peer:\n{text}"
    );
    let mut counts: Vec<u64> = entries.iter().filter_map(redirected).collect();
    counts.sort_unstable();
    // Client to backend: the data (the hello went out in the preface). Backend to client: the
    // echoed hello and the data.
    let want = vec![DATA as u64, (hello.len() + DATA) as u64];
    ensure!(
        counts == want,
        "redirected byte counts {counts:?}, expected {want:?}"
    );

    let text = bpftool_in(
        pid,
        &[
            "map",
            "dump",
            "pinned",
            &format!("{PIN_DIR}/SPLICED_COUNTERS"),
        ],
    )?;
    let counters: Vec<serde_json::Value> = serde_json::from_str(&text)?;
    let sum = |index: u64| -> u64 {
        counters
            .iter()
            .filter(|c| c["key"].as_u64() == Some(index))
            .flat_map(|c| c["values"].as_array().cloned().unwrap_or_default())
            .filter_map(|v| v["value"].as_u64())
            .sum()
    };
    ensure!(counters.len() >= 6, "expected at least 6 counters:\n{text}");
    ensure!(
        sum(0) > 0 && sum(1) == (hello.len() + 2 * DATA) as u64,
        "redirected_skbs {} and redirected_bytes {} (expected {}):\n{text}",
        sum(0),
        sum(1),
        hello.len() + 2 * DATA
    );

    client.shutdown(Shutdown::Write)?;
    let (_, end) = raw::read_to_end(&mut client, 1 << 16);
    ensure!(end == End::Eof, "{end:?}");
    let n = (hello.len() + DATA) as u64;
    expect_ok(&spliced, me, n, n)?;
    let redirected = spliced
        .metrics()?
        .count("spliced_kernel_total", &[("counter", "redirected_bytes")])?;
    ensure!(
        redirected == (hello.len() + 2 * DATA) as u64,
        "/metrics says the kernel redirected {redirected} bytes, expected {}",
        hello.len() + 2 * DATA
    );
    let status = spliced.terminate(Duration::from_secs(10))?;
    ensure!(status.success(), "spliced exited with {status}");
    let want = format!("redirected_bytes={}", hello.len() + 2 * DATA);
    ensure!(
        spliced
            .stderr_text()
            .lines()
            .any(|l| l.contains("kernel counters:") && l.contains(&want)),
        "no \"kernel counters: ... {want}\" at exit:\n{}",
        tail(&spliced.stderr_text(), 5)
    );
    Ok(())
}

/// Removes a pin directory (and its pins) when dropped, whatever the test did.
struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        for pin in pins_present(&self.0) {
            let _ = std::fs::remove_file(self.0.join(pin));
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// An echo server on `[::1]` in the test's own namespace for `connections` connections, one
/// at a time, for at most `limit`.
fn loopback_echo(connections: usize, limit: Duration) -> Result<(u16, mpsc::Receiver<Result<()>>)> {
    let listener = TcpListener::bind(SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 0))?;
    let port = listener.local_addr()?.port();
    let done = spawn(move || {
        for _ in 0..connections {
            let stream = raw::accept_within(&listener, limit, IO)?;
            echo(stream)?;
        }
        Ok(())
    });
    Ok((port, done))
}

/// Hello, its echo, payload, its echo, half-close, EOF on loopback.
fn loopback_roundtrip(port: u16, name: &str) -> Result<SocketAddr> {
    let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
    let mut client = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    client.set_read_timeout(Some(IO))?;
    let me = client.local_addr()?;
    let hello = simple_hello(name);
    client.write_all(&hello)?;
    expect_hello(&mut client, &hello)?;
    let payload = Stream::prefix(71, 50_000);
    client.write_all(&payload)?;
    ensure!(
        raw::read_exactly(&mut client, payload.len())? == payload,
        "echo differs"
    );
    client.shutdown(Shutdown::Write)?;
    let (rest, end) = raw::read_to_end(&mut client, 1 << 16);
    ensure!(end == End::Eof && rest.is_empty(), "{end:?}");
    Ok(me)
}

/// The names of the pins in `dir`, sorted (none if it does not exist).
fn pins_present(dir: &Path) -> Vec<String> {
    let mut pins: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    pins.sort();
    pins
}

/// Waits until `dir` holds every map of [`CONNECTION_MAPS`] and [`GLOBAL_MAPS`] (spliced binds
/// its listeners before it loads and pins the maps); returns the pins.
fn wait_for_pins(dir: &Path, service: &mut Spliced) -> Result<Vec<String>> {
    let mut pins = Vec::new();
    wait_for("the maps to be pinned", Duration::from_secs(10), || {
        service.check_running()?;
        pins = pins_present(dir);
        Ok(CONNECTION_MAPS
            .iter()
            .chain(&GLOBAL_MAPS)
            .all(|m| pins.iter().any(|p| p == m)))
    })
    .with_context(|| format!("pins in {}: {pins:?}", dir.display()))?;
    Ok(pins)
}

/// Run directly in this mount namespace with `--pin-dir` (not under `ip netns exec`, whose
/// private mount namespace dies with the process): the pins exist while spliced runs; after a
/// SIGKILL they stay behind, and the next start replaces them with a warning and works; after
/// SIGTERM they are gone.
#[test]
fn pins_are_replaced_when_stale_and_removed_at_exit() -> Result<()> {
    let world = World::new()?; // only for its scratch directory
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos();
    let dir = PinDir(PathBuf::from(format!(
        "/sys/fs/bpf/spliced-test-{}-{stamp}",
        std::process::id()
    )));
    let (backend_port, echoes) = loopback_echo(2, Duration::from_secs(30))?;
    let port = raw::free_port(IpAddr::V4(Ipv4Addr::LOCALHOST))?;
    let cfg = format!(
        r#"[defaults]
forwarding = "sockmap"
{NO_HANDOFF}

[[listen]]
address = "127.0.0.1:{port}"
protocol = "tls"

[[site]]
hostnames = ["pin.example"]
backend = "[::1]:{backend_port}"
"#
    );
    let launch = |name: &str| {
        Launch::new(cfg.as_str())
            .named(name)
            .arg("--pin-dir")
            .arg(&dir.0)
            .env("RUST_LOG", "spliced=debug")
    };
    let mut first = launch("spliced-first").start_here(world.dir(), &[port])?;
    let pins = wait_for_pins(&dir.0, &mut first)?;
    let me = loopback_roundtrip(port, "pin.example")?;
    first.log_line_for(me, LOG_WAIT)?;
    first.stop(Signal::SIGKILL, Duration::from_secs(5))?;
    ensure!(
        pins_present(&dir.0) == pins,
        "after SIGKILL the pins {pins:?} should be left behind: {:?}",
        pins_present(&dir.0)
    );

    let mut second = launch("spliced-second").start_here(world.dir(), &[port])?;
    // The old pins are still there until the new process replaces them, with a warning each.
    let mut warnings = 0;
    wait_for(
        "a \"removing a stale pin\" warning per pin",
        Duration::from_secs(10),
        || {
            second.check_running()?;
            warnings = second
                .stderr_text()
                .lines()
                .filter(|l| l.contains("removing a stale pin"))
                .count();
            Ok(warnings >= pins.len())
        },
    )
    .with_context(|| {
        format!(
            "{warnings} warnings for {pins:?}:\n{}",
            second.stderr_text()
        )
    })?;
    ensure!(
        warnings == pins.len(),
        "{warnings} stale-pin warnings for {pins:?}"
    );
    let again = wait_for_pins(&dir.0, &mut second)?;
    ensure!(again == pins, "pins {again:?} after {pins:?}");
    let me = loopback_roundtrip(port, "pin.example")?;
    let n = (simple_hello("pin.example").len() + 50_000) as u64;
    expect_ok(&second, me, n, n)?;
    // The new pins are the live maps: the peer map is readable and empty again.
    let out = Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(dir.0.join("SPLICED_PEERS"))
        .arg("-j")
        .output()?;
    ensure!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "[]",
        "bpftool on the new pin: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let status = second.terminate(Duration::from_secs(10))?;
    ensure!(status.success(), "spliced exited with {status}");
    ensure!(
        pins_present(&dir.0).is_empty() && !dir.0.exists(),
        "after SIGTERM the pins should be gone: {:?} (directory exists: {})",
        pins_present(&dir.0),
        dir.0.exists()
    );
    result(&echoes, IO, "the loopback echo server")?;
    Ok(())
}

/// Runs spliced as nobody with no capabilities: `auto` says the kernel path is unavailable and
/// serves with splice; `sockmap` refuses to start and says why.
#[test]
fn without_privileges_auto_falls_back_and_sockmap_refuses() -> Result<()> {
    const HIGH_PORT: u16 = 8443;
    let world = World::new()?;
    let _echo = TestBackend::start(&world, ECHO_PORT, Behavior::Echo)?;
    let setpriv = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
    ];
    let cfg = |forwarding: &str| {
        config_with(forwarding, "").replace("0.0.0.0:443", &format!("0.0.0.0:{HIGH_PORT}"))
    };

    let mut refused = Launch::new(cfg("sockmap"))
        .named("spliced-nobody-sockmap")
        .arg("--control-socket")
        .arg("none")
        .wrapped(&setpriv)
        .start(&world, &[])?;
    wait_for("spliced to give up", Duration::from_secs(10), || {
        Ok(refused.check_running().is_err())
    })?;
    let status = refused.stop(Signal::SIGKILL, Duration::from_secs(1))?;
    let said = refused.stderr_text();
    ensure!(
        !status.success() && said.contains("sockmap"),
        "forwarding = \"sockmap\" as nobody: {status}, said:\n{said}"
    );

    let auto = Launch::new(cfg("auto"))
        .named("spliced-nobody-auto")
        .arg("--control-socket")
        .arg("none")
        .wrapped(&setpriv)
        .start(&world, &[HIGH_PORT])?;
    let pid = auto.pid().context("no pid")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    ensure!(
        status
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("65534")),
        "spliced does not run as nobody:\n{status}"
    );
    ensure!(
        auto.stderr_text().contains("kernel path is unavailable"),
        "no \"kernel path is unavailable\" in:\n{}",
        auto.stderr_text()
    );
    let mut client = raw::connect(&world, HIGH_PORT, IO)?;
    let me = client.local_addr()?;
    let sent = [simple_hello("echo.example").as_slice(), b"as nobody"].concat();
    client.write_all(&sent)?;
    ensure!(
        raw::read_exactly(&mut client, sent.len())? == sent,
        "echo differs"
    );
    client.shutdown(Shutdown::Write)?;
    let (_, end) = raw::read_to_end(&mut client, 1 << 16);
    ensure!(end == End::Eof, "{end:?}");
    let line = auto.log_line_for(me, LOG_WAIT)?;
    ensure!(
        field(&line, "outcome") == Some("ok") && field(&line, "engine") == Some("splice"),
        "expected outcome=ok engine=splice: {line}"
    );
    Ok(())
}

/// The eBPF objects a process holds (programs, maps, links), as `ls -l /proc/PID/fd` shows them.
fn bpf_objects(pid: u32) -> Result<Vec<String>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        if let Ok(target) = std::fs::read_link(entry?.path()) {
            let target = target.to_string_lossy().into_owned();
            if target.starts_with("anon_inode:bpf") {
                found.push(target);
            }
        }
    }
    Ok(found)
}

/// A configuration that names only splice (or copy) loads no program and creates no map;
/// `auto` and `sockmap` load them.
#[test]
fn only_engines_that_use_ebpf_load_it() -> Result<()> {
    let world = World::new()?;
    let _echo = TestBackend::start(&world, ECHO_PORT, Behavior::Echo)?;
    let splice = Launch::new(config_with("splice", ""))
        .named("splice")
        .start(&world, &[443])?;
    roundtrip(&world, "echo.example", b"through splice")?;
    let held = bpf_objects(splice.pid().context("no pid")?)?;
    ensure!(held.is_empty(), "splice holds eBPF objects: {held:?}");
    drop(splice);
    let auto = Launch::new(config_with("auto", ""))
        .named("auto")
        .start(&world, &[443])?;
    let held = bpf_objects(auto.pid().context("no pid")?)?;
    ensure!(
        held.iter().any(|t| t.contains("bpf-prog")) && held.iter().any(|t| t.contains("bpf-map")),
        "auto holds no programs and maps: {held:?}"
    );
    Ok(())
}
