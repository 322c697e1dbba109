//! The continuous-batching scheduler as plain state: no tokio, no model, so every
//! decision is unit-tested with made-up instants (the `batch/queue.rs` pattern).
//!
//! Policy, after TGI's queue and vLLM's scheduler:
//! - iteration level: a plan is made before every decoding step, so a request waiting
//!   when a step ends joins the very next one, and one that finished, was cancelled or
//!   passed its deadline leaves it;
//! - admission reserves a sequence's whole KV cache (prompt plus `max_tokens`) out of
//!   `kv_tokens`, so a running sequence never runs out and nothing is ever preempted;
//!   at most `max_seqs` run at once;
//! - the waiting queue is bounded (`max_waiting`, 429 beyond it) and has the Gateway
//!   API Inference Extension's classes: critical before standard before sheddable,
//!   each in arrival order; a full queue takes a higher class's arrival by dropping the
//!   newest sheddable waiter (answered 503), and a waiter past its deadline is taken
//!   out (504) before a plan admits anyone;
//! - admission is in that order and does not skip: when the head does not fit, nobody
//!   behind it is admitted ahead of it (a large request is not starved by small ones);
//! - each step has a token budget (`step_tokens`): every decoding sequence gets its one
//!   token first, and prompts are prefilled in chunks from what is left, oldest first,
//!   so a long prompt is spread over several steps instead of stalling every stream;
//! - a prompt's chunks fall on a fixed grid of `step_tokens` (`0..C`, `C..2C`, ...),
//!   whatever else the step holds: a chunk is taken whole or waits, and the oldest
//!   prompt always takes its next one (a step may then pass the budget by its decodes).
//!   Its attention is computed over the same rows whatever the load, so with the
//!   model's row-invariant kernels a greedy answer does not depend on the batch.

use std::collections::VecDeque;
use tokio::time::Instant;

/// Priority classes, highest first (the Inference Extension's criticality names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Class {
    Critical,
    Standard,
    Sheddable,
}

impl Class {
    pub const ALL: [Class; 3] = [Class::Critical, Class::Standard, Class::Sheddable];

    pub fn name(self) -> &'static str {
        match self {
            Class::Critical => "critical",
            Class::Standard => "standard",
            Class::Sheddable => "sheddable",
        }
    }

    pub fn parse(s: &str) -> Option<Class> {
        Class::ALL.into_iter().find(|c| c.name() == s)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub max_seqs: usize,
    pub kv_tokens: usize,
    pub step_tokens: usize,
    pub max_waiting: usize,
}

/// A sequence asking to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ask {
    pub id: u64,
    /// Prompt tokens to prefill.
    pub prompt: usize,
    /// Tokens it may generate.
    pub max_new: usize,
    pub class: Class,
    pub deadline: Option<Instant>,
}

impl Ask {
    fn reserve(&self) -> usize {
        self.prompt + self.max_new
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// It could never fit: prompt plus `max_tokens` exceed the whole KV budget (400).
    TooLarge { need: usize, budget: usize },
    /// The waiting queue is full (429).
    QueueFull,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Running {
    id: u64,
    prompt: usize,
    prefilled: usize,
    reserved: usize,
}

/// What one step computes for a sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// Prompt tokens `from..to`; `to == prompt` means its first token is sampled.
    Prefill { from: usize, to: usize },
    /// One generated token fed back.
    Decode,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Waiters past their deadline (504), and sheddable ones displaced (503).
    pub expired: Vec<u64>,
    pub displaced: Vec<u64>,
    /// Newly running: their caches are to be made.
    pub admitted: Vec<u64>,
    pub work: Vec<(u64, Work)>,
}

#[derive(Debug)]
pub struct Scheduler {
    pub limits: Limits,
    waiting: [VecDeque<Ask>; 3],
    running: Vec<Running>,
    kv_used: usize,
    /// Displaced by `submit` since the last plan.
    displaced: Vec<u64>,
}

impl Scheduler {
    pub fn new(limits: Limits) -> Scheduler {
        Scheduler {
            limits,
            waiting: Default::default(),
            running: Vec::new(),
            kv_used: 0,
            displaced: Vec::new(),
        }
    }

    pub fn waiting(&self) -> usize {
        self.waiting.iter().map(VecDeque::len).sum()
    }

    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// KV-cache tokens reserved by running sequences.
    pub fn kv_used(&self) -> usize {
        self.kv_used
    }

    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting() == 0 && self.displaced.is_empty()
    }

    pub fn submit(&mut self, ask: Ask) -> Result<(), Refused> {
        if ask.reserve() > self.limits.kv_tokens {
            return Err(Refused::TooLarge {
                need: ask.reserve(),
                budget: self.limits.kv_tokens,
            });
        }
        if self.waiting() >= self.limits.max_waiting {
            let lower = &mut self.waiting[Class::Sheddable as usize];
            if ask.class < Class::Sheddable && !lower.is_empty() {
                let out = lower.pop_back().expect("not empty");
                self.displaced.push(out.id);
            } else {
                return Err(Refused::QueueFull);
            }
        }
        self.waiting[ask.class as usize].push_back(ask);
        Ok(())
    }

    /// Takes a sequence out, waiting or running (finished, cancelled, failed).
    pub fn remove(&mut self, id: u64) {
        if let Some(i) = self.running.iter().position(|r| r.id == id) {
            let r = self.running.remove(i);
            self.kv_used -= r.reserved;
            return;
        }
        for q in &mut self.waiting {
            q.retain(|a| a.id != id);
        }
    }

    /// Records that a step computed `work` for `id`.
    pub fn done(&mut self, id: u64, work: Work) {
        if let (Some(r), Work::Prefill { to, .. }) =
            (self.running.iter_mut().find(|r| r.id == id), work)
        {
            r.prefilled = to;
        }
    }

    /// The next step's plan.
    pub fn plan(&mut self, now: Instant) -> Plan {
        let mut plan = Plan {
            displaced: std::mem::take(&mut self.displaced),
            ..Plan::default()
        };
        for q in &mut self.waiting {
            q.retain(|a| {
                let late = a.deadline.is_some_and(|d| d <= now);
                if late {
                    plan.expired.push(a.id);
                }
                !late
            });
        }
        'admit: while self.running.len() < self.limits.max_seqs {
            for q in &mut self.waiting {
                let Some(head) = q.front() else { continue };
                if self.kv_used + head.reserve() > self.limits.kv_tokens {
                    break 'admit;
                }
                let a = q.pop_front().expect("has a head");
                self.kv_used += a.reserve();
                plan.admitted.push(a.id);
                self.running.push(Running {
                    id: a.id,
                    prompt: a.prompt,
                    prefilled: 0,
                    reserved: a.reserve(),
                });
                continue 'admit;
            }
            break;
        }
        let mut budget = self.limits.step_tokens.max(1);
        for r in &self.running {
            if r.prefilled >= r.prompt {
                plan.work.push((r.id, Work::Decode));
                budget = budget.saturating_sub(1);
            }
        }
        let grid = self.limits.step_tokens.max(1);
        let mut first = true;
        for r in &self.running {
            if r.prefilled < r.prompt {
                // The next chunk on the grid, whole: the oldest prompt always takes
                // it, however many decode; the others only where it fits.
                let to = r.prompt.min((r.prefilled / grid + 1) * grid);
                let len = to - r.prefilled;
                if !first && len > budget {
                    break;
                }
                first = false;
                plan.work.push((
                    r.id,
                    Work::Prefill {
                        from: r.prefilled,
                        to,
                    },
                ));
                budget = budget.saturating_sub(len);
            }
        }
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limits() -> Limits {
        Limits {
            max_seqs: 2,
            kv_tokens: 100,
            step_tokens: 8,
            max_waiting: 3,
        }
    }

    fn ask(id: u64, prompt: usize, max_new: usize) -> Ask {
        Ask {
            id,
            prompt,
            max_new,
            class: Class::Standard,
            deadline: None,
        }
    }

    /// Runs a plan's work as a model step would.
    fn run(s: &mut Scheduler, plan: &Plan) {
        for &(id, w) in &plan.work {
            s.done(id, w);
        }
    }

    #[test]
    fn new_arrivals_join_the_next_step_and_prompts_are_chunked() {
        let mut s = Scheduler::new(limits());
        let t = Instant::now();
        s.submit(ask(1, 3, 10)).unwrap();
        let p = s.plan(t);
        assert_eq!(p.admitted, [1]);
        assert_eq!(p.work, [(1, Work::Prefill { from: 0, to: 3 })]);
        run(&mut s, &p);
        // Sequence 1 decodes; 2 arrives and is prefilled in the same step, in whole
        // chunks of the grid (8), however many decode beside it.
        s.submit(ask(2, 20, 5)).unwrap();
        let p = s.plan(t);
        assert_eq!(p.admitted, [2]);
        assert_eq!(
            p.work,
            [(1, Work::Decode), (2, Work::Prefill { from: 0, to: 8 })]
        );
        run(&mut s, &p);
        let p = s.plan(t);
        assert_eq!(
            p.work,
            [(1, Work::Decode), (2, Work::Prefill { from: 8, to: 16 })]
        );
        run(&mut s, &p);
        let p = s.plan(t);
        assert_eq!(
            p.work,
            [(1, Work::Decode), (2, Work::Prefill { from: 16, to: 20 })]
        );
        run(&mut s, &p);
        assert_eq!(s.plan(t).work, [(1, Work::Decode), (2, Work::Decode)]);
    }

    /// The chunks a prompt is prefilled in, with `others` decoding beside it and a
    /// second prompt arriving with it.
    fn chunks_of(prompt: usize, others: u64) -> Vec<(usize, usize)> {
        let mut s = Scheduler::new(Limits {
            max_seqs: 32,
            kv_tokens: 10_000,
            step_tokens: 8,
            max_waiting: 64,
        });
        let t = Instant::now();
        for id in 0..others {
            s.submit(ask(100 + id, 1, 50)).unwrap();
        }
        let p = s.plan(t);
        run(&mut s, &p);
        s.submit(ask(1, 11, 50)).unwrap();
        s.submit(ask(2, prompt, 5)).unwrap();
        let mut chunks = Vec::new();
        for _ in 0..64 {
            let p = s.plan(t);
            for &(id, w) in &p.work {
                if let (2, Work::Prefill { from, to }) = (id, w) {
                    chunks.push((from, to));
                }
            }
            run(&mut s, &p);
        }
        chunks
    }

    #[test]
    fn a_prompts_chunks_are_the_same_whatever_else_the_steps_hold() {
        for prompt in [1, 7, 8, 9, 23, 40] {
            let alone = chunks_of(prompt, 0);
            let grid: Vec<(usize, usize)> = (0..prompt.div_ceil(8))
                .map(|i| (i * 8, (i * 8 + 8).min(prompt)))
                .collect();
            assert_eq!(alone, grid, "prompt {prompt}");
            for others in [1, 3, 7, 12] {
                assert_eq!(
                    chunks_of(prompt, others),
                    grid,
                    "prompt {prompt}, {others} decoding"
                );
            }
        }
    }

    #[test]
    fn kv_budget_and_max_seqs_hold_admission_in_order() {
        let mut s = Scheduler::new(limits());
        let t = Instant::now();
        s.submit(ask(1, 10, 50)).unwrap(); // 60 of 100
        s.submit(ask(2, 10, 40)).unwrap(); // would be 110: waits
        s.submit(ask(3, 1, 1)).unwrap(); // fits, but may not pass 2
        assert_eq!(s.plan(t).admitted, [1]);
        assert_eq!((s.running(), s.waiting(), s.kv_used()), (1, 2, 60));
        s.remove(1);
        assert_eq!(s.plan(t).admitted, [2, 3]);
        // max_seqs = 2: a third waits even with room.
        s.submit(ask(4, 1, 1)).unwrap();
        assert!(s.plan(t).admitted.is_empty());
        assert_eq!(
            s.submit(ask(5, 60, 41)),
            Err(Refused::TooLarge {
                need: 101,
                budget: 100
            })
        );
    }

    #[test]
    fn cancelled_and_finished_sequences_leave_and_free_their_cache() {
        let mut s = Scheduler::new(limits());
        let t = Instant::now();
        s.submit(ask(1, 2, 8)).unwrap();
        s.submit(ask(2, 2, 8)).unwrap();
        s.submit(ask(3, 2, 8)).unwrap();
        let p = s.plan(t);
        assert_eq!(p.admitted, [1, 2]);
        s.remove(3); // a waiter whose client left
        s.remove(1); // a running one
        assert_eq!(s.kv_used(), 10);
        let p = s.plan(t);
        assert!(p.admitted.is_empty());
        assert_eq!(p.work, [(2, Work::Prefill { from: 0, to: 2 })]);
        s.remove(2);
        assert!(s.is_idle());
        assert_eq!(s.kv_used(), 0);
    }

    #[test]
    fn classes_order_admission_and_full_queues_shed_the_lowest() {
        let mut s = Scheduler::new(Limits {
            max_seqs: 1,
            ..limits()
        });
        let t = Instant::now();
        let with = |id, class| Ask {
            class,
            ..ask(id, 1, 1)
        };
        s.submit(with(1, Class::Sheddable)).unwrap();
        s.submit(with(2, Class::Standard)).unwrap();
        s.submit(with(3, Class::Sheddable)).unwrap();
        // Full (3): a critical arrival displaces the newest sheddable waiter.
        s.submit(with(4, Class::Critical)).unwrap();
        assert_eq!(s.submit(with(5, Class::Sheddable)), Err(Refused::QueueFull));
        let p = s.plan(t);
        assert_eq!(p.displaced, [3]);
        assert_eq!(p.admitted, [4]);
        s.remove(4);
        assert_eq!(s.plan(t).admitted, [2]);
        s.remove(2);
        assert_eq!(s.plan(t).admitted, [1]);
    }

    #[test]
    fn waiters_past_their_deadline_are_taken_out() {
        let mut s = Scheduler::new(Limits {
            max_seqs: 1,
            ..limits()
        });
        let t = Instant::now();
        s.submit(ask(1, 1, 1)).unwrap();
        s.submit(Ask {
            deadline: Some(t + Duration::from_millis(50)),
            ..ask(2, 1, 1)
        })
        .unwrap();
        assert_eq!(s.plan(t).admitted, [1]);
        let p = s.plan(t + Duration::from_millis(50));
        assert_eq!(p.expired, [2]);
        assert_eq!(s.waiting(), 0);
    }

    #[test]
    fn decodes_come_first_and_a_prompt_still_progresses_alone() {
        let mut s = Scheduler::new(Limits {
            max_seqs: 16,
            step_tokens: 2,
            ..limits()
        });
        let t = Instant::now();
        for id in 0..3 {
            s.submit(ask(id, 1, 1)).unwrap();
        }
        let p = s.plan(t);
        // Budget 2: two single-token prompts, the third waits for the next step.
        assert_eq!(p.work.len(), 2);
        run(&mut s, &p);
        // The oldest prompt moves by a whole chunk, however many decode; the next
        // waits for room.
        s.submit(ask(9, 5, 1)).unwrap();
        let p = s.plan(t);
        assert_eq!(p.work[..2], [(0, Work::Decode), (1, Work::Decode)]);
        assert_eq!(p.work[2..], [(2, Work::Prefill { from: 0, to: 1 })]);
        run(&mut s, &p);
        let p = s.plan(t);
        assert_eq!(p.work.len(), 4, "{p:?}");
        assert_eq!(p.work[3], (9, Work::Prefill { from: 0, to: 2 }));
    }
}
