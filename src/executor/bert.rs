//! BERT, the encoder half only, as sentence embedding needs it: the same weights, names
//! and arithmetic as `candle_transformers::models::bert::BertModel` (a test holds the
//! outputs equal), with changes where the time goes on a CPU: query, key and value are
//! one stacked linear layer, attention is one operation on the CPU ([`Attention`]),
//! and linear layers pick their multiplication order by the number of rows.
//!
//! A linear layer computes `x * W^T` with `W` stored `[out, in]`. candle hands gemm the
//! transposed view of `W`, which gemm repacks on every call: at batch 1 that repacking
//! was about 44% of a MiniLM pass's samples. For passes of at most [`SMALL_ROWS`] token
//! rows this layer computes `(W * x^T)^T` instead, where `W` is read in place and the
//! small `x` is what gets packed; above that the usual order is faster (measured, see
//! docs/benchmarks.md) and is used. Hidden states stay `[rows, hidden]` between
//! layers; only attention off the CPU sees the `[batch, heads, len, head]` shape.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, D, DType, Layout, Module, Result, Shape, Tensor,
};
use candle_nn::{Embedding, LayerNorm, VarBuilder, embedding, layer_norm};
use candle_transformers::models::bert::{Config, HiddenAct};
use rayon::prelude::*;

/// Token rows (texts x tokens in a pass) up to which [`Dense`] multiplies `W * x^T`.
pub const SMALL_ROWS: usize = 64;

/// A linear layer that picks its multiplication order by the number of rows.
pub struct Dense {
    /// `[out, in]`, as stored in the checkpoint.
    weight: Tensor,
    /// `[out]`.
    bias: Tensor,
    small_rows: usize,
}

impl Dense {
    pub fn load(inp: usize, out: usize, vb: VarBuilder) -> Result<Dense> {
        Ok(Dense {
            weight: vb.get((out, inp), "weight")?,
            bias: vb.get(out, "bias")?,
            small_rows: SMALL_ROWS,
        })
    }

    /// Several layers over the same input as one: their outputs side by side, in order.
    fn stacked(parts: &[Dense]) -> Result<Dense> {
        let weights: Vec<&Tensor> = parts.iter().map(|d| &d.weight).collect();
        let biases: Vec<&Tensor> = parts.iter().map(|d| &d.bias).collect();
        Ok(Dense {
            weight: Tensor::cat(&weights, 0)?,
            bias: Tensor::cat(&biases, 0)?,
            small_rows: SMALL_ROWS,
        })
    }

    /// `x`: `[rows, in]`; returns `[rows, out]`, contiguous.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let rows = x.dim(0)?;
        // On a GPU the library picks its own order; the repacking is a CPU matter.
        if rows <= self.small_rows && x.device().is_cpu() {
            // [out, in] x [in, rows] -> [out, rows]; the bias add writes it back as
            // [rows, out] in the same pass over the data.
            self.weight.matmul(&x.t()?)?.t()?.broadcast_add(&self.bias)
        } else {
            x.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)
        }
    }
}

struct Embeddings {
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    norm: LayerNorm,
}

impl Embeddings {
    fn load(vb: VarBuilder, c: &Config) -> Result<Embeddings> {
        Ok(Embeddings {
            word: embedding(c.vocab_size, c.hidden_size, vb.pp("word_embeddings"))?,
            position: embedding(
                c.max_position_embeddings,
                c.hidden_size,
                vb.pp("position_embeddings"),
            )?,
            token_type: embedding(
                c.type_vocab_size,
                c.hidden_size,
                vb.pp("token_type_embeddings"),
            )?,
            norm: layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("LayerNorm"))?,
        })
    }

    /// `[batch, len]` ids -> `[batch, len, hidden]`.
    fn forward(&self, ids: &Tensor, types: &Tensor) -> Result<Tensor> {
        let (_, len) = ids.dims2()?;
        let x = (self.word.forward(ids)? + self.token_type.forward(types)?)?;
        let positions = Tensor::arange(0u32, len as u32, ids.device())?;
        let x = x.broadcast_add(&self.position.forward(&positions)?)?;
        self.norm.forward(&x)
    }
}

struct Layer {
    /// Query, key and value in one: `[rows, hidden]` -> `[rows, 3 * hidden]`.
    qkv: Dense,
    attention_out: Dense,
    attention_norm: LayerNorm,
    intermediate: Dense,
    output: Dense,
    output_norm: LayerNorm,
    attention: Attention,
    act: HiddenAct,
}

impl Layer {
    fn load(vb: VarBuilder, c: &Config) -> Result<Layer> {
        let h = c.hidden_size;
        let attn = vb.pp("attention");
        let own = attn.pp("self");
        Ok(Layer {
            qkv: Dense::stacked(&[
                Dense::load(h, h, own.pp("query"))?,
                Dense::load(h, h, own.pp("key"))?,
                Dense::load(h, h, own.pp("value"))?,
            ])?,
            attention_out: Dense::load(h, h, attn.pp("output").pp("dense"))?,
            attention_norm: layer_norm(h, c.layer_norm_eps, attn.pp("output").pp("LayerNorm"))?,
            intermediate: Dense::load(h, c.intermediate_size, vb.pp("intermediate").pp("dense"))?,
            output: Dense::load(c.intermediate_size, h, vb.pp("output").pp("dense"))?,
            output_norm: layer_norm(h, c.layer_norm_eps, vb.pp("output").pp("LayerNorm"))?,
            attention: Attention {
                heads: c.num_attention_heads,
                head_size: h / c.num_attention_heads,
            },
            act: c.hidden_act,
        })
    }

    /// `x`: `[batch * len, hidden]`; `mask`: `[batch, len]`, 1 for real tokens.
    fn forward(&self, x: &Tensor, mask: &Tensor, batch: usize, len: usize) -> Result<Tensor> {
        let qkv = self.qkv.forward(x)?;
        let context = if qkv.device().is_cpu() {
            qkv.apply_op2_no_bwd(mask, &self.attention)?
        } else {
            self.attention_tensors(&qkv, mask, batch, len)?
        };
        let attended = self
            .attention_norm
            .forward(&(self.attention_out.forward(&context)? + x)?)?;
        let inner = self.intermediate.forward(&attended)?;
        let inner = match self.act {
            HiddenAct::Gelu if inner.device().is_cpu() => inner.apply_op1_no_bwd(&GeluErf)?,
            HiddenAct::Gelu => inner.gelu_erf()?,
            HiddenAct::GeluApproximate => inner.gelu()?,
            HiddenAct::Relu => inner.relu()?,
        };
        self.output_norm
            .forward(&(self.output.forward(&inner)? + attended)?)
    }
}

impl Layer {
    /// Attention with tensor operations, for devices other than the CPU.
    fn attention_tensors(
        &self,
        qkv: &Tensor,
        mask: &Tensor,
        batch: usize,
        len: usize,
    ) -> Result<Tensor> {
        let Attention { heads, head_size } = self.attention;
        let h = heads * head_size;
        let split = |i: usize| {
            qkv.narrow(1, i * h, h)?
                .reshape((batch, len, heads, head_size))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = (split(0)?, split(1)?, split(2)?);
        // Padding gets f32::MIN added to its attention scores: softmax gives it 0.
        let additive = ((1.0 - mask.to_dtype(DType::F32)?.reshape((batch, 1, 1, len))?)?
            * f64::from(f32::MIN))?;
        let scores = (q.matmul(&k.t()?)? / (head_size as f64).sqrt())?;
        let probs = candle_nn::ops::softmax(&scores.broadcast_add(&additive)?, D::Minus1)?;
        probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((batch * len, h))
    }
}

/// Scaled dot-product attention on the CPU, straight from the stacked query/key/value
/// rows to the context rows, one token's row (all its heads) a task. candle's form
/// (split heads, two batched matmuls with a gemm call per text and head, the additive
/// mask, softmax, join heads) is ten operations and as many buffers per layer, most of
/// a short text's pass outside the dense layers. Padded keys are skipped, which is what
/// the additive mask's `f32::MIN` does (their softmax weight is exactly 0); a text with
/// no real token averages all its positions' values, as the mask makes it (every score
/// swamped by `f32::MIN`, so the softmax is uniform).
///
/// Inputs: `[batch * len, 3 * hidden]` (query, key, value side by side) and the mask
/// `[batch, len]` (u32, 1 for real tokens). Output: `[batch * len, hidden]`.
#[derive(Clone, Copy)]
struct Attention {
    heads: usize,
    head_size: usize,
}

impl CustomOp2 for Attention {
    fn name(&self) -> &'static str {
        "braid-attention"
    }

    fn cpu_fwd(
        &self,
        qkv: &CpuStorage,
        qkv_layout: &Layout,
        mask: &CpuStorage,
        mask_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (
            CpuStorage::F32(qkv),
            CpuStorage::U32(mask),
            Some((qs, qe)),
            Some((ms, me)),
            &[rows, width],
            &[batch, len],
        ) = (
            qkv,
            mask,
            qkv_layout.contiguous_offsets(),
            mask_layout.contiguous_offsets(),
            qkv_layout.dims(),
            mask_layout.dims(),
        )
        else {
            candle_core::bail!("attention: contiguous f32 [rows, 3h] and u32 [batch, len] only")
        };
        let (heads, hs) = (self.heads, self.head_size);
        let h = heads * hs;
        if width != 3 * h || rows != batch * len || len == 0 {
            candle_core::bail!("attention: [{rows}, {width}] for {batch}x{len} and {heads} heads");
        }
        let (qkv, mask) = (&qkv[qs..qe], &mask[ms..me]);
        let scale = 1.0 / (hs as f32).sqrt();
        let mut out = vec![0f32; rows * h];
        out.par_chunks_mut(h)
            .enumerate()
            .with_min_len(ATTENTION_ROWS_PER_TASK)
            .for_each_init(
                || vec![0f32; len],
                |weights, (row, out)| {
                    let text = row / len;
                    let first = text * len;
                    let real = &mask[first..first + len];
                    let none = real.iter().all(|&m| m == 0);
                    let query = &qkv[row * width..row * width + h];
                    for head in 0..heads {
                        let at = head * hs;
                        let q = &query[at..at + hs];
                        let mut sum = 0f32;
                        if none {
                            weights.fill(1.0);
                            sum = len as f32;
                        } else {
                            let mut max = f32::NEG_INFINITY;
                            for (j, w) in weights.iter_mut().enumerate() {
                                if real[j] == 0 {
                                    continue;
                                }
                                let key = &qkv[(first + j) * width + h + at..][..hs];
                                let s = dot(q, key) * scale;
                                *w = s;
                                max = max.max(s);
                            }
                            for (j, w) in weights.iter_mut().enumerate() {
                                if real[j] == 0 {
                                    *w = 0.0;
                                    continue;
                                }
                                *w = (*w - max).exp();
                                sum += *w;
                            }
                        }
                        let o = &mut out[at..at + hs];
                        for (j, &w) in weights.iter().enumerate() {
                            if w == 0.0 {
                                continue;
                            }
                            let value = &qkv[(first + j) * width + 2 * h + at..][..hs];
                            let w = w / sum;
                            for (o, v) in o.iter_mut().zip(value) {
                                *o += w * v;
                            }
                        }
                    }
                },
            );
        Ok((CpuStorage::F32(out), Shape::from((rows, h))))
    }
}

/// Token rows one attention task takes (a row is about `heads * len * head_size * 4`
/// multiply-adds: a few thousand for a short text).
const ATTENTION_ROWS_PER_TASK: usize = 8;

/// A dot product in eight lanes, which the compiler keeps in vector registers.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `gelu(x) = x/2 (1 + erf(x/sqrt 2))`, what BERT's `"gelu"` means, on the CPU. candle
/// computes it with libm's scalar `erff`, which was 12% of a MiniLM pass's samples at
/// batch 32 (`perf record`, docs/benchmarks.md); this is a rational approximation of erf
/// with no branches, which the compiler vectorises, split across the compute pool.
/// A test holds it within 1e-6 (relative above 1) of candle's `gelu_erf`.
struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "braid-gelu-erf"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(data), Some((start, end))) = (storage, layout.contiguous_offsets())
        else {
            candle_core::bail!("gelu: contiguous f32 input only")
        };
        let src = &data[start..end];
        let mut out = vec![0f32; src.len()];
        out.par_chunks_mut(GELU_CHUNK)
            .zip(src.par_chunks(GELU_CHUNK))
            .for_each(|(o, i)| {
                for (o, &x) in o.iter_mut().zip(i) {
                    *o = 0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
                }
            });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

const GELU_CHUNK: usize = 8192;

/// erf for f32 as a ratio of an odd and an even polynomial on [-4, 4] (beyond which
/// f32 erf is +-1): the form and coefficients Eigen and XLA use for single precision.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10_f32;
    p = p * x2 + 2.770_681_4e-8;
    p = p * x2 - 2.101_024e-6;
    p = p * x2 - 5.692_506_4e-5;
    p = p * x2 - 7.349_906_3e-4;
    p = p * x2 - 2.954_6e-3;
    p = p * x2 - 1.609_603_3e-2;
    let mut q = -1.456_607_2e-5_f32;
    q = q * x2 - 2.133_740_6e-4;
    q = q * x2 - 1.682_827e-3;
    q = q * x2 - 7.373_329_2e-3;
    q = q * x2 - 1.426_474e-2;
    x * p / q
}

/// The BERT encoder: token ids in, last hidden states out.
pub struct Bert {
    embeddings: Embeddings,
    layers: Vec<Layer>,
    hidden: usize,
}

impl Bert {
    /// Loads from the names a Hugging Face BERT checkpoint uses, with or without the
    /// `bert.` (or `<model_type>.`) prefix, like candle's `BertModel::load`.
    pub fn load(vb: VarBuilder, c: &Config) -> Result<Bert> {
        let mut prefixed = vec![vb.clone()];
        if vb.contains_tensor("bert.embeddings.word_embeddings.weight") {
            prefixed.insert(0, vb.pp("bert"));
        }
        if let Some(t) = &c.model_type {
            prefixed.push(vb.pp(t));
        }
        let mut first_err = None;
        for vb in prefixed {
            match Self::load_at(vb, c) {
                Ok(b) => return Ok(b),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        Err(first_err.expect("at least one prefix tried"))
    }

    fn load_at(vb: VarBuilder, c: &Config) -> Result<Bert> {
        let embeddings = Embeddings::load(vb.pp("embeddings"), c)?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| Layer::load(vb.pp("encoder").pp(format!("layer.{i}")), c))
            .collect::<Result<Vec<_>>>()?;
        Ok(Bert {
            embeddings,
            layers,
            hidden: c.hidden_size,
        })
    }

    /// `ids`, `types`, `mask`: `[batch, len]` (mask 1 for real tokens, 0 for padding).
    /// Returns `[batch, len, hidden]`.
    pub fn forward(&self, ids: &Tensor, types: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (batch, len) = ids.dims2()?;
        let x = self.embeddings.forward(ids, types)?;
        let mut x = x.reshape((batch * len, self.hidden))?;
        let mask = mask.to_dtype(DType::U32)?.contiguous()?;
        for layer in &self.layers {
            x = layer.forward(&x, &mask, batch, len)?;
        }
        x.reshape((batch, len, self.hidden))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::VarMap;
    use candle_transformers::models::bert::BertModel;
    use std::collections::HashMap;

    fn config() -> Config {
        Config {
            vocab_size: 50,
            hidden_size: 32,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            intermediate_size: 64,
            max_position_embeddings: 40,
            ..Config::default()
        }
    }

    /// Random weights under the checkpoint's names, made by loading candle's model.
    fn random_weights() -> HashMap<String, Tensor> {
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
        BertModel::load(vb, &config()).unwrap();
        let data = map.data().lock().unwrap();
        data.iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect()
    }

    fn builder(tensors: HashMap<String, Tensor>) -> VarBuilder<'static> {
        VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu)
    }

    fn inputs(batch: usize, len: usize) -> (Tensor, Tensor, Tensor) {
        let ids: Vec<u32> = (0..batch * len).map(|i| (i * 7 % 50) as u32).collect();
        let types = vec![0u32; batch * len];
        // Row r has len - r real tokens (at least 1), the rest padding.
        let mask: Vec<u32> = (0..batch * len)
            .map(|i| u32::from(i % len < (len - (i / len) % len).max(1)))
            .collect();
        let t = |v: Vec<u32>| Tensor::from_vec(v, (batch, len), &Device::Cpu).unwrap();
        (t(ids), t(types), t(mask))
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// Both multiplication orders, padding and several lengths: the same hidden states
    /// as candle's BertModel on the same weights.
    #[test]
    fn equals_candles_bert() {
        let vb = builder(random_weights());
        let ours = Bert::load(vb.clone(), &config()).unwrap();
        let reference = BertModel::load(vb, &config()).unwrap();
        // 1x5 and 4x16 rows take the small-row order; 5x20 rows the usual one.
        for (batch, len) in [(1, 5), (4, 16), (5, 20)] {
            let (ids, types, mask) = inputs(batch, len);
            let got = ours.forward(&ids, &types, &mask).unwrap();
            let want = reference.forward(&ids, &types, Some(&mask)).unwrap();
            assert_eq!(got.dims(), want.dims());
            let d = max_diff(&got, &want);
            let scale = want
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let bound = crate::executor::model::bert_bound(2, 32, 64, len, scale);
            assert!(d <= bound, "{batch}x{len}: max difference {d} (> {bound})");
        }
    }

    #[test]
    fn gelu_matches_candles_to_a_millionth() {
        let xs: Vec<f32> = (-200_000..=200_000).map(|i| i as f32 * 5e-5).collect();
        let mut xs = xs;
        xs.extend([-30.0, -4.0, 4.0, 30.0, f32::MIN_POSITIVE, -0.0]);
        let t = Tensor::new(xs.as_slice(), &Device::Cpu).unwrap();
        let ours = t
            .apply_op1_no_bwd(&GeluErf)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let theirs = t.gelu_erf().unwrap().to_vec1::<f32>().unwrap();
        // Within a millionth, relative to the value for |x| > 1 (where 1e-6 is ~2 ulp).
        let worst = xs
            .iter()
            .zip(ours.iter().zip(&theirs))
            .map(|(x, (a, b))| ((a - b).abs() / x.abs().max(1.0), *x))
            .fold((0f32, 0f32), |w, d| if d.0 > w.0 { d } else { w });
        assert!(worst.0 <= 1e-6, "difference {} at x = {}", worst.0, worst.1);
        // Not contiguous: refused rather than read wrongly.
        let m = Tensor::new(&[[1f32, 2.], [3., 4.]], &Device::Cpu).unwrap();
        assert!(m.t().unwrap().apply_op1_no_bwd(&GeluErf).is_err());
    }

    /// The CPU's attention against the tensor form on the same rows: texts of several
    /// lengths padded to one, and a text with no real token (a uniform average).
    #[test]
    fn attention_equals_the_tensor_form() {
        let vb = builder(random_weights());
        let layer = Layer::load(vb.pp("encoder.layer.0"), &config()).unwrap();
        let (batch, len) = (4, 7);
        let qkv = Tensor::randn(0f32, 2.0, (batch * len, 3 * 32), &Device::Cpu).unwrap();
        let lens = [7u32, 3, 1, 0];
        let mask: Vec<u32> = (0..batch * len)
            .map(|i| u32::from((i % len) < lens[i / len] as usize))
            .collect();
        let mask = Tensor::from_vec(mask, (batch, len), &Device::Cpu).unwrap();
        let op = layer.attention;
        assert_eq!((op.heads, op.head_size), (4, 8));
        let ours = qkv.apply_op2_no_bwd(&mask, &op).unwrap();
        let theirs = layer.attention_tensors(&qkv, &mask, batch, len).unwrap();
        assert_eq!(ours.dims(), &[batch * len, 32]);
        // Each output is a convex combination of values weighted by a softmax of 8-term
        // dot products. A score reordered moves by at most `ds` (below); the weights
        // then move by at most 2·ds relative, plus exp's and the division's roundings;
        // the weighted sum over `len` values, reordered, by γ_len of its magnitude.
        let big = |t: Tensor| {
            t.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        let v = big(qkv.narrow(1, 64, 32).unwrap());
        let qk = big(qkv.narrow(1, 0, 64).unwrap());
        let ds = crate::executor::model::reorder_bound(8, 1, qk * qk * 8.0 / 8f32.sqrt());
        let bound = v
            * (2.0 * ds + 4.0 * f32::EPSILON + crate::executor::model::reorder_bound(len, 2, 1.0));
        let d = max_diff(&ours, &theirs);
        assert!(d <= bound, "max difference {d} (> {bound})");
        // The wrong shapes are refused, not read out of bounds.
        let short = qkv.narrow(1, 0, 90).unwrap().contiguous().unwrap();
        assert!(short.apply_op2_no_bwd(&mask, &op).is_err());
        let wrong = Tensor::zeros((batch, len + 1), DType::U32, &Device::Cpu).unwrap();
        assert!(qkv.apply_op2_no_bwd(&wrong, &op).is_err());
    }

    #[test]
    fn both_orders_of_a_dense_layer_agree() {
        let vb = builder(random_weights());
        let mut dense = Dense::load(32, 64, vb.pp("encoder.layer.0.intermediate.dense")).unwrap();
        let x = Tensor::randn(0f32, 1.0, (9, 32), &Device::Cpu).unwrap();
        dense.small_rows = 0;
        let usual = dense.forward(&x).unwrap();
        dense.small_rows = usize::MAX;
        let small = dense.forward(&x).unwrap();
        assert!(small.is_contiguous());
        assert_eq!(small.dims(), &[9, 64]);
        assert!(max_diff(&usual, &small) <= 1e-5);
    }

    #[test]
    fn a_checkpoint_with_the_bert_prefix_loads_the_same() {
        let plain = random_weights();
        let prefixed = plain
            .iter()
            .map(|(k, v)| (format!("bert.{k}"), v.clone()))
            .collect();
        let a = Bert::load(builder(plain), &config()).unwrap();
        let b = Bert::load(builder(prefixed), &config()).unwrap();
        let (ids, types, mask) = inputs(2, 6);
        let (a, b) = (
            a.forward(&ids, &types, &mask).unwrap(),
            b.forward(&ids, &types, &mask).unwrap(),
        );
        assert_eq!(max_diff(&a, &b), 0.0);
        let missing = Bert::load(builder(HashMap::new()), &config());
        assert!(missing.is_err());
    }
}
