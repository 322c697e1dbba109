//! The proxy's families, registered by group: each group's names, help and buckets in
//! one place, in the order a scrape lists them.

use super::*;

/// The request path: requests, their times, config reloads, and what is held now.
#[derive(Debug)]
pub(super) struct Serving {
    pub(super) requests: Family<RequestLabels, Counter>,
    pub(super) grpc: Family<GrpcLabels, Counter>,
    pub(super) access_log: Family<ResultLabels, Counter>,
    pub(super) duration: HistogramFamily<VariantLabels>,
    pub(super) unrouted: Family<UnroutedLabels, Counter>,
    pub(super) reloads: Family<ReloadLabels, Counter>,
    pub(super) generation: Gauge,
    pub(super) inflight: Gauge,
    pub(super) buffered: Gauge,
    pub(super) connections: Gauge,
}

impl Serving {
    pub(super) fn register(registry: &mut Registry) -> Serving {
        let requests = register(
            registry,
            "braid_requests",
            "Routed requests answered, by route, variant and HTTP status",
            Family::<RequestLabels, Counter>::default(),
        );
        let grpc = register(
            registry,
            "braid_grpc_requests",
            "Routed gRPC calls ended, by route, variant and gRPC status (from the answer's trailers, or braid's own)",
            Family::<GrpcLabels, Counter>::default(),
        );
        let access_log = register(
            registry,
            "braid_access_log_lines",
            "Access log lines, by result (written, failed: the write failed, dropped: the writer's queue was full)",
            Family::<ResultLabels, Counter>::default(),
        );
        let duration: HistogramFamily<VariantLabels> = register(
            registry,
            "braid_request_duration_seconds",
            "Time from request received to response headers sent, by route and variant",
            Family::new_with_constructor(latency_histogram),
        );
        let unrouted = register(
            registry,
            "braid_unrouted_requests",
            "Requests answered before a variant was chosen (no route, bad override, no config)",
            Family::<UnroutedLabels, Counter>::default(),
        );
        let reloads = register(
            registry,
            "braid_config_reloads",
            "Config documents seen, by source and whether they were accepted or rejected",
            Family::<ReloadLabels, Counter>::default(),
        );
        let generation = register(
            registry,
            "braid_config_generation",
            "Generation of the config in force (1 = first accepted document)",
            Gauge::default(),
        );
        let inflight = register(
            registry,
            "braid_requests_in_flight",
            "Requests received and not yet answered",
            Gauge::default(),
        );
        let buffered = register(
            registry,
            "braid_buffered_bytes",
            "Request bytes held now, out of the --max-buffered-bytes budget",
            Gauge::default(),
        );
        let connections = register(
            registry,
            "braid_connections",
            "Connections open now on the data port (at most --max-connections)",
            Gauge::default(),
        );
        Serving {
            requests,
            grpc,
            access_log,
            duration,
            unrouted,
            reloads,
            generation,
            inflight,
            buffered,
            connections,
        }
    }
}

/// OpenAI-style answers: time to first token, per output token, tokens, finish reasons.
#[derive(Debug)]
pub(super) struct GenAi {
    pub(super) gen_ttft: HistogramFamily<VariantLabels>,
    pub(super) gen_tpot: HistogramFamily<VariantLabels>,
    pub(super) gen_duration: HistogramFamily<VariantLabels>,
    pub(super) gen_tokens: HistogramFamily<TokenLabels>,
    pub(super) gen_finish: Family<FinishLabels, Counter>,
    pub(super) gen_errors: Family<VariantLabels, Counter>,
}

impl GenAi {
    pub(super) fn register(registry: &mut Registry) -> GenAi {
        let gen_ttft: HistogramFamily<VariantLabels> = register(
            registry,
            "braid_gen_ai_server_time_to_first_token_seconds",
            "OpenAI-style streams: from the request's arrival to its first content event",
            Family::new_with_constructor(|| Histogram::new(TTFT_BUCKETS)),
        );
        let gen_tpot: HistogramFamily<VariantLabels> = register(
            registry,
            "braid_gen_ai_server_time_per_output_token_seconds",
            "OpenAI-style streams: mean time between output tokens after the first",
            Family::new_with_constructor(|| Histogram::new(TPOT_BUCKETS)),
        );
        let gen_duration: HistogramFamily<VariantLabels> = register(
            registry,
            "braid_gen_ai_server_request_duration_seconds",
            "OpenAI-style calls: from the request's arrival to the answer's last byte",
            Family::new_with_constructor(|| Histogram::new(GEN_DURATION_BUCKETS)),
        );
        let gen_tokens: HistogramFamily<TokenLabels> = register(
            registry,
            "braid_gen_ai_client_token_usage",
            "OpenAI-style calls: input and output tokens per request (from usage)",
            Family::new_with_constructor(|| Histogram::new(TOKEN_BUCKETS)),
        );
        let gen_finish = register(
            registry,
            "braid_gen_ai_finish_reasons",
            "OpenAI-style calls: why each choice's generation stopped",
            Family::<FinishLabels, Counter>::default(),
        );
        let gen_errors = register(
            registry,
            "braid_gen_ai_stream_errors",
            "OpenAI-style calls: error objects sent in-band (in a stream or as a 200's body)",
            Family::<VariantLabels, Counter>::default(),
        );
        GenAi {
            gen_ttft,
            gen_tpot,
            gen_duration,
            gen_tokens,
            gen_finish,
            gen_errors,
        }
    }
}

/// A variant's `max_concurrent` places and who waits for them.
#[derive(Debug)]
pub(super) struct Admission {
    pub(super) admission_running: Family<VariantLabels, Gauge>,
    pub(super) admission_waiting: Family<VariantLabels, Gauge>,
    pub(super) admission_refused: Family<AdmissionLabels, Counter>,
}

impl Admission {
    pub(super) fn register(registry: &mut Registry) -> Admission {
        let admission_running = register(
            registry,
            "braid_admission_running",
            "Requests a variant with max_concurrent is serving now (to their answer's last byte)",
            Family::<VariantLabels, Gauge>::default(),
        );
        let admission_waiting = register(
            registry,
            "braid_admission_waiting",
            "Requests waiting for one of a variant's max_concurrent places",
            Family::<VariantLabels, Gauge>::default(),
        );
        let admission_refused = register(
            registry,
            "braid_admission_refused",
            "Requests a saturated variant refused: shed (a sheddable class), queue_full, queue_timeout",
            Family::<AdmissionLabels, Counter>::default(),
        );
        Admission {
            admission_running,
            admission_waiting,
            admission_refused,
        }
    }
}

/// Coalescing: batch sizes, queue waits, flushes, drops, depth.
#[derive(Debug)]
pub(super) struct Batching {
    pub(super) batch_size: HistogramFamily<VariantLabels>,
    pub(super) batch_queue: HistogramFamily<PriorityLabels>,
    pub(super) batch_exec: HistogramFamily<VariantLabels>,
    pub(super) batch_flushes: Family<FlushLabels, Counter>,
    pub(super) batch_dropped: Family<DropLabels, Counter>,
    pub(super) queue_depth: Family<PriorityLabels, Gauge>,
}

impl Batching {
    pub(super) fn register(registry: &mut Registry) -> Batching {
        let batch_size: HistogramFamily<VariantLabels> = register(
            registry,
            "braid_batch_size",
            "Rows per batch sent to the executor",
            Family::new_with_constructor(batch_histogram),
        );
        let batch_queue: HistogramFamily<PriorityLabels> = register(
            registry,
            "braid_batch_queue_seconds",
            "Time a request waited in the batch queue (apart from execution)",
            Family::new_with_constructor(latency_histogram),
        );
        let batch_exec: HistogramFamily<VariantLabels> = register(
            registry,
            "braid_batch_exec_seconds",
            "Time from sending a batch to answering all its requests",
            Family::new_with_constructor(latency_histogram),
        );
        let batch_flushes = register(
            registry,
            "braid_batch_flushes",
            "Batches sent, by why they left the queue (full, idle, delay, deadline)",
            Family::<FlushLabels, Counter>::default(),
        );
        let batch_dropped = register(
            registry,
            "braid_batch_dropped",
            "Requests that left the batch queue unsent (queue_full, deadline, cancelled)",
            Family::<DropLabels, Counter>::default(),
        );
        let queue_depth = register(
            registry,
            "braid_queue_depth",
            "Requests waiting in the batch queue",
            Family::<PriorityLabels, Gauge>::default(),
        );
        Batching {
            batch_size,
            batch_queue,
            batch_exec,
            batch_flushes,
            batch_dropped,
            queue_depth,
        }
    }
}

/// Retries, ejection, fallback, shadow copies.
#[derive(Debug)]
pub(super) struct Resilience {
    pub(super) retries: Family<OutcomeLabels, Counter>,
    pub(super) ejections: Family<VariantLabels, Counter>,
    pub(super) ejected: Family<VariantLabels, Gauge>,
    pub(super) fallbacks: Family<VariantLabels, Counter>,
    pub(super) shadow: Family<OutcomeLabels, Counter>,
    pub(super) divergence: HistogramFamily<VariantLabels>,
}

impl Resilience {
    pub(super) fn register(registry: &mut Registry) -> Resilience {
        let retries = register(
            registry,
            "braid_retries",
            "Retry decisions: retried, or why not (budget_exhausted, not_idempotent, body_too_large, deadline, retry_after_too_long)",
            Family::<OutcomeLabels, Counter>::default(),
        );
        let ejections = register(
            registry,
            "braid_ejections",
            "Times a variant was ejected after consecutive failures",
            Family::<VariantLabels, Counter>::default(),
        );
        let ejected = register(
            registry,
            "braid_variant_ejected",
            "1 while a variant is ejected (its traffic goes to the fallback or the others)",
            Family::<VariantLabels, Gauge>::default(),
        );
        let fallbacks = register(
            registry,
            "braid_fallbacks",
            "Requests assigned to this variant and served by the route's fallback",
            Family::<VariantLabels, Counter>::default(),
        );
        let shadow = register(
            registry,
            "braid_shadow_requests",
            "Shadow copies, by outcome (status_match, status_mismatch, failed, skipped_saturated)",
            Family::<OutcomeLabels, Counter>::default(),
        );
        let divergence: HistogramFamily<VariantLabels> = register(
            registry,
            "braid_shadow_divergence",
            "Largest absolute difference between primary and shadow output tensors (OIP), per pair",
            Family::new_with_constructor(divergence_histogram),
        );
        Resilience {
            retries,
            ejections,
            ejected,
            fallbacks,
            shadow,
            divergence,
        }
    }
}

/// Experiments: weights in force, guardrails, split health.
#[derive(Debug)]
pub(super) struct Experiments {
    pub(super) weight: Family<VariantLabels, FloatGauge>,
    pub(super) tripped: Family<VariantLabels, Gauge>,
    pub(super) evidence: Family<VariantLabels, FloatGauge>,
    pub(super) log_lr: Family<ThetaLabels, FloatGauge>,
    pub(super) trips: Family<VariantLabels, Counter>,
    pub(super) split_mismatch: Family<RouteLabels, Gauge>,
}

impl Experiments {
    pub(super) fn register(registry: &mut Registry) -> Experiments {
        let weight = register(
            registry,
            "braid_variant_weight",
            "The weight a variant gets now: its configured weight, its ramp's step, or 0 once its guardrail rolled it back",
            Family::<VariantLabels, FloatGauge>::default(),
        );
        let tripped = register(
            registry,
            "braid_guardrail_tripped",
            "1 while a candidate's guardrail has tripped on this replica (latched until its route's config changes or a reset)",
            Family::<VariantLabels, Gauge>::default(),
        );
        let evidence = register(
            registry,
            "braid_guardrail_evidence",
            "log10 of the guardrail's e-value that a candidate is worse than the control (trips at log10(1/alpha))",
            Family::<VariantLabels, FloatGauge>::default(),
        );
        let log_lr = register(
            registry,
            "braid_guardrail_log_lr",
            "Per relative risk theta: ln of the product of the guardrail's likelihood ratios on this replica since its experiment started; a fleet's evidence is the sum over pods (docs/guardrails.md)",
            Family::<ThetaLabels, FloatGauge>::default(),
        );
        let trips = register(
            registry,
            "braid_guardrail_trips",
            "Times a candidate's guardrail tripped on this replica",
            Family::<VariantLabels, Counter>::default(),
        );
        let split_mismatch = register(
            registry,
            "braid_split_mismatch",
            "1 once a route's observed assignments differ from its configured shares (sample ratio mismatch, e-value >= 1000)",
            Family::<RouteLabels, Gauge>::default(),
        );
        Experiments {
            weight,
            tripped,
            evidence,
            log_lr,
            trips,
            split_mismatch,
        }
    }
}

/// The payload log's and the span exporter's records.
#[derive(Debug)]
pub(super) struct Sinks {
    pub(super) payload_log: Family<RouteResultLabels, Counter>,
    pub(super) trace_spans: Family<ResultLabels, Counter>,
}

impl Sinks {
    pub(super) fn register(registry: &mut Registry) -> Sinks {
        let payload_log = register(
            registry,
            "braid_payload_log_records",
            "Sampled payload log records, by route and result (written; failed: the file or endpoint refused it; dropped: the queue was full)",
            Family::<RouteResultLabels, Counter>::default(),
        );
        let trace_spans = register(
            registry,
            "braid_trace_spans",
            "Spans, by result (exported; failed: the OTLP endpoint refused them or did not answer; dropped: the export queue was full)",
            Family::<ResultLabels, Counter>::default(),
        );
        Sinks {
            payload_log,
            trace_spans,
        }
    }
}
