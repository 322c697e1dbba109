//! Listeners: HTTP/1.1 and HTTP/2 (h2c prior knowledge, or ALPN over TLS) on one port
//! with every limit set explicitly, and the graceful drain shared by the data and admin
//! ports.
//!
//! Drain has two phases. `Draining`: new connections are still accepted (endpoints
//! take a while to notice a terminating pod), HTTP/1 responses carry
//! `Connection: close` and HTTP/2 connections get GOAWAY, so clients move off without
//! ever having a request reset. `Closing`: the listener stops accepting, every
//! connection finishes its in-flight requests and closes, and `serve` returns.

pub mod sniff;
pub mod tls;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, Version, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Body as _;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::error::{Body, BoxError, ProxyError};
use sniff::{ConnFlags, Sniffer};

/// Limits for one listener. Each one exists because hyper's default is either
/// unbounded or unsuitable for a proxy exposed to arbitrary clients.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Close a connection whose request head has not arrived in this time (slowloris).
    pub header_read_timeout: Duration,
    /// More header lines than this is answered 431.
    pub max_headers: usize,
    /// A request head larger than this is answered 431 (HTTP/1) or refused (HTTP/2).
    pub max_header_bytes: usize,
    /// A request body larger than this is answered 413 (enforced by the handler).
    pub max_body_bytes: usize,
    /// Concurrent HTTP/2 streams per connection.
    pub h2_max_concurrent_streams: u32,
    /// HTTP/2 streams reset by the client before we answered (rapid reset, CVE-2023-44487).
    pub h2_max_pending_accept_reset_streams: usize,
    /// HTTP/2 streams we reset because of client protocol errors, per connection.
    pub h2_max_local_error_reset_streams: usize,
    /// HTTP/2 keep-alive ping interval; a peer that stops answering is closed.
    pub h2_keep_alive_interval: Duration,
    /// Requests being answered at once by the proxy; more get 503 + Retry-After.
    pub max_inflight: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: Duration::from_secs(10),
            max_headers: 100,
            max_header_bytes: 64 * 1024,
            max_body_bytes: 16 * 1024 * 1024,
            h2_max_concurrent_streams: 256,
            h2_max_pending_accept_reset_streams: 20,
            h2_max_local_error_reset_streams: 256,
            h2_keep_alive_interval: Duration::from_secs(30),
            max_inflight: 4096,
        }
    }
}

/// Where a listener is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Serving,
    Draining,
    Closing,
}

/// Per-connection facts a handler may need.
#[derive(Debug)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The peer's address as a header value, made once per connection.
    pub peer_ip: HeaderValue,
    pub flags: Arc<ConnFlags>,
}

impl ConnInfo {
    pub fn new(peer: SocketAddr, flags: Arc<ConnFlags>) -> ConnInfo {
        let peer_ip = HeaderValue::try_from(peer.ip().to_string())
            .expect("an IP address is a valid header value");
        ConnInfo {
            peer,
            peer_ip,
            flags,
        }
    }
}

/// A request handler: the proxy, or the admin endpoints.
pub trait Handler: Send + Sync + 'static {
    fn call(
        &self,
        req: Request<Incoming>,
        conn: &ConnInfo,
    ) -> impl Future<Output = Response<Body>> + Send;
}

fn builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_headers(limits.max_headers)
        // hyper's floor for its read buffer is 8 KiB.
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        .max_pending_accept_reset_streams(limits.h2_max_pending_accept_reset_streams)
        .max_local_error_reset_streams(limits.h2_max_local_error_reset_streams)
        .max_header_list_size(limits.max_header_bytes as u32)
        .keep_alive_interval(limits.h2_keep_alive_interval)
        .keep_alive_timeout(Duration::from_secs(20));
    b
}

/// Accepts connections until the phase reaches `Closing`, then waits for every
/// connection to finish. Connections hold a clone of `phase`, so the caller can
/// also wait on `Sender::closed()`.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    limits: Limits,
    handler: Arc<H>,
    phase: watch::Receiver<Phase>,
) {
    serve_tls(listener, limits, None, handler, phase).await
}

/// `serve`, with TLS when `tls` is given: the handshake must finish within the header
/// read timeout, and a client that speaks plaintext or stops mid-handshake is closed.
pub async fn serve_tls<H: Handler>(
    listener: TcpListener,
    limits: Limits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    handler: Arc<H>,
    mut phase: watch::Receiver<Phase>,
) {
    let builder = builder(&limits);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = phase.wait_for(|p| *p == Phase::Closing) => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let flags = Arc::new(ConnFlags::default());
        let conn_info = Arc::new(ConnInfo::new(peer, flags.clone()));
        let (builder, handler, phase) = (builder.clone(), handler.clone(), phase.clone());
        match tls.clone() {
            None => {
                let io = TokioIo::new(Sniffer::new(stream, flags));
                tokio::spawn(connection(builder, io, handler, conn_info, phase));
            }
            Some(acceptor) => {
                let handshake_timeout = limits.header_read_timeout;
                tokio::spawn(async move {
                    let stream = match tokio::time::timeout(
                        handshake_timeout,
                        acceptor.accept(stream),
                    )
                    .await
                    {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, "TLS handshake failed: {e}");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    };
                    let io = TokioIo::new(Sniffer::new(stream, flags));
                    connection(builder, io, handler, conn_info, phase).await;
                });
            }
        }
    }
    drop(listener);
}

/// A panic while answering one request is that request's 500 with a JSON body, not a
/// connection reset with no answer: logged, and the server keeps serving. (Allocation
/// failures abort and cannot be caught: decoders size nothing from a request's claims.)
async fn answer_even_if_it_panics(call: impl Future<Output = Response<Body>>) -> Response<Body> {
    use futures_util::FutureExt;
    match std::panic::AssertUnwindSafe(call).catch_unwind().await {
        Ok(resp) => resp,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!(panic = %what, "a request handler panicked; answered 500");
            crate::error::json_error(
                http::StatusCode::INTERNAL_SERVER_ERROR,
                "internal error while answering this request (logged); the server is still up",
            )
        }
    }
}

async fn connection<H, S>(
    builder: auto::Builder<TokioExecutor>,
    io: TokioIo<Sniffer<S>>,
    handler: Arc<H>,
    info: Arc<ConnInfo>,
    mut phase: watch::Receiver<Phase>,
) where
    H: Handler,
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc_phase = phase.clone();
    let svc_info = info.clone();
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let handler = handler.clone();
        let info = svc_info.clone();
        let phase = svc_phase.clone();
        async move {
            let h1 = req.version() < Version::HTTP_2;
            let mut resp = if info.flags.smuggling.load(Ordering::Relaxed) {
                ProxyError::Smuggling.into_response()
            } else {
                answer_even_if_it_panics(handler.call(req, &info)).await
            };
            // Judged after the handler: a drain may have begun while it ran.
            if h1 && *phase.borrow() != Phase::Serving {
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Ok::<_, Infallible>(resp)
        }
    });
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let mut shutting_down = false;
    loop {
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(peer = %info.peer, "connection ended: {e}");
                }
                return;
            }
            changed = phase.changed(), if !shutting_down => {
                let p = if changed.is_ok() { *phase.borrow() } else { Phase::Closing };
                let h2 = info.flags.h2.load(Ordering::Relaxed);
                if p == Phase::Closing || (p == Phase::Draining && h2) {
                    conn.as_mut().graceful_shutdown();
                    shutting_down = true;
                }
            }
        }
    }
}

/// Reads the whole body under the limit: a declared length over it is refused before
/// a byte is read, and a body that grows past it is cut off.
pub async fn read_body<B>(headers: &HeaderMap, body: B, limit: usize) -> Result<Bytes, ProxyError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<crate::error::BoxError>,
{
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ProxyError::BodyTooLarge { limit });
    }
    let too_large = |e: &BoxError| e.is::<http_body_util::LengthLimitError>();
    let refused = |e: BoxError| {
        if too_large(&e) {
            ProxyError::BodyTooLarge { limit }
        } else {
            ProxyError::BadRequest(format!("reading request body: {e}"))
        }
    };
    let mut body = std::pin::pin!(Limited::new(body, limit));
    // Most bodies arrive in one frame: taken as it is, with no copy.
    let first = match body.frame().await {
        None => return Ok(Bytes::new()),
        Some(frame) => frame.map_err(refused)?.into_data().unwrap_or_default(),
    };
    if body.is_end_stream() {
        return Ok(first);
    }
    let rest = body.collect().await.map_err(refused)?.to_bytes();
    if first.is_empty() {
        return Ok(rest);
    }
    let mut all = bytes::BytesMut::with_capacity(first.len() + rest.len());
    all.extend_from_slice(&first);
    all.extend_from_slice(&rest);
    Ok(all.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct PanicsOnSomePaths;

    impl Handler for PanicsOnSomePaths {
        async fn call(&self, req: Request<Incoming>, _: &ConnInfo) -> Response<Body> {
            assert!(req.uri().path() != "/panic", "a bug in a handler");
            crate::error::json_response(http::StatusCode::OK, "{}")
        }
    }

    async fn exchange(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn a_panicking_handler_answers_500_and_the_server_keeps_serving() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (phase, rx) = watch::channel(Phase::Serving);
        let server = tokio::spawn(serve(
            listener,
            Limits::default(),
            Arc::new(PanicsOnSomePaths),
            rx,
        ));
        let reply = exchange(addr, "/panic").await;
        assert!(reply.starts_with("HTTP/1.1 500"), "{reply}");
        assert!(reply.contains(r#"{"error":"internal error"#), "{reply}");
        let reply = exchange(addr, "/fine").await;
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        phase.send(Phase::Closing).unwrap();
        server.await.unwrap();
    }
}
