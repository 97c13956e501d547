//! Update math: applying `(seed, coeff)` pairs to LoRA weights and building perturbed
//! parameter vectors for the engine's ± passes.
//!
//! **Invariant:** replay is pure f32 math in this crate and never reads an engine output.
//! `add_direction(w, s, c)` sets every trainable element `θ_j ← θ_j + (±c)` (sign from
//! `v_j(s)`), one correctly rounded f32 addition per element in layout order, so the result
//! is bit-identical on every platform, with or without FMA or SIMD. Non-trainable elements
//! are never touched. Two replicas that start from the same bits and apply the same commits
//! in the same order hold the same bits (and the same [`crate::lora::WeightsHash`]).

use std::ops::Range;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::lora::{LoraLayout, LoraWeights};
use crate::perturb;

/// One committed step: move the weights by `coeff` along the direction of `seed`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SeedCoeff {
    pub seed: u64,
    pub coeff: f32,
}

/// Calls `f(param_range, j)` for each piece of the parameter vector that the direction of
/// `seed` perturbs, with `j` the direction index of the piece's first element: every
/// trainable range for a dense layout, the seed's block ([`LoraLayout::block_of`]) for a
/// block-wise one.
pub fn for_each_direction_range(
    layout: &LoraLayout,
    seed: u64,
    mut f: impl FnMut(Range<usize>, u64),
) {
    let span = layout.block_span(layout.block_of(seed));
    let mut j = 0u64;
    for r in layout.trainable_ranges() {
        let len = r.len() as u64;
        let (lo, hi) = (span.start.max(j), span.end.min(j + len));
        if lo < hi {
            f(r.start + (lo - j) as usize..r.start + (hi - j) as usize, lo);
        }
        j += len;
    }
}

/// The direction of `seed` over the trainable values (`out.len()` = `trainable_len`):
/// `v_j(seed)` inside the seed's block, 0 outside it.
pub fn direction(layout: &LoraLayout, seed: u64, out: &mut [f32]) {
    let span = layout.block_span(layout.block_of(seed));
    let (lo, hi) = (span.start as usize, span.end as usize);
    out[..lo].fill(0.0);
    out[hi..].fill(0.0);
    perturb::direction_at(seed, span.start, &mut out[lo..hi]);
}

/// `out[j] += coeff * v_j(seed)` over the trainable values the seed's direction covers
/// (`out.len()` = `trainable_len`).
pub fn accumulate_direction(layout: &LoraLayout, seed: u64, coeff: f32, out: &mut [f32]) {
    let span = layout.block_span(layout.block_of(seed));
    perturb::add_scaled_direction_at(
        seed,
        span.start,
        coeff,
        &mut out[span.start as usize..span.end as usize],
    );
}

/// Squared norm of the direction of `seed` (the number of values it perturbs).
pub fn direction_norm_sq(layout: &LoraLayout, seed: u64) -> f64 {
    let span = layout.block_span(layout.block_of(seed));
    (span.end - span.start) as f64
}

/// `θ_trainable[j] = θ_trainable[j] + coeff * v_j(seed)` for every trainable `j` the seed's
/// direction covers. Allocation-free: signs are generated 64 at a time on the stack.
pub fn add_direction(weights: &mut LoraWeights, seed: u64, coeff: f32) {
    let (layout, params) = weights.layout_and_params_mut();
    for_each_direction_range(layout, seed, |r, j| {
        perturb::add_scaled_direction_at(seed, j, coeff, &mut params[r]);
    });
}

/// Applies each pair with [`add_direction`], in order.
pub fn apply_commit(weights: &mut LoraWeights, pairs: &[SeedCoeff]) {
    for p in pairs {
        add_direction(weights, p.seed, p.coeff);
    }
}

/// A dense commit ([`crate::wire::CommitStep::Dense`]) that these weights cannot take.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum StepError {
    #[error("a dense commit carries {got} values but this layout trains {expected}: it belongs to another layout or job; fetch a checkpoint")]
    DenseLength { got: usize, expected: usize },
    #[error("a dense commit carries the non-finite value {value} at trainable index {index}; the aggregator that sent it is faulty")]
    DenseNonFinite { index: usize, value: f32 },
}

/// Sets the trainable values, in direction order, to `values` (the dense form of a commit).
/// Checks everything before writing, so on error the weights are untouched.
pub fn set_trainable_values(weights: &mut LoraWeights, values: &[f32]) -> Result<(), StepError> {
    let expected = weights.layout().trainable_len();
    if values.len() != expected {
        return Err(StepError::DenseLength {
            got: values.len(),
            expected,
        });
    }
    if let Some((index, &value)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(StepError::DenseNonFinite { index, value });
    }
    let (layout, params) = weights.layout_and_params_mut();
    let mut rest = values;
    for r in layout.trainable_ranges() {
        let (head, tail) = rest.split_at(r.len());
        params[r.clone()].copy_from_slice(head);
        rest = tail;
    }
    Ok(())
}

/// Writes the full parameter vector `θ + eps * v(seed)` into `scratch` (resized to
/// `total_len`; reuse it across calls to avoid allocation). `eps` may be negative.
/// Bit-identical to cloning the weights and calling [`add_direction`] with `eps`.
pub fn perturbed_params(weights: &LoraWeights, seed: u64, eps: f32, scratch: &mut Vec<f32>) {
    scratch.clear();
    scratch.extend_from_slice(weights.params());
    for_each_direction_range(weights.layout(), seed, |r, j| {
        perturb::add_scaled_direction_at(seed, j, eps, &mut scratch[r]);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::{LoraConfig, LoraLayout, LoraModule, Trainable};
    use crate::perturb::{derive_seed, direction};

    fn layout(trainable: Trainable) -> LoraLayout {
        let config = LoraConfig {
            trainable,
            ..crate::fixtures::golden_lora()
        };
        LoraLayout::new(&crate::fixtures::golden_shape(), &config).unwrap()
    }

    fn commits() -> Vec<Vec<SeedCoeff>> {
        (0..6u64)
            .map(|round| {
                (0..4u32)
                    .map(|k| SeedCoeff {
                        seed: derive_seed(9, round, k % 2, k),
                        coeff: (k as f32 - 1.5) * 1e-3 / (round as f32 + 1.0),
                    })
                    .collect()
            })
            .collect()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn golden_hash_after_fixed_commit() {
        let mut w = LoraWeights::init(layout(Trainable::AB));
        apply_commit(&mut w, &crate::fixtures::golden_commit());
        assert_eq!(
            w.hash().to_string(),
            "068b0bafce5745ca750cc1f7724b552e8e786ebf2773e35285068f1e7477880f"
        );
    }

    /// The replay `examples/golden_vectors.rs` prints (its output was diffed identical on
    /// x86-64 debug/release/native and aarch64 under qemu).
    #[test]
    fn golden_hash_of_smollm2_replay_and_perturbation() {
        let (w, pw) = crate::fixtures::smollm2_replay();
        assert_eq!(
            w.hash().to_string(),
            "933fa37cdb57126a197d0a134db05cec168aced85cd76e217108fe9afd644e45"
        );
        assert_eq!(
            pw.hash().to_string(),
            "fbb1668db4c164b1218efd91b01a05afa4bb723c4a091f0fd5bd644d635aef23"
        );
    }

    #[test]
    fn replicas_replaying_the_same_commits_agree_bit_for_bit() {
        for t in [Trainable::B, Trainable::AB] {
            let mut a = LoraWeights::init(layout(t));
            let mut b = LoraWeights::init(layout(t));
            for c in commits() {
                apply_commit(&mut a, &c);
                apply_commit(&mut b, &c);
                assert_eq!(a.hash(), b.hash());
            }
            assert_ne!(a.hash(), LoraWeights::init(layout(t)).hash());
        }
    }

    #[test]
    fn checkpoint_restore_then_replay_equals_continuous_replay() {
        let all = commits();
        let mut continuous = LoraWeights::init(layout(Trainable::AB));
        let mut checkpoint = None;
        for (i, c) in all.iter().enumerate() {
            apply_commit(&mut continuous, c);
            if i == 2 {
                checkpoint = Some(continuous.params().to_vec());
            }
        }
        let mut restored =
            LoraWeights::from_params(layout(Trainable::AB), checkpoint.unwrap()).unwrap();
        for c in &all[3..] {
            apply_commit(&mut restored, c);
        }
        assert_eq!(bits(restored.params()), bits(continuous.params()));
        assert_eq!(restored.hash(), continuous.hash());
    }

    #[test]
    fn direction_index_follows_trainable_order() {
        for t in [Trainable::B, Trainable::AB] {
            let l = layout(t);
            let n = l.total_len();
            let mut w = LoraWeights::from_params(l, vec![0.0; n]).unwrap();
            add_direction(&mut w, 77, 0.5);
            let mut v = vec![0f32; w.layout().trainable_len()];
            direction(77, &mut v);
            let got: Vec<f32> = w.trainable_values().collect();
            let expect: Vec<f32> = v.iter().map(|x| 0.5 * x).collect();
            assert_eq!(bits(&got), bits(&expect));
        }
    }

    #[test]
    fn frozen_a_is_never_touched_in_b_mode() {
        let mut w = LoraWeights::init(layout(Trainable::B));
        let before = w.clone();
        for c in commits() {
            apply_commit(&mut w, &c);
        }
        for t in w.layout().tensors() {
            assert_eq!(
                bits(&w.params()[t.a.clone()]),
                bits(&before.params()[t.a.clone()])
            );
            assert_ne!(
                bits(&w.params()[t.b.clone()]),
                bits(&before.params()[t.b.clone()])
            );
        }
    }

    #[test]
    fn perturbed_params_equals_add_direction_on_a_copy() {
        let mut w = LoraWeights::init(layout(Trainable::AB));
        apply_commit(&mut w, &commits()[0]);
        let mut scratch = Vec::new();
        for eps in [1e-3f32, -1e-3] {
            perturbed_params(&w, 5, eps, &mut scratch);
            let mut copy = w.clone();
            add_direction(&mut copy, 5, eps);
            assert_eq!(bits(&scratch), bits(copy.params()));
        }
        assert_ne!(bits(&scratch), bits(w.params()));
    }

    #[test]
    fn opposite_steps_from_zero_return_to_exact_zero() {
        // From B = 0: (0 + c) - c == +0.0 exactly for any finite c.
        let mut w = LoraWeights::init(layout(Trainable::B));
        let before = bits(w.params());
        apply_commit(
            &mut w,
            &[
                SeedCoeff {
                    seed: 3,
                    coeff: 0.123,
                },
                SeedCoeff {
                    seed: 3,
                    coeff: -0.123,
                },
            ],
        );
        assert_eq!(bits(w.params()), before);
    }

    #[test]
    fn seed_coeff_serde_roundtrip() {
        let p = SeedCoeff {
            seed: u64::MAX,
            coeff: -1.5e-7,
        };
        let bytes = postcard::to_allocvec(&p).unwrap();
        assert_eq!(postcard::from_bytes::<SeedCoeff>(&bytes).unwrap(), p);
    }

    fn head_layout(blockwise: bool) -> LoraLayout {
        let shape = crate::fixtures::golden_shape();
        let config = LoraConfig {
            rank: 2,
            alpha: 4.0,
            modules: vec![LoraModule::AttnQ],
            layers: Some((1, 2)),
            trainable: Trainable::B,
            init_seed: 3,
            head_rows: 3,
            head_alpha: 0.5,
            blockwise,
        };
        LoraLayout::new(&shape, &config).unwrap()
    }

    #[test]
    fn blockwise_directions_touch_only_their_block() {
        let layout = head_layout(true);
        let head = layout.head().unwrap().clone();
        assert_eq!(head.delta.len(), 3 * 8);
        assert_eq!(head.bias.len(), 3);
        let adapter = layout.adapter_trainable_len();
        assert_eq!(adapter, 8 * 2); // B of one q tensor
        assert_eq!(layout.trainable_len(), adapter + 27);
        for seed in [2u64, 3] {
            let mut w = LoraWeights::init(layout.clone());
            let before = w.params().to_vec();
            add_direction(&mut w, seed, 0.25);
            let changed: Vec<usize> = (0..before.len())
                .filter(|&i| w.params()[i] != before[i])
                .collect();
            let in_head = |i: &usize| head.delta.start <= *i && *i < head.bias.end;
            if seed % 2 == 1 {
                assert_eq!(changed.len(), 27);
                assert!(changed.iter().all(in_head));
            } else {
                assert_eq!(changed.len(), adapter);
                assert!(!changed.iter().any(in_head));
            }
            // The layout-aware direction is the same vector, zero outside the block.
            let mut v = vec![0f32; layout.trainable_len()];
            super::direction(&layout, seed, &mut v);
            let nonzero = v.iter().filter(|x| **x != 0.0).count();
            assert_eq!(nonzero as f64, direction_norm_sq(&layout, seed));
            let moved: Vec<f32> = w
                .trainable_values()
                .zip(
                    LoraWeights::from_params(layout.clone(), before.clone())
                        .unwrap()
                        .trainable_values()
                        .collect::<Vec<_>>(),
                )
                .map(|(a, b)| a - b)
                .collect();
            assert_eq!(moved, v.iter().map(|x| x * 0.25).collect::<Vec<_>>());
        }
        // Dense: every seed touches both blocks.
        let dense = head_layout(false);
        let mut v = vec![0f32; dense.trainable_len()];
        super::direction(&dense, 3, &mut v);
        assert!(v.iter().all(|x| *x != 0.0));
    }

    #[test]
    fn head_rows_change_the_hash_and_headless_layouts_keep_theirs() {
        let with = LoraWeights::init(head_layout(false));
        let blockwise = LoraWeights::init(head_layout(true));
        assert_ne!(with.hash(), blockwise.hash());
        let mut config = head_layout(false).config().clone();
        config.head_rows = 0;
        let headless = LoraLayout::new(head_layout(false).shape(), &config).unwrap();
        assert!(!headless.descriptor_bytes().windows(4).any(|w| w == b"head"));
        assert!(headless.head().is_none());
    }
}
