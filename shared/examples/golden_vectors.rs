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
use fwdllm_shared::lora::{LoraLayout, LoraWeights};
use fwdllm_shared::perturb::{derive_seed, direction, direction_word, gaussian_approx, mix_seed};
use fwdllm_shared::update::apply_commit;
use fwdllm_shared::wire::{self, CommitStep, RoundCommit};

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
    apply_commit(&mut w, &fixtures::golden_commit());
    out.insert("commit_hash".into(), w.hash().to_string().into());
    // Both wire forms of that commit (the dense one holds the bits just computed).
    for (key, step) in [
        (
            "commit_pairs_bytes_blake3",
            CommitStep::Pairs(fixtures::golden_commit()),
        ),
        (
            "commit_dense_bytes_blake3",
            CommitStep::Dense(w.trainable_values().collect()),
        ),
    ] {
        let bytes = wire::encode(&RoundCommit {
            round: 1,
            base_version: 0,
            new_version: 1,
            step,
            weights_hash: w.hash(),
        });
        out.insert(key.into(), blake3::hash(&bytes).to_hex().to_string().into());
    }
    // A longer replay on the real SmolLM2 layout (rank 4, all modules, A and B trainable).
    let (replayed, perturbed) = fixtures::smollm2_replay();
    out.insert(
        "smollm2_replay_hash".into(),
        replayed.hash().to_string().into(),
    );
    out.insert(
        "smollm2_perturbed_hash".into(),
        perturbed.hash().to_string().into(),
    );
    println!(
        "{}",
        serde_json::to_string_pretty(&out).expect("serialize golden values")
    );
}
