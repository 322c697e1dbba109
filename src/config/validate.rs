//! Cross-field rules, then compilation of a `Document` into the immutable `Snapshot`
//! that requests read. Every rule failure names the field path it is about.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use http::HeaderValue;

use super::ConfigError;
use super::node::Node;
use super::schema::{Admission, BackendSpec, Document, RouteSpec};
use crate::addr::{Protocol, Upstream};
use crate::batch::queue::{BatchLimits, ClassLimits};
use crate::route::admission::AdmissionLimits;
use crate::route::experiment::{Action, Guardrail};
use crate::route::{Chooser, Route, RouteTable, ShadowRoute, Variant};
use crate::upstream::TlsPool;

/// One validated config: pure data, never mutated after it is compiled. The store binds
/// live state beside it (`config::Active`) and publishes the two together.
#[derive(Debug)]
pub struct Snapshot {
    /// Set by the store when it installs the snapshot; 1 for the first config.
    pub generation: u64,
    /// Where the document came from (`file:/etc/braid/braid.yaml`).
    pub source: String,
    pub loaded_at: SystemTime,
    /// Digest of the document text, to skip reloads of unchanged content.
    pub digest: u64,
    /// The document as parsed, shown on `/config`.
    pub document: Node,
    pub routes: RouteTable,
    /// Accepted but worth telling (settings this version validates but does not apply).
    pub warnings: Vec<String>,
    /// The model server in this pod, whose readiness gates braid's own.
    pub executor: Option<Upstream>,
}

/// What checking a document found: errors (each with its field path) and warnings.
#[derive(Default)]
struct Findings {
    errs: Vec<ConfigError>,
    warnings: Vec<String>,
}

impl Findings {
    fn err(&mut self, path: String, message: String) {
        self.errs.push(ConfigError { path, message });
    }

    fn warn(&mut self, warning: String) {
        self.warnings.push(warning);
    }
}

/// Names each route's match and name claims, to find the second claim of one.
#[derive(Default)]
struct Claims {
    route_names: HashMap<String, usize>,
    models: HashMap<String, usize>,
    prefixes: HashMap<String, usize>,
}

pub fn compile(
    doc: Document,
    root: Node,
    source: &str,
    text: &str,
    partial: bool,
) -> Result<Snapshot, Vec<ConfigError>> {
    let mut f = Findings::default();
    if doc.routes.is_empty() && !partial {
        f.err("routes".into(), "must list at least one route".into());
    }
    if doc
        .executor
        .as_ref()
        .is_some_and(|e| e.protocol == Protocol::Tls)
    {
        f.err(
            "executor".into(),
            "the executor is in this pod: use http:// or h2c://".into(),
        );
    }
    // TLS pools of https backends, by (route, variant) position; built here so a bad
    // CA or key file is an error with its field path.
    let mut pools: HashMap<(usize, usize), TlsPool> = HashMap::new();
    let mut claims = Claims::default();
    for spec in &doc.routes {
        let at = format!("routes[{}]", spec.at);
        check_claims(spec, &at, &mut claims, &mut f);
        check_counts(spec, &at, partial, &mut f);
        let variant_names = check_variants(&doc, spec, &at, &mut pools, &mut f);
        check_links(spec, &at, partial, &variant_names, &mut f);
        check_guardrail(spec, &at, partial, &variant_names, &mut f);
    }
    if !f.errs.is_empty() {
        return Err(f.errs);
    }
    Ok(Snapshot {
        generation: 0,
        source: source.to_string(),
        loaded_at: SystemTime::now(),
        digest: super::digest(text.as_bytes()),
        document: root,
        routes: RouteTable::new(
            doc.routes
                .iter()
                .map(|spec| compile_route(spec, doc.executor.as_ref(), &pools))
                .collect(),
        ),
        warnings: f.warnings,
        executor: doc.executor,
    })
}

/// A route's model, path prefix and name, each claimed by one route only.
fn check_claims(spec: &RouteSpec, at: &str, claims: &mut Claims, f: &mut Findings) {
    let ri = spec.at;
    let (models, prefixes) = (&mut claims.models, &mut claims.prefixes);
    match (&spec.model, &spec.path_prefix) {
        (Some(_), Some(_)) => f.err(
            at.to_string(),
            "set either `model` or `path_prefix`, not both".into(),
        ),
        (None, None) => f.err(at.to_string(), "must set `model` or `path_prefix`".into()),
        (Some(m), None) => {
            if let Some(prev) = models.insert(m.clone(), ri) {
                f.err(
                    format!("{at}.model"),
                    format!("model {m:?} is already matched by routes[{prev}]"),
                );
            }
        }
        (None, Some(p)) => {
            if let Some(prev) = prefixes.insert(p.clone(), ri) {
                f.err(
                    format!("{at}.path_prefix"),
                    format!("path prefix {p:?} is already matched by routes[{prev}]"),
                );
            }
        }
    }
    let name = route_name(spec);
    if let Some(prev) = claims.route_names.insert(name.clone(), ri) {
        f.err(
            format!("{at}.name"),
            format!("route name {name:?} is already used by routes[{prev}]"),
        );
    }
}

/// At least one variant, and one with weight (a partial document may leave some out,
/// and counting rules would mislead).
fn check_counts(spec: &RouteSpec, at: &str, partial: bool, f: &mut Findings) {
    if partial {
        // Some variants may have been left out: counting rules would mislead.
    } else if spec.variants.is_empty() {
        f.err(
            format!("{at}.variants"),
            "must list at least one variant".into(),
        );
    } else if spec.variants.iter().all(|v| v.weight == 0.0) {
        f.err(
            format!("{at}.variants"),
            "all weights are zero: at least one variant must have weight > 0".into(),
        );
    }
}

/// Each variant: a unique name, a backend it can reach, TLS only where it is https
/// (its pool built into `pools`), a target model only on a model route. Returns the
/// names, by position.
fn check_variants<'s>(
    doc: &Document,
    spec: &'s RouteSpec,
    at: &str,
    pools: &mut HashMap<(usize, usize), TlsPool>,
    f: &mut Findings,
) -> HashMap<&'s str, usize> {
    let ri = spec.at;
    let mut variant_names: HashMap<&str, usize> = HashMap::new();
    for v in &spec.variants {
        let vi = v.at;
        if let Some(prev) = variant_names.insert(&v.name, vi) {
            f.err(
                format!("{at}.variants[{vi}].name"),
                format!(
                    "variant {:?} is already defined at variants[{prev}]",
                    v.name
                ),
            );
        }
        if matches!(v.backend, BackendSpec::Local) && doc.executor.is_none() {
            f.err(
                format!("{at}.variants[{vi}].backend"),
                "`local` needs the top-level `executor` URL".into(),
            );
        }
        let https = matches!(&v.backend, BackendSpec::Remote(u) if u.protocol == Protocol::Tls);
        match (&v.tls, https) {
            (None, true) => f.err(
                format!("{at}.variants[{vi}].tls"),
                "an https:// backend needs `tls: { ca_file: ... }`".into(),
            ),
            (Some(_), false) => f.err(
                format!("{at}.variants[{vi}].tls"),
                "only https:// backends use tls settings".into(),
            ),
            (Some(t), true) => match TlsPool::new(t) {
                Ok(pool) => {
                    pools.insert((ri, vi), pool);
                }
                Err(e) => f.err(format!("{at}.variants[{vi}].tls"), e),
            },
            (None, false) => {}
        }
        if v.target_model.is_some() && spec.model.is_none() {
            f.err(
                format!("{at}.variants[{vi}].target_model"),
                "only model routes can rewrite the model name".into(),
            );
        }
    }
    variant_names
}

/// What names a variant or bounds another setting: the shadow, the fallback, retry
/// and outlier bounds, batching, the sticky header.
fn check_links(
    spec: &RouteSpec,
    at: &str,
    partial: bool,
    variant_names: &HashMap<&str, usize>,
    f: &mut Findings,
) {
    if let Some(shadow) = &spec.shadow {
        if !partial && !variant_names.contains_key(shadow.variant.as_str()) {
            f.err(
                format!("{at}.shadow.variant"),
                format!(
                    "unknown variant {:?} (this route has: {})",
                    shadow.variant,
                    names(spec)
                ),
            );
        }
        if spec.fallback.as_deref() == Some(shadow.variant.as_str()) {
            f.err(
                format!("{at}.shadow.variant"),
                "the shadow variant cannot also be the fallback".into(),
            );
        }
    }
    if let Some(fallback) = &spec.fallback
        && !partial
        && !variant_names.contains_key(fallback.as_str())
    {
        f.err(
            format!("{at}.fallback"),
            format!(
                "unknown variant {fallback:?} (this route has: {})",
                names(spec)
            ),
        );
    }
    if let Some(r) = &spec.retry {
        if r.backoff_base > r.backoff_max {
            f.err(
                format!("{at}.retry.backoff_base"),
                "must not exceed backoff_max".into(),
            );
        }
        if let (Some(per_try), Some(total)) = (r.per_try_timeout, spec.timeout)
            && per_try > total
        {
            f.warn(format!(
                "{at}.retry.per_try_timeout: longer than the route timeout, so it never fires"
            ));
        }
    }
    if let Some(o) = &spec.outlier
        && o.base_ejection > o.max_ejection
    {
        f.err(
            format!("{at}.outlier.base_ejection"),
            "must not exceed max_ejection".into(),
        );
    }
    if spec.batching.is_some()
        && !spec
            .variants
            .iter()
            .any(|v| matches!(v.backend, BackendSpec::Local))
    {
        f.warn(format!(
            "{at}.batching: applies to `local` variants only; this route has none"
        ));
    }
    if spec.retry.is_some()
        && spec
            .variants
            .iter()
            .all(|v| matches!(v.backend, BackendSpec::Local))
        && spec.batching.is_some()
    {
        f.warn(format!(
            "{at}.retry: batched requests are not retried (a batch isolates failures by bisection instead)"
        ));
    }
}

/// The guardrail's control names a variant, with a candidate beside it.
fn check_guardrail(
    spec: &RouteSpec,
    at: &str,
    partial: bool,
    variant_names: &HashMap<&str, usize>,
    f: &mut Findings,
) {
    if let Some(g) = &spec.guardrail
        && !partial
    {
        if !variant_names.contains_key(g.control.as_str()) {
            f.err(
                format!("{at}.guardrail.control"),
                format!(
                    "unknown variant {:?} (this route has: {})",
                    g.control,
                    names(spec)
                ),
            );
        } else if spec.variants.len() < 2 {
            f.err(
                format!("{at}.guardrail"),
                "needs a candidate: the route has only its control".into(),
            );
        }
        if let Some(c) = spec.variants.iter().find(|v| v.name == g.control)
            && c.weight == 0.0
            && c.ramp.is_none()
        {
            f.warn(format!(
                "{at}.guardrail.control: {:?} has weight 0, so there is nothing to compare the candidates with and the guardrail never trips",
                g.control
            ));
        }
        if g.guardrail.action == Action::Hold && spec.variants.iter().all(|v| v.ramp.is_none()) {
            f.warn(format!(
                "{at}.guardrail.action: `hold` freezes ramps and no variant of this route has one; a trip only reports"
            ));
        }
    }
    if spec.sticky_header.as_ref() == Some(&spec.override_header) {
        f.err(
            format!("{at}.sticky_header"),
            "must differ from override_header".into(),
        );
    }
}

/// Builds the request-time form of a route; only called once every rule passed.
fn compile_route(
    spec: &RouteSpec,
    executor: Option<&Upstream>,
    pools: &HashMap<(usize, usize), TlsPool>,
) -> Route {
    let variants: Vec<Variant> = spec
        .variants
        .iter()
        .map(|v| Variant {
            name: Arc::from(v.name.as_str()),
            header_value: HeaderValue::from_str(&v.name).expect("names are checked"),
            weight: v.weight,
            upstream: match &v.backend {
                BackendSpec::Local => executor.cloned().expect("checked: local needs executor"),
                BackendSpec::Remote(u) => u.clone(),
            },
            local: matches!(v.backend, BackendSpec::Local),
            target_model: v
                .target_model
                .as_deref()
                .or(spec.model.as_deref())
                .map(Arc::from),
            tls: pools.get(&(spec.at, v.at)).cloned(),
            ramp: v.ramp.clone(),
            max_concurrent: v.max_concurrent.map(|n| n as usize),
        })
        .collect();
    Route {
        name: route_name(spec).into(),
        model: spec.model.as_deref().map(Arc::from),
        path_prefix: spec.path_prefix.clone(),
        chooser: Chooser::new(variants.iter().map(|v| (&*v.name, v.weight))),
        variants,
        sticky_header: spec.sticky_header.clone(),
        override_header: spec.override_header.clone(),
        timeout: spec.timeout,
        ttft_timeout: spec.ttft_timeout,
        batching: spec.batching.as_ref().map(|b| BatchLimits {
            max_batch_size: b.max_batch_size as usize,
            max_delay: b.max_delay,
            max_queue: b.max_queue as usize,
            queue_timeout: b.queue_timeout,
            max_inflight: b.max_inflight as usize,
            classes: b
                .priorities
                .iter()
                .map(|c| c.limits(b.max_queue, b.queue_timeout))
                .collect(),
            default_class: b.default_priority,
        }),
        retry: Arc::new(spec.retry.clone().unwrap_or_default()),
        outlier: spec.outlier,
        fallback: spec.fallback.as_ref().and_then(|f| variants_index(spec, f)),
        shadow: spec.shadow.as_ref().and_then(|s| {
            Some(ShadowRoute {
                variant: variants_index(spec, &s.variant)?,
                fraction: s.fraction,
                max_inflight: s.max_inflight as usize,
            })
        }),
        max_inflight: spec.max_inflight.map(|n| n as usize),
        access_log: spec.access_log_fraction.unwrap_or(1.0),
        guardrail: spec.guardrail.as_ref().and_then(|g| {
            Some(Guardrail {
                control: variants_index(spec, &g.control)?,
                ..g.guardrail.clone()
            })
        }),
        payload_log: spec.payload_log.clone(),
        admission: admission_limits(&spec.admission.clone().unwrap_or_default()),
        verdicts: Vec::new(),
        fingerprint: {
            let mut s = spec.clone();
            s.at = 0;
            super::digest(format!("{s:?}").as_bytes())
        },
        row_id: spec
            .batching
            .as_ref()
            .and_then(|b| b.row_id.as_deref())
            .map(Arc::from),
    }
}

/// A route's admission classes: those it names, else one of the block's limits.
fn admission_limits(a: &Admission) -> AdmissionLimits {
    let classes = match a.priorities.is_empty() {
        true => vec![ClassLimits {
            name: "default".into(),
            max_queue: a.max_queue as usize,
            queue_timeout: a.queue_timeout,
            sheddable: false,
        }],
        false => a
            .priorities
            .iter()
            .map(|c| c.limits(a.max_queue, a.queue_timeout))
            .collect(),
    };
    AdmissionLimits {
        classes,
        default_class: a.default_priority,
    }
}

fn variants_index(spec: &RouteSpec, name: &str) -> Option<usize> {
    spec.variants.iter().position(|v| v.name == name)
}

fn route_name(spec: &RouteSpec) -> String {
    spec.name
        .clone()
        .or_else(|| spec.model.clone())
        .or_else(|| spec.path_prefix.clone())
        .unwrap_or_default()
}

fn names(spec: &RouteSpec) -> String {
    spec.variants
        .iter()
        .map(|v| v.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}
