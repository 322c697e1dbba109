//! Listeners: HTTP/1.1 and HTTP/2 (h2c prior knowledge, or ALPN over TLS) on one port
//! with every limit set explicitly, and the graceful drain shared by the data and admin
//! ports.
//!
//! Drain has two phases. `Draining`: new connections are still accepted (endpoints
//! take a while to notice a terminating pod), HTTP/1 responses carry
//! `Connection: close` and HTTP/2 connections get GOAWAY, so clients move off without
//! ever having a request reset. `Closing`: the listener stops accepting, every
//! connection finishes its in-flight requests and closes, and `serve` returns.

mod body;
pub mod budget;
pub mod h1;
pub mod sniff;
pub mod tls;

pub use body::{BodyRules, RequestBody, read_body};
pub use budget::{ByteBudget, Reservation};

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use http::{HeaderValue, Request, Response, Version, header};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::error::{Body, ProxyError};
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
    /// A request body that sends nothing for this long is answered 408 (nginx's
    /// `client_body_timeout`).
    pub body_idle_timeout: Duration,
    /// An HTTP/2 connection with no request in flight for this long is sent GOAWAY
    /// and closed (HTTP/1.1 idles under `header_read_timeout`).
    pub idle_timeout: Duration,
    /// Connections served at once; beyond it new ones wait in the kernel's backlog.
    pub max_connections: usize,
    /// Request bytes buffered at once across all requests; beyond it 503 + Retry-After.
    pub max_buffered_bytes: usize,
    /// Kept at the number of open connections (`braid_connections` on the data port).
    pub open_connections: prometheus_client::metrics::gauge::Gauge,
    /// Who serves plain HTTP/1.1: braid's own loop (`h1`), or hyper (`--http1 hyper`).
    pub http1: Http1,
}

/// The server of plain HTTP/1.1 connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Http1 {
    /// braid's own connection loop (`server::h1`).
    #[default]
    Braid,
    /// hyper's, as before braid had its own: kept for comparison and as a way back.
    Hyper,
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
            body_idle_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            max_connections: 4096,
            max_buffered_bytes: 64 * 1024 * 1024,
            open_connections: Default::default(),
            http1: Http1::default(),
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
        req: Request<RequestBody>,
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
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let timers = Timers {
        first_request: limits.header_read_timeout,
        h2_idle: limits.idle_timeout,
    };
    let h1_limits = h1::H1Limits {
        head: h1::head::HeadLimits {
            max_headers: limits.max_headers,
            max_bytes: limits.max_header_bytes,
        },
        header_read_timeout: limits.header_read_timeout,
        max_body_bytes: limits.max_body_bytes as u64,
    };
    loop {
        // Beyond the cap, connections wait in the kernel's backlog: no task, no buffer.
        let permit = tokio::select! {
            s = slots.clone().acquire_owned() => s.expect("the semaphore is never closed"),
            _ = phase.wait_for(|p| *p == Phase::Closing) => break,
        };
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
        let slot = ConnSlot::new(permit, &limits.open_connections);
        let flags = Arc::new(ConnFlags::default());
        let conn_info = Arc::new(ConnInfo::new(peer, flags.clone()));
        let (builder, handler, phase) = (builder.clone(), handler.clone(), phase.clone());
        match tls.clone() {
            None if limits.http1 == Http1::Braid => {
                tokio::spawn(async move {
                    let ended = h1::serve(stream, &*handler, &conn_info, phase.clone(), h1_limits);
                    if let h1::Ended::Http2(stream, read) = ended.await {
                        let io = TokioIo::new(Sniffer::replaying(read, stream, flags));
                        connection(builder, io, handler, conn_info, phase, timers).await;
                    }
                    drop(slot);
                });
            }
            None => {
                let io = TokioIo::new(Sniffer::new(stream, flags));
                tokio::spawn(async move {
                    connection(builder, io, handler, conn_info, phase, timers).await;
                    drop(slot);
                });
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
                    connection(builder, io, handler, conn_info, phase, timers).await;
                    drop(slot);
                });
            }
        }
    }
    drop(listener);
}

/// A panic while answering one request is that request's 500 with a JSON body, not a
/// connection reset with no answer: logged, and the server keeps serving. (Allocation
/// failures abort and cannot be caught: decoders size nothing from a request's claims.)
/// The call is wrapped where it is awaited, `AssertUnwindSafe(call).catch_unwind()`,
/// rather than in an async fn of its own, so the handler's future is not moved into
/// another.
fn panicked(panic: Box<dyn std::any::Any + Send>) -> Response<Body> {
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

/// One accepted connection's place under `max_connections`, given back by `Drop`
/// however its task ends.
struct ConnSlot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    open: prometheus_client::metrics::gauge::Gauge,
}

impl ConnSlot {
    fn new(
        permit: tokio::sync::OwnedSemaphorePermit,
        open: &prometheus_client::metrics::gauge::Gauge,
    ) -> ConnSlot {
        open.inc();
        ConnSlot {
            _permit: permit,
            open: open.clone(),
        }
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// How long a connection may go without a request.
#[derive(Debug, Clone, Copy)]
struct Timers {
    /// Until its first complete request head, whatever the protocol (hyper-util's
    /// protocol detection has no timeout of its own).
    first_request: Duration,
    /// An HTTP/2 connection with nothing in flight.
    h2_idle: Duration,
}

/// Requests in flight on one connection, and since when it has had none; each request
/// holds an `Active` guard, so a dropped request future counts as finished.
struct Activity {
    opened: tokio::time::Instant,
    active: AtomicUsize,
    /// Nanoseconds after `opened` when the count last fell to 0.
    idle_since: AtomicU64,
    /// A request head has arrived.
    served: AtomicBool,
    /// Woken when the last request in flight ends, to arm the idle timer; only while
    /// the connection has one to arm (`wants_quiet`), so HTTP/1.1 keep-alive pays
    /// nothing per request.
    quiet: tokio::sync::Notify,
    wants_quiet: AtomicBool,
}

struct Active<'a>(&'a Activity);

impl Activity {
    fn begin(&self) -> Active<'_> {
        self.served.store(true, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::Relaxed);
        Active(self)
    }

    /// When the connection will have been idle too long, if it is idle now.
    fn idle_until(&self, timers: Timers, h2: bool) -> Option<tokio::time::Instant> {
        if self.active.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let since = self.opened + Duration::from_nanos(self.idle_since.load(Ordering::Relaxed));
        if !self.served.load(Ordering::Relaxed) {
            Some(since + timers.first_request)
        } else if h2 {
            Some(since + timers.h2_idle)
        } else {
            None // HTTP/1.1 keep-alive idles under hyper's header read timeout
        }
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        // Only a connection with an idle timer to arm needs the time and the wake-up.
        if self.0.active.fetch_sub(1, Ordering::Relaxed) == 1
            && self.0.wants_quiet.load(Ordering::Relaxed)
        {
            let at = self.0.opened.elapsed().as_nanos() as u64;
            self.0.idle_since.store(at, Ordering::Relaxed);
            self.0.quiet.notify_one();
        }
    }
}

async fn connection<H, S>(
    builder: auto::Builder<TokioExecutor>,
    io: TokioIo<Sniffer<S>>,
    handler: Arc<H>,
    info: Arc<ConnInfo>,
    mut phase: watch::Receiver<Phase>,
    timers: Timers,
) where
    H: Handler,
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity {
        opened: tokio::time::Instant::now(),
        active: AtomicUsize::new(0),
        idle_since: AtomicU64::new(0),
        served: AtomicBool::new(false),
        quiet: tokio::sync::Notify::new(),
        wants_quiet: AtomicBool::new(true),
    });
    let svc_phase = phase.clone();
    let svc_info = info.clone();
    let svc_activity = activity.clone();
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let req = req.map(RequestBody::Left);
        let handler = handler.clone();
        let info = svc_info.clone();
        let phase = svc_phase.clone();
        let activity = svc_activity.clone();
        async move {
            let _active = activity.begin();
            let h1 = req.version() < Version::HTTP_2;
            // What the sniffer saw in this request's head (HTTP/1 only).
            let refused = if info.flags.smuggling.load(Ordering::Relaxed) {
                Some(ProxyError::Smuggling.into_response())
            } else if info.flags.unsupported_coding.load(Ordering::Relaxed) {
                let te = req.headers().get(header::TRANSFER_ENCODING);
                let te = te.map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
                Some(ProxyError::UnsupportedCoding(te.unwrap_or_default()).into_response())
            } else {
                None
            };
            let mut resp = match refused {
                Some(resp) => resp,
                None => {
                    let call = std::panic::AssertUnwindSafe(handler.call(req, &info));
                    futures_util::FutureExt::catch_unwind(call)
                        .await
                        .unwrap_or_else(panicked)
                }
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
        let h2 = info.flags.h2.load(Ordering::Relaxed);
        // Re-armed on every wake-up; a request in flight leaves it unarmed, and the end
        // of a request wakes the loop through the connection future itself.
        let idle = activity.idle_until(timers, h2);
        let served = activity.served.load(Ordering::Relaxed);
        let wants_quiet = h2 || !served;
        activity.wants_quiet.store(wants_quiet, Ordering::Relaxed);
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(peer = %info.peer, "connection ended: {e}");
                }
                return;
            }
            changed = phase.changed(), if !shutting_down => {
                let p = if changed.is_ok() { *phase.borrow() } else { Phase::Closing };
                if p == Phase::Closing || (p == Phase::Draining && h2) {
                    conn.as_mut().graceful_shutdown();
                    shutting_down = true;
                }
            }
            _ = activity.quiet.notified(), if wants_quiet => {}
            _ = sleep_until(idle) => {
                // Still idle? A request may have begun and ended since the timer was set.
                let now = tokio::time::Instant::now();
                if activity.idle_until(timers, h2).is_some_and(|at| at <= now) {
                    if !activity.served.load(Ordering::Relaxed) || shutting_down {
                        tracing::debug!(peer = %info.peer, "closing a connection that sent no request in time");
                        return;
                    }
                    tracing::debug!(peer = %info.peer, "closing an idle HTTP/2 connection");
                    conn.as_mut().graceful_shutdown();
                    shutting_down = true;
                    // GOAWAY sent; a peer that keeps it open gets one more period.
                    activity.idle_since.store(now.duration_since(activity.opened).as_nanos() as u64, Ordering::Relaxed);
                }
            }
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct PanicsOnSomePaths;

    impl Handler for PanicsOnSomePaths {
        async fn call(&self, req: Request<RequestBody>, _: &ConnInfo) -> Response<Body> {
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
