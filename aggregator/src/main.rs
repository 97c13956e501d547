//! `fwdllm-aggregator`: run / validate / export / sim / scale.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use fwdllm_aggregator::broker::EmbeddedBroker;
use fwdllm_aggregator::config::AggregatorConfig;
use fwdllm_aggregator::server::{self, BrokerTarget, Hooks};
use fwdllm_aggregator::sim;

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
        /// Export the last version even when model selection recorded a better one on dev.
        #[arg(long)]
        last: bool,
    },
    /// Run only the embedded broker (rumqttd with the aggregator's settings, loopback only)
    /// until SIGTERM/SIGINT: a site without mosquitto, and the scale bench's embedded runs.
    Broker {
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        #[arg(long, default_value_t = 1883)]
        port: u16,
        /// The largest MQTT packet accepted (it must hold a full checkpoint).
        #[arg(long, default_value_t = 64 << 20)]
        max_packet_bytes: usize,
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
        /// An external broker (`host:port`, e.g. mosquitto) instead of the embedded one.
        #[arg(long)]
        broker: Option<String>,
    },
    /// Fleet-scale bench: 100 / 1,000 / 10,000 simulated clients through mosquitto (and the
    /// embedded broker), end-to-end ingest against mosquitto's own QoS-1 ceiling (scale.json).
    Scale {
        /// Client counts run through mosquitto (comma-separated; `--clients` alone = none).
        #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "100,1000,10000")]
        clients: Vec<usize>,
        /// Client counts also run through the embedded broker (comma-separated; `--embedded`
        /// alone = none).
        #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "100,1000,10000")]
        embedded: Vec<usize>,
        /// The client count of the headline figure and of the ceiling's publishers.
        #[arg(long, default_value_t = 1000)]
        headline: usize,
        /// Updates per run (rounds = this / clients, at least 3).
        #[arg(long, default_value_t = 60_000)]
        updates: usize,
        /// Messages of the broker-ceiling measurement.
        #[arg(long, default_value_t = 100_000)]
        ceiling_messages: usize,
        /// The mosquitto binary.
        #[arg(long, default_value = "/usr/sbin/mosquitto")]
        mosquitto: PathBuf,
        /// Simulated clients of the bridged-broker run (0 = skip it).
        #[arg(long, default_value_t = 50)]
        bridge_clients: usize,
        /// Ingest worker counts (`[ingest] workers`) run at the headline client count through
        /// mosquitto (comma-separated); the other runs use 1.
        #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
        workers: Vec<u32>,
        /// Run nothing: redraw the PNG of an existing report (written next to --out).
        #[arg(long)]
        replot: Option<PathBuf>,
        /// Write the JSON report here.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The scale bench's embedded broker logs every one of thousands of disconnects at error
    // level when its fleet stops: quiet rumqttd unless RUST_LOG says otherwise.
    // So does the standalone broker, whose tracing spans log every packet at error level.
    if matches!(cli.cmd, Cmd::Scale { .. } | Cmd::Broker { .. })
        && std::env::var_os("RUST_LOG").is_none()
    {
        std::env::set_var("RUST_LOG", "info,rumqttd=off");
    }
    fwdllm_shared::service::init_logging(log::LevelFilter::Info);
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
        Cmd::Export { config, out, last } => {
            let cfg = AggregatorConfig::load(&config)?;
            let (version, weights, best) =
                fwdllm_aggregator::export::load_for_export(&cfg.state.dir, last).map_err(|e| {
                    anyhow::anyhow!("loading state from {}: {e}", cfg.state.dir.display())
                })?;
            let n = fwdllm_aggregator::export::export_gguf(&weights, &out)?;
            println!(
                "wrote {} ({n} bytes, version {version}{}, hash {})",
                out.display(),
                best.map(|b| format!(", best on dev: accuracy {:.4}", b.dev_accuracy))
                    .unwrap_or_default(),
                weights.hash()
            );
            Ok(())
        }
        Cmd::Run { config } => {
            let cfg = AggregatorConfig::load(&config)?;
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(async move {
                let target = if cfg.broker.embedded {
                    let users = fwdllm_aggregator::security::embedded_users(&cfg.broker)?;
                    let b = EmbeddedBroker::start_with_users(
                        &cfg.broker.host,
                        cfg.broker.port,
                        cfg.broker.max_packet_bytes,
                        users,
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
                let stop = server::shutdown_on_signals();
                let summary = server::run(cfg, target, stop, Hooks::default()).await?;
                println!(
                    "stopped at version {} after {} rounds",
                    summary.version, summary.rounds
                );
                anyhow::Ok(())
            })
        }
        Cmd::Scale {
            clients,
            embedded,
            headline,
            updates,
            ceiling_messages,
            mosquitto,
            bridge_clients,
            workers,
            replot,
            out,
        } => {
            if let Some(report) = replot {
                let text = std::fs::read_to_string(&report)
                    .with_context(|| format!("reading {}", report.display()))?;
                let v: serde_json::Value = serde_json::from_str(&text)?;
                let png = out.unwrap_or(report).with_extension("png");
                fwdllm_aggregator::scale::plot(&v, &png)
                    .map_err(|e| anyhow::anyhow!("plotting {}: {e}", png.display()))?;
                println!("wrote {}", png.display());
                return Ok(());
            }
            let opts = fwdllm_aggregator::scale::ScaleOptions {
                clients,
                embedded,
                headline,
                updates_per_run: updates,
                ceiling_messages,
                mosquitto,
                bridge_clients,
                workers,
                broker_exe: Some(std::env::current_exe().context("locating this executable")?),
                ..Default::default()
            };
            let report = fwdllm_aggregator::scale::run(&opts).context("scale bench")?;
            let text = serde_json::to_string_pretty(&report)? + "\n";
            println!("{text}");
            if let Some(out) = out {
                if let Some(d) = out.parent() {
                    std::fs::create_dir_all(d)?;
                }
                std::fs::write(&out, text).with_context(|| format!("writing {}", out.display()))?;
                println!("wrote {}", out.display());
                let png = out.with_extension("png");
                match fwdllm_aggregator::scale::plot(&report, &png) {
                    Ok(()) => println!("wrote {}", png.display()),
                    Err(e) => eprintln!("plotting {}: {e}", png.display()),
                }
            }
            Ok(())
        }
        Cmd::Broker {
            host,
            port,
            max_packet_bytes,
        } => {
            // One descriptor per board: as many as the hard limit allows.
            if let Err(e) = fwdllm_aggregator::scale::raise_fd_limit() {
                log::warn!("raising the open-file limit: {e}");
            }
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(async move {
                let b = EmbeddedBroker::start(&host, port, max_packet_bytes)
                    .with_context(|| format!("starting the embedded broker on {host}:{port}"))?;
                println!("embedded broker on {}", b.addr());
                server::shutdown_on_signals().cancelled().await;
                anyhow::Ok(())
            })
        }
        Cmd::Sim {
            clients,
            commits,
            perturbations,
            out,
            broker,
        } => {
            let broker = broker
                .map(|b| -> anyhow::Result<(String, u16)> {
                    let (host, port) = b.rsplit_once(':').with_context(|| {
                        format!("--broker {b:?}: expected host:port, e.g. 127.0.0.1:1883")
                    })?;
                    let port = port.parse().with_context(|| {
                        format!("--broker {b:?}: port {port:?} is not a number")
                    })?;
                    Ok((host.to_string(), port))
                })
                .transpose()?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let report = sim::bench(clients, commits, perturbations, broker).await?;
                println!("{}", serde_json::to_string_pretty(&report)?);
                if let Some(out) = out {
                    if let Some(d) = out.parent() {
                        std::fs::create_dir_all(d)?;
                    }
                    std::fs::write(&out, serde_json::to_string_pretty(&report)? + "\n")?;
                    println!("wrote {}", out.display());
                }
                anyhow::Ok(())
            })
        }
    }
}
