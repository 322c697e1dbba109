//! The request path, composed in one function (`Proxy::route`) as a list of steps:
//! find, assign, admit, prepare, shadow, serve (with fallback), finish. The picture is
//! the crate doc's (`lib.rs`); docs/architecture.md walks one request through it. Each
//! step's detail lives beside it:
//!
//! - `wire/`: everything that differs by how the caller speaks (REST, OpenAI, gRPC):
//!   finding the route, the model rewrite, what may batch, what is safe to repeat, how
//!   an error is written;
//! - `context`: the request as one value (`Routed`, `Prepared`, `Cx`, `Served`);
//! - `admit`: limits held to the answer's last byte, a variant's `max_concurrent`;
//! - `forward`: the upstream request under the one retry loop; streamed calls;
//! - `batched`: coalescing through the variant's batcher;
//! - `generation`: an OpenAI answer's commit point and its measuring;
//! - `shadow` and `tee`: copies and their comparison;
//! - `finish`: headers, metrics, the experiment's outcome, logs and spans, once.

mod access;
mod admit;
mod batched;
mod context;
mod finish;
mod forward;
mod generation;
mod shadow;
mod spans;
mod tee;
#[cfg(test)]
mod tests;
mod wire;

pub use batched::HttpExecutor;

use std::sync::Arc;

use crate::server::RequestBody;
use bytes::Bytes;
use http::header::{HeaderMap, HeaderName};
use http::{Method, Request, Response};
use tokio::time::Instant;
use tower::retry::budget::Budget;

use crate::config::{Active, Store};
use crate::error::{Body, BoxError, ProxyError};
use crate::metrics::Metrics;
use crate::route::admission::Permit;
use crate::route::live::RouteLive;
use crate::route::{Chooser, Route, assign};
use crate::server::{self, ConnInfo, Handler};
use crate::trace::RequestTrace;
use crate::upstream::Upstreams;
use crate::upstream::health::Admit;
use context::{Cx, Prepared, Routed, Served};
use finish::Answered;
use wire::{Finding, Found, Pending, Unfound, Wire};

pub static X_BRAID_VARIANT: HeaderName = HeaderName::from_static("x-braid-variant");
pub static X_BRAID_FALLBACK_FROM: HeaderName = HeaderName::from_static("x-braid-fallback-from");
pub static X_BRAID_SHADOW: HeaderName = HeaderName::from_static("x-braid-shadow");

pub struct Proxy {
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
    /// One line per sampled request, when braid runs with `--access-log`.
    pub access_log: Option<Arc<crate::access::AccessLog>>,
    /// Spans and trace context, when the `OTEL_*` variables name an endpoint.
    pub tracer: Option<Arc<crate::trace::export::Tracer>>,
    pub upstreams: Upstreams,
    pub max_body_bytes: usize,
    /// Requests answered at once; more get 503 + Retry-After.
    pub max_inflight: usize,
    /// A request body silent this long is 408.
    pub body_idle_timeout: std::time::Duration,
    /// Every request body's bytes are reserved here while the request lives.
    pub buffers: server::ByteBudget,
}

/// A caller's deadline (`x-braid-timeout`, `grpc-timeout`) on a route without a
/// timeout of its own is at most this far away; on a route with one, at most that.
pub use crate::headers::LONGEST_CALLER_TIMEOUT;

impl Handler for Proxy {
    async fn call(&self, req: Request<RequestBody>, conn: &ConnInfo) -> Response<Body> {
        self.handle(req, conn).await
    }
}

/// A request as it arrives: its connection, when, and how its caller speaks.
struct Arrival<'a> {
    conn: &'a ConnInfo,
    start: Instant,
    trace: Option<RequestTrace>,
    wire: Wire,
}

/// What a request holds while it lives: the bytes its body buffers (given back when
/// `handle` returns, however it returns), and what its answer holds to its last byte.
struct Holds {
    buffers: server::Reservation,
    to_the_end: admit::Held,
}

/// The variant a request was assigned, with its route and its body as found.
struct Assigned<'a, B> {
    r: Routed<'a>,
    body: Pending<B>,
    vi: usize,
    /// Sent to the fallback before being tried, the assigned variant being ejected.
    fallback_from: Option<usize>,
}

impl Proxy {
    /// Answers one request. Generic over the body so tests call it in-process with no
    /// socket (axum's `oneshot` style); the listener calls it with hyper's body.
    pub async fn handle<B>(&self, req: Request<B>, conn: &ConnInfo) -> Response<Body>
    where
        B: hyper::body::Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        let start = Instant::now();
        let (parts, body) = req.into_parts();
        let wire = Wire::of(&parts);
        // Counted to the answer's last byte (given back by Drop: a client that leaves
        // mid-request drops this future, one that leaves mid-answer drops its body).
        let (inflight, counted) = admit::InFlight::count(self.metrics.inflight());
        if counted > self.max_inflight as i64 {
            return self.unrouted(ProxyError::Overloaded, wire);
        }
        let mut holds = Holds {
            buffers: server::Reservation::default(),
            to_the_end: admit::Held {
                _inflight: Some(inflight),
                ..admit::Held::default()
            },
        };
        let trace = self.tracer.as_ref().map(|t| t.begin(&parts.headers));
        let resp = match self.store.load() {
            // One snapshot for the whole request: a reload cannot change it midway.
            Some(active) => {
                let a = Arrival {
                    conn,
                    start,
                    trace,
                    wire,
                };
                self.route(&active, &parts, body, a, &mut holds).await
            }
            None => self.unrouted(ProxyError::NoConfig, wire),
        };
        std::mem::take(&mut holds.to_the_end).around(resp)
    }

    /// How this request's body is read: braid's limits, its deadline if known, its
    /// bytes reserved into `held`.
    fn body_rules<'a>(
        &'a self,
        deadline: Option<Instant>,
        held: &'a mut server::Reservation,
    ) -> server::BodyRules<'a> {
        server::BodyRules {
            limit: self.max_body_bytes,
            idle: self.body_idle_timeout,
            deadline,
            reserve: Some((&self.buffers, held)),
        }
    }

    /// The request path, one step a line.
    async fn route<B>(
        &self,
        active: &Active,
        parts: &http::request::Parts,
        body: B,
        a: Arrival<'_>,
        holds: &mut Holds,
    ) -> Response<Body>
    where
        B: hyper::body::Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        let wire = a.wire;
        // Find: the route, by the wire's rule (reading the body where it names the route).
        let found = match wire.find(active, parts, body) {
            Finding::Now(found) => found,
            Finding::InBody(body) => {
                let reading = wire.find_in_body(self, active, parts, body, &mut holds.buffers);
                reading.await
            }
        };
        let found = match found {
            Ok(found) => found,
            Err(Unfound::Answer(resp)) => return *resp,
            Err(Unfound::Refused(e)) => return self.unrouted(e, wire),
        };
        // Assign: the variant, under the weights in force, away from an ejected one;
        // admit: one of the route's `max_inflight` places, held to the answer's end.
        let Assigned {
            r,
            body,
            vi,
            fallback_from,
        } = match self.assign(active, found, parts, a, &mut holds.to_the_end) {
            Ok(assigned) => assigned,
            Err(e) => return self.unrouted(e, wire),
        };
        // Answered before it was served, by the assigned variant.
        let unserved = |result| Answered {
            vi,
            fallback_from,
            result,
        };
        // A streamed call goes through as it arrives: nothing to read, nothing retried.
        if wire.streamed() {
            let result = Box::pin(self.stream_through(&r, vi, body)).await;
            return self.finish(&r, unserved(result), None, None);
        }
        // Prepare: the body read whole (at most --max-body-bytes), the deadline known.
        let prepared = match self.prepare(&r, body, &mut holds.buffers).await {
            Ok(p) => p,
            Err(e) => return self.finish(&r, unserved(Err(e)), None, None),
        };
        let cx = Cx {
            r: &r,
            prepared: &prepared,
        };
        // Shadow: a copy to the route's shadow variant, fire and forget.
        let shadow = match wire.shadowed() {
            true => self.start_shadow(&cx, vi),
            false => None,
        };
        // Serve: the variant's answer (a place first where it has max_concurrent), or
        // the fallback's, once, when it failed and repeating is safe.
        let answered = self.serve_or_fall_back(&cx, vi, fallback_from, holds).await;
        // Finish: headers, metrics, the experiment's outcome, logs, once, at the edge.
        self.finish(&r, answered, Some(&prepared.body), shadow)
    }

    fn unrouted(&self, e: ProxyError, wire: Wire) -> Response<Body> {
        self.metrics.unrouted(e.label());
        wire.error(e)
    }

    /// The variant for a found request: an override, else the sticky or weighted
    /// choice under the experiment's weights in force (ramps, guardrails), moved off an
    /// ejected variant; and a place under the route's `max_inflight`. (Inlined: the
    /// routed request is then built where the request path keeps it, not copied there.)
    #[inline(always)]
    fn assign<'a, B>(
        &self,
        active: &'a Active,
        found: Found<'a, B>,
        parts: &'a http::request::Parts,
        a: Arrival<'a>,
        to_the_end: &mut admit::Held,
    ) -> Result<Assigned<'a, B>, ProxyError> {
        let Found { m, body, call } = found;
        let route = m.route;
        let live = &active.live[m.index];
        let weights = live.experiment.as_ref().map(|e| e.weights());
        let chooser = weights.as_deref().map_or(&route.chooser, |w| &w.chooser);
        let body_key = call
            .as_ref()
            .and_then(|c| c.user.as_deref())
            .map(str::as_bytes);
        let (assigned, how) = assign::assign(route, chooser, &parts.headers, body_key).map_err(
            |assign::UnknownVariant(wanted)| ProxyError::UnknownVariant {
                header: route.override_header.to_string(),
                wanted,
                valid: route.variant_names(),
            },
        )?;
        if let Some(limit) = &live.limit {
            let permit = limit.clone().try_acquire_owned();
            let busy = |_| ProxyError::RouteBusy {
                route: route.name.to_string(),
            };
            to_the_end.route = Some(permit.map_err(busy)?);
        }
        let (vi, fallback_from) = match how {
            assign::Assignment::Override => (assigned, None),
            _ => self.avoid_ejected(route, chooser, live, assigned, &parts.headers, body_key),
        };
        let r = Routed {
            m,
            live,
            wire: a.wire,
            parts,
            conn: a.conn,
            start: a.start,
            how,
            assigned,
            rerouted: vi != assigned,
            weights,
            trace: a.trace,
            call,
        };
        Ok(Assigned {
            r,
            body,
            vi,
            fallback_from,
        })
    }

    /// The assigned variant, or, while it is ejected, the fallback (named in the
    /// response) or another variant by the same sticky/weighted rule. With every
    /// variant ejected, the assigned one is used anyway.
    fn avoid_ejected(
        &self,
        route: &Route,
        chooser: &Chooser,
        live: &RouteLive,
        vi: usize,
        headers: &HeaderMap,
        body_key: Option<&[u8]>,
    ) -> (usize, Option<usize>) {
        if route.outlier.is_none() {
            return (vi, None);
        }
        let now = Instant::now();
        let health = |i: usize| live.variants[i].health.as_ref();
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
        let other = match assign::sticky_key(route, headers, body_key) {
            Some(key) => chooser.sticky_among(key, keep),
            None => chooser.random_among(keep),
        };
        (other.unwrap_or(vi), None)
    }

    /// Reads the body (unless read already) and works out the request's deadline.
    async fn prepare<B>(
        &self,
        r: &Routed<'_>,
        body: Pending<B>,
        held: &mut server::Reservation,
    ) -> Result<Prepared, ProxyError>
    where
        B: hyper::body::Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let (deadline, by_header) = self.deadline(r.parts, r.route(), r.start)?;
        let body = match body {
            Pending::Read(b) => b,
            Pending::Unread(b) => {
                let rules = self.body_rules(deadline, held);
                server::read_body(&r.parts.headers, b, rules).await?
            }
            Pending::Started { .. } => {
                return Err(ProxyError::BadRequest(
                    "a streamed call cannot be read whole".into(),
                ));
            }
        };
        let budget = r.live.budget.clone();
        if let Some(b) = &budget {
            b.deposit();
        }
        Ok(Prepared {
            budget,
            body,
            deadline,
            by_header,
        })
    }

    /// The earliest of the route's timeout and the caller's (`x-braid-timeout`, or a
    /// gRPC caller's `grpc-timeout`), and whether the caller's is the earlier. A
    /// caller's timeout is capped (at the route's, else `LONGEST_CALLER_TIMEOUT`), so
    /// no header value can overflow the clock.
    fn deadline(
        &self,
        parts: &http::request::Parts,
        route: &Route,
        start: Instant,
    ) -> Result<(Option<Instant>, bool), ProxyError> {
        let mut header_deadline = crate::headers::timeout(&parts.headers, LONGEST_CALLER_TIMEOUT)
            .map_err(ProxyError::BadRequest)?;
        if let Some(v) = crate::headers::get(&parts.headers, &crate::grpc::GRPC_TIMEOUT) {
            let d = v
                .to_str()
                .ok()
                .and_then(crate::grpc::parse_timeout)
                .ok_or_else(|| {
                    ProxyError::BadRequest(
                        "grpc-timeout must be up to 8 digits and a unit (H, M, S, m, u, n)".into(),
                    )
                })?;
            header_deadline = Some(header_deadline.map_or(d, |h: std::time::Duration| h.min(d)));
        }
        let cap = route.timeout.unwrap_or(LONGEST_CALLER_TIMEOUT);
        let at = |d: std::time::Duration| start.checked_add(d.min(cap));
        let header_deadline = header_deadline.and_then(at);
        let route_deadline = route.timeout.and_then(at);
        let deadline = [header_deadline, route_deadline]
            .into_iter()
            .flatten()
            .min();
        let by_header = header_deadline.is_some_and(|h| route_deadline.is_none_or(|r| h < r));
        Ok((deadline, by_header))
    }

    /// A streamed call on variant `vi`, its body passed on as it arrives.
    async fn stream_through<B>(
        &self,
        r: &Routed<'_>,
        vi: usize,
        body: Pending<B>,
    ) -> Result<Response<Body>, ProxyError>
    where
        B: hyper::body::Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        let route = r.route();
        let (deadline, _) = self.deadline(r.parts, route, r.start)?;
        let body = wire::streamed(body, &route.variants[vi], route, self.max_body_bytes);
        self.stream(r, vi, body, deadline).await
    }

    /// Serves the request on `vi` (a place first where it has `max_concurrent`); a
    /// failed answer that is safe to repeat goes to the route's fallback, once, when a
    /// place there is free (else the assigned variant's answer stands). The place of
    /// whichever answered is held to its answer's last byte.
    async fn serve_or_fall_back(
        &self,
        cx: &Cx<'_>,
        mut vi: usize,
        mut fallback_from: Option<usize>,
        holds: &mut Holds,
    ) -> Answered {
        // (Awaited only where there is a gate: most requests need no place.)
        let mut place = None;
        if cx.r.live.variants[vi].admission.is_some() {
            match self.place(cx, vi).await {
                Ok(p) => place = p,
                Err(e) => {
                    let result = Err(e);
                    return Answered {
                        vi,
                        fallback_from,
                        result,
                    };
                }
            }
        }
        let mut served = self.serve(cx, vi).await;
        if let Some(fb) = cx.r.route().fallback
            && fb != vi
            && fallback_from.is_none()
            && served.failed()
            && served.repeatable
            && cx.prepared.deadline.is_none_or(|d| d > Instant::now())
        {
            place = None;
            if let Ok(fb_place) = self.place(cx, fb).await {
                tracing::debug!(route = %cx.r.route().name, from = %cx.r.route().variants[vi].name, "serving from the fallback");
                fallback_from = Some(vi);
                vi = fb;
                place = fb_place;
                served = self.serve(cx, vi).await;
            }
        }
        holds.to_the_end.place = place;
        let result = served.result;
        Answered {
            vi,
            fallback_from,
            result,
        }
    }

    /// A place on variant `vi`, for a variant with `max_concurrent` (boxed: other
    /// requests' futures stay small).
    async fn place(&self, cx: &Cx<'_>, vi: usize) -> Result<Option<Permit>, ProxyError> {
        let live = &cx.r.live.variants[vi];
        let (route, headers) = (cx.r.route(), &cx.r.parts.headers);
        Box::pin(admit::admit(route, vi, live, headers, cx.prepared.deadline)).await
    }

    /// One variant's answer: coalesced for a local variant with a batcher, else
    /// forwarded under the route's retries.
    async fn serve(&self, cx: &Cx<'_>, vi: usize) -> Served {
        let r = &cx.r;
        let variant = &r.route().variants[vi];
        let path = match forward::upstream_path(&r.m, variant, &r.parts.uri) {
            Ok(p) => p,
            Err(e) => return Served::error(e),
        };
        if let Some(batcher) = &r.live.variants[vi].batcher
            && r.parts.method == Method::POST
        {
            let body = &cx.prepared.body;
            match r.wire.queueable(r.route(), variant, r.parts, body, &path) {
                // Boxed: a queued request waits on its batch anyway, and its state
                // stays out of forwarded requests' futures.
                Ok(Some((item, exec_path))) => {
                    let submitted = batched::submit(batcher, cx, vi, item, exec_path);
                    return Box::pin(submitted).await;
                }
                Ok(None) => {} // not mergeable: forwarded alone below
                Err(msg) => return Served::error(ProxyError::BadRequest(msg)),
            }
        }
        self.forward(cx, vi, path).await
    }
}
