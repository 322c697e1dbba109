//! Routing through real sockets: weighted split, override, sticky assignment across
//! instances, restarts and weight changes, model-name rewriting, h2c in and out.

use std::collections::HashMap;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_of_10000_requests_is_within_the_binomial_bound() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let proxy = TestProxy::start(&ab_config(&a.url(), &b.url(), 90.0, 10.0)).await;
    let c = client();
    let n = 10_000usize;
    let mut tasks = Vec::new();
    for w in 0..16 {
        let (c, url) = (c.clone(), proxy.url("/v2/models/sentiment/infer"));
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in (w..n).step_by(16) {
                let r = post(&c, &url, &[], "{}").await;
                assert_eq!(r.status, 200);
                seen.push(r.variant().to_string());
            }
            seen
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let counts = tally(all.iter().map(String::as_str));
    let candidate = counts.get("candidate").copied().unwrap_or(0) as f64;
    // 99.9% two-sided bound: z = 3.29, sd = sqrt(n p (1-p)) = 30.
    let (mean, sd) = (1000.0, (n as f64 * 0.1 * 0.9f64).sqrt());
    assert!(
        (candidate - mean).abs() <= 3.29 * sd,
        "candidate got {candidate} of {n}"
    );
    assert_eq!(counts.len(), 2, "{counts:?}");
    assert_eq!(a.hits() + b.hits(), n);
    proxy.stop().await;
}

#[tokio::test]
async fn model_name_is_rewritten_to_the_variants_target_model() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let proxy = TestProxy::start(&ab_config(&a.url(), &b.url(), 1.0, 1.0)).await;
    let c = client();
    let r = post(
        &c,
        &proxy.url("/v2/models/sentiment/infer?x=1"),
        &[("x-braid-variant", "candidate")],
        "{}",
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.variant(), "candidate");
    let j = r.json();
    assert_eq!(j["backend"], "b");
    assert_eq!(j["path"], "/v2/models/sentiment-b/infer?x=1");
    assert_eq!(j["host"], b.addr.to_string());
    assert_eq!(j["x_forwarded_for"], "127.0.0.1");
    let r = post(
        &c,
        &proxy.url("/v1/models/sentiment:predict"),
        &[("x-braid-variant", "control")],
        "{}",
    )
    .await;
    assert_eq!(r.json()["path"], "/v1/models/sentiment-a:predict");
    // A body that repeats the path's model (KServe's client does) follows the path,
    // with a Content-Length that fits; one naming another model is left as sent.
    let body = r#"{"model_name":"sentiment","inputs":[]}"#;
    let pinned = [("x-braid-variant", "candidate")];
    let url = proxy.url("/v2/models/sentiment/infer");
    let j = post(&c, &url, &pinned, body).await.json();
    assert_eq!(j["body"], r#"{"model_name":"sentiment-b","inputs":[]}"#);
    assert_eq!(j["body_len"], body.len() + 2);
    let other = r#"{"model_name":"other","inputs":[]}"#;
    assert_eq!(post(&c, &url, &pinned, other).await.json()["body"], other);
    // In Triton's binary form the JSON header's length follows the rewrite.
    let header = r#"{"model_name":"sentiment","inputs":[{"name":"t","datatype":"BYTES","shape":[1],"parameters":{"binary_data_size":5}}]}"#;
    let binary = format!("{header}\u{1}\0\0\0x");
    let len = header.len().to_string();
    let with_len = [
        ("x-braid-variant", "candidate"),
        ("inference-header-content-length", len.as_str()),
    ];
    let j = post(&c, &url, &with_len, &binary).await.json();
    assert!(
        j["body"]
            .as_str()
            .unwrap()
            .starts_with(r#"{"model_name":"sentiment-b","#),
        "{j}"
    );
    assert_eq!(j["body_len"], binary.len() + 2);
    assert_eq!(j["header_len"], (header.len() + 2).to_string());
    // A path-prefix route forwards the path unchanged.
    let r = get(&c, &proxy.url("/anything/else"), &[]).await;
    assert_eq!(r.variant(), "default");
    assert_eq!(r.json()["path"], "/anything/else");
    proxy.stop().await;
}

#[tokio::test]
async fn override_pins_a_variant_and_an_unknown_name_is_a_400_listing_the_valid_ones() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    // Candidate at weight 0: only reachable by override.
    let proxy = TestProxy::start(&ab_config(&a.url(), &b.url(), 1.0, 0.0)).await;
    let c = client();
    for _ in 0..20 {
        let r = post(
            &c,
            &proxy.url("/v2/models/sentiment/infer"),
            &[("x-braid-variant", "candidate")],
            "{}",
        )
        .await;
        assert_eq!((r.status.as_u16(), r.variant()), (200, "candidate"));
        let r = post(&c, &proxy.url("/v2/models/sentiment/infer"), &[], "{}").await;
        assert_eq!(r.variant(), "control");
    }
    let r = post(
        &c,
        &proxy.url("/v2/models/sentiment/infer"),
        &[("x-braid-variant", "nope")],
        "{}",
    )
    .await;
    assert_eq!(r.status, 400);
    let msg = r.json()["error"].as_str().unwrap().to_string();
    assert!(
        msg.contains("nope") && msg.contains("control, candidate"),
        "{msg}"
    );
    assert_eq!(b.hits(), 20);
    proxy.stop().await;
}

#[tokio::test]
async fn unknown_model_is_a_404_json_when_no_prefix_route_catches_it() {
    let a = Backend::start("a").await;
    let cfg = format!(
        "routes:\n  - model: sentiment\n    variants: [{{ name: only, backend: \"{}\" }}]\n",
        a.url()
    );
    let proxy = TestProxy::start(&cfg).await;
    let r = post(&client(), &proxy.url("/v2/models/other/infer"), &[], "{}").await;
    assert_json_error(&r, 404, "/v2/models/other/infer");
    assert_eq!(a.hits(), 0);
    proxy.stop().await;
}

async fn sticky_assignments(proxy: &TestProxy, keys: &[String]) -> HashMap<String, String> {
    let c = client();
    let mut out = HashMap::new();
    for k in keys {
        let r = post(
            &c,
            &proxy.url("/v2/models/sentiment/infer"),
            &[("x-user-id", k)],
            "{}",
        )
        .await;
        assert_eq!(r.status, 200);
        out.insert(k.clone(), r.variant().to_string());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_keys_agree_across_instances_and_restarts() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let cfg = ab_config(&a.url(), &b.url(), 50.0, 50.0);
    let keys: Vec<String> = (0..300).map(|i| format!("user-{i}")).collect();
    let one = TestProxy::start(&cfg).await;
    let two = TestProxy::start(&cfg).await;
    let first = sticky_assignments(&one, &keys).await;
    // Asked twice, the same instance answers the same.
    assert_eq!(first, sticky_assignments(&one, &keys).await);
    // A second replica agrees on every key.
    assert_eq!(first, sticky_assignments(&two, &keys).await);
    one.stop().await;
    // A restarted replica agrees too.
    let three = TestProxy::start(&cfg).await;
    assert_eq!(first, sticky_assignments(&three, &keys).await);
    let counts = tally(first.values().map(String::as_str));
    assert!(
        counts["control"] > 100 && counts["candidate"] > 100,
        "{counts:?}"
    );
    two.stop().await;
    three.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raising_the_candidate_from_10_to_20_moves_only_keys_into_the_candidate() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let proxy = TestProxy::start(&ab_config(&a.url(), &b.url(), 90.0, 10.0)).await;
    let keys: Vec<String> = (0..2000).map(|i| format!("user-{i}")).collect();
    let before = sticky_assignments(&proxy, &keys).await;
    // The weights change through the file, without a restart.
    proxy
        .reload(&ab_config(&a.url(), &b.url(), 90.0, 20.0))
        .await;
    let after = sticky_assignments(&proxy, &keys).await;
    let moved: Vec<&String> = keys.iter().filter(|k| before[*k] != after[*k]).collect();
    for k in &moved {
        assert_eq!(
            (before[*k].as_str(), after[*k].as_str()),
            ("control", "candidate"),
            "{k}"
        );
    }
    // Candidate share goes from 10/100 to 20/110: about 8% of keys move.
    let share = moved.len() as f64 / keys.len() as f64;
    assert!((0.05..0.11).contains(&share), "moved {share}");
    proxy.stop().await;
}

#[tokio::test]
async fn h2c_clients_and_h2c_backends() {
    let h2_backend = Backend::start_with(
        "h2",
        BackendBehaviour {
            h2_only: true,
            ..Default::default()
        },
    )
    .await;
    let cfg = format!(
        "routes:\n  - path_prefix: /\n    variants: [{{ name: h2, backend: \"h2c://{}\" }}]\n",
        h2_backend.addr
    );
    let proxy = TestProxy::start(&cfg).await;
    // HTTP/2 prior knowledge in, HTTP/2 out.
    let r = get(&h2_client(), &proxy.url("/x"), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["version"], "HTTP/2.0");
    assert_eq!(r.variant(), "h2");
    // HTTP/1.1 in, HTTP/2 out, on the same port.
    let r = get(&client(), &proxy.url("/y"), &[]).await;
    assert_eq!(r.json()["version"], "HTTP/2.0");
    proxy.stop().await;
}
