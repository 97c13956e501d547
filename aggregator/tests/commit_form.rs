//! What a commit carries: on a small layout a round's pairs cost more bytes than the trainable
//! values, so the aggregator sends the values (`state.commit_form = "smallest"`); with
//! `"pairs"` it always sends the pairs. Either way a replica lands on the aggregator's bits, and
//! a restarted aggregator replays its logged commits of either form.

use std::path::Path;

use fwdllm_aggregator::config::{AggregatorConfig, CommitForm};
use fwdllm_aggregator::coordinator::{Coordinator, UpdateOutcome};
use fwdllm_shared::lora::LoraWeights;
use fwdllm_shared::wire::{
    self, AgentState, AgentStatus, ClientUpdate, CommitStep, RoundCommit, SeedScalar,
};

const CLIENTS: usize = 3;
const PAIRS: u32 = 8;

/// One head row of the tiny model: 65 values (260 bytes dense), against 24 pairs (288 bytes).
fn config(dir: &Path, form: CommitForm) -> AggregatorConfig {
    let mut cfg = AggregatorConfig::tiny("commit-form", dir);
    cfg.lora.modules = Vec::new();
    cfg.lora.head_rows = 1;
    cfg.selection.eval_every = 0;
    cfg.round.min_clients = CLIENTS as u32;
    cfg.round.perturbations_per_client = PAIRS;
    cfg.pacing.max_perturbations = CLIENTS as u32 * PAIRS;
    cfg.pacing.min_perturbations = cfg.pacing.max_perturbations;
    cfg.pacing.max_extends = 0;
    cfg.step.lr = 0.5;
    cfg.state.commit_form = form;
    cfg
}

fn client(i: usize) -> String {
    format!("board-{i}")
}

fn update(i: usize) -> Vec<u8> {
    wire::encode(&ClientUpdate {
        client_id: client(i),
        round: 1,
        base_version: 0,
        seq: 0,
        pairs: (0..PAIRS)
            .map(|k| SeedScalar {
                seed: 500 + 31 * i as u64 + u64::from(k),
                g: 0.25 + i as f32 - 0.5 * k as f32,
            })
            .collect(),
        samples: 4,
        loss_mean: 1.0,
        loss_m2: 0.0,
    })
}

/// Runs round 1 to its commit; returns the coordinator and the commit it published.
fn commit_round(dir: &Path, form: CommitForm) -> (Coordinator, RoundCommit) {
    let mut c = Coordinator::open(config(dir, form)).unwrap();
    for i in 0..CLIENTS {
        let s = AgentStatus::new(client(i), AgentState::Online);
        c.on_status(&client(i), &wire::encode_json(&s), 0);
    }
    for i in 0..CLIENTS {
        assert!(matches!(
            c.on_update(&client(i), &update(i), 1),
            UpdateOutcome::Accepted { .. }
        ));
    }
    c.persist().unwrap();
    assert_eq!(c.version(), 1);
    let out = c
        .take_outgoing()
        .into_iter()
        .find(|o| o.topic.ends_with("/commit"))
        .expect("a commit");
    let commit = wire::decode::<RoundCommit>(&out.payload).unwrap();
    (c, commit)
}

/// A replica's replay of `commit` from the initial weights.
fn replay(cfg: &AggregatorConfig, commit: &RoundCommit) -> LoraWeights {
    let mut w = LoraWeights::init(cfg.layout().unwrap());
    commit.step.apply(&mut w).unwrap();
    w
}

#[test]
fn both_forms_land_every_replica_on_the_aggregators_bits() {
    let (dense_dir, pairs_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (dense_agg, dense) = commit_round(dense_dir.path(), CommitForm::Smallest);
    let (pairs_agg, pairs) = commit_round(pairs_dir.path(), CommitForm::Pairs);

    let trainable = dense_agg.weights().layout().trainable_len();
    assert!(matches!(&dense.step, CommitStep::Dense(v) if v.len() == trainable));
    assert!(matches!(&pairs.step, CommitStep::Pairs(p) if p.len() == CLIENTS * PAIRS as usize));
    assert!(wire::encode(&dense).len() < wire::encode(&pairs).len());

    // Same round, same bits, whichever form travelled.
    assert_eq!(dense.weights_hash, pairs.weights_hash);
    assert_eq!(dense_agg.weights(), pairs_agg.weights());
    let cfg = config(dense_dir.path(), CommitForm::Smallest);
    assert_eq!(&replay(&cfg, &dense), dense_agg.weights());
    assert_eq!(&replay(&cfg, &pairs), dense_agg.weights());
}

#[test]
fn a_restart_replays_a_logged_dense_commit() {
    let dir = tempfile::tempdir().unwrap();
    let (agg, commit) = commit_round(dir.path(), CommitForm::Smallest);
    assert!(matches!(commit.step, CommitStep::Dense(_)));
    let before = agg.weights().clone();
    drop(agg);
    let again = Coordinator::open(config(dir.path(), CommitForm::Smallest)).unwrap();
    assert_eq!(again.version(), 1);
    assert_eq!(again.weights(), &before);
}
