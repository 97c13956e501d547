# The front door. Every target does its own set-up first, so a fresh Debian 12 machine
# with the Rust toolchain needs nothing else: `make demo`, `make test`, `make bench`.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: setup demo test lint bench deb cross clean-cache

setup:
	@bash scripts/setup.sh

demo: setup
	$(CARGO) run --release -p fwdllm-aggregator --features engine --bin fwdllm -- demo

lint: setup
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --all-features -- -D warnings

test: lint
	$(CARGO) test --workspace --all-features

bench: setup
	@mkdir -p target/bench
	$(CARGO) run --release -p fwdllm-shared --example wire_bench -- --out target/bench/wire.json
	$(CARGO) run --release -p fwdllm-shared --example perturb_bench -- --out target/bench/perturb.json
	$(CARGO) run --release -p fwdllm-agent -- train-local --check-quantized --out target/train-local
	$(CARGO) run --release -p fwdllm-agent -- bench-engine --out target/bench/engine.json
	$(CARGO) run --release -p fwdllm-aggregator --features engine --bin fwdllm -- bench-federation --out target/bench/federation.json

deb: setup
	bash cross/build.sh amd64

cross: setup
	bash cross/build.sh arm64

clean-cache:
	rm -rf .cache
