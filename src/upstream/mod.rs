//! Pooled keep-alive clients to backends: braid's own HTTP/1.1 pool (`h1`, one
//! `Backend` per authority, bound to variants when a snapshot is installed), and
//! hyper-util's for HTTP/2 with prior knowledge (`h2c://`) and TLS. Connections are
//! reused across requests and across config reloads, since pools are kept by
//! authority, not by snapshot.

pub mod h1;
pub mod health;
pub mod retry;
pub mod tls;
pub mod wire;

use crate::sync::lock;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{Either, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use http::uri::Authority;

use hyper_rustls::{FixedServerNameResolver, HttpsConnector, HttpsConnectorBuilder};
use rustls_pki_types::ServerName;
use sha2::{Digest, Sha256};

use crate::addr::Protocol;
pub use crate::error::SendError;
use tls::UpstreamTls;

/// Default connect timeout for backends (a route timeout, when set, bounds it too).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// What braid sends: a whole body (every request it may repeat), or a stream passed
/// through as it arrives (gRPC streaming calls).
pub(crate) type OutBody = Either<Full<Bytes>, crate::error::Body>;

/// What a backend answers: its head, and a body that returns a pooled connection
/// once read to its end.
pub type Reply = Response<h1::Reply>;

type Pool = Client<HttpConnector, OutBody>;

/// A pool of TLS connections for `https://` backends sharing one TLS setup. Pools are
/// cached by the content of their files, so a reload that changes nothing keeps its
/// connections.
#[derive(Clone, Debug)]
pub struct TlsPool(Client<HttpsConnector<HttpConnector>, OutBody>);

impl TlsPool {
    pub fn new(t: &UpstreamTls) -> Result<TlsPool, String> {
        let mut key = Sha256::new();
        for f in [Some(&t.ca_file), t.cert_file.as_ref(), t.key_file.as_ref()]
            .into_iter()
            .flatten()
        {
            key.update(std::fs::read(f).map_err(|e| format!("{}: {e}", f.display()))?);
            key.update([0]);
        }
        key.update(t.server_name.as_deref().unwrap_or_default());
        let key: [u8; 32] = key.finalize().into();
        static CACHE: OnceLock<Mutex<HashMap<[u8; 32], TlsPool>>> = OnceLock::new();
        let mut cache = lock(CACHE.get_or_init(Default::default));
        if let Some(p) = cache.get(&key) {
            return Ok(p.clone());
        }
        let cfg = tls::client_config(t)?;
        let builder = HttpsConnectorBuilder::new()
            .with_tls_config(cfg)
            .https_only();
        let builder = match &t.server_name {
            Some(name) => {
                let name = ServerName::try_from(name.clone())
                    .map_err(|e| format!("server_name {name:?}: {e}"))?;
                builder.with_server_name_resolver(FixedServerNameResolver::new(name))
            }
            None => builder,
        };
        let mut http = connector(CONNECT_TIMEOUT);
        http.enforce_http(false);
        let pool = TlsPool(
            Client::builder(TokioExecutor::new())
                .pool_timer(TokioTimer::new())
                .timer(TokioTimer::new())
                .pool_idle_timeout(Duration::from_secs(60))
                .build(builder.enable_all_versions().wrap_connector(http)),
        );
        cache.insert(key, pool.clone());
        Ok(pool)
    }
}

fn connector(connect_timeout: Duration) -> HttpConnector {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(connect_timeout));
    connector.set_keepalive(Some(Duration::from_secs(60)));
    connector
}

#[derive(Clone, Debug)]
pub struct Upstreams {
    h1: Arc<H1Backends>,
    h2: Pool,
}

/// Every HTTP/1.1 backend by authority, for binding and for callers that name a
/// backend by URI (probes, shadows, batches).
#[derive(Debug)]
struct H1Backends {
    connect_timeout: Duration,
    by_authority: Mutex<HashMap<Authority, Arc<h1::Backend>>>,
}

impl Upstreams {
    pub fn new(connect_timeout: Duration) -> Self {
        let connector = connector(connect_timeout);
        let h1 = Arc::new(H1Backends {
            connect_timeout,
            by_authority: Mutex::default(),
        });
        let h2 = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .http2_only(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .build(connector);
        Upstreams { h1, h2 }
    }

    /// The HTTP/1.1 pool for `authority`, made on first use and kept while anything
    /// holds it: bound to variants when a snapshot is installed.
    pub fn backend(&self, authority: &Authority) -> Arc<h1::Backend> {
        let mut map = lock(&self.h1.by_authority);
        map.entry(authority.clone())
            .or_insert_with(|| {
                Arc::new(h1::Backend::new(authority.clone(), self.h1.connect_timeout))
            })
            .clone()
    }

    /// A POST over HTTP/1.1 that says whether it was accepted (2xx), reading the answer
    /// to its end so the connection is kept: how span exports leave.
    #[allow(clippy::type_complexity)]
    pub fn poster(
        &self,
    ) -> Arc<
        dyn Fn(
                Request<Full<Bytes>>,
            ) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>
            + Send
            + Sync,
    > {
        let up = self.clone();
        Arc::new(move |req| {
            let up = up.clone();
            Box::pin(async move {
                match up.send(Protocol::Http1, None, req).await {
                    Ok(resp) => {
                        let ok = resp.status().is_success();
                        http_body_util::BodyExt::collect(resp.into_body())
                            .await
                            .is_ok()
                            && ok
                    }
                    Err(_) => false,
                }
            })
        })
    }

    /// Lets go of the HTTP/1.1 pools nothing holds any more (after a reload that
    /// dropped their variants): their idle connections close.
    pub fn release_unbound(&self) {
        lock(&self.h1.by_authority).retain(|_, b| Arc::strong_count(b) > 1);
    }

    /// The one way braid sends to a backend (forwarding, retries, shadow copies,
    /// batches, readiness probes): the pool for `protocol`; `https://` backends need
    /// their `tls` pool. The error says whether the request may have reached it.
    pub async fn send(
        &self,
        protocol: Protocol,
        tls: Option<&TlsPool>,
        req: Request<Full<Bytes>>,
    ) -> Result<Reply, SendError> {
        self.dispatch(None, protocol, tls, req.map(Either::Left))
            .await
    }

    /// `send` through a backend bound in advance (`backend`), for HTTP/1.1: no lookup.
    pub async fn send_to(
        &self,
        backend: Option<&Arc<h1::Backend>>,
        protocol: Protocol,
        tls: Option<&TlsPool>,
        req: Request<Full<Bytes>>,
    ) -> Result<Reply, SendError> {
        self.dispatch(backend, protocol, tls, req.map(Either::Left))
            .await
    }

    /// `send` for a body streamed as it arrives: nothing of it is kept, so the caller
    /// cannot repeat it.
    pub async fn send_streaming(
        &self,
        protocol: Protocol,
        tls: Option<&TlsPool>,
        req: Request<crate::error::Body>,
    ) -> Result<Reply, SendError> {
        self.dispatch(None, protocol, tls, req.map(Either::Right))
            .await
    }

    async fn dispatch(
        &self,
        backend: Option<&Arc<h1::Backend>>,
        protocol: Protocol,
        tls: Option<&TlsPool>,
        req: Request<OutBody>,
    ) -> Result<Reply, SendError> {
        let sent = match (protocol, tls) {
            (Protocol::Http1, _) => {
                return match backend {
                    Some(b) => b.send(req).await,
                    None => {
                        let Some(authority) = req.uri().authority() else {
                            return Err(SendError::Connect("a request without a backend".into()));
                        };
                        self.backend(authority).send(req).await
                    }
                };
            }
            (Protocol::H2c, _) => self.h2.request(req).await,
            (Protocol::Tls, Some(pool)) => pool.0.request(req).await,
            (Protocol::Tls, None) => {
                return Err(SendError::Connect(
                    "https backend without TLS settings".into(),
                ));
            }
        };
        sent.map(|r| r.map(h1::Reply::unpooled)).map_err(|e| {
            let reason = error_chain(&e);
            // A TLS failure (with TLS 1.3 a refused client certificate is only known
            // after the client's first write) means no request reached the application.
            if e.is_connect() || tls_failure(&e) {
                SendError::Connect(reason)
            } else if refused_stream(&e) {
                SendError::Refused(reason)
            } else {
                SendError::Other(reason)
            }
        })
    }
}

/// Whether an h2 REFUSED_STREAM is somewhere in the error's chain.
fn refused_stream(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(h2) = err.downcast_ref::<h2::Error>()
            && h2.reason() == Some(h2::Reason::REFUSED_STREAM)
        {
            return true;
        }
        cur = err.source();
    }
    false
}

/// Whether a rustls error is somewhere in the chain. `io::Error::source` skips the
/// error it wraps, so wrapped errors are looked at directly.
fn tls_failure(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        let io = err
            .downcast_ref::<std::io::Error>()
            .or_else(|| err.downcast_ref::<h2::Error>().and_then(h2::Error::get_io));
        let wrapped = io
            .and_then(|io| io.get_ref())
            .is_some_and(|inner| inner.is::<rustls::Error>());
        if wrapped || err.is::<rustls::Error>() {
            return true;
        }
        cur = err.source();
    }
    false
}

/// "a: b: c" from an error and its sources: hyper's top-level messages are vague.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}
