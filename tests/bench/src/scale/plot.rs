//! The scale bench's curves as a PNG next to `scale.json`: end-to-end ingest against clients
//! (with the broker ceiling), round open to commit, and the commit fan-out a fleet that follows
//! every commit would receive.

use std::path::Path;

use serde_json::Value;

/// Plots the report's curves: end-to-end ingest against clients (with the broker ceiling),
/// round open to commit, and the commit fan-out a fleet following every commit would receive.
pub fn plot(report: &Value, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let runs = report["runs"].as_array().cloned().unwrap_or_default();
    let series = |broker: &str, key: &str| -> Vec<(f64, f64)> {
        let mut v: Vec<(f64, f64)> = runs
            .iter()
            .filter(|r| r["broker"] == broker)
            // The curves are by client count, one connection: the worker runs are in the table.
            .filter(|r| r["ingest_workers"].as_u64().unwrap_or(1) == 1)
            .filter_map(|r| Some((r["clients"].as_f64()?, r[key].as_f64()?)))
            .collect();
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        v
    };
    let text = fwdllm_aggregator::metrics::ensure_font();
    let root = BitMapBackend::new(path, (900, 1000)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((3, 1));
    let ceiling = report["broker_ceiling_msgs_per_s"].as_f64();
    type Panel<'a> = (&'a str, &'a str, Vec<(&'a str, Vec<(f64, f64)>, RGBColor)>);
    let specs: [Panel; 3] = [
        (
            "end-to-end ingest (updates/s) vs clients",
            "updates/s",
            vec![
                (
                    "mosquitto",
                    series("mosquitto", "updates_per_s_end_to_end"),
                    BLUE,
                ),
                (
                    "embedded",
                    series("embedded", "updates_per_s_end_to_end"),
                    GREEN,
                ),
            ],
        ),
        (
            "round open to commit (ms, median) vs clients",
            "ms",
            vec![
                (
                    "mosquitto",
                    series("mosquitto", "round_open_to_commit_ms_median"),
                    BLUE,
                ),
                (
                    "embedded",
                    series("embedded", "round_open_to_commit_ms_median"),
                    GREEN,
                ),
            ],
        ),
        (
            "commit fan-out if every client followed every commit (MB per round)",
            "MB",
            vec![(
                "mosquitto",
                series(
                    "mosquitto",
                    "commit_fanout_bytes_per_round_if_every_client_followed",
                )
                .into_iter()
                .map(|(n, b)| (n, b / 1e6))
                .collect(),
                RED,
            )],
        ),
    ];
    for (i, (area, (title, ylab, lines))) in panels.iter().zip(specs).enumerate() {
        let mut ys: Vec<f64> = lines
            .iter()
            .flat_map(|(_, p, _)| p.iter().map(|q| q.1))
            .collect();
        if i == 0 {
            ys.extend(ceiling);
        }
        let hi = ys.iter().copied().fold(1.0f64, f64::max) * 1.15;
        let mut b = ChartBuilder::on(area);
        b.margin(12);
        if text {
            b.caption(title, ("sans-serif", 18))
                .x_label_area_size(30)
                .y_label_area_size(70);
        }
        let mut chart = b.build_cartesian_2d((50f64..20_000f64).log_scale(), 0f64..hi)?;
        if text {
            chart
                .configure_mesh()
                .x_desc("clients")
                .y_desc(ylab)
                .x_label_formatter(&|x| format!("{x:.0}"))
                .y_label_formatter(&|y| format!("{y:.0}"))
                .draw()?;
        }
        for (name, pts, color) in lines {
            if pts.is_empty() {
                continue;
            }
            let s = chart.draw_series(LineSeries::new(pts.iter().copied(), &color))?;
            if text {
                s.label(name)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], color));
            }
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
        }
        if let (0, Some(c)) = (i, ceiling) {
            let s = chart.draw_series(LineSeries::new(
                [(50.0, c), (20_000.0, c)],
                BLACK.stroke_width(1),
            ))?;
            if text {
                s.label("broker ceiling (bare QoS-1 fan-in)")
                    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], BLACK));
            }
        }
        if text {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()?;
        }
    }
    root.present()?;
    Ok(())
}
