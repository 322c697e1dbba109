//! The one budget for the bytes braid holds for requests at once
//! (`--max-buffered-bytes`). A request reserves what it buffers as it reads it, and
//! the reservation is given back by `Drop`: however the request ends (answered, its
//! client gone, its future dropped mid-read) the bytes return to the budget.

use prometheus_client::metrics::gauge::Gauge;

use crate::error::ProxyError;

/// Shared by every connection of a listener; clones share the budget. The count is
/// one atomic (the `braid_buffered_bytes` gauge itself): a request never waits for
/// bytes, it takes them or is refused, so no semaphore and no waiter list is needed.
#[derive(Clone, Debug)]
pub struct ByteBudget {
    limit: usize,
    /// Bytes reserved now.
    held: Gauge,
}

impl ByteBudget {
    pub fn new(limit: usize, held: Gauge) -> ByteBudget {
        ByteBudget { limit, held }
    }

    /// A budget nothing else shares, for servers whose bodies are bounded otherwise.
    pub fn unshared(limit: usize) -> ByteBudget {
        ByteBudget::new(limit, Gauge::default())
    }

    /// Bytes reserved at this moment.
    pub fn in_use(&self) -> usize {
        self.held.get().max(0) as usize
    }
}

/// Bytes one request holds; empty until it reads something.
#[derive(Debug, Default)]
pub struct Reservation {
    bytes: usize,
    /// The budget's counter, once something is reserved.
    held: Option<Gauge>,
}

impl Reservation {
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Grows the reservation to `total` bytes, or refuses (503 + Retry-After) without
    /// waiting when the budget cannot cover it; what was reserved stays reserved.
    pub fn grow_to(&mut self, budget: &ByteBudget, total: usize) -> Result<(), ProxyError> {
        let more = total.saturating_sub(self.bytes);
        if more == 0 {
            return Ok(());
        }
        let more_i = i64::try_from(more).unwrap_or(i64::MAX / 2);
        let before = budget.held.inc_by(more_i);
        if before.saturating_add(more_i) > budget.limit as i64 {
            budget.held.dec_by(more_i);
            return Err(ProxyError::BufferFull {
                limit: budget.limit,
            });
        }
        self.bytes += more;
        if self.held.is_none() {
            self.held = Some(budget.held.clone());
        }
        Ok(())
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(held) = &self.held {
            held.dec_by(self.bytes as i64);
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
