//! The sockmap engine's maps: a connection's two sockets go in through a [`SplicedPair`], in
//! the order the verdict needs, and come out when it is dropped; the verdict's progress events
//! wake the connection they belong to.
use std::{
    os::fd::{AsRawFd, BorrowedFd},
    sync::Arc,
};

use anyhow::{Context as _, Result};
use aya::{
    maps::{HashMap, MapData, SockHash},
    programs::Iter,
};
use proxy_common::{DETACH_ABSENT, DETACH_DONE, DETACH_REQUESTED, PROG_DETACH, Pair};
use tokio::{io::unix::AsyncFd, sync::Notify};

use super::{Kernel, lock};

/// The socket maps, behind one lock: every operation is a single short syscall.
pub(super) struct Maps {
    /// Sockets whose data the verdict redirects.
    pub(super) socks: SockHash<MapData, u64>,
    /// Every spliced socket for its whole life: where redirects look up their target.
    pub(super) hold: SockHash<MapData, u64>,
    pub(super) peers: HashMap<MapData, u64, Pair>,
    pub(super) detach: HashMap<MapData, u64, u32>,
    pub(super) wake: HashMap<MapData, u64, u64>,
}

/// Why a socket could not be put in a socket map.
#[derive(Debug)]
pub struct InsertError(aya::maps::MapError);

impl std::fmt::Display for InsertError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A connection's two sockets in the maps, by cookie. Dropping it forgets both sockets
/// entirely (which throws away whatever a psock still queues): drop it only once every
/// redirected byte reached the peer's TCP, or when the connection is being reset anyway.
pub struct SplicedPair<'k> {
    kernel: &'k Kernel,
    cookies: [u64; 2],
    notify: [Arc<Notify>; 2],
}

impl Kernel {
    /// Splices `first` into `second` and back: both are registered as each other's peer and
    /// held (so a redirect never misses a peer still being inserted), each gets the redirected
    /// count at which the verdict should wake us (`wake_at`), and then `first` enters the
    /// verdict map. `second` enters it with [`SplicedPair::start`] when its turn comes.
    pub fn splice_pair(
        &self,
        first: (u64, BorrowedFd<'_>),
        second: (u64, BorrowedFd<'_>),
        wake_at: [u64; 2],
    ) -> Result<SplicedPair<'_>, InsertError> {
        let cookies = [first.0, second.0];
        let pair = SplicedPair {
            kernel: self,
            cookies,
            notify: cookies.map(|c| self.watch(c)),
        };
        // From here on, dropping `pair` undoes whatever part of the insertion happened.
        self.with_maps(|m| {
            for (me, peer) in [(cookies[0], cookies[1]), (cookies[1], cookies[0])] {
                let entry = Pair {
                    peer,
                    redirected: 0,
                };
                m.peers.insert(&me, &entry, 0).map_err(InsertError)?;
            }
            for (cookie, fd) in [first, second] {
                m.hold
                    .insert(&cookie, fd.as_raw_fd(), 0)
                    .map_err(InsertError)?;
            }
            for (cookie, at) in cookies.into_iter().zip(wake_at) {
                m.wake.insert(&cookie, &at, 0).map_err(InsertError)?;
            }
            m.socks
                .insert(&first.0, first.1.as_raw_fd(), 0)
                .map_err(InsertError)
        })?;
        Ok(pair)
    }

    /// Stops redirecting what arrives on the socket: its data stays in its TCP receive queue,
    /// so TCP flow control holds the sender back. Returns `false` if it was not redirecting.
    ///
    /// A plain map delete would race with a verdict run that already took an skb off the
    /// receive queue, which the kernel then drops. The removal is done by the `iter/tcp`
    /// program instead, which the kernel runs with each socket locked. It walks the TCP
    /// sockets of this network namespace: about a microsecond each.
    pub fn detach(&self, cookie: u64) -> std::io::Result<bool> {
        let other = |e: &dyn std::fmt::Display| std::io::Error::other(e.to_string());
        self.with_maps(|m| m.detach.insert(&cookie, &DETACH_REQUESTED, 0))
            .map_err(|e| other(&e))?;
        let walked = self.walk_tcp_sockets();
        let state = self.with_maps(|m| {
            let state = m.detach.get(&cookie, 0).ok();
            let _ = m.detach.remove(&cookie);
            state
        });
        walked?;
        match state {
            Some(DETACH_DONE) => Ok(true),
            Some(DETACH_ABSENT) => Ok(false),
            // Not visited: the socket is gone from the table (closed meanwhile).
            _ => Err(std::io::Error::from(std::io::ErrorKind::NotConnected)),
        }
    }

    /// Runs the `iter/tcp` program over every TCP socket of this network namespace.
    fn walk_tcp_sockets(&self) -> std::io::Result<()> {
        use std::io::Read as _;
        let other = |e: &dyn std::fmt::Display| std::io::Error::other(e.to_string());
        let mut ebpf = lock(&self.ebpf);
        let iter: &mut Iter = ebpf
            .program_mut(PROG_DETACH)
            .ok_or_else(|| other(&"the iterator program is missing"))?
            .try_into()
            .map_err(|e| other(&e))?;
        let id = iter.attach().map_err(|e| other(&e))?;
        let link = iter.take_link(id).map_err(|e| other(&e))?;
        let mut file = link.into_file().map_err(|e| other(&e))?;
        // The program prints nothing; reading to the end is what runs it.
        let mut sink = [0u8; 64];
        while file.read(&mut sink)? > 0 {}
        Ok(())
    }

    /// Asks for a progress event as soon as the socket's redirected count reaches `at`.
    pub fn wake_at(&self, cookie: u64, at: u64) {
        let _ = self.with_maps(|m| m.wake.insert(&cookie, &at, 0));
    }

    /// Bytes the verdict redirected from this socket so far.
    pub fn redirected(&self, cookie: u64) -> u64 {
        self.with_maps(|m| m.peers.get(&cookie, 0).map(|p| p.redirected).unwrap_or(0))
    }

    /// How many sockets the maps hold now (for leak checks and metrics): the verdict map, the
    /// hold map, the peer table.
    pub fn entries(&self) -> (usize, usize, usize) {
        self.with_maps(|m| {
            (
                m.socks.keys().filter(Result::is_ok).count(),
                m.hold.keys().filter(Result::is_ok).count(),
                m.peers.keys().filter(Result::is_ok).count(),
            )
        })
    }

    fn with_maps<T>(&self, f: impl FnOnce(&mut Maps) -> T) -> T {
        f(&mut lock(&self.maps))
    }

    /// A notifier woken whenever the socket with this cookie makes progress.
    fn watch(&self, cookie: u64) -> Arc<Notify> {
        Arc::clone(lock(&self.watchers).entry(cookie).or_default())
    }

    /// Starts the task that turns the verdict's progress events into wake-ups of the
    /// connections they belong to.
    pub(super) fn spawn_progress_reader(self: &Arc<Self>) -> Result<()> {
        let ring = lock(&self.events)
            .take()
            .context("the event reader is already running")?;
        // SAFETY: the ring buffer owns its descriptor and is moved into the AsyncFd, so the
        // descriptor stays open exactly as long as it is registered.
        let mut ring = unsafe { AsyncFd::register(ring) }
            .map_err(|e| anyhow::anyhow!("watching the event ring buffer: {e}"))?;
        let kernel = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Ok(mut guard) = ring.readable_mut().await else {
                    return;
                };
                let Some(kernel) = kernel.upgrade() else {
                    return;
                };
                while let Some(item) = guard.get_inner_mut().next() {
                    if let Ok(bytes) = <[u8; 8]>::try_from(&item[..]) {
                        kernel.wake(u64::from_ne_bytes(bytes));
                    }
                }
                guard.clear_ready();
            }
        });
        Ok(())
    }

    fn wake(&self, cookie: u64) {
        if let Some(n) = lock(&self.watchers).get(&cookie) {
            n.notify_one();
        }
    }
}

impl SplicedPair<'_> {
    /// Starts redirecting what arrives on one of the pair's sockets (again, after a
    /// [`Kernel::detach`]). Fails if it cannot enter the verdict map, for example once it
    /// received its FIN: its data then waits in its TCP queue for another engine.
    pub fn start(&self, cookie: u64, fd: BorrowedFd<'_>) -> Result<(), InsertError> {
        self.kernel.with_maps(|m| {
            m.socks
                .insert(&cookie, fd.as_raw_fd(), 0)
                .map_err(InsertError)
        })
    }

    /// Woken when the first (`[0]`) or second (`[1]`) socket reaches its wake point.
    pub fn notifiers(&self) -> [Arc<Notify>; 2] {
        self.notify.clone()
    }
}

impl Drop for SplicedPair<'_> {
    fn drop(&mut self) {
        let cookies = self.cookies;
        {
            let mut w = lock(&self.kernel.watchers);
            for c in cookies {
                w.remove(&c);
            }
        }
        // Only the hash maps need deleting: closing a socket takes it out of every socket map,
        // and the sockets are closed right after this. A verdict that runs until then finds
        // no peer and drops what it got, which a connection that is ending does not miss.
        self.kernel.with_maps(|m| {
            for c in cookies {
                let _ = m.peers.remove(&c);
                let _ = m.wake.remove(&c);
            }
        });
    }
}
