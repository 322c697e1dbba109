//! Failure accrual per variant (a route's `outlier` block): after N consecutive failed
//! attempts the variant is ejected for a backoff that doubles with each ejection in a
//! row, up to a cap. When the ejection ends, one request is let through as a probe:
//! success restores the variant, failure ejects it again for longer.
//!
//! A failure is a transport error, a timeout, or a 5xx; a 4xx is the client's problem.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::metrics::HealthMetrics;

/// A route's `outlier` settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Outlier {
    pub consecutive_failures: u32,
    pub base_ejection: Duration,
    pub max_ejection: Duration,
}

impl Default for Outlier {
    fn default() -> Self {
        Outlier {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(5),
            max_ejection: Duration::from_secs(60),
        }
    }
}

/// May a request go to this variant now?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Yes,
    /// The ejection ended: this request is the one probe.
    Probe,
    Ejected,
}

#[derive(Debug)]
pub struct VariantHealth {
    settings: Mutex<Outlier>,
    state: Mutex<State>,
    metrics: HealthMetrics,
}

#[derive(Debug, Default)]
struct State {
    failures: u32,
    ejected_until: Option<Instant>,
    /// Ejections in a row without a success: the backoff exponent.
    ejections: u32,
    /// A probe is out until this time; if it never reports (the request was answered
    /// without reaching the variant), the next request after it probes instead.
    probing: Option<Instant>,
}

impl VariantHealth {
    pub fn new(settings: Outlier, metrics: HealthMetrics) -> Self {
        VariantHealth {
            settings: Mutex::new(settings),
            state: Mutex::new(State::default()),
            metrics,
        }
    }

    /// Applies settings from a reload; the variant's state is kept.
    pub fn configure(&self, settings: Outlier) {
        *crate::sync::lock(&self.settings) = settings;
    }

    pub fn admit(&self, now: Instant) -> Admit {
        let lease = crate::sync::lock(&self.settings).base_ejection;
        let mut s = crate::sync::lock(&self.state);
        match s.ejected_until {
            None => Admit::Yes,
            Some(until) if now < until || s.probing.is_some_and(|p| now < p) => Admit::Ejected,
            Some(_) => {
                s.probing = Some(now + lease);
                Admit::Probe
            }
        }
    }

    /// Whether requests are kept away from the variant right now.
    pub fn is_ejected(&self, now: Instant) -> bool {
        let s = crate::sync::lock(&self.state);
        s.ejected_until
            .is_some_and(|u| now < u || s.probing.is_some_and(|p| now < p))
    }

    /// Records one attempt's outcome.
    pub fn record(&self, ok: bool, now: Instant) {
        let cfg = *crate::sync::lock(&self.settings);
        let mut s = crate::sync::lock(&self.state);
        if ok {
            let lifts = s.probing.is_some() || s.ejected_until.is_none_or(|u| u <= now);
            if lifts {
                if s.ejected_until.is_some() {
                    self.metrics.ejected.set(0);
                }
                *s = State::default();
            } else {
                // A request sent before the ejection answered late: it does not lift it.
                s.failures = 0;
            }
            return;
        }
        s.failures += 1;
        let due = s.probing.is_some()
            || (s.ejected_until.is_none() && s.failures >= cfg.consecutive_failures);
        if due {
            let backoff = cfg
                .base_ejection
                .saturating_mul(1u32 << s.ejections.min(16))
                .min(cfg.max_ejection);
            s.ejections += 1;
            s.ejected_until = Some(now + backoff);
            s.probing = None;
            self.metrics.ejections.inc();
            self.metrics.ejected.set(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health() -> VariantHealth {
        VariantHealth::new(
            Outlier {
                consecutive_failures: 3,
                base_ejection: Duration::from_secs(5),
                max_ejection: Duration::from_secs(12),
            },
            HealthMetrics::detached(),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_failures_eject_then_one_probe_decides() {
        let h = health();
        let now = Instant::now();
        h.record(false, now);
        h.record(false, now);
        h.record(true, now); // a success resets the count
        h.record(false, now);
        h.record(false, now);
        assert_eq!(h.admit(now), Admit::Yes);
        h.record(false, now);
        assert_eq!(h.admit(now), Admit::Ejected);
        assert_eq!(h.metrics.ejected.get(), 1);

        let later = now + Duration::from_secs(5);
        assert_eq!(h.admit(later), Admit::Probe);
        assert_eq!(h.admit(later), Admit::Ejected, "only one probe at a time");
        h.record(false, later); // the probe failed: ejected for twice as long
        assert_eq!(h.admit(later + Duration::from_secs(9)), Admit::Ejected);
        let t = later + Duration::from_secs(10);
        assert_eq!(h.admit(t), Admit::Probe);
        h.record(false, t); // third ejection: 20 s, capped at 12 s
        assert_eq!(h.admit(t + Duration::from_secs(11)), Admit::Ejected);
        let t = t + Duration::from_secs(12);
        assert_eq!(h.admit(t), Admit::Probe);
        h.record(true, t);
        assert_eq!(h.admit(t), Admit::Yes);
        assert_eq!(h.metrics.ejected.get(), 0);
        assert_eq!(h.metrics.ejections.get(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_that_never_reports_lets_a_later_request_probe() {
        let h = health();
        let now = Instant::now();
        for _ in 0..3 {
            h.record(false, now);
        }
        let t = now + Duration::from_secs(5);
        assert_eq!(h.admit(t), Admit::Probe);
        assert_eq!(h.admit(t + Duration::from_secs(1)), Admit::Ejected);
        assert_eq!(h.admit(t + Duration::from_secs(5)), Admit::Probe);
    }
}
