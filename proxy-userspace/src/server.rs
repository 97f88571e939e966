//! The running proxy: listeners, the routing state that reloads swap, signals, shutdown.
//!
//! Reading a configuration ([`crate::config::Config::load`]) and serving are separate: a
//! [`Server`] is built once from a config and later given new ones with [`Server::reload`],
//! which swaps sites and timeouts for new connections while established ones go on untouched.
use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
    sync::{Semaphore, watch},
};

use crate::{
    config::{Config, Forwarding},
    conn::{self, ListenerInfo},
    forward::choose::PacketLoad,
    outcome::Outcome,
    shared::{Routing, Shared},
};

/// At most one warning per listener and worker this often while accepting fails.
const ACCEPT_WARN_EVERY: Duration = Duration::from_secs(1);

/// How long stopping waits for queued access-log lines to be written.
const ACCESS_LOG_FLUSH_LIMIT: Duration = Duration::from_secs(5);

/// A bound, not yet running proxy.
pub struct Server {
    /// SIGTERM, SIGINT, SIGHUP, SIGUSR1 and SIGUSR2, registered before anything else so that a signal
    /// sent as soon as the ports listen is handled instead of killing the process.
    signals: [tokio::signal::unix::Signal; 5],
    listeners: Vec<(TcpListener, Arc<ListenerInfo>)>,
    shared: Arc<Shared>,
    max_connections: usize,
    config_path: Option<PathBuf>,
    metrics: Option<std::net::TcpListener>,
    /// Held while serving: another spliced cannot take over the pins meanwhile.
    pin_lock: Option<crate::instance::PinLock>,
    /// Where a new spliced asks for the listening sockets (see [`crate::upgrade`]).
    control: Option<crate::upgrade::ControlSocket>,
    /// The descriptor limit and how many of them to keep free (see [`crate::shed`]).
    descriptors: Descriptors,
    /// Whether this process took its listeners over from another (`--upgrade-from`).
    took_over: bool,
    /// How to start this process again, for an upgrade it starts itself.
    respawn: Option<Vec<std::ffi::OsString>>,
}

/// The process's descriptor limit, and the reserve kept below it.
#[derive(Clone, Copy, Debug)]
struct Descriptors {
    limit: u64,
    reserve: u64,
}

impl Descriptors {
    fn current() -> Descriptors {
        let limit = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map_or(1024, |(soft, _)| soft);
        Descriptors {
            limit,
            reserve: crate::shed::reserve_for(limit),
        }
    }

    /// Whether a new descriptor numbered `fd` leaves less than the reserve free. Linux hands
    /// out the lowest free number, so every number below `fd` is taken.
    fn pressed(self, fd: i32) -> bool {
        u64::try_from(fd).is_ok_and(|fd| fd + self.reserve >= self.limit)
    }
}

/// Which forwarding engines `config` names anywhere (a listener, a site, the default site or
/// `[defaults]`).
fn engines(config: &Config) -> impl Iterator<Item = Forwarding> + '_ {
    std::iter::once(Some(config.defaults.forwarding))
        .chain(config.listeners.iter().map(|l| l.forwarding))
        .chain(
            config
                .sites
                .iter()
                .chain(&config.default_site)
                .map(|s| s.forwarding),
        )
        .flatten()
}

/// Whether `config` asks for the sockmap engine explicitly anywhere: then the eBPF side is
/// required.
fn wants_sockmap(config: &Config) -> bool {
    engines(config).any(|f| f == Forwarding::Sockmap)
}

/// Whether `config` could use the kernel path anywhere (`sockmap`, or `auto`, which uses it
/// where it loads): only then are its programs loaded.
fn may_use_sockmap(config: &Config) -> bool {
    engines(config).any(|f| matches!(f, Forwarding::Sockmap | Forwarding::Auto))
}

/// Where the maps are pinned, and whether to pin at all.
#[derive(Clone, Debug)]
pub struct Options {
    /// bpffs directory for the pins; `None` pins nothing.
    pub pin_dir: Option<PathBuf>,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics: Option<SocketAddr>,
    /// The unix socket a new spliced takes the listening sockets over from; `None` serves
    /// none (and then this instance cannot be upgraded without refused connections).
    pub control_socket: Option<PathBuf>,
    /// Whether a control socket that cannot be made (other than because another spliced
    /// answers there) is only logged: true for the default path.
    pub control_socket_optional: bool,
    /// Take the listening sockets over from the spliced serving this control socket, which
    /// then stops accepting, drains and exits (see [`crate::upgrade`]).
    pub upgrade_from: Option<PathBuf>,
    /// The access log's file, reopened on SIGUSR1; `None` writes it to standard output.
    pub access_log: Option<PathBuf>,
    /// How access-log lines are written.
    pub log_format: crate::access::Format,
    /// The program and arguments this process was started with, without `--upgrade-from`:
    /// on SIGUSR2 or `spliced upgrade` it starts them again with `--upgrade-from` its control
    /// socket. `None`: this process cannot start its successor.
    pub respawn: Option<Vec<std::ffi::OsString>>,
}

impl Server {
    /// Binds every listener of `config`. `config_path` is re-read on SIGHUP.
    pub fn bind(config: Config, config_path: Option<PathBuf>, options: &Options) -> Result<Server> {
        let signals = [
            signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            signal(SignalKind::hangup()).context("installing the SIGHUP handler")?,
            signal(SignalKind::user_defined1()).context("installing the SIGUSR1 handler")?,
            signal(SignalKind::user_defined2()).context("installing the SIGUSR2 handler")?,
        ];
        // On an upgrade, the running process's sockets for our addresses: the same sockets,
        // with their accept queues, so nothing is refused while the processes change.
        let mut inherited = options
            .upgrade_from
            .as_deref()
            .map(crate::upgrade::Inherited::request)
            .transpose()
            .context("taking over from the running spliced (--upgrade-from)")?;
        let mut taken = std::collections::HashMap::new();
        let mut taken_metrics = None;
        if let Some(inherited) = &mut inherited {
            for l in &config.listeners {
                if let Some(socket) = inherited.listener(l.address)? {
                    taken.insert(l.address, socket);
                }
            }
            if let Some(address) = options.metrics {
                taken_metrics = inherited.metrics(address)?;
            }
        }
        // A second instance would share the ports (SO_REUSEPORT) and take the first one's pins:
        // refuse before touching anything.
        let addresses: Vec<SocketAddr> = config
            .listeners
            .iter()
            .map(|l| l.address)
            .filter(|a| !taken.contains_key(a))
            .chain(options.metrics.filter(|_| taken_metrics.is_none()))
            .collect();
        crate::instance::check_addresses_free(&addresses)?;
        let optional = options.control_socket_optional;
        let control = match (&options.control_socket, &mut inherited) {
            (None, _) => None,
            (Some(path), Some(inherited)) => match inherited.control(path) {
                Some(control) => Some(control),
                None => crate::upgrade::ControlSocket::bind(path, optional)?,
            },
            (Some(path), None) => crate::upgrade::ControlSocket::bind(path, optional)?,
        };
        let explicit = wants_sockmap(&config);
        let loads_kernel = may_use_sockmap(&config) || config.xdp.is_some();
        // On an upgrade the old process holds the pin directory until it has stopped
        // accepting: ours are made aside and moved in then.
        let staging = match (&options.pin_dir, &inherited) {
            (Some(dir), Some(_)) => {
                // bpffs refuses names with a dot.
                let mut name = dir.as_os_str().to_owned();
                name.push(format!("-upgrade-{}", std::process::id()));
                Some(PathBuf::from(name))
            }
            _ => None,
        };
        let mut pin_lock = match &options.pin_dir {
            Some(dir) if loads_kernel && inherited.is_none() => crate::instance::lock_pin_dir(dir)?,
            _ => None,
        };
        let kernel = if loads_kernel {
            match crate::ebpf::Kernel::load(staging.as_deref().or(options.pin_dir.as_deref())) {
                Ok(kernel) => {
                    // On an upgrade, once the old process has detached its own.
                    if let (Some(xdp), None) = (&config.xdp, &inherited) {
                        kernel
                            .attach_xdp(xdp)
                            .context("starting the XDP edge filter ([xdp] in the config)")?;
                    }
                    tracing::info!(
                        pins = %options.pin_dir.as_deref().map_or("none".into(), |p| p.display().to_string()),
                        "eBPF stream verdict loaded and attached; sockmap engine available"
                    );
                    Some(Arc::new(kernel))
                }
                Err(e) if config.xdp.is_some() => {
                    return Err(e.context(
                        "[xdp] is configured but the eBPF side cannot be loaded (it needs root or \
                         CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN)",
                    ));
                }
                Err(e) if explicit => {
                    return Err(e.context(
                        "forwarding = \"sockmap\" is configured but the eBPF side cannot be loaded \
                         (it needs root or CAP_BPF and CAP_NET_ADMIN)",
                    ));
                }
                Err(e) => {
                    tracing::warn!(
                        "forwarding engine: splice, because the kernel path is unavailable: {e:#}"
                    );
                    None
                }
            }
        } else {
            None
        };
        let dir = staging.as_deref().or(options.pin_dir.as_deref());
        let packet = match crate::forward::choose::packet_load(&config) {
            PacketLoad::No => None,
            PacketLoad::Required => {
                let packet = crate::packet::Packet::start(config.packet(), dir).context(
                    "forwarding = \"packet\" is configured but the packet engine cannot start \
                     (it needs root, cgroup v2, and TCP_REPAIR)",
                )?;
                Some(Arc::new(packet))
            }
            // Attaching to the host's interfaces was asked for by the section; without the
            // engine `auto` is what it was before.
            PacketLoad::ForAuto => match crate::packet::Packet::start(config.packet(), dir) {
                Ok(packet) => {
                    tracing::info!(
                        "packet engine loaded for auto: a connection is offered to it once it \
                         moved {} bytes both ways",
                        config.packet().auto_after.unwrap_or_default()
                    );
                    Some(Arc::new(packet))
                }
                Err(e) => {
                    tracing::warn!(
                        "packet engine not loaded ([packet] is configured; it needs root, cgroup \
                         v2, and TCP_REPAIR), so auto runs without it: {e:#}"
                    );
                    None
                }
            },
        };
        if let (Some(dir), Some(_), None, None) = (&options.pin_dir, &kernel, &pin_lock, &inherited)
        {
            // The directory did not exist before loading: lock the one the pins are in now.
            pin_lock = crate::instance::lock_pin_dir(dir)?;
        }
        // Bound here, not in its task: a port in use stops the start instead of leaving an
        // error in the log and a proxy without metrics.
        let metrics = options
            .metrics
            .map(|address| {
                let listener = match taken_metrics.take() {
                    Some(listener) => listener,
                    None => std::net::TcpListener::bind(address)
                        .with_context(|| format!("binding the metrics endpoint {address}"))?,
                };
                listener.set_nonblocking(true)?;
                anyhow::Ok(listener)
            })
            .transpose()?;
        // Listening last: once the ports accept, the eBPF side (and the edge filter) is ready.
        let mut listeners = Vec::new();
        for l in &config.listeners {
            let socket = match taken.remove(&l.address) {
                Some(socket) => {
                    socket.set_nonblocking(true)?;
                    TcpListener::from_std(socket)
                        .with_context(|| format!("taking over {}", l.address))?
                }
                None => {
                    let mss = packet
                        .as_ref()
                        .filter(|_| crate::forward::choose::listener_may_use_packet(&config, l))
                        .map(|p| p.listener_mss());
                    crate::listen::bind(l.address, mss)?
                }
            };
            listeners.push((
                socket,
                Arc::new(ListenerInfo {
                    address: l.address,
                    protocol: l.protocol,
                    forwarding: l.forwarding,
                    accept_proxy: l.accept_proxy.clone(),
                }),
            ));
        }
        let max_connections = config.defaults.max_connections;
        let xdp = config.xdp.clone();
        raise_descriptor_limit(max_connections);
        let access_log = match &options.access_log {
            Some(path) => crate::access::Log::file(path, options.log_format)
                .with_context(|| format!("opening the access log {}", path.display()))?,
            None => crate::access::Log::stdout(options.log_format)
                .context("starting the access-log writer")?,
        };
        let shared = Arc::new(Shared::with_log(config, kernel, access_log)?.with_packet(packet));
        if let Some(packet) = shared.packet_kernel().cloned() {
            // From now on /metrics shows the packet engine.
            shared.packet().set_counters(move || packet.counters());
        }
        let took_over = inherited.is_some();
        if let Some(inherited) = inherited {
            let from = inherited.from().unwrap_or(0);
            // From here on the old process stops accepting: whatever fails now is logged and
            // served through, since nobody else would accept.
            match inherited.ready() {
                Ok(()) => tracing::info!(
                    from,
                    "upgrade: the old process stopped accepting; serving its listeners"
                ),
                Err(e) => tracing::error!(from, "upgrade: the old process did not confirm: {e:#}"),
            }
            if let (Some(dir), Some(kernel)) = (&options.pin_dir, shared.kernel()) {
                if let Err(e) = kernel.move_pins(dir) {
                    tracing::error!("upgrade: pinning the maps in {}: {e:#}", dir.display());
                }
                match crate::instance::lock_pin_dir(dir) {
                    Ok(lock) => pin_lock = lock,
                    Err(e) => tracing::error!("upgrade: {e:#}"),
                }
            }
            if let (Some(dir), Some(packet)) = (&options.pin_dir, shared.packet_kernel())
                && let Err(e) = packet.move_pins(dir)
            {
                tracing::error!(
                    "upgrade: pinning the packet engine's maps in {}: {e:#}",
                    dir.display()
                );
            }
            if let (Some(xdp), Some(kernel)) = (&xdp, shared.kernel())
                && let Err(e) = kernel.attach_xdp(xdp)
            {
                tracing::error!("upgrade: starting the XDP edge filter: {e:#}");
            }
        }
        Ok(Server {
            signals,
            listeners,
            shared,
            max_connections,
            config_path,
            metrics,
            pin_lock,
            control,
            descriptors: Descriptors::current(),
            took_over,
            respawn: options.respawn.clone(),
        })
    }

    /// Swaps in a new configuration for connections accepted from now on.
    pub(crate) fn reload(shared: &Shared, mut config: Config) -> Result<()> {
        if config.names_packet() && shared.packet_kernel().is_none() {
            bail!(
                "forwarding = \"packet\" needs the packet engine's kernel side, which this \
                 process did not load at start; restart spliced to use it"
            );
        }
        if crate::forward::choose::packet_load(&config) == PacketLoad::ForAuto
            && shared.packet_kernel().is_none()
        {
            tracing::warn!(
                "reload: [packet] is configured, but this process did not load the packet engine \
                 at start; auto goes on without it until a restart"
            );
        }
        if wants_sockmap(&config) && shared.kernel().is_none() {
            bail!(
                "forwarding = \"sockmap\" needs the eBPF side, which this process did not load at \
                 start (nothing asked for it then, or it could not be loaded); restart spliced \
                 to use it"
            );
        }
        let old = shared.current();
        let old_listeners: Vec<_> = old
            .config
            .listeners
            .iter()
            .map(|l| (l.address, l.protocol, &l.accept_proxy))
            .collect();
        let new_listeners: Vec<_> = config
            .listeners
            .iter()
            .map(|l| (l.address, l.protocol, &l.accept_proxy))
            .collect();
        if old.config.defaults.max_connections != config.defaults.max_connections {
            tracing::warn!(
                running = old.config.defaults.max_connections,
                file = config.defaults.max_connections,
                "max_connections changes take effect only after a restart (it sizes the \
                 descriptor limit); max_connections_per_source was reloaded"
            );
            // What runs, for /config and spliced check --against.
            config.defaults.max_connections = old.config.defaults.max_connections;
        }
        if old_listeners != new_listeners {
            tracing::warn!(
                "listener changes (accept_proxy included) take effect only after a restart; \
                 sites and timeouts were reloaded"
            );
        }
        match (&old.config.xdp, &config.xdp, shared.kernel()) {
            (Some(before), Some(now), Some(kernel)) => {
                if (&before.interfaces, before.mode) != (&now.interfaces, now.mode) {
                    tracing::warn!(
                        "XDP interface and mode changes take effect only after a restart; the \
                         deny list, ports and SYN limit were reloaded"
                    );
                }
                kernel
                    .update_xdp(now)
                    .context("reloading the XDP edge filter")?;
                log_xdp_counters(kernel);
            }
            (None, None, _) => {}
            _ => tracing::warn!("adding or removing [xdp] takes effect only after a restart"),
        }
        shared.replace_routing(Routing::new(config)?);
        Ok(())
    }

    /// Serves until SIGTERM or SIGINT, then stops accepting and lets open connections finish
    /// for up to `grace`. SIGHUP re-reads the configuration file.
    pub async fn run(self, grace: Duration) -> Result<()> {
        let (stop_tx, stop_rx) = watch::channel(false);
        // Turns true when the grace period is over: open connections end and log their line.
        let (cut_tx, cut_rx) = watch::channel(false);
        let permits = Arc::new(Semaphore::new(self.max_connections));
        let max = self.max_connections;
        let mut tasks = Vec::new();
        let Server {
            signals,
            listeners,
            shared,
            max_connections: _,
            config_path,
            metrics,
            mut pin_lock,
            control,
            descriptors,
            took_over,
            respawn,
        } = self;
        tracing::debug!(
            limit = descriptors.limit,
            reserve = descriptors.reserve,
            "descriptors"
        );
        // What a new process gets on an upgrade: a second descriptor for each socket.
        let mut offer = Vec::new();
        if let Some(listener) = &metrics {
            let address = listener.local_addr()?;
            offer.push((
                crate::upgrade::Passed::Metrics(address),
                std::os::fd::OwnedFd::from(listener.try_clone()?),
            ));
        }
        // Ends with the process (or an upgrade), not with the listeners: metrics stay
        // readable while open connections finish.
        let metrics_task = metrics.map(|listener| {
            let shared = Arc::clone(&shared);
            tokio::spawn(async move {
                if let Err(e) = crate::metrics::serve(listener, shared).await {
                    tracing::error!("{e:#}");
                }
            })
        });
        if let Some(kernel) = shared.kernel() {
            kernel.spawn_event_reader()?;
        }
        if let Some(packet) = shared.packet_kernel() {
            packet.spawn_icmp_reader()?;
        }
        let sweeper = shared
            .packet_kernel()
            .map(|_| tokio::spawn(sweep_packets(Arc::clone(&shared))));
        let this = ReloadCtx {
            shared: Arc::clone(&shared),
            config_path,
        };
        let workers = Workers::start(worker_count())?;
        let placement = Placement::new(&workers.handles);
        for (listener, info) in listeners {
            tracing::info!(address = %info.address, protocol = info.protocol.as_str(), "listening");
            let listener = listener
                .into_std()
                .with_context(|| format!("handing {} to the workers", info.address))?;
            offer.push((
                crate::upgrade::Passed::Listener(info.address),
                std::os::fd::OwnedFd::from(listener.try_clone()?),
            ));
            // Every worker accepts on the same socket; whichever is free takes the connection,
            // and the connection's task stays on that worker's thread.
            for (me, worker) in workers.handles.iter().enumerate() {
                let listener = listener
                    .try_clone()
                    .with_context(|| format!("handing {} to the workers", info.address))?;
                let placement = (placement.clone(), me);
                let info = Arc::clone(&info);
                let shared = Arc::clone(&shared);
                let permits = Arc::clone(&permits);
                let signals = (stop_rx.clone(), cut_rx.clone());
                tasks.push(worker.spawn(async move {
                    match TcpListener::from_std(listener) {
                        Ok(listener) => {
                            accept_loop(
                                placement,
                                listener,
                                info,
                                shared,
                                permits,
                                signals,
                                descriptors,
                            )
                            .await
                        }
                        Err(e) => tracing::error!(address = %info.address, "accepting: {e}"),
                    }
                }));
            }
        }
        // Every listener is bound and the eBPF side attached (both in `bind`), and the workers
        // accept: now systemd may send traffic our way.
        let mut systemd = crate::notify::Systemd::start(&shared, &workers.handles);
        if took_over {
            systemd.ready_after_takeover();
        } else {
            systemd.ready();
        }
        let (takeover_tx, mut takeovers) = tokio::sync::mpsc::channel(1);
        let (spawn_tx, mut spawn_requests) = tokio::sync::mpsc::channel(4);
        let control_path = control.as_ref().map(|c| c.path().to_owned());
        if let Some(control) = control {
            offer.push((
                crate::upgrade::Passed::Control(control.path().to_owned()),
                control.try_clone_fd()?,
            ));
            crate::upgrade::serve(
                control,
                crate::upgrade::Offer { items: offer },
                takeover_tx,
                spawn_tx,
            )?;
        }
        let (mut upgrading, mut exited) = Upgrading::new(respawn, control_path.clone());
        let [mut term, mut int, mut hup, mut usr1, mut usr2] = signals;
        let mut takeover = None;
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = hup.recv() => {
                    systemd.reloading();
                    this.reload_from_file();
                    systemd.ready();
                }
                _ = usr2.recv() => upgrading.start(None),
                Some(conn) = spawn_requests.recv() => upgrading.start(Some(conn)),
                Some((pid, how)) = exited.recv() => upgrading.exited(pid, &how),
                Some(t) = takeovers.recv() => {
                    takeover = Some(t);
                    break;
                }
                _ = usr1.recv() => {
                    // May wait for room in a full queue: not on the control thread.
                    let log = Arc::clone(&shared);
                    tokio::task::spawn_blocking(move || log.reopen_access_log());
                }
            }
        }
        match &takeover {
            // The service goes on in the new process: no STOPPING=1.
            Some(t) => systemd.handing_over(t.pid),
            None => systemd.stopping(),
        }
        tracing::info!("stopping: no new connections; waiting up to {grace:?} for open ones");
        let _ = stop_tx.send(true);
        if let Some(packet) = shared.packet_kernel() {
            packet.stop_handoffs();
        }
        for task in tasks {
            let _ = task.await;
        }
        // A new process that became ready while we were stopping anyway takes over too.
        match takeover.or_else(|| takeovers.try_recv().ok()) {
            Some(t) => {
                tracing::info!(
                    pid = t.pid,
                    "upgrade: the new process is ready; this one has stopped accepting and \
                     drains"
                );
                // It serves /metrics on the same socket now.
                if let Some(task) = &metrics_task {
                    task.abort();
                }
                if let Some(kernel) = shared.kernel() {
                    kernel.detach_xdp();
                    // Our kernel-spliced connections go on in our maps, unpinned.
                    kernel.unpin();
                }
                if let Some(packet) = shared.packet_kernel() {
                    // Likewise our handed-off connections; the sweeper still ends them.
                    packet.unpin();
                }
                drop(pin_lock.take());
                let _ = t.released.send(());
                upgrading.answer(&Ok(u32::try_from(t.pid).unwrap_or_default()));
            }
            None => {
                upgrading.answer(&Err("spliced is stopping (SIGTERM or SIGINT)".to_owned()));
                if let Some(path) = &control_path {
                    let _ = std::fs::remove_file(path);
                }
            }
        }
        let deadline = tokio::time::Instant::now() + grace;
        while permits.available_permits() < max && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if let Some(packet) = shared.packet_kernel() {
            // Handed-off connections still there end now (end=stop): their entries go, their
            // tasks write their lines. Their peers get an RST on their next segment.
            if let Some(task) = &sweeper {
                task.abort();
            }
            let packet = Arc::clone(packet);
            let settings = shared.current().config.packet.clone();
            let ends = tokio::task::spawn_blocking(move || packet.sweep(&settings, true))
                .await
                .unwrap_or_default();
            for end in ends.0 {
                shared.packet().count_expiry(end);
            }
            shared.packet().set_entries(0);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
            while permits.available_permits() < max && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let open = max - permits.available_permits();
        if open > 0 {
            tracing::warn!(
                open,
                "closing connections still open after the grace period"
            );
            // Each ends with outcome=shutdown and its access-log line; a moment is enough,
            // nothing waits on a peer any more.
            let _ = cut_tx.send(true);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
            while permits.available_permits() < max && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        if let Some(task) = metrics_task {
            task.abort();
        }
        if let Some(kernel) = shared.kernel() {
            let counters: Vec<String> = kernel
                .counters()
                .iter()
                .map(|(n, v)| format!("{n}={v}"))
                .collect();
            tracing::info!("kernel counters: {}", counters.join(" "));
            log_xdp_counters(kernel);
        }
        // The lines of every connection that ended are queued; whoever reads our output after
        // we stop must find them all. (Dropping the log waits too, but only once the last task
        // holding `shared` is gone.)
        let log = Arc::clone(&shared);
        let _ =
            tokio::task::spawn_blocking(move || log.flush_access_log(ACCESS_LOG_FLUSH_LIMIT)).await;
        if let Some(packet) = shared.packet_kernel() {
            packet.unpin();
        }
        drop((pin_lock, systemd));
        workers.stop();
        Ok(())
    }
}

/// The packet engine's sweeper: once a second, ends the handed-off connections whose entries
/// say so, counts their ends, and updates the entries gauge. Two map reads per connection: on
/// a blocking thread, off the accepting workers.
async fn sweep_packets(shared: Arc<Shared>) {
    let Some(packet) = shared.packet_kernel().cloned() else {
        return;
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let settings = shared.current().config.packet.clone();
        let packet = Arc::clone(&packet);
        let Ok((ends, live)) =
            tokio::task::spawn_blocking(move || packet.sweep(&settings, false)).await
        else {
            continue;
        };
        let stats = shared.packet();
        for end in ends {
            stats.count_expiry(end);
        }
        stats.set_entries(live as u64);
    }
}

/// Raises the soft `RLIMIT_NOFILE` to what `max_connections` connections need (up to the hard
/// limit) and logs what was asked and what was obtained.
fn raise_descriptor_limit(max_connections: usize) {
    let asked = crate::limits::descriptors_needed(max_connections);
    match crate::limits::raise_nofile(asked) {
        Ok(n) if n.obtained >= asked => tracing::info!(
            asked,
            obtained = n.obtained,
            before = n.before,
            hard = n.hard,
            max_connections,
            "descriptor limit (RLIMIT_NOFILE)"
        ),
        Ok(n) => tracing::warn!(
            asked,
            obtained = n.obtained,
            before = n.before,
            hard = n.hard,
            max_connections,
            "descriptor limit (RLIMIT_NOFILE) is below what max_connections needs (raise the \
             hard limit, e.g. systemd's LimitNOFILE): near it, connections without a hello are \
             shed and accepting backs off"
        ),
        Err(e) => tracing::warn!(asked, "descriptor limit (RLIMIT_NOFILE) not raised: {e}"),
    }
}

/// Upgrades this process starts itself (SIGUSR2, `spliced upgrade`): at most one at a time,
/// and the `spliced upgrade` connections waiting for its outcome.
struct Upgrading {
    respawn: Option<Vec<std::ffi::OsString>>,
    control: Option<PathBuf>,
    /// The new process, while it starts.
    pending: Option<u32>,
    waiting: Vec<std::os::fd::OwnedFd>,
    /// Where a started process's PID and how it exited are sent.
    exits: tokio::sync::mpsc::UnboundedSender<(u32, String)>,
}

impl Upgrading {
    /// Also returns where the started processes' exits arrive, for [`Upgrading::exited`].
    fn new(
        respawn: Option<Vec<std::ffi::OsString>>,
        control: Option<PathBuf>,
    ) -> (
        Upgrading,
        tokio::sync::mpsc::UnboundedReceiver<(u32, String)>,
    ) {
        let (exits, exited) = tokio::sync::mpsc::unbounded_channel();
        let upgrading = Upgrading {
            respawn,
            control,
            pending: None,
            waiting: Vec::new(),
            exits,
        };
        (upgrading, exited)
    }

    /// Starts the successor, unless one is starting already (then `reply` waits for that
    /// one's outcome too).
    fn start(&mut self, reply: Option<std::os::fd::OwnedFd>) {
        self.waiting.extend(reply);
        if let Some(pid) = self.pending {
            tracing::info!(pid, "upgrade: already under way");
            return;
        }
        let started = match (&self.respawn, &self.control) {
            (_, None) => Err(anyhow::anyhow!(
                "this process serves no control socket for the new one to take the listeners \
                 from (--control-socket)"
            )),
            (None, _) => Err(anyhow::anyhow!(
                "no command line to start the new process with"
            )),
            (Some(argv), Some(control)) => crate::upgrade::spawn_successor(argv, control),
        };
        match started {
            Ok((pid, pidfd)) => {
                tracing::info!(
                    pid,
                    "upgrade: started a new process; it takes over once ready"
                );
                self.pending = Some(pid);
                let exits = self.exits.clone();
                // Not our child (see `spawn_successor`): its pidfd says when it is gone.
                let waiter = std::thread::Builder::new()
                    .name("spliced-upgrade".to_owned())
                    .spawn(move || {
                        let how = match crate::upgrade::wait_exit(&pidfd) {
                            Ok(()) => "it exited".to_owned(),
                            Err(e) => format!("watching it failed: {e:#}"),
                        };
                        let _ = exits.send((pid, how));
                    });
                if let Err(e) = waiter {
                    tracing::warn!(pid, "upgrade: not watching the new process: {e}");
                }
            }
            Err(e) => {
                tracing::error!("upgrade failed, still serving with this process: {e:#}");
                self.answer(&Err(format!("{e:#}")));
            }
        }
    }

    /// A process this one started has exited: before it took over, the upgrade failed.
    fn exited(&mut self, pid: u32, how: &str) {
        if self.pending != Some(pid) {
            return;
        }
        tracing::error!(
            pid,
            "upgrade failed: the new process ended before it took over ({how}; its error is \
             logged above); still serving with this process"
        );
        self.answer(&Err(format!(
            "the new process (PID {pid}) exited before it took over ({how}); the running \
             process serves on (see its log for why)"
        )));
    }

    /// Answers every waiting `spliced upgrade` with the outcome, and ends the upgrade.
    fn answer(&mut self, outcome: &std::result::Result<u32, String>) {
        self.pending = None;
        for conn in self.waiting.drain(..) {
            crate::upgrade::answer_spawn(&conn, outcome);
        }
    }
}

/// How many connection workers to run: one per CPU the process may use.
fn worker_count() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// The threads connections run on: each drives its own single-threaded tokio runtime, so a
/// connection's task, its sockets and its timers stay on one thread for the connection's
/// whole life. With one shared work-stealing runtime, a task woken on one thread was often
/// taken up by the other, and every such hand-off cost a futex wake-up: on keep-alive HTTP,
/// 0.1-0.3 per request, which HAProxy's thread-bound connections do not pay. The control
/// tasks (signals, reload, `/metrics`, the verdict's events) stay on the main runtime.
struct Workers {
    handles: Vec<tokio::runtime::Handle>,
    stops: Vec<tokio::sync::oneshot::Sender<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Workers {
    fn start(count: usize) -> Result<Workers> {
        let mut workers = Workers {
            handles: Vec::with_capacity(count),
            stops: Vec::with_capacity(count),
            threads: Vec::with_capacity(count),
        };
        for i in 0..count {
            // Connections are over when a worker stops (or were cut); it does not wait for a
            // blocking task that a peer holds up.
            let worker =
                crate::runtime_thread::start(format!("spliced-w{i}"), Duration::from_secs(1))
                    .context("starting a connection worker")?;
            workers.handles.push(worker.handle);
            workers.stops.push(worker.stop);
            workers.threads.push(worker.thread);
        }
        Ok(workers)
    }

    /// Stops every worker and waits for its thread.
    fn stop(self) {
        for stop in self.stops {
            let _ = stop.send(());
        }
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

/// Logs the edge filter's counters, if it is attached anywhere.
fn log_xdp_counters(kernel: &crate::ebpf::Kernel) {
    let (counters, attached) = kernel.xdp_counters();
    if attached.is_empty() {
        return;
    }
    let counters: Vec<String> = counters.iter().map(|(n, v)| format!("{n}={v}")).collect();
    tracing::info!("xdp counters: {}", counters.join(" "));
}

/// What SIGHUP needs: where the config is and what to swap.
struct ReloadCtx {
    shared: Arc<Shared>,
    config_path: Option<PathBuf>,
}

impl ReloadCtx {
    fn reload_from_file(&self) {
        let Some(path) = &self.config_path else {
            return;
        };
        match Config::load(path) {
            Ok(config) => match Server::reload(&self.shared, config) {
                Ok(()) => tracing::info!(config = %path.display(), "configuration reloaded"),
                Err(e) => {
                    tracing::error!("reload refused, keeping the running configuration: {e:#}")
                }
            },
            Err(e) => tracing::error!("reload refused, keeping the running configuration: {e}"),
        }
    }
}

/// Where new connections run: each on the worker with the fewest open connections, so that a
/// burst accepted by one worker while the other slept does not leave that one with every
/// connection (one core busy, the other idle) for their whole lives.
#[derive(Clone)]
struct Placement {
    handles: Arc<[tokio::runtime::Handle]>,
    /// Open connections per worker.
    loads: Arc<[AtomicUsize]>,
}

impl Placement {
    fn new(handles: &[tokio::runtime::Handle]) -> Placement {
        Placement {
            handles: handles.into(),
            loads: handles.iter().map(|_| AtomicUsize::new(0)).collect(),
        }
    }

    /// The worker for a connection accepted on worker `me`: `me`, unless another has fewer
    /// connections. The connection counts there until the returned guard is dropped.
    fn choose(&self, me: usize) -> WorkerLoad {
        let count = |i: usize| self.loads.get(i).map_or(usize::MAX, |l| l.load(Relaxed));
        let mut worker = me;
        for i in 0..self.loads.len() {
            if count(i) < count(worker) {
                worker = i;
            }
        }
        if let Some(l) = self.loads.get(worker) {
            l.fetch_add(1, Relaxed);
        }
        WorkerLoad {
            loads: Arc::clone(&self.loads),
            worker,
        }
    }
}

/// One connection counted on a worker, until dropped.
struct WorkerLoad {
    loads: Arc<[AtomicUsize]>,
    worker: usize,
}

impl Drop for WorkerLoad {
    fn drop(&mut self) {
        if let Some(l) = self.loads.get(self.worker) {
            l.fetch_sub(1, Relaxed);
        }
    }
}

async fn accept_loop(
    (placement, me): (Placement, usize),
    listener: TcpListener,
    info: Arc<ListenerInfo>,
    shared: Arc<Shared>,
    permits: Arc<Semaphore>,
    (mut stop, cut): (watch::Receiver<bool>, watch::Receiver<bool>),
    descriptors: Descriptors,
) {
    let batch = crate::shed::batch_for(descriptors.reserve);
    // Accept failures since the last warning, and when that was.
    let (mut failures, mut last_warned) = (0u64, None);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.changed() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                if descriptors.pressed(std::os::fd::AsRawFd::as_raw_fd(&stream)) {
                    // Near the limit: the oldest connections still without a hello make room
                    // before the table is full, so served clients find their backend socket.
                    shared.pre_hello().shed_oldest(batch);
                }
                // Over the limit the connection is closed at once rather than left in the
                // accept queue: the client learns it now, and the queue stays for the rest.
                let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
                    conn::close_at_once(&stream, peer, &info, &shared, Outcome::OverMaxConnections);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let info = Arc::clone(&info);
                let shared = Arc::clone(&shared);
                let cut = cut.clone();
                let load = placement.choose(me);
                let target = load.worker;
                if target == me {
                    tokio::spawn(async move {
                        let open = shared.open_connection();
                        conn::handle(stream, peer, info, shared, cut).await;
                        drop((open, permit, load));
                    });
                    continue;
                }
                // Another worker has fewer connections: the socket moves to its reactor.
                let stream = match stream.into_std() {
                    Ok(stream) => stream,
                    Err(e) => {
                        tracing::warn!(address = %info.address, "handing a connection over: {e}");
                        continue;
                    }
                };
                placement.handles[target].spawn(async move {
                    match tokio::net::TcpStream::from_std(stream) {
                        Ok(stream) => {
                            let open = shared.open_connection();
                            conn::handle(stream, peer, info, shared, cut).await;
                            drop(open);
                        }
                        Err(e) => {
                            tracing::warn!(address = %info.address, "handing a connection over: {e}")
                        }
                    }
                    drop((permit, load));
                });
            }
            Err(e) => {
                // EMFILE and friends: shed connections still without a hello and retry soon;
                // with none to shed, back off instead of spinning on a full descriptor table.
                let shed = shared.pre_hello().shed_oldest(batch);
                // Once a second at most: backing off at the limit retries ten times a second
                // on every worker, which would otherwise flood the log while it lasts.
                failures += 1;
                if last_warned.is_none_or(|at: Instant| at.elapsed() >= ACCEPT_WARN_EVERY) {
                    tracing::warn!(
                        address = %info.address,
                        shed,
                        failures,
                        "accept failed: {e}"
                    );
                    last_warned = Some(Instant::now());
                    failures = 0;
                }
                let pause = if shed > 0 { 10 } else { 100 };
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reload takes the new per-source limit, but the global one stays what the process
    /// started with (its descriptor limit was sized for it), and the running configuration
    /// says so.
    #[test]
    fn reload_keeps_max_connections_and_takes_the_per_source_limit() {
        let log = crate::access::Log::new(4, std::io::sink()).expect("writer thread");
        let shared = crate::shared::tests::shared(log);
        let text = "[defaults]\nmax_connections = 5\nmax_connections_per_source = 3\n\
                    [[listen]]\naddress = \"127.0.0.1:443\"\nprotocol = \"tls\"\n";
        let config = Config::from_str(text, std::path::Path::new("new.toml")).expect("config");
        Server::reload(&shared, config).expect("reload");
        let running = &shared.current().config.defaults;
        assert_eq!(running.max_connections, 10_000);
        assert_eq!(running.max_connections_per_source, Some(3));
    }
}
