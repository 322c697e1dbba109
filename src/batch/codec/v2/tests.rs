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
    let short =
        json!({"outputs": [{"name": "echo", "datatype": "BYTES", "shape": [1], "data": ["a1!"]}]});
    assert!(split(&items, short.to_string().as_bytes(), None).is_err());
    let lying =
        json!({"outputs": [{"name": "echo", "datatype": "BYTES", "shape": [2], "data": ["a1!"]}]});
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
    let reply = br#"{"model_name":"m\"q","outputs":[{"name":"y","datatype":"INT64","shape":[3,2],
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
    let other_shape = parse_v2(
        json!({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1, 1], "data": ["x"]}]})
            .to_string()
            .as_bytes(),
    )
    .unwrap();
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
        let mut v =
            json!({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["x"]}]});
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
