//! Plain HTTP/1.1 connections served by braid's own code, as pingora does: the head
//! parsed with `httparse` into what the request path needs, the handler awaited in the
//! connection's own task, the response head and a body that is ready written in one
//! go, keep-alive looping here. A connection that opens with HTTP/2's preface is handed
//! to hyper with the bytes read so far; TLS stays on hyper.
//!
//! Each connection arms one timer for its whole life: the head deadline is a number
//! moved forward per request, and the timer is reset only when it fires early. While a
//! request is answered the socket is watched for the client leaving (its end of the
//! stream drops the handler's future, as hyper does), and a pipelined next request is
//! read ahead and answered in order.

pub mod body;
pub mod head;

use std::cell::RefCell;
use std::future::poll_fn;
use std::io::{self, Write as _};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::FutureExt as _;
use http::{Method, Request, Response, Version};
use http_body_util::BodyExt as _;
use hyper::body::Body as _;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{ConnInfo, Handler, Phase, RequestBody};
use crate::error::{Body, ProxyError};
use crate::http1::chunked::Chunked;
use body::{BodyState, Shared};
use head::{Framing, HeadLimits, Out, RequestHead, Scratch};

/// The start of every HTTP/2 prior-knowledge connection.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Response body bytes copied beside the head (or a chunk's framing) rather than
/// written on their own.
const COALESCE: usize = 16 * 1024;
/// How long a connection closed with unread input keeps reading (and dropping) it, so
/// the kernel does not answer those bytes with a reset that can destroy the response.
const LINGER: Duration = Duration::from_secs(1);

/// What a plain connection's loop needs of the listener's limits.
#[derive(Debug, Clone, Copy)]
pub struct H1Limits {
    pub head: HeadLimits,
    /// From a response's end (or the connection's start) to the next complete head.
    pub header_read_timeout: Duration,
    /// A chunked body's chunk sizes are refused past this as they are read (413).
    pub max_body_bytes: u64,
}

/// How a plain connection ended here.
pub enum Ended {
    Closed,
    /// It opened with HTTP/2's preface: the stream and the bytes already read from it.
    Http2(TcpStream, Bytes),
}

/// What waiting for a head came to.
enum Got {
    Request(RequestHead),
    Http2,
    Refused(ProxyError),
    Closed,
}

/// Serves one plain connection until it closes (or turns out to be HTTP/2).
pub async fn serve<H: Handler>(
    stream: TcpStream,
    handler: &H,
    info: &ConnInfo,
    mut phase: watch::Receiver<Phase>,
    limits: H1Limits,
) -> Ended {
    let shared = Arc::new(Shared::new(stream));
    let timer = tokio::time::sleep(limits.header_read_timeout);
    tokio::pin!(timer);
    let mut wait = HeadWait {
        deadline: timer.deadline(),
        timer,
        first: true,
        closing: false,
    };
    let mut scratch = Scratch::new();
    let mut out = Vec::with_capacity(1024);
    loop {
        let head = match wait.head(&shared, &limits, &mut scratch, &mut phase).await {
            Got::Request(head) => head,
            Got::Http2 => return handoff(shared),
            Got::Refused(e) => {
                tracing::debug!(peer = %info.peer, "refused a request head: {e}");
                let _ =
                    write_response(&shared, e.into_response(), false, false, false, &mut out).await;
                linger(&shared).await;
                return Ended::Closed;
            }
            Got::Closed => return Ended::Closed,
        };
        wait.first = false;
        let RequestHead {
            parts,
            framing,
            keep_alive,
            expect_continue,
        } = head;
        let head_request = parts.method == Method::HEAD;
        let http10 = parts.version == Version::HTTP_10;
        {
            let mut side = shared.lock();
            side.body = match framing {
                Framing::Length(0) => BodyState::Done,
                Framing::Length(n) => BodyState::Length(n),
                Framing::Chunked => BodyState::Chunked(Chunked::with_limit(limits.max_body_bytes)),
            };
            let waits = expect_continue && !matches!(side.body, BodyState::Done);
            side.owed_continue = waits.then_some(0);
        }
        let req = Request::from_parts(parts, RequestBody::Right(body::Body::new(shared.clone())));
        let resp = tokio::select! {
            biased;
            resp = std::panic::AssertUnwindSafe(handler.call(req, info)).catch_unwind() => {
                resp.unwrap_or_else(super::panicked)
            }
            // The client left: its request's future is dropped (slots, permits, the
            // upstream call all given back), as hyper does on the same event.
            () = poll_fn(|cx| shared.poll_gone(cx)) => return Ended::Closed,
        };
        // Judged after the handler: a drain may have begun while it ran.
        let mut keep =
            keep_alive && *phase.borrow() == Phase::Serving && !head::asks_close(resp.headers());
        let (gone, unread) = {
            let mut side = shared.lock();
            side.owed_continue = None;
            (side.gone, !side.gone && !side.discard_body())
        };
        keep &= !gone && !unread;
        let written = write_response(&shared, resp, head_request, http10, keep, &mut out).await;
        if written.is_err() || !keep {
            if unread {
                linger(&shared).await;
            }
            return Ended::Closed;
        }
        wait.deadline = Instant::now() + limits.header_read_timeout;
    }
}

/// Waiting for the next head, under the connection's one timer.
struct HeadWait<T> {
    timer: std::pin::Pin<T>,
    /// When the head must be complete; the timer may be set earlier and is moved on.
    deadline: Instant,
    /// No request yet: the HTTP/2 preface is still possible.
    first: bool,
    /// The listener is closing (or gone): an idle connection closes.
    closing: bool,
}

impl<T> HeadWait<T>
where
    T: std::ops::DerefMut<Target = tokio::time::Sleep>,
{
    async fn head(
        &mut self,
        shared: &Shared,
        limits: &H1Limits,
        scratch: &mut Scratch,
        phase: &mut watch::Receiver<Phase>,
    ) -> Got {
        loop {
            {
                let mut side = shared.lock();
                let n = side.buf.len().min(PREFACE.len());
                if self.first && n > 0 && side.buf[..n] == PREFACE[..n] {
                    if n == PREFACE.len() {
                        return Got::Http2;
                    }
                } else {
                    match head::parse_request(&mut side.buf, &limits.head, scratch) {
                        Ok(Some(h)) => return Got::Request(h),
                        Ok(None) => {}
                        Err(e) => return Got::Refused(e),
                    }
                }
                self.closing |= *phase.borrow() == Phase::Closing;
                if self.closing && side.buf.is_empty() {
                    return Got::Closed;
                }
                if side.gone {
                    return Got::Closed;
                }
            }
            let fill = poll_fn(|cx| {
                let mut side = shared.lock();
                shared.poll_fill(&mut side, cx)
            });
            tokio::select! {
                biased;
                read = fill => match read {
                    Ok(0) | Err(_) => return Got::Closed,
                    Ok(_) => {}
                },
                () = self.timer.as_mut() => {
                    if Instant::now() >= self.deadline {
                        if shared.lock().buf.is_empty() {
                            return Got::Closed;
                        }
                        return Got::Refused(ProxyError::HeadStalled(limits.header_read_timeout));
                    }
                    let at = self.deadline;
                    self.timer.as_mut().reset(at);
                }
                changed = phase.changed(), if !self.closing => {
                    self.closing |= changed.is_err();
                }
            }
        }
    }
}

/// Gives the stream and what was read of it back, for hyper's HTTP/2.
fn handoff(shared: Arc<Shared>) -> Ended {
    match Arc::try_unwrap(shared) {
        Ok(shared) => {
            let side = shared.read.into_inner().unwrap_or_else(|e| e.into_inner());
            Ended::Http2(shared.stream, side.buf.freeze())
        }
        // Nothing else holds it before the first request; were it so, close.
        Err(_) => Ended::Closed,
    }
}

/// Writes a response: framed as `head::response_framing` decides, its head and every
/// frame that is ready in one write, each later frame as it comes. Fails when the
/// client leaves or the body fails midway (the connection then closes).
async fn write_response(
    shared: &Shared,
    resp: Response<Body>,
    head_request: bool,
    http10: bool,
    keep_alive: bool,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    let (parts, mut body) = resp.into_parts();
    let exact = body.size_hint().exact();
    let framing = head::response_framing(parts.status, head_request, &parts.headers, exact, http10);
    let keep_alive = keep_alive && framing != Out::Close;
    out.clear();
    head::encode_response_head(&parts, framing, keep_alive, http10, date, out);
    drop(parts);
    if framing == Out::None {
        return write_all(&shared.stream, out).await;
    }
    let mut sent = 0u64;
    loop {
        let frame = match body.frame().now_or_never() {
            Some(frame) => frame,
            None => {
                // Nothing more now: what is gathered goes out while the body works.
                write_all(&shared.stream, out).await?;
                out.clear();
                tokio::select! {
                    biased;
                    frame = body.frame() => frame,
                    () = poll_fn(|cx| shared.poll_gone(cx)) => {
                        return Err(io::ErrorKind::ConnectionAborted.into());
                    }
                }
            }
        };
        let data = match frame {
            None => break,
            Some(Err(e)) => return Err(io::Error::other(e)),
            // Trailers are not sent on HTTP/1.1 (nothing braid serves needs them there).
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) if !data.is_empty() => data,
                _ => continue,
            },
        };
        sent += data.len() as u64;
        if let Out::Length(n) = framing
            && sent > n
        {
            return Err(io::Error::other("response body longer than its length"));
        }
        if framing == Out::Chunked {
            let _ = write!(out, "{:x}\r\n", data.len());
        }
        if data.len() <= COALESCE {
            out.extend_from_slice(&data);
        } else {
            write_all(&shared.stream, out).await?;
            out.clear();
            write_all(&shared.stream, &data).await?;
        }
        if framing == Out::Chunked {
            out.extend_from_slice(b"\r\n");
        }
    }
    if framing == Out::Chunked {
        out.extend_from_slice(b"0\r\n\r\n");
    }
    write_all(&shared.stream, out).await?;
    match framing {
        Out::Length(n) if sent != n => {
            Err(io::Error::other("response body shorter than its length"))
        }
        _ => Ok(()),
    }
}

async fn write_all(stream: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        match stream.try_write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => stream.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Half-closes and reads what the client still sends, for at most `LINGER`.
async fn linger(shared: &Shared) {
    let _ = socket2::SockRef::from(&shared.stream).shutdown(std::net::Shutdown::Write);
    let drain = async {
        loop {
            let read = poll_fn(|cx| {
                let mut side = shared.lock();
                side.buf.clear();
                shared.poll_fill(&mut side, cx)
            })
            .await;
            if !matches!(read, Ok(n) if n > 0) {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

/// The `date` header's value now, formatted once a second per thread.
fn date() -> [u8; 29] {
    thread_local! {
        static DATE: RefCell<(u64, [u8; 29])> = const { RefCell::new((u64::MAX, [0; 29])) };
    }
    let now = SystemTime::now();
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with_borrow_mut(|(at, text)| {
        if *at != secs {
            let formatted = httpdate::fmt_http_date(now);
            if formatted.len() == text.len() {
                text.copy_from_slice(formatted.as_bytes());
                *at = secs;
            }
        }
        *text
    })
}
