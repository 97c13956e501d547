//! GGUF LoRA export of the aggregator's current weights (from its state directory).

use std::path::Path;

use fwdllm_shared::gguf::write_lora_adapter;
use fwdllm_shared::lora::LoraWeights;

use crate::state::{StateError, Store};

/// Current weights and version from a state directory (checkpoint + replayed log).
pub fn load_weights(state_dir: &Path) -> Result<(u64, LoraWeights), StateError> {
    let store = Store::new(state_dir)?;
    let (state, weights, _) = store.load()?;
    Ok((state.version, weights))
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
