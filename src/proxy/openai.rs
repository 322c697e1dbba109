//! OpenAI-style callers: a call is read whole and routed by its body's `model`, like a
//! REST path names its model: the same routes, weights and sticky key (the header, or
//! the body's `user`), the body's `model` rewritten to the variant's `target_model`
//! with every other byte as sent. A call whose model no route names goes where its
//! path leads (a `path_prefix` route in front of an OpenAI server works as before).

use bytes::Bytes;
use tokio::time::Instant;
use tower::retry::budget::Budget;

use super::generation::{self, Uncommitted};
use super::{Pending, Prepared, Proxy, Routed, Served};
use crate::config::Active;
use crate::error::{BoxError, ProxyError};
use crate::openai::{self, Call};
use crate::route::{Match, Variant};
use crate::server::{self, ConnInfo};

impl Proxy {
    /// Reads the call and finds its route: by the body's model, else by path prefix,
    /// else 404 (an unrouted model) or 400 (a body naming none) in OpenAI's shape.
    pub(super) async fn find_openai_model<'a, B>(
        &self,
        active: &'a Active,
        parts: &http::request::Parts,
        body: B,
        held: &mut server::Reservation,
    ) -> Result<(Match<'a>, Pending<B>, Call), ProxyError>
    where
        B: hyper::body::Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        // The route (and so its timeout) is not known until the body is read.
        let rules = self.body_rules(None, held);
        let bytes = server::read_body(&parts.headers, body, rules).await?;
        let routes = &active.snapshot.routes;
        // A body braid cannot read is refused even where a path route would take it:
        // forwarded as it came, a backend reading it another way (a key written twice,
        // another encoding) could reach a model no route lets through.
        let read = openai::read_call(&bytes).map_err(ProxyError::BadRequest)?;
        let by_model = read
            .model
            .as_ref()
            .and_then(|(model, _)| routes.find_model(model));
        let m = match by_model.or_else(|| routes.find(parts.uri.path())) {
            Some(m) => m,
            None => {
                return Err(match &read {
                    Call { model: None, .. } => {
                        ProxyError::BadRequest("the body names no \"model\"".into())
                    }
                    Call {
                        model: Some((model, _)),
                        ..
                    } => ProxyError::UnknownModel {
                        model: model.clone(),
                        models: routes.models(),
                    },
                });
            }
        };
        // A call routed by path keeps its model as sent: the span is only for model routes.
        let mut call = read;
        if m.route.model.is_none() {
            call.model = None;
        }
        // On a model route, a stream that did not ask for its usage is asked for it
        // (the usage is how its tokens are counted), and the usage chunk is taken out
        // of what the client gets. A path route's body goes as it came.
        call.braid_asks_usage = m.route.model.is_some()
            && openai::streams_usage(parts.uri.path())
            && call.ask_usage().is_some();
        Ok((m, Pending::Read(bytes), call))
    }
}

/// The call's body as `variant` gets it: its `model` rewritten to the variant's
/// `target_model`, and a stream asked for its usage chunk when braid takes it out
/// again (lengths follow from the new body); `None` to send it as it came.
pub(super) fn model_renamed(
    r: &Routed<'_>,
    variant: &Variant,
    body: &Bytes,
) -> Option<(Bytes, Option<usize>)> {
    let call = r.call.as_ref()?;
    let escaped;
    let mut edits: Vec<(std::ops::Range<usize>, &[u8])> = Vec::with_capacity(2);
    if let (Some(target), Some((model, span))) = (variant.target_model.as_deref(), &call.model)
        && model != target
    {
        escaped = openai::escaped(target);
        edits.push((span.clone(), escaped.as_bytes()));
    }
    if call.braid_asks_usage
        && let Some(edit) = call.ask_usage()
    {
        edits.push(edit);
    }
    if edits.is_empty() {
        return None;
    }
    Some((openai::edited(body, &mut edits), None))
}

impl Proxy {
    /// An OpenAI-style stream, forwarded up to its commit point: its first token. A
    /// stream that breaks, sends an error first or gives no token within the route's
    /// `ttft_timeout` is tried again under the route's policy and budget; the last such
    /// failure is the request's (repeatable: the fallback may serve it).
    pub(super) async fn forward_stream(
        &self,
        r: &Routed<'_>,
        vi: usize,
        parts: &http::request::Parts,
        prepared: &Prepared,
        path: http::uri::PathAndQuery,
        conn: &ConnInfo,
    ) -> Served {
        let route = r.m.route;
        let variant = &route.variants[vi];
        let live = &r.live.variants[vi];
        let mut tries = 1;
        loop {
            let sent = Instant::now();
            let served = self
                .forward(r, vi, parts, prepared, path.clone(), conn)
                .await;
            // The outcome for failure accrual, once per `forward` (which leaves a stream's
            // to its commit point: a 200 that fails before a token is a failure).
            let record = |ok: bool| {
                if let Some(h) = &live.health {
                    h.record(ok, Instant::now());
                }
            };
            let resp = match served.result {
                Ok(resp) if resp.status().is_success() && is_event_stream(&resp) => resp,
                result => {
                    record(result.as_ref().is_ok_and(|r| !r.status().is_server_error()));
                    return Served { result, ..served };
                }
            };
            let ttft_until = route.ttft_timeout.and_then(|t| sent.checked_add(t));
            let until = [ttft_until, prepared.deadline].into_iter().flatten().min();
            let backend = variant.upstream.authority.as_str();
            let on_timeout = || match (ttft_until, route.ttft_timeout) {
                (Some(t), Some(after)) if Some(t) == until => ProxyError::NoFirstToken {
                    backend: backend.to_string(),
                    after,
                },
                _ => prepared.deadline_error(route, variant),
            };
            let committed = generation::commit(resp, until, on_timeout, backend).await;
            record(committed.is_ok());
            let failed = match committed {
                Ok(resp) => {
                    return Served {
                        result: Ok(resp),
                        ..served
                    };
                }
                Err(failed) => failed,
            };
            let time_left = prepared.deadline.is_none_or(|d| d > Instant::now());
            if tries < route.retry.attempts
                && time_left
                && let (Some(budget), Some(metrics)) = (&prepared.budget, &live.retry_metrics)
            {
                if budget.withdraw() {
                    metrics.outcome("retried");
                    tries += 1;
                    continue;
                }
                metrics.outcome("budget_exhausted");
            }
            let result = match failed {
                Uncommitted::Failed(e) => Err(e),
                Uncommitted::ErrorEvent(resp) => Ok(resp),
            };
            return Served {
                result,
                repeatable: true,
                before_first_token: true,
            };
        }
    }
}

fn is_event_stream(resp: &http::Response<crate::error::Body>) -> bool {
    resp.headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"))
}
