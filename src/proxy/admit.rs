//! Admission: a variant with `max_concurrent` gives a request one of its places before
//! it is served, and the answer holds it to its last byte (a generation keeps its
//! backend busy that long). The request's class is `x-braid-priority` (one of the
//! route's `admission.priorities`), else the route's default.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::Response;
use http_body_util::BodyExt;
use hyper::body::Frame;
use tokio::time::Instant;

use super::batched::named_class;
use crate::error::{Body, BoxError, ProxyError};
use crate::route::admission::{Permit, Refused};
use crate::route::{Route, live::VariantLive};

/// A place on variant `vi`, waiting for one if the request's class may wait; `None`
/// for a variant without `max_concurrent`.
pub(super) async fn admit(
    route: &Route,
    vi: usize,
    live: &VariantLive,
    headers: &http::HeaderMap,
    deadline: Option<Instant>,
) -> Result<Option<Permit>, ProxyError> {
    let Some(gate) = &live.admission else {
        return Ok(None);
    };
    let limits = &route.admission;
    let class = match named_class(&limits.classes, headers) {
        None => limits.default_class,
        Some(Ok(i)) => i,
        // One class of its own: a route without classes ignores the header.
        Some(Err(_)) if limits.classes.len() == 1 => 0,
        Some(Err(e)) => return Err(e),
    };
    let reason = match gate.admit(class, deadline).await {
        Ok(p) => return Ok(Some(p)),
        Err(Refused::Shed) => "shed",
        Err(Refused::QueueFull) => "queue_full",
        Err(Refused::TimedOut) => "queue_timeout",
    };
    Err(ProxyError::Saturated {
        variant: route.variants[vi].name.to_string(),
        reason,
    })
}

/// The answer, holding its place until its body ends or is dropped.
pub(super) fn holding(resp: Response<Body>, permit: Option<Permit>) -> Response<Body> {
    let Some(permit) = permit else { return resp };
    let (parts, inner) = resp.into_parts();
    let body = Holding {
        inner,
        permit: Some(permit),
    };
    Response::from_parts(parts, body.boxed())
}

struct Holding {
    inner: Body,
    permit: Option<Permit>,
}

impl hyper::body::Body for Holding {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(None | Some(Err(_))) = polled {
            // The answer's last byte: the place is free now, not when hyper drops it.
            this.permit = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}
