//! Wiring for `braid proxy`: one store, one metrics registry, the config source, the
//! data and admin listeners, and the drain sequence. Listeners are passed in, so tests
//! bind `127.0.0.1:0` and drive the real thing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin::Admin;
use crate::config::{ConfigError, ConfigSource, Store};
use crate::metrics::Metrics;
use crate::probe;
use crate::proxy::{HttpExecutor, Proxy};
use crate::server::tls::{self, ReloadingCert};
use crate::server::{self, Limits, Phase};
use crate::upstream::{CONNECT_TIMEOUT, Upstreams};

#[derive(Debug, Clone)]
pub struct ProxyOptions {
    pub config: ConfigSource,
    pub limits: Limits,
    /// After a shutdown signal, keep accepting for this long (endpoints catch up).
    pub drain_grace: Duration,
    /// Then give in-flight requests at most this long to finish.
    pub drain_timeout: Duration,
    /// How often to ask the local executor whether it is ready.
    pub executor_probe_interval: Duration,
    /// Serve the data port over TLS.
    pub tls: Option<TlsFiles>,
    /// Write an access log line per sampled request here.
    pub access_log: Option<crate::access::Destination>,
    /// Export spans (from the `OTEL_*` variables); `None`: tracing is off.
    pub trace: Option<crate::trace::TraceConfig>,
}

/// The data port's certificate and key (PEM), re-read when they change.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    pub reload_every: Duration,
}

/// A started proxy. Dropping it does not stop it; call `shutdown` then `wait`.
pub struct Running {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub store: Arc<Store>,
    pub metrics: Arc<Metrics>,
    draining: Arc<AtomicBool>,
    begin_drain: Option<tokio::sync::oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Running {
    /// Begins the drain: `/readyz` turns 503 at once; see `server` for the phases.
    pub fn shutdown(&mut self) {
        self.draining.store(true, Ordering::SeqCst);
        if let Some(tx) = self.begin_drain.take() {
            let _ = tx.send(());
        }
    }

    /// Resolves when both listeners have closed and every connection has finished.
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// Loads the first config (refusing to start without a valid one), then serves.
pub async fn start(
    opts: ProxyOptions,
    listener: TcpListener,
    admin_listener: TcpListener,
) -> Result<Running, Vec<ConfigError>> {
    let tls = server_tls(&opts)?;
    let metrics = Arc::new(Metrics::new());
    let upstreams = Upstreams::new(CONNECT_TIMEOUT);
    let tracer = opts.trace.clone().map(|c| {
        let m = metrics.clone();
        Arc::new(crate::trace::export::Tracer::start(
            c,
            Arc::new(move |result, n| m.trace_spans(result, n)),
            upstreams.poster(),
        ))
    });
    let store = Arc::new(Store::new(
        metrics.clone(),
        Arc::new(HttpExecutor {
            upstreams: upstreams.clone(),
            tracer: tracer.clone(),
        }),
        upstreams.clone(),
    ));
    let watcher = config_watcher(opts.config.clone(), &store).await?;

    let addr = listener.local_addr().expect("bound listener");
    let admin_addr = admin_listener.local_addr().expect("bound listener");
    let draining = Arc::new(AtomicBool::new(false));
    let (data_phase, data_rx) = watch::channel(Phase::Serving);
    let (admin_phase, admin_rx) = watch::channel(Phase::Serving);

    // Not ready until the first probe says so (or finds no executor configured).
    let (executor_tx, executor_rx) =
        watch::channel(Some("executor readiness not checked yet".to_string()));
    let probe = tokio::spawn(probe::run(
        store.clone(),
        upstreams.clone(),
        opts.executor_probe_interval,
        executor_tx,
    ));
    let access_log = access_log(&opts, &metrics)?;
    let proxy = Arc::new(Proxy {
        store: store.clone(),
        metrics: metrics.clone(),
        access_log,
        tracer,
        upstreams,
        max_body_bytes: opts.limits.max_body_bytes,
        max_inflight: opts.limits.max_inflight,
        body_idle_timeout: opts.limits.body_idle_timeout,
        buffers: server::ByteBudget::new(opts.limits.max_buffered_bytes, metrics.buffered()),
    });
    let admin = Arc::new(Admin {
        store: store.clone(),
        metrics: metrics.clone(),
        draining: draining.clone(),
        executor: executor_rx,
    });
    let (acceptor, cert_watch) = tls.unzip();
    let data_limits = server::Limits {
        open_connections: metrics.connections(),
        ..opts.limits.clone()
    };
    let data = tokio::spawn(server::serve_tls(
        listener,
        data_limits,
        acceptor,
        proxy,
        data_rx,
    ));
    let admin_task = tokio::spawn(server::serve(
        admin_listener,
        Limits::default(),
        admin,
        admin_rx,
    ));

    let (begin_drain, drain_signal) = tokio::sync::oneshot::channel::<()>();
    let drain = Drain {
        signal: drain_signal,
        data_phase,
        admin_phase,
        data,
        admin_task,
        also_stop: [Some(watcher), Some(probe), cert_watch],
    };
    let task = tokio::spawn(drain.run(opts.drain_grace, opts.drain_timeout));

    Ok(Running {
        addr,
        admin_addr,
        store,
        metrics,
        draining,
        begin_drain: Some(begin_drain),
        task,
    })
}

type TlsSetup = (tokio_rustls::TlsAcceptor, tokio::task::JoinHandle<()>);

/// The data port's TLS (with its certificate's reload task), when `--tls-cert` is set.
fn server_tls(opts: &ProxyOptions) -> Result<Option<TlsSetup>, Vec<ConfigError>> {
    Ok(match &opts.tls {
        None => None,
        Some(files) => {
            let fail = |message: String| {
                vec![ConfigError {
                    path: "--tls-cert".into(),
                    message,
                }]
            };
            let cert = ReloadingCert::load(&files.cert, &files.key).map_err(fail)?;
            let cfg = tls::server_config(cert.clone()).map_err(fail)?;
            Some((
                tokio_rustls::TlsAcceptor::from(Arc::new(cfg)),
                cert.watch(files.reload_every),
            ))
        }
    })
}

/// Loads the first config and watches for the next: a file must hold a valid one
/// before braid serves; the API may not be reachable yet, so braid serves 503 (and
/// `/readyz` 503) until the first good document arrives.
async fn config_watcher(
    config: ConfigSource,
    store: &Arc<Store>,
) -> Result<tokio::task::JoinHandle<()>, Vec<ConfigError>> {
    Ok(match config {
        ConfigSource::File(file) => {
            file.load_initial(store)?;
            tokio::spawn(file.watch(store.clone()))
        }
        ConfigSource::ConfigMap(cm) => {
            let client = crate::config::kube::client(cm.kubeconfig.as_deref())
                .await
                .map_err(|message| {
                    vec![ConfigError {
                        path: "--config-map".into(),
                        message,
                    }]
                })?;
            tokio::spawn(cm.watch(client, store.clone()))
        }
    })
}

/// The access log, when `--access-log` names one.
fn access_log(
    opts: &ProxyOptions,
    metrics: &Arc<Metrics>,
) -> Result<Option<Arc<crate::access::AccessLog>>, Vec<ConfigError>> {
    Ok(match &opts.access_log {
        None => None,
        Some(dest) => Some(Arc::new(
            crate::access::AccessLog::open(dest, metrics.clone()).map_err(|message| {
                vec![ConfigError {
                    path: "--access-log".into(),
                    message,
                }]
            })?,
        )),
    })
}

/// The drain sequence, started by `Running::drain` (or its being dropped).
struct Drain {
    signal: tokio::sync::oneshot::Receiver<()>,
    data_phase: watch::Sender<Phase>,
    admin_phase: watch::Sender<Phase>,
    data: tokio::task::JoinHandle<()>,
    admin_task: tokio::task::JoinHandle<()>,
    /// The config watcher, the executor probe, the certificate's reload.
    also_stop: [Option<tokio::task::JoinHandle<()>>; 3],
}

impl Drain {
    /// Readiness 503 for `grace` while still accepting, then no new connections and
    /// in-flight requests finished (at most `timeout`), then the admin port closed.
    async fn run(self, grace: Duration, timeout: Duration) {
        // A dropped sender (the Running value was dropped) also starts the drain.
        let _ = self.signal.await;
        tracing::info!(grace = ?grace, "draining: readiness is now 503, still accepting");
        let _ = self.data_phase.send(Phase::Draining);
        tokio::time::sleep(grace).await;
        tracing::info!("closing: no new connections; finishing in-flight requests");
        let _ = self.data_phase.send(Phase::Closing);
        let finished = async {
            let _ = self.data.await;
            // Every connection task holds a receiver; all gone means all done.
            self.data_phase.closed().await;
        };
        if tokio::time::timeout(timeout, finished).await.is_err() {
            tracing::warn!(timeout = ?timeout, "drain timeout: closing remaining connections");
        }
        for task in self.also_stop.into_iter().flatten() {
            task.abort();
        }
        let _ = self.admin_phase.send(Phase::Closing);
        let _ = tokio::time::timeout(Duration::from_secs(1), self.admin_task).await;
        tracing::info!("stopped");
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
