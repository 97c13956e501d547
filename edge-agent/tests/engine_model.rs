//! Engine tests on the real SmolLM2-135M model (set-up cache) with short inputs.
//! The F32 copy is created through the same cached `prepare` path the CLI uses.

mod real_model;

use fwdllm_agent::data::{self, Example, TaskConfig};
use fwdllm_agent::engine::{
    Engine, EngineConfig, EngineError, ForwardPath, Precision, TrainConfig,
};
use fwdllm_shared::lora::{LoraLayout, LoraWeights};
use real_model::{cache_dir, jsonl_stdout, model, predict, root};

fn config(precision: Precision) -> EngineConfig {
    EngineConfig {
        model: model(),
        cache_dir: cache_dir(),
        precision,
        // Tests run in parallel; one thread each keeps the 2-core machine sane.
        threads: 1,
        n_ctx: 1024,
        n_batch: 1024,
        seqs_per_decode: 8,
        // These tests pin the whole-model path; the tail tests below opt in.
        forward_path: ForwardPath::Full,
        ..EngineConfig::default()
    }
}

/// The tail path from the default layout's first layer, prefix at `prefix`.
fn tail_config(prefix: Precision) -> EngineConfig {
    EngineConfig {
        forward_path: ForwardPath::Auto,
        prefix_precision: prefix,
        // The cache-hit counts below assume a cold cache.
        prefix_cache_disk: false,
        ..config(Precision::F32)
    }
    .for_lora(&TrainConfig::default().lora)
}

/// BBC task with short inputs (24 tokens of article).
fn task() -> (TaskConfig, data::Split) {
    let mut t = TaskConfig::from_file(&root().join("edge-agent/tasks/bbc.toml")).unwrap();
    t.max_text_tokens = 24;
    let ex = t.load_examples(&root()).unwrap();
    let s = data::split(ex, t.split_seed, t.heldout, t.dev);
    (t, s)
}

fn engine(precision: Precision) -> (Engine, TaskConfig, data::Split) {
    let (t, s) = task();
    let mut e = Engine::load(&config(precision)).unwrap();
    e.set_task(&t).unwrap();
    (e, t, s)
}

fn weights(e: &Engine, seed: u64, coeff: f32) -> LoraWeights {
    let layout = LoraLayout::new(&e.model_shape(), &TrainConfig::default().lora).unwrap();
    let mut w = LoraWeights::init(layout);
    if coeff != 0.0 {
        fwdllm_shared::update::add_direction(&mut w, seed, coeff);
    }
    w
}

fn texts(s: &data::Split, n: usize) -> Vec<&str> {
    s.heldout.iter().take(n).map(|e| e.text.as_str()).collect()
}

fn bits(v: &[Vec<f32>]) -> Vec<Vec<u32>> {
    v.iter()
        .map(|r| r.iter().map(|x| x.to_bits()).collect())
        .collect()
}

#[test]
fn zero_adapter_gives_the_same_logits_as_no_adapter() {
    let (mut e, _, s) = engine(Precision::F32);
    let task = e.task().unwrap().clone();
    let t = texts(&s, 3);
    e.clear_adapter();
    let base = e.last_logits(&task, &t).unwrap();
    let zero = weights(&e, 0, 0.0);
    e.set_adapter(&zero).unwrap();
    let with_zero = e.last_logits(&task, &t).unwrap();
    assert_eq!(bits(&base), bits(&with_zero));
}

#[test]
fn in_memory_adapter_equals_the_same_adapter_from_a_file() {
    let (mut e, _, s) = engine(Precision::F32);
    let task = e.task().unwrap().clone();
    let t = texts(&s, 3);
    let base = e.last_logits(&task, &t).unwrap();
    let w = weights(&e, 11, 0.05);
    e.set_adapter(&w).unwrap();
    let mem = e.last_logits(&task, &t).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.gguf");
    std::fs::write(&path, fwdllm_shared::gguf::write_lora_adapter(&w)).unwrap();
    e.set_adapter_file(&path).unwrap();
    let file = e.last_logits(&task, &t).unwrap();
    assert_eq!(bits(&mem), bits(&file));
    assert_ne!(
        bits(&base),
        bits(&mem),
        "the adapter must change the logits"
    );
}

#[test]
fn exported_adapter_loads_in_a_fresh_quantized_context_and_changes_predictions() {
    // Export from one engine, load into a fresh context of the quantised model (the serving
    // case). A large step along one direction is enough to move predictions.
    let (e, _, s) = engine(Precision::F32);
    let w = weights(&e, 5, 0.5);
    drop(e);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("export.gguf");
    std::fs::write(&path, fwdllm_shared::gguf::write_lora_adapter(&w)).unwrap();

    let (mut q, _, _) = engine(Precision::Quantized);
    let task = q.task().unwrap().clone();
    let batch: Vec<Example> = s.heldout.iter().take(16).cloned().collect();
    q.clear_adapter();
    let before = q.loss(&task, &batch).unwrap();
    q.set_adapter_file(&path).unwrap();
    let after = q.loss(&task, &batch).unwrap();
    let changed = before
        .predictions
        .iter()
        .zip(&after.predictions)
        .filter(|(a, b)| a != b)
        .count();
    println!(
        "predictions changed on {changed}/16; loss {:.4} -> {:.4}",
        before.mean, after.mean
    );
    assert!(changed > 0, "adapter did not change any prediction");
}

#[test]
fn gradient_at_calibrated_eps_agrees_with_eps_over_10() {
    let (mut e, _, s) = engine(Precision::F32);
    let cfg = TrainConfig::default();
    let w = weights(&e, 0, 0.0);
    let batch: Vec<Example> = s.train.iter().take(4).cloned().collect();
    let seeds = [1u64, 2, 3];
    let g1 = e
        .forward_gradients(&w, &batch, &seeds, cfg.eps, false)
        .unwrap();
    let g2 = e
        .forward_gradients(&w, &batch, &seeds, cfg.eps / 10.0, false)
        .unwrap();
    println!("g(eps={}) {g1:?}\ng(eps/10) {g2:?}", cfg.eps);
    let diff = g1
        .iter()
        .zip(&g2)
        .map(|(a, b)| (a - b) * (a - b))
        .sum::<f32>()
        .sqrt();
    let norm = g2.iter().map(|b| b * b).sum::<f32>().sqrt();
    assert!(norm > 1e-3, "g is ~0: no signal");
    assert!(
        diff <= 0.05 * norm,
        "g at eps and eps/10 differ by {diff} (|g| {norm}), more than 5%"
    );
}

#[test]
fn dequantised_copy_agrees_with_the_quantised_model() {
    let n = 32;
    let (mut f, _, s) = engine(Precision::F32);
    let batch: Vec<Example> = s.heldout.iter().take(n).cloned().collect();
    let task = f.task().unwrap().clone();
    let pf = f.loss(&task, &batch).unwrap().predictions;
    drop(f);
    let (mut q, _, _) = engine(Precision::Quantized);
    let task = q.task().unwrap().clone();
    let pq = q.loss(&task, &batch).unwrap().predictions;
    let agree = pf.iter().zip(&pq).filter(|(a, b)| a == b).count();
    println!("F32 copy vs Q4_1: label argmax agreement {agree}/{n}");
    // Same function up to 8-bit activation rounding: near-total agreement expected.
    assert!(agree * 100 >= n * 80, "agreement {agree}/{n} below 80%");
}

#[test]
fn repeated_evaluation_is_bit_identical() {
    let (mut e, _, s) = engine(Precision::F32);
    let task = e.task().unwrap().clone();
    let batch: Vec<Example> = s.heldout.iter().take(6).cloned().collect();
    let w = weights(&e, 3, 0.05);
    e.set_adapter(&w).unwrap();
    let a = e.loss(&task, &batch).unwrap();
    // Swap to another adapter and back: state must not leak between evaluations.
    e.set_adapter(&weights(&e, 4, 0.05)).unwrap();
    e.loss(&task, &batch).unwrap();
    e.set_adapter(&w).unwrap();
    let b = e.loss(&task, &batch).unwrap();
    assert_eq!(a.mean.to_bits(), b.mean.to_bits());
    let ga = e
        .forward_gradients(&w, &batch, &[9, 10], 1e-2, true)
        .unwrap();
    let gb = e
        .forward_gradients(&w, &batch, &[9, 10], 1e-2, true)
        .unwrap();
    assert_eq!(
        ga.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        gb.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
}

#[test]
fn malformed_model_path_is_a_clear_error() {
    let mut c = config(Precision::F32);
    c.model = root().join(".cache/models/does-not-exist.gguf");
    match Engine::load(&c) {
        Err(EngineError::ModelNotFound(p)) => assert!(p.ends_with("does-not-exist.gguf")),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("loaded a missing model"),
    }
    // A file that is not a GGUF model.
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"not a model").unwrap();
    let mut c = config(Precision::Quantized);
    c.model = junk;
    let err = Engine::load(&c)
        .expect_err("junk must not load")
        .to_string();
    assert!(err.contains("junk.gguf"), "{err}");
}

#[test]
fn rank_zero_and_unknown_module_are_clear_errors() {
    let (mut e, _, s) = engine(Precision::Quantized);
    let mut tc = TrainConfig::default();
    tc.lora.rank = 0;
    let dir = tempfile::tempdir().unwrap();
    let err = fwdllm_agent::engine::train::train_local(&mut e, &s, &tc, dir.path(), false)
        .expect_err("rank 0 must fail")
        .to_string();
    assert!(err.contains("rank"), "{err}");

    let err = toml::from_str::<TrainConfig>("[lora]\nmodules = [\"attn_x\"]\n")
        .expect_err("unknown module must fail")
        .to_string();
    assert!(err.contains("attn_x") && err.contains("attn_q"), "{err}");
}

#[test]
fn unknown_label_word_token_collision_is_a_clear_error() {
    let (e, t, _) = engine(Precision::Quantized);
    let mut bad = t.clone();
    bad.words[1] = bad.words[0].clone();
    let err = e.prepare_task(&bad).expect_err("collision").to_string();
    assert!(err.contains("same token"), "{err}");
}

#[test]
fn sft_loss_scores_the_response_and_its_forward_gradient_descends() {
    let (mut e, _, _) = engine(Precision::F32);
    let sft = |prompt: &str, response: &str| data::SftExample {
        prompt: prompt.into(),
        response: response.into(),
    };
    e.clear_adapter();
    let likely = e
        .sft_loss(&[sft("The capital of France is", " Paris.")])
        .unwrap();
    let unlikely = e
        .sft_loss(&[sft("The capital of France is", " tractor.")])
        .unwrap();
    assert!(
        likely < unlikely,
        "likely {likely} should score below unlikely {unlikely}"
    );

    // One small step against the estimated gradient lowers the loss: to first order the
    // decrease is η/K·Σ g_k², which is positive whatever the directions.
    let batch = [
        sft("Question: what colour is the sky?\nAnswer:", " Blue."),
        sft("Question: what is 2 + 2?\nAnswer:", " 4."),
    ];
    let mut w = weights(&e, 0, 0.0);
    let seeds: Vec<u64> = (1..=6).collect();
    let (g, l0) = e
        .sft_forward_gradients(&w, &batch, &seeds, 1e-2, false)
        .unwrap();
    assert!(g.iter().any(|&x| x != 0.0), "{g:?}");
    let eta = 1e-4 / g.iter().map(|x| x * x).sum::<f32>().sqrt();
    for (&s, &gk) in seeds.iter().zip(&g) {
        fwdllm_shared::update::add_direction(&mut w, s, -eta * gk);
    }
    e.set_adapter(&w).unwrap();
    let l1 = e.sft_loss(&batch).unwrap();
    assert!(l1 < l0, "loss went from {l0} to {l1}");
    assert!(matches!(e.sft_loss(&[]), Err(EngineError::EmptyBatch)));
}

fn tail_engine(prefix: Precision) -> Engine {
    let (t, _) = task();
    let mut e = Engine::load(&tail_config(prefix)).unwrap();
    e.set_task(&t).unwrap();
    e
}

#[test]
fn one_sided_estimates_one_seed_per_call_equal_one_call_and_follow_batch_and_weights() {
    // The daemon asks for one direction per call on the round's batch: every call after the
    // first reuses L(θ) (same weights, loss and batch), and must give the bits one call gives.
    let mut e = tail_engine(Precision::Q8_0);
    let (_, s) = task();
    let (a, b) = (&s.train[..4], &s.train[4..8]);
    let w = weights(&e, 5, 2e-2);
    let seeds = [11u64, 12, 13];
    let (g_all, l_all) = e
        .forward_gradients_with_loss(&w, b, &seeds, 1e-2, true)
        .unwrap();
    // Another batch, then other weights, each with its own L(θ).
    let (_, l_a) = e
        .forward_gradients_with_loss(&w, a, &seeds[..1], 1e-2, true)
        .unwrap();
    assert_ne!(l_a, l_all);
    let w2 = weights(&e, 6, 2e-2);
    let (_, l_w2) = e
        .forward_gradients_with_loss(&w2, b, &seeds[..1], 1e-2, true)
        .unwrap();
    assert_ne!(l_w2, l_all);
    let mut g_chunks = Vec::new();
    for s in seeds {
        let (g, l) = e
            .forward_gradients_with_loss(&w, b, &[s], 1e-2, true)
            .unwrap();
        assert_eq!(l.to_bits(), l_all.to_bits());
        g_chunks.push(g[0]);
    }
    assert_eq!(bits(&[g_all]), bits(&[g_chunks]));
}

#[test]
fn tail_path_gives_the_full_models_loss_for_the_same_weights_and_batch() {
    // Same θ (non-zero B), same batch: with an F32 prefix the tail computes the same function
    // as the whole F32 model, split at layer 26.
    let (mut full, t, s) = engine(Precision::F32);
    let mut tail = tail_engine(Precision::F32);
    assert_eq!(tail.tail_layer(), Some(26), "{}", tail.describe_path());
    let w = weights(&full, 5, 2e-2);
    let batch = &s.train[..8];
    full.set_adapter(&w).unwrap();
    tail.set_adapter(&w).unwrap();
    let task_full = full.task().cloned().unwrap();
    let task_tail = tail.task().cloned().unwrap();
    let lf = full.loss(&task_full, batch).unwrap();
    let lt = tail.loss(&task_tail, batch).unwrap();
    let rel = ((lt.mean - lf.mean) / lf.mean).abs();
    eprintln!("full {:.9} tail {:.9} rel diff {rel:.3e}", lf.mean, lt.mean);
    assert!(rel <= 1e-4, "full {} tail {} rel {rel:e}", lf.mean, lt.mean);
    assert_eq!(lf.predictions, lt.predictions);
    for (a, b) in lf.per_example.iter().zip(&lt.per_example) {
        assert!(((a - b) / a).abs() <= 1e-4, "{a} vs {b}");
    }
    // The exported adapter (full-model layer numbers) read back through the tail's shift.
    let path = std::env::temp_dir().join(format!("fwdllm-tail-{}.gguf", std::process::id()));
    std::fs::write(&path, fwdllm_shared::gguf::write_lora_adapter(&w)).unwrap();
    tail.set_adapter_file(&path).unwrap();
    let lfile = tail.loss(&task_tail, batch).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(lfile.mean.to_bits(), lt.mean.to_bits());
    let _ = t;
}

#[test]
fn tail_forward_gradients_track_the_full_models_with_a_quantised_prefix() {
    // The quantised prefix shifts the tail's input by a fixed amount; g is a difference of
    // two losses on that same input, so it stays close to the full F32 model's g.
    let (mut full, _, s) = engine(Precision::F32);
    let mut tail = tail_engine(Precision::Quantized);
    let w = weights(&full, 3, 1e-2);
    let batch = &s.train[..8];
    let seeds = [11u64, 12, 13, 14];
    let gf = full
        .forward_gradients(&w, batch, &seeds, 1e-2, false)
        .unwrap();
    let gt = tail
        .forward_gradients(&w, batch, &seeds, 1e-2, false)
        .unwrap();
    let (hits, misses) = tail.prefix_cache_stats();
    eprintln!("full {gf:?} tail {gt:?} prefix cache hits {hits} misses {misses}");
    assert_eq!(misses, 8, "the prefix runs once per prompt of the batch");
    assert_eq!(hits, 8 * (2 * seeds.len() as u64 - 1));
    let dot: f64 = gf
        .iter()
        .zip(&gt)
        .map(|(a, b)| f64::from(*a) * f64::from(*b))
        .sum();
    let nf: f64 = gf.iter().map(|a| f64::from(*a).powi(2)).sum::<f64>().sqrt();
    let nt: f64 = gt.iter().map(|a| f64::from(*a).powi(2)).sum::<f64>().sqrt();
    let cos = dot / (nf * nt);
    assert!(cos > 0.9, "cosine of g between paths {cos}");
    // Repeatable to the bit, like the full path.
    let again = tail
        .forward_gradients(&w, batch, &seeds, 1e-2, false)
        .unwrap();
    assert_eq!(
        gt.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        again.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
}

#[test]
fn tail_path_serves_the_sft_loss_and_full_vocabulary_logits() {
    let (mut full, t, s) = engine(Precision::F32);
    let mut tail = tail_engine(Precision::F32);
    let w = weights(&full, 9, 2e-2);
    full.set_adapter(&w).unwrap();
    tail.set_adapter(&w).unwrap();
    let task_full = full.task().cloned().unwrap();
    let task_tail = tail.task().cloned().unwrap();
    let tx = texts(&s, 3);
    let a = full.last_logits(&task_full, &tx).unwrap();
    let b = tail.last_logits(&task_tail, &tx).unwrap();
    assert_eq!(a[0].len(), b[0].len(), "full head keeps the vocabulary");
    let max_diff = a
        .iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(max_diff < 1e-3, "largest logit difference {max_diff}");
    let sft: Vec<data::SftExample> = s.heldout[..2]
        .iter()
        .map(|e| data::SftExample {
            prompt: format!("Article: {}\nTopic:", &e.text[..e.text.len().min(120)]),
            response: format!(" {}", t.labels[e.label]),
        })
        .collect();
    let lf = full.sft_loss(&sft).unwrap();
    let lt = tail.sft_loss(&sft).unwrap();
    assert!(((lf - lt) / lf).abs() <= 1e-4, "sft full {lf} tail {lt}");
}

#[test]
fn an_adapter_below_the_tail_is_a_clear_error_and_layer_zero_takes_the_full_path() {
    let mut tail = tail_engine(Precision::Quantized);
    assert_eq!(tail.tail_layer(), Some(26));
    // An exported adapter for layer 3 cannot be shifted onto a tail from 26 ... unless the
    // engine re-routes: it picks the tail from the adapter's own first layer.
    let mut lora = TrainConfig::default().lora;
    lora.layers = Some((3, 5));
    let layout = LoraLayout::new(&tail.model_shape(), &lora).unwrap();
    let mut w = LoraWeights::init(layout);
    fwdllm_shared::update::add_direction(&mut w, 1, 1e-2);
    tail.set_adapter(&w).unwrap();
    assert_eq!(tail.tail_layer(), Some(3));
    // A layout that adapts layer 0 leaves nothing frozen: the full F32 model.
    lora.layers = Some((0, 2));
    let layout = LoraLayout::new(&tail.model_shape(), &lora).unwrap();
    tail.set_adapter(&LoraWeights::init(layout)).unwrap();
    assert_eq!(tail.tail_layer(), None, "{}", tail.describe_path());
    assert!(tail.describe_path().starts_with("full f32"));
    // Low-level: shifting an adapter below the tail names the tensor and the fix.
    let bytes = fwdllm_shared::gguf::write_lora_adapter(&w);
    let err = fwdllm_agent::engine::tail::shift_adapter(&bytes, 26).unwrap_err();
    assert!(
        err.contains("blk.3.") && err.contains("forward_path"),
        "{err}"
    );
}

#[test]
fn prefix_states_on_disk_are_reused_by_a_new_engine_with_the_same_losses() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = EngineConfig {
        prefix_cache_disk: true,
        cache_dir: dir.path().to_path_buf(),
        ..tail_config(Precision::Quantized)
    };
    let (t, s) = task();
    let batch = &s.train[..4];
    let run = || {
        let mut e = Engine::load(&cfg).unwrap();
        e.set_task(&t).unwrap();
        let task = e.task().cloned().unwrap();
        let l = e.loss(&task, batch).unwrap();
        (l.mean.to_bits(), e.prefix_cache_stats())
    };
    let (first, (hits0, misses0)) = run();
    assert_eq!((hits0, misses0), (0, 4));
    let (second, (hits1, misses1)) = run();
    assert_eq!((hits1, misses1), (4, 0), "every prompt read back from disk");
    assert_eq!(first, second, "same loss to the bit");
}

/// The default layout plus verbalizer head rows for the BBC task's 5 labels.
fn head_lora(blockwise: bool, modules: bool) -> fwdllm_shared::lora::LoraConfig {
    let mut l = TrainConfig::default().lora;
    l.head_rows = 5;
    l.head_alpha = 0.05;
    l.blockwise = blockwise;
    if !modules {
        l.modules.clear();
    }
    l
}

#[test]
fn head_rows_shift_the_label_logits_by_alpha_times_delta_dot_hidden() {
    // Zero head rows give exactly the loss of the same adapter without them (the unit rows
    // of the label head leave the label logits alone); a bias on one label raises its logit.
    let mut e = tail_engine(Precision::Q8_0);
    let t = e.task().cloned().unwrap();
    let (_, s) = task();
    let batch = &s.train[..8];
    let plain = weights(&e, 5, 2e-2);
    let layout = LoraLayout::new(&e.model_shape(), &head_lora(false, true)).unwrap();
    let mut params = plain.params().to_vec();
    params.resize(layout.total_len(), 0.0);
    let zero_head = LoraWeights::from_params(layout.clone(), params.clone()).unwrap();
    e.set_adapter(&plain).unwrap();
    let l_plain = e.loss(&t, batch).unwrap();
    e.set_adapter(&zero_head).unwrap();
    let l_zero = e.loss(&t, batch).unwrap();
    assert_eq!(l_plain.mean.to_bits(), l_zero.mean.to_bits());
    let bias = layout.head().unwrap().bias.clone();
    params[bias.start + 2] = 4.0; // label 2 ("politics") gains 0.05 * 4 = 0.2 nats of logit
    let biased = LoraWeights::from_params(layout, params).unwrap();
    e.set_adapter(&biased).unwrap();
    let l_bias = e.loss(&t, batch).unwrap();
    assert_ne!(l_bias.mean, l_plain.mean);
    // Raising label 2's logit lowers the loss of label-2 examples and raises every other.
    for (i, ex) in batch.iter().enumerate() {
        let d = l_bias.per_example[i] - l_plain.per_example[i];
        if ex.label == 2 {
            assert!(
                d < 0.0,
                "example {i}: the true label's logit rose, loss must fall ({d})"
            );
        } else {
            assert!(
                d > 0.0,
                "example {i}: another label's logit rose, loss must rise ({d})"
            );
        }
    }
}

#[test]
fn head_block_directions_cost_no_pass_and_equal_the_full_evaluation() {
    // A block-wise layout: head-block directions are evaluated from the unperturbed pass's
    // features; the same g must come out of setting the perturbed adapter and evaluating
    // the loss through the model.
    let mut e = tail_engine(Precision::Q8_0);
    let t = e.task().cloned().unwrap();
    let (_, s) = task();
    let batch = &s.train[..8];
    let layout = LoraLayout::new(&e.model_shape(), &head_lora(true, true)).unwrap();
    let mut w = LoraWeights::init(layout.clone());
    fwdllm_shared::update::add_direction(&mut w, 4, 2e-2); // adapter block
    fwdllm_shared::update::add_direction(&mut w, 7, 1e-1); // head block
    let seeds = [11u64, 13, 12]; // two head directions, one adapter direction
    assert_eq!(
        seeds.map(|s| layout.block_of(s)),
        [
            fwdllm_shared::lora::DirectionBlock::Head,
            fwdllm_shared::lora::DirectionBlock::Head,
            fwdllm_shared::lora::DirectionBlock::Adapter
        ]
    );
    let eps = 1e-2;
    let (g, l0) = e
        .forward_gradients_with_loss(&w, batch, &seeds, eps, true)
        .unwrap();
    e.set_adapter(&w).unwrap();
    let base = e.loss(&t, batch).unwrap().mean;
    assert_eq!(base.to_bits(), l0.to_bits());
    for (k, &seed) in seeds.iter().enumerate() {
        let mut p = w.clone();
        fwdllm_shared::update::add_direction(&mut p, seed, eps);
        e.set_adapter(&p).unwrap();
        let lp = e.loss(&t, batch).unwrap().mean;
        let want = ((lp - base) / eps as f64) as f32;
        assert_eq!(
            g[k].to_bits(),
            want.to_bits(),
            "seed {seed}: {} vs {want}",
            g[k]
        );
        assert!(g[k] != 0.0);
    }
}

#[test]
fn head_rows_travel_in_the_exported_adapter_and_a_wrong_task_is_refused() {
    let mut e = tail_engine(Precision::Q8_0);
    let t = e.task().cloned().unwrap();
    let (_, s) = task();
    let batch = &s.heldout[..8];
    for modules in [true, false] {
        let layout = LoraLayout::new(&e.model_shape(), &head_lora(false, modules)).unwrap();
        let mut w = LoraWeights::init(layout);
        fwdllm_shared::update::add_direction(&mut w, 9, 5e-2);
        let direct = e.evaluate(Some(&w), batch).unwrap();
        let bytes = fwdllm_shared::gguf::write_lora_adapter(&w);
        e.set_adapter_bytes(&bytes).unwrap();
        let from_file = e.loss(&t, batch).unwrap();
        assert_eq!(
            from_file.mean.to_bits(),
            direct.loss.to_bits(),
            "modules {modules}"
        );
        e.clear_adapter();
        let base = e.loss(&t, batch).unwrap();
        assert_ne!(base.mean, direct.loss);
    }
    // A task with another label count cannot use 5 head rows.
    let mut other = t.config.clone();
    other.labels.truncate(4);
    other.words.truncate(4);
    let four = e.prepare_task(&other).unwrap();
    let layout = LoraLayout::new(&e.model_shape(), &head_lora(false, false)).unwrap();
    e.set_adapter(&LoraWeights::init(layout)).unwrap();
    let err = e
        .loss(
            &four,
            &batch[..2]
                .iter()
                .map(|x| Example {
                    label: 0,
                    ..x.clone()
                })
                .collect::<Vec<_>>(),
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::HeadMismatch {
                rows: 5,
                n_labels: 4
            }
        ),
        "{err}"
    );
}

#[test]
fn predict_gives_evals_labels_and_probabilities_for_an_exported_adapter() {
    // Head rows with a bias towards one label, exported as a GGUF; `fwdllm-agent predict` on
    // held-out texts (JSONL) must predict what the engine's loss predicts, with probabilities
    // that sum to 1, and refuse a missing adapter with a message naming the fix.
    let mut e = tail_engine(Precision::Q8_0);
    let (_, s) = task();
    let held = &s.heldout[..12];
    let layout = LoraLayout::new(&e.model_shape(), &head_lora(false, false)).unwrap();
    let mut w = LoraWeights::init(layout.clone());
    fwdllm_shared::update::add_direction(&mut w, 21, 0.5);
    let report = e.evaluate(Some(&w), held).unwrap();
    let t = e.task().cloned().unwrap();
    let want = e.loss(&t, held).unwrap().predictions;
    let dir = std::env::temp_dir().join(format!("fwdllm-predict-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let adapter = dir.join("adapter.gguf");
    std::fs::write(&adapter, fwdllm_shared::gguf::write_lora_adapter(&w)).unwrap();
    let input = dir.join("texts.jsonl");
    let lines: Vec<String> = held
        .iter()
        .map(|x| serde_json::json!({ "body": x.text }).to_string())
        .collect();
    std::fs::write(&input, lines.join("\n")).unwrap();
    let r = root();
    let task_file = r.join("edge-agent/tasks/bbc.toml");
    let run = |adapter: &std::path::Path| {
        predict(
            &task_file,
            adapter,
            &input,
            &[
                "--max-text-tokens",
                "24",
                "--root",
                r.to_str().unwrap(),
                "--text-field",
                "body",
            ],
        )
    };
    let labels = &t.config.labels;
    let got = jsonl_stdout(run(&adapter));
    assert_eq!(got.len(), held.len());
    let mut correct = 0;
    for (i, g) in got.iter().enumerate() {
        assert_eq!(g["line"], i + 1);
        assert_eq!(g["label"], labels[want[i]].as_str(), "text {i}");
        let p = g["probabilities"].as_object().unwrap();
        assert_eq!(p.len(), labels.len());
        let sum: f64 = p.values().map(|v| v.as_f64().unwrap()).sum();
        assert!((sum - 1.0).abs() < 1e-9, "{sum}");
        correct += usize::from(g["label"] == labels[held[i].label].as_str());
    }
    assert_eq!(correct as f64 / held.len() as f64, report.accuracy);
    let missing = run(&dir.join("nope.gguf"));
    assert!(!missing.status.success());
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(
        err.contains("nope.gguf") && err.contains("does not exist"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
