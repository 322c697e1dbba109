//! Tensor data in the two forms the Open Inference Protocol carries over HTTP: JSON
//! values, and the raw little-endian bytes of Triton's binary tensor extension (BYTES
//! elements each prefixed by a 4-byte little-endian length). Converting between them
//! lets requests in either form share a batch, and each client get its rows back in
//! the form it asked for.
//!
//! Every size read from a body is checked against the bytes that are actually there
//! before anything is allocated from it.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    Bool,
    U8,
    U16,
    U32,
    U64,
    I8,
    I16,
    I32,
    I64,
    F16,
    Bf16,
    F32,
    F64,
    Bytes,
}

impl Dtype {
    pub fn parse(s: &str) -> Option<Dtype> {
        Some(match s {
            "BOOL" => Dtype::Bool,
            "UINT8" => Dtype::U8,
            "UINT16" => Dtype::U16,
            "UINT32" => Dtype::U32,
            "UINT64" => Dtype::U64,
            "INT8" => Dtype::I8,
            "INT16" => Dtype::I16,
            "INT32" => Dtype::I32,
            "INT64" => Dtype::I64,
            "FP16" => Dtype::F16,
            "BF16" => Dtype::Bf16,
            "FP32" => Dtype::F32,
            "FP64" => Dtype::F64,
            "BYTES" => Dtype::Bytes,
            _ => return None,
        })
    }

    /// Bytes per element; `None` for BYTES (each element has its own length).
    pub fn size(self) -> Option<usize> {
        Some(match self {
            Dtype::Bool | Dtype::U8 | Dtype::I8 => 1,
            Dtype::U16 | Dtype::I16 | Dtype::F16 | Dtype::Bf16 => 2,
            Dtype::U32 | Dtype::I32 | Dtype::F32 => 4,
            Dtype::U64 | Dtype::I64 | Dtype::F64 => 8,
            Dtype::Bytes => return None,
        })
    }
}

/// Where each of `elements` elements of a raw tensor starts, plus the end: `elements + 1`
/// offsets. The data must hold exactly that many elements, no more and no less. Nothing
/// is allocated before the count is known to fit (each element takes at least one byte
/// for fixed types, four for BYTES).
pub fn element_offsets(dt: Dtype, raw: &[u8], elements: usize) -> Result<Vec<usize>, String> {
    match dt.size() {
        Some(size) => {
            if elements.checked_mul(size) != Some(raw.len()) {
                return Err(format!(
                    "{} bytes of data for {elements} elements of {size} bytes",
                    raw.len()
                ));
            }
            Ok((0..=elements).map(|i| i * size).collect())
        }
        None => {
            if elements > raw.len() / 4 {
                return Err(format!(
                    "{} bytes cannot hold {elements} length-prefixed elements",
                    raw.len()
                ));
            }
            let mut offsets = Vec::with_capacity(elements + 1);
            let mut at = 0usize;
            for _ in 0..elements {
                offsets.push(at);
                let Some(prefix) = raw.get(at..at + 4) else {
                    return Err("BYTES data ends inside a length prefix".into());
                };
                let n = u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
                at = at
                    .checked_add(4 + n)
                    .filter(|&end| end <= raw.len())
                    .ok_or("a BYTES element runs past the end of the data")?;
            }
            if at != raw.len() {
                return Err(format!(
                    "{} bytes left over after {elements} BYTES elements",
                    raw.len() - at
                ));
            }
            offsets.push(at);
            Ok(offsets)
        }
    }
}

/// Calls `f` with where each leaf of a JSON value's nested arrays starts in `text` and
/// its text, in order (a scalar is its own leaf; an object is one leaf). `text` must be
/// valid JSON, as a `RawValue` is. Returns whether any array was nested in another: a
/// flat array's leaves are one contiguous range of its text.
pub fn leaves<'a, E>(
    text: &'a [u8],
    mut f: impl FnMut(usize, &'a [u8]) -> Result<(), E>,
) -> Result<bool, E> {
    let (mut i, mut depth, mut nested) = (0, 0usize, false);
    while i < text.len() {
        match text[i] {
            b'[' => {
                nested |= depth > 0;
                depth += 1;
                i += 1;
            }
            b']' => {
                depth = depth.saturating_sub(1);
                i += 1;
            }
            b',' | b' ' | b'\n' | b'\r' | b'\t' => i += 1,
            b'"' => {
                let end = string_end(text, i);
                f(i, &text[i..end])?;
                i = end;
            }
            b'{' => {
                let end = object_end(text, i);
                f(i, &text[i..end])?;
                i = end;
            }
            _ => {
                let end = text[i..]
                    .iter()
                    .position(|b| matches!(b, b',' | b']' | b' ' | b'\n' | b'\r' | b'\t'))
                    .map_or(text.len(), |n| i + n);
                f(i, &text[i..end])?;
                i = end;
            }
        }
    }
    Ok(nested)
}

/// The end (exclusive) of the JSON string starting at `at`.
fn string_end(text: &[u8], at: usize) -> usize {
    let mut i = at + 1;
    while i < text.len() {
        match text[i] {
            b'\\' => i += 2,
            b'"' => return i + 1,
            _ => i += 1,
        }
    }
    text.len()
}

/// The end (exclusive) of the JSON object starting at `at`.
fn object_end(text: &[u8], at: usize) -> usize {
    let (mut i, mut depth) = (at, 0usize);
    while i < text.len() {
        match text[i] {
            b'"' => {
                i = string_end(text, i);
                continue;
            }
            b'{' | b'[' => depth += 1,
            b'}' | b']' => {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    text.len()
}

fn wrong(dt: Dtype, token: &[u8]) -> String {
    let shown = String::from_utf8_lossy(&token[..token.len().min(40)]);
    format!("{shown} is not a valid {dt:?} element")
}

fn number(dt: Dtype, token: &[u8]) -> Result<&str, String> {
    match token.first() {
        Some(b'-' | b'0'..=b'9') => std::str::from_utf8(token).map_err(|_| wrong(dt, token)),
        _ => Err(wrong(dt, token)),
    }
}

/// Appends one JSON element (its text, as `leaves` gives it) to `out` as raw bytes, or
/// says why it is not a valid element of `dt`.
pub fn text_to_raw(dt: Dtype, token: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
    match dt {
        Dtype::Bytes => {
            let s: std::borrow::Cow<str> = match token.first() {
                Some(b'"') => serde_json::from_slice(token).map_err(|_| wrong(dt, token))?,
                _ => return Err(wrong(dt, token)),
            };
            out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        Dtype::Bool => match token {
            b"true" => out.push(1),
            b"false" => out.push(0),
            _ => return Err(wrong(dt, token)),
        },
        Dtype::F16 | Dtype::Bf16 | Dtype::F32 | Dtype::F64 => {
            let x: f64 = number(dt, token)?
                .parse()
                .ok()
                .filter(|x: &f64| x.is_finite())
                .ok_or_else(|| wrong(dt, token))?;
            match dt {
                Dtype::F16 => out.extend_from_slice(&half::f16::from_f64(x).to_le_bytes()),
                Dtype::Bf16 => out.extend_from_slice(&half::bf16::from_f64(x).to_le_bytes()),
                Dtype::F32 => out.extend_from_slice(&(x as f32).to_le_bytes()),
                _ => out.extend_from_slice(&x.to_le_bytes()),
            }
        }
        Dtype::U8 | Dtype::U16 | Dtype::U32 | Dtype::U64 => {
            let x: u64 = number(dt, token)?.parse().map_err(|_| wrong(dt, token))?;
            let size = dt.size().unwrap_or(8);
            if size < 8 && x >> (size * 8) != 0 {
                return Err(wrong(dt, token));
            }
            out.extend_from_slice(&x.to_le_bytes()[..size]);
        }
        Dtype::I8 | Dtype::I16 | Dtype::I32 | Dtype::I64 => {
            let x: i64 = number(dt, token)?.parse().map_err(|_| wrong(dt, token))?;
            let size = dt.size().unwrap_or(8);
            let bits = size * 8;
            if bits < 64 && (x < -(1i64 << (bits - 1)) || x >= 1i64 << (bits - 1)) {
                return Err(wrong(dt, token));
            }
            out.extend_from_slice(&x.to_le_bytes()[..size]);
        }
    }
    Ok(())
}

/// Whether a JSON element is a valid element of `dt`: what `text_to_raw` accepts,
/// without writing it. Numbers of floating types are only checked for their form and
/// range, not converted.
pub fn check_text(dt: Dtype, token: &[u8]) -> Result<(), String> {
    match dt {
        Dtype::Bytes if token.first() == Some(&b'"') => Ok(()),
        Dtype::Bool if token == b"true" || token == b"false" => Ok(()),
        Dtype::F16 | Dtype::Bf16 | Dtype::F32 | Dtype::F64 => {
            let text = number(dt, token)?;
            // Valid JSON number text (a RawValue's) without an exponent and under 300
            // digits is a finite f64: no need to convert it.
            if text.len() < 300 && !text.bytes().any(|b| b == b'e' || b == b'E') {
                return Ok(());
            }
            text.parse::<f64>()
                .ok()
                .filter(|x| x.is_finite())
                .map(|_| ())
                .ok_or_else(|| wrong(dt, token))
        }
        Dtype::Bytes | Dtype::Bool => Err(wrong(dt, token)),
        _ => text_to_raw(dt, token, &mut Vec::with_capacity(8)),
    }
}

/// Writes raw bytes holding whole elements as JSON elements separated by commas (no
/// brackets), appended to `out`.
pub fn raw_to_text(dt: Dtype, raw: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
    let mut first = true;
    let mut sep = |out: &mut Vec<u8>| {
        if !std::mem::take(&mut first) {
            out.push(b',');
        }
    };
    let Some(size) = dt.size() else {
        let mut rest = raw;
        while !rest.is_empty() {
            let n = u32::from_le_bytes(
                rest.get(..4)
                    .ok_or("BYTES data ends inside a length prefix")?
                    .try_into()
                    .expect("4 bytes"),
            ) as usize;
            let bytes = rest
                .get(4..4 + n)
                .ok_or("a BYTES element runs past the end of the data")?;
            let s = std::str::from_utf8(bytes)
                .map_err(|_| "a BYTES element is not UTF-8 text, which JSON cannot carry")?;
            sep(out);
            write_json(out, s);
            rest = &rest[4 + n..];
        }
        return Ok(());
    };
    if !raw.len().is_multiple_of(size) {
        return Err(format!("{} bytes is not whole {dt:?} elements", raw.len()));
    }
    let finite = |x: f64| {
        x.is_finite()
            .then_some(())
            .ok_or_else(|| format!("{x} cannot be written as JSON"))
    };
    for c in raw.chunks_exact(size) {
        let mut b = [0u8; 8];
        b[..size].copy_from_slice(c);
        let sign_extend = |bits: u32| {
            let x = u64::from_le_bytes(b);
            ((x << (64 - bits)) as i64) >> (64 - bits)
        };
        sep(out);
        match dt {
            Dtype::Bool => out.extend_from_slice(if c[0] != 0 { b"true" } else { b"false" }),
            Dtype::U8 | Dtype::U16 | Dtype::U32 | Dtype::U64 => {
                write_json(out, &u64::from_le_bytes(b))
            }
            Dtype::I8 | Dtype::I16 | Dtype::I32 | Dtype::I64 => {
                write_json(out, &sign_extend(size as u32 * 8))
            }
            // Each float as the shortest text that reads back as the same value.
            Dtype::F16 => {
                let x = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
                finite(f64::from(x))?;
                write_json(out, &x);
            }
            Dtype::Bf16 => {
                let x = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
                finite(f64::from(x))?;
                write_json(out, &x);
            }
            Dtype::F32 => {
                let x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                finite(f64::from(x))?;
                write_json(out, &x);
            }
            Dtype::F64 => {
                let x = f64::from_le_bytes(b);
                finite(x)?;
                write_json(out, &x);
            }
            Dtype::Bytes => unreachable!("BYTES has no fixed size"),
        }
    }
    Ok(())
}

/// Appends a value's JSON text to `out`.
pub fn write_json<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, v: &T) {
    serde_json::to_writer(out, v).expect("writing JSON to memory cannot fail");
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    /// A JSON array's elements as raw bytes.
    fn raw_of(dt: Dtype, values: &Value) -> Result<Vec<u8>, String> {
        let text = values.to_string();
        let mut raw = Vec::new();
        leaves(text.as_bytes(), |_, t| text_to_raw(dt, t, &mut raw))?;
        Ok(raw)
    }

    fn json_of(dt: Dtype, raw: &[u8]) -> Result<Value, String> {
        let mut text = b"[".to_vec();
        raw_to_text(dt, raw, &mut text)?;
        text.push(b']');
        Ok(serde_json::from_slice(&text).expect("valid JSON"))
    }

    #[test]
    fn every_type_round_trips_between_json_and_raw() {
        let cases = [
            ("BOOL", json!([true, false])),
            ("UINT8", json!([0, 255])),
            ("UINT64", json!([0, u64::MAX])),
            ("INT8", json!([-128, 127])),
            ("INT16", json!([-32768, 5])),
            ("INT32", json!([-1, 2147483647])),
            ("INT64", json!([i64::MIN, 7])),
            ("FP16", json!([0.5, -2.0])),
            ("BF16", json!([1.0, -0.25])),
            ("FP32", json!([0.1, -3.5, 1e-7])),
            ("FP64", json!([0.1, 1e300])),
            ("BYTES", json!(["", "héllo", "a \"quoted\" [word]\n"])),
        ];
        for (name, values) in cases {
            let dt = Dtype::parse(name).unwrap();
            let raw = raw_of(dt, &values).unwrap();
            let n = values.as_array().unwrap().len();
            let offsets = element_offsets(dt, &raw, n).unwrap();
            assert_eq!(offsets.len(), n + 1, "{name}");
            assert_eq!(json_of(dt, &raw).unwrap(), values, "{name}");
        }
    }

    #[test]
    fn leaves_flatten_nested_arrays_and_keep_each_element_s_text() {
        let text = br#"[[1, -2.5e3], ["a,]b", "c\"d"], [{"x": [1]}, null]]"#;
        let mut got = Vec::new();
        let nested = leaves(text, |_, t| {
            got.push(String::from_utf8(t.to_vec()).unwrap());
            Ok(())
        })
        .unwrap_or_else(|()| unreachable!());
        assert!(nested);
        assert_eq!(
            got,
            [
                "1",
                "-2.5e3",
                r#""a,]b""#,
                r#""c\"d""#,
                r#"{"x": [1]}"#,
                "null"
            ]
        );
        assert_eq!(leaves(b"[1,2]", |_, _| Ok::<_, ()>(())), Ok(false), "flat");
    }

    #[test]
    fn values_that_do_not_fit_their_type_are_refused() {
        for (name, v) in [
            ("UINT8", "256"),
            ("INT8", "-129"),
            ("UINT32", "-1"),
            ("INT32", "1.0"),
            ("BOOL", "1"),
            ("BYTES", "3"),
            ("FP32", "\"x\""),
            ("FP32", "1e400"),
            ("FP64", "null"),
            ("INT64", "{}"),
        ] {
            let dt = Dtype::parse(name).unwrap();
            assert!(
                text_to_raw(dt, v.as_bytes(), &mut Vec::new()).is_err(),
                "{name} {v}"
            );
            assert!(check_text(dt, v.as_bytes()).is_err(), "{name} {v}");
        }
        for (name, v) in [("FP32", "-1.5E+2"), ("BYTES", "\"\""), ("UINT8", "255")] {
            assert!(check_text(Dtype::parse(name).unwrap(), v.as_bytes()).is_ok());
        }
    }

    #[test]
    fn sizes_that_lie_are_refused_before_any_allocation_of_them() {
        // A count no body could hold: refused without reserving `elements` offsets.
        assert!(element_offsets(Dtype::Bytes, &[0; 8], usize::MAX).is_err());
        assert!(element_offsets(Dtype::F32, &[0; 8], usize::MAX).is_err());
        // A length prefix that claims more than there is, or data left over.
        let mut raw = 4_000_000_000u32.to_le_bytes().to_vec();
        raw.extend(b"abc");
        assert!(element_offsets(Dtype::Bytes, &raw, 1).is_err());
        assert!(json_of(Dtype::Bytes, &raw).is_err());
        let two = raw_of(Dtype::Bytes, &json!(["a", "b"])).unwrap();
        assert!(element_offsets(Dtype::Bytes, &two, 1).is_err());
        assert!(element_offsets(Dtype::Bytes, &two[..7], 2).is_err());
        assert!(json_of(Dtype::F32, &[0; 6]).is_err());
        // Not UTF-8, or not finite: JSON cannot carry it.
        assert!(json_of(Dtype::Bytes, &[1, 0, 0, 0, 0xff]).is_err());
        assert!(json_of(Dtype::F32, &f32::NAN.to_le_bytes()).is_err());
    }
}
