//! A v2 request read once: its tensors' data kept as the text or bytes they came in,
//! checked as the batch needs (names, shapes, datatypes, the path's model).

use super::*;

/// A JSON object whose tensor list (`inputs` or `outputs`, a list of objects) is read
/// in the same pass, so that no tensor's data is skipped over twice.
pub(super) struct WithTensors<'a> {
    /// Every other field.
    pub(super) top: Fields<'a>,
    pub(super) tensors: Option<Vec<Fields<'a>>>,
}

pub(super) fn read_with_tensors<'a>(
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
pub(super) fn split_header(body: &[u8], header_len: Option<usize>) -> Option<(&[u8], &[u8])> {
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
        let input = read_input(i, fields, &mut raw, &mut rows)?;
        key.push_str(&format!(
            "|{}:{}:{:?}",
            input.name, input.datatype, input.inner
        ));
        inputs.push(input);
    }
    if !raw.is_empty() {
        return bad(format!(
            "{} bytes of binary data follow the inputs that declare theirs",
            raw.len()
        ));
    }
    let (parameters, binary_default, priority) = request_parameters(&obj)?;
    let (outputs, binary_out) = requested_outputs(&obj, binary_default)?;
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

/// Input `i`: its name, datatype and shape checked (its rows agreeing with `rows`,
/// the earlier inputs'), its data read from its JSON or taken from the front of `raw`.
fn read_input(
    i: usize,
    fields: &Fields<'_>,
    raw: &mut &[u8],
    rows: &mut Option<usize>,
) -> Result<Input, Unqueued> {
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
    *rows = Some(n as usize);
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
    let data = input_data(&name, dt, &shape, expected, binary_size, fields, raw)?;
    Ok(Input {
        name,
        datatype,
        dt,
        inner: inner.to_vec(),
        data,
    })
}

/// An input's data: `binary_size` bytes from the front of `raw`, or its JSON `data`,
/// each element checked to be a `dt` now, so a batch never meets a value it cannot
/// carry (one request's mistake would fail the batch).
fn input_data(
    name: &str,
    dt: Dtype,
    shape: &[i64],
    expected: i64,
    binary_size: Option<u64>,
    fields: &Fields<'_>,
    raw: &mut &[u8],
) -> Result<Data, Unqueued> {
    match binary_size {
        Some(size) => {
            if size > raw.len() as u64 {
                return bad(format!(
                    "input {name:?} declares {size} bytes of binary data but {} remain in the body",
                    raw.len()
                ));
            }
            let (mine, rest) = raw.split_at(size as usize);
            *raw = rest;
            tensor::element_offsets(dt, mine, expected as usize)
                .map_err(|e| Unqueued::Bad(format!("input {name:?} (shape {shape:?}): {e}")))?;
            Ok(Data::Raw(mine.to_vec()))
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
            Ok(Data::Json(elements))
        }
    }
}

/// The request's `parameters`, without the binary-form flag and the priority (each
/// per request; everything else in them is part of the batch key): the rest, the flag,
/// the priority.
fn request_parameters(obj: &Fields<'_>) -> Result<(Option<Value>, bool, Option<u64>), Unqueued> {
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
    Ok((parameters, binary_default, priority))
}

/// The outputs asked for (without their binary flags, part of the key), and for each,
/// whether it comes back binary.
fn requested_outputs(
    obj: &Fields<'_>,
    binary_default: bool,
) -> Result<(Option<Vec<Value>>, Vec<bool>), Unqueued> {
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
    Ok((outputs, binary_out))
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
