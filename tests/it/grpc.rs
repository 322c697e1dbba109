//! gRPC through the data port: any service streamed through on a path-prefix route,
//! the inference service's model calls routed by the model in their message, and
//! braid's own errors as gRPC statuses. The official `tritonclient[grpc]` in front of
//! KServe's `ModelServer` is in `grpc_clients`.

use std::time::Duration;

use bytes::Bytes;

use crate::support::grpc::{
    Call, GrpcBackend, decoded, fp32_output, frame, json_fp32_output, name_of, named,
    texts_request, unary,
};
use crate::support::*;

use crate::support::grpc::INFER;

/// Model `m` split between backend `a` (h2c://) and `b` (http://, which gRPC reaches
/// over HTTP/2 anyway), sticky on `x-user`; paths under `prefix` to `a`.
fn split(a: &GrpcBackend, b: &GrpcBackend, prefix: &str) -> String {
    format!(
        "routes:
  - model: m
    variants:
      - {{ name: a, weight: 1, backend: h2c://{}, target_model: m-a }}
      - {{ name: b, weight: 1, backend: http://{}, target_model: m-b }}
    sticky_header: x-user
  - path_prefix: {prefix}
    variants: [{{ name: all, backend: h2c://{} }}]
",
        a.addr, b.addr, a.addr
    )
}

/// A bidirectional stream on a prefix route: each message comes back before the next
/// is sent, then the backend's trailers; `te: trailers` and the deadline reach it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bidirectional_stream_flows_both_ways_with_its_trailers() {
    let (a, b) = (GrpcBackend::start("a").await, GrpcBackend::start("b").await);
    let proxy = TestProxy::start(&split(&a, &b, "/")).await;
    let mut call = Call::open(proxy.addr, "/echo.Echo/Chat", &[("grpc-timeout", "5S")]).await;
    call.send(frame(b"one"), false);
    let headers = call
        .headers()
        .await
        .expect("headers before the request ends");
    assert_eq!(headers["x-backend"], "a");
    assert_eq!(headers["x-braid-variant"], "all");
    assert_eq!(call.next().await.unwrap(), frame(b"one"), "echoed at once");
    call.send(frame(b"two"), false);
    assert_eq!(call.next().await.unwrap(), frame(b"two"));
    call.send(frame(b"three"), true);
    let (rest, trailers) = call.finish().await;
    assert_eq!(rest, frame(b"three"));
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["x-trailer"], "done");
    let seen = a.seen();
    let seen = seen.iter().find(|s| s.path == "/echo.Echo/Chat").unwrap();
    assert_eq!(seen.headers["te"], "trailers");
    let left = seen.headers["grpc-timeout"].to_str().unwrap();
    let left = braid::grpc::parse_timeout(left).expect("a valid grpc-timeout");
    assert!(
        left <= Duration::from_secs(5) && left > Duration::from_secs(4),
        "{left:?}"
    );
    proxy.stop().await;
}

/// Triton's ModelStreamInfer: the stream's variant is chosen once, by the model its
/// first message names; every message naming the route's model reaches the backend
/// naming the variant's target, however the messages are cut into data frames.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_stream_is_routed_once_by_its_first_message() {
    let (a, b) = (GrpcBackend::start("a").await, GrpcBackend::start("b").await);
    let proxy = TestProxy::start(&split(&a, &b, "/")).await;
    for user in ["user-1", "user-2", "user-3", "user-4"] {
        let mut call = Call::open(
            proxy.addr,
            "/inference.GRPCInferenceService/ModelStreamInfer",
            &[("x-user", user)],
        )
        .await;
        call.send(frame(&named("m", b"\x1a\x011")), false);
        let v = call.headers().await.expect("headers").clone();
        let v = v["x-braid-variant"].to_str().unwrap().to_string();
        let first = call.next().await.unwrap();
        assert_eq!(name_of(&first[5..]), format!("m-{v}"));
        // The second message in two pieces, cut inside its prefix.
        let second = frame(&named("m", b"\x1a\x012"));
        call.send(second.slice(..3), false);
        call.send(second.slice(3..), false);
        let echoed = call.next().await.unwrap();
        assert_eq!(name_of(&echoed[5..]), format!("m-{v}"), "{user}");
        assert_eq!(&echoed[echoed.len() - 3..], b"\x1a\x012");
        call.send(Bytes::new(), true);
        let (_, trailers) = call.finish().await;
        assert_eq!(trailers["grpc-status"], "0");
        let (ra, rb) = (a.seen().len(), b.seen().len());
        assert_eq!(ra + rb, 1, "one stream, one variant");
        let again = unary(
            proxy.addr,
            INFER,
            &[("x-user", user)],
            frame(&named("m", b"")),
        )
        .await;
        assert_eq!(again.variant(), v, "the same sticky choice as a unary call");
        a.clear();
        b.clear();
    }
    proxy.stop().await;
}

/// ModelInfer and ModelReady are routed by field 1 of their message: weights, the
/// sticky key and the override header from gRPC metadata, field 1 rewritten to the
/// variant's target model and every other byte as sent, `x-braid-variant` in the
/// answer's headers. Calls that name no model go by prefix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_calls_are_routed_by_the_model_in_their_message() {
    let (a, b) = (GrpcBackend::start("a").await, GrpcBackend::start("b").await);
    let proxy = TestProxy::start(&split(&a, &b, "/")).await;
    let rest = b"\x1a\x02id\x2a\x03\x0a\x01x"; // id = "id", inputs = [{name: "x"}]
    let mut variants = Vec::new();
    for user in 0..24 {
        let user = format!("user-{user}");
        let mut first = None;
        for _ in 0..2 {
            let r = unary(
                proxy.addr,
                INFER,
                &[("x-user", &user)],
                frame(&named("m", rest)),
            )
            .await;
            assert_eq!(r.status(), 0, "{}", r.message());
            let v = r.variant().to_string();
            assert_eq!(r.headers["x-backend"], v.as_str(), "served where it says");
            assert_eq!(name_of(r.reply()), format!("m-{v}"), "field 1 rewritten");
            assert_eq!(&r.reply()[2 + 3..], rest, "every other byte as sent");
            assert!(first.get_or_insert(v.clone()) == &v, "{user} is sticky");
        }
        variants.push(first.unwrap());
    }
    let on_b = variants.iter().filter(|v| *v == "b").count();
    assert!((4..=20).contains(&on_b), "{on_b} of 24 users on b");

    let pinned = unary(
        proxy.addr,
        "/inference.GRPCInferenceService/ModelReady",
        &[("x-user", "user-0"), ("x-braid-variant", "b")],
        frame(&named("m", b"")),
    )
    .await;
    assert_eq!((pinned.status(), pinned.variant()), (0, "b"));
    assert_eq!(name_of(pinned.reply()), "m-b");

    let live = unary(
        proxy.addr,
        "/inference.GRPCInferenceService/ServerLive",
        &[],
        frame(b""),
    )
    .await;
    assert_eq!((live.status(), live.variant()), (0, "all"));
    let b_seen = b.seen();
    assert!(
        !b_seen.is_empty(),
        "b was reached over HTTP/2 though it says http://"
    );
    assert!(b_seen.iter().all(|s| s.headers["te"] == "trailers"));
    proxy.stop().await;
}

/// braid's own errors reach a gRPC caller as Trailers-Only answers (HTTP 200,
/// `grpc-status`, `grpc-message`), and the next call is served as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_grpc_statuses_and_nothing_else_is_disturbed() {
    let (a, b) = (GrpcBackend::start("a").await, GrpcBackend::start("b").await);
    let dead = dead_addr().await;
    let config = format!(
        "{}  - model: gone
    variants: [{{ name: dead, backend: h2c://{dead} }}]
",
        split(&a, &b, "/echo.")
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("braid.yaml");
    std::fs::write(&path, config).unwrap();
    let mut opts = options(&path);
    opts.limits.max_body_bytes = 64 * 1024;
    let proxy = TestProxy::start_at(&path, opts).await;

    let ok = || frame(&named("m", b"\x1a\x02id"));
    // What, metadata, body, the status, and words its message must hold.
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, Bytes, u8, &'a str);
    let cases: Vec<Case> = vec![
        ("malformed", vec![], frame(&[0x0b, 1]), 3, "wire type 3"),
        (
            "no prefix",
            vec![],
            Bytes::from_static(b"\0\0"),
            3,
            "5-byte prefix",
        ),
        (
            "unknown model",
            vec![],
            frame(&named("nope", b"")),
            5,
            "models: gone, m",
        ),
        (
            "oversized",
            vec![],
            frame(&named("m", &vec![b'x'; 100_000])),
            8,
            "larger than the 65536-byte limit",
        ),
        (
            "unknown variant",
            vec![("x-braid-variant", "zzz")],
            ok(),
            3,
            "valid variants: a, b",
        ),
        (
            "bad timeout",
            vec![("grpc-timeout", "soon")],
            ok(),
            3,
            "grpc-timeout",
        ),
        (
            "deadline",
            vec![("grpc-timeout", "100m"), ("x-test-delay-ms", "3000")],
            ok(),
            4,
            "deadline",
        ),
        ("reset", vec![("x-test-reset", "1")], ok(), 13, "backend"),
        (
            "unreachable",
            vec![],
            frame(&named("gone", b"")),
            14,
            "unreachable",
        ),
    ];
    for (what, metadata, body, code, needle) in cases {
        let r = unary(proxy.addr, INFER, &metadata, body).await;
        assert_eq!(r.headers["content-type"], "application/grpc", "{what}");
        assert_eq!(r.status(), code, "{what}: {}", r.message());
        let message = percent_decoded(&r.message());
        assert!(message.contains(needle), "{what}: {message}");
        assert!(r.body.is_empty(), "{what}: Trailers-Only");
        let next = unary(proxy.addr, INFER, &[], ok()).await;
        assert_eq!(next.status(), 0, "after {what}: {}", next.message());
    }
    // A model stream is refused the same ways before it starts.
    let stream = "/inference.GRPCInferenceService/ModelStreamInfer";
    let unknown = unary(proxy.addr, stream, &[], frame(&named("nope", b""))).await;
    assert_eq!(unknown.status(), 5, "{}", unknown.message());
    let big = frame(&named("m", &vec![b'x'; 100_000]));
    let oversized = unary(proxy.addr, stream, &[], big).await;
    assert_eq!(oversized.status(), 8, "{}", oversized.message());
    let cut = unary(proxy.addr, stream, &[], frame(&named("m", b"")).slice(..4)).await;
    assert_eq!(cut.status(), 3, "{}", cut.message());
    assert_eq!(
        metric(
            &proxy,
            "braid_requests_total{route=\"m\",variant=\"a\",code=\"504\"}"
        )
        .await
            + metric(
                &proxy,
                "braid_requests_total{route=\"m\",variant=\"b\",code=\"504\"}"
            )
            .await,
        1.0,
        "a gRPC error is counted as the HTTP status a REST caller would get"
    );
    let grpc = |variant: &str, status: &str| {
        format!(
            "braid_grpc_requests_total{{route=\"m\",variant=\"{variant}\",grpc_status=\"{status}\"}}"
        )
    };
    let deadline = metric(&proxy, &grpc("a", "DEADLINE_EXCEEDED")).await
        + metric(&proxy, &grpc("b", "DEADLINE_EXCEEDED")).await;
    assert_eq!(deadline, 1.0, "gRPC statuses are counted by name");
    let ok = metric(&proxy, &grpc("a", "OK")).await + metric(&proxy, &grpc("b", "OK")).await;
    assert_eq!(ok, 9.0, "the backend's own status, read from its trailers");
    proxy.stop().await;
}

fn percent_decoded(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() + 1 {
            out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

const SERVICE: &str = "/inference.GRPCInferenceService/";

/// braid's executor answers `inference.GRPCInferenceService` on its REST port (h2c,
/// told apart by content-type): health, metadata, and ModelInfer with raw or typed
/// contents giving what the REST path gives; errors are statuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn braids_executor_serves_the_grpc_service_on_its_rest_port() {
    use braid::grpc::pb;
    use prost::Message;
    let ex = TestExecutor::start(|dir| vec![tiny_spec(dir, "tiny", &[])]).await;
    let call = |method: &str, msg: Vec<u8>| {
        let path = format!("{SERVICE}{method}");
        async move { unary(ex.addr, &path, &[], frame(&msg)).await }
    };
    let live: pb::ServerLiveResponse = decoded(&call("ServerLive", vec![]).await);
    assert!(live.live);
    let ready: pb::ServerReadyResponse = decoded(&call("ServerReady", vec![]).await);
    assert!(ready.ready);
    let meta: pb::ServerMetadataResponse = decoded(&call("ServerMetadata", vec![]).await);
    assert_eq!(meta.name, "braid");
    let named = |name: &str| pb::ModelReadyRequest {
        name: name.into(),
        ..Default::default()
    };
    let ready: pb::ModelReadyResponse =
        decoded(&call("ModelReady", named("tiny").encode_to_vec()).await);
    assert!(ready.ready);
    let unknown = call("ModelReady", named("nope").encode_to_vec()).await;
    assert_eq!(unknown.status(), 5);
    assert!(
        unknown.message().contains("serving: tiny"),
        "{}",
        unknown.message()
    );
    let model: pb::ModelMetadataResponse =
        decoded(&call("ModelMetadata", named("tiny").encode_to_vec()).await);
    assert_eq!(model.inputs[0].name, "text");
    assert!(model.outputs.iter().any(|o| o.name == "embedding"));

    let texts = ["good film", "bad food"];
    let rest = post(
        &client(),
        &ex.url("/v2/models/tiny/infer"),
        &[],
        &infer_body(&texts, ""),
    )
    .await
    .json();
    let want = json_fp32_output(&rest, "embedding");
    for raw in [true, false] {
        let r = unary(
            ex.addr,
            INFER,
            &[],
            texts_request("tiny", "r1", &texts, raw),
        )
        .await;
        assert_eq!(r.status(), 0, "{}", r.message());
        let resp: pb::ModelInferResponse = decoded(&r);
        assert_eq!(resp.id, "r1");
        let (shape, got) = fp32_output(&resp, "embedding");
        assert_eq!(shape[0], 2);
        assert_eq!(got.len(), want.len());
        let diff = braid::executor::model::max_abs_diff(&got, &want);
        // The tiny model's summation-order bound (docs/development.md).
        let scale = braid::executor::model::max_abs(&got, &want);
        let bound = braid::executor::model::bert_bound(2, 32, 64, 48, scale);
        assert!(diff <= bound, "raw {raw}: {diff} > {bound}");
    }
    let bad = unary(ex.addr, INFER, &[], frame(&[0x0b])).await;
    assert_eq!(bad.status(), 3, "{}", bad.message());
    let other = call("RepositoryIndex", vec![]).await;
    assert_eq!(other.status(), 12, "{}", other.message());
}

/// Concurrent gRPC ModelInfer calls on a batched route share executor calls, and each
/// caller gets exactly its own rows and id (checked against a direct call). A call
/// the batcher does not take (ModelMetadata) reaches the executor over HTTP/2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_model_infer_is_batched_and_each_caller_gets_its_own_rows() {
    use braid::grpc::pb;
    use prost::Message;
    let ex = TestExecutor::start(|dir| vec![tiny_spec(dir, "tiny", &[])]).await;
    let proxy = TestProxy::start(&format!(
        "executor: http://{}
routes:
  - model: m
    variants: [{{ name: local, backend: local, target_model: tiny }}]
    batching: {{ max_batch_size: 64, max_delay: 50ms, row_id: braid_row_id }}
",
        ex.addr
    ))
    .await;
    let n = 24;
    let texts: Vec<String> = (0..n).map(|i| format!("text number {i} of {n}")).collect();
    let calls = texts.iter().enumerate().map(|(i, t)| {
        let (addr, t) = (proxy.addr, t.clone());
        tokio::spawn(async move {
            let r = unary(
                addr,
                INFER,
                &[],
                texts_request("m", &format!("id-{i}"), &[&t], i % 2 == 0),
            )
            .await;
            assert_eq!(r.status(), 0, "{}", r.message());
            decoded::<pb::ModelInferResponse>(&r)
        })
    });
    let got: Vec<pb::ModelInferResponse> = futures_util::future::join_all(calls)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    for (i, (resp, text)) in got.iter().zip(&texts).enumerate() {
        assert_eq!(resp.id, format!("id-{i}"));
        assert!(
            !resp.outputs.iter().any(|o| o.name == "braid_row_id"),
            "the row ids are braid's"
        );
        let direct = unary(
            ex.addr,
            INFER,
            &[],
            texts_request("tiny", "", &[text], true),
        )
        .await;
        let want = fp32_output(&decoded(&direct), "embedding");
        assert_eq!(
            fp32_output(resp, "embedding"),
            want,
            "caller {i} got its own row"
        );
    }
    let labels = "{route=\"m\",variant=\"local\"}";
    let batches = metric(&proxy, &format!("braid_batch_size_count{labels}")).await;
    let rows = metric(&proxy, &format!("braid_batch_size_sum{labels}")).await;
    assert_eq!(rows, n as f64, "every call went through the batcher");
    assert!(batches < rows / 2.0, "{batches} batches for {rows} rows");

    let meta = pb::ModelMetadataRequest {
        name: "m".into(),
        ..Default::default()
    };
    let r = unary(
        proxy.addr,
        &format!("{SERVICE}ModelMetadata"),
        &[],
        frame(&meta.encode_to_vec()),
    )
    .await;
    let meta: pb::ModelMetadataResponse = decoded(&r);
    assert_eq!(
        meta.name, "tiny",
        "forwarded to the executor with the target's name"
    );
    proxy.stop().await;
}

/// The rows of a BYTES output (raw contents) of a ModelInferResponse.
fn bytes_output(r: &braid::grpc::pb::ModelInferResponse, name: &str) -> Vec<String> {
    let i = r.outputs.iter().position(|o| o.name == name).unwrap();
    let mut rest = &r.raw_output_contents[i][..];
    let mut out = Vec::new();
    while !rest.is_empty() {
        let n = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
        out.push(String::from_utf8(rest[4..4 + n].to_vec()).unwrap());
        rest = &rest[4 + n..];
    }
    out
}

/// gRPC calls in a batch keep the batcher's guarantees: a poisoned call fails alone
/// (the executor's 400 as INVALID_ARGUMENT) while the others get their rows; a
/// deadline that passes in the queue is DEADLINE_EXCEEDED; a caller that leaves while
/// queued is never sent; a reply that cannot be split fails the batch as INTERNAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_batches_keep_the_batchers_guarantees() {
    use braid::grpc::pb;
    let exec = MockExecutor::start(MockBehaviour {
        poison: true,
        ..Default::default()
    })
    .await;
    let proxy = TestProxy::start(&batching_config(
        exec.addr,
        "{ max_batch_size: 8, max_delay: 20ms }",
    ))
    .await;
    let infer = |text: &'static str, metadata: Vec<(&'static str, &'static str)>| {
        let addr = proxy.addr;
        tokio::spawn(async move {
            unary(
                addr,
                INFER,
                &metadata,
                texts_request("m", text, &[text], true),
            )
            .await
        })
    };
    let calls: Vec<_> = ["ok-1", "ok-2", "POISON-3", "ok-4"]
        .into_iter()
        .map(|t| infer(t, vec![]))
        .collect();
    for (call, text) in calls.into_iter().zip(["ok-1", "ok-2", "POISON-3", "ok-4"]) {
        let r = call.await.unwrap();
        if text.starts_with("POISON") {
            assert_eq!(r.status(), 3, "{}", r.message());
            assert!(r.message().contains("poisoned input"), "{}", r.message());
            continue;
        }
        assert_eq!(r.status(), 0, "{text}: {}", r.message());
        let resp: pb::ModelInferResponse = decoded(&r);
        assert_eq!(resp.id, text);
        assert_eq!(bytes_output(&resp, "echo"), [format!("{text}!")]);
    }

    // The executor busy for 300 ms: a 50 ms deadline passes in the queue.
    exec.set(|b| b.fixed = Duration::from_millis(300));
    let busy = infer("busy", vec![]);
    exec.wait_seen("busy").await;
    let late = infer("late", vec![("grpc-timeout", "50m")]).await.unwrap();
    assert_eq!(late.status(), 4, "{}", late.message());
    // A caller that leaves while queued.
    let mut leaving = Call::open(proxy.addr, INFER, &[]).await;
    leaving.send(texts_request("m", "abandoned", &["abandoned"], true), true);
    let waited = tokio::time::timeout(Duration::from_millis(100), leaving.headers()).await;
    assert!(waited.is_err(), "still queued behind the busy batch");
    drop(leaving);
    assert_eq!(busy.await.unwrap().status(), 0);
    let after = infer("after", vec![]).await.unwrap();
    assert_eq!(after.status(), 0, "{}", after.message());
    assert!(
        !exec.seen().contains(&"abandoned".to_string()),
        "a cancelled call was sent"
    );
    let cancelled = "braid_batch_dropped_total{route=\"m\",variant=\"local\",priority=\"default\",reason=\"cancelled\"}";
    assert_eq!(metric(&proxy, cancelled).await, 1.0);

    // One row short: nobody gets anything.
    exec.set(|b| {
        b.fixed = Duration::ZERO;
        b.drop_row = true;
    });
    let calls: Vec<_> = ["s-1", "s-2"]
        .into_iter()
        .map(|t| infer(t, vec![]))
        .collect();
    for call in calls {
        let r = call.await.unwrap();
        assert_eq!(r.status(), 13, "{}", r.message());
        assert!(r.body.is_empty(), "no rows leak");
    }
    proxy.stop().await;
}
