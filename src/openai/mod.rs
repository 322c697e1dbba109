//! OpenAI-compatible calls on the wire, as much as a proxy needs: which paths name a
//! model in their JSON body, reading that body's top-level `model` (and `user`) without
//! parsing the rest, rewriting `model` while leaving every other byte as sent, the
//! `GET /v1/models` list, and braid's errors in OpenAI's shape
//! (`{"error": {"message", "type", "param", "code"}}`) so the `openai` SDK raises the
//! exception that matches the status, with braid's text.

pub mod sse;

use std::ops::Range;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::{Method, Response, StatusCode};
use serde_json::json;

use crate::error::{Body, ProxyError, json_response};

/// The paths whose POST body names the model it is for (vLLM's, SGLang's, TGI's,
/// llama.cpp's, TEI's and Infinity's servers all take these).
pub const MODEL_PATHS: [&str; 6] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/embeddings",
    "/v1/rerank",
    "/rerank",
];

/// The path listing the models a server offers.
pub const MODELS_PATH: &str = "/v1/models";

/// Where an executor takes embeddings calls (the one OpenAI path braid coalesces).
pub const EMBEDDINGS_PATH: &str = "/v1/embeddings";

/// Whether a request is an OpenAI-style call routed by its body's model.
pub fn names_model_in_body(method: &Method, path: &str) -> bool {
    method == Method::POST && MODEL_PATHS.contains(&path)
}

/// What braid reads of a call's body: its top-level `model` and `user` strings, and
/// whether it asks for a stream and for that stream's `usage`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Call {
    /// The model's name, and where its string's contents lie in the body.
    pub model: Option<(String, Range<usize>)>,
    /// The end user, when given (a sticky key for routes that name no header).
    pub user: Option<String>,
    /// `"stream": true`: the answer is Server-Sent Events.
    pub stream: bool,
    /// What `stream_options` says about `include_usage`.
    pub usage: UsageAsked,
    /// braid asks for the usage chunk on the client's behalf (and takes it out of
    /// what the client gets): set by the proxy from `ask_usage` and the path.
    pub braid_asks_usage: bool,
    /// Where the object's closing brace is.
    end: usize,
}

/// Whether a streamed call asked for its usage chunk (`stream_options.include_usage`).
#[derive(Debug, Default, PartialEq, Eq, Clone)]
pub enum UsageAsked {
    /// No `stream_options` at all.
    #[default]
    Absent,
    /// `stream_options` is an object without `include_usage`; its contents start here.
    Unsaid { open: usize, empty: bool },
    /// `include_usage: false`, its literal at this span.
    No(Range<usize>),
    /// `include_usage: true` (or `stream_options` is not an object: left alone).
    Yes,
}

/// The paths whose streams can carry a usage chunk when asked.
pub fn streams_usage(path: &str) -> bool {
    matches!(path, "/v1/chat/completions" | "/v1/completions")
}

impl Call {
    /// The edit that makes a streamed call ask for its usage chunk, when it did not:
    /// where, what to replace there, and the bytes to put in. `None`: nothing to do.
    pub fn ask_usage(&self) -> Option<(Range<usize>, &'static [u8])> {
        if !self.stream {
            return None;
        }
        match &self.usage {
            UsageAsked::Yes => None,
            UsageAsked::Absent => Some((
                self.end..self.end,
                br#","stream_options":{"include_usage":true}"#,
            )),
            UsageAsked::Unsaid { open, empty } => Some((
                *open..*open,
                if *empty {
                    br#""include_usage":true"#
                } else {
                    br#""include_usage":true,"#
                },
            )),
            UsageAsked::No(span) => Some((span.clone(), b"true")),
        }
    }
}

/// Reads the top-level `model` and `user` of a JSON object body, skipping every other
/// value without building it. `Err` when the body is not a JSON object.
pub fn read_call(body: &[u8]) -> Result<Call, String> {
    let mut s = Scanner { b: body, i: 0 };
    s.ws();
    if !s.eat(b'{') {
        return Err("the body must be a JSON object".into());
    }
    let mut call = Call::default();
    s.ws();
    if s.peek() == Some(b'}') {
        call.end = s.i;
        return s.only_space_after(call);
    }
    // The members braid acts on, each allowed once: a backend whose parser keeps the
    // last of two would read another value than the one braid routed by.
    let mut seen = [false; 4];
    loop {
        s.ws();
        let key = s.key()?;
        s.ws();
        if !s.eat(b':') {
            return Err(s.bad("':'"));
        }
        s.ws();
        if let Some(i) = ACTED_ON.iter().position(|k| *k == &key[..])
            && std::mem::replace(&mut seen[i], true)
        {
            return Err(format!(
                "the body names \"{}\" twice",
                String::from_utf8_lossy(ACTED_ON[i])
            ));
        }
        match &key[..] {
            b"model" | b"user" if s.peek() == Some(b'"') => {
                let (value, span) = s.string()?;
                if &key[..] == b"model" {
                    call.model = Some((value, span));
                } else {
                    call.user = Some(value);
                }
            }
            b"stream" if s.literal(b"true") => call.stream = true,
            b"stream_options" if s.peek() == Some(b'{') => call.usage = s.stream_options()?,
            b"stream_options" => {
                s.skip_value()?;
                call.usage = UsageAsked::Yes;
            }
            _ => s.skip_value()?,
        }
        s.ws();
        if s.eat(b',') {
            continue;
        }
        if s.peek() == Some(b'}') {
            call.end = s.i;
            return s.only_space_after(call);
        }
        return Err(s.bad("',' or '}'"));
    }
}

/// The top-level members braid reads and acts on; a body may name each once.
const ACTED_ON: [&[u8]; 4] = [b"model", b"user", b"stream", b"stream_options"];

/// The body with its `model` string (at `span`, inside the quotes) replaced by
/// `target`; every other byte as it was.
pub fn with_model(body: &Bytes, span: &Range<usize>, target: &str) -> Bytes {
    let escaped = escaped(target);
    edited(body, &mut [(span.clone(), escaped.as_bytes())])
}

/// A string as it goes between a JSON string's quotes.
pub fn escaped(s: &str) -> String {
    let quoted = serde_json::to_string(s).expect("a string serialises");
    quoted[1..quoted.len() - 1].to_string()
}

/// The body with each span replaced by its bytes (spans that do not overlap), every
/// other byte as it was.
pub fn edited(body: &[u8], edits: &mut [(Range<usize>, &[u8])]) -> Bytes {
    edits.sort_by_key(|(span, _)| (span.start, span.end));
    let grows: usize = edits.iter().map(|(_, b)| b.len()).sum();
    let mut out = BytesMut::with_capacity(body.len() + grows);
    let mut at = 0;
    for (span, bytes) in edits.iter() {
        out.extend_from_slice(&body[at..span.start]);
        out.extend_from_slice(bytes);
        at = span.end;
    }
    out.extend_from_slice(&body[at..]);
    out.freeze()
}

/// The span of a JSON object's top-level member `key` (its key to its value's end,
/// with one comma beside it), so that cutting it out leaves valid JSON. `None` when the
/// text is not an object or has no such member (or holds it more than once).
pub fn member_span(object: &[u8], key: &[u8]) -> Option<Range<usize>> {
    let mut s = Scanner { b: object, i: 0 };
    s.ws();
    if !s.eat(b'{') {
        return None;
    }
    let mut found: Option<Range<usize>> = None;
    let mut prev_comma: Option<usize> = None;
    loop {
        s.ws();
        let start = s.i;
        let k = s.key().ok()?;
        s.ws();
        if !s.eat(b':') {
            return None;
        }
        s.skip_value().ok()?;
        let end = s.i;
        s.ws();
        let comma = s.peek() == Some(b',');
        if &k[..] == key {
            if found.is_some() {
                return None;
            }
            // Take the comma after it, or else the one before it.
            found = Some(match (comma, prev_comma) {
                (true, _) => {
                    let mut after = s.i + 1;
                    while matches!(object.get(after), Some(b' ' | b'\t' | b'\n' | b'\r')) {
                        after += 1;
                    }
                    start..after
                }
                (false, Some(c)) => c..end,
                (false, None) => start..end,
            });
        }
        if comma {
            prev_comma = Some(s.i);
            s.i += 1;
            continue;
        }
        return if s.eat(b'}') { found } else { None };
    }
}

/// `GET /v1/models`: the models braid routes, in OpenAI's list shape.
pub fn models_response<'a>(models: impl Iterator<Item = &'a str>) -> Response<Body> {
    let data: Vec<serde_json::Value> = models
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "braid"}))
        .collect();
    json_response(
        StatusCode::OK,
        json!({"object": "list", "data": data}).to_string(),
    )
}

/// braid's own error in OpenAI's shape, with its status and `Retry-After`.
pub fn error_response(e: &ProxyError) -> Response<Body> {
    let param = matches!(e, ProxyError::UnknownModel { .. }).then_some("model");
    let mut resp = error(e.status(), &e.to_string(), param, e.label());
    if let Some(secs) = e.retry_after() {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}

/// An error in OpenAI's shape: its `type` follows from the status (so the SDK raises
/// the matching exception), `param` names the field at fault, `code` is a short reason.
pub fn error(status: StatusCode, message: &str, param: Option<&str>, code: &str) -> Response<Body> {
    let kind = match status.as_u16() {
        404 => "not_found_error",
        429 => "rate_limit_error",
        400..=499 => "invalid_request_error",
        _ => "server_error",
    };
    let body = json!({"error": {
        "message": message,
        "type": kind,
        "param": param,
        "code": code,
    }});
    json_response(status, body.to_string())
}

/// An error event in OpenAI's shape, ending a stream that broke after its first
/// token (the `openai` SDK raises `APIError` with the message).
pub fn error_event(message: &str, code: &'static str) -> Bytes {
    let body = json!({"error": {
        "message": message,
        "type": "server_error",
        "param": null,
        "code": code,
    }});
    Bytes::from(format!("data: {body}\n\n"))
}

/// A cursor over JSON text that reads strings and skips values.
struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Scanner<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn eat(&mut self, c: u8) -> bool {
        if self.peek() == Some(c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    /// Eats `word` (a literal such as `true`) when it is next.
    fn literal(&mut self, word: &[u8]) -> bool {
        let rest = self.b.get(self.i..).unwrap_or_default();
        let next = rest.get(word.len()).copied();
        if rest.starts_with(word) && !next.is_some_and(|c| c.is_ascii_alphanumeric()) {
            self.i += word.len();
            true
        } else {
            false
        }
    }

    /// A `stream_options` object: what it says of `include_usage`.
    fn stream_options(&mut self) -> Result<UsageAsked, String> {
        self.eat(b'{');
        let open = self.i;
        self.ws();
        if self.eat(b'}') {
            return Ok(UsageAsked::Unsaid { open, empty: true });
        }
        let mut asked = UsageAsked::Unsaid { open, empty: false };
        loop {
            self.ws();
            let key = self.key()?;
            self.ws();
            if !self.eat(b':') {
                return Err(self.bad("':'"));
            }
            self.ws();
            let at = self.i;
            if &key[..] == b"include_usage" {
                if asked != (UsageAsked::Unsaid { open, empty: false }) {
                    return Err("the body names \"include_usage\" twice".into());
                }
                asked = if self.literal(b"false") {
                    UsageAsked::No(at..self.i)
                } else {
                    self.skip_value()?;
                    UsageAsked::Yes
                };
            } else {
                self.skip_value()?;
            }
            self.ws();
            if self.eat(b',') {
                continue;
            }
            if self.eat(b'}') {
                return Ok(asked);
            }
            return Err(self.bad("',' or '}'"));
        }
    }

    /// The object closes at `i`: nothing but whitespace may follow it (a second value
    /// would be read by some parsers and not by others).
    fn only_space_after<T>(&mut self, ok: T) -> Result<T, String> {
        self.i += 1;
        self.ws();
        match self.peek() {
            None => Ok(ok),
            Some(_) => Err(self.bad("the end of the body")),
        }
    }

    fn bad(&self, wanted: &str) -> String {
        format!(
            "the body is not valid JSON: expected {wanted} at byte {}",
            self.i
        )
    }

    /// Past a string's closing quote; returns the span of its contents and whether it
    /// has escapes. memchr jumps over the text between quotes and backslashes.
    fn skip_string(&mut self) -> Result<(Range<usize>, bool), String> {
        if !self.eat(b'"') {
            return Err(self.bad("a string"));
        }
        let start = self.i;
        let mut escaped = false;
        loop {
            let rest = self.b.get(self.i..).unwrap_or_default();
            let Some(at) = memchr::memchr2(b'"', b'\\', rest) else {
                return Err(self.bad("the end of a string"));
            };
            self.i += at;
            if self.b[self.i] == b'"' {
                self.i += 1;
                return Ok((start..self.i - 1, escaped));
            }
            escaped = true;
            self.i += 2; // the backslash and the character it escapes
        }
    }

    /// An object key, unescaped as every JSON parser reads it (`"\u006dodel"` is
    /// `model`); borrowed from the body when it has no escapes.
    fn key(&mut self) -> Result<std::borrow::Cow<'a, [u8]>, String> {
        let open = self.i;
        let (span, escaped) = self.skip_string()?;
        let body: &'a [u8] = self.b;
        if !escaped {
            return Ok(std::borrow::Cow::Borrowed(&body[span]));
        }
        let key = serde_json::from_slice::<String>(&body[open..self.i])
            .map_err(|e| format!("a bad key: {e}"))?;
        Ok(std::borrow::Cow::Owned(key.into_bytes()))
    }

    /// A string: its decoded value and the span of its contents (inside the quotes).
    fn string(&mut self) -> Result<(String, Range<usize>), String> {
        let open = self.i;
        let (span, escaped) = self.skip_string()?;
        let value = if escaped {
            serde_json::from_slice::<String>(&self.b[open..self.i])
                .map_err(|e| format!("a bad string: {e}"))?
        } else {
            std::str::from_utf8(&self.b[span.clone()])
                .map_err(|_| "a string is not UTF-8".to_string())?
                .to_string()
        };
        Ok((value, span))
    }

    /// Skips one value of any kind, nested ones included (bounded: no recursion).
    /// Only structure is checked; strings are jumped over without being decoded.
    fn skip_value(&mut self) -> Result<(), String> {
        let mut depth = 0usize;
        loop {
            self.ws();
            match self.peek() {
                Some(b'"') => {
                    self.skip_string()?;
                }
                Some(b'{' | b'[') => {
                    depth += 1;
                    self.i += 1;
                    continue;
                }
                Some(b'}' | b']') if depth > 0 => {
                    depth -= 1;
                    self.i += 1;
                }
                Some(b',' | b':') if depth > 0 => {
                    self.i += 1;
                    continue;
                }
                Some(c) if c == b'-' || c.is_ascii_alphanumeric() => {
                    while matches!(self.peek(), Some(c) if c == b'-' || c == b'+' || c == b'.' || c.is_ascii_alphanumeric())
                    {
                        self.i += 1;
                    }
                }
                _ => return Err(self.bad("a value")),
            }
            if depth == 0 {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_top_level_model_and_user_and_nothing_nested() {
        let body = br#"{"messages":[{"role":"user","content":"hi \"model\": x","model":"no"}],"model":"llama-3","stream":true,"user":"alice","n":1.5e3,"x":null}"#;
        let call = read_call(body).unwrap();
        let (model, span) = call.model.unwrap();
        assert_eq!(model, "llama-3");
        assert_eq!(&body[span], b"llama-3");
        assert_eq!(call.user.as_deref(), Some("alice"));
        let empty = read_call(b" { } ").unwrap();
        assert_eq!((empty.model, empty.user, empty.stream), (None, None, false));
        for bad in [
            &b"[1]"[..],
            b"{\"model\"",
            b"{\"a\":}",
            b"{\"a\":1 \"b\":2}",
            b"nope",
        ] {
            assert!(read_call(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn rewriting_the_model_keeps_every_other_byte() {
        let body = Bytes::from_static(br#"{ "model" : "base",  "prompt":"a \u00e9" }"#);
        let (_, span) = read_call(&body).unwrap().model.unwrap();
        let out = with_model(&body, &span, "tuned \"v2\"");
        assert_eq!(
            &out[..],
            br#"{ "model" : "tuned \"v2\"",  "prompt":"a \u00e9" }"#
        );
        let (model, _) = read_call(&out).unwrap().model.unwrap();
        assert_eq!(model, "tuned \"v2\"");
    }

    #[test]
    fn a_stream_that_did_not_ask_for_usage_is_made_to() {
        let asked = |body: &[u8]| {
            let call = read_call(body).unwrap();
            let out = match call.ask_usage() {
                Some((span, bytes)) => edited(body, &mut [(span, bytes)]),
                None => Bytes::copy_from_slice(body),
            };
            String::from_utf8(out.to_vec()).unwrap()
        };
        assert_eq!(
            asked(br#"{"model":"m","stream":true}"#),
            r#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#
        );
        assert_eq!(
            asked(br#"{"stream": true, "stream_options": {}}"#),
            r#"{"stream": true, "stream_options": {"include_usage":true}}"#
        );
        assert_eq!(
            asked(br#"{"stream":true,"stream_options":{"x":1}}"#),
            r#"{"stream":true,"stream_options":{"include_usage":true,"x":1}}"#
        );
        assert_eq!(
            asked(br#"{"stream":true,"stream_options":{"include_usage":false}}"#),
            r#"{"stream":true,"stream_options":{"include_usage":true}}"#
        );
        for unchanged in [
            &br#"{"stream":true,"stream_options":{"include_usage":true}}"#[..],
            br#"{"stream":false}"#,
            br#"{"model":"m"}"#,
            br#"{"stream":"true"}"#,
            br#"{"stream":true,"stream_options":null}"#,
        ] {
            assert_eq!(asked(unchanged).as_bytes(), unchanged);
        }
        for body in [
            &br#"{"stream":true,"stream_options":{"include_usage":true}}"#[..],
            br#"{"model":"m", "stream": true }"#,
        ] {
            let out = asked(body);
            serde_json::from_str::<serde_json::Value>(&out).unwrap();
        }
    }

    #[test]
    fn a_member_is_cut_out_with_one_comma() {
        let cut = |json: &str, key: &str| {
            let span = member_span(json.as_bytes(), key.as_bytes())?;
            let out = edited(json.as_bytes(), &mut [(span, b"")]);
            Some(String::from_utf8(out.to_vec()).unwrap())
        };
        assert_eq!(
            cut(r#"{"a":1,"usage":null,"b":2}"#, "usage").unwrap(),
            r#"{"a":1,"b":2}"#
        );
        assert_eq!(
            cut(r#"{"a":1, "usage": null}"#, "usage").unwrap(),
            r#"{"a":1}"#
        );
        assert_eq!(cut(r#"{"usage":null}"#, "usage").unwrap(), r#"{}"#);
        assert_eq!(cut(r#"{"a":{"usage":null}}"#, "usage"), None);
        assert_eq!(cut(r#"{"usage":1,"usage":2}"#, "usage"), None);
    }

    #[test]
    fn keys_are_read_unescaped_and_the_members_braid_acts_on_appear_once() {
        let (model, _) = read_call(br#"{"\u006dodel":"assistant"}"#)
            .unwrap()
            .model
            .unwrap();
        assert_eq!(model, "assistant");
        let call =
            read_call(br#"{"m\u006fdel":"a","\u0075ser":"bob","str\u0065am":true}"#).unwrap();
        assert_eq!(call.user.as_deref(), Some("bob"));
        assert!(call.stream);
        for twice in [
            &br#"{"model":"assistant","\u006dodel":"internal"}"#[..],
            br#"{"model":"a","model":"a"}"#,
            br#"{"user":"a","model":"m","user":"b"}"#,
            br#"{"stream":false,"stream":true}"#,
            br#"{"stream_options":{},"stream_options":{"include_usage":true}}"#,
            br#"{"stream":true,"stream_options":{"include_usage":false,"include_usage":true}}"#,
            br#"{"model":1,"model":"a"}"#,
        ] {
            let err = read_call(twice).unwrap_err();
            assert!(
                err.contains("twice"),
                "{err}: {}",
                String::from_utf8_lossy(twice)
            );
        }
        // Other members may repeat (braid does not act on them), and nested ones are not
        // top-level members.
        read_call(br#"{"model":"a","n":1,"n":2,"x":{"model":"b","model":"c"}}"#).unwrap();
        // A second value after the object, another encoding or a bad escape is refused.
        for bad in [
            &br#"{"model":"a"} {"model":"b"}"#[..],
            b"\xef\xbb\xbf{\"model\":\"a\"}",
            b"{\0\"\0m\0",
            br#"{"\uZZZZ":1}"#,
        ] {
            assert!(read_call(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        read_call(b"{\"model\":\"a\"} \r\n").unwrap();
    }

    #[test]
    fn an_escaped_model_name_is_decoded() {
        let (model, _) = read_call(br#"{"model":"a\/b"}"#).unwrap().model.unwrap();
        assert_eq!(model, "a/b");
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(body in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = read_call(&body);
        }
    }
}
