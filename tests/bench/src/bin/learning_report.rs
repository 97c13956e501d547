//! Gathers the learning bench's runs (`scripts/bench-learning.sh`) into
//! `target/bench/learning.json` and draws the non-IID curves: held-out accuracy over commits,
//! mean over seeds, for IID and each Dirichlet α.
//!
//! Inputs are the reports the runs wrote: `train-local` metrics.json files and
//! `fwdllm bench-federation` JSON files named `<split>-seed<N>.json` in one directory. Every
//! figure comes from those files; a figure whose run is missing is absent from the report
//! and named under `missing` with the reason.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Parser;
use plotters::prelude::*;
use serde_json::{json, Map, Value};

#[derive(Parser)]
struct Args {
    /// `train-local` metrics.json of the BBC run.
    #[arg(long)]
    bbc_local: PathBuf,
    /// `train-local` metrics.json of the AG News run.
    #[arg(long)]
    ag_news_local: PathBuf,
    /// Directory of `bench-federation` reports named `<split>-seed<N>.json`.
    #[arg(long)]
    fed_dir: PathBuf,
    /// `bench-federation` report of the demo configuration (BBC, 4 agents, 10 minutes).
    #[arg(long)]
    demo: PathBuf,
    /// `bench-federation` report of the federated SFT (headline) run, if one was made.
    #[arg(long)]
    sft: Option<PathBuf>,
    #[arg(long, default_value = "target/bench/learning.json")]
    out: PathBuf,
    #[arg(long, default_value = "target/bench/learning_noniid.png")]
    png: PathBuf,
}

fn read(path: &Path) -> anyhow::Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

fn num(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

fn mean_sd(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = if xs.len() > 1 {
        xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

/// One federation run: its exported (dev-selected) held-out accuracy and its curve.
struct FedRun {
    selected: f64,
    last: f64,
    curve: Vec<(u64, f64)>,
}

fn fed_runs(dir: &Path) -> anyhow::Result<BTreeMap<String, Vec<FedRun>>> {
    let mut by_split: BTreeMap<String, Vec<FedRun>> = BTreeMap::new();
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    entries.sort();
    for path in entries {
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default();
        let Some((split, _seed)) = stem.rsplit_once("-seed") else {
            continue;
        };
        let v = read(&path)?;
        let selected = num(&v, "selected_accuracy")
            .with_context(|| format!("{}: no selected_accuracy", path.display()))?;
        let last = num(&v, "final_accuracy")
            .with_context(|| format!("{}: no final_accuracy", path.display()))?;
        let versions = v["curve_versions"].as_array().cloned().unwrap_or_default();
        let accs = v["curve_heldout_accuracy"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let curve = versions
            .iter()
            .zip(&accs)
            .filter_map(|(a, b)| Some((a.as_u64()?, b.as_f64()?)))
            .collect();
        by_split.entry(split.to_string()).or_default().push(FedRun {
            selected,
            last,
            curve,
        });
    }
    Ok(by_split)
}

/// Mean curve over runs, point by point (the k-th snapshot of each run: snapshots are taken at
/// the first version past each multiple of `--curve-every`, so versions differ by a few commits
/// between runs), up to the shortest run; the version is the points' mean.
fn mean_curve(runs: &[FedRun]) -> Vec<(u64, f64)> {
    let len = runs.iter().map(|r| r.curve.len()).min().unwrap_or(0);
    (0..len)
        .map(|k| {
            let v: Vec<f64> = runs.iter().map(|r| r.curve[k].0 as f64).collect();
            let a: Vec<f64> = runs.iter().map(|r| r.curve[k].1).collect();
            (mean_sd(&v).0.round() as u64, mean_sd(&a).0)
        })
        .collect()
}

fn plot(curves: &BTreeMap<String, Vec<(u64, f64)>>, png: &Path) -> anyhow::Result<()> {
    let root = BitMapBackend::new(png, (900, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let max_v = curves
        .values()
        .flat_map(|c| c.iter().map(|p| p.0))
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    // Text needs a font; without one (no fonts-dejavu-core) the curves are drawn unlabelled.
    let text = fwdllm_aggregator::metrics::ensure_font();
    let mut b = ChartBuilder::on(&root);
    b.margin(12);
    if text {
        b.caption(
            "AG News, 8 agents: held-out accuracy over commits (mean of seeds)",
            ("sans-serif", 20),
        )
        .x_label_area_size(36)
        .y_label_area_size(52);
    }
    let mut chart = b.build_cartesian_2d(0f64..max_v, 0.3f64..1.0f64)?;
    if text {
        chart
            .configure_mesh()
            .x_desc("model version (commits)")
            .y_desc("held-out accuracy")
            .draw()?;
    }
    for (i, (name, pts)) in curves.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let series: Vec<(f64, f64)> = pts.iter().map(|&(v, a)| (v as f64, a)).collect();
        chart
            .draw_series(LineSeries::new(series.clone(), color.stroke_width(2)))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
        chart.draw_series(series.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
    }
    if !text {
        root.present()?;
        return Ok(());
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()?;
    root.present()?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut out = Map::new();
    let mut missing = Map::new();
    for (key, path) in [
        ("bbc_local_heldout_acc", &args.bbc_local),
        ("ag_news_local_heldout_acc", &args.ag_news_local),
    ] {
        match read(path) {
            Ok(m) => {
                // final_heldout: the adapter kept on dev accuracy, scored once on held-out.
                if let Some(acc) = m["final_heldout"]["accuracy"].as_f64() {
                    out.insert(key.into(), json!(acc));
                }
                let prefix = key.trim_end_matches("_heldout_acc");
                out.insert(
                    format!("{prefix}_zero_shot"),
                    m["zero_shot"]["accuracy"].clone(),
                );
                out.insert(format!("{prefix}_steps"), m["steps"].clone());
                out.insert(format!("{prefix}_wall_s"), m["wall_s"].clone());
                out.insert(
                    format!("{prefix}_loss_evaluations"),
                    m["loss_evaluations"].clone(),
                );
                out.insert(format!("{prefix}_config"), m["config"].clone());
            }
            Err(e) => {
                missing.insert(key.into(), json!(format!("{e:#}")));
            }
        }
    }
    let runs = fed_runs(&args.fed_dir)?;
    let mut curves = BTreeMap::new();
    let mut fed = Map::new();
    for (split, rs) in &runs {
        let accs: Vec<f64> = rs.iter().map(|r| r.selected).collect();
        let lasts: Vec<f64> = rs.iter().map(|r| r.last).collect();
        let (m, sd) = mean_sd(&accs);
        // One seed has no spread to report.
        let sd = (rs.len() > 1).then_some(sd);
        fed.insert(
            split.clone(),
            json!({
                "seeds": rs.len(),
                "heldout_acc_mean": m,
                "heldout_acc_sd": sd,
                "heldout_acc": accs,
                "last_version_heldout_acc_mean": mean_sd(&lasts).0,
                "last_version_heldout_acc": lasts,
            }),
        );
        curves.insert(split.clone(), mean_curve(rs));
    }
    // Mean over a split's seeds of the exported (selected) or the last version's accuracy.
    let mean_of = |s: &str, pick: fn(&FedRun) -> f64| {
        runs.get(s)
            .map(|rs| mean_sd(&rs.iter().map(pick).collect::<Vec<_>>()).0)
    };
    let selected = |r: &FedRun| r.selected;
    let last = |r: &FedRun| r.last;
    match mean_of("iid", selected) {
        Some(iid) => {
            out.insert("ag_news_fed_iid_acc".into(), json!(iid));
            match mean_of("dirichlet0.1", selected) {
                Some(d) => {
                    out.insert("noniid_gap_points".into(), json!(100.0 * (iid - d)));
                    if let (Some(a), Some(b)) =
                        (mean_of("iid", last), mean_of("dirichlet0.1", last))
                    {
                        out.insert(
                            "noniid_gap_points_last_version".into(),
                            json!(100.0 * (a - b)),
                        );
                    }
                    out.insert(
                        "fed_seeds".into(),
                        json!(runs.get("iid").map_or(0, Vec::len)),
                    );
                }
                None => {
                    missing.insert(
                        "noniid_gap_points".into(),
                        json!("no dirichlet0.1-seed*.json run"),
                    );
                }
            }
        }
        None => {
            missing.insert("ag_news_fed_iid_acc".into(), json!("no iid-seed*.json run"));
        }
    }
    out.insert("federated".into(), Value::Object(fed));
    match read(&args.demo) {
        Ok(d) => {
            if let Some(a) = num(&d, "selected_accuracy") {
                out.insert("demo_bbc_heldout_acc".into(), json!(a));
            }
            out.insert(
                "demo_bbc_last_version_acc".into(),
                d["final_accuracy"].clone(),
            );
            out.insert("demo_bbc_commits".into(), d["commits"].clone());
        }
        Err(e) => {
            missing.insert("demo_bbc_heldout_acc".into(), json!(format!("{e:#}")));
        }
    }
    match args.sft.as_deref().map(read) {
        Some(Ok(s)) => {
            if let Some(d) = num(&s, "sft_nll_rel_drop") {
                out.insert("sft_nll_rel_drop".into(), json!(d));
            }
        }
        Some(Err(e)) => {
            missing.insert("sft_nll_rel_drop".into(), json!(format!("{e:#}")));
        }
        None => {
            missing.insert(
                "sft_nll_rel_drop".into(),
                json!("no federated SFT run in this bench (SFT=0; scripts/bench-learning.sh runs one by default)"),
            );
        }
    }
    if let Some(cfg) = out.get("bbc_local_config").cloned() {
        let lora = &cfg["lora"];
        out.insert(
            "layout".into(),
            json!(format!(
                "head rows only: {} label rows x n_embd + biases, modules {}",
                lora["head_rows"], lora["modules"]
            )),
        );
        out.insert(
            "estimator".into(),
            json!(format!(
                "{} forward gradient, {} directions per step, eps {}",
                if cfg["one_sided"].as_bool() == Some(true) {
                    "one-sided"
                } else {
                    "central"
                },
                cfg["directions"],
                cfg["eps"]
            )),
        );
    }
    if !curves.is_empty() {
        if let Some(d) = args.png.parent() {
            std::fs::create_dir_all(d)?;
        }
        plot(&curves, &args.png)?;
        out.insert("noniid_png".into(), json!(args.png.display().to_string()));
    }
    if !missing.is_empty() {
        out.insert("missing".into(), Value::Object(missing));
    }
    let text = serde_json::to_string_pretty(&Value::Object(out))? + "\n";
    if let Some(d) = args.out.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(&args.out, &text).with_context(|| format!("writing {}", args.out.display()))?;
    print!("{text}");
    println!("wrote {}", args.out.display());
    Ok(())
}
