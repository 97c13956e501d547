//! The losses under the currently set adapter and what is read off them: the verbalizer loss
//! ([`Engine::loss`], from per-prompt features with the head rows applied), label
//! probabilities (`predict`), the instruction-tuning loss ([`Engine::sft_loss`]: next-token
//! cross-entropy over response tokens), held-out evaluation ([`Engine::evaluate`]) and the
//! diagnostics `last_logits` and `pooled_hidden`.

use serde::{Deserialize, Serialize};

use fwdllm_shared::lora::LoraWeights;

use super::forward::Want;
use super::head::{label_logits, loss_from_features, FeatureAccumulator, Features};
use super::{llama, BatchLoss, Engine, EngineError, Task};
use crate::data::{Example, SftExample};

/// Final hidden states of one prompt ([`Engine::pooled_hidden`]).
#[derive(Debug, Clone, PartialEq)]
pub struct PooledHidden {
    /// At the prompt's last position (what the verbalizer head reads).
    pub last: Vec<f32>,
    /// Mean over all prompt positions.
    pub mean: Vec<f32>,
}

/// Held-out evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub accuracy: f64,
    pub loss: f64,
    pub n: usize,
}

impl Engine {
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
    /// studies (`tests/bench/examples/probe_features.rs`).
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
    pub(super) fn features(
        &mut self,
        task: &Task,
        examples: &[Example],
    ) -> Result<Vec<std::sync::Arc<Features>>, EngineError> {
        let prompts: Vec<Vec<llama::Token>> = examples
            .iter()
            .map(|e| self.prompt_tokens_memo(task, &e.text))
            .collect();
        let cacheable = self
            .tail
            .as_ref()
            .is_some_and(|t| t.adapter.is_none() && t.norms.is_empty());
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

    /// Instruction-tuning loss under the currently set adapter: next-token cross-entropy over
    /// the response tokens only (the prompt is context), averaged over response tokens of the
    /// whole batch. Prompt and response are tokenized separately and concatenated, so the
    /// first response token is scored from the prompt's last position.
    pub fn sft_loss(&mut self, examples: &[SftExample]) -> Result<f64, EngineError> {
        let mut sum = 0.0f64;
        let mut count = 0usize;
        self.sft_response_logits(examples, &mut |_, logits, target| {
            sum += token_nll(logits, target);
            count += 1;
        })?;
        Ok(sum / count.max(1) as f64)
    }

    /// Hands `on(example, logits, target)` the full-vocabulary logits that score every
    /// response token of `examples` under the currently set adapter (teacher-forced), in
    /// order within an example. [`Engine::sft_loss`] is the mean of [`token_nll`] over them.
    pub fn sft_response_logits(
        &mut self,
        examples: &[SftExample],
        on: &mut dyn FnMut(usize, &[f32], llama::Token),
    ) -> Result<(), EngineError> {
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
        let (toks, first): (Vec<Vec<llama::Token>>, Vec<usize>) =
            seqs.into_iter().map(|(t, n)| (t, n - 1)).unzip();
        let targets = &toks;
        self.run_prompts(targets, &first, Want::Vocab, &mut |s, pos, logits, _| {
            let Some(&target) = targets[s].get(pos + 1) else {
                return; // the last token predicts nothing we score
            };
            on(s, logits, target);
        })
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
}

/// Next-token NLL of `target` under `logits` (a log-softmax in f64).
pub fn token_nll(logits: &[f32], target: llama::Token) -> f64 {
    let m = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let lse = m + logits
        .iter()
        .map(|&x| (x as f64 - m).exp())
        .sum::<f64>()
        .ln();
    lse - logits[target as usize] as f64
}
