//! Deterministic positional byte streams and their verifier: every byte's value depends on
//! its offset, so loss, duplication and reordering all show as a mismatch at a named offset.
use std::{
    io::{self, Read, Write},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

/// xorshift64* (Vigna): small, fast, good enough to make every 64 KiB block of a test stream
/// look unrelated to every other.
#[derive(Clone, Debug)]
pub struct XorShift(u64);

impl XorShift {
    /// A generator from `seed` (any value; zero is remapped, since xorshift's state must not
    /// be zero).
    pub fn new(seed: u64) -> XorShift {
        XorShift(splitmix64(seed) | 1)
    }

    /// The next 64-bit output.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Fills `out` with output bytes.
    pub fn fill(&mut self, out: &mut [u8]) {
        let (words, rest) = out.as_chunks_mut::<8>();
        for word in words {
            *word = self.next_u64().to_le_bytes();
        }
        let last = self.next_u64().to_le_bytes();
        rest.copy_from_slice(&last[..rest.len()]);
    }
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Size of one block of a [`Stream`].
pub const BLOCK: usize = 64 * 1024;

/// An endless deterministic byte stream: block `k` (bytes `k*64KiB ..`) is xorshift64* output
/// seeded from `(seed, k)`, so any offset can be produced without generating what is before it,
/// and a byte that arrives at the wrong offset (lost, duplicated or reordered data) differs from
/// the expected one with overwhelming probability.
pub struct Stream {
    seed: u64,
    block_no: u64,
    block: Vec<u8>,
}

impl Stream {
    /// The stream for `seed`.
    pub fn new(seed: u64) -> Stream {
        let mut s = Stream {
            seed,
            block_no: u64::MAX,
            block: vec![0; BLOCK],
        };
        s.load(0);
        s
    }

    fn load(&mut self, block_no: u64) {
        if self.block_no != block_no {
            let mut rng = XorShift::new(self.seed ^ splitmix64(block_no.wrapping_add(1)));
            rng.fill(&mut self.block);
            self.block_no = block_no;
        }
    }

    /// The bytes of the block holding `offset`, from `offset` to the block's end.
    pub fn at(&mut self, offset: u64) -> &[u8] {
        self.load(offset / BLOCK as u64);
        &self.block[(offset % BLOCK as u64) as usize..]
    }

    /// Fills `out` with the stream's bytes starting at `offset`.
    pub fn fill(&mut self, mut offset: u64, out: &mut [u8]) {
        let mut done = 0;
        while done < out.len() {
            let src = self.at(offset);
            let n = src.len().min(out.len() - done);
            out[done..done + n].copy_from_slice(&src[..n]);
            done += n;
            offset += n as u64;
        }
    }

    /// The first `len` bytes, as one vector (for small amounts).
    pub fn prefix(seed: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0; len];
        Stream::new(seed).fill(0, &mut out);
        out
    }
}

/// Writes bytes `0..len` of the stream `seed` to `out`, a block at a time.
pub fn send_stream(out: &mut impl Write, seed: u64, len: u64) -> io::Result<()> {
    send_stream_range(out, seed, 0, len)
}

/// Writes bytes `from..to` of the stream `seed` to `out`, a block at a time (to send a stream
/// in parts, with something else happening in between).
pub fn send_stream_range(out: &mut impl Write, seed: u64, from: u64, to: u64) -> io::Result<()> {
    let mut stream = Stream::new(seed);
    let mut offset = from;
    while offset < to {
        let chunk = stream.at(offset);
        let n = chunk
            .len()
            .min(usize::try_from(to - offset).unwrap_or(usize::MAX));
        out.write_all(&chunk[..n])?;
        offset += n as u64;
    }
    Ok(())
}

/// Checks a received byte sequence against the stream `seed`, position by position.
pub struct Verifier {
    stream: Stream,
    received: u64,
    expected: u64,
}

impl Verifier {
    /// Expects exactly `expected` bytes of the stream `seed`.
    pub fn new(seed: u64, expected: u64) -> Verifier {
        Verifier {
            stream: Stream::new(seed),
            received: 0,
            expected,
        }
    }

    /// Checks the next received bytes. Fails at the first byte that differs from the stream
    /// (naming its offset) or that goes past the expected length.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<()> {
        while !data.is_empty() {
            if self.received >= self.expected {
                bail!(
                    "received more than the {} expected bytes ({} extra in this read)",
                    self.expected,
                    data.len()
                );
            }
            let offset = self.received;
            let want = self.stream.at(offset);
            let room = usize::try_from(self.expected - offset).unwrap_or(usize::MAX);
            let n = want.len().min(data.len()).min(room);
            if data[..n] != want[..n] {
                let i = data[..n]
                    .iter()
                    .zip(&want[..n])
                    .position(|(a, b)| a != b)
                    .unwrap_or_default();
                bail!(
                    "stream mismatch at offset {}: got {:#04x}, expected {:#04x} \
                     (bytes lost, duplicated or reordered)",
                    offset + i as u64,
                    data[i],
                    want[i]
                );
            }
            self.received += n as u64;
            data = &data[n..];
        }
        Ok(())
    }

    /// Bytes verified so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Fails unless every expected byte arrived.
    pub fn finish(&self) -> Result<()> {
        if self.received != self.expected {
            bail!(
                "stream ended after {} of {} bytes",
                self.received,
                self.expected
            );
        }
        Ok(())
    }
}

/// Reads `from` to end of stream (or error), checking everything against `verifier`; returns
/// how many bytes were read. Stops at the first mismatch.
pub fn receive_stream(from: &mut impl Read, verifier: &mut Verifier) -> Result<u64> {
    let mut buf = vec![0u8; BLOCK];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(e).with_context(|| format!("reading after {total} bytes"));
            }
        };
        total += n as u64;
        verifier.feed(&buf[..n])?;
    }
}

/// Reads to end of stream checking every byte against the stream `seed` of length `len`.
pub fn receive(stream: &mut impl Read, seed: u64, len: u64) -> Result<()> {
    let mut verifier = Verifier::new(seed, len);
    receive_stream(stream, &mut verifier)?;
    verifier.finish()
}

/// Reads the first `n` bytes of the stream `seed` of length `len` (to know that the connection
/// is through) and returns the verifier for the rest.
pub fn receive_first(stream: &mut impl Read, seed: u64, len: u64, n: usize) -> Result<Verifier> {
    let mut verifier = Verifier::new(seed, len);
    let mut first = vec![0u8; n];
    stream
        .read_exact(&mut first)
        .with_context(|| format!("reading the first {n} bytes"))?;
    verifier.feed(&first)?;
    Ok(verifier)
}

/// Reads the rest of a stream begun with [`receive_first`] to end of stream.
pub fn receive_rest(stream: &mut impl Read, mut verifier: Verifier) -> Result<()> {
    receive_stream(stream, &mut verifier)?;
    verifier.finish()
}

/// Reads `BLOCK` bytes at a time with `pause` between reads until end of stream, checking
/// everything against the stream `seed` of length `len`; gives up after `limit`.
pub fn receive_slowly(
    stream: &mut impl Read,
    seed: u64,
    len: u64,
    pause: Duration,
    limit: Duration,
) -> Result<()> {
    let mut verifier = Verifier::new(seed, len);
    let mut buf = vec![0u8; BLOCK];
    let started = Instant::now();
    loop {
        ensure!(
            started.elapsed() < limit,
            "slow read not done within {limit:?} ({} bytes)",
            verifier.received()
        );
        std::thread::sleep(pause);
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("slow read after {} bytes", verifier.received()));
            }
        };
        verifier.feed(&buf[..n])?;
    }
    verifier.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_is_positional_and_verifier_catches_faults() {
        let data = Stream::prefix(7, 3 * BLOCK + 100);
        let mut at = vec![0u8; 1000];
        Stream::new(7).fill(BLOCK as u64 - 500, &mut at);
        assert_eq!(at, data[BLOCK - 500..BLOCK + 500]);
        assert_ne!(data[..BLOCK], data[BLOCK..2 * BLOCK]);

        let mut v = Verifier::new(7, data.len() as u64);
        for chunk in data.chunks(7777) {
            v.feed(chunk).expect("in order");
        }
        v.finish().expect("complete");
        assert!(v.feed(&[0]).is_err(), "an extra byte is caught");

        let mut lost = data.clone();
        lost.remove(BLOCK + 3);
        let e = Verifier::new(7, data.len() as u64)
            .feed(&lost)
            .expect_err("loss is caught");
        assert!(e.to_string().contains("offset"), "{e}");
        let mut swapped = data.clone();
        swapped.swap(10, 20);
        assert!(Verifier::new(7, data.len() as u64).feed(&swapped).is_err());
        let mut short = Verifier::new(7, data.len() as u64);
        short.feed(&data[..100]).expect("prefix");
        assert!(short.finish().is_err());
    }
}
