//! Step control: the learning-rate schedule and the trust-region clamp, folded into the commit
//! coefficients so that any schedule survives replay (replicas only ever see (seed, coeff)).
//!
//! Commit of K pooled pairs at commit index t:
//! `c_k = −η(t) · s · g_k / K_b` where η(t) is the scheduled rate, K_b the pairs in seed k's
//! direction block (K for a dense layout; each block's mean is an unbiased estimate of its
//! gradient) and `s = min(1, trust_region · ‖θ‖ / ‖Δθ‖)` with
//! ‖Δθ‖ = η(t) · ‖Σ_b (Σ_{k∈b} g_k v_k) / K_b‖ and θ the whole
//! LoRA vector (A and B: with B = 0 at init, ‖θ_B‖ alone would forbid the first step).
//! The clamp bounds every step relative to the weights, which keeps long runs from diverging
//! when the noisy estimate is occasionally huge; the decaying schedule makes the total movement
//! after the horizon bounded.

use fwdllm_shared::update::SeedCoeff;
use fwdllm_shared::wire::SeedScalar;

use crate::config::{Schedule, StepConfig};

/// Scheduled learning rate at commit index `t` (0-based).
pub fn lr_at(cfg: &StepConfig, t: u64) -> f64 {
    let warm = if cfg.warmup_commits > 0 && t < cfg.warmup_commits {
        (t + 1) as f64 / cfg.warmup_commits as f64
    } else {
        1.0
    };
    let horizon = cfg.total_commits.max(1) as f64;
    let progress = (t.saturating_sub(cfg.warmup_commits) as f64 / horizon).min(1.0);
    let floor = cfg.min_lr_ratio;
    let factor = match cfg.schedule {
        Schedule::Constant => 1.0,
        Schedule::Linear => 1.0 - (1.0 - floor) * progress,
        Schedule::Cosine => {
            floor + (1.0 - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
        }
    };
    cfg.lr * warm * factor
}

/// The coefficients of one commit and what went into them.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub pairs: Vec<SeedCoeff>,
    pub lr: f64,
    /// ‖Δθ‖ after the clamp.
    pub step_norm: f64,
    pub clamped: bool,
}

/// Whether the trust region may scale the step of commit `t` (`mean_norm` within a relative
/// 1e-9 of the clamp, or over it): two sums of the same pairs in different orders differ far
/// less than that, so below it both are unclamped and the norm's last bits cannot matter.
pub fn may_clamp(cfg: &StepConfig, t: u64, mean_norm: f64, theta_norm: f64) -> bool {
    let max_norm = cfg.trust_region * theta_norm.max(cfg.trust_floor);
    lr_at(cfg, t) * mean_norm >= max_norm * (1.0 - 1e-9)
}

/// Builds commit coefficients from pooled pairs. `mean_norm` = ‖Σ_b U_b / K_b‖ (from the
/// pool), `block_pairs(seed)` = K_b, `theta_norm` = ‖θ‖ before the step.
pub fn make_step(
    cfg: &StepConfig,
    t: u64,
    pairs: &[SeedScalar],
    mean_norm: f64,
    block_pairs: &dyn Fn(u64) -> usize,
    theta_norm: f64,
) -> Step {
    let lr = lr_at(cfg, t);
    let raw_norm = lr * mean_norm;
    let max_norm = cfg.trust_region * theta_norm.max(cfg.trust_floor);
    let (scale, clamped) = if raw_norm > max_norm && raw_norm > 0.0 {
        (max_norm / raw_norm, true)
    } else {
        (1.0, false)
    };
    let pairs = pairs
        .iter()
        .map(|p| SeedCoeff {
            seed: p.seed,
            coeff: (-lr * scale * f64::from(p.g) / block_pairs(p.seed).max(1) as f64) as f32,
        })
        .collect();
    Step {
        pairs,
        lr,
        step_norm: raw_norm * scale,
        clamped,
    }
}

/// ‖θ‖ over every LoRA parameter.
pub fn params_norm(params: &[f32]) -> f64 {
    params
        .iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(schedule: Schedule) -> StepConfig {
        StepConfig {
            lr: 1.0,
            schedule,
            total_commits: 100,
            min_lr_ratio: 0.1,
            warmup_commits: 0,
            trust_region: 0.5,
            trust_floor: 0.0,
        }
    }

    #[test]
    fn may_clamp_covers_every_clamped_step_and_a_margin_below() {
        let c = cfg(Schedule::Constant);
        // lr 1, trust region 0.5, ‖θ‖ 2: the clamp is at a mean norm of 1.
        let clamped = |mean_norm: f64| {
            let step = make_step(&c, 0, &[], mean_norm, &|_| 1, 2.0);
            step.clamped
        };
        for (mean_norm, may, clamps) in [
            (0.5, false, false),
            (1.0 - 1e-6, false, false),
            (1.0 - 1e-12, true, false),
            (1.0 + 1e-12, true, true),
            (3.0, true, true),
        ] {
            assert_eq!(may_clamp(&c, 0, mean_norm, 2.0), may, "{mean_norm}");
            assert_eq!(clamped(mean_norm), clamps, "{mean_norm}");
        }
    }

    #[test]
    fn schedules_start_at_lr_and_end_at_the_floor() {
        for s in [Schedule::Linear, Schedule::Cosine] {
            let c = cfg(s);
            assert!((lr_at(&c, 0) - 1.0).abs() < 1e-12);
            assert!((lr_at(&c, 100) - 0.1).abs() < 1e-12);
            assert!((lr_at(&c, 10_000) - 0.1).abs() < 1e-12);
            assert!(lr_at(&c, 30) > lr_at(&c, 60));
        }
        assert_eq!(lr_at(&cfg(Schedule::Constant), 77), 1.0);
        let warm = StepConfig {
            warmup_commits: 4,
            ..cfg(Schedule::Constant)
        };
        assert_eq!(lr_at(&warm, 0), 0.25);
        assert_eq!(lr_at(&warm, 3), 1.0);
    }

    #[test]
    fn trust_region_clamps_the_step_norm() {
        let pairs = [
            SeedScalar { seed: 1, g: 4.0 },
            SeedScalar { seed: 2, g: -2.0 },
        ];
        // Unclamped: ‖Δθ‖ = lr/K·‖U‖ = 1/2·10 = 5 > 0.5·2 = 1.
        let two = |_: u64| 2usize;
        let s = make_step(&cfg(Schedule::Constant), 0, &pairs, 10.0 / 2.0, &two, 2.0);
        assert!(s.clamped);
        assert!((s.step_norm - 1.0).abs() < 1e-12);
        assert!((s.pairs[0].coeff - (-4.0 / 2.0 / 5.0)).abs() < 1e-7);
        assert!((s.pairs[1].coeff - (2.0 / 2.0 / 5.0)).abs() < 1e-7);
        let free = make_step(&cfg(Schedule::Constant), 0, &pairs, 1.0 / 2.0, &two, 2.0);
        assert!(!free.clamped);
        assert_eq!(free.pairs[0].coeff, -2.0);
    }
}
