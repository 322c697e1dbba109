//! Live state bound to a route table, keyed by route and variant name so it outlives
//! any one snapshot: retry budgets, variant health, the semaphores that bound a route's
//! requests and its shadow copies, and the batcher of each batched local variant. A
//! reload keeps what it can (an ejected variant stays ejected, a spent budget stays
//! spent, queued requests stay queued) and replaces what its new settings change.
//!
//! The registry is consulted once per snapshot, when the store installs it (`bind`):
//! the result is indexed like the route table, so a request takes no lock and hashes
//! no name to find its handles. What a new table no longer names is dropped from the
//! registry; a dropped batcher answers what it holds, then its task ends.

use crate::sync::lock;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;
use tower::retry::budget::TpsBudget;

use super::RouteTable;
use super::admission::{AdmissionLimits, Gate};
use super::experiment::Experiment;
use crate::addr::Protocol;
use crate::batch::batcher::{Batcher, Execute};
use crate::metrics::{Metrics, RequestMetrics, RetryMetrics};
use crate::payload::{PayloadLog, Sink};
use crate::upstream::health::{Outlier, VariantHealth};
use crate::upstream::retry::RetryPolicy;
use crate::upstream::{Upstreams, h1};

/// A route's live handles, at the route's index in the table.
#[derive(Debug, Default)]
pub struct RouteLive {
    /// The retry budget; `None` when the route does not retry.
    pub budget: Option<Arc<TpsBudget>>,
    /// Bounds `max_inflight`.
    pub limit: Option<Arc<Semaphore>>,
    /// Bounds the shadow copies in flight.
    pub shadow_limit: Option<Arc<Semaphore>>,
    /// Indexed like the route's variants.
    pub variants: Vec<VariantLive>,
    /// Weights in force, guardrails, split health and the report; `None` on a route
    /// with one variant.
    pub experiment: Option<Arc<Experiment>>,
    /// The writer of the route's sampled payload log (shared by routes with one sink).
    pub payload_log: Option<Arc<PayloadLog>>,
}

/// A variant's live handles.
pub struct VariantLive {
    /// Failure accrual; `None` when the route has no `outlier` block.
    pub health: Option<Arc<VariantHealth>>,
    /// `None` when the route does not retry.
    pub retry_metrics: Option<Arc<RetryMetrics>>,
    /// Coalesces this variant's requests; `None` unless it is local and the route batches.
    pub batcher: Option<Batcher>,
    /// The backend's HTTP/1.1 pool; `None` for h2c and TLS backends.
    pub backend: Option<Arc<h1::Backend>>,
    /// Requests counted and timed at the edge, resolved once.
    pub requests: Arc<RequestMetrics>,
    /// The variant's `max_concurrent` places; `None` without a limit.
    pub admission: Option<Arc<Gate>>,
}

impl std::fmt::Debug for VariantLive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VariantLive")
            .field("health", &self.health)
            .field("batcher", &self.batcher.is_some())
            .finish()
    }
}

type VariantKey = (Arc<str>, Arc<str>);
/// A budget and the (min/s, ratio bits) it was made with.
type BudgetEntry = ((u32, u64), Arc<TpsBudget>);
/// A semaphore and the permit count it was made with.
type LimitEntry = (usize, Arc<Semaphore>);

/// Every live handle by name, kept across reloads.
pub struct Registry {
    metrics: Arc<Metrics>,
    /// Where each HTTP/1.1 variant's pool is found.
    upstreams: Upstreams,
    /// How batchers reach the executor.
    executor: Arc<dyn Execute>,
    state: Mutex<State>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct State {
    budgets: HashMap<Arc<str>, BudgetEntry>,
    retry_metrics: HashMap<VariantKey, Arc<RetryMetrics>>,
    request_metrics: HashMap<VariantKey, Arc<RequestMetrics>>,
    health: HashMap<VariantKey, Arc<VariantHealth>>,
    /// Per route and purpose.
    limits: HashMap<(Arc<str>, &'static str), LimitEntry>,
    batchers: HashMap<VariantKey, Batcher>,
    gates: HashMap<VariantKey, Arc<Gate>>,
    /// Per route, with the fingerprint of the settings it was started for.
    experiments: HashMap<Arc<str>, (u64, Arc<Experiment>)>,
    /// One writer per payload log sink, kept across reloads (a file keeps rotating).
    payload_logs: HashMap<Sink, Arc<PayloadLog>>,
}

impl Registry {
    pub fn new(
        metrics: Arc<Metrics>,
        executor: Arc<dyn Execute>,
        upstreams: Upstreams,
    ) -> Registry {
        Registry {
            metrics,
            upstreams,
            executor,
            state: Mutex::default(),
        }
    }

    /// The live handles of every route and variant of `table`, indexed like it: kept
    /// from the previous table where the names and settings match, made fresh where
    /// not. Handles of routes and variants the table no longer has are let go.
    pub fn bind(&self, table: &RouteTable) -> Vec<RouteLive> {
        let mut st = lock(&self.state);
        let mut routes_seen = HashSet::new();
        let mut variants_seen = HashSet::new();
        let mut batched_seen = HashSet::new();
        let mut sinks_seen = HashSet::new();
        let mut bound = Vec::with_capacity(table.routes.len());
        for route in &table.routes {
            routes_seen.insert(route.name.clone());
            let retries = route.retry.attempts > 1;
            let mut variants = Vec::with_capacity(route.variants.len());
            for v in &route.variants {
                let key = (route.name.clone(), v.name.clone());
                let batcher = match &route.batching {
                    Some(limits) if v.local => {
                        batched_seen.insert(key.clone());
                        Some(st.batcher(&self.metrics, &self.executor, &key, limits.clone()))
                    }
                    _ => None,
                };
                variants.push(VariantLive {
                    health: route.outlier.map(|o| st.health(&self.metrics, &key, o)),
                    retry_metrics: retries.then(|| st.retry_metrics(&self.metrics, &key)),
                    batcher,
                    backend: (v.upstream.protocol == Protocol::Http1)
                        .then(|| self.upstreams.backend(&v.upstream.authority)),
                    requests: st
                        .request_metrics
                        .entry(key.clone())
                        .or_insert_with(|| Arc::new(self.metrics.requests(&key.0, &key.1)))
                        .clone(),
                    admission: v
                        .max_concurrent
                        .map(|max| st.gate(&self.metrics, &key, max, &route.admission)),
                });
                variants_seen.insert(key);
            }
            bound.push(RouteLive {
                budget: retries.then(|| st.budget(&route.name, &route.retry)),
                limit: route
                    .max_inflight
                    .map(|n| st.limit(&route.name, "route", n)),
                shadow_limit: route
                    .shadow
                    .map(|sh| st.limit(&route.name, "shadow", sh.max_inflight)),
                variants,
                payload_log: route.payload_log.as_ref().map(|p| {
                    sinks_seen.insert(p.sink.clone());
                    st.payload_logs
                        .entry(p.sink.clone())
                        .or_insert_with(|| {
                            Arc::new(PayloadLog::start(
                                &p.sink,
                                self.metrics.clone(),
                                &self.upstreams,
                            ))
                        })
                        .clone()
                }),
                experiment: (route.variants.len() > 1).then(|| {
                    match st.experiments.get(&route.name) {
                        Some((f, e)) if *f == route.fingerprint => {
                            e.set_verdicts(&route.verdicts);
                            e.clone()
                        }
                        _ => {
                            let e = Arc::new(Experiment::new(route, &self.metrics));
                            st.experiments
                                .insert(route.name.clone(), (route.fingerprint, e.clone()));
                            e
                        }
                    }
                }),
            });
        }
        st.budgets.retain(|r, _| routes_seen.contains(r));
        st.limits.retain(|(r, _), _| routes_seen.contains(r));
        st.experiments.retain(|r, _| routes_seen.contains(r));
        st.payload_logs.retain(|s, _| sinks_seen.contains(s));
        st.health.retain(|k, _| variants_seen.contains(k));
        st.retry_metrics.retain(|k, _| variants_seen.contains(k));
        st.request_metrics.retain(|k, _| variants_seen.contains(k));
        st.gates.retain(|k, _| variants_seen.contains(k));
        // A dropped batcher answers what it holds, then its task ends.
        st.batchers.retain(|k, _| batched_seen.contains(k));
        bound
    }

    /// Closes the HTTP/1.1 pools no installed snapshot binds any more.
    pub fn release_unbound(&self) {
        self.upstreams.release_unbound();
    }

    /// How many batcher tasks the registry holds (for tests and `/config`).
    pub fn batchers(&self) -> usize {
        lock(&self.state).batchers.len()
    }
}

impl State {
    fn budget(&mut self, route: &Arc<str>, p: &RetryPolicy) -> Arc<TpsBudget> {
        let settings = (p.min_retries_per_second, p.budget_ratio.to_bits());
        match self.budgets.get(route) {
            Some((s, b)) if *s == settings => b.clone(),
            _ => {
                let b = Arc::new(p.budget());
                self.budgets.insert(route.clone(), (settings, b.clone()));
                b
            }
        }
    }

    fn retry_metrics(&mut self, metrics: &Metrics, key: &VariantKey) -> Arc<RetryMetrics> {
        self.retry_metrics
            .entry(key.clone())
            .or_insert_with(|| Arc::new(metrics.retry(&key.0, &key.1)))
            .clone()
    }

    fn health(
        &mut self,
        metrics: &Metrics,
        key: &VariantKey,
        settings: Outlier,
    ) -> Arc<VariantHealth> {
        let h = self
            .health
            .entry(key.clone())
            .or_insert_with(|| {
                Arc::new(VariantHealth::new(settings, metrics.health(&key.0, &key.1)))
            })
            .clone();
        h.configure(settings);
        h
    }

    /// A semaphore of `permits` for (route, purpose); a reload that changes the count
    /// gets a fresh one (requests holding the old one finish under it).
    fn limit(&mut self, route: &Arc<str>, purpose: &'static str, permits: usize) -> Arc<Semaphore> {
        match self.limits.get(&(route.clone(), purpose)) {
            Some((n, s)) if *n == permits => s.clone(),
            _ => {
                let s = Arc::new(Semaphore::new(permits));
                self.limits
                    .insert((route.clone(), purpose), (permits, s.clone()));
                s
            }
        }
    }

    /// The variant's admission gate, kept while its settings are the same (requests
    /// holding places of a replaced one finish under it).
    fn gate(
        &mut self,
        metrics: &Metrics,
        key: &VariantKey,
        max: usize,
        limits: &AdmissionLimits,
    ) -> Arc<Gate> {
        match self.gates.get(key) {
            Some(g) if g.is_for(max, limits) => g.clone(),
            _ => {
                let g = Arc::new(Gate::new(
                    max,
                    limits.clone(),
                    metrics.admission(&key.0, &key.1),
                ));
                self.gates.insert(key.clone(), g.clone());
                g
            }
        }
    }

    /// The variant's batcher, started on its first bind; a kept one takes the new limits.
    fn batcher(
        &mut self,
        metrics: &Metrics,
        executor: &Arc<dyn Execute>,
        key: &VariantKey,
        limits: crate::batch::queue::BatchLimits,
    ) -> Batcher {
        match self.batchers.get(key) {
            Some(b) => {
                b.set_limits(limits);
                b.clone()
            }
            None => {
                let b = Batcher::spawn(limits, executor.clone(), metrics.batch(&key.0, &key.1));
                self.batchers.insert(key.clone(), b.clone());
                b
            }
        }
    }
}
