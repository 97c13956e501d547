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
//!
//! Golden values are pinned in this module's tests and in `lora`/`update` tests;
//! `examples/golden_vectors.rs` prints them all single-threaded so a build for another
//! target (e.g. aarch64 under qemu-user) can be diffed against x86-64.

/// Weyl-sequence increment of SplitMix64 (odd; 2^64 / golden ratio).
pub const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;
/// Domain separator for Rademacher directions (`b"fwd-dir\0"` as a little-endian u64).
pub const DOMAIN_DIRECTION: u64 = u64::from_le_bytes(*b"fwd-dir\0");
/// Domain separator for the Gaussian approximation (`b"fwd-gau\0"` as a little-endian u64).
pub const DOMAIN_GAUSSIAN: u64 = u64::from_le_bytes(*b"fwd-gau\0");
/// Domain separator for [`derive_seed`] (`b"fwd-sed\0"` as a little-endian u64).
pub const DOMAIN_SEED: u64 = u64::from_le_bytes(*b"fwd-sed\0");

const ONE_BITS: u32 = 0x3F80_0000; // 1.0f32

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

/// Sequential SplitMix64 (`state += GAMMA; mix64(state)`, Vigna's splitmix64.c): a tiny,
/// pinned generator so that data splits, client shards and backoff jitter are identical
/// everywhere. Not part of replay; directions use the counter-based stream above.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GAMMA);
        mix64(self.0)
    }
    /// Uniform in [0, n) (n > 0), by rejection (no modulo bias).
    pub fn below(&mut self, n: u64) -> u64 {
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % n;
            }
        }
    }
    /// Uniform in (0, 1).
    pub fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    const P: u32 = 0x3F80_0000; // +1.0
    const M: u32 = 0xBF80_0000; // -1.0

    #[test]
    fn mix64_matches_reference_splitmix64() {
        // Reference SplitMix64 (Vigna, splitmix64.c) seeded with 0: state += GAMMA; mix64(state).
        let mut state = 0u64;
        let mut next = || {
            state = state.wrapping_add(GAMMA);
            mix64(state)
        };
        assert_eq!(next(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(next(), 0x6E78_9E6A_A1B9_65F4);
        assert_eq!(next(), 0x06C4_5D18_8009_454F);
    }

    #[test]
    fn sequential_splitmix64_matches_the_reference() {
        let mut rng = SplitMix64::new(0);
        assert_eq!(rng.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(rng.next_u64(), 0x6E78_9E6A_A1B9_65F4);
        assert_eq!(rng.next_u64(), 0x06C4_5D18_8009_454F);
        let mut v: Vec<u32> = (0..10).collect();
        SplitMix64::new(7).shuffle(&mut v);
        assert_ne!(v, (0..10).collect::<Vec<u32>>());
        v.sort_unstable();
        assert_eq!(v, (0..10).collect::<Vec<u32>>());
        let mut rng = SplitMix64::new(1);
        assert!((0..1000).all(|_| rng.below(3) < 3));
        assert!((0..1000).all(|_| {
            let u = rng.unit();
            u > 0.0 && u < 1.0
        }));
    }

    #[test]
    fn golden_direction_words() {
        // (seed, word 0, word 1): pinned; a change here forks every stored commit.
        let cases = [
            (0u64, 0x7E8B_A505_DF18_F0E4u64, 0x3564_187E_34DA_693Fu64),
            (1, 0x3A17_9F80_5BAD_7959, 0x3EB4_5620_328C_3308),
            (0xDEAD_BEEF, 0x34FD_4EB6_C037_D5B5, 0x2C07_3257_F318_880F),
            (u64::MAX, 0xC18E_30A5_F877_F6A0, 0x8625_FAC4_7DE8_9553),
        ];
        for (seed, w0, w1) in cases {
            assert_eq!(direction_word(seed, 0), w0, "seed {seed:#x} word 0");
            assert_eq!(direction_word(seed, 1), w1, "seed {seed:#x} word 1");
            let mut v = [0f32; 128];
            direction(seed, &mut v);
            for (i, x) in v.iter().enumerate() {
                let w = if i < 64 { w0 } else { w1 };
                let expect = if (w >> (i % 64)) & 1 == 1 { M } else { P };
                assert_eq!(x.to_bits(), expect, "seed {seed:#x} element {i}");
            }
        }
    }

    #[test]
    fn golden_direction_first_values_seed0() {
        let mut v = [0f32; 8];
        direction(0, &mut v);
        assert_eq!(bits(&v), [P, P, M, P, P, M, M, M]);
    }

    #[test]
    fn direction_values_are_exactly_plus_or_minus_one_and_balanced() {
        let mut v = vec![0f32; 1 << 20];
        direction(12345, &mut v);
        let neg = v.iter().filter(|x| x.to_bits() == M).count();
        let pos = v.iter().filter(|x| x.to_bits() == P).count();
        assert_eq!(neg + pos, v.len(), "every element is exactly +1.0 or -1.0");
        // 2^20 fair coins: sd = 512; 10 sd bound on a fixed seed.
        assert!((neg as i64 - (1 << 19)).abs() < 5120, "neg = {neg}");
    }

    #[test]
    fn direction_depends_on_seed() {
        let mut a = [0f32; 256];
        let mut b = [0f32; 256];
        direction(1, &mut a);
        direction(2, &mut b);
        let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
        assert!(
            (64..192).contains(&same),
            "seeds 1 and 2 agree on {same}/256"
        );
    }

    #[test]
    fn direction_at_matches_full_direction_for_every_offset() {
        let mut full = vec![0f32; 300];
        direction(99, &mut full);
        for start in 0..140 {
            for len in [0, 1, 5, 63, 64, 65, 130] {
                let mut part = vec![0f32; len];
                direction_at(99, start as u64, &mut part);
                assert_eq!(
                    bits(&part),
                    bits(&full[start..start + len]),
                    "{start}+{len}"
                );
            }
        }
    }

    #[test]
    fn add_scaled_direction_at_equals_plain_f32_sum() {
        let mut v = vec![0f32; 200];
        direction(5, &mut v);
        for start in [0usize, 3, 64, 70] {
            let x0: Vec<f32> = (0..130).map(|i| (i as f32) * 0.37 - 20.0).collect();
            let mut x = x0.clone();
            add_scaled_direction_at(5, start as u64, 0.1, &mut x);
            for i in 0..x.len() {
                assert_eq!(
                    x[i].to_bits(),
                    (x0[i] + 0.1 * v[start + i]).to_bits(),
                    "{start}/{i}"
                );
            }
        }
    }

    #[test]
    fn golden_derive_seed() {
        assert_eq!(derive_seed(0, 0, 0, 0), 0x6365_6337_7196_18E7);
        assert_eq!(derive_seed(7, 3, 2, 1), 0x12A8_2654_05A3_98AF);
        assert_eq!(
            derive_seed(u64::MAX, u64::MAX, u32::MAX, u32::MAX),
            0x8211_29CA_347F_34D9
        );
        assert_eq!(mix_seed(1, 2), 0xD027_09CF_6923_E3A7);
    }

    #[test]
    fn derive_seed_distinct_within_a_round() {
        let mut seen = std::collections::HashSet::new();
        for c in 0..64 {
            for k in 0..64 {
                assert!(
                    seen.insert(derive_seed(42, 7, c, k)),
                    "collision at {c},{k}"
                );
            }
        }
        // And each input changes the result.
        let base = derive_seed(1, 2, 3, 4);
        assert_ne!(base, derive_seed(0, 2, 3, 4));
        assert_ne!(base, derive_seed(1, 3, 3, 4));
        assert_ne!(base, derive_seed(1, 2, 4, 4));
        assert_ne!(base, derive_seed(1, 2, 3, 5));
    }

    #[test]
    fn golden_gaussian_approx() {
        let cases: [(u64, [u32; 4]); 4] = [
            (0, [0xbf06ed00, 0xbee61200, 0x3f80d200, 0x3ff12900]),
            (1, [0xbe921800, 0x4013cd00, 0x3be70000, 0xbe8c1e00]),
            (
                0xDEAD_BEEF,
                [0xbedff400, 0xbf3be200, 0x3e98b200, 0xbfc46280],
            ),
            (u64::MAX, [0xbf82ce00, 0xbf940a00, 0xbfb3c580, 0xbfac9480]),
        ];
        for (seed, expect) in cases {
            let mut g = [0f32; 4];
            gaussian_approx(seed, &mut g);
            assert_eq!(bits(&g), expect, "seed {seed:#x}");
        }
    }

    #[test]
    fn gaussian_approx_has_unit_moments_and_bounded_support() {
        let mut g = vec![0f32; 200_000];
        gaussian_approx(3, &mut g);
        let n = g.len() as f64;
        let mean = g.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let var = g
            .iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / n;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "var {var}");
        assert!(g.iter().all(|x| x.abs() <= 6.0));
        // Irwin-Hall(12) puts ~31.7% of the mass outside ±1, like N(0,1).
        let tail = g.iter().filter(|x| x.abs() > 1.0).count() as f64 / n;
        assert!((tail - 0.317).abs() < 0.01, "tail {tail}");
    }

    #[test]
    fn gaussian_and_direction_streams_are_independent_domains() {
        assert_ne!(key(7, DOMAIN_DIRECTION), key(7, DOMAIN_GAUSSIAN));
    }
}
