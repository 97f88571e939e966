//! Builds `proxy-ebpf` for `bpfel-unknown-none` and leaves the object in `OUT_DIR`, where
//! `src/ebpf.rs` embeds it with `include_bytes_aligned!`.
//!
//! Trade-offs, written down because each one cost time to find:
//! - The nested build needs `-Z build-std=core` (there is no prebuilt `core` for the bpf
//!   target), so it runs with `RUSTC_BOOTSTRAP=1`. We set it only in this build script's own
//!   environment, which only the nested `cargo` inherits; the host build stays on stable rules.
//! - It uses the pinned toolchain from `rust-toolchain.toml` rather than aya-build's default of
//!   `nightly`: newer compilers emit LLVM bitcode that our LLVM 22 `bpf-linker` rejects.
//! - `SPLICED_SKIP_EBPF=1` skips it (the binary then refuses to load any program), for hosts
//!   that only want to run the pure unit tests without `bpf-linker`.
use anyhow::{Context as _, anyhow};

const TOOLCHAIN: &str = "1.98.1";

fn main() -> anyhow::Result<()> {
    println!("cargo::rerun-if-env-changed=SPLICED_SKIP_EBPF");
    println!("cargo::rustc-check-cfg=cfg(spliced_no_ebpf)");
    if std::env::var_os("SPLICED_SKIP_EBPF").is_some_and(|v| v == "1") {
        println!("cargo::rustc-cfg=spliced_no_ebpf");
        return Ok(());
    }
    let manifest = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?;
    let ebpf_dir = std::path::Path::new(&manifest)
        .parent()
        .ok_or_else(|| anyhow!("proxy-userspace has no parent directory"))?
        .join("proxy-ebpf");
    let ebpf_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    // SAFETY: build scripts are single-threaded; this only shapes the nested cargo's env.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "proxy-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(TOOLCHAIN),
    )
    .context("building the eBPF object (is bpf-linker installed? run ./x)")
}
