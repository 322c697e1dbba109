//! Hot reload through the file source: the kubelet's symlink swap, rejected documents
//! that leave the last good config serving, and reloads under load.

use std::os::unix::fs::symlink;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::support::*;

/// Lays out a directory the way the kubelet mounts a ConfigMap, or swaps its content
/// the way the kubelet updates one: a new timestamped directory, then an atomic rename
/// of the `..data` symlink.
fn kubelet_write(dir: &Path, version: u32, text: &str) {
    let ts = dir.join(format!("..2026_11_28_{version:02}"));
    std::fs::create_dir(&ts).unwrap();
    std::fs::write(ts.join("braid.yaml"), text).unwrap();
    let tmp = dir.join("..data_tmp");
    symlink(ts.file_name().unwrap(), &tmp).unwrap();
    let old = std::fs::read_link(dir.join("..data")).ok();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    if let Some(old) = old {
        std::fs::remove_dir_all(dir.join(old)).unwrap();
    }
    let user_file = dir.join("braid.yaml");
    if std::fs::symlink_metadata(&user_file).is_err() {
        symlink("..data/braid.yaml", &user_file).unwrap();
    }
}

#[tokio::test]
async fn configmap_volume_symlink_swap_is_picked_up() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let dir = tempfile::tempdir().unwrap();
    kubelet_write(dir.path(), 1, &ab_config(&a.url(), &b.url(), 1.0, 0.0));
    let path = dir.path().join("braid.yaml");
    let proxy = TestProxy::start_at(&path, options(&path)).await;
    let c = client();
    let r = post(&c, &proxy.url("/v2/models/sentiment/infer"), &[], "{}").await;
    assert_eq!(r.variant(), "control");

    kubelet_write(dir.path(), 2, &ab_config(&a.url(), &b.url(), 0.0, 1.0));
    proxy.wait_for_generation(2).await;
    let r = post(&c, &proxy.url("/v2/models/sentiment/infer"), &[], "{}").await;
    assert_eq!(r.variant(), "candidate");

    // And again: the watch survives the old target directory being deleted.
    kubelet_write(dir.path(), 3, &ab_config(&a.url(), &b.url(), 1.0, 0.0));
    proxy.wait_for_generation(3).await;
    let r = post(&c, &proxy.url("/v2/models/sentiment/infer"), &[], "{}").await;
    assert_eq!(r.variant(), "control");
    proxy.stop().await;
}

#[tokio::test]
async fn a_bad_document_is_rejected_whole_and_the_last_good_one_keeps_serving() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let proxy = TestProxy::start(&ab_config(&a.url(), &b.url(), 1.0, 0.0)).await;
    let c = client();
    // Valid YAML, one bad field among good changes: nothing of it may apply.
    let bad = ab_config(&a.url(), &b.url(), 0.0, 1.0).replace("timeout: 5s", "timeout: soon");
    write_atomically(&proxy.config_path, &bad);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let cfg = loop {
        let r = get(&c, &proxy.admin_url("/config"), &[]).await;
        let j = r.json();
        if !j["last_rejected"].is_null() {
            break j;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "rejection never reported"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    assert_eq!(cfg["generation"], 1);
    let err = &cfg["last_rejected"]["errors"][0];
    assert_eq!(err["path"], "routes[0].timeout");
    assert!(
        err["message"].as_str().unwrap().contains("not a duration"),
        "{err}"
    );
    let r = post(&c, &proxy.url("/v2/models/sentiment/infer"), &[], "{}").await;
    assert_eq!((r.status.as_u16(), r.variant()), (200, "control"));

    let metrics = get(&c, &proxy.admin_url("/metrics"), &[]).await.text();
    assert!(
        metrics.contains(r#"braid_config_reloads_total{source="file",result="rejected"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains("braid_config_generation 1"), "{metrics}");

    // A YAML bomb is rejected the same way.
    let bomb = "a: &a [x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]\ng: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]\n";
    write_atomically(&proxy.config_path, bomb);
    loop {
        let m = get(&c, &proxy.admin_url("/metrics"), &[]).await.text();
        if m.contains(r#"result="rejected"} 2"#) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline + std::time::Duration::from_secs(10));
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(proxy.generation(), 1);

    // A good document afterwards is accepted and clears the rejection.
    proxy.reload(&ab_config(&a.url(), &b.url(), 0.0, 1.0)).await;
    let j = get(&c, &proxy.admin_url("/config"), &[]).await.json();
    assert!(j["last_rejected"].is_null());
    assert_eq!(j["generation"], 2);
    let r = post(&c, &proxy.url("/v2/models/sentiment/infer"), &[], "{}").await;
    assert_eq!(r.variant(), "candidate");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_hundred_reloads_under_concurrent_load_fail_no_request() {
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let proxy = TestProxy::start(&ab_config(&a.url(), &b.url(), 50.0, 50.0)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut load = Vec::new();
    for i in 0..8 {
        let (c, url) = (client(), proxy.url("/v2/models/sentiment/infer"));
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        load.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let key = format!("u{i}-{n}");
                let r = post(&c, &url, &[("x-user-id", &key)], "{}").await;
                let expected_backend = if r.variant() == "control" { "a" } else { "b" };
                if r.status == 200 && r.json()["backend"] == expected_backend {
                    ok.fetch_add(1, Ordering::SeqCst);
                } else {
                    failed.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }
    for i in 0..100u32 {
        let w = (i % 10) as f64;
        proxy
            .reload(&ab_config(&a.url(), &b.url(), 10.0 - w, w + 1.0))
            .await;
    }
    stop.store(true, Ordering::SeqCst);
    for t in load {
        t.await.unwrap();
    }
    assert_eq!(proxy.generation(), 101);
    assert_eq!(failed.load(Ordering::SeqCst), 0);
    assert!(
        ok.load(Ordering::SeqCst) > 100,
        "load too light to mean anything"
    );
    proxy.stop().await;
}
