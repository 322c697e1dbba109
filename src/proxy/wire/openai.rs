//! OpenAI-style callers: a call is read whole and routed by its body's `model`, like a
//! REST path names its model: the same routes, weights and sticky key (the header, or
//! the body's `user`), the body's `model` rewritten to the variant's `target_model`
//! with every other byte as sent. A call whose model no route names goes where its
//! path leads (a `path_prefix` route in front of an OpenAI server works as before).

use bytes::Bytes;
use http::uri::PathAndQuery;

use super::{Found, Pending};
use crate::batch::codec::{self, Item, Unqueued};
use crate::config::Active;
use crate::error::ProxyError;
use crate::openai::{self, Call};
use crate::route::Variant;
use http::{HeaderMap, header};

/// The call's route, from its body (read whole): by the body's model, else by path
/// prefix, else 404 (an unrouted model) or 400 (a body naming none) in OpenAI's shape.
pub(super) fn find<'a, B>(
    active: &'a Active,
    parts: &http::request::Parts,
    bytes: Bytes,
) -> Result<Found<'a, B>, ProxyError> {
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
    Ok(Found {
        call: Some(Box::new(call)),
        ..Found::new(m, Pending::Read(bytes))
    })
}

/// The call's body as `variant` gets it: its `model` rewritten to the variant's
/// `target_model`, and a stream asked for its usage chunk when braid takes it out
/// again (lengths follow from the new body); `None` to send it as it came.
pub(super) fn model_renamed(
    call: Option<&Call>,
    variant: &Variant,
    body: &Bytes,
) -> Option<(Bytes, Option<usize>)> {
    let call = call?;
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

/// Whether a call can wait in a batch: only `/v1/embeddings`, on a variant that names
/// the model its executor serves (generations are forwarded one by one).
pub(super) fn queueable(
    parts: &http::request::Parts,
    variant: &Variant,
    body: &Bytes,
) -> Result<Option<(Item, PathAndQuery)>, String> {
    match variant.target_model.as_deref() {
        Some(t) if parts.uri.path() == openai::EMBEDDINGS_PATH => {
            queueable_embeddings(&parts.headers, body, t)
        }
        _ => Ok(None),
    }
}

/// Whether an OpenAI `/v1/embeddings` call can wait in a batch, for `target` (the
/// model the executor serves it under), and the executor path its batch goes to.
fn queueable_embeddings(
    headers: &HeaderMap,
    body: &Bytes,
    target: &str,
) -> Result<Option<(Item, PathAndQuery)>, String> {
    if headers.contains_key(header::CONTENT_ENCODING) {
        return Ok(None);
    }
    match codec::parse_embeddings(body, target) {
        Ok(item) => Ok(Some((
            item,
            PathAndQuery::from_static(crate::openai::EMBEDDINGS_PATH),
        ))),
        Err(Unqueued::Alone) => Ok(None),
        Err(Unqueued::Bad(msg)) => Err(msg),
    }
}
