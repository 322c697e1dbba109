//! gRPC ModelInfer through braid, two measurements:
//!
//! 1. Batching gain, gRPC against REST. A mock executor that speaks both (5 ms + 0.5 ms
//!    per row, one call at a time, like a model on one accelerator) behind braid with a
//!    batched route (`on`) and an unbatched one (`off`); closed-loop clients, one row
//!    per request, at concurrency 1, 4, 16, 64; each point also straight against the
//!    mock (`direct`). Per point: on/off for REST and for gRPC, and gRPC's gain over
//!    REST's (target: within 10%). Rounds interleave REST and gRPC.
//! 2. The p50 braid adds to an unbatched ModelInfer at a fixed 2,000 requests/s (open
//!    loop, one HTTP/2 connection as tritonclient's channel is, requests sent in pairs
//!    each millisecond: tokio's timer resolution), against a backend that answers at
//!    once; rounds alternate direct and through braid (target: <= 0.1 ms).
//!
//! Run: `cargo bench --bench grpc -- [--seconds 3] [--rounds 3] [--rate 2000]
//! [--concurrency 1,4,16,64] [--skip-gain]`
// A benchmark times real work: std's clock is the one it means.
#![allow(clippy::disallowed_methods)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use braid::error::{Body, full};
use braid::grpc::{self, pb};
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message;
use serde_json::{Value, json};

use common::{Braid, TEXTS, arg, start_braid};

const INFER: &str = "/inference.GRPCInferenceService/ModelInfer";

/// The rows of a request to the mock, REST (JSON or Triton's binary form) or gRPC.
fn rows_of(grpc_call: bool, header_len: Option<usize>, body: &[u8]) -> Vec<String> {
    let bytes_rows = |mut raw: &[u8]| {
        let mut out = Vec::new();
        while raw.len() >= 4 {
            let n = u32::from_le_bytes(raw[..4].try_into().unwrap()) as usize;
            out.push(String::from_utf8_lossy(&raw[4..4 + n]).into_owned());
            raw = &raw[4 + n..];
        }
        out
    };
    if grpc_call {
        let req = pb::ModelInferRequest::decode(grpc::unary_message(body).unwrap()).unwrap();
        return bytes_rows(&req.raw_input_contents[0]);
    }
    let (head, raw) = body.split_at(header_len.unwrap_or(body.len()));
    let v: Value = serde_json::from_slice(head).unwrap();
    match v["inputs"][0]["data"].as_array() {
        Some(data) => data
            .iter()
            .map(|r| r.as_str().unwrap().to_string())
            .collect(),
        None => bytes_rows(raw),
    }
}

/// The mock executor, on its own thread: answers each row with "<row>!" after
/// `cost(rows)`, one call at a time; REST (HTTP/1.1 or h2c) and gRPC on one port.
fn start_mock(cost: fn(usize) -> Duration) -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(l.local_addr().unwrap()).unwrap();
            let device = Arc::new(tokio::sync::Mutex::new(()));
            loop {
                let (s, _) = l.accept().await.unwrap();
                let _ = s.set_nodelay(true);
                let device = device.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let device = device.clone();
                        async move { Ok::<_, std::convert::Infallible>(mock(req, cost, &device).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
    });
    rx.recv().unwrap()
}

async fn mock(
    req: Request<Incoming>,
    cost: fn(usize) -> Duration,
    device: &tokio::sync::Mutex<()>,
) -> Response<Body> {
    if req.method() != http::Method::POST {
        return Response::new(full("{\"ready\":true}"));
    }
    let grpc_call = grpc::is_grpc(req.headers());
    let header_len = braid::executor::oip::header_len(req.headers()).unwrap();
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let rows: Vec<String> = rows_of(grpc_call, header_len, &body)
        .into_iter()
        .map(|r| format!("{r}!"))
        .collect();
    let wait = cost(rows.len());
    if !wait.is_zero() {
        let _busy = device.lock().await;
        tokio::time::sleep(wait).await;
    }
    if grpc_call {
        let mut raw = Vec::new();
        for r in &rows {
            raw.extend_from_slice(&(r.len() as u32).to_le_bytes());
            raw.extend_from_slice(r.as_bytes());
        }
        return grpc::unary_ok(&pb::ModelInferResponse {
            outputs: vec![pb::model_infer_response::InferOutputTensor {
                name: "echo".into(),
                datatype: "BYTES".into(),
                shape: vec![rows.len() as i64],
                ..Default::default()
            }],
            raw_output_contents: vec![raw.into()],
            ..Default::default()
        });
    }
    let out = json!({"outputs": [{"name": "echo", "datatype": "BYTES", "shape": [rows.len()], "data": rows}]});
    Response::new(full(out.to_string()))
}

fn start_proxy(config: &str, threads: usize) -> (Braid, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("braid.yaml");
    std::fs::write(&path, config).unwrap();
    (start_braid(&path, threads), dir)
}

fn grpc_request(addr: SocketAddr, model: &str, text: &str) -> Request<Full<Bytes>> {
    let mut raw = (text.len() as u32).to_le_bytes().to_vec();
    raw.extend_from_slice(text.as_bytes());
    let msg = pb::ModelInferRequest {
        model_name: model.into(),
        inputs: vec![pb::model_infer_request::InferInputTensor {
            name: "text".into(),
            datatype: "BYTES".into(),
            shape: vec![1],
            ..Default::default()
        }],
        raw_input_contents: vec![raw.into()],
        ..Default::default()
    };
    Request::post(format!("http://{addr}{INFER}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(grpc::frame(&msg.encode_to_vec())))
        .unwrap()
}

/// One gRPC call on `conn`; panics unless it ends with grpc-status 0.
async fn grpc_call(
    conn: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
) {
    let resp = conn.send_request(req).await.expect("call");
    let collected = resp.into_body().collect().await.expect("answer");
    let status = collected
        .trailers()
        .and_then(|t| t.get("grpc-status").cloned());
    assert_eq!(
        status.as_ref().map(|s| s.as_bytes()),
        Some(&b"0"[..]),
        "grpc-status"
    );
}

async fn h2_connection(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = s.set_nodelay(true);
    let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

/// Closed loop: `concurrency` clients, one row per request; requests/s.
async fn closed_loop(
    addr: SocketAddr,
    model: &str,
    grpc_form: bool,
    concurrency: usize,
    secs: u64,
) -> f64 {
    let rest: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(256)
        .build_http();
    let end = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for c in 0..concurrency {
        let (rest, model) = (rest.clone(), model.to_string());
        tasks.push(tokio::spawn(async move {
            let mut conn = if grpc_form { Some(h2_connection(addr).await) } else { None };
            let mut n = 0usize;
            while Instant::now() < end {
                let text = TEXTS[(c + n) % TEXTS.len()];
                n += 1;
                match conn.as_mut() {
                    Some(conn) => grpc_call(conn, grpc_request(addr, &model, text)).await,
                    None => {
                        let body = json!({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [text]}]});
                        let req = Request::post(format!("http://{addr}/v2/models/{model}/infer"))
                            .body(Full::new(Bytes::from(body.to_string())))
                            .unwrap();
                        let resp = rest.request(req).await.expect("request");
                        assert!(resp.status().is_success(), "{}", resp.status());
                        let _ = resp.into_body().collect().await;
                    }
                }
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total as f64 / secs as f64
}

fn rest_request(addr: SocketAddr, model: &str, text: &str) -> Request<Full<Bytes>> {
    let body =
        json!({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [text]}]});
    Request::post(format!("http://{addr}/v2/models/{model}/infer"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

/// Open loop at `rate` requests/s on one HTTP/2 connection: each call's latency from
/// when it was sent (the load is light, so sending late hides no queueing, and
/// tokio's timer lateness stays out of the figure); the p50 in milliseconds.
async fn open_loop_p50(
    addr: SocketAddr,
    model: &'static str,
    grpc_form: bool,
    rate: u64,
    secs: u64,
) -> f64 {
    let conn = h2_connection(addr).await;
    let per_tick = (rate / 1000).max(1);
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < Duration::from_secs(secs) {
        tick.tick().await;
        for _ in 0..per_tick {
            let (mut conn, tx) = (conn.clone(), tx.clone());
            let text = TEXTS[sent as usize % TEXTS.len()];
            sent += 1;
            tokio::spawn(async move {
                let sent = Instant::now();
                if grpc_form {
                    grpc_call(&mut conn, grpc_request(addr, model, text)).await;
                } else {
                    let resp = conn.send_request(rest_request(addr, model, text)).await;
                    let resp = resp.expect("call");
                    assert!(resp.status().is_success(), "{}", resp.status());
                    let _ = resp.into_body().collect().await;
                }
                let _ = tx.send(sent.elapsed().as_secs_f64() * 1e3);
            });
        }
    }
    drop(tx);
    let mut lat = Vec::new();
    while let Some(l) = rx.recv().await {
        lat.push(l);
    }
    assert_eq!(lat.len() as u64, sent, "every call answered");
    lat.sort_by(f64::total_cmp);
    lat[lat.len() / 2]
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let secs: u64 = arg("--seconds", 3);
    let rounds: usize = arg("--rounds", 3);
    let rate: u64 = arg("--rate", 2000);
    let concurrency: Vec<usize> = arg("--concurrency", "1,4,16,64".to_string())
        .split(',')
        .map(|c| c.parse().unwrap())
        .collect();
    let mock = start_mock(|rows| Duration::from_micros(5000 + 500 * rows as u64));
    let instant = start_mock(|_| Duration::ZERO);
    let local = "variants: [{ name: local, backend: local }]";
    let config = format!(
        "executor: http://{mock}\nroutes:\n  - model: off\n    {local}\n  - model: on\n    {local}\n    batching: {{ max_batch_size: 64, max_queue: 1024 }}\n  - model: fast\n    variants: [{{ name: fast, backend: h2c://{instant} }}]\n"
    );
    let (braid, _dir) = start_proxy(&config, arg("--braid-threads", 2));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let skip_gain = std::env::args().any(|a| a == "--skip-gain");
    rt.block_on(async {
        if skip_gain {
            return;
        }
        println!("## Batching gain, gRPC against REST (mock executor, {secs} s per point, {rounds} rounds)\n");
        println!("| concurrency | REST off | REST on | REST on/off | gRPC direct | gRPC off | gRPC on | gRPC on/off | gRPC gain / REST gain (median, range) |");
        println!("|---|---|---|---|---|---|---|---|---|");
        for &c in &concurrency {
            let (mut rest_gain, mut grpc_gain, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
            let mut last = [0.0; 5];
            for _ in 0..rounds {
                let rest_off = closed_loop(braid.addr, "off", false, c, secs).await;
                let grpc_off = closed_loop(braid.addr, "off", true, c, secs).await;
                let rest_on = closed_loop(braid.addr, "on", false, c, secs).await;
                let grpc_on = closed_loop(braid.addr, "on", true, c, secs).await;
                let direct = closed_loop(mock, "mock", true, c, secs).await;
                rest_gain.push(rest_on / rest_off);
                grpc_gain.push(grpc_on / grpc_off);
                ratio.push((grpc_on / grpc_off) / (rest_on / rest_off));
                last = [rest_off, rest_on, direct, grpc_off, grpc_on];
            }
            let (lo, hi) = (
                ratio.iter().copied().fold(f64::MAX, f64::min),
                ratio.iter().copied().fold(0.0, f64::max),
            );
            println!(
                "| {c} | {:.0} | {:.0} | {:.2}x | {:.0} | {:.0} | {:.0} | {:.2}x | {:.2} ({lo:.2}-{hi:.2}) |",
                last[0],
                last[1],
                median(&mut rest_gain),
                last[2],
                last[3],
                last[4],
                median(&mut grpc_gain),
                median(&mut ratio),
            );
        }
    });
    rt.block_on(async {
        println!("\n## Added p50, unbatched ModelInfer at {rate} requests/s ({secs} s per run, {rounds} rounds)\n");
        println!("| form | direct p50 | through braid p50 | added p50 (median, range) |");
        println!("|---|---|---|---|");
        for (form, grpc_form) in [("gRPC ModelInfer", true), ("REST infer over HTTP/2", false)] {
            let (mut direct, mut proxied, mut added) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..rounds {
                let d = open_loop_p50(instant, "fast", grpc_form, rate, secs).await;
                let p = open_loop_p50(braid.addr, "fast", grpc_form, rate, secs).await;
                direct.push(d);
                proxied.push(p);
                added.push(p - d);
            }
            let (lo, hi) = (
                added.iter().copied().fold(f64::MAX, f64::min),
                added.iter().copied().fold(f64::MIN, f64::max),
            );
            println!(
                "| {form} | {:.3} ms | {:.3} ms | {:.3} ms ({lo:.3} to {hi:.3}) |",
                median(&mut direct),
                median(&mut proxied),
                median(&mut added)
            );
        }
    });
}
