//! One federated run, whatever the task kind: the embedded broker, the aggregator and one
//! in-process agent per gradient source, driven until the time budget or the commit cap; then
//! every agent's replica checked against the aggregator's weights. `demo` and
//! `bench-federation` (classification in `main.rs`, instruction tuning in `sft.rs`) build the
//! sources and evaluate around it.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use fwdllm_agent::daemon::gradient::GradientSource;
use fwdllm_agent::daemon::{Agent, AgentInfo};
use fwdllm_aggregator::broker::EmbeddedBroker;
use fwdllm_aggregator::config::AggregatorConfig;
use fwdllm_aggregator::coordinator::AggEvent;
use fwdllm_aggregator::export;
use fwdllm_aggregator::server::{self, BrokerTarget, Hooks, RunSummary};
use fwdllm_frontdoor::federation;
use fwdllm_shared::lora::LoraWeights;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::FedArgs;

/// The run's output directory (`--out-dir`, else `default`) and its aggregator state directory
/// inside it, cleared: a run starts a new job.
pub(crate) fn fresh_dirs(fed: &FedArgs, default: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
    let out_dir = fed
        .out_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(default));
    let state_dir = out_dir.join("aggregator");
    if state_dir.exists() {
        std::fs::remove_dir_all(&state_dir)
            .with_context(|| format!("clearing {}", state_dir.display()))?;
    }
    std::fs::create_dir_all(&out_dir)?;
    Ok((out_dir, state_dir))
}

/// Compute threads per agent engine: the cores shared among the agents, at least one.
pub(crate) fn agent_threads(agents: usize) -> u32 {
    let cores = std::thread::available_parallelism().map_or(2, |x| x.get());
    (cores / agents.max(1)).max(1) as u32
}

/// What a run leaves for its evaluation.
pub(crate) struct Ran {
    pub(crate) summary: RunSummary,
    /// The last version committed, as the event stream reported it.
    pub(crate) commits: u64,
    pub(crate) train_wall_s: f64,
    /// The aggregator's durable version and weights after it stopped.
    pub(crate) version: u64,
    pub(crate) weights: LoraWeights,
    pub(crate) per_agent: Vec<AgentInfo>,
    /// Every agent reached the final version with the aggregator's hash.
    pub(crate) replicas_equal: bool,
}

/// Runs `cfg`'s aggregator and one agent `agent-{i}` per source (state under
/// `out_dir/agents`) on an embedded broker for `fed.minutes` (or until `cfg.job.max_commits`).
pub(crate) async fn drive(
    cfg: &AggregatorConfig,
    sources: Vec<Box<dyn GradientSource + Send>>,
    fed: &FedArgs,
    out_dir: &Path,
    on_commit: Option<server::OnCommit>,
) -> anyhow::Result<Ran> {
    let broker = EmbeddedBroker::start("127.0.0.1", 0, 64 << 20)?;
    let (ev_tx, mut ev_rx) = broadcast::channel(65_536);
    let agg_stop = CancellationToken::new();
    let target = BrokerTarget {
        host: broker.host(),
        port: broker.port(),
    };
    let agg_task = tokio::spawn(server::run(
        cfg.clone(),
        target,
        agg_stop.clone(),
        Hooks {
            events: Some(ev_tx),
            on_commit,
            ..Hooks::default()
        },
    ));

    let mut agents = Vec::new();
    for (i, source) in sources.into_iter().enumerate() {
        let id = format!("agent-{i}");
        let agent_dir = out_dir.join("agents").join(&id);
        let _ = std::fs::remove_dir_all(&agent_dir);
        let ac = federation::agent_config(
            &id,
            &cfg.job.name,
            &broker.host(),
            broker.port(),
            &agent_dir,
        );
        let agent = Agent::new(ac, source).map_err(|e| anyhow::anyhow!("{e}"))?;
        let info = agent.watch();
        let stop = CancellationToken::new();
        let task = tokio::spawn(agent.run(stop.clone()));
        agents.push((info, stop, task));
    }

    // Progress: one bar over the time budget, its message the latest commit. indicatif draws
    // nothing when stdout is not a terminal (CI, `make bench | tee`): then a plain line per
    // commit, at most one every 5 s (head-row rounds commit several times a second).
    let t_train = Instant::now();
    let budget = Duration::from_secs_f64(fed.minutes * 60.0);
    let style = ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {msg}")
        .expect("template")
        .progress_chars("=> ");
    let plain = !std::io::stdout().is_terminal();
    let bar = if plain {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(budget.as_secs().max(1)).with_style(style)
    };
    let mut last_line = Instant::now() - Duration::from_secs(10);
    let mut commits = 0u64;
    let deadline = tokio::time::Instant::now() + budget;
    loop {
        let ev = tokio::select! {
            _ = tokio::time::sleep_until(deadline) => break,
            e = ev_rx.recv() => match e { Ok(e) => e, Err(broadcast::error::RecvError::Lagged(_)) => continue, Err(_) => break },
        };
        match ev {
            AggEvent::Committed {
                version,
                perturbations,
                ..
            } => {
                commits = version;
                let msg = format!(
                    "v{version} ({perturbations} pairs in the last commit, {:.0}s elapsed)",
                    t_train.elapsed().as_secs_f64()
                );
                if plain && last_line.elapsed() >= Duration::from_secs(5) {
                    println!("commit {msg}");
                    last_line = Instant::now();
                }
                bar.set_position(t_train.elapsed().as_secs());
                bar.set_message(msg);
            }
            AggEvent::Abandoned { round } => {
                let msg = format!("round {round} abandoned (deadline without quorum)");
                if plain {
                    println!("{msg}");
                } else {
                    bar.println(msg);
                }
            }
            _ => {}
        }
    }
    bar.finish_and_clear();
    let train_wall_s = t_train.elapsed().as_secs_f64();
    agg_stop.cancel();
    let summary = agg_task.await??;
    // Replicas: every agent at the final version with the aggregator's hash.
    let final_version = summary.version;
    let (version, weights) = export::load_weights(&cfg.state.dir)?;
    let final_hash = Some(weights.hash());
    let mut per_agent = Vec::new();
    let mut replicas_equal = true;
    for (info, stop, task) in agents.iter_mut() {
        let got = tokio::time::timeout(
            Duration::from_secs(30),
            info.wait_for(|i| i.model_version >= final_version),
        )
        .await
        .map(|r| r.is_ok())
        .unwrap_or(false);
        let i = info.borrow().clone();
        replicas_equal &= got && i.model_version == final_version && i.weights_hash == final_hash;
        stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(30), task).await;
        per_agent.push(info.borrow().clone());
    }
    Ok(Ran {
        summary,
        commits: commits.max(final_version),
        train_wall_s,
        version,
        weights,
        per_agent,
        replicas_equal,
    })
}
