//! Crash safety of the aggregator's on-disk state: whatever point of `persist` a kill lands on,
//! the aggregator restarts at the last state it wrote, with weights bit-identical to that version,
//! and replays no contribution twice.

use std::fs;
use std::path::Path;

use fwdllm_aggregator::config::AggregatorConfig;
use fwdllm_aggregator::coordinator::Coordinator;
use fwdllm_aggregator::state::{checkpoint_file_name, LEGACY_CHECKPOINT_FILE, STATE_FILE};
use fwdllm_shared::lora::WeightsHash;
use fwdllm_shared::wire::{self, AgentState, AgentStatus, ClientUpdate, SeedScalar};

const CLIENT: &str = "board-1";
const CHECKPOINT_EVERY: u64 = 2;

fn config(dir: &Path) -> AggregatorConfig {
    let mut cfg = AggregatorConfig::tiny("durability", dir);
    cfg.state.checkpoint_every = CHECKPOINT_EVERY;
    // One update of two pairs fills a round, so every round commits at the cap.
    cfg.round.perturbations_per_client = 2;
    cfg.pacing.max_perturbations = 2;
    cfg.step.lr = 0.5;
    cfg.step.trust_region = 1.0;
    cfg
}

fn open(dir: &Path) -> Coordinator {
    let mut c = Coordinator::open(config(dir)).expect("aggregator state opens");
    let status = AgentStatus::new(CLIENT, AgentState::Online);
    c.on_status(CLIENT, &wire::encode_json(&status), 0);
    c
}

/// Opens a round, answers it with pairs that depend only on the version, persists the commit.
fn commit_once(c: &mut Coordinator) -> WeightsHash {
    let version = c.version();
    c.tick(0);
    let round = c
        .open_round()
        .expect("a round opens for the online client")
        .round;
    let update = ClientUpdate {
        client_id: CLIENT.into(),
        round,
        base_version: version,
        seq: 0,
        pairs: vec![
            SeedScalar {
                seed: 1000 + 2 * version,
                g: 0.25 + version as f32,
            },
            SeedScalar {
                seed: 1001 + 2 * version,
                g: -0.5,
            },
        ],
        samples: 4,
        loss_mean: 1.0,
        loss_m2: 0.0,
    };
    c.on_update(CLIENT, &wire::encode(&update), 1);
    assert_eq!(c.version(), version + 1, "the full round commits");
    c.persist().expect("persist");
    c.weights().hash()
}

/// Commits until the version after the first checkpoint and closes the aggregator; returns
/// the weights hash of that version.
fn commit_past_the_first_checkpoint(mut agg: Coordinator) -> WeightsHash {
    let mut hash = agg.weights().hash();
    while agg.version() < CHECKPOINT_EVERY + 1 {
        hash = commit_once(&mut agg);
    }
    hash
}

/// The aggregator reopened on `dir` resumes at the version after the first checkpoint, with
/// weights `hash`, and only that checkpoint is left on disk.
fn assert_resumes_past_the_first_checkpoint(dir: &Path, hash: WeightsHash) {
    let resumed = open(dir);
    assert_eq!(resumed.version(), CHECKPOINT_EVERY + 1);
    assert_eq!(resumed.weights().hash(), hash);
    assert_eq!(
        checkpoint_files(dir),
        vec![checkpoint_file_name(CHECKPOINT_EVERY)]
    );
}

fn checkpoint_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("checkpoint"))
        .collect();
    names.sort();
    names
}

fn copy_dir(from: &Path, to: &Path, skip: &str) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_name() != skip {
            fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// The kill lands between the checkpoint write and the state write of a checkpoint commit:
/// the new checkpoint is on disk, the state still says the version before it.
#[test]
fn crash_between_checkpoint_and_state_resumes_at_the_written_state() {
    let tmp = tempfile::tempdir().unwrap();
    let live = tmp.path().join("live");
    let crashed = tmp.path().join("crashed");

    let mut agg = open(&live);
    let mut hashes = vec![agg.weights().hash()];
    let before = CHECKPOINT_EVERY - 1;
    while agg.version() < before {
        hashes.push(commit_once(&mut agg));
    }
    // The disk as it is before the checkpoint commit...
    copy_dir(&live, &crashed, "");
    hashes.push(commit_once(&mut agg));
    assert_eq!(agg.version(), CHECKPOINT_EVERY);
    assert_eq!(
        checkpoint_files(&live),
        vec![checkpoint_file_name(CHECKPOINT_EVERY)],
        "a state naming the new checkpoint is on disk, so only that checkpoint is kept"
    );
    // ...plus every file that commit wrote except the state: the crash point.
    copy_dir(&live, &crashed, STATE_FILE);
    assert!(crashed.join(checkpoint_file_name(0)).exists());
    assert!(crashed
        .join(checkpoint_file_name(CHECKPOINT_EVERY))
        .exists());

    let mut resumed = open(&crashed);
    assert_eq!(resumed.version(), before, "resumes at the state on disk");
    assert_eq!(resumed.weights().hash(), hashes[before as usize]);
    // The orphan checkpoint of the lost commit is gone; the one the state names stays.
    assert_eq!(checkpoint_files(&crashed), vec![checkpoint_file_name(0)]);

    // The lost commit was never published (persist precedes sending), so the clients redo it:
    // the same contribution gives the same weights, applied once.
    assert_eq!(commit_once(&mut resumed), hashes[CHECKPOINT_EVERY as usize]);
    assert_eq!(
        checkpoint_files(&crashed),
        vec![checkpoint_file_name(CHECKPOINT_EVERY)]
    );
    let again = open(&crashed);
    assert_eq!(again.version(), CHECKPOINT_EVERY);
    assert_eq!(again.weights().hash(), hashes[CHECKPOINT_EVERY as usize]);
}

/// The kill lands after the state write, before the superseded checkpoint is deleted.
#[test]
fn crash_before_pruning_keeps_the_named_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let agg = open(dir);
    let old = fs::read(dir.join(checkpoint_file_name(0))).unwrap();
    let hash = commit_past_the_first_checkpoint(agg);
    fs::write(dir.join(checkpoint_file_name(0)), old).unwrap();

    assert_resumes_past_the_first_checkpoint(dir, hash);
}

/// A state directory of a build with one `checkpoint.bin` resumes and is rewritten versioned.
#[test]
fn legacy_checkpoint_file_is_migrated() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let hash = commit_past_the_first_checkpoint(open(dir));
    fs::rename(
        dir.join(checkpoint_file_name(CHECKPOINT_EVERY)),
        dir.join(LEGACY_CHECKPOINT_FILE),
    )
    .unwrap();

    assert_resumes_past_the_first_checkpoint(dir, hash);
}

/// A checkpoint that is not the one the state names is refused with an error naming the file.
#[test]
fn checkpoint_of_another_version_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    commit_past_the_first_checkpoint(open(dir));
    // A legacy file of the wrong version, with the right one missing.
    let named = dir.join(checkpoint_file_name(CHECKPOINT_EVERY));
    let mut cp: wire::Checkpoint = wire::decode(&fs::read(&named).unwrap()).unwrap();
    cp.model_version += 1;
    fs::write(dir.join(LEGACY_CHECKPOINT_FILE), wire::encode(&cp)).unwrap();
    fs::remove_file(&named).unwrap();

    let err = Coordinator::open(config(dir)).err().expect("refused");
    let msg = err.to_string();
    assert!(
        msg.contains(LEGACY_CHECKPOINT_FILE) && msg.contains("holds version 3"),
        "{msg}"
    );
}
