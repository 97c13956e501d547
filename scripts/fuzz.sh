#!/usr/bin/env bash
# `make fuzz`: every cargo-fuzz target of fuzz/ coverage-guided (libFuzzer) for FUZZ_SECONDS
# (default 600) -> target/bench/fuzz.json (executions, coverage, crashes, read from libFuzzer's
# output by the `fuzz_report` bench binary). Needs the nightly toolchain; cargo-fuzz is
# installed into .cache/tools when missing. Environment:
#   FUZZ_SECONDS   seconds per target (default 600)
#   FUZZ_TARGETS   which targets (default: all five)
#   FUZZ_JOBS      targets fuzzed at once, one core each (default: nproc)
#   BIN_DIR        where `make fuzz` built fuzz_report (default target/release)
# New corpus units go to target/fuzz/corpus/<target>/, never into the committed fuzz/corpus/
# (libFuzzer writes to its first corpus directory only); crash inputs to
# target/bench/fuzz-crashes/<target>/. Add a crash input to fuzz/corpus/<target>/ once fixed:
# `make test` replays it (tests/bench/tests/fuzz_corpus.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${FUZZ_SECONDS:-600}
read -r -a targets <<< "${FUZZ_TARGETS:-wire ingest gguf aggregator_config agent_config}"
bin=${BIN_DIR:-target/release}
work=target/fuzz
crashes=target/bench/fuzz-crashes
[ -x "$bin/fuzz_report" ] || { echo "no $bin/fuzz_report: run 'make fuzz' (it builds first)" >&2; exit 1; }
# cargo-fuzz itself is installed into the clone's ignored .cache/ on first use (a minute or two
# of compiling), so `make fuzz` needs only the nightly toolchain.
tools=.cache/tools
export PATH="$PWD/$tools/bin:$PATH"
rustup run nightly rustc --version >/dev/null 2>&1 || {
  echo "the nightly toolchain is needed for cargo-fuzz (libFuzzer): rustup toolchain install nightly" >&2
  exit 1
}
cargo +nightly fuzz --version >/dev/null 2>&1 || {
  echo "installing cargo-fuzz into $tools"
  cargo install --locked --root "$tools" cargo-fuzz
}
mkdir -p "$work/logs" "$crashes" target/bench
# No sanitizer: the targets are safe Rust (the engine's FFI is not reached), and AddressSanitizer
# would halve the executions; panics, aborts and overflow checks are what libFuzzer catches.
fuzz=(cargo +nightly fuzz run --sanitizer none --target-dir "$work/build")
cargo +nightly fuzz build --sanitizer none --target-dir "$work/build"
fuzz_one() {
  local t=$1
  mkdir -p "$work/corpus/$t" "$crashes/$t"
  # The config loaders also start from the shipped example configs, as the replay does.
  case "$t" in
    aggregator_config) cp systemd/fwdllm-aggregator.toml "$work/corpus/$t/shipped.toml" ;;
    agent_config) cp systemd/fwdllm-agent.toml "$work/corpus/$t/shipped.toml" ;;
  esac
  echo "fuzzing $t for ${seconds}s"
  # A crash ends the run early with a non-zero status; the report counts it and fails after
  # every target has had its turn.
  "${fuzz[@]}" "$t" "$work/corpus/$t" "fuzz/corpus/$t" -- \
    -max_total_time="$seconds" -artifact_prefix="$crashes/$t/" -print_final_stats=1 \
    >"$work/logs/$t.log" 2>&1 || echo "$t stopped early (see $work/logs/$t.log)"
  tail -n 3 "$work/logs/$t.log"
}
# One libFuzzer process is one thread: FUZZ_JOBS targets at a time (default: one per core), each
# with a core of its own, so every target still gets FUZZ_SECONDS of a whole core.
jobs=${FUZZ_JOBS:-$(nproc)}
for t in "${targets[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n || true; done
  fuzz_one "$t" &
done
wait
"$bin/fuzz_report" --logs "$work/logs" --crashes "$crashes" --seconds "$seconds" --out target/bench/fuzz.json
