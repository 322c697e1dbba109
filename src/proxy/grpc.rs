//! gRPC callers. A unary call of the inference service that names a model
//! (ModelInfer, ModelMetadata, ModelReady) is read whole and routed by the model in
//! its message, like a REST path: the same routes, weights, sticky key and override
//! header (gRPC metadata are HTTP/2 headers), its field 1 rewritten to the variant's
//! `target_model`. Every other gRPC call (any service, streaming in either direction)
//! is routed by path prefix and streamed through, trailers included. gRPC always
//! leaves over HTTP/2: an `http://` backend is spoken to with prior knowledge (h2c).

use bytes::Bytes;

use super::{Pending, Proxy};
use crate::addr::Protocol;
use crate::config::Active;
use crate::error::{BoxError, ProxyError};
use crate::grpc::{frame, string_field, unary_message, with_string_field};
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
