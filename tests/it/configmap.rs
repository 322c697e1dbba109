//! `--config-map`: the proxy watching its ConfigMap through the (fake) API server, and
//! surviving what real API servers do: changes, bad documents, 410 Gone, restarts,
//! errors, deletion, and not being there at all at first.

use std::time::{Duration, Instant};

use crate::support::kube::FakeApi;
use crate::support::*;
use braid::config::ConfigSource;
use braid::config::kube::ConfigMapSource;

const NS: &str = "ml";
const NAME: &str = "braid";

fn weights(a: &Backend, b: &Backend, wa: f64, wb: f64) -> String {
    format!(
        "routes:\n  - path_prefix: /\n    variants:\n      - {{ name: a, weight: {wa}, backend: \"{}\" }}\n      - {{ name: b, weight: {wb}, backend: \"{}\" }}\n",
        a.url(),
        b.url()
    )
}

async fn proxy_on(api: &FakeApi) -> TestProxy {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("unused.yaml");
    let mut opts = options(&path);
    opts.config = ConfigSource::ConfigMap(ConfigMapSource {
        namespace: NS.into(),
        name: NAME.into(),
        key: "braid.yaml".into(),
        verdicts_key: braid::config::verdict::DEFAULT_KEY.into(),
        kubeconfig: Some(api.kubeconfig.clone()),
    });
    TestProxy::start_at(&path, opts).await
}

/// Polls until `f` holds, for at most `within`; returns how long it took.
async fn eventually(within: Duration, what: &str, mut f: impl AsyncFnMut() -> bool) -> Duration {
    let start = Instant::now();
    while start.elapsed() < within {
        if f().await {
            return start.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{what}: not within {within:?}");
}

/// Two backends, a fake API holding a ConfigMap that sends everything to `a`, and a
/// ready proxy watching it.
async fn ready_on_configmap() -> (Backend, Backend, FakeApi, TestProxy) {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let api = FakeApi::start().await;
    api.put_configmap(NS, NAME, &[("braid.yaml", &weights(&a, &b, 1.0, 0.0))]);
    let proxy = proxy_on(&api).await;
    wait_for_status(&client(), &proxy.admin_url("/readyz"), 200).await;
    (a, b, api, proxy)
}

async fn served_by(proxy: &TestProxy) -> String {
    let r = get(&client(), &proxy.url("/x"), &[]).await;
    if r.status != 200 {
        return format!("status {}", r.status);
    }
    r.variant().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_changed_in_the_configmap_are_in_force_within_a_second() {
    let (a, b, api, proxy) = ready_on_configmap().await;
    assert_eq!(served_by(&proxy).await, "a");
    api.put_configmap(NS, NAME, &[("braid.yaml", &weights(&a, &b, 0.0, 1.0))]);
    let took = eventually(Duration::from_secs(1), "new weights", async || {
        served_by(&proxy).await == "b"
    })
    .await;
    eprintln!("weights applied {took:?} after the update");
    let cfg = get(&client(), &proxy.admin_url("/config"), &[])
        .await
        .json();
    assert_eq!(cfg["source"], "configmap ml/braid key braid.yaml");
    // The watch asked only for this ConfigMap, by name.
    assert!(
        api.requests()
            .iter()
            .filter(|r| r.contains("/configmaps"))
            .all(|r| r.contains("fieldSelector=metadata.name%3Dbraid")),
        "{:?}",
        api.requests()
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_document_is_rejected_with_an_event_and_the_last_good_one_serves() {
    let (a, b, api, proxy) = ready_on_configmap().await;
    let bad = weights(&a, &b, 1.0, 0.0).replace("weight: 1", "weight: -1");
    api.put_configmap(NS, NAME, &[("braid.yaml", &bad)]);
    let rejected = r#"braid_config_reloads_total{source="configmap",result="rejected"}"#;
    eventually(Duration::from_secs(5), "rejection", async || {
        metric(&proxy, rejected).await == 1.0
    })
    .await;
    assert_eq!(served_by(&proxy).await, "a");
    let cfg = get(&client(), &proxy.admin_url("/config"), &[])
        .await
        .json();
    assert_eq!(cfg["generation"], 1);
    assert_eq!(
        cfg["last_rejected"]["errors"][0]["path"],
        "routes[0].variants[0].weight"
    );
    eventually(Duration::from_secs(5), "an Event", async || {
        api.events().iter().any(|e| {
            e["reason"] == "ConfigRejected"
                && e["note"]
                    .as_str()
                    .is_some_and(|n| n.contains("routes[0].variants[0].weight"))
                && e["regarding"]["name"] == NAME
        })
    })
    .await;
    // A key missing from the ConfigMap is rejected the same way.
    api.put_configmap(NS, NAME, &[("other.yaml", "x")]);
    eventually(Duration::from_secs(5), "missing key", async || {
        metric(&proxy, rejected).await == 2.0
    })
    .await;
    let cfg = get(&client(), &proxy.admin_url("/config"), &[])
        .await
        .json();
    assert_eq!(cfg["last_rejected"]["errors"][0]["path"], "data.braid.yaml");
    assert_eq!(served_by(&proxy).await, "a");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_410_gone_the_watch_relists_and_finds_the_current_state() {
    let (a, b, api, proxy) = ready_on_configmap().await;
    // The API server goes away; meanwhile the ConfigMap changes and history is
    // compacted, so the watcher's resourceVersion is too old when it comes back.
    api.stop().await;
    api.put_configmap(NS, NAME, &[("braid.yaml", &weights(&a, &b, 0.0, 1.0))]);
    api.compact();
    assert_eq!(
        served_by(&proxy).await,
        "a",
        "the last good config serves meanwhile"
    );
    api.restart().await;
    eventually(Duration::from_secs(15), "relist after 410", async || {
        served_by(&proxy).await == "b"
    })
    .await;
    assert!(
        api.gone() >= 1,
        "the watch never hit 410: {:?}",
        api.requests()
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_server_restart_keeps_the_config_and_the_watch_resumes() {
    let (a, b, api, proxy) = ready_on_configmap().await;
    api.stop().await;
    for _ in 0..20 {
        assert_eq!(served_by(&proxy).await, "a");
    }
    assert_eq!(
        get(&client(), &proxy.admin_url("/readyz"), &[])
            .await
            .status,
        200,
        "an unreachable API does not make a configured proxy unready"
    );
    api.restart().await;
    api.put_configmap(NS, NAME, &[("braid.yaml", &weights(&a, &b, 0.0, 1.0))]);
    eventually(Duration::from_secs(15), "watch resumed", async || {
        served_by(&proxy).await == "b"
    })
    .await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_from_the_api_are_retried_with_backoff_not_in_a_loop() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let api = FakeApi::start().await;
    api.put_configmap(NS, NAME, &[("braid.yaml", &weights(&a, &b, 1.0, 0.0))]);
    api.fail_next(&[500, 403, 503, 500]);
    let started = Instant::now();
    let proxy = proxy_on(&api).await;
    wait_for_status(&client(), &proxy.admin_url("/readyz"), 200).await;
    let lists = api
        .requests()
        .iter()
        .filter(|r| r.contains("/configmaps"))
        .count();
    assert!(lists >= 5, "every fault was retried: {:?}", api.requests());
    // Four failures in a row cost at least the first backoff steps, not a hot loop.
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "retried too fast: {:?}",
        started.elapsed()
    );
    assert_eq!(served_by(&proxy).await, "a");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_configmap_keeps_the_last_good_config_and_says_so() {
    let (a, b, api, proxy) = ready_on_configmap().await;
    api.delete_configmap(NS, NAME);
    eventually(Duration::from_secs(5), "deletion reported", async || {
        let cfg = get(&client(), &proxy.admin_url("/config"), &[])
            .await
            .json();
        cfg["last_rejected"]["errors"][0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("deleted"))
    })
    .await;
    assert_eq!(served_by(&proxy).await, "a");
    assert_eq!(
        get(&client(), &proxy.admin_url("/readyz"), &[])
            .await
            .status,
        200
    );
    // Recreated: picked up again.
    api.put_configmap(NS, NAME, &[("braid.yaml", &weights(&a, &b, 0.0, 1.0))]);
    eventually(Duration::from_secs(5), "recreated", async || {
        served_by(&proxy).await == "b"
    })
    .await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starting_before_the_api_is_reachable_is_unready_until_the_first_good_config() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let api = FakeApi::start().await;
    api.stop().await;
    let proxy = proxy_on(&api).await;
    let c = client();
    assert_eq!(get(&c, &proxy.admin_url("/readyz"), &[]).await.status, 503);
    let r = get(&c, &proxy.url("/x"), &[]).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.headers["retry-after"], "1");
    // Up, but the ConfigMap is invalid: still unready.
    api.put_configmap(NS, NAME, &[("braid.yaml", "routes: []\n")]);
    api.restart().await;
    let rejected = r#"braid_config_reloads_total{source="configmap",result="rejected"}"#;
    eventually(Duration::from_secs(15), "first document seen", async || {
        metric(&proxy, rejected).await >= 1.0
    })
    .await;
    assert_eq!(get(&c, &proxy.admin_url("/readyz"), &[]).await.status, 503);
    api.put_configmap(NS, NAME, &[("braid.yaml", &weights(&a, &b, 1.0, 0.0))]);
    wait_for_status(&c, &proxy.admin_url("/readyz"), 200).await;
    assert_eq!(served_by(&proxy).await, "a");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_watches_its_configmap_with_kubeconfig_credentials() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let api = FakeApi::start().await;
    api.put_configmap(NS, NAME, &[("config", &weights(&a, &b, 0.0, 1.0))]);
    let braid = BraidProcess::start_with(
        &["--config-map", "ml/braid", "--config-key", "config"],
        &[("KUBECONFIG", api.kubeconfig.as_path())],
    );
    let c = client();
    wait_for_status(&c, &format!("http://{}/readyz", braid.admin), 200).await;
    let r = get(&c, &format!("http://{}/x", braid.addr), &[]).await;
    assert_eq!(r.variant(), "b");
}
