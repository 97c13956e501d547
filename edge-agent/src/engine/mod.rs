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
pub mod llama;
pub mod prepare;
pub mod train;

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
}

impl Precision {
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::Quantized => "quantized",
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
        }
    }
}

impl EngineConfig {
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

/// A loaded model at training precision plus context and the current adapter.
pub struct Engine {
    llama: llama::Llama,
    config: EngineConfig,
    model_path: PathBuf,
    shape: ModelShape,
    task: Option<Task>,
    add_bos: bool,
    scratch: Vec<f32>,
    /// Hash of the weights whose adapter is currently set (skip identical re-sets).
    current: Option<fwdllm_shared::WeightsHash>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("model_path", &self.model_path)
            .field("shape", &self.shape)
            .field("precision", &self.config.precision)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Loads the model at `config.precision` (converting it once via [`prepare::prepare`]).
    pub fn load(config: &EngineConfig) -> Result<Engine, EngineError> {
        let threads = config.effective_threads();
        let path = prepare::prepare(&config.model, config.precision, &config.cache_dir, threads)?;
        if config.precision == Precision::Quantized {
            log::warn!(
                "using the quantised model as is: fine for inference and evaluation, but its forward gradients are noise (measured SNR < 1 at every eps: 8-bit activations); train with precision f32 or f16"
            );
        }
        Self::load_file(&path, config)
    }

    /// Loads `path` as is (no conversion); `config.model`/`precision` are only recorded.
    pub fn load_file(path: &Path, config: &EngineConfig) -> Result<Engine, EngineError> {
        if !path.is_file() {
            return Err(EngineError::ModelNotFound(path.to_path_buf()));
        }
        let params = llama::LlamaParams {
            threads: config.effective_threads(),
            n_ctx: config.n_ctx,
            n_batch: config.n_batch.min(config.n_ctx),
            n_seq_max: config.seqs_per_decode.max(1),
            flash_attn: config.flash_attn,
            kv_f32: true,
        };
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
            config: config.clone(),
            model_path: path.to_path_buf(),
            shape,
            task: None,
            add_bos,
            scratch: Vec::new(),
            current: None,
        })
    }

    pub fn model_shape(&self) -> ModelShape {
        self.shape.clone()
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// The file actually loaded (the prepared copy).
    pub fn model_path(&self) -> &Path {
        &self.model_path
    }

    /// Tokenizes text with the model's vocabulary (no BOS).
    pub fn tokenize(&self, text: &str) -> Vec<llama::Token> {
        self.llama.tokenize(text, false)
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
    pub fn set_adapter(&mut self, weights: &LoraWeights) -> Result<(), EngineError> {
        self.check_shape(weights)?;
        let hash = weights.hash();
        if self.current == Some(hash) {
            return Ok(());
        }
        let bytes = fwdllm_shared::gguf::write_lora_adapter(weights);
        self.current = None;
        self.llama
            .set_adapter_bytes(&bytes)
            .map_err(EngineError::Llama)?;
        self.current = Some(hash);
        Ok(())
    }

    /// Sets an adapter from raw GGUF bytes (e.g. an exported file's contents).
    pub fn set_adapter_bytes(&mut self, bytes: &[u8]) -> Result<(), EngineError> {
        self.current = None;
        self.llama
            .set_adapter_bytes(bytes)
            .map_err(EngineError::Llama)
    }

    /// Sets an adapter from a GGUF file on disk (llama.cpp's own loader).
    pub fn set_adapter_file(&mut self, path: &Path) -> Result<(), EngineError> {
        self.current = None;
        self.llama
            .set_adapter_file(path)
            .map_err(EngineError::Llama)
    }

    /// Removes the adapter (base model).
    pub fn clear_adapter(&mut self) {
        self.current = None;
        self.llama.clear_adapter();
    }

    /// Raw next-token logits at the last position of each text's prompt (tests, diagnostics).
    pub fn last_logits(
        &mut self,
        task: &Task,
        texts: &[&str],
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        let prompts: Vec<Vec<llama::Token>> =
            texts.iter().map(|t| self.prompt_tokens(task, t)).collect();
        let mut out = vec![Vec::new(); prompts.len()];
        let per = self.config.seqs_per_decode.max(1) as usize;
        for (c, chunk) in prompts.chunks(per).enumerate() {
            let seqs: Vec<&[llama::Token]> = chunk.iter().map(|p| p.as_slice()).collect();
            let first: Vec<usize> = chunk.iter().map(|p| p.len() - 1).collect();
            self.llama
                .decode(&seqs, &first, |s, _, logits| {
                    out[c * per + s] = logits.to_vec()
                })
                .map_err(EngineError::Llama)?;
        }
        Ok(out)
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
        let prompts: Vec<Vec<llama::Token>> = examples
            .iter()
            .map(|e| self.prompt_tokens(task, &e.text))
            .collect();
        let mut label_logits = vec![vec![0f64; n_labels]; examples.len()];
        let per = self.config.seqs_per_decode.max(1) as usize;
        for (c, chunk) in prompts.chunks(per).enumerate() {
            let seqs: Vec<&[llama::Token]> = chunk.iter().map(|p| p.as_slice()).collect();
            let first: Vec<usize> = chunk.iter().map(|p| p.len() - 1).collect();
            let lt = &task.label_tokens;
            self.llama
                .decode(&seqs, &first, |s, _, logits| {
                    for (k, &t) in lt.iter().enumerate() {
                        label_logits[c * per + s][k] = logits[t as usize] as f64;
                    }
                })
                .map_err(EngineError::Llama)?;
        }
        let mut per_example = Vec::with_capacity(examples.len());
        let mut predictions = Vec::with_capacity(examples.len());
        for (e, z) in examples.iter().zip(&label_logits) {
            let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + z.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
            per_example.push(lse - z[e.label]);
            // First maximum wins: deterministic tie-break.
            let mut best = 0;
            for k in 1..z.len() {
                if z[k] > z[best] {
                    best = k;
                }
            }
            predictions.push(best);
        }
        let mean = per_example.iter().sum::<f64>() / examples.len() as f64;
        Ok(BatchLoss {
            mean,
            per_example,
            predictions,
        })
    }

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
        self.forward_gradients_by(weights, seeds, eps, one_sided, &mut |engine| {
            engine.loss(&task, batch).map(|l| l.mean)
        })
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
        let mut gs = Vec::with_capacity(seeds.len());
        let mut scratch = std::mem::take(&mut self.scratch);
        // Sets the adapter of θ + e·v(seed).
        let set_perturbed = |engine: &mut Engine, seed: u64, e: f32, scratch: &mut Vec<f32>| {
            fwdllm_shared::update::perturbed_params(weights, seed, e, scratch);
            let w = LoraWeights::from_params(layout.clone(), scratch.clone())?;
            engine.set_adapter(&w)
        };
        let result = (|| {
            if one_sided {
                self.set_adapter(weights)?;
                let l0 = loss(self)?;
                for &s in seeds {
                    set_perturbed(self, s, eps, &mut scratch)?;
                    let lp = loss(self)?;
                    gs.push(((lp - l0) / eps as f64) as f32);
                }
                Ok((gs, l0))
            } else {
                let mut sum = 0.0;
                for &s in seeds {
                    set_perturbed(self, s, eps, &mut scratch)?;
                    let lp = loss(self)?;
                    set_perturbed(self, s, -eps, &mut scratch)?;
                    let lm = loss(self)?;
                    sum += lp + lm;
                    gs.push(((lp - lm) / (2.0 * eps as f64)) as f32);
                }
                let n = (2 * seeds.len()).max(1) as f64;
                Ok((gs, sum / n))
            }
        })();
        self.scratch = scratch;
        result
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
        let per = self.config.seqs_per_decode.max(1) as usize;
        for chunk in seqs.chunks(per) {
            let toks: Vec<&[llama::Token]> = chunk.iter().map(|(t, _)| t.as_slice()).collect();
            let first: Vec<usize> = chunk.iter().map(|(_, n)| n - 1).collect();
            self.llama
                .decode(&toks, &first, |s, pos, logits| {
                    let Some(&target) = toks[s].get(pos + 1) else {
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
                })
                .map_err(EngineError::Llama)?;
        }
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
    }
}
