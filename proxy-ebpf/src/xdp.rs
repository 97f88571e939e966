//! `spliced_xdp`: the edge filter, run by the driver (or generically) before the kernel builds
//! a socket buffer.
//!
//! Only TCP to a guarded port is judged: a source on the deny list loses every such packet,
//! and a source over its SYN rate loses its SYNs. Everything else (ARP, neighbour discovery,
//! ICMP, other ports) passes untouched, and so does anything the parser cannot read up to the
//! TCP ports (truncated headers, non-first fragments, too many extension headers): the stack
//! judges those as it would without us.
use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key},
    helpers::bpf_ktime_get_ns,
    macros::{btf_map, xdp},
    programs::XdpContext,
};
use proxy_common::{
    SynBucket, SynLimit, XDP_MAX_DENY, XDP_MAX_SOURCES, XDP_TOKEN, XdpCounter, xdp_source,
};

const MAX_DENY: usize = XDP_MAX_DENY as usize;
const MAX_SOURCES: usize = XDP_MAX_SOURCES as usize;

/// IPv4 deny list (prefix, address in network order).
#[btf_map]
static SPLICED_XDP_DENY4: LpmTrie<[u8; 4], u8, MAX_DENY> = LpmTrie::new();

/// IPv6 deny list.
#[btf_map]
static SPLICED_XDP_DENY6: LpmTrie<[u8; 16], u8, MAX_DENY> = LpmTrie::new();

/// Guarded destination ports (host order).
#[btf_map]
static SPLICED_XDP_PORTS: HashMap<u16, u8, 1024> = HashMap::new();

/// The SYN limit in force (element 0).
#[btf_map]
static SPLICED_XDP_LIMIT: Array<SynLimit, 1> = Array::new();

/// Token buckets per source.
#[btf_map]
static SPLICED_XDP_BUCKETS: LruHashMap<[u8; 16], SynBucket, MAX_SOURCES> = LruHashMap::new();

/// Per-CPU counters.
#[btf_map]
static SPLICED_XDP_COUNTERS: PerCpuArray<u64, { XdpCounter::COUNT as usize }> = PerCpuArray::new();

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_TCP: u8 = 6;
/// Offsets past this are not followed (the verifier needs a bound, and real headers are short).
const MAX_L3_OFFSET: usize = 256;
/// IPv6 extension headers followed before giving up.
const MAX_EXT_HEADERS: usize = 6;

#[inline(always)]
fn count(counter: XdpCounter) -> u32 {
    if let Some(slot) = SPLICED_XDP_COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: a per-CPU slot is only touched by this CPU while the program runs.
        unsafe { *slot += 1 };
    }
    match counter {
        XdpCounter::DroppedDeny | XdpCounter::DroppedRate => xdp_action::XDP_DROP,
        _ => xdp_action::XDP_PASS,
    }
}

/// `N` bytes at `offset`, if the packet has them.
#[inline(always)]
fn bytes<const N: usize>(ctx: &XdpContext, offset: usize) -> Option<[u8; N]> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + N > end {
        return None;
    }
    // SAFETY: the range was checked against the packet's end just above.
    Some(unsafe { core::ptr::read_unaligned((start + offset) as *const [u8; N]) })
}

#[inline(always)]
fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

/// Where a packet's TCP header starts and who sent it.
struct Tcp {
    offset: usize,
    v4: Option<[u8; 4]>,
    v6: Option<[u8; 16]>,
}

#[xdp]
pub fn spliced_xdp(ctx: XdpContext) -> u32 {
    let Some(ether) = bytes::<2>(&ctx, 12) else {
        return count(XdpCounter::Unparsed);
    };
    let mut proto = be16(ether);
    let mut offset = ETH_HLEN;
    // Up to two VLAN tags (802.1ad outer, 802.1Q inner).
    for _ in 0..2 {
        if proto != ETH_P_8021Q && proto != ETH_P_8021AD {
            break;
        }
        let Some(tag) = bytes::<4>(&ctx, offset) else {
            return count(XdpCounter::Unparsed);
        };
        proto = be16([tag[2], tag[3]]);
        offset += 4;
    }
    let tcp = match proto {
        ETH_P_IP => ipv4(&ctx, offset),
        ETH_P_IPV6 => ipv6(&ctx, offset),
        _ => return count(XdpCounter::NotGuarded),
    };
    let tcp = match tcp {
        Parsed::Tcp(t) => t,
        Parsed::Other => return count(XdpCounter::NotGuarded),
        Parsed::Unreadable => return count(XdpCounter::Unparsed),
    };
    let Some(head) = bytes::<14>(&ctx, tcp.offset) else {
        return count(XdpCounter::Unparsed);
    };
    let port = be16([head[2], head[3]]);
    // SAFETY: copied out at once.
    if unsafe { SPLICED_XDP_PORTS.get(&port) }.is_none() {
        return count(XdpCounter::NotGuarded);
    }
    let denied = match (tcp.v4, tcp.v6) {
        (Some(a), _) => SPLICED_XDP_DENY4
            .get(&Key {
                prefix_len: 32,
                data: a,
            })
            .is_some(),
        (None, Some(a)) => SPLICED_XDP_DENY6
            .get(&Key {
                prefix_len: 128,
                data: a,
            })
            .is_some(),
        (None, None) => false,
    };
    if denied {
        return count(XdpCounter::DroppedDeny);
    }
    let flags = head[13];
    let syn_only = flags & 0x02 != 0 && flags & 0x10 == 0;
    if syn_only && !take_token(xdp_source(tcp.v4, tcp.v6)) {
        return count(XdpCounter::DroppedRate);
    }
    count(XdpCounter::Passed)
}

enum Parsed {
    Tcp(Tcp),
    /// Not TCP.
    Other,
    /// Too short, malformed, or a fragment without the TCP header.
    Unreadable,
}

#[inline(always)]
fn ipv4(ctx: &XdpContext, offset: usize) -> Parsed {
    let Some(h) = bytes::<20>(ctx, offset) else {
        return Parsed::Unreadable;
    };
    let ihl = usize::from(h[0] & 0x0f) * 4;
    if h[0] >> 4 != 4 || ihl < 20 {
        return Parsed::Unreadable;
    }
    if h[9] != IPPROTO_TCP {
        return Parsed::Other;
    }
    // A non-first fragment carries no TCP header.
    if be16([h[6], h[7]]) & 0x1fff != 0 {
        return Parsed::Unreadable;
    }
    Parsed::Tcp(Tcp {
        offset: offset + ihl,
        v4: Some([h[12], h[13], h[14], h[15]]),
        v6: None,
    })
}

#[inline(always)]
fn ipv6(ctx: &XdpContext, offset: usize) -> Parsed {
    let Some(h) = bytes::<40>(ctx, offset) else {
        return Parsed::Unreadable;
    };
    if h[0] >> 4 != 6 {
        return Parsed::Unreadable;
    }
    let source = [
        h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15], h[16], h[17], h[18], h[19], h[20],
        h[21], h[22], h[23],
    ];
    let mut next = h[6];
    let mut at = offset + 40;
    for _ in 0..MAX_EXT_HEADERS {
        if at > MAX_L3_OFFSET {
            return Parsed::Unreadable;
        }
        match next {
            IPPROTO_TCP => {
                return Parsed::Tcp(Tcp {
                    offset: at,
                    v4: None,
                    v6: Some(source),
                });
            }
            // Hop-by-hop, routing, destination options: length in 8-octet units after the first.
            0 | 43 | 60 => {
                let Some(e) = bytes::<2>(ctx, at) else {
                    return Parsed::Unreadable;
                };
                next = e[0];
                at += (usize::from(e[1]) + 1) * 8;
            }
            // Fragment: only the first fragment has the TCP header.
            44 => {
                let Some(e) = bytes::<8>(ctx, at) else {
                    return Parsed::Unreadable;
                };
                if be16([e[2], e[3]]) >> 3 != 0 {
                    return Parsed::Unreadable;
                }
                next = e[0];
                at += 8;
            }
            // Authentication header: length in 4-octet units minus 2.
            51 => {
                let Some(e) = bytes::<2>(ctx, at) else {
                    return Parsed::Unreadable;
                };
                next = e[0];
                at += (usize::from(e[1]) + 2) * 4;
            }
            _ => return Parsed::Other,
        }
    }
    Parsed::Unreadable
}

/// Takes one token from the source's bucket, refilling it for the time since its last SYN.
/// Buckets are updated without atomics (the bpf target has none): SYNs of one source handled
/// on two CPUs at the same instant may both see the same balance, which can let one extra
/// SYN through; that is the cost of not locking.
#[inline(always)]
fn take_token(source: [u8; 16]) -> bool {
    // SAFETY: copied out at once.
    let Some(limit) = SPLICED_XDP_LIMIT.get(0).copied() else {
        return true;
    };
    if limit.rate_per_second == 0 {
        return true;
    }
    // SAFETY: the helper has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // Both fit: user space stores a 32-bit burst, and 2^32 * 10^9 < 2^64.
    let full = limit.burst.wrapping_mul(XDP_TOKEN);
    let Some(bucket) = SPLICED_XDP_BUCKETS.get_ptr_mut(&source) else {
        // First SYN seen from this source: a full bucket, less this SYN.
        let fresh = SynBucket {
            tokens: full.saturating_sub(XDP_TOKEN),
            last_ns: now,
        };
        let _ = SPLICED_XDP_BUCKETS.insert(&source, &fresh, 0);
        return full >= XDP_TOKEN;
    };
    // SAFETY: the entry stays valid while this program runs.
    let b = unsafe { &mut *bucket };
    let elapsed = now.saturating_sub(b.last_ns);
    // elapsed * rate, without overflowing: beyond the time to fill the bucket it is full.
    let refill = if elapsed >= full / limit.rate_per_second {
        full
    } else {
        elapsed.wrapping_mul(limit.rate_per_second)
    };
    let tokens = b.tokens.saturating_add(refill).min(full);
    b.last_ns = now;
    if tokens >= XDP_TOKEN {
        b.tokens = tokens - XDP_TOKEN;
        true
    } else {
        b.tokens = tokens;
        false
    }
}
