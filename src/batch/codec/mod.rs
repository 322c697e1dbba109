//! Merging requests that wait in a batch into one executor call and splitting its
//! reply, behind one interface the batcher uses without naming a protocol: an `Item`
//! (its key, rows, id, priority), `merge` and `split_payload`. Each protocol's codec is
//! a file of its own: `v2` (Open Inference Protocol v2, Triton's binary tensors
//! included), `v1` (KServe v1 `instances`/`predictions`) and `embeddings` (OpenAI's
//! `/v1/embeddings`).
//!
//! The rule that matters, in every codec: a client never receives another client's
//! rows. A reply that does not answer exactly the batch's rows (or is not JSON, or has
//! data that does not fill its shape) is refused whole; no request gets any data.

mod embeddings;
mod v1;
mod v2;

use std::fmt;

use bytes::Bytes;
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

pub use embeddings::parse_embeddings;
pub use v1::parse_v1;
pub use v2::{PathModel, parse_v2, parse_v2_with};

/// A request that can wait in a batch queue, in whichever protocol it came.
///
/// Parsed once: its data is kept as the text or bytes it arrived in and written into
/// the merged body as it is. No JSON tree of the data is built, here or when the reply
/// is split.
#[derive(Debug, Clone)]
pub struct Item {
    /// Requests merge only with others of the same key, which begins with the
    /// protocol: same inputs, parameters and requested outputs (whatever form each is
    /// sent or asked for in: JSON and binary requests share batches).
    pub key: String,
    /// Rows along dim 0 (instances, inputs).
    pub rows: usize,
    /// The request's `id` as sent, restored on its share of the reply.
    pub id: Option<Box<RawValue>>,
    /// Triton's `parameters.priority` (1 is the highest; 0 or absent: the default).
    /// Used by braid to pick a priority class, not sent on (a batch has one).
    pub priority: Option<u64>,
    /// What the protocol's codec needs of it.
    form: Form,
}

/// Each protocol's own part of an item.
#[derive(Debug, Clone)]
enum Form {
    V2(v2::Request),
    V1(v1::Request),
    Embeddings(embeddings::Request),
}

impl Item {
    /// Whether the request has an input of this name (v2 tensors only).
    pub fn has_input(&self, name: &str) -> bool {
        match &self.form {
            Form::V2(r) => r.has_input(name),
            Form::V1(_) | Form::Embeddings(_) => false,
        }
    }

    /// Whether a batch of this item can carry row ids (`batching.row_id`): v2 only.
    pub fn takes_row_ids(&self) -> bool {
        matches!(self.form, Form::V2(_))
    }
}

/// The body of one request carrying every item's rows, in order, in their protocol.
/// All items share a key (and so a protocol). With `row_ids`, a v2 batch also carries
/// the row-id input (and asks for it back).
pub fn merge(items: &[&Item], row_ids: Option<RowIds>) -> Payload {
    match &items[0].form {
        Form::V2(_) => v2::merge(items, row_ids),
        Form::V1(_) => v1::merge(items),
        Form::Embeddings(_) => embeddings::merge(items),
    }
}

/// Splits a batch reply into one body per item, in order, or refuses it whole.
pub fn split_payload(
    items: &[&Item],
    reply: &Payload,
    row_ids: Option<RowIds>,
) -> Result<Vec<Payload>, SplitError> {
    match &items[0].form {
        Form::V2(_) => v2::split_payload(items, reply, row_ids),
        Form::V1(_) => v1::split(items, reply),
        Form::Embeddings(_) => embeddings::split(items, reply),
    }
}

/// A body to or from the executor, and the length of its JSON header when binary
/// tensor data follows it (`Inference-Header-Content-Length`).
#[derive(Debug, Clone, PartialEq)]
pub struct Payload {
    pub body: Bytes,
    pub header_len: Option<usize>,
}

impl Payload {
    pub fn json(body: impl Into<Bytes>) -> Payload {
        Payload {
            body: body.into(),
            header_len: None,
        }
    }
}

/// Why a request was not queued.
#[derive(Debug, PartialEq)]
pub enum Unqueued {
    /// Malformed: answer 400 with this message.
    Bad(String),
    /// Well-formed but not mergeable (e.g. shared-memory tensors): forward it alone,
    /// unchanged.
    Alone,
}

/// The reply could not be split safely: every request of the batch gets 502.
#[derive(Debug, PartialEq)]
pub struct SplitError(pub String);

/// The row-id tensor a batch carries: its name and the first id; rows are numbered
/// `first, first + 1, ...` in merge order.
#[derive(Debug, Clone, Copy)]
pub struct RowIds<'a> {
    pub name: &'a str,
    pub first: i64,
}

impl RowIds<'_> {
    /// Ids for `rows` rows that no earlier batch of this process used (kept below
    /// 2^53 so every JSON reader holds them exactly).
    pub fn fresh_first(rows: usize) -> i64 {
        use std::sync::atomic::{AtomicI64, Ordering};
        static NEXT: AtomicI64 = AtomicI64::new(0);
        let seed = || {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| (d.as_nanos() as i64) & ((1 << 40) - 1))
        };
        let _ = NEXT.compare_exchange(0, seed().max(1), Ordering::Relaxed, Ordering::Relaxed);
        let first = NEXT.fetch_add(rows as i64, Ordering::Relaxed);
        first % (1 << 52)
    }
}

fn bad<T>(m: impl Into<String>) -> Result<T, Unqueued> {
    Err(Unqueued::Bad(m.into()))
}

/// A JSON object's fields in the order sent, each value left as its text.
struct Fields<'a>(Vec<(String, &'a RawValue)>);

impl<'de> Deserialize<'de> for Fields<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Object;
        impl<'de> Visitor<'de> for Object {
            type Value = Fields<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields<'de>, A::Error> {
                let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(4));
                while let Some(key) = map.next_key::<String>()? {
                    fields.push((key, map.next_value::<&'de RawValue>()?));
                }
                Ok(Fields(fields))
            }
        }
        d.deserialize_map(Object)
    }
}

impl<'a> Fields<'a> {
    /// The value of `key` (the last, if sent twice, as a JSON tree would keep).
    fn get(&self, key: &str) -> Option<&'a RawValue> {
        self.0.iter().rev().find(|(k, _)| k == key).map(|(_, v)| *v)
    }

    /// The value of `key` read as `T`; `None` if absent or not a `T`.
    fn read<T: Deserialize<'a>>(&self, key: &str) -> Option<T> {
        serde_json::from_str(self.get(key)?.get()).ok()
    }
}

/// Reads a request's JSON object.
fn request_object(text: &[u8]) -> Result<Fields<'_>, Unqueued> {
    serde_json::from_slice(text).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => Unqueued::Bad("request must be a JSON object".into()),
        _ => Unqueued::Bad(format!("request is not valid JSON: {e}")),
    })
}

/// Texts joined by commas, leaving out empty ones.
fn join<'a>(texts: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    join_into(&mut out, texts);
    out
}

fn join_into<'a>(out: &mut Vec<u8>, texts: impl IntoIterator<Item = &'a [u8]>) {
    let mut first = true;
    for t in texts.into_iter().filter(|t| !t.is_empty()) {
        if !std::mem::take(&mut first) {
            out.push(b',');
        }
        out.extend_from_slice(t);
    }
}

/// A JSON reply body's split, for callers without binary data.
pub fn split(
    items: &[&Item],
    reply: &[u8],
    row_ids: Option<RowIds>,
) -> Result<Vec<Vec<u8>>, SplitError> {
    let reply = Payload::json(Bytes::copy_from_slice(reply));
    Ok(split_payload(items, &reply, row_ids)?
        .into_iter()
        .map(|p| p.body.to_vec())
        .collect())
}
