//! The sampled payload log (`routes[].log`) over real sockets: records with both
//! bodies cut at `max_bytes`, the variant and how it was chosen, credentials never
//! written; a file rotated by size; a full disk, an unwritable path, a dead HTTP sink
//! costing requests nothing; CloudEvents as KServe's logger sends them; sampling that
//! follows its fraction.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use tokio::net::TcpListener;

use crate::support::*;

const INFER: &str = "/v2/models/sentiment/infer";

fn logged(a: &str, b: &str, log: &str) -> String {
    format!(
        r#"routes:
  - model: sentiment
    variants:
      - {{ name: a, weight: 1, backend: "{a}" }}
      - {{ name: b, weight: 1, backend: "{b}" }}
    sticky_header: x-user-id
    log: {log}
"#
    )
}

async fn wait_metric(proxy: &TestProxy, series: &str, at_least: f64) -> f64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let v = metric(proxy, series).await;
        if v >= at_least {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            let text = get(&client(), &proxy.admin_url("/metrics"), &[])
                .await
                .text();
            let counted: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with("braid_payload_log"))
                .collect();
            panic!("{series} stuck at {v}; every payload log series: {counted:#?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

const WRITTEN: &str = "braid_payload_log_records_total{route=\"sentiment\",result=\"written\"}";
const FAILED: &str = "braid_payload_log_records_total{route=\"sentiment\",result=\"failed\"}";

fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[tokio::test]
async fn records_carry_both_bodies_cut_at_max_bytes_and_never_credentials() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("payloads.jsonl");
    let log = format!(
        "{{ fraction: 1, max_bytes: 64, sink: \"{}\" }}",
        path.display()
    );
    let proxy = TestProxy::start(&logged(&a.url(), &b.url(), &log)).await;
    let c = client();
    let body = format!(
        "{{\"inputs\":[{{\"name\":\"text\",\"data\":[\"{}\"]}}]}}",
        "x".repeat(200)
    );
    let mut variants = Vec::new();
    for user in ["alice", "bob", "carol"] {
        let headers = [
            ("x-user-id", user),
            ("authorization", "Bearer s3cr3t-token"),
            ("cookie", "session=c00kie"),
            ("x-api-key", "k3y-value"),
            // Credentials no name fragment catches: the allowlist keeps them out.
            ("x-goog-iap-jwt-assertion", "iap-jwt"),
            ("x-forwarded-client-cert", "xfcc-cert"),
            ("dpop", "dpop-proof"),
            ("x-amzn-oidc-data", "oidc-data"),
            ("x-other", "other-value"),
            ("content-type", "application/json"),
        ];
        let r = post(&c, &proxy.url(INFER), &headers, &body).await;
        assert_eq!(r.status, 200);
        variants.push((user, r.variant().to_string(), r.body.len()));
    }
    wait_metric(&proxy, WRITTEN, 3.0).await;
    let text = std::fs::read_to_string(&path).unwrap();
    for secret in [
        "s3cr3t",
        "c00kie",
        "k3y-value",
        "authorization",
        "x-api-key",
        "iap-jwt",
        "xfcc-cert",
        "dpop-proof",
        "oidc-data",
        "other-value",
    ] {
        assert!(!text.contains(secret), "{secret} written: {text}");
    }
    // Readable by braid's user only.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let records = lines(&path);
    assert_eq!(records.len(), 3);
    for (user, variant, response_len) in variants {
        let r = records
            .iter()
            .find(|r| r["request"]["headers"]["x-user-id"] == user)
            .unwrap_or_else(|| panic!("no record for {user}"));
        assert_eq!(r["route"], "sentiment");
        assert_eq!(r["variant"], variant.as_str());
        assert_eq!(r["assignment"], "sticky");
        assert_eq!(r["status"], 200);
        assert_eq!(r["method"], "POST");
        assert_eq!(r["path"], INFER);
        assert!(r["latency_ms"].as_f64().unwrap() > 0.0);
        let req = &r["request"]["payload"];
        assert_eq!(req["bytes"], body.len());
        assert_eq!(req["truncated"], true);
        assert_eq!(req["body"], &body[..64]);
        assert_eq!(req["content_type"], "application/json");
        let resp = &r["response"]["payload"];
        assert_eq!(resp["bytes"], response_len);
        assert_eq!(resp["truncated"], true);
        assert_eq!(resp["complete"], true);
        assert!(
            resp["body"].as_str().unwrap().starts_with("{\"backend\":"),
            "{resp}"
        );
        assert_eq!(r["id"].as_str().unwrap().len(), 32);
        // The default allowlist: content-type and the route's sticky header.
        let mut names: Vec<&String> = r["request"]["headers"]
            .as_object()
            .unwrap()
            .keys()
            .collect();
        names.sort();
        assert_eq!(names, ["content-type", "x-user-id"], "{r}");
    }
    proxy.stop().await;
}

#[tokio::test]
async fn the_file_rotates_by_size_and_keeps_as_many_as_asked() {
    let a = Backend::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.jsonl");
    let log = format!(
        "{{ fraction: 1, max_bytes: 100, sink: \"{}\", rotate_bytes: 4096, keep: 2 }}",
        path.display()
    );
    let proxy = TestProxy::start(&logged(&a.url(), &a.url(), &log)).await;
    let c = client();
    for i in 0..60 {
        let user = format!("u{i}");
        post(&c, &proxy.url(INFER), &[("x-user-id", &user)], "{}").await;
    }
    wait_metric(&proxy, WRITTEN, 60.0).await;
    let rotated: Vec<_> = ["p.jsonl", "p.jsonl.1", "p.jsonl.2"]
        .iter()
        .map(|n| dir.path().join(n))
        .collect();
    for p in &rotated {
        let size = std::fs::metadata(p).unwrap().len();
        assert!(size <= 4096, "{} is {size} bytes", p.display());
        assert!(!lines(p).is_empty());
    }
    assert!(!dir.path().join("p.jsonl.3").exists());
    // Newest last: the current file holds the latest records.
    let current = lines(&path);
    assert_eq!(
        current.last().unwrap()["request"]["headers"]["x-user-id"],
        "u59"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn a_full_disk_or_an_unwritable_path_costs_requests_nothing() {
    let a = Backend::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    // /dev/full answers every write with ENOSPC; a directory cannot be opened as a file.
    for sink in ["/dev/full".to_string(), dir.path().display().to_string()] {
        let log = format!("{{ fraction: 1, sink: \"{sink}\" }}");
        let proxy = TestProxy::start(&logged(&a.url(), &a.url(), &log)).await;
        let c = client();
        for _ in 0..20 {
            let r = post(&c, &proxy.url(INFER), &[], "{}").await;
            assert_eq!(r.status, 200, "{sink}");
        }
        assert_eq!(wait_metric(&proxy, FAILED, 20.0).await, 20.0, "{sink}");
        assert_eq!(metric(&proxy, WRITTEN).await, 0.0);
        proxy.stop().await;
    }
}

/// Every request the sink received: its headers and body.
type Seen = Arc<Mutex<Vec<(http::HeaderMap, Bytes)>>>;

async fn event_sink() -> (String, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/events", listener.local_addr().unwrap());
    let seen: Seen = Arc::default();
    let s = seen.clone();
    serve_on(
        listener,
        false,
        move |req: Request<hyper::body::Incoming>| {
            let s = s.clone();
            async move {
                let (parts, body) = req.into_parts();
                let body = body.collect().await.unwrap().to_bytes();
                s.lock().unwrap().push((parts.headers, body));
                Ok(Response::new(Full::new(Bytes::new())))
            }
        },
    );
    (url, seen)
}

#[tokio::test]
async fn cloudevents_reach_an_http_sink_and_a_dead_one_costs_nothing() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let (url, seen) = event_sink().await;
    let log = format!("{{ fraction: 1, sink: \"{url}\" }}");
    let proxy = TestProxy::start(&logged(&a.url(), &b.url(), &log)).await;
    let c = client();
    let r = post(
        &c,
        &proxy.url(INFER),
        &[("x-user-id", "alice"), ("content-type", "application/json")],
        "{\"inputs\":[]}",
    )
    .await;
    wait_metric(&proxy, WRITTEN, 1.0).await;
    let events = seen.lock().unwrap().clone();
    assert_eq!(events.len(), 2);
    let h = |i: usize, name: &str| {
        events[i]
            .0
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    };
    assert_eq!(
        h(0, "ce-type").as_deref(),
        Some("org.kubeflow.serving.inference.request")
    );
    assert_eq!(
        h(1, "ce-type").as_deref(),
        Some("org.kubeflow.serving.inference.response")
    );
    for i in 0..2 {
        assert_eq!(h(i, "ce-specversion").as_deref(), Some("1.0"));
        assert_eq!(
            h(i, "ce-inferenceservicename").as_deref(),
            Some("sentiment")
        );
        assert_eq!(h(i, "ce-endpoint").as_deref(), Some(r.variant()));
        assert_eq!(h(i, "ce-braidassignment").as_deref(), Some("sticky"));
        assert_eq!(h(i, "ce-braidstatus").as_deref(), Some("200"));
        assert!(h(i, "authorization").is_none());
    }
    assert_eq!(h(0, "ce-id"), h(1, "ce-id"));
    assert_eq!(events[0].1, "{\"inputs\":[]}");
    assert_eq!(events[1].1, r.body);
    proxy.stop().await;

    // A sink nobody listens on: requests are answered as before, records fail.
    let dead = format!("http://{}/events", dead_addr().await);
    let log = format!("{{ fraction: 1, sink: \"{dead}\" }}");
    let proxy = TestProxy::start(&logged(&a.url(), &b.url(), &log)).await;
    for _ in 0..10 {
        assert_eq!(post(&c, &proxy.url(INFER), &[], "{}").await.status, 200);
    }
    assert_eq!(wait_metric(&proxy, FAILED, 10.0).await, 10.0);
    proxy.stop().await;

    // A sink that accepts connections and never answers: requests do not wait for it.
    let hanging = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/events", hanging.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((s, _)) = hanging.accept().await {
            conns.push(s);
        }
    });
    let log = format!("{{ fraction: 1, sink: \"{url}\" }}");
    let proxy = TestProxy::start(&logged(&a.url(), &b.url(), &log)).await;
    let answered = tokio::time::timeout(Duration::from_secs(4), async {
        for _ in 0..10 {
            assert_eq!(post(&c, &proxy.url(INFER), &[], "{}").await.status, 200);
        }
    })
    .await;
    assert!(answered.is_ok(), "requests waited for the payload sink");
    proxy.stop().await;
    held.abort();
}

#[tokio::test]
async fn sampling_follows_the_fraction() {
    let a = Backend::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.jsonl");
    let log = format!("{{ fraction: 0.2, sink: \"{}\" }}", path.display());
    let proxy = TestProxy::start(&logged(&a.url(), &a.url(), &log)).await;
    let c = client();
    let n = 1_000;
    for _ in 0..n {
        post(&c, &proxy.url(INFER), &[], "{}").await;
    }
    // Every sampled record is written before the count is read: wait for the queue.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut last = -1.0;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = metric(&proxy, WRITTEN).await;
        if now == last || tokio::time::Instant::now() > deadline {
            break;
        }
        last = now;
    }
    let written = metric(&proxy, WRITTEN).await;
    // Binomial(1000, 0.2): mean 200, sd 12.6; four standard deviations either side.
    assert!(
        (150.0..=250.0).contains(&written),
        "{written} of {n} sampled at 0.2"
    );
    assert_eq!(lines(&path).len() as f64, written);
    proxy.stop().await;
}

#[test]
fn bad_log_settings_are_rejected_with_their_field_paths() {
    let cases = [
        ("{ sink: /tmp/x }", "routes[0].log.fraction: is required"),
        (
            "{ fraction: 2, sink: /tmp/x }",
            "routes[0].log.fraction: must be between 0 and 1",
        ),
        (
            "{ fraction: 1, sink: logs.jsonl }",
            "routes[0].log.sink: \"logs.jsonl\" must be an absolute file path or an http:// URL",
        ),
        (
            "{ fraction: 1, sink: \"http://h:1/\", keep: 2 }",
            "routes[0].log.keep: applies to file sinks only",
        ),
        (
            "{ fraction: 1, sink: /tmp/x, max_bytes: 99999999 }",
            "routes[0].log.max_bytes: must be at most",
        ),
    ];
    for (log, want) in cases {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(
            &path,
            logged("http://127.0.0.1:1", "http://127.0.0.1:2", log),
        )
        .unwrap();
        let out = braid(&["check", path.to_str().unwrap()], b"");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{log}: {stdout}");
        assert!(stdout.contains(want), "want {want:?} in:\n{stdout}");
    }
}
