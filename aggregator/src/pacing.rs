//! Variance-controlled pacing: the pooled forward-gradient estimate of one round and the
//! dimensionless statistic that decides when it is good enough to commit.
//!
//! Each pair (seed k, scalar g_k) says "the loss slope along Rademacher direction v_k is g_k".
//! The pooled estimate is ĝ = U/K with U = Σ g_k v_k (d = trainable parameters). Because
//! v_k·v_k = d exactly for Rademacher directions,
//!
//! ```text
//! S = (‖U‖² − d·Q) / (K(K−1)),   Q = Σ g_k²
//! ```
//!
//! is an unbiased estimate of ‖∇L‖² (the cross terms g_k g_j v_k·v_j, k ≠ j, only), and under
//! the null hypothesis "no common gradient" (g independent of v) it has standard error
//! `SE₀ = m·sqrt(2d / (K(K−1)))` with m = Q/K. The pacing statistic is
//!
//! ```text
//! z = S / SE₀ = (‖U‖² − d·Q) / (m · sqrt(2d·K(K−1)))
//! ```
//!
//! the signal-to-noise ratio of the pooled estimate: how many standard errors the detected
//! common gradient lies above pure noise. It is dimensionless and invariant to the scale of the
//! loss and of g (unlike FwdLLM's absolute variance threshold): z ≈ ρ·K/sqrt(2d) with
//! ρ = ‖∇L‖²/E\[g²\] ∈ [0, 1] the share of directional-derivative energy that is common signal.
//! A round commits when z ≥ `pacing.target_z` (default 2: the step direction holds a detectable
//! gradient), or at the cap/deadline. We also report the gradient noise scale
//! `B = d·m/S` (McCandlish et al. 2018: the K beyond which more pairs per step stop paying).

//!
//! A block-wise layout (`lora.blockwise`) gets one pool per direction block ([`RoundPool`]):
//! the statistic above holds within a block (its directions are Rademacher over the block's
//! d_b values and zero elsewhere). Pacing reads the adapter block, whose directions cost a
//! forward pass each; head-block directions ride along at no pass.

use fwdllm_shared::lora::{DirectionBlock, LoraLayout};
#[cfg(test)]
use fwdllm_shared::perturb::direction;
use fwdllm_shared::perturb::direction_at;
use fwdllm_shared::wire::SeedScalar;

/// Running pool of one direction block in one round: U accumulated in f64 (order-independent
/// enough for a statistic; the committed step itself is replayed in f32 from the pairs, not
/// from U).
#[derive(Debug, Clone)]
pub struct Pool {
    d: usize,
    /// Direction index of the block's first value.
    start: u64,
    u: Vec<f64>,
    q: f64,
    k: usize,
    scratch: Vec<f32>,
}

impl Pool {
    pub fn new(trainable_len: usize) -> Pool {
        Pool::for_span(0, trainable_len)
    }

    /// A pool over direction indices `start .. start + len`.
    pub fn for_span(start: u64, len: usize) -> Pool {
        Pool {
            d: len,
            start,
            u: vec![0.0; len],
            q: 0.0,
            k: 0,
            scratch: vec![0.0; len],
        }
    }

    pub fn add(&mut self, p: SeedScalar) {
        direction_at(p.seed, self.start, &mut self.scratch);
        let g = f64::from(p.g);
        for (u, &v) in self.u.iter_mut().zip(&self.scratch) {
            *u += g * f64::from(v);
        }
        self.q += g * g;
        self.k += 1;
    }

    pub fn len(&self) -> usize {
        self.k
    }

    pub fn is_empty(&self) -> bool {
        self.k == 0
    }

    /// ‖U‖ = ‖Σ g_k v_k‖.
    pub fn u_norm(&self) -> f64 {
        self.u.iter().map(|x| x * x).sum::<f64>().sqrt()
    }

    /// Mean g² (the pooled second moment of the directional derivatives).
    pub fn mean_g2(&self) -> f64 {
        if self.k == 0 {
            0.0
        } else {
            self.q / self.k as f64
        }
    }

    /// Unbiased estimate of ‖∇L‖² (may be negative from noise), None with fewer than 2 pairs.
    pub fn signal(&self) -> Option<f64> {
        if self.k < 2 {
            return None;
        }
        let k = self.k as f64;
        let uu: f64 = self.u.iter().map(|x| x * x).sum();
        Some((uu - self.d as f64 * self.q) / (k * (k - 1.0)))
    }

    /// The pacing z statistic (0 with fewer than 2 pairs or all-zero g).
    pub fn z(&self) -> f64 {
        let m = self.mean_g2();
        match self.signal() {
            Some(s) if m > 0.0 => {
                let k = self.k as f64;
                s / (m * (2.0 * self.d as f64 / (k * (k - 1.0))).sqrt())
            }
            _ => 0.0,
        }
    }

    /// Gradient noise scale B = d·m/S (∞ when no signal is detected).
    pub fn noise_scale(&self) -> f64 {
        match self.signal() {
            Some(s) if s > 0.0 => self.d as f64 * self.mean_g2() / s,
            _ => f64::INFINITY,
        }
    }
}

/// The pools of one round, one per direction block of the layout (one for a dense layout).
/// The first pool is the pacing block: the whole vector, or the adapter of a block-wise layout.
#[derive(Debug, Clone)]
pub struct RoundPool {
    layout: LoraLayout,
    pools: Vec<(DirectionBlock, Pool)>,
}

impl RoundPool {
    pub fn new(layout: &LoraLayout) -> RoundPool {
        let blocks: &[DirectionBlock] = if layout.config().blockwise {
            &[DirectionBlock::Adapter, DirectionBlock::Head]
        } else {
            &[DirectionBlock::All]
        };
        let pools = blocks
            .iter()
            .map(|&b| {
                let span = layout.block_span(b);
                (
                    b,
                    Pool::for_span(span.start, (span.end - span.start) as usize),
                )
            })
            .collect();
        RoundPool {
            layout: layout.clone(),
            pools,
        }
    }

    fn pool_of(&mut self, seed: u64) -> &mut Pool {
        let b = self.layout.block_of(seed);
        let i = self.pools.iter().position(|(pb, _)| *pb == b).unwrap_or(0);
        &mut self.pools[i].1
    }

    pub fn add(&mut self, p: SeedScalar) {
        self.pool_of(p.seed).add(p);
    }

    /// The pacing block's pool.
    pub fn pacing(&self) -> &Pool {
        &self.pools[0].1
    }

    /// Pairs in the pacing block (the perturbations that cost a forward pass).
    pub fn len(&self) -> usize {
        self.pacing().len()
    }

    pub fn is_empty(&self) -> bool {
        self.pools.iter().all(|(_, p)| p.is_empty())
    }

    /// Pairs in every block.
    pub fn total_pairs(&self) -> usize {
        self.pools.iter().map(|(_, p)| p.len()).sum()
    }

    pub fn z(&self) -> f64 {
        self.pacing().z()
    }

    pub fn mean_g2(&self) -> f64 {
        self.pacing().mean_g2()
    }

    /// K_b: pairs in the block of `seed` (at least 1).
    pub fn block_pairs(&self, seed: u64) -> usize {
        let b = self.layout.block_of(seed);
        self.pools
            .iter()
            .find(|(pb, _)| *pb == b)
            .map_or(1, |(_, p)| p.len().max(1))
    }

    /// ‖Σ_b U_b / K_b‖: the norm of the per-block mean estimate (blocks are disjoint).
    pub fn mean_norm(&self) -> f64 {
        self.pools
            .iter()
            .filter(|(_, p)| !p.is_empty())
            .map(|(_, p)| (p.u_norm() / p.len() as f64).powi(2))
            .sum::<f64>()
            .sqrt()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fwdllm_shared::perturb::derive_seed;

    fn dot(a: &[f32], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| f64::from(*x) * y).sum()
    }

    #[test]
    fn z_is_large_for_a_true_gradient_and_small_for_noise() {
        let d = 512;
        let grad: Vec<f64> = (0..d).map(|i| ((i % 7) as f64 - 3.0) * 0.01).collect();
        let mut v = vec![0f32; d];
        let mut signal = Pool::new(d);
        let mut noise = Pool::new(d);
        for k in 0..200u32 {
            let seed = derive_seed(1, 2, 3, k);
            direction(seed, &mut v);
            signal.add(SeedScalar {
                seed,
                g: dot(&v, &grad) as f32,
            });
            // g unrelated to v: derived from another seed's direction.
            direction(seed ^ 0xdead_beef, &mut v);
            noise.add(SeedScalar {
                seed,
                g: dot(&v, &grad) as f32,
            });
        }
        assert!(signal.z() > 5.0, "signal z = {}", signal.z());
        assert!(noise.z().abs() < 4.0, "noise z = {}", noise.z());
        // The unbiased signal estimate recovers ‖∇‖² within sampling error.
        let g2: f64 = grad.iter().map(|x| x * x).sum();
        let s = signal.signal().unwrap();
        assert!((s / g2 - 1.0).abs() < 0.5, "S = {s}, ‖∇‖² = {g2}");
    }

    #[test]
    fn z_is_invariant_to_loss_scale() {
        let d = 256;
        let mut a = Pool::new(d);
        let mut b = Pool::new(d);
        let mut v = vec![0f32; d];
        for k in 0..50u32 {
            let seed = derive_seed(9, 9, 9, k);
            direction(seed, &mut v);
            let g = v[..16].iter().sum::<f32>() + (k % 3) as f32;
            a.add(SeedScalar { seed, g });
            b.add(SeedScalar {
                seed,
                g: g * 1024.0,
            });
        }
        assert!((a.z() - b.z()).abs() < 1e-9 * a.z().abs().max(1.0));
        assert!(a.z() != 0.0);
    }

    #[test]
    fn degenerate_pools_give_zero() {
        let mut p = Pool::new(8);
        assert_eq!(p.z(), 0.0);
        p.add(SeedScalar { seed: 1, g: 1.0 });
        assert_eq!(p.z(), 0.0);
        assert!(p.noise_scale().is_infinite());
    }

    fn blockwise_layout() -> LoraLayout {
        let shape = fwdllm_shared::fixtures::golden_shape();
        let config = fwdllm_shared::lora::LoraConfig {
            layers: Some((1, 2)),
            head_rows: 3,
            blockwise: true,
            ..Default::default()
        };
        LoraLayout::new(&shape, &config).unwrap()
    }

    #[test]
    fn blockwise_round_pool_paces_on_the_adapter_and_averages_each_block_apart() {
        let layout = blockwise_layout();
        let mut pool = RoundPool::new(&layout);
        let adapter = [2u64, 4];
        let head = [1u64, 3, 5, 7];
        for &seed in &adapter {
            pool.add(SeedScalar { seed, g: 1.0 });
        }
        for &seed in &head {
            pool.add(SeedScalar { seed, g: 0.5 });
        }
        // Pacing counts the directions that cost a forward pass.
        assert_eq!(pool.len(), 2);
        assert_eq!(pool.total_pairs(), 6);
        assert_eq!(pool.block_pairs(4), 2);
        assert_eq!(pool.block_pairs(7), 4);
        // The norm of the per-block means, from the layout-aware directions.
        let n = layout.trainable_len();
        let mut mean = vec![0f64; n];
        let mut v = vec![0f32; n];
        for (seeds, g, k) in [(&adapter[..], 1.0, 2.0), (&head[..], 0.5, 4.0)] {
            for &seed in seeds {
                fwdllm_shared::update::direction(&layout, seed, &mut v);
                for (m, x) in mean.iter_mut().zip(&v) {
                    *m += g * f64::from(*x) / k;
                }
            }
        }
        let want = mean.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!(
            (pool.mean_norm() - want).abs() < 1e-9 * want,
            "{} vs {want}",
            pool.mean_norm()
        );
    }
}
