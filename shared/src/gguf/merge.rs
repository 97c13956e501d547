//! A model file with trained norm gains in place: how stock llama.cpp uses an adapter whose
//! layout trains RMSNorm gains (its LoRA loader cannot carry them, see
//! [`super::NORMS_NAMES_KEY`]).

use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::Path;

use super::{
    model_shape_from_gguf, read_adapter_norms, read_gguf, read_gguf_header, AdapterNorm, GgufError,
    GGML_TYPE_F32,
};
use crate::lora::norm_gains;

/// Copies the model at `model` to `out` with each of `norms` applied to its gain tensor
/// (`norm_gains(base, delta)`), every other byte unchanged. The copy is written beside `out`
/// and renamed into place, so a failure leaves no half-written model. Errors name the tensor:
/// a norm the model lacks, one that is not F32, or one whose length differs from the delta.
pub fn merge_norms(model: &Path, norms: &[AdapterNorm], out: &Path) -> Result<(), GgufError> {
    let open = |p: &Path, e| GgufError::Open {
        path: p.to_path_buf(),
        source: e,
    };
    let header = read_gguf_header(BufReader::new(
        File::open(model).map_err(|e| open(model, e))?,
    ))?;
    let mut places = Vec::with_capacity(norms.len());
    for n in norms {
        let bad = |reason: String| GgufError::BadTensor {
            name: n.name.clone(),
            reason,
        };
        let t = header.tensor(&n.name).ok_or_else(|| {
            bad(format!(
                "is not in {}; is this the adapter's base model?",
                model.display()
            ))
        })?;
        if t.ggml_type != GGML_TYPE_F32 {
            return Err(bad(format!(
                "has ggml type {} in {}, only F32 norm gains can be merged",
                t.ggml_type,
                model.display()
            )));
        }
        if t.n_elements() != Some(n.delta.len() as u64) {
            return Err(bad(format!(
                "has {:?} values in {}, the adapter trains {}",
                t.n_elements(),
                model.display(),
                n.delta.len()
            )));
        }
        places.push(header.data_offset + t.offset);
    }
    let tmp = out.with_extension("gguf.partial");
    fs::copy(model, &tmp).map_err(|e| open(&tmp, e))?;
    let io = |e| open(&tmp, e);
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&tmp)
        .map_err(io)?;
    let mut raw = Vec::new();
    let mut gains = Vec::new();
    for (n, &at) in norms.iter().zip(&places) {
        raw.resize(4 * n.delta.len(), 0);
        f.seek(SeekFrom::Start(at)).map_err(io)?;
        f.read_exact(&mut raw).map_err(io)?;
        let base: Vec<f32> = raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        norm_gains(&base, &n.delta, &mut gains);
        for (dst, g) in raw.chunks_exact_mut(4).zip(&gains) {
            dst.copy_from_slice(&g.to_le_bytes());
        }
        f.seek(SeekFrom::Start(at)).map_err(io)?;
        f.write_all(&raw).map_err(io)?;
    }
    f.sync_all().map_err(io)?;
    drop(f);
    fs::rename(&tmp, out).map_err(|e| open(out, e))
}

/// [`merge_norms`] of the norm gains the adapter file `adapter` carries into the model at
/// `model`, written to `out`. Returns how many gains it merged; with none it writes nothing
/// and returns 0 (stock llama.cpp loads such an adapter as it is).
pub fn merge_adapter_norms(model: &Path, adapter: &Path, out: &Path) -> Result<usize, GgufError> {
    let bytes = fs::read(adapter).map_err(|e| GgufError::Open {
        path: adapter.to_path_buf(),
        source: e,
    })?;
    let n_embd = model_shape_from_gguf(model)?.n_embd;
    let norms = read_adapter_norms(&read_gguf(&bytes)?, n_embd)?;
    if !norms.is_empty() {
        merge_norms(model, &norms, out)?;
    }
    Ok(norms.len())
}
