//! The `splice(2)` engine: socket to pipe to socket, so the payload moves as page references
//! and never through a user-space buffer.
use std::{
    io,
    os::fd::{AsFd, OwnedFd},
    sync::atomic::{AtomicU64, Ordering},
};

use nix::fcntl::{OFlag, SpliceFFlags, splice};
use tokio::{io::Interest, net::TcpStream};

use super::{ForwardError, Side, shutdown_write};

/// How much one `splice` call may move; also the pipe's capacity we ask for.
const CHUNK: usize = 1 << 20;

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
    // A bigger pipe means fewer syscalls per megabyte; failing to grow it only costs speed.
    let _ = nix::fcntl::fcntl(&w, nix::fcntl::FcntlArg::F_SETPIPE_SZ(CHUNK as i32));
    Ok((r, w))
}

pub(crate) async fn one_way(
    from: &TcpStream,
    to: &TcpStream,
    from_side: Side,
    counter: &AtomicU64,
) -> Result<(), ForwardError> {
    let err_from = |error| from_side.failed(error);
    let err_to = |error| from_side.other().failed(error);
    // The pipe is made when the first bytes can be read: an idle connection then holds two
    // descriptors instead of six, and no pipe buffers.
    from.readable().await.map_err(err_from)?;
    let (pipe_r, pipe_w) = pipe().map_err(err_from)?;
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    loop {
        let n = from
            .async_io(Interest::READABLE, || {
                splice(from.as_fd(), None, pipe_w.as_fd(), None, CHUNK, flags)
                    .map_err(io::Error::from)
            })
            .await
            .map_err(err_from)?;
        if n == 0 {
            return shutdown_write(to).map_err(err_to);
        }
        // Drain the pipe completely before reading more, so bytes keep their order and a
        // half-close is only passed on after the last of them.
        let mut left = n;
        while left > 0 {
            left -= to
                .async_io(Interest::WRITABLE, || {
                    splice(pipe_r.as_fd(), None, to.as_fd(), None, left, flags)
                        .map_err(io::Error::from)
                })
                .await
                .map_err(err_to)?;
        }
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}
