//! cargo-fuzz target `agent_config`: the agent's config loader, TOML then `FWDLLM_AGENT__*`
//! overrides after a NUL (`fwdllm_bench::fuzz::agent_config_target`, the function the corpus
//! replay of `make test` runs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fwdllm_bench::fuzz::agent_config_target(data));
