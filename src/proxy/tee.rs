//! A response body passed through unchanged while a copy of its first bytes is kept,
//! for the shadow's comparison and the payload log. The copy is handed over when the
//! body ends (or is dropped), off the client's path.

use bytes::{Bytes, BytesMut};
use hyper::body::Frame;
use tokio::sync::oneshot;

use crate::error::Body;
use crate::watched::{End, Watch, Watched};

/// What a `Tee` saw: its first `limit` bytes, how many there were in all, and whether
/// the body ended properly (not failed, not cut short).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copied {
    pub bytes: Bytes,
    pub total: u64,
    pub complete: bool,
}

impl Copied {
    /// The whole body, ended properly, nothing left out.
    pub fn whole(&self) -> bool {
        self.complete && self.total == self.bytes.len() as u64
    }
}

/// The copy's side of a watched body (`Tee::new`).
pub struct Tee {
    copy: BytesMut,
    limit: usize,
    total: u64,
    done: Option<oneshot::Sender<Copied>>,
}

impl Tee {
    /// `inner` passed through, keeping up to `limit` of its bytes; the copy comes when
    /// it ends or is dropped.
    pub fn new(inner: Body, limit: usize) -> (Watched<Tee>, oneshot::Receiver<Copied>) {
        let (tx, rx) = oneshot::channel();
        let tee = Tee {
            copy: BytesMut::new(),
            limit,
            total: 0,
            done: Some(tx),
        };
        (Watched::new(inner, tee), rx)
    }
}

impl Watch for Tee {
    fn frame(&mut self, frame: &Frame<Bytes>) {
        if let Some(data) = frame.data_ref() {
            let room = self.limit.saturating_sub(self.copy.len());
            let keep = data.len().min(room);
            self.copy.extend_from_slice(&data[..keep]);
            self.total += data.len() as u64;
        }
    }

    fn end(&mut self, how: End) {
        if let Some(tx) = self.done.take() {
            let _ = tx.send(Copied {
                bytes: std::mem::take(&mut self.copy).freeze(),
                total: self.total,
                complete: how == End::Finished,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::full;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn passes_the_body_through_and_keeps_a_copy() {
        let (tee, copy) = Tee::new(full("hello world"), 1 << 20);
        let got = tee.collect().await.unwrap().to_bytes();
        assert_eq!(got, "hello world");
        let copy = copy.await.unwrap();
        assert_eq!(copy.bytes, "hello world");
        assert!(copy.whole());
        // A limit keeps the first bytes and counts the rest.
        let (tee, copy) = Tee::new(full("hello world"), 5);
        assert_eq!(tee.collect().await.unwrap().to_bytes(), "hello world");
        let copy = copy.await.unwrap();
        assert_eq!(
            (copy.bytes.as_ref(), copy.total, copy.whole()),
            (&b"hello"[..], 11, false)
        );
        // Dropped before its end (the client left): not complete.
        let pending =
            futures_util::stream::pending::<Result<Frame<Bytes>, crate::error::BoxError>>();
        let (tee, copy) = Tee::new(http_body_util::StreamBody::new(pending).boxed(), 10);
        drop(tee);
        assert!(!copy.await.unwrap().complete);
    }
}
