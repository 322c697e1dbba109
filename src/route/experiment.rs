//! An experiment: the live side of a route with two variants or more. It owns the
//! weights in force (configured, moved by ramps on the wall clock, zeroed or frozen by
//! a tripped guardrail), watches every candidate against the control with the
//! guardrail's e-process, checks that assignments follow the weights (split health),
//! and keeps what `/experiments` reports. The statistics are in `evidence`.
//!
//! A request reads the weights once (`weights`), is assigned with them, and reports
//! how it went (`observe`) with the same weights, so the share used for its evidence
//! is the one it was assigned under.

use crate::sync::lock;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::evidence::{Evidence, Latencies, SplitTest, rate_difference};
use super::ramp::{Position, Ramp};
use super::{Chooser, Route};
use crate::metrics::{ExperimentMetrics, Metrics};

/// `routes[].guardrail`, compiled: indices instead of names.
#[derive(Debug, Clone, PartialEq)]
pub struct Guardrail {
    /// The variant trusted to take traffic back.
    pub control: usize,
    /// 5xx answers, transport errors and timeouts count as bad.
    pub errors: bool,
    /// A request slower than this counts as bad.
    pub slow: Option<Duration>,
    /// A generation whose first token came later than this counts as bad.
    pub slow_ttft: Option<Duration>,
    /// A generation slower than this per output token (after the first) counts as bad.
    pub slow_tpot: Option<Duration>,
    /// False-trip probability per candidate: per replica alone, for the whole fleet in
    /// fleet mode.
    pub alpha: f64,
    /// Fleet mode (`guardrail.fleet.max_pods`): `braid controller` judges the fleet at
    /// `alpha / 2`, and this replica's own guardrail is a fast local breaker at
    /// `alpha / (2 max_pods)`, so that across up to `max_pods` pod lifetimes the
    /// chance of any false trip stays at `alpha` (a union bound).
    pub fleet_max_pods: Option<u32>,
    /// A candidate needs this many bad events before it can trip.
    pub min_bad_events: u64,
    /// Requests are not watched for this long after the experiment starts.
    pub warmup: Duration,
    pub action: Action,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The candidate's weight becomes 0 on this replica.
    Rollback,
    /// The candidate's ramp stays at the weight it had when it tripped.
    Hold,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Rollback => "rollback",
            Action::Hold => "hold",
        }
    }
}

impl Guardrail {
    /// The level this replica's own guardrail trips at.
    pub fn local_alpha(&self) -> f64 {
        match self.fleet_max_pods {
            Some(n) => self.alpha / (2.0 * f64::from(n.max(1))),
            None => self.alpha,
        }
    }
}

/// The fleet's decision about a candidate, written into the ConfigMap by `braid
/// controller` and applied by every replica from the config generation that carries it:
/// the candidate's weight becomes 0 (`rollback`) or stays at `weight` (`hold`).
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub action: Action,
    /// The weight `hold` keeps.
    pub weight: f64,
    pub reason: String,
    pub evidence_log10: Option<f64>,
    /// When the controller decided (RFC 3339), as it wrote it.
    pub at: String,
}

/// This process's identity in reports: a restarted pod is a new instance, so a fleet
/// never adds its counts to the old ones.
pub fn instance() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let seed = format!("{now}-{}", std::process::id());
        format!(
            "{:016x}",
            crate::hash::fnv1a(crate::hash::FNV_OFFSET, seed.as_bytes())
        )
    })
}

/// Numbers each experiment state this process starts (at start, reload or reset), so
/// `(instance, epoch)` names one run of counts and evidence.
static EPOCHS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// The weights in force for a route at one moment.
#[derive(Debug)]
pub struct Weights {
    pub chooser: Chooser,
    pub weights: Vec<f64>,
    /// Each variant's share of assignments (`weights` over their sum).
    pub shares: Vec<f64>,
    /// Each ramped variant's position on its schedule.
    pub positions: Vec<Option<Position>>,
    /// When a ramp next changes a weight.
    next_change: Option<SystemTime>,
}

/// Who a request was assigned to and who answered it, with its status: known at its
/// answer's head, kept until its outcome is observed (for a generation, at its end).
#[derive(Clone, Copy, Debug)]
pub struct Who {
    /// The variant the weights (or the override header) chose.
    pub assigned: usize,
    /// Chosen by the weights (sticky or random), not pinned by the override header.
    pub randomized: bool,
    /// Sent elsewhere before the assigned variant was tried (it was ejected).
    pub rerouted: bool,
    /// The variant whose answer the client got.
    pub served: usize,
    /// The assigned variant failed and the fallback answered instead.
    pub assigned_failed: bool,
    pub status: u16,
}

/// How one request went, for the experiment's counts and evidence.
#[derive(Debug)]
pub struct Outcome<'a> {
    /// The weights it was assigned under.
    pub weights: &'a Weights,
    pub who: Who,
    /// Until the answer's head; for a generation (OpenAI-style answer), its last byte.
    pub elapsed: Duration,
    /// What an OpenAI-style answer generated, measured to its end.
    pub generation: Option<&'a crate::metrics::Generation>,
}

struct Trip {
    at: SystemTime,
    /// The weight `hold` keeps.
    weight: f64,
    evidence: f64,
}

#[derive(Default)]
struct Served {
    requests: u64,
    errors: u64,
    latency: Latencies,
    /// Generations (OpenAI-style answers): time to first token, time per output
    /// token, and output tokens over the time spent generating them.
    ttft: Latencies,
    tpot: Latencies,
    generations: u64,
    output_tokens: u64,
    generating: Duration,
}

struct State {
    /// When watching began (start, reload, reset), for the warmup.
    started: Instant,
    /// This run of counts and evidence, unique in the process.
    epoch: u64,
    trips: Vec<Option<Trip>>,
    /// Per variant: evidence against it (candidates only).
    evidence: Vec<Evidence>,
    /// Per variant: watched requests and bad events among them, after the warmup.
    watched: Vec<(u64, u64)>,
    served: Vec<Served>,
    split: SplitTest,
}

impl State {
    fn new(variants: usize) -> State {
        State {
            started: Instant::now(),
            epoch: EPOCHS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            trips: (0..variants).map(|_| None).collect(),
            evidence: vec![Evidence::default(); variants],
            watched: vec![(0, 0); variants],
            served: (0..variants).map(|_| Served::default()).collect(),
            split: SplitTest::new(variants),
        }
    }
}

pub struct Experiment {
    route: Arc<str>,
    names: Vec<Arc<str>>,
    /// Per variant: configured weight and ramp.
    base: Vec<(f64, Option<Ramp>)>,
    guardrail: Option<Guardrail>,
    /// The route's settings digest: a fleet judges one experiment across pods only where
    /// their digests agree, and a verdict names the experiment it is for.
    fingerprint: u64,
    /// Per variant: the fleet's verdict in force, from the config generation in force.
    verdicts: Mutex<Vec<Option<Verdict>>>,
    current: ArcSwap<Weights>,
    state: Mutex<State>,
    metrics: ExperimentMetrics,
}

impl std::fmt::Debug for Experiment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Experiment")
            .field("route", &self.route)
            .finish_non_exhaustive()
    }
}

impl Experiment {
    pub fn new(route: &Route, metrics: &Metrics) -> Experiment {
        let names: Vec<Arc<str>> = route.variants.iter().map(|v| v.name.clone()).collect();
        let base = route
            .variants
            .iter()
            .map(|v| (v.weight, v.ramp.clone()))
            .collect();
        let state = State::new(names.len());
        let e = Experiment {
            metrics: metrics.experiment(&route.name, &names, &super::evidence::THETA_NAMES),
            route: route.name.clone(),
            guardrail: route.guardrail.clone(),
            fingerprint: route.fingerprint,
            verdicts: Mutex::new(route.verdicts.clone()),
            // Replaced before anyone can read it: the weights need the rest of `e`.
            current: ArcSwap::from_pointee(Weights {
                chooser: route.chooser.clone(),
                weights: Vec::new(),
                shares: Vec::new(),
                positions: Vec::new(),
                next_change: None,
            }),
            names,
            base,
            state: Mutex::new(state),
        };
        e.refresh(&lock(&e.state));
        e
    }

    /// The weights in force now (recomputed when a ramp has reached its next step).
    pub fn weights(&self) -> Arc<Weights> {
        let w = self.current.load_full();
        match w.next_change {
            Some(at) if SystemTime::now() >= at => self.refresh(&lock(&self.state)),
            _ => w,
        }
    }

    /// Installs the fleet's verdicts of a newly loaded config (the experiment itself is
    /// kept: its settings did not change).
    pub fn set_verdicts(&self, verdicts: &[Option<Verdict>]) {
        let st = lock(&self.state);
        let mut v = lock(&self.verdicts);
        if v.as_slice() == verdicts {
            return;
        }
        for (i, new) in verdicts.iter().enumerate() {
            if new.is_some() && v.get(i).is_none_or(Option::is_none) {
                tracing::warn!(
                    route = %self.route,
                    variant = %self.names[i],
                    "fleet verdict applied: {}",
                    new.as_ref().map_or("", |n| n.reason.as_str())
                );
            }
        }
        *v = verdicts.to_vec();
        drop(v);
        self.refresh(&st);
    }

    fn refresh(&self, st: &State) -> Arc<Weights> {
        let w = Arc::new(self.compute(st, SystemTime::now()));
        self.current.store(w.clone());
        w
    }

    fn compute(&self, st: &State, now: SystemTime) -> Weights {
        let mut next_change: Option<SystemTime> = None;
        let mut positions = Vec::with_capacity(self.base.len());
        let verdicts = lock(&self.verdicts);
        let mut weights: Vec<f64> = self
            .base
            .iter()
            .zip(&st.trips)
            .enumerate()
            .map(|(i, ((w, ramp), trip))| {
                let verdict = verdicts.get(i).and_then(Option::as_ref);
                let (w, pos) = match ramp {
                    Some(r) => {
                        let (w, pos) = r.at(*w, now);
                        if trip.is_none()
                            && verdict.is_none()
                            && let Some(at) = r.next_change(now)
                        {
                            next_change = Some(next_change.map_or(at, |n| n.min(at)));
                        }
                        (w, Some(pos))
                    }
                    None => (*w, None),
                };
                positions.push(pos);
                if let Some(v) = verdict {
                    return match v.action {
                        Action::Rollback => 0.0,
                        Action::Hold => v.weight,
                    };
                }
                match (trip, &self.guardrail) {
                    (Some(_), Some(g)) if g.action == Action::Rollback => 0.0,
                    (Some(t), _) => t.weight,
                    (None, _) => w,
                }
            })
            .collect();
        if weights.iter().all(|w| *w <= 0.0) {
            // Every weight is zero (a ramp from zero, a control at zero and its only
            // candidate rolled back): the control, or the first variant, takes it all.
            let i = self.guardrail.as_ref().map_or(0, |g| g.control);
            weights[i] = 1.0;
        }
        let total: f64 = weights.iter().sum();
        for (g, w) in self.metrics.weight.iter().zip(&weights) {
            g.set(*w);
        }
        Weights {
            chooser: Chooser::new(self.names.iter().map(|n| &**n).zip(weights.iter().copied())),
            shares: weights.iter().map(|w| w / total).collect(),
            weights,
            positions,
            next_change,
        }
    }

    /// Counts one request, feeds the split check and, for requests the weights chose,
    /// the guardrail; trips it when the evidence is enough.
    pub fn observe(&self, o: Outcome<'_>) {
        let mut st = lock(&self.state);
        let served = &mut st.served[o.who.served];
        served.requests += 1;
        served.errors += u64::from(o.who.status >= 500);
        served.latency.record(o.elapsed);
        if let Some(g) = o.generation {
            served.generations += 1;
            if let Some(t) = g.ttft {
                served.ttft.record(t);
            }
            if let Some(t) = g.tpot {
                served.tpot.record(t);
            }
            if let Some(n) = g.output_tokens {
                served.output_tokens += n;
                served.generating += g.duration.saturating_sub(g.ttft.unwrap_or_default());
            }
        }
        if !o.who.randomized {
            return;
        }
        let was = st.split.mismatch();
        st.split.observe(o.who.assigned, &o.weights.shares);
        if !was && st.split.mismatch() {
            self.metrics.split_mismatch.set(1);
            tracing::warn!(
                route = %self.route,
                "sample ratio mismatch: assignments differ from the configured weights; the experiment's comparisons are not trustworthy"
            );
        }
        let Some(g) = &self.guardrail else { return };
        if o.who.rerouted || st.started.elapsed() < g.warmup {
            return;
        }
        let a = o.who.assigned;
        let generation = o.generation;
        let slower =
            |limit: Option<Duration>, took: fn(&crate::metrics::Generation) -> Option<Duration>| {
                limit.is_some_and(|l| generation.and_then(took).is_some_and(|t| t > l))
            };
        let bad = (g.errors && (o.who.assigned_failed || o.who.status >= 500))
            || g.slow.is_some_and(|s| o.elapsed > s)
            || slower(g.slow_ttft, |g| g.ttft)
            || slower(g.slow_tpot, |g| g.tpot);
        st.watched[a].0 += 1;
        st.watched[a].1 += u64::from(bad);
        if !bad {
            return;
        }
        let w = &o.weights.weights;
        // Candidates the fleet decided are no longer watched, as tripped ones are not.
        let verdicts = lock(&self.verdicts);
        let decided = |c: usize| verdicts.get(c).is_some_and(Option::is_some);
        let pi = |c: usize| {
            let pair = w[c] + w[g.control];
            if pair > 0.0 { w[c] / pair } else { 0.0 }
        };
        if a == g.control {
            for c in 0..self.names.len() {
                if c != g.control && st.trips[c].is_none() && !decided(c) {
                    st.evidence[c].observe(false, pi(c));
                    self.publish(&st, c);
                }
            }
            return;
        }
        if st.trips[a].is_some() || decided(a) {
            return;
        }
        // Released before a trip rebuilds the weights, which reads the verdicts again.
        drop(verdicts);
        st.evidence[a].observe(true, pi(a));
        let e = self.publish(&st, a);
        if st.watched[a].1 >= g.min_bad_events && st.evidence[a].exceeds(g.local_alpha()) {
            st.trips[a] = Some(Trip {
                at: SystemTime::now(),
                weight: w[a],
                evidence: e,
            });
            self.metrics.tripped[a].set(1);
            self.metrics.trips[a].inc();
            tracing::warn!(
                route = %self.route,
                variant = %self.names[a],
                control = %self.names[g.control],
                evidence = e,
                action = g.action.name(),
                "guardrail tripped: the candidate has more bad requests than the control"
            );
            self.refresh(&st);
        }
    }

    /// Sets a candidate's evidence gauges; returns its log10 e-value.
    fn publish(&self, st: &State, c: usize) -> f64 {
        let e = st.evidence[c].log10_e();
        self.metrics.evidence[c].set(e);
        for (g, l) in self.metrics.log_lr[c].iter().zip(st.evidence[c].log_lr()) {
            g.set(l);
        }
        e
    }

    /// Forgets every trip, count and piece of evidence, as a config change does.
    pub fn reset(&self) {
        let mut st = lock(&self.state);
        *st = State::new(self.names.len());
        for ((t, e), l) in self
            .metrics
            .tripped
            .iter()
            .zip(&self.metrics.evidence)
            .zip(&self.metrics.log_lr)
        {
            t.set(0);
            e.set(0.0);
            l.iter().for_each(|g| {
                g.set(0.0);
            });
        }
        self.metrics.split_mismatch.set(0);
        self.refresh(&st);
        tracing::info!(route = %self.route, "experiment reset");
    }

    pub fn route(&self) -> &Arc<str> {
        &self.route
    }

    /// The `/experiments` entry for this route.
    pub fn report(&self, route: &Route) -> Value {
        let w = self.weights();
        let st = lock(&self.state);
        let verdicts = lock(&self.verdicts).clone();
        let g = self.guardrail.as_ref();
        let warming = g.is_some_and(|g| st.started.elapsed() < g.warmup);
        let control = g.map(|g| g.control);
        let at = ReportAt {
            st: &st,
            w: &w,
            verdicts: &verdicts,
            route,
            now: SystemTime::now(),
            warming,
        };
        let variants: Vec<Value> = (0..self.names.len())
            .map(|i| self.variant_report(i, &at))
            .collect();
        let split = st.split.report(self.names.iter().map(|n| &**n));
        json!({
            "route": &*self.route,
            // Names this run of counts: a fleet adds each (instance, epoch) once, and only
            // across pods whose `fingerprint` (the route's settings) agrees.
            "run": {
                "instance": instance(),
                "epoch": st.epoch,
                "fingerprint": format!("{:016x}", self.fingerprint),
            },
            "control": control.map(|c| &*self.names[c]),
            "guardrail": g.map(|g| json!({
                "alpha": g.alpha,
                "local_alpha": g.local_alpha(),
                "fleet_max_pods": g.fleet_max_pods,
                "errors": g.errors,
                "slow_ms": g.slow.map(|s| s.as_secs_f64() * 1e3),
                "slow_ttft_ms": g.slow_ttft.map(|s| s.as_secs_f64() * 1e3),
                "slow_tpot_ms": g.slow_tpot.map(|s| s.as_secs_f64() * 1e3),
                "min_bad_events": g.min_bad_events,
                "warmup_s": g.warmup.as_secs_f64(),
                "action": g.action.name(),
                "warming_up": warming,
            })),
            "split": {
                "healthy": !st.split.mismatch(),
                "evidence_log10": st.split.log10_e(),
                "chi_square": st.split.chi_square(),
                "variants": split,
            },
            "variants": variants,
        })
    }

    /// One variant's entry: its traffic, latency, generations, the histograms a fleet
    /// adds up, its ramp, its difference to control and its guardrail.
    fn variant_report(&self, i: usize, at: &ReportAt<'_>) -> Value {
        let (st, w, route) = (at.st, at.w, at.route);
        let served = &st.served[i];
        let (watched, bad) = st.watched[i];
        let ramp = self.ramp_report(i, at);
        let vs_control = self.vs_control(i, at);
        let guardrail = self.guardrail_report(i, at);
        let rate = |n: u64, of: u64| {
            if of == 0 {
                None
            } else {
                Some(n as f64 / of as f64)
            }
        };
        json!({
            "name": &*self.names[i],
            "weight": w.weights.get(i),
            "share": w.shares.get(i),
            "configured_weight": route.variants.get(i).map(|v| v.weight),
            "ramp": ramp,
            "requests": served.requests,
            "errors": served.errors,
            "error_rate": rate(served.errors, served.requests),
            "latency_ms": served.latency.report_ms(&[("p50", 0.5), ("p95", 0.95), ("p99", 0.99)]),
            "generation": (served.generations > 0).then(|| json!({
                "requests": served.generations,
                "ttft_ms": served.ttft.report_ms(&[("p50", 0.5), ("p95", 0.95)]),
                "tpot_ms": served.tpot.report_ms(&[("p50", 0.5)]),
                "output_tokens_per_request": rate(served.output_tokens, served.generations),
                "output_tokens_per_second": (served.generating > Duration::ZERO)
                    .then(|| served.output_tokens as f64 / served.generating.as_secs_f64()),
            })),
            "watched": {"requests": watched, "bad": bad, "bad_rate": rate(bad, watched)},
            // What a fleet adds up: the buckets behind the quantiles above.
            "histograms": {
                "latency": served.latency.sparse(),
                "ttft": served.ttft.sparse(),
                "tpot": served.tpot.sparse(),
                "output_tokens": served.output_tokens,
                "generating_s": served.generating.as_secs_f64(),
            },
            "vs_control": vs_control,
            "guardrail": guardrail,
        })
    }

    fn ramp_report(&self, i: usize, at: &ReportAt<'_>) -> Option<Value> {
        let (st, w, g) = (at.st, at.w, self.guardrail.as_ref());
        self.base[i].1.as_ref().map(|r| {
            let (step, state) = match w.positions[i] {
                Some(Position::Step(s)) => (Some(s + 1), "running"),
                Some(Position::Done) => (Some(r.steps.len()), "done"),
                Some(Position::Pending) | None => (None, "pending"),
            };
            json!({
                "state": if st.trips[i].is_some() && g.is_some_and(|g| g.action == Action::Hold) { "held" } else { state },
                "step": step,
                "steps": r.steps.len(),
                "next_change": r.next_change(at.now).map(rfc3339),
            })
        })
    }

    fn vs_control(&self, i: usize, at: &ReportAt<'_>) -> Option<Value> {
        let st = at.st;
        let (watched, bad) = st.watched[i];
        let control = self.guardrail.as_ref().map(|g| g.control);
        let ms = |s: Option<f64>| s.map(|s| (s * 1e6).round() / 1e3);
        control.filter(|&c| c != i).map(|c| {
            let (cw, cb) = st.watched[c];
            let d = rate_difference(bad, watched, cb, cw, 0.05);
            let p50 = |v: usize| st.served[v].latency.quantile(0.5);
            json!({
                "bad_rate_difference": {"estimate": d.estimate, "low": d.low, "high": d.high, "confidence": 0.95},
                "p50_ms_difference": match (p50(i), p50(c)) {
                    (Some(a), Some(b)) => ms(Some(a - b)),
                    _ => None,
                },
            })
        })
    }

    fn guardrail_report(&self, i: usize, at: &ReportAt<'_>) -> Option<Value> {
        let (st, g) = (at.st, self.guardrail.as_ref());
        let bad = st.watched[i].1;
        g.map(|g| {
            if i == g.control {
                return json!({"state": "control"});
            }
            let verdict = at.verdicts.get(i).and_then(Option::as_ref);
            let (state, by) = match (&st.trips[i], verdict) {
                (_, Some(_)) => ("tripped", Some("fleet")),
                (Some(_), None) => ("tripped", Some("replica")),
                (None, None) if at.warming => ("warmup", None),
                (None, None) => ("watching", None),
            };
            json!({
                "state": state,
                "tripped_by": by,
                "verdict": verdict.map(|v| json!({
                    "action": v.action.name(),
                    "weight": v.weight,
                    "reason": v.reason,
                    "evidence_log10": v.evidence_log10,
                    "at": v.at,
                })),
                "evidence_log10": st.evidence[i].log10_e(),
                "trips_at_log10": -g.local_alpha().log10(),
                "log_lr": st.evidence[i].log_lr(),
                "evidence_events": st.evidence[i].events(),
                "bad_events": bad,
                "tripped_at": st.trips[i].as_ref().map(|t| rfc3339(t.at)),
                "evidence_at_trip_log10": st.trips[i].as_ref().map(|t| t.evidence),
            })
        })
    }
}

/// What a report is read from, taken once for all its variants.
struct ReportAt<'a> {
    st: &'a State,
    w: &'a Weights,
    verdicts: &'a [Option<Verdict>],
    route: &'a Route,
    now: SystemTime,
    warming: bool,
}

fn rfc3339(t: SystemTime) -> String {
    crate::access::rfc3339_millis(t.duration_since(UNIX_EPOCH).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn experiment(guardrail: &str, ramp: &str) -> (Experiment, crate::config::Snapshot) {
        let doc = format!(
            "routes:\n  - model: m\n    variants:\n      - {{name: stable, weight: 10, backend: \"http://127.0.0.1:1\"}}\n      - name: canary\n        weight: 0\n        backend: \"http://127.0.0.1:2\"\n{ramp}    guardrail: {guardrail}\n"
        );
        let snap = crate::config::load(&doc, "test").unwrap_or_else(|e| panic!("{e:?}"));
        let e = Experiment::new(&snap.routes.routes[0], &Metrics::new());
        (e, snap)
    }

    /// A 500 assigned to `assigned` and answered by `served`.
    fn failed(w: &Weights, assigned: usize, served: usize, randomized: bool) -> Outcome<'_> {
        Outcome {
            weights: w,
            who: Who {
                assigned,
                randomized,
                rerouted: assigned != served,
                served,
                assigned_failed: false,
                status: 500,
            },
            elapsed: Duration::from_millis(1),
            generation: None,
        }
    }

    fn bad(e: &Experiment, w: &Weights, variant: usize) {
        e.observe(failed(w, variant, variant, true));
    }

    const RAMP_FROM_AN_HOUR_AGO: &str =
        "        ramp: {start: START, steps: [{weight: 10, hold: 2h}, {weight: 50, hold: 2h}]}\n";

    fn ramp_started(ago: Duration) -> String {
        let start = SystemTime::now() - ago;
        RAMP_FROM_AN_HOUR_AGO.replace("START", &format!("\"{}\"", rfc3339(start)))
    }

    /// A candidate whose first tokens come late trips a `slow_ttft` guardrail though
    /// every answer is a 200; the control's on-time generations are not bad, and a
    /// slow time per token alone does not count against `slow_ttft`.
    #[test]
    fn late_first_tokens_trip_a_slow_ttft_guardrail() {
        let (e, _snap) = experiment(
            "{control: stable, errors: false, slow_ttft: 500ms, warmup: 0s, min_bad_events: 5}",
            &ramp_started(Duration::from_secs(60)),
        );
        let w = e.weights();
        let generation = |ttft_ms: u64, tpot_ms: u64| crate::metrics::Generation {
            ttft: Some(Duration::from_millis(ttft_ms)),
            tpot: Some(Duration::from_millis(tpot_ms)),
            duration: Duration::from_secs(2),
            output_tokens: Some(40),
            ..Default::default()
        };
        fn ok<'a>(
            w: &'a Weights,
            variant: usize,
            g: &'a crate::metrics::Generation,
        ) -> Outcome<'a> {
            let mut o = failed(w, variant, variant, true);
            o.who.status = 200;
            o.generation = Some(g);
            o
        }
        let (fast, slow_tokens, late) = (
            generation(80, 20),
            generation(80, 900),
            generation(1500, 20),
        );
        for _ in 0..100 {
            e.observe(ok(&w, 0, &fast));
            e.observe(ok(&w, 1, &slow_tokens));
        }
        assert!(lock(&e.state).trips[1].is_none());
        assert_eq!(lock(&e.state).watched[1], (100, 0));
        for _ in 0..100 {
            e.observe(ok(&w, 0, &fast));
            e.observe(ok(&w, 1, &late));
        }
        assert!(lock(&e.state).trips[1].is_some());
        let report = e.report(&_snap.routes.routes[0]);
        let g = &report["variants"][1]["generation"];
        assert_eq!(g["requests"], 200);
        assert_eq!(g["output_tokens_per_request"], 40.0);
        // 40 tokens in the 2 s less the time to the first.
        let tps = g["output_tokens_per_second"].as_f64().unwrap();
        assert!((20.0..40.0).contains(&tps), "{tps}");
        assert_eq!(report["guardrail"]["slow_ttft_ms"], 500.0);
    }

    /// The warmup is on tokio's clock: requests in it are not evidence; after it, the
    /// same failures trip the candidate.
    #[tokio::test(start_paused = true)]
    async fn warmup_ignores_early_requests_then_trips() {
        let (e, _snap) = experiment(
            "{control: stable, warmup: 30s, min_bad_events: 3}",
            &ramp_started(Duration::from_secs(60)),
        );
        let w = e.weights();
        assert_eq!(w.weights, [10.0, 10.0]);
        for _ in 0..200 {
            bad(&e, &w, 1);
        }
        assert!(lock(&e.state).trips[1].is_none());
        assert_eq!(lock(&e.state).watched[1], (0, 0));
        tokio::time::advance(Duration::from_secs(31)).await;
        for _ in 0..200 {
            bad(&e, &w, 1);
        }
        assert!(lock(&e.state).trips[1].is_some());
        assert_eq!(e.weights().weights, [10.0, 0.0]);
        assert_eq!(e.metrics.tripped[1].get(), 1);
        // The control's own bad requests never trip it.
        e.reset();
        tokio::time::advance(Duration::from_secs(31)).await;
        let w = e.weights();
        for _ in 0..200 {
            bad(&e, &w, 0);
        }
        assert!(lock(&e.state).trips.iter().all(Option::is_none));
        assert!(e.metrics.evidence[1].get() < 0.0);
    }

    /// `action: hold` keeps the step the candidate tripped on, whatever the clock says
    /// later; without a trip the ramp moves on.
    #[tokio::test(start_paused = true)]
    async fn hold_freezes_the_ramp_where_it_tripped() {
        let later = SystemTime::now() + Duration::from_secs(2 * 3600);
        let (e, _snap) = experiment(
            "{control: stable, warmup: 0s, min_bad_events: 3, action: hold}",
            &ramp_started(Duration::from_secs(60)),
        );
        assert_eq!(e.compute(&lock(&e.state), later).weights, [10.0, 50.0]);
        let w = e.weights();
        for _ in 0..200 {
            bad(&e, &w, 1);
        }
        assert!(lock(&e.state).trips[1].is_some());
        assert_eq!(e.weights().weights, [10.0, 10.0]);
        assert_eq!(e.compute(&lock(&e.state), later).weights, [10.0, 10.0]);
        let report = e.report(&_snap.routes.routes[0]);
        assert_eq!(report["variants"][1]["ramp"]["state"], "held");
        assert_eq!(report["variants"][1]["guardrail"]["state"], "tripped");
    }

    /// A fleet verdict changes the weights and keeps the counts: `rollback` takes the
    /// candidate to 0, `hold` to the verdict's weight whatever its ramp says later;
    /// the candidate is no longer watched, and the report names who tripped it.
    #[tokio::test(start_paused = true)]
    async fn a_fleet_verdict_sets_the_weights_and_keeps_the_counts() {
        let later = SystemTime::now() + Duration::from_secs(2 * 3600);
        let (e, snap) = experiment(
            "{control: stable, warmup: 0s, min_bad_events: 3, fleet: {max_pods: 8}}",
            &ramp_started(Duration::from_secs(60)),
        );
        assert_eq!(e.guardrail.as_ref().unwrap().local_alpha(), 0.001 / 16.0);
        let w = e.weights();
        e.observe(failed(&w, 1, 1, true));
        let verdict = |action| Verdict {
            action,
            weight: 7.0,
            reason: "fleet".into(),
            evidence_log10: Some(3.5),
            at: "now".into(),
        };
        e.set_verdicts(&[None, Some(verdict(Action::Hold))]);
        assert_eq!(e.weights().weights, [10.0, 7.0]);
        assert_eq!(e.compute(&lock(&e.state), later).weights, [10.0, 7.0]);
        e.set_verdicts(&[None, Some(verdict(Action::Rollback))]);
        assert_eq!(e.weights().weights, [10.0, 0.0]);
        let w = e.weights();
        for _ in 0..50 {
            bad(&e, &w, 1);
        }
        let st = lock(&e.state);
        assert_eq!(st.served[1].requests, 51, "the counts were kept");
        assert_eq!(
            st.evidence[1].events(),
            1,
            "a decided candidate gathers no evidence"
        );
        drop(st);
        let report = e.report(&snap.routes.routes[0]);
        let g = &report["variants"][1]["guardrail"];
        assert_eq!(g["tripped_by"], "fleet");
        assert_eq!(g["verdict"]["action"], "rollback");
        e.set_verdicts(&[None, None]);
        assert_eq!(e.weights().weights, [10.0, 10.0]);
    }

    /// Override-pinned and rerouted requests are neither evidence nor split counts.
    #[tokio::test(start_paused = true)]
    async fn pinned_and_rerouted_requests_are_not_evidence() {
        let (e, _snap) = experiment(
            "{control: stable, warmup: 0s, min_bad_events: 1}",
            &ramp_started(Duration::from_secs(60)),
        );
        let w = e.weights();
        for randomized in [false, true] {
            for _ in 0..200 {
                e.observe(failed(&w, 1, 0, randomized));
            }
        }
        let st = lock(&e.state);
        assert!(st.trips[1].is_none());
        assert_eq!(st.watched[1], (0, 0));
        assert_eq!(st.served[0].requests, 400);
        assert_eq!(st.split.counts().map(|c| c.0).sum::<f64>(), 200.0);
    }
}
