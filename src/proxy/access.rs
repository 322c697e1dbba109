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

use super::batched::Batched;
use super::tee::Tee;
use crate::error::Body;
use crate::metrics::Generation;
use crate::payload::{self, Payload, PayloadLog, Record};
use crate::route::assign::Assignment;
use crate::trace::RequestTrace;

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

/// The access line's JSON object (written with `to_string`).
pub(super) fn line(e: Entry<'_>) -> serde_json::Value {
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
        "trace_id": trace_id(e.trace, &e.parts.headers),
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
}

/// What a generation adds to its access line: its duration to the last byte (in place
/// of the head's), time to first token, time per output token, tokens, finish reasons.
pub(super) fn with_generation(line: &mut serde_json::Value, g: &Generation) {
    if let (Some(line), serde_json::Value::Object(fields)) = (line.as_object_mut(), generation(g)) {
        line.extend(fields);
    }
}

/// A generation as JSON fields (times in milliseconds).
pub(super) fn generation(g: &Generation) -> serde_json::Value {
    json!({
        "duration_ms": millis(g.duration),
        "ttft_ms": g.ttft.map(millis),
        "tpot_ms": g.tpot.map(millis),
        "input_tokens": g.input_tokens,
        "output_tokens": g.output_tokens,
        "finish_reasons": g.finish,
    })
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
    /// Where an OpenAI-style answer's generation comes once it has ended (or its
    /// client left): the record waits for it, so it is never written without it.
    pub generation: Option<tokio::sync::oneshot::Receiver<Generation>>,
}

/// Logs a sampled request's payloads: the response streams to the client through a
/// `Tee` keeping its first `max_bytes`, and the record is queued when it ends, on a
/// task of its own. Returns the response to send.
pub(super) fn log_payload(
    s: Sampled<'_>,
    settings: &payload::Settings,
    log: Arc<PayloadLog>,
    resp: Response<Body>,
) -> Response<Body> {
    let max_bytes = settings.max_bytes;
    let content_type = |h: &http::HeaderMap| {
        h.get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let mut record = Record {
        time: SystemTime::now() - s.elapsed,
        id: String::new(),
        trace_id: trace_id(s.trace, &s.parts.headers),
        route: s.route.clone(),
        variant: s.variant.clone(),
        assignment: s.assignment,
        status: s.status,
        latency: s.elapsed,
        method: s.parts.method.to_string(),
        path: s.parts.uri.path().to_string(),
        headers: payload::loggable_headers(&s.parts.headers, &settings.headers),
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
        generation: None,
    };
    record.id = record.trace_id.clone().unwrap_or_else(payload::new_id);
    let (parts, body) = resp.into_parts();
    let (tee, copy) = Tee::new(body, max_bytes);
    let generated = s.generation;
    tokio::spawn(async move {
        if let Ok(c) = copy.await {
            record.response.bytes = c.bytes;
            record.response.total = c.total;
            record.response.complete = c.complete;
        }
        // The answer has ended (or its client left): its generation is measured, or
        // about to be (the body that measures it may be dropped just after the copy).
        if let Some(rx) = generated {
            record.generation = rx.await.ok().map(|g| generation(&g));
        }
        log.write(record);
    });
    Response::from_parts(parts, tee.boxed())
}

fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// The trace id: braid's trace's when tracing is on, else that of a valid W3C
/// `traceparent` (the one parser, `trace::parse_traceparent`), else `None`.
fn trace_id(trace: Option<&RequestTrace>, headers: &http::HeaderMap) -> Option<String> {
    match trace {
        Some(t) => Some(t.context.trace_id_hex()),
        None => headers
            .get(&crate::trace::TRACEPARENT)
            .and_then(crate::trace::parse_traceparent)
            .map(|c| c.trace_id_hex()),
    }
}
