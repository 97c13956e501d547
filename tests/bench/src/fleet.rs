//! Fleet-scale simulated clients: thousands of real MQTT connections in one tokio runtime,
//! sharing one weights replica.
//!
//! [`fwdllm_frontdoor::sim`] gives every client its own replica, so every client subscribes to every
//! commit: N clients cost the broker N copies of each commit and the simulator N replays of it.
//! That is the fan-out a real fleet pays (it is reported, as bytes per commit, by the scale
//! bench), but it makes a simulator on one machine measure its own replay, not the aggregator's
//! ingest. Here one *observer* connection follows the commits and checkpoints and keeps the
//! replica (verifying every hash); each *thin* client subscribes only to the round topic,
//! waits until the shared replica is at the announced version and answers from it, exactly the
//! update an agent at that version would send (same seeds, same synthetic loss as `sim`).
//!
//! Connections are opened through a gate ([`CONNECT_BURST`] at a time) so that 10,000 clients
//! do not overflow the broker's listen backlog; the timings the bench reads (first update
//! published) are nanoseconds since a base instant the caller gives.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use fwdllm_shared::perturb::derive_seed;
use fwdllm_shared::topics::{TopicKind, Topics};
use fwdllm_shared::wire::{
    self, client_index, AgentState, AgentStatus, Checkpoint, ClientUpdate, RoundAnnounce,
    RoundCommit, SeedScalar,
};
use log::debug;
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use fwdllm_aggregator::connection::no_delay;
use fwdllm_frontdoor::sim::{Quadratic, Replica, SimParams};

/// Connections being opened at once.
pub const CONNECT_BURST: usize = 256;
/// Largest packet a thin client accepts (announcements are small; the observer takes commits
/// and checkpoints up to the job's limit).
const THIN_MAX_PACKET: usize = 1 << 20;

/// Counters of a fleet, shared by its tasks.
#[derive(Debug)]
pub struct FleetStats {
    base: Instant,
    /// Thin clients whose connection was acknowledged (counts reconnects too).
    pub connected: AtomicU64,
    pub updates_sent: AtomicU64,
    pub update_bytes: AtomicU64,
    /// Nanoseconds since `base` of the first and the last update published (u64::MAX = none).
    pub first_update_ns: AtomicU64,
    pub last_update_ns: AtomicU64,
    /// Commits the observer applied, and their payload bytes (what every agent would receive).
    pub commits: AtomicU64,
    pub commit_bytes: AtomicU64,
    /// Announcements received by all thin clients together, and their bytes.
    pub announces: AtomicU64,
    pub announce_bytes: AtomicU64,
    pub hash_mismatches: AtomicU64,
    pub connection_errors: AtomicU64,
}

impl FleetStats {
    pub fn new(base: Instant) -> FleetStats {
        FleetStats {
            base,
            connected: AtomicU64::new(0),
            updates_sent: AtomicU64::new(0),
            update_bytes: AtomicU64::new(0),
            first_update_ns: AtomicU64::new(u64::MAX),
            last_update_ns: AtomicU64::new(0),
            commits: AtomicU64::new(0),
            commit_bytes: AtomicU64::new(0),
            announces: AtomicU64::new(0),
            announce_bytes: AtomicU64::new(0),
            hash_mismatches: AtomicU64::new(0),
            connection_errors: AtomicU64::new(0),
        }
    }

    /// When the first update was published, if one was.
    pub fn first_update(&self) -> Option<Instant> {
        let ns = self.first_update_ns.load(Ordering::Relaxed);
        (ns != u64::MAX).then(|| self.base + Duration::from_nanos(ns))
    }

    fn mark_update(&self) {
        let ns = self.base.elapsed().as_nanos() as u64;
        self.first_update_ns.fetch_min(ns, Ordering::Relaxed);
        self.last_update_ns.fetch_max(ns, Ordering::Relaxed);
    }
}

/// The replica every thin client answers from, and its version for waiting.
struct Shared {
    replica: RwLock<Replica>,
    version: watch::Sender<u64>,
    objective: Quadratic,
    noise: f32,
}

/// Starts the observer and `n` thin clients named `{prefix}-{i:05}` on the current runtime;
/// they run until `stop` is cancelled.
pub fn spawn_fleet(
    params: &SimParams,
    prefix: &str,
    n: usize,
    stats: Arc<FleetStats>,
    stop: CancellationToken,
) -> Vec<JoinHandle<()>> {
    let (version, _) = watch::channel(0u64);
    let shared = Arc::new(Shared {
        replica: RwLock::new(Replica::new(params.layout.clone())),
        version,
        objective: Quadratic::new(&params.layout, params.target_seed),
        noise: params.noise,
    });
    let gate = Arc::new(Semaphore::new(CONNECT_BURST));
    let mut tasks = vec![tokio::spawn(observe(
        params.clone(),
        format!("{prefix}-observer"),
        shared.clone(),
        stats.clone(),
        stop.clone(),
    ))];
    for i in 0..n {
        tasks.push(tokio::spawn(thin_client(
            params.clone(),
            format!("{prefix}-{i:05}"),
            shared.clone(),
            stats.clone(),
            gate.clone(),
            stop.clone(),
        )));
    }
    tasks
}

fn options(p: &SimParams, id: &str, topics: &Topics, max_packet: usize) -> MqttOptions {
    let mut o = MqttOptions::new(id.to_owned(), p.host.clone(), p.port);
    o.set_keep_alive(Duration::from_secs(60));
    o.set_clean_session(true);
    o.set_max_packet_size(max_packet, max_packet);
    let will = AgentStatus::new(id.to_owned(), AgentState::Offline);
    o.set_last_will(LastWill::new(
        topics.status(id),
        wire::encode_json(&will),
        QoS::AtLeastOnce,
        true,
    ));
    o
}

/// Follows commits and checkpoints into the shared replica.
async fn observe(
    p: SimParams,
    id: String,
    shared: Arc<Shared>,
    stats: Arc<FleetStats>,
    stop: CancellationToken,
) {
    let topics = Topics::new(&p.job).expect("valid job name");
    let (client, mut el) = AsyncClient::new(options(&p, &id, &topics, p.max_packet_bytes), 64);
    loop {
        let ev = tokio::select! {
            _ = stop.cancelled() => break,
            ev = el.poll() => ev,
        };
        let publish = match ev {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                // What an agent subscribes to, less the round (this client does not answer).
                for f in [topics.commits_filter(), topics.checkpoint()] {
                    let _ = client.subscribe(f, QoS::AtLeastOnce).await;
                }
                continue;
            }
            Ok(Event::Incoming(Packet::Publish(p))) => p,
            Ok(_) => continue,
            Err(e) => {
                debug!("fleet observer: {e}");
                stats.connection_errors.fetch_add(1, Ordering::Relaxed);
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
        };
        if publish.payload.is_empty() {
            continue;
        }
        let mut replica = shared.replica.write().unwrap_or_else(|e| e.into_inner());
        let before = replica.version;
        let ok = match topics.parse(&publish.topic) {
            Some(TopicKind::Commit) | Some(TopicKind::CommitLog(_)) => {
                if matches!(topics.parse(&publish.topic), Some(TopicKind::Commit)) {
                    // Each commit goes out once on `commit` (and once on the retained log).
                    stats.commits.fetch_add(1, Ordering::Relaxed);
                    stats
                        .commit_bytes
                        .fetch_add(publish.payload.len() as u64, Ordering::Relaxed);
                }
                match wire::decode::<RoundCommit>(&publish.payload) {
                    Ok(c) => replica.on_commit(c),
                    Err(_) => true,
                }
            }
            Some(TopicKind::Checkpoint) => match wire::decode::<Checkpoint>(&publish.payload) {
                Ok(cp) => replica.on_checkpoint(&cp),
                Err(_) => true,
            },
            _ => true,
        };
        if !ok {
            stats.hash_mismatches.fetch_add(1, Ordering::Relaxed);
        }
        let now = replica.version;
        drop(replica);
        if now != before {
            shared.version.send_replace(now);
        }
    }
    let _ = client.disconnect().await;
}

/// Subscribes to the round topic and answers every request it is selected for, from the
/// shared replica at the announced version.
async fn thin_client(
    p: SimParams,
    id: String,
    shared: Arc<Shared>,
    stats: Arc<FleetStats>,
    gate: Arc<Semaphore>,
    stop: CancellationToken,
) {
    let topics = Topics::new(&p.job).expect("valid job name");
    let (client, mut el) = AsyncClient::new(options(&p, &id, &topics, THIN_MAX_PACKET), 16);
    no_delay(&mut el);
    let mut version = shared.version.subscribe();
    let mut permit = Some(gate.clone().acquire_owned().await.expect("gate open"));
    let mut pending: Option<RoundAnnounce> = None;
    let mut answered: Vec<(u64, u32)> = Vec::new();
    let mut next_k: BTreeMap<u64, u32> = BTreeMap::new();
    let mut scratch = Vec::new();
    let idx = client_index(&id);
    loop {
        let waiting = pending.is_some();
        let ev = tokio::select! {
            _ = stop.cancelled() => break,
            ev = el.poll() => Some(ev),
            r = version.changed(), if waiting => {
                if r.is_err() {
                    break;
                }
                None
            }
        };
        match ev {
            None => {}
            Some(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                permit = None;
                stats.connected.fetch_add(1, Ordering::Relaxed);
                let _ = client.subscribe(topics.round(), QoS::AtLeastOnce).await;
                let mut s = AgentStatus::new(id.clone(), AgentState::Online);
                s.model_version = *version.borrow();
                let _ = client
                    .publish(
                        topics.status(&id),
                        QoS::AtLeastOnce,
                        true,
                        wire::encode_json(&s),
                    )
                    .await;
            }
            Some(Ok(Event::Incoming(Packet::Publish(publish)))) => {
                if publish.payload.is_empty()
                    || !matches!(topics.parse(&publish.topic), Some(TopicKind::Round))
                {
                    continue;
                }
                stats.announces.fetch_add(1, Ordering::Relaxed);
                stats
                    .announce_bytes
                    .fetch_add(publish.payload.len() as u64, Ordering::Relaxed);
                if let Ok(a) = wire::decode::<RoundAnnounce>(&publish.payload) {
                    if a.selection.includes(&id, a.round)
                        && !answered.contains(&(a.round, a.extend))
                    {
                        pending = Some(a);
                    }
                }
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                debug!("fleet {id}: {e}");
                stats.connection_errors.fetch_add(1, Ordering::Relaxed);
                drop(permit.take());
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
                permit = Some(gate.clone().acquire_owned().await.expect("gate open"));
                continue;
            }
        }
        // Answer once the shared replica is at the announced version.
        let Some(a) = pending.as_ref() else { continue };
        let bytes = {
            let replica = shared.replica.read().unwrap_or_else(|e| e.into_inner());
            if replica.version < a.model_version {
                continue;
            }
            if replica.version > a.model_version {
                pending = None; // the round moved on without us
                continue;
            }
            let k0 = *next_k.get(&a.round).unwrap_or(&0);
            let pairs: Vec<SeedScalar> = (k0..k0 + a.perturbations_per_client)
                .map(|k| {
                    let seed = derive_seed(a.seed_base, a.round, idx, k);
                    let g =
                        shared
                            .objective
                            .slope(&replica.weights, seed, shared.noise, &mut scratch);
                    SeedScalar { seed, g }
                })
                .collect();
            next_k.insert(a.round, k0 + a.perturbations_per_client);
            wire::encode(&ClientUpdate {
                client_id: id.clone(),
                round: a.round,
                base_version: a.model_version,
                seq: a.extend,
                samples: pairs.len() as u32,
                pairs,
                loss_mean: shared.objective.loss(&replica.weights) as f32,
                loss_m2: 0.0,
            })
        };
        answered.push((a.round, a.extend));
        if answered.len() > 16 {
            answered.remove(0);
        }
        if next_k.len() > 4 {
            let first = *next_k.keys().next().expect("non-empty");
            next_k.remove(&first);
        }
        pending = None;
        stats
            .update_bytes
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        stats.updates_sent.fetch_add(1, Ordering::Relaxed);
        stats.mark_update();
        if client
            .publish(topics.update(&id), QoS::AtLeastOnce, false, bytes)
            .await
            .is_err()
        {
            break;
        }
    }
    fwdllm_frontdoor::sim::disconnect_flushed(&client, &mut el, Duration::from_secs(2)).await;
}
