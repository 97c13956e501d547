//! What both local trainers share around their own loss ([`super::train`] for
//! classification, [`super::sft_train`] for instruction tuning), so that a run of either kind
//! steps and keeps its records the same way:
//! - the step ([`Stepper`]): the step's seeds (discriminative pick against the last update),
//!   its coefficients with the norm clamp and the schedule, applied like a federated commit;
//! - the run's clock, with the time spent in evaluations kept apart so that training time can
//!   be reported on its own ([`RunAt`]);
//! - `steps.csv`, one row per step, flushed at once (a step takes seconds: an interrupted run
//!   still leaves its log);
//! - the evaluation history `evals.json`, rewritten at each recorded point so that an
//!   interrupted run still leaves its curve;
//! - the progress bar (over steps when they are capped, else over seconds of wall time);
//! - the best adapter on dev and the divergence guard ([`BestOnDev`]);
//! - `adapter.gguf` (the kept adapter) and the report, written at the end.
//!
//! What a score is, how the loss is measured and what the report holds stay with each trainer.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use fwdllm_shared::lora::{LoraLayout, LoraWeights};
use fwdllm_shared::update::apply_commit;
use serde::Serialize;

use super::recipe::{block_seeds, local_seed, TrainConfig};
use super::{EngineError, EvalReport};

/// Takes one local step after another: the seeds of a step, and the step's update applied to
/// the weights (`c_k = −lr_t·g_k/K_b`, the norm clamp, [`apply_commit`]).
#[derive(Debug)]
pub(crate) struct Stepper<'a> {
    cfg: &'a TrainConfig,
    layout: &'a LoraLayout,
    /// Scale of the scheduled learning rate; the divergence guard halves it.
    lr_scale: f32,
    /// The update last applied, which discriminative sampling aligns the next seeds with.
    previous: Option<Vec<f32>>,
    update: Vec<f32>,
    candidates: Vec<f32>,
}

impl<'a> Stepper<'a> {
    pub(crate) fn new(cfg: &'a TrainConfig, layout: &'a LoraLayout) -> Self {
        Stepper {
            cfg,
            layout,
            lr_scale: 1.0,
            previous: None,
            update: Vec::new(),
            candidates: Vec::new(),
        }
    }

    /// The seeds of step `step` (0-based): `cfg.directions` directions in the adapter block
    /// (every parameter, for a dense layout), then `head` in the head block, each the
    /// discriminative pick of `cfg.discriminative_candidates` seeds.
    pub(crate) fn seeds(&mut self, step: u64, head: u32) -> Vec<u64> {
        let seed = self.cfg.seed;
        block_seeds(
            self.layout,
            self.cfg.directions,
            head,
            self.cfg.discriminative_candidates.max(1),
            self.previous.as_deref(),
            |i| local_seed(seed, step, i),
            &mut self.candidates,
        )
    }

    /// Applies step `step`'s update, from the directional derivatives `g` of `seeds`, to
    /// `weights`; returns the learning rate and the update's L2 norm (after the clamp).
    pub(crate) fn apply(
        &mut self,
        weights: &mut LoraWeights,
        seeds: &[u64],
        g: &[f32],
        step: u64,
    ) -> (f32, f64) {
        let lr = self.cfg.lr_at(step, self.lr_scale);
        let (pairs, norm) = self
            .cfg
            .step_coefficients(self.layout, seeds, g, lr, &mut self.update);
        apply_commit(weights, &pairs);
        if self.cfg.discriminative_candidates > 1 {
            // The update just applied, Σ c_k v_k over the trainable values (step_coefficients
            // built it before the clamp; the clamp only rescales it).
            self.previous = Some(self.update.clone());
        }
        (lr, norm)
    }

    /// Halves the learning rate from now on (the divergence guard restored the best weights).
    pub(crate) fn halve_lr(&mut self) {
        self.lr_scale *= 0.5;
    }

    /// Forgets the last update: the next step's seeds are drawn without alignment.
    pub(crate) fn forget_previous(&mut self) {
        self.previous = None;
    }
}

/// Where a run stands at an evaluation point.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RunAt {
    pub(crate) step: u64,
    /// Wall time since the run started.
    pub(crate) wall_s: f64,
    /// Wall time spent training (forward gradients and updates), i.e. without evaluations.
    pub(crate) train_s: f64,
    pub(crate) loss_evaluations: u64,
}

/// The records of one local run in its output directory, with its clock and progress bar;
/// `P` is the trainer's evaluation point.
#[derive(Debug)]
pub(crate) struct RunLog<P> {
    out_dir: PathBuf,
    start: Instant,
    /// Time spent in evaluations so far.
    eval_s: f64,
    steps_path: PathBuf,
    steps: BufWriter<File>,
    evals: Vec<P>,
    bar: indicatif::ProgressBar,
    /// The bar counts steps (`max_steps` is set), else seconds.
    bar_in_steps: bool,
}

impl<P: Serialize> RunLog<P> {
    /// Starts the clock, creates `out_dir` and `steps.csv` (whose training-loss column is
    /// `loss_column`), and the progress bar, hidden unless `progress`.
    pub(crate) fn create(
        out_dir: &Path,
        loss_column: &str,
        cfg: &TrainConfig,
        progress: bool,
    ) -> Result<Self, EngineError> {
        let start = Instant::now();
        std::fs::create_dir_all(out_dir).map_err(|e| EngineError::io(out_dir, e))?;
        let steps_path = out_dir.join("steps.csv");
        let mut steps =
            BufWriter::new(File::create(&steps_path).map_err(|e| EngineError::io(&steps_path, e))?);
        writeln!(
            steps,
            "step,wall_s,loss_evaluations,{loss_column},lr,update_norm"
        )
        .map_err(|e| EngineError::io(&steps_path, e))?;
        Ok(RunLog {
            out_dir: out_dir.to_path_buf(),
            start,
            eval_s: 0.0,
            steps_path,
            steps,
            evals: Vec::new(),
            bar: progress_bar(cfg, progress),
            bar_in_steps: cfg.max_steps > 0,
        })
    }

    /// Seconds since the run started.
    pub(crate) fn wall_s(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// Runs an evaluation and counts its time as evaluation, not training.
    pub(crate) fn evaluate<T>(
        &mut self,
        eval: impl FnOnce() -> Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        let t = Instant::now();
        let out = eval();
        self.eval_s += t.elapsed().as_secs_f64();
        out
    }

    /// Where the run stands now, after `step` steps and `loss_evaluations` loss evaluations.
    pub(crate) fn at(&self, step: u64, loss_evaluations: u64) -> RunAt {
        let wall_s = self.wall_s();
        RunAt {
            step,
            wall_s,
            train_s: wall_s - self.eval_s,
            loss_evaluations,
        }
    }

    /// Appends the row of a finished step to `steps.csv` and flushes it.
    pub(crate) fn step_done(
        &mut self,
        step: u64,
        loss_evaluations: u64,
        loss: f64,
        lr: f32,
        update_norm: f64,
    ) -> Result<(), EngineError> {
        let wall = self.wall_s();
        writeln!(
            self.steps,
            "{step},{wall:.2},{loss_evaluations},{loss:.6},{lr:.5},{update_norm:.5}"
        )
        .and_then(|()| self.steps.flush())
        .map_err(|e| EngineError::io(&self.steps_path, e))
    }

    /// Shows `message` on the progress bar, at `step` or at the wall time.
    pub(crate) fn show_progress(&self, step: u64, message: String) {
        self.bar.set_message(message);
        self.bar.set_position(if self.bar_in_steps {
            step
        } else {
            self.wall_s() as u64
        });
    }

    /// After the last step: clears the progress bar.
    pub(crate) fn steps_finished(&self) {
        self.bar.finish_and_clear();
    }

    /// Adds an evaluation point to the history, without rewriting `evals.json`.
    pub(crate) fn push(&mut self, point: P) {
        self.evals.push(point);
    }

    /// Adds an evaluation point to the history and rewrites `evals.json`.
    pub(crate) fn record(&mut self, point: P) -> Result<(), EngineError> {
        self.push(point);
        let p = self.out_dir.join("evals.json");
        std::fs::write(
            &p,
            serde_json::to_vec_pretty(&self.evals).expect("evals serialise"),
        )
        .map_err(|e| EngineError::io(&p, e))
    }

    /// Writes the kept adapter as `adapter.gguf`; returns the evaluation history, for the
    /// report.
    pub(crate) fn finish(self, best: &LoraWeights) -> Result<Vec<P>, EngineError> {
        let adapter = self.out_dir.join("adapter.gguf");
        std::fs::write(&adapter, fwdllm_shared::gguf::write_lora_adapter(best))
            .map_err(|e| EngineError::io(&adapter, e))?;
        Ok(self.evals)
    }
}

/// The progress bar of a local training run: over steps when they are capped, else over
/// seconds of wall time; hidden when `show` is false.
fn progress_bar(cfg: &TrainConfig, show: bool) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new(if cfg.max_steps > 0 {
        cfg.max_steps as u64
    } else {
        cfg.max_wall_s.max(1.0) as u64
    });
    b.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
            .expect("static template"),
    );
    b
}

/// A dev score a run keeps its best adapter by.
pub(crate) trait DevScore: Copy {
    /// Whether this score is better than `best`.
    fn beats(&self, best: &Self) -> bool;
    /// The dev loss the divergence guard compares.
    fn loss(&self) -> f64;
}

/// Classification: dev accuracy, then dev loss.
impl DevScore for EvalReport {
    fn beats(&self, best: &Self) -> bool {
        self.accuracy > best.accuracy || (self.accuracy == best.accuracy && self.loss < best.loss)
    }

    fn loss(&self) -> f64 {
        self.loss
    }
}

/// Instruction tuning: the dev NLL per response token, lower is better.
impl DevScore for f64 {
    fn beats(&self, best: &Self) -> bool {
        self < best
    }

    fn loss(&self) -> f64 {
        *self
    }
}

/// The adapter a run keeps: the best on dev so far, its score and the step it was seen at.
#[derive(Debug)]
pub(crate) struct BestOnDev<S> {
    pub(crate) weights: LoraWeights,
    pub(crate) score: S,
    pub(crate) step: u64,
}

impl<S: DevScore> BestOnDev<S> {
    /// The starting point (step 0) and its dev score.
    pub(crate) fn new(weights: &LoraWeights, score: S) -> Self {
        BestOnDev {
            weights: weights.clone(),
            score,
            step: 0,
        }
    }

    /// Keeps `weights`, scored `dev` at `step`, if that beats the best; returns whether it did.
    pub(crate) fn keep_if_better(&mut self, weights: &LoraWeights, dev: S, step: u64) -> bool {
        let better = dev.beats(&self.score);
        if better {
            self.weights = weights.clone();
            self.score = dev;
            self.step = step;
        }
        better
    }

    /// The divergence guard after a dev evaluation: keeps `weights` if `dev` beats the best,
    /// else, if the dev loss is more than `divergence_tol` above the best's, puts the best
    /// weights back into `weights` and returns true (the caller then halves its learning rate).
    pub(crate) fn keep_or_restore(
        &mut self,
        weights: &mut LoraWeights,
        dev: S,
        step: u64,
        divergence_tol: f64,
    ) -> bool {
        if self.keep_if_better(weights, dev, step) {
            return false;
        }
        let diverged = dev.loss() > self.score.loss() + divergence_tol;
        if diverged {
            *weights = self.weights.clone();
        }
        diverged
    }
}

/// Writes a report as pretty JSON.
pub(crate) fn write_report(path: &Path, report: &impl Serialize) -> Result<(), EngineError> {
    std::fs::write(
        path,
        serde_json::to_vec_pretty(report).expect("report serialises"),
    )
    .map_err(|e| EngineError::io(path, e))
}
