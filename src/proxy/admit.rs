//! Admission: a variant with `max_concurrent` gives a request one of its places before
//! it is served, and the answer holds it to its last byte (a generation keeps its
//! backend busy that long), with its count in `--max-inflight` and its route's
//! `max_inflight` permit (`Held`). The request's class is `x-braid-priority` (one of the
//! route's `admission.priorities`), else the route's default.

use http::Response;
use http_body_util::BodyExt;
use tokio::time::Instant;

use super::batched::named_class;
use crate::error::{Body, ProxyError};
use crate::route::admission::{Permit, Refused};
use crate::route::{Route, live::VariantLive};
use crate::watched::{End, Watch, Watched};

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

/// What a request holds until its answer's last byte, not merely its head: a long
/// generation keeps its backend busy that long, so every limit that bounds requests at
/// once counts it to the end. Each is given back by `Drop`, however the request ends
/// (answered, its body dropped by a client that left, or its future dropped early).
#[derive(Default)]
pub(super) struct Held {
    /// Its count in `braid_requests_in_flight` (`--max-inflight`); held for its `Drop`.
    pub _inflight: Option<InFlight>,
    /// One of its route's `max_inflight` permits.
    pub route: Option<tokio::sync::OwnedSemaphorePermit>,
    /// A place on its variant (`max_concurrent`).
    pub place: Option<Permit>,
}

/// One request counted in `braid_requests_in_flight`, until it is dropped.
pub(super) struct InFlight(prometheus_client::metrics::gauge::Gauge);

impl InFlight {
    /// Counts one more; returns it and the count with it.
    pub fn count(gauge: &prometheus_client::metrics::gauge::Gauge) -> (InFlight, i64) {
        let now = gauge.inc() + 1;
        (InFlight(gauge.clone()), now)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Held {
    /// The answer, holding all of this until its body ends or is dropped.
    pub fn around(self, resp: Response<Body>) -> Response<Body> {
        let (parts, inner) = resp.into_parts();
        Response::from_parts(parts, Watched::new(inner, self).boxed())
    }
}

impl Watch for Held {
    /// The answer's last byte (or a client that left): all is free now, as the watch
    /// is dropped.
    fn end(&mut self, _: End) {}
}
