//! gRPC callers. A unary call of the inference service that names a model
//! (ModelInfer, ModelMetadata, ModelReady) is read whole and routed by the model in
//! its message, like a REST path: the same routes, weights, sticky key and override
//! header (gRPC metadata are HTTP/2 headers), its field 1 rewritten to the variant's
//! `target_model`. Every other gRPC call (any service, streaming in either direction)
//! is routed by path prefix and streamed through, trailers included. gRPC always
//! leaves over HTTP/2: an `http://` backend is spoken to with prior knowledge (h2c).
//! (The gRPC side of the wire seam, `wire/mod.rs`.)

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::Response;
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame};

use super::{Found, Pending};
use crate::addr::Protocol;
use crate::batch::codec::{self, Item, PathModel, Unqueued};
use crate::config::Active;
use crate::error::{Body, BoxError, Polled, ProxyError};
use crate::grpc::{self, pb};
use crate::grpc::{
    GRPC_STATUS, declared_len, frame, next_message, status_name, string_field, unary_message,
    with_string_field,
};
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::route::{Match, Route, Variant};
use crate::watched::{End, Watch, Watched};
use http::uri::PathAndQuery;
use prost::Message;

/// A model-naming call's route, from its message (read whole): by model, else by path
/// prefix, else NOT_FOUND listing the models braid routes.
pub(super) fn find_model<'a, B>(
    active: &'a Active,
    parts: &http::request::Parts,
    bytes: Bytes,
) -> Result<Found<'a, B>, ProxyError> {
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
    Ok(Found::new(m, Pending::Read(bytes)))
}

/// Reads a ModelStreamInfer call up to its first message and finds the stream's
/// route by the model it names (else by path prefix), as `find_model` does.
pub(super) async fn find_stream<'a, B>(
    proxy: &Proxy,
    active: &'a Active,
    parts: &http::request::Parts,
    body: B,
) -> Result<Found<'a, B>, ProxyError>
where
    B: hyper::body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    let call = parts.uri.path();
    let bad = |e: String| ProxyError::BadRequest(format!("{call}: {e}"));
    let mut rest: Body = body.map_err(Into::into).boxed();
    let mut head = BytesMut::new();
    let model = loop {
        if let Some((msg, _)) = next_message(&head).map_err(bad)? {
            break string_field(msg, 1).map_err(bad)?.to_string();
        }
        if declared_len(&head)
            .map_err(bad)?
            .is_some_and(|n| n > proxy.max_body_bytes)
        {
            return Err(ProxyError::BodyTooLarge {
                limit: proxy.max_body_bytes,
            });
        }
        match rest.frame().await {
            Some(Ok(f)) => {
                if let Ok(data) = f.into_data() {
                    head.extend_from_slice(&data);
                }
            }
            Some(Err(e)) => return Err(bad(format!("reading the stream: {e}"))),
            None => return Err(bad("the stream ended before its first message".into())),
        }
    };
    let routes = &active.snapshot.routes;
    let m = routes
        .find_model(&model)
        .or_else(|| routes.find(call))
        .ok_or_else(|| ProxyError::UnknownModel {
            model,
            models: routes.models(),
        })?;
    Ok(Found::new(m, Pending::Started { head, rest }))
}

/// A streamed call's body as it goes to `variant`: as it arrives, or, for a model
/// stream, message by message, each at most `limit` bytes and naming the variant's
/// target model where it named the route's.
pub(in crate::proxy) fn streamed<B>(
    body: Pending<B>,
    variant: &Variant,
    route: &Route,
    limit: usize,
) -> Body
where
    B: hyper::body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    let rename = route.model.clone().zip(variant.target_model.clone());
    match body {
        Pending::Unread(b) => b.map_err(Into::into).boxed(),
        Pending::Read(b) => http_body_util::Full::new(b).map_err(|e| match e {}).boxed(),
        Pending::Started { head, rest } => Messages {
            inner: rest,
            buf: head,
            rename,
            limit,
            ended: false,
        }
        .boxed(),
    }
}

/// A model stream's request body, passed on one message at a time.
struct Messages {
    inner: Body,
    /// What has arrived and not been passed on.
    buf: BytesMut,
    /// (the route's model, the variant's target model).
    rename: Option<(Arc<str>, Arc<str>)>,
    limit: usize,
    ended: bool,
}

impl HttpBody for Messages {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Polled {
        loop {
            let this = &mut *self;
            match next_message(&this.buf) {
                Ok(Some((msg, used))) => {
                    let renamed = this.rename.as_ref().and_then(|(model, target)| {
                        (string_field(msg, 1).ok()? == &**model)
                            .then(|| with_string_field(msg, 1, target).ok())?
                    });
                    let out = match renamed {
                        Some(m) => {
                            this.buf.advance(used);
                            frame(&m)
                        }
                        None => this.buf.split_to(used).freeze(),
                    };
                    return Poll::Ready(Some(Ok(Frame::data(out))));
                }
                Ok(None) => {}
                Err(e) => return Poll::Ready(Some(Err(e.into()))),
            }
            if let Ok(Some(n)) = declared_len(&this.buf)
                && n > this.limit
            {
                let e = format!("a {n}-byte message is over the {}-byte limit", this.limit);
                return Poll::Ready(Some(Err(e.into())));
            }
            if this.ended {
                if this.buf.is_empty() {
                    return Poll::Ready(None);
                }
                return Poll::Ready(Some(Err("the stream ended inside a message".into())));
            }
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(f)) => match f.into_data() {
                    Ok(data) => this.buf.extend_from_slice(&data),
                    Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                },
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => this.ended = true,
            }
        }
    }
}

/// Whether a ModelInfer may wait in the variant's batch (as REST, under the variant's
/// target model or the route's), and the executor path its batch goes to.
pub(super) fn queueable(
    route: &Route,
    variant: &Variant,
    parts: &http::request::Parts,
    body: &Bytes,
) -> Result<Option<(Item, PathAndQuery)>, String> {
    let target = variant.target_model.as_ref().or(route.model.as_ref());
    match target {
        Some(t) if parts.uri.path().ends_with("/ModelInfer") => queueable_grpc(body, t),
        _ => Ok(None),
    }
}

/// Whether a gRPC ModelInfer can wait in a batch, and the executor path (REST) its
/// batch goes to: the request in its REST form (`grpc::oip::rest_request`), then as
/// `queueable`. The model is the route's (its target's), as for REST.
fn queueable_grpc(body: &Bytes, target: &str) -> Result<Option<(Item, PathAndQuery)>, String> {
    let msg = grpc::unary_message(body)?;
    let req = pb::ModelInferRequest::decode(msg)
        .map_err(|e| format!("malformed ModelInferRequest: {e}"))?;
    let path = match req.model_version.as_str() {
        "" => format!("/v2/models/{target}/infer"),
        v => format!("/v2/models/{target}/versions/{v}/infer"),
    };
    let Ok(path) = PathAndQuery::try_from(path) else {
        return Ok(None); // A version no path can carry: forwarded as it is.
    };
    let (rest, header_len) = grpc::oip::rest_request(&req)?;
    let unnamed = PathModel {
        name: None,
        version: None,
    };
    match codec::parse_v2_with(&rest, Some(header_len), unnamed) {
        Ok(item) => Ok(Some((item, path))),
        Err(Unqueued::Alone) => Ok(None),
        Err(Unqueued::Bad(msg)) => Err(msg),
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
pub(in crate::proxy) fn count_status(
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
    let tap = StatusTap(Some((metrics.clone(), route.clone(), variant.clone())));
    Response::from_parts(parts, Watched::new(body, tap).boxed())
}

/// Where to count, until counted.
struct StatusTap(Option<(Arc<Metrics>, Arc<str>, Arc<str>)>);

impl StatusTap {
    fn count(&mut self, status: &'static str) {
        if let Some((metrics, route, variant)) = self.0.take() {
            metrics.grpc_request(&route, &variant, status);
        }
    }
}

impl Watch for StatusTap {
    fn frame(&mut self, f: &Frame<Bytes>) {
        if let Some(t) = f.trailers_ref() {
            let status = t
                .get(&GRPC_STATUS)
                .map_or("UNKNOWN", |v| status_name(v.as_bytes()));
            self.count(status);
        }
    }

    fn end(&mut self, how: End) {
        // Ended without trailers: UNKNOWN; left before the end (the client, or the
        // server giving up on the stream): CANCELLED.
        self.count(match how {
            End::Finished | End::Failed => "UNKNOWN",
            End::Dropped => "CANCELLED",
        });
    }
}
