//! The agent suite (`tests/tests/agent.rs`): one agent daemon against a fake aggregator (a
//! hand-driven [`TestClient`]) through a real broker: status and last will (through a cuttable
//! TCP proxy), replay, checkpoint catch-up, de-duplication, device limits.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use fwdllm_agent::config::AgentConfig;
use fwdllm_agent::daemon::{GradientRequest, GradientSource, SyntheticSource};
use fwdllm_shared::lora::{LoraConfig, LoraLayout, LoraWeights, WeightsHash};
use fwdllm_shared::perturb::derive_seed;
use fwdllm_shared::topics::Topics;
use fwdllm_shared::update::{apply_commit, SeedCoeff};
use fwdllm_shared::wire::{
    self, AgentState, AgentStatus, Checkpoint, ClientSelection, ClientUpdate, CommitStep,
    RoundAnnounce, RoundCommit, TaskParams,
};
use rumqttc::QoS;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::agents::{self, RunningAgent};
use crate::broker::Broker;
use crate::mqtt::{OnError, Received, TestClient};

pub const JOB: &str = "agent-e2e";

// ---------------------------------------------------------------------------------------------
// A TCP proxy whose connections can be cut, so the broker sees a connection die without
// DISCONNECT (-> last will) and the agent has to reconnect.

pub struct Proxy {
    pub addr: SocketAddr,
    cut: watch::Sender<u64>,
    task: JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let addr = listener.local_addr().unwrap();
        let (cut, _) = watch::channel(0u64);
        let cut_tx = cut.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                let mut cut_rx = cut_tx.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut_rx.changed() => {}
                    }
                    // Dropping both sockets closes them without any MQTT DISCONNECT.
                });
            }
        });
        Proxy { addr, cut, task }
    }

    /// Closes every connection currently open through the proxy.
    pub fn cut(&self) {
        self.cut.send_modify(|n| *n += 1);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// Fake aggregator: publishes what the aggregator would, and watches what agents send.

pub struct Peer {
    pub mqtt: TestClient,
    pub topics: Topics,
}

impl Peer {
    /// Connects and subscribes to the job's status and update topics (waits for the SUBACKs).
    pub async fn connect(addr: SocketAddr, id: &str) -> Peer {
        let topics = Topics::new(JOB).unwrap();
        let filters = [topics.status_filter(), topics.updates_filter()];
        let mqtt =
            TestClient::connect(addr, id, Duration::from_secs(30), OnError::Fail, &filters).await;
        Peer { mqtt, topics }
    }

    pub async fn publish<T: wire::WireMessage>(&self, topic: String, msg: &T) {
        self.mqtt
            .client
            .publish(topic, QoS::AtLeastOnce, true, wire::encode(msg))
            .await
            .unwrap();
    }

    pub async fn clear(&self, topic: String) {
        self.mqtt
            .client
            .publish(topic, QoS::AtLeastOnce, true, Vec::<u8>::new())
            .await
            .unwrap();
    }

    pub async fn announce(&self, a: &RoundAnnounce) {
        self.publish(self.topics.round(), a).await;
    }

    pub async fn commit(&self, c: &RoundCommit) {
        self.publish(self.topics.commit_log(c.new_version), c).await;
    }

    pub async fn checkpoint(&self, version: u64, w: &LoraWeights) {
        self.publish(
            self.topics.checkpoint(),
            &Checkpoint::from_weights(version, w),
        )
        .await;
    }

    /// Next message accepted by `f` (others are skipped).
    pub async fn next<T>(&mut self, what: &str, f: impl FnMut(&Received) -> Option<T>) -> T {
        self.mqtt.next(what, f).await
    }

    pub async fn next_status(&mut self, id: &str, state: AgentState) -> AgentStatus {
        let topic = self.topics.status(id);
        self.next(&format!("status {state:?} of {id}"), |m| {
            if m.topic != topic || m.payload.is_empty() {
                return None;
            }
            let s: AgentStatus = wire::decode_json(&m.payload).expect("status decodes");
            (s.state == state).then_some(s)
        })
        .await
    }

    pub async fn next_update(&mut self, id: &str) -> ClientUpdate {
        let topic = self.topics.update(id);
        self.next(&format!("update of {id}"), |m| {
            (m.topic == topic)
                .then(|| wire::decode::<ClientUpdate>(&m.payload).expect("update decodes"))
        })
        .await
    }
}

// ---------------------------------------------------------------------------------------------
// Model, reference replica, agents

pub fn tiny_layout() -> LoraLayout {
    let shape = fwdllm_shared::fixtures::small_llama(2, 32, 4, 2);
    LoraLayout::new(&shape, &LoraConfig::default()).unwrap()
}

/// The aggregator's side of the weights: applies commits it makes up.
pub struct Reference {
    pub weights: LoraWeights,
    pub version: u64,
}

impl Default for Reference {
    fn default() -> Self {
        Self::new()
    }
}

impl Reference {
    pub fn new() -> Reference {
        Reference {
            weights: LoraWeights::init(tiny_layout()),
            version: 0,
        }
    }

    /// Makes and applies the commit of `round`.
    pub fn commit(&mut self, round: u64) -> RoundCommit {
        let pairs: Vec<SeedCoeff> = (0..4)
            .map(|k| SeedCoeff {
                seed: round * 1000 + k,
                coeff: 1e-3 * (k as f32 - 1.5),
            })
            .collect();
        apply_commit(&mut self.weights, &pairs);
        self.version += 1;
        // Even rounds travel dense, so every suite replays both forms of the wire.
        let step = if round % 2 == 0 {
            CommitStep::Dense(self.weights.trainable_values().collect())
        } else {
            CommitStep::Pairs(pairs)
        };
        RoundCommit {
            round,
            base_version: self.version - 1,
            new_version: self.version,
            step,
            weights_hash: self.weights.hash(),
        }
    }

    pub fn hash(&self) -> WeightsHash {
        self.weights.hash()
    }

    pub fn announce(&self, round: u64, extend: u32, ppc: u32) -> RoundAnnounce {
        RoundAnnounce {
            job: JOB.into(),
            round,
            model_version: self.version,
            weights_hash: self.hash(),
            perturbations_per_client: ppc,
            eps: 1e-3,
            deadline_unix_ms: 0,
            selection: ClientSelection::All,
            task: TaskParams::default(),
            seed_base: 0xfeed,
            extend,
        }
    }
}

pub fn agent_config(broker: SocketAddr, id: &str, state_dir: &Path) -> AgentConfig {
    let mut c = agents::agent_config(broker, JOB, id, state_dir);
    // Plain directions: `expected_pairs` predicts the seeds of every answer.
    c.gradient.discriminative_candidates = 1;
    c
}

pub fn spawn_agent(config: AgentConfig) -> RunningAgent {
    agents::spawn_agent(config)
}

/// What a correct agent must send for `a` at `weights`, k from `k0`.
pub fn expected_pairs(
    id: &str,
    a: &RoundAnnounce,
    weights: &LoraWeights,
    k0: u32,
) -> Vec<(u64, f32)> {
    let cfg = AgentConfig::default();
    let mut src = SyntheticSource::new(
        cfg.gradient.synthetic_target_seed,
        cfg.gradient.synthetic_target_scale,
    );
    let index = wire::client_index(id);
    let seeds: Vec<u64> = (k0..k0 + a.perturbations_per_client)
        .map(|k| derive_seed(a.seed_base, a.round, index, k))
        .collect();
    let b = src
        .forward_gradients(&GradientRequest {
            weights,
            seeds: &seeds,
            eps: a.eps,
            task: &a.task,
            round: a.round,
        })
        .unwrap();
    seeds.into_iter().zip(b.g).collect()
}

pub fn pairs_of(u: &ClientUpdate) -> Vec<(u64, f32)> {
    u.pairs.iter().map(|p| (p.seed, p.g)).collect()
}

// ---------------------------------------------------------------------------------------------
// Scenarios (each suite runs them against its broker)

/// Online on connect (retained), offline by last will when the connection dies, online again
/// after the agent's own reconnect; offline (not by will) on graceful stop.
pub async fn status_lifecycle(broker: &Broker) {
    let proxy = Proxy::start(broker.addr()).await;
    let mut peer = Peer::connect(broker.addr(), "test-peer").await;
    let dir = tempfile::tempdir().unwrap();
    let id = "agent-status";
    let mut agent = spawn_agent(agent_config(proxy.addr, id, dir.path()));
    let s = peer.next_status(id, AgentState::Online).await;
    assert_eq!(s.client_id, id);
    agent.wait_info("connected", |i| i.connected).await;

    proxy.cut();
    let will = peer.next_status(id, AgentState::Offline).await;
    assert_eq!(will.reason.as_deref(), Some("connection lost (last will)"));
    peer.next_status(id, AgentState::Online).await;
    let info = agent
        .wait_info("reconnected", |i| i.connected && i.connections >= 2)
        .await;
    assert_eq!(info.connections, 2);

    // A late subscriber sees the retained status.
    let mut late = Peer::connect(broker.addr(), "late-peer").await;
    late.next_status(id, AgentState::Online).await;

    agent.stop().await;
    let bye = peer.next_status(id, AgentState::Offline).await;
    assert_eq!(
        bye.reason, None,
        "graceful offline is published by the agent, not its will"
    );
}

/// A fresh agent fetches the checkpoint, replays the retained commit log on top, answers the
/// announcement at exactly the aggregator's version and hash, with the right seeds and values.
pub async fn replay_and_answer(broker: &Broker) {
    let mut peer = Peer::connect(broker.addr(), "test-peer").await;
    let mut reference = Reference::new();
    peer.checkpoint(0, &reference.weights).await;
    let mut commits = Vec::new();
    for round in 1..=3 {
        commits.push(reference.commit(round));
    }
    for c in &commits {
        peer.commit(c).await;
    }
    let a = reference.announce(4, 0, 5);
    peer.announce(&a).await;

    let dir = tempfile::tempdir().unwrap();
    let id = "agent-replay";
    let mut agent = spawn_agent(agent_config(broker.addr(), id, dir.path()));
    let u = peer.next_update(id).await;
    assert_eq!(
        (u.client_id.as_str(), u.round, u.seq, u.base_version),
        (id, 4, 0, 3)
    );
    assert_eq!(pairs_of(&u), expected_pairs(id, &a, &reference.weights, 0));
    assert_eq!(u.samples, 5);
    let info = agent
        .wait_info("answered", |i| i.last_answered == Some((4, 0)))
        .await;
    assert_eq!(info.model_version, 3);
    assert_eq!(
        info.weights_hash,
        Some(reference.hash()),
        "replica equals the reference replica"
    );
    assert_eq!(info.commits_applied, 3);
    assert_eq!(info.checkpoints_loaded, 1);

    // The next commit arrives live and is replayed to the same bits.
    let c = reference.commit(4);
    peer.commit(&c).await;
    let info = agent
        .wait_info("replayed live commit", |i| i.model_version == 4)
        .await;
    assert_eq!(info.weights_hash, Some(reference.hash()));
    agent.stop().await;
}

/// A late joiner catches up from a checkpoint that covers commits no longer in the log, plus the
/// commits since; and a replica whose replay diverges (wrong hash) repairs itself from the next
/// checkpoint before it answers.
pub async fn checkpoint_catch_up(broker: &Broker) {
    let mut peer = Peer::connect(broker.addr(), "test-peer").await;
    let mut reference = Reference::new();
    for round in 1..=5 {
        reference.commit(round);
    }
    peer.checkpoint(5, &reference.weights).await;
    let c6 = reference.commit(6);
    let c7 = reference.commit(7);
    peer.commit(&c6).await;
    peer.commit(&c7).await;
    let a = reference.announce(8, 0, 3);
    peer.announce(&a).await;

    let dir = tempfile::tempdir().unwrap();
    let id = "agent-late";
    let mut agent = spawn_agent(agent_config(broker.addr(), id, dir.path()));
    let u = peer.next_update(id).await;
    assert_eq!((u.round, u.base_version), (8, 7));
    assert_eq!(pairs_of(&u), expected_pairs(id, &a, &reference.weights, 0));
    let info = agent
        .wait_info("caught up", |i| i.last_answered == Some((8, 0)))
        .await;
    assert_eq!(info.weights_hash, Some(reference.hash()));
    assert_eq!((info.checkpoints_loaded, info.commits_applied), (1, 2));

    // A commit that replays to different bits than its hash says (as if corrupted): the agent
    // must not answer at version 8 from those bits but repair itself from the checkpoint.
    let mut bad = reference.commit(8);
    match &mut bad.step {
        CommitStep::Pairs(p) => p[0].coeff += 0.5,
        CommitStep::Dense(v) => v[0] += 0.5,
    }
    peer.commit(&bad).await;
    peer.checkpoint(8, &reference.weights).await;
    let a9 = reference.announce(9, 0, 2);
    peer.announce(&a9).await;
    let u = peer.next_update(id).await;
    assert_eq!((u.round, u.base_version), (9, 8));
    assert_eq!(pairs_of(&u), expected_pairs(id, &a9, &reference.weights, 0));
    let info = agent
        .wait_info("repaired", |i| i.last_answered == Some((9, 0)))
        .await;
    assert_eq!(info.weights_hash, Some(reference.hash()));
    assert_eq!(info.checkpoints_loaded, 2);
    agent.stop().await;
}

/// Each (round, extend) is answered once: a re-published announcement is ignored, an extend is
/// answered with k continuing, and the same holds across a restart with the same state dir.
pub async fn duplicate_announce_answered_once(broker: &Broker) {
    let mut peer = Peer::connect(broker.addr(), "test-peer").await;
    let reference = Reference::new();
    peer.checkpoint(0, &reference.weights).await;
    let a0 = reference.announce(1, 0, 4);
    peer.announce(&a0).await;

    let dir = tempfile::tempdir().unwrap();
    let id = "agent-dedup";
    let agent = spawn_agent(agent_config(broker.addr(), id, dir.path()));
    let u = peer.next_update(id).await;
    assert_eq!((u.round, u.seq), (1, 0));
    assert_eq!(pairs_of(&u), expected_pairs(id, &a0, &reference.weights, 0));

    // The same request again, then an extend: the next update must be the extend's.
    peer.announce(&a0).await;
    let a1 = reference.announce(1, 1, 3);
    peer.announce(&a1).await;
    let u = peer.next_update(id).await;
    assert_eq!(
        (u.round, u.seq),
        (1, 1),
        "the duplicate announcement was answered again"
    );
    assert_eq!(
        pairs_of(&u),
        expected_pairs(id, &a1, &reference.weights, 4),
        "k continues across extends"
    );
    agent.stop().await;

    // Restart on the same state: the retained extend 1 is not answered again; extend 2 is.
    let mut agent = spawn_agent(agent_config(broker.addr(), id, dir.path()));
    agent
        .wait_info("restored", |i| {
            i.last_answered == Some((1, 1)) && i.connected
        })
        .await;
    let a2 = reference.announce(1, 2, 2);
    peer.announce(&a2).await;
    let u = peer.next_update(id).await;
    assert_eq!(
        (u.round, u.seq),
        (1, 2),
        "a restarted agent answered an old request again"
    );
    assert_eq!(pairs_of(&u), expected_pairs(id, &a2, &reference.weights, 7));
    let info = agent
        .wait_info("answered extend 2", |i| i.last_answered == Some((1, 2)))
        .await;
    assert_eq!(
        info.checkpoints_loaded, 0,
        "the replica was restored from the state dir"
    );
    agent.stop().await;
}

/// Outside its device limits the agent reports busy (with the reason) and sits the round out.
pub async fn busy_sits_out(broker: &Broker) {
    let mut peer = Peer::connect(broker.addr(), "test-peer").await;
    let reference = Reference::new();
    peer.checkpoint(0, &reference.weights).await;
    let dir = tempfile::tempdir().unwrap();
    let id = "agent-busy";
    let mut cfg = agent_config(broker.addr(), id, dir.path());
    cfg.limits.min_free_memory_mb = u64::MAX / (1 << 20); // more than any machine has
    peer.announce(&reference.announce(1, 0, 2)).await;
    let mut agent = spawn_agent(cfg);
    let s = peer.next_status(id, AgentState::Busy).await;
    assert!(s.reason.unwrap_or_default().contains("min_free_memory_mb"));
    let info = agent
        .wait_info("skipped", |i| i.rounds_skipped_busy == 1)
        .await;
    assert_eq!((info.updates_sent, info.last_answered), (0, None));
    agent.stop().await;
}

/// What the broker still holds of a restarted agent's session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Session {
    /// The persistent session survives the restart: its cursor is past commits the agent
    /// received but never persisted, and re-subscribing may not re-send retained messages
    /// (rumqttd 0.20 sends them only for a filter new to the session).
    Kept,
    /// The session is gone (wiped by a clean connection under the agent's id, as after a broker
    /// restart without persistence): every subscription is new.
    Wiped,
}

/// An agent restarted on a persisted replica older than what its session already delivered
/// (killed after replaying commits, before their replica reached the disk) catches up from
/// the retained commit log and answers the announced round at the announced version — the
/// checkpoint, older than its replica, cannot help. Found by `make chaos` (`agents_killed`).
pub async fn stale_replica_restart(broker: &Broker, session: Session) {
    let mut peer = Peer::connect(broker.addr(), "test-peer").await;
    let mut reference = Reference::new();
    peer.checkpoint(0, &reference.weights).await;
    for round in 1..=2 {
        let c = reference.commit(round);
        peer.commit(&c).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let stale = tempfile::tempdir().unwrap();
    let id = "agent-stale";
    let mut agent = spawn_agent(agent_config(broker.addr(), id, dir.path()));
    agent
        .wait_info("at version 2", |i| i.model_version == 2)
        .await;
    agent.stop().await;
    copy_files(dir.path(), stale.path());

    // Back up to version 4, then "lose" that on disk: the session saw commits 3 and 4.
    let mut agent = spawn_agent(agent_config(broker.addr(), id, dir.path()));
    agent.wait_info("connected", |i| i.connected).await;
    for round in 3..=4 {
        let c = reference.commit(round);
        peer.commit(&c).await;
    }
    agent
        .wait_info("at version 4", |i| i.model_version == 4)
        .await;
    agent.stop().await;
    copy_files(stale.path(), dir.path());
    if session == Session::Wiped {
        let wipe = TestClient::connect(
            broker.addr(),
            id,
            Duration::from_secs(30),
            OnError::Fail,
            &["fwdllm/wipe".to_string()],
        )
        .await;
        drop(wipe);
    }

    let a = reference.announce(5, 0, 3);
    peer.announce(&a).await;
    let mut agent = spawn_agent(agent_config(broker.addr(), id, dir.path()));
    let u = peer.next_update(id).await;
    assert_eq!((u.round, u.base_version), (5, 4));
    assert_eq!(pairs_of(&u), expected_pairs(id, &a, &reference.weights, 0));
    let info = agent
        .wait_info("answered", |i| i.last_answered == Some((5, 0)))
        .await;
    assert_eq!(info.weights_hash, Some(reference.hash()));
    assert_eq!(
        (info.checkpoints_loaded, info.commits_applied),
        (0, 2),
        "caught up by replaying commits 3 and 4 from the retained log"
    );
    agent.stop().await;
}

/// Copies the files of `from` into `to` (an agent's flat state directory).
fn copy_files(from: &Path, to: &Path) {
    for e in std::fs::read_dir(to).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            std::fs::remove_file(&p).unwrap();
        }
    }
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
        }
    }
}
