//! Open Inference Protocol v2 (Triton's and KServe's `/v2/models/{m}/infer`): a
//! request's tensors parsed once and kept as the text (JSON) or bytes (binary) they
//! arrived in, merged into one batch body written directly, and the reply's outputs
//! split by row, each client getting every output in the form it asked for.
//!
//! Row identity (`batching.row_id`): the protocol carries no per-row identity, so an
//! executor that permutes rows while keeping every shape right is invisible to shape
//! checks. When a route names a row-id tensor, `merge` adds it as an INT64 input of
//! fresh, batch-unique numbers and `split` requires the executor to echo it unchanged
//! as an output of the same name; anything else refuses the reply whole. The echoed
//! tensor is removed before clients see their rows.

use std::fmt;
use std::ops::Range;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

use super::{
    Fields, Form, Item, Payload, RowIds, SplitError, Unqueued, bad, join_into, request_object,
};
use crate::batch::tensor::{self, Dtype, write_json};

/// What a v2 request holds beside its rows.
#[derive(Debug, Clone)]
pub struct Request {
    inputs: Vec<Input>,
    /// Request-level `parameters` and requested `outputs`, identical across a batch
    /// (part of the key), without the binary-form flags, which are per request.
    parameters: Option<Value>,
    outputs: Option<Vec<Value>>,
    /// Per requested output, whether it was asked for as binary; `binary_default` for
    /// outputs not listed (`parameters.binary_data_output`).
    binary_out: Vec<bool>,
    binary_default: bool,
}

/// A v2 item's request (a batch holds one protocol: it is part of the key).
fn v2(item: &Item) -> &Request {
    match &item.form {
        Form::V2(r) => r,
        _ => unreachable!("a v2 batch holds v2 requests only: the protocol is in the key"),
    }
}

impl Request {
    /// Whether the request has an input of this name.
    pub fn has_input(&self, name: &str) -> bool {
        self.inputs.iter().any(|i| i.name == name)
    }

    /// Whether this request asked for output `name` as binary data.
    fn wants_binary(&self, name: &str) -> bool {
        self.outputs
            .as_ref()
            .and_then(|o| o.iter().position(|o| o["name"] == name))
            .map_or(self.binary_default, |i| self.binary_out[i])
    }

    /// Whether any of this request is in binary form, sent or asked for.
    fn binary(&self) -> bool {
        self.binary_default
            || self.binary_out.iter().any(|b| *b)
            || self.inputs.iter().any(|i| matches!(i.data, Data::Raw(_)))
    }
}

#[derive(Debug, Clone)]
struct Input {
    name: String,
    datatype: String,
    dt: Dtype,
    inner: Vec<i64>,
    data: Data,
}

/// A tensor's elements, flattened, in the form the client sent them.
#[derive(Debug, Clone)]
enum Data {
    /// The JSON elements' texts, separated by commas (no brackets; empty for none).
    Json(Vec<u8>),
    /// Triton's binary extension: little-endian bytes (BYTES: length-prefixed).
    Raw(Vec<u8>),
}

mod merge;
mod parse;
mod split;
#[cfg(test)]
mod tests;

pub(super) use merge::merge;
use merge::{write_key, write_shape};
pub use parse::{PathModel, parse_v2, parse_v2_with};
use parse::{WithTensors, read_with_tensors, split_header};
pub(super) use split::split_payload;
