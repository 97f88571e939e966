//! The sockmap engine against retransmissions that overlap bytes the proxy already has, every
//! byte checked by position, with the splice engine as the control.
//!
//! TCP queues whole a segment that partly overlaps bytes already received, and the kernel's
//! `tcp_read_skb` hands it whole to the stream verdict, which used to redirect the old bytes a
//! second time (`docs/sockmap-duplication.md`). The verdict now trims what lies below the
//! socket's `copied_seq`.
//!
//! - `*_forwards_an_overlapping_segment_once` makes such a segment on purpose: it reads the
//!   client socket's sequence numbers in `TCP_REPAIR` mode and sends, from the client's address,
//!   one segment that starts 13,000 bytes below what the proxy already forwarded. Before the
//!   fix (or with `SPLICED_DIAG_NO_TRIM=1` in the environment) the backend sees those bytes
//!   twice, every time.
//! - `*_survives_random_drops` moves both directions at once while nftables drops TCP packets
//!   at random on every namespace's egress.
//!
//! Run as root with a release build of the proxy: `cargo xtask build && cargo test --release
//! -p spliced-tests --test sockmap_drops`. To vary the random-drop tests: `SPLICED_DROPS_RUNS`
//! (transfers per engine), `SPLICED_DROPS_MIB` (MiB each way per transfer),
//! `SPLICED_DROPS_EVERY` (drop one TCP packet in this many on each egress),
//! `SPLICED_DROPS_IN` (which namespaces' egress: any of `c`, `p`, `b`), and
//! `SPLICED_DROPS_RULE` (an nftables rule of your own in place of the drop).
use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Shutdown},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use nix::libc;
use spliced_tests::{
    BACKEND_V6, Ns, PROXY_V4, World, env_or, packets,
    raw::{self, BLOCK, Behavior, SEED_DOWN, SEED_UP, Stream, TestBackend, Verifier, simple_hello},
    spliced::{Launch, Spliced, field},
};

const PORT: u16 = 9300;
/// The kernel path alone: the backlog limit is above every transfer, so nothing leaves it.
const KERNEL_ONLY: &str = "sockmap_backlog_limit = \"4GiB\"\nsockmap_handoff = 0";
const MIB: u64 = 1 << 20;
/// One transfer fails if it is not done by then.
const LIMIT: Duration = Duration::from_secs(60);

fn config(forwarding: &str, extra: &str) -> String {
    format!(
        r#"[defaults]
forwarding = "{forwarding}"
{extra}
client_hello_timeout = "5s"
connect_timeout = "5s"

[[listen]]
address = "0.0.0.0:443"
protocol = "tls"

[[site]]
hostnames = ["drops.example"]
backend = "[{BACKEND_V6}]:{PORT}"
"#
    )
}

/// Drops one TCP packet in `every`, at random, on the egress of the client, the proxy and the
/// backend namespaces. SYNs are spared: a lost handshake only costs a second and tests nothing
/// here. The tables live in the namespaces and go with the world.
fn drop_at_random(world: &World, every: u64) -> Result<()> {
    let only = std::env::var("SPLICED_DROPS_IN").unwrap_or_else(|_| "cpb".into());
    let rule = std::env::var("SPLICED_DROPS_RULE").unwrap_or_else(|_| {
        format!("tcp flags & syn == 0 numgen random mod {every} == 0 counter drop")
    });
    // Per family, so that a custom rule may `dup to ip daddr` (the inet family cannot).
    for (ns, letter, family) in [
        (Ns::Client, 'c', "ip"),
        (Ns::Proxy, 'p', "inet"),
        (Ns::Backend, 'b', "ip6"),
    ] {
        if !only.contains(letter) {
            continue;
        }
        let script = format!(
            "add table {family} drops\n\
             add chain {family} drops out {{ type filter hook output priority 0; }}\n\
             add rule {family} drops out {rule}\n"
        );
        world.nft(ns, "drops.nft", &script)?;
    }
    Ok(())
}

/// Stops spliced and returns its kernel counters line (empty for engines without one).
fn stop_for_counters(spliced: &mut Spliced) -> Result<String> {
    let status = spliced.terminate(Duration::from_secs(10))?;
    ensure!(status.success(), "spliced exited with {status}");
    Ok(spliced
        .stderr_text()
        .lines()
        .find_map(|l| l.split_once("kernel counters: ").map(|(_, c)| c.to_owned()))
        .unwrap_or_default())
}

/// The value of `key` in a kernel counters line, 0 if absent.
fn counter(counters: &str, key: &str) -> u64 {
    counters
        .split(' ')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// What one transfer showed.
struct Outcome {
    /// The first thing that went wrong, if anything.
    failure: Option<String>,
    /// Bytes the proxy says it forwarded upstream beyond the hello and the stream.
    up_extra: i64,
    /// Bytes the proxy says it forwarded downstream beyond the stream.
    down_extra: i64,
}

/// One connection through `spliced`: `bytes` each way at the same time, checked by position at
/// the client and at the backend, and the proxy's access-log counts compared with the streams.
fn transfer(
    world: &World,
    spliced: &Spliced,
    backend: &TestBackend,
    forwarding: &str,
    bytes: u64,
    seen: usize,
) -> Result<Outcome> {
    let hello = simple_hello("drops.example");
    let hello_len = hello.len() as u64;
    let client = raw::connect(world, 443, LIMIT)?;
    let me = client.local_addr()?;
    let mut writer = client.try_clone()?;
    let mut reader = client.try_clone()?;
    // With sockmap the client's stream follows the backend's first bytes, so that it is the
    // bulk that is tested here and not data arriving with the hello.
    let gate = forwarding == "sockmap";
    let (through_tx, through_rx) = mpsc::channel::<()>();
    let (done_tx, done_rx) = mpsc::channel();
    let send_done = done_tx.clone();
    std::thread::spawn(move || {
        let result = (|| -> Result<()> {
            writer.write_all(&hello)?;
            if gate {
                through_rx
                    .recv_timeout(Duration::from_secs(10))
                    .context("waiting for the backend's first bytes")?;
            }
            raw::send_stream(&mut writer, SEED_UP, bytes)?;
            writer.shutdown(Shutdown::Write)?;
            Ok(())
        })();
        let _ = send_done.send(("client send", result));
    });
    std::thread::spawn(move || {
        let result = (|| -> Result<()> {
            let mut verifier = Verifier::new(SEED_DOWN, bytes);
            let mut first = vec![0u8; BLOCK];
            let n = reader.read(&mut first)?;
            verifier.feed(&first[..n])?;
            let _ = through_tx.send(());
            raw::receive_stream(&mut reader, &mut verifier)?;
            verifier.finish()
        })();
        let _ = done_tx.send(("client receive", result));
    });
    let started = Instant::now();
    let mut failure = None;
    for _ in 0..2 {
        match done_rx.recv_timeout(LIMIT.saturating_sub(started.elapsed())) {
            Ok((_, Ok(()))) => {}
            Ok((what, Err(e))) => {
                failure.get_or_insert(format!("{what}: {e:#}"));
                let _ = client.shutdown(Shutdown::Both);
            }
            Err(_) => {
                failure.get_or_insert(format!("not done within {LIMIT:?}"));
                let _ = client.shutdown(Shutdown::Both);
                break;
            }
        }
    }
    let conns = backend.wait_finished(seen + 1, Duration::from_secs(30))?;
    let conn = conns
        .get(seen)
        .context("the backend saw no new connection")?;
    if let Some(e) = &conn.error {
        failure.get_or_insert(format!("backend: {e}"));
    }
    if failure.is_none() && (conn.verified != bytes || conn.sent != bytes) {
        failure = Some(format!("backend: {conn:?}"));
    }
    let line = spliced.log_line_for(me, Duration::from_secs(10))?;
    let number = |key: &str| -> Result<i64> {
        field(&line, key)
            .with_context(|| format!("no {key}= in {line}"))?
            .parse()
            .context(key.to_owned())
    };
    let up_extra = number("up")? - (hello_len + bytes) as i64;
    let down_extra = number("down")? - bytes as i64;
    if failure.is_none() && field(&line, "outcome") != Some("ok") {
        failure = Some(format!("access log: {line}"));
    }
    Ok(Outcome {
        failure,
        up_extra,
        down_extra,
    })
}

/// Runs `runs` transfers through one spliced with `forwarding` under random drops and returns
/// a report line for each failed one, and spliced's kernel counters.
fn under_drops(forwarding: &str, extra: &str) -> Result<(u64, Vec<String>, String)> {
    let runs = env_or("SPLICED_DROPS_RUNS", 4);
    let bytes = env_or("SPLICED_DROPS_MIB", 64) * MIB;
    let every = env_or("SPLICED_DROPS_EVERY", 100);
    let world = World::new()?;
    drop_at_random(&world, every)?;
    let mut spliced = Launch::new(config(forwarding, extra)).start(&world, &[443])?;
    let backend = TestBackend::start(
        &world,
        PORT,
        Behavior::Bulk {
            bytes_each_way: bytes,
            hello_len: simple_hello("drops.example").len(),
        },
    )?;
    let mut failed = Vec::new();
    let started = Instant::now();
    for run in 0..runs {
        let o = transfer(&world, &spliced, &backend, forwarding, bytes, run as usize)?;
        let extras = format!("up_extra={} down_extra={}", o.up_extra, o.down_extra);
        match o.failure {
            Some(f) => failed.push(format!("run {run}: {extras}: {f}")),
            None if o.up_extra != 0 || o.down_extra != 0 => {
                failed.push(format!("run {run}: {extras}: intact at the ends?"));
            }
            None => {}
        }
    }
    eprintln!(
        "{forwarding} under drops (1 in {every} on every egress): {} of {runs} transfers of \
         {} MiB each way failed, in {:.1?}",
        failed.len(),
        bytes / MIB,
        started.elapsed()
    );
    for f in &failed {
        eprintln!("  {f}");
    }
    // What the loss did: packets dropped per namespace, and the old segments the proxy's TCP
    // received (each a chance for an overlap).
    for ns in [Ns::Client, Ns::Proxy, Ns::Backend] {
        let out = world
            .command(ns, "sh")
            .arg("-c")
            .arg(
                "nft list ruleset 2>/dev/null | grep -o 'packets [0-9]*'; \
                 nstat -az TcpRetransSegs TcpExtTCPDSACKOldSent | grep -v '^#' | tr -s ' '",
            )
            .output()?;
        eprintln!(
            "  {ns:?}: {}",
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .replace('\n', ", ")
        );
    }
    let counters = stop_for_counters(&mut spliced)?;
    if !counters.is_empty() {
        eprintln!("  kernel counters: {counters}");
    }
    Ok((runs, failed, counters))
}

fn expect_intact(forwarding: &str, extra: &str) -> Result<String> {
    let (runs, failed, counters) = under_drops(forwarding, extra)?;
    if !failed.is_empty() {
        bail!(
            "{forwarding}: {} of {runs} transfers under random drops were not intact:\n{}",
            failed.len(),
            failed.join("\n")
        );
    }
    Ok(counters)
}

/// The kernel path alone (the backlog limit is above the transfer, so nothing leaves it).
#[test]
fn sockmap_kernel_path_survives_random_drops() -> Result<()> {
    let counters = expect_intact("sockmap", KERNEL_ONLY)?;
    ensure!(counter(&counters, "trim_incomplete") == 0, "{counters}");
    Ok(())
}

/// The control: splice reads through the offset-aware `tcp_read_sock` and must stay intact.
#[test]
fn splice_survives_random_drops() -> Result<()> {
    expect_intact("splice", "").map(drop)
}

// ---------------------------------------------------------------------------------------------
// The same defect, made on purpose: one segment that overlaps bytes the proxy already has
// ---------------------------------------------------------------------------------------------

/// `TCP_REPAIR` and friends (`linux/tcp.h`).
const TCP_REPAIR: i32 = 19;
const TCP_REPAIR_QUEUE: i32 = 20;
const TCP_QUEUE_SEQ: i32 = 21;
const TCP_RECV_QUEUE: i32 = 1;
const TCP_SEND_QUEUE: i32 = 2;
/// Leaves repair mode without sending a window probe.
const TCP_REPAIR_OFF_NO_WP: i32 = -1;

fn set_tcp(fd: i32, option: i32, value: i32) -> Result<()> {
    // SAFETY: the option reads one int.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            option,
            (&raw const value).cast(),
            size_of::<i32>() as libc::socklen_t,
        )
    };
    ensure!(
        rc == 0,
        "setsockopt({option}): {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

fn get_tcp(fd: i32, option: i32) -> Result<u32> {
    let mut value = 0u32;
    let mut len = size_of::<u32>() as libc::socklen_t;
    // SAFETY: the option writes at most `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            option,
            (&raw mut value).cast(),
            &raw mut len,
        )
    };
    ensure!(
        rc == 0,
        "getsockopt({option}): {}",
        std::io::Error::last_os_error()
    );
    Ok(value)
}

/// The client socket's next sequence number to send and to receive, read in repair mode
/// (the socket must be quiet: nothing unacknowledged, nothing arriving).
fn sequence_numbers(stream: &std::net::TcpStream) -> Result<(u32, u32)> {
    use std::os::fd::AsRawFd as _;
    let fd = stream.as_raw_fd();
    set_tcp(fd, TCP_REPAIR, 1).context("entering TCP repair mode")?;
    let read = (|| -> Result<(u32, u32)> {
        set_tcp(fd, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)?;
        let snd = get_tcp(fd, TCP_QUEUE_SEQ)?;
        set_tcp(fd, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)?;
        let rcv = get_tcp(fd, TCP_QUEUE_SEQ)?;
        Ok((snd, rcv))
    })();
    set_tcp(fd, TCP_REPAIR, TCP_REPAIR_OFF_NO_WP).context("leaving TCP repair mode")?;
    read
}

/// One TCP segment (ACK|PSH, no options) from the client to the proxy's port 443 as IPv4
/// fragments of at most 1480 bytes of payload each, so that the proxy reassembles a segment
/// larger than the MTU.
fn segment_fragments(
    src: Ipv4Addr,
    sport: u16,
    (seq, ack): (u32, u32),
    payload: &[u8],
    fin: bool,
) -> Vec<Vec<u8>> {
    let IpAddr::V4(dst) = PROXY_V4 else {
        unreachable!("the proxy listens on IPv4")
    };
    let mut tcp = Vec::with_capacity(20 + payload.len());
    tcp.extend_from_slice(&sport.to_be_bytes());
    tcp.extend_from_slice(&443u16.to_be_bytes());
    tcp.extend_from_slice(&seq.to_be_bytes());
    tcp.extend_from_slice(&ack.to_be_bytes());
    // ACK|PSH, and FIN if asked.
    let flags = 0x18 | u8::from(fin);
    tcp.extend_from_slice(&[5 << 4, flags, 0xff, 0xff, 0, 0, 0, 0]);
    tcp.extend_from_slice(payload);
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, packets::IPPROTO_TCP]);
    pseudo.extend_from_slice(&u16::try_from(tcp.len()).unwrap_or(u16::MAX).to_be_bytes());
    let sum = packets::internet_checksum(&[&pseudo, &tcp]);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    let mut fragments = Vec::new();
    for (i, chunk) in tcp.chunks(1480).enumerate() {
        let offset = i * 1480;
        let more = offset + chunk.len() < tcp.len();
        let flags = (u16::from(more) << 13) | u16::try_from(offset / 8).unwrap_or(0);
        let mut p = vec![0x45, 0];
        p.extend_from_slice(&u16::try_from(20 + chunk.len()).unwrap_or(0).to_be_bytes());
        p.extend_from_slice(&0x5a5au16.to_be_bytes());
        p.extend_from_slice(&flags.to_be_bytes());
        p.extend_from_slice(&[64, packets::IPPROTO_TCP, 0, 0]);
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        let sum = packets::internet_checksum(&[&p]);
        p[10..12].copy_from_slice(&sum.to_be_bytes());
        p.extend_from_slice(chunk);
        fragments.push(p);
    }
    fragments
}

/// Sends IPv4 packets (headers included) from the calling thread's namespace.
fn send_raw_v4(packets: &[Vec<u8>]) -> Result<()> {
    // SAFETY: plain socket calls on a descriptor this function owns and closes.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW);
        ensure!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        let IpAddr::V4(dst) = PROXY_V4 else {
            unreachable!()
        };
        let mut addr: libc::sockaddr_in = std::mem::zeroed();
        addr.sin_family = libc::AF_INET as libc::sa_family_t;
        addr.sin_addr.s_addr = u32::from_ne_bytes(dst.octets());
        let mut result = Ok(());
        for p in packets {
            let rc = libc::sendto(
                fd,
                p.as_ptr().cast(),
                p.len(),
                0,
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
            );
            if rc < 0 {
                result = Err(anyhow::anyhow!(
                    "sendto: {}",
                    std::io::Error::last_os_error()
                ));
                break;
            }
        }
        libc::close(fd);
        result
    }
}

/// Bytes the client has sent but the peer not acknowledged yet (`SIOCOUTQ`).
fn unsent(stream: &std::net::TcpStream) -> Result<u64> {
    use std::os::fd::AsRawFd as _;
    let mut outq: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int.
    let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &raw mut outq) };
    ensure!(rc == 0, "SIOCOUTQ: {}", std::io::Error::last_os_error());
    Ok(u64::try_from(outq).unwrap_or(0))
}

/// Stream bytes the client sends in all, each way.
const TOTAL: u64 = 2 << 20;
/// The overlapping segment: this many bytes the proxy already forwarded, then new ones. More
/// than three `bpf_skb_adjust_room` steps of 4095 bytes, in an skb of IP fragments.
const OLD: usize = 13_000;
const NEW: usize = 7_000;

/// What the made-up segment holds besides [`OLD`] bytes the proxy already forwarded.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Overlap {
    /// [`NEW`] new bytes, in the middle of the stream: the client's own next segment then
    /// overlaps those in turn.
    NewBytes,
    /// Only a FIN, after the whole stream: TCP queues it for the FIN, the verdict gets only old
    /// bytes.
    Fin,
}

/// Connects, sends the hello and the first `first` stream bytes, waits until the backend has
/// them, then makes the proxy's TCP queue one segment that starts [`OLD`] bytes below what it
/// already received (with [`NEW`] new bytes, or only a FIN after them). Returns the client,
/// which has not read anything yet, and its address.
fn inject_overlap(
    world: &World,
    backend: &TestBackend,
    hello: &[u8],
    first: u64,
    overlap: Overlap,
) -> Result<(std::net::TcpStream, std::net::SocketAddr)> {
    let mut client = raw::connect(world, 443, Duration::from_secs(20))?;
    let me = client.local_addr()?;
    client.write_all(hello)?;
    // The hello alone first, so that spliced reads whole skbs before the socket enters the
    // map: with the trim switched off (the fail-closed test), a half-read one would already
    // be forwarded twice.
    std::thread::sleep(Duration::from_millis(100));
    // The client reads nothing yet: its receive window closes after the first ~100 KiB of the
    // downstream, so it stays ESTABLISHED (repair mode needs that) and little arrives while
    // its sequence numbers are read.
    raw::send_stream_range(&mut client, SEED_UP, 0, first)?;
    spliced_tests::wait_for(
        "the backend to receive the first part",
        Duration::from_secs(10),
        || {
            Ok(backend
                .connections()
                .first()
                .is_some_and(|c| c.verified >= first))
        },
    )?;
    spliced_tests::wait_for(
        "the client's send queue to drain",
        Duration::from_secs(10),
        || unsent(&client).map(|n| n == 0),
    )?;
    let (snd, rcv) = sequence_numbers(&client)?;
    let mut stream = Stream::new(SEED_UP);
    let fin = overlap == Overlap::Fin;
    let mut payload = vec![0u8; if fin { OLD } else { OLD + NEW }];
    stream.fill(first - OLD as u64, &mut payload);
    let IpAddr::V4(src) = me.ip() else {
        bail!("the client is not IPv4: {me}")
    };
    let seqs = (snd.wrapping_sub(OLD as u32), rcv);
    let fragments = segment_fragments(src, me.port(), seqs, &payload, fin);
    world.within(Ns::Client, || send_raw_v4(&fragments))??;
    std::thread::sleep(Duration::from_millis(200));
    Ok((client, me))
}

/// Makes the proxy's TCP queue one segment that starts [`OLD`] bytes below what it already
/// received (a retransmission that overlaps, as after a lost ACK) and checks that the backend
/// sees every byte once, in order. Returns spliced's kernel counters.
fn overlapping_segment(forwarding: &str, extra: &str, overlap: Overlap) -> Result<String> {
    // Where in the stream the segment goes: what the client sent before it.
    let first = match overlap {
        Overlap::NewBytes => 1 << 20,
        Overlap::Fin => TOTAL,
    };
    let world = World::new()?;
    // No timestamps on the client, so that a segment without the option is not suspicious.
    let out = world
        .command(Ns::Client, "sysctl")
        .args(["-q", "-w", "net.ipv4.tcp_timestamps=0"])
        .output()?;
    ensure!(
        out.status.success(),
        "sysctl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut spliced = Launch::new(config(forwarding, extra)).start(&world, &[443])?;
    let hello = simple_hello("drops.example");
    let hello_len = hello.len() as u64;
    let backend = TestBackend::start(
        &world,
        PORT,
        Behavior::Bulk {
            bytes_each_way: TOTAL,
            hello_len: hello.len(),
        },
    )?;
    let (mut client, me) = inject_overlap(&world, &backend, &hello, first, overlap)?;
    raw::send_stream_range(&mut client, SEED_UP, first, TOTAL)?;
    client.shutdown(Shutdown::Write)?;
    let mut verifier = Verifier::new(SEED_DOWN, TOTAL);
    raw::receive_stream(&mut client, &mut verifier)?;
    verifier.finish().context("the downstream")?;
    let conns = backend.wait_finished(1, Duration::from_secs(20))?;
    let conn = &conns[0];
    ensure!(
        conn.error.is_none() && conn.verified == TOTAL,
        "{forwarding}: the backend did not get the stream once, in order: {conn:?}"
    );
    let line = spliced.log_line_for(me, Duration::from_secs(10))?;
    let counters = stop_for_counters(&mut spliced)?;
    eprintln!("{forwarding}: {line}\n  backend: {conn:?}\n  kernel counters: {counters}");
    let up: u64 = field(&line, "up")
        .and_then(|v| v.parse().ok())
        .context("up=")?;
    ensure!(
        up == hello_len + TOTAL,
        "{forwarding}: the proxy forwarded {} bytes upstream, {} too many",
        up,
        up.saturating_sub(hello_len + TOTAL)
    );
    Ok(counters)
}

/// Without the verdict's trim, the kernel path forwards the [`OLD`] bytes twice.
#[test]
fn sockmap_forwards_an_overlapping_segment_once() -> Result<()> {
    let counters = overlapping_segment("sockmap", KERNEL_ONLY, Overlap::NewBytes)?;
    ensure!(
        counter(&counters, "old_trimmed_bytes") >= OLD as u64,
        "the verdict should have trimmed at least {OLD} old bytes: {counters}"
    );
    ensure!(counter(&counters, "trim_incomplete") == 0, "{counters}");
    Ok(())
}

/// A segment of old bytes that TCP queues only for its FIN: the verdict must drop it without
/// moving `copied_seq`, and spliced must still see the end of the stream.
#[test]
fn sockmap_drops_old_bytes_that_carry_a_fin() -> Result<()> {
    let counters = overlapping_segment("sockmap", KERNEL_ONLY, Overlap::Fin)?;
    ensure!(
        counter(&counters, "old_dropped_skbs") >= 1,
        "the verdict should have dropped the old bytes: {counters}"
    );
    ensure!(counter(&counters, "trim_incomplete") == 0, "{counters}");
    Ok(())
}

/// The control: splice reads through `tcp_read_sock`, which skips what was already read.
#[test]
fn splice_forwards_an_overlapping_segment_once() -> Result<()> {
    overlapping_segment("splice", "", Overlap::NewBytes).map(drop)
}

#[test]
fn splice_drops_old_bytes_that_carry_a_fin() -> Result<()> {
    overlapping_segment("splice", "", Overlap::Fin).map(drop)
}

/// Fail closed: with the trim switched off (`SPLICED_DIAG_NO_TRIM`, a diagnostic build of the
/// verdict), the overlapping segment is forwarded twice. spliced must notice from its byte
/// accounting that the verdict redirected more than arrived, reset both sides rather than end
/// the stream cleanly, and say so in the access log and `/metrics`.
#[test]
fn a_duplicate_the_kernel_forwards_resets_the_connection() -> Result<()> {
    let world = World::new()?;
    let spliced = Launch::new(config("sockmap", KERNEL_ONLY))
        .env("SPLICED_DIAG_NO_TRIM", "1")
        .metrics()
        .start(&world, &[443])?;
    let hello = simple_hello("drops.example");
    let backend = TestBackend::start(
        &world,
        PORT,
        Behavior::Bulk {
            bytes_each_way: TOTAL,
            hello_len: hello.len(),
        },
    )?;
    let first = 1 << 20;
    let (mut client, me) = inject_overlap(&world, &backend, &hello, first, Overlap::NewBytes)?;
    raw::send_stream_range(&mut client, SEED_UP, first, TOTAL)?;
    client.shutdown(Shutdown::Write)?;
    let mut verifier = Verifier::new(SEED_DOWN, TOTAL);
    let _ = raw::receive_stream(&mut client, &mut verifier);
    let line = spliced.log_line_for(me, Duration::from_secs(10))?;
    ensure!(
        field(&line, "outcome") == Some("kernel_accounting"),
        "the duplicate went unnoticed: {line}"
    );
    let conns = backend.wait_finished(1, Duration::from_secs(20))?;
    ensure!(
        !conns[0].saw_eof,
        "the backend saw a clean end of a corrupted stream: {:?}",
        conns[0]
    );
    let metrics = spliced.metrics()?;
    let counted = metrics.get(
        "spliced_connections_total",
        &[("outcome", "kernel_accounting")],
    )?;
    ensure!(counted == 1.0, "kernel_accounting counted {counted} times");
    Ok(())
}
