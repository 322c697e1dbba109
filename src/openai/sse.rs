//! What an OpenAI-style answer says about its generation, read as it passes through:
//! Server-Sent Events split across reads in any way, or a whole JSON answer. A pure
//! state machine (bytes in, observations out); the body that feeds it and the clock
//! live in the proxy.
//!
//! Per event it notes whether content arrived (a delta with text, a completion's text,
//! an embedding), the finish reasons, `usage` (prompt and completion tokens) and
//! in-band errors. A line longer than `MAX_LINE` stops the reading, never the stream.
//! A whole JSON answer is not kept: only its last `JSON_TAIL` bytes, where servers put
//! `usage`, so what a reader holds is bounded whatever the answer's size.

use serde::Deserialize;

/// Longest SSE line (or whole JSON answer) read; past it nothing more is noted.
pub const MAX_LINE: usize = 64 * 1024;

/// The bytes of a JSON answer kept to find its `usage` and finish reasons in.
pub const JSON_TAIL: usize = 8 * 1024;

/// Why a generation stopped, from a closed set (metric labels come from config or
/// closed sets, never from the backend's words).
pub fn finish_label(reason: &str) -> &'static str {
    match reason {
        "stop" => "stop",
        "length" => "length",
        "tool_calls" | "function_call" => "tool_calls",
        "content_filter" => "content_filter",
        _ => "other",
    }
}

/// What has been seen so far.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Seen {
    /// Events (or whole answers) that carried generated content.
    pub content_events: u64,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    /// Finish reasons, as `finish_label`s.
    pub finish: Vec<&'static str>,
    /// An error object in the stream (or as the whole answer).
    pub errors: u64,
    /// `data: [DONE]` arrived.
    pub done: bool,
}

/// The reader: SSE (`event_stream`) or one JSON answer.
#[derive(Debug)]
pub struct Reader {
    event_stream: bool,
    line: Vec<u8>,
    /// The current event's `data:` lines, joined.
    data: Vec<u8>,
    gave_up: bool,
    pub seen: Seen,
}

/// One event's (or answer's) fields that matter here; everything else is skipped.
#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    error: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    data: Option<Vec<serde::de::IgnoredAny>>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    delta: Option<Delta>,
    #[serde(default)]
    message: Option<Delta>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    reasoning_content: Option<String>,
    #[serde(default)]
    tool_calls: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
struct Usage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
}

impl Reader {
    pub fn new(event_stream: bool) -> Reader {
        Reader {
            event_stream,
            line: Vec::new(),
            data: Vec::new(),
            gave_up: false,
            seen: Seen::default(),
        }
    }

    /// Reads the next bytes; returns whether content arrived in them (the first
    /// time this is true is the first token).
    pub fn feed(&mut self, mut bytes: &[u8]) -> bool {
        let before = self.seen.content_events;
        if self.gave_up {
            return false;
        }
        if !self.event_stream {
            // A rolling tail: the answer's end, where `usage` is.
            self.line
                .extend_from_slice(&bytes[bytes.len().saturating_sub(JSON_TAIL)..]);
            let over = self.line.len().saturating_sub(JSON_TAIL);
            self.line.drain(..over);
            return false;
        }
        while let Some(nl) = memchr::memchr(b'\n', bytes) {
            let part = &bytes[..nl];
            bytes = &bytes[nl + 1..];
            if self.line.is_empty() {
                self.line_done(part);
            } else {
                self.line.extend_from_slice(part);
                let line = std::mem::take(&mut self.line);
                self.line_done(&line);
            }
            if self.gave_up {
                return self.seen.content_events > before;
            }
        }
        if self.line.len() + bytes.len() > MAX_LINE {
            self.give_up();
        } else {
            self.line.extend_from_slice(bytes);
        }
        self.seen.content_events > before
    }

    /// The answer ended: a whole JSON answer is read now.
    pub fn finish(&mut self) {
        if !self.event_stream {
            let tail = std::mem::take(&mut self.line);
            self.answer_tail(&tail);
        } else if self.event_stream && !self.data.is_empty() {
            let data = std::mem::take(&mut self.data);
            self.event(&data);
        }
    }

    fn line_done(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            let data = std::mem::take(&mut self.data);
            if !data.is_empty() {
                self.event(&data);
            }
            return;
        }
        if let Some(value) = line.strip_prefix(b"data:") {
            let value = value.strip_prefix(b" ").unwrap_or(value);
            if self.data.len() + value.len() > MAX_LINE {
                self.give_up();
                return;
            }
            if !self.data.is_empty() {
                self.data.push(b'\n');
            }
            self.data.extend_from_slice(value);
        }
        // `event:`, `id:`, `retry:` and comments say nothing about the generation.
    }

    /// Stops reading (an event too long to be a generation's), holding nothing.
    fn give_up(&mut self) {
        self.gave_up = true;
        self.line = Vec::new();
        self.data = Vec::new();
    }

    /// A whole JSON answer's last bytes: parsed whole when they are the whole answer,
    /// else searched for its `usage` object and finish reasons.
    fn answer_tail(&mut self, tail: &[u8]) {
        if serde_json::from_slice::<serde::de::IgnoredAny>(tail).is_ok() {
            return self.event(tail);
        }
        self.seen.content_events += 1;
        if let Some(at) = memchr::memmem::rfind(tail, b"\"usage\"") {
            let rest = &tail[at + 7..];
            if let Some(open) = memchr::memchr(b'{', rest) {
                let mut objects =
                    serde_json::Deserializer::from_slice(&rest[open..]).into_iter::<Usage>();
                if let Some(Ok(u)) = objects.next() {
                    self.seen.prompt_tokens = u.prompt_tokens.or(u.input_tokens);
                    self.seen.completion_tokens = u.completion_tokens.or(u.output_tokens);
                }
            }
        }
        for at in memchr::memmem::find_iter(tail, b"\"finish_reason\"") {
            let rest = &tail[at + 15..];
            let Some(q) = memchr::memchr(b'"', rest) else {
                continue;
            };
            let value = &rest[q + 1..];
            if let Some(end) = memchr::memchr(b'"', value) {
                self.seen.finish.push(finish_label(
                    std::str::from_utf8(&value[..end]).unwrap_or(""),
                ));
            }
        }
    }

    fn event(&mut self, data: &[u8]) {
        if data == b"[DONE]" {
            self.seen.done = true;
            return;
        }
        let Ok(chunk) = serde_json::from_slice::<Chunk>(data) else {
            return;
        };
        if chunk.error.is_some() {
            self.seen.errors += 1;
        }
        let mut content = chunk.data.as_ref().is_some_and(|d| !d.is_empty());
        for c in &chunk.choices {
            let delta = c.delta.as_ref().or(c.message.as_ref());
            content |= delta.is_some_and(|d| {
                d.content.as_deref().is_some_and(|t| !t.is_empty())
                    || d.reasoning_content
                        .as_deref()
                        .is_some_and(|t| !t.is_empty())
                    || d.tool_calls.is_some()
            });
            content |= c.text.as_deref().is_some_and(|t| !t.is_empty());
            if let Some(r) = &c.finish_reason {
                self.seen.finish.push(finish_label(r));
            }
        }
        if content {
            self.seen.content_events += 1;
        }
        if let Some(u) = chunk.usage {
            self.seen.prompt_tokens = u
                .prompt_tokens
                .or(u.input_tokens)
                .or(self.seen.prompt_tokens);
            self.seen.completion_tokens = u
                .completion_tokens
                .or(u.output_tokens)
                .or(self.seen.completion_tokens);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = concat!(
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\"}}]}\n\n",
        ": a comment\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hel\"}}]}\r\n\r\n",
        "event: message\ndata: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo\"},\"finish_reason\":\"length\"}]}\n\n",
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2,\"total_tokens\":9}}\n\n",
        "data: [DONE]\n\n",
    );

    fn want() -> Seen {
        Seen {
            content_events: 2,
            prompt_tokens: Some(7),
            completion_tokens: Some(2),
            finish: vec!["length"],
            errors: 0,
            done: true,
        }
    }

    #[test]
    fn a_stream_split_at_every_byte_reads_the_same() {
        let bytes = STREAM.as_bytes();
        for cut in 0..bytes.len() {
            let mut r = Reader::new(true);
            let first = r.feed(&bytes[..cut]);
            let second = r.feed(&bytes[cut..]);
            r.finish();
            assert_eq!(r.seen, want(), "cut at {cut}");
            // The first content is noticed in the read that completes its event.
            let hel = STREAM.find("\"Hel\"").unwrap();
            // The blank line's newline, which completes the event.
            let event_end = hel + STREAM[hel..].find("\r\n\r\n").unwrap() + 3;
            assert_eq!(first, cut > event_end, "cut at {cut}");
            assert!(first || second);
        }
    }

    #[test]
    fn whole_answers_errors_and_cut_streams() {
        let mut r = Reader::new(false);
        r.feed(br#"{"choices":[{"message":{"content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1}}"#);
        r.finish();
        assert_eq!(
            (
                r.seen.content_events,
                r.seen.prompt_tokens,
                r.seen.completion_tokens,
                r.seen.finish.clone()
            ),
            (1, Some(3), Some(1), vec!["stop"])
        );
        let mut r = Reader::new(true);
        r.feed(b"data: {\"error\":{\"message\":\"overloaded\"}}\n\n");
        assert_eq!(r.seen.errors, 1);
        // Cut mid-event: what arrived whole is counted, the rest is not invented.
        let mut r = Reader::new(true);
        r.feed(b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: {\"choi");
        r.finish();
        assert_eq!((r.seen.content_events, r.seen.done), (1, false));
        // A large answer: only its tail is kept, and its usage found there.
        let mut r = Reader::new(false);
        let filler = "x".repeat(100_000);
        r.feed(
            format!(
                r#"{{"choices":[{{"message":{{"content":"{filler}"}},"finish_reason":"length"}}],"#
            )
            .as_bytes(),
        );
        r.feed(br#""usage":{"prompt_tokens":11,"completion_tokens":4096}}"#);
        assert!(r.line.len() <= JSON_TAIL);
        r.finish();
        assert_eq!(
            (
                r.seen.prompt_tokens,
                r.seen.completion_tokens,
                r.seen.finish.clone()
            ),
            (Some(11), Some(4096), vec!["length"])
        );
        // Embeddings: data is the content.
        let mut r = Reader::new(false);
        r.feed(br#"{"object":"list","data":[{"embedding":[0.1]}],"usage":{"prompt_tokens":2,"total_tokens":2}}"#);
        r.finish();
        assert_eq!((r.seen.content_events, r.seen.prompt_tokens), (1, Some(2)));
        assert_eq!(finish_label("something new"), "other");
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(chunks in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..64), 0..8)) {
            let mut r = Reader::new(true);
            for c in &chunks { r.feed(c); }
            r.finish();
        }
    }
}
