//! The executor through real sockets, with a tiny random BERT built at test time:
//! OIP v2 and KServe v1 endpoints, labels, the binary tensor extension, bad input,
//! and the bounded queue.

use std::sync::Arc;

use crate::support::*;

async fn labelled() -> TestExecutor {
    TestExecutor::start(|dir| {
        vec![
            tiny_spec(dir, "tiny", &[]),
            tiny_spec(dir, "tiny-labels", &["good", "bad"]),
        ]
    })
    .await
}

#[tokio::test]
async fn health_readiness_metadata() {
    let ex = labelled().await;
    let c = client();
    assert_eq!(get(&c, &ex.url("/v2/health/live"), &[]).await.status, 200);
    assert_eq!(get(&c, &ex.url("/v2/health/ready"), &[]).await.status, 200);
    assert_eq!(
        get(&c, &ex.url("/v2/models/tiny/ready"), &[]).await.status,
        200
    );
    let server = get(&c, &ex.url("/v2"), &[]).await.json();
    assert_eq!(server["extensions"][0], "binary_tensor_data");
    let meta = get(&c, &ex.url("/v2/models/tiny-labels"), &[]).await.json();
    assert_eq!(meta["inputs"][0]["name"], "text");
    assert_eq!(meta["outputs"][0]["shape"][1], 32);
    assert_eq!(meta["outputs"][2]["name"], "scores");
    let r = get(&c, &ex.url("/v2/models/nope"), &[]).await;
    assert_json_error(&r, 404, "tiny, tiny-labels");
}

#[tokio::test]
async fn infer_returns_embeddings_labels_and_scores_honouring_id_and_outputs() {
    let ex = labelled().await;
    let c = client();
    let r = post(
        &c,
        &ex.url("/v2/models/tiny-labels/infer"),
        &[],
        &infer_body(&["good film", "bad food", "i loved it"], r#","id":"req-7""#),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let j = r.json();
    assert_eq!(j["id"], "req-7");
    assert_eq!(j["model_name"], "tiny-labels");
    let outs = j["outputs"].as_array().unwrap();
    assert_eq!(outs.len(), 3);
    assert_eq!(outs[0]["name"], "embedding");
    assert_eq!(outs[0]["shape"], serde_json::json!([3, 32]));
    assert_eq!(outs[0]["data"].as_array().unwrap().len(), 96);
    assert_eq!(outs[1]["shape"], serde_json::json!([3]));
    for l in outs[1]["data"].as_array().unwrap() {
        assert!(l == "good" || l == "bad");
    }
    assert_eq!(outs[2]["shape"], serde_json::json!([3, 2]));
    // Only what was asked for.
    let r = post(
        &c,
        &ex.url("/v2/models/tiny-labels/infer"),
        &[],
        &infer_body(&["x"], r#","outputs":[{"name":"label"}]"#),
    )
    .await;
    let outs = r.json()["outputs"].as_array().unwrap().clone();
    assert_eq!(outs.len(), 1);
    assert_eq!(outs[0]["name"], "label");
    // A model without labels has no label output.
    let r = post(
        &c,
        &ex.url("/v2/models/tiny/infer"),
        &[],
        &infer_body(&["x"], r#","outputs":[{"name":"label"}]"#),
    )
    .await;
    assert_json_error(&r, 400, "unknown output \"label\"");
    // Versioned path.
    let r = post(
        &c,
        &ex.url("/v2/models/tiny/versions/1/infer"),
        &[],
        &infer_body(&["x"], ""),
    )
    .await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn bad_requests_get_400_naming_the_problem_and_unknown_models_404() {
    let ex = labelled().await;
    let c = client();
    let url = ex.url("/v2/models/tiny/infer");
    let cases = [
        (
            r#"{"inputs":[{"name":"text","datatype":"INT32","shape":[1],"data":[1]}]}"#,
            "datatype BYTES",
        ),
        (
            r#"{"inputs":[{"name":"text","datatype":"BYTES","shape":[2],"data":["a"]}]}"#,
            "elements",
        ),
        (
            r#"{"inputs":[{"name":"text","datatype":"BYTES","shape":[1,3],"data":["a","b","c"]}]}"#,
            "shape",
        ),
        (
            r#"{"inputs":[{"name":"other","datatype":"BYTES","shape":[1],"data":["a"]}]}"#,
            "unknown input",
        ),
        (r#"{"inputs":[]}"#, "missing input"),
        (
            r#"{"inputs":[{"name":"text","datatype":"BYTES","shape":[0],"data":[]}]}"#,
            "empty batch",
        ),
        (r#"{"inputs": 5}"#, "inputs"),
        ("{", "not valid JSON"),
    ];
    for (body, want) in cases {
        let r = post(&c, &url, &[], body).await;
        assert_eq!(r.status, 400, "{body}");
        assert!(
            r.json()["error"].as_str().unwrap().contains(want),
            "{body}: {}",
            r.text()
        );
    }
    let texts: Vec<&str> = vec!["a"; 65];
    let r = post(&c, &url, &[], &infer_body(&texts, "")).await;
    assert_json_error(&r, 400, "max batch of 64");
    let r = post(
        &c,
        &ex.url("/v2/models/ghost/infer"),
        &[],
        &infer_body(&["a"], ""),
    )
    .await;
    assert_eq!(r.status, 404);
    let r = get(&c, &url, &[]).await;
    assert_eq!(r.status, 405);
}

#[tokio::test]
async fn triton_binary_tensor_extension_in_and_out() {
    let ex = labelled().await;
    let c = client();
    let header = br#"{"id":"b1","inputs":[{"name":"text","datatype":"BYTES","shape":[2],"parameters":{"binary_data_size":20}}],"outputs":[{"name":"embedding","parameters":{"binary_data":true}},{"name":"label","parameters":{"binary_data":true}},{"name":"scores","parameters":{"binary_data":false}}]}"#;
    let mut body = header.to_vec();
    for s in ["good film", "bad"] {
        body.extend_from_slice(&(s.len() as u32).to_le_bytes());
        body.extend_from_slice(s.as_bytes());
    }
    let hl = header.len().to_string();
    let r = send(
        &c,
        "POST",
        &ex.url("/v2/models/tiny-labels/infer"),
        &[("inference-header-content-length", &hl)],
        &body,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let n: usize = r.headers["inference-header-content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let j: serde_json::Value = serde_json::from_slice(&r.body[..n]).unwrap();
    assert_eq!(j["id"], "b1");
    let emb_size = j["outputs"][0]["parameters"]["binary_data_size"]
        .as_u64()
        .unwrap() as usize;
    assert_eq!(emb_size, 2 * 32 * 4);
    let label_size = j["outputs"][1]["parameters"]["binary_data_size"]
        .as_u64()
        .unwrap() as usize;
    assert_eq!(r.body.len(), n + emb_size + label_size);
    assert_eq!(j["outputs"][2]["data"].as_array().unwrap().len(), 4);
    // The binary embedding equals the JSON one for the same text.
    let first: Vec<f32> = r.body[n..n + 128]
        .chunks(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let js = post(
        &c,
        &ex.url("/v2/models/tiny-labels/infer"),
        &[],
        &infer_body(&["good film"], ""),
    )
    .await
    .json();
    let json_first: Vec<f32> = js["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    for (a, b) in first.iter().zip(&json_first) {
        assert!((a - b).abs() < 1e-6);
    }
    // Non-UTF-8 text is a 400.
    let mut bad = header.to_vec();
    bad.extend_from_slice(&9u32.to_le_bytes());
    bad.extend_from_slice(&[0xff; 9]);
    bad.extend_from_slice(&3u32.to_le_bytes());
    bad.extend_from_slice(b"bad");
    let r = send(
        &c,
        "POST",
        &ex.url("/v2/models/tiny-labels/infer"),
        &[("inference-header-content-length", &hl)],
        &bad,
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(
        r.json()["error"].as_str().unwrap().contains("UTF-8"),
        "{}",
        r.text()
    );
}

#[tokio::test]
async fn kserve_v1_predict() {
    let ex = labelled().await;
    let c = client();
    let r = post(
        &c,
        &ex.url("/v1/models/tiny-labels:predict"),
        &[],
        r#"{"instances":["good film",{"text":"bad"}]}"#,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let p = r.json()["predictions"].as_array().unwrap().clone();
    assert_eq!(p.len(), 2);
    assert_eq!(p[0]["embedding"].as_array().unwrap().len(), 32);
    assert!(p[1]["scores"]["good"].is_number() && p[1]["scores"]["bad"].is_number());
    let r = post(
        &c,
        &ex.url("/v1/models/tiny:predict"),
        &[],
        r#"{"instances":[]}"#,
    )
    .await;
    assert_eq!(r.status, 400);
    let r = post(
        &c,
        &ex.url("/v1/models/tiny:predict"),
        &[],
        r#"{"instances":[1]}"#,
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(
        get(&c, &ex.url("/v1/models/tiny"), &[]).await.json()["ready"],
        true
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_503_with_retry_after_and_everything_else_succeeds() {
    let ex = TestExecutor::start(|dir| {
        let mut s = tiny_spec(dir, "tiny", &[]);
        s.queue = 1;
        s.max_batch = 256;
        vec![s]
    })
    .await;
    let long = "the food was very good but the service was terrible ".repeat(4);
    let texts: Vec<&str> = vec![long.as_str(); 256];
    let body = Arc::new(infer_body(&texts, ""));
    let mut tasks = Vec::new();
    for _ in 0..24 {
        let (c, url, body) = (client(), ex.url("/v2/models/tiny/infer"), body.clone());
        tasks.push(tokio::spawn(
            async move { post(&c, &url, &[], &body).await },
        ));
    }
    let (mut ok, mut busy) = (0, 0);
    for t in tasks {
        let r = t.await.unwrap();
        match r.status.as_u16() {
            200 => ok += 1,
            503 => {
                assert_eq!(r.headers["retry-after"], "1");
                assert_json_error(&r, 503, "queue is full");
                busy += 1;
            }
            s => panic!("unexpected {s}: {}", r.text()),
        }
    }
    // With a queue of one, how many get in depends on whether the first request left
    // the queue before the rest arrived (not, on a loaded machine): at least one does.
    assert!(
        ok >= 1 && busy >= 1 && ok + busy == 24,
        "ok {ok}, busy {busy}"
    );
    let m = get(&client(), &ex.url("/metrics"), &[]).await.text();
    assert!(
        m.contains(r#"braid_executor_requests_total{model="tiny",code="503"}"#),
        "{m}"
    );
    assert!(
        m.contains(r#"braid_executor_batch_size_bucket{le="256.0",model="tiny"}"#),
        "{m}"
    );
    assert!(m.contains("braid_executor_inference_seconds_count"), "{m}");
}

#[tokio::test]
async fn the_proxy_routes_to_executor_models_by_target_model() {
    let ex = labelled().await;
    let cfg = format!(
        "executor: http://{}\nroutes:\n  - model: sentiment\n    variants:\n      - {{ name: plain, weight: 1, backend: local, target_model: tiny }}\n      - {{ name: labelled, weight: 1, backend: local, target_model: tiny-labels }}\n",
        ex.addr
    );
    let proxy = TestProxy::start(&cfg).await;
    let c = client();
    let r = post(
        &c,
        &proxy.url("/v2/models/sentiment/infer"),
        &[("x-braid-variant", "labelled")],
        &infer_body(&["good"], ""),
    )
    .await;
    assert_eq!((r.status.as_u16(), r.variant()), (200, "labelled"));
    assert_eq!(r.json()["model_name"], "tiny-labels");
    assert_eq!(r.json()["outputs"].as_array().unwrap().len(), 3);
    let r = post(
        &c,
        &proxy.url("/v1/models/sentiment:predict"),
        &[("x-braid-variant", "plain")],
        r#"{"instances":["good"]}"#,
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(r.json()["predictions"][0].get("label").is_none());
    proxy.stop().await;
}

/// Runs `braid executor ARGS` and returns its exit code and stderr (for failures).
fn executor_fails(args: &[&str]) -> (Option<i32>, String) {
    let mut all = vec!["executor", "--listen", "127.0.0.1:0"];
    all.extend_from_slice(args);
    let out = braid(&all, b"");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_executor_command_refuses_what_it_cannot_serve() {
    let (code, err) = executor_fails(&["--model", "/nonexistent/model"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("neither a model directory nor a source"),
        "{err}"
    );
    let (code, err) = executor_fails(&["--model", "pip:unknown-pkg==1.0"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("sha256"), "{err}");
    // A cut GGUF: refused at start with the reason, not served half-way.
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("tiny.gguf");
    std::fs::write(&gguf, b"GGUF\x03\x00\x00\x00").unwrap();
    let (code, err) = executor_fails(&["--model", gguf.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(err.contains("not a readable GGUF file"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    braid::executor::testkit::write_tiny_model(dir.path(), true).unwrap();
    let (code, err) = executor_fails(&[
        "--model",
        dir.path().to_str().unwrap(),
        "--device",
        "cuda:0",
    ]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("without CUDA") || err.contains("cuda"),
        "{err}"
    );
}

#[tokio::test]
async fn the_executor_command_serves_a_model_directory_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    braid::executor::testkit::write_tiny_model(dir.path(), true).unwrap();
    let mut exec = BraidProcess::spawn(
        &[
            "executor",
            "--model",
            dir.path().to_str().unwrap(),
            "--name",
            "tiny",
            "--labels",
            "good|bad",
            "--drain-grace",
            "3s",
            "--listen",
            "127.0.0.1:0",
        ],
        &[],
        &["listen="],
        std::time::Duration::from_secs(30),
    );
    let r = infer_once_then_sigterm(&mut exec).await;
    assert_eq!(r.json()["outputs"].as_array().unwrap().len(), 3);
}

/// Waits until the executor process is ready, sends one inference for model `tiny`,
/// then stops it with SIGTERM, which must end it cleanly: readiness turns 503 at once,
/// a request sent during the grace (`--drain-grace 3s`) is still answered on a new
/// connection, then it exits 0. Returns the first reply.
async fn infer_once_then_sigterm(exec: &mut BraidProcess) -> Reply {
    let addr = exec.announced["listen="].clone();
    let c = client();
    let ready = format!("http://{addr}/v2/health/ready");
    let infer = format!("http://{addr}/v2/models/tiny/infer");
    wait_for_status(&c, &ready, 200).await;
    let r = post(&c, &infer, &[], &infer_body(&["good film"], "")).await;
    exec.signal("TERM");
    wait_for_status(&c, &ready, 503).await;
    let during = post(&client(), &infer, &[], &infer_body(&["bad film"], "")).await;
    assert_eq!(
        during.status, 200,
        "a request during the drain grace is served"
    );
    let status = exec.wait_exit(std::time::Duration::from_secs(20)).await;
    assert!(status.success(), "{status}");
    r
}

#[tokio::test]
async fn a_request_claiming_a_trillion_rows_is_a_400_and_the_executor_stays_up() {
    let ex = labelled().await;
    let c = client();
    let url = ex.url("/v2/models/tiny/infer");
    // The 92-byte request that once aborted the whole process (24 TB reserved from
    // the declared shape), as JSON and with binary tensors.
    let huge =
        r#"{"inputs":[{"name":"text","shape":[1000000000000],"datatype":"BYTES","data":["a"]}]}"#;
    assert_json_error(
        &post(&c, &url, &[], huge).await,
        400,
        "declares 1000000000000 rows",
    );
    let header = r#"{"inputs":[{"name":"text","shape":[4294967295],"datatype":"BYTES","parameters":{"binary_data_size":5}}]}"#;
    let mut body = header.as_bytes().to_vec();
    body.extend_from_slice(&1u32.to_le_bytes());
    body.push(b'a');
    let len = header.len().to_string();
    let r = send(
        &c,
        "POST",
        &url,
        &[("inference-header-content-length", len.as_str())],
        &body,
    )
    .await;
    assert_json_error(&r, 400, "rows");
    let ok = post(&c, &url, &[], &infer_body(&["still here"], "")).await;
    assert_eq!(ok.status, 200, "{}", ok.text());
}

/// The thread count candle reads on every pass is in the executor's environment from
/// the start (it re-executes itself, same PID, when the variables are missing or
/// unusable), and values the user set are kept.
#[tokio::test]
async fn the_executor_pins_candles_thread_settings_in_its_own_environment() {
    use braid::executor::threads::{DEFAULT_SPIN_LIMIT, SPIN_VAR, THREADS_VAR, cpus};
    let dir = tempfile::tempdir().unwrap();
    braid::executor::testkit::write_tiny_model(dir.path(), true).unwrap();
    let model = dir.path().to_str().unwrap();
    let environ = |pid: u32| -> Vec<String> {
        let raw = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        raw.split(|&b| b == 0)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect()
    };
    let args = [
        "executor",
        "--model",
        model,
        "--name",
        "tiny",
        "--drain-grace",
        "3s",
        "--listen",
        "127.0.0.1:0",
    ];
    for (given, want_threads, want_spin) in [
        // Empty counts as unset: candle would fall back to /proc/cpuinfo per multiply.
        (("", ""), cpus().to_string(), DEFAULT_SPIN_LIMIT.to_string()),
        (("1", "7"), "1".to_string(), "7".to_string()),
    ] {
        let env = [
            (THREADS_VAR, std::path::Path::new(given.0)),
            (SPIN_VAR, std::path::Path::new(given.1)),
        ];
        let mut exec = BraidProcess::spawn(
            &args,
            &env,
            &["listen=", "compute_threads="],
            std::time::Duration::from_secs(30),
        );
        assert_eq!(exec.announced["compute_threads="], want_threads);
        // The process we started is the one serving, now with the variables set.
        let env = environ(exec.child.id());
        assert!(
            env.contains(&format!("{THREADS_VAR}={want_threads}")),
            "{env:?}"
        );
        assert!(env.contains(&format!("{SPIN_VAR}={want_spin}")), "{env:?}");
        assert_eq!(infer_once_then_sigterm(&mut exec).await.status, 200);
    }
}
