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

pub fn parse(kind: Kind, body: &[u8]) -> Result<Call, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| bad("body", format!("the body is not valid JSON: {e}")))?;
    let Value::Object(o) = v else {
        return Err(bad("body", "the body must be a JSON object"));
    };
    let mut call = Call {
        kind,
        model: String::new(),
        prompt: Prompt::Text(String::new()),
        stream: false,
        include_usage: false,
        max_tokens: None,
        temperature: None,
        top_p: 1.0,
        top_k: 0,
        seed: None,
        stop: Vec::new(),
        logprobs: None,
        echo: false,
        priority: None,
    };
    let mut chat_logprobs = false;
    let mut top_logprobs = None;
    let mut saw_prompt = false;
    for (k, val) in &o {
        if val.is_null() {
            continue;
        }
        match (k.as_str(), kind) {
            ("model", _) => {
                call.model = val
                    .as_str()
                    .ok_or_else(|| bad("model", "model must be a string"))?
                    .to_string();
            }
            ("prompt", Kind::Completion) => {
                call.prompt = prompt(val)?;
                saw_prompt = true;
            }
            ("messages", Kind::Chat) => {
                call.prompt = Prompt::Messages(messages(val)?);
                saw_prompt = true;
            }
            ("stream", _) => call.stream = boolean(k, val)?,
            ("stream_options", _) => {
                let Value::Object(so) = val else {
                    return Err(bad(k, "stream_options must be an object"));
                };
                for (sk, sv) in so {
                    match sk.as_str() {
                        "include_usage" => {
                            call.include_usage = boolean("stream_options.include_usage", sv)?
                        }
                        "continuous_usage_stats" | "include_obfuscation" => {}
                        other => {
                            return Err(bad(
                                "stream_options",
                                format!("unknown stream option {other:?}"),
                            ));
                        }
                    }
                }
            }
            ("max_tokens", _) | ("max_completion_tokens", Kind::Chat) => {
                call.max_tokens = Some(uint(k, val)? as usize);
            }
            ("temperature", _) => {
                let t = number(k, val)?;
                if !(0.0..=2.0).contains(&t) {
                    return Err(bad(k, format!("temperature {t} is outside 0 to 2")));
                }
                call.temperature = Some(t as f32);
            }
            ("top_p", _) => {
                let p = number(k, val)?;
                if !(p > 0.0 && p <= 1.0) {
                    return Err(bad(k, format!("top_p {p} must be above 0 and at most 1")));
                }
                call.top_p = p as f32;
            }
            ("top_k", _) => {
                let n = val
                    .as_i64()
                    .ok_or_else(|| bad(k, "top_k must be an integer"))?;
                if n < -1 {
                    return Err(bad(k, "top_k must be -1 or 0 (no limit) or positive"));
                }
                call.top_k = n.max(0) as usize;
            }
            ("seed", _) => {
                let s = val.as_i64().map(|s| s as u64).or_else(|| val.as_u64());
                call.seed = Some(s.ok_or_else(|| bad(k, "seed must be an integer"))?);
            }
            ("stop", _) => {
                call.stop = match val {
                    Value::String(s) => vec![s.clone()],
                    Value::Array(a) => a
                        .iter()
                        .map(|s| {
                            s.as_str()
                                .map(str::to_string)
                                .ok_or_else(|| bad(k, "stop must be a string or a list of strings"))
                        })
                        .collect::<Result<_, _>>()?,
                    _ => return Err(bad(k, "stop must be a string or a list of strings")),
                };
                call.stop.retain(|s| !s.is_empty());
                if call.stop.len() > MAX_STOPS {
                    return Err(bad(k, format!("at most {MAX_STOPS} stop sequences")));
                }
            }
            ("logprobs", Kind::Completion) => {
                let n = uint(k, val)? as usize;
                if n > MAX_TOP_LOGPROBS {
                    return Err(bad(
                        k,
                        format!("logprobs {n} is above braid's limit of {MAX_TOP_LOGPROBS}"),
                    ));
                }
                call.logprobs = Some(n);
            }
            ("logprobs", Kind::Chat) => chat_logprobs = boolean(k, val)?,
            ("top_logprobs", Kind::Chat) => {
                let n = uint(k, val)? as usize;
                if n > MAX_TOP_LOGPROBS {
                    return Err(bad(
                        k,
                        format!("top_logprobs {n} is above braid's limit of {MAX_TOP_LOGPROBS}"),
                    ));
                }
                top_logprobs = Some(n);
            }
            ("echo", Kind::Completion) => call.echo = boolean(k, val)?,
            ("n", _) | ("best_of", Kind::Completion) => {
                if uint(k, val)? != 1 {
                    return Err(bad(
                        k,
                        format!("{k} above 1 is not supported: send one request per choice"),
                    ));
                }
            }
            ("presence_penalty" | "frequency_penalty", _) => {
                if number(k, val)? != 0.0 {
                    return Err(bad(k, format!("{k} is not supported (only 0)")));
                }
            }
            ("repetition_penalty", _) => {
                if number(k, val)? != 1.0 {
                    return Err(bad(k, "repetition_penalty is not supported (only 1)"));
                }
            }
            ("min_p", _) => {
                if number(k, val)? != 0.0 {
                    return Err(bad(k, "min_p is not supported (only 0)"));
                }
            }
            ("logit_bias", _) => {
                if val.as_object().is_none_or(|m| !m.is_empty()) {
                    return Err(bad(k, "logit_bias is not supported"));
                }
            }
            ("suffix", Kind::Completion) => {
                return Err(bad(k, "suffix (insertion) is not supported"));
            }
            ("response_format", Kind::Chat) => {
                if val.get("type").and_then(Value::as_str) != Some("text") {
                    return Err(bad(
                        k,
                        "only response_format {\"type\": \"text\"} is supported",
                    ));
                }
            }
            ("tools" | "functions", Kind::Chat) => {
                if val.as_array().is_none_or(|a| !a.is_empty()) {
                    return Err(bad(k, "tool calling is not supported"));
                }
            }
            ("tool_choice" | "function_call", Kind::Chat) => {
                if val.as_str() != Some("none") && val.as_str() != Some("auto") {
                    return Err(bad(k, "tool calling is not supported"));
                }
            }
            ("priority", _) => {
                call.priority = Some(
                    val.as_i64()
                        .ok_or_else(|| bad(k, "priority must be an integer"))?,
                );
            }
            (h, _) if HARMLESS.contains(&h) => {}
            (other, _) => {
                return Err(bad(other, format!("unknown parameter {other:?}")));
            }
        }
    }
    if call.model.is_empty() {
        return Err(bad("model", "the request needs a \"model\""));
    }
    if !saw_prompt {
        let p = if kind == Kind::Chat {
            "messages"
        } else {
            "prompt"
        };
        return Err(bad(p, format!("the request needs \"{p}\"")));
    }
    if kind == Kind::Chat {
        if top_logprobs.is_some() && !chat_logprobs {
            return Err(bad("top_logprobs", "top_logprobs needs logprobs: true"));
        }
        if chat_logprobs {
            call.logprobs = Some(top_logprobs.unwrap_or(0));
        }
    }
    Ok(call)
}

fn boolean(k: &str, v: &Value) -> Result<bool, ApiError> {
    v.as_bool()
        .ok_or_else(|| bad(k, format!("{k} must be true or false")))
}

fn number(k: &str, v: &Value) -> Result<f64, ApiError> {
    v.as_f64()
        .ok_or_else(|| bad(k, format!("{k} must be a number")))
}

fn uint(k: &str, v: &Value) -> Result<u64, ApiError> {
    v.as_u64()
        .ok_or_else(|| bad(k, format!("{k} must be a non-negative integer")))
}

fn prompt(v: &Value) -> Result<Prompt, ApiError> {
    let one = "one prompt per request: a string, or a list of token ids";
    match v {
        Value::String(s) => Ok(Prompt::Text(s.clone())),
        Value::Array(a) if a.len() == 1 && !a[0].is_number() => prompt(&a[0]),
        Value::Array(a) if !a.is_empty() && a.iter().all(Value::is_number) => a
            .iter()
            .map(|t| {
                t.as_u64()
                    .filter(|&t| t <= u64::from(u32::MAX))
                    .map(|t| t as u32)
            })
            .collect::<Option<Vec<u32>>>()
            .map(Prompt::Tokens)
            .ok_or_else(|| bad("prompt", "token ids must be non-negative integers")),
        Value::Array(a) if a.len() > 1 => Err(bad(
            "prompt",
            format!("{} prompts in one request: {one}", a.len()),
        )),
        _ => Err(bad("prompt", format!("prompt must be {one}"))),
    }
}

fn messages(v: &Value) -> Result<Vec<Message>, ApiError> {
    let Value::Array(a) = v else {
        return Err(bad("messages", "messages must be a list"));
    };
    if a.is_empty() {
        return Err(bad("messages", "messages is empty"));
    }
    a.iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m
                .get("role")
                .and_then(Value::as_str)
                .ok_or_else(|| bad(&format!("messages[{i}].role"), "each message needs a role"))?;
            let content = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        match (
                            p.get("type").and_then(Value::as_str),
                            p.get("text").and_then(Value::as_str),
                        ) {
                            (Some("text"), Some(t)) => text.push_str(t),
                            (ty, _) => {
                                return Err(bad(
                                    &format!("messages[{i}].content[{j}]"),
                                    format!(
                                        "content part of type {:?}: this model reads text only",
                                        ty.unwrap_or("?")
                                    ),
                                ));
                            }
                        }
                    }
                    text
                }
                None | Some(Value::Null) if role == "assistant" => String::new(),
                _ => {
                    return Err(bad(
                        &format!("messages[{i}].content"),
                        "content must be a string or a list of text parts",
                    ));
                }
            };
            Ok(Message {
                role: role.to_string(),
                content,
            })
        })
        .collect()
}

/// What an answer said of its generation, for the metrics and logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt: usize,
    pub completion: usize,
}

/// A token's text for log-probabilities: its bytes (lossy), control tokens by name.
pub fn token_text(vocab: &Vocab, id: u32) -> String {
    if vocab.is_control(id) {
        return vocab.piece(id).unwrap_or("").to_string();
    }
    let mut b = Vec::new();
    vocab.token_bytes(id, &mut b);
    String::from_utf8_lossy(&b).into_owned()
}

fn token_bytes(vocab: &Vocab, id: u32) -> Vec<u8> {
    let mut b = Vec::new();
    if vocab.is_control(id) {
        b.extend_from_slice(vocab.piece(id).unwrap_or("").as_bytes());
    } else {
        vocab.token_bytes(id, &mut b);
    }
    b
}

/// The engine's events to the answer's bytes: the whole JSON at the end, or an SSE
/// chunk per event.
pub struct Answer {
    call: Call,
    model: Arc<LlmModel>,
    id: String,
    created: u64,
    prompt_tokens: usize,
    detok: Detokenizer,
    /// Text decoded and not yet sent: it may be the start of a stop string.
    held: String,
    /// Everything sent, for the whole answer (and its `text_offset`s).
    text: String,
    /// Log-probabilities, each with its text offset.
    lps: Vec<(TokenOut, usize)>,
    completion_tokens: usize,
    finish: Option<&'static str>,
    sent_role: bool,
    pub done: bool,
}

impl Answer {
    pub fn new(
        call: Call,
        model: Arc<LlmModel>,
        prompt_tokens: usize,
        id: String,
        created: u64,
    ) -> Answer {
        Answer {
            call,
            model,
            id,
            created,
            prompt_tokens,
            detok: Detokenizer::default(),
            held: String::new(),
            text: String::new(),
            lps: Vec::new(),
            completion_tokens: 0,
            finish: None,
            sent_role: false,
            done: false,
        }
    }

    pub fn usage(&self) -> Usage {
        Usage {
            prompt: self.prompt_tokens,
            completion: self.completion_tokens,
        }
    }

    pub fn finish_reason(&self) -> Option<&'static str> {
        self.finish
    }

    /// The echoed prompt's text (completions with `echo`), sent first.
    pub fn start(&mut self, prompt_ids: &[u32]) -> Bytes {
        let mut out = Vec::new();
        if self.call.echo {
            let p = match &self.call.prompt {
                Prompt::Text(s) => s.clone(),
                _ => self.model.vocab.decode(prompt_ids),
            };
            if !(self.call.stream && p.is_empty()) {
                self.send(&p, Vec::new(), &mut out);
            }
        }
        Bytes::from(out)
    }

    /// What `ev` adds to the answer; `self.done` once it is over.
    pub fn event(&mut self, ev: Event) -> Bytes {
        let mut out = Vec::new();
        match ev {
            Event::Prompt(list) => {
                if self.call.echo && self.call.logprobs.is_some() {
                    // Offsets within the echoed prompt, which was sent first.
                    let mut at = self
                        .lps
                        .iter()
                        .map(|(t, o)| o + token_text(&self.model.vocab, t.id).len())
                        .max()
                        .unwrap_or(0);
                    let lps: Vec<(TokenOut, usize)> = list
                        .into_iter()
                        .map(|t| {
                            let o = at;
                            at += token_text(&self.model.vocab, t.id).len();
                            (t, o)
                        })
                        .collect();
                    if self.call.stream {
                        self.chunk("", &lps, None, &mut out);
                    }
                    self.lps.extend(lps);
                }
            }
            Event::Token(t) => {
                self.completion_tokens += 1;
                let piece = self.detok.push(&self.model.vocab, t.id);
                let offset = self.text.len() + self.held.len();
                self.held.push_str(&piece);
                let lp = if self.call.logprobs.is_some() {
                    vec![(t, offset)]
                } else {
                    Vec::new()
                };
                self.release(lp, false, &mut out);
            }
            Event::Done(f) => {
                if f == Finish::Stop {
                    // The end-of-sequence token is generated, though not text.
                    self.completion_tokens += 1;
                }
                let rest = self.detok.finish();
                self.held.push_str(&rest);
                self.release(Vec::new(), true, &mut out);
                if !self.done {
                    self.end(if f == Finish::Stop { "stop" } else { "length" }, &mut out);
                }
            }
            Event::Failed(e) => {
                self.done = true;
                if self.call.stream {
                    let code = if e == GenError::Model {
                        "model_error"
                    } else {
                        "unavailable"
                    };
                    out.extend_from_slice(&crate::openai::error_event(&e.to_string(), code));
                }
            }
        }
        Bytes::from(out)
    }

    /// Sends held text that cannot be part of a stop string; ends at a stop string.
    fn release(&mut self, lps: Vec<(TokenOut, usize)>, all: bool, out: &mut Vec<u8>) {
        if let Some(at) = self
            .call
            .stop
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            let text = self.held[..at].to_string();
            self.held.clear();
            self.send(&text, lps, out);
            return self.end("stop", out);
        }
        let keep = if all {
            0
        } else {
            // The longest end of the held text that begins some stop string.
            let h = &self.held;
            self.call
                .stop
                .iter()
                .filter_map(|s| {
                    (1..s.len().min(h.len() + 1)).rev().find(|&n| {
                        h.is_char_boundary(h.len() - n) && s.starts_with(&h[h.len() - n..])
                    })
                })
                .max()
                .unwrap_or(0)
        };
        let cut = self.held.len() - keep;
        let text: String = self.held.drain(..cut).collect();
        if !text.is_empty() || !lps.is_empty() {
            self.send(&text, lps, out);
        }
    }

    fn send(&mut self, text: &str, lps: Vec<(TokenOut, usize)>, out: &mut Vec<u8>) {
        if self.call.stream {
            self.chunk(text, &lps, None, out);
        }
        self.text.push_str(text);
        self.lps.extend(lps);
    }

    fn end(&mut self, reason: &'static str, out: &mut Vec<u8>) {
        self.finish = Some(reason);
        self.done = true;
        if self.call.stream {
            self.chunk("", &[], Some(reason), out);
            if self.call.include_usage {
                let mut c = self.envelope();
                c.insert("choices".into(), json!([]));
                c.insert("usage".into(), self.usage_json());
                sse(&Value::Object(c), out);
            }
            out.extend_from_slice(b"data: [DONE]\n\n");
        }
    }

    fn usage_json(&self) -> Value {
        let u = self.usage();
        json!({"prompt_tokens": u.prompt, "completion_tokens": u.completion, "total_tokens": u.prompt + u.completion})
    }

    fn envelope(&self) -> Map<String, Value> {
        let object = match (self.call.kind, self.call.stream) {
            (Kind::Completion, _) => "text_completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Chat, false) => "chat.completion",
        };
        let mut m = Map::new();
        m.insert("id".into(), json!(self.id));
        m.insert("object".into(), json!(object));
        m.insert("created".into(), json!(self.created));
        m.insert("model".into(), json!(self.call.model));
        m
    }

    fn chunk(
        &mut self,
        text: &str,
        lps: &[(TokenOut, usize)],
        finish: Option<&str>,
        out: &mut Vec<u8>,
    ) {
        let mut choice = Map::new();
        choice.insert("index".into(), json!(0));
        match self.call.kind {
            Kind::Completion => {
                choice.insert("text".into(), json!(text));
            }
            Kind::Chat => {
                let mut delta = Map::new();
                if !self.sent_role {
                    delta.insert("role".into(), json!("assistant"));
                    self.sent_role = true;
                }
                if finish.is_none() {
                    delta.insert("content".into(), json!(text));
                }
                choice.insert("delta".into(), Value::Object(delta));
            }
        }
        let lp = if self.call.logprobs.is_some() && !lps.is_empty() {
            self.lps_json(lps)
        } else {
            Value::Null
        };
        choice.insert("logprobs".into(), lp);
        choice.insert("finish_reason".into(), json!(finish));
        let mut c = self.envelope();
        c.insert("choices".into(), json!([Value::Object(choice)]));
        if self.call.include_usage {
            c.insert("usage".into(), Value::Null);
        }
        sse(&Value::Object(c), out);
    }

    fn lps_json(&self, lps: &[(TokenOut, usize)]) -> Value {
        let v = &self.model.vocab;
        match self.call.kind {
            Kind::Completion => {
                let tokens: Vec<String> = lps.iter().map(|(t, _)| token_text(v, t.id)).collect();
                let logprobs: Vec<Option<f32>> = lps.iter().map(|(t, _)| t.logprob).collect();
                let top: Vec<Value> = lps
                    .iter()
                    .map(|(t, _)| {
                        if t.logprob.is_none() {
                            return Value::Null;
                        }
                        let m: Map<String, Value> = t
                            .top
                            .iter()
                            .map(|&(id, lp)| (token_text(v, id), json!(lp)))
                            .collect();
                        Value::Object(m)
                    })
                    .collect();
                let offsets: Vec<usize> = lps.iter().map(|(_, o)| *o).collect();
                json!({"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": top, "text_offset": offsets})
            }
            Kind::Chat => {
                let content: Vec<Value> = lps
                    .iter()
                    .map(|(t, _)| {
                        let top: Vec<Value> = t
                            .top
                            .iter()
                            .map(|&(id, lp)| json!({"token": token_text(v, id), "logprob": lp, "bytes": token_bytes(v, id)}))
                            .collect();
                        json!({"token": token_text(v, t.id), "logprob": t.logprob, "bytes": token_bytes(v, t.id), "top_logprobs": top})
                    })
                    .collect();
                json!({"content": content})
            }
        }
    }

    /// The whole (not streamed) answer, once `done`.
    pub fn whole(&self) -> Value {
        let mut choice = Map::new();
        choice.insert("index".into(), json!(0));
        match self.call.kind {
            Kind::Completion => {
                choice.insert("text".into(), json!(self.text));
            }
            Kind::Chat => {
                choice.insert(
                    "message".into(),
                    json!({"role": "assistant", "content": self.text}),
                );
            }
        }
        let lp = if self.call.logprobs.is_some() {
            self.lps_json(&self.lps)
        } else {
            Value::Null
        };
        choice.insert("logprobs".into(), lp);
        choice.insert("finish_reason".into(), json!(self.finish));
        let mut c = self.envelope();
        c.insert("choices".into(), json!([Value::Object(choice)]));
        c.insert("usage".into(), self.usage_json());
        Value::Object(c)
    }
}

fn sse(v: &Value, out: &mut Vec<u8>) {
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(v.to_string().as_bytes());
    out.extend_from_slice(b"\n\n");
}

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
