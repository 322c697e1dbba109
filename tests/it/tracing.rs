//! Tracing over real sockets: W3C trace context continued through braid to the
//! backend, SERVER spans exported over OTLP/HTTP and decoded here from the protobuf a
//! collector would receive, samplers, and a dead collector costing requests nothing.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use braid::trace::otlp::{self, any_value};
use braid::trace::{RootSampler, Sampler, TraceConfig};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use prost::Message;
use tokio::net::TcpListener;

use crate::support::*;

const INFER: &str = "/v2/models/sentiment/infer";

/// A fake OTLP/HTTP receiver: every span of every `POST /v1/traces`, decoded.
struct Collector {
    url: String,
    spans: Arc<Mutex<Vec<(otlp::Resource, otlp::Span)>>>,
}

impl Collector {
    async fn start() -> Collector {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1/traces", listener.local_addr().unwrap());
        let spans: Arc<Mutex<Vec<(otlp::Resource, otlp::Span)>>> = Arc::default();
        let s = spans.clone();
        serve_on(
            listener,
            false,
            move |req: Request<hyper::body::Incoming>| {
                let s = s.clone();
                async move {
                    assert_eq!(req.uri().path(), "/v1/traces");
                    assert_eq!(req.headers()["content-type"], "application/x-protobuf");
                    let gzip = req
                        .headers()
                        .get("content-encoding")
                        .is_some_and(|v| v == "gzip");
                    let mut body = req.into_body().collect().await.unwrap().to_bytes();
                    if gzip {
                        // A real collector compresses what it passes on (braid does not).
                        use std::io::Read;
                        let mut plain = Vec::new();
                        flate2::read::GzDecoder::new(&body[..])
                            .read_to_end(&mut plain)
                            .expect("gzip");
                        body = plain.into();
                    }
                    let export =
                        otlp::ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                    for rs in export.resource_spans {
                        let resource = rs.resource.clone().unwrap_or_default();
                        for ss in rs.scope_spans {
                            assert_eq!(ss.scope.as_ref().unwrap().name, "braid");
                            for span in ss.spans {
                                s.lock().unwrap().push((resource.clone(), span));
                            }
                        }
                    }
                    Ok(Response::new(Full::new(Bytes::new())))
                }
            },
        );
        Collector { url, spans }
    }

    /// The spans of one kind seen so far.
    fn of_kind(&self, kind: otlp::span::SpanKind) -> Vec<otlp::Span> {
        let spans = self.spans.lock().unwrap();
        spans
            .iter()
            .filter(|(_, s)| s.kind == kind as i32)
            .map(|(_, s)| s.clone())
            .collect()
    }

    async fn wait_for(&self, n: usize) -> Vec<(otlp::Resource, otlp::Span)> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let got = self.spans.lock().unwrap().clone();
            if got.len() >= n {
                return got;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} of {n} spans",
                got.len()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn trace_config(endpoint: &str, sampler: Sampler) -> TraceConfig {
    TraceConfig {
        endpoint: endpoint.parse().unwrap(),
        sampler,
        resource: vec![("service.name".into(), "braid-test".into())],
        max_queue: 4096,
        max_batch: 64,
        delay: Duration::from_millis(20),
        timeout: Duration::from_secs(2),
    }
}

async fn traced_proxy(dir: &Path, config: &str, trace: TraceConfig) -> TestProxy {
    let path = dir.join("braid.yaml");
    std::fs::write(&path, config).unwrap();
    let mut opts = options(&path);
    opts.trace = Some(trace);
    TestProxy::start_at(&path, opts).await
}

fn attrs(span: &otlp::Span) -> HashMap<String, any_value::Value> {
    span.attributes
        .iter()
        .map(|kv| (kv.key.clone(), kv.value.clone().unwrap().value.unwrap()))
        .collect()
}

fn s(v: &str) -> any_value::Value {
    any_value::Value::StringValue(v.into())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER: &str = "00f067aa0ba902b7";

#[tokio::test]
async fn the_callers_trace_continues_through_braid_to_the_backend() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let collector = Collector::start().await;
    let dir = tempfile::tempdir().unwrap();
    let sampler = Sampler::ParentBased(RootSampler::AlwaysOn);
    let proxy = traced_proxy(
        dir.path(),
        &ab_config(&a.url(), &b.url(), 1.0, 1.0),
        trace_config(&collector.url, sampler),
    )
    .await;
    let c = client();
    let tp = format!("00-{TRACE}-{CALLER}-01");
    let r = post(
        &c,
        &proxy.url(INFER),
        &[
            ("traceparent", &tp),
            ("tracestate", "vendor=x"),
            ("x-user-id", "alice"),
        ],
        "{}",
    )
    .await;
    assert_eq!(r.status, 200);
    let seen = r.json();
    let sent = seen["traceparent"]
        .as_str()
        .expect("the backend got a traceparent");
    let parts: Vec<&str> = sent.split('-').collect();
    assert_eq!(
        (parts[0], parts[1], parts[3]),
        ("00", TRACE, "01"),
        "{sent}"
    );
    assert_ne!(
        parts[2], CALLER,
        "the backend's parent is braid's span, not the caller's"
    );
    assert_eq!(seen["tracestate"], "vendor=x");

    let spans = collector.wait_for(2).await;
    let resource = &spans[0].0;
    let server = collector.of_kind(otlp::span::SpanKind::Server);
    let client_spans = collector.of_kind(otlp::span::SpanKind::Client);
    assert_eq!((server.len(), client_spans.len()), (1, 1));
    let (span, try_span) = (&server[0], &client_spans[0]);
    assert_eq!(hex(&span.trace_id), TRACE);
    assert_eq!(hex(&span.parent_span_id), CALLER);
    // The backend's parent is the try's CLIENT span, itself a child of braid's span.
    assert_eq!(hex(&try_span.span_id), parts[2]);
    assert_eq!(try_span.parent_span_id, span.span_id);
    assert_eq!(hex(&try_span.trace_id), TRACE);
    assert_eq!(try_span.name, "POST");
    let ct = attrs(try_span);
    assert_eq!(
        ct["http.request.resend_count"],
        any_value::Value::IntValue(0)
    );
    assert_eq!(
        ct["http.response.status_code"],
        any_value::Value::IntValue(200)
    );
    assert_eq!(ct["server.address"], s("127.0.0.1"));
    assert_eq!(span.name, "POST /v2/models/{model}/infer");
    assert_eq!(span.trace_state, "vendor=x");
    assert!(span.end_time_unix_nano > span.start_time_unix_nano);
    let at = attrs(span);
    assert_eq!(at["braid.route"], s("sentiment"));
    assert_eq!(at["braid.variant"], s(r.variant()));
    assert_eq!(at["braid.assignment"], s("sticky"));
    assert_eq!(at["http.route"], s("/v2/models/{model}/infer"));
    assert_eq!(at["http.request.method"], s("POST"));
    assert_eq!(
        at["http.response.status_code"],
        any_value::Value::IntValue(200)
    );
    assert_eq!(
        span.status.as_ref().unwrap().code,
        otlp::status::StatusCode::Unset as i32
    );
    let service = &resource.attributes[0];
    assert_eq!(service.key, "service.name");
    assert_eq!(
        service.value.clone().unwrap().value.unwrap(),
        s("braid-test")
    );

    // A 5xx answer makes the server span an error.
    a.set(|f| f.status = 500);
    b.set(|f| f.status = 500);
    post(&c, &proxy.url(INFER), &[("traceparent", &tp)], "{}").await;
    collector.wait_for(4).await;
    let server = collector.of_kind(otlp::span::SpanKind::Server);
    assert_eq!(
        server[1].status.as_ref().unwrap().code,
        otlp::status::StatusCode::Error as i32
    );
    proxy.stop().await;
}

#[tokio::test]
async fn samplers_decide_which_requests_are_recorded_and_the_flag_says_so() {
    let a = Backend::start("a").await;
    let collector = Collector::start().await;
    let dir = tempfile::tempdir().unwrap();
    let sampler = Sampler::ParentBased(RootSampler::TraceIdRatio(0.25));
    let proxy = traced_proxy(
        dir.path(),
        &single_route(&a.url()),
        trace_config(&collector.url, sampler),
    )
    .await;
    let c = client();
    let n = 400;
    let mut sampled = Vec::new();
    let mut trace_ids = std::collections::HashSet::new();
    for _ in 0..n {
        let seen = post(&c, &proxy.url("/anything"), &[], "{}").await.json();
        let tp = seen["traceparent"]
            .as_str()
            .expect("a new trace for every request")
            .to_string();
        let fields: Vec<&str> = tp.split('-').collect();
        trace_ids.insert(fields[1].to_string());
        if fields[3] == "01" {
            sampled.push(fields[1].to_string());
        }
    }
    assert_eq!(trace_ids.len(), n, "every request starts its own trace");
    // Binomial(400, 0.25): mean 100, sd 8.7; four standard deviations either side.
    assert!(
        (65..=135).contains(&sampled.len()),
        "{} of {n} sampled",
        sampled.len()
    );
    collector.wait_for(2 * sampled.len()).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let spans_now = collector.spans.lock().unwrap().len();
    let spans: Vec<((), otlp::Span)> = collector
        .of_kind(otlp::span::SpanKind::Server)
        .into_iter()
        .map(|s| ((), s))
        .collect();
    assert_eq!(
        (spans.len(), spans_now),
        (sampled.len(), 2 * sampled.len()),
        "exactly the sampled requests are recorded, each with its try"
    );
    let exported: std::collections::HashSet<String> =
        spans.iter().map(|(_, s)| hex(&s.trace_id)).collect();
    assert!(sampled.iter().all(|t| exported.contains(t)));
    assert!(
        spans.iter().all(|(_, s)| s.parent_span_id.is_empty()),
        "roots have no parent"
    );

    // A caller that did not sample: braid records nothing and passes the decision on.
    let tp = format!("00-{TRACE}-{CALLER}-00");
    let seen = post(&c, &proxy.url("/anything"), &[("traceparent", &tp)], "{}")
        .await
        .json();
    let fwd = seen["traceparent"].as_str().unwrap();
    assert!(
        fwd.starts_with(&format!("00-{TRACE}-")) && fwd.ends_with("-00"),
        "{fwd}"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(collector.spans.lock().unwrap().len(), spans_now);
    proxy.stop().await;
}

#[tokio::test]
async fn a_dead_collector_costs_requests_nothing() {
    let a = Backend::start("a").await;
    let dead = format!("http://{}/v1/traces", dead_addr().await);
    let dir = tempfile::tempdir().unwrap();
    let proxy = traced_proxy(
        dir.path(),
        &single_route(&a.url()),
        trace_config(&dead, Sampler::AlwaysOn),
    )
    .await;
    let c = client();
    for _ in 0..50 {
        assert_eq!(post(&c, &proxy.url("/x"), &[], "{}").await.status, 200);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while metric(&proxy, "braid_trace_spans_total{result=\"failed\"}").await < 50.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "failed exports not counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy.stop().await;
}

#[tokio::test]
async fn without_tracing_traceparent_passes_through_unchanged() {
    let a = Backend::start("a").await;
    let proxy = TestProxy::start(&single_route(&a.url())).await;
    let tp = format!("00-{TRACE}-{CALLER}-01");
    let seen = post(&client(), &proxy.url("/x"), &[("traceparent", &tp)], "{}")
        .await
        .json();
    assert_eq!(seen["traceparent"], tp.as_str());
    let seen = post(&client(), &proxy.url("/x"), &[], "{}").await.json();
    assert!(seen["traceparent"].is_null());
    proxy.stop().await;
}

/// Each try is a CLIENT span under braid's SERVER span, with its resend count; the
/// backend's parent is the try that reached it.
#[tokio::test]
async fn every_try_is_a_client_span_with_its_resend_count() {
    let a = Backend::start("a").await;
    a.set(|f| {
        f.status = 503;
        f.times = 1;
    });
    let collector = Collector::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "routes:\n  - path_prefix: /\n    variants: [{{ name: only, backend: \"{}\" }}]\n    retry: {{ attempts: 2, backoff_base: 1ms, backoff_max: 1ms }}\n",
        a.url()
    );
    let sampler = Sampler::ParentBased(RootSampler::AlwaysOn);
    let proxy = traced_proxy(dir.path(), &config, trace_config(&collector.url, sampler)).await;
    let tp = format!("00-{TRACE}-{CALLER}-01");
    let r = post(&client(), &proxy.url("/x"), &[("traceparent", &tp)], "{}").await;
    assert_eq!(r.status, 200);
    assert_eq!(a.hits(), 2, "retried once");
    let sent = r.json()["traceparent"].as_str().unwrap().to_string();
    collector.wait_for(3).await;
    let server = collector.of_kind(otlp::span::SpanKind::Server);
    let mut tries = collector.of_kind(otlp::span::SpanKind::Client);
    assert_eq!((server.len(), tries.len()), (1, 2));
    assert_eq!(server[0].name, "POST /");
    let resend = |s: &otlp::Span| match attrs(s)["http.request.resend_count"] {
        any_value::Value::IntValue(n) => n,
        ref other => panic!("{other:?}"),
    };
    tries.sort_by_key(resend);
    for (i, t) in tries.iter().enumerate() {
        assert_eq!(resend(t), i as i64);
        assert_eq!(t.parent_span_id, server[0].span_id);
    }
    let status = |s: &otlp::Span| attrs(s)["http.response.status_code"].clone();
    assert_eq!(status(&tries[0]), any_value::Value::IntValue(503));
    assert_eq!(
        tries[0].status.as_ref().unwrap().code,
        otlp::status::StatusCode::Error as i32
    );
    assert_eq!(status(&tries[1]), any_value::Value::IntValue(200));
    assert_eq!(sent, format!("00-{TRACE}-{}-01", hex(&tries[1].span_id)));
    proxy.stop().await;
}

/// A batched call is one `braid.batch` span in a trace of its own, linked to the span
/// of every recorded request it carries, with the executor call as its CLIENT child
/// (the executor's parent); each request's own trace keeps its SERVER span.
#[tokio::test]
async fn a_batch_span_links_every_request_it_carries() {
    let exec = MockExecutor::start(MockBehaviour {
        fixed: Duration::from_millis(30),
        ..Default::default()
    })
    .await;
    let collector = Collector::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = batching_config(exec.addr, "{ max_batch_size: 8, max_delay: 20ms }");
    let sampler = Sampler::ParentBased(RootSampler::AlwaysOn);
    let proxy = traced_proxy(dir.path(), &config, trace_config(&collector.url, sampler)).await;
    let n = 6;
    let mut tasks = Vec::new();
    for i in 0..n {
        let url = proxy.url("/v2/models/m/infer");
        tasks.push(tokio::spawn(async move {
            let tp = format!("00-{:032x}-{:016x}-01", 0xabc0 + i, 0x10 + i);
            let body = infer_body(&[&format!("row {i}")], "");
            let r = post(&client(), &url, &[("traceparent", &tp)], &body).await;
            assert_eq!(r.status, 200, "{}", r.text());
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let calls = exec.batches().len();
    assert!(
        calls >= 1 && calls < n,
        "requests were merged: {:?}",
        exec.batches()
    );
    // Every request's SERVER span, one batch span and one CLIENT span per call.
    collector.wait_for(n + 2 * calls).await;
    let server = collector.of_kind(otlp::span::SpanKind::Server);
    let batches = collector.of_kind(otlp::span::SpanKind::Internal);
    let tries = collector.of_kind(otlp::span::SpanKind::Client);
    assert_eq!(
        (server.len(), batches.len(), tries.len()),
        (n, calls, calls)
    );
    let mut linked: Vec<(Bytes, Bytes)> = batches
        .iter()
        .flat_map(|b| {
            b.links
                .iter()
                .map(|l| (l.trace_id.clone(), l.span_id.clone()))
        })
        .collect();
    let mut members: Vec<(Bytes, Bytes)> = server
        .iter()
        .map(|s| (s.trace_id.clone(), s.span_id.clone()))
        .collect();
    linked.sort();
    members.sort();
    assert_eq!(
        linked, members,
        "each request's span is linked from its batch"
    );
    for s in &server {
        assert!(matches!(
            attrs(s).get("braid.batch.size"),
            Some(any_value::Value::IntValue(rows)) if *rows >= 1
        ));
    }
    let executor_saw = exec.traceparents.lock().unwrap().clone();
    assert_eq!(executor_saw.len(), calls);
    for b in &batches {
        assert_eq!(b.name, "braid.batch");
        assert!(b.parent_span_id.is_empty(), "a batch starts its own trace");
        let call = tries
            .iter()
            .find(|t| t.parent_span_id == b.span_id)
            .expect("the executor call is the batch span's child");
        assert_eq!(call.trace_id, b.trace_id);
        let want = format!("00-{}-{}-01", hex(&call.trace_id), hex(&call.span_id));
        assert!(
            executor_saw.contains(&want),
            "{want} not in {executor_saw:?}"
        );
    }
    proxy.stop().await;
}

/// braid's executor continues the batch's trace: its SERVER span hangs under the batch
/// call, with a span per step of the inference (queue, tokenize, forward, pool).
#[tokio::test]
async fn the_executor_continues_the_batch_trace_with_its_steps() {
    let collector = Collector::start().await;
    let sampler = Sampler::ParentBased(RootSampler::AlwaysOn);
    let exec = TestExecutor::start_traced(
        |dir| vec![tiny_spec(dir, "m", &[])],
        Some(trace_config(&collector.url, sampler)),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = batching_config(exec.addr, "{ max_batch_size: 8 }");
    let proxy = traced_proxy(dir.path(), &config, trace_config(&collector.url, sampler)).await;
    let tp = format!("00-{TRACE}-{CALLER}-01");
    let body = infer_body(&["a short text"], "");
    let r = post(
        &client(),
        &proxy.url("/v2/models/m/infer"),
        &[("traceparent", &tp)],
        &body,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    // braid: SERVER, braid.batch, its CLIENT call; executor: SERVER + four steps.
    collector.wait_for(7).await;
    let batch = &collector
        .of_kind(otlp::span::SpanKind::Internal)
        .into_iter()
        .find(|s| s.name == "braid.batch")
        .expect("a batch span");
    let call = collector
        .of_kind(otlp::span::SpanKind::Client)
        .into_iter()
        .find(|s| s.parent_span_id == batch.span_id)
        .expect("the batch's executor call");
    let exec_server = collector
        .of_kind(otlp::span::SpanKind::Server)
        .into_iter()
        .find(|s| s.parent_span_id == call.span_id)
        .expect("the executor's span continues the batch call");
    assert_eq!(exec_server.trace_id, batch.trace_id);
    assert_eq!(exec_server.name, "POST /v2/models/{model}/infer");
    let mut steps: Vec<String> = collector
        .of_kind(otlp::span::SpanKind::Internal)
        .into_iter()
        .filter(|s| s.parent_span_id == exec_server.span_id)
        .map(|s| {
            assert!(s.start_time_unix_nano >= exec_server.start_time_unix_nano - 1_000_000);
            assert!(s.end_time_unix_nano <= exec_server.end_time_unix_nano + 1_000_000);
            s.name
        })
        .collect();
    steps.sort();
    assert_eq!(steps, ["forward", "pool", "queue", "tokenize"]);
    proxy.stop().await;
}

/// Kills the collector process when the test ends, however it ends.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A real collector (rotel, pinned in tests/python/requirements.txt) accepts braid's
/// OTLP/HTTP export and passes the spans on, re-encoded by its own OTLP code, to the
/// fake receiver: the trace arrives whole.
#[tokio::test]
async fn a_real_collector_takes_braids_spans() {
    let python = python_clients();
    let out = std::process::Command::new(&python)
        .args([
            "-c",
            "import os, rotel; print(os.path.dirname(rotel.__file__))",
        ])
        .output()
        .unwrap();
    let agent = Path::new(String::from_utf8_lossy(&out.stdout).trim()).join("rotel-agent");
    let collector = Collector::start().await;
    let upstream = collector.url.trim_end_matches("/v1/traces").to_string();
    let (http, grpc) = (free_port(), free_port());
    let _rotel = Child(
        std::process::Command::new(&agent)
            .args([
                "start",
                "--otlp-http-endpoint",
                &format!("127.0.0.1:{http}"),
            ])
            .args(["--otlp-grpc-endpoint", &format!("127.0.0.1:{grpc}")])
            .args(["--exporter", "otlp", "--otlp-exporter-endpoint", &upstream])
            .args(["--otlp-exporter-protocol", "http"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", agent.display())),
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", http))
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "rotel never listened"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let a = Backend::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let endpoint = format!("http://127.0.0.1:{http}/v1/traces");
    let sampler = Sampler::ParentBased(RootSampler::AlwaysOn);
    let proxy = traced_proxy(
        dir.path(),
        &single_route(&a.url()),
        trace_config(&endpoint, sampler),
    )
    .await;
    let tp = format!("00-{TRACE}-{CALLER}-01");
    let r = post(&client(), &proxy.url("/x"), &[("traceparent", &tp)], "{}").await;
    assert_eq!(r.status, 200);
    let spans = collector.wait_for(2).await;
    assert!(spans.iter().all(|(_, s)| hex(&s.trace_id) == TRACE));
    let server = collector.of_kind(otlp::span::SpanKind::Server);
    assert_eq!(hex(&server[0].parent_span_id), CALLER);
    assert_eq!(
        metric(&proxy, "braid_trace_spans_total{result=\"failed\"}").await,
        0.0
    );
    proxy.stop().await;
}

/// gRPC metadata are HTTP/2 headers: a ModelInfer call's `traceparent` is continued
/// the same way, and its span is named by the RPC conventions.
#[tokio::test]
async fn a_grpc_call_continues_its_trace_from_metadata() {
    use crate::support::grpc::{GrpcBackend, texts_request, unary};
    let backend = GrpcBackend::start("a").await;
    let collector = Collector::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "routes:\n  - model: m\n    variants: [{{ name: a, backend: h2c://{} }}]\n",
        backend.addr
    );
    let sampler = Sampler::ParentBased(RootSampler::AlwaysOn);
    let proxy = traced_proxy(dir.path(), &config, trace_config(&collector.url, sampler)).await;
    let tp = format!("00-{TRACE}-{CALLER}-01");
    let path = "/inference.GRPCInferenceService/ModelInfer";
    let r = unary(
        proxy.addr,
        path,
        &[("traceparent", &tp)],
        texts_request("m", "1", &["hi"], true),
    )
    .await;
    assert_eq!(r.status(), 0, "{}", r.message());
    collector.wait_for(2).await;
    let server = collector.of_kind(otlp::span::SpanKind::Server);
    assert_eq!(server[0].name, "inference.GRPCInferenceService/ModelInfer");
    assert_eq!(hex(&server[0].parent_span_id), CALLER);
    let at = attrs(&server[0]);
    assert_eq!(at["rpc.system"], s("grpc"));
    assert_eq!(at["rpc.method"], s("ModelInfer"));
    let call = &collector.of_kind(otlp::span::SpanKind::Client)[0];
    let seen = backend.seen();
    let got = seen[0].headers["traceparent"].to_str().unwrap();
    assert_eq!(got, format!("00-{TRACE}-{}-01", hex(&call.span_id)));
    proxy.stop().await;
}

/// The official clients in their default modes (tritonclient HTTP with binary tensors,
/// tritonclient gRPC with raw contents, KServe's REST client) through a batched A/B route with tracing, the
/// payload log and a guardrail on: every client gets its own rows, every request has
/// its SERVER span and its payload record, batches link their requests, and the
/// experiment counts them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_clients_are_traced_logged_and_counted() {
    let ex = TestExecutor::start(|dir| vec![tiny_spec(dir, "tiny", &[])]).await;
    let collector = Collector::start().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("payloads.jsonl");
    let config = format!(
        r#"executor: http://{ex}
routes:
  - model: m
    variants:
      - {{ name: a, weight: 1, backend: local, target_model: tiny }}
      - {{ name: b, weight: 1, backend: local, target_model: tiny }}
    batching: {{ max_batch_size: 64, max_delay: 50ms }}
    guardrail: {{ control: a, warmup: 0s }}
    log: {{ fraction: 1, max_bytes: 4096, sink: "{log}" }}
  - path_prefix: /inference.GRPCInferenceService/
    variants: [{{ name: server, backend: "h2c://{ex}" }}]
"#,
        ex = ex.addr,
        log = log.display()
    );
    let sampler = Sampler::ParentBased(RootSampler::AlwaysOn);
    let proxy = traced_proxy(dir.path(), &config, trace_config(&collector.url, sampler)).await;
    let n = 9;
    let http = run_python_client(
        "triton_http_clients.py",
        vec![
            proxy.addr.to_string(),
            "m".into(),
            ex.addr.to_string(),
            "tiny".into(),
            n.to_string(),
        ],
    )
    .await;
    let grpc = run_python_client(
        "triton_grpc_clients.py",
        vec![
            proxy.addr.to_string(),
            "m".into(),
            ex.addr.to_string(),
            "tiny".into(),
            "embedding".into(),
            n.to_string(),
        ],
    )
    .await;
    let kserve = run_python_client(
        "kserve_rest_clients.py",
        vec![
            format!("http://{}", proxy.addr),
            "m".into(),
            format!("http://{}", ex.addr),
            "tiny".into(),
            "embedding".into(),
            n.to_string(),
        ],
    )
    .await;
    for report in [&http, &grpc, &kserve] {
        assert_eq!(report["errors"], serde_json::json!([]), "{report}");
        assert_eq!(report["answered"], n, "{report}");
        assert_eq!(report["wrong_rows"], 0, "{report}");
    }
    // Spans: a SERVER span for every inference, by its protocol's name.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let server = loop {
        let server = collector.of_kind(otlp::span::SpanKind::Server);
        let named = |name: &str| server.iter().filter(|s| s.name == name).count();
        if named("POST /v2/models/{model}/infer") >= 2 * n
            && named("inference.GRPCInferenceService/ModelInfer") >= n
        {
            break server;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} server spans",
            server.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Batches link the requests they carried (those of both protocols merge).
    let linked: std::collections::HashSet<Bytes> = collector
        .of_kind(otlp::span::SpanKind::Internal)
        .iter()
        .filter(|s| s.name == "braid.batch")
        .flat_map(|b| b.links.iter().map(|l| l.span_id.clone()))
        .collect();
    let inferences: Vec<&otlp::Span> = server
        .iter()
        .filter(|s| s.name.ends_with("/infer") || s.name.ends_with("/ModelInfer"))
        .filter(|s| attrs(s)["braid.route"] == any_value::Value::StringValue("m".into()))
        .collect();
    assert!(inferences.len() >= 3 * n);
    let unlinked: Vec<(&str, HashMap<String, any_value::Value>)> = inferences
        .iter()
        .filter(|s| !linked.contains(&s.span_id))
        .map(|s| (s.name.as_str(), attrs(s)))
        .collect();
    assert!(unlinked.is_empty(), "not linked from a batch: {unlinked:?}");
    // The payload log has a record per inference, with both bodies.
    let written = "braid_payload_log_records_total{route=\"m\",result=\"written\"}";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while metric(&proxy, written).await < (3 * n) as f64 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "payload records missing"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let records: Vec<serde_json::Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for r in &records {
        assert!(r["variant"] == "a" || r["variant"] == "b", "{r}");
        assert_eq!(r["status"], 200, "{r}");
        assert!(
            r["request"]["payload"]["bytes"].as_u64().unwrap() > 0,
            "{r}"
        );
        assert!(
            r["response"]["payload"]["bytes"].as_u64().unwrap() > 0,
            "{r}"
        );
    }
    // The experiment counted every request its weights assigned.
    let e = get(&client(), &proxy.admin_url("/experiments"), &[])
        .await
        .json();
    let route = &e["routes"][0];
    let served: u64 = route["variants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["requests"].as_u64().unwrap())
        .sum();
    assert!(served >= 3 * n as u64, "{e}");
    assert_eq!(
        route["variants"][1]["guardrail"]["state"], "watching",
        "{e}"
    );
    proxy.stop().await;
}
