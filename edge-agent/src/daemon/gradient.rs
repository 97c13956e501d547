//! Where directional derivatives come from: the [`GradientSource`] trait, its synthetic
//! implementation (quadratic loss, no model) and loss statistics.

use fwdllm_shared::lora::LoraWeights;
use fwdllm_shared::perturb;
use fwdllm_shared::wire::TaskParams;

/// One request for directional derivatives at fixed weights.
#[derive(Debug, Clone, Copy)]
pub struct GradientRequest<'a> {
    /// Weights at the round's model version.
    pub weights: &'a LoraWeights,
    /// Seeds of the directions v_k (see `fwdllm_shared::perturb::direction`).
    pub seeds: &'a [u64],
    /// Perturbation size ε.
    pub eps: f32,
    /// Batch size, one-sided or central differences, token budget.
    pub task: &'a TaskParams,
    /// Round being answered (sources may use it to pick their batch deterministically).
    pub round: u64,
}

/// Result of a [`GradientRequest`].
#[derive(Debug, Clone, PartialEq)]
pub struct GradientBatch {
    /// g_k ≈ ∇L(θ)·v(seed_k), one per seed, in request order.
    pub g: Vec<f32>,
    /// Examples evaluated.
    pub samples: u32,
    /// Statistics of the losses observed.
    pub loss: LossStats,
}

/// Running mean and M2 (Welford) of observed losses; mergeable across chunks.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LossStats {
    pub count: u64,
    pub mean: f64,
    pub m2: f64,
}

impl LossStats {
    pub fn push(&mut self, x: f64) {
        self.count += 1;
        let d = x - self.mean;
        self.mean += d / self.count as f64;
        self.m2 += d * (x - self.mean);
    }

    /// Chan et al.'s parallel combination.
    pub fn merge(&mut self, other: &LossStats) {
        if other.count == 0 {
            return;
        }
        if self.count == 0 {
            *self = *other;
            return;
        }
        let n = (self.count + other.count) as f64;
        let d = other.mean - self.mean;
        self.mean += d * other.count as f64 / n;
        self.m2 += other.m2 + d * d * self.count as f64 * other.count as f64 / n;
        self.count += other.count;
    }
}

/// Why a source failed.
#[derive(Debug, thiserror::Error)]
pub enum GradientError {
    #[error("the weights do not fit this gradient source: {0}")]
    Layout(String),
    #[error("engine failed: {0}")]
    Engine(String),
    #[error("gradient source returned {got} values for {want} seeds")]
    Count { want: usize, got: usize },
}

/// Computes directional derivatives of the training loss.
///
/// The daemon calls it on a blocking thread with a few seeds at a time
/// (`gradient.seeds_per_chunk`), pinging the watchdog and checking for shutdown between calls,
/// so one call should take at most a few forward passes.
pub trait GradientSource: Send {
    fn forward_gradients(
        &mut self,
        req: &GradientRequest<'_>,
    ) -> Result<GradientBatch, GradientError>;

    /// Short description for logs ("synthetic quadratic", "engine SmolLM2 on shard-0.jsonl").
    fn describe(&self) -> String;

    /// Scores `weights` on this source's fixed dev subset (model selection; the aggregator asks
    /// for it every `selection.eval_every` versions). `None`: this source has no dev subset.
    fn evaluate_dev(&mut self, weights: &LoraWeights) -> Result<Option<DevScore>, GradientError> {
        let _ = weights;
        Ok(None)
    }
}

/// A dev-subset evaluation: what an `EvalReport` carries.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DevScore {
    pub examples: u32,
    /// Predicted right (0 where the task has no accuracy).
    pub correct: u32,
    /// Sum of per-example losses.
    pub loss_sum: f64,
}

/// Cheap deterministic objective for tests and simulations:
/// L(θ) = ½‖θ_trainable − θ*‖² with θ* = `scale` · gaussian_approx(`target_seed`).
///
/// Same objective as the aggregator's simulated clients, so both kinds of client agree. The
/// derivative is computed in closed form — for a quadratic the central difference is exact — and
/// a one-sided request adds the ε·‖v‖²/2 bias a real one-sided difference has.
#[derive(Debug, Clone)]
pub struct SyntheticSource {
    target_seed: u64,
    scale: f32,
    target: Vec<f32>,
    scratch: Vec<f32>,
    hang_at_round: u64,
}

impl SyntheticSource {
    pub fn new(target_seed: u64, scale: f32) -> Self {
        Self {
            target_seed,
            scale,
            target: Vec::new(),
            scratch: Vec::new(),
            hang_at_round: 0,
        }
    }

    /// Fault injection: never return from the computation of round `round` (0 = never), as a
    /// wedged forward pass would. Used to prove that the watchdog then stops being pinged.
    pub fn hang_at_round(mut self, round: u64) -> Self {
        self.hang_at_round = round;
        self
    }

    fn ensure_target(&mut self, len: usize) {
        if self.target.len() != len {
            self.target.resize(len, 0.0);
            perturb::gaussian_approx(self.target_seed, &mut self.target);
            for t in &mut self.target {
                *t *= self.scale;
            }
        }
    }

    /// ½‖θ − θ*‖² (f64 accumulation in layout order).
    pub fn loss(&mut self, weights: &LoraWeights) -> f64 {
        self.ensure_target(weights.layout().trainable_len());
        weights
            .trainable_values()
            .zip(&self.target)
            .map(|(x, t)| {
                let d = f64::from(x - t);
                0.5 * d * d
            })
            .sum()
    }
}

impl GradientSource for SyntheticSource {
    fn forward_gradients(
        &mut self,
        req: &GradientRequest<'_>,
    ) -> Result<GradientBatch, GradientError> {
        if self.hang_at_round != 0 && req.round == self.hang_at_round {
            log::warn!(
                "round {}: hanging the gradient computation on purpose (gradient.synthetic_hang_at_round)",
                req.round
            );
            loop {
                std::thread::park();
            }
        }
        let n = req.weights.layout().trainable_len();
        let loss = self.loss(req.weights);
        self.scratch.resize(n, 0.0);
        let mut g = Vec::with_capacity(req.seeds.len());
        let mut stats = LossStats::default();
        for &seed in req.seeds {
            fwdllm_shared::update::direction(req.weights.layout(), seed, &mut self.scratch);
            let n = fwdllm_shared::update::direction_norm_sq(req.weights.layout(), seed);
            let dot: f64 = req
                .weights
                .trainable_values()
                .zip(&self.target)
                .zip(&self.scratch)
                .map(|((x, t), v)| f64::from(x - t) * f64::from(*v))
                .sum();
            let bias = if req.task.one_sided {
                f64::from(req.eps) * n / 2.0
            } else {
                0.0
            };
            g.push((dot + bias) as f32);
            stats.push(loss);
        }
        Ok(GradientBatch {
            samples: req.seeds.len() as u32,
            g,
            loss: stats,
        })
    }

    fn describe(&self) -> String {
        format!(
            "synthetic quadratic (target seed {}, scale {})",
            self.target_seed, self.scale
        )
    }

    /// The quadratic itself, as one "example" with no accuracy: lets model selection run end
    /// to end without a model.
    fn evaluate_dev(&mut self, weights: &LoraWeights) -> Result<Option<DevScore>, GradientError> {
        Ok(Some(DevScore {
            examples: 1,
            correct: 0,
            loss_sum: self.loss(weights),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fwdllm_shared::lora::{LoraConfig, LoraLayout};
    use fwdllm_shared::update::add_direction;

    fn weights() -> LoraWeights {
        let shape = fwdllm_shared::fixtures::small_llama(2, 16, 2, 1);
        LoraWeights::init(LoraLayout::new(&shape, &LoraConfig::default()).unwrap())
    }

    #[test]
    fn synthetic_slope_matches_a_central_difference() {
        let w = weights();
        let mut src = SyntheticSource::new(3, 0.5);
        let task = TaskParams::default();
        let seeds = [11u64, 12, 13];
        let got = src
            .forward_gradients(&GradientRequest {
                weights: &w,
                seeds: &seeds,
                eps: 1e-2,
                task: &task,
                round: 0,
            })
            .unwrap();
        assert_eq!(got.g.len(), 3);
        for (&seed, &g) in seeds.iter().zip(&got.g) {
            let (mut plus, mut minus) = (w.clone(), w.clone());
            add_direction(&mut plus, seed, 1e-2);
            add_direction(&mut minus, seed, -1e-2);
            let fd = (src.loss(&plus) - src.loss(&minus)) / 2e-2;
            assert!(
                (fd - f64::from(g)).abs() < 1e-2 * fd.abs().max(1.0),
                "seed {seed}: fd {fd} vs g {g}"
            );
        }
        assert_eq!(got.samples, 3);
        assert_eq!(got.loss.count, 3);
    }

    #[test]
    fn synthetic_step_along_negative_gradient_lowers_the_loss() {
        let mut w = weights();
        let mut src = SyntheticSource::new(3, 0.5);
        let task = TaskParams::default();
        let before = src.loss(&w);
        let seeds: Vec<u64> = (0..8).collect();
        let b = src
            .forward_gradients(&GradientRequest {
                weights: &w,
                seeds: &seeds,
                eps: 1e-3,
                task: &task,
                round: 0,
            })
            .unwrap();
        let n = w.layout().trainable_len() as f32;
        for (&s, &g) in seeds.iter().zip(&b.g) {
            add_direction(&mut w, s, -0.5 * g / n / seeds.len() as f32);
        }
        assert!(src.loss(&w) < before);
    }

    #[test]
    fn loss_stats_merge_equals_sequential() {
        let xs = [1.0, 4.0, 2.5, 8.0, -1.0, 3.0];
        let mut all = LossStats::default();
        xs.iter().for_each(|&x| all.push(x));
        let (mut a, mut b) = (LossStats::default(), LossStats::default());
        xs[..2].iter().for_each(|&x| a.push(x));
        xs[2..].iter().for_each(|&x| b.push(x));
        a.merge(&b);
        assert_eq!(a.count, all.count);
        assert!(
            (a.mean - all.mean).abs() < 1e-12 && (a.m2 - all.m2).abs() < 1e-9,
            "{a:?} vs {all:?}"
        );
    }
}
