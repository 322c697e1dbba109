//! The fake API server in `tests/support/kube.rs` is only worth something if it speaks
//! the dialect real clients speak. This drives it with the real `kubectl`: apply
//! (create, then patch), get, watch, delete.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::kube::{FakeApi, kubectl};

fn manifest(value: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: braid-config\n  namespace: default\ndata:\n  braid.yaml: |\n    {value}\n"
    )
}

async fn run(api: &FakeApi, args: &[&str]) -> (bool, String) {
    let (cfg, args): (_, Vec<String>) = (
        api.kubeconfig.clone(),
        args.iter().map(|s| s.to_string()).collect(),
    );
    let out = tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        kubectl(&cfg, &refs)
    })
    .await
    .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_applies_gets_watches_and_deletes_against_the_fake() {
    let api = FakeApi::start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cm.yaml");

    std::fs::write(&file, manifest("first")).unwrap();
    let (ok, out) = run(
        &api,
        &["apply", "--validate=false", "-f", file.to_str().unwrap()],
    )
    .await;
    assert!(ok, "{out}");
    assert!(out.contains("configmap/braid-config created"), "{out}");
    let cm = api.configmap("default", "braid-config").unwrap();
    assert_eq!(cm["data"]["braid.yaml"], "first\n");

    let (ok, out) = run(&api, &["get", "configmap", "braid-config", "-o", "json"]).await;
    assert!(ok, "{out}");
    let got: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(got["data"]["braid.yaml"], "first\n");
    assert_eq!(
        got["metadata"]["resourceVersion"],
        cm["metadata"]["resourceVersion"]
    );

    // A watch sees a change made behind its back.
    let mut child = Command::new("kubectl")
        .env("KUBECONFIG", &api.kubeconfig)
        .args([
            "get",
            "configmap",
            "braid-config",
            "-w",
            "-o",
            "jsonpath={.data.braid\\.yaml}{\"|\\n\"}",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let first = tokio::task::spawn_blocking({
        let rx_wait = Duration::from_secs(20);
        move || {
            let mut seen = Vec::new();
            while let Ok(l) = rx.recv_timeout(rx_wait) {
                seen.push(l);
                if seen.iter().any(|l| l.contains("first")) {
                    break;
                }
            }
            (seen, rx)
        }
    })
    .await
    .unwrap();
    let (seen, rx) = first;
    assert!(seen.iter().any(|l| l.contains("first")), "{seen:?}");
    // kubectl prints the object it got, then starts watching: change it once the watch
    // is established, so the event is the watch's to deliver.
    for _ in 0..2000 {
        if api.watches() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        api.watches() > 0,
        "kubectl never watched: {:?}",
        api.requests()
    );
    api.put_configmap("default", "braid-config", &[("braid.yaml", "second\n")]);
    let seen = tokio::task::spawn_blocking(move || {
        let mut seen = Vec::new();
        while let Ok(l) = rx.recv_timeout(Duration::from_secs(20)) {
            seen.push(l);
            if seen.iter().any(|l| l.contains("second")) {
                break;
            }
        }
        seen
    })
    .await
    .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        seen.iter().any(|l| l.contains("second")),
        "watch missed the change: {seen:?}\n{:#?}",
        api.requests()
    );

    // Apply again: kubectl patches the existing object.
    std::fs::write(&file, manifest("third")).unwrap();
    let (ok, out) = run(
        &api,
        &["apply", "--validate=false", "-f", file.to_str().unwrap()],
    )
    .await;
    assert!(ok, "{out}");
    assert!(out.contains("configmap/braid-config configured"), "{out}");
    assert_eq!(
        api.configmap("default", "braid-config").unwrap()["data"]["braid.yaml"],
        "third\n"
    );
    assert!(api.requests().iter().any(|r| r.starts_with("PATCH ")));

    let (ok, out) = run(&api, &["delete", "configmap", "braid-config"]).await;
    assert!(ok, "{out}");
    assert!(api.configmap("default", "braid-config").is_none());
    let (ok, out) = run(&api, &["get", "configmap", "braid-config"]).await;
    assert!(!ok);
    assert!(
        out.contains("NotFound") || out.contains("not found"),
        "{out}"
    );
}
