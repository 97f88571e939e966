//! One spliced per network namespace and per pin directory.
//!
//! The listeners use `SO_REUSEPORT`, so a second instance would bind the same ports without
//! complaint and take part of the traffic; with sockmap it would also replace the first one's
//! pins as "stale" and remove the pin directory when it exits. So before binding, each address
//! is bound once without `SO_REUSEPORT` (which fails while anything listens there in this
//! network namespace), and the pin directory is locked with `flock` for the process's life.
//! Other network namespaces have their own ports, and their own bpffs under `ip netns exec`.
use std::{
    fs::File,
    net::SocketAddr,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Result, bail};
use nix::fcntl::{Flock, FlockArg};
use tokio::net::TcpSocket;

/// Fails, naming the process that listens there where it can be found, when anything already
/// listens on one of `addresses` in this network namespace.
pub fn check_addresses_free(addresses: &[SocketAddr]) -> Result<()> {
    for &address in addresses {
        let socket = if address.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }?;
        // SO_REUSEADDR only skips connections in TIME_WAIT; it never shares a listening port.
        socket.set_reuseaddr(true)?;
        if address.is_ipv6() {
            nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Ipv6V6Only, &true)?;
        }
        match socket.bind(address) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                let who = listener_of(address)
                    .map_or_else(|| "another process".to_owned(), |p| p.to_string());
                bail!(
                    "{address} is already in use by {who}; refusing to start a second instance \
                     beside it (stop it first)"
                );
            }
            Err(e) => bail!("checking that {address} is free: {e}"),
        }
    }
    Ok(())
}

/// A process, as far as `/proc` tells.
#[derive(Debug)]
pub struct Process {
    pid: u32,
    command: Option<String>,
}

impl std::fmt::Display for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.command {
            Some(command) => write!(f, "process {} ({command})", self.pid),
            None => write!(f, "process {}", self.pid),
        }
    }
}

fn process(pid: u32) -> Process {
    let command = std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|c| c.trim().to_owned());
    Process { pid, command }
}

/// The process holding a listening socket on `address` in this network namespace: its inode
/// from `/proc/net/tcp{,6}`, then the process with a descriptor for it.
fn listener_of(address: SocketAddr) -> Option<Process> {
    let table = if address.is_ipv4() {
        "/proc/net/tcp"
    } else {
        "/proc/net/tcp6"
    };
    let text = std::fs::read_to_string(table).ok()?;
    let inode = text
        .lines()
        .skip(1)
        .find_map(|line| listening_inode(line, address))?;
    socket_owner(inode)
}

/// The inode of the socket in one `/proc/net/tcp{,6}` line, if it listens on `address`'s port
/// (on `address`'s IP or on the wildcard, which is what keeps a bind from succeeding).
fn listening_inode(line: &str, address: SocketAddr) -> Option<u64> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let (local, state, inode) = (fields.get(1)?, fields.get(3)?, fields.get(9)?);
    // 0A is TCP_LISTEN.
    if *state != "0A" {
        return None;
    }
    let (_, port) = local.split_once(':')?;
    if u16::from_str_radix(port, 16).ok()? != address.port() {
        return None;
    }
    inode.parse().ok().filter(|&i| i != 0)
}

/// The first process with a descriptor for socket `inode`.
fn socket_owner(inode: u64) -> Option<Process> {
    let want = PathBuf::from(format!("socket:[{inode}]"));
    let me = std::process::id();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        if fds
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l == want))
        {
            return Some(process(pid));
        }
    }
    None
}

/// The pin directory, locked for as long as this lives.
pub struct PinLock {
    _lock: Flock<File>,
}

/// Locks the pin directory `dir` if it exists; `Ok(None)` if it does not yet (nobody owns
/// it then: an owner would have made it). Fails, naming the holder where it can, when
/// another process holds the lock.
pub fn lock_pin_dir(dir: &Path) -> Result<Option<PinLock>> {
    let Ok(file) = File::open(dir) else {
        return Ok(None);
    };
    let inode = file.metadata().map(|m| m.ino()).ok();
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(PinLock { _lock: lock })),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            let who = inode
                .and_then(flock_holder)
                .map_or_else(|| "another process".to_owned(), |p| p.to_string());
            bail!(
                "the pin directory {} is in use by {who}, another spliced; refusing to start a \
                 second instance that would replace its pins (use another --pin-dir, or stop it)",
                dir.display()
            )
        }
        Err((_, e)) => bail!("locking the pin directory {}: {e}", dir.display()),
    }
}

/// The process holding a `flock` on inode `inode`, from `/proc/locks`
/// (`1: FLOCK  ADVISORY  WRITE 1234 00:2a:5678 0 EOF`).
fn flock_holder(inode: u64) -> Option<Process> {
    let text = std::fs::read_to_string("/proc/locks").ok()?;
    text.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(1) != Some(&"FLOCK") {
            return None;
        }
        let pid = fields.get(4)?.parse().ok()?;
        let file_inode: u64 = fields.get(5)?.rsplit(':').next()?.parse().ok()?;
        (file_inode == inode).then(|| process(pid))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_listening_sockets_by_port() {
        let addr: SocketAddr = "0.0.0.0:443".parse().expect("addr");
        let listen = "   0: 00000000:01BB 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0";
        assert_eq!(listening_inode(listen, addr), Some(12345));
        let established = listen.replace(" 0A ", " 01 ");
        assert_eq!(listening_inode(&established, addr), None);
        let other: SocketAddr = "0.0.0.0:80".parse().expect("addr");
        assert_eq!(listening_inode(listen, other), None);
        assert_eq!(listening_inode("garbage", addr), None);
    }

    #[test]
    fn a_second_lock_on_the_same_directory_is_refused() {
        let dir = std::env::temp_dir().join(format!("spliced-pinlock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let first = lock_pin_dir(&dir).expect("first lock");
        assert!(first.is_some());
        let second = lock_pin_dir(&dir).err().expect("second lock refused");
        let text = second.to_string();
        assert!(
            text.contains(&format!("process {}", std::process::id())),
            "{text}"
        );
        drop(first);
        assert!(lock_pin_dir(&dir).expect("free again").is_some());
        let _ = std::fs::remove_dir(&dir);
        assert!(lock_pin_dir(&dir).expect("missing").is_none());
    }
}
