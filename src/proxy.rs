//! The request path, composed in one place:
//!
//! ```text
//! snapshot = store.load()         one Arc<Snapshot> for the whole request
//!   -> route match                model name (OIP v2 / KServe v1), then path prefix
//!   -> assign variant             override header > sticky key > weighted random
//!   -> read body (limit -> 413)
//!   -> forward                    model name rewritten, pooled client, route timeout
//!   -> x-braid-variant + metrics  recorded once, here at the edge
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{Request, Response, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use crate::batch::batching;
use crate::config::Store;
use crate::config::schema::Protocol;
use crate::error::{Body, ProxyError};
use crate::metrics::Metrics;
use crate::route::{self, Match, Variant, assign};
use crate::server::{self, ConnInfo, Handler};
use crate::upstream::{SendError, Upstreams};

pub static X_BRAID_VARIANT: HeaderName = HeaderName::from_static("x-braid-variant");

pub struct Proxy {
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
    pub upstreams: Upstreams,
    pub max_body_bytes: usize,
    /// One batcher per (route, variant), kept across reloads so queued requests survive.
    pub batchers: batching::Batchers,
}

impl Handler for Proxy {
    async fn call(&self, req: Request<Incoming>, conn: &ConnInfo) -> Response<Body> {
        let start = Instant::now();
        self.metrics.inflight().inc();
        let resp = self.route(req, conn, start).await;
        self.metrics.inflight().dec();
        resp
    }
}

impl Proxy {
    async fn route(
        &self,
        req: Request<Incoming>,
        conn: &ConnInfo,
        start: Instant,
    ) -> Response<Body> {
        // One snapshot for the whole request: a reload cannot change it midway.
        let Some(snap) = self.store.load() else {
            return self.unrouted(ProxyError::NoConfig);
        };
        let Some(m) = snap.routes.find(req.uri().path()) else {
            return self.unrouted(ProxyError::NoRoute {
                path: req.uri().path().to_string(),
            });
        };
        let route = m.route;
        let (vi, _how) = match assign::assign(route, req.headers()) {
            Ok(a) => a,
            Err(assign::UnknownVariant(wanted)) => {
                return self.unrouted(ProxyError::UnknownVariant {
                    header: route.override_header.to_string(),
                    wanted,
                    valid: route.variant_names(),
                });
            }
        };
        let variant = &route.variants[vi];
        let mut resp = match self.forward(req, &m, variant, conn).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(route = %route.name, variant = %variant.name, "{e}");
                e.into_response()
            }
        };
        resp.headers_mut()
            .insert(X_BRAID_VARIANT.clone(), variant.header_value.clone());
        self.metrics.request(
            &route.name,
            &variant.name,
            resp.status().as_u16(),
            start.elapsed(),
        );
        resp
    }

    fn unrouted(&self, e: ProxyError) -> Response<Body> {
        self.metrics.unrouted(e.label());
        e.into_response()
    }

    async fn forward(
        &self,
        req: Request<Incoming>,
        m: &Match<'_>,
        variant: &Variant,
        conn: &ConnInfo,
    ) -> Result<Response<Body>, ProxyError> {
        let (parts, body) = req.into_parts();
        let body = server::read_body(&parts.headers, body, self.max_body_bytes).await?;

        let path = match (&m.model_span, &variant.target_model) {
            (Some(span), Some(target)) => route::rewrite_model(parts.uri.path(), span, target),
            _ => parts.uri.path().to_string(),
        };
        let path_and_query = match parts.uri.query() {
            Some(q) => format!("{path}?{q}"),
            None => path,
        };

        // Coalesce inference requests for a local variant, when the route asks for it.
        if let (true, Some(limits)) = (variant.local, m.route.batching)
            && parts.method == http::Method::POST
        {
            match batching::queueable(&parts.uri, &parts.headers, &body) {
                Ok(Some(item)) => {
                    return batching::submit(
                        self,
                        m.route,
                        variant,
                        limits,
                        item,
                        path_and_query,
                        &parts.headers,
                    )
                    .await;
                }
                Ok(None) => {} // not mergeable: forwarded alone below
                Err(msg) => return Err(ProxyError::BadRequest(msg)),
            }
        }
        let uri = Uri::builder()
            .scheme(variant.upstream.scheme.clone())
            .authority(variant.upstream.authority.clone())
            .path_and_query(
                PathAndQuery::try_from(path_and_query)
                    .map_err(|e| ProxyError::BadRequest(format!("path: {e}")))?,
            )
            .build()
            .map_err(|e| ProxyError::BadRequest(format!("uri: {e}")))?;

        let mut out = Request::new(Full::new(body));
        *out.method_mut() = parts.method;
        *out.uri_mut() = uri;
        *out.version_mut() = match variant.upstream.protocol {
            Protocol::Http1 => Version::HTTP_11,
            Protocol::H2c => Version::HTTP_2,
        };
        let mut headers = parts.headers;
        strip_hop_by_hop(&mut headers);
        // The client sets Host from the backend's authority.
        headers.remove(header::HOST);
        append_forwarded_for(&mut headers, conn);
        *out.headers_mut() = headers;

        let backend = &variant.upstream.authority;
        let send = self.upstreams.send(variant.upstream.protocol, out);
        let result = match m.route.timeout {
            Some(after) => {
                tokio::time::timeout(after, send)
                    .await
                    .map_err(|_| ProxyError::Timeout {
                        backend: backend.to_string(),
                        after,
                    })?
            }
            None => send.await,
        };
        let resp = result.map_err(|e| match e {
            SendError::Connect(reason) => ProxyError::Connect {
                backend: backend.to_string(),
                reason,
            },
            SendError::Other(reason) => ProxyError::Upstream {
                backend: backend.to_string(),
                reason,
            },
        })?;
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(
            parts,
            body.map_err(Into::into).boxed(),
        ))
    }
}

/// Connection-scoped headers must not be forwarded (RFC 9110 §7.6.1).
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

fn append_forwarded_for(headers: &mut HeaderMap, conn: &ConnInfo) {
    let ip = conn.peer.ip().to_string();
    let value = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {ip}"),
        None => ip,
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert("x-forwarded-for", v);
    }
}

/// Default connect timeout for backends (a route timeout, when set, bounds it too).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
