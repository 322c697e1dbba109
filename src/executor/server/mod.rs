//! The executor's HTTP side: Open Inference Protocol v2 (and KServe v1 predict) for its
//! models, health and readiness, and its own `/metrics`; on the same port, the
//! protocol's gRPC service (`inference.GRPCInferenceService`, told apart by
//! `content-type: application/grpc`), whose calls are answered by the same code.
//! Each protocol's endpoints are a file: `rest` (OIP v2 and KServe v1), `openai`
//! (embeddings and generations), `grpc_service`; here are the models, their loading, one
//! `execute` they share, and the dispatch. Models load on a background
//! thread after the port is open, so liveness answers at once and readiness turns 200
//! only when every model has loaded.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use crate::server::RequestBody;
use candle_core::Device;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::encoder::SentenceEncoder;
use super::generate::LlmOptions;
use super::llm::api::Kind;
use super::llm::engine::Engine;
use super::model::Model;
use super::oip;
use super::worker::{ExecError, ModelHandle};
use crate::error::{Body, full, json_error, json_response};
use crate::grpc::{self, pb};
use crate::metrics::ExecutorMetrics;
use crate::server::{self, ConnInfo, Handler, Limits, Phase};
use crate::trace::RequestTrace;
use crate::trace::export::Tracer;

mod grpc_service;
mod openai;
mod rest;

/// One model to serve.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    /// Name in request paths.
    pub name: String,
    /// A model directory or a pinned source (`pip:NAME==VERSION`).
    pub source: String,
    /// Zero-shot label texts; empty for embeddings only.
    pub labels: Vec<String>,
    /// Forward passes in flight at once for this model.
    pub threads: usize,
    /// Threads one forward pass is split across (this model's compute pool); `None`:
    /// the process's compute thread count (`RAYON_NUM_THREADS`, else every CPU).
    pub compute_threads: Option<usize>,
    /// Requests waiting beyond those: more are answered 503.
    pub queue: usize,
    /// Most rows in one request.
    pub max_batch: usize,
    /// A language model's temperature under this name when a call names none (a
    /// sampling preset: two names on one GGUF can be two variants of an A/B test).
    pub default_temperature: Option<f32>,
}

#[derive(Debug, Clone)]
pub struct ExecutorOptions {
    pub models: Vec<ModelSpec>,
    /// `cpu` or `cuda:N`.
    pub device: String,
    pub limits: Limits,
    /// Continue callers' traces with spans of each inference (from `OTEL_*`).
    pub trace: Option<crate::trace::TraceConfig>,
    /// How GGUF language models are batched and limited.
    pub llm: LlmOptions,
}

struct Slot {
    spec: ModelSpec,
    /// Empty while loading; then the running model or why it failed.
    state: OnceLock<Result<Served, String>>,
}

/// What a slot serves: a sentence encoder, or a language model's generation engine.
enum Served {
    Encoder(ModelHandle),
    Llm(Arc<Engine>),
}

impl Slot {
    /// The encoder, when the slot has loaded one.
    fn encoder(&self) -> Option<&ModelHandle> {
        match self.state.get() {
            Some(Ok(Served::Encoder(h))) => Some(h),
            _ => None,
        }
    }

    fn loaded(&self) -> bool {
        matches!(self.state.get(), Some(Ok(_)))
    }
}

pub struct Executor {
    slots: Vec<Slot>,
    by_name: HashMap<String, usize>,
    metrics: Arc<ExecutorMetrics>,
    /// A request body's size limit and stall time, from the executor's limits.
    max_body_bytes: usize,
    body_idle: std::time::Duration,
    tracer: Option<Arc<Tracer>>,
    llm: LlmOptions,
    /// Set at SIGTERM: readiness answers 503 while requests are still served.
    draining: std::sync::atomic::AtomicBool,
}

/// The timed steps of an answered inference, on its response for the span builder.
#[derive(Clone)]
struct Phases(Vec<crate::executor::encoder::Phase>);

/// The outcome of loading every model: `None` while loading.
pub type LoadState = Option<Result<(), String>>;

pub struct RunningExecutor {
    pub addr: std::net::SocketAddr,
    pub executor: Arc<Executor>,
    pub loaded: watch::Receiver<LoadState>,
    phase: watch::Sender<Phase>,
    task: tokio::task::JoinHandle<()>,
}

impl RunningExecutor {
    /// Waits until every model loaded (Ok) or one failed (Err with why).
    pub async fn wait_loaded(&mut self) -> Result<(), String> {
        let state = self
            .loaded
            .wait_for(Option::is_some)
            .await
            .map_err(|_| "loader stopped".to_string())?;
        state.clone().expect("checked is_some")
    }

    /// Stops accepting, lets in-flight requests finish, and returns.
    pub async fn stop(self) {
        let _ = self.phase.send(Phase::Closing);
        let _ = self.task.await;
    }

    /// The SIGTERM path: readiness turns 503 at once, but requests are still accepted
    /// for `grace` (the sidecar in front, and endpoints that have not yet dropped this
    /// pod, still send them); then as [`stop`](Self::stop).
    pub async fn drain(self, grace: std::time::Duration) {
        self.executor
            .draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = self.phase.send(Phase::Draining);
        tokio::time::sleep(grace).await;
        self.stop().await;
    }
}

pub fn parse_device(spec: &str) -> Result<Device, String> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        s if s.starts_with("cuda:") => {
            let n: usize = s[5..]
                .parse()
                .map_err(|_| format!("bad device {s:?}: use cpu or cuda:N"))?;
            if !cfg!(feature = "cuda") {
                return Err(format!(
                    "device {s:?}: this braid was built without CUDA; rebuild with `cargo build --release --features cuda`"
                ));
            }
            Device::new_cuda(n).map_err(|e| format!("device {s:?}: {e}"))
        }
        s => Err(format!("bad device {s:?}: use cpu or cuda:N")),
    }
}

/// Opens the port at once and loads the models in the background.
pub async fn start(
    opts: ExecutorOptions,
    listener: TcpListener,
) -> Result<RunningExecutor, String> {
    let device = parse_device(&opts.device)?;
    let mut by_name = HashMap::new();
    for (i, m) in opts.models.iter().enumerate() {
        if by_name.insert(m.name.clone(), i).is_some() {
            return Err(format!("model name {:?} is used twice", m.name));
        }
    }
    if opts.models.is_empty() {
        return Err("no models to serve".into());
    }
    let metrics = Arc::new(ExecutorMetrics::new());
    let tracer = opts.trace.map(|c| {
        let m = metrics.clone();
        Arc::new(Tracer::start(
            c,
            Arc::new(move |result, n| m.trace_spans(result, n)),
            crate::upstream::Upstreams::new(std::time::Duration::from_secs(5)).poster(),
        ))
    });
    let executor = Arc::new(Executor {
        tracer,
        slots: opts
            .models
            .iter()
            .map(|spec| Slot {
                spec: spec.clone(),
                state: OnceLock::new(),
            })
            .collect(),
        by_name,
        metrics,
        llm: opts.llm.clone(),
        max_body_bytes: opts.limits.max_body_bytes,
        body_idle: opts.limits.body_idle_timeout,
        draining: std::sync::atomic::AtomicBool::new(false),
    });
    let (loaded_tx, loaded) = watch::channel(None);
    let loader = executor.clone();
    std::thread::Builder::new()
        .name("braid-model-loader".into())
        .spawn(move || {
            let result = loader.load_all(&device);
            if let Err(e) = &result {
                tracing::error!("model loading failed: {e}");
            }
            let _ = loaded_tx.send(Some(result));
        })
        .map_err(|e| e.to_string())?;

    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let (phase, phase_rx) = watch::channel(Phase::Serving);
    let task = tokio::spawn(server::serve(
        listener,
        opts.limits,
        executor.clone(),
        phase_rx,
    ));
    Ok(RunningExecutor {
        addr,
        executor,
        loaded,
        phase,
        task,
    })
}

impl Executor {
    /// How a request body is read: the configured size limit and stall time.
    fn body_rules(&self) -> server::BodyRules<'static> {
        server::BodyRules {
            idle: self.body_idle,
            ..server::BodyRules::limit(self.max_body_bytes)
        }
    }

    /// Loads each distinct source once (models that differ only in labels share one
    /// encoder), then starts each model's threads; a GGUF source is a language model
    /// with its own generation engine.
    fn load_all(&self, device: &Device) -> Result<(), String> {
        let mut encoders: HashMap<String, Arc<SentenceEncoder>> = HashMap::new();
        // Names on one GGUF share its engine: one continuous batch, one KV budget.
        let mut engines: HashMap<String, Arc<Engine>> = HashMap::new();
        let mut first_error = None;
        for slot in &self.slots {
            let spec = &slot.spec;
            let result = (|| {
                if let Some(e) = engines.get(&spec.source) {
                    return Ok(Served::Llm(e.clone()));
                }
                let encoder = match encoders.get(&spec.source) {
                    Some(e) => e.clone(),
                    None => {
                        let dir =
                            super::source::resolve(&spec.source).map_err(|e| e.to_string())?;
                        if dir.extension().is_some_and(|e| e == "gguf") {
                            let e = self.load_llm(spec, &dir, device)?;
                            engines.insert(spec.source.clone(), e.clone());
                            return Ok(Served::Llm(e));
                        }
                        let start = tokio::time::Instant::now();
                        let e = Arc::new(
                            SentenceEncoder::load(&dir, device).map_err(|e| e.to_string())?,
                        );
                        tracing::info!(source = %spec.source, dim = e.dim, max_tokens = e.max_tokens, took = ?start.elapsed(), "encoder loaded");
                        encoders.insert(spec.source.clone(), e.clone());
                        e
                    }
                };
                let model = Model::new(spec.name.clone(), encoder, spec.labels.clone())
                    .map_err(|e| e.to_string())?;
                tracing::info!(model = %spec.name, labels = spec.labels.len(), "model ready");
                ModelHandle::spawn(
                    Arc::new(model),
                    spec.threads,
                    spec.compute_threads,
                    spec.queue,
                    self.metrics.clone(),
                )
                .map(Served::Encoder)
                .map_err(|e| format!("starting compute threads: {e}"))
            })();
            if let Err(e) = &result {
                first_error.get_or_insert_with(|| format!("model {:?}: {e}", spec.name));
            }
            let _ = slot.state.set(result);
        }
        first_error.map_or(Ok(()), Err)
    }

    /// A GGUF language model: loaded, then its generation engine started.
    fn load_llm(
        &self,
        spec: &ModelSpec,
        path: &std::path::Path,
        device: &Device,
    ) -> Result<Arc<Engine>, String> {
        if !spec.labels.is_empty() {
            return Err("labels are for encoders; this is a language model".into());
        }
        let start = tokio::time::Instant::now();
        let o = &self.llm;
        let model = super::llm::LlmModel::load(&spec.name, path, o.kv_cache_tokens, device)?;
        let c = &model.gemma.config;
        tracing::info!(
            model = %spec.name, arch = %c.arch, blocks = c.blocks, vocab = c.vocab,
            max_len = model.max_len(), kv_cache_tokens = o.kv_cache_tokens,
            kv_cache_bytes = o.kv_cache_tokens * c.kv_bytes_per_token(),
            took = ?start.elapsed(), "language model loaded"
        );
        let pool = Arc::new(
            super::threads::compute_pool(&spec.name, spec.compute_threads.unwrap_or(0))
                .map_err(|e| format!("starting compute threads: {e}"))?,
        );
        let limits = super::llm::schedule::Limits {
            max_seqs: o.max_num_seqs,
            kv_tokens: o.kv_cache_tokens,
            step_tokens: o.step_tokens,
            max_waiting: spec.queue,
        };
        Engine::start(Arc::new(model), limits, pool, self.metrics.llm.clone())
            .map(Arc::new)
            .map_err(|e| format!("starting the generation thread: {e}"))
    }

    fn ready(&self) -> bool {
        !self.draining.load(std::sync::atomic::Ordering::Relaxed)
            && self.slots.iter().all(Slot::loaded)
    }

    fn slot(&self, name: &str) -> Option<&Slot> {
        self.by_name.get(name).map(|&i| &self.slots[i])
    }

    fn metadata(&self, slot: &Slot) -> Value {
        if let Some(Ok(Served::Llm(e))) = slot.state.get() {
            return json!({
                "name": slot.spec.name,
                "versions": ["1"],
                "platform": "braid_candle_gguf",
                "inputs": [],
                "outputs": [],
                "parameters": {"architecture": e.model().gemma.config.arch, "max_model_len": e.model().max_len()},
            });
        }
        let dim = slot.encoder().map_or(-1, |h| h.model.dim() as i64);
        let mut outputs =
            vec![json!({"name": "embedding", "datatype": "FP32", "shape": [-1, dim]})];
        if !slot.spec.labels.is_empty() {
            outputs.push(json!({"name": "label", "datatype": "BYTES", "shape": [-1]}));
            outputs.push(json!({"name": "scores", "datatype": "FP32", "shape": [-1, slot.spec.labels.len()]}));
        }
        json!({
            "name": slot.spec.name,
            "versions": ["1"],
            "platform": "braid_candle",
            "inputs": [
                {"name": oip::INPUT, "datatype": "BYTES", "shape": [-1]},
                {"name": oip::ROW_ID, "datatype": "INT64", "shape": [-1], "optional": true},
            ],
            "outputs": outputs,
            "parameters": {"labels": slot.spec.labels, "max_batch_size": slot.spec.max_batch},
        })
    }
    /// Runs the texts on the model: its outputs, or why not (the status and message;
    /// 503s are retryable, each protocol's edge writes them in its own shape).
    async fn execute(
        &self,
        slot: &Slot,
        texts: Vec<String>,
    ) -> Result<super::model::Outputs, (StatusCode, String)> {
        let handle = match slot.state.get() {
            None => {
                let msg = format!("model {} is still loading", slot.spec.name);
                return Err((StatusCode::SERVICE_UNAVAILABLE, msg));
            }
            Some(Err(e)) => {
                let msg = format!("model {} failed to load: {e}", slot.spec.name);
                return Err((StatusCode::SERVICE_UNAVAILABLE, msg));
            }
            Some(Ok(Served::Llm(_))) => {
                let msg = format!(
                    "model {} is a language model: use /v1/completions or /v1/chat/completions",
                    slot.spec.name
                );
                return Err((StatusCode::BAD_REQUEST, msg));
            }
            Some(Ok(Served::Encoder(h))) => h,
        };
        if texts.len() > slot.spec.max_batch {
            let msg = format!(
                "batch of {} rows exceeds model {}'s max batch of {}",
                texts.len(),
                slot.spec.name,
                slot.spec.max_batch
            );
            return Err((StatusCode::BAD_REQUEST, msg));
        }
        handle.infer(texts).await.map_err(|e| match e {
            ExecError::QueueFull(_) | ExecError::Stopped(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, e.to_string())
            }
            ExecError::Model(_) | ExecError::Panicked(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
            }
        })
    }
}

fn unavailable(msg: &str) -> Response<Body> {
    let mut r = json_error(StatusCode::SERVICE_UNAVAILABLE, msg);
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

/// What an executor path asks for.
enum Op<'a> {
    Live,
    Ready,
    Server,
    Metrics,
    Model(&'a str),
    ModelReady(&'a str),
    Infer(&'a str),
    Predict(&'a str),
    ModelV1(&'a str),
    /// OpenAI's `POST /v1/embeddings` and `GET /v1/models`.
    Embeddings,
    Models,
    /// OpenAI's generation calls, on a language model.
    Generate(Kind),
}

fn parse_path(path: &str) -> Option<Op<'_>> {
    match path {
        "/v2/health/live" => return Some(Op::Live),
        "/v2/health/ready" => return Some(Op::Ready),
        "/v2" | "/v2/" => return Some(Op::Server),
        "/metrics" => return Some(Op::Metrics),
        "/v1/embeddings" => return Some(Op::Embeddings),
        "/v1/models" => return Some(Op::Models),
        "/v1/completions" => return Some(Op::Generate(Kind::Completion)),
        "/v1/chat/completions" => return Some(Op::Generate(Kind::Chat)),
        _ => {}
    }
    if let Some(rest) = path.strip_prefix("/v2/models/") {
        let mut parts = rest.split('/');
        let name = parts.next().filter(|n| !n.is_empty())?;
        let mut tail: Vec<&str> = parts.collect();
        // `/versions/{v}/...`: braid serves one version of each model.
        if tail.first() == Some(&"versions") && tail.len() >= 2 {
            tail.drain(..2);
        }
        return match tail[..] {
            [] => Some(Op::Model(name)),
            ["ready"] => Some(Op::ModelReady(name)),
            ["infer"] => Some(Op::Infer(name)),
            _ => None,
        };
    }
    if let Some(rest) = path.strip_prefix("/v1/models/") {
        return match rest.split_once(':') {
            Some((name, "predict")) if !name.is_empty() => Some(Op::Predict(name)),
            None if !rest.is_empty() && !rest.contains('/') => Some(Op::ModelV1(rest)),
            _ => None,
        };
    }
    None
}

impl Handler for Executor {
    async fn call(&self, req: Request<RequestBody>, _conn: &ConnInfo) -> Response<Body> {
        if grpc::is_grpc(req.headers()) {
            return self.grpc(req).await;
        }
        let path = req.uri().path().to_string();
        let Some(op) = parse_path(&path) else {
            return json_error(StatusCode::NOT_FOUND, &format!("no endpoint {path}"));
        };
        let post = matches!(
            op,
            Op::Infer(_) | Op::Predict(_) | Op::Embeddings | Op::Generate(_)
        );
        let method_ok = if post {
            req.method() == Method::POST
        } else {
            req.method() == Method::GET || req.method() == Method::HEAD
        };
        if !method_ok {
            return json_error(
                StatusCode::METHOD_NOT_ALLOWED,
                &format!("{} is not allowed on {path}", req.method()),
            );
        }
        match op {
            Op::Live => json_response(StatusCode::OK, json!({"live": true}).to_string()),
            Op::Ready => {
                let ready = self.ready();
                let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
                json_response(status, json!({"ready": ready}).to_string())
            }
            Op::Server => json_response(
                StatusCode::OK,
                json!({"name": "braid", "version": env!("CARGO_PKG_VERSION"), "extensions": ["binary_tensor_data"]}).to_string(),
            ),
            Op::Metrics => {
                let accept = req.headers().get(header::ACCEPT).and_then(|v| v.to_str().ok());
                let (body, content_type) = crate::metrics::exposition(self.metrics.encode(), accept);
                let mut r = Response::new(full(body));
                r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
                r
            }
            Op::Models => crate::openai::models_response(self.slots.iter().map(|s| s.spec.name.as_str())),
            Op::Embeddings => self.embeddings(req).await,
            Op::Generate(kind) => self.generate(req, kind).await,
            Op::Model(name) => match self.slot(name) {
                Some(slot) => json_response(StatusCode::OK, self.metadata(slot).to_string()),
                None => self.unknown_model(name),
            },
            Op::ModelReady(name) | Op::ModelV1(name) => match self.slot(name) {
                Some(slot) => {
                    let ready = slot.loaded();
                    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
                    json_response(status, json!({"name": name, "ready": ready}).to_string())
                }
                None => self.unknown_model(name),
            },
            Op::Infer(name) | Op::Predict(name) => {
                let Some(slot) = self.slot(name) else {
                    // Counted without the name: label values never come from requests.
                    self.metrics.request("", 404);
                    return self.unknown_model(name);
                };
                let trace = self.tracer.as_ref().map(|t| t.begin(req.headers())).filter(|t| t.context.sampled);
                let started = tokio::time::Instant::now();
                let resp = if matches!(op, Op::Infer(_)) { self.infer_v2(slot, req).await } else { self.predict_v1(slot, req).await };
                self.metrics.request(name, resp.status().as_u16());
                if let (Some(tracer), Some(t)) = (&self.tracer, trace) {
                    let route = if matches!(op, Op::Predict(_)) { "/v1/models/{model}:predict" } else { "/v2/models/{model}/infer" };
                    record_spans(tracer, &t, (name, route), &resp, started.elapsed());
                }
                resp
            }
        }
    }
}

/// The executor's part of a trace: a SERVER span continuing the caller's (braid's batch
/// call), with a span per step of the inference under it (queue, tokenize, then forward
/// and pool per pass).
fn record_spans(
    tracer: &Tracer,
    t: &RequestTrace,
    (model, route): (&str, &'static str),
    resp: &Response<Body>,
    elapsed: std::time::Duration,
) {
    use crate::trace::otlp::span::SpanKind;
    use crate::trace::{SpanContext, SpanData, Value, new_span_id};
    let end = std::time::SystemTime::now();
    let status = resp.status();
    tracer.record(SpanData {
        context: t.context,
        parent: t.parent,
        trace_state: t.trace_state.clone(),
        name: format!("POST {route}"),
        kind: SpanKind::Server,
        start: end - elapsed,
        end,
        attributes: vec![
            ("http.request.method", Value::Str("POST".into())),
            ("http.route", Value::Str(route.into())),
            (
                "http.response.status_code",
                Value::Int(status.as_u16().into()),
            ),
            ("braid.model", Value::Str(model.into())),
        ],
        links: Vec::new(),
        error: status.is_server_error(),
    });
    for p in resp.extensions().get::<Phases>().map_or(&[][..], |p| &p.0) {
        tracer.record(SpanData {
            context: SpanContext {
                span_id: new_span_id(),
                ..t.context
            },
            parent: Some(t.context.span_id),
            trace_state: None,
            name: p.name.into(),
            kind: SpanKind::Internal,
            start: p.start,
            end: p.end,
            attributes: vec![("braid.model", Value::Str(model.into()))],
            links: Vec::new(),
            error: false,
        });
    }
}
