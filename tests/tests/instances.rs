//! One spliced per network namespace and per pin directory: a second instance refuses to
//! start, saying which process is in the way, while the first one keeps serving and keeps its
//! pins. Instances in other network namespaces start as usual.
//!
//! Run as root (network namespaces, eBPF) with a release build of the proxy:
//! `cargo build --release -p proxy-userspace && cargo test --release -p spliced-tests --test instances`.
use std::{
    io::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use spliced_tests::{
    BACKEND_V6, World,
    raw::{self, Behavior, End, TestBackend, expect_hello, result, simple_hello, spawn},
    spliced::{Launch, Spliced},
    wait_for,
};

const ECHO_PORT: u16 = 9320;
const IO: Duration = Duration::from_secs(10);

fn config(listen: &str, backend: SocketAddr, forwarding: &str) -> String {
    format!(
        r#"[defaults]
forwarding = "{forwarding}"

[[listen]]
address = "{listen}"
protocol = "tls"

[[site]]
hostnames = ["echo.example"]
backend = "{backend}"
"#
    )
}

/// Waits for a spliced that should refuse to start to exit, and returns what it printed.
fn refused(mut second: Spliced) -> Result<String> {
    let mut exit = String::new();
    wait_for("the second instance to exit", IO, || {
        match second.check_running() {
            Ok(()) => Ok(false),
            Err(e) => {
                exit = format!("{e:#}");
                Ok(true)
            }
        }
    })
    .with_context(|| format!("it kept running: {}", second.stderr_text()))?;
    ensure!(
        exit.contains("exit status: 1"),
        "expected exit status 1: {exit}"
    );
    Ok(second.stderr_text())
}

/// Hello, its echo, a half-close and the end, through `stream`.
fn roundtrip(mut stream: TcpStream) -> Result<()> {
    let hello = simple_hello("echo.example");
    stream.write_all(&hello)?;
    expect_hello(&mut stream, &hello)?;
    stream.shutdown(Shutdown::Write)?;
    let (rest, end) = raw::read_to_end(&mut stream, 1 << 16);
    ensure!(end == End::Eof && rest.is_empty(), "{end:?}");
    Ok(())
}

/// A second spliced with the same listener in the same network namespace (and no pins at all)
/// exits with a message naming the first; the first goes on serving; one in another network
/// namespace starts.
#[test]
fn a_second_instance_on_the_same_address_refuses_to_start() -> Result<()> {
    let world = World::new()?;
    let _echo = TestBackend::start(&world, ECHO_PORT, Behavior::Echo)?;
    let cfg = config(
        "0.0.0.0:443",
        SocketAddr::new(BACKEND_V6, ECHO_PORT),
        "splice",
    );
    let first = Launch::new(cfg.as_str())
        .named("first")
        .start(&world, &[443])?;
    let pid = first.pid().context("no PID")?;
    let second = Launch::new(cfg.as_str())
        .named("second")
        .arg("--pin-dir")
        .arg("none")
        .start(&world, &[])?;
    let said = refused(second)?;
    ensure!(
        said.contains("0.0.0.0:443") && said.contains(&format!("process {pid} (spliced)")),
        "the message should name the address and the first instance (PID {pid}): {said}"
    );
    roundtrip(raw::connect(&world, 443, IO)?)?;

    let elsewhere = World::new()?;
    let _other = Launch::new(cfg.as_str()).start(&elsewhere, &[443])?;
    roundtrip(raw::connect(&world, 443, IO)?)?;
    Ok(())
}

/// Removes the test's pin directory, whatever is left in it.
struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        for pin in entries(&self.0) {
            let _ = std::fs::remove_file(self.0.join(pin));
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// The sorted names in `dir`.
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

/// A second spliced on other ports but with the same pin directory exits with a message
/// naming the first, and leaves the first one's pins alone. Run in this mount namespace, whose
/// bpffs both see (under `ip netns exec` each would get its own).
#[test]
fn a_second_instance_on_the_same_pin_directory_refuses_to_start() -> Result<()> {
    let world = World::new()?; // for its scratch directory
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos();
    let dir = PinDir(PathBuf::from(format!(
        "/sys/fs/bpf/spliced-instances-{}-{stamp}",
        std::process::id()
    )));
    let echo = TcpListener::bind(SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 0))?;
    let backend = echo.local_addr()?;
    let echoed = spawn(move || raw::echo(raw::accept_within(&echo, IO + IO, IO)?));
    let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let launch = |name: &str, port: u16| {
        Launch::new(config(&format!("127.0.0.1:{port}"), backend, "sockmap"))
            .named(name)
            .arg("--pin-dir")
            .arg(&dir.0)
    };
    let port = raw::free_port(loopback)?;
    let first = launch("first", port).start_here(world.dir(), &[port])?;
    let pid = first.pid().context("no PID")?;
    let pins = entries(&dir.0);
    ensure!(
        pins.iter().any(|p| p == "SPLICED_PEERS"),
        "the first instance pinned {pins:?}"
    );
    let second = launch("second", raw::free_port(loopback)?).start_here(world.dir(), &[])?;
    let said = refused(second)?;
    ensure!(
        said.contains(&dir.0.display().to_string()) && said.contains(&format!("process {pid}")),
        "the message should name the pin directory and the first instance (PID {pid}): {said}"
    );
    ensure!(
        entries(&dir.0) == pins,
        "the pins changed from {pins:?} to {:?}",
        entries(&dir.0)
    );
    let client = TcpStream::connect_timeout(&SocketAddr::new(loopback, port), IO)?;
    client.set_read_timeout(Some(IO))?;
    roundtrip(client)?;
    result(&echoed, IO, "the loopback echo server")?;
    drop(first);
    Ok(())
}
