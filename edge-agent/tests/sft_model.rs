//! Instruction tuning on the real SmolLM2-135M model (set-up cache): greedy generation,
//! SFT evaluation and training, and `predict` on an SFT task. Few examples, few tokens.

mod real_model;

use fwdllm_agent::data;
use fwdllm_agent::engine::generate::StopReason;
use fwdllm_agent::engine::sft_eval::GenerationBudget;
use fwdllm_agent::engine::tail::{tail_path, TailHead};
use fwdllm_agent::engine::{
    Engine, EngineConfig, EngineError, ForwardPath, Precision, TailMatrices, TrainConfig,
};
use fwdllm_shared::lora::{LoraLayout, LoraWeights};
use real_model::{cache_dir, headline, jsonl_stdout, model, predict, root};

/// The SFT recipe's engine: tail path from its first layer, prefix at `prefix`.
fn engine(prefix: Precision, path: ForwardPath) -> Engine {
    engine_with(prefix, path, TailMatrices::F32)
}

fn engine_with(prefix: Precision, path: ForwardPath, matrices: TailMatrices) -> Engine {
    Engine::load(
        &EngineConfig {
            model: model(),
            cache_dir: cache_dir(),
            // Tests run in parallel; one thread each keeps the 2-core machine sane.
            threads: 1,
            // n_ctx and n_batch stay at their defaults, those of the `predict` binary.
            seqs_per_decode: 4,
            forward_path: path,
            prefix_precision: prefix,
            tail_matrices: matrices,
            prefix_cache_disk: false,
            ..EngineConfig::default()
        }
        .for_lora(&TrainConfig::sft_tail_recipe().lora),
    )
    .unwrap()
}

fn sft_weights(e: &Engine, seed: u64, coeff: f32) -> LoraWeights {
    let layout = LoraLayout::new(&e.model_shape(), &TrainConfig::sft_tail_recipe().lora).unwrap();
    let mut w = LoraWeights::init(layout);
    fwdllm_shared::update::add_direction(&mut w, seed, coeff);
    w
}

#[test]
fn greedy_generation_is_deterministic_stops_at_max_tokens_and_the_tail_matches_the_full_model() {
    let mut tail = engine(Precision::F32, ForwardPath::Auto);
    assert_eq!(tail.tail_layer(), Some(27));
    let w = sft_weights(&tail, 5, 0.05);
    tail.set_adapter(&w).unwrap();
    // A sentence the model continues for many tokens, and a headline prompt.
    let ex = headline(&tail, 2);
    let prompts = [
        "The history of the Roman Empire spans",
        ex[0].prompt.as_str(),
        ex[1].prompt.as_str(),
    ];
    let a = tail.generate_greedy(&prompts, 3).unwrap();
    let b = tail.generate_greedy(&prompts, 3).unwrap();
    assert_eq!(a, b);
    assert_eq!(a[0].stop, StopReason::MaxTokens, "{a:?}");
    assert_eq!(a[0].tokens.len(), 3);
    assert!(a.iter().all(|g| g.tokens.len() <= 3), "{a:?}");
    // Incremental decoding through the F32 prefix + tail equals the whole F32 model's.
    let mut full = engine(Precision::F32, ForwardPath::Full);
    full.set_adapter(&w).unwrap();
    assert_eq!(full.tail_layer(), None);
    let longer = full.generate_greedy(&prompts, 6).unwrap();
    assert_eq!(tail.generate_greedy(&prompts, 6).unwrap(), longer);
    // A shorter budget is a prefix of the longer generation (greedy is prefix-consistent).
    for (s, l) in a.iter().zip(&longer) {
        assert_eq!(s.tokens[..], l.tokens[..s.tokens.len()], "{s:?} vs {l:?}");
    }
}

#[test]
fn sft_training_lowers_the_nll_of_a_tiny_batch_and_refuses_head_rows() {
    let mut e = engine(Precision::Q8_0, ForwardPath::Auto);
    let ex = headline(&e, 4);
    let split = data::Split {
        train: ex.clone(),
        dev: ex.clone(),
        heldout: ex,
    };
    let mut cfg = TrainConfig::sft_tail_recipe();
    cfg.max_steps = 8;
    cfg.max_wall_s = 0.0;
    cfg.batch_size = 4;
    cfg.dev_every = 2;
    cfg.heldout_every = 0;
    let budget = GenerationBudget {
        examples: 2,
        max_new_tokens: 4,
        samples: 2,
    };
    let out = tempfile::tempdir().unwrap();
    let (report, best) = fwdllm_agent::engine::sft_train::train_sft_local(
        &mut e,
        "tiny",
        &split,
        &cfg,
        budget,
        out.path(),
        false,
    )
    .unwrap();
    assert!(
        report.final_heldout.nll < report.zero_shot.nll,
        "nll {} -> {}",
        report.zero_shot.nll,
        report.final_heldout.nll
    );
    assert!(report.sft_nll_rel_drop > 0.0);
    assert_eq!(report.zero_shot.samples.len(), 2);
    assert!(report
        .zero_shot
        .f1
        .is_some_and(|f| (0.0..=1.0).contains(&f)));
    assert!(out.path().join("adapter.gguf").is_file());
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("metrics.json")).unwrap()).unwrap();
    assert_eq!(m["steps"], 8);
    // The kept adapter evaluates to the reported NLL.
    let again = e.evaluate_sft(Some(&best), &split.heldout, budget).unwrap();
    assert_eq!(again.nll, report.final_heldout.nll);

    let mut head = cfg.clone();
    head.lora.head_rows = 4;
    let err = fwdllm_agent::engine::sft_train::train_sft_local(
        &mut e,
        "tiny",
        &split,
        &head,
        budget,
        out.path(),
        false,
    )
    .unwrap_err();
    assert!(matches!(err, EngineError::SftHeadRows { rows: 4 }), "{err}");
    assert!(err.to_string().contains("lora.head_rows = 0"), "{err}");
}

#[test]
fn predict_on_an_sft_task_writes_the_greedy_generations() {
    let mut e = engine(Precision::Q8_0, ForwardPath::Auto);
    let ex = headline(&e, 3);
    let w = sft_weights(&e, 9, 0.05);
    e.set_adapter(&w).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let adapter = dir.path().join("adapter.gguf");
    std::fs::write(&adapter, fwdllm_shared::gguf::write_lora_adapter(&w)).unwrap();
    // The task's template and truncation, as predict applies them to the input field.
    let task_path = dir.path().join("task.toml");
    std::fs::write(
        &task_path,
        std::fs::read_to_string(root().join("edge-agent/tasks/ag_news_headline.toml"))
            .unwrap()
            .replace("max_text_tokens = 64", "max_text_tokens = 24")
            .replace("max_response_tokens = 24", "max_response_tokens = 8"),
    )
    .unwrap();
    let descriptions: Vec<String> = ex
        .iter()
        .map(|x| {
            x.prompt
                .strip_prefix("Article: ")
                .and_then(|p| p.strip_suffix("\nHeadline:"))
                .unwrap()
                .to_string()
        })
        .collect();
    let input = dir.path().join("in.jsonl");
    let lines: Vec<String> = descriptions
        .iter()
        .map(|d| serde_json::json!({ "description": d }).to_string())
        .collect();
    std::fs::write(&input, lines.join("\n")).unwrap();
    let run =
        |input: &std::path::Path| predict(&task_path, &adapter, input, &["--seqs-per-decode", "4"]);
    let got = jsonl_stdout(run(&input));
    let prompts: Vec<&str> = ex.iter().map(|x| x.prompt.as_str()).collect();
    let want = e.generate_greedy(&prompts, 8).unwrap();
    assert_eq!(got.len(), 3);
    for (i, g) in got.iter().enumerate() {
        assert_eq!(g["line"], i + 1);
        assert_eq!(g["text"], descriptions[i].as_str());
        assert_eq!(g["generation"], want[i].text.trim(), "input {i}");
    }
    // JSONL without the template's field: the error names the line and the field.
    std::fs::write(&input, "{\"body\": \"x\"}\n").unwrap();
    let bad = run(&input);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("line 1") && err.contains("`description`"),
        "{err}"
    );
}

#[test]
fn tail_matrices_are_stored_as_asked_and_their_loss_differences_track_the_f32_tail() {
    // ΔL of one direction (what a forward gradient reads) on each tail, against the F32 one.
    let mut delta = Vec::new();
    for m in [TailMatrices::F32, TailMatrices::Bf16, TailMatrices::Q8_0] {
        let mut e = engine_with(Precision::Q8_0, ForwardPath::Auto, m);
        let ex = headline(&e, 4);
        let base = e.sft_loss(&ex).unwrap();
        e.set_adapter(&sft_weights(&e, 5, 0.05)).unwrap();
        let moved = e.sft_loss(&ex).unwrap();
        delta.push((m, base, moved - base));
        // The file holds the matrices in the asked type; norms and the head stay F32.
        let path = tail_path(&model(), 27, &TailHead::Full, m, &cache_dir());
        let header =
            fwdllm_shared::gguf::read_gguf_header(std::fs::File::open(&path).unwrap()).unwrap();
        let ty = |name: &str| header.tensor(name).unwrap().ggml_type;
        let matrix = match m {
            TailMatrices::F32 => 0,
            TailMatrices::Bf16 => 30,
            TailMatrices::Q8_0 => 8,
        };
        assert_eq!(ty("blk.0.ffn_down.weight"), matrix, "{m:?}");
        assert_eq!(ty("blk.0.attn_norm.weight"), 0, "{m:?}");
        assert_eq!(ty("token_embd.weight"), 0, "{m:?}");
    }
    eprintln!("(matrices, base NLL, ΔL): {delta:?}");
    let (_, base32, d32) = delta[0];
    assert!(d32.abs() > 1e-3, "the direction moves the F32 loss: {d32}");
    for &(m, base, d) in &delta[1..] {
        assert!(
            (base - base32).abs() < 0.02 * base32,
            "{m:?}: base {base} vs {base32}"
        );
        assert!((d - d32).abs() < 0.25 * d32.abs(), "{m:?}: ΔL {d} vs {d32}");
    }
}
