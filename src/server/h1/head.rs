//! An HTTP/1.1 request head parsed with `httparse` into what the request path needs
//! (method, target, version, a `HeaderMap` whose values share the head's bytes), its
//! body's framing decided as RFC 9112 §6 says with every ambiguous form refused, and a
//! response head written into one buffer. Pure functions over byte buffers, so the
//! property tests drive them directly.
//!
//! Refused, and why:
//! - a head over the byte or line limit: 431 (what hyper answers);
//! - `Content-Length` with `Transfer-Encoding`, or two `Content-Length` lines: 400
//!   (hyper would pick one and go on; a proxy must not, RFC 9112 §6.3 and §11.2);
//! - a transfer coding other than a lone `chunked`: 501 (braid would not apply it);
//! - `Transfer-Encoding` from an HTTP/1.0 client, a length that is not all digits,
//!   obsolete line folding, a bare CR, a malformed line or target: 400;
//! - `CONNECT`: 400 (braid proxies requests, not tunnels).

use std::mem::MaybeUninit;
use std::ops::Range;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Uri, Version, request, response};

use crate::error::ProxyError;
pub use crate::http1::fields::{content_length, only_persistence, tokens};

/// Header lines parsed into a stack array up to this many (a larger `--max-headers`
/// uses the heap).
const STACK_HEADERS: usize = 128;

/// The limits a head is read under.
#[derive(Debug, Clone, Copy)]
pub struct HeadLimits {
    /// More header lines than this is 431.
    pub max_headers: usize,
    /// A head longer than this is 431.
    pub max_bytes: usize,
}

/// How a request's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// This many bytes (0: no body).
    Length(u64),
    Chunked,
}

#[derive(Debug)]
pub struct RequestHead {
    pub parts: request::Parts,
    pub framing: Framing,
    /// The client allows another request on the connection after this one.
    pub keep_alive: bool,
    /// `Expect: 100-continue`: the client waits for a 100 before it sends its body.
    pub expect_continue: bool,
}

/// What one connection's parses share: room for where each header lies in the head
/// (so parsing allocates nothing of its own after the first request), the header names
/// read before, and the last request target read (a keep-alive client mostly asks for
/// the same path again: its `Uri` is then cloned, not parsed).
#[derive(Default)]
pub struct Scratch {
    spans: Vec<(HeaderName, Range<usize>)>,
    /// The target's bytes (a copy of its own, so no old head stays pinned) and its URI.
    last_target: Option<(Bytes, Uri)>,
    /// The header names the connection's client sent before.
    names: crate::http1::names::Names,
}

impl Scratch {
    pub fn new() -> Scratch {
        Scratch::default()
    }
}

/// Parses the request head at the front of `buf` and takes it off; `Ok(None)` when more
/// bytes are needed. Leading empty lines are skipped, as RFC 9112 §2.2 allows.
pub fn parse_request(
    buf: &mut BytesMut,
    limits: &HeadLimits,
    scratch: &mut Scratch,
) -> Result<Option<RequestHead>, ProxyError> {
    if buf.is_empty() {
        return Ok(None);
    }
    let max = limits.max_headers.max(1);
    let scanned = if max <= STACK_HEADERS {
        // Left uninitialised: zeroing the slots would cost more than parsing a short head.
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; STACK_HEADERS];
        scan(buf, limits, scratch, &mut slots[..max])?
    } else {
        let mut slots: Vec<_> = std::iter::repeat_with(MaybeUninit::uninit)
            .take(max)
            .collect();
        scan(buf, limits, scratch, &mut slots)?
    };
    match scanned {
        Some(s) => finish(buf, s, scratch).map(Some),
        None => Ok(None),
    }
}

/// What the framing headers said, noted as the head is read.
#[derive(Default)]
struct Seen {
    te_lines: u32,
    /// Every Transfer-Encoding line's value was exactly `chunked`.
    te_chunked: bool,
    te_value: String,
    cl_lines: u32,
    length: Option<u64>,
    bad_length: bool,
    close: bool,
    keep_alive: bool,
    expect_continue: bool,
    host_lines: u32,
    bad_host: bool,
}

impl Seen {
    fn note(&mut self, name: &HeaderName, value: &[u8]) {
        if *name == header::CONTENT_LENGTH {
            self.cl_lines += 1;
            self.length = content_length(value);
            self.bad_length |= self.length.is_none();
        } else if *name == header::TRANSFER_ENCODING {
            self.te_lines += 1;
            self.te_chunked = (self.te_lines == 1) && value.eq_ignore_ascii_case(b"chunked");
            self.te_value = String::from_utf8_lossy(value).into_owned();
        } else if *name == header::CONNECTION {
            for t in tokens(value) {
                self.close |= t.eq_ignore_ascii_case(b"close");
                self.keep_alive |= t.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if *name == header::EXPECT {
            self.expect_continue |= value.eq_ignore_ascii_case(b"100-continue");
        } else if *name == header::HOST {
            self.host_lines += 1;
            self.bad_host |= !valid_host(value);
        }
    }

    /// RFC 9112 §3.2: 400 for an HTTP/1.1 request without `Host`, and for any with
    /// two, or one that is not `host[:port]`.
    fn host(&self, version: Version) -> Result<(), ProxyError> {
        let why = match (self.host_lines, version) {
            (0, Version::HTTP_11) => "an HTTP/1.1 request must have a Host header",
            (0, _) => return Ok(()),
            (1, _) if self.bad_host => "the Host header is not a valid host[:port]",
            (1, _) => return Ok(()),
            _ => "the Host header appears more than once",
        };
        Err(ProxyError::BadRequest(why.into()))
    }

    fn framing(&self, version: Version) -> Result<Framing, ProxyError> {
        if (self.te_lines > 0 && self.cl_lines > 0) || self.cl_lines > 1 {
            return Err(ProxyError::Smuggling);
        }
        if self.te_lines > 0 {
            if version == Version::HTTP_10 {
                return Err(ProxyError::BadRequest(
                    "Transfer-Encoding in an HTTP/1.0 request".into(),
                ));
            }
            if !self.te_chunked {
                return Err(ProxyError::UnsupportedCoding(self.te_value.clone()));
            }
            return Ok(Framing::Chunked);
        }
        if self.bad_length {
            return Err(ProxyError::BadRequest("invalid Content-Length".into()));
        }
        Ok(Framing::Length(self.length.unwrap_or(0)))
    }
}

/// A complete head, as offsets into the buffer it was read from.
struct Scanned {
    used: usize,
    method: Method,
    version: Version,
    target: Range<usize>,
    framing: Framing,
    keep_alive: bool,
    expect_continue: bool,
}

/// Parses and judges the head in `buf`; names and where values lie go to `scratch`.
fn scan<'h>(
    buf: &'h [u8],
    limits: &HeadLimits,
    scratch: &mut Scratch,
    slots: &mut [MaybeUninit<httparse::Header<'h>>],
) -> Result<Option<Scanned>, ProxyError> {
    let too_large = || {
        ProxyError::HeadTooLarge(format!(
            "over {} bytes (--max-header-bytes)",
            limits.max_bytes
        ))
    };
    let mut req = httparse::Request::new(&mut []);
    let parsed =
        httparse::ParserConfig::default().parse_request_with_uninit_headers(&mut req, buf, slots);
    let used = match parsed {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > limits.max_bytes => return Err(too_large()),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(ProxyError::HeadTooLarge(format!(
                "more than {} header lines (--max-headers)",
                limits.max_headers
            )));
        }
        Err(e) => {
            return Err(ProxyError::BadRequest(format!(
                "malformed request head: {e}"
            )));
        }
    };
    if used > limits.max_bytes {
        return Err(too_large());
    }
    let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return Err(ProxyError::BadRequest("malformed request line".into()));
    };
    let method = Method::from_bytes(method.as_bytes())
        .map_err(|_| ProxyError::BadRequest("invalid method".into()))?;
    if method == Method::CONNECT {
        return Err(ProxyError::BadRequest(
            "CONNECT is not supported: braid proxies requests, not tunnels".into(),
        ));
    }
    let version = if minor == 0 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let base = buf.as_ptr() as usize;
    let span = |s: &[u8]| {
        let at = s.as_ptr() as usize - base;
        at..at + s.len()
    };
    let target = span(target.as_bytes());
    let mut seen = Seen::default();
    scratch.spans.clear();
    for (place, h) in req.headers.iter().enumerate() {
        let name = scratch
            .names
            .name(place, h.name.as_bytes())
            .map_err(|_| ProxyError::BadRequest(format!("invalid header name {:?}", h.name)))?;
        seen.note(&name, h.value);
        // `Connection: keep-alive` (or `close`) is this hop's and read already: kept
        // out of the map, so the request path has nothing to take out again.
        if name == header::CONNECTION && only_persistence(h.value) {
            continue;
        }
        scratch.spans.push((name, span(h.value)));
    }
    let framing = seen.framing(version)?;
    seen.host(version)?;
    let keep_alive = match version {
        Version::HTTP_10 => seen.keep_alive && !seen.close,
        _ => !seen.close,
    };
    Ok(Some(Scanned {
        used,
        method,
        version,
        target,
        framing,
        keep_alive,
        expect_continue: seen.expect_continue && version == Version::HTTP_11,
    }))
}

/// A `Host` value: empty (a target with no authority), or `uri-host [":" port]` with
/// no userinfo (RFC 9110 §7.2): an IP literal in brackets, or a name or IPv4 address of
/// unreserved and sub-delim characters (`http::uri::Authority` refuses `%` escapes, and
/// so does braid), then a port of digits that fits in 16 bits (`host:` is allowed).
/// Read by bytes: it runs on every request.
fn valid_host(value: &[u8]) -> bool {
    let (host, rest) = match value.first() {
        None => return true,
        Some(b'[') => match memchr::memchr(b']', value) {
            Some(end) => value.split_at(end + 1),
            None => return false,
        },
        Some(_) => {
            let end = memchr::memchr(b':', value).unwrap_or(value.len());
            value.split_at(end)
        }
    };
    let host_ok = match host {
        [b'[', inner @ .., b']'] => {
            !inner.is_empty()
                && inner
                    .iter()
                    .all(|&b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.'))
        }
        // A reg-name may be empty (RFC 3986), as `Authority` reads it.
        _ => host.iter().all(|&b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'-' | b'.'
                        | b'_'
                        | b'~'
                        | b'!'
                        | b'$'
                        | b'&'
                        | b'\''
                        | b'('
                        | b')'
                        | b'*'
                        | b'+'
                        | b','
                        | b';'
                        | b'='
                )
        }),
    };
    let port_ok = match rest {
        [] | [b':'] => true,
        [b':', digits @ ..] => content_length(digits).is_some_and(|p| p <= u64::from(u16::MAX)),
        _ => false,
    };
    host_ok && port_ok
}

/// Takes the scanned head off the buffer; its target and values share its bytes.
fn finish(
    buf: &mut BytesMut,
    s: Scanned,
    scratch: &mut Scratch,
) -> Result<RequestHead, ProxyError> {
    let head = buf.split_to(s.used).freeze();
    let method = s.method;
    let target = &head[s.target];
    // `*` is never remembered: it is valid only with OPTIONS, which the next request
    // may not be.
    let uri = match &scratch.last_target {
        Some((last, uri)) if last[..] == *target && target != b"*" => uri.clone(),
        _ => {
            let owned = Bytes::copy_from_slice(target);
            let uri = parse_target(owned.clone(), &method)?;
            scratch.last_target = Some((owned, uri.clone()));
            uri
        }
    };
    let mut headers = HeaderMap::with_capacity(scratch.spans.len());
    for (name, span) in scratch.spans.drain(..) {
        let value = HeaderValue::from_maybe_shared(head.slice(span))
            .map_err(|_| ProxyError::BadRequest(format!("invalid value of {name}")))?;
        headers.append(name, value);
    }
    let (mut parts, ()) = Request::new(()).into_parts();
    parts.method = method;
    parts.uri = uri;
    parts.version = s.version;
    parts.headers = headers;
    Ok(RequestHead {
        parts,
        framing: s.framing,
        keep_alive: s.keep_alive,
        expect_continue: s.expect_continue,
    })
}

/// Origin form (`/path?q`), `*` (OPTIONS) or absolute form (`http://host/path`).
fn parse_target(target: Bytes, method: &Method) -> Result<Uri, ProxyError> {
    let origin = target.first() == Some(&b'/');
    Uri::from_maybe_shared(target)
        .ok()
        .filter(|u| origin || u.scheme().is_some() || (u == "*" && method == Method::OPTIONS))
        .ok_or_else(|| ProxyError::BadRequest("invalid request target".into()))
}

/// How a response's body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Out {
    /// No body is written (HEAD, 1xx, 204, 304).
    None,
    Length(u64),
    Chunked,
    /// Until the connection closes (an HTTP/1.0 client and no length known).
    Close,
}

/// The framing of a response: `exact` is the body's exact size when known. A length
/// the handler set is kept on a HEAD or 304 answer (it describes the resource), and
/// trusted for a body whose size is not known otherwise.
pub fn response_framing(
    status: StatusCode,
    head_request: bool,
    headers: &HeaderMap,
    exact: Option<u64>,
    http10: bool,
) -> Out {
    if status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
        || head_request
    {
        return Out::None;
    }
    if let Some(n) = exact {
        return Out::Length(n);
    }
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    match declared {
        Some(n) => Out::Length(n),
        None if http10 => Out::Close,
        None => Out::Chunked,
    }
}

/// Whether the handler asked for the connection to close after this response.
pub fn asks_close(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .any(|v| tokens(v.as_bytes()).any(|t| t.eq_ignore_ascii_case(b"close")))
}

/// One header line, room made once.
#[inline(always)]
fn line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.reserve(name.len() + value.len() + 4);
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Writes the status line and headers: the handler's, a `date` unless it set one, the
/// framing header `out` calls for (the handler's own length or coding replaced), and
/// `connection: close` or, to an HTTP/1.0 client kept open, `keep-alive`.
pub fn encode_response_head(
    parts: &response::Parts,
    framing: Out,
    keep_alive: bool,
    http10: bool,
    date: impl FnOnce() -> [u8; 29],
    out: &mut Vec<u8>,
) {
    if parts.status == StatusCode::OK {
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(parts.status.as_str().as_bytes());
        out.push(b' ');
        let reason = parts.status.canonical_reason().unwrap_or("Unknown");
        out.extend_from_slice(reason.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    // A length stays only on a bodiless answer to a HEAD or a 304 (it describes the
    // resource); a transfer coding is only ever braid's own.
    let drop_length = !matches!(framing, Out::None)
        || parts.status == StatusCode::NO_CONTENT
        || parts.status.is_informational();
    let mut has_date = false;
    for (name, value) in &parts.headers {
        if *name == header::CONNECTION
            || *name == header::TRANSFER_ENCODING
            || (drop_length && *name == header::CONTENT_LENGTH)
        {
            continue;
        }
        has_date |= *name == header::DATE;
        line(out, name.as_str().as_bytes(), value.as_bytes());
    }
    // The backend's own date is passed on (most send one): the clock is read only
    // for an answer without.
    if !has_date {
        line(out, b"date", &date());
    }
    match framing {
        Out::Length(n) => line(
            out,
            b"content-length",
            itoa::Buffer::new().format(n).as_bytes(),
        ),
        Out::Chunked => line(out, b"transfer-encoding", b"chunked"),
        Out::None | Out::Close => {}
    }
    if !keep_alive {
        line(out, b"connection", b"close");
    } else if http10 {
        line(out, b"connection", b"keep-alive");
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
#[path = "head_tests.rs"]
mod tests;
