//! ε calibration: the noise in ΔL = L(θ+εv) − L(θ−εv) at a tiny ε (where the true ΔL is far
//! below float jitter), central g across ε = 1e-1 … 1e-5, the resulting SNR per ε, and the
//! chosen ε (largest SNR among the ε whose g still agrees with g at ε/10 within 2%, i.e.
//! outside the curvature regime).

use fwdllm_shared::lora::{LoraConfig, LoraLayout, LoraWeights};
use serde::{Deserialize, Serialize};

use super::{Engine, EngineError};
use crate::data::Example;

/// ε used to measure the noise floor of ΔL.
pub const NOISE_EPS: f32 = 1e-7;
/// The ε sweep.
pub const EPS_SWEEP: [f32; 5] = [1e-1, 1e-2, 1e-3, 1e-4, 1e-5];

/// One ε of the sweep.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpsRow {
    pub eps: f32,
    /// Central g per direction.
    pub g: Vec<f64>,
    /// Median over directions of |g| / (noise / 2ε).
    pub median_snr: f64,
    /// ‖g(ε) − g(ε/10)‖ / ‖g(ε/10)‖ over the directions (None for the smallest ε).
    pub rel_change_to_next: Option<f64>,
}

/// Calibration table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Calibration {
    pub precision: String,
    pub threads: u32,
    pub directions: u32,
    pub batch: usize,
    pub trainable: usize,
    /// RMS over directions of ΔL at ε = NOISE_EPS.
    pub noise_floor: f64,
    pub rows: Vec<EpsRow>,
    pub chosen_eps: f32,
    pub chosen_snr: f64,
    /// Whether repeating L(θ) gave identical bits.
    pub bit_identical_repeat: bool,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Runs the calibration on `batch` (the engine's active task) at the initial weights of
/// `lora`, with `directions` seeds 1..=directions.
pub fn calibrate(
    engine: &mut Engine,
    batch: &[Example],
    lora: &LoraConfig,
    directions: u32,
) -> Result<Calibration, EngineError> {
    calibrate_at(engine, batch, lora, directions, &EPS_SWEEP)
}

/// [`calibrate`] over a chosen list of ε (the bench uses only the default ε and ε/10).
pub fn calibrate_at(
    engine: &mut Engine,
    batch: &[Example],
    lora: &LoraConfig,
    directions: u32,
    sweep: &[f32],
) -> Result<Calibration, EngineError> {
    let layout = LoraLayout::new(&engine.model_shape(), lora)?;
    let weights = LoraWeights::init(layout.clone());
    let task = engine.task().cloned().ok_or(EngineError::NoTask)?;
    engine.set_adapter(&weights)?;
    let a = engine.loss(&task, batch)?.mean;
    engine.clear_adapter();
    engine.set_adapter(&weights)?;
    let b = engine.loss(&task, batch)?.mean;
    let bit_identical_repeat = a.to_bits() == b.to_bits();

    let seeds: Vec<u64> = (1..=directions as u64).collect();
    let delta = |engine: &mut Engine, eps: f32| -> Result<Vec<f64>, EngineError> {
        let g = engine.forward_gradients(&weights, batch, &seeds, eps, false)?;
        Ok(g.iter().map(|&g| g as f64 * 2.0 * eps as f64).collect())
    };
    let noise_d = delta(engine, NOISE_EPS)?;
    let noise_floor =
        (noise_d.iter().map(|d| d * d).sum::<f64>() / noise_d.len().max(1) as f64).sqrt();
    let mut rows: Vec<EpsRow> = Vec::new();
    for &eps in sweep {
        let d = delta(engine, eps)?;
        let g: Vec<f64> = d.iter().map(|d| d / (2.0 * eps as f64)).collect();
        let noise_g = noise_floor.max(f64::MIN_POSITIVE) / (2.0 * eps as f64);
        let median_snr = median(g.iter().map(|g| g.abs() / noise_g).collect());
        rows.push(EpsRow {
            eps,
            g,
            median_snr,
            rel_change_to_next: None,
        });
    }
    for i in 0..rows.len().saturating_sub(1) {
        let (cur, next) = (&rows[i].g, &rows[i + 1].g);
        // Relative change of the whole g vector (a near-zero component alone says nothing).
        let diff = cur
            .iter()
            .zip(next)
            .map(|(a, b)| (a - b) * (a - b))
            .sum::<f64>()
            .sqrt();
        let base = next.iter().map(|b| b * b).sum::<f64>().sqrt().max(1e-12);
        let rel = diff / base;
        rows[i].rel_change_to_next = Some(rel);
    }
    let (chosen_eps, chosen_snr) = rows
        .iter()
        .filter(|r| r.rel_change_to_next.is_some_and(|x| x < 0.02))
        .map(|r| (r.eps, r.median_snr))
        .fold(None, |best: Option<(f32, f64)>, x| match best {
            Some(b) if b.1 >= x.1 => Some(b),
            _ => Some(x),
        })
        .unwrap_or_else(|| {
            rows.first()
                .map(|r| (r.eps, r.median_snr))
                .unwrap_or((f32::NAN, f64::NAN))
        });
    Ok(Calibration {
        precision: engine.config().precision.as_str().into(),
        threads: engine.config().effective_threads(),
        directions,
        batch: batch.len(),
        trainable: layout.trainable_len(),
        noise_floor,
        rows,
        chosen_eps,
        chosen_snr,
        bit_identical_repeat,
    })
}

/// Prints the calibration as a table.
pub fn print_table(c: &Calibration) {
    println!(
        "precision {} threads {} batch {} directions {} trainable {}",
        c.precision, c.threads, c.batch, c.directions, c.trainable
    );
    println!(
        "noise in ΔL at ε={NOISE_EPS:e}: {:.3e}   repeat bit-identical: {}",
        c.noise_floor, c.bit_identical_repeat
    );
    println!(
        "{:>8} {:>12} {:>12} {:>10}  g per direction",
        "eps", "median SNR", "rel Δ(ε/10)", ""
    );
    for r in &c.rows {
        let g: Vec<String> = r.g.iter().map(|g| format!("{g:+.5}")).collect();
        println!(
            "{:>8.0e} {:>12.3e} {:>12} {:>10}  {}",
            r.eps,
            r.median_snr,
            r.rel_change_to_next
                .map(|x| format!("{x:.2e}"))
                .unwrap_or_else(|| "-".into()),
            "",
            g.join(" ")
        );
    }
    println!(
        "chosen ε = {:e} (median SNR {:.3e})",
        c.chosen_eps, c.chosen_snr
    );
}

/// Candidate zero-shot prompts for `prompt-search`.
pub fn default_prompts() -> Vec<String> {
    vec![
        "Article: {text}\nTopic:".into(),
        "{text}\nTopic:".into(),
        "{text}\n\nThis news article is about".into(),
        "News: {text}\nCategory:".into(),
        "Text: {text}\nQuestion: Is this article about business, entertainment, politics, sports or technology?\nAnswer:".into(),
        "Classify the topic (business, entertainment, politics, sports, technology).\nArticle: {text}\nTopic:".into(),
    ]
}
