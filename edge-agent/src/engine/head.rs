//! Verbalizer head rows on the engine side: the features the verbalizer loss reads from a
//! prompt (label logits and the final hidden state, from the tail's label head and its unit
//! rows), the per-prompt feature cache of head-rows-only layouts, and the loss with the head
//! rows applied (`z_k + alpha·(Δ_k·h + b_k)`). See ARCHITECTURE.md, "Verbalizer head rows".

use std::sync::Arc;

use super::llama;
use super::{BatchLoss, EngineError};
use crate::data::{Example, HeadFeatures};

/// What the verbalizer loss reads from one prompt: the label words' base logits and, on the
/// tail path, the final hidden state (for the head rows).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Features {
    pub(super) logits: Vec<f32>,
    pub(super) hidden: Option<Vec<f32>>,
}

/// Features of prompts through the tail with no adapter: they depend only on the prompt, so a
/// head-rows-only layout runs each example through the model once. Bounded by bytes; past the
/// budget new entries are not kept (a full epoch fits for the task sizes we train on).
#[derive(Debug, Default)]
pub(super) struct FeatureCache {
    /// The label tokens the cached logits are for (a task with other labels clears it).
    labels: Vec<llama::Token>,
    /// The pooling the cached hidden states are for.
    pool: HeadFeatures,
    budget_bytes: usize,
    used_bytes: usize,
    map: std::collections::HashMap<Vec<llama::Token>, Arc<Features>>,
}

impl FeatureCache {
    pub(super) fn new(budget_bytes: usize) -> Self {
        FeatureCache {
            budget_bytes,
            ..Default::default()
        }
    }
    /// Empties the cache unless it holds features for exactly these label tokens and pooling.
    pub(super) fn use_labels(&mut self, labels: &[llama::Token], pool: HeadFeatures) {
        if self.labels != labels || self.pool != pool {
            self.labels = labels.to_vec();
            self.pool = pool;
            self.used_bytes = 0;
            self.map.clear();
        }
    }

    pub(super) fn get(&self, prompt: &[llama::Token]) -> Option<Arc<Features>> {
        self.map.get(prompt).cloned()
    }
    pub(super) fn insert(&mut self, prompt: Vec<llama::Token>, f: Arc<Features>) {
        let bytes = 4 * (prompt.len() + f.logits.len() + f.hidden.as_ref().map_or(0, Vec::len));
        if self.used_bytes + bytes <= self.budget_bytes {
            self.used_bytes += bytes;
            self.map.insert(prompt, f);
        }
    }
}

/// The verbalizer head rows of the adapter in use: logit `k` gains
/// `alpha · (delta[k]·h + bias[k])`.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct HeadParams {
    pub(super) rows: u32,
    pub(super) alpha: f32,
    pub(super) delta: Vec<f32>,
    pub(super) bias: Vec<f32>,
}

impl HeadParams {
    pub(super) fn of(weights_params: &[f32], block: &fwdllm_shared::lora::HeadBlock) -> HeadParams {
        HeadParams {
            rows: block.rows,
            alpha: block.alpha,
            delta: weights_params[block.delta.clone()].to_vec(),
            bias: weights_params[block.bias.clone()].to_vec(),
        }
    }
}

/// Collects one prompt's features from the tail's per-position outputs: the base label logits
/// at the last position, and the hidden state pooled as the task asks.
#[derive(Debug, Default, Clone)]
pub(super) struct FeatureAccumulator {
    logits: Option<Vec<f32>>,
    hidden: Option<Vec<f32>>,
    positions: usize,
}

impl FeatureAccumulator {
    /// The first prompt position the tail must output for `pool` (outputs below it are skipped).
    pub(super) fn first_position(pool: HeadFeatures, prompt_len: usize) -> usize {
        match pool {
            HeadFeatures::Last => prompt_len - 1,
            HeadFeatures::Mean => 0,
        }
    }

    pub(super) fn add(
        &mut self,
        pool: HeadFeatures,
        is_last: bool,
        logits: &[f32],
        hidden: Option<&[f32]>,
    ) {
        if is_last {
            self.logits = Some(logits.to_vec());
        }
        let Some(h) = hidden else { return };
        match pool {
            HeadFeatures::Last => {
                if is_last {
                    self.hidden = Some(h.to_vec());
                }
            }
            HeadFeatures::Mean => {
                // Summed in position order, so the features are the same bits on every run.
                let sum = self.hidden.get_or_insert_with(|| vec![0f32; h.len()]);
                for (s, &x) in sum.iter_mut().zip(h) {
                    *s += x;
                }
                self.positions += 1;
            }
        }
    }

    pub(super) fn finish(self, pool: HeadFeatures) -> Option<Features> {
        let logits = self.logits?;
        let mut hidden = self.hidden;
        if let (HeadFeatures::Mean, Some(h)) = (pool, hidden.as_mut()) {
            let n = self.positions as f32;
            for x in h.iter_mut() {
                *x /= n;
            }
        }
        Some(Features { logits, hidden })
    }
}

/// Feature-cache budget: ~2.3 KB per prompt for SmolLM2 (5 labels + 576 hidden), so about
/// 28,000 prompts.
pub(super) const FEATURE_CACHE_BYTES: usize = 64 << 20;

/// Label logits from features (f64), with the head rows applied when there are any.
pub(super) fn label_logits(
    features: &[Arc<Features>],
    head: Option<&HeadParams>,
) -> Result<Vec<Vec<f64>>, EngineError> {
    let n_labels = features.first().map_or(0, |f| f.logits.len());
    if let Some(h) = head {
        if h.rows as usize != n_labels {
            return Err(EngineError::HeadMismatch {
                rows: h.rows,
                n_labels,
            });
        }
    }
    let mut label_logits = vec![vec![0f64; n_labels]; features.len()];
    for (z, f) in label_logits.iter_mut().zip(features) {
        for (zk, &l) in z.iter_mut().zip(&f.logits) {
            *zk = l as f64;
        }
        if let Some(h) = head {
            let hidden = f.hidden.as_deref().ok_or(EngineError::HeadNeedsTail)?;
            let n_embd = hidden.len();
            for (k, zk) in z.iter_mut().enumerate() {
                let row = &h.delta[k * n_embd..(k + 1) * n_embd];
                let dot: f64 = row
                    .iter()
                    .zip(hidden)
                    .map(|(&d, &x)| f64::from(d) * f64::from(x))
                    .sum();
                *zk += f64::from(h.alpha) * (dot + f64::from(h.bias[k]));
            }
        }
    }
    Ok(label_logits)
}

/// The verbalizer loss from features, with the head rows applied when there are any.
pub(super) fn loss_from_features(
    features: &[Arc<Features>],
    examples: &[Example],
    head: Option<&HeadParams>,
) -> Result<BatchLoss, EngineError> {
    let label_logits = label_logits(features, head)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds positions 0..3 of a 3-token prompt as the tail outputs them.
    fn collect(pool: HeadFeatures) -> Features {
        let mut acc = FeatureAccumulator::default();
        let first = FeatureAccumulator::first_position(pool, 3);
        for pos in first..3 {
            let logits = [pos as f32, -(pos as f32)];
            let hidden = [1.0 + pos as f32, 10.0 * pos as f32];
            acc.add(pool, pos + 1 == 3, &logits, Some(&hidden));
        }
        acc.finish(pool).expect("the last position was fed")
    }

    #[test]
    fn last_pooling_reads_only_the_last_position() {
        assert_eq!(FeatureAccumulator::first_position(HeadFeatures::Last, 3), 2);
        let f = collect(HeadFeatures::Last);
        assert_eq!(f.logits, vec![2.0, -2.0]);
        assert_eq!(f.hidden, Some(vec![3.0, 20.0]));
    }

    #[test]
    fn mean_pooling_averages_every_position_and_keeps_the_last_logits() {
        assert_eq!(FeatureAccumulator::first_position(HeadFeatures::Mean, 3), 0);
        let f = collect(HeadFeatures::Mean);
        assert_eq!(f.logits, vec![2.0, -2.0]);
        assert_eq!(f.hidden, Some(vec![2.0, 10.0]));
    }

    #[test]
    fn a_prompt_without_its_last_position_has_no_features() {
        let mut acc = FeatureAccumulator::default();
        acc.add(HeadFeatures::Mean, false, &[0.0], Some(&[1.0]));
        assert!(acc.finish(HeadFeatures::Mean).is_none());
    }

    #[test]
    fn the_cache_empties_when_the_pooling_changes() {
        let mut cache = FeatureCache::new(1 << 20);
        cache.use_labels(&[1, 2], HeadFeatures::Last);
        let f = Arc::new(Features {
            logits: vec![0.0, 0.0],
            hidden: Some(vec![1.0]),
        });
        cache.insert(vec![5, 6], f);
        assert!(cache.get(&[5, 6]).is_some());
        cache.use_labels(&[1, 2], HeadFeatures::Last);
        assert!(cache.get(&[5, 6]).is_some());
        cache.use_labels(&[1, 2], HeadFeatures::Mean);
        assert!(cache.get(&[5, 6]).is_none());
    }
}
