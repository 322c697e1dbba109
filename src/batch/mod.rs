//! Request coalescing for local variants (work in progress: the codec is built and
//! tested; the queue and the batcher task are not wired into the proxy yet).

pub mod codec;
pub mod queue;
