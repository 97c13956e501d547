//! Federated instruction tuning end to end on the real model: `fwdllm bench-federation` on the
//! shipped headline task (AG News description → title, read from `../shared/data`) with two
//! in-process agents — the daemon's `EngineSource` on SFT shards — and the aggregator over the
//! embedded broker, stopped after two commits.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

/// The two runs take turns: each spins llama.cpp threads on every core, and side by side they
/// slowed each other far more than twice (148 s together against 62 s for the longer one alone).
static ONE_RUN_AT_A_TIME: Mutex<()> = Mutex::new(());

#[test]
fn two_agents_commit_sft_rounds_and_their_replicas_agree() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    assert!(
        root.join(".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf")
            .is_file(),
        "the model is missing: run `make setup` first"
    );
    let _turn = ONE_RUN_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let report = dir.path().join("sft.json");
    let out = Command::new(env!("CARGO_BIN_EXE_fwdllm"))
        .current_dir(&root)
        .args([
            "bench-federation",
            "--task",
            "edge-agent/tasks/ag_news_headline.toml",
            "--agents",
            "2",
            "--max-commits",
            "2",
            "--minutes",
            "10",
            "--heldout",
            "8",
            "--eval-every",
            "1",
            "--sim-clients",
            "0",
            // The tail layout keeps the suite's time: agents set norm-gain replicas through the
            // same `Engine::set_adapter` that `edge-agent/tests/norms_model.rs` checks.
            "--sft-layout",
            "tail",
            "--out-dir",
        ])
        .arg(dir.path().join("run"))
        .arg("--out")
        .arg(&report)
        .output()
        .expect("run fwdllm");
    assert!(
        out.status.success(),
        "bench-federation failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).expect("report")).expect("json");
    assert_eq!(r["kind"], "sft");
    assert_eq!(r["commits"], 2, "{r:#}");
    assert!(r["rounds"].as_u64().expect("rounds") >= 2, "{r:#}");
    assert_eq!(r["replica_hashes_equal"], true, "{r:#}");
    assert_eq!(r["heldout_examples"], 8);
    let zero = r["zero_shot_nll"].as_f64().expect("zero-shot NLL");
    let last = r["last_version_nll"].as_f64().expect("last NLL");
    assert!(zero.is_finite() && zero > 0.0 && last.is_finite(), "{r:#}");
    // Two commits of real forward gradients moved the adapter, so the held-out NLL moved.
    assert_ne!(zero, last, "{r:#}");
    // Model selection ran on the agents' dev NLL and the export is one of the versions.
    assert!(r["selected_version"].as_u64().expect("selected") <= 2);
    assert!(dir.path().join("run/adapter.gguf").is_file());
    assert_eq!(r["samples"].as_array().map(Vec::len), Some(3));
}

#[test]
fn the_norm_gain_recipe_commits_federated_rounds_and_exports_a_merged_model() {
    // The default SFT layout (RMSNorm gains of every layer, whole-model evaluations) through
    // the daemon's engine source and the aggregator: replicas agree bit for bit, and the export
    // comes with the model holding the gains, for stock llama.cpp.
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let _turn = ONE_RUN_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().expect("tempdir");
    let report = dir.path().join("sft.json");
    let out = Command::new(env!("CARGO_BIN_EXE_fwdllm"))
        .current_dir(&root)
        .args([
            "bench-federation",
            "--task",
            "edge-agent/tasks/ag_news_headline.toml",
            "--agents",
            "2",
            "--max-commits",
            "2",
            "--minutes",
            "10",
            "--heldout",
            "8",
            // No dev scoring: the first test covers model selection, and whole-model dev
            // evaluations were two thirds of this run.
            "--eval-every",
            "0",
            "--sim-clients",
            "0",
            "--perturbations",
            "2",
            "--out-dir",
        ])
        .arg(dir.path().join("run"))
        .arg("--out")
        .arg(&report)
        .output()
        .expect("run fwdllm");
    assert!(
        out.status.success(),
        "bench-federation failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).expect("report")).expect("json");
    assert_eq!(r["commits"], 2, "{r:#}");
    assert_eq!(r["replica_hashes_equal"], true, "{r:#}");
    // 30 layers × (attn_norm, ffn_norm) × n_embd 576.
    assert_eq!(r["lora_trainable_params"], 34_560, "{r:#}");
    assert_ne!(r["zero_shot_nll"], r["last_version_nll"], "{r:#}");
    let merged = dir.path().join("run/model-merged.gguf");
    let model = root.join(".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert_eq!(
        std::fs::metadata(&merged).expect("model-merged.gguf").len(),
        std::fs::metadata(&model).expect("model").len(),
        "the merged model is the model with its gains rewritten in place"
    );
}
