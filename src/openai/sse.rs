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

use bytes::Bytes;
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

/// Where SSE lines end: at CR LF, LF or CR alone, as the standard allows (a CR at the
/// end of one read may have its LF at the start of the next: one line end, not two).
#[derive(Debug, Default, Clone, Copy)]
struct LineEnds {
    /// The last line ended with a CR that was the last byte seen.
    after_cr: bool,
}

impl LineEnds {
    /// `bytes` less an LF that completes the CR ending the last line.
    fn skip_lf<'b>(&mut self, bytes: &'b [u8]) -> &'b [u8] {
        if bytes.is_empty() {
            return bytes;
        }
        match std::mem::take(&mut self.after_cr) {
            true if bytes[0] == b'\n' => &bytes[1..],
            _ => bytes,
        }
    }

    /// The first line end in `bytes` (which `skip_lf` has seen): where the line's text
    /// ends and where the next line starts.
    fn next_end(&mut self, bytes: &[u8]) -> Option<(usize, usize)> {
        let at = memchr::memchr2(b'\r', b'\n', bytes)?;
        let mut next = at + 1;
        if bytes[at] == b'\r' {
            match bytes.get(next) {
                Some(b'\n') => next += 1,
                Some(_) => {}
                None => self.after_cr = true,
            }
        }
        Some((at, next))
    }
}

/// Where events end: past the line end of an empty line. Fed every byte once, in
/// order, across reads (the state is where the last read left off).
#[derive(Debug, Clone, Copy)]
struct EventEnds {
    lines: LineEnds,
    /// No byte of the current line has been seen yet.
    at_line_start: bool,
    /// The last event ended at a CR that was the last byte seen: an LF next is its own
    /// (so it is passed on with that event, not held as the start of the next one).
    ended_at_cr: bool,
}

impl Default for EventEnds {
    fn default() -> EventEnds {
        EventEnds {
            lines: LineEnds::default(),
            at_line_start: true,
            ended_at_cr: false,
        }
    }
}

impl EventEnds {
    /// The end of the first event that ends in `bytes`, the state moved to it; or
    /// `None`, the state moved past all of `bytes`.
    fn first(&mut self, bytes: &[u8]) -> Option<usize> {
        if bytes.is_empty() {
            return None;
        }
        let ended_at_cr = std::mem::take(&mut self.ended_at_cr);
        let mut from = bytes.len() - self.lines.skip_lf(bytes).len();
        if from == 1 && ended_at_cr {
            return Some(1);
        }
        while let Some((at, next)) = self.lines.next_end(&bytes[from..]) {
            let empty = self.at_line_start && at == 0;
            self.at_line_start = true;
            from += next;
            if empty {
                self.ended_at_cr = self.lines.after_cr;
                return Some(from);
            }
        }
        if from < bytes.len() {
            self.at_line_start = false;
        }
        None
    }

    /// The end of the last event that ends in `bytes`; the state moved past all of it.
    fn last(&mut self, bytes: &[u8]) -> Option<usize> {
        let mut last = None;
        let mut from = 0;
        while let Some(end) = self.first(&bytes[from..]) {
            from += end;
            last = Some(from);
        }
        last
    }
}

/// The reader: SSE (`event_stream`) or one JSON answer.
#[derive(Debug)]
pub struct Reader {
    event_stream: bool,
    lines: LineEnds,
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
            lines: LineEnds::default(),
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
        loop {
            bytes = self.lines.skip_lf(bytes);
            let Some((at, next)) = self.lines.next_end(bytes) else {
                break;
            };
            let part = &bytes[..at];
            bytes = &bytes[next..];
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

/// Holds a stream back to the end of its last whole event, so that events are passed
/// on whole (and one can be left out, or an error event added at a clean boundary).
/// Lines may end in CR LF, LF or CR alone. What it holds is at most one event; one
/// longer than `MAX_LINE` turns it into a plain pipe for the rest of the stream.
#[derive(Debug, Default)]
pub struct Framer {
    /// Bytes after the last event's end, not yet passed on.
    pending: Vec<u8>,
    /// Where events end, over every byte pushed.
    ends: EventEnds,
    raw: bool,
}

impl Framer {
    /// The bytes up to the end of the last whole event now in hand; `None` when no
    /// event ended yet (the bytes are held).
    pub fn push(&mut self, bytes: Bytes) -> Option<Bytes> {
        if self.raw {
            return Some(bytes);
        }
        // Only the new bytes are scanned: the state carries where the held ones ended.
        let end = self.ends.last(&bytes);
        if self.pending.is_empty() {
            // Most reads are whole events: passed on as they are, with no copy.
            match end {
                Some(end) if end == bytes.len() => return Some(bytes),
                Some(end) => {
                    self.pending.extend_from_slice(&bytes[end..]);
                    return Some(bytes.slice(..end));
                }
                None => {}
            }
        } else if let Some(end) = end {
            let held = std::mem::take(&mut self.pending);
            let mut out = Vec::with_capacity(held.len() + end);
            out.extend_from_slice(&held);
            out.extend_from_slice(&bytes[..end]);
            self.pending.extend_from_slice(&bytes[end..]);
            return Some(Bytes::from(out));
        }
        self.pending.extend_from_slice(&bytes);
        if self.pending.len() > MAX_LINE {
            self.raw = true;
            return Some(Bytes::from(std::mem::take(&mut self.pending)));
        }
        None
    }

    /// The stream broke: the part of an event held back (never sent) is dropped.
    /// Whether what was passed on ends at an event's end, so that an error event can
    /// follow it (false once the framer became a pipe).
    pub fn broken(&mut self) -> bool {
        self.pending = Vec::new();
        !self.raw
    }

    /// Whether what was passed on so far ends at an event's end and nothing is held.
    pub fn at_boundary(&self) -> bool {
        !self.raw && self.pending.is_empty()
    }

    /// What is held when the stream ends (a last event with no blank line after it).
    pub fn rest(&mut self) -> Option<Bytes> {
        (!self.pending.is_empty()).then(|| Bytes::from(std::mem::take(&mut self.pending)))
    }
}

/// The events without what braid's own `include_usage` added: the usage chunk (empty
/// `choices`, a `usage` object) left out, and `"usage": null` cut from the others.
/// `None` when there is nothing to take out (the bytes pass as they are).
pub fn without_usage(events: &[u8]) -> Option<Bytes> {
    memchr::memmem::find(events, b"\"usage\"")?;
    let mut out = Vec::with_capacity(events.len());
    let mut changed = false;
    let mut at = 0;
    let mut ends = EventEnds::default();
    while at < events.len() {
        let end = ends.first(&events[at..]).map_or(events.len(), |e| at + e);
        let event = &events[at..end];
        at = end;
        match usage_edit(event) {
            None => out.extend_from_slice(event),
            Some(edited) => {
                changed = true;
                out.extend_from_slice(&edited);
            }
        }
    }
    changed.then(|| Bytes::from(out))
}

/// One event as the client gets it: nothing (the usage chunk), or without its
/// `"usage": null`; `None` to keep it as it is.
fn usage_edit(event: &[u8]) -> Option<Vec<u8>> {
    memchr::memmem::find(event, b"\"usage\"")?;
    // An OpenAI chunk is one `data:` line.
    let start = memchr::memmem::find(event, b"data:")?;
    let line_end =
        memchr::memchr2(b'\r', b'\n', &event[start..]).map_or(event.len(), |i| start + i);
    let mut data = start + 5..line_end;
    if event.get(data.start) == Some(&b' ') {
        data.start += 1;
    }
    let json = &event[data.clone()];
    #[derive(Deserialize)]
    struct UsageChunk {
        choices: Vec<serde::de::IgnoredAny>,
        #[serde(default)]
        usage: Option<serde::de::IgnoredAny>,
    }
    let chunk: UsageChunk = serde_json::from_slice(json).ok()?;
    if chunk.usage.is_some() {
        return chunk.choices.is_empty().then(Vec::new);
    }
    let member = super::member_span(json, b"usage")?;
    let mut out = Vec::with_capacity(event.len());
    out.extend_from_slice(&event[..data.start + member.start]);
    out.extend_from_slice(&event[data.start + member.end..]);
    Some(out)
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
            // The blank line's CR completes the event (a CR alone ends a line).
            let event_end = hel + STREAM[hel..].find("\r\n\r\n").unwrap() + 2;
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

    #[test]
    fn events_pass_whole_however_the_reads_split_them() {
        let bytes = STREAM.as_bytes();
        for cut in 0..bytes.len() {
            for cut2 in cut..bytes.len() {
                let mut f = Framer::default();
                let mut out = Vec::new();
                for part in [&bytes[..cut], &bytes[cut..cut2], &bytes[cut2..]] {
                    if let Some(b) = f.push(Bytes::copy_from_slice(part)) {
                        // Each piece ends an event (the LF of a CR LF may follow).
                        assert!(
                            b.ends_with(b"\n\n")
                                || b.ends_with(b"\n\r\n")
                                || b.ends_with(b"\r\n\r")
                                || b[..] == *b"\n",
                            "{cut} {cut2}"
                        );
                        out.extend_from_slice(&b);
                    }
                }
                assert!(f.at_boundary());
                assert_eq!(f.rest(), None);
                assert_eq!(out, bytes);
            }
        }
        // A last event with no blank line is held until the end.
        let mut f = Framer::default();
        assert_eq!(
            f.push(Bytes::from_static(b"data: 1\n\ndata: 2")).unwrap(),
            &b"data: 1\n\n"[..]
        );
        assert!(!f.at_boundary());
        assert_eq!(f.rest().unwrap(), &b"data: 2"[..]);
        // An event longer than MAX_LINE turns the framer into a pipe.
        let mut f = Framer::default();
        let big = vec![b'x'; MAX_LINE + 1];
        assert_eq!(f.push(Bytes::from(big)).unwrap().len(), MAX_LINE + 1);
        assert_eq!(f.push(Bytes::from_static(b"y")).unwrap(), &b"y"[..]);
    }

    /// STREAM with every line end written as `end`.
    fn with_line_ends(end: &str) -> String {
        STREAM.replace("\r\n", "\n").replace('\n', end)
    }

    #[test]
    fn cr_lf_and_crlf_line_ends_read_and_frame_alike_at_every_cut() {
        for end in ["\r", "\n", "\r\n"] {
            let text = with_line_ends(end);
            let bytes = text.as_bytes();
            let events = |b: &[u8]| {
                let mut ends = EventEnds::default();
                let mut out = Vec::new();
                let mut at = 0;
                while let Some(e) = ends.first(&b[at..]) {
                    out.push(at + e);
                    at += e;
                }
                out
            };
            let whole = events(bytes);
            assert_eq!(whole.len(), 5, "{end:?}");
            for cut in 0..bytes.len() {
                let mut r = Reader::new(true);
                r.feed(&bytes[..cut]);
                r.feed(&bytes[cut..]);
                r.finish();
                assert_eq!(r.seen, want(), "{end:?} cut at {cut}");
                let mut f = Framer::default();
                let mut out = Vec::new();
                let mut pieces = 0;
                for part in [&bytes[..cut], &bytes[cut..]] {
                    if let Some(b) = f.push(Bytes::copy_from_slice(part)) {
                        out.extend_from_slice(&b);
                        pieces += 1;
                        // Every piece passed on ends where an event ends (or at the
                        // CR of its CR LF, which ends it as well).
                        let n = out.len();
                        assert!(
                            whole.contains(&n)
                                || (out.ends_with(b"\r") && whole.contains(&(n + 1))),
                            "{end:?} cut at {cut}"
                        );
                    }
                }
                assert!(pieces >= 1 && f.at_boundary(), "{end:?} cut at {cut}");
                assert_eq!(out, bytes, "{end:?} cut at {cut}");
            }
        }
        // A CR LF split across reads is one line end, not an empty line.
        let mut ends = EventEnds::default();
        assert_eq!(ends.first(b"data: 1\r"), None);
        assert_eq!(ends.first(b"\ndata: 2\r\n"), None);
        assert_eq!(ends.first(b"\r\n"), Some(2));
    }

    #[test]
    fn a_stream_broken_mid_event_drops_the_held_part() {
        let text = with_line_ends("\n");
        let bytes = text.as_bytes();
        for cut in 0..bytes.len() {
            let mut f = Framer::default();
            let sent = f.push(Bytes::copy_from_slice(&bytes[..cut]));
            let sent = sent.map_or(0, |b| b.len());
            // What was sent ends an event (or is nothing); the rest was held, and goes.
            assert!(f.broken(), "cut at {cut}");
            assert!(
                sent == 0 || bytes[..sent].ends_with(b"\n\n"),
                "cut at {cut}"
            );
            assert_eq!(f.rest(), None);
        }
        // A pipe (an event past MAX_LINE) cannot take an error event at a boundary.
        let mut f = Framer::default();
        f.push(Bytes::from(vec![b'x'; MAX_LINE + 1]));
        assert!(!f.broken());
    }

    #[test]
    fn the_usage_braid_asked_for_is_taken_out() {
        let asked = concat!(
            "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n",
            "data: {\"id\":\"c\", \"usage\": null, \"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\r\n\r\n",
            "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}}\n\n",
            "data: [DONE]\n\n",
        );
        let plain = concat!(
            "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n",
            "data: {\"id\":\"c\", \"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\r\n\r\n",
            "data: [DONE]\n\n",
        );
        assert_eq!(
            String::from_utf8(without_usage(asked.as_bytes()).unwrap().to_vec()).unwrap(),
            plain
        );
        // The same with CR-only line ends.
        let cr = |t: &str| t.replace("\r\n", "\n").replace('\n', "\r");
        assert_eq!(
            String::from_utf8(without_usage(cr(asked).as_bytes()).unwrap().to_vec()).unwrap(),
            cr(plain)
        );
        // Nothing to take out: no copy.
        assert_eq!(without_usage(plain.as_bytes()), None);
        assert_eq!(without_usage(b"data: {\"content\":\"usage\"}\n\n"), None);
    }

    proptest::proptest! {
        #[test]
        fn framing_and_stripping_arbitrary_bytes_never_panic(chunks in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..64), 0..8)) {
            let mut f = Framer::default();
            for c in &chunks {
                if let Some(b) = f.push(Bytes::copy_from_slice(c)) {
                    let _ = without_usage(&b);
                }
            }
            let _ = f.rest();
        }

        #[test]
        fn arbitrary_bytes_never_panic(chunks in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..64), 0..8)) {
            let mut r = Reader::new(true);
            for c in &chunks { r.feed(c); }
            r.finish();
        }
    }
}
