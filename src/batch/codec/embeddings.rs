//! OpenAI's `POST /v1/embeddings` (as the `openai` SDK, TEI and vLLM speak it): each
//! call's `input` (a string or a list of strings) kept as its JSON texts, calls asking
//! for the same model, `encoding_format` and `dimensions` merged into one `input` list,
//! and the reply's `data` split back, each caller getting exactly its own embeddings
//! with its own `index` values (0, 1, ... as if it had called alone) and its own
//! `usage`.
//!
//! `usage` per caller: when every embedding carries its input's `tokens` (braid's
//! executor gives them), the sum of its own; otherwise the batch's `prompt_tokens`
//! shared by the caller's count of inputs (exact for one caller, an estimate for more).

use serde_json::value::RawValue;

use super::{Fields, Form, Item, Payload, SplitError, Unqueued, bad, join_into, request_object};
use crate::batch::tensor::write_json;

/// What an embeddings call holds: its inputs' JSON texts, separated by commas, and
/// the options every call of its batch shares.
#[derive(Debug, Clone)]
pub struct Request {
    inputs: Vec<u8>,
    model: String,
    encoding_format: Option<String>,
    dimensions: Option<u64>,
}

fn request(item: &Item) -> &Request {
    match &item.form {
        Form::Embeddings(r) => r,
        _ => unreachable!("an embeddings batch holds embeddings calls only: it is in the key"),
    }
}

/// Parses a call for `model` (the name the executor serves it under). A call with
/// token arrays for input, or a field braid does not know, is sent alone as it came.
pub fn parse_embeddings(body: &[u8], model: &str) -> Result<Item, Unqueued> {
    let obj = request_object(body)?;
    for (k, _) in &obj.0 {
        if !matches!(
            k.as_str(),
            "model" | "input" | "encoding_format" | "dimensions" | "user"
        ) {
            return Err(Unqueued::Alone);
        }
    }
    let Some(input) = obj.get("input") else {
        return bad("the body names no \"input\"");
    };
    let texts: Vec<&RawValue> = match input.get().trim_start().as_bytes().first() {
        Some(b'"') => vec![input],
        Some(b'[') => {
            let list: Vec<&RawValue> = serde_json::from_str(input.get())
                .map_err(|e| Unqueued::Bad(format!("\"input\" is not a list: {e}")))?;
            // Token arrays (lists of numbers, or of lists) are the server's to read.
            if list.iter().any(|t| !t.get().starts_with('"')) {
                return Err(Unqueued::Alone);
            }
            list
        }
        _ => return Err(Unqueued::Alone),
    };
    if texts.is_empty() {
        return bad("\"input\" is empty");
    }
    let encoding_format: Option<String> = match obj.get("encoding_format") {
        None => None,
        Some(_) => Some(
            obj.read("encoding_format")
                .ok_or_else(|| Unqueued::Bad("\"encoding_format\" must be a string".into()))?,
        ),
    };
    let dimensions: Option<u64> = match obj.get("dimensions") {
        None => None,
        Some(_) => Some(
            obj.read("dimensions")
                .ok_or_else(|| Unqueued::Bad("\"dimensions\" must be a positive integer".into()))?,
        ),
    };
    let key = format!(
        "openai-embeddings|{model}|{}|{}",
        encoding_format.as_deref().unwrap_or(""),
        dimensions.map_or(String::new(), |d| d.to_string())
    );
    let mut inputs = Vec::new();
    join_into(&mut inputs, texts.iter().map(|t| t.get().as_bytes()));
    Ok(Item {
        key,
        rows: texts.len(),
        id: None,
        priority: None,
        form: Form::Embeddings(Request {
            inputs,
            model: model.to_string(),
            encoding_format,
            dimensions,
        }),
    })
}

/// One call with every caller's inputs, in order.
pub(super) fn merge(items: &[&Item]) -> Payload {
    let first = request(items[0]);
    let mut body = b"{\"model\":".to_vec();
    write_json(&mut body, &first.model);
    body.extend_from_slice(b",\"input\":[");
    join_into(&mut body, items.iter().map(|i| &request(i).inputs[..]));
    body.push(b']');
    if let Some(f) = &first.encoding_format {
        body.extend_from_slice(b",\"encoding_format\":");
        write_json(&mut body, f);
    }
    if let Some(d) = first.dimensions {
        body.extend_from_slice(b",\"dimensions\":");
        write_json(&mut body, &d);
    }
    body.push(b'}');
    Payload::json(body)
}

/// Each caller's share of the reply: its embeddings, re-indexed from 0, and its usage.
pub(super) fn split(items: &[&Item], reply: &Payload) -> Result<Vec<Payload>, SplitError> {
    let total: usize = items.iter().map(|i| i.rows).sum();
    let top: Fields = serde_json::from_slice(&reply.body)
        .map_err(|e| SplitError(format!("backend reply is not a JSON object: {e}")))?;
    let data: Vec<Fields> = top
        .read("data")
        .ok_or_else(|| SplitError("backend reply has no \"data\" list of objects".into()))?;
    if data.len() != total {
        return Err(SplitError(format!(
            "backend returned {} embeddings for {total} inputs",
            data.len()
        )));
    }
    // Placed by their `index`: each of 0..total exactly once.
    let mut by_index: Vec<Option<&Fields>> = vec![None; total];
    for d in &data {
        let i: usize = d
            .read("index")
            .filter(|&i: &usize| i < total)
            .ok_or_else(|| {
                SplitError("an embedding's \"index\" is missing or out of range".into())
            })?;
        if by_index[i].replace(d).is_some() {
            return Err(SplitError(format!("two embeddings have index {i}")));
        }
    }
    let tokens: Option<Vec<u64>> = by_index
        .iter()
        .map(|d| d.and_then(|d| d.read::<u64>("tokens")))
        .collect();
    let batch_tokens: Option<u64> = top
        .get("usage")
        .and_then(|u| serde_json::from_str::<Fields>(u.get()).ok())
        .and_then(|u| u.read("prompt_tokens"));
    let model = top.get("model").map(|m| m.get());
    let mut start = 0;
    let mut shared = 0;
    let mut out = Vec::with_capacity(items.len());
    for (n, item) in items.iter().enumerate() {
        let rows = start..start + item.rows;
        let mut body = b"{\"object\":\"list\",\"data\":[".to_vec();
        for (k, i) in rows.clone().enumerate() {
            if k > 0 {
                body.push(b',');
            }
            let d = by_index[i].expect("every index was placed");
            write_datum(&mut body, d, k);
        }
        body.push(b']');
        if let Some(m) = model {
            body.extend_from_slice(b",\"model\":");
            body.extend_from_slice(m.as_bytes());
        }
        let used = match (&tokens, batch_tokens) {
            (Some(t), _) => Some(t[rows.clone()].iter().sum::<u64>()),
            (None, Some(all)) if n + 1 == items.len() => Some(all - shared),
            (None, Some(all)) => Some(all * item.rows as u64 / total as u64),
            (None, None) => None,
        };
        if let Some(u) = used {
            shared += u;
            body.extend_from_slice(b",\"usage\":{\"prompt_tokens\":");
            write_json(&mut body, &u);
            body.extend_from_slice(b",\"total_tokens\":");
            write_json(&mut body, &u);
            body.push(b'}');
        }
        body.push(b'}');
        out.push(Payload::json(body));
        start = rows.end;
    }
    Ok(out)
}

/// One embedding as the backend sent it, with `index` set to `k`.
fn write_datum(out: &mut Vec<u8>, d: &Fields, k: usize) {
    out.push(b'{');
    let mut first = true;
    for (name, value) in &d.0 {
        if !std::mem::take(&mut first) {
            out.push(b',');
        }
        write_json(out, name);
        out.push(b':');
        if name == "index" {
            write_json(out, &k);
        } else {
            out.extend_from_slice(value.get().as_bytes());
        }
    }
    out.push(b'}');
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::batch::codec::{merge, split_payload};

    fn item(body: Value) -> Item {
        parse_embeddings(body.to_string().as_bytes(), "minilm").unwrap()
    }

    /// A server that embeds each input as [its length], in a shuffled order, with or
    /// without per-input tokens.
    fn reply(merged: &[u8], tokens: bool) -> Payload {
        let m: Value = serde_json::from_slice(merged).unwrap();
        let inputs = m["input"].as_array().unwrap();
        let mut data: Vec<Value> = inputs
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let n = t.as_str().unwrap().len();
                let mut d =
                    json!({"object": "embedding", "index": i, "embedding": [n as f64 + 0.5]});
                if tokens {
                    d["tokens"] = json!(n + 2);
                }
                d
            })
            .collect();
        data.reverse();
        let total: usize = inputs.iter().map(|t| t.as_str().unwrap().len() + 2).sum();
        Payload::json(
            json!({"object": "list", "data": data, "model": m["model"], "usage": {"prompt_tokens": total, "total_tokens": total}})
                .to_string(),
        )
    }

    #[test]
    fn each_caller_gets_its_own_embeddings_indices_and_usage() {
        let a = item(json!({"model": "e", "input": ["a", "bbb"], "encoding_format": "float"}));
        let b = item(json!({"input": "cc", "model": "e", "encoding_format": "float", "user": "u"}));
        assert_eq!(a.key, b.key);
        let items = [&a, &b];
        let merged = merge(&items, None);
        let m: Value = serde_json::from_slice(&merged.body).unwrap();
        assert_eq!(
            m,
            json!({"model": "minilm", "input": ["a", "bbb", "cc"], "encoding_format": "float"})
        );
        for tokens in [true, false] {
            let parts = split_payload(&items, &reply(&merged.body, tokens), None).unwrap();
            let a: Value = serde_json::from_slice(&parts[0].body).unwrap();
            let b: Value = serde_json::from_slice(&parts[1].body).unwrap();
            assert_eq!(a["data"][0]["index"], 0);
            assert_eq!(a["data"][0]["object"], "embedding");
            assert_eq!(a["data"][0]["embedding"], json!([1.5]));
            if tokens {
                assert_eq!(a["data"][0]["tokens"], 3);
            }
            assert_eq!(a["data"][1]["embedding"], json!([3.5]));
            assert_eq!(a["data"][1]["index"], 1);
            assert_eq!(b["data"].as_array().unwrap().len(), 1);
            assert_eq!(
                (
                    b["data"][0]["index"].clone(),
                    b["data"][0]["embedding"].clone()
                ),
                (json!(0), json!([2.5]))
            );
            assert_eq!(a["model"], "minilm");
            // Exact with per-input tokens (3 + 5, and 4); shared by count without.
            let (ua, ub) = (&a["usage"]["prompt_tokens"], &b["usage"]["prompt_tokens"]);
            if tokens {
                assert_eq!((ua, ub), (&json!(8), &json!(4)));
            } else {
                assert_eq!(ua.as_u64().unwrap() + ub.as_u64().unwrap(), 12);
            }
        }
    }

    #[test]
    fn what_cannot_merge_is_kept_apart_or_sent_alone() {
        let key = |v: Value| item(v).key;
        let base = json!({"model": "e", "input": "x"});
        assert_ne!(
            key(base.clone()),
            key(json!({"model": "e", "input": "x", "encoding_format": "base64"}))
        );
        assert_ne!(
            key(base.clone()),
            key(json!({"model": "e", "input": "x", "dimensions": 64}))
        );
        let parse = |v: Value| parse_embeddings(v.to_string().as_bytes(), "m");
        assert_eq!(
            parse(json!({"model": "e", "input": [[1, 2, 3]]})).unwrap_err(),
            Unqueued::Alone
        );
        assert_eq!(
            parse(json!({"model": "e", "input": "x", "extra": 1})).unwrap_err(),
            Unqueued::Alone
        );
        assert!(matches!(
            parse(json!({"model": "e", "input": []})),
            Err(Unqueued::Bad(_))
        ));
        assert!(matches!(
            parse(json!({"model": "e"})),
            Err(Unqueued::Bad(_))
        ));
    }

    #[test]
    fn a_reply_that_does_not_answer_every_input_once_is_refused() {
        let a = item(json!({"model": "e", "input": ["a", "b"]}));
        let items = [&a];
        let bad = |data: Value| {
            let r = Payload::json(json!({"data": data}).to_string());
            split_payload(&items, &r, None).is_err()
        };
        assert!(bad(json!([{"index": 0, "embedding": [1]}])));
        assert!(bad(
            json!([{"index": 0, "embedding": [1]}, {"index": 0, "embedding": [2]}])
        ));
        assert!(bad(
            json!([{"index": 0, "embedding": [1]}, {"index": 5, "embedding": [2]}])
        ));
        assert!(!bad(
            json!([{"index": 1, "embedding": [1]}, {"index": 0, "embedding": [2]}])
        ));
    }
}
