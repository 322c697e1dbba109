//! Tensor data in the two forms the Open Inference Protocol carries over HTTP: JSON
//! values, and the raw little-endian bytes of Triton's binary tensor extension (BYTES
//! elements each prefixed by a 4-byte little-endian length). Converting between them
//! lets requests in either form share a batch, and each client get its rows back in
//! the form it asked for.
//!
//! Every size read from a body is checked against the bytes that are actually there
//! before anything is allocated from it.

use serde_json::{Number, Value};

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

/// Appends JSON elements to `out` as raw bytes.
pub fn to_raw(dt: Dtype, values: &[Value], out: &mut Vec<u8>) -> Result<(), String> {
    let wrong = |v: &Value| format!("{v} is not a valid {dt:?} element");
    for v in values {
        match dt {
            Dtype::Bytes => {
                let s = v.as_str().ok_or_else(|| wrong(v))?;
                out.extend_from_slice(&(s.len() as u32).to_le_bytes());
                out.extend_from_slice(s.as_bytes());
            }
            Dtype::Bool => out.push(u8::from(v.as_bool().ok_or_else(|| wrong(v))?)),
            Dtype::F16 | Dtype::Bf16 | Dtype::F32 | Dtype::F64 => {
                let x = v.as_f64().ok_or_else(|| wrong(v))?;
                match dt {
                    Dtype::F16 => out.extend_from_slice(&half::f16::from_f64(x).to_le_bytes()),
                    Dtype::Bf16 => out.extend_from_slice(&half::bf16::from_f64(x).to_le_bytes()),
                    Dtype::F32 => out.extend_from_slice(&(x as f32).to_le_bytes()),
                    _ => out.extend_from_slice(&x.to_le_bytes()),
                }
            }
            Dtype::U8 | Dtype::U16 | Dtype::U32 | Dtype::U64 => {
                let x = v.as_u64().ok_or_else(|| wrong(v))?;
                let size = dt.size().unwrap_or(8);
                if size < 8 && x >> (size * 8) != 0 {
                    return Err(wrong(v));
                }
                out.extend_from_slice(&x.to_le_bytes()[..size]);
            }
            Dtype::I8 | Dtype::I16 | Dtype::I32 | Dtype::I64 => {
                let x = v.as_i64().ok_or_else(|| wrong(v))?;
                let size = dt.size().unwrap_or(8);
                let bits = size * 8;
                if bits < 64 && (x < -(1i64 << (bits - 1)) || x >= 1i64 << (bits - 1)) {
                    return Err(wrong(v));
                }
                out.extend_from_slice(&x.to_le_bytes()[..size]);
            }
        }
    }
    Ok(())
}

/// Raw bytes holding whole elements, as JSON values.
pub fn to_json(dt: Dtype, raw: &[u8]) -> Result<Vec<Value>, String> {
    let float = |x: f64| {
        Number::from_f64(x)
            .map(Value::Number)
            .ok_or_else(|| format!("{x} cannot be written as JSON"))
    };
    let Some(size) = dt.size() else {
        let mut out = Vec::new();
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
            out.push(Value::String(s.to_string()));
            rest = &rest[4 + n..];
        }
        return Ok(out);
    };
    if !raw.len().is_multiple_of(size) {
        return Err(format!("{} bytes is not whole {dt:?} elements", raw.len()));
    }
    raw.chunks_exact(size)
        .map(|c| {
            let mut b = [0u8; 8];
            b[..size].copy_from_slice(c);
            let sign_extend = |bits: u32| {
                let x = u64::from_le_bytes(b);
                ((x << (64 - bits)) as i64) >> (64 - bits)
            };
            Ok(match dt {
                Dtype::Bool => Value::Bool(c[0] != 0),
                Dtype::U8 | Dtype::U16 | Dtype::U32 | Dtype::U64 => {
                    Value::from(u64::from_le_bytes(b))
                }
                Dtype::I8 | Dtype::I16 | Dtype::I32 | Dtype::I64 => {
                    Value::from(sign_extend(size as u32 * 8))
                }
                Dtype::F16 => float(half::f16::from_le_bytes([c[0], c[1]]).to_f64())?,
                Dtype::Bf16 => float(half::bf16::from_le_bytes([c[0], c[1]]).to_f64())?,
                Dtype::F32 => float(f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))?,
                Dtype::F64 => float(f64::from_le_bytes(b))?,
                Dtype::Bytes => unreachable!("BYTES has no fixed size"),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
            ("FP32", json!([0.1f32 as f64, -3.5])),
            ("FP64", json!([0.1, 1e300])),
            ("BYTES", json!(["", "héllo"])),
        ];
        for (name, values) in cases {
            let dt = Dtype::parse(name).unwrap();
            let values = values.as_array().unwrap();
            let mut raw = Vec::new();
            to_raw(dt, values, &mut raw).unwrap();
            let offsets = element_offsets(dt, &raw, values.len()).unwrap();
            assert_eq!(offsets.len(), values.len() + 1, "{name}");
            assert_eq!(&to_json(dt, &raw).unwrap(), values, "{name}");
        }
    }

    #[test]
    fn values_that_do_not_fit_their_type_are_refused() {
        for (name, v) in [
            ("UINT8", json!(256)),
            ("INT8", json!(-129)),
            ("UINT32", json!(-1)),
            ("BOOL", json!(1)),
            ("BYTES", json!(3)),
            ("FP32", json!("x")),
        ] {
            let mut raw = Vec::new();
            assert!(
                to_raw(Dtype::parse(name).unwrap(), &[v], &mut raw).is_err(),
                "{name}"
            );
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
        assert!(to_json(Dtype::Bytes, &raw).is_err());
        let mut two = Vec::new();
        to_raw(Dtype::Bytes, &[json!("a"), json!("b")], &mut two).unwrap();
        assert!(element_offsets(Dtype::Bytes, &two, 1).is_err());
        assert!(element_offsets(Dtype::Bytes, &two[..7], 2).is_err());
        assert!(to_json(Dtype::F32, &[0; 6]).is_err());
        // Not UTF-8: JSON cannot carry it.
        assert!(to_json(Dtype::Bytes, &[1, 0, 0, 0, 0xff]).is_err());
    }
}
