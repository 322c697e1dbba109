//! The config document's schema: a typed `Document` read from a YAML `Node` with every
//! problem reported as `field.path: message`. Only shapes and scalar formats are checked
//! here; rules that relate fields to each other live in `validate.rs`.

use std::time::Duration;

use http::uri::Scheme;
use http::{HeaderName, Uri};

pub use crate::addr::{Protocol, Upstream};

use super::node::Node;
use super::{ConfigError, Errors};
use crate::batch::queue::ClassLimits;
use crate::route::experiment::{Action, Guardrail};
use crate::route::ramp::{Ramp, Step};
use crate::upstream::health::Outlier;
use crate::upstream::retry::RetryPolicy;

mod experiment;
mod readers;

pub use crate::headers::parse_duration;
pub use experiment::parse_rfc3339;
use experiment::*;
use readers::*;
pub(crate) use readers::{Obj, model_name, positive_int, seq, string, temperature};

/// The whole config document (see `config/braid.yaml` for the annotated reference).
#[derive(Debug, Clone)]
pub struct Document {
    /// The model server in this pod; what `backend: local` means.
    pub executor: Option<Upstream>,
    pub routes: Vec<RouteSpec>,
}

#[derive(Debug, Clone)]
pub struct RouteSpec {
    /// Position in the document's `routes` list.
    pub at: usize,
    /// Metric label and `/config` name; defaults to the model or the path prefix.
    pub name: Option<String>,
    /// Matches `/v2/models/{model}/...` and `/v1/models/{model}:verb`.
    pub model: Option<String>,
    /// Matches any path that starts with it, when no model route matched.
    pub path_prefix: Option<String>,
    pub variants: Vec<VariantSpec>,
    pub sticky_header: Option<HeaderName>,
    pub override_header: HeaderName,
    /// Whole-request deadline for the upstream answer (until response headers; for an
    /// OpenAI-style stream, until its first token).
    pub timeout: Option<Duration>,
    /// An OpenAI-style stream with no first token this long after it was sent is
    /// failed (and retried or sent to the fallback, as the route allows).
    pub ttft_timeout: Option<Duration>,
    pub batching: Option<Batching>,
    pub retry: Option<RetryPolicy>,
    pub shadow: Option<Shadow>,
    /// Variant that serves a request when its own variant is ejected or failed.
    pub fallback: Option<String>,
    pub outlier: Option<Outlier>,
    /// Requests in flight on this route at once; more get 429.
    pub max_inflight: Option<u64>,
    /// Share of this route's requests written to the access log (when braid has one).
    pub access_log_fraction: Option<f64>,
    pub guardrail: Option<GuardrailSpec>,
    /// `log`: the sampled payload log.
    pub payload_log: Option<crate::payload::Settings>,
    /// How requests wait for a variant's `max_concurrent` places.
    pub admission: Option<Admission>,
}

/// `routes[].guardrail`, as written: the control by name (`guardrail.control` is set
/// to its index when the route is compiled).
#[derive(Debug, Clone)]
pub struct GuardrailSpec {
    pub control: String,
    pub guardrail: Guardrail,
}

#[derive(Debug, Clone)]
pub struct VariantSpec {
    /// Position in the route's `variants` list.
    pub at: usize,
    pub name: String,
    /// Relative weight; finite and >= 0, checked here; "not all zero" in validate.
    pub weight: f64,
    pub backend: BackendSpec,
    /// Model name at the backend; defaults to the route's model.
    pub target_model: Option<String>,
    /// How to reach an `https://` backend.
    pub tls: Option<crate::upstream::tls::UpstreamTls>,
    pub ramp: Option<Ramp>,
    /// Requests this variant serves at once (to their answer's last byte); more wait
    /// under the route's `admission`.
    pub max_concurrent: Option<u64>,
}

#[derive(Debug, Clone)]
pub enum BackendSpec {
    /// The executor named at the top of the document.
    Local,
    Remote(Upstream),
}

#[derive(Debug, Clone)]
pub struct Batching {
    pub max_batch_size: u64,
    pub max_delay: Option<Duration>,
    pub max_queue: u64,
    pub queue_timeout: Option<Duration>,
    pub max_inflight: u64,
    /// Name of the row-id tensor the executor echoes (see `batch::codec`).
    pub row_id: Option<String>,
    /// Priority classes, highest first; empty: one class.
    pub priorities: Vec<PriorityClass>,
    /// Index into `priorities` of the class a request that names none gets.
    pub default_priority: usize,
}

/// `routes[].admission`: how requests wait for a variant's `max_concurrent` places.
#[derive(Debug, Clone)]
pub struct Admission {
    pub max_queue: u64,
    pub queue_timeout: Option<Duration>,
    /// Priority classes, highest first; empty: one class.
    pub priorities: Vec<PriorityClass>,
    pub default_priority: usize,
}

impl Default for Admission {
    /// A route without an `admission` block: one class, 64 waiting, each at most 30 s.
    fn default() -> Self {
        Admission {
            max_queue: 64,
            queue_timeout: Some(Duration::from_secs(30)),
            priorities: Vec::new(),
            default_priority: 0,
        }
    }
}

impl PriorityClass {
    /// The class compiled, its limits falling back to its block's.
    pub fn limits(&self, max_queue: u64, queue_timeout: Option<Duration>) -> ClassLimits {
        ClassLimits {
            name: self.name.as_str().into(),
            max_queue: self.max_queue.unwrap_or(max_queue) as usize,
            queue_timeout: self.queue_timeout.or(queue_timeout),
            sheddable: self.sheddable,
        }
    }
}

#[derive(Debug, Clone)]
pub struct PriorityClass {
    pub name: String,
    pub max_queue: Option<u64>,
    pub queue_timeout: Option<Duration>,
    pub sheddable: bool,
}

#[derive(Debug, Clone)]
pub struct Shadow {
    pub variant: String,
    pub fraction: f64,
    /// Shadow copies in flight at once; more are skipped and counted.
    pub max_inflight: u64,
}

pub const DEFAULT_OVERRIDE_HEADER: &str = "x-braid-variant";

/// Reads a document; `None` when any error was recorded.
/// Reads a document. Items that had errors are left out (the errors are recorded), and
/// the rest keep their position in `at`, so later rules still name the right index.
pub fn document(root: &Node, errs: &mut Errors) -> Option<Document> {
    let mut obj = Obj::new(root, String::new(), errs)?;
    let executor = obj.opt("executor", upstream);
    let routes = obj
        .req("routes", |n, p, e| seq(n, p, e, route))
        .unwrap_or_default()
        .into_iter()
        .map(|(at, r)| RouteSpec { at, ..r })
        .collect();
    obj.finish(&["executor", "routes"]);
    Some(Document { executor, routes })
}

fn route(node: &Node, path: String, errs: &mut Errors) -> Option<RouteSpec> {
    let mut obj = Obj::new(node, path, errs)?;
    let sticky = obj.opt("sticky_header", header_name);
    let spec = RouteSpec {
        at: 0,
        name: obj.opt("name", name),
        model: obj.opt("model", model_name),
        path_prefix: obj.opt("path_prefix", path_prefix),
        variants: obj
            .req("variants", |n, p, e| seq(n, p, e, variant))
            .unwrap_or_default()
            .into_iter()
            .map(|(at, v)| VariantSpec { at, ..v })
            .collect(),
        sticky_header: sticky.clone(),
        override_header: obj
            .opt("override_header", header_name)
            .unwrap_or(HeaderName::from_static(DEFAULT_OVERRIDE_HEADER)),
        timeout: obj.opt("timeout", duration),
        ttft_timeout: obj.opt("ttft_timeout", duration),
        batching: obj.opt("batching", batching),
        retry: obj.opt("retry", retry),
        shadow: obj.opt("shadow", shadow),
        fallback: obj.opt("fallback", name),
        outlier: obj.opt("outlier", outlier),
        max_inflight: obj.opt("max_inflight", positive_int),
        access_log_fraction: obj.opt("access_log", access_log).flatten(),
        guardrail: obj.opt("guardrail", guardrail),
        admission: obj.opt("admission", admission),
        // The default allowlist names the route's sticky header too.
        payload_log: obj.opt("log", payload_log).map(|(mut log, defaulted)| {
            if defaulted {
                log.headers.extend(sticky);
            }
            log
        }),
    };
    obj.finish(&[
        "name",
        "model",
        "path_prefix",
        "variants",
        "sticky_header",
        "override_header",
        "timeout",
        "ttft_timeout",
        "batching",
        "retry",
        "shadow",
        "fallback",
        "outlier",
        "max_inflight",
        "access_log",
        "guardrail",
        "admission",
        "log",
    ]);
    Some(spec)
}

/// Largest `log.max_bytes`: a record holds two bodies this long.
const MAX_PAYLOAD_BYTES: u64 = 8 * 1024 * 1024;

/// A request header the payload log may write: never one that may carry credentials.
fn logged_header(node: &Node, path: String, errs: &mut Errors) -> Option<HeaderName> {
    let h = header_name(node, path.clone(), errs)?;
    if crate::payload::is_credential(h.as_str()) {
        return errs.push(
            path,
            format!("{:?} may carry credentials and is never logged", h.as_str()),
        );
    }
    Some(h)
}

/// `routes[].log`, and whether its header allowlist is the default (`content-type`,
/// to which the route adds its sticky header).
fn payload_log(
    node: &Node,
    path: String,
    errs: &mut Errors,
) -> Option<(crate::payload::Settings, bool)> {
    use crate::payload::{Settings, Sink};
    let mut obj = Obj::new(node, path.clone(), errs)?;
    let fraction = obj.req("fraction", fraction);
    let max_bytes = obj.opt("max_bytes", positive_int).unwrap_or(64 * 1024);
    let sink = obj.req("sink", string);
    let rotate_bytes = obj.opt("rotate_bytes", positive_int);
    let keep = obj.opt("keep", int);
    let headers = obj.opt("headers", |n, p, e| seq(n, p, e, logged_header));
    obj.finish(&[
        "fraction",
        "max_bytes",
        "sink",
        "rotate_bytes",
        "keep",
        "headers",
    ]);
    let defaulted = headers.is_none();
    let headers = match headers {
        Some(list) => list.into_iter().map(|(_, h)| h).collect(),
        None => vec![http::header::CONTENT_TYPE],
    };
    if max_bytes > MAX_PAYLOAD_BYTES {
        errs.push::<()>(
            format!("{path}.max_bytes"),
            format!("must be at most {MAX_PAYLOAD_BYTES} (8 MiB)"),
        );
    }
    if keep.is_some_and(|k| k > 100) {
        errs.push::<()>(format!("{path}.keep"), "must be at most 100".into());
    }
    let raw = sink?;
    let sink = crate::addr::redacted(&raw);
    let sink = if sink.starts_with("http://") {
        let uri: http::Uri = match raw.parse() {
            Ok(u) => u,
            Err(e) => {
                return errs.push(
                    format!("{path}.sink"),
                    format!("{sink:?} is not a URL: {e}"),
                );
            }
        };
        no_userinfo(&uri, &format!("{path}.sink"), errs)?;
        if uri.host().is_none() {
            return errs.push(format!("{path}.sink"), format!("{sink:?} has no host"));
        }
        for (key, set) in [
            ("rotate_bytes", rotate_bytes.is_some()),
            ("keep", keep.is_some()),
        ] {
            if set {
                errs.push::<()>(format!("{path}.{key}"), "applies to file sinks only".into());
            }
        }
        Sink::Http(uri)
    } else if sink.starts_with('/') {
        Sink::File {
            path: raw.into(),
            rotate_bytes: rotate_bytes.unwrap_or(100 * 1024 * 1024),
            keep: keep.unwrap_or(3) as u32,
        }
    } else {
        return errs.push(
            format!("{path}.sink"),
            format!("{sink:?} must be an absolute file path or an http:// URL"),
        );
    };
    let settings = Settings {
        fraction: fraction?,
        max_bytes: max_bytes.min(MAX_PAYLOAD_BYTES) as usize,
        sink,
        headers,
    };
    Some((settings, defaulted))
}

fn access_log(node: &Node, path: String, errs: &mut Errors) -> Option<Option<f64>> {
    let mut obj = Obj::new(node, path, errs)?;
    let f = obj.opt("fraction", fraction);
    obj.finish(&["fraction"]);
    Some(f)
}

fn variant(node: &Node, path: String, errs: &mut Errors) -> Option<VariantSpec> {
    let mut obj = Obj::new(node, path, errs)?;
    let name = obj.req("name", name);
    let weight = obj.opt("weight", weight).unwrap_or(1.0);
    let backend = obj.req("backend", backend);
    let target_model = obj.opt("target_model", model_name);
    let tls = obj.opt("tls", upstream_tls);
    let ramp = obj.opt("ramp", ramp);
    let max_concurrent = obj.opt("max_concurrent", positive_int);
    obj.finish(&[
        "name",
        "weight",
        "backend",
        "target_model",
        "tls",
        "ramp",
        "max_concurrent",
    ]);
    Some(VariantSpec {
        at: 0,
        name: name?,
        weight,
        backend: backend?,
        target_model,
        tls,
        ramp,
        max_concurrent,
    })
}

fn upstream_tls(
    node: &Node,
    path: String,
    errs: &mut Errors,
) -> Option<crate::upstream::tls::UpstreamTls> {
    let mut obj = Obj::new(node, path, errs)?;
    let ca_file = obj.req("ca_file", string);
    let cert_file = obj.opt("cert_file", string);
    let key_file = obj.opt("key_file", string);
    let server_name = obj.opt("server_name", string);
    obj.finish(&["ca_file", "cert_file", "key_file", "server_name"]);
    Some(crate::upstream::tls::UpstreamTls {
        ca_file: ca_file?.into(),
        cert_file: cert_file.map(Into::into),
        key_file: key_file.map(Into::into),
        server_name,
    })
}

fn batching(node: &Node, path: String, errs: &mut Errors) -> Option<Batching> {
    let mut obj = Obj::new(node, path.clone(), errs)?;
    let (priorities, default_priority) = priorities(&mut obj);
    let b = Batching {
        max_batch_size: obj.opt("max_batch_size", positive_int).unwrap_or(32),
        max_delay: obj.opt("max_delay", duration_or_zero),
        max_queue: obj.opt("max_queue", positive_int).unwrap_or(1024),
        queue_timeout: obj.opt("queue_timeout", duration),
        max_inflight: obj.opt("max_inflight", positive_int).unwrap_or(1),
        row_id: obj.opt("row_id", name),
        priorities,
        default_priority: 0,
    };
    obj.finish(&[
        "max_batch_size",
        "max_delay",
        "max_queue",
        "queue_timeout",
        "max_inflight",
        "row_id",
        "priorities",
        "default_priority",
    ]);
    let mut b = b;
    b.default_priority = class_index(&b.priorities, default_priority, &path, errs);
    Some(b)
}

/// A block's `priorities` list and `default_priority` name, as written.
fn priorities(obj: &mut Obj) -> (Vec<PriorityClass>, Option<String>) {
    let classes = obj
        .opt("priorities", |n, p, e| seq(n, p, e, priority_class))
        .unwrap_or_default()
        .into_iter()
        .map(|(_, c)| c)
        .collect();
    (classes, obj.opt("default_priority", name))
}

/// Checks a `priorities` list (no name twice) and finds its `default_priority`.
fn class_index(
    priorities: &[PriorityClass],
    default: Option<String>,
    path: &str,
    errs: &mut Errors,
) -> usize {
    for (i, c) in priorities.iter().enumerate() {
        if priorities[..i].iter().any(|o| o.name == c.name) {
            errs.push::<()>(
                format!("{path}.priorities[{i}].name"),
                format!("priority class {:?} is defined twice", c.name),
            );
        }
    }
    let Some(d) = default else { return 0 };
    match priorities.iter().position(|c| c.name == d) {
        Some(i) => i,
        None => {
            let known: Vec<&str> = priorities.iter().map(|c| c.name.as_str()).collect();
            errs.push::<()>(
                format!("{path}.default_priority"),
                format!("{d:?} is not one of this route's priority classes {known:?}"),
            );
            0
        }
    }
}

/// `routes[].admission`: the queue of variants with `max_concurrent`.
fn admission(node: &Node, path: String, errs: &mut Errors) -> Option<Admission> {
    let mut obj = Obj::new(node, path.clone(), errs)?;
    let (priorities, default_priority) = priorities(&mut obj);
    let d = Admission::default();
    let mut a = Admission {
        max_queue: obj.opt("max_queue", positive_int).unwrap_or(d.max_queue),
        queue_timeout: obj.opt("queue_timeout", duration).or(d.queue_timeout),
        priorities,
        default_priority: 0,
    };
    obj.finish(&[
        "max_queue",
        "queue_timeout",
        "priorities",
        "default_priority",
    ]);
    a.default_priority = class_index(&a.priorities, default_priority, &path, errs);
    Some(a)
}

fn priority_class(node: &Node, path: String, errs: &mut Errors) -> Option<PriorityClass> {
    let mut obj = Obj::new(node, path, errs)?;
    let class_name = obj.req("name", name);
    let max_queue = obj.opt("max_queue", positive_int);
    let queue_timeout = obj.opt("queue_timeout", duration);
    let sheddable = obj.opt("sheddable", boolean).unwrap_or(false);
    obj.finish(&["name", "max_queue", "queue_timeout", "sheddable"]);
    Some(PriorityClass {
        name: class_name?,
        max_queue,
        queue_timeout,
        sheddable,
    })
}

fn retry(node: &Node, path: String, errs: &mut Errors) -> Option<RetryPolicy> {
    let mut obj = Obj::new(node, path, errs)?;
    let d = RetryPolicy::default();
    let r = RetryPolicy {
        attempts: obj
            .opt("attempts", positive_int)
            .map_or(2, |n| n.min(100) as u32),
        per_try_timeout: obj.opt("per_try_timeout", duration),
        idempotent: obj.opt("idempotent", boolean).unwrap_or(false),
        on_status: obj
            .opt("on_status", |n, p, e| seq(n, p, e, status_code))
            .map_or(d.on_status, |v| v.into_iter().map(|(_, c)| c).collect()),
        backoff_base: obj.opt("backoff_base", duration).unwrap_or(d.backoff_base),
        backoff_max: obj.opt("backoff_max", duration).unwrap_or(d.backoff_max),
        retry_after_cap: obj
            .opt("retry_after_cap", duration)
            .unwrap_or(d.retry_after_cap),
        max_body_bytes: obj
            .opt("max_body_bytes", int)
            .map_or(d.max_body_bytes, |n| n as usize),
        budget_ratio: obj.opt("budget_ratio", fraction).unwrap_or(d.budget_ratio),
        min_retries_per_second: obj
            .opt("min_retries_per_second", int)
            .map_or(d.min_retries_per_second, |n| n.min(1_000_000) as u32),
    };
    obj.finish(&[
        "attempts",
        "per_try_timeout",
        "idempotent",
        "on_status",
        "backoff_base",
        "backoff_max",
        "retry_after_cap",
        "max_body_bytes",
        "budget_ratio",
        "min_retries_per_second",
    ]);
    Some(r)
}

fn outlier(node: &Node, path: String, errs: &mut Errors) -> Option<Outlier> {
    let mut obj = Obj::new(node, path, errs)?;
    let d = Outlier::default();
    let o = Outlier {
        consecutive_failures: obj
            .opt("consecutive_failures", positive_int)
            .map_or(d.consecutive_failures, |n| n.min(1_000_000) as u32),
        base_ejection: obj
            .opt("base_ejection", duration)
            .unwrap_or(d.base_ejection),
        max_ejection: obj.opt("max_ejection", duration).unwrap_or(d.max_ejection),
    };
    obj.finish(&["consecutive_failures", "base_ejection", "max_ejection"]);
    Some(o)
}

/// An HTTP status a retry may follow: 4xx or 5xx.
fn status_code(node: &Node, path: String, errs: &mut Errors) -> Option<u16> {
    match int(node, path.clone(), errs)? {
        n @ 400..=599 => Some(n as u16),
        n => errs.push(path, format!("{n} is not an error status (400-599)")),
    }
}

fn boolean(node: &Node, path: String, errs: &mut Errors) -> Option<bool> {
    match node {
        Node::Bool(b) => Some(*b),
        other => errs.push(
            path,
            format!("expected true or false, found {}", other.kind()),
        ),
    }
}

fn shadow(node: &Node, path: String, errs: &mut Errors) -> Option<Shadow> {
    let mut obj = Obj::new(node, path, errs)?;
    let variant = obj.req("variant", name);
    let fraction = obj.req("fraction", fraction);
    let max_inflight = obj.opt("max_inflight", positive_int).unwrap_or(64);
    obj.finish(&["variant", "fraction", "max_inflight"]);
    Some(Shadow {
        variant: variant?,
        fraction: fraction?,
        max_inflight,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("100us").unwrap(), Duration::from_micros(100));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        for bad in ["", "5", "ms", "5 ms", "-1s", "5parsecs", "1e3s", "1..2s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn rfc3339_times() {
        let t = |s: &str| {
            parse_rfc3339(s).map(|t| {
                t.duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_secs_f64()
            })
        };
        assert_eq!(t("1970-01-01T00:00:00Z"), Some(0.0));
        assert_eq!(t("2026-12-01T09:00:00Z"), Some(1_796_115_600.0));
        assert_eq!(t("2026-12-01T10:00:00+01:00"), Some(1_796_115_600.0));
        assert_eq!(t("2026-12-01T08:30:00-00:30"), Some(1_796_115_600.0));
        assert_eq!(t("2024-02-29T00:00:00.250Z"), Some(1_709_164_800.25));
        for bad in [
            "2026-12-01",
            "2026-12-01T09:00:00",
            "2026-13-01T09:00:00Z",
            "2025-02-29T00:00:00Z",
            "2026-12-01T24:00:00Z",
            "2026-12-01T09:00:00+1:00",
            "2026-12-01T09:00:00.Z",
            "tomorrow",
        ] {
            assert_eq!(t(bad), None, "{bad}");
        }
    }

    /// `batching.max_delay: 0ms` is "never wait"; a zero timeout is still refused.
    #[test]
    fn only_max_delay_may_be_zero() {
        let route = |batching: &str, timeout: &str| {
            format!(
                "executor: http://127.0.0.1:1\nroutes:\n  - model: m\n    timeout: {timeout}\n    variants: [{{ name: a, backend: local }}]\n    batching: {batching}\n"
            )
        };
        let root = crate::config::parse_document(&route("{ max_delay: 0ms }", "1s")).unwrap();
        let doc = document(&root, &mut Errors::default()).unwrap();
        let batching = doc.routes[0].batching.as_ref().unwrap();
        assert_eq!(batching.max_delay, Some(Duration::ZERO));
        let errs = crate::config::load(&route("{ max_delay: 0ms }", "0s"), "test").unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].to_string().contains("must be greater than zero"),
            "{errs:?}"
        );
    }
}
