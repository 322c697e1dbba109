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

/// A JSON object whose tensor list (`inputs` or `outputs`, a list of objects) is read
/// in the same pass, so that no tensor's data is skipped over twice.
struct WithTensors<'a> {
    /// Every other field.
    top: Fields<'a>,
    tensors: Option<Vec<Fields<'a>>>,
}

fn read_with_tensors<'a>(
    text: &'a [u8],
    list: &'static str,
) -> serde_json::Result<WithTensors<'a>> {
    struct Seed(&'static str);
    impl<'de> DeserializeSeed<'de> for Seed {
        type Value = WithTensors<'de>;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_map(self)
        }
    }
    impl<'de> Visitor<'de> for Seed {
        type Value = WithTensors<'de>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let (mut top, mut tensors) = (Vec::new(), None);
            while let Some(key) = map.next_key::<String>()? {
                if key == self.0 {
                    tensors = Some(map.next_value()?);
                } else {
                    top.push((key, map.next_value::<&'de RawValue>()?));
                }
            }
            Ok(WithTensors {
                top: Fields(top),
                tensors,
            })
        }
    }
    let mut de = serde_json::Deserializer::from_slice(text);
    let read = Seed(list).deserialize(&mut de)?;
    de.end()?;
    Ok(read)
}

/// The model (and version) a request's path names, which a body's `model_name` and
/// `model_version` must agree with for the request to be batched.
#[derive(Debug, Clone, Copy, Default)]
pub struct PathModel<'a> {
    pub name: Option<&'a str>,
    pub version: Option<&'a str>,
}

/// Parses an OIP v2 request body that is all JSON.
pub fn parse_v2(body: &[u8]) -> Result<Item, Unqueued> {
    parse_v2_with(body, None, PathModel::default())
}

/// Splits a body at its JSON header's end (`Inference-Header-Content-Length`).
fn split_header(body: &[u8], header_len: Option<usize>) -> Option<(&[u8], &[u8])> {
    match header_len {
        None => Some((body, &[])),
        Some(n) => (n <= body.len()).then(|| body.split_at(n)),
    }
}

/// Parses an OIP v2 request body: JSON, or with `header_len` a JSON header followed by
/// Triton binary tensor data. `path` is what the request's path names; a body naming
/// another model or version is forwarded alone, as sent.
pub fn parse_v2_with(
    body: &[u8],
    header_len: Option<usize>,
    path: PathModel,
) -> Result<Item, Unqueued> {
    let Some((head, mut raw)) = split_header(body, header_len) else {
        return bad(format!(
            "Inference-Header-Content-Length is {} but the body has {} bytes",
            header_len.unwrap_or(0),
            body.len()
        ));
    };
    let (obj, list) = match read_with_tensors(head, "inputs") {
        Ok(WithTensors {
            top,
            tensors: Some(list),
        }) => (top, list),
        _ => return Err(why_unreadable(head, path)),
    };
    check_top_fields(&obj, path)?;
    if list.is_empty() {
        return bad("request has no inputs");
    }
    let mut rows = None;
    let mut inputs = Vec::with_capacity(list.len());
    let mut key = String::from("v2");
    for (i, fields) in list.iter().enumerate() {
        let name: String = fields
            .read("name")
            .ok_or_else(|| Unqueued::Bad(format!("inputs[{i}] has no name")))?;
        let datatype: String = fields
            .read("datatype")
            .ok_or_else(|| Unqueued::Bad(format!("input {name:?} has no datatype")))?;
        // A datatype outside the protocol's list: the server may know it; braid cannot
        // convert it between forms, so it is not merged.
        let Some(dt) = Dtype::parse(&datatype) else {
            return Err(Unqueued::Alone);
        };
        let shape: Vec<i64> = fields
            .read("shape")
            .ok_or_else(|| Unqueued::Bad(format!("input {name:?} has no valid shape")))?;
        let Some((&n, inner)) = shape.split_first() else {
            return bad(format!("input {name:?} has an empty shape"));
        };
        if n <= 0 || inner.iter().any(|d| *d < 0) {
            return bad(format!(
                "input {name:?} has shape {shape:?}: dim 0 must be at least 1"
            ));
        }
        if rows.is_some_and(|r| r != n as usize) {
            return bad(format!(
                "input {name:?} has {n} rows but an earlier input has {}",
                rows.unwrap_or(0)
            ));
        }
        rows = Some(n as usize);
        let Some(expected) = shape.iter().try_fold(1i64, |acc, d| acc.checked_mul(*d)) else {
            return bad(format!(
                "input {name:?} has shape {shape:?}: too many elements"
            ));
        };
        // Per-input parameters other than the binary data size (shared memory, say)
        // are not ours to merge.
        let binary_size = match fields.read::<Value>("parameters") {
            None | Some(Value::Null) => None,
            Some(Value::Object(p)) if p.len() == 1 && p.contains_key("binary_data_size") => {
                Some(p["binary_data_size"].as_u64().ok_or_else(|| {
                    Unqueued::Bad(format!(
                        "input {name:?}: binary_data_size must be a byte count"
                    ))
                })?)
            }
            Some(_) => return Err(Unqueued::Alone),
        };
        let data = match binary_size {
            Some(size) => {
                if size > raw.len() as u64 {
                    return bad(format!(
                        "input {name:?} declares {size} bytes of binary data but {} remain in the body",
                        raw.len()
                    ));
                }
                let (mine, rest) = raw.split_at(size as usize);
                raw = rest;
                tensor::element_offsets(dt, mine, expected as usize)
                    .map_err(|e| Unqueued::Bad(format!("input {name:?} (shape {shape:?}): {e}")))?;
                Data::Raw(mine.to_vec())
            }
            None => {
                let text = fields.get("data").map_or(&b""[..], |d| d.get().as_bytes());
                let mut elements = Vec::with_capacity(text.len());
                let mut count = 0i64;
                // Checked now, so that a batch never meets a value it cannot carry
                // (one request's mistake would fail the batch).
                tensor::leaves(text, |_, element| {
                    if count > 0 {
                        elements.push(b',');
                    }
                    elements.extend_from_slice(element);
                    count += 1;
                    tensor::check_text(dt, element)
                })
                .map_err(|e| Unqueued::Bad(format!("input {name:?}: {e}")))?;
                if count != expected {
                    return bad(format!(
                        "input {name:?} has shape {shape:?} ({expected} elements) but {count} data elements"
                    ));
                }
                Data::Json(elements)
            }
        };
        key.push_str(&format!("|{name}:{datatype}:{inner:?}"));
        inputs.push(Input {
            name,
            datatype,
            dt,
            inner: inner.to_vec(),
            data,
        });
    }
    if !raw.is_empty() {
        return bad(format!(
            "{} bytes of binary data follow the inputs that declare theirs",
            raw.len()
        ));
    }
    // The binary-form flags are per request; everything else about outputs and
    // parameters is part of the key.
    let mut parameters = obj.read::<Value>("parameters").filter(|p| !p.is_null());
    let mut binary_default = false;
    let mut priority = None;
    if let Some(Value::Object(p)) = &mut parameters {
        if let Some(flag) = p.remove("binary_data_output") {
            binary_default = flag
                .as_bool()
                .ok_or_else(|| Unqueued::Bad("binary_data_output must be true or false".into()))?;
        }
        if let Some(level) = p.remove("priority") {
            priority = Some(level.as_u64().ok_or_else(|| {
                Unqueued::Bad("parameters.priority must be a non-negative integer".into())
            })?);
        }
        if p.is_empty() {
            parameters = None;
        }
    }
    let mut binary_out = Vec::new();
    let outputs = match obj.read::<Value>("outputs") {
        None | Some(Value::Null) => None,
        Some(Value::Array(list)) => {
            let mut outs = Vec::with_capacity(list.len());
            for mut o in list {
                let mut binary = binary_default;
                if let Some(Value::Object(p)) = o.get_mut("parameters") {
                    if let Some(flag) = p.remove("binary_data") {
                        binary = flag.as_bool().ok_or_else(|| {
                            Unqueued::Bad(
                                "outputs[].parameters.binary_data must be true or false".into(),
                            )
                        })?;
                    }
                    if !p.is_empty() {
                        // Classification, shared memory: changes what comes back.
                        return Err(Unqueued::Alone);
                    }
                }
                if let Value::Object(m) = &mut o {
                    m.remove("parameters");
                }
                binary_out.push(binary);
                outs.push(o);
            }
            Some(outs)
        }
        Some(_) => return bad("\"outputs\" must be a list"),
    };
    key.push_str(&format!(
        "|p={}|o={}",
        parameters.as_ref().map_or(String::new(), Value::to_string),
        outputs
            .as_ref()
            .map_or(String::new(), |o| Value::Array(o.clone()).to_string())
    ));
    Ok(Item {
        key,
        rows: rows.unwrap_or(0),
        id: obj.get("id").map(RawValue::to_owned),
        priority: priority.filter(|&p| p > 0),
        form: Form::V2(Request {
            inputs,
            parameters,
            outputs,
            binary_out,
            binary_default,
        }),
    })
}

/// Fields other than the tensors: those clients repeat from the path are harmless when
/// they agree with it; anything else might change the result, so the request is
/// forwarded alone.
fn check_top_fields(obj: &Fields, path: PathModel) -> Result<(), Unqueued> {
    for (k, val) in &obj.0 {
        let val: Value = match k.as_str() {
            "id" | "inputs" | "outputs" | "parameters" => continue,
            "model_name" | "model_version" => {
                serde_json::from_str(val.get()).expect("a RawValue is valid JSON")
            }
            _ => return Err(Unqueued::Alone),
        };
        let same = match k.as_str() {
            "model_name" => val.is_null() || path.name.is_none_or(|n| val == n),
            _ => val.is_null() || val.as_str().is_some_and(|v| path.version == Some(v)),
        };
        if !same {
            return Err(Unqueued::Alone);
        }
    }
    Ok(())
}

/// Why a request header could not be read in one pass: its JSON, an unknown field
/// (forwarded alone), or its `inputs`.
fn why_unreadable(head: &[u8], path: PathModel) -> Unqueued {
    let obj = match request_object(head) {
        Ok(obj) => obj,
        Err(e) => return e,
    };
    if let Err(e) = check_top_fields(&obj, path) {
        return e;
    }
    let Some(list) = obj.read::<Vec<&RawValue>>("inputs") else {
        return Unqueued::Bad("request has no \"inputs\" list".into());
    };
    match list
        .iter()
        .position(|i| serde_json::from_str::<Fields>(i.get()).is_err())
    {
        Some(i) => Unqueued::Bad(format!("inputs[{i}] is not an object")),
        None => Unqueued::Bad("request's inputs could not be read".into()),
    }
}

/// Writes `[rows, inner...]`.
fn write_shape(out: &mut Vec<u8>, rows: usize, inner: &[i64]) {
    write_json(out, &rows);
    for d in inner {
        out.push(b',');
        write_json(out, d);
    }
}

/// Writes `"key":` (after a comma unless `first`).
fn write_key(out: &mut Vec<u8>, first: &mut bool, key: &str) {
    if !std::mem::take(first) {
        out.push(b',');
    }
    write_json(out, key);
    out.push(b':');
}

/// The body of one request carrying every item's rows, in order. All items share a key.
/// With `row_ids`, a v2 batch also carries the row-id input (and asks for it back).
/// When any item sent or asked for binary data, the batch is sent in Triton's binary
/// form (JSON inputs converted), and asks for binary outputs; otherwise it is JSON.
/// The body is written directly: each item's data is copied as it was sent.
pub(super) fn merge(items: &[&Item], row_ids: Option<RowIds>) -> Payload {
    let first = items[0];
    let binary = items.iter().any(|i| v2(i).binary());
    let rows: usize = items.iter().map(|i| i.rows).sum();
    let mut raw = Vec::new();
    let mut body = Vec::with_capacity(
        256 + items
            .iter()
            .flat_map(|i| &v2(i).inputs)
            .map(|i| match &i.data {
                Data::Json(text) => text.len() + 1,
                Data::Raw(_) => 0,
            })
            .sum::<usize>(),
    );
    // Servers that must echo an id (KServe's ModelServer refuses to answer without
    // one) get a batch's own; each client's id is restored on its share.
    body.extend_from_slice(b"{\"id\":");
    write_json(&mut body, &batch_id());
    body.extend_from_slice(b",\"inputs\":[");
    for (k, input) in v2(first).inputs.iter().enumerate() {
        if k > 0 {
            body.push(b',');
        }
        body.extend_from_slice(b"{\"name\":");
        write_json(&mut body, &input.name);
        body.extend_from_slice(b",\"datatype\":");
        write_json(&mut body, &input.datatype);
        body.extend_from_slice(b",\"shape\":[");
        write_shape(&mut body, rows, &input.inner);
        body.push(b']');
        if binary {
            let start = raw.len();
            for item in items {
                match &v2(item).inputs[k].data {
                    Data::Raw(bytes) => raw.extend_from_slice(bytes),
                    Data::Json(text) => {
                        tensor::leaves(text, |_, e| tensor::text_to_raw(input.dt, e, &mut raw))
                            .expect("JSON inputs are checked against their datatype when parsed");
                    }
                }
            }
            body.extend_from_slice(b",\"parameters\":{\"binary_data_size\":");
            write_json(&mut body, &(raw.len() - start));
            body.extend_from_slice(b"}}");
        } else {
            body.extend_from_slice(b",\"data\":[");
            join_into(
                &mut body,
                items.iter().map(|i| match &v2(i).inputs[k].data {
                    Data::Json(text) => &text[..],
                    Data::Raw(_) => {
                        unreachable!("a request with binary inputs makes the batch binary")
                    }
                }),
            );
            body.extend_from_slice(b"]}");
        }
    }
    let mut outputs = v2(first).outputs.clone();
    if binary && let Some(list) = &mut outputs {
        for o in list.iter_mut() {
            o["parameters"] = json!({"binary_data": true});
        }
    }
    if let Some(ids) = row_ids {
        body.extend_from_slice(b",{\"name\":");
        write_json(&mut body, ids.name);
        body.extend_from_slice(b",\"datatype\":\"INT64\",\"shape\":[");
        write_json(&mut body, &rows);
        body.extend_from_slice(b"],\"data\":[");
        for r in 0..rows as i64 {
            if r > 0 {
                body.push(b',');
            }
            write_json(&mut body, &(ids.first + r));
        }
        body.extend_from_slice(b"]}");
        if let Some(list) = &mut outputs {
            // Always JSON: it is checked here and never reaches a client.
            list.push(match binary {
                true => json!({"name": ids.name, "parameters": {"binary_data": false}}),
                false => json!({"name": ids.name}),
            });
        }
    }
    body.push(b']');
    let mut parameters = v2(first).parameters.clone();
    if binary && outputs.is_none() {
        let p = parameters.get_or_insert_with(|| json!({}));
        p["binary_data_output"] = Value::Bool(true);
    }
    if let Some(p) = parameters {
        body.extend_from_slice(b",\"parameters\":");
        write_json(&mut body, &p);
    }
    if let Some(o) = outputs {
        body.extend_from_slice(b",\"outputs\":");
        write_json(&mut body, &o);
    }
    body.push(b'}');
    if !binary {
        return Payload::json(body);
    }
    let header_len = body.len();
    body.extend_from_slice(&raw);
    Payload {
        body: body.into(),
        header_len: Some(header_len),
    }
}

/// A process-unique id for a merged request: `braid-batch-N`.
fn batch_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!("braid-batch-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// One output of a batch reply: its other fields as sent, inner shape, elements per
/// row, and where each element's data is.
struct ReplyOutput<'a> {
    fields: Vec<(&'a str, &'a RawValue)>,
    /// `parameters` without `binary_data_size`.
    parameters: Map<String, Value>,
    name: String,
    dt: Option<Dtype>,
    inner: Vec<i64>,
    per_row: usize,
    data: ReplyData<'a>,
}

enum ReplyData<'a> {
    /// JSON elements: the data's text and where each element starts and ends in it;
    /// `flat` when the elements of any run of rows are one contiguous range of it.
    Json {
        text: &'a [u8],
        spans: Vec<(usize, usize)>,
        flat: bool,
    },
    Raw {
        bytes: &'a [u8],
        offsets: Vec<usize>,
    },
}

impl ReplyOutput<'_> {
    /// Appends elements `e` as JSON elements separated by commas.
    fn write_text(&self, e: Range<usize>, out: &mut Vec<u8>) -> Result<(), String> {
        match &self.data {
            ReplyData::Json { .. } if e.is_empty() => {}
            ReplyData::Json { text, spans, flat } if *flat => {
                out.extend_from_slice(&text[spans[e.start].0..spans[e.end - 1].1]);
            }
            ReplyData::Json { text, spans, .. } => {
                join_into(out, spans[e].iter().map(|&(s, t)| &text[s..t]));
            }
            ReplyData::Raw { bytes, offsets } => {
                let dt = self.dt.expect("binary outputs have a known datatype");
                tensor::raw_to_text(dt, &bytes[offsets[e.start]..offsets[e.end]], out)?;
            }
        }
        Ok(())
    }

    /// Appends elements `e` as raw bytes.
    fn write_raw(&self, e: Range<usize>, out: &mut Vec<u8>) -> Result<(), String> {
        match &self.data {
            ReplyData::Raw { bytes, offsets } => {
                out.extend_from_slice(&bytes[offsets[e.start]..offsets[e.end]]);
                Ok(())
            }
            ReplyData::Json { text, spans, .. } => {
                let dt = self.dt.ok_or("a datatype braid cannot write as binary")?;
                spans[e]
                    .iter()
                    .try_for_each(|&(s, t)| tensor::text_to_raw(dt, &text[s..t], out))
            }
        }
    }
}

/// Splits a batch reply into one body per item, in order, or refuses it whole. With
/// `row_ids` (v2), the reply must echo them in order. Each item gets every output in
/// the form it asked for (binary or JSON), whatever form the executor answered in.
/// Each body is written directly, its rows copied from the reply by byte range.
pub(super) fn split_payload(
    items: &[&Item],
    reply: &Payload,
    row_ids: Option<RowIds>,
) -> Result<Vec<Payload>, SplitError> {
    let total: usize = items.iter().map(|i| i.rows).sum();
    let (head, mut raw) = split_header(&reply.body, reply.header_len).ok_or_else(|| {
        SplitError("backend reply is shorter than its declared JSON header".into())
    })?;
    let (top, outputs) = match read_with_tensors(head, "outputs") {
        Ok(WithTensors {
            top,
            tensors: Some(outputs),
        }) => (top, outputs),
        Ok(_) => return Err(SplitError("backend reply has no \"outputs\" list".into())),
        Err(e) if e.is_data() => {
            return Err(SplitError(format!(
                "backend reply has no \"outputs\" list of objects: {e}"
            )));
        }
        Err(e) => return Err(SplitError(format!("backend reply is not JSON: {e}"))),
    };
    let mut parsed = Vec::with_capacity(outputs.len());
    let mut echoed_ids = Vec::new();
    for o in &outputs {
        let name: String = o.read("name").unwrap_or_else(|| "?".into());
        let dt = o
            .read::<String>("datatype")
            .as_deref()
            .and_then(Dtype::parse);
        let shape: Vec<i64> = o
            .read("shape")
            .ok_or_else(|| SplitError(format!("output {name:?} has no valid shape")))?;
        let per_row = shape
            .get(1..)
            .unwrap_or(&[])
            .iter()
            .try_fold(1i64, |acc, d| acc.checked_mul(*d))
            .filter(|r| *r >= 0)
            .and_then(|r| usize::try_from(r).ok())
            .ok_or_else(|| SplitError(format!("output {name:?} has shape {shape:?}")))?;
        let elements = per_row.checked_mul(total);
        let mut parameters = match o.read::<Value>("parameters") {
            Some(Value::Object(p)) => p,
            _ => Map::new(),
        };
        let data = match parameters
            .remove("binary_data_size")
            .as_ref()
            .and_then(Value::as_u64)
        {
            Some(size) => {
                let mine = raw.get(..size as usize).ok_or_else(|| {
                    SplitError(format!(
                        "output {name:?} declares more binary data than the reply holds"
                    ))
                })?;
                raw = &raw[size as usize..];
                let dt = dt.ok_or_else(|| {
                    SplitError(format!(
                        "output {name:?} is binary of a datatype braid cannot split"
                    ))
                })?;
                let offsets = elements
                    .filter(|_| shape.first().copied() == Some(total as i64))
                    .map(|n| tensor::element_offsets(dt, mine, n))
                    .transpose()
                    .map_err(|e| SplitError(format!("output {name:?}: {e}")))?
                    .ok_or_else(|| {
                        SplitError(format!(
                            "output {name:?} has shape {shape:?}, expected {total} rows"
                        ))
                    })?;
                ReplyData::Raw {
                    bytes: mine,
                    offsets,
                }
            }
            None => {
                let text = o.get("data").map_or(&b""[..], |d| d.get().as_bytes());
                let mut spans = Vec::with_capacity(elements.unwrap_or(0).min(text.len()));
                let nested = tensor::leaves(text, |at, e| {
                    spans.push((at, at + e.len()));
                    Ok::<_, ()>(())
                })
                .unwrap_or_else(|()| unreachable!("the callback never fails"));
                ReplyData::Json {
                    text,
                    spans,
                    flat: !nested,
                }
            }
        };
        if row_ids.is_some_and(|ids| ids.name == name) {
            echoed_ids.push(match &data {
                ReplyData::Json { text, spans, .. } => spans
                    .iter()
                    .map(|&(s, e)| std::str::from_utf8(&text[s..e]).ok()?.parse::<i64>().ok())
                    .collect(),
                ReplyData::Raw { bytes, .. } if dt == Some(Dtype::I64) => Some(
                    bytes
                        .chunks_exact(8)
                        .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                        .collect(),
                ),
                ReplyData::Raw { .. } => None,
            });
            continue;
        }
        if shape.first().copied() != Some(total as i64) {
            return Err(SplitError(format!(
                "output {name:?} has shape {shape:?}, expected {total} rows"
            )));
        }
        if let ReplyData::Json { spans, .. } = &data
            && Some(spans.len()) != elements
        {
            return Err(SplitError(format!(
                "output {name:?} has {} elements for shape {shape:?}",
                spans.len()
            )));
        }
        parsed.push(ReplyOutput {
            fields: o
                .0
                .iter()
                .filter(|(k, _)| !matches!(k.as_str(), "shape" | "data" | "parameters"))
                .map(|(k, v)| (k.as_str(), *v))
                .collect(),
            parameters,
            name,
            dt,
            inner: shape[1..].to_vec(),
            per_row,
            data,
        });
    }
    if !raw.is_empty() {
        return Err(SplitError(format!(
            "{} bytes of binary data in the reply belong to no output",
            raw.len()
        )));
    }
    if let Some(ids) = row_ids {
        check_row_ids(&echoed_ids, ids, total)?;
    }
    let mut start = 0;
    let mut bodies = Vec::with_capacity(items.len());
    for item in items {
        let mut binary = Vec::new();
        let mut body = Vec::with_capacity(64 + head.len() / items.len());
        let mut first = true;
        body.push(b'{');
        for (k, v) in top.0.iter().filter(|(k, _)| k != "id") {
            write_key(&mut body, &mut first, k);
            body.extend_from_slice(v.get().as_bytes());
        }
        if let Some(id) = &item.id {
            write_key(&mut body, &mut first, "id");
            body.extend_from_slice(id.get().as_bytes());
        }
        write_key(&mut body, &mut first, "outputs");
        body.push(b'[');
        let mut any_binary = false;
        for (n, o) in parsed.iter().enumerate() {
            let (a, b) = (start * o.per_row, (start + item.rows) * o.per_row);
            let wrong_form = |e: String| SplitError(format!("output {:?}: {e}", o.name));
            if n > 0 {
                body.push(b',');
            }
            body.push(b'{');
            let mut first = true;
            for (k, v) in &o.fields {
                write_key(&mut body, &mut first, k);
                body.extend_from_slice(v.get().as_bytes());
            }
            write_key(&mut body, &mut first, "shape");
            body.push(b'[');
            write_shape(&mut body, item.rows, &o.inner);
            body.push(b']');
            if v2(item).wants_binary(&o.name) {
                any_binary = true;
                let at = binary.len();
                o.write_raw(a..b, &mut binary).map_err(wrong_form)?;
                let mut params = o.parameters.clone();
                params.insert("binary_data_size".into(), json!(binary.len() - at));
                write_key(&mut body, &mut first, "parameters");
                write_json(&mut body, &params);
            } else {
                if !o.parameters.is_empty() {
                    write_key(&mut body, &mut first, "parameters");
                    write_json(&mut body, &o.parameters);
                }
                write_key(&mut body, &mut first, "data");
                body.push(b'[');
                o.write_text(a..b, &mut body).map_err(wrong_form)?;
                body.push(b']');
            }
            body.push(b'}');
        }
        body.extend_from_slice(b"]}");
        start += item.rows;
        if !any_binary {
            bodies.push(Payload::json(body));
        } else {
            let header_len = body.len();
            body.extend_from_slice(&binary);
            bodies.push(Payload {
                body: body.into(),
                header_len: Some(header_len),
            });
        }
    }
    Ok(bodies)
}

/// The reply's row-id output must be there exactly once, and be the ids sent, in order.
fn check_row_ids(echoed: &[Option<Vec<i64>>], ids: RowIds, total: usize) -> Result<(), SplitError> {
    let [Some(data)] = echoed else {
        return Err(SplitError(format!(
            "backend reply must echo the row-id tensor {:?} exactly once, as INT64",
            ids.name
        )));
    };
    let in_order = data.len() == total
        && data
            .iter()
            .enumerate()
            .all(|(r, d)| *d == ids.first + r as i64);
    if !in_order {
        return Err(SplitError(format!(
            "backend reply's {:?} is not the rows sent, in order: rows were reordered, lost or mixed with another batch",
            ids.name
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    // The codec's interface (which dispatches to this file for v2 items).
    use crate::batch::codec::{merge, split, split_payload};
    use bytes::Bytes;

    fn req(id: &str, rows: &[&str]) -> Item {
        let body = json!({"id": id, "inputs": [{"name": "text", "datatype": "BYTES", "shape": [rows.len()], "data": rows}]});
        parse_v2(body.to_string().as_bytes()).unwrap()
    }

    /// A backend that answers each row with "<row>!" and a [rows, 2] FP32 output.
    fn reply_for(merged: &[u8]) -> Vec<u8> {
        let v: Value = serde_json::from_slice(merged).unwrap();
        let data: Vec<String> = v["inputs"][0]["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| format!("{}!", d.as_str().unwrap()))
            .collect();
        let n = data.len();
        let nums: Vec<f64> = (0..n * 2).map(|i| i as f64).collect();
        json!({"model_name": "m", "id": "batch", "outputs": [
            {"name": "echo", "datatype": "BYTES", "shape": [n], "data": data},
            {"name": "vec", "datatype": "FP32", "shape": [n, 2], "data": nums},
        ]})
        .to_string()
        .into_bytes()
    }

    #[test]
    fn merge_then_split_gives_each_request_its_own_rows_and_id() {
        let (a, b, c) = (
            req("a", &["a1", "a2"]),
            req("b", &["b1"]),
            req("c", &["c1", "c2", "c3"]),
        );
        assert_eq!(a.key, b.key);
        let items = [&a, &b, &c];
        let merged = merge(&items, None).body;
        let m: Value = serde_json::from_slice(&merged).unwrap();
        assert_eq!(m["inputs"][0]["shape"], json!([6]));
        let bodies = split(&items, &reply_for(&merged), None).unwrap();
        let got: Vec<Value> = bodies
            .iter()
            .map(|b| serde_json::from_slice(b).unwrap())
            .collect();
        assert_eq!(got[0]["id"], "a");
        assert_eq!(got[0]["outputs"][0]["data"], json!(["a1!", "a2!"]));
        assert_eq!(got[1]["outputs"][0]["data"], json!(["b1!"]));
        assert_eq!(got[1]["outputs"][1]["shape"], json!([1, 2]));
        assert_eq!(got[1]["outputs"][1]["data"], json!([4.0, 5.0]));
        assert_eq!(got[2]["outputs"][0]["data"], json!(["c1!", "c2!", "c3!"]));
        assert_eq!(got[2]["model_name"], "m");
    }

    #[test]
    fn a_short_or_malformed_reply_is_refused_whole() {
        let (a, b) = (req("a", &["a1"]), req("b", &["b1"]));
        let items = [&a, &b];
        let short = json!({"outputs": [{"name": "echo", "datatype": "BYTES", "shape": [1], "data": ["a1!"]}]});
        assert!(split(&items, short.to_string().as_bytes(), None).is_err());
        let lying = json!({"outputs": [{"name": "echo", "datatype": "BYTES", "shape": [2], "data": ["a1!"]}]});
        assert!(split(&items, lying.to_string().as_bytes(), None).is_err());
        assert!(split(&items, b"<html>oops</html>", None).is_err());
        assert!(split(&items, b"{}", None).is_err());
    }

    /// Nested `data` (row-major lists of lists) in requests and replies: each element
    /// is kept as sent, the rows are cut where they are, and the reply's other fields,
    /// including escaped strings, pass through byte for byte.
    #[test]
    fn nested_data_is_flattened_by_element_and_other_fields_pass_as_sent() {
        let parse = |v: Value| parse_v2(v.to_string().as_bytes()).unwrap();
        let a = parse(json!({"id": {"trace": [1, "x"]}, "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [[1.5, -2e-3], [3, 4]]}]}));
        let b = parse(json!({"inputs": [
            {"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [5.25, 6]}]}));
        assert_eq!(a.key, b.key);
        let items = [&a, &b];
        let merged: Value = serde_json::from_slice(&merge(&items, None).body).unwrap();
        assert_eq!(merged["inputs"][0]["shape"], json!([3, 2]));
        assert_eq!(
            merged["inputs"][0]["data"],
            json!([1.5, -2e-3, 3, 4, 5.25, 6])
        );
        let reply =
            br#"{"model_name":"m\"q","outputs":[{"name":"y","datatype":"INT64","shape":[3,2],
            "data":[[1, 2], [3, 4], [5, 6]], "note": {"k": "[v]"}}],"extra":[1,{"a":null}]}"#;
        let bodies = split(&items, reply, None).unwrap();
        let got: Vec<Value> = bodies
            .iter()
            .map(|b| serde_json::from_slice(b).unwrap())
            .collect();
        assert_eq!(got[0]["id"], json!({"trace": [1, "x"]}));
        assert_eq!(got[0]["outputs"][0]["data"], json!([1, 2, 3, 4]));
        assert_eq!(got[0]["outputs"][0]["shape"], json!([2, 2]));
        assert_eq!(got[0]["outputs"][0]["note"], json!({"k": "[v]"}));
        assert_eq!(got[1]["outputs"][0]["data"], json!([5, 6]));
        assert_eq!(got[1].get("id"), None);
        assert_eq!(got[1]["model_name"], "m\"q");
        assert_eq!(got[1]["extra"], json!([1, {"a": null}]));
        // An element the datatype cannot hold is the sender's 400, never the batch's.
        let wrong =
            json!({"inputs": [{"name": "x", "datatype": "INT8", "shape": [1], "data": [[300]]}]});
        assert!(
            matches!(parse_v2(wrong.to_string().as_bytes()), Err(Unqueued::Bad(m)) if m.contains("300"))
        );
    }

    /// A header that cannot be read in one pass is explained precisely.
    #[test]
    fn unreadable_requests_say_what_is_wrong_or_go_alone() {
        let parse = |s: &str| parse_v2(s.as_bytes()).unwrap_err();
        let bad = |m: &str| Unqueued::Bad(m.to_string());
        assert_eq!(
            parse(r#"{"inputs": "x"}"#),
            bad("request has no \"inputs\" list")
        );
        assert_eq!(parse(r#"{"id": 1}"#), bad("request has no \"inputs\" list"));
        assert_eq!(
            parse(r#"{"inputs": [{}, 3]}"#),
            bad("inputs[1] is not an object")
        );
        assert_eq!(parse(r#"[1]"#), bad("request must be a JSON object"));
        assert!(
            matches!(parse(r#"{"inputs": [}"#), Unqueued::Bad(m) if m.starts_with("request is not valid JSON"))
        );
        assert_eq!(parse(r#"{"extra": 1, "inputs": "x"}"#), Unqueued::Alone);
        assert_eq!(parse(r#"{"inputs": []}"#), bad("request has no inputs"));
    }

    #[test]
    fn keys_separate_what_cannot_merge() {
        let a = req("a", &["x"]);
        let other_shape = parse_v2(json!({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1, 1], "data": ["x"]}]}).to_string().as_bytes()).unwrap();
        let with_outputs = parse_v2(json!({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["x"]}], "outputs": [{"name": "label"}]}).to_string().as_bytes()).unwrap();
        assert_ne!(a.key, other_shape.key);
        assert_ne!(a.key, with_outputs.key);
        // Shared memory (or any input parameter but the binary size): not merged.
        let shm = json!({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "parameters": {"shared_memory_region": "r"}}]});
        assert_eq!(
            parse_v2(shm.to_string().as_bytes()).unwrap_err(),
            Unqueued::Alone
        );
        // A datatype outside the protocol's list cannot be converted between forms:
        // forwarded alone, whatever form its outputs are asked in.
        let unknown = json!({"inputs": [{"name": "t", "datatype": "FP8", "shape": [1], "data": [1]}],
                             "parameters": {"binary_data_output": true}});
        assert_eq!(
            parse_v2(unknown.to_string().as_bytes()).unwrap_err(),
            Unqueued::Alone
        );
        // Binary data declared but none sent: a 400, not a guess.
        let binary = json!({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 5}}]});
        assert!(matches!(
            parse_v2(binary.to_string().as_bytes()),
            Err(Unqueued::Bad(_))
        ));
        let mismatch =
            json!({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["x"]}]});
        assert!(matches!(
            parse_v2(mismatch.to_string().as_bytes()),
            Err(Unqueued::Bad(_))
        ));
    }

    /// The echo backend of `reply_for`, also echoing the row ids, optionally reversed.
    fn reply_with_ids(merged: &[u8], reverse: bool) -> Vec<u8> {
        let m: Value = serde_json::from_slice(merged).unwrap();
        let mut v: Value = serde_json::from_slice(&reply_for(merged)).unwrap();
        let mut ids = m["inputs"][1].clone();
        if reverse {
            let mut data = ids["data"].as_array().unwrap().clone();
            data.reverse();
            ids["data"] = json!(data);
            let mut echo = v["outputs"][0]["data"].as_array().unwrap().clone();
            echo.reverse();
            v["outputs"][0]["data"] = json!(echo);
        }
        v["outputs"].as_array_mut().unwrap().push(ids);
        v.to_string().into_bytes()
    }

    #[test]
    fn row_ids_are_sent_checked_and_stripped() {
        let (a, b) = (req("a", &["a1"]), req("b", &["b1", "b2"]));
        let items = [&a, &b];
        let ids = RowIds {
            name: "braid_row_id",
            first: RowIds::fresh_first(3),
        };
        let merged = merge(&items, Some(ids)).body;
        let m: Value = serde_json::from_slice(&merged).unwrap();
        assert_eq!(m["inputs"][1]["name"], "braid_row_id");
        assert_eq!(m["inputs"][1]["shape"], json!([3]));
        let bodies = split(&items, &reply_with_ids(&merged, false), Some(ids)).unwrap();
        let b_out: Value = serde_json::from_slice(&bodies[1]).unwrap();
        assert_eq!(
            b_out["outputs"].as_array().unwrap().len(),
            2,
            "row ids stripped"
        );
        assert_eq!(b_out["outputs"][0]["data"], json!(["b1!", "b2!"]));

        let shuffled = reply_with_ids(&merged, true);
        assert!(
            split(&items, &shuffled, None).is_ok(),
            "shapes alone cannot see it"
        );
        let err = split(&items, &shuffled, Some(ids)).unwrap_err();
        assert!(err.0.contains("reordered"), "{}", err.0);
        // Not echoed at all, or another batch's ids.
        assert!(split(&items, &reply_for(&merged), Some(ids)).is_err());
        let other = RowIds {
            first: ids.first + 100,
            ..ids
        };
        assert!(split(&items, &reply_with_ids(&merged, false), Some(other)).is_err());
        // Fresh ids never repeat.
        assert!(RowIds::fresh_first(1) >= ids.first + 3);
    }

    #[test]
    fn row_ids_join_a_requested_outputs_list() {
        let body = json!({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["x"]}], "outputs": [{"name": "label"}]});
        let item = parse_v2(body.to_string().as_bytes()).unwrap();
        let ids = RowIds {
            name: "rid",
            first: 7,
        };
        let m: Value = serde_json::from_slice(&merge(&[&item], Some(ids)).body).unwrap();
        assert_eq!(m["outputs"], json!([{"name": "label"}, {"name": "rid"}]));
        assert_eq!(m["inputs"][1]["data"], json!([7]));
    }

    /// A Triton binary-extension body: JSON header, then each binary input's bytes.
    fn binary_req(header: Value, raw: &[u8]) -> (Vec<u8>, usize) {
        let mut body = header.to_string().into_bytes();
        let n = body.len();
        body.extend_from_slice(raw);
        (body, n)
    }

    fn bytes_tensor(items: &[&str]) -> Vec<u8> {
        let mut raw = Vec::new();
        for s in items {
            let text = json!(s).to_string();
            tensor::text_to_raw(Dtype::Bytes, text.as_bytes(), &mut raw).unwrap();
        }
        raw
    }

    /// JSON and binary requests share a batch; each gets its rows in the form it asked.
    #[test]
    fn json_and_binary_requests_merge_and_each_gets_its_own_form_back() {
        let json_in_json_out = req("a", &["a1"]);
        let raw = bytes_tensor(&["b1", "b2"]);
        let (body, n) = binary_req(
            json!({"id": "b", "inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": raw.len()}}],
                   "parameters": {"binary_data_output": true}}),
            &raw,
        );
        let binary_in_binary_out = parse_v2_with(&body, Some(n), PathModel::default()).unwrap();
        let json_in_binary_out = parse_v2(
            json!({"id": "c", "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["c1"]}],
                   "parameters": {"binary_data_output": true}})
            .to_string()
            .as_bytes(),
        )
        .unwrap();
        let items = [
            &json_in_json_out,
            &binary_in_binary_out,
            &json_in_binary_out,
        ];
        assert!(items.iter().all(|i| i.key == items[0].key));
        let merged = merge(&items, None);
        let n = merged
            .header_len
            .expect("a batch with binary data is sent binary");
        let head: Value = serde_json::from_slice(&merged.body[..n]).unwrap();
        assert_eq!(head["parameters"]["binary_data_output"], true);
        assert_eq!(head["inputs"][0]["shape"], json!([4]));
        assert_eq!(
            &merged.body[n..],
            bytes_tensor(&["a1", "b1", "b2", "c1"]).as_slice()
        );

        // The executor answers binary: FP32 [4, 2] and BYTES [4].
        let floats: Vec<u8> = (0..8)
            .flat_map(|i| (i as f32 * 0.5).to_le_bytes())
            .collect();
        let labels = bytes_tensor(&["la", "lb", "lb2", "lc"]);
        let mut raw = floats.clone();
        raw.extend(&labels);
        let (body, n) = binary_req(
            json!({"model_name": "m", "outputs": [
                {"name": "embedding", "datatype": "FP32", "shape": [4, 2], "parameters": {"binary_data_size": floats.len()}},
                {"name": "label", "datatype": "BYTES", "shape": [4], "parameters": {"binary_data_size": labels.len()}}]}),
            &raw,
        );
        let reply = Payload {
            body: body.into(),
            header_len: Some(n),
        };
        let got = split_payload(&items, &reply, None).unwrap();
        // a: all JSON.
        assert_eq!(got[0].header_len, None);
        let a: Value = serde_json::from_slice(&got[0].body).unwrap();
        assert_eq!(a["id"], "a");
        assert_eq!(a["outputs"][0]["data"], json!([0.0, 0.5]));
        assert_eq!(a["outputs"][0]["shape"], json!([1, 2]));
        assert_eq!(a["outputs"][1]["data"], json!(["la"]));
        // b: binary, its two rows, sizes right.
        let n = got[1].header_len.unwrap();
        let b: Value = serde_json::from_slice(&got[1].body[..n]).unwrap();
        assert_eq!(b["id"], "b");
        assert_eq!(b["outputs"][0]["parameters"]["binary_data_size"], 16);
        assert_eq!(b["outputs"][0]["shape"], json!([2, 2]));
        let mut want = floats[8..24].to_vec();
        want.extend(bytes_tensor(&["lb", "lb2"]));
        assert_eq!(&got[1].body[n..], want.as_slice());
        // c: JSON inputs, binary outputs.
        let n = got[2].header_len.unwrap();
        let mut want = floats[24..].to_vec();
        want.extend(bytes_tensor(&["lc"]));
        assert_eq!(&got[2].body[n..], want.as_slice());

        // The executor answering JSON instead: the binary clients still get binary.
        let json_reply = json!({"model_name": "m", "outputs": [
            {"name": "embedding", "datatype": "FP32", "shape": [4, 2], "data": [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5]},
            {"name": "label", "datatype": "BYTES", "shape": [4], "data": ["la", "lb", "lb2", "lc"]}]});
        let again = split_payload(&items, &Payload::json(json_reply.to_string()), None).unwrap();
        assert_eq!(again, got);
    }

    #[test]
    fn binary_replies_that_do_not_add_up_are_refused_whole() {
        let items = [&req("a", &["x"]), &req("b", &["y"])];
        let floats: Vec<u8> = (0..4).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let reply = |size: usize, shape: Value, raw: &[u8]| {
            let (body, n) = binary_req(
                json!({"outputs": [{"name": "e", "datatype": "FP32", "shape": shape, "parameters": {"binary_data_size": size}}]}),
                raw,
            );
            Payload {
                body: body.into(),
                header_len: Some(n),
            }
        };
        assert!(split_payload(&items, &reply(16, json!([2, 2]), &floats), None).is_ok());
        // Claims more than is there; leaves bytes over; shape and size disagree.
        assert!(split_payload(&items, &reply(1 << 40, json!([2, 2]), &floats), None).is_err());
        assert!(split_payload(&items, &reply(12, json!([2, 2]), &floats), None).is_err());
        assert!(split_payload(&items, &reply(16, json!([2, 3]), &floats), None).is_err());
        assert!(split_payload(&items, &reply(16, json!([4, 1]), &floats), None).is_err());
        // A header length past the end.
        let short = Payload {
            body: Bytes::from_static(b"{}"),
            header_len: Some(10),
        };
        assert!(split_payload(&items, &short, None).is_err());
    }

    #[test]
    fn a_body_naming_the_paths_model_is_batched_and_another_is_forwarded_alone() {
        let body = |extra: Value| {
            let mut v = json!({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["x"]}]});
            v.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            v.to_string()
        };
        let path = PathModel {
            name: Some("m"),
            version: None,
        };
        let parse = |extra| parse_v2_with(body(extra).as_bytes(), None, path);
        assert!(parse(json!({"model_name": "m"})).is_ok());
        assert!(parse(json!({"model_name": "m", "model_version": null})).is_ok());
        assert_eq!(
            parse(json!({"model_name": "other"})).unwrap_err(),
            Unqueued::Alone
        );
        assert_eq!(
            parse(json!({"model_version": "2"})).unwrap_err(),
            Unqueued::Alone
        );
        let versioned = PathModel {
            name: Some("m"),
            version: Some("2"),
        };
        assert!(
            parse_v2_with(
                body(json!({"model_version": "2"})).as_bytes(),
                None,
                versioned
            )
            .is_ok()
        );
    }
}
