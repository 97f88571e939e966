//! The access log: one line per connection, `key=value` pairs, on standard output.
//!
//! The outcome names are the ones the metrics use ([`crate::outcome`]), so a line can be matched
//! to a counter.
//!
//! Connection tasks never write to standard output themselves: a slow reader of the pipe would
//! then stall every connection on the runtime's threads. They queue each line ([`Log::write`]);
//! one writer thread drains the queue, and a full queue drops the line and counts it.
use std::{
    fmt::Write as _,
    io::{self, Write},
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc::{Receiver, SyncSender, TrySendError, sync_channel},
    },
    time::{Duration, Instant},
};

use crate::preface::UniqueId;

/// Lines that may wait for the writer: a few MiB at most, and seconds of a burst at the
/// connection rates this proxy sees, before lines are dropped.
const QUEUE_LINES: usize = 16 * 1024;

/// Bytes the writer gathers from the queue into one `write`.
const BATCH_BYTES: usize = 64 * 1024;

/// How long the writer lets lines gather after a write. While it waits, queueing a line is a
/// plain enqueue; while it blocks for the next line, each line costs the connection's thread a
/// wake-up of the writer, and the writer a context switch of its own. (Not measured on its
/// own: it went in with the change that made every connection's task smaller.)
const GATHER: Duration = Duration::from_millis(2);

/// How long dropping a [`Log`] waits for its queued lines to be written.
const DROP_FLUSH_LIMIT: Duration = Duration::from_secs(5);

/// What the writer thread is handed.
enum Message {
    /// One line, newline included.
    Line(String),
    /// Answer on this channel once every line queued before it is written.
    Flush(SyncSender<()>),
}

/// A non-blocking access-log sink: a bounded queue drained by one writer thread.
///
/// Lines never interleave (one thread writes them, each whole), and they keep their order.
/// Dropping the log waits a few seconds for queued lines to be written, so a process that
/// returns from `main` does not lose its last connections' lines.
pub struct Log {
    queue: SyncSender<Message>,
    dropped: AtomicU64,
}

impl Log {
    /// A log to standard output.
    pub fn stdout() -> io::Result<Log> {
        Log::new(QUEUE_LINES, io::stdout())
    }

    /// A log to `out` that holds at most `capacity` lines waiting for the writer.
    pub fn new(capacity: usize, out: impl Write + Send + 'static) -> io::Result<Log> {
        let (queue, lines) = sync_channel(capacity);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(&lines, out))?;
        Ok(Log {
            queue,
            dropped: AtomicU64::new(0),
        })
    }

    /// Queues `entry`'s line; if the queue is full, drops it and counts it instead of waiting.
    pub fn write(&self, entry: &Entry<'_>) {
        let mut line = entry.line();
        line.push('\n');
        if self.queue.try_send(Message::Line(line)).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Lines dropped so far because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Waits until every line queued before this call is written, for at most `limit`; says
    /// whether it was. Blocks the calling thread.
    pub fn flush(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let (done, written) = sync_channel(1);
        let mut message = Message::Flush(done);
        // The queue may be full of lines: wait for room, but not past the deadline.
        loop {
            match self.queue.try_send(message) {
                Ok(()) => break,
                Err(TrySendError::Full(m)) if Instant::now() < deadline => {
                    message = m;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(_) => return false,
            }
        }
        written
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .is_ok()
    }
}

impl Drop for Log {
    fn drop(&mut self) {
        self.flush(DROP_FLUSH_LIMIT);
    }
}

/// The writer thread: writes queued lines in batches until every sender is gone.
fn write_lines(queue: &Receiver<Message>, mut out: impl Write) {
    let mut batch = Vec::with_capacity(BATCH_BYTES);
    let mut flushes = Vec::new();
    while let Ok(first) = queue.recv() {
        let mut next = Some(first);
        while let Some(message) = next {
            match message {
                Message::Line(line) => batch.extend_from_slice(line.as_bytes()),
                Message::Flush(done) => flushes.push(done),
            }
            next = if batch.len() < BATCH_BYTES {
                queue.try_recv().ok()
            } else {
                None
            };
        }
        // Nothing to do about a failed write to standard output but to go on: a connection's
        // outcome is still counted in the metrics.
        let _ = out.write_all(&batch).and_then(|()| out.flush());
        batch.clear();
        for done in flushes.drain(..) {
            let _ = done.send(());
        }
        std::thread::sleep(GATHER);
    }
}

/// Everything known about a connection when it ends.
#[derive(Debug, Default)]
pub struct Entry<'a> {
    /// The client's address: as the proxy saw it, or as a trusted balancer's PROXY header
    /// announced it.
    pub client: Option<SocketAddr>,
    /// The balancer whose PROXY header announced `client` (the connection's own peer); only
    /// on connections from an `accept_proxy` source whose header carried addresses.
    pub via: Option<SocketAddr>,
    /// The listener's local address.
    pub listener: Option<SocketAddr>,
    /// The requested name (SNI or Host), if any.
    pub name: Option<&'a str>,
    /// ALPN protocols the client offered, comma-separated.
    pub alpn: Option<&'a str>,
    /// The site that served it.
    pub site: Option<&'a str>,
    /// The backend address connected to.
    pub backend: Option<SocketAddr>,
    /// `none`, `v1` or `v2`.
    pub proxy_protocol: &'a str,
    /// Forwarding engine used.
    pub engine: Option<&'a str>,
    /// Bytes from the client to the backend (hello included, PROXY header excluded; with the
    /// `http` engine, the requests as sent on, forwarding lines included).
    pub bytes_up: u64,
    /// Bytes from the backend to the client.
    pub bytes_down: u64,
    /// Time from accept to close.
    pub duration: Duration,
    /// `ok`, or the reason it ended early.
    pub outcome: &'a str,
    /// Extra detail for failures (an OS error message).
    pub detail: Option<&'a str>,
    /// The connection's id, when one was made for its PROXY header (`PP2_TYPE_UNIQUE_ID`): the
    /// same 32 hex digits the backend received, so its log and ours can be joined.
    pub id: Option<UniqueId>,
    /// Requests forwarded on the connection, when its engine framed them (`http`).
    pub requests: Option<u64>,
}

impl Entry<'_> {
    /// Formats the line (without a newline). Values with spaces or quotes are quoted.
    ///
    /// Every value is written straight into the line (this runs once per connection, so no
    /// string per field); only a value that needs quoting is formatted a second time.
    pub fn line(&self) -> String {
        let mut s = String::with_capacity(256);
        field(&mut s, "client", Dash(self.client));
        if let Some(via) = self.via {
            field(&mut s, "via", via);
        }
        field(&mut s, "listener", Dash(self.listener));
        field(&mut s, "name", Dash(self.name));
        field(&mut s, "alpn", Dash(self.alpn));
        field(&mut s, "site", Dash(self.site));
        field(&mut s, "backend", Dash(self.backend));
        field(&mut s, "proxy", self.proxy_protocol);
        field(&mut s, "engine", Dash(self.engine));
        field(&mut s, "up", self.bytes_up);
        field(&mut s, "down", self.bytes_down);
        field(&mut s, "ms", self.duration.as_millis());
        if let Some(requests) = self.requests {
            field(&mut s, "requests", requests);
        }
        field(&mut s, "outcome", self.outcome);
        if let Some(id) = self.id {
            field(&mut s, "id", id);
        }
        if let Some(detail) = self.detail {
            field(&mut s, "detail", detail);
        }
        s.pop();
        s
    }
}

/// An optional value, written as `-` when absent.
struct Dash<T>(Option<T>);

impl<T: std::fmt::Display> std::fmt::Display for Dash<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(v) => v.fmt(f),
            None => f.write_str("-"),
        }
    }
}

/// Appends `key=value ` to `line`, quoting the value when it is empty or holds a space, a quote
/// or an `=`.
fn field(line: &mut String, key: &str, value: impl std::fmt::Display) {
    line.push_str(key);
    line.push('=');
    let start = line.len();
    let _ = write!(line, "{value}");
    let written = &line[start..];
    if written.is_empty() || written.contains([' ', '"', '=']) {
        let quoted = format!("{written:?}");
        line.truncate(start);
        line.push_str(&quoted);
    }
    line.push(' ');
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex, mpsc};

    use super::*;

    /// A writer that keeps what it is given, and can be held still to fill the queue.
    #[derive(Clone)]
    struct Held {
        written: Arc<Mutex<Vec<u8>>>,
        /// Each write first reports that it started, then waits for a go.
        started: SyncSender<()>,
        go: Arc<Mutex<Receiver<()>>>,
    }

    impl Write for Held {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            let _ = self.started.send(());
            let _ = self.go.lock().expect("go").recv();
            self.written
                .lock()
                .expect("written")
                .extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn entry(name: &str) -> Entry<'_> {
        Entry {
            name: Some(name),
            outcome: "ok",
            proxy_protocol: "none",
            ..Default::default()
        }
    }

    /// With the writer stuck, the queue fills and further lines are dropped and counted, never
    /// waited for; once it moves, every queued line comes out whole and in order.
    #[test]
    fn full_queue_drops_and_counts_lines() {
        let (started, writes) = sync_channel(16);
        let (go, wait) = mpsc::channel();
        let out = Held {
            written: Arc::default(),
            started,
            go: Arc::new(Mutex::new(wait)),
        };
        let log = Log::new(2, out.clone()).expect("writer thread");
        log.write(&entry("first.example"));
        // The writer took the first line and is stuck writing it: the queue is empty again.
        writes.recv().expect("first write");
        for name in [
            "second.example",
            "third.example",
            "fourth.example",
            "fifth.example",
        ] {
            log.write(&entry(name));
        }
        assert_eq!(log.dropped(), 2);
        // One go per write; spare ones are harmless.
        for _ in 0..8 {
            go.send(()).expect("go");
        }
        assert!(log.flush(Duration::from_secs(10)));
        let text = String::from_utf8(out.written.lock().expect("written").clone()).expect("utf-8");
        let names: Vec<&str> = text
            .lines()
            .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("name=")))
            .collect();
        assert_eq!(names, ["first.example", "second.example", "third.example"]);
    }

    #[test]
    fn id_is_written_when_one_was_made() {
        let mut e = entry("a.example");
        assert!(!e.line().contains("id="));
        e.id = Some(UniqueId::from_u128(
            0x0123_4567_89ab_cdef_0011_2233_4455_6677,
        ));
        assert!(
            e.line()
                .ends_with("outcome=ok id=0123456789abcdef0011223344556677"),
            "{}",
            e.line()
        );
    }

    #[test]
    fn line_has_every_field_and_quotes_spaces() {
        let e = Entry {
            client: Some("192.0.2.2:40000".parse().unwrap_or_else(|_| unreachable!())),
            name: Some("a.example"),
            outcome: "backend_unreachable",
            detail: Some("Connection refused (os error 111)"),
            proxy_protocol: "v2",
            ..Default::default()
        };
        assert_eq!(
            e.line(),
            "client=192.0.2.2:40000 listener=- name=a.example alpn=- site=- backend=- proxy=v2 \
             engine=- up=0 down=0 ms=0 outcome=backend_unreachable \
             detail=\"Connection refused (os error 111)\""
        );
    }

    #[test]
    fn via_follows_the_client_when_a_balancer_announced_it() {
        let addr = |s: &str| s.parse().ok();
        let e = Entry {
            client: addr("203.0.113.7:40000"),
            via: addr("198.51.100.2:51000"),
            outcome: "ok",
            proxy_protocol: "none",
            ..Default::default()
        };
        assert!(
            e.line()
                .starts_with("client=203.0.113.7:40000 via=198.51.100.2:51000 listener=-"),
            "{}",
            e.line()
        );
    }

    /// Values a client controls (the requested name) cannot forge a field: an empty value,
    /// an `=` or a quote is quoted and escaped.
    #[test]
    fn client_controlled_values_are_quoted() {
        let e = Entry {
            name: Some("a=b \"c\""),
            alpn: Some(""),
            outcome: "ok",
            proxy_protocol: "none",
            ..Default::default()
        };
        let line = e.line();
        assert!(
            line.contains(r#"name="a=b \"c\"" alpn="" site=-"#),
            "{line}"
        );
    }
}
