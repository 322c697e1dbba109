//! The executor's metric families, served on the executor's own port: its requests,
//! model threads and queues, and its language models (with vLLM's names beside
//! braid's, for tools written for vLLM).

use super::*;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelCodeLabels {
    pub model: String,
    pub code: u16,
}

/// Model names are label values: they come from the executor's flags or config, and
/// requests for unknown models are counted without one.
#[derive(Debug)]
pub struct ExecutorMetrics {
    registry: Registry,
    requests: Family<ModelCodeLabels, Counter>,
    inference: HistogramFamily<ModelLabels>,
    queue_wait: HistogramFamily<ModelLabels>,
    batch_size: HistogramFamily<ModelLabels>,
    queue_depth: Family<ModelLabels, Gauge>,
    cancelled: Family<ModelLabels, Counter>,
    tokens_computed: Family<ModelLabels, Counter>,
    tokens_real: Family<ModelLabels, Counter>,
    trace_spans: Family<ResultLabels, Counter>,
    /// The LLM families, braid's names and vLLM's (`vllm:*`, labelled `model_name`).
    pub llm: LlmMetrics,
}

/// vLLM's label for the model a sample is about.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VllmLabels {
    pub model_name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LlmFinishLabels {
    pub model: String,
    pub finished_reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VllmFinishLabels {
    pub model_name: String,
    pub finished_reason: &'static str,
}

/// One LLM family under braid's name and vLLM's.
#[derive(Debug, Clone)]
struct Twin<M> {
    braid: Family<ModelLabels, M, fn() -> M>,
    vllm: Family<VllmLabels, M, fn() -> M>,
}

impl<M: prometheus_client::registry::Metric + prometheus_client::metrics::TypedMetric + Clone>
    Twin<M>
{
    fn new(r: &mut Registry, braid: &str, vllm: &str, help: &str, make: fn() -> M) -> Twin<M> {
        Twin {
            braid: register(r, braid, help, Family::new_with_constructor(make)),
            vllm: register(r, vllm, help, Family::new_with_constructor(make)),
        }
    }

    /// Both series for `model`, resolved once (a model's handles are kept, not looked
    /// up per token).
    fn pair(&self, model: &str) -> Pair<M> {
        let braid = self.braid.get_or_create(&ModelLabels {
            model: model.to_string(),
        });
        let vllm = self.vllm.get_or_create(&VllmLabels {
            model_name: model.to_string(),
        });
        Pair([braid.clone(), vllm.clone()])
    }
}

/// Time-to-first-token and per-token buckets (vLLM's, to 80 s).
pub const TOKEN_LATENCY_BUCKETS: [f64; 18] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 80.0,
];

fn token_histogram() -> Histogram {
    Histogram::new(TOKEN_LATENCY_BUCKETS)
}

/// The executor's generation metrics, per model: what an LLM operator's dashboards,
/// the Gateway API Inference Extension's endpoint picker, KEDA and HPA recipes read.
#[derive(Debug, Clone)]
pub struct LlmMetrics {
    running: Twin<Gauge>,
    waiting: Twin<Gauge>,
    kv_usage: Twin<FloatGauge>,
    prompt_tokens: Twin<Counter>,
    generation_tokens: Twin<Counter>,
    ttft: Twin<Histogram>,
    tpot: Twin<Histogram>,
    queue_time: Twin<Histogram>,
    e2e: Twin<Histogram>,
    step_seqs: HistogramFamily<ModelLabels>,
    finished: Family<LlmFinishLabels, Counter>,
    vllm_finished: Family<VllmFinishLabels, Counter>,
}

impl LlmMetrics {
    fn new(r: &mut Registry) -> LlmMetrics {
        LlmMetrics {
            running: Twin::new(
                r,
                "braid_executor_llm_running",
                "vllm:num_requests_running",
                "Sequences running (in the decoding batch), by model",
                Gauge::default,
            ),
            waiting: Twin::new(
                r,
                "braid_executor_llm_waiting",
                "vllm:num_requests_waiting",
                "Sequences waiting to be admitted, by model",
                Gauge::default,
            ),
            kv_usage: Twin::new(
                r,
                "braid_executor_llm_kv_cache_usage",
                "vllm:kv_cache_usage_perc",
                "Share of the KV-cache budget reserved by running sequences (0 to 1), by model",
                FloatGauge::default,
            ),
            prompt_tokens: Twin::new(
                r,
                "braid_executor_llm_prompt_tokens",
                "vllm:prompt_tokens",
                "Prompt tokens prefilled, by model",
                Counter::default,
            ),
            generation_tokens: Twin::new(
                r,
                "braid_executor_llm_generation_tokens",
                "vllm:generation_tokens",
                "Tokens generated, by model",
                Counter::default,
            ),
            ttft: Twin::new(
                r,
                "braid_executor_llm_time_to_first_token_seconds",
                "vllm:time_to_first_token_seconds",
                "From arrival to the first generated token, by model",
                token_histogram,
            ),
            tpot: Twin::new(
                r,
                "braid_executor_llm_time_per_output_token_seconds",
                "vllm:time_per_output_token_seconds",
                "Between one generated token and the next, by model",
                token_histogram,
            ),
            queue_time: Twin::new(
                r,
                "braid_executor_llm_queue_seconds",
                "vllm:request_queue_time_seconds",
                "From arrival to admission into the running batch, by model",
                token_histogram,
            ),
            e2e: Twin::new(
                r,
                "braid_executor_llm_request_seconds",
                "vllm:e2e_request_latency_seconds",
                "From arrival to the last token, by model",
                token_histogram,
            ),
            step_seqs: register(
                r,
                "braid_executor_llm_step_sequences",
                "Sequences in one decoding step (the continuous batch's size), by model",
                Family::new_with_constructor(batch_histogram),
            ),
            finished: register(
                r,
                "braid_executor_llm_finished",
                "Generations ended, by model and reason (stop, length, abort, error)",
                Family::default(),
            ),
            vllm_finished: register(
                r,
                "vllm:request_success",
                "Generations ended, by model and reason (stop, length, abort, error)",
                Family::default(),
            ),
        }
    }

    /// One model's handles, for its generation loop.
    pub fn model(&self, model: &str) -> ModelLlmMetrics {
        ModelLlmMetrics {
            running: self.running.pair(model),
            waiting: self.waiting.pair(model),
            kv_usage: self.kv_usage.pair(model),
            prompt_tokens: self.prompt_tokens.pair(model),
            generation_tokens: self.generation_tokens.pair(model),
            ttft: self.ttft.pair(model),
            tpot: self.tpot.pair(model),
            queue_time: self.queue_time.pair(model),
            e2e: self.e2e.pair(model),
            step_seqs: self
                .step_seqs
                .get_or_create(&ModelLabels {
                    model: model.to_string(),
                })
                .clone(),
            all: self.clone(),
            model: model.to_string(),
        }
    }
}

/// A metric under braid's name and vLLM's.
#[derive(Debug, Clone)]
struct Pair<M>([M; 2]);

impl<M> Pair<M> {
    fn each(&self, f: impl Fn(&M)) {
        self.0.iter().for_each(f);
    }
}

/// One language model's generation metrics, resolved at its engine's start.
#[derive(Debug, Clone)]
pub struct ModelLlmMetrics {
    running: Pair<Gauge>,
    waiting: Pair<Gauge>,
    kv_usage: Pair<FloatGauge>,
    prompt_tokens: Pair<Counter>,
    generation_tokens: Pair<Counter>,
    ttft: Pair<Histogram>,
    tpot: Pair<Histogram>,
    queue_time: Pair<Histogram>,
    e2e: Pair<Histogram>,
    step_seqs: Histogram,
    all: LlmMetrics,
    model: String,
}

impl ModelLlmMetrics {
    pub fn occupancy(&self, running: usize, waiting: usize, kv_share: f64) {
        self.running.each(|g| {
            g.set(running as i64);
        });
        self.waiting.each(|g| {
            g.set(waiting as i64);
        });
        self.kv_usage.each(|g| {
            g.set(kv_share);
        });
    }

    pub fn step(&self, sequences: usize) {
        self.step_seqs.observe(sequences as f64);
    }

    pub fn prompt_tokens(&self, n: usize) {
        self.prompt_tokens.each(|c| {
            c.inc_by(n as u64);
        });
    }

    pub fn generated(&self, since_last: Option<Duration>) {
        self.generation_tokens.each(|c| {
            c.inc();
        });
        if let Some(d) = since_last {
            self.tpot.each(|h| h.observe(d.as_secs_f64()));
        }
    }

    pub fn first_token(&self, since_arrival: Duration) {
        self.ttft.each(|h| h.observe(since_arrival.as_secs_f64()));
    }

    pub fn admitted(&self, queued: Duration) {
        self.queue_time.each(|h| h.observe(queued.as_secs_f64()));
    }

    /// Once per generation: the reason's series are looked up here.
    pub fn finished(&self, reason: &'static str, since_arrival: Duration) {
        self.e2e.each(|h| h.observe(since_arrival.as_secs_f64()));
        let finished_reason = reason;
        self.all
            .finished
            .get_or_create(&LlmFinishLabels {
                model: self.model.clone(),
                finished_reason,
            })
            .inc();
        self.all
            .vllm_finished
            .get_or_create(&VllmFinishLabels {
                model_name: self.model.clone(),
                finished_reason,
            })
            .inc();
    }
}

impl ExecutorMetrics {
    /// Counts `n` of the executor's spans by what became of them.
    pub fn trace_spans(&self, result: &'static str, n: u64) {
        self.trace_spans
            .get_or_create(&ResultLabels { result })
            .inc_by(n);
    }

    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = register(
            &mut registry,
            "braid_executor_requests",
            "Inference requests answered, by model and HTTP status",
            Family::<ModelCodeLabels, Counter>::default(),
        );
        let inference: HistogramFamily<ModelLabels> = register(
            &mut registry,
            "braid_executor_inference_seconds",
            "Time of one forward pass (tokenize, encode, pool), by model",
            Family::new_with_constructor(latency_histogram),
        );
        let queue_wait: HistogramFamily<ModelLabels> = register(
            &mut registry,
            "braid_executor_queue_seconds",
            "Time a batch waited for a model thread, by model",
            Family::new_with_constructor(latency_histogram),
        );
        let batch_size: HistogramFamily<ModelLabels> = register(
            &mut registry,
            "braid_executor_batch_size",
            "Rows per forward pass, by model",
            Family::new_with_constructor(batch_histogram),
        );
        let queue_depth = register(
            &mut registry,
            "braid_executor_queue_depth",
            "Batches waiting for a model thread",
            Family::<ModelLabels, Gauge>::default(),
        );
        let trace_spans = register(
            &mut registry,
            "braid_executor_trace_spans",
            "The executor's spans, by result (exported; failed: the OTLP endpoint refused them or did not answer; dropped: the export queue was full)",
            Family::<ResultLabels, Counter>::default(),
        );
        let cancelled = register(
            &mut registry,
            "braid_executor_cancelled",
            "Batches dropped before their forward pass because the caller went away",
            Family::<ModelLabels, Counter>::default(),
        );
        let tokens_computed = register(
            &mut registry,
            "braid_executor_tokens_computed",
            "Token positions computed, padding included",
            Family::<ModelLabels, Counter>::default(),
        );
        let tokens_real = register(
            &mut registry,
            "braid_executor_tokens_real",
            "Token positions that were real text (computed minus these is padding waste)",
            Family::<ModelLabels, Counter>::default(),
        );
        let llm = LlmMetrics::new(&mut registry);
        ExecutorMetrics {
            llm,
            registry,
            requests,
            inference,
            queue_wait,
            batch_size,
            queue_depth,
            cancelled,
            tokens_computed,
            tokens_real,
            trace_spans,
        }
    }

    fn labels(model: &str) -> ModelLabels {
        ModelLabels {
            model: model.to_string(),
        }
    }

    pub fn request(&self, model: &str, code: u16) {
        self.requests
            .get_or_create(&ModelCodeLabels {
                model: model.to_string(),
                code,
            })
            .inc();
    }

    pub fn batch(
        &self,
        model: &str,
        rows: usize,
        took: Duration,
        tokens_computed: usize,
        tokens_real: usize,
    ) {
        let l = Self::labels(model);
        self.inference.get_or_create(&l).observe(took.as_secs_f64());
        self.batch_size.get_or_create(&l).observe(rows as f64);
        self.tokens_computed
            .get_or_create(&l)
            .inc_by(tokens_computed as u64);
        self.tokens_real
            .get_or_create(&l)
            .inc_by(tokens_real as u64);
    }

    pub fn queued(&self, model: &str, waited: Duration) {
        self.queue_wait
            .get_or_create(&Self::labels(model))
            .observe(waited.as_secs_f64());
    }

    pub fn queue_depth(&self, model: &str, depth: i64) {
        self.queue_depth
            .get_or_create(&Self::labels(model))
            .set(depth);
    }

    pub fn cancelled(&self, model: &str) {
        self.cancelled.get_or_create(&Self::labels(model)).inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(4096);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

impl Default for ExecutorMetrics {
    fn default() -> Self {
        Self::new()
    }
}
