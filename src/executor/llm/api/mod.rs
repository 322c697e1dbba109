//! OpenAI's completions and chat completions on the executor's wire: requests read
//! and checked (anything that would change the result and is not supported is a 400
//! naming the parameter, never silently ignored), and [`Answer`], the state machine
//! that turns the engine's events into the JSON answer or its Server-Sent Events, with
//! `stop` strings held back until they can be told apart from text.

use bytes::Bytes;
use http::StatusCode;
use serde_json::{Map, Value, json};

use std::sync::Arc;

use super::LlmModel;
use super::chat::Message;
use super::engine::{Event, Finish, GenError, TokenOut};
use super::spm::{Detokenizer, Vocab};

mod answer;
mod request;

pub use answer::{Answer, Usage, token_text};
pub use request::parse;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Completion,
    Chat,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
    Messages(Vec<Message>),
}

/// A parsed call.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub kind: Kind,
    pub model: String,
    pub prompt: Prompt,
    pub stream: bool,
    pub include_usage: bool,
    pub max_tokens: Option<usize>,
    /// `None`: the served name's default (1 unless configured).
    pub temperature: Option<f32>,
    pub top_p: f32,
    pub top_k: usize,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    /// Alternatives per token, when log-probabilities are asked for.
    pub logprobs: Option<usize>,
    pub echo: bool,
    /// vLLM's `priority` (lower runs first), when given.
    pub priority: Option<i64>,
}

/// A 4xx in OpenAI's shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<String>,
    pub code: &'static str,
}

pub fn bad(param: &str, message: impl Into<String>) -> ApiError {
    ApiError {
        status: StatusCode::BAD_REQUEST,
        message: message.into(),
        param: Some(param.to_string()),
        code: "invalid_request_error",
    }
}

/// The most alternatives per token braid returns (`top_logprobs`, `logprobs`).
pub const MAX_TOP_LOGPROBS: usize = 5;
/// Stop strings per request, as OpenAI allows.
pub const MAX_STOPS: usize = 4;

/// Fields read and not used, because they cannot change the generated text.
const HARMLESS: [&str; 7] = [
    "user",
    "metadata",
    "store",
    "service_tier",
    "parallel_tool_calls",
    "prompt_cache_key",
    "safety_identifier",
];

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_call_reads_back_what_it_says() {
        let body = br#"{"model":"m","prompt":"hi","max_tokens":5,"temperature":0.5,"top_p":0.9,"top_k":-1,
            "seed":-3,"stop":"\n","stream":true,"stream_options":{"include_usage":true},"logprobs":2,"echo":true,"user":"u","n":1}"#;
        let c = parse(Kind::Completion, body).unwrap();
        assert_eq!(c.prompt, Prompt::Text("hi".into()));
        assert_eq!(
            (c.max_tokens, c.temperature, c.top_k, c.logprobs),
            (Some(5), Some(0.5), 0, Some(2))
        );
        assert_eq!(c.seed, Some((-3i64) as u64));
        assert_eq!(c.stop, ["\n"]);
        assert!(c.stream && c.include_usage && c.echo);
        // Chat's logprobs are a flag with top_logprobs; completions' fields are not chat's.
        let c = parse(Kind::Chat, br#"{"model":"m","messages":[{"role":"user","content":"x"}],"logprobs":true,"top_logprobs":3}"#).unwrap();
        assert_eq!(c.logprobs, Some(3));
        assert_eq!(
            parse(Kind::Chat, br#"{"model":"m","messages":[],"echo":true}"#)
                .unwrap_err()
                .param
                .as_deref(),
            Some("messages")
        );
        assert_eq!(
            parse(
                Kind::Chat,
                br#"{"model":"m","messages":[{"role":"user","content":"x"}],"echo":true}"#
            )
            .unwrap_err()
            .param
            .as_deref(),
            Some("echo")
        );
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            ".{0,8}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                prop::collection::vec((prop::sample::select(FIELDS.to_vec()), inner), 0..6)
                    .prop_map(|kv| Value::Object(
                        kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
                    )),
            ]
        })
    }

    /// Every field either endpoint reads, so random bodies reach every check.
    const FIELDS: [&str; 24] = [
        "model",
        "prompt",
        "messages",
        "role",
        "content",
        "type",
        "text",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "stop",
        "stream",
        "stream_options",
        "include_usage",
        "logprobs",
        "top_logprobs",
        "echo",
        "n",
        "logit_bias",
        "tools",
        "priority",
        "user",
    ];

    proptest! {
        /// Arbitrary bytes and arbitrary JSON never panic the parser, and what it
        /// accepts is within its stated limits.
        #[test]
        fn the_parser_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..64), v in json_value()) {
            for kind in [Kind::Completion, Kind::Chat] {
                let _ = parse(kind, &bytes);
                if let Ok(c) = parse(kind, v.to_string().as_bytes()) {
                    prop_assert!(!c.model.is_empty());
                    prop_assert!(c.logprobs.is_none_or(|n| n <= MAX_TOP_LOGPROBS));
                    prop_assert!(c.stop.len() <= MAX_STOPS);
                    prop_assert!(c.temperature.is_none_or(|t| (0.0..=2.0).contains(&t)));
                } else {
                    let e = parse(kind, v.to_string().as_bytes()).unwrap_err();
                    prop_assert_eq!(e.status, StatusCode::BAD_REQUEST);
                    prop_assert!(!e.message.is_empty());
                }
            }
        }
    }
}
