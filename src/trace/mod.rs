//! Tracing: W3C trace context (`traceparent`, `tracestate`) continued through braid,
//! and a span per request exported over OTLP/HTTP (protobuf), configured only by the
//! standard `OTEL_*` variables and off unless an endpoint is set.
//!
//! With tracing on, a request's `traceparent` is continued: braid's SERVER span takes
//! the caller's span as its parent, and the backend gets braid's span id as its parent
//! (the caller's `tracestate` passes unchanged). A request without one gets a new trace
//! id. Whether a span is recorded is the sampler's choice (`parentbased_traceidratio`
//! and the others of the specification). Spans go to a bounded queue; an exporter task
//! sends them in batches, off the request path: a full queue drops spans, a failed
//! export counts them, and neither touches a request (`braid_trace_spans_total`).
//!
//! With tracing off, `traceparent` passes through unchanged, as any header does.

pub mod export;

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue, Uri};

/// The OTLP messages, generated from `otlp.proto` at build time.
#[allow(clippy::all, missing_docs)]
pub mod otlp {
    include!(concat!(env!("OUT_DIR"), "/opentelemetry.proto.trace.v1.rs"));
}

pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// A span's place in a trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
}

impl SpanContext {
    /// `traceparent` for this context: `00-{trace}-{span}-{flags}`.
    pub fn traceparent(&self) -> HeaderValue {
        HeaderValue::from_bytes(&self.traceparent_bytes()).expect("hex is a valid header value")
    }

    /// The same, as bytes on the stack (the direct HTTP/1.1 path writes them as they are).
    pub fn traceparent_bytes(&self) -> [u8; 55] {
        let mut b = *b"00-00000000000000000000000000000000-0000000000000000-00";
        hex(&mut b[3..35], &self.trace_id);
        hex(&mut b[36..52], &self.span_id);
        if self.sampled {
            b[54] = b'1';
        }
        b
    }

    pub fn trace_id_hex(&self) -> String {
        let mut b = [0u8; 32];
        hex(&mut b, &self.trace_id);
        b.iter().map(|&c| c as char).collect()
    }
}

/// Each byte's two lower-case hex digits.
const HEX: [[u8; 2]; 256] = {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut t = [[0u8; 2]; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = [DIGITS[i >> 4], DIGITS[i & 15]];
        i += 1;
    }
    t
};

/// Lower-case hex of `bytes` into `out` (twice as long).
fn hex(out: &mut [u8], bytes: &[u8]) {
    for (pair, &b) in out.chunks_exact_mut(2).zip(bytes) {
        pair.copy_from_slice(&HEX[b as usize]);
    }
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let b = s.as_bytes();
    if b.len() != 2 * N {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None, // upper case is invalid in traceparent
    };
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = digit(b[2 * i])? << 4 | digit(b[2 * i + 1])?;
    }
    Some(out)
}

/// The caller's context from a valid `traceparent` (W3C Trace Context level 1): version
/// `00` exactly, or a later version read by its first four fields; ids not all zero,
/// lower-case hex. Anything else is no context (a new trace begins).
pub fn parse_traceparent(v: &HeaderValue) -> Option<SpanContext> {
    let s = v.to_str().ok()?;
    let version = s.get(0..2)?;
    if version == "ff" || unhex::<1>(version).is_none() {
        return None;
    }
    if (version == "00" && s.len() != 55) || s.len() < 55 {
        return None;
    }
    if version != "00" && s.len() > 55 && s.as_bytes()[55] != b'-' {
        return None;
    }
    let b = s.as_bytes();
    if b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    let trace_id = unhex::<16>(&s[3..35])?;
    let span_id = unhex::<8>(&s[36..52])?;
    let flags = unhex::<1>(&s[53..55])?[0];
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    Some(SpanContext {
        trace_id,
        span_id,
        sampled: flags & 1 == 1,
    })
}

/// `OTEL_TRACES_SAMPLER` (with `OTEL_TRACES_SAMPLER_ARG` for the ratios).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampler {
    AlwaysOn,
    AlwaysOff,
    /// Samples a trace when its id falls under the ratio: the same decision on every
    /// service that uses the same rule.
    TraceIdRatio(f64),
    /// The caller's decision when there is a caller; this root sampler otherwise.
    ParentBased(RootSampler),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RootSampler {
    AlwaysOn,
    AlwaysOff,
    TraceIdRatio(f64),
}

fn ratio_samples(ratio: f64, trace_id: &[u8; 16]) -> bool {
    // The trace id's last 8 bytes as an integer below 2^63, against ratio x 2^63.
    let low = u64::from_be_bytes(trace_id[8..16].try_into().expect("8 bytes")) >> 1;
    (low as f64) < ratio * (1u64 << 63) as f64
}

impl Sampler {
    pub fn samples(&self, parent: Option<&SpanContext>, trace_id: &[u8; 16]) -> bool {
        let root = |r: RootSampler| match r {
            RootSampler::AlwaysOn => true,
            RootSampler::AlwaysOff => false,
            RootSampler::TraceIdRatio(x) => ratio_samples(x, trace_id),
        };
        match *self {
            Sampler::AlwaysOn => true,
            Sampler::AlwaysOff => false,
            Sampler::TraceIdRatio(x) => ratio_samples(x, trace_id),
            Sampler::ParentBased(r) => parent.map_or_else(|| root(r), |p| p.sampled),
        }
    }
}

/// Tracing settings, from the standard variables.
#[derive(Debug, Clone)]
pub struct TraceConfig {
    /// Where spans are POSTed (`.../v1/traces`).
    pub endpoint: Uri,
    pub sampler: Sampler,
    /// `service.name` and the rest of the resource.
    pub resource: Vec<(String, String)>,
    /// Spans waiting for the exporter; more are dropped (`OTEL_BSP_MAX_QUEUE_SIZE`).
    pub max_queue: usize,
    /// Spans per export (`OTEL_BSP_MAX_EXPORT_BATCH_SIZE`).
    pub max_batch: usize,
    /// The longest a span waits for its batch (`OTEL_BSP_SCHEDULE_DELAY`).
    pub delay: Duration,
    /// One export's limit (`OTEL_EXPORTER_OTLP_TRACES_TIMEOUT` / `_TIMEOUT`).
    pub timeout: Duration,
}

impl TraceConfig {
    /// From the process environment; `Ok(None)`: tracing is off.
    pub fn from_env(default_service: &str) -> Result<Option<TraceConfig>, String> {
        let vars: HashMap<String, String> = std::env::vars()
            .filter(|(k, _)| k.starts_with("OTEL_"))
            .collect();
        Self::from_vars(|k| vars.get(k).cloned(), default_service)
    }

    /// From any source of variables (tests pass a map).
    pub fn from_vars(
        var: impl Fn(&str) -> Option<String>,
        default_service: &str,
    ) -> Result<Option<TraceConfig>, String> {
        let var = |k: &str| {
            var(k)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        if var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
            || var("OTEL_TRACES_EXPORTER").is_some_and(|v| v == "none")
        {
            return Ok(None);
        }
        let endpoint = match (
            var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
            var("OTEL_EXPORTER_OTLP_ENDPOINT"),
        ) {
            (Some(e), _) => e,
            (None, Some(base)) => format!("{}/v1/traces", base.trim_end_matches('/')),
            (None, None) => return Ok(None),
        };
        let endpoint: Uri = endpoint
            .parse()
            .map_err(|e| format!("OTEL_EXPORTER_OTLP_ENDPOINT {endpoint:?}: {e}"))?;
        if endpoint.scheme_str() != Some("http") || endpoint.host().is_none() {
            return Err(format!(
                "OTEL_EXPORTER_OTLP_ENDPOINT {endpoint}: braid exports to http:// endpoints only"
            ));
        }
        if let Some(p) =
            var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL").or(var("OTEL_EXPORTER_OTLP_PROTOCOL"))
            && p != "http/protobuf"
        {
            return Err(format!(
                "OTEL_EXPORTER_OTLP_PROTOCOL {p:?}: braid exports OTLP over HTTP with protobuf (http/protobuf) only"
            ));
        }
        let arg = || -> Result<f64, String> {
            match var("OTEL_TRACES_SAMPLER_ARG") {
                None => Ok(1.0),
                Some(a) => a
                    .parse::<f64>()
                    .ok()
                    .filter(|x| (0.0..=1.0).contains(x))
                    .ok_or_else(|| {
                        format!("OTEL_TRACES_SAMPLER_ARG {a:?} must be a number from 0 to 1")
                    }),
            }
        };
        let sampler = match var("OTEL_TRACES_SAMPLER")
            .as_deref()
            .unwrap_or("parentbased_always_on")
        {
            "always_on" => Sampler::AlwaysOn,
            "always_off" => Sampler::AlwaysOff,
            "traceidratio" => Sampler::TraceIdRatio(arg()?),
            "parentbased_always_on" => Sampler::ParentBased(RootSampler::AlwaysOn),
            "parentbased_always_off" => Sampler::ParentBased(RootSampler::AlwaysOff),
            "parentbased_traceidratio" => Sampler::ParentBased(RootSampler::TraceIdRatio(arg()?)),
            other => {
                return Err(format!(
                    "OTEL_TRACES_SAMPLER {other:?}: use always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off or parentbased_traceidratio"
                ));
            }
        };
        let mut resource: Vec<(String, String)> = var("OTEL_RESOURCE_ATTRIBUTES")
            .map(|a| {
                a.split(',')
                    .filter_map(|kv| {
                        let (k, v) = kv.split_once('=')?;
                        Some((k.trim().to_string(), v.trim().to_string()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let service = var("OTEL_SERVICE_NAME").unwrap_or_else(|| default_service.to_string());
        resource.retain(|(k, _)| k != "service.name");
        resource.insert(0, ("service.name".into(), service));
        let number = |k: &str, default: u64| -> Result<u64, String> {
            var(k).map_or(Ok(default), |v| {
                v.parse()
                    .map_err(|_| format!("{k} {v:?} must be a whole number"))
            })
        };
        let timeout = var("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT")
            .map(|_| number("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", 10_000))
            .unwrap_or_else(|| number("OTEL_EXPORTER_OTLP_TIMEOUT", 10_000))?;
        Ok(Some(TraceConfig {
            endpoint,
            sampler,
            resource,
            max_queue: number("OTEL_BSP_MAX_QUEUE_SIZE", 2048)?.max(1) as usize,
            max_batch: number("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512)?.max(1) as usize,
            delay: Duration::from_millis(number("OTEL_BSP_SCHEDULE_DELAY", 5000)?),
            timeout: Duration::from_millis(timeout),
        }))
    }
}

/// Random ids from the per-thread generator (not cryptographic: ids only need to be
/// unique, not secret).
fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    for chunk in out.chunks_mut(8) {
        let r = crate::hash::next_u64();
        chunk.copy_from_slice(&r.to_le_bytes()[..chunk.len()]);
    }
    if out.iter().all(|b| *b == 0) {
        out[N - 1] = 1;
    }
    out
}

pub fn new_span_id() -> [u8; 8] {
    random_bytes()
}

pub fn new_trace_id() -> [u8; 16] {
    random_bytes()
}

/// One request's part in its trace: braid's SERVER span and where it hangs.
#[derive(Debug, Clone)]
pub struct RequestTrace {
    /// braid's span (its id goes to the backend as the parent).
    pub context: SpanContext,
    /// The caller's span, when it sent a valid `traceparent`.
    pub parent: Option<[u8; 8]>,
    pub trace_state: Option<String>,
}

impl RequestTrace {
    /// Continues the caller's trace (or starts one) under `sampler`.
    pub fn begin(sampler: &Sampler, headers: &HeaderMap) -> RequestTrace {
        let parent = headers.get(&TRACEPARENT).and_then(parse_traceparent);
        let trace_id = parent.map_or_else(random_bytes, |p| p.trace_id);
        let sampled = sampler.samples(parent.as_ref(), &trace_id);
        let trace_state = parent
            .and_then(|_| headers.get("tracestate"))
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        RequestTrace {
            context: SpanContext {
                trace_id,
                span_id: new_span_id(),
                sampled,
            },
            parent: parent.map(|p| p.span_id),
            trace_state,
        }
    }
}

/// A finished span, ready to export.
#[derive(Debug, Clone)]
pub struct SpanData {
    pub context: SpanContext,
    pub parent: Option<[u8; 8]>,
    pub trace_state: Option<String>,
    pub name: String,
    pub kind: otlp::span::SpanKind,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<(&'static str, Value)>,
    /// Spans this one relates to without being their child (a batch's requests).
    pub links: Vec<SpanContext>,
    pub error: bool,
}

/// An attribute's value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hv(s: &str) -> HeaderValue {
        HeaderValue::from_str(s).unwrap()
    }

    #[test]
    fn traceparent_round_trips_and_bad_ones_are_refused() {
        let v = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let c = parse_traceparent(&hv(v)).unwrap();
        assert!(c.sampled);
        assert_eq!(c.traceparent(), v);
        assert_eq!(c.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let unsampled = parse_traceparent(&hv(&v.replace("-01", "-00"))).unwrap();
        assert!(!unsampled.sampled);
        // A later version is read by its first four fields.
        assert!(parse_traceparent(&hv(&format!("{}-extra", v.replacen("00", "01", 1)))).is_some());
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f35-00f067aa0ba902b7-01",
            "garbage",
            "",
        ] {
            assert_eq!(parse_traceparent(&hv(bad)), None, "{bad}");
        }
    }

    #[test]
    fn config_comes_from_the_standard_variables() {
        let from = |pairs: &[(&str, &str)]| {
            let m: HashMap<String, String> = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            TraceConfig::from_vars(|k| m.get(k).cloned(), "braid")
        };
        assert!(from(&[]).unwrap().is_none(), "off without an endpoint");
        let c = from(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/"),
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.01"),
            ("OTEL_SERVICE_NAME", "sentiment-sidecar"),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "k8s.pod.name=p-1, service.name=ignored",
            ),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(c.endpoint, "http://collector:4318/v1/traces");
        assert_eq!(
            c.sampler,
            Sampler::ParentBased(RootSampler::TraceIdRatio(0.01))
        );
        assert_eq!(
            c.resource,
            [
                ("service.name".to_string(), "sentiment-sidecar".to_string()),
                ("k8s.pod.name".to_string(), "p-1".to_string())
            ]
        );
        let c = from(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://t:4318/custom"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(c.endpoint, "http://t:4318/custom");
        assert_eq!(c.sampler, Sampler::ParentBased(RootSampler::AlwaysOn));
        assert!(
            from(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                ("OTEL_SDK_DISABLED", "true")
            ])
            .unwrap()
            .is_none()
        );
        for bad in [
            vec![("OTEL_EXPORTER_OTLP_ENDPOINT", "https://c:4318")],
            vec![
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ],
            vec![
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                ("OTEL_TRACES_SAMPLER", "sometimes"),
            ],
            vec![
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                ("OTEL_TRACES_SAMPLER", "traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "2"),
            ],
        ] {
            assert!(from(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn samplers_follow_the_parent_or_the_trace_id() {
        let parent = |sampled| SpanContext {
            trace_id: [7; 16],
            span_id: [1; 8],
            sampled,
        };
        let pb = Sampler::ParentBased(RootSampler::TraceIdRatio(0.0));
        assert!(pb.samples(Some(&parent(true)), &[7; 16]));
        assert!(!pb.samples(Some(&parent(false)), &[7; 16]));
        assert!(!pb.samples(None, &[7; 16]));
        // The ratio picks about that share of random trace ids, and the same ids each time.
        let r = Sampler::TraceIdRatio(0.25);
        let ids: Vec<[u8; 16]> = (0..20_000).map(|_| random_bytes()).collect();
        let n = ids.iter().filter(|id| r.samples(None, id)).count();
        assert!((4_700..5_300).contains(&n), "{n} of 20000");
        assert!(
            ids.iter()
                .all(|id| r.samples(None, id) == r.samples(None, id))
        );
    }
}
