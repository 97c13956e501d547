//! The tail engine: compute the frozen prefix once, perturb only the trainable tail.
//!
//! A LoRA layout that adapts layers `[f, n)` leaves layers `0..f` frozen, so for a fixed batch
//! their output (the input of layer `f`, the residual stream) is the same for every
//! perturbation. The engine therefore runs the batch once through the *prefix model* (the
//! shipped file, usually quantised) and captures the input of layer `f` for every token
//! (`Llama::layer_input`, llama.cpp's per-layer input capture); then every perturbed loss
//! evaluation runs only the *tail model*: a small F32 GGUF holding layers `f..n` (renumbered
//! `0..n-f`), the output norm and the head, fed those hidden states as embeddings at the same
//! positions. The prefix's own precision error (8-bit activations in quantised matmuls) is
//! then a fixed offset of the tail's input, identical for `θ+εv` and `θ−εv`, so it cancels in
//! ΔL instead of drowning it.
//!
//! The head of a tail model is either the rows of the task's label words only ([`TailHead::Labels`],
//! for the verbalizer loss, whose value is unchanged: it reads only those logits) or the whole
//! vocabulary ([`TailHead::Full`], for the instruction-tuning loss). A label head also carries
//! `n_embd` unit rows after the label rows, so its "logits" `K..K+n_embd` are the final hidden
//! state itself (a dot product with a one-hot row is exact in f32): the verbalizer head rows of
//! a layout ([`fwdllm_shared::lora::HeadBlock`]) are applied to it in Rust, with no extra API. Tail models are derived
//! from the model file with ggml's own dequantisers (bit-identical to the prepared F32 copy)
//! and cached next to a stamp like the prepared copy (`prepare::cached_derivation`).
//! The tail's GGUF uses llama.cpp's `tokenizer.ggml.model = "none"` with
//! `{arch}.vocab_size` rows: it is never asked to tokenize.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fwdllm_shared::gguf::{self, GgufTensorInfo, GgufValue};

use super::llama::Token;
use super::prepare::{cached_derivation, hash_file};
use super::rows;
use super::EngineError;

/// Which output rows a tail model keeps.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TailHead {
    /// The rows of these tokens, in this order (logit `k` is token `ids[k]`), then `n_embd`
    /// unit rows (logit `K + i` is hidden-state element `i`).
    Labels(Vec<Token>),
    /// Every row: logit `t` is token `t`.
    Full,
}

impl TailHead {
    /// Short stable id used in the cache file name.
    fn id(&self) -> String {
        match self {
            TailHead::Full => "full".into(),
            TailHead::Labels(ids) => {
                let mut h = blake3::Hasher::new();
                for t in ids {
                    h.update(&t.to_le_bytes());
                }
                format!("labels{}h-{}", ids.len(), &h.finalize().to_hex()[..12])
            }
        }
    }

    /// Whether logits of this head can answer a request for `want` (a full head has no
    /// hidden-state rows, so it does not serve a label head).
    pub fn serves(&self, want: &TailHead) -> bool {
        self == want
    }
}

/// The type the tail model stores its per-layer weight matrices in. Norms (written live) and
/// the head (a label head's unit rows must stay exact) are always F32.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum TailMatrices {
    /// Exact dequantised values, F32 products: the reference path.
    #[default]
    F32,
    /// bfloat16 matrices: ggml then rounds each product's input to bfloat16 too (8-bit
    /// mantissa, a relative error per value, not per block). Its AVX512-BF16 kernel does twice
    /// the multiply-adds per instruction of the F32 one, but on the Xeon measured it issues at
    /// half the rate: no faster (docs/RESULTS.md, "Tail matrix types").
    Bf16,
    /// Q8_0 matrices: inputs are rounded to 8 bits per block of 32 (the block's largest value
    /// sets the step), with integer dot products.
    #[value(name = "q8_0")]
    #[serde(rename = "q8_0")]
    Q8_0,
}

impl TailMatrices {
    pub fn as_str(self) -> &'static str {
        match self {
            TailMatrices::F32 => "f32",
            TailMatrices::Bf16 => "bf16",
            TailMatrices::Q8_0 => "q8_0",
        }
    }

    /// Parses the config spelling ([`TailMatrices::as_str`]).
    pub fn parse(s: &str) -> Option<TailMatrices> {
        [TailMatrices::F32, TailMatrices::Bf16, TailMatrices::Q8_0]
            .into_iter()
            .find(|m| m.as_str() == s)
    }

    fn ggml_type(self) -> u32 {
        match self {
            TailMatrices::F32 => gguf::GGML_TYPE_F32,
            TailMatrices::Bf16 => rows::GGML_TYPE_BF16,
            TailMatrices::Q8_0 => rows::GGML_TYPE_Q8_0,
        }
    }

    /// llama.cpp's `general.file_type` for a file of mostly this type.
    fn file_type(self) -> u32 {
        match self {
            TailMatrices::F32 => 0,   // LLAMA_FTYPE_ALL_F32
            TailMatrices::Bf16 => 32, // LLAMA_FTYPE_MOSTLY_BF16
            TailMatrices::Q8_0 => 7,  // LLAMA_FTYPE_MOSTLY_Q8_0
        }
    }
}

/// Path of the tail model of `model` from layer `first_layer` with `head`.
pub fn tail_path(
    model: &Path,
    first_layer: u32,
    head: &TailHead,
    matrices: TailMatrices,
    cache_dir: &Path,
) -> PathBuf {
    let stem = model
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    cache_dir.join(format!(
        "{stem}.tail{first_layer}-{}.{}.gguf",
        head.id(),
        matrices.as_str()
    ))
}

/// Returns a verified tail model (layers `first_layer..`, `head`, matrices stored as
/// `matrices`) of `model`, building it once.
pub fn prepare_tail(
    model: &Path,
    first_layer: u32,
    head: &TailHead,
    matrices: TailMatrices,
    cache_dir: &Path,
) -> Result<PathBuf, EngineError> {
    if !model.is_file() {
        return Err(EngineError::ModelNotFound(model.to_path_buf()));
    }
    let out = tail_path(model, first_layer, head, matrices, cache_dir);
    let (source_size, source_blake3) = hash_file(model)?;
    let identity = serde_json::json!({
        "kind": "tail",
        "format": 2,
        "source_size": source_size,
        "source_blake3": source_blake3,
        "first_layer": first_layer,
        "head": head.id(),
        "matrices": matrices.as_str(),
    });
    cached_derivation(&out, identity, |tmp| {
        log::info!(
            "building the tail model (layers {first_layer}.., head {}, {} matrices) of {} -> {}",
            head.id(),
            matrices.as_str(),
            model.display(),
            out.display()
        );
        build_tail(model, tmp, first_layer, head, matrices, &source_blake3)
    })
}

fn tail_err(path: &Path, problem: impl Into<String>) -> EngineError {
    EngineError::Tail {
        path: path.to_path_buf(),
        problem: problem.into(),
    }
}

/// One tensor of the tail file: its new name, shape and type, and where its rows come from.
struct Planned<'a> {
    name: String,
    dims: Vec<u64>,
    ggml_type: u32,
    source: &'a GgufTensorInfo,
    /// Rows of the source to take, in order (`None` = all).
    rows: Option<Vec<u64>>,
    /// Unit rows appended after `rows` (row `i` is 1.0 at column `i`).
    unit_rows: u64,
}

/// Writes the tail model of `src` (see the module docs) to `dst`, streaming one row block at a
/// time so that building a full-vocabulary head never holds the whole F32 matrix.
fn build_tail(
    src: &Path,
    dst: &Path,
    first_layer: u32,
    head: &TailHead,
    matrices: TailMatrices,
    source_blake3: &str,
) -> Result<(), EngineError> {
    let file = File::open(src).map_err(|e| EngineError::io(src, e))?;
    let header = gguf::read_gguf_header(BufReader::with_capacity(1 << 16, file))
        .map_err(|e| tail_err(src, e.to_string()))?;
    let shape = header
        .model_shape()
        .map_err(|e| tail_err(src, e.to_string()))?;
    let arch = shape.arch.clone();
    let n_layer = shape.n_layer;
    // A tail from layer 0 is every layer fed the token embeddings: what a layout of norm gains
    // in every layer trains through (`engine::live`).
    if first_layer >= n_layer {
        return Err(tail_err(
            src,
            format!("a tail from layer {first_layer} of a {n_layer}-layer model is empty"),
        ));
    }
    let n_embd = u64::from(shape.n_embd);

    let mut plan: Vec<Planned<'_>> = Vec::new();
    for t in &header.tensors {
        if t.name == "token_embd.weight" || t.name == "output.weight" {
            continue; // the head is planned below
        }
        if let Some(rest) = t.name.strip_prefix("blk.") {
            let (idx, tail) = rest
                .split_once('.')
                .ok_or_else(|| tail_err(src, format!("tensor name {:?}", t.name)))?;
            let idx: u32 = idx
                .parse()
                .map_err(|_| tail_err(src, format!("tensor name {:?}", t.name)))?;
            if idx < first_layer {
                continue;
            }
            // Weight matrices take the requested type; vectors (norms, biases) stay F32.
            let matrix = t.dims.len() == 2 && t.dims[1] > 1;
            plan.push(Planned {
                name: format!("blk.{}.{tail}", idx - first_layer),
                dims: t.dims.clone(),
                ggml_type: if matrix {
                    matrices.ggml_type()
                } else {
                    gguf::GGML_TYPE_F32
                },
                source: t,
                rows: None,
                unit_rows: 0,
            });
        } else {
            plan.push(Planned {
                name: t.name.clone(),
                dims: t.dims.clone(),
                ggml_type: gguf::GGML_TYPE_F32,
                source: t,
                rows: None,
                unit_rows: 0,
            });
        }
    }
    // llama.cpp reads the head from `output.weight`, else from the tied `token_embd.weight`.
    let head_src = header
        .tensor("output.weight")
        .or_else(|| header.tensor("token_embd.weight"))
        .ok_or_else(|| tail_err(src, "has neither output.weight nor token_embd.weight"))?;
    if head_src.dims.len() != 2 || head_src.dims[0] != n_embd {
        return Err(tail_err(
            src,
            format!("head {} has shape {:?}", head_src.name, head_src.dims),
        ));
    }
    let n_vocab = head_src.dims[1];
    let rows: Vec<u64> = match head {
        TailHead::Full => (0..n_vocab).collect(),
        TailHead::Labels(ids) => {
            if ids.is_empty() {
                return Err(tail_err(src, "a label head needs at least one token"));
            }
            ids.iter()
                .map(|&t| {
                    u64::try_from(t)
                        .ok()
                        .filter(|&t| t < n_vocab)
                        .ok_or_else(|| {
                            tail_err(
                                src,
                                format!("label token {t} is not in the vocabulary of {n_vocab}"),
                            )
                        })
                })
                .collect::<Result<_, _>>()?
        }
    };
    let unit_rows = match head {
        TailHead::Full => 0,
        TailHead::Labels(_) => n_embd,
    };
    let n_rows = rows.len() as u64 + unit_rows;
    // Written as the tied embedding: llama.cpp then uses it as the output matrix too, and the
    // tail never looks a token up (its input is hidden states).
    plan.push(Planned {
        name: "token_embd.weight".into(),
        dims: vec![n_embd, n_rows],
        ggml_type: gguf::GGML_TYPE_F32,
        source: head_src,
        rows: Some(rows),
        unit_rows,
    });

    let mut kv: Vec<(String, GgufValue)> = Vec::new();
    let block_count = format!("{arch}.block_count");
    let vocab_size = format!("{arch}.vocab_size");
    let arch_prefix = format!("{arch}.");
    for (k, v) in &header.kv {
        if k.starts_with("tokenizer.")
            || k.starts_with("fwdllm.")
            || k == "general.file_type"
            || k == "general.alignment"
            || k == "general.quantization_version"
            || *k == vocab_size
        {
            continue;
        }
        if *k == block_count {
            kv.push((k.clone(), GgufValue::U32(n_layer - first_layer)));
            continue;
        }
        // Per-layer hyperparameters (arrays of n_layer values) keep the tail's layers.
        if let GgufValue::Array { elem_type, values } = v {
            if k.starts_with(&arch_prefix) && values.len() == n_layer as usize {
                kv.push((
                    k.clone(),
                    GgufValue::Array {
                        elem_type: *elem_type,
                        values: values[first_layer as usize..].to_vec(),
                    },
                ));
                continue;
            }
        }
        kv.push((k.clone(), v.clone()));
    }
    let n_rows_u32 = u32::try_from(n_rows).map_err(|_| tail_err(src, "head too large"))?;
    kv.extend([
        ("general.alignment".into(), GgufValue::U32(32)),
        (
            "general.file_type".into(),
            GgufValue::U32(matrices.file_type()),
        ),
        (vocab_size, GgufValue::U32(n_rows_u32)),
        (
            "tokenizer.ggml.model".into(),
            GgufValue::String("none".into()),
        ),
        (
            "fwdllm.tail.first_layer".into(),
            GgufValue::U32(first_layer),
        ),
        ("fwdllm.tail.head".into(), GgufValue::String(head.id())),
        (
            "fwdllm.tail.source_blake3".into(),
            GgufValue::String(source_blake3.into()),
        ),
    ]);

    let infos = plan
        .iter()
        .map(|p| {
            let ne0 = *p.dims.first().unwrap_or(&1);
            let rows: u64 = p.dims.iter().skip(1).product();
            let row_bytes = rows::ggml_row_bytes(p.ggml_type, ne0 as usize).ok_or_else(|| {
                tail_err(
                    src,
                    format!(
                        "tensor {} has rows of {ne0} values, not whole blocks of ggml type {}",
                        p.name, p.ggml_type
                    ),
                )
            })?;
            Ok(gguf::TensorInfo {
                name: p.name.as_str(),
                dims: p.dims.as_slice(),
                ggml_type: p.ggml_type,
                n_bytes: rows * row_bytes as u64,
            })
        })
        .collect::<Result<Vec<_>, EngineError>>()?;
    let (hdr, alignment) = gguf::gguf_header(&kv, &infos);
    let out = File::create(dst).map_err(|e| EngineError::io(dst, e))?;
    let mut w = BufWriter::with_capacity(1 << 20, out);
    let io = |e| EngineError::io(dst, e);
    w.write_all(&hdr).map_err(io)?;
    let mut input = File::open(src).map_err(|e| EngineError::io(src, e))?;
    let mut raw = Vec::new();
    let mut vals = Vec::new();
    let mut bytes = Vec::new();
    for p in &plan {
        let t = p.source;
        let ne0 = *t.dims.first().unwrap_or(&1);
        let src_rows: u64 = t.dims.iter().skip(1).product();
        let row_bytes = rows::ggml_row_bytes(t.ggml_type, ne0 as usize).ok_or_else(|| {
            tail_err(
                src,
                format!(
                    "tensor {} has unsupported ggml type {}",
                    t.name, t.ggml_type
                ),
            )
        })? as u64;
        let all: Vec<u64>;
        let rows = match &p.rows {
            Some(r) => r,
            None => {
                all = (0..src_rows).collect();
                &all
            }
        };
        raw.resize(row_bytes as usize, 0);
        vals.resize(ne0 as usize, 0f32);
        let mut written = 0usize;
        for &r in rows {
            let at = header.data_offset + t.offset + r * row_bytes;
            input
                .seek(SeekFrom::Start(at))
                .map_err(|e| EngineError::io(src, e))?;
            input.read_exact(&mut raw).map_err(|e| {
                tail_err(
                    src,
                    format!("tensor {} row {r}: {e} (truncated file?)", t.name),
                )
            })?;
            rows::dequantize_row(t.ggml_type, &raw, &mut vals)
                .map_err(|e| tail_err(src, format!("tensor {}: {e}", t.name)))?;
            bytes.clear();
            if p.ggml_type == gguf::GGML_TYPE_F32 {
                for v in &vals {
                    bytes.extend_from_slice(&v.to_le_bytes());
                }
            } else {
                rows::quantize_rows(p.ggml_type, &vals, vals.len(), &mut bytes)
                    .map_err(|e| tail_err(src, format!("tensor {}: {e}", t.name)))?;
            }
            w.write_all(&bytes).map_err(io)?;
            written += bytes.len();
        }
        for i in 0..p.unit_rows {
            bytes.clear();
            for c in 0..ne0 {
                bytes.extend_from_slice(&(if c == i { 1f32 } else { 0f32 }).to_le_bytes());
            }
            w.write_all(&bytes).map_err(io)?;
            written += bytes.len();
        }
        w.write_all(&vec![0u8; gguf::pad_len(written, alignment)])
            .map_err(io)?;
    }
    let out = w
        .into_inner()
        .map_err(|e| EngineError::io(dst, e.into_error()))?;
    out.sync_all().map_err(|e| EngineError::io(dst, e))?;
    Ok(())
}

/// Rewrites a GGUF LoRA adapter for the full model (tensors `blk.{l}.…`) into one for the tail
/// model from `first_layer` (`blk.{l - first_layer}.…`). Fails on adapters that touch a layer
/// below the tail, on non-F32 adapters and on anything that is not a LoRA adapter GGUF.
pub fn shift_adapter(bytes: &[u8], first_layer: u32) -> Result<Vec<u8>, String> {
    let file = gguf::read_gguf(bytes).map_err(|e| e.to_string())?;
    if file.get("general.type").and_then(|v| v.as_str()) != Some("adapter") {
        return Err("not a GGUF adapter (general.type is not \"adapter\")".into());
    }
    let mut names = Vec::with_capacity(file.tensors.len());
    for t in &file.tensors {
        if t.ggml_type != gguf::GGML_TYPE_F32 {
            return Err(format!(
                "tensor {} is ggml type {}; the tail engine takes F32 adapters (as fwdllm exports them)",
                t.name, t.ggml_type
            ));
        }
        let rest = t
            .name
            .strip_prefix("blk.")
            .and_then(|r| r.split_once('.'))
            .and_then(|(i, tail)| i.parse::<u32>().ok().map(|i| (i, tail)));
        let Some((layer, tail)) = rest else {
            return Err(format!(
                "tensor {} is not a per-layer LoRA tensor; use engine.forward_path = \"full\"",
                t.name
            ));
        };
        if layer < first_layer {
            return Err(format!(
                "adapter tensor {} adapts layer {layer}, below the tail's first layer {first_layer}; use engine.forward_path = \"full\"",
                t.name
            ));
        }
        names.push(format!("blk.{}.{tail}", layer - first_layer));
    }
    let data: Vec<Vec<f32>> = file
        .tensors
        .iter()
        .map(|t| {
            file.tensor_f32(&t.name)
                .ok_or(format!("tensor {} unreadable", t.name))
        })
        .collect::<Result<_, _>>()?;
    let tensors: Vec<gguf::F32Tensor<'_>> = file
        .tensors
        .iter()
        .zip(&names)
        .zip(&data)
        .map(|((t, name), d)| gguf::F32Tensor {
            name,
            dims: &t.dims,
            data: d,
        })
        .collect();
    Ok(gguf::write_gguf_f32(&file.kv, &tensors))
}

/// The lowest layer a GGUF adapter's `blk.{l}.…` tensors touch (`None` if it has none or is
/// not a readable GGUF).
pub fn adapter_first_layer(bytes: &[u8]) -> Option<u32> {
    let header = gguf::read_gguf_header(bytes).ok()?;
    header
        .tensors
        .iter()
        .filter_map(|t| {
            t.name
                .strip_prefix("blk.")
                .and_then(|r| r.split_once('.'))
                .and_then(|(i, _)| i.parse().ok())
        })
        .min()
}

/// Hidden states at the tail's input, per prompt (token ids → `len × n_embd` floats), kept
/// least-recently-used within a byte budget in memory and, with a directory, on disk. The
/// prefix is frozen, so an entry never goes stale while the prefix model, its precision and
/// the first layer stay the same: the directory is named for those (see
/// [`prefix_states_dir`]), and the owner clears the memory part when they change. A device
/// thus runs the prefix once per example of its data, not once per round.
#[derive(Debug, Default)]
pub struct PrefixCache {
    budget_bytes: usize,
    used_bytes: usize,
    tick: u64,
    map: HashMap<Vec<Token>, (u64, Arc<[f32]>)>,
    dir: Option<PathBuf>,
    pub hits: u64,
    pub disk_hits: u64,
    pub misses: u64,
}

/// Directory of on-disk prefix states for one prefix: `prefix_id` must identify the prefix
/// model file, its precision and K/V type; `first_layer` the captured layer.
pub fn prefix_states_dir(cache_dir: &Path, prefix_id: &str, first_layer: u32) -> PathBuf {
    cache_dir
        .join("prefix-states")
        .join(format!("{prefix_id}-L{first_layer}"))
}

impl PrefixCache {
    pub fn new(budget_bytes: usize) -> Self {
        PrefixCache {
            budget_bytes,
            ..Default::default()
        }
    }

    /// Also keep every entry in `dir` (created on first write), one file per prompt.
    pub fn with_dir(mut self, dir: Option<PathBuf>) -> Self {
        self.dir = dir;
        self
    }

    fn file_of(dir: &Path, prompt: &[Token]) -> PathBuf {
        let mut h = blake3::Hasher::new();
        for t in prompt {
            h.update(&t.to_le_bytes());
        }
        dir.join(format!("{}.f32", &h.finalize().to_hex()[..32]))
    }

    /// Reads an entry written by [`PrefixCache::write_disk`]: the prompt's tokens, the states,
    /// and a BLAKE3 of both; anything else (torn write, other prompt, bit rot) is a miss.
    fn read_disk(dir: &Path, prompt: &[Token]) -> Option<Arc<[f32]>> {
        let bytes = std::fs::read(Self::file_of(dir, prompt)).ok()?;
        let (body, sum) = bytes.split_at_checked(bytes.len().checked_sub(32)?)?;
        if blake3::hash(body).as_bytes() != sum {
            return None;
        }
        let n_tok = u32::from_le_bytes(body.get(..4)?.try_into().ok()?) as usize;
        let toks_end = 4 + 4 * n_tok;
        let toks = body.get(4..toks_end)?;
        if n_tok != prompt.len()
            || toks
                .chunks_exact(4)
                .zip(prompt)
                .any(|(c, t)| c != t.to_le_bytes())
        {
            return None;
        }
        let floats = body.get(toks_end..)?;
        if floats.len() % 4 != 0 {
            return None;
        }
        Some(
            floats
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        )
    }

    fn write_disk(dir: &Path, prompt: &[Token], states: &[f32]) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let mut body = Vec::with_capacity(4 + 4 * prompt.len() + 4 * states.len() + 32);
        body.extend_from_slice(&(prompt.len() as u32).to_le_bytes());
        for t in prompt {
            body.extend_from_slice(&t.to_le_bytes());
        }
        for v in states {
            body.extend_from_slice(&v.to_le_bytes());
        }
        let sum = blake3::hash(&body);
        body.extend_from_slice(sum.as_bytes());
        let path = Self::file_of(dir, prompt);
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, &body)?;
        std::fs::rename(&tmp, &path)
    }

    pub fn get(&mut self, prompt: &[Token]) -> Option<Arc<[f32]>> {
        self.tick += 1;
        let tick = self.tick;
        if let Some((t, v)) = self.map.get_mut(prompt) {
            *t = tick;
            self.hits += 1;
            return Some(v.clone());
        }
        if let Some(v) = self.dir.as_deref().and_then(|d| Self::read_disk(d, prompt)) {
            self.disk_hits += 1;
            self.remember(prompt.to_vec(), v.clone());
            return Some(v);
        }
        self.misses += 1;
        None
    }

    /// Stores `states` for `prompt` (on disk too, if the cache has a directory; a failed disk
    /// write is logged and only costs a recomputation later).
    pub fn insert(&mut self, prompt: Vec<Token>, states: Arc<[f32]>) {
        if let Some(dir) = &self.dir {
            if let Err(e) = Self::write_disk(dir, &prompt, &states) {
                log::warn!("prefix state cache {}: {e}", dir.display());
            }
        }
        self.remember(prompt, states);
    }

    /// Keeps `states` in memory, evicting the least recently used entries to stay within the
    /// budget (an entry larger than the whole budget is not kept).
    fn remember(&mut self, prompt: Vec<Token>, states: Arc<[f32]>) {
        let size = states.len() * 4;
        if size > self.budget_bytes {
            return;
        }
        while self.used_bytes + size > self.budget_bytes {
            let Some(oldest) = self
                .map
                .iter()
                .min_by_key(|(_, (t, _))| *t)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some((_, v)) = self.map.remove(&oldest) {
                self.used_bytes -= v.len() * 4;
            }
        }
        self.tick += 1;
        if let Some((_, old)) = self.map.insert(prompt, (self.tick, states)) {
            self.used_bytes -= old.len() * 4;
        }
        self.used_bytes += size;
    }

    pub fn clear(&mut self) {
        self.map.clear();
        self.used_bytes = 0;
    }

    pub fn used_bytes(&self) -> usize {
        self.used_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_evicts_least_recently_used_within_budget() {
        let mut c = PrefixCache::new(3 * 4 * 4); // three entries of 4 floats
        for k in 0..3 {
            c.insert(vec![k], Arc::from(vec![k as f32; 4]));
        }
        assert!(c.get(&[0]).is_some()); // 0 is now the most recent
        c.insert(vec![3], Arc::from(vec![3.0; 4]));
        assert!(c.get(&[1]).is_none(), "1 was least recently used");
        assert!(c.get(&[0]).is_some() && c.get(&[2]).is_some() && c.get(&[3]).is_some());
        assert_eq!(c.used_bytes(), 48);
        c.insert(vec![9], Arc::from(vec![0.0; 100])); // larger than the budget: not kept
        assert!(c.get(&[9]).is_none());
        assert_eq!(c.used_bytes(), 48);
    }

    #[test]
    fn disk_entries_survive_a_new_cache_and_corruption_is_a_miss() {
        let dir = tempfile::tempdir().unwrap();
        let states: Arc<[f32]> = Arc::from(vec![1.5f32, -2.0, 3.25, 0.0]);
        let mut c = PrefixCache::new(1 << 20).with_dir(Some(dir.path().to_path_buf()));
        c.insert(vec![5, 6], states.clone());
        let mut fresh = PrefixCache::new(1 << 20).with_dir(Some(dir.path().to_path_buf()));
        assert_eq!(fresh.get(&[5, 6]).as_deref(), Some(&states[..]));
        assert_eq!((fresh.disk_hits, fresh.misses), (1, 0));
        assert!(fresh.get(&[5, 7]).is_none(), "another prompt");
        // Flip one byte of the stored states: the checksum turns it into a miss.
        let file = PrefixCache::file_of(dir.path(), &[5, 6]);
        let mut bytes = std::fs::read(&file).unwrap();
        bytes[13] ^= 1;
        std::fs::write(&file, bytes).unwrap();
        let mut again = PrefixCache::new(1 << 20).with_dir(Some(dir.path().to_path_buf()));
        assert!(again.get(&[5, 6]).is_none());
    }

    #[test]
    fn head_ids_are_stable_and_distinct() {
        let a = TailHead::Labels(vec![1, 2, 3]);
        let b = TailHead::Labels(vec![1, 3, 2]);
        assert_eq!(a.id(), TailHead::Labels(vec![1, 2, 3]).id());
        assert_ne!(a.id(), b.id());
        assert_eq!(TailHead::Full.id(), "full");
        assert!(!TailHead::Full.serves(&a) && a.serves(&a) && !a.serves(&b));
    }
}
