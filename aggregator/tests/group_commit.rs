//! Durable group commit through the state layer: updates are journaled and made durable in
//! groups (one fsync per [`Coordinator::persist`]), acknowledged only after that, and a kill at
//! any point — between accepting an update and flushing its group, inside an append, or between
//! a state snapshot and the fresh journal after it — neither loses nor doubles an acknowledged
//! contribution. A "kill" drops the coordinator without persisting; the broker then redelivers
//! what was never acknowledged (and may redeliver acknowledged updates too: they must count once).

use std::fs;
use std::path::Path;

use fwdllm_aggregator::config::AggregatorConfig;
use fwdllm_aggregator::coordinator::{Coordinator, UpdateOutcome};
use fwdllm_aggregator::journal::JOURNAL_FILE;
use fwdllm_aggregator::state::STATE_FILE;
use fwdllm_shared::lora::WeightsHash;
use fwdllm_shared::wire::{self, AgentState, AgentStatus, ClientUpdate, SeedScalar};

const CLIENTS: usize = 5;
const PAIRS: u32 = 2;

fn config(dir: &Path) -> AggregatorConfig {
    let mut cfg = AggregatorConfig::default();
    cfg.job.name = "group-commit".into();
    cfg.model.preset = "tiny".into();
    cfg.state.dir = dir.to_path_buf();
    cfg.round.min_clients = CLIENTS as u32;
    cfg.round.perturbations_per_client = PAIRS;
    // The round commits at the cap, once every client has answered.
    cfg.pacing.max_perturbations = CLIENTS as u32 * PAIRS;
    cfg.pacing.min_perturbations = cfg.pacing.max_perturbations;
    cfg.pacing.max_extends = 0;
    cfg.step.lr = 0.5;
    cfg.step.trust_region = 1.0;
    cfg
}

fn client(i: usize) -> String {
    format!("board-{i}")
}

/// Opens the state in `dir` with every client online (statuses are not durable: a restarted
/// aggregator learns them again from the broker's retained messages). The last client's status
/// comes first: a resumed round whose only known clients have all answered closes at once (the
/// aggregator cannot wait for clients it has not heard of), and these tests want it to wait.
fn open(dir: &Path) -> Coordinator {
    let mut c = Coordinator::open(config(dir)).expect("state opens");
    for i in (0..CLIENTS).rev() {
        let s = AgentStatus::new(client(i), AgentState::Online);
        c.on_status(&client(i), &wire::encode_json(&s), 0);
    }
    // The round these statuses opened is made durable before anything is answered (the
    // driver persists after each group, and the announcement leaves only after that).
    c.persist().unwrap();
    c
}

/// Client `i`'s answer to round 1 at version 0.
fn update(i: usize) -> Vec<u8> {
    let pairs = (0..PAIRS)
        .map(|k| SeedScalar {
            seed: 1000 + 10 * i as u64 + u64::from(k),
            g: 0.5 + i as f32 - k as f32 * 0.75,
        })
        .collect();
    wire::encode(&ClientUpdate {
        client_id: client(i),
        round: 1,
        base_version: 0,
        seq: 0,
        pairs,
        samples: 4,
        loss_mean: 1.0 + i as f32,
        loss_m2: 0.0,
    })
}

fn feed(c: &mut Coordinator, i: usize) -> UpdateOutcome {
    c.on_update(&client(i), &update(i), 1)
}

/// The weights after every client's update was counted once, with no crash.
fn reference() -> WeightsHash {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = open(tmp.path());
    for i in 0..CLIENTS {
        assert!(matches!(
            feed(&mut c, i),
            UpdateOutcome::Accepted { pairs: 2 }
        ));
    }
    c.persist().unwrap();
    assert_eq!(c.version(), 1);
    c.weights().hash()
}

fn answered(c: &Coordinator) -> Vec<String> {
    c.open_round()
        .map(|o| o.answered.iter().map(|(id, _)| id.clone()).collect())
        .unwrap_or_default()
}

#[test]
fn one_fsync_makes_a_whole_group_durable() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = open(tmp.path());
    let before = c.durable_writes();
    for i in 0..CLIENTS - 1 {
        feed(&mut c, i);
    }
    c.persist().unwrap();
    let after = c.durable_writes();
    assert_eq!(after.journal_appends - before.journal_appends, 1);
    assert_eq!(after.journaled_updates - before.journaled_updates, 4);
    assert_eq!(
        after.snapshots, before.snapshots,
        "no round event, no snapshot"
    );
    // Nothing new: no write at all.
    c.persist().unwrap();
    assert_eq!(c.durable_writes(), after);
}

#[test]
fn a_kill_between_accept_and_flush_loses_only_what_was_never_acknowledged() {
    let want = reference();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut c = open(dir);
    // Group 1: two updates and a junk message, durable, hence acknowledged.
    feed(&mut c, 0);
    feed(&mut c, 1);
    c.on_update(&client(2), b"\x00junk", 1);
    c.persist().unwrap();
    let acked_counters = c.counters();
    let acked_rejections = c.robust_counters().rejected_by_reason.clone();
    // Group 2: accepted in memory, then the kill before its flush.
    assert!(matches!(feed(&mut c, 2), UpdateOutcome::Accepted { .. }));
    assert!(matches!(feed(&mut c, 3), UpdateOutcome::Accepted { .. }));
    drop(c);

    let mut c = open(dir);
    assert_eq!(
        answered(&c),
        [client(0), client(1)],
        "exactly the durable group"
    );
    assert_eq!(c.open_round().unwrap().pairs.len(), 4);
    assert_eq!(c.counters(), acked_counters);
    assert_eq!(c.robust_counters().rejected_by_reason, acked_rejections);
    // The broker redelivers the unacknowledged updates — and, say, an acknowledged one whose
    // PUBACK was lost in the kill: it counts once.
    assert_eq!(feed(&mut c, 1), UpdateOutcome::Duplicate);
    for i in 2..CLIENTS {
        assert!(matches!(
            feed(&mut c, i),
            UpdateOutcome::Accepted { pairs: 2 }
        ));
    }
    c.persist().unwrap();
    assert_eq!(c.version(), 1);
    assert_eq!(
        c.weights().hash(),
        want,
        "the same commit as without the kill"
    );
    assert_eq!(c.counters().updates, CLIENTS as u64);
}

#[test]
fn a_torn_group_is_dropped_and_redelivered() {
    let want = reference();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut c = open(dir);
    feed(&mut c, 0);
    c.persist().unwrap();
    let durable = fs::metadata(dir.join(JOURNAL_FILE)).unwrap().len();
    feed(&mut c, 1);
    feed(&mut c, 2);
    c.persist().unwrap();
    drop(c);
    // The kill fell inside the second append: every prefix of it is a possible disk.
    let full = fs::read(dir.join(JOURNAL_FILE)).unwrap();
    for cut in durable as usize..full.len() {
        let copy = tempfile::tempdir().unwrap();
        for e in fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            fs::copy(e.path(), copy.path().join(e.file_name())).unwrap();
        }
        fs::write(copy.path().join(JOURNAL_FILE), &full[..cut]).unwrap();
        let mut c = open(copy.path());
        let got = answered(&c);
        assert!(
            got == [client(0)] || got == [client(0), client(1)],
            "cut at {cut}: {got:?}"
        );
        for i in 1..CLIENTS {
            feed(&mut c, i);
        }
        c.persist().unwrap();
        assert_eq!(c.weights().hash(), want, "cut at {cut}");
        assert_eq!(c.counters().updates, CLIENTS as u64, "cut at {cut}");
    }
}

#[test]
fn a_kill_between_the_snapshot_and_the_fresh_journal_counts_nothing_twice() {
    let want = reference();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut c = open(dir);
    feed(&mut c, 0);
    feed(&mut c, 1);
    c.persist().unwrap();
    for i in 2..CLIENTS {
        feed(&mut c, i);
    }
    assert_eq!(c.version(), 1, "the round committed in memory");
    // The journal of the round as it was before the snapshot...
    let old_journal = fs::read(dir.join(JOURNAL_FILE)).unwrap();
    c.persist().unwrap();
    drop(c);
    // ...next to the new state.bin: the crash fell right after the snapshot's rename.
    fs::write(dir.join(JOURNAL_FILE), &old_journal).unwrap();
    assert!(dir.join(STATE_FILE).exists());
    let c = open(dir);
    assert_eq!(c.version(), 1);
    assert_eq!(c.weights().hash(), want);
    assert_eq!(
        c.counters().updates,
        CLIENTS as u64,
        "the stale journal is not replayed"
    );
}

#[test]
fn a_round_announced_to_all_admits_late_clients_and_replay_admits_the_same() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let open_all = |dir: &Path| {
        let mut cfg = config(dir);
        // Above this many selected clients the announcement says `all` instead of listing them.
        cfg.round.selection_list_max = 2;
        let mut c = Coordinator::open(cfg).unwrap();
        for i in (0..CLIENTS).rev() {
            let s = AgentStatus::new(client(i), AgentState::Online);
            c.on_status(&client(i), &wire::encode_json(&s), 0);
        }
        c.persist().unwrap();
        c
    };
    let mut c = open_all(dir);
    let open = c.open_round().unwrap();
    assert_eq!(open.announce.selection, wire::ClientSelection::All);
    assert_eq!(open.selected.len(), CLIENTS);
    // A client the aggregator has no status of answers the `all` round: admitted.
    let late = "board-late";
    let u = ClientUpdate {
        client_id: late.into(),
        round: 1,
        base_version: 0,
        seq: 0,
        pairs: vec![SeedScalar { seed: 7, g: 0.25 }],
        samples: 1,
        loss_mean: 1.0,
        loss_m2: 0.0,
    };
    assert_eq!(
        c.on_update(late, &wire::encode(&u), 1),
        UpdateOutcome::Accepted { pairs: 1 }
    );
    assert_eq!(
        c.on_update(late, &wire::encode(&u), 1),
        UpdateOutcome::Duplicate
    );
    feed(&mut c, 0);
    c.persist().unwrap();
    let before = c.open_round().unwrap().clone();
    assert_eq!(before.selected.len(), CLIENTS + 1);
    drop(c);
    // Replayed from the journal (statuses are not known yet at replay): the same admission.
    let c = open_all(dir);
    assert_eq!(c.open_round().unwrap(), &before);
}

#[test]
fn an_all_announcement_goes_out_at_qos_0_and_a_listed_one_at_qos_1() {
    let round_qos = |list_max: u32| {
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = config(tmp.path());
        cfg.round.selection_list_max = list_max;
        let mut c = Coordinator::open(cfg).unwrap();
        for i in 0..CLIENTS {
            let s = AgentStatus::new(client(i), AgentState::Online);
            c.on_status(&client(i), &wire::encode_json(&s), 0);
        }
        let topic = c.topics().round();
        let announced: Vec<(bool, u8)> = c
            .take_outgoing()
            .into_iter()
            .filter(|o| o.topic == topic && !o.payload.is_empty())
            .map(|o| (o.retain, o.qos))
            .collect();
        // Republished after a reconnect: the same QoS.
        c.republish_retained(1);
        let republished: Vec<(bool, u8)> = c
            .take_outgoing()
            .into_iter()
            .filter(|o| o.topic == topic)
            .map(|o| (o.retain, o.qos))
            .collect();
        assert_eq!(announced, republished);
        announced
    };
    assert_eq!(round_qos(2), [(true, 0)], "all");
    assert_eq!(round_qos(256), [(true, 1)], "listed");
}
