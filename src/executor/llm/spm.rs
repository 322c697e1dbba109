//! A SentencePiece-style tokenizer built from a GGUF's `tokenizer.ggml.*` metadata
//! (model `llama`): the pieces, their scores and types, byte fallback, and the BOS
//! token as the metadata says. It follows llama.cpp's reading of such a vocabulary:
//!
//! - control tokens (`<start_of_turn>`, ...) written in the text are those tokens,
//!   and user-defined ones always are; the rest of the text is split around them;
//! - in each piece of text, spaces become `▁` (and, with `add_space_prefix`, one is
//!   put in front); characters start as symbols, and the adjacent pair whose joined
//!   text is in the vocabulary with the highest score is merged, the leftmost pair on a
//!   tie, until none is;
//! - a symbol that is not in the vocabulary is written as its UTF-8 bytes (`<0xAB>`
//!   tokens), or the unknown token when there are none.
//!
//! Decoding is the reverse, with bytes joined back into characters: [`Detokenizer`]
//! holds back a character's first bytes until the rest arrive, so a stream never
//! sends half of one.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use candle_core::quantized::gguf_file::Value;

/// What a vocabulary entry is (`tokenizer.ggml.token_type`, SentencePiece's types).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl Kind {
    fn from_code(code: i64) -> Kind {
        match code {
            2 => Kind::Unknown,
            3 => Kind::Control,
            4 => Kind::UserDefined,
            5 => Kind::Unused,
            6 => Kind::Byte,
            _ => Kind::Normal,
        }
    }
}

pub struct Vocab {
    pieces: Vec<String>,
    scores: Vec<f32>,
    kinds: Vec<Kind>,
    ids: HashMap<String, u32>,
    /// Tokens matched as a whole in text, by their first byte, longest first.
    specials: HashMap<u8, Vec<u32>>,
    bytes: [Option<u32>; 256],
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub unk: Option<u32>,
    pub add_bos: bool,
    add_space_prefix: bool,
    /// Tokens that end a generation: EOS, and the end-of-turn token where there is one.
    pub stops: Vec<u32>,
}

/// The `tokenizer.ggml.*` keys braid reads, from a GGUF's metadata.
pub fn from_metadata(meta: &HashMap<String, Value>) -> Result<Vocab, String> {
    let model = match meta.get("tokenizer.ggml.model") {
        Some(Value::String(s)) => s.as_str(),
        _ => return Err("no tokenizer.ggml.model in its metadata".into()),
    };
    if model != "llama" {
        return Err(format!(
            "tokenizer model {model:?} is not one braid reads (it reads SentencePiece, \"llama\")"
        ));
    }
    let array = |key: &str| match meta.get(key) {
        Some(Value::Array(a)) => Ok(a),
        _ => Err(format!("no {key} array in its metadata")),
    };
    let pieces: Vec<String> = array("tokenizer.ggml.tokens")?
        .iter()
        .map(|v| {
            v.to_string()
                .cloned()
                .map_err(|e| format!("tokenizer.ggml.tokens: {e}"))
        })
        .collect::<Result<_, _>>()?;
    let n = pieces.len();
    let scores: Vec<f32> = match meta.get("tokenizer.ggml.scores") {
        Some(Value::Array(a)) => a.iter().map(|v| v.to_f32().unwrap_or(0.0)).collect(),
        _ => vec![0.0; n],
    };
    let kinds: Vec<Kind> = match meta.get("tokenizer.ggml.token_type") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| Kind::from_code(v.to_i32().map(i64::from).unwrap_or(1)))
            .collect(),
        _ => vec![Kind::Normal; n],
    };
    if scores.len() != n || kinds.len() != n {
        return Err(format!(
            "tokenizer metadata disagrees: {n} tokens, {} scores, {} types",
            scores.len(),
            kinds.len()
        ));
    }
    let id = |key: &str| -> Option<u32> {
        meta.get(key)
            .and_then(|v| v.to_u32().ok())
            .filter(|&i| (i as usize) < n)
    };
    let flag = |key: &str, default: bool| {
        meta.get(key)
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(default)
    };
    Ok(Vocab::new(
        pieces,
        scores,
        kinds,
        Ids {
            bos: id("tokenizer.ggml.bos_token_id"),
            eos: id("tokenizer.ggml.eos_token_id"),
            unk: id("tokenizer.ggml.unknown_token_id"),
            eot: id("tokenizer.ggml.eot_token_id"),
        },
        flag("tokenizer.ggml.add_bos_token", true),
        flag("tokenizer.ggml.add_space_prefix", true),
    ))
}

pub struct Ids {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub unk: Option<u32>,
    pub eot: Option<u32>,
}

/// One symbol of the merge: a span of the text, linked to its neighbours.
#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// A candidate merge of symbols `left` and its next, of joined length `len`.
struct Bigram {
    left: usize,
    len: usize,
    score: f32,
}

impl PartialEq for Bigram {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Bigram {
    /// Highest score first; on a tie, the leftmost.
    fn cmp(&self, o: &Self) -> Ordering {
        self.score
            .total_cmp(&o.score)
            .then_with(|| o.left.cmp(&self.left))
    }
}

impl Vocab {
    pub fn new(
        pieces: Vec<String>,
        scores: Vec<f32>,
        kinds: Vec<Kind>,
        ids: Ids,
        add_bos: bool,
        add_space_prefix: bool,
    ) -> Vocab {
        let mut map = HashMap::with_capacity(pieces.len());
        let mut bytes = [None; 256];
        let mut specials: HashMap<u8, Vec<u32>> = HashMap::new();
        for (i, p) in pieces.iter().enumerate() {
            let i = i as u32;
            // The first of two equal pieces wins, as in llama.cpp.
            map.entry(p.clone()).or_insert(i);
            match kinds[i as usize] {
                Kind::Byte => {
                    if let Some(b) = parse_byte(p) {
                        bytes[b as usize].get_or_insert(i);
                    }
                }
                Kind::Control | Kind::UserDefined if !p.is_empty() => {
                    specials.entry(p.as_bytes()[0]).or_default().push(i);
                }
                _ => {}
            }
        }
        for list in specials.values_mut() {
            list.sort_by_key(|&i| std::cmp::Reverse(pieces[i as usize].len()));
        }
        let mut stops: Vec<u32> = ids.eos.into_iter().chain(ids.eot).collect();
        if let Some(&t) = map.get("<end_of_turn>") {
            stops.push(t);
        }
        stops.sort_unstable();
        stops.dedup();
        Vocab {
            pieces,
            scores,
            kinds,
            ids: map,
            specials,
            bytes,
            bos: ids.bos,
            eos: ids.eos,
            unk: ids.unk,
            add_bos,
            add_space_prefix,
            stops,
        }
    }

    pub fn len(&self) -> usize {
        self.pieces.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    pub fn piece(&self, id: u32) -> Option<&str> {
        self.pieces.get(id as usize).map(String::as_str)
    }

    pub fn id(&self, piece: &str) -> Option<u32> {
        self.ids.get(piece).copied()
    }

    /// A prompt's tokens: BOS first when the vocabulary asks for it, control tokens
    /// written in the text read as themselves (as llama.cpp's and vLLM's servers do).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if self.add_bos
            && let Some(b) = self.bos
        {
            out.push(b);
        }
        self.encode_into(text, &mut out);
        out
    }

    /// `text`'s tokens with no BOS.
    pub fn encode_into(&self, text: &str, out: &mut Vec<u32>) {
        let bytes = text.as_bytes();
        let mut plain_start = 0;
        let mut i = 0;
        let mut first = true;
        while i < bytes.len() {
            let hit = self.specials.get(&bytes[i]).and_then(|list| {
                list.iter()
                    .copied()
                    .find(|&t| bytes[i..].starts_with(self.pieces[t as usize].as_bytes()))
            });
            match hit {
                Some(t) => {
                    if plain_start < i {
                        self.encode_plain(&text[plain_start..i], first, out);
                    }
                    first = false;
                    out.push(t);
                    i += self.pieces[t as usize].len();
                    plain_start = i;
                }
                None => i += 1,
            }
        }
        if plain_start < bytes.len() {
            self.encode_plain(&text[plain_start..], first, out);
        }
    }

    /// The merge over one run of text with no special tokens in it.
    fn encode_plain(&self, text: &str, first: bool, out: &mut Vec<u32>) {
        let mut s = String::with_capacity(text.len() + 3);
        if self.add_space_prefix && first {
            s.push('▁');
        }
        for c in text.chars() {
            if c == ' ' { s.push('▁') } else { s.push(c) }
        }
        let mut symbols: Vec<Symbol> = Vec::with_capacity(s.len());
        for (start, c) in s.char_indices() {
            let n = symbols.len();
            symbols.push(Symbol {
                start,
                len: c.len_utf8(),
                prev: n.checked_sub(1),
                next: None,
            });
            if n > 0 {
                symbols[n - 1].next = Some(n);
            }
        }
        let mut heap = BinaryHeap::new();
        for i in 1..symbols.len() {
            self.push_bigram(&s, &symbols, i - 1, &mut heap);
        }
        while let Some(b) = heap.pop() {
            let left = symbols[b.left];
            let Some(right_i) = left.next else { continue };
            let right = symbols[right_i];
            // Stale: one side merged since this pair was scored.
            if left.len == 0 || right.len == 0 || left.len + right.len != b.len {
                continue;
            }
            symbols[b.left].len += right.len;
            symbols[b.left].next = right.next;
            symbols[right_i].len = 0;
            if let Some(n) = right.next {
                symbols[n].prev = Some(b.left);
            }
            if let Some(p) = left.prev {
                self.push_bigram(&s, &symbols, p, &mut heap);
            }
            self.push_bigram(&s, &symbols, b.left, &mut heap);
        }
        let mut at = if symbols.is_empty() { None } else { Some(0) };
        while let Some(i) = at {
            let sym = symbols[i];
            let piece = &s[sym.start..sym.start + sym.len];
            match self.ids.get(piece) {
                Some(&t) => out.push(t),
                None => {
                    for b in piece.bytes() {
                        if let Some(t) = self.bytes[b as usize].or(self.unk) {
                            out.push(t);
                        }
                    }
                }
            }
            at = sym.next;
        }
    }

    fn push_bigram(&self, s: &str, symbols: &[Symbol], left: usize, heap: &mut BinaryHeap<Bigram>) {
        let l = symbols[left];
        let Some(r) = l.next.map(|n| symbols[n]) else {
            return;
        };
        let joined = &s[l.start..r.start + r.len];
        if let Some(&t) = self.ids.get(joined) {
            heap.push(Bigram {
                left,
                len: l.len + r.len,
                score: self.scores[t as usize],
            });
        }
    }

    /// The bytes a token stands for in generated text: control tokens stand for
    /// nothing, byte tokens for their byte, `▁` for a space.
    pub fn token_bytes(&self, id: u32, out: &mut Vec<u8>) {
        let Some(p) = self.pieces.get(id as usize) else {
            return;
        };
        match self.kinds[id as usize] {
            Kind::Control | Kind::Unused => {}
            Kind::Byte => match parse_byte(p) {
                Some(b) => out.push(b),
                None => out.extend_from_slice(p.as_bytes()),
            },
            _ => {
                for c in p.chars() {
                    if c == '▁' {
                        out.push(b' ');
                    } else {
                        let mut buf = [0; 4];
                        out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                    }
                }
            }
        }
    }

    /// Tokens back to text (a byte sequence that is not UTF-8 becomes U+FFFD).
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for &t in ids {
            self.token_bytes(t, &mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    pub fn is_control(&self, id: u32) -> bool {
        matches!(self.kinds.get(id as usize), Some(Kind::Control))
    }
}

fn parse_byte(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// Text from a stream of tokens, a whole character at a time.
#[derive(Default)]
pub struct Detokenizer {
    pending: Vec<u8>,
}

impl Detokenizer {
    /// The text `id` completes (empty while a character's bytes are still arriving).
    pub fn push(&mut self, vocab: &Vocab, id: u32) -> String {
        vocab.token_bytes(id, &mut self.pending);
        self.take(false)
    }

    /// What is left at the end of the stream (an unfinished character as U+FFFD).
    pub fn finish(&mut self) -> String {
        self.take(true)
    }

    fn take(&mut self, all: bool) -> String {
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(_) => self.pending.len(),
            Err(e) => match e.error_len() {
                // An invalid sequence in the middle: everything is written out (lossily).
                Some(_) => self.pending.len(),
                // An unfinished character at the end: keep it back, unless finishing.
                None if all => self.pending.len(),
                None => e.valid_up_to(),
            },
        };
        let text = String::from_utf8_lossy(&self.pending[..valid]).into_owned();
        self.pending.drain(..valid);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small vocabulary: bytes, a few merges with scores, a control token.
    pub fn toy() -> Vocab {
        let mut pieces: Vec<String> = vec![
            "<pad>".into(),
            "<eos>".into(),
            "<bos>".into(),
            "<unk>".into(),
        ];
        let mut kinds = vec![Kind::Control, Kind::Control, Kind::Control, Kind::Unknown];
        let mut scores = vec![0.0; 4];
        for b in 0..=255u8 {
            pieces.push(format!("<0x{b:02X}>"));
            kinds.push(Kind::Byte);
            scores.push(0.0);
        }
        for (p, s) in [
            ("▁", -1.0),
            ("h", -2.0),
            ("e", -2.0),
            ("l", -2.0),
            ("o", -2.0),
            ("w", -2.0),
            ("r", -2.0),
            ("d", -2.0),
            ("he", -3.0),
            ("ll", -3.5),
            ("hell", -4.0),
            ("hello", -5.0),
            ("▁w", -3.0),
            ("or", -3.2),
            ("▁wor", -6.0),
            ("▁world", -7.0),
            ("ld", -3.1),
            ("▁▁", -2.5),
        ] {
            pieces.push(p.into());
            kinds.push(Kind::Normal);
            scores.push(s);
        }
        pieces.push("<start_of_turn>".into());
        kinds.push(Kind::Control);
        scores.push(0.0);
        Vocab::new(
            pieces,
            scores,
            kinds,
            Ids {
                bos: Some(2),
                eos: Some(1),
                unk: Some(3),
                eot: None,
            },
            true,
            false,
        )
    }

    fn pieces(v: &Vocab, ids: &[u32]) -> Vec<String> {
        ids.iter()
            .map(|&i| v.piece(i).unwrap().to_string())
            .collect()
    }

    #[test]
    fn merges_by_score_and_falls_back_to_bytes() {
        let v = toy();
        let ids = v.encode("hello world");
        assert_eq!(pieces(&v, &ids), ["<bos>", "hello", "▁world"]);
        // 'x' is not in the vocabulary: its byte; 'é' two bytes.
        let ids = v.encode("hex é");
        assert_eq!(
            pieces(&v, &ids),
            ["<bos>", "he", "<0x78>", "▁", "<0xC3>", "<0xA9>"]
        );
        assert_eq!(v.decode(&ids), "hex é");
    }

    #[test]
    fn control_tokens_in_text_and_space_runs() {
        let v = toy();
        let ids = v.encode("<start_of_turn>he  w");
        assert_eq!(
            pieces(&v, &ids),
            ["<bos>", "<start_of_turn>", "he", "▁▁", "w"]
        );
        // Control tokens decode to nothing.
        assert_eq!(v.decode(&ids), "he  w");
    }

    #[test]
    fn detokenizer_holds_back_half_a_character() {
        let v = toy();
        let ids = v.encode("é!");
        let mut d = Detokenizer::default();
        let out: Vec<String> = ids[1..].iter().map(|&t| d.push(&v, t)).collect();
        assert_eq!(out, ["", "é", "!"]);
        // A cut character at the end is written as U+FFFD, not lost silently.
        let mut d = Detokenizer::default();
        assert_eq!(d.push(&v, ids[1]), "");
        assert_eq!(d.finish(), "\u{FFFD}");
    }
}
