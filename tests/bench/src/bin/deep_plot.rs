//! Draws the SFT curves of `make bench-deep` (`scripts/bench-deep.sh`): held-out and dev NLL of a
//! `train-local` run against loss evaluations (left) and wall seconds (right), from the run's
//! `metrics.json` (its `evals`: every scored point, none made up).

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Parser;
use plotters::prelude::*;
use serde_json::Value;

#[derive(Parser)]
struct Args {
    /// `train-local` metrics.json of an SFT run.
    #[arg(long, default_value = "target/bench/deep/local/metrics.json")]
    metrics: PathBuf,
    #[arg(long, default_value = "target/bench/deep.png")]
    png: PathBuf,
}

/// One split's points: (loss evaluations, wall seconds, NLL).
type Curve = Vec<(f64, f64, f64)>;

fn curves(m: &Value) -> anyhow::Result<[(&'static str, Curve); 2]> {
    let evals = m["evals"]
        .as_array()
        .context("metrics.json has no `evals` array (not a train-local report?)")?;
    let pick = |heldout: bool| -> Curve {
        evals
            .iter()
            .filter(|e| {
                e["split"]
                    .as_str()
                    .is_some_and(|s| s.starts_with("heldout") == heldout)
            })
            .filter_map(|e| {
                Some((
                    e["loss_evaluations"].as_f64()?,
                    e["wall_s"].as_f64()?,
                    e["nll"].as_f64()?,
                ))
            })
            .collect()
    };
    Ok([("held-out NLL", pick(true)), ("dev NLL", pick(false))])
}

fn plot(title: &str, curves: &[(&str, Curve); 2], png: &Path) -> anyhow::Result<()> {
    let root = BitMapBackend::new(png, (1100, 460)).into_drawing_area();
    root.fill(&WHITE)?;
    let points = || curves.iter().flat_map(|(_, c)| c.iter());
    let max_e = points().map(|p| p.0).fold(1.0, f64::max);
    let max_s = points().map(|p| p.1).fold(1.0, f64::max);
    let lo = points().map(|p| p.2).fold(f64::INFINITY, f64::min) - 0.05;
    let hi = points().map(|p| p.2).fold(f64::NEG_INFINITY, f64::max) + 0.05;
    // Text needs a font; without one (no fonts-dejavu-core) the curves are drawn unlabelled.
    let text = fwdllm_aggregator::metrics::ensure_font();
    let panels = root.split_evenly((1, 2));
    for (panel, (x_desc, x_max, by_wall)) in panels.iter().zip([
        ("loss evaluations (8 examples each)", max_e, false),
        ("wall seconds", max_s, true),
    ]) {
        let mut b = ChartBuilder::on(panel);
        b.margin(12);
        if text {
            b.caption(title, ("sans-serif", 16))
                .x_label_area_size(36)
                .y_label_area_size(52);
        }
        let mut chart = b.build_cartesian_2d(0f64..x_max * 1.02, lo..hi)?;
        if text {
            chart.configure_mesh().x_desc(x_desc).y_desc("NLL").draw()?;
        }
        for (i, (name, c)) in curves.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let series: Vec<(f64, f64)> = c
                .iter()
                .map(|&(e, s, nll)| (if by_wall { s } else { e }, nll))
                .collect();
            chart
                .draw_series(LineSeries::new(series.clone(), color.stroke_width(2)))?
                .label(*name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
            chart.draw_series(series.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
        }
        if text {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .position(SeriesLabelPosition::UpperRight)
                .draw()?;
        }
    }
    root.present()?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.metrics)
        .with_context(|| format!("reading {}", args.metrics.display()))?;
    let m: Value = serde_json::from_str(&text)
        .with_context(|| format!("parsing {}", args.metrics.display()))?;
    let curves = curves(&m)?;
    let title = match m["sft_nll_rel_drop"].as_f64() {
        Some(d) => format!(
            "SFT, {}: held-out NLL −{:.2} %",
            m["task"].as_str().unwrap_or("?"),
            d * 100.0
        ),
        None => "SFT: NLL".to_string(),
    };
    plot(&title, &curves, &args.png).with_context(|| format!("drawing {}", args.png.display()))?;
    println!(
        "wrote {} ({} held-out and {} dev points)",
        args.png.display(),
        curves[0].1.len(),
        curves[1].1.len()
    );
    Ok(())
}
