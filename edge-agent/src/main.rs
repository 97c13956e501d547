//! `fwdllm-agent`: the edge daemon and its tools.

use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "fwdllm-agent", version, about = "fwdllm edge agent: forward-gradient LoRA fine-tuning on llama.cpp, federated over MQTT")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    #[command(flatten)]
    Engine(fwdllm_agent::cli::EngineCommand),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Engine(cmd) => cmd.run(),
    }
}
