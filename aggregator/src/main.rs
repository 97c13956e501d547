//! `fwdllm-aggregator`: run / validate / export / sim.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use fwdllm_aggregator::broker::EmbeddedBroker;
use fwdllm_aggregator::config::AggregatorConfig;
use fwdllm_aggregator::server::{self, BrokerTarget, Hooks};
use fwdllm_aggregator::sim;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "fwdllm-aggregator",
    version,
    about = "fwdllm aggregator: federated forward-gradient rounds over MQTT"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the aggregator (until SIGTERM/SIGINT or job.max_commits).
    Run {
        #[arg(long, default_value = "/etc/fwdllm/aggregator.toml")]
        config: PathBuf,
    },
    /// Check a config file and report every problem at once.
    Validate {
        #[arg(long, default_value = "/etc/fwdllm/aggregator.toml")]
        config: PathBuf,
    },
    /// Write the current adapter (from the state directory) as a GGUF LoRA.
    Export {
        #[arg(long, default_value = "/etc/fwdllm/aggregator.toml")]
        config: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Simulated clients against the real aggregator on an embedded broker; measures ingest.
    Sim {
        /// Number of simulated clients (each a real MQTT connection).
        #[arg(long, default_value_t = 100)]
        clients: usize,
        /// Commits to run.
        #[arg(long, default_value_t = 20)]
        commits: u64,
        /// Perturbations per client per request.
        #[arg(long, default_value_t = 4)]
        perturbations: u32,
        /// Write a JSON report here.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("info,rumqttd=warn,tracing=off"),
    )
    .init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Validate { config } => {
            let text = std::fs::read_to_string(&config)
                .with_context(|| format!("reading {}", config.display()))?;
            let cfg = AggregatorConfig::from_toml(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", config.display()))?;
            let problems = cfg.validate();
            if problems.is_empty() {
                println!("{}: ok", config.display());
                return Ok(());
            }
            for p in &problems {
                eprintln!("{}: {p}", config.display());
            }
            bail!("{} problem(s) in {}", problems.len(), config.display());
        }
        Cmd::Export { config, out } => {
            let cfg = AggregatorConfig::load(&config)?;
            let (version, weights) = fwdllm_aggregator::export::load_weights(&cfg.state.dir)
                .with_context(|| format!("loading state from {}", cfg.state.dir.display()))?;
            let n = fwdllm_aggregator::export::export_gguf(&weights, &out)?;
            println!(
                "wrote {} ({n} bytes, version {version}, hash {})",
                out.display(),
                weights.hash()
            );
            Ok(())
        }
        Cmd::Run { config } => {
            let cfg = AggregatorConfig::load(&config)?;
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(async move {
                let target = if cfg.broker.embedded {
                    let b = EmbeddedBroker::start(
                        &cfg.broker.host,
                        cfg.broker.port,
                        cfg.broker.max_packet_bytes,
                    )?;
                    println!("embedded broker on {}", b.addr());
                    BrokerTarget {
                        host: b.host(),
                        port: b.port(),
                    }
                } else {
                    BrokerTarget {
                        host: cfg.broker.host.clone(),
                        port: cfg.broker.port,
                    }
                };
                let stop = CancellationToken::new();
                let s2 = stop.clone();
                tokio::spawn(async move {
                    let mut term =
                        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                            .expect("SIGTERM handler");
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = term.recv() => {}
                    }
                    s2.cancel();
                });
                let summary = server::run(cfg, target, stop, Hooks::default()).await?;
                println!(
                    "stopped at version {} after {} rounds",
                    summary.version, summary.rounds
                );
                anyhow::Ok(())
            })
        }
        Cmd::Sim {
            clients,
            commits,
            perturbations,
            out,
        } => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(run_sim(clients, commits, perturbations, out))
        }
    }
}

async fn run_sim(
    clients: usize,
    commits: u64,
    perturbations: u32,
    out: Option<PathBuf>,
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cfg = AggregatorConfig::default();
    cfg.job.name = "sim".into();
    cfg.job.max_commits = commits;
    cfg.model.preset = "tiny".into();
    cfg.state.dir = dir.path().to_path_buf();
    cfg.state.plot_every = 0;
    cfg.round.min_clients = clients as u32;
    cfg.round.quorum = (clients as u32 / 2).max(1);
    cfg.round.perturbations_per_client = perturbations;
    cfg.round.deadline_s = 60.0;
    cfg.pacing.max_perturbations = (clients as u32 * perturbations).max(1);
    cfg.pacing.min_perturbations = cfg.pacing.max_perturbations;
    cfg.pacing.max_extends = 0;
    cfg.step.lr = 0.5;
    let broker = EmbeddedBroker::start("127.0.0.1", 0, cfg.broker.max_packet_bytes)?;
    let target = BrokerTarget {
        host: broker.host(),
        port: broker.port(),
    };
    let params = sim::SimParams {
        job: cfg.job.name.clone(),
        host: broker.host(),
        port: broker.port(),
        layout: cfg.layout().map_err(anyhow::Error::msg)?,
        noise: 0.01,
        target_seed: 7,
        max_packet_bytes: cfg.broker.max_packet_bytes,
    };
    let stats = Arc::new(sim::SimStats::default());
    let stop = CancellationToken::new();
    let handles = sim::spawn_clients(&params, "sim", clients, stats.clone(), stop.clone());
    let started = std::time::Instant::now();
    let summary = server::run(cfg, target, CancellationToken::new(), Hooks::default()).await?;
    let wall = started.elapsed().as_secs_f64();
    stop.cancel();
    for h in handles {
        let _ = h.await;
    }
    use std::sync::atomic::Ordering::Relaxed;
    let report = serde_json::json!({
        "clients": clients,
        "commits": summary.version,
        "updates": summary.ingest_updates,
        "perturbations": summary.perturbations,
        "wall_s": wall,
        "ingest_busy_s": summary.ingest_busy_s,
        "ingest_updates_per_s": summary.ingest_updates_per_s(),
        "end_to_end_updates_per_s": summary.ingest_updates as f64 / wall,
        "duplicates": summary.duplicates,
        "stale": summary.stale,
        "client_hash_mismatches": stats.hash_mismatches.load(Relaxed),
        "client_bytes_sent": stats.bytes_sent.load(Relaxed),
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    if let Some(out) = out {
        if let Some(d) = out.parent() {
            std::fs::create_dir_all(d)?;
        }
        std::fs::write(&out, serde_json::to_string_pretty(&report)? + "\n")?;
        println!("wrote {}", out.display());
    }
    Ok(())
}
