//! Every metric family braid exports, declared in one place with its buckets: the
//! proxy's here, the executor's in `executor`, the text formats a scrape gets in
//! `exposition`. (`braid controller`'s few are in `fleet`.)
//!
//! Label values come from config (route and variant names) or from closed sets
//! (status codes, outcomes): never from request data, so cardinality is bounded by
//! the config.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

mod executor;
mod exposition;
mod families;
mod handles;

pub use executor::*;
pub use exposition::*;
use families::{Admission, Batching, Experiments, GenAi, Resilience, Serving, Sinks};
pub use handles::*;

/// Latency buckets, in seconds: fine enough to see 100 µs, wide enough to see 30 s.
pub const LATENCY_BUCKETS: [f64; 20] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: Arc<str>,
    pub variant: Arc<str>,
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VariantLabels {
    pub route: Arc<str>,
    pub variant: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub source: &'static str,
    pub result: &'static str,
}

/// Requests that never reached a route: a closed set of reasons.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UnroutedLabels {
    pub reason: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub route: Arc<str>,
    pub variant: Arc<str>,
    /// `input` or `output` (OpenTelemetry's `gen_ai.token.type`).
    pub token_type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdmissionLabels {
    pub route: Arc<str>,
    pub variant: Arc<str>,
    /// A closed set: shed, queue_full, queue_timeout.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FinishLabels {
    pub route: Arc<str>,
    pub variant: Arc<str>,
    /// A closed set: stop, length, tool_calls, content_filter, other.
    pub reason: &'static str,
}

/// The OpenTelemetry GenAI semantic conventions' advised buckets, in seconds; time to
/// first token extended to 60 s (long prompts on a busy server).
const TTFT_BUCKETS: [f64; 19] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 30.0, 60.0,
];
const TPOT_BUCKETS: [f64; 13] = [
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
];
const GEN_DURATION_BUCKETS: [f64; 14] = [
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
];
const TOKEN_BUCKETS: [f64; 14] = [
    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0,
    16777216.0, 67108864.0,
];

/// What one OpenAI-style answer was, as measured on its way through.
#[derive(Clone, Debug, Default)]
pub struct Generation {
    /// From the request's arrival to its first content event (streams only).
    pub ttft: Option<Duration>,
    /// Mean time between output tokens after the first (streams with 2+ tokens).
    pub tpot: Option<Duration>,
    /// From the request's arrival to the answer's last byte.
    pub duration: Duration,
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    pub finish: Vec<&'static str>,
    pub errors: u64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GrpcLabels {
    pub route: Arc<str>,
    pub variant: Arc<str>,
    pub grpc_status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FlushLabels {
    pub route: Arc<str>,
    pub variant: Arc<str>,
    pub reason: &'static str,
}

/// A batch queue's series, per priority class (`default` on routes without classes).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PriorityLabels {
    pub route: Arc<str>,
    pub variant: Arc<str>,
    pub priority: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropLabels {
    pub route: Arc<str>,
    pub variant: Arc<str>,
    pub priority: Arc<str>,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub route: Arc<str>,
    pub variant: Arc<str>,
    pub outcome: &'static str,
}

/// Largest absolute difference between a primary's and its shadow's output tensors.
pub const DIVERGENCE_BUCKETS: [f64; 12] = [
    0.0, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.05, 0.1, 0.5, 1.0, 10.0,
];

fn divergence_histogram() -> Histogram {
    Histogram::new(DIVERGENCE_BUCKETS)
}

/// Registers `metric` and hands it back, so declaring a family is one statement.
fn register<M: prometheus_client::registry::Metric + Clone>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    metric: M,
) -> M {
    registry.register(name, help, metric.clone());
    metric
}

/// Batch sizes: powers of two up to 256.
pub const BATCH_BUCKETS: [f64; 9] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

fn batch_histogram() -> Histogram {
    Histogram::new(BATCH_BUCKETS)
}

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// Every family of the proxy, registered once, grouped by what records into them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    serving: Serving,
    gen_ai: GenAi,
    admit: Admission,
    batching: Batching,
    resilience: Resilience,
    experiments: Experiments,
    sinks: Sinks,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteResultLabels {
    pub route: Arc<str>,
    pub result: &'static str,
}

/// One series of `family` per variant of a route, in the variants' order.
fn per_variant<M: Clone, C: MetricConstructor<M>>(
    family: &Family<VariantLabels, M, C>,
    route: &Arc<str>,
    variants: &[Arc<str>],
) -> Vec<M> {
    variants
        .iter()
        .map(|v| {
            family.get_or_create_owned(&VariantLabels {
                route: route.clone(),
                variant: v.clone(),
            })
        })
        .collect()
}

/// A gauge holding an f64 (weights, log10 evidence).
pub type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: Arc<str>,
}

/// A guardrail's per-theta series: `theta` is one of the relative risks its evidence
/// is mixed over (a closed set).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ThetaLabels {
    pub route: Arc<str>,
    pub variant: Arc<str>,
    pub theta: &'static str,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let serving = Serving::register(&mut registry);
        let gen_ai = GenAi::register(&mut registry);
        let admit = Admission::register(&mut registry);
        let batching = Batching::register(&mut registry);
        let resilience = Resilience::register(&mut registry);
        let experiments = Experiments::register(&mut registry);
        let sinks = Sinks::register(&mut registry);
        Metrics {
            registry,
            serving,
            gen_ai,
            admit,
            batching,
            resilience,
            experiments,
            sinks,
        }
    }

    /// A variant's admission gauges, and its refusals by reason.
    pub fn admission(&self, route: &Arc<str>, variant: &Arc<str>) -> AdmissionMetrics {
        let labels = VariantLabels {
            route: route.clone(),
            variant: variant.clone(),
        };
        let refused = |reason| {
            self.admit
                .admission_refused
                .get_or_create(&AdmissionLabels {
                    route: route.clone(),
                    variant: variant.clone(),
                    reason,
                })
                .clone()
        };
        AdmissionMetrics {
            running: self.admit.admission_running.get_or_create(&labels).clone(),
            waiting: self.admit.admission_waiting.get_or_create(&labels).clone(),
            shed: refused("shed"),
            queue_full: refused("queue_full"),
            queue_timeout: refused("queue_timeout"),
        }
    }

    pub fn batch(&self, route: &Arc<str>, variant: &Arc<str>) -> BatchMetrics {
        let labels = VariantLabels {
            route: route.clone(),
            variant: variant.clone(),
        };
        BatchMetrics {
            size: self.batching.batch_size.get_or_create_owned(&labels),
            queue: self.batching.batch_queue.clone(),
            exec: self.batching.batch_exec.get_or_create_owned(&labels),
            depth: self.batching.queue_depth.clone(),
            flushes: self.batching.batch_flushes.clone(),
            dropped: self.batching.batch_dropped.clone(),
            default_priority: Arc::from("default"),
            labels,
        }
    }

    pub fn retry(&self, route: &Arc<str>, variant: &Arc<str>) -> RetryMetrics {
        RetryMetrics {
            family: self.resilience.retries.clone(),
            labels: VariantLabels {
                route: route.clone(),
                variant: variant.clone(),
            },
        }
    }

    pub fn health(&self, route: &Arc<str>, variant: &Arc<str>) -> HealthMetrics {
        let labels = VariantLabels {
            route: route.clone(),
            variant: variant.clone(),
        };
        HealthMetrics {
            ejections: self.resilience.ejections.get_or_create_owned(&labels),
            ejected: self.resilience.ejected.get_or_create_owned(&labels),
        }
    }

    /// A request for `from` was served by the route's fallback.
    pub fn fallback(&self, route: &Arc<str>, from: &Arc<str>) {
        self.resilience
            .fallbacks
            .get_or_create(&VariantLabels {
                route: route.clone(),
                variant: from.clone(),
            })
            .inc();
    }

    /// One shadow copy's outcome, and for compared OIP pairs the divergence.
    pub fn shadow(
        &self,
        route: &Arc<str>,
        variant: &Arc<str>,
        outcome: &'static str,
        divergence: Option<f64>,
    ) {
        self.resilience
            .shadow
            .get_or_create(&OutcomeLabels {
                route: route.clone(),
                variant: variant.clone(),
                outcome,
            })
            .inc();
        if let Some(d) = divergence {
            self.resilience
                .divergence
                .get_or_create(&VariantLabels {
                    route: route.clone(),
                    variant: variant.clone(),
                })
                .observe(d);
        }
    }

    /// One variant's request counter and latency histogram, resolved once (when a
    /// snapshot is bound) so a request takes no lock and hashes no label.
    pub fn requests(&self, route: &Arc<str>, variant: &Arc<str>) -> RequestMetrics {
        RequestMetrics {
            family: self.serving.requests.clone(),
            durations: self.serving.duration.clone(),
            labels: VariantLabels {
                route: route.clone(),
                variant: variant.clone(),
            },
            duration: OnceLock::new(),
            ok: OnceLock::new(),
        }
    }

    /// An experiment's series, one per variant of `variants`, each set to its start.
    /// `thetas` names the relative risks the guardrail's evidence is mixed over.
    pub fn experiment(
        &self,
        route: &Arc<str>,
        variants: &[Arc<str>],
        thetas: &[&'static str],
    ) -> ExperimentMetrics {
        let m = ExperimentMetrics {
            weight: per_variant(&self.experiments.weight, route, variants),
            tripped: per_variant(&self.experiments.tripped, route, variants),
            evidence: per_variant(&self.experiments.evidence, route, variants),
            trips: per_variant(&self.experiments.trips, route, variants),
            log_lr: variants
                .iter()
                .map(|v| {
                    thetas
                        .iter()
                        .map(|&theta| {
                            self.experiments.log_lr.get_or_create_owned(&ThetaLabels {
                                route: route.clone(),
                                variant: v.clone(),
                                theta,
                            })
                        })
                        .collect()
                })
                .collect(),
            split_mismatch: self
                .experiments
                .split_mismatch
                .get_or_create_owned(&RouteLabels {
                    route: route.clone(),
                }),
        };
        for ((t, e), l) in m.tripped.iter().zip(&m.evidence).zip(&m.log_lr) {
            t.set(0);
            e.set(0.0);
            l.iter().for_each(|g| {
                g.set(0.0);
            });
        }
        m.split_mismatch.set(0);
        m
    }

    /// Records how a routed gRPC call ended (its `grpc-status`, by name).
    pub fn grpc_request(&self, route: &Arc<str>, variant: &Arc<str>, grpc_status: &'static str) {
        self.serving
            .grpc
            .get_or_create(&GrpcLabels {
                route: route.clone(),
                variant: variant.clone(),
                grpc_status,
            })
            .inc();
    }

    /// Counts `n` spans by what became of them.
    pub fn trace_spans(&self, result: &'static str, n: u64) {
        self.sinks
            .trace_spans
            .get_or_create(&ResultLabels { result })
            .inc_by(n);
    }

    /// Counts one payload log record by what became of it.
    pub fn payload_log(&self, route: &Arc<str>, result: &'static str) {
        self.sinks
            .payload_log
            .get_or_create(&RouteResultLabels {
                route: route.clone(),
                result,
            })
            .inc();
    }

    /// Counts access log lines by what became of them.
    pub fn access_log_lines(&self, result: &'static str, n: u64) {
        if n > 0 {
            self.serving
                .access_log
                .get_or_create(&ResultLabels { result })
                .inc_by(n);
        }
    }

    pub fn unrouted(&self, reason: &'static str) {
        self.serving
            .unrouted
            .get_or_create(&UnroutedLabels { reason })
            .inc();
    }

    pub fn config_reloaded(&self, source: &'static str, accepted: bool, generation: u64) {
        let result = if accepted { "accepted" } else { "rejected" };
        self.serving
            .reloads
            .get_or_create(&ReloadLabels { source, result })
            .inc();
        self.serving.generation.set(generation as i64);
    }

    pub fn inflight(&self) -> &Gauge {
        &self.serving.inflight
    }

    /// The gauge the request byte budget keeps (`server::ByteBudget`).
    pub fn buffered(&self) -> Gauge {
        self.serving.buffered.clone()
    }

    /// One OpenAI-style answer's measures, recorded once when it ends.
    pub fn generation(&self, route: &Arc<str>, variant: &Arc<str>, g: &Generation) {
        let labels = VariantLabels {
            route: route.clone(),
            variant: variant.clone(),
        };
        if let Some(t) = g.ttft {
            self.gen_ai
                .gen_ttft
                .get_or_create(&labels)
                .observe(t.as_secs_f64());
        }
        if let Some(t) = g.tpot {
            self.gen_ai
                .gen_tpot
                .get_or_create(&labels)
                .observe(t.as_secs_f64());
        }
        self.gen_ai
            .gen_duration
            .get_or_create(&labels)
            .observe(g.duration.as_secs_f64());
        for (token_type, n) in [("input", g.input_tokens), ("output", g.output_tokens)] {
            if let Some(n) = n {
                let l = TokenLabels {
                    route: route.clone(),
                    variant: variant.clone(),
                    token_type,
                };
                self.gen_ai.gen_tokens.get_or_create(&l).observe(n as f64);
            }
        }
        for &reason in &g.finish {
            let l = FinishLabels {
                route: route.clone(),
                variant: variant.clone(),
                reason,
            };
            self.gen_ai.gen_finish.get_or_create(&l).inc();
        }
        if g.errors > 0 {
            self.gen_ai
                .gen_errors
                .get_or_create(&labels)
                .inc_by(g.errors);
        }
    }

    /// The gauge the data listener keeps of its open connections.
    pub fn connections(&self) -> Gauge {
        self.serving.connections.clone()
    }

    /// The OpenMetrics text exposition; see `exposition` for what a scrape gets.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(4096);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
