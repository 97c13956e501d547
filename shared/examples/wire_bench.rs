//! Wire-size and update-math benchmark for SmolLM2-135M with rank-8 LoRA on q and v.
//! Prints what it measured and writes flat JSON (default `target/bench/wire.json`).
//!
//! `cargo run --release -p fwdllm-shared --example wire_bench -- --out target/bench/wire.json`

use std::time::Instant;

use fwdllm_shared::lora::{LoraConfig, LoraLayout, LoraModule, LoraWeights, ModelShape};
use fwdllm_shared::perturb::{derive_seed, direction};
use fwdllm_shared::update::{apply_commit, SeedCoeff};
use fwdllm_shared::wire::{
    encode, Checkpoint, ClientSelection, ClientUpdate, CommitStep, RoundAnnounce, RoundCommit,
    SeedScalar, TaskParams,
};

fn update_with(n: u32) -> ClientUpdate {
    ClientUpdate {
        client_id: "agent-00".into(),
        round: 1234,
        base_version: 1200,
        seq: 0,
        pairs: (0..n)
            .map(|k| SeedScalar {
                seed: derive_seed(0xF00D, 1234, 7, k),
                g: 0.123 * k as f32 - 3.0,
            })
            .collect(),
        samples: 8 * n,
        loss_mean: 1.7,
        loss_m2: 0.25,
    }
}

/// Median of `reps` timings of `f`, in milliseconds.
fn time_ms(reps: usize, mut f: impl FnMut()) -> f64 {
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn main() {
    let mut out = String::from("target/bench/wire.json");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--out" => out = args.next().expect("--out needs a path"),
            other => {
                eprintln!("unknown argument {other:?}; usage: wire_bench [--out PATH]");
                std::process::exit(2);
            }
        }
    }

    let shape = ModelShape::smollm2_135m();
    let config = LoraConfig {
        rank: 8,
        alpha: 16.0,
        modules: vec![LoraModule::AttnQ, LoraModule::AttnV],
        ..LoraConfig::default()
    };
    let layout = LoraLayout::new(&shape, &config).expect("SmolLM2 rank-8 q/v layout");
    let mut weights = LoraWeights::init(layout);
    let total = weights.layout().total_len();
    let trainable = weights.layout().trainable_len();

    let mut report = serde_json::Map::new();
    let mut put = |k: &str, v: serde_json::Value| {
        println!("{k:32} {v}");
        report.insert(k.to_string(), v);
    };
    put("model", "SmolLM2-135M rank 8 q,v (trainable B)".into());
    put("lora_params_total", total.into());
    put("lora_params_trainable", trainable.into());

    for n in [1u32, 16, 256] {
        let bytes = encode(&update_with(n)).len();
        put(&format!("update_bytes_{n}"), bytes.into());
        put(
            &format!("bytes_per_perturbation_{n}"),
            (bytes as f64 / f64::from(n)).into(),
        );
    }
    let b256 = encode(&update_with(256)).len() as f64 / 256.0;
    put("bytes_per_perturbation", b256.into());

    let pairs: Vec<SeedCoeff> = (0..256)
        .map(|k| SeedCoeff {
            seed: derive_seed(0xF00D, 1234, 7, k),
            coeff: -1e-4 * (k as f32 - 128.0),
        })
        .collect();
    let commit = RoundCommit {
        round: 1234,
        base_version: 1200,
        new_version: 1201,
        step: CommitStep::Pairs(pairs.clone()),
        weights_hash: weights.hash(),
    };
    put("commit_bytes_256", encode(&commit).len().into());
    // The classification recipe's layout (5 verbalizer head rows: 2,885 values) with a round of
    // 1,024 pairs: the aggregator sends the smaller form (`CommitStep::smaller`).
    let head = LoraWeights::init(
        LoraLayout::new(
            &shape,
            &LoraConfig {
                modules: Vec::new(),
                head_rows: 5,
                ..LoraConfig::default()
            },
        )
        .expect("SmolLM2 head-rows layout"),
    );
    let round_1024: Vec<SeedCoeff> = (0..1024)
        .map(|k| SeedCoeff {
            seed: derive_seed(0xF00D, 1234, 7, k),
            coeff: 1e-4,
        })
        .collect();
    for (key, step) in [
        (
            "commit_bytes_head_rows_1024_pairs",
            CommitStep::Pairs(round_1024.clone()),
        ),
        (
            "commit_bytes_head_rows_1024_smallest",
            CommitStep::smaller(round_1024, &head),
        ),
    ] {
        let c = RoundCommit {
            step,
            ..commit.clone()
        };
        put(key, encode(&c).len().into());
    }
    let announce = RoundAnnounce {
        job: "bbc".into(),
        round: 1234,
        model_version: 1200,
        weights_hash: weights.hash(),
        perturbations_per_client: 16,
        eps: 1e-3,
        deadline_unix_ms: 1_800_000_000_000,
        selection: ClientSelection::All,
        task: TaskParams::default(),
        seed_base: 0xF00D,
        extend: 0,
    };
    put("announce_bytes", encode(&announce).len().into());
    put(
        "checkpoint_bytes",
        encode(&Checkpoint::from_weights(1200, &weights))
            .len()
            .into(),
    );
    put("dense_update_bytes", (total * 4).into());
    put("dense_update_bytes_trainable_only", (trainable * 4).into());

    let mut v = vec![0f32; trainable];
    let mut seed = 1u64;
    let gen_ms = time_ms(21, || {
        seed += 1;
        direction(seed, &mut v);
        std::hint::black_box(&v);
    });
    put("perturbation_gen_ms", gen_ms.into());
    let apply_ms = time_ms(5, || {
        apply_commit(&mut weights, &pairs);
        std::hint::black_box(weights.params());
    });
    put("commit_apply_ms", apply_ms.into());
    let hash_ms = time_ms(11, || {
        std::hint::black_box(weights.hash());
    });
    put("weights_hash_ms", hash_ms.into());

    if let Some(dir) = std::path::Path::new(&out).parent() {
        std::fs::create_dir_all(dir).expect("create report directory");
    }
    let json = serde_json::to_string_pretty(&serde_json::Value::Object(report)).expect("json");
    std::fs::write(&out, json + "\n").unwrap_or_else(|e| panic!("write {out}: {e}"));
    println!("wrote {out}");
}
