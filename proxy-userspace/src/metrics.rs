//! A Prometheus text-format endpoint: connection outcomes by reason (the same names as the
//! access log) and the kernel side's counters (bytes spliced, redirects, drops, pauses).
//!
//! Hand-written on purpose: the exposition format is a few lines of text and this avoids a
//! second HTTP stack next to our own request-head parser.
use std::{fmt::Write as _, sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
    sync::Semaphore,
};

use crate::{
    config::Table,
    forward::{Engine, sockmap},
    outcome::{Outcome, Source},
    packet_expiry::End,
    shared::{HANDOFF_BUCKETS, PacketStats, Shared},
};

/// Renders every metric in the text exposition format.
pub fn render(shared: &Shared) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP spliced_info The running spliced.\n# TYPE spliced_info gauge\n\
         spliced_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    out.push_str("# HELP spliced_listener_info The listeners bound at start.\n");
    out.push_str("# TYPE spliced_listener_info gauge\n");
    for (address, protocol) in shared.listeners() {
        let _ = writeln!(
            out,
            "spliced_listener_info{{address=\"{address}\",protocol=\"{protocol}\"}} 1"
        );
    }
    let routing = shared.current();
    let config = &routing.config;
    let hostnames: usize = config.sites.iter().map(|s| s.hostnames.len()).sum();
    let _ = writeln!(
        out,
        "# HELP spliced_sites Sites in the running configuration ([[site]] entries).\n\
         # TYPE spliced_sites gauge\nspliced_sites {}\n\
         # HELP spliced_hostnames Hostnames of those sites.\n\
         # TYPE spliced_hostnames gauge\nspliced_hostnames {hostnames}\n\
         # HELP spliced_default_site Whether unknown names go to a default site (1) or are \
         refused (0).\n# TYPE spliced_default_site gauge\nspliced_default_site {}",
        config.sites.len(),
        u8::from(config.default_site.is_some())
    );
    out.push_str(
        "# HELP spliced_open_connections_by_engine Connections forwarding now, by the engine \
         chosen for them (sockmap includes those still on splice before the hand-off).\n",
    );
    out.push_str("# TYPE spliced_open_connections_by_engine gauge\n");
    for engine in Engine::ALL {
        let _ = writeln!(
            out,
            "spliced_open_connections_by_engine{{engine=\"{}\"}} {}",
            engine.as_str(),
            shared.open_on_engine(engine)
        );
    }
    out.push_str(
        "# HELP spliced_connections_by_engine_total Connections ended, by the engine that \
         carried them last.\n",
    );
    out.push_str("# TYPE spliced_connections_by_engine_total counter\n");
    for engine in Engine::ALL {
        let _ = writeln!(
            out,
            "spliced_connections_by_engine_total{{engine=\"{}\"}} {}",
            engine.as_str(),
            shared.engine_count(engine)
        );
    }
    out.push_str("# HELP spliced_connections_total Connections by how they ended.\n");
    out.push_str("# TYPE spliced_connections_total counter\n");
    // Every outcome from zero, so a rate or an alert works before the first one happens.
    for outcome in Outcome::ALL {
        let _ = writeln!(
            out,
            "spliced_connections_total{{outcome=\"{}\"}} {}",
            outcome.name(),
            shared.outcome_count(outcome)
        );
    }
    out.push_str("# HELP spliced_failures_total Connections that did not end ok, by who failed.\n");
    out.push_str("# TYPE spliced_failures_total counter\n");
    for source in Source::ALL {
        let n: u64 = Outcome::ALL
            .iter()
            .filter(|o| o.source() == Some(source))
            .map(|&o| shared.outcome_count(o))
            .sum();
        let _ = writeln!(
            out,
            "spliced_failures_total{{source=\"{}\"}} {n}",
            source.name()
        );
    }
    if let Some(dns) = &shared.current().dns {
        // Since the last reload (each configuration has its own resolver and cache).
        let _ = writeln!(
            out,
            "# HELP spliced_dns_lookups_total Lookups started for [dns] backends since the last \
             reload (a CNAME chain may take several queries); cache hits and connections that \
             joined a lookup in flight start none.\n\
             # TYPE spliced_dns_lookups_total counter\nspliced_dns_lookups_total {}",
            dns.lookups()
        );
    }
    let _ = writeln!(
        out,
        "# HELP spliced_open_connections Connections being served now.\n\
         # TYPE spliced_open_connections gauge\nspliced_open_connections {}",
        shared.open_connections()
    );
    let _ = writeln!(
        out,
        "# HELP spliced_access_log_dropped_total Access-log lines dropped because standard \
         output did not keep up.\n\
         # TYPE spliced_access_log_dropped_total counter\nspliced_access_log_dropped_total {}",
        shared.access_log_dropped()
    );
    let _ = writeln!(
        out,
        "# HELP spliced_sockmap_fallbacks_total Connections the sockmap engine could not take.\n\
         # TYPE spliced_sockmap_fallbacks_total counter\nspliced_sockmap_fallbacks_total {}",
        shared.fallbacks()
    );
    let packet = shared.packet();
    // Read once: each read sums the per-CPU counters anew.
    let packet_counters = packet.counters();
    if shared.kernel().is_some() || packet.loaded() {
        out.push_str(
            "# HELP spliced_kernel_total Counters of the kernel programs: the sk_skb verdict \
             program's, and the packet engine's TC programs' (named packet_*).\n",
        );
        out.push_str("# TYPE spliced_kernel_total counter\n");
    }
    if let Some(kernel) = shared.kernel() {
        for (name, n) in kernel.counters() {
            let _ = writeln!(out, "spliced_kernel_total{{counter=\"{name}\"}} {n}");
        }
        let (xdp, attached) = kernel.xdp_counters();
        if !attached.is_empty() {
            out.push_str(
                "# HELP spliced_xdp_packets_total Packets the XDP edge filter judged, by outcome.\n",
            );
            out.push_str("# TYPE spliced_xdp_packets_total counter\n");
            for (name, n) in xdp {
                let _ = writeln!(out, "spliced_xdp_packets_total{{outcome=\"{name}\"}} {n}");
            }
        }
        let (client, backend) = sockmap::DETACHES.detached();
        let _ = writeln!(
            out,
            "# HELP spliced_sockmap_detached_total Directions taken out of the kernel because \
             the peer did not keep up, by whose data was being sent.\n\
             # TYPE spliced_sockmap_detached_total counter\n\
             spliced_sockmap_detached_total{{side=\"client\"}} {client}\n\
             spliced_sockmap_detached_total{{side=\"backend\"}} {backend}\n\
             # HELP spliced_sockmap_parked_bytes_max The most bytes the kernel held for a peer \
             when a direction left it.\n\
             # TYPE spliced_sockmap_parked_bytes_max gauge\n\
             spliced_sockmap_parked_bytes_max {}",
            sockmap::DETACHES.parked_max()
        );
        let (socks, hold, peers) = kernel.entries();
        let _ = writeln!(
            out,
            "# HELP spliced_sockmap_entries Entries in the socket maps.\n\
             # TYPE spliced_sockmap_entries gauge\n\
             spliced_sockmap_entries{{map=\"verdict\"}} {socks}\n\
             spliced_sockmap_entries{{map=\"hold\"}} {hold}\n\
             spliced_sockmap_entries{{map=\"peers\"}} {peers}"
        );
    }
    if packet.loaded() {
        render_packet(&mut out, packet, &packet_counters);
    }
    out
}

/// The packet engine's families, and its kernel counters in `spliced_kernel_total` (whose
/// header [`render`] wrote). Only once the engine is loaded, as the sockmap families are
/// only with the eBPF side: a proxy that cannot hand off shows no packet engine at all. From
/// then on every reason and end is listed from zero, so rates and alerts work from the start.
fn render_packet(out: &mut String, packet: &PacketStats, counters: &[(&'static str, u64)]) {
    // Prefixed: the sockmap program has counters of the same name (`redirect_failed`).
    for (name, n) in counters {
        let _ = writeln!(out, "spliced_kernel_total{{counter=\"packet_{name}\"}} {n}");
    }
    let counter = |name: &str| {
        counters
            .iter()
            .find(|(c, _)| *c == name)
            .map_or(0, |&(_, n)| n)
    };
    let _ = writeln!(
        out,
        "# HELP spliced_packet_segments_total Segments the packet engine translated, by \
         direction (up: client to backend).\n\
         # TYPE spliced_packet_segments_total counter\n\
         spliced_packet_segments_total{{direction=\"up\"}} {}\n\
         spliced_packet_segments_total{{direction=\"down\"}} {}\n\
         # HELP spliced_packet_bytes_total Payload bytes the packet engine translated, by \
         direction (retransmissions included).\n\
         # TYPE spliced_packet_bytes_total counter\n\
         spliced_packet_bytes_total{{direction=\"up\"}} {}\n\
         spliced_packet_bytes_total{{direction=\"down\"}} {}\n\
         # HELP spliced_packet_entries Connections in the packet engine's table.\n\
         # TYPE spliced_packet_entries gauge\n\
         spliced_packet_entries {}",
        counter("translated_up"),
        counter("translated_down"),
        counter("translated_bytes_up"),
        counter("translated_bytes_down"),
        packet.entries()
    );
    out.push_str(
        "# HELP spliced_packet_expiries_total Handed-off connections removed from the table, by \
         how they ended.\n",
    );
    out.push_str("# TYPE spliced_packet_expiries_total counter\n");
    for end in End::ALL {
        let _ = writeln!(
            out,
            "spliced_packet_expiries_total{{reason=\"{end}\"}} {}",
            packet.expiries(end)
        );
    }
    out.push_str(
        "# HELP spliced_packet_refused_total Connections the packet engine did not take (they \
         stayed on splice), by reason.\n",
    );
    out.push_str("# TYPE spliced_packet_refused_total counter\n");
    for (reason, n) in packet.refused() {
        let _ = writeln!(
            out,
            "spliced_packet_refused_total{{reason=\"{reason}\"}} {n}"
        );
    }
    out.push_str(
        "# HELP spliced_packet_handoff_seconds How long handoffs took, from the freeze to the \
         translation taking over.\n",
    );
    out.push_str("# TYPE spliced_packet_handoff_seconds histogram\n");
    let (buckets, sum_ns) = packet.handoffs();
    let bounds = HANDOFF_BUCKETS.iter().map(|&(le, _)| le).chain(["+Inf"]);
    for (le, n) in bounds.zip(&buckets) {
        let _ = writeln!(
            out,
            "spliced_packet_handoff_seconds_bucket{{le=\"{le}\"}} {n}"
        );
    }
    let _ = writeln!(
        out,
        "spliced_packet_handoff_seconds_sum {}\n\
         spliced_packet_handoff_seconds_count {}",
        Duration::from_nanos(sum_ns).as_secs_f64(),
        buckets.last().copied().unwrap_or(0)
    );
}

/// How many scrapes may be served at once; more are closed at once. A scraper needs one.
const MAX_CONNECTIONS: usize = 16;

/// Serves `GET /metrics` and `GET /config` (the running configuration as a
/// [`Table`], for `spliced check --against`) on `listener` (bound, non-blocking) until the task is dropped.
pub async fn serve(listener: std::net::TcpListener, shared: Arc<Shared>) -> Result<()> {
    let address = listener.local_addr()?;
    let listener = TcpListener::from_std(listener).context("registering the metrics endpoint")?;
    tracing::info!(%address, "metrics endpoint listening");
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let mut stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors: retrying at once would spin on a full table.
                tracing::warn!(%address, "metrics accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            // Dropped: closed at once.
            continue;
        };
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let _permit = permit;
            let mut head = Vec::with_capacity(512);
            let mut chunk = [0u8; 512];
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => head.extend_from_slice(&chunk[..n]),
                    }
                }
                true
            })
            .await;
            if !matches!(read, Ok(true)) {
                return;
            }
            let response = if head.starts_with(b"GET /metrics ") {
                let body = render(&shared);
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else if head.starts_with(b"GET /config ") {
                let body = Table::of(&shared.current().config).to_text();
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into()
            };
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access;

    /// A scrape before any connection already lists every outcome, at zero, so rates and
    /// alerts work from the start; counted outcomes show their count.
    #[test]
    fn every_outcome_from_zero() {
        let log = access::Log::new(4, std::io::sink()).expect("writer thread");
        let shared = crate::shared::tests::shared(log);
        let text = render(&shared);
        for outcome in Outcome::ALL {
            let sample = format!(
                "spliced_connections_total{{outcome=\"{}\"}} 0\n",
                outcome.name()
            );
            assert!(text.contains(&sample), "{sample} missing from\n{text}");
        }
        assert!(
            text.contains("spliced_access_log_dropped_total 0\n"),
            "{text}"
        );
        shared.count_outcome(Outcome::UnknownName);
        shared.count_outcome(Outcome::BackendUnreachable);
        let text = render(&shared);
        assert!(text.contains("spliced_connections_total{outcome=\"unknown_name\"} 1\n"));
        assert!(text.contains("spliced_failures_total{source=\"client\"} 1\n"));
        assert!(text.contains("spliced_failures_total{source=\"backend\"} 1\n"));
        assert!(text.contains("spliced_failures_total{source=\"proxy\"} 0\n"));
        assert!(
            text.contains("spliced_listener_info{address=\"127.0.0.1:443\",protocol=\"tls\"} 1\n")
        );
        assert!(text.contains("spliced_sites 0\n"), "{text}");
        assert!(text.contains("spliced_connections_by_engine_total{engine=\"splice\"} 0\n"));
    }

    /// Without the packet engine loaded, none of its families shows; once loaded, every
    /// family shows with every reason and end from zero, the kernel counters feed the
    /// segment and byte families and `spliced_kernel_total` (prefixed), and counts add up.
    #[test]
    fn packet_engine_families() {
        let log = access::Log::new(4, std::io::sink()).expect("writer thread");
        let shared = crate::shared::tests::shared(log);
        let text = render(&shared);
        assert!(!text.contains("spliced_packet_"), "{text}");
        assert!(!text.contains("spliced_kernel_total"), "{text}");
        assert!(
            text.contains("spliced_connections_by_engine_total{engine=\"packet\"} 0\n"),
            "{text}"
        );

        let packet = shared.packet();
        packet.set_counters(|| {
            vec![
                ("translated_up", 7),
                ("translated_down", 9),
                ("translated_bytes_up", 700),
                ("translated_bytes_down", 90_000),
                ("redirect_failed", 1),
            ]
        });
        let text = render(&shared);
        for sample in [
            "# TYPE spliced_kernel_total counter\n",
            "spliced_kernel_total{counter=\"packet_translated_up\"} 7\n",
            "spliced_kernel_total{counter=\"packet_redirect_failed\"} 1\n",
            "# TYPE spliced_packet_segments_total counter\n",
            "spliced_packet_segments_total{direction=\"up\"} 7\n",
            "spliced_packet_segments_total{direction=\"down\"} 9\n",
            "spliced_packet_bytes_total{direction=\"up\"} 700\n",
            "spliced_packet_bytes_total{direction=\"down\"} 90000\n",
            "# TYPE spliced_packet_entries gauge\nspliced_packet_entries 0\n",
            "spliced_packet_expiries_total{reason=\"fin\"} 0\n",
            "spliced_packet_expiries_total{reason=\"stop\"} 0\n",
            "spliced_packet_refused_total{reason=\"http_rewrite\"} 0\n",
            "spliced_packet_refused_total{reason=\"not_quiet\"} 0\n",
            "# TYPE spliced_packet_handoff_seconds histogram\n",
            "spliced_packet_handoff_seconds_bucket{le=\"0.0001\"} 0\n",
            "spliced_packet_handoff_seconds_bucket{le=\"+Inf\"} 0\n",
            "spliced_packet_handoff_seconds_sum 0\n",
            "spliced_packet_handoff_seconds_count 0\n",
        ] {
            assert!(text.contains(sample), "{sample} missing from\n{text}");
        }
        // One family header each.
        assert_eq!(text.matches("# TYPE spliced_kernel_total").count(), 1);

        packet.set_entries(3);
        packet.count_expiry(End::RstBackend);
        packet.count_expiry(End::Fin);
        packet.count_expiry(End::Fin);
        packet.count_refused("table_full");
        packet.count_refused("ts_not_translated");
        packet.count_refused("ts_not_translated");
        packet.observe_handoff(Duration::from_micros(50));
        packet.observe_handoff(Duration::from_micros(250));
        packet.observe_handoff(Duration::from_millis(3));
        packet.observe_handoff(Duration::from_secs(9));
        let text = render(&shared);
        for sample in [
            "spliced_packet_entries 3\n",
            "spliced_packet_expiries_total{reason=\"fin\"} 2\n",
            "spliced_packet_expiries_total{reason=\"rst_backend\"} 1\n",
            "spliced_packet_expiries_total{reason=\"idle\"} 0\n",
            "spliced_packet_refused_total{reason=\"table_full\"} 1\n",
            "spliced_packet_refused_total{reason=\"ts_not_translated\"} 2\n",
            "spliced_packet_handoff_seconds_bucket{le=\"0.0001\"} 1\n",
            "spliced_packet_handoff_seconds_bucket{le=\"0.00025\"} 2\n",
            "spliced_packet_handoff_seconds_bucket{le=\"0.0025\"} 2\n",
            "spliced_packet_handoff_seconds_bucket{le=\"0.005\"} 3\n",
            "spliced_packet_handoff_seconds_bucket{le=\"5\"} 3\n",
            "spliced_packet_handoff_seconds_bucket{le=\"+Inf\"} 4\n",
            "spliced_packet_handoff_seconds_sum 9.0033\n",
            "spliced_packet_handoff_seconds_count 4\n",
        ] {
            assert!(text.contains(sample), "{sample} missing from\n{text}");
        }
        // Reasons of section 9 first, in their order, then others.
        let reasons: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("spliced_packet_refused_total{reason=\""))
            .filter_map(|l| l.split('"').next())
            .collect();
        let mut expected = crate::shared::PACKET_REFUSALS.to_vec();
        expected.push("ts_not_translated");
        assert_eq!(reasons, expected);
    }
}
