//! The real `fwdllm-agent` entry point (`fwdllm_agent::app::main`), built inside this package
//! so that tests/tests/deploy_notify.rs can start it through `CARGO_BIN_EXE_*` (Cargo exposes
//! only the binaries of the test's own package).

fn main() -> anyhow::Result<()> {
    fwdllm_agent::app::main()
}
