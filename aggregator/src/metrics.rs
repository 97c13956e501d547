//! Metrics files and plot: one record per finished round (commit or abandon) appended to
//! `metrics.csv` and `metrics.jsonl` in the state directory; `metrics.png` plots training loss,
//! held-out accuracy and the pacing statistic per commit.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use fwdllm_shared::wire::AggregatorMetrics;

pub const CSV_FILE: &str = "metrics.csv";
pub const JSONL_FILE: &str = "metrics.jsonl";
pub const PLOT_FILE: &str = "metrics.png";

const CSV_HEADER: &str = "unix_ms,round,model_version,phase,clients_selected,clients_responded,updates,perturbations,extends,pacing_stat,pooled_variance,lr,step_norm,theta_norm,clamped,loss_mean,eval_accuracy,eval_loss,duplicates,stale,rejected,round_ms";

pub struct MetricsSink {
    dir: PathBuf,
    csv: File,
    jsonl: File,
}

fn opt(x: Option<f64>) -> String {
    x.map(|v| v.to_string()).unwrap_or_default()
}

impl MetricsSink {
    pub fn open(dir: &Path) -> std::io::Result<MetricsSink> {
        std::fs::create_dir_all(dir)?;
        let csv_path = dir.join(CSV_FILE);
        let new = !csv_path.exists();
        let mut csv = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&csv_path)?;
        if new {
            writeln!(csv, "{CSV_HEADER}")?;
        }
        let jsonl = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(JSONL_FILE))?;
        Ok(MetricsSink {
            dir: dir.to_path_buf(),
            csv,
            jsonl,
        })
    }

    pub fn record(&mut self, m: &AggregatorMetrics) -> std::io::Result<()> {
        writeln!(
            self.csv,
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            m.unix_ms,
            m.round,
            m.model_version,
            m.phase,
            m.clients_selected,
            m.clients_responded,
            m.updates,
            m.perturbations,
            m.extends,
            m.pacing_stat,
            m.pooled_variance,
            m.lr,
            m.step_norm,
            m.theta_norm,
            m.clamped,
            m.loss_mean,
            opt(m.eval_accuracy),
            opt(m.eval_loss),
            m.duplicates,
            m.stale,
            m.rejected,
            m.round_ms
        )?;
        let line = serde_json::to_string(m).map_err(std::io::Error::other)?;
        writeln!(self.jsonl, "{line}")?;
        Ok(())
    }

    /// Renders `metrics.png` from the JSONL history; logs (never fails the run) on error.
    pub fn plot(&self) {
        let records = match read_jsonl(&self.dir.join(JSONL_FILE)) {
            Ok(r) => r,
            Err(e) => {
                log::warn!("metrics plot: {e}");
                return;
            }
        };
        if let Err(e) = plot(&records, &self.dir.join(PLOT_FILE)) {
            log::warn!("metrics plot: {e}");
        }
    }
}

pub fn read_jsonl(path: &Path) -> std::io::Result<Vec<AggregatorMetrics>> {
    let f = File::open(path)?;
    let mut out = Vec::new();
    for line in BufReader::new(f).lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(serde_json::from_str(&line).map_err(std::io::Error::other)?);
    }
    Ok(out)
}

/// Loads DejaVu Sans (Debian `fonts-dejavu-core`) for plot text once; without it the plot is
/// drawn without labels.
pub(crate) fn ensure_font() -> bool {
    use std::sync::OnceLock;
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        for p in [
            "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/dejavu/DejaVuSans.ttf",
        ] {
            if let Ok(bytes) = std::fs::read(p) {
                let leaked: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font(
                    "sans-serif",
                    plotters::style::FontStyle::Normal,
                    leaked,
                )
                .is_ok()
                {
                    return true;
                }
            }
        }
        log::warn!(
            "no DejaVuSans.ttf found; plot drawn without text (apt-get install fonts-dejavu-core)"
        );
        false
    })
}

/// Plots loss, held-out accuracy and pacing z against model version.
pub fn plot(records: &[AggregatorMetrics], path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    plot_with_evals(records, &[], path)
}

/// Like [`plot`], with held-out accuracies measured outside the aggregator (the demo's
/// zero-shot and final evaluations: (model version, accuracy)) added to the accuracy panel.
pub fn plot_with_evals(
    records: &[AggregatorMetrics],
    evals: &[(u64, f64)],
    path: &Path,
) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let commits: Vec<&AggregatorMetrics> =
        records.iter().filter(|r| r.phase == "committed").collect();
    let text = ensure_font();
    let root = BitMapBackend::new(path, (1000, 900)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((3, 1));
    let max_v = commits
        .iter()
        .map(|r| r.model_version)
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    type Series<'a> = (&'a str, Vec<(f64, f64)>, RGBColor);
    let series: [Series; 3] = [
        (
            "training loss (pooled, per round)",
            commits
                .iter()
                .map(|r| (r.model_version as f64, r.loss_mean))
                .collect(),
            RED,
        ),
        (
            "held-out accuracy",
            {
                let mut pts: Vec<(f64, f64)> = commits
                    .iter()
                    .filter_map(|r| r.eval_accuracy.map(|a| (r.model_version as f64, a)))
                    .chain(evals.iter().map(|&(v, a)| (v as f64, a)))
                    .collect();
                pts.sort_by(|a, b| a.0.total_cmp(&b.0));
                pts
            },
            BLUE,
        ),
        (
            "pacing z (signal / standard error)",
            commits
                .iter()
                .map(|r| (r.model_version as f64, r.pacing_stat))
                .collect(),
            GREEN,
        ),
    ];
    for (area, (title, pts, color)) in panels.iter().zip(series) {
        let pts: Vec<(f64, f64)> = pts.into_iter().filter(|(_, y)| y.is_finite()).collect();
        let (lo, hi) = pts
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &(_, y)| {
                (lo.min(y), hi.max(y))
            });
        let (lo, hi) = if lo.is_finite() && hi > lo {
            (lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
        } else if lo.is_finite() {
            (lo - 1.0, lo + 1.0)
        } else {
            (0.0, 1.0)
        };
        let mut b = ChartBuilder::on(area);
        b.margin(10);
        if text {
            b.caption(title, ("sans-serif", 20))
                .x_label_area_size(30)
                .y_label_area_size(60);
        }
        let mut chart = b.build_cartesian_2d(0f64..max_v, lo..hi)?;
        if text {
            chart
                .configure_mesh()
                .x_desc("model version (commits)")
                .draw()?;
        }
        chart.draw_series(LineSeries::new(pts.iter().copied(), &color))?;
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 2, color.filled())))?;
    }
    root.present()?;
    Ok(())
}
