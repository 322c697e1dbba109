//! Executor throughput: sentences/s of the real all-MiniLM-L6-v2 at batch sizes 1..32
//! with realistic mixed-length sentences, and the padding each batch size wastes. Then
//! the same sentences one per request over HTTP to the executor's server in this
//! process, against the pass alone: what the server adds per request.
//!
//! Passes run as `braid executor` runs them: in a model's compute pool, with the
//! compute environment pinned (`executor::threads`). `--no-pin` keeps candle's
//! defaults and `--no-pool` runs passes on the calling thread, to see what each buys.
//!
//! Run: `cargo bench --bench encoder -- [--sentences 256] [--batches 1,4,8,16,32] [--no-pin]
//! [--no-pool] [--no-http] [--lengths]` (the HTTP comparison needs batch 1 among the
//! sizes; `--lengths` adds batch-1 pass time by text length)
// A benchmark times real work: std's clock is the one it means.
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::Instant;

use common::{TEXTS, arg};

use braid::executor::encoder::{Grouping, SentenceEncoder};
use braid::executor::source::{self, DEMO_MODEL};
use braid::executor::threads;
use candle_core::Device;

fn flag(name: &str) -> bool {
    std::env::args().any(|a| a == name)
}

fn main() {
    if !flag("--no-pin")
        && let Err(e) = threads::pin_environment()
    {
        eprintln!("compute environment not pinned: {e}");
    }
    let total = arg("--sentences", 256);
    let dir = source::resolve(DEMO_MODEL).expect("fetch MiniLM");
    let enc = SentenceEncoder::load(&dir, &Device::Cpu).expect("load MiniLM");
    let pool = (!flag("--no-pool")).then(|| threads::compute_pool("bench", 0).unwrap());
    let run = |f: &mut (dyn FnMut() + Send)| match &pool {
        Some(p) => p.install(f),
        None => f(),
    };
    let corpus: Vec<&str> = TEXTS.iter().copied().cycle().take(total).collect();
    // Warm up allocator and caches.
    run(&mut || drop(enc.embed(&corpus[..32]).unwrap()));

    println!(
        "all-MiniLM-L6-v2 on CPU, {total} mixed-length sentences per batch size, {} CPUs; \
         RAYON_NUM_THREADS={:?} CANDLE_BARRIER_POOL_SPIN_LIMIT={:?}, compute pool: {}",
        threads::cpus(),
        std::env::var(threads::THREADS_VAR).ok(),
        std::env::var(threads::SPIN_VAR).ok(),
        pool.as_ref()
            .map_or("none".into(), |p| p.current_num_threads().to_string()),
    );
    println!();
    println!("| batch | passes | sentences/s | vs batch 1 | ms per batch | padding waste |");
    println!("|---|---|---|---|---|---|");
    let mut base = 0.0;
    let mut pass_ms = 0.0;
    let sizes: Vec<usize> = arg("--batches", "1,4,8,16,32".to_string())
        .split(',')
        .map(|b| b.trim().parse().expect("--batches 1,32"))
        .collect();
    let cases = sizes.into_iter().flat_map(|b| {
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
            run(&mut || {
                let e = enc.embed_with(chunk, grouping).unwrap();
                computed += e.tokens_computed;
                real += e.tokens_real;
            });
            batches += 1;
        }
        let secs = start.elapsed().as_secs_f64();
        let rate = total as f64 / secs;
        if batch == 1 {
            base = rate;
            pass_ms = secs * 1e3 / batches as f64;
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
    if flag("--lengths") {
        // One text per pass, of a given token count: what a short sentence costs
        // against a longer one (gemm computes in tiles of rows).
        println!();
        println!("| tokens per text (with [CLS]/[SEP]) | ms per pass |");
        println!("|---|---|");
        for words in [2usize, 6, 14, 30, 62] {
            let text = vec!["good"; words].join(" ");
            let passes = 40;
            let start = Instant::now();
            for _ in 0..passes {
                run(&mut || drop(enc.embed(&[text.as_str()]).unwrap()));
            }
            let ms = start.elapsed().as_secs_f64() * 1e3 / passes as f64;
            println!("| {} | {ms:.2} |", words + 2);
        }
    }
    if !flag("--no-http") {
        drop(pool);
        http(&corpus, pass_ms);
    }
}

/// One sentence per request, one request at a time over a kept-alive connection, to
/// the executor's real server and model threads in this process.
fn http(corpus: &[&str], pass_ms: f64) {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let ms = rt.block_on(async {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let opts = braid::executor::server::ExecutorOptions {
            models: vec![braid::executor::server::ModelSpec {
                name: "minilm".into(),
                source: DEMO_MODEL.into(),
                labels: vec![],
                threads: 1,
                compute_threads: None,
                queue: 64,
                max_batch: 256,
                default_temperature: None,
            }],
            device: "cpu".into(),
            trace: None,
            limits: braid::server::Limits::default(),
            llm: Default::default(),
        };
        let mut exec = braid::executor::server::start(opts, l).await.unwrap();
        exec.wait_loaded().await.unwrap();
        let url = format!("http://{}/v2/models/minilm/infer", exec.addr);
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let send = |text: &str| {
            let body = serde_json::json!({"inputs": [{"name": "text", "shape": [1],
                "datatype": "BYTES", "data": [text]}]});
            let req = http::Request::post(&url)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body.to_string())))
                .unwrap();
            let client = client.clone();
            async move {
                let resp = client.request(req).await.unwrap();
                assert_eq!(resp.status(), 200);
                resp.into_body().collect().await.unwrap();
            }
        };
        for t in &corpus[..16] {
            send(t).await;
        }
        let start = Instant::now();
        for t in corpus {
            send(t).await;
        }
        let ms = start.elapsed().as_secs_f64() * 1e3 / corpus.len() as f64;
        exec.stop().await;
        ms
    });
    println!();
    println!("| one sentence per request | ms |");
    println!("|---|---|");
    println!("| pass alone (batch 1 above) | {pass_ms:.2} |");
    println!("| over HTTP to the executor | {ms:.2} |");
    println!("| HTTP adds | {:.2} |", ms - pass_ms);
}
