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

use fwdllm_shared::lora::{LoraLayout, LoraWeights};
use serde::{Deserialize, Serialize};

/// The discriminative pick, where the agent daemon has always found it (`daemon::round`).
use super::recipe::TrainConfig;
use super::train_run::{write_report, BestOnDev, RunAt, RunLog, Stepper};
use super::{Engine, EngineError, EvalReport};
use crate::data::{Example, Split, SplitMix64};

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
