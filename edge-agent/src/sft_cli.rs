//! The engine subcommands for instruction (`kind = "sft"`) tasks: `train-local`, `eval` and
//! `shard` dispatch here when their `--task` is an SFT task (`predict` handles both kinds in
//! `crate::predict`). Same flags as for classification; the head-row flags are refused.

use anyhow::Context;

use crate::cli_args::{EvalArgs, ShardArgs, TrainLocalArgs};
use crate::data::{self, SftTaskConfig};
use crate::engine::sft_eval::GenerationBudget;
use crate::engine::{self, Engine, TrainConfig};

/// `train-local` on an SFT task: [`engine::sft_train::train_sft_local`] with
/// [`TrainConfig::sft_recipe`] (or `--config`), then the flags.
pub fn train_local(args: TrainLocalArgs, task: SftTaskConfig) -> anyhow::Result<()> {
    if args.head_rows || args.head_only || args.blockwise || args.head_directions.is_some() {
        anyhow::bail!(
            "{} is an instruction (sft) task: head rows act on classification label words and do not apply; drop --head-rows, --head-only, --blockwise and --head-directions (the LoRA layout flags --rank, --layers, --modules, --trainable do apply)",
            args.task.task.display()
        );
    }
    let mut tc: TrainConfig = match &args.config {
        Some(p) => {
            toml::from_str(&std::fs::read_to_string(p).with_context(|| p.display().to_string())?)
                .with_context(|| format!("parsing {}", p.display()))?
        }
        None => TrainConfig::sft_recipe(),
    };
    args.apply_overrides(&mut tc)?;
    if tc.lora.head_rows > 0 {
        anyhow::bail!(
            "{}: lora.head_rows = {} but {} is an instruction (sft) task; set lora.head_rows = 0",
            args.config
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            tc.lora.head_rows,
            task.name
        );
    }
    let mut e = Engine::load(&args.engine.config_for(&tc.lora))?;
    let split = args.task.load_sft(&e, &task)?;
    let budget = GenerationBudget {
        examples: args.f1_examples,
        max_new_tokens: task.max_response_tokens,
        samples: args.samples,
    };
    println!(
        "train-local (sft): task {} train {} dev {} held-out {}; precision {}, {}; {:?}",
        task.name,
        split.train.len(),
        split.dev.len(),
        split.heldout.len(),
        args.engine.precision.as_str(),
        e.describe_path(),
        tc
    );
    let (report, _) = engine::sft_train::train_sft_local(
        &mut e,
        &task.name,
        &split,
        &tc,
        budget,
        &args.out,
        !args.no_progress,
    )?;
    let f1 = |x: Option<f64>| x.map_or("-".into(), |v| format!("{v:.3}"));
    println!(
        "zero-shot held-out nll {:.4} f1 {} -> best (step {}) held-out nll {:.4} f1 {} (nll {:.1}% lower); {} steps, {} loss evaluations, {:.0} s",
        report.zero_shot.nll,
        f1(report.zero_shot.f1),
        report.best_step,
        report.final_heldout.nll,
        f1(report.final_heldout.f1),
        100.0 * report.sft_nll_rel_drop,
        report.steps,
        report.loss_evaluations,
        report.wall_s
    );
    for (b, a) in report
        .zero_shot
        .samples
        .iter()
        .zip(&report.final_heldout.samples)
    {
        println!(
            "reference {:?}\n  before {:?}\n  after  {:?}",
            b.reference, b.generation, a.generation
        );
    }
    if tc.lora.modules.iter().any(|m| m.is_norm()) {
        // Stock llama.cpp cannot take norm gains from an adapter: ship a merged model beside it.
        let merged = args.out.join("model-merged.gguf");
        fwdllm_shared::gguf::merge_adapter_norms(
            &args.engine.model,
            &args.out.join("adapter.gguf"),
            &merged,
        )
        .with_context(|| format!("writing {}", merged.display()))?;
        println!(
            "wrote {} (the model with the trained norm gains; use it with adapter.gguf in stock llama.cpp)",
            merged.display()
        );
    }
    println!(
        "wrote {}/metrics.json, evals.json, steps.csv, adapter.gguf",
        args.out.display()
    );
    Ok(())
}

/// `eval` on an SFT task: held-out NLL and F1 of the base model or an adapter.
pub fn eval(args: EvalArgs, task: SftTaskConfig) -> anyhow::Result<()> {
    let mut e = Engine::load(&args.engine.config())?;
    let split = args.task.load_sft(&e, &task)?;
    if let Some(a) = &args.adapter {
        e.set_adapter_file(a)
            .with_context(|| format!("loading adapter {}", a.display()))?;
    }
    let held = &split.heldout[..args.limit.unwrap_or(usize::MAX).min(split.heldout.len())];
    let t = std::time::Instant::now();
    // The adapter (if any) is already set: evaluate with what is loaded.
    let nll = e.sft_loss(held)?;
    let prompts: Vec<&str> = held.iter().map(|x| x.prompt.as_str()).collect();
    let gens = e.generate_greedy(&prompts, task.max_response_tokens)?;
    let f1 = held
        .iter()
        .zip(&gens)
        .map(|(x, g)| engine::sft_eval::token_f1(&g.text, &x.response))
        .sum::<f64>()
        / held.len() as f64;
    println!(
        "task {} (sft) precision {} ({}) adapter {}: held-out n={} nll/token {nll:.4} word F1 {f1:.4} ({:.1} s)",
        task.name,
        args.engine.precision.as_str(),
        e.describe_path(),
        args.adapter
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "none".into()),
        held.len(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `shard` on an SFT task: IID shards of rendered `{"prompt", "response"}` pairs (an
/// instruction task has no labels for a Dirichlet split). Truncation needs the model's
/// tokenizer, so the model named by the engine flags is loaded.
pub fn shard(args: ShardArgs, task: SftTaskConfig) -> anyhow::Result<()> {
    if args.alpha.is_some() {
        anyhow::bail!(
            "--alpha: {} is an instruction (sft) task, which has no labels to split by Dirichlet(α); drop --alpha for IID shards",
            args.task.task.display()
        );
    }
    // The shipped file as is: only its tokenizer is used, so no converted copy is needed.
    let cfg = crate::engine::EngineConfig {
        precision: crate::engine::Precision::Quantized,
        forward_path: crate::engine::ForwardPath::Full,
        ..args.engine.config()
    };
    let e = Engine::load(&cfg)?;
    let split = args.task.load_sft(&e, &task)?;
    let shards = data::shard_iid(&split.train, args.clients, args.seed);
    for (p, s) in data::sft::write_sft_shards(&args.out, &shards)?
        .iter()
        .zip(&shards)
    {
        println!("{} {} examples", p.display(), s.len());
    }
    Ok(())
}
