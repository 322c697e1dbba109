//! braid: a low-latency sidecar proxy for model-serving pods.
//!
//! # Layout
//!
//! - `cli`      commands and flags (`proxy`, `executor`, `demo`, `check`, `fetch-model`)
//! - `demo`     `braid demo`: executor + proxy in one process
//! - `run`      wiring for `braid proxy`: store, sources, listeners, drain sequence
//! - `config`   YAML -> `Document` (schema) -> `Snapshot` (validate) -> `ArcSwap` (store);
//!   the file source with symlink-safe hot reload
//! - `server`   listeners (HTTP/1.1 + h2c, explicit limits), smuggling guard, admin port,
//!   graceful drain
//! - `proxy`    the request path, composed in one function
//! - `route`    route matching and variant assignment (override, sticky, weighted)
//! - `upstream` pooled keep-alive clients (HTTP/1.1 and h2c), executor readiness probe
//! - `batch`    request coalescing: codec (merge/split), pure queue, batcher task
//! - `executor` the candle model server: sources, encoder, model threads, OIP server
//! - `error`    request errors: status, Retry-After, metric label, JSON body
//! - `metrics`  every metric family and its buckets
//!
//! The request path:
//!
//! ```text
//! client --h1/h2c--> listener (limits, smuggling guard) --> Proxy::route
//!     snapshot = store.load()            one Arc<Snapshot> for the whole request
//!     route match                        /v2/models/{m}, /v1/models/{m}, path prefix
//!     assign variant                     override > sticky (rendezvous) > weighted random
//!     read body (<= limit, else 413)
//!     batch? (local + batching)          queue -> merge -> executor -> split per request
//!     forward                            target_model rewrite, pooled client, timeout
//!     response + x-braid-variant         metrics recorded once, at the edge
//! ```
#![forbid(unsafe_code)]

pub mod batch;
pub mod cli;
pub mod config;
pub mod demo;
pub mod error;
pub mod executor;
pub mod metrics;
pub mod proxy;
pub mod route;
pub mod run;
pub mod server;
pub mod upstream;
