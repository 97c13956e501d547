//! The forward-gradient estimator: for each seed, central `g = (L(θ+εv) − L(θ−εv)) / 2ε` or
//! one-sided `g = (L(θ+εv) − L(θ)) / ε` over the verbalizer loss ([`Engine::forward_gradients`]),
//! the instruction-tuning loss ([`Engine::sft_forward_gradients`]), or, for a layout with head
//! rows, head-block directions computed from the unperturbed pass's features without a forward
//! pass.

use std::hash::{Hash, Hasher};

use fwdllm_shared::lora::LoraWeights;

use super::head::{loss_from_features, HeadParams};
use super::{sft_eval, Engine, EngineError, Task};
use crate::data::{Example, SftExample};

/// `L(θ + e·v(seed))` for `Some((seed, e))`, `L(θ)` for `None` (see `Engine::finite_differences`).
type LossAt<'a> = dyn FnMut(&mut Engine, Option<(u64, f32)>) -> Result<f64, EngineError> + 'a;

impl Engine {
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
        let key = base_key(weights, "classification", |h| {
            batch.iter().for_each(|e| (&e.text, e.label).hash(h))
        });
        self.forward_gradients_by(weights, key, seeds, eps, one_sided, &mut |engine| {
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
        let key = base_key(weights, "sft", |h| {
            batch.iter().for_each(|e| (&e.prompt, &e.response).hash(h))
        });
        self.forward_gradients_by(weights, key, seeds, eps, one_sided, &mut |engine| {
            engine.sft_loss(batch)
        })
    }

    /// The estimator over any loss of the currently set adapter; `key` names the unperturbed
    /// loss (weights, loss and batch, [`base_key`]) so a one-sided call on the same key reuses
    /// the previous call's `L(θ)` instead of evaluating it again.
    fn forward_gradients_by(
        &mut self,
        weights: &LoraWeights,
        key: u64,
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
                if let Some((k, l0)) = engine.base_loss {
                    if k == key {
                        return Ok(l0);
                    }
                }
                engine.set_adapter(weights)?;
                let l0 = loss(engine)?;
                engine.base_loss = Some((key, l0));
                return Ok(l0);
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
}

/// Names an unperturbed loss: the weights (layout and values), which loss (`loss`) and the
/// batch (`batch` feeds its examples to the hasher). The task is not in the key:
/// [`Engine::set_task`] drops the memo. SipHash with fixed keys: the key only lives in this
/// process's memo.
pub(super) fn base_key(
    weights: &LoraWeights,
    loss: &str,
    batch: impl FnOnce(&mut std::collections::hash_map::DefaultHasher),
) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    weights.hash().hash(&mut h);
    loss.hash(&mut h);
    batch(&mut h);
    h.finish()
}
