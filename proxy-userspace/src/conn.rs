//! One connection's life: read the hello, route, connect, send the preface, forward, log.
//!
//! Each connection is its own task with its own deadlines, so a slow or silent client only ever
//! waits on its own timer.
use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{
    io::Interest,
    net::TcpStream,
    sync::watch,
    time::{timeout, timeout_at},
};

use crate::{
    access,
    config::{Cidr, ForwardedHeader, Forwarding, Protocol},
    config::{Site, SourceAddress},
    forward::{self, Counters, Engine},
    hello, http1,
    outcome::{Failure, Outcome},
    preface,
    shared::{Routing, Shared},
};

/// What the listener that accepted a connection contributes to it.
#[derive(Debug)]
pub struct ListenerInfo {
    /// The configured address.
    pub address: SocketAddr,
    /// `tls` or `http`.
    pub protocol: Protocol,
    /// Engine override for this listener.
    pub forwarding: Option<Forwarding>,
    /// Sources that must start with a PROXY header (`accept_proxy`).
    pub accept_proxy: Vec<Cidr>,
}

impl ListenerInfo {
    /// Whether `peer` is in `accept_proxy`: a balancer whose connections must start with a
    /// PROXY header announcing the real client.
    pub fn trusts(&self, peer: SocketAddr) -> bool {
        self.accept_proxy.iter().any(|n| n.contains(peer.ip()))
    }
}

/// Who a connection is for: the client and the address it connected to. From the socket, or,
/// on a connection from an `accept_proxy` source, from the PROXY header it started with, which
/// then stands for the socket everywhere (access log, `X-Forwarded-For`, the PROXY header sent
/// on, and anything per client).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoints {
    /// The client.
    pub client: SocketAddr,
    /// What the client connected to: the header's destination, or our socket's local address.
    pub destination: SocketAddr,
    /// The balancer that announced `client`, when a header did.
    pub via: Option<SocketAddr>,
}

/// What we learned along the way, for the access log.
#[derive(Default)]
struct Facts {
    /// The client once a PROXY header from a trusted balancer replaced the socket's peer.
    endpoints: Option<Endpoints>,
    name: Option<String>,
    alpn: Option<String>,
    site: Option<String>,
    backend: Option<SocketAddr>,
    proxy_protocol: preface::Version,
    engine: Option<Engine>,
    hello_len: u64,
    counters: Counters,
    /// Bytes of the PROXY header a trusted balancer sent (read, never forwarded).
    header_len: u64,
    /// The id sent in the PROXY header, if the site asked for one.
    id: Option<preface::UniqueId>,
    /// Requests sent on by the `http` engine (the others do not count them).
    requests: AtomicU64,
    /// The client may not be sent the refusal its outcome has: the responses before it did not
    /// end cleanly.
    no_refusal: bool,
    /// `CLOCK_BOOTTIME` at accept, for the packet engine's entries.
    started_ns: u64,
    /// How the packet engine's entries of a handed-off connection ended, and how long the
    /// handoff took ([`Facts::packet_ended`]).
    packet_end: Option<(crate::packet_expiry::End, Duration)>,
    /// Why the packet engine refused the connection ([`Facts::packet_refused`]).
    packet_refused: Option<&'static str>,
}

impl Facts {
    /// The connection was handed to the packet engine (its handoff took `handoff`) and its
    /// entries were removed because of `end`: `engine=packet end=... handoff_us=...`.
    fn packet_ended(&mut self, end: crate::packet_expiry::End, handoff: Duration) {
        self.engine = Some(Engine::Packet);
        self.packet_end = Some((end, handoff));
    }

    /// The packet engine refused the connection for `reason` (it stays on splice):
    /// `packet_refused=...` on its line.
    fn packet_refused(&mut self, reason: &'static str) {
        self.packet_refused = Some(reason);
    }
}

/// Serves one accepted connection to completion and writes its access-log line. `cut` turns
/// true when the process stops for good (the grace period is over): the connection then ends
/// at once with [`Outcome::Shutdown`], and still gets its line.
pub async fn handle(
    client: TcpStream,
    peer: SocketAddr,
    listener: Arc<ListenerInfo>,
    shared: Arc<Shared>,
    mut cut: watch::Receiver<bool>,
) {
    let started = Instant::now();
    let started_ns = crate::packet::boottime_ns();
    // Counted from the address the connection carries (see crate::limits): here the peer's,
    // unless the peer is a balancer that announces its client in a PROXY header, whose
    // client `serve` counts once the header is read.
    let limit = shared.current().config.defaults.max_connections_per_source;
    let balancer = listener.trusts(peer);
    let _source = if balancer {
        None
    } else {
        let Some(slot) = shared.per_source().enter(peer.ip(), limit) else {
            close_at_once(
                &client,
                peer,
                &listener,
                &shared,
                Outcome::OverMaxConnectionsPerSource,
            );
            return;
        };
        Some(slot)
    };
    let mut facts = Facts {
        started_ns,
        ..Facts::default()
    };
    let mut inner_cut = cut.clone();
    let result = tokio::select! {
        // Biased: while forwarding, `serve` sees the cut itself and resets the backend too.
        biased;
        r = serve(&client, (peer, balancer), &listener, &shared, &mut facts, &mut inner_cut) => r,
        _ = cut.wait_for(|&c| c) => {
            forward::reset_on_close(&client);
            Err(Outcome::Shutdown.into())
        }
    };
    let (outcome, detail) = match result {
        Ok(()) => (Outcome::Ok, None),
        Err(Failure { outcome, detail }) => (outcome, detail),
    };
    // What the client sent after its hello while being refused counts as received too.
    let drained = if facts.no_refusal {
        0
    } else {
        refuse(&client, listener.protocol, outcome).await
    };
    let (up, down) = facts.counters.get();
    let proxy_protocol = match facts.proxy_protocol {
        preface::Version::None => "none",
        preface::Version::V1 => "v1",
        preface::Version::V2 => "v2",
    };
    shared.count_outcome(outcome);
    if let Some(engine) = facts.engine {
        shared.count_engine(engine);
    }
    let entry = access::Entry {
        client: Some(facts.endpoints.map_or(peer, |e| e.client)),
        via: facts.endpoints.and_then(|e| e.via),
        listener: Some(listener.address),
        name: facts.name.as_deref(),
        alpn: facts.alpn.as_deref(),
        site: facts.site.as_deref(),
        backend: facts.backend,
        proxy_protocol,
        engine: facts.engine.map(Engine::as_str),
        bytes_up: up + facts.hello_len + drained,
        bytes_down: down,
        duration: started.elapsed(),
        outcome: outcome.name(),
        detail: detail.as_deref(),
        id: facts.id,
        requests: (facts.engine == Some(Engine::Http))
            .then(|| facts.requests.load(Ordering::Relaxed)),
        end: facts.packet_end.map(|(end, _)| end.as_str()),
        handoff_us: facts
            .packet_end
            .map(|(_, took)| u64::try_from(took.as_micros()).unwrap_or(u64::MAX)),
        packet_refused: facts.packet_refused,
    };
    shared.access_log(&entry);
}

/// Ends a connection refused by a limit before anything was read from it: what the client
/// already sent is read and discarded (so that the close sends a FIN, not the reset that
/// closing with unread data makes), the socket is closed, and the outcome is counted and
/// logged. Never waits: it is called on the accepting task.
///
/// A FIN rather than a reset, as HAProxy closes: a TLS client sees the server close the
/// connection (and may retry later) rather than a network failure, and nothing in the
/// handshake is faked, since no TLS alert can be sent before the hello is read.
pub fn close_at_once(
    client: &TcpStream,
    peer: SocketAddr,
    listener: &ListenerInfo,
    shared: &Shared,
    outcome: Outcome,
) {
    let started = Instant::now();
    let mut drained = 0u64;
    let mut sink = [0u8; 2048];
    // Straight from the socket, not through tokio's readiness, which a socket accepted a
    // moment ago may not have yet. Bounded: a client streaming faster than we read gets its
    // reset after 64 KiB.
    let fd = std::os::fd::AsRawFd::as_raw_fd(client);
    while drained < 64 * 1024 {
        match nix::sys::socket::recv(fd, &mut sink, nix::sys::socket::MsgFlags::MSG_DONTWAIT) {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n as u64,
        }
    }
    shared.count_outcome(outcome);
    shared.access_log(&access::Entry {
        client: Some(peer),
        listener: Some(listener.address),
        proxy_protocol: "none",
        bytes_up: drained,
        duration: started.elapsed(),
        outcome: outcome.name(),
        ..access::Entry::default()
    });
}

/// `peer` comes with whether it is a balancer the listener trusts to announce its client.
async fn serve(
    client: &TcpStream,
    (peer, trusted): (SocketAddr, bool),
    listener: &ListenerInfo,
    shared: &Shared,
    facts: &mut Facts,
    cut: &mut watch::Receiver<bool>,
) -> Result<(), Failure> {
    let config = shared.current();
    let defaults = &config.config.defaults;

    let local = client
        .local_addr()
        .map_err(|e| Failure::new(Outcome::ClientError, e))?;

    // 2. Read the hello under one deadline for the whole hello, not per read, PROXY header
    // included when the source must send one. Until it is complete, the connection may be shed
    // to free its descriptor (see crate::shed).
    let mut buf = Vec::with_capacity(2048);
    let ticket = shared.pre_hello().enter();
    let read = async {
        let endpoints = if trusted {
            read_proxy_header(client, peer, local, &mut buf, facts).await?
        } else {
            Endpoints {
                client: peer,
                destination: local,
                via: None,
            }
        };
        let name = read_hello(
            client,
            listener.protocol,
            defaults.max_request_head,
            &mut buf,
            facts,
        )
        .await
        .map_err(|failure| untrusted_header(failure, trusted, &buf))?;
        Ok::<_, Failure>((endpoints, name))
    };
    let (endpoints, name) = tokio::select! {
        read = timeout(defaults.client_hello_timeout, read) => match read {
            Err(_) if facts.endpoints.is_none() && trusted => {
                return Err(Failure::new(Outcome::HelloTimeout, "no complete PROXY header"));
            }
            Err(_) => return Err(Outcome::HelloTimeout.into()),
            Ok(result) => result?,
        },
        () = ticket.shed() => return Err(Outcome::ShedBeforeHello.into()),
    };
    drop(ticket);
    let peer = endpoints.client;
    // A balancer's client is counted against its own per-source limit, as if it had come
    // directly; the balancer's address is not limited (it carries everyone).
    let _source = if trusted {
        let limit = defaults.max_connections_per_source;
        Some(
            shared
                .per_source()
                .enter(peer.ip(), limit)
                .ok_or(Outcome::OverMaxConnectionsPerSource)?,
        )
    } else {
        None
    };

    // 3. Route: a site's backend, or one from DNS. The lookup counts against connect_timeout.
    let connect_deadline = tokio::time::Instant::now() + defaults.connect_timeout;
    let (site, backend_addr, dns_name) =
        route(&config, listener, name.as_deref(), local.port()).await?;
    facts.site = Some(site.name.clone());
    facts.proxy_protocol = site.proxy_protocol;
    facts.backend = Some(backend_addr);

    // A header site's requests are framed; the first one is checked before the backend is
    // connected, so that a refused request never reaches it.
    let framer = (listener.protocol == Protocol::Http
        && site.forwarded_header != ForwardedHeader::None)
        .then(|| {
            let forwarding = http1::Forwarding {
                header: site.forwarded_header,
                client: peer,
                port: local.port(),
                trusted: defaults
                    .trusted_proxies
                    .iter()
                    .any(|net| net.contains(peer.ip())),
            };
            http1::RequestFramer::new(forwarding, defaults.max_request_head)
        });
    if let Some(framer) = &framer {
        framer
            .clone()
            .step(&buf, &mut Vec::new())
            .map_err(|e| Failure::from(forward::http::Refusal::Request(e)))?;
    }

    // 4. Connect, from the client's IPv4 address inside source_prefix if the site says so.
    let source = match (site.source, defaults.source_prefix) {
        (SourceAddress::Embed, Some(prefix)) if backend_addr.is_ipv6() => {
            embed(prefix, endpoints.client.ip())
        }
        _ => None,
    };
    // The packet engine: the backend must never send a segment larger than the client may
    // take once its header shrinks by 20 bytes, so L' announces the MSS the client announced
    // (design 4.1); a SYN with IPv4 options refuses the handoff (section 9).
    let wanted = site
        .forwarding
        .or(listener.forwarding)
        .unwrap_or(defaults.forwarding);
    let loaded = forward::choose::Loaded {
        sockmap: shared.kernel().is_some(),
        packet: shared.packet_kernel().is_some(),
    };
    let plan = forward::choose::choose(wanted, &config.config, loaded);
    let mut packet_refuse = None;
    let mut backend_mss = None;
    if matches!(plan, forward::choose::Plan::Packet { .. }) {
        match read_syn(client) {
            Ok(syn) => {
                backend_mss = syn.mss;
                if syn.ip_options {
                    packet_refuse = Some("ip_options");
                } else if syn.accecn && crate::packet::host::accecn_incoming() {
                    // The listener answered with AccECN: its counters count from the SYN and
                    // cannot be carried over to the backend's connection (design 4.5).
                    packet_refuse = Some("accecn");
                }
            }
            Err(e) => {
                tracing::debug!(%peer, "no usable saved SYN: {e}");
                packet_refuse = Some("no_syn");
            }
        }
    }
    let backend =
        match timeout_at(connect_deadline, connect(backend_addr, source, backend_mss)).await {
            Err(_) => return Err(Outcome::BackendConnectTimeout.into()),
            Ok(Err(e)) => return Err(Failure::new(Outcome::BackendUnreachable, e)),
            Ok(Ok(stream)) => stream,
        };
    let _ = backend.set_nodelay(true);

    // 5. Preface: PROXY header and every byte read so far, in one write.
    let mut preface_bytes = Vec::with_capacity(buf.len() + 256);
    facts.id = site
        .tlvs
        .unique_id
        .then(|| preface::UniqueId::from_u128(shared.next_id()));
    let header = preface::Header {
        authority: if site.tlvs.authority {
            facts.name.as_deref()
        } else {
            None
        },
        unique_id: facts.id.as_ref().map(preface::UniqueId::as_bytes),
        crc32c: site.tlvs.crc32c,
        ..preface::Header::new(endpoints.client, endpoints.destination)
    };
    preface::encode(site.proxy_protocol, &header, &mut preface_bytes)
        .map_err(|e| Failure::new(Outcome::PrefaceError, e))?;
    if let Some(framer) = framer {
        // The header engine sends the preface with the first rewritten request.
        facts.hello_len = 0;
        facts.engine = Some(Engine::Http);
        let _open = shared.open_on(Engine::Http);
        let router = &config.router;
        let same_site = |host: Option<&str>| match &dns_name {
            // A DNS backend serves the one name it was looked up for.
            Some(looked_up) => host
                .and_then(crate::name::normalize_cow)
                .is_some_and(|host| host == looked_up.as_str()),
            None => router
                .route(host)
                .is_ok_and(|other| std::ptr::eq(other, site)),
        };
        let params = forward::http::Params {
            framer,
            buffered: buf,
            preface: preface_bytes,
            same_site: &same_site,
            requests: &facts.requests,
        };
        let counters = &facts.counters;
        // On the heap: inline, the header engine's state (about 2 KiB) would enlarge every
        // connection's task, header site or not, for as long as it lives.
        let forwarding = Box::pin(async {
            // Socket and response failures have no refusal: the client may hold a partial
            // response.
            let ended = forward::http::forward(client, &backend, counters, params)
                .await
                .map_err(|e| (Failure::from(e), false))?;
            match ended {
                forward::http::Ended::Closed => Ok(()),
                forward::http::Ended::Tunnel => {
                    forward::forward(Engine::Http, client, &backend, counters)
                        .await
                        .map_err(|e| (Failure::from(e), false))
                }
                forward::http::Ended::Refused { error, refuse } => {
                    Err((Failure::from(error), refuse))
                }
            }
        });
        let result = tokio::select! {
            r = forwarding => r,
            () = idle_watch(counters, defaults.idle_timeout) => {
                Err((Outcome::IdleTimeout.into(), false))
            }
            _ = cut.wait_for(|&c| c) => {
                forward::reset_on_close(client);
                forward::reset_on_close(&backend);
                Err((Outcome::Shutdown.into(), false))
            }
        };
        return result.map_err(|(failure, refuse)| {
            facts.no_refusal = !refuse;
            failure
        });
    }
    preface_bytes.extend_from_slice(&buf);
    if let Err(e) = forward::write_all(&backend, &preface_bytes).await {
        // The client's hello is lost with it: a clean end would look like a refusal by the
        // site, so the client gets a reset.
        forward::reset_on_close(client);
        return Err(Failure::new(Outcome::BackendError, e));
    }
    let preface_len = preface_bytes.len() as u64;
    // Everything read from the client socket: the kernel's counts include a received header.
    let client_consumed = facts.header_len + buf.len() as u64;
    // Both buffers would otherwise stay allocated for as long as the connection lives.
    drop(preface_bytes);
    drop(buf);

    // 6. Forward, by the rule in forward::choose.
    let engine = plan.engine();
    facts.engine = Some(engine);
    let _open = shared.open_on(engine);
    if let forward::choose::Plan::Packet {
        after,
        short_is_refused,
        then,
    } = plan
        && let Some(packet) = shared.packet_kernel()
    {
        let packet_settings = &config.config.packet;
        let handed_off = AtomicBool::new(false);
        let then_sockmap = match (then, shared.kernel()) {
            (forward::choose::Then::Sockmap { handoff }, Some(kernel)) => {
                Some(forward::sockmap::Params {
                    kernel,
                    backlog_limit: defaults.sockmap_backlog_limit,
                    preface_len,
                    client_consumed,
                    idle_timeout: defaults.idle_timeout,
                    handoff,
                    earlier: forward::sockmap::Earlier::default(),
                })
            }
            _ => None,
        };
        let params = forward::packet::Params {
            packet,
            after,
            preface_len,
            client_consumed,
            started_ns: facts.started_ns,
            drain_timeout: packet_settings.drain_timeout,
            refuse: packet_refuse,
            handed_off: &handed_off,
            stats: shared.packet(),
            short_is_refused,
            then_sockmap,
        };
        let counters = &facts.counters;
        let forwarding = forward::packet::forward(client, &backend, counters, params);
        // Idle while spliced forwards, that is; once handed off, the sweeper decides.
        let idle = async {
            loop {
                idle_watch(counters, defaults.idle_timeout).await;
                if !handed_off.load(Ordering::Relaxed) {
                    return;
                }
            }
        };
        let (result, abort) = tokio::select! {
            r = forwarding => match r {
                Ok(used) => (Ok(used), false),
                Err(e) => (Err(Failure::from(e)), true),
            },
            () = idle => (Err(Outcome::IdleTimeout.into()), false),
            _ = cut.wait_for(|&c| c) => (Err(Outcome::Shutdown.into()), true),
        };
        // A handed-off connection's sockets are in repair mode: closing them is silent
        // whatever SO_LINGER says.
        if abort {
            forward::reset_on_close(client);
            forward::reset_on_close(&backend);
        }
        match result? {
            forward::packet::Used::Stayed { refused, sockmap } => {
                if let Some(reason) = refused {
                    facts.packet_refused(reason);
                }
                facts.engine = Some(forward::choose::ended_on(plan, false, sockmap));
            }
            forward::packet::Used::Packet { end, handoff } => {
                facts.packet_ended(end, handoff);
            }
        }
        return Ok(());
    }
    let counters = &facts.counters;
    let engine_slot = &mut facts.engine;
    let forwarding = async {
        if engine == Engine::Sockmap
            && let Some(kernel) = shared.kernel()
        {
            let params = forward::sockmap::Params {
                kernel,
                backlog_limit: defaults.sockmap_backlog_limit,
                preface_len,
                client_consumed,
                idle_timeout: defaults.idle_timeout,
                handoff: defaults.sockmap_handoff,
                earlier: forward::sockmap::Earlier::default(),
            };
            let used = forward::sockmap::forward(client, &backend, counters, params).await?;
            if used == forward::sockmap::Used::Splice {
                // Too short to be handed over, or (with no handoff) the kernel could not take
                // it, e.g. because the client had already sent its FIN.
                if defaults.sockmap_handoff == 0 {
                    shared.count_fallback();
                }
                *engine_slot = Some(Engine::Splice);
            }
            return Ok(());
        }
        let fallback = if engine == Engine::Copy {
            Engine::Copy
        } else {
            Engine::Splice
        };
        forward::forward(fallback, client, &backend, counters).await
    };
    let (result, abort) = tokio::select! {
        r = forwarding => match r {
            Ok(()) => (Ok(()), false),
            // One side failed or reset: the other must see an abort, not a clean end.
            Err(e) => (Err(Failure::from(e)), true),
        },
        () = idle_watch(counters, defaults.idle_timeout) => {
            (Err(Outcome::IdleTimeout.into()), false)
        }
        _ = cut.wait_for(|&c| c) => (Err(Outcome::Shutdown.into()), true),
    };
    if abort {
        forward::reset_on_close(client);
        forward::reset_on_close(&backend);
    }
    result
}

/// The NAT46 source for `client`: `prefix` (a /96) with the IPv4 address in its last 32 bits;
/// `None` for an IPv6 client, which has no IPv4 address to embed (an IPv4-mapped one does).
fn embed(prefix: Cidr, client: IpAddr) -> Option<Ipv6Addr> {
    let (IpAddr::V6(prefix), IpAddr::V4(client)) = (prefix.addr, client.to_canonical()) else {
        return None;
    };
    Some(Ipv6Addr::from(
        u128::from(prefix) | u128::from(u32::from(client)),
    ))
}

/// Connects to `backend`, from `source` when given. That address is on no interface: the
/// socket gets `IP_TRANSPARENT` (or `IP_FREEBIND` where that is refused, which needs no
/// privilege) so that it may be bound, and the port is chosen at connect time
/// (`IP_BIND_ADDRESS_NO_PORT`). Replies reach the socket only if the prefix is routed locally
/// (`ip -6 route add local <prefix> dev lo`) and the backend network routes it to us.
///
/// `mss`, when given, is set as `TCP_MAXSEG` before connecting: the MSS the socket announces.
async fn connect(
    backend: SocketAddr,
    source: Option<Ipv6Addr>,
    mss: Option<u16>,
) -> std::io::Result<TcpStream> {
    use nix::sys::socket::{setsockopt, sockopt};
    let socket = if backend.is_ipv6() {
        tokio::net::TcpSocket::new_v6()?
    } else {
        tokio::net::TcpSocket::new_v4()?
    };
    if let Some(mss) = mss {
        crate::packet::host::set_maxseg(std::os::fd::AsFd::as_fd(&socket), mss)?;
    }
    let Some(source) = source else {
        return socket.connect(backend).await;
    };
    if setsockopt(&socket, sockopt::IpTransparent, &true).is_err() {
        setsockopt(&socket, sockopt::IpFreebind, &true).map_err(std::io::Error::from)?;
    }
    // Best effort: without it, bind picks a port unique to the source address alone.
    let _ = setsockopt(&socket, sockopt::IpBindAddressNoPort, &true);
    socket.bind(SocketAddr::new(source.into(), 0))?;
    socket.connect(backend).await
}

/// Reads the client's SYN, which a listener that may use the packet engine saved. Once: the
/// kernel frees it on the first read.
fn read_syn(client: &TcpStream) -> Result<crate::packet::syn::Syn, String> {
    let bytes = crate::packet::host::saved_syn(std::os::fd::AsFd::as_fd(client))
        .map_err(|e| format!("TCP_SAVED_SYN: {e}"))?
        .ok_or("the listener saved no SYN")?;
    crate::packet::syn::parse(&bytes).map_err(|e| e.to_string())
}

/// Finds where a connection for `name` goes: the site that claims it, else (on a listener with
/// `backend = "dns"`) the address DNS gives for it, else the default site. Returns the site (the
/// `[dns]` one for a DNS backend), the backend's address, and the name looked up, if any.
async fn route<'a>(
    routing: &'a Routing,
    listener: &ListenerInfo,
    name: Option<&str>,
    port: u16,
) -> Result<(&'a Site, SocketAddr, Option<String>), Failure> {
    let uses_dns = routing
        .config
        .listeners
        .iter()
        .any(|l| l.address == listener.address && l.dns);
    if uses_dns
        && let (Some(resolver), Some(dns_site), Some(settings)) =
            (&routing.dns, &routing.dns_site, &routing.config.dns)
        && let Some(name) = name.and_then(crate::name::normalize_cow)
        && routing.router.find(&name).is_none()
    {
        let limit = settings
            .timeout
            .min(routing.config.defaults.connect_timeout);
        let ip = match timeout(limit, resolver.resolve(&name)).await {
            Err(_) => {
                return Err(Failure::new(
                    Outcome::DnsTimeout,
                    format!("no answer within {limit:?}"),
                ));
            }
            Ok(Err(failure)) => return Err(Failure::new(failure.kind.into(), failure.detail)),
            Ok(Ok(ip)) => ip,
        };
        let backend = SocketAddr::new(ip.into(), port);
        return Ok((dns_site, backend, Some(name.into_owned())));
    }
    let site = routing.router.route(name)?;
    let Some(backend) = site.backend.for_listener(listener.protocol, port) else {
        return Err(Outcome::NoBackendForProtocol.into());
    };
    Ok((site, backend, None))
}

/// Resolves once no byte moved in either direction for `idle`; never without an idle limit.
async fn idle_watch(counters: &Counters, idle: Option<Duration>) {
    let Some(idle) = idle else {
        return std::future::pending().await;
    };
    let mut last = counters.get();
    loop {
        tokio::time::sleep(idle).await;
        let now = counters.get();
        if now == last {
            return;
        }
        last = now;
    }
}

/// Reads until the hello parser has a name (or refuses). Returns the requested name.
async fn read_hello(
    client: &TcpStream,
    protocol: Protocol,
    max_request_head: usize,
    buf: &mut Vec<u8>,
    facts: &mut Facts,
) -> Result<Option<String>, Failure> {
    // Bytes that came in with a PROXY header are the hello's start: parse them before reading.
    let mut read = buf.is_empty();
    loop {
        if read && read_more(client, buf, facts).await? == 0 {
            return Err(Outcome::ClientClosedBeforeHello.into());
        }
        read = true;
        // Everything read is kept and forwarded, even bytes after the hello (early data);
        // the parser refuses once the hello itself passes its limit, so this stays bounded.
        match protocol {
            Protocol::Tls => match hello::tls::parse_client_hello(buf) {
                Ok(None) => {}
                Ok(Some(h)) => {
                    facts.alpn = (!h.alpn.is_empty()).then(|| h.alpn.join(","));
                    facts.name.clone_from(&h.sni);
                    return Ok(h.sni);
                }
                Err(e) => return Err(e.into()),
            },
            Protocol::Http => match hello::http::parse_request_head_within(buf, max_request_head) {
                Ok(None) => {}
                Ok(Some(head)) => {
                    facts.name.clone_from(&head.host);
                    return Ok(head.host);
                }
                Err(e @ hello::HelloError::BadRequest(_)) => {
                    // Count a NUL, a fold or a bare line ending by its own name.
                    return Err(match http1::byte_error(buf, max_request_head) {
                        Some(specific) => forward::http::Refusal::Request(specific).into(),
                        None => e.into(),
                    });
                }
                Err(e) => return Err(e.into()),
            },
        }
    }
}

/// Reads what the client sent into `buf`'s spare room; returns how many bytes (0 at its end).
async fn read_more(
    client: &TcpStream,
    buf: &mut Vec<u8>,
    facts: &mut Facts,
) -> Result<usize, Failure> {
    // Read straight into the buffer's spare room: a 4 KiB array here would live in every
    // connection's task for its whole life (a future is as large as its largest state).
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(4096);
    }
    let n = client
        .async_io(Interest::READABLE, || client.try_read_buf(buf))
        .await
        .map_err(|e| Failure::new(Outcome::ClientError, e))?;
    // Counted as it arrives, so a refused or abandoned hello still shows in `up=`.
    facts.hello_len = buf.len() as u64;
    Ok(n)
}

/// Reads the PROXY header a source in `accept_proxy` must start with, and leaves in `buf` only
/// what followed it (the hello's start). Returns who the connection is for; records it in
/// `facts` too.
async fn read_proxy_header(
    client: &TcpStream,
    peer: SocketAddr,
    local: SocketAddr,
    buf: &mut Vec<u8>,
    facts: &mut Facts,
) -> Result<Endpoints, Failure> {
    use preface::receive::{self, Parsed};
    loop {
        if read_more(client, buf, facts).await? == 0 {
            return Err(Failure::new(
                Outcome::ClientClosedBeforeHello,
                "closed within the PROXY header",
            ));
        }
        let Parsed::Complete { header, len } = receive::parse(buf)? else {
            continue;
        };
        buf.drain(..len);
        facts.header_len = len as u64;
        facts.hello_len = buf.len() as u64;
        // LOCAL, UNKNOWN and AF_UNSPEC keep the connection's own addresses (the spec).
        let endpoints = match header.addresses {
            Some(a) => Endpoints {
                client: a.source,
                destination: a.destination,
                via: Some(peer),
            },
            None => Endpoints {
                client: peer,
                destination: local,
                via: None,
            },
        };
        facts.endpoints = Some(endpoints);
        return Ok(endpoints);
    }
}

/// A hello refused from a source that may not send a PROXY header, which starts like one: a
/// forged or misdirected header, counted by its own name.
fn untrusted_header(failure: Failure, trusted: bool, buf: &[u8]) -> Failure {
    let refused = !matches!(
        failure.outcome,
        Outcome::ClientClosedBeforeHello | Outcome::ClientError
    );
    if !trusted && refused && preface::receive::looks_like_header(buf) {
        return Failure::new(
            Outcome::ProxyHeaderUntrusted,
            "a PROXY header from a source not in accept_proxy",
        );
    }
    failure
}

/// Tells the client why it is refused, in its protocol, then lets the socket close; does
/// nothing for an outcome without a refusal ([`Outcome::refusal`]). Returns how many bytes the
/// client sent meanwhile (they were read and discarded).
async fn refuse(client: &TcpStream, protocol: Protocol, outcome: Outcome) -> u64 {
    let Some(bytes) = outcome.refusal(protocol) else {
        return 0;
    };
    // Best effort with a short deadline: a client that does not read must not hold us.
    if timeout(Duration::from_secs(1), forward::write_all(client, bytes))
        .await
        .is_err()
    {
        return 0;
    }
    // Closing with unread input makes the kernel send RST, which can destroy the response
    // before the client reads it; so half-close, then discard what the client still sends
    // until it closes too (bounded in time and bytes).
    if forward::shutdown_write(client).is_err() {
        return 0;
    }
    let mut drained = 0u64;
    let _ = timeout(Duration::from_secs(1), async {
        // On the heap: refusals are rare, and an array would enlarge every connection's task.
        let mut sink = vec![0u8; 4096];
        let mut left = 64 * 1024usize;
        while left > 0 {
            match client
                .async_io(Interest::READABLE, || client.try_read(&mut sink))
                .await
            {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    drained += n as u64;
                    left = left.saturating_sub(n);
                }
            }
        }
    })
    .await;
    drained
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        sync::Mutex,
    };

    use super::*;

    /// Keeps what the access log writes.
    #[derive(Clone, Default)]
    struct Kept(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Kept {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("kept").extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A client whose bytes arrived before the accept is closed with a FIN, not the reset that
    /// closing with unread data makes; its bytes are counted in the line, and the outcome.
    #[tokio::test]
    async fn a_connection_closed_at_once_gets_a_fin_and_its_bytes_are_counted() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let mut client = std::net::TcpStream::connect(addr).expect("connect");
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let sent = b"a hello that arrived before the accept";
        client.write_all(sent).expect("write");
        std::thread::sleep(Duration::from_millis(50));
        let (stream, peer) = listener.accept().await.expect("accept");
        let kept = Kept::default();
        let log = access::Log::new(16, kept.clone()).expect("writer thread");
        let shared = crate::shared::tests::shared(log);
        let info = ListenerInfo {
            address: addr,
            protocol: Protocol::Tls,
            forwarding: None,
            accept_proxy: Vec::new(),
        };
        close_at_once(
            &stream,
            peer,
            &info,
            &shared,
            Outcome::OverMaxConnectionsPerSource,
        );
        drop(stream);
        let mut buf = [0u8; 16];
        let read = client.read(&mut buf);
        assert!(matches!(read, Ok(0)), "expected a FIN: {read:?}");
        shared.flush_access_log(Duration::from_secs(5));
        let line = String::from_utf8(kept.0.lock().expect("kept").clone()).expect("utf-8");
        assert!(
            line.contains(&format!(
                " up={} down=0 ms=0 outcome=over_max_connections_per_source\n",
                sent.len()
            )),
            "{line}"
        );
        assert_eq!(
            shared.outcome_count(Outcome::OverMaxConnectionsPerSource),
            1
        );
    }

    #[test]
    fn embeds_ipv4_clients_only() {
        let prefix = Cidr {
            addr: "2001:db8:4646::".parse().expect("address"),
            prefix: 96,
        };
        let ip = |s: &str| s.parse::<IpAddr>().expect("address");
        let want: Ipv6Addr = "2001:db8:4646::c000:20a".parse().expect("address");
        assert_eq!(embed(prefix, ip("192.0.2.10")), Some(want));
        assert_eq!(embed(prefix, ip("::ffff:192.0.2.10")), Some(want));
        assert_eq!(embed(prefix, ip("2001:db8:c::10")), None);
        assert_eq!(want.to_string(), "2001:db8:4646::c000:20a");
    }
}
