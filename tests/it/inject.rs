//! `braid inject` golden tests (the README's Deployment, every workload kind, a List,
//! the manifests in `deploy/`), idempotence, the CLI through stdin and files, and the
//! webhook: AdmissionReview fixtures shaped like the Kubernetes documentation's,
//! in-process and over real TLS, with the patch applied by an independent JSONPatch
//! implementation.
//!
//! `BRAID_BLESS=1 cargo test --test inject` rewrites the expected files.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::BraidProcess;

use braid::inject::webhook::{WebhookOptions, review};
use braid::inject::{Options, inject_yaml, read_yaml};
use serde_json::{Value, json};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn opts() -> Options {
    Options {
        image: "ghcr.io/braid-dev/braid:test".into(),
        ..Options::default()
    }
}

/// Injects `input` and compares with `expected` (or writes it when blessing).
fn golden(input: &Path, expected: &Path) {
    let text = std::fs::read_to_string(input).unwrap();
    let (out, _) = inject_yaml(&text, &opts()).unwrap();
    if std::env::var_os("BRAID_BLESS").is_some() {
        std::fs::create_dir_all(expected.parent().unwrap()).unwrap();
        std::fs::write(expected, &out).unwrap();
    }
    let want = std::fs::read_to_string(expected)
        .unwrap_or_else(|e| panic!("{}: {e} (run with BRAID_BLESS=1)", expected.display()));
    assert_eq!(
        out,
        want,
        "{} differs from {}",
        input.display(),
        expected.display()
    );
    // Injecting twice equals injecting once.
    let (again, report) = inject_yaml(&out, &opts()).unwrap();
    assert_eq!(again, out, "{}: not idempotent", input.display());
    assert!(
        report.iter().all(|l| !l.ends_with(": injected")),
        "{report:?}"
    );
    // Everything that was there is still there: the input is a subset of the output,
    // apart from the renamed port and rewritten probes.
    let (before, after) = (read_yaml(&text).unwrap(), read_yaml(&out).unwrap());
    assert_eq!(before.len(), after.len());
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(b["kind"], a["kind"]);
        assert_eq!(b["metadata"]["name"], a["metadata"]["name"]);
        assert_eq!(b["spec"]["replicas"], a["spec"]["replicas"]);
    }
}

#[test]
fn every_golden_input_injects_as_expected() {
    let dir = root().join("tests/golden/inject");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if name.ends_with(".yaml") && !name.ends_with(".injected.yaml") {
            golden(&path, &dir.join(name.replace(".yaml", ".injected.yaml")));
            seen += 1;
        }
    }
    assert!(seen >= 3);
}

#[test]
fn the_manifests_in_deploy_inject_as_expected() {
    let out = root().join("tests/golden/deploy");
    for (path, golden_name) in [
        ("deploy/example/model.yaml", "model.injected.yaml"),
        ("deploy/webhook/deployment.yaml", "webhook.injected.yaml"),
    ] {
        golden(&root().join(path), &out.join(golden_name));
    }
}

#[test]
fn the_kubernetes_guide_shows_the_tested_deployment() {
    let readme = std::fs::read_to_string(root().join("docs/kubernetes.md")).unwrap();
    let example = std::fs::read_to_string(root().join("tests/golden/inject/readme.yaml")).unwrap();
    assert!(
        readme.contains(&example),
        "docs/kubernetes.md's example must be tests/golden/inject/readme.yaml verbatim"
    );
}

#[test]
fn what_injection_does_to_a_pod_template() {
    let text = std::fs::read_to_string(root().join("tests/golden/inject/workloads.yaml")).unwrap();
    let (out, report) = inject_yaml(&text, &opts()).unwrap();
    let docs = read_yaml(&out).unwrap();
    // Pod: the named port is taken over, the probe that used the name gets the number.
    let pod = &docs[0];
    let model = &pod["spec"]["containers"][0];
    assert_eq!(
        model["ports"][0],
        json!({"name": "braid-upstream", "containerPort": 9000})
    );
    assert_eq!(model["livenessProbe"]["tcpSocket"]["port"], 9000);
    let braid = &pod["spec"]["initContainers"][0];
    assert_eq!(braid["name"], "braid");
    assert_eq!(braid["restartPolicy"], "Always");
    assert_eq!(
        braid["ports"][0],
        json!({"name": "http", "containerPort": 8180})
    );
    assert_eq!(
        braid["readinessProbe"]["httpGet"],
        json!({"path": "/readyz", "port": 9901})
    );
    assert_eq!(
        pod["spec"]["volumes"][0]["configMap"]["name"],
        "shared-braid"
    );
    // StatefulSet: another port name, config through the API, braid first among inits.
    let sts = &docs[1]["spec"]["template"]["spec"];
    assert_eq!(sts["initContainers"][0]["name"], "braid");
    assert_eq!(sts["initContainers"][1]["name"], "fetch-model");
    let args: Vec<&str> = sts["initContainers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(
        args.windows(2)
            .any(|w| w == ["--config-map", "$(POD_NAMESPACE)/ranker-braid"]),
        "{args:?}"
    );
    assert!(sts.get("volumes").is_none());
    assert_eq!(sts["initContainers"][0]["ports"][0]["name"], "grpc-web");
    // DaemonSet opted out: unchanged.
    assert!(
        docs[2]["spec"]["template"]["spec"]
            .get("initContainers")
            .is_none()
    );
    // Job without a named port: injected, with a warning.
    assert_eq!(
        docs[3]["spec"]["template"]["spec"]["initContainers"][0]["name"],
        "braid"
    );
    assert!(
        report
            .iter()
            .any(|l| l.starts_with("Job/backfill: no container port named")),
        "{report:?}"
    );
    // CronJob: through jobTemplate.
    assert_eq!(
        docs[4]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["initContainers"][0]["name"],
        "braid"
    );
    // Other kinds and their strings are untouched.
    assert_eq!(docs[5]["data"], json!({"key": "no", "other": "0755"}));
    // The plain-container mode.
    let plain = Options {
        native_sidecar: false,
        ..opts()
    };
    let (out, _) = inject_yaml(&text, &plain).unwrap();
    let docs = read_yaml(&out).unwrap();
    let containers = docs[0]["spec"]["containers"].as_array().unwrap();
    assert_eq!(containers.last().unwrap()["name"], "braid");
    assert!(containers.last().unwrap().get("restartPolicy").is_none());
}

/// Runs `braid inject ARGS` with `input` on standard input.
fn inject_stdin(args: &[&str], input: &[u8]) -> std::process::Output {
    let mut all = vec!["inject"];
    all.extend_from_slice(args);
    crate::support::braid(&all, input)
}

#[test]
fn the_cli_reads_files_and_stdin_and_reports_bad_yaml() {
    let input = root().join("tests/golden/inject/readme.yaml");
    let from_file = inject_stdin(
        &[
            "--image",
            "ghcr.io/braid-dev/braid:test",
            "-f",
            input.to_str().unwrap(),
        ],
        b"",
    );
    assert!(from_file.status.success());
    let expected =
        std::fs::read_to_string(root().join("tests/golden/inject/readme.injected.yaml")).unwrap();
    assert_eq!(String::from_utf8_lossy(&from_file.stdout), expected);
    assert!(String::from_utf8_lossy(&from_file.stderr).contains("Deployment/sentiment: injected"));

    let out = inject_stdin(
        &["--image", "ghcr.io/braid-dev/braid:test"],
        &std::fs::read(&input).unwrap(),
    );
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), expected);

    let out = inject_stdin(&[], b"kind: [unclosed\n");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("braid inject:"));
}

// === webhook ===

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(root().join("tests/fixtures/admission").join(name)).unwrap()
}

fn webhook_opts() -> WebhookOptions {
    WebhookOptions {
        inject: opts(),
        skip_namespaces: vec!["kube-system".into(), "braid-system".into()],
    }
}

/// Applies the review's patch to its pod with an independent JSONPatch implementation.
fn patched(request: &[u8], response: &Value) -> Value {
    use base64::Engine;
    let req: Value = serde_json::from_slice(request).unwrap();
    let mut pod = req["request"]["object"].clone();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(response["response"]["patch"].as_str().unwrap())
        .unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
    json_patch::patch(&mut pod, &patch).unwrap();
    pod
}

#[test]
fn a_pod_create_review_gets_a_patch_that_injects_the_sidecar() {
    let request = fixture("pod-create.json");
    let resp = review(&request, &webhook_opts()).unwrap();
    assert_eq!(resp["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(resp["kind"], "AdmissionReview");
    assert_eq!(
        resp["response"]["uid"],
        "705ab4f5-6393-11e8-b7cc-42010a800002"
    );
    assert_eq!(resp["response"]["allowed"], true);
    assert_eq!(resp["response"]["patchType"], "JSONPatch");
    let pod = patched(&request, &resp);
    assert_eq!(pod["spec"]["initContainers"][0]["name"], "braid");
    assert_eq!(
        pod["spec"]["containers"][0]["ports"][0]["name"],
        "braid-upstream"
    );
    // The patched pod is kept as a golden file; CI validates it against the schemas.
    let golden = root().join("tests/golden/webhook/pod-create.patched.json");
    let text = serde_json::to_string_pretty(&pod).unwrap() + "\n";
    if std::env::var_os("BRAID_BLESS").is_some() {
        std::fs::create_dir_all(golden.parent().unwrap()).unwrap();
        std::fs::write(&golden, &text).unwrap();
    }
    assert_eq!(std::fs::read_to_string(&golden).unwrap(), text);
    // Same result as the CLI's code on the same pod.
    let mut direct: Value =
        serde_json::from_slice::<Value>(&request).unwrap()["request"]["object"].clone();
    braid::inject::inject_template(&mut direct, "sentiment-braid", &opts());
    assert_eq!(pod, direct);
    // Reinvocation: reviewing the patched pod changes nothing.
    let mut again: Value = serde_json::from_slice(&request).unwrap();
    again["request"]["object"] = pod;
    let resp = review(again.to_string().as_bytes(), &webhook_opts()).unwrap();
    assert!(resp["response"].get("patch").is_none(), "{resp}");
}

#[test]
fn reviews_that_must_not_be_patched_are_admitted_unchanged() {
    for name in [
        "pod-kube-system.json",
        "pod-update.json",
        "pod-opted-out.json",
        "deployment-create.json",
    ] {
        let resp = review(&fixture(name), &webhook_opts()).unwrap();
        assert_eq!(resp["response"]["allowed"], true, "{name}");
        assert!(resp["response"].get("patch").is_none(), "{name}: {resp}");
    }
    // A review without its pod is admitted, with a warning.
    let mut v: Value = serde_json::from_slice(&fixture("pod-create.json")).unwrap();
    v["request"]["object"] = Value::Null;
    let resp = review(v.to_string().as_bytes(), &webhook_opts()).unwrap();
    assert_eq!(resp["response"]["allowed"], true);
    assert!(
        resp["response"]["warnings"][0]
            .as_str()
            .unwrap()
            .contains("braid")
    );
    // A pod whose fields have the wrong types is still admitted (patched or not).
    v["request"]["object"] =
        json!({"metadata": {"annotations": "x"}, "spec": {"containers": "nope"}});
    let resp = review(v.to_string().as_bytes(), &webhook_opts()).unwrap();
    assert_eq!(resp["response"]["allowed"], true);
}

#[test]
fn malformed_reviews_are_refused_with_a_reason() {
    for body in [
        &b"not json"[..],
        br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview","request":{"uid":"x"}}"#,
        br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{}}"#,
        br#"[]"#,
    ] {
        let err = review(body, &webhook_opts()).unwrap_err();
        assert!(!err.is_empty());
    }
}

type WebhookClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    http_body_util::Full<bytes::Bytes>,
>;

/// A self-signed certificate for localhost in `dir` (the webhook's), and a client
/// that trusts it.
fn webhook_tls(dir: &Path) -> (PathBuf, PathBuf, WebhookClient) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let tls = braid::upstream::tls::client_config(&braid::upstream::tls::UpstreamTls {
        ca_file: cert.clone(),
        cert_file: None,
        key_file: None,
        server_name: None,
    })
    .unwrap();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_all_versions()
        .build();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(connector);
    (cert, key, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_answers_over_tls() {
    use http_body_util::{BodyExt, Full};
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, client) = webhook_tls(dir.path());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let running = braid::inject::webhook::start(listener, webhook_opts(), &cert, &key).unwrap();
    let url = format!("https://localhost:{}/mutate", running.addr.port());
    let send = |body: Vec<u8>| {
        let req = http::Request::post(&url)
            .header("content-type", "application/json")
            .body(Full::new(bytes::Bytes::from(body)))
            .unwrap();
        client.request(req)
    };
    let resp = send(fixture("pod-create.json")).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    let pod = patched(&fixture("pod-create.json"), &body);
    assert_eq!(pod["spec"]["initContainers"][0]["name"], "braid");
    let resp = send(b"{\"kind\":1}".to_vec()).await.unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert!(body["error"].is_string());
    running.stop().await;
}

/// `pod-create.json` grown to `size` bytes by an annotation, as a large pod would be.
fn review_of_size(size: usize) -> Vec<u8> {
    let mut v: Value = serde_json::from_slice(&fixture("pod-create.json")).unwrap();
    let base = v.to_string().len();
    let pad = size.saturating_sub(base + 40);
    v["request"]["object"]["metadata"]["annotations"]["example.com/large"] = json!("x".repeat(pad));
    let out = v.to_string().into_bytes();
    assert!(out.len() <= size, "{} > {size}", out.len());
    out
}

/// The webhook binary under 20 concurrent reviews of the largest size it accepts: each
/// answered (200, or 429 with Retry-After once its concurrency cap is reached), larger
/// ones refused with 413, and its peak memory within the Deployment's 128Mi limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_stays_within_its_memory_limit_under_maximal_reviews() {
    use braid::inject::webhook::MAX_REVIEW_BYTES;
    use http_body_util::{BodyExt, Full};
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, client) = webhook_tls(dir.path());
    let (c, k) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let p = BraidProcess::spawn(
        &[
            "webhook",
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            c,
            "--tls-key",
            k,
        ],
        &[],
        &["addr="],
        Duration::from_secs(30),
    );
    let addr: std::net::SocketAddr = p.announced["addr="].parse().unwrap();
    let url = format!("https://localhost:{}/mutate", addr.port());
    let send = |body: bytes::Bytes| {
        let req = http::Request::post(&url)
            .header("content-type", "application/json")
            .body(Full::new(body))
            .unwrap();
        let client = client.clone();
        async move {
            let resp = client.request(req).await?;
            let status = resp.status().as_u16();
            let retry = resp.headers().contains_key("retry-after");
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            Ok::<_, hyper_util::client::legacy::Error>((status, retry, body))
        }
    };
    // Refused from its declared length, before its body is read: the client sees the
    // 413, or the connection closed under a body it was still writing.
    match send(review_of_size(MAX_REVIEW_BYTES + 1024 * 1024).into()).await {
        Ok((status, _, body)) => assert_eq!(status, 413, "{}", String::from_utf8_lossy(&body)),
        Err(e) => assert!(format!("{e:?}").contains("BodyWrite"), "{e:?}"),
    }
    let big = bytes::Bytes::from(review_of_size(MAX_REVIEW_BYTES));
    let answers = futures_util::future::join_all((0..20).map(|_| send(big.clone()))).await;
    let mut admitted = 0;
    for answer in &answers {
        let (status, retry, body) = answer.as_ref().expect("every review is answered");
        match status {
            200 => {
                let v: Value = serde_json::from_slice(body).unwrap();
                assert_eq!(v["response"]["allowed"], true);
                assert!(v["response"]["patch"].is_string(), "not patched: {v}");
                admitted += 1;
            }
            429 => assert!(retry, "429 without Retry-After"),
            other => panic!("status {other}: {}", String::from_utf8_lossy(body)),
        }
    }
    assert!(admitted >= 4, "only {admitted} of 20 reviews answered");
    let peak_kb = p.peak_rss_kb();
    eprintln!(
        "webhook peak RSS under 20 maximal reviews: {} MiB",
        peak_kb / 1024
    );
    assert!(
        peak_kb < 128 * 1024,
        "peak RSS {peak_kb} kB is over the 128Mi limit"
    );
}
