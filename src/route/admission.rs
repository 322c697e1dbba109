//! Admission for long requests: a variant's `max_concurrent` places, held from the
//! request's admission to its answer's last byte (a generation holds its backend's
//! slot that long), with a bounded queue per priority class. When every place is
//! taken, a sheddable class is refused at once (429), the others wait in class order,
//! first come first served within a class, up to their queue's length and timeout.
//!
//! A place is a `Permit`; its `Drop` hands it to the next waiter or gives it back, so a
//! request that ends however it ends (answered, its client gone, its future dropped)
//! frees its place. A place handed to a waiter that has just left is inside the
//! channel it was sent on, and dropped with it: it moves on again.

use crate::sync::lock;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::batch::queue::ClassLimits;
use crate::metrics::AdmissionMetrics;

/// A route's `admission` block, compiled (one class when it names none).
#[derive(Debug, Clone, PartialEq)]
pub struct AdmissionLimits {
    pub classes: Vec<ClassLimits>,
    /// The class a request that names none gets.
    pub default_class: usize,
}

/// Why a request got no place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Its class is sheddable and every place is taken.
    Shed,
    /// Its class's queue is full.
    QueueFull,
    /// It waited its class's `queue_timeout` (or its deadline) without a place.
    TimedOut,
}

/// One variant's places.
pub struct Gate {
    state: Mutex<State>,
    metrics: AdmissionMetrics,
}

struct State {
    max: usize,
    running: usize,
    limits: AdmissionLimits,
    /// Per class, who waits (highest class first).
    queues: Vec<VecDeque<oneshot::Sender<Permit>>>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate").finish_non_exhaustive()
    }
}

/// One place, until dropped.
pub struct Permit {
    gate: Arc<Gate>,
    /// False for a place that was never counted (one that could not be handed over).
    armed: bool,
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit").finish_non_exhaustive()
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.armed {
            Gate::release(&self.gate);
        }
    }
}

/// A request counted in `braid_admission_waiting` until it has a place or leaves.
struct Waiting<'a>(&'a prometheus_client::metrics::gauge::Gauge);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Gate {
    pub fn new(max: usize, limits: AdmissionLimits, metrics: AdmissionMetrics) -> Gate {
        let queues = (0..limits.classes.len()).map(|_| VecDeque::new()).collect();
        Gate {
            state: Mutex::new(State {
                max,
                running: 0,
                limits,
                queues,
            }),
            metrics,
        }
    }

    /// Whether this gate was made for these settings (a reload keeps it then).
    pub fn is_for(&self, max: usize, limits: &AdmissionLimits) -> bool {
        let st = lock(&self.state);
        st.max == max && st.limits == *limits
    }

    /// A place for a request of `class`, waiting for one if its class may wait, at
    /// most until `deadline` (the request's own) or its class's `queue_timeout`.
    pub async fn admit(
        self: &Arc<Self>,
        class: usize,
        deadline: Option<Instant>,
    ) -> Result<Permit, Refused> {
        let (rx, until) = {
            let mut st = lock(&self.state);
            if st.running < st.max {
                st.running += 1;
                self.metrics.running.inc();
                return Ok(Permit {
                    gate: self.clone(),
                    armed: true,
                });
            }
            let c = &st.limits.classes[class];
            if c.sheddable {
                self.metrics.shed.inc();
                return Err(Refused::Shed);
            }
            let (max_queue, timeout) = (c.max_queue, c.queue_timeout);
            let queue = &mut st.queues[class];
            if queue.len() >= max_queue {
                // Those who left still hold their place in line: forget them first.
                queue.retain(|w| !w.is_closed());
                if queue.len() >= max_queue {
                    self.metrics.queue_full.inc();
                    return Err(Refused::QueueFull);
                }
            }
            let (tx, rx) = oneshot::channel();
            queue.push_back(tx);
            let until = timeout.and_then(|t| Instant::now().checked_add(t));
            (rx, [until, deadline].into_iter().flatten().min())
        };
        self.metrics.waiting.inc();
        let _waiting = Waiting(&self.metrics.waiting);
        let got = match until {
            Some(u) => tokio::time::timeout_at(u, rx).await.ok(),
            None => Some(rx.await),
        };
        match got {
            Some(Ok(permit)) => Ok(permit),
            _ => {
                self.metrics.queue_timeout.inc();
                Err(Refused::TimedOut)
            }
        }
    }

    /// A place is free: to the first waiter of the highest class still there, else back.
    fn release(gate: &Arc<Gate>) {
        let mut st = lock(&gate.state);
        for queue in st.queues.iter_mut() {
            while let Some(tx) = queue.pop_front() {
                let permit = Permit {
                    gate: gate.clone(),
                    armed: true,
                };
                match tx.send(permit) {
                    Ok(()) => return,
                    // That waiter has left: the place was never its.
                    Err(mut unsent) => unsent.armed = false,
                }
            }
        }
        st.running -= 1;
        gate.metrics.running.dec();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn gate(max: usize) -> Arc<Gate> {
        let limits = AdmissionLimits {
            classes: vec![
                ClassLimits {
                    name: "interactive".into(),
                    max_queue: 2,
                    queue_timeout: Some(Duration::from_secs(5)),
                    sheddable: false,
                },
                ClassLimits {
                    name: "batch".into(),
                    max_queue: 2,
                    queue_timeout: None,
                    sheddable: true,
                },
            ],
            default_class: 0,
        };
        Arc::new(Gate::new(max, limits, AdmissionMetrics::default()))
    }

    #[tokio::test(start_paused = true)]
    async fn places_are_handed_on_shed_queued_and_never_lost() {
        let g = gate(1);
        let first = g.admit(0, None).await.unwrap();
        // Saturated: the sheddable class is refused, the other waits.
        assert_eq!(g.admit(1, None).await.unwrap_err(), Refused::Shed);
        let waiter = tokio::spawn({
            let g = g.clone();
            async move { g.admit(0, None).await }
        });
        let leaver = tokio::spawn({
            let g = g.clone();
            async move { g.admit(0, None).await }
        });
        tokio::task::yield_now().await;
        assert_eq!(g.metrics.waiting.get(), 2);
        // The queue (2) is full: a third is refused.
        assert_eq!(g.admit(0, None).await.unwrap_err(), Refused::QueueFull);
        // One waiter leaves (its future dropped); the place skips it.
        leaver.abort();
        let _ = leaver.await;
        drop(first);
        let second = waiter.await.unwrap().unwrap();
        assert_eq!(g.metrics.running.get(), 1);
        assert_eq!(g.metrics.waiting.get(), 0);
        // A waiter past its queue_timeout is refused; the place stays with its holder.
        let late = g.admit(0, None);
        tokio::pin!(late);
        tokio::select! {
            r = &mut late => assert_eq!(r.unwrap_err(), Refused::TimedOut),
            _ = tokio::time::sleep(Duration::from_secs(10)) => panic!("never timed out"),
        }
        drop(second);
        assert_eq!(g.metrics.running.get(), 0);
        assert_eq!(lock(&g.state).running, 0);
        // A request's own deadline bounds its wait too.
        let held = g.admit(0, None).await.unwrap();
        let soon = Instant::now() + Duration::from_millis(10);
        assert_eq!(g.admit(0, Some(soon)).await.unwrap_err(), Refused::TimedOut);
        drop(held);
        assert_eq!(lock(&g.state).running, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_higher_class_goes_first() {
        let limits = AdmissionLimits {
            classes: (0..2)
                .map(|i| ClassLimits {
                    name: format!("c{i}").into(),
                    max_queue: 4,
                    queue_timeout: None,
                    sheddable: false,
                })
                .collect(),
            default_class: 0,
        };
        let g = Arc::new(Gate::new(1, limits, AdmissionMetrics::default()));
        let held = g.admit(0, None).await.unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for class in [1, 0] {
            let (g, tx) = (g.clone(), tx.clone());
            tokio::spawn(async move {
                let p = g.admit(class, None).await.unwrap();
                tx.send(class).unwrap();
                drop(p);
            });
            tokio::task::yield_now().await;
        }
        drop(held);
        assert_eq!(rx.recv().await, Some(0));
        assert_eq!(rx.recv().await, Some(1));
    }
}
