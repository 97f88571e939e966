//! A scriptable test backend in the backend namespace that records what each connection
//! received.

use std::{
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::{
    proxy_header::{ProxyHeader, detect_proxy_header},
    stream::{BLOCK, Verifier, send_stream},
};
use crate::{BACKEND_V6, Ns, World};

/// Seed of the stream clients send in bulk tests (after their hello).
pub const SEED_UP: u64 = 0x0123_4567_89ab_cdef;
/// Seed of the stream bulk backends send.
pub const SEED_DOWN: u64 = 0xfedc_ba98_7654_3210;
/// How many leading bytes of each connection a [`TestBackend`] keeps.
pub const RECORD_PREFIX: usize = 64 * 1024;

/// What a [`TestBackend`] does with each connection.
#[derive(Clone, Debug)]
pub enum Behavior {
    /// Echoes every byte after the PROXY header (if any) back, in order; when the proxy
    /// half-closes, finishes echoing and then shuts down its own write side.
    Echo,
    /// Skips the PROXY header (if any) and then `hello_len` bytes, then reads and verifies
    /// `bytes_each_way` bytes of the [`SEED_UP`] stream followed by end of stream, while
    /// concurrently sending `bytes_each_way` bytes of the [`SEED_DOWN`] stream and then
    /// shutting down its write side.
    Bulk {
        /// Bytes each way after the hello.
        bytes_each_way: u64,
        /// Length of the hello that precedes the client's stream.
        hello_len: usize,
    },
    /// Like [`Behavior::Bulk`], but starts sending only once the hello arrived in full: a
    /// client can hold both floods back until it sends the hello's last byte.
    BulkAfterHello {
        /// Bytes each way after the hello.
        bytes_each_way: u64,
        /// Length of the hello that precedes the client's stream.
        hello_len: usize,
    },
    /// Sends `greeting` right after accepting, before reading anything, then behaves like
    /// [`Behavior::Echo`].
    ServerFirst {
        /// What to send first.
        greeting: Vec<u8>,
    },
    /// Sends `greeting`, shuts down its write side at once (the backend half-closes first),
    /// then reads and records everything until the proxy's end of stream.
    ServerClosesFirst {
        /// What to send before the half-close.
        greeting: Vec<u8>,
    },
}

/// What one backend connection received.
#[derive(Clone, Default)]
pub struct ConnRecord {
    /// The proxy's address as the backend saw it.
    pub peer: Option<SocketAddr>,
    /// The first [`RECORD_PREFIX`] bytes received, PROXY header included.
    pub first: Vec<u8>,
    /// Every byte received, PROXY header included.
    pub total: u64,
    /// The PROXY header at the start, if there was one.
    pub proxy: Option<ProxyHeader>,
    /// Bytes sent back to the proxy.
    pub sent: u64,
    /// Whether the proxy's end of stream (read returning 0) was seen.
    pub saw_eof: bool,
    /// For [`Behavior::Bulk`]: stream bytes verified (after the hello).
    pub verified: u64,
    /// The connection's handler is done (successfully or not).
    pub finished: bool,
    /// What went wrong, if anything (I/O error, stream mismatch).
    pub error: Option<String>,
}

impl std::fmt::Debug for ConnRecord {
    /// Like a derived `Debug`, but shows only the first 48 received bytes (and their length),
    /// so failure messages stay readable.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = &self.first[..self.first.len().min(48)];
        f.debug_struct("ConnRecord")
            .field("peer", &self.peer)
            .field(
                "first",
                &format_args!("{} bytes, starting {shown:02x?}", self.first.len()),
            )
            .field("total", &self.total)
            .field("proxy", &self.proxy)
            .field("sent", &self.sent)
            .field("saw_eof", &self.saw_eof)
            .field("verified", &self.verified)
            .field("finished", &self.finished)
            .field("error", &self.error)
            .finish()
    }
}

impl ConnRecord {
    /// The recorded bytes after the PROXY header.
    pub fn payload(&self) -> &[u8] {
        let skip = self
            .proxy
            .as_ref()
            .map_or(0, |h| h.len)
            .min(self.first.len());
        &self.first[skip..]
    }
}

type Shared = Arc<Mutex<ConnRecord>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A TCP server in the backend namespace, on `[2001:db8:1::10]:port`, serving every
/// connection on its own thread with a [`Behavior`] and recording what arrived. Dropping it
/// stops accepting, shuts down open connections and joins the threads (bounded).
pub struct TestBackend {
    /// The address it listens on.
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    records: Arc<Mutex<Vec<Shared>>>,
    streams: Arc<Mutex<Vec<TcpStream>>>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
    acceptor: Option<JoinHandle<()>>,
}

/// How long a backend connection may wait for one read or write before giving up.
const IO_TIMEOUT: Duration = Duration::from_secs(120);

impl TestBackend {
    /// Binds `[2001:db8:1::10]:port` inside the world's backend namespace and starts serving.
    pub fn start(world: &World, port: u16, behavior: Behavior) -> Result<TestBackend> {
        let addr = SocketAddr::new(BACKEND_V6, port);
        let listener = world
            .within(Ns::Backend, move || TcpListener::bind(addr))?
            .with_context(|| format!("binding the test backend on {addr}"))?;
        // std listens with a backlog of 128; hundreds of simultaneous connections need more
        // (listen(2) again on a listening socket only changes the backlog).
        nix::sys::socket::listen(&listener, nix::sys::socket::Backlog::new(4096)?)
            .context("raising the test backend's listen backlog")?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let records: Arc<Mutex<Vec<Shared>>> = Arc::default();
        let streams: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let threads: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let acceptor = {
            let (stop, records, streams, threads) = (
                stop.clone(),
                records.clone(),
                streams.clone(),
                threads.clone(),
            );
            std::thread::Builder::new()
                .name(format!("backend-{port}"))
                .spawn(move || {
                    accept_loop(&listener, &behavior, &stop, &records, &streams, &threads);
                })?
        };
        Ok(TestBackend {
            addr,
            stop,
            records,
            streams,
            threads,
            acceptor: Some(acceptor),
        })
    }

    /// A snapshot of every connection accepted so far, in accept order.
    pub fn connections(&self) -> Vec<ConnRecord> {
        lock(&self.records)
            .iter()
            .map(|r| lock(r).clone())
            .collect()
    }

    /// Waits up to `timeout` until at least `n` connections have finished; returns the
    /// snapshot.
    pub fn wait_finished(&self, n: usize, timeout: Duration) -> Result<Vec<ConnRecord>> {
        let deadline = Instant::now() + timeout;
        loop {
            let conns = self.connections();
            if conns.iter().filter(|c| c.finished).count() >= n {
                return Ok(conns);
            }
            if Instant::now() >= deadline {
                bail!(
                    "timed out after {timeout:?}: {} of {n} backend connections finished \
                     ({} accepted)",
                    conns.iter().filter(|c| c.finished).count(),
                    conns.len()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for TestBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        for stream in lock(&self.streams).drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let threads: Vec<JoinHandle<()>> = lock(&self.threads).drain(..).collect();
        for thread in threads {
            while !thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if thread.is_finished() {
                let _ = thread.join();
            }
        }
    }
}

fn accept_loop(
    listener: &TcpListener,
    behavior: &Behavior,
    stop: &AtomicBool,
    records: &Mutex<Vec<Shared>>,
    streams: &Mutex<Vec<TcpStream>>,
    threads: &Mutex<Vec<JoinHandle<()>>>,
) {
    while !stop.load(Ordering::SeqCst) {
        let (stream, peer) = match listener.accept() {
            Ok(pair) => pair,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
            Err(_) => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        let record: Shared = Arc::new(Mutex::new(ConnRecord {
            peer: Some(peer),
            ..ConnRecord::default()
        }));
        lock(records).push(record.clone());
        if let Ok(clone) = stream.try_clone() {
            lock(streams).push(clone);
        }
        let behavior = behavior.clone();
        let spawned = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || {
                let result = serve(stream, &behavior, &record);
                let mut r = lock(&record);
                if let Err(e) = result {
                    r.error = Some(format!("{e:#}"));
                }
                r.finished = true;
            });
        if let Ok(handle) = spawned {
            let mut threads = lock(threads);
            threads.retain(|t| !t.is_finished());
            threads.push(handle);
        }
    }
}

/// Reads into `buf`, recording the bytes; returns what `read` returned.
fn read_recorded(stream: &mut TcpStream, buf: &mut [u8], record: &Shared) -> io::Result<usize> {
    let n = loop {
        match stream.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => break other?,
        }
    };
    let mut r = lock(record);
    if n == 0 {
        r.saw_eof = true;
    } else {
        r.total += n as u64;
        let room = RECORD_PREFIX.saturating_sub(r.first.len()).min(n);
        r.first.extend_from_slice(&buf[..room]);
    }
    Ok(n)
}

/// Reads until the PROXY header question is decided. Returns the bytes read after the header
/// (to be treated as payload) and whether the peer already closed.
fn read_preface(stream: &mut TcpStream, record: &Shared) -> Result<(Vec<u8>, bool)> {
    let mut head = Vec::new();
    let mut buf = vec![0u8; BLOCK];
    loop {
        let n = read_recorded(stream, &mut buf, record)?;
        head.extend_from_slice(&buf[..n]);
        match detect_proxy_header(&head)? {
            Some(header) => {
                let skip = header.as_ref().map_or(0, |h| h.len);
                if head.len() < skip {
                    if n == 0 {
                        bail!("connection closed inside the PROXY header");
                    }
                    continue;
                }
                lock(record).proxy = header;
                return Ok((head.split_off(skip), n == 0));
            }
            // A prefix of a PROXY signature and then end of stream: it was payload after all.
            None if n == 0 => return Ok((head, true)),
            None => {}
        }
    }
}

fn write_counted(stream: &mut TcpStream, data: &[u8], record: &Shared) -> io::Result<()> {
    stream.write_all(data)?;
    lock(record).sent += data.len() as u64;
    Ok(())
}

fn serve(mut stream: TcpStream, behavior: &Behavior, record: &Shared) -> Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.set_nodelay(true)?;
    match behavior {
        Behavior::Echo => echo(&mut stream, record),
        Behavior::ServerFirst { greeting } => {
            write_counted(&mut stream, greeting, record)?;
            echo(&mut stream, record)
        }
        Behavior::ServerClosesFirst { greeting } => {
            write_counted(&mut stream, greeting, record)?;
            stream.shutdown(Shutdown::Write)?;
            let (_, mut closed) = read_preface(&mut stream, record)?;
            let mut buf = vec![0u8; BLOCK];
            while !closed {
                closed = read_recorded(&mut stream, &mut buf, record)? == 0;
            }
            Ok(())
        }
        Behavior::Bulk {
            bytes_each_way,
            hello_len,
        } => bulk(stream, *bytes_each_way, *hello_len, false, record),
        Behavior::BulkAfterHello {
            bytes_each_way,
            hello_len,
        } => bulk(stream, *bytes_each_way, *hello_len, true, record),
    }
}

fn echo(stream: &mut TcpStream, record: &Shared) -> Result<()> {
    let (first, closed) = read_preface(stream, record)?;
    write_counted(stream, &first, record)?;
    if !closed {
        let mut buf = vec![0u8; BLOCK];
        loop {
            let n = read_recorded(stream, &mut buf, record)?;
            if n == 0 {
                break;
            }
            write_counted(stream, &buf[..n], record)?;
        }
    }
    stream.shutdown(Shutdown::Write)?;
    Ok(())
}

fn bulk(
    mut stream: TcpStream,
    bytes: u64,
    hello_len: usize,
    after_hello: bool,
    record: &Shared,
) -> Result<()> {
    let mut sender_stream = stream.try_clone()?;
    let sender_record = record.clone();
    let (hello_done, hello_arrived) = std::sync::mpsc::channel::<()>();
    let sender = std::thread::Builder::new()
        .name("bulk-send".into())
        .spawn(move || {
            // A closed channel (the receiving side gave up) ends the wait too.
            if after_hello && hello_arrived.recv().is_err() {
                return Ok(());
            }
            let result = send_stream(&mut sender_stream, SEED_DOWN, bytes)
                .and_then(|()| sender_stream.shutdown(Shutdown::Write));
            if result.is_ok() {
                lock(&sender_record).sent = bytes;
            }
            result
        })?;
    let received = (|| -> Result<()> {
        let (mut first, mut closed) = read_preface(&mut stream, record)?;
        let mut buf = vec![0u8; BLOCK];
        // The hello may still be arriving.
        while first.len() < hello_len && !closed {
            let n = read_recorded(&mut stream, &mut buf, record)?;
            closed = n == 0;
            first.extend_from_slice(&buf[..n]);
        }
        if first.len() < hello_len {
            bail!(
                "connection closed after {} of the {hello_len} hello bytes",
                first.len()
            );
        }
        let _ = hello_done.send(());
        let mut verifier = Verifier::new(SEED_UP, bytes);
        verifier.feed(&first[hello_len..])?;
        while !closed {
            let n = read_recorded(&mut stream, &mut buf, record)?;
            closed = n == 0;
            verifier.feed(&buf[..n])?;
            lock(record).verified = verifier.received();
        }
        lock(record).verified = verifier.received();
        verifier.finish()
    })();
    if received.is_err() {
        // Unblock the sender so the thread ends.
        let _ = stream.shutdown(Shutdown::Both);
    }
    let sent = sender
        .join()
        .map_err(|_| anyhow::anyhow!("the bulk sender panicked"))?;
    received?;
    sent.context("sending the bulk stream")?;
    Ok(())
}
