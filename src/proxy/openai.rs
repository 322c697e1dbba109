//! OpenAI-style callers: a call is read whole and routed by its body's `model`, like a
//! REST path names its model: the same routes, weights and sticky key (the header, or
//! the body's `user`), the body's `model` rewritten to the variant's `target_model`
//! with every other byte as sent. A call whose model no route names goes where its
//! path leads (a `path_prefix` route in front of an OpenAI server works as before).

use bytes::Bytes;

use super::{Pending, Proxy, Routed};
use crate::config::Active;
use crate::error::{BoxError, ProxyError};
use crate::openai::{self, Call};
use crate::route::{Match, Variant};
use crate::server;

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
        let read = openai::read_call(&bytes);
        let by_model = read
            .as_ref()
            .ok()
            .and_then(|c| c.model.as_ref())
            .and_then(|(model, _)| routes.find_model(model));
        let m = match by_model.or_else(|| routes.find(parts.uri.path())) {
            Some(m) => m,
            None => {
                return Err(match &read {
                    Err(why) => ProxyError::BadRequest(why.clone()),
                    Ok(Call { model: None, .. }) => {
                        ProxyError::BadRequest("the body names no \"model\"".into())
                    }
                    Ok(Call {
                        model: Some((model, _)),
                        ..
                    }) => ProxyError::UnknownModel {
                        model: model.clone(),
                        models: routes.models(),
                    },
                });
            }
        };
        // A call routed by path keeps its model as sent: the span is only for model routes.
        let mut call = read.unwrap_or_default();
        if m.route.model.is_none() {
            call.model = None;
        }
        Ok((m, Pending::Read(bytes), call))
    }
}

/// The call's body as `variant` gets it: its `model` rewritten to the variant's
/// `target_model` (lengths follow from the new body), or `None` to send it as it came.
pub(super) fn model_renamed(
    r: &Routed<'_>,
    variant: &Variant,
    body: &Bytes,
) -> Option<(Bytes, Option<usize>)> {
    let target = variant.target_model.as_deref()?;
    let (model, span) = r.call.as_ref()?.model.as_ref()?;
    if model == target {
        return None;
    }
    Some((openai::with_model(body, span, target), None))
}

/// Wraps a successful answer's body so its generation is measured as it passes (time
/// to first token, time per output token, tokens, finish reasons, in-band errors, the
/// last byte) and recorded once when it ends, or when the client leaves mid-way.
pub(super) fn measured(
    resp: http::Response<crate::error::Body>,
    start: tokio::time::Instant,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    names: (std::sync::Arc<str>, std::sync::Arc<str>),
) -> http::Response<crate::error::Body> {
    use http_body_util::BodyExt;
    let content_type = resp
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let event_stream = content_type.starts_with("text/event-stream");
    if !event_stream && !content_type.starts_with("application/json") {
        return resp;
    }
    let (parts, inner) = resp.into_parts();
    let body = Measured {
        inner,
        reader: openai::sse::Reader::new(event_stream),
        start,
        first: None,
        last: None,
        metrics,
        names,
        recorded: false,
    };
    http::Response::from_parts(parts, body.boxed())
}

struct Measured {
    inner: crate::error::Body,
    reader: openai::sse::Reader,
    start: tokio::time::Instant,
    /// When the first and the latest content events passed.
    first: Option<tokio::time::Instant>,
    last: Option<tokio::time::Instant>,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    names: (std::sync::Arc<str>, std::sync::Arc<str>),
    recorded: bool,
}

impl Measured {
    fn record(&mut self) {
        if std::mem::replace(&mut self.recorded, true) {
            return;
        }
        self.reader.finish();
        let seen = &self.reader.seen;
        let stream = self.first.is_some() || seen.done;
        // A stream cut short (or a server that sends no usage) counts the content
        // events that did arrive: one token each, as vLLM and TGI stream them.
        let output = seen
            .completion_tokens
            .or((stream && seen.content_events > 0).then_some(seen.content_events));
        let tpot = match (self.first, self.last, output) {
            (Some(first), Some(last), Some(n)) if n >= 2 => {
                Some((last - first) / (n - 1).min(u32::MAX as u64) as u32)
            }
            _ => None,
        };
        let g = crate::metrics::Generation {
            ttft: self.first.map(|f| f - self.start),
            tpot,
            duration: self.start.elapsed(),
            input_tokens: seen.prompt_tokens,
            output_tokens: output,
            finish: seen.finish.clone(),
            errors: seen.errors,
        };
        self.metrics.generation(&self.names.0, &self.names.1, &g);
    }
}

impl hyper::body::Body for Measured {
    type Data = Bytes;
    type Error = crate::error::BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref()
                    && this.reader.feed(data)
                {
                    let now = tokio::time::Instant::now();
                    this.first.get_or_insert(now);
                    this.last = Some(now);
                }
            }
            std::task::Poll::Ready(None) | std::task::Poll::Ready(Some(Err(_))) => this.record(),
            std::task::Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Measured {
    fn drop(&mut self) {
        // The client left (or the stream broke) before the end: what arrived counts.
        self.record();
    }
}
