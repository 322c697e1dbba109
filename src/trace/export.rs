//! The span exporter: a bounded queue the request path puts finished spans on without
//! waiting, and one task that sends them in batches to the OTLP/HTTP endpoint as
//! protobuf (`POST .../v1/traces`, `application/x-protobuf`). What becomes of each span
//! is counted in `braid_trace_spans_total{result}`: `exported`, `failed` (the endpoint
//! refused it or did not answer in time) or `dropped` (the queue was full).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use prost::Message;
use tokio::sync::mpsc;

use super::otlp::{self, any_value};
use super::{RequestTrace, Sampler, SpanData, TraceConfig, Value};

/// POSTs one export and says whether it was accepted (2xx); the caller's HTTP client
/// (braid's pooled one), so tracing depends on no transport of its own.
pub type Poster = Arc<dyn Fn(Request<Full<Bytes>>) -> PostFuture + Send + Sync>;
pub type PostFuture = std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>;

/// Counts spans by what became of them (`exported`, `failed`, `dropped`): the proxy's
/// `braid_trace_spans_total`, the executor's `braid_executor_trace_spans_total`.
pub type SpanCounter = Arc<dyn Fn(&'static str, u64) + Send + Sync>;

/// What the request path holds: the sampler and the queue's sending end.
pub struct Tracer {
    sampler: Sampler,
    tx: mpsc::Sender<SpanData>,
    count: SpanCounter,
}

impl std::fmt::Debug for Tracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracer")
            .field("sampler", &self.sampler)
            .finish_non_exhaustive()
    }
}

impl Tracer {
    /// Starts the exporter task (inside the runtime); it ends when the tracer is dropped,
    /// after sending what it holds.
    pub fn start(config: TraceConfig, count: SpanCounter, post: Poster) -> Tracer {
        let (tx, rx) = mpsc::channel(config.max_queue);
        let sampler = config.sampler;
        tokio::spawn(run(config, rx, count.clone(), post));
        Tracer { sampler, tx, count }
    }

    /// Continues (or starts) the trace of a request with these headers.
    pub fn begin(&self, headers: &http::HeaderMap) -> RequestTrace {
        RequestTrace::begin(&self.sampler, headers)
    }

    /// Queues a finished span; never waits.
    pub fn record(&self, span: SpanData) {
        if self.tx.try_send(span).is_err() {
            (self.count)("dropped", 1);
        }
    }
}

async fn run(
    config: TraceConfig,
    mut rx: mpsc::Receiver<SpanData>,
    count: SpanCounter,
    post: Poster,
) {
    let resource = otlp::Resource {
        attributes: config
            .resource
            .iter()
            .map(|(k, v)| kv(k, &Value::Str(v.clone())))
            .collect(),
        dropped_attributes_count: 0,
    };
    let mut batch: Vec<SpanData> = Vec::with_capacity(config.max_batch);
    loop {
        // Wait for a first span, then up to `delay` for the batch to fill.
        match rx.recv().await {
            Some(s) => batch.push(s),
            None => return,
        }
        let deadline = tokio::time::Instant::now() + config.delay;
        while batch.len() < config.max_batch {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(s)) => batch.push(s),
                Ok(None) | Err(_) => break,
            }
        }
        let n = batch.len() as u64;
        let body = encode(&resource, batch.drain(..));
        let ok = send(&post, &config, body).await;
        count(if ok { "exported" } else { "failed" }, n);
        if !ok {
            tracing::debug!(endpoint = %config.endpoint, spans = n, "span export failed");
        }
    }
}

async fn send(post: &Poster, config: &TraceConfig, body: Bytes) -> bool {
    let Ok(req) = Request::post(config.endpoint.clone())
        .header(http::header::CONTENT_TYPE, "application/x-protobuf")
        .body(Full::new(body))
    else {
        return false;
    };
    tokio::time::timeout(config.timeout, post(req))
        .await
        .unwrap_or(false)
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn kv(key: &str, value: &Value) -> otlp::KeyValue {
    let value = match value {
        Value::Str(s) => any_value::Value::StringValue(s.clone()),
        Value::Int(i) => any_value::Value::IntValue(*i),
        Value::Float(f) => any_value::Value::DoubleValue(*f),
        Value::Bool(b) => any_value::Value::BoolValue(*b),
    };
    otlp::KeyValue {
        key: key.to_string(),
        value: Some(otlp::AnyValue { value: Some(value) }),
    }
}

/// One `ExportTraceServiceRequest` holding `spans`.
pub fn encode(resource: &otlp::Resource, spans: impl Iterator<Item = SpanData>) -> Bytes {
    let spans = spans
        .map(|s| otlp::Span {
            trace_id: Bytes::copy_from_slice(&s.context.trace_id),
            span_id: Bytes::copy_from_slice(&s.context.span_id),
            trace_state: s.trace_state.unwrap_or_default(),
            parent_span_id: s
                .parent
                .map_or_else(Bytes::new, |p| Bytes::copy_from_slice(&p)),
            name: s.name,
            kind: s.kind as i32,
            start_time_unix_nano: nanos(s.start),
            end_time_unix_nano: nanos(s.end),
            attributes: s.attributes.iter().map(|(k, v)| kv(k, v)).collect(),
            dropped_attributes_count: 0,
            links: s
                .links
                .iter()
                .map(|l| otlp::span::Link {
                    trace_id: Bytes::copy_from_slice(&l.trace_id),
                    span_id: Bytes::copy_from_slice(&l.span_id),
                    trace_state: String::new(),
                    attributes: Vec::new(),
                    dropped_attributes_count: 0,
                    flags: u32::from(l.sampled),
                })
                .collect(),
            dropped_links_count: 0,
            status: Some(otlp::Status {
                message: String::new(),
                code: if s.error {
                    otlp::status::StatusCode::Error as i32
                } else {
                    otlp::status::StatusCode::Unset as i32
                },
            }),
            // W3C trace flags (sampled), with the "has is-remote" bit pattern unset.
            flags: u32::from(s.context.sampled),
        })
        .collect();
    otlp::ExportTraceServiceRequest {
        resource_spans: vec![otlp::ResourceSpans {
            resource: Some(resource.clone()),
            scope_spans: vec![otlp::ScopeSpans {
                scope: Some(otlp::InstrumentationScope {
                    name: "braid".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                }),
                spans,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
    .encode_to_vec()
    .into()
}
