//! The local-training recipe both local trainers ([`super::train`], [`super::sft_train`]) and
//! their shared step (`train_run::Stepper`) follow: the hyper-parameters
//! ([`TrainConfig`], its tuned defaults and the head-rows recipe), the seeds of a step (local
//! seeds, and the discriminative pick the agent daemon uses too: [`aligned_seed_in_block`]) and
//! its coefficients (block means, the schedule, the norm clamp).

use fwdllm_shared::lora::{LoraConfig, LoraLayout, LoraModule, Trainable};
use fwdllm_shared::update::SeedCoeff;
use serde::{Deserialize, Serialize};

use crate::data::SplitMix64;

/// Training hyper-parameters. The defaults are the tuned local-training recipe for
/// SmolLM2-135M on BBC News (see `train-local`); the federation reuses `eps`, `directions`,
/// `one_sided`, `lr`, `lr_half_life` and `max_update_norm`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// LoRA layout: rank 2, alpha 2, attn_q + attn_v of layers [26, 30), only B trained
    /// (6,144 trainable values for SmolLM2-135M). Fewer trainable values = less variance
    /// per direction; rank 4 on all 30 layers diverged even at lr 1 (issue 3).
    pub lora: LoraConfig,
    /// Examples per loss evaluation (one `llama_decode` at 8 sequences per decode).
    pub batch_size: usize,
    /// Directions (perturbations) per step, K.
    pub directions: u32,
    /// One-sided estimator (1+K loss evaluations per step) instead of central (2K).
    pub one_sided: bool,
    /// Perturbation size ε (calibrated: g agrees to 3–4 digits from 1e-2 to 1e-4 at f32).
    pub eps: f32,
    /// Initial learning rate.
    pub lr: f32,
    /// Steps after which the learning rate has halved (`lr / (1 + t / lr_half_life)`).
    pub lr_half_life: f32,
    /// Clamp on the L2 norm of one step's update over the trainable values: a guard against
    /// outlier steps, not the step size. A typical unclamped step at lr 3 is ~25 at the start
    /// (|g| ~0.3, d = 6144); a clamp of 1 bound every step and slowed learning ~25x
    /// (0.565 -> 0.670 held-out after 80 steps, measured with `train-local --max-update-norm 1`).
    pub max_update_norm: f32,
    /// Evaluate the dev split every this many steps (divergence detection, best adapter).
    pub dev_every: u32,
    /// Evaluate the held-out split every this many steps (report only).
    pub heldout_every: u32,
    /// Dev loss above best + this restores the best adapter and halves the learning rate.
    pub divergence_tol: f64,
    /// Stop after this many steps (0 = no limit).
    pub max_steps: u32,
    /// Stop after this many seconds of wall time (0 = no limit).
    pub max_wall_s: f64,
    /// Seed of the batch order and the perturbation seeds.
    pub seed: u64,
    /// Discriminative perturbation sampling (FwdLLM): draw this many candidate directions per
    /// perturbation and keep the one best aligned (|cosine|) with the previous step's update.
    /// 1 = off (plain random directions).
    pub discriminative_candidates: u32,
    /// Block-wise layouts (`lora.blockwise`): directions per step in the head block, on top of
    /// `directions` in the adapter block. They reuse the unperturbed pass's features, so they
    /// cost no forward pass.
    pub head_directions: u32,
}

/// Candidates per direction unless configured (local training and the agent daemon): 8 gave a
/// lower held-out loss than plain directions at every evaluation of two seeds, at no measurable
/// cost in time (`scripts/bench-discriminative.sh`, `target/bench/discriminative.json`).
pub const DEFAULT_DISCRIMINATIVE_CANDIDATES: u32 = 8;

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            lora: LoraConfig {
                rank: 2,
                alpha: 2.0,
                modules: vec![LoraModule::AttnQ, LoraModule::AttnV],
                layers: Some((26, 30)),
                trainable: Trainable::B,
                init_seed: 0,
                ..LoraConfig::default()
            },
            batch_size: 8,
            directions: 4,
            one_sided: true,
            eps: 1e-2,
            lr: 3.0,
            lr_half_life: 300.0,
            max_update_norm: 40.0,
            dev_every: 25,
            heldout_every: 100,
            divergence_tol: 0.15,
            max_steps: 0,
            max_wall_s: 900.0,
            seed: 1,
            discriminative_candidates: DEFAULT_DISCRIMINATIVE_CANDIDATES,
            head_directions: 0,
        }
    }
}

/// Directions per step of the head-rows recipe ([`TrainConfig::head_rows_recipe`]).
pub const HEAD_RECIPE_DIRECTIONS: u32 = 1024;

/// Examples per step of the head-rows recipe.
pub const HEAD_RECIPE_BATCH: usize = 32;

impl TrainConfig {
    /// The recipe for a classification task with `n_labels` labels, what `train-local`, the
    /// demo and `bench-federation` run unless told otherwise: verbalizer head rows only (a
    /// forward-gradient probe on the frozen model's final hidden state, starting at zero-shot),
    /// 1,024 directions on batches of 32, lr 0.01 halving over 2,000 steps. With no LoRA
    /// tensors a perturbation costs a `K x n_embd` product on cached features, not a forward
    /// pass, so a step can afford about as many directions as the head has values (`K x 577`):
    /// the estimate then nears the exact batch gradient. Chosen on dev accuracy of AG News by
    /// `tests/bench/examples/probe_features.rs --fg-grid` (64 directions on batches of 8, the previous
    /// recipe, trailed the exact gradient by 3–5 points there) and checked by `train-local` on
    /// BBC and AG News (docs/RESULTS.md, "Classification: local training").
    pub fn head_rows_recipe(n_labels: usize) -> TrainConfig {
        let mut t = TrainConfig::default();
        t.lora.modules.clear();
        t.lora.head_rows = n_labels as u32;
        t.directions = HEAD_RECIPE_DIRECTIONS;
        t.batch_size = HEAD_RECIPE_BATCH;
        t.lr = 0.01;
        t.lr_half_life = 2000.0;
        t.dev_every = 100;
        t.heldout_every = 500;
        t
    }

    /// Learning rate at step `t` (0-based).
    pub fn lr_at(&self, t: u64, lr_scale: f32) -> f32 {
        let half = self.lr_half_life.max(1e-6);
        self.lr * lr_scale / (1.0 + t as f32 / half)
    }

    /// Coefficients for one step from the directional derivatives `g` of `seeds`, with the
    /// update-norm clamp applied. `scratch` is reused across steps.
    pub fn step_coefficients(
        &self,
        layout: &LoraLayout,
        seeds: &[u64],
        g: &[f32],
        lr: f32,
        scratch: &mut Vec<f32>,
    ) -> (Vec<SeedCoeff>, f64) {
        let mut pairs = block_mean_coefficients(layout, seeds, g, lr);
        let n = layout.trainable_len();
        scratch.clear();
        scratch.resize(n, 0.0);
        let mut dir = vec![0f32; n];
        for p in &pairs {
            fwdllm_shared::update::direction(layout, p.seed, &mut dir);
            for (s, v) in scratch.iter_mut().zip(&dir) {
                *s += p.coeff * v;
            }
        }
        let norm = scratch
            .iter()
            .map(|&x| (x as f64) * (x as f64))
            .sum::<f64>()
            .sqrt();
        // The clamp decays with the learning-rate schedule (lr / self.lr), otherwise a clamp
        // that is always active would turn the schedule off.
        let clamp = self.max_update_norm as f64 * (lr / self.lr.max(f32::MIN_POSITIVE)) as f64;
        if clamp > 0.0 && norm > clamp {
            let s = (clamp / norm) as f32;
            for p in &mut pairs {
                p.coeff *= s;
            }
            return (pairs, clamp);
        }
        (pairs, norm)
    }
}

impl TrainConfig {
    /// True once the step or wall-time budget is spent.
    pub fn budget_spent(&self, step: u64, wall_s: f64) -> bool {
        (self.max_steps > 0 && step >= self.max_steps as u64)
            || (self.max_wall_s > 0.0 && wall_s >= self.max_wall_s)
    }
}

/// `c_k = −lr · g_k / K_b`, with `K_b` the number of seeds in seed k's direction block: each
/// block's mean is then an unbiased estimate of that block's gradient, however many
/// directions each block got (for a dense layout `K_b` is simply K).
pub fn block_mean_coefficients(
    layout: &LoraLayout,
    seeds: &[u64],
    g: &[f32],
    lr: f32,
) -> Vec<SeedCoeff> {
    let count = |b| {
        seeds
            .iter()
            .filter(|&&s| layout.block_of(s) == b)
            .count()
            .max(1) as f32
    };
    seeds
        .iter()
        .zip(g)
        .map(|(&seed, &g)| SeedCoeff {
            seed,
            coeff: -lr * g / count(layout.block_of(seed)),
        })
        .collect()
}

/// Seeds of one step: `n_adapter` seeds whose directions perturb the adapter (or everything,
/// for a dense layout), then `n_head` seeds in the head block of a block-wise layout, each the
/// most aligned of `candidates` seeds of its block. `draw(i)` is the i-th raw seed of the step,
/// consumed in order and moved into its block with [`LoraLayout::seed_in_block`].
pub fn block_seeds(
    layout: &LoraLayout,
    n_adapter: u32,
    n_head: u32,
    candidates: u32,
    previous: Option<&[f32]>,
    draw: impl Fn(u32) -> u64,
    scratch: &mut Vec<f32>,
) -> Vec<u64> {
    use fwdllm_shared::lora::DirectionBlock;
    let c = candidates.max(1);
    let (adapter_block, head_block) = if layout.config().blockwise {
        (DirectionBlock::Adapter, Some(DirectionBlock::Head))
    } else {
        (DirectionBlock::All, None)
    };
    let mut plan = vec![adapter_block; n_adapter as usize];
    if let Some(b) = head_block {
        plan.extend(std::iter::repeat_n(b, n_head as usize));
    }
    plan.iter()
        .enumerate()
        .map(|(k, &block)| {
            let raw = (0..c).map(|j| draw(k as u32 * c + j));
            aligned_seed_in_block(layout, block, raw, previous, scratch)
        })
        .collect()
}

/// Of raw candidate seeds, each moved into `block` ([`LoraLayout::seed_in_block`]), the one
/// best aligned with `previous` ([`most_aligned_seed`]): one direction's discriminative pick,
/// shared by local training and the agent daemon.
pub fn aligned_seed_in_block(
    layout: &LoraLayout,
    block: fwdllm_shared::lora::DirectionBlock,
    raw: impl IntoIterator<Item = u64>,
    previous: Option<&[f32]>,
    scratch: &mut Vec<f32>,
) -> u64 {
    let cands: Vec<u64> = raw
        .into_iter()
        .map(|s| LoraLayout::seed_in_block(s, block))
        .collect();
    most_aligned_seed(layout, &cands, previous, scratch)
}

/// Of `candidates`, the seed whose direction is best aligned (largest |v·d|; directions of one
/// block have the same norm) with `previous` (the last update). The first candidate wins ties,
/// and without a previous update the first candidate is taken.
pub fn most_aligned_seed(
    layout: &LoraLayout,
    candidates: &[u64],
    previous: Option<&[f32]>,
    scratch: &mut Vec<f32>,
) -> u64 {
    let Some(prev) = previous else {
        return candidates[0];
    };
    scratch.resize(prev.len(), 0.0);
    let mut best = (candidates[0], f64::NEG_INFINITY);
    for &c in candidates {
        fwdllm_shared::update::direction(layout, c, scratch);
        let dot: f64 = scratch
            .iter()
            .zip(prev)
            .map(|(&v, &d)| f64::from(v) * f64::from(d))
            .sum();
        if dot.abs() > best.1 {
            best = (c, dot.abs());
        }
    }
    best.0
}

/// Seed of direction `k` at step `step` (local training only; the federation derives seeds
/// with `fwdllm_shared::perturb`).
pub fn local_seed(seed: u64, step: u64, k: u32) -> u64 {
    let mut r =
        SplitMix64::new(seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ ((k as u64) << 48));
    r.next_u64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn most_aligned_seed_prefers_the_previous_direction_and_ignores_its_sign() {
        let layout = LoraLayout::new(
            &fwdllm_shared::lora::ModelShape::smollm2_135m(),
            &TrainConfig::default().lora,
        )
        .unwrap();
        let n = layout.trainable_len();
        let mut prev = vec![0f32; n];
        fwdllm_shared::perturb::direction(42, &mut prev);
        for x in &mut prev {
            *x *= -0.3; // opposite sign, other scale: |cosine| is what counts
        }
        let mut scratch = Vec::new();
        assert_eq!(
            most_aligned_seed(&layout, &[5, 42, 7], Some(&prev), &mut scratch),
            42
        );
        assert_eq!(
            most_aligned_seed(&layout, &[5, 42, 7], None, &mut scratch),
            5
        );
        assert_eq!(
            most_aligned_seed(&layout, &[9], Some(&prev), &mut scratch),
            9
        );
    }
}
