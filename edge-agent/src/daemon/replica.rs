//! The agent's replica of the global LoRA weights: commit replay, checkpoint catch-up and the
//! decision of what is missing to reach an announced version. Pure (no I/O), so it is unit-tested
//! against a reference replica.

use std::collections::BTreeMap;

use fwdllm_shared::lora::{LoraWeights, WeightsHash};
use fwdllm_shared::update::SeedCoeff;
use fwdllm_shared::wire::{Checkpoint, CommitStep, RoundCommit};

/// Commits kept that are not yet applicable (ahead of the replica). Bounded so a flood of
/// retained log entries cannot grow memory without limit.
const MAX_BUFFERED: usize = 4096;

/// What [`Replica::sync_to`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum Sync {
    /// The weights are at the wanted version with the wanted hash.
    Ready,
    /// The commits between the replica and the wanted version have not arrived (yet); a checkpoint
    /// would help when the log no longer holds them.
    MissingCommits { have: u64, want: u64 },
    /// The replica cannot reach the wanted state by replay (no weights yet, ahead of it, or a hash
    /// mismatch): it needs a checkpoint.
    NeedCheckpoint(&'static str),
}

/// Replica state: weights (once known), their version, and commits received ahead of time.
#[derive(Debug, Default)]
pub struct Replica {
    weights: Option<LoraWeights>,
    version: u64,
    /// Cached hash of `weights` (hashing is a full pass over the params).
    hash: Option<WeightsHash>,
    /// Commits by base_version.
    pending: BTreeMap<u64, RoundCommit>,
    /// Set when a replayed commit produced a different hash than the aggregator's.
    diverged: bool,
    /// The step of the commit that produced the current version (discriminative sampling
    /// aligns new directions with it); `None` after a checkpoint until the next commit.
    last_step: Option<LastStep>,
}

/// What the replica keeps of the last commit to rebuild its direction.
#[derive(Debug, Clone)]
enum LastStep {
    Pairs(Vec<SeedCoeff>),
    /// Trainable values after minus before (a dense commit carries no pairs).
    Delta(Vec<f32>),
}

impl Replica {
    /// A replica starting from known weights (e.g. restored from disk).
    pub fn with_weights(weights: LoraWeights, version: u64) -> Replica {
        let hash = Some(weights.hash());
        Replica {
            weights: Some(weights),
            version,
            hash,
            ..Replica::default()
        }
    }

    pub fn weights(&self) -> Option<&LoraWeights> {
        self.weights.as_ref()
    }
    pub fn version(&self) -> u64 {
        self.version
    }
    pub fn hash(&self) -> Option<WeightsHash> {
        self.hash
    }
    /// The step of the commit that produced the current version over the trainable values
    /// (`Σ coeff·v(seed)` of its pairs, or the change a dense commit made), if replayed.
    pub fn last_step_direction(&self) -> Option<Vec<f32>> {
        let layout = self.weights.as_ref()?.layout();
        match self.last_step.as_ref()? {
            LastStep::Pairs(pairs) => {
                let mut d = vec![0f32; layout.trainable_len()];
                for p in pairs {
                    fwdllm_shared::update::accumulate_direction(layout, p.seed, p.coeff, &mut d);
                }
                Some(d)
            }
            LastStep::Delta(d) => Some(d.clone()),
        }
    }
    /// True after a replayed commit's hash disagreed with the aggregator's (needs a checkpoint).
    pub fn diverged(&self) -> bool {
        self.diverged
    }

    /// Takes a commit: buffers it, then applies every commit that now chains on. Returns the
    /// number applied. Commits at or below the current version are ignored (duplicates,
    /// retained log entries already replayed).
    pub fn on_commit(&mut self, commit: RoundCommit) -> usize {
        if commit.new_version <= self.version && self.weights.is_some() {
            return 0;
        }
        if commit.new_version != commit.base_version + 1 {
            log::warn!(
                "ignoring commit of round {}: base_version {} -> new_version {} is not one step",
                commit.round,
                commit.base_version,
                commit.new_version
            );
            return 0;
        }
        if self.pending.len() >= MAX_BUFFERED {
            // Keep the ones closest to us; the far future will be re-sent as retained log entries
            // or covered by a checkpoint.
            let last = *self.pending.keys().next_back().expect("non-empty");
            self.pending.remove(&last);
        }
        self.pending.insert(commit.base_version, commit);
        self.advance()
    }

    /// Applies buffered commits that chain on the current version; stops at a hash mismatch.
    fn advance(&mut self) -> usize {
        let mut applied = 0;
        let Some(weights) = self.weights.as_mut() else {
            return 0;
        };
        if self.diverged {
            return 0;
        }
        // Drop what is behind us.
        self.pending = self.pending.split_off(&self.version);
        while let Some(c) = self.pending.remove(&self.version) {
            // Taken before the step: a dense commit's direction is its values minus these.
            let step = match &c.step {
                CommitStep::Pairs(p) => LastStep::Pairs(p.clone()),
                CommitStep::Dense(after) => LastStep::Delta(
                    after
                        .iter()
                        .zip(weights.trainable_values())
                        .map(|(a, b)| a - b)
                        .collect(),
                ),
            };
            if let Err(e) = c.step.apply(weights) {
                log::warn!(
                    "commit of round {} to version {} does not apply ({e}); will fetch a checkpoint",
                    c.round,
                    c.new_version
                );
                self.diverged = true;
                break;
            }
            self.version = c.new_version;
            self.last_step = Some(step);
            let hash = weights.hash();
            self.hash = Some(hash);
            applied += 1;
            if hash != c.weights_hash {
                log::warn!(
                    "replay of round {} to version {} gave hash {hash}, aggregator says {}; will fetch a checkpoint",
                    c.round,
                    c.new_version,
                    c.weights_hash
                );
                self.diverged = true;
                break;
            }
            log::debug!(
                "replayed commit of round {} -> version {} ({})",
                c.round,
                c.new_version,
                c.step.describe()
            );
        }
        applied
    }

    /// Takes a checkpoint when it helps: when the replica has no weights, has diverged, or is
    /// behind the checkpoint. Returns `Ok(Some(n))` when it was adopted and `n` buffered commits
    /// were then replayed on top, `Ok(None)` when it was not needed. A checkpoint whose parameters
    /// do not match its hash is rejected and changes nothing.
    pub fn on_checkpoint(
        &mut self,
        cp: &Checkpoint,
    ) -> Result<Option<usize>, fwdllm_shared::wire::CheckpointError> {
        let useful = self.weights.is_none() || self.diverged || cp.model_version > self.version;
        if !useful {
            return Ok(None);
        }
        let weights = cp.to_weights()?;
        if let Some(old) = &self.weights {
            if old.layout() != weights.layout() {
                log::info!(
                    "checkpoint changes the LoRA layout ({} -> {} params)",
                    old.params().len(),
                    weights.params().len()
                );
            }
        }
        self.hash = Some(cp.weights_hash);
        self.weights = Some(weights);
        self.version = cp.model_version;
        self.diverged = false;
        self.last_step = None;
        Ok(Some(self.advance()))
    }

    /// Brings the replica to `version` with hash `hash` from buffered commits, or says what is
    /// missing.
    pub fn sync_to(&mut self, version: u64, hash: &WeightsHash) -> Sync {
        if self.weights.is_none() {
            return Sync::NeedCheckpoint("no weights yet");
        }
        if self.diverged {
            return Sync::NeedCheckpoint("replay diverged");
        }
        self.advance();
        if self.diverged {
            return Sync::NeedCheckpoint("replay diverged");
        }
        match self.version.cmp(&version) {
            std::cmp::Ordering::Greater => {
                // Another history (e.g. the aggregator's state restored from a backup): only a
                // checkpoint, even one older than this replica, leads back to the announced one.
                self.diverged = true;
                Sync::NeedCheckpoint("replica is ahead of the announcement")
            }
            std::cmp::Ordering::Less => Sync::MissingCommits {
                have: self.version,
                want: version,
            },
            std::cmp::Ordering::Equal if self.hash.as_ref() != Some(hash) => {
                self.diverged = true;
                Sync::NeedCheckpoint("hash differs at the announced version")
            }
            std::cmp::Ordering::Equal => Sync::Ready,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fwdllm_shared::lora::{LoraConfig, LoraLayout};

    fn init() -> LoraWeights {
        let shape = fwdllm_shared::fixtures::small_llama(2, 16, 2, 1);
        LoraWeights::init(LoraLayout::new(&shape, &LoraConfig::default()).unwrap())
    }

    /// A reference chain of `n` commits from `init()`: (commits, weights after each).
    fn chain(n: u64) -> (Vec<RoundCommit>, Vec<LoraWeights>) {
        let mut w = init();
        let (mut commits, mut states) = (Vec::new(), vec![w.clone()]);
        for v in 0..n {
            let pairs: Vec<_> = (0..3)
                .map(|k| SeedCoeff {
                    seed: v * 100 + k,
                    coeff: 1e-3 * (k as f32 + 1.0),
                })
                .collect();
            fwdllm_shared::update::apply_commit(&mut w, &pairs);
            // Odd versions travel dense, as the aggregator sends small layouts' commits.
            let step = if v % 2 == 1 {
                CommitStep::Dense(w.trainable_values().collect())
            } else {
                CommitStep::Pairs(pairs)
            };
            commits.push(RoundCommit {
                round: v + 10,
                base_version: v,
                new_version: v + 1,
                step,
                weights_hash: w.hash(),
            });
            states.push(w.clone());
        }
        (commits, states)
    }

    #[test]
    fn replay_in_any_arrival_order_matches_the_reference() {
        let (commits, states) = chain(5);
        let mut r = Replica::with_weights(init(), 0);
        // Out of order, with a duplicate.
        for i in [2usize, 0, 4, 1, 0, 3] {
            r.on_commit(commits[i].clone());
        }
        assert_eq!(r.version(), 5);
        assert_eq!(r.hash(), Some(states[5].hash()));
        assert_eq!(r.weights().unwrap().params(), states[5].params());
        assert_eq!(r.sync_to(5, &states[5].hash()), Sync::Ready);
    }

    #[test]
    fn missing_commit_is_reported_then_filled() {
        let (commits, states) = chain(3);
        let mut r = Replica::with_weights(init(), 0);
        r.on_commit(commits[1].clone());
        r.on_commit(commits[2].clone());
        assert_eq!(
            r.sync_to(3, &states[3].hash()),
            Sync::MissingCommits { have: 0, want: 3 }
        );
        r.on_commit(commits[0].clone());
        assert_eq!(r.sync_to(3, &states[3].hash()), Sync::Ready);
    }

    #[test]
    fn checkpoint_catch_up_then_replay_of_later_commits() {
        let (commits, states) = chain(6);
        let mut r = Replica::default();
        assert_eq!(
            r.sync_to(6, &states[6].hash()),
            Sync::NeedCheckpoint("no weights yet")
        );
        // Log entries after the checkpoint arrive first; the ones it covers are ignored.
        for c in &commits[2..] {
            r.on_commit(c.clone());
        }
        let cp = Checkpoint::from_weights(4, &states[4]);
        assert_eq!(r.on_checkpoint(&cp).unwrap(), Some(2));
        assert_eq!(r.version(), 6);
        assert_eq!(r.sync_to(6, &states[6].hash()), Sync::Ready);
        // An older checkpoint is not needed any more.
        let old = Checkpoint::from_weights(4, &states[4]);
        assert_eq!(r.on_checkpoint(&old).unwrap(), None);
    }

    #[test]
    fn hash_mismatch_needs_a_checkpoint_and_the_checkpoint_repairs_it() {
        let (mut commits, states) = chain(2);
        commits[1].weights_hash = WeightsHash([7; 32]);
        let mut r = Replica::with_weights(init(), 0);
        r.on_commit(commits[0].clone());
        r.on_commit(commits[1].clone());
        assert!(r.diverged());
        assert!(matches!(
            r.sync_to(2, &states[2].hash()),
            Sync::NeedCheckpoint(_)
        ));
        let cp = Checkpoint::from_weights(2, &states[2]);
        assert_eq!(r.on_checkpoint(&cp).unwrap(), Some(0));
        assert_eq!(r.sync_to(2, &states[2].hash()), Sync::Ready);
    }

    #[test]
    fn a_dense_commit_for_another_layout_is_refused_and_repaired_by_a_checkpoint() {
        let (mut commits, states) = chain(2);
        commits[1].step = CommitStep::Dense(vec![0.0; 3]);
        let mut r = Replica::with_weights(init(), 0);
        r.on_commit(commits[0].clone());
        r.on_commit(commits[1].clone());
        assert!(r.diverged());
        assert_eq!(r.version(), 1);
        assert_eq!(r.weights().unwrap().params(), states[1].params());
        let cp = Checkpoint::from_weights(2, &states[2]);
        assert_eq!(r.on_checkpoint(&cp).unwrap(), Some(0));
        assert_eq!(r.sync_to(2, &states[2].hash()), Sync::Ready);
    }

    #[test]
    fn the_last_step_direction_is_the_change_either_form_made() {
        let (commits, states) = chain(2);
        let mut r = Replica::with_weights(init(), 0);
        let change = |v: usize| -> Vec<f32> {
            let before: Vec<f32> = states[v - 1].trainable_values().collect();
            states[v]
                .trainable_values()
                .zip(before)
                .map(|(a, b)| a - b)
                .collect()
        };
        for v in 1..=2 {
            r.on_commit(commits[v - 1].clone());
            let got = r.last_step_direction().unwrap();
            // Pairs (v = 1) rebuild Σ coeff·v(seed), equal to the change up to rounding;
            // the dense commit (v = 2) is the change itself.
            for (g, c) in got.iter().zip(change(v)) {
                assert!(
                    (g - c).abs() <= 1e-6 * c.abs().max(1e-3),
                    "v {v}: {g} vs {c}"
                );
            }
        }
    }

    #[test]
    fn corrupt_checkpoint_is_rejected_and_changes_nothing() {
        let (_, states) = chain(1);
        let mut cp = Checkpoint::from_weights(1, &states[1]);
        cp.params[0] += 1.0;
        let mut r = Replica::with_weights(init(), 0);
        assert!(r.on_checkpoint(&cp).is_err());
        assert_eq!(r.version(), 0);
        assert_eq!(r.hash(), Some(states[0].hash()));
    }

    #[test]
    fn ahead_or_different_hash_needs_a_checkpoint() {
        let (commits, states) = chain(2);
        let mut r = Replica::with_weights(init(), 0);
        r.on_commit(commits[0].clone());
        r.on_commit(commits[1].clone());
        assert!(matches!(
            r.sync_to(1, &states[1].hash()),
            Sync::NeedCheckpoint(_)
        ));
        // A checkpoint older than the replica brings it back to the announced history.
        let cp = Checkpoint::from_weights(0, &states[0]);
        assert_eq!(r.on_checkpoint(&cp).unwrap(), Some(0));
        r.on_commit(commits[0].clone());
        assert_eq!(r.sync_to(1, &states[1].hash()), Sync::Ready);
        let mut r = Replica::with_weights(init(), 0);
        assert!(matches!(
            r.sync_to(0, &WeightsHash([1; 32])),
            Sync::NeedCheckpoint(_)
        ));
    }
}
