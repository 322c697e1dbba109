//! Serving a GGUF language model: continuous batching over a quantized decoder,
//! answered over OpenAI's completions and chat completions.
//!
//! - `gguf`      the file opened and checked: architecture, shape, truncation
//! - `spm`       the SentencePiece tokenizer from the GGUF's metadata
//! - `gemma`     Gemma 3's decoder over a step of many sequences, per-sequence KV caches
//! - `requant`   Q5_0 weights widened to Q8_0 at load (the same numbers, a SIMD kernel)
//! - `schedule`  the continuous-batching scheduler, plain state
//! - `sample`    greedy, temperature, top-k, top-p; log-probabilities
//! - `engine`    the generation loop on its own thread
//! - `chat`      messages to a prompt (the GGUF's Jinja template, or a transcript)
//! - `api`       the OpenAI wire: requests parsed, answers and SSE chunks written
//! - `testkit`   tiny random Gemma 3 GGUFs for tests

pub mod api;
pub mod chat;
pub mod engine;
pub mod gemma;
pub mod gguf;
pub mod requant;
pub mod sample;
pub mod schedule;
pub mod spm;
#[doc(hidden)]
pub mod testkit;

use std::path::Path;

use candle_core::Device;

/// A loaded LLM: tokenizer, decoder, chat template.
pub struct LlmModel {
    pub name: String,
    pub vocab: spm::Vocab,
    pub gemma: gemma::Gemma,
    pub template: chat::Template,
}

impl LlmModel {
    /// Loads `path`; `max_positions` caps the context served (the KV budget's size).
    pub fn load(
        name: &str,
        path: &Path,
        max_positions: usize,
        device: &Device,
    ) -> Result<LlmModel, String> {
        let mut g = gguf::Gguf::open(path).map_err(|e| e.to_string())?;
        let vocab = spm::from_metadata(&g.content.metadata)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if vocab.len() != g.config.vocab {
            return Err(format!(
                "{}: {} tokens but a vocabulary of {}",
                path.display(),
                vocab.len(),
                g.config.vocab
            ));
        }
        let template = match g.meta("tokenizer.chat_template") {
            Some(candle_core::quantized::gguf_file::Value::String(s)) => Some(s.clone()),
            _ => None,
        };
        let template =
            chat::Template::new(template).map_err(|e| format!("{}: {e}", path.display()))?;
        let gemma = gemma::Gemma::load(&mut g, max_positions, device)
            .map_err(|e| format!("{}: loading weights: {e}", path.display()))?;
        Ok(LlmModel {
            name: name.to_string(),
            vocab,
            gemma,
            template,
        })
    }

    /// The longest sequence (prompt plus generated tokens) this model serves.
    pub fn max_len(&self) -> usize {
        self.gemma.max_positions
    }
}
