//! Q5_0 weights rewritten as Q8_0 at load, losslessly: a Q5_0 value is `d·(q - 16)`
//! with `q - 16` in -16..=15, which an int8 holds exactly, so the Q8_0 block with the
//! same scale `d` stands for the very same numbers. candle's Q8_0 dot product has a
//! SIMD kernel and its Q5_0 one does not; Gemma 3's Q4_K_M GGUF stores its 640-wide
//! projections (q, k, v, gate, up) as Q5_0, so this is most of a step's arithmetic.
//! The integer dot products against the 8-bit activations are exact either way, as
//! llama.cpp's Q5_0 kernel's are.

use candle_core::quantized::{GgmlDType, QTensor, ggml_file::qtensor_from_ggml};
use candle_core::{Device, Result};

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
