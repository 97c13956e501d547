//! cargo-fuzz target `wire`: the wire decoder, every binary kind, the kind peek and the JSON
//! messages (`fwdllm_bench::fuzz::wire_target`, the function the corpus replay of `make test`
//! runs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fwdllm_bench::fuzz::wire_target(data));
