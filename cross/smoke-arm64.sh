#!/usr/bin/env bash
# Smoke test of the arm64 agent package on this x86_64 machine, under qemu user-mode
# emulation (run `cross/build.sh arm64` first; `make cross` does both):
#   1. the packaged binary is an AArch64 ELF and `--version` runs;
#   2. `validate` accepts the packaged example config (pointed at this machine's model);
#   3. if the binary has `run`: a short real session against mosquitto on 127.0.0.1 —
#      connect, retained "online" status, one perturbation on one short example with
#      SmolLM2 (driven by the native aggregator), then SIGTERM -> retained "offline".
#
# qemu runs WITHOUT -L: the binary's interpreter /lib/ld-linux-aarch64.so.1 and its
# libraries come from the multiarch libc6/libstdc++6:arm64 packages cross/build.sh
# installs, i.e. the same loader/libc pair a board has. (-L /usr/aarch64-linux-gnu mixes
# the cross toolchain's libc with that loader and hangs threaded programs.)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}"
log() { echo "smoke-arm64: $*" >&2; }
fail() { log "FAIL: $*"; exit 1; }

deb=$(ls -t cross/out/arm64/fwdllm-agent_*_arm64.deb 2>/dev/null | head -n1 || true)
[ -n "$deb" ] || fail "no cross/out/arm64/fwdllm-agent_*_arm64.deb; run cross/build.sh arm64 first"
model="$root/.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
qemu=qemu-aarch64-static
command -v "$qemu" >/dev/null || fail "$qemu missing (apt-get install qemu-user-static)"
[ -e /lib/ld-linux-aarch64.so.1 ] || fail "no arm64 loader; apt-get install libc6:arm64 libstdc++6:arm64 (cross/build.sh does)"

tmp=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT

dpkg-deb -x "$deb" "$tmp/root"
bin="$tmp/root/usr/bin/fwdllm-agent"
config="$tmp/root/etc/fwdllm/agent.toml"
readelf -h "$bin" | grep -q 'Machine:.*AArch64' || fail "$bin is not an AArch64 binary"
log "package $deb"

# 1. --version
version=$("$qemu" "$bin" --version) || fail "--version exited $?"
log "--version: $version"
[[ "$version" == fwdllm-agent* ]] || fail "unexpected --version output: $version"

# 2. validate the packaged example with this machine's paths (env overrides, as an
#    operator's drop-in would set them).
mkdir -p "$tmp/state"
printf '{"text": "Shares rose as the central bank held interest rates.", "label": "business"}\n' > "$tmp/shard.jsonl"
export FWDLLM_AGENT__AGENT__STATE_DIR="$tmp/state"
export FWDLLM_AGENT__ENGINE__MODEL="$model"
export FWDLLM_AGENT__ENGINE__SHARD="$tmp/shard.jsonl"
export FWDLLM_AGENT__ENGINE__TASK="$tmp/root/etc/fwdllm/task.toml" # the packaged default
export FWDLLM_AGENT__ENGINE__THREADS=2
"$qemu" "$bin" validate --config "$config" >&2 || fail "validate rejected the packaged example config"
log "validate: ok"

# 3. a short session, once the daemon exists in this build.
if ! "$qemu" "$bin" run --help >/dev/null 2>&1; then
  log "this build has no 'run' subcommand yet; session step skipped"
  log "PASS (version, validate)"
  exit 0
fi
bash "$root/cross/smoke-session.sh" "$qemu" "$bin" "$config" "$tmp"
log "PASS (version, validate, session)"
