//! At the descriptor limit spliced stays usable: the metrics endpoint and the listeners back
//! off instead of spinning when they cannot accept, the metrics endpoint serves a bounded
//! number of scrapes at once, and connections that never finish their hello are shed, oldest
//! first, so normal clients are still served promptly. Over `max_connections` or
//! `max_connections_per_source`, a connection is closed at once and counted, and the others are
//! served; the descriptor limit is raised for `max_connections` and the result logged.
//!
//! Run as root (network namespaces) with a release build of the proxy:
//! `cargo build --release -p proxy-userspace && cargo test --release -p spliced-tests --test limits`.
use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use spliced_tests::{
    BACKEND_V6, CLIENT_V4, CLIENT_V4_B, Ns, PROXY_V4, World, open_files,
    raw::{self, Behavior, End, TestBackend, expect_hello, simple_hello},
    spliced::{Launch, Spliced, field},
    wait_for,
};

const ECHO_PORT: u16 = 9330;
const IO: Duration = Duration::from_secs(10);
/// How many scrapes spliced serves at once (`MAX_CONNECTIONS` in `metrics.rs`).
const METRICS_MAX: usize = 16;

/// spliced limited to `nofile` descriptors, with its metrics endpoint, the copy engine (no
/// pipes, so each forwarding connection holds exactly two descriptors) and a hello timeout
/// long enough that it never frees anything during a test.
fn start(world: &World, nofile: u64) -> Result<Spliced> {
    launch("")
        .wrapped(&["prlimit".to_owned(), format!("--nofile={nofile}")])
        .metrics()
        .start(world, &[443])
}

/// The configuration of [`start`], with `extra` lines in `[defaults]`.
fn launch(extra: &str) -> Launch {
    let config = format!(
        r#"[defaults]
forwarding = "copy"
client_hello_timeout = "60s"
{extra}

[[listen]]
address = "0.0.0.0:443"
protocol = "tls"

[[site]]
hostnames = ["echo.example"]
backend = "[{BACKEND_V6}]:{ECHO_PORT}"
"#
    );
    Launch::new(config)
}

/// A client whose hello was echoed: forwarding, idle.
fn forwarding(world: &World, timeout: Duration) -> Result<TcpStream> {
    let mut client = raw::connect(world, 443, timeout)?;
    let hello = simple_hello("echo.example");
    client.write_all(&hello)?;
    expect_hello(&mut client, &hello)?;
    Ok(client)
}

/// Hello, echo, half-close, end: a normal client served start to finish.
fn served(world: &World) -> Result<()> {
    let mut client = forwarding(world, IO)?;
    client.shutdown(std::net::Shutdown::Write)?;
    let (rest, end) = raw::read_to_end(&mut client, 1 << 16);
    ensure!(end == End::Eof && rest.is_empty(), "{end:?}");
    Ok(())
}

/// User plus system CPU time of `pid` in clock ticks (`/proc/PID/stat` fields 14 and 15).
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces; the fields after it never do.
    let rest = stat.rsplit_once(')').context("no ) in stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): fields 14 and 15 are at 11 and 12.
    let utime: u64 = fields.get(11).context("no utime")?.parse()?;
    let stime: u64 = fields.get(12).context("no stime")?.parse()?;
    Ok(utime + stime)
}

/// Connects to spliced's metrics port from its namespace (without sending anything).
fn metrics_connection(world: &World, port: u16) -> Result<TcpStream> {
    let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
    let stream = world.within(Ns::Proxy, || TcpStream::connect_timeout(&addr, IO))??;
    stream.set_read_timeout(Some(IO))?;
    Ok(stream)
}

/// The metrics port spliced was started with (from its command line in `/proc`).
fn metrics_port(pid: u32) -> Result<u16> {
    let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline"))?;
    let args: Vec<&str> = cmdline.split('\0').collect();
    let at = args
        .iter()
        .position(|a| *a == "--metrics")
        .context("no --metrics")?;
    let addr: SocketAddr = args.get(at + 1).context("no address")?.parse()?;
    Ok(addr.port())
}

/// With every descriptor taken by forwarding connections and a scrape waiting to be accepted,
/// spliced uses almost no CPU; once connections close, scrapes work again. And no more than
/// [`METRICS_MAX`] scrapes are held open at once: one more is closed at once.
#[test]
fn out_of_descriptors_the_metrics_endpoint_backs_off_and_recovers() -> Result<()> {
    const NOFILE: u64 = 96;
    let world = World::new()?;
    let _echo = TestBackend::start(&world, ECHO_PORT, Behavior::Echo)?;
    let spliced = start(&world, NOFILE)?;
    let pid = spliced.pid().context("no PID")?;
    let port = metrics_port(pid)?;
    let open = || -> Result<u64> {
        let files = open_files(pid)?;
        Ok((files.other + files.pipe_ends) as u64)
    };
    // Forwarding connections cannot be shed; a last silent one takes an odd descriptor left.
    let mut clients = Vec::new();
    while open()? + 1 < NOFILE {
        ensure!(
            clients.len() < NOFILE as usize,
            "{} descriptors open",
            open()?
        );
        clients.push(forwarding(&world, IO)?);
    }
    if open()? < NOFILE {
        clients.push(raw::connect(&world, 443, IO)?);
        wait_for("the last descriptor to be taken", IO, || {
            Ok(open()? >= NOFILE)
        })?;
    }
    let waiting = metrics_connection(&world, port)?;
    std::thread::sleep(Duration::from_millis(300));
    let before = cpu_ticks(pid)?;
    let period = Duration::from_secs(2);
    std::thread::sleep(period);
    let used = cpu_ticks(pid)? - before;
    // 100 ticks a second: spinning on accept would use about 200.
    eprintln!("out of descriptors with a scrape waiting: {used} ticks of CPU in {period:?}");
    ensure!(
        used < 40,
        "spliced used {used} ticks of CPU in {period:?} while out of descriptors"
    );
    drop(waiting);
    clients.clear();
    let m = spliced.wait_metrics("a scrape after connections closed", IO, |_| Ok(true))?;
    ensure!(
        m.count("spliced_open_connections", &[])? <= 1,
        "connections still open:\n{m}"
    );
    served(&world)?;

    // Bounded scrapes: the ones beyond the limit are closed at once.
    let held: Vec<TcpStream> = (0..METRICS_MAX)
        .map(|_| metrics_connection(&world, port))
        .collect::<Result<_>>()?;
    std::thread::sleep(Duration::from_millis(200));
    let mut extra = metrics_connection(&world, port)?;
    let started = Instant::now();
    let mut buf = [0u8; 64];
    match extra.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => bail!("a scrape beyond {METRICS_MAX} open ones was not closed: {other:?}"),
    }
    ensure!(
        started.elapsed() < Duration::from_secs(2),
        "closing the scrape beyond the limit took {:?}",
        started.elapsed()
    );
    drop(held);
    spliced.wait_metrics("a scrape after the held ones closed", IO, |_| Ok(true))?;
    Ok(())
}

/// Hundreds of connections that never send a hello, more than the descriptor limit allows:
/// the oldest are shed (and counted), the newest stay, and normal clients are served
/// promptly all along.
#[test]
fn at_the_descriptor_limit_silent_connections_are_shed_oldest_first() -> Result<()> {
    const NOFILE: u64 = 256;
    const SILENT: usize = 400;
    let world = World::new()?;
    let _echo = TestBackend::start(&world, ECHO_PORT, Behavior::Echo)?;
    let spliced = start(&world, NOFILE)?;
    let addr = SocketAddr::new(PROXY_V4, 443);
    let silent: Vec<TcpStream> = world.within(Ns::Client, || {
        (0..SILENT)
            .map(|_| {
                let s = TcpStream::connect_timeout(&addr, IO)?;
                s.set_read_timeout(Some(Duration::from_millis(500)))?;
                Ok(s)
            })
            .collect::<Result<_>>()
    })??;
    let mut shed = 0;
    spliced.wait_metrics("every silent connection accepted", IO, |m| {
        shed = m.count(
            "spliced_connections_total",
            &[("outcome", "shed_before_hello")],
        )?;
        Ok(shed + m.count("spliced_open_connections", &[])? >= SILENT as u64)
    })?;
    eprintln!("{shed} of {SILENT} silent connections shed with {NOFILE} descriptors");
    ensure!(
        shed >= (SILENT as u64).saturating_sub(NOFILE),
        "only {shed} of {SILENT} silent connections were shed"
    );
    for i in 0..10 {
        let started = Instant::now();
        served(&world).with_context(|| format!("normal client {i}"))?;
        ensure!(
            started.elapsed() < Duration::from_secs(2),
            "normal client {i} took {:?}",
            started.elapsed()
        );
    }
    let ended = |mut s: &TcpStream| {
        let mut buf = [0u8; 16];
        match s.read(&mut buf) {
            Ok(0) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
            Ok(_) => false,
        }
    };
    ensure!(
        ended(&silent[0]),
        "the oldest silent connection is still open"
    );
    ensure!(
        !ended(&silent[SILENT - 1]),
        "the newest silent connection was closed"
    );
    Ok(())
}

/// Expects `client` (which sent nothing) to be closed by spliced at once with a clean end of
/// stream and no byte, and returns its access-log line.
fn closed_at_once(spliced: &Spliced, mut client: TcpStream) -> Result<String> {
    let me = client.local_addr()?;
    let started = Instant::now();
    let (got, end) = raw::read_to_end(&mut client, 1 << 16);
    ensure!(
        got.is_empty() && end == End::Eof,
        "expected a clean close and no byte: {} bytes, {end:?}",
        got.len()
    );
    ensure!(
        started.elapsed() < Duration::from_secs(2),
        "closing took {:?}",
        started.elapsed()
    );
    spliced.log_line_for(me, IO)
}

/// Like [`served`], from `source`.
fn served_from(world: &World, source: IpAddr) -> Result<()> {
    let mut client = raw::connect_from(
        world,
        Ns::Client,
        source,
        SocketAddr::new(PROXY_V4, 443),
        IO,
    )?;
    let hello = simple_hello("echo.example");
    client.write_all(&hello)?;
    expect_hello(&mut client, &hello)?;
    raw::shut_and_expect_eof(&mut client, "a served client")
}

/// Three connections from one source are served; its fourth is closed at once (a FIN, not a
/// reset), logged and counted as `over_max_connections_per_source`; another source is still
/// served meanwhile, and the first source again once one of its connections ended.
#[test]
fn over_the_per_source_limit_a_connection_is_closed_at_once_and_counted() -> Result<()> {
    let world = World::new()?;
    let _echo = TestBackend::start(&world, ECHO_PORT, Behavior::Echo)?;
    let spliced = launch("max_connections_per_source = 3")
        .metrics()
        .start(&world, &[443])?;
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut client = raw::connect_from(
            &world,
            Ns::Client,
            CLIENT_V4,
            SocketAddr::new(PROXY_V4, 443),
            IO,
        )?;
        let hello = simple_hello("echo.example");
        client.write_all(&hello)?;
        expect_hello(&mut client, &hello)?;
        open.push(client);
    }
    let fourth = raw::connect_from(
        &world,
        Ns::Client,
        CLIENT_V4,
        SocketAddr::new(PROXY_V4, 443),
        IO,
    )?;
    let line = closed_at_once(&spliced, fourth).context("the fourth from 192.0.2.2")?;
    ensure!(
        field(&line, "outcome") == Some("over_max_connections_per_source"),
        "{line}"
    );
    served_from(&world, CLIENT_V4_B).context("another source while the first is full")?;
    spliced.wait_metrics("the refusal counted", IO, |m| {
        Ok(m.count(
            "spliced_connections_total",
            &[("outcome", "over_max_connections_per_source")],
        )? == 1
            && m.count("spliced_connections_total", &[("outcome", "ok")])? == 1)
    })?;
    // One of the three ends: the source has room again.
    raw::shut_and_expect_eof(&mut open[0], "the first connection")?;
    wait_for("room for 192.0.2.2 again", IO, || {
        Ok(served_from(&world, CLIENT_V4).is_ok())
    })?;
    Ok(())
}

/// With `max_connections = 3`, a fourth connection from any source is closed at once, logged
/// and counted as `over_max_connections`; once one of the three ends, new ones are served.
#[test]
fn over_max_connections_a_connection_is_closed_at_once_and_counted() -> Result<()> {
    let world = World::new()?;
    let _echo = TestBackend::start(&world, ECHO_PORT, Behavior::Echo)?;
    let spliced = launch("max_connections = 3")
        .metrics()
        .start(&world, &[443])?;
    let mut open = Vec::new();
    for source in [CLIENT_V4, CLIENT_V4_B, CLIENT_V4] {
        let mut client = raw::connect_from(
            &world,
            Ns::Client,
            source,
            SocketAddr::new(PROXY_V4, 443),
            IO,
        )?;
        let hello = simple_hello("echo.example");
        client.write_all(&hello)?;
        expect_hello(&mut client, &hello)?;
        open.push(client);
    }
    for source in [CLIENT_V4_B, CLIENT_V4] {
        let client = raw::connect_from(
            &world,
            Ns::Client,
            source,
            SocketAddr::new(PROXY_V4, 443),
            IO,
        )?;
        let line = closed_at_once(&spliced, client).with_context(|| format!("from {source}"))?;
        ensure!(
            field(&line, "outcome") == Some("over_max_connections"),
            "{line}"
        );
    }
    spliced.wait_metrics("the refusals counted", IO, |m| {
        Ok(m.count(
            "spliced_connections_total",
            &[("outcome", "over_max_connections")],
        )? == 2)
    })?;
    // The three still forward.
    for client in &mut open {
        client.write_all(b"still here")?;
        ensure!(raw::read_exactly(client, 10)? == b"still here");
    }
    raw::shut_and_expect_eof(&mut open[0], "the first connection")?;
    wait_for("room again", IO, || {
        Ok(served_from(&world, CLIENT_V4_B).is_ok())
    })?;
    Ok(())
}

/// spliced raises its soft descriptor limit to what `max_connections` needs (100 connections:
/// 963 descriptors), up to the hard limit, and says in its log what it asked and obtained.
#[test]
fn the_descriptor_limit_is_raised_for_max_connections_and_logged() -> Result<()> {
    let world = World::new()?;
    let _echo = TestBackend::start(&world, ECHO_PORT, Behavior::Echo)?;
    for (hard, obtained, level) in [(4096, 963, "INFO"), (500, 500, "WARN")] {
        let spliced = launch("max_connections = 100")
            .named(&format!("spliced-{hard}"))
            .wrapped(&["prlimit".to_owned(), format!("--nofile=256:{hard}")])
            .start(&world, &[443])?;
        let pid = spliced.pid().context("no PID")?;
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits"))?;
        let files = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .context("no Max open files in /proc/PID/limits")?;
        let soft: Vec<&str> = files.split_whitespace().skip(3).take(2).collect();
        ensure!(
            soft == [obtained.to_string(), hard.to_string()],
            "under a hard limit of {hard}: {files}"
        );
        let log = spliced.stderr_text();
        let line = log
            .lines()
            .find(|l| l.contains("descriptor limit (RLIMIT_NOFILE)"))
            .with_context(|| format!("no descriptor limit line in:\n{log}"))?;
        for part in [
            level.to_owned(),
            "asked=963".to_owned(),
            format!("obtained={obtained}"),
            "before=256".to_owned(),
            format!("hard={hard}"),
        ] {
            ensure!(line.contains(&part), "{part} not in {line:?}");
        }
        served(&world)?;
    }
    Ok(())
}

/// Every descriptor is taken by forwarding connections (none can be shed) and a client waits
/// in the accept queue: spliced backs off accepting instead of spinning, warns about it about
/// once a second rather than at every retry, and serves the waiting client as soon as
/// connections close.
#[test]
fn out_of_descriptors_the_listeners_back_off_and_recover() -> Result<()> {
    let world = World::new()?;
    let _echo = TestBackend::start(&world, ECHO_PORT, Behavior::Echo)?;
    // Forwarding connections hold two descriptors each: of two limits of opposite parity,
    // one leaves none free.
    let mut full = None;
    for nofile in [64u64, 65] {
        let spliced = launch("")
            .named(&format!("spliced-{nofile}"))
            .wrapped(&["prlimit".to_owned(), format!("--nofile={nofile}")])
            .start(&world, &[443])?;
        let pid = spliced.pid().context("no PID")?;
        // Descriptor numbers below the limit in use: the limit is on numbers, and one
        // inherited from the test harness may sit above it.
        let open = || -> Result<u64> {
            let mut n = 0;
            for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
                let name = entry?.file_name();
                if name.to_str().and_then(|n| n.parse::<u64>().ok()) < Some(nofile) {
                    n += 1;
                }
            }
            Ok(n)
        };
        let mut clients = Vec::new();
        while open()? + 2 <= nofile {
            ensure!(clients.len() < nofile as usize, "{} open", open()?);
            clients.push(forwarding(&world, IO)?);
        }
        if open()? == nofile {
            full = Some((spliced, clients, pid));
            break;
        }
    }
    let (spliced, clients, pid) = full.context("neither limit was filled exactly")?;
    let hello = simple_hello("echo.example");
    let mut waiting = raw::connect(&world, 443, IO)?;
    waiting.write_all(&hello)?;
    std::thread::sleep(Duration::from_millis(300));
    let warnings = |text: &str| text.matches("accept failed").count();
    let warned_before = warnings(&spliced.stderr_text());
    let before = cpu_ticks(pid)?;
    let period = Duration::from_secs(2);
    std::thread::sleep(period);
    let used = cpu_ticks(pid)? - before;
    let warned = warnings(&spliced.stderr_text()) - warned_before;
    eprintln!("out of descriptors with a client waiting: {used} ticks, {warned} warnings");
    ensure!(
        used < 40,
        "spliced used {used} ticks of CPU in {period:?} while out of descriptors"
    );
    ensure!(
        warned > 0,
        "no accept failure logged:\n{}",
        spliced.stderr_text()
    );
    // About one a second for each of the two workers.
    ensure!(
        warned <= 8,
        "{warned} accept warnings in {period:?}:\n{}",
        spliced.stderr_text()
    );
    let released = Instant::now();
    drop(clients);
    expect_hello(&mut waiting, &hello).context("the waiting client, once descriptors freed")?;
    ensure!(
        released.elapsed() < Duration::from_secs(2),
        "the waiting client was served {:?} after connections closed",
        released.elapsed()
    );
    raw::shut_and_expect_eof(&mut waiting, "the waiting client")?;
    served(&world)
}

/// Behind a balancer in `accept_proxy`, the per-source limit counts each client its PROXY
/// header announces, not the balancer: with a limit of one, a second connection for the same
/// announced client is closed at once and logged under that client, while another client
/// through the same balancer is served.
#[test]
fn behind_a_balancer_the_per_source_limit_counts_the_announced_clients() -> Result<()> {
    let world = World::new()?;
    let _echo = TestBackend::start(&world, ECHO_PORT, Behavior::Echo)?;
    let config = format!(
        "[defaults]\nforwarding = \"copy\"\nmax_connections_per_source = 1\n\n\
         [[listen]]\naddress = \"0.0.0.0:443\"\nprotocol = \"tls\"\n\
         accept_proxy = [\"{CLIENT_V4_B}/32\"]\n\n\
         [[site]]\nhostnames = [\"echo.example\"]\nbackend = \"[{BACKEND_V6}]:{ECHO_PORT}\"\n"
    );
    let spliced = Launch::new(config).metrics().start(&world, &[443])?;
    let hello = simple_hello("echo.example");
    let via_balancer = |client: &str| -> Result<TcpStream> {
        let mut stream = raw::connect_from(
            &world,
            Ns::Client,
            CLIENT_V4_B,
            SocketAddr::new(PROXY_V4, 443),
            IO,
        )?;
        let header = format!("PROXY TCP4 {client} {PROXY_V4} 40000 443\r\n");
        stream.write_all(&[header.as_bytes(), &hello].concat())?;
        Ok(stream)
    };
    let mut first = via_balancer("198.51.100.7")?;
    expect_hello(&mut first, &hello)?;
    // The same announced client again: over its limit of one.
    let mut second = via_balancer("198.51.100.7")?;
    let me = second.local_addr()?;
    let (got, end) = raw::read_to_end(&mut second, 1 << 16);
    ensure!(
        got.is_empty() && end == End::Eof,
        "the second connection for one client: {} bytes, {end:?}",
        got.len()
    );
    // Logged under the announced client and the balancer it came through.
    let logged = |l: &str| {
        field(l, "outcome") == Some("over_max_connections_per_source")
            && field(l, "client") == Some("198.51.100.7:40000")
            && field(l, "via") == Some(me.to_string().as_str())
    };
    let deadline = Instant::now() + IO;
    while !spliced.stdout_text().lines().any(logged) {
        ensure!(
            Instant::now() < deadline,
            "no over_max_connections_per_source line for 198.51.100.7 via {me}:\n{}",
            spliced.stdout_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Another client through the same balancer, while the first is still open: served.
    let mut other = via_balancer("198.51.100.8")?;
    expect_hello(&mut other, &hello)?;
    raw::shut_and_expect_eof(&mut other, "another client via the balancer")?;
    raw::shut_and_expect_eof(&mut first, "the first client via the balancer")?;
    Ok(())
}
