//! cargo-fuzz target `ingest`: the aggregator's update ingest on a fresh coordinator, so a
//! crash replays from its input alone (`fwdllm_bench::fuzz::ingest_target`, the function the
//! corpus replay of `make test` runs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fwdllm_bench::fuzz::ingest_target(data));
