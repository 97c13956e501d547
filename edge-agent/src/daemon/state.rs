//! The agent's persisted state under its state directory: `state.json` (what it answered, where
//! its replica is) and `weights.bin` (the replica, as a wire `Checkpoint`). Both are written
//! atomically (temp file, fsync, rename, fsync dir), so a crash leaves the old or the new file,
//! never a partial one.

use std::path::{Path, PathBuf};

use fwdllm_shared::lora::{LoraWeights, WeightsHash};
use fwdllm_shared::wire::{self, Checkpoint};
use serde::{Deserialize, Serialize};

/// Contents of `state.json`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct PersistedState {
    pub client_id: String,
    pub job: String,
    /// Version of the replica in `weights.bin`.
    pub model_version: u64,
    pub weights_hash: Option<WeightsHash>,
    /// Last (round, extend) answered; each is answered at most once, also across restarts.
    pub last_answered: Option<(u64, u32)>,
    /// (round, next k): perturbation index to continue from within that round.
    pub next_k: Option<(u64, u32)>,
    pub updates_sent: u64,
}

/// Why state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot create state directory {path}: {source} (set agent.state_dir to a writable directory)")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Files of one agent's state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    pub fn open(dir: &Path) -> Result<StateDir, StateError> {
        std::fs::create_dir_all(dir).map_err(|source| StateError::CreateDir {
            path: dir.to_owned(),
            source,
        })?;
        Ok(StateDir {
            dir: dir.to_owned(),
        })
    }

    pub fn state_path(&self) -> PathBuf {
        self.dir.join("state.json")
    }
    pub fn weights_path(&self) -> PathBuf {
        self.dir.join("weights.bin")
    }

    /// The saved state; a missing file is a fresh start, an unreadable one is logged and
    /// treated as a fresh start (the replica is rebuilt from the broker's checkpoint).
    pub fn load_state(&self) -> PersistedState {
        let path = self.state_path();
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                log::warn!(
                    "ignoring unreadable {}: {e}; starting fresh",
                    path.display()
                );
                PersistedState::default()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => PersistedState::default(),
            Err(e) => {
                log::warn!("cannot read {}: {e}; starting fresh", path.display());
                PersistedState::default()
            }
        }
    }

    pub fn save_state(&self, state: &PersistedState) -> Result<(), StateError> {
        let bytes = serde_json::to_vec_pretty(state).expect("state serialises");
        write_atomic(&self.state_path(), &bytes)
    }

    /// The saved replica when it is intact and at `version` with `hash`.
    pub fn load_weights(&self, version: u64, hash: &WeightsHash) -> Option<LoraWeights> {
        let path = self.weights_path();
        let bytes = std::fs::read(&path).ok()?;
        let cp = match wire::decode::<Checkpoint>(&bytes) {
            Ok(cp) => cp,
            Err(e) => {
                log::warn!("ignoring {}: {e}", path.display());
                return None;
            }
        };
        if cp.model_version != version || &cp.weights_hash != hash {
            log::info!(
                "{} holds version {}, state says {version}; ignoring it",
                path.display(),
                cp.model_version
            );
            return None;
        }
        cp.to_weights()
            .map_err(|e| log::warn!("ignoring {}: {e}", path.display()))
            .ok()
    }

    pub fn save_weights(&self, version: u64, weights: &LoraWeights) -> Result<(), StateError> {
        write_atomic(
            &self.weights_path(),
            &wire::encode(&Checkpoint::from_weights(version, weights)),
        )
    }
}

/// Writes `bytes` to `path` so that readers see the old or the new content, never a mix
/// ([`fwdllm_shared::durable::write_atomic`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    fwdllm_shared::durable::write_atomic(path, bytes).map_err(|source| StateError::Write {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use fwdllm_shared::lora::{LoraConfig, LoraLayout};

    #[test]
    fn state_and_weights_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let sd = StateDir::open(&dir.path().join("nested")).unwrap();
        assert_eq!(sd.load_state(), PersistedState::default());
        let shape = fwdllm_shared::fixtures::small_llama(1, 8, 2, 1);
        let w = LoraWeights::init(LoraLayout::new(&shape, &LoraConfig::default()).unwrap());
        let s = PersistedState {
            client_id: "a".into(),
            model_version: 3,
            weights_hash: Some(w.hash()),
            last_answered: Some((7, 1)),
            next_k: Some((7, 12)),
            ..PersistedState::default()
        };
        sd.save_state(&s).unwrap();
        sd.save_weights(3, &w).unwrap();
        assert_eq!(sd.load_state(), s);
        assert_eq!(sd.load_weights(3, &w.hash()).unwrap(), w);
        assert!(
            sd.load_weights(4, &w.hash()).is_none(),
            "version mismatch is rejected"
        );
        // No temp files left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path().join("nested"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn garbage_state_is_a_fresh_start() {
        let dir = tempfile::tempdir().unwrap();
        let sd = StateDir::open(dir.path()).unwrap();
        std::fs::write(sd.state_path(), b"{not json").unwrap();
        assert_eq!(sd.load_state(), PersistedState::default());
        std::fs::write(sd.weights_path(), b"junk").unwrap();
        assert!(sd.load_weights(0, &WeightsHash([0; 32])).is_none());
    }
}
