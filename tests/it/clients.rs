//! The official clients, in their default modes, through braid: what users run.
//! They are installed (pinned) by tests/python/install on first use.

use crate::support::*;

/// 32 concurrent `tritonclient.http` clients, a third each in the default mode
/// (binary input, every output binary), JSON input with binary output, and binary
/// input with JSON output: batches form, and every client gets exactly its own row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tritonclient_http_defaults_are_batched_and_each_client_gets_its_own_rows() {
    let ex = TestExecutor::start(|dir| vec![tiny_spec(dir, "tiny", &[])]).await;
    let proxy = TestProxy::start(&batched_route(&ex.addr.to_string(), "tiny", true)).await;
    let clients = 32;
    let report = run_python_client(
        "triton_http_clients.py",
        vec![
            proxy.addr.to_string(),
            "m".into(),
            ex.addr.to_string(),
            "tiny".into(),
            clients.to_string(),
        ],
    )
    .await;
    assert_own_rows_and_batched(&report, &proxy, clients, clients).await;
    proxy.stop().await;
}

/// Runs `script` (tests/python) with the arguments every client script takes: the
/// proxy and its model, the executor and its model (for the direct calls), the output
/// to compare, and how many clients.
async fn clients_of(
    script: &str,
    proxy: &TestProxy,
    executor: std::net::SocketAddr,
    target: &str,
    output: &str,
    clients: usize,
) -> serde_json::Value {
    let args = vec![
        proxy.addr.to_string(),
        "m".into(),
        executor.to_string(),
        target.into(),
        output.into(),
        clients.to_string(),
    ];
    run_python_client(script, args).await
}

/// `route` with one local variant (`target`) behind batching, in front of `executor`.
fn batched_route(executor: &str, target: &str, row_id: bool) -> String {
    let row_id = if row_id { ", row_id: braid_row_id" } else { "" };
    format!(
        "executor: http://{executor}\nroutes:\n  - model: m\n    variants: [{{ name: local, backend: local, target_model: {target} }}]\n    batching: {{ max_batch_size: 64, max_delay: 50ms{row_id} }}\n"
    )
}

/// A client's report (see tests/python) says every request got exactly its own rows;
/// braid's metrics say all `rows` were merged.
async fn assert_own_rows_and_batched(
    report: &serde_json::Value,
    proxy: &TestProxy,
    clients: usize,
    rows_sent: usize,
) {
    assert_eq!(report["errors"], serde_json::json!([]), "{report}");
    assert_eq!(report["answered"], clients, "{report}");
    assert_eq!(report["wrong_rows"], 0, "{report}");
    // Embeddings are unit vectors: the tiny model's summation-order bound at scale 1.
    let bound = braid::executor::model::bert_bound(2, 32, 64, 48, 1.0) as f64;
    assert!(report["max_diff"].as_f64().unwrap() <= bound, "{report}");
    let labels = "{route=\"m\",variant=\"local\"}";
    let batches = metric(proxy, &format!("braid_batch_size_count{labels}")).await;
    let rows = metric(proxy, &format!("braid_batch_size_sum{labels}")).await;
    assert_eq!(
        rows, rows_sent as f64,
        "every request went through the batcher"
    );
    assert!(
        batches < rows / 2.0,
        "{batches} batches for {rows} rows: requests were not merged"
    );
}

/// 32 concurrent KServe `InferenceRESTClient` calls through braid's batched route `m`
/// to `direct` (serving `model`, answering `output`), checked against direct calls.
async fn kserve_clients_through_braid(direct: &str, model: &str, output: &str, row_id: bool) {
    let proxy = TestProxy::start(&batched_route(direct, model, row_id)).await;
    let clients = 32;
    let report = run_python_client(
        "kserve_rest_clients.py",
        vec![
            format!("http://{}", proxy.addr),
            "m".into(),
            format!("http://{direct}"),
            model.into(),
            output.into(),
            clients.to_string(),
        ],
    )
    .await;
    assert_own_rows_and_batched(&report, &proxy, clients, clients).await;
    proxy.stop().await;
}

/// KServe's `InferenceRESTClient` (v2; it puts `model_name` in the body) through braid
/// to braid's executor: batched, each client's rows and id its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kserves_rest_client_is_batched_in_front_of_braids_executor() {
    let ex = TestExecutor::start(|dir| vec![tiny_spec(dir, "tiny", &[])]).await;
    kserve_clients_through_braid(&ex.addr.to_string(), "tiny", "embedding", true).await;
}

/// braid in front of a server nobody here wrote: KServe's own `ModelServer` as the
/// executor, driven by KServe's client. Batches form; rows and ids are each client's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kserves_model_server_behind_braid_batching_gives_each_client_its_rows() {
    let server = PythonServer::start("kserve_model_server.py", &["features-model"]).await;
    kserve_clients_through_braid(&server.addr, "features-model", "features", false).await;
}

/// The official `tritonclient[grpc]`, in its default mode, through braid to a gRPC
/// server nobody here wrote (KServe's `ModelServer`) behind a weighted, sticky split:
/// each client gets what a direct call gets, keeps its variant (read from the initial
/// metadata), and server-level calls pass by prefix (an unknown model too: the
/// server's own NOT_FOUND comes back through braid).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tritonclient_grpc_through_a_sticky_split_to_kserves_model_server() {
    let server = PythonServer::start("kserve_model_server.py", &["features-model", "--grpc"]).await;
    let grpc = server.grpc.clone().expect("a gRPC port");
    let proxy = TestProxy::start(&format!(
        "routes:
  - model: features
    variants:
      - {{ name: a, weight: 1, backend: h2c://{grpc}, target_model: features-model }}
      - {{ name: b, weight: 1, backend: http://{grpc}, target_model: features-model }}
    sticky_header: x-user-id
  - path_prefix: /inference.GRPCInferenceService/
    variants: [{{ name: server, backend: h2c://{grpc} }}]
"
    ))
    .await;
    let clients = 16;
    let report = run_python_client(
        "triton_grpc_clients.py",
        vec![
            proxy.addr.to_string(),
            "features".into(),
            grpc.clone(),
            "features-model".into(),
            "features".into(),
            clients.to_string(),
        ],
    )
    .await;
    assert_eq!(report["errors"], serde_json::json!([]), "{report}");
    assert_eq!(report["answered"], clients, "{report}");
    assert_eq!(report["wrong_rows"], 0, "{report}");
    let variants: Vec<&str> = report["variants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap_or("none"))
        .collect();
    let tally = tally(variants.iter().copied());
    assert_eq!(
        tally.get("a").unwrap_or(&0) + tally.get("b").unwrap_or(&0),
        clients,
        "every client kept one variant: {tally:?}"
    );
    assert!(tally.len() == 2, "both variants serve: {tally:?}");
    assert_eq!(report["server_live"], true, "{report}");
    assert_eq!(report["model_ready"], true, "{report}");
    let not_found = report["not_found"].as_str().unwrap();
    assert!(
        not_found.contains("NOT_FOUND") && not_found.contains("no-such-model"),
        "{not_found}"
    );
    proxy.stop().await;
}

/// 64 concurrent `tritonclient[grpc]` clients (raw contents, their default) through a
/// batched route to braid's executor: batches form, and each client gets what a
/// direct gRPC call to the executor gets for its text, with its own id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tritonclient_grpc_is_batched_and_each_client_gets_its_own_rows() {
    let ex = TestExecutor::start(|dir| vec![tiny_spec(dir, "tiny", &[])]).await;
    let config = format!(
        "{}  - path_prefix: /inference.GRPCInferenceService/\n    variants: [{{ name: server, backend: h2c://{} }}]\n",
        batched_route(&ex.addr.to_string(), "tiny", true),
        ex.addr
    );
    let proxy = TestProxy::start(&config).await;
    let clients = 64;
    let report = clients_of(
        "triton_grpc_clients.py",
        &proxy,
        ex.addr,
        "tiny",
        "embedding",
        clients,
    )
    .await;
    // Each client's infer, then two more calls through the stub to read its variant.
    assert_own_rows_and_batched(&report, &proxy, clients, 3 * clients).await;
    assert_eq!(report["model_ready"], true, "{report}");
    proxy.stop().await;
}

/// KServe's `InferenceGRPCClient` (its SDK's gRPC client, defaults) through a batched
/// route to braid's executor: batched, each client's rows and id its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kserves_grpc_client_is_batched_in_front_of_braids_executor() {
    let ex = TestExecutor::start(|dir| vec![tiny_spec(dir, "tiny", &[])]).await;
    let proxy = TestProxy::start(&batched_route(&ex.addr.to_string(), "tiny", true)).await;
    let clients = 32;
    let report = clients_of(
        "kserve_grpc_clients.py",
        &proxy,
        ex.addr,
        "tiny",
        "embedding",
        clients,
    )
    .await;
    assert_own_rows_and_batched(&report, &proxy, clients, clients).await;
    proxy.stop().await;
}
