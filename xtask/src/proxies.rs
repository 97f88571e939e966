//! The proxies `cargo xtask bench` compares, started once in a [`World`]'s proxy namespace and
//! shared by every part of the bench that needs them.
//!
//! All of them do the same job: accept IPv4 clients on 192.0.2.1, read the TLS ClientHello,
//! route on its server name to one IPv6 backend, announce the client with a PROXY header, and
//! write one access-log line per connection to a file.
//! spliced and HAProxy send PROXY v2; nginx's stream module can only send v1, so it does.
//!
//! - spliced, one process per forwarding engine (`sockmap.bench`, `splice.bench`,
//!   `copy.bench`), and the sockmap engine twice: with its backlog limit raised to 4 GiB (the
//!   kernel path alone) and at its default limit; and the packet engine (`packet.bench`,
//!   `forwarding = "packet"` on the proxy's two veths, handoff once a connection moved
//!   [`PACKET_AFTER`], as the README tells users to run it), with its `/metrics` kept for the
//!   handoff cost;
//! - HAProxy in `mode tcp`: `req.ssl_sni` routing, `send-proxy-v2`, 2 threads (the machine's
//!   core count); one route with splicing forced both ways (`option splice-request` and
//!   `splice-response`: the baseline the tables compare with) and one with `option
//!   splice-auto`, which did not splice these transfers at all (see [`start_haproxy`]);
//! - nginx's stream module: `ssl_preread`, a `map` from the server name to the backend,
//!   `proxy_protocol on`, 2 worker processes.
//!
//! A contender whose program or module is missing is skipped with the reason in
//! [`Proxies::skipped`] rather than failing the whole bench.
use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use nix::sys::signal::Signal;
use spliced_tests::{
    Ns, PROXY_V4, Service, World, backends,
    spliced::{Launch, Spliced},
    wait_for,
};

/// Client-facing ports on 192.0.2.1.
const SPLICED_PORT: u16 = 443;
const SPLICED_DEFAULT_LIMIT_PORT: u16 = 444;
const HAPROXY_PORT: u16 = 445;
const NGINX_PORT: u16 = 446;
const SPLICED_SPLICE_PORT: u16 = 447;
const SPLICED_COPY_PORT: u16 = 448;
const SPLICED_PACKET_PORT: u16 = 449;

/// The packet engine contender's `packet.after`: issue 15 asks for connections per second
/// with the handoff kept for connections that moved enough bytes where it costs more than a
/// short connection gains (the crossover part shows where), and it is how the README tells
/// users to run the engine. Bulk transfers pass it within their first milliseconds.
pub(crate) const PACKET_AFTER: u64 = 1 << 20;

/// The name of the packet engine's contender (`--contender packet` selects it).
pub(crate) const PACKET_NAME: &str = "spliced, engine packet";

/// Threads or worker processes for HAProxy and nginx: one per core of the bench machine.
const WORKERS: u32 = 2;

/// One proxy contender, listening and ready.
#[derive(Clone, Debug)]
pub(crate) struct Running {
    /// What the bench's tables call it.
    pub name: String,
    /// Where clients connect (in the client namespace).
    pub target: SocketAddr,
    /// The server name its clients send, which routes them to the backend.
    pub sni: String,
    /// The processes that make it up when it started (nginx: master and workers).
    pub pids: Vec<u32>,
    /// The PROXY protocol version it sends to the backend.
    pub proxy_protocol: u8,
    /// Whether it is the one other proxies are compared with ("vs HAProxy"): HAProxy with
    /// splicing forced, the fastest setup of the established proxies here.
    pub baseline: bool,
}

impl Running {
    /// User plus system CPU seconds used so far by its processes and their descendants.
    pub(crate) fn cpu_seconds(&self) -> Result<f64> {
        tree_cpu(&self.pids)
    }
}

/// The running contenders; their processes are stopped when this is dropped.
pub(crate) struct Proxies {
    pub running: Vec<Running>,
    /// Contenders not started, with why (e.g. nginx without its stream module).
    pub skipped: Vec<String>,
    /// Concurrent proxied connections each proxy is configured to take (see
    /// [`connection_limit`]).
    pub max_connections: u32,
    /// The packet engine's spliced, kept whole for its `/metrics` (handoff cost, refusals);
    /// `None` when the engine could not start here (the reason is in `skipped`).
    pub packet: Option<Spliced>,
    /// Kept only to stop them on drop (each [`Service`] stops its own process by PID).
    _services: Vec<Service>,
}

/// Starts every proxy contender in `world`'s proxy namespace, each routing its server name to
/// `backend`, and waits until each listens.
pub(crate) fn start(world: &World, backend: SocketAddr) -> Result<Proxies> {
    let mut proxies = Proxies {
        running: Vec::new(),
        skipped: Vec::new(),
        max_connections: connection_limit()?,
        packet: None,
        _services: Vec::new(),
    };
    start_spliced(world, backend, &mut proxies)?;
    match haproxy_version() {
        Ok(version) => start_haproxy(world, backend, &version, &mut proxies)?,
        Err(why) => proxies.skipped.push(format!("HAProxy: {why:#}")),
    }
    match nginx_stream() {
        Ok(stream) => start_nginx(world, backend, &stream, &mut proxies)?,
        Err(why) => proxies.skipped.push(format!("nginx: {why:#}")),
    }
    for why in &proxies.skipped {
        eprintln!("bench: skipping {why}");
    }
    Ok(proxies)
}

fn start_spliced(world: &World, backend: SocketAddr, proxies: &mut Proxies) -> Result<()> {
    let max = proxies.max_connections;
    // One process per engine, so that each one's CPU and memory are its own: memory a process
    // freed after one contender's connections would otherwise flatter the next one's.
    // The first sockmap row raises the backlog limit above the transfer size and hands every
    // byte to the kernel at once, so it measures the kernel path alone (see forward::sockmap);
    // the second is what `auto` does by default: splice for the first 256 KiB of each
    // direction, then the kernel, and splice again while a reader falls behind.
    let contenders = [
        (
            "spliced, engine sockmap (limit 4GiB)",
            SPLICED_PORT,
            "sockmap",
            "sockmap_backlog_limit = \"4GiB\"\nsockmap_handoff = 0\n",
        ),
        (
            "spliced, engine sockmap (default 4MiB limit)",
            SPLICED_DEFAULT_LIMIT_PORT,
            "sockmap",
            "",
        ),
        ("spliced, engine splice", SPLICED_SPLICE_PORT, "splice", ""),
        ("spliced, engine copy", SPLICED_COPY_PORT, "copy", ""),
    ];
    for (name, port, engine, extra) in contenders {
        let config = format!(
            "[defaults]\n{extra}max_connections = {max}\n\
             [[listen]]\naddress = \"0.0.0.0:{port}\"\nprotocol = \"tls\"\n\
             [[site]]\nhostnames = [\"{engine}.bench\"]\nbackend = \"{backend}\"\n\
             forwarding = \"{engine}\"\nproxy_protocol = \"v2\"\n"
        );
        let service = Launch::new(config)
            .named(&format!("spliced-{port}"))
            .start(world, &[port])?
            .into_service();
        let pid = service
            .pid()
            .with_context(|| format!("{name} has no PID"))?;
        proxies.running.push(Running {
            name: name.into(),
            target: SocketAddr::new(PROXY_V4, port),
            sni: format!("{engine}.bench"),
            pids: vec![pid],
            proxy_protocol: 2,
            baseline: false,
        });
        proxies._services.push(service);
    }
    // The packet engine: one process only, as its tcx programs pass every segment they do not
    // translate with TC_ACT_OK, which ends the interface's tcx chain: a second packet-engine
    // spliced attached after the first would never see a segment.
    match start_packet(world, backend, max, SPLICED_PACKET_PORT, PACKET_AFTER) {
        Ok(spliced) => {
            let pid = spliced
                .pid()
                .context("the packet engine's spliced has no PID")?;
            proxies.running.push(Running {
                name: PACKET_NAME.into(),
                target: SocketAddr::new(PROXY_V4, SPLICED_PACKET_PORT),
                sni: "packet.bench".into(),
                pids: vec![pid],
                proxy_protocol: 2,
                baseline: false,
            });
            proxies.packet = Some(spliced);
        }
        Err(why) => proxies.skipped.push(format!("{PACKET_NAME}: {why:#}")),
    }
    Ok(())
}

/// The configuration of a spliced on the packet engine: every connection to `packet.bench` on
/// `port` handed to the TC programs on the proxy namespace's two veths once `after` bytes
/// moved (0: right after the preface), PROXY v2 to `backend`.
pub(crate) fn packet_config(backend: SocketAddr, max: u32, port: u16, after: u64) -> String {
    format!(
        "[defaults]\nmax_connections = {max}\n\
         [packet]\ninterfaces = [\"eth0\", \"eth1\"]\nafter = {after}\n\
         [[listen]]\naddress = \"0.0.0.0:{port}\"\nprotocol = \"tls\"\n\
         [[site]]\nhostnames = [\"packet.bench\"]\nbackend = \"{backend}\"\n\
         forwarding = \"packet\"\nproxy_protocol = \"v2\"\n"
    )
}

/// Starts a spliced on the packet engine (see [`packet_config`]) with its `/metrics`, and
/// waits until it listens on `port`.
pub(crate) fn start_packet(
    world: &World,
    backend: SocketAddr,
    max: u32,
    port: u16,
    after: u64,
) -> Result<Spliced> {
    Launch::new(packet_config(backend, max, port, after))
        .named(&format!("spliced-{port}"))
        .metrics()
        .start(world, &[port])
}

/// Whether the contender named `name` is one of spliced's engines (what issue 6's bar is
/// about), as [`start_spliced`] names them.
pub(crate) fn is_spliced(name: &str) -> bool {
    name.starts_with("spliced")
}

/// `2.6.12` from `haproxy -v`; fails if HAProxy is not installed.
pub(crate) fn haproxy_version() -> Result<String> {
    let out = Command::new("haproxy")
        .arg("-v")
        .output()
        .context("haproxy is not installed (Debian: apt-get install haproxy)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "HAProxy version 2.6.12-1+deb12u4 2026/10/17 - https://haproxy.org/"
    let version = text
        .split_whitespace()
        .nth(2)
        .and_then(|v| v.split('-').next())
        .with_context(|| format!("unexpected `haproxy -v` output: {text}"))?;
    Ok(version.to_owned())
}

fn start_haproxy(
    world: &World,
    backend: SocketAddr,
    version: &str,
    proxies: &mut Proxies,
) -> Result<()> {
    let max = proxies.max_connections;
    // Two routes in one process, to the same backend: one splicing every connection in both
    // directions, one leaving it to `option splice-auto`, whose heuristic (a channel becomes a
    // "fast streamer" after three reads that fill the buffer, then the stream decides) never
    // switched these transfers to splice() with HAProxy 2.6: they were copied through 16 KiB
    // buffers (recvfrom/sendto) from start to end. With splicing forced, HAProxy 2.6.12 now
    // and then ends the server-to-client direction early, logging a normal close and fewer
    // bytes than the backend sent (about 1 transfer of 256 MiB in 30 here); the bench lists
    // such transfers under its table.
    let routes = [
        (
            "haproxy.bench",
            "splice",
            "splice forced",
            ["option splice-request", "option splice-response"].as_slice(),
        ),
        (
            "haproxy-auto.bench",
            "auto",
            "splice-auto",
            ["option splice-auto"].as_slice(),
        ),
    ];
    // maxconn also sizes HAProxy's file descriptors: two per connection plus a pipe (two)
    // for every fourth, which [`connection_limit`] leaves room for.
    let mut conf = vec![
        "global".to_string(),
        format!("  nbthread {WORKERS}"),
        format!("  maxconn {max}"),
        // One line per connection, like spliced's access log (written to standard output,
        // which the bench keeps in a file).
        "  log stdout format raw local0 info".into(),
        "defaults".into(),
        "  mode tcp".into(),
        "  log global".into(),
        "  option tcplog".into(),
        format!("  maxconn {max}"),
        "  timeout connect 5s".into(),
        "  timeout client 10m".into(),
        "  timeout server 10m".into(),
        "frontend bench".into(),
        format!("  bind {PROXY_V4}:{HAPROXY_PORT}"),
        "  tcp-request inspect-delay 5s".into(),
        "  tcp-request content accept if { req.ssl_hello_type 1 }".into(),
    ];
    for (sni, name, _, _) in routes {
        conf.push(format!(
            "  use_backend {name} if {{ req.ssl_sni -i {sni} }}"
        ));
    }
    for (_, name, _, options) in routes {
        conf.push(format!("backend {name}"));
        conf.extend(options.iter().map(|o| format!("  {o}")));
        conf.push(format!("  server sink {backend} send-proxy-v2"));
    }
    conf.push(String::new());
    let path = world.dir().join("bench-haproxy.cfg");
    std::fs::write(&path, conf.join("\n"))?;
    let mut cmd = world.command(Ns::Proxy, "haproxy");
    cmd.arg("-db").arg("-f").arg(&path);
    // SIGTERM: a hard stop, nothing to flush.
    let mut service = Service::start("bench-haproxy", cmd, world.dir())?.stop_with(Signal::SIGTERM);
    backends::wait_listening(world, Ns::Proxy, HAPROXY_PORT, &mut service)?;
    let pid = service.pid().context("HAProxy has no PID")?;
    for (i, (sni, _, label, _)) in routes.into_iter().enumerate() {
        proxies.running.push(Running {
            name: format!("HAProxy {version} (tcp, {label}, {WORKERS} threads)"),
            target: SocketAddr::new(PROXY_V4, HAPROXY_PORT),
            sni: sni.into(),
            pids: vec![pid],
            proxy_protocol: 2,
            baseline: i == 0,
        });
    }
    proxies._services.push(service);
    Ok(())
}

/// How this nginx gets its stream module.
struct NginxStream {
    version: String,
    /// `Some(path)` when it is a dynamic module to load.
    module: Option<PathBuf>,
}

/// Finds out whether nginx is installed and has its stream module (built in, or a dynamic
/// module that is installed: Debian ships it in libnginx-mod-stream).
fn nginx_stream() -> Result<NginxStream> {
    let (version, text) = nginx_build()?;
    let options: Vec<&str> = text.split_whitespace().collect();
    if options.contains(&"--with-stream") {
        return Ok(NginxStream {
            version,
            module: None,
        });
    }
    if !options.contains(&"--with-stream=dynamic") {
        bail!("nginx {version} was built without its stream module");
    }
    let dir = options
        .iter()
        .find_map(|o| o.strip_prefix("--modules-path="))
        .unwrap_or("/usr/lib/nginx/modules");
    let module = Path::new(dir).join("ngx_stream_module.so");
    if !module.is_file() {
        bail!(
            "nginx {version}'s stream module is not installed ({} is missing; Debian: \
             apt-get install libnginx-mod-stream)",
            module.display()
        );
    }
    Ok(NginxStream {
        version,
        module: Some(module),
    })
}

/// nginx's version and `nginx -V`'s output (its build options); fails if it is not installed.
fn nginx_build() -> Result<(String, String)> {
    let out = Command::new("nginx")
        .arg("-V")
        .output()
        .context("nginx is not installed (Debian: apt-get install nginx libnginx-mod-stream)")?;
    // nginx prints its version and build options to standard error.
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    let version = text
        .split_whitespace()
        .find_map(|w| w.strip_prefix("nginx/"))
        .with_context(|| format!("unexpected `nginx -V` output: {text}"))?
        .to_owned();
    Ok((version, text))
}

/// `1.22.1` from `nginx -V`; fails if nginx is not installed.
pub(crate) fn nginx_version() -> Result<String> {
    Ok(nginx_build()?.0)
}

fn start_nginx(
    world: &World,
    backend: SocketAddr,
    stream: &NginxStream,
    proxies: &mut Proxies,
) -> Result<()> {
    let sni = "nginx.bench";
    let dir = world.dir().display().to_string();
    let load = match &stream.module {
        Some(module) => format!("load_module {};", module.display()),
        None => "# the stream module is built in".into(),
    };
    // nginx counts the client's and the backend's socket against worker_connections, and has
    // no limit across workers: each may take the whole limit, as far as its descriptors go.
    let conf = [
        load,
        format!("worker_processes {WORKERS};"),
        format!("worker_rlimit_nofile {};", open_files_limit()?),
        "daemon off;".into(),
        format!("pid {dir}/bench-nginx.pid;"),
        format!("error_log {dir}/bench-nginx-error.log notice;"),
        format!(
            "events {{ worker_connections {}; }}",
            2 * proxies.max_connections
        ),
        "stream {".into(),
        // One line per connection, like spliced's access log.
        "  log_format per_connection '$remote_addr [$time_local] $ssl_preread_server_name \
         $upstream_addr $status $bytes_received $bytes_sent $session_time';"
            .into(),
        format!("  access_log {dir}/bench-nginx-access.log per_connection;"),
        "  map $ssl_preread_server_name $backend_by_sni {".into(),
        format!("    {sni} \"{backend}\";"),
        "  }".into(),
        "  server {".into(),
        format!("    listen {PROXY_V4}:{NGINX_PORT};"),
        "    ssl_preread on;".into(),
        "    preread_timeout 5s;".into(),
        "    proxy_pass $backend_by_sni;".into(),
        "    proxy_protocol on;".into(),
        // Without it nginx closes both directions when the client half-closes.
        "    proxy_half_close on;".into(),
        "    proxy_connect_timeout 5s;".into(),
        "    proxy_timeout 10m;".into(),
        "  }".into(),
        "}".into(),
        String::new(),
    ]
    .join("\n");
    let path = world.dir().join("bench-nginx.conf");
    std::fs::write(&path, conf)?;
    let mut cmd = world.command(Ns::Proxy, "nginx");
    cmd.arg("-c").arg(&path);
    // SIGTERM: nginx's fast shutdown.
    let mut service = Service::start("bench-nginx", cmd, world.dir())?.stop_with(Signal::SIGTERM);
    backends::wait_listening(world, Ns::Proxy, NGINX_PORT, &mut service)?;
    let master = service.pid().context("nginx has no PID")?;
    let mut workers = Vec::new();
    wait_for(
        &format!("{WORKERS} nginx workers"),
        Duration::from_secs(10),
        || {
            service.check_running()?;
            workers = children(master);
            Ok(workers.len() >= WORKERS as usize)
        },
    )?;
    let mut pids = vec![master];
    pids.extend(workers);
    proxies.running.push(Running {
        name: format!(
            "nginx {} (stream, {WORKERS} workers, PROXY v1)",
            stream.version
        ),
        target: SocketAddr::new(PROXY_V4, NGINX_PORT),
        sni: sni.into(),
        pids,
        proxy_protocol: 1,
        baseline: false,
    });
    proxies._services.push(service);
    Ok(())
}

/// Concurrent proxied connections every proxy is configured for: as many as fit in this
/// machine's hard limit on open files (which the proxies inherit and, without
/// `CAP_SYS_RESOURCE`, cannot raise), the tightest being HAProxy's two descriptors per
/// connection plus a pipe for every fourth one.
pub(crate) fn connection_limit() -> Result<u32> {
    Ok(open_files_limit()?.saturating_sub(64) * 2 / 5)
}

/// The hard limit on open files of this process, which the proxies inherit.
fn open_files_limit() -> Result<u32> {
    let limits = std::fs::read_to_string("/proc/self/limits")?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .context("no \"Max open files\" in /proc/self/limits")?;
    // "Max open files            20000                20000                files"
    let hard = line
        .split_whitespace()
        .nth(4)
        .with_context(|| format!("unexpected /proc/self/limits line: {line}"))?;
    match hard {
        "unlimited" => Ok(1 << 20),
        n => Ok(n.parse::<u64>()?.min(1 << 20).try_into()?),
    }
}

/// The children of `pid`, from `/proc/PID/task/*/children`; empty if it is gone.
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for task in tasks.flatten() {
        if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
            out.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    out
}

/// User plus system CPU seconds of `roots` and all their current descendants. A root that is
/// gone is an error; a descendant that exits meanwhile is left out.
pub(crate) fn tree_cpu(roots: &[u32]) -> Result<f64> {
    let mut seen = BTreeSet::new();
    let mut queue: Vec<u32> = Vec::new();
    let mut total = 0.0;
    for &root in roots {
        if seen.insert(root) {
            total += process_cpu(root)?;
            queue.push(root);
        }
    }
    while let Some(pid) = queue.pop() {
        for child in children(pid) {
            if seen.insert(child) {
                if let Ok(cpu) = process_cpu(child) {
                    total += cpu;
                }
                queue.push(child);
            }
        }
    }
    Ok(total)
}

/// User plus system CPU seconds of process `pid` (all its threads).
pub(crate) fn process_cpu(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name may contain spaces; fields after it are fixed.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("bad /proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11).context("no utime")?.parse()?;
    let stime: f64 = fields.get(12).context("no stime")?.parse()?;
    Ok((utime + stime) / crate::bench::clock_ticks())
}
