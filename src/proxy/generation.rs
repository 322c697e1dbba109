//! An OpenAI-style answer on its way back to the client.
//!
//! - **The commit point** (`commit`): a streamed answer's head is held until its first
//!   content event. Before it the client has seen nothing, so a stream that breaks, sends
//!   an error as its first event or gives no first token within `ttft_timeout` can still
//!   be repeated or sent to the fallback.
//! - **Past it** (`measured`): events pass whole, as they complete, and are measured;
//!   what braid added (the usage chunk it asked for) is taken out; a backend that breaks
//!   ends the client's stream with an error event in OpenAI's shape, never a `[DONE]`.
//! - **Once, at the end** (the answer's last byte, or the client leaving): the metrics,
//!   the experiment's outcome, the access line and the span, which for these answers
//!   need the whole generation (its duration, time to first token, tokens).

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use http_body_util::BodyExt;
use hyper::body::Frame;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::error::{Body, BoxError, Polled, SendError};
use crate::metrics::{Generation, Metrics};
use crate::openai::{self, sse};
use crate::upstream::retry::{self, Answer, Judge, TryFuture};

/// When a streamed answer's first content event reached braid (set by `commit`).
#[derive(Clone, Copy, Debug)]
pub(super) struct FirstToken(pub Instant);

/// A stream's commit point as the retry loop's judge of each try (`retry::Judge`): an
/// event stream's try succeeds at its first content event. One that breaks first, or
/// gives no token within `ttft_timeout` of the try's start, failed; one whose first
/// event is an error failed too, but is whole (marked `Uncommitted`), for the client if
/// nothing else serves it. Any other answer is judged by its status, as every try is.
pub(super) struct CommitPoint {
    pub ttft_timeout: Option<Duration>,
}

impl Judge for CommitPoint {
    fn judge(&self, answer: Answer, tried: Instant) -> TryFuture {
        if !(answer.status().is_success() && is_event_stream(&answer)) {
            return Box::pin(std::future::ready(Ok(answer)));
        }
        let until = self
            .ttft_timeout
            .and_then(|t| Some((tried.checked_add(t)?, t)));
        Box::pin(commit(answer, until))
    }
}

fn is_event_stream(resp: &Answer) -> bool {
    resp.headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"))
}

/// Holds a streamed answer until its first content event (or an error event, or the
/// end), at most until `until` (then no first token within its timeout); what was read
/// is replayed in front of the rest. An answer that holds more than `sse::MAX_LINE`
/// bytes before a token is committed as it is (it is not a generation braid can read).
async fn commit(resp: Answer, until: Option<(Instant, Duration)>) -> Result<Answer, SendError> {
    let (mut parts, mut body) = resp.into_parts();
    let mut reader = sse::Reader::new(true);
    let mut held = VecDeque::new();
    let mut bytes = 0;
    let rebuilt = |parts, held, rest| Response::from_parts(parts, Prefixed { held, rest }.boxed());
    loop {
        let next = match until {
            Some((u, after)) => match tokio::time::timeout_at(u, body.frame()).await {
                Ok(next) => next,
                Err(_) => return Err(SendError::NoFirstToken(after)),
            },
            None => body.frame().await,
        };
        let frame = match next {
            // Ended with no token: a whole (empty) answer, passed as it is.
            None => return Ok(rebuilt(parts, held, body)),
            Some(Err(e)) => {
                let reason = format!("the stream broke before its first token: {e}");
                return Err(SendError::Other(reason));
            }
            Some(Ok(frame)) => frame,
        };
        let content = frame.data_ref().is_some_and(|d| {
            bytes += d.len();
            reader.feed(d)
        });
        held.push_back(frame);
        if content {
            parts.extensions.insert(FirstToken(Instant::now()));
            return Ok(rebuilt(parts, held, body));
        }
        if reader.seen.errors > 0 {
            parts.extensions.insert(retry::Uncommitted);
            return Ok(rebuilt(parts, held, body));
        }
        if bytes > sse::MAX_LINE {
            return Ok(rebuilt(parts, held, body));
        }
    }
}

/// Frames read already, then the rest of the body.
struct Prefixed {
    held: VecDeque<Frame<Bytes>>,
    rest: Body,
}

impl hyper::body::Body for Prefixed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Polled {
        let this = self.get_mut();
        if let Some(f) = this.held.pop_front() {
            return Poll::Ready(Some(Ok(f)));
        }
        Pin::new(&mut this.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_empty() && self.rest.is_end_stream()
    }
}

/// What is done once an answer has ended: given the whole generation.
pub(super) type Then = Box<dyn FnOnce(&Generation) + Send + Sync>;

/// Wraps a successful answer's body: measured as it passes, its usage chunk taken out
/// when braid asked for it (`strip_usage`), and `then` run once with the generation when
/// it ends or the client leaves. Returns the response and where the generation will
/// come once recorded.
pub(super) fn measured(
    resp: Response<Body>,
    start: Instant,
    (metrics, names): (Arc<Metrics>, (Arc<str>, Arc<str>)),
    strip_usage: bool,
    then: Then,
) -> (Response<Body>, oneshot::Receiver<Generation>) {
    let (summary, generated) = oneshot::channel();
    let (mut parts, inner) = resp.into_parts();
    let content_type = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let event_stream = content_type.starts_with("text/event-stream");
    let json = content_type.starts_with("application/json");
    let strip_usage = strip_usage && event_stream;
    if strip_usage {
        // What the client gets is shorter than what the backend sent.
        parts.headers.remove(http::header::CONTENT_LENGTH);
    }
    let first = parts.extensions.get::<FirstToken>().map(|f| f.0);
    let body = Measured {
        inner,
        read: event_stream || json,
        event_stream,
        strip_usage,
        framer: sse::Framer::default(),
        reader: sse::Reader::new(event_stream),
        start,
        first,
        last: first,
        metrics,
        names,
        then: Some(then),
        summary: Some(summary),
        ended: false,
    };
    (Response::from_parts(parts, body.boxed()), generated)
}

struct Measured {
    inner: Body,
    /// An answer braid can read (SSE or JSON); others are only timed.
    read: bool,
    event_stream: bool,
    strip_usage: bool,
    framer: sse::Framer,
    reader: sse::Reader,
    start: Instant,
    /// When the first and the latest content events passed.
    first: Option<Instant>,
    last: Option<Instant>,
    metrics: Arc<Metrics>,
    names: (Arc<str>, Arc<str>),
    then: Option<Then>,
    /// The generation, for whoever waits on it (the payload log's record): sent when
    /// it is recorded, at the end or in `Drop`, so the wait always ends.
    summary: Option<oneshot::Sender<Generation>>,
    ended: bool,
}

impl Measured {
    fn record(&mut self) {
        let Some(then) = self.then.take() else { return };
        self.reader.finish();
        let seen = &self.reader.seen;
        let stream = self.first.is_some() || seen.done;
        // A stream cut short (or a server that sends no usage) counts the content
        // events that did arrive: one token each, as vLLM and TGI stream them.
        let output = seen
            .completion_tokens
            .or((stream && seen.content_events > 0).then_some(seen.content_events));
        let tpot = match (self.first, self.last, output) {
            (Some(first), Some(last), Some(n)) if n >= 2 => {
                Some((last - first) / (n - 1).min(u32::MAX as u64) as u32)
            }
            _ => None,
        };
        let g = Generation {
            ttft: self.first.map(|f| f - self.start),
            tpot,
            duration: self.start.elapsed(),
            input_tokens: seen.prompt_tokens,
            output_tokens: output,
            finish: seen.finish.clone(),
            errors: seen.errors,
        };
        if self.read {
            self.metrics.generation(&self.names.0, &self.names.1, &g);
        }
        then(&g);
        if let Some(tx) = self.summary.take() {
            let _ = tx.send(g);
        }
    }

    /// Whole events, measured, as the client gets them (`None`: nothing to send yet).
    fn events(&mut self, data: Bytes) -> Option<Bytes> {
        if !self.event_stream {
            if self.read {
                self.content(&data);
            }
            return Some(data);
        }
        let events = self.framer.push(data)?;
        self.content(&events);
        self.stripped(events)
    }

    /// Events as the client gets them: without the usage chunk braid asked for.
    fn stripped(&self, events: Bytes) -> Option<Bytes> {
        let out = match self.strip_usage {
            true => sse::without_usage(&events).unwrap_or(events),
            false => events,
        };
        (!out.is_empty()).then_some(out)
    }

    fn content(&mut self, bytes: &[u8]) {
        if self.reader.feed(bytes) {
            let now = Instant::now();
            self.first.get_or_insert(now);
            self.last = Some(now);
        }
    }
}

impl hyper::body::Body for Measured {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Polled {
        let this = self.get_mut();
        loop {
            if this.ended {
                return Poll::Ready(None);
            }
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        if let Some(out) = this.events(data) {
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                    }
                    Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                },
                None => {
                    this.ended = true;
                    // A last event with no blank line after it.
                    let rest = this.framer.rest().and_then(|rest| {
                        this.content(&rest);
                        this.stripped(rest)
                    });
                    this.record();
                    return Poll::Ready(rest.map(|r| Ok(Frame::data(r))));
                }
                Some(Err(e)) => {
                    this.ended = true;
                    // The part of an event held back is dropped: it was never sent,
                    // and half an event is no event to a client.
                    if this.event_stream && this.framer.broken() {
                        // Past the commit point: the client's stream ends with an error
                        // event it can read (the SDK raises it), never a fake [DONE].
                        this.reader.seen.errors += 1;
                        this.record();
                        let message = format!("the backend's stream broke: {e}");
                        let event = openai::error_event(&message, "stream_broken");
                        return Poll::Ready(Some(Ok(Frame::data(event))));
                    }
                    this.record();
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || (self.inner.is_end_stream() && self.framer.at_boundary())
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self.event_stream {
            // Events are held and some taken out: the length is not known.
            true => hyper::body::SizeHint::default(),
            false => self.inner.size_hint(),
        }
    }
}

impl Drop for Measured {
    fn drop(&mut self) {
        // The client left (or the stream broke) before the end: what arrived counts.
        self.record();
    }
}
