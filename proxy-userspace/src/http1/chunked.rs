//! The chunked transfer coding (RFC 9112 §7.1), framed but never decoded: every byte passes on
//! as it came, and this state machine only says where the message ends and refuses what a
//! backend or client could read differently.

/// The longest chunk-size line (size, extensions, CRLF) or trailer line we wait for.
const MAX_LINE: usize = 4096;

/// The most trailer bytes after the last chunk.
const MAX_TRAILERS: usize = 16 * 1024;

/// Where a chunked body is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Chunked {
    state: State,
    trailer_bytes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before a chunk-size line.
    Size,
    /// Inside a chunk's data, with this many bytes to go.
    Data(u64),
    /// After a chunk's data, before its CRLF.
    DataEnd,
    /// After the last chunk: trailer lines, then an empty line.
    Trailers,
}

/// What the next bytes of a chunked body are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Chunk {
    /// Nothing can be decided from these bytes: read more.
    NeedMore,
    /// The next `n` bytes belong to the body (sizes, data, CRLFs, trailers); more follows.
    Pass(usize),
    /// The next `n` bytes end the body.
    End(usize),
}

/// A chunked body that breaks the coding: a size that is not hexadecimal or overflows, a
/// missing CRLF, a line over the limit, or trailers that break the header rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct InvalidChunk;

impl Chunked {
    /// A body whose first chunk-size line comes next.
    pub(crate) fn new() -> Chunked {
        Chunked {
            state: State::Size,
            trailer_bytes: 0,
        }
    }

    /// Says what the first bytes of `input` are; the caller passes them on and calls again with
    /// what follows.
    pub(crate) fn step(&mut self, input: &[u8]) -> Result<Chunk, InvalidChunk> {
        match self.state {
            State::Size => {
                let Some(len) = line(input)? else {
                    return Ok(Chunk::NeedMore);
                };
                let size = chunk_size(input.get(..len - 2).ok_or(InvalidChunk)?)?;
                self.state = if size == 0 {
                    State::Trailers
                } else {
                    State::Data(size)
                };
                Ok(Chunk::Pass(len))
            }
            State::Data(left) => {
                if input.is_empty() {
                    return Ok(Chunk::NeedMore);
                }
                let n = usize::try_from(left).map_or(input.len(), |left| left.min(input.len()));
                let left = left - n as u64;
                self.state = if left == 0 {
                    State::DataEnd
                } else {
                    State::Data(left)
                };
                Ok(Chunk::Pass(n))
            }
            State::DataEnd => match input {
                [b'\r', b'\n', ..] => {
                    self.state = State::Size;
                    Ok(Chunk::Pass(2))
                }
                [] | [b'\r'] => Ok(Chunk::NeedMore),
                _ => Err(InvalidChunk),
            },
            State::Trailers => {
                let Some(len) = line(input)? else {
                    return Ok(Chunk::NeedMore);
                };
                if len == 2 {
                    return Ok(Chunk::End(2));
                }
                // A trailer is a header line: no folding, no bare CR, no NUL.
                let text = input.get(..len - 2).ok_or(InvalidChunk)?;
                if matches!(text.first(), Some(b' ' | b'\t'))
                    || text.iter().any(|&b| b == b'\r' || b == 0)
                    || !text.contains(&b':')
                {
                    return Err(InvalidChunk);
                }
                self.trailer_bytes += len;
                if self.trailer_bytes > MAX_TRAILERS {
                    return Err(InvalidChunk);
                }
                Ok(Chunk::Pass(len))
            }
        }
    }
}

/// The length of the CRLF-terminated line at the start of `input`, CRLF included; `None` if it
/// has not ended yet. A bare LF, or a line over [`MAX_LINE`], is refused.
fn line(input: &[u8]) -> Result<Option<usize>, InvalidChunk> {
    let window = input.get(..MAX_LINE).unwrap_or(input);
    match window.iter().position(|&b| b == b'\n') {
        Some(at) if at > 0 && window.get(at - 1) == Some(&b'\r') => Ok(Some(at + 1)),
        Some(_) => Err(InvalidChunk),
        None if input.len() >= MAX_LINE => Err(InvalidChunk),
        None => Ok(None),
    }
}

/// The size in a chunk-size line (without its CRLF): 1 to 16 hex digits, then nothing or
/// optional whitespace and `;` extensions of visible characters.
fn chunk_size(text: &[u8]) -> Result<u64, InvalidChunk> {
    let digits = text.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return Err(InvalidChunk);
    }
    let (hex, rest) = text.split_at(digits);
    let ext = rest.trim_ascii_start();
    let ext_ok = rest.is_empty()
        || (ext.first() == Some(&b';')
            && ext
                .iter()
                .all(|&b| b == b' ' || b == b'\t' || b.is_ascii_graphic()));
    if !ext_ok {
        return Err(InvalidChunk);
    }
    hex.iter().try_fold(0u64, |size, &b| {
        let digit = char::from(b).to_digit(16).ok_or(InvalidChunk)?;
        size.checked_mul(16)
            .and_then(|s| s.checked_add(u64::from(digit)))
            .ok_or(InvalidChunk)
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::indexing_slicing, clippy::unwrap_used)]
    use super::*;

    /// Runs a whole body through, `split` bytes at most per call; returns the bytes passed
    /// before the end, or the error.
    fn frame(body: &[u8], split: usize) -> Result<usize, InvalidChunk> {
        let mut chunked = Chunked::new();
        let mut at = 0;
        let mut available = split.min(body.len());
        loop {
            match chunked.step(&body[at..available])? {
                Chunk::NeedMore => {
                    assert!(available < body.len(), "need more at the end");
                    available = (available + split).min(body.len());
                }
                Chunk::Pass(n) => {
                    assert!(n > 0);
                    at += n;
                }
                Chunk::End(n) => return Ok(at + n),
            }
            available = available.max(at);
        }
    }

    #[test]
    fn bodies_end_where_they_end_at_every_split() {
        let body =
            b"5\r\nhello\r\n1a;name=value\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nTrailer: x\r\n\r\n";
        for split in 1..=body.len() {
            assert_eq!(frame(body, split), Ok(body.len()), "split {split}");
        }
        let mut with_more = body.to_vec();
        with_more.extend(b"GET / HTTP/1.1\r\n");
        assert_eq!(frame(&with_more, 7).ok(), Some(body.len()));
    }

    #[test]
    fn invalid_chunks() {
        for body in [
            &b"x\r\n"[..],
            b"-1\r\n",
            b"0x5\r\nhello\r\n0\r\n\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloXX0\r\n\r\n",
            b"5 \r\nhello\r\n0\r\n\r\n",
            b"11111111111111111\r\n",
            b"5\r\nhello\r\n0\r\n folded\r\n\r\n",
            b"5\r\nhello\r\n0\r\nbare\rcr: x\r\n\r\n",
            b"5;\x00\r\n",
        ] {
            assert_eq!(
                frame(body, body.len()),
                Err(InvalidChunk),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
        assert_eq!(frame(&vec![b'1'; MAX_LINE + 1], 100), Err(InvalidChunk));
    }
}
