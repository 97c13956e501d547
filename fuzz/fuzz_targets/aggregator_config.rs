//! cargo-fuzz target `aggregator_config`: the aggregator's TOML config, parsed then validated
//! (`fwdllm_bench::fuzz::aggregator_config_target`, the function the corpus replay of
//! `make test` runs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fwdllm_bench::fuzz::aggregator_config_target(data));
