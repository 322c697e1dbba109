//! The one budget for the bytes braid holds for requests at once
//! (`--max-buffered-bytes`). A request reserves what it buffers as it reads it, and
//! the reservation is given back by `Drop`: however the request ends (answered, its
//! client gone, its future dropped mid-read) the bytes return to the budget.

use std::sync::Arc;

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::ProxyError;

/// Shared by every connection of a listener; clones share the budget.
#[derive(Clone, Debug)]
pub struct ByteBudget {
    permits: Arc<Semaphore>,
    limit: usize,
    /// Bytes reserved now, for `braid_buffered_bytes`.
    held: Gauge,
}

impl ByteBudget {
    pub fn new(limit: usize, held: Gauge) -> ByteBudget {
        let limit = limit.min(Semaphore::MAX_PERMITS);
        ByteBudget {
            permits: Arc::new(Semaphore::new(limit)),
            limit,
            held,
        }
    }

    /// A budget nothing else shares, for servers whose bodies are bounded otherwise.
    pub fn unshared(limit: usize) -> ByteBudget {
        ByteBudget::new(limit, Gauge::default())
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes reserved at this moment.
    pub fn in_use(&self) -> usize {
        self.limit - self.permits.available_permits()
    }
}

/// Bytes one request holds; empty until it reads something.
#[derive(Debug, Default)]
pub struct Reservation {
    permit: Option<(OwnedSemaphorePermit, Gauge)>,
}

impl Reservation {
    pub fn bytes(&self) -> usize {
        self.permit.as_ref().map_or(0, |(p, _)| p.num_permits())
    }

    /// Grows the reservation to `total` bytes, or refuses (503 + Retry-After) without
    /// waiting when the budget cannot cover it; what was reserved stays reserved.
    pub fn grow_to(&mut self, budget: &ByteBudget, total: usize) -> Result<(), ProxyError> {
        let more = total.saturating_sub(self.bytes());
        if more == 0 {
            return Ok(());
        }
        let full = || ProxyError::BufferFull {
            limit: budget.limit,
        };
        let n = u32::try_from(more).map_err(|_| full())?;
        let permit = budget
            .permits
            .clone()
            .try_acquire_many_owned(n)
            .map_err(|_| full())?;
        budget.held.inc_by(more as i64);
        match &mut self.permit {
            Some((p, _)) => p.merge(permit),
            None => self.permit = Some((permit, budget.held.clone())),
        }
        Ok(())
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some((p, held)) = &self.permit {
            held.dec_by(p.num_permits() as i64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_come_back_when_dropped_and_refuse_beyond_the_limit() {
        let b = ByteBudget::unshared(100);
        let mut a = Reservation::default();
        a.grow_to(&b, 60).unwrap();
        a.grow_to(&b, 40).unwrap(); // never shrinks
        assert_eq!((a.bytes(), b.in_use()), (60, 60));
        let mut c = Reservation::default();
        let e = c.grow_to(&b, 41).unwrap_err();
        assert_eq!(e.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(e.retry_after(), Some(1));
        c.grow_to(&b, 40).unwrap();
        assert_eq!(b.held.get(), 100);
        drop(a);
        drop(c);
        assert_eq!((b.in_use(), b.held.get()), (0, 0));
    }
}
