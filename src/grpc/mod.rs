//! gRPC on the wire, as much of it as a proxy needs without generated types: telling a
//! gRPC request apart, its length-prefixed message framing, `grpc-timeout`, status
//! codes and Trailers-Only answers, and reading or rewriting one string field of a
//! protobuf message while leaving every other byte as it was sent.
//!
//! The Open Inference Protocol's service is `inference.GRPCInferenceService`; its
//! requests that name a model carry the name in field 1 (`ModelInferRequest.model_name`,
//! `ModelMetadataRequest.name`, `ModelReadyRequest.name`).

pub mod oip;

/// The messages of `inference.GRPCInferenceService`, generated from
/// `inference.proto` at build time.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/inference.rs"));
}

use std::ops::Range;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::Response;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http_body_util::{BodyExt, Full};

use crate::error::{Body, ProxyError};

/// The service of the Open Inference Protocol over gRPC.
pub const SERVICE_PREFIX: &str = "/inference.GRPCInferenceService/";

pub static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
pub static GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
pub static GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// The status codes braid answers with (of gRPC's seventeen).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Code {
    Ok = 0,
    Cancelled = 1,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    ResourceExhausted = 8,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
}

impl Code {
    /// The code for an error braid would answer a REST client with this status: 400
    /// INVALID_ARGUMENT, 404 NOT_FOUND, 413 and 429 RESOURCE_EXHAUSTED, 503
    /// UNAVAILABLE, 504 DEADLINE_EXCEEDED, anything else INTERNAL (502 included).
    pub fn for_status(status: u16) -> Code {
        match status {
            200..=299 => Code::Ok,
            400 => Code::InvalidArgument,
            404 => Code::NotFound,
            413 | 429 => Code::ResourceExhausted,
            503 => Code::Unavailable,
            408 | 504 => Code::DeadlineExceeded,
            _ => Code::Internal,
        }
    }
}

/// The name of a `grpc-status` value, as gRPC's documentation spells it; a value
/// that is not a code is `UNKNOWN`, as a gRPC client reads it.
pub fn status_name(value: &[u8]) -> &'static str {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    std::str::from_utf8(value)
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .and_then(|i| NAMES.get(i).copied())
        .unwrap_or("UNKNOWN")
}

/// Whether a request is gRPC: `content-type: application/grpc` or `application/grpc+...`.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| is_grpc_type(v.as_bytes()))
}

fn is_grpc_type(ct: &[u8]) -> bool {
    ct.strip_prefix(b"application/grpc")
        .is_some_and(|rest| rest.is_empty() || rest[0] == b'+' || rest[0] == b';')
}

/// The headers of a Trailers-Only answer (HTTP 200, no body): the status travels in
/// the headers, which end the stream.
pub fn trailers_only(code: Code, message: &str) -> HeaderMap {
    let mut h = HeaderMap::with_capacity(3);
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert(GRPC_STATUS.clone(), HeaderValue::from(code as u16));
    if let Ok(v) = HeaderValue::from_str(&percent_encode(message)) {
        h.insert(GRPC_MESSAGE.clone(), v);
    }
    h
}

/// A Trailers-Only answer with this status.
pub fn status_response(code: Code, message: &str) -> Response<Body> {
    let mut resp = Response::new(crate::error::full(Bytes::new()));
    *resp.headers_mut() = trailers_only(code, message);
    resp
}

/// A braid error as a gRPC caller gets it: a Trailers-Only answer (HTTP 200, the
/// status in `grpc-status` and `grpc-message`), the code from the HTTP status a REST
/// caller would get (`Code::for_status`), `Retry-After` kept.
pub fn error_response(e: &ProxyError) -> Response<Body> {
    let code = Code::for_status(e.status().as_u16());
    let mut resp = status_response(code, &e.to_string());
    if let Some(secs) = e.retry_after() {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}

/// A unary call's successful answer: the message, then the trailers `grpc-status: 0`.
pub fn unary_ok(msg: &impl prost::Message) -> Response<Body> {
    let mut trailers = HeaderMap::with_capacity(1);
    trailers.insert(GRPC_STATUS.clone(), HeaderValue::from_static("0"));
    let body = Full::new(frame(&msg.encode_to_vec()))
        .with_trailers(async move { Some(Ok(trailers)) })
        .map_err(|never| match never {})
        .boxed();
    let mut resp = Response::new(body);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    resp
}

/// `grpc-message` encoding: printable ASCII other than `%` as is, every other byte of
/// the UTF-8 text as `%XX`.
pub fn percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for &b in message.as_bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A `grpc-timeout` value: at most 8 digits and a unit (H, M, S, m, u, n).
pub fn parse_timeout(v: &str) -> Option<Duration> {
    let (digits, unit) = v.split_at_checked(v.len().checked_sub(1)?)?;
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The time left as a `grpc-timeout` value, in the finest unit that fits 8 digits
/// (rounded down, at least 1n, so a backend never sees more time than there is).
pub fn format_timeout(left: Duration) -> HeaderValue {
    const MAX: u128 = 99_999_999;
    let nanos = left.as_nanos().max(1);
    let (n, unit) = if nanos <= MAX {
        (nanos, 'n')
    } else if nanos / 1_000 <= MAX {
        (nanos / 1_000, 'u')
    } else if nanos / 1_000_000 <= MAX {
        (nanos / 1_000_000, 'm')
    } else if nanos / 1_000_000_000 <= MAX {
        (nanos / 1_000_000_000, 'S')
    } else {
        ((nanos / 60_000_000_000).min(MAX), 'M')
    };
    HeaderValue::try_from(format!("{n}{unit}")).expect("digits and a letter")
}

/// The one message of a unary call's body (5-byte prefix: compressed flag, big-endian
/// length). Compressed messages cannot be read here.
pub fn unary_message(body: &[u8]) -> Result<&[u8], String> {
    let Some(len) = declared_len(body)? else {
        return Err(format!(
            "a gRPC message needs a 5-byte prefix; the body has {} bytes",
            body.len()
        ));
    };
    let rest = &body[5..];
    match rest.len().cmp(&len) {
        std::cmp::Ordering::Equal => Ok(rest),
        std::cmp::Ordering::Less => Err(format!(
            "the message prefix says {len} bytes; {} follow it",
            rest.len()
        )),
        std::cmp::Ordering::Greater => Err(format!(
            "a unary call's body holds one message; {} bytes follow it",
            rest.len() - len
        )),
    }
}

/// The first message of a stream's bytes so far, and how many bytes it took with its
/// prefix; `None` until all of it has arrived. Its declared length may be checked
/// before that with `declared_len`.
pub fn next_message(buf: &[u8]) -> Result<Option<(&[u8], usize)>, String> {
    let Some(len) = declared_len(buf)? else {
        return Ok(None);
    };
    Ok(buf.get(5..5 + len).map(|m| (m, 5 + len)))
}

/// The length the next message's prefix declares, once the prefix has arrived.
pub fn declared_len(buf: &[u8]) -> Result<Option<usize>, String> {
    let Some(head) = buf.get(..5) else {
        return Ok(None);
    };
    if head[0] != 0 {
        return Err(
            "compressed gRPC messages are not supported (send with compression off)".into(),
        );
    }
    Ok(Some(
        u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize,
    ))
}

/// A message with its 5-byte prefix.
pub fn frame(msg: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + msg.len());
    out.put_u8(0);
    out.put_u32(msg.len() as u32);
    out.put_slice(msg);
    out.freeze()
}

/// One field of a protobuf message as it lies in the bytes: its number, wire type,
/// where the whole field (tag included) is, and where its payload is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    pub number: u32,
    pub wire_type: u8,
    pub span: Range<usize>,
    pub payload: Range<usize>,
}

/// The top-level fields of a protobuf message, in order, read as they are asked for
/// (routing reads field 1 without collecting the rest); an error names what is
/// malformed and where, and ends the iteration.
pub fn fields(msg: &[u8]) -> impl Iterator<Item = Result<Field, String>> + '_ {
    let mut at = 0;
    let mut failed = false;
    std::iter::from_fn(move || {
        if failed || at >= msg.len() {
            return None;
        }
        let field = next_field(msg, &mut at);
        failed = field.is_err();
        Some(field)
    })
}

fn next_field(msg: &[u8], at: &mut usize) -> Result<Field, String> {
    let start = *at;
    let tag = varint(msg, at)?;
    let number = u32::try_from(tag >> 3)
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("field number {} at byte {start}", tag >> 3))?;
    let wire_type = (tag & 7) as u8;
    let payload_start;
    match wire_type {
        0 => {
            payload_start = *at;
            varint(msg, at)?;
        }
        1 | 5 => {
            payload_start = *at;
            *at += if wire_type == 1 { 8 } else { 4 };
        }
        2 => {
            let len = varint(msg, at)?;
            payload_start = *at;
            *at = usize::try_from(len)
                .ok()
                .and_then(|l| at.checked_add(l))
                .ok_or_else(|| format!("field {number} at byte {start}: length {len}"))?;
        }
        t => return Err(format!("field {number} at byte {start}: wire type {t}")),
    }
    if *at > msg.len() {
        return Err(format!(
            "field {number} at byte {start} runs past the message's {} bytes",
            msg.len()
        ));
    }
    Ok(Field {
        number,
        wire_type,
        span: start..*at,
        payload: payload_start..*at,
    })
}

fn varint(buf: &[u8], at: &mut usize) -> Result<u64, String> {
    let start = *at;
    let mut v: u64 = 0;
    for shift in (0..64).step_by(7) {
        let Some(&b) = buf.get(*at) else {
            return Err(format!("a varint at byte {start} runs past the message"));
        };
        *at += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(format!("a varint at byte {start} is longer than 10 bytes"))
}

/// A string field (the last one, as protobuf reads repeated scalars): its text, or
/// "" when absent.
pub fn string_field(msg: &[u8], number: u32) -> Result<&str, String> {
    let mut found = "";
    for f in fields(msg) {
        let f = f?;
        if f.number != number {
            continue;
        }
        if f.wire_type != 2 {
            return Err(format!("field {number} is not a string"));
        }
        found = std::str::from_utf8(&msg[f.payload])
            .map_err(|_| format!("field {number} is not UTF-8"))?;
    }
    Ok(found)
}

/// The message with every occurrence of string field `number` set to `value`
/// (appended when absent); all other bytes as they were.
pub fn with_string_field(msg: &[u8], number: u32, value: &str) -> Result<Vec<u8>, String> {
    let mut encoded = Vec::with_capacity(value.len() + 6);
    put_varint(&mut encoded, (u64::from(number) << 3) | 2);
    put_varint(&mut encoded, value.len() as u64);
    encoded.extend_from_slice(value.as_bytes());
    let mut out = Vec::with_capacity(msg.len() + value.len());
    let mut copied = 0;
    let mut replaced = false;
    for f in fields(msg) {
        let f = f?;
        if f.number != number {
            continue;
        }
        out.extend_from_slice(&msg[copied..f.span.start]);
        out.extend_from_slice(&encoded);
        copied = f.span.end;
        replaced = true;
    }
    out.extend_from_slice(&msg[copied..]);
    if !replaced {
        out.extend_from_slice(&encoded);
    }
    Ok(out)
}

pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names() {
        assert_eq!(status_name(b"0"), "OK");
        assert_eq!(status_name(b"14"), "UNAVAILABLE");
        assert_eq!(status_name(b"16"), "UNAUTHENTICATED");
        for odd in [&b"17"[..], b"", b"x", b"-1"] {
            assert_eq!(status_name(odd), "UNKNOWN");
        }
        for (code, name) in [
            (Code::Ok, "OK"),
            (Code::InvalidArgument, "INVALID_ARGUMENT"),
            (Code::Unavailable, "UNAVAILABLE"),
            (Code::Internal, "INTERNAL"),
        ] {
            assert_eq!(status_name((code as u8).to_string().as_bytes()), name);
        }
    }

    #[test]
    fn grpc_content_types() {
        for ct in [
            "application/grpc",
            "application/grpc+proto",
            "application/grpc;x=1",
        ] {
            assert!(is_grpc_type(ct.as_bytes()), "{ct}");
        }
        for ct in [
            "application/grpcx",
            "application/json",
            "application/grpc-web",
        ] {
            assert!(!is_grpc_type(ct.as_bytes()), "{ct}");
        }
    }

    #[test]
    fn timeouts_parse_and_format_in_the_finest_unit_that_fits() {
        assert_eq!(parse_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(
            parse_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in ["", "m", "123456789m", "1x", "-1S", "1.5S"] {
            assert_eq!(parse_timeout(bad), None, "{bad:?}");
        }
        assert_eq!(format_timeout(Duration::from_nanos(5)), "5n");
        assert_eq!(format_timeout(Duration::ZERO), "1n");
        assert_eq!(format_timeout(Duration::from_millis(250)), "250000u");
        assert_eq!(format_timeout(Duration::from_secs(300)), "300000m");
        assert_eq!(format_timeout(Duration::from_secs(86_400 * 2)), "172800S");
        for d in [7u64, 1_234_567, 98_765_432_100, 3_600_000_000_000] {
            let d = Duration::from_nanos(d);
            let back = parse_timeout(format_timeout(d).to_str().unwrap()).unwrap();
            assert!(back <= d && back.as_nanos() * 1001 / 1000 + 1 >= d.as_nanos());
        }
    }

    #[test]
    fn messages_are_framed_and_compression_is_refused() {
        let f = frame(b"abc");
        assert_eq!(&f[..], b"\0\0\0\0\x03abc");
        assert_eq!(unary_message(&f).unwrap(), b"abc");
        assert!(
            unary_message(b"\0\0\0\0\x04abc")
                .unwrap_err()
                .contains("says 4")
        );
        assert!(
            unary_message(b"\x01\0\0\0\x00")
                .unwrap_err()
                .contains("compressed")
        );
        assert!(
            unary_message(b"\0\0")
                .unwrap_err()
                .contains("5-byte prefix")
        );
        let two = [frame(b"a"), frame(b"b")].concat();
        assert!(unary_message(&two).unwrap_err().contains("one message"));
        assert_eq!(next_message(&two).unwrap(), Some((&b"a"[..], 6)));
        assert_eq!(next_message(&two[..5]).unwrap(), None);
        assert_eq!(declared_len(&two[..5]).unwrap(), Some(1));
        assert_eq!(next_message(&two[..3]).unwrap(), None);
        assert!(next_message(b"\x01\0\0\0\0").is_err());
    }

    /// `ModelInferRequest{model_name: "m", id: "x", inputs: [...]}` with a varint, a
    /// fixed64 and a fixed32 field thrown in.
    fn request(name: &str) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&[0x0a, name.len() as u8]);
        m.extend_from_slice(name.as_bytes());
        m.extend_from_slice(&[0x1a, 1, b'x']); // id = 3
        m.extend_from_slice(&[0x2a, 3, 0x0a, 1, b'i']); // inputs = 5 {name: "i"}
        m.extend_from_slice(&[0x40, 0x96, 0x01]); // field 8, varint 150
        m.extend_from_slice(&[0x49, 1, 2, 3, 4, 5, 6, 7, 8]); // field 9, fixed64
        m.extend_from_slice(&[0x55, 1, 2, 3, 4]); // field 10, fixed32
        m
    }

    #[test]
    fn field_one_is_read_and_rewritten_leaving_every_other_byte() {
        let m = request("model-a");
        assert_eq!(string_field(&m, 1).unwrap(), "model-a");
        assert_eq!(string_field(&m, 3).unwrap(), "x");
        assert_eq!(string_field(&m, 2).unwrap(), "");
        let out = with_string_field(&m, 1, "a-much-longer-target-model").unwrap();
        assert_eq!(string_field(&out, 1).unwrap(), "a-much-longer-target-model");
        assert_eq!(&out[2 + 26..], &m[2 + 7..], "the rest as sent");
        // Absent: appended.
        let without = &m[9..];
        let out = with_string_field(without, 1, "t").unwrap();
        assert_eq!(&out[..without.len()], without);
        assert_eq!(string_field(&out, 1).unwrap(), "t");
    }

    #[test]
    fn malformed_messages_are_errors_not_panics() {
        let m = request("model-a");
        for cut in 0..m.len() {
            fields(&m[..cut]).for_each(drop);
            let _ = with_string_field(&m[..cut], 1, "x");
        }
        assert!(
            fields(&[0x0a, 5, b'a'])
                .collect::<Result<Vec<_>, _>>()
                .unwrap_err()
                .contains("runs past")
        );
        assert!(
            fields(&[0x0b])
                .collect::<Result<Vec<_>, _>>()
                .unwrap_err()
                .contains("wire type 3")
        );
        assert!(
            fields(&[0x00])
                .collect::<Result<Vec<_>, _>>()
                .unwrap_err()
                .contains("field number 0")
        );
        assert!(
            fields(&[0x08, 0xff, 0xff])
                .collect::<Result<Vec<_>, _>>()
                .unwrap_err()
                .contains("varint")
        );
        assert!(
            string_field(&[0x08, 1], 1)
                .unwrap_err()
                .contains("not a string")
        );
        assert!(
            string_field(&[0x0a, 1, 0xff], 1)
                .unwrap_err()
                .contains("UTF-8")
        );
    }
}
