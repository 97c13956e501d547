//! `fwdllm-agent`: the edge daemon and its tools (see `fwdllm_agent::app`).

fn main() -> anyhow::Result<()> {
    fwdllm_agent::app::main()
}
