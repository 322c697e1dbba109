//! gRPC callers. A unary call of the inference service that names a model
//! (ModelInfer, ModelMetadata, ModelReady) is read whole and routed by the model in
//! its message, like a REST path: the same routes, weights, sticky key and override
//! header (gRPC metadata are HTTP/2 headers), its field 1 rewritten to the variant's
//! `target_model`. Every other gRPC call (any service, streaming in either direction)
//! is routed by path prefix and streamed through, trailers included. gRPC always
//! leaves over HTTP/2: an `http://` backend is spoken to with prior knowledge (h2c).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::Response;
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, SizeHint};

use super::{Pending, Proxy};
use crate::addr::Protocol;
use crate::config::Active;
use crate::error::{Body, BoxError, ProxyError};
use crate::grpc::{
    GRPC_STATUS, frame, status_name, string_field, unary_message, with_string_field,
};
use crate::metrics::Metrics;
use crate::route::{Match, Variant};
use crate::server;

impl Proxy {
    /// Reads a model-naming call and finds its route: by model, else by path prefix,
    /// else NOT_FOUND listing the models braid routes.
    pub(super) async fn find_grpc_model<'a, B>(
        &self,
        active: &'a Active,
        parts: &http::request::Parts,
        body: B,
    ) -> Result<(Match<'a>, Pending<B>), ProxyError>
    where
        B: hyper::body::Body<Data = Bytes>,
        B::Error: Into<BoxError>,
    {
        let bytes = server::read_body(&parts.headers, body, self.max_body_bytes).await?;
        let call = parts.uri.path();
        let bad = |e: String| ProxyError::BadRequest(format!("{call}: {e}"));
        let model = string_field(unary_message(&bytes).map_err(bad)?, 1).map_err(bad)?;
        let routes = &active.snapshot.routes;
        let m = routes
            .find_model(model)
            .or_else(|| routes.find(call))
            .ok_or_else(|| ProxyError::UnknownModel {
                model: model.to_string(),
                models: routes.models(),
            })?;
        Ok((m, Pending::Read(bytes)))
    }
}

/// How gRPC reaches a backend: HTTP/2 always, with prior knowledge where the
/// backend's scheme says HTTP/1.1 (gRPC has no HTTP/1.1 form); TLS negotiates h2.
pub(super) fn over_http2(p: Protocol) -> Protocol {
    match p {
        Protocol::Http1 | Protocol::H2c => Protocol::H2c,
        Protocol::Tls => Protocol::Tls,
    }
}

/// A model-naming call routed by its model, with field 1 naming the variant's target
/// model instead (every other byte as sent). `None` when there is nothing to rewrite.
pub(super) fn model_renamed(m: &Match<'_>, variant: &Variant, body: &Bytes) -> Option<Bytes> {
    let target = variant.target_model.as_deref()?;
    let model = m.route.model.as_deref()?;
    let msg = unary_message(body).ok()?;
    if string_field(msg, 1).ok()? != model {
        return None;
    }
    Some(frame(&with_string_field(msg, 1, target).ok()?))
}

/// Counts how a gRPC call ends in `braid_grpc_requests`: at once for a Trailers-Only
/// answer (braid's own errors included), else when its trailers pass. An answer that
/// ends without trailers counts as UNKNOWN; one the client leaves first, CANCELLED.
pub(super) fn count_status(
    metrics: &Arc<Metrics>,
    route: &Arc<str>,
    variant: &Arc<str>,
    resp: Response<Body>,
) -> Response<Body> {
    if let Some(v) = resp.headers().get(&GRPC_STATUS) {
        metrics.grpc_request(route, variant, status_name(v.as_bytes()));
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let tap = StatusTap {
        inner: body,
        pending: Some((metrics.clone(), route.clone(), variant.clone())),
    };
    Response::from_parts(parts, tap.boxed())
}

struct StatusTap {
    inner: Body,
    /// Where to count, until counted.
    pending: Option<(Arc<Metrics>, Arc<str>, Arc<str>)>,
}

impl StatusTap {
    fn count(&mut self, status: &'static str) {
        if let Some((metrics, route, variant)) = self.pending.take() {
            metrics.grpc_request(&route, &variant, status);
        }
    }
}

impl HttpBody for StatusTap {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(t) = f.trailers_ref() {
                    let status = t
                        .get(&GRPC_STATUS)
                        .map_or("UNKNOWN", |v| status_name(v.as_bytes()));
                    self.count(status);
                }
            }
            Poll::Ready(Some(Err(_))) | Poll::Ready(None) => self.count("UNKNOWN"),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for StatusTap {
    fn drop(&mut self) {
        self.count("CANCELLED");
    }
}
