//! A round resumed after an aggregator restart waits for its selected clients whose status is
//! not known yet (statuses are not durable; the queued updates arrive before the retained
//! statuses), instead of closing on quorum and discarding their answers as stale. Found by the
//! chaos bench (`make chaos`, scenario `aggregator_sigkill`).

use std::path::Path;

use fwdllm_aggregator::config::AggregatorConfig;
use fwdllm_aggregator::coordinator::{Coordinator, UpdateOutcome};
use fwdllm_shared::perturb::derive_seed;
use fwdllm_shared::wire::{self, client_index, AgentState, AgentStatus, ClientUpdate, SeedScalar};

const CLIENTS: [&str; 3] = ["a", "b", "c"];

fn config(dir: &Path) -> AggregatorConfig {
    let mut cfg = AggregatorConfig::tiny("restart-round", dir);
    cfg.round.min_clients = 3;
    cfg.round.quorum = 2;
    cfg.round.perturbations_per_client = 2;
    cfg.round.deadline_s = 60.0;
    cfg.pacing.max_perturbations = 6;
    cfg.pacing.min_perturbations = 6;
    cfg.pacing.max_extends = 0;
    cfg
}

fn status(c: &mut Coordinator, id: &str, state: AgentState) {
    c.on_status(id, &wire::encode_json(&AgentStatus::new(id, state)), 0);
}

fn answer(c: &mut Coordinator, id: &str) -> UpdateOutcome {
    let a = c.open_round().expect("a round is open").announce.clone();
    let pairs = (0..2)
        .map(|k| SeedScalar {
            seed: derive_seed(a.seed_base, a.round, client_index(id), k),
            g: 0.1,
        })
        .collect();
    let u = ClientUpdate {
        client_id: id.into(),
        round: a.round,
        base_version: a.model_version,
        seq: 0,
        pairs,
        samples: 2,
        loss_mean: 1.0,
        loss_m2: 0.0,
    };
    c.on_update(id, &wire::encode(&u), 0)
}

#[test]
fn a_resumed_round_waits_for_selected_clients_of_unknown_status() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Coordinator::open(config(dir.path())).unwrap();
    for id in CLIENTS {
        status(&mut c, id, AgentState::Online);
    }
    assert_eq!(c.open_round().map(|o| o.selected.len()), Some(3));
    assert_eq!(answer(&mut c, "a"), UpdateOutcome::Accepted { pairs: 2 });
    c.persist().unwrap();
    drop(c);

    // Restart: no status known yet, b's queued update arrives first. Quorum (2) is met, but c
    // may still answer: the round stays open.
    let mut c = Coordinator::open(config(dir.path())).unwrap();
    assert_eq!(answer(&mut c, "b"), UpdateOutcome::Accepted { pairs: 2 });
    assert_eq!(c.version(), 0, "closed before c's status was known");
    // c's answer (sent while the aggregator was down) counts.
    assert_eq!(answer(&mut c, "c"), UpdateOutcome::Accepted { pairs: 2 });
    assert_eq!(c.version(), 1);
}

#[test]
fn a_resumed_round_closes_on_quorum_once_the_missing_client_is_known_offline() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Coordinator::open(config(dir.path())).unwrap();
    for id in CLIENTS {
        status(&mut c, id, AgentState::Online);
    }
    answer(&mut c, "a");
    c.persist().unwrap();
    drop(c);
    let mut c = Coordinator::open(config(dir.path())).unwrap();
    answer(&mut c, "b");
    assert_eq!(c.version(), 0);
    // c's retained "offline" (its last will) arrives: nobody else to wait for.
    status(&mut c, "c", AgentState::Offline);
    assert_eq!(c.version(), 1);
}
