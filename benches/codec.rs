//! The per-request costs around a batch, beside route matching (`benches/route.rs`):
//! OIP merge and split for 32 requests of one 384-float row each (an embedding batch),
//! the row-id check, and recording a request's metrics at the edge.
//! Run: `cargo bench --bench codec`.
// A benchmark times real work: std's clock is the one it means.
#![allow(clippy::disallowed_methods)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use braid::batch::codec::{self, Item, RowIds};
use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::{Value, json};

const ROWS: usize = 32;
const DIM: usize = 384;

fn requests() -> Vec<Item> {
    (0..ROWS)
        .map(|i| {
            let row: Vec<f32> = (0..DIM).map(|k| (i * DIM + k) as f32 * 1e-3).collect();
            let body = json!({"id": format!("r{i}"), "inputs": [
                {"name": "x", "datatype": "FP32", "shape": [1, DIM], "data": row}
            ]});
            codec::parse_v2(body.to_string().as_bytes()).expect("valid request")
        })
        .collect()
}

/// What an executor answers for the merged batch: one `[32, 384]` FP32 output.
fn reply(merged: &[u8], with_ids: bool) -> Vec<u8> {
    let m: Value = serde_json::from_slice(merged).unwrap();
    let mut outputs = vec![json!({"name": "embedding", "datatype": "FP32",
        "shape": [ROWS, DIM], "data": m["inputs"][0]["data"]})];
    if with_ids {
        outputs.push(m["inputs"][1].clone());
    }
    json!({"model_name": "m", "outputs": outputs})
        .to_string()
        .into_bytes()
}

fn codec_bench(c: &mut Criterion) {
    let items = requests();
    let refs: Vec<&Item> = items.iter().collect();
    let mut g = c.benchmark_group("oip 32x384");
    g.bench_function("parse one request", |b| {
        let body = json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, DIM],
            "data": vec![0.125f32; DIM]}]})
        .to_string();
        b.iter(|| codec::parse_v2(black_box(body.as_bytes())).unwrap())
    });
    g.bench_function("merge", |b| b.iter(|| codec::merge(black_box(&refs), None)));
    let merged = codec::merge(&refs, None).body;
    let answer = reply(&merged, false);
    g.bench_function("split", |b| {
        b.iter(|| codec::split(black_box(&refs), black_box(&answer), None).unwrap())
    });
    let ids = RowIds {
        name: "braid_row_id",
        first: 1000,
    };
    let merged_ids = codec::merge(&refs, Some(ids)).body;
    let answer_ids = reply(&merged_ids, true);
    g.bench_function("split with row ids", |b| {
        b.iter(|| codec::split(black_box(&refs), black_box(&answer_ids), Some(ids)).unwrap())
    });
    g.finish();
}

fn metrics_bench(c: &mut Criterion) {
    let metrics = braid::metrics::Metrics::new();
    let (route, variant): (Arc<str>, Arc<str>) = (Arc::from("sentiment"), Arc::from("control"));
    // Resolved once, as a snapshot's bind does; a request only records.
    let handles = metrics.requests(&route, &variant);
    c.bench_function("metrics: record one request", |b| {
        b.iter(|| black_box(&handles).record(200, Duration::from_micros(750)))
    });
}

criterion_group!(benches, codec_bench, metrics_bench);
criterion_main!(benches);
