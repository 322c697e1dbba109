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
    /// The model both variants use.
    #[arg(long, default_value = crate::executor::source::DEMO_MODEL)]
    pub model: String,
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

pub fn models(source: &str) -> Vec<ModelSpec> {
    let spec = |name: &str, labels: &[&str]| ModelSpec {
        name: name.into(),
        source: source.into(),
        labels: labels.iter().map(|s| s.to_string()).collect(),
        threads: 1,
        compute_threads: None,
        queue: 64,
        max_batch: 256,
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
    eprintln!(
        "braid demo: loading {} (fetched once into {}, then cached) ...",
        args.model,
        crate::executor::source::cache_root().display()
    );
    let opts = ExecutorOptions {
        models: models(&args.model),
        device: "cpu".into(),
        trace: crate::trace::TraceConfig::from_env("braid-demo-executor")
            .ok()
            .flatten(),
        limits: Limits::default(),
        llm: Default::default(),
    };
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
    if let Err(e) = std::fs::create_dir_all(&dir)
        .and_then(|_| std::fs::write(&path, proxy_config(&exec.addr.to_string())))
    {
        eprintln!("braid demo: cannot write {}: {e}", path.display());
        return ExitCode::FAILURE;
    }
    let opts = ProxyOptions {
        config: crate::config::ConfigSource::File(FileSource {
            path: path.clone(),
            debounce: Duration::from_millis(100),
            poll: Duration::from_secs(2),
        }),
        limits: Limits::default(),
        drain_grace: Duration::from_millis(200),
        drain_timeout: Duration::from_secs(10),
        executor_probe_interval: Duration::from_secs(1),
        tls: None,
        access_log: None,
        trace: match crate::trace::TraceConfig::from_env("braid-demo") {
            Ok(t) => t,
            Err(e) => {
                eprintln!("braid demo: {e}");
                return ExitCode::FAILURE;
            }
        },
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
    let (p, a, x) = (proxy.addr, proxy.admin_addr, exec.addr);
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
    crate::run::shutdown_signal().await;
    proxy.shutdown();
    proxy.wait().await;
    exec.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
    ExitCode::SUCCESS
}
