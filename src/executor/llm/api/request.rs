//! A completion or chat completion call read and checked: anything that would change
//! the result and is not supported is a 400 naming the parameter.

use super::*;

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
    let mut seen = Seen::default();
    for (k, val) in &o {
        if !val.is_null() {
            field(&mut call, &mut seen, k, val)?;
        }
    }
    if call.model.is_empty() {
        return Err(bad("model", "the request needs a \"model\""));
    }
    if !seen.prompt {
        let p = if kind == Kind::Chat {
            "messages"
        } else {
            "prompt"
        };
        return Err(bad(p, format!("the request needs \"{p}\"")));
    }
    if kind == Kind::Chat {
        if seen.top_logprobs.is_some() && !seen.chat_logprobs {
            return Err(bad("top_logprobs", "top_logprobs needs logprobs: true"));
        }
        if seen.chat_logprobs {
            call.logprobs = Some(seen.top_logprobs.unwrap_or(0));
        }
    }
    Ok(call)
}

/// What the fields read so far said that is checked once all are read.
#[derive(Default)]
struct Seen {
    prompt: bool,
    chat_logprobs: bool,
    top_logprobs: Option<usize>,
}

/// One field of the call (not null), read into `call`.
fn field(call: &mut Call, seen: &mut Seen, k: &str, val: &Value) -> Result<(), ApiError> {
    let kind = call.kind;
    match (k, kind) {
        ("model", _) => {
            call.model = val
                .as_str()
                .ok_or_else(|| bad("model", "model must be a string"))?
                .to_string();
        }
        ("prompt", Kind::Completion) => {
            call.prompt = prompt(val)?;
            seen.prompt = true;
        }
        ("messages", Kind::Chat) => {
            call.prompt = Prompt::Messages(messages(val)?);
            seen.prompt = true;
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
        ("temperature" | "top_p" | "top_k" | "seed", _) => sampling(call, k, val)?,
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
        ("logprobs", Kind::Chat) => seen.chat_logprobs = boolean(k, val)?,
        ("top_logprobs", Kind::Chat) => {
            let n = uint(k, val)? as usize;
            if n > MAX_TOP_LOGPROBS {
                return Err(bad(
                    k,
                    format!("top_logprobs {n} is above braid's limit of {MAX_TOP_LOGPROBS}"),
                ));
            }
            seen.top_logprobs = Some(n);
        }
        ("echo", Kind::Completion) => call.echo = boolean(k, val)?,
        ("priority", _) => {
            call.priority = Some(
                val.as_i64()
                    .ok_or_else(|| bad(k, "priority must be an integer"))?,
            );
        }
        _ => refused(kind, k, val)?,
    }
    Ok(())
}

/// A sampling parameter, checked against its range.
fn sampling(call: &mut Call, k: &str, val: &Value) -> Result<(), ApiError> {
    match k {
        "temperature" => {
            let t = number(k, val)?;
            if !(0.0..=2.0).contains(&t) {
                return Err(bad(k, format!("temperature {t} is outside 0 to 2")));
            }
            call.temperature = Some(t as f32);
        }
        "top_p" => {
            let p = number(k, val)?;
            if !(p > 0.0 && p <= 1.0) {
                return Err(bad(k, format!("top_p {p} must be above 0 and at most 1")));
            }
            call.top_p = p as f32;
        }
        "top_k" => {
            let n = val
                .as_i64()
                .ok_or_else(|| bad(k, "top_k must be an integer"))?;
            if n < -1 {
                return Err(bad(k, "top_k must be -1 or 0 (no limit) or positive"));
            }
            call.top_k = n.max(0) as usize;
        }
        _ => {
            // "seed": the only other key `field` sends here.
            let s = val.as_i64().map(|s| s as u64).or_else(|| val.as_u64());
            call.seed = Some(s.ok_or_else(|| bad(k, "seed must be an integer"))?);
        }
    }
    Ok(())
}

/// Any other field: accepted where it changes nothing (its neutral value, or one of
/// the harmless fields), else a 400 naming it.
fn refused(kind: Kind, k: &str, val: &Value) -> Result<(), ApiError> {
    match (k, kind) {
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
        (h, _) if HARMLESS.contains(&h) => {}
        (other, _) => {
            return Err(bad(other, format!("unknown parameter {other:?}")));
        }
    }
    Ok(())
}

pub(super) fn boolean(k: &str, v: &Value) -> Result<bool, ApiError> {
    v.as_bool()
        .ok_or_else(|| bad(k, format!("{k} must be true or false")))
}

pub(super) fn number(k: &str, v: &Value) -> Result<f64, ApiError> {
    v.as_f64()
        .ok_or_else(|| bad(k, format!("{k} must be a number")))
}

pub(super) fn uint(k: &str, v: &Value) -> Result<u64, ApiError> {
    v.as_u64()
        .ok_or_else(|| bad(k, format!("{k} must be a non-negative integer")))
}

pub(super) fn prompt(v: &Value) -> Result<Prompt, ApiError> {
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

pub(super) fn messages(v: &Value) -> Result<Vec<Message>, ApiError> {
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
