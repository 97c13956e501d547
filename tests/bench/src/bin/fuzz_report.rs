//! Gathers `make fuzz` (`scripts/fuzz.sh`: each cargo-fuzz target run for a set time) into
//! `target/bench/fuzz.json`. Every figure is read from libFuzzer's own output
//! (`<logs>/<target>.log`: executions from `Done N runs in S second(s)` or, after a crash, the
//! last `#N` status line; coverage from the last `cov:`/`ft:`/`corp:` fields) and the crash
//! files it left (`<crashes>/<target>/crash-*`, `oom-*`, `timeout-*`, `leak-*`).

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Parser;
use fwdllm_bench::fuzz::{libfuzzer_summary, TARGETS};
use serde_json::{json, Map};

#[derive(Parser)]
struct Args {
    /// Directory of the libFuzzer logs, one `<target>.log` per target.
    #[arg(long)]
    logs: PathBuf,
    /// Directory of the crash inputs, one folder per target.
    #[arg(long)]
    crashes: PathBuf,
    /// Seconds each target was given (recorded in the report).
    #[arg(long)]
    seconds: u64,
    /// Where to write the report.
    #[arg(long, default_value = "target/bench/fuzz.json")]
    out: PathBuf,
}

/// Crash inputs libFuzzer wrote for one target.
fn crash_files(dir: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            ["crash-", "oom-", "timeout-", "leak-"]
                .iter()
                .any(|p| n.starts_with(p))
        })
        .collect();
    names.sort();
    names
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let mut targets = Vec::new();
    let mut flat = Map::new();
    let (mut total_execs, mut total_crashes) = (0u64, 0u64);
    let mut missing = Vec::new();
    for (name, _) in TARGETS {
        let log_path = a.logs.join(format!("{name}.log"));
        // FUZZ_TARGETS may have picked a subset: the report names the targets not run.
        let Ok(log) = std::fs::read_to_string(&log_path) else {
            missing.push(*name);
            continue;
        };
        let s = libfuzzer_summary(&log)
            .with_context(|| format!("{}: no libFuzzer status line", log_path.display()))?;
        let files = crash_files(&a.crashes.join(name));
        let crashes = files.len() as u64 + u64::from(files.is_empty() && s.crashed);
        total_execs += s.execs;
        total_crashes += crashes;
        flat.insert(format!("fuzz_{name}_execs"), json!(s.execs));
        flat.insert(format!("fuzz_{name}_cov"), json!(s.cov));
        targets.push(json!({
            "target": name,
            "execs": s.execs,
            "seconds": s.seconds,
            "execs_per_s": s.seconds.map(|t| s.execs as f64 / t.max(1) as f64),
            "coverage_edges": s.cov,
            "coverage_features": s.ft,
            "corpus_units": s.corpus_units,
            "crashes": crashes,
            "crash_files": files,
        }));
    }
    if targets.is_empty() {
        anyhow::bail!("no libFuzzer log in {}", a.logs.display());
    }
    let mut report = json!({
        "fuzz_targets": targets,
        "fuzz_total_execs": total_execs,
        "fuzz_crashes": total_crashes,
        "fuzz_seconds_per_target": a.seconds,
        "fuzz_targets_not_run": missing,
        "fuzz_engine": "cargo-fuzz (libFuzzer, coverage-guided), fuzz/fuzz_targets/",
    });
    report.as_object_mut().expect("object").extend(flat);
    let text = serde_json::to_string_pretty(&report)? + "\n";
    if let Some(d) = a.out.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(&a.out, &text).with_context(|| format!("writing {}", a.out.display()))?;
    print!("{text}");
    println!("wrote {}", a.out.display());
    if total_crashes > 0 {
        anyhow::bail!(
            "{total_crashes} crash(es): inputs in {}",
            a.crashes.display()
        );
    }
    Ok(())
}
