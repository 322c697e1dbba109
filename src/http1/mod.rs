//! HTTP/1.1 wire code shared by braid's own server (`server::h1`) and client
//! (`upstream::h1`), so neither reaches into the other: chunked framing read and
//! checked, header names remembered by their place in a head, and field values read
//! from bytes. Pure code over buffers; it imports nothing of braid's but `error`.
//!
//! - `chunked`  the chunked transfer coding, strict (bare LF or CR, sizes past the limit refused)
//! - `names`    header names by place: a peer's repeated heads parse no name twice
//! - `fields`   `Content-Length`, comma-separated tokens, a persistence-only `Connection`

pub mod chunked;
pub mod fields;
pub mod names;
