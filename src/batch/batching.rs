//! The proxy's side of coalescing: which requests may queue, their deadlines, the
//! batcher for each (route, variant), and how a batch outcome becomes a response.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, Uri, header};
use tokio::time::Instant;

use super::batcher::{BatchError, Batcher, Submission};
use super::codec::{self, Item, Unqueued};
use super::queue::BatchLimits;
use crate::error::{Body, ProxyError, full};
use crate::proxy::Proxy;
use crate::route::{Route, Variant};

/// (route, variant) names.
type VariantKey = (Arc<str>, Arc<str>);

/// Batchers by (route, variant) name; each follows config reloads itself.
#[derive(Default)]
pub struct Batchers(Mutex<HashMap<VariantKey, Batcher>>);

/// Whether a request can wait in a batch: `Ok(Some)` to queue, `Ok(None)` to forward
/// alone (not an inference call, or a form we do not merge), `Err` for a 400.
pub fn queueable(uri: &Uri, headers: &HeaderMap, body: &Bytes) -> Result<Option<Item>, String> {
    let path = uri.path();
    let parsed = if path.starts_with("/v2/models/") && path.ends_with("/infer") {
        if headers.contains_key(crate::executor::oip::HEADER_LENGTH) {
            return Ok(None); // Triton binary tensors: forwarded as they are.
        }
        codec::parse_v2(body)
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

pub async fn submit(
    proxy: &Proxy,
    route: &Route,
    variant: &Variant,
    limits: BatchLimits,
    item: Item,
    path: String,
    deadline: Option<Instant>,
) -> Result<Response<Body>, ProxyError> {
    let now = Instant::now();
    if let Some(name) = route.row_id.as_deref()
        && item.has_input(name)
    {
        return Err(ProxyError::BadRequest(format!(
            "input {name:?} is reserved: this route's batching uses it to check row order"
        )));
    }
    let batcher = batcher(proxy, route, variant, limits);
    let reply = batcher
        .submit(Submission {
            item,
            upstream: variant.upstream.clone(),
            path,
            deadline,
            queue_deadline: limits.queue_timeout.map(|t| now + t),
            row_id: route.row_id.clone(),
        })
        .await;
    // Named only in errors: made when one is.
    let backend = || variant.upstream.authority.to_string();
    match reply {
        Ok(body) => {
            let mut resp = Response::new(full(body));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            Ok(resp)
        }
        Err(BatchError::QueueFull) => Err(ProxyError::QueueFull {
            variant: variant.name.to_string(),
        }),
        Err(BatchError::Expired) => Err(ProxyError::DeadlinePassed),
        Err(BatchError::Backend { status, body }) => {
            let mut resp = Response::new(full(body));
            *resp.status_mut() = status;
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            Ok(resp)
        }
        Err(BatchError::BadReply(reason)) => Err(ProxyError::Upstream {
            backend: backend(),
            reason,
        }),
        Err(BatchError::Unreachable(reason)) => Err(ProxyError::Connect {
            backend: backend(),
            reason,
        }),
    }
}

/// The batcher for (route, variant), started on first use.
fn batcher(proxy: &Proxy, route: &Route, variant: &Variant, limits: BatchLimits) -> Batcher {
    let mut map = proxy.batchers.0.lock().unwrap_or_else(|e| e.into_inner());
    let key = (route.name.clone(), variant.name.clone());
    map.entry(key.clone())
        .or_insert_with(|| {
            Batcher::spawn(
                limits,
                proxy.store.clone(),
                proxy.upstreams.clone(),
                proxy.metrics.clone(),
                key,
            )
        })
        .clone()
}
