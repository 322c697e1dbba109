//! A served model: a sentence encoder plus, optionally, zero-shot labels whose
//! embeddings are computed once at load. Synchronous by design: it runs on the
//! executor's own threads, never on the async runtime.

use std::sync::Arc;

use super::encoder::{Embeddings, ModelError, SentenceEncoder};

pub struct Model {
    pub name: String,
    pub encoder: Arc<SentenceEncoder>,
    pub labels: Option<Labels>,
}

/// Zero-shot labels: each input gets the label whose text is most similar (cosine).
pub struct Labels {
    pub names: Vec<String>,
    /// Unit-length label embeddings, row-major `[labels, dim]`.
    unit: Vec<f32>,
}

/// What one batch produced, row-major.
#[derive(Debug, Clone)]
pub struct Outputs {
    pub embedding: Embeddings,
    /// Per row, the best label (when the model has labels).
    pub label: Option<Vec<String>>,
    /// Per row, the cosine similarity to every label, `[rows, labels]`.
    pub scores: Option<Vec<f32>>,
}

impl Model {
    pub fn new(
        name: String,
        encoder: Arc<SentenceEncoder>,
        labels: Vec<String>,
    ) -> Result<Model, ModelError> {
        let labels = if labels.is_empty() {
            None
        } else {
            let refs: Vec<&str> = labels.iter().map(String::as_str).collect();
            let e = encoder.embed(&refs)?;
            let mut unit = Vec::with_capacity(e.data.len());
            for i in 0..e.rows {
                unit.extend(unit_vector(e.row(i)));
            }
            Some(Labels {
                names: labels,
                unit,
            })
        };
        Ok(Model {
            name,
            encoder,
            labels,
        })
    }

    pub fn dim(&self) -> usize {
        self.encoder.dim
    }

    pub fn infer(&self, texts: &[&str]) -> Result<Outputs, ModelError> {
        let embedding = self.encoder.embed(texts)?;
        let (label, scores) = match &self.labels {
            None => (None, None),
            Some(l) => {
                let dim = embedding.dim;
                let n_labels = l.names.len();
                let mut scores = Vec::with_capacity(embedding.rows * n_labels);
                let mut best = Vec::with_capacity(embedding.rows);
                for r in 0..embedding.rows {
                    let u = unit_vector(embedding.row(r));
                    let row: Vec<f32> = (0..n_labels)
                        .map(|j| dot(&u, &l.unit[j * dim..(j + 1) * dim]))
                        .collect();
                    let arg = row
                        .iter()
                        .enumerate()
                        .fold(0, |b, (j, s)| if *s > row[b] { j } else { b });
                    best.push(l.names[arg].clone());
                    scores.extend(row);
                }
                (Some(best), Some(scores))
            }
        };
        Ok(Outputs {
            embedding,
            label,
            scores,
        })
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn unit_vector(v: &[f32]) -> Vec<f32> {
    let norm = dot(v, v).sqrt().max(1e-12);
    v.iter().map(|x| x / norm).collect()
}

/// How far two runs of one f32 computation may differ when only the order of their
/// sums differs (another CPU's kernels, another batch's blocking): the bound tests
/// compare with, derived from the computation rather than one machine's error.
///
/// Each output is a chain of `depth` reductions of at most `terms` products, whose
/// sizes are bounded by `scale`. Reordering one such sum moves it by at most
/// γ_n·Σ|x_i|, γ_n = n·u/(1 - n·u) with u the unit roundoff (Higham, *Accuracy and
/// Stability of Numerical Algorithms*, 2nd ed., §3.1), and a chain adds its links'
/// errors to first order. This is a worst case: real differences are far smaller, and
/// a real fault (a padding token attended to, another request's row) far larger.
pub fn reorder_bound(terms: usize, depth: usize, scale: f32) -> f32 {
    let nu = terms as f32 * (f32::EPSILON / 2.0);
    depth as f32 * nu / (1.0 - nu) * scale
}

/// `reorder_bound` for a BERT encoder's outputs: per layer, five reductions (Q·K over a
/// head, the attention-weighted sum over the sequence, three projections) of at most
/// `max(intermediate, hidden, tokens)` terms; `scale` the outputs' largest magnitude.
pub fn bert_bound(
    layers: usize,
    hidden: usize,
    intermediate: usize,
    tokens: usize,
    scale: f32,
) -> f32 {
    let terms = intermediate.max(hidden).max(tokens);
    reorder_bound(terms, 5 * layers + 1, scale)
}

/// The largest magnitude in either vector (a comparison's scale).
pub fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    a.iter().chain(b).fold(0.0, |m, x| m.max(x.abs()))
}

/// The largest element-wise difference of two vectors (for comparing embeddings).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Cosine similarity of two vectors.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    dot(&unit_vector(a), &unit_vector(b))
}
