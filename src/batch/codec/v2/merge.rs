//! Items' rows merged into one batch body, written directly (with the row-id input when
//! the route asks for one).

use super::*;

/// Writes `[rows, inner...]`.
pub(super) fn write_shape(out: &mut Vec<u8>, rows: usize, inner: &[i64]) {
    write_json(out, &rows);
    for d in inner {
        out.push(b',');
        write_json(out, d);
    }
}

/// Writes `"key":` (after a comma unless `first`).
pub(super) fn write_key(out: &mut Vec<u8>, first: &mut bool, key: &str) {
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
pub(crate) fn merge(items: &[&Item], row_ids: Option<RowIds>) -> Payload {
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
