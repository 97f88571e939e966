//! Loading spliced's eBPF object and attaching its programs.

use anyhow::{Context as _, Result};
use aya::{Ebpf, maps::SockHash, programs::SkSkb};
use proxy_common::{MAP_SOCKETS, PROG_STREAM_VERDICT};

/// The eBPF object built by `build.rs` from the `proxy-ebpf` crate.
#[cfg(not(spliced_no_ebpf))]
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf"));
#[cfg(spliced_no_ebpf)]
static OBJECT: &[u8] = &[];

/// The loaded programs and maps; dropping it detaches and unloads everything.
pub struct Kernel {
    ebpf: Ebpf,
}

impl Kernel {
    /// Loads the object and attaches the stream-verdict program to the socket hash.
    pub fn load() -> Result<Self> {
        anyhow::ensure!(
            !OBJECT.is_empty(),
            "this binary was built without its eBPF object"
        );
        let mut ebpf = Ebpf::load(OBJECT).context("loading the eBPF object into the kernel")?;
        let socks: SockHash<_, u64> = SockHash::try_from(
            ebpf.take_map(MAP_SOCKETS)
                .with_context(|| format!("map {MAP_SOCKETS} missing from the object"))?,
        )?;
        let fd = socks.fd().try_clone()?;
        let prog: &mut SkSkb = ebpf
            .program_mut(PROG_STREAM_VERDICT)
            .with_context(|| format!("program {PROG_STREAM_VERDICT} missing from the object"))?
            .try_into()?;
        prog.load()
            .context("the verifier rejected the stream-verdict program")?;
        prog.attach(&fd)
            .context("attaching the stream-verdict program")?;
        Ok(Self { ebpf })
    }

    /// Names of the programs in the loaded object.
    pub fn program_names(&self) -> Vec<String> {
        self.ebpf
            .programs()
            .map(|(name, _)| name.to_owned())
            .collect()
    }
}
