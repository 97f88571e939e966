//! The packet engine's stateless translation (step 2 of `docs/packet-engine.md`'s order of
//! work), with entries installed by hand: a client connects to a listener in the proxy
//! namespace and the proxy namespace connects to a backend, as spliced would; then both local
//! sockets go silent (`TCP_REPAIR`), the two `ACTIVE` entries are built from the ISNs the
//! `sock_ops` program recorded, and client and backend talk straight through the TC program:
//! IPv4 to IPv6 and back, ports, sequence and acknowledgement numbers, windows, checksums.
//!
//! Timestamps are off in every namespace: the program does not translate them yet. SACK is off
//! too, except in the run with losses, which needs it. Run as root with a release build: `cargo test --release -p spliced-tests --test
//! packet_translate`. Like `packet_facts`, it moves this test process into a cgroup (v2) of
//! its own while it runs.
use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpStream},
    os::fd::AsRawFd as _,
};

use anyhow::{Context as _, Result, bail, ensure};
use nix::libc;
use proxy_common::{FLOW_ACTIVE, FLOW_TSECR_READY, FLOW_TSVAL_READY};
use spliced::{Handoff, IsnRecorder, PacketTables, Wscale};
use spliced_tests::{BACKEND_V6, CLIENT_V4, Ns, PROXY_V4, World, packet::*};

/// Bytes each way: enough for GSO aggregates, window updates and many ACKs each way.
const BYTES: usize = 16 << 20;
/// The client's MSS (the listener's clamp) and the backend's (L''s clamp): a translated
/// segment grows by 20 bytes and must still fit the 1500-byte MTU.
const MSS: i32 = 1440;

/// A stream that shows reordering, loss and duplication: byte `i` of stream `seed`.
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[0] ^ seed ^ (i >> 13) as u8)
        .collect()
}

fn sysctl(world: &World, ns: Ns, setting: &str) -> Result<()> {
    let out = world
        .command(ns, "sysctl")
        .args(["-q", "-w", setting])
        .output()?;
    ensure!(
        out.status.success(),
        "sysctl {setting} in {ns:?}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

fn tx_off(world: &World, ns: Ns, dev: &str) -> Result<()> {
    let out = world
        .command(ns, "ethtool")
        .args(["-K", dev, "tx", "off"])
        .output()
        .context("running ethtool")?;
    ensure!(
        out.status.success(),
        "ethtool -K {dev} tx off in {ns:?}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

fn wscale(info: &libc::tcp_info) -> Wscale {
    // `__u8 tcpi_snd_wscale : 4, tcpi_rcv_wscale : 4;`
    Wscale {
        snd: info.tcpi_snd_rcv_wscale & 0x0f,
        rcv: info.tcpi_snd_rcv_wscale >> 4,
    }
}

fn ifindex(world: &World, ns: Ns, dev: &str) -> Result<u32> {
    let name = std::ffi::CString::new(dev)?;
    // SAFETY: a valid C string.
    let index = world.within(ns, || unsafe { libc::if_nametoindex(name.as_ptr()) })?;
    ensure!(index != 0, "no interface {dev} in {ns:?}");
    Ok(index)
}

/// Writes `data` to `s`, then half-closes it.
fn send_all(mut s: &TcpStream, data: &[u8]) -> Result<()> {
    s.write_all(data)?;
    s.shutdown(Shutdown::Write)?;
    Ok(())
}

/// Reads `s` to its end.
fn receive_all(mut s: &TcpStream) -> Result<Vec<u8>> {
    let mut got = Vec::with_capacity(BYTES);
    s.read_to_end(&mut got)?;
    Ok(got)
}

/// How a run differs from the plain one.
#[derive(Clone, Copy, Default)]
struct Setup {
    /// Checksum offload off on the client's veth and both of the proxy's, so segments are
    /// checksummed (and GSO aggregates cut) in software, as a NIC would receive them, and a
    /// wrong checksum shows as `InCsumErrors`.
    software_checksums: bool,
    /// SACK on everywhere, and 1 in `LOSS` of the segments arriving at the client and at the
    /// backend dropped, so both recover through the translation, with SACK blocks.
    sack_with_losses: bool,
    /// Small receive buffers in the client's and the backend's namespaces, so they scale
    /// their windows by less than the proxy's sockets do, and every window field is rescaled.
    small_peer_windows: bool,
    /// A window clamp of 65535 on the proxy's routes to the client and the backend (the
    /// route metric `window`) instead: the proxy's sockets scale by 0, less than the peers,
    /// so every peer window over 64 KiB saturates at 65535. A small `tcp_rmem` was not
    /// enough: the scale follows the larger of it and `net.core.rmem_max`, which is the
    /// host's (not per namespace): at 4 MiB here the proxy's scale was 7, and only a peer
    /// window over 8 MiB saturated, which 1 run in 20 never reached (CI saw one).
    small_proxy_windows: bool,
    /// The client asks for ECN (the proxy's sockets accept it, as Linux does by default, but
    /// do not ask the backend): only the client's connection has ECN, so the program clears
    /// the ECN field and ECE/CWR of what it translates.
    ecn_client_only: bool,
    /// The client adds IPv4 options (four bytes: three NOPs and an end) to every segment
    /// after the handoff; the program cuts them out before translating.
    client_ip_options: bool,
    /// The backend adds a destination-options extension header to every segment after the
    /// handoff; the program drops them (not translated), so nothing of the backend's arrives
    /// and the silent local socket sees nothing either. Only this is checked in such a run.
    backend_ext_headers: bool,
    /// Timestamps off on the client's side only (a Windows client): the backend's connection
    /// has them, the client's does not, so the backend's option is turned into NOPs towards
    /// the client and the backend gets the client's segments without one (design 4.3).
    client_without_timestamps: bool,
    /// Timestamps on both connections (Linux's default): both fields are translated, each
    /// side's TSvals continuing the clock of the local socket it talked to (design 4.3), and
    /// no segment may fail PAWS (`PAWSEstab` stays 0).
    timestamps_both: bool,
    /// With [`Setup::sack_with_losses`]: the backend's namespace has SACK off, so only the
    /// client's connection negotiated it; the client's SACK options become NOPs before they
    /// reach the backend (design 4.4), which recovers with duplicate ACKs.
    backend_without_sack: bool,
    /// Another copy of the programs (a second spliced during an upgrade, or any tool) is
    /// attached to both interfaces first, with no entries: under tcx it passes what matches
    /// none of its entries on to the next program (`TCX_NEXT`), so the connection's
    /// entries, in the programs attached after it, still see every segment.
    behind_other_programs: bool,
}

/// `TCPI_OPT_ECN` in `tcpi_options`.
const TCPI_OPT_ECN: u8 = 8;
/// `TCPI_OPT_TIMESTAMPS` in `tcpi_options`.
const TCPI_OPT_TIMESTAMPS: u8 = 1;
/// `TCPI_OPT_SACK` in `tcpi_options`.
const TCPI_OPT_SACK: u8 = 2;

/// Packets counted by the nftables counter `name` of table `inet marks` in `ns`.
fn nft_counter(world: &World, ns: Ns, name: &str) -> Result<u64> {
    let out = world
        .command(ns, "nft")
        .args(["-j", "list", "counter", "inet", "marks", name])
        .output()?;
    ensure!(out.status.success(), "nft list counter {name} in {ns:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    v["nftables"]
        .as_array()
        .and_then(|a| a.iter().find_map(|e| e["counter"]["packets"].as_u64()))
        .with_context(|| format!("no packet count for {name} in {v}"))
}

/// One segment in this many is dropped in a [`Setup::sack_with_losses`] run.
const LOSS: u32 = 100;

/// Makes the connection pair, hands it to the program and moves [`BYTES`] each way at once,
/// then both half-close.
fn translate(setup: Setup) -> Result<()> {
    let _one = CGROUP
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let world = World::new()?;
    for ns in [Ns::Client, Ns::Proxy, Ns::Backend] {
        if !setup.timestamps_both && (!setup.client_without_timestamps || ns == Ns::Client) {
            sysctl(&world, ns, "net.ipv4.tcp_timestamps=0")?;
        }
        if !setup.sack_with_losses {
            sysctl(&world, ns, "net.ipv4.tcp_sack=0")?;
        }
    }
    if setup.backend_without_sack {
        sysctl(&world, Ns::Backend, "net.ipv4.tcp_sack=0")?;
        world.nft(
            Ns::Backend,
            "sack.nft",
            "table inet marks {
               counter sack_arrived { }
               chain arrive {
                 type filter hook input priority 0;
                 tcp option sack exists counter name sack_arrived
               }
             }",
        )?;
    }
    if setup.small_peer_windows {
        for ns in [Ns::Client, Ns::Backend] {
            sysctl(&world, ns, "net.ipv4.tcp_rmem=4096 16384 65536")?;
        }
    }
    if setup.small_proxy_windows {
        for (family, to, dev) in [
            ("-4", format!("{CLIENT_V4}/32"), "eth0"),
            ("-6", format!("{BACKEND_V6}/128"), "eth1"),
        ] {
            let out = world
                .command(Ns::Proxy, "ip")
                .args([family, "route", "add", &to, "dev", dev, "window", "65535"])
                .output()?;
            ensure!(
                out.status.success(),
                "ip route add {to} window 65535: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    if setup.client_without_timestamps {
        world.nft(
            Ns::Client,
            "ts.nft",
            "table inet marks {
               counter ts_arrived { }
               chain arrive {
                 type filter hook input priority 0;
                 tcp option timestamp exists counter name ts_arrived
               }
             }",
        )?;
    }
    if setup.ecn_client_only {
        sysctl(&world, Ns::Client, "net.ipv4.tcp_ecn=1")?;
        world.nft(
            Ns::Client,
            "ecn.nft",
            "table inet marks {
               counter ect_sent { }
               chain out {
                 type filter hook output priority 0;
                 meta l4proto tcp ip ecn != not-ect counter name ect_sent
               }
             }",
        )?;
        world.nft(
            Ns::Backend,
            "ecn.nft",
            "table inet marks {
               counter ect_arrived { }
               counter ece_cwr_arrived { }
               chain arrive {
                 type filter hook input priority 0;
                 meta l4proto tcp ip6 ecn != not-ect counter name ect_arrived
                 tcp flags & (ecn | cwr) != 0 counter name ece_cwr_arrived
               }
             }",
        )?;
    }
    if setup.software_checksums {
        tx_off(&world, Ns::Client, "eth0")?;
        tx_off(&world, Ns::Proxy, "eth0")?;
        tx_off(&world, Ns::Proxy, "eth1")?;
    }
    let cgroup = TestCgroup::enter()?;
    let recorder = IsnRecorder::attach(cgroup.path())?;
    // Kept until the end: dropping it detaches its programs.
    let _first = if setup.behind_other_programs {
        let mut other = PacketTables::load()?;
        world.within(Ns::Proxy, || -> Result<()> {
            other.attach("eth0")?;
            other.attach("eth1")
        })??;
        Some(other)
    } else {
        None
    };
    // tcx appends: these run after `_first`.
    let mut tables = PacketTables::load()?;
    world.within(Ns::Proxy, || -> Result<()> {
        tables.attach("eth0")?;
        tables.attach("eth1")
    })??;

    // X -> L (IPv4, the listener clamps the MSS) and L' -> Y (IPv6, L' clamps it too).
    let front = SocketAddr::new(PROXY_V4, 9410);
    // The listener stays, so a second connection to it can show that entries match exactly.
    let listening = world.within(Ns::Proxy, || listener(front, Some(MSS)))??;
    let x = world.within(Ns::Client, || connect(front, None))??;
    let (l, _) = listening.accept()?;
    let back = SocketAddr::new(BACKEND_V6, 9411);
    let (l2, y) = connection(&world, (Ns::Proxy, Some(MSS)), (Ns::Backend, None), back)?;
    let client_isns = recorder
        .get(cookie(&l)?)?
        .context("no ISNs recorded for L")?;
    let backend_isns = recorder
        .get(cookie(&l2)?)?
        .context("no ISNs recorded for L'")?;
    let (SocketAddr::V4(client), SocketAddr::V4(front)) = (l.peer_addr()?, l.local_addr()?) else {
        bail!("L is not IPv4");
    };
    let (SocketAddr::V6(back), SocketAddr::V6(backend)) = (l2.local_addr()?, l2.peer_addr()?)
    else {
        bail!("L' is not IPv6");
    };
    let handoff = Handoff {
        client,
        front,
        back,
        backend,
        client_isns,
        backend_isns,
        read_from_client: 0,
        written_to_backend: 0,
        read_from_backend: 0,
        written_to_client: 0,
        client_wscale: wscale(&tcp_info(&l)?),
        backend_wscale: wscale(&tcp_info(&l2)?),
        client_ifindex: ifindex(&world, Ns::Proxy, "eth0")?,
        backend_ifindex: ifindex(&world, Ns::Proxy, "eth1")?,
        flow_label: 0x5_1ced,
        client_ecn: tcp_info(&l)?.tcpi_options & TCPI_OPT_ECN != 0,
        backend_ecn: tcp_info(&l2)?.tcpi_options & TCPI_OPT_ECN != 0,
        client_timestamps: tcp_info(&l)?.tcpi_options & TCPI_OPT_TIMESTAMPS != 0,
        backend_timestamps: tcp_info(&l2)?.tcpi_options & TCPI_OPT_TIMESTAMPS != 0,
        client_sack: tcp_info(&l)?.tcpi_options & TCPI_OPT_SACK != 0,
        backend_sack: tcp_info(&l2)?.tcpi_options & TCPI_OPT_SACK != 0,
        client_clock: socket_clock(&l)?,
        backend_clock: socket_clock(&l2)?,
        client_cookie: cookie(&l)?,
        backend_cookie: cookie(&l2)?,
        started_ns: 0,
    };
    ensure!(
        (handoff.client_timestamps, handoff.backend_timestamps)
            == (
                setup.timestamps_both,
                setup.timestamps_both || setup.client_without_timestamps
            ),
        "timestamps negotiated: client side {}, backend side {}",
        handoff.client_timestamps,
        handoff.backend_timestamps
    );
    ensure!(
        handoff.unsupported().is_none(),
        "the handoff is refused: {:?}",
        handoff.unsupported()
    );
    ensure!(
        (handoff.client_ecn, handoff.backend_ecn) == (setup.ecn_client_only, false),
        "ECN negotiated: client side {}, backend side {}",
        handoff.client_ecn,
        handoff.backend_ecn
    );
    if setup.small_peer_windows {
        let (c, b) = (handoff.client_wscale, handoff.backend_wscale);
        eprintln!("window scales: client side {c:?}, backend side {b:?}");
        ensure!(
            c.snd < b.rcv && b.snd < c.rcv,
            "the peers' scales ({}, {}) are not below the proxy's ({}, {}): nothing to rescale",
            c.snd,
            b.snd,
            b.rcv,
            c.rcv
        );
    }
    // Both local sockets go silent for good, then the entries take over.
    set_int(l.as_raw_fd(), libc::IPPROTO_TCP, TCP_REPAIR, 1)?;
    set_int(l2.as_raw_fd(), libc::IPPROTO_TCP, TCP_REPAIR, 1)?;
    tables.insert(&handoff, FLOW_ACTIVE)?;
    if setup.client_ip_options {
        let options = [1u8, 1, 1, 0];
        // SAFETY: the option reads `options.len()` bytes from a live buffer.
        let rc = unsafe {
            libc::setsockopt(
                x.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_OPTIONS,
                options.as_ptr().cast(),
                options.len() as libc::socklen_t,
            )
        };
        ensure!(
            rc == 0,
            "IP_OPTIONS on the client: {}",
            std::io::Error::last_os_error()
        );
    }
    if setup.sack_with_losses {
        // Dropped as they arrive at the peers, after the translation: the sender's TCP sees
        // a loss (a drop in its own output hook only delays the send, it is not a loss).
        // Without SACK at the backend only the client's losses matter: its ACKs carry the
        // SACK blocks to strip, and the backend recovers from them with duplicate ACKs
        // (Reno, slow at 1%; the backend's own losses would only add more of it).
        let lossy: &[Ns] = if setup.backend_without_sack {
            &[Ns::Client]
        } else {
            &[Ns::Client, Ns::Backend]
        };
        for &ns in lossy {
            world.nft(
                ns,
                "loss.nft",
                &format!(
                    "table inet loss {{
                       chain arrive {{
                         type filter hook prerouting priority 0;
                         meta l4proto tcp numgen random mod {LOSS} == 0 counter drop
                       }}
                     }}"
                ),
            )?;
        }
    }

    if setup.backend_ext_headers {
        return backend_ext_headers_are_dropped(&tables, (&x, &l2, &y));
    }
    // Reno recovery at 1% loss moves a few MB/s: a quarter of the data is enough to strip
    // hundreds of SACK options.
    let bytes = if setup.backend_without_sack {
        BYTES / 4
    } else {
        BYTES
    };
    let up = pattern(0x55, bytes);
    let down = pattern(0xaa, bytes);
    let (got_up, got_down) = std::thread::scope(|s| -> Result<(Vec<u8>, Vec<u8>)> {
        let writers = [
            s.spawn(|| send_all(&x, &up)),
            s.spawn(|| send_all(&y, &down)),
        ];
        let at_y = s.spawn(|| receive_all(&y));
        let at_x = receive_all(&x);
        for w in writers {
            w.join()
                .map_err(|_| anyhow::anyhow!("a writer panicked"))??;
        }
        let at_y = at_y
            .join()
            .map_err(|_| anyhow::anyhow!("the backend's reader panicked"))??;
        Ok((at_y, at_x?))
    })?;
    let counters = tables.counters();
    let entries = tables.entries(&handoff)?;
    eprintln!("counters: {counters:?}");
    eprintln!("entries (up, down): {entries:?}");
    ensure!(
        got_up.len() == up.len() && got_up == up,
        "the backend received {} bytes, {} expected, or different ones",
        got_up.len(),
        up.len()
    );
    ensure!(
        got_down.len() == down.len() && got_down == down,
        "the client received {} bytes, {} expected, or different ones",
        got_down.len(),
        down.len()
    );
    if setup.small_peer_windows {
        // What each peer last advertised, in bytes, is what the other now believes, rounded
        // down to the other's unit, never more.
        for (name, receiver, sender, unit) in [
            ("client", &x, &y, 1u32 << handoff.backend_wscale.rcv),
            ("backend", &y, &x, 1u32 << handoff.client_wscale.rcv),
        ] {
            // The last window update may still be on its way: give it a moment.
            let mut last = (0, 0);
            let agree = spliced_tests::wait_for(
                "the windows to agree",
                std::time::Duration::from_secs(2),
                || {
                    let advertised = tcp_info(receiver)?.tcpi_rcv_wnd;
                    let believed = tcp_info(sender)?.tcpi_snd_wnd;
                    last = (advertised, believed);
                    Ok(believed <= advertised && advertised - believed < unit)
                },
            );
            let (advertised, believed) = last;
            eprintln!("{name} advertised {advertised}, its peer believes {believed}");
            agree.with_context(|| {
                format!(
                    "the {name} advertised a window of {advertised} bytes, its peer believes \
                     {believed}"
                )
            })?;
        }
    }
    if setup.ecn_client_only {
        let sent = nft_counter(&world, Ns::Client, "ect_sent")?;
        let arrived = nft_counter(&world, Ns::Backend, "ect_arrived")?;
        let flags = nft_counter(&world, Ns::Backend, "ece_cwr_arrived")?;
        eprintln!("ECN: {sent} ECT packets sent, {arrived} arrived, {flags} with ECE/CWR");
        ensure!(
            sent > 0,
            "the client sent no ECN-capable packets: nothing was tested"
        );
        ensure!(
            arrived == 0 && flags == 0,
            "{arrived} packets arrived at the backend with an ECN field, {flags} with ECE or \
             CWR, on a connection without ECN"
        );
    }
    // The same client to the same listener from another port is none of the entries'
    // business: it reaches the local stack, and the program translates nothing of it.
    let before = tables.counters();
    let mut other = world.within(Ns::Client, || connect(SocketAddr::V4(front), None))??;
    let (mut other_local, _) = listening.accept()?;
    other_local.set_read_timeout(Some(IO))?;
    exchange(&mut other, &mut other_local, 100_000)?;
    exchange(&mut other_local, &mut other, 100_000)?;
    ensure!(
        tables.counters() == before,
        "an unrelated connection changed the counters: {before:?} -> {:?}",
        tables.counters()
    );
    // Nothing reached the local sockets: the translation carried every byte.
    for (name, s) in [("L", &l), ("L'", &l2)] {
        let received = tcp_info(s)?.tcpi_bytes_received;
        ensure!(
            received == 0,
            "{name} received {received} bytes: the stack, not the translation, got segments"
        );
    }
    let counter = |name: &str| {
        counters
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(0, |(_, v)| *v)
    };
    ensure!(
        counter("translated_up") > 0 && counter("translated_down") > 0,
        "no segments translated: {counters:?}"
    );
    ensure!(
        counter("translated_bytes_up") >= bytes as u64
            && counter("translated_bytes_down") >= bytes as u64,
        "fewer bytes translated than delivered: {counters:?}"
    );
    for name in ["translate_failed", "redirect_failed", "ttl_expired"] {
        ensure!(counter(name) == 0, "{name} is {}", counter(name));
    }
    if setup.small_proxy_windows {
        let (c, b) = (handoff.client_wscale, handoff.backend_wscale);
        eprintln!("window scales: client side {c:?}, backend side {b:?}");
        ensure!(
            c.snd > b.rcv && b.snd > c.rcv,
            "the peers' scales ({}, {}) are not above the proxy's ({}, {})",
            c.snd,
            b.snd,
            b.rcv,
            c.rcv
        );
        ensure!(
            counter("window_saturated") > 0,
            "no window was capped: {counters:?}"
        );
    }
    if setup.client_without_timestamps {
        let arrived = nft_counter(&world, Ns::Client, "ts_arrived")?;
        ensure!(
            arrived == 0 && counter("timestamps_stripped") > 0,
            "{arrived} segments reached the client with a timestamp option: {counters:?}"
        );
    }
    if setup.timestamps_both {
        let translated = counter("timestamps_translated");
        ensure!(
            translated > 0 && counter("timestamp_layout_unknown") == 0,
            "timestamps not translated: {counters:?}"
        );
        for ns in [Ns::Client, Ns::Backend] {
            let paws = tcp_ext_stat(&world, ns, "PAWSEstab")?;
            eprintln!("{ns:?}: PAWSEstab {paws}");
            ensure!(paws == 0, "{paws} segments failed PAWS in {ns:?}");
        }
        let [up, down] = entries;
        for (name, e) in [("up", up), ("down", down)] {
            let e = e.context("an entry vanished")?;
            ensure!(
                e.ts_ready == (FLOW_TSVAL_READY | FLOW_TSECR_READY),
                "{name}: timestamp deltas not both set ({})",
                e.ts_ready
            );
        }
    }
    if setup.client_ip_options {
        ensure!(
            counter("ip_options_stripped") > 0 && counter("ip_options_dropped") == 0,
            "the client's IPv4 options were not cut out: {counters:?}"
        );
    }
    for ns in [Ns::Client, Ns::Backend] {
        let errors = tcp_stat(&world, ns, "InCsumErrors")?;
        ensure!(errors == 0, "{errors} TCP checksum errors in {ns:?}");
    }
    if setup.backend_without_sack {
        let arrived = nft_counter(&world, Ns::Backend, "sack_arrived")?;
        let stripped = counter("sack_stripped");
        eprintln!("SACK options stripped {stripped}, arrived at the backend {arrived}");
        ensure!(
            handoff.client_sack && !handoff.backend_sack,
            "SACK negotiated: client side {}, backend side {}",
            handoff.client_sack,
            handoff.backend_sack
        );
        ensure!(
            stripped > 0 && arrived == 0,
            "{arrived} segments with SACK reached the backend, {stripped} stripped"
        );
        let retransmitted = tcp_stat(&world, Ns::Backend, "RetransSegs")?;
        ensure!(
            retransmitted > 0,
            "the backend retransmitted nothing: the losses did not happen"
        );
    }
    if setup.sack_with_losses && !setup.backend_without_sack {
        let retransmitted = [
            tcp_stat(&world, Ns::Client, "RetransSegs")?,
            tcp_stat(&world, Ns::Backend, "RetransSegs")?,
        ];
        eprintln!("retransmitted segments (client, backend): {retransmitted:?}");
        ensure!(
            retransmitted.iter().all(|&r| r > 0),
            "no retransmissions on one side ({retransmitted:?}): the losses did not happen"
        );
        ensure!(
            counter("sack_blocks") > 0,
            "no SACK blocks translated: {counters:?}"
        );
        // A block left in the wrong sequence space is discarded by the receiver as invalid;
        // untranslated, nearly every block would be (and the transfer stalls). A few are
        // discarded in some runs (1 to 121 in a quarter of them, on 2026-12-05), always with
        // reordering and D-SACKs seen; the routed path under the same loss showed none in 8
        // runs. Not explained yet: see docs/packet-engine.md, order of work, step 2.
        let mut recoveries = 0;
        let mut discarded = 0;
        for ns in [Ns::Client, Ns::Backend] {
            discarded += tcp_ext_stat(&world, ns, "TCPSACKDiscard")?;
            recoveries += tcp_ext_stat(&world, ns, "TCPSackRecovery")?;
            eprintln!(
                "{ns:?}: SACK blocks discarded {}, reorderings seen {}, D-SACKs received {}",
                tcp_ext_stat(&world, ns, "TCPSACKDiscard")?,
                tcp_ext_stat(&world, ns, "TCPSACKReorder")?,
                tcp_ext_stat(&world, ns, "TCPDSACKRecv")?,
            );
        }
        let blocks = counter("sack_blocks");
        eprintln!(
            "SACK: {blocks} blocks translated, {discarded} discarded, {recoveries} recoveries"
        );
        ensure!(
            discarded * 10 < blocks,
            "{discarded} of {blocks} translated SACK blocks were discarded as invalid"
        );
        ensure!(recoveries > 0, "no SACK-based recovery happened");
    }
    tables.remove(&handoff)?;
    drop(tables);
    // L and L' close in repair mode: silently.
    drop((l, l2));
    drop(recorder);
    drop(cgroup);
    Ok(())
}

/// The backend's segments carry an IPv6 destination-options header from now on: the program
/// must drop them (counted), so the client gets nothing and L' receives nothing.
fn backend_ext_headers_are_dropped(
    tables: &PacketTables,
    (x, l2, y): (&TcpStream, &TcpStream, &TcpStream),
) -> Result<()> {
    // Next header (filled in by the kernel), length 0 (8 bytes), one PadN option of 4 bytes.
    let dstopts = [0u8, 0, 1, 4, 0, 0, 0, 0];
    // SAFETY: the option reads `dstopts.len()` bytes from a live buffer.
    let rc = unsafe {
        libc::setsockopt(
            y.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_DSTOPTS,
            dstopts.as_ptr().cast(),
            dstopts.len() as libc::socklen_t,
        )
    };
    ensure!(
        rc == 0,
        "IPV6_DSTOPTS on the backend: {}",
        std::io::Error::last_os_error()
    );
    // Small writes: with the 8 extra bytes a full-sized segment (the MSS clamp leaves room
    // for exactly the translation's 20) would no longer fit the backend's own MTU.
    let mut y_w = y;
    for _ in 0..4 {
        y_w.write_all(&pattern(0x33, 500))?;
    }
    x.set_read_timeout(Some(std::time::Duration::from_millis(1500)))?;
    let mut buf = [0u8; 1];
    match (&*x).read(&mut buf) {
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) => {}
        other => bail!("the client read {other:?}: a segment with extension headers crossed"),
    }
    let counters = tables.counters();
    let dropped = counters
        .iter()
        .find(|(n, _)| *n == "ipv6_ext_dropped")
        .map_or(0, |(_, v)| *v);
    eprintln!("counters: {counters:?}");
    ensure!(dropped > 0, "no segment counted as dropped: {counters:?}");
    let received = tcp_info(l2)?.tcpi_bytes_received;
    ensure!(received == 0, "L' received {received} bytes");
    Ok(())
}

/// Both directions at once through the translation, on veths that checksum and segment in
/// hardware (`CHECKSUM_PARTIAL` all the way).
#[test]
fn a_handed_off_connection_moves_bytes_exactly_both_ways() -> Result<()> {
    translate(Setup::default())
}

/// The same with checksum offload off on the client's and the proxy's veths: GSO aggregates
/// are cut and every segment checksummed in software after the translation, and the
/// receivers check every checksum (`InCsumErrors` stays 0). Client segments arrive at the
/// program `CHECKSUM_NONE` (section 11 item 3 of the design).
#[test]
fn a_handed_off_connection_keeps_checksums_right_in_software() -> Result<()> {
    translate(Setup {
        software_checksums: true,
        ..Setup::default()
    })
}

/// With 1% of each peer's segments lost, both recover end to end through the translation:
/// retransmissions, duplicate ACKs and SACK blocks (translated into the other sequence space)
/// cross it, and the bytes still arrive exactly.
#[test]
fn a_handed_off_connection_recovers_losses_with_sack() -> Result<()> {
    translate(Setup {
        software_checksums: true,
        sack_with_losses: true,
        ..Setup::default()
    })
}

/// ECN on the client's connection only: the backend's connection never negotiated it, so
/// nothing the client marks may reach the backend with an ECN field or ECE/CWR.
#[test]
fn a_handed_off_connection_clears_ecn_the_backend_did_not_negotiate() -> Result<()> {
    translate(Setup {
        ecn_client_only: true,
        ..Setup::default()
    })
}

/// The proxy's sockets scale their windows by less than the peers, so the peers' large
/// windows are capped at what the smaller scale can say (counted); the transfer completes.
#[test]
fn a_handed_off_connection_caps_windows_the_other_side_cannot_express() -> Result<()> {
    translate(Setup {
        small_proxy_windows: true,
        ..Setup::default()
    })
}

/// Segments from the backend with IPv6 extension headers on a handed-off tuple are dropped
/// and counted, not passed to the silent local socket (design 2.1; a backend that always
/// sends them would stall, which is documented).
#[test]
fn a_handed_off_connection_drops_backend_extension_headers() -> Result<()> {
    translate(Setup {
        backend_ext_headers: true,
        ..Setup::default()
    })
}

/// Timestamps on the backend's connection only: the backend (Linux) must take the client's
/// segments without the option it negotiated, and the backend's option is turned into NOPs
/// before it reaches the client, which never negotiated it (design 4.3, "strip" row). Both
/// directions arrive exactly.
#[test]
fn a_handed_off_connection_carries_timestamps_only_one_side_negotiated() -> Result<()> {
    translate(Setup {
        client_without_timestamps: true,
        ..Setup::default()
    })
}

/// The client's segments carry IPv4 options after the handoff; they are cut out (IPv6 has no
/// place for them), and the bytes still arrive exactly, in software-checksummed segments.
#[test]
fn a_handed_off_connection_strips_client_ip_options() -> Result<()> {
    translate(Setup {
        client_ip_options: true,
        software_checksums: true,
        ..Setup::default()
    })
}

/// The peers scale their windows by less than the proxy's sockets, so every window field is
/// rescaled both ways (rounded down, never promising more than the sender offered); the
/// transfer still completes exactly.
#[test]
fn a_handed_off_connection_rescales_windows() -> Result<()> {
    translate(Setup {
        small_peer_windows: true,
        ..Setup::default()
    })
}

/// Timestamps on both connections: `TSval` continues the clock of the local socket each peer
/// talked to and `TSecr` is mapped back into the receiver's clock; no segment fails PAWS, and
/// 16 MiB each way arrive exactly.
#[test]
fn a_handed_off_connection_translates_timestamps_both_ways() -> Result<()> {
    translate(Setup {
        timestamps_both: true,
        software_checksums: true,
        ..Setup::default()
    })
}

/// The same with 1% loss at both peers and SACK on: retransmissions, SACK blocks after the
/// timestamp option, and timestamps echoed across the translation.
#[test]
fn a_handed_off_connection_translates_timestamps_under_loss() -> Result<()> {
    translate(Setup {
        timestamps_both: true,
        software_checksums: true,
        sack_with_losses: true,
        ..Setup::default()
    })
}

/// SACK on the client's connection only, with 1% loss at the client: the client's SACK
/// options become NOPs before they reach the backend, which never negotiated them; the
/// backend recovers without them and 4 MiB each way arrive exactly.
#[test]
fn a_handed_off_connection_strips_sack_the_backend_did_not_negotiate() -> Result<()> {
    translate(Setup {
        software_checksums: true,
        sack_with_losses: true,
        backend_without_sack: true,
        ..Setup::default()
    })
}

/// Unmatched traffic goes on down the tcx chain: the connection's entries live in programs
/// attached after another copy that has none, and its bytes still cross exactly, translated.
#[test]
fn a_handed_off_connection_works_behind_other_tcx_programs() -> Result<()> {
    translate(Setup {
        behind_other_programs: true,
        ..Setup::default()
    })
}

/// The table side of a client reusing its port (design 2.1 and section 6): the new
/// connection's handoff puts its client entry under the key of the old one's before the
/// sweeper ended that one. Each connection must still read its own client entry, and
/// removing the old connection must leave the new one's entry and control value alone;
/// removed before any new insert, the old one goes whole. No interface, no traffic: only the
/// maps, with made-up connections.
#[test]
fn a_handoff_on_the_key_of_an_older_client_entry_leaves_each_connection_its_own() -> Result<()> {
    spliced_tests::require_root()?;
    let tables = PacketTables::load()?;
    let isns = |local_isn, peer_isn| proxy_common::IsnPair {
        local_isn,
        peer_isn,
    };
    let old = Handoff {
        client_cookie: 11,
        backend_cookie: 12,
        ..sample_handoff(0)
    };
    // The same client port, a new L (cookie), a new L' (another ephemeral port), new ISNs.
    let new = Handoff {
        back: "[2001:db8:1::1]:50001".parse()?,
        client_isns: isns(5000, 6000),
        backend_isns: isns(7000, 8000),
        client_cookie: 21,
        backend_cookie: 22,
        ..old
    };
    let [(up_key, _), (old_down, _)] = old.entries(FLOW_ACTIVE);
    let [(new_up_key, _), (new_down, _)] = new.entries(FLOW_ACTIVE);
    ensure!(up_key == new_up_key && old_down != new_down);

    tables.insert(&old, FLOW_ACTIVE)?;
    tables.insert(&new, FLOW_ACTIVE)?;
    let [up, down] = tables.entries(&old)?;
    let (up, down) = (up.context("no old E_up")?, down.context("no old E_down")?);
    ensure!(
        up.local_cookie == 11 && up.seq_floor == 2000 + 1 + 517 && down.local_cookie == 12,
        "the old connection reads another's entries: {up:?} {down:?}"
    );
    let [up, _] = tables.entries(&new)?;
    ensure!(up.context("no new E_up")?.local_cookie == 21);
    // The old connection ends: its E_down goes, the new one's E_up and control value stay.
    tables.remove(&old)?;
    ensure!(tables.get(&old_down)?.is_none(), "the old E_down is left");
    ensure!(
        tables.get(&up_key)?.map(|f| f.local_cookie) == Some(21),
        "removing the old connection removed the new one's client entry"
    );
    ensure!(
        tables.set_state(&[up_key], FLOW_ACTIVE)? == 1,
        "removing the old connection removed the new one's control value"
    );
    ensure!(tables.entries(&old)? == [None, None]);
    tables.remove(&new)?;
    ensure!(
        tables.all()?.is_empty(),
        "entries left: {:?}",
        tables.all()?
    );

    // Without a new insert in between the old connection's entries go whole.
    tables.insert(&old, FLOW_ACTIVE)?;
    tables.remove(&old)?;
    ensure!(
        tables.all()?.is_empty(),
        "entries left: {:?}",
        tables.all()?
    );
    Ok(())
}
