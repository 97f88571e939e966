//! The `splice(2)` engine: socket to pipe to socket, so the payload moves as page references
//! and never through a user-space buffer.
use std::{
    io,
    os::fd::{AsFd, OwnedFd},
    sync::Mutex,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
};

use nix::fcntl::{OFlag, SpliceFFlags, splice};
use tokio::{io::Interest, net::TcpStream};

use super::{ForwardError, Side, shutdown_write};

/// How much one `splice` call may move; also the pipe's capacity we ask for.
const CHUNK: usize = 1 << 20;

/// Empty pipes kept for the next connections. Making a pipe (`pipe2`, growing it, and two
/// `close`s later) is a large part of a short connection's cost; 64 pipes hold 128
/// descriptors and no data pages.
const POOL_MAX: usize = 64;

static POOL: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());

/// A pipe for one direction: taken from [`POOL`] (or made) when bytes are there, and given
/// back only once drained. One dropped any other way (an error, or the other direction
/// failing) may hold another connection's bytes, so it is closed, never reused.
struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
}

impl Pipe {
    fn take() -> io::Result<Pipe> {
        if let Some(pipe) = POOL.lock().ok().and_then(|mut pool| pool.pop()) {
            return Ok(pipe);
        }
        let (r, w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        // A bigger pipe means fewer syscalls per megabyte; failing to grow it (for example
        // past the per-user pipe page limit) only costs speed.
        let _ = nix::fcntl::fcntl(&w, nix::fcntl::FcntlArg::F_SETPIPE_SZ(CHUNK as i32));
        Ok(Pipe { r, w })
    }

    /// Keeps an empty pipe for the next connection, or closes it when the pool is full.
    fn give_back(self) {
        if let Ok(mut pool) = POOL.lock()
            && pool.len() < POOL_MAX
        {
            pool.push(self);
        }
    }
}

/// Forwards `from` to `to` until `from`'s end of stream, then half-closes `to`, unless `ended`
/// says the other direction already ended: the connection is closed next, and close() sends
/// the FIN itself (both receive queues are empty by then, so it cannot turn into a reset).
pub(crate) async fn one_way(
    from: &TcpStream,
    to: &TcpStream,
    from_side: Side,
    counter: &AtomicU64,
    ended: Option<&AtomicBool>,
) -> Result<(), ForwardError> {
    one_way_until(from, to, from_side, counter, ended, u64::MAX)
        .await
        .map(drop)
}

/// Where [`one_way_until`] stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stopped {
    /// `from`'s end of stream, passed on.
    Eof,
    /// `counter` reached the given mark with the pipe empty: every byte read from `from` was
    /// written to `to`, and another engine may take over from here.
    Reached,
}

/// As [`one_way`], but stops once `counter` has reached `until` at a point where the pipe is
/// empty, so the direction can be handed over without a byte in between.
pub(crate) async fn one_way_until(
    from: &TcpStream,
    to: &TcpStream,
    from_side: Side,
    counter: &AtomicU64,
    ended: Option<&AtomicBool>,
    until: u64,
) -> Result<Stopped, ForwardError> {
    if counter.load(Ordering::Relaxed) >= until {
        return Ok(Stopped::Reached);
    }
    let err_from = |error| from_side.failed(error);
    let err_to = |error| from_side.other().failed(error);
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    let fill = |pipe: &Pipe| {
        splice(from.as_fd(), None, pipe.w.as_fd(), None, CHUNK, flags).map_err(io::Error::from)
    };
    // A pipe is held only while bytes are there, so an idle connection holds its two sockets
    // and nothing else. Readiness alone does not prove there are bytes (the hello reader leaves
    // the client socket marked readable after its last read): a first splice that finds
    // nothing gives the pipe back to the pool and waits for the socket.
    let (pipe, mut n) = loop {
        from.readable().await.map_err(err_from)?;
        let pipe = Pipe::take().map_err(err_from)?;
        match from.try_io(Interest::READABLE, || fill(&pipe)) {
            Ok(n) => break (pipe, n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => pipe.give_back(),
            Err(e) => return Err(err_from(e)),
        }
    };
    loop {
        if n == 0 {
            pipe.give_back();
            if !ended.is_some_and(|other| other.swap(true, Ordering::AcqRel)) {
                shutdown_write(to).map_err(err_to)?;
            }
            return Ok(Stopped::Eof);
        }
        // Drain the pipe completely before reading more, so bytes keep their order and a
        // half-close is only passed on after the last of them.
        let mut left = n;
        while left > 0 {
            left -= to
                .async_io(Interest::WRITABLE, || {
                    splice(pipe.r.as_fd(), None, to.as_fd(), None, left, flags)
                        .map_err(io::Error::from)
                })
                .await
                .map_err(err_to)?;
        }
        if counter.fetch_add(n as u64, Ordering::Relaxed) + n as u64 >= until {
            pipe.give_back();
            return Ok(Stopped::Reached);
        }
        n = from
            .async_io(Interest::READABLE, || fill(&pipe))
            .await
            .map_err(err_from)?;
    }
}

/// As [`one_way`], until `stop` turns true: then it returns [`Stopped::Reached`] at the next
/// point where its pipe is empty, so that every byte read from `from` has been written to
/// `to` (the packet engine's freeze). After each chunk, `moved` says whether enough bytes
/// moved both ways for the caller to stop every direction.
pub(crate) async fn one_way_until_stopped(
    from: &TcpStream,
    to: &TcpStream,
    from_side: Side,
    counter: &AtomicU64,
    ended: Option<&AtomicBool>,
    stop: &tokio::sync::watch::Sender<bool>,
    moved: &(dyn Fn() -> bool + Sync),
) -> Result<Stopped, ForwardError> {
    let err_from = |error| from_side.failed(error);
    let err_to = |error| from_side.other().failed(error);
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    let mut stopped = stop.subscribe();
    loop {
        if *stopped.borrow_and_update() {
            return Ok(Stopped::Reached);
        }
        tokio::select! {
            r = from.readable() => r.map_err(err_from)?,
            _ = stopped.changed() => continue,
        }
        let pipe = Pipe::take().map_err(err_from)?;
        let n = match from.try_io(Interest::READABLE, || {
            splice(from.as_fd(), None, pipe.w.as_fd(), None, CHUNK, flags).map_err(io::Error::from)
        }) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                pipe.give_back();
                continue;
            }
            Err(e) => return Err(err_from(e)),
        };
        if n == 0 {
            pipe.give_back();
            if !ended.is_some_and(|other| other.swap(true, Ordering::AcqRel)) {
                shutdown_write(to).map_err(err_to)?;
            }
            return Ok(Stopped::Eof);
        }
        let mut left = n;
        while left > 0 {
            left -= to
                .async_io(Interest::WRITABLE, || {
                    splice(pipe.r.as_fd(), None, to.as_fd(), None, left, flags)
                        .map_err(io::Error::from)
                })
                .await
                .map_err(err_to)?;
        }
        pipe.give_back();
        counter.fetch_add(n as u64, Ordering::Relaxed);
        if moved() {
            stop.send_replace(true);
        }
    }
}

/// Forwards what `from` already holds (at most `limit` bytes), without waiting for more:
/// splices until a read finds nothing, writing each chunk out whole (waiting for `to` if it
/// must). Returns [`Stopped::Eof`] if `from`'s end of stream was among it (then passed on as
/// [`one_way`] does), else [`Stopped::Reached`]. The packet engine freezes after it, so that
/// what the peers already sent goes through spliced's counts rather than the drain.
pub(crate) async fn queued(
    from: &TcpStream,
    to: &TcpStream,
    from_side: Side,
    counter: &AtomicU64,
    ended: Option<&AtomicBool>,
    limit: u64,
) -> Result<Stopped, ForwardError> {
    let err_from = |error| from_side.failed(error);
    let err_to = |error| from_side.other().failed(error);
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    let mut moved = 0u64;
    while moved < limit {
        let pipe = Pipe::take().map_err(err_from)?;
        let n = match splice(from.as_fd(), None, pipe.w.as_fd(), None, CHUNK, flags) {
            Ok(n) => n,
            Err(nix::errno::Errno::EAGAIN) => {
                pipe.give_back();
                break;
            }
            Err(e) => return Err(err_from(e.into())),
        };
        if n == 0 {
            pipe.give_back();
            if !ended.is_some_and(|other| other.swap(true, Ordering::AcqRel)) {
                shutdown_write(to).map_err(err_to)?;
            }
            return Ok(Stopped::Eof);
        }
        let mut left = n;
        while left > 0 {
            left -= to
                .async_io(Interest::WRITABLE, || {
                    splice(pipe.r.as_fd(), None, to.as_fd(), None, left, flags)
                        .map_err(io::Error::from)
                })
                .await
                .map_err(err_to)?;
        }
        pipe.give_back();
        counter.fetch_add(n as u64, Ordering::Relaxed);
        moved += n as u64;
    }
    Ok(Stopped::Reached)
}
