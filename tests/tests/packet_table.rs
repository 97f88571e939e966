//! The packet engine's table at its size, without traffic (`docs/packet-engine.md`, section
//! 5, "Table full"): `PacketTables::load_sized` makes both maps hold `2 * max_connections`
//! entries, a connection's insert into a full table fails with `E2BIG` (what the handoff
//! refuses as `table_full`) and leaves nothing of that connection behind, whichever of its
//! four inserts (two control values, two entries) is the one that fails, and the table takes
//! connections again once there is room. The handoffs are made up: nothing is attached.
//!
//! Run as root: `cargo test --release -p spliced-tests --test packet_table`.
use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, Result, bail, ensure};
use proxy_common::{FLOW_DRAIN, Flow, FlowKey, PACKET_MAX_CONNECTIONS};
use spliced::{Handoff, PacketTables};
use spliced_tests::packet::sample_handoff;

/// A bpffs directory of the test's (under the host's `/sys/fs/bpf`), removed with its pins.
struct PinDir(PathBuf);

impl PinDir {
    fn new(what: &str) -> Result<PinDir> {
        let dir = PinDir(PathBuf::from(format!(
            "/sys/fs/bpf/spliced-test-table-{what}-{}",
            std::process::id()
        )));
        std::fs::create_dir_all(&dir.0)
            .with_context(|| format!("creating {} (is bpffs mounted?)", dir.0.display()))?;
        Ok(dir)
    }

    fn map(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Ok(entries) = std::fs::read_dir(&self.0) {
            for entry in entries.flatten() {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Entries in a pinned map, by `bpftool map dump`.
fn entries(pin: &std::path::Path) -> Result<usize> {
    let out = bpftool(&["map", "dump", "pinned"], pin, &[])?;
    let entries: Vec<serde_json::Value> =
        serde_json::from_slice(&out).context("parsing bpftool's dump")?;
    Ok(entries.len())
}

/// `bpftool <args> <pin> <rest> -j`, its standard output.
fn bpftool(args: &[&str], pin: &std::path::Path, rest: &[String]) -> Result<Vec<u8>> {
    let out = Command::new("bpftool")
        .args(args)
        .arg(pin)
        .args(rest)
        .arg("-j")
        .output()
        .context("running bpftool")?;
    ensure!(
        out.status.success(),
        "bpftool {args:?} {}: {}",
        pin.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(out.stdout)
}

/// `bytes` as bpftool's `hex` arguments.
fn hex(bytes: &[u8]) -> Vec<String> {
    std::iter::once("hex".to_owned())
        .chain(bytes.iter().map(|b| format!("{b:02x}")))
        .collect()
}

/// A key no made-up connection uses.
const LONE_KEY: [u8; size_of::<FlowKey>()] = [0xee; size_of::<FlowKey>()];

/// Fails unless `result` is an insert that failed with `E2BIG`.
fn expect_e2big(result: Result<()>, what: &str) -> Result<()> {
    let Err(e) = result else {
        bail!("{what}: the insert succeeded in a full table");
    };
    let full = e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.raw_os_error() == Some(nix::libc::E2BIG))
    });
    ensure!(full, "{what}: failed with {e:#}, not E2BIG");
    Ok(())
}

/// Room for two connections: two go in, a third fails with `E2BIG` at its first insert (a
/// control value), then at its second (the table one short after a lone control value was
/// removed with its entry) and at its fourth (the table one short of the control values,
/// a lone entry put there by hand); each time nothing of it stays. With room again it goes
/// in.
#[test]
fn a_full_table_fails_with_e2big_and_keeps_nothing_of_the_refused() -> Result<()> {
    let pins = PinDir::new("full")?;
    let tables = PacketTables::load_sized(Some(&pins.0), 2)?;
    let (flows, control) = (
        pins.map("SPLICED_PACKET_FLOWS"),
        pins.map("SPLICED_PACKET_CONTROL"),
    );
    let counts = || -> Result<(usize, usize)> { Ok((entries(&flows)?, entries(&control)?)) };
    let absent =
        |h: &Handoff| -> Result<bool> { Ok(tables.entries(h)?.iter().all(Option::is_none)) };
    for pin in [&flows, &control] {
        let info: serde_json::Value =
            serde_json::from_slice(&bpftool(&["map", "show", "pinned"], pin, &[])?)?;
        ensure!(
            info["type"] == "hash" && info["max_entries"] == 4,
            "{}: {info}",
            pin.display()
        );
    }
    let (one, two, three) = (sample_handoff(1), sample_handoff(2), sample_handoff(3));
    tables.insert(&one, FLOW_DRAIN)?;
    tables.insert(&two, FLOW_DRAIN)?;
    ensure!(counts()? == (4, 4), "two connections: {:?}", counts()?);

    // Full: the first insert, the backend's control value, fails.
    expect_e2big(tables.insert(&three, FLOW_DRAIN), "a full table")?;
    ensure!(counts()? == (4, 4) && absent(&three)?, "{:?}", counts()?);

    // One free slot in each map: the second control value fails, the first goes again.
    let [(two_up, _), (two_down, _)] = two.entries(FLOW_DRAIN);
    tables.remove_keys(&[two_up])?;
    ensure!(counts()? == (3, 3), "half a connection: {:?}", counts()?);
    expect_e2big(tables.insert(&three, FLOW_DRAIN), "one free slot")?;
    ensure!(counts()? == (3, 3) && absent(&three)?, "{:?}", counts()?);

    // Room in the control values, one slot in the table: the client's entry fails, the
    // backend's entry and both control values go again.
    tables.remove_keys(&[two_down])?;
    let mut key = hex(&LONE_KEY);
    key.insert(0, "key".to_owned());
    let mut value = hex(&[0; size_of::<Flow>()]);
    value.insert(0, "value".to_owned());
    bpftool(
        &["map", "update", "pinned"],
        &flows,
        &[key.clone(), value].concat(),
    )?;
    ensure!(counts()? == (3, 2), "a lone entry: {:?}", counts()?);
    expect_e2big(tables.insert(&three, FLOW_DRAIN), "one free entry")?;
    ensure!(counts()? == (3, 2) && absent(&three)?, "{:?}", counts()?);

    // Room again.
    bpftool(&["map", "delete", "pinned"], &flows, &key)?;
    tables.insert(&three, FLOW_DRAIN)?;
    ensure!(
        counts()? == (4, 4) && tables.entries(&three)?.iter().all(Option::is_some),
        "{:?}",
        counts()?
    );
    Ok(())
}

/// The size is checked where the table is made, as the configuration checks it.
#[test]
fn the_table_holds_1_to_65536_connections() -> Result<()> {
    for n in [0, PACKET_MAX_CONNECTIONS + 1] {
        ensure!(
            PacketTables::load_sized(None, n).is_err(),
            "a table for {n} connections was made"
        );
    }
    Ok(())
}
