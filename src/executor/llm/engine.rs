//! The generation loop: one thread per LLM owns the model, the scheduler's decisions
//! and every running sequence's cache, and runs step after step while there is work.
//!
//! The HTTP side submits a tokenized prompt and gets a channel of [`Event`]s; whether
//! it was taken or refused (queue full, too large) is known at once. A caller that goes
//! away drops its receiver, and the loop sees the closed channel before the next step
//! and takes the sequence out, so nothing is reserved on a caller's behalf past its
//! `Drop`. A panic in model code fails the step's sequences (500) and the loop lives on.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use tokio::time::Instant;

use candle_core::Tensor;
use tokio::sync::mpsc;

use super::LlmModel;
use super::gemma::{Chunk, KvCache, Want};
use super::sample::{self, Rng, Sampling};
use super::schedule::{Ask, Class, Limits, Refused, Scheduler, Work};
use crate::metrics::{LlmMetrics, ModelLlmMetrics};

/// What a generation asks for, past its prompt.
#[derive(Debug, Clone)]
pub struct Params {
    pub sampling: Sampling,
    pub max_new: usize,
    /// Top alternatives per generated token; `None`: no log-probabilities.
    pub logprobs: Option<usize>,
    /// Log-probabilities of the prompt's own tokens too (`echo` with `logprobs`).
    pub prompt_logprobs: bool,
    pub class: Class,
    pub deadline: Option<Instant>,
}

/// A token and, when asked, its log-probability and the best alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenOut {
    pub id: u32,
    pub logprob: Option<f32>,
    pub top: Vec<(u32, f32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// An end-of-sequence token (not sent as text).
    Stop,
    Length,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GenError {
    #[error("the request's deadline passed while it waited to start")]
    Deadline,
    #[error("displaced from the full queue by a request of a higher priority class")]
    Displaced,
    #[error("the model failed on this request (internal error, logged)")]
    Model,
    #[error("the model is shutting down")]
    Stopped,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The prompt's tokens with their log-probabilities (the first has none).
    Prompt(Vec<TokenOut>),
    Token(TokenOut),
    Done(Finish),
    Failed(GenError),
}

struct Pending {
    prompt: Vec<u32>,
    params: Params,
    tx: mpsc::UnboundedSender<Event>,
    arrived: Instant,
}

struct Seq {
    pending: Pending,
    cache: KvCache,
    rng: Rng,
    generated: usize,
    /// The token to feed at the next decode step.
    next: Option<u32>,
    last_token_at: Option<Instant>,
}

struct State {
    sched: Scheduler,
    inbox: HashMap<u64, Pending>,
    stopping: bool,
}

pub struct Engine {
    model: Arc<LlmModel>,
    shared: Arc<(Mutex<State>, Condvar)>,
    next_id: AtomicU64,
}

/// Stops the loop when the last handle to the engine is dropped.
impl Drop for Engine {
    fn drop(&mut self) {
        let (lock, cv) = &*self.shared;
        crate::sync::lock(lock).stopping = true;
        cv.notify_all();
    }
}

impl Engine {
    pub fn start(
        model: Arc<LlmModel>,
        limits: Limits,
        pool: Arc<rayon::ThreadPool>,
        metrics: LlmMetrics,
    ) -> std::io::Result<Engine> {
        let shared = Arc::new((
            Mutex::new(State {
                sched: Scheduler::new(limits),
                inbox: HashMap::new(),
                stopping: false,
            }),
            Condvar::new(),
        ));
        let (m, s) = (model.clone(), shared.clone());
        std::thread::Builder::new()
            .name(format!("braid-llm-{}", model.name))
            .spawn({
                let metrics = metrics.model(&model.name);
                move || Loop::new(m, s, pool, metrics).run()
            })?;
        Ok(Engine {
            model,
            shared,
            next_id: AtomicU64::new(1),
        })
    }

    pub fn model(&self) -> &Arc<LlmModel> {
        &self.model
    }

    pub fn limits(&self) -> Limits {
        self.lock().sched.limits.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        crate::sync::lock(&self.shared.0)
    }

    /// Queues a generation; its events arrive on the receiver.
    pub fn submit(
        &self,
        prompt: Vec<u32>,
        params: Params,
    ) -> Result<mpsc::UnboundedReceiver<Event>, Refused> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        let ask = Ask {
            id,
            prompt: prompt.len(),
            max_new: params.max_new,
            class: params.class,
            deadline: params.deadline,
        };
        let mut st = self.lock();
        if st.stopping {
            let _ = tx.send(Event::Failed(GenError::Stopped));
            return Ok(rx);
        }
        st.sched.submit(ask)?;
        st.inbox.insert(
            id,
            Pending {
                prompt,
                params,
                tx,
                arrived: Instant::now(),
            },
        );
        drop(st);
        self.shared.1.notify_all();
        Ok(rx)
    }
}

/// The loop's own state (only its thread touches it).
struct Loop {
    model: Arc<LlmModel>,
    shared: Arc<(Mutex<State>, Condvar)>,
    pool: Arc<rayon::ThreadPool>,
    metrics: ModelLlmMetrics,
    seqs: HashMap<u64, Seq>,
}

impl Loop {
    fn new(
        model: Arc<LlmModel>,
        shared: Arc<(Mutex<State>, Condvar)>,
        pool: Arc<rayon::ThreadPool>,
        metrics: ModelLlmMetrics,
    ) -> Loop {
        Loop {
            model,
            shared,
            pool,
            metrics,
            seqs: HashMap::new(),
        }
    }

    fn run(mut self) {
        let name = self.model.name.clone();
        loop {
            let (plan, admitted, gone_waiting) = {
                let (lock, cv) = &*self.shared;
                let mut st = crate::sync::lock(lock);
                while st.sched.is_idle() && !st.stopping {
                    self.metrics.occupancy(0, 0, 0.0);
                    st = cv.wait(st).unwrap_or_else(|e| e.into_inner());
                }
                if st.stopping {
                    for (_, p) in st.inbox.drain() {
                        let _ = p.tx.send(Event::Failed(GenError::Stopped));
                    }
                    for (_, s) in self.seqs.drain() {
                        let _ = s.pending.tx.send(Event::Failed(GenError::Stopped));
                    }
                    return;
                }
                // Callers that left: out before the plan, waiting or running.
                let gone: Vec<u64> = st
                    .inbox
                    .iter()
                    .filter(|(_, p)| p.tx.is_closed())
                    .map(|(&id, _)| id)
                    .chain(
                        self.seqs
                            .iter()
                            .filter(|(_, s)| s.pending.tx.is_closed())
                            .map(|(&id, _)| id),
                    )
                    .collect();
                for &id in &gone {
                    st.sched.remove(id);
                    if let Some(s) = self.seqs.remove(&id) {
                        self.metrics.finished("abort", s.pending.arrived.elapsed());
                    }
                }
                let gone_waiting: Vec<Pending> =
                    gone.iter().filter_map(|id| st.inbox.remove(id)).collect();
                let plan = st.sched.plan(Instant::now());
                for (id, err) in plan
                    .expired
                    .iter()
                    .map(|&id| (id, GenError::Deadline))
                    .chain(plan.displaced.iter().map(|&id| (id, GenError::Displaced)))
                {
                    if let Some(p) = st.inbox.remove(&id) {
                        let _ = p.tx.send(Event::Failed(err));
                    }
                }
                let admitted: Vec<(u64, Pending)> = plan
                    .admitted
                    .iter()
                    .filter_map(|id| st.inbox.remove(id).map(|p| (*id, p)))
                    .collect();
                // Counted running from admission: the step below sends the first token
                // (and so the answer's head) before it ends and publishes again.
                self.publish(&st.sched);
                (plan, admitted, gone_waiting)
            };
            for p in gone_waiting {
                self.metrics.finished("abort", p.arrived.elapsed());
            }
            for (id, p) in admitted {
                self.metrics.admitted(p.arrived.elapsed());
                let cap = p.prompt.len() + p.params.max_new;
                match KvCache::new(&self.model.gemma, cap) {
                    Ok(cache) => {
                        let rng = Rng::new(p.params.sampling.seed);
                        self.seqs.insert(
                            id,
                            Seq {
                                pending: p,
                                cache,
                                rng,
                                generated: 0,
                                next: None,
                                last_token_at: None,
                            },
                        );
                    }
                    Err(e) => {
                        tracing::error!(model = %name, "allocating a KV cache failed: {e}");
                        self.forget(id);
                        let _ = p.tx.send(Event::Failed(GenError::Model));
                    }
                }
            }
            let work: Vec<(u64, Work)> = plan
                .work
                .into_iter()
                .filter(|(id, _)| self.seqs.contains_key(id))
                .collect();
            self.step(&work);
            let st = &mut *crate::sync::lock(&self.shared.0);
            for &(id, w) in &work {
                st.sched.done(id, w);
            }
            self.publish(&st.sched);
        }
    }

    /// Takes a sequence out of the scheduler.
    /// Takes a sequence out of the scheduler and the gauges, before its caller hears
    /// it is over: whoever reads the metrics after its answer sees it gone.
    fn forget(&mut self, id: u64) -> Option<Seq> {
        let seq = self.seqs.remove(&id);
        let mut st = crate::sync::lock(&self.shared.0);
        st.sched.remove(id);
        self.publish(&st.sched);
        seq
    }

    /// The occupancy gauges from the scheduler's state.
    fn publish(&self, sched: &Scheduler) {
        let kv = sched.kv_used() as f64 / sched.limits.kv_tokens.max(1) as f64;
        self.metrics.occupancy(sched.running(), sched.waiting(), kv);
    }

    fn step(&mut self, work: &[(u64, Work)]) {
        if work.is_empty() {
            return;
        }
        self.metrics.step(work.len());
        // Inputs per sequence, in `work`'s order.
        let mut inputs: Vec<Vec<u32>> = Vec::with_capacity(work.len());
        let mut wants = Vec::with_capacity(work.len());
        for (id, w) in work {
            let s = &self.seqs[id];
            match *w {
                Work::Prefill { from, to } => {
                    inputs.push(s.pending.prompt[from..to].to_vec());
                    let last = to == s.pending.prompt.len();
                    wants.push(if s.pending.params.prompt_logprobs {
                        Want::All
                    } else if last {
                        Want::Last
                    } else {
                        Want::None
                    });
                }
                Work::Decode => {
                    inputs.push(s.next.into_iter().collect());
                    wants.push(Want::Last);
                }
            }
        }
        let model = self.model.clone();
        let result = {
            let pool = &self.pool;
            let mut by_id: HashMap<u64, &mut Seq> = self
                .seqs
                .iter_mut()
                .filter(|(id, _)| work.iter().any(|(w, _)| w == *id))
                .map(|(id, s)| (*id, s))
                .collect();
            let mut chunks: Vec<Chunk<'_>> = work
                .iter()
                .zip(&inputs)
                .zip(&wants)
                .filter_map(|(((id, _), tokens), &want)| {
                    let s = by_id.remove(id)?;
                    Some(Chunk {
                        tokens,
                        cache: &mut s.cache,
                        want,
                    })
                })
                .collect();
            std::panic::catch_unwind(AssertUnwindSafe(|| {
                pool.install(|| model.gemma.step(&mut chunks))
            }))
        };
        let logits = match result {
            Ok(Ok(l)) => l,
            Ok(Err(e)) => {
                tracing::error!(model = %self.model.name, "a decoding step failed: {e}");
                return self.fail(work);
            }
            Err(_) => {
                tracing::error!(model = %self.model.name, "model code panicked in a decoding step; answered 500");
                return self.fail(work);
            }
        };
        let now = Instant::now();
        for (((id, w), logits), input) in work.iter().zip(logits).zip(&inputs) {
            let finished = self.emit(*id, *w, logits, input, now);
            if let Some(reason) = finished
                && let Some(s) = self.forget(*id)
            {
                let label = if reason == Finish::Stop {
                    "stop"
                } else {
                    "length"
                };
                self.metrics.finished(label, s.pending.arrived.elapsed());
                let _ = s.pending.tx.send(Event::Done(reason));
            }
        }
    }

    /// Sends what one sequence's share of a step produced; `Some` when it is done.
    fn emit(
        &mut self,
        id: u64,
        w: Work,
        logits: Option<Tensor>,
        input: &[u32],
        now: Instant,
    ) -> Option<Finish> {
        let vocab = self.model.gemma.config.vocab;
        let s = self.seqs.get_mut(&id)?;
        let rows: Vec<Vec<f32>> = match logits.map(|t| t.to_vec2::<f32>()) {
            None => Vec::new(),
            Some(Ok(r)) => r,
            Some(Err(e)) => {
                tracing::error!(model = %self.model.name, "reading logits failed: {e}");
                if let Some(s) = self.forget(id) {
                    self.metrics.finished("error", s.pending.arrived.elapsed());
                    let _ = s.pending.tx.send(Event::Failed(GenError::Model));
                }
                return None;
            }
        };
        let params = &s.pending.params;
        let top = params.logprobs.unwrap_or(0);
        if let Work::Prefill { from, to } = w {
            self.metrics.prompt_tokens(to - from);
            if params.prompt_logprobs {
                // Row i predicts prompt token from + i + 1.
                let mut out = Vec::with_capacity(to - from);
                if from == 0 {
                    out.push(TokenOut {
                        id: input[0],
                        logprob: None,
                        top: Vec::new(),
                    });
                }
                for (i, row) in rows.iter().enumerate() {
                    if let Some(&t) = s.pending.prompt.get(from + i + 1) {
                        let (lp, alts) = sample::logprobs(row, t, top);
                        out.push(TokenOut {
                            id: t,
                            logprob: Some(lp),
                            top: alts,
                        });
                    }
                }
                let _ = s.pending.tx.send(Event::Prompt(out));
            }
            if to < s.pending.prompt.len() {
                return None;
            }
            if params.max_new == 0 {
                // Echo scoring a prompt: nothing to generate.
                return Some(Finish::Length);
            }
        }
        let row = rows.last()?;
        debug_assert_eq!(row.len(), vocab);
        let token = sample::sample(row, &params.sampling, &mut s.rng);
        let out = match params.logprobs {
            Some(n) => {
                let (lp, alts) = sample::logprobs(row, token, n);
                TokenOut {
                    id: token,
                    logprob: Some(lp),
                    top: alts,
                }
            }
            None => TokenOut {
                id: token,
                logprob: None,
                top: Vec::new(),
            },
        };
        if s.last_token_at.is_none() {
            self.metrics.first_token(now - s.pending.arrived);
        }
        self.metrics.generated(s.last_token_at.map(|t| now - t));
        s.last_token_at = Some(now);
        s.generated += 1;
        if self.model.vocab.stops.contains(&token) {
            return Some(Finish::Stop);
        }
        let _ = s.pending.tx.send(Event::Token(out));
        s.next = Some(token);
        if s.generated >= s.pending.params.max_new {
            return Some(Finish::Length);
        }
        None
    }

    fn fail(&mut self, work: &[(u64, Work)]) {
        for (id, _) in work {
            if let Some(s) = self.forget(*id) {
                self.metrics.finished("error", s.pending.arrived.elapsed());
                let _ = s.pending.tx.send(Event::Failed(GenError::Model));
            }
        }
    }
}

/// How long a client is told to wait before retrying a refused generation.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);
