//! The batcher for one (route, variant): a cloneable handle over a channel, and a task
//! that owns the pure `Queue` and only moves messages: submissions in, batches out to
//! the executor, each request's share of the reply back on its oneshot.
//!
//! The executor is reached through the narrow `Execute` trait, so the loop and the
//! bisection are unit-tested on tokio's paused clock with a fake executor. The task
//! ends once every handle is dropped (the store drops a removed route's) and what it
//! holds has been answered.
//!
//! Per-item isolation: a batch that fails with a status one bad item could cause
//! (400, 422, 500) is split in halves and each half retried, down to single items, so
//! only the poisoned requests fail. A reply that cannot be split safely fails the
//! whole batch with 502: no request ever gets another's rows.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::codec::{self, Item, Payload, RowIds};
use super::queue::{BatchLimits, Entry, Next, Queue};
use crate::addr::Upstream;
pub use crate::error::BatchError;
use crate::metrics::BatchMetrics;
use crate::trace::SpanContext;

pub type Reply = Result<Delivered, BatchError>;

/// A request's share of a batch's reply, and how it got there (for the access log).
#[derive(Debug)]
pub struct Delivered {
    pub payload: Payload,
    /// Time in the queue, from arrival to its batch being sent.
    pub waited: Duration,
    /// Rows of the executor call that answered it (a half, after bisection).
    pub batch_rows: usize,
}

pub type ExecFuture<'a> =
    Pin<Box<dyn Future<Output = Result<(StatusCode, Payload), BatchError>> + Send + 'a>>;

/// The executor as the batcher sees it: one merged body in, a status and a body out.
/// No reply at all (refused, reset, killed mid-batch) is `Unreachable`; a reply that
/// cannot be read is `BadReply`. Deadlines are applied by the batcher around the call.
pub trait Execute: Send + Sync + 'static {
    /// One call with a merged body; `links` are the recorded spans of the requests it
    /// carries (tracing's `braid.batch` span links to each).
    fn execute<'a>(
        &'a self,
        upstream: &'a Upstream,
        path: &'a str,
        body: Payload,
        links: &'a [SpanContext],
    ) -> ExecFuture<'a>;
}

/// One request, ready to queue.
pub struct Submission {
    pub item: Item,
    /// Where it goes: executor and path (with the variant's target model).
    pub upstream: Upstream,
    pub path: String,
    /// The whole request's deadline (route timeout, `x-braid-timeout`): bounds execution.
    pub deadline: Option<Instant>,
    /// `queue_timeout`: how long it may wait to be sent.
    pub queue_deadline: Option<Instant>,
    /// `batching.row_id`: the tensor the executor must echo (v2 only).
    pub row_id: Option<Arc<str>>,
    /// Priority class (index into the limits' classes; 0 on a route without them).
    pub class: usize,
    /// The request's span, when it is being recorded.
    pub trace: Option<SpanContext>,
}

// Nearly every message is a submission: boxing it would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
enum Msg {
    Submit(Submission, oneshot::Sender<Reply>),
    /// A reload changed the limits: they apply to batches formed from now on.
    Limits(BatchLimits),
}

/// How long a batch may take when none of its requests has a deadline.
const NO_DEADLINE_LIMIT: Duration = Duration::from_secs(300);

/// A handle to the batcher task of one (route, variant). Clones share the task; it
/// stops after the last clone is dropped and its queue has drained.
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::UnboundedSender<Msg>,
    /// Closed when the task ends (its sender side lives in the task).
    stopped: watch::Receiver<()>,
}

impl Batcher {
    pub fn spawn(limits: BatchLimits, executor: Arc<dyn Execute>, m: BatchMetrics) -> Batcher {
        let (tx, rx) = mpsc::unbounded_channel();
        let (alive, stopped) = watch::channel(());
        tokio::spawn(async move {
            run(rx, Queue::new(limits), executor, Arc::new(m)).await;
            drop(alive);
        });
        Batcher { tx, stopped }
    }

    pub async fn submit(&self, s: Submission) -> Reply {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Msg::Submit(s, reply)).is_err() {
            return Err(BatchError::Unreachable("batcher stopped".into()));
        }
        rx.await
            .unwrap_or_else(|_| Err(BatchError::Unreachable("batcher stopped".into())))
    }

    /// New limits for batches formed from now on; queued requests stay queued.
    pub fn set_limits(&self, limits: BatchLimits) {
        let _ = self.tx.send(Msg::Limits(limits));
    }

    /// Resolves once the task has ended. Holds no handle, so it does not keep it alive.
    pub fn stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.stopped.clone();
        async move { while rx.changed().await.is_ok() {} }
    }
}

struct Pending {
    item: Item,
    upstream: Upstream,
    path: String,
    deadline: Option<Instant>,
    row_id: Option<Arc<str>>,
    reply: oneshot::Sender<Reply>,
    /// Set when its batch is sent.
    waited: Duration,
    trace: Option<SpanContext>,
}

async fn run(
    mut rx: mpsc::UnboundedReceiver<Msg>,
    mut q: Queue<Pending>,
    executor: Arc<dyn Execute>,
    m: Arc<BatchMetrics>,
) {
    let mut inflight: JoinSet<(usize, Duration)> = JoinSet::new();
    let mut open = true;
    loop {
        let now = Instant::now();
        for e in q.expire(now.into_std()) {
            m.dropped("deadline", q.limits.class_name(e.class));
            let _ = e.payload.reply.send(Err(BatchError::Expired));
        }
        for e in q.take_where(|e| e.payload.reply.is_closed()) {
            m.dropped("cancelled", q.limits.class_name(e.class));
        }
        let wake = loop {
            match q.next(now.into_std(), inflight.len()) {
                Next::Dispatch(reason) => {
                    let batch: Vec<Entry<Pending>> = q.take_batch();
                    // A caller that left while queued is never sent.
                    let (batch, gone): (Vec<_>, Vec<_>) = batch
                        .into_iter()
                        .partition(|e| !e.payload.reply.is_closed());
                    for e in &gone {
                        m.dropped("cancelled", q.limits.class_name(e.class));
                    }
                    if batch.is_empty() {
                        continue;
                    }
                    m.flushed(
                        reason.label(),
                        batch.iter().map(|e| e.rows).sum(),
                        batch
                            .iter()
                            .map(|e| (q.limits.class_name(e.class), now.into_std() - e.enqueued)),
                    );
                    inflight.spawn(dispatch(batch, executor.clone(), m.clone()));
                }
                Next::WaitUntil(w) => break w,
            }
        };
        for c in 0..q.limits.classes.len().max(1) {
            m.depth(q.limits.class_name(c), q.len_of(c));
        }
        if !open && q.is_empty() && inflight.is_empty() {
            return;
        }
        let wake = [wake, q.earliest_deadline()]
            .into_iter()
            .flatten()
            .min()
            .map(Instant::from_std);
        tokio::select! {
            msg = rx.recv(), if open => match msg {
                None => open = false,
                Some(Msg::Limits(l)) => q.limits = l,
                Some(Msg::Submit(s, reply)) => {
                    let entry = Entry {
                        key: format!(
                            "{}{}|{}|{}",
                            s.upstream.authority,
                            s.path,
                            s.row_id.as_deref().unwrap_or(""),
                            s.item.key
                        ),
                        rows: s.item.rows,
                        class: s.class,
                        // Now, not the loop's last wake-up: the linger measures gaps between arrivals.
                        enqueued: Instant::now().into_std(),
                        deadline: [s.deadline, s.queue_deadline].into_iter().flatten().min().map(Instant::into_std),
                        payload: Pending { item: s.item, upstream: s.upstream, path: s.path, deadline: s.deadline, row_id: s.row_id, reply, waited: Duration::ZERO, trace: s.trace },
                    };
                    let mut pushed = q.push(entry);
                    if let Err(refused) = pushed {
                        // Callers that left while queued hold no place: make room first.
                        for e in q.take_where(|e| e.payload.reply.is_closed()) {
                            m.dropped("cancelled", q.limits.class_name(e.class));
                        }
                        pushed = q.push(refused);
                    }
                    match pushed {
                        Ok(None) => {}
                        Ok(Some(shed)) => {
                            m.dropped("preempted", q.limits.class_name(shed.class));
                            let _ = shed.payload.reply.send(Err(BatchError::Preempted));
                        }
                        Err(e) => {
                            m.dropped("queue_full", q.limits.class_name(e.class));
                            let _ = e.payload.reply.send(Err(BatchError::QueueFull));
                        }
                    }
                }
            },
            Some(done) = inflight.join_next(), if !inflight.is_empty() => {
                if let Ok((rows, took)) = done {
                    q.finished(rows, took, Instant::now().into_std());
                }
            }
            _ = sleep_until(wake), if wake.is_some() => {}
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at).await;
    }
}

/// Runs one batch to its end; returns its rows and how long it took.
async fn dispatch(
    batch: Vec<Entry<Pending>>,
    executor: Arc<dyn Execute>,
    m: Arc<BatchMetrics>,
) -> (usize, Duration) {
    let rows = batch.iter().map(|e| e.rows).sum();
    let deadline = batch.iter().filter_map(|e| e.payload.deadline).min();
    let start = Instant::now();
    let sent = start.into_std();
    let parts: Vec<Pending> = batch
        .into_iter()
        .map(|e| {
            let mut p = e.payload;
            p.waited = sent.saturating_duration_since(e.enqueued);
            p
        })
        .collect();
    execute(parts, &*executor, deadline).await;
    let took = start.elapsed();
    m.executed(took);
    (rows, took)
}

/// Sends one merged request; on a failure that may be one item's fault, bisects.
fn execute<'a>(
    parts: Vec<Pending>,
    executor: &'a dyn Execute,
    deadline: Option<Instant>,
) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
    Box::pin(async move {
        let items: Vec<&Item> = parts.iter().map(|p| &p.item).collect();
        let head = &parts[0];
        // Fresh ids for every attempt, so a half's reply can never pass for another's.
        let row_ids = head
            .row_id
            .as_deref()
            .filter(|_| head.item.takes_row_ids())
            .map(|name| RowIds {
                name,
                first: RowIds::fresh_first(items.iter().map(|i| i.rows).sum()),
            });
        let body = codec::merge(&items, row_ids);
        let links: Vec<SpanContext> = parts.iter().filter_map(|p| p.trace).collect();
        let result = send(
            executor,
            (&head.upstream, &head.path),
            body,
            &links,
            deadline,
        )
        .await;
        match result {
            Ok((status, reply)) if status.is_success() => {
                match codec::split_payload(&items, &reply, row_ids) {
                    Ok(bodies) => {
                        let batch_rows = items.iter().map(|i| i.rows).sum();
                        for (p, payload) in parts.into_iter().zip(bodies) {
                            let _ = p.reply.send(Ok(Delivered {
                                payload,
                                waited: p.waited,
                                batch_rows,
                            }));
                        }
                    }
                    Err(e) => fail_all(parts, || BatchError::BadReply(e.0.clone())),
                }
            }
            Ok((status, _)) if parts.len() > 1 && could_be_one_item(status) => {
                if past(deadline) {
                    return fail_all(parts, || BatchError::Expired);
                }
                // Halves run side by side: the good half is answered as soon as it can be.
                let mut left = parts;
                let right = left.split_off(left.len() / 2);
                tokio::join!(
                    execute(left, executor, deadline),
                    execute(right, executor, deadline)
                );
            }
            Ok((status, reply)) => fail_all(parts, || BatchError::Backend {
                status,
                body: reply.body.clone(),
            }),
            Err(e) => fail_all(parts, || e.clone()),
        }
    })
}

fn fail_all(parts: Vec<Pending>, err: impl Fn() -> BatchError) {
    for p in parts {
        let _ = p.reply.send(Err(err()));
    }
}

fn past(deadline: Option<Instant>) -> bool {
    deadline.is_some_and(|d| d <= Instant::now())
}

/// Statuses a single bad item can cause for its whole batch.
fn could_be_one_item(status: StatusCode) -> bool {
    matches!(status.as_u16(), 400 | 422 | 500)
}

/// One call to the executor, bounded by the batch's earliest deadline.
async fn send(
    executor: &dyn Execute,
    (up, path): (&Upstream, &str),
    body: Payload,
    links: &[SpanContext],
    deadline: Option<Instant>,
) -> Result<(StatusCode, Payload), BatchError> {
    let call = executor.execute(up, path, body, links);
    let deadline = deadline.unwrap_or_else(|| Instant::now() + NO_DEADLINE_LIMIT);
    tokio::time::timeout_at(deadline, call)
        .await
        .unwrap_or(Err(BatchError::Expired))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::fake::FakeExecutor;
    use crate::metrics::Metrics;

    fn limits(max_delay_ms: u64) -> BatchLimits {
        BatchLimits {
            max_batch_size: 8,
            max_delay: Some(Duration::from_millis(max_delay_ms)).filter(|d| !d.is_zero()),
            max_queue: 16,
            queue_timeout: None,
            max_inflight: 1,
            classes: Arc::from([]),
            default_class: 0,
        }
    }

    fn spawn(l: BatchLimits, exec: Arc<FakeExecutor>) -> Batcher {
        let m = Metrics::new().batch(&Arc::from("r"), &Arc::from("v"));
        Batcher::spawn(l, exec, m)
    }

    fn submission(instance: &str, deadline: Option<Instant>) -> Submission {
        let body = serde_json::json!({ "instances": [instance] }).to_string();
        Submission {
            item: codec::parse_v1(body.as_bytes()).ok().unwrap(),
            upstream: Upstream {
                scheme: http::uri::Scheme::HTTP,
                authority: http::uri::Authority::from_static("127.0.0.1:1"),
                protocol: crate::addr::Protocol::Http1,
            },
            path: "/v1/models/m:predict".into(),
            deadline,
            queue_deadline: None,
            row_id: None,
            class: 0,
            trace: None,
        }
    }

    fn prediction(reply: &Reply) -> String {
        let body = &reply.as_ref().expect("rows").payload;
        let v: serde_json::Value = serde_json::from_slice(&body.body).unwrap();
        v["predictions"][0].as_str().unwrap().to_string()
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_requests_wait_max_delay_then_share_one_call() {
        let exec = Arc::new(FakeExecutor::default());
        let b = spawn(limits(5), exec.clone());
        let start = Instant::now();
        let (x, y, z) = tokio::join!(
            b.submit(submission("x", None)),
            b.submit(submission("y", None)),
            b.submit(submission("z", None)),
        );
        assert_eq!(
            start.elapsed(),
            Duration::from_millis(5),
            "flushed at max_delay"
        );
        assert_eq!(exec.batches(), vec![3]);
        // Each caller gets its own row back, never another's.
        assert_eq!(
            [prediction(&x), prediction(&y), prediction(&z)],
            ["x", "y", "z"]
        );
    }

    /// 16 closed-loop clients, each coming back 1 ms after its answer, against an
    /// executor that costs 5 ms + 0.5 ms per row. The first client arrives alone and
    /// is sent alone; the other 15 queue behind it. From then on every batch carries
    /// all 16 (the last, 15, is what is left): the batch that queued waits for the
    /// callers of the one that finished.
    #[tokio::test(start_paused = true)]
    async fn a_closed_loop_population_converges_to_one_batch() {
        let exec = FakeExecutor::costing(Duration::from_millis(5), Duration::from_micros(500));
        let mut l = limits(0);
        (l.max_batch_size, l.max_queue) = (64, 64);
        let b = Arc::new(spawn(l, exec.clone()));
        let mut clients = tokio::task::JoinSet::new();
        for c in 0..16 {
            let b = b.clone();
            clients.spawn(async move {
                if c > 0 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                for _ in 0..10 {
                    let reply = b.submit(submission(&format!("c{c}"), None)).await;
                    assert_eq!(prediction(&reply), format!("c{c}"));
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            });
        }
        while let Some(done) = clients.join_next().await {
            done.unwrap();
        }
        let batches = exec.batches();
        assert_eq!(batches.iter().sum::<usize>(), 160);
        assert_eq!(batches.len(), 11, "{batches:?}");
        assert!(batches[1..10].iter().all(|&n| n == 16), "{batches:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn one_bad_item_fails_alone_by_bisection() {
        let exec = Arc::new(FakeExecutor::default());
        let b = spawn(limits(1), exec.clone());
        let (a, bad, c, d) = tokio::join!(
            b.submit(submission("a", None)),
            b.submit(submission("bad", None)),
            b.submit(submission("c", None)),
            b.submit(submission("d", None)),
        );
        assert_eq!(
            [prediction(&a), prediction(&c), prediction(&d)],
            ["a", "c", "d"]
        );
        match bad {
            Err(BatchError::Backend { status, body }) => {
                assert_eq!(status, StatusCode::BAD_REQUEST);
                assert!(String::from_utf8_lossy(&body).contains("bad instance"));
            }
            other => panic!("expected the executor's 400, got {other:?}"),
        }
        // 4 fails; its halves run; the good half answers, the bad half splits again.
        let mut calls = exec.batches();
        calls.sort();
        assert_eq!(calls, vec![1, 1, 2, 2, 4]);
    }

    #[tokio::test(start_paused = true)]
    async fn callers_that_left_a_full_queue_leave_room_for_the_next() {
        let (exec, gate) = FakeExecutor::gated();
        let b = spawn(limits(0), exec.clone());
        let first = tokio::spawn({
            let b = b.clone();
            async move { b.submit(submission("first", None)).await }
        });
        exec.wait_calls(1).await;
        // The queue (16) fills with callers that then give up.
        let waiting: Vec<_> = (0..16)
            .map(|i| {
                let b = b.clone();
                tokio::spawn(async move { b.submit(submission(&format!("gone{i}"), None)).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(1)).await;
        for w in &waiting {
            w.abort();
        }
        for w in waiting {
            let _ = w.await;
        }
        let next = tokio::spawn({
            let b = b.clone();
            async move { b.submit(submission("next", None)).await }
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        gate.add_permits(2);
        assert_eq!(prediction(&first.await.unwrap()), "first");
        let next = next.await.unwrap();
        assert!(
            next.is_ok(),
            "refused while the queue held only departed callers: {next:?}"
        );
        assert_eq!(prediction(&next), "next");
        assert_eq!(exec.batches(), vec![1, 1], "no departed caller was sent");
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_whose_deadline_passes_in_the_queue_is_expired_and_never_sent() {
        let (exec, gate) = FakeExecutor::gated();
        let b = spawn(limits(0), exec.clone());
        // The only executor slot is taken by a held batch.
        let first = tokio::spawn({
            let b = b.clone();
            async move { b.submit(submission("first", None)).await }
        });
        exec.wait_calls(1).await;
        let late = b
            .submit(submission(
                "late",
                Some(Instant::now() + Duration::from_millis(10)),
            ))
            .await;
        assert!(matches!(late, Err(BatchError::Expired)), "{late:?}");
        gate.add_permits(1);
        assert_eq!(prediction(&first.await.unwrap()), "first");
        assert_eq!(
            exec.batches(),
            vec![1],
            "the expired request was never sent"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn new_limits_apply_to_the_next_batch() {
        let exec = Arc::new(FakeExecutor::default());
        let b = spawn(limits(0), exec.clone());
        b.set_limits(limits(20));
        let start = Instant::now();
        let _ = b.submit(submission("x", None)).await;
        assert_eq!(start.elapsed(), Duration::from_millis(20));
    }

    #[tokio::test(start_paused = true)]
    async fn the_task_ends_after_its_handles_are_gone_and_its_queue_drains() {
        let (exec, gate) = FakeExecutor::gated();
        let b = spawn(limits(0), exec.clone());
        let stopped = b.stopped();
        let pending = tokio::spawn({
            let b = b.clone();
            async move { b.submit(submission("held", None)).await }
        });
        exec.wait_calls(1).await;
        drop(b);
        tokio::pin!(stopped);
        assert!(
            tokio::time::timeout(Duration::from_secs(60), &mut stopped)
                .await
                .is_err(),
            "the task must not end while it holds a request"
        );
        gate.add_permits(1);
        assert_eq!(prediction(&pending.await.unwrap()), "held");
        stopped.await;
    }

    /// With the executor busy and the queue full of low-priority work, a high-priority
    /// arrival displaces the newest low request (503, preempted), seeds the very next
    /// batch, and the batch is filled with the oldest low requests.
    #[tokio::test(start_paused = true)]
    async fn a_high_priority_request_goes_in_the_next_batch_and_sheds_low_work() {
        use crate::batch::queue::ClassLimits;
        let class = |name: &str, sheddable| ClassLimits {
            name: name.into(),
            max_queue: 6,
            queue_timeout: None,
            sheddable,
        };
        let l = BatchLimits {
            max_batch_size: 4,
            max_queue: 6,
            classes: Arc::from([class("high", false), class("low", true)]),
            default_class: 1,
            ..limits(0)
        };
        let (exec, gate) = FakeExecutor::gated();
        let b = spawn(l, exec.clone());
        let send = |name: String, class: usize| {
            let b = b.clone();
            tokio::spawn(async move {
                let mut s = submission(&name, None);
                s.class = class;
                b.submit(s).await
            })
        };
        let first = send("first".into(), 1);
        exec.wait_calls(1).await;
        let lows: Vec<_> = (0..6).map(|i| send(format!("low{i}"), 1)).collect();
        tokio::time::sleep(Duration::from_millis(1)).await;
        let high = send("high".into(), 0);
        // The newest low request is shed at once, before any batch runs.
        let mut waiting = lows;
        let shed = waiting.pop().unwrap().await.unwrap();
        assert!(matches!(shed, Err(BatchError::Preempted)), "{shed:?}");
        gate.add_permits(1);
        assert_eq!(prediction(&first.await.unwrap()), "first");
        // The next batch: high first, backfilled with the three oldest lows.
        exec.wait_calls(2).await;
        gate.add_permits(1);
        assert_eq!(prediction(&high.await.unwrap()), "high");
        for (i, w) in waiting.drain(..3).enumerate() {
            assert_eq!(prediction(&w.await.unwrap()), format!("low{i}"));
        }
        gate.add_permits(1);
        for (i, w) in waiting.into_iter().enumerate() {
            assert_eq!(prediction(&w.await.unwrap()), format!("low{}", i + 3));
        }
        assert_eq!(exec.batches(), vec![1, 4, 2]);
    }
}
