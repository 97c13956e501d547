//! `fwdllm-bench`: the aggregator-side benches that need no model. `sim` runs simulated
//! clients against the real aggregator on an embedded (or external) broker and measures
//! ingest; `scale` is the fleet-scale bench (`make scale`, `scale.json`). Both were
//! subcommands of `fwdllm-aggregator` before the daemon was left alone in its crate.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fwdllm_frontdoor::sim;

#[derive(Parser)]
#[command(
    name = "fwdllm-bench",
    version,
    about = "fwdllm benches: simulated-client ingest and fleet scale"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
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
        /// The `fwdllm-aggregator` executable whose `broker` subcommand runs the embedded broker
        /// in its own process (default: the one next to this executable).
        #[arg(long)]
        aggregator_bin: Option<PathBuf>,
    },
}

/// `name` in the directory of this executable (cargo puts every binary of a build there).
fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating this executable")?;
    Ok(exe
        .parent()
        .context("locating the build directory")?
        .join(name))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The scale bench's embedded broker logs every one of thousands of disconnects at error
    // level when its fleet stops: quiet rumqttd unless RUST_LOG says otherwise.
    if matches!(cli.cmd, Cmd::Scale { .. }) && std::env::var_os("RUST_LOG").is_none() {
        std::env::set_var("RUST_LOG", "info,rumqttd=off");
    }
    fwdllm_shared::service::init_logging(log::LevelFilter::Info);
    match cli.cmd {
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
            aggregator_bin,
        } => {
            if let Some(report) = replot {
                let text = std::fs::read_to_string(&report)
                    .with_context(|| format!("reading {}", report.display()))?;
                let v: serde_json::Value = serde_json::from_str(&text)?;
                let png = out.unwrap_or(report).with_extension("png");
                fwdllm_bench::scale::plot(&v, &png)
                    .map_err(|e| anyhow::anyhow!("plotting {}: {e}", png.display()))?;
                println!("wrote {}", png.display());
                return Ok(());
            }
            let opts = fwdllm_bench::scale::ScaleOptions {
                clients,
                embedded,
                headline,
                updates_per_run: updates,
                ceiling_messages,
                mosquitto,
                bridge_clients,
                workers,
                broker_exe: Some(match aggregator_bin {
                    Some(b) => b,
                    None => sibling("fwdllm-aggregator")?,
                }),
                ..Default::default()
            };
            let report = fwdllm_bench::scale::run(&opts).context("scale bench")?;
            let text = serde_json::to_string_pretty(&report)? + "\n";
            println!("{text}");
            if let Some(out) = out {
                if let Some(d) = out.parent() {
                    std::fs::create_dir_all(d)?;
                }
                std::fs::write(&out, text).with_context(|| format!("writing {}", out.display()))?;
                println!("wrote {}", out.display());
                let png = out.with_extension("png");
                match fwdllm_bench::scale::plot(&report, &png) {
                    Ok(()) => println!("wrote {}", png.display()),
                    Err(e) => eprintln!("plotting {}: {e}", png.display()),
                }
            }
            Ok(())
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
