//! A plain HTTP/1.1 connection's read side, shared by the connection's task (heads,
//! and watching for the client leaving) and the request body it hands the handler.
//! Only one of them reads at a time: the body while it is unfinished, the connection
//! once it is done. The lock is held for one poll, never across an `.await`.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker, ready};

use bytes::{Bytes, BytesMut};
use hyper::body::{Frame, SizeHint};
use tokio::net::TcpStream;

use crate::error::{BoxError, Polled};
use crate::http1::chunked::{Chunked, Decoded};

/// Bytes asked of the socket at a time.
const READ_CHUNK: usize = 8 * 1024;
/// Bytes of a pipelined next request read ahead while one is answered; beyond it the
/// socket is left alone until the connection reads its next head.
pub const READ_AHEAD: usize = 64 * 1024;
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

pub struct Shared {
    pub stream: TcpStream,
    pub read: Mutex<ReadSide>,
}

pub struct ReadSide {
    /// Bytes read and not yet taken: the rest of a head, body bytes, a next request.
    pub buf: BytesMut,
    pub body: BodyState,
    /// Bytes of `100 Continue` still to write before the body is first read
    /// (`Expect: 100-continue`); `None` when none is owed.
    pub owed_continue: Option<usize>,
    /// The connection's task, waiting for the body to end to watch the socket.
    pub waiter: Option<Waker>,
    /// The client closed its side or the socket failed: nothing more will come.
    pub gone: bool,
}

pub enum BodyState {
    Length(u64),
    Chunked(Chunked),
    Done,
    /// Ended by an error already reported to the body's reader.
    Failed,
}

impl Shared {
    pub fn new(stream: TcpStream) -> Shared {
        Shared {
            stream,
            read: Mutex::new(ReadSide {
                buf: BytesMut::with_capacity(READ_CHUNK),
                body: BodyState::Done,
                owed_continue: None,
                waiter: None,
                gone: false,
            }),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, ReadSide> {
        // A panic while holding it cannot leave the buffer half-updated in a way that
        // matters more than the connection it belongs to.
        crate::sync::lock(&self.read)
    }

    /// Reads what the socket has into the buffer; `Ok(0)` is the client's end.
    pub fn poll_fill(&self, side: &mut ReadSide, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if side.buf.capacity() - side.buf.len() < READ_CHUNK / 8 {
            side.buf.reserve(READ_CHUNK);
        }
        loop {
            match self.stream.try_read_buf(&mut side.buf) {
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(self.stream.poll_read_ready(cx))?
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Ready when the client has left (its end of the stream, or a failed socket)
    /// while a request is being answered. Reads ahead what it sends meanwhile (a
    /// pipelined request), up to `READ_AHEAD`.
    pub fn poll_gone(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut side = self.lock();
        loop {
            if side.gone {
                return Poll::Ready(());
            }
            if !matches!(side.body, BodyState::Done) {
                // The body is read by the handler; woken when it ends.
                side.waiter = Some(cx.waker().clone());
                return Poll::Pending;
            }
            if side.buf.len() >= READ_AHEAD {
                return Poll::Pending;
            }
            match ready!(self.poll_fill(&mut side, cx)) {
                Ok(0) | Err(_) => side.gone = true,
                Ok(_) => {}
            }
        }
    }

    /// Writes what `100 Continue` is still owed.
    fn poll_continue(&self, side: &mut ReadSide, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some(at) = side.owed_continue {
            match self.stream.try_write(&CONTINUE[at..]) {
                Ok(n) if at + n >= CONTINUE.len() => side.owed_continue = None,
                Ok(n) => side.owed_continue = Some(at + n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    ready!(self.stream.poll_write_ready(cx))?
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl ReadSide {
    fn end(&mut self, state: BodyState) {
        self.body = state;
        if let Some(w) = self.waiter.take() {
            w.wake();
        }
    }

    /// The next frame of the body that the buffer already holds: `Ready(None)` once
    /// the body is over (or failed), `Pending` when more bytes are needed.
    fn take(&mut self) -> Polled {
        let frame = match &mut self.body {
            BodyState::Done | BodyState::Failed => return Poll::Ready(None),
            BodyState::Length(_) if self.buf.is_empty() => return Poll::Pending,
            BodyState::Length(left) => {
                let take = (*left).min(self.buf.len() as u64) as usize;
                *left -= take as u64;
                let data = self.buf.split_to(take).freeze();
                if *left == 0 {
                    self.end(BodyState::Done);
                }
                Some(Ok(Frame::data(data)))
            }
            BodyState::Chunked(dec) => match dec.decode(&mut self.buf) {
                Ok(Decoded::Data(d)) => Some(Ok(Frame::data(d))),
                Ok(Decoded::NeedMore) => return Poll::Pending,
                Ok(Decoded::Trailers(t)) => {
                    self.end(BodyState::Done);
                    Some(Ok(Frame::trailers(t)))
                }
                Ok(Decoded::End) => {
                    self.end(BodyState::Done);
                    None
                }
                Err(e) => {
                    // Its framing is lost: the connection closes after the answer.
                    self.end(BodyState::Failed);
                    Some(Err(e.into()))
                }
            },
        };
        Poll::Ready(frame)
    }

    /// The client or its socket failed inside the body: nothing more will come.
    fn lost(&mut self, e: BoxError) -> Polled {
        self.gone = true;
        self.end(BodyState::Failed);
        Poll::Ready(Some(Err(e)))
    }

    /// Takes the rest of an unread body off the buffer if all of it is there, so the
    /// connection can carry the next request; false when it is not (the connection
    /// must close: the rest may never come, or come only after a 100 never sent).
    pub fn discard_body(&mut self) -> bool {
        loop {
            match self.take() {
                Poll::Ready(Some(Ok(_))) => {}
                Poll::Ready(None) => return matches!(self.body, BodyState::Done),
                Poll::Ready(Some(Err(_))) | Poll::Pending => return false,
            }
        }
    }
}

/// A request body read from its connection as the handler polls it.
pub struct Body {
    shared: Arc<Shared>,
}

impl Body {
    pub fn new(shared: Arc<Shared>) -> Body {
        Body { shared }
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Polled {
        let shared = &self.shared;
        let mut guard = shared.lock();
        let side = &mut *guard;
        loop {
            if let Poll::Ready(frame) = side.take() {
                return Poll::Ready(frame);
            }
            // More bytes are needed; a client waiting for 100 gets it first.
            if let Err(e) = ready!(shared.poll_continue(side, cx)) {
                return side.lost(e.into());
            }
            match ready!(shared.poll_fill(side, cx)) {
                Ok(0) => {
                    return side
                        .lost("the client closed the connection inside the request body".into());
                }
                Ok(_) => {}
                Err(e) => return side.lost(e.into()),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.shared.lock().body, BodyState::Done | BodyState::Failed)
    }

    fn size_hint(&self) -> SizeHint {
        match &self.shared.lock().body {
            BodyState::Length(n) => SizeHint::with_exact(*n),
            BodyState::Done | BodyState::Failed => SizeHint::with_exact(0),
            BodyState::Chunked(_) => SizeHint::default(),
        }
    }
}
