//! The admin port: metrics with route/variant/code labels, health, readiness, config.

use crate::support::*;

#[tokio::test]
async fn metrics_health_readiness_and_config() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let proxy = TestProxy::start(&ab_config(&a.url(), &b.url(), 1.0, 1.0)).await;
    let c = client();
    for _ in 0..3 {
        post(
            &c,
            &proxy.url("/v2/models/sentiment/infer"),
            &[("x-braid-variant", "candidate")],
            "{}",
        )
        .await;
    }
    post(
        &c,
        &proxy.url("/v2/models/sentiment/infer"),
        &[("x-braid-variant", "zzz")],
        "{}",
    )
    .await;

    let m = get(&c, &proxy.admin_url("/metrics"), &[]).await;
    assert_eq!(m.status, 200);
    assert!(
        m.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let text = m.text();
    assert!(
        text.contains(
            r#"braid_requests_total{route="sentiment",variant="candidate",code="200"} 3"#
        ),
        "{text}"
    );
    assert!(text.contains(r#"braid_request_duration_seconds_bucket{le="0.0001",route="sentiment",variant="candidate"}"#), "{text}");
    assert!(text.contains(r#"braid_request_duration_seconds_bucket{le="30.0",route="sentiment",variant="candidate"} 3"#), "{text}");
    assert!(
        text.contains(
            r#"braid_request_duration_seconds_count{route="sentiment",variant="candidate"} 3"#
        ),
        "{text}"
    );
    assert!(
        text.contains(r#"braid_unrouted_requests_total{reason="unknown_variant"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"braid_config_reloads_total{source="file",result="accepted"} 1"#),
        "{text}"
    );
    // Label values come from config only: the bad override value never appears.
    assert!(!text.contains("zzz"));
    // Prometheus text 0.0.4: metadata names the samples' name, and promtool agrees.
    assert!(
        text.contains("# TYPE braid_requests_total counter\n"),
        "{text}"
    );
    assert!(!text.contains("# EOF"), "{text}");
    promtool_check(&text);
    let om = get(
        &c,
        &proxy.admin_url("/metrics"),
        &[("accept", "application/openmetrics-text; version=1.0.0")],
    )
    .await;
    assert!(
        om.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    assert!(om.text().ends_with("# EOF\n"));

    assert_eq!(get(&c, &proxy.admin_url("/healthz"), &[]).await.status, 200);
    assert_eq!(get(&c, &proxy.admin_url("/readyz"), &[]).await.status, 200);
    let cfg = get(&c, &proxy.admin_url("/config"), &[]).await.json();
    assert_eq!(cfg["generation"], 1);
    assert!(cfg["source"].as_str().unwrap().starts_with("file:"));
    assert_eq!(cfg["config"]["routes"][0]["model"], "sentiment");
    assert!(cfg["last_rejected"].is_null());

    let r = get(&c, &proxy.admin_url("/nope"), &[]).await;
    assert_json_error(&r, 404, "");
    let r = post(&c, &proxy.admin_url("/config"), &[], "").await;
    assert_eq!(r.status, 405);
    proxy.stop().await;
}

#[tokio::test]
async fn readiness_waits_for_the_local_executor() {
    let dead = dead_addr().await;
    let cfg = |exec: &str| {
        format!(
            "executor: http://{exec}\nroutes:\n  - path_prefix: /\n    variants: [{{ name: only, backend: local }}]\n"
        )
    };
    let proxy = TestProxy::start(&cfg(&dead.to_string())).await;
    let c = client();
    wait_for_status(&c, &proxy.admin_url("/readyz"), 503).await;
    let r = get(&c, &proxy.admin_url("/readyz"), &[]).await;
    assert!(
        r.json()["status"].as_str().unwrap().contains("unreachable"),
        "{}",
        r.text()
    );
    // Point the config at a live executor: readiness follows.
    let ex = TestExecutor::start(|dir| vec![tiny_spec(dir, "tiny", &[])]).await;
    proxy.reload(&cfg(&ex.addr.to_string())).await;
    wait_for_status(&c, &proxy.admin_url("/readyz"), 200).await;
    proxy.stop().await;
}
