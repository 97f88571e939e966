//! The access log: one line per connection, `key=value` pairs (or one JSON object with the same
//! keys), on standard output or in a file that SIGUSR1 reopens (for logrotate).
//!
//! The outcome names are the ones the metrics use ([`crate::outcome`]), so a line can be matched
//! to a counter.
//!
//! Connection tasks never write to the output themselves: a slow reader of the pipe would
//! then stall every connection on the runtime's threads. They queue each line ([`Log::write`]);
//! one writer thread drains the queue, and a full queue drops the line and counts it. With one
//! writer, lines never interleave, whatever the number of worker threads.
use std::{
    fmt::Write as _,
    fs::File,
    io::{self, Write},
    net::SocketAddr,
    path::{Path, PathBuf},
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

/// How each line is written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Format {
    /// `key=value` pairs separated by spaces ([`Entry::line`]).
    #[default]
    Text,
    /// One JSON object per line, with the same keys ([`Entry::json`]).
    Json,
}

/// What the writer thread is handed.
enum Message {
    /// One line, newline included.
    Line(String),
    /// Answer on this channel once every line queued before it is written.
    Flush(SyncSender<()>),
    /// Write what came before to the current file, then open the file's path anew.
    Reopen,
}

/// Where the writer writes.
enum Target {
    /// Standard output, or any writer (tests): reopening does nothing.
    Writer(Box<dyn Write + Send>),
    /// A file opened for appending, reopened by path on [`Log::reopen`].
    File { path: PathBuf, file: File },
}

impl Target {
    fn out(&mut self) -> &mut dyn Write {
        match self {
            Target::Writer(w) => w,
            Target::File { file, .. } => file,
        }
    }

    /// Opens the file's path again (logrotate moved the old one away); on failure, keeps
    /// writing to the file it had, so no line is lost.
    fn reopen(&mut self) {
        let Target::File { path, file } = self else {
            tracing::info!("SIGUSR1: the access log goes to standard output; nothing to reopen");
            return;
        };
        match open_append(path) {
            Ok(new) => {
                *file = new;
                tracing::info!(path = %path.display(), "access log reopened");
            }
            Err(e) => tracing::error!(
                path = %path.display(),
                "reopening the access log failed; still writing to the file open before: {e}"
            ),
        }
    }
}

/// Opens `path` for appending, creating it readable by its owner and group only (client
/// addresses are personal data).
fn open_append(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .open(path)
}

/// A non-blocking access-log sink: a bounded queue drained by one writer thread.
///
/// Lines never interleave (one thread writes them, each whole), and they keep their order.
/// Dropping the log waits a few seconds for queued lines to be written, so a process that
/// returns from `main` does not lose its last connections' lines.
pub struct Log {
    queue: SyncSender<Message>,
    dropped: AtomicU64,
    format: Format,
}

impl Log {
    /// A log to standard output.
    pub fn stdout(format: Format) -> io::Result<Log> {
        Log::with_target(QUEUE_LINES, Target::Writer(Box::new(io::stdout())), format)
    }

    /// A log appended to the file at `path` (created if missing), which [`Log::reopen`] opens
    /// anew.
    pub fn file(path: &Path, format: Format) -> io::Result<Log> {
        let file = open_append(path)?;
        let target = Target::File {
            path: path.to_path_buf(),
            file,
        };
        Log::with_target(QUEUE_LINES, target, format)
    }

    /// A text log to `out` that holds at most `capacity` lines waiting for the writer.
    #[cfg(test)]
    pub fn new(capacity: usize, out: impl Write + Send + 'static) -> io::Result<Log> {
        Log::with_target(capacity, Target::Writer(Box::new(out)), Format::Text)
    }

    fn with_target(capacity: usize, target: Target, format: Format) -> io::Result<Log> {
        let (queue, lines) = sync_channel(capacity);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(&lines, target))?;
        Ok(Log {
            queue,
            dropped: AtomicU64::new(0),
            format,
        })
    }

    /// Queues `entry`'s line; if the queue is full, drops it and counts it instead of waiting.
    pub fn write(&self, entry: &Entry<'_>) {
        let mut line = match self.format {
            Format::Text => entry.line(),
            Format::Json => entry.json(),
        };
        line.push('\n');
        if self.queue.try_send(Message::Line(line)).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Has the writer open the log file's path anew once the lines queued before are written
    /// (to the old file): after logrotate's `mv`, later lines go to the new file and none to
    /// the old one. Blocks while the queue is full. The writer logs when it is done.
    pub fn reopen(&self) {
        let _ = self.queue.send(Message::Reopen);
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

/// Writes `batch` whole and empties it. Nothing to do about a failed write but to go on: a
/// connection's outcome is still counted in the metrics.
fn write_batch(target: &mut Target, batch: &mut Vec<u8>) {
    if !batch.is_empty() {
        let out = target.out();
        let _ = out.write_all(batch).and_then(|()| out.flush());
        batch.clear();
    }
}

/// The writer thread: writes queued lines in batches until every sender is gone.
fn write_lines(queue: &Receiver<Message>, mut target: Target) {
    let mut batch = Vec::with_capacity(BATCH_BYTES);
    let mut flushes = Vec::new();
    while let Ok(first) = queue.recv() {
        let mut next = Some(first);
        while let Some(message) = next {
            match message {
                Message::Line(line) => batch.extend_from_slice(line.as_bytes()),
                Message::Flush(done) => flushes.push(done),
                Message::Reopen => {
                    // The lines queued before the signal belong to the old file.
                    write_batch(&mut target, &mut batch);
                    target.reopen();
                }
            }
            next = if batch.len() < BATCH_BYTES {
                queue.try_recv().ok()
            } else {
                None
            };
        }
        write_batch(&mut target, &mut batch);
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
    /// How a connection handed to the packet engine ended (`end=`: `fin`, `rst_client`,
    /// `rst_backend`, `idle`, `stop`; [`crate::packet_expiry::End::as_str`]).
    pub end: Option<&'a str>,
    /// How long its handoff took, from the freeze to the translation taking over
    /// (`handoff_us=`, microseconds).
    pub handoff_us: Option<u64>,
    /// Why the packet engine did not take a connection that asked for it (`packet_refused=`,
    /// the reasons of `spliced_packet_refused_total`); the connection stayed on splice.
    pub packet_refused: Option<&'a str>,
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
        if let Some(end) = self.end {
            field(&mut s, "end", end);
        }
        if let Some(handoff_us) = self.handoff_us {
            field(&mut s, "handoff_us", handoff_us);
        }
        if let Some(reason) = self.packet_refused {
            field(&mut s, "packet_refused", reason);
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

impl Entry<'_> {
    /// Formats the line as one JSON object (without a newline), with the keys of
    /// [`Entry::line`]: absent values are `null`, byte counts, `ms`, `requests` and
    /// `handoff_us` numbers, everything else strings.
    pub fn json(&self) -> String {
        let mut s = String::with_capacity(320);
        s.push('{');
        json_field(&mut s, "client", self.client);
        json_field(&mut s, "listener", self.listener);
        json_field(&mut s, "name", self.name);
        json_field(&mut s, "alpn", self.alpn);
        json_field(&mut s, "site", self.site);
        json_field(&mut s, "backend", self.backend);
        json_field(&mut s, "proxy", Some(self.proxy_protocol));
        json_field(&mut s, "engine", self.engine);
        let _ = write!(
            s,
            "\"up\":{},\"down\":{},\"ms\":{},",
            self.bytes_up,
            self.bytes_down,
            self.duration.as_millis()
        );
        if let Some(requests) = self.requests {
            let _ = write!(s, "\"requests\":{requests},");
        }
        if let Some(end) = self.end {
            json_field(&mut s, "end", Some(end));
        }
        if let Some(handoff_us) = self.handoff_us {
            let _ = write!(s, "\"handoff_us\":{handoff_us},");
        }
        if let Some(reason) = self.packet_refused {
            json_field(&mut s, "packet_refused", Some(reason));
        }
        json_field(&mut s, "outcome", Some(self.outcome));
        if let Some(id) = self.id {
            json_field(&mut s, "id", Some(id));
        }
        if let Some(detail) = self.detail {
            json_field(&mut s, "detail", Some(detail));
        }
        s.pop();
        s.push('}');
        s
    }
}

/// Appends `"key":value,` to `line`: the value as a JSON string, or `null` when absent.
fn json_field(line: &mut String, key: &str, value: Option<impl std::fmt::Display>) {
    let _ = write!(line, "\"{key}\":");
    match value {
        // serde_json escapes what a client may have put in a name (quotes, controls).
        Some(v) => line
            .push_str(&serde_json::to_string(&v.to_string()).unwrap_or_else(|_| "null".to_owned())),
        None => line.push_str("null"),
    }
    line.push(',');
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

    fn names(text: &str) -> Vec<String> {
        text.lines()
            .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("name=")))
            .map(str::to_owned)
            .collect()
    }

    /// logrotate's way: the file is moved away, lines still go to it (the same inode) until
    /// the reopen, and every line after the reopen goes to a new file at the path.
    #[test]
    fn reopen_moves_later_lines_to_a_new_file_and_loses_none() {
        let dir = std::env::temp_dir().join(format!("spliced-access-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("access.log");
        let rotated = dir.join("access.log.1");
        let log = Log::file(&path, Format::Text).expect("log file");
        log.write(&entry("before.example"));
        assert!(log.flush(Duration::from_secs(5)));
        std::fs::rename(&path, &rotated).expect("mv");
        log.write(&entry("moved.example"));
        log.reopen();
        log.write(&entry("after.example"));
        assert!(log.flush(Duration::from_secs(5)));
        let read = |p: &Path| std::fs::read_to_string(p).expect("read");
        assert_eq!(names(&read(&rotated)), ["before.example", "moved.example"]);
        assert_eq!(names(&read(&path)), ["after.example"]);
        drop(log);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A JSON line has the text line's keys, in the same order, with nulls for absent values
    /// and numbers for counts; what a client sent is escaped.
    #[test]
    fn json_has_the_text_keys_and_escapes_client_values() {
        let e = Entry {
            client: Some("192.0.2.2:40000".parse().unwrap_or_else(|_| unreachable!())),
            name: Some("a\"b\n\u{1}.example"),
            outcome: "ok",
            proxy_protocol: "v2",
            bytes_up: 517,
            requests: Some(3),
            detail: Some("x"),
            end: Some("fin"),
            handoff_us: Some(9),
            packet_refused: Some("not_quiet"),
            ..Default::default()
        };
        let json = e.json();
        assert!(!json.contains('\n'), "{json}");
        let value: serde_json::Value = serde_json::from_str(&json).expect("valid JSON");
        let object = value.as_object().expect("an object");
        let keys: Vec<&str> = object.keys().map(String::as_str).collect();
        let text = e.line();
        let text_keys: Vec<&str> = text
            .split(' ')
            .filter_map(|f| f.split_once('=').map(|(k, _)| k))
            .filter(|k| !k.starts_with('"') && !k.is_empty())
            .collect();
        let mut sorted = text_keys.clone();
        sorted.sort_unstable();
        assert_eq!(keys, sorted, "serde_json sorts keys: {json}");
        assert_eq!(object["client"], "192.0.2.2:40000");
        assert_eq!(object["name"], "a\"b\n\u{1}.example");
        assert_eq!(object["site"], serde_json::Value::Null);
        assert_eq!(object["up"], 517);
        assert_eq!(object["requests"], 3);
        assert_eq!(object["proxy"], "v2");
        assert!(
            json.starts_with("{\"client\":\"192.0.2.2:40000\",\"listener\":null,"),
            "{json}"
        );
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

    /// A connection the packet engine carried says so, how it ended and how long its handoff
    /// took; one it refused says why, on its normal line. The same keys in JSON, the
    /// handoff time a number.
    #[test]
    fn packet_engine_fields() {
        let handed_off = Entry {
            engine: Some("packet"),
            bytes_up: 517,
            bytes_down: 1 << 20,
            end: Some(crate::packet_expiry::End::RstClient.as_str()),
            handoff_us: Some(420),
            outcome: "ok",
            proxy_protocol: "none",
            ..Default::default()
        };
        assert_eq!(
            handed_off.line(),
            "client=- listener=- name=- alpn=- site=- backend=- proxy=none engine=packet up=517 \
             down=1048576 ms=0 end=rst_client handoff_us=420 outcome=ok"
        );
        let json: serde_json::Value = serde_json::from_str(&handed_off.json()).expect("valid JSON");
        assert_eq!(json["engine"], "packet");
        assert_eq!(json["end"], "rst_client");
        assert_eq!(json["handoff_us"], 420);
        assert!(json.get("packet_refused").is_none(), "{json}");

        let refused = Entry {
            engine: Some("splice"),
            packet_refused: Some("ts_client_only"),
            outcome: "ok",
            proxy_protocol: "none",
            ..Default::default()
        };
        assert!(
            refused.line().ends_with(
                "engine=splice up=0 down=0 ms=0 packet_refused=ts_client_only outcome=ok"
            ),
            "{}",
            refused.line()
        );
        let json: serde_json::Value = serde_json::from_str(&refused.json()).expect("valid JSON");
        assert_eq!(json["packet_refused"], "ts_client_only");
        assert!(
            json.get("end").is_none() && json.get("handoff_us").is_none(),
            "{json}"
        );

        // Neither on a line of another engine.
        let plain = entry("a.example").line();
        assert!(
            !plain.contains(" end=")
                && !plain.contains("handoff_us=")
                && !plain.contains("packet_"),
            "{plain}"
        );
    }
}
