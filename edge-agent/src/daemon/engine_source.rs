//! [`GradientSource`] backed by the llama.cpp engine on this agent's data shard.

use std::path::Path;

use fwdllm_shared::lora::LoraWeights;

use crate::config::AgentConfig;
use crate::data::{self, Example, SftExample, SplitMix64, TaskFile};
use crate::engine::{Engine, EngineConfig, Precision, TailMatrices};

use super::gradient::{
    DevScore, GradientBatch, GradientError, GradientRequest, GradientSource, LossStats,
};

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
    #[error("{0} is not one of f32, bf16, q8_0")]
    TailMatrices(String),
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
    /// Fixed dev subset (never trained on) scored when the aggregator asks (model selection).
    dev: Shard,
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
            dev: Shard::Classification(Vec::new()),
            label,
        })
    }

    /// Sets the dev subset model selection scores (examples the source does not train on).
    pub fn with_dev(self, dev: Vec<Example>) -> Self {
        self.with_dev_shard(Shard::Classification(dev))
    }

    /// As [`EngineSource::with_dev`] for either kind of shard (an SFT source scores its dev
    /// subset by NLL).
    pub fn with_dev_shard(mut self, dev: Shard) -> Self {
        self.dev = dev;
        self
    }

    /// Moves the last `n` examples of the shard's fixed shuffle into the dev subset (see
    /// [`split_dev`]).
    fn split_dev(&mut self, n: usize) {
        if n > 0 && self.examples.len() < 2 * n {
            log::warn!(
                "engine.dev_examples = {n} needs a shard of at least {} examples (it has {}); no dev subset, this agent will not score versions for model selection",
                2 * n,
                self.examples.len()
            );
        }
        let order = std::mem::take(&mut self.order);
        let examples = std::mem::replace(&mut self.examples, Shard::Classification(Vec::new()));
        (self.examples, self.order, self.dev) = match examples {
            Shard::Classification(ex) => {
                let (t, o, d) = split_dev(ex, order, n);
                (Shard::Classification(t), o, Shard::Classification(d))
            }
            Shard::Sft(ex) => {
                let (t, o, d) = split_dev(ex, order, n);
                (Shard::Sft(t), o, Shard::Sft(d))
            }
        };
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
        let tail_matrices = TailMatrices::parse(&e.tail_matrices).ok_or_else(|| {
            EngineSourceError::TailMatrices(format!("engine.tail_matrices = {:?}", e.tail_matrices))
        })?;
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
            tail_matrices,
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
                data::read_jsonl(
                    Path::new(&e.shard),
                    "text",
                    "label",
                    data::LabelCoding::Names,
                    &t.labels,
                )
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
        src.split_dev(e.dev_examples as usize);
        src.label = format!(
            "engine {} on {} ({} examples, {} dev)",
            e.model,
            e.shard,
            src.examples.len(),
            src.dev.len()
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

/// Splits a shard and its fixed training order into (training examples, their order, dev
/// subset): the last `n` positions of the order become the dev subset, so which examples are
/// dev is fixed by the shuffle seed. A shard with fewer than `2n` examples keeps everything for
/// training (no dev subset).
fn split_dev<T: Clone>(
    examples: Vec<T>,
    mut order: Vec<usize>,
    n: usize,
) -> (Vec<T>, Vec<usize>, Vec<T>) {
    if n == 0 || examples.len() < 2 * n {
        return (examples, order, Vec::new());
    }
    let dev_idx = order.split_off(order.len() - n);
    let dev = dev_idx.iter().map(|&i| examples[i].clone()).collect();
    let mut is_dev = vec![false; examples.len()];
    for &i in &dev_idx {
        is_dev[i] = true;
    }
    let mut new_index = vec![usize::MAX; examples.len()];
    let mut train = Vec::with_capacity(examples.len() - n);
    for (i, e) in examples.into_iter().enumerate() {
        if !is_dev[i] {
            new_index[i] = train.len();
            train.push(e);
        }
    }
    let order = order.iter().map(|&i| new_index[i]).collect();
    (train, order, dev)
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

    fn evaluate_dev(&mut self, weights: &LoraWeights) -> Result<Option<DevScore>, GradientError> {
        if self.dev.is_empty() {
            return Ok(None);
        }
        let engine_err = |e: crate::engine::EngineError| GradientError::Engine(e.to_string());
        match &self.dev {
            Shard::Classification(dev) => {
                let r = self
                    .engine
                    .evaluate(Some(weights), dev)
                    .map_err(engine_err)?;
                Ok(Some(DevScore {
                    examples: r.n as u32,
                    correct: (r.accuracy * r.n as f64).round() as u32,
                    loss_sum: r.loss * r.n as f64,
                }))
            }
            // No accuracy for generation: the aggregator then selects on the dev NLL alone.
            Shard::Sft(dev) => {
                self.engine.set_adapter(weights).map_err(engine_err)?;
                let nll = self.engine.sft_loss(dev).map_err(engine_err)?;
                Ok(Some(DevScore {
                    examples: dev.len() as u32,
                    correct: 0,
                    loss_sum: nll * dev.len() as f64,
                }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(i: usize) -> Example {
        Example {
            text: format!("text {i}"),
            label: i % 3,
        }
    }

    #[test]
    fn dev_subset_is_the_tail_of_the_fixed_order_and_never_trained_on() {
        let examples: Vec<Example> = (0..10).map(ex).collect();
        let order = vec![3, 9, 0, 7, 1, 8, 2, 6, 4, 5];
        let (train, order2, dev) = split_dev(examples.clone(), order, 3);
        assert_eq!(dev, vec![ex(6), ex(4), ex(5)]);
        // The training order walks the same examples in the same order, minus the dev ones.
        let walked: Vec<Example> = order2.iter().map(|&i| train[i].clone()).collect();
        assert_eq!(walked, [3, 9, 0, 7, 1, 8, 2].map(ex).to_vec());
        assert_eq!(train.len(), 7);
        assert!(dev.iter().all(|d| !train.contains(d)));
        // Too small a shard, or n = 0: no dev subset, nothing moved.
        for n in [0, 6] {
            let (t, o, d) = split_dev(examples.clone(), (0..10).collect(), n);
            assert_eq!((t.len(), o.len(), d.len()), (10, 10, 0), "n = {n}");
        }
    }
}
