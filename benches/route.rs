//! Route match + variant assignment, the per-request work done before forwarding.
//! Target: under 200 ns per request. Run: `cargo bench --bench route`.
// A benchmark times real work: std's clock is the one it means.
#![allow(clippy::disallowed_methods)]

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue};
use std::hint::black_box;

const CONFIG: &str = r#"
routes:
  - model: sentiment
    variants:
      - { name: control, weight: 90, backend: "http://127.0.0.1:9001", target_model: sentiment-a }
      - { name: candidate, weight: 10, backend: "http://127.0.0.1:9002", target_model: sentiment-b }
    sticky_header: x-user-id
  - model: embed
    variants: [{ name: only, backend: "http://127.0.0.1:9003" }]
  - path_prefix: /v2/health
    variants: [{ name: health, backend: "http://127.0.0.1:9001" }]
  - path_prefix: /
    variants: [{ name: default, backend: "http://127.0.0.1:9001" }]
"#;

fn route_and_assign(c: &mut Criterion) {
    let snap = braid::config::load(CONFIG, "bench").expect("valid config");
    let mut sticky = HeaderMap::new();
    sticky.insert("x-user-id", HeaderValue::from_static("user-1234567"));
    let mut pinned = HeaderMap::new();
    pinned.insert("x-braid-variant", HeaderValue::from_static("candidate"));
    let plain = HeaderMap::new();

    let mut g = c.benchmark_group("route+assign");
    for (name, path, headers) in [
        (
            "oip_v2_weighted_random",
            "/v2/models/sentiment/infer",
            &plain,
        ),
        ("oip_v2_sticky", "/v2/models/sentiment/infer", &sticky),
        ("oip_v2_override", "/v2/models/sentiment/infer", &pinned),
        ("kserve_v1_sticky", "/v1/models/sentiment:predict", &sticky),
        ("path_prefix", "/metadata/anything", &plain),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                let m = snap.routes.find(black_box(path)).expect("route");
                let (vi, _) = braid::route::assign::assign(
                    m.route,
                    &m.route.chooser,
                    black_box(headers),
                    None,
                )
                .expect("variant");
                black_box(&m.route.variants[vi]);
            })
        });
    }
    g.finish();
}

/// An OpenAI chat call's body of about 4 KiB (a conversation, the model named last, as
/// SDKs often serialise it): reading its `model` and `user`, and rewriting `model`.
/// Target: under 2 µs per request (issue 26).
fn openai_body_model(c: &mut Criterion) {
    let turn = r#"{"role":"user","content":"Summarise the following passage in one sentence, keeping the names: \"The quick brown fox jumps over the lazy dog.\" Then list three facts."}"#;
    let messages = vec![turn; 24].join(",");
    let body = format!(
        r#"{{"messages":[{messages}],"temperature":0.7,"stream":true,"user":"user-1234","model":"assistant"}}"#
    );
    assert!((3500..4600).contains(&body.len()), "{}", body.len());
    let body = bytes::Bytes::from(body);
    let mut g = c.benchmark_group("openai");
    g.bench_function("read_call 4 KiB", |b| {
        b.iter(|| braid::openai::read_call(black_box(&body)).expect("a call"))
    });
    let (_, span) = braid::openai::read_call(&body).unwrap().model.unwrap();
    g.bench_function("with_model 4 KiB", |b| {
        b.iter(|| braid::openai::with_model(black_box(&body), &span, "llama-3-8b-ft"))
    });
    g.finish();
}

criterion_group!(benches, route_and_assign, openai_body_model);
criterion_main!(benches);
