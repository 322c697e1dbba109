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

#[tokio::test]
async fn credentials_in_urls_are_refused_at_load_and_never_shown() {
    let a = Backend::start("a").await;
    // A payload sink whose query carries a key: allowed, and redacted on /config.
    let good = format!(
        "routes:\n  - path_prefix: /\n    variants: [{{ name: only, backend: \"{}\" }}]\n    log: {{ fraction: 0, sink: \"http://127.0.0.1:9/ingest?api_key=s3cret\" }}\n",
        a.url()
    );
    let proxy = TestProxy::start(&good).await;
    let c = client();
    let cfg = get(&c, &proxy.admin_url("/config"), &[]).await;
    assert!(!cfg.text().contains("s3cret"), "{}", cfg.text());
    assert_eq!(
        cfg.json()["config"]["routes"][0]["log"]["sink"],
        "http://127.0.0.1:9/ingest?<redacted>"
    );
    // Userinfo in a backend, the executor or a sink: the document is refused whole,
    // with the field path, and the credential is not echoed.
    let port = a.url().rsplit(':').next().unwrap().to_string();
    for (bad, path) in [
        (
            format!(
                "routes:\n  - path_prefix: /\n    variants: [{{ name: only, backend: \"http://user:hunter2@127.0.0.1:{port}\" }}]\n"
            ),
            "routes[0].variants[0].backend",
        ),
        (
            format!(
                "executor: \"http://user:hunter2@127.0.0.1:{port}\"\nroutes:\n  - path_prefix: /\n    variants: [{{ name: only, backend: local }}]\n"
            ),
            "executor",
        ),
        (
            format!(
                "routes:\n  - path_prefix: /\n    variants: [{{ name: only, backend: \"{}\" }}]\n    log: {{ fraction: 1, sink: \"http://u:hunter2@127.0.0.1:9/x\" }}\n",
                a.url()
            ),
            "routes[0].log.sink",
        ),
    ] {
        let (code, out) = {
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("c.yaml");
            std::fs::write(&file, &bad).unwrap();
            let out = braid(&["check", file.to_str().unwrap()], b"");
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
            )
        };
        assert_eq!(code, Some(1), "{out}");
        assert!(out.contains(path) && out.contains("credentials"), "{out}");
        assert!(!out.contains("hunter2"), "{out}");
        write_atomically(&proxy.config_path, &bad);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        let cfg = loop {
            let j = get(&c, &proxy.admin_url("/config"), &[]).await;
            let shown = j.text();
            let v = j.json();
            if v["last_rejected"]["errors"][0]["path"] == path {
                break shown;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{path} never rejected: {shown}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        };
        assert!(!cfg.contains("hunter2"), "{cfg}");
        assert_eq!(proxy.generation(), 1);
        // The last good document keeps serving.
        let r = get(&c, &proxy.url("/anything"), &[]).await;
        assert_eq!((r.status.as_u16(), r.variant()), (200, "only"));
    }
    proxy.stop().await;
}
