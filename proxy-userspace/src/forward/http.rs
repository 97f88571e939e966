//! The header engine: frames each request and response (`crate::http1`), adds the forwarding
//! header to every request head, and passes bodies on as they arrive.
//!
//! Two loops run at once, as in the other engines: requests client-to-backend, responses
//! backend-to-client. They share the queue of requests still waiting for their response, which
//! the response framer needs (a `HEAD` response has no body; a 101 to an upgrade ends HTTP). When
//! a response switches protocols, both loops hand what they still buffer to the other side and
//! return [`Ended::Tunnel`]: the caller then splices the connection like any other.
//!
//! A request that is refused (smuggling, another site's `Host`) is never sent on. The responses
//! to the requests before it still reach the client; then the loop answering them stops, and the
//! caller sends the refusal and closes.
use std::{
    collections::VecDeque,
    io,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Poll, Waker},
    time::Duration,
};

use tokio::{io::Interest, net::TcpStream, sync::Notify, time::Instant};

use super::{Counters, ForwardError, Side, shutdown_write, write_all};
use crate::http1::{
    Pending, RequestError, RequestFramer, RequestStep, ResponseError, ResponseFramer, ResponseStep,
};

/// Bytes read at once, and how much output is gathered before a write.
const BUFFER: usize = 64 * 1024;

/// Requests sent on whose response has not ended, at most: the requests loop takes no new one
/// until a response ends. What each waits with is small, but a client that pipelines requests
/// and reads no response (or a backend that reads them and answers none) would otherwise make
/// the queue grow for as long as it sends: 8 such connections grew spliced by 37 MiB in 6 s.
/// TCP then pushes back on the client instead. Browsers do not pipeline; a client that does
/// waits for the first of 128 answers, which it would have to read anyway.
const MAX_PIPELINED: usize = 128;

/// How long the responses to the requests before a refused one may take to reach the client.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);

/// What the connection needs besides its sockets.
pub struct Params<'a> {
    /// The framer, fresh: its first request is at the start of `buffered`.
    pub framer: RequestFramer,
    /// Everything read from the client so far.
    pub buffered: Vec<u8>,
    /// Sent to the backend before the first request (the PROXY header, or nothing).
    pub preface: Vec<u8>,
    /// Whether a request's host is served by this connection's site.
    pub same_site: &'a (dyn Fn(Option<&str>) -> bool + Sync),
    /// Counts the requests sent on.
    pub requests: &'a AtomicU64,
}

/// How the HTTP part of a connection ended.
#[derive(Debug)]
pub enum Ended {
    /// Both directions reached their end of stream.
    Closed,
    /// The connection switched protocols and is now a byte stream, every buffered byte sent.
    Tunnel,
    /// A request was refused; the client got every response before it. `refuse` says whether
    /// the client can be told (false when the earlier responses did not finish in time).
    Refused {
        /// Why.
        error: Refusal,
        /// Whether a refusal response may be written now.
        refuse: bool,
    },
}

/// Why a request was not sent on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Bad or hostile input.
    Request(RequestError),
    /// The `Host` names another site than the connection's first request.
    Misdirected,
}

/// Why the engine stopped early.
#[derive(Debug)]
pub enum HttpError {
    /// A socket failed.
    Forward(ForwardError),
    /// The backend sent something that is not an HTTP response.
    Response(ResponseError),
}

impl From<ForwardError> for HttpError {
    fn from(error: ForwardError) -> HttpError {
        HttpError::Forward(error)
    }
}

/// What the two loops share.
#[derive(Default)]
struct Coordination {
    /// Requests sent on whose final response has not ended, oldest first.
    pending: VecDeque<Pending>,
    /// A response head went to the client and its body has not ended.
    responding: bool,
    /// The switch the last protocol-switching request asked for: `Some(true)` happened.
    switched: Option<bool>,
    /// The backend's responses ended (end of stream, or the loop stopped).
    backend_done: bool,
    /// A request was refused: this many more responses go to the client, then the responses
    /// loop stops.
    stop_after: Option<usize>,
    /// Wakes the responses loop while it waits for the backend, when a request is refused
    /// ([`refused_since`]). A waker kept here costs less per wait than a `Notify` registration.
    responses_waker: Option<Waker>,
}

enum Down {
    Closed,
    Tunnel,
    Stopped,
    StopTimedOut,
}

enum Up {
    Closed,
    Tunnel,
    Refused(Refusal),
}

/// Forwards requests and responses until both directions end, the connection switches
/// protocols, or a request is refused.
pub async fn forward(
    client: &TcpStream,
    backend: &TcpStream,
    counters: &Counters,
    params: Params<'_>,
) -> Result<Ended, HttpError> {
    let shared = Mutex::new(Coordination::default());
    let to_requests = Notify::new();
    let link = Link {
        shared: &shared,
        to_requests: &to_requests,
    };
    let up = requests(client, backend, &counters.upstream, params, &link);
    let down = responses(backend, client, &counters.downstream, &link);
    let (up, down) = tokio::try_join!(up, down)?;
    Ok(match (up, down) {
        (Up::Refused(error), down) => Ended::Refused {
            error,
            refuse: matches!(down, Down::Stopped),
        },
        (_, Down::Tunnel) => Ended::Tunnel,
        _ => Ended::Closed,
    })
}

/// The shared state and the wake-ups of each loop.
struct Link<'a> {
    shared: &'a Mutex<Coordination>,
    to_requests: &'a Notify,
}

impl Link<'_> {
    fn with<T>(&self, f: impl FnOnce(&mut Coordination) -> T) -> T {
        // A poisoned lock means a panic in the other loop, which already ends the task.
        let mut guard = self
            .shared
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut guard)
    }
}

/// Client to backend: frames requests, rewrites their heads, checks their site.
async fn requests(
    client: &TcpStream,
    backend: &TcpStream,
    counter: &AtomicU64,
    params: Params<'_>,
    link: &Link<'_>,
) -> Result<Up, HttpError> {
    let Params {
        mut framer,
        buffered: mut buf,
        preface,
        same_site,
        requests,
    } = params;
    let mut start = 0;
    // The host of the last request that was found to be the connection's site's.
    let mut routed: Option<Option<String>> = None;
    let mut uncounted = preface.len();
    let mut out = preface;
    loop {
        let input = buf.get(start..).unwrap_or_default();
        let before = out.len();
        let step = match framer.step(input, &mut out) {
            Ok(step) => step,
            Err(error) => {
                out.truncate(before);
                send(backend, Side::Backend, &mut out, counter, &mut uncounted).await?;
                // Only a broken chunk comes after its request's head went on.
                let head_sent = error == RequestError::InvalidChunk;
                return Ok(refuse(link, Refusal::Request(error), head_sent));
            }
        };
        match step {
            RequestStep::Head(head) => {
                if routed.as_ref() != Some(&head.host) {
                    if !same_site(head.host.as_deref()) {
                        out.truncate(before);
                        send(backend, Side::Backend, &mut out, counter, &mut uncounted).await?;
                        return Ok(refuse(link, Refusal::Misdirected, false));
                    }
                    routed = Some(head.host);
                }
                if link.with(|s| s.pending.len()) >= MAX_PIPELINED {
                    // What came before this head goes on now; the head waits for an answer.
                    let waiting = out.split_off(before);
                    send(backend, Side::Backend, &mut out, counter, &mut uncounted).await?;
                    if !wait_answered(link).await {
                        return Ok(Up::Closed);
                    }
                    out = waiting;
                }
                link.with(|s| s.pending.push_back(head.pending));
                requests.fetch_add(1, Ordering::Relaxed);
                start += head.len;
            }
            RequestStep::Body { len, .. } => {
                out.extend_from_slice(input.get(..len).unwrap_or_default());
                start += len;
            }
            RequestStep::NeedMore => {
                send(backend, Side::Backend, &mut out, counter, &mut uncounted).await?;
                buf.drain(..start);
                start = 0;
                let n = read_more(client, &mut buf, Some(&mut out))
                    .await
                    .map_err(|e| Side::Client.failed(e))?;
                if n == 0 {
                    shutdown_write(backend).map_err(|e| Side::Backend.failed(e))?;
                    return Ok(Up::Closed);
                }
                if out.capacity() == 0 {
                    out = pool::take();
                }
            }
            RequestStep::AwaitSwitch => {
                send(backend, Side::Backend, &mut out, counter, &mut uncounted).await?;
                match wait_switch(link).await {
                    Some(true) => {
                        out.extend_from_slice(input);
                        send(backend, Side::Backend, &mut out, counter, &mut uncounted).await?;
                        return Ok(Up::Tunnel);
                    }
                    Some(false) => framer.resume(),
                    None => return Ok(Up::Closed),
                }
            }
        }
        if out.len() >= BUFFER {
            send(backend, Side::Backend, &mut out, counter, &mut uncounted).await?;
        }
    }
}

/// Reads what `from` has into `buf`. While nothing is buffered, the connection gives its
/// buffers (`buf` and the output buffer `out`, if any) back until the socket has bytes again,
/// so an idle keep-alive connection holds none.
///
/// A read that leaves room in `buf` took everything the socket had: its readiness is cleared
/// then, so the next call waits for the socket instead of asking it once more only to hear
/// `EAGAIN` (one system call per message and direction). The readiness is the one seen before
/// the read, so bytes that arrive after it are not missed: they bring a new readiness event,
/// which clearing the old one does not touch.
async fn read_more(
    from: &TcpStream,
    buf: &mut Vec<u8>,
    mut out: Option<&mut Vec<u8>>,
) -> io::Result<usize> {
    loop {
        if buf.capacity() - buf.len() < BUFFER / 4 {
            if buf.capacity() == 0 {
                *buf = pool::take();
            }
            buf.reserve(BUFFER);
        }
        let room = buf.capacity() - buf.len();
        let mut drained = None;
        let result = from.try_io(Interest::READABLE, || match from.try_read_buf(buf) {
            Ok(n) if n > 0 && n < room => {
                drained = Some(n);
                // Clears the readiness seen before the read; the bytes are in `buf`.
                Err(io::ErrorKind::WouldBlock.into())
            }
            other => other,
        });
        if let Some(n) = drained {
            return Ok(n);
        }
        match result {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if buf.is_empty() {
                    pool::give(std::mem::take(buf));
                    if let Some(out) = out.as_deref_mut() {
                        pool::give(std::mem::take(out));
                    }
                }
                from.readable().await?;
            }
            result => return result,
        }
    }
}

/// Writes `out` to `to` (whose socket is `side`), counts it but for its first `uncounted`
/// bytes (the PROXY header, which the access log leaves out), and empties it.
async fn send(
    to: &TcpStream,
    side: Side,
    out: &mut Vec<u8>,
    counter: &AtomicU64,
    uncounted: &mut usize,
) -> Result<(), ForwardError> {
    if out.is_empty() {
        return Ok(());
    }
    write_all(to, out).await.map_err(|e| side.failed(e))?;
    let skipped = (*uncounted).min(out.len());
    *uncounted -= skipped;
    counter.fetch_add((out.len() - skipped) as u64, Ordering::Relaxed);
    out.clear();
    Ok(())
}

/// Waits until fewer than [`MAX_PIPELINED`] requests wait for their response; `false` when the
/// backend's responses ended first (no answer is coming).
async fn wait_answered(link: &Link<'_>) -> bool {
    loop {
        let answered = link.with(|s| {
            if s.pending.len() < MAX_PIPELINED {
                Some(true)
            } else if s.backend_done {
                Some(false)
            } else {
                None
            }
        });
        if let Some(answered) = answered {
            return answered;
        }
        link.to_requests.notified().await;
    }
}

/// Tells the responses loop to stop after the responses the client should still get.
fn refuse(link: &Link<'_>, error: Refusal, current_sent: bool) -> Up {
    let waker = link.with(|s| {
        // A request whose head went on but whose body broke gets no response forwarded.
        let before = s.pending.len().saturating_sub(usize::from(current_sent));
        s.stop_after = Some(before);
        s.responses_waker.take()
    });
    if let Some(waker) = waker {
        waker.wake();
    }
    Up::Refused(error)
}

/// Resolves once a request is refused, if none was when the responses loop read `stopping`:
/// the loop then looks again at how many responses the client still gets. Never resolves
/// when it already knew.
fn refused_since<'a>(link: &'a Link<'_>, stopping: bool) -> impl Future<Output = ()> + 'a {
    std::future::poll_fn(move |cx| {
        if stopping {
            return Poll::Pending;
        }
        link.with(|s| {
            if s.stop_after.is_some() {
                return Poll::Ready(());
            }
            if !s
                .responses_waker
                .as_ref()
                .is_some_and(|w| w.will_wake(cx.waker()))
            {
                s.responses_waker = Some(cx.waker().clone());
            }
            Poll::Pending
        })
    })
}

/// Waits until the response to a protocol-switching request decides; `None` when the backend's
/// responses ended first.
async fn wait_switch(link: &Link<'_>) -> Option<bool> {
    loop {
        let decided = link.with(|s| {
            if let Some(switched) = s.switched.take() {
                Some(Some(switched))
            } else if s.backend_done {
                Some(None)
            } else {
                None
            }
        });
        if let Some(decided) = decided {
            return decided;
        }
        link.to_requests.notified().await;
    }
}

/// Backend to client: frames responses, pairs them with requests, sees a switch. Responses go
/// on unchanged, so what is framed is written straight from the read buffer: `buf[..start]`
/// is what the client gets next.
async fn responses(
    backend: &TcpStream,
    client: &TcpStream,
    counter: &AtomicU64,
    link: &Link<'_>,
) -> Result<Down, HttpError> {
    let mut framer = ResponseFramer::new();
    let mut buf: Vec<u8> = Vec::new();
    let mut start = 0;
    let mut deadline: Option<Instant> = None;
    let done = |link: &Link<'_>| {
        link.with(|s| s.backend_done = true);
        link.to_requests.notify_one();
    };
    loop {
        // Stop once the client has every response it should get before a refusal.
        let stop = link.with(|s| s.stop_after == Some(0) && !s.responding);
        if stop {
            pass(client, &mut buf, &mut start, counter).await?;
            done(link);
            return Ok(Down::Stopped);
        }
        let input = buf.get(start..).unwrap_or_default();
        let front = link.with(|s| s.pending.front().copied());
        match framer.step(input, front).map_err(HttpError::Response)? {
            ResponseStep::Head(head) => {
                start += head.len;
                let asked_switch = front.is_some_and(|p| p.upgrade || p.connect);
                link.with(|s| {
                    if head.interim {
                        return;
                    }
                    if asked_switch {
                        s.switched = Some(head.tunnel);
                    }
                    if head.ends_message {
                        finish_response(s);
                    } else {
                        s.responding = true;
                    }
                });
                // Also wakes a requests loop waiting for an answer ([`MAX_PIPELINED`]).
                if (asked_switch || head.ends_message) && !head.interim {
                    link.to_requests.notify_one();
                }
                if head.tunnel {
                    // What follows the 101 is the new protocol's: it goes on as well.
                    start = buf.len();
                    pass(client, &mut buf, &mut start, counter).await?;
                    return Ok(Down::Tunnel);
                }
            }
            ResponseStep::Body { len, ends_message } => {
                start += len;
                if ends_message {
                    link.with(finish_response);
                    link.to_requests.notify_one();
                }
            }
            ResponseStep::NeedMore => {
                pass(client, &mut buf, &mut start, counter).await?;
                let stopping = link.with(|s| s.stop_after.is_some());
                if stopping && deadline.is_none() {
                    deadline = Some(Instant::now() + DRAIN_LIMIT);
                }
                let read = read_more(backend, &mut buf, None);
                let n = tokio::select! {
                    n = read => n.map_err(|e| Side::Backend.failed(e))?,
                    () = refused_since(link, stopping) => continue,
                    () = sleep_until(deadline) => {
                        done(link);
                        return Ok(Down::StopTimedOut);
                    }
                };
                if n == 0 {
                    done(link);
                    // After a refusal, the client is told why before the close, if the
                    // responses before it ended cleanly.
                    let clean = link.with(|s| !s.responding);
                    if stopping && clean {
                        return Ok(Down::Stopped);
                    }
                    shutdown_write(client).map_err(|e| Side::Client.failed(e))?;
                    return Ok(Down::Closed);
                }
            }
        }
        if start >= BUFFER {
            pass(client, &mut buf, &mut start, counter).await?;
        }
    }
}

/// Writes the framed part of the response stream, `buf[..start]`, to the client, counts it,
/// and drops it from `buf`.
async fn pass(
    client: &TcpStream,
    buf: &mut Vec<u8>,
    start: &mut usize,
    counter: &AtomicU64,
) -> Result<(), ForwardError> {
    let framed = buf.get(..*start).unwrap_or_default();
    if framed.is_empty() {
        return Ok(());
    }
    write_all(client, framed)
        .await
        .map_err(|e| Side::Client.failed(e))?;
    counter.fetch_add(framed.len() as u64, Ordering::Relaxed);
    buf.drain(..*start);
    *start = 0;
    Ok(())
}

/// A final response ended: its request leaves the queue.
fn finish_response(s: &mut Coordination) {
    s.pending.pop_front();
    s.responding = false;
    if let Some(left) = &mut s.stop_after {
        *left = left.saturating_sub(1);
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Buffers that connections gave back while they wait, for the next one that reads. A
/// keep-alive connection gives its buffers back between messages so that an idle one holds
/// none; without this, every request and every response would allocate 64 KiB and free it
/// again, which costs more than the rest of the allocations per request together. Each thread
/// keeps a few; the rest go back to the allocator.
mod pool {
    use std::cell::RefCell;

    use super::BUFFER;

    /// Buffers kept per thread (64 KiB each).
    const KEPT: usize = 16;

    thread_local! {
        static FREE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    }

    /// An empty buffer, with room for a read if one was given back.
    pub(super) fn take() -> Vec<u8> {
        // During thread teardown there is no pool: a new buffer then.
        FREE.try_with(|free| free.borrow_mut().pop())
            .ok()
            .flatten()
            .unwrap_or_default()
    }

    /// Gives `buf` back; kept if it is of the usual size and there is room.
    pub(super) fn give(mut buf: Vec<u8>) {
        if !(BUFFER..=4 * BUFFER).contains(&buf.capacity()) {
            return;
        }
        buf.clear();
        // During thread teardown the buffer is simply freed.
        let _ = FREE.try_with(|free| {
            let mut free = free.borrow_mut();
            if free.len() < KEPT {
                free.push(buf);
            }
        });
    }
}
