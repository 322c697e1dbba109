//! braid's integration tests: one crate, so the support module and the binary's
//! dependencies are compiled and linked once. Every test drives real sockets on
//! `127.0.0.1:0` through the fixtures in `support`.
// These tests run real processes and sockets, and wait on the wall clock as their clients do.
#![allow(clippy::disallowed_methods)]

mod support;

mod access_log;
mod admin;
mod batching;
mod check;
mod clients;
mod configmap;
mod demo;
mod docs;

mod executor;
mod experiments;
mod fleet;
mod fuzz;
mod gemma;
mod generation;
mod grpc;
mod hardening;
mod image;
mod inbound_h1;
mod inject;
mod kube_fake;
mod layers;
mod limits;
mod llm;
mod metrics_text;
mod minilm;
mod monitoring;
mod openai;
mod page;
mod payload_log;
mod reload;
mod resilience;
mod routing;
mod shutdown;
mod tls;
mod tracing;
mod upstream_h1;
