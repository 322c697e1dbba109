//! The spans braid records for a request: its SERVER span, named and attributed by
//! OpenTelemetry's HTTP (and RPC) conventions with braid's own `braid.*` attributes,
//! and a CLIENT span for every try that reaches a backend (retries and the fallback
//! included), whose id the backend gets as its parent.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::uri::Authority;

use super::context::Routed;
use crate::trace::export::Tracer;
use crate::trace::otlp::span::SpanKind;
use crate::trace::{
    RequestTrace, SpanContext, SpanData, TRACEPARENT, Value, new_span_id, new_trace_id,
};
use crate::upstream::retry::{TryEnd, TryHook};

/// braid's SERVER span for a sampled request, named and attributed by OpenTelemetry's
/// HTTP (and RPC) conventions, plus braid's own `braid.*` attributes. It ends at the
/// response headers, as `braid_request_duration_seconds` does.
pub(super) fn server_span(
    r: &Routed<'_>,
    t: &RequestTrace,
    parts: &http::request::Parts,
    variant: &str,
    assignment: &'static str,
    (status, elapsed, batch): (http::StatusCode, Duration, Option<(Duration, usize)>),
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
    if let Some((waited, rows)) = batch {
        attributes.push(("braid.queue.wait", Value::Float(waited.as_secs_f64())));
        attributes.push(("braid.batch.size", Value::Int(rows as i64)));
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
        links: Vec::new(),
        // The server span's status: an error only for 5xx (OpenTelemetry's HTTP rule).
        error: status.is_server_error(),
    }
}

/// The models an OpenAI-style call names: the one the client asked for and the one
/// the variant's backend was asked for (`gen_ai.request.model`, `gen_ai.response.model`).
pub(super) fn models(r: &Routed<'_>, variant: &crate::route::Variant) -> (String, Option<String>) {
    let asked = r
        .call
        .as_ref()
        .and_then(|c| c.model.as_ref())
        .map(|(m, _)| m.clone())
        .unwrap_or_default();
    let served = variant.target_model.as_deref().map(str::to_string);
    (asked, served)
}

/// A generation's SERVER span ends at the answer's last byte, with OpenTelemetry's
/// GenAI attributes.
pub(super) fn with_generation(
    span: &mut SpanData,
    (asked, served): (String, Option<String>),
    g: &crate::metrics::Generation,
) {
    span.end = span.start + g.duration;
    let a = &mut span.attributes;
    if !asked.is_empty() {
        a.push((
            "gen_ai.response.model",
            Value::Str(served.unwrap_or_else(|| asked.clone())),
        ));
        a.push(("gen_ai.request.model", Value::Str(asked)));
    }
    if let Some(n) = g.input_tokens {
        a.push(("gen_ai.usage.input_tokens", Value::Int(n as i64)));
    }
    if let Some(n) = g.output_tokens {
        a.push(("gen_ai.usage.output_tokens", Value::Int(n as i64)));
    }
    if !g.finish.is_empty() {
        a.push((
            "gen_ai.response.finish_reasons",
            Value::Str(g.finish.join(",")),
        ));
    }
    if let Some(t) = g.ttft {
        a.push((
            "gen_ai.server.time_to_first_token",
            Value::Float(t.as_secs_f64()),
        ));
    }
    if g.errors > 0 {
        span.error = true;
    }
}

/// CLIENT spans for the tries of one recorded request, children of its SERVER span.
pub(super) struct ClientSpans {
    tracer: Arc<Tracer>,
    server: SpanContext,
    trace_state: Option<String>,
    method: http::Method,
    authority: Authority,
}

impl ClientSpans {
    /// `None` unless the request is being recorded. Shared, so a request's future
    /// holds one pointer for it (and the retry hook the same one).
    pub(super) fn new(
        tracer: Option<&Arc<Tracer>>,
        trace: Option<&RequestTrace>,
        method: &http::Method,
        authority: &Authority,
    ) -> Option<Arc<ClientSpans>> {
        let t = trace.filter(|t| t.context.sampled)?;
        Some(Arc::new(ClientSpans {
            tracer: tracer?.clone(),
            server: t.context,
            trace_state: t.trace_state.clone(),
            method: method.clone(),
            authority: authority.clone(),
        }))
    }

    /// Starts try number `resend`: its context (the backend's parent) and what records
    /// the span when the try ends.
    pub(super) fn start(&self, resend: u32) -> (SpanContext, TryEnd) {
        let context = SpanContext {
            span_id: new_span_id(),
            ..self.server
        };
        let start = SystemTime::now();
        let (tracer, parent, trace_state) = (
            self.tracer.clone(),
            self.server.span_id,
            self.trace_state.clone(),
        );
        let (method, authority) = (self.method.clone(), self.authority.clone());
        let end = TryEnd::new(move |status: Option<http::StatusCode>| {
            let attempt = Attempt {
                method: &method,
                authority: &authority,
                resend,
                start,
                status,
            };
            tracer.record(client_span(context, parent, trace_state, attempt));
        });
        (context, end)
    }
}

/// One call to a backend, as a CLIENT span records it.
struct Attempt<'a> {
    method: &'a http::Method,
    authority: &'a Authority,
    resend: u32,
    start: SystemTime,
    /// `None`: no answer came.
    status: Option<http::StatusCode>,
}

/// A CLIENT span by OpenTelemetry's HTTP client conventions.
fn client_span(
    context: SpanContext,
    parent: [u8; 8],
    trace_state: Option<String>,
    a: Attempt<'_>,
) -> SpanData {
    let mut attributes = vec![
        ("http.request.method", Value::Str(a.method.to_string())),
        ("server.address", Value::Str(a.authority.host().to_string())),
        ("http.request.resend_count", Value::Int(a.resend.into())),
    ];
    if let Some(port) = a.authority.port_u16() {
        attributes.push(("server.port", Value::Int(port.into())));
    }
    match a.status {
        Some(s) => attributes.push(("http.response.status_code", Value::Int(s.as_u16().into()))),
        None => attributes.push(("error.type", Value::Str("no_response".into()))),
    }
    SpanData {
        context,
        parent: Some(parent),
        trace_state,
        name: a.method.to_string(),
        kind: SpanKind::Client,
        start: a.start,
        end: SystemTime::now(),
        attributes,
        links: Vec::new(),
        // The client-span rule: 4xx and 5xx, or no answer, are errors.
        error: a.status.is_none_or(|s| s.as_u16() >= 400),
    }
}

/// One executor call carrying a batch: a `braid.batch` span in a trace of its own
/// (a span cannot have many parents), linked to the span of every recorded request it
/// carries, with the call itself as its CLIENT child (the executor's parent).
pub(super) struct BatchSpan {
    batch: SpanContext,
    /// The executor's parent.
    pub(super) client: SpanContext,
    start: SystemTime,
}

impl BatchSpan {
    pub(super) fn start() -> BatchSpan {
        let trace_id = new_trace_id();
        let span = |span_id| SpanContext {
            trace_id,
            span_id,
            sampled: true,
        };
        BatchSpan {
            batch: span(new_span_id()),
            client: span(new_span_id()),
            start: SystemTime::now(),
        }
    }

    pub(super) fn finish(
        self,
        tracer: &Tracer,
        links: &[SpanContext],
        authority: &Authority,
        status: Option<http::StatusCode>,
    ) {
        let attempt = Attempt {
            method: &http::Method::POST,
            authority,
            resend: 0,
            start: self.start,
            status,
        };
        tracer.record(client_span(self.client, self.batch.span_id, None, attempt));
        tracer.record(SpanData {
            context: self.batch,
            parent: None,
            trace_state: None,
            name: "braid.batch".into(),
            kind: SpanKind::Internal,
            start: self.start,
            end: SystemTime::now(),
            attributes: vec![("braid.batch.requests", Value::Int(links.len() as i64))],
            links: links.to_vec(),
            error: status.is_none_or(|s| !s.is_success()),
        });
    }
}

impl TryHook for ClientSpans {
    fn begin(&self, resend: u32, headers: &mut http::HeaderMap) -> TryEnd {
        let (context, end) = self.start(resend);
        headers.insert(TRACEPARENT.clone(), context.traceparent());
        end
    }
}
