//! `fwdllm bench-federation --task <sft task>`: federated instruction tuning through the same
//! daemon (`EngineSource` on an SFT shard) and aggregator as classification. The training
//! split is dealt IID to the agents (an instruction task has no labels for Dirichlet shards),
//! the dev split round-robin for model selection (on dev NLL); this process alone holds the
//! held-out split and reports its NLL per response token before and after, and the word F1
//! of greedy generations (issue 16's `sft_nll_rel_drop`).

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context};
use fwdllm_agent::daemon::engine_source::Shard;
use fwdllm_agent::daemon::gradient::GradientSource;
use fwdllm_agent::daemon::EngineSource;
use fwdllm_agent::data::{self, SftTaskConfig};
use fwdllm_agent::engine::sft_eval::{GenerationBudget, SftEvalReport};
use fwdllm_agent::engine::{Engine, TrainConfig};
use fwdllm_aggregator::export;
use fwdllm_frontdoor::federation;
use serde_json::json;

use crate::{run, FedArgs, SftLayout, Split};

/// Held-out examples whose greedy generation is scored for F1 (generation costs a decode per
/// token; the NLL covers the whole held-out split).
const F1_EXAMPLES: usize = 32;

pub(crate) async fn bench(
    fed: &FedArgs,
    task_path: &Path,
    task: SftTaskConfig,
    out: &Path,
) -> anyhow::Result<()> {
    if matches!(fed.split, Split::Dirichlet) {
        bail!(
            "--split dirichlet: {} is an instruction (sft) task, which has no labels to deal by Dirichlet(α); use --split iid",
            task_path.display()
        );
    }
    if fed.agents == 0 {
        bail!("--agents must be at least 1");
    }
    let t0 = Instant::now();
    let train = match fed.sft_layout {
        SftLayout::Norms => TrainConfig::sft_recipe(),
        SftLayout::Tail => TrainConfig::sft_tail_recipe(),
    };
    let mut eval_engine = Engine::load(&federation::engine_config(&fed.model, 2, &train.lora))?;
    let root = std::env::current_dir()?;
    let examples = task
        .load_examples(&root, &|t, n| eval_engine.truncate_text(t, n))
        .with_context(|| format!("reading the examples of {}", task_path.display()))?;
    let split = data::sft::split_sft(examples, &task);
    let mut heldout = split.heldout;
    if fed.heldout > 0 {
        heldout.truncate(fed.heldout);
    }
    let seed = fed.seed.unwrap_or(task.split_seed);
    let shards = data::shard_iid(&split.train, fed.agents, seed);
    let dev_sets = federation::deal_round_robin(&split.dev, fed.agents);
    let budget = GenerationBudget {
        examples: F1_EXAMPLES.min(heldout.len()),
        max_new_tokens: task.max_response_tokens,
        samples: 3,
    };
    println!(
        "{}: {} agents, held-out {} examples; zero-shot NLL and generations ...",
        task.name,
        fed.agents,
        heldout.len()
    );
    let zero = eval_engine.evaluate_sft(None, &heldout, budget)?;
    println!("zero-shot held-out NLL/token {:.4}", zero.nll);

    let (out_dir, state_dir) = run::fresh_dirs(fed, "target/bench-sft")?;
    let perturbations = fed
        .perturbations
        .unwrap_or_else(|| federation::default_perturbations(&train, fed.agents as u32));
    let mut cfg = federation::aggregator_config(
        &format!("bench-{}", task.name),
        &fed.model,
        &state_dir,
        &train,
        fed.agents as u32,
        perturbations,
        fed.eval_every,
    )?;
    cfg.job.max_commits = fed.max_commits.unwrap_or(0);
    let trainable = cfg.layout().map_err(anyhow::Error::msg)?.trainable_len();
    let threads = run::agent_threads(fed.agents);
    let mut sources: Vec<Box<dyn GradientSource + Send>> = Vec::new();
    for (i, (shard, dev)) in shards.into_iter().zip(dev_sets).enumerate() {
        let engine = Engine::load(&federation::engine_config(&fed.model, threads, &train.lora))?;
        sources.push(Box::new(
            EngineSource::with_shard(engine, Shard::Sft(shard), i as u64 + 1)?
                .with_dev_shard(Shard::Sft(dev)),
        ));
    }
    let ran = run::drive(&cfg, sources, fed, &out_dir, None).await?;

    println!("evaluating version {} ...", ran.version);
    let last = eval_engine.evaluate_sft(Some(&ran.weights), &heldout, budget)?;
    let (selected_version, selected_weights, _) =
        export::load_for_export(&state_dir, false).map_err(anyhow::Error::msg)?;
    let selected = if selected_version == ran.version {
        last.clone()
    } else {
        println!("evaluating version {selected_version} (best on dev) ...");
        eval_engine.evaluate_sft(Some(&selected_weights), &heldout, budget)?
    };
    let adapter = out_dir.join("adapter.gguf");
    export::export_gguf(&selected_weights, &adapter)?;
    if !selected_weights.layout().norms().is_empty() {
        // Stock llama.cpp cannot take norm gains from an adapter: the model with them in place.
        let merged = out_dir.join("model-merged.gguf");
        fwdllm_shared::gguf::merge_adapter_norms(&fed.model, &adapter, &merged)
            .with_context(|| format!("writing {}", merged.display()))?;
        println!(
            "wrote {} (use it with adapter.gguf in stock llama.cpp)",
            merged.display()
        );
    }
    let drop = |r: &SftEvalReport| (zero.nll - r.nll) / zero.nll;
    let samples: Vec<_> = zero
        .samples
        .iter()
        .zip(&selected.samples)
        .map(|(b, a)| json!({"reference": b.reference, "before": b.generation, "after": a.generation}))
        .collect();
    let report = json!({
        "task": task.name,
        "kind": "sft",
        "agents": fed.agents,
        "split": "iid",
        "heldout_examples": heldout.len(),
        "zero_shot_nll": zero.nll,
        "zero_shot_f1": zero.f1,
        "last_version": ran.version,
        "last_version_nll": last.nll,
        "selected_version": selected_version,
        "selected_nll": selected.nll,
        "selected_f1": selected.f1,
        "f1_examples": budget.examples,
        "sft_nll_rel_drop": drop(&selected),
        "last_version_nll_rel_drop": drop(&last),
        "commits": ran.commits,
        "rounds": ran.summary.rounds,
        "perturbations": ran.summary.perturbations,
        "train_wall_s": ran.train_wall_s,
        "wall_s": t0.elapsed().as_secs_f64(),
        "lora_trainable_params": trainable,
        "replica_hashes_equal": ran.replicas_equal,
        "shard_seed": seed,
        "samples": samples,
    });
    if let Some(d) = out.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(out, serde_json::to_string_pretty(&report)? + "\n")?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    println!("wrote {}", out.display());
    Ok(())
}
