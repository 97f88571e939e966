//! Binding listeners: `SO_REUSEPORT` so several processes (or a restarted one) can share a
//! port, and IPv6 listeners that stay IPv6-only so `0.0.0.0:443` and `[::]:443` can coexist.
use std::net::SocketAddr;

use anyhow::{Context as _, Result};
use tokio::net::{TcpListener, TcpSocket};

/// Backlog for `listen(2)`; the kernel caps it at `net.core.somaxconn`.
const BACKLOG: u32 = 4096;

/// Binds and listens on `addr`. `packet_mss`, for a listener whose connections may use the
/// packet engine, is the MSS it announces (`TCP_MAXSEG`), and makes it save each client's SYN
/// (`TCP_SAVE_SYN`) for the engine to read (`docs/packet-engine.md`, 4.1).
pub fn bind(addr: SocketAddr, packet_mss: Option<u16>) -> Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .with_context(|| format!("creating a socket for {addr}"))?;
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    if addr.is_ipv6() {
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Ipv6V6Only, &true)
            .with_context(|| format!("setting IPV6_V6ONLY on {addr}"))?;
    }
    socket.set_nodelay(true)?;
    if let Some(mss) = packet_mss {
        use std::os::fd::AsFd as _;
        crate::packet::host::set_maxseg(socket.as_fd(), mss)
            .with_context(|| format!("setting TCP_MAXSEG {mss} on {addr}"))?;
        crate::packet::host::set_save_syn(socket.as_fd())
            .with_context(|| format!("setting TCP_SAVE_SYN on {addr}"))?;
    }
    socket
        .bind(addr)
        .with_context(|| format!("binding {addr}"))?;
    socket
        .listen(BACKLOG)
        .with_context(|| format!("listening on {addr}"))
}
