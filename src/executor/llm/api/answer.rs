//! [`Answer`]: the engine's events turned into the JSON answer or its Server-Sent
//! Events, with `stop` strings held back until they can be told apart from text.

use super::*;

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

pub(super) fn token_bytes(vocab: &Vocab, id: u32) -> Vec<u8> {
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

pub(super) fn sse(v: &Value, out: &mut Vec<u8>) {
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(v.to_string().as_bytes());
    out.extend_from_slice(b"\n\n");
}
