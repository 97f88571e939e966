//! Member offsets of kernel structures, read from the kernel's BTF (`/sys/kernel/btf/vmlinux`).
//!
//! The stream verdict reads `TCP_SKB_CB(skb)->seq` and `tcp_sk(sk)->copied_seq` with
//! `bpf_probe_read_kernel` (an `sk_skb` program cannot reach them through its context). Their
//! offsets differ between kernels and builds, so they are looked up here at load time; if one
//! is missing the sockmap engine is not offered rather than run on a guess.
use anyhow::{Context as _, Result, bail, ensure};
use proxy_common::SkbOffsets;

/// Where the running kernel describes its types.
pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

/// The offsets the verdict needs, from the running kernel's BTF.
pub fn skb_offsets() -> Result<SkbOffsets> {
    let data = std::fs::read(VMLINUX).with_context(|| format!("reading {VMLINUX}"))?;
    let btf = Btf::parse(&data).with_context(|| format!("parsing {VMLINUX}"))?;
    skb_offsets_in(&btf)
}

fn skb_offsets_in(btf: &Btf<'_>) -> Result<SkbOffsets> {
    let u32_of = |v: u64| u32::try_from(v).context("offset out of range");
    let offsets = SkbOffsets {
        skb_cb: u32_of(btf.member_offset("sk_buff", "cb")?)?,
        skb_sk: u32_of(btf.member_offset("sk_buff", "sk")?)?,
        cb_seq: u32_of(btf.member_offset("tcp_skb_cb", "seq")?)?,
        tcp_copied_seq: u32_of(btf.member_offset("tcp_sock", "copied_seq")?)?,
    };
    // `seq` and `copied_seq` are u32s the program reads whole: they must fit where they are.
    ensure!(
        offsets.cb_seq + 4 <= 48,
        "tcp_skb_cb.seq at {} lies outside skb->cb",
        offsets.cb_seq
    );
    Ok(offsets)
}

const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// One type record: its kind, name, referenced type and where its members start.
#[derive(Clone, Copy)]
struct Type {
    kind: u32,
    kind_flag: bool,
    vlen: usize,
    name_off: u32,
    size_or_type: u32,
    /// Offset of the data after the 12-byte common part, within the type section.
    extra: usize,
}

/// Just enough of a BTF blob (little-endian, as on every host spliced runs on) to find struct
/// members by name.
struct Btf<'a> {
    types: Vec<Type>,
    type_section: &'a [u8],
    strings: &'a [u8],
}

fn u32_at(data: &[u8], at: usize) -> Result<u32> {
    let bytes = data.get(at..at + 4).context("BTF ends inside a record")?;
    Ok(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

impl<'a> Btf<'a> {
    fn parse(data: &'a [u8]) -> Result<Btf<'a>> {
        ensure!(
            data.len() >= 24 && data[..2] == [0x9f, 0xeb],
            "not little-endian BTF"
        );
        let hdr_len = u32_at(data, 4)? as usize;
        let (type_off, type_len) = (u32_at(data, 8)? as usize, u32_at(data, 12)? as usize);
        let (str_off, str_len) = (u32_at(data, 16)? as usize, u32_at(data, 20)? as usize);
        let section = |off: usize, len: usize| {
            data.get(hdr_len + off..hdr_len + off + len)
                .context("BTF section out of bounds")
        };
        let type_section = section(type_off, type_len)?;
        let strings = section(str_off, str_len)?;
        // Type ids start at 1; index 0 is `void`.
        let mut types = vec![Type {
            kind: 0,
            kind_flag: false,
            vlen: 0,
            name_off: 0,
            size_or_type: 0,
            extra: 0,
        }];
        let mut at = 0;
        while at < type_section.len() {
            let name_off = u32_at(type_section, at)?;
            let info = u32_at(type_section, at + 4)?;
            let size_or_type = u32_at(type_section, at + 8)?;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let extra = at + 12;
            let trailing = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
                KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
                0..=19 => 0,
                _ => bail!("unknown BTF kind {kind}"),
            };
            types.push(Type {
                kind,
                kind_flag: info >> 31 == 1,
                vlen,
                name_off,
                size_or_type,
                extra,
            });
            at = extra + trailing;
        }
        Ok(Btf {
            types,
            type_section,
            strings,
        })
    }

    fn name(&self, off: u32) -> &[u8] {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        &rest[..rest.iter().position(|&b| b == 0).unwrap_or(rest.len())]
    }

    /// Follows typedefs and qualifiers to the type they name.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            let t = self.types.get(id as usize)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.size_or_type;
                }
                _ => return Some(t),
            }
        }
        None
    }

    /// Byte offset of `member` in `struct name`, looking through anonymous structs and unions.
    fn member_offset(&self, name: &str, member: &str) -> Result<u64> {
        let ty = self
            .types
            .iter()
            .find(|t| {
                t.kind == KIND_STRUCT && t.vlen > 0 && self.name(t.name_off) == name.as_bytes()
            })
            .with_context(|| format!("struct {name} is not in the kernel's BTF"))?;
        let bits = self
            .find_member(ty, member.as_bytes(), 0)?
            .with_context(|| format!("struct {name} has no member {member}"))?;
        ensure!(bits % 8 == 0, "{name}.{member} is a bitfield");
        Ok(bits / 8)
    }

    /// Bit offset of `member` within `ty` (a struct or union), searching anonymous members.
    fn find_member(&self, ty: &Type, member: &[u8], depth: u32) -> Result<Option<u64>> {
        ensure!(depth < 16, "anonymous members nested too deep");
        for i in 0..ty.vlen {
            let at = ty.extra + 12 * i;
            let name_off = u32_at(self.type_section, at)?;
            let type_id = u32_at(self.type_section, at + 4)?;
            let raw = u32_at(self.type_section, at + 8)?;
            let bits = u64::from(if ty.kind_flag { raw & 0x00ff_ffff } else { raw });
            if name_off != 0 {
                if self.name(name_off) == member {
                    return Ok(Some(bits));
                }
                continue;
            }
            if let Some(inner) = self.resolve(type_id)
                && matches!(inner.kind, KIND_STRUCT | KIND_UNION)
                && let Some(found) = self.find_member(inner, member, depth + 1)?
            {
                return Ok(Some(bits + found));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-made BTF: `struct outer { int a; union { int b; struct { int pad; int c; }; }; }`.
    fn sample() -> Vec<u8> {
        let mut strings = vec![0u8];
        let mut s = |name: &str| -> u32 {
            let at = u32::try_from(strings.len()).unwrap_or(0);
            strings.extend_from_slice(name.as_bytes());
            strings.push(0);
            at
        };
        let (int, outer, a, b, c, pad) = (s("int"), s("outer"), s("a"), s("b"), s("c"), s("pad"));
        let words: Vec<u32> = [
            // 1: int (4 bytes)
            &[int, KIND_INT << 24, 4, 32][..],
            // 2: struct { int pad; int c; } at bits 0 and 32
            &[0, (KIND_STRUCT << 24) | 2, 8, pad, 1, 0, c, 1, 32],
            // 3: union { int b; struct 2; }
            &[0, (KIND_UNION << 24) | 2, 8, b, 1, 0, 0, 2, 0],
            // 4: struct outer { int a; union 3 at byte 8; }
            &[outer, (KIND_STRUCT << 24) | 2, 16, a, 1, 0, 0, 3, 64],
        ]
        .concat();
        let types: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let len = |v: &[u8]| u32::try_from(v.len()).unwrap_or(0);
        let mut blob = vec![0x9f, 0xeb, 1, 0];
        for w in [24u32, 0, len(&types), len(&types), len(&strings)] {
            blob.extend_from_slice(&w.to_le_bytes());
        }
        blob.extend_from_slice(&types);
        blob.extend_from_slice(&strings);
        blob
    }

    #[test]
    fn finds_members_through_anonymous_unions_and_structs() -> Result<()> {
        let data = sample();
        let btf = Btf::parse(&data)?;
        assert_eq!(btf.member_offset("outer", "a")?, 0);
        assert_eq!(btf.member_offset("outer", "b")?, 8);
        assert_eq!(btf.member_offset("outer", "c")?, 12);
        assert!(btf.member_offset("outer", "missing").is_err());
        assert!(btf.member_offset("nothing", "a").is_err());
        Ok(())
    }

    #[test]
    fn rejects_what_is_not_btf() {
        assert!(Btf::parse(b"definitely not BTF at all").is_err());
        let mut data = sample();
        data.truncate(40);
        assert!(Btf::parse(&data).is_err());
    }

    /// On a kernel with BTF (every kernel spliced's sockmap engine runs on), the offsets exist
    /// and `seq` is the first member of `tcp_skb_cb`.
    #[test]
    fn the_running_kernel_has_the_offsets() -> Result<()> {
        if !std::path::Path::new(VMLINUX).exists() {
            return Ok(());
        }
        let offsets = skb_offsets()?;
        assert_eq!(offsets.cb_seq, 0);
        assert!(offsets.skb_cb > 0 && offsets.skb_sk < 256 && offsets.tcp_copied_seq > 0);
        Ok(())
    }
}
