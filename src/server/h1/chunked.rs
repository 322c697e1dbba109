//! A chunked body's decoder (RFC 9112 §7.1), shared by the listener (request bodies)
//! and the upstream client (response bodies): fed from a connection's read buffer, it
//! takes off what it returns, so a body split anywhere across reads decodes the same.
//! Sizes are hex of at most 16 digits (no overflow), each chunk's data must end in
//! CRLF, and the trailer section is bounded like a head.

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

/// A chunked body's decoder, fed from the connection's read buffer.
#[derive(Debug, Default)]
pub struct Chunked {
    state: ChunkState,
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
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// The next thing the buffer holds; consumes what it returns.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, ChunkError> {
        loop {
            match self.state {
                ChunkState::Size => match httparse::parse_chunk_size(buf) {
                    Ok(httparse::Status::Complete((used, size))) => {
                        buf.advance(used);
                        self.state = if size == 0 {
                            ChunkState::Trailers
                        } else {
                            ChunkState::Data(size)
                        };
                    }
                    Ok(httparse::Status::Partial) if buf.len() > MAX_CHUNK_LINE => {
                        return Err(ChunkError("chunk-size line too long"));
                    }
                    Ok(httparse::Status::Partial) => return Ok(Decoded::NeedMore),
                    Err(_) => return Err(ChunkError("invalid chunk size")),
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
                        Ok(httparse::Status::Partial) if buf.len() > MAX_TRAILERS_BYTES => {
                            return Err(ChunkError("trailer section too large"));
                        }
                        Ok(httparse::Status::Partial) => return Ok(Decoded::NeedMore),
                        Err(_) => return Err(ChunkError("malformed trailers")),
                    };
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
