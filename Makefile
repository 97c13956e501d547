# The front door. Every target does its own set-up first, so a fresh Debian 12 machine
# with the Rust toolchain needs nothing else: `make demo`, `make test`, `make bench`.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: setup demo test lint bench bench-learning bench-recipes bench-deep fuzz chaos deb cross clean-cache

setup:
	@bash scripts/setup.sh

# One release build (one feature set, so one llama.cpp build) for demo and bench alike:
# separate `cargo run -p` calls resolve different feature sets and rebuild shared dependencies.
# The daemons, the front door `fwdllm` (aggregator/frontdoor) and the benches (tests/bench).
RELEASE_BUILD = $(CARGO) build --release -p fwdllm-shared -p fwdllm-agent -p fwdllm-aggregator -p fwdllm -p fwdllm-bench --bins --examples

# The demo builds its one binary with the lighter `lean` profile (Cargo.toml says why).
demo: setup
	$(CARGO) build --profile lean -p fwdllm --bin fwdllm
	target/lean/fwdllm demo

lint: setup
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --all-features -- -D warnings

test: lint
	$(CARGO) test --workspace --all-features

# Takes about half an hour; run it on an otherwise idle machine, since llama.cpp's threads spin.
# The fuzzers have their own target (`make fuzz`, 10 minutes per target).
bench: setup
	@mkdir -p target/bench
	$(RELEASE_BUILD)
	target/release/examples/wire_bench --out target/bench/wire.json
	target/release/examples/perturb_bench --out target/bench/perturb.json
	target/release/fwdllm-agent train-local --threads 2 --max-steps 2000 --max-wall-s 900 --dev-every 20 --heldout-every 10 --no-prefix-cache-disk --check-quantized --no-progress --out target/train-local
	target/release/fwdllm-agent bench-engine --threads 2 --out target/bench/engine.json
	target/release/fwdllm bench-federation --out target/bench/federation.json
	target/release/fwdllm-bench scale --out target/bench/scale.json

# Fleet scale alone: 100 / 1,000 / 10,000 simulated MQTT clients through mosquitto (1,000 also
# with 2 and 4 ingest workers) and through the embedded broker (in its own process), end-to-end
# ingest against mosquitto's own QoS-1 ceiling measured in the same run, a bridged site broker
# -> target/bench/scale.json (about a minute on an idle machine; raises its own open-file limit).
.PHONY: scale
scale: setup
	@mkdir -p target/bench
	$(RELEASE_BUILD)
	target/release/fwdllm-bench scale --out target/bench/scale.json

# Issue 16's learning figures: local BBC and AG News, federated AG News with 8 agents on IID and
# Dirichlet shards (3 seeds), the demo configuration, federated SFT on the headline task ->
# target/bench/learning.json and learning_noniid.png. About 75 minutes on 2 idle cores and 11 for SFT (scripts/bench-learning.sh says how to
# shorten it).
bench-learning: setup
	@mkdir -p target/bench
	$(RELEASE_BUILD)
	bash scripts/bench-learning.sh

# Issue 16's recipe sweep: layout x estimator on BBC and AG News at an equal wall budget ->
# target/bench/recipes.json and recipes.png (32 minutes on 2 idle cores, 2026-12-05).
bench-recipes: setup
	@mkdir -p target/bench
	$(RELEASE_BUILD)
	bash scripts/bench-recipes.sh

# Issue 24's local SFT figures with the norm-gain recipe -> target/bench/deep.json (about 70
# minutes on 2 idle cores; scripts/bench-deep.sh says what each key is).
bench-deep: setup
	@mkdir -p target/bench
	$(RELEASE_BUILD)
	bash scripts/bench-deep.sh

# cargo-fuzz (nightly, libFuzzer, coverage-guided): the wire decoder, the update ingest, the GGUF
# reader and both config loaders, FUZZ_SECONDS each (default 600) -> target/bench/fuzz.json
# (executions, coverage, crashes; crash inputs in target/bench/fuzz-crashes/). `make test`
# replays the committed corpus (fuzz/corpus/) through the same target functions.
FUZZ_SECONDS ?= 600
fuzz: setup
	@mkdir -p target/bench
	$(CARGO) build -p fwdllm-bench --bin fuzz_report
	FUZZ_SECONDS=$(FUZZ_SECONDS) BIN_DIR=target/debug bash scripts/fuzz.sh

# Chaos bench: agents SIGKILLed mid-round and at commits, mosquitto restarted mid-round, the
# aggregator SIGKILLed at random points and SIGTERMed with a round open, every update delivered
# twice (synthetic gradients, real processes; each scenario with seeds 1-5, about 14 minutes),
# then the real model clean / with 20 % Byzantine clients (about 9 minutes) -> target/bench/chaos.json. Fails unless
# nothing was lost or doubled in any run, every replica hash matched and the Byzantine runs with
# robust aggregation ended within 3 points of the clean one.
chaos: setup
	@mkdir -p target/bench
	$(RELEASE_BUILD)
	target/release/chaos --out target/bench/chaos.json

deb: setup
	bash cross/build.sh amd64

# arm64 packages, then the qemu smoke test of the agent package (about 12 minutes cold on 2 idle cores).
cross: setup
	bash cross/build.sh arm64
	bash cross/smoke-arm64.sh

clean-cache:
	rm -rf .cache
