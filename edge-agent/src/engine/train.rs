//! Local (single-process) forward-gradient SGD: FwdLLM's centralised reference, and the place
//! where the estimator, learning rate, schedule and clamp defaults ([`TrainConfig`]) are tuned
//! before the federation reuses them.
//!
//! One step: draw K seeds, estimate `g_k` with [`Engine::forward_gradients_with_loss`], form
//! coefficients `c_k = −lr_t · g_k / K`, shrink them so that the step's L2 norm
//! `‖Σ c_k v_k‖ ≤ max_update_norm`, and apply them with `fwdllm_shared::update::apply_commit` —
//! the same `(seed, coeff)` math a federated commit replays.
//! Stability: `lr_t = lr / (1 + t / lr_half_life)`; every `dev_every` steps the dev split is
//! evaluated, the best adapter (dev accuracy, then dev loss) is kept, and a dev loss above
//! `best + divergence_tol` restores the best weights and halves the learning rate.
//! The held-out split is only reported, never used for a decision.

use std::path::{Path, PathBuf};

use fwdllm_shared::lora::{LoraConfig, LoraLayout, LoraModule, LoraWeights, Trainable};
use fwdllm_shared::update::SeedCoeff;
use serde::{Deserialize, Serialize};

use super::train_run::{write_report, BestOnDev, RunAt, RunLog, Stepper};
use super::{Engine, EngineError, EvalReport};
use crate::data::{Example, Split, SplitMix64};

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
    /// `examples/probe_features.rs --fg-grid` (64 directions on batches of 8, the previous
    /// recipe, trailed the exact gradient by 3–5 points there) and checked by `train-local` on
    /// BBC and AG News (README, "Learning").
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

/// Batches of a training split in a fixed-seed shuffle, reshuffled at the end of each epoch
/// (both local trainers walk their data this way).
#[derive(Debug)]
pub struct EpochBatches {
    order: Vec<usize>,
    cursor: usize,
    rng: SplitMix64,
}

impl EpochBatches {
    pub fn new(n: usize, seed: u64) -> EpochBatches {
        let mut order: Vec<usize> = (0..n).collect();
        let mut rng = SplitMix64::new(seed);
        rng.shuffle(&mut order);
        EpochBatches {
            order,
            cursor: 0,
            rng,
        }
    }

    /// The next `size` (at least 1) examples of `data`.
    pub fn next<T: Clone>(&mut self, data: &[T], size: usize) -> Vec<T> {
        let mut batch = Vec::with_capacity(size.max(1));
        while batch.len() < size.max(1) {
            if self.cursor == self.order.len() {
                self.rng.shuffle(&mut self.order);
                self.cursor = 0;
            }
            batch.push(data[self.order[self.cursor]].clone());
            self.cursor += 1;
        }
        batch
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

/// One evaluation point in the metrics.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalPoint {
    pub step: u64,
    pub wall_s: f64,
    /// Wall time spent training (forward gradients and updates), i.e. without evaluations.
    #[serde(default)]
    pub train_s: f64,
    pub loss_evaluations: u64,
    pub split: String,
    pub accuracy: f64,
    pub loss: f64,
}

impl EvalPoint {
    fn new(at: RunAt, split: &str, r: &EvalReport) -> EvalPoint {
        EvalPoint {
            step: at.step,
            wall_s: at.wall_s,
            train_s: at.train_s,
            loss_evaluations: at.loss_evaluations,
            split: split.into(),
            accuracy: r.accuracy,
            loss: r.loss,
        }
    }
}

/// A report records when held-out accuracy first reached this (`reached_085_s`).
const REACHED_ACCURACY: f64 = 0.85;

/// Result of a local training run (also written as JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainReport {
    pub config: TrainConfig,
    pub train_precision: String,
    pub threads: u32,
    pub trainable: usize,
    pub zero_shot: EvalReport,
    pub final_heldout: EvalReport,
    pub best_step: u64,
    pub best_dev: EvalReport,
    pub steps: u64,
    pub wall_s: f64,
    pub loss_evaluations: u64,
    pub perturbations: u64,
    /// First wall time at which held-out accuracy reached 0.85 (if it did).
    pub reached_085_s: Option<f64>,
    /// The same moment in training time (wall time less the time spent evaluating).
    #[serde(default)]
    pub reached_085_train_s: Option<f64>,
    pub evals: Vec<EvalPoint>,
    /// Held-out accuracy of the base quantised model and with the trained adapter on it.
    pub quantized_zero_shot: Option<EvalReport>,
    pub quantized_with_adapter: Option<EvalReport>,
}

/// Runs local training; writes `<out_dir>/metrics.json`, `<out_dir>/steps.csv`,
/// `<out_dir>/evals.json` (as it goes) and the best adapter `<out_dir>/adapter.gguf`.
/// `progress` shows an indicatif bar.
pub fn train_local(
    engine: &mut Engine,
    split: &Split,
    cfg: &TrainConfig,
    out_dir: &Path,
    progress: bool,
) -> Result<(TrainReport, LoraWeights), EngineError> {
    let layout = LoraLayout::new(&engine.model_shape(), &cfg.lora)?;
    let mut weights = LoraWeights::init(layout.clone());
    let mut run = RunLog::create(out_dir, "train_loss", cfg, progress)?;
    let mut loss_evals = 0u64;

    let zero_shot = run.evaluate(|| engine.evaluate(None, &split.heldout))?;
    log::info!(
        "zero-shot held-out: acc {:.3} loss {:.4}",
        zero_shot.accuracy,
        zero_shot.loss
    );
    run.push(EvalPoint::new(RunAt::default(), "heldout", &zero_shot));
    let dev = run.evaluate(|| engine.evaluate(Some(&weights), &split.dev))?;
    let mut best = BestOnDev::new(&weights, dev);
    let mut reached: Option<RunAt> = None;

    let mut batches = EpochBatches::new(split.train.len(), cfg.seed);
    let mut stepper = Stepper::new(cfg, &layout);
    let mut step = 0u64;
    let mut train_ema: Option<f64> = None;
    while !cfg.budget_spent(step, run.wall_s()) {
        let batch: Vec<Example> = batches.next(&split.train, cfg.batch_size);
        let seeds = stepper.seeds(step, cfg.head_directions);
        let (g, l) =
            engine.forward_gradients_with_loss(&weights, &batch, &seeds, cfg.eps, cfg.one_sided)?;
        // Head-block directions reuse the unperturbed pass: they cost no loss evaluation.
        let passes = if layout.tensors().is_empty() {
            0
        } else {
            seeds
                .iter()
                .filter(|&&s| layout.block_of(s) != fwdllm_shared::lora::DirectionBlock::Head)
                .count() as u64
        };
        loss_evals += if cfg.one_sided {
            1 + passes
        } else {
            2 * passes.max(1)
        };
        let (lr, norm) = stepper.apply(&mut weights, &seeds, &g, step);
        step += 1;
        train_ema = Some(match train_ema {
            None => l,
            Some(e) => 0.9 * e + 0.1 * l,
        });
        run.step_done(step, loss_evals, l, lr, norm)?;

        if cfg.dev_every > 0 && step % cfg.dev_every as u64 == 0 {
            let dev = run.evaluate(|| engine.evaluate(Some(&weights), &split.dev))?;
            run.record(EvalPoint::new(run.at(step, loss_evals), "dev", &dev))?;
            if best.keep_or_restore(&mut weights, dev, step, cfg.divergence_tol) {
                log::warn!(
                    "step {step}: dev loss {:.4} > best {:.4} + {}; restoring step {} and halving lr",
                    dev.loss,
                    best.score.loss,
                    cfg.divergence_tol,
                    best.step
                );
                stepper.halve_lr();
            }
            log::info!(
                "step {step} dev acc {:.3} loss {:.4} (best {:.3} at {})",
                dev.accuracy,
                dev.loss,
                best.score.accuracy,
                best.step
            );
        }
        if cfg.heldout_every > 0 && step % cfg.heldout_every as u64 == 0 {
            let h = run.evaluate(|| engine.evaluate(Some(&weights), &split.heldout))?;
            let at = run.at(step, loss_evals);
            reached = reached.or((h.accuracy >= REACHED_ACCURACY).then_some(at));
            run.record(EvalPoint::new(at, "heldout", &h))?;
            log::info!(
                "step {step} held-out acc {:.3} loss {:.4}",
                h.accuracy,
                h.loss
            );
        }
        run.show_progress(
            step,
            format!(
                "loss {:.3} lr {lr:.3} |u| {norm:.3} dev {:.3}",
                train_ema.unwrap_or(l),
                best.score.accuracy
            ),
        );
    }
    run.steps_finished();

    // Last check of the final weights against the best kept so far.
    let dev = engine.evaluate(Some(&weights), &split.dev)?;
    best.keep_if_better(&weights, dev, step);
    let final_heldout = run.evaluate(|| engine.evaluate(Some(&best.weights), &split.heldout))?;
    let at = run.at(step, loss_evals);
    reached = reached.or((final_heldout.accuracy >= REACHED_ACCURACY).then_some(at));
    run.push(EvalPoint::new(at, "heldout-best", &final_heldout));
    let evals = run.finish(&best.weights)?;
    let report = TrainReport {
        config: cfg.clone(),
        train_precision: engine.config().precision.as_str().into(),
        threads: engine.config().effective_threads(),
        trainable: layout.trainable_len(),
        zero_shot,
        final_heldout,
        best_step: best.step,
        best_dev: best.score,
        steps: step,
        wall_s: at.wall_s,
        loss_evaluations: loss_evals,
        perturbations: step * cfg.directions as u64,
        reached_085_s: reached.map(|r| r.wall_s),
        reached_085_train_s: reached.map(|r| r.train_s),
        evals,
        quantized_zero_shot: None,
        quantized_with_adapter: None,
    };
    write_report(&out_dir.join("metrics.json"), &report)?;
    Ok((report, best.weights))
}

/// Default output directory of `train-local`.
pub fn default_out_dir() -> PathBuf {
    PathBuf::from("target/train-local")
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
