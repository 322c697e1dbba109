//! The request path, composed in one place:
//!
//! ```text
//! snapshot = store.load()         one Arc<Snapshot> for the whole request
//!   -> route match                model name (OIP v2 / KServe v1), then path prefix
//!   -> assign variant             override header > sticky key > weighted random;
//!                                 an ejected variant's share goes to the fallback or the others
//!   -> read body (limit -> 413)
//!   -> shadow copy?               fire and forget, compared on its own task
//!   -> batch (local) or forward   retry (budget) -> per-try timeout -> pooled client
//!   -> fallback?                  when the variant failed and repeating is safe
//!   -> x-braid-variant + metrics  recorded once, here at the edge
//! ```

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{Method, Request, Response, Version};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tower::retry::budget::{Budget, TpsBudget};

use crate::batch::batching;
use crate::config::Store;
use crate::config::schema::{Protocol, parse_duration};
use crate::error::{Body, ProxyError};
use crate::metrics::Metrics;
use crate::route::shadow::{self, Tee};
use crate::route::{self, Match, Route, Variant, assign};
use crate::server::{self, ConnInfo, Handler};
use crate::upstream::health::Admit;
use crate::upstream::retry::{self, Attempts, Call, DEADLINE_HEADER, TryError};
use crate::upstream::{SendError, TlsPool, Upstreams};

pub static X_BRAID_VARIANT: HeaderName = HeaderName::from_static("x-braid-variant");
pub static X_BRAID_FALLBACK_FROM: HeaderName = HeaderName::from_static("x-braid-fallback-from");
pub static X_BRAID_SHADOW: HeaderName = HeaderName::from_static("x-braid-shadow");

/// How long a shadow copy may take when its route has no timeout.
const SHADOW_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Proxy {
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
    pub upstreams: Upstreams,
    pub max_body_bytes: usize,
    /// Requests answered at once; more get 503 + Retry-After.
    pub max_inflight: usize,
    /// One batcher per (route, variant), kept across reloads so queued requests survive.
    pub batchers: batching::Batchers,
}

impl Handler for Proxy {
    async fn call(&self, req: Request<Incoming>, conn: &ConnInfo) -> Response<Body> {
        let start = Instant::now();
        let inflight = self.metrics.inflight();
        if inflight.inc() >= self.max_inflight as i64 {
            inflight.dec();
            return self.unrouted(ProxyError::Overloaded);
        }
        let resp = self.route(req, conn, start).await;
        inflight.dec();
        resp
    }
}

/// One variant's answer, and whether sending the request elsewhere is safe.
struct Served {
    result: Result<Response<Body>, ProxyError>,
    /// The request certainly was not processed, or the route says repeating is harmless.
    repeatable: bool,
}

impl Served {
    /// An error that must not be sent anywhere else (a bad request, a deadline).
    fn error(e: ProxyError) -> Served {
        Served {
            result: Err(e),
            repeatable: false,
        }
    }

    fn failed(&self) -> bool {
        match &self.result {
            Ok(r) => r.status().is_server_error(),
            Err(e) => e.status().is_server_error(),
        }
    }
}

impl Proxy {
    async fn route(
        &self,
        req: Request<Incoming>,
        conn: &ConnInfo,
        start: Instant,
    ) -> Response<Body> {
        // One snapshot for the whole request: a reload cannot change it midway.
        let Some(snap) = self.store.load() else {
            return self.unrouted(ProxyError::NoConfig);
        };
        let Some(m) = snap.routes.find(req.uri().path()) else {
            return self.unrouted(ProxyError::NoRoute {
                path: req.uri().path().to_string(),
            });
        };
        let route = m.route;
        let (assigned, how) = match assign::assign(route, req.headers()) {
            Ok(a) => a,
            Err(assign::UnknownVariant(wanted)) => {
                return self.unrouted(ProxyError::UnknownVariant {
                    header: route.override_header.to_string(),
                    wanted,
                    valid: route.variant_names(),
                });
            }
        };
        let _permit = match &route.live.limit {
            None => None,
            Some(limit) => match limit.try_acquire() {
                Ok(p) => Some(p),
                Err(_) => {
                    return self.unrouted(ProxyError::RouteBusy {
                        route: route.name.to_string(),
                    });
                }
            },
        };
        let (mut vi, mut fallback_from) = if how == assign::Assignment::Override {
            (assigned, None)
        } else {
            self.avoid_ejected(route, assigned, req.headers())
        };

        let (parts, body) = req.into_parts();
        let prepared = match self.prepare(&parts, body, route, start).await {
            Ok(p) => p,
            Err(e) => return self.finish(route, vi, fallback_from, Err(e), start, None),
        };
        let shadow = self.start_shadow(&m, vi, &parts, &prepared.body, conn);
        let mut served = self.serve(&m, vi, &parts, &prepared, conn).await;
        if let Some(fb) = route.fallback
            && fb != vi
            && fallback_from.is_none()
            && served.failed()
            && served.repeatable
            && prepared.deadline.is_none_or(|d| d > Instant::now())
        {
            tracing::debug!(route = %route.name, from = %route.variants[vi].name, "serving from the fallback");
            fallback_from = Some(vi);
            vi = fb;
            served = self.serve(&m, vi, &parts, &prepared, conn).await;
        }
        self.finish(route, vi, fallback_from, served.result, start, shadow)
    }

    /// Headers, metrics and the shadow's copy of the answer, once, at the edge.
    fn finish(
        &self,
        route: &Route,
        vi: usize,
        fallback_from: Option<usize>,
        result: Result<Response<Body>, ProxyError>,
        start: Instant,
        shadow: Option<oneshot::Sender<PrimaryAnswer>>,
    ) -> Response<Body> {
        let variant = &route.variants[vi];
        let mut resp = result.unwrap_or_else(|e| {
            tracing::debug!(route = %route.name, variant = %variant.name, "{e}");
            e.into_response()
        });
        let headers = resp.headers_mut();
        headers.insert(X_BRAID_VARIANT.clone(), variant.header_value.clone());
        if let Some(from) = fallback_from {
            let from = &route.variants[from];
            headers.insert(X_BRAID_FALLBACK_FROM.clone(), from.header_value.clone());
            self.metrics.fallback(&route.name, &from.name);
        }
        let status = resp.status();
        self.metrics
            .request(&route.name, &variant.name, status.as_u16(), start.elapsed());
        if let Some(tx) = shadow {
            let (parts, body) = resp.into_parts();
            let (tee, copy) = Tee::new(body);
            let _ = tx.send(PrimaryAnswer { status, copy });
            resp = Response::from_parts(parts, tee.boxed());
        }
        resp
    }

    fn unrouted(&self, e: ProxyError) -> Response<Body> {
        self.metrics.unrouted(e.label());
        e.into_response()
    }

    /// The assigned variant, or, while it is ejected, the fallback (named in the
    /// response) or another variant by the same sticky/weighted rule. With every
    /// variant ejected, the assigned one is used anyway.
    fn avoid_ejected(
        &self,
        route: &Route,
        vi: usize,
        headers: &HeaderMap,
    ) -> (usize, Option<usize>) {
        if route.outlier.is_none() {
            return (vi, None);
        }
        let now = Instant::now();
        let health = |i: usize| route.variants[i].live.health.as_ref();
        let ejected = |i: usize| health(i).is_some_and(|h| h.is_ejected(now));
        let admit = health(vi).map_or(Admit::Yes, |h| h.admit(now));
        if admit != Admit::Ejected {
            return (vi, None);
        }
        if let Some(fb) = route.fallback
            && fb != vi
            && !ejected(fb)
        {
            return (fb, Some(vi));
        }
        let keep = |i: usize| i != vi && !ejected(i);
        let other = match route.sticky_header.as_ref().and_then(|h| headers.get(h)) {
            Some(key) => route.chooser.sticky_among(key.as_bytes(), keep),
            None => route.chooser.random_among(keep),
        };
        (other.unwrap_or(vi), None)
    }

    /// Reads the body and works out the request's deadline.
    async fn prepare(
        &self,
        parts: &http::request::Parts,
        body: Incoming,
        route: &Route,
        start: Instant,
    ) -> Result<Prepared, ProxyError> {
        let header_deadline = match parts.headers.get(DEADLINE_HEADER) {
            None => None,
            Some(v) => {
                let d = v
                    .to_str()
                    .ok()
                    .and_then(|s| parse_duration(s).ok())
                    .ok_or_else(|| {
                        ProxyError::BadRequest(format!(
                            "{DEADLINE_HEADER} must be a duration such as \"250ms\""
                        ))
                    })?;
                Some(start + d)
            }
        };
        let route_deadline = route.timeout.map(|t| start + t);
        let body = server::read_body(&parts.headers, body, self.max_body_bytes).await?;
        let budget = route.live.budget.clone();
        if let Some(b) = &budget {
            b.deposit();
        }
        Ok(Prepared {
            budget,
            body,
            deadline: [header_deadline, route_deadline]
                .into_iter()
                .flatten()
                .min(),
            by_header: header_deadline.is_some_and(|h| route_deadline.is_none_or(|r| h < r)),
        })
    }

    /// One variant's answer: coalesced for a local variant with batching, else
    /// forwarded with the route's retries.
    async fn serve(
        &self,
        m: &Match<'_>,
        vi: usize,
        parts: &http::request::Parts,
        prepared: &Prepared,
        conn: &ConnInfo,
    ) -> Served {
        let route = m.route;
        let variant = &route.variants[vi];
        let path = match upstream_path(m, variant, &parts.uri) {
            Ok(p) => p,
            Err(e) => return Served::error(e),
        };
        if let (true, Some(limits)) = (variant.local, route.batching)
            && parts.method == Method::POST
        {
            match batching::queueable(&parts.uri, &parts.headers, &prepared.body) {
                Ok(Some(item)) => {
                    let result = batching::submit(
                        self,
                        route,
                        variant,
                        limits,
                        item,
                        path.as_str().to_owned(),
                        prepared.deadline,
                    )
                    .await;
                    return Served {
                        result,
                        repeatable: route.retry.idempotent,
                    };
                }
                Ok(None) => {} // not mergeable: forwarded alone below
                Err(msg) => return Served::error(ProxyError::BadRequest(msg)),
            }
        }
        self.forward(route, variant, parts, prepared, path, conn)
            .await
    }

    async fn forward(
        &self,
        route: &Route,
        variant: &Variant,
        parts: &http::request::Parts,
        prepared: &Prepared,
        path: PathAndQuery,
        conn: &ConnInfo,
    ) -> Served {
        let safe_method = matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS);
        let may_repeat = safe_method || route.retry.idempotent;
        let mut out = match upstream_request(parts, &prepared.body, variant, path, conn) {
            Ok(r) => r,
            Err(e) => return Served::error(e),
        };
        let now = Instant::now();
        if let Some(d) = prepared.deadline {
            retry::set_deadline_header(&mut out, d.saturating_duration_since(now));
        }
        let health = variant.live.health.clone();
        // Named only in errors: made when one is.
        let backend = || variant.upstream.authority.to_string();
        // A route that neither retries, times tries out nor tracks health needs none of
        // the tower stack: one call, as cheap as it can be.
        let plain =
            route.retry.attempts <= 1 && route.retry.per_try_timeout.is_none() && health.is_none();
        let sent = async {
            if plain {
                return self
                    .upstreams
                    .send_with(variant.upstream.protocol, variant.tls.as_ref(), out)
                    .await
                    .map_err(TryError::from);
            }
            let attempts = Attempts {
                policy: route.retry.clone(),
                budget: prepared.budget.clone(),
                metrics: variant.live.retry_metrics.clone(),
                health: health.clone(),
                deadline: prepared.deadline,
                safe_method,
                body_len: prepared.body.len(),
                retried: 0,
            };
            let call = Call {
                upstreams: self.upstreams.clone(),
                protocol: variant.upstream.protocol,
                tls: variant.tls.clone(),
            };
            retry::send(call, attempts, out).await
        };
        let result = match prepared.deadline {
            Some(d) => match tokio::time::timeout_at(d, sent).await {
                Ok(r) => r,
                Err(_) => {
                    if let Some(h) = &health {
                        h.record(false, Instant::now());
                    }
                    let e = if prepared.by_header {
                        ProxyError::DeadlinePassed
                    } else {
                        ProxyError::Timeout {
                            backend: backend(),
                            after: route.timeout.unwrap_or_default(),
                        }
                    };
                    return Served::error(e);
                }
            },
            None => sent.await,
        };
        match result {
            Ok(resp) => {
                let repeatable =
                    resp.status() == http::StatusCode::SERVICE_UNAVAILABLE || may_repeat;
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Served {
                    result: Ok(Response::from_parts(
                        parts,
                        body.map_err(Into::into).boxed(),
                    )),
                    repeatable,
                }
            }
            Err(e) => {
                let repeatable = may_repeat || e.never_reached();
                let result = Err(match e {
                    TryError::Send(SendError::Connect(reason) | SendError::Refused(reason)) => {
                        ProxyError::Connect {
                            backend: backend(),
                            reason,
                        }
                    }
                    TryError::Send(SendError::Other(reason)) => ProxyError::Upstream {
                        backend: backend(),
                        reason,
                    },
                    TryError::Timeout(after) => ProxyError::Timeout {
                        backend: backend(),
                        after,
                    },
                });
                Served { result, repeatable }
            }
        }
    }

    /// Sends a copy of the request to the route's shadow variant, if this request is
    /// picked and a slot is free; returns where to deliver the primary's answer.
    fn start_shadow(
        &self,
        m: &Match<'_>,
        vi: usize,
        parts: &http::request::Parts,
        body: &Bytes,
        conn: &ConnInfo,
    ) -> Option<oneshot::Sender<PrimaryAnswer>> {
        let route = m.route;
        let sh = route.shadow?;
        if sh.variant == vi || assign::next_f64() >= sh.fraction {
            return None;
        }
        let variant = &route.variants[sh.variant];
        let permit = match route.live.shadow_limit.clone()?.try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                self.metrics
                    .shadow(&route.name, &variant.name, "skipped_saturated", None);
                return None;
            }
        };
        let path = upstream_path(m, variant, &parts.uri).ok()?;
        let mut req = upstream_request(parts, body, variant, path, conn).ok()?;
        req.headers_mut()
            .insert(X_BRAID_SHADOW.clone(), HeaderValue::from_static("1"));
        let (tx, primary) = oneshot::channel();
        let job = ShadowJob {
            upstreams: self.upstreams.clone(),
            protocol: variant.upstream.protocol,
            tls: variant.tls.clone(),
            timeout: route.timeout.unwrap_or(SHADOW_TIMEOUT),
            metrics: self.metrics.clone(),
            route: route.name.clone(),
            variant: variant.name.clone(),
        };
        tokio::spawn(async move {
            job.run(req, primary).await;
            drop(permit);
        });
        Some(tx)
    }
}

struct Prepared {
    body: Bytes,
    /// The earliest of the route timeout and the deadline header.
    deadline: Option<Instant>,
    /// The deadline came from the client's header (504 "deadline passed").
    by_header: bool,
    /// The route's retry budget, already credited with this request's one deposit
    /// (however many variants end up serving it); `None` without retries.
    budget: Option<Arc<TpsBudget>>,
}

/// What the shadow compares against.
struct PrimaryAnswer {
    status: http::StatusCode,
    copy: oneshot::Receiver<Option<Bytes>>,
}

struct ShadowJob {
    upstreams: Upstreams,
    protocol: Protocol,
    tls: Option<TlsPool>,
    timeout: Duration,
    metrics: Arc<Metrics>,
    route: Arc<str>,
    variant: Arc<str>,
}

impl ShadowJob {
    async fn run(self, req: Request<Full<Bytes>>, primary: oneshot::Receiver<PrimaryAnswer>) {
        let send = async {
            let resp = self
                .upstreams
                .send_with(self.protocol, self.tls.as_ref(), req)
                .await
                .ok()?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), shadow::COMPARE_LIMIT)
                .collect()
                .await
                .ok()?
                .to_bytes();
            Some((status, body))
        };
        let answer = tokio::time::timeout(self.timeout, send)
            .await
            .ok()
            .flatten();
        let (Some((status, body)), Ok(primary)) = (answer, primary.await) else {
            self.metrics
                .shadow(&self.route, &self.variant, "failed", None);
            return;
        };
        if status != primary.status {
            self.metrics
                .shadow(&self.route, &self.variant, "status_mismatch", None);
            return;
        }
        let divergence = match (status.is_success(), primary.copy.await) {
            (true, Ok(Some(copy))) => shadow::divergence(&copy, &body),
            _ => None,
        };
        self.metrics
            .shadow(&self.route, &self.variant, "status_match", divergence);
    }
}

/// The path at the backend: the model name rewritten to the variant's target.
fn upstream_path(m: &Match<'_>, variant: &Variant, uri: &Uri) -> Result<PathAndQuery, ProxyError> {
    let (Some(span), Some(target)) = (&m.model_span, &variant.target_model) else {
        // Nothing to rewrite: the client's own (already parsed) path and query.
        return Ok(uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")));
    };
    let path = route::rewrite_model(uri.path(), span, target);
    let path = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    PathAndQuery::try_from(path).map_err(|e| ProxyError::BadRequest(format!("path: {e}")))
}

/// The request as the variant's backend gets it.
fn upstream_request(
    parts: &http::request::Parts,
    body: &Bytes,
    variant: &Variant,
    path_and_query: PathAndQuery,
    conn: &ConnInfo,
) -> Result<Request<Full<Bytes>>, ProxyError> {
    let uri = Uri::builder()
        .scheme(variant.upstream.scheme.clone())
        .authority(variant.upstream.authority.clone())
        .path_and_query(path_and_query)
        .build()
        .map_err(|e| ProxyError::BadRequest(format!("uri: {e}")))?;
    let mut out = Request::new(Full::new(body.clone()));
    *out.method_mut() = parts.method.clone();
    *out.uri_mut() = uri;
    *out.version_mut() = match variant.upstream.protocol {
        // Over TLS, ALPN decides; the client speaks h2 on an h2 connection.
        Protocol::Http1 | Protocol::Tls => Version::HTTP_11,
        Protocol::H2c => Version::HTTP_2,
    };
    let mut headers = parts.headers.clone();
    strip_hop_by_hop(&mut headers);
    // The client sets Host from the backend's authority.
    headers.remove(header::HOST);
    append_forwarded_for(&mut headers, conn);
    *out.headers_mut() = headers;
    Ok(out)
}

/// Connection-scoped headers must not be forwarded (RFC 9110 §7.6.1).
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the names is cheaper than the removals.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    [
        &header::CONNECTION,
        &header::TE,
        &header::TRAILER,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
        &header::PROXY_AUTHORIZATION,
    ]
    .contains(&name)
        || name == "keep-alive"
        || name == "proxy-connection"
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

fn append_forwarded_for(headers: &mut HeaderMap, conn: &ConnInfo) {
    let value = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) => match HeaderValue::try_from(format!("{prev}, {}", conn.peer.ip())) {
            Ok(v) => v,
            Err(_) => return,
        },
        None => conn.peer_ip.clone(),
    };
    headers.insert(X_FORWARDED_FOR.clone(), value);
}

/// Default connect timeout for backends (a route timeout, when set, bounds it too).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
