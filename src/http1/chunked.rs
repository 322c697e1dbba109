//! A chunked body's decoder (RFC 9112 §7.1), shared by the listener (request bodies)
//! and the upstream client (response bodies): fed from a connection's read buffer, it
//! takes off what it returns, so a body split anywhere across reads decodes the same.
//!
//! Read strictly, so that no proxy before or after braid can read the same bytes as
//! another message:
//! - a size is hex digits (leading zeros allowed, as hyper allows them), refused as
//!   soon as it passes the body limit or `u64`, not once its bytes arrive;
//! - spaces or tabs may follow it; extensions (`;name=value`, which braid drops) hold
//!   no control bytes, and the line ends in CRLF: a bare LF or CR anywhere on it is
//!   refused (hyper refuses a bare LF in an extension too);
//! - each chunk's data ends in CRLF;
//! - the trailer section is bounded like a head, and every line of it, the empty one
//!   that ends the body included, ends in CRLF (`0\r\n\n` is refused, not read as the
//!   body's end followed by another request).

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};

/// A chunk-size line (extensions included) longer than this is refused.
const MAX_CHUNK_LINE: usize = 4096;
/// At most this many trailer lines.
const MAX_HEADERS: usize = 128;
/// A trailer section longer than this is refused.
const MAX_TRAILERS_BYTES: usize = 64 * 1024;

/// Why the bytes are not a chunked body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed chunked body: {0}")]
pub struct ChunkError(pub &'static str);

/// The error a chunk larger than the body's limit is refused with (413, not 400).
pub const TOO_LARGE: &str = "a chunk larger than the body limit";

impl ChunkError {
    /// Whether the body was refused for its size rather than its framing.
    pub fn too_large(&self) -> bool {
        self.0 == TOO_LARGE
    }
}

/// A chunked body's decoder, fed from the connection's read buffer.
#[derive(Debug)]
pub struct Chunked {
    state: ChunkState,
    /// Bytes the body may still hold: a chunk size past it is refused as it is read.
    room: u64,
}

impl Default for Chunked {
    fn default() -> Chunked {
        Chunked::with_limit(u64::MAX)
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    Data(u64),
    DataEnd,
    Trailers,
    Done,
}

#[derive(Debug, PartialEq)]
pub enum Decoded {
    Data(Bytes),
    Trailers(HeaderMap),
    /// The last chunk and an empty trailer section: the body is over.
    End,
    NeedMore,
}

impl Chunked {
    /// A decoder for a body of at most `limit` bytes.
    pub fn with_limit(limit: u64) -> Chunked {
        Chunked {
            state: ChunkState::default(),
            room: limit,
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// The next thing the buffer holds; consumes what it returns.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, ChunkError> {
        loop {
            match self.state {
                ChunkState::Size => match size_line(buf, self.room)? {
                    Some((used, size)) => {
                        buf.advance(used);
                        self.room -= size;
                        self.state = if size == 0 {
                            ChunkState::Trailers
                        } else {
                            ChunkState::Data(size)
                        };
                    }
                    None => return Ok(Decoded::NeedMore),
                },
                ChunkState::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let take = left.min(buf.len() as u64) as usize;
                    let data = buf.split_to(take).freeze();
                    let left = left - take as u64;
                    self.state = match left {
                        0 => ChunkState::DataEnd,
                        n => ChunkState::Data(n),
                    };
                    return Ok(Decoded::Data(data));
                }
                ChunkState::DataEnd => {
                    if buf.len() < 2 {
                        return Ok(Decoded::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(ChunkError("chunk data not followed by CRLF"));
                    }
                    buf.advance(2);
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailers => {
                    if buf.starts_with(b"\r\n") {
                        buf.advance(2);
                        self.state = ChunkState::Done;
                        return Ok(Decoded::End);
                    }
                    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
                    let used = match httparse::parse_headers(buf, &mut slots) {
                        Ok(httparse::Status::Complete((used, _))) => used,
                        Ok(httparse::Status::Partial) if bare_lf(buf) => {
                            return Err(ChunkError("a trailer line not ended by CRLF"));
                        }
                        Ok(httparse::Status::Partial) if buf.len() > MAX_TRAILERS_BYTES => {
                            return Err(ChunkError("trailer section too large"));
                        }
                        Ok(httparse::Status::Partial) => return Ok(Decoded::NeedMore),
                        Err(_) => return Err(ChunkError("malformed trailers")),
                    };
                    if bare_lf(&buf[..used]) {
                        return Err(ChunkError("a trailer line not ended by CRLF"));
                    }
                    let mut trailers = HeaderMap::new();
                    for h in slots.iter().take_while(|h| !h.name.is_empty()) {
                        if let (Ok(n), Ok(v)) = (
                            HeaderName::from_bytes(h.name.as_bytes()),
                            HeaderValue::from_bytes(h.value),
                        ) {
                            trailers.append(n, v);
                        }
                    }
                    buf.advance(used);
                    self.state = ChunkState::Done;
                    return Ok(Decoded::Trailers(trailers));
                }
                ChunkState::Done => return Ok(Decoded::End),
            }
        }
    }
}

/// Whether `bytes` holds an LF that no CR comes just before.
fn bare_lf(bytes: &[u8]) -> bool {
    memchr::memchr_iter(b'\n', bytes).any(|i| i == 0 || bytes[i - 1] != b'\r')
}

/// A chunk-size line at the front of `buf`: its length with its CRLF and the size, or
/// `None` when it has not all arrived. `room` is what the body may still hold.
fn size_line(buf: &[u8], room: u64) -> Result<Option<(usize, u64)>, ChunkError> {
    let mut size: u64 = 0;
    let mut i = 0;
    while let Some(d) = buf.get(i).and_then(|&b| (b as char).to_digit(16)) {
        size = size
            .checked_mul(16)
            .and_then(|s| s.checked_add(u64::from(d)))
            .ok_or(ChunkError("chunk size past 64 bits"))?;
        if size > room {
            return Err(ChunkError(TOO_LARGE));
        }
        i += 1;
        if i > MAX_CHUNK_LINE {
            return Err(ChunkError("chunk-size line too long"));
        }
    }
    if i == buf.len() {
        return Ok(None);
    }
    if i == 0 {
        return Err(ChunkError("invalid chunk size"));
    }
    // Spaces or tabs, then extensions: anything but control bytes, up to CRLF.
    let mut in_ext = false;
    loop {
        let Some(&b) = buf.get(i) else {
            return match i > MAX_CHUNK_LINE {
                true => Err(ChunkError("chunk-size line too long")),
                false => Ok(None),
            };
        };
        match b {
            b'\r' => {
                return match buf.get(i + 1) {
                    None => Ok(None),
                    Some(b'\n') => Ok(Some((i + 2, size))),
                    Some(_) => Err(ChunkError("a bare CR in a chunk-size line")),
                };
            }
            b'\n' => return Err(ChunkError("a chunk-size line not ended by CRLF")),
            b';' => in_ext = true,
            b' ' | b'\t' => {}
            0..=0x1f | 0x7f => return Err(ChunkError("a control byte in a chunk extension")),
            _ if in_ext => {}
            _ => return Err(ChunkError("invalid chunk size")),
        }
        i += 1;
        if i > MAX_CHUNK_LINE {
            return Err(ChunkError("chunk-size line too long"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The body `wire` decodes to, or the first error.
    fn decode(wire: &[u8], limit: u64) -> Result<Vec<u8>, ChunkError> {
        let mut dec = Chunked::with_limit(limit);
        let mut buf = BytesMut::from(wire);
        let mut body = Vec::new();
        loop {
            match dec.decode(&mut buf)? {
                Decoded::Data(d) => body.extend_from_slice(&d),
                Decoded::Trailers(_) | Decoded::End => return Ok(body),
                Decoded::NeedMore => return Err(ChunkError("ended early")),
            }
        }
    }

    #[test]
    fn size_lines_are_read_as_the_standard_says() {
        for (wire, body) in [
            (&b"3\r\nabc\r\n0\r\n\r\n"[..], &b"abc"[..]),
            (b"3;foo=bar\r\nabc\r\n0\r\n\r\n", b"abc"),
            (b"3 ; foo=\"a b\"\r\nabc\r\n0\r\n\r\n", b"abc"),
            (b"3\t\r\nabc\r\n0\r\n\r\n", b"abc"),
            // Leading zeros, however many (hyper reads them too).
            (b"00000000000000000000003\r\nabc\r\n0\r\n\r\n", b"abc"),
            (b"A\r\n0123456789\r\n0\r\nx-t: 1\r\n\r\n", b"0123456789"),
        ] {
            assert_eq!(
                decode(wire, 1 << 20).unwrap(),
                body,
                "{:?}",
                String::from_utf8_lossy(wire)
            );
        }
        for (wire, why) in [
            (&b"3;foo\nbar\r\nabc\r\n0\r\n\r\n"[..], "not ended by CRLF"),
            (b"3\nabc\r\n0\r\n\r\n", "not ended by CRLF"),
            (b"3\rabc\r\n0\r\n\r\n", "bare CR"),
            (b"3;a\x01\r\nabc\r\n0\r\n\r\n", "control byte"),
            (b"x\r\n", "invalid chunk size"),
            (b"3x\r\nabc\r\n", "invalid chunk size"),
            (b"ffffffffffffffffffff\r\n", "past 64 bits"),
            // After the last chunk, every line ends in CRLF.
            (
                b"3\r\nabc\r\n0\r\n\nGET /next HTTP/1.1\r\nHost: a\r\n\r\n",
                "trailer",
            ),
            (b"0\r\nx-t: 1\n\r\n", "trailer"),
            (b"0\r\nx-t: 1\r\n\n", "trailer"),
        ] {
            let err = decode(wire, u64::MAX).unwrap_err();
            assert!(
                err.0.contains(why),
                "{:?}: {err}",
                String::from_utf8_lossy(wire)
            );
        }
    }

    #[test]
    fn a_size_past_the_body_limit_is_refused_before_its_bytes_arrive() {
        // 2^64-1, and anything past the room left, as soon as its digits are read.
        let mut dec = Chunked::with_limit(1 << 20);
        let mut buf = BytesMut::from(&b"ffffffffffffffff"[..]);
        assert!(dec.decode(&mut buf).unwrap_err().too_large());
        assert!(decode(b"80001\r\n", 1 << 19).unwrap_err().too_large());
        // The room is what is left: two chunks that together pass it.
        let err = decode(b"4\r\nabcd\r\n4\r\nefgh\r\n0\r\n\r\n", 6).unwrap_err();
        assert!(err.too_large(), "{err}");
        assert_eq!(
            decode(b"4\r\nabcd\r\n2\r\nef\r\n0\r\n\r\n", 6).unwrap(),
            b"abcdef"
        );
    }

    #[test]
    fn a_line_split_anywhere_decodes_the_same() {
        let wire = b"0003;x=1\r\nabc\r\n0\r\nx-t: 1\r\n\r\n";
        for cut in 0..wire.len() {
            let mut dec = Chunked::default();
            let mut buf = BytesMut::from(&wire[..cut]);
            let mut body = Vec::new();
            let mut fed = false;
            loop {
                match dec.decode(&mut buf).unwrap() {
                    Decoded::Data(d) => body.extend_from_slice(&d),
                    Decoded::Trailers(_) | Decoded::End => break,
                    Decoded::NeedMore => {
                        assert!(!fed, "cut at {cut}: more wanted after all was fed");
                        buf.extend_from_slice(&wire[cut..]);
                        fed = true;
                    }
                }
            }
            assert_eq!(body, b"abc", "cut at {cut}");
        }
    }
}
