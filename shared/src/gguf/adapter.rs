//! LoRA adapters as GGUF: the tensors llama.cpp loads, the metadata keys (architecture, alpha,
//! weights hash, verbalizer head rows) and reading the head rows back.

use super::write::{write_gguf_f32, F32Tensor};
use super::{ty, GgufError, GgufFile, GgufValue, GGUF_DEFAULT_ALIGNMENT};
use crate::lora::{LoraError, LoraLayout, LoraWeights};

/// Metadata keys written into every adapter made by [`write_lora_adapter`], in order.
/// With head rows, also `fwdllm.head.rows` (u32), `fwdllm.head.alpha` (f32),
/// `fwdllm.head.delta` (f32 array, row-major `rows x n_embd`) and `fwdllm.head.bias` (f32 array):
/// stock llama.cpp has no tensor for a delta on a few output rows (an adapter on the tied
/// `token_embd.weight` would also move the input embeddings of those words), and it ignores
/// metadata it does not know, so it loads the LoRA tensors and skips the head; fwdllm's engine
/// reads it back with [`read_adapter_head`].
pub fn adapter_kv(weights: &LoraWeights) -> Vec<(String, GgufValue)> {
    let mut kv = base_adapter_kv(weights.layout());
    kv.push((
        "fwdllm.weights_hash".into(),
        GgufValue::String(weights.hash().to_string()),
    ));
    if let Some(h) = weights.layout().head() {
        let floats = |r: std::ops::Range<usize>| GgufValue::Array {
            elem_type: ty::F32,
            values: weights.params()[r]
                .iter()
                .map(|&x| GgufValue::F32(x))
                .collect(),
        };
        kv.push(("fwdllm.head.rows".into(), GgufValue::U32(h.rows)));
        kv.push(("fwdllm.head.alpha".into(), GgufValue::F32(h.alpha)));
        kv.push(("fwdllm.head.delta".into(), floats(h.delta.clone())));
        kv.push(("fwdllm.head.bias".into(), floats(h.bias.clone())));
    }
    let norms = weights.layout().norms();
    if !norms.is_empty() {
        kv.push((
            NORMS_NAMES_KEY.into(),
            GgufValue::Array {
                elem_type: ty::STRING,
                values: norms
                    .iter()
                    .map(|n| GgufValue::String(n.base_name()))
                    .collect(),
            },
        ));
        kv.push((
            NORMS_DELTA_KEY.into(),
            GgufValue::Array {
                elem_type: ty::F32,
                values: norms
                    .iter()
                    .flat_map(|n| weights.params()[n.delta.clone()].iter())
                    .map(|&x| GgufValue::F32(x))
                    .collect(),
            },
        ));
    }
    kv
}

/// Metadata key of the trained norm gains' tensor names (string array, `blk.L.attn_norm.weight`).
/// Stock llama.cpp cannot apply a norm gain from an adapter (its loader skips `*_norm.weight`
/// tensors), so the deltas travel as metadata it ignores, like the head rows; fwdllm's engine
/// applies them ([`read_adapter_norms`]) and [`crate::gguf::merge_norms`] writes a model file
/// with the gains in place for stock llama.cpp.
pub const NORMS_NAMES_KEY: &str = "fwdllm.norms.names";
/// Metadata key of the norm deltas (f32 array, `n_embd` per name, in name order); the gain is
/// [`crate::lora::norm_gains`]`(base, delta)`.
pub const NORMS_DELTA_KEY: &str = "fwdllm.norms.delta";

/// One trained norm gain of an adapter file: the base tensor's name and its delta.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterNorm {
    /// `blk.{layer}.{attn_norm|ffn_norm}.weight` of the full model.
    pub name: String,
    pub layer: u32,
    pub delta: Vec<f32>,
}

/// The norm deltas of an adapter file's metadata (empty when it has none); an error naming the
/// key when they are malformed (types, lengths, names that are not a layer's norm, non-finite
/// values).
pub fn read_adapter_norms(file: &GgufFile, n_embd: u32) -> Result<Vec<AdapterNorm>, GgufError> {
    let Some(names) = file.get(NORMS_NAMES_KEY) else {
        return Ok(Vec::new());
    };
    let bad = |key: &str, problem: String| GgufError::BadMetadata {
        key: key.to_string(),
        problem,
    };
    let GgufValue::Array { values: names, .. } = names else {
        return Err(bad(NORMS_NAMES_KEY, "is not an array".into()));
    };
    let Some(GgufValue::Array { values: delta, .. }) = file.get(NORMS_DELTA_KEY) else {
        return Err(bad(NORMS_DELTA_KEY, "missing or not an array".into()));
    };
    let n = n_embd as usize;
    if delta.len() != names.len() * n {
        return Err(bad(
            NORMS_DELTA_KEY,
            format!(
                "has {} values, expected {} ({} norms x n_embd {n})",
                delta.len(),
                names.len() * n,
                names.len()
            ),
        ));
    }
    names
        .iter()
        .zip(delta.chunks_exact(n.max(1)))
        .map(|(name, d)| {
            let GgufValue::String(name) = name else {
                return Err(bad(
                    NORMS_NAMES_KEY,
                    "holds a value that is not a string".into(),
                ));
            };
            let layer = name
                .strip_prefix("blk.")
                .and_then(|r| {
                    r.strip_suffix(".attn_norm.weight")
                        .or_else(|| r.strip_suffix(".ffn_norm.weight"))
                })
                .and_then(|l| l.parse::<u32>().ok())
                .ok_or_else(|| {
                    bad(
                        NORMS_NAMES_KEY,
                        format!(
                            "names `{name}`, not blk.N.attn_norm.weight or blk.N.ffn_norm.weight"
                        ),
                    )
                })?;
            let delta = d
                .iter()
                .map(|v| match v {
                    GgufValue::F32(x) if x.is_finite() => Ok(*x),
                    _ => Err(bad(
                        NORMS_DELTA_KEY,
                        "holds a value that is not a finite f32".into(),
                    )),
                })
                .collect::<Result<_, _>>()?;
            Ok(AdapterNorm {
                name: name.clone(),
                layer,
                delta,
            })
        })
        .collect()
}

/// Verbalizer head rows stored in an adapter by [`adapter_kv`].
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterHead {
    pub rows: u32,
    pub alpha: f32,
    /// Row-major `rows x n_embd`.
    pub delta: Vec<f32>,
    pub bias: Vec<f32>,
}

/// The head rows of an adapter file's metadata: `Ok(None)` when it has none, an error naming
/// the key when they are present but malformed (wrong type, lengths, non-finite values).
pub fn read_adapter_head(file: &GgufFile, n_embd: u32) -> Result<Option<AdapterHead>, GgufError> {
    let Some(rows) = file.get("fwdllm.head.rows") else {
        return Ok(None);
    };
    let bad = |key: &str, problem: String| GgufError::BadMetadata {
        key: key.to_string(),
        problem,
    };
    let rows = rows
        .as_u64()
        .and_then(|r| u32::try_from(r).ok())
        .filter(|&r| r > 0)
        .ok_or_else(|| bad("fwdllm.head.rows", "not a positive u32".into()))?;
    let alpha = match file.get("fwdllm.head.alpha") {
        Some(GgufValue::F32(a)) if a.is_finite() && *a > 0.0 => *a,
        _ => {
            return Err(bad(
                "fwdllm.head.alpha",
                "missing or not a finite f32 > 0".into(),
            ))
        }
    };
    let floats = |key: &str, len: usize| -> Result<Vec<f32>, GgufError> {
        let Some(GgufValue::Array { values, .. }) = file.get(key) else {
            return Err(bad(key, "missing or not an array".into()));
        };
        if values.len() != len {
            return Err(bad(
                key,
                format!("has {} values, expected {len}", values.len()),
            ));
        }
        values
            .iter()
            .map(|v| match v {
                GgufValue::F32(x) if x.is_finite() => Ok(*x),
                _ => Err(bad(key, "holds a value that is not a finite f32".into())),
            })
            .collect()
    };
    Ok(Some(AdapterHead {
        rows,
        alpha,
        delta: floats("fwdllm.head.delta", rows as usize * n_embd as usize)?,
        bias: floats("fwdllm.head.bias", rows as usize)?,
    }))
}

fn base_adapter_kv(layout: &LoraLayout) -> Vec<(String, GgufValue)> {
    vec![
        (
            "general.architecture".into(),
            GgufValue::String(layout.shape().arch.clone()),
        ),
        ("general.type".into(), GgufValue::String("adapter".into())),
        (
            "general.name".into(),
            GgufValue::String("fwdllm LoRA".into()),
        ),
        (
            "general.alignment".into(),
            GgufValue::U32(GGUF_DEFAULT_ALIGNMENT as u32),
        ),
        ("adapter.type".into(), GgufValue::String("lora".into())),
        (
            "adapter.lora.alpha".into(),
            GgufValue::F32(layout.config().alpha),
        ),
    ]
}

/// A GGUF v3 LoRA adapter for stock llama.cpp: tensors
/// `blk.{layer}.{module}.weight.lora_a` (ggml `ne = [in, rank]`) and `.lora_b`
/// (`ne = [rank, out]`), F32, in layout order, with the metadata of [`adapter_kv`]
/// (including `fwdllm.weights_hash` for provenance).
pub fn write_lora_adapter(weights: &LoraWeights) -> Vec<u8> {
    write_adapter(&adapter_kv(weights), weights.layout(), weights.params(), 0)
}

/// Like [`write_lora_adapter`] for a raw parameter vector of `layout` (e.g. the scratch
/// buffer of [`crate::update::perturbed_params`]), without copying it into a
/// [`LoraWeights`] and without the `fwdllm.weights_hash` key (skips hashing in hot loops).
pub fn write_lora_adapter_params(
    layout: &LoraLayout,
    params: &[f32],
) -> Result<Vec<u8>, LoraError> {
    if params.len() != layout.total_len() {
        return Err(LoraError::ParamLenMismatch {
            expected: layout.total_len(),
            got: params.len(),
        });
    }
    Ok(write_adapter(&base_adapter_kv(layout), layout, params, 0))
}

/// Like [`write_lora_adapter_params`] for a *tail model* whose layer 0 is the full model's
/// layer `first_layer` (the tail engine): tensor `blk.{l}` is written as
/// `blk.{l - first_layer}`. Fails if the layout adapts a layer below `first_layer`.
pub fn write_lora_adapter_params_from_layer(
    layout: &LoraLayout,
    params: &[f32],
    first_layer: u32,
) -> Result<Vec<u8>, LoraError> {
    if params.len() != layout.total_len() {
        return Err(LoraError::ParamLenMismatch {
            expected: layout.total_len(),
            got: params.len(),
        });
    }
    if let Some(t) = layout.tensors().iter().find(|t| t.layer < first_layer) {
        return Err(LoraError::LayerBelowTail {
            layer: t.layer,
            first_layer,
        });
    }
    Ok(write_adapter(
        &base_adapter_kv(layout),
        layout,
        params,
        first_layer,
    ))
}

fn write_adapter(
    kv: &[(String, GgufValue)],
    layout: &LoraLayout,
    params: &[f32],
    layer_offset: u32,
) -> Vec<u8> {
    let mut names = Vec::with_capacity(layout.tensors().len() * 2);
    let mut dims = Vec::with_capacity(names.capacity());
    for t in layout.tensors() {
        let base = format!(
            "blk.{}.{}.weight",
            t.layer - layer_offset,
            t.module.gguf_name()
        );
        names.push(format!("{base}.lora_a"));
        dims.push([u64::from(t.in_dim), u64::from(t.rank)]);
        names.push(format!("{base}.lora_b"));
        dims.push([u64::from(t.rank), u64::from(t.out_dim)]);
    }
    let tensors: Vec<F32Tensor<'_>> = layout
        .tensors()
        .iter()
        .flat_map(|t| [t.a.clone(), t.b.clone()])
        .zip(names.iter().zip(&dims))
        .map(|(range, (name, d))| F32Tensor {
            name,
            dims: d,
            data: &params[range],
        })
        .collect();
    write_gguf_f32(kv, &tensors)
}
