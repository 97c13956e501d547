//! The engine: forward-gradient LoRA fine-tuning on llama.cpp. Owns model loading at the
//! training precision ([`prepare`]), in-memory adapter swaps, the verbalizer classification
//! loss, the forward-gradient estimator, evaluation and the local (single-process) trainer.
//!
//! Surface used by the daemon and the aggregator's demo: [`Engine::load`], [`Engine::set_task`],
//! [`Engine::model_shape`], [`Engine::set_adapter`], [`Engine::loss`],
//! [`Engine::forward_gradients`], [`Engine::evaluate`], and the tuned [`TrainConfig`] defaults.
//!
//! Determinism: for the same model file, θ, batch and thread count, losses are bit-identical
//! across runs (llama.cpp's CPU kernels have a fixed reduction order for a fixed thread
//! count). Different thread counts or CPUs may change the last bits of losses and hence of g;
//! that never breaks a federation because replay applies committed `(seed, coeff)` pairs with
//! `fwdllm_shared::update` (pure f32 math) and never re-runs the engine.

pub mod bench;
pub mod calibrate;
pub mod generate;
mod head;
pub mod llama;
pub mod prepare;
pub mod sft_eval;
pub mod sft_train;
pub mod tail;
pub mod train;

use head::{
    label_logits, loss_from_features, FeatureAccumulator, FeatureCache, Features, HeadParams,
    FEATURE_CACHE_BYTES,
};

use std::path::{Path, PathBuf};

use fwdllm_shared::lora::{LoraWeights, ModelShape};
use serde::{Deserialize, Serialize};

use crate::data::{Example, SftExample, TaskConfig};

pub use train::TrainConfig;

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
    /// The layout's first adapted layer when the caller knows it before any adapter is set,
    /// so that evaluations of the base model already take the tail path (values past the last
    /// layer mean the last layer: a layout of head rows only).
    pub tail_layer: Option<u32>,
    /// Budget for cached prefix hidden states, MiB (per prompt, least recently used).
    pub prefix_cache_mib: u32,
    /// Also keep prefix hidden states on disk under `cache_dir/prefix-states/` (one file per
    /// prompt, ~200 KB for 90 tokens of SmolLM2), so each example's prefix runs once ever.
    pub prefix_cache_disk: bool,
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
            tail_layer: None,
            prefix_cache_mib: 32,
            prefix_cache_disk: true,
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

/// A task prepared for one model: prompt pieces and label tokens as token ids.
#[derive(Debug, Clone)]
pub struct Task {
    pub config: TaskConfig,
    prefix: Vec<llama::Token>,
    suffix: Vec<llama::Token>,
    label_tokens: Vec<llama::Token>,
}

impl Task {
    pub fn label_tokens(&self) -> &[llama::Token] {
        &self.label_tokens
    }
    pub fn n_labels(&self) -> usize {
        self.label_tokens.len()
    }
}

/// Final hidden states of one prompt ([`Engine::pooled_hidden`]).
#[derive(Debug, Clone, PartialEq)]
pub struct PooledHidden {
    /// At the prompt's last position (what the verbalizer head reads).
    pub last: Vec<f32>,
    /// Mean over all prompt positions.
    pub mean: Vec<f32>,
}

/// Loss of one batch.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchLoss {
    /// Mean cross-entropy over the label words (f64 sum of per-example f64 losses / n).
    pub mean: f64,
    pub per_example: Vec<f64>,
    /// argmax over the label words.
    pub predictions: Vec<usize>,
}

/// Held-out evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub accuracy: f64,
    pub loss: f64,
    pub n: usize,
}

/// Receives `(prompt, position, logits, hidden state if the path has it)` from a decode.
type OnLogits<'a> = dyn FnMut(usize, usize, &[f32], Option<&[f32]>) + 'a;

/// `L(θ + e·v(seed))` for `Some((seed, e))`, `L(θ)` for `None` (see `Engine::finite_differences`).
type LossAt<'a> = dyn FnMut(&mut Engine, Option<(u64, f32)>) -> Result<f64, EngineError> + 'a;

/// Which logits a decode hands back.
#[derive(Clone, Copy)]
enum Want<'a> {
    /// Only these tokens' logits, in this order.
    Labels(&'a [llama::Token]),
    /// The whole vocabulary (indexed by token id).
    Vocab,
}

/// The tail path's state: first adapted layer, the tail model for the head in use, the
/// adapter set on it (renumbered for the tail), cached prefix hidden states, and cached
/// features (label logits + final hidden state) of prompts run with no adapter on the tail.
struct TailState {
    first_layer: u32,
    model: Option<(tail::TailHead, llama::Llama)>,
    adapter: Option<Vec<u8>>,
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
    /// Loads the model: on the full path at `config.precision` (converting it once via
    /// [`prepare::prepare`]); when the tail path is possible (see [`EngineConfig::tail_capable`])
    /// at `config.prefix_precision`, with the tail set up at once if `config.tail_layer` names
    /// a first adapted layer > 0 (otherwise when the first adapter arrives).
    pub fn load(config: &EngineConfig) -> Result<Engine, EngineError> {
        let threads = config.effective_threads();
        let base_precision = if config.tail_capable() && config.tail_layer != Some(0) {
            config.prefix_precision
        } else {
            config.precision
        };
        let path = prepare::prepare(&config.model, base_precision, &config.cache_dir, threads)?;
        if config.precision == Precision::Quantized {
            log::warn!(
                "using the quantised model as is: fine for inference and evaluation, but its forward gradients are noise (measured SNR < 1 at every eps: 8-bit activations); train with precision f32 or f16"
            );
        }
        // The prefix's K/V at f16 (llama.cpp's default): its rounding is part of the fixed
        // offset of the tail's input, and it halves the largest buffer of the prefix context.
        // An f32 prefix keeps f32 K/V so that it reproduces the full F32 model.
        let kv_f32 = base_precision == config.precision || base_precision == Precision::F32;
        let mut e = Self::load_file_kv(&path, config, kv_f32)?;
        e.base_precision = base_precision;
        e.base_kv_f32 = kv_f32;
        if let Some(l) = config.tail_layer.filter(|_| config.tail_capable()) {
            e.route(Some(l.min(e.shape.n_layer.saturating_sub(1))))?;
        }
        Ok(e)
    }

    fn llama_params(config: &EngineConfig) -> llama::LlamaParams {
        llama::LlamaParams {
            threads: config.effective_threads(),
            n_ctx: config.n_ctx,
            n_batch: config.n_batch.min(config.n_ctx),
            n_seq_max: config.seqs_per_decode.max(1),
            flash_attn: config.flash_attn,
            kv_f32: true,
            embd_input: false,
            layer_input: None,
        }
    }

    /// Loads `path` as is (no conversion, full path); `config.model`/`precision` are only
    /// recorded.
    pub fn load_file(path: &Path, config: &EngineConfig) -> Result<Engine, EngineError> {
        Self::load_file_kv(path, config, true)
    }

    fn load_file_kv(
        path: &Path,
        config: &EngineConfig,
        kv_f32: bool,
    ) -> Result<Engine, EngineError> {
        if !path.is_file() {
            return Err(EngineError::ModelNotFound(path.to_path_buf()));
        }
        let mut params = Self::llama_params(config);
        params.kv_f32 = kv_f32;
        let llama = llama::Llama::load(path, &params)
            .map_err(|e| EngineError::Llama(format!("{}: {e}", path.display())))?;
        let (n_layer, n_embd, n_head, n_head_kv) = llama.dims();
        let arch = llama
            .meta("general.architecture")
            .unwrap_or_else(|| "llama".into());
        let n_ff = llama
            .meta(&format!("{arch}.feed_forward_length"))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let shape = ModelShape {
            arch,
            n_layer,
            n_embd,
            n_head,
            n_head_kv,
            n_ff,
        };
        let add_bos = llama.meta("tokenizer.ggml.add_bos_token").as_deref() == Some("true");
        Ok(Engine {
            llama,
            base_precision: config.precision,
            base_kv_f32: kv_f32,
            prefix_id: None,
            tail: None,
            config: config.clone(),
            model_path: path.to_path_buf(),
            shape,
            task: None,
            add_bos,
            scratch: Vec::new(),
            current: None,
            current_lora: None,
            head: None,
        })
    }

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
                "tail from layer {} (prefix {})",
                t.first_layer,
                self.base_precision.as_str()
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

    /// Picks the path for a layout whose first adapted layer is `first` (see [`ForwardPath`]):
    /// the tail from `first` if it is > 0 and the config allows it, else the full model at
    /// training precision (loaded now if the engine holds only the prefix).
    fn route(&mut self, first: Option<u32>) -> Result<(), EngineError> {
        if !self.config.tail_capable() {
            return Ok(());
        }
        match first {
            Some(l) if l > 0 && l < self.shape.n_layer => {
                if self.tail.as_ref().map(|t| t.first_layer) == Some(l) {
                    return Ok(());
                }
                self.llama
                    .capture_layer_input(Some(l))
                    .map_err(EngineError::Llama)?;
                log::info!(
                    "tail path: layers 0..{l} run once per batch on the {} prefix, perturbations run layers {l}..{} at f32",
                    self.base_precision.as_str(),
                    self.shape.n_layer
                );
                let dir = if self.config.prefix_cache_disk {
                    if self.prefix_id.is_none() {
                        let (_, h) = prepare::hash_file(&self.config.model)?;
                        self.prefix_id = Some(format!(
                            "{}-{}-kv{}",
                            &h[..16],
                            self.base_precision.as_str(),
                            if self.base_kv_f32 { "f32" } else { "f16" }
                        ));
                    }
                    let id = self.prefix_id.as_deref().expect("set above");
                    Some(tail::prefix_states_dir(&self.config.cache_dir, id, l))
                } else {
                    None
                };
                self.tail = Some(TailState {
                    first_layer: l,
                    model: None,
                    adapter: None,
                    cache: tail::PrefixCache::new(
                        self.config.prefix_cache_mib as usize * (1 << 20),
                    )
                    .with_dir(dir),
                    features: FeatureCache::new(FEATURE_CACHE_BYTES),
                });
                self.current = None;
                self.current_lora = None;
            }
            _ => {
                self.tail = None;
                if self.base_precision != self.config.precision {
                    let threads = self.config.effective_threads();
                    let path = prepare::prepare(
                        &self.config.model,
                        self.config.precision,
                        &self.config.cache_dir,
                        threads,
                    )?;
                    log::info!(
                        "full path: the layout adapts layer 0, loading {}",
                        path.display()
                    );
                    self.llama = llama::Llama::load(&path, &Self::llama_params(&self.config))
                        .map_err(|e| EngineError::Llama(format!("{}: {e}", path.display())))?;
                    self.model_path = path;
                    self.base_precision = self.config.precision;
                    self.base_kv_f32 = true;
                    self.prefix_id = None;
                    self.current = None;
                    self.current_lora = None;
                } else {
                    self.llama
                        .capture_layer_input(None)
                        .map_err(EngineError::Llama)?;
                }
            }
        }
        Ok(())
    }

    /// Makes sure the tail model serves `head`, building or loading it if needed.
    fn ensure_tail_model(&mut self, head: &tail::TailHead) -> Result<(), EngineError> {
        let Some(t) = &mut self.tail else {
            return Ok(());
        };
        if t.model.as_ref().is_some_and(|(h, _)| h.serves(head)) {
            return Ok(());
        }
        t.model = None; // free the old tail before loading the new one
        let path = tail::prepare_tail(
            &self.config.model,
            t.first_layer,
            head,
            &self.config.cache_dir,
        )?;
        let mut params = Self::llama_params(&self.config);
        params.embd_input = true;
        let mut m = llama::Llama::load(&path, &params)
            .map_err(|e| EngineError::Llama(format!("{}: {e}", path.display())))?;
        if let Some(bytes) = &t.adapter {
            m.set_adapter_bytes(bytes).map_err(EngineError::Llama)?;
        }
        t.model = Some((head.clone(), m));
        Ok(())
    }

    /// Hidden states at the tail's input for each prompt: from the cache, or by running the
    /// missing prompts through the prefix model (no logits requested).
    fn prefix_states(
        &mut self,
        prompts: &[Vec<llama::Token>],
    ) -> Result<Vec<std::sync::Arc<[f32]>>, EngineError> {
        let per = self.config.seqs_per_decode.max(1) as usize;
        let n_embd = self.llama.n_embd();
        let t = self.tail.as_mut().expect("tail path");
        let mut out: Vec<Option<std::sync::Arc<[f32]>>> =
            prompts.iter().map(|p| t.cache.get(p)).collect();
        let missing: Vec<usize> = (0..prompts.len()).filter(|&i| out[i].is_none()).collect();
        for chunk in missing.chunks(per) {
            let seqs: Vec<&[llama::Token]> = chunk.iter().map(|&i| prompts[i].as_slice()).collect();
            let none: Vec<usize> = seqs.iter().map(|s| s.len()).collect();
            self.llama
                .decode(&seqs, &none, |_, _, _| {})
                .map_err(EngineError::Llama)?;
            let states = self
                .llama
                .layer_input()
                .ok_or_else(|| EngineError::Llama("the prefix returned no layer input".into()))?;
            let mut at = 0;
            for &i in chunk {
                let n = prompts[i].len() * n_embd;
                let v: std::sync::Arc<[f32]> = std::sync::Arc::from(&states[at..at + n]);
                at += n;
                t.cache.insert(prompts[i].clone(), v.clone());
                out[i] = Some(v);
            }
        }
        Ok(out.into_iter().map(|v| v.expect("filled")).collect())
    }

    /// Runs `prompts` (in chunks of `seqs_per_decode`) and calls `on(prompt, pos, logits,
    /// hidden)` for every position `pos >= first[prompt]`, on whichever path is in use. `want`
    /// says which logits `on` receives; `hidden` is the final hidden state when the path has
    /// it (the tail with a label head), else `None`.
    fn run_prompts(
        &mut self,
        prompts: &[Vec<llama::Token>],
        first: &[usize],
        want: Want<'_>,
        on: &mut OnLogits<'_>,
    ) -> Result<(), EngineError> {
        let per = self.config.seqs_per_decode.max(1) as usize;
        let mut gathered = Vec::new();
        // Hands `on` the logits it wants from a row indexed by token id.
        let mut by_token = |i: usize, pos: usize, logits: &[f32], on: &mut OnLogits<'_>| match want
        {
            Want::Labels(lt) => {
                gathered.clear();
                gathered.extend(lt.iter().map(|&t| logits[t as usize]));
                on(i, pos, &gathered, None);
            }
            Want::Vocab => on(i, pos, logits, None),
        };
        if self.tail.is_none() {
            for (c, chunk) in prompts.chunks(per).enumerate() {
                let seqs: Vec<&[llama::Token]> = chunk.iter().map(|p| p.as_slice()).collect();
                self.llama
                    .decode(
                        &seqs,
                        &first[c * per..c * per + chunk.len()],
                        |s, pos, l| by_token(c * per + s, pos, l, on),
                    )
                    .map_err(EngineError::Llama)?;
            }
            return Ok(());
        }
        let head = match want {
            Want::Labels(lt) => tail::TailHead::Labels(lt.to_vec()),
            Want::Vocab => tail::TailHead::Full,
        };
        self.ensure_tail_model(&head)?;
        let states = self.prefix_states(prompts)?;
        let t = self.tail.as_mut().expect("tail path");
        let (_, model) = t.model.as_mut().expect("tail model loaded");
        // A label head's rows are the K labels, then the unit rows (the hidden state).
        let n_label_rows = match want {
            Want::Labels(lt) => Some(lt.len()),
            Want::Vocab => None,
        };
        for (c, chunk) in states.chunks(per).enumerate() {
            let seqs: Vec<&[f32]> = chunk.iter().map(|s| &s[..]).collect();
            model
                .decode_embd(
                    &seqs,
                    &first[c * per..c * per + chunk.len()],
                    |s, pos, l| match n_label_rows {
                        Some(k) => on(c * per + s, pos, &l[..k], Some(&l[k..])),
                        None => on(c * per + s, pos, l, None),
                    },
                )
                .map_err(EngineError::Llama)?;
        }
        Ok(())
    }

    /// Tokenizes text with the model's vocabulary (no BOS).
    pub fn tokenize(&self, text: &str) -> Vec<llama::Token> {
        self.llama.tokenize(text, false)
    }

    /// `text` cut to its first `max_tokens` tokens (unchanged if it has no more): the
    /// truncation SFT tasks apply to prompt fields and responses
    /// (`data::sft::SftTaskConfig::load_examples`).
    pub fn truncate_text(&self, text: &str, max_tokens: u32) -> String {
        let t = self.llama.tokenize(text, false);
        if t.len() <= max_tokens as usize {
            return text.to_string();
        }
        let bytes: Vec<u8> = t[..max_tokens as usize]
            .iter()
            .flat_map(|&x| self.llama.token_bytes(x))
            .collect();
        // A cut can split a UTF-8 character across tokens: drop the incomplete tail.
        match std::str::from_utf8(&bytes) {
            Ok(s) => s.to_string(),
            Err(e) => String::from_utf8_lossy(&bytes[..e.valid_up_to()]).into_owned(),
        }
    }

    pub fn token_piece(&self, t: llama::Token) -> String {
        self.llama.token_piece(t)
    }

    /// Prepares `config` for this model (token ids of prompt pieces and label words).
    pub fn prepare_task(&self, config: &TaskConfig) -> Result<Task, EngineError> {
        let err = |problem: String| EngineError::Task {
            task: config.name.clone(),
            problem,
        };
        config
            .validate(Path::new(&config.name))
            .map_err(|e| err(e.to_string()))?;
        let (pre, post) = config
            .prompt
            .split_once("{text}")
            .ok_or_else(|| err("prompt lacks {text}".into()))?;
        let mut prefix = self.llama.tokenize(pre, self.add_bos);
        if prefix.is_empty() && self.add_bos {
            prefix = self.llama.tokenize("", true);
        }
        let suffix = self.llama.tokenize(post, false);
        let mut label_tokens = Vec::new();
        for w in &config.words {
            let t = self.llama.tokenize(w, false);
            let first = *t
                .first()
                .ok_or_else(|| err(format!("label word {w:?} has no tokens")))?;
            if let Some(i) = label_tokens.iter().position(|&x| x == first) {
                return Err(err(format!(
                    "label words {:?} and {w:?} start with the same token {:?}; choose words whose first tokens differ",
                    config.words[i],
                    self.llama.token_piece(first)
                )));
            }
            label_tokens.push(first);
        }
        Ok(Task {
            config: config.clone(),
            prefix,
            suffix,
            label_tokens,
        })
    }

    /// Prepares and activates a task for [`Engine::forward_gradients`] and [`Engine::evaluate`].
    pub fn set_task(&mut self, config: &TaskConfig) -> Result<(), EngineError> {
        self.task = Some(self.prepare_task(config)?);
        Ok(())
    }

    pub fn task(&self) -> Option<&Task> {
        self.task.as_ref()
    }

    /// Token ids of one prompt: prefix + text cut to `max_text_tokens` + suffix.
    pub fn prompt_tokens(&self, task: &Task, text: &str) -> Vec<llama::Token> {
        let max = task.config.max_text_tokens as usize;
        // Tokenize only a generous prefix of long texts (tokens average > 2 bytes).
        let mut cut = text.len().min(max * 12 + 64);
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        let mut body = self.llama.tokenize(&text[..cut], false);
        body.truncate(max);
        let mut out = Vec::with_capacity(task.prefix.len() + body.len() + task.suffix.len());
        out.extend_from_slice(&task.prefix);
        out.extend_from_slice(&body);
        out.extend_from_slice(&task.suffix);
        out
    }

    fn check_shape(&self, weights: &LoraWeights) -> Result<(), EngineError> {
        let s = weights.layout().shape();
        if s.arch != self.shape.arch
            || s.n_layer != self.shape.n_layer
            || s.n_embd != self.shape.n_embd
            || s.n_head != self.shape.n_head
            || s.n_head_kv != self.shape.n_head_kv
            || (s.n_ff != self.shape.n_ff && self.shape.n_ff != 0)
        {
            return Err(EngineError::ShapeMismatch {
                adapter: Box::new(s.clone()),
                model: Box::new(self.shape.clone()),
            });
        }
        Ok(())
    }

    /// Builds the GGUF adapter for `weights` in memory and sets it (frees the previous one).
    /// Also picks the forward path for the weights' layout (see [`ForwardPath`]).
    pub fn set_adapter(&mut self, weights: &LoraWeights) -> Result<(), EngineError> {
        self.check_shape(weights)?;
        let layout = weights.layout();
        let hash = weights.hash();
        self.route(self.layout_first_layer(layout))?;
        if self.current == Some(hash) {
            return Ok(());
        }
        self.current = None;
        if layout.head().is_some() && self.tail.is_none() {
            return Err(EngineError::HeadNeedsTail);
        }
        self.head = layout.head().map(|h| HeadParams::of(weights.params(), h));
        // Head rows sit after every LoRA tensor; a change to them alone keeps the adapter.
        let lora_end = layout.head().map_or(layout.total_len(), |h| h.delta.start);
        let lora_hash = fwdllm_shared::WeightsHash::compute(
            &layout.descriptor_bytes(),
            &weights.params()[..lora_end],
        );
        if self.current_lora != Some(lora_hash) {
            self.current_lora = None;
            if layout.tensors().is_empty() {
                self.clear_lora();
            } else {
                match &self.tail {
                    Some(t) => {
                        let bytes = fwdllm_shared::gguf::write_lora_adapter_params_from_layer(
                            layout,
                            weights.params(),
                            t.first_layer,
                        )?;
                        self.install_tail_adapter(bytes)?;
                    }
                    None => {
                        let bytes = fwdllm_shared::gguf::write_lora_adapter(weights);
                        self.llama
                            .set_adapter_bytes(&bytes)
                            .map_err(EngineError::Llama)?;
                    }
                }
            }
            self.current_lora = Some(lora_hash);
        }
        self.current = Some(hash);
        Ok(())
    }

    /// First layer of the tail a layout needs: its first adapted layer, or the last layer for a
    /// layout of head rows only (their features are the final hidden state).
    fn layout_first_layer(&self, layout: &fwdllm_shared::lora::LoraLayout) -> Option<u32> {
        layout
            .first_layer()
            .or_else(|| layout.head().map(|_| self.shape.n_layer.saturating_sub(1)))
    }

    /// Removes the LoRA tensors (keeps the head rows).
    fn clear_lora(&mut self) {
        self.llama.clear_adapter();
        if let Some(t) = &mut self.tail {
            t.adapter = None;
            if let Some((_, m)) = &mut t.model {
                m.clear_adapter();
            }
        }
    }

    fn install_tail_adapter(&mut self, bytes: Vec<u8>) -> Result<(), EngineError> {
        let t = self.tail.as_mut().expect("tail path");
        if let Some((_, m)) = &mut t.model {
            m.set_adapter_bytes(&bytes).map_err(EngineError::Llama)?;
        }
        t.adapter = Some(bytes);
        Ok(())
    }

    /// Sets an adapter from raw GGUF bytes (e.g. an exported file's contents). On a
    /// tail-capable config the adapter's lowest layer picks the path, as for [`Engine::set_adapter`].
    pub fn set_adapter_bytes(&mut self, bytes: &[u8]) -> Result<(), EngineError> {
        self.current = None;
        self.current_lora = None;
        let file = fwdllm_shared::gguf::read_gguf(bytes)
            .map_err(|e| EngineError::Llama(format!("LoRA adapter: {e}")))?;
        let head = fwdllm_shared::gguf::read_adapter_head(&file, self.shape.n_embd)
            .map_err(|e| EngineError::AdapterHead(e.to_string()))?;
        if self.config.tail_capable() {
            let first = tail::adapter_first_layer(bytes)
                .or_else(|| head.as_ref().map(|_| self.shape.n_layer.saturating_sub(1)));
            self.route(first)?;
        }
        if head.is_some() && self.tail.is_none() {
            return Err(EngineError::HeadNeedsTail);
        }
        self.head = head.map(|h| HeadParams {
            rows: h.rows,
            alpha: h.alpha,
            delta: h.delta,
            bias: h.bias,
        });
        if file.tensors.is_empty() {
            self.clear_lora();
            return Ok(());
        }
        match &self.tail {
            Some(t) => {
                let shifted = tail::shift_adapter(bytes, t.first_layer)
                    .map_err(|e| EngineError::Llama(format!("LoRA adapter: {e}")))?;
                self.install_tail_adapter(shifted)
            }
            None => self
                .llama
                .set_adapter_bytes(bytes)
                .map_err(EngineError::Llama),
        }
    }

    /// Sets an adapter from a GGUF file on disk (llama.cpp's own loader on the full path).
    pub fn set_adapter_file(&mut self, path: &Path) -> Result<(), EngineError> {
        self.current = None;
        if self.config.tail_capable() {
            let bytes = std::fs::read(path).map_err(|e| EngineError::io(path, e))?;
            return self.set_adapter_bytes(&bytes).map_err(|e| match e {
                EngineError::Llama(m) => EngineError::Llama(format!("{}: {m}", path.display())),
                other => other,
            });
        }
        self.llama
            .set_adapter_file(path)
            .map_err(EngineError::Llama)
    }

    /// Removes the adapter (base model).
    pub fn clear_adapter(&mut self) {
        self.current = None;
        self.current_lora = None;
        self.head = None;
        self.llama.clear_adapter();
        if let Some(t) = &mut self.tail {
            t.adapter = None;
            if let Some((_, m)) = &mut t.model {
                m.clear_adapter();
            }
        }
    }

    /// Raw next-token logits (whole vocabulary) at the last position of each text's prompt
    /// (tests, diagnostics).
    pub fn last_logits(
        &mut self,
        task: &Task,
        texts: &[&str],
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        let prompts: Vec<Vec<llama::Token>> =
            texts.iter().map(|t| self.prompt_tokens(task, t)).collect();
        let first: Vec<usize> = prompts.iter().map(|p| p.len() - 1).collect();
        let mut out = vec![Vec::new(); prompts.len()];
        self.run_prompts(&prompts, &first, Want::Vocab, &mut |i, _, logits, _| {
            out[i] = logits.to_vec()
        })?;
        Ok(out)
    }

    /// Final hidden states (after the output norm) of each text's prompt under the current
    /// adapter: the last position's, and the mean over all prompt positions. Needs the tail
    /// path with a label head (a layout with head rows routes there); diagnostics and feature
    /// studies (`examples/probe_features.rs`).
    pub fn pooled_hidden(
        &mut self,
        task: &Task,
        texts: &[&str],
    ) -> Result<Vec<PooledHidden>, EngineError> {
        let prompts: Vec<Vec<llama::Token>> =
            texts.iter().map(|t| self.prompt_tokens(task, t)).collect();
        let first = vec![0usize; prompts.len()];
        let mut out: Vec<(Vec<f32>, Vec<f32>, usize)> =
            vec![(Vec::new(), Vec::new(), 0); prompts.len()];
        let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
        self.run_prompts(
            &prompts,
            &first,
            Want::Labels(&task.label_tokens),
            &mut |i, pos, _, hidden| {
                if let Some(h) = hidden {
                    let o = &mut out[i];
                    if o.1.is_empty() {
                        o.1 = vec![0f32; h.len()];
                    }
                    for (m, &x) in o.1.iter_mut().zip(h) {
                        *m += x;
                    }
                    o.2 += 1;
                    if pos + 1 == lens[i] {
                        o.0 = h.to_vec();
                    }
                }
            },
        )?;
        out.into_iter()
            .map(|(last, mut mean, n)| {
                if n == 0 || last.is_empty() {
                    return Err(EngineError::HeadNeedsTail);
                }
                for m in &mut mean {
                    *m /= n as f32;
                }
                Ok(PooledHidden { last, mean })
            })
            .collect()
    }

    /// Verbalizer loss of `examples` under the currently set adapter.
    pub fn loss(&mut self, task: &Task, examples: &[Example]) -> Result<BatchLoss, EngineError> {
        if examples.is_empty() {
            return Err(EngineError::EmptyBatch);
        }
        let n_labels = task.n_labels();
        for (index, e) in examples.iter().enumerate() {
            if e.label >= n_labels {
                return Err(EngineError::BadLabel {
                    index,
                    label: e.label,
                    n_labels,
                });
            }
        }
        let features = self.features(task, examples)?;
        let head = self.head.take();
        let result = loss_from_features(&features, examples, head.as_ref());
        self.head = head;
        result
    }

    /// Probabilities of each label (softmax over the label words' logits, head rows applied)
    /// for each text under the currently set adapter: what `predict` reports.
    pub fn label_probabilities(
        &mut self,
        task: &Task,
        texts: &[&str],
    ) -> Result<Vec<Vec<f64>>, EngineError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let examples: Vec<Example> = texts
            .iter()
            .map(|t| Example {
                text: t.to_string(),
                label: 0,
            })
            .collect();
        let features = self.features(task, &examples)?;
        let z = label_logits(&features, self.head.as_ref())?;
        Ok(z.into_iter()
            .map(|z| {
                let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = z.iter().map(|x| (x - m).exp()).collect();
                let sum: f64 = e.iter().sum();
                e.into_iter().map(|x| x / sum).collect()
            })
            .collect())
    }

    /// Label logits and hidden states of `examples` under the currently set LoRA adapter (the
    /// head rows are not applied). Served from the feature cache when the tail has no adapter.
    fn features(
        &mut self,
        task: &Task,
        examples: &[Example],
    ) -> Result<Vec<std::sync::Arc<Features>>, EngineError> {
        let prompts: Vec<Vec<llama::Token>> = examples
            .iter()
            .map(|e| self.prompt_tokens(task, &e.text))
            .collect();
        let cacheable = self.tail.as_ref().is_some_and(|t| t.adapter.is_none());
        // Pooling only matters for the hidden state, which only the tail path returns.
        let pool = match &self.tail {
            Some(_) => task.config.head_features,
            None => crate::data::HeadFeatures::Last,
        };
        if let Some(t) = &mut self.tail {
            t.features.use_labels(&task.label_tokens, pool);
        }
        let mut out: Vec<Option<std::sync::Arc<Features>>> = match (&self.tail, cacheable) {
            (Some(t), true) => prompts.iter().map(|p| t.features.get(p)).collect(),
            _ => vec![None; prompts.len()],
        };
        let missing: Vec<usize> = (0..prompts.len()).filter(|&i| out[i].is_none()).collect();
        if !missing.is_empty() {
            let run: Vec<Vec<llama::Token>> = missing.iter().map(|&i| prompts[i].clone()).collect();
            let first: Vec<usize> = run
                .iter()
                .map(|p| FeatureAccumulator::first_position(pool, p.len()))
                .collect();
            let mut got = vec![FeatureAccumulator::default(); run.len()];
            self.run_prompts(
                &run,
                &first,
                Want::Labels(&task.label_tokens),
                &mut |i, pos, logits, hidden| {
                    got[i].add(pool, pos + 1 == run[i].len(), logits, hidden)
                },
            )?;
            for (j, &i) in missing.iter().enumerate() {
                let f = std::sync::Arc::new(
                    std::mem::take(&mut got[j])
                        .finish(pool)
                        .ok_or_else(|| EngineError::Llama("a prompt returned no logits".into()))?,
                );
                if cacheable {
                    if let Some(t) = &mut self.tail {
                        t.features.insert(prompts[i].clone(), f.clone());
                    }
                }
                out[i] = Some(f);
            }
        }
        Ok(out.into_iter().map(|f| f.expect("filled")).collect())
    }
}

impl Engine {
    fn active_task(&self) -> Result<Task, EngineError> {
        self.task.clone().ok_or(EngineError::NoTask)
    }

    /// Forward gradients of the active task's loss on `batch` at `weights`: for each seed,
    /// central `g = (L(θ+εv) − L(θ−εv)) / 2ε` (2K loss evaluations) or one-sided
    /// `g = (L(θ+εv) − L(θ)) / ε` (1+K evaluations). `v` is `fwdllm_shared::perturb`'s
    /// Rademacher direction of the seed over the trainable parameters.
    pub fn forward_gradients(
        &mut self,
        weights: &LoraWeights,
        batch: &[Example],
        seeds: &[u64],
        eps: f32,
        one_sided: bool,
    ) -> Result<Vec<f32>, EngineError> {
        Ok(self
            .forward_gradients_with_loss(weights, batch, seeds, eps, one_sided)?
            .0)
    }

    /// As [`Engine::forward_gradients`], also returning L(θ) (one-sided) or the mean of
    /// L(θ±εv) (central) for progress reporting.
    pub fn forward_gradients_with_loss(
        &mut self,
        weights: &LoraWeights,
        batch: &[Example],
        seeds: &[u64],
        eps: f32,
        one_sided: bool,
    ) -> Result<(Vec<f32>, f64), EngineError> {
        let task = self.active_task()?;
        if weights.layout().head().is_some() {
            return self.head_forward_gradients(&task, weights, batch, seeds, eps, one_sided);
        }
        self.forward_gradients_by(weights, seeds, eps, one_sided, &mut |engine| {
            engine.loss(&task, batch).map(|l| l.mean)
        })
    }

    /// The estimator for a layout with head rows. A direction that perturbs only the head
    /// (block-wise layouts, or a layout of head rows only) leaves the features of the batch
    /// unchanged, so its loss is computed from the unperturbed pass's features, without a
    /// forward pass; any other direction runs the tail as usual.
    fn head_forward_gradients(
        &mut self,
        task: &Task,
        weights: &LoraWeights,
        batch: &[Example],
        seeds: &[u64],
        eps: f32,
        one_sided: bool,
    ) -> Result<(Vec<f32>, f64), EngineError> {
        if !eps.is_finite() || eps == 0.0 {
            return Err(EngineError::BadEps(eps));
        }
        if batch.is_empty() {
            return Err(EngineError::EmptyBatch);
        }
        let layout = weights.layout().clone();
        let block = layout.head().expect("caller checked").clone();
        let head_only = |seed: u64| {
            layout.tensors().is_empty()
                || layout.block_of(seed) == fwdllm_shared::lora::DirectionBlock::Head
        };
        self.set_adapter(weights)?;
        let head0 = self.head.clone();
        let base = self.features(task, batch)?;
        let mut scratch = std::mem::take(&mut self.scratch);
        let result = self.finite_differences(seeds, eps, one_sided, &mut |engine, perturbation| {
            let Some((seed, e)) = perturbation else {
                return Ok(loss_from_features(&base, batch, head0.as_ref())?.mean);
            };
            fwdllm_shared::update::perturbed_params(weights, seed, e, &mut scratch);
            if head_only(seed) {
                let h = HeadParams::of(&scratch, &block);
                return loss_from_features(&base, batch, Some(&h)).map(|l| l.mean);
            }
            let w = LoraWeights::from_params(layout.clone(), scratch.clone())?;
            engine.set_adapter(&w)?;
            engine.loss(task, batch).map(|l| l.mean)
        });
        self.scratch = scratch;
        result
    }

    /// Forward gradients of the instruction-tuning loss ([`Engine::sft_loss`]) on `batch`;
    /// same estimator and return value as [`Engine::forward_gradients_with_loss`].
    pub fn sft_forward_gradients(
        &mut self,
        weights: &LoraWeights,
        batch: &[SftExample],
        seeds: &[u64],
        eps: f32,
        one_sided: bool,
    ) -> Result<(Vec<f32>, f64), EngineError> {
        sft_eval::check_sft_layout(weights)?;
        self.forward_gradients_by(weights, seeds, eps, one_sided, &mut |engine| {
            engine.sft_loss(batch)
        })
    }

    /// The estimator over any loss of the currently set adapter.
    fn forward_gradients_by(
        &mut self,
        weights: &LoraWeights,
        seeds: &[u64],
        eps: f32,
        one_sided: bool,
        loss: &mut dyn FnMut(&mut Engine) -> Result<f64, EngineError>,
    ) -> Result<(Vec<f32>, f64), EngineError> {
        if !eps.is_finite() || eps == 0.0 {
            return Err(EngineError::BadEps(eps));
        }
        self.check_shape(weights)?;
        let layout = weights.layout().clone();
        let mut scratch = std::mem::take(&mut self.scratch);
        let result = self.finite_differences(seeds, eps, one_sided, &mut |engine, perturbation| {
            let Some((seed, e)) = perturbation else {
                engine.set_adapter(weights)?;
                return loss(engine);
            };
            // The adapter of θ + e·v(seed).
            fwdllm_shared::update::perturbed_params(weights, seed, e, &mut scratch);
            let w = LoraWeights::from_params(layout.clone(), scratch.clone())?;
            engine.set_adapter(&w)?;
            loss(engine)
        });
        self.scratch = scratch;
        result
    }

    /// The difference estimator both loss paths share: one-sided
    /// `g = (L(θ+εv) − L(θ)) / ε` or central `g = (L(θ+εv) − L(θ−εv)) / 2ε`, with
    /// `loss_at(Some((seed, e)))` = L(θ + e·v(seed)) and `loss_at(None)` = L(θ) (one-sided only).
    /// Returns the g's and L(θ) (one-sided) or the mean of the L(θ±εv) (central).
    fn finite_differences(
        &mut self,
        seeds: &[u64],
        eps: f32,
        one_sided: bool,
        loss_at: &mut LossAt<'_>,
    ) -> Result<(Vec<f32>, f64), EngineError> {
        let mut gs = Vec::with_capacity(seeds.len());
        if one_sided {
            let l0 = loss_at(self, None)?;
            for &s in seeds {
                let lp = loss_at(self, Some((s, eps)))?;
                gs.push(((lp - l0) / eps as f64) as f32);
            }
            Ok((gs, l0))
        } else {
            let mut sum = 0.0;
            for &s in seeds {
                let lp = loss_at(self, Some((s, eps)))?;
                let lm = loss_at(self, Some((s, -eps)))?;
                sum += lp + lm;
                gs.push(((lp - lm) / (2.0 * eps as f64)) as f32);
            }
            Ok((gs, sum / (2 * seeds.len()).max(1) as f64))
        }
    }

    /// Instruction-tuning loss under the currently set adapter: next-token cross-entropy over
    /// the response tokens only (the prompt is context), averaged over response tokens of the
    /// whole batch. Prompt and response are tokenized separately and concatenated, so the
    /// first response token is scored from the prompt's last position.
    pub fn sft_loss(&mut self, examples: &[SftExample]) -> Result<f64, EngineError> {
        if examples.is_empty() {
            return Err(EngineError::EmptyBatch);
        }
        let seqs: Vec<(Vec<llama::Token>, usize)> = examples
            .iter()
            .map(|e| {
                let mut t = self.llama.tokenize(&e.prompt, self.add_bos);
                let n_prompt = t.len();
                t.extend(self.llama.tokenize(&e.response, false));
                (t, n_prompt)
            })
            .collect();
        for (i, (t, n_prompt)) in seqs.iter().enumerate() {
            if *n_prompt == 0 || t.len() == *n_prompt {
                return Err(EngineError::Task {
                    task: "sft".into(),
                    problem: format!(
                        "example {i} needs a non-empty prompt and response (got {n_prompt} prompt and {} response tokens)",
                        t.len() - n_prompt
                    ),
                });
            }
        }
        let mut sum = 0.0f64;
        let mut count = 0usize;
        let (toks, first): (Vec<Vec<llama::Token>>, Vec<usize>) =
            seqs.into_iter().map(|(t, n)| (t, n - 1)).unzip();
        let targets = &toks;
        self.run_prompts(targets, &first, Want::Vocab, &mut |s, pos, logits, _| {
            let Some(&target) = targets[s].get(pos + 1) else {
                return; // the last token predicts nothing we score
            };
            let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
            let lse = m + logits
                .iter()
                .map(|&x| (x as f64 - m).exp())
                .sum::<f64>()
                .ln();
            sum += lse - logits[target as usize] as f64;
            count += 1;
        })?;
        Ok(sum / count.max(1) as f64)
    }

    /// Accuracy and mean loss of the active task on `examples` with `weights` (or the base
    /// model when `None`).
    pub fn evaluate(
        &mut self,
        weights: Option<&LoraWeights>,
        examples: &[Example],
    ) -> Result<EvalReport, EngineError> {
        let task = self.active_task()?;
        self.evaluate_task(&task, weights, examples)
    }

    /// [`Engine::evaluate`] for an explicit task.
    pub fn evaluate_task(
        &mut self,
        task: &Task,
        weights: Option<&LoraWeights>,
        examples: &[Example],
    ) -> Result<EvalReport, EngineError> {
        match weights {
            Some(w) => self.set_adapter(w)?,
            None => self.clear_adapter(),
        }
        let l = self.loss(task, examples)?;
        let correct = l
            .predictions
            .iter()
            .zip(examples)
            .filter(|(p, e)| **p == e.label)
            .count();
        Ok(EvalReport {
            accuracy: correct as f64 / examples.len() as f64,
            loss: l.mean,
            n: examples.len(),
        })
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
