//! Q5_0 weights rewritten as Q8_0 at load, losslessly: a Q5_0 value is `d·(q - 16)`
//! with `q - 16` in -16..=15, which an int8 holds exactly, so the Q8_0 block with the
//! same scale `d` stands for the very same numbers. candle's Q8_0 dot product has a
//! SIMD kernel and its Q5_0 one does not; Gemma 3's Q4_K_M GGUF stores its 640-wide
//! projections (q, k, v, gate, up) as Q5_0, so this is most of a step's arithmetic.
//! The integer dot products against the 8-bit activations are exact either way, as
//! llama.cpp's Q5_0 kernel's are.

use candle_core::quantized::{GgmlDType, QTensor, ggml_file::qtensor_from_ggml};
use candle_core::{Device, Result, Tensor};

/// ggml's `block_q5_0`: f16 scale, 32 high bits, 16 bytes of low nibbles.
const Q5_0_BYTES: usize = 22;
/// ggml's `block_q8_0`: f16 scale, 32 int8.
const Q8_0_BYTES: usize = 34;

/// `t` as Q8_0 when it is Q5_0; anything else as it is.
pub fn widen(t: QTensor, device: &Device) -> Result<QTensor> {
    if t.dtype() != GgmlDType::Q5_0 {
        return Ok(t);
    }
    let data = t.data()?;
    if data.len() % Q5_0_BYTES != 0 {
        candle_core::bail!("Q5_0 data of {} bytes is not whole blocks", data.len());
    }
    let mut out = Vec::with_capacity(data.len() / Q5_0_BYTES * Q8_0_BYTES);
    for b in data.chunks_exact(Q5_0_BYTES) {
        out.extend_from_slice(&b[..2]);
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        let qs = &b[6..22];
        let mut vals = [0u8; 32];
        for j in 0..16 {
            let hi0 = ((qh >> j) & 1) << 4;
            let hi1 = ((qh >> (j + 16)) & 1) << 4;
            let x0 = (u32::from(qs[j] & 0x0F) | hi0) as i32 - 16;
            let x1 = (u32::from(qs[j] >> 4) | hi1) as i32 - 16;
            vals[j] = x0 as i8 as u8;
            vals[j + 16] = x1 as i8 as u8;
        }
        out.extend_from_slice(&vals);
    }
    let dims = t.shape().dims().to_vec();
    drop(data);
    qtensor_from_ggml(GgmlDType::Q8_0, &out, dims, device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Tensor;

    #[test]
    fn q5_0_widened_to_q8_0_stands_for_the_same_numbers() {
        let dev = Device::Cpu;
        let v: Vec<f32> = (0..64 * 3)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let t = Tensor::from_vec(v, (3, 64), &dev).unwrap();
        let q5 = QTensor::quantize(&t, GgmlDType::Q5_0).unwrap();
        let want = q5.dequantize(&dev).unwrap().to_vec2::<f32>().unwrap();
        let q8 = widen(q5, &dev).unwrap();
        assert_eq!(q8.dtype(), GgmlDType::Q8_0);
        assert_eq!(q8.dequantize(&dev).unwrap().to_vec2::<f32>().unwrap(), want);
    }
}

/// The width candle's tiled x86 kernels need of a matmul's inputs.
const TILE_K: usize = 256;

/// Whether candle's x86 Q8_0 tiles (int8 dot-product instructions) run here.
fn tiled_q8_0() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        (is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vnni"))
            || is_x86_feature_detected!("avxvnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A quantized linear layer. A Q8_0 weight whose input width is not a multiple of 256
/// (Gemma 3 270M's are 640) misses candle's tiled x86 kernel and takes its one-row dot
/// product; padded with zero blocks to the next multiple (and its inputs with zeros) it
/// takes the tiles, which read each weight once for many rows. The zeros add nothing
/// to any dot product. Only where those kernels run (a CPU with VNNI).
///
/// Every row's product is the same whatever else the call holds (greedy answers must
/// not change with the batch): candle picks its kernel by the number of rows for some
/// weights, so those calls are shaped to keep one kernel for every row count
/// (`Rows`).
pub struct Linear {
    w: candle_core::quantized::QMatMul,
    pad: usize,
    rows: Rows,
}

/// How a call's rows reach candle so that its kernel does not depend on their count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rows {
    /// Any count takes the same kernel.
    Any,
    /// Q6_K on x86: one row takes the compact dot product, more take the repacked
    /// tiles (different sums). A lone row is sent with a copy of itself, so every
    /// row takes the tiles, whose rows are computed independently.
    AtLeastTwo,
    /// Q4_K on x86: from 32 rows up, a CPU with AMX takes another kernel. Calls are cut
    /// to 16 rows (the tiles read the weights per 4 rows anyway, so little is lost).
    AtMost(usize),
}

impl Rows {
    fn of(dtype: GgmlDType, n: usize, k: usize, device: &Device) -> Rows {
        let x86 = cfg!(target_arch = "x86_64") && device.is_cpu();
        // Where candle's x86 tiles apply at all (their shape rule).
        let tiles = x86 && n.is_multiple_of(16) && k.is_multiple_of(256) && avx2();
        match dtype {
            GgmlDType::Q6K if tiles => Rows::AtLeastTwo,
            GgmlDType::Q4K if tiles => Rows::AtMost(16),
            _ => Rows::Any,
        }
    }
}

/// Whether the CPU has the AVX2 and FMA that candle's x86 tiles need.
fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl Linear {
    pub fn new(t: QTensor, device: &Device) -> Result<Linear> {
        Self::shared(std::sync::Arc::new(t), device)
    }

    /// As `new`, sharing `t`'s blocks unless it is padded (a tied output head).
    pub fn shared(t: std::sync::Arc<QTensor>, device: &Device) -> Result<Linear> {
        let (n, k) = t.shape().dims2()?;
        let rows = Rows::of(t.dtype(), n, k, device);
        let pad = k.next_multiple_of(TILE_K) - k;
        if t.dtype() != GgmlDType::Q8_0 || pad == 0 || !device.is_cpu() || !tiled_q8_0() {
            return Ok(Linear {
                w: candle_core::quantized::QMatMul::from_arc(t)?,
                pad: 0,
                rows,
            });
        }
        Ok(Linear {
            w: candle_core::quantized::QMatMul::from_qtensor(pad_q8_0(&t, n, k, pad, device)?)?,
            pad,
            rows,
        })
    }

    /// `x` `[rows, k]` times the weight: `[rows, n]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = match self.pad {
            0 => x.clone(),
            pad => x.pad_with_zeros(candle_core::D::Minus1, 0, pad)?,
        };
        let rows = x.dim(0)?;
        match self.rows {
            Rows::AtLeastTwo if rows == 1 => {
                self.product(&Tensor::cat(&[&x, &x], 0)?)?.narrow(0, 0, 1)
            }
            Rows::AtMost(most) if rows > most => {
                let parts = (0..rows)
                    .step_by(most)
                    .map(|r0| self.product(&x.narrow(0, r0, most.min(rows - r0))?))
                    .collect::<Result<Vec<_>>>()?;
                Tensor::cat(&parts, 0)
            }
            _ => self.product(&x),
        }
    }

    fn product(&self, x: &Tensor) -> Result<Tensor> {
        candle_core::Module::forward(&self.w, x)
    }
}

/// `t` (Q8_0, `[n, k]`) with `pad` zero columns appended to every row.
fn pad_q8_0(t: &QTensor, n: usize, k: usize, pad: usize, device: &Device) -> Result<QTensor> {
    let data = t.data()?;
    let row = k / 32 * Q8_0_BYTES;
    let extra = pad / 32 * Q8_0_BYTES;
    if data.len() != n * row {
        candle_core::bail!("Q8_0 data of {} bytes is not {n} rows of {k}", data.len());
    }
    let mut out = Vec::with_capacity(n * (row + extra));
    for r in data.chunks_exact(row) {
        out.extend_from_slice(r);
        out.resize(out.len() + extra, 0);
    }
    qtensor_from_ggml(GgmlDType::Q8_0, &out, vec![n, k + pad], device)
}

#[cfg(test)]
mod pad_tests {
    use super::*;

    #[test]
    fn a_padded_q8_0_layer_gives_the_same_products() {
        let dev = Device::Cpu;
        let w: Vec<f32> = (0..256 * 640)
            .map(|i| ((i * 31 % 97) as f32 - 48.0) / 50.0)
            .collect();
        let t = QTensor::quantize(
            &Tensor::from_vec(w, (256, 640), &dev).unwrap(),
            GgmlDType::Q8_0,
        )
        .unwrap();
        let (n, k) = (256, 640);
        let padded = pad_q8_0(&t, n, k, 128, &dev).unwrap();
        let d = padded.dequantize(&dev).unwrap();
        assert_eq!(d.dims(), [256, 768]);
        let left = d.narrow(1, 0, 640).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(left, t.dequantize(&dev).unwrap().to_vec2::<f32>().unwrap());
        let right = d
            .narrow(1, 640, 128)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(right.iter().all(|&x| x == 0.0));
        // Through the layer: products of the padded and the plain weight agree to the
        // kernels' rounding (the zeros add nothing; the activations' 8-bit blocks differ).
        let x: Vec<f32> = (0..3 * 640)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) / 6.0)
            .collect();
        let x = Tensor::from_vec(x, (3, 640), &dev).unwrap();
        let plain = candle_core::quantized::QMatMul::from_qtensor(t).unwrap();
        let a = candle_core::Module::forward(&plain, &x)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let lin = Linear {
            w: candle_core::quantized::QMatMul::from_qtensor(padded).unwrap(),
            pad: 128,
            rows: Rows::Any,
        };
        let b = lin.forward(&x).unwrap().to_vec2::<f32>().unwrap();
        for (ra, rb) in a.iter().zip(&b) {
            for (p, q) in ra.iter().zip(rb) {
                assert!((p - q).abs() <= 0.05 * p.abs().max(1.0), "{p} vs {q}");
            }
        }
    }
}

#[cfg(test)]
mod row_tests {
    use super::*;

    /// A weight of `dtype`, `[n, k]`, with values that round differently per block.
    fn weight(dtype: GgmlDType, n: usize, k: usize) -> QTensor {
        let w: Vec<f32> = (0..n * k)
            .map(|i| (((i * 7919) % 1009) as f32 - 504.0) / 337.0)
            .collect();
        QTensor::quantize(&Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap(), dtype).unwrap()
    }

    #[test]
    fn a_rows_product_is_bitwise_the_same_whatever_else_the_call_holds() {
        let dev = Device::Cpu;
        // Gemma 3 270M's shapes and types: Q6_K and Q4_K ffn_down, Q4_K attn_output,
        // Q8_0 (padded) attn_v and head, and one of each at a tile-free width.
        for (dtype, n, k) in [
            (GgmlDType::Q6K, 640, 2048),
            (GgmlDType::Q4K, 640, 2048),
            (GgmlDType::Q4K, 640, 1024),
            (GgmlDType::Q8_0, 256, 640),
            (GgmlDType::Q8_0, 64, 256),
            (GgmlDType::Q6K, 40, 256),
        ] {
            let lin = Linear::new(weight(dtype, n, k), &dev).unwrap();
            let x: Vec<f32> = (0..40 * k)
                .map(|i| (((i * 104729) % 997) as f32 - 498.0) / 211.0)
                .collect();
            let x = Tensor::from_vec(x, (40, k), &dev).unwrap();
            let all = lin.forward(&x).unwrap().to_vec2::<f32>().unwrap();
            for rows in [1, 2, 3, 5, 8, 16, 17, 33, 40] {
                for r0 in [0, 40 - rows] {
                    let part = lin.forward(&x.narrow(0, r0, rows).unwrap()).unwrap();
                    let part = part.to_vec2::<f32>().unwrap();
                    for (i, row) in part.iter().enumerate() {
                        let same = row
                            .iter()
                            .zip(&all[r0 + i])
                            .all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(
                            same,
                            "{dtype:?} [{n}, {k}]: row {} differs in a call of {rows}",
                            r0 + i
                        );
                    }
                }
            }
        }
    }
}
