//! The executor's OpenAI-compatible edge, for its encoders: `POST /v1/embeddings` (and
//! `GET /v1/models`, answered with `openai::models_response`), in the shape TEI and vLLM answer them (what the `openai` SDK's
//! `embeddings.create` reads), with errors in OpenAI's shape. Each input's token count
//! is given beside its embedding (`tokens`, an extension the SDK ignores), so whoever
//! splits a merged call can give each caller its own exact `usage`.

use base64::Engine;
use serde::Deserialize;
use serde_json::{Value, json};

use super::model::Outputs;

/// A `POST /v1/embeddings` body, as much as an encoder serves.
#[derive(Debug, PartialEq)]
pub struct EmbeddingsCall {
    pub model: String,
    pub texts: Vec<String>,
    /// `encoding_format: "base64"`: each embedding as the base64 of its little-endian
    /// f32 bytes (the SDK's default asks for it and decodes it).
    pub base64: bool,
    pub dimensions: Option<usize>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Input {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct Raw {
    model: String,
    input: Value,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    dimensions: Option<usize>,
}

/// Reads the call; `Err` is the message of a 400, and the field it is about.
pub fn parse(body: &[u8]) -> Result<EmbeddingsCall, (String, &'static str)> {
    let raw: Raw = serde_json::from_slice(body).map_err(|e| {
        let field = if e.to_string().contains("model") {
            "model"
        } else {
            "input"
        };
        (format!("the body is not an embeddings request: {e}"), field)
    })?;
    let texts = match serde_json::from_value::<Input>(raw.input) {
        Ok(Input::One(t)) => vec![t],
        Ok(Input::Many(ts)) => ts,
        Err(_) => {
            return Err((
                "\"input\" must be a string or a list of strings (token arrays are not served)"
                    .into(),
                "input",
            ));
        }
    };
    if texts.is_empty() {
        return Err(("\"input\" is empty".into(), "input"));
    }
    let base64 = match raw.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err((
                format!("encoding_format {other:?} is not one of \"float\", \"base64\""),
                "encoding_format",
            ));
        }
    };
    Ok(EmbeddingsCall {
        model: raw.model,
        texts,
        base64,
        dimensions: raw.dimensions,
    })
}

/// The answer: one embedding per input, in order, and the tokens they took.
pub fn reply(call: &EmbeddingsCall, out: &Outputs) -> Value {
    let e = &out.embedding;
    let data: Vec<Value> = (0..e.rows)
        .map(|i| {
            let row = e.row(i);
            let embedding = if call.base64 {
                let bytes: Vec<u8> = row.iter().flat_map(|x| x.to_le_bytes()).collect();
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(row)
            };
            json!({
                "object": "embedding",
                "index": i,
                "embedding": embedding,
                "tokens": e.tokens.get(i),
            })
        })
        .collect();
    let tokens: usize = e.tokens.iter().sum();
    json!({
        "object": "list",
        "data": data,
        "model": call.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_read_as_the_sdk_sends_them() {
        let c = parse(br#"{"model":"m","input":"hi","encoding_format":"base64"}"#).unwrap();
        assert_eq!((c.texts, c.base64), (vec!["hi".to_string()], true));
        let c = parse(br#"{"input":["a","b"],"model":"m"}"#).unwrap();
        assert_eq!((c.texts.len(), c.base64, c.dimensions), (2, false, None));
        for (bad, field) in [
            (&br#"{"model":"m","input":[1,2]}"#[..], "input"),
            (br#"{"model":"m","input":[]}"#, "input"),
            (br#"{"input":"x"}"#, "model"),
            (
                br#"{"model":"m","input":"x","encoding_format":"int8"}"#,
                "encoding_format",
            ),
        ] {
            assert_eq!(
                parse(bad).unwrap_err().1,
                field,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
