//! The batch queue as plain state: no I/O, no tokio, so every policy decision is
//! unit-tested with made-up instants.
//!
//! Policy, per (route, variant):
//! - work-conserving: with a free executor slot, what is queued goes at once (or after
//!   `max_delay`, if set, to gather more); while every slot is busy the queue grows,
//!   so light load pays no waiting tax and heavy load forms big batches;
//! - a batch is the oldest item plus later items with the same merge key, in arrival
//!   order, up to `max_batch_size` rows;
//! - items past their deadline are taken out before a batch forms (answered 504), and
//!   so are items whose caller has gone (never sent).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Batching limits for one variant (from the route's `batching` block).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    pub max_batch_size: usize,
    pub max_delay: Option<Duration>,
    pub max_queue: usize,
    pub queue_timeout: Option<Duration>,
    pub max_inflight: usize,
}

#[derive(Debug)]
pub struct Entry<T> {
    pub key: String,
    pub rows: usize,
    pub enqueued: Instant,
    pub deadline: Option<Instant>,
    pub payload: T,
}

/// Why a batch left the queue (the `reason` label of `braid_batch_flushes_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flush {
    /// It reached `max_batch_size` rows.
    Full,
    /// A slot was free and no `max_delay` applied.
    Idle,
    /// `max_delay` passed.
    Delay,
    /// An item's deadline would pass before `max_delay`.
    Deadline,
}

impl Flush {
    pub fn label(self) -> &'static str {
        match self {
            Flush::Full => "full",
            Flush::Idle => "idle",
            Flush::Delay => "delay",
            Flush::Deadline => "deadline",
        }
    }
}

/// What the batcher should do next.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    Dispatch(Flush),
    /// Nothing to do before this instant (or before a new event).
    WaitUntil(Option<Instant>),
}

#[derive(Debug)]
pub struct Queue<T> {
    entries: VecDeque<Entry<T>>,
    pub limits: BatchLimits,
}

impl<T> Queue<T> {
    pub fn new(limits: BatchLimits) -> Self {
        Queue {
            entries: VecDeque::new(),
            limits,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Queues an item, or hands it back when the queue is full (answer 429).
    pub fn push(&mut self, e: Entry<T>) -> Result<(), Entry<T>> {
        if self.entries.len() >= self.limits.max_queue {
            return Err(e);
        }
        self.entries.push_back(e);
        Ok(())
    }

    /// Takes out every item whose deadline has passed.
    pub fn expire(&mut self, now: Instant) -> Vec<Entry<T>> {
        self.take_where(|e| e.deadline.is_some_and(|d| d <= now))
    }

    /// Takes out every item matching `gone` (callers that went away).
    pub fn take_where(&mut self, mut gone: impl FnMut(&Entry<T>) -> bool) -> Vec<Entry<T>> {
        let mut out = Vec::new();
        let mut kept = VecDeque::with_capacity(self.entries.len());
        for e in self.entries.drain(..) {
            if gone(&e) {
                out.push(e)
            } else {
                kept.push_back(e)
            }
        }
        self.entries = kept;
        out
    }

    /// The earliest deadline of anything queued: the batcher wakes then to answer 504.
    pub fn earliest_deadline(&self) -> Option<Instant> {
        self.entries.iter().filter_map(|e| e.deadline).min()
    }

    /// Rows queued with the oldest item's key, and the earliest deadline among them.
    fn head_group(&self) -> Option<(usize, Option<Instant>, Instant)> {
        let head = self.entries.front()?;
        let mut rows = 0;
        let mut deadline: Option<Instant> = None;
        for e in self.entries.iter().filter(|e| e.key == head.key) {
            rows += e.rows;
            deadline = match (deadline, e.deadline) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        Some((rows, deadline, head.enqueued))
    }

    /// The decision for `now`, given how many batches are in flight.
    pub fn next(&self, now: Instant, inflight: usize) -> Next {
        let Some((rows, deadline, oldest)) = self.head_group() else {
            return Next::WaitUntil(None);
        };
        if inflight >= self.limits.max_inflight {
            // Busy: let the queue grow; a finished batch is the next event.
            return Next::WaitUntil(None);
        }
        if rows >= self.limits.max_batch_size {
            return Next::Dispatch(Flush::Full);
        }
        let Some(delay) = self.limits.max_delay else {
            return Next::Dispatch(Flush::Idle);
        };
        let due = oldest + delay;
        if due <= now {
            return Next::Dispatch(Flush::Delay);
        }
        if deadline.is_some_and(|d| d <= due) {
            return Next::Dispatch(Flush::Deadline);
        }
        Next::WaitUntil(Some(due))
    }

    /// Takes the next batch: the oldest item and later items with its key, in order,
    /// up to `max_batch_size` rows (an item larger than that goes alone).
    pub fn take_batch(&mut self) -> Vec<Entry<T>> {
        let Some(head) = self.entries.front() else {
            return Vec::new();
        };
        let key = head.key.clone();
        let mut rows = 0;
        let mut batch = Vec::new();
        let mut kept = VecDeque::with_capacity(self.entries.len());
        for e in self.entries.drain(..) {
            let fits = batch.is_empty() || rows + e.rows <= self.limits.max_batch_size;
            if e.key == key && fits && rows < self.limits.max_batch_size {
                rows += e.rows;
                batch.push(e);
            } else {
                kept.push_back(e);
            }
        }
        self.entries = kept;
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_delay: Option<u64>) -> BatchLimits {
        BatchLimits {
            max_batch_size: 4,
            max_delay: max_delay.map(Duration::from_millis),
            max_queue: 8,
            queue_timeout: None,
            max_inflight: 1,
        }
    }

    fn entry(key: &str, rows: usize, at: Instant, deadline_ms: Option<u64>) -> Entry<u32> {
        Entry {
            key: key.into(),
            rows,
            enqueued: at,
            deadline: deadline_ms.map(|d| at + Duration::from_millis(d)),
            payload: 0,
        }
    }

    #[test]
    fn an_idle_executor_gets_work_at_once_without_max_delay() {
        let t = Instant::now();
        let mut q = Queue::new(limits(None));
        q.push(entry("k", 1, t, None)).unwrap();
        assert_eq!(q.next(t, 0), Next::Dispatch(Flush::Idle));
        assert_eq!(q.take_batch().len(), 1);
    }

    #[test]
    fn a_busy_executor_lets_the_queue_grow_then_takes_up_to_max_rows() {
        let t = Instant::now();
        let mut q = Queue::new(limits(None));
        for _ in 0..6 {
            q.push(entry("k", 1, t, None)).unwrap();
        }
        assert_eq!(q.next(t, 1), Next::WaitUntil(None));
        assert_eq!(q.next(t, 0), Next::Dispatch(Flush::Full));
        assert_eq!(q.take_batch().len(), 4);
        assert_eq!(q.len(), 2);
    }

    #[test]
    fn max_delay_waits_for_more_unless_full_or_a_deadline_is_near() {
        let t = Instant::now();
        let mut q = Queue::new(limits(Some(10)));
        q.push(entry("k", 1, t, None)).unwrap();
        assert_eq!(
            q.next(t, 0),
            Next::WaitUntil(Some(t + Duration::from_millis(10)))
        );
        assert_eq!(
            q.next(t + Duration::from_millis(10), 0),
            Next::Dispatch(Flush::Delay)
        );
        q.push(entry("k", 1, t, Some(5))).unwrap();
        assert_eq!(q.next(t, 0), Next::Dispatch(Flush::Deadline));
        let mut full = Queue::new(limits(Some(10)));
        full.push(entry("k", 4, t, None)).unwrap();
        assert_eq!(full.next(t, 0), Next::Dispatch(Flush::Full));
    }

    #[test]
    fn batches_keep_keys_apart_and_arrival_order() {
        let t = Instant::now();
        let mut q = Queue::new(limits(None));
        for (k, r) in [("a", 1), ("b", 1), ("a", 2), ("a", 2), ("b", 1)] {
            q.push(entry(k, r, t, None)).unwrap();
        }
        let first: Vec<(String, usize)> = q
            .take_batch()
            .into_iter()
            .map(|e| (e.key, e.rows))
            .collect();
        assert_eq!(first, [("a".to_string(), 1), ("a".to_string(), 2)]);
        let second: Vec<String> = q.take_batch().into_iter().map(|e| e.key).collect();
        assert_eq!(second, ["b", "b"]);
        assert_eq!(q.take_batch().len(), 1);
        // An item larger than the limit still goes, alone.
        q.push(entry("a", 9, t, None)).unwrap();
        assert_eq!(q.take_batch().len(), 1);
    }

    #[test]
    fn full_queue_refuses_and_expired_items_come_out_first() {
        let t = Instant::now();
        let mut q = Queue::new(limits(None));
        for i in 0..8 {
            q.push(entry("k", 1, t, Some(if i % 2 == 0 { 5 } else { 50 })))
                .unwrap();
        }
        assert!(q.push(entry("k", 1, t, None)).is_err());
        let expired = q.expire(t + Duration::from_millis(5));
        assert_eq!((expired.len(), q.len()), (4, 4));
    }
}
