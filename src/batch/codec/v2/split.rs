//! A batch reply split by row: each client gets every output in the form it asked
//! for, and a reply that does not add up (or moved rows) is refused whole.

use super::*;

/// One output of a batch reply: its other fields as sent, inner shape, elements per
/// row, and where each element's data is.
struct ReplyOutput<'a> {
    fields: Vec<(&'a str, &'a RawValue)>,
    /// `parameters` without `binary_data_size`.
    parameters: Map<String, Value>,
    name: String,
    dt: Option<Dtype>,
    /// The whole shape; the inner shape is all but its first.
    shape: Vec<i64>,
    per_row: usize,
    /// Elements for all the rows (`None`: more than a `usize` holds).
    elements: Option<usize>,
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
pub(crate) fn split_payload(
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
        let out = reply_output(o, total, &mut raw)?;
        if row_ids.is_some_and(|ids| ids.name == out.name) {
            echoed_ids.push(out.row_ids());
            continue;
        }
        out.check_rows(total)?;
        parsed.push(out);
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
        let room = 64 + head.len() / items.len();
        bodies.push(item_body(item, &top, &parsed, start, room)?);
        start += item.rows;
    }
    Ok(bodies)
}

/// One output of the reply read: its shape, its parameters, where its data is (its
/// binary part taken from the front of `raw`).
fn reply_output<'r>(
    o: &'r Fields<'r>,
    total: usize,
    raw: &mut &'r [u8],
) -> Result<ReplyOutput<'r>, SplitError> {
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
            *raw = &raw[size as usize..];
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
    Ok(ReplyOutput {
        fields: o
            .0
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "shape" | "data" | "parameters"))
            .map(|(k, v)| (k.as_str(), *v))
            .collect(),
        parameters,
        name,
        dt,
        shape,
        per_row,
        elements,
        data,
    })
}

impl ReplyOutput<'_> {
    /// The row ids this output echoes, where it is the row-id tensor (INT64).
    fn row_ids(&self) -> Option<Vec<i64>> {
        match &self.data {
            ReplyData::Json { text, spans, .. } => spans
                .iter()
                .map(|&(s, e)| std::str::from_utf8(&text[s..e]).ok()?.parse::<i64>().ok())
                .collect(),
            ReplyData::Raw { bytes, .. } if self.dt == Some(Dtype::I64) => Some(
                bytes
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect(),
            ),
            ReplyData::Raw { .. } => None,
        }
    }

    /// A row per request row, and as many elements as its shape says.
    fn check_rows(&self, total: usize) -> Result<(), SplitError> {
        let (name, shape) = (&self.name, &self.shape);
        if shape.first().copied() != Some(total as i64) {
            return Err(SplitError(format!(
                "output {name:?} has shape {shape:?}, expected {total} rows"
            )));
        }
        if let ReplyData::Json { spans, .. } = &self.data
            && Some(spans.len()) != self.elements
        {
            return Err(SplitError(format!(
                "output {name:?} has {} elements for shape {shape:?}",
                spans.len()
            )));
        }
        Ok(())
    }
}

/// One item's body: the reply's other fields, the item's id, and each output's rows
/// from `start`, in the form the item asked for.
fn item_body(
    item: &Item,
    top: &Fields<'_>,
    parsed: &[ReplyOutput<'_>],
    start: usize,
    room: usize,
) -> Result<Payload, SplitError> {
    let mut binary = Vec::new();
    let mut body = Vec::with_capacity(room);
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
        if n > 0 {
            body.push(b',');
        }
        any_binary |= write_output(item, o, start, &mut body, &mut binary)?;
    }
    body.extend_from_slice(b"]}");
    if !any_binary {
        return Ok(Payload::json(body));
    }
    let header_len = body.len();
    body.extend_from_slice(&binary);
    Ok(Payload {
        body: body.into(),
        header_len: Some(header_len),
    })
}

/// Writes output `o`'s rows of `item` (from `start`) into `body`, as JSON or, where
/// the item asked for it, as binary appended to `binary`; true when binary.
fn write_output(
    item: &Item,
    o: &ReplyOutput<'_>,
    start: usize,
    body: &mut Vec<u8>,
    binary: &mut Vec<u8>,
) -> Result<bool, SplitError> {
    let (a, b) = (start * o.per_row, (start + item.rows) * o.per_row);
    let wrong_form = |e: String| SplitError(format!("output {:?}: {e}", o.name));
    body.push(b'{');
    let mut first = true;
    for (k, v) in &o.fields {
        write_key(body, &mut first, k);
        body.extend_from_slice(v.get().as_bytes());
    }
    write_key(body, &mut first, "shape");
    body.push(b'[');
    write_shape(body, item.rows, &o.shape[1..]);
    body.push(b']');
    let as_binary = v2(item).wants_binary(&o.name);
    if as_binary {
        let at = binary.len();
        o.write_raw(a..b, binary).map_err(wrong_form)?;
        let mut params = o.parameters.clone();
        params.insert("binary_data_size".into(), json!(binary.len() - at));
        write_key(body, &mut first, "parameters");
        write_json(body, &params);
    } else {
        if !o.parameters.is_empty() {
            write_key(body, &mut first, "parameters");
            write_json(body, &o.parameters);
        }
        write_key(body, &mut first, "data");
        body.push(b'[');
        o.write_text(a..b, body).map_err(wrong_form)?;
        body.push(b']');
    }
    body.push(b'}');
    Ok(as_binary)
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
