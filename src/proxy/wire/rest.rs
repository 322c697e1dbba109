//! REST callers (OIP v2, KServe v1, any other HTTP request): routed by path, a model
//! path's name rewritten for the variant (in the path, and in a v2 body that repeats
//! it), inference calls coalesced where the variant has a batcher. `GET /v1/models` on
//! a pod with model routes lists them, as an OpenAI server would. (The REST side of
//! the wire seam, `wire/mod.rs`.)

use bytes::Bytes;
use http::Method;

use super::{Found, Pending, Unfound};
use crate::batch::codec::{self, Item, PathModel, Unqueued};
use crate::config::Active;
use crate::error::ProxyError;
use crate::executor::oip;
use crate::route::{self, Match, Variant};
use http::header;

/// The route by path; `GET /v1/models` answered here where routes name models.
#[inline(always)]
pub(super) fn find<'a, B>(
    active: &'a Active,
    parts: &http::request::Parts,
    body: B,
) -> Result<Found<'a, B>, Unfound> {
    if parts.method == Method::GET && parts.uri.path() == crate::openai::MODELS_PATH {
        let names = active.snapshot.routes.model_names();
        // Without model routes the path is a backend's, proxied as any other.
        if !names.is_empty() {
            let listed = crate::openai::models_response(names.into_iter());
            return Err(Unfound::Answer(Box::new(listed)));
        }
    }
    by_path(active, parts, body).map_err(Unfound::Refused)
}

/// The route whose prefix the path starts with (also every gRPC call not read whole).
#[inline(always)]
pub(super) fn by_path<'a, B>(
    active: &'a Active,
    parts: &http::request::Parts,
    body: B,
) -> Result<Found<'a, B>, ProxyError> {
    match active.snapshot.routes.find(parts.uri.path()) {
        Some(m) => Ok(Found::new(m, Pending::Unread(body))),
        None => Err(ProxyError::NoRoute {
            path: parts.uri.path().to_string(),
        }),
    }
}

/// A v2 inference body that repeats the path's model in `model_name` (KServe's client
/// does) names the variant's target model instead, as the rewritten path does: the new
/// body, and its JSON header's new length when binary data follows. `None` when there
/// is nothing to rewrite (most requests: checked without parsing).
#[inline]
pub(super) fn model_renamed(
    m: &Match<'_>,
    variant: &Variant,
    parts: &http::request::Parts,
    body: &Bytes,
) -> Option<(Bytes, Option<usize>)> {
    let target = variant.target_model.as_deref()?;
    // Only where the path itself is rewritten (model routes), and only on a v2
    // inference path: the model is where routing found it.
    let span = m.model_span.as_ref()?;
    let path = parts.uri.path();
    if !path.starts_with("/v2/") {
        return None;
    }
    let model = path.get(span.clone())?;
    match path.get(span.end..)?.strip_suffix("/infer")? {
        "" => {}
        rest if rest.starts_with("/versions/") => {}
        _ => return None,
    }
    if model == target {
        return None;
    }
    static MODEL_NAME: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"model_name\""));
    MODEL_NAME.find(body)?;
    let header_len = oip::header_len(&parts.headers).ok()?;
    let (head, rest) = body.split_at_checked(header_len.unwrap_or(body.len()))?;
    let mut v: serde_json::Value = serde_json::from_slice(head).ok()?;
    let named = v.get_mut("model_name")?;
    if named.as_str() != Some(model) {
        return None;
    }
    *named = serde_json::Value::String(target.to_string());
    let mut out = serde_json::to_vec(&v).ok()?;
    let new_header_len = header_len.map(|_| out.len());
    out.extend_from_slice(rest);
    Some((Bytes::from(out), new_header_len))
}

/// Whether a request can wait in a batch: `Ok(Some)` to queue, `Ok(None)` to forward
/// alone (not an inference call, or a form we do not merge), `Err` for a 400.
pub(super) fn queueable(
    parts: &http::request::Parts,
    body: &Bytes,
) -> Result<Option<Item>, String> {
    let (path, headers) = (parts.uri.path(), &parts.headers);
    if headers.contains_key(header::CONTENT_ENCODING) {
        return Ok(None); // Compressed: forwarded as it is.
    }
    let parsed = if let Some(model) = v2_infer_path(path) {
        let header_len = oip::header_len(headers).map_err(|e| e.0)?;
        codec::parse_v2_with(body, header_len, model)
    } else if path.starts_with("/v1/models/") && path.ends_with(":predict") {
        codec::parse_v1(body)
    } else {
        return Ok(None);
    };
    match parsed {
        Ok(item) => Ok(Some(item)),
        Err(Unqueued::Alone) => Ok(None),
        Err(Unqueued::Bad(msg)) => Err(msg),
    }
}

/// The model (and version) an OIP v2 inference path names:
/// `/v2/models/{m}[/versions/{v}]/infer`.
fn v2_infer_path(path: &str) -> Option<PathModel<'_>> {
    if !path.starts_with("/v2/") {
        return None;
    }
    let span = route::model_span(path)?;
    let version = match path[span.end..].strip_suffix("/infer")? {
        "" => None,
        rest => Some(rest.strip_prefix("/versions/")?),
    };
    Some(PathModel {
        name: Some(&path[span]),
        version,
    })
}
