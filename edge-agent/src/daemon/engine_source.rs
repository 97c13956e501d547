//! [`GradientSource`] backed by the llama.cpp engine on this agent's data shard.

use std::path::Path;

use crate::config::AgentConfig;
use crate::data::{self, Example, SftExample, SplitMix64, TaskFile};
use crate::engine::{Engine, EngineConfig, Precision};

use super::gradient::{GradientBatch, GradientError, GradientRequest, GradientSource, LossStats};

/// Why the engine source could not be built.
#[derive(Debug, thiserror::Error)]
pub enum EngineSourceError {
    #[error("engine.task: {0}")]
    Task(data::DataError),
    #[error("engine.shard: {0}")]
    Shard(data::DataError),
    #[error("engine.shard {0} holds no examples; write one with `fwdllm-agent shard`")]
    EmptyShard(String),
    #[error("{0} is not one of f32, f16, quantized, q8_0, q4_0")]
    Precision(String),
    #[error("engine: {0}")]
    Engine(#[from] crate::engine::EngineError),
}

/// The agent's training examples: classification (verbalizer loss) or instruction pairs
/// (SFT loss, mean NLL of the response tokens), as the task file's `kind` says.
#[derive(Debug, Clone)]
pub enum Shard {
    Classification(Vec<Example>),
    Sft(Vec<SftExample>),
}

impl Shard {
    fn len(&self) -> usize {
        match self {
            Shard::Classification(v) => v.len(),
            Shard::Sft(v) => v.len(),
        }
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The engine plus the agent's training examples.
///
/// Every perturbation of a round uses the same batch (so the round's (seed, g) pairs estimate the
/// gradient of one loss); consecutive rounds walk through a fixed shuffle of the shard.
pub struct EngineSource {
    engine: Engine,
    examples: Shard,
    order: Vec<usize>,
    label: String,
}

impl std::fmt::Debug for EngineSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineSource")
            .field("label", &self.label)
            .field("examples", &self.examples.len())
            .finish()
    }
}

impl EngineSource {
    /// Wraps an engine whose task is already set (`Engine::set_task`) and the examples to train
    /// on. `shuffle_seed` fixes the batch order.
    pub fn new(
        engine: Engine,
        examples: Vec<Example>,
        shuffle_seed: u64,
    ) -> Result<EngineSource, EngineSourceError> {
        Self::with_shard(engine, Shard::Classification(examples), shuffle_seed)
    }

    /// As [`EngineSource::new`] for either kind of shard; an SFT shard needs no task set.
    pub fn with_shard(
        engine: Engine,
        examples: Shard,
        shuffle_seed: u64,
    ) -> Result<EngineSource, EngineSourceError> {
        if examples.is_empty() {
            return Err(EngineSourceError::EmptyShard("(in-memory examples)".into()));
        }
        let mut order: Vec<usize> = (0..examples.len()).collect();
        SplitMix64::new(shuffle_seed).shuffle(&mut order);
        let label = format!(
            "engine {} on {} examples",
            engine.model_path().display(),
            examples.len()
        );
        Ok(EngineSource {
            engine,
            examples,
            order,
            label,
        })
    }

    /// Builds the source the `[engine]` section describes: loads the model (converting it once to
    /// the training precision under `engine.cache_dir`), the task and the shard.
    pub fn from_config(config: &AgentConfig) -> Result<EngineSource, EngineSourceError> {
        let e = &config.engine;
        let parse = |key: &str, v: &str| {
            Precision::parse(v)
                .ok_or_else(|| EngineSourceError::Precision(format!("{key} = {v:?}")))
        };
        let precision = parse("engine.precision", &e.precision)?;
        let prefix_precision = parse("engine.prefix_precision", &e.prefix_precision)?;
        let cache_dir = if e.cache_dir.is_empty() {
            config.state_dir().join("prepared")
        } else {
            e.cache_dir.clone().into()
        };
        let engine_config = EngineConfig {
            model: e.model.clone().into(),
            threads: e.threads,
            n_ctx: e.n_ctx,
            n_batch: e.n_batch,
            seqs_per_decode: e.seqs_per_decode,
            precision,
            cache_dir,
            forward_path: e.forward_path,
            prefix_precision,
            prefix_cache_mib: e.prefix_cache_mib,
            prefix_cache_disk: e.prefix_cache_disk,
            // The layout arrives with the first replica; the engine picks its path then.
            tail_layer: None,
            ..EngineConfig::default()
        };
        let task = TaskFile::from_file(Path::new(&e.task)).map_err(EngineSourceError::Task)?;
        // An SFT shard holds rendered `{"prompt", "response"}` pairs (`fwdllm-agent shard`
        // on the SFT task writes them), so the agent needs no tokenizer to read it.
        let examples = match &task {
            TaskFile::Classification(t) => Shard::Classification(
                data::read_jsonl(Path::new(&e.shard), "text", "label", &t.labels)
                    .map_err(EngineSourceError::Shard)?,
            ),
            TaskFile::Sft(_) => Shard::Sft(
                data::read_sft_jsonl(Path::new(&e.shard)).map_err(EngineSourceError::Shard)?,
            ),
        };
        if examples.is_empty() {
            return Err(EngineSourceError::EmptyShard(e.shard.clone()));
        }
        let mut engine = Engine::load(&engine_config)?;
        if let TaskFile::Classification(t) = &task {
            engine.set_task(t)?;
        }
        let seed = u64::from(fwdllm_shared::wire::client_index(&config.client_id()));
        let mut src = EngineSource::with_shard(engine, examples, seed)?;
        src.label = format!(
            "engine {} on {} ({} examples)",
            e.model,
            e.shard,
            src.examples.len()
        );
        Ok(src)
    }

    /// Indices of the round's batch: consecutive rounds walk through the fixed shuffle.
    fn batch(&self, round: u64, size: usize) -> Vec<usize> {
        let n = self.order.len();
        let size = size.clamp(1, n);
        let start = (round as usize).wrapping_mul(size) % n;
        (0..size).map(|i| self.order[(start + i) % n]).collect()
    }
}

impl GradientSource for EngineSource {
    fn forward_gradients(
        &mut self,
        req: &GradientRequest<'_>,
    ) -> Result<GradientBatch, GradientError> {
        let idx = self.batch(req.round, req.task.batch_size as usize);
        let (g, loss) = match &self.examples {
            Shard::Classification(ex) => {
                let batch: Vec<Example> = idx.iter().map(|&i| ex[i].clone()).collect();
                self.engine.forward_gradients_with_loss(
                    req.weights,
                    &batch,
                    req.seeds,
                    req.eps,
                    req.task.one_sided,
                )
            }
            Shard::Sft(ex) => {
                let batch: Vec<SftExample> = idx.iter().map(|&i| ex[i].clone()).collect();
                self.engine.sft_forward_gradients(
                    req.weights,
                    &batch,
                    req.seeds,
                    req.eps,
                    req.task.one_sided,
                )
            }
        }
        .map_err(|e| GradientError::Engine(e.to_string()))?;
        let mut stats = LossStats::default();
        stats.push(loss);
        Ok(GradientBatch {
            g,
            samples: idx.len() as u32,
            loss: stats,
        })
    }

    fn describe(&self) -> String {
        self.label.clone()
    }
}
