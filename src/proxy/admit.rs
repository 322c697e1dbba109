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

use super::batched::X_BRAID_PRIORITY;
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
    let class = match headers.get(&X_BRAID_PRIORITY) {
        None => limits.default_class,
        Some(v) => {
            let name = v.to_str().unwrap_or_default().trim();
            match limits.classes.iter().position(|c| &*c.name == name) {
                Some(i) => i,
                // One class of its own: a route without classes ignores the header.
                None if limits.classes.len() == 1 => 0,
                None => {
                    let known: Vec<&str> = limits.classes.iter().map(|c| &*c.name).collect();
                    return Err(ProxyError::BadRequest(format!(
                        "unknown priority class {name:?} in x-braid-priority: this route's classes are {}",
                        known.join(", ")
                    )));
                }
            }
        }
    };
    let (reason, why) = match gate.admit(class, deadline).await {
        Ok(p) => return Ok(Some(p)),
        Err(Refused::Shed) => ("shed", "this request's priority class is sheddable"),
        Err(Refused::QueueFull) => ("queue_full", "its queue for this priority class is full"),
        Err(Refused::TimedOut) => (
            "queue_timeout",
            "no place came free within the queue timeout",
        ),
    };
    Err(ProxyError::Saturated {
        variant: route.variants[vi].name.to_string(),
        reason,
        why,
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
