//! What the scale bench needs from the OS: the open-file limit raised for 10,000 connections,
//! and CPU seconds per component (this process's threads by name from `/proc/self/task`, a
//! broker child from `/proc/<pid>/stat`), sampled at the edges of a measured window.

use std::collections::BTreeMap;

use serde_json::{json, Value};

/// Thread names whose CPU is attributed to the aggregator and to the simulator.
pub(super) const AGG_THREADS: &str = "fwdllm-agg";
pub(super) const SIM_THREADS: &str = "fwdllm-sim";

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// utime + stime in seconds from a `/proc/.../stat` line.
fn stat_cpu(stat: &str) -> Option<f64> {
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields after the command: state is field 3, utime 14 and stime 15 (1-based).
    let u: f64 = f.get(11)?.parse().ok()?;
    let s: f64 = f.get(12)?.parse().ok()?;
    Some((u + s) / clock_ticks())
}

/// CPU seconds of this process's threads, summed by thread name.
fn thread_cpu() -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for e in dir.flatten() {
        let p = e.path();
        let name = std::fs::read_to_string(p.join("comm")).unwrap_or_default();
        let cpu = std::fs::read_to_string(p.join("stat"))
            .ok()
            .and_then(|s| stat_cpu(&s));
        if let Some(cpu) = cpu {
            *out.entry(name.trim().to_owned()).or_insert(0.0) += cpu;
        }
    }
    out
}

fn pid_cpu(pid: u32) -> Option<f64> {
    stat_cpu(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// CPU seconds of the parts of a run at one instant.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct CpuSample {
    aggregator: f64,
    simulator: f64,
    process: f64,
    broker: Option<f64>,
}

pub(super) fn sample_cpu(broker_pid: Option<u32>) -> CpuSample {
    let threads = thread_cpu();
    let by = |prefix: &str| -> f64 {
        threads
            .iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .map(|(_, c)| c)
            .sum()
    };
    CpuSample {
        aggregator: by(AGG_THREADS),
        simulator: by(SIM_THREADS),
        process: threads.values().sum(),
        broker: broker_pid.and_then(pid_cpu),
    }
}

pub(super) fn cpu_json(a: &CpuSample, b: &CpuSample, wall: f64) -> Value {
    let d = |x: f64, y: f64| ((y - x) * 1000.0).round() / 1000.0;
    let other = d(
        a.process - a.aggregator - a.simulator,
        b.process - b.aggregator - b.simulator,
    );
    json!({
        "window_wall_s": wall,
        "aggregator_cpu_s": d(a.aggregator, b.aggregator),
        "simulator_cpu_s": d(a.simulator, b.simulator),
        "broker_cpu_s": a.broker.zip(b.broker).map(|(x, y)| d(x, y)),
        "other_threads_cpu_s": other,
        "note": "CPU seconds inside the measured window; the machine's cores are shared by all of them (and by other work: see machine.loadavg_at_start)",
    })
}
