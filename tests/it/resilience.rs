//! Retries, budgets, ejection and fallback, shadow traffic, deadlines and overload,
//! driven through real sockets against backends that fail on command.

use std::time::Duration;

use crate::support::*;

/// One model route `m` over the given variants (name, weight, backend URL), plus extra
/// route-level YAML (indented four spaces).
fn route(variants: &[(&str, f64, &str)], extra: &str) -> String {
    let mut cfg = String::from("routes:\n  - model: m\n    variants:\n");
    for (name, weight, url) in variants {
        cfg.push_str(&format!(
            "      - {{ name: {name}, weight: {weight}, backend: \"{url}\" }}\n"
        ));
    }
    cfg.push_str(extra);
    cfg
}

const INFER: &str = "/v2/models/m/infer";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_candidate_is_served_by_the_fallback_and_retries_stay_in_budget() {
    let control = Backend::start("control").await;
    let candidate = Backend::start("candidate").await;
    candidate.set(|f| f.status = 503);
    let proxy = TestProxy::start(&route(
        &[("control", 1.0, &control.url()), ("candidate", 1.0, &candidate.url())],
        "    fallback: control\n    retry: { attempts: 3, budget_ratio: 0.2, min_retries_per_second: 1, backoff_base: 1ms, backoff_max: 2ms }\n",
    ))
    .await;
    let total = 200;
    let mut tasks = Vec::new();
    for i in 0..8 {
        let (c, url) = (client(), proxy.url(INFER));
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for _ in 0..total / 8 {
                out.push(post(&c, &url, &[], &format!("{{\"client\":{i}}}")).await);
            }
            out
        }));
    }
    let mut replies = Vec::new();
    for t in tasks {
        replies.extend(t.await.unwrap());
    }
    let mut via_fallback = 0;
    for r in &replies {
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.variant(), "control");
        assert_eq!(r.json()["backend"], "control");
        if r.headers.get("x-braid-fallback-from").is_some() {
            assert_eq!(r.headers["x-braid-fallback-from"], "candidate");
            via_fallback += 1;
        }
    }
    assert!(
        via_fallback > 50,
        "about half were assigned to the candidate: {via_fallback}"
    );
    // First tries, plus at most 20% of all requests, plus 1/s over the 10 s window.
    let allowed = via_fallback + total / 5 + 10;
    assert!(
        candidate.hits() <= allowed,
        "candidate saw {} attempts, budget allows {allowed}",
        candidate.hits()
    );
    let exhausted = metric(
        &proxy,
        r#"braid_retries_total{route="m",variant="candidate",outcome="budget_exhausted"}"#,
    )
    .await;
    assert!(exhausted > 0.0, "the budget never refused a retry");
    let fallbacks = metric(
        &proxy,
        r#"braid_fallbacks_total{route="m",variant="candidate"}"#,
    )
    .await;
    assert_eq!(fallbacks as usize, via_fallback);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ejected_variant_is_skipped_then_probed_back_in() {
    let control = Backend::start("control").await;
    let candidate = Backend::start("candidate").await;
    candidate.set(|f| f.status = 500);
    let proxy = TestProxy::start(&route(
        &[("candidate", 1.0, &candidate.url()), ("control", 0.0, &control.url())],
        "    fallback: control\n    retry: { idempotent: true, attempts: 1 }\n    outlier: { consecutive_failures: 3, base_ejection: 300ms, max_ejection: 1s }\n",
    ))
    .await;
    let c = client();
    for _ in 0..3 {
        let r = post(&c, &proxy.url(INFER), &[], "{}").await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.headers["x-braid-fallback-from"], "candidate");
    }
    assert_eq!(candidate.hits(), 3);
    let ejected = r#"braid_variant_ejected{route="m",variant="candidate"}"#;
    assert_eq!(metric(&proxy, ejected).await, 1.0);
    // Ejected: straight to the fallback, the candidate sees nothing.
    for _ in 0..5 {
        let r = post(&c, &proxy.url(INFER), &[], "{}").await;
        assert_eq!(r.variant(), "control");
        assert_eq!(r.headers["x-braid-fallback-from"], "candidate");
    }
    assert_eq!(candidate.hits(), 3);
    // It recovers; after the ejection one probe goes through and brings it back.
    candidate.set(|f| f.status = 0);
    let mut back = false;
    for _ in 0..200 {
        let r = post(&c, &proxy.url(INFER), &[], "{}").await;
        if r.variant() == "candidate" {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(back, "the candidate never came back");
    for _ in 0..5 {
        let r = post(&c, &proxy.url(INFER), &[], "{}").await;
        assert_eq!(r.variant(), "candidate");
        assert!(r.headers.get("x-braid-fallback-from").is_none());
    }
    assert_eq!(metric(&proxy, ejected).await, 0.0);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ejected_variant_without_fallback_shares_its_traffic_and_keeps_its_sticky_keys() {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let proxy = TestProxy::start(&route(
        &[("a", 1.0, &a.url()), ("b", 1.0, &b.url())],
        "    sticky_header: x-user\n    outlier: { consecutive_failures: 2, base_ejection: 1h, max_ejection: 1h }\n",
    ))
    .await;
    let c = client();
    let mut on_b = Vec::new();
    for u in 0..40 {
        let user = format!("user-{u}");
        let r = post(&c, &proxy.url(INFER), &[("x-user", &user)], "{}").await;
        if r.variant() == "b" {
            on_b.push(user);
        }
    }
    assert!(!on_b.is_empty());
    b.set(|f| f.status = 502);
    for user in on_b.iter().take(2) {
        let r = post(&c, &proxy.url(INFER), &[("x-user", user)], "{}").await;
        assert_eq!(r.status, 502);
    }
    // b is ejected for an hour: its users are served by a, nobody sees an error.
    for user in &on_b {
        let r = post(&c, &proxy.url(INFER), &[("x-user", user)], "{}").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.variant(), "a");
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_backend_gets_per_try_timeouts_then_504_within_the_route_timeout() {
    let slow = Backend::slow("slow", Duration::from_secs(30)).await;
    let proxy = TestProxy::start(&route(
        &[("slow", 1.0, &slow.url())],
        "    timeout: 1s\n    retry: { attempts: 3, per_try_timeout: 200ms, idempotent: true, backoff_base: 1ms, backoff_max: 1ms }\n",
    ))
    .await;
    let started = std::time::Instant::now();
    let r = post(&client(), &proxy.url(INFER), &[], "{}").await;
    assert_json_error(&r, 504, "");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "bounded by the route timeout"
    );
    assert_eq!(slow.hits(), 3, "each try gave up at its own timeout");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_reset_after_the_backend_read_it_is_retried_only_when_idempotent() {
    let b = Backend::start("b").await;
    b.set(|f| f.reset = true);
    let cfg = |idempotent: bool| {
        route(
            &[("b", 1.0, &b.url())],
            &format!(
                "    retry: {{ attempts: 3, idempotent: {idempotent}, backoff_base: 1ms, backoff_max: 1ms }}\n"
            ),
        )
    };
    let proxy = TestProxy::start(&cfg(false)).await;
    let c = client();
    let r = post(&c, &proxy.url(INFER), &[], "{}").await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(
        b.hits(),
        1,
        "a POST that may have been processed is not repeated"
    );
    let not_idempotent = metric(
        &proxy,
        r#"braid_retries_total{route="m",variant="b",outcome="not_idempotent"}"#,
    )
    .await;
    assert_eq!(not_idempotent, 1.0);
    // A GET is safe to repeat.
    let r = get(&c, &proxy.url("/v2/models/m"), &[]).await;
    assert_eq!(r.status, 502);
    assert_eq!(b.hits(), 4);
    // The route says repeating is harmless: the POST is retried and succeeds.
    proxy.reload(&cfg(true)).await;
    b.set(|f| f.times = 1);
    let r = post(&c, &proxy.url(INFER), &[], "{}").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(b.hits(), 6);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_retried_and_a_long_retry_after_is_passed_back() {
    let b = Backend::start("b").await;
    let proxy = TestProxy::start(&route(
        &[("b", 1.0, &b.url())],
        "    retry: { attempts: 3, on_status: [503, 429], backoff_base: 1ms, backoff_max: 1ms, retry_after_cap: 1s }\n",
    ))
    .await;
    let c = client();
    // 503 means the backend did not do the work: a POST may repeat it.
    b.set(|f| {
        f.status = 503;
        f.times = 1;
    });
    let r = post(&c, &proxy.url(INFER), &[], "{}").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(b.hits(), 2);
    let retried = metric(
        &proxy,
        r#"braid_retries_total{route="m",variant="b",outcome="retried"}"#,
    )
    .await;
    assert_eq!(retried, 1.0);
    // A 429 asking for 30 s is longer than the cap: the client gets it, unretried.
    b.set(|f| {
        f.status = 429;
        f.retry_after = Some("30".into());
    });
    let r = post(&c, &proxy.url(INFER), &[], "{}").await;
    assert_eq!(r.status, 429);
    assert_eq!(r.headers["retry-after"], "30");
    assert_eq!(b.hits(), 3);
    // A connect failure never reached anything: retried (here, to the same dead port).
    let dead = dead_addr().await;
    proxy
        .reload(&route(
            &[("b", 1.0, &format!("http://{dead}"))],
            "    retry: { attempts: 3, backoff_base: 1ms, backoff_max: 1ms }\n",
        ))
        .await;
    let r = post(&c, &proxy.url(INFER), &[], "{}").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.headers["retry-after"], "1");
    let retried = metric(
        &proxy,
        r#"braid_retries_total{route="m",variant="b",outcome="retried"}"#,
    )
    .await;
    assert_eq!(retried, 3.0, "two more retries for the connect failures");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deadline_reaches_the_backend_as_the_time_left() {
    let b = Backend::start("b").await;
    let proxy = TestProxy::start(&route(&[("b", 1.0, &b.url())], "    timeout: 5s\n")).await;
    let c = client();
    let r = post(&c, &proxy.url(INFER), &[("x-braid-timeout", "800ms")], "{}").await;
    let left: u64 = r.json()["deadline"]
        .as_str()
        .and_then(|s| s.strip_suffix("ms"))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no deadline header: {}", r.text()));
    assert!(left > 0 && left <= 800, "{left}");
    // Without the header, the route timeout is the deadline.
    let r = post(&c, &proxy.url(INFER), &[], "{}").await;
    let left: u64 = r.json()["deadline"]
        .as_str()
        .unwrap()
        .trim_end_matches("ms")
        .parse()
        .unwrap();
    assert!(left > 800 && left <= 5000, "{left}");
    // A deadline shorter than the backend takes: 504, "deadline passed".
    let r = post(
        &c,
        &proxy.url(INFER),
        &[("x-braid-timeout", "50ms"), ("x-delay-ms", "2000")],
        "{}",
    )
    .await;
    assert_json_error(&r, 504, "deadline");
    let r = post(&c, &proxy.url(INFER), &[("x-braid-timeout", "soon")], "{}").await;
    assert_eq!(r.status, 400);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_copies_never_touch_the_client_and_record_divergence() {
    let control = Backend::start("control").await;
    let shadow = Backend::start("shadow").await;
    control.set(|f| f.outputs = Some(vec![0.5, 1.0, 2.0]));
    shadow.set(|f| f.outputs = Some(vec![0.5, 1.25, 2.0]));
    let proxy = TestProxy::start(&route(
        &[
            ("control", 1.0, &control.url()),
            ("shadow", 0.0, &shadow.url()),
        ],
        "    shadow: { variant: shadow, fraction: 1.0, max_inflight: 4 }\n",
    ))
    .await;
    let c = client();
    for _ in 0..10 {
        let r = post(&c, &proxy.url(INFER), &[], "{}").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.variant(), "control");
        assert_eq!(
            r.json()["outputs"][0]["data"][1],
            1.0,
            "the client gets the primary's answer"
        );
    }
    let matched =
        r#"braid_shadow_requests_total{route="m",variant="shadow",outcome="status_match"}"#;
    wait_for_metric(&proxy, matched, 10.0).await;
    assert_eq!(shadow.hits(), 10);
    let sum = metric(
        &proxy,
        r#"braid_shadow_divergence_sum{route="m",variant="shadow"}"#,
    )
    .await;
    assert!(
        (sum - 2.5).abs() < 1e-9,
        "ten pairs differing by 0.25: {sum}"
    );

    // A failing shadow changes nothing for the client; it is counted.
    shadow.set(|f| f.status = 500);
    let r = post(&c, &proxy.url(INFER), &[], "{}").await;
    assert_eq!(r.status, 200);
    let mismatch =
        r#"braid_shadow_requests_total{route="m",variant="shadow",outcome="status_mismatch"}"#;
    wait_for_metric(&proxy, mismatch, 1.0).await;

    // A stalled shadow: clients are answered while their copies hang, and once the
    // slots are taken further copies are skipped, not queued.
    let stalled = Backend::slow("stalled", Duration::from_secs(30)).await;
    proxy
        .reload(&route(
            &[
                ("control", 1.0, &control.url()),
                ("shadow", 0.0, &stalled.url()),
            ],
            "    shadow: { variant: shadow, fraction: 1.0, max_inflight: 2 }\n",
        ))
        .await;
    for _ in 0..5 {
        let r = post(&c, &proxy.url(INFER), &[], "{}").await;
        assert_eq!(r.status, 200);
        assert_eq!(r.variant(), "control");
    }
    let skipped =
        r#"braid_shadow_requests_total{route="m",variant="shadow",outcome="skipped_saturated"}"#;
    assert_eq!(metric(&proxy, skipped).await, 3.0);
    proxy.stop().await;
}

async fn wait_for_metric(proxy: &TestProxy, series: &str, value: f64) {
    for _ in 0..500 {
        if metric(proxy, series).await >= value {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{series} never reached {value}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_answers_fast_and_the_admin_port_keeps_answering() {
    let b = Backend::slow("b", Duration::from_secs(2)).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("braid.yaml");
    std::fs::write(
        &path,
        route(&[("b", 1.0, &b.url())], "    max_inflight: 2\n")
            + "  - path_prefix: /other\n    variants: [{ name: o, backend: \""
            + &b.url()
            + "\" }]\n",
    )
    .unwrap();
    let mut opts = options(&path);
    opts.limits.max_inflight = 3;
    let proxy = TestProxy::start_at(&path, opts).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let (c, url) = (client(), proxy.url(INFER));
        held.push(tokio::spawn(async move { post(&c, &url, &[], "{}").await }));
    }
    while b.hits() < 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The route is full: 429 at once, with Retry-After.
    let c = client();
    let r = post(&c, &proxy.url(INFER), &[], "{}").await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.headers["retry-after"], "1");
    assert!(r.json()["error"].as_str().unwrap().contains("max_inflight"));
    // One more elsewhere fills the proxy; then everything gets 503 at once.
    let (c2, url) = (client(), proxy.url("/other/x"));
    held.push(tokio::spawn(async move { get(&c2, &url, &[]).await }));
    while b.hits() < 3 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let r = get(&c, &proxy.url("/other/y"), &[]).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.headers["retry-after"], "1");
    let m = get(&c, &proxy.admin_url("/metrics"), &[]).await;
    assert_eq!(m.status, 200);
    assert_eq!(get(&c, &proxy.admin_url("/healthz"), &[]).await.status, 200);
    for h in held {
        assert_eq!(h.await.unwrap().status, 200);
    }
    proxy.stop().await;
}

/// An HTTP/2 backend that refuses its first `refuse` streams with REFUSED_STREAM, then
/// answers 200; returns its address and a count of streams it saw.
async fn refusing_h2_backend(
    refuse: usize,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    if counter.fetch_add(1, Ordering::SeqCst) < refuse {
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                    } else {
                        let resp = http::Response::new(());
                        let _ = respond.send_response(resp, true);
                    }
                }
            });
        }
    });
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_http2_stream_is_retried_even_for_a_post() {
    let (addr, seen) = refusing_h2_backend(1).await;
    let proxy = TestProxy::start(&route(
        &[("b", 1.0, &format!("h2c://{addr}"))],
        "    retry: { attempts: 2, backoff_base: 1ms, backoff_max: 1ms }\n",
    ))
    .await;
    let r = post(&client(), &proxy.url(INFER), &[], "{}").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 2);
    let retried = metric(
        &proxy,
        r#"braid_retries_total{route="m",variant="b",outcome="retried"}"#,
    )
    .await;
    assert_eq!(retried, 1.0, "braid's policy made the retry");
    proxy.stop().await;
}
