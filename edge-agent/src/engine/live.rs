//! Live tensors: trained RMSNorm gains written straight into the weights llama.cpp computes with.
//!
//! A norm gain is not a LoRA (llama.cpp's adapters only add to matrix products), and reloading
//! a model per perturbation would cost more than the evaluation. But llama.cpp maps a GGUF file
//! `MAP_SHARED` and, on the CPU backend, computes with tensors that point into that mapping
//! (`buffer_from_host_ptr`; extra buffer types are off, see `llama::Llama::load`). So the
//! engine loads the tail model from a *private in-memory copy* (a `memfd`, opened by llama.cpp
//! through `/proc/self/fd/N`) and maps the same pages writable itself: a gain written there is
//! the gain the next decode reads. The copy keeps the shared, cached tail file untouched, so
//! agents on one machine and a crash mid-write cannot corrupt it. `edge-agent/tests/norms_model.rs`
//! checks that a live write gives the same loss, bit for bit, as a model file holding the same
//! gains (`fwdllm-agent merge-norms`).

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};

use fwdllm_shared::gguf;
use fwdllm_shared::lora::norm_gains;

use super::EngineError;

/// A model file copied into memory, with its F32 tensors writable in place.
pub(super) struct LiveModel {
    /// The memfd; llama.cpp maps it through `proc_path`.
    file: File,
    map: memmap2::MmapMut,
    /// Name → (byte offset in the file, element count) of every F32 tensor.
    f32_tensors: HashMap<String, (usize, usize)>,
    /// Base values of tensors written so far (restored when a layout stops training them).
    base: HashMap<String, Vec<f32>>,
    scratch: Vec<f32>,
}

impl LiveModel {
    /// Copies `path` into a fresh memfd and maps it writable.
    pub(super) fn copy_of(path: &Path) -> Result<LiveModel, EngineError> {
        let io = |e| EngineError::io(path, e);
        let mut src = File::open(path).map_err(io)?;
        let header = gguf::read_gguf_header(BufReader::new(File::open(path).map_err(io)?))
            .map_err(|e| EngineError::Tail {
                path: path.to_path_buf(),
                problem: e.to_string(),
            })?;
        // SAFETY: the name is a NUL-terminated literal; memfd_create has no other preconditions.
        let fd = unsafe { libc::memfd_create(c"fwdllm-live-model".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io(std::io::Error::last_os_error()));
        }
        // SAFETY: fd is a new descriptor this function owns.
        let mut file = unsafe { File::from_raw_fd(fd) };
        std::io::copy(&mut src, &mut file).map_err(io)?;
        // SAFETY: the memfd is private to this process and only ever resized here (never); the
        // other mapping of it is llama.cpp's, which only reads.
        let map = unsafe { memmap2::MmapMut::map_mut(&file) }.map_err(io)?;
        let base = header.data_offset as usize;
        let f32_tensors = header
            .tensors
            .iter()
            .filter(|t| t.ggml_type == gguf::GGML_TYPE_F32)
            .filter_map(|t| {
                Some((
                    t.name.clone(),
                    (base + t.offset as usize, t.n_elements()? as usize),
                ))
            })
            .collect();
        Ok(LiveModel {
            file,
            map,
            f32_tensors,
            base: HashMap::new(),
            scratch: Vec::new(),
        })
    }

    /// The path llama.cpp loads the copy from.
    pub(super) fn proc_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }

    fn read(&self, name: &str) -> Option<Vec<f32>> {
        let &(off, n) = self.f32_tensors.get(name)?;
        let bytes = &self.map[off..off + 4 * n];
        Some(
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        )
    }

    fn write(&mut self, name: &str, values: &[f32]) {
        let (off, n) = self.f32_tensors[name];
        debug_assert_eq!(n, values.len());
        for (dst, v) in self.map[off..off + 4 * n].chunks_exact_mut(4).zip(values) {
            dst.copy_from_slice(&v.to_le_bytes());
        }
    }

    /// Sets each named gain to `norm_gains(base, delta)` and every gain set earlier but not
    /// named now back to its base value.
    pub(super) fn set_norms(&mut self, deltas: &[(String, Vec<f32>)]) -> Result<(), String> {
        for (name, delta) in deltas {
            if !self.base.contains_key(name) {
                let base = self
                    .read(name)
                    .ok_or_else(|| format!("the tail model has no F32 tensor `{name}`"))?;
                if base.len() != delta.len() {
                    return Err(format!(
                        "`{name}` has {} values, the layout trains {}",
                        base.len(),
                        delta.len()
                    ));
                }
                self.base.insert(name.clone(), base);
            }
        }
        let stale: Vec<String> = self
            .base
            .keys()
            .filter(|k| !deltas.iter().any(|(n, _)| n == *k))
            .cloned()
            .collect();
        for name in stale {
            let base = self.base.remove(&name).expect("listed above");
            self.write(&name, &base);
        }
        let mut out = std::mem::take(&mut self.scratch);
        for (name, delta) in deltas {
            norm_gains(&self.base[name], delta, &mut out);
            self.write(name, &out);
        }
        self.scratch = out;
        Ok(())
    }
}
