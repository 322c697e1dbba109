//! The fleet's view of each experiment, built round by round from every pod's
//! `/experiments` report. Pure: no I/O and no clock of its own, so the arithmetic that
//! decides a fleet-wide verdict is unit-tested like the pod's.
//!
//! A pod reports, per route, the run its counts belong to (`instance`, a process;
//! `epoch`, one start or reset of the experiment in it; `fingerprint`, the route's
//! settings). The tally remembers, per run, the last values it added; a round adds
//! only what grew since. A restarted pod is a new run that starts from zero, so nothing
//! is counted twice, and the old run's share stays in the sums where it was last read.
//! Pods whose `fingerprint` differs are different experiments (a config change in
//! flight): each is judged on its own.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::route::evidence::{FleetEvidence, Latencies, SplitTest, THETAS};

/// Samples of history kept per experiment for the page (one a round).
const HISTORY: usize = 900;

/// Runs a pod may have been read in without being seen again before they are let go
/// (their counts stay in the sums).
const FORGET_AFTER_ROUNDS: u64 = 30;

/// An experiment across the fleet: one route, one fingerprint.
#[derive(Debug, Serialize, Deserialize)]
struct Experiment {
    variants: Vec<String>,
    control: Option<usize>,
    /// The fleet's test level (`guardrail.alpha`), `None` without a guardrail.
    alpha: Option<f64>,
    /// The route's guardrail is in fleet mode (`guardrail.fleet`): only then does the
    /// controller decide for it. Without it each pod's breaker runs at the full alpha,
    /// and a verdict on top would spend more than the route's alpha.
    #[serde(default)]
    fleet_mode: bool,
    min_bad_events: u64,
    action: String,
    /// Per variant.
    evidence: Vec<FleetEvidence>,
    /// Per variant: watched bad events, summed over runs.
    bad: Vec<u64>,
    split: SplitTest,
    /// What each run had reported when last read, by `pod/instance/epoch`.
    runs: BTreeMap<String, Seen>,
    /// The round each run was last read in.
    #[serde(default)]
    last_read: BTreeMap<String, u64>,
    #[serde(skip)]
    view: View,
}

/// The cumulative values of one run, as last read.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Seen {
    pod: String,
    log_lr: Vec<[f64; THETAS.len()]>,
    events: Vec<u64>,
    bad: Vec<u64>,
    assigned: Vec<f64>,
    expected: Vec<f64>,
}

impl Seen {
    fn new(pod: &str, n: usize) -> Seen {
        Seen {
            pod: pod.to_string(),
            log_lr: vec![[0.0; THETAS.len()]; n],
            events: vec![0; n],
            bad: vec![0; n],
            assigned: vec![0.0; n],
            expected: vec![0.0; n],
        }
    }
}

/// What the report shows, rebuilt each round from the runs read (not kept by a new
/// leader: it is for people, not for the decision).
#[derive(Debug, Default)]
struct View {
    /// Per run key: the last report's per-variant display figures.
    runs: BTreeMap<String, RunView>,
    /// Display figures of runs let go, added up.
    ended: Vec<Figures>,
    /// The totals at the previous round, to draw windows from.
    previous: Vec<Figures>,
    history: VecDeque<Value>,
    /// Per variant: weight and state as the pods report them (the last pod read).
    weights: Vec<Option<f64>>,
    /// Per variant: pods that report their own breaker tripped.
    tripped_by_replica: Vec<Vec<String>>,
    /// Per variant: the verdict the pods report applying, if any.
    verdict: Vec<Option<Value>>,
}

impl View {
    /// What a pod says of variant `i` beyond its counts: its weight, its own breaker's
    /// trip, the verdict it applies.
    fn note(&mut self, i: usize, pod: &str, v: &Value) {
        let g = &v["guardrail"];
        if g["tripped_by"] == "replica" {
            self.tripped_by_replica[i].push(pod.to_string());
        }
        if g["verdict"].is_object() {
            self.verdict[i] = Some(g["verdict"].clone());
        }
        self.weights[i] = match (self.weights[i], v["weight"].as_f64()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
}

#[derive(Debug, Default, Clone)]
struct RunView {
    pod: String,
    figures: Vec<Figures>,
}

/// One variant's display counts.
#[derive(Debug, Default, Clone)]
struct Figures {
    requests: u64,
    errors: u64,
    latency: Latencies,
    ttft: Latencies,
    tpot: Latencies,
    output_tokens: u64,
    generating_s: f64,
}

impl Figures {
    /// A variant's figures as a pod reports them.
    fn from_report(v: &Value) -> Figures {
        let h = &v["histograms"];
        Figures {
            requests: v["requests"].as_u64().unwrap_or(0),
            errors: v["errors"].as_u64().unwrap_or(0),
            latency: sparse(&h["latency"]),
            ttft: sparse(&h["ttft"]),
            tpot: sparse(&h["tpot"]),
            output_tokens: h["output_tokens"].as_u64().unwrap_or(0),
            generating_s: h["generating_s"].as_f64().unwrap_or(0.0),
        }
    }

    fn add(&mut self, o: &Figures) {
        self.requests += o.requests;
        self.errors += o.errors;
        self.latency.add_sparse(&o.latency.sparse());
        self.ttft.add_sparse(&o.ttft.sparse());
        self.tpot.add_sparse(&o.tpot.sparse());
        self.output_tokens += o.output_tokens;
        self.generating_s += o.generating_s;
    }

    fn since(&self, earlier: &Figures) -> Figures {
        Figures {
            requests: self.requests.saturating_sub(earlier.requests),
            errors: self.errors.saturating_sub(earlier.errors),
            latency: self.latency.since(&earlier.latency),
            ttft: self.ttft.since(&earlier.ttft),
            tpot: self.tpot.since(&earlier.tpot),
            output_tokens: self.output_tokens.saturating_sub(earlier.output_tokens),
            generating_s: (self.generating_s - earlier.generating_s).max(0.0),
        }
    }
}

/// What one round adds to an experiment: per variant, the growth of the runs' per-theta
/// products and of their event counts, and the split's counts.
struct Delta {
    log_lr: Vec<[f64; THETAS.len()]>,
    events: Vec<u64>,
    assigned: Vec<f64>,
    expected: Vec<f64>,
}

impl Delta {
    fn new(n: usize) -> Delta {
        Delta {
            log_lr: vec![[0.0; THETAS.len()]; n],
            events: vec![0; n],
            assigned: vec![0.0; n],
            expected: vec![0.0; n],
        }
    }
}

/// A decision for the ConfigMap: the fleet has enough evidence against a candidate.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub route: String,
    pub fingerprint: String,
    pub variant: String,
    pub action: String,
    /// The weight `hold` keeps (the lowest any pod reports for the candidate now).
    pub weight: f64,
    pub reason: String,
    pub evidence_log10: f64,
}

/// Every experiment the fleet runs, by `route/fingerprint`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Tally {
    experiments: BTreeMap<String, Experiment>,
    rounds: u64,
    /// Reports read in the last round.
    #[serde(skip)]
    pods_read: usize,
}

fn f64s(v: &Value) -> impl Iterator<Item = f64> + '_ {
    v.as_array()
        .into_iter()
        .flatten()
        .map(|x| x.as_f64().unwrap_or(0.0))
}

fn sparse(v: &Value) -> Latencies {
    let mut l = Latencies::default();
    let buckets: Vec<(usize, u64)> = v
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| Some((p[0].as_u64()? as usize, p[1].as_u64()?)))
        .collect();
    l.add_sparse(&buckets);
    l
}

impl Tally {
    /// Reads one round of reports (`pod name`, its `/experiments` JSON) and returns what
    /// the fleet now decides, for candidates the pods are not yet told about.
    pub fn round(&mut self, reports: &[(String, Value)]) -> Vec<Decision> {
        self.rounds += 1;
        self.pods_read = reports.len();
        for e in self.experiments.values_mut() {
            e.view.tripped_by_replica.iter_mut().for_each(Vec::clear);
        }
        // What grew since the last round, per experiment, summed over its runs.
        let mut deltas: BTreeMap<String, Delta> = BTreeMap::new();
        for (pod, report) in reports {
            for r in report["routes"].as_array().into_iter().flatten() {
                self.read_route(pod, r, &mut deltas);
            }
        }
        let mut decisions = Vec::new();
        for (key, e) in &mut self.experiments {
            if let Some(d) = deltas.get(key) {
                e.add(d);
            }
            e.forget_stale(self.rounds);
            e.sample();
            let (route, fingerprint) = key.rsplit_once('/').unwrap_or((key, ""));
            decisions.extend(e.decide(route, fingerprint));
        }
        decisions
    }

    /// One route of one pod's report: its run's growth goes into `deltas`.
    fn read_route(&mut self, pod: &str, r: &Value, deltas: &mut BTreeMap<String, Delta>) {
        let Some(route) = r["route"].as_str() else {
            return;
        };
        let run = &r["run"];
        let (Some(instance), Some(epoch), Some(fp)) = (
            run["instance"].as_str(),
            run["epoch"].as_u64(),
            run["fingerprint"].as_str(),
        ) else {
            return; // a braid too old to report its run
        };
        let variants: Vec<String> = r["variants"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v["name"].as_str().map(str::to_string))
            .collect();
        let key = format!("{route}/{fp}");
        let e = self
            .experiments
            .entry(key.clone())
            .or_insert_with(|| Experiment::from_report(r, &variants));
        if e.variants != variants {
            return; // the same settings digest names the same variants
        }
        let n = variants.len();
        let d = deltas.entry(key).or_insert_with(|| Delta::new(n));
        e.read_run(pod, &format!("{pod}/{instance}/{epoch}"), r, d, self.rounds);
    }

    /// The fleet's report, in the shape of a pod's `/experiments` (so `braid
    /// experiments` and the page read both), with each pod's share and the history.
    pub fn report(&self) -> Value {
        let routes: Vec<Value> = self
            .experiments
            .iter()
            .map(|(key, e)| {
                let (route, fp) = key.rsplit_once('/').unwrap_or((key, ""));
                e.report(route, fp)
            })
            .collect();
        json!({"fleet": {"rounds": self.rounds, "pods_read": self.pods_read}, "routes": routes})
    }

    /// The decision state a new leader takes over (the Lease carries it).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn from_json(text: &str) -> Result<Tally, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// The fleet's log10 e-value for a candidate, for metrics.
    pub fn evidence(&self) -> Vec<(String, String, f64)> {
        let mut out = Vec::new();
        for (key, e) in &self.experiments {
            let route = key.rsplit_once('/').map_or(key.as_str(), |(r, _)| r);
            for (i, v) in e.variants.iter().enumerate() {
                if e.alpha.is_some() && Some(i) != e.control {
                    out.push((route.to_string(), v.clone(), e.evidence[i].log10_e()));
                }
            }
        }
        out
    }
}

impl Experiment {
    /// A new experiment, as the first pod that runs it reports it.
    fn from_report(r: &Value, variants: &[String]) -> Experiment {
        let n = variants.len();
        let g = &r["guardrail"];
        Experiment {
            control: r["control"]
                .as_str()
                .and_then(|c| variants.iter().position(|v| v == c)),
            alpha: g["alpha"].as_f64(),
            fleet_mode: g["fleet_max_pods"].is_u64(),
            min_bad_events: g["min_bad_events"].as_u64().unwrap_or(1),
            action: g["action"].as_str().unwrap_or("rollback").to_string(),
            evidence: (0..n).map(|_| FleetEvidence::new()).collect(),
            bad: vec![0; n],
            split: SplitTest::new(n),
            runs: BTreeMap::new(),
            last_read: BTreeMap::new(),
            view: View::default(),
            variants: variants.to_vec(),
        }
    }

    /// One run's report of this experiment: what grew since it was last read goes into
    /// `d`, its display figures replace the last ones.
    fn read_run(&mut self, pod: &str, run_key: &str, r: &Value, d: &mut Delta, round: u64) {
        let n = self.variants.len();
        // A view taken over from a Lease starts empty (it is not carried).
        self.view.weights.resize(n, None);
        self.view.tripped_by_replica.resize(n, Vec::new());
        self.view.verdict.resize(n, None);
        let seen = self
            .runs
            .entry(run_key.to_string())
            .or_insert_with(|| Seen::new(pod, n));
        self.last_read.insert(run_key.to_string(), round);
        let split: Vec<&Value> = r["split"]["variants"]
            .as_array()
            .into_iter()
            .flatten()
            .collect();
        let mut figures = Vec::with_capacity(n);
        for (i, v) in r["variants"].as_array().into_iter().flatten().enumerate() {
            let g = &v["guardrail"];
            let mut now = [0.0; THETAS.len()];
            for (k, x) in f64s(&g["log_lr"]).take(THETAS.len()).enumerate() {
                now[k] = x;
            }
            let events = g["evidence_events"].as_u64().unwrap_or(0);
            let bad = v["watched"]["bad"].as_u64().unwrap_or(0);
            // A run's values only grow; if one shrank, the run was not what its name
            // said, and only growth is added.
            if events >= seen.events[i] {
                for (k, x) in now.iter().enumerate() {
                    d.log_lr[i][k] += x - seen.log_lr[i][k];
                }
                d.events[i] += events - seen.events[i];
                seen.log_lr[i] = now;
                seen.events[i] = events;
            }
            self.bad[i] += bad.saturating_sub(seen.bad[i]);
            seen.bad[i] = seen.bad[i].max(bad);
            if let Some(s) = split.get(i) {
                let assigned = s["assigned"].as_f64().unwrap_or(0.0);
                let expected = s["expected_sum"].as_f64().unwrap_or(0.0);
                d.assigned[i] += (assigned - seen.assigned[i]).max(0.0);
                d.expected[i] += (expected - seen.expected[i]).max(0.0);
                seen.assigned[i] = seen.assigned[i].max(assigned);
                seen.expected[i] = seen.expected[i].max(expected);
            }
            self.view.note(i, pod, v);
            figures.push(Figures::from_report(v));
        }
        self.view.runs.insert(
            run_key.to_string(),
            RunView {
                pod: pod.to_string(),
                figures,
            },
        );
    }

    /// Adds a round's growth to the fleet's evidence and split check.
    fn add(&mut self, d: &Delta) {
        for i in 0..self.variants.len() {
            if Some(i) != self.control {
                self.evidence[i].round(&d.log_lr[i], d.events[i]);
            }
        }
        self.split.observe_counts(&d.assigned, &d.expected);
    }

    /// Runs not read for a while (their pod is gone): their counts stay in the sums,
    /// their display figures move to `ended`.
    fn forget_stale(&mut self, round: u64) {
        let stale: Vec<String> = self
            .last_read
            .iter()
            .filter(|(_, r)| round - **r > FORGET_AFTER_ROUNDS)
            .map(|(k, _)| k.clone())
            .collect();
        for k in stale {
            self.last_read.remove(&k);
            self.runs.remove(&k);
            if let Some(run) = self.view.runs.remove(&k) {
                self.view
                    .ended
                    .resize(self.variants.len(), Figures::default());
                for (t, f) in self.view.ended.iter_mut().zip(&run.figures) {
                    t.add(f);
                }
            }
        }
    }

    /// What the fleet decides now: a candidate the pods are not yet told about, with
    /// enough evidence, or whose own breaker tripped on some replica. Only in fleet mode.
    fn decide(&self, route: &str, fingerprint: &str) -> Vec<Decision> {
        let (Some(alpha), Some(control), true) = (self.alpha, self.control, self.fleet_mode) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for i in 0..self.variants.len() {
            if i == control || self.view.verdict.get(i).is_some_and(Option::is_some) {
                continue;
            }
            let ev = self.evidence[i].log10_e();
            let by_fleet =
                self.bad[i] >= self.min_bad_events && self.evidence[i].exceeds(alpha / 2.0);
            let by_replica = self.view.tripped_by_replica.get(i).and_then(|p| p.first());
            let reason = match (by_fleet, by_replica) {
                (true, _) => format!(
                    "fleet evidence 10^{ev:.2} reached 10^{:.2} (alpha {alpha} / 2) over {} bad events from {} runs",
                    -(alpha / 2.0).log10(),
                    self.evidence[i].events,
                    self.runs.len()
                ),
                (false, Some(pod)) => {
                    format!("the guardrail of replica {pod} tripped (its local breaker)")
                }
                (false, None) => continue,
            };
            out.push(Decision {
                route: route.to_string(),
                fingerprint: fingerprint.to_string(),
                variant: self.variants[i].clone(),
                action: self.action.clone(),
                weight: self.view.weights.get(i).copied().flatten().unwrap_or(0.0),
                reason,
                evidence_log10: ev,
            });
        }
        out
    }

    /// Per variant: the fleet's totals (runs read plus runs let go).
    fn totals(&self) -> Vec<Figures> {
        let n = self.variants.len();
        let mut t = self.view.ended.clone();
        t.resize(n, Figures::default());
        for run in self.view.runs.values() {
            for (a, f) in t.iter_mut().zip(&run.figures) {
                a.add(f);
            }
        }
        t
    }

    /// Adds this round's window to the history.
    fn sample(&mut self) {
        let totals = self.totals();
        let mut previous = std::mem::take(&mut self.view.previous);
        previous.resize(totals.len(), Figures::default());
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let variants: Vec<Value> = totals
            .iter()
            .zip(&previous)
            .enumerate()
            .map(|(i, (now, before))| {
                let w = now.since(before);
                json!({
                    "requests": w.requests,
                    "error_rate": (w.requests > 0).then(|| w.errors as f64 / w.requests as f64),
                    "p50_ms": w.latency.quantile_ms(0.5),
                    "p95_ms": w.latency.quantile_ms(0.95),
                    "p99_ms": w.latency.quantile_ms(0.99),
                    "ttft_p50_ms": w.ttft.quantile_ms(0.5),
                    "tpot_p50_ms": w.tpot.quantile_ms(0.5),
                    "evidence_log10": (self.alpha.is_some() && Some(i) != self.control)
                        .then(|| self.evidence[i].log10_e()),
                })
            })
            .collect();
        self.view
            .history
            .push_back(json!({"t": t, "variants": variants}));
        while self.view.history.len() > HISTORY {
            self.view.history.pop_front();
        }
        self.view.previous = totals;
    }

    fn report(&self, route: &str, fingerprint: &str) -> Value {
        let totals = self.totals();
        // Per pod: its requests per variant (the runs read now).
        let mut pods: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
        for run in self.view.runs.values() {
            let p = pods
                .entry(run.pod.as_str())
                .or_insert_with(|| vec![0; self.variants.len()]);
            for (a, f) in p.iter_mut().zip(&run.figures) {
                *a += f.requests;
            }
        }
        let fleet_requests: u64 = pods.values().flatten().sum();
        let variants: Vec<Value> = self
            .variants
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let f = &totals[i];
                let rate = |n: u64, of: u64| (of > 0).then(|| n as f64 / of as f64);
                let guardrail = self.alpha.map(|alpha| {
                    if Some(i) == self.control {
                        return json!({"state": "control"});
                    }
                    let verdict = self.view.verdict.get(i).cloned().flatten();
                    json!({
                        "state": if verdict.is_some() { "tripped" } else { "watching" },
                        "tripped_by": verdict.is_some().then_some("fleet"),
                        "verdict": verdict,
                        "evidence_log10": self.evidence[i].log10_e(),
                        "evidence_from_start_log10": self.evidence[i].from_start_log10(),
                        "trips_at_log10": -(alpha / 2.0).log10(),
                        "bad_events": self.bad[i],
                        "replicas_tripped": self.view.tripped_by_replica.get(i),
                    })
                });
                json!({
                    "name": name,
                    "weight": self.view.weights.get(i).copied().flatten(),
                    "requests": f.requests,
                    "errors": f.errors,
                    "error_rate": rate(f.errors, f.requests),
                    "latency_ms": f.latency.report_ms(&[("p50", 0.5), ("p95", 0.95), ("p99", 0.99)]),
                    "generation": (f.ttft.count() > 0).then(|| json!({
                        "requests": f.ttft.count(),
                        "ttft_ms": f.ttft.report_ms(&[("p50", 0.5), ("p95", 0.95)]),
                        "tpot_ms": f.tpot.report_ms(&[("p50", 0.5)]),
                        "output_tokens_per_second": (f.generating_s > 0.0)
                            .then(|| f.output_tokens as f64 / f.generating_s),
                    })),
                    "guardrail": guardrail,
                })
            })
            .collect();
        let split = self.split.report(self.variants.iter().map(String::as_str));
        json!({
            "route": route,
            "experiment": fingerprint,
            "control": self.control.map(|c| &self.variants[c]),
            "guardrail": self.alpha.map(|a| json!({
                "alpha": a,
                "fleet_alpha": a / 2.0,
                "fleet_mode": self.fleet_mode,
                "min_bad_events": self.min_bad_events,
                "action": self.action,
            })),
            "split": {
                "healthy": !self.split.mismatch(),
                "evidence_log10": self.split.log10_e(),
                "chi_square": self.split.chi_square(),
                "variants": split,
            },
            "variants": variants,
            "pods": pods.iter().map(|(pod, req)| {
                let total: u64 = req.iter().sum();
                json!({
                    "pod": pod,
                    "requests": req,
                    "share": (fleet_requests > 0).then(|| total as f64 / fleet_requests as f64),
                })
            }).collect::<Vec<_>>(),
            "runs": self.runs.len(),
            "history": self.view.history,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pod's report of one route: `bad` candidate failures out of `requests`, its
    /// evidence as `log_lr` (the same for every theta, for the test).
    fn report(instance: &str, epoch: u64, requests: u64, bad: u64, log_lr: f64) -> Value {
        json!({"routes": [{
            "route": "m",
            "run": {"instance": instance, "epoch": epoch, "fingerprint": "fp"},
            "control": "stable",
            "guardrail": {"alpha": 0.001, "min_bad_events": 1, "action": "rollback", "fleet_max_pods": 16},
            "split": {"variants": [
                {"name": "stable", "assigned": requests, "expected_sum": requests as f64},
                {"name": "canary", "assigned": requests, "expected_sum": requests as f64}]},
            "variants": [
                {"name": "stable", "weight": 50, "requests": requests, "errors": 0,
                 "watched": {"bad": 0}, "guardrail": {"state": "control"},
                 "histograms": {"latency": [[40, requests]]}},
                {"name": "canary", "weight": 50, "requests": requests, "errors": bad,
                 "watched": {"bad": bad},
                 "guardrail": {"state": "watching", "log_lr": vec![log_lr; 5], "evidence_events": bad},
                 "histograms": {"latency": [[48, requests]]}},
            ],
        }]})
    }

    fn fleet_bad(t: &Tally) -> (u64, u64) {
        let r = t.report();
        let v = &r["routes"][0]["variants"][1];
        (
            v["guardrail"]["bad_events"].as_u64().unwrap(),
            v["requests"].as_u64().unwrap(),
        )
    }

    /// A pod read twice adds only what grew; a restarted pod (new instance) is a new
    /// run from zero whose counts add to the old run's last values; a pod that was not
    /// reachable for a round adds its growth when it is read again.
    #[test]
    fn restarts_and_missed_rounds_count_everything_once() {
        let mut t = Tally::default();
        let pod = |n: &str, v: Value| (n.to_string(), v);
        t.round(&[
            pod("a", report("i1", 1, 10, 2, 0.5)),
            pod("b", report("i2", 1, 10, 1, 0.2)),
        ]);
        assert_eq!(fleet_bad(&t), (3, 20));
        t.round(&[
            pod("a", report("i1", 1, 20, 4, 1.0)),
            pod("b", report("i2", 1, 10, 1, 0.2)),
        ]);
        assert_eq!(fleet_bad(&t), (5, 30));
        // b restarts (a new instance, its counts from zero); a is missed this round.
        t.round(&[pod("b", report("i3", 1, 5, 1, 0.3))]);
        assert_eq!(fleet_bad(&t).0, 6);
        t.round(&[
            pod("a", report("i1", 1, 30, 6, 1.5)),
            pod("b", report("i3", 1, 5, 1, 0.3)),
        ]);
        assert_eq!(fleet_bad(&t), (8, 30 + 10 + 5));
        // The fleet's product: a's 1.5 + b's old 0.2 + b's new 0.3, per theta.
        let e = &t.experiments["m/fp"].evidence[1];
        let mut one_pod = FleetEvidence::new();
        one_pod.round(&[2.0; THETAS.len()], 8);
        assert!(e.mix_from_start_equals(&one_pod));
        // The state a new leader takes over reads back the same.
        let mut back = Tally::from_json(&t.to_json()).unwrap();
        assert_eq!(back.experiments["m/fp"].bad, vec![0, 8]);
        assert_eq!(back.experiments["m/fp"].runs.len(), 3);
        // ...and goes on from it: only a's growth since is added.
        back.round(&[pod("a", report("i1", 1, 40, 7, 1.6))]);
        assert_eq!(back.experiments["m/fp"].bad, vec![0, 9]);
    }

    /// Enough evidence is a decision (once the pods report the verdict applied, no
    /// more); a replica's own tripped breaker is one too.
    #[test]
    fn decisions_come_from_the_fleet_or_a_tripped_replica() {
        let mut t = Tally::default();
        let d = t.round(&[("a".into(), report("i1", 1, 100, 20, 0.0))]);
        assert!(d.is_empty());
        let d = t.round(&[("a".into(), report("i1", 1, 200, 40, 12.0))]);
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(
            (d[0].variant.as_str(), d[0].action.as_str()),
            ("canary", "rollback")
        );
        assert!(d[0].reason.contains("fleet evidence"), "{}", d[0].reason);
        let mut applied = report("i1", 1, 200, 40, 12.0);
        applied["routes"][0]["variants"][1]["guardrail"]["verdict"] = json!({"action": "rollback"});
        assert!(t.round(&[("a".into(), applied)]).is_empty());

        // A route not in fleet mode is reported, never decided for.
        let mut t = Tally::default();
        let mut alone = report("i1", 1, 200, 40, 12.0);
        alone["routes"][0]["guardrail"]["fleet_max_pods"] = Value::Null;
        assert!(t.round(&[("a".into(), alone.clone())]).is_empty());
        assert!(t.round(&[("a".into(), alone)]).is_empty());

        let mut t = Tally::default();
        let mut tripped = report("i1", 1, 10, 3, 0.1);
        tripped["routes"][0]["variants"][1]["guardrail"]["tripped_by"] = json!("replica");
        let d = t.round(&[("pod-7".into(), tripped)]);
        assert!(d[0].reason.contains("replica pod-7"), "{d:?}");
    }
}
