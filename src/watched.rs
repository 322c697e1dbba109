//! One pass-through body for everything that only observes an answer or holds something
//! to its end: the frames pass unchanged, a `Watch` sees each one, and is told once how
//! the body ended, at its last frame, at an error, or when it is dropped first (a client
//! that left). What it holds is released then, by this body's `Drop` at the latest,
//! never by a line after an `.await`.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, SizeHint};

use crate::error::{Body, BoxError, Polled};

/// How a watched body ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// Its last frame passed (or it said it had ended, which a server does not poll past).
    Finished,
    /// The body it wraps failed.
    Failed,
    /// Dropped before its end: the client left, or the server gave up on the stream.
    Dropped,
}

/// What a `Watched` body tells as it passes.
pub trait Watch: Send + Sync + Unpin + 'static {
    /// Each frame, as it passes (data or trailers).
    fn frame(&mut self, _frame: &Frame<Bytes>) {}
    /// Once, at the end; the watch is dropped right after.
    fn end(&mut self, how: End);
}

/// `inner`, unchanged, with `watch` told what passes.
pub struct Watched<W: Watch> {
    inner: Body,
    watch: Option<W>,
}

impl<W: Watch> Watched<W> {
    pub fn new(inner: Body, watch: W) -> Watched<W> {
        Watched {
            inner,
            watch: Some(watch),
        }
    }

    fn end(&mut self, how: End) {
        if let Some(mut w) = self.watch.take() {
            w.end(how);
        }
    }
}

impl<W: Watch> HttpBody for Watched<W> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Polled {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(w) = &mut this.watch {
                    w.frame(frame);
                }
            }
            Poll::Ready(None) => this.end(End::Finished),
            Poll::Ready(Some(Err(_))) => this.end(End::Failed),
            Poll::Pending => {}
        }
        if this.watch.is_some() && this.inner.is_end_stream() {
            this.end(End::Finished);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<W: Watch> Drop for Watched<W> {
    fn drop(&mut self) {
        if self.watch.is_none() {
            return; // told already
        }
        let how = match self.inner.is_end_stream() {
            true => End::Finished,
            false => End::Dropped,
        };
        self.end(how);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::full;
    use http_body_util::BodyExt;
    use std::sync::{Arc, Mutex};

    #[derive(Default, Clone)]
    struct Seen(Arc<Mutex<(usize, Vec<End>)>>);

    impl Watch for Seen {
        fn frame(&mut self, _: &Frame<Bytes>) {
            self.0.lock().unwrap().0 += 1;
        }
        fn end(&mut self, how: End) {
            self.0.lock().unwrap().1.push(how);
        }
    }

    /// A body that never ends, and one that fails at once.
    fn never() -> Body {
        let pending = futures_util::stream::pending::<Result<Frame<Bytes>, BoxError>>();
        http_body_util::StreamBody::new(pending).boxed()
    }

    fn fails() -> Body {
        let broken: Result<Frame<Bytes>, BoxError> = Err("broken".into());
        http_body_util::StreamBody::new(futures_util::stream::iter([broken])).boxed()
    }

    #[tokio::test]
    async fn each_way_a_body_ends_is_told_once() {
        let seen = Seen::default();
        let got = Watched::new(full("hello"), seen.clone()).collect().await;
        assert_eq!(got.unwrap().to_bytes(), "hello");
        assert_eq!(*seen.0.lock().unwrap(), (1, vec![End::Finished]));

        let seen = Seen::default();
        drop(Watched::new(never(), seen.clone()));
        assert_eq!(*seen.0.lock().unwrap(), (0, vec![End::Dropped]));

        let seen = Seen::default();
        assert!(Watched::new(fails(), seen.clone()).collect().await.is_err());
        assert_eq!(*seen.0.lock().unwrap(), (0, vec![End::Failed]));
    }
}
