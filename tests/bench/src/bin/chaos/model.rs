//! The real-model scenarios of the chaos bench: the demo's federation (`fwdllm_aggregator::
//! federation`: SmolLM2-135M, head-rows recipe, one engine per agent, in-process like the demo)
//! with a fixed commit budget, run clean, with 20 % Byzantine agents under robust aggregation,
//! and with the same Byzantine agents unprotected. Held-out accuracy is measured here on the
//! weights of the budget's last version, rebuilt by replaying the commits the ledger received.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use fwdllm_agent::daemon::{
    Agent, AgentError, EngineSource, GradientBatch, GradientError, GradientRequest, GradientSource,
};
use fwdllm_agent::data::{Example, Partition};
use fwdllm_agent::engine::{Engine, TrainConfig};
use fwdllm_aggregator::broker::EmbeddedBroker;
use fwdllm_aggregator::server::{self, BrokerTarget, Hooks};
use fwdllm_bench::chaos::{account, check_replicas, FinalState, Observer, RulingRecord, Rulings};
use fwdllm_frontdoor::federation::{self, FedData};
use fwdllm_shared::lora::{LoraWeights, WeightsHash};
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::scenarios::{record, GUARD};

/// Largest MQTT packet of the model runs (the demo's).
const MAX_PACKET: usize = 64 << 20;

/// Held-out accuracy is also measured every this many versions (the learning curve).
const CURVE_EVERY: u64 = 50;

/// A Byzantine client: the honest engine's g, multiplied by `factor` (1000: scaled, −1:
/// sign-flipped) before it is sent.
struct Byzantine {
    inner: Box<dyn GradientSource + Send>,
    factor: f32,
}

impl GradientSource for Byzantine {
    fn forward_gradients(
        &mut self,
        req: &GradientRequest<'_>,
    ) -> Result<GradientBatch, GradientError> {
        let mut b = self.inner.forward_gradients(req)?;
        for g in &mut b.g {
            *g *= self.factor;
        }
        Ok(b)
    }

    fn describe(&self) -> String {
        format!("Byzantine (g x {}) {}", self.factor, self.inner.describe())
    }
}

/// The real-model runs' parameters.
#[derive(Debug, Clone)]
pub(crate) struct ModelSetup {
    pub(crate) work: PathBuf,
    pub(crate) model: PathBuf,
    pub(crate) task: PathBuf,
    pub(crate) agents: usize,
    /// Byzantine agents (the last ones): the first half scale g, the rest flip its sign.
    pub(crate) byzantine: usize,
    /// Scale of the scaling Byzantine agents (a second robust run uses `scale_under_bound`).
    pub(crate) scale: f32,
    pub(crate) scale_under_bound: f32,
    /// Commits per run; accuracy is measured at exactly this version.
    pub(crate) commits: u64,
    /// Held-out examples (0 = the task's whole held-out split).
    pub(crate) heldout: usize,
}

impl ModelSetup {
    /// g multiplier of agent `i` in a Byzantine run scaling by `scale` (None: honest).
    fn factor(&self, i: usize, scale: f32) -> Option<f32> {
        let first = self.agents.checked_sub(self.byzantine)?;
        if i < first {
            return None;
        }
        let scaled = self.byzantine.div_ceil(2);
        Some(if i - first < scaled { scale } else { -1.0 })
    }
}

/// One run's settings.
struct Variant {
    name: &'static str,
    /// Agents that run (the first ones of the fleet's shards).
    agents: usize,
    /// g multiplier of the scaling Byzantine agents (None: every agent honest).
    scale: Option<f32>,
    robust: bool,
}

impl ModelSetup {
    /// Clean (every agent honest); without the Byzantine agents (the honest ones alone, same
    /// shards); Byzantine with robust aggregation at `scale` (g mostly above
    /// `robust.max_abs_g`: the ingest bound rejects them) and at `scale_under_bound` (under it:
    /// the per-round clip and the per-client cap act); Byzantine unprotected at `scale`.
    fn variants(&self) -> [Variant; 5] {
        let (n, honest) = (self.agents, self.agents - self.byzantine);
        [
            Variant {
                name: "byzantine_clean",
                agents: n,
                scale: None,
                robust: true,
            },
            Variant {
                name: "byzantine_absent",
                agents: honest,
                scale: None,
                robust: true,
            },
            Variant {
                name: "byzantine_robust",
                agents: n,
                scale: Some(self.scale),
                robust: true,
            },
            Variant {
                name: "byzantine_robust_under_bound",
                agents: n,
                scale: Some(self.scale_under_bound),
                robust: true,
            },
            Variant {
                name: "byzantine_unprotected",
                agents: n,
                scale: Some(self.scale),
                robust: false,
            },
        ]
    }
}

/// Percentage points from `a` to `b`, two decimals.
fn points(a: f64, b: f64) -> f64 {
    (10_000.0 * (b - a)).round() / 100.0
}

/// Runs the variants named in `only` (all when empty); returns their records and the accuracy
/// summary.
pub(crate) async fn run_all(s: &ModelSetup, only: &[String]) -> Result<(Vec<Value>, Value)> {
    if s.byzantine > s.agents {
        bail!("{} Byzantine agents of {}", s.byzantine, s.agents);
    }
    let root = std::env::current_dir()?;
    let data = federation::load_data(&s.task, &root, s.agents, Partition::Iid, None, s.heldout)?;
    let train = TrainConfig::head_rows_recipe(data.task.labels.len());
    log::info!(
        "model runs: task {}, {} agents, {} held-out examples, {} commits each",
        data.task.name,
        s.agents,
        data.heldout.len(),
        s.commits
    );
    let mut eval = Engine::load(&federation::engine_config(&s.model, 2, &train.lora))?;
    eval.set_task(&data.task)?;
    let zero_shot = eval.evaluate(None, &data.heldout)?.accuracy;
    log::info!("zero-shot held-out accuracy {zero_shot:.4}");
    let mut records = Vec::new();
    let mut runs = serde_json::Map::new();
    let (mut clean, mut absent) = (None, None);
    let mut within = true;
    for v in s.variants().iter().filter(|v| crate::wanted(only, v.name)) {
        let (mut j, snapshots) = run_variant(s, v, &data, &train).await?;
        let mut curve = Vec::new();
        for (version, w) in &snapshots {
            curve.push((*version, eval.evaluate(Some(w), &data.heldout)?.accuracy));
        }
        let a = curve.last().map_or(f64::NAN, |(_, a)| *a);
        log::info!(
            "{}: held-out accuracy {a:.4} at version {}",
            v.name,
            s.commits
        );
        match v.name {
            "byzantine_clean" => clean = Some(a),
            "byzantine_absent" => absent = Some(a),
            _ => {}
        }
        let from_clean = clean.map(|c| points(c, a));
        if v.scale.is_some() && v.robust {
            within &= from_clean.is_some_and(|p| p.abs() <= 3.0);
        }
        let byzantine = v.scale.map(|scale| {
            (0..v.agents)
                .filter_map(|i| s.factor(i, scale).map(|f| format!("agent-{i}: g x {f}")))
                .collect::<Vec<_>>()
        });
        let summary = json!({
            "accuracy": a,
            "points_from_clean": from_clean,
            "points_from_absent": absent.map(|b| points(b, a)),
            "agents": v.agents,
            "byzantine": byzantine,
            "robust_aggregation": v.robust,
            "accuracy_by_version": curve,
        });
        let o = j.as_object_mut().expect("object");
        o.insert("heldout_accuracy".into(), json!(a));
        o.insert("accuracy_version".into(), json!(s.commits));
        records.push(j);
        runs.insert(v.name.trim_start_matches("byzantine_").to_string(), summary);
    }
    let summary = json!({
        "task": data.task.name,
        "model": s.model.display().to_string(),
        "recipe": "the demo's: verbalizer head rows only, one engine per agent, about one local step per commit",
        "agents": s.agents,
        "byzantine_fraction": s.byzantine as f64 / s.agents as f64,
        "commits": s.commits,
        "heldout_examples": data.heldout.len(),
        "zero_shot": zero_shot,
        "runs": runs,
        "robust_within_3_points_of_clean": within,
    });
    Ok((records, summary))
}

/// Every (version, hash) an agent was seen at.
type Seen = Arc<Mutex<Vec<(u64, Option<WeightsHash>)>>>;

/// An in-process agent and every (version, hash) it was seen at.
struct RunningAgent {
    id: String,
    stop: CancellationToken,
    task: JoinHandle<Result<(), AgentError>>,
    seen: Seen,
}

/// What the agents of one run share.
struct Fleet<'a> {
    s: &'a ModelSetup,
    data: &'a FedData,
    train: &'a TrainConfig,
    job: &'a str,
    broker: &'a EmbeddedBroker,
    dir: &'a Path,
}

fn spawn_agent(f: &Fleet<'_>, i: usize, scale: Option<f32>) -> Result<RunningAgent> {
    let Fleet {
        s,
        data,
        train,
        job,
        broker,
        dir,
    } = *f;
    let id = format!("agent-{i}");
    let threads = (std::thread::available_parallelism().map_or(2, |x| x.get()) / s.agents).max(1);
    let mut engine = Engine::load(&federation::engine_config(
        &s.model,
        threads as u32,
        &train.lora,
    ))?;
    engine.set_task(&data.task)?;
    let shard: Vec<Example> = data.shards[i].clone();
    let honest = EngineSource::new(engine, shard, i as u64 + 1)?.with_dev(data.dev_sets[i].clone());
    let source: Box<dyn GradientSource + Send> = match scale.and_then(|x| s.factor(i, x)) {
        Some(factor) => Box::new(Byzantine {
            inner: Box::new(honest),
            factor,
        }),
        None => Box::new(honest),
    };
    let ac = federation::agent_config(&id, job, &broker.host(), broker.port(), &dir.join(&id));
    let agent = Agent::new(ac, source).map_err(|e| anyhow::anyhow!("{e}"))?;
    let seen = agent.version_trail();
    let stop = CancellationToken::new();
    let task = tokio::spawn(agent.run(stop.clone()));
    Ok(RunningAgent {
        id,
        stop,
        task,
        seen,
    })
}

/// One variant: returns its record and the weights every [`CURVE_EVERY`] versions up to
/// `s.commits` (the last is exactly `s.commits`).
async fn run_variant(
    s: &ModelSetup,
    v: &Variant,
    data: &FedData,
    train: &TrainConfig,
) -> Result<(Value, Vec<(u64, LoraWeights)>)> {
    let t0 = Instant::now();
    let dir = s.work.join(v.name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir)?;
    let job = format!("chaos-{}", v.name.replace('_', "-"));
    let broker = EmbeddedBroker::start("127.0.0.1", 0, MAX_PACKET)?;
    let mut observer = Observer::start(
        &broker.host(),
        broker.port(),
        &job,
        "chaos-ledger",
        MAX_PACKET,
        GUARD,
    )
    .await?;
    // Every agent does the full fleet's per-agent share, also when fewer run.
    let perturbations = federation::default_perturbations(train, s.agents as u32);
    let mut cfg = federation::aggregator_config(
        &job,
        &s.model,
        &dir.join("aggregator"),
        train,
        v.agents as u32,
        perturbations,
        0,
    )?;
    // The ledger accounts for every seed, which a dense commit does not name.
    cfg.state.commit_form = fwdllm_aggregator::config::CommitForm::Pairs;
    if !v.robust {
        cfg.robust.max_abs_g = f64::MAX;
        cfg.robust.clip_sigmas = 0.0;
        cfg.robust.client_rms_sigmas = 0.0;
    }
    let rulings = Arc::new(Mutex::new(Rulings::default()));
    let r2 = rulings.clone();
    let hooks = Hooks {
        on_event: Some(Box::new(move |e| {
            if let Some(rec) = RulingRecord::from_event(e) {
                r2.lock().unwrap_or_else(|e| e.into_inner()).record(&rec);
            }
        })),
        ..Hooks::default()
    };
    let agg_stop = CancellationToken::new();
    let target = BrokerTarget {
        host: broker.host(),
        port: broker.port(),
    };
    let agg = tokio::spawn(server::run(cfg.clone(), target, agg_stop.clone(), hooks));
    let agents_dir = dir.join("agents");
    let fleet = Fleet {
        s,
        data,
        train,
        job: &job,
        broker: &broker,
        dir: &agents_dir,
    };
    let mut agents = Vec::new();
    for i in 0..v.agents {
        agents.push(spawn_agent(&fleet, i, v.scale)?);
    }
    let t_train = Instant::now();
    let target = s.commits;
    observer
        .wait_until(&format!("version {target}"), GUARD * 20, |l| {
            l.version() >= target
        })
        .await?;
    let train_s = t_train.elapsed().as_secs_f64();
    // Stop: agents, then every update ruled on, then the aggregator (as the synthetic runs).
    for a in &agents {
        a.stop.cancel();
    }
    for a in &mut agents {
        match tokio::time::timeout(GUARD, &mut a.task).await {
            Ok(Ok(Ok(()))) => {}
            other => log::warn!("agent {} stopped with {other:?}", a.id),
        }
    }
    observer.drain(GUARD).await?;
    let start = Instant::now();
    while !rulings
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .covers(&observer.ledger())
    {
        if start.elapsed() > GUARD {
            log::warn!("some updates were never ruled on within {GUARD:?}: they count as lost");
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    agg_stop.cancel();
    let summary = tokio::time::timeout(GUARD, agg)
        .await
        .context("aggregator stops")???;
    observer.drain(GUARD).await?;
    let ledger = observer.stop().await;
    let rulings = rulings.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let fin = FinalState::load(&cfg)?;
    let layout = cfg.layout().map_err(anyhow::Error::msg)?;
    let tally = account(&ledger, &rulings, &fin);
    let check = check_replicas(&layout, &ledger, &fin);
    // Every (version, hash) an agent held, against the replay; and how far each ended behind.
    let mut agent_mismatches = 0u64;
    let mut lag = 0u64;
    for a in &agents {
        let seen = a.seen.lock().unwrap_or_else(|e| e.into_inner());
        for (version, hash) in seen.iter() {
            if hash.is_some_and(|h| check.contradicts(*version, &h)) {
                agent_mismatches += 1;
            }
        }
        let last = seen.last().map_or(0, |(v, _)| *v);
        lag = lag.max(fin.version.saturating_sub(last));
    }
    // The weights every CURVE_EVERY versions and at exactly the budget's, from the replay
    // (verified against the aggregator's hashes).
    let mut w = LoraWeights::init(layout);
    let mut snapshots = Vec::new();
    for version in 1..=target {
        let c = ledger
            .commits
            .get(&version)
            .with_context(|| format!("commit of version {version} missing from the ledger"))?;
        c.step
            .apply(&mut w)
            .with_context(|| format!("the commit of version {version} does not apply"))?;
        if version % CURVE_EVERY == 0 || version == target {
            if check.hashes.get(&version) != Some(&w.hash()) {
                bail!("the replay to version {version} does not verify");
            }
            snapshots.push((version, w.clone()));
        }
    }
    let mut j = record(
        &ledger,
        &tally,
        &check,
        &rulings,
        &fin,
        agent_mismatches,
        0,
        lag,
    );
    let o = j.as_object_mut().expect("object");
    o.insert("name".into(), json!(v.name));
    o.insert("broker".into(), json!("rumqttd (embedded)"));
    o.insert("agents".into(), json!(v.agents));
    o.insert(
        "agent_kind".into(),
        json!("in-process fwdllm-agent daemons, llama.cpp engine (demo recipe)"),
    );
    o.insert("commits_target".into(), json!(target));
    o.insert(
        "byzantine_agents".into(),
        json!(if v.scale.is_some() {
            s.byzantine.min(v.agents)
        } else {
            0
        }),
    );
    o.insert("byzantine_scale".into(), json!(v.scale));
    o.insert("robust_aggregation".into(), json!(v.robust));
    o.insert("perturbations_per_agent".into(), json!(perturbations));
    o.insert("aggregator_updates".into(), json!(summary.updates));
    o.insert("train_wall_s".into(), json!(train_s));
    o.insert("wall_s".into(), json!(t0.elapsed().as_secs_f64()));
    Ok((j, snapshots))
}
