//! The request path, composed in one function (`Proxy::route`), one step per line; the
//! picture of it is the crate doc's (`lib.rs`). Each step's detail lives beside it:
//! `forward` (retries, the upstream request, streamed calls), `batched` (coalescing
//! through the variant's batcher), `grpc` (a gRPC call's route from its message, its
//! streamed body, its status counted), `shadow` (copies and their comparison).

mod access;
mod admit;
mod batched;
mod forward;
mod generation;
mod grpc;
mod openai;
mod shadow;
mod spans;
mod tee;
#[cfg(test)]
mod tests;

pub use batched::HttpExecutor;

use std::sync::Arc;

use crate::server::RequestBody;
use bytes::Bytes;
use http::header::{HeaderMap, HeaderName};
use http::{Method, Request, Response};
use http_body_util::BodyExt;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tower::retry::budget::{Budget, TpsBudget};

use crate::config::{Active, Store};
use crate::error::{Body, BoxError, ProxyError};
use crate::metrics::Metrics;
use crate::route::experiment::{Outcome, Weights};
use crate::route::live::RouteLive;
use crate::route::{Chooser, Match, Route, assign};
use crate::server::{self, ConnInfo, Handler};
use crate::trace::RequestTrace;
use crate::upstream::Upstreams;
use crate::upstream::health::Admit;
use shadow::PrimaryAnswer;

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

/// How the caller speaks, which decides how the route is found, how the body is read
/// and how errors are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wire {
    /// HTTP: REST inference or any other request; errors as JSON.
    Rest,
    /// An OpenAI-style call whose JSON body names its model (chat, completions,
    /// responses, embeddings, rerank): routed by that model; errors in OpenAI's shape.
    OpenAi,
    /// A unary call of the inference service that names its model (ModelInfer,
    /// ModelMetadata, ModelReady): read whole, routed by the model in its message.
    GrpcModel,
    /// Triton's ModelStreamInfer: routed by the model its first message names (one
    /// variant for the whole stream), then streamed both ways.
    GrpcModelStream,
    /// Any other gRPC call: routed by path prefix, streamed both ways.
    GrpcStream,
}

impl Wire {
    fn of(parts: &http::request::Parts) -> Wire {
        if !crate::grpc::is_grpc(&parts.headers) {
            if crate::openai::names_model_in_body(&parts.method, parts.uri.path()) {
                return Wire::OpenAi;
            }
            return Wire::Rest;
        }
        match parts.uri.path().strip_prefix(crate::grpc::SERVICE_PREFIX) {
            Some("ModelInfer" | "ModelMetadata" | "ModelReady") => Wire::GrpcModel,
            Some("ModelStreamInfer") => Wire::GrpcModelStream,
            _ => Wire::GrpcStream,
        }
    }

    fn grpc(self) -> bool {
        !matches!(self, Wire::Rest | Wire::OpenAi)
    }

    fn error(self, e: ProxyError) -> Response<Body> {
        match self {
            Wire::Rest => e.into_response(),
            Wire::OpenAi => crate::openai::error_response(&e),
            Wire::GrpcModel | Wire::GrpcModelStream | Wire::GrpcStream => {
                crate::grpc::error_response(&e)
            }
        }
    }
}

/// A request body, read already (to find a gRPC call's model), not yet, or read up
/// to a stream's first message.
enum Pending<B> {
    Unread(B),
    Read(Bytes),
    Started { head: bytes::BytesMut, rest: Body },
}

impl Handler for Proxy {
    async fn call(&self, req: Request<RequestBody>, conn: &ConnInfo) -> Response<Body> {
        self.handle(req, conn).await
    }
}

/// One variant's answer, and whether sending the request elsewhere is safe.
struct Served {
    result: Result<Response<Body>, ProxyError>,
    /// The request certainly was not processed, or the route says repeating is harmless.
    repeatable: bool,
    /// A stream that failed before its first token (its head may say 200).
    before_first_token: bool,
}

impl Served {
    /// An error that must not be sent anywhere else (a bad request, a deadline).
    fn error(e: ProxyError) -> Served {
        Served {
            result: Err(e),
            repeatable: false,
            before_first_token: false,
        }
    }

    fn failed(&self) -> bool {
        if self.before_first_token {
            return true;
        }
        match &self.result {
            Ok(r) => r.status().is_server_error(),
            Err(e) => e.status().is_server_error(),
        }
    }
}

/// What one request works with: the route it matched and that route's live handles,
/// from the one snapshot loaded for it, and how its caller speaks.
struct Routed<'a> {
    m: Match<'a>,
    live: &'a RouteLive,
    wire: Wire,
    /// How the variant was chosen (before any fallback), for the access log.
    how: assign::Assignment,
    /// The variant chosen, before an ejection or a failure sent the request elsewhere.
    assigned: usize,
    /// Sent elsewhere before the assigned variant was tried (it was ejected).
    rerouted: bool,
    /// The weights it was assigned under, on a route with an experiment.
    weights: Option<Arc<Weights>>,
    /// braid's span in the request's trace, when tracing is on.
    trace: Option<RequestTrace>,
    /// What an OpenAI-style call's body names (its model, where, and its user).
    /// (Boxed: most requests have none, and the request's future stays small.)
    call: Option<Box<crate::openai::Call>>,
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
        let mut to_the_end = admit::Held {
            _inflight: Some(inflight),
            ..admit::Held::default()
        };
        // The bytes this request buffers, given back when it ends, however it ends.
        let mut held = server::Reservation::default();
        let trace = self.tracer.as_ref().map(|t| t.begin(&parts.headers));
        let resp = match self.store.load() {
            // One snapshot for the whole request: a reload cannot change it midway.
            Some(active) => {
                let at = (start, trace);
                let held = (&mut held, &mut to_the_end);
                self.route(&active, parts, body, wire, conn, at, held).await
            }
            None => self.unrouted(ProxyError::NoConfig, wire),
        };
        to_the_end.around(resp)
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

    #[allow(clippy::too_many_arguments)]
    async fn route<B>(
        &self,
        active: &Active,
        parts: http::request::Parts,
        body: B,
        wire: Wire,
        conn: &ConnInfo,
        (start, trace): (Instant, Option<RequestTrace>),
        (held, to_the_end): (&mut server::Reservation, &mut admit::Held),
    ) -> Response<Body>
    where
        B: hyper::body::Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        if wire == Wire::Rest
            && parts.method == Method::GET
            && parts.uri.path() == crate::openai::MODELS_PATH
        {
            let names = active.snapshot.routes.model_names();
            // Without model routes the path is a backend's, proxied as any other.
            if !names.is_empty() {
                return crate::openai::models_response(names.into_iter());
            }
        }
        let mut call = None;
        let found = match wire {
            Wire::OpenAi => self
                .find_openai_model(active, &parts, body, held)
                .await
                .map(|(m, body, c)| {
                    call = Some(Box::new(c));
                    (m, body)
                }),
            Wire::GrpcModel => self.find_grpc_model(active, &parts, body, held).await,
            Wire::GrpcModelStream => self.find_grpc_stream(active, &parts, body).await,
            Wire::Rest | Wire::GrpcStream => active
                .snapshot
                .routes
                .find(parts.uri.path())
                .map(|m| (m, Pending::Unread(body)))
                .ok_or_else(|| ProxyError::NoRoute {
                    path: parts.uri.path().to_string(),
                }),
        };
        let (m, body) = match found {
            Ok(found) => found,
            Err(e) => return self.unrouted(e, wire),
        };
        let route = m.route;
        let live = &active.live[m.index];
        // The weights in force (ramps, guardrails) for routes with an experiment.
        let weights = live.experiment.as_ref().map(|e| e.weights());
        let chooser = weights.as_deref().map_or(&route.chooser, |w| &w.chooser);
        let body_key = call
            .as_ref()
            .and_then(|c| c.user.as_deref())
            .map(str::as_bytes);
        let (assigned, how) = match assign::assign(route, chooser, &parts.headers, body_key) {
            Ok(a) => a,
            Err(assign::UnknownVariant(wanted)) => {
                let e = ProxyError::UnknownVariant {
                    header: route.override_header.to_string(),
                    wanted,
                    valid: route.variant_names(),
                };
                return self.unrouted(e, wire);
            }
        };
        to_the_end.route = match &live.limit {
            None => None,
            Some(limit) => match limit.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    let e = ProxyError::RouteBusy {
                        route: route.name.to_string(),
                    };
                    return self.unrouted(e, wire);
                }
            },
        };
        let (mut vi, mut fallback_from) = if how == assign::Assignment::Override {
            (assigned, None)
        } else {
            self.avoid_ejected(route, chooser, live, assigned, &parts.headers, body_key)
        };
        let r = Routed {
            m,
            live,
            wire,
            how,
            assigned,
            rerouted: vi != assigned,
            weights,
            trace,
            call,
        };
        if matches!(wire, Wire::GrpcStream | Wire::GrpcModelStream) {
            let result = match self.deadline(&parts, route, start) {
                Ok((deadline, _)) => {
                    let body = self.streamed(body, &route.variants[vi], route);
                    // Boxed: a streamed call's state stays out of other requests' futures.
                    Box::pin(self.stream(&r, vi, &parts, body, deadline, conn)).await
                }
                Err(e) => Err(e),
            };
            let req = (start, &parts, None);
            return self.finish(&r, vi, fallback_from, result, req, None);
        }
        let prepared = match self.prepare(&parts, body, route, live, start, held).await {
            Ok(p) => p,
            Err(e) => {
                let req = (start, &parts, None);
                return self.finish(&r, vi, fallback_from, Err(e), req, None);
            }
        };
        let shadow = match wire {
            Wire::Rest | Wire::OpenAi => self.start_shadow(&r, vi, &parts, &prepared.body, conn),
            Wire::GrpcModel | Wire::GrpcModelStream | Wire::GrpcStream => None,
        };
        // A variant with max_concurrent: a place first (held to the answer's end).
        // (Boxed, and only awaited where there is a gate: other requests' futures stay
        // as small as before.)
        let deadline = prepared.deadline;
        let mut place = None;
        if live.variants[vi].admission.is_some() {
            let admitted = admit::admit(route, vi, &live.variants[vi], &parts.headers, deadline);
            match Box::pin(admitted).await {
                Ok(p) => place = p,
                Err(e) => {
                    let req = (start, &parts, Some(&prepared.body));
                    return self.finish(&r, vi, fallback_from, Err(e), req, shadow);
                }
            }
        }
        let mut served = self.serve(&r, vi, &parts, &prepared, conn).await;
        if let Some(fb) = route.fallback
            && fb != vi
            && fallback_from.is_none()
            && served.failed()
            && served.repeatable
            && prepared.deadline.is_none_or(|d| d > Instant::now())
        {
            place = None;
            // A fallback with no place free keeps the assigned variant's answer.
            let admitted = match &live.variants[fb].admission {
                None => Ok(None),
                Some(_) => {
                    let admitted =
                        admit::admit(route, fb, &live.variants[fb], &parts.headers, deadline);
                    Box::pin(admitted).await
                }
            };
            if let Ok(fb_place) = admitted {
                tracing::debug!(route = %route.name, from = %route.variants[vi].name, "serving from the fallback");
                fallback_from = Some(vi);
                vi = fb;
                place = fb_place;
                served = self.serve(&r, vi, &parts, &prepared, conn).await;
            }
        }
        let req = (start, &parts, Some(&prepared.body));
        to_the_end.place = place;
        self.finish(&r, vi, fallback_from, served.result, req, shadow)
    }

    /// Headers, metrics and the shadow's copy of the answer, once, at the edge. An
    /// error's status is counted as the HTTP status a REST caller would get, whichever
    /// way it is written.
    fn finish(
        &self,
        r: &Routed<'_>,
        vi: usize,
        fallback_from: Option<usize>,
        result: Result<Response<Body>, ProxyError>,
        (start, parts, request_body): (Instant, &http::request::Parts, Option<&Bytes>),
        shadow: Option<oneshot::Sender<PrimaryAnswer>>,
    ) -> Response<Body> {
        let route = r.m.route;
        let variant = &route.variants[vi];
        let (mut resp, status) = match result {
            Ok(resp) => {
                // A gRPC status stands for the HTTP status it was made from, if any.
                let status = resp
                    .extensions()
                    .get::<http::StatusCode>()
                    .copied()
                    .unwrap_or(resp.status());
                (resp, status)
            }
            Err(e) => {
                tracing::debug!(route = %route.name, variant = %variant.name, "{e}");
                let status = e.status();
                (r.wire.error(e), status)
            }
        };
        let headers = resp.headers_mut();
        headers.insert(X_BRAID_VARIANT.clone(), variant.header_value.clone());
        if let Some(from) = fallback_from {
            let from = &route.variants[from];
            headers.insert(X_BRAID_FALLBACK_FROM.clone(), from.header_value.clone());
            self.metrics.fallback(&route.name, &from.name);
        }
        let elapsed = start.elapsed();
        // How the variant was chosen, as the logs and spans name it.
        let how = if fallback_from.is_some() {
            "fallback"
        } else {
            access::assignment(r.how)
        };
        let access_line = match &self.access_log {
            Some(log) if crate::hash::chance(route.access_log) => Some((
                log.clone(),
                access::line(access::Entry {
                    route: &route.name,
                    variant: &variant.name,
                    assignment: how,
                    parts,
                    grpc: r.wire.grpc(),
                    status: status.as_u16(),
                    elapsed,
                    request_bytes: request_body.map(Bytes::len),
                    response: &resp,
                    trace: r.trace.as_ref(),
                }),
            )),
            _ => None,
        };
        let span = match (&self.tracer, &r.trace) {
            (Some(tracer), Some(t)) if t.context.sampled => {
                let batch = resp
                    .extensions()
                    .get::<batched::Batched>()
                    .map(|b| (b.waited, b.batch_rows));
                let span =
                    spans::server_span(r, t, parts, &variant.name, how, (status, elapsed, batch));
                Some((tracer.clone(), span))
            }
            _ => None,
        };
        let who = Who {
            assigned: r.assigned,
            randomized: r.how != assign::Assignment::Override,
            rerouted: r.rerouted,
            served: vi,
            assigned_failed: fallback_from.is_some() && !r.rerouted,
            status: status.as_u16(),
        };
        let requests = &r.live.variants[vi].requests;
        let mut generation = None;
        if r.wire == Wire::OpenAi && status.is_success() {
            // Its accounting needs the whole answer: done once it has ended.
            let requests = requests.clone();
            let experiment = r.live.experiment.clone().zip(r.weights.clone());
            // The span's GenAI attributes, only for a recorded request.
            let span = span.map(|s| (s, spans::models(r, variant)));
            let then: generation::Then = Box::new(move |g| {
                requests.record(who.status, g.duration);
                if let Some((exp, weights)) = experiment {
                    exp.observe(who.outcome(&weights, g.duration, Some(g)));
                }
                if let Some((log, mut line)) = access_line {
                    access::with_generation(&mut line, g);
                    log.write(line.to_string());
                }
                if let Some(((tracer, mut span), models)) = span {
                    spans::with_generation(&mut span, models, g);
                    tracer.record(span);
                }
            });
            let names = (route.name.clone(), variant.name.clone());
            let strip = r.call.as_ref().is_some_and(|c| c.braid_asks_usage);
            let measured =
                generation::measured(resp, start, (self.metrics.clone(), names), strip, then);
            resp = measured.0;
            generation = Some(measured.1);
        } else {
            requests.record(status.as_u16(), elapsed);
            if let (Some(exp), Some(weights)) = (&r.live.experiment, &r.weights) {
                exp.observe(who.outcome(weights, elapsed, None));
            }
            if let Some((log, line)) = access_line {
                log.write(line.to_string());
            }
            if let Some((tracer, span)) = span {
                tracer.record(span);
            }
        }
        if let (Some(settings), Some(log), Some(body)) =
            (&route.payload_log, &r.live.payload_log, request_body)
            && crate::hash::chance(settings.fraction)
        {
            let sampled = access::Sampled {
                route: &route.name,
                variant: &variant.name,
                assignment: how,
                parts,
                status: status.as_u16(),
                elapsed,
                body,
                trace: r.trace.as_ref(),
                generation,
            };
            resp = access::log_payload(sampled, settings, log.clone(), resp);
        }
        if r.wire.grpc() {
            resp = grpc::count_status(&self.metrics, &route.name, &variant.name, resp);
        }
        if let Some(tx) = shadow {
            let (parts, body) = resp.into_parts();
            let (tee, copy) = tee::Tee::new(body, shadow::COMPARE_LIMIT);
            let _ = tx.send(PrimaryAnswer { status, copy });
            resp = Response::from_parts(parts, tee.boxed());
        }
        resp
    }

    fn unrouted(&self, e: ProxyError, wire: Wire) -> Response<Body> {
        self.metrics.unrouted(e.label());
        wire.error(e)
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
        parts: &http::request::Parts,
        body: Pending<B>,
        route: &Route,
        live: &RouteLive,
        start: Instant,
        held: &mut server::Reservation,
    ) -> Result<Prepared, ProxyError>
    where
        B: hyper::body::Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let (deadline, by_header) = self.deadline(parts, route, start)?;
        let body = match body {
            Pending::Read(b) => b,
            Pending::Unread(b) => {
                let rules = self.body_rules(deadline, held);
                server::read_body(&parts.headers, b, rules).await?
            }
            Pending::Started { .. } => {
                return Err(ProxyError::BadRequest(
                    "a streamed call cannot be read whole".into(),
                ));
            }
        };
        let budget = live.budget.clone();
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

    /// One variant's answer: coalesced for a local variant with a batcher, else
    /// forwarded with the route's retries.
    async fn serve(
        &self,
        r: &Routed<'_>,
        vi: usize,
        parts: &http::request::Parts,
        prepared: &Prepared,
        conn: &ConnInfo,
    ) -> Served {
        let route = r.m.route;
        let variant = &route.variants[vi];
        let path = match forward::upstream_path(&r.m, variant, &parts.uri) {
            Ok(p) => p,
            Err(e) => return Served::error(e),
        };
        if let Some(batcher) = &r.live.variants[vi].batcher
            && parts.method == Method::POST
        {
            let queueable = match r.wire {
                Wire::Rest => batched::queueable(&parts.uri, &parts.headers, &prepared.body)
                    .map(|item| item.map(|item| (item, path.clone()))),
                Wire::GrpcModel if parts.uri.path().ends_with("/ModelInfer") => {
                    let target = variant.target_model.as_ref().or(route.model.as_ref());
                    match target {
                        Some(t) => batched::queueable_grpc(&prepared.body, t),
                        None => Ok(None),
                    }
                }
                // Embeddings calls are coalesced; generations are forwarded one by one.
                Wire::OpenAi if parts.uri.path() == batched::EMBEDDINGS_PATH => {
                    match variant.target_model.as_deref() {
                        Some(t) => batched::queueable_embeddings(&parts.headers, &prepared.body, t),
                        None => Ok(None),
                    }
                }
                Wire::OpenAi | Wire::GrpcModel | Wire::GrpcModelStream | Wire::GrpcStream => {
                    Ok(None)
                }
            };
            match queueable {
                Ok(Some((item, exec_path))) => {
                    // The batch's span links to this request's, when it is recorded.
                    let recorded = r
                        .trace
                        .as_ref()
                        .filter(|t| t.context.sampled)
                        .map(|t| t.context);
                    // Boxed: a queued request waits on its batch anyway, and its state
                    // stays out of forwarded requests' futures.
                    let result = Box::pin(batched::submit(
                        batcher,
                        route,
                        variant,
                        item,
                        exec_path,
                        &parts.headers,
                        prepared,
                        (r.wire.grpc(), recorded),
                    ))
                    .await;
                    return Served {
                        result,
                        repeatable: route.retry.idempotent,
                        before_first_token: false,
                    };
                }
                Ok(None) => {} // not mergeable: forwarded alone below
                Err(msg) => return Served::error(ProxyError::BadRequest(msg)),
            }
        }
        if r.call.as_ref().is_some_and(|c| c.stream) {
            // Boxed: its commit point's state stays out of every other request's future.
            let streamed = self.forward_stream(r, vi, parts, prepared, path, conn);
            return Box::pin(streamed).await;
        }
        self.forward(r, vi, parts, prepared, path, conn).await
    }
}

/// Who a request was assigned to and who answered it: its experiment outcome, but
/// for its duration (known at its head, or for a generation at its end).
#[derive(Clone, Copy)]
struct Who {
    assigned: usize,
    randomized: bool,
    rerouted: bool,
    served: usize,
    assigned_failed: bool,
    status: u16,
}

impl Who {
    fn outcome<'w>(
        self,
        weights: &'w Weights,
        elapsed: std::time::Duration,
        generation: Option<&'w crate::metrics::Generation>,
    ) -> Outcome<'w> {
        Outcome {
            weights,
            assigned: self.assigned,
            randomized: self.randomized,
            rerouted: self.rerouted,
            served: self.served,
            assigned_failed: self.assigned_failed,
            status: self.status,
            elapsed,
            generation,
        }
    }
}

impl Prepared {
    /// What a request gets when its deadline passes: the caller's (504 "deadline
    /// passed") or the route's timeout at this variant's backend.
    fn deadline_error(&self, route: &Route, variant: &crate::route::Variant) -> ProxyError {
        if self.by_header {
            ProxyError::DeadlinePassed
        } else {
            ProxyError::Timeout {
                backend: variant.upstream.authority.to_string(),
                after: route.timeout.unwrap_or_default(),
            }
        }
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
