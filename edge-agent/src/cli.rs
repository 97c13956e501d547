//! Engine subcommands of `fwdllm-agent` (prepare, eval, calibrate, train-local, bench-engine,
//! shard, prompt-search).

use anyhow::Context;

use crate::cli_args::{
    BenchEngineArgs, CalibrateArgs, EvalArgs, MergeNormsArgs, PrepareArgs, PromptSearchArgs,
    ShardArgs, TrainLocalArgs,
};
use crate::data::{self, Partition, TaskFile};
use crate::engine::{self, Engine, Precision, TrainConfig};

/// Engine subcommands; flattened into the top-level CLI. Payloads are boxed so the
/// top-level command enum stays small.
#[derive(Debug, clap::Subcommand)]
pub enum EngineCommand {
    /// Convert the model once to the training precision (cached, verified by a stamp).
    Prepare(Box<PrepareArgs>),
    /// Held-out accuracy and loss of the base model, or of an adapter.
    Eval(Box<EvalArgs>),
    /// Measure noise in ΔL, g across ε and the SNR; pick ε; write the table.
    Calibrate(Box<CalibrateArgs>),
    /// Local forward-gradient training (FwdLLM's centralised reference).
    TrainLocal(Box<TrainLocalArgs>),
    /// Engine benchmark: throughput, adapter swap cost, RSS, noise, SNR, training figures.
    BenchEngine(Box<BenchEngineArgs>),
    /// Score prompt templates / label words zero-shot on the dev split.
    PromptSearch(Box<PromptSearchArgs>),
    /// Split a task's training examples into client shards (JSONL files).
    Shard(Box<ShardArgs>),
    /// Classify texts with a trained adapter (GGUF or an agent's replica); writes JSONL.
    Predict(Box<crate::predict::PredictArgs>),
    /// Write a copy of the model with an adapter's trained norm gains in place, for stock
    /// llama.cpp (whose LoRA loader cannot apply norm gains; use the copy with the adapter).
    MergeNorms(Box<MergeNormsArgs>),
}

pub(crate) fn init_logging() {
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_secs()
        .try_init();
}

impl EngineCommand {
    /// Runs the subcommand.
    pub fn run(self) -> anyhow::Result<()> {
        init_logging();
        match self {
            EngineCommand::Prepare(args) => {
                let PrepareArgs { engine } = *args;
                let cfg = engine.config();
                let t = std::time::Instant::now();
                let path = engine::prepare::prepare(
                    &cfg.model,
                    cfg.precision,
                    &cfg.cache_dir,
                    cfg.effective_threads(),
                )?;
                println!("{} ({:.1} s)", path.display(), t.elapsed().as_secs_f64());
                Ok(())
            }
            EngineCommand::Predict(args) => crate::predict::run(*args),
            EngineCommand::MergeNorms(args) => {
                let n =
                    fwdllm_shared::gguf::merge_adapter_norms(&args.model, &args.adapter, &args.out)
                        .with_context(|| {
                            format!(
                                "merging {} into {}",
                                args.adapter.display(),
                                args.model.display()
                            )
                        })?;
                anyhow::ensure!(
                    n > 0,
                    "{} trains no norm gains: stock llama.cpp loads it as it is (llama-cli --lora {})",
                    args.adapter.display(),
                    args.adapter.display()
                );
                println!(
                    "wrote {} ({n} norm gains of {} merged into {})",
                    args.out.display(),
                    args.adapter.display(),
                    args.model.display()
                );
                Ok(())
            }
            EngineCommand::Eval(args) => {
                if let TaskFile::Sft(st) = args.task.task_file()? {
                    return crate::sft_cli::eval(*args, st);
                }
                let EvalArgs {
                    engine,
                    task,
                    adapter,
                    limit,
                } = *args;
                let (tcfg, split) = task.load()?;
                let mut e = Engine::load(&engine.config())?;
                e.set_task(&tcfg)?;
                if let Some(a) = &adapter {
                    e.set_adapter_file(a)?;
                }
                let held = &split.heldout[..limit.unwrap_or(usize::MAX).min(split.heldout.len())];
                let t = std::time::Instant::now();
                let task = e.task().cloned().context("task")?;
                let l = e.loss(&task, held)?;
                let acc = l
                    .predictions
                    .iter()
                    .zip(held)
                    .filter(|(p, x)| **p == x.label)
                    .count() as f64
                    / held.len() as f64;
                let mut counts = vec![0usize; tcfg.labels.len()];
                for &p in &l.predictions {
                    counts[p] += 1;
                }
                println!(
                    "task {} precision {} ({}) adapter {}: held-out n={} accuracy {acc:.4} loss {:.4} ({:.1} s); predictions per label {:?}",
                    tcfg.name,
                    engine.precision.as_str(),
                    e.describe_path(),
                    adapter.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "none".into()),
                    held.len(),
                    l.mean,
                    t.elapsed().as_secs_f64(),
                    tcfg.labels.iter().zip(&counts).collect::<Vec<_>>()
                );
                Ok(())
            }
            EngineCommand::Calibrate(args) => {
                let CalibrateArgs {
                    engine,
                    task,
                    directions,
                    out,
                } = *args;
                let (tcfg, split) = task.load()?;
                let mut e = Engine::load(&engine.config())?;
                e.set_task(&tcfg)?;
                let tc = TrainConfig::default();
                let table =
                    engine::calibrate::calibrate(&mut e, &split.train[..8], &tc.lora, directions)?;
                engine::calibrate::print_table(&table);
                if let Some(dir) = out.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                std::fs::write(&out, serde_json::to_vec_pretty(&table)?)?;
                println!("wrote {}", out.display());
                Ok(())
            }
            EngineCommand::TrainLocal(args) => {
                if let TaskFile::Sft(st) = args.task.task_file()? {
                    return crate::sft_cli::train_local(*args, st);
                }
                let args = *args;
                let TrainLocalArgs {
                    ref engine,
                    ref task,
                    ref config,
                    rank,
                    ref layers,
                    ref modules,
                    ref trainable,
                    head_rows,
                    head_only,
                    blockwise,
                    ref out,
                    check_quantized,
                    no_progress,
                    ..
                } = args;
                let (tcfg, split) = task.load()?;
                // Without a config file or a LoRA flag, the head-rows recipe; any LoRA flag
                // starts from the LoRA layout of TrainConfig::default().
                let lora_flags = rank.is_some()
                    || layers.is_some()
                    || modules.is_some()
                    || trainable.is_some()
                    || blockwise
                    || head_rows;
                let mut tc = match &config {
                    Some(p) => toml::from_str(
                        &std::fs::read_to_string(p).with_context(|| p.display().to_string())?,
                    )
                    .with_context(|| format!("parsing {}", p.display()))?,
                    None if lora_flags => TrainConfig::default(),
                    None => TrainConfig::head_rows_recipe(tcfg.labels.len()),
                };
                args.apply_overrides(&mut tc)?;
                if head_only {
                    tc.lora.modules.clear();
                }
                if head_rows || head_only || tc.lora.blockwise {
                    tc.lora.head_rows = u32::try_from(tcfg.labels.len())?;
                }
                let mut e = Engine::load(&engine.config_for(&tc.lora))?;
                e.set_task(&tcfg)?;
                println!(
                    "train-local: task {} train {} dev {} held-out {}; precision {}, {}; {:?}",
                    tcfg.name,
                    split.train.len(),
                    split.dev.len(),
                    split.heldout.len(),
                    engine.precision.as_str(),
                    e.describe_path(),
                    tc
                );
                let (mut report, best) =
                    engine::train::train_local(&mut e, &split, &tc, out, !no_progress)?;
                if check_quantized && tc.lora.head_rows > 0 {
                    log::warn!("--check-quantized skipped: head rows need the tail path (F32 tail), which the quantised model does not take");
                } else if check_quantized {
                    drop(e);
                    let mut qcfg = engine.config_for(&tc.lora);
                    qcfg.precision = Precision::Quantized;
                    let mut q = Engine::load(&qcfg)?;
                    q.set_task(&tcfg)?;
                    report.quantized_zero_shot = Some(q.evaluate(None, &split.heldout)?);
                    report.quantized_with_adapter = Some(q.evaluate(Some(&best), &split.heldout)?);
                    engine::train_run::write_report(&out.join("metrics.json"), &report)?;
                }
                println!(
                    "zero-shot held-out acc {:.3} loss {:.4} -> best (step {}) held-out acc {:.3} loss {:.4}; {} steps, {} loss evaluations, {:.0} s; reached 0.85 at {:?} s wall, {:?} s of training",
                    report.zero_shot.accuracy,
                    report.zero_shot.loss,
                    report.best_step,
                    report.final_heldout.accuracy,
                    report.final_heldout.loss,
                    report.steps,
                    report.loss_evaluations,
                    report.wall_s,
                    report.reached_085_s.map(|s| s.round()),
                    report.reached_085_train_s.map(|s| s.round())
                );
                if let (Some(a), Some(b)) =
                    (&report.quantized_zero_shot, &report.quantized_with_adapter)
                {
                    println!(
                        "quantised model: zero-shot acc {:.3} -> with adapter {:.3}",
                        a.accuracy, b.accuracy
                    );
                }
                println!(
                    "wrote {}/metrics.json, steps.csv, adapter.gguf",
                    out.display()
                );
                Ok(())
            }
            EngineCommand::BenchEngine(args) => {
                let BenchEngineArgs {
                    engine,
                    task,
                    out,
                    swaps,
                    train_metrics,
                    rss_probe,
                } = *args;
                let (tcfg, split) = task.load()?;
                if let Some(probe) = rss_probe {
                    let r =
                        engine::bench::run_probe(probe, &engine.config(), &tcfg, &split, swaps)?;
                    println!("rss-probe {}", serde_json::to_string(&r)?);
                    return Ok(());
                }
                let probe_args: Vec<String> = std::env::args().skip(1).collect();
                let report = engine::bench::run(
                    &engine.config(),
                    &tcfg,
                    &split,
                    swaps,
                    &train_metrics,
                    &probe_args,
                )?;
                if let Some(dir) = out.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                std::fs::write(&out, serde_json::to_vec_pretty(&report)?)?;
                println!("{}", serde_json::to_string_pretty(&report)?);
                println!("wrote {}", out.display());
                Ok(())
            }
            EngineCommand::PromptSearch(args) => {
                let PromptSearchArgs {
                    engine,
                    task,
                    candidates,
                    limit,
                } = *args;
                let (tcfg, split) = task.load()?;
                let mut e = Engine::load(&engine.config())?;
                let dev = &split.dev[..limit.min(split.dev.len())];
                let candidates = if candidates.is_empty() {
                    engine::calibrate::default_prompts()
                } else {
                    candidates
                };
                for p in candidates {
                    let mut t = tcfg.clone();
                    t.prompt = p.replace("\\n", "\n");
                    let task = e.prepare_task(&t)?;
                    let r = e.evaluate_task(&task, None, dev)?;
                    println!(
                        "acc {:.3} loss {:.4} words {:?} prompt {:?}",
                        r.accuracy, r.loss, t.words, t.prompt
                    );
                }
                Ok(())
            }
            EngineCommand::Shard(args) => {
                if let TaskFile::Sft(st) = args.task.task_file()? {
                    return crate::sft_cli::shard(*args, st);
                }
                let ShardArgs {
                    task,
                    engine: _,
                    clients,
                    alpha,
                    seed,
                    out,
                } = *args;
                let (tcfg, split) = task.load()?;
                let partition = match alpha {
                    Some(a) if a > 0.0 => Partition::Dirichlet { alpha: a },
                    Some(a) => anyhow::bail!("--alpha {a}: must be > 0"),
                    None => Partition::Iid,
                };
                let shards = data::shard(&split.train, clients, partition, seed);
                let paths = data::write_shards(&out, &shards, &tcfg.labels)?;
                for (p, s) in paths.iter().zip(&shards) {
                    let mut counts = vec![0usize; tcfg.labels.len()];
                    for x in s {
                        counts[x.label] += 1;
                    }
                    println!(
                        "{} {} examples, per label {:?}",
                        p.display(),
                        s.len(),
                        counts
                    );
                }
                Ok(())
            }
        }
    }
}
