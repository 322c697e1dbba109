//! The batcher for one (route, variant): a cloneable handle over a channel, and a task
//! that owns the pure `Queue` and only moves messages: submissions in, batches out to
//! the executor, each request's share of the reply back on its oneshot.
//!
//! Per-item isolation: a batch that fails with a status one bad item could cause
//! (400, 422, 500) is split in halves and each half retried, down to single items, so
//! only the poisoned requests fail. A reply that cannot be split safely fails the
//! whole batch with 502: no request ever gets another's rows.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::codec::{self, Item, Protocol, RowIds};
use super::queue::{BatchLimits, Entry, Next, Queue};
use crate::config::Store;
use crate::config::schema::Upstream;
use crate::metrics::{BatchMetrics, Metrics};
use crate::upstream::{SendError, Upstreams};

/// How a queued request ended, when it did not get its rows.
#[derive(Debug, Clone)]
pub enum BatchError {
    /// The queue was full: 429 with Retry-After.
    QueueFull,
    /// Its deadline passed before or during execution: 504.
    Expired,
    /// Its own failure, isolated by bisection: the executor's status and body.
    Backend { status: StatusCode, body: Bytes },
    /// The executor's reply could not be split safely: 502.
    BadReply(String),
    /// The executor could not be reached or gave no reply: 503 with Retry-After.
    Unreachable(String),
}

pub type Reply = Result<Bytes, BatchError>;

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
}

type Msg = (Submission, oneshot::Sender<Reply>);

/// Largest executor reply accepted for a batch.
const MAX_REPLY_BYTES: usize = 256 * 1024 * 1024;

#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::UnboundedSender<Msg>,
}

impl Batcher {
    /// Starts the batcher for (route, variant). It follows the config: limits from a
    /// reload apply to batches formed from then on, and queued requests stay queued.
    pub fn spawn(
        limits: BatchLimits,
        store: Arc<Store>,
        upstreams: Upstreams,
        metrics: Arc<Metrics>,
        labels: (Arc<str>, Arc<str>),
    ) -> Batcher {
        let (tx, rx) = mpsc::unbounded_channel();
        let m = metrics.batch(&labels.0, &labels.1);
        let follow = Follow { store, labels };
        tokio::spawn(run(
            rx,
            Queue::new(limits),
            follow,
            Arc::new(upstreams),
            Arc::new(m),
        ));
        Batcher { tx }
    }

    pub async fn submit(&self, s: Submission) -> Reply {
        let (reply, rx) = oneshot::channel();
        if self.tx.send((s, reply)).is_err() {
            return Err(BatchError::Unreachable("batcher stopped".into()));
        }
        rx.await
            .unwrap_or_else(|_| Err(BatchError::Unreachable("batcher stopped".into())))
    }
}

struct Pending {
    item: Item,
    upstream: Upstream,
    path: String,
    deadline: Option<Instant>,
    row_id: Option<Arc<str>>,
    reply: oneshot::Sender<Reply>,
}

/// Where a batcher reads its limits after a reload.
struct Follow {
    store: Arc<Store>,
    labels: (Arc<str>, Arc<str>),
}

impl Follow {
    /// The limits the config in force gives this (route, variant), if it still batches.
    fn limits(&self) -> Option<BatchLimits> {
        let snap = self.store.load()?;
        let route = snap
            .routes
            .routes
            .iter()
            .find(|r| r.name == self.labels.0)?;
        route
            .variants
            .iter()
            .any(|v| v.name == self.labels.1)
            .then_some(route.batching?)
    }
}

async fn run(
    mut rx: mpsc::UnboundedReceiver<Msg>,
    mut q: Queue<Pending>,
    follow: Follow,
    upstreams: Arc<Upstreams>,
    m: Arc<BatchMetrics>,
) {
    let mut changes = follow.store.changes();
    let mut inflight: JoinSet<()> = JoinSet::new();
    let mut open = true;
    loop {
        let now = Instant::now();
        for e in q.expire(now.into_std()) {
            m.dropped("deadline");
            let _ = e.payload.reply.send(Err(BatchError::Expired));
        }
        for _ in q.take_where(|e| e.payload.reply.is_closed()) {
            m.dropped("cancelled");
        }
        let wake = loop {
            match q.next(now.into_std(), inflight.len()) {
                Next::Dispatch(reason) => {
                    let batch: Vec<Entry<Pending>> = q.take_batch();
                    // A caller that left while queued is never sent.
                    let (batch, gone): (Vec<_>, Vec<_>) = batch
                        .into_iter()
                        .partition(|e| !e.payload.reply.is_closed());
                    gone.iter().for_each(|_| m.dropped("cancelled"));
                    if batch.is_empty() {
                        continue;
                    }
                    m.flushed(
                        reason.label(),
                        batch.iter().map(|e| e.rows).sum(),
                        batch.iter().map(|e| now.into_std() - e.enqueued),
                    );
                    inflight.spawn(dispatch(batch, upstreams.clone(), m.clone()));
                }
                Next::WaitUntil(w) => break w,
            }
        };
        m.depth(q.len());
        if !open && q.is_empty() && inflight.is_empty() {
            return;
        }
        let wake = [wake, q.earliest_deadline()]
            .into_iter()
            .flatten()
            .min()
            .map(Instant::from_std);
        tokio::select! {
            Ok(()) = changes.changed() => {
                // A route that stopped batching keeps the old limits for what is queued.
                if let Some(l) = follow.limits() {
                    q.limits = l;
                }
            }
            msg = rx.recv(), if open => match msg {
                None => open = false,
                Some((s, reply)) => {
                    let entry = Entry {
                        key: format!(
                            "{}{}|{}|{}",
                            s.upstream.authority,
                            s.path,
                            s.row_id.as_deref().unwrap_or(""),
                            s.item.key
                        ),
                        rows: s.item.rows,
                        enqueued: now.into_std(),
                        deadline: [s.deadline, s.queue_deadline].into_iter().flatten().min().map(Instant::into_std),
                        payload: Pending { item: s.item, upstream: s.upstream, path: s.path, deadline: s.deadline, row_id: s.row_id, reply },
                    };
                    if let Err(e) = q.push(entry) {
                        m.dropped("queue_full");
                        let _ = e.payload.reply.send(Err(BatchError::QueueFull));
                    }
                }
            },
            Some(_) = inflight.join_next(), if !inflight.is_empty() => {}
            _ = sleep_until(wake), if wake.is_some() => {}
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at).await;
    }
}

async fn dispatch(batch: Vec<Entry<Pending>>, upstreams: Arc<Upstreams>, m: Arc<BatchMetrics>) {
    let deadline = batch.iter().filter_map(|e| e.payload.deadline).min();
    let start = std::time::Instant::now();
    let parts: Vec<Pending> = batch.into_iter().map(|e| e.payload).collect();
    execute(parts, &upstreams, deadline).await;
    m.executed(start.elapsed());
}

/// Sends one merged request; on a failure that may be one item's fault, bisects.
fn execute<'a>(
    parts: Vec<Pending>,
    upstreams: &'a Upstreams,
    deadline: Option<Instant>,
) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
    Box::pin(async move {
        let items: Vec<&Item> = parts.iter().map(|p| &p.item).collect();
        let head = &parts[0];
        // Fresh ids for every attempt, so a half's reply can never pass for another's.
        let row_ids = head
            .row_id
            .as_deref()
            .filter(|_| head.item.protocol == Protocol::V2)
            .map(|name| RowIds {
                name,
                first: RowIds::fresh_first(items.iter().map(|i| i.rows).sum()),
            });
        let body = codec::merge(&items, row_ids);
        let result = send(upstreams, &head.upstream, &head.path, body, deadline).await;
        match result {
            Ok((status, reply)) if status.is_success() => {
                match codec::split(&items, &reply, row_ids) {
                    Ok(bodies) => {
                        for (p, b) in parts.into_iter().zip(bodies) {
                            let _ = p.reply.send(Ok(Bytes::from(b)));
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
                    execute(left, upstreams, deadline),
                    execute(right, upstreams, deadline)
                );
            }
            Ok((status, reply)) => fail_all(parts, || BatchError::Backend {
                status,
                body: reply.clone(),
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

async fn send(
    upstreams: &Upstreams,
    up: &Upstream,
    path: &str,
    body: Vec<u8>,
    deadline: Option<Instant>,
) -> Result<(StatusCode, Bytes), BatchError> {
    let uri = Uri::builder()
        .scheme(up.scheme.clone())
        .authority(up.authority.clone())
        .path_and_query(path)
        .build()
        .map_err(|e| BatchError::BadReply(format!("bad executor path: {e}")))?;
    let mut req = Request::new(Full::new(Bytes::from(body)));
    *req.method_mut() = Method::POST;
    *req.uri_mut() = uri;
    req.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    let call = async {
        // No reply at all (refused, reset, killed mid-batch) is unavailability (503,
        // retry later); a reply we cannot trust is a bad gateway (502).
        let resp = upstreams
            .send(up.protocol, req)
            .await
            .map_err(|e| match e {
                SendError::Connect(m) | SendError::Refused(m) | SendError::Other(m) => {
                    BatchError::Unreachable(m)
                }
            })?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_REPLY_BYTES)
            .collect()
            .await
            .map_err(|e| BatchError::BadReply(format!("reading executor reply: {e}")))?
            .to_bytes();
        Ok((status, body))
    };
    match deadline {
        Some(d) => tokio::time::timeout_at(d, call)
            .await
            .unwrap_or(Err(BatchError::Expired)),
        None => tokio::time::timeout(Duration::from_secs(300), call)
            .await
            .unwrap_or(Err(BatchError::Expired)),
    }
}
