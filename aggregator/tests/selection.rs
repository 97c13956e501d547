//! Model selection through the coordinator: announcements ask for dev scores at the configured
//! versions, reports are tallied per version, and the export is the best version on dev, not
//! the last one.

use std::path::Path;

use fwdllm_aggregator::config::AggregatorConfig;
use fwdllm_aggregator::coordinator::{AggEvent, Coordinator};
use fwdllm_aggregator::export;
use fwdllm_shared::wire::{
    self, AgentState, AgentStatus, ClientUpdate, EvalReport, RoundAnnounce, SeedScalar,
    EVAL_EVERY_KEY,
};

const CLIENTS: [&str; 2] = ["board-1", "board-2"];

fn open(dir: &Path) -> Coordinator {
    let mut cfg = AggregatorConfig::tiny("selection", dir);
    cfg.selection.eval_every = 2;
    cfg.round.perturbations_per_client = 1;
    cfg.round.min_clients = 2;
    cfg.round.quorum = 2;
    cfg.pacing.max_perturbations = 2;
    cfg.pacing.min_perturbations = 2;
    let mut c = Coordinator::open(cfg).expect("state opens");
    for id in CLIENTS {
        c.on_status(
            id,
            &wire::encode_json(&AgentStatus::new(id, AgentState::Online)),
            0,
        );
    }
    c
}

/// The announcement of the open round (last one published on the round topic).
fn announce(c: &mut Coordinator) -> RoundAnnounce {
    let round_topic = c.topics().round();
    let a = c
        .take_outgoing()
        .into_iter()
        .rev()
        .find(|o| o.topic == round_topic && !o.payload.is_empty())
        .expect("a round was announced");
    wire::decode(&a.payload).unwrap()
}

/// Both clients answer the open round; it commits.
fn answer(c: &mut Coordinator, a: &RoundAnnounce) {
    for (i, id) in CLIENTS.iter().enumerate() {
        let u = ClientUpdate {
            client_id: id.to_string(),
            round: a.round,
            base_version: a.model_version,
            seq: 0,
            pairs: vec![SeedScalar {
                seed: 100 * a.round + i as u64,
                g: 0.5,
            }],
            samples: 1,
            loss_mean: 1.0,
            loss_m2: 0.0,
        };
        c.on_update(id, &wire::encode(&u), 1);
    }
    assert_eq!(c.version(), a.model_version + 1, "the round commits");
}

fn report(id: &str, a: &RoundAnnounce, correct: u32) -> Vec<u8> {
    wire::encode(&EvalReport {
        client_id: id.into(),
        model_version: a.model_version,
        weights_hash: a.weights_hash,
        examples: 10,
        correct,
        loss_sum: 5.0,
    })
}

#[test]
fn the_export_is_the_best_version_on_dev_not_the_last() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = open(dir.path());
    c.tick(0);
    // Dev accuracy by version: 0 → 0.5, 2 → 0.9 (best), 4 → 0.7.
    let scores = [(0u64, 5u32), (2, 9), (4, 7)];
    let mut best_hash = None;
    for v in 0..6u64 {
        let a = announce(&mut c);
        assert_eq!(a.model_version, v);
        let asks = a
            .task
            .extra
            .iter()
            .any(|(k, e)| k == EVAL_EVERY_KEY && e == "2");
        assert_eq!(asks, v % 2 == 0, "version {v} asks for a dev score: {asks}");
        if let Some(&(_, correct)) = scores.iter().find(|(sv, _)| *sv == v) {
            if v == 2 {
                best_hash = Some(a.weights_hash);
            }
            // Reports may arrive after later commits; a wrong hash or a stranger's topic is ignored.
            let mut forged = a.clone();
            forged.weights_hash.0[0] ^= 1;
            c.on_eval("board-1", &report("board-1", &forged, 10));
            c.on_eval("board-2", &report("board-1", &a, 10));
            answer(&mut c, &a);
            for id in CLIENTS {
                c.on_eval(id, &report(id, &a, correct));
            }
            let dev: Vec<_> = c
                .take_events()
                .into_iter()
                .filter_map(|e| match e {
                    AggEvent::DevEvaluated {
                        version, accuracy, ..
                    } => Some((version, accuracy)),
                    _ => None,
                })
                .collect();
            assert_eq!(dev, vec![(v, f64::from(correct) / 10.0)]);
        } else {
            answer(&mut c, &a);
        }
        c.persist().unwrap();
    }
    assert_eq!(c.best().map(|b| b.model_version), Some(2));
    let (v, w, rec) = export::load_for_export(dir.path(), false).unwrap();
    assert_eq!((v, Some(w.hash())), (2, best_hash));
    assert_eq!(rec.unwrap().dev_accuracy, 0.9);
    let (last, _, rec) = export::load_for_export(dir.path(), true).unwrap();
    assert_eq!((last, rec), (6, None));
}
