//! Execution off the async runtime: each model has its own threads (one batch in
//! flight per thread) fed by a bounded queue, and its own compute pool
//! (`threads::compute_pool`) that each forward pass runs inside. The HTTP side only
//! enqueues and awaits a oneshot; a full queue is refused at once (503 with
//! Retry-After), and a job whose caller has gone away is dropped before its forward
//! pass.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use tokio::time::Instant;

use tokio::sync::oneshot;

use super::encoder::ModelError;
use super::model::{Model, Outputs};
use super::threads::compute_pool;
use crate::metrics::ExecutorMetrics;

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("model {0} is busy: its queue is full")]
    QueueFull(String),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("model {0} stopped")]
    Stopped(String),
    /// A bug in model code; the model thread survives it and takes the next job.
    #[error("model {0} failed on this request (internal error, logged)")]
    Panicked(String),
}

struct Job {
    texts: Vec<String>,
    enqueued: Instant,
    /// The same moment on the wall clock, for the `queue` phase of a trace.
    enqueued_at: std::time::SystemTime,
    reply: oneshot::Sender<Result<Outputs, ExecError>>,
}

/// A cloneable handle to a model's queue and threads.
#[derive(Clone)]
pub struct ModelHandle {
    pub model: Arc<Model>,
    tx: SyncSender<Job>,
    /// Jobs queued and not yet picked up, for the queue-depth gauge.
    depth: Arc<AtomicI64>,
    metrics: Arc<ExecutorMetrics>,
}

impl ModelHandle {
    /// Starts `threads` model threads sharing one compute pool of `compute_threads`
    /// workers (`None`: the process's compute thread count).
    pub fn spawn(
        model: Arc<Model>,
        threads: usize,
        compute_threads: Option<usize>,
        queue: usize,
        metrics: Arc<ExecutorMetrics>,
    ) -> std::io::Result<ModelHandle> {
        let pool = Arc::new(compute_pool(&model.name, compute_threads.unwrap_or(0))?);
        tracing::info!(model = %model.name, compute_threads = pool.current_num_threads(), "compute pool started");
        let (tx, rx) = sync_channel::<Job>(queue.max(1));
        let rx = Arc::new(Mutex::new(rx));
        let depth = Arc::new(AtomicI64::new(0));
        for i in 0..threads.max(1) {
            let (model, rx, depth, metrics, pool) = (
                model.clone(),
                rx.clone(),
                depth.clone(),
                metrics.clone(),
                pool.clone(),
            );
            std::thread::Builder::new()
                .name(format!("braid-model-{}-{i}", model.name))
                .spawn(move || run(model, pool, rx, depth, metrics))?;
        }
        Ok(ModelHandle {
            model,
            tx,
            depth,
            metrics,
        })
    }

    pub async fn infer(&self, texts: Vec<String>) -> Result<Outputs, ExecError> {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            texts,
            enqueued: Instant::now(),
            enqueued_at: std::time::SystemTime::now(),
            reply,
        };
        // Counted before the send, so a worker taking the job at once never sees the
        // depth below zero; taken back if the queue refuses it.
        let d = self.depth.fetch_add(1, Ordering::SeqCst) + 1;
        match self.tx.try_send(job) {
            Ok(()) => self.metrics.queue_depth(&self.model.name, d),
            Err(e) => {
                self.depth.fetch_sub(1, Ordering::SeqCst);
                return Err(match e {
                    TrySendError::Full(_) => ExecError::QueueFull(self.model.name.clone()),
                    TrySendError::Disconnected(_) => ExecError::Stopped(self.model.name.clone()),
                });
            }
        }
        rx.await
            .unwrap_or_else(|_| Err(ExecError::Stopped(self.model.name.clone())))
    }
}

fn run(
    model: Arc<Model>,
    pool: Arc<rayon::ThreadPool>,
    rx: Arc<Mutex<Receiver<Job>>>,
    depth: Arc<AtomicI64>,
    metrics: Arc<ExecutorMetrics>,
) {
    loop {
        // Hold the lock only to take one job, so sibling threads can take the next.
        let job = match crate::sync::lock(&rx).recv() {
            Ok(j) => j,
            Err(_) => return,
        };
        let d = depth.fetch_sub(1, Ordering::SeqCst) - 1;
        metrics.queue_depth(&model.name, d);
        if job.reply.is_closed() {
            metrics.cancelled(&model.name);
            continue;
        }
        metrics.queued(&model.name, job.enqueued.elapsed());
        let queued = crate::executor::encoder::Phase::since("queue", job.enqueued_at);
        let start = Instant::now();
        let texts: Vec<&str> = job.texts.iter().map(String::as_str).collect();
        // A panic in model code fails this job only; the thread lives on for the next.
        // The pass runs on a pool thread, so its matrix kernels split across the pool
        // from there rather than being handed from this thread op by op.
        let pass = || pool.install(|| model.infer(&texts));
        let mut result = match std::panic::catch_unwind(AssertUnwindSafe(pass)) {
            Ok(r) => r.map_err(ExecError::from),
            Err(_) => {
                tracing::error!(model = %model.name, "model code panicked; answered 500");
                Err(ExecError::Panicked(model.name.to_string()))
            }
        };
        if let Ok(out) = &mut result {
            out.embedding.phases.insert(0, queued);
            metrics.batch(
                &model.name,
                texts.len(),
                start.elapsed(),
                out.embedding.tokens_computed,
                out.embedding.tokens_real,
            );
        }
        let _ = job.reply.send(result);
    }
}
