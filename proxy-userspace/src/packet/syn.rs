//! Reading the client's SYN as the listener saved it (`TCP_SAVE_SYN`, read once with
//! `TCP_SAVED_SYN`): the network header and the TCP header with its options, exactly as the
//! client sent them (`docs/packet-engine.md`, sections 1 and 4.1). Pure and total: any input
//! gives a value or a [`SynError`].

/// What the packet engine needs from the client's SYN.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Syn {
    /// The MSS option, if the client sent one.
    pub mss: Option<u16>,
    /// The window-scale option's shift, if sent.
    pub wscale: Option<u8>,
    /// SACK-permitted was sent.
    pub sack: bool,
    /// The timestamp option was sent.
    pub timestamps: bool,
    /// The IPv4 header carried options (`ihl > 5`).
    pub ip_options: bool,
    /// The SYN asks for Accurate ECN: AE, CWR and ECE all set.
    pub accecn: bool,
}

/// Why a saved SYN could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SynError {
    /// Shorter than the headers it announces.
    Truncated,
    /// Neither IPv4 nor IPv6.
    Version(u8),
    /// The network header does not carry TCP directly (IPv6 extension headers are not
    /// followed: the engine does not translate them).
    NotTcp(u8),
    /// The TCP data offset is below 5 words.
    BadOffset(u8),
    /// An option's length runs past the header or is below 2.
    BadOption,
}

impl std::fmt::Display for SynError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SynError::Truncated => write!(f, "saved SYN truncated"),
            SynError::Version(v) => write!(f, "saved SYN has IP version {v}"),
            SynError::NotTcp(p) => write!(f, "saved SYN's next header is {p}, not TCP"),
            SynError::BadOffset(o) => write!(f, "saved SYN's TCP data offset is {o}"),
            SynError::BadOption => write!(f, "saved SYN has a malformed TCP option"),
        }
    }
}

impl std::error::Error for SynError {}

/// Parses a saved SYN: IPv4 or IPv6 header, then the TCP header.
pub fn parse(bytes: &[u8]) -> Result<Syn, SynError> {
    let first = *bytes.first().ok_or(SynError::Truncated)?;
    let (tcp_at, ip_options) = match first >> 4 {
        4 => {
            let ihl = usize::from(first & 0x0f) * 4;
            if ihl < 20 {
                return Err(SynError::Truncated);
            }
            let proto = *bytes.get(9).ok_or(SynError::Truncated)?;
            if proto != 6 {
                return Err(SynError::NotTcp(proto));
            }
            (ihl, ihl > 20)
        }
        6 => {
            let next = *bytes.get(6).ok_or(SynError::Truncated)?;
            if next != 6 {
                return Err(SynError::NotTcp(next));
            }
            (40, false)
        }
        v => return Err(SynError::Version(v)),
    };
    let tcp = bytes.get(tcp_at..).ok_or(SynError::Truncated)?;
    let offset_byte = *tcp.get(12).ok_or(SynError::Truncated)?;
    let words = offset_byte >> 4;
    if words < 5 {
        return Err(SynError::BadOffset(words));
    }
    let options = tcp
        .get(20..usize::from(words) * 4)
        .ok_or(SynError::Truncated)?;
    // AE is the low bit of the data-offset byte; CWR and ECE the two high bits of the flags.
    let flags = *tcp.get(13).ok_or(SynError::Truncated)?;
    let mut syn = Syn {
        ip_options,
        accecn: offset_byte & 0x01 != 0 && flags & 0xc0 == 0xc0,
        ..Syn::default()
    };
    let mut rest = options;
    while let Some((&kind, after)) = rest.split_first() {
        match kind {
            0 => break,
            1 => {
                rest = after;
                continue;
            }
            _ => {}
        }
        let len = usize::from(*after.first().ok_or(SynError::BadOption)?);
        if len < 2 || len > rest.len() {
            return Err(SynError::BadOption);
        }
        let body = &rest[2..len];
        match (kind, body) {
            (2, [a, b]) => syn.mss = Some(u16::from_be_bytes([*a, *b])),
            (3, [shift]) => syn.wscale = Some(*shift),
            (4, []) => syn.sack = true,
            (8, [_, _, _, _, _, _, _, _]) => syn.timestamps = true,
            // Unknown options, or known ones with an odd length, are skipped whole.
            _ => {}
        }
        rest = &rest[len..];
    }
    Ok(syn)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Linux client's IPv4 SYN: MSS 1460, SACK-permitted, timestamps, NOP, window scale 7.
    fn linux_v4() -> Vec<u8> {
        let mut b = vec![
            0x45, 0, 0, 60, 0, 0, 0x40, 0, 64, 6, 0, 0, 192, 0, 2, 2, 192, 0, 2, 1,
        ];
        b.extend_from_slice(&[
            0x9c, 0x40, 0x01, 0xbb, 0, 0, 0, 1, 0, 0, 0, 0, 0xa0, 0x02, 0xfa, 0xf0, 0, 0, 0, 0,
        ]);
        b.extend_from_slice(&[
            2, 4, 0x05, 0xb4, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7,
        ]);
        b
    }

    #[test]
    fn reads_a_linux_syn() {
        assert_eq!(
            parse(&linux_v4()),
            Ok(Syn {
                mss: Some(1460),
                wscale: Some(7),
                sack: true,
                timestamps: true,
                ip_options: false,
                accecn: false,
            })
        );
    }

    #[test]
    fn tells_an_accecn_syn_from_a_classic_ecn_one() {
        let mut classic = linux_v4();
        classic[33] = 0xc2; // CWR, ECE, SYN
        assert_eq!(parse(&classic).map(|s| s.accecn), Ok(false));
        let mut accecn = classic.clone();
        accecn[32] |= 0x01; // AE
        assert_eq!(parse(&accecn).map(|s| s.accecn), Ok(true));
        let mut ae_only = linux_v4();
        ae_only[32] |= 0x01;
        assert_eq!(parse(&ae_only).map(|s| s.accecn), Ok(false));
    }

    #[test]
    fn reads_ipv6_and_ip_options() {
        let v4 = linux_v4();
        let mut v6 = vec![0x60, 0, 0, 0, 0, 40, 6, 64];
        v6.extend_from_slice(&[0; 32]);
        v6.extend_from_slice(&v4[20..]);
        assert_eq!(parse(&v6).map(|s| s.mss), Ok(Some(1460)));
        // Four bytes of IPv4 options (a NOP and an end of list, padded).
        let mut opts = v4.clone();
        opts[0] = 0x46;
        opts.splice(20..20, [1, 0, 0, 0]);
        assert_eq!(
            parse(&opts).map(|s| (s.ip_options, s.mss)),
            Ok((true, Some(1460)))
        );
    }

    #[test]
    fn a_syn_without_options_has_no_mss() {
        let mut b = linux_v4();
        b.truncate(40);
        b[32] = 0x50;
        assert_eq!(parse(&b), Ok(Syn::default()));
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        assert_eq!(parse(&[]), Err(SynError::Truncated));
        assert_eq!(parse(&[0x55]), Err(SynError::Version(5)));
        let mut udp = linux_v4();
        udp[9] = 17;
        assert_eq!(parse(&udp), Err(SynError::NotTcp(17)));
        let mut offset = linux_v4();
        offset[32] = 0x40;
        assert_eq!(parse(&offset), Err(SynError::BadOffset(4)));
        let mut option = linux_v4();
        option[41] = 30;
        assert_eq!(parse(&option), Err(SynError::BadOption));
        option[41] = 0;
        assert_eq!(parse(&option), Err(SynError::BadOption));
    }

    /// Every prefix of a valid SYN is either refused or read, never a panic.
    #[test]
    fn every_prefix_is_total() {
        let b = linux_v4();
        for n in 0..b.len() {
            assert!(parse(&b[..n]).is_err(), "prefix of {n} bytes");
        }
        assert!(parse(&b).is_ok());
    }
}
