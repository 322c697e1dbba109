//! Commands and flags. Process settings are flags with `BRAID_*` environment
//! fallbacks; routing state lives in the config document.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::file::FileSource;
use crate::config::schema::parse_duration;
use crate::run::{self, ProxyOptions};
use crate::server::Limits;

#[derive(Debug, Parser)]
#[command(
    name = "braid",
    version,
    about = "A low-latency sidecar proxy for model-serving pods"
)]
pub struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "BRAID_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the sidecar proxy.
    Proxy(ProxyArgs),
    /// Validate a config file: every error with its field path; exit 1 if invalid.
    Check {
        /// The config document to check.
        file: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
pub struct ProxyArgs {
    /// Config document to load and watch (a ConfigMap mounted as a volume works).
    #[arg(long, env = "BRAID_CONFIG")]
    pub config: PathBuf,
    /// Data-plane listen address (HTTP/1.1 and h2c on one port).
    #[arg(long, env = "BRAID_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// Admin listen address: /metrics /healthz /readyz /config.
    #[arg(long, env = "BRAID_ADMIN", default_value = "0.0.0.0:9901")]
    pub admin: SocketAddr,
    /// After SIGTERM, keep accepting connections this long (readiness is already 503).
    #[arg(long, env = "BRAID_DRAIN_GRACE", default_value = "5s", value_parser = parse_duration)]
    pub drain_grace: Duration,
    /// Then wait at most this long for in-flight requests.
    #[arg(long, env = "BRAID_DRAIN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// Largest request body accepted (413 above).
    #[arg(long, env = "BRAID_MAX_BODY_BYTES", default_value_t = Limits::default().max_body_bytes)]
    pub max_body_bytes: usize,
    /// Close connections whose request head takes longer than this.
    #[arg(long, env = "BRAID_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,
    /// Most header lines in a request (431 above).
    #[arg(long, env = "BRAID_MAX_HEADERS", default_value_t = Limits::default().max_headers)]
    pub max_headers: usize,
    /// Largest request head in bytes (431 above).
    #[arg(long, env = "BRAID_MAX_HEADER_BYTES", default_value_t = Limits::default().max_header_bytes)]
    pub max_header_bytes: usize,
    /// Concurrent HTTP/2 streams per connection.
    #[arg(long, env = "BRAID_H2_MAX_CONCURRENT_STREAMS", default_value_t = Limits::default().h2_max_concurrent_streams)]
    pub h2_max_concurrent_streams: u32,
    /// Quiet time after a config file change before it is read.
    #[arg(long, env = "BRAID_CONFIG_DEBOUNCE", default_value = "100ms", value_parser = parse_duration)]
    pub config_debounce: Duration,
    /// Re-read the config file this often even without change events.
    #[arg(long, env = "BRAID_CONFIG_POLL", default_value = "10s", value_parser = parse_duration)]
    pub config_poll: Duration,
    /// Runtime worker threads (default: one per core).
    #[arg(long, env = "BRAID_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Check { file } => check(&file),
        Command::Proxy(args) => proxy(args),
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BRAID_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
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
    match crate::config::load(&text, &format!("file:{}", file.display())) {
        Ok(snap) => {
            for w in &snap.warnings {
                println!("warning: {w}");
            }
            let routes = &snap.routes.routes;
            let variants: usize = routes.iter().map(|r| r.variants.len()).sum();
            let names: Vec<&str> = routes.iter().map(|r| &*r.name).collect();
            println!(
                "{}: ok: {} route(s) [{}], {} variant(s)",
                file.display(),
                routes.len(),
                names.join(", "),
                variants
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in &errors {
                println!("{}: {e}", file.display());
            }
            println!("{}: invalid: {} error(s)", file.display(), errors.len());
            ExitCode::FAILURE
        }
    }
}

fn proxy(args: ProxyArgs) -> ExitCode {
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.worker_threads {
        rt.worker_threads(n);
    }
    let rt = rt.enable_all().build().expect("tokio runtime");
    rt.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(args.listen).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("cannot listen on {}: {e}", args.listen);
                return ExitCode::FAILURE;
            }
        };
        let admin = match tokio::net::TcpListener::bind(args.admin).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("cannot listen on {}: {e}", args.admin);
                return ExitCode::FAILURE;
            }
        };
        let opts = ProxyOptions {
            config: FileSource {
                path: args.config.clone(),
                debounce: args.config_debounce,
                poll: args.config_poll,
            },
            limits: Limits {
                header_read_timeout: args.header_read_timeout,
                max_headers: args.max_headers,
                max_header_bytes: args.max_header_bytes,
                max_body_bytes: args.max_body_bytes,
                h2_max_concurrent_streams: args.h2_max_concurrent_streams,
                ..Limits::default()
            },
            drain_grace: args.drain_grace,
            drain_timeout: args.drain_timeout,
        };
        let mut running = match run::start(opts, listener, admin).await {
            Ok(r) => r,
            Err(errors) => {
                for e in &errors {
                    tracing::error!("{}: {e}", args.config.display());
                }
                tracing::error!("no valid config: not starting");
                return ExitCode::FAILURE;
            }
        };
        tracing::info!(data = %running.addr, admin = %running.admin_addr, "listening");
        shutdown_signal().await;
        running.shutdown();
        tokio::select! {
            _ = running.wait() => ExitCode::SUCCESS,
            _ = shutdown_signal() => {
                tracing::warn!("second signal: exiting without waiting for the drain");
                ExitCode::FAILURE
            }
        }
    })
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
