//! The official clients, in their default modes, through braid: what users run.
//! They are installed (pinned) by tests/python/install on first use.

use crate::support::*;

/// 32 concurrent `tritonclient.http` clients, a third each in the default mode
/// (binary input, every output binary), JSON input with binary output, and binary
/// input with JSON output: batches form, and every client gets exactly its own row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tritonclient_http_defaults_are_batched_and_each_client_gets_its_own_rows() {
    let ex = TestExecutor::start(|dir| vec![tiny_spec(dir, "tiny", &[])]).await;
    let cfg = format!(
        "executor: http://{}\nroutes:\n  - model: m\n    variants: [{{ name: local, backend: local, target_model: tiny }}]\n    batching: {{ max_batch_size: 64, max_delay: 50ms, row_id: braid_row_id }}\n",
        ex.addr
    );
    let proxy = TestProxy::start(&cfg).await;
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
    assert_eq!(report["errors"], serde_json::json!([]), "{report}");
    assert_eq!(report["answered"], clients, "{report}");
    assert_eq!(report["wrong_rows"], 0, "{report}");
    assert!(report["max_diff"].as_f64().unwrap() < 1e-5, "{report}");
    let labels = "{route=\"m\",variant=\"local\"}";
    let batches = metric(&proxy, &format!("braid_batch_size_count{labels}")).await;
    let rows = metric(&proxy, &format!("braid_batch_size_sum{labels}")).await;
    assert_eq!(
        rows, clients as f64,
        "every request went through the batcher"
    );
    assert!(
        batches < rows / 2.0,
        "{batches} batches for {rows} rows: requests were not merged"
    );
    proxy.stop().await;
}
