//! Local forward-gradient training of an instruction (`kind = "sft"`) task: the loop of
//! [`super::train::train_local`] — same seeds ([`local_seed`], discriminative
//! [`block_seeds`]), same step ([`TrainConfig::step_coefficients`]: `c_k = −lr_t·g_k/K`, the
//! norm clamp, [`apply_commit`]), same schedule and divergence guard — with the SFT loss
//! (mean NLL of the response tokens through the full vocabulary) in place of the verbalizer
//! loss. The best adapter is kept on dev NLL (lower is better); held-out NLL and the F1 of
//! greedy generations are reported at evaluation points, never used for a decision.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use fwdllm_shared::lora::{LoraLayout, LoraModule, LoraWeights, Trainable};
use fwdllm_shared::update::apply_commit;
use serde::{Deserialize, Serialize};

use super::sft_eval::{GenerationBudget, SftEvalReport};
use super::train::{block_seeds, local_seed, EpochBatches, TrainConfig};
use super::{Engine, EngineError};
use crate::data::{SftExample, Split};

impl TrainConfig {
    /// The instruction-tuning recipe `train-local` runs on an sft task unless told otherwise
    /// (README "Instruction tuning" has the runs behind it): LoRA B (A fixed at its seeded
    /// init, as in the classification default), rank 2, on attn_v, attn_output and ffn_down of
    /// the last three layers — the projections that write into the residual stream the
    /// full-vocabulary head reads — so each perturbation runs 3 of 30 layers plus the head on
    /// the tail path; 8 directions per step, one-sided differences at ε = 1e-2 (the F32 tail's
    /// calibrated ε), lr 3 halving over 400 steps. lr: in 10-step probes on the headline task
    /// (`train-local --max-steps 20 --dev-every 10 --lr 0.5|2`) lr 2 beat lr 0.5 on every batch
    /// and on dev (3.973 vs 3.986 after 10 steps) with step norms of 4–7, far inside the clamp,
    /// so the recipe takes the classification default lr 3; the dev-loss guard halves it if it
    /// diverges.
    pub fn sft_recipe() -> TrainConfig {
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
        t.lr = 3.0;
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
    std::fs::create_dir_all(out_dir).map_err(|e| EngineError::io(out_dir, e))?;
    let layout = LoraLayout::new(&engine.model_shape(), &cfg.lora)?;
    let mut weights = LoraWeights::init(layout.clone());
    let start = Instant::now();
    let mut evals = Vec::new();
    let mut loss_evals = 0u64;
    let mut eval_s = 0.0f64;
    let no_gen = GenerationBudget {
        examples: 0,
        ..budget
    };

    let t_eval = Instant::now();
    let zero_shot = engine.evaluate_sft(None, &split.heldout, budget)?;
    log::info!(
        "zero-shot held-out: nll {:.4} f1 {:?}",
        zero_shot.nll,
        zero_shot.f1
    );
    evals.push(SftEvalPoint {
        step: 0,
        wall_s: 0.0,
        train_s: 0.0,
        loss_evaluations: 0,
        split: "heldout".into(),
        nll: zero_shot.nll,
        f1: zero_shot.f1,
    });
    let mut best = weights.clone();
    let mut best_dev = engine.evaluate_sft(Some(&weights), &split.dev, no_gen)?.nll;
    eval_s += t_eval.elapsed().as_secs_f64();
    let mut best_step = 0u64;
    let mut lr_scale = 1.0f32;

    let csv_path = out_dir.join("steps.csv");
    let mut csv = std::io::BufWriter::new(
        std::fs::File::create(&csv_path).map_err(|e| EngineError::io(&csv_path, e))?,
    );
    let csv_err = |e| EngineError::io(&csv_path, e);
    writeln!(csv, "step,wall_s,loss_evaluations,train_nll,lr,update_norm").map_err(csv_err)?;
    let bar = cfg.progress_bar(progress);
    let mut batches = EpochBatches::new(split.train.len(), cfg.seed);
    let mut scratch = Vec::new();
    let mut cand_scratch = Vec::new();
    let mut previous: Option<Vec<f32>> = None;
    let mut step = 0u64;
    loop {
        if cfg.budget_spent(step, start.elapsed().as_secs_f64()) {
            break;
        }
        let batch = batches.next(&split.train, cfg.batch_size);
        let c = cfg.discriminative_candidates.max(1);
        let seeds = block_seeds(
            &layout,
            cfg.directions,
            0,
            c,
            previous.as_deref(),
            |i| local_seed(cfg.seed, step, i),
            &mut cand_scratch,
        );
        let (g, l) =
            engine.sft_forward_gradients(&weights, &batch, &seeds, cfg.eps, cfg.one_sided)?;
        loss_evals += if cfg.one_sided {
            1 + seeds.len() as u64
        } else {
            2 * seeds.len() as u64
        };
        let lr = cfg.lr_at(step, lr_scale);
        let (pairs, norm) = cfg.step_coefficients(&layout, &seeds, &g, lr, &mut scratch);
        apply_commit(&mut weights, &pairs);
        if c > 1 {
            previous = Some(scratch.clone());
        }
        step += 1;
        let wall = start.elapsed().as_secs_f64();
        writeln!(
            csv,
            "{step},{wall:.2},{loss_evals},{l:.6},{lr:.5},{norm:.5}"
        )
        .map_err(csv_err)?;
        csv.flush().map_err(csv_err)?;

        if cfg.dev_every > 0 && step % cfg.dev_every as u64 == 0 {
            let t_eval = Instant::now();
            let dev = engine.evaluate_sft(Some(&weights), &split.dev, no_gen)?.nll;
            eval_s += t_eval.elapsed().as_secs_f64();
            let wall = start.elapsed().as_secs_f64();
            evals.push(SftEvalPoint {
                step,
                wall_s: wall,
                train_s: wall - eval_s,
                loss_evaluations: loss_evals,
                split: "dev".into(),
                nll: dev,
                f1: None,
            });
            write_evals(out_dir, &evals)?;
            if dev < best_dev {
                best = weights.clone();
                best_dev = dev;
                best_step = step;
            } else if dev > best_dev + cfg.divergence_tol {
                log::warn!(
                    "step {step}: dev nll {dev:.4} > best {best_dev:.4} + {}; restoring step {best_step} and halving lr",
                    cfg.divergence_tol
                );
                weights = best.clone();
                lr_scale *= 0.5;
                previous = None;
            }
            log::info!("step {step} dev nll {dev:.4} (best {best_dev:.4} at {best_step})");
        }
        if cfg.heldout_every > 0 && step % cfg.heldout_every as u64 == 0 {
            let t_eval = Instant::now();
            let h = engine.evaluate_sft(Some(&weights), &split.heldout, budget)?;
            eval_s += t_eval.elapsed().as_secs_f64();
            let wall = start.elapsed().as_secs_f64();
            evals.push(SftEvalPoint {
                step,
                wall_s: wall,
                train_s: wall - eval_s,
                loss_evaluations: loss_evals,
                split: "heldout".into(),
                nll: h.nll,
                f1: h.f1,
            });
            write_evals(out_dir, &evals)?;
            log::info!("step {step} held-out nll {:.4} f1 {:?}", h.nll, h.f1);
        }
        bar.set_message(format!(
            "nll {l:.3} lr {lr:.3} |u| {norm:.3} dev {best_dev:.3}"
        ));
        bar.set_position(if cfg.max_steps > 0 { step } else { wall as u64 });
    }
    bar.finish_and_clear();

    let dev = engine.evaluate_sft(Some(&weights), &split.dev, no_gen)?.nll;
    if dev < best_dev {
        best = weights.clone();
        best_dev = dev;
        best_step = step;
    }
    let t_eval = Instant::now();
    let final_heldout = engine.evaluate_sft(Some(&best), &split.heldout, budget)?;
    eval_s += t_eval.elapsed().as_secs_f64();
    let wall = start.elapsed().as_secs_f64();
    evals.push(SftEvalPoint {
        step,
        wall_s: wall,
        train_s: wall - eval_s,
        loss_evaluations: loss_evals,
        split: "heldout-best".into(),
        nll: final_heldout.nll,
        f1: final_heldout.f1,
    });
    write_evals(out_dir, &evals)?;
    let adapter = out_dir.join("adapter.gguf");
    std::fs::write(&adapter, fwdllm_shared::gguf::write_lora_adapter(&best))
        .map_err(|e| EngineError::io(&adapter, e))?;
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
        best_step,
        best_dev_nll: best_dev,
        steps: step,
        wall_s: wall,
        loss_evaluations: loss_evals,
        perturbations: step * cfg.directions as u64,
        evals,
    };
    let p = out_dir.join("metrics.json");
    std::fs::write(
        &p,
        serde_json::to_vec_pretty(&report).expect("report serialises"),
    )
    .map_err(|e| EngineError::io(&p, e))?;
    Ok((report, best))
}

fn write_evals(out_dir: &Path, evals: &[SftEvalPoint]) -> Result<(), EngineError> {
    let p = out_dir.join("evals.json");
    std::fs::write(
        &p,
        serde_json::to_vec_pretty(evals).expect("evals serialise"),
    )
    .map_err(|e| EngineError::io(&p, e))
}
