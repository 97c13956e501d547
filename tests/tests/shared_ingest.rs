//! Split ingest (`[ingest] workers`): updates received by several connections sharing the
//! updates topic (`$share/fwdllm-ingest/...` on Mosquitto) are counted once, never lost, and
//! committed to the same bits as through the aggregator's one connection — also when the
//! aggregator is killed in the middle of a round and restarted (what a worker received but did
//! not acknowledge is redelivered to its persistent session). Underneath: a commit does not
//! depend on the order its updates arrived in.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use fwdllm_aggregator::config::AggregatorConfig;
use fwdllm_aggregator::coordinator::{AggEvent, Coordinator, UpdateOutcome};
use fwdllm_aggregator::server::{self, BrokerTarget, Hooks};
use fwdllm_bench::bridge::{self, Mosquitto};
use fwdllm_frontdoor::sim::{self, SimParams, SimStats};
use fwdllm_shared::lora::WeightsHash;
use fwdllm_shared::wire::{self, AgentState, AgentStatus, ClientUpdate, RoundCommit, SeedScalar};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

const CLIENTS: usize = 4;
const PAIRS: u32 = 2;
const COMMITS: u64 = 4;
/// Failure guard of the waits (never reached when things work).
const GUARD: Duration = Duration::from_secs(120);

fn config(job: &str, dir: &Path, clients: usize) -> AggregatorConfig {
    let mut cfg = AggregatorConfig::tiny(job, dir);
    cfg.job.max_commits = COMMITS;
    cfg.selection.eval_every = 0;
    cfg.round.min_clients = clients as u32;
    cfg.round.perturbations_per_client = PAIRS;
    cfg.round.deadline_s = 300.0;
    // Every round holds one update of every client and commits at the cap.
    cfg.pacing.max_perturbations = clients as u32 * PAIRS;
    cfg.pacing.min_perturbations = cfg.pacing.max_perturbations;
    cfg.pacing.max_extends = 0;
    cfg.step.lr = 0.5;
    // These tests account for every committed seed, which a dense commit does not name.
    cfg.state.commit_form = fwdllm_aggregator::config::CommitForm::Pairs;
    cfg
}

// ---- order independence, on the coordinator alone ----

fn client(i: usize) -> String {
    format!("board-{i}")
}

/// Client `i`'s update. Its g span 9 orders of magnitude: directions are ±1, so a pooled sum
/// of f32 values in f64 is exact (the same in any order) unless their exponents spread over
/// more than f64 has bits beyond f32's — these do, so the pooled norm may differ in its last
/// bits between orders (the commit re-pools in seed order when the trust region may act).
fn update(i: usize) -> Vec<u8> {
    let pairs = (0..PAIRS)
        .map(|k| SeedScalar {
            // Seeds not in client order, so that seed order is not arrival order.
            seed: 9000 - 7 * i as u64 + 100 * u64::from(k),
            g: if (i + k as usize) % 2 == 0 {
                2345.678 * (1.0 + i as f32 * 0.37)
            } else {
                -1.234_567e-6 * (1.0 + i as f32 * 0.61)
            },
        })
        .collect();
    wire::encode(&ClientUpdate {
        client_id: client(i),
        round: 1,
        base_version: 0,
        seq: 0,
        pairs,
        samples: 4,
        loss_mean: 1.0,
        loss_m2: 0.0,
    })
}

/// The commit of one round fed in `order`; `decoded` feeds it as an ingest worker does.
fn commit_in_order(order: &[usize], trust_region: f64, decoded: bool) -> (WeightsHash, Vec<u64>) {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config("order", tmp.path(), 5);
    cfg.step.trust_region = trust_region;
    // Robust clipping off: it would re-pool every round (and flatten the g above).
    cfg.robust.clip_sigmas = 0.0;
    cfg.robust.client_rms_sigmas = 0.0;
    let mut c = Coordinator::open(cfg).unwrap();
    for i in 0..5 {
        let s = AgentStatus::new(client(i), AgentState::Online);
        c.on_status(&client(i), &wire::encode_json(&s), 0);
    }
    for &i in order {
        let payload = update(i);
        let o = if decoded {
            let u = wire::decode::<ClientUpdate>(&payload);
            c.on_decoded_update(&client(i), &payload, u, 1)
        } else {
            c.on_update(&client(i), &payload, 1)
        };
        assert_eq!(o, UpdateOutcome::Accepted { pairs: 2 });
    }
    c.persist().unwrap();
    assert_eq!(c.version(), 1);
    let commit = c
        .take_outgoing()
        .into_iter()
        .find(|o| o.topic.ends_with("/commit"))
        .expect("a commit");
    let rc = wire::decode::<RoundCommit>(&commit.payload).unwrap();
    (
        c.weights().hash(),
        rc.step.pairs().unwrap().iter().map(|p| p.seed).collect(),
    )
}

#[test]
fn a_commit_is_the_same_bits_whatever_order_its_updates_arrived_in() {
    let orders = [[0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [2, 0, 4, 1, 3]];
    // A trust region the step never reaches, and one that clamps every step (then the pooled
    // norm scales every coefficient, so it must not depend on the arrival order either).
    for trust_region in [1e6, 1e-6] {
        let (want, seeds) = commit_in_order(&orders[0], trust_region, false);
        assert!(seeds.windows(2).all(|w| w[0] < w[1]), "{seeds:?}");
        for (n, order) in orders.iter().enumerate() {
            for decoded in [false, true] {
                let (got, _) = commit_in_order(order, trust_region, decoded);
                assert_eq!(
                    got, want,
                    "order {order:?}, trust region {trust_region}, decoded {decoded} (case {n})"
                );
            }
        }
    }
}

// ---- through Mosquitto ----

/// What one run through Mosquitto produced.
#[derive(Debug)]
struct Outcome {
    /// Weights hash of every version, from the commits on the broker.
    hashes: Vec<WeightsHash>,
    /// Seeds the clients sent that no commit holds, and seeds committed more than once.
    lost: usize,
    doubled: usize,
    committed_pairs: usize,
    replica_hash_mismatches: u64,
    /// Updates the aggregator counted (its own counters, after the last run).
    updates: u64,
}

fn mosquitto() -> Mosquitto {
    let bin = Path::new("/usr/sbin/mosquitto");
    assert!(
        bin.exists(),
        "/usr/sbin/mosquitto is missing: apt-get install mosquitto (scripts/setup.sh does)"
    );
    Mosquitto::start(bin, 64 << 20, "").expect("mosquitto starts")
}

/// Waits until `n` updates of `round` were accepted.
async fn accepted_in(events: &mut broadcast::Receiver<AggEvent>, round: u64, n: usize) {
    let mut seen = 0;
    while seen < n {
        match events.recv().await {
            Ok(AggEvent::Update {
                round: r,
                outcome: UpdateOutcome::Accepted { .. },
                ..
            }) if r == round => seen += 1,
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(e) => panic!("aggregator events ended: {e}"),
        }
    }
}

/// `COMMITS` rounds of `CLIENTS` simulated clients with `workers` ingest connections; with
/// `kill`, the aggregator's task is aborted once half of round 2 is accepted (nothing
/// persisted or acknowledged after that point) and a new one resumes from the same state.
async fn run(workers: u32, kill: bool) -> Outcome {
    let broker = mosquitto();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config("share", dir.path(), CLIENTS);
    cfg.ingest.workers = workers;
    cfg.broker.port = broker.port();
    assert_eq!(cfg.validate(), vec![]);
    let target = BrokerTarget {
        host: "127.0.0.1".into(),
        port: broker.port(),
    };
    let watch_stop = CancellationToken::new();
    let watcher = bridge::watch_commits(broker.addr(), &cfg.job.name, watch_stop.clone());
    let start = |cfg: AggregatorConfig| {
        let (tx, events) = broadcast::channel(1 << 12);
        let hooks = Hooks {
            events: Some(tx),
            ..Hooks::default()
        };
        let task = tokio::spawn(server::run(
            cfg,
            target.clone(),
            CancellationToken::new(),
            hooks,
        ));
        (task, events)
    };
    let (mut task, mut events) = start(cfg.clone());
    let params = SimParams {
        job: cfg.job.name.clone(),
        host: "127.0.0.1".into(),
        port: broker.port(),
        layout: cfg.layout().unwrap(),
        noise: 0.01,
        target_seed: 7,
        max_packet_bytes: cfg.broker.max_packet_bytes,
    };
    let stats = Arc::new(SimStats::default());
    let sim_stop = CancellationToken::new();
    let clients = sim::spawn_clients(&params, "dev", CLIENTS, stats.clone(), sim_stop.clone());
    if kill {
        tokio::time::timeout(GUARD, accepted_in(&mut events, 2, CLIENTS / 2))
            .await
            .expect("half of round 2 accepted");
        task.abort();
        assert!(task.await.unwrap_err().is_cancelled());
        (task, events) = start(cfg.clone());
    }
    drop(events);
    let summary = tokio::time::timeout(GUARD, task)
        .await
        .expect("the run finishes")
        .expect("the run's task")
        .expect("the run");
    sim_stop.cancel();
    for c in clients {
        let _ = c.await;
    }
    watch_stop.cancel();
    let (seen, _) = watcher.await.unwrap();
    let mut committed: BTreeMap<u64, u32> = BTreeMap::new();
    let mut hashes = Vec::new();
    for (v, bytes) in &seen {
        let rc = wire::decode::<RoundCommit>(bytes).unwrap();
        assert_eq!(rc.new_version, *v);
        hashes.push(rc.weights_hash);
        for p in rc.step.pairs().unwrap() {
            *committed.entry(p.seed).or_default() += 1;
        }
    }
    let sent: BTreeSet<u64> = stats.sent_seeds.lock().unwrap().iter().copied().collect();
    Outcome {
        hashes,
        lost: sent.iter().filter(|s| !committed.contains_key(s)).count(),
        doubled: committed.values().filter(|&&n| n > 1).count(),
        committed_pairs: committed.len(),
        replica_hash_mismatches: stats.hash_mismatches.load(Ordering::Relaxed),
        updates: summary.updates,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_workers_lose_and_double_nothing_and_commit_the_same_bits() {
    let one = run(1, false).await;
    let want_pairs = CLIENTS * PAIRS as usize * COMMITS as usize;
    assert_eq!(one.hashes.len(), COMMITS as usize, "{one:?}");
    assert_eq!(one.committed_pairs, want_pairs, "{one:?}");
    for (workers, kill) in [(2, false), (3, true)] {
        let o = run(workers, kill).await;
        let case = format!("{workers} workers, kill mid-round {kill}: {o:?}");
        assert_eq!(o.lost, 0, "{case}");
        assert_eq!(o.doubled, 0, "{case}");
        assert_eq!(o.committed_pairs, want_pairs, "{case}");
        assert_eq!(o.replica_hash_mismatches, 0, "{case}");
        assert_eq!(o.updates, CLIENTS as u64 * COMMITS, "{case}");
        assert_eq!(o.hashes, one.hashes, "{case}");
    }
}

/// Publishes `n` updates of clients `junk-{i}` for round 1 (stale once the job is past it).
async fn publish_stale(port: u16, job: &str, n: usize) {
    let topics = fwdllm_shared::topics::Topics::new(job).unwrap();
    let (client, mut el) = rumqttc::AsyncClient::new(
        rumqttc::MqttOptions::new("junk-publisher", "127.0.0.1", port),
        64,
    );
    for i in 0..n {
        let id = format!("junk-{i}");
        let u = ClientUpdate {
            client_id: id.clone(),
            round: 1,
            base_version: 0,
            seq: 0,
            pairs: vec![SeedScalar {
                seed: i as u64,
                g: 0.5,
            }],
            samples: 1,
            loss_mean: 1.0,
            loss_m2: 0.0,
        };
        client
            .publish(
                topics.update(&id),
                rumqttc::QoS::AtLeastOnce,
                false,
                wire::encode(&u),
            )
            .await
            .unwrap();
    }
    let mut acked = 0;
    while acked < n {
        match el.poll().await {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => acked += 1,
            Ok(_) => {}
            Err(e) => panic!("junk publisher: {e}"),
        }
    }
    client.disconnect().await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(2), el.poll()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lowering_the_worker_count_strands_no_update() {
    let broker = mosquitto();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config("retire", dir.path(), CLIENTS);
    cfg.job.max_commits = 1;
    cfg.ingest.workers = 3;
    cfg.broker.port = broker.port();
    let target = BrokerTarget {
        host: "127.0.0.1".into(),
        port: broker.port(),
    };
    // A run with 3 workers leaves 3 persistent sessions in the share group.
    let params = SimParams {
        job: cfg.job.name.clone(),
        host: "127.0.0.1".into(),
        port: broker.port(),
        layout: cfg.layout().unwrap(),
        noise: 0.01,
        target_seed: 7,
        max_packet_bytes: cfg.broker.max_packet_bytes,
    };
    let sim_stop = CancellationToken::new();
    let stats = Arc::new(SimStats::default());
    let clients = sim::spawn_clients(&params, "dev", CLIENTS, stats, sim_stop.clone());
    let run = server::run(
        cfg.clone(),
        target.clone(),
        CancellationToken::new(),
        Hooks::default(),
    );
    let summary = tokio::time::timeout(GUARD, run).await.unwrap().unwrap();
    assert_eq!(summary.version, 1);
    sim_stop.cancel();
    for c in clients {
        let _ = c.await;
    }
    // While the aggregator is down, Mosquitto routes the updates round-robin to the three
    // offline sessions: two of these six wait in worker 2's.
    publish_stale(broker.port(), &cfg.job.name, 6).await;
    // Restarted with 2 workers: worker 2 retires and hands over what its session held.
    cfg.ingest.workers = 2;
    cfg.job.max_commits = 2;
    let (tx, mut events) = broadcast::channel(1 << 12);
    let hooks = Hooks {
        events: Some(tx),
        ..Hooks::default()
    };
    let stop = CancellationToken::new();
    let task = tokio::spawn(server::run(cfg, target, stop.clone(), hooks));
    let mut ruled = BTreeSet::new();
    tokio::time::timeout(GUARD, async {
        while ruled.len() < 6 {
            match events.recv().await {
                Ok(AggEvent::Update {
                    client, outcome, ..
                }) if client.starts_with("junk-") => {
                    assert!(
                        matches!(outcome, UpdateOutcome::Stale { .. }),
                        "{outcome:?}"
                    );
                    ruled.insert(client);
                }
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("aggregator events ended: {e}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("stranded updates: only {ruled:?} reached the aggregator"));
    stop.cancel();
    tokio::time::timeout(GUARD, task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
