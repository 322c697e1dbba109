//! Gemma 3's decoder on candle, over a step of many sequences at once.
//!
//! One step takes a chunk of new tokens from each of several sequences (one token for
//! a sequence that is decoding, a slice of its prompt for one in prefill) and runs
//! them as the rows of one matrix: every projection and feed-forward matmul reads its
//! quantized weights once for all of them. Only attention is per sequence, against
//! that sequence's own KV cache, so sequences of any lengths share a step and a row's
//! result does not depend on what it was batched with.
//!
//! The weights stay quantized as the GGUF has them (candle's quantized matmul); the
//! token embedding too, looked up a row at a time and tied to the output head.
//! Gemma 3's shape: RMS norms before and after attention and the feed-forward (the
//! GGUF's weights already hold Gemma's `1 +`), per-head RMS norms on queries and keys,
//! NeoX-style rotary positions with a local base on sliding-window layers and a global
//! one on every sixth, a GELU (tanh) gated feed-forward, and the embedding scaled by
//! √hidden.

use std::sync::Arc;

use candle_core::quantized::QTensor;

use super::requant::Linear;
use candle_core::{D, DType, Device, Result, Tensor};

use super::gguf::{Gguf, LlmConfig};

struct Layer {
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Linear,
    q_norm: Tensor,
    k_norm: Tensor,
    attn_norm: Tensor,
    post_attn_norm: Tensor,
    ffn_norm: Tensor,
    post_ffn_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
    sliding: bool,
}

pub struct Gemma {
    pub config: LlmConfig,
    embed: Arc<QTensor>,
    head: Linear,
    layers: Vec<Layer>,
    norm: Tensor,
    /// Rotary tables `[positions, head_dim/2]`: (cos, sin) for global and local layers.
    rope_global: (Tensor, Tensor),
    rope_local: (Tensor, Tensor),
    /// Positions the tables cover: the longest sequence this model will run.
    pub max_positions: usize,
    device: Device,
}

/// One sequence's keys and values, every layer, for up to `capacity` positions
/// (reserved whole at admission, so a step never allocates for it).
pub struct KvCache {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Positions filled.
    pub len: usize,
    pub capacity: usize,
}

impl KvCache {
    pub fn new(model: &Gemma, capacity: usize) -> Result<KvCache> {
        let c = &model.config;
        let width = c.kv_heads * c.head_dim;
        let zeros = || Tensor::zeros((capacity.max(1), width), DType::F32, &model.device);
        Ok(KvCache {
            k: (0..c.blocks).map(|_| zeros()).collect::<Result<_>>()?,
            v: (0..c.blocks).map(|_| zeros()).collect::<Result<_>>()?,
            len: 0,
            capacity,
        })
    }
}

/// Which rows of a chunk the step returns logits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    None,
    Last,
    All,
}

/// One sequence's share of a step.
pub struct Chunk<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
    pub want: Want,
}

fn dense(t: QTensor, device: &Device) -> Result<Tensor> {
    t.dequantize(device)?.to_dtype(DType::F32)
}

fn rope_tables(base: f32, head_dim: usize, n: usize, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let inv: Vec<f32> = (0..half)
        .map(|i| 1.0 / base.powf((2 * i) as f32 / head_dim as f32))
        .collect();
    let mut cos = Vec::with_capacity(n * half);
    let mut sin = Vec::with_capacity(n * half);
    for p in 0..n {
        for f in &inv {
            let a = p as f32 * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    Ok((
        Tensor::from_vec(cos, (n, half), device)?,
        Tensor::from_vec(sin, (n, half), device)?,
    ))
}

impl Gemma {
    /// Loads the weights of an opened GGUF; `max_positions` caps the context served.
    pub fn load(g: &mut Gguf, max_positions: usize, device: &Device) -> Result<Gemma> {
        let c = g.config.clone();
        let mut qt = |name: &str| {
            let t = g.content.tensor(&mut g.reader, name, device)?;
            super::requant::widen(t, device)
        };
        let norm = dense(qt("output_norm.weight")?, device)?;
        let mut layers = Vec::with_capacity(c.blocks);
        for i in 0..c.blocks {
            let n = |s: &str| format!("blk.{i}.{s}.weight");
            layers.push(Layer {
                q_norm: dense(qt(&n("attn_q_norm"))?, device)?,
                k_norm: dense(qt(&n("attn_k_norm"))?, device)?,
                attn_norm: dense(qt(&n("attn_norm"))?, device)?,
                post_attn_norm: dense(qt(&n("post_attention_norm"))?, device)?,
                ffn_norm: dense(qt(&n("ffn_norm"))?, device)?,
                post_ffn_norm: dense(qt(&n("post_ffw_norm"))?, device)?,
                wq: Linear::new(qt(&n("attn_q"))?, device)?,
                wk: Linear::new(qt(&n("attn_k"))?, device)?,
                wv: Linear::new(qt(&n("attn_v"))?, device)?,
                wo: Linear::new(qt(&n("attn_output"))?, device)?,
                gate: Linear::new(qt(&n("ffn_gate"))?, device)?,
                up: Linear::new(qt(&n("ffn_up"))?, device)?,
                down: Linear::new(qt(&n("ffn_down"))?, device)?,
                sliding: c.is_sliding(i),
            });
        }
        let embed = Arc::new(qt("token_embd.weight")?);
        let (rows, width) = embed.shape().dims2()?;
        if width != c.hidden || rows != c.vocab {
            candle_core::bail!(
                "token_embd.weight is {rows}x{width}; the metadata says {}x{}",
                c.vocab,
                c.hidden
            );
        }
        let head = match qt("output.weight") {
            Ok(t) => Linear::new(t, device)?,
            Err(_) => Linear::shared(embed.clone(), device)?,
        };
        let max_positions = max_positions.min(c.context).max(1);
        Ok(Gemma {
            rope_global: rope_tables(c.rope_global, c.head_dim, max_positions, device)?,
            rope_local: rope_tables(c.rope_local, c.head_dim, max_positions, device)?,
            max_positions,
            embed,
            head,
            layers,
            norm,
            config: c,
            device: device.clone(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Runs one step: each chunk's tokens appended to its cache, and per chunk the
    /// logits `[rows, vocab]` it wants (`None` for `Want::None`).
    pub fn step(&self, chunks: &mut [Chunk<'_>]) -> Result<Vec<Option<Tensor>>> {
        let c = &self.config;
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        for ch in chunks.iter() {
            if ch.cache.len + ch.tokens.len() > ch.cache.capacity.min(self.max_positions) {
                candle_core::bail!(
                    "a sequence of {} positions outgrew its cache of {}",
                    ch.cache.len + ch.tokens.len(),
                    ch.cache.capacity.min(self.max_positions)
                );
            }
            ids.extend_from_slice(ch.tokens);
            positions.extend((0..ch.tokens.len()).map(|i| (ch.cache.len + i) as u32));
        }
        let rows = ids.len();
        if rows == 0 {
            return Ok(chunks.iter().map(|_| None).collect());
        }
        if let Some(&bad) = ids.iter().find(|&&t| t as usize >= c.vocab) {
            candle_core::bail!("token {bad} is outside the vocabulary of {}", c.vocab);
        }
        let ids = Tensor::from_vec(ids, rows, &self.device)?;
        let positions = Tensor::from_vec(positions, rows, &self.device)?;
        let mut x = (self.embed.embedding(&ids)? * (c.hidden as f64).sqrt())?;
        let global = (
            self.rope_global.0.index_select(&positions, 0)?,
            self.rope_global.1.index_select(&positions, 0)?,
        );
        let local = (
            self.rope_local.0.index_select(&positions, 0)?,
            self.rope_local.1.index_select(&positions, 0)?,
        );
        let eps = c.rms_eps as f32;
        let rms = candle_nn::ops::rms_norm;
        for (li, layer) in self.layers.iter().enumerate() {
            let h = rms(&x, &layer.attn_norm, eps)?;
            let q = layer.wq.forward(&h)?;
            let k = layer.wk.forward(&h)?;
            let v = layer.wv.forward(&h)?;
            let q = rms(
                &q.reshape((rows * c.heads, c.head_dim))?,
                &layer.q_norm,
                eps,
            )?;
            let k = rms(
                &k.reshape((rows * c.kv_heads, c.head_dim))?,
                &layer.k_norm,
                eps,
            )?;
            let (cos, sin) = if layer.sliding { &local } else { &global };
            let q = candle_nn::rotary_emb::rope_thd(
                &q.reshape((1, rows, c.heads, c.head_dim))?,
                cos,
                sin,
            )?
            .reshape((rows, c.heads * c.head_dim))?;
            let k = candle_nn::rotary_emb::rope_thd(
                &k.reshape((1, rows, c.kv_heads, c.head_dim))?,
                cos,
                sin,
            )?
            .reshape((rows, c.kv_heads * c.head_dim))?;
            let mut outs = Vec::with_capacity(chunks.len());
            let mut r0 = 0;
            for ch in chunks.iter_mut() {
                let n = ch.tokens.len();
                if n == 0 {
                    continue;
                }
                let pos0 = ch.cache.len;
                ch.cache.k[li].slice_set(&k.narrow(0, r0, n)?.contiguous()?, 0, pos0)?;
                ch.cache.v[li].slice_set(&v.narrow(0, r0, n)?.contiguous()?, 0, pos0)?;
                outs.push(self.attend(li, &q.narrow(0, r0, n)?, ch.cache, pos0, n)?);
                r0 += n;
            }
            let attn = Tensor::cat(&outs, 0)?;
            let o = rms(&layer.wo.forward(&attn)?, &layer.post_attn_norm, eps)?;
            x = (x + o)?;
            let h = rms(&x, &layer.ffn_norm, eps)?;
            let a = (layer.gate.forward(&h)?.gelu()? * layer.up.forward(&h)?)?;
            let d = rms(&layer.down.forward(&a)?, &layer.post_ffn_norm, eps)?;
            x = (x + d)?;
        }
        // Logits only for the rows asked for: the output head is the largest matmul.
        let mut wanted = Vec::new();
        let mut spans = Vec::with_capacity(chunks.len());
        let mut r0 = 0u32;
        for ch in chunks.iter_mut() {
            let n = ch.tokens.len() as u32;
            let start = wanted.len();
            match ch.want {
                Want::None => {}
                Want::Last if n > 0 => wanted.push(r0 + n - 1),
                Want::Last => {}
                Want::All => wanted.extend(r0..r0 + n),
            }
            spans.push((start, wanted.len() - start));
            ch.cache.len += n as usize;
            r0 += n;
        }
        if wanted.is_empty() {
            return Ok(spans.iter().map(|_| None).collect());
        }
        let sel = Tensor::from_vec(wanted.clone(), wanted.len(), &self.device)?;
        let h = rms(&x.index_select(&sel, 0)?, &self.norm, eps)?;
        let logits = self.head.forward(&h)?;
        spans
            .into_iter()
            .map(|(start, n)| (n > 0).then(|| logits.narrow(0, start, n)).transpose())
            .collect()
    }

    /// Attention of one chunk's `n` queries (from position `pos0`) over its cache.
    fn attend(
        &self,
        li: usize,
        q: &Tensor,
        cache: &KvCache,
        pos0: usize,
        n: usize,
    ) -> Result<Tensor> {
        let c = &self.config;
        let sliding = self.layers[li].sliding;
        let end = pos0 + n;
        // The earliest key any of these queries sees.
        let first = if sliding {
            (pos0 + 1).saturating_sub(c.sliding_window)
        } else {
            0
        };
        let len = end - first;
        let k = cache.k[li].narrow(0, first, len)?;
        let v = cache.v[li].narrow(0, first, len)?;
        let group = c.heads / c.kv_heads;
        let scale = f64::from(c.query_scale).powf(-0.5);
        // Causal and window mask, needed only when several queries share the chunk.
        let mask = if n > 1 {
            let mut m = Vec::with_capacity(n * group * len);
            for t in 0..n {
                let p = pos0 + t;
                for _ in 0..group {
                    m.extend((first..end).map(|kp| {
                        let seen = kp <= p && (!sliding || p - kp < c.sliding_window);
                        if seen { 0f32 } else { f32::NEG_INFINITY }
                    }));
                }
            }
            Some(Tensor::from_vec(m, (n * group, len), &self.device)?)
        } else {
            None
        };
        let q = q.reshape((n, c.heads, c.head_dim))?;
        let mut heads = Vec::with_capacity(c.kv_heads);
        for g in 0..c.kv_heads {
            let qg = q
                .narrow(1, g * group, group)?
                .contiguous()?
                .reshape((n * group, c.head_dim))?;
            let (kg, vg) = if c.kv_heads == 1 {
                (k.clone(), v.clone())
            } else {
                let w = c.head_dim;
                (
                    k.narrow(1, g * w, w)?.contiguous()?,
                    v.narrow(1, g * w, w)?.contiguous()?,
                )
            };
            let mut s = (qg.matmul(&kg.t()?)? * scale)?;
            if let Some(m) = &mask {
                s = (s + m)?;
            }
            let p = candle_nn::ops::softmax_last_dim(&s)?;
            heads.push(p.matmul(&vg)?.reshape((n, group * c.head_dim))?);
        }
        if heads.len() == 1 {
            Ok(heads.pop().expect("one head group"))
        } else {
            Tensor::cat(&heads, D::Minus1)
        }
    }
}
