//! cargo-fuzz target `gguf`: the GGUF reader, whole file and header only, then the adapter head
//! and every tensor (`fwdllm_bench::fuzz::gguf_target`, the function the corpus replay of
//! `make test` runs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| fwdllm_bench::fuzz::gguf_target(data));
