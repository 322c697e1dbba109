//! The statistics behind guardrails, split health and the experiment report. Pure
//! arithmetic: no clocks, no locks, no I/O, so the simulations below can run a
//! thousand experiments in a unit test.
//!
//! **Guardrail evidence** is an e-process for "the candidate's bad events are no more
//! frequent than the control's". Each bad event (an error, or a request slower than
//! `slow`) from the pair is one observation: under the null hypothesis it came from the
//! candidate with probability `pi`, the candidate's share of the pair's traffic at the
//! moment that request was assigned, whatever the shares do over time (ramps, a tripped
//! guardrail, a reload). Under the alternative that the candidate's bad rate is `theta`
//! times the control's, that probability is `theta pi / (theta pi + 1 - pi)`. The
//! likelihood ratio of each event has expectation one under the null, so their running
//! product is a test martingale, and by Ville's inequality it ever exceeds `1/alpha`
//! with probability at most `alpha` however often it is checked (Ramdas, Grünwald,
//! Vovk and Shafer, "Game-theoretic statistics and safe anytime-valid inference",
//! Statistical Science 2023; Howard, Ramdas, McAuliffe and Sekhon, "Time-uniform,
//! nonparametric, nonasymptotic confidence sequences", Annals of Statistics 2021).
//!
//! The product is mixed over relative risks `theta` in `THETAS`, and over when the
//! candidate went bad: half the prior weight starts at the first event, half is spread
//! over later start points (weight `1/((s+1)(s+2))` at event `s`). A mixture of test
//! martingales is one, so the bound holds; the second half keeps a candidate that was
//! healthy for hours and then breaks from having to climb out of the evidence its good
//! hours piled up against it.
//!
//! **Split health** tests that assignments follow the configured shares with an
//! e-process whose alternative is a plug-in estimate of the real shares from earlier
//! assignments only (a predictable plug-in, so it stays a test martingale).
//!
//! **Confidence sequences** for a rate and a difference of rates use the two-sided
//! normal mixture boundary for 1/2-sub-Gaussian observations (Howard et al. 2021,
//! eq. 14 with the Bernoulli variance bound), so a report read at any moment is valid.

/// Relative risks the guardrail's evidence is mixed over.
pub const THETAS: [f64; 5] = [1.25, 1.5, 2.0, 3.0, 5.0];

/// `THETAS` as the `theta` label of `braid_guardrail_log_lr`.
pub const THETA_NAMES: [&str; THETAS.len()] = ["1.25", "1.5", "2", "3", "5"];

/// `ln(exp(a) + exp(b))` without overflow.
fn log_add(a: f64, b: f64) -> f64 {
    if a == f64::NEG_INFINITY {
        return b;
    }
    if b == f64::NEG_INFINITY {
        return a;
    }
    let m = a.max(b);
    m + ((a - m).exp() + (b - m).exp()).ln()
}

/// A mixture over `THETAS` and over start points of products of likelihood ratios:
/// the arithmetic both the pod's evidence and the fleet's share. A start point is
/// opened before the observations it covers, with prior weight `1/((k+1)(k+2))` for
/// the `k`th, so the weights sum to one and the mixture stays a test martingale.
#[derive(Debug, Clone)]
struct Mixture {
    /// Per theta: ln of the product since the first observation.
    from_start: [f64; THETAS.len()],
    /// Per theta: ln of the start-point mixture `sum_s q_s prod_{s..t}`.
    changepoint: [f64; THETAS.len()],
    /// Start points opened so far.
    starts: u64,
}

impl Default for Mixture {
    fn default() -> Self {
        Mixture {
            from_start: [0.0; THETAS.len()],
            changepoint: [f64::NEG_INFINITY; THETAS.len()],
            starts: 0,
        }
    }
}

impl Mixture {
    /// Opens the next start point: from here on its product grows with the others.
    fn open(&mut self) {
        let s = self.starts as f64;
        let log_q = -((s + 1.0) * (s + 2.0)).ln();
        for c in &mut self.changepoint {
            *c = log_add(*c, log_q);
        }
        self.starts += 1;
    }

    /// Multiplies every product by its theta's likelihood ratio (given as logarithms).
    fn add(&mut self, log_lr: &[f64; THETAS.len()]) {
        for (k, lr) in log_lr.iter().enumerate() {
            self.from_start[k] += lr;
            self.changepoint[k] += lr;
        }
    }

    /// ln of the e-value: half the start mixture, half the changepoint mixture, each
    /// averaged over `THETAS`. Start points not opened yet count at their prior weight
    /// (`1/(n+1)` after `n`): their products are still one.
    fn log_e(&self) -> f64 {
        let avg = |xs: &mut dyn Iterator<Item = f64>| {
            xs.fold(f64::NEG_INFINITY, log_add) - (THETAS.len() as f64).ln()
        };
        let unstarted = -(self.starts as f64 + 1.0).ln();
        let start = avg(&mut self.from_start.iter().copied());
        let changepoint = avg(&mut self.changepoint.iter().map(|&c| log_add(c, unstarted)));
        log_add(start, changepoint) - std::f64::consts::LN_2
    }
}

/// Per theta, ln of one bad event's likelihood ratio: `candidate` says which arm it
/// came from, `pi` is the candidate's share of the pair's traffic.
fn event_log_lr(candidate: bool, pi: f64) -> [f64; THETAS.len()] {
    THETAS.map(|theta| {
        let denom = theta * pi + 1.0 - pi;
        if candidate {
            (theta / denom).ln()
        } else {
            -denom.ln()
        }
    })
}

/// The guardrail's e-process for one candidate against the control.
#[derive(Debug, Clone, Default)]
pub struct Evidence {
    /// One start point per bad event from the pair.
    mix: Mixture,
}

impl Evidence {
    /// One bad event from the pair: `candidate` says which arm it came from, `pi` is the
    /// candidate's share of the pair's traffic when its request was assigned.
    pub fn observe(&mut self, candidate: bool, pi: f64) {
        if !(pi > 0.0 && pi < 1.0) {
            // Only one arm could have had it: no information, factor one.
            return;
        }
        self.mix.open();
        self.mix.add(&event_log_lr(candidate, pi));
    }

    /// ln of the e-value.
    pub fn log_e(&self) -> f64 {
        self.mix.log_e()
    }

    /// log10 of the e-value, as the report and `braid_guardrail_evidence` show it.
    pub fn log10_e(&self) -> f64 {
        self.log_e() / std::f64::consts::LN_10
    }

    /// Whether the evidence has reached `1/alpha`.
    pub fn exceeds(&self, alpha: f64) -> bool {
        self.log_e() >= -alpha.ln()
    }

    /// Per theta, ln of the product of every event's likelihood ratio so far: what a
    /// fleet adds up across pods (products of disjoint traffic multiply).
    pub fn log_lr(&self) -> [f64; THETAS.len()] {
        self.mix.from_start
    }

    /// Bad events from the pair that carried information.
    pub fn events(&self) -> u64 {
        self.mix.starts
    }
}

/// The fleet's e-process for one candidate, from the pods' per-theta products.
///
/// For each theta the product over pods of each pod's product is the product over
/// every bad event in the fleet: one pod that saw all the traffic would hold the same
/// number. Each event moves exactly one pod's factor and, under the null, has
/// conditional expectation one given everything before it in any pod, so the product
/// is a test martingale on the fleet's joint history, and so is the mixture over
/// thetas. A pod's factor that stops (the pod restarted, or left) is a stopped
/// martingale: it keeps its last value, and the new pod's process is a new factor that
/// starts at one. Start points for the changepoint half are opened per round, only
/// after a round that saw a bad event, which is decided before the round's data, so
/// the mixture's weights are predictable and it stays a test martingale.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct FleetEvidence {
    #[serde(with = "mixture_serde")]
    mix: Mixture,
    /// The last round saw a bad event: the next opens a start point.
    open_next: bool,
    /// Bad events counted across the fleet.
    pub events: u64,
}

impl FleetEvidence {
    pub fn new() -> FleetEvidence {
        FleetEvidence {
            open_next: true,
            ..Default::default()
        }
    }

    /// One round: `log_lr` per theta is how much the pods' products grew since the last
    /// round (their logarithms summed), `events` how many bad events that took.
    pub fn round(&mut self, log_lr: &[f64; THETAS.len()], events: u64) {
        if self.open_next {
            self.mix.open();
        }
        self.mix.add(log_lr);
        self.events += events;
        self.open_next = events > 0;
    }

    pub fn log10_e(&self) -> f64 {
        self.mix.log_e() / std::f64::consts::LN_10
    }

    /// log10 of the "from the start" half alone (a lower bound of the e-value): what a
    /// PromQL sum over the pods' `braid_guardrail_log_lr` computes.
    pub fn from_start_log10(&self) -> f64 {
        let sum = self
            .mix
            .from_start
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, log_add);
        (sum - (2.0 * THETAS.len() as f64).ln()) / std::f64::consts::LN_10
    }

    pub fn exceeds(&self, alpha: f64) -> bool {
        self.mix.log_e() >= -alpha.ln()
    }

    /// Whether both hold the same per-theta products (for tests of what a fleet adds).
    #[cfg(test)]
    pub fn mix_from_start_equals(&self, other: &FleetEvidence) -> bool {
        self.mix
            .from_start
            .iter()
            .zip(&other.mix.from_start)
            .all(|(a, b)| (a - b).abs() < 1e-12)
    }
}

/// `Mixture` as three plain fields (the changepoint's -inf as null, JSON has none).
mod mixture_serde {
    use super::{Mixture, THETAS};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    struct Plain {
        from_start: [f64; THETAS.len()],
        changepoint: [Option<f64>; THETAS.len()],
        starts: u64,
    }

    pub fn serialize<S: Serializer>(m: &Mixture, s: S) -> Result<S::Ok, S::Error> {
        Plain {
            from_start: m.from_start,
            changepoint: m.changepoint.map(|c| c.is_finite().then_some(c)),
            starts: m.starts,
        }
        .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Mixture, D::Error> {
        let p = Plain::deserialize(d)?;
        Ok(Mixture {
            from_start: p.from_start,
            changepoint: p.changepoint.map(|c| c.unwrap_or(f64::NEG_INFINITY)),
            starts: p.starts,
        })
    }
}

/// The sample-ratio-mismatch e-process over assignments.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SplitTest {
    /// Per variant: assignments seen.
    observed: Vec<f64>,
    /// Per variant: the sum of its expected shares over the same assignments.
    expected: Vec<f64>,
    /// ln of the e-value up to the last fold.
    log_e: f64,
    /// The likelihood ratios since the last fold, multiplied (no logarithm per request).
    pending: f64,
    /// `pending` at which the e-value reaches `1 / SPLIT_ALPHA`.
    pending_limit: f64,
    /// Observations since the last fold.
    unfolded: u32,
}

/// The split is flagged when the evidence reaches `1 / SPLIT_ALPHA`.
pub const SPLIT_ALPHA: f64 = 0.001;

impl SplitTest {
    pub fn new(variants: usize) -> Self {
        SplitTest {
            observed: vec![0.0; variants],
            expected: vec![0.0; variants],
            log_e: 0.0,
            pending: 1.0,
            pending_limit: 1.0 / SPLIT_ALPHA,
            unfolded: 0,
        }
    }

    /// Moves the pending product into `log_e`, every 32 observations (before it can
    /// over- or underflow) and when the e-value is read.
    fn fold(&mut self) {
        self.log_e += self.pending.ln();
        self.pending = 1.0;
        self.unfolded = 0;
        self.pending_limit = (-SPLIT_ALPHA.ln() - self.log_e).exp();
    }

    /// One assignment to `chosen` while the configured shares were `shares` (summing
    /// to one).
    pub fn observe(&mut self, chosen: usize, shares: &[f64]) {
        let p = shares[chosen];
        if p <= 0.0 || shares.len() != self.observed.len() {
            return;
        }
        // The plug-in alternative: each variant's share scaled by how far its earlier
        // assignments ran from expectation (smoothed by one, so it starts at the null).
        let ratio = |k: usize| (self.observed[k] + 1.0) / (self.expected[k] + 1.0);
        let norm: f64 = shares.iter().enumerate().map(|(k, s)| s * ratio(k)).sum();
        if norm > 0.0 {
            self.pending *= ratio(chosen) / norm;
            self.unfolded += 1;
            if self.unfolded == 32 {
                self.fold();
            }
        }
        self.observed[chosen] += 1.0;
        for (e, s) in self.expected.iter_mut().zip(shares) {
            *e += s;
        }
    }

    /// A round of assignments across a fleet: `observed[k]` went to variant `k`, whose
    /// shares over the same assignments summed to `expected[k]`. With the shares
    /// constant within the round the counts are multinomial under the null, and the
    /// plug-in alternative's ratio (fixed before the round) has expectation one.
    pub fn observe_counts(&mut self, observed: &[f64], expected: &[f64]) {
        let total: f64 = expected.iter().sum();
        if total <= 0.0 || observed.len() != self.observed.len() {
            return;
        }
        let ratio = |k: usize| (self.observed[k] + 1.0) / (self.expected[k] + 1.0);
        let norm: f64 = expected
            .iter()
            .enumerate()
            .map(|(k, e)| e / total * ratio(k))
            .sum();
        if norm > 0.0 {
            let log_lr: f64 = observed
                .iter()
                .enumerate()
                .filter(|&(k, n)| *n > 0.0 && expected[k] > 0.0)
                .map(|(k, n)| n * (ratio(k) / norm).ln())
                .sum();
            self.fold();
            self.log_e += log_lr;
            self.fold();
        }
        for k in 0..self.observed.len() {
            self.observed[k] += observed[k];
            self.expected[k] += expected[k];
        }
    }

    pub fn log10_e(&self) -> f64 {
        (self.log_e + self.pending.ln()) / std::f64::consts::LN_10
    }

    pub fn mismatch(&self) -> bool {
        self.pending >= self.pending_limit
    }

    /// Per variant: (assignments, expected assignments).
    pub fn counts(&self) -> impl Iterator<Item = (f64, f64)> + '_ {
        self.observed
            .iter()
            .copied()
            .zip(self.expected.iter().copied())
    }

    /// Per variant, as reports show it: its name, assignments, expected assignments
    /// (rounded for people, and whole for a fleet to add up).
    pub fn report<'a>(&self, names: impl Iterator<Item = &'a str>) -> Vec<serde_json::Value> {
        self.counts()
            .zip(names)
            .map(|((o, e), n)| {
                serde_json::json!({"name": n, "assigned": o, "expected": (e * 10.0).round() / 10.0, "expected_sum": e})
            })
            .collect()
    }

    /// Pearson's chi-square statistic of the counts, for readers who know that one.
    pub fn chi_square(&self) -> f64 {
        self.counts()
            .filter(|&(_, e)| e > 0.0)
            .map(|(o, e)| (o - e) * (o - e) / e)
            .sum()
    }
}

/// Half-width of a time-uniform confidence sequence for the mean of `n` observations
/// in [0, 1], two-sided at level `alpha`. Tuned to be tightest near 1,000 observations.
pub fn rate_radius(n: u64, alpha: f64) -> f64 {
    if n == 0 {
        return 1.0;
    }
    let n = n as f64;
    let v = n / 4.0; // variance bound of a [0, 1] observation, summed
    // Howard et al.'s choice of rho for an intrinsic time of 250 (n = 1,000).
    let l = 2.0 * (2.0 / alpha).ln();
    let rho = 250.0 / (l + (1.0 + l).ln());
    let boundary = ((v + rho) * ((v + rho) / rho / (alpha / 2.0).powi(2)).ln()).sqrt();
    (boundary / n).min(1.0)
}

/// An estimate with a confidence interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interval {
    pub estimate: f64,
    pub low: f64,
    pub high: f64,
}

/// The difference of two rates (`bad_a/n_a - bad_b/n_b`) with an anytime-valid
/// interval at level `alpha` (each rate's sequence at `alpha/2`, a union bound).
pub fn rate_difference(bad_a: u64, n_a: u64, bad_b: u64, n_b: u64, alpha: f64) -> Interval {
    let rate = |bad: u64, n: u64| if n == 0 { 0.0 } else { bad as f64 / n as f64 };
    let estimate = rate(bad_a, n_a) - rate(bad_b, n_b);
    let r = rate_radius(n_a, alpha / 2.0) + rate_radius(n_b, alpha / 2.0);
    Interval {
        estimate,
        low: (estimate - r).max(-1.0),
        high: (estimate + r).min(1.0),
    }
}

/// Latencies in buckets eight per doubling (from 1 µs to about 70 minutes), for the
/// report's quantiles: within 7% of the true value, in constant memory.
#[derive(Debug, Clone)]
pub struct Latencies {
    buckets: Vec<u64>,
    count: u64,
}

const LATENCY_BUCKETS: usize = 256;

impl Default for Latencies {
    fn default() -> Self {
        Latencies {
            buckets: vec![0; LATENCY_BUCKETS],
            count: 0,
        }
    }
}

impl Latencies {
    pub fn record(&mut self, d: std::time::Duration) {
        // Bucket `8e + m + 1` holds (1 + m/8) 2^e µs up to (1 + (m+1)/8) 2^e µs: the
        // exponent and top three mantissa bits of the float, with no logarithm.
        let us = d.as_nanos() as f64 / 1e3;
        let i = if us < 1.0 {
            0
        } else {
            let bits = us.to_bits();
            let exponent = ((bits >> 52) & 0x7ff) as usize - 1023;
            (exponent * 8 + ((bits >> 49) & 7) as usize + 1).min(LATENCY_BUCKETS - 1)
        };
        self.buckets[i] += 1;
        self.count += 1;
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// The `q` quantile in milliseconds, to the microsecond, as reports show it.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        self.quantile(q).map(|s| (s * 1e6).round() / 1e3)
    }

    /// `{"p50": ms, ...}` for the named quantiles, as reports show them.
    pub fn report_ms(&self, quantiles: &[(&str, f64)]) -> serde_json::Value {
        quantiles
            .iter()
            .map(|&(name, q)| (name.to_string(), self.quantile_ms(q).into()))
            .collect::<serde_json::Map<_, _>>()
            .into()
    }

    /// The buckets that hold something, as (index, count): what a pod reports so a
    /// fleet can add its latencies up.
    pub fn sparse(&self) -> Vec<(usize, u64)> {
        self.buckets
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(i, n)| (i, *n))
            .collect()
    }

    /// Adds buckets given as `sparse` gives them (an index out of range is ignored).
    pub fn add_sparse(&mut self, buckets: &[(usize, u64)]) {
        for &(i, n) in buckets {
            if let Some(b) = self.buckets.get_mut(i) {
                *b += n;
                self.count += n;
            }
        }
    }

    /// What was recorded since `earlier` (a copy of these latencies taken before).
    pub fn since(&self, earlier: &Latencies) -> Latencies {
        let buckets: Vec<u64> = self
            .buckets
            .iter()
            .zip(&earlier.buckets)
            .map(|(a, b)| a.saturating_sub(*b))
            .collect();
        Latencies {
            count: buckets.iter().sum(),
            buckets,
        }
    }

    /// The `q` quantile in seconds (the upper edge of its bucket); `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (i, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                if i == 0 {
                    return Some(0.5e-6);
                }
                // The bucket's middle.
                let (e, m) = ((i - 1) / 8, (i - 1) % 8);
                return Some(2f64.powi(e as i32) * (1.0 + (m as f64 + 0.5) / 8.0) * 1e-6);
            }
        }
        None
    }
}

#[cfg(test)]
pub(crate) mod sim {
    //! Seeded simulations of experiments, shared by the tests here and the table the
    //! docs print (`guardrail_table`).
    use super::*;

    /// SplitMix64: a seeded, reproducible generator for simulations only.
    pub struct Rng(pub u64);

    impl Rng {
        pub fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        pub fn f64(&mut self) -> f64 {
            (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
        }
    }

    /// One simulated experiment, request by request. The candidate's share follows
    /// `share(i)` for request `i`; each request is bad with probability `control_rate`
    /// on control and `candidate_rate(i)` on the candidate. Returns the request index
    /// at which the guardrail (at `alpha`, after `min_bad` candidate bad events) trips.
    pub fn run(
        rng: &mut Rng,
        requests: u64,
        alpha: f64,
        min_bad: u64,
        share: impl Fn(u64) -> f64,
        control_rate: f64,
        candidate_rate: impl Fn(u64) -> f64,
    ) -> Option<u64> {
        let mut ev = Evidence::default();
        let mut candidate_bad = 0;
        for i in 0..requests {
            let pi = share(i);
            let on_candidate = rng.f64() < pi;
            let rate = if on_candidate {
                candidate_rate(i)
            } else {
                control_rate
            };
            if rng.f64() < rate {
                ev.observe(on_candidate, pi);
                candidate_bad += u64::from(on_candidate);
                if candidate_bad >= min_bad && ev.exceeds(alpha) {
                    return Some(i + 1);
                }
            }
        }
        None
    }

    /// One simulated fleet, as `braid controller` judges it: requests spread round-robin
    /// over `pods`, each pod with its own evidence and a local breaker at
    /// `alpha / (2 max_pods)`, the controller adding the pods' products every `round`
    /// fleet requests and tripping at `alpha / 2`. Each request restarts its pod with
    /// probability `restart` (a new factor; the old one keeps its last value), at most
    /// until `max_pods` lifetimes. Returns the fleet request at which either decision
    /// trips, and whether the fleet's test (not a pod's breaker) did.
    pub fn fleet(
        rng: &mut Rng,
        (pods, requests, round, restart): (usize, u64, u64, f64),
        alpha: f64,
        (max_pods, min_bad): (usize, u64),
        (share, control_rate, candidate_rate): (f64, f64, f64),
    ) -> Option<(u64, bool)> {
        let local_alpha = alpha / (2.0 * max_pods as f64);
        let mut lives = pods;
        // Per pod: its evidence, candidate bad events, and the products already added.
        let mut pod: Vec<(Evidence, u64, [f64; THETAS.len()], u64)> = (0..pods)
            .map(|_| (Evidence::default(), 0, [0.0; THETAS.len()], 0))
            .collect();
        let mut fleet = FleetEvidence::new();
        let mut candidate_bad = 0;
        for i in 0..requests {
            let p = &mut pod[(i % pods as u64) as usize];
            if lives < max_pods && rng.f64() < restart {
                // The old factor is frozen where the controller last read it.
                *p = (Evidence::default(), 0, [0.0; THETAS.len()], 0);
                lives += 1;
            }
            let on_candidate = rng.f64() < share;
            let rate = if on_candidate {
                candidate_rate
            } else {
                control_rate
            };
            if rng.f64() < rate {
                p.0.observe(on_candidate, share);
                p.1 += u64::from(on_candidate);
                candidate_bad += u64::from(on_candidate);
                if p.1 >= min_bad && p.0.exceeds(local_alpha) {
                    return Some((i + 1, false));
                }
            }
            if (i + 1) % round == 0 {
                let mut delta = [0.0; THETAS.len()];
                let mut events = 0;
                for p in &mut pod {
                    let now = p.0.log_lr();
                    for k in 0..THETAS.len() {
                        delta[k] += now[k] - p.2[k];
                    }
                    events += p.0.events() - p.3;
                    (p.2, p.3) = (now, p.0.events());
                }
                fleet.round(&delta, events);
                if candidate_bad >= min_bad && fleet.exceeds(alpha / 2.0) {
                    return Some((i + 1, true));
                }
            }
        }
        None
    }

    /// Requests until a trip, over `runs` seeded experiments at a 50% share: (median,
    /// 95th percentile, runs that never tripped within `cap`).
    pub fn detection(base: f64, ratio: f64, runs: u64, cap: u64) -> (u64, u64, u64) {
        let mut rng = Rng(0xb4a1d ^ (base.to_bits() >> 7) ^ ratio.to_bits());
        let mut at: Vec<u64> = Vec::new();
        let mut missed = 0;
        for _ in 0..runs {
            match run(&mut rng, cap, 0.001, 10, |_| 0.5, base, |_| base * ratio) {
                Some(n) => at.push(n),
                None => missed += 1,
            }
        }
        at.sort_unstable();
        let q = |p: f64| {
            at.get(((at.len() as f64 * p) as usize).min(at.len().saturating_sub(1)))
                .copied()
                .unwrap_or(cap)
        };
        (q(0.5), q(0.95), missed)
    }
}

#[cfg(test)]
mod tests {
    use super::sim::*;
    use super::*;

    /// The traffic share of an A/A experiment that ramps 1% -> 5% -> 25% -> 50% and,
    /// on top, wobbles (a fallback taking traffic back now and then).
    fn ramping_share(i: u64) -> f64 {
        let step = match i {
            0..2_000 => 0.01,
            2_000..6_000 => 0.05,
            6_000..12_000 => 0.25,
            _ => 0.5,
        };
        let wobble = if (i / 700).is_multiple_of(5) {
            0.5
        } else {
            1.0
        };
        step * wobble
    }

    /// Over 2,000 seeded A/A experiments with a ramping, wobbling share and a bad rate
    /// that itself drifts over time, the guardrail trips no more often than alpha
    /// (with a binomial margin of three standard deviations).
    #[test]
    fn a_a_experiments_trip_at_most_alpha() {
        for (alpha, runs) in [(0.05, 2_000u64), (0.01, 2_000)] {
            let mut rng = Rng(42);
            let mut trips = 0;
            for _ in 0..runs {
                let base = |i: u64| 0.02 * (1.0 + 0.8 * ((i as f64) / 3_000.0).sin());
                let tripped = {
                    let mut ev = Evidence::default();
                    let mut hit = false;
                    for i in 0..20_000u64 {
                        let pi = ramping_share(i);
                        let on_candidate = rng.f64() < pi;
                        if rng.f64() < base(i) {
                            ev.observe(on_candidate, pi);
                            if ev.exceeds(alpha) {
                                hit = true;
                                break;
                            }
                        }
                    }
                    hit
                };
                trips += u64::from(tripped);
            }
            let expected = alpha * runs as f64;
            let margin = 3.0 * (runs as f64 * alpha * (1.0 - alpha)).sqrt();
            assert!(
                trips as f64 <= expected + margin,
                "alpha {alpha}: {trips} false trips in {runs} A/A experiments"
            );
        }
    }

    #[test]
    fn twice_the_control_error_rate_at_one_percent_trips_quickly() {
        // docs/guardrails.md states: median 8,937 requests, 95% within 16,907.
        let (median, p95, missed) = detection(0.01, 2.0, 200, 100_000);
        assert_eq!(missed, 0);
        assert!(median <= 9_000, "median {median}");
        assert!(p95 <= 17_000, "p95 {p95}");
    }

    #[test]
    fn a_candidate_that_breaks_late_is_still_found() {
        // Healthy (and better than control) for 100,000 requests, then 3x control.
        let mut rng = Rng(7);
        let at = run(
            &mut rng,
            400_000,
            0.001,
            10,
            |_| 0.5,
            0.01,
            |i| if i < 100_000 { 0.005 } else { 0.03 },
        );
        let at = at.expect("never tripped");
        assert!(at > 100_000, "tripped while healthy at {at}");
        assert!(
            at < 110_000,
            "took {} requests after the break",
            at - 100_000
        );
    }

    /// `slow: 500ms` over log-normal latencies with a median of 300 ms: a candidate
    /// 10% slower in every request is found.
    #[test]
    fn a_ten_percent_latency_regression_is_found() {
        let mut rng = Rng(11);
        let mut ev = Evidence::default();
        let mut tripped_at = None;
        let normal = |rng: &mut Rng| {
            // Box-Muller.
            let (u, v) = (rng.f64().max(1e-12), rng.f64());
            (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
        };
        let mut candidate_bad = 0;
        for i in 0..200_000u64 {
            let on_candidate = rng.f64() < 0.5;
            let ms = 300.0 * (0.3 * normal(&mut rng)).exp() * if on_candidate { 1.1 } else { 1.0 };
            if ms > 500.0 {
                ev.observe(on_candidate, 0.5);
                candidate_bad += u64::from(on_candidate);
                if candidate_bad >= 10 && ev.exceeds(0.001) {
                    tripped_at = Some(i);
                    break;
                }
            }
        }
        let at = tripped_at.expect("a 10% regression was not found");
        assert!(at < 50_000, "took {at} requests");
    }

    #[test]
    fn evidence_ignores_events_only_one_arm_could_have() {
        let mut ev = Evidence::default();
        for _ in 0..1000 {
            ev.observe(true, 1.0);
            ev.observe(false, 0.0);
        }
        assert!(ev.log_e().abs() < 1e-12, "{}", ev.log_e());
        assert!(!ev.exceeds(0.5));
    }

    #[test]
    fn split_test_flags_a_skew_and_not_a_fair_split() {
        let mut rng = Rng(3);
        let mut fair = SplitTest::new(2);
        let mut skewed = SplitTest::new(2);
        for _ in 0..20_000 {
            fair.observe(usize::from(rng.f64() < 0.3), &[0.7, 0.3]);
            skewed.observe(usize::from(rng.f64() < 0.27), &[0.7, 0.3]);
        }
        assert!(!fair.mismatch(), "fair split flagged: {}", fair.log10_e());
        assert!(skewed.mismatch(), "skew not flagged: {}", skewed.log10_e());
    }

    #[test]
    fn split_test_false_alarms_stay_under_its_alpha() {
        let mut rng = Rng(5);
        let mut flagged = 0;
        for _ in 0..300 {
            let mut t = SplitTest::new(3);
            for i in 0..3_000u64 {
                let shares = if i < 1_000 {
                    [0.9, 0.05, 0.05]
                } else {
                    [0.5, 0.25, 0.25]
                };
                let u = rng.f64();
                let chosen = if u < shares[0] {
                    0
                } else if u < shares[0] + shares[1] {
                    1
                } else {
                    2
                };
                t.observe(chosen, &shares);
            }
            flagged += u64::from(t.mismatch());
        }
        assert!(flagged <= 2, "{flagged} of 300 fair splits flagged");
    }

    #[test]
    fn confidence_sequences_cover_and_shrink() {
        assert!(rate_radius(100, 0.05) > rate_radius(10_000, 0.05));
        assert!(rate_radius(10_000, 0.05) < 0.03);
        let d = rate_difference(20, 1000, 10, 1000, 0.05);
        assert!((d.estimate - 0.01).abs() < 1e-12);
        assert!(d.low < 0.01 && d.high > 0.01);
        // Coverage, time-uniformly, over seeded runs: the true rate stays inside at
        // every checkpoint in at least 95% of runs.
        let mut rng = Rng(9);
        let mut missed = 0;
        for _ in 0..400 {
            let (mut bad, mut n) = (0u64, 0u64);
            let mut ok = true;
            for _ in 0..5_000 {
                n += 1;
                bad += u64::from(rng.f64() < 0.1);
                if ((bad as f64 / n as f64) - 0.1).abs() > rate_radius(n, 0.05) {
                    ok = false;
                }
            }
            missed += u64::from(!ok);
        }
        assert!(missed <= 20, "{missed} of 400 sequences missed");
    }

    #[test]
    fn latency_quantiles_are_within_a_bucket() {
        let mut l = Latencies::default();
        for ms in 1..=1000u64 {
            l.record(std::time::Duration::from_millis(ms));
        }
        for (q, want) in [(0.5, 0.5), (0.95, 0.95), (0.99, 0.99), (0.001, 0.001)] {
            let got = l.quantile(q).unwrap();
            assert!((got / want - 1.0).abs() < 0.07, "q{q}: {got}, want {want}");
        }
        let mut one = Latencies::default();
        one.record(std::time::Duration::from_nanos(300));
        assert!(one.quantile(0.5).unwrap() <= 1e-6);
        assert_eq!(Latencies::default().quantile(0.5), None);
    }

    /// The table in docs/guardrails.md: `cargo test --release --lib guardrail_table --
    /// An A/A fleet of 8 pods (3% bad on both arms, 4,000 requests, a round every 20,
    /// restarts at 0.001 per request up to 16 lifetimes).
    fn a_a_fleet(rng: &mut Rng, alpha: f64) -> Option<(u64, bool)> {
        fleet(rng, (8, 4_000, 20, 1e-3), alpha, (16, 1), (0.5, 0.03, 0.03))
    }

    /// 10,000 seeded A/A fleets of 8 pods, whose pods restart now and then, trip (by the
    /// fleet's test or any pod's breaker) no more often than alpha, with a binomial
    /// margin of three standard deviations.
    #[test]
    fn a_a_fleets_with_restarts_trip_at_most_alpha() {
        let (alpha, runs) = (0.05, 10_000u64);
        let mut rng = Rng(37);
        let mut trips = 0;
        for _ in 0..runs {
            trips += u64::from(a_a_fleet(&mut rng, alpha).is_some());
        }
        let margin = 3.0 * (runs as f64 * alpha * (1.0 - alpha)).sqrt();
        assert!(
            trips as f64 <= alpha * runs as f64 + margin,
            "{trips} false trips in {runs} A/A fleets at alpha {alpha}"
        );
    }

    /// The fleet finds a candidate that fails 20% of its requests (the control none)
    /// after about as many fleet requests as one pod that saw all the traffic, and
    /// far sooner than the first of 8 pods judging alone.
    #[test]
    fn a_fleet_finds_a_failing_candidate_as_soon_as_one_pod_with_all_the_traffic() {
        let median = |mut v: Vec<u64>| {
            v.sort_unstable();
            v[v.len() / 2]
        };
        let (mut one, mut eight, mut alone) = (Vec::new(), Vec::new(), Vec::new());
        let mut rng = Rng(2026);
        for _ in 0..200 {
            let g = (10, (0.5, 0.0, 0.2));
            one.push(
                fleet(&mut rng, (1, 100_000, 1, 0.0), 0.001, (1, g.0), g.1)
                    .unwrap()
                    .0,
            );
            let (at, by_fleet) =
                fleet(&mut rng, (8, 100_000, 10, 0.0), 0.001, (16, g.0), g.1).unwrap();
            assert!(
                by_fleet,
                "a pod's breaker tripped before the fleet, at {at}"
            );
            eight.push(at);
            // Each of 8 pods alone at alpha: the first trips when its 1/8 has enough.
            alone.push(8 * run(&mut rng, 100_000, 0.001, 10, |_| 0.5, 0.0, |_| 0.2).unwrap());
        }
        let (one, eight, alone) = (median(one), median(eight), median(alone));
        assert!(
            eight as f64 <= 1.5 * one as f64,
            "fleet {eight}, one pod {one}"
        );
        assert!(alone > 3 * eight, "pods alone {alone}, fleet {eight}");
    }

    /// The figures docs/guardrails.md prints for fleet mode: `cargo test --release --lib
    /// fleet_table -- --ignored --nocapture`.
    #[test]
    #[ignore = "prints the docs' fleet table"]
    fn fleet_table() {
        for alpha in [0.05, 0.01] {
            let mut rng = Rng(37);
            let (mut trips, mut by_pod) = (0, 0);
            for _ in 0..10_000 {
                if let Some((_, by_fleet)) = a_a_fleet(&mut rng, alpha) {
                    trips += 1;
                    by_pod += u64::from(!by_fleet);
                }
            }
            println!(
                "A/A alpha {alpha}: {trips} of 10,000 fleets tripped ({by_pod} by a pod's breaker)"
            );
        }
        let q = |mut v: Vec<u64>, p: f64| {
            v.sort_unstable();
            v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
        };
        let mut rng = Rng(2026);
        let g = (10, (0.5, 0.0, 0.2));
        let (mut one, mut eight, mut first, mut last) = (vec![], vec![], vec![], vec![]);
        for _ in 0..1_000 {
            one.push(
                fleet(&mut rng, (1, 100_000, 1, 0.0), 0.001, (1, g.0), g.1)
                    .unwrap()
                    .0,
            );
            eight.push(
                fleet(&mut rng, (8, 100_000, 10, 0.0), 0.001, (16, g.0), g.1)
                    .unwrap()
                    .0,
            );
            let alone: Vec<u64> = (0..8)
                .map(|_| 8 * run(&mut rng, 100_000, 0.001, 10, |_| 0.5, 0.0, |_| 0.2).unwrap())
                .collect();
            first.push(*alone.iter().min().unwrap());
            last.push(*alone.iter().max().unwrap());
        }
        for (name, v) in [
            ("one pod, all traffic", one),
            ("fleet of 8", eight),
            ("first of 8 alone", first),
            ("last of 8 alone", last),
        ] {
            println!("| {name} | {} | {} |", q(v.clone(), 0.5), q(v, 0.95));
        }
    }

    /// The fleet's split check flags a skew in the summed counts and stays quiet on a
    /// fair split over many rounds.
    #[test]
    fn fleet_split_counts_flag_a_skew_only() {
        let mut rng = Rng(11);
        let mut fair = SplitTest::new(2);
        let mut skewed = SplitTest::new(2);
        for _ in 0..200 {
            let n = 50.0;
            let a = (0..50).filter(|_| rng.f64() < 0.5).count() as f64;
            fair.observe_counts(&[a, n - a], &[25.0, 25.0]);
            let b = (0..50).filter(|_| rng.f64() < 0.56).count() as f64;
            skewed.observe_counts(&[b, n - b], &[25.0, 25.0]);
        }
        assert!(!fair.mismatch(), "{}", fair.log10_e());
        assert!(skewed.mismatch(), "{}", skewed.log10_e());
    }

    /// The fleet's evidence survives a trip through JSON (the controller keeps it in its
    /// Lease for the next leader), changepoint's minus infinity included.
    #[test]
    fn fleet_evidence_round_trips_through_json() {
        let mut f = FleetEvidence::new();
        let before = serde_json::to_string(&f).unwrap();
        assert_eq!(
            serde_json::from_str::<FleetEvidence>(&before)
                .unwrap()
                .log10_e(),
            f.log10_e()
        );
        f.round(&event_log_lr(true, 0.3), 1);
        let back: FleetEvidence =
            serde_json::from_str(&serde_json::to_string(&f).unwrap()).unwrap();
        assert_eq!(back.log10_e(), f.log10_e());
        assert_eq!(back.events, 1);
    }

    /// --ignored --nocapture`.
    #[test]
    #[ignore = "prints the docs' detection table; takes a minute in release"]
    fn guardrail_table() {
        println!("| base rate | candidate | median requests | 95th percentile | not found in 2M |");
        println!("|---|---|---|---|---|");
        for base in [0.01, 0.001] {
            for ratio in [2.0, 1.5, 1.2] {
                let (m, p, missed) = detection(base, ratio, 200, 2_000_000);
                println!("| {base} | {ratio}x | {m} | {p} | {missed} of 200 |");
            }
        }
        let mut rng = Rng(42);
        let mut trips = 0;
        for _ in 0..10_000 {
            trips += u64::from(
                run(&mut rng, 20_000, 0.001, 10, ramping_share, 0.02, |_| 0.02).is_some(),
            );
        }
        println!(
            "A/A at alpha 0.001: {trips} false trips in 10,000 experiments of 20,000 requests"
        );
    }
}
