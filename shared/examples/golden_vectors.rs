//! Prints the pinned golden values of `perturb`, `lora` and `update` (the same values the
//! unit tests assert) as JSON, single-threaded, so the output can be diffed across
//! platforms — e.g. natively vs an aarch64 build under qemu-user:
//!
//! ```text
//! cargo run -p fwdllm-shared --example golden_vectors > x86.json
//! cargo build -p fwdllm-shared --example golden_vectors --target aarch64-unknown-linux-gnu
//! qemu-aarch64-static -L /usr/aarch64-linux-gnu target/aarch64-unknown-linux-gnu/debug/examples/golden_vectors > arm.json
//! diff x86.json arm.json
//! ```

use fwdllm_shared::fixtures;
use fwdllm_shared::lora::{LoraConfig, LoraLayout, LoraModule, LoraWeights, ModelShape, Trainable};
use fwdllm_shared::perturb::{derive_seed, direction, direction_word, gaussian_approx, mix_seed};
use fwdllm_shared::update::{apply_commit, perturbed_params, SeedCoeff};

fn hex_bits(v: &[f32]) -> Vec<String> {
    v.iter().map(|x| format!("{:#010x}", x.to_bits())).collect()
}

fn main() {
    let seeds = [0u64, 1, 0xDEAD_BEEF, u64::MAX];
    let mut out = serde_json::Map::new();
    for s in seeds {
        let mut g = [0f32; 4];
        gaussian_approx(s, &mut g);
        let mut d = vec![0f32; 4096];
        direction(s, &mut d);
        let sum: f32 = d.iter().sum();
        out.insert(
            format!("seed_{s:#x}"),
            serde_json::json!({
                "direction_words": [format!("{:#018x}", direction_word(s, 0)), format!("{:#018x}", direction_word(s, 1))],
                "direction_sum_4096": sum,
                "gaussian_bits": hex_bits(&g),
            }),
        );
    }
    out.insert(
        "derive_seed".into(),
        serde_json::json!([
            format!("{:#018x}", derive_seed(0, 0, 0, 0)),
            format!("{:#018x}", derive_seed(7, 3, 2, 1)),
            format!(
                "{:#018x}",
                derive_seed(u64::MAX, u64::MAX, u32::MAX, u32::MAX)
            ),
            format!("{:#018x}", mix_seed(1, 2)),
        ]),
    );
    let (shape, config) = (fixtures::golden_shape(), fixtures::golden_lora());
    let mut w = LoraWeights::init(LoraLayout::new(&shape, &config).expect("valid layout"));
    out.insert("init_hash".into(), w.hash().to_string().into());
    apply_commit(
        &mut w,
        &[
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
        ],
    );
    out.insert("commit_hash".into(), w.hash().to_string().into());
    // A longer replay on the real SmolLM2 layout (rank 4, all modules, A and B trainable).
    let big = LoraConfig {
        rank: 4,
        alpha: 8.0,
        modules: LoraModule::ALL.to_vec(),
        trainable: Trainable::AB,
        init_seed: 7,
        ..LoraConfig::default()
    };
    let mut w = LoraWeights::init(
        LoraLayout::new(&ModelShape::smollm2_135m(), &big).expect("valid layout"),
    );
    for round in 0..20u64 {
        let pairs: Vec<SeedCoeff> = (0..8u32)
            .map(|k| SeedCoeff {
                seed: derive_seed(11, round, k % 3, k),
                coeff: (k as f32 - 3.5) * 3e-4 / (round as f32 + 1.0),
            })
            .collect();
        apply_commit(&mut w, &pairs);
    }
    let mut scratch = Vec::new();
    perturbed_params(&w, 99, -1e-3, &mut scratch);
    let pw = LoraWeights::from_params(w.layout().clone(), scratch).expect("finite params");
    out.insert("smollm2_replay_hash".into(), w.hash().to_string().into());
    out.insert(
        "smollm2_perturbed_hash".into(),
        pw.hash().to_string().into(),
    );
    println!(
        "{}",
        serde_json::to_string_pretty(&out).expect("serialize golden values")
    );
}
