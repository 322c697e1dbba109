//! HTTP/1.1 on the wire for braid's upstream client: a request written in one
//! buffer, a response head parsed with `httparse`, and the body's framing decided as
//! RFC 9112 §6.3 says (HEAD, 1xx, 204 and 304 have none; chunked wins over a length
//! and then the connection is not reused; a length; else to the close). Pure
//! functions over byte buffers, so the property tests drive them directly.

use std::mem::MaybeUninit;

pub use crate::http1::chunked::{ChunkError, Chunked, Decoded};
use crate::http1::fields::{content_length, only_persistence, tokens};
use crate::http1::names::Names;

use bytes::{Buf, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};

/// A response head longer than this is refused (502): hyper's limit for a client
/// is in the same range, and no inference server needs more.
pub const MAX_HEAD: usize = 64 * 1024;
/// At most this many response header lines (and trailer lines).
pub const MAX_HEADERS: usize = 128;

/// Why a backend's bytes are not an HTTP/1.1 response braid will pass on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("malformed response head: {0}")]
    Head(String),
    #[error("response head over {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("malformed chunked body: {0}")]
    Chunk(&'static str),
    #[error("the backend closed the connection before the response ended")]
    Truncated,
}

/// How the body after a head is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// Until the backend closes the connection.
    Close,
}

#[derive(Debug)]
pub struct Head {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub framing: Framing,
    /// The connection may carry another request once this body has been read.
    pub keep_alive: bool,
}

#[derive(Debug)]
pub enum Parsed {
    /// More bytes are needed.
    Partial,
    /// A 1xx interim response, taken off the buffer, to be skipped.
    Interim,
    /// The final head, taken off the buffer.
    Head(Head),
}

/// Parses the response head at the front of `buf` and takes it off (an interim 1xx
/// head is taken off and reported); `method` is the request's. Header values share
/// the head's bytes rather than copying them.
pub fn parse_head(buf: &mut BytesMut, method: &Method) -> Result<Parsed, WireError> {
    // Left uninitialised: zeroing 128 slots would cost more than parsing a short head.
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut resp, buf, &mut slots);
    let used = match parsed {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Err(WireError::HeadTooLarge);
        }
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(WireError::Head(format!("more than {MAX_HEADERS} headers")));
        }
        Err(e) => return Err(WireError::Head(e.to_string())),
    };
    if used > MAX_HEAD {
        return Err(WireError::HeadTooLarge);
    }
    let code = resp.code.unwrap_or(0);
    let status =
        StatusCode::from_u16(code).map_err(|_| WireError::Head(format!("status {code}")))?;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Err(WireError::Head(
            "101 to a request that asked no upgrade".into(),
        ));
    }
    if status.is_informational() {
        buf.advance(used);
        return Ok(Parsed::Interim);
    }
    let version = match resp.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    // Where each name and value lies in the head, to slice them out of it once frozen.
    let base = buf.as_ptr() as usize;
    let mut spans = SPANS.take();
    spans.clear();
    let mut names = NAMES.take();
    let mut seen = Seen::default();
    for (place, h) in resp.headers.iter().enumerate() {
        let name = names
            .name(place, h.name.as_bytes())
            .map_err(|_| WireError::Head(format!("header name {:?}", h.name)))?;
        seen.note(&name, h.value)?;
        // `Connection: keep-alive` (or `close`) is this hop's and read already: kept
        // out of the map, so nothing has to take it out again.
        if name == header::CONNECTION && only_persistence(h.value) {
            continue;
        }
        let at = h.value.as_ptr() as usize - base;
        spans.push((name, at..at + h.value.len()));
    }
    NAMES.set(names);
    let head = buf.split_to(used).freeze();
    let mut headers = HeaderMap::with_capacity(spans.len());
    for (name, span) in spans.drain(..) {
        let value = HeaderValue::from_maybe_shared(head.slice(span))
            .map_err(|_| WireError::Head(format!("value of {name}")))?;
        headers.append(name, value);
    }
    SPANS.set(spans);
    Ok(finish_head(status, version, method, headers, seen))
}

thread_local! {
    /// Where each header lies in the head being parsed: reused, so a response head
    /// costs no allocation of its own beyond its map.
    static SPANS: std::cell::RefCell<Vec<(HeaderName, std::ops::Range<usize>)>> =
        const { std::cell::RefCell::new(Vec::new()) };
    /// The header names backends answered with before (the same few, in the same order).
    static NAMES: std::cell::RefCell<Names> = std::cell::RefCell::new(Names::default());
}

fn finish_head(
    status: StatusCode,
    version: Version,
    method: &Method,
    headers: HeaderMap,
    seen: Seen,
) -> Parsed {
    let (framing, mut keep_alive) = seen.framing(status, method);
    keep_alive &= match version {
        Version::HTTP_10 => seen.keep_alive,
        _ => !seen.close,
    };
    let head = Head {
        status,
        version,
        headers,
        framing,
        keep_alive,
    };
    Parsed::Head(head)
}

/// What the framing headers said, noted as the head is read (no lookups after).
#[derive(Default)]
struct Seen {
    /// Transfer-Encoding was present; whether its last coding is chunked.
    chunked: Option<bool>,
    length: Option<u64>,
    close: bool,
    keep_alive: bool,
}

impl Seen {
    fn note(&mut self, name: &HeaderName, value: &[u8]) -> Result<(), WireError> {
        if name == header::TRANSFER_ENCODING {
            if let Some(last) = tokens(value).next_back() {
                self.chunked = Some(last.eq_ignore_ascii_case(b"chunked"));
            }
        } else if name == header::CONTENT_LENGTH {
            for part in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                let n = content_length(part)
                    .ok_or_else(|| WireError::Head("invalid content-length".into()))?;
                if self.length.is_some_and(|l| l != n) {
                    return Err(WireError::Head("conflicting content-length values".into()));
                }
                self.length = Some(n);
            }
        } else if name == header::CONNECTION {
            for t in tokens(value) {
                self.close |= t.eq_ignore_ascii_case(b"close");
                self.keep_alive |= t.eq_ignore_ascii_case(b"keep-alive");
            }
        }
        Ok(())
    }

    /// The body's framing, and whether the connection can be reused after it.
    fn framing(&self, status: StatusCode, method: &Method) -> (Framing, bool) {
        if method == Method::HEAD
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            return (Framing::Empty, true);
        }
        match (self.chunked, self.length) {
            // A length beside the encoding is ignored, and the connection not trusted
            // again.
            (Some(true), length) => (Framing::Chunked, length.is_none()),
            (Some(false), _) => (Framing::Close, false),
            (None, Some(n)) => (Framing::Length(n), true),
            (None, None) => (Framing::Close, false),
        }
    }
}

/// A request head in HTTP/1.1: the request line in origin form, `host` (the
/// backend's, whatever the headers say), every header except those `replaced` names
/// (written with their new values instead; `None` entries are ignored), and a
/// Content-Length of the body's
/// own size (any length or transfer coding in `headers` is ignored).
pub fn encode_request(
    method: &Method,
    path: &str,
    host: &HeaderValue,
    headers: &HeaderMap,
    replaced: &[Option<(&HeaderName, &[u8])>],
    body_len: usize,
    out: &mut Vec<u8>,
) {
    let line = |out: &mut Vec<u8>, name: &[u8], value: &[u8]| {
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    };
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    line(out, b"host", host.as_bytes());
    for (name, value) in headers {
        if name == header::HOST
            || name == header::CONTENT_LENGTH
            || name == header::TRANSFER_ENCODING
            || replaced.iter().flatten().any(|(n, _)| *n == name)
        {
            continue;
        }
        line(out, name.as_str().as_bytes(), value.as_bytes());
    }
    for (name, value) in replaced.iter().flatten() {
        line(out, name.as_str().as_bytes(), value);
    }
    let bodiless = matches!(
        *method,
        Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS | Method::TRACE
    );
    if body_len > 0 || !bodiless {
        line(
            out,
            b"content-length",
            itoa::Buffer::new().format(body_len).as_bytes(),
        );
    }
    out.extend_from_slice(b"\r\n");
}

impl From<ChunkError> for WireError {
    fn from(e: ChunkError) -> WireError {
        WireError::Chunk(e.0)
    }
}
