//! `fwdllm`: the newcomer's entry point.
//!
//! * `demo` — embedded broker + aggregator + N agents (llama.cpp engine on BBC News shards) in
//!   one process, bounded time, progress bar per round, final table, plot and exported adapter.
//! * `monitor` — live view of a job on any broker.
//! * `export` — GGUF LoRA from an aggregator state directory.
//! * `bench-federation` — the same federation on AG News, plus the simulated-client ingest
//!   measurement, written as flat JSON; on an instruction (sft) task, federated SFT with the
//!   held-out NLL before and after (`sft.rs`). `run.rs` drives a run of either kind.
//!
//! Evaluation: the demo process holds the held-out split and runs its own engine instance on
//! the aggregator's exact weights (zero-shot before round 1, final after the last commit, and
//! through the exported GGUF file). Agents never see held-out data, and training is not stalled
//! by evaluation passes on a training agent.

mod run;
mod sft;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use fwdllm_agent::daemon::gradient::GradientSource;
use fwdllm_agent::daemon::{AgentInfo, EngineSource};
use fwdllm_agent::data::{Example, Partition, TaskFile};
use fwdllm_agent::engine::Engine;
use fwdllm_agent::engine::TrainConfig;
use fwdllm_aggregator::server;
use fwdllm_aggregator::{export, metrics, monitor};
use fwdllm_frontdoor::federation::{self, FedData};
use fwdllm_frontdoor::sim;
use fwdllm_shared::lora::LoraWeights;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "fwdllm",
    version,
    about = "fwdllm: federated forward-gradient LoRA fine-tuning over MQTT"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// The demo's commit budget: on BBC News held-out accuracy is 0.945 by then against 0.965 after a
/// 10-minute run (1,767 commits), and a cold clone (features computed on the first pass) gets
/// there in about 6 minutes on 2 cores, so `make demo` stays short (docs/RESULTS.md). A cap, not
/// a target: `--minutes` still bounds it.
const DEMO_MAX_COMMITS: u64 = 400;

#[derive(Clone, Copy, ValueEnum)]
enum Split {
    Iid,
    Dirichlet,
}

#[derive(clap::Args, Clone)]
struct FedArgs {
    /// Number of agents (each with its own engine and data shard).
    #[arg(long, default_value_t = 4)]
    agents: usize,
    /// Training time budget in minutes (evaluation and set-up come on top).
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,
    /// How the training split is dealt to agents.
    #[arg(long, value_enum, default_value_t = Split::Iid)]
    split: Split,
    /// Dirichlet concentration for --split dirichlet (small = each agent sees few labels).
    #[arg(long, default_value_t = 0.5)]
    alpha: f64,
    /// Model file (GGUF).
    #[arg(long, default_value = ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: PathBuf,
    /// Perturbations per agent per round (default: the recipe's directions per step shared
    /// among the agents, so a commit pools one local step's worth). Each agent also evaluates
    /// L(θ) once per round (one-sided estimator).
    #[arg(long)]
    perturbations: Option<u32>,
    /// Held-out examples evaluated (0 = the task's whole held-out split).
    #[arg(long, default_value_t = 0)]
    heldout: usize,
    /// Output directory (state, metrics, plot, adapter).
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// Agents score their dev subsets every this many commits; the exported adapter is the
    /// best version on dev (0 = export the last version).
    #[arg(long, default_value_t = 20)]
    eval_every: u64,
    /// Seed of the dealing of the training split to agents (default: the task's split_seed).
    /// The held-out and dev splits do not depend on it, so seeds compare like for like.
    #[arg(long)]
    seed: Option<u64>,
    /// Evaluate the held-out split every this many commits after the run (0 = none): the
    /// accuracy-over-commits curve in the JSON report.
    #[arg(long, default_value_t = 0)]
    curve_every: u64,
    /// Stop after this many commits even if time remains (0 = train for --minutes; default:
    /// 400 for `demo`, 0 otherwise). Runs that compare data splits stop at equal commits, so a
    /// warm cache does not favour one.
    #[arg(long)]
    max_commits: Option<u64>,
    /// Instruction (sft) tasks: the layout trained. `norms` (the recipe: RMSNorm gains of every
    /// layer, whole-model evaluations) or `tail` (LoRA on the last three layers: ten times
    /// cheaper per evaluation, a fraction of the gain; docs/studies/sft-layouts.md).
    #[arg(long, value_enum, default_value_t = SftLayout::Norms)]
    sft_layout: SftLayout,
}

#[derive(Clone, Copy, ValueEnum)]
enum SftLayout {
    Norms,
    Tail,
}

#[derive(Subcommand)]
enum Cmd {
    /// Embedded broker + aggregator + N agents on BBC News; prints zero-shot vs trained accuracy.
    Demo {
        #[command(flatten)]
        fed: FedArgs,
        #[arg(long, default_value = "edge-agent/tasks/bbc.toml")]
        task: PathBuf,
    },
    /// Live view of a job on any broker.
    Monitor {
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        #[arg(long, default_value_t = 1883)]
        port: u16,
        #[arg(long, default_value = "default")]
        job: String,
        /// Print snapshots instead of redrawing the screen.
        #[arg(long)]
        plain: bool,
    },
    /// Write the adapter held in an aggregator state directory as a GGUF LoRA.
    Export {
        #[arg(long)]
        state_dir: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Export the last version even when model selection recorded a better one on dev.
        #[arg(long)]
        last: bool,
    },
    /// Federation on AG News + simulated-client ingest; writes flat JSON.
    BenchFederation {
        #[command(flatten)]
        fed: FedArgs,
        #[arg(long, default_value = "edge-agent/tasks/ag_news.toml")]
        task: PathBuf,
        #[arg(long, default_value = "target/bench/federation.json")]
        out: PathBuf,
        /// Simulated clients for the ingest measurement (0 = skip it).
        #[arg(long, default_value_t = 1000)]
        sim_clients: usize,
    },
}

fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(
        env_logger::Env::default()
            .default_filter_or("warn,fwdllm_aggregator=warn,rumqttd=off,tracing=off"),
    )
    .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.cmd {
        Cmd::Demo { mut fed, task } => {
            fed.max_commits.get_or_insert(DEMO_MAX_COMMITS);
            let r = rt.block_on(federate(&fed, &task, "demo"))?;
            r.print_table();
            Ok(())
        }
        Cmd::Monitor {
            host,
            port,
            job,
            plain,
        } => rt.block_on(async move {
            let stop = CancellationToken::new();
            let s2 = stop.clone();
            tokio::spawn(async move {
                let _ = tokio::signal::ctrl_c().await;
                s2.cancel();
            });
            monitor::run(&host, port, &job, plain, stop)
                .await
                .map_err(anyhow::Error::msg)
        }),
        Cmd::Export {
            state_dir,
            out,
            last,
        } => {
            let (version, w, best) = export::load_for_export(&state_dir, last)
                .map_err(|e| anyhow::anyhow!("loading {}: {e}", state_dir.display()))?;
            let n = export::export_gguf(&w, &out)?;
            println!(
                "wrote {} ({n} bytes, version {version}{}, hash {})",
                out.display(),
                best.map(|b| format!(", best on dev: accuracy {:.4}", b.dev_accuracy))
                    .unwrap_or_default(),
                w.hash()
            );
            Ok(())
        }
        Cmd::BenchFederation {
            fed,
            task,
            out,
            sim_clients,
        } => rt.block_on(async move {
            // An instruction task: its own evaluation (NLL, generations), no ingest part.
            if let TaskFile::Sft(t) = TaskFile::from_file(&task)
                .with_context(|| format!("reading task {}", task.display()))?
            {
                return sft::bench(&fed, &task, t, &out).await;
            }
            // 0 skips the simulated-client measurement (`fwdllm-bench sim` runs it alone).
            let ingest = if sim_clients > 0 {
                let r = sim::bench(sim_clients, 10, 4, None).await?;
                println!("simulated clients: {r}");
                r
            } else {
                serde_json::json!({})
            };
            let r = federate(&fed, &task, "bench").await?;
            r.print_table();
            let mut j = serde_json::json!({
                "task": r.task,
                "agents": r.agents,
                "split": r.split,
                "zero_shot_accuracy": r.zero_shot,
                "final_accuracy": r.final_acc,
                "selected_version": r.selected_version,
                "selected_dev_accuracy": r.selected_dev_acc,
                "selected_accuracy": r.selected_acc,
                "exported_adapter_accuracy": r.exported_acc,
                "heldout_examples": r.heldout_n,
                "commits": r.commits,
                "rounds": r.rounds,
                "perturbations": r.perturbations,
                "wall_s": r.wall_s,
                "train_wall_s": r.train_wall_s,
                "upload_bytes_per_agent": r.upload_per_agent,
                "download_bytes_per_agent": r.download_per_agent,
                "dense_fedavg_bytes": r.dense_fedavg_bytes,
                "dense_fedavg_bytes_per_round": r.dense_per_round,
                "lora_trainable_params": r.trainable,
                "replica_hashes_equal": r.replicas_equal,
                "sim_clients": sim_clients,
                "shard_seed": r.seed,
                "curve_versions": r.curve.iter().map(|c| c.0).collect::<Vec<_>>(),
                "curve_heldout_accuracy": r.curve.iter().map(|c| c.1).collect::<Vec<_>>(),
            });
            let obj = j.as_object_mut().expect("object");
            for (k, v) in ingest.as_object().expect("object") {
                let key = if k == "ingest_updates_per_s" {
                    k.clone()
                } else {
                    format!("sim_{k}")
                };
                obj.insert(key, v.clone());
            }
            if let Some(d) = out.parent() {
                std::fs::create_dir_all(d)?;
            }
            std::fs::write(&out, serde_json::to_string_pretty(&j)? + "\n")?;
            println!("{}", serde_json::to_string_pretty(&j)?);
            println!("wrote {}", out.display());
            anyhow::Ok(())
        }),
    }
}

struct FedResult {
    task: String,
    agents: usize,
    split: String,
    zero_shot: f64,
    final_acc: f64,
    /// The version model selection kept (best dev accuracy), what adapter.gguf holds.
    selected_version: u64,
    selected_dev_acc: Option<f64>,
    selected_acc: f64,
    exported_acc: f64,
    heldout_n: usize,
    commits: u64,
    rounds: u64,
    perturbations: u64,
    wall_s: f64,
    train_wall_s: f64,
    upload_per_agent: f64,
    download_per_agent: f64,
    dense_fedavg_bytes: u64,
    dense_per_round: u64,
    trainable: usize,
    replicas_equal: bool,
    out_dir: PathBuf,
    per_agent: Vec<AgentInfo>,
    /// (version, held-out accuracy), from version 0 (zero-shot); see `--curve-every`.
    curve: Vec<(u64, f64)>,
    seed: u64,
}

impl FedResult {
    fn print_table(&self) {
        println!();
        println!(
            "fwdllm federation — {} agents, task {}, split {}",
            self.agents, self.task, self.split
        );
        println!("{:-<64}", "");
        println!(
            "{:<40} {:>22}",
            "held-out accuracy, zero-shot",
            format!("{:.3}", self.zero_shot)
        );
        println!(
            "{:<40} {:>22}",
            "held-out accuracy, last version",
            format!("{:.3}", self.final_acc)
        );
        println!(
            "{:<40} {:>22}",
            format!("held-out accuracy, v{} (best dev)", self.selected_version),
            format!(
                "{:.3}{}",
                self.selected_acc,
                self.selected_dev_acc
                    .map(|d| format!(" (dev {d:.3})"))
                    .unwrap_or_default()
            )
        );
        println!(
            "{:<40} {:>22}",
            "  same, via exported GGUF adapter",
            format!("{:.3}", self.exported_acc)
        );
        println!("{:<40} {:>22}", "held-out examples", self.heldout_n);
        println!(
            "{:<40} {:>22}",
            "commits / rounds",
            format!("{} / {}", self.commits, self.rounds)
        );
        println!("{:<40} {:>22}", "perturbations used", self.perturbations);
        println!(
            "{:<40} {:>22}",
            "wall time (training / total) s",
            format!("{:.0} / {:.0}", self.train_wall_s, self.wall_s)
        );
        println!(
            "{:<40} {:>22}",
            "bytes up per agent (mean)",
            format!("{:.0}", self.upload_per_agent)
        );
        println!(
            "{:<40} {:>22}",
            "bytes down per agent (mean)",
            format!("{:.0}", self.download_per_agent)
        );
        println!(
            "{:<40} {:>22}",
            "dense LoRA FedAvg bytes up per agent", self.dense_fedavg_bytes
        );
        println!(
            "{:<40} {:>22}",
            "replica hashes equal aggregator's", self.replicas_equal
        );
        for a in &self.per_agent {
            println!(
                "  {:<12} updates {:>5} perturbations {:>6} up {:>9} B down {:>10} B",
                a.client_id, a.updates_sent, a.perturbations_done, a.bytes_sent, a.bytes_received
            );
        }
        println!(
            "outputs in {}: adapter.gguf, metrics.csv, metrics.jsonl, metrics.png",
            self.out_dir.display()
        );
    }
}

/// Held-out points for the plot, by version (a line series must be ordered), one per version.
fn evals_by_version(a: &[(u64, f64)], b: &[(u64, f64)]) -> Vec<(u64, f64)> {
    let mut all = [a, b].concat();
    all.sort_by_key(|p| p.0);
    all.dedup_by_key(|p| p.0);
    all
}

fn evaluate(
    engine: &mut Engine,
    w: Option<&fwdllm_shared::lora::LoraWeights>,
    ex: &[Example],
) -> anyhow::Result<(f64, f64)> {
    let r = engine.evaluate(w, ex)?;
    Ok((r.accuracy, r.loss))
}

async fn federate(fed: &FedArgs, task_path: &Path, name: &str) -> anyhow::Result<FedResult> {
    let t0 = Instant::now();
    if fed.agents == 0 {
        bail!("--agents must be at least 1");
    }
    let partition = match fed.split {
        Split::Iid => Partition::Iid,
        Split::Dirichlet => Partition::Dirichlet { alpha: fed.alpha },
    };
    let root = std::env::current_dir()?;
    let FedData {
        task,
        heldout,
        shards,
        dev_sets,
    } = federation::load_data(
        task_path,
        &root,
        fed.agents,
        partition,
        fed.seed,
        fed.heldout,
    )?;
    let (out_dir, state_dir) = run::fresh_dirs(fed, &format!("target/{name}"))?;
    let train = TrainConfig::head_rows_recipe(task.labels.len());
    let perturbations = fed
        .perturbations
        .unwrap_or_else(|| federation::default_perturbations(&train, fed.agents as u32));

    // Evaluation engine (held-out split lives only here).
    println!("loading the evaluation engine and measuring zero-shot accuracy on {} held-out examples ...", heldout.len());
    let mut eval_engine = Engine::load(&federation::engine_config(&fed.model, 2, &train.lora))?;
    eval_engine.set_task(&task)?;
    println!("engine path: {}", eval_engine.describe_path());
    let (zero_shot, _) = evaluate(&mut eval_engine, None, &heldout)?;
    println!("zero-shot held-out accuracy: {zero_shot:.3}");

    // Aggregator config; weights snapshots for the curve.
    let mut cfg = federation::aggregator_config(
        &format!("{name}-{}", task.name),
        &fed.model,
        &state_dir,
        &train,
        fed.agents as u32,
        perturbations,
        fed.eval_every,
    )?;
    cfg.job.max_commits = fed.max_commits.unwrap_or(0);
    let layout = cfg.layout().map_err(anyhow::Error::msg)?;
    // Weights every `curve_every` commits, evaluated after the run (not during it, where the
    // evaluation would take CPU from the agents).
    let snapshots = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let on_commit: Option<server::OnCommit> = (fed.curve_every > 0).then(|| {
        let snapshots = snapshots.clone();
        let every = fed.curve_every;
        let mut bucket = 0;
        // Called once per durable group of messages, which may hold several commits: a
        // snapshot at the first version past each multiple of `every`.
        Box::new(move |version: u64, w: &LoraWeights| {
            if version / every > bucket {
                bucket = version / every;
                snapshots
                    .lock()
                    .expect("snapshot list")
                    .push((version, w.clone()));
            }
            None
        }) as server::OnCommit
    });
    // Agents: each its own engine (N engines share the cores) and shard.
    let threads = run::agent_threads(fed.agents);
    let mut sources: Vec<Box<dyn GradientSource + Send>> = Vec::new();
    for (i, (shard, dev)) in shards.into_iter().zip(dev_sets).enumerate() {
        let mut engine =
            Engine::load(&federation::engine_config(&fed.model, threads, &train.lora))?;
        engine.set_task(&task)?;
        sources.push(Box::new(
            EngineSource::new(engine, shard, i as u64 + 1)?.with_dev(dev),
        ));
    }
    let run::Ran {
        summary,
        commits,
        train_wall_s,
        version,
        weights,
        per_agent,
        replicas_equal,
    } = run::drive(&cfg, sources, fed, &out_dir, on_commit).await?;
    println!(
        "evaluating version {version} on {} held-out examples ...",
        heldout.len()
    );
    let (final_acc, _) = evaluate(&mut eval_engine, Some(&weights), &heldout)?;
    let snapshots = std::mem::take(&mut *snapshots.lock().expect("snapshot list"));
    let mut curve = vec![(0, zero_shot)];
    if !snapshots.is_empty() {
        println!(
            "evaluating {} versions for the accuracy curve ...",
            snapshots.len()
        );
    }
    for (v, w) in &snapshots {
        curve.push((*v, evaluate(&mut eval_engine, Some(w), &heldout)?.0));
    }
    if fed.curve_every > 0 && curve.last().map(|c| c.0) != Some(version) {
        curve.push((version, final_acc));
    }
    // The export is the version model selection kept (best on the agents' dev subsets).
    let (selected_version, selected_weights, best) =
        export::load_for_export(&state_dir, false).map_err(anyhow::Error::msg)?;
    let selected_acc = if selected_version == version {
        final_acc
    } else {
        println!("evaluating version {selected_version} (best on dev) ...");
        evaluate(&mut eval_engine, Some(&selected_weights), &heldout)?.0
    };
    let adapter = out_dir.join("adapter.gguf");
    export::export_gguf(&selected_weights, &adapter)?;
    // The exported file, loaded by llama.cpp as a LoRA adapter, must give the same predictions.
    eval_engine.set_adapter_file(&adapter)?;
    let eval_task = eval_engine.task().cloned().context("evaluation task")?;
    let exported_acc = match eval_engine.loss(&eval_task, &heldout) {
        Ok(l) => {
            let correct = l
                .predictions
                .iter()
                .zip(&heldout)
                .filter(|(p, e)| **p == e.label)
                .count();
            correct as f64 / heldout.len().max(1) as f64
        }
        Err(e) => {
            log::warn!("evaluating the exported adapter: {e}");
            f64::NAN
        }
    };
    for f in [metrics::PLOT_FILE, metrics::CSV_FILE, metrics::JSONL_FILE] {
        let _ = std::fs::copy(state_dir.join(f), out_dir.join(f));
    }
    // The aggregator's plot has no held-out points (evaluation runs here, not in a round):
    // redraw it with the zero-shot and final accuracies.
    let plotted = metrics::read_jsonl(&state_dir.join(metrics::JSONL_FILE))
        .map_err(|e| e.to_string())
        .and_then(|records| {
            metrics::plot_with_evals(
                &records,
                &evals_by_version(
                    &curve,
                    &[(selected_version, selected_acc), (version, final_acc)],
                ),
                &out_dir.join(metrics::PLOT_FILE),
            )
            .map_err(|e| e.to_string())
        });
    if let Err(e) = plotted {
        log::warn!("redrawing {}: {e}", metrics::PLOT_FILE);
    }
    let trainable = layout.trainable_len();
    let k = per_agent.len().max(1) as f64;
    let dense_per_round = (trainable * 4) as u64;
    Ok(FedResult {
        task: task.name.clone(),
        agents: fed.agents,
        split: match fed.split {
            Split::Iid => "iid".into(),
            Split::Dirichlet => format!("dirichlet({})", fed.alpha),
        },
        zero_shot,
        final_acc,
        selected_version,
        selected_dev_acc: best.map(|b| b.dev_accuracy),
        selected_acc,
        exported_acc,
        heldout_n: heldout.len(),
        commits: commits.max(summary.version),
        rounds: summary.rounds,
        perturbations: summary.perturbations,
        wall_s: t0.elapsed().as_secs_f64(),
        train_wall_s,
        upload_per_agent: per_agent.iter().map(|a| a.bytes_sent as f64).sum::<f64>() / k,
        download_per_agent: per_agent
            .iter()
            .map(|a| a.bytes_received as f64)
            .sum::<f64>()
            / k,
        dense_fedavg_bytes: dense_per_round * summary.version,
        dense_per_round,
        trainable,
        replicas_equal,
        out_dir,
        per_agent,
        curve,
        seed: fed.seed.unwrap_or(task.split_seed),
    })
}
