//! Local forward-gradient training of an instruction (`kind = "sft"`) task: the loop of
//! [`super::train::train_local`] — the same step (`train_run::Stepper`: seeds,
//! discriminative pick, `c_k = −lr_t·g_k/K`, the norm clamp, the schedule), the same records
//! and divergence guard (`train_run`) — with the SFT loss
//! (mean NLL of the response tokens through the full vocabulary) in place of the verbalizer
//! loss. The best adapter is kept on dev NLL (lower is better); held-out NLL and the F1 of
//! greedy generations are reported at evaluation points, never used for a decision.

use std::path::Path;

use fwdllm_shared::lora::{LoraLayout, LoraModule, LoraWeights, Trainable};
use serde::{Deserialize, Serialize};

use super::recipe::TrainConfig;
use super::sft_eval::{GenerationBudget, SftEvalReport};
use super::train::EpochBatches;
use super::train_run::{write_report, BestOnDev, RunAt, RunLog, Stepper};
use super::{Engine, EngineError};
use crate::data::{SftExample, Split};

impl TrainConfig {
    /// The instruction-tuning recipe `train-local` and `fwdllm sft` run on an sft task unless
    /// told otherwise: the RMSNorm gains before attention and before the feed-forward block of
    /// every layer (60 × 576 = 34,560 values), each a delta in units of its tensor's RMS
    /// ([`fwdllm_shared::lora::norm_gains`]), 64 directions per step on batches of 8, lr 0.03
    /// (halving over 200 steps, i.e. ~13,000 loss evaluations), no discriminative pick. Why
    /// (docs/studies/sft-layouts.md, the reference of `../shared/reference/sft/`): by
    /// backprop the gains move held-out NLL 15 % in 50 steps where [`TrainConfig::sft_tail_recipe`]'s
    /// layout caps near 5 %, and by forward gradients all-layer gains gained 7.3 % in 2,000
    /// evaluations against 1.6 % for the tail layout — more than 6.6× the cost per evaluation
    /// (every layer runs per perturbation) buys. RMS-scaled directions make a unit direction
    /// the same relative change in every gain (their magnitudes span 0.03–0.4; unscaled
    /// directions diverged at every lr tried); lr 0.1 diverged after ~1,000 evaluations.
    /// Gains live in no LoRA, so the engine writes them into a live copy of the model
    /// (`engine::live`) and `train-local` also writes the model with the gains merged.
    pub fn sft_recipe() -> TrainConfig {
        let mut t = TrainConfig::default();
        t.lora.modules = vec![LoraModule::AttnNorm, LoraModule::FfnNorm];
        t.lora.layers = None;
        t.lora.trainable = Trainable::B;
        t.lora.head_rows = 0;
        t.directions = 64;
        t.discriminative_candidates = 1;
        t.lr = 0.03;
        t.lr_half_life = 200.0;
        t.dev_every = 5;
        t.heldout_every = 20;
        t
    }

    /// The earlier SFT recipe, kept as the cheap option (one tenth of the cost per
    /// evaluation, a tenth of the gain): LoRA B (A fixed at its seeded init), rank 2, on
    /// attn_v, attn_output and ffn_down of the last three layers — the projections that write
    /// into the residual stream the full-vocabulary head reads — so each perturbation runs 3
    /// of 30 layers plus the head on the tail path; 8 directions per step, one-sided
    /// differences at ε = 1e-2 (the F32 tail's calibrated ε), lr 1 halving over 400 steps
    /// (the reference measured lr 3 giving back by 2,000 evaluations what it gained by 500,
    /// lr 1 reaching 1.6 % at 2,000). The engine's SFT tests use it to stay fast.
    pub fn sft_tail_recipe() -> TrainConfig {
        let mut t = TrainConfig::default();
        t.lora.modules = vec![
            LoraModule::AttnV,
            LoraModule::AttnOutput,
            LoraModule::FfnDown,
        ];
        t.lora.layers = Some((27, 30));
        t.lora.trainable = Trainable::B;
        t.lora.head_rows = 0;
        t.directions = 8;
        t.lr = 1.0;
        t.lr_half_life = 400.0;
        t.dev_every = 25;
        t.heldout_every = 100;
        t
    }
}

/// One evaluation point of an SFT run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SftEvalPoint {
    pub step: u64,
    pub wall_s: f64,
    /// Wall time spent training (forward gradients and updates), without evaluations.
    pub train_s: f64,
    pub loss_evaluations: u64,
    pub split: String,
    /// Mean NLL per response token.
    pub nll: f64,
    /// Mean word-level F1 of greedy generations (held-out points only).
    pub f1: Option<f64>,
}

impl SftEvalPoint {
    fn new(at: RunAt, split: &str, nll: f64, f1: Option<f64>) -> SftEvalPoint {
        SftEvalPoint {
            step: at.step,
            wall_s: at.wall_s,
            train_s: at.train_s,
            loss_evaluations: at.loss_evaluations,
            split: split.into(),
            nll,
            f1,
        }
    }
}

/// Result of a local SFT run (`<out>/metrics.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SftTrainReport {
    pub task: String,
    pub config: TrainConfig,
    pub generation: GenerationBudget,
    pub train_precision: String,
    pub forward_path: String,
    pub threads: u32,
    pub trainable: usize,
    pub zero_shot: SftEvalReport,
    pub final_heldout: SftEvalReport,
    /// `(zero-shot NLL − final NLL) / zero-shot NLL` on the held-out split (issue 16's key).
    pub sft_nll_rel_drop: f64,
    pub best_step: u64,
    pub best_dev_nll: f64,
    pub steps: u64,
    pub wall_s: f64,
    pub loss_evaluations: u64,
    pub perturbations: u64,
    pub evals: Vec<SftEvalPoint>,
}

/// Runs local SFT training; writes `<out_dir>/metrics.json`, `<out_dir>/steps.csv`,
/// `<out_dir>/evals.json` (as it goes) and the best adapter `<out_dir>/adapter.gguf`.
pub fn train_sft_local(
    engine: &mut Engine,
    task: &str,
    split: &Split<SftExample>,
    cfg: &TrainConfig,
    budget: GenerationBudget,
    out_dir: &Path,
    progress: bool,
) -> Result<(SftTrainReport, LoraWeights), EngineError> {
    if cfg.lora.head_rows > 0 {
        return Err(EngineError::SftHeadRows {
            rows: cfg.lora.head_rows,
        });
    }
    if split.train.is_empty() || split.dev.is_empty() || split.heldout.is_empty() {
        return Err(EngineError::EmptyBatch);
    }
    let layout = LoraLayout::new(&engine.model_shape(), &cfg.lora)?;
    let mut weights = LoraWeights::init(layout.clone());
    let mut run = RunLog::create(out_dir, "train_nll", cfg, progress)?;
    let mut loss_evals = 0u64;
    let no_gen = GenerationBudget {
        examples: 0,
        ..budget
    };

    let zero_shot = run.evaluate(|| engine.evaluate_sft(None, &split.heldout, budget))?;
    log::info!(
        "zero-shot held-out: nll {:.4} f1 {:?}",
        zero_shot.nll,
        zero_shot.f1
    );
    run.push(SftEvalPoint::new(
        RunAt::default(),
        "heldout",
        zero_shot.nll,
        zero_shot.f1,
    ));
    let dev = run.evaluate(|| engine.evaluate_sft(Some(&weights), &split.dev, no_gen))?;
    let mut best = BestOnDev::new(&weights, dev.nll);

    let mut batches = EpochBatches::new(split.train.len(), cfg.seed);
    let mut stepper = Stepper::new(cfg, &layout);
    let mut step = 0u64;
    while !cfg.budget_spent(step, run.wall_s()) {
        let batch = batches.next(&split.train, cfg.batch_size);
        let seeds = stepper.seeds(step, 0);
        let (g, l) =
            engine.sft_forward_gradients(&weights, &batch, &seeds, cfg.eps, cfg.one_sided)?;
        loss_evals += if cfg.one_sided {
            1 + seeds.len() as u64
        } else {
            2 * seeds.len() as u64
        };
        let (lr, norm) = stepper.apply(&mut weights, &seeds, &g, step);
        step += 1;
        run.step_done(step, loss_evals, l, lr, norm)?;

        if cfg.dev_every > 0 && step % cfg.dev_every as u64 == 0 {
            let dev = run
                .evaluate(|| engine.evaluate_sft(Some(&weights), &split.dev, no_gen))?
                .nll;
            run.record(SftEvalPoint::new(
                run.at(step, loss_evals),
                "dev",
                dev,
                None,
            ))?;
            if best.keep_or_restore(&mut weights, dev, step, cfg.divergence_tol) {
                log::warn!(
                    "step {step}: dev nll {dev:.4} > best {:.4} + {}; restoring step {} and halving lr",
                    best.score,
                    cfg.divergence_tol,
                    best.step
                );
                stepper.halve_lr();
                stepper.forget_previous();
            }
            log::info!(
                "step {step} dev nll {dev:.4} (best {:.4} at {})",
                best.score,
                best.step
            );
        }
        if cfg.heldout_every > 0 && step % cfg.heldout_every as u64 == 0 {
            let h = run.evaluate(|| engine.evaluate_sft(Some(&weights), &split.heldout, budget))?;
            run.record(SftEvalPoint::new(
                run.at(step, loss_evals),
                "heldout",
                h.nll,
                h.f1,
            ))?;
            log::info!("step {step} held-out nll {:.4} f1 {:?}", h.nll, h.f1);
        }
        run.show_progress(
            step,
            format!("nll {l:.3} lr {lr:.3} |u| {norm:.3} dev {:.3}", best.score),
        );
    }
    run.steps_finished();

    let dev = engine.evaluate_sft(Some(&weights), &split.dev, no_gen)?.nll;
    best.keep_if_better(&weights, dev, step);
    let final_heldout =
        run.evaluate(|| engine.evaluate_sft(Some(&best.weights), &split.heldout, budget))?;
    let at = run.at(step, loss_evals);
    run.record(SftEvalPoint::new(
        at,
        "heldout-best",
        final_heldout.nll,
        final_heldout.f1,
    ))?;
    let evals = run.finish(&best.weights)?;
    let report = SftTrainReport {
        task: task.to_string(),
        config: cfg.clone(),
        generation: budget,
        train_precision: engine.config().precision.as_str().into(),
        forward_path: engine.describe_path(),
        threads: engine.config().effective_threads(),
        trainable: layout.trainable_len(),
        sft_nll_rel_drop: (zero_shot.nll - final_heldout.nll) / zero_shot.nll,
        zero_shot,
        final_heldout,
        best_step: best.step,
        best_dev_nll: best.score,
        steps: step,
        wall_s: at.wall_s,
        loss_evaluations: loss_evals,
        perturbations: step * cfg.directions as u64,
        evals,
    };
    write_report(&out_dir.join("metrics.json"), &report)?;
    Ok((report, best.weights))
}
