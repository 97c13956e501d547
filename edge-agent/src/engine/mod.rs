//! The engine: forward-gradient LoRA fine-tuning on llama.cpp. Owns model loading at the
//! training precision ([`prepare`]), in-memory adapter swaps, the verbalizer classification
//! loss, the forward-gradient estimator, evaluation and the local (single-process) trainer.
//!
//! Surface used by the daemon and the aggregator's demo: [`Engine::load`], [`Engine::set_task`],
//! [`Engine::model_shape`], [`Engine::set_adapter`], [`Engine::loss`],
//! [`Engine::forward_gradients`], [`Engine::evaluate`], and the tuned [`TrainConfig`] defaults.
//!
//! This module holds the settings ([`EngineConfig`]), the errors and the [`Engine`] state; the
//! engine's methods live by concern:
//! - `load` — loading a model, and choosing the tail or the full path for a layout (`route`);
//! - `task` — [`Task`] (prompt pieces and label words as token ids) and tokenization;
//! - `adapter` — setting the adapter (from weights, GGUF bytes or a file) and clearing it;
//! - `forward` — running prompts on the path in use (full model, or prefix states + tail);
//! - `loss` — the verbalizer and instruction-tuning losses, label probabilities, evaluation;
//! - `estimator` — the forward-gradient estimator (central / one-sided, head-block directions).
//!
//! The tail path's files and caches are [`tail`]'s, the head rows `head`'s; the local-training
//! recipe ([`recipe`]: hyper-parameters, a step's seeds and coefficients), generation, SFT
//! evaluation and training, calibration and the benchmark have their own modules.
//!
//! Determinism: for the same model file, θ, batch and thread count, losses are bit-identical
//! across runs (llama.cpp's CPU kernels have a fixed reduction order for a fixed thread
//! count). Different thread counts or CPUs may change the last bits of losses and hence of g;
//! that never breaks a federation because replay applies committed `(seed, coeff)` pairs with
//! `fwdllm_shared::update` (pure f32 math) and never re-runs the engine.

mod adapter;
pub mod bench;
pub mod calibrate;
mod estimator;
mod forward;
pub mod generate;
mod head;
mod live;
pub mod llama;
mod load;
mod loss;
pub mod prepare;
pub mod recipe;
mod rows;
pub mod sft_eval;
pub mod sft_train;
pub mod tail;
mod task;
pub mod train;
pub(crate) mod train_run;

use head::{FeatureCache, HeadParams};

use std::path::{Path, PathBuf};

use fwdllm_shared::lora::ModelShape;
use serde::{Deserialize, Serialize};

pub use loss::{token_nll, EvalReport, PooledHidden};
pub use recipe::TrainConfig;
pub use tail::TailMatrices;
pub use task::Task;

/// Weight precision the engine computes in. Only F32 weights keep f32 activations in ggml's
/// CPU matmuls; quantised weights add an 8-bit activation jitter (noise in ΔL ~2e-2) that
/// drowns the forward-gradient signal (issue 3's table; reproduce with `calibrate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Dequantised F32 copy (default; measured SNR ~1e4 at ε = 1e-2).
    #[default]
    F32,
    /// F16 copy (half the memory; SNR ~30).
    F16,
    /// The given (quantised) file as is: SNR < 1, training will not work.
    Quantized,
    /// A Q8_0 copy (requantised from the given file): ggml's fast tinyBLAS kernels cover
    /// Q8_0 and Q4_0 but not Q4_1, so this is a quick frozen prefix for the tail path.
    #[value(name = "q8_0")]
    #[serde(rename = "q8_0")]
    Q8_0,
    /// A Q4_0 copy (requantised): smaller than Q8_0, fast kernels, more rounding.
    #[value(name = "q4_0")]
    #[serde(rename = "q4_0")]
    Q4_0,
}

impl Precision {
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::Quantized => "quantized",
            Precision::Q8_0 => "q8_0",
            Precision::Q4_0 => "q4_0",
        }
    }

    /// Parses the config spelling ([`Precision::as_str`]).
    pub fn parse(s: &str) -> Option<Precision> {
        [
            Precision::F32,
            Precision::F16,
            Precision::Quantized,
            Precision::Q8_0,
            Precision::Q4_0,
        ]
        .into_iter()
        .find(|p| p.as_str() == s)
    }
}

/// Which forward path evaluates the loss (see [`tail`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ForwardPath {
    /// The tail path whenever the LoRA layout leaves layers frozen below it (its first adapted
    /// layer > 0) and the precision is f32; the full model otherwise.
    #[default]
    Auto,
    /// As `auto` (kept as an explicit spelling for configs that want to say so).
    Tail,
    /// Every evaluation runs the whole model at `precision`.
    Full,
}

impl ForwardPath {
    pub fn as_str(self) -> &'static str {
        match self {
            ForwardPath::Auto => "auto",
            ForwardPath::Tail => "tail",
            ForwardPath::Full => "full",
        }
    }
}

/// Engine settings (serde; every field has a default).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// The model as shipped (any llama.cpp GGUF, usually quantised).
    pub model: PathBuf,
    /// Compute threads (0 = all available cores).
    pub threads: u32,
    /// Context size in tokens; each of the `seqs_per_decode` sequences gets an equal share.
    pub n_ctx: u32,
    /// Maximum tokens per `llama_decode` (all sequences together).
    pub n_batch: u32,
    /// Sequences (prompts) packed into one `llama_decode`.
    pub seqs_per_decode: u32,
    pub precision: Precision,
    /// Where `prepare` keeps converted copies.
    pub cache_dir: PathBuf,
    /// Flash attention casts K/V to f16 (adds noise ~2e-4 in ΔL); off by default.
    pub flash_attn: bool,
    /// Full model for every evaluation, or the frozen prefix once per batch plus an F32 tail.
    pub forward_path: ForwardPath,
    /// Precision of the frozen prefix on the tail path. Its error is the same for every
    /// perturbation of a batch and cancels in ΔL, so the shipped quantised file is enough.
    pub prefix_precision: Precision,
    /// The type of the tail model's weight matrices (F32 by default; bf16 halves the cost of
    /// a whole-model evaluation on CPUs with AVX512-BF16, see [`tail::TailMatrices`]).
    #[serde(default)]
    pub tail_matrices: tail::TailMatrices,
    /// The layout's first adapted layer when the caller knows it before any adapter is set,
    /// so that evaluations of the base model already take the tail path (values past the last
    /// layer mean the last layer: a layout of head rows only).
    pub tail_layer: Option<u32>,
    /// Budget for cached prefix hidden states, MiB (per prompt, least recently used).
    pub prefix_cache_mib: u32,
    /// Also keep prefix hidden states on disk under `cache_dir/prefix-states/` (one file per
    /// prompt, ~200 KB for 90 tokens of SmolLM2), so each example's prefix runs once ever.
    pub prefix_cache_disk: bool,
    /// The layout trains norm gains (set by [`EngineConfig::for_lora`], never read from a
    /// config file): base evaluations then already take the live tail from `tail_layer`.
    #[serde(skip)]
    pub trains_norms: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            model: PathBuf::from(".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"),
            threads: 0,
            n_ctx: 2048,
            n_batch: 2048,
            seqs_per_decode: 8,
            precision: Precision::F32,
            cache_dir: PathBuf::from(".cache/prepared"),
            flash_attn: false,
            forward_path: ForwardPath::Auto,
            prefix_precision: Precision::Q8_0,
            tail_matrices: tail::TailMatrices::F32,
            tail_layer: None,
            prefix_cache_mib: 32,
            prefix_cache_disk: true,
            trains_norms: false,
        }
    }
}

impl EngineConfig {
    /// Whether this config can take the tail path at all (the tail model is F32).
    pub fn tail_capable(&self) -> bool {
        self.forward_path != ForwardPath::Full && self.precision == Precision::F32
    }

    /// This config with `tail_layer` set from a LoRA config's layer range (`None`: all layers).
    pub fn for_lora(mut self, lora: &fwdllm_shared::lora::LoraConfig) -> Self {
        self.tail_layer = if lora.modules.is_empty() {
            Some(u32::MAX) // head rows only: the last layer (clamped once the model is loaded)
        } else {
            lora.layers.map(|(start, _)| start)
        };
        self.trains_norms = lora.modules.iter().any(|m| m.is_norm());
        if self.trains_norms {
            self.tail_layer = Some(self.tail_layer.unwrap_or(0));
        }
        self
    }

    pub fn effective_threads(&self) -> u32 {
        if self.threads > 0 {
            self.threads
        } else {
            std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1)
        }
    }
}

/// Engine errors; each names what went wrong and the fix.
/// Loss of one batch ([`Engine::loss`]; computed from the prompts' features by `head`).
#[derive(Debug, Clone, PartialEq)]
pub struct BatchLoss {
    /// Mean cross-entropy over the label words (f64 sum of per-example f64 losses / n).
    pub mean: f64,
    pub per_example: Vec<f64>,
    /// argmax over the label words.
    pub predictions: Vec<usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("model file {0} does not exist; run `make setup` or pass --model PATH")]
    ModelNotFound(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("llama.cpp: {0}")]
    Llama(String),
    #[error("no task set; call Engine::set_task first")]
    NoTask,
    #[error("task {task}: {problem}")]
    Task { task: String, problem: String },
    #[error("example {index} has label {label} but the task has {n_labels} labels")]
    BadLabel {
        index: usize,
        label: usize,
        n_labels: usize,
    },
    #[error("adapter targets model shape {adapter:?} but the loaded model is {model:?}")]
    ShapeMismatch {
        adapter: Box<ModelShape>,
        model: Box<ModelShape>,
    },
    #[error("empty batch")]
    EmptyBatch,
    #[error("eps must be finite and non-zero, got {0}")]
    BadEps(f32),
    #[error("LoRA: {0}")]
    Lora(#[from] fwdllm_shared::lora::LoraError),
    #[error("tail model from {path}: {problem}")]
    Tail { path: PathBuf, problem: String },
    #[error("the adapter has {rows} verbalizer head rows but the task has {n_labels} labels; train the adapter on this task's labels (lora.head_rows = {n_labels})")]
    HeadMismatch { rows: u32, n_labels: usize },
    #[error("verbalizer head rows need the tail path (the final hidden state comes from the tail model); use engine.precision = \"f32\" with forward_path = \"auto\" or \"tail\", and a layout that does not adapt layer 0")]
    HeadNeedsTail,
    #[error("a layout that trains norm gains (attn_norm, ffn_norm) needs the tail path: use engine.precision = \"f32\" with forward_path = \"auto\" or \"tail\"")]
    NormsNeedTail,
    #[error("adapter metadata: {0}")]
    AdapterHead(String),
    #[error("the layout has {rows} verbalizer head rows, which only apply to classification; an instruction (sft) task trains LoRA tensors only: set lora.head_rows = 0 (train-local: drop --head-rows/--head-only/--blockwise)")]
    SftHeadRows { rows: u32 },
}

impl EngineError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        EngineError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The tail path's state: first adapted layer, the tail model for the head in use, the
/// adapter set on it (renumbered for the tail), cached prefix hidden states, and cached
/// features (label logits + final hidden state) of prompts run with no adapter on the tail.
struct TailState {
    first_layer: u32,
    model: Option<(tail::TailHead, llama::Llama)>,
    adapter: Option<Vec<u8>>,
    /// Trained norm gains (tail tensor name, delta) of the adapter in use; a tail model is
    /// loaded live (`live`) while there are any.
    norms: Vec<(String, Vec<f32>)>,
    /// The writable in-memory copy the loaded tail model computes with, if loaded live.
    live: Option<live::LiveModel>,
    cache: tail::PrefixCache,
    features: FeatureCache,
}

/// A loaded model plus context and the current adapter. On the full path `llama` is the model
/// at training precision; on the tail path it is the frozen prefix (and tokenizer) and `tail`
/// holds the F32 tail model.
pub struct Engine {
    llama: llama::Llama,
    /// Precision of the file `llama` holds.
    base_precision: Precision,
    /// Whether `llama`'s K/V cache is f32.
    base_kv_f32: bool,
    /// Identity of the prefix for on-disk prefix states (hash of the model file, precision,
    /// K/V type), computed when first needed.
    prefix_id: Option<String>,
    tail: Option<TailState>,
    config: EngineConfig,
    model_path: PathBuf,
    shape: ModelShape,
    task: Option<Task>,
    add_bos: bool,
    scratch: Vec<f32>,
    /// Hash of the weights whose adapter is currently set (skip identical re-sets).
    current: Option<fwdllm_shared::WeightsHash>,
    /// Hash of the LoRA tensors' part of those weights (a head-only change keeps the adapter).
    current_lora: Option<fwdllm_shared::WeightsHash>,
    /// Head rows of the adapter in use (applied in Rust to the tail's hidden state).
    head: Option<HeadParams>,
    /// Prompt tokens of texts already seen (`features` asks for a batch once per direction).
    prompt_memo: task::PromptMemo,
    /// `(key, L(θ))` of the last one-sided estimate on a forward pass: the daemon asks for one
    /// direction at a time on the round's batch and weights, and each call would otherwise
    /// evaluate the unperturbed loss again (key: [`estimator::base_key`]; `set_task` drops it).
    base_loss: Option<(u64, f64)>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("model_path", &self.model_path)
            .field("shape", &self.shape)
            .field("precision", &self.config.precision)
            .field("tail_layer", &self.tail.as_ref().map(|t| t.first_layer))
            .finish_non_exhaustive()
    }
}

impl Engine {
    pub fn model_shape(&self) -> ModelShape {
        self.shape.clone()
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// The file actually loaded (the prepared copy, or on the tail path the prefix model).
    pub fn model_path(&self) -> &Path {
        &self.model_path
    }

    /// The first layer of the tail model when the tail path is in use.
    pub fn tail_layer(&self) -> Option<u32> {
        self.tail.as_ref().map(|t| t.first_layer)
    }

    /// `"tail from layer N (prefix <precision>)"` or `"full <precision>"`, for logs and reports.
    pub fn describe_path(&self) -> String {
        match &self.tail {
            Some(t) => format!(
                "tail from layer {} (prefix {}, {} matrices)",
                t.first_layer,
                self.base_precision.as_str(),
                self.config.tail_matrices.as_str()
            ),
            None => format!("full {}", self.base_precision.as_str()),
        }
    }

    /// (hits in memory or on disk, misses) of the prefix cache, per prompt.
    pub fn prefix_cache_stats(&self) -> (u64, u64) {
        self.tail
            .as_ref()
            .map(|t| (t.cache.hits + t.cache.disk_hits, t.cache.misses))
            .unwrap_or((0, 0))
    }

    /// Forgets cached prefix hidden states (benchmarks time the prefix with it).
    pub fn clear_prefix_cache(&mut self) {
        if let Some(t) = &mut self.tail {
            t.cache.clear();
        }
    }

    /// Sets llama.cpp's thread count (bench, determinism checks).
    pub fn set_threads(&mut self, threads: u32) {
        self.llama.set_threads(threads);
        if let Some((_, m)) = self.tail.as_mut().and_then(|t| t.model.as_mut()) {
            m.set_threads(threads);
        }
        self.config.threads = threads;
    }
}
