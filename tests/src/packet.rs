//! Helpers of the packet engine's tests (`tests/tests/packet_*.rs`): sockets with the options
//! the engine sets, `TCP_INFO` and repair-mode reads, segment counters of a namespace, and a
//! cgroup (v2) of the test's own for the `sock_ops` program.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    sync::Mutex,
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use nix::libc;

use crate::{Ns, World};

/// Read and write timeout of every socket: a hang fails instead of blocking the suite.
pub const IO: Duration = Duration::from_secs(10);

/// Only one test at a time may move the process between cgroups: hold it while a
/// [`TestCgroup`] lives.
pub static CGROUP: Mutex<()> = Mutex::new(());

/// `TCP_REPAIR` (`linux/tcp.h`): 1 enters repair mode, -1 leaves it without a window probe.
pub const TCP_REPAIR: i32 = 19;
const TCP_REPAIR_QUEUE: i32 = 20;
const TCP_QUEUE_SEQ: i32 = 21;
const TCP_RECV_QUEUE: i32 = 1;
const TCP_SEND_QUEUE: i32 = 2;
/// `TCP_ESTABLISHED` in `include/net/tcp_states.h`.
pub const TCP_ESTABLISHED: u8 = 1;

/// Sets an integer socket option.
pub fn set_int(fd: i32, level: i32, option: i32, value: i32) -> Result<()> {
    // SAFETY: the option reads one int.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            option,
            (&raw const value).cast(),
            size_of::<i32>() as libc::socklen_t,
        )
    };
    ensure!(
        rc == 0,
        "setsockopt({level}, {option}, {value}): {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// Reads a plain-data socket option, failing unless the kernel wrote all of `T`.
pub fn get<T: Copy>(fd: i32, level: i32, option: i32) -> Result<T> {
    // SAFETY: only used with plain-data `T` (integers, `tcp_info`).
    let mut value: T = unsafe { std::mem::zeroed() };
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `value`.
    let rc = unsafe { libc::getsockopt(fd, level, option, (&raw mut value).cast(), &raw mut len) };
    ensure!(
        rc == 0,
        "getsockopt({level}, {option}): {}",
        std::io::Error::last_os_error()
    );
    ensure!(
        len as usize == size_of::<T>(),
        "getsockopt({level}, {option}) wrote {len} bytes, expected {}",
        size_of::<T>()
    );
    Ok(value)
}

/// The socket's cookie (`SO_COOKIE`).
pub fn cookie(s: &TcpStream) -> Result<u64> {
    get(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_COOKIE)
}

/// The socket's `TCP_INFO`.
pub fn tcp_info(s: &TcpStream) -> Result<libc::tcp_info> {
    get(s.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_INFO)
}

/// Puts the socket in repair mode (for good: leaving it sends a window probe) and reads the
/// next sequence number it would send (`write_seq`) and the next it expects (`rcv_nxt`).
pub fn repair_seqs(s: &TcpStream) -> Result<(u32, u32)> {
    let fd = s.as_raw_fd();
    set_int(fd, libc::IPPROTO_TCP, TCP_REPAIR, 1).context("entering TCP repair mode")?;
    set_int(fd, libc::IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)?;
    let snd = get::<u32>(fd, libc::IPPROTO_TCP, TCP_QUEUE_SEQ)?;
    set_int(fd, libc::IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)?;
    let rcv = get::<u32>(fd, libc::IPPROTO_TCP, TCP_QUEUE_SEQ)?;
    Ok((snd, rcv))
}

/// A TCP socket of `addr`'s family, with `TCP_MAXSEG` set to `mss` if given.
pub fn tcp_socket(addr: SocketAddr, mss: Option<i32>) -> Result<OwnedFd> {
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket creation; the descriptor is owned at once.
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    if let Some(mss) = mss {
        set_int(fd.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_MAXSEG, mss)?;
    }
    Ok(fd)
}

/// `addr` as a C socket address and its length.
pub fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is valid.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in and suitably aligned.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// A listener on `addr` with `TCP_MAXSEG` = `mss` set before `listen()`, if given.
pub fn listener(addr: SocketAddr, mss: Option<i32>) -> Result<TcpListener> {
    let fd = tcp_socket(addr, mss)?;
    set_int(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    let (sa, len) = sockaddr(addr);
    // SAFETY: `sa` holds a valid address of `len` bytes.
    let rc = unsafe { libc::bind(fd.as_raw_fd(), (&raw const sa).cast(), len) };
    ensure!(rc == 0, "bind {addr}: {}", std::io::Error::last_os_error());
    // SAFETY: a bound socket.
    let rc = unsafe { libc::listen(fd.as_raw_fd(), 16) };
    ensure!(
        rc == 0,
        "listen {addr}: {}",
        std::io::Error::last_os_error()
    );
    Ok(TcpListener::from(fd))
}

/// A socket connected to `addr`, with `TCP_MAXSEG` = `mss` set before `connect()`, if given.
pub fn connect(addr: SocketAddr, mss: Option<i32>) -> Result<TcpStream> {
    let fd = tcp_socket(addr, mss)?;
    let (sa, len) = sockaddr(addr);
    // SAFETY: `sa` holds a valid address of `len` bytes.
    let rc = unsafe { libc::connect(fd.as_raw_fd(), (&raw const sa).cast(), len) };
    ensure!(
        rc == 0,
        "connect {addr}: {}",
        std::io::Error::last_os_error()
    );
    let s = TcpStream::from(fd);
    s.set_read_timeout(Some(IO))?;
    s.set_write_timeout(Some(IO))?;
    Ok(s)
}

/// One connection from namespace `from` to a listener on `addr` in namespace `to`: the
/// connecting socket and the accepted one. `listen_mss` and `connect_mss` set `TCP_MAXSEG`.
pub fn connection(
    world: &World,
    (from, connect_mss): (Ns, Option<i32>),
    (to, listen_mss): (Ns, Option<i32>),
    addr: SocketAddr,
) -> Result<(TcpStream, TcpStream)> {
    let l = world.within(to, || listener(addr, listen_mss))??;
    let active = world.within(from, || connect(addr, connect_mss))??;
    let (passive, _) = l.accept()?;
    passive.set_read_timeout(Some(IO))?;
    passive.set_write_timeout(Some(IO))?;
    Ok((active, passive))
}

/// Sends `n` bytes from `a` to `b` and reads them there.
pub fn exchange(a: &mut TcpStream, b: &mut TcpStream, n: usize) -> Result<()> {
    let data = vec![0x5a; n];
    std::thread::scope(|s| -> Result<()> {
        let writer = s.spawn(|| a.write_all(&data));
        let mut got = vec![0; n];
        b.read_exact(&mut got)?;
        writer
            .join()
            .map_err(|_| anyhow::anyhow!("writer panicked"))??;
        ensure!(got == data, "bytes changed in transit");
        Ok(())
    })
}

/// TCP segments the namespace received and sent (`Tcp: InSegs`, `OutSegs` of `/proc/net/snmp`).
pub fn segments(world: &World, ns: Ns) -> Result<(u64, u64)> {
    Ok((
        tcp_stat(world, ns, "InSegs")?,
        tcp_stat(world, ns, "OutSegs")?,
    ))
}

/// One `Tcp:` counter of the namespace's `/proc/net/snmp` (`InSegs`, `InCsumErrors`...).
pub fn tcp_stat(world: &World, ns: Ns, name: &str) -> Result<u64> {
    proc_net_stat(world, ns, "snmp", "Tcp:", name)
}

/// One `TcpExt:` counter of the namespace's `/proc/net/netstat` (`TCPSACKDiscard`...).
pub fn tcp_ext_stat(world: &World, ns: Ns, name: &str) -> Result<u64> {
    proc_net_stat(world, ns, "netstat", "TcpExt:", name)
}

/// Counter `name` of the `prefix` lines (a line of names, then one of values) of
/// `/proc/net/FILE` in the namespace.
fn proc_net_stat(world: &World, ns: Ns, file: &str, prefix: &str, name: &str) -> Result<u64> {
    let path = format!("/proc/net/{file}");
    let out = world.command(ns, "cat").arg(&path).output()?;
    ensure!(out.status.success(), "reading {path} in {ns:?}");
    let text = String::from_utf8(out.stdout)?;
    let mut tcp = text.lines().filter(|l| l.starts_with(prefix));
    let (Some(names), Some(values)) = (tcp.next(), tcp.next()) else {
        bail!("no {prefix} lines in {path}: {text}");
    };
    let i = names
        .split_whitespace()
        .position(|n| n == name)
        .with_context(|| format!("no {name} in {names}"))?;
    values
        .split_whitespace()
        .nth(i)
        .with_context(|| format!("no value {i} in {values}"))?
        .parse()
        .with_context(|| format!("{name} in {values}"))
}

/// The cgroup v2 hierarchy's mount point (here `/sys/fs/cgroup/unified` beside the v1
/// controllers; `/sys/fs/cgroup` on a pure v2 host).
pub fn cgroup2_root() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, kind) = (f.next()?, f.next()?, f.next()?);
            (kind == "cgroup2").then(|| PathBuf::from(dir))
        })
        .context("no cgroup2 hierarchy is mounted: the packet engine's sock_ops program needs one")
}

/// A cgroup (v2) made for this test, holding this whole process while it lives; dropping it
/// moves the process back where it was and removes the cgroup.
pub struct TestCgroup {
    dir: PathBuf,
    home: PathBuf,
}

impl TestCgroup {
    /// Creates the cgroup and moves this process into it.
    pub fn enter() -> Result<TestCgroup> {
        let root = cgroup2_root()?;
        let own = std::fs::read_to_string("/proc/self/cgroup")?;
        let rel = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .context("this process has no cgroup v2 entry in /proc/self/cgroup")?;
        let home = root.join(rel.trim_start_matches('/'));
        let dir = root.join(format!("spliced-packet-facts-{}", std::process::id()));
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let cg = TestCgroup { dir, home };
        std::fs::write(cg.dir.join("cgroup.procs"), std::process::id().to_string())
            .with_context(|| format!("moving this process into {}", cg.dir.display()))?;
        Ok(cg)
    }

    /// The cgroup's directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(
            self.home.join("cgroup.procs"),
            std::process::id().to_string(),
        );
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// `TCP_TIMESTAMP`: the socket's timestamp clock now (the low bit flags microseconds).
pub const TCP_TIMESTAMP: i32 = 24;

/// The socket's timestamp clock, and that clock less `CLOCK_MONOTONIC` in milliseconds, as
/// spliced reads them at handoff (never early: the low bit the kernel clears is set again,
/// and the clock is read first).
pub fn socket_clock(s: &TcpStream) -> Result<spliced::SocketClock> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is valid for writing.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let mono = (ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000) as u32;
    let now: u32 = get(s.as_raw_fd(), libc::IPPROTO_TCP, TCP_TIMESTAMP)?;
    Ok(spliced::SocketClock {
        offset: (now | 1).wrapping_sub(mono),
        now: now | 1,
    })
}

/// A made-up connection `n` for tests of the tables alone (no interface, no traffic): its
/// client port and the proxy's backend port tell it apart, and its cookies are `n` and
/// `n + 1000`.
pub fn sample_handoff(n: u16) -> spliced::Handoff {
    spliced::Handoff {
        client: format!("192.0.2.2:{}", 40000 + n).parse().expect("address"),
        front: "192.0.2.1:443".parse().expect("address"),
        back: format!("[2001:db8:1::1]:{}", 50000 + n)
            .parse()
            .expect("address"),
        backend: "[2001:db8:1::10]:443".parse().expect("address"),
        client_isns: proxy_common::IsnPair {
            local_isn: 1000,
            peer_isn: 2000,
        },
        backend_isns: proxy_common::IsnPair {
            local_isn: 3000,
            peer_isn: 4000,
        },
        read_from_client: 517,
        written_to_backend: 517,
        read_from_backend: 0,
        written_to_client: 0,
        client_wscale: spliced::Wscale { snd: 7, rcv: 7 },
        backend_wscale: spliced::Wscale { snd: 7, rcv: 7 },
        client_ifindex: 1,
        backend_ifindex: 1,
        flow_label: 0,
        client_ecn: false,
        backend_ecn: false,
        client_timestamps: true,
        backend_timestamps: true,
        client_sack: true,
        backend_sack: true,
        client_clock: spliced::SocketClock::default(),
        backend_clock: spliced::SocketClock::default(),
        client_cookie: u64::from(n),
        backend_cookie: u64::from(n) + 1000,
        started_ns: 0,
    }
}
