//! Request coalescing for local variants: concurrent inference requests are merged
//! into one call to the executor and the reply split back, per request.
//!
//! - `codec`     merge/split for OIP v2 (JSON and Triton binary tensors) and KServe v1,
//!   refusing unsafe replies whole
//! - `tensor`    tensor data as JSON values or raw bytes, and conversion between them
//! - `queue`     the queue and its policy as pure state (unit-tested without I/O)
//! - `batcher`   the task around the queue, dispatch, per-item isolation by bisection
//! - `fake`      (tests) an executor behind the same trait, on the paused clock

pub mod batcher;
pub mod codec;
#[cfg(test)]
pub mod fake;
pub mod queue;
pub mod tensor;
