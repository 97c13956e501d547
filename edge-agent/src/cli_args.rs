//! The arguments of the engine subcommands (clap) and what they resolve to: the engine config,
//! the task with its overrides, the training flags over a [`TrainConfig`]. Shared by the
//! subcommands of [`crate::cli`], [`crate::sft_cli`] and [`crate::predict`].

use std::path::PathBuf;

use anyhow::Context;

use crate::data::{self, SftTaskConfig, TaskConfig, TaskFile};
use crate::engine::{self, Engine, EngineConfig, ForwardPath, Precision, TrainConfig};

/// Model/engine options shared by the engine subcommands.
#[derive(Debug, Clone, clap::Args)]
pub struct EngineArgs {
    /// Model GGUF as shipped (usually quantised).
    #[arg(long, default_value = ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    pub model: PathBuf,
    /// Training/evaluation precision (f32 copy, f16 copy, or the quantised file as is).
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    pub precision: Precision,
    /// Compute threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: u32,
    /// Where converted model copies are cached.
    #[arg(long, default_value = ".cache/prepared")]
    pub cache_dir: PathBuf,
    /// Prompts per llama_decode.
    #[arg(long, default_value_t = 8)]
    pub seqs_per_decode: u32,
    /// Flash attention (casts K/V to f16: adds noise to forward gradients).
    #[arg(long)]
    pub flash_attn: bool,
    /// auto: frozen prefix once per batch + F32 tail for every perturbation when the layout
    /// starts above layer 0; full: the whole model for every evaluation.
    #[arg(long, value_enum, default_value_t = ForwardPath::Auto)]
    pub forward_path: ForwardPath,
    /// Precision of the frozen prefix on the tail path (its error cancels in ΔL).
    #[arg(long, value_enum, default_value_t = Precision::Q8_0)]
    pub prefix_precision: Precision,
    /// Type of the tail model's weight matrices: f32 (exact), bf16 (about half the cost of an
    /// evaluation on CPUs with AVX512-BF16) or q8_0. Norms and the head stay F32.
    #[arg(long, value_enum, default_value_t = engine::TailMatrices::F32)]
    pub tail_matrices: engine::TailMatrices,
    /// MiB of cached prefix hidden states.
    #[arg(long, default_value_t = 32)]
    pub prefix_cache_mib: u32,
    /// Do not keep prefix hidden states on disk (under --cache-dir/prefix-states).
    #[arg(long)]
    pub no_prefix_cache_disk: bool,
}

impl EngineArgs {
    /// The engine config, with the tail layer taken from `lora` (the layout to be trained or
    /// evaluated) so that base-model evaluations take the same path as training.
    pub fn config_for(&self, lora: &fwdllm_shared::lora::LoraConfig) -> EngineConfig {
        EngineConfig {
            model: self.model.clone(),
            threads: self.threads,
            precision: self.precision,
            cache_dir: self.cache_dir.clone(),
            seqs_per_decode: self.seqs_per_decode,
            flash_attn: self.flash_attn,
            forward_path: self.forward_path,
            prefix_precision: self.prefix_precision,
            tail_matrices: self.tail_matrices,
            prefix_cache_mib: self.prefix_cache_mib,
            prefix_cache_disk: !self.no_prefix_cache_disk,
            ..EngineConfig::default()
        }
        .for_lora(lora)
    }

    /// [`EngineArgs::config_for`] the default training layout.
    pub fn config(&self) -> EngineConfig {
        self.config_for(&TrainConfig::default().lora)
    }
}

/// Task options shared by the engine subcommands.
#[derive(Debug, Clone, clap::Args)]
pub struct TaskArgs {
    /// Task config (TOML): data source, prompt template, labels, verbalizer words.
    #[arg(long, default_value = "edge-agent/tasks/bbc.toml")]
    pub task: PathBuf,
    /// Directory the task's relative data paths are resolved against.
    #[arg(long, default_value = ".")]
    pub root: PathBuf,
    /// Override the task's prompt template (must contain {text}).
    #[arg(long)]
    pub prompt: Option<String>,
    /// Override the task's verbalizer words (comma-separated, one per label).
    #[arg(long, value_delimiter = ',')]
    pub words: Option<Vec<String>>,
    /// Override the number of tokens the text is cut to.
    #[arg(long)]
    pub max_text_tokens: Option<u32>,
    /// Override which final hidden state the head rows read (classification tasks).
    #[arg(long, value_enum)]
    pub head_features: Option<data::HeadFeatures>,
}

impl TaskArgs {
    pub fn load(&self) -> anyhow::Result<(TaskConfig, data::Split)> {
        let task = self.config()?;
        let examples = task.load_examples(&self.root)?;
        let split = data::split(examples, task.split_seed, task.heldout, task.dev);
        Ok((task, split))
    }

    /// The task file of either kind with the overrides that apply to it (`--words` is
    /// classification's; `--prompt` and `--max-text-tokens` apply to both), validated.
    pub fn task_file(&self) -> anyhow::Result<TaskFile> {
        match TaskFile::from_file(&self.task)? {
            TaskFile::Classification(_) => Ok(TaskFile::Classification(self.config()?)),
            TaskFile::Sft(mut t) => {
                if self.words.is_some() {
                    anyhow::bail!(
                        "--words: {} is an instruction (sft) task, which has no label words; drop --words",
                        self.task.display()
                    );
                }
                if let Some(p) = &self.prompt {
                    t.prompt = p.replace("\\n", "\n");
                }
                if let Some(m) = self.max_text_tokens {
                    t.max_text_tokens = m;
                }
                t.validate(&self.task)?;
                Ok(TaskFile::Sft(t))
            }
        }
    }

    /// Reads an SFT task's examples (fields and responses cut with `engine`'s tokenizer)
    /// and splits them.
    pub fn load_sft(
        &self,
        engine: &Engine,
        task: &SftTaskConfig,
    ) -> anyhow::Result<data::Split<data::SftExample>> {
        let examples = task
            .load_examples(&self.root, &|t, n| engine.truncate_text(t, n))
            .with_context(|| format!("reading the examples of {}", self.task.display()))?;
        Ok(data::sft::split_sft(examples, task))
    }

    /// The task config with the overrides applied, validated (no data read).
    pub fn config(&self) -> anyhow::Result<TaskConfig> {
        let mut task = TaskConfig::from_file(&self.task)?;
        if let Some(p) = &self.prompt {
            task.prompt = p.replace("\\n", "\n");
        }
        if let Some(w) = &self.words {
            task.words = w.clone();
        }
        if let Some(m) = self.max_text_tokens {
            task.max_text_tokens = m;
        }
        if let Some(h) = self.head_features {
            task.head_features = h;
        }
        task.validate(&self.task)?;
        Ok(task)
    }
}

/// Convert the model once to the training precision (cached, verified by a stamp).
#[derive(Debug, clap::Args)]
pub struct PrepareArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
}

/// Held-out accuracy and loss of the base model, or of an adapter.
#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub task: TaskArgs,
    /// GGUF LoRA adapter to evaluate (base model if absent).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Evaluate at most this many held-out examples.
    #[arg(long)]
    pub limit: Option<usize>,
}

/// Measure noise in ΔL, g across ε and the SNR; pick ε; write the table.
#[derive(Debug, clap::Args)]
pub struct CalibrateArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub task: TaskArgs,
    #[arg(long, default_value_t = 5)]
    pub directions: u32,
    #[arg(long, default_value = "target/bench/calibrate.json")]
    pub out: PathBuf,
}

/// Local forward-gradient training (FwdLLM's centralised reference).
#[derive(Debug, clap::Args)]
pub struct TrainLocalArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub task: TaskArgs,
    /// Training config TOML (TrainConfig keys); flags below override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub lr: Option<f32>,
    #[arg(long)]
    pub max_update_norm: Option<f32>,
    #[arg(long)]
    pub lr_half_life: Option<f32>,
    #[arg(long)]
    pub eps: Option<f32>,
    #[arg(long)]
    pub directions: Option<u32>,
    /// Examples per step (the recipe's batch size otherwise).
    #[arg(long)]
    pub batch: Option<usize>,
    #[arg(long)]
    pub max_wall_s: Option<f64>,
    #[arg(long)]
    pub max_steps: Option<u32>,
    /// Discriminative sampling: candidates per direction, keep the one best aligned with the
    /// previous update (1 = off; default 8).
    #[arg(long)]
    pub discriminative_candidates: Option<u32>,
    /// Evaluate the dev split (divergence check, best adapter) every this many steps.
    #[arg(long)]
    pub dev_every: Option<u32>,
    /// Evaluate the held-out split (report only) every this many steps.
    #[arg(long)]
    pub heldout_every: Option<u32>,
    #[arg(long)]
    pub central: bool,
    /// Layer range start..end (half-open), e.g. 26..30.
    #[arg(long)]
    pub layers: Option<String>,
    #[arg(long)]
    pub rank: Option<u32>,
    /// Comma-separated modules (attn_q,attn_v,...).
    #[arg(long, value_delimiter = ',')]
    pub modules: Option<Vec<String>>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Which LoRA matrices are trained: b (A fixed at its seeded init) or ab.
    #[arg(long, value_parser = ["b", "ab"])]
    pub trainable: Option<String>,
    /// Add verbalizer head rows (deltas on the label words' output rows plus a bias per
    /// label; the count is taken from the task) to the LoRA layout.
    #[arg(long)]
    pub head_rows: bool,
    /// Train the head rows alone (no LoRA tensors). This is the default recipe when neither
    /// --config nor a LoRA flag (--rank, --layers, --modules, --trainable, --blockwise,
    /// --head-rows) is given.
    #[arg(long)]
    pub head_only: bool,
    /// Scale of the head parameters (`lora.head_alpha`).
    #[arg(long)]
    pub head_alpha: Option<f32>,
    /// Block-wise perturbation: each direction perturbs the adapter or the head, not both.
    #[arg(long)]
    pub blockwise: bool,
    /// Head-block directions per step (block-wise layouts); they cost no forward pass.
    #[arg(long)]
    pub head_directions: Option<u32>,
    /// Output directory (metrics.json, steps.csv, adapter.gguf).
    #[arg(long, default_value = "target/train-local")]
    pub out: PathBuf,
    /// Also evaluate the trained adapter on the quantised model.
    #[arg(long)]
    pub check_quantized: bool,
    #[arg(long)]
    pub no_progress: bool,
    /// Instruction (sft) tasks: held-out examples whose greedy generation is scored (F1) at
    /// each held-out evaluation (the NLL always covers the whole split).
    #[arg(long, default_value_t = 64)]
    pub f1_examples: usize,
    /// Instruction (sft) tasks: held-out generations kept verbatim in metrics.json.
    #[arg(long, default_value_t = 3)]
    pub samples: usize,
}

impl TrainLocalArgs {
    /// Applies the training flags (everything but the task-dependent head-row flags) to `tc`.
    pub fn apply_overrides(&self, tc: &mut TrainConfig) -> anyhow::Result<()> {
        if let Some(v) = self.lr {
            tc.lr = v;
        }
        if let Some(v) = self.max_update_norm {
            tc.max_update_norm = v;
        }
        if let Some(v) = self.lr_half_life {
            tc.lr_half_life = v;
        }
        if let Some(v) = self.eps {
            tc.eps = v;
        }
        if let Some(v) = self.directions {
            tc.directions = v;
        }
        if let Some(v) = self.batch {
            anyhow::ensure!(v > 0, "--batch must be at least 1");
            tc.batch_size = v;
        }
        if let Some(v) = self.max_wall_s {
            tc.max_wall_s = v;
        }
        if let Some(v) = self.max_steps {
            tc.max_steps = v;
        }
        if let Some(v) = self.discriminative_candidates {
            tc.discriminative_candidates = v;
        }
        if let Some(v) = self.dev_every {
            tc.dev_every = v;
        }
        if let Some(v) = self.heldout_every {
            tc.heldout_every = v;
        }
        if self.central {
            tc.one_sided = false;
        }
        if let Some(v) = self.seed {
            tc.seed = v;
        }
        if let Some(r) = self.rank {
            tc.lora.rank = r;
            tc.lora.alpha = r as f32;
        }
        if let Some(l) = &self.layers {
            let (a, b) = l
                .split_once("..")
                .with_context(|| format!("--layers {l:?}: expected START..END"))?;
            tc.lora.layers = Some((a.parse()?, b.parse()?));
        }
        if let Some(m) = &self.modules {
            tc.lora.modules = m
                .iter()
                .map(|s| s.parse())
                .collect::<Result<_, _>>()
                .map_err(|e| anyhow::anyhow!("--modules: {e}"))?;
        }
        match self.trainable.as_deref() {
            Some("ab") => tc.lora.trainable = fwdllm_shared::lora::Trainable::AB,
            Some(_) => tc.lora.trainable = fwdllm_shared::lora::Trainable::B,
            None => {}
        }
        if let Some(v) = self.head_alpha {
            tc.lora.head_alpha = v;
        }
        if self.blockwise {
            tc.lora.blockwise = true;
        }
        if let Some(v) = self.head_directions {
            tc.head_directions = v;
        }
        Ok(())
    }
}

/// Engine benchmark: throughput, adapter swap cost, RSS, noise, SNR, training figures.
#[derive(Debug, clap::Args)]
pub struct BenchEngineArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub task: TaskArgs,
    #[arg(long, default_value = "target/bench/engine.json")]
    pub out: PathBuf,
    /// Adapter swaps for the RSS drift measurement.
    #[arg(long, default_value_t = 10_000)]
    pub swaps: u32,
    /// Training metrics to quote (written by train-local).
    #[arg(long, default_value = "target/train-local/metrics.json")]
    pub train_metrics: PathBuf,
    /// Internal: measure one peak RSS in this process and print it (the benchmark runs
    /// itself once per probe so that each figure is a fresh process's).
    #[arg(long, value_enum, hide = true)]
    pub rss_probe: Option<engine::bench::RssProbe>,
}

/// Score prompt templates / label words zero-shot on the dev split.
#[derive(Debug, clap::Args)]
pub struct PromptSearchArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub task: TaskArgs,
    /// Candidate prompts (use {text}); default: a built-in small set.
    #[arg(long = "candidate")]
    pub candidates: Vec<String>,
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
}

/// Split a task's training examples into client shards (JSONL files).
#[derive(Debug, clap::Args)]
pub struct ShardArgs {
    #[command(flatten)]
    pub task: TaskArgs,
    /// The model (instruction tasks only: its tokenizer truncates fields and responses).
    #[command(flatten)]
    pub engine: EngineArgs,
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// Dirichlet α for a non-IID split by label (IID if absent).
    #[arg(long)]
    pub alpha: Option<f64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value = "target/shards")]
    pub out: PathBuf,
}

/// Merge an adapter's trained norm gains into a copy of the model.
#[derive(Debug, clap::Args)]
pub struct MergeNormsArgs {
    /// The adapter's base model (the GGUF it was trained on).
    #[arg(long, default_value = ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    pub model: PathBuf,
    /// GGUF adapter written by train-local, `fwdllm export` or a bench.
    #[arg(long)]
    pub adapter: PathBuf,
    /// Output model file (written beside it, then renamed into place).
    #[arg(long)]
    pub out: PathBuf,
}
