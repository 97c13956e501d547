//! The fleet-scale bench (`fwdllm-bench scale`, `make scale`; `make bench` writes
//! `target/bench/scale.json`): the real aggregator against 100, 1,000 and 10,000 simulated MQTT
//! clients ([`crate::fleet`]) through Mosquitto (and the embedded broker), measured end to end,
//! next to the broker's own QoS-1 fan-in ceiling measured in the same run.
//!
//! Figures (top-level keys of the report):
//! * `ingest_updates_per_s_end_to_end` — at the headline client count through Mosquitto:
//!   updates committed / wall clock from the first update published to the durable commit of
//!   the last round (the aggregator's commit hook runs after `persist`), every round holding one
//!   update from every client; the best of the ingest worker counts run (`ingest_best_workers`
//!   says which);
//! * `ingest_updates_per_s_end_to_end_workers` — that rate by `[ingest] workers` (1 = the
//!   aggregator's own connection; N = N connections on a shared subscription), same clients,
//!   each on a fresh Mosquitto; the other client counts run with 1;
//! * `broker_ceiling_msgs_per_s` — the same Mosquitto, the same number of publisher
//!   connections sending update-sized QoS-1 messages as fast as they can to one bare subscriber
//!   that only counts them (no decode, no aggregator, no fsync);
//! * `ingest_over_broker_ceiling` — their ratio;
//! * `ingest_flatness_10k_over_100` — end-to-end rate at 10,000 clients over the rate at 100;
//! * `bridge_lost`, `bridge_doubled`, `bridge_hash_mismatches` — [`crate::bridge`]'s run: clients
//!   on a site broker bridged to the aggregator's central one, the bridge cut mid-round.
//!
//! Honesty: the simulator, the aggregator and Mosquitto share this machine's cores, so every run
//! reports the CPU seconds each of them used inside its measured window (threads by name from
//! `/proc/self/task`, Mosquitto from `/proc/<pid>/stat`), the load average at the start, and
//! the commit fan-out (bytes per commit a fleet that follows every commit would receive) that
//! the shared-replica fleet does not put through the broker. A figure that could not be
//! measured is absent and its reason is listed under `absent`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

use crate::bridge::{self, Mosquitto};
use crate::fleet::{self, FleetStats};
use fwdllm_aggregator::config::AggregatorConfig;
use fwdllm_aggregator::coordinator::AggEvent;
use fwdllm_aggregator::server::{self, BrokerTarget, Hooks, RunSummary};
use fwdllm_frontdoor::sim::SimParams;

mod ceiling;
mod cpu;
mod plot;

use ceiling::{broker_ceiling, update_len};
use cpu::{cpu_json, sample_cpu, CpuSample, AGG_THREADS, SIM_THREADS};
pub use fwdllm_aggregator::broker::raise_fd_limit;
pub use plot::plot;

/// Failure guard of one run (never reached when things work).
const RUN_GUARD: Duration = Duration::from_secs(900);

/// What `scale` runs.
#[derive(Debug, Clone)]
pub struct ScaleOptions {
    /// Client counts run through Mosquitto.
    pub clients: Vec<usize>,
    /// Client counts also run through the embedded broker.
    pub embedded: Vec<usize>,
    /// The client count of `ingest_updates_per_s_end_to_end` and of the ceiling's publishers.
    pub headline: usize,
    /// Updates per run (rounds = this / clients, at least 3).
    pub updates_per_run: usize,
    pub perturbations: u32,
    /// Messages of the broker-ceiling measurement.
    pub ceiling_messages: usize,
    pub mosquitto: PathBuf,
    /// Simulated clients of the bridged run (0 = skip it).
    pub bridge_clients: usize,
    /// `[ingest] workers` counts run at the headline client count through Mosquitto.
    pub workers: Vec<u32>,
    /// The `fwdllm-aggregator` executable, whose `broker` subcommand runs the embedded broker
    /// apart (`EmbeddedProcess`); None skips the embedded runs.
    pub broker_exe: Option<PathBuf>,
}

impl Default for ScaleOptions {
    fn default() -> Self {
        ScaleOptions {
            clients: vec![100, 1000, 10_000],
            embedded: vec![100, 1000, 10_000],
            headline: 1000,
            updates_per_run: 60_000,
            perturbations: 4,
            ceiling_messages: 100_000,
            mosquitto: PathBuf::from("/usr/sbin/mosquitto"),
            bridge_clients: 50,
            workers: vec![1, 2, 4],
            broker_exe: None,
        }
    }
}

/// A broker for the bench.
pub(super) enum BenchBroker {
    Mosquitto(Mosquitto),
    Embedded(EmbeddedProcess),
}

/// The embedded broker (rumqttd with the aggregator's settings, [`fwdllm_aggregator::broker::EmbeddedBroker`]) in a child
/// process, `fwdllm-aggregator broker`. In the bench's own process its 10,000 server sockets
/// and the simulator's 10,000 client sockets would need twice the open-file limit, more than
/// a container's hard limit allows (20,000 on the bench machine: the 10,000-client run
/// stalled on "Too many open files"); apart, the broker's CPU is also measured like
/// mosquitto's. The aggregator reaches it over loopback TCP either way. Killed on drop.
pub(super) struct EmbeddedProcess {
    child: std::process::Child,
    port: u16,
}

impl EmbeddedProcess {
    fn start(exe: &Path, max_packet: usize) -> anyhow::Result<EmbeddedProcess> {
        let port = fwdllm_aggregator::broker::free_port("127.0.0.1")?;
        let child = std::process::Command::new(exe)
            .args(["broker", "--port", &port.to_string()])
            .args(["--max-packet-bytes", &max_packet.to_string()])
            // Thousands of disconnects at the end of a run are logged at error level.
            .env("RUST_LOG", "warn,rumqttd=off")
            .stdout(std::process::Stdio::null())
            .spawn()
            .with_context(|| format!("starting {} broker", exe.display()))?;
        // Dropped (so killed) if it never listens.
        let p = EmbeddedProcess { child, port };
        crate::bridge::wait_listening(
            std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            "the embedded broker",
        )?;
        Ok(p)
    }
}

impl Drop for EmbeddedProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl BenchBroker {
    /// Mosquitto with the in-flight and queue limits the shipped config recommends
    /// (`systemd/mosquitto-fwdllm.conf`): the aggregator acknowledges updates a group at a
    /// time, and mosquitto's defaults (20 in flight, 1,000 queued per client) would cap a group
    /// at 20 updates and drop QoS-1 updates past 1,000 waiting.
    fn mosquitto(bin: &Path, max_packet: usize) -> anyhow::Result<BenchBroker> {
        Ok(BenchBroker::Mosquitto(Mosquitto::start(
            bin, max_packet, "",
        )?))
    }

    pub(super) fn port(&self) -> u16 {
        match self {
            BenchBroker::Mosquitto(m) => m.port(),
            BenchBroker::Embedded(b) => b.port,
        }
    }

    pub(super) fn pid(&self) -> Option<u32> {
        match self {
            BenchBroker::Mosquitto(m) => Some(m.pid()),
            BenchBroker::Embedded(b) => Some(b.child.id()),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            BenchBroker::Mosquitto(_) => "mosquitto",
            BenchBroker::Embedded(_) => "embedded",
        }
    }
}

fn bench_config(
    n: usize,
    perturbations: u32,
    rounds: u64,
    workers: u32,
    dir: &Path,
) -> AggregatorConfig {
    let mut cfg = AggregatorConfig::tiny(&format!("scale{n}"), dir);
    cfg.ingest.workers = workers;
    cfg.job.max_commits = rounds;
    cfg.selection.eval_every = 0;
    cfg.round.min_clients = n as u32;
    cfg.round.quorum = 1;
    cfg.round.perturbations_per_client = perturbations;
    cfg.round.deadline_s = 300.0;
    // Every round holds one update of every client: it commits at the cap.
    cfg.pacing.max_perturbations = n as u32 * perturbations;
    cfg.pacing.min_perturbations = cfg.pacing.max_perturbations;
    cfg.pacing.max_extends = 0;
    cfg.step.lr = 0.5;
    cfg
}

/// One end-to-end run of `n` fleet clients; the aggregator on its own runtime and thread.
fn ingest_run(
    sim: &Runtime,
    broker: &BenchBroker,
    n: usize,
    workers: u32,
    opts: &ScaleOptions,
) -> anyhow::Result<Value> {
    let rounds = (opts.updates_per_run / n).max(3) as u64;
    let dir = tempfile::tempdir()?;
    let cfg = bench_config(n, opts.perturbations, rounds, workers, dir.path());
    let params = SimParams {
        job: cfg.job.name.clone(),
        host: "127.0.0.1".into(),
        port: broker.port(),
        layout: cfg.layout().map_err(anyhow::Error::msg)?,
        noise: 0.01,
        target_seed: 7,
        max_packet_bytes: cfg.broker.max_packet_bytes,
    };
    let broker_pid = broker.pid();
    let commits: Arc<Mutex<Vec<(u64, Instant)>>> = Arc::default();
    let end_cpu: Arc<Mutex<Option<CpuSample>>> = Arc::default();
    let hooks = {
        let commits = commits.clone();
        let end_cpu = end_cpu.clone();
        let (tx, _) = tokio::sync::broadcast::channel(1 << 16);
        Hooks {
            events: Some(tx),
            // Runs after persist: the commit is durable.
            on_commit: Some(Box::new(move |v, _| {
                commits.lock().expect("commits").push((v, Instant::now()));
                if v == rounds {
                    *end_cpu.lock().expect("cpu") = Some(sample_cpu(broker_pid));
                }
                None
            })),
            ..Hooks::default()
        }
    };
    let events = hooks.events.as_ref().map(|tx| tx.subscribe());
    let stop = CancellationToken::new();
    let target = BrokerTarget {
        host: "127.0.0.1".into(),
        port: broker.port(),
    };
    let agg_stop = stop.clone();
    let agg = std::thread::Builder::new().name(AGG_THREADS.into()).spawn(
        move || -> anyhow::Result<RunSummary> {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name(AGG_THREADS)
                .enable_all()
                .build()?;
            Ok(rt.block_on(server::run(cfg, target, agg_stop, hooks))?)
        },
    )?;
    // Window start: round 1 opens once every client is online; the first update follows.
    let start_cpu: Arc<Mutex<Option<CpuSample>>> = Arc::default();
    let base = Instant::now();
    let stats = Arc::new(FleetStats::new(base));
    let fleet_stop = CancellationToken::new();
    let (tasks, guard) = {
        let _enter = sim.enter();
        let start_cpu = start_cpu.clone();
        if let Some(mut rx) = events {
            tokio::spawn(async move {
                while let Ok(e) = rx.recv().await {
                    if matches!(e, AggEvent::RoundOpened { round: 1, .. }) {
                        *start_cpu.lock().expect("cpu") = Some(sample_cpu(broker_pid));
                        break;
                    }
                }
            });
        }
        let tasks = fleet::spawn_fleet(
            &params,
            &format!("s{n}"),
            n,
            stats.clone(),
            fleet_stop.clone(),
        );
        let stop = stop.clone();
        let guard = tokio::spawn(async move {
            tokio::time::sleep(RUN_GUARD).await;
            log::error!("scale run of {n} clients hit its {RUN_GUARD:?} guard; stopping it");
            stop.cancel();
        });
        (tasks, guard)
    };
    let summary = agg
        .join()
        .map_err(|_| anyhow::anyhow!("aggregator thread panicked"))??;
    guard.abort();
    fleet_stop.cancel();
    sim.block_on(async {
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    });
    let commits = commits.lock().expect("commits").clone();
    let first = stats.first_update();
    let last = commits.iter().find(|(v, _)| *v == rounds).map(|(_, t)| *t);
    let r = |k: &AtomicU64| k.load(Ordering::Relaxed);
    let mut out = json!({
        "broker": broker.name(),
        "clients": n,
        "ingest_workers": workers,
        "rounds": rounds,
        "commits": summary.version,
        "updates_committed": summary.updates,
        "perturbations": summary.perturbations,
        "duplicates": summary.duplicates,
        "stale": summary.stale,
        "rejected": summary.rejected,
        "fleet_connections": r(&stats.connected),
        "fleet_connection_errors": r(&stats.connection_errors),
        "fleet_updates_sent": r(&stats.updates_sent),
        "update_bytes_mean": r(&stats.update_bytes) as f64 / r(&stats.updates_sent).max(1) as f64,
        "observer_hash_mismatches": r(&stats.hash_mismatches),
        "commit_bytes_mean": r(&stats.commit_bytes) as f64 / r(&stats.commits).max(1) as f64,
        "commit_fanout_bytes_per_round_if_every_client_followed": r(&stats.commit_bytes) as f64
            / r(&stats.commits).max(1) as f64 * n as f64,
        "announce_bytes_per_round": r(&stats.announce_bytes) as f64 / rounds as f64,
        "journal_appends": summary.durable_writes.journal_appends,
        "journaled_updates": summary.durable_writes.journaled_updates,
        "state_snapshots": summary.durable_writes.snapshots,
        "aggregator_busy_updates_per_s": summary.ingest_updates_per_s(),
    });
    // Round open to commit, from the aggregator's own records (metrics.jsonl).
    let mut round_ms: Vec<u64> = fwdllm_aggregator::metrics::read_jsonl(
        &dir.path().join(fwdllm_aggregator::metrics::JSONL_FILE),
    )
    .unwrap_or_default()
    .iter()
    .filter(|m| m.phase == "committed")
    .map(|m| m.round_ms)
    .collect();
    round_ms.sort_unstable();
    if !round_ms.is_empty() {
        out["round_open_to_commit_ms_median"] = json!(round_ms[round_ms.len() / 2]);
        out["round_open_to_commit_ms_max"] = json!(round_ms[round_ms.len() - 1]);
    }
    match (first, last) {
        (Some(first), Some(last)) if summary.version == rounds && last > first => {
            let wall = last.duration_since(first).as_secs_f64();
            out["window_s"] = json!(wall);
            out["updates_per_s_end_to_end"] = json!(summary.updates as f64 / wall);
            out["round_latency_ms_mean"] = json!(wall * 1000.0 / rounds as f64);
            if let (Some(a), Some(b)) = (
                *start_cpu.lock().expect("cpu"),
                *end_cpu.lock().expect("cpu"),
            ) {
                out["cpu"] = cpu_json(&a, &b, wall);
            }
        }
        _ => {
            out["absent_reason"] = json!(format!(
                "run incomplete: {} of {rounds} commits, first update {first:?}",
                summary.version
            ));
        }
    }
    Ok(out)
}

/// Runs the bench and returns the report (`scale.json`).
pub fn run(opts: &ScaleOptions) -> anyhow::Result<Value> {
    let (soft, hard) = raise_fd_limit().context("raising the open-file limit")?;
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let sim = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(SIM_THREADS)
        .enable_all()
        .build()?;
    let mut absent = BTreeMap::new();
    let mut runs = Vec::new();
    let mut rate = BTreeMap::new();
    // Rate at the headline client count by ingest worker count.
    let mut by_workers: BTreeMap<u32, f64> = BTreeMap::new();
    let mut ceiling = None;
    let max_packet = AggregatorConfig::default().broker.max_packet_bytes;
    // Each connection is a descriptor here and one in the broker (same limit, inherited).
    let fits = |n: usize| (n as u64) + 256 <= soft;
    for &n in &opts.clients {
        if !fits(n) {
            absent.insert(
                format!("mosquitto_{n}"),
                format!("open-file limit {soft} (hard {hard}) is below {n} connections"),
            );
            continue;
        }
        let mut broker = BenchBroker::mosquitto(&opts.mosquitto, max_packet)?;
        if n == opts.headline {
            log::info!("scale: broker ceiling with {n} publishers");
            let c = broker_ceiling(
                &sim,
                &broker,
                n,
                opts.ceiling_messages,
                update_len(opts.perturbations),
            )?;
            ceiling = c["msgs_per_s"].as_f64();
            if ceiling.is_none() {
                absent.insert(
                    "broker_ceiling_msgs_per_s".into(),
                    c["absent_reason"].to_string(),
                );
            }
            runs.push(json!({"broker_ceiling": c}));
        }
        log::info!("scale: {n} clients through mosquitto");
        let r = ingest_run(&sim, &broker, n, 1, opts)?;
        match r["updates_per_s_end_to_end"].as_f64() {
            Some(x) => {
                rate.insert(n, x);
                if n == opts.headline {
                    by_workers.insert(1, x);
                }
            }
            None => {
                absent.insert(format!("mosquitto_{n}"), r["absent_reason"].to_string());
            }
        }
        runs.push(r);
        if n != opts.headline {
            continue;
        }
        for &w in opts.workers.iter().filter(|&&w| w > 1) {
            // A fresh broker: the last run's retained commits would mislead the fleet.
            drop(broker);
            broker = BenchBroker::mosquitto(&opts.mosquitto, max_packet)?;
            log::info!("scale: {n} clients through mosquitto, {w} ingest workers");
            let r = ingest_run(&sim, &broker, n, w, opts)?;
            match r["updates_per_s_end_to_end"].as_f64() {
                Some(x) => {
                    by_workers.insert(w, x);
                }
                None => {
                    absent.insert(
                        format!("mosquitto_{n}_workers_{w}"),
                        r["absent_reason"].to_string(),
                    );
                }
            }
            runs.push(r);
        }
    }
    for &n in &opts.embedded {
        let Some(exe) = &opts.broker_exe else {
            absent.insert(
                format!("embedded_{n}"),
                "no broker executable given (ScaleOptions::broker_exe)".into(),
            );
            continue;
        };
        if !fits(n) {
            absent.insert(
                format!("embedded_{n}"),
                format!("open-file limit {soft} (hard {hard}) is below {n} connections"),
            );
            continue;
        }
        log::info!("scale: {n} clients through the embedded broker");
        let broker = BenchBroker::Embedded(EmbeddedProcess::start(exe, max_packet)?);
        runs.push(ingest_run(&sim, &broker, n, 1, opts)?);
    }
    let mut report = serde_json::Map::new();
    if opts.bridge_clients > 0 {
        log::info!(
            "scale: {} clients across a bridged site broker",
            opts.bridge_clients
        );
        match sim.block_on(bridge::bridged_run(&opts.mosquitto, opts.bridge_clients, 6)) {
            Ok(o) => {
                if let Value::Object(m) = bridge::report(&o, opts.bridge_clients) {
                    report.extend(m);
                }
            }
            Err(e) => {
                for k in ["bridge_lost", "bridge_doubled", "bridge_hash_mismatches"] {
                    absent.insert(k.into(), format!("bridged run failed: {e:#}"));
                }
            }
        }
    }
    // The headline is the best worker count's rate (the 1-worker rate stays in
    // `rates_by_clients`, beside the other client counts, which all ran with 1).
    let best = by_workers
        .iter()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(&w, &x)| (w, x));
    report.insert(
        "ingest_updates_per_s_end_to_end_workers".into(),
        json!(by_workers
            .iter()
            .map(|(w, x)| (w.to_string(), json!(x)))
            .collect::<serde_json::Map<_, _>>()),
    );
    match best {
        Some((w, x)) => {
            report.insert("ingest_updates_per_s_end_to_end".into(), json!(x));
            report.insert("ingest_best_workers".into(), json!(w));
        }
        None => {
            absent
                .entry("ingest_updates_per_s_end_to_end".into())
                .or_insert_with(|| format!("no complete run at {} clients", opts.headline));
        }
    }
    if let Some(c) = ceiling {
        report.insert("broker_ceiling_msgs_per_s".into(), json!(c));
    }
    match (best.map(|(_, x)| x), ceiling) {
        (Some(x), Some(c)) => {
            report.insert("ingest_over_broker_ceiling".into(), json!(x / c));
        }
        _ => {
            absent.insert(
                "ingest_over_broker_ceiling".into(),
                "needs both the end-to-end rate and the ceiling".into(),
            );
        }
    }
    match (rate.get(&10_000), rate.get(&100)) {
        (Some(a), Some(b)) => {
            report.insert("ingest_flatness_10k_over_100".into(), json!(a / b));
        }
        _ => {
            absent.insert(
                "ingest_flatness_10k_over_100".into(),
                "needs complete runs at 100 and 10,000 clients through mosquitto".into(),
            );
        }
    }
    report.insert(
        "rates_by_clients".into(),
        json!(rate
            .iter()
            .map(|(n, x)| (n.to_string(), json!(x)))
            .collect::<serde_json::Map<_, _>>()),
    );
    report.insert("runs".into(), json!(runs));
    report.insert(
        "machine".into(),
        json!({
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "loadavg_at_start": loadavg.trim(),
            "open_file_limit": soft,
        }),
    );
    if !absent.is_empty() {
        report.insert("absent".into(), json!(absent));
    }
    Ok(Value::Object(report))
}
