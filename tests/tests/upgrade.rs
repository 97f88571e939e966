//! Upgrades without refused connections: a new spliced takes the listening sockets over from
//! the running one (`--upgrade-from` its control socket), which stops accepting, drains and
//! exits.
//!
//! - clients connecting without pause through an upgrade: not one fails (the counts are
//!   printed on standard error and written to `target/tmp/upgrade.summary`); a 256 MiB
//!   transfer begun before, which the old process splices in the kernel, ends byte-exact on
//!   the old process, which then exits 0; the new process serves, `/metrics` included;
//! - failed upgrades (an invalid file; a new listener whose address is taken) leave the old
//!   process serving, and the new one exits 1 saying why;
//! - under systemd's notify protocol (a `NOTIFY_SOCKET` the test reads, with each sender's
//!   PID), upgrades that the running process starts itself (`spliced upgrade`, SIGUSR2): the
//!   new process says `MAINPID=` and `READY=1`, the old one no `STOPPING=1`; a failed one
//!   tells systemd nothing.
//!
//! Run as root with a release build of the proxy:
//! `cargo xtask build && SPLICED_BIN=$PWD/target/release/spliced cargo test --release -p spliced-tests --test upgrade`.
use std::{
    io::{IoSliceMut, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    os::{fd::AsRawFd as _, unix::net::UnixDatagram},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use nix::{
    errno::Errno,
    sys::{
        prctl::set_child_subreaper,
        signal::{Signal, kill},
        socket::{ControlMessageOwned, MsgFlags, UnixCredentials, recvmsg, setsockopt, sockopt},
        wait::{WaitPidFlag, WaitStatus, waitpid},
    },
    unistd::Pid,
};
use spliced_tests::{
    BACKEND_V6, Ns, Service, World, env_or,
    load::ClientLoop,
    raw::{
        self, Behavior, End, TestBackend, Verifier, expect_hello, receive_stream,
        send_stream_range, simple_hello, spawn,
    },
    spliced::{Launch, Spliced, field},
    spliced_bin, wait_for,
};

const ECHO_PORT: u16 = 9340;
const METRICS_PORT: u16 = 9464;
const IO: Duration = Duration::from_secs(10);

fn config(extra_listener: Option<&str>) -> String {
    let extra = extra_listener.map_or(String::new(), |a| {
        format!("\n[[listen]]\naddress = \"{a}\"\nprotocol = \"tls\"\n")
    });
    format!(
        r#"[defaults]
client_hello_timeout = "2s"
connect_timeout = "2s"

[[listen]]
address = "0.0.0.0:443"
protocol = "tls"
{extra}
[[site]]
hostnames = ["a.example"]
backend = "[{BACKEND_V6}]:{ECHO_PORT}"

[[site]]
hostnames = ["b.example"]
backend = "[{BACKEND_V6}]:{ECHO_PORT}"
"#
    )
}

/// A new spliced taking over from `old`, and serving the same control socket after it (as
/// both would with the default path).
fn successor(old: &Spliced, name: &str, config: String) -> Result<Launch> {
    let from = old.control_socket().context("no control socket")?;
    Ok(Launch::new(config)
        .named(name)
        .arg("--upgrade-from")
        .arg(from)
        .arg("--control-socket")
        .arg(from))
}

/// Waits until `spliced` has logged `what`.
fn wait_logged(spliced: &Spliced, what: &str, timeout: Duration) -> Result<()> {
    wait_for(&format!("{what:?} in the log"), timeout, || {
        Ok(spliced.stderr_text().contains(what))
    })
    .with_context(|| spliced.stderr_text())
}

/// Waits for `spliced` to exit and returns how (`exit status: N`) and what it printed.
fn exited(spliced: &mut Service, timeout: Duration) -> Result<String> {
    let mut how = String::new();
    wait_for("the process to exit", timeout, || {
        match spliced.check_running() {
            Ok(()) => Ok(false),
            Err(e) => {
                how = format!("{e:#}");
                Ok(true)
            }
        }
    })
    .with_context(|| format!("it kept running: {}", spliced.stderr_text()))?;
    Ok(how)
}

/// A hello for `name` and its echo, then a clean end.
fn roundtrip(world: &World, name: &str) -> Result<()> {
    roundtrip_on(world, 443, name)
}

/// Like [`roundtrip`], on `port`.
fn roundtrip_on(world: &World, port: u16, name: &str) -> Result<()> {
    let mut stream = raw::connect(world, port, IO)?;
    let hello = simple_hello(name);
    stream.write_all(&hello)?;
    expect_hello(&mut stream, &hello).with_context(|| format!("a connection to {name}"))?;
    stream.shutdown(Shutdown::Write)?;
    let (rest, end) = raw::read_to_end(&mut stream, 1 << 16);
    ensure!(end == End::Eof && rest.is_empty(), "{name}: {end:?}");
    Ok(())
}

/// A long position-checked transfer through spliced on 443 (site `a.example`), started before
/// an upgrade: its first 16 MiB go through at once (past the 256 KiB after which `auto` hands
/// a direction to the kernel), the rest in [`LongTransfer::finish`].
struct LongTransfer {
    stream: TcpStream,
    seed: u64,
    total: u64,
    received: std::sync::mpsc::Receiver<Result<u64>>,
}

impl LongTransfer {
    const FIRST: u64 = 16 << 20;

    fn start(world: &World, seed: u64, total: u64) -> Result<LongTransfer> {
        let mut stream = raw::connect(world, 443, Duration::from_secs(60))?;
        let hello = simple_hello("a.example");
        stream.write_all(&hello)?;
        expect_hello(&mut stream, &hello)?;
        let mut reader = stream.try_clone()?;
        let received = spawn(move || {
            let mut verifier = Verifier::new(seed, total);
            receive_stream(&mut reader, &mut verifier)?;
            verifier.finish()?;
            Ok(verifier.received())
        });
        send_stream_range(&mut stream, seed, 0, Self::FIRST).context("the first part")?;
        Ok(LongTransfer {
            stream,
            seed,
            total,
            received,
        })
    }

    /// Sends the rest, and checks that every byte came back in order and that `old`, the
    /// process that accepted it, logged it as `ok`; returns that log line.
    fn finish(mut self, old: &Spliced) -> Result<String> {
        let client = self.stream.local_addr()?;
        send_stream_range(&mut self.stream, self.seed, Self::FIRST, self.total)
            .context("the rest of the transfer")?;
        self.stream.shutdown(Shutdown::Write)?;
        let got = raw::result(
            &self.received,
            Duration::from_secs(120),
            "the long transfer",
        )?;
        ensure!(got == self.total, "{got} of {} bytes came back", self.total);
        let line = old.log_line_for(client, IO)?;
        ensure!(
            field(&line, "outcome") == Some("ok"),
            "the long transfer's line in the old process's log: {line}"
        );
        Ok(line)
    }
}

/// How many access-log lines say `outcome=ok`.
fn served(spliced: &Spliced) -> usize {
    spliced
        .stdout_text()
        .lines()
        .filter(|l| field(l, "outcome") == Some("ok"))
        .count()
}

#[test]
fn an_upgrade_under_load_fails_no_connection_and_finishes_open_transfers() -> Result<()> {
    let world = World::new()?;
    let _echo = TestBackend::start(&world, ECHO_PORT, Behavior::Echo)?;
    let mut old = Launch::new(config(None))
        .named("old")
        .arg("--grace")
        .arg("120")
        .metrics_at(METRICS_PORT)
        .start(&world, &[443])?;
    let old_pid = old.pid().context("no PID")?;

    // The long transfer: its first part goes through before the upgrade, the rest after.
    let total = env_or("SPLICED_TEST_UPGRADE_BYTES", 256 << 20);
    let long = LongTransfer::start(&world, 0x0b1d_5eed, total)?;

    let clients = ClientLoop::start(
        &world,
        443,
        &["a.example", "b.example"],
        4,
        100_000,
        Duration::from_secs(90),
    )?;
    wait_for("the clients' first connections", IO, || {
        Ok(clients.attempted() >= 50)
    })?;
    let before = clients.attempted();
    let started = Instant::now();
    let new = successor(&old, "new", config(None))?
        .metrics_at(METRICS_PORT)
        .start(&world, &[])?;
    let new_pid = new.pid().context("no PID")?;
    wait_logged(
        &new,
        "upgrade: the old process stopped accepting",
        Duration::from_secs(30),
    )?;
    let took = started.elapsed();
    wait_logged(&old, "the new process is ready", IO)?;
    let after = clients.attempted() + 100;
    wait_for("connections after the upgrade", IO, || {
        Ok(clients.attempted() >= after)
    })?;

    let line = long.finish(&old)?;
    let how = exited(&mut old, Duration::from_secs(30))?;
    ensure!(
        how.contains("exit status: 0"),
        "the old process should exit 0 after draining: {how}"
    );

    let counts = clients.stop();
    let summary = format!(
        "upgrade under load: PID {old_pid} -> {new_pid} in {:.2} s ({before} connections \
         before it began); connections: {counts}; served by the old process: {}, by the new: \
         {}; long transfer: {total} bytes, engine {}",
        took.as_secs_f64(),
        served(&old),
        served(&new),
        field(&line, "engine").unwrap_or("-"),
    );
    eprintln!("{summary}");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tmp");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join("upgrade.summary"), format!("{summary}\n"));
    ensure!(counts.failed == 0, "{summary}");
    ensure!(
        served(&new) > 0 && served(&old) > 1,
        "both processes should have served: {summary}"
    );

    // The new one serves alone now, /metrics included.
    roundtrip(&world, "b.example")?;
    let m = new.metrics()?;
    ensure!(!m.samples.is_empty(), "the new process's /metrics is empty");
    Ok(())
}

#[test]
fn a_failed_upgrade_leaves_the_old_process_serving() -> Result<()> {
    let world = World::new()?;
    let _echo = TestBackend::start(&world, ECHO_PORT, Behavior::Echo)?;
    let old = Launch::new(config(None))
        .named("old")
        .start(&world, &[443])?;

    // An invalid file: refused before anything is asked of the old process.
    let broken = config(None).replace(
        &format!("\"[{BACKEND_V6}]:{ECHO_PORT}\""),
        "\"not an address\"",
    );
    let line = broken
        .lines()
        .position(|l| l.contains("not an address"))
        .context("the broken line")?
        + 1;
    let mut bad = successor(&old, "broken", broken)?.start(&world, &[])?;
    let how = exited(&mut bad, IO)?;
    ensure!(how.contains("exit status: 1"), "{how}");
    let place = format!("broken.toml:{line}:");
    ensure!(
        bad.stderr_text().contains(&place),
        "the error should name {place}: {}",
        bad.stderr_text()
    );
    roundtrip(&world, "a.example")?;

    // A valid file with a new listener whose address is taken: the new process gets the
    // sockets, fails before it is ready, and the old one goes on accepting.
    let taken = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 8443);
    let _squatter = raw::listen_in(&world, Ns::Proxy, taken)?;
    let mut blocked =
        successor(&old, "blocked", config(Some(&taken.to_string())))?.start(&world, &[])?;
    let how = exited(&mut blocked, IO)?;
    ensure!(how.contains("exit status: 1"), "{how}");
    ensure!(
        blocked.stderr_text().contains("0.0.0.0:8443"),
        "the error should name the address: {}",
        blocked.stderr_text()
    );
    wait_logged(&old, "upgrade abandoned", IO)?;
    ensure!(
        !old.stderr_text().contains("the new process is ready"),
        "the old process stopped accepting: {}",
        old.stderr_text()
    );
    for _ in 0..20 {
        roundtrip(&world, "a.example")?;
    }

    // And a good one still goes through after those; then more from it, through the control
    // socket it took over: one that adds a listener (bound fresh), one that removes it again
    // (closed once the process before it is gone).
    let new = successor(&old, "new", config(None))?.start(&world, &[])?;
    wait_logged(
        &new,
        "upgrade: the old process stopped accepting",
        Duration::from_secs(30),
    )?;
    roundtrip(&world, "b.example")?;
    let added = "0.0.0.0:8444";
    let mut newer = successor(&new, "newer", config(Some(added)))?.start(&world, &[])?;
    wait_logged(
        &newer,
        "upgrade: the old process stopped accepting",
        Duration::from_secs(30),
    )?;
    roundtrip(&world, "a.example")?;
    roundtrip_on(&world, 8444, "a.example")?;
    let newest = successor(&newer, "newest", config(None))?.start(&world, &[])?;
    wait_logged(
        &newest,
        "upgrade: closing listener 0.0.0.0:8444",
        Duration::from_secs(30),
    )?;
    wait_logged(
        &newest,
        "upgrade: the old process stopped accepting",
        Duration::from_secs(30),
    )?;
    let how = exited(&mut newer, IO)?;
    ensure!(how.contains("exit status: 0"), "{how}");
    roundtrip(&world, "b.example")?;
    ensure!(
        raw::connect(&world, 8444, IO).is_err(),
        "the listener the last file removed still accepts"
    );
    Ok(())
}

/// The id of the map pinned at `path`, from bpftool.
fn pinned_id(path: &Path) -> Result<u64> {
    let out = Command::new("bpftool")
        .args(["-j", "map", "show", "pinned"])
        .arg(path)
        .output()?;
    ensure!(
        out.status.success(),
        "bpftool map show pinned {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let info: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    info["id"].as_u64().context("no id in bpftool's answer")
}

/// Removes the test's pin directory, whatever is left in it.
struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        for entry in std::fs::read_dir(&self.0).into_iter().flatten().flatten() {
            let _ = std::fs::remove_file(entry.path());
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// The pin directory passes from the old process to the new one: the pins name the new
/// process's maps, the old one's kernel-spliced connection goes on in its own (now unpinned)
/// maps, and the old process's exit leaves the new pins alone. Run in this mount namespace,
/// on loopback, where both processes see the same bpffs (under `ip netns exec` each would
/// mount its own).
#[test]
fn the_pins_pass_to_the_new_process() -> Result<()> {
    let world = World::new()?; // for its scratch directory
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos();
    let dir = PinDir(PathBuf::from(format!(
        "/sys/fs/bpf/spliced-upgrade-{}-{stamp}",
        std::process::id()
    )));
    let echo = TcpListener::bind(SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 0))?;
    let backend = echo.local_addr()?;
    let echoed = spawn(move || {
        // Bounded: the long connection, then one through the new process.
        for _ in 0..2 {
            let stream = raw::accept_within(&echo, Duration::from_secs(60), IO)?;
            std::thread::spawn(move || raw::echo(stream));
        }
        Ok(())
    });
    let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let port = raw::free_port(loopback)?;
    let config = format!(
        "[defaults]\nforwarding = \"sockmap\"\n\n[[listen]]\naddress = \"127.0.0.1:{port}\"\n\
         protocol = \"tls\"\n\n[[site]]\nhostnames = [\"echo.example\"]\nbackend = \"{backend}\"\n"
    );
    let control = world.dir().join("control.sock");
    let launch = |name: &str| {
        Launch::new(config.as_str())
            .named(name)
            .arg("--pin-dir")
            .arg(&dir.0)
            .arg("--control-socket")
            .arg(&control)
    };
    let mut old = launch("old").start_here(world.dir(), &[port])?;
    let peers = dir.0.join("SPLICED_PEERS");
    let old_map = pinned_id(&peers)?;

    let len = 8u64 << 20;
    let half = len / 2;
    let seed = 0x0915_5eed;
    let mut long = TcpStream::connect_timeout(&SocketAddr::new(loopback, port), IO)?;
    long.set_read_timeout(Some(IO))?;
    let hello = simple_hello("echo.example");
    long.write_all(&hello)?;
    expect_hello(&mut long, &hello)?;
    let mut reader = long.try_clone()?;
    let received = spawn(move || {
        let mut verifier = Verifier::new(seed, len);
        receive_stream(&mut reader, &mut verifier)?;
        verifier.finish()?;
        Ok(())
    });
    send_stream_range(&mut long, seed, 0, half)?;

    let new = launch("new")
        .arg("--upgrade-from")
        .arg(&control)
        .start_here(world.dir(), &[])?;
    wait_logged(
        &new,
        "upgrade: the old process stopped accepting",
        Duration::from_secs(30),
    )?;
    let new_map = pinned_id(&peers)?;
    ensure!(
        new_map != old_map,
        "the pin still names the old process's map {old_map}"
    );
    ensure!(
        !new.stderr_text().contains("ERROR"),
        "the new process logged an error: {}",
        new.stderr_text()
    );
    let staging = format!("{}-upgrade-{}", dir.0.display(), new.pid().unwrap_or(0));
    ensure!(
        !Path::new(&staging).exists(),
        "the staging directory {staging} was left behind"
    );

    send_stream_range(&mut long, seed, half, len)?;
    long.shutdown(Shutdown::Write)?;
    raw::result(
        &received,
        Duration::from_secs(60),
        "the old process's connection",
    )?;
    let how = exited(&mut old, Duration::from_secs(30))?;
    ensure!(how.contains("exit status: 0"), "{how}");
    ensure!(
        pinned_id(&peers)? == new_map,
        "the old process's exit changed the pins"
    );
    let mut client = TcpStream::connect_timeout(&SocketAddr::new(loopback, port), IO)?;
    client.set_read_timeout(Some(IO))?;
    client.write_all(&hello)?;
    expect_hello(&mut client, &hello)?;
    drop(client);
    raw::result(&echoed, IO, "the loopback echo server")?;
    drop(new);
    Ok(())
}

/// The watchdog timeout the systemd tests announce; spliced pings at half of it.
const WATCHDOG: Duration = Duration::from_secs(2);

/// The datagram socket systemd would listen on as `NOTIFY_SOCKET`, reading each message with
/// its sender's PID (`SO_PASSCRED`), as systemd does to tell which process spoke.
struct Notify {
    socket: UnixDatagram,
    path: PathBuf,
    /// Every message so far: the sender's PID and the text.
    messages: Vec<(u32, String)>,
}

impl Notify {
    fn bind(world: &World) -> Result<Notify> {
        let path = world.dir().join("notify.sock");
        let socket =
            UnixDatagram::bind(&path).with_context(|| format!("binding {}", path.display()))?;
        setsockopt(&socket, sockopt::PassCred, &true)?;
        Ok(Notify {
            socket,
            path,
            messages: Vec::new(),
        })
    }

    /// One message, if one comes within `timeout`.
    fn receive(&mut self, timeout: Duration) -> Result<Option<(u32, String)>> {
        self.socket
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
        let mut buf = vec![0u8; 4096];
        let mut space = nix::cmsg_space!(UnixCredentials);
        let (len, pid) = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = match recvmsg::<()>(
                self.socket.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::empty(),
            ) {
                Ok(msg) => msg,
                Err(Errno::EAGAIN | Errno::EINTR) => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            let mut pid = None;
            for cmsg in msg.cmsgs()? {
                if let ControlMessageOwned::ScmCredentials(creds) = cmsg {
                    pid = Some(u32::try_from(creds.pid())?);
                }
            }
            (msg.bytes, pid.context("a message without credentials")?)
        };
        let text = String::from_utf8_lossy(&buf[..len]).into_owned();
        self.messages.push((pid, text.clone()));
        Ok(Some((pid, text)))
    }

    /// Reads until a message satisfies `want` (within `timeout`); returns it.
    fn wait(
        &mut self,
        what: &str,
        timeout: Duration,
        want: impl Fn(u32, &str) -> bool,
    ) -> Result<(u32, String)> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "no {what} within {timeout:?}; messages: {:#?}",
                    self.messages
                );
            }
            if let Some((pid, text)) = self.receive(left)?
                && want(pid, &text)
            {
                return Ok((pid, text));
            }
        }
    }

    /// Reads what is queued now.
    fn drain(&mut self) -> Result<()> {
        while self.receive(Duration::from_millis(50))?.is_some() {}
        Ok(())
    }
}

/// Whether `message` has the line `line`.
fn has(message: &str, line: &str) -> bool {
    message.lines().any(|l| l == line)
}

/// The value of `KEY=` in `message`.
fn value<'a>(message: &'a str, key: &str) -> Option<&'a str> {
    message
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

/// A spliced started with a `NOTIFY_SOCKET`, `WATCHDOG_USEC` and its own PID as
/// `WATCHDOG_PID`, as systemd starts the unit's main process.
fn under_systemd(notify: &Notify, config: String) -> Launch {
    Launch::new(config)
        .named("old")
        .env("NOTIFY_SOCKET", &notify.path)
        .env("WATCHDOG_USEC", WATCHDOG.as_micros().to_string())
        .wrapped(&["sh", "-c", "export WATCHDOG_PID=$$; exec \"$@\"", "sh"])
}

/// `spliced upgrade` against `control`: its exit code and what it printed.
fn spliced_upgrade(control: &Path) -> Result<(Option<i32>, String)> {
    let out = Command::new(spliced_bin()?)
        .args(["upgrade", "--timeout", "60", "--control-socket"])
        .arg(control)
        .output()?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.code(), said))
}

/// A process that a spliced under test started itself (the new one of an upgrade). The test
/// process is a child subreaper, as systemd is for its services, so the process is the test's
/// child as soon as the intermediate that spliced forks it from exits: the test reaps it, and
/// stops it (by PID) if the test ends first.
struct Adopted {
    pid: Pid,
    reaped: bool,
}

impl Adopted {
    fn new(pid: u32) -> Result<Adopted> {
        Ok(Adopted {
            pid: Pid::from_raw(i32::try_from(pid)?),
            reaped: false,
        })
    }

    /// Waits up to `timeout` for it to exit; returns how.
    fn exited(&mut self, timeout: Duration) -> Result<WaitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            match waitpid(self.pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => {}
                Ok(status) => {
                    self.reaped = true;
                    return Ok(status);
                }
                Err(e) => return Err(e.into()),
            }
            ensure!(
                Instant::now() < deadline,
                "process {} still runs after {timeout:?}",
                self.pid
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn alive(&self) -> bool {
        !self.reaped && kill(self.pid, None).is_ok()
    }
}

impl Drop for Adopted {
    fn drop(&mut self) {
        if self.reaped {
            return;
        }
        let _ = kill(self.pid, Signal::SIGTERM);
        if self.exited(Duration::from_secs(15)).is_err() {
            let _ = kill(self.pid, Signal::SIGKILL);
            let _ = self.exited(Duration::from_secs(5));
        }
    }
}

/// `pid`'s parent, from `/proc`.
fn parent_of(pid: u32) -> Result<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // After the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').context("no command name")?.1;
    Ok(rest
        .split_whitespace()
        .nth(1)
        .context("no parent field")?
        .parse()?)
}

/// `pid`'s cgroup memberships, as `/proc/PID/cgroup` lists them.
fn cgroup_of(pid: u32) -> Result<String> {
    Ok(std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?)
}

/// Waits for the `MAINPID=` message and checks that the new process sent it, about itself,
/// with `READY=1`; returns the new PID.
fn wait_main_pid(notify: &mut Notify, timeout: Duration) -> Result<u32> {
    let (from, message) = notify.wait("MAINPID=", timeout, |_, m| value(m, "MAINPID").is_some())?;
    let main: u32 = value(&message, "MAINPID").context("no MAINPID")?.parse()?;
    ensure!(
        from == main && has(&message, "READY=1"),
        "MAINPID= should come from the new process itself, with READY=1: from {from}: \
         {message:?}"
    );
    Ok(main)
}

/// Under systemd, `spliced upgrade` makes the running process start the new one itself, in
/// its cgroup and as the service manager's child: the new one says `MAINPID=` itself and `READY=1`, the old one sends no
/// `STOPPING=1`, only a draining status, and goes quiet (no more watchdog pings), drains and
/// exits 0, while clients connecting without pause all succeed and a long transfer begun
/// before ends byte-exact; the new process pings the watchdog (its `WATCHDOG_PID` is not the
/// old one's) and serves. Then SIGUSR2 does the same from the new process to a third.
#[test]
fn under_systemd_the_running_process_starts_its_successor_and_hands_the_service_over() -> Result<()>
{
    let world = World::new()?;
    let _echo = TestBackend::start(&world, ECHO_PORT, Behavior::Echo)?;
    set_child_subreaper(true)?;
    let mut notify = Notify::bind(&world)?;
    let mut old = under_systemd(&notify, config(None))
        .arg("--grace")
        .arg("120")
        .start(&world, &[443])?;
    let old_pid = old.pid().context("no PID")?;
    let control = old
        .control_socket()
        .context("no control socket")?
        .to_owned();
    let (from, _) = notify
        .wait("READY=1", IO, |_, m| has(m, "READY=1"))
        .with_context(|| old.stderr_text())?;
    ensure!(from == old_pid, "READY=1 from {from}, not {old_pid}");
    notify.wait("the old process's watchdog", WATCHDOG * 2, |p, m| {
        p == old_pid && has(m, "WATCHDOG=1")
    })?;

    let total = env_or("SPLICED_TEST_SYSTEMD_UPGRADE_BYTES", 64 << 20);
    let long = LongTransfer::start(&world, 0x5d_5eed, total)?;
    let clients = ClientLoop::start(
        &world,
        443,
        &["a.example", "b.example"],
        4,
        100_000,
        Duration::from_secs(90),
    )?;
    wait_for("the clients' first connections", IO, || {
        Ok(clients.attempted() >= 50)
    })?;

    let (code, said) = spliced_upgrade(&control)?;
    ensure!(
        code == Some(0),
        "spliced upgrade exited {code:?}: {said}\n{}",
        old.stderr_text()
    );
    let new_pid: u32 = said
        .split_whitespace()
        .nth(2)
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("no PID in {said:?}"))?;
    let mut new = Adopted::new(new_pid)?;
    // Not the old process's child, but the service manager's (the subreaper, here the test):
    // systemd 252 does not wait on stop for a main process that is not its child.
    ensure!(
        parent_of(new_pid)? == std::process::id() && cgroup_of(new_pid)? == cgroup_of(old_pid)?,
        "the new process should be the service manager's child, in the old one's cgroup \
         (parent {}, not {})",
        parent_of(new_pid)?,
        std::process::id()
    );
    ensure!(
        wait_main_pid(&mut notify, IO)? == new_pid,
        "MAINPID= names another process than `spliced upgrade` said ({new_pid})"
    );
    let main_at = notify.messages.len() - 1;
    let draining = notify.messages[..main_at].iter().rposition(|(p, m)| {
        *p == old_pid && value(m, "STATUS").is_some_and(|s| s.starts_with("draining after upgrade"))
    });
    ensure!(
        draining.is_some(),
        "no draining status from the old process before MAINPID=: {:#?}",
        notify.messages
    );
    notify.wait("the new process's watchdog", WATCHDOG * 2, |p, m| {
        p == new_pid && has(m, "WATCHDOG=1")
    })?;
    let after = clients.attempted() + 100;
    wait_for("connections after the upgrade", IO, || {
        Ok(clients.attempted() >= after)
    })?;

    long.finish(&old)?;
    let how = exited(&mut old, Duration::from_secs(30))?;
    ensure!(
        how.contains("exit status: 0"),
        "the old process should exit 0 after draining: {how}"
    );
    let counts = clients.stop();
    notify.drain()?;
    let stopping: Vec<_> = notify
        .messages
        .iter()
        .filter(|(_, m)| has(m, "STOPPING=1"))
        .collect();
    ensure!(
        stopping.is_empty(),
        "STOPPING=1 in an upgrade: {stopping:#?}"
    );
    let late: Vec<_> = notify.messages[draining.unwrap_or(0) + 1..]
        .iter()
        .filter(|(p, _)| *p == old_pid)
        .collect();
    ensure!(
        late.is_empty(),
        "the old process spoke after handing over: {late:#?}"
    );
    let summary = format!(
        "upgrade under systemd's notify protocol: PID {old_pid} -> {new_pid}; connections: \
         {counts}; long transfer: {total} bytes"
    );
    eprintln!("{summary}");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tmp");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join("upgrade-systemd.summary"), format!("{summary}\n"));
    ensure!(counts.failed == 0, "{summary}");
    ensure!(new.alive(), "the new process is gone");
    roundtrip(&world, "b.example")?;

    // SIGUSR2 to the new main process: the same once more, to a third.
    kill(Pid::from_raw(i32::try_from(new_pid)?), Signal::SIGUSR2)?;
    let newest_pid = wait_main_pid(&mut notify, IO)?;
    let mut newest = Adopted::new(newest_pid)?;
    ensure!(newest_pid != new_pid, "MAINPID= did not change");
    let status = new.exited(Duration::from_secs(30))?;
    ensure!(
        status == WaitStatus::Exited(Pid::from_raw(i32::try_from(new_pid)?), 0),
        "the second process should exit 0 after its drain: {status:?}"
    );
    roundtrip(&world, "a.example")?;
    ensure!(newest.alive(), "the third process is gone");
    kill(Pid::from_raw(i32::try_from(newest_pid)?), Signal::SIGTERM)?;
    newest.exited(IO)?;
    notify.drain()?;
    ensure!(
        notify
            .messages
            .iter()
            .any(|(p, m)| *p == newest_pid && has(m, "STOPPING=1")),
        "no STOPPING=1 when the service's last process stops"
    );
    Ok(())
}

/// Under systemd, an upgrade whose new process cannot start (the configuration file was
/// broken meanwhile) changes nothing for systemd: no `MAINPID=`, no `STOPPING=1`; the old
/// process logs why, `spliced upgrade` exits 1, SIGUSR2 does the same, and clients connecting
/// meanwhile all succeed. Once the file is fixed, the next SIGUSR2 goes through.
#[test]
fn under_systemd_a_failed_upgrade_leaves_the_service_as_it_was() -> Result<()> {
    let world = World::new()?;
    let _echo = TestBackend::start(&world, ECHO_PORT, Behavior::Echo)?;
    set_child_subreaper(true)?;
    let mut notify = Notify::bind(&world)?;
    let old = under_systemd(&notify, config(None)).start(&world, &[443])?;
    let old_pid = old.pid().context("no PID")?;
    let control = old
        .control_socket()
        .context("no control socket")?
        .to_owned();
    notify
        .wait("READY=1", IO, |_, m| has(m, "READY=1"))
        .with_context(|| old.stderr_text())?;
    let clients = ClientLoop::start(
        &world,
        443,
        &["a.example", "b.example"],
        2,
        100_000,
        Duration::from_secs(60),
    )?;
    wait_for("the clients' first connections", IO, || {
        Ok(clients.attempted() >= 20)
    })?;

    let good = config(None);
    let broken = good.replace(
        &format!("\"[{BACKEND_V6}]:{ECHO_PORT}\""),
        "\"not an address\"",
    );
    let line = broken
        .lines()
        .position(|l| l.contains("not an address"))
        .context("the broken line")?
        + 1;
    std::fs::write(old.config_path(), &broken)?;
    let (code, said) = spliced_upgrade(&control)?;
    ensure!(
        code == Some(1) && said.contains("exited"),
        "spliced upgrade should fail with 1 and say why: {code:?} {said}"
    );
    wait_logged(&old, "upgrade failed", IO)?;
    let place = format!("old.toml:{line}:");
    ensure!(
        old.stderr_text().contains(&place),
        "the new process's error should name {place}: {}",
        old.stderr_text()
    );
    kill(Pid::from_raw(i32::try_from(old_pid)?), Signal::SIGUSR2)?;
    wait_for("the second failure in the log", IO, || {
        Ok(old.stderr_text().matches("upgrade failed").count() >= 2)
    })
    .with_context(|| old.stderr_text())?;
    for _ in 0..20 {
        roundtrip(&world, "a.example")?;
    }
    let counts = clients.stop();
    notify.drain()?;
    let changed: Vec<_> = notify
        .messages
        .iter()
        .filter(|(p, m)| *p != old_pid || value(m, "MAINPID").is_some() || has(m, "STOPPING=1"))
        .collect();
    ensure!(
        changed.is_empty(),
        "a failed upgrade told systemd something: {changed:#?}"
    );
    ensure!(counts.failed == 0, "connections meanwhile: {counts}");

    std::fs::write(old.config_path(), &good)?;
    kill(Pid::from_raw(i32::try_from(old_pid)?), Signal::SIGUSR2)?;
    let new_pid =
        wait_main_pid(&mut notify, Duration::from_secs(30)).with_context(|| old.stderr_text())?;
    let _new = Adopted::new(new_pid)?;
    roundtrip(&world, "b.example")?;
    Ok(())
}

/// A cgroup of the v1 `pids` hierarchy, removed when dropped (once empty).
struct Cgroup(PathBuf);

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Under systemd, `spliced run --upgrade-from` started from a shell, outside the service's
/// cgroup, is refused: once the old process exited it would serve unsupervised while systemd
/// counts the service as stopped. The new process exits 1 saying so; the old one serves on,
/// and systemd hears nothing new.
#[test]
fn under_systemd_a_takeover_from_outside_the_service_is_refused() -> Result<()> {
    let world = World::new()?;
    let _echo = TestBackend::start(&world, ECHO_PORT, Behavior::Echo)?;
    let mut notify = Notify::bind(&world)?;
    let old = under_systemd(&notify, config(None)).start(&world, &[443])?;
    let old_pid = old.pid().context("no PID")?;
    notify
        .wait("READY=1", IO, |_, m| has(m, "READY=1"))
        .with_context(|| old.stderr_text())?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos();
    let cgroup = Cgroup(PathBuf::from(format!(
        "/sys/fs/cgroup/pids/spliced-test-{}-{stamp}",
        std::process::id()
    )));
    std::fs::create_dir(&cgroup.0)
        .with_context(|| format!("making the cgroup {}", cgroup.0.display()))?;
    // Entered before `ip netns exec`, which mounts a /sys without cgroups.
    let enter = format!(
        "echo $$ > {}/cgroup.procs && exec \"$@\"",
        cgroup.0.display()
    );
    let control = old.control_socket().context("no control socket")?;
    let file = world.dir().join("outsider.toml");
    std::fs::write(&file, config(None))?;
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        &enter,
        "sh",
        "ip",
        "netns",
        "exec",
        world.name(Ns::Proxy),
    ])
    .arg(spliced_bin()?)
    .args(["run", "--config"])
    .arg(&file)
    .arg("--upgrade-from")
    .arg(control)
    .arg("--control-socket")
    .arg(control);
    let mut outsider = Service::start("outsider", cmd, world.dir())?;
    let how = exited(&mut outsider, IO)?;
    ensure!(how.contains("exit status: 1"), "{how}");
    ensure!(
        outsider
            .stderr_text()
            .contains("outside this service's cgroup"),
        "the refusal should say why: {}",
        outsider.stderr_text()
    );
    for _ in 0..5 {
        roundtrip(&world, "a.example")?;
    }
    notify.drain()?;
    let changed: Vec<_> = notify
        .messages
        .iter()
        .filter(|(p, m)| *p != old_pid || value(m, "MAINPID").is_some() || has(m, "STOPPING=1"))
        .collect();
    ensure!(
        changed.is_empty(),
        "a refused takeover told systemd something: {changed:#?}"
    );
    ensure!(
        !old.stderr_text().contains("the new process is ready"),
        "the old process stopped accepting: {}",
        old.stderr_text()
    );
    Ok(())
}
