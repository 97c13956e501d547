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

/// Flat report written to `target/bench/engine.json`. Timings and noise figures without a
/// `full_` prefix are of the path the config selects (the tail path by default); `full_*` are
/// the same measurements through the whole F32 model.
#[derive(Debug, Clone, Serialize)]
pub struct EngineBench {
    pub model: String,
    pub train_precision: String,
    /// The path measured: "tail from layer N (prefix …)" or "full …".
    pub forward_path: String,
    pub threads: u32,
    pub batch_prompts: usize,
    pub batch_tokens: usize,
    pub decode_tokens_per_s: f64,
    pub adapter_decode_tokens_per_s: f64,
    pub decode_ms: f64,
    /// One perturbation's loss evaluation (adapter rebuild + evaluation) on the measured path,
    /// prefix hidden states cached.
    pub perturbation_ms: f64,
    /// The same on the whole F32 model.
    pub full_perturbation_ms: f64,
    /// perturbation_ms / full_perturbation_ms.
    pub tail_perturbation_cost_ratio: f64,
    /// The frozen prefix for the batch, once (tail path); amortised over `2 × directions`
    /// evaluations of a central-difference step in `prefix_ms_per_evaluation`.
    pub prefix_ms: Option<f64>,
    pub prefix_ms_per_evaluation: Option<f64>,
    pub adapter_rebuild_ms: f64,
    pub adapter_gguf_bytes: usize,
    /// Peak RSS (VmHWM) of a fresh process evaluating the batch on the shipped Q4_1 file.
    pub quantized_inference_rss_mib: f64,
    /// Peak RSS of a fresh process training (forward gradients, then `rss_swaps` adapter
    /// swaps) on the measured path, and on the whole F32 model; same context size.
    pub training_peak_rss_mib: f64,
    pub full_training_peak_rss_mib: f64,
    /// training_peak_rss_mib / quantized_inference_rss_mib (and the same for the full path).
    pub tail_rss_ratio: f64,
    pub full_rss_ratio: f64,
    pub quantized_decode_tokens_per_s: f64,
    pub rss_swaps: u32,
    /// RSS change over the `rss_swaps` swaps of the training process (after a warm-up).
    pub rss_drift_pct: f64,
    pub noise_floor: f64,
    pub gradient_snr: f64,
    pub calibrated_eps: f32,
    pub bit_identical_repeat: bool,
    /// |L_tail − L_full| / L_full on the same batch and θ (non-zero adapter), with the prefix
    /// at f32 (the two paths compute the same function) and at the configured prefix precision.
    pub tail_full_loss_rel_diff: Option<f64>,
    pub tail_full_loss_rel_diff_configured_prefix: Option<f64>,
    pub full_noise_floor: f64,
    pub full_gradient_snr: f64,
    pub zero_shot_accuracy: Option<f64>,
    pub local_train_accuracy: Option<f64>,
    pub local_train_wall_s: Option<f64>,
    pub local_train_perturbations: Option<u64>,
    pub local_train_loss_evaluations: Option<u64>,
    pub local_train_reached_085_s: Option<f64>,
    /// Training time (evaluations excluded) at which held-out accuracy first reached 0.85.
    pub local_train_reached_085_train_s: Option<f64>,
    pub local_train_source: String,
    /// The same short calibration at the other precisions (issue 3's table, reproduced):
    /// noise in ΔL at tiny ε and median SNR of g at the default ε, full path.
    pub noise_floor_f16: f64,
    pub gradient_snr_f16: f64,
    pub noise_floor_quantized: f64,
    pub gradient_snr_quantized: f64,
    /// 1-minute load average when the benchmark started (timings assume an idle machine).
    pub load_avg_1m_at_start: f64,
    pub note: String,
}

/// What an RSS probe process measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RssProbe {
    /// Plain inference of the batch on the quantised file (the baseline).
    Quantized,
    /// Forward gradients and adapter swaps on the configured path.
    Training,
    /// Forward gradients and adapter swaps on the whole F32 model.
    FullTraining,
}

/// Result of one RSS probe (printed by the child as one `rss-probe {json}` line).
#[derive(Debug, Clone, Copy, Serialize, serde::Deserialize)]
pub struct ProbeResult {
    pub peak_rss_mib: f64,
    pub drift_pct: f64,
}

/// Peak resident set size of this process in MiB (`VmHWM`; 0 where unavailable).
pub fn peak_rss_mib() -> f64 {
    proc_status_kib("VmHWM:") / 1024.0
}

fn proc_status_kib(key: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .unwrap_or(0.0)
}

/// Runs one probe in this (fresh) process.
pub fn run_probe(
    probe: RssProbe,
    config: &EngineConfig,
    task: &TaskConfig,
    split: &Split,
    swaps: u32,
) -> Result<ProbeResult, EngineError> {
    let batch = bench_batch(config, split);
    let tc = TrainConfig::default();
    let config = &EngineConfig {
        prefix_cache_disk: false,
        ..config.clone()
    };
    let cfg = match probe {
        RssProbe::Quantized => EngineConfig {
            precision: Precision::Quantized,
            ..config.clone()
        },
        RssProbe::Training => config.clone(),
        RssProbe::FullTraining => EngineConfig {
            forward_path: super::ForwardPath::Full,
            ..config.clone()
        },
    };
    let mut e = Engine::load(&cfg)?;
    e.set_task(task)?;
    let t = e.task().cloned().expect("task set");
    if probe == RssProbe::Quantized {
        for _ in 0..3 {
            e.loss(&t, &batch)?;
        }
        return Ok(ProbeResult {
            peak_rss_mib: peak_rss_mib(),
            drift_pct: 0.0,
        });
    }
    let layout = LoraLayout::new(&e.model_shape(), &tc.lora)?;
    let mut w = LoraWeights::init(layout.clone());
    fwdllm_shared::update::add_direction(&mut w, 7, 1e-3);
    for step in 0..3u64 {
        let seeds: Vec<u64> = (0..tc.directions as u64).map(|k| step * 100 + k).collect();
        e.forward_gradients(&w, &batch, &seeds, tc.eps, false)?;
    }
    let mut scratch = Vec::new();
    for s in 0..200u64 {
        fwdllm_shared::update::perturbed_params(&w, 9_000_000 + s, 1e-2, &mut scratch);
        e.set_adapter(&LoraWeights::from_params(layout.clone(), scratch.clone())?)?;
    }
    let r0 = rss_mib();
    for s in 0..swaps as u64 {
        fwdllm_shared::update::perturbed_params(&w, 10_000_000 + s, 1e-2, &mut scratch);
        e.set_adapter(&LoraWeights::from_params(layout.clone(), scratch.clone())?)?;
    }
    e.loss(&t, &batch)?;
    let r1 = rss_mib();
    Ok(ProbeResult {
        peak_rss_mib: peak_rss_mib(),
        drift_pct: (r1 - r0) / r0 * 100.0,
    })
}

/// Runs `probe` in a child process (this executable with `probe_args` plus `--rss-probe`),
/// so that each peak RSS is that of a process which did only that.
fn probe_in_child(probe_args: &[String], probe: RssProbe) -> Result<ProbeResult, EngineError> {
    let exe = std::env::current_exe().map_err(|e| EngineError::io(Path::new("current_exe"), e))?;
    let name = match probe {
        RssProbe::Quantized => "quantized",
        RssProbe::Training => "training",
        RssProbe::FullTraining => "full-training",
    };
    let out = std::process::Command::new(&exe)
        .args(probe_args)
        .args(["--rss-probe", name])
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| EngineError::io(&exe, e))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("rss-probe "))
        .ok_or_else(|| {
            EngineError::Llama(format!(
                "RSS probe {name} printed no result (exit {:?}): {text}",
                out.status.code()
            ))
        })?;
    serde_json::from_str(line)
        .map_err(|e| EngineError::Llama(format!("RSS probe {name}: {e}: {line}")))
}

fn bench_batch(config: &EngineConfig, split: &Split) -> Vec<crate::data::Example> {
    split
        .heldout
        .iter()
        .take(config.seqs_per_decode.max(1) as usize)
        .cloned()
        .collect()
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

/// Mean time of one perturbation evaluation (perturbed adapter set + loss) over `reps`.
fn perturbation_ms(
    e: &mut Engine,
    t: &super::Task,
    batch: &[crate::data::Example],
    w: &LoraWeights,
    reps: usize,
) -> Result<f64, EngineError> {
    let mut scratch = Vec::new();
    let layout = w.layout().clone();
    let (r, ms) = time_ms(|| -> Result<(), EngineError> {
        for s in 0..reps as u64 {
            fwdllm_shared::update::perturbed_params(w, 5000 + s, 1e-2, &mut scratch);
            let p = LoraWeights::from_params(layout.clone(), scratch.clone())?;
            e.set_adapter(&p)?;
            e.loss(t, batch)?;
        }
        Ok(())
    });
    r?;
    Ok(ms / reps as f64)
}

fn time_ms<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let t = Instant::now();
    let r = f();
    (r, t.elapsed().as_secs_f64() * 1e3)
}

/// Runs the benchmark. `probe_args` re-invoke this benchmark's command line for the RSS
/// probes (see `probe_in_child`).
pub fn run(
    config: &EngineConfig,
    task: &TaskConfig,
    split: &Split,
    swaps: u32,
    train_metrics: &Path,
    probe_args: &[String],
) -> Result<EngineBench, EngineError> {
    // Timings of a cold prefix need the on-disk prefix states out of the way.
    let config = &EngineConfig {
        prefix_cache_disk: false,
        ..config.clone()
    };
    let batch = bench_batch(config, split);
    let reps = 5;
    let load_avg_1m_at_start = load_avg_1m();
    let tc = TrainConfig::default();

    // Peak RSS, each in a fresh process.
    let q_probe = probe_in_child(probe_args, RssProbe::Quantized)?;
    let t_probe = probe_in_child(probe_args, RssProbe::Training)?;
    let f_probe = probe_in_child(probe_args, RssProbe::FullTraining)?;
    println!(
        "peak RSS: quantised inference {:.0} MiB, training on the configured path {:.0} MiB ({:+.3}% over {swaps} swaps), on the full F32 model {:.0} MiB",
        q_probe.peak_rss_mib, t_probe.peak_rss_mib, t_probe.drift_pct, f_probe.peak_rss_mib
    );

    // Quantised model: plain inference throughput.
    let quantized_decode_tokens_per_s = {
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
        tokens as f64 * reps as f64 / (ms / 1e3)
    };
    println!("quantised: {quantized_decode_tokens_per_s:.0} tok/s");

    let mut e = Engine::load(config)?;
    e.set_task(task)?;
    let forward_path = e.describe_path();
    println!("measured path: {forward_path}");
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
    let decode_tokens_per_s = batch_tokens as f64 / (decode_ms / 1e3);
    println!(
        "plain decode: {batch_tokens} tokens in {decode_ms:.1} ms = {decode_tokens_per_s:.0} tok/s"
    );

    // Fixed adapter (non-zero B so that the LoRA matmuls really run).
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

    // The prefix alone: a cold evaluation minus a warm one.
    let prefix_ms = if e.tail_layer().is_some() {
        let mut cold = 0.0;
        for _ in 0..reps {
            e.clear_prefix_cache();
            cold += time_ms(|| e.loss(&t, &batch)).1;
        }
        let p = (cold / reps as f64 - adapter_ms).max(0.0);
        println!("prefix (once per batch): {p:.1} ms");
        Some(p)
    } else {
        None
    };
    e.loss(&t, &batch)?; // warm the cache again

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

    // One perturbation evaluation = rebuild + evaluation (what forward_gradients does per seed).
    let pert_ms = perturbation_ms(&mut e, &t, &batch, &w, reps)?;
    println!("perturbation evaluation: {pert_ms:.1} ms");

    // Noise floor and SNR at the default ε (short calibration) on the measured path.
    let cal = calibrate::calibrate_at(&mut e, &batch, &tc.lora, 3, &[tc.eps, tc.eps / 10.0])?;
    calibrate::print_table(&cal);
    let snr_default = cal
        .rows
        .iter()
        .find(|r| r.eps == tc.eps)
        .map(|r| r.median_snr)
        .unwrap_or(cal.chosen_snr);
    e.set_adapter(&w)?;
    let l_configured = e.loss(&t, &batch)?.mean;
    drop(e);

    // The whole F32 model: the same perturbation cost and calibration, and the loss the tail
    // must reproduce.
    let full_cfg = EngineConfig {
        forward_path: super::ForwardPath::Full,
        ..config.clone()
    };
    let mut f = Engine::load(&full_cfg)?;
    f.set_task(task)?;
    f.set_adapter(&w)?;
    let l_full = f.loss(&t, &batch)?.mean;
    let full_perturbation_ms = perturbation_ms(&mut f, &t, &batch, &w, reps)?;
    let full_cal = calibrate::calibrate_at(&mut f, &batch, &tc.lora, 3, &[tc.eps])?;
    drop(f);
    let tail_perturbation_cost_ratio = pert_ms / full_perturbation_ms;
    println!("full F32 perturbation evaluation: {full_perturbation_ms:.1} ms; ratio {tail_perturbation_cost_ratio:.4}");

    let (tail_full_loss_rel_diff, tail_full_loss_rel_diff_configured_prefix) = if config
        .tail_capable()
        && config.tail_layer.is_some_and(|l| l > 0)
    {
        let mut exact = Engine::load(&EngineConfig {
            prefix_precision: Precision::F32,
            ..config.clone()
        })?;
        exact.set_task(task)?;
        exact.set_adapter(&w)?;
        let l_exact = exact.loss(&t, &batch)?.mean;
        let a = ((l_exact - l_full) / l_full).abs();
        let b = ((l_configured - l_full) / l_full).abs();
        println!(
                "loss: full {l_full:.9}, tail (f32 prefix) {l_exact:.9} (rel diff {a:.3e}), tail (configured prefix) {l_configured:.9} (rel diff {b:.3e})"
            );
        (Some(a), Some(b))
    } else {
        (None, None)
    };

    let (noise_floor_f16, gradient_snr_f16) =
        noise_and_snr(&full_cfg, Precision::F16, task, &batch, &tc)?;
    let (noise_floor_quantized, gradient_snr_quantized) =
        noise_and_snr(&full_cfg, Precision::Quantized, task, &batch, &tc)?;

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
        forward_path,
        threads: config.effective_threads(),
        batch_prompts: batch.len(),
        batch_tokens,
        decode_tokens_per_s,
        adapter_decode_tokens_per_s,
        decode_ms,
        perturbation_ms: pert_ms,
        full_perturbation_ms,
        tail_perturbation_cost_ratio,
        prefix_ms,
        prefix_ms_per_evaluation: prefix_ms.map(|p| p / (2 * tc.directions.max(1)) as f64),
        adapter_rebuild_ms,
        adapter_gguf_bytes: gguf_len,
        quantized_inference_rss_mib: q_probe.peak_rss_mib,
        training_peak_rss_mib: t_probe.peak_rss_mib,
        full_training_peak_rss_mib: f_probe.peak_rss_mib,
        tail_rss_ratio: t_probe.peak_rss_mib / q_probe.peak_rss_mib,
        full_rss_ratio: f_probe.peak_rss_mib / q_probe.peak_rss_mib,
        quantized_decode_tokens_per_s,
        rss_swaps: swaps,
        rss_drift_pct: t_probe.drift_pct,
        noise_floor: cal.noise_floor,
        gradient_snr: snr_default,
        calibrated_eps: cal.chosen_eps,
        bit_identical_repeat: cal.bit_identical_repeat,
        tail_full_loss_rel_diff,
        tail_full_loss_rel_diff_configured_prefix,
        full_noise_floor: full_cal.noise_floor,
        full_gradient_snr: full_cal.rows.first().map(|r| r.median_snr).unwrap_or(f64::NAN),
        zero_shot_accuracy: train.as_ref().map(|r| r.zero_shot.accuracy),
        local_train_accuracy: train.as_ref().map(|r| r.final_heldout.accuracy),
        local_train_wall_s: train.as_ref().map(|r| r.wall_s),
        local_train_perturbations: train.as_ref().map(|r| r.perturbations),
        local_train_loss_evaluations: train.as_ref().map(|r| r.loss_evaluations),
        local_train_reached_085_s: train.as_ref().and_then(|r| r.reached_085_s),
        local_train_reached_085_train_s: train.as_ref().and_then(|r| r.reached_085_train_s),
        local_train_source: source,
        noise_floor_f16,
        gradient_snr_f16,
        noise_floor_quantized,
        gradient_snr_quantized,
        load_avg_1m_at_start,
        note: "gradient_snr = median over directions of |g| / (noise_floor / 2ε) at the default ε on the measured path; peak RSS figures are VmHWM of separate processes with the same context; tail_perturbation_cost_ratio = perturbation_ms / full_perturbation_ms (prefix cached; prefix_ms reported apart)".into(),
    })
}
