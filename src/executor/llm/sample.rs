//! Choosing the next token from a row of logits: greedy at temperature 0, else
//! temperature, then top-k, then top-p (nucleus), drawn with the sequence's own seeded
//! generator, so a given `seed` gives the same text however the step was batched.
//! Log-probabilities are the model's own (log-softmax of the raw logits, before any
//! sampling setting), as vLLM reports them.

/// A sequence's sampling settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    pub temperature: f32,
    /// 0: no limit.
    pub top_k: usize,
    pub top_p: f32,
    pub seed: u64,
}

impl Sampling {
    pub fn greedy() -> Sampling {
        Sampling {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// SplitMix64: small, fast, and the same on every machine.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The index of the largest logit (the lowest index on a tie).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Candidates further below the best than this (in units of the temperature-scaled
/// logit) carry under e^-30 of its probability each and are left out of sorting.
const CUTOFF: f32 = 30.0;

pub fn sample(logits: &[f32], s: &Sampling, rng: &mut Rng) -> u32 {
    if s.temperature <= 0.0 || s.top_k == 1 {
        return argmax(logits);
    }
    let t = s.temperature;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // Each candidate's weight exp((logit - max) / t), largest first.
    let mut cand: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .filter(|&(_, &x)| (max - x) / t < CUTOFF)
        .map(|(i, &x)| (i as u32, ((x - max) / t).exp()))
        .collect();
    cand.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if s.top_k > 0 {
        cand.truncate(s.top_k);
    }
    if s.top_p < 1.0 {
        let total: f32 = cand.iter().map(|c| c.1).sum();
        let mut acc = 0.0;
        let mut keep = cand.len();
        for (i, c) in cand.iter().enumerate() {
            acc += c.1;
            if acc >= s.top_p * total {
                keep = i + 1;
                break;
            }
        }
        cand.truncate(keep.max(1));
    }
    let total: f64 = cand.iter().map(|c| f64::from(c.1)).sum();
    let mut u = rng.next_f64() * total;
    for c in &cand {
        u -= f64::from(c.1);
        if u < 0.0 {
            return c.0;
        }
    }
    cand.last().map_or(0, |c| c.0)
}

/// `log_softmax(logits)[token]` and the `top` most likely tokens with theirs, best first.
pub fn logprobs(logits: &[f32], token: u32, top: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&x| f64::from(x - max).exp()).sum();
    let lse = max + sum.ln() as f32;
    let lp = logits
        .get(token as usize)
        .map_or(f32::NEG_INFINITY, |&x| x - lse);
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (i, &x) in logits.iter().enumerate() {
            if best.len() < top || x > best[best.len() - 1].1 {
                let at = best.partition_point(|b| b.1 >= x);
                best.insert(at, (i as u32, x));
                best.truncate(top);
            }
        }
    }
    (lp, best.into_iter().map(|(i, x)| (i, x - lse)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_limits() {
        let l = [0.0, 3.0, 2.0, 3.0, -1.0];
        assert_eq!(argmax(&l), 1);
        let mut rng = Rng::new(7);
        assert_eq!(sample(&l, &Sampling::greedy(), &mut rng), 1);
        // top_k 2 keeps tokens 1 and 3 only; top_p tiny keeps just the first.
        let s = Sampling {
            temperature: 1.0,
            top_k: 2,
            top_p: 1.0,
            seed: 7,
        };
        for _ in 0..200 {
            assert!(matches!(sample(&l, &s, &mut rng), 1 | 3));
        }
        let s = Sampling {
            top_k: 0,
            top_p: 0.01,
            ..s
        };
        for _ in 0..50 {
            assert_eq!(sample(&l, &s, &mut rng), 1);
        }
    }

    #[test]
    fn a_seed_repeats_and_frequencies_follow_the_distribution() {
        let l = [0.0f32, (2.0f32).ln(), (3.0f32).ln(), -40.0];
        let s = Sampling {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 1,
        };
        let draw = |seed| {
            let mut rng = Rng::new(seed);
            (0..6000)
                .map(|_| sample(&l, &s, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(42), draw(42));
        assert_ne!(draw(42), draw(43));
        let d = draw(42);
        let share = |t| d.iter().filter(|&&x| x == t).count() as f64 / d.len() as f64;
        // 1:2:3 odds; 6000 draws put each share within 0.03 of its odds with
        // overwhelming probability (over 5 standard deviations).
        for (t, p) in [(0, 1.0 / 6.0), (1, 2.0 / 6.0), (2, 3.0 / 6.0)] {
            assert!(
                (share(t) - p).abs() < 0.03,
                "token {t}: {} vs {p}",
                share(t)
            );
        }
        assert_eq!(share(3), 0.0);
    }

    #[test]
    fn logprobs_are_a_log_softmax_with_the_best_first() {
        let l = [1.0f32, 2.0, 3.0];
        let (lp, top) = logprobs(&l, 0, 2);
        let z: f32 = l.iter().map(|x| x.exp()).sum();
        assert!((lp - (1.0f32.exp() / z).ln()).abs() < 1e-6);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), [2, 1]);
        assert!((top[0].1 - (3.0f32.exp() / z).ln()).abs() < 1e-6);
    }
}
