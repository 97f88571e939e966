//! What the packet engine needs from the host at start, and the socket options it sets: the
//! cgroup v2 directory spliced runs in (for the `sock_ops` recorder), the interfaces the TC
//! programs attach to and their smallest MTU, whether `TCP_REPAIR` is permitted, and
//! `TCP_MAXSEG`, `TCP_SAVE_SYN` and `TCP_SAVED_SYN` (`docs/packet-engine.md`, sections 4.1
//! and 8). Parsing is kept apart from reading the files, for tests.
use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use nix::libc;

/// Header room the translation needs: a 20-byte IPv4 header becomes a 40-byte IPv6 one, and
/// the TCP MSS excludes the IP (40) and TCP (20) headers of the larger of the two.
pub const MSS_ROOM: u32 = 60;

/// The cgroup v2 directory of this process: the `cgroup2` mount point from `mounts` (the text
/// of `/proc/self/mounts`) joined with the path of the `0::` line of `cgroup` (the text of
/// `/proc/self/cgroup`). The hierarchy may be mounted beside v1 controllers
/// (`/sys/fs/cgroup/unified`).
pub fn cgroup_v2_dir(mounts: &str, cgroup: &str) -> Result<PathBuf, String> {
    let mount = mounts
        .lines()
        .filter_map(|l| {
            let mut fields = l.split_whitespace();
            let (_, point, kind) = (fields.next()?, fields.next()?, fields.next()?);
            (kind == "cgroup2").then(|| unescape(point))
        })
        .next()
        .ok_or("no cgroup2 file system is mounted (cgroup v2 is needed for the ISN recorder)")?;
    let path = cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or("this process is in no cgroup v2 (no \"0::\" line in /proc/self/cgroup)")?;
    let relative = path.trim().trim_start_matches('/');
    // " (deleted)" or similar would point at nothing: refuse rather than attach elsewhere.
    if relative.split('/').any(|c| c == "..") {
        return Err(format!("unexpected cgroup path {path:?}"));
    }
    Ok(Path::new(&mount).join(relative))
}

/// `/proc/self/mounts` escapes space, tab, newline and backslash as octal (`\040`).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(octal) = field.get(i + 1..i + 4)
            && let Ok(value) = u8::from_str_radix(octal, 8)
        {
            out.push(value);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Where cgroup v2 is mounted when nothing is: `ip netns exec` gives its command a fresh
/// `/sys` without the host's cgroup mounts (in a mount namespace of its own).
const CGROUP2_MOUNT: &str = "/sys/fs/cgroup";

/// This process's cgroup v2 directory, read from `/proc/self`. When no cgroup2 file system is
/// mounted in this mount namespace, mounts one on `/sys/fs/cgroup` first (as `ip netns exec`
/// leaves it): the hierarchy is the same whoever mounts it.
pub fn own_cgroup() -> Result<PathBuf> {
    let read = || -> Result<(String, String)> {
        Ok((
            std::fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?,
            std::fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?,
        ))
    };
    let (mut mounts, mut cgroup) = read()?;
    if !mounts
        .lines()
        .any(|l| l.split_whitespace().nth(2) == Some("cgroup2"))
    {
        nix::mount::mount(
            Some("cgroup2"),
            CGROUP2_MOUNT,
            Some("cgroup2"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .with_context(|| {
            format!("no cgroup2 file system is mounted, and mounting one on {CGROUP2_MOUNT} failed")
        })?;
        tracing::info!("mounted cgroup2 on {CGROUP2_MOUNT} for the packet engine's ISN recorder");
        (mounts, cgroup) = read()?;
    }
    cgroup_v2_dir(&mounts, &cgroup).map_err(anyhow::Error::msg)
}

/// The interfaces to attach to: `configured` if not empty (each must exist), else every
/// interface that is up and has a global address, loopback excluded.
pub fn interfaces(configured: &[String]) -> Result<Vec<String>> {
    let addrs: Vec<_> = nix::ifaddrs::getifaddrs()
        .context("listing the network interfaces")?
        .collect();
    if !configured.is_empty() {
        for name in configured {
            if !addrs.iter().any(|a| &a.interface_name == name) {
                bail!("[packet] interfaces: no interface {name:?} in spliced's network namespace");
            }
        }
        return Ok(configured.to_vec());
    }
    let mut found: Vec<String> = Vec::new();
    for a in &addrs {
        use nix::net::if_::InterfaceFlags as F;
        let up = a.flags.contains(F::IFF_UP) && !a.flags.contains(F::IFF_LOOPBACK);
        let global = a.address.as_ref().is_some_and(|s| {
            if let Some(v4) = s.as_sockaddr_in() {
                let ip = v4.ip();
                !ip.is_loopback() && !ip.is_link_local() && !ip.is_unspecified()
            } else if let Some(v6) = s.as_sockaddr_in6() {
                let ip = v6.ip();
                !ip.is_loopback() && !ip.is_unicast_link_local() && !ip.is_unspecified()
            } else {
                false
            }
        });
        if up && global && !found.contains(&a.interface_name) {
            found.push(a.interface_name.clone());
        }
    }
    if found.is_empty() {
        bail!("[packet]: no interface is up with a global address to attach the programs to");
    }
    Ok(found)
}

/// The smallest MTU among `interfaces` (from `/sys/class/net`, which `ip netns exec` mounts
/// for the namespace).
pub fn smallest_mtu(interfaces: &[String]) -> Result<u32> {
    let mut smallest = u32::MAX;
    for name in interfaces {
        let path = format!("/sys/class/net/{name}/mtu");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let mtu: u32 = text
            .trim()
            .parse()
            .with_context(|| format!("{path} holds {text:?}, not a number"))?;
        smallest = smallest.min(mtu);
    }
    Ok(smallest)
}

/// The MSS listeners announce: `configured`, or the smallest MTU less [`MSS_ROOM`].
pub fn listener_mss(configured: Option<u16>, smallest_mtu: u32) -> Result<u16> {
    if let Some(mss) = configured.filter(|&m| m > 0) {
        return Ok(mss);
    }
    let mss = smallest_mtu.saturating_sub(MSS_ROOM);
    u16::try_from(mss)
        .ok()
        .filter(|&m| m >= 536)
        .with_context(|| format!("an MTU of {smallest_mtu} leaves no usable MSS; set [packet] mss"))
}

/// Tries `TCP_REPAIR` on a fresh socket: the handoff silences both local sockets with it, and
/// it needs `CAP_NET_ADMIN` in the socket's network namespace.
pub fn check_repair() -> Result<()> {
    let fd = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Stream,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("creating a socket to try TCP_REPAIR on")?;
    set_tcp_int(fd.as_fd(), libc::TCP_REPAIR, 1)
        .context("TCP_REPAIR is not permitted (the packet engine needs CAP_NET_ADMIN)")?;
    Ok(())
}

/// Sets `TCP_MAXSEG` (before `listen` or `connect`).
pub fn set_maxseg(fd: BorrowedFd<'_>, mss: u16) -> io::Result<()> {
    set_tcp_int(fd, libc::TCP_MAXSEG, i32::from(mss))
}

/// Sets `TCP_SAVE_SYN` on a listener: its connections keep the client's SYN for one read.
pub fn set_save_syn(fd: BorrowedFd<'_>) -> io::Result<()> {
    set_tcp_int(fd, libc::TCP_SAVE_SYN, 1)
}

/// Reads (and so frees) the SYN an accepted socket's listener saved; `None` if there is none
/// (a listener without `TCP_SAVE_SYN`, or read already).
pub fn saved_syn(fd: BorrowedFd<'_>) -> io::Result<Option<Vec<u8>>> {
    // IPv6 with 40 bytes of TCP options is 100 bytes; IPv4 options may add 40.
    let mut buf = vec![0u8; 512];
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `buf`, which is that large.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_SAVED_SYN,
            buf.as_mut_ptr().cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if len == 0 {
        return Ok(None);
    }
    buf.truncate(len as usize);
    Ok(Some(buf))
}

/// This namespace's `net.ipv4.tcp_ecn` (`enum tcp_ecn_mode`, 6.18): 3 asks for AccECN on
/// outgoing connections and takes it on incoming ones, 4 and 5 take it on incoming ones only.
/// Read when asked, as an operator may change it at any time; `None` if unreadable.
fn tcp_ecn() -> Option<u8> {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_ecn")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Whether a listener here answers a SYN that asks for AccECN with AccECN.
pub fn accecn_incoming() -> bool {
    matches!(tcp_ecn(), Some(3..=5))
}

/// Whether connections made from here ask for AccECN.
pub fn accecn_outgoing() -> bool {
    tcp_ecn() == Some(3)
}

/// `SIOCOUTQNSD` (`linux/sockios.h`): bytes in a socket's send queue not sent yet.
const SIOCOUTQNSD: libc::c_ulong = 0x894B;

/// Bytes a TCP socket holds that it has not sent even once (`SIOCOUTQNSD`).
pub fn unsent(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQNSD writes one int.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), SIOCOUTQNSD, &raw mut n) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    u64::try_from(n).map_err(|_| io::Error::other(format!("SIOCOUTQNSD returned {n}")))
}

fn set_tcp_int(fd: BorrowedFd<'_>, option: libc::c_int, value: i32) -> io::Result<()> {
    // SAFETY: the option reads one int, and we pass one with its size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            option,
            (&raw const value).cast(),
            size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTS: &str = "\
sysfs /sys sysfs rw,nosuid 0 0
tmpfs /sys/fs/cgroup tmpfs ro 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nosuid,nodev,noexec 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0
";

    #[test]
    fn finds_the_hybrid_mount_and_the_v2_path() {
        let cgroup = "12:memory:/user.slice\n0::/system.slice/spliced.service\n";
        assert_eq!(
            cgroup_v2_dir(MOUNTS, cgroup),
            Ok(PathBuf::from(
                "/sys/fs/cgroup/unified/system.slice/spliced.service"
            ))
        );
        assert_eq!(
            cgroup_v2_dir(MOUNTS, "0::/\n"),
            Ok(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn says_what_is_missing() {
        let v1_only = "cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n";
        assert!(cgroup_v2_dir(v1_only, "0::/\n").is_err_and(|e| e.contains("cgroup2")));
        assert!(cgroup_v2_dir(MOUNTS, "4:cpu:/x\n").is_err_and(|e| e.contains("0::")));
        assert!(cgroup_v2_dir(MOUNTS, "0::/a/../b\n").is_err());
    }

    #[test]
    fn unescapes_mount_points() {
        let mounts = "none /mnt/with\\040space cgroup2 rw 0 0\n";
        assert_eq!(
            cgroup_v2_dir(mounts, "0::/x\n"),
            Ok(PathBuf::from("/mnt/with space/x"))
        );
    }

    #[test]
    fn the_mss_leaves_room_for_the_bigger_header() {
        assert_eq!(listener_mss(None, 1500).ok(), Some(1440));
        assert_eq!(listener_mss(Some(1300), 1500).ok(), Some(1300));
        assert_eq!(listener_mss(Some(0), 9000).ok(), Some(8940));
        assert!(listener_mss(None, 500).is_err());
    }
}
