//! Durable aggregator state: what must survive a crash so that the aggregator resumes the round
//! it was in with no lost or double-applied contribution.
//!
//! Files in `state.dir`, each written atomically (write `*.tmp`, fsync, rename, fsync dir):
//! * `checkpoint-<version>.bin` — full checkpoints (a wire [`Checkpoint`], hash-verified on load),
//!   named by the version they hold;
//! * `state.bin` — postcard [`DurableState`]: version, round counter, which checkpoint it builds
//!   on, the commit log since that checkpoint, the open round (its pooled pairs and the
//!   (client, seq) keys already counted), counters.
//!
//! * `journal.bin` — the updates received since `state.bin` was written, appended in groups,
//!   one `fdatasync` per group ([`crate::journal`]); replayed on top of `state.bin` at start.
//!
//! `state.bin` is the commit point of round events; the journal, of updates. A new checkpoint is written under its own name before the
//! state that refers to it, and older checkpoints are deleted only after that state is on disk, so
//! a crash at any point leaves the checkpoint the on-disk state names. Weights on load = that
//! checkpoint + replay of the logged commits, each verified against its recorded hash.

use std::fs;
use std::path::{Path, PathBuf};

use fwdllm_shared::lora::{LoraConfig, LoraWeights, ModelShape, WeightsHash};
use fwdllm_shared::wire::{self, Checkpoint, RoundAnnounce, RoundCommit, SeedScalar};
use serde::{Deserialize, Serialize};
use thiserror::Error;

mod legacy;

/// Bumped on incompatible changes of [`DurableState`]. 2: the open round records who sent
/// each pair and whose answers were refused, plus the robust/DP counters. 3: logged commits
/// carry a `CommitStep` (pairs or dense values). Formats 1 and 2 are still read
/// (`state::legacy`).
pub const STATE_FORMAT: u32 = 3;

#[derive(Debug, Error)]
pub enum StateError {
    #[error("state I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state file {path} is corrupt ({message}); restore it from a backup or start with an empty state.dir")]
    Corrupt { path: PathBuf, message: String },
    #[error("state in {dir} belongs to a different job or layout ({message}); point state.dir at a fresh directory or restore the matching config")]
    Mismatch { dir: PathBuf, message: String },
    #[error("replaying logged commit to version {version}: hash {actual} != recorded {expected}; state is corrupt")]
    Replay {
        version: u64,
        expected: WeightsHash,
        actual: WeightsHash,
    },
}

/// Welford-style pooled loss statistics (combined with Chan's parallel formula).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LossStats {
    pub n: u64,
    pub mean: f64,
    pub m2: f64,
}

impl LossStats {
    pub fn merge(&mut self, n: u64, mean: f64, m2: f64) {
        if n == 0 || !mean.is_finite() || !m2.is_finite() {
            return;
        }
        let total = self.n + n;
        let delta = mean - self.mean;
        self.mean += delta * n as f64 / total as f64;
        self.m2 += m2 + delta * delta * self.n as f64 * n as f64 / total as f64;
        self.n = total;
    }
}

/// The round being collected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpenRound {
    pub round: u64,
    pub base_version: u64,
    pub started_unix_ms: u64,
    pub deadline_unix_ms: u64,
    /// Current request number (0 = first, n = n-th extend).
    pub extend: u32,
    pub selected: Vec<String>,
    /// (client, seq) already counted.
    pub answered: Vec<(String, u32)>,
    /// Pooled pairs in arrival order (the commit sorts them by seed: its bits do not depend
    /// on the order updates arrived in).
    pub pairs: Vec<SeedScalar>,
    pub loss: LossStats,
    /// The announcement currently retained on the round topic.
    pub announce: RoundAnnounce,
    /// Who sent `pairs[i]`: an index into `selected` (for the per-client cap). Empty for a
    /// round opened by a format-1 build.
    pub owners: Vec<u32>,
    /// (client, seq) whose answer was rejected for its content: the round stops waiting for them.
    pub refused: Vec<(String, u32)>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Counters {
    pub updates: u64,
    pub perturbations: u64,
    pub duplicates: u64,
    pub stale: u64,
    pub rejected: u64,
    pub abandoned_rounds: u64,
    pub duplicate_seeds: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DurableState {
    pub format: u32,
    pub job: String,
    pub shape: ModelShape,
    pub lora: LoraConfig,
    pub seed_base: u64,
    /// Commits applied so far (= model version).
    pub version: u64,
    /// Last round id opened (round ids are never reused).
    pub round: u64,
    pub checkpoint_version: u64,
    /// Commits with `new_version > checkpoint_version`, in order.
    pub log: Vec<RoundCommit>,
    pub last_commit: Option<RoundCommit>,
    pub open: Option<OpenRound>,
    pub counters: Counters,
    pub robust: crate::robust::RobustCounters,
}

pub const STATE_FILE: &str = "state.bin";
/// Single checkpoint file of builds before versioned names; read when the versioned one is absent
/// and removed once the versioned one is written.
pub const LEGACY_CHECKPOINT_FILE: &str = "checkpoint.bin";

/// File name of the checkpoint holding `version` (zero-padded so names sort by version).
pub fn checkpoint_file_name(version: u64) -> String {
    format!("checkpoint-{version:020}.bin")
}

/// The version in a checkpoint file name, if it is one.
fn checkpoint_file_version(name: &str) -> Option<u64> {
    name.strip_prefix("checkpoint-")?
        .strip_suffix(".bin")?
        .parse()
        .ok()
}

/// Replaces `path` atomically with `bytes` ([`fwdllm_shared::durable::write_atomic`]).
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    fwdllm_shared::durable::write_atomic(path, bytes).map_err(|source| StateError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Fsyncs a directory, making the names created in it durable.
pub fn sync_dir(dir: &Path) -> Result<(), StateError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| StateError::Io {
            path: dir.to_path_buf(),
            source,
        })
}

/// On-disk store of one aggregator.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    pub fn new(dir: &Path) -> Result<Store, StateError> {
        fs::create_dir_all(dir).map_err(|source| StateError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        Ok(Store {
            dir: dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn exists(&self) -> bool {
        self.dir.join(STATE_FILE).exists()
    }

    /// Writes `state.bin` atomically; returns the blake3 hash of its bytes (what the journal
    /// that follows names as its base).
    pub fn save_state(&self, s: &DurableState) -> Result<blake3::Hash, StateError> {
        let bytes = postcard::to_stdvec(s).map_err(|e| StateError::Corrupt {
            path: self.dir.join(STATE_FILE),
            message: e.to_string(),
        })?;
        atomic_write(&self.dir.join(STATE_FILE), &bytes)?;
        Ok(blake3::hash(&bytes))
    }

    /// The blake3 hash of the `state.bin` on disk (the base a valid journal names).
    pub fn state_hash(&self) -> Result<blake3::Hash, StateError> {
        let path = self.dir.join(STATE_FILE);
        let bytes = fs::read(&path).map_err(|source| StateError::Io { path, source })?;
        Ok(blake3::hash(&bytes))
    }

    pub fn save_checkpoint(&self, c: &Checkpoint) -> Result<(), StateError> {
        atomic_write(
            &self.dir.join(checkpoint_file_name(c.model_version)),
            &wire::encode(c),
        )
    }

    /// True when the checkpoint of `version` is on disk under its versioned name.
    pub fn has_checkpoint(&self, version: u64) -> bool {
        self.dir.join(checkpoint_file_name(version)).exists()
    }

    /// The checkpoint holding `version` (falling back to the legacy single file).
    pub fn load_checkpoint(&self, version: u64) -> Result<Checkpoint, StateError> {
        let mut path = self.dir.join(checkpoint_file_name(version));
        let legacy = self.dir.join(LEGACY_CHECKPOINT_FILE);
        if !path.exists() && legacy.exists() {
            path = legacy;
        }
        let bytes = fs::read(&path).map_err(|source| StateError::Io {
            path: path.clone(),
            source,
        })?;
        let cp = wire::decode::<Checkpoint>(&bytes).map_err(|e| StateError::Corrupt {
            path: path.clone(),
            message: e.to_string(),
        })?;
        if cp.model_version != version {
            return Err(StateError::Corrupt {
                path,
                message: format!(
                    "holds version {} but {STATE_FILE} builds on version {version}",
                    cp.model_version
                ),
            });
        }
        Ok(cp)
    }

    /// Deletes every checkpoint file except the one of `keep`. Call only once a state naming
    /// `keep` is on disk: the others are then either superseded or orphans of a crash before the
    /// state that would have named them.
    pub fn prune_checkpoints(&self, keep: u64) -> Result<(), StateError> {
        let io = |path: &Path, source| StateError::Io {
            path: path.to_path_buf(),
            source,
        };
        let entries = fs::read_dir(&self.dir).map_err(|e| io(&self.dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| io(&self.dir, e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let stale = match checkpoint_file_version(name) {
                Some(v) => v != keep,
                None => name == LEGACY_CHECKPOINT_FILE && self.has_checkpoint(keep),
            };
            if stale {
                fs::remove_file(entry.path()).map_err(|e| io(&entry.path(), e))?;
            }
        }
        Ok(())
    }

    /// Loads state + checkpoint and rebuilds the current weights (verifying every hash).
    pub fn load(&self) -> Result<(DurableState, LoraWeights, Checkpoint), StateError> {
        let path = self.dir.join(STATE_FILE);
        let bytes = fs::read(&path).map_err(|source| StateError::Io {
            path: path.clone(),
            source,
        })?;
        let state = legacy::decode_state(&bytes).map_err(|e| StateError::Corrupt {
            path: path.clone(),
            message: e,
        })?;
        if state.format != STATE_FORMAT {
            return Err(StateError::Corrupt {
                path,
                message: format!("format {} (this build reads {STATE_FORMAT})", state.format),
            });
        }
        let cp = self.load_checkpoint(state.checkpoint_version)?;
        let mut weights = cp.to_weights().map_err(|e| StateError::Corrupt {
            path: self.dir.join(checkpoint_file_name(cp.model_version)),
            message: e.to_string(),
        })?;
        let mut version = cp.model_version;
        for c in &state.log {
            if c.base_version != version || c.new_version != version + 1 {
                return Err(StateError::Corrupt {
                    path,
                    message: format!(
                        "commit log goes from version {version} to a commit {} -> {}",
                        c.base_version, c.new_version
                    ),
                });
            }
            c.step
                .apply(&mut weights)
                .map_err(|e| StateError::Corrupt {
                    path: path.clone(),
                    message: format!("logged commit to version {}: {e}", c.new_version),
                })?;
            let actual = weights.hash();
            if actual != c.weights_hash {
                return Err(StateError::Replay {
                    version: c.new_version,
                    expected: c.weights_hash,
                    actual,
                });
            }
            version = c.new_version;
        }
        if version != state.version {
            return Err(StateError::Corrupt {
                path,
                message: format!(
                    "state says version {} but checkpoint + log reach {version}",
                    state.version
                ),
            });
        }
        Ok((state, weights, cp))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_stats_merge_matches_direct_computation() {
        let xs = [1.0, 2.0, 4.0, 7.0, 11.0];
        let mut a = LossStats::default();
        // Two groups: [1,2] and [4,7,11].
        a.merge(2, 1.5, 0.5);
        a.merge(
            3,
            22.0 / 3.0,
            (4.0f64 - 22.0 / 3.0).powi(2)
                + (7.0f64 - 22.0 / 3.0).powi(2)
                + (11.0f64 - 22.0 / 3.0).powi(2),
        );
        let mean = xs.iter().sum::<f64>() / 5.0;
        let m2: f64 = xs.iter().map(|x| (x - mean).powi(2)).sum();
        assert!((a.mean - mean).abs() < 1e-12);
        assert!((a.m2 - m2).abs() < 1e-9);
        assert_eq!(a.n, 5);
    }
}
