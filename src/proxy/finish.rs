//! The last step, once per request at the edge: the answer's headers, its metrics, the
//! experiment's outcome, the access line, the span, the payload log and the shadow's
//! copy. An answer that is a generation is accounted for at its end, when its whole
//! generation is known; every other, at its head.

use std::sync::Arc;

use bytes::Bytes;
use http::Response;
use http_body_util::BodyExt;
use tokio::sync::oneshot;

use super::context::Routed;
use super::shadow::{self, PrimaryAnswer};
use super::{X_BRAID_FALLBACK_FROM, X_BRAID_VARIANT, access, batched, generation, spans, tee};
use crate::access::AccessLog;
use crate::error::{Body, ProxyError};
use crate::route::assign;
use crate::route::experiment::{Outcome, Who};
use crate::trace::SpanData;
use crate::trace::export::Tracer;

/// Who answered: the variant that served, and the one it fell back from.
pub(super) struct Answered {
    pub vi: usize,
    pub fallback_from: Option<usize>,
    pub result: Result<Response<Body>, ProxyError>,
}

/// What is recorded of one request: its access line and span, when it has them.
struct Records {
    access: Option<(Arc<AccessLog>, serde_json::Value)>,
    span: Option<(Arc<Tracer>, SpanData)>,
}

impl super::Proxy {
    /// Headers, metrics and the shadow's copy of the answer, once, at the edge. An
    /// error's status is counted as the HTTP status a REST caller would get, whichever
    /// way it is written. `request_body`: the body, where it was read whole.
    pub(super) fn finish(
        &self,
        r: &Routed<'_>,
        answered: Answered,
        request_body: Option<&Bytes>,
        shadow: Option<oneshot::Sender<PrimaryAnswer>>,
    ) -> Response<Body> {
        let Answered {
            vi, fallback_from, ..
        } = answered;
        let route = r.route();
        let variant = &route.variants[vi];
        let (mut resp, status) = match answered.result {
            // A gRPC status stands for the HTTP status it was made from, if any.
            Ok(resp) => {
                let status = resp.extensions().get::<http::StatusCode>().copied();
                let status = status.unwrap_or(resp.status());
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
        let elapsed = r.start.elapsed();
        // How the variant was chosen, as the logs and spans name it.
        let how = match fallback_from {
            Some(_) => "fallback",
            None => access::assignment(r.how),
        };
        let records = self.records(r, vi, how, (status, elapsed), request_body, &resp);
        let who = Who {
            assigned: r.assigned,
            randomized: r.how != assign::Assignment::Override,
            rerouted: r.rerouted,
            served: vi,
            assigned_failed: fallback_from.is_some() && !r.rerouted,
            status: status.as_u16(),
        };
        let mut generation = None;
        if r.wire.generates() && status.is_success() {
            let measured = self.measured(r, vi, who, records, resp);
            resp = measured.0;
            generation = Some(measured.1);
        } else {
            self.record(r, vi, who, elapsed, records);
        }
        if let (Some(settings), Some(log), Some(body)) =
            (&route.payload_log, &r.live.payload_log, request_body)
            && crate::hash::chance(settings.fraction)
        {
            let sampled = access::Sampled {
                route: &route.name,
                variant: &variant.name,
                assignment: how,
                parts: r.parts,
                status: status.as_u16(),
                elapsed,
                body,
                trace: r.trace.as_ref(),
                generation,
            };
            resp = access::log_payload(sampled, settings, log.clone(), resp);
        }
        if r.wire.grpc() {
            resp = super::wire::count_status(&self.metrics, &route.name, &variant.name, resp);
        }
        if let Some(tx) = shadow {
            let (parts, body) = resp.into_parts();
            let (tee, copy) = tee::Tee::new(body, shadow::COMPARE_LIMIT);
            let _ = tx.send(PrimaryAnswer { status, copy });
            resp = Response::from_parts(parts, tee.boxed());
        }
        resp
    }

    /// The access line (when this request is sampled for it) and the span (when its
    /// trace is recorded), written once the request is accounted for. (Inlined, as
    /// `record` is: the records, mostly empty, are not copied on every request.)
    #[inline(always)]
    fn records(
        &self,
        r: &Routed<'_>,
        vi: usize,
        how: &'static str,
        (status, elapsed): (http::StatusCode, std::time::Duration),
        request_body: Option<&Bytes>,
        resp: &Response<Body>,
    ) -> Records {
        let route = r.route();
        let variant = &route.variants[vi];
        let access = match &self.access_log {
            Some(log) if crate::hash::chance(route.access_log) => Some((
                log.clone(),
                access::line(access::Entry {
                    route: &route.name,
                    variant: &variant.name,
                    assignment: how,
                    parts: r.parts,
                    grpc: r.wire.grpc(),
                    status: status.as_u16(),
                    elapsed,
                    request_bytes: request_body.map(Bytes::len),
                    response: resp,
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
                let at = (status, elapsed, batch);
                let span = spans::server_span(r, t, r.parts, &variant.name, how, at);
                Some((tracer.clone(), span))
            }
            _ => None,
        };
        Records { access, span }
    }

    /// Accounted for at its head: the variant's requests, the experiment's outcome, the
    /// access line and the span.
    #[inline(always)]
    fn record(
        &self,
        r: &Routed<'_>,
        vi: usize,
        who: Who,
        elapsed: std::time::Duration,
        records: Records,
    ) {
        r.live.variants[vi].requests.record(who.status, elapsed);
        if let (Some(exp), Some(weights)) = (&r.live.experiment, &r.weights) {
            exp.observe(Outcome {
                weights,
                who,
                elapsed,
                generation: None,
            });
        }
        if let Some((log, line)) = records.access {
            log.write(line.to_string());
        }
        if let Some((tracer, span)) = records.span {
            tracer.record(span);
        }
    }

    /// A generation, accounted for at its end (its accounting needs the whole answer):
    /// the answer measured as it passes, and where its generation will come.
    fn measured(
        &self,
        r: &Routed<'_>,
        vi: usize,
        who: Who,
        records: Records,
        resp: Response<Body>,
    ) -> (
        Response<Body>,
        oneshot::Receiver<crate::metrics::Generation>,
    ) {
        let variant = &r.route().variants[vi];
        let requests = r.live.variants[vi].requests.clone();
        let experiment = r.live.experiment.clone().zip(r.weights.clone());
        // The span's GenAI attributes, only for a recorded request.
        let span = records.span.map(|s| (s, spans::models(r, variant)));
        let access_line = records.access;
        let then: generation::Then = Box::new(move |g| {
            requests.record(who.status, g.duration);
            if let Some((exp, weights)) = experiment {
                exp.observe(Outcome {
                    weights: &weights,
                    who,
                    elapsed: g.duration,
                    generation: Some(g),
                });
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
        let names = (r.route().name.clone(), variant.name.clone());
        let strip = r.call.as_ref().is_some_and(|c| c.braid_asks_usage);
        generation::measured(resp, r.start, (self.metrics.clone(), names), strip, then)
    }
}
