//! Engine subcommands of `fwdllm-agent` (prepare, eval, calibrate, train-local, bench-engine, shard).

/// Engine subcommands; flattened into the top-level CLI.
#[derive(Debug, clap::Subcommand)]
pub enum EngineCommand {}

impl EngineCommand {
    /// Runs the subcommand.
    pub fn run(self) -> anyhow::Result<()> {
        match self {}
    }
}
