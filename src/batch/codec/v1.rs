//! KServe v1 (`/v1/models/{m}:predict`): each request's `instances` kept as their JSON
//! texts, concatenated into one `instances` list, and the reply's `predictions` split
//! back by count.

use serde_json::value::RawValue;

use super::{
    Fields, Form, Item, Payload, SplitError, Unqueued, bad, join, join_into, request_object,
};

/// What a v1 request holds: its instances' JSON texts, separated by commas.
#[derive(Debug, Clone)]
pub struct Request {
    instances: Vec<u8>,
}

fn v1(item: &Item) -> &Request {
    match &item.form {
        Form::V1(r) => r,
        _ => unreachable!("a v1 batch holds v1 requests only: the protocol is in the key"),
    }
}

/// Parses a KServe v1 `{"instances": [...]}` body.
pub fn parse_v1(body: &[u8]) -> Result<Item, Unqueued> {
    let obj = request_object(body)?;
    if obj.0.iter().any(|(k, _)| k != "instances") {
        return Err(Unqueued::Alone);
    }
    let Some(list) = obj.read::<Vec<&RawValue>>("instances") else {
        return bad("request needs an \"instances\" list");
    };
    if list.is_empty() {
        return bad("empty batch: \"instances\" is empty");
    }
    Ok(Item {
        key: "v1".into(),
        rows: list.len(),
        id: None,
        priority: None,
        form: Form::V1(Request {
            instances: join(list.iter().map(|i| i.get().as_bytes())),
        }),
    })
}

/// One `instances` list of every item's, in order.
pub(super) fn merge(items: &[&Item]) -> Payload {
    let mut body = b"{\"instances\":[".to_vec();
    join_into(&mut body, items.iter().map(|i| &v1(i).instances[..]));
    body.extend_from_slice(b"]}");
    Payload::json(body)
}

/// Each item's share of the reply's `predictions`, by count.
pub(super) fn split(items: &[&Item], reply: &Payload) -> Result<Vec<Payload>, SplitError> {
    let total: usize = items.iter().map(|i| i.rows).sum();
    let head = &reply.body[..];
    let top: Fields = serde_json::from_slice(head)
        .map_err(|e| SplitError(format!("backend reply is not JSON: {e}")))?;
    let preds: Vec<&RawValue> = top
        .read("predictions")
        .ok_or_else(|| SplitError("backend reply has no \"predictions\" list".into()))?;
    if preds.len() != total {
        return Err(SplitError(format!(
            "backend returned {} predictions for {total} instances",
            preds.len()
        )));
    }
    let mut start = 0;
    Ok(items
        .iter()
        .map(|i| {
            let mut body = b"{\"predictions\":[".to_vec();
            join_into(
                &mut body,
                preds[start..start + i.rows]
                    .iter()
                    .map(|p| p.get().as_bytes()),
            );
            body.extend_from_slice(b"]}");
            start += i.rows;
            Payload::json(body)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use crate::batch::codec::{merge, parse_v1, split};

    #[test]
    fn kserve_v1_instances_concatenate_and_predictions_split() {
        let a = parse_v1(br#"{"instances":["a1","a2"]}"#).unwrap();
        let b = parse_v1(br#"{"instances":["b1"]}"#).unwrap();
        let items = [&a, &b];
        let merged: Value = serde_json::from_slice(&merge(&items, None).body).unwrap();
        assert_eq!(merged["instances"], json!(["a1", "a2", "b1"]));
        let bodies = split(&items, br#"{"predictions":[1,2,3]}"#, None).unwrap();
        assert_eq!(
            serde_json::from_slice::<Value>(&bodies[1]).unwrap()["predictions"],
            json!([3])
        );
        assert!(split(&items, br#"{"predictions":[1,2]}"#, None).is_err());
    }
}
