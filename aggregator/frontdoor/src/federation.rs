//! The demo's federation recipe, shared by `fwdllm demo` /
//! `bench-federation` and the chaos bench's real-model runs: the task's data dealt to N agents
//! (held-out split kept apart), the engine of a layout, the aggregator config that makes N
//! engine agents pool about one local step of the head-rows recipe per commit, and the config of
//! an in-process agent.

use std::path::{Path, PathBuf};

use fwdllm_agent::config::{AgentConfig, SourceKind};
use fwdllm_agent::data::{self, Example, Partition, TaskConfig};
use fwdllm_agent::engine::{EngineConfig, TrainConfig};
use fwdllm_shared::lora::{LoraConfig, LoraWeights};

use fwdllm_aggregator::config::{AggregatorConfig, Schedule};

/// Why the recipe could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum FederationError {
    #[error("task {path}: {source}")]
    Task {
        path: PathBuf,
        source: fwdllm_agent::data::DataError,
    },
    #[error("data of task {task} (run `make setup` for the BBC cache): {source}")]
    Data {
        task: String,
        source: fwdllm_agent::data::DataError,
    },
    #[error("at least one agent is needed")]
    NoAgents,
    #[error("internal aggregator config invalid: {0:?}")]
    Config(Vec<String>),
}

/// The task's examples as the federation uses them.
#[derive(Debug, Clone)]
pub struct FedData {
    pub task: TaskConfig,
    /// Held-out examples: only the evaluating process ever sees them.
    pub heldout: Vec<Example>,
    /// One training shard per agent.
    pub shards: Vec<Vec<Example>>,
    /// The task's dev split dealt round-robin, a fixed subset per agent (model selection).
    pub dev_sets: Vec<Vec<Example>>,
}

/// Loads the task at `task_path` (data paths relative to `root`), splits it with the task's
/// seed, keeps the first `heldout_limit` held-out examples (0 = all) and deals the training
/// split to `agents` shards.
pub fn load_data(
    task_path: &Path,
    root: &Path,
    agents: usize,
    partition: Partition,
    shard_seed: Option<u64>,
    heldout_limit: usize,
) -> Result<FedData, FederationError> {
    if agents == 0 {
        return Err(FederationError::NoAgents);
    }
    let task = TaskConfig::from_file(task_path).map_err(|source| FederationError::Task {
        path: task_path.to_path_buf(),
        source,
    })?;
    let examples = task
        .load_examples(root)
        .map_err(|source| FederationError::Data {
            task: task.name.clone(),
            source,
        })?;
    let split = data::split(examples, task.split_seed, task.heldout, task.dev);
    let mut heldout = split.heldout;
    if heldout_limit > 0 {
        heldout.truncate(heldout_limit);
    }
    // The held-out and dev splits do not depend on `shard_seed`: seeds compare like for like.
    let shards = data::shard(
        &split.train,
        agents,
        partition,
        shard_seed.unwrap_or(task.split_seed),
    );
    let dev_sets = deal_round_robin(&split.dev, agents);
    Ok(FedData {
        task,
        heldout,
        shards,
        dev_sets,
    })
}

/// `items` dealt round-robin to `agents` sets (each agent's fixed dev subset, either task kind).
pub fn deal_round_robin<T: Clone>(items: &[T], agents: usize) -> Vec<Vec<T>> {
    let agents = agents.max(1);
    let mut sets: Vec<Vec<T>> = vec![Vec::new(); agents];
    for (i, e) in items.iter().enumerate() {
        sets[i % agents].push(e.clone());
    }
    sets
}

/// The engine for `lora`: the tail path (frozen prefix once per batch, F32 tail per
/// perturbation) whenever the layout starts above layer 0, as the agent daemon would pick it.
pub fn engine_config(model: &Path, threads: u32, lora: &LoraConfig) -> EngineConfig {
    EngineConfig {
        model: model.to_path_buf(),
        threads,
        ..EngineConfig::default()
    }
    .for_lora(lora)
}

/// Perturbations per agent per round by default: the recipe's directions per step shared among
/// the agents, so a commit pools one local step's worth.
pub fn default_perturbations(train: &TrainConfig, agents: u32) -> u32 {
    (train.directions / agents.max(1)).max(1)
}

/// The aggregator of `agents` engine agents answering `perturbations` each per round with the
/// `train` recipe, state in `state_dir`, model selection every `eval_every` versions (0 = off).
pub fn aggregator_config(
    job: &str,
    model: &Path,
    state_dir: &Path,
    train: &TrainConfig,
    agents: u32,
    perturbations: u32,
    eval_every: u64,
) -> Result<AggregatorConfig, FederationError> {
    let n = agents;
    let mut cfg = AggregatorConfig::default();
    cfg.job.name = job.to_string();
    cfg.model.gguf = model.to_path_buf();
    cfg.lora = train.lora.clone();
    cfg.state.dir = state_dir.to_path_buf();
    cfg.state.checkpoint_every = 20;
    cfg.state.plot_every = 20;
    cfg.selection.eval_every = eval_every;
    cfg.round.perturbations_per_client = perturbations;
    cfg.round.eps = train.eps;
    cfg.round.min_clients = n;
    cfg.round.quorum = n.div_ceil(2);
    cfg.task.batch_size = train.batch_size as u32;
    cfg.task.one_sided = train.one_sided;
    // K = agents x perturbations pairs per commit, like the engine's tuned local training
    // (K directions per step); the z gate rarely passes at this K (z ≈ ρK/√(2d)), so the
    // round commits once every selected agent answered.
    cfg.pacing.max_perturbations = n * perturbations;
    cfg.pacing.min_perturbations = n * perturbations;
    cfg.pacing.max_extends = 0;
    // A commit of K pairs is, to first order, K / train.directions local steps: scaling the
    // learning rate (and the clamp below) by that ratio keeps the progress and the noise per
    // direction equal to the tuned local recipe (E[Δθ] ∝ lr, Var ∝ lr²·d/K).
    let k_ratio = f64::from(n * perturbations) / f64::from(train.directions.max(1));
    cfg.step.lr = f64::from(train.lr) * k_ratio;
    cfg.step.schedule = Schedule::Cosine;
    // The cosine horizon: as many commits as the local recipe's steps to its half-life and
    // half again (a commit pools about one local step).
    cfg.step.total_commits = ((1.5 * train.lr_half_life) as u64).max(600);
    cfg.step.min_lr_ratio = 0.2;
    // ≈ the engine's absolute clamp (max_update_norm) at the initial ‖θ‖ of this layout.
    let layout = cfg.layout().map_err(|e| FederationError::Config(vec![e]))?;
    // A round waits for every selected agent (the cap above), so the deadline only bounds a
    // silent agent. A layout that adapts layer 0 runs the whole model per evaluation: 8 agents
    // sharing 2 cores then take ~2 minutes for a round of 8 directions, and 60 s abandoned
    // every round (measured 2026-12-08, deep SFT recipe), so those get 10 minutes.
    cfg.round.deadline_s = if layout.first_layer() == Some(0) {
        600.0
    } else {
        60.0
    };
    let theta0 = fwdllm_aggregator::step::params_norm(LoraWeights::init(layout).params());
    cfg.step.trust_region =
        f64::from(train.max_update_norm) * k_ratio / theta0.max(cfg.step.trust_floor).max(1e-6);
    let problems = cfg.validate();
    if !problems.is_empty() {
        return Err(FederationError::Config(
            problems.iter().map(|p| p.to_string()).collect(),
        ));
    }
    Ok(cfg)
}

/// The config of an in-process agent `id` of `job` on `host:port` whose gradient source is
/// handed to it directly (no device limits, no systemd), state in `state_dir`.
pub fn agent_config(id: &str, job: &str, host: &str, port: u16, state_dir: &Path) -> AgentConfig {
    let mut ac = AgentConfig::default();
    ac.agent.client_id = id.to_string();
    ac.agent.job = job.to_string();
    ac.agent.state_dir = state_dir.display().to_string();
    ac.agent.systemd_notify = false;
    ac.mqtt.host = host.to_string();
    ac.mqtt.port = port;
    ac.mqtt.max_packet_bytes = 64 << 20;
    ac.limits.min_free_memory_mb = 0;
    ac.limits.max_temperature_c = 0.0;
    ac.limits.max_load_per_core = 0.0;
    ac.gradient.source = SourceKind::Synthetic; // the source is passed in directly
    ac
}
