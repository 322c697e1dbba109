//! Fixtures for integration tests: real backend servers and a real proxy, each on
//! `127.0.0.1:0`, plus small clients. Nothing here uses a fixed port or a sleep to
//! wait for readiness.

pub mod grpc;
pub mod kube;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use braid::config::file::FileSource;
use braid::run::{ProxyOptions, Running};
use braid::server::Limits;

// === backends ===

/// Serves `answer` on every connection `listener` accepts (HTTP/1.1, or HTTP/2 with
/// prior knowledge), until the returned task is aborted.
pub fn serve_on<F, Fut>(
    listener: TcpListener,
    h2_only: bool,
    answer: F,
) -> tokio::task::JoinHandle<()>
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Response<Full<Bytes>>, std::io::Error>>
        + Send
        + 'static,
{
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let svc = hyper::service::service_fn(answer.clone());
            tokio::spawn(async move {
                let io = TokioIo::new(stream);
                if h2_only {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, svc)
                        .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await;
                }
            });
        }
    })
}

/// A backend that answers every request with JSON naming itself and what it saw.
pub struct Backend {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
    pub fault: Arc<std::sync::Mutex<Fault>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Clone, Default)]
pub struct BackendBehaviour {
    /// Wait this long before answering (a request's `x-delay-ms` header overrides it).
    pub delay: Duration,
    /// Serve HTTP/2 only (prior knowledge) instead of HTTP/1.1.
    pub h2_only: bool,
}

/// What a backend does wrong, changeable while it runs.
#[derive(Clone, Debug, Default)]
pub struct Fault {
    /// Answer with this status (0: 200).
    pub status: u16,
    /// Only for the next N requests (0: every request while `status` is set).
    pub times: usize,
    pub retry_after: Option<String>,
    /// Read the request, then drop the connection without answering.
    pub reset: bool,
    /// Add OIP `outputs` with one FP32 tensor `e` holding these numbers.
    pub outputs: Option<Vec<f64>>,
    /// Answer 500 to every Nth request from now on (5: 20% fail); 0: never.
    pub fail_every: usize,
    /// Requests seen since `fail_every` was last read (its counter).
    pub seen: usize,
}

impl Backend {
    pub async fn start(name: &str) -> Backend {
        Self::start_with(name, BackendBehaviour::default()).await
    }

    /// A backend that takes `delay` to answer every request.
    pub async fn slow(name: &str, delay: Duration) -> Backend {
        Self::start_with(
            name,
            BackendBehaviour {
                delay,
                ..Default::default()
            },
        )
        .await
    }

    pub async fn start_with(name: &str, behaviour: BackendBehaviour) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let fault = Arc::new(std::sync::Mutex::new(Fault::default()));
        let (n, h, f, b) = (
            name.to_string(),
            hits.clone(),
            fault.clone(),
            behaviour.clone(),
        );
        let task = serve_on(listener, behaviour.h2_only, move |req| {
            let (n, h, b, f) = (n.clone(), h.clone(), b.clone(), f.clone());
            async move {
                h.fetch_add(1, Ordering::SeqCst);
                let fault = {
                    let mut f = f.lock().unwrap();
                    if f.fail_every > 0 {
                        f.seen += 1;
                    }
                    let mut now = f.clone();
                    if f.fail_every > 0 && f.seen % f.fail_every == 0 {
                        now.status = 500;
                    }
                    if f.times > 0 {
                        f.times -= 1;
                        if f.times == 0 {
                            f.status = 0;
                            f.reset = false;
                        }
                    }
                    now
                };
                let deadline = header(&req, "x-braid-timeout");
                let shadow = header(&req, "x-braid-shadow");
                let method = req.method().to_string();
                let path = req.uri().to_string();
                let version = format!("{:?}", req.version());
                let host = header(&req, "host");
                let xff = header(&req, "x-forwarded-for");
                let traceparent = header(&req, "traceparent");
                let tracestate = header(&req, "tracestate");
                let header_len = header(&req, "inference-header-content-length");
                let delay = header(&req, "x-delay-ms")
                    .and_then(|v| v.parse().ok())
                    .map(Duration::from_millis)
                    .unwrap_or(b.delay);
                let body = req
                    .into_body()
                    .collect()
                    .await
                    .map(|c| c.to_bytes())
                    .unwrap_or_default();
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                if fault.reset {
                    return Err(std::io::Error::other("backend resets after reading"));
                }
                let mut json = serde_json::json!({
                    "backend": n, "method": method, "path": path, "version": version,
                    "host": host, "x_forwarded_for": xff, "body_len": body.len(),
                    "body": String::from_utf8_lossy(&body), "deadline": deadline,
                    "shadow": shadow, "header_len": header_len,
                    "traceparent": traceparent, "tracestate": tracestate,
                });
                if let Some(data) = &fault.outputs {
                    json["outputs"] = serde_json::json!([{"name": "e", "datatype": "FP32", "shape": [data.len()], "data": data}]);
                }
                let mut resp = Response::new(Full::new(Bytes::from(json.to_string())));
                resp.headers_mut()
                    .insert("content-type", "application/json".parse().unwrap());
                if fault.status != 0 {
                    *resp.status_mut() = StatusCode::from_u16(fault.status).unwrap();
                }
                if let Some(ra) = &fault.retry_after {
                    resp.headers_mut()
                        .insert("retry-after", ra.parse().unwrap());
                }
                Ok(resp)
            }
        });
        Backend {
            addr,
            hits,
            fault,
            task,
        }
    }

    pub fn set(&self, f: impl FnOnce(&mut Fault)) {
        f(&mut self.fault.lock().unwrap());
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn header(req: &Request<Incoming>, name: &str) -> Option<String> {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// An address on which nothing listens (bound, then released).
pub async fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

// === the proxy under test ===

/// The value of one series on the proxy's `/metrics` (0 when absent), e.g.
/// `braid_retries_total{route="m",variant="a",outcome="retried"}`.
pub async fn metric(proxy: &TestProxy, series: &str) -> f64 {
    let text = get(&client(), &proxy.admin_url("/metrics"), &[])
        .await
        .text();
    metric_value(&text, series).unwrap_or(0.0)
}

/// The value of one series in a Prometheus text exposition.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

pub struct TestProxy {
    pub running: Option<Running>,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub config_path: PathBuf,
    pub _dir: Option<tempfile::TempDir>,
}

pub fn options(config_path: &Path) -> ProxyOptions {
    ProxyOptions {
        config: braid::config::ConfigSource::File(FileSource {
            path: config_path.to_path_buf(),
            debounce: Duration::from_millis(20),
            poll: Duration::from_millis(200),
        }),
        limits: Limits::default(),
        drain_grace: Duration::from_millis(100),
        drain_timeout: Duration::from_secs(5),
        executor_probe_interval: Duration::from_millis(50),
        tls: None,
        access_log: None,
        trace: None,
    }
}

impl TestProxy {
    /// Writes `config` to a fresh directory and starts a proxy on it.
    pub async fn start(config: &str) -> TestProxy {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("braid.yaml");
        std::fs::write(&path, config).unwrap();
        let mut p = Self::start_at(&path, options(&path)).await;
        p._dir = Some(dir);
        p
    }

    pub async fn start_at(path: &Path, opts: ProxyOptions) -> TestProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let running = braid::run::start(opts, listener, admin)
            .await
            .unwrap_or_else(|e| panic!("proxy did not start: {e:?}"));
        TestProxy {
            addr: running.addr,
            admin: running.admin_addr,
            running: Some(running),
            config_path: path.to_path_buf(),
            _dir: None,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    pub fn generation(&self) -> u64 {
        self.running
            .as_ref()
            .unwrap()
            .store
            .load()
            .map_or(0, |a| a.snapshot.generation)
    }

    /// Rewrites the config file and waits until the proxy has applied it.
    pub async fn reload(&self, config: &str) -> u64 {
        let before = self.generation();
        write_atomically(&self.config_path, config);
        self.wait_for_generation(before + 1).await
    }

    pub async fn wait_for_generation(&self, at_least: u64) -> u64 {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let g = self.generation();
            if g >= at_least {
                return g;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "config generation stuck at {g}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn stop(mut self) {
        if let Some(mut r) = self.running.take() {
            r.shutdown();
            r.wait().await;
        }
    }
}

/// A config with one path-prefix route to `backend`, written into `dir`.
pub fn write_single_route(dir: &Path, backend: &str) -> PathBuf {
    let path = dir.join("braid.yaml");
    std::fs::write(&path, single_route(backend)).unwrap();
    path
}

pub fn single_route(backend: &str) -> String {
    format!(
        "routes:\n  - path_prefix: /\n    variants: [{{ name: only, backend: \"{backend}\" }}]\n"
    )
}

/// Writes through a temporary file and a rename, as a careful writer would.
pub fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

// === clients ===

pub type TestClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub fn h2_client() -> TestClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn variant(&self) -> &str {
        self.headers
            .get("x-braid-variant")
            .map(|v| v.to_str().unwrap())
            .unwrap_or("")
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub async fn send(
    client: &TestClient,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::copy_from_slice(body))).unwrap();
    let resp = client
        .request(req)
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: {e:?}"));
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

pub async fn get(client: &TestClient, url: &str, headers: &[(&str, &str)]) -> Reply {
    send(client, "GET", url, headers, b"").await
}

pub async fn post(client: &TestClient, url: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    send(client, "POST", url, headers, body.as_bytes()).await
}

/// Reads one HTTP/1.1 request from `s` (its head, and a body of its Content-Length),
/// keeping any bytes past it in `buf` for the next; `None` when the peer closes first.
/// For test backends that answer by hand.
pub async fn read_request(
    s: &mut tokio::net::TcpStream,
    buf: &mut Vec<u8>,
) -> Option<(String, String)> {
    use tokio::io::AsyncReadExt;
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            let total = end + 4 + len;
            if buf.len() >= total {
                let body = String::from_utf8_lossy(&buf[end + 4..total]).into_owned();
                buf.drain(..total);
                return Some((head, body));
            }
        }
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Sends raw bytes on a fresh connection and reads until the server closes it (or 5 s).
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> (String, bool) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => break false,
        }
    };
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

/// Counts how many responses of `n` went to each variant.
pub fn tally<'a>(variants: impl Iterator<Item = &'a str>) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for v in variants {
        *m.entry(v.to_string()).or_insert(0) += 1;
    }
    m
}

/// A two-variant model route config: control (local-style remote) and candidate.
pub fn ab_config(control: &str, candidate: &str, w_control: f64, w_candidate: f64) -> String {
    format!(
        r#"routes:
  - model: sentiment
    variants:
      - {{ name: control, weight: {w_control}, backend: "{control}", target_model: sentiment-a }}
      - {{ name: candidate, weight: {w_candidate}, backend: "{candidate}", target_model: sentiment-b }}
    sticky_header: x-user-id
    timeout: 5s
  - path_prefix: /
    variants: [{{ name: default, backend: "{control}" }}]
"#
    )
}

// === the braid binary ===

/// `braid ARGS` run to completion, with `stdin` on its standard input: the one way
/// tests run a short command (`check`, `inject`, a refused start).
pub fn braid(args: &[&str], stdin: &[u8]) -> std::process::Output {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_braid"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn braid");
    // A command that exits before reading its input closes the pipe: not an error here.
    let _ = child.stdin.take().unwrap().write_all(stdin);
    child.wait_with_output().unwrap()
}

/// A long-running `braid` process (proxy, executor, demo) started by a test; killed on
/// drop if still running.
pub struct BraidProcess {
    pub child: std::process::Child,
    /// What it announced when ready: each key asked for at `spawn`, with its value.
    pub announced: HashMap<String, String>,
    /// The proxy's data and admin addresses (`start`); unspecified for other commands.
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    /// Every line it has written so far (stdout and stderr).
    pub log: Arc<std::sync::Mutex<Vec<String>>>,
}

impl BraidProcess {
    /// Starts `braid proxy` on `127.0.0.1:0` and reads the bound addresses from its log.
    pub fn start(config: &Path, extra: &[&str]) -> BraidProcess {
        let mut args = vec!["--config", config.to_str().unwrap()];
        args.extend_from_slice(extra);
        Self::start_with(&args, &[])
    }

    /// Starts `braid proxy ARGS` on `127.0.0.1:0` with extra environment variables.
    pub fn start_with(args: &[&str], env: &[(&str, &Path)]) -> BraidProcess {
        let mut all = vec!["proxy", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"];
        all.extend_from_slice(args);
        let mut p = Self::spawn(&all, env, &["data=", "admin="], Duration::from_secs(30));
        p.addr = p.announced["data="].parse().unwrap();
        p.admin = p.announced["admin="].parse().unwrap();
        p
    }

    /// Starts `braid ARGS` and waits (bounded by `within`) until its output (stderr or
    /// stdout) has named every key, as `key=VALUE` in a log line or `key URL` in a
    /// banner: how each command announces where it listens.
    pub fn spawn(
        args: &[&str],
        env: &[(&str, &Path)],
        keys: &[&str],
        within: Duration,
    ) -> BraidProcess {
        use std::io::BufRead;
        use std::process::Stdio;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_braid"))
            .args(args)
            .envs(env.iter().copied())
            .env("BRAID_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn braid");
        let (tx, rx) = std::sync::mpsc::channel();
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let keys: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
        let streams: [Box<dyn std::io::Read + Send>; 2] = [
            Box::new(child.stdout.take().unwrap()),
            Box::new(child.stderr.take().unwrap()),
        ];
        for stream in streams {
            let (tx, keys, log) = (tx.clone(), keys.clone(), log.clone());
            std::thread::spawn(move || {
                let mut found = HashMap::new();
                for line in std::io::BufReader::new(stream)
                    .lines()
                    .map_while(Result::ok)
                {
                    let tokens: Vec<&str> = line.split_whitespace().collect();
                    for k in &keys {
                        let value = tokens.iter().enumerate().find_map(|(i, t)| {
                            match t.strip_prefix(k.as_str()) {
                                Some(v) if !v.is_empty() => Some(v.to_string()),
                                Some(_) => tokens
                                    .get(i + 1)
                                    .filter(|v| v.contains("://"))
                                    .map(|v| v.to_string()),
                                None => None,
                            }
                        });
                        if let Some(v) = value {
                            found.insert(k.clone(), v);
                        }
                    }
                    if !keys.is_empty() && found.len() == keys.len() {
                        let _ = tx.send(std::mem::take(&mut found));
                    }
                    if std::env::var_os("BRAID_TEST_LOGS").is_some() {
                        eprintln!("[braid] {line}");
                    }
                    log.lock().unwrap().push(line);
                }
            });
        }
        let announced = rx
            .recv_timeout(within)
            .unwrap_or_else(|_| panic!("braid {args:?} never announced {keys:?}"));
        let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
        BraidProcess {
            child,
            announced,
            addr: unspecified,
            admin: unspecified,
            log,
        }
    }

    pub fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Its peak resident memory so far, in kB (`VmHWM`).
    pub fn peak_rss_kb(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .expect("VmHWM in /proc/PID/status")
    }

    /// Waits for the process to exit (polling, bounded) and returns its exit status.
    pub async fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        wait_exit(&mut self.child, within).await
    }
}

impl Drop for BraidProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Asserts an error response: its status, a JSON body `{"error": "..."}`, and that the
/// message mentions `needle`. The one check of braid's error contract.
pub fn assert_json_error(r: &Reply, status: u16, needle: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    let msg = r.json()["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no \"error\" string in {}", r.text()))
        .to_string();
    assert!(msg.contains(needle), "{msg:?} does not mention {needle:?}");
}

/// Polls a child process until it exits; panics if it outlives `within`.
pub async fn wait_exit(
    child: &mut std::process::Child,
    within: Duration,
) -> std::process::ExitStatus {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "process did not exit within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `url` until it answers `status` (bounded; no blind sleeps).
pub async fn wait_for_status(client: &TestClient, url: &str, status: u16) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let req = Request::get(url).body(Full::new(Bytes::new())).unwrap();
        if let Ok(r) = client.request(req).await
            && r.status().as_u16() == status
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{url} never answered {status}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// === the executor ===

/// An executor on `127.0.0.1:0` serving the tiny test BERT, loaded and ready.
pub struct TestExecutor {
    /// Kept so the executor serves for the test's lifetime.
    _running: braid::executor::server::RunningExecutor,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

pub fn tiny_spec(dir: &Path, name: &str, labels: &[&str]) -> braid::executor::server::ModelSpec {
    braid::executor::server::ModelSpec {
        name: name.into(),
        source: dir.display().to_string(),
        labels: labels.iter().map(|s| s.to_string()).collect(),
        threads: 1,
        compute_threads: None,
        queue: 16,
        max_batch: 64,
        default_temperature: None,
    }
}

impl TestExecutor {
    pub async fn start(
        specs: impl FnOnce(&Path) -> Vec<braid::executor::server::ModelSpec>,
    ) -> TestExecutor {
        Self::start_traced(specs, None).await
    }

    /// An executor exporting spans with `trace`.
    pub async fn start_traced(
        specs: impl FnOnce(&Path) -> Vec<braid::executor::server::ModelSpec>,
        trace: Option<braid::trace::TraceConfig>,
    ) -> TestExecutor {
        let dir = tempfile::tempdir().unwrap();
        braid::executor::testkit::write_tiny_model(dir.path(), true).unwrap();
        let opts = braid::executor::server::ExecutorOptions {
            models: specs(dir.path()),
            device: "cpu".into(),
            trace,
            limits: Limits::default(),
            llm: Default::default(),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut running = braid::executor::server::start(opts, listener)
            .await
            .unwrap();
        running.wait_loaded().await.unwrap();
        TestExecutor {
            addr: running.addr,
            _running: running,
            _dir: dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

/// An OIP v2 request body with the `text` input.
pub fn infer_body(texts: &[&str], extra: &str) -> String {
    let data = serde_json::to_string(texts).unwrap();
    format!(
        r#"{{"inputs":[{{"name":"text","datatype":"BYTES","shape":[{}],"data":{data}}}]{extra}}}"#,
        texts.len()
    )
}

// === a scriptable mock executor for batching tests ===

/// What the mock executor does with the next batches.
#[derive(Clone, Debug, Default)]
pub struct MockBehaviour {
    /// Cost of a call: `fixed + per_row x rows`.
    pub fixed: Duration,
    pub per_row: Duration,
    /// Return rows in reverse order.
    pub shuffle: bool,
    /// Return one row fewer than asked.
    pub drop_row: bool,
    /// Answer 400 to any batch containing a row with "POISON".
    pub poison: bool,
    /// Answer with HTML instead of JSON.
    pub garbage: bool,
    /// Close the connection without answering.
    pub die: bool,
    /// Answer 503 "loading" (as braid's executor does while its model loads).
    pub loading: bool,
}

/// An OIP v2 / KServe v1 executor whose answer to each row is `"<row>!"`.
pub struct MockExecutor {
    pub addr: SocketAddr,
    pub behaviour: Arc<std::sync::Mutex<MockBehaviour>>,
    /// Rows per call, in call order.
    pub batches: Arc<std::sync::Mutex<Vec<usize>>>,
    /// Every row text ever received.
    pub seen: Arc<std::sync::Mutex<Vec<String>>>,
    /// The `traceparent` of every call that had one.
    pub traceparents: Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MockExecutor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MockExecutor {
    pub async fn start(behaviour: MockBehaviour) -> MockExecutor {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let behaviour = Arc::new(std::sync::Mutex::new(behaviour));
        let batches = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let traceparents = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (b, ba, se, tp) = (
            behaviour.clone(),
            batches.clone(),
            seen.clone(),
            traceparents.clone(),
        );
        let task = serve_on(listener, false, move |req: Request<Incoming>| {
            let (b, ba, se) = (b.clone(), ba.clone(), se.clone());
            if let Some(v) = header(&req, "traceparent") {
                tp.lock().unwrap().push(v);
            }
            async move { mock_answer(req, &b, &ba, &se).await }
        });
        MockExecutor {
            addr,
            behaviour,
            batches,
            seen,
            traceparents,
            task,
        }
    }

    pub fn set(&self, f: impl FnOnce(&mut MockBehaviour)) {
        f(&mut self.behaviour.lock().unwrap());
    }

    pub fn batches(&self) -> Vec<usize> {
        self.batches.lock().unwrap().clone()
    }

    pub fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }

    /// Polls (bounded) until the executor has received a text starting with `prefix`:
    /// a test's way to know a request is in flight, instead of sleeping and hoping.
    pub async fn wait_seen(&self, prefix: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !self.seen().iter().any(|s| s.starts_with(prefix)) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the executor never received {prefix:?}..."
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

async fn mock_answer(
    req: Request<Incoming>,
    b: &std::sync::Mutex<MockBehaviour>,
    batches: &std::sync::Mutex<Vec<usize>>,
    seen: &std::sync::Mutex<Vec<String>>,
) -> Result<Response<Full<Bytes>>, std::io::Error> {
    if req.method() != http::Method::POST {
        // Readiness probes and metadata: answered, not recorded as batches.
        return Ok(Response::new(Full::new(Bytes::from_static(
            b"{\"ready\":true}",
        ))));
    }
    let v1 = req.uri().path().ends_with(":predict");
    let header_len: Option<usize> = req
        .headers()
        .get("inference-header-content-length")
        .and_then(|v| v.to_str().ok()?.parse().ok());
    let body = req
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let (head, binary) = body.split_at(header_len.unwrap_or(body.len()));
    let mut v: serde_json::Value = serde_json::from_slice(head).unwrap_or_default();
    if header_len.is_some() {
        // Triton's binary form (what a gRPC batch is sent as): BYTES and INT64 inputs
        // read back into JSON `data`, so the rest of the mock reads one form.
        let mut at = 0;
        for input in v["inputs"].as_array_mut().into_iter().flatten() {
            let size = input["parameters"]["binary_data_size"]
                .as_u64()
                .unwrap_or(0) as usize;
            let raw = &binary[at..at + size];
            at += size;
            input["data"] = if input["datatype"] == "INT64" {
                raw.chunks_exact(8)
                    .map(|c| serde_json::Value::from(i64::from_le_bytes(c.try_into().unwrap())))
                    .collect()
            } else {
                let mut items = Vec::new();
                let mut rest = raw;
                while rest.len() >= 4 {
                    let n = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
                    items.push(String::from_utf8_lossy(&rest[4..4 + n]).into_owned().into());
                    rest = &rest[4 + n..];
                }
                serde_json::Value::Array(items)
            };
        }
    }
    let rows: Vec<String> = if v1 {
        &v["instances"]
    } else {
        &v["inputs"][0]["data"]
    }
    .as_array()
    .map(|a| {
        a.iter()
            .map(|s| s.as_str().unwrap_or_default().to_string())
            .collect()
    })
    .unwrap_or_default();
    let beh = b.lock().unwrap().clone();
    batches.lock().unwrap().push(rows.len());
    seen.lock().unwrap().extend(rows.iter().cloned());
    tokio::time::sleep(beh.fixed + beh.per_row * rows.len() as u32).await;
    if beh.die {
        return Err(std::io::Error::other("mock executor dies"));
    }
    let json = |status: u16, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = StatusCode::from_u16(status).unwrap();
        Ok(r)
    };
    if beh.garbage {
        return json(200, "<html>oops</html>".into());
    }
    if beh.loading {
        return json(503, r#"{"error":"model m is still loading"}"#.into());
    }
    if beh.poison && rows.iter().any(|r| r.contains("POISON")) {
        return json(400, r#"{"error":"poisoned input"}"#.into());
    }
    let mut out: Vec<String> = rows.iter().map(|r| format!("{r}!")).collect();
    if beh.shuffle {
        out.reverse();
    }
    if beh.drop_row {
        out.pop();
    }
    if v1 {
        return json(200, serde_json::json!({"predictions": out}).to_string());
    }
    let n = out.len();
    let mut outputs =
        vec![serde_json::json!({"name": "echo", "datatype": "BYTES", "shape": [n], "data": out})];
    // Like an identity model in an ensemble: the row-id input comes back as an output,
    // permuted along with everything else when the mock shuffles.
    if let Some(ids) = v["inputs"]
        .as_array()
        .and_then(|i| i.iter().find(|i| i["name"] == "braid_row_id"))
    {
        let mut ids = ids.clone();
        if beh.shuffle
            && let Some(d) = ids["data"].as_array_mut()
        {
            d.reverse();
        }
        outputs.push(ids);
    }
    json(
        200,
        serde_json::json!({"model_name": "mock", "outputs": outputs}).to_string(),
    )
}

/// A route batching requests for `model` to the mock executor.
pub fn batching_config(exec: SocketAddr, batching: &str) -> String {
    format!(
        "executor: http://{exec}\nroutes:\n  - model: m\n    variants: [{{ name: local, backend: local }}]\n    batching: {batching}\n    timeout: 10s\n"
    )
}

// === the official Python clients (tests/python) ===

/// Runs the project's installer `script` (relative to the repository) for `target/DIR`
/// and returns the path it prints: what the tests need, made once and reused.
fn installed(script: &str, dir: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new(root.join(script))
        .arg(root.join("target").join(dir))
        .output()
        .unwrap_or_else(|e| panic!("run {script}: {e}"));
    assert!(
        out.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// The interpreter of a virtual environment holding the pinned official clients of
/// `tests/python/requirements.txt`, made once (by `tests/python/install`) under the
/// target directory and reused.
pub fn python_clients() -> PathBuf {
    static PYTHON: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PYTHON
        .get_or_init(|| installed("tests/python/install", "py-clients"))
        .clone()
}

/// A headless Chromium (Debian's package, installed by tests/tools/install-chromium).
pub fn chromium() -> PathBuf {
    static CHROMIUM: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    CHROMIUM
        .get_or_init(|| installed("tests/tools/install-chromium", "chromium"))
        .clone()
}

/// Prometheus's `promtool`, put under target/promtool once by tests/tools/install-promtool.
pub fn promtool() -> PathBuf {
    static PROMTOOL: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PROMTOOL
        .get_or_init(|| installed("tests/tools/install-promtool", "promtool"))
        .clone()
}

/// `promtool ARGS` run in `dir`; panics with what it printed unless it succeeds.
pub fn promtool_in(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new(promtool())
        .args(args)
        .current_dir(dir)
        .output()
        .expect("promtool runs");
    assert!(
        out.status.success(),
        "promtool {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `promtool check metrics` over a scrape: panics with what it reports unless the text
/// is valid Prometheus text format with no lint problems.
pub fn promtool_check(text: &str) {
    use std::io::Write;
    let mut child = std::process::Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start promtool");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write the scrape to promtool");
    let out = child.wait_with_output().expect("promtool runs");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}{}\n--- scrape ---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `tests/python/SCRIPT ARGS` with the clients' interpreter, off the async
/// runtime; its last stdout line is JSON. Panics with its stderr when it fails.
pub async fn run_python_client(script: &str, args: Vec<String>) -> serde_json::Value {
    let python = python_clients();
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(script);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg(script)
            .args(args)
            .output()
            .expect("run the python client")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "client failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("client printed no JSON ({e}): {stdout}"))
}

/// A server written in Python (`tests/python/SCRIPT ARGS`, run with the clients'
/// interpreter) that prints `listen=ADDR` first, and `grpc=ADDR` next when it serves
/// gRPC too. Killed when dropped.
pub struct PythonServer {
    child: std::process::Child,
    pub addr: String,
    pub grpc: Option<String>,
}

impl PythonServer {
    pub async fn start(script: &str, args: &[&str]) -> PythonServer {
        use std::io::BufRead;
        let python = python_clients();
        let script = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/python")
            .join(script);
        let mut child = std::process::Command::new(python)
            .arg(script)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start the python server");
        let stdout = child.stdout.take().unwrap();
        let grpc = args.contains(&"--grpc");
        let (addr, grpc) = tokio::task::spawn_blocking(move || {
            let mut lines = std::io::BufReader::new(stdout).lines();
            let mut said = |key: &str| {
                lines
                    .by_ref()
                    .map_while(Result::ok)
                    .find_map(|l| l.strip_prefix(key).map(String::from))
            };
            let addr = said("listen=");
            let grpc_addr = if grpc { said("grpc=") } else { None };
            // Keep draining so the server never blocks on a full pipe.
            std::thread::spawn(move || lines.for_each(drop));
            (addr, grpc_addr)
        })
        .await
        .unwrap();
        let addr = addr.expect("the python server never said where it listens");
        let mut server = PythonServer { child, addr, grpc };
        // Importing a Python serving stack takes seconds; poll its readiness.
        let url = format!("http://{}/v2/health/ready", server.addr);
        let c = client();
        for _ in 0..600 {
            let req = Request::get(&url).body(Full::new(Bytes::new())).unwrap();
            if let Ok(r) = c.request(req).await
                && r.status() == 200
            {
                return server;
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("the python server exited: {status}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{url} never answered 200");
    }
}

impl Drop for PythonServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
