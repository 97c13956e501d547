//! Small model shapes and LoRA configs for unit tests, simulations and the golden vectors, in
//! one place so that a layout printed by `examples/golden_vectors.rs` is the one the tests pin.

use crate::lora::{LoraConfig, LoraModule, ModelShape, Trainable};

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
