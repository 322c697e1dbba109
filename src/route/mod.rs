//! Routes as compiled data, and matching: the model name in Open Inference Protocol v2
//! and KServe v1 paths first, then the longest configured path prefix. A match also
//! says where the model name sits in the path so it can be rewritten to a variant's
//! `target_model`. Nothing here changes after compilation; the handles that do
//! (budgets, health, batchers) are in `live`, bound beside the table by the store.

pub mod admission;
pub mod assign;
pub mod evidence;
pub mod experiment;
pub mod live;
pub mod ramp;

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue};

use crate::addr::Upstream;
use crate::batch::queue::BatchLimits;
use crate::upstream::health::Outlier;
use crate::upstream::retry::RetryPolicy;
pub use assign::{Assignment, Chooser};

/// A compiled route, part of an immutable snapshot.
#[derive(Debug)]
pub struct Route {
    /// Metric label and `/config` name.
    pub name: Arc<str>,
    pub model: Option<Arc<str>>,
    pub path_prefix: Option<String>,
    pub variants: Vec<Variant>,
    /// Precomputed weights for sticky and random assignment.
    pub chooser: Chooser,
    pub sticky_header: Option<HeaderName>,
    pub override_header: HeaderName,
    pub timeout: Option<Duration>,
    /// How long an OpenAI-style stream may take to its first token, per try.
    pub ttft_timeout: Option<Duration>,
    /// Coalescing for local variants; `None`: each request is sent on its own.
    pub batching: Option<BatchLimits>,
    /// `batching.row_id`: the tensor the executor must echo so a batch reply's row
    /// order can be checked.
    pub row_id: Option<Arc<str>>,
    /// Retries for forwarded requests (one attempt when the route has no `retry`).
    pub retry: Arc<RetryPolicy>,
    /// Failure accrual per variant; `None`: variants are never ejected.
    pub outlier: Option<Outlier>,
    /// Index of the variant that serves when the assigned one is ejected or failed.
    pub fallback: Option<usize>,
    pub shadow: Option<ShadowRoute>,
    /// Requests in flight on this route at once; more get 429.
    pub max_inflight: Option<usize>,
    /// Share of requests written to the access log, when braid runs with one.
    pub access_log: f64,
    /// Watches every other variant against a control.
    pub guardrail: Option<experiment::Guardrail>,
    /// The sampled payload log (`log`).
    pub payload_log: Option<crate::payload::Settings>,
    /// How requests wait for a variant's `max_concurrent` places.
    pub admission: admission::AdmissionLimits,
    /// Digest of the route's settings: an experiment (its trips, evidence and counts)
    /// starts afresh when they change.
    pub fingerprint: u64,
    /// Per variant: the fleet's verdict on it, from the ConfigMap's verdicts key (empty
    /// when there are none). Not part of `fingerprint`: a verdict changes the weights,
    /// not the experiment.
    pub verdicts: Vec<Option<experiment::Verdict>>,
}

/// A route's shadow traffic: a copy of `fraction` of requests goes to `variant`.
#[derive(Debug, Clone, Copy)]
pub struct ShadowRoute {
    pub variant: usize,
    pub fraction: f64,
    pub max_inflight: usize,
}

#[derive(Debug)]
pub struct Variant {
    pub name: Arc<str>,
    /// `x-braid-variant` value, built once at load instead of per response.
    pub header_value: HeaderValue,
    pub weight: f64,
    pub upstream: Upstream,
    /// Served by the executor in this pod (the batching issue coalesces these).
    pub local: bool,
    /// Model name at the backend; `None` on path-prefix routes (path kept as is).
    pub target_model: Option<Arc<str>>,
    /// The connection pool of an `https://` backend (shared by content, across reloads).
    pub tls: Option<crate::upstream::TlsPool>,
    /// The weight's schedule on the wall clock; `weight` applies before it starts.
    pub ramp: Option<ramp::Ramp>,
    /// Requests served at once, to their answer's last byte (`max_concurrent`).
    pub max_concurrent: Option<usize>,
}

impl Route {
    /// The names of this route's variants, for "unknown variant" errors.
    pub fn variant_names(&self) -> String {
        self.variants
            .iter()
            .map(|v| &*v.name)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// All routes of a snapshot, indexed for matching.
#[derive(Debug)]
pub struct RouteTable {
    pub routes: Vec<Route>,
    by_model: HashMap<Arc<str>, usize>,
    /// (prefix, route index), longest prefix first.
    prefixes: Vec<(String, usize)>,
}

/// The route a request matched, and where its model name sits in the path.
#[derive(Debug)]
pub struct Match<'a> {
    /// The route's position in the table (and in the live state bound beside it).
    pub index: usize,
    pub route: &'a Route,
    pub model_span: Option<Range<usize>>,
}

impl RouteTable {
    pub fn new(routes: Vec<Route>) -> Self {
        let mut by_model = HashMap::new();
        let mut prefixes = Vec::new();
        for (i, r) in routes.iter().enumerate() {
            if let Some(m) = &r.model {
                by_model.insert(m.clone(), i);
            }
            if let Some(p) = &r.path_prefix {
                prefixes.push((p.clone(), i));
            }
        }
        prefixes.sort_by_key(|p| std::cmp::Reverse(p.0.len()));
        RouteTable {
            routes,
            by_model,
            prefixes,
        }
    }

    /// The route serving `model` by name (a gRPC call names its model in its message,
    /// not its path).
    pub fn find_model(&self, model: &str) -> Option<Match<'_>> {
        let &i = self.by_model.get(model)?;
        Some(Match {
            index: i,
            route: &self.routes[i],
            model_span: None,
        })
    }

    /// The models routed by name, sorted, comma-separated (for a NOT_FOUND's message).
    pub fn models(&self) -> String {
        self.model_names().join(", ")
    }

    /// The models routed by name, sorted.
    pub fn model_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.by_model.keys().map(|m| &**m).collect();
        names.sort_unstable();
        names
    }

    pub fn find(&self, path: &str) -> Option<Match<'_>> {
        if let Some(span) = model_span(path)
            && let Some(&i) = self.by_model.get(&path[span.clone()])
        {
            return Some(Match {
                index: i,
                route: &self.routes[i],
                model_span: Some(span),
            });
        }
        self.prefixes
            .iter()
            .find(|(p, _)| path.starts_with(p.as_str()))
            .map(|&(_, i)| Match {
                index: i,
                route: &self.routes[i],
                model_span: None,
            })
    }
}

/// Where the model name is in an inference path:
/// `/v2/models/{m}[/...]` (OIP v2, Triton) or `/v1/models/{m}[:verb]` (KServe v1).
pub fn model_span(path: &str) -> Option<Range<usize>> {
    let (start, rest) = if let Some(rest) = path.strip_prefix("/v2/models/") {
        (11, rest)
    } else if let Some(rest) = path.strip_prefix("/v1/models/") {
        (11, rest)
    } else {
        return None;
    };
    let v1 = path.as_bytes()[2] == b'1';
    // Both ends are ASCII, so the bytes are searched (no characters decoded).
    let len = rest
        .bytes()
        .position(|b| b == b'/' || (v1 && b == b':'))
        .unwrap_or(rest.len());
    (len > 0).then_some(start..start + len)
}

/// The path with the model name replaced by the variant's target model.
pub fn rewrite_model(path: &str, span: &Range<usize>, target: &str) -> String {
    let mut out = String::with_capacity(path.len() + target.len());
    out.push_str(&path[..span.start]);
    out.push_str(target);
    out.push_str(&path[span.end..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_spans() {
        let cases = [
            ("/v2/models/sentiment/infer", Some("sentiment")),
            ("/v2/models/sentiment", Some("sentiment")),
            ("/v2/models/sentiment/ready", Some("sentiment")),
            ("/v2/models/s/versions/2/infer", Some("s")),
            ("/v1/models/sentiment:predict", Some("sentiment")),
            ("/v1/models/sentiment", Some("sentiment")),
            ("/v2/models/", None),
            ("/v2/models//infer", None),
            ("/v2/health/ready", None),
            ("/v3/models/x", None),
        ];
        for (path, want) in cases {
            assert_eq!(model_span(path).map(|s| &path[s]), want, "{path}");
        }
    }

    #[test]
    fn rewrites_only_the_model_segment() {
        let p = "/v2/models/sentiment/infer";
        let s = model_span(p).unwrap();
        assert_eq!(
            rewrite_model(p, &s, "sentiment-b"),
            "/v2/models/sentiment-b/infer"
        );
        let p = "/v1/models/sentiment:predict";
        let s = model_span(p).unwrap();
        assert_eq!(rewrite_model(p, &s, "m2"), "/v1/models/m2:predict");
    }
}
