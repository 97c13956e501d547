//! Robust aggregation through the coordinator (no broker): honest rounds commit what they
//! committed before, Byzantine clients (scaled, sign-flipped) move the weights a bounded amount,
//! non-finite and out-of-bound updates are rejected and counted by reason without stalling the
//! round, a round whose every update is rejected is abandoned at its deadline like any round
//! without quorum, and the robust step survives a restart mid-round bit for bit.

use std::path::Path;

use fwdllm_aggregator::config::{AggregatorConfig, PacingConfig};
use fwdllm_aggregator::coordinator::{AggEvent, Coordinator, UpdateOutcome};
use fwdllm_aggregator::robust::{zcdp_to_epsilon, NoiseKey};
use fwdllm_shared::perturb::gaussian_approx;
use fwdllm_shared::wire::{self, AgentState, AgentStatus, ClientUpdate, SeedScalar};

const PER_CLIENT: usize = 16;

fn config(dir: &Path, clients: u32) -> AggregatorConfig {
    let mut cfg = AggregatorConfig::tiny("robust", dir);
    cfg.round.perturbations_per_client = PER_CLIENT as u32;
    cfg.round.min_clients = clients;
    cfg.round.quorum = 1;
    cfg.round.deadline_s = 20.0;
    cfg.pacing = PacingConfig {
        max_perturbations: 10_000,
        ..PacingConfig::commit_when_answered()
    };
    cfg.step.lr = 0.1;
    cfg.step.schedule = fwdllm_aggregator::config::Schedule::Constant;
    // No trust region: these tests measure what the pairs alone do to the weights.
    cfg.step.trust_region = 1e9;
    cfg
}

fn ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("board-{i}")).collect()
}

/// Opens a coordinator with `clients` online and round 1 open.
fn open(cfg: AggregatorConfig, clients: &[String]) -> Coordinator {
    let mut c = Coordinator::open(cfg).expect("state opens");
    for id in clients {
        c.on_status(
            id,
            &wire::encode_json(&AgentStatus::new(id.clone(), AgentState::Online)),
            0,
        );
    }
    c.tick(0);
    assert!(c.open_round().is_some(), "a round opens");
    c
}

/// Honest scalars of client `i` in round `round`: N(0.2, 1)-like, distinct seeds.
fn honest_pairs(i: usize, round: u64) -> Vec<SeedScalar> {
    let mut g = vec![0f32; PER_CLIENT];
    gaussian_approx(round * 1000 + i as u64, &mut g);
    g.iter()
        .enumerate()
        .map(|(k, &x)| SeedScalar {
            seed: round << 32 | (i as u64) << 16 | k as u64,
            g: x + 0.2,
        })
        .collect()
}

fn send(c: &mut Coordinator, id: &str, pairs: Vec<SeedScalar>, now: u64) -> UpdateOutcome {
    let open = c.open_round().expect("open round");
    let u = ClientUpdate {
        client_id: id.into(),
        round: open.round,
        base_version: open.base_version,
        seq: 0,
        pairs,
        samples: 8,
        loss_mean: 1.0,
        loss_m2: 0.0,
    };
    c.on_update(id, &wire::encode(&u), now)
}

fn params(c: &Coordinator) -> Vec<f64> {
    c.weights().params().iter().map(|&x| f64::from(x)).collect()
}

fn dist(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// Runs one round where client `i` sends `pairs_of(i)`; returns the weights after the commit.
fn one_round(
    cfg: AggregatorConfig,
    n: usize,
    pairs_of: impl Fn(usize) -> Vec<SeedScalar>,
) -> (Vec<f64>, Coordinator) {
    let clients = ids(n);
    let mut c = open(cfg, &clients);
    for (i, id) in clients.iter().enumerate() {
        let o = send(&mut c, id, pairs_of(i), 1);
        assert!(matches!(o, UpdateOutcome::Accepted { .. }), "{id}: {o:?}");
    }
    assert_eq!(c.version(), 1, "the round committed once everyone answered");
    (params(&c), c)
}

#[test]
fn honest_rounds_commit_the_same_bits_with_and_without_robust_aggregation() {
    let tmp = tempfile::tempdir().unwrap();
    for round in 1..=5u64 {
        let on = config(&tmp.path().join(format!("on-{round}")), 4);
        let mut off = config(&tmp.path().join(format!("off-{round}")), 4);
        off.robust.clip_sigmas = 0.0;
        off.robust.client_rms_sigmas = 0.0;
        let pairs = |i| honest_pairs(i, round);
        let (with, c) = one_round(on, 4, pairs);
        let (without, _) = one_round(off, 4, pairs);
        assert_eq!(with, without, "round {round}");
        assert_eq!(c.robust_counters().clipped_pairs, 0);
        assert_eq!(c.robust_counters().capped_clients, 0);
    }
}

#[test]
fn scaled_and_sign_flipped_clients_move_the_weights_a_bounded_amount() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = |name: &str| tmp.path().join(name);
    // Reference: the 4 honest clients alone.
    let (honest, _) = one_round(config(&dir("honest"), 4), 4, |i| honest_pairs(i, 1));
    let initial = params(&Coordinator::open(config(&dir("init"), 1)).unwrap());
    let honest_step = dist(&honest, &initial);
    assert!(honest_step > 0.0);
    for (name, scale) in [
        ("x1000", 1000.0f32),
        ("flip-x1000", -1000.0),
        ("flip", -1.0),
    ] {
        // 20 % Byzantine: client 4 of 5 sends its honest scalars times `scale`.
        let attack = |i: usize| {
            let mut p = honest_pairs(i, 1);
            if i == 4 {
                for x in &mut p {
                    x.g *= scale;
                }
            }
            p
        };
        let (robust, c) = one_round(config(&dir(&format!("r-{name}")), 5), 5, attack);
        let mut unprotected_cfg = config(&dir(&format!("u-{name}")), 5);
        unprotected_cfg.robust.clip_sigmas = 0.0;
        unprotected_cfg.robust.client_rms_sigmas = 0.0;
        let (unprotected, _) = one_round(unprotected_cfg, 5, attack);
        let robust_dev = dist(&robust, &honest) / honest_step;
        let unprotected_dev = dist(&unprotected, &honest) / honest_step;
        // The attacker's pull is at most a few honest steps whatever its scale...
        assert!(
            robust_dev < 3.0,
            "{name}: robust deviation {robust_dev:.2} honest steps"
        );
        if scale.abs() > 1.0 {
            // ...where unprotected it is proportional to the scale.
            assert!(
                unprotected_dev > 100.0,
                "{name}: unprotected deviation {unprotected_dev:.2}"
            );
            assert_eq!(c.robust_counters().capped_clients, 1, "{name}");
        }
    }
}

#[test]
fn non_finite_and_out_of_bound_updates_are_rejected_by_reason_and_the_round_goes_on() {
    let tmp = tempfile::tempdir().unwrap();
    let clients = ids(2);
    let mut c = open(config(tmp.path(), 2), &clients);
    let cases = [
        (f32::NAN, "non_finite"),
        (f32::INFINITY, "non_finite"),
        (-1e30, "out_of_bound"),
        (2e4, "out_of_bound"),
    ];
    for (round, (bad, reason)) in cases.iter().enumerate() {
        let round = round as u64 + 1;
        let mut pairs = honest_pairs(0, round);
        pairs[3].g = *bad;
        let o = send(&mut c, &clients[0], pairs, round);
        assert!(matches!(o, UpdateOutcome::Rejected(_)), "{bad}: {o:?}");
        assert_eq!(c.version(), round - 1, "nothing committed yet");
        // The honest client answers: the round commits at once, without waiting for the
        // refused client until the deadline.
        let o = send(&mut c, &clients[1], honest_pairs(1, round), round);
        assert!(matches!(o, UpdateOutcome::Accepted { pairs: 16 }), "{o:?}");
        assert_eq!(c.version(), round, "round {round} committed");
        let n = c.robust_counters().rejected_by_reason[*reason];
        assert!(n >= 1, "{reason} counted");
    }
    let r = &c.robust_counters().rejected_by_reason;
    assert_eq!((r["non_finite"], r["out_of_bound"]), (2, 2));
    // A flood of pairs is refused too.
    let flood: Vec<SeedScalar> = (0..1000).map(|k| SeedScalar { seed: k, g: 0.1 }).collect();
    assert!(matches!(
        send(&mut c, &clients[0], flood, 9),
        UpdateOutcome::Rejected(_)
    ));
    assert_eq!(c.robust_counters().rejected_by_reason["too_many_pairs"], 1);
    // The metrics record of every commit carries the per-reason counts.
    let records = c.take_records();
    let last = records.last().unwrap();
    assert_eq!(last.rejected_by_reason["non_finite"], 2);
    assert_eq!(last.rejected, 4);
}

#[test]
fn a_round_whose_every_update_is_rejected_is_abandoned_and_the_next_one_opens() {
    let tmp = tempfile::tempdir().unwrap();
    let clients = ids(1);
    let mut c = open(config(tmp.path(), 1), &clients);
    c.take_events();
    let mut pairs = honest_pairs(0, 1);
    pairs[0].g = f32::NAN;
    assert!(matches!(
        send(&mut c, &clients[0], pairs, 1),
        UpdateOutcome::Rejected(_)
    ));
    assert_eq!(c.version(), 0);
    assert!(c.open_round().is_some(), "the round waits for its deadline");
    let deadline = c.next_deadline_ms().unwrap();
    c.tick(deadline);
    let events = c.take_events();
    assert!(
        events.contains(&AggEvent::Abandoned { round: 1 }),
        "{events:?}"
    );
    assert_eq!(c.counters().abandoned_rounds, 1);
    // The next tick opens a new round, as after any abandoned round.
    c.tick(deadline + 1);
    assert!(c
        .take_events()
        .iter()
        .any(|e| matches!(e, AggEvent::RoundOpened { round: 2, .. })));
    // And the next round works.
    send(&mut c, &clients[0], honest_pairs(0, 2), deadline + 2);
    assert_eq!(c.version(), 1);
}

#[test]
fn a_restart_mid_round_commits_the_same_robust_step() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let clients = ids(5);
    let attack = |i: usize| {
        let mut p = honest_pairs(i, 1);
        if i == 4 {
            p.iter_mut().for_each(|x| x.g *= 300.0);
        }
        p
    };
    let mut live = open(config(&a, 5), &clients);
    for (i, id) in clients.iter().enumerate().skip(1).rev() {
        send(&mut live, id, attack(i), 1);
    }
    live.persist().unwrap();
    // The disk now holds the open round with the attacker's raw pairs: a kill here...
    std::fs::create_dir_all(&b).unwrap();
    for e in std::fs::read_dir(&a).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), b.join(e.file_name())).unwrap();
    }
    send(&mut live, &clients[0], attack(0), 2);
    assert_eq!(live.version(), 1);
    // ...and the restarted aggregator, given the last answer, commits the same bits.
    let mut resumed = Coordinator::open(config(&b, 5)).unwrap();
    for id in &clients {
        resumed.on_status(
            id,
            &wire::encode_json(&AgentStatus::new(id.clone(), AgentState::Online)),
            2,
        );
    }
    send(&mut resumed, &clients[0], attack(0), 2);
    assert_eq!(resumed.version(), 1);
    assert_eq!(resumed.weights().hash(), live.weights().hash());
    assert_eq!(resumed.robust_counters(), live.robust_counters());
    assert_eq!(live.robust_counters().capped_clients, 1);
}

#[test]
fn dp_noise_is_reported_as_epsilon_and_replays() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = config(tmp.path(), 2);
    cfg.dp.enabled = true;
    cfg.dp.clip = 2.0;
    cfg.dp.noise_multiplier = 4.0;
    cfg.dp.delta = 1e-5;
    let clients = ids(2);
    let mut c = open(cfg.clone(), &clients);
    c.set_noise_key(NoiseKey::fixed([3; 32]));
    for round in 1..=3u64 {
        for (i, id) in clients.iter().enumerate() {
            send(&mut c, id, honest_pairs(i, round), round);
        }
        assert_eq!(c.version(), round);
    }
    let rho = 3.0 / (2.0 * 16.0);
    let records = c.take_records();
    let last = records.last().unwrap();
    assert_eq!(last.dp_commits, 3);
    assert_eq!(last.dp_delta, Some(1e-5));
    let eps = last.dp_epsilon.unwrap();
    assert!((eps - zcdp_to_epsilon(rho, 1e-5)).abs() < 1e-12, "{eps}");
    // Replicas replay the committed (noised) coefficients: reopening from disk verifies every
    // logged commit's hash and arrives at the same weights.
    c.persist().unwrap();
    let hash = c.weights().hash();
    drop(c);
    let reopened = Coordinator::open(cfg).unwrap();
    assert_eq!(reopened.weights().hash(), hash);
    assert_eq!(reopened.robust_counters().dp_commits, 3);
}
