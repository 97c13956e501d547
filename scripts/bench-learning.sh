#!/usr/bin/env bash
# Issue 16's learning bench -> target/bench/learning.json and target/bench/learning_noniid.png.
#
#  1. local training (train-local, the shipped head-rows recipe) on BBC and on AG News;
#  2. federated AG News, 8 agents, IID and Dirichlet alpha = 0.1 and 0.5 shards, SEEDS seeds
#     each, stopped at an equal number of commits so a warm feature cache favours no split;
#  3. the demo configuration (BBC, 4 agents, 10 minutes), as `make demo` runs it;
#  4. learning_report gathers the reports (mean +- sd over seeds, the non-IID gap, the curves).
#
# Usage: scripts/bench-learning.sh            (about 75 minutes on 2 idle cores)
#   env: SEEDS="1 2 3"  FED_COMMITS=1500  FED_MINUTES=8  BIN_DIR=target/release
# AG News is read in place from ../shared/data/ag_news/test.csv.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${BIN_DIR:-target/release}
for b in fwdllm-agent fwdllm examples/learning_report; do
  [ -x "$bin/$b" ] || { echo "no $bin/$b: run 'make bench-learning' (it builds first)" >&2; exit 1; }
done
seeds=(${SEEDS:-1 2 3})
commits=${FED_COMMITS:-1500}
minutes=${FED_MINUTES:-8}
out=target/bench/learning
mkdir -p "$out/fed"

# Local: the recipe's own step and wall budgets; evaluation cadence only.
for task in bbc ag_news; do
  echo "== train-local $task"
  "$bin/fwdllm-agent" train-local --task "edge-agent/tasks/$task.toml" --threads 2 \
    --max-steps 6000 --max-wall-s 1500 --dev-every 100 --heldout-every 500 --no-progress \
    --out "$out/$task-local"
done

# Federated, AG News, 8 agents.
for seed in "${seeds[@]}"; do
  for split in iid dirichlet0.1 dirichlet0.5; do
    case $split in
      iid) args=(--split iid) ;;
      dirichlet*) args=(--split dirichlet --alpha "${split#dirichlet}") ;;
    esac
    echo "== bench-federation ag_news, 8 agents, $split, seed $seed"
    "$bin/fwdllm" bench-federation --task edge-agent/tasks/ag_news.toml --agents 8 "${args[@]}" \
      --seed "$seed" --max-commits "$commits" --minutes "$minutes" --curve-every 100 \
      --sim-clients 0 --out-dir "$out/fed-run" --out "$out/fed/$split-seed$seed.json"
  done
done

# The demo's configuration (what `make demo` runs), with a JSON report.
echo "== demo configuration: BBC, 4 agents, 10 minutes"
"$bin/fwdllm" bench-federation --task edge-agent/tasks/bbc.toml --agents 4 --minutes 10 \
  --sim-clients 0 --out-dir "$out/demo-run" --out "$out/demo.json"

"$bin/examples/learning_report" --bbc-local "$out/bbc-local/metrics.json" \
  --ag-news-local "$out/ag_news-local/metrics.json" --fed-dir "$out/fed" --demo "$out/demo.json" \
  --out target/bench/learning.json --png target/bench/learning_noniid.png
