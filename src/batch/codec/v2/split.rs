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
