//! Trained RMSNorm gains on the real SmolLM2-135M model: the live tail (`engine::live`), the
//! exported adapter and the merged model for stock llama.cpp all compute the same function.

mod real_model;

use std::path::{Path, PathBuf};

use fwdllm_agent::engine::{Engine, EngineConfig, EngineError, Precision, TrainConfig};
use fwdllm_shared::lora::{LoraConfig, LoraLayout, LoraModule, LoraWeights};
use real_model::{cache_dir, headline, model};

/// Norm gains of the last two layers: a short tail keeps the test quick.
fn norm_lora() -> LoraConfig {
    LoraConfig {
        modules: vec![LoraModule::AttnNorm, LoraModule::FfnNorm],
        layers: Some((28, 30)),
        ..TrainConfig::sft_recipe().lora
    }
}

fn engine(model: PathBuf, cache_dir: PathBuf, precision: Precision) -> Engine {
    Engine::load(
        &EngineConfig {
            model,
            cache_dir,
            precision,
            // Tests run in parallel; one thread each keeps the 2-core machine sane.
            threads: 1,
            seqs_per_decode: 4,
            prefix_cache_disk: false,
            ..EngineConfig::default()
        }
        .for_lora(&norm_lora()),
    )
    .unwrap()
}

fn tmp(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("norms_model");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn live_norm_gains_equal_the_exported_adapter_and_the_merged_model_bit_for_bit() {
    let mut e = engine(model(), cache_dir(), Precision::F32);
    assert_eq!(e.tail_layer(), Some(28));
    let b = headline(&e, 4);
    let base = e.sft_loss(&b).unwrap();

    let layout = LoraLayout::new(&e.model_shape(), &norm_lora()).unwrap();
    let mut w = LoraWeights::init(layout);
    fwdllm_shared::update::add_direction(&mut w, 7, 0.5);
    e.set_adapter(&w).unwrap();
    let trained = e.sft_loss(&b).unwrap();
    assert_ne!(
        trained.to_bits(),
        base.to_bits(),
        "the gains change the loss"
    );

    // Back to the base gains: the live copy restores them exactly.
    e.clear_adapter();
    assert_eq!(e.sft_loss(&b).unwrap().to_bits(), base.to_bits());

    // The exported adapter carries the gains (as metadata stock llama.cpp ignores).
    let adapter = tmp("adapter.gguf");
    std::fs::write(&adapter, fwdllm_shared::gguf::write_lora_adapter(&w)).unwrap();
    e.set_adapter_file(&adapter).unwrap();
    assert_eq!(e.sft_loss(&b).unwrap().to_bits(), trained.to_bits());

    // The merged model (what stock llama.cpp loads) is the same function with no adapter.
    let merged = tmp("merged.gguf");
    let n = fwdllm_shared::gguf::merge_adapter_norms(&model(), &adapter, &merged).unwrap();
    assert_eq!(n, 4);
    let mut m = engine(merged, tmp("cache"), Precision::F32);
    assert_eq!(m.sft_loss(&b).unwrap().to_bits(), trained.to_bits());

    // A forward-gradient step on the gains descends (first order: −lr/K·Σ g², and lr small).
    let seeds = [21u64, 22, 23, 24];
    let (g, l0) = e.sft_forward_gradients(&w, &b, &seeds, 1e-2, true).unwrap();
    assert_eq!(l0.to_bits(), trained.to_bits());
    let mut stepped = w.clone();
    for (&s, &gk) in seeds.iter().zip(&g) {
        fwdllm_shared::update::add_direction(&mut stepped, s, -0.01 * gk / seeds.len() as f32);
    }
    e.set_adapter(&stepped).unwrap();
    let after = e.sft_loss(&b).unwrap();
    assert!(
        after < trained,
        "loss {trained} -> {after} after a step along -g"
    );

    // The quantised model has no tail to write gains into: a clear error, not a silent no-op.
    let mut q = engine(model(), cache_dir(), Precision::Quantized);
    let err = q.set_adapter_file(&adapter).unwrap_err();
    assert!(matches!(err, EngineError::NormsNeedTail), "{err}");
}
