//! Forwarding: the request as a variant's backend gets it (model name rewritten,
//! hop-by-hop headers stripped, `x-forwarded-for` appended), sent through the one
//! upstream path under the route's retry policy, budget and deadline; and gRPC calls
//! streamed both ways as they arrive (`stream`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Uri};
use http::{Request, Response, Version};
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;

use super::Proxy;
use super::context::{Cx, Routed, Served};
use super::generation::CommitPoint;
use super::spans::ClientSpans;
use crate::addr::Protocol;
use crate::error::{Body, ProxyError, SendError};
use crate::executor::oip::HEADER_LENGTH;
use crate::route::{self, Match, Variant};
use crate::server::ConnInfo;
use crate::trace::TRACEPARENT;
use crate::upstream::Reply;
use crate::upstream::retry::{self, Answer, Attempts, Call, Judge, TryHook, Uncommitted};

impl Proxy {
    /// Sends the request to the variant's backend under the route's retry policy and
    /// deadline (an OpenAI stream's tries judged at its first token); says whether
    /// sending it elsewhere (the fallback) would be safe.
    pub(super) async fn forward(&self, cx: &Cx<'_>, vi: usize, path: PathAndQuery) -> Served {
        let (r, prepared) = (&cx.r, &cx.prepared);
        let route = r.route();
        let variant = &route.variants[vi];
        let live = &r.live.variants[vi];
        let safe_method = r.wire.safe_to_repeat(r.parts);
        let renamed = r
            .wire
            .renamed(&r.m, r.call.as_deref(), variant, r.parts, &prepared.body);
        let protocol = r.wire.protocol(variant.upstream.protocol);
        // A stream's try succeeds at its first token, not at its head: a 200 that fails
        // before a token is a failed try (`CommitPoint`), under the same retry loop.
        let judge = r.streams().then(|| -> Arc<dyn Judge> {
            Arc::new(CommitPoint {
                ttft_timeout: route.ttft_timeout,
            })
        });
        // A route that neither retries, times tries out, tracks health nor judges its
        // answers needs none of the tower stack: one call, as cheap as it can be.
        let plain = route.retry.attempts <= 1
            && route.retry.per_try_timeout.is_none()
            && live.health.is_none()
            && judge.is_none();
        let left = prepared
            .deadline
            .map(|d| d.saturating_duration_since(Instant::now()));
        // A recorded request gets a CLIENT span per try, whose id the backend sees as
        // its parent; otherwise the backend's parent is braid's (unrecorded) span.
        let authority = &variant.upstream.authority;
        let spans = ClientSpans::new(
            self.tracer.as_ref(),
            r.trace.as_ref(),
            &r.parts.method,
            authority,
        );
        let body = renamed.as_ref().map_or(&prepared.body, |(b, _)| b);
        let outgoing = match &live.backend {
            // Cheaper still over HTTP/1.1: the client's headers are written as they
            // came, with no request built, when there is nothing hop-by-hop to take out.
            Some(backend)
                if plain
                    && protocol == Protocol::Http1
                    && renamed.is_none()
                    && !has_hop_by_hop(&r.parts.headers) =>
            {
                Outgoing::Direct(backend)
            }
            _ => {
                let built = (renamed.as_ref(), protocol, path.clone(), left);
                match built_request(cx, vi, built, spans.is_some()) {
                    Ok(out) => Outgoing::Built(out),
                    Err(e) => return Served::error(e),
                }
            }
        };
        let sent = async {
            let out = match outgoing {
                Outgoing::Built(out) => out,
                Outgoing::Direct(backend) => {
                    let head = DirectHead::new(r, left, spans.as_deref());
                    let (method, headers) = (&r.parts.method, &r.parts.headers);
                    let replaced = head.replaced();
                    let sending =
                        backend.send_head(method, path.as_str(), headers, &replaced, body.clone());
                    let sent = sending.await;
                    head.end(&sent);
                    return sent.map(boxed);
                }
            };
            if plain {
                let mut out = out;
                let end = spans.as_ref().map(|s| s.begin(0, out.headers_mut()));
                // Boxed, as the retried call below: hyper's clients and tower's stack
                // are large futures, and every request's future would carry their size
                // (and copy it when made) though most go the direct way above.
                let (backend, tls) = (live.backend.as_ref(), variant.tls.as_ref());
                let sent = Box::pin(self.upstreams.send_to(backend, protocol, tls, out)).await;
                if let Some(end) = end {
                    end.sent(&sent);
                }
                return sent.map(boxed);
            }
            let attempts = Attempts {
                policy: route.retry.clone(),
                budget: prepared.budget.clone(),
                metrics: live.retry_metrics.clone(),
                health: live.health.clone(),
                deadline: prepared.deadline,
                safe_method,
                body_len: prepared.body.len(),
                retried: 0,
            };
            let call = Call {
                upstreams: self.upstreams.clone(),
                backend: live.backend.clone(),
                protocol,
                tls: variant.tls.clone(),
                hook: spans.map(|s| -> (Arc<dyn TryHook>, _) { (s, Arc::default()) }),
            };
            Box::pin(retry::send(call, attempts, judge, out)).await
        };
        let result = match prepared.deadline {
            Some(d) => match tokio::time::timeout_at(d, sent).await {
                Ok(r) => r,
                Err(_) => {
                    if let Some(h) = &live.health {
                        h.record(false, Instant::now());
                    }
                    return Served::error(prepared.deadline_error(route, variant));
                }
            },
            None => sent.await,
        };
        served(result, safe_method || route.retry.idempotent, authority)
    }

    /// A streamed call: the body goes to the variant's backend as it arrives and the
    /// answer comes back as it is sent, trailers included. Nothing is kept, so nothing
    /// is retried; the deadline bounds the wait for the answer's headers and reaches
    /// the backend as `grpc-timeout`.
    pub(super) async fn stream(
        &self,
        r: &Routed<'_>,
        vi: usize,
        body: Body,
        deadline: Option<Instant>,
    ) -> Result<Response<Body>, ProxyError> {
        let route = r.route();
        let variant = &route.variants[vi];
        let protocol = r.wire.protocol(variant.upstream.protocol);
        let path = r
            .parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let mut out = upstream_request(r.parts, body, variant, protocol, path, r.conn)?;
        let spans = ClientSpans::new(
            self.tracer.as_ref(),
            r.trace.as_ref(),
            &r.parts.method,
            &variant.upstream.authority,
        );
        let try_end = match (&spans, &r.trace) {
            (Some(s), _) => Some(s.begin(0, out.headers_mut())),
            (None, Some(t)) => {
                out.headers_mut()
                    .insert(TRACEPARENT.clone(), t.context.traceparent());
                None
            }
            (None, None) => None,
        };
        if let Some(d) = deadline {
            retry::set_deadline_header(&mut out, d.saturating_duration_since(Instant::now()));
        }
        let sent = self
            .upstreams
            .send_streaming(protocol, variant.tls.as_ref(), out);
        let sent = match deadline {
            Some(d) => tokio::time::timeout_at(d, sent)
                .await
                .map_err(|_| ProxyError::DeadlinePassed)?,
            None => sent.await,
        };
        if let Some(h) = &r.live.variants[vi].health {
            h.record(sent.is_ok(), Instant::now());
        }
        if let Some(end) = try_end {
            end.sent(&sent);
        }
        let resp = sent.map_err(|e| ProxyError::from_send(&variant.upstream.authority, e))?;
        let (mut head, body) = resp.into_parts();
        strip_hop_by_hop(&mut head.headers);
        Ok(Response::from_parts(head, body.map_err(Into::into).boxed()))
    }
}

/// A backend's answer with its body boxed, as the retry loop gives it.
#[inline]
fn boxed(resp: Reply) -> Answer {
    resp.map(|b| b.map_err(Into::into).boxed())
}

/// What a try's outcome means for the request: the answer (hop-by-hop headers taken
/// out), and whether sending it elsewhere is safe (a 503 refused the work; a stream
/// that failed before its first token was seen by nobody).
#[inline]
fn served(result: Result<Answer, SendError>, may_repeat: bool, backend: &Authority) -> Served {
    match result {
        Ok(mut resp) => {
            let before_first_token = resp.extensions().get::<Uncommitted>().is_some();
            let repeatable = resp.status() == http::StatusCode::SERVICE_UNAVAILABLE
                || may_repeat
                || before_first_token;
            // In place: the head is not moved again.
            strip_hop_by_hop(resp.headers_mut());
            Served {
                result: Ok(resp),
                repeatable,
                before_first_token,
            }
        }
        Err(e) => Served {
            repeatable: may_repeat || e.never_reached(),
            result: Err(ProxyError::from_send(backend, e)),
            before_first_token: false,
        },
    }
}

/// The request built for the backend (retries, renames, other protocols): the body
/// as it goes (`renamed`, with a v2 body's new JSON header length, or as it came), the
/// time `left` told to the backend, and braid's trace context unless each try has its
/// own span.
fn built_request(
    cx: &Cx<'_>,
    vi: usize,
    (renamed, protocol, path, left): Built<'_>,
    spans_per_try: bool,
) -> Result<Request<Full<Bytes>>, ProxyError> {
    let r = &cx.r;
    let variant = &r.route().variants[vi];
    let body = renamed.map_or(&cx.prepared.body, |(b, _)| b);
    let full = Full::new(body.clone());
    let mut out = upstream_request(r.parts, full, variant, protocol, path, r.conn)?;
    if let Some((body, header_len)) = renamed {
        let headers = out.headers_mut();
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        if let Some(n) = header_len {
            headers.insert(HEADER_LENGTH, HeaderValue::from(*n));
        }
    }
    if let Some(left) = left {
        retry::set_deadline_header(&mut out, left);
    }
    if let Some(t) = &r.trace
        && !spans_per_try
    {
        out.headers_mut()
            .insert(TRACEPARENT.clone(), t.context.traceparent());
    }
    Ok(out)
}

/// A built request's body (renamed, or `None`: as it came), protocol, path and time left.
type Built<'a> = (
    Option<&'a (Bytes, Option<usize>)>,
    Protocol,
    PathAndQuery,
    Option<Duration>,
);

/// The headers braid sets on a head written straight from the client's to the
/// variant's HTTP/1.1 pool (`x-forwarded-for`, the deadline, the trace context), and
/// the try's span, told how it ended.
struct DirectHead {
    xff: Option<HeaderValue>,
    timeout: Option<HeaderValue>,
    traceparent: Option<[u8; 55]>,
    try_end: Option<retry::TryEnd>,
}

impl DirectHead {
    #[inline]
    fn new(r: &Routed<'_>, left: Option<Duration>, spans: Option<&ClientSpans>) -> DirectHead {
        let (context, try_end) = match spans.map(|s| s.start(0)) {
            Some((c, end)) => (Some(c), Some(end)),
            None => (r.trace.as_ref().map(|t| t.context), None),
        };
        DirectHead {
            xff: forwarded_for(&r.parts.headers, r.conn),
            timeout: left.map(retry::deadline_value),
            traceparent: context.map(|c| c.traceparent_bytes()),
            try_end,
        }
    }

    /// The headers that replace the client's of the same names.
    #[inline]
    fn replaced(&self) -> [Option<(&HeaderName, &[u8])>; 3] {
        [
            self.xff.as_ref().map(|v| (&X_FORWARDED_FOR, v.as_bytes())),
            self.timeout
                .as_ref()
                .map(|v| (&retry::DEADLINE_HEADER, v.as_bytes())),
            self.traceparent.as_ref().map(|v| (&TRACEPARENT, &v[..])),
        ]
    }

    #[inline]
    fn end<B>(self, sent: &Result<Response<B>, SendError>) {
        if let Some(end) = self.try_end {
            end.sent(sent);
        }
    }
}

/// How a forwarded request leaves: written straight from the client's parts by the
/// variant's HTTP/1.1 pool, or built as a request (retries, renames, other protocols).
// Held for one call; boxing the built request would allocate on every forward.
#[allow(clippy::large_enum_variant)]
enum Outgoing<'a> {
    Direct(&'a Arc<crate::upstream::h1::Backend>),
    Built(Request<Full<Bytes>>),
}

/// The path at the backend: the model name rewritten to the variant's target.
pub(super) fn upstream_path(
    m: &Match<'_>,
    variant: &Variant,
    uri: &Uri,
) -> Result<PathAndQuery, ProxyError> {
    let (Some(span), Some(target)) = (&m.model_span, &variant.target_model) else {
        // Nothing to rewrite: the client's own (already parsed) path and query.
        return Ok(uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")));
    };
    rewrite(uri, span, target)
}

/// `rewritten`, remembered (see `Rewrite`).
fn rewrite(
    uri: &Uri,
    span: &std::ops::Range<usize>,
    target: &Arc<str>,
) -> Result<PathAndQuery, ProxyError> {
    let Some(from) = uri.path_and_query() else {
        return rewritten(uri, span, target);
    };
    let hit = REWRITES.with_borrow(|known| {
        known
            .iter()
            .find(|r| r.span == *span && *r.target == **target && *r.from == *from.as_str())
            .map(|r| r.to.clone())
    });
    if let Some(to) = hit {
        return Ok(to);
    }
    let to = rewritten(uri, span, target)?;
    REWRITES.with_borrow_mut(|known| {
        known.truncate(REMEMBERED - 1);
        known.push_front(Rewrite {
            from: from.as_str().into(),
            span: span.clone(),
            target: target.clone(),
            to: to.clone(),
        });
    });
    Ok(to)
}

fn rewritten(
    uri: &Uri,
    span: &std::ops::Range<usize>,
    target: &str,
) -> Result<PathAndQuery, ProxyError> {
    let path = route::rewrite_model(uri.path(), span, target);
    let path = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    PathAndQuery::try_from(path).map_err(|e| ProxyError::BadRequest(format!("path: {e}")))
}

/// A rewrite done before: the client's path and query, the model's span in it and the
/// target name always give the same path, and a sidecar's clients ask for the same few
/// (one per variant, mostly). Comparing the three costs less than building and
/// validating the path again (about 600 instructions a request). The client's path is
/// copied, so no request's buffer is held.
struct Rewrite {
    from: Box<str>,
    span: std::ops::Range<usize>,
    target: Arc<str>,
    to: PathAndQuery,
}

/// Rewrites remembered per thread, newest first; the oldest goes to make room.
const REMEMBERED: usize = 4;

thread_local! {
    static REWRITES: std::cell::RefCell<std::collections::VecDeque<Rewrite>> =
        const { std::cell::RefCell::new(std::collections::VecDeque::new()) };
}

/// The request as the variant's backend gets it, over `protocol`. Over HTTP/1.1 the
/// URI is in origin form, for the variant's bound pool (`VariantLive::backend`).
pub(super) fn upstream_request<T>(
    parts: &http::request::Parts,
    body: T,
    variant: &Variant,
    protocol: Protocol,
    path_and_query: PathAndQuery,
    conn: &ConnInfo,
) -> Result<Request<T>, ProxyError> {
    let uri = if protocol == Protocol::Http1 {
        // Origin form: the variant's bound pool knows the backend and sets Host.
        Uri::from(path_and_query)
    } else {
        Uri::builder()
            .scheme(variant.upstream.scheme.clone())
            .authority(variant.upstream.authority.clone())
            .path_and_query(path_and_query)
            .build()
            .map_err(|e| ProxyError::BadRequest(format!("uri: {e}")))?
    };
    let mut out = Request::new(body);
    *out.method_mut() = parts.method.clone();
    *out.uri_mut() = uri;
    *out.version_mut() = match protocol {
        // Over TLS, ALPN decides; the client speaks h2 on an h2 connection.
        Protocol::Http1 | Protocol::Tls => Version::HTTP_11,
        Protocol::H2c => Version::HTTP_2,
    };
    let mut headers = parts.headers.clone();
    strip_hop_by_hop(&mut headers);
    // The client sets Host from the backend's authority.
    headers.remove(header::HOST);
    if crate::grpc::is_grpc(&headers) {
        // Hop-by-hop, but gRPC needs it on every hop: servers refuse calls without it.
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    append_forwarded_for(&mut headers, conn);
    *out.headers_mut() = headers;
    Ok(out)
}

/// Connection-scoped headers (RFC 9110 §7.6.1), never forwarded in either direction.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "proxy-authorization"
            | "keep-alive"
            | "proxy-connection"
    )
}

/// Whether any header must be taken out before forwarding.
fn has_hop_by_hop(headers: &HeaderMap) -> bool {
    headers.keys().any(is_hop_by_hop)
}

/// Removes the hop-by-hop headers and any the `Connection` header names.
pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none, or only `Connection: keep-alive` (nginx answers with
    // it): one pass over the names, and no list built for those.
    let (mut found, mut only_connection) = (false, true);
    for name in headers.keys() {
        if is_hop_by_hop(name) {
            found = true;
            only_connection &= name == header::CONNECTION;
        }
    }
    if !found {
        return;
    }
    let names_nothing_else = || {
        headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .all(|t| {
                let t = t.trim_ascii();
                t.eq_ignore_ascii_case(b"keep-alive") || t.eq_ignore_ascii_case(b"close")
            })
    };
    if only_connection && names_nothing_else() {
        headers.remove(header::CONNECTION);
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    let hop: Vec<HeaderName> = headers
        .keys()
        .filter(|n| is_hop_by_hop(n))
        .cloned()
        .collect();
    for name in named.iter().chain(&hop) {
        headers.remove(name);
    }
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// `x-forwarded-for` as the backend gets it: the client's address appended to any
/// the request carried.
fn forwarded_for(headers: &HeaderMap, conn: &ConnInfo) -> Option<HeaderValue> {
    match crate::headers::get(headers, &X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) => HeaderValue::try_from(format!("{prev}, {}", conn.peer.ip())).ok(),
        None => Some(conn.peer_ip.clone()),
    }
}

fn append_forwarded_for(headers: &mut HeaderMap, conn: &ConnInfo) {
    if let Some(v) = forwarded_for(headers, conn) {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                )
            })
            .collect()
    }

    fn names(h: &HeaderMap) -> Vec<&str> {
        let mut n: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        n.sort();
        n
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_stripped() {
        let mut h = headers(&[("content-type", "a"), ("connection", "Keep-Alive")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(names(&h), ["content-type"]);

        let mut h = headers(&[
            ("connection", "keep-alive, X-Secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("proxy-authorization", "Basic x"),
            ("proxy-connection", "keep-alive"),
            ("trailer", "x-sum"),
            ("x-kept", "yes"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(names(&h), ["x-kept"]);

        let mut h = headers(&[("x-kept", "yes")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(names(&h), ["x-kept"]);
    }

    #[test]
    fn rewrites_are_remembered_by_path_span_and_target() {
        let table = [
            (
                "/v2/models/demo/infer",
                11..15,
                "demo-a",
                "/v2/models/demo-a/infer",
            ),
            (
                "/v2/models/demo/infer",
                11..15,
                "demo-b",
                "/v2/models/demo-b/infer",
            ),
            (
                "/v2/models/demo/infer?x=1",
                11..15,
                "demo-a",
                "/v2/models/demo-a/infer?x=1",
            ),
            (
                "/v2/models/demo/ready",
                11..15,
                "demo-a",
                "/v2/models/demo-a/ready",
            ),
            (
                "/v1/models/demo:predict",
                11..15,
                "m",
                "/v1/models/m:predict",
            ),
            (
                "/v2/models/dem/infer",
                11..14,
                "demo-a",
                "/v2/models/demo-a/infer",
            ),
        ];
        let cases: Vec<(Uri, std::ops::Range<usize>, Arc<str>, &str)> = table
            .into_iter()
            .map(|(uri, span, target, want)| (uri.parse().unwrap(), span, target.into(), want))
            .collect();
        // More distinct rewrites than are remembered, in turn and again: each is right
        // whether it is new, remembered, or was replaced.
        for _ in 0..3 {
            for (uri, span, target, want) in &cases {
                let got = rewrite(uri, span, target).unwrap();
                assert_eq!(got.as_str(), *want, "{uri} {span:?} {target}");
            }
        }
        let uri: Uri = "/v2/models/demo/infer".parse().unwrap();
        let target: Arc<str> = "demo-a".into();
        assert_eq!(
            rewrite(&uri, &(10..15), &target).unwrap().as_str(),
            "/v2/modelsdemo-a/infer"
        );
    }
}
