//! The proxy's side of coalescing: which requests may queue, handing one to its
//! variant's batcher, and how the outcome becomes a response. Also the batcher's way
//! to the executor (`HttpExecutor`), over the same pooled client as forwarding.

use std::sync::Arc;

use http::uri::PathAndQuery;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use tokio::time::Instant;

use super::context::{Cx, Served};
use super::spans::BatchSpan;
use crate::addr::Upstream;
use crate::batch::batcher::{BatchError, Batcher, Delivered, ExecFuture, Execute, Submission};
use crate::batch::codec::{Item, Payload};
use crate::batch::queue::{BatchLimits, ClassLimits};
use crate::error::{Body, ProxyError, full};
use crate::executor::oip;
use crate::grpc;
use crate::trace::export::Tracer;
use crate::trace::{SpanContext, TRACEPARENT};
use crate::upstream::Upstreams;

/// Largest executor reply accepted for a batch.
const MAX_REPLY_BYTES: usize = 256 * 1024 * 1024;

/// The header that names a request's priority class on a route with `priorities`.
pub static X_BRAID_PRIORITY: http::HeaderName = http::HeaderName::from_static("x-braid-priority");

/// The class `x-braid-priority` names among `classes`, when the request sends it; 400
/// for a name that is not one of them.
pub(super) fn named_class(
    classes: &[ClassLimits],
    headers: &HeaderMap,
) -> Option<Result<usize, ProxyError>> {
    let name = headers
        .get(&X_BRAID_PRIORITY)?
        .to_str()
        .unwrap_or_default()
        .trim();
    Some(classes.iter().position(|c| &*c.name == name).ok_or_else(|| {
        let known: Vec<&str> = classes.iter().map(|c| &*c.name).collect();
        ProxyError::BadRequest(format!(
            "unknown priority class {name:?} in x-braid-priority: this route's classes are {}",
            known.join(", ")
        ))
    }))
}

/// The priority class a request asks for: the `x-braid-priority` header (a class name),
/// else Triton's `parameters.priority` (1 = the first class; past the last, the last),
/// else the route's default. Routes without classes ignore both.
fn priority_class(
    limits: &BatchLimits,
    headers: &HeaderMap,
    item: &Item,
) -> Result<usize, ProxyError> {
    if limits.classes.is_empty() {
        return Ok(0);
    }
    if let Some(class) = named_class(&limits.classes, headers) {
        return class;
    }
    Ok(match item.priority {
        Some(level) => (level as usize - 1).min(limits.classes.len() - 1),
        None => limits.default_class,
    })
}

/// Queues `item` on the variant's batcher and waits for its rows, answered in the
/// caller's form (REST, or a gRPC ModelInferResponse for a gRPC caller). `path`: the
/// executor's path for the batch.
pub(super) async fn submit(
    batcher: &Batcher,
    cx: &Cx<'_>,
    vi: usize,
    item: Item,
    path: PathAndQuery,
) -> Served {
    Served {
        result: queued(batcher, cx, vi, item, path).await,
        repeatable: cx.r.route().retry.idempotent,
        before_first_token: false,
    }
}

async fn queued(
    batcher: &Batcher,
    cx: &Cx<'_>,
    vi: usize,
    item: Item,
    path: PathAndQuery,
) -> Result<Response<Body>, ProxyError> {
    let route = cx.r.route();
    let variant = &route.variants[vi];
    let (headers, prepared, grpc) = (&cx.r.parts.headers, cx.prepared, cx.r.wire.grpc());
    // The batch's span links to this request's, when it is recorded.
    let recorded = cx.r.trace.as_ref().filter(|t| t.context.sampled);
    let trace = recorded.map(|t| t.context);
    if let Some(name) = route.row_id.as_deref()
        && item.has_input(name)
    {
        return Err(ProxyError::BadRequest(format!(
            "input {name:?} is reserved: this route's batching uses it to check row order"
        )));
    }
    let limits = route.batching.as_ref();
    let class = limits.map_or(Ok(0), |l| priority_class(l, headers, &item))?;
    let queue_timeout = limits.and_then(|l| {
        l.classes
            .get(class)
            .map_or(l.queue_timeout, |c| c.queue_timeout)
    });
    let reply = batcher
        .submit(Submission {
            item,
            upstream: variant.upstream.clone(),
            path: path.as_str().to_owned(),
            deadline: prepared.deadline,
            queue_deadline: queue_timeout.map(|t| Instant::now() + t),
            row_id: route.row_id.clone(),
            class,
            trace,
        })
        .await;
    match reply {
        Ok(delivered) => {
            let Delivered {
                payload,
                waited,
                batch_rows,
            } = delivered;
            let mut resp = if grpc {
                let r = grpc::oip::grpc_response(&payload.body, payload.header_len).map_err(
                    |reason| ProxyError::Upstream {
                        backend: variant.upstream.authority.to_string(),
                        reason: format!("the executor's reply as gRPC: {reason}"),
                    },
                )?;
                grpc::unary_ok(&r)
            } else {
                let mut resp = Response::new(full(payload.body));
                oip::set_body_type(resp.headers_mut(), payload.header_len);
                resp
            };
            // For the access log, at the edge.
            resp.extensions_mut().insert(Batched { waited, batch_rows });
            Ok(resp)
        }
        Err(BatchError::Backend { status, body }) if grpc => {
            let (code, message) = grpc::oip::rest_error(status.as_u16(), &body);
            let mut resp = grpc::status_response(code, &message);
            // The HTTP status this answer stands for, for the metrics.
            resp.extensions_mut().insert(status);
            Ok(resp)
        }
        Err(e) => ProxyError::from_batch(&variant.name, &variant.upstream.authority, e),
    }
}

/// How a batched request was served: its wait in the queue and its batch's rows.
#[derive(Clone, Copy, Debug)]
pub struct Batched {
    pub waited: std::time::Duration,
    pub batch_rows: usize,
}

/// The batcher's executor in production: a POST through braid's pooled client.
pub struct HttpExecutor {
    pub upstreams: Upstreams,
    /// Records a `braid.batch` span for each call that carries a recorded request.
    pub tracer: Option<Arc<Tracer>>,
}

impl Execute for HttpExecutor {
    fn execute<'a>(
        &'a self,
        up: &'a Upstream,
        path: &'a str,
        body: Payload,
        links: &'a [SpanContext],
    ) -> ExecFuture<'a> {
        Box::pin(async move {
            let tracer = self.tracer.as_ref().filter(|_| !links.is_empty());
            let span = tracer.map(|_| BatchSpan::start());
            let uri = Uri::builder()
                .scheme(up.scheme.clone())
                .authority(up.authority.clone())
                .path_and_query(path)
                .build()
                .map_err(|e| BatchError::BadReply(format!("bad executor path: {e}")))?;
            let mut req = Request::new(Full::new(body.body));
            *req.method_mut() = Method::POST;
            *req.uri_mut() = uri;
            oip::set_body_type(req.headers_mut(), body.header_len);
            if let Some(s) = &span {
                req.headers_mut()
                    .insert(TRACEPARENT.clone(), s.client.traceparent());
            }
            // No reply at all (refused, reset, killed mid-batch) is unavailability (503,
            // retry later); a reply we cannot trust is a bad gateway (502).
            let sent = self.upstreams.send(up.protocol, None, req).await;
            if let (Some(t), Some(s)) = (tracer, span) {
                s.finish(
                    t,
                    links,
                    &up.authority,
                    sent.as_ref().ok().map(|r| r.status()),
                );
            }
            let resp = sent.map_err(|e| BatchError::Unreachable(e.to_string()))?;
            let status: StatusCode = resp.status();
            let header_len = oip::header_len(resp.headers())
                .map_err(|e| BatchError::BadReply(format!("executor's reply: {}", e.0)))?;
            let body = Limited::new(resp.into_body(), MAX_REPLY_BYTES)
                .collect()
                .await
                .map_err(|e| BatchError::BadReply(format!("reading executor reply: {e}")))?
                .to_bytes();
            Ok((status, Payload { body, header_len }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::batch::codec;
    use http::HeaderValue;
    use std::sync::Arc;

    /// Triton's `parameters.priority` (1 = highest) maps onto the classes in order;
    /// levels past the last class get the last; none gets the default; the header wins.
    #[test]
    fn tritons_priority_parameter_picks_a_class() {
        let class = |name: &str| ClassLimits {
            name: name.into(),
            max_queue: 8,
            queue_timeout: None,
            sheddable: false,
        };
        let limits = BatchLimits {
            max_batch_size: 8,
            max_delay: None,
            max_queue: 8,
            queue_timeout: None,
            max_inflight: 1,
            classes: Arc::from([class("a"), class("b"), class("c")]),
            default_class: 1,
        };
        let item = |params: serde_json::Value| {
            let body = serde_json::json!({"inputs": [{"name": "t", "datatype": "BYTES",
                "shape": [1], "data": ["x"]}], "parameters": params});
            codec::parse_v2(body.to_string().as_bytes()).unwrap()
        };
        let none = HeaderMap::new();
        let pick = |p, h: &HeaderMap| priority_class(&limits, h, &item(p)).ok();
        assert_eq!(pick(serde_json::json!({"priority": 1}), &none), Some(0));
        assert_eq!(pick(serde_json::json!({"priority": 3}), &none), Some(2));
        assert_eq!(pick(serde_json::json!({"priority": 9}), &none), Some(2));
        assert_eq!(pick(serde_json::json!({"priority": 0}), &none), Some(1));
        assert_eq!(pick(serde_json::json!({}), &none), Some(1));
        let mut header = HeaderMap::new();
        header.insert(&X_BRAID_PRIORITY, HeaderValue::from_static("c"));
        assert_eq!(pick(serde_json::json!({"priority": 1}), &header), Some(2));
        // The priority is braid's to use: it does not split batches.
        assert_eq!(
            item(serde_json::json!({"priority": 1})).key,
            item(serde_json::json!({})).key
        );
    }
}
