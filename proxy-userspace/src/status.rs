//! `spliced status` and `spliced check --against`: what a running spliced says about itself on
//! its metrics endpoint, read back and printed for a person.
//!
//! Only the metrics endpoint is read (`/metrics`, and `/config` for the running configuration),
//! so it works as any user who can reach that address, without root and without bpffs.
use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

/// How long connecting to and reading from the endpoint may take.
const TIMEOUT: Duration = Duration::from_secs(5);

/// The largest answer read (a scrape is a few KiB; `/config` grows with the sites).
const MAX_BODY: u64 = 64 << 20;

/// `GET http://addr/path`; the body of a `200` answer.
pub fn fetch(addr: SocketAddr, path: &str) -> Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT).with_context(|| {
        format!(
            "nothing answers at http://{addr}{path} (is spliced running with --metrics {addr}?)"
        )
    })?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    stream
        .take(MAX_BODY)
        .read_to_string(&mut text)
        .with_context(|| format!("reading the answer of http://{addr}{path}"))?;
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("http://{addr}{path} did not answer with HTTP");
    };
    let status = head.lines().next().unwrap_or_default();
    if !status.starts_with("HTTP/1.1 200 ") {
        bail!("http://{addr}{path} answered {status:?} (an older spliced, or not spliced?)");
    }
    Ok(body.to_owned())
}

/// One sample of a scrape.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

/// A scrape of `/metrics` as spliced writes it (no escapes in label values, no timestamps).
#[derive(Debug, Default)]
pub struct Scrape(Vec<Sample>);

impl Scrape {
    /// Parses the text exposition format; lines it cannot read are skipped.
    pub fn parse(text: &str) -> Scrape {
        let samples = text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .filter_map(|line| {
                let (series, value) = line.rsplit_once(' ')?;
                let value = value.parse().ok()?;
                let (name, labels) = match series.split_once('{') {
                    None => (series, Vec::new()),
                    Some((name, rest)) => {
                        let labels = rest
                            .strip_suffix('}')?
                            .split(',')
                            .filter(|l| !l.is_empty())
                            .map(|l| {
                                let (k, v) = l.split_once('=')?;
                                let v = v.strip_prefix('"')?.strip_suffix('"')?;
                                Some((k.to_owned(), v.to_owned()))
                            })
                            .collect::<Option<Vec<_>>>()?;
                        (name, labels)
                    }
                };
                Some(Sample {
                    name: name.to_owned(),
                    labels,
                    value,
                })
            })
            .collect();
        Scrape(samples)
    }

    /// Every sample named `name`: the value of its `label`, and its value.
    fn by(&self, name: &str, label: &str) -> Vec<(String, u64)> {
        self.0
            .iter()
            .filter(|s| s.name == name)
            .filter_map(|s| {
                let (_, v) = s.labels.iter().find(|(k, _)| k == label)?;
                Some((v.clone(), s.value as u64))
            })
            .collect()
    }

    /// The value of the unlabelled sample `name`.
    fn value(&self, name: &str) -> Option<u64> {
        self.0
            .iter()
            .find(|s| s.name == name && s.labels.is_empty())
            .map(|s| s.value as u64)
    }

    /// The report `spliced status` prints.
    pub fn report(&self, addr: SocketAddr) -> String {
        let mut out = String::new();
        let version = self
            .by("spliced_info", "version")
            .first()
            .map_or("?".to_owned(), |(v, _)| v.clone());
        let _ = writeln!(out, "spliced {version}, metrics at http://{addr}/metrics");
        let listeners: Vec<String> = self
            .0
            .iter()
            .filter(|s| s.name == "spliced_listener_info")
            .map(|s| {
                let get = |k: &str| {
                    s.labels
                        .iter()
                        .find(|(l, _)| l == k)
                        .map_or("?", |(_, v)| v.as_str())
                };
                format!("{} ({})", get("address"), get("protocol"))
            })
            .collect();
        let _ = writeln!(out, "listeners: {}", list_or(&listeners, "none"));
        let show = |v: Option<u64>| v.map_or("?".to_owned(), |v| v.to_string());
        let default_site = match self.value("spliced_default_site") {
            Some(1) => "yes",
            Some(_) => "none (unknown names are refused)",
            None => "?",
        };
        let _ = writeln!(
            out,
            "sites: {} ({} hostnames); default site: {default_site}",
            show(self.value("spliced_sites")),
            show(self.value("spliced_hostnames")),
        );
        let engines: Vec<String> = self
            .by("spliced_connections_by_engine_total", "engine")
            .iter()
            .map(|(e, n)| format!("{e} {n}"))
            .collect();
        let open: Vec<String> = self
            .by("spliced_open_connections_by_engine", "engine")
            .iter()
            .map(|(e, n)| format!("{e} {n}"))
            .collect();
        let _ = writeln!(
            out,
            "connections: {} open; forwarding, by engine: {}; ended, by engine: {}",
            show(self.value("spliced_open_connections")),
            list_or(&open, "?"),
            list_or(&engines, "?")
        );
        let outcomes: Vec<String> = self
            .by("spliced_connections_total", "outcome")
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(o, n)| format!("{o} {n}"))
            .collect();
        let _ = writeln!(out, "outcomes: {}", list_or(&outcomes, "none yet"));
        let kernel: Vec<String> = self
            .by("spliced_kernel_total", "counter")
            .iter()
            .map(|(c, n)| format!("{c}={n}"))
            .collect();
        if kernel.is_empty() {
            let _ = writeln!(out, "kernel (sockmap): not loaded");
        } else {
            let _ = writeln!(out, "kernel (sockmap): {}", kernel.join(" "));
            let entries: Vec<String> = self
                .by("spliced_sockmap_entries", "map")
                .iter()
                .map(|(m, n)| format!("{m} {n}"))
                .collect();
            let _ = writeln!(out, "  socket-map entries: {}", list_or(&entries, "?"));
        }
        let xdp: Vec<String> = self
            .by("spliced_xdp_packets_total", "outcome")
            .iter()
            .map(|(o, n)| format!("{o}={n}"))
            .collect();
        if xdp.is_empty() {
            let _ = writeln!(out, "xdp: not attached");
        } else {
            let _ = writeln!(out, "xdp: {}", xdp.join(" "));
        }
        out
    }
}

fn list_or(items: &[String], empty: &str) -> String {
    if items.is_empty() {
        empty.to_owned()
    } else {
        items.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_reads_a_scrape() {
        let log = crate::access::Log::new(4, std::io::sink()).expect("writer thread");
        let shared = crate::shared::tests::shared(log);
        shared.count_outcome(crate::outcome::Outcome::UnknownName);
        shared.count_engine(crate::forward::Engine::Splice);
        let scrape = Scrape::parse(&crate::metrics::render(&shared));
        let report = scrape.report("127.0.0.1:9464".parse().unwrap_or_else(|_| unreachable!()));
        let version = env!("CARGO_PKG_VERSION");
        assert_eq!(
            report,
            format!(
                "spliced {version}, metrics at http://127.0.0.1:9464/metrics\n\
                 listeners: 127.0.0.1:443 (tls)\n\
                 sites: 0 (0 hostnames); default site: none (unknown names are refused)\n\
                 connections: 0 open; forwarding, by engine: sockmap 0, splice 0, copy 0, http \
                 0, packet 0; ended, by engine: sockmap 0, splice 1, copy 0, http 0, packet 0\n\
                 outcomes: unknown_name 1\n\
                 kernel (sockmap): not loaded\n\
                 xdp: not attached\n"
            )
        );
    }

    #[test]
    fn kernel_and_xdp_counters_are_listed() {
        let scrape = Scrape::parse(
            "spliced_kernel_total{counter=\"redirected\"} 7\n\
             spliced_sockmap_entries{map=\"verdict\"} 2\n\
             spliced_xdp_packets_total{outcome=\"passed\"} 9\n\
             spliced_xdp_packets_total{outcome=\"dropped_deny\"} 1\n\
             garbage line\n",
        );
        let report = scrape.report("127.0.0.1:1".parse().unwrap_or_else(|_| unreachable!()));
        assert!(
            report.contains("kernel (sockmap): redirected=7\n  socket-map entries: verdict 2\n"),
            "{report}"
        );
        assert!(
            report.contains("xdp: passed=9 dropped_deny=1\n"),
            "{report}"
        );
    }
}
