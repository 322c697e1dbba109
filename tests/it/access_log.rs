//! The access log: one JSON line per sampled request, with what an operator needs to
//! follow it (trace id, route, variant, how it was chosen, status, timings, batch,
//! bytes), sampled per route, written off the request path.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::support::grpc::{GrpcBackend, frame, named, unary};
use crate::support::*;

/// The lines written so far, once at least `n` have been.
async fn lines(path: &Path, n: usize) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        if lines.len() >= n {
            return lines;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {n} lines: {text}",
            lines.len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn proxy_logging_to(config: &str, log: &Path) -> TestProxy {
    let dir = log.parent().unwrap();
    let path = dir.join("braid.yaml");
    std::fs::write(&path, config).unwrap();
    let mut opts = options(&path);
    opts.access_log = Some(braid::access::Destination::File(log.to_path_buf()));
    TestProxy::start_at(&path, opts).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_gets_one_line_with_its_route_variant_trace_and_batch() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let exec = MockExecutor::start(MockBehaviour::default()).await;
    let g = GrpcBackend::start("g").await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let config = format!(
        "executor: http://{}
routes:
  - model: ab
    variants:
      - {{ name: a, weight: 1, backend: \"{}\" }}
      - {{ name: b, weight: 0, backend: \"{}\" }}
    sticky_header: x-user
  - model: quiet
    variants: [{{ name: a, backend: \"{}\" }}]
    access_log: {{ fraction: 0 }}
  - model: m
    variants: [{{ name: local, backend: local }}]
    batching: {{ max_batch_size: 8 }}
  - model: g
    variants: [{{ name: g, backend: h2c://{} }}]
",
        exec.addr,
        a.url(),
        b.url(),
        a.url(),
        g.addr
    );
    let proxy = proxy_logging_to(&config, &log).await;
    let c = client();
    let trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let body = infer_body(&["hello"], "");
    let r = post(
        &c,
        &proxy.url("/v2/models/ab/infer"),
        &[("x-user", "alice"), ("traceparent", trace)],
        &body,
    )
    .await;
    assert_eq!(r.status, 200);
    let pinned = post(
        &c,
        &proxy.url("/v2/models/ab/infer"),
        &[("x-braid-variant", "b")],
        &body,
    )
    .await;
    assert_eq!(pinned.variant(), "b");
    let quiet = post(&c, &proxy.url("/v2/models/quiet/infer"), &[], &body).await;
    assert_eq!(quiet.status, 200);
    let batched = post(&c, &proxy.url("/v2/models/m/infer"), &[], &body).await;
    assert_eq!(batched.status, 200);
    let missing = post(
        &c,
        &proxy.url("/v2/models/ab/infer"),
        &[("x-braid-timeout", "x")],
        &body,
    )
    .await;
    assert_eq!(missing.status, 400);
    let called = unary(
        proxy.addr,
        "/inference.GRPCInferenceService/ModelInfer",
        &[],
        frame(&named("g", b"")),
    )
    .await;
    assert_eq!(called.status(), 0);

    let got = lines(&log, 5).await;
    assert_eq!(
        got.len(),
        5,
        "one line per request, none for route quiet: {got:?}"
    );
    let first = &got[0];
    assert_eq!(first["route"], "ab");
    assert_eq!(first["variant"], "a");
    assert_eq!(first["assignment"], "sticky");
    assert_eq!(first["status"], 200);
    assert_eq!(first["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(first["method"], "POST");
    assert_eq!(first["path"], "/v2/models/ab/infer");
    assert_eq!(first["protocol"], "http");
    assert_eq!(first["request_bytes"], body.len());
    assert!(first["duration_ms"].as_f64().unwrap() > 0.0);
    assert!(first["time"].as_str().unwrap().ends_with('Z'));
    assert_eq!(first["batch_size"], Value::Null);
    assert_eq!(got[1]["assignment"], "override");
    assert_eq!(got[1]["variant"], "b");
    assert_eq!(got[1]["trace_id"], Value::Null);
    let batched = &got[2];
    assert_eq!(
        (&batched["route"], &batched["batch_size"]),
        (&"m".into(), &1.into())
    );
    assert!(batched["queue_wait_ms"].as_f64().is_some(), "{batched}");
    assert_eq!(got[3]["status"], 400);
    assert_eq!(
        (&got[4]["protocol"], &got[4]["route"]),
        (&"grpc".into(), &"g".into())
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("hello"), "nothing from a body: {text}");
    // Readable by braid's user only.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&log).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the access log is {mode:o}");
    let written = "braid_access_log_lines_total{result=\"written\"}";
    assert_eq!(metric(&proxy, written).await, 5.0);
    proxy.stop().await;
}

/// A route's fraction samples its requests (within binomial bounds); a bad fraction is
/// refused with its field path, and an access log that cannot be opened stops braid
/// from starting with the flag named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_sample_their_share_and_bad_settings_are_refused() {
    let a = Backend::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let config = |f: &str| {
        format!(
            "routes:\n  - model: m\n    variants: [{{ name: a, backend: \"{}\" }}]\n    access_log: {{ fraction: {f} }}\n",
            a.url()
        )
    };
    let proxy = proxy_logging_to(&config("0.25"), &log).await;
    let c = client();
    let n = 400;
    for _ in 0..n {
        let r = get(&c, &proxy.url("/v2/models/m/ready"), &[]).await;
        assert_eq!(r.status, 200);
    }
    // Everything sent has been answered; wait for the writer to catch up.
    let written = "braid_access_log_lines_total{result=\"written\"}";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut logged = 0;
    while tokio::time::Instant::now() < deadline {
        logged = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .count();
        if logged as f64 == metric(&proxy, written).await && logged > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // 0.25 of 400: mean 100, sd 8.7; six sd either side.
    assert!((48..=152).contains(&logged), "{logged} lines of {n}");

    proxy.stop().await;
    let errors = braid::config::load(&config("1.5"), "test").unwrap_err();
    assert!(
        errors
            .iter()
            .any(|e| e.path == "routes[0].access_log.fraction"),
        "{errors:?}"
    );

    let path = dir.path().join("braid.yaml");
    let mut opts = options(&path);
    opts.access_log = Some(braid::access::Destination::File(
        dir.path().join("no/such/dir/access.log"),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let errors = match braid::run::start(opts, listener, admin).await {
        Ok(_) => panic!("started with an access log it cannot open"),
        Err(e) => e,
    };
    assert_eq!(errors[0].path, "--access-log", "{errors:?}");
}
