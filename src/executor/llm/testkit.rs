//! Tiny random-weight Gemma 3 GGUFs, written with candle's GGUF writer, so tests run
//! the real loading, tokenizing, batching and decoding code in milliseconds.

use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

/// The tiny model's shape: 2 blocks (one sliding, one global), 64 wide, 4 query heads
/// over 1 KV head of 16, a window of 8, a context of 512.
pub struct Tiny {
    pub arch: &'static str,
    pub context: u32,
    pub window: u32,
    pub seed: u64,
    pub chat_template: Option<&'static str>,
}

impl Default for Tiny {
    fn default() -> Tiny {
        Tiny {
            arch: "gemma3",
            context: 512,
            window: 8,
            seed: 1,
            chat_template: None,
        }
    }
}

const WORDS: &[&str] = &[
    "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "hello", "world", "in", "ing",
];

/// The tiny vocabulary: `<pad> <eos> <bos> <unk> <start_of_turn> <end_of_turn>`, the 256
/// byte tokens, `▁`, the letters and digits, then a few words with and without a
/// leading `▁`, each with every prefix it merges through, and runs of `▁`.
pub fn vocab() -> (Vec<String>, Vec<f32>, Vec<i32>) {
    let mut pieces: Vec<String> = [
        "<pad>",
        "<eos>",
        "<bos>",
        "<unk>",
        "<start_of_turn>",
        "<end_of_turn>",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut types = vec![3, 3, 3, 2, 3, 3];
    for b in 0..=255u8 {
        pieces.push(format!("<0x{b:02X}>"));
        types.push(6);
    }
    pieces.push("▁".into());
    types.push(1);
    for c in ('a'..='z').chain('0'..='9') {
        pieces.push(c.to_string());
        types.push(1);
    }
    let mut merged: Vec<String> = vec!["▁▁".into(), "▁▁▁▁".into()];
    for w in WORDS {
        for word in [w.to_string(), format!("▁{w}")] {
            let chars: Vec<char> = word.chars().collect();
            merged.extend((2..=chars.len()).map(|n| chars[..n].iter().collect()));
        }
    }
    for p in merged {
        if !pieces.contains(&p) {
            pieces.push(p);
            types.push(1);
        }
    }
    // Longer pieces score lower (merge later), as SentencePiece's do.
    let scores = pieces
        .iter()
        .zip(&types)
        .map(|(p, &t)| {
            if t == 1 {
                -(p.chars().count() as f32)
            } else {
                0.0
            }
        })
        .collect();
    (pieces, scores, types)
}

struct Gen(u64);

impl Gen {
    fn normal(&mut self, n: usize, std: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                // Sum of 4 uniforms, centred: close enough to normal for weights.
                let mut s = 0.0;
                for _ in 0..4 {
                    self.0 = self
                        .0
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    s += (self.0 >> 40) as f32 / (1u64 << 24) as f32;
                }
                (s - 2.0) * std * 1.7
            })
            .collect()
    }
}

/// Writes the tiny model to `path`.
pub fn write_tiny(path: &Path, t: &Tiny) -> std::io::Result<()> {
    let err = std::io::Error::other;
    let (hidden, heads, kv, hd, ffn, blocks) = (64usize, 4usize, 1usize, 16usize, 128usize, 2usize);
    let (pieces, scores, types) = vocab();
    let n_vocab = pieces.len();
    let a = t.arch;
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(a.into())),
        ("general.name".into(), Value::String("braid tiny".into())),
        (format!("{a}.block_count"), Value::U32(blocks as u32)),
        (format!("{a}.embedding_length"), Value::U32(hidden as u32)),
        (format!("{a}.feed_forward_length"), Value::U32(ffn as u32)),
        (
            format!("{a}.attention.head_count"),
            Value::U32(heads as u32),
        ),
        (
            format!("{a}.attention.head_count_kv"),
            Value::U32(kv as u32),
        ),
        (format!("{a}.attention.key_length"), Value::U32(hd as u32)),
        (format!("{a}.attention.value_length"), Value::U32(hd as u32)),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(1e-6),
        ),
        (
            format!("{a}.attention.sliding_window"),
            Value::U32(t.window),
        ),
        (
            format!("{a}.attention.sliding_window_pattern"),
            Value::U32(2),
        ),
        (format!("{a}.context_length"), Value::U32(t.context)),
        (format!("{a}.rope.freq_base"), Value::F32(1_000_000.0)),
        ("tokenizer.ggml.model".into(), Value::String("llama".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(pieces.into_iter().map(Value::String).collect()),
        ),
        (
            "tokenizer.ggml.scores".into(),
            Value::Array(scores.into_iter().map(Value::F32).collect()),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.unknown_token_id".into(), Value::U32(3)),
        ("tokenizer.ggml.padding_token_id".into(), Value::U32(0)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(true)),
        ("tokenizer.ggml.add_space_prefix".into(), Value::Bool(false)),
    ];
    if let Some(src) = t.chat_template {
        meta.push(("tokenizer.chat_template".into(), Value::String(src.into())));
    }
    let mut g = Gen(t.seed);
    let dev = Device::Cpu;
    let mut q =
        |rows: usize, cols: usize, std: f32, dtype: GgmlDType| -> std::io::Result<QTensor> {
            let w =
                Tensor::from_vec(g.normal(rows * cols, std), (rows, cols), &dev).map_err(err)?;
            QTensor::quantize(&w, dtype).map_err(err)
        };
    let ones = |n: usize| -> std::io::Result<QTensor> {
        let w = Tensor::ones(n, candle_core::DType::F32, &dev).map_err(err)?;
        QTensor::quantize(&w, GgmlDType::F32).map_err(err)
    };
    let mut tensors: Vec<(String, QTensor)> = vec![
        (
            "token_embd.weight".into(),
            q(n_vocab, hidden, 0.2, GgmlDType::Q8_0)?,
        ),
        ("output_norm.weight".into(), ones(hidden)?),
        // Untied (as some GGUFs are): a tied head makes a random model repeat its input.
        (
            "output.weight".into(),
            q(n_vocab, hidden, 0.2, GgmlDType::Q8_0)?,
        ),
    ];
    for b in 0..blocks {
        let n = |s: &str| format!("blk.{b}.{s}.weight");
        tensors.extend([
            (n("attn_q"), q(heads * hd, hidden, 0.2, GgmlDType::Q8_0)?),
            (n("attn_k"), q(kv * hd, hidden, 0.2, GgmlDType::Q8_0)?),
            (n("attn_v"), q(kv * hd, hidden, 0.2, GgmlDType::Q8_0)?),
            (
                n("attn_output"),
                q(hidden, heads * hd, 0.2, GgmlDType::Q8_0)?,
            ),
            (n("ffn_gate"), q(ffn, hidden, 0.2, GgmlDType::Q8_0)?),
            (n("ffn_up"), q(ffn, hidden, 0.2, GgmlDType::Q8_0)?),
            (n("ffn_down"), q(hidden, ffn, 0.2, GgmlDType::Q8_0)?),
            (n("attn_q_norm"), ones(hd)?),
            (n("attn_k_norm"), ones(hd)?),
            (n("attn_norm"), ones(hidden)?),
            (n("post_attention_norm"), ones(hidden)?),
            (n("ffn_norm"), ones(hidden)?),
            (n("post_ffw_norm"), ones(hidden)?),
        ]);
    }
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    gguf_file::write(&mut f, &meta_refs, &tensor_refs).map_err(err)?;
    use std::io::Write;
    f.flush()
}
