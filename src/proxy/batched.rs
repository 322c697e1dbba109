//! The proxy's side of coalescing: which requests may queue, handing one to its
//! variant's batcher, and how the outcome becomes a response. Also the batcher's way
//! to the executor (`HttpExecutor`), over the same pooled client as forwarding.

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use tokio::time::Instant;

use super::Prepared;
use crate::addr::Upstream;
use crate::batch::batcher::{BatchError, Batcher, ExecFuture, Execute, Submission};
use crate::batch::codec::{self, Item, Unqueued};
use crate::error::{Body, ProxyError, full};
use crate::executor::oip::HEADER_LENGTH;
use crate::route::{Route, Variant};
use crate::upstream::Upstreams;

/// Largest executor reply accepted for a batch.
const MAX_REPLY_BYTES: usize = 256 * 1024 * 1024;

/// Whether a request can wait in a batch: `Ok(Some)` to queue, `Ok(None)` to forward
/// alone (not an inference call, or a form we do not merge), `Err` for a 400.
pub(super) fn queueable(
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Option<Item>, String> {
    let path = uri.path();
    let parsed = if path.starts_with("/v2/models/") && path.ends_with("/infer") {
        if headers.contains_key(HEADER_LENGTH) {
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

/// Queues `item` on the variant's batcher and waits for its rows.
pub(super) async fn submit(
    batcher: &Batcher,
    route: &Route,
    variant: &Variant,
    item: Item,
    path: PathAndQuery,
    prepared: &Prepared,
) -> Result<Response<Body>, ProxyError> {
    if let Some(name) = route.row_id.as_deref()
        && item.has_input(name)
    {
        return Err(ProxyError::BadRequest(format!(
            "input {name:?} is reserved: this route's batching uses it to check row order"
        )));
    }
    let queue_timeout = route.batching.and_then(|l| l.queue_timeout);
    let reply = batcher
        .submit(Submission {
            item,
            upstream: variant.upstream.clone(),
            path: path.as_str().to_owned(),
            deadline: prepared.deadline,
            queue_deadline: queue_timeout.map(|t| Instant::now() + t),
            row_id: route.row_id.clone(),
        })
        .await;
    match reply {
        Ok(body) => {
            let mut resp = Response::new(full(body));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            Ok(resp)
        }
        Err(e) => ProxyError::from_batch(&variant.name, &variant.upstream.authority, e),
    }
}

/// The batcher's executor in production: a POST through braid's pooled client.
pub struct HttpExecutor(pub Upstreams);

impl Execute for HttpExecutor {
    fn execute<'a>(&'a self, up: &'a Upstream, path: &'a str, body: Bytes) -> ExecFuture<'a> {
        Box::pin(async move {
            let uri = Uri::builder()
                .scheme(up.scheme.clone())
                .authority(up.authority.clone())
                .path_and_query(path)
                .build()
                .map_err(|e| BatchError::BadReply(format!("bad executor path: {e}")))?;
            let mut req = Request::new(Full::new(body));
            *req.method_mut() = Method::POST;
            *req.uri_mut() = uri;
            req.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            // No reply at all (refused, reset, killed mid-batch) is unavailability (503,
            // retry later); a reply we cannot trust is a bad gateway (502).
            let resp = self
                .0
                .send(up.protocol, None, req)
                .await
                .map_err(|e| BatchError::Unreachable(e.to_string()))?;
            let status: StatusCode = resp.status();
            let body = Limited::new(resp.into_body(), MAX_REPLY_BYTES)
                .collect()
                .await
                .map_err(|e| BatchError::BadReply(format!("reading executor reply: {e}")))?
                .to_bytes();
            Ok((status, body))
        })
    }
}
