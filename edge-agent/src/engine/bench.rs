//! `bench-engine`: decode throughput with and without an adapter, the cost of one
//! perturbation evaluation (adapter rebuild + decode), adapter rebuild time, RSS while
//! training vs plain inference (and the quantised model's inference RSS), RSS drift over many
//! adapter swaps, noise floor and SNR (a short calibration), and the figures of the last
//! `train-local` run (read from its metrics file; the source is recorded in the report).

use std::path::Path;
use std::time::Instant;

use fwdllm_shared::lora::{LoraLayout, LoraWeights};
use serde::Serialize;

use super::{
    calibrate, train::TrainReport, Engine, EngineConfig, EngineError, Precision, TrainConfig,
};
use crate::data::{Split, TaskConfig};

/// Flat report written to `target/bench/engine.json`.
#[derive(Debug, Clone, Serialize)]
pub struct EngineBench {
    pub model: String,
    pub train_precision: String,
    pub threads: u32,
    pub batch_prompts: usize,
    pub batch_tokens: usize,
    pub decode_tokens_per_s: f64,
    pub adapter_decode_tokens_per_s: f64,
    pub decode_ms: f64,
    pub perturbation_ms: f64,
    pub perturbation_cost_ratio: f64,
    pub adapter_rebuild_ms: f64,
    pub adapter_gguf_bytes: usize,
    pub inference_rss_mib: f64,
    pub training_peak_rss_mib: f64,
    pub rss_ratio: f64,
    pub quantized_inference_rss_mib: f64,
    pub quantized_decode_tokens_per_s: f64,
    pub rss_swaps: u32,
    pub rss_drift_pct: f64,
    pub noise_floor: f64,
    pub gradient_snr: f64,
    pub calibrated_eps: f32,
    pub bit_identical_repeat: bool,
    pub zero_shot_accuracy: Option<f64>,
    pub local_train_accuracy: Option<f64>,
    pub local_train_wall_s: Option<f64>,
    pub local_train_perturbations: Option<u64>,
    pub local_train_loss_evaluations: Option<u64>,
    pub local_train_reached_085_s: Option<f64>,
    pub local_train_source: String,
    /// The same short calibration at the other precisions (issue 3's table, reproduced):
    /// noise in ΔL at tiny ε and median SNR of g at the default ε.
    pub noise_floor_f16: f64,
    pub gradient_snr_f16: f64,
    pub noise_floor_quantized: f64,
    pub gradient_snr_quantized: f64,
    /// 1-minute load average when the benchmark started (timings assume an idle machine).
    pub load_avg_1m_at_start: f64,
    pub note: String,
}

fn load_avg_1m() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|x| x.parse().ok()))
        .unwrap_or(f64::NAN)
}

/// Noise floor and median SNR at `eps` of a short calibration at `precision`.
fn noise_and_snr(
    config: &EngineConfig,
    precision: Precision,
    task: &TaskConfig,
    batch: &[crate::data::Example],
    tc: &TrainConfig,
) -> Result<(f64, f64), EngineError> {
    let mut e = Engine::load(&EngineConfig {
        precision,
        ..config.clone()
    })?;
    e.set_task(task)?;
    let cal = calibrate::calibrate_at(&mut e, batch, &tc.lora, 3, &[tc.eps])?;
    let snr = cal.rows.first().map(|r| r.median_snr).unwrap_or(f64::NAN);
    println!(
        "{}: noise in ΔL {:.2e}, median SNR at ε = {} {snr:.3}",
        precision.as_str(),
        cal.noise_floor,
        tc.eps
    );
    Ok((cal.noise_floor, snr))
}

/// Current resident set size in MiB (Linux `/proc/self/status`; 0 elsewhere).
pub fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn time_ms<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let t = Instant::now();
    let r = f();
    (r, t.elapsed().as_secs_f64() * 1e3)
}

/// Runs the benchmark.
pub fn run(
    config: &EngineConfig,
    task: &TaskConfig,
    split: &Split,
    swaps: u32,
    train_metrics: &Path,
) -> Result<EngineBench, EngineError> {
    let batch: Vec<_> = split
        .heldout
        .iter()
        .take(config.seqs_per_decode.max(1) as usize)
        .cloned()
        .collect();
    let reps = 5;
    let load_avg_1m_at_start = load_avg_1m();

    // Quantised model: plain inference RSS and throughput (loaded first, then dropped).
    let rss0 = rss_mib();
    let (quantized_inference_rss_mib, quantized_decode_tokens_per_s) = {
        let mut q = Engine::load(&EngineConfig {
            precision: Precision::Quantized,
            ..config.clone()
        })?;
        q.set_task(task)?;
        let t = q.task().cloned().expect("task set");
        let tokens: usize = batch
            .iter()
            .map(|e| q.prompt_tokens(&t, &e.text).len())
            .sum();
        q.loss(&t, &batch)?;
        let (_, ms) = time_ms(|| (0..reps).try_for_each(|_| q.loss(&t, &batch).map(|_| ())));
        (rss_mib() - rss0, tokens as f64 * reps as f64 / (ms / 1e3))
    };
    println!("quantised: inference RSS +{quantized_inference_rss_mib:.0} MiB, {quantized_decode_tokens_per_s:.0} tok/s");

    let mut e = Engine::load(config)?;
    e.set_task(task)?;
    let t = e.task().cloned().expect("task set");
    let batch_tokens: usize = batch
        .iter()
        .map(|x| e.prompt_tokens(&t, &x.text).len())
        .sum();

    // Plain decode (no adapter).
    e.clear_adapter();
    e.loss(&t, &batch)?;
    let (r, decode_ms) = time_ms(|| (0..reps).try_for_each(|_| e.loss(&t, &batch).map(|_| ())));
    r?;
    let decode_ms = decode_ms / reps as f64;
    let inference_rss_mib = rss_mib();
    let decode_tokens_per_s = batch_tokens as f64 / (decode_ms / 1e3);
    println!("plain decode: {batch_tokens} tokens in {decode_ms:.1} ms = {decode_tokens_per_s:.0} tok/s, RSS {inference_rss_mib:.0} MiB");

    // Fixed adapter (non-zero B so that the LoRA matmuls really run).
    let tc = TrainConfig::default();
    let layout = LoraLayout::new(&e.model_shape(), &tc.lora)?;
    let mut w = LoraWeights::init(layout.clone());
    fwdllm_shared::update::add_direction(&mut w, 7, 1e-3);
    e.set_adapter(&w)?;
    e.loss(&t, &batch)?;
    let (r, adapter_ms) = time_ms(|| (0..reps).try_for_each(|_| e.loss(&t, &batch).map(|_| ())));
    r?;
    let adapter_ms = adapter_ms / reps as f64;
    let adapter_decode_tokens_per_s = batch_tokens as f64 / (adapter_ms / 1e3);
    println!("adapter decode: {adapter_ms:.1} ms = {adapter_decode_tokens_per_s:.0} tok/s");

    // Adapter rebuild: perturbed params -> GGUF bytes -> llama.cpp adapter -> set on context.
    let mut scratch = Vec::new();
    let n_rebuild = 200u64;
    let mut gguf_len = 0;
    let (r, rebuild_ms) = time_ms(|| -> Result<(), EngineError> {
        for s in 0..n_rebuild {
            fwdllm_shared::update::perturbed_params(&w, 1000 + s, 1e-2, &mut scratch);
            let p = LoraWeights::from_params(layout.clone(), scratch.clone())?;
            let bytes = fwdllm_shared::gguf::write_lora_adapter(&p);
            gguf_len = bytes.len();
            e.set_adapter_bytes(&bytes)?;
        }
        Ok(())
    });
    r?;
    let adapter_rebuild_ms = rebuild_ms / n_rebuild as f64;
    println!("adapter rebuild: {adapter_rebuild_ms:.3} ms ({gguf_len} bytes GGUF)");

    // One perturbation evaluation = rebuild + decode (what forward_gradients does per seed).
    let (r, pert_ms) = time_ms(|| -> Result<(), EngineError> {
        for s in 0..reps as u64 {
            fwdllm_shared::update::perturbed_params(&w, 5000 + s, 1e-2, &mut scratch);
            let p = LoraWeights::from_params(layout.clone(), scratch.clone())?;
            e.set_adapter(&p)?;
            e.loss(&t, &batch)?;
        }
        Ok(())
    });
    r?;
    let perturbation_ms = pert_ms / reps as f64;
    let perturbation_cost_ratio = perturbation_ms / adapter_ms;
    println!("perturbation evaluation: {perturbation_ms:.1} ms = {perturbation_cost_ratio:.4}x a fixed-adapter decode");

    // Training-phase peak RSS: a few forward-gradient steps.
    let mut peak = rss_mib();
    for step in 0..3u64 {
        let seeds: Vec<u64> = (0..tc.directions as u64).map(|k| step * 100 + k).collect();
        e.forward_gradients(&w, &batch, &seeds, tc.eps, tc.one_sided)?;
        peak = peak.max(rss_mib());
    }
    let training_peak_rss_mib = peak;
    let rss_ratio = training_peak_rss_mib / inference_rss_mib;
    println!("training peak RSS {training_peak_rss_mib:.0} MiB = {rss_ratio:.4}x inference");

    // RSS drift over many swaps (after a warm-up so allocator pools are populated).
    for s in 0..200u64 {
        fwdllm_shared::update::perturbed_params(&w, 9_000_000 + s, 1e-2, &mut scratch);
        let p = LoraWeights::from_params(layout.clone(), scratch.clone())?;
        e.set_adapter(&p)?;
    }
    let r0 = rss_mib();
    let t0 = Instant::now();
    for s in 0..swaps as u64 {
        fwdllm_shared::update::perturbed_params(&w, 10_000_000 + s, 1e-2, &mut scratch);
        let p = LoraWeights::from_params(layout.clone(), scratch.clone())?;
        e.set_adapter(&p)?;
    }
    let r1 = rss_mib();
    let rss_drift_pct = (r1 - r0) / r0 * 100.0;
    println!(
        "RSS over {swaps} swaps: {r0:.1} -> {r1:.1} MiB ({rss_drift_pct:+.3}%), {:.1} s",
        t0.elapsed().as_secs_f64()
    );

    // Noise floor and SNR at the default ε (short calibration).
    let cal = calibrate::calibrate_at(&mut e, &batch, &tc.lora, 3, &[tc.eps, tc.eps / 10.0])?;
    calibrate::print_table(&cal);
    let snr_default = cal
        .rows
        .iter()
        .find(|r| r.eps == tc.eps)
        .map(|r| r.median_snr)
        .unwrap_or(cal.chosen_snr);

    drop(e);
    let (noise_floor_f16, gradient_snr_f16) =
        noise_and_snr(config, Precision::F16, task, &batch, &tc)?;
    let (noise_floor_quantized, gradient_snr_quantized) =
        noise_and_snr(config, Precision::Quantized, task, &batch, &tc)?;

    let (train, source): (Option<TrainReport>, String) = match std::fs::read(train_metrics) {
        Ok(b) => match serde_json::from_slice(&b) {
            Ok(r) => (
                Some(r),
                format!("train-local metrics {}", train_metrics.display()),
            ),
            Err(err) => (
                None,
                format!("{} unreadable: {err}", train_metrics.display()),
            ),
        },
        Err(_) => (
            None,
            format!(
                "{} missing: run `fwdllm-agent train-local` first",
                train_metrics.display()
            ),
        ),
    };
    Ok(EngineBench {
        model: config.model.display().to_string(),
        train_precision: config.precision.as_str().into(),
        threads: config.effective_threads(),
        batch_prompts: batch.len(),
        batch_tokens,
        decode_tokens_per_s,
        adapter_decode_tokens_per_s,
        decode_ms,
        perturbation_ms,
        perturbation_cost_ratio,
        adapter_rebuild_ms,
        adapter_gguf_bytes: gguf_len,
        inference_rss_mib,
        training_peak_rss_mib,
        rss_ratio,
        quantized_inference_rss_mib,
        quantized_decode_tokens_per_s,
        rss_swaps: swaps,
        rss_drift_pct,
        noise_floor: cal.noise_floor,
        gradient_snr: snr_default,
        calibrated_eps: cal.chosen_eps,
        bit_identical_repeat: cal.bit_identical_repeat,
        zero_shot_accuracy: train.as_ref().map(|r| r.zero_shot.accuracy),
        local_train_accuracy: train.as_ref().map(|r| r.final_heldout.accuracy),
        local_train_wall_s: train.as_ref().map(|r| r.wall_s),
        local_train_perturbations: train.as_ref().map(|r| r.perturbations),
        local_train_loss_evaluations: train.as_ref().map(|r| r.loss_evaluations),
        local_train_reached_085_s: train.as_ref().and_then(|r| r.reached_085_s),
        local_train_source: source,
        noise_floor_f16,
        gradient_snr_f16,
        noise_floor_quantized,
        gradient_snr_quantized,
        load_avg_1m_at_start,
        note: "gradient_snr = median over directions of |g| / (noise_floor / 2ε) at the default ε; rss_ratio = training peak RSS / plain-inference RSS of the same process and context".into(),
    })
}
