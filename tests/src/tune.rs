//! Settings a test changes inside a [`World`]'s namespaces: sysctls, checksum offload, and
//! nftables rules on one interface's way in or out; and the counters that tell what they did.
use anyhow::{Context as _, Result, ensure};

use crate::{Ns, World};

/// `sysctl -w setting` (e.g. `net.ipv4.tcp_sack=0`) in `ns`.
pub fn sysctl(world: &World, ns: Ns, setting: &str) -> Result<()> {
    let out = world
        .command(ns, "sysctl")
        .args(["-q", "-w", setting])
        .output()
        .context("running sysctl")?;
    ensure!(
        out.status.success(),
        "sysctl {setting} in {ns:?}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// `ethtool -K dev tx off` in `ns`: the stack computes every checksum in software, and veth,
/// which never checks one, can then no longer hide a wrong one from the receiver.
pub fn tx_off(world: &World, ns: Ns, dev: &str) -> Result<()> {
    let out = world
        .command(ns, "ethtool")
        .args(["-K", dev, "tx", "off"])
        .output()
        .context("running ethtool")?;
    ensure!(
        out.status.success(),
        "ethtool -K {dev} tx off in {ns:?}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// The proxy's two veths (`eth0` to the client, `eth1` to the backend) with `tx off`.
pub fn proxy_tx_off(world: &World) -> Result<()> {
    for dev in ["eth0", "eth1"] {
        tx_off(world, Ns::Proxy, dev)?;
    }
    Ok(())
}

/// Adds, in a table `netdev <table>` of `ns`, one chain per device in `devices` on that
/// device's `hook` (`ingress` or `egress`), each with `rules` (nftables rules without the
/// chain, e.g. `meta l4proto tcp numgen random mod 100 == 0 counter drop`). A rule may name
/// `DEV`, which becomes the chain's device (for `dup to "DEV"` on egress).
///
/// Use it on the peers' ends of the proxy's links, not in the proxy's namespace: a segment a
/// TC program redirects with `bpf_redirect_neigh` passes no netfilter hook of the proxy's
/// (the `inet` hooks are skipped by the redirect, and on this kernel the `netdev` egress hook
/// of the proxy's veths counted none of them either).
pub fn nft_netdev(
    world: &World,
    ns: Ns,
    table: &str,
    hook: &str,
    devices: &[&str],
    rules: &[&str],
) -> Result<()> {
    let mut script = format!("add table netdev {table}\n");
    for dev in devices {
        script.push_str(&format!(
            "add chain netdev {table} {hook}_{dev} {{ type filter hook {hook} device \"{dev}\" \
             priority 0; }}\n"
        ));
        for rule in rules {
            script.push_str(&format!(
                "add rule netdev {table} {hook}_{dev} {}\n",
                rule.replace("DEV", dev)
            ));
        }
    }
    world.nft(ns, &format!("{table}-{hook}.nft"), &script)
}

/// The packets every `counter` of table `netdev <table>` in `ns` has counted, summed.
pub fn nft_counted(world: &World, ns: Ns, table: &str) -> Result<u64> {
    let out = world
        .command(ns, "nft")
        .args(["list", "table", "netdev", table])
        .output()
        .context("running nft")?;
    ensure!(
        out.status.success(),
        "nft list table netdev {table} in {ns:?}"
    );
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .split("packets ")
        .skip(1)
        .filter_map(|rest| rest.split(' ').next()?.parse::<u64>().ok())
        .sum())
}
