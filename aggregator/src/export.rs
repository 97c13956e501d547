//! GGUF LoRA export from an aggregator state directory: the best version on the agents' dev
//! subsets when model selection recorded one (`crate::selection`), else the current weights.

use std::path::Path;

use fwdllm_shared::gguf::write_lora_adapter;
use fwdllm_shared::lora::LoraWeights;

use crate::selection::BestRecord;
use crate::state::{StateError, Store};

/// Current weights and version from a state directory (checkpoint + replayed log).
pub fn load_weights(state_dir: &Path) -> Result<(u64, LoraWeights), StateError> {
    let store = Store::new(state_dir)?;
    let (state, weights, _) = store.load()?;
    Ok((state.version, weights))
}

/// What an export writes: the selected version (if model selection recorded one and `last` is
/// false) or the current one. The third value is the selection record when it was used.
pub fn load_for_export(
    state_dir: &Path,
    last: bool,
) -> Result<(u64, LoraWeights, Option<BestRecord>), String> {
    if !last {
        if let Some((rec, w)) = crate::selection::load_best(state_dir)? {
            return Ok((rec.model_version, w, Some(rec)));
        }
    }
    let (v, w) = load_weights(state_dir).map_err(|e| e.to_string())?;
    Ok((v, w, None))
}

/// Writes `weights` as a GGUF LoRA adapter to `out` (atomically).
pub fn export_gguf(weights: &LoraWeights, out: &Path) -> Result<usize, StateError> {
    let bytes = write_lora_adapter(weights);
    if let Some(dir) = out.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).map_err(|source| StateError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        }
    }
    crate::state::atomic_write(out, &bytes)?;
    Ok(bytes.len())
}
