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
    /// The RMSNorm gain before attention (`blk.N.attn_norm.weight`, `n_embd` values): not a
    /// LoRA but a trainable additive delta on the gain, in units of the tensor's RMS
    /// ([`norm_gains`]). Appended after the projections so their tags (and every existing
    /// descriptor and wire encoding) are unchanged.
    #[serde(rename = "attn_norm")]
    AttnNorm,
    /// The RMSNorm gain before the feed-forward block (`blk.N.ffn_norm.weight`), as [`LoraModule::AttnNorm`].
    #[serde(rename = "ffn_norm")]
    FfnNorm,
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

    /// The RMSNorm gains a layout can train (see [`LoraModule::AttnNorm`]).
    pub const NORMS: [LoraModule; 2] = [LoraModule::AttnNorm, LoraModule::FfnNorm];

    /// Whether this is an RMSNorm gain rather than a projection carrying a LoRA.
    pub fn is_norm(self) -> bool {
        matches!(self, LoraModule::AttnNorm | LoraModule::FfnNorm)
    }

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
            LoraModule::AttnNorm => "attn_norm",
            LoraModule::FfnNorm => "ffn_norm",
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
#[error("unknown LoRA module `{0}`; valid names: attn_q, attn_k, attn_v, attn_output, ffn_gate, ffn_up, ffn_down, attn_norm, ffn_norm")]
pub struct UnknownModule(pub String);

impl FromStr for LoraModule {
    type Err = UnknownModule;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        LoraModule::ALL
            .into_iter()
            .chain(LoraModule::NORMS)
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
    /// ffn_gate/up are `n_embd -> n_ff`; ffn_down is `n_ff -> n_embd`; a norm gain is
    /// `(n_embd, 1)` (a vector, no projection).
    pub fn module_dims(&self, m: LoraModule) -> (u32, u32) {
        let kv = self.n_embd.checked_div(self.n_head).unwrap_or(0) * self.n_head_kv;
        match m {
            LoraModule::AttnQ | LoraModule::AttnOutput => (self.n_embd, self.n_embd),
            LoraModule::AttnK | LoraModule::AttnV => (self.n_embd, kv),
            LoraModule::FfnGate | LoraModule::FfnUp => (self.n_embd, self.n_ff),
            LoraModule::FfnDown => (self.n_ff, self.n_embd),
            LoraModule::AttnNorm | LoraModule::FfnNorm => (self.n_embd, 1),
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
/// is 1), modules `[attn_q, attn_v]`, all layers, only B trainable, init seed 0, no head rows,
/// dense perturbations.
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
    /// Verbalizer head rows: trainable deltas on the output-head rows of the task's `head_rows`
    /// label words, plus one bias per label (0 = none). Must equal the task's label count.
    /// With only these trainable the features are fixed per example, so a perturbation costs a
    /// `head_rows x n_embd` product instead of a forward pass.
    pub head_rows: u32,
    /// Scale of the head parameters: the logit of label k is `z_k + head_alpha · (Δ_k·h + b_k)`
    /// (as `alpha / rank` scales the adapter), so one learning rate suits both blocks.
    pub head_alpha: f32,
    /// Block-wise perturbation: a seed perturbs either the adapter block (even seed) or the
    /// head block (odd seed), never both. Needs modules and head rows. Head-block
    /// perturbations reuse the unperturbed pass's features, so they cost no forward pass.
    pub blockwise: bool,
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
            head_rows: 0,
            head_alpha: 1.0,
            blockwise: false,
        }
    }
}

/// Which trainable values a direction perturbs (see [`LoraLayout::block_of`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DirectionBlock {
    /// Every trainable value (dense perturbation).
    All,
    /// The adapter's trainable values only.
    Adapter,
    /// The head rows and biases only.
    Head,
}

/// Where the head rows live in the flat parameter vector (after every adapter tensor).
#[derive(Debug, Clone, PartialEq)]
pub struct HeadBlock {
    /// Number of label rows K.
    pub rows: u32,
    pub n_embd: u32,
    /// Row-major `K x n_embd` deltas on the label rows.
    pub delta: Range<usize>,
    /// K biases.
    pub bias: Range<usize>,
    pub alpha: f32,
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
    #[error("lora.modules is empty and lora.head_rows is 0; list at least one of attn_q, attn_k, attn_v, attn_output, ffn_gate, ffn_up, ffn_down, attn_norm, ffn_norm, or set head_rows to the task's label count")]
    NoModules,
    #[error("lora.head_alpha is {0}; set head_alpha to a finite number > 0")]
    BadHeadAlpha(f32),
    #[error("lora.blockwise needs both an adapter (modules) and head rows (head_rows > 0); set blockwise = false")]
    BlockwiseNeedsTwoBlocks,
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
    #[error("the layout adapts layer {layer}, below the tail engine's first layer {first_layer}; use engine.forward_path = \"full\" or a layout starting at or above it")]
    LayerBelowTail { layer: u32, first_layer: u32 },
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

/// One trained RMSNorm gain: where its delta lives in the flat parameter vector. The gain the
/// model uses is [`norm_gains`]`(base, delta)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormTensor {
    pub layer: u32,
    /// [`LoraModule::AttnNorm`] or [`LoraModule::FfnNorm`].
    pub module: LoraModule,
    /// `n_embd` values, initialised to 0.
    pub delta: Range<usize>,
}

impl NormTensor {
    /// llama.cpp name of the gain, e.g. `blk.3.attn_norm.weight`.
    pub fn base_name(&self) -> String {
        format!("blk.{}.{}.weight", self.layer, self.module.gguf_name())
    }
}

/// The gains a trained norm delta stands for: `base + rms(base) · delta`, element-wise, with
/// `rms` the root mean square of the base gain tensor (f64 sum in index order, so every
/// platform gets the same bits). Scaling by the tensor's RMS makes a unit direction a change
/// of the same relative size in every norm: the gains of SmolLM2 range from 0.03 to 0.4 in
/// mean magnitude, and unscaled unit directions diverged at every lr tried
/// (docs/studies/sft-layouts.md).
pub fn norm_gains(base: &[f32], delta: &[f32], out: &mut Vec<f32>) {
    let ss: f64 = base.iter().map(|&g| f64::from(g) * f64::from(g)).sum();
    let rms = (ss / base.len().max(1) as f64).sqrt() as f32;
    out.clear();
    out.extend(base.iter().zip(delta).map(|(&g, &d)| g + rms * d));
}

/// Validated mapping from `(ModelShape, LoraConfig)` to ranges of the flat parameter vector.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraLayout {
    shape: ModelShape,
    config: LoraConfig,
    tensors: Vec<LoraTensor>,
    norms: Vec<NormTensor>,
    head: Option<HeadBlock>,
    trainable: Vec<Range<usize>>,
    total_len: usize,
    trainable_len: usize,
    adapter_trainable_len: usize,
}

impl LoraLayout {
    /// Validates `config` against `shape` and returns the parameter count of its layout
    /// without building it. Decoders of untrusted messages compare a message's parameter count
    /// with this first: [`LoraLayout::new`] allocates per tensor, and a claimed shape of 10⁹
    /// tiny layers would otherwise abort the process on allocation (found by `make fuzz`).
    pub fn checked_len(shape: &ModelShape, config: &LoraConfig) -> Result<usize, LoraError> {
        shape.validate()?;
        if config.rank == 0 {
            return Err(LoraError::ZeroRank);
        }
        if !config.alpha.is_finite() || config.alpha <= 0.0 {
            return Err(LoraError::BadAlpha(config.alpha));
        }
        if config.modules.is_empty() && config.head_rows == 0 {
            return Err(LoraError::NoModules);
        }
        if !config.head_alpha.is_finite() || config.head_alpha <= 0.0 {
            return Err(LoraError::BadHeadAlpha(config.head_alpha));
        }
        if config.blockwise && (config.modules.is_empty() || config.head_rows == 0) {
            return Err(LoraError::BlockwiseNeedsTwoBlocks);
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
            .filter(|m| !m.is_norm())
            .map(|m| {
                let (i, o) = shape.module_dims(*m);
                i.min(o)
            })
            .min()
            .unwrap_or(u32::MAX);
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
                if m.is_norm() {
                    u128::from(i)
                } else {
                    u128::from(config.rank) * (u128::from(i) + u128::from(o))
                }
            })
            .sum();
        let head_len = u128::from(config.head_rows) * (u128::from(shape.n_embd) + 1);
        let total = per_layer * u128::from(end - start) + head_len;
        if total > isize::MAX as u128 / 4 {
            return Err(LoraError::TooLarge(total));
        }
        Ok(total as usize)
    }

    /// Validates `config` against `shape` and computes the layout.
    pub fn new(shape: &ModelShape, config: &LoraConfig) -> Result<LoraLayout, LoraError> {
        LoraLayout::checked_len(shape, config)?;
        let (start, end) = config.layers.unwrap_or((0, shape.n_layer));
        let r = config.rank as usize;
        let mut tensors = Vec::with_capacity((end - start) as usize * config.modules.len());
        let mut trainable: Vec<Range<usize>> = Vec::new();
        let mut push_trainable = |range: Range<usize>| match trainable.last_mut() {
            Some(last) if last.end == range.start => last.end = range.end,
            _ => trainable.push(range),
        };
        let mut off = 0usize;
        for layer in start..end {
            for &module in config.modules.iter().filter(|m| !m.is_norm()) {
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
        // Norm gains after every LoRA tensor (layers ascending, config order), before the head.
        let mut norms = Vec::new();
        for layer in start..end {
            for &module in config.modules.iter().filter(|m| m.is_norm()) {
                let delta = off..off + shape.n_embd as usize;
                off = delta.end;
                push_trainable(delta.clone());
                norms.push(NormTensor {
                    layer,
                    module,
                    delta,
                });
            }
        }
        let adapter_trainable_len: usize = tensors
            .iter()
            .map(|t| if config.trainable == Trainable::AB { t.a.len() } else { 0 } + t.b.len())
            .sum::<usize>()
            + norms.iter().map(|n| n.delta.len()).sum::<usize>();
        let head = (config.head_rows > 0).then(|| {
            let k = config.head_rows as usize;
            let delta = off..off + k * shape.n_embd as usize;
            let bias = delta.end..delta.end + k;
            off = bias.end;
            push_trainable(delta.start..bias.end);
            HeadBlock {
                rows: config.head_rows,
                n_embd: shape.n_embd,
                delta,
                bias,
                alpha: config.head_alpha,
            }
        });
        let trainable_len = trainable.iter().map(|r| r.len()).sum();
        Ok(LoraLayout {
            shape: shape.clone(),
            config: config.clone(),
            tensors,
            norms,
            head,
            trainable,
            total_len: off,
            trainable_len,
            adapter_trainable_len,
        })
    }

    /// The head rows block, if the layout has one.
    pub fn head(&self) -> Option<&HeadBlock> {
        self.head.as_ref()
    }

    /// The block a direction seed perturbs: [`DirectionBlock::All`] unless the layout is
    /// block-wise, then odd seeds perturb the head and even seeds the adapter (pinned: part
    /// of the replay protocol).
    pub fn block_of(&self, seed: u64) -> DirectionBlock {
        if !self.config.blockwise {
            DirectionBlock::All
        } else if seed & 1 == 1 {
            DirectionBlock::Head
        } else {
            DirectionBlock::Adapter
        }
    }

    /// A seed in `block` made from a raw (uniformly random) seed: bit 0 cleared for the adapter
    /// block, set for the head block, unchanged for [`DirectionBlock::All`]. Two raw seeds that
    /// differ only in bit 0 then give the same direction, a 2^-63 event for random seeds that
    /// costs nothing but a repeated direction.
    pub fn seed_in_block(raw: u64, block: DirectionBlock) -> u64 {
        match block {
            DirectionBlock::All => raw,
            DirectionBlock::Adapter => raw & !1,
            DirectionBlock::Head => raw | 1,
        }
    }

    /// Direction indices (positions in the trainable concatenation) a block covers: the head
    /// block is the last `head_rows·(n_embd+1)` trainable values.
    pub fn block_span(&self, block: DirectionBlock) -> Range<u64> {
        let split = self.adapter_trainable_len as u64;
        match block {
            DirectionBlock::All => 0..self.trainable_len as u64,
            DirectionBlock::Adapter => 0..split,
            DirectionBlock::Head => split..self.trainable_len as u64,
        }
    }

    /// Number of trainable values of the adapter tensors (all of them without head rows).
    pub fn adapter_trainable_len(&self) -> usize {
        self.adapter_trainable_len
    }

    /// The lowest layer this layout adapts (`None` for an empty layout). Layers below it are
    /// frozen for every perturbation: the tail engine computes them once per batch.
    pub fn first_layer(&self) -> Option<u32> {
        let lora = self.tensors.iter().map(|t| t.layer);
        lora.chain(self.norms.iter().map(|n| n.layer)).min()
    }

    /// The LoRA tensors (projections); norm gains are in [`LoraLayout::norms`].
    pub fn tensors(&self) -> &[LoraTensor] {
        &self.tensors
    }

    /// The trained RMSNorm gains, after every LoRA tensor in the parameter vector.
    pub fn norms(&self) -> &[NormTensor] {
        &self.norms
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
    /// tag byte (0 = B, 1 = AB), init_seed (u64 LE); then, only when the layout has head rows,
    /// `"head"`, head_rows (u32 LE), head_alpha (f32 bits LE), blockwise byte — so the hash of
    /// every layout without head rows is what it was before head rows existed.
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
        if c.head_rows > 0 {
            out.extend_from_slice(b"head");
            out.extend_from_slice(&c.head_rows.to_le_bytes());
            out.extend_from_slice(&c.head_alpha.to_bits().to_le_bytes());
            out.push(u8::from(c.blockwise));
        }
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
        // Chunked LE conversion: no allocation, same bytes on every endianness. 64 KiB
        // chunks let blake3 hash many 1 KiB chunks in parallel SIMD lanes.
        const N: usize = 16 * 1024;
        let mut buf = [0u8; 4 * N];
        for chunk in params.chunks(N) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_shape() -> ModelShape {
        crate::fixtures::golden_shape()
    }

    fn tiny_config() -> LoraConfig {
        crate::fixtures::golden_lora()
    }

    #[test]
    fn norm_gains_layout_sits_after_the_lora_tensors_and_is_all_trainable() {
        let s = ModelShape::smollm2_135m();
        let config = LoraConfig {
            modules: vec![LoraModule::AttnNorm, LoraModule::FfnNorm],
            layers: None,
            trainable: Trainable::B,
            ..LoraConfig::default()
        };
        let l = LoraLayout::new(&s, &config).unwrap();
        assert!(l.tensors().is_empty());
        assert_eq!(l.norms().len(), 60);
        assert_eq!(l.total_len(), 60 * 576);
        assert_eq!(l.adapter_trainable_len(), 60 * 576);
        assert_eq!(l.first_layer(), Some(0));
        assert_eq!(l.norms()[1].base_name(), "blk.0.ffn_norm.weight");
        assert_eq!(l.norms()[59].delta, 59 * 576..60 * 576);
        // With a LoRA tensor in the list the norms follow every LoRA tensor.
        let mixed = LoraLayout::new(
            &s,
            &LoraConfig {
                modules: vec![LoraModule::AttnNorm, LoraModule::AttnV],
                layers: Some((28, 30)),
                ..config
            },
        )
        .unwrap();
        let lora_end = mixed.tensors().last().unwrap().b.end;
        assert_eq!(mixed.norms()[0].delta.start, lora_end);
        assert_eq!(mixed.first_layer(), Some(28));
        assert_eq!(
            "ffn_norm".parse::<LoraModule>().unwrap(),
            LoraModule::FfnNorm
        );
    }

    #[test]
    fn norm_gains_scale_the_delta_by_the_tensors_rms_golden() {
        let mut out = Vec::new();
        norm_gains(&[3.0, -4.0, 0.0, 5.0], &[0.0, 1.0, -2.0, 0.5], &mut out);
        // rms = sqrt((9 + 16 + 0 + 25) / 4) = sqrt(12.5)
        let r = 12.5f64.sqrt() as f32;
        assert_eq!(out, [3.0, -4.0 + r, -2.0 * r, 5.0 + 0.5 * r]);
        let bits: Vec<u32> = out.iter().map(|x| x.to_bits()).collect();
        // Golden bits: the same on every platform (f64 sum, one f32 rounding per step).
        assert_eq!(bits, [1077936128, 3203255936, 3236054576, 1087934860]);
    }

    #[test]
    fn smollm2_module_dims() {
        let s = ModelShape::smollm2_135m();
        let check = |m: LoraModule, expect: (u32, u32)| assert_eq!(s.module_dims(m), expect, "{m}");
        check(LoraModule::AttnQ, (576, 576));
        check(LoraModule::AttnK, (576, 192));
        check(LoraModule::AttnV, (576, 192));
        check(LoraModule::AttnOutput, (576, 576));
        check(LoraModule::FfnGate, (576, 1536));
        check(LoraModule::FfnUp, (576, 1536));
        check(LoraModule::FfnDown, (1536, 576));
    }

    #[test]
    fn default_layout_on_smollm2() {
        let layout = LoraLayout::new(&ModelShape::smollm2_135m(), &LoraConfig::default()).unwrap();
        // 30 layers x rank 2 x ((576 + 576) for q + (576 + 192) for v).
        assert_eq!(layout.total_len(), 30 * 2 * (1152 + 768));
        // Only B: 30 x 2 x (576 + 192).
        assert_eq!(layout.trainable_len(), 30 * 2 * (576 + 192));
        assert_eq!(layout.tensors().len(), 60);
        let t = &layout.tensors()[1];
        assert_eq!(
            (t.layer, t.module, t.in_dim, t.out_dim),
            (0, LoraModule::AttnV, 576, 192)
        );
        assert_eq!(t.base_name(), "blk.0.attn_v.weight");
    }

    #[test]
    fn layout_order_is_layers_then_config_modules_then_a_b() {
        let layout = LoraLayout::new(&tiny_shape(), &tiny_config()).unwrap();
        let names: Vec<_> = layout
            .tensors()
            .iter()
            .map(|t| (t.layer, t.module))
            .collect();
        use LoraModule::*;
        assert_eq!(
            names,
            [
                (0, AttnQ),
                (0, AttnV),
                (0, FfnDown),
                (1, AttnQ),
                (1, AttnV),
                (1, FfnDown)
            ]
        );
        let t = &layout.tensors()[0];
        assert_eq!((t.a.clone(), t.b.clone()), (0..16, 16..32));
        // AB: adjacent trainable ranges merge into one.
        let ranges = layout.trainable_ranges();
        assert_eq!(
            (ranges.len(), ranges[0].clone()),
            (1, 0..layout.total_len())
        );
    }

    #[test]
    fn config_errors_name_field_and_fix() {
        let shape = tiny_shape();
        let check = |edit: &dyn Fn(&mut LoraConfig), expect: LoraError, words: &[&str]| {
            let mut c = tiny_config();
            edit(&mut c);
            let err = LoraLayout::new(&shape, &c).unwrap_err();
            assert_eq!(err, expect);
            let msg = err.to_string();
            for w in words {
                assert!(msg.contains(w), "`{msg}` lacks `{w}`");
            }
        };
        check(
            &|c| c.rank = 0,
            LoraError::ZeroRank,
            &["lora.rank", "positive"],
        );
        check(
            &|c| c.rank = 5,
            LoraError::RankTooLarge {
                rank: 5,
                min_dim: 4,
            },
            &["lora.rank", "rank <= 4"],
        );
        check(
            &|c| c.modules.clear(),
            LoraError::NoModules,
            &["lora.modules", "attn_q"],
        );
        check(
            &|c| c.modules.push(LoraModule::AttnQ),
            LoraError::DuplicateModule(LoraModule::AttnQ),
            &["attn_q", "once"],
        );
        check(
            &|c| c.layers = Some((1, 1)),
            LoraError::EmptyLayerRange { start: 1, end: 1 },
            &["lora.layers", "start < end"],
        );
        check(
            &|c| c.layers = Some((1, 3)),
            LoraError::LayerRangeOutOfBounds {
                start: 1,
                end: 3,
                n_layer: 2,
            },
            &["lora.layers", "end <= 2"],
        );
        for bad in [0.0, -1.0, f32::INFINITY] {
            check(
                &|c| c.alpha = bad,
                LoraError::BadAlpha(bad),
                &["lora.alpha", "> 0"],
            );
        }
        let mut c = tiny_config();
        c.alpha = f32::NAN;
        assert!(matches!(LoraLayout::new(&shape, &c), Err(LoraError::BadAlpha(a)) if a.is_nan()));
    }

    #[test]
    fn shape_errors() {
        let mut s = tiny_shape();
        s.n_head = 3;
        assert!(matches!(
            LoraLayout::new(&s, &tiny_config()),
            Err(LoraError::InconsistentHeads { .. })
        ));
        let mut s = tiny_shape();
        s.n_ff = 0;
        assert_eq!(
            LoraLayout::new(&s, &tiny_config()),
            Err(LoraError::ZeroShapeField { field: "n_ff" })
        );
    }

    #[test]
    fn module_names_parse_and_serialize() {
        for m in LoraModule::ALL {
            assert_eq!(m.gguf_name().parse::<LoraModule>(), Ok(m));
            assert_eq!(
                serde_json::to_string(&m).unwrap(),
                format!("\"{}\"", m.gguf_name())
            );
            assert_eq!(
                serde_json::from_str::<LoraModule>(&format!("\"{m}\"")).unwrap(),
                m
            );
        }
        let err = "attn_x".parse::<LoraModule>().unwrap_err().to_string();
        for m in LoraModule::ALL {
            assert!(err.contains(m.gguf_name()), "{err}");
        }
        assert!(err.contains("attn_x"));
    }

    #[test]
    fn config_serde_roundtrip_and_defaults() {
        let c = tiny_config();
        let json = serde_json::to_string(&c).unwrap();
        assert!(json.contains("\"trainable\":\"ab\""), "{json}");
        assert_eq!(serde_json::from_str::<LoraConfig>(&json).unwrap(), c);
        assert_eq!(
            serde_json::from_str::<LoraConfig>("{}").unwrap(),
            LoraConfig::default()
        );
        assert!(serde_json::from_str::<LoraConfig>("{\"rnak\": 3}").is_err());
    }

    #[test]
    fn init_is_seeded_scaled_and_b_is_zero() {
        let layout = LoraLayout::new(&tiny_shape(), &tiny_config()).unwrap();
        let w = LoraWeights::init(layout.clone());
        let bits: Vec<u32> = w.params()[..4].iter().map(|x| x.to_bits()).collect();
        assert_eq!(bits, [0x3edeeb0d, 0x3e761150, 0x3ce92b20, 0x3eb1eade]);
        for t in layout.tensors() {
            assert!(w.params()[t.b.clone()].iter().all(|&x| x.to_bits() == 0));
            let a = &w.params()[t.a.clone()];
            let bound = 6.0 / (t.in_dim as f32).sqrt() * 1.0001;
            assert!(a.iter().all(|x| x.abs() <= bound) && a.iter().any(|&x| x != 0.0));
        }
        // Distinct tensors get distinct streams.
        let t = layout.tensors();
        assert_ne!(w.params()[t[0].a.clone()], w.params()[t[3].a.clone()]);
        assert_eq!(LoraWeights::init(layout.clone()), w);
        let mut other = tiny_config();
        other.init_seed = 43;
        let w2 = LoraWeights::init(LoraLayout::new(&tiny_shape(), &other).unwrap());
        assert_ne!(w2.params(), w.params());
    }

    #[test]
    fn golden_init_hash() {
        let w = LoraWeights::init(LoraLayout::new(&tiny_shape(), &tiny_config()).unwrap());
        assert_eq!(
            w.hash().to_string(),
            "93942d369161e62abab9eab122a88f47fef3cb2155223295639fbb1a3b31e1ed"
        );
    }

    #[test]
    fn hash_covers_layout_and_every_bit() {
        let layout = LoraLayout::new(&tiny_shape(), &tiny_config()).unwrap();
        let w = LoraWeights::init(layout.clone());
        let mut p = w.params().to_vec();
        p[7] = f32::from_bits(p[7].to_bits() ^ 1);
        assert_ne!(
            LoraWeights::from_params(layout.clone(), p).unwrap().hash(),
            w.hash()
        );
        let mut c = tiny_config();
        c.alpha = 2.0;
        let other = LoraLayout::new(&tiny_shape(), &c).unwrap();
        assert_ne!(
            LoraWeights::from_params(other, w.params().to_vec())
                .unwrap()
                .hash(),
            w.hash()
        );
        // -0.0 and +0.0 compare equal as floats but are different states.
        let z = LoraWeights::from_params(layout.clone(), vec![0.0; layout.total_len()]).unwrap();
        let mut nz = vec![0.0; layout.total_len()];
        nz[0] = -0.0;
        assert_ne!(
            LoraWeights::from_params(layout, nz).unwrap().hash(),
            z.hash()
        );
    }

    #[test]
    fn weights_hash_text_roundtrip() {
        let h = WeightsHash(std::array::from_fn(|i| i as u8 * 7));
        let s = h.to_string();
        assert_eq!(s.len(), 64);
        assert_eq!(s.parse::<WeightsHash>(), Ok(h));
        assert!("zz".parse::<WeightsHash>().is_err());
        assert!(s[..63].parse::<WeightsHash>().is_err());
        assert!(format!("{}é", &s[..62]).parse::<WeightsHash>().is_err());
        assert_eq!(
            serde_json::from_str::<WeightsHash>(&serde_json::to_string(&h).unwrap()).unwrap(),
            h
        );
    }

    #[test]
    fn from_params_checks_length_and_finiteness() {
        let layout = LoraLayout::new(&tiny_shape(), &tiny_config()).unwrap();
        let n = layout.total_len();
        assert_eq!(
            LoraWeights::from_params(layout.clone(), vec![0.0; n - 1]).unwrap_err(),
            LoraError::ParamLenMismatch {
                expected: n,
                got: n - 1
            }
        );
        let mut p = vec![0.0; n];
        p[5] = f32::INFINITY;
        assert!(matches!(
            LoraWeights::from_params(layout, p),
            Err(LoraError::NonFiniteParam { index: 5, .. })
        ));
    }

    #[test]
    fn trainable_norm_counts_only_trainable() {
        let mut c = tiny_config();
        c.trainable = Trainable::B;
        let layout = LoraLayout::new(&tiny_shape(), &c).unwrap();
        let mut w = LoraWeights::init(layout);
        assert_eq!(w.trainable_norm(), 0.0);
        let b0 = w.layout().tensors()[0].b.start;
        w.params_mut()[b0] = 3.0;
        w.params_mut()[b0 + 1] = -4.0;
        assert_eq!(w.trainable_norm(), 5.0);
    }
}
