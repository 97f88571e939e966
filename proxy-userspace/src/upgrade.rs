//! Upgrades and restarts without refused connections: a new spliced takes the listening
//! sockets over from the running one through its control socket.
//!
//! `SO_REUSEPORT` alone is not enough. A new socket joining the reuseport group gets only new
//! SYNs, hashed over the group; connections already in the old socket's accept queue stay
//! there, and closing the old socket resets them. So the old process passes its listening
//! sockets themselves (`SCM_RIGHTS`, as HAProxy does over its stats socket): both processes
//! then hold the same socket and the same queue, and the old one only stops calling
//! `accept`. No SYN meets a closed port and no queued connection is lost.
//!
//! The exchange, on a `SOCK_SEQPACKET` unix socket (one message each, boundaries kept):
//! 1. new → old: [`REQUEST`];
//! 2. old → new: `pid N`, then one line per descriptor (`listener ADDR`, `metrics ADDR`,
//!    `control PATH`), the descriptors attached in the same order;
//! 3. new → old: [`READY`] once its configuration is loaded, its listeners are matched or
//!    bound and its eBPF programs are loaded (pinned aside, in a staging directory). Should
//!    the new process fail or close the connection before, the old one logs it and serves on;
//! 4. old → new: [`DONE`] once it has stopped accepting, detached its XDP program and removed
//!    its pins and pin lock. The new one then moves its pins in, locks the directory,
//!    attaches XDP and accepts. The old one drains its connections for its grace period and
//!    exits.
//!
//! The same socket takes a second request, [`SPAWN`], from `spliced upgrade` (SIGUSR2 does
//! the same without anyone waiting for the answer): the running process starts the successor
//! itself, from the path and with the arguments it was started with plus `--upgrade-from`
//! this socket (see [`spawn_successor`]), and answers `ok PID` once that process has taken
//! over, or `failed: WHY`. Under systemd this is the only way that keeps the new process
//! inside the service's cgroup: a process started from a shell is outside it, and a takeover
//! request from outside the cgroup is refused there.
use std::{
    ffi::OsString,
    io::{IoSlice, IoSliceMut},
    net::SocketAddr,
    os::{
        fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::fs::PermissionsExt as _,
    },
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use nix::sys::{
    socket::{
        self, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
        SockType, UnixAddr, sockopt,
    },
    time::TimeVal,
};

/// What the new process asks for, with the exchange's version.
pub(crate) const REQUEST: &[u8] = b"spliced-upgrade 1 listeners";
/// The new process is ready to serve.
pub(crate) const READY: &[u8] = b"ready";
/// The old process has stopped accepting and released its pins.
pub(crate) const DONE: &[u8] = b"done";
/// Asks the running process to start its successor itself (see [`ask_to_upgrade`]).
pub(crate) const SPAWN: &[u8] = b"spliced-upgrade 1 spawn";
/// The most descriptors one message carries (the kernel's `SCM_MAX_FD`).
const MAX_FDS: usize = 253;
/// The longest message of the exchange.
const MAX_MESSAGE: usize = 64 * 1024;
/// How long the new process may take between receiving the sockets and being ready (it loads
/// its eBPF programs meanwhile).
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long each side waits for the other's answer otherwise.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// What one descriptor passed on an upgrade is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Passed {
    /// A listening TCP socket bound to this address.
    Listener(SocketAddr),
    /// The `/metrics` endpoint's listening socket.
    Metrics(SocketAddr),
    /// The control socket listening at this path.
    Control(PathBuf),
}

impl Passed {
    fn line(&self) -> String {
        match self {
            Passed::Listener(a) => format!("listener {a}"),
            Passed::Metrics(a) => format!("metrics {a}"),
            Passed::Control(p) => format!("control {}", p.display()),
        }
    }

    fn parse(line: &str) -> Result<Passed> {
        let (kind, value) = line
            .split_once(' ')
            .with_context(|| format!("unreadable descriptor line {line:?}"))?;
        Ok(match kind {
            "listener" => Passed::Listener(value.parse()?),
            "metrics" => Passed::Metrics(value.parse()?),
            "control" => Passed::Control(PathBuf::from(value)),
            _ => bail!("unknown descriptor kind {kind:?}"),
        })
    }
}

/// The control socket's listening end.
pub(crate) struct ControlSocket {
    fd: OwnedFd,
    path: PathBuf,
}

impl ControlSocket {
    /// Listens at `path` (its directory is made if missing; the socket is for root, or the
    /// user spliced runs as, alone: it hands out the listening sockets). Refuses when another
    /// process answers there; a socket nobody answers on is left from a crash and replaced.
    /// When `optional` (the default path, which a user without root may not be able to
    /// make), a socket that cannot be made is logged and left out: spliced then runs as
    /// before, only without upgrades.
    pub(crate) fn bind(path: &Path, optional: bool) -> Result<Option<ControlSocket>> {
        if path.exists() {
            match connect(path) {
                Ok(_) => bail!(
                    "another spliced answers on the control socket {}; refusing to start a \
                     second instance (take over from it with --upgrade-from {0}, or stop it; \
                     an instance in another network namespace needs its own \
                     --control-socket)",
                    path.display()
                ),
                Err(_) => {
                    tracing::warn!(path = %path.display(), "removing a stale control socket");
                    std::fs::remove_file(path)
                        .with_context(|| format!("removing {}", path.display()))?;
                }
            }
        }
        match Self::make(path) {
            Ok(control) => Ok(Some(control)),
            Err(e) if optional => {
                tracing::warn!(
                    "no control socket, so no upgrade without refused connections from this \
                     process (--control-socket names another path): {e:#}"
                );
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    fn make(path: &Path) -> Result<ControlSocket> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let fd = seqpacket()?;
        let addr = UnixAddr::new(path).with_context(|| format!("{}", path.display()))?;
        socket::bind(fd.as_raw_fd(), &addr)
            .with_context(|| format!("binding the control socket {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restricting {}", path.display()))?;
        socket::listen(&fd, Backlog::new(8)?)
            .with_context(|| format!("listening on {}", path.display()))?;
        Ok(ControlSocket {
            fd,
            path: path.to_owned(),
        })
    }

    /// Its path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// A second descriptor for the same socket, to pass on.
    pub(crate) fn try_clone_fd(&self) -> Result<OwnedFd> {
        Ok(self.fd.try_clone()?)
    }
}

fn seqpacket() -> Result<OwnedFd> {
    socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("creating a unix socket")
}

fn connect(path: &Path) -> Result<OwnedFd> {
    let fd = seqpacket()?;
    let addr = UnixAddr::new(path)?;
    socket::connect(fd.as_raw_fd(), &addr)?;
    Ok(fd)
}

fn set_timeout(fd: &OwnedFd, timeout: Duration) -> Result<()> {
    let t = TimeVal::new(
        i64::try_from(timeout.as_secs())?,
        i64::from(timeout.subsec_micros()),
    );
    socket::setsockopt(fd, sockopt::ReceiveTimeout, &t)?;
    socket::setsockopt(fd, sockopt::SendTimeout, &t)?;
    Ok(())
}

/// Sends one message with `fds` attached.
fn send(fd: &OwnedFd, data: &[u8], fds: &[i32]) -> Result<()> {
    let cmsgs: Vec<ControlMessage> = if fds.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(fds)]
    };
    let sent = socket::sendmsg::<()>(
        fd.as_raw_fd(),
        &[IoSlice::new(data)],
        &cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    ensure!(sent == data.len(), "a short write on the control socket");
    Ok(())
}

/// Receives one message and the descriptors attached to it (owned: closed if dropped). An
/// empty message is the peer's close.
fn receive(fd: &OwnedFd) -> Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut space = nix::cmsg_space!([i32; MAX_FDS]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = socket::recvmsg::<()>(
        fd.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            // SAFETY: the kernel just installed these descriptors for us; nothing else owns them.
            fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
        }
    }
    let truncated = msg
        .flags
        .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
    let len = msg.bytes;
    ensure!(!truncated, "a truncated message on the control socket");
    buf.truncate(len);
    Ok((buf, fds))
}

/// The old side: what a takeover request gets, and how the main loop is told.
pub(crate) struct Offer {
    /// The descriptors to pass, in order.
    pub(crate) items: Vec<(Passed, OwnedFd)>,
}

/// A new process is ready: the main loop stops accepting, releases the pins, and then sends
/// on `released` so that the new process is told to go ahead.
pub(crate) struct Takeover {
    /// The new process, as the socket's credentials tell.
    pub(crate) pid: i32,
    /// Answered once this process no longer accepts and holds no pins.
    pub(crate) released: tokio::sync::oneshot::Sender<()>,
}

/// Serves the control socket on its own thread until a takeover completes: each connection
/// may ask for the listeners, or ([`SPAWN`]) for this process to start its successor. A new
/// process that gets the listeners and says it is ready is passed to the main loop on
/// `takeovers`; a spawn request is passed on `spawns` with its connection, which the main
/// loop answers once the upgrade is over.
pub(crate) fn serve(
    control: ControlSocket,
    offer: Offer,
    takeovers: tokio::sync::mpsc::Sender<Takeover>,
    spawns: tokio::sync::mpsc::Sender<OwnedFd>,
) -> Result<()> {
    std::thread::Builder::new()
        .name("spliced-control".to_owned())
        .spawn(move || {
            // Bounded by the process: the thread ends with a takeover or when spliced exits.
            loop {
                // Wait with poll, then accept: a thread blocked in accept(2) holds a descriptor
                // number from the start (the kernel reserves it before waiting), invisible in
                // /proc/self/fd, and near the descriptor limit that one is missed.
                let mut ready = [nix::poll::PollFd::new(
                    control.fd.as_fd(),
                    nix::poll::PollFlags::POLLIN,
                )];
                match nix::poll::poll(&mut ready, nix::poll::PollTimeout::NONE) {
                    Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => {
                        tracing::error!("control socket: waiting: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                }
                let conn = match socket::accept(control.fd.as_fd()) {
                    Ok(conn) => conn,
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => {
                        tracing::error!("control socket: accepting: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                match request(&conn) {
                    Ok(Request::Listeners(pid)) => match handover(&conn, pid, &offer, &takeovers) {
                        Ok(()) => return,
                        Err(e) => tracing::warn!(
                            "upgrade abandoned, still serving with the running process: {e:#}"
                        ),
                    },
                    Ok(Request::Spawn) => {
                        if spawns.blocking_send(conn).is_err() {
                            return;
                        }
                    }
                    Err(e) => tracing::warn!("control socket: {e:#}"),
                }
            }
        })
        .context("starting the control socket's thread")?;
    Ok(())
}

/// What a control connection asks for.
enum Request {
    /// The listening sockets, by the process with this PID.
    Listeners(i32),
    /// That this process starts its successor.
    Spawn,
}

/// Reads a control connection's request, after checking who asks.
fn request(conn: &OwnedFd) -> Result<Request> {
    let creds = socket::getsockopt(conn, sockopt::PeerCredentials)?;
    let me = nix::unistd::geteuid().as_raw();
    ensure!(
        creds.uid() == 0 || creds.uid() == me,
        "refusing process {} of user {}",
        creds.pid(),
        creds.uid()
    );
    set_timeout(conn, ANSWER_TIMEOUT)?;
    let (request, _) = receive(conn)?;
    if request == SPAWN {
        return Ok(Request::Spawn);
    }
    if request != REQUEST {
        let _ = send(conn, b"error: unknown request", &[]);
        bail!(
            "unknown request {:?} from process {}",
            String::from_utf8_lossy(&request),
            creds.pid()
        );
    }
    if let Err(e) = same_service(creds.pid()) {
        let _ = send(conn, format!("error: {e:#}").as_bytes(), &[]);
        return Err(e);
    }
    Ok(Request::Listeners(creds.pid()))
}

/// Under systemd (`NOTIFY_SOCKET` set), whether process `pid` runs in this process's cgroup,
/// that is, in the same service: a new process outside it would serve unsupervised once this
/// one exits, while systemd counts the service as stopped. Elsewhere anything goes.
fn same_service(pid: i32) -> Result<()> {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return Ok(());
    }
    let ours = std::fs::read_to_string("/proc/self/cgroup").context("reading our cgroup")?;
    let theirs = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .with_context(|| format!("reading the cgroup of process {pid}"))?;
    ensure!(
        ours == theirs,
        "process {pid} runs outside this service's cgroup ({}, not {}): under systemd, start \
         upgrades with `spliced upgrade` or `systemctl kill --kill-whom=main -s USR2 spliced`, \
         so that the running process starts the new one inside the service",
        theirs.trim(),
        ours.trim()
    );
    Ok(())
}

/// One control connection that asked for the listeners: `Ok` once they are handed over for
/// good, an error if this process goes on serving them.
fn handover(
    conn: &OwnedFd,
    pid: i32,
    offer: &Offer,
    takeovers: &tokio::sync::mpsc::Sender<Takeover>,
) -> Result<()> {
    let lines: Vec<String> = std::iter::once(format!("pid {}", std::process::id()))
        .chain(offer.items.iter().map(|(p, _)| p.line()))
        .collect();
    let fds: Vec<i32> = offer.items.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
    ensure!(fds.len() <= MAX_FDS, "more than {MAX_FDS} sockets to pass");
    send(conn, lines.join("\n").as_bytes(), &fds)?;
    tracing::info!(
        pid,
        sockets = fds.len(),
        "upgrade: passed the listening sockets to a new process; waiting for it to be ready"
    );
    set_timeout(conn, READY_TIMEOUT)?;
    let (answer, _) = receive(conn).context("waiting for the new process")?;
    ensure!(
        answer == READY,
        "the new process (PID {pid}) ended before it was ready{}",
        if answer.is_empty() {
            String::new()
        } else {
            format!(": {}", String::from_utf8_lossy(&answer))
        }
    );
    let (released, done) = tokio::sync::oneshot::channel();
    takeovers
        .blocking_send(Takeover { pid, released })
        .context("the main loop is gone")?;
    // The main loop always answers (or is gone, and then so is the process).
    if done.blocking_recv().is_ok() {
        send(conn, DONE, &[])?;
    }
    Ok(())
}

/// Starts the successor of this process: `argv` (the program as this one was started, not
/// `/proc/self/exe`, which after a package upgrade is the replaced file, and this process's
/// arguments) with `--upgrade-from control`. It inherits the environment but `WATCHDOG_PID`:
/// that names this process, and would make the new one think the watchdog is not its own
/// (without it, `WATCHDOG_USEC` applies to whoever reads it).
///
/// The new process is started through an intermediate that forks it and exits at once, so it
/// is not our child but, like us, the service manager's (the nearest child subreaper: systemd).
/// systemd 252 marks a `MAINPID=` that is not its child as "alien": it then neither learns its
/// exit status nor waits for it on `systemctl stop`, and sends SIGKILL at once (seen under a
/// real systemd, `contrib/systemd/nspawn-check`). Returns the new process's PID and a pidfd
/// that turns readable when it exits.
pub(crate) fn spawn_successor(argv: &[OsString], control: &Path) -> Result<(u32, OwnedFd)> {
    use std::os::unix::process::CommandExt as _;
    let (program, args) = argv
        .split_first()
        .context("no command line to start again")?;
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .context("a pipe for the new process's PID")?;
    let write_fd = write.as_raw_fd();
    let mut cmd = std::process::Command::new(program);
    cmd.args(args)
        .arg("--upgrade-from")
        .arg(control)
        .env_remove("WATCHDOG_PID")
        .stdin(std::process::Stdio::null());
    // SAFETY: between fork and exec only async-signal-safe calls: fork, write, _exit.
    unsafe {
        cmd.pre_exec(move || match nix::libc::fork() {
            -1 => Err(std::io::Error::last_os_error()),
            // The new process: std goes on to exec it.
            0 => Ok(()),
            pid => {
                let bytes = pid.to_ne_bytes();
                nix::libc::write(write_fd, bytes.as_ptr().cast(), bytes.len());
                nix::libc::_exit(0)
            }
        });
    }
    // Returns once the new process has exec'd (or failed to, with the error).
    let mut intermediate = cmd
        .spawn()
        .with_context(|| format!("starting {}", Path::new(program).display()))?;
    drop(write);
    let status = intermediate.wait()?;
    let mut bytes = [0u8; 4];
    let read = std::fs::File::from(read);
    std::io::Read::read_exact(&mut &read, &mut bytes).with_context(|| {
        format!(
            "starting {}: no PID from the intermediate process ({status})",
            Path::new(program).display()
        )
    })?;
    let pid = i32::from_ne_bytes(bytes);
    // SAFETY: a plain system call; the descriptor it returns is ours alone.
    let pidfd = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_open, pid, 0) };
    ensure!(
        pidfd >= 0,
        "watching the new process {pid}: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: the kernel just made this descriptor for us (a pidfd is CLOEXEC).
    let pidfd = unsafe { OwnedFd::from_raw_fd(i32::try_from(pidfd)?) };
    Ok((u32::try_from(pid)?, pidfd))
}

/// Waits until the process of `pidfd` has exited.
pub(crate) fn wait_exit(pidfd: &OwnedFd) -> Result<()> {
    let mut poll = nix::libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: nix::libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd, for the length given.
        let ready = unsafe { nix::libc::poll(&mut poll, 1, -1) };
        if ready > 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if ready < 0 && e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e.into());
        }
    }
}

/// The arguments of a `spliced run` command line without its `--upgrade-from` (either form):
/// what a successor is started with, before its own `--upgrade-from` is added.
pub fn without_upgrade_from(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        if arg == "--upgrade-from" {
            args.next();
        } else if !arg.as_encoded_bytes().starts_with(b"--upgrade-from=") {
            out.push(arg);
        }
    }
    out
}

/// What the running process answered to [`ask_to_upgrade`].
#[derive(Debug, PartialEq, Eq)]
pub enum Upgraded {
    /// The new process (this PID) took over; the old one drains and exits.
    Done(u32),
    /// The upgrade failed (the reason); the running process serves on.
    Failed(String),
    /// The running process does not know the request (a version before it) or refused it.
    Refused(String),
}

/// `spliced upgrade`: asks the spliced serving the control socket at `path` to start its
/// successor, and waits up to `timeout` for the outcome.
pub fn ask_to_upgrade(path: &Path, timeout: Duration) -> Result<Upgraded> {
    let conn = connect(path)
        .with_context(|| format!("connecting to the control socket {}", path.display()))?;
    set_timeout(&conn, ANSWER_TIMEOUT)?;
    send(&conn, SPAWN, &[])?;
    set_timeout(&conn, timeout)?;
    let (answer, _) = receive(&conn).context("waiting for the upgrade's outcome")?;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    Ok(if let Some(pid) = answer.strip_prefix("ok ") {
        Upgraded::Done(pid.trim().parse().context("an unreadable PID")?)
    } else if let Some(why) = answer.strip_prefix("failed: ") {
        Upgraded::Failed(why.to_owned())
    } else if answer.is_empty() {
        Upgraded::Refused("the running process closed the connection".to_owned())
    } else {
        Upgraded::Refused(answer.strip_prefix("error: ").unwrap_or(&answer).to_owned())
    })
}

/// Answers a [`SPAWN`] request's connection: `ok PID` or `failed: WHY`.
pub(crate) fn answer_spawn(conn: &OwnedFd, outcome: &std::result::Result<u32, String>) {
    let text = match outcome {
        Ok(pid) => format!("ok {pid}"),
        Err(why) => format!("failed: {why}"),
    };
    if let Err(e) = send(conn, text.as_bytes(), &[]) {
        tracing::warn!("answering `spliced upgrade`: {e:#}");
    }
}

/// The new side: the sockets received from the running process, until they are matched.
pub(crate) struct Inherited {
    conn: OwnedFd,
    from: Option<i32>,
    items: Vec<(Passed, Option<OwnedFd>)>,
}

impl Inherited {
    /// Asks the process serving the control socket at `path` for its sockets.
    pub(crate) fn request(path: &Path) -> Result<Inherited> {
        let conn = connect(path).with_context(|| {
            format!(
                "connecting to the running spliced's control socket {}",
                path.display()
            )
        })?;
        set_timeout(&conn, ANSWER_TIMEOUT)?;
        send(&conn, REQUEST, &[])?;
        let (text, fds) = receive(&conn).context("receiving the listening sockets")?;
        let text = String::from_utf8(text).context("the descriptor list is not text")?;
        if let Some(why) = text.strip_prefix("error: ") {
            bail!("the running spliced refused: {why}");
        }
        let mut lines = text.lines();
        // Its own word: the socket's credentials name whoever made the listening socket,
        // which after one upgrade is an older process.
        let from = lines
            .next()
            .and_then(|l| l.strip_prefix("pid "))
            .and_then(|p| p.parse().ok());
        let passed = lines.map(Passed::parse).collect::<Result<Vec<_>>>()?;
        ensure!(
            passed.len() == fds.len(),
            "{} descriptors for {} lines: {text:?}",
            fds.len(),
            passed.len()
        );
        tracing::info!(
            from = from.unwrap_or(0),
            sockets = fds.len(),
            "upgrade: received the running process's sockets"
        );
        Ok(Inherited {
            conn,
            from,
            items: passed.into_iter().zip(fds.into_iter().map(Some)).collect(),
        })
    }

    fn take(&mut self, want: &Passed) -> Option<OwnedFd> {
        self.items
            .iter_mut()
            .find(|(p, fd)| p == want && fd.is_some())
            .and_then(|(_, fd)| fd.take())
    }

    /// The passed listening socket bound to `address`, if there is one, checked to be a
    /// listening TCP socket on that address.
    pub(crate) fn listener(
        &mut self,
        address: SocketAddr,
    ) -> Result<Option<std::net::TcpListener>> {
        self.tcp(&Passed::Listener(address), address)
    }

    /// The passed metrics socket on `address`, if there is one.
    pub(crate) fn metrics(&mut self, address: SocketAddr) -> Result<Option<std::net::TcpListener>> {
        self.tcp(&Passed::Metrics(address), address)
    }

    fn tcp(&mut self, want: &Passed, address: SocketAddr) -> Result<Option<std::net::TcpListener>> {
        let Some(fd) = self.take(want) else {
            return Ok(None);
        };
        let listening = socket::getsockopt(&fd, sockopt::AcceptConn).unwrap_or(false);
        let kind = socket::getsockopt(&fd, sockopt::SockType).ok();
        let listener = std::net::TcpListener::from(fd);
        let local = listener.local_addr().ok();
        ensure!(
            listening && kind == Some(SockType::Stream) && local == Some(address),
            "the socket passed for {address} is not a TCP socket listening there \
             (listening: {listening}, type {kind:?}, bound to {local:?})"
        );
        Ok(Some(listener))
    }

    /// The passed control socket, if it listens at `path`.
    pub(crate) fn control(&mut self, path: &Path) -> Option<ControlSocket> {
        self.take(&Passed::Control(path.to_owned()))
            .map(|fd| ControlSocket {
                fd,
                path: path.to_owned(),
            })
    }

    /// The process the sockets came from.
    pub(crate) fn from(&self) -> Option<i32> {
        self.from
    }

    /// Tells the old process that this one is ready, and waits until it has stopped accepting
    /// and released its pins. The passed sockets this process did not take are closed.
    pub(crate) fn ready(mut self) -> Result<()> {
        for (passed, fd) in &mut self.items {
            if fd.take().is_some() {
                tracing::info!(
                    "upgrade: closing {}, which the new configuration does not have",
                    passed.line()
                );
            }
        }
        send(&self.conn, READY, &[])?;
        let (answer, _) =
            receive(&self.conn).context("waiting for the old process to stop accepting")?;
        ensure!(
            answer == DONE,
            "the old process answered {:?}",
            String::from_utf8_lossy(&answer)
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_lines_read_back() {
        for p in [
            Passed::Listener("0.0.0.0:443".parse().expect("addr")),
            Passed::Listener("[::]:80".parse().expect("addr")),
            Passed::Metrics("127.0.0.1:9464".parse().expect("addr")),
            Passed::Control(PathBuf::from("/run/spliced/spliced.sock")),
        ] {
            assert_eq!(Passed::parse(&p.line()).expect("parses"), p);
        }
        assert!(Passed::parse("listener nowhere").is_err());
        assert!(Passed::parse("pipe 1").is_err());
        assert!(Passed::parse("").is_err());
    }

    /// A successor gets the old command line with its own `--upgrade-from` only: an older
    /// one (either form) is left out, so that upgrades chain.
    #[test]
    fn a_successor_drops_the_old_upgrade_from() {
        let args = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            without_upgrade_from(args(&[
                "/usr/bin/spliced",
                "run",
                "--config",
                "/etc/spliced/spliced.toml",
                "--upgrade-from",
                "/run/spliced/spliced.sock",
                "--grace",
                "30",
                "--upgrade-from=/tmp/x.sock",
            ])),
            args(&[
                "/usr/bin/spliced",
                "run",
                "--config",
                "/etc/spliced/spliced.toml",
                "--grace",
                "30"
            ])
        );
    }

    /// `spliced upgrade`'s request reaches the main loop with its connection, and the answer
    /// reaches the command; a running spliced that does not know the request (as one before
    /// it) is a refusal, which the postinst turns into a restart.
    #[test]
    fn an_upgrade_request_is_answered_with_the_outcome() {
        let dir = std::env::temp_dir().join(format!("spliced-spawn-{}", std::process::id()));
        let path = dir.join("control.sock");
        let control = ControlSocket::bind(&path, false)
            .expect("bind")
            .expect("made");
        let (tx, _takeovers) = tokio::sync::mpsc::channel(1);
        let (spawn_tx, mut spawns) = tokio::sync::mpsc::channel(1);
        serve(control, Offer { items: Vec::new() }, tx, spawn_tx).expect("serve");
        let main_loop = std::thread::spawn(move || {
            let conn = spawns.blocking_recv().expect("a request");
            answer_spawn(&conn, &Ok(4242));
            let conn = spawns.blocking_recv().expect("a second request");
            answer_spawn(&conn, &Err("the new process exited".to_owned()));
        });
        let timeout = Duration::from_secs(10);
        assert_eq!(
            ask_to_upgrade(&path, timeout).expect("answered"),
            Upgraded::Done(4242)
        );
        assert_eq!(
            ask_to_upgrade(&path, timeout).expect("answered"),
            Upgraded::Failed("the new process exited".to_owned())
        );
        main_loop.join().expect("joined");
        let _ = std::fs::remove_file(&path);

        // An older spliced: it answers anything but its one request with an error.
        let old = ControlSocket::bind(&path, false)
            .expect("bind")
            .expect("made");
        let older = std::thread::spawn(move || {
            let conn = socket::accept(old.fd.as_fd()).expect("accept");
            let (request, _) = receive(&conn).expect("request");
            assert_eq!(request, SPAWN);
            send(&conn, b"error: unknown request", &[]).expect("answer");
        });
        assert_eq!(
            ask_to_upgrade(&path, timeout).expect("answered"),
            Upgraded::Refused("unknown request".to_owned())
        );
        older.join().expect("joined");
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_dir(&dir);
    }

    /// A listening socket with `SO_REUSEPORT` on `port` (0: any) of 127.0.0.1.
    fn reuseport_listener(port: u16) -> std::net::TcpListener {
        let fd = socket::socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .expect("socket");
        socket::setsockopt(&fd, sockopt::ReusePort, &true).expect("SO_REUSEPORT");
        let addr = socket::SockaddrIn::new(127, 0, 0, 1, port);
        socket::bind(fd.as_raw_fd(), &addr).expect("bind");
        socket::listen(&fd, Backlog::new(16).expect("backlog")).expect("listen");
        std::net::TcpListener::from(fd)
    }

    /// Why the sockets are passed: a new socket joining the reuseport group does not get
    /// what waits in the old one's accept queue, and closing the old one resets it.
    #[test]
    fn a_fresh_reuseport_socket_does_not_get_the_old_queue() {
        let old = reuseport_listener(0);
        let address = old.local_addr().expect("address");
        let mut queued = std::net::TcpStream::connect(address).expect("connect");
        let new = reuseport_listener(address.port());
        drop(old);
        queued
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut buf = [0u8; 1];
        let read = std::io::Read::read(&mut queued, &mut buf);
        assert!(
            matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "the queued connection should be reset with the old socket: {read:?}"
        );
        new.set_nonblocking(true).expect("nonblocking");
        assert!(new.accept().is_err(), "the new socket got the old queue");
    }

    #[test]
    fn a_listener_is_handed_over_with_its_queue() {
        let dir = std::env::temp_dir().join(format!("spliced-upgrade-{}", std::process::id()));
        let path = dir.join("control.sock");
        let control = ControlSocket::bind(&path, false)
            .expect("bind")
            .expect("made");
        assert!(
            ControlSocket::bind(&path, true).is_err(),
            "a live socket is refused, even where the socket is optional"
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listener");
        let address = listener.local_addr().expect("address");
        // Queued before the handover: must be accepted by the new side.
        let _client = std::net::TcpStream::connect(address).expect("connect");
        let offer = Offer {
            items: vec![(
                Passed::Listener(address),
                OwnedFd::from(listener.try_clone().expect("clone")),
            )],
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        let (spawn_tx, _spawns) = tokio::sync::mpsc::channel(1);
        serve(control, offer, tx, spawn_tx).expect("serve");
        let mut inherited = Inherited::request(&path).expect("request");
        let other: SocketAddr = "127.0.0.1:1".parse().expect("addr");
        assert!(inherited.listener(other).expect("no error").is_none());
        let taken = inherited.listener(address).expect("ok").expect("passed");
        drop(listener);
        let answer = std::thread::spawn(move || {
            let takeover = rx.blocking_recv().expect("a takeover");
            takeover.released.send(()).expect("answer");
        });
        inherited.ready().expect("ready and done");
        answer.join().expect("joined");
        taken.set_nonblocking(false).expect("blocking");
        taken.accept().expect("the queued connection");
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_dir(&dir);
    }
}
