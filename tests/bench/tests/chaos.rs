//! The chaos bench's machinery on the simulated-client path, fast enough for `make test`: every
//! QoS 1 update delivered twice (the duplicating proxy), the ledger, the aggregator's rulings
//! and the accounting. Nothing here depends on timing: it waits for events, and checks only
//! what must hold however the deliveries interleave.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use fwdllm_aggregator::broker::EmbeddedBroker;
use fwdllm_aggregator::config::AggregatorConfig;
use fwdllm_aggregator::server::{self, BrokerTarget, Hooks};
use fwdllm_bench::chaos::{
    account, check_replicas, DupProxy, FinalState, Observer, RulingRecord, Rulings, Verdict,
};
use fwdllm_frontdoor::sim::{self, SimParams, SimStats};
use tokio_util::sync::CancellationToken;

/// Failure guard of every wait (never reached when things work).
const GUARD: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn duplicated_deliveries_are_counted_once_and_nothing_is_lost() {
    const CLIENTS: usize = 4;
    const PERTURBATIONS: u32 = 4;
    const COMMITS: u64 = 5;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = AggregatorConfig::tiny("chaos-dup", dir.path());
    cfg.job.max_commits = COMMITS;
    cfg.state.checkpoint_every = 2;
    cfg.state.commit_form = fwdllm_aggregator::config::CommitForm::Pairs;
    cfg.round.min_clients = CLIENTS as u32;
    cfg.round.quorum = CLIENTS as u32;
    cfg.round.perturbations_per_client = PERTURBATIONS;
    cfg.round.deadline_s = 60.0;
    cfg.pacing.max_perturbations = CLIENTS as u32 * PERTURBATIONS;
    cfg.pacing.min_perturbations = cfg.pacing.max_perturbations;
    cfg.pacing.max_extends = 0;
    cfg.step.lr = 0.5;
    let layout = cfg.layout().unwrap();

    let broker = EmbeddedBroker::start("127.0.0.1", 0, cfg.broker.max_packet_bytes).unwrap();
    let mut observer = Observer::start(
        &broker.host(),
        broker.port(),
        &cfg.job.name,
        "chaos-ledger",
        cfg.broker.max_packet_bytes,
        GUARD,
    )
    .await
    .unwrap();
    let proxy = DupProxy::start(broker.addr()).await.unwrap();

    let rulings = Arc::new(Mutex::new(Rulings::default()));
    let r2 = rulings.clone();
    let hooks = Hooks {
        on_event: Some(Box::new(move |e| {
            if let Some(rec) = RulingRecord::from_event(e) {
                r2.lock().unwrap().record(&rec);
            }
        })),
        ..Hooks::default()
    };
    let target = BrokerTarget {
        host: broker.host(),
        port: broker.port(),
    };
    let agg = tokio::spawn(server::run(
        cfg.clone(),
        target,
        CancellationToken::new(),
        hooks,
    ));
    // The clients talk to the broker through the proxy only.
    let params = SimParams {
        job: cfg.job.name.clone(),
        host: proxy.addr().ip().to_string(),
        port: proxy.addr().port(),
        layout: layout.clone(),
        noise: 0.01,
        target_seed: 7,
        max_packet_bytes: cfg.broker.max_packet_bytes,
    };
    let stats = Arc::new(SimStats::default());
    let stop = CancellationToken::new();
    let clients = sim::spawn_clients(&params, "sim", CLIENTS, stats.clone(), stop.clone());
    // The aggregator stops by itself after COMMITS commits.
    let summary = tokio::time::timeout(GUARD, agg)
        .await
        .expect("aggregator finishes")
        .unwrap()
        .unwrap();
    assert_eq!(summary.version, COMMITS);
    observer
        .wait_until("every commit in the ledger", GUARD, |l| {
            l.version() >= COMMITS
        })
        .await
        .unwrap();
    stop.cancel();
    for c in clients {
        c.await.unwrap();
    }
    observer.drain(GUARD).await.unwrap();
    let ledger = observer.stop().await;
    let fin = FinalState::load(&cfg).unwrap();
    let rulings = rulings.lock().unwrap().clone();

    let t = account(&ledger, &rulings, &fin);
    // Every round needed every client's update: CLIENTS per commit, each committed once.
    assert_eq!(t.updates, CLIENTS as u64 * COMMITS, "{t:?}");
    assert_eq!(t.committed, t.updates, "{t:?}");
    assert_eq!((t.lost, t.doubled, t.doubled_pairs), (0, 0, 0), "{t:?}");
    assert_eq!(t.unattributed_pairs, 0, "{t:?}");
    // The broker took every update twice, and the aggregator accepted each id exactly once.
    assert_eq!(proxy.injected(), t.updates, "{t:?}");
    assert_eq!(t.deliveries, 2 * t.updates, "{t:?}");
    for (id, verdicts) in &rulings.updates {
        let accepted = verdicts.iter().filter(|v| **v == Verdict::Accepted).count();
        assert_eq!(accepted, 1, "{id}: {verdicts:?}");
    }
    // Every commit holds exactly CLIENTS x PERTURBATIONS pairs, and replays to its hash.
    for c in ledger.commits.values() {
        assert_eq!(
            c.step.pairs().unwrap().len(),
            CLIENTS * PERTURBATIONS as usize
        );
    }
    let r = check_replicas(&layout, &ledger, &fin);
    assert_eq!((r.commits_replayed, r.mismatches()), (COMMITS, 0), "{r:?}");
    assert_eq!(
        stats
            .hash_mismatches
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

/// Updates acknowledged in a round still open when the aggregator stops are pending in its
/// durable state — read as its restart reads it, `journal.bin` included — never lost. Found by
/// `make chaos`: every run ends with a round open, and the accounting read `state.bin` alone,
/// which holds only what arrived before the round's last snapshot.
#[test]
fn updates_of_the_round_open_at_stop_are_pending_not_lost() {
    use fwdllm_aggregator::coordinator::{Coordinator, UpdateOutcome};
    use fwdllm_shared::perturb::derive_seed;
    use fwdllm_shared::wire::{
        self, client_index, AgentState, AgentStatus, ClientUpdate, SeedScalar,
    };
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = AggregatorConfig::tiny("chaos-open-at-stop", dir.path());
    cfg.round.min_clients = 3;
    cfg.round.quorum = 3;
    cfg.round.perturbations_per_client = 2;
    cfg.pacing.max_perturbations = 6;
    cfg.pacing.min_perturbations = 6;
    cfg.pacing.max_extends = 0;
    let mut c = Coordinator::open(cfg.clone()).unwrap();
    for id in ["a", "b", "c"] {
        let s = AgentStatus::new(id, AgentState::Online);
        c.on_status(id, &wire::encode_json(&s), 0);
    }
    c.persist().unwrap(); // the round's opening snapshot
    let a = c.open_round().expect("a round is open").announce.clone();
    let mut ledger = fwdllm_bench::chaos::Ledger::default();
    for id in ["a", "b"] {
        let u = ClientUpdate {
            client_id: id.into(),
            round: a.round,
            base_version: a.model_version,
            seq: 0,
            pairs: (0..2)
                .map(|k| SeedScalar {
                    seed: derive_seed(a.seed_base, a.round, client_index(id), k),
                    g: 0.1,
                })
                .collect(),
            samples: 2,
            loss_mean: 1.0,
            loss_m2: 0.0,
        };
        assert_eq!(
            c.on_update(id, &wire::encode(&u), 0),
            UpdateOutcome::Accepted { pairs: 2 }
        );
        ledger.on_update(&u);
    }
    // What the server does before it acknowledges them, then a stop (SIGTERM's last persist
    // has nothing new to write; a SIGKILL leaves the same files).
    c.persist().unwrap();
    let mut rulings = Rulings::default();
    for e in c.take_events() {
        if let Some(r) = RulingRecord::from_event(&e) {
            rulings.record(&r);
        }
    }
    drop(c);

    // state.bin alone (what the accounting used to read) holds the round without them.
    let (snapshot, _, _) = fwdllm_aggregator::state::Store::new(dir.path())
        .unwrap()
        .load()
        .unwrap();
    assert_eq!(snapshot.open.map(|o| o.answered.len()), Some(0));
    let fin = FinalState::load(&cfg).unwrap();
    assert_eq!(
        fin.open,
        Some((a.round, vec![("a".to_string(), 0), ("b".to_string(), 0)]))
    );
    let t = account(&ledger, &rulings, &fin);
    assert_eq!((t.updates, t.pending, t.lost), (2, 2, 0), "{t:?}");
}
