//! Request bodies: the one type every handler receives (hyper's, or braid's own
//! HTTP/1.1 reader's, as `Either`), and the one way a handler reads a body whole, under a size
//! limit, a stall time, the request's deadline and the shared byte budget.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::{Body as _, Incoming};

use super::h1;
use super::{ByteBudget, Limits, Reservation};
use crate::error::{BoxError, ProxyError};

/// A request's body as the listener hands it to a handler: hyper's (HTTP/2 and TLS
/// connections), or braid's own HTTP/1.1 reader's (`Right`).
pub type RequestBody = http_body_util::Either<Incoming, h1::body::Body>;

/// How one request body may be read.
pub struct BodyRules<'a> {
    /// Larger is 413.
    pub limit: usize,
    /// No bytes for this long is 408.
    pub idle: Duration,
    /// The request's deadline: a body still arriving then is 408 too.
    pub deadline: Option<tokio::time::Instant>,
    /// The shared budget the body's bytes are reserved from, into the request's
    /// reservation (given back when the request ends, however it ends).
    pub reserve: Option<(&'a ByteBudget, &'a mut Reservation)>,
}

impl BodyRules<'_> {
    /// A body bounded by size and stall time alone.
    pub fn limit(limit: usize) -> BodyRules<'static> {
        BodyRules {
            limit,
            idle: Limits::default().body_idle_timeout,
            deadline: None,
            reserve: None,
        }
    }

    fn reserve(&mut self, total: usize) -> Result<(), ProxyError> {
        match &mut self.reserve {
            Some((budget, held)) => held.grow_to(budget, total),
            None => Ok(()),
        }
    }
}

/// Reads the whole body under the rules: a declared length over the limit (or the
/// budget) is refused before a byte is read, a body that grows past either is cut off,
/// and one that stalls is 408. The bytes are copied at most once.
pub async fn read_body<B>(
    headers: &HeaderMap,
    body: B,
    mut rules: BodyRules<'_>,
) -> Result<Bytes, ProxyError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<crate::error::BoxError>,
{
    let limit = rules.limit;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ProxyError::BodyTooLarge { limit });
    }
    let declared = declared.map(|n| n as usize);
    if let Some(n) = declared {
        rules.reserve(n)?;
    }
    // Past the limit as bytes arrive, or as a chunk's size is read (braid's listener).
    let too_large = |e: &BoxError| {
        e.is::<http_body_util::LengthLimitError>()
            || e.downcast_ref::<crate::http1::chunked::ChunkError>()
                .is_some_and(|c| c.too_large())
    };
    let refused = |e: BoxError| {
        if too_large(&e) {
            ProxyError::BodyTooLarge { limit }
        } else {
            ProxyError::BadRequest(format!("reading request body: {e}"))
        }
    };
    let mut body = std::pin::pin!(Limited::new(body, limit));
    let (idle, deadline) = (rules.idle, rules.deadline);
    let next_frame = async |body: &mut std::pin::Pin<&mut Limited<B>>| {
        // Most frames are there already (a small body arrives with its head): no timer
        // is armed for those, only for a frame the client has yet to send.
        if let Some(ready) = futures_util::FutureExt::now_or_never(body.frame()) {
            return Ok(ready);
        }
        let stall = tokio::time::Instant::now() + idle;
        let until = deadline.map_or(stall, |d| d.min(stall));
        match tokio::time::timeout_at(until, body.frame()).await {
            Ok(frame) => Ok(frame),
            Err(_) if until < stall => Err(ProxyError::BodyStalled(
                "the request's timeout passed while its body was still arriving".into(),
            )),
            Err(_) => Err(ProxyError::BodyStalled(format!(
                "no bytes for {idle:?} (--body-idle-timeout)"
            ))),
        }
    };
    // Most bodies arrive in one frame: taken as it is, with no copy.
    let first = match next_frame(&mut body).await? {
        None => return Ok(Bytes::new()),
        Some(frame) => frame.map_err(refused)?.into_data().unwrap_or_default(),
    };
    rules.reserve(first.len())?;
    if body.is_end_stream() {
        return Ok(first);
    }
    let mut all = bytes::BytesMut::with_capacity(declared.unwrap_or(2 * first.len()).min(limit));
    all.extend_from_slice(&first);
    drop(first);
    while let Some(frame) = next_frame(&mut body).await? {
        if let Ok(data) = frame.map_err(refused)?.into_data() {
            rules.reserve(all.len() + data.len())?;
            all.extend_from_slice(&data);
        }
    }
    Ok(all.freeze())
}
