//! A backend process for `tests/chaos.rs` to kill: `dying-backend PORT HELLO_LEN`, run in the
//! test world's backend namespace, listens on `[2001:db8:1::10]:PORT`. For each connection it
//! reads the hello (`HELLO_LEN` bytes) and the chaos control record (magic, connection id,
//! downstream length), sends that many bytes of the connection's downstream stream, and then
//! stops reading. Once the client's upload waits unread in the socket's receive queue, it
//! prints `ready ID` on standard output. It never closes anything: the test kills it with
//! SIGKILL, and the kernel closes its sockets, with a reset since unread data is queued.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use nix::libc;
use spliced_tests::{BACKEND_V6, raw};

/// What a chaos control record starts with.
const MAGIC: u32 = 0x4348_414f;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, port, hello_len] = args.as_slice() else {
        bail!("usage: dying-backend PORT HELLO_LEN");
    };
    let port: u16 = port.parse().context("PORT")?;
    let hello_len: usize = hello_len.parse().context("HELLO_LEN")?;
    let listener = TcpListener::bind(SocketAddr::new(BACKEND_V6, port))
        .with_context(|| format!("binding port {port}"))?;
    let out = Arc::new(Mutex::new(std::io::stdout()));
    println!("listening");
    loop {
        let (stream, _) = listener.accept().context("accepting")?;
        let out = out.clone();
        std::thread::spawn(move || {
            let mut stream = stream;
            if let Err(e) = serve(&mut stream, hello_len, &out) {
                eprintln!("{e:#}");
            }
            // Hold the socket (and the thread) until the process is killed.
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        });
    }
}

fn serve(stream: &mut TcpStream, hello_len: usize, out: &Mutex<std::io::Stdout>) -> Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    stream.set_write_timeout(Some(Duration::from_secs(60)))?;
    let mut head = vec![0u8; hello_len + 16];
    stream.read_exact(&mut head).context("reading the hello")?;
    let control = &head[hello_len..];
    let word =
        |i: usize| u32::from_le_bytes([control[i], control[i + 1], control[i + 2], control[i + 3]]);
    ensure!(word(0) == MAGIC, "no chaos control record after the hello");
    let id = word(4);
    let down = u64::from(word(8)) | (u64::from(word(12)) << 32);
    raw::send_stream(stream, down_seed(id), down).context("sending")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while unread(stream)? == 0 {
        ensure!(
            Instant::now() < deadline,
            "connection {id}: no upload arrived"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut out = out
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    writeln!(out, "ready {id}")?;
    out.flush()?;
    Ok(())
}

/// The downstream seed of connection `id`, as `tests/chaos.rs` computes it.
fn down_seed(id: u32) -> u64 {
    std::env::var("SPLICED_CHAOS_DOWN_BASE")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        ^ u64::from(id).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Bytes waiting unread in the socket's receive queue (`FIONREAD`).
fn unread(stream: &TcpStream) -> Result<u64> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    let rc = unsafe { libc::ioctl(stream.as_raw_fd(), libc::FIONREAD, &raw mut n) };
    ensure!(rc == 0, "FIONREAD: {}", std::io::Error::last_os_error());
    Ok(u64::try_from(n).unwrap_or(0))
}
