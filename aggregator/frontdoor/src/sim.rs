//! Simulated clients: many lightweight clients in one process, each a real MQTT connection
//! (rumqttc), holding a real replica of the weights (replaying commits and checkpoints exactly
//! as an agent does) and answering rounds with a cheap synthetic loss instead of the model:
//! `L(θ) = ½‖θ_B − θ*‖²` over the trainable parameters, `g = (θ − θ*)·v + noise`.
//! Drives the real aggregator through the real broker to exercise round logic, pacing, dedup
//! and ingest at 100–1,000 clients.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fwdllm_shared::lora::{LoraLayout, LoraWeights};
use fwdllm_shared::perturb::{derive_seed, direction, gaussian_approx, mix64};
use fwdllm_shared::topics::{TopicKind, Topics};
use fwdllm_shared::wire::{
    self, client_index, AgentState, AgentStatus, Checkpoint, ClientUpdate, RoundAnnounce,
    RoundCommit, SeedScalar,
};
use log::{debug, warn};
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Parameters shared by all simulated clients.
#[derive(Debug, Clone)]
pub struct SimParams {
    pub job: String,
    pub host: String,
    pub port: u16,
    pub layout: LoraLayout,
    /// Standard deviation-ish amplitude of the noise added to each g (uniform ±noise).
    pub noise: f32,
    /// Seed of the optimum θ*.
    pub target_seed: u64,
    pub max_packet_bytes: usize,
}

/// Counters of all simulated clients together.
#[derive(Debug, Default)]
pub struct SimStats {
    pub updates_sent: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    pub commits_applied: AtomicU64,
    pub hash_mismatches: AtomicU64,
    /// Every seed sent, in every update (the bridge bench checks each is committed once).
    pub sent_seeds: std::sync::Mutex<Vec<u64>>,
}

/// The synthetic objective every simulated client shares.
#[derive(Debug, Clone)]
pub struct Quadratic {
    pub target: Vec<f32>,
}

impl Quadratic {
    pub fn new(layout: &LoraLayout, target_seed: u64) -> Quadratic {
        let mut target = vec![0f32; layout.trainable_len()];
        gaussian_approx(target_seed, &mut target);
        for t in &mut target {
            *t *= 0.05;
        }
        Quadratic { target }
    }

    /// ½‖θ_trainable − θ*‖².
    pub fn loss(&self, w: &LoraWeights) -> f64 {
        w.trainable_values()
            .zip(&self.target)
            .map(|(x, t)| {
                let d = f64::from(x - t);
                0.5 * d * d
            })
            .sum()
    }

    /// Directional derivative along v(seed) plus deterministic uniform noise in ±noise.
    pub fn slope(&self, w: &LoraWeights, seed: u64, noise: f32, scratch: &mut Vec<f32>) -> f32 {
        scratch.resize(self.target.len(), 0.0);
        direction(seed, scratch);
        let g: f64 = w
            .trainable_values()
            .zip(&self.target)
            .zip(scratch.iter())
            .map(|((x, t), v)| f64::from(x - t) * f64::from(*v))
            .sum();
        let u = (mix64(seed ^ 0x006e_6f69_7365) >> 11) as f64 / (1u64 << 53) as f64;
        (g + f64::from(noise) * (2.0 * u - 1.0)) as f32
    }
}

/// A weights replica that follows commits and checkpoints (what every agent must do).
pub struct Replica {
    pub weights: LoraWeights,
    pub version: u64,
    pending: BTreeMap<u64, RoundCommit>,
}

impl Replica {
    pub fn new(layout: LoraLayout) -> Replica {
        Replica {
            weights: LoraWeights::init(layout),
            version: 0,
            pending: BTreeMap::new(),
        }
    }

    /// Applies a commit (buffering it if it is ahead); returns false on a hash mismatch.
    pub fn on_commit(&mut self, c: RoundCommit) -> bool {
        if c.new_version <= self.version {
            return true;
        }
        self.pending.insert(c.base_version, c);
        while let Some(c) = self.pending.remove(&self.version) {
            if c.step.apply(&mut self.weights).is_err() {
                return false;
            }
            self.version = c.new_version;
            if self.weights.hash() != c.weights_hash {
                return false;
            }
        }
        true
    }

    pub fn on_checkpoint(&mut self, cp: &Checkpoint) -> bool {
        if cp.model_version <= self.version {
            return true;
        }
        match cp.to_weights() {
            Ok(w) => {
                self.weights = w;
                self.version = cp.model_version;
                self.pending.retain(|&base, _| base >= cp.model_version);
                let mut ok = true;
                while let Some(c) = self.pending.remove(&self.version) {
                    ok &= c.step.apply(&mut self.weights).is_ok();
                    self.version = c.new_version;
                    ok &= self.weights.hash() == c.weights_hash;
                }
                ok
            }
            Err(e) => {
                warn!("bad checkpoint: {e}");
                false
            }
        }
    }
}

/// Starts `n` simulated clients named `{prefix}-{i:04}`; they run until `stop` is cancelled.
pub fn spawn_clients(
    params: &SimParams,
    prefix: &str,
    n: usize,
    stats: Arc<SimStats>,
    stop: CancellationToken,
) -> Vec<JoinHandle<()>> {
    let objective = Arc::new(Quadratic::new(&params.layout, params.target_seed));
    (0..n)
        .map(|i| {
            let id = format!("{prefix}-{i:04}");
            tokio::spawn(run_client(
                params.clone(),
                id,
                objective.clone(),
                stats.clone(),
                stop.clone(),
            ))
        })
        .collect()
}

/// Publishes a simulated client's retained status at its replica's version and hash.
async fn publish_status(
    client: &AsyncClient,
    topics: &Topics,
    id: &str,
    replica: &Replica,
    state: AgentState,
) {
    let mut s = AgentStatus::new(id.to_owned(), state);
    s.model_version = replica.version;
    s.weights_hash = Some(replica.weights.hash());
    let _ = client
        .publish(
            topics.status(id),
            QoS::AtLeastOnce,
            true,
            wire::encode_json(&s),
        )
        .await;
}

async fn run_client(
    p: SimParams,
    id: String,
    objective: Arc<Quadratic>,
    stats: Arc<SimStats>,
    stop: CancellationToken,
) {
    let topics = Topics::new(&p.job).expect("valid job name");
    let mut opts = MqttOptions::new(id.clone(), p.host.clone(), p.port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_clean_session(true);
    opts.set_max_packet_size(p.max_packet_bytes, p.max_packet_bytes);
    let will = AgentStatus::new(id.clone(), AgentState::Offline);
    opts.set_last_will(LastWill::new(
        topics.status(&id),
        wire::encode_json(&will),
        QoS::AtLeastOnce,
        true,
    ));
    let (client, mut el) = AsyncClient::new(opts, 64);
    let mut replica = Replica::new(p.layout.clone());
    let mut announce: Option<RoundAnnounce> = None;
    let mut answered: Vec<(u64, u32)> = Vec::new();
    let mut next_k: BTreeMap<u64, u32> = BTreeMap::new();
    let mut scratch = Vec::new();
    loop {
        let ev = tokio::select! {
            _ = stop.cancelled() => break,
            ev = el.poll() => ev,
        };
        let publish = match ev {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                for f in topics.agent_filters() {
                    let _ = client.subscribe(f, QoS::AtLeastOnce).await;
                }
                publish_status(&client, &topics, &id, &replica, AgentState::Online).await;
                continue;
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => publish,
            Ok(_) => continue,
            Err(e) => {
                debug!("sim {id}: {e}");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => continue,
                }
            }
        };
        stats
            .bytes_received
            .fetch_add(publish.payload.len() as u64, Ordering::Relaxed);
        if publish.payload.is_empty() {
            continue; // a cleared retained message
        }
        let topic = publish.topic.clone();
        let before = replica.version;
        match topics.parse(&topic) {
            Some(TopicKind::Round) => match wire::decode::<RoundAnnounce>(&publish.payload) {
                Ok(a) => announce = Some(a),
                Err(e) => warn!("sim {id}: bad announce: {e}"),
            },
            Some(TopicKind::Commit) | Some(TopicKind::CommitLog(_)) => {
                if let Ok(c) = wire::decode::<RoundCommit>(&publish.payload) {
                    if !replica.on_commit(c) {
                        stats.hash_mismatches.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Some(TopicKind::Checkpoint) => {
                if let Ok(cp) = wire::decode::<Checkpoint>(&publish.payload) {
                    if !replica.on_checkpoint(&cp) {
                        stats.hash_mismatches.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            _ => {}
        }
        if replica.version != before {
            stats
                .commits_applied
                .fetch_add(replica.version - before, Ordering::Relaxed);
            publish_status(&client, &topics, &id, &replica, AgentState::Online).await;
        }
        // Answer the current request once we are at its version.
        let Some(a) = announce.as_ref() else { continue };
        if a.model_version != replica.version
            || answered.contains(&(a.round, a.extend))
            || !a.selection.includes(&id, a.round)
        {
            continue;
        }
        answered.push((a.round, a.extend));
        if answered.len() > 64 {
            answered.remove(0);
        }
        let k0 = *next_k.get(&a.round).unwrap_or(&0);
        let idx = client_index(&id);
        let pairs: Vec<SeedScalar> = (k0..k0 + a.perturbations_per_client)
            .map(|k| {
                let seed = derive_seed(a.seed_base, a.round, idx, k);
                SeedScalar {
                    seed,
                    g: objective.slope(&replica.weights, seed, p.noise, &mut scratch),
                }
            })
            .collect();
        stats
            .sent_seeds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(pairs.iter().map(|p| p.seed));
        next_k.insert(a.round, k0 + a.perturbations_per_client);
        if next_k.len() > 8 {
            let first = *next_k.keys().next().expect("non-empty");
            next_k.remove(&first);
        }
        let u = ClientUpdate {
            client_id: id.clone(),
            round: a.round,
            base_version: a.model_version,
            seq: a.extend,
            samples: pairs.len() as u32,
            pairs,
            loss_mean: objective.loss(&replica.weights) as f32,
            loss_m2: 0.0,
        };
        let bytes = wire::encode(&u);
        stats
            .bytes_sent
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        stats.updates_sent.fetch_add(1, Ordering::Relaxed);
        if client
            .publish(topics.update(&id), QoS::AtLeastOnce, false, bytes)
            .await
            .is_err()
        {
            break;
        }
    }
    publish_status(&client, &topics, &id, &replica, AgentState::Offline).await;
    // Flush the offline status and the DISCONNECT (bounded).
    disconnect_flushed(&client, &mut el, Duration::from_secs(1)).await;
}

/// A clean DISCONNECT (no last will), with what is queued before it flushed, waiting at most
/// `bound` for the event loop to send it.
pub async fn disconnect_flushed(
    client: &rumqttc::AsyncClient,
    el: &mut rumqttc::EventLoop,
    bound: Duration,
) {
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(bound, async {
        loop {
            match el.poll().await {
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
                _ => {}
            }
        }
    })
    .await;
}

/// Runs `clients` simulated clients against the real aggregator on an embedded broker for
/// `commits` commits (every client answers every round; the round commits when all answered)
/// and reports what it measured, including the aggregator's ingest rate: updates handled per
/// second of its coordinator task's busy time (decode, pool, fsync'd state, acks — one core).
pub async fn bench(
    clients: usize,
    commits: u64,
    perturbations: u32,
    broker: Option<(String, u16)>,
) -> anyhow::Result<serde_json::Value> {
    use fwdllm_aggregator::broker::EmbeddedBroker;
    use fwdllm_aggregator::config::AggregatorConfig;
    use fwdllm_aggregator::server::{self, BrokerTarget, Hooks};
    use std::sync::atomic::Ordering::Relaxed;

    let dir = tempfile::tempdir()?;
    let mut cfg = AggregatorConfig::tiny("sim", dir.path());
    cfg.job.max_commits = commits;
    cfg.round.min_clients = clients as u32;
    cfg.round.quorum = (clients as u32 / 2).max(1);
    cfg.round.perturbations_per_client = perturbations;
    cfg.round.deadline_s = 120.0;
    cfg.pacing.max_perturbations = (clients as u32 * perturbations).max(1);
    cfg.pacing.min_perturbations = cfg.pacing.max_perturbations;
    cfg.pacing.max_extends = 0;
    cfg.step.lr = 0.5;
    let (host, port) = match broker {
        Some(hp) => hp,
        None => {
            let b = EmbeddedBroker::start("127.0.0.1", 0, cfg.broker.max_packet_bytes)?;
            (b.host(), b.port())
        }
    };
    let target = BrokerTarget {
        host: host.clone(),
        port,
    };
    let params = SimParams {
        job: cfg.job.name.clone(),
        host,
        port,
        layout: cfg.layout().map_err(anyhow::Error::msg)?,
        noise: 0.01,
        target_seed: 7,
        max_packet_bytes: cfg.broker.max_packet_bytes,
    };
    let stats = Arc::new(SimStats::default());
    let stop = CancellationToken::new();
    let handles = spawn_clients(&params, "sim", clients, stats.clone(), stop.clone());
    let started = std::time::Instant::now();
    let summary = server::run(cfg, target, CancellationToken::new(), Hooks::default()).await?;
    let wall = started.elapsed().as_secs_f64();
    stop.cancel();
    for h in handles {
        let _ = h.await;
    }
    Ok(serde_json::json!({
        "clients": clients,
        "commits": summary.version,
        "updates": summary.ingest_updates,
        "perturbations": summary.perturbations,
        "wall_s": wall,
        "ingest_busy_s": summary.ingest_busy_s,
        "ingest_updates_per_s": summary.ingest_updates_per_s(),
        "end_to_end_updates_per_s": summary.ingest_updates as f64 / wall,
        "duplicates": summary.duplicates,
        "stale": summary.stale,
        "client_hash_mismatches": stats.hash_mismatches.load(Relaxed),
        "client_bytes_sent": stats.bytes_sent.load(Relaxed),
    }))
}
