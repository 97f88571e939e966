//! The user-space engine: read into a buffer, write it out. Last resort, and the reference the
//! other engines are tested against.
use std::{
    io,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
};

use tokio::{io::Interest, net::TcpStream};

use super::{ForwardError, Side, shutdown_write};

const BUFFER: usize = 64 * 1024;

pub(super) async fn one_way(
    from: &TcpStream,
    to: &TcpStream,
    from_side: Side,
    counter: &AtomicU64,
    ended: Option<&AtomicBool>,
) -> Result<(), ForwardError> {
    let err_from = |error| from_side.failed(error);
    let err_to = |error| from_side.other().failed(error);
    // The buffer is made once there is something to put in it: idle connections hold none.
    first_bytes(from).await.map_err(err_from)?;
    let mut buf = vec![0u8; BUFFER];
    loop {
        from.readable().await.map_err(err_from)?;
        let n = match from.try_read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(err_from(e)),
        };
        if n == 0 {
            // Everything before the FIN has been written: pass the half-close on, unless the
            // other direction ended first and the connection is closed next (see splice).
            if ended.is_some_and(|other| other.swap(true, Ordering::AcqRel)) {
                return Ok(());
            }
            return shutdown_write(to).map_err(err_to);
        }
        let mut sent = 0;
        while sent < n {
            sent += to
                .async_io(Interest::WRITABLE, || to.try_write(&buf[sent..n]))
                .await
                .map_err(err_to)?;
        }
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Waits until `from` has bytes to read or has reached its end of stream, without consuming
/// anything, so that an idle connection holds no buffer. A plain readiness wait would not do:
/// the hello reader leaves the client socket marked readable after its last successful read.
/// (Splice needs no peek: a pipe that finds nothing goes back to its pool.)
async fn first_bytes(from: &TcpStream) -> io::Result<()> {
    let mut probe = [0u8; 1];
    from.peek(&mut probe).await.map(|_| ())
}
