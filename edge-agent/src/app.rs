//! The `fwdllm-agent` command line. Lives in the library so that the end-to-end suites can
//! build a binary with exactly this entry point (`tests/src/bin/fwdllm-agent-under-test.rs`)
//! and drive the real daemon under a fake service manager.

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    name = "fwdllm-agent",
    version,
    about = "fwdllm edge agent: forward-gradient LoRA fine-tuning on llama.cpp, federated over MQTT"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Run the federated agent daemon (systemd service `fwdllm-agent`).
    Run {
        /// Agent config (TOML; see systemd/fwdllm-agent.toml).
        #[arg(long, default_value = "/etc/fwdllm/agent.toml")]
        config: std::path::PathBuf,
    },
    /// Check an agent config: reports every problem with its key and fix; exit status 1 on any.
    Validate {
        #[arg(long, default_value = "/etc/fwdllm/agent.toml")]
        config: std::path::PathBuf,
    },
    #[command(flatten)]
    Engine(crate::cli::EngineCommand),
}

/// Parses the process arguments and runs the chosen subcommand.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => crate::daemon::cli::run(&config),
        Command::Validate { config } => crate::daemon::cli::validate(&config),
        Command::Engine(cmd) => cmd.run(),
    }
}
