//! `fwdllm-aggregator`: run / validate / export / broker (the benches' `sim` and `scale` are
//! `fwdllm-bench`, in `tests/bench`).

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use fwdllm_aggregator::broker::EmbeddedBroker;
use fwdllm_aggregator::config::AggregatorConfig;
use fwdllm_aggregator::server::{self, BrokerTarget, Hooks};

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
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The standalone broker's tracing spans log every packet at error level (and, under the
    // scale bench, every one of thousands of disconnects): quiet rumqttd unless RUST_LOG says
    // otherwise.
    if matches!(cli.cmd, Cmd::Broker { .. }) && std::env::var_os("RUST_LOG").is_none() {
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
        Cmd::Broker {
            host,
            port,
            max_packet_bytes,
        } => {
            // One descriptor per board: as many as the hard limit allows.
            if let Err(e) = fwdllm_aggregator::broker::raise_fd_limit() {
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
    }
}
