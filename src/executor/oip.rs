//! Open Inference Protocol v2 request/response codec for the executor's one input
//! (`text`, BYTES) and its outputs (`embedding`, `label`, `scores`), including Triton's
//! binary tensor extension, which the official Triton clients use by default.
//!
//! Binary extension: the `Inference-Header-Content-Length: N` header says the body
//! starts with N bytes of JSON; tensors whose parameters carry `binary_data_size`
//! follow in order as raw bytes. BYTES elements are a 4-byte little-endian length
//! followed by the bytes; FP32 elements are little-endian floats.

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, header};
use serde_json::{Map, Value, json};

use super::model::Outputs;

pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// `Inference-Header-Content-Length`, when present; a value that is not a byte count is
/// a bad request.
pub fn header_len(headers: &HeaderMap) -> Result<Option<usize>, BadRequest> {
    headers
        .get(HEADER_LENGTH)
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .ok_or_else(|| {
                    BadRequest("Inference-Header-Content-Length must be a byte count".into())
                })
        })
        .transpose()
}

/// Marks a body as JSON, or (with a header length) as Triton's binary form.
pub fn set_body_type(headers: &mut HeaderMap, header_len: Option<usize>) {
    let ct = if header_len.is_some() {
        "application/octet-stream"
    } else {
        "application/json"
    };
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
    if let Some(n) = header_len {
        headers.insert(HEADER_LENGTH, HeaderValue::from(n));
    }
}
pub const INPUT: &str = "text";
/// Optional INT64 `[N]` input echoed back as an output of the same name, so a batching
/// proxy can check row order (`batching.row_id` in the proxy's config).
pub const ROW_ID: &str = "braid_row_id";
pub const OUTPUTS: [&str; 3] = ["embedding", "label", "scores"];

/// A request's problem, answered 400 with this message.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadRequest(pub String);

fn bad<T>(msg: impl Into<String>) -> Result<T, BadRequest> {
    Err(BadRequest(msg.into()))
}

/// A decoded inference request.
#[derive(Debug)]
pub struct Request {
    pub id: Option<Value>,
    pub texts: Vec<String>,
    /// The `braid_row_id` input, echoed as an output.
    pub row_ids: Option<Vec<i64>>,
    /// Requested outputs (name, binary?); `None` means all, in JSON unless
    /// `binary_data_output` asked otherwise.
    pub outputs: Option<Vec<(String, bool)>>,
    pub binary_by_default: bool,
}

pub fn decode(body: &[u8], header_len: Option<usize>) -> Result<Request, BadRequest> {
    let (json_part, mut binary) = match header_len {
        Some(n) if n > body.len() => {
            return bad(format!(
                "{HEADER_LENGTH} is {n} but the body has {} bytes",
                body.len()
            ));
        }
        Some(n) => (&body[..n], &body[n..]),
        None => (body, &[][..]),
    };
    let v: Value = serde_json::from_slice(json_part)
        .map_err(|e| BadRequest(format!("request is not valid JSON: {e}")))?;
    let Some(obj) = v.as_object() else {
        return bad("request must be a JSON object");
    };
    let Some(inputs) = obj.get("inputs").and_then(Value::as_array) else {
        return bad("request has no \"inputs\" list");
    };
    let mut texts = None;
    let mut row_ids = None;
    for input in inputs {
        let name = input["name"].as_str().unwrap_or_default();
        if name == ROW_ID && row_ids.is_none() {
            row_ids = Some(decode_row_ids(input)?);
            continue;
        }
        if name != INPUT {
            return bad(format!(
                "unknown input {name:?}: this model takes one input, \"{INPUT}\" (BYTES, shape [N])"
            ));
        }
        if texts.is_some() {
            return bad(format!("input \"{INPUT}\" is given twice"));
        }
        let values = decode_texts(input, body.len(), &mut binary)?;
        texts = Some(values);
    }
    let Some(texts) = texts else {
        return bad(format!("missing input \"{INPUT}\""));
    };
    if row_ids.as_ref().is_some_and(|ids| ids.len() != texts.len()) {
        return bad(format!(
            "input \"{ROW_ID}\" must have one id per row of \"{INPUT}\""
        ));
    }

    let (outputs, binary_by_default) = requested_outputs(obj)?;
    Ok(Request {
        id: obj.get("id").cloned(),
        texts,
        row_ids,
        outputs,
        binary_by_default,
    })
}

/// The `text` input's rows: BYTES of shape [N] (or [N, 1]), as JSON strings or as
/// binary (taken from the front of `binary`), sized from what was sent (`body_len` bytes
/// in all), never from the declared shape alone.
fn decode_texts(
    input: &Value,
    body_len: usize,
    binary: &mut &[u8],
) -> Result<Vec<String>, BadRequest> {
    let datatype = input["datatype"].as_str().unwrap_or_default();
    if datatype != "BYTES" {
        return bad(format!(
            "input \"{INPUT}\" must have datatype BYTES, not {datatype:?}"
        ));
    }
    let shape: Vec<i64> = match input["shape"].as_array() {
        Some(s) => s.iter().map(|d| d.as_i64().unwrap_or(-1)).collect(),
        None => return bad(format!("input \"{INPUT}\" has no shape")),
    };
    let rows = match shape[..] {
        [n] | [n, 1] if n >= 0 => n as usize,
        _ => {
            return bad(format!(
                "input \"{INPUT}\" must have shape [N] (or [N, 1]), not {shape:?}"
            ));
        }
    };
    if rows == 0 {
        return bad("empty batch: input \"text\" has no rows");
    }
    // Every row takes at least one byte in either encoding: a shape the body cannot
    // hold is refused before anything is sized from it.
    if rows > body_len {
        return bad(format!(
            "input \"{INPUT}\" declares {rows} rows but the body has only {} bytes",
            body_len
        ));
    }
    let values = match input["parameters"]["binary_data_size"].as_u64() {
        Some(size) => {
            let size = size as usize;
            if size > binary.len() {
                return bad(format!(
                    "input \"{INPUT}\" declares {size} binary bytes but only {} follow",
                    binary.len()
                ));
            }
            let (mine, rest) = binary.split_at(size);
            *binary = rest;
            decode_bytes_tensor(mine)?
        }
        None => {
            // Sized from the data actually sent, never from the declared shape.
            let sent = input["data"].as_array().map_or(0, Vec::len);
            let mut out = Vec::with_capacity(sent.min(rows));
            flatten_strings(&input["data"], &mut out)?;
            out
        }
    };
    if values.len() != rows {
        return bad(format!(
            "input \"{INPUT}\" has shape {shape:?} but {} elements",
            values.len()
        ));
    }
    Ok(values)
}

/// Outputs by name, each with whether it comes back binary.
type Wanted = Vec<(String, bool)>;

/// The outputs asked for, each with whether it comes back binary, and the request's
/// default for that.
fn requested_outputs(
    obj: &serde_json::Map<String, Value>,
) -> Result<(Option<Wanted>, bool), BadRequest> {
    let binary_by_default = obj
        .get("parameters")
        .and_then(|p| p.get("binary_data_output"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let outputs = match obj.get("outputs") {
        None | Some(Value::Null) => None,
        Some(Value::Array(list)) => {
            let mut out = Vec::new();
            for o in list {
                let name = o["name"].as_str().unwrap_or_default().to_string();
                let binary = o["parameters"]["binary_data"]
                    .as_bool()
                    .unwrap_or(binary_by_default);
                out.push((name, binary));
            }
            Some(out)
        }
        Some(_) => return bad("\"outputs\" must be a list"),
    };
    Ok((outputs, binary_by_default))
}

fn decode_row_ids(input: &Value) -> Result<Vec<i64>, BadRequest> {
    let shape_ok = matches!(input["shape"].as_array().map(Vec::as_slice), Some([_]));
    let ids = input["data"]
        .as_array()
        .and_then(|d| d.iter().map(Value::as_i64).collect::<Option<Vec<i64>>>());
    match ids {
        Some(ids)
            if shape_ok
                && input["datatype"] == "INT64"
                && input["shape"][0].as_u64() == Some(ids.len() as u64) =>
        {
            Ok(ids)
        }
        _ => bad(format!(
            "input \"{ROW_ID}\" must be INT64 with shape [N] and N integers"
        )),
    }
}

fn flatten_strings(v: &Value, out: &mut Vec<String>) -> Result<(), BadRequest> {
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Array(items) => {
            for i in items {
                flatten_strings(i, out)?;
            }
        }
        Value::Null => return bad(format!("input \"{INPUT}\" has no data")),
        other => {
            return bad(format!(
                "input \"{INPUT}\" elements must be strings, found {other}"
            ));
        }
    }
    Ok(())
}

fn decode_bytes_tensor(mut raw: &[u8]) -> Result<Vec<String>, BadRequest> {
    let mut out = Vec::new();
    while !raw.is_empty() {
        if raw.len() < 4 {
            return bad("binary BYTES tensor is truncated (length prefix)");
        }
        let n = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]) as usize;
        raw = &raw[4..];
        if raw.len() < n {
            return bad("binary BYTES tensor is truncated (element)");
        }
        let s = std::str::from_utf8(&raw[..n]).map_err(|_| {
            BadRequest(format!(
                "input \"{INPUT}\" element {} is not UTF-8 text",
                out.len()
            ))
        })?;
        out.push(s.to_string());
        raw = &raw[n..];
    }
    Ok(out)
}

/// An encoded response body, and the JSON header length when binary data follows.
pub struct Encoded {
    pub body: Bytes,
    pub header_len: Option<usize>,
}

/// Encodes the model's outputs as the request asked.
pub fn encode(model: &str, req: &Request, out: &Outputs) -> Result<Encoded, BadRequest> {
    let available: Vec<&str> = OUTPUTS
        .iter()
        .copied()
        .filter(|n| *n == "embedding" || out.label.is_some())
        .collect();
    let wanted: Vec<(String, bool)> = match &req.outputs {
        Some(list) => {
            for (name, _) in list {
                let echoed = name == ROW_ID && req.row_ids.is_some();
                if !available.contains(&name.as_str()) && !echoed {
                    return bad(format!(
                        "unknown output {name:?}; this model has: {}",
                        available.join(", ")
                    ));
                }
            }
            list.iter().filter(|(n, _)| n != ROW_ID).cloned().collect()
        }
        None => available
            .iter()
            .map(|n| (n.to_string(), req.binary_by_default))
            .collect(),
    };
    let rows = out.embedding.rows;
    let mut blobs = BytesMut::new();
    let mut outputs = Vec::with_capacity(wanted.len());
    for (name, binary) in &wanted {
        let (datatype, shape, json_data, raw): (&str, Value, Value, Vec<u8>) = match name.as_str() {
            "embedding" => floats(
                &out.embedding.data,
                json!([rows, out.embedding.dim]),
                *binary,
            ),
            "scores" => {
                let s = out.scores.as_deref().unwrap_or_default();
                let l = s.len().checked_div(rows).unwrap_or(0);
                floats(s, json!([rows, l]), *binary)
            }
            _ => {
                let labels = out.label.as_deref().unwrap_or_default();
                let mut raw = Vec::new();
                if *binary {
                    for l in labels {
                        raw.extend_from_slice(&(l.len() as u32).to_le_bytes());
                        raw.extend_from_slice(l.as_bytes());
                    }
                }
                let data = if *binary { Value::Null } else { json!(labels) };
                ("BYTES", json!([rows]), data, raw)
            }
        };
        let mut o = Map::new();
        o.insert("name".into(), json!(name));
        o.insert("datatype".into(), json!(datatype));
        o.insert("shape".into(), shape);
        if *binary {
            o.insert("parameters".into(), json!({"binary_data_size": raw.len()}));
            blobs.put_slice(&raw);
        } else {
            o.insert("data".into(), json_data);
        }
        outputs.push(Value::Object(o));
    }
    if let Some(ids) = &req.row_ids {
        outputs
            .push(json!({"name": ROW_ID, "datatype": "INT64", "shape": [ids.len()], "data": ids}));
    }
    let mut resp = Map::new();
    resp.insert("model_name".into(), json!(model));
    resp.insert("model_version".into(), json!("1"));
    if let Some(id) = &req.id {
        resp.insert("id".into(), id.clone());
    }
    resp.insert("outputs".into(), Value::Array(outputs));
    let header = serde_json::to_vec(&Value::Object(resp)).expect("JSON values serialize");
    if blobs.is_empty() && !wanted.iter().any(|w| w.1) {
        return Ok(Encoded {
            body: Bytes::from(header),
            header_len: None,
        });
    }
    let header_len = header.len();
    let mut body = BytesMut::with_capacity(header_len + blobs.len());
    body.put_slice(&header);
    body.put_slice(&blobs);
    Ok(Encoded {
        body: body.freeze(),
        header_len: Some(header_len),
    })
}

fn floats(data: &[f32], shape: Value, binary: bool) -> (&'static str, Value, Value, Vec<u8>) {
    if binary {
        let mut raw = Vec::with_capacity(data.len() * 4);
        for f in data {
            raw.extend_from_slice(&f.to_le_bytes());
        }
        ("FP32", shape, Value::Null, raw)
    } else {
        ("FP32", shape, f32s_json(data), Vec::new())
    }
}

/// FP32 values as JSON numbers in their shortest round-trip form ("0.25878024", not
/// the f64 widening "0.25878024101257324"): about 40% less JSON for embeddings.
pub fn f32s_json(data: &[f32]) -> Value {
    Value::Array(data.iter().map(|f| f32_json(*f)).collect())
}

pub fn f32_json(f: f32) -> Value {
    format!("{f}")
        .parse::<f64>()
        .ok()
        .and_then(serde_json::Number::from_f64)
        .map_or(Value::Null, Value::Number)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_requests_decode_and_errors_name_the_problem() {
        let ok = br#"{"id":"r1","inputs":[{"name":"text","datatype":"BYTES","shape":[2],"data":["a","b"]}]}"#;
        let r = decode(ok, None).unwrap();
        assert_eq!(r.texts, ["a", "b"]);
        assert_eq!(r.id, Some(json!("r1")));
        let nested = br#"{"inputs":[{"name":"text","datatype":"BYTES","shape":[2,1],"data":[["a"],["b"]]}]}"#;
        assert_eq!(decode(nested, None).unwrap().texts, ["a", "b"]);
        let cases: [(&[u8], &str); 8] = [
            (br#"{"inputs":[{"name":"text","datatype":"FP32","shape":[1],"data":[1.0]}]}"#, "datatype BYTES"),
            (br#"{"inputs":[{"name":"text","datatype":"BYTES","shape":[3],"data":["a"]}]}"#, "but 1 elements"),
            (br#"{"inputs":[{"name":"text","datatype":"BYTES","shape":[1,2],"data":["a","b"]}]}"#, "shape [N]"),
            (br#"{"inputs":[{"name":"prompt","datatype":"BYTES","shape":[1],"data":["a"]}]}"#, "unknown input \"prompt\""),
            (br#"{"inputs":[]}"#, "missing input \"text\""),
            (br#"{"inputs":[{"name":"text","datatype":"BYTES","shape":[0],"data":[]}]}"#, "empty batch"),
            (br#"{"inputs":[{"name":"text","datatype":"BYTES","shape":[1],"data":[5]}]}"#, "must be strings"),
            (b"not json", "not valid JSON"),
        ];
        for (body, want) in cases {
            let e = decode(body, None).unwrap_err().0;
            assert!(e.contains(want), "{e:?} should mention {want:?}");
        }
    }

    #[test]
    fn a_shape_the_body_cannot_hold_is_refused_before_any_allocation() {
        // 92 bytes that once aborted the process: 24 TB reserved from the shape.
        let body = br#"{"inputs":[{"name":"text","shape":[1000000000000],"datatype":"BYTES","data":["a"]}]}"#;
        let err = decode(body, None).unwrap_err().0;
        assert!(err.contains("declares 1000000000000 rows"), "{err}");
        let binary = br#"{"inputs":[{"name":"text","datatype":"BYTES","shape":[4294967295],"parameters":{"binary_data_size":4}}]}"#;
        let mut body = binary.to_vec();
        body.extend_from_slice(&0u32.to_le_bytes());
        assert!(decode(&body, Some(binary.len())).is_err());
    }

    #[test]
    fn row_ids_are_echoed_and_checked() {
        let body = br#"{"inputs":[{"name":"text","datatype":"BYTES","shape":[2],"data":["a","b"]},{"name":"braid_row_id","datatype":"INT64","shape":[2],"data":[40,41]}],"outputs":[{"name":"embedding"},{"name":"braid_row_id"}]}"#;
        let r = decode(body, None).unwrap();
        assert_eq!(r.row_ids, Some(vec![40, 41]));
        let out = Outputs {
            embedding: crate::executor::encoder::Embeddings {
                rows: 2,
                dim: 1,
                data: vec![0.5, 0.25],
                tokens_computed: 2,
                tokens_real: 2,
                tokens: vec![1, 1],
                phases: Vec::new(),
            },
            label: None,
            scores: None,
        };
        let enc = encode("m", &r, &out).unwrap();
        let v: Value = serde_json::from_slice(&enc.body).unwrap();
        assert_eq!(v["outputs"][0]["name"], "embedding");
        assert_eq!(
            v["outputs"][1],
            json!({"name": "braid_row_id", "datatype": "INT64", "shape": [2], "data": [40, 41]})
        );
        let wrong = br#"{"inputs":[{"name":"text","datatype":"BYTES","shape":[2],"data":["a","b"]},{"name":"braid_row_id","datatype":"INT64","shape":[1],"data":[40]}]}"#;
        assert!(
            decode(wrong, None)
                .unwrap_err()
                .0
                .contains("one id per row")
        );
        let floats = br#"{"inputs":[{"name":"text","datatype":"BYTES","shape":[1],"data":["a"]},{"name":"braid_row_id","datatype":"FP32","shape":[1],"data":[1.5]}]}"#;
        assert!(decode(floats, None).unwrap_err().0.contains("INT64"));
    }

    #[test]
    fn binary_bytes_input_decodes_and_rejects_non_utf8() {
        let header = br#"{"inputs":[{"name":"text","datatype":"BYTES","shape":[2],"parameters":{"binary_data_size":18}}]}"#;
        let mut body = header.to_vec();
        for s in ["hello", "world"] {
            body.extend_from_slice(&(s.len() as u32).to_le_bytes());
            body.extend_from_slice(s.as_bytes());
        }
        let r = decode(&body, Some(header.len())).unwrap();
        assert_eq!(r.texts, ["hello", "world"]);
        let mut bad_utf8 = header.to_vec();
        bad_utf8.extend_from_slice(&5u32.to_le_bytes());
        bad_utf8.extend_from_slice(&[0xff, 0xfe, 0xfd, 0xfc, 0xfb]);
        bad_utf8.extend_from_slice(&5u32.to_le_bytes());
        bad_utf8.extend_from_slice(b"world");
        assert!(
            decode(&bad_utf8, Some(header.len()))
                .unwrap_err()
                .0
                .contains("not UTF-8")
        );
        assert!(decode(&body[..body.len() - 3], Some(header.len())).is_err());
    }
}
