//! The batch queue as plain state: no I/O, no tokio, so every policy decision is
//! unit-tested with made-up instants.
//!
//! Policy, per (route, variant):
//! - work-conserving: with a free executor slot, what is queued goes at once (or after
//!   `max_delay`, if set, to gather more); while every slot is busy the queue grows,
//!   so light load pays no waiting tax and heavy load forms big batches;
//! - but not blindly: when fewer rows are queued than are expected (the last batch's,
//!   or once it finished, its rows plus those that queued meanwhile), the batch lingers
//!   for the rest while they keep arriving (no gap over `RETURN` after a batch
//!   finished, `QUIET` otherwise), at most a quarter of the last batch's execution time
//!   and `MAX_LINGER`, counted from when the executor came free. Closed-loop clients answered by one batch send their next requests
//!   within a round trip; sending the first of them alone would leave the executor
//!   computing a batch of one while the others queue behind it, and sending what
//!   queued during a batch without its returning callers splits one population into
//!   two halves that alternate;
//! - a batch is seeded by the oldest item of the highest non-empty priority class, and
//!   filled with items of the same merge key from that class, then from lower classes
//!   (backfill), each in arrival order, up to `max_batch_size` rows;
//! - a full queue takes a higher-class arrival by displacing the newest item of a lower,
//!   sheddable class (answered 503 as `preempted`); each class also has its own cap;
//! - items past their deadline are taken out before a batch forms (answered 504), and
//!   so are items whose caller has gone (never sent).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Batching limits for one variant (from the route's `batching` block).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchLimits {
    pub max_batch_size: usize,
    pub max_delay: Option<Duration>,
    pub max_queue: usize,
    pub queue_timeout: Option<Duration>,
    pub max_inflight: usize,
    /// Priority classes, highest first (`batching.priorities`); empty: one class.
    pub classes: Arc<[ClassLimits]>,
    /// The class of a request that names none (`batching.default_priority`).
    pub default_class: usize,
}

/// One priority class of a route's batch queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassLimits {
    pub name: Arc<str>,
    /// Requests of this class queued at once; more get 429.
    pub max_queue: usize,
    /// How long a request of this class may wait (instead of the route's).
    pub queue_timeout: Option<Duration>,
    /// Whether a higher class's arrival may displace it from a full queue.
    pub sheddable: bool,
}

impl BatchLimits {
    /// The name of class `c` (for the `priority` metric label); `None` on a route
    /// without classes.
    pub fn class_name(&self, c: usize) -> Option<&Arc<str>> {
        self.classes.get(c).map(|k| &k.name)
    }
}

#[derive(Debug)]
pub struct Entry<T> {
    pub key: String,
    pub rows: usize,
    /// Priority class (0 is the highest).
    pub class: usize,
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

/// The longest a batch lingers for the rows the last batch had (see the module doc).
pub const MAX_LINGER: Duration = Duration::from_millis(5);
/// Lingering costs at most this fraction of the last batch's execution time.
const LINGER_FRACTION: u32 = 4;
/// A lingering batch goes when no request has arrived for this long.
pub const QUIET: Duration = Duration::from_micros(500);
/// After a batch finishes, how long the next waits for each of its callers to come
/// back (a round trip through the proxy and the client).
pub const RETURN: Duration = Duration::from_millis(2);

#[derive(Debug)]
pub struct Queue<T> {
    entries: VecDeque<Entry<T>>,
    pub limits: BatchLimits,
    /// Rows the next batch expects: those of the last batch taken, or, once a batch
    /// has finished, its rows plus what queued meanwhile (see `finished`).
    recent_rows: usize,
    /// Execution time of the last batch that finished.
    pub recent_exec: Duration,
    /// When the last batch finished, if no batch was taken since: a linger counts from
    /// then, not from when the queued items arrived.
    free_since: Option<Instant>,
}

impl<T> Queue<T> {
    pub fn new(limits: BatchLimits) -> Self {
        Queue {
            entries: VecDeque::new(),
            limits,
            recent_rows: 0,
            recent_exec: Duration::ZERO,
            free_since: None,
        }
    }

    /// A batch of `rows` rows finished after `took`. Its callers, if they are
    /// closed-loop clients, come back within a round trip; the next batch waits for
    /// them as well as for what queued meanwhile. Without this, two halves of one
    /// client population alternate for ever: while one half executes the other queues,
    /// and each goes the moment the executor is free.
    pub fn finished(&mut self, rows: usize, took: Duration, now: Instant) {
        self.recent_exec = took;
        let queued: usize = self.entries.iter().map(|e| e.rows).sum();
        self.recent_rows = self.recent_rows.max(rows + queued);
        self.free_since = Some(now);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Requests queued in class `c`.
    pub fn len_of(&self, c: usize) -> usize {
        self.entries.iter().filter(|e| e.class == c).count()
    }

    /// Queues an item. When the queue is full, an item of a higher class displaces the
    /// newest queued item of a lower, sheddable class, which is handed back as
    /// `Ok(Some(..))` (answer 503); otherwise the item itself is handed back as `Err`
    /// (answer 429), as it is when its own class is at its cap.
    pub fn push(&mut self, e: Entry<T>) -> Result<Option<Entry<T>>, Entry<T>> {
        if let Some(class) = self.limits.classes.get(e.class)
            && self.len_of(e.class) >= class.max_queue
        {
            return Err(e);
        }
        if self.entries.len() < self.limits.max_queue {
            self.entries.push_back(e);
            return Ok(None);
        }
        let classes = &self.limits.classes;
        let victim = self
            .entries
            .iter()
            .rposition(|q| q.class > e.class && classes.get(q.class).is_some_and(|c| c.sheddable));
        match victim.and_then(|i| self.entries.remove(i)) {
            Some(shed) => {
                self.entries.push_back(e);
                Ok(Some(shed))
            }
            None => Err(e),
        }
    }

    /// The item a batch starts from: the oldest of the highest non-empty class.
    fn seed(&self) -> Option<&Entry<T>> {
        let best = self.entries.iter().map(|e| e.class).min()?;
        self.entries.iter().find(|e| e.class == best)
    }

    /// Takes out every item whose deadline has passed.
    pub fn expire(&mut self, now: Instant) -> Vec<Entry<T>> {
        self.take_where(|e| e.deadline.is_some_and(|d| d <= now))
    }

    /// Takes out every item matching `gone` (callers that went away).
    pub fn take_where(&mut self, mut gone: impl FnMut(&Entry<T>) -> bool) -> Vec<Entry<T>> {
        // Checked on every wake-up: the queue is rebuilt only when something goes.
        if !self.entries.iter().any(&mut gone) {
            return Vec::new();
        }
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

    /// Rows queued with the seed's key, and the earliest deadline among them.
    fn head_group(&self) -> Option<(usize, Option<Instant>, Instant)> {
        let head = self.seed()?;
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
            let linger = (self.recent_exec / LINGER_FRACTION).min(MAX_LINGER);
            let newest = self
                .entries
                .iter()
                .map(|e| e.enqueued)
                .max()
                .unwrap_or(oldest);
            // After a batch finished, its callers come back spread over their round
            // trips (the proxy answers them one by one): each may take `RETURN`.
            let (start, last, gap) = match self.free_since {
                Some(free) => (oldest.max(free), newest.max(free), RETURN),
                None => (oldest, newest, QUIET),
            };
            let due = (start + linger).min(last + gap);
            let expected = self.recent_rows.min(self.limits.max_batch_size);
            if rows < expected && due > now && deadline.is_none_or(|d| d > due) {
                return Next::WaitUntil(Some(due));
            }
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

    /// Takes the next batch: the seed, then items with its key from the seed's class
    /// and then lower classes, each in arrival order, up to `max_batch_size` rows (an
    /// item larger than that goes alone).
    pub fn take_batch(&mut self) -> Vec<Entry<T>> {
        let Some(seed) = self.seed() else {
            return Vec::new();
        };
        let (key, top) = (seed.key.clone(), seed.class);
        let mut order: Vec<usize> = (0..self.entries.len())
            .filter(|&i| self.entries[i].key == key && self.entries[i].class >= top)
            .collect();
        order.sort_by_key(|&i| (self.entries[i].class, i));
        let mut rows = 0;
        let mut picked = Vec::new();
        for i in order {
            let e = &self.entries[i];
            let fits = picked.is_empty() || rows + e.rows <= self.limits.max_batch_size;
            if fits && rows < self.limits.max_batch_size {
                rows += e.rows;
                picked.push(i);
            }
        }
        self.recent_rows = rows;
        self.free_since = None;
        let mut all: Vec<Option<Entry<T>>> = self.entries.drain(..).map(Some).collect();
        let batch = picked
            .iter()
            .map(|&i| all[i].take().expect("each item is picked once"))
            .collect();
        self.entries = all.into_iter().flatten().collect();
        batch
    }
}

// A pure queue: time is an argument, and its tests need only a starting instant.
#[cfg(test)]
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;

    fn limits(max_delay: Option<u64>) -> BatchLimits {
        BatchLimits {
            max_batch_size: 4,
            max_delay: max_delay.map(Duration::from_millis),
            max_queue: 8,
            queue_timeout: None,
            max_inflight: 1,
            classes: Arc::from([]),
            default_class: 0,
        }
    }

    fn entry(key: &str, rows: usize, at: Instant, deadline_ms: Option<u64>) -> Entry<u32> {
        Entry {
            key: key.into(),
            rows,
            class: 0,
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

    fn classes(max_queue: usize, sheddable_low: bool) -> BatchLimits {
        let class = |name: &str, sheddable| ClassLimits {
            name: name.into(),
            max_queue: 64,
            queue_timeout: None,
            sheddable,
        };
        BatchLimits {
            max_queue,
            classes: Arc::from([class("high", false), class("low", sheddable_low)]),
            ..limits(None)
        }
    }

    fn in_class(class: usize, id: u32, at: Instant) -> Entry<u32> {
        Entry {
            class,
            payload: id,
            ..entry("k", 1, at, None)
        }
    }

    fn ids(batch: Vec<Entry<u32>>) -> Vec<u32> {
        batch.into_iter().map(|e| e.payload).collect()
    }

    #[test]
    fn the_highest_class_seeds_each_batch_and_lower_classes_fill_it() {
        let t = Instant::now();
        let mut q = Queue::new(classes(16, true));
        for id in 0..6 {
            q.push(in_class(1, id, t)).unwrap();
        }
        let later = t + Duration::from_millis(1);
        q.push(in_class(0, 100, later)).unwrap();
        q.push(in_class(0, 101, later)).unwrap();
        // Two high first (their own order), then the oldest low ones (backfill).
        assert_eq!(ids(q.take_batch()), vec![100, 101, 0, 1]);
        assert_eq!(ids(q.take_batch()), vec![2, 3, 4, 5]);
    }

    #[test]
    fn a_low_class_burst_delays_a_high_request_by_at_most_one_batch() {
        let t = Instant::now();
        let mut q = Queue::new(classes(64, true));
        for id in 0..40 {
            q.push(in_class(1, id, t)).unwrap();
        }
        assert_eq!(ids(q.take_batch()), vec![0, 1, 2, 3]); // in flight
        q.push(in_class(0, 100, t + Duration::from_millis(1)))
            .unwrap();
        assert_eq!(ids(q.take_batch())[0], 100);
    }

    #[test]
    fn a_full_queue_sheds_the_newest_sheddable_lower_request_for_a_higher_one() {
        let t = Instant::now();
        let mut q = Queue::new(classes(3, true));
        for id in 0..3 {
            q.push(in_class(1, id, t)).unwrap();
        }
        // A low arrival finds the queue full: refused (429).
        assert_eq!(q.push(in_class(1, 9, t)).unwrap_err().payload, 9);
        // A high one displaces the newest low request (503, preempted).
        let shed = q.push(in_class(0, 100, t)).unwrap().expect("one is shed");
        assert_eq!(shed.payload, 2);
        assert_eq!((q.len(), q.len_of(0), q.len_of(1)), (3, 1, 2));
        // A class that may not be shed is never displaced.
        let mut q = Queue::new(classes(2, false));
        q.push(in_class(1, 0, t)).unwrap();
        q.push(in_class(1, 1, t)).unwrap();
        assert_eq!(q.push(in_class(0, 100, t)).unwrap_err().payload, 100);
        // Nor is a class displaced by its own kind.
        let mut q = Queue::new(classes(1, true));
        q.push(in_class(0, 0, t)).unwrap();
        assert!(q.push(in_class(0, 1, t)).is_err());
    }

    #[test]
    fn each_class_has_its_own_cap() {
        let t = Instant::now();
        let mut limits = classes(16, true);
        let mut capped = limits.classes.to_vec();
        capped[0].max_queue = 1;
        limits.classes = Arc::from(capped);
        let mut q = Queue::new(limits);
        q.push(in_class(0, 0, t)).unwrap();
        assert!(q.push(in_class(0, 1, t)).is_err());
        assert!(q.push(in_class(1, 2, t)).unwrap().is_none());
    }

    /// After a batch of 3, a lone arrival waits for the other two while requests keep
    /// coming (each within `QUIET` of the last), at most a quarter of the last batch's
    /// execution time, and goes as soon as they are there; a lone client (last batch
    /// 1) never waits.
    #[test]
    fn a_batch_lingers_briefly_for_as_many_rows_as_the_last_one_had() {
        let t = Instant::now();
        let mut q = Queue::new(limits(None));
        for _ in 0..3 {
            q.push(entry("k", 1, t, None)).unwrap();
        }
        assert_eq!(q.take_batch().len(), 3);
        q.recent_exec = Duration::from_millis(4);
        let t1 = t + Duration::from_millis(20);
        q.push(entry("k", 1, t1, None)).unwrap();
        assert_eq!(q.next(t1, 0), Next::WaitUntil(Some(t1 + QUIET)));
        // Another arrives 400 us later: the wait moves on, up to the 1 ms cap (4 ms / 4).
        let t2 = t1 + Duration::from_micros(400);
        q.push(entry("k", 1, t2, None)).unwrap();
        let cap = t1 + Duration::from_millis(1);
        assert_eq!(q.next(t2, 0), Next::WaitUntil(Some(cap.min(t2 + QUIET))));
        assert_eq!(
            q.next(cap, 0),
            Next::Dispatch(Flush::Idle),
            "gave up waiting"
        );
        assert_eq!(q.take_batch().len(), 2);
        // The last batch had 2: two queued go at once.
        q.push(entry("k", 1, t1, None)).unwrap();
        q.push(entry("k", 1, t1, None)).unwrap();
        assert_eq!(q.next(t1, 0), Next::Dispatch(Flush::Idle), "all there");
        assert_eq!(q.take_batch().len(), 2);
        // A request whose deadline falls inside the linger is not held.
        q.push(entry("k", 1, t1, Some(0))).unwrap();
        assert_eq!(q.next(t1, 0), Next::Dispatch(Flush::Idle));
        assert_eq!(q.take_batch().len(), 1);
        // Last batch had one row: no waiting at all.
        q.push(entry("k", 1, t1, None)).unwrap();
        assert_eq!(q.next(t1, 0), Next::Dispatch(Flush::Idle));
        q.take_batch();
        // A steady stream waits no longer than MAX_LINGER from the oldest.
        q.limits.max_batch_size = 64;
        q.limits.max_queue = 64;
        q.recent_rows = 64;
        q.recent_exec = Duration::from_secs(10);
        let mut at = t1;
        while at < t1 + MAX_LINGER {
            q.push(entry("k", 1, at, None)).unwrap_or_default();
            at += QUIET / 2;
        }
        assert_eq!(q.next(at, 0), Next::Dispatch(Flush::Idle));
    }

    /// `max_delay: 0ms` never waits: not for `max_delay`, not for returning callers.
    #[test]
    fn a_zero_max_delay_sends_what_is_queued_the_moment_the_executor_is_free() {
        let t = Instant::now();
        let mut q = Queue::new(limits(Some(0)));
        for _ in 0..3 {
            q.push(entry("k", 1, t, None)).unwrap();
        }
        assert_eq!(q.next(t, 0), Next::Dispatch(Flush::Delay));
        assert_eq!(q.take_batch().len(), 3);
        q.push(entry("k", 1, t, None)).unwrap();
        q.finished(3, Duration::from_millis(20), t);
        assert_eq!(q.next(t, 0), Next::Dispatch(Flush::Delay));
    }

    /// Two halves of 16 closed-loop clients: while one half's batch runs, the other
    /// queues. When the batch finishes, the queued half waits (from that moment) for
    /// the returning half and both go as one batch of 32.
    #[test]
    fn a_finished_batch_s_callers_are_awaited_with_what_queued_meanwhile() {
        let t = Instant::now();
        let mut q = Queue::new(limits(None));
        q.limits.max_batch_size = 64;
        q.limits.max_queue = 64;
        for _ in 0..16 {
            q.push(entry("k", 1, t, None)).unwrap();
        }
        assert_eq!(q.take_batch().len(), 16);
        for _ in 0..16 {
            q.push(entry("k", 1, t, None)).unwrap();
        }
        assert_eq!(q.next(t, 1), Next::WaitUntil(None), "busy");
        let done = t + Duration::from_millis(13);
        q.finished(16, Duration::from_millis(13), done);
        assert_eq!(
            q.next(done, 0),
            Next::WaitUntil(Some(done + RETURN)),
            "waits a round trip from when the executor came free, not from the queued items' arrival"
        );
        let mut at = done;
        for _ in 0..15 {
            at += Duration::from_micros(50);
            q.push(entry("k", 1, at, None)).unwrap();
            assert_eq!(q.next(at, 0), Next::WaitUntil(Some(at + RETURN)));
        }
        q.push(entry("k", 1, at, None)).unwrap();
        assert_eq!(q.next(at, 0), Next::Dispatch(Flush::Idle));
        assert_eq!(q.take_batch().len(), 32);
        // The population shrank: after the cap (13 ms / 4), what is there goes.
        q.finished(32, Duration::from_millis(13), at);
        q.push(entry("k", 1, at, None)).unwrap();
        let cap = at + Duration::from_micros(3250);
        let mut now = at;
        while now + RETURN / 2 < cap {
            now += RETURN / 2;
            q.push(entry("k", 1, now, None)).unwrap();
        }
        assert_eq!(q.next(cap, 0), Next::Dispatch(Flush::Idle));
    }
}
