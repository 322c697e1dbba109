//! Stable hashing and fast randomness, shared by assignment, retries and config
//! digests. Nothing here depends on the rest of braid.

use std::cell::Cell;
use std::hash::{BuildHasher, RandomState};

// === stable hashing ===

pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a, 64 bit: fixed by its spec, so identical on every replica and platform.
pub fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// MurmurHash3's 64-bit finalizer: spreads FNV's weak low-bit mixing over all bits.
pub fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

// === fast per-thread randomness (not cryptographic; splits traffic only) ===

thread_local! {
    static RNG: Cell<u64> = Cell::new(RandomState::new().hash_one(std::thread::current().id()) | 1);
}

/// 64 uniform bits from a per-thread wyrand generator.
pub fn next_u64() -> u64 {
    RNG.with(|s| {
        let x = s.get().wrapping_add(0xa076_1d64_78bd_642f);
        s.set(x);
        let t = (x as u128).wrapping_mul((x ^ 0xe703_7ed1_a0b4_28db) as u128);
        ((t >> 64) as u64) ^ (t as u64)
    })
}

/// A uniform f64 in [0, 1) from the same generator.
pub fn next_f64() -> f64 {
    (next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// True with probability `p` (a sampling fraction in [0, 1]); 0 and 1 draw nothing.
pub fn chance(p: f64) -> bool {
    p >= 1.0 || (p > 0.0 && next_f64() < p)
}
