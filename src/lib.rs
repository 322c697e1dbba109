//! braid: a low-latency sidecar proxy for model-serving pods.
//!
//! # Layout
//!
//! Layers, bottom first. A module imports only from its own layer or below, and no two
//! files import each other in a circle (checked by `tests/it/layers.rs`:
//! `cargo test --test it layers`).
//!
//! | layer | modules | what |
//! |---|---|---|
//! | 0 | `error` `metrics` `hash` `headers` `addr` `sync` `watched` | request errors (and what a failed send or batch maps to), every metric family, stable hashing and randomness, braid's own headers and their one checked parser, backend addresses, the one poison-tolerant lock, the one pass-through body that watches an answer or holds something to its end |
//! | 1 | `http1` `tls` `server` `upstream` `batch` `executor` `access` `payload` `trace` `grpc` `openai` | HTTP/1.1 wire code shared by braid's server and client (chunked framing, header names by place, field values); TLS's provider and PEM files for both sides; listeners (plain HTTP/1.1 by braid's own loop, h2c and TLS with ALPN by hyper, limits, smuggling guard, drain); pooled clients (braid's own for HTTP/1.1), retry policy and budget, failure accrual; coalescing (codec, pure queue, batcher task behind the `Execute` trait); the candle model server; the access log's writer; the sampled payload log's sinks (rotated files, CloudEvents); W3C trace context, samplers and the OTLP/HTTP span exporter; gRPC's wire format (framing, statuses, `grpc-timeout`, one protobuf field read or rewritten, the generated messages and their REST form); the OpenAI-compatible wire (its body reader, SSE framing and usage, its error shape) |
//! | 2 | `route` | routes as compiled data, matching, assignment (override, sticky, weighted); `route::live`: the handles bound to a table (budgets, health, limits, batchers, experiments), kept across reloads by name; `route::experiment`: the weights in force (ramps on the wall clock, guardrail trips), split health and the report, over `route::evidence`'s pure statistics |
//! | 3 | `config` | YAML -> `Document` (schema) -> `Snapshot` (validate, pure data) -> `Active` (snapshot + live state, bound in the store, the one place that binds) -> `ArcSwap`; the file and ConfigMap sources |
//! | 4 | `proxy` `admin` `probe` `inject` `fleet` | the request path (forwarding, batched submission, shadow); the admin port; the executor readiness probe; sidecar injection for `inject` and `webhook`; `braid controller`: the fleet's tally of every pod's evidence, its Lease, the verdicts it writes into the ConfigMap, and the experiment page |
//! | 5 | `run` `demo` `cli` | wiring and the drain sequence; `braid demo`; commands and flags |
//!
//! The request path (this is the one copy of the picture; the README and docs link here):
//!
//! ```text
//! (`Proxy::route` runs these as steps: find, assign, admit, prepare, shadow, serve with
//! fallback, finish; what differs by wire is asked of `proxy::wire`.)
//!
//! client --h1/h2c/TLS--> server::serve (limits; h1: server::h1, framing judged) --> Proxy::handle
//!     active = store.load()              one Arc<Active> for the whole request
//!     route match                        /v2/models/{m}, /v1/models/{m}, path prefix;
//!                                        gRPC model calls: field 1 of the message
//!     live = active.live[route]          budgets, health, batchers, metric handles,
//!                                        HTTP/1.1 pools: by index, no lock
//!     assign variant                     override > sticky (rendezvous) > weighted random,
//!                                        with the experiment's weights in force (ramps,
//!                                        tripped guardrails); an ejected variant ->
//!                                        fallback or the others
//!     read body (<= limit, else 413)     and the deadline (timeout, x-braid-timeout,
//!                                        grpc-timeout); other gRPC calls: streamed
//!     shadow copy?                       fire and forget, compared off the request path
//!     batch? (variant has a batcher)     queue -> merge -> Execute -> split per request
//!     forward                            Retry(policy, budget) -> per-try timeout on
//!                                        the head, then its judge (a stream's first
//!                                        token) -> Upstreams::send (the one way out); http://
//!                                        backends: braid's own client (upstream::h1)
//!     fallback?                          failed and safe to repeat -> the fallback, once
//!     response + x-braid-variant         metrics recorded once, at the edge; the
//!                                        experiment observes the outcome (split check,
//!                                        guardrail evidence under the assigned share)
//! ```
#![forbid(unsafe_code)]

pub mod access;
pub mod addr;
pub mod admin;
pub mod batch;
pub mod cli;
pub mod config;
pub mod demo;
pub mod error;
pub mod executor;
pub mod fleet;
pub mod grpc;
pub mod hash;
pub mod headers;
pub mod http1;
pub mod inject;
pub mod metrics;
pub mod openai;
pub mod payload;
pub mod probe;
pub mod proxy;
pub mod route;
pub mod run;
pub mod server;
pub mod sync;
pub mod tls;
pub mod trace;
pub mod upstream;
pub mod watched;
