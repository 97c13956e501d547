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

# One build for every bench binary: separate `cargo run -p` calls resolve different feature sets
# and rebuild shared dependencies between steps. Takes about an hour (the local training run
# alone is 30 minutes); run it on an otherwise idle machine, since llama.cpp's threads spin.
bench: setup
	@mkdir -p target/bench
	$(CARGO) build --release -p fwdllm-shared -p fwdllm-agent -p fwdllm-aggregator --features fwdllm-aggregator/engine --bins --examples
	target/release/examples/wire_bench --out target/bench/wire.json
	target/release/examples/perturb_bench --out target/bench/perturb.json
	target/release/fwdllm-agent train-local --max-wall-s 1800 --dev-every 20 --heldout-every 40 --check-quantized --no-progress --out target/train-local
	target/release/fwdllm-agent bench-engine --out target/bench/engine.json
	target/release/fwdllm bench-federation --out target/bench/federation.json

deb: setup
	bash cross/build.sh amd64

# arm64 packages, then the qemu smoke test of the agent package (about 12 minutes cold on 2 idle cores).
cross: setup
	bash cross/build.sh arm64
	bash cross/smoke-arm64.sh

clean-cache:
	rm -rf .cache
