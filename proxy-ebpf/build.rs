//! Rebuild the eBPF object when `bpf-linker` changes.
//!
//! Cargo does not track the linker binary, so a freshly built `bpf-linker` (say, against another
//! LLVM) would otherwise leave a stale object in place.
fn main() {
    if let Ok(path) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}
