//! A BERT-family sentence encoder on candle: a sentence-transformers style directory in,
//! one pooled (and optionally normalised) embedding per text out.
//!
//! Texts are truncated at the model's max length and padded only to the longest text of
//! their forward pass (never to a fixed length); the attention mask keeps padding out of
//! both attention and pooling, so a text's embedding does not depend on what it was
//! batched with. A batch of very mixed lengths is run as a few length-sorted passes
//! (`plan_groups`) when that computes fewer padded tokens than one pass would.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::Config;

use super::bert::Bert;
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {reason}")]
    Load { path: PathBuf, reason: String },
    #[error("tokenizing: {0}")]
    Tokenize(String),
    #[error("forward pass: {0}")]
    Forward(#[from] candle_core::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    Mean,
    Cls,
}

pub struct SentenceEncoder {
    model: Bert,
    tokenizer: Tokenizer,
    pooling: Pooling,
    normalize: bool,
    device: Device,
    /// Embedding width (hidden size).
    pub dim: usize,
    /// Texts are cut to this many tokens, special tokens included.
    pub max_tokens: usize,
}

/// Embeddings for one batch, row-major `[rows, dim]`, plus what padding cost.
#[derive(Debug, Clone)]
pub struct Embeddings {
    pub data: Vec<f32>,
    pub rows: usize,
    pub dim: usize,
    /// Tokens computed (rows x longest) and tokens that were real (not padding).
    pub tokens_computed: usize,
    pub tokens_real: usize,
    /// Per row, its text's tokens (special tokens included, as the model saw them).
    pub tokens: Vec<usize>,
    /// The timed steps of this batch (tokenize, then forward and pool per pass), for
    /// tracing.
    pub phases: Vec<Phase>,
}

/// One timed step of inference, on the wall clock (a trace's spans are).
#[derive(Debug, Clone)]
pub struct Phase {
    pub name: &'static str,
    pub start: std::time::SystemTime,
    pub end: std::time::SystemTime,
}

impl Phase {
    /// A step that began at `start` and ends now.
    pub fn since(name: &'static str, start: std::time::SystemTime) -> Phase {
        Phase {
            name,
            start,
            end: std::time::SystemTime::now(),
        }
    }
}

impl Embeddings {
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }
}

fn load_err(path: &Path, reason: impl ToString) -> ModelError {
    ModelError::Load {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

impl SentenceEncoder {
    pub fn load(dir: &Path, device: &Device) -> Result<Self, ModelError> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| load_err(&config_path, e))?;
        let config: Config = serde_json::from_str(&text).map_err(|e| load_err(&config_path, e))?;

        let weights_path = dir.join("model.safetensors");
        // Read into memory (safe) rather than mmap (an unsafe API in candle).
        let tensors = candle_core::safetensors::load(&weights_path, device)
            .map_err(|e| load_err(&weights_path, e))?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        let model = Bert::load(vb, &config).map_err(|e| load_err(&weights_path, e))?;

        let (pooling, normalize) = pooling_config(dir)?;
        let max_tokens = max_seq_length(dir)
            .unwrap_or(config.max_position_embeddings)
            .min(config.max_position_embeddings);

        let tok_path = dir.join("tokenizer.json");
        let mut tokenizer = Tokenizer::from_file(&tok_path).map_err(|e| load_err(&tok_path, e))?;
        // Pad to the longest text in each batch, whatever the file says (some ship
        // `Fixed: 128`, which would make every short request pay for 128 tokens).
        let pad = tokenizer
            .get_padding()
            .cloned()
            .unwrap_or_else(|| PaddingParams {
                pad_id: tokenizer
                    .token_to_id("[PAD]")
                    .unwrap_or(config.pad_token_id as u32),
                ..PaddingParams::default()
            });
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            ..pad
        }));
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                ..TruncationParams::default()
            }))
            .map_err(|e| load_err(&tok_path, e))?;

        Ok(SentenceEncoder {
            model,
            tokenizer,
            pooling,
            normalize,
            device: device.clone(),
            dim: config.hidden_size,
            max_tokens,
        })
    }

    /// Embeds a batch. Texts are grouped by token length (see `plan_groups`) and each
    /// group is one forward pass padded to its own longest text; rows come back in the
    /// order given.
    pub fn embed(&self, texts: &[&str]) -> Result<Embeddings, ModelError> {
        self.embed_with(texts, Grouping::ByLength)
    }

    pub fn embed_with(&self, texts: &[&str], grouping: Grouping) -> Result<Embeddings, ModelError> {
        let rows = texts.len();
        let mut out = Embeddings {
            data: vec![0.0; rows * self.dim],
            rows,
            dim: self.dim,
            tokens_computed: 0,
            tokens_real: 0,
            tokens: Vec::new(),
            phases: Vec::new(),
        };
        if rows == 0 {
            return Ok(out);
        }
        // One tokenizer pass; encodings are right-padded to the batch's longest, so a
        // group just cuts its rows to its own longest.
        let started = std::time::SystemTime::now();
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| ModelError::Tokenize(e.to_string()))?;
        out.phases.push(Phase::since("tokenize", started));
        let lens: Vec<usize> = encodings
            .iter()
            .map(|e| e.get_attention_mask().iter().filter(|&&m| m == 1).count())
            .collect();
        out.tokens = lens.clone();
        let groups = match grouping {
            Grouping::Single => vec![(0..rows).collect()],
            Grouping::ByLength => plan_groups(&lens, PASS_OVERHEAD_TOKENS),
        };
        for group in groups {
            let len = group.iter().map(|&i| lens[i]).max().unwrap_or(1).max(1);
            let n = group.len();
            let mut ids = Vec::with_capacity(n * len);
            let mut types = Vec::with_capacity(n * len);
            let mut mask = Vec::with_capacity(n * len);
            for &i in &group {
                let e = &encodings[i];
                ids.extend_from_slice(&e.get_ids()[..len]);
                types.extend_from_slice(&e.get_type_ids()[..len]);
                mask.extend_from_slice(&e.get_attention_mask()[..len]);
            }
            out.tokens_computed += n * len;
            out.tokens_real += group.iter().map(|&i| lens[i]).sum::<usize>();
            let pooled = self.forward(ids, types, mask, (n, len), &mut out.phases)?;
            for (k, &i) in group.iter().enumerate() {
                out.data[i * self.dim..(i + 1) * self.dim]
                    .copy_from_slice(&pooled[k * self.dim..(k + 1) * self.dim]);
            }
        }
        Ok(out)
    }

    /// One forward pass over `rows` texts of `len` tokens; pooled rows, row-major.
    fn forward(
        &self,
        ids: Vec<u32>,
        types: Vec<u32>,
        mask: Vec<u32>,
        (rows, len): (usize, usize),
        phases: &mut Vec<Phase>,
    ) -> Result<Vec<f32>, ModelError> {
        let started = std::time::SystemTime::now();
        let ids = Tensor::from_vec(ids, (rows, len), &self.device)?;
        let types = Tensor::from_vec(types, (rows, len), &self.device)?;
        let mask = Tensor::from_vec(mask, (rows, len), &self.device)?;
        let hidden = self.model.forward(&ids, &types, &mask)?; // [rows, len, dim]
        phases.push(Phase::since("forward", started));
        let started = std::time::SystemTime::now();
        let pooled = match self.pooling {
            Pooling::Cls => hidden.i((.., 0))?,
            Pooling::Mean => {
                let m = mask.to_dtype(DType::F32)?.unsqueeze(2)?; // [rows, len, 1]
                let summed = hidden.broadcast_mul(&m)?.sum(1)?; // [rows, dim]
                let counts = m.sum(1)?.clamp(1e-9, f64::MAX)?; // [rows, 1]
                summed.broadcast_div(&counts)?
            }
        };
        let pooled = if self.normalize {
            l2_normalize(&pooled)?
        } else {
            pooled
        };
        let pooled = pooled.flatten_all()?.to_vec1::<f32>()?;
        phases.push(Phase::since("pool", started));
        Ok(pooled)
    }
}

/// How a batch is cut into forward passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grouping {
    /// One pass, everything padded to the longest text.
    Single,
    /// Length-sorted groups chosen to minimise padded work plus per-pass overhead.
    ByLength,
}

/// What one extra forward pass costs, in padded token positions. Measured on 2 CPU
/// cores with MiniLM: a pass over few rows runs the matrix kernels far below their
/// efficiency on many rows, worth about this many tokens of work.
pub const PASS_OVERHEAD_TOKENS: usize = 32;

/// Splits texts (by token length) into groups, each a forward pass padded to its own
/// longest, minimising `passes x overhead + padded tokens`. Exact, by dynamic
/// programming over the length-sorted order (contiguous groups are optimal there).
pub fn plan_groups(lens: &[usize], overhead: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lens.len()).collect();
    order.sort_by_key(|&i| lens[i]);
    let n = order.len();
    // best[j]: cost of the first j sorted texts; cut[j]: where their last group starts.
    let mut best = vec![0usize; n + 1];
    let mut cut = vec![0usize; n + 1];
    for j in 1..=n {
        let longest = lens[order[j - 1]].max(1);
        let (mut b, mut c) = (usize::MAX, 0);
        for (i, &before) in best[..j].iter().enumerate() {
            let cost = before + overhead + (j - i) * longest;
            if cost < b {
                b = cost;
                c = i;
            }
        }
        best[j] = b;
        cut[j] = c;
    }
    let mut groups = Vec::new();
    let mut j = n;
    while j > 0 {
        groups.push(order[cut[j]..j].to_vec());
        j = cut[j];
    }
    groups.reverse();
    groups
}

fn l2_normalize(t: &Tensor) -> candle_core::Result<Tensor> {
    let norm = t.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
    t.broadcast_div(&norm)
}

/// Pooling mode from `1_Pooling/config.json` (or the path modules.json names), and
/// whether modules.json ends with a Normalize module. Absent files mean mean pooling
/// without normalisation, which is what a plain BERT checkpoint gets.
fn pooling_config(dir: &Path) -> Result<(Pooling, bool), ModelError> {
    let modules_path = dir.join("modules.json");
    let mut pooling_dir = dir.join("1_Pooling");
    let mut normalize = false;
    if let Ok(text) = std::fs::read_to_string(&modules_path) {
        let modules: Vec<serde_json::Value> =
            serde_json::from_str(&text).map_err(|e| load_err(&modules_path, e))?;
        for m in &modules {
            let ty = m["type"].as_str().unwrap_or_default();
            if ty.ends_with(".Normalize") {
                normalize = true;
            } else if ty.ends_with(".Pooling") {
                if let Some(p) = m["path"].as_str() {
                    pooling_dir = dir.join(p);
                }
            } else if !ty.ends_with(".Transformer") {
                return Err(load_err(
                    &modules_path,
                    format!("unsupported sentence-transformers module {ty:?}"),
                ));
            }
        }
    }
    let pool_path = pooling_dir.join("config.json");
    let pooling = match std::fs::read_to_string(&pool_path) {
        Err(_) => Pooling::Mean,
        Ok(text) => {
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| load_err(&pool_path, e))?;
            let on = |k: &str| v[k].as_bool().unwrap_or(false);
            match (on("pooling_mode_cls_token"), on("pooling_mode_mean_tokens")) {
                (true, false) => Pooling::Cls,
                (false, true) => Pooling::Mean,
                _ => {
                    return Err(load_err(
                        &pool_path,
                        "only one of pooling_mode_mean_tokens or pooling_mode_cls_token is supported",
                    ));
                }
            }
        }
    };
    Ok((pooling, normalize))
}

fn max_seq_length(dir: &Path) -> Option<usize> {
    let text = std::fs::read_to_string(dir.join("sentence_bert_config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["max_seq_length"].as_u64().map(|n| n as usize)
}

#[cfg(test)]
mod tests {
    use super::plan_groups;

    fn cost(lens: &[usize], groups: &[Vec<usize>], overhead: usize) -> usize {
        groups
            .iter()
            .map(|g| overhead + g.len() * g.iter().map(|&i| lens[i]).max().unwrap())
            .sum()
    }

    #[test]
    fn every_text_is_in_exactly_one_group() {
        let lens = [5, 40, 3, 3, 60, 7, 12, 3, 41, 9];
        let groups = plan_groups(&lens, 32);
        let mut seen: Vec<usize> = groups.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..lens.len()).collect::<Vec<_>>());
    }

    #[test]
    fn equal_lengths_stay_one_pass_and_extremes_split() {
        assert_eq!(plan_groups(&[10; 16], 32).len(), 1);
        let mut lens = vec![4; 31];
        lens.push(200);
        let groups = plan_groups(&lens, 32);
        assert_eq!(groups.len(), 2, "{groups:?}");
        assert_eq!(groups[1], vec![31]);
    }

    #[test]
    fn never_costs_more_than_one_pass() {
        let lens = [5, 40, 3, 3, 60, 7, 12, 3, 41, 9, 15, 15, 16, 2];
        let groups = plan_groups(&lens, 32);
        let single = 32 + lens.len() * 60;
        assert!(cost(&lens, &groups, 32) <= single);
    }
}
