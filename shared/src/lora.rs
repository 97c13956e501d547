//! LoRA parameter layout: which (layer, module) pairs carry adapters, where each A and B
//! matrix lives in the flat f32 parameter vector, which elements are trainable, the
//! deterministic initialisation and the [`WeightsHash`] that names a parameter state.
//!
//! **Invariants:**
//! * The layout is a pure function of `(ModelShape, LoraConfig)`: layers ascending, modules in
//!   config order, and per tensor A (row-major `rank x in`, ggml `ne = [in, rank]`) followed by
//!   B (row-major `out x rank`, ggml `ne = [rank, out]`). Tensor ranges are disjoint and tile
//!   `0..total_len()` exactly.
//! * Direction index `j` maps to the `j`-th trainable element in layout order
//!   ([`LoraLayout::trainable_ranges`]).
//! * [`LoraWeights::init`] is bit-identical everywhere: A = `gaussian_approx` × `1/sqrt(in)`
//!   (`f32::sqrt` and `/` are IEEE correctly rounded, hence portable), B = 0.
//! * [`WeightsHash`] = blake3(`descriptor_bytes` ‖ params as little-endian f32), so two
//!   replicas agree on a hash only if they agree on layout *and* every parameter bit.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::perturb;

/// A projection inside a llama transformer block that can carry a LoRA adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum LoraModule {
    #[serde(rename = "attn_q")]
    AttnQ,
    #[serde(rename = "attn_k")]
    AttnK,
    #[serde(rename = "attn_v")]
    AttnV,
    #[serde(rename = "attn_output")]
    AttnOutput,
    #[serde(rename = "ffn_gate")]
    FfnGate,
    #[serde(rename = "ffn_up")]
    FfnUp,
    #[serde(rename = "ffn_down")]
    FfnDown,
}

impl LoraModule {
    /// Every module, in canonical order.
    pub const ALL: [LoraModule; 7] = [
        LoraModule::AttnQ,
        LoraModule::AttnK,
        LoraModule::AttnV,
        LoraModule::AttnOutput,
        LoraModule::FfnGate,
        LoraModule::FfnUp,
        LoraModule::FfnDown,
    ];

    /// Tensor name fragment used by llama.cpp (`blk.{layer}.{name}.weight`).
    pub fn gguf_name(&self) -> &'static str {
        match self {
            LoraModule::AttnQ => "attn_q",
            LoraModule::AttnK => "attn_k",
            LoraModule::AttnV => "attn_v",
            LoraModule::AttnOutput => "attn_output",
            LoraModule::FfnGate => "ffn_gate",
            LoraModule::FfnUp => "ffn_up",
            LoraModule::FfnDown => "ffn_down",
        }
    }

    /// Stable numeric tag used in [`LoraLayout::descriptor_bytes`] and init seeds.
    fn tag(self) -> u8 {
        self as u8
    }
}

impl fmt::Display for LoraModule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.gguf_name())
    }
}

/// Error of [`LoraModule::from_str`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown LoRA module `{0}`; valid names: attn_q, attn_k, attn_v, attn_output, ffn_gate, ffn_up, ffn_down")]
pub struct UnknownModule(pub String);

impl FromStr for LoraModule {
    type Err = UnknownModule;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        LoraModule::ALL
            .into_iter()
            .find(|m| m.gguf_name() == s)
            .ok_or_else(|| UnknownModule(s.to_string()))
    }
}

/// Dimensions of the base model that a LoRA layout must match.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ModelShape {
    /// `general.architecture` of the model (e.g. "llama"); written into adapters.
    pub arch: String,
    pub n_layer: u32,
    pub n_embd: u32,
    pub n_head: u32,
    pub n_head_kv: u32,
    pub n_ff: u32,
}

impl ModelShape {
    /// SmolLM2-135M-Instruct: llama, 30 layers, n_embd 576, 9 heads, 3 KV heads, n_ff 1536.
    pub fn smollm2_135m() -> Self {
        ModelShape {
            arch: "llama".to_string(),
            n_layer: 30,
            n_embd: 576,
            n_head: 9,
            n_head_kv: 3,
            n_ff: 1536,
        }
    }

    /// `(in, out)` of the base weight of module `m` (llama): q and attn_output are
    /// `n_embd -> n_embd`; k and v are `n_embd -> n_embd / n_head * n_head_kv` (GQA);
    /// ffn_gate/up are `n_embd -> n_ff`; ffn_down is `n_ff -> n_embd`.
    pub fn module_dims(&self, m: LoraModule) -> (u32, u32) {
        let kv = self.n_embd.checked_div(self.n_head).unwrap_or(0) * self.n_head_kv;
        match m {
            LoraModule::AttnQ | LoraModule::AttnOutput => (self.n_embd, self.n_embd),
            LoraModule::AttnK | LoraModule::AttnV => (self.n_embd, kv),
            LoraModule::FfnGate | LoraModule::FfnUp => (self.n_embd, self.n_ff),
            LoraModule::FfnDown => (self.n_ff, self.n_embd),
        }
    }

    fn validate(&self) -> Result<(), LoraError> {
        let bad = |field: &'static str, value: u32| {
            if value == 0 {
                Err(LoraError::ZeroShapeField { field })
            } else {
                Ok(())
            }
        };
        bad("n_layer", self.n_layer)?;
        bad("n_embd", self.n_embd)?;
        bad("n_head", self.n_head)?;
        bad("n_head_kv", self.n_head_kv)?;
        bad("n_ff", self.n_ff)?;
        if self.n_embd % self.n_head != 0 || self.n_head_kv > self.n_head {
            return Err(LoraError::InconsistentHeads {
                n_embd: self.n_embd,
                n_head: self.n_head,
                n_head_kv: self.n_head_kv,
            });
        }
        Ok(())
    }
}

/// Which LoRA matrices are perturbed and trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Trainable {
    /// A stays at its seeded initialisation; only B is trained (halves the perturbation
    /// dimension and keeps the update linear in the trained parameters).
    #[default]
    B,
    /// Both A and B are trained.
    AB,
}

/// LoRA hyper-parameters. Defaults: rank 2, alpha 2.0 (so llama.cpp's scale `alpha / rank`
/// is 1), modules `[attn_q, attn_v]`, all layers, only B trainable, init seed 0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    pub rank: u32,
    pub alpha: f32,
    pub modules: Vec<LoraModule>,
    /// Half-open layer range `[start, end)`; `None` = every layer of the model.
    pub layers: Option<(u32, u32)>,
    pub trainable: Trainable,
    pub init_seed: u64,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            rank: 2,
            alpha: 2.0,
            modules: vec![LoraModule::AttnQ, LoraModule::AttnV],
            layers: None,
            trainable: Trainable::B,
            init_seed: 0,
        }
    }
}

/// Invalid LoRA layout or parameter vector. Messages name the field and the fix.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LoraError {
    #[error("lora.rank is 0; set rank to a positive integer (typically 1..=16)")]
    ZeroRank,
    #[error("lora.rank {rank} exceeds the smallest adapted dimension {min_dim}; choose rank <= {min_dim}")]
    RankTooLarge { rank: u32, min_dim: u32 },
    #[error("lora.alpha is {0}; set alpha to a finite number > 0 (alpha = rank gives scale 1)")]
    BadAlpha(f32),
    #[error("lora.modules is empty; list at least one of attn_q, attn_k, attn_v, attn_output, ffn_gate, ffn_up, ffn_down")]
    NoModules,
    #[error("lora.modules lists `{0}` twice; list each module once")]
    DuplicateModule(LoraModule),
    #[error("lora.layers [{start}, {end}) is empty; use start < end (half-open range)")]
    EmptyLayerRange { start: u32, end: u32 },
    #[error("lora.layers [{start}, {end}) is out of bounds for a model with {n_layer} layers; use end <= {n_layer}")]
    LayerRangeOutOfBounds { start: u32, end: u32, n_layer: u32 },
    #[error("model shape field {field} is 0; the model metadata is invalid or was read from the wrong file")]
    ZeroShapeField { field: &'static str },
    #[error("model shape is inconsistent: n_embd {n_embd} must be divisible by n_head {n_head} and n_head_kv {n_head_kv} <= n_head")]
    InconsistentHeads {
        n_embd: u32,
        n_head: u32,
        n_head_kv: u32,
    },
    #[error("LoRA layout has {0} parameters, more than this platform can index; reduce rank, modules or layers")]
    TooLarge(u128),
    #[error("parameter vector has {got} values but the layout needs {expected}; the params belong to a different shape/config")]
    ParamLenMismatch { expected: usize, got: usize },
    #[error("parameter {index} is {value} (not finite); the parameter vector is corrupt")]
    NonFiniteParam { index: usize, value: f32 },
}

/// One adapted weight: where its A and B matrices live in the flat parameter vector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoraTensor {
    pub layer: u32,
    pub module: LoraModule,
    pub in_dim: u32,
    pub out_dim: u32,
    pub rank: u32,
    /// A: row-major `rank x in_dim` (ggml `ne = [in_dim, rank]`).
    pub a: Range<usize>,
    /// B: row-major `out_dim x rank` (ggml `ne = [rank, out_dim]`).
    pub b: Range<usize>,
}

impl LoraTensor {
    /// llama.cpp name of the base weight, e.g. `blk.3.attn_q.weight`.
    pub fn base_name(&self) -> String {
        format!("blk.{}.{}.weight", self.layer, self.module.gguf_name())
    }
}

/// Validated mapping from `(ModelShape, LoraConfig)` to ranges of the flat parameter vector.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraLayout {
    shape: ModelShape,
    config: LoraConfig,
    tensors: Vec<LoraTensor>,
    trainable: Vec<Range<usize>>,
    total_len: usize,
    trainable_len: usize,
}

impl LoraLayout {
    /// Validates `config` against `shape` and computes the layout.
    pub fn new(shape: &ModelShape, config: &LoraConfig) -> Result<LoraLayout, LoraError> {
        shape.validate()?;
        if config.rank == 0 {
            return Err(LoraError::ZeroRank);
        }
        if !config.alpha.is_finite() || config.alpha <= 0.0 {
            return Err(LoraError::BadAlpha(config.alpha));
        }
        if config.modules.is_empty() {
            return Err(LoraError::NoModules);
        }
        for (i, m) in config.modules.iter().enumerate() {
            if config.modules[..i].contains(m) {
                return Err(LoraError::DuplicateModule(*m));
            }
        }
        let (start, end) = config.layers.unwrap_or((0, shape.n_layer));
        if start >= end {
            return Err(LoraError::EmptyLayerRange { start, end });
        }
        if end > shape.n_layer {
            return Err(LoraError::LayerRangeOutOfBounds {
                start,
                end,
                n_layer: shape.n_layer,
            });
        }
        let min_dim = config
            .modules
            .iter()
            .map(|m| {
                let (i, o) = shape.module_dims(*m);
                i.min(o)
            })
            .min()
            .unwrap_or(0);
        if config.rank > min_dim {
            return Err(LoraError::RankTooLarge {
                rank: config.rank,
                min_dim,
            });
        }
        // Size check in u128 before any usize arithmetic can overflow (32-bit ARM targets).
        let per_layer: u128 = config
            .modules
            .iter()
            .map(|m| {
                let (i, o) = shape.module_dims(*m);
                u128::from(config.rank) * (u128::from(i) + u128::from(o))
            })
            .sum();
        let total = per_layer * u128::from(end - start);
        if total > isize::MAX as u128 / 4 {
            return Err(LoraError::TooLarge(total));
        }

        let r = config.rank as usize;
        let mut tensors = Vec::with_capacity((end - start) as usize * config.modules.len());
        let mut trainable: Vec<Range<usize>> = Vec::new();
        let mut push_trainable = |range: Range<usize>| match trainable.last_mut() {
            Some(last) if last.end == range.start => last.end = range.end,
            _ => trainable.push(range),
        };
        let mut off = 0usize;
        for layer in start..end {
            for &module in &config.modules {
                let (in_dim, out_dim) = shape.module_dims(module);
                let a = off..off + r * in_dim as usize;
                let b = a.end..a.end + out_dim as usize * r;
                off = b.end;
                if config.trainable == Trainable::AB {
                    push_trainable(a.clone());
                }
                push_trainable(b.clone());
                tensors.push(LoraTensor {
                    layer,
                    module,
                    in_dim,
                    out_dim,
                    rank: config.rank,
                    a,
                    b,
                });
            }
        }
        let trainable_len = trainable.iter().map(|r| r.len()).sum();
        Ok(LoraLayout {
            shape: shape.clone(),
            config: config.clone(),
            tensors,
            trainable,
            total_len: off,
            trainable_len,
        })
    }

    pub fn tensors(&self) -> &[LoraTensor] {
        &self.tensors
    }
    /// Number of f32 parameters (A and B of every tensor).
    pub fn total_len(&self) -> usize {
        self.total_len
    }
    /// Number of trainable (perturbed) parameters = length of a direction.
    pub fn trainable_len(&self) -> usize {
        self.trainable_len
    }
    /// Trainable parameter ranges in layout order, adjacent ranges merged. Direction index
    /// `j` maps to the `j`-th element of the concatenation of these ranges.
    pub fn trainable_ranges(&self) -> &[Range<usize>] {
        &self.trainable
    }
    pub fn shape(&self) -> &ModelShape {
        &self.shape
    }
    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// Canonical bytes of shape + config (hand-encoded, independent of any serde format so
    /// that a serializer upgrade cannot change a [`WeightsHash`]):
    /// `"fwdllm-lora-layout-v1"`, arch as u32 LE length + UTF-8, n_layer, n_embd, n_head,
    /// n_head_kv, n_ff, rank (u32 LE), alpha (f32 bits LE), module count (u32 LE) + one tag
    /// byte per module (canonical order index), layer start, end (u32 LE, resolved), trainable
    /// tag byte (0 = B, 1 = AB), init_seed (u64 LE).
    pub fn descriptor_bytes(&self) -> Vec<u8> {
        let s = &self.shape;
        let c = &self.config;
        let (start, end) = c.layers.unwrap_or((0, s.n_layer));
        let mut out = Vec::with_capacity(96 + s.arch.len() + c.modules.len());
        out.extend_from_slice(b"fwdllm-lora-layout-v1");
        out.extend_from_slice(&(s.arch.len() as u32).to_le_bytes());
        out.extend_from_slice(s.arch.as_bytes());
        for v in [s.n_layer, s.n_embd, s.n_head, s.n_head_kv, s.n_ff, c.rank] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&c.alpha.to_bits().to_le_bytes());
        out.extend_from_slice(&(c.modules.len() as u32).to_le_bytes());
        out.extend(c.modules.iter().map(|m| m.tag()));
        out.extend_from_slice(&start.to_le_bytes());
        out.extend_from_slice(&end.to_le_bytes());
        out.push(match c.trainable {
            Trainable::B => 0,
            Trainable::AB => 1,
        });
        out.extend_from_slice(&c.init_seed.to_le_bytes());
        out
    }
}

/// blake3 of a layout descriptor and a parameter vector; names a model version's weights.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct WeightsHash(pub [u8; 32]);

impl WeightsHash {
    /// Hash of `descriptor || params as LE f32`.
    pub fn compute(descriptor: &[u8], params: &[f32]) -> WeightsHash {
        let mut h = blake3::Hasher::new();
        h.update(descriptor);
        // Chunked LE conversion: no allocation, same bytes on every endianness.
        let mut buf = [0u8; 4 * 1024];
        for chunk in params.chunks(1024) {
            for (dst, v) in buf.chunks_exact_mut(4).zip(chunk) {
                dst.copy_from_slice(&v.to_bits().to_le_bytes());
            }
            h.update(&buf[..chunk.len() * 4]);
        }
        WeightsHash(*h.finalize().as_bytes())
    }

    /// Lowercase hex (64 characters).
    pub fn to_hex(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for WeightsHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for WeightsHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WeightsHash({self})")
    }
}

/// Error of [`WeightsHash::from_str`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("weights hash `{0}` is not 64 hex digits")]
pub struct BadWeightsHash(pub String);

impl FromStr for WeightsHash {
    type Err = BadWeightsHash;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || BadWeightsHash(s.to_string());
        let bytes = s.as_bytes();
        if bytes.len() != 64 {
            return Err(err());
        }
        let mut out = [0u8; 32];
        for (o, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
            let hex = std::str::from_utf8(pair).map_err(|_| err())?;
            *o = u8::from_str_radix(hex, 16).map_err(|_| err())?;
        }
        Ok(WeightsHash(out))
    }
}

/// A layout plus its flat f32 parameter vector (the replica state every node agrees on).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraWeights {
    layout: LoraLayout,
    params: Vec<f32>,
}

impl LoraWeights {
    /// Deterministic initialisation: for tensor `t` (index in layout order), A =
    /// `gaussian_approx(mix_seed(init_seed, t))` × `1 / sqrt(in_dim)` (f32), B = 0.
    pub fn init(layout: LoraLayout) -> LoraWeights {
        let mut params = vec![0.0f32; layout.total_len()];
        let seed = layout.config.init_seed;
        for (t, tensor) in layout.tensors.iter().enumerate() {
            let a = &mut params[tensor.a.clone()];
            perturb::gaussian_approx(perturb::mix_seed(seed, t as u64), a);
            let scale = 1.0f32 / (tensor.in_dim as f32).sqrt();
            for x in a {
                *x *= scale;
            }
        }
        LoraWeights { layout, params }
    }

    /// Wraps an existing parameter vector (e.g. from a checkpoint); checks length and finiteness.
    pub fn from_params(layout: LoraLayout, params: Vec<f32>) -> Result<LoraWeights, LoraError> {
        if params.len() != layout.total_len() {
            return Err(LoraError::ParamLenMismatch {
                expected: layout.total_len(),
                got: params.len(),
            });
        }
        if let Some((index, &value)) = params.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(LoraError::NonFiniteParam { index, value });
        }
        Ok(LoraWeights { layout, params })
    }

    pub fn params(&self) -> &[f32] {
        &self.params
    }
    pub fn params_mut(&mut self) -> &mut [f32] {
        &mut self.params
    }
    pub fn layout(&self) -> &LoraLayout {
        &self.layout
    }
    /// The layout and mutable params at once (for in-place updates without copying ranges).
    pub fn layout_and_params_mut(&mut self) -> (&LoraLayout, &mut [f32]) {
        (&self.layout, &mut self.params)
    }
    /// Consumes the weights, returning the parameter vector.
    pub fn into_params(self) -> Vec<f32> {
        self.params
    }

    /// [`WeightsHash`] of this layout and parameter state.
    pub fn hash(&self) -> WeightsHash {
        WeightsHash::compute(&self.layout.descriptor_bytes(), &self.params)
    }

    /// Euclidean norm of the trainable parameters (f64 accumulation in layout order).
    pub fn trainable_norm(&self) -> f64 {
        let mut sum = 0.0f64;
        for r in self.layout.trainable_ranges() {
            for &x in &self.params[r.clone()] {
                sum += f64::from(x) * f64::from(x);
            }
        }
        sum.sqrt()
    }

    /// Iterates over the trainable parameters in direction order.
    pub fn trainable_values(&self) -> impl Iterator<Item = f32> + '_ {
        self.layout
            .trainable_ranges()
            .iter()
            .flat_map(|r| self.params[r.clone()].iter().copied())
    }
}
