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
