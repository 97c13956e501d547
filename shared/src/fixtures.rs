//! Small model shapes and LoRA configs for unit tests and simulations, and the inputs of the
//! golden vectors, in one place so that what `examples/golden_vectors.rs` prints is what the
//! tests pin.

use crate::lora::{LoraConfig, LoraLayout, LoraModule, LoraWeights, ModelShape, Trainable};
use crate::perturb::derive_seed;
use crate::update::{apply_commit, perturbed_params, SeedCoeff};

/// A llama-architecture shape with `n_ff = 2·n_embd`: the small models of tests and simulations.
pub fn small_llama(n_layer: u32, n_embd: u32, n_head: u32, n_head_kv: u32) -> ModelShape {
    ModelShape {
        arch: "llama".into(),
        n_layer,
        n_embd,
        n_head,
        n_head_kv,
        n_ff: 2 * n_embd,
    }
}

/// The shape of the golden vectors: 2 layers, width 8, 2 heads, 1 KV head, `n_ff` 16.
pub fn golden_shape() -> ModelShape {
    small_llama(2, 8, 2, 1)
}

/// The LoRA config of the golden vectors: rank 2, alpha 4, q, v and ffn_down on every layer,
/// A and B trainable, init seed 42.
pub fn golden_lora() -> LoraConfig {
    LoraConfig {
        rank: 2,
        alpha: 4.0,
        modules: vec![LoraModule::AttnQ, LoraModule::AttnV, LoraModule::FfnDown],
        layers: None,
        trainable: Trainable::AB,
        init_seed: 42,
        ..LoraConfig::default()
    }
}

/// The commit of the golden `commit_hash`, applied to the initial weights of [`golden_shape`]
/// and [`golden_lora`]: two small seeds and one derived seed.
pub fn golden_commit() -> Vec<SeedCoeff> {
    vec![
        SeedCoeff {
            seed: 1,
            coeff: 0.25,
        },
        SeedCoeff {
            seed: 2,
            coeff: -0.125,
        },
        SeedCoeff {
            seed: derive_seed(9, 1, 0, 0),
            coeff: 1e-3,
        },
    ]
}

/// The golden replay on the real SmolLM2-135M layout (rank 4, alpha 8, every module, A and B
/// trainable, init seed 7): the weights after 20 commits of 8 pairs (`smollm2_replay_hash`),
/// and those weights perturbed by seed 99 at −1e-3 (`smollm2_perturbed_hash`).
pub fn smollm2_replay() -> (LoraWeights, LoraWeights) {
    let config = LoraConfig {
        rank: 4,
        alpha: 8.0,
        modules: LoraModule::ALL.to_vec(),
        trainable: Trainable::AB,
        init_seed: 7,
        ..LoraConfig::default()
    };
    let layout = LoraLayout::new(&ModelShape::smollm2_135m(), &config).expect("valid layout");
    let mut w = LoraWeights::init(layout);
    for round in 0..20u64 {
        let pairs: Vec<SeedCoeff> = (0..8u32)
            .map(|k| SeedCoeff {
                seed: derive_seed(11, round, k % 3, k),
                coeff: (k as f32 - 3.5) * 3e-4 / (round as f32 + 1.0),
            })
            .collect();
        apply_commit(&mut w, &pairs);
    }
    let mut params = Vec::new();
    perturbed_params(&w, 99, -1e-3, &mut params);
    let perturbed = LoraWeights::from_params(w.layout().clone(), params).expect("finite params");
    (w, perturbed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_shape_is_the_pinned_one() {
        assert_eq!(
            golden_shape(),
            ModelShape {
                arch: "llama".into(),
                n_layer: 2,
                n_embd: 8,
                n_head: 2,
                n_head_kv: 1,
                n_ff: 16,
            }
        );
    }
}
