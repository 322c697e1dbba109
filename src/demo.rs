//! `braid demo`: the embedded default. One process runs the executor with a real model
//! (all-MiniLM-L6-v2, fetched once and cached) under two zero-shot label sets — a
//! prompt A/B test: short labels vs full-sentence labels — and the proxy in front with
//! a sticky 50/50 split. The proxy's config is written to a file and watched, so
//! editing it changes the split live.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use crate::config::file::FileSource;
use crate::executor::server::{self as executor, ExecutorOptions, ModelSpec};
use crate::run::{self, ProxyOptions};
use crate::server::Limits;

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Proxy listen address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Proxy admin address.
    #[arg(long, default_value = "127.0.0.1:9901")]
    pub admin: SocketAddr,
    /// Executor listen address.
    #[arg(long, default_value = "127.0.0.1:8081")]
    pub executor_listen: SocketAddr,
    /// The model both variants use (default: MiniLM, or Gemma 3 with `--llm`).
    #[arg(long)]
    pub model: Option<String>,
    /// The LLM demo: Gemma 3 270M served over the OpenAI API, A/B-testing two
    /// sampling presets (greedy and temperature 0.8) under two model names.
    #[arg(long)]
    pub llm: bool,
}

pub const SHORT_LABELS: &[&str] = &["positive", "negative"];
pub const SENTENCE_LABELS: &[&str] = &["This is a positive review.", "This is a negative review."];

/// The proxy config the demo serves, written to a file the proxy watches.
pub fn proxy_config(executor: &str) -> String {
    format!(
        r#"# braid demo: edit and save this file to change the split live.
executor: http://{executor}
routes:
  - model: sentiment
    variants:
      - {{ name: short-labels, weight: 50, backend: local, target_model: sentiment-short }}
      - {{ name: sentence-labels, weight: 50, backend: local, target_model: sentiment-sentences }}
    sticky_header: x-user-id
    timeout: 10s
    batching: {{ max_batch_size: 32, max_queue: 1024, row_id: braid_row_id }}   # shared forward passes; row order checked
    # sentence-labels is watched against short-labels: if it fails or takes over 2s more
    # often, its users go back to short-labels (see `braid experiments`).
    guardrail: {{ control: short-labels, slow: 2s, warmup: 10s }}
"#
    )
}

/// The LLM demo's proxy config: one OpenAI model name split between two presets.
pub fn llm_proxy_config(executor: &str) -> String {
    format!(
        r#"# braid demo --llm: edit and save this file to change the split live.
executor: http://{executor}
routes:
  - model: assistant
    variants:
      - {{ name: greedy, weight: 50, backend: local, target_model: gemma-greedy }}
      - {{ name: creative, weight: 50, backend: local, target_model: gemma-creative }}
    sticky_header: x-user-id
    timeout: 120s
"#
    )
}

/// The LLM demo's models: one GGUF (one engine, one continuous batch) under two names.
pub fn llm_models(source: &str) -> Vec<ModelSpec> {
    let spec = |name: &str, t: f32| ModelSpec {
        name: name.into(),
        source: source.into(),
        labels: Vec::new(),
        threads: 1,
        compute_threads: None,
        queue: 64,
        max_batch: 1,
        default_temperature: Some(t),
    };
    vec![spec("gemma-greedy", 0.0), spec("gemma-creative", 0.8)]
}

pub fn models(source: &str) -> Vec<ModelSpec> {
    let spec = |name: &str, labels: &[&str]| ModelSpec {
        name: name.into(),
        source: source.into(),
        labels: labels.iter().map(|s| s.to_string()).collect(),
        threads: 1,
        compute_threads: None,
        queue: 64,
        max_batch: 256,
        default_temperature: None,
    };
    vec![
        spec("sentiment-short", SHORT_LABELS),
        spec("sentiment-sentences", SENTENCE_LABELS),
    ]
}

pub async fn run(args: DemoArgs) -> ExitCode {
    let bind = |addr| async move {
        tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))
    };
    let (exec_l, data_l, admin_l) = match (
        bind(args.executor_listen).await,
        bind(args.listen).await,
        bind(args.admin).await,
    ) {
        (Ok(a), Ok(b), Ok(c)) => (a, b, c),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
            eprintln!("braid demo: {e}");
            return ExitCode::FAILURE;
        }
    };
    let source = args.model.clone().unwrap_or_else(|| {
        let m = if args.llm {
            crate::executor::source::GEMMA_MODEL
        } else {
            crate::executor::source::DEMO_MODEL
        };
        m.to_string()
    });
    eprintln!(
        "braid demo: loading {source} (fetched once into {}, then cached) ...",
        crate::executor::source::cache_root().display()
    );
    let opts = executor_options(&args, &source);
    let mut exec = match executor::start(opts, exec_l).await {
        Ok(e) => e,
        Err(e) => {
            eprintln!("braid demo: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = exec.wait_loaded().await {
        eprintln!("braid demo: {e}");
        return ExitCode::FAILURE;
    }

    // Per process, so two demos never edit each other's config; removed at exit.
    let dir = std::env::temp_dir().join(format!("braid-demo-{}", std::process::id()));
    let path = dir.join("braid.yaml");
    if let Err(e) = std::fs::create_dir_all(&dir).and_then(|_| {
        let executor = exec.addr.to_string();
        let config = if args.llm {
            llm_proxy_config(&executor)
        } else {
            proxy_config(&executor)
        };
        std::fs::write(&path, config)
    }) {
        eprintln!("braid demo: cannot write {}: {e}", path.display());
        return ExitCode::FAILURE;
    }
    let opts = match proxy_options(&path) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("braid demo: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut proxy = match run::start(opts, data_l, admin_l).await {
        Ok(p) => p,
        Err(errors) => {
            for e in errors {
                eprintln!("braid demo: {e}");
            }
            return ExitCode::FAILURE;
        }
    };
    print_ready(args.llm, (proxy.addr, proxy.admin_addr, exec.addr), &path);
    crate::run::shutdown_signal().await;
    proxy.shutdown();
    proxy.wait().await;
    exec.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
    ExitCode::SUCCESS
}

/// The demo's executor: the model (or Gemma, with `--llm`) on the CPU.
fn executor_options(args: &DemoArgs, source: &str) -> ExecutorOptions {
    ExecutorOptions {
        models: if args.llm {
            llm_models(source)
        } else {
            models(source)
        },
        device: "cpu".into(),
        trace: crate::trace::TraceConfig::from_env("braid-demo-executor")
            .ok()
            .flatten(),
        limits: Limits::default(),
        llm: Default::default(),
    }
}

/// The demo's proxy: the config file written for it, watched; tracing from the
/// `OTEL_*` variables.
fn proxy_options(path: &std::path::Path) -> Result<ProxyOptions, String> {
    Ok(ProxyOptions {
        config: crate::config::ConfigSource::File(FileSource {
            path: path.to_path_buf(),
            debounce: Duration::from_millis(100),
            poll: Duration::from_secs(2),
        }),
        limits: Limits::default(),
        drain_grace: Duration::from_millis(200),
        drain_timeout: Duration::from_secs(10),
        executor_probe_interval: Duration::from_secs(1),
        tls: None,
        access_log: None,
        trace: crate::trace::TraceConfig::from_env("braid-demo")?,
    })
}

/// What the demo serves, where, and the lines to try.
fn print_ready(llm: bool, (p, a, x): (SocketAddr, SocketAddr, SocketAddr), path: &std::path::Path) {
    if llm {
        println!(
            r#"
braid demo --llm is ready.
  proxy     http://{p}   (model "assistant": 50/50 between greedy and creative (temperature 0.8), sticky on x-user-id or the body's user)
  admin     http://{a}   (/metrics /readyz /config /experiments)
  executor  http://{x}   (Gemma 3 270M as gemma-greedy and gemma-creative: one engine, continuous batching; /metrics with vllm:* names)
  config    {config}  (edit and save: applied live)

Try:
  curl -s http://{p}/v1/completions -H 'x-user-id: alice' \
-d '{{"model":"assistant","prompt":"The capital of France is","max_tokens":24}}'
  curl -sN http://{p}/v1/chat/completions -H 'x-user-id: bob' \
-d '{{"model":"assistant","messages":[{{"role":"user","content":"Write a haiku about rivers."}}],"max_tokens":48,"stream":true}}'
  python3 -c 'import openai; c = openai.OpenAI(base_url="http://{p}/v1", api_key="-"); print(c.completions.create(model="assistant", prompt="Once upon a time", max_tokens=32, user="carol").choices[0].text)'
  curl -s http://{x}/metrics | grep -E '^vllm:(num_requests|time_to_first_token_seconds_(sum|count))'
  braid experiments --admin {a}      (per variant: requests, latency, time to first token, tokens)

Ctrl-C to stop."#,
            config = path.display()
        );
    } else {
        println!(
            r#"
braid demo is ready.
  proxy     http://{p}   (model "sentiment": 50/50 between short-labels and sentence-labels, sticky on x-user-id)
  admin     http://{a}   (/metrics /readyz /config /experiments)
  executor  http://{x}   (models sentiment-short, sentiment-sentences; its own /metrics)
  config    {config}  (edit and save: applied live)

Try:
  curl -s http://{p}/v2/models/sentiment/infer -H 'x-user-id: alice' \
-d '{{"inputs":[{{"name":"text","datatype":"BYTES","shape":[2],"data":["I loved this film","The service was awful"]}}],"outputs":[{{"name":"label"}},{{"name":"scores"}}]}}'
  curl -si http://{p}/v1/models/sentiment:predict -H 'x-braid-variant: sentence-labels' -d '{{"instances":["What a great day"]}}' | grep -i x-braid-variant
  curl -s http://{a}/metrics | grep braid_requests_total
  braid experiments --admin {a}      (the A/B test so far: requests, latency, guardrail)

Ctrl-C to stop."#,
            config = path.display()
        );
    }
}
