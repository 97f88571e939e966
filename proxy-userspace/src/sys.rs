//! Socket options and ioctls that nix does not wrap, each checked for the length the kernel
//! wrote back, so a kernel that returns less than we expect is an error rather than zeros.
use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
};

use nix::libc;

/// Reads a fixed-size socket option into `T`, failing unless the kernel wrote at least
/// `needed` bytes of it (the leading fields the caller reads).
///
/// # Safety
/// `T` must be plain data for which any bit pattern is valid.
unsafe fn getsockopt_raw<T>(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    needed: usize,
) -> io::Result<T> {
    // SAFETY: the caller guarantees T is plain data; zeroes are a valid value of it.
    let mut value: T = unsafe { std::mem::zeroed() };
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `value`, which is that large.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw mut value).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if (len as usize) < needed {
        return Err(io::Error::other(format!(
            "getsockopt({level}, {name}) returned {len} bytes, expected at least {needed}"
        )));
    }
    Ok(value)
}

/// The kernel's cookie for a socket: stable for its life, the key in every socket map.
pub fn socket_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    // SAFETY: u64 is plain data.
    unsafe { getsockopt_raw(fd, libc::SOL_SOCKET, libc::SO_COOKIE, size_of::<u64>()) }
}

/// What a TCP socket has moved, in payload bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpCounts {
    /// Handed to TCP for sending: acknowledged by the peer plus still in the send queue.
    pub handed: u64,
    /// Received in order from the peer, whether read yet or not, plus one for its FIN once
    /// that arrived (TCP counts the FIN's sequence number).
    pub received: u64,
    /// The connection is gone (`TCP_CLOSE`: reset, or closed both ways): nothing more can be
    /// sent on it.
    pub closed: bool,
}

/// Reads a socket's [`TcpCounts`].
///
/// `connected_here` says whether this socket sent the SYN (`connect`, not `accept`): the
/// kernel counts the acknowledgement of our own SYN in `tcpi_bytes_acked`, which is one more
/// than the data, while an accepted socket's count starts at its first data byte.
pub fn tcp_counts(fd: BorrowedFd<'_>, connected_here: bool) -> io::Result<TcpCounts> {
    // `tcpi_bytes_received` is the later of the two fields: insist the kernel wrote it.
    let needed = std::mem::offset_of!(libc::tcp_info, tcpi_bytes_received) + size_of::<u64>();
    // SAFETY: tcp_info is plain data.
    let info: libc::tcp_info =
        unsafe { getsockopt_raw(fd, libc::IPPROTO_TCP, libc::TCP_INFO, needed)? };
    let acked = info
        .tcpi_bytes_acked
        .saturating_sub(u64::from(connected_here));
    Ok(TcpCounts {
        handed: acked + unsent_bytes(fd)?,
        received: info.tcpi_bytes_received,
        closed: info.tcpi_state == TCP_CLOSE,
    })
}

/// `TCP_CLOSE` in `include/net/tcp_states.h`: a socket that is no longer connected.
pub const TCP_CLOSE: u8 = 7;

/// A TCP socket's state (`tcpi_state`, numbered as in `include/net/tcp_states.h`).
pub fn tcp_state(fd: BorrowedFd<'_>) -> io::Result<u8> {
    // SAFETY: tcp_info is plain data.
    let info: libc::tcp_info = unsafe { getsockopt_raw(fd, libc::IPPROTO_TCP, libc::TCP_INFO, 1)? };
    Ok(info.tcpi_state)
}

/// Bytes in a socket's send queue not yet acknowledged (`SIOCOUTQ`).
fn unsent_bytes(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut outq: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one int.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &raw mut outq) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    u64::try_from(outq).map_err(|_| io::Error::other(format!("SIOCOUTQ returned {outq}")))
}

/// Sets a socket's send buffer to `bytes` (the kernel doubles it for bookkeeping), past
/// `net.core.wmem_max` where the process may (`SO_SNDBUFFORCE`, `CAP_NET_ADMIN`), and up to that
/// cap otherwise. This turns off the kernel's send-buffer autotuning for the socket.
pub fn set_send_buffer(fd: BorrowedFd<'_>, bytes: i32) -> io::Result<()> {
    match setsockopt_int(fd, libc::SO_SNDBUFFORCE, bytes) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            setsockopt_int(fd, libc::SO_SNDBUF, bytes)
        }
        other => other,
    }
}

/// Sets `SO_RCVLOWAT`; setting it makes TCP re-check its queue and wake the verdict program
/// for data that arrived before the socket was in the map.
pub fn set_rcvlowat(fd: impl AsFd, bytes: i32) -> io::Result<()> {
    setsockopt_int(fd.as_fd(), libc::SO_RCVLOWAT, bytes)
}

/// Sets a `SOL_SOCKET` option that takes one int.
fn setsockopt_int(fd: BorrowedFd<'_>, option: libc::c_int, value: i32) -> io::Result<()> {
    // SAFETY: the option reads one int, and we pass one with its size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&raw const value).cast(),
            size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    /// A connected pair on loopback: the options read back what the kernel says.
    #[test]
    fn options_on_a_connected_socket() -> io::Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let client = TcpStream::connect(listener.local_addr()?)?;
        let (server, _) = listener.accept()?;
        let a = socket_cookie(client.as_fd())?;
        let b = socket_cookie(server.as_fd())?;
        assert_ne!(a, 0);
        assert_ne!(a, b, "two sockets, two cookies");
        assert_eq!(socket_cookie(client.as_fd())?, a, "a cookie is stable");
        io::Write::write_all(&mut &client, b"12345")?;
        let mut buf = [0u8; 5];
        io::Read::read_exact(&mut &server, &mut buf)?;
        io::Write::write_all(&mut &server, b"123")?;
        let mut buf = [0u8; 3];
        io::Read::read_exact(&mut &client, &mut buf)?;
        // Acknowledged or queued, exactly the data each side wrote was handed to TCP, and
        // the other side counts it as received.
        let expect = |handed, received| TcpCounts {
            handed,
            received,
            closed: false,
        };
        assert_eq!(tcp_counts(client.as_fd(), true)?, expect(5, 3));
        assert_eq!(tcp_counts(server.as_fd(), false)?, expect(3, 5));
        // The FIN counts one.
        client.shutdown(std::net::Shutdown::Write)?;
        assert_eq!(io::Read::read(&mut &server, &mut buf)?, 0);
        assert_eq!(tcp_counts(server.as_fd(), false)?, expect(3, 6));
        set_rcvlowat(&server, 1)?;
        // A reset leaves the counts and says the connection is gone.
        nix::sys::socket::setsockopt(
            &client,
            nix::sys::socket::sockopt::Linger,
            &libc::linger {
                l_onoff: 1,
                l_linger: 0,
            },
        )?;
        drop(client);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !tcp_counts(server.as_fd(), false)?.closed {
            assert!(
                std::time::Instant::now() < deadline,
                "the reset never arrived"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        Ok(())
    }
}
