//! The request path in-process, with no socket: `Proxy::handle` called directly, the
//! executor behind the fake, on tokio's paused clock.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};

use super::Proxy;
use crate::batch::fake::FakeExecutor;
use crate::config::Store;
use crate::error::Body;
use crate::metrics::Metrics;
use crate::server::ConnInfo;
use crate::upstream::{CONNECT_TIMEOUT, Upstreams};

/// A proxy over `config`, its batchers calling `exec`.
fn proxy(config: &str, exec: Arc<FakeExecutor>) -> Proxy {
    let metrics = Arc::new(Metrics::new());
    let upstreams = Upstreams::new(CONNECT_TIMEOUT);
    let store = Arc::new(Store::new(metrics.clone(), exec, upstreams.clone()));
    store.apply(config, "test", "file").expect("valid config");
    Proxy {
        store,
        metrics,
        access_log: None,
        tracer: None,
        upstreams,
        max_body_bytes: 1 << 20,
        max_inflight: 100,
        body_idle_timeout: std::time::Duration::from_secs(30),
        buffers: crate::server::ByteBudget::unshared(1 << 24),
    }
}

const AB: &str = r#"
executor: http://127.0.0.1:1
routes:
  - model: sentiment
    variants:
      - { name: control, weight: 1, backend: local, target_model: sentiment-a }
      - { name: candidate, weight: 0, backend: local, target_model: sentiment-b }
    batching: { max_batch_size: 8, max_delay: 2ms }
"#;

struct Answer {
    status: StatusCode,
    variant: String,
    fallback_from: Option<String>,
    json: Value,
}

async fn predict(p: &Proxy, model: &str, instance: &str, headers: &[(&str, &str)]) -> Answer {
    let mut req = Request::post(format!("/v1/models/{model}:predict"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let body = json!({ "instances": [instance] }).to_string();
    let conn = ConnInfo::new(
        SocketAddr::from(([127, 0, 0, 1], 40000)),
        Default::default(),
    );
    answer(
        p.handle(req.body(Full::new(Bytes::from(body))).unwrap(), &conn)
            .await,
    )
    .await
}

async fn answer(resp: Response<Body>) -> Answer {
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    };
    let (status, variant, fallback_from) = (
        resp.status(),
        header("x-braid-variant").unwrap_or_default(),
        header("x-braid-fallback-from"),
    );
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        variant,
        fallback_from,
        json: serde_json::from_slice(&bytes).expect("every answer is JSON"),
    }
}

#[tokio::test(start_paused = true)]
async fn routes_by_model_and_rewrites_to_the_variants_target() {
    let exec = Arc::new(FakeExecutor::default());
    let p = proxy(AB, exec.clone());
    let a = predict(&p, "sentiment", "hi", &[]).await;
    assert_eq!((a.status, a.variant.as_str()), (StatusCode::OK, "control"));
    assert_eq!(a.json, json!({ "predictions": ["hi"] }));
    let b = predict(&p, "sentiment", "hi", &[("x-braid-variant", "candidate")]).await;
    assert_eq!(b.variant, "candidate", "the override header pins a variant");
    assert_eq!(
        exec.paths(),
        [
            "/v1/models/sentiment-a:predict",
            "/v1/models/sentiment-b:predict"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn unknown_routes_and_variants_are_json_errors_that_reach_nothing() {
    let exec = Arc::new(FakeExecutor::default());
    let p = proxy(AB, exec.clone());
    let a = predict(&p, "nope", "hi", &[]).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert!(
        a.json["error"].as_str().unwrap().contains("no route"),
        "{}",
        a.json
    );
    let b = predict(&p, "sentiment", "hi", &[("x-braid-variant", "ghost")]).await;
    assert_eq!(b.status, StatusCode::BAD_REQUEST);
    assert!(
        b.json["error"]
            .as_str()
            .unwrap()
            .contains("control, candidate")
    );
    assert!(exec.batches().is_empty());
}

#[tokio::test(start_paused = true)]
async fn concurrent_requests_are_coalesced_and_a_bad_one_fails_alone() {
    let exec = Arc::new(FakeExecutor::default());
    let p = proxy(AB, exec.clone());
    let (a, bad, c) = tokio::join!(
        predict(&p, "sentiment", "a", &[]),
        predict(&p, "sentiment", "bad", &[]),
        predict(&p, "sentiment", "c", &[]),
    );
    assert_eq!(a.json, json!({ "predictions": ["a"] }));
    assert_eq!(c.json, json!({ "predictions": ["c"] }));
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        bad.json,
        json!({ "error": "bad instance" }),
        "the executor's own answer"
    );
    assert_eq!(exec.batches()[0], 3, "one call carried all three");
}

#[tokio::test(start_paused = true)]
async fn a_failing_variant_is_served_by_the_fallback_when_repeating_is_safe() {
    let config = r#"
executor: http://127.0.0.1:1
routes:
  - model: sentiment
    variants:
      - { name: new, weight: 1, backend: local, target_model: broken }
      - { name: stable, weight: 0, backend: local, target_model: sentiment-a }
    fallback: stable
    retry: { idempotent: true }
    batching: { max_batch_size: 8 }
"#;
    let exec = Arc::new(FakeExecutor::default());
    let p = proxy(config, exec.clone());
    let a = predict(&p, "sentiment", "hi", &[]).await;
    assert_eq!((a.status, a.variant.as_str()), (StatusCode::OK, "stable"));
    assert_eq!(a.fallback_from.as_deref(), Some("new"));

    // Not marked idempotent: a batch that may have run is not sent anywhere else.
    let p = proxy(&config.replace("retry: { idempotent: true }", ""), exec);
    let a = predict(&p, "sentiment", "hi", &[]).await;
    assert_eq!(
        (a.status, a.variant.as_str()),
        (StatusCode::INTERNAL_SERVER_ERROR, "new")
    );
    assert_eq!(a.fallback_from, None);
}

#[tokio::test(start_paused = true)]
async fn a_removed_routes_batcher_answers_what_it_holds_then_stops() {
    let (exec, gate) = FakeExecutor::gated();
    let p = Arc::new(proxy(AB, exec.clone()));
    assert_eq!(p.store.batchers(), 2);
    let stopped = {
        let active = p.store.load().unwrap();
        active.live[0].variants[0]
            .batcher
            .as_ref()
            .unwrap()
            .stopped()
    };
    let held = tokio::spawn({
        let p = p.clone();
        async move { predict(&p, "sentiment", "held", &[]).await }
    });
    exec.wait_calls(1).await;

    let other = AB.replace("model: sentiment", "model: other");
    p.store.apply(&other, "test", "file").unwrap();
    assert_eq!(
        p.store.batchers(),
        2,
        "the renamed route has its own batchers"
    );
    tokio::pin!(stopped);
    let wait = tokio::time::timeout(std::time::Duration::from_secs(60), &mut stopped);
    assert!(
        wait.await.is_err(),
        "a batcher holding a request keeps running"
    );

    gate.add_permits(1);
    let a = held.await.unwrap();
    assert_eq!(
        a.json,
        json!({ "predictions": ["held"] }),
        "nothing queued is lost"
    );
    stopped.await;
    let gone = predict(&p, "sentiment", "hi", &[]).await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND);
}

const CLASSES: &str = r#"
executor: http://127.0.0.1:1
routes:
  - model: sentiment
    variants: [{ name: local, backend: local }]
    batching:
      max_batch_size: 8
      max_delay: 2ms
      priorities:
        - { name: interactive, queue_timeout: 50ms }
        - { name: bulk, sheddable: true }
      default_priority: bulk
"#;

#[tokio::test(start_paused = true)]
async fn a_priority_class_is_picked_by_header_and_an_unknown_one_is_a_400() {
    let p = proxy(CLASSES, Arc::new(FakeExecutor::default()));
    let a = predict(
        &p,
        "sentiment",
        "hi",
        &[("x-braid-priority", "interactive")],
    )
    .await;
    assert_eq!(
        (a.status, a.json["predictions"][0].as_str()),
        (StatusCode::OK, Some("hi"))
    );
    let b = predict(&p, "sentiment", "hi", &[]).await;
    assert_eq!(b.status, StatusCode::OK);
    let text = p.metrics.encode();
    for class in ["interactive", "bulk"] {
        let series = format!(
            "braid_batch_queue_seconds_count{{route=\"sentiment\",variant=\"local\",priority=\"{class}\"}} 1"
        );
        assert!(text.contains(&series), "{series} missing:\n{text}");
    }
    let c = predict(&p, "sentiment", "hi", &[("x-braid-priority", "urgent")]).await;
    assert_eq!(c.status, StatusCode::BAD_REQUEST);
    let msg = c.json["error"].as_str().unwrap();
    assert!(
        msg.contains("\"urgent\"") && msg.contains("interactive, bulk"),
        "{msg}"
    );
}

/// A route that reads every header braid interprets: sticky and override keys,
/// priorities, deadlines; the request also carries trace context and Triton's binary
/// header length.
const EVERY_HEADER: &str = r#"
executor: http://127.0.0.1:1
routes:
  - model: sentiment
    variants:
      - { name: control, weight: 1, backend: local, target_model: sentiment-a }
      - { name: candidate, weight: 1, backend: local, target_model: sentiment-b }
    sticky_header: x-user-id
    timeout: 5s
    batching:
      max_batch_size: 8
      max_delay: 2ms
      priorities: [{ name: high }, { name: low }]
      default_priority: low
"#;

/// The headers braid reads on the request path.
const READ_HEADERS: [&str; 10] = [
    "x-braid-timeout",
    "grpc-timeout",
    "x-braid-priority",
    "x-braid-variant",
    "x-user-id",
    "traceparent",
    "tracestate",
    "inference-header-content-length",
    "content-length",
    "content-type",
];

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

    /// Any value of any header braid reads, on OIP v2 and KServe v1 requests: a
    /// well-formed answer (never a panic, never a 500), JSON, and nothing left in flight.
    #[test]
    fn no_header_value_panics_or_leaks(
        which in 0..READ_HEADERS.len(),
        value in proptest::collection::vec(
            proptest::prop_oneof![0x20u8..0x7f, 0x80u8..=0xff, proptest::strategy::Just(b'\t')],
            0..40,
        ),
        v1 in proptest::bool::ANY,
        digits in "[0-9]{1,25}(s|m|h|ms|us|ns|H|M|S|u|n|x)?",
    ) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        let name = READ_HEADERS[which];
        // Half the cases are numbers with units, where overflows live.
        let value = if value.len() % 2 == 0 { digits.into_bytes() } else { value };
        let value = http::HeaderValue::from_bytes(&value).unwrap();
        let (status, inflight) = rt.block_on(async {
            let p = proxy(EVERY_HEADER, Arc::new(FakeExecutor::default()));
            let (path, body) = if v1 {
                ("/v1/models/sentiment:predict", json!({ "instances": ["hi"] }))
            } else {
                (
                    "/v2/models/sentiment/infer",
                    json!({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["hi"]}]}),
                )
            };
            let req = Request::post(path)
                .header(name, value)
                .body(Full::new(Bytes::from(body.to_string())))
                .unwrap();
            let conn = ConnInfo::new(SocketAddr::from(([127, 0, 0, 1], 40000)), Default::default());
            let a = answer(p.handle(req, &conn).await).await;
            (a.status, p.metrics.inflight().get())
        });
        proptest::prop_assert!(status != StatusCode::INTERNAL_SERVER_ERROR, "{name}: {status}");
        // The fake executor answers KServe v1 only: a v2 batch it answers is a 502
        // (its reply has no outputs to split), which still proves the path ran whole.
        let fake_v2 = !v1 && status == StatusCode::BAD_GATEWAY;
        // A deadline of zero ("0s", "00000m") has passed before the answer: 504.
        let passed = status == StatusCode::GATEWAY_TIMEOUT
            && matches!(name, "x-braid-timeout" | "grpc-timeout");
        proptest::prop_assert!(
            status.is_success()
                || status.is_client_error()
                || status == StatusCode::SERVICE_UNAVAILABLE
                || fake_v2
                || passed,
            "{name}: {status}"
        );
        proptest::prop_assert_eq!(inflight, 0);
    }
}

#[tokio::test(start_paused = true)]
async fn a_dropped_request_future_gives_back_its_slot_and_bytes() {
    let exec = Arc::new(FakeExecutor::default());
    let p = proxy(AB, exec.clone());
    // A body that never ends: the request waits on it until its future is dropped.
    use futures_util::StreamExt;
    let first = hyper::body::Frame::data(Bytes::from_static(b"{\"instances\":"));
    let frames = futures_util::stream::iter([Ok::<_, std::convert::Infallible>(first)])
        .chain(futures_util::stream::pending());
    let body = http_body_util::StreamBody::new(frames);
    let req = Request::post("/v1/models/sentiment:predict")
        .header("content-length", "100")
        .body(body)
        .unwrap();
    let conn = ConnInfo::new(
        SocketAddr::from(([127, 0, 0, 1], 40000)),
        Default::default(),
    );
    {
        let handling = p.handle(req, &conn);
        tokio::pin!(handling);
        let poll = tokio::time::timeout(std::time::Duration::from_millis(100), &mut handling).await;
        assert!(poll.is_err(), "answered a body that has not arrived");
        assert_eq!(p.metrics.inflight().get(), 1);
        assert_eq!(p.buffers.in_use(), 100);
    } // hyper drops the future like this when the client leaves
    assert_eq!(p.metrics.inflight().get(), 0);
    assert_eq!(p.buffers.in_use(), 0);
}
