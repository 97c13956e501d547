//! The `run` and `validate` subcommands of `fwdllm-agent` (kept here so `main.rs` stays a thin
//! dispatcher).

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use fwdllm_shared::service;
use tokio_util::sync::CancellationToken;

use super::{Agent, EngineSource, GradientSource, SyntheticSource};
use crate::config::{AgentConfig, SourceKind};

/// Loads and validates the config at `path`, then checks the files `run` needs; every problem
/// at once.
fn load_checked(path: &Path) -> anyhow::Result<AgentConfig> {
    let config = AgentConfig::load(path)?;
    let problems = config.check_files();
    if !problems.is_empty() {
        let list: Vec<String> = problems.iter().map(|p| format!("  - {p}")).collect();
        bail!(
            "config {} has {} problem(s):\n{}",
            path.display(),
            problems.len(),
            list.join("\n")
        );
    }
    Ok(config)
}

/// `fwdllm-agent validate --config FILE`: prints every problem (key, problem, fix), exit 1 on any.
pub fn validate(path: &Path) -> anyhow::Result<()> {
    let config = load_checked(path)?;
    println!(
        "{}: OK (client id {}, job {}, broker {}:{})",
        path.display(),
        config.client_id(),
        config.agent.job,
        config.mqtt.host,
        config.mqtt.port
    );
    Ok(())
}

/// `fwdllm-agent run --config FILE`: the daemon, until SIGTERM/SIGINT.
pub fn run(path: &Path) -> anyhow::Result<()> {
    service::init_logging(log::LevelFilter::Info);
    let config = load_checked(path)?;
    let source: Box<dyn GradientSource + Send> = match config.gradient.source {
        SourceKind::Synthetic => Box::new(
            SyntheticSource::new(
                config.gradient.synthetic_target_seed,
                config.gradient.synthetic_target_scale,
            )
            .hang_at_round(config.gradient.synthetic_hang_at_round),
        ),
        SourceKind::Engine => {
            if config.agent.systemd_notify {
                // Converting a model on first start can outlast TimeoutStartSec on a small board.
                service::notify_extend_timeout(Duration::from_secs(600));
            }
            Box::new(EngineSource::from_config(&config).context("loading the engine")?)
        }
    };
    let agent = Agent::new(config, source)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let stop = CancellationToken::new();
    let result = runtime.block_on(async {
        let signal_stop = stop.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            log::info!("termination signal: shutting down");
            signal_stop.cancel();
        });
        agent.run(stop).await
    });
    // A perturbation abandoned at shutdown may still be running on a blocking thread; don't wait
    // for it.
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(result?)
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
