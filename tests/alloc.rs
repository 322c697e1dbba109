//! Decoders allocate in proportion to what a request *is*, never to what it *claims*:
//! every OIP body in `tests/corpus/oip` plus generated bodies whose declared sizes lie
//! go through the executor's decoder and the proxy's codec, and every config document
//! in `tests/corpus/config` through the config loader, under a counting allocator.
//!
//! Its own test binary (not a module of `tests/it`): the allocator is global, so this
//! file holds one test and nothing runs beside it to blur the count.
// These tests run real processes and sockets, and wait on the wall clock as their clients do.
#![allow(clippy::disallowed_methods)]

use std::alloc::System;
use std::path::Path;

use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Bytes allocated (in total, freed or not) while `f` runs.
fn allocated_by(f: impl FnOnce()) -> usize {
    let region = Region::new(GLOBAL);
    f();
    region.change().bytes_allocated
}

fn corpus(dir: &str) -> Vec<(String, Vec<u8>)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(dir);
    let mut out: Vec<_> = std::fs::read_dir(path)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect();
    out.sort();
    out
}

/// OIP bodies whose declared sizes lie, in both encodings: a huge first dim, a huge
/// `binary_data_size`, a huge BYTES length prefix, and a header length past the end.
fn lying_bodies() -> Vec<(Vec<u8>, Option<usize>)> {
    let mut out = Vec::new();
    for dim in [1u64, 2, 1 << 20, 1 << 40, u64::MAX] {
        let json = format!(
            r#"{{"inputs":[{{"name":"text","datatype":"BYTES","shape":[{dim}],"data":["a","b"]}}]}}"#
        );
        out.push((json.into_bytes(), None));
        for (size, prefix) in [(7u64, 3u32), (u64::MAX, 3), (7, u32::MAX)] {
            let header = format!(
                r#"{{"inputs":[{{"name":"text","datatype":"BYTES","shape":[{dim}],"parameters":{{"binary_data_size":{size}}}}}]}}"#
            );
            let mut body = header.clone().into_bytes();
            body.extend_from_slice(&prefix.to_le_bytes());
            body.extend_from_slice(b"abc");
            out.push((body.clone(), Some(header.len())));
            out.push((body, Some(usize::MAX)));
        }
    }
    out
}

#[test]
fn allocation_follows_the_body_not_its_claims() {
    // Decoding builds a JSON tree and owned strings: a few tens of bytes per body byte
    // at most, plus a fixed floor for small bodies.
    let oip_bound = |len: usize| 64 * len + 16 * 1024;
    let mut worst = (0.0f64, String::new());
    let mut check = |what: String, len: usize, bytes: usize, bound: usize| {
        assert!(
            bytes <= bound,
            "{what}: {bytes} bytes allocated for a {len}-byte input (bound {bound})"
        );
        let ratio = bytes as f64 / len.max(1) as f64;
        if ratio > worst.0 {
            worst = (ratio, what);
        }
    };

    let mut bodies: Vec<(String, Vec<u8>, Option<usize>)> = corpus("oip")
        .into_iter()
        .map(|(name, b)| (name, b, None))
        .collect();
    for (i, (b, h)) in lying_bodies().into_iter().enumerate() {
        bodies.push((format!("lying body {i}"), b, h));
    }
    for (name, body, header) in &bodies {
        let len = body.len();
        let bytes = allocated_by(|| {
            let _ = braid::executor::oip::decode(body, *header);
        });
        check(
            format!("executor decoder, {name}"),
            len,
            bytes,
            oip_bound(len),
        );
        let bytes = allocated_by(|| {
            let _ = braid::batch::codec::parse_v2(body);
            let _ = braid::batch::codec::parse_v1(body);
        });
        check(format!("proxy codec, {name}"), len, bytes, oip_bound(len));
    }

    // Generated: OIP-shaped bodies with any dims, `binary_data_size`, header length and
    // BYTES length prefix (the same lies, at random), 512 cases.
    use proptest::prelude::*;
    let lies = (
        prop::collection::vec(prop_oneof![any::<u64>(), 0u64..4], 1..3),
        prop::collection::vec("[a-z]{0,8}", 0..6),
        any::<u64>(),
        any::<u32>(),
        any::<usize>(),
    );
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 512,
        ..ProptestConfig::default()
    });
    runner
        .run(&lies, |(dims, data, size, prefix, cut)| {
            let json = serde_json::json!({"inputs": [{"name": "text", "datatype": "BYTES",
                "shape": dims, "data": data}]});
            let body = serde_json::to_vec(&json).unwrap();
            let header = serde_json::to_vec(&serde_json::json!({"inputs": [{"name": "text",
                "datatype": "BYTES", "shape": dims, "parameters": {"binary_data_size": size}}]}))
            .unwrap();
            let mut binary = header.clone();
            binary.extend_from_slice(&prefix.to_le_bytes());
            binary.extend_from_slice(data.concat().as_bytes());
            for (b, h) in [
                (&body, None),
                (&binary, Some(header.len())),
                (&binary, Some(cut)),
            ] {
                let bytes = allocated_by(|| {
                    let _ = braid::executor::oip::decode(b, h);
                    let _ = braid::batch::codec::parse_v2_with(b, h, Default::default());
                });
                prop_assert!(
                    bytes <= 2 * oip_bound(b.len()),
                    "{bytes} bytes for {} bytes",
                    b.len()
                );
            }
            Ok(())
        })
        .unwrap();

    // The config loader also compiles and validates (route tables, TLS setup, error
    // texts with field paths): a larger factor, and a floor for its fixed work. YAML
    // aliases may expand a document, so one that uses them is bounded by the node
    // budget instead (`config::node::MAX_NODES`); the billion-laughs document allocated
    // 56 MB under serde-saphyr's default budget.
    let config_bound = |len: usize| 512 * len + 256 * 1024;
    let expansion_ceiling = braid::config::node::MAX_NODES * 256;
    for (name, doc) in corpus("config") {
        let text = String::from_utf8_lossy(&doc).into_owned();
        let bytes = allocated_by(|| {
            let _ = braid::config::load(&text, "alloc");
        });
        let bound = match text.contains('*') {
            true => config_bound(doc.len()).max(expansion_ceiling),
            false => config_bound(doc.len()),
        };
        check(format!("config loader, {name}"), doc.len(), bytes, bound);
    }
    eprintln!(
        "largest allocation per input byte: {:.1} ({})",
        worst.0, worst.1
    );
}
