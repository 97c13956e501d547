//! Measures the replay hot paths (direction generation, add_direction, perturbed_params,
//! WeightsHash) on SmolLM2-135M LoRA layouts. Prints what it measured and writes JSON.
//!
//! `cargo run --release -p fwdllm-shared --example perturb_bench -- --out target/bench/perturb.json`

use std::hint::black_box;
use std::time::Instant;

use fwdllm_shared::lora::{LoraConfig, LoraLayout, LoraModule, LoraWeights, ModelShape, Trainable};
use fwdllm_shared::perturb::direction;
use fwdllm_shared::update::{add_direction, perturbed_params};

/// Median seconds per call of `f` over `reps` timed calls (after one warm-up).
fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut samples: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| "target/bench/perturb.json".to_string());

    let shape = ModelShape::smollm2_135m();
    let configs = [
        ("default_b_only", LoraConfig::default()),
        (
            "rank8_all_modules_ab",
            LoraConfig {
                rank: 8,
                alpha: 16.0,
                modules: LoraModule::ALL.to_vec(),
                trainable: Trainable::AB,
                ..LoraConfig::default()
            },
        ),
    ];
    let mut cases = Vec::new();
    for (name, config) in configs {
        let layout = LoraLayout::new(&shape, &config).expect("valid bench layout");
        let n_train = layout.trainable_len();
        let n_total = layout.total_len();
        let mut w = LoraWeights::init(layout);
        let mut buf = vec![0f32; n_train];
        let mut scratch = Vec::with_capacity(n_total);
        let mut seed = 0u64;
        let reps = 31;
        let t_dir = time(reps, || {
            seed += 1;
            direction(seed, black_box(&mut buf));
        });
        let t_add = time(reps, || {
            seed += 1;
            add_direction(black_box(&mut w), seed, 1e-6);
        });
        let t_pert = time(reps, || {
            seed += 1;
            perturbed_params(&w, seed, 1e-3, black_box(&mut scratch));
        });
        let t_hash = time(reps, || {
            black_box(w.hash());
        });
        let ns = |t: f64, n: usize| t * 1e9 / n as f64;
        println!(
            "{name}: trainable {n_train}, total {n_total}: direction {:.3} ms ({:.3} ns/param), \
             add_direction {:.3} ms ({:.3} ns/param), perturbed_params {:.3} ms, hash {:.3} ms",
            t_dir * 1e3,
            ns(t_dir, n_train),
            t_add * 1e3,
            ns(t_add, n_train),
            t_pert * 1e3,
            t_hash * 1e3
        );
        cases.push(serde_json::json!({
            "layout": name,
            "trainable_len": n_train,
            "total_len": n_total,
            "direction_s": t_dir,
            "add_direction_s": t_add,
            "perturbed_params_s": t_pert,
            "hash_s": t_hash,
            "direction_ns_per_param": ns(t_dir, n_train),
            "add_direction_ns_per_param": ns(t_add, n_train),
        }));
    }
    let report = serde_json::json!({ "bench": "perturb", "reps": 31, "statistic": "median", "cases": cases });
    if let Some(dir) = std::path::Path::new(&out).parent() {
        std::fs::create_dir_all(dir).expect("create bench output directory");
    }
    std::fs::write(
        &out,
        serde_json::to_string_pretty(&report).expect("serialize report"),
    )
    .expect("write bench report");
    println!("wrote {out}");
}
