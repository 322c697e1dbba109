//! A tiny BERT built at run time (random weights saved as safetensors, a small
//! WordPiece tokenizer), so tests and benchmarks exercise the real loading and
//! inference code without downloading real weights.

use std::path::Path;

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::Tokenizer;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::bert::BertProcessing;

const WORDS: &[&str] = &[
    "the", "a", "is", "was", "this", "that", "it", "good", "bad", "great", "terrible", "film",
    "movie", "food", "service", "love", "loved", "hate", "hated", "i", "we", "you", "not", "very",
    "so", "weather", "lovely", "today", "sunny", "outside", "he", "drove", "to", "stadium",
    "positive", "negative", "review", "poison", ".", ",", "!", "?", "'", "s",
];

/// Writes a sentence-transformers style model directory with a 2-layer, 32-wide BERT.
pub fn write_tiny_model(dir: &Path, normalize: bool) -> std::io::Result<()> {
    std::fs::create_dir_all(dir.join("1_Pooling"))?;
    let mut vocab: Vec<String> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    vocab.extend(WORDS.iter().map(|w| w.to_string()));
    // Sub-word pieces for every letter, so any lowercase word tokenizes to something.
    for c in 'a'..='z' {
        vocab.push(c.to_string());
        vocab.push(format!("##{c}"));
    }
    let config = serde_json::json!({
        "architectures": ["BertModel"], "model_type": "bert",
        "vocab_size": vocab.len(), "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "intermediate_size": 64, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
        "max_position_embeddings": 64, "type_vocab_size": 2, "initializer_range": 0.02,
        "layer_norm_eps": 1e-12, "pad_token_id": 0,
    });
    std::fs::write(dir.join("config.json"), config.to_string())?;
    let cfg: Config = serde_json::from_value(config).map_err(std::io::Error::other)?;

    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    BertModel::load(vb, &cfg).map_err(std::io::Error::other)?;
    varmap
        .save(dir.join("model.safetensors"))
        .map_err(std::io::Error::other)?;

    let vocab_path = dir.join("vocab.txt");
    std::fs::write(&vocab_path, vocab.join("\n") + "\n")?;
    let wordpiece = WordPiece::from_file(&vocab_path.to_string_lossy())
        .unk_token("[UNK]".into())
        .build()
        .map_err(std::io::Error::other)?;
    let mut tokenizer = Tokenizer::new(wordpiece);
    tokenizer
        .with_normalizer(Some(BertNormalizer::default()))
        .map_err(std::io::Error::other)?;
    tokenizer.with_pre_tokenizer(Some(BertPreTokenizer));
    tokenizer.with_post_processor(Some(BertProcessing::new(
        ("[SEP]".into(), 3),
        ("[CLS]".into(), 2),
    )));
    tokenizer
        .save(dir.join("tokenizer.json"), false)
        .map_err(std::io::Error::other)?;

    std::fs::write(
        dir.join("1_Pooling/config.json"),
        r#"{"word_embedding_dimension": 32, "pooling_mode_cls_token": false, "pooling_mode_mean_tokens": true}"#,
    )?;
    let mut modules = vec![
        serde_json::json!({"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}),
        serde_json::json!({"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}),
    ];
    if normalize {
        modules.push(serde_json::json!({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}));
    }
    std::fs::write(
        dir.join("modules.json"),
        serde_json::Value::from(modules).to_string(),
    )?;
    std::fs::write(
        dir.join("sentence_bert_config.json"),
        r#"{"max_seq_length": 48, "do_lower_case": true}"#,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::executor::encoder::{Grouping, SentenceEncoder};
    use crate::executor::model::{bert_bound, max_abs, max_abs_diff};

    /// The tiny model's summation-order bound (2 layers, 32 wide, 64 inner, 48 tokens).
    fn tiny_bound(a: &[f32], b: &[f32]) -> f32 {
        bert_bound(2, 32, 64, 48, max_abs(a, b))
    }

    #[test]
    fn tiny_model_loads_and_batches_match_singles() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_model(dir.path(), true).unwrap();
        let enc = SentenceEncoder::load(dir.path(), &Device::Cpu).unwrap();
        assert_eq!(enc.dim, 32);
        assert_eq!(enc.max_tokens, 48);
        let texts = [
            "good",
            "the food was very very good but the service was terrible",
            "i hated it !",
        ];
        let batch = enc.embed(&texts).unwrap();
        assert_eq!(batch.rows, 3);
        assert!(
            batch.tokens_computed > batch.tokens_real,
            "mixed lengths must pad"
        );
        for (i, t) in texts.iter().enumerate() {
            let alone = enc.embed(&[t]).unwrap();
            let diff = max_abs_diff(alone.row(0), batch.row(i));
            let bound = tiny_bound(alone.row(0), batch.row(i));
            assert!(
                diff <= bound,
                "text {i} differs by {diff} (> {bound}) when batched"
            );
            let norm: f32 = alone.row(0).iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-4);
        }
    }

    #[test]
    fn long_texts_are_truncated_not_rejected() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_model(dir.path(), false).unwrap();
        let enc = SentenceEncoder::load(dir.path(), &Device::Cpu).unwrap();
        let long = "good ".repeat(500);
        let one_pass = enc.embed_with(&[&long, "bad"], Grouping::Single).unwrap();
        assert_eq!(one_pass.tokens_computed, 2 * 48);
        // Grouped by length, the short text is not padded to 48 tokens.
        let grouped = enc.embed(&[&long, "bad"]).unwrap();
        assert_eq!(grouped.tokens_computed, 48 + 3);
        assert_eq!(grouped.tokens_real, 48 + 3);
        let bound = tiny_bound(&one_pass.data, &grouped.data);
        assert!(max_abs_diff(&one_pass.data, &grouped.data) <= bound);
    }
}
