#!/usr/bin/env bash
# The session step of cross/smoke-arm64.sh (called by it; not meant to run alone):
# mosquitto on 127.0.0.1, the native aggregator asking for ONE perturbation, the arm64
# agent under qemu computing it with SmolLM2 on one short example. Passes when the
# aggregator commits that round, the agent's retained status was seen, and after SIGTERM
# the retained status says "offline".
#   smoke-session.sh QEMU AGENT_BIN AGENT_CONFIG TMPDIR
set -euo pipefail
qemu="$1" bin="$2" config="$3" tmp="$4"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
log() { echo "smoke-session: $*" >&2; }
fail() { log "FAIL: $*"; exit 1; }
# Safety nets only (a hung emulated run must not hang CI); nothing is judged by time.
limit=${FWDLLM_SMOKE_LIMIT_S:-1800}

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

# Native aggregator (x86_64): built here if `make deb` has not built it already.
agg="$CARGO_TARGET_DIR/release/fwdllm-aggregator"
if [ ! -x "$agg" ]; then
  (cd "$root" && cargo build --release -p fwdllm-aggregator --bin fwdllm-aggregator >&2)
fi

# mosquitto on a free loopback port, nothing else reachable.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$tmp/mosquitto.conf" <<EOF
listener $port 127.0.0.1
allow_anonymous true
persistence false
log_dest stderr
EOF
/usr/sbin/mosquitto -c "$tmp/mosquitto.conf" 2>"$tmp/mosquitto.log" &
pids+=($!)
for _ in $(seq 100); do
  mosquitto_sub -h 127.0.0.1 -p "$port" -t '$SYS/broker/version' -C 1 -W 1 >/dev/null 2>&1 && break
done

job=smoke
mkdir -p "$tmp/agg-state"
cat > "$tmp/aggregator.toml" <<EOF
[job]
name = "$job"
max_commits = 1
[broker]
embedded = false
host = "127.0.0.1"
port = $port
[model]
gguf = "$root/.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
[round]
perturbations_per_client = 1
deadline_s = $limit
quorum = 1
min_clients = 1
[pacing]
min_perturbations = 1
max_perturbations = 1
max_extends = 0
[task]
batch_size = 1
max_tokens = 32
[state]
dir = "$tmp/agg-state"
EOF
"$agg" validate --config "$tmp/aggregator.toml" >&2 || fail "aggregator rejected the smoke config"

export FWDLLM_AGENT__AGENT__CLIENT_ID=smoke-arm64
export FWDLLM_AGENT__AGENT__JOB=$job
export FWDLLM_AGENT__MQTT__HOST=127.0.0.1
export FWDLLM_AGENT__MQTT__PORT=$port
export FWDLLM_AGENT__GRADIENT__SOURCE=engine
export FWDLLM_AGENT__TELEMETRY__INTERVAL_S=0
"$qemu" "$bin" run --config "$config" 2>"$tmp/agent.log" &
agent=$!
pids+=($agent)

status_topic="fwdllm/v1/$job/status/smoke-arm64"
# The agent's retained status, once it is connected (online or busy, not offline).
status=$(mosquitto_sub -h 127.0.0.1 -p "$port" -t "$status_topic" -C 1 -W "$limit" 2>/dev/null) ||
  { tail -n 30 "$tmp/agent.log" >&2; fail "no retained status on $status_topic"; }
log "retained status: $status"
grep -q '"offline"' <<<"$status" && fail "agent reported offline before doing any work"

# One round with one perturbation: the aggregator exits after max_commits = 1.
timeout "$limit" "$agg" run --config "$tmp/aggregator.toml" >"$tmp/agg.out" 2>"$tmp/agg.log" ||
  { tail -n 30 "$tmp/agg.log" "$tmp/agent.log" >&2; fail "aggregator did not commit the round"; }
log "aggregator: $(tail -n 1 "$tmp/agg.out")"
grep -q "after 1 rounds\|version 1" "$tmp/agg.out" || fail "aggregator stopped without a commit: $(cat "$tmp/agg.out")"

kill -TERM "$agent"
wait "$agent" || fail "agent exited $? on SIGTERM"
status=$(mosquitto_sub -h 127.0.0.1 -p "$port" -t "$status_topic" -C 1 -W 10 2>/dev/null) || fail "no status after shutdown"
log "retained status after SIGTERM: $status"
grep -q '"offline"' <<<"$status" || fail "status after SIGTERM is not offline"
log "agent log (last lines):"
tail -n 12 "$tmp/agent.log" >&2
