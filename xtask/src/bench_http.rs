//! `cargo xtask bench --only http`: what header mode (issue 14) costs. Keep-alive requests per
//! second, proxy CPU per request and the latency a request gains, for spliced with
//! `forwarded_header = "x-forwarded-for"` next to HAProxy (`mode http`, `option forwardfor`)
//! and nginx (`proxy_pass` with `proxy_set_header X-Forwarded-For`), and the direct path.
//!
//! Every contender gets the same load: `CONNECTIONS` clients, each one keep-alive connection
//! sending `GET /` and waiting for the answer, again and again, for the load time; then one
//! client alone sends requests one by one for the latency. A small backend here answers every
//! request with a fixed 2-byte body. Contenders are interleaved round by round. nginx's limits
//! on requests per keep-alive connection (1000 by default, both sides) are raised so that it,
//! like the others, keeps every connection for the whole run.
use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use nix::sys::signal::Signal;
use spliced_tests::{
    BACKEND_V4, BACKEND_V6, Ns, PROXY_V4, Service, World, backends, raw, spliced::Launch,
};

use crate::{
    bench::{cell, median},
    bench_conns::ratio,
    proxies,
    report::{self, Part},
};

/// The backend's port, on its IPv6 address (proxies) and its IPv4 one (direct).
const BACKEND_PORT: u16 = 9100;
const SPLICED_PORT: u16 = 8081;
const HAPROXY_PORT: u16 = 8082;
const NGINX_PORT: u16 = 8083;
/// Keep-alive client connections during the load.
const CONNECTIONS: usize = 8;
/// Threads or worker processes for HAProxy and nginx, as in the other parts.
const WORKERS: u32 = 2;
const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: http.bench\r\nUser-Agent: bench\r\n\r\n";

/// How long and how often.
pub(crate) struct Options {
    /// Load time per contender and round.
    pub seconds: Duration,
    /// Rounds; each runs every contender once.
    pub rounds: usize,
    /// Sequential requests for the latency, per contender and round.
    pub latency_requests: usize,
}

struct Contender {
    name: String,
    target: SocketAddr,
    /// Empty for the direct path.
    pids: Vec<u32>,
    baseline: bool,
}

#[derive(Default)]
struct Samples {
    rps: Vec<f64>,
    /// Proxy CPU microseconds per request.
    cpu_us: Vec<f64>,
    /// Latency of one request alone, microseconds: median and 99th percentile per round.
    p50_us: Vec<f64>,
    p99_us: Vec<f64>,
}

/// Runs the part and returns its section of the report.
pub(crate) fn part(opts: &Options) -> Result<Part> {
    let world = World::new()?;
    world.route_direct()?;
    let _backend = Backend::start(&world)?;
    let mut services = Vec::new();
    let mut contenders = vec![Contender {
        name: "direct (kernel routing, no proxy)".into(),
        target: SocketAddr::new(BACKEND_V4, BACKEND_PORT),
        pids: Vec::new(),
        baseline: false,
    }];
    let mut skipped = Vec::new();
    let (c, s) = start_spliced(&world)?;
    contenders.push(c);
    services.push(s);
    match start_haproxy(&world) {
        Ok((c, s)) => {
            contenders.push(c);
            services.push(s);
        }
        Err(e) => skipped.push(format!("HAProxy: {e:#}")),
    }
    match start_nginx(&world) {
        Ok((c, s)) => {
            contenders.push(c);
            services.push(s);
        }
        Err(e) => skipped.push(format!("nginx: {e:#}")),
    }
    for why in &skipped {
        eprintln!("bench http: skipping {why}");
    }
    let mut samples: Vec<Samples> = contenders.iter().map(|_| Samples::default()).collect();
    let width = contenders.iter().map(|c| c.name.len()).max().unwrap_or(0);
    for round in 0..opts.rounds {
        for (c, s) in contenders.iter().zip(&mut samples) {
            let before = proxies::tree_cpu(&c.pids)?;
            let requests = load(&world, c.target, opts.seconds)
                .with_context(|| format!("load through {}", c.name))?;
            let cpu = proxies::tree_cpu(&c.pids)? - before;
            let rps = requests as f64 / opts.seconds.as_secs_f64();
            let (p50, p99) = latency(&world, c.target, opts.latency_requests)
                .with_context(|| format!("latency through {}", c.name))?;
            eprintln!(
                "  round {round} {:<width$} {rps:>9.0} requests/s, {:.1} µs proxy CPU per \
                 request, latency {p50:.0} µs median, {p99:.0} µs p99",
                c.name,
                cpu * 1e6 / requests.max(1) as f64
            );
            s.rps.push(rps);
            if !c.pids.is_empty() {
                s.cpu_us.push(cpu * 1e6 / requests.max(1) as f64);
            }
            s.p50_us.push(p50);
            s.p99_us.push(p99);
        }
    }
    drop(services);
    Ok(report(&contenders, &samples, &skipped, opts))
}

fn report(
    contenders: &[Contender],
    samples: &[Samples],
    skipped: &[String],
    opts: &Options,
) -> Part {
    let base = contenders.iter().position(|c| c.baseline);
    let direct_p50 = median(&samples[0].p50_us);
    let base_rps = base.map(|i| median(&samples[i].rps));
    let base_cpu = base.map(|i| median(&samples[i].cpu_us));
    let mut table = String::from(
        "| contender | keep-alive requests/s (median, min-max) | vs HAProxy | proxy CPU µs per \
         request | vs HAProxy | latency µs, median | p99 | added to the direct median |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for (c, s) in contenders.iter().zip(samples) {
        let added = if c.pids.is_empty() {
            "-".to_string()
        } else {
            format!("{:+.0} µs", median(&s.p50_us) - direct_p50)
        };
        let _ = writeln!(
            table,
            "| {} | {} | {} | {} | {} | {} | {} | {added} |",
            c.name,
            cell(&s.rps, 0),
            ratio(median(&s.rps), base_rps),
            cell(&s.cpu_us, 1),
            ratio(median(&s.cpu_us), base_cpu),
            cell(&s.p50_us, 0),
            cell(&s.p99_us, 0),
        );
    }
    let mut notes = format!(
        "{} rounds; per contender and round {CONNECTIONS} keep-alive connections send `GET /` \
         one after the other for {:?}, then one connection sends {} requests alone for the \
         latency. Every proxy adds X-Forwarded-For to each request and keeps the backend \
         connection alive; \"vs HAProxy\" compares with HAProxy in mode http.",
        opts.rounds, opts.seconds, opts.latency_requests
    );
    for why in skipped {
        let _ = write!(notes, "\nSkipped {why}.");
    }
    let text = format!("{notes}\n\n{table}");
    println!("\n{text}");
    let mut checks = Vec::new();
    if let (Some(rps), Some(cpu), Some(s)) = (
        base_rps,
        base_cpu,
        contenders.iter().position(|c| proxies::is_spliced(&c.name)),
    ) {
        let name = contenders[s].name.clone();
        checks.extend(report::check(
            "issue 14: keep-alive requests/s >= 1.0x HAProxy",
            [(name.clone(), median(&samples[s].rps) / rps)],
            true,
            1.0,
            2,
            "x",
        ));
        checks.extend(report::check(
            "issue 14: proxy CPU per request <= 1.0x HAProxy",
            [(name, median(&samples[s].cpu_us) / cpu)],
            false,
            1.0,
            2,
            "x",
        ));
    }
    Part {
        heading: "HTTP keep-alive with X-Forwarded-For (header mode)".into(),
        markdown: text,
        panels: Vec::new(),
        checks,
    }
}

fn start_spliced(world: &World) -> Result<(Contender, Service)> {
    let config = format!(
        "[defaults]\nforwarded_header = \"x-forwarded-for\"\n\
         [[listen]]\naddress = \"0.0.0.0:{SPLICED_PORT}\"\nprotocol = \"http\"\n\
         [[site]]\nhostnames = [\"http.bench\"]\nbackend = {{ http = \"[{BACKEND_V6}]:{BACKEND_PORT}\" }}\n"
    );
    let service = Launch::new(config)
        .named("spliced-http")
        .start(world, &[SPLICED_PORT])?
        .into_service();
    let pid = service.pid().context("spliced has no PID")?;
    Ok((
        Contender {
            name: "spliced, x-forwarded-for (engine http)".into(),
            target: SocketAddr::new(PROXY_V4, SPLICED_PORT),
            pids: vec![pid],
            baseline: false,
        },
        service,
    ))
}

fn start_haproxy(world: &World) -> Result<(Contender, Service)> {
    let version = proxies::haproxy_version()?;
    let conf = format!(
        "global\n  nbthread {WORKERS}\n  maxconn 4096\n\
         defaults\n  mode http\n  option forwardfor\n  option http-keep-alive\n\
         timeout connect 5s\n  timeout client 1m\n  timeout server 1m\n\
         timeout http-keep-alive 1m\n\
         frontend fe\n  bind {PROXY_V4}:{HAPROXY_PORT}\n  default_backend be\n\
         backend be\n  http-reuse always\n  server b [{BACKEND_V6}]:{BACKEND_PORT}\n"
    );
    let path = world.dir().join("bench-http-haproxy.cfg");
    std::fs::write(&path, conf)?;
    let mut cmd = world.command(Ns::Proxy, "haproxy");
    cmd.arg("-db").arg("-f").arg(&path);
    let mut service =
        Service::start("bench-http-haproxy", cmd, world.dir())?.stop_with(Signal::SIGTERM);
    backends::wait_listening(world, Ns::Proxy, HAPROXY_PORT, &mut service)?;
    let pid = service.pid().context("HAProxy has no PID")?;
    Ok((
        Contender {
            name: format!("HAProxy {version} (mode http, option forwardfor, {WORKERS} threads)"),
            target: SocketAddr::new(PROXY_V4, HAPROXY_PORT),
            pids: vec![pid],
            baseline: true,
        },
        service,
    ))
}

fn start_nginx(world: &World) -> Result<(Contender, Service)> {
    let version = proxies::nginx_version()?;
    let dir = world.dir().display().to_string();
    let tmp = format!("{dir}/bench-http-nginx-tmp");
    std::fs::create_dir_all(&tmp)?;
    let conf = format!(
        "worker_processes {WORKERS};\ndaemon off;\npid {dir}/bench-http-nginx.pid;\n\
         error_log {dir}/bench-http-nginx-error.log notice;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n\
         client_body_temp_path {tmp}/body;\n  proxy_temp_path {tmp}/proxy;\n\
         fastcgi_temp_path {tmp}/fastcgi;\n  uwsgi_temp_path {tmp}/uwsgi;\n\
         scgi_temp_path {tmp}/scgi;\n\
         upstream b {{ server [{BACKEND_V6}]:{BACKEND_PORT}; keepalive 32; \
         keepalive_requests 100000000; }}\n\
         server {{\n    listen {PROXY_V4}:{NGINX_PORT};\n\
         keepalive_requests 100000000;\n    keepalive_timeout 120s;\n    location / {{\n\
         proxy_pass http://b;\n      proxy_http_version 1.1;\n\
         proxy_set_header Connection \"\";\n      proxy_set_header Host $host;\n\
         proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n    }}\n  }}\n}}\n"
    );
    let path = world.dir().join("bench-http-nginx.conf");
    std::fs::write(&path, conf)?;
    let mut cmd = world.command(Ns::Proxy, "nginx");
    cmd.arg("-c").arg(&path);
    let mut service =
        Service::start("bench-http-nginx", cmd, world.dir())?.stop_with(Signal::SIGTERM);
    backends::wait_listening(world, Ns::Proxy, NGINX_PORT, &mut service)?;
    let master = service.pid().context("nginx has no PID")?;
    Ok((
        Contender {
            name: format!(
                "nginx {version} (proxy_pass, X-Forwarded-For, {WORKERS} workers, upstream \
                 keepalive)"
            ),
            target: SocketAddr::new(PROXY_V4, NGINX_PORT),
            // Its workers are counted as the master's descendants.
            pids: vec![master],
            baseline: false,
        },
        service,
    ))
}

/// A connection from the client namespace to `target`.
fn connect(world: &World, target: SocketAddr) -> Result<TcpStream> {
    let stream = world
        .within(Ns::Client, move || {
            TcpStream::connect_timeout(&target, Duration::from_secs(5))
        })?
        .with_context(|| format!("connecting to {target}"))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    Ok(stream)
}

/// Sends one request and reads its response (framed by Content-Length).
fn request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<()> {
    stream.write_all(REQUEST)?;
    buf.clear();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            ensure!(head.starts_with("http/1.1 200"), "response {head:?}");
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .context("no Content-Length")?
                .trim()
                .parse()?;
            if buf.len() >= end + 4 + length {
                ensure!(buf.len() == end + 4 + length, "bytes after the response");
                return Ok(());
            }
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            bail!("closed in a response after {} bytes", buf.len());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// `CONNECTIONS` clients send requests through `target` for `time`; returns how many were
/// answered.
fn load(world: &World, target: SocketAddr, time: Duration) -> Result<u64> {
    let streams: Vec<TcpStream> = (0..CONNECTIONS)
        .map(|_| connect(world, target))
        .collect::<Result<_>>()?;
    let deadline = Instant::now() + time;
    let threads: Vec<JoinHandle<Result<u64>>> = streams
        .into_iter()
        .map(|mut stream| {
            std::thread::spawn(move || {
                let mut buf = Vec::with_capacity(4096);
                let mut n = 0;
                while Instant::now() < deadline {
                    request(&mut stream, &mut buf)?;
                    n += 1;
                }
                Ok(n)
            })
        })
        .collect();
    let mut total = 0;
    for t in threads {
        total += t
            .join()
            .map_err(|_| anyhow::anyhow!("a client thread panicked"))??;
    }
    Ok(total)
}

/// One connection, `count` requests one after the other: median and 99th percentile in µs.
fn latency(world: &World, target: SocketAddr, count: usize) -> Result<(f64, f64)> {
    let mut stream = connect(world, target)?;
    let mut buf = Vec::with_capacity(4096);
    // The first request also pays for the backend connection; it is not counted.
    request(&mut stream, &mut buf)?;
    let mut times = Vec::with_capacity(count);
    let limit = Instant::now() + Duration::from_secs(30);
    for _ in 0..count {
        let started = Instant::now();
        request(&mut stream, &mut buf)?;
        times.push(started.elapsed().as_secs_f64() * 1e6);
        if Instant::now() > limit {
            break;
        }
    }
    times.sort_by(f64::total_cmp);
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    Ok((at(0.5), at(0.99)))
}

/// The backend: answers every request on a connection with a 2-byte body, until the client
/// closes; stops accepting when dropped.
struct Backend {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Backend {
    fn start(world: &World) -> Result<Backend> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for ip in [BACKEND_V6, BACKEND_V4] {
            let listener = raw::listen_in(world, Ns::Backend, SocketAddr::new(ip, BACKEND_PORT))?;
            listener.set_nonblocking(true)?;
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || accept(&listener, &stop)));
        }
        Ok(Backend { stop, threads })
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn accept(listener: &TcpListener, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                std::thread::spawn(move || {
                    let _ = answer(stream);
                });
            }
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

/// Answers each complete request head (no bodies here) with `ok`.
fn answer(mut stream: TcpStream) -> Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut buf = Vec::with_capacity(8192);
    let mut chunk = [0u8; 8192];
    loop {
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.drain(..end + 4);
            stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")?;
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}
