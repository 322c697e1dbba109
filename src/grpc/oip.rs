//! The Open Inference Protocol's gRPC messages in its REST form and back. A
//! `ModelInferRequest` becomes the REST request with Triton's binary tensor extension
//! (raw contents already are that extension's bytes; typed contents are written as
//! them), and a REST reply becomes a `ModelInferResponse` with every output in raw
//! contents. The batcher and the executor speak REST; this lets them serve gRPC
//! callers with the same merge, split and model code.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use super::Code;
use super::pb::model_infer_response::InferOutputTensor;
use super::pb::model_metadata_response::TensorMetadata;
use super::pb::{
    InferParameter, InferTensorContents, ModelInferRequest, ModelInferResponse,
    ModelMetadataResponse, infer_parameter::ParameterChoice,
};
use crate::batch::tensor::{self, Dtype};

/// The REST form of a gRPC inference request: its JSON header followed by the
/// tensors' bytes, and the header's length (`Inference-Header-Content-Length`). Every
/// output is asked for in binary form. The model name and version are the path's.
pub fn rest_request(req: &ModelInferRequest) -> Result<(Vec<u8>, usize), String> {
    let raw = !req.raw_input_contents.is_empty();
    if raw && req.raw_input_contents.len() != req.inputs.len() {
        return Err(format!(
            "{} inputs but {} raw_input_contents: raw contents come one per input",
            req.inputs.len(),
            req.raw_input_contents.len()
        ));
    }
    let mut data = Vec::new();
    let mut inputs = Vec::with_capacity(req.inputs.len());
    for (i, t) in req.inputs.iter().enumerate() {
        let start = data.len();
        match (raw, &t.contents) {
            (true, Some(_)) => {
                return Err(format!(
                    "input {:?} has contents while raw_input_contents is used: send one or the other",
                    t.name
                ));
            }
            (true, None) => data.extend_from_slice(&req.raw_input_contents[i]),
            (false, Some(c)) => contents_to_raw(&t.name, &t.datatype, c, &mut data)?,
            (false, None) => return Err(format!("input {:?} has no data", t.name)),
        }
        let mut params = parameters_json(&t.parameters);
        params.insert("binary_data_size".into(), json!(data.len() - start));
        inputs.push(
            json!({"name": t.name, "datatype": t.datatype, "shape": t.shape,
            "parameters": params}),
        );
    }
    let mut header = Map::new();
    if !req.id.is_empty() {
        header.insert("id".into(), json!(req.id));
    }
    let mut params = parameters_json(&req.parameters);
    params.insert("binary_data_output".into(), json!(true));
    header.insert("parameters".into(), Value::Object(params));
    header.insert("inputs".into(), Value::Array(inputs));
    if !req.outputs.is_empty() {
        let outputs = req
            .outputs
            .iter()
            .map(|o| {
                let mut p = parameters_json(&o.parameters);
                p.insert("binary_data".into(), json!(true));
                json!({"name": o.name, "parameters": p})
            })
            .collect();
        header.insert("outputs".into(), Value::Array(outputs));
    }
    let mut body = serde_json::to_vec(&Value::Object(header)).map_err(|e| e.to_string())?;
    let header_len = body.len();
    body.extend_from_slice(&data);
    Ok((body, header_len))
}

/// A REST inference reply (JSON, or a JSON header and binary data) as a gRPC
/// response: every output's data in `raw_output_contents`, in output order.
pub fn grpc_response(body: &[u8], header_len: Option<usize>) -> Result<ModelInferResponse, String> {
    let (head, mut binary) = match header_len {
        Some(n) => body
            .split_at_checked(n)
            .ok_or_else(|| format!("a {n}-byte header in a {}-byte reply", body.len()))?,
        None => (body, &[][..]),
    };
    let v: Value = serde_json::from_slice(head).map_err(|e| format!("reply header: {e}"))?;
    let text = |k: &str| {
        v.get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let mut resp = ModelInferResponse {
        model_name: text("model_name"),
        model_version: text("model_version"),
        id: text("id"),
        parameters: v
            .get("parameters")
            .and_then(Value::as_object)
            .map(parameters_grpc)
            .unwrap_or_default(),
        ..Default::default()
    };
    let outputs = v
        .get("outputs")
        .and_then(Value::as_array)
        .ok_or("the reply has no outputs")?;
    for o in outputs {
        let name = o
            .get("name")
            .and_then(Value::as_str)
            .ok_or("an output without a name")?;
        let datatype = o
            .get("datatype")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let shape = o
            .get("shape")
            .and_then(Value::as_array)
            .ok_or_else(|| format!("output {name:?} has no shape"))?
            .iter()
            .map(|d| {
                d.as_i64()
                    .ok_or_else(|| format!("output {name:?}: shape {d}"))
            })
            .collect::<Result<Vec<i64>, String>>()?;
        let mut params = o
            .get("parameters")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        let size = params.remove("binary_data_size");
        params.remove("binary_data");
        let data = match size {
            Some(n) => {
                let n = n
                    .as_u64()
                    .ok_or_else(|| format!("output {name:?}: binary_data_size {n}"))?
                    as usize;
                let (mine, rest) = binary.split_at_checked(n).ok_or_else(|| {
                    format!("output {name:?} says {n} bytes; {} are left", binary.len())
                })?;
                binary = rest;
                mine.to_vec()
            }
            None => {
                let data = o
                    .get("data")
                    .ok_or_else(|| format!("output {name:?} has no data"))?;
                json_to_raw(name, datatype, data)?
            }
        };
        resp.outputs.push(InferOutputTensor {
            name: name.to_string(),
            datatype: datatype.to_string(),
            shape,
            parameters: parameters_grpc(&params),
            contents: None,
        });
        resp.raw_output_contents.push(data.into());
    }
    if !binary.is_empty() {
        return Err(format!(
            "{} bytes of the reply belong to no output",
            binary.len()
        ));
    }
    Ok(resp)
}

/// A REST error reply as a gRPC status: the code for its HTTP status, the message
/// from its `{"error": ...}` body (else the body's text).
pub fn rest_error(status: u16, body: &[u8]) -> (Code, String) {
    let message = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("error")?.as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    (Code::for_status(status), message)
}

/// REST model metadata (`GET /v2/models/{m}`) as its gRPC message.
pub fn model_metadata(v: &Value) -> ModelMetadataResponse {
    let text = |v: &Value, k: &str| {
        v.get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let tensors = |k: &str| {
        v.get(k)
            .and_then(Value::as_array)
            .map(|ts| {
                ts.iter()
                    .map(|t| TensorMetadata {
                        name: text(t, "name"),
                        datatype: text(t, "datatype"),
                        shape: t
                            .get("shape")
                            .and_then(Value::as_array)
                            .map(|s| s.iter().filter_map(Value::as_i64).collect())
                            .unwrap_or_default(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    ModelMetadataResponse {
        name: text(v, "name"),
        versions: v
            .get("versions")
            .and_then(Value::as_array)
            .map(|vs| {
                vs.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default(),
        platform: text(v, "platform"),
        inputs: tensors("inputs"),
        outputs: tensors("outputs"),
    }
}

fn parameters_json(p: &BTreeMap<String, InferParameter>) -> Map<String, Value> {
    p.iter()
        .filter_map(|(k, v)| {
            let v = match v.parameter_choice.as_ref()? {
                ParameterChoice::BoolParam(b) => json!(b),
                ParameterChoice::Int64Param(n) => json!(n),
                ParameterChoice::StringParam(s) => json!(s),
                ParameterChoice::DoubleParam(d) => json!(d),
                ParameterChoice::Uint64Param(n) => json!(n),
            };
            Some((k.clone(), v))
        })
        .collect()
}

/// JSON parameters as gRPC's: what has no gRPC form (arrays, objects, null) is left out.
fn parameters_grpc(p: &Map<String, Value>) -> BTreeMap<String, InferParameter> {
    p.iter()
        .filter_map(|(k, v)| {
            let choice = match v {
                Value::Bool(b) => ParameterChoice::BoolParam(*b),
                Value::String(s) => ParameterChoice::StringParam(s.clone()),
                Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
                    (Some(i), _, _) => ParameterChoice::Int64Param(i),
                    (None, Some(u), _) => ParameterChoice::Uint64Param(u),
                    (None, None, Some(f)) => ParameterChoice::DoubleParam(f),
                    _ => return None,
                },
                _ => return None,
            };
            Some((
                k.clone(),
                InferParameter {
                    parameter_choice: Some(choice),
                },
            ))
        })
        .collect()
}

/// Typed contents as the raw bytes the binary extension carries.
fn contents_to_raw(
    name: &str,
    datatype: &str,
    c: &InferTensorContents,
    out: &mut Vec<u8>,
) -> Result<(), String> {
    // The element width of the narrow integer types, written from 32-bit contents.
    let width = Dtype::parse(datatype).and_then(Dtype::size).unwrap_or(4);
    match datatype {
        "BOOL" => out.extend(c.bool_contents.iter().map(|&b| u8::from(b))),
        "INT8" | "INT16" | "INT32" => {
            for &v in &c.int_contents {
                out.extend_from_slice(&v.to_le_bytes()[..width]);
            }
        }
        "INT64" => c
            .int64_contents
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        "UINT8" | "UINT16" | "UINT32" => {
            for &v in &c.uint_contents {
                out.extend_from_slice(&v.to_le_bytes()[..width]);
            }
        }
        "UINT64" => c
            .uint64_contents
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        "FP32" => c
            .fp32_contents
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        "FP64" => c
            .fp64_contents
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        "BYTES" => {
            for b in &c.bytes_contents {
                out.extend_from_slice(&(b.len() as u32).to_le_bytes());
                out.extend_from_slice(b);
            }
        }
        other => {
            return Err(format!(
                "input {name:?}: datatype {other:?} has no typed contents; send it in raw_input_contents"
            ));
        }
    }
    Ok(())
}

/// JSON `data` (flat or nested) as raw little-endian bytes of `datatype`, element by
/// element as the batcher's codec converts them.
fn json_to_raw(name: &str, datatype: &str, data: &Value) -> Result<Vec<u8>, String> {
    let dt = Dtype::parse(datatype)
        .ok_or_else(|| format!("output {name:?}: unknown datatype {datatype:?}"))?;
    let text = data.to_string();
    let mut out = Vec::new();
    tensor::leaves(text.as_bytes(), |_, token| {
        tensor::text_to_raw(dt, token, &mut out)
    })
    .map_err(|e| format!("output {name:?}: {e}"))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::pb::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
    use super::*;

    fn param(n: i64) -> InferParameter {
        InferParameter {
            parameter_choice: Some(ParameterChoice::Int64Param(n)),
        }
    }

    #[test]
    fn raw_and_typed_contents_become_the_same_binary_request() {
        let text = |raw: bool| ModelInferRequest {
            model_name: "m".into(),
            id: "r1".into(),
            parameters: [("priority".to_string(), param(1))].into(),
            inputs: vec![InferInputTensor {
                name: "text".into(),
                datatype: "BYTES".into(),
                shape: vec![2],
                contents: (!raw).then(|| InferTensorContents {
                    bytes_contents: vec![b"ab".to_vec().into(), b"c".to_vec().into()],
                    ..Default::default()
                }),
                ..Default::default()
            }],
            outputs: vec![InferRequestedOutputTensor {
                name: "embedding".into(),
                ..Default::default()
            }],
            raw_input_contents: if raw {
                vec![b"\x02\0\0\0ab\x01\0\0\0c".to_vec().into()]
            } else {
                vec![]
            },
            ..Default::default()
        };
        let (body, header_len) = rest_request(&text(true)).unwrap();
        assert_eq!(
            rest_request(&text(false)).unwrap(),
            (body.clone(), header_len)
        );
        let header: Value = serde_json::from_slice(&body[..header_len]).unwrap();
        assert_eq!(
            header,
            json!({"id": "r1", "parameters": {"priority": 1, "binary_data_output": true},
                "inputs": [{"name": "text", "datatype": "BYTES", "shape": [2],
                    "parameters": {"binary_data_size": 11}}],
                "outputs": [{"name": "embedding", "parameters": {"binary_data": true}}]})
        );
        assert_eq!(&body[header_len..], b"\x02\0\0\0ab\x01\0\0\0c");
    }

    #[test]
    fn typed_integers_take_their_datatype_s_width() {
        let mut out = Vec::new();
        let c = InferTensorContents {
            int_contents: vec![-1, 2],
            ..Default::default()
        };
        contents_to_raw("x", "INT16", &c, &mut out).unwrap();
        assert_eq!(out, [0xff, 0xff, 2, 0]);
        let err = contents_to_raw("x", "FP16", &c, &mut Vec::new()).unwrap_err();
        assert!(err.contains("raw_input_contents"), "{err}");
    }

    #[test]
    fn inconsistent_requests_are_refused() {
        let mut req = ModelInferRequest {
            inputs: vec![InferInputTensor {
                name: "a".into(),
                datatype: "FP32".into(),
                shape: vec![1],
                ..Default::default()
            }],
            ..Default::default()
        };
        assert!(rest_request(&req).unwrap_err().contains("no data"));
        req.raw_input_contents = vec![vec![0; 4].into(), vec![0; 4].into()];
        assert!(rest_request(&req).unwrap_err().contains("one per input"));
    }

    #[test]
    fn binary_and_json_replies_become_raw_outputs() {
        let header = json!({"model_name": "m", "id": "r1", "parameters": {"k": "v"},
            "outputs": [
                {"name": "a", "datatype": "FP32", "shape": [1, 2],
                 "parameters": {"binary_data_size": 8}},
                {"name": "b", "datatype": "INT16", "shape": [2], "data": [[1], [-2]]},
                {"name": "c", "datatype": "BYTES", "shape": [1], "data": ["hi"]}]})
        .to_string();
        let mut body = header.clone().into_bytes();
        body.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        let r = grpc_response(&body, Some(header.len())).unwrap();
        assert_eq!((r.model_name.as_str(), r.id.as_str()), ("m", "r1"));
        assert_eq!(r.outputs.len(), 3);
        assert!(
            r.outputs[0].parameters.is_empty(),
            "binary flags are REST's"
        );
        assert_eq!(r.outputs[0].shape, [1, 2]);
        assert_eq!(&r.raw_output_contents[0][..], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&r.raw_output_contents[1][..], &[1, 0, 0xfe, 0xff]);
        assert_eq!(&r.raw_output_contents[2][..], b"\x02\0\0\0hi");
        assert_eq!(
            r.parameters["k"].parameter_choice,
            Some(ParameterChoice::StringParam("v".into()))
        );
        // Sizes that do not add up are refused.
        assert!(grpc_response(&body[..body.len() - 1], Some(header.len())).is_err());
        let mut extra = body.clone();
        extra.push(0);
        assert!(
            grpc_response(&extra, Some(header.len()))
                .unwrap_err()
                .contains("no output")
        );
    }

    #[test]
    fn rest_errors_keep_their_message() {
        let (code, msg) = rest_error(400, br#"{"error": "bad input"}"#);
        assert_eq!((code, msg.as_str()), (Code::InvalidArgument, "bad input"));
        assert_eq!(rest_error(503, b"down").0, Code::Unavailable);
    }
}
