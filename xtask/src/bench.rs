//! `cargo xtask bench`: throughput and CPU cost per GiB of each forwarding engine next to a
//! direct connection, measured side by side in one run.
//!
//! The machines this runs on are noisy, so contenders are interleaved round by round
//! (A B C A B C ...), every figure is a median with its min-max, and the table also gives
//! ratios to the direct path measured in the same run. A transfer is: connect, send a real
//! ClientHello, then push N bytes each way at once until both sides saw end of stream.
//!
//! A second part (`bench_xdp`) follows in the same run: TCP SYNs per second the XDP edge
//! filter drops on one core next to those the kernel's stack handles there without it.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use spliced_tests::{BACKEND_V4, BACKEND_V6, Ns, PROXY_V4, World, backends, raw};

const BACKEND_PORT: u16 = 9000;
const BUF: usize = 256 * 1024;

/// Benchmark options.
pub struct Options {
    /// Bytes each way per transfer.
    pub bytes: u64,
    /// Rounds; each round runs every contender once.
    pub rounds: usize,
}

#[derive(Clone, Copy)]
enum Contender {
    Direct,
    Spliced(&'static str),
    /// The sockmap engine with the default backlog limit, in a second spliced on port 444.
    SockmapDefaultLimit,
}

impl Contender {
    fn name(self) -> String {
        match self {
            Contender::Direct => "direct (kernel routing, no proxy)".into(),
            // The limit is raised above the transfer size so the row measures the kernel path
            // alone (see forward::sockmap for what the limit does).
            Contender::Spliced("sockmap") => "spliced, engine sockmap (limit 4GiB)".into(),
            Contender::Spliced(engine) => format!("spliced, engine {engine}"),
            // A direction whose reader falls behind leaves the kernel and is spliced.
            Contender::SockmapDefaultLimit => "spliced, engine sockmap (default 4MiB limit)".into(),
        }
    }
}

struct Sample {
    seconds: f64,
    proxy_cpu: f64,
    system_cpu: f64,
}

/// Runs the benchmark with the given `spliced` binary and prints a Markdown table.
pub fn run(bin: &Path, opts: &Options) -> Result<()> {
    // SAFETY: set before any thread starts; the harness reads it to find the binary.
    unsafe { std::env::set_var("SPLICED_BIN", bin) };
    let world = World::new()?;
    world.route_direct()?;
    let _sink = start_backend(&world)?;
    let config = format!(
        "[defaults]\nsockmap_backlog_limit = \"4GiB\"\n[[listen]]\naddress = \"0.0.0.0:443\"\nprotocol = \"tls\"\n\
         [[site]]\nhostnames = [\"sockmap.bench\"]\nbackend = \"[{BACKEND_V6}]:{BACKEND_PORT}\"\nforwarding = \"sockmap\"\n\
         [[site]]\nhostnames = [\"splice.bench\"]\nbackend = \"[{BACKEND_V6}]:{BACKEND_PORT}\"\nforwarding = \"splice\"\n\
         [[site]]\nhostnames = [\"copy.bench\"]\nbackend = \"[{BACKEND_V6}]:{BACKEND_PORT}\"\nforwarding = \"copy\"\n"
    );
    let spliced = backends::spliced(&world, &config, &[443])?;
    let pid = spliced.pid().context("spliced has no PID")?;
    let default_limit = format!(
        "[[listen]]\naddress = \"0.0.0.0:444\"\nprotocol = \"tls\"\n\
         [[site]]\nhostnames = [\"sockmap.bench\"]\nbackend = \"[{BACKEND_V6}]:{BACKEND_PORT}\"\nforwarding = \"sockmap\"\n"
    );
    let second = raw::spliced_with(
        &world,
        &default_limit,
        &[444],
        &raw::Launch::named("spliced-default-limit"),
    )?;
    let pid_default = second.pid().context("the second spliced has no PID")?;
    let contenders = [
        Contender::Direct,
        Contender::Spliced("sockmap"),
        Contender::SockmapDefaultLimit,
        Contender::Spliced("splice"),
        Contender::Spliced("copy"),
    ];
    let mut samples: Vec<Vec<Sample>> = contenders.iter().map(|_| Vec::new()).collect();
    let gib_each_way = opts.bytes as f64 / f64::from(1u32 << 30);
    eprintln!(
        "bench: {} rounds x {} contenders, {:.2} GiB each way per transfer",
        opts.rounds,
        contenders.len(),
        gib_each_way
    );
    for round in 0..opts.rounds {
        for (i, &c) in contenders.iter().enumerate() {
            let (hello, target, proxy) = match c {
                Contender::Spliced(engine) => (
                    raw::simple_hello(&format!("{engine}.bench")),
                    SocketAddr::new(PROXY_V4, 443),
                    pid,
                ),
                Contender::SockmapDefaultLimit => (
                    raw::simple_hello("sockmap.bench"),
                    SocketAddr::new(PROXY_V4, 444),
                    pid_default,
                ),
                Contender::Direct => (
                    raw::simple_hello("direct.bench"),
                    SocketAddr::new(BACKEND_V4, BACKEND_PORT),
                    pid,
                ),
            };
            let before = (process_cpu(proxy)?, system_cpu()?);
            let seconds = transfer(&world, target, &hello, opts.bytes)?;
            let after = (process_cpu(proxy)?, system_cpu()?);
            let s = Sample {
                seconds,
                proxy_cpu: after.0 - before.0,
                system_cpu: after.1 - before.1,
            };
            eprintln!(
                "  round {round} {:<34} {:>8.1} MiB/s each way, proxy {:.3} s, system {:.3} s",
                c.name(),
                opts.bytes as f64 / seconds / f64::from(1u32 << 20),
                s.proxy_cpu,
                s.system_cpu
            );
            samples[i].push(s);
        }
    }
    drop(second);
    drop(spliced);
    // Both directions moved `bytes`: CPU per GiB counts every byte forwarded.
    let gib_moved = 2.0 * gib_each_way;
    let direct_tput = median(
        &samples[0]
            .iter()
            .map(|s| opts.bytes as f64 / s.seconds)
            .collect::<Vec<_>>(),
    );
    let direct_sys = median(
        &samples[0]
            .iter()
            .map(|s| s.system_cpu / gib_moved)
            .collect::<Vec<_>>(),
    );
    let mut table = String::from(
        "| contender | throughput each way, MiB/s (median, min-max) | vs direct | proxy CPU s/GiB (median, min-max) | system CPU s/GiB (median, min-max) | vs direct |\n|---|---|---|---|---|---|\n",
    );
    for (c, s) in contenders.iter().zip(&samples) {
        let tput: Vec<f64> = s
            .iter()
            .map(|s| opts.bytes as f64 / s.seconds / f64::from(1u32 << 20))
            .collect();
        let proxy: Vec<f64> = s.iter().map(|s| s.proxy_cpu / gib_moved).collect();
        let system: Vec<f64> = s.iter().map(|s| s.system_cpu / gib_moved).collect();
        let proxy_cell = match c {
            Contender::Direct => "-".to_string(),
            Contender::Spliced(_) | Contender::SockmapDefaultLimit => spread(&proxy, 3),
        };
        table.push_str(&format!(
            "| {} | {} | {:.2}x | {} | {} | {:.2}x |\n",
            c.name(),
            spread(&tput, 0),
            median(&tput) * f64::from(1u32 << 20) / direct_tput,
            proxy_cell,
            spread(&system, 3),
            median(&system) / direct_sys,
        ));
    }
    println!(
        "\n{} rounds, {:.2} GiB each way per transfer, kernel {}, {} CPUs\n\n{table}",
        opts.rounds,
        gib_each_way,
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim(),
        std::thread::available_parallelism()
            .map(usize::from)
            .unwrap_or(0)
    );
    Ok(())
}

pub(crate) fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

pub(crate) fn spread(v: &[f64], decimals: usize) -> String {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{:.d$} ({:.d$}-{:.d$})", median(v), min, max, d = decimals)
}

pub(crate) fn clock_ticks() -> f64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as f64,
        _ => 100.0,
    }
}

/// User plus system CPU seconds of process `pid` (all its threads).
fn process_cpu(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may contain spaces; fields after it are fixed.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("bad /proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11).context("no utime")?.parse()?;
    let stime: f64 = fields.get(12).context("no stime")?.parse()?;
    Ok((utime + stime) / clock_ticks())
}

/// The tick counts on the `/proc/stat` line labelled `label` ("cpu" for all, "cpu1", ...):
/// user nice system idle iowait irq softirq steal ...
pub(crate) fn proc_stat(label: &str) -> Result<Vec<f64>> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.split_whitespace().next() == Some(label))
        .with_context(|| format!("no {label} in /proc/stat"))?;
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0.0))
        .collect();
    ensure!(v.len() >= 8, "unexpected /proc/stat: {line}");
    Ok(v)
}

/// Non-idle CPU seconds of the whole machine, softirq included.
fn system_cpu() -> Result<f64> {
    let v = proc_stat("cpu")?;
    // user nice system idle iowait irq softirq steal
    let busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7];
    Ok(busy / clock_ticks())
}

/// The sink/source backend: after the hello, sends `bytes` and reads until EOF, both at once.
/// The byte count to send is the first 8 bytes after the hello (big-endian).
fn start_backend(world: &World) -> Result<Vec<std::thread::JoinHandle<()>>> {
    let mut handles = Vec::new();
    for ip in [BACKEND_V6, BACKEND_V4] {
        let listener = world
            .within(Ns::Backend, move || {
                TcpListener::bind(SocketAddr::new(ip, BACKEND_PORT))
            })?
            .with_context(|| format!("binding the bench backend on {ip}"))?;
        handles.push(std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                std::thread::spawn(move || {
                    let _ = serve(stream);
                });
            }
        }));
    }
    Ok(handles)
}

fn serve(mut stream: TcpStream) -> Result<()> {
    // Skip the hello: its record header says how long it is.
    let mut header = [0u8; 5];
    stream.read_exact(&mut header)?;
    let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
    let mut hello = vec![0u8; len];
    stream.read_exact(&mut hello)?;
    let mut count = [0u8; 8];
    stream.read_exact(&mut count)?;
    let bytes = u64::from_be_bytes(count);
    let mut writer = stream.try_clone()?;
    let sender = std::thread::spawn(move || -> Result<()> {
        send(&mut writer, bytes)?;
        writer.shutdown(std::net::Shutdown::Write)?;
        Ok(())
    });
    drain(&mut stream)?;
    sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender panicked"))??;
    Ok(())
}

fn send(out: &mut TcpStream, mut bytes: u64) -> Result<()> {
    let buf = vec![0x5au8; BUF];
    while bytes > 0 {
        let n = usize::try_from(bytes.min(BUF as u64))?;
        out.write_all(&buf[..n])?;
        bytes -= n as u64;
    }
    Ok(())
}

fn drain(input: &mut TcpStream) -> Result<u64> {
    let mut buf = vec![0u8; BUF];
    let mut total = 0u64;
    loop {
        match input.read(&mut buf)? {
            0 => return Ok(total),
            n => total += n as u64,
        }
    }
}

/// One transfer from the client namespace; returns its wall-clock seconds.
fn transfer(world: &World, target: SocketAddr, hello: &[u8], bytes: u64) -> Result<f64> {
    let started = Instant::now();
    let mut stream = world
        .within(Ns::Client, move || {
            TcpStream::connect_timeout(&target, Duration::from_secs(5))
        })?
        .with_context(|| format!("connecting to {target}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut first = hello.to_vec();
    first.extend_from_slice(&bytes.to_be_bytes());
    stream.write_all(&first)?;
    let mut writer = stream.try_clone()?;
    let sender = std::thread::spawn(move || -> Result<()> {
        send(&mut writer, bytes)?;
        writer.shutdown(std::net::Shutdown::Write)?;
        Ok(())
    });
    let got = drain(&mut stream)?;
    sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender panicked"))??;
    if got != bytes {
        bail!("received {got} bytes from {target}, expected {bytes}");
    }
    Ok(started.elapsed().as_secs_f64())
}
