//! Gathers the recipe sweep (`scripts/bench-recipes.sh`) into `target/bench/recipes.json` and
//! `recipes.png`: for every task × recipe run (`<dir>/<task>-<recipe>/metrics.json`, written by
//! `train-local`), held-out accuracy against training seconds (evaluations excluded) and against
//! loss evaluations, and the recipe with the best dev accuracy averaged over the tasks (the rule
//! the issue sets for defaults: across tasks, never one). A run without a metrics.json (failed or
//! not run) is named under `missing`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Parser;
use plotters::prelude::*;
use serde_json::{json, Value};

#[derive(Parser)]
struct Args {
    /// Directory holding `<task>-<recipe>/metrics.json`.
    #[arg(long, default_value = "target/bench/recipes")]
    dir: PathBuf,
    #[arg(long, default_value = "target/bench/recipes.json")]
    out: PathBuf,
    #[arg(long, default_value = "target/bench/recipes.png")]
    png: PathBuf,
}

const TASKS: [&str; 2] = ["bbc", "ag_news"];

/// One held-out point: (training seconds, loss evaluations, accuracy).
type Point = (f64, f64, f64);

struct Run {
    task: String,
    recipe: String,
    metrics: Value,
    curve: Vec<Point>,
}

fn f(v: &Value, path: &[&str]) -> Option<f64> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_f64()
}

fn read_runs(dir: &Path) -> anyhow::Result<(Vec<Run>, Vec<String>)> {
    let mut runs = Vec::new();
    let mut missing = Vec::new();
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    for name in names {
        let Some(task) = TASKS.iter().find(|t| {
            name.strip_prefix(**t)
                .is_some_and(|rest| rest.starts_with('-'))
        }) else {
            continue;
        };
        let recipe = name[task.len() + 1..].to_string();
        let path = dir.join(&name).join("metrics.json");
        let Ok(text) = std::fs::read_to_string(&path) else {
            missing.push(format!(
                "{name}: no metrics.json (the run failed or was stopped; see {name}.log)"
            ));
            continue;
        };
        let metrics: Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let curve = metrics["evals"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["split"] == "heldout")
            .filter_map(|e| {
                Some((
                    e["train_s"].as_f64()?,
                    e["loss_evaluations"].as_f64()?,
                    e["accuracy"].as_f64()?,
                ))
            })
            .collect();
        runs.push(Run {
            task: task.to_string(),
            recipe,
            metrics,
            curve,
        });
    }
    Ok((runs, missing))
}

fn plot(runs: &[Run], png: &Path) -> anyhow::Result<()> {
    let root = BitMapBackend::new(png, (1200, 860)).into_drawing_area();
    root.fill(&WHITE)?;
    // Text needs a font; without one (no fonts-dejavu-core) the curves are drawn unlabelled.
    let text = fwdllm_aggregator::metrics::ensure_font();
    let recipes: Vec<&str> = {
        let mut r: Vec<&str> = runs.iter().map(|r| r.recipe.as_str()).collect();
        r.sort();
        r.dedup();
        r
    };
    let panels = root.split_evenly((2, 2));
    for (i, area) in panels.iter().enumerate() {
        let task = TASKS[i / 2];
        let by_evals = i % 2 == 1;
        // Head-only runs take tens of thousands of cheap steps, LoRA runs hundreds: the
        // evaluations axis is logarithmic (log10 of evaluations + 1, so zero-shot sits at 0).
        let pick = |p: &Point| if by_evals { (p.1 + 1.0).log10() } else { p.0 };
        let mine: Vec<&Run> = runs.iter().filter(|r| r.task == task).collect();
        let max_x = mine
            .iter()
            .flat_map(|r| r.curve.iter().map(pick))
            .fold(1.0, f64::max);
        let mut b = ChartBuilder::on(area);
        b.margin(10);
        if text {
            let axis = if by_evals {
                "log10(loss evaluations + 1)"
            } else {
                "training seconds"
            };
            b.caption(
                format!("{task}: held-out accuracy vs {axis}"),
                ("sans-serif", 18),
            )
            .x_label_area_size(30)
            .y_label_area_size(44);
        }
        let mut chart = b.build_cartesian_2d(0f64..max_x * 1.02, 0.3f64..1.0f64)?;
        if text {
            chart.configure_mesh().draw()?;
        }
        for run in mine {
            let k = recipes.iter().position(|r| *r == run.recipe).unwrap_or(0);
            let color = Palette99::pick(k).to_rgba();
            let series: Vec<(f64, f64)> = run.curve.iter().map(|p| (pick(p), p.2)).collect();
            chart
                .draw_series(LineSeries::new(series.clone(), color.stroke_width(2)))?
                .label(run.recipe.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
            chart.draw_series(series.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
        }
        if text {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .position(SeriesLabelPosition::LowerRight)
                .draw()?;
        }
    }
    root.present()?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let (runs, missing) = read_runs(&a.dir)?;
    anyhow::ensure!(
        !runs.is_empty(),
        "no runs under {}: run scripts/bench-recipes.sh first",
        a.dir.display()
    );
    println!(
        "{:<8} {:<14} {:>9} {:>9} {:>9} {:>8} {:>10} {:>8}",
        "task", "recipe", "trainable", "zero-shot", "best dev", "held-out", "loss evals", "train s"
    );
    let mut rows = Vec::new();
    let mut dev_by_recipe: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for r in &runs {
        let m = &r.metrics;
        let train_s = r.curve.last().map_or(0.0, |p| p.0);
        let dev = f(m, &["best_dev", "accuracy"]);
        let row = json!({
            "task": r.task,
            "recipe": r.recipe,
            "trainable": m["trainable"],
            "zero_shot_heldout_acc": f(m, &["zero_shot", "accuracy"]),
            "best_dev_acc": dev,
            "best_step": m["best_step"],
            "heldout_acc": f(m, &["final_heldout", "accuracy"]),
            "steps": m["steps"],
            "loss_evaluations": m["loss_evaluations"],
            "wall_s": m["wall_s"],
            "train_s_at_last_heldout": train_s,
            "curve": r.curve.iter().map(|p| json!({"train_s": p.0, "loss_evaluations": p.1, "heldout_acc": p.2})).collect::<Vec<_>>(),
        });
        let show = |v: Option<f64>| v.map_or("-".into(), |x| format!("{x:.4}"));
        println!(
            "{:<8} {:<14} {:>9} {:>9} {:>9} {:>8} {:>10} {:>8.0}",
            r.task,
            r.recipe,
            m["trainable"],
            show(f(m, &["zero_shot", "accuracy"])),
            show(dev),
            show(f(m, &["final_heldout", "accuracy"])),
            m["loss_evaluations"],
            train_s
        );
        if let Some(d) = dev {
            dev_by_recipe.entry(r.recipe.clone()).or_default().push(d);
        }
        rows.push(row);
    }
    // Only recipes run on every task compete: a mean over one task would choose on one task.
    let chosen = dev_by_recipe
        .iter()
        .filter(|(_, d)| d.len() == TASKS.len())
        .map(|(r, d)| (r.clone(), d.iter().sum::<f64>() / d.len() as f64))
        .max_by(|a, b| a.1.total_cmp(&b.1));
    if let Some((r, d)) = &chosen {
        println!("best mean dev accuracy over {TASKS:?}: {r} ({d:.4})");
    }
    let report = json!({
        "runs": rows,
        "chosen_recipe": chosen.as_ref().map(|c| c.0.clone()),
        "chosen_mean_dev_acc": chosen.as_ref().map(|c| c.1),
        "rule": "the recipe with the highest best-dev accuracy averaged over both tasks, each run given the same wall budget",
        "loss_evaluations_counts": "train-local's count: one per step for the unperturbed batch (served from the feature cache once a head-only run has seen its examples) and one per adapter-block direction; a head-block direction costs a K x n_embd product on the batch's features and adds none",
        "missing": missing,
    });
    std::fs::write(&a.out, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", a.out.display()))?;
    plot(&runs, &a.png)?;
    println!("wrote {} and {}", a.out.display(), a.png.display());
    Ok(())
}
