//! Batching on vs off, through the proxy, against a mock executor (5 ms + 0.5 ms per
//! row) and the real MiniLM executor, at concurrency 1, 4, 16, 64 (closed loop, one
//! row per request). Targets on 2 cores: at concurrency 64, >= 5x unbatched throughput
//! with the mock and >= 2.5x with MiniLM; at concurrency 1, p50 within 1 ms.
//!
//! Each point is also measured straight against the executor ("direct"), the floor
//! the proxy adds to. `--json PATH` writes the points for benches/compare.
//!
//! The last column is the batcher's ceiling: batching on against the executor itself
//! answering one client that sends requests of min(c, 64) rows, interleaved over
//! `--rounds` (median paired ratio and range).
//!
//! Run: `cargo bench --bench batching -- [--seconds 3] [--skip-minilm] [--json PATH]
//! [--concurrency 32,64] [--rounds 5]`
// A benchmark times real work: std's clock is the one it means.
#![allow(clippy::disallowed_methods)]

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};

use common::{TEXTS, arg};

/// The mock executor: one call at a time (like a model on one accelerator), each
/// costing 5 ms + 0.5 ms per row; answers each row with "<row>!".
async fn start_mock() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let device = std::sync::Arc::new(tokio::sync::Mutex::new(()));
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            let device = device.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let device = device.clone();
                    async move {
                        let post = req.method() == http::Method::POST;
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        if !post {
                            return Ok::<_, Infallible>(Response::new(Full::new(
                                Bytes::from_static(b"{}"),
                            )));
                        }
                        let v: Value = serde_json::from_slice(&body).unwrap();
                        let rows: Vec<String> = v["inputs"][0]["data"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|r| format!("{}!", r.as_str().unwrap()))
                            .collect();
                        {
                            let _busy = device.lock().await;
                            tokio::time::sleep(Duration::from_micros(
                                5000 + 500 * rows.len() as u64,
                            ))
                            .await;
                        }
                        let out = json!({"outputs": [{"name": "echo", "datatype": "BYTES", "shape": [rows.len()], "data": rows}]});
                        Ok(Response::new(Full::new(Bytes::from(out.to_string()))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

struct Point {
    rps: f64,
    p50: f64,
    p99: f64,
}

impl Point {
    fn json(&self, concurrency: usize) -> Value {
        json!({"concurrency": concurrency, "rps": self.rps, "p50": self.p50, "p99": self.p99})
    }
}

const CONCURRENCY: [usize; 4] = [1, 4, 16, 64];

async fn load(url: String, concurrency: usize, secs: u64) -> Point {
    load_rows(url, concurrency, 1, secs).await
}

/// Closed loop: `concurrency` clients, each request carrying `rows` rows; `rps` counts
/// requests.
async fn load_rows(url: String, concurrency: usize, rows: usize, secs: u64) -> Point {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(256)
        .build_http();
    let end = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for c in 0..concurrency {
        let (client, url) = (client.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = c;
            while Instant::now() < end {
                i += 1;
                let texts: Vec<&str> = (0..rows).map(|r| TEXTS[(i + r) % TEXTS.len()]).collect();
                let body = json!({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [rows], "data": texts}]}).to_string();
                let req = Request::post(&url).body(Full::new(Bytes::from(body))).unwrap();
                let t = Instant::now();
                let resp = client.request(req).await.expect("request");
                assert!(resp.status().is_success(), "status {}", resp.status());
                let _ = resp.into_body().collect().await;
                lat.push(t.elapsed().as_secs_f64() * 1e3);
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)];
    Point {
        rps: all.len() as f64 / secs as f64,
        p50: pct(0.5),
        p99: pct(0.99),
    }
}

/// Batches and rows the proxy has sent for route `on` so far (from its `/metrics`).
async fn batches_sent(admin: SocketAddr) -> (f64, f64) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let url = format!("http://{admin}/metrics");
    let resp = client.get(url.parse().unwrap()).await.expect("metrics");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&body);
    let series = |name: &str| {
        text.lines()
            .filter(|l| l.starts_with(name) && l.contains("route=\"on\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    (
        series("braid_batch_size_count"),
        series("braid_batch_size_sum"),
    )
}

async fn start_proxy(
    executor: SocketAddr,
    target: &str,
    dir: &std::path::Path,
) -> braid::run::Running {
    let path = dir.join(format!("{target}.yaml"));
    std::fs::write(
        &path,
        format!(
            "executor: http://{executor}\nroutes:\n  - model: off\n    variants: [{{ name: local, backend: local, target_model: {target} }}]\n  - model: on\n    variants: [{{ name: local, backend: local, target_model: {target} }}]\n    batching: {{ max_batch_size: 64, max_queue: 1024 }}\n"
        ),
    )
    .unwrap();
    let opts = braid::run::ProxyOptions {
        config: braid::config::ConfigSource::File(braid::config::file::FileSource {
            path,
            debounce: Duration::from_millis(100),
            poll: Duration::from_secs(60),
        }),
        limits: braid::server::Limits::default(),
        drain_grace: Duration::ZERO,
        drain_timeout: Duration::from_secs(5),
        executor_probe_interval: Duration::from_secs(1),
        tls: None,
        access_log: None,
        // OTEL_EXPORTER_OTLP_ENDPOINT and the rest, as `braid proxy` reads them: the
        // cost of tracing (and of a dead collector) shows in this bench's throughput.
        trace: braid::trace::TraceConfig::from_env("braid-bench").expect("OTEL_* settings"),
    };
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    braid::run::start(opts, l, a).await.expect("proxy starts")
}

/// One scenario's table; returns its points as JSON for benches/compare.
async fn scenario(
    name: &str,
    slug: &str,
    proxy: &braid::run::Running,
    direct: String,
    secs: u64,
    rounds: usize,
) -> Value {
    println!("\n{name}\n");
    println!(
        "| concurrency | direct: req/s | off: req/s | off: p50 ms | off: p99 ms | on: req/s | on: p50 ms | on: p99 ms | on: rows per batch | on/off | executor alone, batches of min(c, 64): rows/s | on / that, median of rounds (range) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let (mut d_pts, mut off_pts, mut on_pts) = (vec![], vec![], vec![]);
    let levels: Vec<usize> = match arg("--concurrency", String::new()) {
        s if s.is_empty() => CONCURRENCY.to_vec(),
        s => s
            .split(',')
            .map(|c| c.trim().parse().expect("--concurrency 32,64"))
            .collect(),
    };
    for c in levels {
        let d = load(direct.clone(), c, secs).await;
        let off = load(
            format!("http://{}/v2/models/off/infer", proxy.addr),
            c,
            secs,
        )
        .await;
        // Batching on, and what the executor itself does with batches of the size
        // braid forms at this concurrency (one client sending c-row requests): the
        // ceiling for `on`. Interleaved over `--rounds`, paired ratio per round.
        let rows = c.min(64);
        let mut runs = Vec::new();
        for _ in 0..rounds {
            let before = batches_sent(proxy.admin_addr).await;
            let on = load(format!("http://{}/v2/models/on/infer", proxy.addr), c, secs).await;
            let after = batches_sent(proxy.admin_addr).await;
            let per_batch = (after.1 - before.1) / (after.0 - before.0).max(1.0);
            let whole = load_rows(direct.clone(), 1, rows, secs).await;
            let ceiling = whole.rps * rows as f64;
            runs.push((on.rps / ceiling, on, per_batch, ceiling));
        }
        runs.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (lo, hi) = (runs[0].0, runs[runs.len() - 1].0);
        let (ratio, on, per_batch, ceiling) = runs.swap_remove(runs.len() / 2);
        println!(
            "| {c} | {:.0} | {:.0} | {:.2} | {:.2} | {:.0} | {:.2} | {:.2} | {per_batch:.1} | {:.2}x | {ceiling:.0} | {:.0}% ({:.0}-{:.0}%) |",
            d.rps,
            off.rps,
            off.p50,
            off.p99,
            on.rps,
            on.p50,
            on.p99,
            on.rps / off.rps,
            100.0 * ratio,
            100.0 * lo,
            100.0 * hi,
        );
        d_pts.push(d.json(c));
        off_pts.push(off.json(c));
        on_pts.push(on.json(c));
    }
    json!({"name": name, "slug": slug, "points": {"direct": d_pts, "off": off_pts, "on": on_pts}})
}

fn main() {
    // The executor in this process runs passes as `braid executor` does.
    if let Err(e) = braid::executor::threads::pin_environment() {
        eprintln!("compute environment not pinned: {e}");
    }
    let secs = arg("--seconds", 3);
    let rounds = arg("--rounds", 1usize).max(1);
    let skip_minilm = std::env::args().any(|a| a == "--skip-minilm");
    let json_out = Some(arg("--json", String::new())).filter(|p| !p.is_empty());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let dir = std::env::temp_dir().join(format!("braid-bench-batching-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        println!("batching on vs off through braid, closed loop, 1 row per request, {secs}s per point, 2-core machine");
        let mock = start_mock().await;
        let proxy = start_proxy(mock, "mock", &dir).await;
        let mut scenarios = vec![
            scenario(
                "mock executor (5 ms + 0.5 ms per row)",
                "mock",
                &proxy,
                format!("http://{mock}/v2/models/mock/infer"),
                secs,
                rounds,
            )
            .await,
        ];
        if !skip_minilm {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let opts = braid::executor::server::ExecutorOptions {
                models: vec![braid::executor::server::ModelSpec {
                    name: "minilm".into(),
                    source: braid::executor::source::DEMO_MODEL.into(),
                    labels: vec![],
                    threads: 1,
                    compute_threads: None,
                    queue: 1024,
                    max_batch: 256,
                    default_temperature: None,
                }],
                device: "cpu".into(),
                trace: None,
                limits: braid::server::Limits::default(),
                llm: Default::default(),
            };
            let mut exec = braid::executor::server::start(opts, l).await.unwrap();
            exec.wait_loaded().await.unwrap();
            let proxy = start_proxy(exec.addr, "minilm", &dir).await;
            let direct = format!("http://{}/v2/models/minilm/infer", exec.addr);
            scenarios.push(
                scenario(
                    "real executor (all-MiniLM-L6-v2, CPU)",
                    "minilm",
                    &proxy,
                    direct,
                    secs,
                    rounds,
                )
                .await,
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
        if let Some(path) = json_out {
            let doc = json!({"seconds": secs, "scenarios": scenarios});
            std::fs::write(&path, doc.to_string()).expect("write --json");
        }
    });
}
