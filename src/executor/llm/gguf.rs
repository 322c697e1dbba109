//! Opening a GGUF file: its metadata read and checked before any weight is, so a file
//! that is truncated, not GGUF, or of an architecture braid does not run is refused at
//! start with the reason instead of failing (or panicking) halfway through loading.

use std::fs::File;
use std::io::{BufReader, Seek};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};

/// The architectures whose forward pass braid has. llama- and qwen-family GGUFs share
/// this loader and tokenizer; their forward pass (no post-norms, SiLU, no embedding
/// scale) is what adding one would take.
pub const ARCHITECTURES: [&str; 1] = ["gemma3"];

#[derive(Debug, thiserror::Error)]
#[error("{}: {reason}", path.display())]
pub struct GgufError {
    pub path: PathBuf,
    pub reason: String,
}

/// A decoder's shape, from the `<arch>.*` metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct LlmConfig {
    pub arch: String,
    pub blocks: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub rms_eps: f64,
    /// The context the model was trained for (`<arch>.context_length`).
    pub context: usize,
    /// Keys a sliding-window layer attends to (its own position included).
    pub sliding_window: usize,
    /// Every `sliding_pattern`-th layer attends globally; the rest use the window.
    pub sliding_pattern: usize,
    pub rope_global: f32,
    pub rope_local: f32,
    /// Attention scores are scaled by `query_scale^-1/2`.
    pub query_scale: f32,
    pub vocab: usize,
}

impl LlmConfig {
    /// Whether layer `i` attends within the sliding window.
    pub fn is_sliding(&self, layer: usize) -> bool {
        self.sliding_pattern == 0 || !(layer + 1).is_multiple_of(self.sliding_pattern)
    }

    /// Bytes of KV cache one token takes (f32 keys and values, every layer).
    pub fn kv_bytes_per_token(&self) -> usize {
        self.blocks * 2 * self.kv_heads * self.head_dim * 4
    }
}

/// An opened GGUF: its parsed header and a reader positioned anywhere.
pub struct Gguf {
    pub path: PathBuf,
    pub content: Content,
    pub reader: BufReader<File>,
    pub config: LlmConfig,
}

impl Gguf {
    pub fn open(path: &Path) -> Result<Gguf, GgufError> {
        let err = |reason: String| GgufError {
            path: path.to_path_buf(),
            reason,
        };
        let file = File::open(path).map_err(|e| err(format!("cannot open: {e}")))?;
        let len = file
            .metadata()
            .map_err(|e| err(format!("cannot stat: {e}")))?
            .len();
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader)
            .map_err(|e| err(format!("not a readable GGUF file: {e}")))?;
        // Every tensor's bytes must lie inside the file: a cut download fails here.
        for (name, info) in &content.tensor_infos {
            let bytes = info.shape.elem_count() / info.ggml_dtype.block_size()
                * info.ggml_dtype.type_size();
            let end = content.tensor_data_offset + info.offset + bytes as u64;
            if end > len {
                return Err(err(format!(
                    "truncated: tensor {name} ends at byte {end}, the file has {len}"
                )));
            }
        }
        reader
            .rewind()
            .map_err(|e| err(format!("cannot seek: {e}")))?;
        let config = config(&content).map_err(err)?;
        Ok(Gguf {
            path: path.to_path_buf(),
            content,
            reader,
            config,
        })
    }

    pub fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }
}

fn config(ct: &Content) -> Result<LlmConfig, String> {
    let arch = match ct.metadata.get("general.architecture") {
        Some(Value::String(s)) => s.clone(),
        _ => return Err("no general.architecture in its metadata".into()),
    };
    if !ARCHITECTURES.contains(&arch.as_str()) {
        return Err(format!(
            "architecture {arch:?} is not one braid runs (it runs: {})",
            ARCHITECTURES.join(", ")
        ));
    }
    let get = |k: &str| {
        let key = format!("{arch}.{k}");
        ct.metadata
            .get(&key)
            .ok_or_else(|| format!("no {key} in its metadata"))
    };
    let uint = |k: &str| -> Result<usize, String> {
        let v = get(k)?;
        v.to_u64()
            .or_else(|_| v.to_u32().map(u64::from))
            .map(|n| n as usize)
            .map_err(|e| format!("{arch}.{k}: {e}"))
    };
    let float = |k: &str, default: f32| -> Result<f32, String> {
        match get(k) {
            Err(_) => Ok(default),
            Ok(v) => v.to_f32().map_err(|e| format!("{arch}.{k}: {e}")),
        }
    };
    let heads = uint("attention.head_count")?;
    let kv_heads = uint("attention.head_count_kv")?;
    let head_dim = uint("attention.key_length")?;
    if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 || head_dim % 2 != 0 {
        return Err(format!(
            "{heads} query heads over {kv_heads} KV heads of {head_dim}: not a shape braid runs"
        ));
    }
    let vocab = match ct.metadata.get("tokenizer.ggml.tokens") {
        Some(Value::Array(a)) => a.len(),
        _ => return Err("no tokenizer.ggml.tokens in its metadata".into()),
    };
    let config = LlmConfig {
        blocks: uint("block_count")?,
        hidden: uint("embedding_length")?,
        heads,
        kv_heads,
        head_dim,
        ffn: uint("feed_forward_length")?,
        rms_eps: f64::from(float("attention.layer_norm_rms_epsilon", 1e-6)?),
        context: uint("context_length")?,
        sliding_window: uint("attention.sliding_window")?,
        sliding_pattern: uint("attention.sliding_window_pattern").unwrap_or(6),
        rope_global: float("rope.freq_base", 1_000_000.0)?,
        rope_local: float("rope.local_freq_base", 10_000.0)?,
        query_scale: float("attention.query_pre_attn_scalar", head_dim as f32)?,
        vocab,
        arch,
    };
    if config.blocks == 0 || config.hidden == 0 || config.context == 0 {
        return Err(format!("an empty model: {config:?}"));
    }
    Ok(config)
}
