//! The federation suite (`tests/tests/federation.rs`): the real aggregator
//! (`fwdllm_aggregator::server`) and real agents (synthetic gradient source) talking through a
//! real broker, plus a hand-driven client for duplicate and stale updates.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fwdllm_aggregator::config::{AggregatorConfig, PacingConfig};
use fwdllm_aggregator::coordinator::{AggEvent, UpdateOutcome};
use fwdllm_aggregator::server::{self, BrokerTarget, Hooks, RunSummary};
use fwdllm_shared::lora::WeightsHash;
use fwdllm_shared::perturb::derive_seed;
use fwdllm_shared::topics::Topics;
use fwdllm_shared::wire::{
    self, client_index, AgentState, AgentStatus, ClientUpdate, RoundAnnounce, SeedScalar,
};
use rumqttc::QoS;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::agents::{self, RunningAgent};
use crate::broker::{Broker, MAX_PACKET};
use crate::mqtt::{OnError, TestClient};
use crate::WAIT;

pub const JOB: &str = "fed-e2e";

// ---------------------------------------------------------------------------------------------
// Aggregator

/// The suites' aggregator: a `tiny` job of [`JOB`] on the test broker whose rounds commit
/// once every selected client has answered, a checkpoint every 3 commits.
pub fn aggregator_config(state_dir: &Path, min_clients: u32, quorum: u32) -> AggregatorConfig {
    let mut c = AggregatorConfig::tiny(JOB, state_dir);
    c.broker.keep_alive_s = 5;
    c.broker.max_packet_bytes = MAX_PACKET;
    c.state.checkpoint_every = 3;
    c.round.min_clients = min_clients;
    c.round.quorum = quorum;
    c.round.perturbations_per_client = 4;
    c.round.deadline_s = 20.0;
    c.pacing = PacingConfig::commit_when_answered();
    c.step.lr = 0.5;
    c
}

/// A running aggregator and everything it reported.
pub struct RunningAggregator {
    pub stop: CancellationToken,
    pub task: JoinHandle<Result<RunSummary, server::ServerError>>,
    pub events: broadcast::Receiver<AggEvent>,
    /// Weights hash of every committed version, filled from the events.
    pub hashes: Arc<Mutex<BTreeMap<u64, WeightsHash>>>,
}

pub fn spawn_aggregator(cfg: AggregatorConfig, broker: SocketAddr) -> RunningAggregator {
    spawn_aggregator_hooked(cfg, broker, None)
}

/// [`spawn_aggregator`] with [`Hooks::on_event`]: `on_event` sees each event after the state
/// behind it is durable and before anything derived from it is published.
pub fn spawn_aggregator_hooked(
    cfg: AggregatorConfig,
    broker: SocketAddr,
    on_event: Option<server::OnEvent>,
) -> RunningAggregator {
    let (tx, events) = broadcast::channel(65_536);
    let hashes = Arc::new(Mutex::new(BTreeMap::new()));
    let (h2, mut rx2) = (hashes.clone(), tx.subscribe());
    tokio::spawn(async move {
        while let Ok(e) = rx2.recv().await {
            match e {
                AggEvent::Committed { version, hash, .. }
                | AggEvent::Resumed { version, hash, .. } => {
                    h2.lock().unwrap().insert(version, hash);
                }
                _ => {}
            }
        }
    });
    let stop = CancellationToken::new();
    let target = BrokerTarget {
        host: broker.ip().to_string(),
        port: broker.port(),
    };
    let hooks = Hooks {
        events: Some(tx),
        on_event,
        ..Hooks::default()
    };
    let task = tokio::spawn(server::run(cfg, target, stop.clone(), hooks));
    RunningAggregator {
        stop,
        task,
        events,
        hashes,
    }
}

impl RunningAggregator {
    /// Next event matching `f` (failure guard: [`WAIT`]).
    pub async fn next<T>(&mut self, what: &str, mut f: impl FnMut(&AggEvent) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Err(_) => panic!("timed out waiting for aggregator event: {what}"),
                Ok(Err(broadcast::error::RecvError::Lagged(n))) => panic!("lagged {n} events"),
                Ok(Err(e)) => panic!("aggregator events closed while waiting for {what}: {e}"),
                Ok(Ok(e)) => {
                    // The collector task fills `hashes` on its own schedule: record what the
                    // test has seen too, so a check right after a wait finds that version.
                    if let AggEvent::Committed { version, hash, .. }
                    | AggEvent::Resumed { version, hash, .. } = &e
                    {
                        self.hashes.lock().unwrap().insert(*version, *hash);
                    }
                    if let Some(t) = f(&e) {
                        return t;
                    }
                }
            }
        }
    }

    /// Waits for the commit producing `version`; returns its hash.
    pub async fn committed(&mut self, version: u64) -> WeightsHash {
        self.next(&format!("commit of version {version}"), |e| match e {
            AggEvent::Committed {
                version: v, hash, ..
            } if *v == version => Some(*hash),
            _ => None,
        })
        .await
    }

    pub fn hash_of(&self, version: u64) -> Option<WeightsHash> {
        self.hashes.lock().unwrap().get(&version).copied()
    }

    pub async fn stop(self) -> RunSummary {
        self.stop.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("aggregator stops")
            .expect("aggregator task")
            .expect("aggregator run ok")
    }
}

// ---------------------------------------------------------------------------------------------
// Agents

/// Starts agent `id` with its state in `dir/id`.
pub fn spawn_agent(broker: SocketAddr, id: &str, dir: &Path) -> RunningAgent {
    agents::spawn_agent(agents::agent_config(broker, JOB, id, &dir.join(id)))
}

impl RunningAgent {
    /// Every observed (version, hash) equals the aggregator's hash of that version.
    pub fn assert_replica_matches(&self, agg: &RunningAggregator) {
        for (v, h) in self.seen.lock().unwrap().iter() {
            if *v == 0 {
                continue;
            }
            let expected = agg.hash_of(*v).expect("aggregator committed this version");
            assert_eq!(
                *h,
                Some(expected),
                "agent {} at version {v} holds other weights than the aggregator",
                self.id
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A hand-driven client (for duplicate and stale updates).

pub struct Peer {
    pub mqtt: TestClient,
    pub id: String,
}

impl Peer {
    /// Connects as `id`, subscribed to the job's round topic.
    pub async fn connect(addr: SocketAddr, id: &str) -> Peer {
        let topics = Topics::new(JOB).unwrap();
        let mqtt = TestClient::connect(
            addr,
            id,
            Duration::from_secs(5),
            OnError::Retry,
            &[topics.round()],
        )
        .await;
        Peer {
            mqtt,
            id: id.into(),
        }
    }

    pub async fn status(&self, state: AgentState) {
        let topics = Topics::new(JOB).unwrap();
        let s = AgentStatus::new(self.id.clone(), state);
        self.mqtt
            .client
            .publish(
                topics.status(&self.id),
                QoS::AtLeastOnce,
                true,
                wire::encode_json(&s),
            )
            .await
            .unwrap();
    }

    /// Next announcement matching `f`.
    pub async fn announce(&mut self, f: impl Fn(&RoundAnnounce) -> bool) -> RoundAnnounce {
        self.mqtt
            .next("announcement", |m| {
                if m.payload.is_empty() {
                    return None;
                }
                wire::decode::<RoundAnnounce>(&m.payload)
                    .ok()
                    .filter(|a| f(a))
            })
            .await
    }

    /// A well-formed update answering `a` (g values are arbitrary but finite).
    pub fn update_for(&self, a: &RoundAnnounce, k0: u32) -> Vec<u8> {
        let idx = client_index(&self.id);
        let pairs = (k0..k0 + a.perturbations_per_client)
            .map(|k| SeedScalar {
                seed: derive_seed(a.seed_base, a.round, idx, k),
                g: 0.01 * (k as f32 + 1.0),
            })
            .collect();
        wire::encode(&ClientUpdate {
            client_id: self.id.clone(),
            round: a.round,
            base_version: a.model_version,
            seq: a.extend,
            pairs,
            samples: a.perturbations_per_client,
            loss_mean: 1.0,
            loss_m2: 0.0,
        })
    }

    pub async fn send_update(&self, bytes: Vec<u8>) {
        let topics = Topics::new(JOB).unwrap();
        self.mqtt
            .client
            .publish(topics.update(&self.id), QoS::AtLeastOnce, false, bytes)
            .await
            .unwrap();
    }
}

pub fn is_update(e: &AggEvent, client: &str, round: u64, seq: u32) -> Option<UpdateOutcome> {
    match e {
        AggEvent::Update {
            client: c,
            round: r,
            seq: s,
            outcome,
        } if c == client && *r == round && *s == seq => Some(outcome.clone()),
        _ => None,
    }
}

pub fn tempdir() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().expect("tempdir");
    let p = d.path().to_path_buf();
    (d, p)
}

// ---------------------------------------------------------------------------------------------
// Scenarios (each suite runs them against its broker)

/// 3 agents, several rounds; every agent's replica equals the aggregator's weights at every
/// version it was seen at, and all reach the last commit with the aggregator's hash.
pub async fn three_agents_agree_after_every_commit(broker: &Broker) {
    let (_d, dir) = tempdir();
    let mut agg = spawn_aggregator(aggregator_config(&dir.join("agg"), 3, 3), broker.addr());
    let mut agents: Vec<RunningAgent> = (0..3)
        .map(|i| spawn_agent(broker.addr(), &format!("agent-{i}"), &dir))
        .collect();
    for v in 1..=5 {
        let h = agg.committed(v).await;
        for a in &mut agents {
            // Quorum 3: every agent had to hold version v-1 to contribute to this commit.
            assert_eq!(
                a.at_version(v).await.or(Some(h)),
                Some(h),
                "agent {} at {v}",
                a.id
            );
        }
    }
    for a in &agents {
        a.assert_replica_matches(&agg);
    }
    for a in agents {
        a.stop().await;
    }
    let s = agg.stop().await;
    assert!(s.version >= 5);
    assert_eq!(s.rejected, 0, "no update was rejected");
}

/// An agent killed while a round is open does not stall it: its last will takes it out of the
/// awaited set (or the deadline passes), and the round commits with the quorum.
pub async fn killed_agent_does_not_stall_the_round(broker: &Broker) {
    let (_d, dir) = tempdir();
    let mut agg = spawn_aggregator(aggregator_config(&dir.join("agg"), 2, 2), broker.addr());
    let mut agents: Vec<RunningAgent> = (0..3)
        .map(|i| spawn_agent(broker.addr(), &format!("agent-{i}"), &dir))
        .collect();
    // Wait for a round in which all three are selected, then kill one in the middle of it.
    let round = agg
        .next("a round with 3 clients", |e| match e {
            AggEvent::RoundOpened {
                round, selected: 3, ..
            } => Some(*round),
            _ => None,
        })
        .await;
    let victim = agents.pop().unwrap();
    victim.kill();
    let (committed_round, version) = agg
        .next("the next commit", |e| match e {
            AggEvent::Committed { round, version, .. } => Some((*round, *version)),
            _ => None,
        })
        .await;
    assert!(committed_round >= round);
    // And rounds keep going with the two survivors.
    let h = agg.committed(version + 2).await;
    for a in &mut agents {
        a.wait_info("catch up", |i| i.model_version >= version + 2)
            .await;
        a.assert_replica_matches(&agg);
    }
    assert!(agg.hash_of(version + 2) == Some(h));
    for a in agents {
        a.stop().await;
    }
    agg.stop().await;
}

/// A late joiner with an empty state directory catches up via the retained checkpoint plus
/// replay of the retained commit log, and ends up bit-identical to the aggregator.
pub async fn late_joiner_catches_up(broker: &Broker) {
    let (_d, dir) = tempdir();
    let mut agg = spawn_aggregator(aggregator_config(&dir.join("agg"), 2, 2), broker.addr());
    let mut agents: Vec<RunningAgent> = (0..2)
        .map(|i| spawn_agent(broker.addr(), &format!("agent-{i}"), &dir))
        .collect();
    // checkpoint_every = 3: checkpoints at 3 and 6, then log entry 7.
    agg.committed(7).await;
    let mut late = spawn_agent(broker.addr(), "late-agent", &dir);
    let info = late
        .wait_info("late joiner synced", |i| {
            i.model_version >= 7 && i.weights_hash.is_some()
        })
        .await;
    assert!(
        info.checkpoints_loaded >= 1,
        "caught up through a checkpoint: {info:?}"
    );
    // It then takes part in rounds like everyone else, and follows their commits.
    let round = agg
        .next("a round including the late joiner", |e| match e {
            AggEvent::Update {
                client,
                round,
                outcome: UpdateOutcome::Accepted { .. },
                ..
            } if client == "late-agent" => Some(*round),
            _ => None,
        })
        .await;
    let target = agg
        .next("commit of that round", |e| match e {
            AggEvent::Committed {
                round: r, version, ..
            } if *r == round => Some(*version),
            _ => None,
        })
        .await;
    late.wait_info("late joiner follows commits", |i| i.model_version >= target)
        .await;
    late.assert_replica_matches(&agg);
    for a in &mut agents {
        a.assert_replica_matches(&agg);
    }
    late.stop().await;
    for a in agents {
        a.stop().await;
    }
    agg.stop().await;
}

/// The aggregator killed in the middle of a round (after it pooled a contribution) and
/// restarted on the same state directory resumes at the same version with the same weights
/// hash, the resumed round counts each contribution once, and later rounds open.
pub async fn aggregator_restart_resumes(broker: &Broker) {
    let (_d, dir) = tempdir();
    let cfg = aggregator_config(&dir.join("agg"), 2, 2);
    let mut agg = spawn_aggregator(cfg.clone(), broker.addr());
    let mut agents: Vec<RunningAgent> = (0..2)
        .map(|i| spawn_agent(broker.addr(), &format!("agent-{i}"), &dir))
        .collect();
    agg.committed(2).await;
    agg.next("a pooled contribution after version 2", |e| match e {
        AggEvent::Update {
            outcome: UpdateOutcome::Accepted { .. },
            ..
        } => Some(()),
        _ => None,
    })
    .await;
    // Kill: no graceful shutdown, no final persist.
    agg.task.abort();
    // A killed process is gone before its restart; an aborted task may still be inside its
    // synchronous persist on another worker thread until it reaches an await, so wait for it.
    // (A kill inside persist itself is covered by aggregator/tests/durability.rs.)
    let _ = (&mut agg.task).await;
    let old_hashes = agg.hashes.lock().unwrap().clone();
    let mut agg = spawn_aggregator(cfg, broker.addr());
    agg.hashes
        .lock()
        .unwrap()
        .extend(old_hashes.iter().map(|(v, h)| (*v, *h)));
    let (version, hash) = agg
        .next("resume", |e| match e {
            AggEvent::Resumed { version, hash, .. } => Some((*version, *hash)),
            _ => None,
        })
        .await;
    assert!(version >= 2, "resumed at version {version}");
    if let Some(h) = old_hashes.get(&version) {
        assert_eq!(*h, hash, "resumed weights differ from the committed ones");
    }
    // The agents (which never restarted) agree with the resumed aggregator at that version.
    for a in &mut agents {
        let seen = a.at_version(version).await;
        assert_eq!(seen.unwrap_or(hash), hash);
    }
    let perturbations = agg
        .next("first commit after the restart", |e| match e {
            AggEvent::Committed {
                perturbations,
                version: v,
                ..
            } if *v == version + 1 => Some(*perturbations),
            _ => None,
        })
        .await;
    // Two clients x 4 perturbations: the contribution pooled before the kill (and redelivered
    // by the broker's session) is counted exactly once.
    assert_eq!(perturbations, 8);
    // And rounds go on: opening the next one needs the boards' retained statuses, which the
    // restarted aggregator must have received again on its persistent session.
    agg.committed(version + 2).await;
    for a in &mut agents {
        a.wait_info("follow", |i| i.model_version > version).await;
        a.assert_replica_matches(&agg);
    }
    for a in agents {
        a.stop().await;
    }
    agg.stop().await;
}

/// A duplicated update (same client, round, seq) is counted once, and an update for a round
/// that is no longer open is ignored (counted as stale).
pub async fn duplicate_counted_once_and_stale_ignored(broker: &Broker) {
    let (_d, dir) = tempdir();
    let mut cfg = aggregator_config(&dir.join("agg"), 3, 3);
    cfg.pacing.max_extends = 1;
    cfg.pacing.extend_perturbations = 4;
    cfg.pacing.max_perturbations = 10_000;
    let mut agg = spawn_aggregator(cfg, broker.addr());
    let agents: Vec<RunningAgent> = (0..2)
        .map(|i| spawn_agent(broker.addr(), &format!("agent-{i}"), &dir))
        .collect();
    let mut peer = Peer::connect(broker.addr(), "peer-0").await;
    peer.status(AgentState::Online).await;
    let a0 = peer
        .announce(|a| a.extend == 0 && a.selection.includes("peer-0", a.round))
        .await;
    let bytes = peer.update_for(&a0, 0);
    peer.send_update(bytes.clone()).await;
    let first = agg
        .next("peer's update", |e| is_update(e, "peer-0", a0.round, 0))
        .await;
    assert_eq!(first, UpdateOutcome::Accepted { pairs: 4 });
    // The round stays open until the peer answers the extend: the copy arrives while it is open.
    peer.send_update(bytes.clone()).await;
    let second = agg
        .next("peer's duplicate", |e| is_update(e, "peer-0", a0.round, 0))
        .await;
    assert_eq!(second, UpdateOutcome::Duplicate);
    let a1 = peer
        .announce(|a| a.round == a0.round && a.extend == 1)
        .await;
    peer.send_update(peer.update_for(&a1, 4)).await;
    let perturbations = agg
        .next("commit of the round", |e| match e {
            AggEvent::Committed {
                round,
                perturbations,
                ..
            } if *round == a0.round => Some(*perturbations),
            _ => None,
        })
        .await;
    // 3 clients x (4 + 4): the duplicate added nothing.
    assert_eq!(perturbations, 24);
    // The same update again, now for a closed round: ignored as stale.
    peer.send_update(bytes).await;
    let third = agg
        .next("stale update", |e| is_update(e, "peer-0", a0.round, 0))
        .await;
    assert!(matches!(third, UpdateOutcome::Stale { .. }), "{third:?}");
    peer.status(AgentState::Offline).await;
    for a in agents {
        a.stop().await;
    }
    let s = agg.stop().await;
    assert_eq!(s.duplicates, 1);
    assert_eq!(s.stale, 1);
}

/// More boards than rumqttd's in-flight window (100) have retained "online" statuses before the
/// aggregator subscribes: it must learn of every one and select them all.
pub async fn many_retained_statuses_are_all_seen(broker: &Broker) {
    const BOARDS: usize = 250;
    let mut peer = Peer::connect(broker.addr(), "status-writer").await;
    let topics = Topics::new(JOB).unwrap();
    for i in 0..BOARDS {
        let id = format!("board-{i:04}");
        let s = AgentStatus::new(id.clone(), AgentState::Online);
        peer.mqtt
            .client
            .publish(
                topics.status(&id),
                QoS::AtLeastOnce,
                true,
                wire::encode_json(&s),
            )
            .await
            .unwrap();
    }
    // Round trip: the broker handles one connection's packets in order, so once our marker
    // comes back every status before it is stored as retained.
    let marker = "fwdllm-test/marker";
    peer.mqtt
        .client
        .subscribe(marker, QoS::AtLeastOnce)
        .await
        .unwrap();
    peer.mqtt
        .client
        .publish(marker, QoS::AtLeastOnce, false, b"m".to_vec())
        .await
        .unwrap();
    peer.mqtt
        .next("marker comes back", |m| (m.topic == marker).then_some(()))
        .await;

    let (_dir, path) = tempdir();
    let mut agg = spawn_aggregator(aggregator_config(&path, BOARDS as u32, 1), broker.addr());
    let selected = agg
        .next("round 1 opened", |e| match e {
            AggEvent::RoundOpened { selected, .. } => Some(*selected),
            _ => None,
        })
        .await;
    assert_eq!(selected, BOARDS);
    agg.stop().await;
}
