//! Update math: applying `(seed, coeff)` pairs to LoRA weights and building perturbed
//! parameter vectors for the engine's ± passes.
//!
//! **Invariant:** replay is pure f32 math in this crate and never reads an engine output.
//! `add_direction(w, s, c)` sets every trainable element `θ_j ← θ_j + (±c)` (sign from
//! `v_j(s)`), one correctly rounded f32 addition per element in layout order, so the result
//! is bit-identical on every platform, with or without FMA or SIMD. Non-trainable elements
//! are never touched. Two replicas that start from the same bits and apply the same commits
//! in the same order hold the same bits (and the same [`crate::lora::WeightsHash`]).

use serde::{Deserialize, Serialize};

use crate::lora::LoraWeights;
use crate::perturb;

/// One committed step: move the weights by `coeff` along the direction of `seed`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SeedCoeff {
    pub seed: u64,
    pub coeff: f32,
}

/// `θ_trainable[j] = θ_trainable[j] + coeff * v_j(seed)` for every trainable `j`.
/// Allocation-free: signs are generated 64 at a time on the stack.
pub fn add_direction(weights: &mut LoraWeights, seed: u64, coeff: f32) {
    let (layout, params) = weights.layout_and_params_mut();
    let mut j = 0u64;
    for r in layout.trainable_ranges() {
        perturb::add_scaled_direction_at(seed, j, coeff, &mut params[r.clone()]);
        j += r.len() as u64;
    }
}

/// Applies each pair with [`add_direction`], in order.
pub fn apply_commit(weights: &mut LoraWeights, pairs: &[SeedCoeff]) {
    for p in pairs {
        add_direction(weights, p.seed, p.coeff);
    }
}

/// Writes the full parameter vector `θ + eps * v(seed)` into `scratch` (resized to
/// `total_len`; reuse it across calls to avoid allocation). `eps` may be negative.
/// Bit-identical to cloning the weights and calling [`add_direction`] with `eps`.
pub fn perturbed_params(weights: &LoraWeights, seed: u64, eps: f32, scratch: &mut Vec<f32>) {
    scratch.clear();
    scratch.extend_from_slice(weights.params());
    let mut j = 0u64;
    for r in weights.layout().trainable_ranges() {
        perturb::add_scaled_direction_at(seed, j, eps, &mut scratch[r.clone()]);
        j += r.len() as u64;
    }
}
