//! The handles a layer keeps of its series, resolved once (when a route, variant,
//! batcher or experiment starts) so the request path records without a family lookup.

use super::*;

/// One experiment's handles (a route with two variants or more), per variant where
/// the series is per variant; resolved when the experiment starts.
#[derive(Debug)]
pub struct ExperimentMetrics {
    pub weight: Vec<FloatGauge>,
    pub tripped: Vec<Gauge>,
    pub evidence: Vec<FloatGauge>,
    pub trips: Vec<Counter>,
    /// Per variant, per theta: ln of the product of likelihood ratios since the
    /// experiment started here (what a fleet adds up across pods).
    pub log_lr: Vec<Vec<FloatGauge>>,
    pub split_mismatch: Gauge,
}

/// Requests counted by code and timed, for one variant. The series appear on first
/// use, as a family lookup would make them; 200, the common code, keeps its handle.
pub struct RequestMetrics {
    pub(super) family: Family<RequestLabels, Counter>,
    pub(super) durations: HistogramFamily<VariantLabels>,
    pub(super) labels: VariantLabels,
    pub(super) duration: OnceLock<Histogram>,
    pub(super) ok: OnceLock<Counter>,
}

impl std::fmt::Debug for RequestMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestMetrics")
            .field("labels", &self.labels)
            .finish_non_exhaustive()
    }
}

impl RequestMetrics {
    /// Records one routed request at the edge, once.
    pub fn record(&self, code: u16, elapsed: Duration) {
        self.duration
            .get_or_init(|| self.durations.get_or_create_owned(&self.labels))
            .observe(elapsed.as_secs_f64());
        let counter = |code| {
            self.family.get_or_create_owned(&RequestLabels {
                route: self.labels.route.clone(),
                variant: self.labels.variant.clone(),
                code,
            })
        };
        if code == 200 {
            self.ok.get_or_init(|| counter(200)).inc();
        } else {
            counter(code).inc();
        }
    }
}

/// A (route, variant)'s retry outcomes.
#[derive(Debug)]
pub struct RetryMetrics {
    pub(super) family: Family<OutcomeLabels, Counter>,
    pub(super) labels: VariantLabels,
}

impl RetryMetrics {
    /// `retried`, `budget_exhausted`, `not_idempotent`, `body_too_large`, `deadline`,
    /// `retry_after_too_long`.
    pub fn outcome(&self, outcome: &'static str) {
        self.family
            .get_or_create(&OutcomeLabels {
                route: self.labels.route.clone(),
                variant: self.labels.variant.clone(),
                outcome,
            })
            .inc();
    }
}

/// A variant's admission (`max_concurrent`), resolved once.
#[derive(Debug, Clone, Default)]
pub struct AdmissionMetrics {
    pub running: Gauge,
    pub waiting: Gauge,
    pub shed: Counter,
    pub queue_full: Counter,
    pub queue_timeout: Counter,
}

/// A (route, variant)'s ejection state, for failure accrual.
#[derive(Debug)]
pub struct HealthMetrics {
    pub ejections: Counter,
    pub ejected: Gauge,
}

impl HealthMetrics {
    /// Handles registered nowhere (unit tests).
    pub fn detached() -> Self {
        HealthMetrics {
            ejections: Counter::default(),
            ejected: Gauge::default(),
        }
    }
}

/// One batcher's metric handles, resolved once when the batcher starts.
#[derive(Debug)]
pub struct BatchMetrics {
    pub(super) labels: VariantLabels,
    pub(super) size: Histogram,
    pub(super) queue: HistogramFamily<PriorityLabels>,
    pub(super) exec: Histogram,
    pub(super) depth: Family<PriorityLabels, Gauge>,
    pub(super) flushes: Family<FlushLabels, Counter>,
    pub(super) dropped: Family<DropLabels, Counter>,
    /// The `priority` label on a route without classes.
    pub(super) default_priority: Arc<str>,
}

/// A priority class's name, as `BatchLimits::class_name` gives it (`None`: no classes).
type Priority<'a> = Option<&'a Arc<str>>;

impl BatchMetrics {
    fn priority(&self, p: Priority) -> Arc<str> {
        p.unwrap_or(&self.default_priority).clone()
    }

    fn class(&self, p: Priority) -> PriorityLabels {
        PriorityLabels {
            route: self.labels.route.clone(),
            variant: self.labels.variant.clone(),
            priority: self.priority(p),
        }
    }

    /// A batch left the queue: its reason, rows, and each item's class and wait.
    pub fn flushed<'a>(
        &self,
        reason: &'static str,
        rows: usize,
        waits: impl Iterator<Item = (Priority<'a>, Duration)>,
    ) {
        let labels = FlushLabels {
            route: self.labels.route.clone(),
            variant: self.labels.variant.clone(),
            reason,
        };
        self.flushes.get_or_create(&labels).inc();
        self.size.observe(rows as f64);
        for (priority, w) in waits {
            self.queue
                .get_or_create(&self.class(priority))
                .observe(w.as_secs_f64());
        }
    }

    pub fn executed(&self, took: Duration) {
        self.exec.observe(took.as_secs_f64());
    }

    /// An item left without being sent: `queue_full`, `deadline`, `cancelled`, or
    /// `preempted` (displaced by a higher class).
    pub fn dropped(&self, reason: &'static str, priority: Priority) {
        let labels = DropLabels {
            route: self.labels.route.clone(),
            variant: self.labels.variant.clone(),
            priority: self.priority(priority),
            reason,
        };
        self.dropped.get_or_create(&labels).inc();
    }

    pub fn depth(&self, priority: Priority, n: usize) {
        self.depth
            .get_or_create(&self.class(priority))
            .set(n as i64);
    }
}
