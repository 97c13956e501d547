//! The fleet-scale bench (`fwdllm-aggregator scale`, `make scale`; `make bench` writes
//! `target/bench/scale.json`): the real aggregator against 100, 1,000 and 10,000 simulated MQTT
//! clients ([`crate::fleet`]) through Mosquitto (and the embedded broker), measured end to end,
//! next to the broker's own QoS-1 fan-in ceiling measured in the same run.
//!
//! Figures (top-level keys of the report):
//! * `ingest_updates_per_s_end_to_end` — at the headline client count through Mosquitto:
//!   updates committed / wall clock from the first update published to the durable commit of
//!   the last round (the aggregator's commit hook runs after `persist`), every round holding one
//!   update from every client;
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

use anyhow::{bail, Context};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

use crate::bridge::{self, Mosquitto};
use crate::broker::EmbeddedBroker;
use crate::config::AggregatorConfig;
use crate::coordinator::AggEvent;
use crate::fleet::{self, FleetStats};
use crate::server::{self, BrokerTarget, Hooks, RunSummary};
use crate::sim::SimParams;

/// Thread names whose CPU is attributed to the aggregator and to the simulator.
const AGG_THREADS: &str = "fwdllm-agg";
const SIM_THREADS: &str = "fwdllm-sim";
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
}

impl Default for ScaleOptions {
    fn default() -> Self {
        ScaleOptions {
            clients: vec![100, 1000, 10_000],
            embedded: vec![1000],
            headline: 1000,
            updates_per_run: 30_000,
            perturbations: 4,
            ceiling_messages: 60_000,
            mosquitto: PathBuf::from("/usr/sbin/mosquitto"),
            bridge_clients: 50,
        }
    }
}

/// Raises the soft limit of open files to the hard limit (10,000 connections need as many
/// descriptors here, and as many again in a broker child, which inherits the limit).
/// Returns (soft, hard) after the change.
pub fn raise_fd_limit() -> std::io::Result<(u64, u64)> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed by reference.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok((r.rlim_cur, r.rlim_max))
}

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
struct CpuSample {
    aggregator: f64,
    simulator: f64,
    process: f64,
    broker: Option<f64>,
}

fn sample_cpu(broker_pid: Option<u32>) -> CpuSample {
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

fn cpu_json(a: &CpuSample, b: &CpuSample, wall: f64) -> Value {
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

/// A broker for the bench.
enum BenchBroker {
    Mosquitto(Mosquitto),
    Embedded(EmbeddedBroker),
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

    fn port(&self) -> u16 {
        match self {
            BenchBroker::Mosquitto(m) => m.port(),
            BenchBroker::Embedded(b) => b.port(),
        }
    }

    fn pid(&self) -> Option<u32> {
        match self {
            BenchBroker::Mosquitto(m) => Some(m.pid()),
            BenchBroker::Embedded(_) => None,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            BenchBroker::Mosquitto(_) => "mosquitto",
            BenchBroker::Embedded(_) => "embedded",
        }
    }
}

fn bench_config(n: usize, perturbations: u32, rounds: u64, dir: &Path) -> AggregatorConfig {
    let mut cfg = AggregatorConfig::default();
    cfg.job.name = format!("scale{n}");
    cfg.job.max_commits = rounds;
    cfg.model.preset = "tiny".into();
    cfg.state.dir = dir.to_path_buf();
    cfg.state.plot_every = 0;
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
    opts: &ScaleOptions,
) -> anyhow::Result<Value> {
    let rounds = (opts.updates_per_run / n).max(3) as u64;
    let dir = tempfile::tempdir()?;
    let cfg = bench_config(n, opts.perturbations, rounds, dir.path());
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

/// Mosquitto's QoS-1 fan-in: `publishers` connections publish `messages` update-sized
/// payloads in all, as fast as they can, to one bare subscriber that only counts them.
fn broker_ceiling(
    sim: &Runtime,
    broker: &BenchBroker,
    publishers: usize,
    messages: usize,
    payload_len: usize,
) -> anyhow::Result<Value> {
    let port = broker.port();
    let per = messages.div_ceil(publishers).max(1);
    let total = per * publishers;
    let broker_pid = broker.pid();
    sim.block_on(async move {
        let topic = |i: usize| format!("fwdllm/v1/ceiling/update/p{i:05}");
        // The bare subscriber: QoS 1, acknowledges each message, decodes nothing.
        let mut o = MqttOptions::new("ceiling-sub", "127.0.0.1", port);
        o.set_clean_session(true);
        o.set_keep_alive(Duration::from_secs(60));
        let (sub, mut sub_el) = AsyncClient::new(o, 16);
        fleet::no_delay(&mut sub_el);
        sub.subscribe("fwdllm/v1/ceiling/update/+", QoS::AtLeastOnce)
            .await?;
        loop {
            match sub_el.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => break,
                Ok(_) => {}
                Err(e) => bail!("ceiling subscriber: {e}"),
            }
        }
        let base = Instant::now();
        let first_pub = Arc::new(AtomicU64::new(u64::MAX));
        let connected = Arc::new(AtomicU64::new(0));
        let (go_tx, go_rx) = tokio::sync::watch::channel(false);
        let gate = Arc::new(tokio::sync::Semaphore::new(fleet::CONNECT_BURST));
        let payload = vec![0x5au8; payload_len];
        let mut tasks = Vec::new();
        for i in 0..publishers {
            let (first_pub, connected, mut go, gate) = (
                first_pub.clone(),
                connected.clone(),
                go_rx.clone(),
                gate.clone(),
            );
            let (topic, payload) = (topic(i), payload.clone());
            tasks.push(tokio::spawn(async move {
                let mut o = MqttOptions::new(format!("ceiling-p{i:05}"), "127.0.0.1", port);
                o.set_clean_session(true);
                o.set_keep_alive(Duration::from_secs(60));
                let (c, mut el) = AsyncClient::new(o, per.max(16));
                fleet::no_delay(&mut el);
                let permit = gate.acquire_owned().await.expect("gate");
                loop {
                    match el.poll().await {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => break,
                        Ok(_) => {}
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
                drop(permit);
                connected.fetch_add(1, Ordering::Relaxed);
                while !*go.borrow_and_update() {
                    if go.changed().await.is_err() {
                        return;
                    }
                }
                first_pub.fetch_min(base.elapsed().as_nanos() as u64, Ordering::Relaxed);
                for _ in 0..per {
                    if c.try_publish(&topic, QoS::AtLeastOnce, false, payload.clone())
                        .is_err()
                    {
                        break;
                    }
                }
                let mut acked = 0;
                while acked < per {
                    match el.poll().await {
                        Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
                let _ = c.disconnect().await;
                let _ = tokio::time::timeout(Duration::from_secs(2), el.poll()).await;
            }));
        }
        // Every publisher connected: go. The subscriber keeps its connection alive meanwhile.
        while (connected.load(Ordering::Relaxed) as usize) < publishers {
            tokio::select! {
                ev = sub_el.poll() => { ev?; }
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
        let cpu0 = sample_cpu(broker_pid);
        go_tx.send_replace(true);
        let mut got = 0usize;
        let mut last = base;
        let deadline = Instant::now() + Duration::from_secs(300);
        while got < total && Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_secs(30), sub_el.poll()).await {
                Ok(Ok(Event::Incoming(Packet::Publish(_)))) => {
                    got += 1;
                    last = Instant::now();
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => bail!("ceiling subscriber: {e}"),
                Err(_) => break,
            }
        }
        let cpu1 = sample_cpu(broker_pid);
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
        let _ = sub.disconnect().await;
        let first = base + Duration::from_nanos(first_pub.load(Ordering::Relaxed));
        let wall = last.saturating_duration_since(first).as_secs_f64();
        let mut out = json!({
            "publishers": publishers,
            "messages_sent": total,
            "messages_received": got,
            "payload_bytes": payload_len,
        });
        if got == total && wall > 0.0 {
            out["msgs_per_s"] = json!(got as f64 / wall);
            out["window_s"] = json!(wall);
            out["cpu"] = cpu_json(&cpu0, &cpu1, wall);
        } else {
            out["absent_reason"] = json!(format!("received {got} of {total} messages"));
        }
        Ok(out)
    })
}

/// The size of one update of `perturbations` pairs from a client of the fleet's names.
fn update_len(perturbations: u32) -> usize {
    use fwdllm_shared::wire::{self, ClientUpdate, SeedScalar};
    wire::encode(&ClientUpdate {
        client_id: "s1000-00000".into(),
        round: 1,
        base_version: 0,
        seq: 0,
        pairs: (0..perturbations)
            .map(|k| SeedScalar {
                seed: u64::MAX - u64::from(k),
                g: 0.5,
            })
            .collect(),
        samples: perturbations,
        loss_mean: 1.0,
        loss_m2: 0.0,
    })
    .len()
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
        let broker = BenchBroker::mosquitto(&opts.mosquitto, max_packet)?;
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
        let r = ingest_run(&sim, &broker, n, opts)?;
        match r["updates_per_s_end_to_end"].as_f64() {
            Some(x) => {
                rate.insert(n, x);
            }
            None => {
                absent.insert(format!("mosquitto_{n}"), r["absent_reason"].to_string());
            }
        }
        runs.push(r);
    }
    for &n in &opts.embedded {
        if !fits(n) {
            continue;
        }
        log::info!("scale: {n} clients through the embedded broker");
        let broker = BenchBroker::Embedded(EmbeddedBroker::start("127.0.0.1", 0, max_packet)?);
        runs.push(ingest_run(&sim, &broker, n, opts)?);
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
    match rate.get(&opts.headline) {
        Some(x) => {
            report.insert("ingest_updates_per_s_end_to_end".into(), json!(x));
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
    match (rate.get(&opts.headline), ceiling) {
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
