//! Executor throughput: sentences/s of the real all-MiniLM-L6-v2 at batch sizes 1..32
//! with realistic mixed-length sentences, and the padding each batch size wastes.
//! Target: batch 32 gives at least 2.5x the sentences/s of batch 1 on 2 CPU cores.
//!
//! Run: `cargo bench --bench encoder -- [--sentences 256]`

mod common;

use std::time::Instant;

use common::{TEXTS, arg};

use braid::executor::encoder::{Grouping, SentenceEncoder};
use braid::executor::source::{self, DEMO_MODEL};
use candle_core::Device;

fn main() {
    let total = arg("--sentences", 256);
    let dir = source::resolve(DEMO_MODEL).expect("fetch MiniLM");
    let enc = SentenceEncoder::load(&dir, &Device::Cpu).expect("load MiniLM");
    let corpus: Vec<&str> = TEXTS.iter().copied().cycle().take(total).collect();
    // Warm up allocator and caches.
    let _ = enc.embed(&corpus[..32]).unwrap();

    println!(
        "all-MiniLM-L6-v2 on CPU, {total} mixed-length sentences per batch size, {} threads",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!();
    println!("| batch | passes | sentences/s | vs batch 1 | ms per batch | padding waste |");
    println!("|---|---|---|---|---|---|");
    let mut base = 0.0;
    let cases = [1usize, 4, 8, 16, 32].into_iter().flat_map(|b| {
        let modes: &[Grouping] = if b == 1 {
            &[Grouping::Single]
        } else {
            &[Grouping::Single, Grouping::ByLength]
        };
        modes.iter().map(move |m| (b, *m))
    });
    for (batch, grouping) in cases {
        let (mut computed, mut real) = (0usize, 0usize);
        let start = Instant::now();
        let mut batches = 0;
        for chunk in corpus.chunks(batch) {
            let e = enc.embed_with(chunk, grouping).unwrap();
            computed += e.tokens_computed;
            real += e.tokens_real;
            batches += 1;
        }
        let secs = start.elapsed().as_secs_f64();
        let rate = total as f64 / secs;
        if batch == 1 {
            base = rate;
        }
        let passes = if grouping == Grouping::Single {
            "one"
        } else {
            "by length"
        };
        println!(
            "| {batch} | {passes} | {rate:.0} | {:.2}x | {:.1} | {:.0}% |",
            rate / base,
            secs * 1e3 / batches as f64,
            100.0 * (computed - real) as f64 / computed as f64
        );
    }
}
