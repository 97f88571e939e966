//! The edge filter's side of the object: filling its maps from `[xdp]`, attaching
//! `spliced_xdp` to interfaces, and reading its counters (see `proxy-ebpf/src/xdp.rs`).
use anyhow::{Context as _, Result};
use aya::{
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, lpm_trie::Key},
    programs::{
        Xdp,
        xdp::{XdpLinkId, XdpMode as AttachMode},
    },
};
use proxy_common::{PROG_XDP, SynBucket, SynLimit, XdpCounter};

use super::{Kernel, lock, sum_per_cpu};
use crate::config::{Cidr, Xdp as XdpConfig, XdpMode};

/// An interface the edge filter is attached to, and in which mode ("native" or "generic").
pub type Attachment = (String, &'static str);

/// The edge filter's maps.
pub(super) struct XdpMaps {
    pub(super) deny4: LpmTrie<MapData, [u8; 4], u8>,
    pub(super) deny6: LpmTrie<MapData, [u8; 16], u8>,
    pub(super) ports: HashMap<MapData, u16, u8>,
    pub(super) limit: Array<MapData, SynLimit>,
    pub(super) counters: PerCpuArray<MapData, u64>,
    /// Held only so that it is pinned (users read the buckets with bpftool).
    pub(super) _buckets: HashMap<MapData, [u8; 16], SynBucket>,
    /// Interfaces the program is attached to, and how.
    pub(super) attached: Vec<Attachment>,
    /// The attachments' links, to detach them on an upgrade.
    pub(super) links: Vec<XdpLinkId>,
}

impl Kernel {
    /// Fills the edge filter's maps from `cfg` and attaches the XDP program to its interfaces.
    /// A failed attach is an error naming the interface, except that `mode = "auto"` falls back
    /// from native to generic mode (logged).
    pub fn attach_xdp(&self, cfg: &XdpConfig) -> Result<()> {
        self.update_xdp(cfg)?;
        let mut ebpf = lock(&self.ebpf);
        let prog: &mut Xdp = ebpf
            .program_mut(PROG_XDP)
            .with_context(|| format!("program {PROG_XDP} missing from the object"))?
            .try_into()?;
        prog.load()
            .context("the verifier rejected the XDP program")?;
        let mut attached = Vec::new();
        let mut links = Vec::new();
        for name in &cfg.interfaces {
            let c_name = std::ffi::CString::new(name.as_str())
                .with_context(|| format!("interface name {name:?}"))?;
            let c_name = c_name.as_c_str();
            let how = match cfg.mode {
                XdpMode::Native => {
                    links.push(prog.attach(c_name, AttachMode::Driver).with_context(|| {
                        format!("attaching XDP to interface {name} in native mode")
                    })?);
                    "native"
                }
                XdpMode::Generic => {
                    links.push(prog.attach(c_name, AttachMode::Skb).with_context(|| {
                        format!("attaching XDP to interface {name} in generic mode")
                    })?);
                    "generic"
                }
                XdpMode::Auto => match prog.attach(c_name, AttachMode::Driver) {
                    Ok(link) => {
                        links.push(link);
                        "native"
                    }
                    Err(native) => {
                        links.push(prog.attach(c_name, AttachMode::Skb).with_context(|| {
                            format!(
                                "attaching XDP to interface {name} (native mode failed too: \
                                 {native})"
                            )
                        })?);
                        tracing::warn!(
                            interface = %name,
                            "native XDP is not available ({native}); using generic mode"
                        );
                        "generic"
                    }
                },
            };
            tracing::info!(interface = %name, mode = how, "XDP edge filter attached");
            attached.push((name.clone(), how));
        }
        let mut x = lock(&self.xdp);
        x.attached = attached;
        x.links = links;
        Ok(())
    }

    /// Detaches the edge filter from every interface (on an upgrade, so that the new process
    /// can attach its own: an interface takes one XDP link).
    pub fn detach_xdp(&self) {
        let links = std::mem::take(&mut lock(&self.xdp).links);
        if links.is_empty() {
            return;
        }
        let mut ebpf = lock(&self.ebpf);
        let Some(prog) = ebpf
            .program_mut(PROG_XDP)
            .and_then(|p| <&mut Xdp>::try_from(p).ok())
        else {
            return;
        };
        for link in links {
            if let Err(e) = prog.detach(link) {
                tracing::warn!("detaching the XDP edge filter: {e}");
            }
        }
        lock(&self.xdp).attached.clear();
        tracing::info!("XDP edge filter detached for the new process");
    }

    /// Makes the edge filter's deny lists, guarded ports and SYN limit match `cfg`, without
    /// detaching anything (entries added by hand with bpftool are replaced by the config's).
    pub fn update_xdp(&self, cfg: &XdpConfig) -> Result<()> {
        let x = &mut *lock(&self.xdp);
        let mut want4 = Vec::new();
        let mut want6 = Vec::new();
        for Cidr { addr, prefix } in &cfg.deny {
            match addr {
                std::net::IpAddr::V4(a) => want4.push(Key::new(u32::from(*prefix), a.octets())),
                std::net::IpAddr::V6(a) => want6.push(Key::new(u32::from(*prefix), a.octets())),
            }
        }
        sync_trie(&mut x.deny4, &want4).context("updating the IPv4 deny list")?;
        sync_trie(&mut x.deny6, &want6).context("updating the IPv6 deny list")?;
        let stale: Vec<u16> = x
            .ports
            .keys()
            .filter_map(Result::ok)
            .filter(|p| !cfg.ports.contains(p))
            .collect();
        for p in stale {
            x.ports.remove(&p)?;
        }
        for p in &cfg.ports {
            x.ports.insert(p, &1, 0)?;
        }
        let limit = cfg.syn_limit.map_or(SynLimit::default(), |l| SynLimit {
            rate_per_second: u64::from(l.rate_per_second),
            burst: u64::from(l.burst),
        });
        x.limit.set(0, &limit, 0)?;
        Ok(())
    }

    /// The edge filter's counters summed over CPUs, by name, and the interfaces it is on.
    pub fn xdp_counters(&self) -> (Vec<(&'static str, u64)>, Vec<Attachment>) {
        let x = lock(&self.xdp);
        let counts = XdpCounter::ALL
            .iter()
            .map(|&c| (c.name(), sum_per_cpu(&x.counters, c as u32)))
            .collect();
        (counts, x.attached.clone())
    }
}

/// Makes an LPM trie hold exactly `want` (value 1 each).
fn sync_trie<K: aya::Pod + PartialEq>(
    trie: &mut LpmTrie<MapData, K, u8>,
    want: &[Key<K>],
) -> Result<()> {
    let stale: Vec<Key<K>> = trie
        .keys()
        .filter_map(Result::ok)
        .filter(|k| {
            !want
                .iter()
                .any(|w| w.prefix_len() == k.prefix_len() && w.data() == k.data())
        })
        .collect();
    for k in &stale {
        trie.remove(k)?;
    }
    for k in want {
        trie.insert(k, &1, 0)?;
    }
    Ok(())
}
