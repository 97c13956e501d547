//! Seeded perturbation generator: Rademacher directions, seed derivation and the integer
//! Gaussian approximation used for LoRA A initialisation.
//!
//! **Invariant:** every value produced here depends only on its inputs and is bit-identical
//! on every platform (x86-64, AArch64, ARMv7, with or without SIMD): the generator is pure
//! 64-bit integer arithmetic, and the only float operations are exact conversions and
//! multiplications by powers of two. No libm function is used anywhere.
//!
//! # Generator specification (pinned; changing it breaks replay of every stored commit)
//!
//! The generator is *SplitMix64 used as a counter-based generator* (Steele, Lea, Flood,
//! "Fast splittable pseudorandom number generators", OOPSLA 2014; finaliser constants
//! from Stafford's "Mix13"):
//!
//! ```text
//! GAMMA = 0x9E37_79B9_7F4A_7C15
//! mix64(z):  z = (z ^ (z >> 30)) * 0xBF58_476D_1CE4_E5B9
//!            z = (z ^ (z >> 27)) * 0x94D0_49BB_1331_11EB
//!            return z ^ (z >> 31)                      (all arithmetic wrapping mod 2^64)
//! key(seed, domain) = mix64(seed ^ domain)
//! word(key, c)      = mix64(key + (c + 1) * GAMMA)  (c = 0, 1, 2, ...)
//! ```
//!
//! * [`direction`]: domain [`DOMAIN_DIRECTION`]; element `i` is `-1.0` if bit `i % 64` of
//!   `word(key, i / 64)` is set, else `+1.0`.
//! * [`gaussian_approx`]: domain [`DOMAIN_GAUSSIAN`]; element `i` uses words `3i, 3i+1, 3i+2`,
//!   split into twelve 16-bit unsigned lanes (lowest lane first) `u_0..u_11`;
//!   `S = Σ u_k`, value = `(2S − 12·65535) / 131072` (an Irwin–Hall sum of 12 uniforms,
//!   mean 0, variance `1 − 2^-32`, support ±6). The numerator is an even integer of
//!   magnitude < 2^21, so the conversion to f32 and the power-of-two division are exact.
//! * [`mix_seed`] / [`derive_seed`]: chains of `mix64` described on each function.
//!
//! Hand-written rather than taken from `rand`/`rand_chacha`: the exact bit stream is part of
//! the protocol (replicas replay `(seed, coeff)` commits), and a crate upgrade that changes a
//! stream or a sampling method would silently fork every replica. Twelve lines of pinned
//! integer code are easier to freeze than a dependency version.

/// Weyl-sequence increment of SplitMix64 (odd; 2^64 / golden ratio).
pub const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;
/// Domain separator for Rademacher directions (`b"fwd-dir\0"` as a little-endian u64).
pub const DOMAIN_DIRECTION: u64 = u64::from_le_bytes(*b"fwd-dir\0");
/// Domain separator for the Gaussian approximation (`b"fwd-gau\0"` as a little-endian u64).
pub const DOMAIN_GAUSSIAN: u64 = u64::from_le_bytes(*b"fwd-gau\0");
/// Domain separator for [`derive_seed`] (`b"fwd-sed\0"` as a little-endian u64).
pub const DOMAIN_SEED: u64 = u64::from_le_bytes(*b"fwd-sed\0");

const ONE_BITS: u32 = 0x3F80_0000; // 1.0f32
const SIGN_BIT: u32 = 0x8000_0000;

/// SplitMix64 finaliser (Stafford Mix13): a bijection on u64 with full avalanche.
#[inline(always)]
pub const fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Stream key for `seed` in a domain: `mix64(seed ^ domain)`.
#[inline(always)]
const fn key(seed: u64, domain: u64) -> u64 {
    mix64(seed ^ domain)
}

/// Word `c` of the counter-based stream with key `key`: `mix64(key + (c + 1) * GAMMA)`.
#[inline(always)]
const fn word(key: u64, c: u64) -> u64 {
    mix64(key.wrapping_add(c.wrapping_add(1).wrapping_mul(GAMMA)))
}

/// Combines two 64-bit values into a new seed: `mix64(mix64(a ^ DOMAIN_SEED) + b * GAMMA)`.
/// For a fixed `a` this is a bijection in `b`, so distinct tags never collide.
#[inline]
pub const fn mix_seed(a: u64, b: u64) -> u64 {
    mix64(key(a, DOMAIN_SEED).wrapping_add(b.wrapping_mul(GAMMA)))
}

/// Seed of the `k`-th perturbation of client `client_index` in `round` of a job:
/// `mix_seed(mix_seed(job_seed, round), (client_index << 32) | k)`.
///
/// Within one `(job_seed, round)` distinct `(client_index, k)` always give distinct seeds.
pub const fn derive_seed(job_seed: u64, round: u64, client_index: u32, k: u32) -> u64 {
    mix_seed(
        mix_seed(job_seed, round),
        ((client_index as u64) << 32) | k as u64,
    )
}

/// The 64 sign bits of direction word `word_index` (elements `64*word_index ..`): bit `b`
/// set means element `64*word_index + b` is `-1.0`.
#[inline]
pub fn direction_word(seed: u64, word_index: u64) -> u64 {
    word(key(seed, DOMAIN_DIRECTION), word_index)
}

/// Fills `out` with the Rademacher direction of `seed`: `out[i] = v_i(seed)`, each exactly
/// `+1.0` or `-1.0`. Element `i` depends only on `(seed, i)`.
pub fn direction(seed: u64, out: &mut [f32]) {
    direction_at(seed, 0, out);
}

/// Fills `out` with elements `start .. start + out.len()` of the direction of `seed`
/// (so a long direction can be produced in chunks without a buffer of full length).
pub fn direction_at(seed: u64, start: u64, out: &mut [f32]) {
    let k = key(seed, DOMAIN_DIRECTION);
    let mut i = 0usize;
    let mut pos = start;
    // Unaligned head: finish the partially used word.
    let head_bit = (pos % 64) as u32;
    if head_bit != 0 && !out.is_empty() {
        let bits = word(k, pos / 64) >> head_bit;
        let n = ((64 - head_bit) as usize).min(out.len());
        fill_signs(bits, &mut out[..n]);
        i = n;
        pos += n as u64;
    }
    // Full words, then the tail.
    for chunk in out[i..].chunks_mut(64) {
        fill_signs(word(k, pos / 64), chunk);
        pos += chunk.len() as u64;
    }
}

/// `out[b] = -1.0` if bit `b` of `bits` is set, else `+1.0` (branch-free, vectorisable).
#[inline(always)]
fn fill_signs(bits: u64, out: &mut [f32]) {
    for (b, o) in out.iter_mut().enumerate() {
        let s = ((bits >> b) & 1) as u32;
        *o = f32::from_bits(ONE_BITS | (s << 31));
    }
}

/// Adds `coeff * v(seed)` element-wise to `x`, where `x[i]` pairs with direction element
/// `start + i`: `x[i] = x[i] + (±coeff)`. Because `v` is ±1, `coeff * v` is exact (a sign
/// flip) and the result is the single correctly rounded f32 sum, identical with or without
/// FMA contraction.
pub fn add_scaled_direction_at(seed: u64, start: u64, coeff: f32, x: &mut [f32]) {
    let k = key(seed, DOMAIN_DIRECTION);
    let cbits = coeff.to_bits();
    let mut pos = start;
    let mut rest = x;
    let head_bit = (pos % 64) as u32;
    if head_bit != 0 && !rest.is_empty() {
        let bits = word(k, pos / 64) >> head_bit;
        let n = ((64 - head_bit) as usize).min(rest.len());
        let (h, t) = rest.split_at_mut(n);
        add_signed(bits, cbits, h);
        rest = t;
        pos += n as u64;
    }
    for chunk in rest.chunks_mut(64) {
        add_signed(word(k, pos / 64), cbits, chunk);
        pos += chunk.len() as u64;
    }
}

#[inline(always)]
fn add_signed(bits: u64, cbits: u32, x: &mut [f32]) {
    for (b, o) in x.iter_mut().enumerate() {
        let s = ((bits >> b) & 1) as u32;
        *o += f32::from_bits(cbits ^ (s << 31));
    }
}

/// Fills `out` with integer-derived approximately standard normal values (Irwin–Hall sum
/// of twelve 16-bit uniforms, see the module docs). Exact, libm-free, in `[-6, 6]`.
pub fn gaussian_approx(seed: u64, out: &mut [f32]) {
    let k = key(seed, DOMAIN_GAUSSIAN);
    for (i, o) in out.iter_mut().enumerate() {
        let base = 3 * i as u64;
        let mut s: u32 = 0;
        for c in 0..3 {
            let w = word(k, base + c);
            s += (w & 0xFFFF) as u32
                + ((w >> 16) & 0xFFFF) as u32
                + ((w >> 32) & 0xFFFF) as u32
                + (w >> 48) as u32;
        }
        // |2S - 786420| <= 786420 < 2^24: exact in f32; /131072 is a power of two: exact.
        let centred = 2 * s as i32 - 12 * 65535;
        *o = centred as f32 / 131_072.0;
    }
}

// Keeps the sign-bit constant documented next to the code that relies on it.
const _: () = assert!(SIGN_BIT == 1 << 31);

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn mix64_matches_reference_splitmix64() {
        // Reference: SplitMix64 seeded with 0 yields these outputs (Vigna's splitmix64.c):
        // state += GAMMA; return mix64(state).
        let mut state = 0u64;
        let mut next = || {
            state = state.wrapping_add(GAMMA);
            mix64(state)
        };
        assert_eq!(next(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(next(), 0x6E78_9E6A_A1B9_65F4);
        assert_eq!(next(), 0x06C4_5D18_8009_454F);
    }
}
