//! braid's own HTTP/1.1 keep-alive pool: one `Backend` per authority, bound to the
//! variants that use it when a snapshot is installed and kept across reloads.
//!
//! A request takes an idle connection (or opens one) and sends on it from its own
//! task, through `hyper::client::conn::http1`: no pool-wide map, no hashing, no task
//! spawned per request. The connection goes back to its backend when the response
//! body has been read to its end; a response dropped before its end takes its
//! connection with it (hyper closes it), so a half-read body never meets the next
//! request. A reused connection the backend has closed gives the request back unsent
//! (hyper's `TrySendError::take_message`), and it is sent on another; once any of it
//! was written it is never resent here (the retry policy decides).
//!
//! HTTP/2, h2c and TLS backends keep hyper-util's pools.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::{Authority, Uri};
use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{OutBody, SendError, error_chain};

/// An idle connection older than this is closed rather than reused (servers close
/// theirs after 5 s (uvicorn) to 75 s (nginx); this bounds what is left open).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// At most this many idle connections are kept per backend.
pub const MAX_IDLE: usize = 1024;

/// One backend authority's connections.
pub struct Backend {
    authority: Authority,
    /// `Host` as the client would send it: the port only where it is not 80.
    host: HeaderValue,
    connect_timeout: Duration,
    /// Most recently used at the back: taken from the back, expired from the front.
    idle: Mutex<VecDeque<Idle>>,
}

struct Idle {
    sender: SendRequest<OutBody>,
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

    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// Idle connections held now (for tests).
    pub fn idle(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Idle>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends `req` (absolute or origin-form URI) on a pooled connection. The error
    /// says whether any of it may have reached the backend.
    pub async fn send(
        self: &Arc<Self>,
        req: Request<OutBody>,
    ) -> Result<Response<Reply>, SendError> {
        let (mut parts, body) = req.into_parts();
        if parts.uri.authority().is_some() {
            let pq = parts.uri.into_parts().path_and_query;
            parts.uri = pq.map_or_else(|| Uri::from_static("/"), Uri::from);
        }
        if !parts.headers.contains_key(header::HOST) {
            parts.headers.insert(header::HOST, self.host.clone());
        }
        let mut req = Request::from_parts(parts, body);
        loop {
            let (mut sender, reused) = match self.checkout() {
                Some(s) => (s, true),
                None => (self.connect().await?, false),
            };
            if sender.ready().await.is_err() {
                if reused {
                    continue;
                }
                return Err(SendError::Connect(format!(
                    "connection to {} closed before the request was sent",
                    self.authority
                )));
            }
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    let back = Some(Checkin {
                        sender,
                        backend: self.clone(),
                    });
                    return Ok(resp.map(|inner| Reply { inner, back }));
                }
                Err(mut e) => match e.take_message() {
                    // Nothing of it was written: safe to send on another connection.
                    Some(unsent) if reused => req = unsent,
                    Some(_) => return Err(SendError::Connect(error_chain(e.error()))),
                    None => return Err(SendError::Other(error_chain(e.error()))),
                },
            }
        }
    }

    fn checkout(&self) -> Option<SendRequest<OutBody>> {
        let mut idle = self.lock();
        while let Some(i) = idle.pop_back() {
            if !i.sender.is_closed() && i.since.elapsed() < IDLE_TIMEOUT {
                return Some(i.sender);
            }
        }
        None
    }

    fn checkin(&self, sender: SendRequest<OutBody>) {
        if sender.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut idle = self.lock();
        while idle
            .front()
            .is_some_and(|i| now.duration_since(i.since) >= IDLE_TIMEOUT || i.sender.is_closed())
        {
            idle.pop_front();
        }
        if idle.len() < MAX_IDLE {
            idle.push_back(Idle { sender, since: now });
        }
    }

    async fn connect(&self) -> Result<SendRequest<OutBody>, SendError> {
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
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| refused(error_chain(&e)))?;
        let authority = self.authority.clone();
        // A plain map, not an async block: the body's boxed error type defeats the
        // compiler's Send inference through `async move`.
        tokio::spawn(futures_util::FutureExt::map(conn, move |ended| {
            if let Err(e) = ended {
                tracing::debug!(%authority, "backend connection ended: {e}");
            }
        }));
        Ok(sender)
    }
}

/// A backend's response body. A pooled connection goes back to its backend once
/// this has been read to its end.
pub struct Reply {
    inner: Incoming,
    back: Option<Checkin>,
}

struct Checkin {
    sender: SendRequest<OutBody>,
    backend: Arc<Backend>,
}

impl Reply {
    /// A body from one of hyper-util's pools, which keep their own connections.
    pub fn unpooled(inner: Incoming) -> Reply {
        Reply { inner, back: None }
    }

    fn give_back(&mut self) {
        if let Some(c) = self.back.take() {
            c.backend.checkin(c.sender);
        }
    }
}

impl Body for Reply {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            None => this.give_back(),
            // Trailers come last; a reader may stop at them without a further poll.
            Some(Ok(f)) if f.is_trailers() || this.inner.is_end_stream() => this.give_back(),
            Some(Err(_)) => this.back = None,
            Some(Ok(_)) => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        // Read to its end without a last poll (a known length, a HEAD, a 204).
        if self.inner.is_end_stream() {
            self.give_back();
        }
    }
}
