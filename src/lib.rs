//! braid: a low-latency sidecar proxy for model-serving pods.
//!
//! # Layout
//!
//! - `cli`      commands and flags (`proxy`, `executor`, `demo`, `check`, `fetch-model`,
//!   `inject`, `webhook`)
//! - `demo`     `braid demo`: executor + proxy in one process
//! - `run`      wiring for `braid proxy`: store, sources, listeners, drain sequence
//! - `config`   YAML -> `Document` (schema) -> `Snapshot` (validate) -> `ArcSwap` (store);
//!   the file source with symlink-safe hot reload
//! - `server`   listeners (HTTP/1.1 + h2c, TLS with ALPN, explicit limits), smuggling
//!   guard, admin port, graceful drain, certificate reload
//! - `proxy`    the request path, composed in one function
//! - `route`    route matching, variant assignment (override, sticky, weighted), shadow
//!   copies and their comparison
//! - `upstream` pooled keep-alive clients (HTTP/1.1, h2c, TLS), the retry policy and
//!   budget, failure accrual, state kept across reloads, executor readiness probe
//! - `batch`    request coalescing: codec (merge/split), pure queue, batcher task
//! - `executor` the candle model server: sources, encoder, model threads, OIP server
//! - `inject`   sidecar injection shared by `braid inject` and `braid webhook`
//! - `error`    request errors: status, Retry-After, metric label, JSON body
//! - `metrics`  every metric family and its buckets
//!
//! The request path:
//!
//! ```text
//! client --h1/h2c/TLS--> listener (limits, smuggling guard) --> Proxy::route
//!     snapshot = store.load()            one Arc<Snapshot> for the whole request
//!     route match                        /v2/models/{m}, /v1/models/{m}, path prefix
//!     assign variant                     override > sticky (rendezvous) > weighted random;
//!                                        an ejected variant -> fallback or the others
//!     read body (<= limit, else 413)     and the deadline (timeout, x-braid-timeout)
//!     shadow copy?                       fire and forget, compared off the request path
//!     batch? (local + batching)          queue -> merge -> executor -> split per request
//!     forward                            Retry(policy, budget) -> per-try timeout -> pool
//!     fallback?                          failed and safe to repeat -> the fallback, once
//!     response + x-braid-variant         metrics recorded once, at the edge
//! ```
#![forbid(unsafe_code)]

pub mod batch;
pub mod cli;
pub mod config;
pub mod demo;
pub mod error;
pub mod executor;
pub mod inject;
pub mod metrics;
pub mod proxy;
pub mod route;
pub mod run;
pub mod server;
pub mod upstream;
