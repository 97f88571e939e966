//! The one way tests start the `spliced` binary, and what they read back the way an operator
//! would: the access log on its standard output, and the Prometheus `/metrics` endpoint.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! # let world = spliced_tests::World::new()?;
//! # let config = String::new();
//! use spliced_tests::spliced::Launch;
//! let spliced = Launch::new(config).metrics().start(&world, &[443])?;
//! let detached = spliced.metrics()?.count("spliced_sockmap_detached_total", &[("side", "client")])?;
//! # Ok(())
//! # }
//! ```
use std::{
    ffi::{OsStr, OsString},
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    ops::{Deref, DerefMut},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{Ns, Service, World, raw, wait_for, world::in_netns};

/// How long a metrics scrape may take.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);

/// How to start `spliced run`: its configuration, extra arguments, environment, a program to
/// run it under, whether to serve metrics, and the name its files get.
#[derive(Clone, Debug)]
pub struct Launch {
    name: String,
    config: String,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    wrapper: Vec<OsString>,
    metrics: bool,
    metrics_port: Option<u16>,
}

impl Launch {
    /// Runs spliced with `config`; its files are `spliced.toml`, `spliced.out` (the access
    /// log) and `spliced.err` (diagnostics) unless [`Launch::named`] says otherwise.
    pub fn new(config: impl Into<String>) -> Launch {
        Launch {
            name: "spliced".to_owned(),
            config: config.into(),
            args: Vec::new(),
            env: Vec::new(),
            wrapper: Vec::new(),
            metrics: false,
            metrics_port: None,
        }
    }

    /// Names the configuration, standard output and standard error files `<name>.toml`,
    /// `<name>.out` and `<name>.err` (for several spliced in one world).
    pub fn named(mut self, name: &str) -> Launch {
        name.clone_into(&mut self.name);
        self
    }

    /// Adds an argument after `run --config FILE` (e.g. `--pin-dir`).
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Launch {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// Sets an environment variable for spliced (e.g. `RUST_LOG`).
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Launch {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Runs spliced under `argv` (a program and its arguments, e.g. `strace -f -o FILE` or
    /// `setpriv --reuid=65534`); spliced's own command line follows them.
    pub fn wrapped<S: AsRef<OsStr>>(mut self, argv: &[S]) -> Launch {
        self.wrapper = argv.iter().map(|a| a.as_ref().to_owned()).collect();
        self
    }

    /// Serves `/metrics` on a free loopback port of spliced's namespace (see
    /// [`Spliced::metrics`]).
    pub fn metrics(mut self) -> Launch {
        self.metrics = true;
        self
    }

    /// Serves `/metrics` on `127.0.0.1:port` of spliced's namespace: a fixed address, for a
    /// health checker that outlives one run of spliced.
    pub fn metrics_at(mut self, port: u16) -> Launch {
        self.metrics = true;
        self.metrics_port = Some(port);
        self
    }

    /// Writes the configuration to the world's directory and starts spliced in the proxy
    /// namespace, waiting until every port in `ports` (and the metrics port) listens. An
    /// empty `ports` does not wait at all (for runs expected to fail).
    pub fn start(&self, world: &World, ports: &[u16]) -> Result<Spliced> {
        self.start_in(world, Ns::Proxy, ports)
    }

    /// Like [`Launch::start`], in namespace `ns` (e.g. the second host of a
    /// [`World::scale_out`]).
    pub fn start_in(&self, world: &World, ns: Ns, ports: &[u16]) -> Result<Spliced> {
        self.spawn(world.dir(), Some(world.name(ns).to_owned()), ports)
    }

    /// Like [`Launch::start`], in the test process's own namespaces (not under `ip netns
    /// exec`), so its pins land in this mount namespace's bpffs: for listeners on loopback.
    /// Files go to `dir`.
    pub fn start_here(&self, dir: &Path, ports: &[u16]) -> Result<Spliced> {
        self.spawn(dir, None, ports)
    }

    fn spawn(&self, dir: &Path, netns: Option<String>, ports: &[u16]) -> Result<Spliced> {
        let config = dir.join(format!("{}.toml", self.name));
        std::fs::write(&config, &self.config)?;
        let bin = crate::spliced_bin()?;
        let program = self
            .wrapper
            .first()
            .map_or(bin.as_os_str(), OsString::as_os_str);
        let mut cmd = in_namespace(netns.as_deref(), program);
        if !self.wrapper.is_empty() {
            cmd.args(&self.wrapper[1..]).arg(&bin);
        }
        cmd.args(["run", "--config"]).arg(&config).args(&self.args);
        // Each its own control socket, unless the test names one: tests run side by side.
        let control = match self.args.iter().position(|a| a == "--control-socket") {
            Some(i) => self
                .args
                .get(i + 1)
                .filter(|path| *path != "none")
                .map(PathBuf::from),
            None => {
                let path = dir.join(format!("{}.sock", self.name));
                cmd.arg("--control-socket").arg(&path);
                Some(path)
            }
        };
        let metrics = if self.metrics {
            let port = match self.metrics_port {
                Some(port) => port,
                None => in_netns(netns.as_deref(), || {
                    raw::free_port(IpAddr::V4(Ipv4Addr::LOCALHOST))
                })??,
            };
            cmd.arg("--metrics").arg(format!("127.0.0.1:{port}"));
            Some(port)
        } else {
            None
        };
        for (key, value) in &self.env {
            cmd.env(key, value);
        }
        let mut spliced = Spliced {
            service: Service::start(&self.name, cmd, dir)?,
            config,
            netns,
            metrics,
            control,
        };
        if !ports.is_empty() {
            for &port in ports.iter().chain(&metrics) {
                spliced.wait_listening(port)?;
            }
        }
        Ok(spliced)
    }
}

/// A command that runs `program` in the network namespace `netns` (`None`: this one).
fn in_namespace(netns: Option<&str>, program: &OsStr) -> Command {
    match netns {
        Some(ns) => {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", ns]).arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

/// A running spliced: the [`Service`] (stopped when dropped) plus what an operator reads from
/// it.
pub struct Spliced {
    service: Service,
    config: PathBuf,
    /// The network namespace it runs in, by `ip netns` name; `None` for this process's.
    netns: Option<String>,
    metrics: Option<u16>,
    control: Option<PathBuf>,
}

impl Deref for Spliced {
    type Target = Service;
    fn deref(&self) -> &Service {
        &self.service
    }
}

impl DerefMut for Spliced {
    fn deref_mut(&mut self) -> &mut Service {
        &mut self.service
    }
}

impl Spliced {
    /// The process alone, for owners that only need it stopped on drop.
    pub fn into_service(self) -> Service {
        self.service
    }

    /// The address of its metrics endpoint, in its namespace (started with
    /// [`Launch::metrics`]).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics
            .map(|port| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port))
    }

    /// The configuration file it was started with (rewrite it and send SIGHUP to reload).
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// Its control socket, where a new spliced takes its listeners over (`--upgrade-from`).
    pub fn control_socket(&self) -> Option<&Path> {
        self.control.as_deref()
    }

    /// Waits until something listens on TCP `port` in spliced's namespace (checked with `ss`,
    /// which sends no traffic).
    fn wait_listening(&mut self, port: u16) -> Result<()> {
        let mut ss = in_namespace(self.netns.as_deref(), OsStr::new("ss"));
        ss.args(["-Hltn", &format!("sport = :{port}")]);
        wait_for(
            &format!("a listener on port {port}"),
            Duration::from_secs(10),
            || {
                self.service.check_running()?;
                Ok(!ss.output()?.stdout.is_empty())
            },
        )
    }

    /// Scrapes `/metrics` (started with [`Launch::metrics`]).
    pub fn metrics(&self) -> Result<Metrics> {
        let port = self
            .metrics
            .context("spliced was started without --metrics")?;
        let text = in_netns(self.netns.as_deref(), || -> Result<String> {
            let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
            let mut s = TcpStream::connect_timeout(&addr, SCRAPE_TIMEOUT)?;
            s.set_read_timeout(Some(SCRAPE_TIMEOUT))?;
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: spliced\r\nConnection: close\r\n\r\n")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })??;
        let (head, body) = text
            .split_once("\r\n\r\n")
            .with_context(|| format!("no HTTP response from /metrics: {text:?}"))?;
        if !head.starts_with("HTTP/1.1 200 ") {
            bail!("/metrics answered {head:?}");
        }
        Metrics::parse(body)
    }

    /// Scrapes `/metrics` until `ready` holds for a scrape (within `timeout`) and returns it.
    pub fn wait_metrics(
        &self,
        what: &str,
        timeout: Duration,
        mut ready: impl FnMut(&Metrics) -> Result<bool>,
    ) -> Result<Metrics> {
        let mut last = None;
        let mut failed = None;
        // A scrape that fails counts as "not yet": the endpoint may be at its cap of open
        // scrapes for a moment (it closes the ones beyond it at once), or not listening yet.
        wait_for(what, timeout, || {
            let m = match self.metrics() {
                Ok(m) => m,
                Err(e) => {
                    failed = Some(e);
                    return Ok(false);
                }
            };
            let done = ready(&m)?;
            last = Some(m);
            Ok(done)
        })
        .with_context(|| {
            format!(
                "last scrape:\n{}\nlast failed scrape: {}",
                last.as_ref().map(Metrics::to_string).unwrap_or_default(),
                failed
                    .as_ref()
                    .map_or("none".to_owned(), |e| format!("{e:#}"))
            )
        })?;
        last.context("no scrape")
    }

    /// Waits up to `timeout` for the access-log line of the connection whose client address
    /// is `client` (the client socket's local address) and returns it.
    pub fn log_line_for(&self, client: SocketAddr, timeout: Duration) -> Result<String> {
        let want = client.to_string();
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.stdout_text();
            // Complete lines only: a line can be read while spliced is still writing it.
            let complete = &text[..text.rfind('\n').map_or(0, |end| end + 1)];
            if let Some(line) = complete
                .lines()
                .find(|l| field(l, "client") == Some(want.as_str()))
            {
                return Ok(line.to_owned());
            }
            if Instant::now() >= deadline {
                bail!(
                    "no access-log line for client {client} after {timeout:?}; log:\n{text}\n\
                     diagnostics:\n{}",
                    self.stderr_text()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The value of `key=` in an access-log line (quoted values are returned with their quotes).
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let prefix = format!("{key}=");
    line.split(' ')
        .find_map(|part| part.strip_prefix(prefix.as_str()))
}

/// One sample of a scrape: `name{label="value",...} value`.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// The metric's name.
    pub name: String,
    /// Its labels, in the order given.
    pub labels: Vec<(String, String)>,
    /// Its value.
    pub value: f64,
}

/// A scrape of `/metrics`: every sample, comments left out.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    /// The samples in the order spliced wrote them.
    pub samples: Vec<Sample>,
}

impl Metrics {
    /// Parses the text exposition format as spliced writes it (no escapes in label values,
    /// no timestamps).
    pub fn parse(text: &str) -> Result<Metrics> {
        let mut samples = Vec::new();
        for line in text.lines() {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (series, value) = line
                .rsplit_once(' ')
                .with_context(|| format!("a sample without a value: {line:?}"))?;
            let value = value
                .parse()
                .with_context(|| format!("not a number in {line:?}"))?;
            let (name, labels) = match series.split_once('{') {
                None => (series, Vec::new()),
                Some((name, rest)) => {
                    let inner = rest
                        .strip_suffix('}')
                        .with_context(|| format!("unclosed labels in {line:?}"))?;
                    let labels = inner
                        .split(',')
                        .filter(|l| !l.is_empty())
                        .map(|l| {
                            let (k, v) = l
                                .split_once('=')
                                .with_context(|| format!("a label without = in {line:?}"))?;
                            let v = v
                                .strip_prefix('"')
                                .and_then(|v| v.strip_suffix('"'))
                                .with_context(|| format!("an unquoted label in {line:?}"))?;
                            Ok((k.to_owned(), v.to_owned()))
                        })
                        .collect::<Result<_>>()?;
                    (name, labels)
                }
            };
            samples.push(Sample {
                name: name.to_owned(),
                labels,
                value,
            });
        }
        Ok(Metrics { samples })
    }

    /// The value of the sample `name` whose labels are exactly `labels` (in any order).
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        self.samples
            .iter()
            .find(|s| {
                s.name == name
                    && s.labels.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.iter().any(|(sk, sv)| sk == k && sv == v))
            })
            .map(|s| s.value)
            .with_context(|| format!("no sample {name}{labels:?} in the scrape:\n{self}"))
    }

    /// Like [`Metrics::get`], for counters and gauges that count something (a whole number).
    pub fn count(&self, name: &str, labels: &[(&str, &str)]) -> Result<u64> {
        let value = self.get(name, labels)?;
        if value < 0.0 || value.fract() != 0.0 || value > 2f64.powi(53) {
            bail!("{name}{labels:?} is {value}, not a count");
        }
        Ok(value as u64)
    }
}

impl std::fmt::Display for Metrics {
    /// One `name{labels} value` line per sample.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for s in &self.samples {
            let labels: Vec<String> = s
                .labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{v}\""))
                .collect();
            writeln!(f, "{}{{{}}} {}", s.name, labels.join(","), s.value)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_samples_with_and_without_labels() {
        let m = Metrics::parse(
            "# HELP a_total A.\n# TYPE a_total counter\na_total{side=\"client\",x=\"1\"} 3\n\
             b 4.5\nc{} 0\n",
        )
        .expect("parses");
        assert_eq!(
            m.count("a_total", &[("x", "1"), ("side", "client")])
                .expect("a"),
            3
        );
        assert!(
            m.get("a_total", &[("side", "client")]).is_err(),
            "labels must match exactly"
        );
        assert_eq!(m.get("b", &[]).expect("b"), 4.5);
        assert!(m.count("b", &[]).is_err(), "4.5 is not a count");
        assert_eq!(m.count("c", &[]).expect("c"), 0);
        assert!(Metrics::parse("d{side=client} 1").is_err());
        assert!(Metrics::parse("e 1x").is_err());
    }
}
