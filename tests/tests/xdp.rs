//! The XDP edge filter, end to end: spliced attaches `spliced_xdp` to the proxy namespace's two
//! veth interfaces (eth0 towards the IPv4-only client, eth1 towards the IPv6-only backend
//! namespace, which doubles as an IPv6 client here), and the tests check what a user would see:
//! connections that succeed or time out, counters in spliced's log and in bpftool, and that
//! everything the filter does not guard (ping, other ports) keeps working.
use std::{
    io::Write as _,
    net::{IpAddr, Ipv6Addr, Shutdown, SocketAddr, TcpStream},
    os::fd::OwnedFd,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use nix::sys::{
    signal::{Signal, kill},
    socket::{
        AddressFamily, SockFlag, SockType, SockaddrStorage, bind, connect, setsockopt, socket,
        sockopt,
    },
};
use spliced_tests::{
    BACKEND_V6, CLIENT_V4, CLIENT_V4_B, Ns, PROXY_V4, PROXY_V6, World,
    packets::{self, ETHERTYPE_IPV4, ETHERTYPE_IPV6},
    raw::{self, Behavior, TestBackend, simple_hello},
    spliced::{Launch, Metrics, Spliced},
    wait_for,
};

/// The echo backend in the backend namespace.
const ECHO_PORT: u16 = 9443;
/// A listener the filter does not guard (`ports = [443]`).
const UNGUARDED: u16 = 8443;
/// A second IPv6 address in the backend namespace, for an IPv6 client that is not denied.
const V6_ALLOWED: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x21);
const IO: Duration = Duration::from_secs(10);
/// How long a connection attempt may take before it counts as blocked.
const BLOCKED_AFTER: Duration = Duration::from_secs(2);

fn config(xdp: &str) -> String {
    format!(
        r#"[defaults]
forwarding = "splice"

[[listen]]
address = "0.0.0.0:443"
protocol = "tls"

[[listen]]
address = "[::]:443"
protocol = "tls"

[[listen]]
address = "0.0.0.0:{UNGUARDED}"
protocol = "tls"

[[site]]
hostnames = ["xdp.example"]
backend = "[{BACKEND_V6}]:{ECHO_PORT}"

[xdp]
interfaces = ["eth0", "eth1"]
ports = [443]
{xdp}
"#
    )
}

/// The world with an echo backend, the extra IPv6 address, and spliced with `xdp` appended to
/// its `[xdp]` section.
fn setup(xdp: &str) -> Result<(World, TestBackend, Spliced)> {
    let world = World::new()?;
    let status = world
        .command(Ns::Backend, "ip")
        .args([
            "addr",
            "add",
            &format!("{V6_ALLOWED}/64"),
            "dev",
            "eth0",
            "nodad",
        ])
        .status()?;
    ensure!(
        status.success(),
        "adding {V6_ALLOWED} in the backend namespace"
    );
    let echo = TestBackend::start(&world, ECHO_PORT, Behavior::Echo)?;
    let spliced = Launch::new(config(xdp))
        .metrics()
        .start(&world, &[443, UNGUARDED])?;
    Ok((world, echo, spliced))
}

/// Connects from `src` in namespace `ns` to `dst`, giving up after [`BLOCKED_AFTER`].
fn connect_from(world: &World, ns: Ns, src: IpAddr, dst: SocketAddr) -> Result<TcpStream> {
    let stream = world.within(ns, move || -> Result<TcpStream> {
        let family = if src.is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        let fd: OwnedFd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
        // connect() gives up after the send timeout, so a dropped SYN is an error, not a hang.
        let timeout = nix::sys::time::TimeVal::new(BLOCKED_AFTER.as_secs() as i64, 0);
        setsockopt(&fd, sockopt::SendTimeout, &timeout)?;
        let (local, remote): (SockaddrStorage, SockaddrStorage) = match (src, dst) {
            (IpAddr::V4(s), SocketAddr::V4(d)) => {
                (std::net::SocketAddrV4::new(s, 0).into(), d.into())
            }
            (IpAddr::V6(s), SocketAddr::V6(d)) => {
                (std::net::SocketAddrV6::new(s, 0, 0, 0).into(), d.into())
            }
            _ => bail!("{src} and {dst} are not of one family"),
        };
        bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &local)?;
        connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &remote)
            .with_context(|| format!("connecting {src} -> {dst}"))?;
        let stream = TcpStream::from(fd);
        stream.set_read_timeout(Some(IO))?;
        stream.set_write_timeout(Some(IO))?;
        Ok(stream)
    })??;
    Ok(stream)
}

/// A full exchange through spliced from `src`: hello, echo, payload, echo, close.
fn served(world: &World, ns: Ns, src: IpAddr, dst: SocketAddr) -> Result<()> {
    let mut s = connect_from(world, ns, src, dst)?;
    let hello = simple_hello("xdp.example");
    s.write_all(&hello)?;
    let echoed = raw::read_exactly(&mut s, hello.len()).context("the hello's echo")?;
    ensure!(echoed == hello, "the echo of the hello differs");
    s.write_all(b"through the filter")?;
    let echoed = raw::read_exactly(&mut s, 18)?;
    ensure!(
        echoed == b"through the filter",
        "the payload's echo differs"
    );
    s.shutdown(Shutdown::Write)?;
    Ok(())
}

/// Expects that a connection from `src` to `dst` cannot be made (its SYNs are dropped).
fn blocked(world: &World, ns: Ns, src: IpAddr, dst: SocketAddr) -> Result<()> {
    let started = Instant::now();
    match connect_from(world, ns, src, dst) {
        Ok(_) => bail!("{src} could connect to {dst}, but it should be blocked"),
        Err(e) => {
            ensure!(
                started.elapsed() >= BLOCKED_AFTER - Duration::from_millis(100),
                "{src} -> {dst} failed at once instead of timing out (refused?): {e:#}"
            );
            Ok(())
        }
    }
}

/// The `spliced_xdp_packets_total` sample with `outcome` `name`.
fn counter(all: &Metrics, name: &str) -> Result<u64> {
    all.count("spliced_xdp_packets_total", &[("outcome", name)])
}

/// Runs bpftool in spliced's mount namespace (where its pins live).
fn bpftool(spliced: &Spliced, args: &[&str]) -> Result<String> {
    let pid = spliced.pid().context("spliced has no PID")?;
    let out = Command::new("nsenter")
        .args(["--target", &pid.to_string(), "--mount", "--net", "bpftool"])
        .args(args)
        .output()?;
    ensure!(
        out.status.success(),
        "bpftool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Expects no XDP program on the proxy's eth0 (asked of the namespace, not of spliced, which
/// is gone).
fn expect_nothing_on_eth0(world: &World, when: &str) -> Result<()> {
    let net = world
        .command(Ns::Proxy, "bpftool")
        .args(["net", "show", "dev", "eth0"])
        .output()?;
    let net = String::from_utf8_lossy(&net.stdout);
    ensure!(
        !net.contains(" id "),
        "eth0 kept an XDP program {when}: {net}"
    );
    Ok(())
}

/// Edits the pinned IPv4 deny list by hand, as a user would: `bpftool map VERB pinned ... key
/// 32 0 0 0 REST` (the key is the prefix length as a little-endian u32, then the address).
fn edit_deny4(spliced: &Spliced, verb: &str, rest: &str) -> Result<String> {
    let mut args = vec![
        "map",
        verb,
        "pinned",
        "/sys/fs/bpf/spliced/SPLICED_XDP_DENY4",
        "key",
        "32",
        "0",
        "0",
        "0",
    ];
    args.extend(rest.split_whitespace());
    bpftool(spliced, &args)
}

/// The id of the XDP program attached to the proxy's eth0, checked to be spliced's.
fn attached_id(spliced: &Spliced) -> Result<String> {
    let net = bpftool(spliced, &["net", "show", "dev", "eth0"])?;
    let id = net
        .split_once(" id ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .with_context(|| format!("no XDP program on eth0: {net:?}"))?
        .to_owned();
    let prog = bpftool(spliced, &["prog", "show", "id", &id])?;
    ensure!(
        prog.contains("spliced_xdp"),
        "the program on eth0 is not spliced's: {prog}"
    );
    Ok(id)
}

fn rewrite_config(spliced: &Spliced, xdp: &str) -> Result<()> {
    std::fs::write(spliced.config_path(), config(xdp))?;
    let before = spliced
        .stderr_text()
        .matches("configuration reloaded")
        .count();
    let pid = spliced.pid().context("spliced has no PID")?;
    kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGHUP)?;
    wait_for("the reload", IO, || {
        Ok(spliced
            .stderr_text()
            .matches("configuration reloaded")
            .count()
            > before)
    })
}

fn proxy4(port: u16) -> SocketAddr {
    SocketAddr::new(PROXY_V4, port)
}

fn proxy6(port: u16) -> SocketAddr {
    SocketAddr::new(PROXY_V6, port)
}

/// A denied IPv4 address and a denied IPv6 prefix cannot connect while other clients can;
/// the denied ones still ping and reach a port the filter does not guard; the drops are
/// counted, in the log and in bpftool.
#[test]
fn deny_list_blocks_addresses_and_prefixes_only_on_guarded_ports() -> Result<()> {
    let (world, _echo, spliced) = setup(r#"deny = ["192.0.2.3/32", "2001:db8:1::10/127"]"#)?;
    served(&world, Ns::Client, CLIENT_V4, proxy4(443)).context("192.0.2.2 is not denied")?;
    blocked(&world, Ns::Client, CLIENT_V4_B, proxy4(443))?;
    served(&world, Ns::Backend, IpAddr::V6(V6_ALLOWED), proxy6(443))
        .context("2001:db8:1::21 is outside the denied /127")?;
    blocked(&world, Ns::Backend, BACKEND_V6, proxy6(443))?;
    // Not guarded: another port, and ICMP.
    served(&world, Ns::Client, CLIENT_V4_B, proxy4(UNGUARDED))
        .context("a denied source on an unguarded port")?;
    let ping = world
        .command(Ns::Client, "ping")
        .args([
            "-c",
            "2",
            "-i",
            "0.2",
            "-W",
            "2",
            "-I",
            &CLIENT_V4_B.to_string(),
        ])
        .arg(PROXY_V4.to_string())
        .output()?;
    ensure!(
        ping.status.success(),
        "ping from the denied 192.0.2.3: {}{}",
        String::from_utf8_lossy(&ping.stdout),
        String::from_utf8_lossy(&ping.stderr)
    );
    let all = spliced.metrics()?;
    eprintln!("xdp counters:\n{all}");
    // Each blocked connect() sent its SYN and retransmitted it within BLOCKED_AFTER.
    ensure!(
        counter(&all, "dropped_deny")? >= 2,
        "dropped_deny should count the blocked SYNs:\n{all}"
    );
    ensure!(counter(&all, "passed")? > 0, "passed:\n{all}");
    ensure!(counter(&all, "not_guarded")? > 0, "not_guarded:\n{all}");
    let dump = bpftool(
        &spliced,
        &[
            "map",
            "dump",
            "pinned",
            "/sys/fs/bpf/spliced/SPLICED_XDP_COUNTERS",
        ],
    )?;
    ensure!(
        dump.contains("values"),
        "bpftool shows the per-CPU counters: {dump}"
    );
    Ok(())
}

/// The deny list changes on reload and through bpftool without detaching the program, and an
/// established connection survives both.
#[test]
fn deny_list_changes_on_reload_and_with_bpftool() -> Result<()> {
    let (world, _echo, spliced) = setup(r#"deny = []"#)?;
    let attached_at_start = attached_id(&spliced)?;
    let mut open = connect_from(&world, Ns::Client, CLIENT_V4, proxy4(443))?;
    let hello = simple_hello("xdp.example");
    open.write_all(&hello)?;
    ensure!(raw::read_exactly(&mut open, hello.len())? == hello, "echo");
    served(&world, Ns::Client, CLIENT_V4_B, proxy4(443))?;

    rewrite_config(&spliced, r#"deny = ["192.0.2.3"]"#)?;
    blocked(&world, Ns::Client, CLIENT_V4_B, proxy4(443))?;
    open.write_all(b"still here")?;
    ensure!(
        raw::read_exactly(&mut open, 10)? == b"still here",
        "the established connection after the reload"
    );

    edit_deny4(&spliced, "update", "192 0 2 2 value 1")?;
    blocked(&world, Ns::Client, CLIENT_V4, proxy4(443))?;
    edit_deny4(&spliced, "delete", "192 0 2 2")?;
    served(&world, Ns::Client, CLIENT_V4, proxy4(443))?;

    // A prefix: both client addresses; the IPv6 client is still served.
    rewrite_config(&spliced, r#"deny = ["192.0.2.2/31"]"#)?;
    blocked(&world, Ns::Client, CLIENT_V4, proxy4(443))?;
    blocked(&world, Ns::Client, CLIENT_V4_B, proxy4(443))?;
    served(&world, Ns::Backend, IpAddr::V6(V6_ALLOWED), proxy6(443))?;

    rewrite_config(&spliced, r#"deny = []"#)?;
    served(&world, Ns::Client, CLIENT_V4_B, proxy4(443))?;
    open.write_all(b"and now")?;
    ensure!(
        raw::read_exactly(&mut open, 7)? == b"and now",
        "the established connection after the second reload"
    );
    ensure!(
        attached_id(&spliced)? == attached_at_start,
        "the XDP program on eth0 changed across the reloads"
    );
    drop(open);
    let mut spliced = spliced;
    let status = spliced.terminate(IO)?;
    ensure!(status.success(), "spliced exited with {status}");
    ensure!(
        spliced.stderr_text().contains("xdp counters: "),
        "the counters are logged at exit"
    );
    expect_nothing_on_eth0(&world, "after spliced exited")
}

/// A SYN flood from one source is cut to its rate while another source keeps connecting; the
/// counters add up to what was sent.
#[test]
fn syn_flood_is_cut_to_the_rate_while_others_connect() -> Result<()> {
    const RATE: u64 = 50;
    const BURST: u64 = 20;
    const FLOOD: u64 = 3000;
    let (world, _echo, spliced) = setup(&format!(
        "syn_rate_per_source = {RATE}\nsyn_burst = {BURST}"
    ))?;
    let before = spliced.metrics()?;
    let IpAddr::V4(src) = CLIENT_V4 else {
        bail!("the client address is IPv4");
    };
    let IpAddr::V4(dst) = PROXY_V4 else {
        bail!("the proxy address is IPv4");
    };
    let started = Instant::now();
    let flooder = std::thread::scope(|scope| -> Result<u64> {
        let flood = scope.spawn(|| {
            world.within(Ns::Client, || {
                packets::send_syns_v4(src, dst, 443, 20_000, FLOOD, Duration::from_secs(5))
            })
        });
        // Meanwhile another source connects, several times.
        for _ in 0..5 {
            served(&world, Ns::Client, CLIENT_V4_B, proxy4(443))
                .context("the second source during the flood")?;
        }
        match flood.join() {
            Ok(r) => r?,
            Err(_) => bail!("the flood thread panicked"),
        }
    })?;
    let elapsed = started.elapsed().as_secs_f64();
    ensure!(flooder == FLOOD, "sent {flooder} of {FLOOD} SYNs");
    let after = spliced.metrics()?;
    let dropped = counter(&after, "dropped_rate")? - counter(&before, "dropped_rate")?;
    // The source may send BURST at once and RATE per second after that (plus one for the
    // unlocked bucket's race between CPUs).
    let allowed_max = BURST + (RATE as f64 * (elapsed + 1.0)) as u64 + 2;
    eprintln!(
        "{FLOOD} SYNs in {elapsed:.2}s: {dropped} dropped by the rate limit (at most {allowed_max} \
         may pass)"
    );
    ensure!(
        dropped >= FLOOD - allowed_max && dropped <= FLOOD - BURST,
        "dropped {dropped} of {FLOOD} SYNs; expected between {} and {}",
        FLOOD - allowed_max,
        FLOOD - BURST
    );
    Ok(())
}

/// Packets the parser must skip or judge carefully: IPv4 with options, IPv6 behind extension
/// headers and VLAN-tagged frames from a denied source are dropped; truncated headers pass
/// (the stack drops them) and are counted as unparsed. spliced keeps serving throughout.
#[test]
fn options_extension_headers_vlan_and_truncated_packets() -> Result<()> {
    let (world, _echo, spliced) = setup(r#"deny = ["192.0.2.3/32", "2001:db8:bad::/48"]"#)?;
    let before = spliced.metrics()?;
    let IpAddr::V4(denied4) = CLIENT_V4_B else {
        bail!("IPv4 expected");
    };
    let IpAddr::V4(proxy) = PROXY_V4 else {
        bail!("IPv4 expected");
    };
    let denied6 = Ipv6Addr::new(0x2001, 0xdb8, 0xbad, 0, 0, 0, 0, 1);
    let IpAddr::V6(proxy_v6) = PROXY_V6 else {
        bail!("IPv6 expected");
    };
    let sent = world.within(Ns::Client, || -> Result<(u64, u64)> {
        let dst_mac = [0xff; 6];
        let src_mac = packets::mac_of("eth0")?;
        // IPv4 options: a short list of no-ops, and the longest header (60 bytes).
        let drop = [
            packets::syn_v4_with_options(denied4, proxy, 40_000, 443, 1, &[1, 1, 1, 1, 1, 1, 1, 0]),
            packets::syn_v4_with_options(denied4, proxy, 40_001, 443, 2, &[1; 40]),
        ];
        let mut frames: Vec<Vec<u8>> = drop
            .iter()
            .map(|p| packets::ethernet(dst_mac, src_mac, None, ETHERTYPE_IPV4, p))
            .collect();
        for ext in [
            vec![(0u8, 0usize)],
            vec![(0, 1), (60, 0)],
            vec![(60, 2), (43, 0), (60, 0)],
        ] {
            let p = packets::syn_v6_with_ext(denied6, proxy_v6, 40_002, 443, 3, &ext);
            frames.push(packets::ethernet(
                dst_mac,
                src_mac,
                None,
                ETHERTYPE_IPV6,
                &p,
            ));
        }
        let tagged = packets::syn_v4(denied4, proxy, 40_003, 443, 4);
        frames.push(packets::ethernet(
            dst_mac,
            src_mac,
            Some(7),
            ETHERTYPE_IPV4,
            &tagged,
        ));
        let to_drop = frames.len() as u64;
        // Truncated: an IPv4 header cut short, an IPv6 header cut short, a TCP header cut short.
        let whole = packets::syn_v4(denied4, proxy, 40_004, 443, 5);
        let v6 = packets::syn_v6(denied6, proxy_v6, 40_005, 443, 6);
        let truncated = vec![
            packets::ethernet(dst_mac, src_mac, None, ETHERTYPE_IPV4, &whole[..12]),
            packets::ethernet(dst_mac, src_mac, None, ETHERTYPE_IPV6, &v6[..30]),
            packets::ethernet(dst_mac, src_mac, None, ETHERTYPE_IPV4, &whole[..24]),
            packets::ethernet(dst_mac, src_mac, Some(7), ETHERTYPE_IPV4, &[]),
        ];
        let unparsed = truncated.len() as u64;
        frames.extend(truncated);
        packets::send_frames("eth0", &frames)?;
        Ok((to_drop, unparsed))
    })??;
    let (to_drop, unparsed) = sent;
    let delta = |after: &Metrics, name: &str| -> Result<u64> {
        Ok(counter(after, name)? - counter(&before, name)?)
    };
    // Frames on a veth arrive at once, but the counters are read from other CPUs' slots.
    let after = spliced.wait_metrics("the crafted frames to be counted", IO, |m| {
        Ok(delta(m, "dropped_deny")? >= to_drop && delta(m, "unparsed")? >= unparsed)
    })?;
    let delta = |name: &str| delta(&after, name);
    eprintln!("after the crafted frames:\n{after}");
    ensure!(
        delta("dropped_deny")? == to_drop,
        "dropped_deny rose by {}, expected {to_drop}",
        delta("dropped_deny")?
    );
    ensure!(
        delta("unparsed")? >= unparsed,
        "unparsed rose by {}, expected at least {unparsed}",
        delta("unparsed")?
    );
    served(&world, Ns::Client, CLIENT_V4, proxy4(443)).context("after the crafted frames")?;
    Ok(())
}

/// An interface that does not exist is a clear error naming it, and nothing stays attached to
/// the interfaces that did work; `mode = "generic"` attaches and filters too.
#[test]
fn attach_errors_name_the_interface_and_generic_mode_works() -> Result<()> {
    let world = World::new()?;
    let _echo = TestBackend::start(&world, ECHO_PORT, Behavior::Echo)?;
    let bad = config(r#"deny = ["192.0.2.3/32"]"#).replace(
        r#"interfaces = ["eth0", "eth1"]"#,
        r#"interfaces = ["eth0", "nosuch0"]"#,
    );
    let mut failed = Launch::new(bad).named("spliced-bad").start(&world, &[])?;
    wait_for("spliced to give up", IO, || {
        Ok(failed.check_running().is_err())
    })?;
    let said = failed.stderr_text();
    ensure!(
        said.contains("nosuch0") && said.contains("XDP"),
        "the error should name the interface: {said}"
    );
    expect_nothing_on_eth0(&world, "after the failed start")?;

    let generic = Launch::new(config("deny = [\"192.0.2.3/32\"]\nmode = \"generic\""))
        .start(&world, &[443, UNGUARDED])?;
    let net = bpftool(&generic, &["net", "show", "dev", "eth0"])?;
    ensure!(net.contains("generic"), "attached in generic mode: {net}");
    served(&world, Ns::Client, CLIENT_V4, proxy4(443))?;
    blocked(&world, Ns::Client, CLIENT_V4_B, proxy4(443))?;
    drop(generic);

    // Loopback has no native XDP: auto falls back to generic and says so.
    let on_lo = config("").replace(r#"interfaces = ["eth0", "eth1"]"#, r#"interfaces = ["lo"]"#);
    let lo = Launch::new(on_lo)
        .named("spliced-lo")
        .start(&world, &[443])?;
    let said = lo.stderr_text();
    ensure!(
        said.contains("using generic mode") && said.contains("interface=lo"),
        "auto on lo should fall back to generic mode, with a warning: {said}"
    );
    Ok(())
}

/// On an upgrade the old process detaches its filter and the new one attaches its own (an
/// interface takes one XDP link): the deny list holds before and after, an established
/// connection of the old process goes on, and the old process exits once it has ended.
#[test]
fn an_upgrade_hands_the_filter_to_the_new_process() -> Result<()> {
    let (world, _echo, mut old) = setup(r#"deny = ["192.0.2.3/32"]"#)?;
    let before = attached_id(&old)?;
    let mut open = connect_from(&world, Ns::Client, CLIENT_V4, proxy4(443))?;
    let hello = simple_hello("xdp.example");
    open.write_all(&hello)?;
    ensure!(raw::read_exactly(&mut open, hello.len())? == hello, "echo");
    blocked(&world, Ns::Client, CLIENT_V4_B, proxy4(443))?;

    let control = old.control_socket().context("no control socket")?;
    let new = Launch::new(config(r#"deny = ["192.0.2.3/32"]"#))
        .named("new")
        .arg("--upgrade-from")
        .arg(control)
        .arg("--control-socket")
        .arg(control)
        .start(&world, &[])?;
    wait_for("the upgrade", IO, || {
        Ok(new
            .stderr_text()
            .contains("upgrade: the old process stopped accepting"))
    })
    .with_context(|| new.stderr_text())?;
    let after = attached_id(&new)?;
    ensure!(
        after != before,
        "the XDP program on eth0 is still the old process's ({before})"
    );
    ensure!(
        !new.stderr_text().contains("ERROR"),
        "the new process logged an error: {}",
        new.stderr_text()
    );
    blocked(&world, Ns::Client, CLIENT_V4_B, proxy4(443))?;
    served(&world, Ns::Client, CLIENT_V4, proxy4(443))?;
    open.write_all(b"still here")?;
    ensure!(
        raw::read_exactly(&mut open, 10)? == b"still here",
        "the old process's connection after the upgrade"
    );
    open.shutdown(Shutdown::Write)?;
    let (rest, end) = raw::read_to_end(&mut open, 1 << 16);
    ensure!(rest.is_empty() && end == raw::End::Eof, "{end:?}");
    wait_for("the old process to exit", IO, || {
        Ok(old.check_running().is_err())
    })?;
    ensure!(
        attached_id(&new)? == after,
        "the filter changed when the old process exited"
    );
    blocked(&world, Ns::Client, CLIENT_V4_B, proxy4(443))?;
    Ok(())
}
