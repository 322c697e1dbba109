//! braid's own HTTP/1.1 client and keep-alive pool: one `Backend` per authority,
//! bound to the variants that use it when a snapshot is installed and kept across
//! reloads.
//!
//! A request takes an idle connection (or opens one) and does all its work in its
//! own task, in the style of pingora: head and body in one write, the response head
//! parsed with `httparse` (`wire`) from the same read that brought it, and a small
//! Content-Length body taken straight from that buffer. No connection task, no
//! channel, no pool-wide map, nothing spawned per request.
//!
//! The connection goes back to its backend once the body has been read to its end;
//! a body dropped before its end takes its connection with it (closed), so a
//! half-read body never meets the next request. An idle connection that has become
//! readable (the backend closed it, or sent something unasked) is not reused. A
//! reused connection that fails before any of the request was written is replaced
//! and the request sent on another; once any of it was written it is never resent
//! here (the retry policy decides).
//!
//! Only whole bodies are sent this way: streamed calls are gRPC, always HTTP/2.
//! HTTP/2, h2c and TLS backends keep hyper-util's pools.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use http::header::HeaderValue;
use http::uri::Authority;
use http::{Method, Request, Response};
use http_body_util::BodyExt;
use http_body_util::Either;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::wire::{self, Chunked, Decoded, Framing, Parsed, WireError};
use super::{OutBody, SendError};
use crate::error::{BoxError, Polled};

/// An idle connection older than this is closed rather than reused (servers close
/// theirs after 5 s (uvicorn) to 75 s (nginx); this bounds what is left open).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// At most this many idle connections are kept per backend.
pub const MAX_IDLE: usize = 1024;
/// A body up to this size is written in the same buffer (one write) as the head.
const COALESCE_BODY: usize = 16 * 1024;
/// How much a read asks for.
const READ_CHUNK: usize = 16 * 1024;

/// One backend authority's connections.
pub struct Backend {
    authority: Authority,
    /// `Host` as the client would send it: the port only where it is not 80.
    host: HeaderValue,
    connect_timeout: Duration,
    /// Most recently used at the back: taken from the back, expired from the front.
    idle: Mutex<VecDeque<Idle>>,
}

/// An open connection and what has been read from it but not yet used.
struct Conn {
    stream: TcpStream,
    buf: BytesMut,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("authority", &self.authority)
            .finish_non_exhaustive()
    }
}

impl Backend {
    pub fn new(authority: Authority, connect_timeout: Duration) -> Backend {
        let host = match authority.port_u16() {
            Some(80) | None => authority.host(),
            Some(_) => authority.as_str(),
        };
        let host = HeaderValue::from_str(host).expect("an authority is a valid header value");
        Backend {
            authority,
            host,
            connect_timeout,
            idle: Mutex::new(VecDeque::new()),
        }
    }

    /// Sends `req` (absolute or origin-form URI; a whole body) on a pooled connection.
    /// The error says whether any of it may have reached the backend.
    pub async fn send(
        self: &Arc<Self>,
        req: Request<OutBody>,
    ) -> Result<Response<Reply>, SendError> {
        let (parts, body) = req.into_parts();
        let body = match body {
            Either::Left(full) => match full.collect().now_or_never() {
                Some(Ok(c)) => c.to_bytes(),
                _ => Bytes::new(),
            },
            Either::Right(_) => {
                return Err(SendError::Connect(
                    "a streamed body is sent over HTTP/2 only".into(),
                ));
            }
        };
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        self.send_head(&parts.method, path, &parts.headers, &[], body)
            .await
    }

    /// Sends a request made of the caller's own parts, with no `Request` built: the
    /// headers as they are, less those `replaced` names (sent with the new values).
    /// The caller has taken out hop-by-hop headers.
    pub async fn send_head(
        self: &Arc<Self>,
        method: &Method,
        path: &str,
        headers: &http::HeaderMap,
        replaced: &[Option<(&http::HeaderName, &[u8])>],
        body: Bytes,
    ) -> Result<Response<Reply>, SendError> {
        let coalesced = body.len() <= COALESCE_BODY;
        let mut out = Vec::with_capacity(512 + if coalesced { body.len() } else { 0 });
        wire::encode_request(
            method,
            path,
            &self.host,
            headers,
            replaced,
            body.len(),
            &mut out,
        );
        if coalesced {
            out.extend_from_slice(&body);
        }
        loop {
            let (mut conn, reused) = match self.checkout() {
                Some(c) => (c, true),
                None => (self.connect().await?, false),
            };
            // The first write says whether the connection is alive at all.
            let first = match conn.stream.write(&out).await {
                Ok(n) if n > 0 => n,
                Ok(_) | Err(_) if reused => continue,
                Ok(_) => return Err(self.failed("wrote nothing", false)),
                Err(e) => return Err(self.failed(&e.to_string(), false)),
            };
            let written = async {
                conn.stream.write_all(&out[first..]).await?;
                if !coalesced {
                    conn.stream.write_all(&body).await?;
                }
                std::io::Result::Ok(())
            }
            .await;
            // A backend may answer early and close without reading the whole body:
            // its answer is still read, and the connection not used again.
            if let Err(e) = &written {
                tracing::debug!(authority = %self.authority, "writing the request: {e}");
            }
            return self.read_head(conn, method, written.is_ok()).await;
        }
    }

    async fn read_head(
        self: &Arc<Self>,
        mut conn: Conn,
        method: &Method,
        whole_request_written: bool,
    ) -> Result<Response<Reply>, SendError> {
        let head = loop {
            match wire::parse_head(&mut conn.buf, method) {
                Ok(Parsed::Head(head)) => break head,
                Ok(Parsed::Interim) => continue,
                Ok(Parsed::Partial) => {}
                Err(e) => return Err(self.failed(&e.to_string(), true)),
            }
            conn.buf.reserve(READ_CHUNK);
            match conn.stream.read_buf(&mut conn.buf).await {
                Ok(0) => return Err(self.failed(&WireError::Truncated.to_string(), true)),
                Ok(_) => {}
                Err(e) => return Err(self.failed(&e.to_string(), true)),
            }
        };
        let state = match head.framing {
            Framing::Empty => State::Ready(None),
            Framing::Length(n) if conn.buf.len() as u64 >= n => {
                // The whole body came with the head (the common case for small answers).
                let body = conn.buf.split_to(n as usize).freeze();
                State::Ready(Some(body))
            }
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::Chunked(Chunked::default()),
            Framing::Close => State::Close,
        };
        let mut body = Inline {
            conn: Some(conn),
            state,
            reusable: head.keep_alive && whole_request_written,
            backend: self.clone(),
        };
        if matches!(body.state, State::Ready(_)) {
            // Nothing more to read: the connection goes back before the body is used.
            body.finish();
        }
        let mut resp = Response::new(Reply(Inner::Inline(body)));
        *resp.status_mut() = head.status;
        // The version stays braid's own (HTTP/1.1): an intermediary sends its own
        // version, not its backend's (RFC 9112 section 2.3).
        *resp.headers_mut() = head.headers;
        Ok(resp)
    }

    /// A send that failed; `written` says the request was sent (it may have been
    /// processed).
    fn failed(&self, why: &str, written: bool) -> SendError {
        let msg = format!("backend {}: {why}", self.authority);
        match written {
            true => SendError::Other(msg),
            false => SendError::Connect(msg),
        }
    }

    fn checkout(&self) -> Option<Conn> {
        let waker = futures_util::task::noop_waker_ref();
        let mut cx = Context::from_waker(waker);
        let mut idle = super::lock(&self.idle);
        while let Some(i) = idle.pop_back() {
            // Readable while idle: closed by the backend, or bytes nobody asked for.
            let stale = i.since.elapsed() >= IDLE_TIMEOUT
                || !i.conn.buf.is_empty()
                || i.conn.stream.poll_read_ready(&mut cx).is_ready();
            if !stale {
                return Some(i.conn);
            }
        }
        None
    }

    fn checkin(&self, conn: Conn) {
        let now = Instant::now();
        let mut idle = super::lock(&self.idle);
        while idle
            .front()
            .is_some_and(|i| now.duration_since(i.since) >= IDLE_TIMEOUT)
        {
            idle.pop_front();
        }
        if idle.len() < MAX_IDLE {
            idle.push_back(Idle { conn, since: now });
        }
    }

    async fn connect(&self) -> Result<Conn, SendError> {
        let host = self.authority.host();
        // An IPv6 literal comes bracketed in an authority, bare in a socket address.
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let port = self.authority.port_u16().unwrap_or(80);
        let refused =
            |why: String| SendError::Connect(format!("connect to {}: {why}", self.authority));
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect((host, port)))
            .await
            .map_err(|_| refused(format!("timed out after {:?}", self.connect_timeout)))?
            .map_err(|e| refused(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60));
        let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
        Ok(Conn {
            stream,
            buf: BytesMut::with_capacity(READ_CHUNK),
        })
    }
}

/// A backend's response body: read by braid's own client from a pooled connection
/// (which goes back once the body is read to its end), or from one of hyper-util's
/// pools (h2c, TLS).
pub struct Reply(Inner);

enum Inner {
    Hyper(Incoming),
    Inline(Inline),
}

struct Inline {
    /// `None` once the body is over (the connection given back or closed).
    conn: Option<Conn>,
    state: State,
    /// The head allowed another request on this connection.
    reusable: bool,
    backend: Arc<Backend>,
}

enum State {
    /// The rest of the body is here: all of it, or `None` once taken or over.
    Ready(Option<Bytes>),
    /// Bytes still to read.
    Length(u64),
    Chunked(Chunked),
    /// Until the backend closes.
    Close,
}

impl Reply {
    /// A body from one of hyper-util's pools, which keep their own connections.
    pub fn unpooled(inner: Incoming) -> Reply {
        Reply(Inner::Hyper(inner))
    }
}

impl Inline {
    /// The body is over: the connection goes back if nothing is left on it.
    fn finish(&mut self) {
        if let Some(conn) = self.conn.take()
            && self.reusable
            && conn.buf.is_empty()
        {
            self.backend.checkin(conn);
        }
    }

    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Polled {
        loop {
            if let State::Ready(b) = &mut self.state {
                let b = b.take();
                self.finish();
                return Poll::Ready(b.map(|b| Ok(Frame::data(b))));
            }
            let Some(conn) = self.conn.as_mut() else {
                // Ended by an error, already reported.
                return Poll::Ready(None);
            };
            match &mut self.state {
                State::Length(left) if !conn.buf.is_empty() => {
                    let take = (*left).min(conn.buf.len() as u64) as usize;
                    let data = conn.buf.split_to(take).freeze();
                    *left -= take as u64;
                    if *left == 0 {
                        self.state = State::Ready(None);
                        self.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                State::Chunked(dec) => match dec.decode(&mut conn.buf) {
                    Ok(Decoded::Data(d)) => return Poll::Ready(Some(Ok(Frame::data(d)))),
                    Ok(Decoded::Trailers(t)) => {
                        self.state = State::Ready(None);
                        self.finish();
                        return Poll::Ready(Some(Ok(Frame::trailers(t))));
                    }
                    Ok(Decoded::End) => {
                        self.state = State::Ready(None);
                        self.finish();
                        return Poll::Ready(None);
                    }
                    Ok(Decoded::NeedMore) => {}
                    Err(e) => {
                        self.conn = None;
                        return Poll::Ready(Some(Err(e.into())));
                    }
                },
                State::Close if !conn.buf.is_empty() => {
                    let data = conn.buf.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                State::Ready(_) | State::Length(_) | State::Close => {}
            }
            // More bytes are needed.
            conn.buf.reserve(READ_CHUNK);
            let read = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut conn.stream),
                cx,
                &mut conn.buf
            ));
            match read {
                Ok(0) if matches!(self.state, State::Close) => {
                    self.state = State::Ready(None);
                    self.conn = None;
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    self.conn = None;
                    return Poll::Ready(Some(Err(WireError::Truncated.into())));
                }
                Ok(_) => {}
                Err(e) => {
                    self.conn = None;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.state {
            State::Ready(b) => b.is_none(),
            State::Length(n) => *n == 0,
            State::Chunked(_) | State::Close => false,
        }
    }
}

impl Body for Reply {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Polled {
        match &mut self.get_mut().0 {
            Inner::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Inner::Inline(i) => i.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Inner::Hyper(b) => b.is_end_stream(),
            Inner::Inline(i) => i.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Inner::Hyper(b) => b.size_hint(),
            Inner::Inline(i) => match &i.state {
                State::Ready(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
                State::Length(n) => SizeHint::with_exact(*n),
                State::Chunked(_) | State::Close => SizeHint::default(),
            },
        }
    }
}
