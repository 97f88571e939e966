//! `cargo xtask bench --only sockmap-stall`: what the sockmap engine's backlog limit is worth.
//! A client writes as fast as it can for 3 s while its backend reads nothing, once with
//! `sockmap_backlog_limit = "1MiB"` and once with a limit no connection reaches; the table says
//! how much the client parked and the most the kernel held for the backend (from `/metrics`).
//!
//! The end-to-end tests check the bound itself (`tests/tests/sockmap_backpressure.rs`); this
//! is the comparison without it, which parks gigabytes of kernel memory, so it is not part of
//! the test suite nor of a full `cargo xtask bench` run.
use std::fmt::Write as _;

use anyhow::Result;
use spliced_tests::sockmap::{MIB, STALL, stalled_backend};

use crate::report::Part;

/// The limits compared: the tests' and one no connection reaches.
const LIMITS: [&str; 2] = ["1MiB", "64GiB"];

/// Runs the stall once per limit and returns the table.
pub(crate) fn part() -> Result<Part> {
    let mut table = format!(
        "A client writes for {STALL:?} while its backend reads nothing (sockmap engine).\n\n\
         | sockmap_backlog_limit | client wrote (MiB) | detached | most parked in the kernel (MiB) |\n\
         |---|---|---|---|\n"
    );
    for limit in LIMITS {
        let stall = stalled_backend(limit)?;
        let mib = |bytes: u64| bytes as f64 / MIB as f64;
        // Never detached: the kernel held everything the backend did not read.
        let parked = if stall.detached == 0 {
            "all of it (never detached)".to_owned()
        } else {
            format!("{:.1}", mib(stall.parked_max))
        };
        let _ = writeln!(
            table,
            "| {limit} | {:.1} | {} | {parked} |",
            mib(stall.written),
            stall.detached,
        );
    }
    println!("\n{table}");
    Ok(Part {
        heading: "sockmap: what a stalled reader lets the sender park".into(),
        markdown: table,
        panels: Vec::new(),
        checks: Vec::new(),
    })
}
