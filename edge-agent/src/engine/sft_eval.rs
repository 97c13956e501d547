//! Evaluation of instruction tuning: held-out mean per-token NLL of the reference responses
//! (teacher-forced, [`Engine::sft_loss`]) and token-level F1 of the greedy generation
//! ([`Engine::generate_greedy`]) against the reference.
//!
//! F1 is computed over **words**, not model tokens, so that it does not depend on the
//! tokenizer and reads like the SQuAD metric: both texts are lowercased, every character that
//! is not alphanumeric becomes a space, and the rest is split on whitespace; precision and
//! recall count common words as a multiset (bag of words). Per-example F1 is averaged over
//! the examples. Two empty texts score 1, one empty text 0.

use std::collections::HashMap;

use fwdllm_shared::lora::LoraWeights;
use serde::{Deserialize, Serialize};

use super::{Engine, EngineError};
use crate::data::SftExample;

/// Lowercased alphanumeric words of `text` (see the module docs).
pub fn f1_words(text: &str) -> Vec<String> {
    text.to_lowercase()
        .chars()
        .map(|c| if c.is_alphanumeric() { c } else { ' ' })
        .collect::<String>()
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// Bag-of-words F1 of `generation` against `reference` (see the module docs).
pub fn token_f1(generation: &str, reference: &str) -> f64 {
    let (g, r) = (f1_words(generation), f1_words(reference));
    if g.is_empty() || r.is_empty() {
        return if g.is_empty() && r.is_empty() {
            1.0
        } else {
            0.0
        };
    }
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for w in &r {
        *counts.entry(w).or_default() += 1;
    }
    let mut common = 0usize;
    for w in &g {
        if let Some(c) = counts.get_mut(w.as_str()) {
            if *c > 0 {
                *c -= 1;
                common += 1;
            }
        }
    }
    if common == 0 {
        return 0.0;
    }
    let p = common as f64 / g.len() as f64;
    let rc = common as f64 / r.len() as f64;
    2.0 * p * rc / (p + rc)
}

/// One held-out example with its greedy generation (reports, README).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SftSample {
    pub prompt: String,
    pub reference: String,
    pub generation: String,
    pub f1: f64,
}

/// Held-out (or dev) evaluation of an instruction task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SftEvalReport {
    /// Mean NLL per response token over all `n` examples (nats).
    pub nll: f64,
    pub n: usize,
    /// Mean word-level F1 of the greedy generations of the first `n_generated` examples.
    pub f1: Option<f64>,
    pub n_generated: usize,
    /// The first few of those generations.
    pub samples: Vec<SftSample>,
}

/// What to generate during an evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationBudget {
    /// Examples whose greedy generation is scored (the first ones of the split); 0 = NLL only.
    pub examples: usize,
    /// Tokens per generation at most.
    pub max_new_tokens: u32,
    /// Generations kept verbatim in the report.
    pub samples: usize,
}

impl Engine {
    /// NLL of `examples` and F1 of the greedy generations of the first `budget.examples`, with
    /// `weights` set (or the base model for `None`). Head rows are refused: they act on the
    /// label words of a classification task and mean nothing for generation.
    pub fn evaluate_sft(
        &mut self,
        weights: Option<&LoraWeights>,
        examples: &[SftExample],
        budget: GenerationBudget,
    ) -> Result<SftEvalReport, EngineError> {
        match weights {
            Some(w) => {
                check_sft_layout(w)?;
                self.set_adapter(w)?
            }
            None => self.clear_adapter(),
        }
        let nll = self.sft_loss(examples)?;
        let gen = &examples[..budget.examples.min(examples.len())];
        let (f1, samples) = if gen.is_empty() {
            (None, Vec::new())
        } else {
            let prompts: Vec<&str> = gen.iter().map(|e| e.prompt.as_str()).collect();
            let out = self.generate_greedy(&prompts, budget.max_new_tokens)?;
            let scored: Vec<SftSample> = gen
                .iter()
                .zip(out)
                .map(|(e, g)| SftSample {
                    prompt: e.prompt.clone(),
                    reference: e.response.trim().to_string(),
                    f1: token_f1(&g.text, &e.response),
                    generation: g.text.trim().to_string(),
                })
                .collect();
            let f1 = scored.iter().map(|s| s.f1).sum::<f64>() / scored.len() as f64;
            (
                Some(f1),
                scored.into_iter().take(budget.samples).collect::<Vec<_>>(),
            )
        };
        Ok(SftEvalReport {
            nll,
            n: examples.len(),
            f1,
            n_generated: gen.len(),
            samples,
        })
    }
}

/// Refuses a layout with verbalizer head rows for an instruction task.
pub fn check_sft_layout(weights: &LoraWeights) -> Result<(), EngineError> {
    match weights.layout().head() {
        Some(h) => Err(EngineError::SftHeadRows { rows: h.rows }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_f1_counts_common_words_as_a_bag() {
        let cases: &[(&str, &str, f64)] = &[
            ("Stocks rise on oil", "Stocks rise on oil", 1.0),
            ("stocks RISE, on oil!", "Stocks rise on oil", 1.0),
            ("", "", 1.0),
            ("", "Stocks rise", 0.0),
            ("Stocks rise", "", 0.0),
            ("bananas", "Stocks rise", 0.0),
            // 2 common of 4 generated and 2 reference: p 0.5, r 1, F1 2/3.
            ("stocks rise sharply today", "Stocks rise", 2.0 / 3.0),
            // Multiset: "the the" against one "the" counts once: p 1/2, r 1/3, F1 0.4.
            ("the the", "the market fell", 0.4),
            // Punctuation splits words: "U.S." is "u s".
            ("U.S. jobs", "us jobs", 0.4),
        ];
        for &(g, r, want) in cases {
            let got = token_f1(g, r);
            assert!(
                (got - want).abs() < 1e-12,
                "{g:?} vs {r:?}: {got} != {want}"
            );
        }
    }
}
