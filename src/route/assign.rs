//! Variant assignment: override header > sticky key > weighted random.
//!
//! Sticky assignment is weighted rendezvous hashing: each variant scores
//! `weight / -ln(u)`, where `u` in (0,1) is a stable hash of (key, variant name), and
//! the highest score wins. It is a pure function of (key, names, weights), so every
//! replica and every restart agree, and it is monotone: raising one weight raises only
//! that variant's score, so keys only ever move *into* it.

use http::HeaderMap;

use super::Route;
use crate::hash::{FNV_OFFSET, fmix64, fnv1a, next_f64};

/// How a request got its variant (for logs and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Assignment {
    Override,
    Sticky,
    Random,
}

/// The route's weights, prepared once at config load.
#[derive(Debug, Clone)]
pub struct Chooser {
    /// Per variant: (weight, hash seed of its name).
    variants: Vec<(f64, u64)>,
    /// Running sums of weights, for weighted random choice.
    cumulative: Vec<f64>,
    total: f64,
}

/// The override header named a variant the route does not have.
#[derive(Debug)]
pub struct UnknownVariant(pub String);

impl Chooser {
    pub fn new<'a>(variants: impl Iterator<Item = (&'a str, f64)>) -> Self {
        let variants: Vec<(f64, u64)> = variants
            .map(|(name, w)| (w, fmix64(fnv1a(FNV_OFFSET, name.as_bytes()))))
            .collect();
        let mut total = 0.0;
        let cumulative = variants
            .iter()
            .map(|(w, _)| {
                total += w;
                total
            })
            .collect();
        Chooser {
            variants,
            cumulative,
            total,
        }
    }

    /// Rendezvous choice for a sticky key. Variants with weight 0 are never chosen.
    pub fn sticky(&self, key: &[u8]) -> usize {
        self.sticky_among(key, |_| true).unwrap_or(0)
    }

    /// Rendezvous choice among the variants `keep` allows. Leaving a variant out moves
    /// only its own keys (to their second choice); they come back when it returns.
    pub fn sticky_among(&self, key: &[u8], keep: impl Fn(usize) -> bool) -> Option<usize> {
        let key_hash = fnv1a(FNV_OFFSET, key);
        let mut best = None;
        let mut best_score = f64::NEG_INFINITY;
        for (i, &(w, seed)) in self.variants.iter().enumerate() {
            if w <= 0.0 || !keep(i) {
                continue;
            }
            let h = fmix64(key_hash ^ seed);
            // 53 random bits, shifted into the open interval (0, 1).
            let u = ((h >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64);
            let score = w / -u.ln();
            if score > best_score {
                best = Some(i);
                best_score = score;
            }
        }
        best
    }

    /// Weighted random choice.
    pub fn random(&self) -> usize {
        let r = next_f64() * self.total;
        self.cumulative
            .iter()
            .position(|&c| r < c)
            // r == total can only happen through rounding: take the last non-zero weight.
            .unwrap_or_else(|| self.variants.iter().rposition(|v| v.0 > 0.0).unwrap_or(0))
    }

    /// Weighted random choice among the variants `keep` allows: their weights share
    /// the whole traffic.
    pub fn random_among(&self, keep: impl Fn(usize) -> bool) -> Option<usize> {
        let total: f64 = (0..self.variants.len())
            .filter(|&i| keep(i))
            .map(|i| self.variants[i].0)
            .sum();
        if total <= 0.0 {
            return None;
        }
        let mut r = next_f64() * total;
        let mut last = None;
        for (i, &(w, _)) in self.variants.iter().enumerate() {
            if w <= 0.0 || !keep(i) {
                continue;
            }
            if r < w {
                return Some(i);
            }
            r -= w;
            last = Some(i);
        }
        last
    }
}

/// Picks the variant for a request, with the weights in force (`chooser`: the route's
/// own, or its experiment's when ramps or a guardrail move them).
/// `body_key`: a sticky key from the request's body (an OpenAI call's `user`), used
/// when the route's sticky header is absent.
pub fn assign(
    route: &Route,
    chooser: &Chooser,
    headers: &HeaderMap,
    body_key: Option<&[u8]>,
) -> Result<(usize, Assignment), UnknownVariant> {
    if let Some(v) = crate::headers::get(headers, &route.override_header) {
        let wanted = v.as_bytes();
        return route
            .variants
            .iter()
            .position(|var| var.name.as_bytes() == wanted)
            .map(|i| (i, Assignment::Override))
            .ok_or_else(|| UnknownVariant(String::from_utf8_lossy(wanted).into_owned()));
    }
    if route.variants.len() == 1 {
        return Ok((0, Assignment::Random));
    }
    if let Some(key) = sticky_key(route, headers, body_key) {
        return Ok((chooser.sticky(key), Assignment::Sticky));
    }
    Ok((chooser.random(), Assignment::Random))
}

/// The request's sticky key: the route's sticky header, else the body's key (an
/// OpenAI call's `user`, on any route: the same end user stays on one variant).
pub fn sticky_key<'a>(
    route: &Route,
    headers: &'a HeaderMap,
    body_key: Option<&'a [u8]>,
) -> Option<&'a [u8]> {
    match &route.sticky_header {
        Some(h) => crate::headers::get(headers, h)
            .map(|v| v.as_bytes())
            .or(body_key),
        None => body_key,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn chooser(ws: &[f64]) -> Chooser {
        let names: Vec<String> = (0..ws.len()).map(|i| format!("v{i}")).collect();
        Chooser::new(names.iter().map(|n| n.as_str()).zip(ws.iter().copied()))
    }

    #[test]
    fn sticky_is_pinned_across_builds() {
        // Fixed expectations: a change to the hash function would silently move users
        // between variants on upgrade, so it must fail this test first.
        assert_eq!(fnv1a(FNV_OFFSET, b"hello"), 0xa430_d846_80aa_bd0b); // FNV-1a test vector
        let c = Chooser::new([("control", 50.0), ("candidate", 50.0)].into_iter());
        let got: Vec<usize> = [
            "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi",
        ]
        .iter()
        .map(|k| c.sticky(k.as_bytes()))
        .collect();
        assert_eq!(got, [1, 1, 1, 0, 0, 0, 1, 0]);
    }

    #[test]
    fn zero_weight_is_never_chosen() {
        let c = chooser(&[0.0, 1.0, 0.0]);
        for i in 0..10_000u32 {
            assert_eq!(c.sticky(&i.to_le_bytes()), 1);
            assert_eq!(c.random(), 1);
        }
    }

    #[test]
    fn sticky_split_follows_weights() {
        let c = chooser(&[90.0, 10.0]);
        let n = 100_000u32;
        let ones = (0..n)
            .filter(|i| c.sticky(format!("user-{i}").as_bytes()) == 1)
            .count();
        let p = ones as f64 / n as f64;
        assert!((p - 0.1).abs() < 0.005, "share of candidate = {p}");
    }

    proptest! {
        #[test]
        fn raising_a_weight_only_moves_keys_into_it(
            ws in prop::collection::vec(0.0f64..100.0, 2..6),
            which in 0usize..6,
            bump in 0.0f64..100.0,
            keys in prop::collection::vec(any::<u64>(), 200),
        ) {
            prop_assume!(ws.iter().any(|w| *w > 0.0));
            let which = which % ws.len();
            let before = chooser(&ws);
            let mut raised = ws.clone();
            raised[which] += bump;
            let after = chooser(&raised);
            for k in keys {
                let (a, b) = (before.sticky(&k.to_le_bytes()), after.sticky(&k.to_le_bytes()));
                prop_assert!(a == b || b == which, "key moved {a} -> {b}, raised {which}");
            }
        }

        #[test]
        fn sticky_is_a_pure_function(ws in prop::collection::vec(0.1f64..100.0, 1..6), key in any::<Vec<u8>>()) {
            prop_assert_eq!(chooser(&ws).sticky(&key), chooser(&ws).sticky(&key));
        }

        #[test]
        fn adding_a_variant_only_moves_keys_into_it(
            ws in prop::collection::vec(0.1f64..100.0, 1..5),
            extra in 0.1f64..100.0,
            keys in prop::collection::vec(any::<u64>(), 200),
        ) {
            let before = chooser(&ws);
            let mut more = ws.clone();
            more.push(extra);
            let after = chooser(&more);
            for k in keys {
                let (a, b) = (before.sticky(&k.to_le_bytes()), after.sticky(&k.to_le_bytes()));
                prop_assert!(a == b || b == ws.len());
            }
        }
    }
}
