# The front door. Every target does its own set-up first, so a fresh Debian 12 machine
# with the Rust toolchain needs nothing else: `make demo`, `make test`, `make bench`.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: setup demo test lint bench deb cross clean-cache

setup:
	@bash scripts/setup.sh

demo: setup
	$(CARGO) run --release -p fwdllm-agent --bin fwdllm-agent -- --version

lint: setup
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --all-features -- -D warnings

test: lint
	$(CARGO) test --workspace --all-features

bench: setup
	@mkdir -p target/bench
	$(CARGO) run --release -p fwdllm-shared --example wire_bench -- --out target/bench/wire.json

deb: setup
	bash cross/build.sh amd64

cross: setup
	bash cross/build.sh arm64

clean-cache:
	rm -rf .cache
