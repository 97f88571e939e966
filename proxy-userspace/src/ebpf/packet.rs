//! The packet engine's kernel side, as far as it exists (`docs/packet-engine.md`, "Order of
//! work"): the `sock_ops` program that records every connection's ISNs, and the TC program
//! that translates the segments of connections whose entries are `ACTIVE`, with its table.
//!
//! Each loads its own copy of the object, apart from [`super::Kernel`], because nothing in the
//! proxy uses it yet: the end-to-end tests drive it directly to check the kernel facts the
//! engine rests on. The handoff will move it into the [`super::Kernel`].
use std::{
    net::{SocketAddrV4, SocketAddrV6},
    path::Path,
    sync::Mutex,
};

use anyhow::{Context as _, Result};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, RingBuf},
    programs::{CgroupAttachMode, SchedClassifier, SockOps, TcAttachType},
};
use proxy_common::{
    FAMILY_V4, FAMILY_V6, FLOW_ACTIVE, FLOW_DOWN, FLOW_DRAIN, FLOW_ECN_CLEAR, FLOW_LOCAL_FIN,
    FLOW_RESET, FLOW_SACK_STRIP, FLOW_TS_STRIP, FLOW_TS_TRANSLATE, FLOW_UP, Flow, FlowControl,
    FlowKey, IsnPair, MAP_PACKET_CLAMP, MAP_PACKET_CLAMPING, MAP_PACKET_CONTROL,
    MAP_PACKET_COUNTERS, MAP_PACKET_FLOWS, MAP_PACKET_ICMP, MAP_PACKET_ISN, PACKET_MAX_CONNECTIONS,
    PROG_PACKET_IN, PROG_PACKET_ISN, PROG_PACKET_OUT, PacketCounter, WindowClamp,
};

use super::load::OBJECT;

mod handoff;
pub use handoff::{Clamped, Freeze, HandedOff, HandoffError, HandoffLimits};

/// `spliced_packet_isn` attached to one cgroup (v2), and its map of ISNs by socket cookie.
/// Dropping it detaches the program and frees the map.
pub struct IsnRecorder {
    /// Owns the program and its link to the cgroup.
    _ebpf: Ebpf,
    /// Behind a lock so handoffs on several threads can share the recorder.
    isn: Mutex<HashMap<MapData, u64, IsnPair>>,
}

impl IsnRecorder {
    /// Loads the object and attaches the `sock_ops` program to the cgroup v2 directory
    /// `cgroup`: every TCP socket created by a process of that cgroup (or of one below it)
    /// has its ISNs recorded when it becomes established.
    pub fn attach(cgroup: &Path) -> Result<Self> {
        anyhow::ensure!(
            !OBJECT.is_empty(),
            "this binary was built without its eBPF object"
        );
        let mut ebpf = Ebpf::load(OBJECT).context("loading the eBPF object into the kernel")?;
        let isn = ebpf
            .take_map(MAP_PACKET_ISN)
            .with_context(|| format!("map {MAP_PACKET_ISN} missing from the object"))?
            .try_into()?;
        let prog: &mut SockOps = ebpf
            .program_mut(PROG_PACKET_ISN)
            .with_context(|| format!("program {PROG_PACKET_ISN} missing from the object"))?
            .try_into()?;
        prog.load()
            .context("the verifier rejected the sock_ops program")?;
        let dir = std::fs::File::open(cgroup)
            .with_context(|| format!("opening the cgroup {}", cgroup.display()))?;
        prog.attach(&dir, CgroupAttachMode::Single)
            .with_context(|| format!("attaching {PROG_PACKET_ISN} to {}", cgroup.display()))?;
        Ok(IsnRecorder {
            _ebpf: ebpf,
            isn: Mutex::new(isn),
        })
    }

    /// The ISNs recorded for the socket with this cookie, if any.
    pub fn get(&self, cookie: u64) -> Result<Option<IsnPair>> {
        match lock(&self.isn).get(&cookie, 0) {
            Ok(pair) => Ok(Some(pair)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).context("reading the ISN map"),
        }
    }

    /// Forgets the socket with this cookie (the engine reads an entry once, at handoff).
    pub fn forget(&self, cookie: u64) -> Result<()> {
        match lock(&self.isn).remove(&cookie) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e).context("deleting from the ISN map"),
        }
    }
}

/// What spliced knows about a connection when it hands it to the kernel, from which the two
/// translation entries follow (`docs/packet-engine.md`, sections 1 and 3.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Handoff {
    /// The client X, as L sees it.
    pub client: SocketAddrV4,
    /// L's own address (the listener's, `p4:443`).
    pub front: SocketAddrV4,
    /// L''s own address (`p6:ep`).
    pub back: SocketAddrV6,
    /// The backend Y.
    pub backend: SocketAddrV6,
    /// The ISNs recorded for L: its own (`Ip`) and X's (`Ic`).
    pub client_isns: IsnPair,
    /// The ISNs recorded for L': its own (`Jp`) and Y's (`Jb`).
    pub backend_isns: IsnPair,
    /// Bytes spliced read from L (the client) before the handoff: the hello, any PROXY header
    /// a balancer sent, and everything forwarded since.
    pub read_from_client: u32,
    /// Bytes spliced wrote to L' (the backend) before the handoff: the PROXY header it sent,
    /// the hello, and everything forwarded since. Only the difference to `read_from_client`
    /// matters; it is constant once the preface is written (the header spliced inserts less
    /// the header it received). Counts are taken modulo 2^32, as sequence numbers are.
    pub written_to_backend: u32,
    /// Bytes spliced read from L' before the handoff.
    pub read_from_backend: u32,
    /// Bytes spliced wrote to L before the handoff (equal to `read_from_backend`: nothing is
    /// inserted that way).
    pub written_to_client: u32,
    /// L's window scales: the one X applies to what it sends (`snd_wscale`) and the one X
    /// applies to the windows it receives (`rcv_wscale`).
    pub client_wscale: Wscale,
    /// L''s window scales, likewise for Y.
    pub backend_wscale: Wscale,
    /// The interface X is reached by.
    pub client_ifindex: u32,
    /// The interface Y is reached by.
    pub backend_ifindex: u32,
    /// The IPv6 flow label of the client's translated segments.
    pub flow_label: u32,
    /// L negotiated classic ECN with X (`TCPI_OPT_ECN` in L's `tcpi_options`).
    pub client_ecn: bool,
    /// L' negotiated classic ECN with Y.
    pub backend_ecn: bool,
    /// L negotiated timestamps with X (`TCPI_OPT_TIMESTAMPS`).
    pub client_timestamps: bool,
    /// L' negotiated timestamps with Y.
    pub backend_timestamps: bool,
    /// L negotiated SACK with X (`TCPI_OPT_SACK`).
    pub client_sack: bool,
    /// L' negotiated SACK with Y.
    pub backend_sack: bool,
    /// L's timestamp clock (0 without timestamps).
    pub client_clock: SocketClock,
    /// L''s timestamp clock, likewise.
    pub backend_clock: SocketClock,
    /// L's socket cookie (`SO_COOKIE`).
    pub client_cookie: u64,
    /// L''s socket cookie.
    pub backend_cookie: u64,
    /// When the connection was accepted (`CLOCK_BOOTTIME` nanoseconds).
    pub started_ns: u64,
}

/// A local socket's timestamp clock, read at the handoff (design 4.3).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketClock {
    /// The clock is `CLOCK_MONOTONIC` in milliseconds plus this (`getsockopt(TCP_TIMESTAMP)`
    /// less the clock, read so that it errs late).
    pub offset: u32,
    /// The clock as read then: no `TSval` the socket sent before is later than this.
    pub now: u32,
}

/// A socket's two window scales, as `TCP_INFO` reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Wscale {
    /// The scale of the windows the peer sends (`tcpi_snd_wscale`).
    pub snd: u8,
    /// The scale of the windows this socket sends (`tcpi_rcv_wscale`).
    pub rcv: u8,
}

fn mapped(ip: std::net::Ipv4Addr) -> [u8; 16] {
    ip.to_ipv6_mapped().octets()
}

/// The key of the client's entry (`E_up`): the client's segments as they arrive at `front`.
/// The egress program finds L's own segments under it too (their tuple reversed).
pub fn client_key(client: SocketAddrV4, front: SocketAddrV4) -> FlowKey {
    FlowKey {
        saddr: mapped(*client.ip()),
        daddr: mapped(*front.ip()),
        sport: client.port().to_be(),
        dport: front.port().to_be(),
        family: FAMILY_V4,
        _pad: [0; 3],
    }
}

/// The key of the backend's entry (`E_down`): the backend's segments as they arrive at
/// `back`, L''s address. The egress program finds L''s own segments under it too.
pub fn backend_key(backend: SocketAddrV6, back: SocketAddrV6) -> FlowKey {
    FlowKey {
        saddr: backend.ip().octets(),
        daddr: back.ip().octets(),
        sport: backend.port().to_be(),
        dport: back.port().to_be(),
        family: FAMILY_V6,
        _pad: [0; 3],
    }
}

impl Handoff {
    /// Why this connection cannot be handed to the translation as it stands, as a reason of
    /// the design's section 9, or `None`.
    pub fn unsupported(&self) -> Option<&'static str> {
        match (self.client_timestamps, self.backend_timestamps) {
            (true, false) => Some("ts_client_only"),
            _ => None,
        }
    }

    /// The key and entry for the client's segments (`E_up`) and for the backend's (`E_down`),
    /// both in state `state`.
    ///
    /// Byte `k` of the client's stream (sequence `Ic + 1 + k`) is byte `P + k` of what L'
    /// sends (`Jp + 1 + P + k`); byte `k` of the backend's (`Jb + 1 + k`) is byte `k` of what
    /// L sends (`Ip + 1 + k`). The offsets are constant for the life of the connection, so
    /// they follow from where each stream stood at the handoff: the next byte read from a
    /// socket and the next byte written to the other are the same byte.
    pub fn entries(&self, state: u8) -> [(FlowKey, Flow); 2] {
        let (ip, ic) = (self.client_isns.local_isn, self.client_isns.peer_isn);
        let (jp, jb) = (self.backend_isns.local_isn, self.backend_isns.peer_isn);
        // ECN on one side only: clear it both ways (towards the side without it is what
        // matters; the other way carries no ECN marks anyway).
        let flags = if self.client_ecn == self.backend_ecn {
            0
        } else {
            FLOW_ECN_CLEAR
        };
        // Timestamps on both connections are translated; on the backend's connection only,
        // Y's option becomes NOPs towards X.
        let ts = match (self.client_timestamps, self.backend_timestamps) {
            (true, true) => FLOW_TS_TRANSLATE,
            _ => 0,
        };
        let down_ts = if self.backend_timestamps && !self.client_timestamps {
            FLOW_TS_STRIP
        } else {
            0
        };
        // SACK towards a side that did not negotiate it becomes NOPs.
        let up_sack = if self.client_sack && !self.backend_sack {
            FLOW_SACK_STRIP
        } else {
            0
        };
        let down_sack = if self.backend_sack && !self.client_sack {
            FLOW_SACK_STRIP
        } else {
            0
        };
        // Next sequence number of each stream at the handoff, on each side.
        let client_next = stream_seq(ic, self.read_from_client);
        let to_backend_next = stream_seq(jp, self.written_to_backend);
        let backend_next = stream_seq(jb, self.read_from_backend);
        let to_client_next = stream_seq(ip, self.written_to_client);
        let delta_up = to_backend_next.wrapping_sub(client_next);
        let delta_down = to_client_next.wrapping_sub(backend_next);
        let up_key = client_key(self.client, self.front);
        let up = Flow {
            state,
            dir: FLOW_UP,
            flags: flags | ts | up_sack,
            out_ifindex: self.backend_ifindex,
            new_saddr: self.back.ip().octets(),
            new_daddr: self.backend.ip().octets(),
            new_sport: self.back.port().to_be(),
            new_dport: self.backend.port().to_be(),
            flow_label: self.flow_label,
            seq_delta: delta_up,
            ack_delta: delta_down,
            seq_floor: client_next,
            local_rcv_next: client_next,
            ack_floor: to_client_next,
            high_end: client_next,
            peer_acked: ip.wrapping_add(1),
            last_ack_out: jb.wrapping_add(1),
            ws_in: self.client_wscale.snd,
            ws_out: self.backend_wscale.rcv,
            stream_start: ic.wrapping_add(1),
            out_tsoffset: self.backend_clock.offset,
            // The translation towards Y never goes below what L' may already have sent.
            last_tsval_out: if ts == FLOW_TS_TRANSLATE {
                self.backend_clock.now
            } else {
                0
            },
            local_cookie: self.client_cookie,
            started_ns: self.started_ns,
            ..Flow::default()
        };
        let down_key = backend_key(self.backend, self.back);
        let down = Flow {
            state,
            dir: FLOW_DOWN,
            flags: flags | ts | down_ts | down_sack,
            out_ifindex: self.client_ifindex,
            new_saddr: mapped(*self.front.ip()),
            new_daddr: mapped(*self.client.ip()),
            new_sport: self.front.port().to_be(),
            new_dport: self.client.port().to_be(),
            seq_delta: delta_down,
            ack_delta: delta_up,
            seq_floor: backend_next,
            local_rcv_next: backend_next,
            ack_floor: to_backend_next,
            high_end: backend_next,
            peer_acked: jp.wrapping_add(1),
            last_ack_out: ic.wrapping_add(1),
            ws_in: self.backend_wscale.snd,
            ws_out: self.client_wscale.rcv,
            stream_start: jb.wrapping_add(1),
            out_tsoffset: self.client_clock.offset,
            last_tsval_out: if ts == FLOW_TS_TRANSLATE {
                self.client_clock.now
            } else {
                0
            },
            local_cookie: self.backend_cookie,
            started_ns: self.started_ns,
            ..Flow::default()
        };
        [(up_key, up), (down_key, down)]
    }
}

/// An entry as the programs will see it once `spliced_packet_in` has adopted `control`
/// (it does so on the entry's next segment in `DRAIN`).
fn overlay(mut flow: Flow, control: &FlowControl) -> Flow {
    if (control.ack_floor.wrapping_sub(flow.ack_floor) as i32) > 0 {
        flow.ack_floor = control.ack_floor;
    }
    if control.fin_seen != 0 && flow.fin_seen == 0 {
        flow.fin_seq = control.fin_seq;
        flow.fin_seen = 1;
    }
    if control.local_fin != 0 {
        flow.flags |= FLOW_LOCAL_FIN;
    }
    if control.active != 0 && flow.state == FLOW_DRAIN {
        flow.state = FLOW_ACTIVE;
    }
    flow
}

/// The clamp map and the count the egress program reads first ([`MAP_PACKET_CLAMPING`]).
struct Clamps {
    map: HashMap<MapData, FlowKey, WindowClamp>,
    count: Array<MapData, u32>,
    /// Entries in `map`, as this process made them.
    live: u32,
}

impl Clamps {
    /// Writes `live` where the program reads it. A failure leaves the old count: too high
    /// costs a lookup per segment, too low (only after a failed removal) skips a clamp.
    fn publish(&mut self) {
        if let Err(e) = self.count.set(0, &self.live, 0) {
            tracing::warn!("packet engine: writing the clamp count: {e}");
        }
    }
}

/// `spliced_packet_in` and `spliced_packet_out` with their translation table. Dropping it
/// detaches the programs from every interface (tcx links) and frees the maps (unless they
/// were pinned: then the pins keep the maps; the caller removes them).
pub struct PacketTables {
    ebpf: Ebpf,
    /// Behind a lock (each map call takes it briefly), so one `PacketTables` can be shared
    /// (`Arc`) by handoffs on several blocking threads and the sweeper.
    flows: Mutex<HashMap<MapData, FlowKey, Flow>>,
    /// What spliced changes in an entry after inserting it ([`FlowControl`]): the entries
    /// themselves are only ever written by the programs once inserted. Taken after `flows`
    /// when both are held.
    control: Mutex<HashMap<MapData, FlowKey, FlowControl>>,
    counters: PerCpuArray<MapData, u64>,
    /// The window clamps of connections being offered ([`WindowClamp`]), and the count the
    /// egress program reads before it looks one up, kept together under this lock.
    clamps: Mutex<Clamps>,
    /// The program's ICMP reports ([`proxy_common::IcmpEvent`]), until their reader takes it
    /// ([`PacketTables::take_icmp`]).
    icmp: Mutex<Option<RingBuf<MapData>>>,
    /// Client entries (`E_up`, with their control values laid over) that a later handoff's
    /// insert overwrote under the same key, by their `local_cookie`: the client reused the
    /// port of a connection that ended (design 2.1) and the new connection was handed off
    /// before the sweeper removed the old one. [`PacketTables::entries`] gives the old
    /// connection this entry, as it was when the program stopped touching it, and
    /// [`PacketTables::remove`] forgets it. Taken after `flows` and `control`.
    displaced: Mutex<std::collections::HashMap<u64, Flow>>,
    /// Interfaces (of the namespace [`PacketTables::attach`] ran in) that have both programs.
    attached: Vec<u32>,
}

impl PacketTables {
    /// Loads the object and both programs; nothing is attached and nothing pinned.
    pub fn load() -> Result<Self> {
        Self::load_pinned(None)
    }

    /// [`PacketTables::load_sized`] with the table at its largest,
    /// [`PACKET_MAX_CONNECTIONS`] connections.
    pub fn load_pinned(pin_dir: Option<&Path>) -> Result<Self> {
        Self::load_sized(pin_dir, PACKET_MAX_CONNECTIONS)
    }

    /// Loads the object and both programs, and pins the table, its control values and the
    /// counters in `pin_dir` (a bpffs directory that must exist) as `SPLICED_PACKET_FLOWS`,
    /// `SPLICED_PACKET_CONTROL` and `SPLICED_PACKET_COUNTERS`, so `bpftool map dump pinned`
    /// shows entries by field name, and the ICMP reports' ring buffer as `SPLICED_PACKET_ICMP`.
    ///
    /// The table and its control values hold `max_connections` connections (two entries
    /// each; `packet.max_connections`, 1 to [`PACKET_MAX_CONNECTIONS`]): the object's size is
    /// the largest, and the maps are created at this size instead, so a full table refuses
    /// the next handoff (`E2BIG` on the insert, `table_full`) and its hash buckets take
    /// memory for this many only. The other maps keep the object's sizes: the ISN recorder
    /// holds the sockets that became established and wait for a handoff (a refused or
    /// not yet offered connection keeps its entry), which has nothing to do with how many
    /// the table holds.
    ///
    /// The maps are always created anew, never reopened from a pin, and then pinned (a pin
    /// already there fails the load: `Packet::start` removes stale ones first), so the pins,
    /// and those an upgrade moves from its staging directory, are the maps of this size.
    pub fn load_sized(pin_dir: Option<&Path>, max_connections: u32) -> Result<Self> {
        anyhow::ensure!(
            !OBJECT.is_empty(),
            "this binary was built without its eBPF object"
        );
        anyhow::ensure!(
            (1..=PACKET_MAX_CONNECTIONS).contains(&max_connections),
            "the packet engine's table holds 1 to {PACKET_MAX_CONNECTIONS} connections, not \
             {max_connections}"
        );
        let entries = 2 * max_connections;
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(MAP_PACKET_FLOWS, entries)
            .map_max_entries(MAP_PACKET_CONTROL, entries)
            .load(OBJECT)
            .context("loading the eBPF object into the kernel")?;
        let mut take = |name: &str| -> Result<aya::maps::Map> {
            let map = ebpf
                .take_map(name)
                .with_context(|| format!("map {name} missing from the object"))?;
            if let Some(dir) = pin_dir {
                let path = dir.join(name);
                map.pin(&path)
                    .with_context(|| format!("pinning {}", path.display()))?;
            }
            Ok(map)
        };
        let flows = take(MAP_PACKET_FLOWS)?.try_into()?;
        let control = take(MAP_PACKET_CONTROL)?.try_into()?;
        let counters = take(MAP_PACKET_COUNTERS)?.try_into()?;
        let icmp = take(MAP_PACKET_ICMP)?.try_into()?;
        let clamps = Clamps {
            map: take(MAP_PACKET_CLAMP)?.try_into()?,
            count: ebpf
                .take_map(MAP_PACKET_CLAMPING)
                .with_context(|| format!("map {MAP_PACKET_CLAMPING} missing from the object"))?
                .try_into()?,
            live: 0,
        };
        for name in [PROG_PACKET_IN, PROG_PACKET_OUT] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from the object"))?
                .try_into()?;
            prog.load()
                .with_context(|| format!("the verifier rejected {name}"))?;
        }
        Ok(PacketTables {
            ebpf,
            flows: Mutex::new(flows),
            control: Mutex::new(control),
            counters,
            clamps: Mutex::new(clamps),
            icmp: Mutex::new(Some(icmp)),
            displaced: Mutex::new(std::collections::HashMap::new()),
            attached: Vec::new(),
        })
    }

    /// Attaches the translation program to the ingress of `interface` and the guard of the
    /// local sockets to its egress, `interface` being a name in the calling thread's network
    /// namespace (tcx, so no qdisc is added and nothing stays behind when this is dropped).
    /// [`PacketTables::handoff`] refuses connections whose peers are reached by other
    /// interfaces.
    pub fn attach(&mut self, interface: &str) -> Result<()> {
        let name = std::ffi::CString::new(interface)
            .with_context(|| format!("interface name {interface:?}"))?;
        // SAFETY: a valid C string.
        let index = unsafe { nix::libc::if_nametoindex(name.as_ptr()) };
        anyhow::ensure!(index != 0, "no interface {interface}");
        for (prog_name, hook) in [
            (PROG_PACKET_IN, TcAttachType::Ingress),
            (PROG_PACKET_OUT, TcAttachType::Egress),
        ] {
            let prog: &mut SchedClassifier = self
                .ebpf
                .program_mut(prog_name)
                .with_context(|| format!("program {prog_name} missing from the object"))?
                .try_into()?;
            prog.attach(name.as_c_str(), hook)
                .with_context(|| format!("attaching {prog_name} to the {hook:?} of {interface}"))?;
        }
        self.attached.push(index);
        Ok(())
    }

    /// The ring buffer of the program's ICMP reports, once (its reader owns it).
    pub fn take_icmp(&self) -> Option<RingBuf<MapData>> {
        lock(&self.icmp).take()
    }

    /// The interfaces (indexes) both programs are attached to.
    pub fn interfaces(&self) -> &[u32] {
        &self.attached
    }

    /// Installs both entries of a connection, the backend's first (a translated client segment
    /// may provoke the backend's answer at once). If the second insert fails the first is
    /// removed again.
    ///
    /// A client entry already under the key that belongs to another connection (the client
    /// reused its port once that connection ended, design 2.1, and the program marked the
    /// entry `superseded`) is overwritten; it is kept aside first, with its control value,
    /// for the sweeper to end that connection with its own counts ([`PacketTables::entries`]).
    pub fn insert(&self, handoff: &Handoff, state: u8) -> Result<()> {
        let [(up_key, up), (down_key, down)] = handoff.entries(state);
        let mut flows = lock(&self.flows);
        let mut control = lock(&self.control);
        if let Ok(old) = flows.get(&up_key, 0)
            && old.local_cookie != up.local_cookie
        {
            let old = match control.get(&up_key, 0) {
                Ok(c) => overlay(old, &c),
                Err(_) => old,
            };
            if old.superseded == 0 {
                tracing::warn!(
                    cookie = old.local_cookie,
                    "packet engine: a handoff overwrites the live client entry of another \
                     connection"
                );
            }
            tracing::debug!(
                cookie = old.local_cookie,
                "packet engine: the client entry of a connection the client superseded, \
                 kept aside for the sweeper"
            );
            lock(&self.displaced).insert(old.local_cookie, old);
        }
        // The control values first: the programs treat a missing one as "nothing changed".
        for (key, flow) in [(&down_key, &down), (&up_key, &up)] {
            let initial = FlowControl {
                active: u8::from(flow.state == FLOW_ACTIVE),
                ack_floor: flow.ack_floor,
                ..FlowControl::default()
            };
            if let Err(e) = control.insert(key, &initial, 0) {
                let _ = control.remove(&down_key);
                return Err(e).context("inserting a control value");
            }
        }
        let undo = |control: &mut HashMap<MapData, FlowKey, FlowControl>| {
            let _ = control.remove(&up_key);
            let _ = control.remove(&down_key);
        };
        if let Err(e) = flows.insert(&down_key, &down, 0) {
            undo(&mut control);
            return Err(e).context("inserting the backend's entry");
        }
        if let Err(e) = flows.insert(&up_key, &up, 0) {
            let _ = flows.remove(&down_key);
            undo(&mut control);
            return Err(e).context("inserting the client's entry");
        }
        Ok(())
    }

    /// Removes both entries of a connection (client's first, so no new backend answer is
    /// provoked that would find no entry). The client's entry and its control value are
    /// removed only while they are still this connection's (its `local_cookie`, checked under
    /// the lock [`PacketTables::insert`] takes): after the client reused the port, a new
    /// connection's handoff may have put its own under the same key (design 2.1).
    pub fn remove(&self, handoff: &Handoff) -> Result<()> {
        let [(up_key, _), (down_key, _)] = handoff.entries(0);
        {
            let flows = lock(&self.flows);
            let ours = match flows.get(&up_key, 0) {
                Ok(flow) => flow.local_cookie == handoff.client_cookie,
                Err(MapError::KeyNotFound) => true,
                Err(e) => return Err(e).context("reading a packet engine entry"),
            };
            // The lock is held through the removal: an insert cannot come in between.
            let keys: &[FlowKey] = if ours {
                &[up_key, down_key]
            } else {
                &[down_key]
            };
            self.remove_keys_locked(flows, keys)?;
        }
        lock(&self.displaced).remove(&handoff.client_cookie);
        Ok(())
    }

    /// Clamps the windows the local sockets under these keys announce (design 3.6 item 12),
    /// replacing any clamp they had. Returns the keys that now have one: none when the map is
    /// full (the connection is then offered without the clamp).
    pub fn clamp_windows(&self, clamps: &[(FlowKey, WindowClamp)]) -> Result<Vec<FlowKey>> {
        let mut c = lock(&self.clamps);
        let mut done = Vec::with_capacity(clamps.len());
        for (key, clamp) in clamps {
            let new = c.map.get(key, 0).is_err();
            match c.map.insert(key, clamp, 0) {
                Ok(()) => {
                    if new {
                        c.live += 1;
                    }
                    done.push(*key);
                }
                Err(MapError::SyscallError(e))
                    if matches!(
                        e.io_error.raw_os_error(),
                        Some(nix::libc::E2BIG | nix::libc::ENOMEM)
                    ) =>
                {
                    break;
                }
                Err(e) => {
                    c.publish();
                    return Err(e).context("clamping a local socket's window");
                }
            }
        }
        c.publish();
        Ok(done)
    }

    /// Anchors the clamp under `key`, if it has one, at the right edge `edge` (a sequence
    /// number in the local socket's receive space); the clamp's scale stays.
    pub fn anchor_window(&self, key: &FlowKey, edge: u32) -> Result<()> {
        let mut c = lock(&self.clamps);
        let clamp = match c.map.get(key, 0) {
            Ok(clamp) => clamp,
            Err(MapError::KeyNotFound) => return Ok(()),
            Err(e) => return Err(e).context("reading a window clamp"),
        };
        let anchored = WindowClamp {
            edge,
            anchored: 1,
            ..clamp
        };
        c.map
            .insert(key, &anchored, 0)
            .context("anchoring a window clamp")
    }

    /// Removes the clamps under these keys; a missing one is not an error.
    pub fn unclamp_windows(&self, keys: &[FlowKey]) -> Result<()> {
        let mut c = lock(&self.clamps);
        let mut result = Ok(());
        for key in keys {
            match c.map.remove(key) {
                Ok(()) => c.live = c.live.saturating_sub(1),
                Err(MapError::KeyNotFound) => {}
                Err(e) => result = Err(e).context("removing a window clamp"),
            }
        }
        c.publish();
        result
    }

    /// Removes the entries with these keys, in this order; a missing one is not an error.
    pub fn remove_keys(&self, keys: &[FlowKey]) -> Result<()> {
        self.remove_keys_locked(lock(&self.flows), keys)
    }

    /// [`PacketTables::remove_keys`] with the table's lock already held.
    fn remove_keys_locked(
        &self,
        mut flows: std::sync::MutexGuard<'_, HashMap<MapData, FlowKey, Flow>>,
        keys: &[FlowKey],
    ) -> Result<()> {
        let mut control = lock(&self.control);
        for key in keys {
            match flows.remove(key) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(e).context("removing a packet engine entry"),
            }
            match control.remove(key) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(e).context("removing a control value"),
            }
        }
        Ok(())
    }

    /// The entry with this key, as the program left it, with what spliced changed since
    /// the insert ([`FlowControl`]) that the program has not taken over yet.
    pub fn get(&self, key: &FlowKey) -> Result<Option<Flow>> {
        let flows = lock(&self.flows);
        let flow = match flows.get(key, 0) {
            Ok(flow) => flow,
            Err(MapError::KeyNotFound) => return Ok(None),
            Err(e) => return Err(e).context("reading a packet engine entry"),
        };
        Ok(Some(self.with_control(key, flow)?))
    }

    /// `flow` with its control value laid over it.
    fn with_control(&self, key: &FlowKey, flow: Flow) -> Result<Flow> {
        match lock(&self.control).get(key, 0) {
            Ok(control) => Ok(overlay(flow, &control)),
            Err(MapError::KeyNotFound) => Ok(flow),
            Err(e) => Err(e).context("reading a control value"),
        }
    }

    /// Every entry of the table (both of each connection; the other entry of one is
    /// [`peer_key`] of it). Entries inserted or removed meanwhile may be missed.
    pub fn all(&self) -> Result<Vec<(FlowKey, Flow)>> {
        let mut all = Vec::new();
        let flows = lock(&self.flows);
        for item in flows.iter() {
            match item {
                Ok((key, flow)) => all.push((key, self.with_control(&key, flow)?)),
                // Removed between the key walk and the read.
                Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(e).context("walking the packet engine table"),
            }
        }
        Ok(all)
    }

    /// Changes the control value of the entry `key` with `change` ([`FlowControl`]: only
    /// spliced writes it, under the lock, so nothing is lost by writing it whole). Returns
    /// whether the entry still exists.
    fn update(&self, key: &FlowKey, change: impl FnOnce(&mut FlowControl)) -> Result<bool> {
        let mut control = lock(&self.control);
        let mut value = match control.get(key, 0) {
            Ok(value) => value,
            Err(MapError::KeyNotFound) => return Ok(false),
            Err(e) => return Err(e).context("reading a control value"),
        };
        change(&mut value);
        // BPF_EXIST: never recreate a value removed meanwhile.
        const BPF_EXIST: u64 = 2;
        match control.insert(key, &value, BPF_EXIST) {
            Ok(()) => Ok(true),
            Err(MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(nix::libc::ENOENT) =>
            {
                Ok(false)
            }
            Err(e) => Err(e).context("updating a control value"),
        }
    }

    /// Moves the entries with these keys to `state` ([`proxy_common::FLOW_ACTIVE`] after the
    /// drain); an entry the program set `RESET` stays so. Returns how many were changed.
    pub fn set_state(&self, keys: &[FlowKey], state: u8) -> Result<usize> {
        let mut changed = 0;
        for key in keys {
            if !self.update(key, |c| c.active = u8::from(state == FLOW_ACTIVE))? {
                continue;
            }
            if self.get(key)?.is_some_and(|f| f.state != FLOW_RESET) {
                changed += 1;
            }
        }
        Ok(changed)
    }

    /// Lets the FIN spliced is about to send on the local socket of the entry `key` pass the
    /// egress guard ([`proxy_common::FLOW_LOCAL_FIN`]; design 3.3).
    pub fn set_local_fin(&self, key: &FlowKey) -> Result<()> {
        self.update(key, |c| c.local_fin = 1)?;
        Ok(())
    }

    /// Raises the entry's `ack_floor` to `floor` (never lowers it): rule F gave the local
    /// socket the sender's ACKs are for more bytes to send, and until the sender acknowledges
    /// them its pure ACKs are the local socket's business (they pass in `DRAIN`; the socket
    /// sees no ACK otherwise and, with its congestion window, sends a handful of segments per
    /// timeout). Everything below the floor was delivered by the local socket, so translated
    /// ACKs may be raised to it.
    pub fn raise_ack_floor(&self, key: &FlowKey, floor: u32) -> Result<()> {
        self.update(key, |c| {
            if (floor.wrapping_sub(c.ack_floor) as i32) > 0 {
                c.ack_floor = floor;
            }
        })?;
        Ok(())
    }

    /// Records a FIN of the entry's sender that the program never saw (it reached the local
    /// socket before the entry existed; design 3.4 step 4), at sequence `fin_seq`.
    pub fn set_fin(&self, key: &FlowKey, fin_seq: u32) -> Result<()> {
        self.update(key, |c| {
            if c.fin_seen == 0 {
                c.fin_seq = fin_seq;
                c.fin_seen = 1;
            }
        })?;
        Ok(())
    }

    /// The current entries of a connection (client's, backend's), as the program left them.
    /// The client's is this connection's only (its `local_cookie`): once a new connection
    /// from the same client port was handed off, it is the one [`PacketTables::insert`] kept
    /// aside, and `None` if there is none.
    pub fn entries(&self, handoff: &Handoff) -> Result<[Option<Flow>; 2]> {
        let [(up_key, _), (down_key, _)] = handoff.entries(0);
        let up = match self.get(&up_key)? {
            Some(flow) if flow.local_cookie == handoff.client_cookie => Some(flow),
            _ => lock(&self.displaced).get(&handoff.client_cookie).copied(),
        };
        Ok([up, self.get(&down_key)?])
    }

    /// The programs' counters summed over CPUs, by name.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        PacketCounter::ALL
            .iter()
            .map(|&c| (c.name(), super::sum_per_cpu(&self.counters, c as u32)))
            .collect()
    }
}

/// A map behind its lock; a thread that panicked while holding it left the map itself
/// consistent (every call is one syscall), so the poison is ignored.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The sequence number of byte `bytes` (counted from 0, modulo 2^32) of the stream a
/// connection's side opened with the initial sequence number `isn`: where that stream stands
/// once `bytes` were sent, or read.
pub const fn stream_seq(isn: u32, bytes: u32) -> u32 {
    isn.wrapping_add(1).wrapping_add(bytes)
}

/// The key of the entry that translates the other direction of `flow`'s connection: `flow`'s
/// translated tuple, reversed.
pub fn peer_key(flow: &Flow) -> FlowKey {
    FlowKey {
        saddr: flow.new_daddr,
        daddr: flow.new_saddr,
        sport: flow.new_dport,
        dport: flow.new_sport,
        family: if flow.dir == FLOW_UP {
            FAMILY_V6
        } else {
            FAMILY_V4
        },
        _pad: [0; 3],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handoff() -> Handoff {
        Handoff {
            client: "192.0.2.2:40000".parse().expect("address"),
            front: "192.0.2.1:443".parse().expect("address"),
            back: "[2001:db8:1::1]:50000".parse().expect("address"),
            backend: "[2001:db8:1::10]:443".parse().expect("address"),
            // Near the wrap, so the offsets' arithmetic must wrap too.
            client_isns: IsnPair {
                local_isn: 0xffff_fff0,
                peer_isn: 1000,
            },
            backend_isns: IsnPair {
                local_isn: 5000,
                peer_isn: 0xffff_ff00,
            },
            // A 28-byte PROXY header and a 517-byte hello.
            read_from_client: 517,
            written_to_backend: 28 + 517,
            read_from_backend: 0,
            written_to_client: 0,
            client_wscale: Wscale { snd: 7, rcv: 9 },
            backend_wscale: Wscale { snd: 8, rcv: 6 },
            client_ifindex: 2,
            backend_ifindex: 3,
            flow_label: 0x12345,
            client_ecn: true,
            backend_ecn: false,
            client_timestamps: false,
            backend_timestamps: true,
            client_sack: true,
            backend_sack: false,
            client_clock: SocketClock {
                offset: 111,
                now: 1111,
            },
            backend_clock: SocketClock {
                offset: 222,
                now: 2222,
            },
            client_cookie: 7,
            backend_cookie: 8,
            started_ns: 99,
        }
    }

    #[test]
    fn a_byte_lands_where_spliced_would_have_put_it() {
        let h = handoff();
        let [(up_key, up), (down_key, down)] = h.entries(FLOW_ACTIVE);
        // Client byte k = 517 (the first after the hello) is byte P + 517 of what L' sent.
        let client_seq = 1000u32 + 1 + 517;
        assert_eq!(client_seq.wrapping_add(up.seq_delta), 5000 + 1 + 28 + 517);
        assert_eq!(up.seq_floor, client_seq);
        // Backend byte 0 is byte 0 of what L sends to the client.
        let backend_seq = 0xffff_ff00u32.wrapping_add(1);
        assert_eq!(
            backend_seq.wrapping_add(down.seq_delta),
            0xffff_fff0u32.wrapping_add(1)
        );
        // An ACK from the client for L's first byte is an ACK for Y's first byte, and an ACK
        // from Y for the whole preface is an ACK for the hello.
        assert_eq!(
            0xffff_fff0u32.wrapping_add(1).wrapping_sub(up.ack_delta),
            backend_seq
        );
        assert_eq!(
            down.ack_floor.wrapping_sub(down.ack_delta),
            client_seq,
            "Y acknowledging the preface and the hello acknowledges the hello to X"
        );
        assert_eq!((up.ws_in, up.ws_out, down.ws_in, down.ws_out), (7, 6, 8, 9));
        assert_eq!(up_key.sport, 40000u16.to_be());
        assert_eq!(up.new_daddr, h.backend.ip().octets());
        assert_eq!(down_key.dport, 50000u16.to_be());
        assert_eq!(&down.new_daddr[10..], &[0xff, 0xff, 192, 0, 2, 2]);
        assert_eq!((up.out_ifindex, down.out_ifindex), (3, 2));
        assert_eq!(
            (up.flags, down.flags),
            (
                FLOW_ECN_CLEAR | FLOW_SACK_STRIP,
                FLOW_ECN_CLEAR | FLOW_TS_STRIP
            )
        );
        // Each entry continues the clock of the local socket on its output side, and names
        // the local socket its sender talks to.
        assert_eq!((up.out_tsoffset, down.out_tsoffset), (222, 111));
        assert_eq!((up.local_cookie, down.local_cookie), (7, 8));
        assert_eq!(h.unsupported(), None);
        let client_only = Handoff {
            client_timestamps: true,
            backend_timestamps: false,
            ..h
        };
        assert_eq!(client_only.unsupported(), Some("ts_client_only"));
        let same = Handoff {
            backend_ecn: true,
            backend_timestamps: false,
            backend_sack: true,
            ..h
        };
        let [(_, up), (_, down)] = same.entries(FLOW_ACTIVE);
        assert_eq!((up.flags, down.flags), (0, 0));
        let both_ts = Handoff {
            client_timestamps: true,
            backend_timestamps: true,
            ..same
        };
        assert_eq!(both_ts.unsupported(), None);
        let [(_, up), (_, down)] = both_ts.entries(FLOW_ACTIVE);
        assert_eq!(
            (up.flags, down.flags),
            (FLOW_TS_TRANSLATE, FLOW_TS_TRANSLATE)
        );
        // The translation starts at the clock of the local socket its receiver talked to:
        // nothing that socket sent is later.
        assert_eq!((up.last_tsval_out, down.last_tsval_out), (2222, 1111));
    }
}
