//! Loopback load: braid proxy vs talking to the backend directly.
//!
//! Closed loop, fixed connections, HTTP/1.1 keep-alive. Reports requests/s, latency
//! percentiles, the proxied/direct ratio, braid's CPU time per request (from
//! /proc/PID/stat) and its RSS after load. Rounds alternate direct and proxied.
//!
//! Run: `cargo bench --bench loopback -- [--seconds 5] [--connections 16] [--rounds 3]`
// A benchmark times real work: std's clock is the one it means.
#![allow(clippy::disallowed_methods)]

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use common::{arg, start_braid};

const BODY: &[u8] = br#"{"model_name":"sentiment","outputs":[{"name":"label","datatype":"BYTES","shape":[1],"data":["positive"]}]}"#;

/// A minimal OIP-shaped backend on its own single-threaded runtime.
fn start_backend() -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(l.local_addr().unwrap()).unwrap();
            loop {
                let (s, _) = l.accept().await.unwrap();
                let _ = s.set_nodelay(true);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                        let _ = req.into_body().collect().await;
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(BODY))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
    });
    rx.recv().unwrap()
}

/// utime + stime of a process, in microseconds.
fn cpu_micros(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after_comm.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    ticks * 1_000_000 / 100 // USER_HZ is 100 on Linux
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0)
}

struct Run {
    rps: f64,
    p50: f64,
    p99: f64,
    n: usize,
    variants: (usize, usize),
}

/// Closed loop: `conns` connections, each sending the next request when the last answers.
fn load(addr: SocketAddr, conns: u64, secs: u64) -> Run {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let end = Instant::now() + Duration::from_secs(secs);
        let mut tasks = Vec::new();
        for _ in 0..conns {
            tasks.push(tokio::spawn(async move {
                let s = tokio::net::TcpStream::connect(addr).await.unwrap();
                let _ = s.set_nodelay(true);
                let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
                    .await
                    .unwrap();
                tokio::spawn(conn);
                let mut lat = Vec::new();
                let mut variants = (0usize, 0usize);
                while Instant::now() < end {
                    let req = Request::post("/v2/models/sentiment/infer")
                        .header("host", "bench")
                        .body(Empty::<Bytes>::new())
                        .unwrap();
                    let t = Instant::now();
                    let resp = tx.send_request(req).await.unwrap();
                    match resp.headers().get("x-braid-variant").map(|v| v.as_bytes()) {
                        Some(b"control") => variants.0 += 1,
                        Some(_) => variants.1 += 1,
                        None => {}
                    }
                    let _ = resp.into_body().collect().await.unwrap();
                    lat.push(t.elapsed().as_secs_f64());
                }
                (lat, variants)
            }));
        }
        let mut all = Vec::new();
        let mut variants = (0, 0);
        for t in tasks {
            let (l, v) = t.await.unwrap();
            all.extend(l);
            variants.0 += v.0;
            variants.1 += v.1;
        }
        all.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)] * 1e3;
        Run {
            rps: all.len() as f64 / secs as f64,
            p50: pct(0.50),
            p99: pct(0.99),
            n: all.len(),
            variants,
        }
    })
}

fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn main() {
    // `cargo bench` passes `--bench`; ignore it and anything else unknown.
    let secs = arg("--seconds", 5);
    let conns = arg("--connections", 16);
    let rounds = arg("--rounds", 3);
    let control = start_backend();
    let candidate = start_backend();
    let dir = std::env::temp_dir().join(format!("braid-loopback-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("braid.yaml");
    std::fs::write(
        &config,
        format!(
            "routes:\n  - model: sentiment\n    variants:\n      - {{ name: control, weight: 90, backend: \"http://{control}\" }}\n      - {{ name: candidate, weight: 10, backend: \"http://{candidate}\" }}\n"
        ),
    )
    .unwrap();
    let braid = start_braid(&config, 1);
    let pid = braid.child.id();
    // Warm up both paths (connections, allocator, pools).
    load(control, conns, 1);
    load(braid.addr, conns, 1);

    let (mut direct, mut proxied) = (Vec::new(), Vec::new());
    let mut cpu_per_req = Vec::new();
    let mut split = (0, 0);
    for _ in 0..rounds {
        direct.push(load(control, conns, secs));
        let cpu0 = cpu_micros(pid);
        let r = load(braid.addr, conns, secs);
        cpu_per_req.push((cpu_micros(pid) - cpu0) as f64 / r.n as f64);
        split.0 += r.variants.0;
        split.1 += r.variants.1;
        proxied.push(r);
    }
    let rss = rss_kib(pid);
    let f = |v: &[Run], g: fn(&Run) -> f64| median(v.iter().map(g).collect());
    let show = |(m, lo, hi): (f64, f64, f64), d: usize| format!("{m:.d$} ({lo:.d$}-{hi:.d$})");
    println!(
        "loopback: {conns} connections, {secs}s x {rounds} rounds, HTTP/1.1 keep-alive, braid with 1 worker thread"
    );
    println!();
    println!("| target | requests/s | p50 ms | p99 ms |");
    println!("|---|---|---|---|");
    println!(
        "| direct | {} | {} | {} |",
        show(f(&direct, |r| r.rps), 0),
        show(f(&direct, |r| r.p50), 3),
        show(f(&direct, |r| r.p99), 3)
    );
    println!(
        "| braid | {} | {} | {} |",
        show(f(&proxied, |r| r.rps), 0),
        show(f(&proxied, |r| r.p50), 3),
        show(f(&proxied, |r| r.p99), 3)
    );
    let ratio: Vec<f64> = proxied
        .iter()
        .zip(&direct)
        .map(|(p, d)| p.rps / d.rps)
        .collect();
    println!();
    println!("proxied/direct throughput: {}", show(median(ratio), 2));
    println!("braid CPU per request: {} us", show(median(cpu_per_req), 1));
    println!("braid RSS after load: {:.1} MiB", rss as f64 / 1024.0);
    let total = (split.0 + split.1) as f64;
    println!(
        "split: control {:.1}%, candidate {:.1}% (configured 90/10)",
        100.0 * split.0 as f64 / total,
        100.0 * split.1 as f64 / total
    );
    let _ = std::fs::remove_dir_all(&dir);
}
