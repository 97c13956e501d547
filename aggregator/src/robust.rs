//! Robust aggregation and differential privacy of the pooled scalars: what a hostile or broken
//! client can do to a commit, bounded before the commit is made.
//!
//! A client's whole influence on the weights is its scalars `g` (the seeds only pick
//! directions), and a commit moves θ by `−lr·Σ g_k v_k / K_b`. Unchecked, one client sending
//! `g = 1e30` moves θ as far as the trust region allows, every round. Defences, in order:
//!
//! 1. **Ingest** ([`check_pairs`]): an update with a non-finite `g`, with `|g| >
//!    robust.max_abs_g` (a hard bound meant to sit far above any honest value), or with more pairs than its request asked for (`max_pairs_per_request`) is
//!    rejected whole; the client is logged (`client`, `reason` as log key-values) and counted
//!    per reason. A refused (client, request) no longer holds the round open: the round goes
//!    on with the others (or is abandoned at its deadline as before if nobody valid answered).
//! 2. **Per-round clipping** ([`robust_pairs`], per direction block, since head-block and
//!    adapter-block scalars have different scales): with `m = median(g)` and
//!    `σ̂ = 1.4826·median|g − m|` (MAD, a consistent estimate of σ for Gaussian g that a
//!    minority of clients cannot move far), every g is clipped to `m ± robust.clip_sigmas·σ̂`.
//!    Forward-gradient scalars of honest clients are `∇L·v` for Rademacher v in thousands of
//!    dimensions, i.e. close to Gaussian, so the default of 5σ̂ clips an honest value with
//!    probability ~1e-6.
//! 3. **Per-client cap**: a client's RMS deviation `sqrt(mean_k (g_k − m)²)` over its pairs in a
//!    block is at most `robust.client_rms_sigmas·σ̂`; beyond, its deviations are scaled down to
//!    that. Clipping alone lets a scaled client put every pair at the clip (5σ̂, five honest
//!    clients' worth); the cap brings it back to a small multiple of one honest client.
//!    Sign-flipping is not detectable per client (−g has the same distribution as g), so its
//!    effect is bounded by the same cap: at most the client's share of the pairs.
//!
//! Steps 2–3 need at least `robust.min_pairs` pairs in a block and a non-zero MAD; below that
//! the block is left as it is (pair bound and ingest checks still hold). When nothing changes
//! the commit is bit-for-bit what it was without this module (tested).
//!
//! **Differential privacy** (`[dp]`, off by default), central model: the aggregator and the
//! broker see raw scalars (use TLS), everyone who sees commits — every replica — sees only
//! noised ones. With DP on, the data-dependent steps 2–3 are replaced by a fixed public clip
//! `|g| ≤ C = dp.clip` (a data-dependent clip would let one client's data move the clipping of
//! the others, and the sensitivity below would not hold), then every pooled scalar gets
//! independent noise `N(0, σ²)`, `σ = dp.noise_multiplier·Δ₂`.
//!
//! *Sensitivity* (client-level, replace-one neighbours): seeds are data-independent (derived
//! from the job's seed base and the client's id; discriminative sampling picks among candidates
//! by alignment with the last public commit), so a round releases the vector of its scalars.
//! Replacing one client's data changes only that client's scalars, at most `n_max` of them
//! (`max_pairs_per_client`: its requests' pair counts, enforced at ingest), each by at most
//! `2C`, so the L2 sensitivity is `Δ₂ = 2C·√n_max`. The Gaussian mechanism with `σ = z·Δ₂` is
//! `ρ = 1/(2z²)`-zCDP per committed round (Bun & Steinke 2016, Prop. 1.6); zCDP composes
//! additively, so after R commits `ρ_R = R/(2z²)`, reported as `(ε, δ)`-DP with
//! `ε = ρ + 2·√(ρ·ln(1/δ))` (ibid., Prop. 1.3). Everything after the noise (learning rate,
//! averaging, trust region, the weights) is post-processing. Abandoned rounds release no
//! scalar. Not covered: the metrics topic and files (pooled loss and g² statistics of raw
//! data; keep them to operators with the broker ACL), and floating-point side channels of the
//! sampler (Mironov 2012).

use std::collections::BTreeMap;

use fwdllm_shared::lora::{DirectionBlock, LoraLayout};
use fwdllm_shared::wire::SeedScalar;
use log::warn;
use serde::{Deserialize, Serialize};

use crate::config::{AggregatorConfig, DpConfig, RobustConfig};

/// Why an update was rejected; the `reason` log field and the key of the per-reason counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RejectReason {
    /// Not a valid `ClientUpdate` envelope.
    Undecodable,
    /// The update names another client than the topic it came on.
    ClientMismatch,
    /// For a round that was never opened.
    FutureRound,
    /// Computed at another model version than the round's.
    WrongVersion,
    /// Answers a request (extend) that was not made.
    UnknownRequest,
    /// From a client the round did not select.
    NotSelected,
    /// A NaN or infinite g.
    NonFinite,
    /// |g| above `robust.max_abs_g`.
    OutOfBound,
    /// More pairs than the request asked for.
    TooManyPairs,
}

impl RejectReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::Undecodable => "undecodable",
            RejectReason::ClientMismatch => "client_mismatch",
            RejectReason::FutureRound => "future_round",
            RejectReason::WrongVersion => "wrong_version",
            RejectReason::UnknownRequest => "unknown_request",
            RejectReason::NotSelected => "not_selected",
            RejectReason::NonFinite => "non_finite",
            RejectReason::OutOfBound => "out_of_bound",
            RejectReason::TooManyPairs => "too_many_pairs",
        }
    }

    /// Rejections of a selected client's answer to the open request for its content: the
    /// client will not send a better one, so the round stops waiting for it.
    pub fn is_content(self) -> bool {
        matches!(
            self,
            RejectReason::NonFinite | RejectReason::OutOfBound | RejectReason::TooManyPairs
        )
    }
}

/// Durable robust-aggregation and privacy counters (part of `state.bin`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RobustCounters {
    /// Rejected updates by [`RejectReason::as_str`].
    pub rejected_by_reason: BTreeMap<String, u64>,
    /// Pairs whose g the per-round clip changed, over all commits.
    pub clipped_pairs: u64,
    /// (client, block) contributions the per-client cap scaled down, over all commits.
    pub capped_clients: u64,
    /// Commits released with DP noise.
    pub dp_commits: u64,
    /// zCDP ρ spent so far (sum over noised commits).
    pub dp_rho: f64,
}

impl RobustCounters {
    /// Logs and counts one rejection.
    pub fn reject(&mut self, client: &str, reason: RejectReason, detail: &str) {
        *self
            .rejected_by_reason
            .entry(reason.as_str().to_string())
            .or_insert(0) += 1;
        warn!(client = client, reason = reason.as_str(); "update from {client} rejected ({}): {detail}", reason.as_str());
    }

    /// (ε, δ) of the noise spent so far, None before the first noised commit.
    pub fn dp_epsilon(&self, delta: f64) -> Option<f64> {
        (self.dp_commits > 0).then(|| zcdp_to_epsilon(self.dp_rho, delta))
    }
}

/// `ε(δ)` of a ρ-zCDP mechanism: `ρ + 2√(ρ ln(1/δ))` (Bun & Steinke 2016, Prop. 1.3).
pub fn zcdp_to_epsilon(rho: f64, delta: f64) -> f64 {
    rho + 2.0 * (rho * (1.0 / delta).ln()).sqrt()
}

/// Pairs a request may carry: its perturbation count, times (1 + head directions per
/// adapter direction) for block-wise layouts.
pub fn max_pairs_per_request(cfg: &AggregatorConfig, seq: u32) -> usize {
    let n = if seq == 0 {
        cfg.round.perturbations_per_client
    } else {
        cfg.pacing.extend_perturbations
    };
    n as usize * (1 + cfg.round.head_per_direction as usize)
}

/// Pairs one client may contribute to one round: every request it can be sent.
pub fn max_pairs_per_client(cfg: &AggregatorConfig) -> usize {
    (0..=cfg.pacing.max_extends)
        .map(|seq| max_pairs_per_request(cfg, seq))
        .sum()
}

/// Ingest checks of an update's pairs (`limit` = [`max_pairs_per_request`]).
pub fn check_pairs(
    cfg: &RobustConfig,
    limit: usize,
    pairs: &[SeedScalar],
) -> Result<(), (RejectReason, String)> {
    if pairs.len() > limit {
        return Err((
            RejectReason::TooManyPairs,
            format!(
                "{} pairs, the request asked for at most {limit}",
                pairs.len()
            ),
        ));
    }
    if let Some(p) = pairs.iter().find(|p| !p.g.is_finite()) {
        return Err((
            RejectReason::NonFinite,
            format!("non-finite scalar {} for seed {}", p.g, p.seed),
        ));
    }
    if let Some(p) = pairs.iter().find(|p| f64::from(p.g).abs() > cfg.max_abs_g) {
        return Err((
            RejectReason::OutOfBound,
            format!(
                "|g| = {:e} for seed {} exceeds robust.max_abs_g = {:e}",
                p.g, p.seed, cfg.max_abs_g
            ),
        ));
    }
    Ok(())
}

/// Secret key of the DP noise stream (32 bytes from the OS; see [`NoiseKey::from_os`]).
#[derive(Clone)]
pub struct NoiseKey([u8; 32]);

impl std::fmt::Debug for NoiseKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NoiseKey(..)")
    }
}

impl NoiseKey {
    /// A fresh key from `/dev/urandom`: noise an observer cannot predict or reproduce.
    pub fn from_os() -> std::io::Result<NoiseKey> {
        use std::io::Read;
        let mut k = [0u8; 32];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut k)?;
        Ok(NoiseKey(k))
    }

    /// A fixed key (tests only: reproducible noise).
    pub fn fixed(k: [u8; 32]) -> NoiseKey {
        NoiseKey(k)
    }

    /// Standard normal sample for (round, pair index), Box–Muller on two keyed blake3 words.
    fn normal(&self, round: u64, index: usize) -> f64 {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(&round.to_le_bytes());
        h.update(&(index as u64).to_le_bytes());
        let b = h.finalize();
        let w = |i: usize| u64::from_le_bytes(b.as_bytes()[i..i + 8].try_into().expect("8 bytes"));
        // 53-bit uniforms in (0, 1] and [0, 1).
        let u1 = ((w(0) >> 11) + 1) as f64 / (1u64 << 53) as f64;
        let u2 = (w(8) >> 11) as f64 / (1u64 << 53) as f64;
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// What [`robust_pairs`] did to one round's pairs.
#[derive(Debug, Clone, PartialEq)]
pub struct RobustOutcome {
    /// The pairs to commit (same seeds, same order).
    pub pairs: Vec<SeedScalar>,
    /// False when `pairs` equals the input bit for bit.
    pub changed: bool,
    pub clipped_pairs: u32,
    pub capped_clients: u32,
    /// zCDP ρ this commit spends (0 without DP).
    pub dp_rho: f64,
}

/// Median of a non-empty slice (reordered in place; mean of the middle two for even lengths).
/// O(n) by selection: the same elements a sort would put in the middle.
fn median(xs: &mut [f64]) -> f64 {
    let n = xs.len();
    let (below, mid, _) = xs.select_nth_unstable_by(n / 2, f64::total_cmp);
    let upper = *mid;
    if n % 2 == 1 {
        upper
    } else {
        // The lower middle is the largest element below the upper one.
        let lower = below
            .iter()
            .copied()
            .max_by(f64::total_cmp)
            .expect("n >= 2");
        0.5 * (lower + upper)
    }
}

/// Robust pooled scalars of one round, computed at commit time from the persisted raw pairs (so
/// a restarted aggregator commits exactly the same). `owners[i]` identifies the client of
/// `pairs[i]` (any stable id; a shorter `owners`, from a round persisted before owners were
/// recorded, disables the per-client cap for that round). `round` and `key` seed the DP noise.
#[allow(clippy::too_many_arguments)]
pub fn robust_pairs(
    robust: &RobustConfig,
    dp: &DpConfig,
    layout: &LoraLayout,
    pairs: &[SeedScalar],
    owners: &[u32],
    max_pairs_per_client: usize,
    round: u64,
    key: Option<&NoiseKey>,
) -> RobustOutcome {
    let mut g: Vec<f64> = pairs.iter().map(|p| f64::from(p.g)).collect();
    let mut clipped_pairs = 0u32;
    let mut capped_clients = 0u32;
    let mut dp_rho = 0.0;
    if dp.enabled {
        let c = dp.clip;
        for x in &mut g {
            if x.abs() > c {
                *x = x.clamp(-c, c);
                clipped_pairs += 1;
            }
        }
        if let Some(key) = key {
            let sensitivity = 2.0 * c * (max_pairs_per_client.max(1) as f64).sqrt();
            let sigma = dp.noise_multiplier * sensitivity;
            for (i, x) in g.iter_mut().enumerate() {
                *x += sigma * key.normal(round, i);
            }
            dp_rho = 1.0 / (2.0 * dp.noise_multiplier * dp.noise_multiplier);
        }
    } else {
        for block in [
            DirectionBlock::All,
            DirectionBlock::Adapter,
            DirectionBlock::Head,
        ] {
            let idx: Vec<usize> = (0..pairs.len())
                .filter(|&i| layout.block_of(pairs[i].seed) == block)
                .collect();
            if idx.len() < robust.min_pairs.max(2) as usize {
                continue;
            }
            let mut vals: Vec<f64> = idx.iter().map(|&i| g[i]).collect();
            let m = median(&mut vals);
            let mut dev: Vec<f64> = idx.iter().map(|&i| (g[i] - m).abs()).collect();
            let sigma = 1.4826 * median(&mut dev);
            if !(sigma > 0.0 && sigma.is_finite()) {
                continue;
            }
            if robust.clip_sigmas > 0.0 {
                let t = robust.clip_sigmas * sigma;
                for &i in &idx {
                    if (g[i] - m).abs() > t {
                        g[i] = g[i].clamp(m - t, m + t);
                        clipped_pairs += 1;
                    }
                }
            }
            if robust.client_rms_sigmas > 0.0 && owners.len() == pairs.len() {
                let cap = robust.client_rms_sigmas * sigma;
                let mut by_client: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
                for &i in &idx {
                    by_client.entry(owners[i]).or_default().push(i);
                }
                for ids in by_client.values() {
                    let ms =
                        ids.iter().map(|&i| (g[i] - m).powi(2)).sum::<f64>() / ids.len() as f64;
                    let rms = ms.sqrt();
                    if rms > cap {
                        let f = cap / rms;
                        for &i in ids {
                            g[i] = m + (g[i] - m) * f;
                        }
                        capped_clients += 1;
                    }
                }
            }
        }
    }
    let out: Vec<SeedScalar> = pairs
        .iter()
        .zip(&g)
        .map(|(p, &x)| SeedScalar {
            seed: p.seed,
            g: x as f32,
        })
        .collect();
    let changed = out
        .iter()
        .zip(pairs)
        .any(|(a, b)| a.g.to_bits() != b.g.to_bits());
    RobustOutcome {
        pairs: out,
        changed,
        clipped_pairs,
        capped_clients,
        dp_rho,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fwdllm_shared::perturb::gaussian_approx;

    fn layout() -> LoraLayout {
        AggregatorConfig {
            model: crate::config::ModelConfig {
                preset: "tiny".into(),
                ..Default::default()
            },
            ..Default::default()
        }
        .layout()
        .unwrap()
    }

    /// `clients × per` honest pairs: g ~ N(0.2, 1) (Irwin–Hall approximation).
    fn honest(clients: u32, per: usize, seed: u64) -> (Vec<SeedScalar>, Vec<u32>) {
        let mut g = vec![0f32; clients as usize * per];
        gaussian_approx(seed, &mut g);
        let pairs = g
            .iter()
            .enumerate()
            .map(|(i, &x)| SeedScalar {
                seed: 1000 + i as u64,
                g: x + 0.2,
            })
            .collect();
        let owners = (0..clients)
            .flat_map(|c| std::iter::repeat_n(c, per))
            .collect();
        (pairs, owners)
    }

    fn run(pairs: &[SeedScalar], owners: &[u32]) -> RobustOutcome {
        robust_pairs(
            &RobustConfig::default(),
            &DpConfig::default(),
            &layout(),
            pairs,
            owners,
            16,
            1,
            None,
        )
    }

    /// Σ_{k of client} g_k² after the robust step: the client's pull on the commit.
    fn energy(o: &RobustOutcome, owners: &[u32], c: u32) -> f64 {
        o.pairs
            .iter()
            .zip(owners)
            .filter(|(_, &w)| w == c)
            .map(|(p, _)| f64::from(p.g).powi(2))
            .sum()
    }

    #[test]
    fn honest_pools_are_unchanged() {
        for seed in 0..20 {
            let (pairs, owners) = honest(4, 16, seed);
            let o = run(&pairs, &owners);
            assert!(!o.changed, "seed {seed}: {o:?}");
            assert_eq!(o.pairs, pairs);
        }
    }

    #[test]
    fn a_scaled_client_is_bounded_to_a_few_honest_clients() {
        for scale in [10.0f32, 1e3, -1e3] {
            let (mut pairs, owners) = honest(5, 16, 7);
            let honest_energy: f64 = (0..4)
                .map(|c| energy(&run(&pairs, &owners), &owners, c))
                .sum::<f64>()
                / 4.0;
            for (p, &o) in pairs.iter_mut().zip(&owners) {
                if o == 4 {
                    p.g *= scale;
                }
            }
            let raw: f64 = pairs
                .iter()
                .zip(&owners)
                .filter(|(_, &o)| o == 4)
                .map(|(p, _)| f64::from(p.g).powi(2))
                .sum();
            let out = run(&pairs, &owners);
            assert!(out.changed && out.capped_clients == 1, "{out:?}");
            let e = energy(&out, &owners, 4);
            // RMS ≤ 3σ̂ around the median (σ̂ somewhat inflated by the attacker): under 20
            // honest clients' energy (4.5 in norm) whatever the scale, against 100× and more raw.
            assert!(
                e < 20.0 * honest_energy,
                "scale {scale}: {e} vs honest {honest_energy}"
            );
            assert!(e < raw / 5.0, "scale {scale}: the cap bound ({e} of {raw})");
            // The honest clients keep their values (the clip is 5σ̂ of a pool the minority
            // cannot move far).
            for (a, (b, &o)) in out.pairs.iter().zip(pairs.iter().zip(&owners)) {
                if o != 4 {
                    assert_eq!(a, b);
                }
            }
        }
    }

    #[test]
    fn a_sign_flipped_client_is_capped_like_any_other() {
        let (mut pairs, owners) = honest(5, 16, 3);
        for (p, &o) in pairs.iter_mut().zip(&owners) {
            if o == 4 {
                p.g = -p.g * 50.0;
            }
        }
        let out = run(&pairs, &owners);
        let e = energy(&out, &owners, 4);
        let honest_energy = energy(&out, &owners, 0);
        assert!(e < 20.0 * honest_energy, "{e} vs {honest_energy}");
    }

    #[test]
    fn single_outliers_are_clipped_to_the_pooled_scale() {
        let (mut pairs, owners) = honest(4, 16, 11);
        pairs[5].g = 400.0;
        let out = run(&pairs, &owners);
        assert_eq!(out.clipped_pairs, 1);
        assert!(out.pairs[5].g < 8.0, "{}", out.pairs[5].g);
    }

    #[test]
    fn ingest_rejects_non_finite_out_of_bound_and_floods() {
        let cfg = RobustConfig::default();
        let p = |g: f32| SeedScalar { seed: 1, g };
        assert_eq!(check_pairs(&cfg, 4, &[p(1.0), p(-2.0)]), Ok(()));
        for (pairs, want) in [
            (vec![p(f32::NAN)], RejectReason::NonFinite),
            (vec![p(1.0), p(f32::INFINITY)], RejectReason::NonFinite),
            (vec![p(f32::NEG_INFINITY)], RejectReason::NonFinite),
            (vec![p(2e4)], RejectReason::OutOfBound),
            (vec![p(-1e30)], RejectReason::OutOfBound),
            (vec![p(0.0); 5], RejectReason::TooManyPairs),
        ] {
            assert_eq!(
                check_pairs(&cfg, 4, &pairs).unwrap_err().0,
                want,
                "{pairs:?}"
            );
        }
    }

    #[test]
    fn dp_clips_to_the_public_bound_adds_noise_and_accounts() {
        let (mut pairs, owners) = honest(4, 16, 5);
        pairs[0].g = 100.0;
        let dp = DpConfig {
            enabled: true,
            clip: 1.0,
            noise_multiplier: 2.0,
            delta: 1e-6,
        };
        let key = NoiseKey::fixed([7; 32]);
        let run = || {
            robust_pairs(
                &RobustConfig::default(),
                &dp,
                &layout(),
                &pairs,
                &owners,
                16,
                3,
                Some(&key),
            )
        };
        let o = run();
        assert!((o.dp_rho - 1.0 / 8.0).abs() < 1e-15);
        // Noise of σ = z·2C·√16 = 16 per pair: the sample standard deviation says so.
        let noise: Vec<f64> = o
            .pairs
            .iter()
            .zip(&pairs)
            .map(|(a, b)| f64::from(a.g) - f64::from(b.g).clamp(-1.0, 1.0))
            .collect();
        let sd = (noise.iter().map(|x| x * x).sum::<f64>() / noise.len() as f64).sqrt();
        assert!((sd / 16.0 - 1.0).abs() < 0.3, "sd {sd}");
        // Same key, same round: same noise (a restart before persisting commits the same).
        assert_eq!(o, run());
        // R commits of ρ = 1/8 at δ = 1e-6.
        let c = RobustCounters {
            dp_commits: 100,
            dp_rho: 100.0 / 8.0,
            ..Default::default()
        };
        let eps = c.dp_epsilon(1e-6).unwrap();
        assert!((eps - (12.5 + 2.0 * (12.5f64 * 1e6f64.ln()).sqrt())).abs() < 1e-9);
        assert_eq!(RobustCounters::default().dp_epsilon(1e-6), None);
    }

    #[test]
    fn limits_follow_the_requests() {
        let mut cfg = AggregatorConfig::default();
        cfg.round.perturbations_per_client = 4;
        cfg.pacing.extend_perturbations = 2;
        cfg.pacing.max_extends = 3;
        assert_eq!(max_pairs_per_request(&cfg, 0), 4);
        assert_eq!(max_pairs_per_request(&cfg, 2), 2);
        assert_eq!(max_pairs_per_client(&cfg), 10);
        cfg.round.head_per_direction = 3;
        assert_eq!(max_pairs_per_request(&cfg, 0), 16);
    }
}
