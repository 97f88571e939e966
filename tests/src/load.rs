//! Clients that make connections without pause while something happens to spliced (reloads,
//! an upgrade), and count what failed.
//!
//! Each connection sends a TLS ClientHello for one of the given names and a few KiB of a
//! positional stream, half-closes, and must get every byte back from an echo backend, in
//! order, followed by a clean end. Anything else (refused, reset, a byte wrong, a timeout) is
//! a failure, and the first few are kept with their reason.
use std::{
    io::Write as _,
    net::{Shutdown, SocketAddr, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};

use crate::{
    Ns, PROXY_V4, World,
    raw::{self, Stream, simple_hello},
    world::in_netns,
};

/// The stream each connection sends after its hello.
const SEED: u64 = 0x5eed_10ad;
/// How many bytes of it.
const PAYLOAD: usize = 4096;
/// How long one connection may take (connect, and each read or write).
const IO: Duration = Duration::from_secs(10);
/// How many failure reasons are kept.
const KEPT: usize = 10;

/// What a [`ClientLoop`] did.
#[derive(Clone, Debug, Default)]
pub struct Counts {
    /// Connections started.
    pub attempted: u64,
    /// Connections that did not get every byte back and a clean end.
    pub failed: u64,
    /// The first failures' reasons.
    pub reasons: Vec<String>,
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} attempted, {} failed", self.attempted, self.failed)?;
        for r in &self.reasons {
            write!(f, "\n  {r}")?;
        }
        Ok(())
    }
}

/// Client threads in the client namespace, each connecting to the proxy's `port` one
/// connection after the other, until stopped, `max_each` connections or `max_time`.
pub struct ClientLoop {
    stop: Arc<AtomicBool>,
    attempted: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    reasons: Arc<Mutex<Vec<String>>>,
    threads: Vec<JoinHandle<()>>,
}

impl ClientLoop {
    /// Starts `threads` clients; connection `i` of a thread names `names[i % names.len()]`.
    pub fn start(
        world: &World,
        port: u16,
        names: &[&str],
        threads: usize,
        max_each: u64,
        max_time: Duration,
    ) -> Result<ClientLoop> {
        ensure!(!names.is_empty(), "no names to connect with");
        let hellos: Arc<[Vec<u8>]> = names.iter().map(|n| simple_hello(n)).collect();
        let payload: Arc<[u8]> = Stream::prefix(SEED, PAYLOAD).into();
        let netns = world.name(Ns::Client).to_owned();
        let mut this = ClientLoop {
            stop: Arc::default(),
            attempted: Arc::default(),
            failed: Arc::default(),
            reasons: Arc::default(),
            threads: Vec::new(),
        };
        let deadline = Instant::now() + max_time;
        for t in 0..threads {
            let (stop, attempted, failed, reasons) = (
                Arc::clone(&this.stop),
                Arc::clone(&this.attempted),
                Arc::clone(&this.failed),
                Arc::clone(&this.reasons),
            );
            let (hellos, payload, netns) =
                (Arc::clone(&hellos), Arc::clone(&payload), netns.clone());
            this.threads.push(
                std::thread::Builder::new()
                    .name(format!("client-loop-{t}"))
                    .spawn(move || {
                        let run = || {
                            for i in 0..max_each {
                                if stop.load(Ordering::Relaxed) || Instant::now() >= deadline {
                                    return;
                                }
                                attempted.fetch_add(1, Ordering::Relaxed);
                                let hello = &hellos[i as usize % hellos.len()];
                                if let Err(e) = one_connection(port, hello, &payload) {
                                    failed.fetch_add(1, Ordering::Relaxed);
                                    let mut kept = reasons
                                        .lock()
                                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                                    if kept.len() < KEPT {
                                        kept.push(format!("thread {t}, connection {i}: {e:#}"));
                                    }
                                }
                            }
                        };
                        if let Err(e) = in_netns(Some(&netns), run) {
                            failed.fetch_add(1, Ordering::Relaxed);
                            let mut kept = reasons
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner);
                            kept.push(format!("thread {t}: {e:#}"));
                        }
                    })
                    .context("starting a client thread")?,
            );
        }
        Ok(this)
    }

    /// Connections started so far.
    pub fn attempted(&self) -> u64 {
        self.attempted.load(Ordering::Relaxed)
    }

    /// Connections failed so far.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// Stops the clients after their current connection and returns the counts.
    pub fn stop(mut self) -> Counts {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        Counts {
            attempted: self.attempted(),
            failed: self.failed(),
            reasons: self
                .reasons
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
        }
    }
}

impl Drop for ClientLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// One connection: hello and payload out, half-close, the same bytes back and a clean end.
fn one_connection(port: u16, hello: &[u8], payload: &[u8]) -> Result<()> {
    let addr = SocketAddr::new(PROXY_V4, port);
    let mut stream = TcpStream::connect_timeout(&addr, IO).context("connecting")?;
    stream.set_read_timeout(Some(IO))?;
    stream.set_write_timeout(Some(IO))?;
    stream.set_nodelay(true)?;
    let mut out = Vec::with_capacity(hello.len() + payload.len());
    out.extend_from_slice(hello);
    out.extend_from_slice(payload);
    stream.write_all(&out).context("sending")?;
    stream.shutdown(Shutdown::Write).context("half-closing")?;
    let (got, end) = raw::read_to_end(&mut stream, out.len() + 1);
    ensure!(
        got == out && end == raw::End::Eof,
        "got {} of {} bytes back, then {end:?} ({})",
        got.len(),
        out.len(),
        raw::difference(&got, &out)
    );
    Ok(())
}
