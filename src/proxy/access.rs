//! The access log's line for one request, and the payload log's record, built at the
//! edge only when the request is sampled. The access line: when it started, its trace id (from `traceparent`), route, variant, how
//! the variant was chosen, status, duration, its wait in a batch queue and its batch's
//! rows (batched requests), bytes in and out. Nothing from the request body.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Response, header};
use http_body_util::BodyExt;
use serde_json::json;

use super::Routed;
use super::batched::Batched;
use super::tee::Tee;
use crate::error::Body;
use crate::payload::{self, Payload, PayloadLog, Record};
use crate::route::assign::Assignment;
use crate::trace::otlp::span::SpanKind;
use crate::trace::{RequestTrace, SpanData, Value};

pub(super) struct Entry<'a> {
    pub route: &'a str,
    pub variant: &'a str,
    pub assignment: &'static str,
    pub parts: &'a http::request::Parts,
    pub grpc: bool,
    /// The HTTP status the answer stands for (a gRPC error's REST equivalent).
    pub status: u16,
    /// Until the response headers, as `braid_request_duration_seconds`.
    pub elapsed: Duration,
    /// `None` for a streamed request.
    pub request_bytes: Option<usize>,
    pub response: &'a Response<Body>,
    /// braid's place in the request's trace, when tracing is on.
    pub trace: Option<&'a RequestTrace>,
}

pub(super) fn assignment(how: Assignment) -> &'static str {
    match how {
        Assignment::Override => "override",
        Assignment::Sticky => "sticky",
        Assignment::Random => "weighted",
    }
}

pub(super) fn line(e: Entry<'_>) -> String {
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .saturating_sub(e.elapsed);
    let batched = e.response.extensions().get::<Batched>();
    let response_bytes = e
        .response
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    json!({
        "time": crate::access::rfc3339_millis(started),
        "trace_id": e.trace.map_or_else(
            || trace_id(&e.parts.headers).map(str::to_string),
            |t| Some(t.context.trace_id_hex()),
        ),
        "method": e.parts.method.as_str(),
        "path": e.parts.uri.path(),
        "protocol": if e.grpc { "grpc" } else { "http" },
        "route": e.route,
        "variant": e.variant,
        "assignment": e.assignment,
        "status": e.status,
        "duration_ms": millis(e.elapsed),
        "queue_wait_ms": batched.map(|b| millis(b.waited)),
        "batch_size": batched.map(|b| b.batch_rows),
        "request_bytes": e.request_bytes,
        "response_bytes": response_bytes,
    })
    .to_string()
}

/// A request sampled for the payload log, with what the edge knows of it.
pub(super) struct Sampled<'a> {
    pub route: &'a Arc<str>,
    pub variant: &'a Arc<str>,
    pub assignment: &'static str,
    pub parts: &'a http::request::Parts,
    pub status: u16,
    pub elapsed: Duration,
    pub body: &'a Bytes,
    pub trace: Option<&'a RequestTrace>,
}

/// Logs a sampled request's payloads: the response streams to the client through a
/// `Tee` keeping its first `max_bytes`, and the record is queued when it ends, on a
/// task of its own. Returns the response to send.
pub(super) fn log_payload(
    s: Sampled<'_>,
    max_bytes: usize,
    log: Arc<PayloadLog>,
    resp: Response<Body>,
) -> Response<Body> {
    let content_type = |h: &http::HeaderMap| {
        h.get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let mut record = Record {
        time: SystemTime::now() - s.elapsed,
        id: String::new(),
        trace_id: s.trace.map_or_else(
            || trace_id(&s.parts.headers).map(str::to_string),
            |t| Some(t.context.trace_id_hex()),
        ),
        route: s.route.clone(),
        variant: s.variant.clone(),
        assignment: s.assignment,
        status: s.status,
        latency: s.elapsed,
        method: s.parts.method.to_string(),
        path: s.parts.uri.path().to_string(),
        headers: payload::loggable_headers(&s.parts.headers),
        request: Payload {
            bytes: s.body.slice(..s.body.len().min(max_bytes)),
            total: s.body.len() as u64,
            complete: true,
            content_type: content_type(&s.parts.headers),
        },
        response: Payload {
            bytes: Bytes::new(),
            total: 0,
            complete: false,
            content_type: content_type(resp.headers()),
        },
    };
    record.id = record.trace_id.clone().unwrap_or_else(payload::new_id);
    let (parts, body) = resp.into_parts();
    let (tee, copy) = Tee::new(body, max_bytes);
    tokio::spawn(async move {
        if let Ok(c) = copy.await {
            record.response.bytes = c.bytes;
            record.response.total = c.total;
            record.response.complete = c.complete;
        }
        log.write(record);
    });
    Response::from_parts(parts, tee.boxed())
}

/// braid's SERVER span for a sampled request, named and attributed by OpenTelemetry's
/// HTTP (and RPC) conventions, plus braid's own `braid.*` attributes. It ends at the
/// response headers, as `braid_request_duration_seconds` does.
pub(super) fn server_span(
    r: &Routed<'_>,
    t: &RequestTrace,
    parts: &http::request::Parts,
    variant: &str,
    assignment: &'static str,
    status: http::StatusCode,
    (resp, elapsed): (&Response<Body>, Duration),
) -> SpanData {
    let end = SystemTime::now();
    let route = r.m.route;
    let path = parts.uri.path();
    let mut attributes = vec![
        ("http.request.method", Value::Str(parts.method.to_string())),
        ("url.path", Value::Str(path.to_string())),
        (
            "http.response.status_code",
            Value::Int(status.as_u16().into()),
        ),
        ("braid.route", Value::Str(route.name.to_string())),
        ("braid.variant", Value::Str(variant.to_string())),
        ("braid.assignment", Value::Str(assignment.to_string())),
    ];
    let name = if r.wire.grpc() {
        // `{rpc.service}/{rpc.method}`, as the RPC conventions name a gRPC server span.
        let full = path.trim_start_matches('/');
        let (service, method) = full.rsplit_once('/').unwrap_or((full, ""));
        attributes.push(("rpc.system", Value::Str("grpc".into())));
        attributes.push(("rpc.service", Value::Str(service.into())));
        attributes.push(("rpc.method", Value::Str(method.into())));
        full.to_string()
    } else {
        // The route as a template: the model's place in the path, or the prefix.
        let template = match &r.m.model_span {
            Some(s) => format!("{}{{model}}{}", &path[..s.start], &path[s.end..]),
            None => route
                .path_prefix
                .clone()
                .unwrap_or_else(|| path.to_string()),
        };
        let name = format!("{} {template}", parts.method);
        attributes.push(("http.route", Value::Str(template)));
        name
    };
    if let Some(b) = resp.extensions().get::<Batched>() {
        attributes.push(("braid.queue.wait", Value::Float(b.waited.as_secs_f64())));
        attributes.push(("braid.batch.size", Value::Int(b.batch_rows as i64)));
    }
    SpanData {
        context: t.context,
        parent: t.parent,
        trace_state: t.trace_state.clone(),
        name,
        kind: SpanKind::Server,
        // The wall clock is read once, at the end, and only for recorded spans.
        start: end - elapsed,
        end,
        attributes,
        // The server span's status: an error only for 5xx (OpenTelemetry's HTTP rule).
        error: status.is_server_error(),
    }
}

fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// The trace id of a valid W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`, ids not
/// all zero), else `None`.
fn trace_id(headers: &http::HeaderMap) -> Option<&str> {
    let v = headers.get("traceparent")?.to_str().ok()?;
    let mut it = v.split('-');
    let (version, trace, span, flags) = (it.next()?, it.next()?, it.next()?, it.next()?);
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let valid = hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && hex(span, 16)
        && hex(flags, 2)
        && trace.bytes().any(|b| b != b'0')
        && span.bytes().any(|b| b != b'0')
        && (version != "00" || it.next().is_none());
    valid.then_some(trace)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_ids_come_from_valid_traceparents_only() {
        let id = |v: &str| {
            let mut h = http::HeaderMap::new();
            h.insert("traceparent", v.parse().unwrap());
            trace_id(&h).map(str::to_string)
        };
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            id(good).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f35-00f067aa0ba902b7-01",
            "garbage",
        ] {
            assert_eq!(id(bad), None, "{bad}");
        }
    }
}
