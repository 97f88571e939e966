//! Scale out with BGP and ECMP (docs/scale-out.md): two spliced hosts announce the shared
//! IPv4 address 192.0.2.1 over BGP to a router that spreads connections over both by ECMP
//! with L4 hashing; each host announces only while spliced is healthy, as the shipped
//! checker `contrib/bird/spliced-announce` sees it.
//!
//! One test walks the whole story, in a [`World::scale_out`]:
//! - both hosts serve (the access logs of both show connections, each where the router's
//!   hash said);
//! - spliced on host A is killed (SIGKILL): its route leaves the router within
//!   [`FAILOVER_BOUND`] (measured and printed), A's own transfer ends at once rather than
//!   hanging, new connections succeed on B, and a long transfer through B (kernel-spliced
//!   by `auto`) goes on with every byte checked;
//! - spliced on A comes back: its route returns and A serves again;
//! - host A goes silent as a whole (its processes frozen): the router's BGP hold timer drops
//!   it within [`HOLD_BOUND`], and it is used again once it resumes;
//! - BIRD on A restarts (with the service protocol disabled, as configured): the checker
//!   announces A again without help;
//! - what ECMP does to B's connections when A's next hop comes back: Linux hashes
//!   multipath routes by hash-threshold, not resiliently, so the connections opened on B
//!   while A was away whose hash now falls in A's share are sent to A and reset; the others,
//!   and every connection from before A's failure, carry on. Which ones break is predicted
//!   with `ip route get` and checked.
//!
//! A second test asks the router's kernel what a next hop leaving or returning does with three
//! hosts, for a multipath route (what BIRD installs) and for a resilient nexthop group.
//!
//! Run as root with a release build of the proxy:
//! `cargo build --release -p proxy-userspace && cargo test --release -p spliced-tests --test scale_out`.
use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Shutdown, SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use nix::sys::signal::Signal;
use spliced_tests::{
    BACKEND_V6, Ns, PROXY_B_V6, PROXY_V4, PROXY_V6, Service, Uplink, World,
    bird::{self, Bird, HOST_AS, SERVICE_PROTOCOL, UPLINK_PROTOCOL},
    raw::{self, BLOCK, Behavior, End, SEED_DOWN, SEED_UP, TestBackend, Verifier, simple_hello},
    spliced::{Launch, Spliced, field},
    wait_for,
};

/// The backend port of the echo site.
const ECHO_PORT: u16 = 9201;
/// The backend port of the bulk site.
const BULK_PORT: u16 = 9202;
/// Where each host's spliced serves `/metrics` (each namespace has its own loopback).
const METRICS_PORT: u16 = 9464;
/// How often the checker looks at spliced (the script's default).
const CHECK_INTERVAL: Duration = Duration::from_millis(500);
/// The longest accepted time from killing spliced to its route leaving the router's kernel:
/// two failed checks (up to two intervals), birdc, one BGP UPDATE, the router's BIRD and
/// kernel, with room for a loaded 2-core machine. Measured figures are printed.
const FAILOVER_BOUND: Duration = Duration::from_secs(5);
/// The longest accepted time for the router to drop a host that went silent: the BGP hold
/// time (3 s) with room for a loaded machine.
const HOLD_BOUND: Duration = Duration::from_secs(6);
/// Bytes each way of the long transfers.
const TRANSFER: u64 = 32 << 20;
/// While paced, a transfer moves this much every [`PACE`] each way (about 1.6 MB/s).
const PACE_CHUNK: usize = 16 * 1024;
const PACE: Duration = Duration::from_millis(10);
/// Read and write timeout of every client socket.
const IO: Duration = Duration::from_secs(30);
/// Short connections per round for "both hosts serve".
const SHORT: usize = 24;
/// Connections opened on B while A is away, for the rehash check.
const WHILE_AWAY: usize = 16;

fn config() -> String {
    format!(
        r#"[defaults]
client_hello_timeout = "2s"
connect_timeout = "2s"

[[listen]]
address = "0.0.0.0:443"
protocol = "tls"

[[site]]
hostnames = ["echo.example"]
backend = "[{BACKEND_V6}]:{ECHO_PORT}"

[[site]]
hostnames = ["bulk.example"]
backend = "[{BACKEND_V6}]:{BULK_PORT}"
"#
    )
}

/// One proxy host: its namespace, uplink, spliced, BIRD and checker.
struct Host {
    label: &'static str,
    ns: Ns,
    up: Uplink,
    /// The address the backend sees it from.
    v6: IpAddr,
    // Dropped in this order: the checker first (it withdraws on SIGTERM), then spliced, then
    // BIRD.
    announcer: Service,
    spliced: Option<Spliced>,
    /// How many times spliced was started (names its files).
    runs: u32,
    bird: Bird,
}

impl Host {
    fn start(world: &World, label: &'static str, ns: Ns, v6: IpAddr) -> Result<Host> {
        let up = Uplink::of(ns).context("a proxy host")?;
        let mut bird = Bird::start(world, ns, &format!("bird-{label}"), &bird::host_config(up))?;
        bird.wait_established(UPLINK_PROTOCOL, Duration::from_secs(15))?;
        let announcer = bird::announce(
            world,
            ns,
            &format!("announce-{label}"),
            METRICS_PORT,
            &bird,
            CHECK_INTERVAL,
        )?;
        let mut host = Host {
            label,
            ns,
            up,
            v6,
            spliced: None,
            runs: 0,
            announcer,
            bird,
        };
        host.start_spliced(world)?;
        Ok(host)
    }

    fn start_spliced(&mut self, world: &World) -> Result<()> {
        self.runs += 1;
        self.spliced = Some(
            Launch::new(config())
                .named(&format!("spliced-{}{}", self.label, self.runs))
                .metrics_at(METRICS_PORT)
                // Connections that ECMP moved away are orphans here (nothing tells this host
                // they are gone): do not wait long for them when the test ends.
                .arg("--grace")
                .arg("1")
                .start_in(world, self.ns, &[443])?,
        );
        Ok(())
    }

    fn spliced(&self) -> Result<&Spliced> {
        self.spliced.as_ref().context("spliced is not running")
    }

    /// Whether this host's spliced logged a connection from `client`.
    fn logged(&self, client: SocketAddr) -> bool {
        let want = client.to_string();
        self.spliced.as_ref().is_some_and(|s| {
            s.stdout_text()
                .lines()
                .any(|l| field(l, "client") == Some(want.as_str()))
        })
    }

    /// What the checker and BIRD said, for failure messages.
    fn diagnostics(&self) -> String {
        format!(
            "--- host {} checker:\n{}--- BIRD:\n{}",
            self.label,
            self.announcer.stderr_text(),
            self.bird.birdc(&["show", "protocols"]).unwrap_or_default()
        )
    }
}

/// Waits until the router's route to the service address has exactly the next hops `want`
/// (polled every 20 ms or so, which is how precise the measured times are).
fn wait_next_hops(world: &World, want: &[&Host], timeout: Duration) -> Result<()> {
    let mut want: Vec<_> = want.iter().map(|h| h.up.host).collect();
    want.sort();
    let mut last = Vec::new();
    wait_for("the router's next hops", timeout, || {
        last = bird::service_next_hops(world)?;
        Ok(last == want)
    })
    .with_context(|| format!("want next hops {want:?}, have {last:?}"))
}

/// One short connection through the echo site: connects, sends the hello, reads it back,
/// closes. Returns the client's address.
fn short_connection(world: &World) -> Result<SocketAddr> {
    let mut client = raw::connect(world, 443, IO)?;
    let me = client.local_addr()?;
    let hello = simple_hello("echo.example");
    client.write_all(&hello)?;
    let mut back = vec![0u8; hello.len()];
    client
        .read_exact(&mut back)
        .with_context(|| format!("{me}: reading the echo"))?;
    ensure!(back == hello, "{me}: the echo differs from the hello");
    client.shutdown(Shutdown::Write)?;
    let (rest, end) = raw::read_to_end(&mut client, 1024);
    ensure!(
        rest.is_empty() && end == End::Eof,
        "{me}: after the echo: {} bytes, {end:?}",
        rest.len()
    );
    Ok(me)
}

/// Runs `n` short connections and returns how many each host's access log shows; checks that
/// each is logged by exactly the host the router's hash sends it to.
fn spread(world: &World, hosts: &[&Host], n: usize) -> Result<Vec<usize>> {
    let mut counts = vec![0; hosts.len()];
    for _ in 0..n {
        let me = short_connection(world)?;
        let predicted = bird::next_hop_for(world, me, SocketAddr::new(PROXY_V4, 443))?;
        let mut found = None;
        wait_for(
            &format!("the access-log line of {me}"),
            Duration::from_secs(10),
            || {
                found = hosts.iter().position(|h| h.logged(me));
                Ok(found.is_some())
            },
        )?;
        let i = found.context("logged")?;
        ensure!(
            predicted == Some(IpAddr::V4(hosts[i].up.host)),
            "{me} was served by host {}, but the router's hash says {predicted:?}",
            hosts[i].label
        );
        ensure!(
            hosts.iter().filter(|h| h.logged(me)).count() == 1,
            "{me} is in more than one access log"
        );
        counts[i] += 1;
    }
    Ok(counts)
}

/// A long transfer through the bulk site, paced until `fast` is set.
struct Transfer {
    client: SocketAddr,
    /// The bytes the client verified downstream and how its read ended.
    down: mpsc::Receiver<Result<(u64, End)>>,
    /// The bytes the client sent upstream, or the write error.
    up: mpsc::Receiver<Result<u64>>,
}

/// Opens connections until one lands on `host` (by the router's hash; the others are closed
/// before their hello, so no backend sees them) and starts a paced [`TRANSFER`] on it.
fn transfer_on(world: &World, host: &Host, fast: &Arc<AtomicBool>) -> Result<Transfer> {
    for _ in 0..64 {
        let client = raw::connect(world, 443, IO)?;
        let me = client.local_addr()?;
        if bird::next_hop_for(world, me, SocketAddr::new(PROXY_V4, 443))?
            != Some(IpAddr::V4(host.up.host))
        {
            continue;
        }
        let hello = simple_hello("bulk.example");
        let mut writer = client.try_clone()?;
        let mut reader = client;
        let fast_up = fast.clone();
        let up = raw::spawn(move || {
            writer.write_all(&hello)?;
            let mut stream = raw::Stream::new(SEED_UP);
            let mut sent = 0u64;
            while sent < TRANSFER {
                let paced = !fast_up.load(Ordering::Relaxed);
                let room = usize::try_from(TRANSFER - sent).unwrap_or(usize::MAX);
                let chunk = stream.at(sent);
                let n = chunk
                    .len()
                    .min(room)
                    .min(if paced { PACE_CHUNK } else { BLOCK });
                if let Err(e) = writer.write_all(&chunk[..n]) {
                    return Err(e).with_context(|| format!("writing after {sent} bytes"));
                }
                sent += n as u64;
                if paced {
                    std::thread::sleep(PACE);
                }
            }
            writer.shutdown(Shutdown::Write)?;
            Ok(sent)
        });
        let fast_down = fast.clone();
        let down = raw::spawn(move || {
            let mut verifier = Verifier::new(SEED_DOWN, TRANSFER);
            let mut buf = vec![0u8; BLOCK];
            loop {
                let paced = !fast_down.load(Ordering::Relaxed);
                let want = if paced { PACE_CHUNK } else { BLOCK };
                match reader.read(&mut buf[..want]) {
                    Ok(0) => return Ok((verifier.received(), End::Eof)),
                    Ok(n) => verifier.feed(&buf[..n])?,
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                        return Ok((verifier.received(), End::Reset));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        return Ok((verifier.received(), End::TimedOut));
                    }
                    Err(e) => return Ok((verifier.received(), End::Error(e.kind()))),
                }
                if paced {
                    std::thread::sleep(PACE);
                }
            }
        });
        return Ok(Transfer {
            client: me,
            down,
            up,
        });
    }
    bail!("64 connections and none hashed to host {}", host.label)
}

/// Sends `sig` to the process `pid` (one this test started).
fn signal(pid: u32, sig: Signal) -> Result<()> {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid)?);
    nix::sys::signal::kill(pid, sig).with_context(|| format!("{sig} to {pid}"))
}

/// An open echo connection: sends `probe` and reads it back.
fn echo_round(client: &mut TcpStream, probe: &[u8]) -> Result<()> {
    client.write_all(probe)?;
    let mut back = vec![0u8; probe.len()];
    client.read_exact(&mut back)?;
    ensure!(back == probe, "the echo differs");
    Ok(())
}

#[test]
fn bgp_ecmp_failover_and_return() -> Result<()> {
    let started = Instant::now();
    let world = World::scale_out()?;
    let hello = simple_hello("bulk.example");
    let _echo = TestBackend::start(&world, ECHO_PORT, Behavior::Echo)?;
    let bulk = TestBackend::start(
        &world,
        BULK_PORT,
        Behavior::Bulk {
            bytes_each_way: TRANSFER,
            hello_len: hello.len(),
        },
    )?;
    let a_up = Uplink::of(Ns::Proxy).context("host A's uplink")?;
    let b_up = Uplink::of(Ns::ProxyB).context("host B's uplink")?;
    let _router = Bird::start(
        &world,
        Ns::Router,
        "bird-router",
        &bird::router_config(&[("host_a", a_up), ("host_b", b_up)]),
    )?;
    let mut a = Host::start(&world, "a", Ns::Proxy, PROXY_V6)?;
    let b = Host::start(&world, "b", Ns::ProxyB, PROXY_B_V6)?;
    wait_next_hops(&world, &[&a, &b], Duration::from_secs(15))
        .with_context(|| format!("{}\n{}", a.diagnostics(), b.diagnostics()))?;
    eprintln!(
        "scale-out: both hosts announce {PROXY_V4}/32 (AS {HOST_AS}, protocol \
         {SERVICE_PROTOCOL}) {:.1?} into the test",
        started.elapsed()
    );

    // Both hosts serve, each the connections the router's hash gives it.
    let counts = spread(&world, &[&a, &b], SHORT)?;
    eprintln!(
        "scale-out: {SHORT} connections: {} on host A, {} on host B",
        counts[0], counts[1]
    );
    ensure!(
        counts.iter().all(|&c| c > 0),
        "both hosts must serve: {counts:?}"
    );

    // Long transfers, one through each host, paced so that they span what follows.
    let fast = Arc::new(AtomicBool::new(false));
    let on_a = transfer_on(&world, &a, &fast)?;
    let on_b = transfer_on(&world, &b, &fast)?;
    wait_for(
        "both transfers at their backend",
        Duration::from_secs(10),
        || Ok(bulk.connections().len() >= 2),
    )?;
    std::thread::sleep(Duration::from_millis(300));

    // Host A's spliced dies.
    let killed = Instant::now();
    a.spliced
        .as_mut()
        .context("A's spliced")?
        .stop(Signal::SIGKILL, Duration::from_secs(5))?;
    wait_next_hops(&world, &[&b], FAILOVER_BOUND + Duration::from_secs(10))
        .with_context(|| a.diagnostics())?;
    let failover = killed.elapsed();
    eprintln!(
        "scale-out: SIGKILL of host A's spliced -> its route left the router's kernel in \
         {failover:.2?} (check interval {CHECK_INTERVAL:?}, fall 2)"
    );
    ensure!(
        failover <= FAILOVER_BOUND,
        "failover took {failover:?}, over {FAILOVER_BOUND:?}\n{}",
        a.diagnostics()
    );
    // A's transfer ended with its host's spliced: its sockets were closed by A's kernel.
    let (got, end) = raw::result(&on_a.down, Duration::from_secs(10), "A's transfer")?;
    eprintln!(
        "scale-out: the transfer through A ended with {end:?} after {got} of {TRANSFER} bytes"
    );
    ensure!(
        end.closed() && got < TRANSFER,
        "A's transfer should end early: {got} bytes, {end:?}"
    );

    // New connections go to B, and succeed.
    let counts = spread(&world, &[&a, &b], SHORT / 2)?;
    ensure!(
        counts[0] == 0,
        "no connection may reach A while it is away: {counts:?}"
    );
    let mut away = Vec::new();
    for _ in 0..WHILE_AWAY {
        let mut client = raw::connect(&world, 443, IO)?;
        let hello = simple_hello("echo.example");
        echo_round(&mut client, &hello)?;
        away.push(client);
    }

    // A comes back.
    let restarted = Instant::now();
    a.start_spliced(&world)?;
    wait_next_hops(&world, &[&a, &b], Duration::from_secs(15)).with_context(|| a.diagnostics())?;
    eprintln!(
        "scale-out: host A's spliced restarted -> announced again {:.2?} after the restart \
         began (rise 2)",
        restarted.elapsed()
    );

    // The connections opened on B while A was away: those whose hash now falls in A's share
    // go to A, which resets them; the others stay on B.
    let mut moved = 0;
    for (i, client) in away.iter_mut().enumerate() {
        let me = client.local_addr()?;
        let to_a = bird::next_hop_for(&world, me, SocketAddr::new(PROXY_V4, 443))?
            == Some(IpAddr::V4(a.up.host));
        let round = echo_round(client, format!("after A came back {i}").as_bytes());
        if to_a {
            moved += 1;
            ensure!(
                round.is_err(),
                "{me} hashes to A now, yet its connection through B still works"
            );
        } else {
            round.with_context(|| format!("{me} still hashes to B, yet its connection broke"))?;
        }
    }
    eprintln!(
        "scale-out: of {WHILE_AWAY} connections opened through B while A was away, {moved} \
         hashed to A once it was back and were reset there; {} carry on (hash-threshold ECMP)",
        WHILE_AWAY - moved
    );
    drop(away);

    // A serves again.
    let counts = spread(&world, &[&a, &b], SHORT)?;
    eprintln!(
        "scale-out: after the return, {SHORT} connections: {} on host A, {} on host B",
        counts[0], counts[1]
    );
    ensure!(counts[0] > 0, "host A must be used again: {counts:?}");

    // Host A goes silent as a whole (frozen: checker, spliced and BIRD stopped with
    // SIGSTOP), as a host that loses power or its cable does for the router when a switch
    // sits between them: nothing withdraws; the router's BGP hold timer must notice.
    let frozen = [
        a.announcer.pid(),
        a.spliced()?.pid(),
        a.bird.service().pid(),
    ];
    for pid in frozen.iter().flatten() {
        signal(*pid, Signal::SIGSTOP)?;
    }
    let silent = Instant::now();
    let held = wait_next_hops(&world, &[&b], HOLD_BOUND + Duration::from_secs(10));
    let hold_failover = silent.elapsed();
    for pid in frozen.iter().rev().flatten() {
        signal(*pid, Signal::SIGCONT)?;
    }
    held.with_context(|| a.diagnostics())?;
    eprintln!(
        "scale-out: host A silent (SIGSTOP) -> its route left the router's kernel in \
         {hold_failover:.2?} (BGP hold time 3 s)"
    );
    ensure!(
        hold_failover <= HOLD_BOUND,
        "the router took {hold_failover:?} to drop a silent host, over {HOLD_BOUND:?}"
    );
    let counts = spread(&world, &[&a, &b], SHORT / 4)?;
    ensure!(
        counts[0] == 0,
        "no connection may reach A while it is silent: {counts:?}"
    );
    let resumed = Instant::now();
    wait_next_hops(&world, &[&a, &b], Duration::from_secs(20)).with_context(|| a.diagnostics())?;
    eprintln!(
        "scale-out: host A resumed (SIGCONT) -> BGP session re-established and announced again \
         in {:.2?}",
        resumed.elapsed()
    );

    // BIRD on A restarts (its configuration starts the service protocol disabled): the
    // checker, which sends the wanted state on every check, announces again by itself.
    a.bird.service().terminate(Duration::from_secs(5))?;
    wait_next_hops(&world, &[&b], Duration::from_secs(10)).with_context(|| a.diagnostics())?;
    let restarted = Instant::now();
    a.bird = Bird::start(&world, Ns::Proxy, "bird-a", &bird::host_config(a.up))?;
    wait_next_hops(&world, &[&a, &b], Duration::from_secs(20)).with_context(|| a.diagnostics())?;
    eprintln!(
        "scale-out: BIRD on host A restarted -> announced again by the checker {:.2?} after \
         it started",
        restarted.elapsed()
    );

    // B's transfer went on through A's failure, return, silence and BIRD restart; finish it at full speed.
    fast.store(true, Ordering::Relaxed);
    let sent = raw::result(&on_b.up, Duration::from_secs(60), "B's transfer, upstream")?;
    let (got, end) = raw::result(
        &on_b.down,
        Duration::from_secs(60),
        "B's transfer, downstream",
    )?;
    ensure!(
        sent == TRANSFER && got == TRANSFER && end == End::Eof,
        "B's transfer: sent {sent}, received {got} of {TRANSFER}, {end:?}"
    );
    // The backend may still be checking the last bytes the client wrote.
    let record = bulk
        .wait_finished(2, Duration::from_secs(30))?
        .into_iter()
        .find(|c| c.peer.map(|p| p.ip()) == Some(b.v6) && c.verified == TRANSFER)
        .with_context(|| format!("B's transfer at the backend: {:?}", bulk.connections()))?;
    ensure!(record.error.is_none(), "backend: {record:?}");
    let line = b
        .spliced()?
        .log_line_for(on_b.client, Duration::from_secs(10))?;
    eprintln!(
        "scale-out: the transfer through B: {TRANSFER} bytes each way verified across A's \
         failure, return, silence and BIRD restart ({line})"
    );
    eprintln!("scale-out: whole test {:.1?}", started.elapsed());
    Ok(())
}

/// The destination of the next-hop experiment (no traffic is sent to it).
const PROBE_DST: &str = "192.0.2.100";
/// The probe flows: source ports of TCP connections from the client to [`PROBE_DST`]:443.
const PROBE_PORTS: std::ops::Range<u16> = 20000..21000;

/// Runs `ip -n <router> <args>`.
fn router_ip(world: &World, args: &[&str]) -> Result<()> {
    let out = std::process::Command::new("ip")
        .args(["-n", world.name(Ns::Router)])
        .args(args)
        .output()?;
    ensure!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// The next hop the router's kernel picks for each probe flow (one `ip -batch` run).
fn probe_next_hops(world: &World) -> Result<Vec<String>> {
    let script: String = PROBE_PORTS
        .map(|port| {
            format!(
                "route get {PROBE_DST} from {} iif eth0 ipproto tcp sport {port} dport 443\n",
                spliced_tests::CLIENT_V4
            )
        })
        .collect();
    let path = world.dir().join("probe.batch");
    std::fs::write(&path, script)?;
    let out = std::process::Command::new("ip")
        .args(["-n", world.name(Ns::Router), "-batch"])
        .arg(&path)
        .output()?;
    ensure!(
        out.status.success(),
        "ip -batch: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let hops: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(" via ").nth(1))
        .filter_map(|rest| rest.split(' ').next())
        .map(str::to_owned)
        .collect();
    ensure!(
        hops.len() == PROBE_PORTS.len(),
        "{} answers to {} route lookups",
        hops.len(),
        PROBE_PORTS.len()
    );
    Ok(hops)
}

/// How many flows moved between `before` and `after` although both of their next hops exist
/// in both: flows of surviving hosts that a next-hop change sent to another surviving host.
fn moved_between_survivors(before: &[String], after: &[String], present: &[&str]) -> usize {
    before
        .iter()
        .zip(after)
        .filter(|(b, a)| b != a && present.contains(&b.as_str()) && present.contains(&a.as_str()))
        .count()
}

/// What a next hop leaving or coming back does to the flows of the others, with three next
/// hops, asked of the router's kernel with `ip route get` (the multipath hash of forwarding)
/// for 1,000 flows. A multipath route, as BIRD's kernel protocol installs it, is hashed by
/// hash-threshold: each next hop owns a slice of the hash range, and the slices shift when
/// one leaves or comes back, so flows of hosts that stayed move to other hosts that stayed
/// (and are reset there). A resilient nexthop group (`ip nexthop ... type resilient`, which
/// BIRD 2.0 does not install) moves only the flows of the next hop that left, and on a
/// return only flows to the returning one.
#[test]
fn ecmp_next_hop_changes_and_surviving_flows() -> Result<()> {
    let world = World::scale_out()?;
    let gateways = ["198.51.100.18", "198.51.100.22", "198.51.100.26"];
    for (i, gw) in gateways.iter().enumerate() {
        let dev = format!("hop{i}");
        let peer = format!("hop{i}p");
        router_ip(
            &world,
            &["link", "add", &dev, "type", "veth", "peer", "name", &peer],
        )?;
        router_ip(
            &world,
            &[
                "addr",
                "add",
                &format!("198.51.100.{}/30", 17 + 4 * i),
                "dev",
                &dev,
            ],
        )?;
        router_ip(&world, &["link", "set", &dev, "up"])?;
        router_ip(&world, &["link", "set", &peer, "up"])?;
        router_ip(
            &world,
            &[
                "nexthop",
                "add",
                "id",
                &(i + 1).to_string(),
                "via",
                gw,
                "dev",
                &dev,
            ],
        )?;
    }
    let route = format!("{PROBE_DST}/32");
    let multipath = |hops: &[&str]| -> Result<()> {
        let mut args = vec!["route", "replace", route.as_str()];
        for gw in hops {
            args.extend(["nexthop", "via", gw]);
        }
        router_ip(&world, &args)
    };
    let resilient = |group: &str| -> Result<()> {
        router_ip(
            &world,
            &[
                "nexthop",
                "replace",
                "id",
                "10",
                "group",
                group,
                "type",
                "resilient",
                "buckets",
                "128",
                "idle_timer",
                "0",
            ],
        )?;
        router_ip(&world, &["route", "replace", &route, "nhid", "10"])
    };
    let [_, g2, g3] = gateways;
    let survivors = [g2, g3];

    // Hash-threshold, as BIRD installs it: the first of three leaves, then comes back.
    multipath(&gateways)?;
    let three = probe_next_hops(&world)?;
    multipath(&survivors)?;
    let two = probe_next_hops(&world)?;
    let left = moved_between_survivors(&three, &two, &survivors);
    multipath(&gateways)?;
    let back = moved_between_survivors(&two, &probe_next_hops(&world)?, &survivors);
    eprintln!(
        "ecmp: multipath route (hash-threshold), 3 next hops, 1000 flows: when the first \
         leaves, {left} flows of the two that stay move between them; when it comes back, \
         {back} do"
    );
    ensure!(
        left > 0 && back > 0,
        "hash-threshold should move flows between the next hops that stay"
    );

    // A resilient group: nothing moves between the hosts that stay.
    resilient("1/2/3")?;
    let three = probe_next_hops(&world)?;
    resilient("2/3")?;
    let two = probe_next_hops(&world)?;
    let left = moved_between_survivors(&three, &two, &survivors);
    resilient("1/2/3")?;
    let again = probe_next_hops(&world)?;
    let back = moved_between_survivors(&two, &again, &survivors);
    let to_returning = two.iter().zip(&again).filter(|(b, a)| b != a).count();
    eprintln!(
        "ecmp: resilient nexthop group, same flows: {left} move between the next hops that \
         stay when the first leaves, {back} when it comes back ({to_returning} go to it)"
    );
    ensure!(
        left == 0 && back == 0 && to_returning > 0,
        "a resilient group moves only the flows of the next hop that changes"
    );
    Ok(())
}
