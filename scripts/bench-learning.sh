#!/usr/bin/env bash
# Issue 16's learning bench -> target/bench/learning.json and target/bench/learning_noniid.png.
#
#  1. local training (train-local, the shipped head-rows recipe) on BBC and on AG News;
#  2. federated AG News, 8 agents, IID and Dirichlet alpha = 0.1 and 0.5 shards, SEEDS seeds
#     each, stopped at an equal number of commits so a warm feature cache favours no split;
#  3. the demo configuration (BBC, 4 agents, 10 minutes), as `make demo` runs it;
#  4. federated instruction tuning: the headline task, 8 agents, SFT_MINUTES (10) minutes, 4
#     directions per agent per round (a round's prefix pass over the agent's new batch costs
#     more than its tail evaluations, so each batch serves several directions);
#  5. learning_report gathers the reports (mean +- sd over seeds, the non-IID gap, the curves).
#
# Usage: scripts/bench-learning.sh            (about 75 minutes on 2 idle cores, and 11 for the SFT step)
#   env (defaults):  SEEDS="1 2 3"  SPLITS="iid dirichlet0.1 dirichlet0.5"  FED_COMMITS=1500
#                    FED_MINUTES=8  LOCAL_STEPS=6000  LOCAL_WALL_S=1500  DEMO=1  LOCAL=1
#                    SFT=1  SFT_MINUTES=10
#   LOCAL=0 keeps the local runs already in target/bench/learning/*-local (e.g. after changing
#   only the federation); KEEP_FED=1 keeps the federated runs already in target/bench/learning/fed
#   and runs only the missing seed/split pairs (e.g. to add a third seed).
#                    BIN_DIR=target/release
#   A shorter run: SEEDS=1 SPLITS="iid dirichlet0.1" FED_COMMITS=600 DEMO=0 ... (the report
#   says how many seeds each figure averages).
# AG News is read in place from ../shared/data/ag_news/test.csv.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${BIN_DIR:-target/release}
for b in fwdllm-agent fwdllm learning_report; do
  [ -x "$bin/$b" ] || { echo "no $bin/$b: run 'make bench-learning' (it builds first)" >&2; exit 1; }
done
read -r -a seeds <<< "${SEEDS:-1 2 3}"
read -r -a splits <<< "${SPLITS:-iid dirichlet0.1 dirichlet0.5}"
commits=${FED_COMMITS:-1500}
minutes=${FED_MINUTES:-8}
local_steps=${LOCAL_STEPS:-6000}
local_wall=${LOCAL_WALL_S:-1500}
out=target/bench/learning
if [ "${KEEP_FED:-0}" != 1 ]; then rm -rf "$out/fed"; fi
if [ "${DEMO:-1}" = 1 ]; then rm -f "$out/demo.json"; fi
if [ "${SFT:-1}" = 1 ]; then rm -f "$out/sft.json"; fi
mkdir -p "$out/fed"

# Local: the recipe's own step and wall budgets; evaluation cadence only.
for task in bbc ag_news; do
  if [ "${LOCAL:-1}" = 0 ] && [ -f "$out/$task-local/metrics.json" ]; then
    echo "== train-local $task: kept from an earlier run (LOCAL=0)"
    continue
  fi
  echo "== train-local $task"
  "$bin/fwdllm-agent" train-local --task "edge-agent/tasks/$task.toml" --threads 2 \
    --max-steps "$local_steps" --max-wall-s "$local_wall" --dev-every 100 --heldout-every 500 --no-progress \
    --out "$out/$task-local"
done

# Federated, AG News, 8 agents.
for seed in "${seeds[@]}"; do
  for split in "${splits[@]}"; do
    case $split in
      iid) args=(--split iid) ;;
      dirichlet*) args=(--split dirichlet --alpha "${split#dirichlet}") ;;
    esac
    if [ "${KEEP_FED:-0}" = 1 ] && [ -f "$out/fed/$split-seed$seed.json" ]; then
      echo "== bench-federation $split seed $seed: kept from an earlier run (KEEP_FED=1)"
      continue
    fi
    echo "== bench-federation ag_news, 8 agents, $split, seed $seed"
    "$bin/fwdllm" bench-federation --task edge-agent/tasks/ag_news.toml --agents 8 "${args[@]}" \
      --seed "$seed" --max-commits "$commits" --minutes "$minutes" --curve-every 100 \
      --sim-clients 0 --out-dir "$out/fed-run" --out "$out/fed/$split-seed$seed.json"
  done
done

# The demo's configuration (what `make demo` runs), with a JSON report.
if [ "${DEMO:-1}" = 1 ]; then
  echo "== demo configuration: BBC, 4 agents, 10 minutes"
  "$bin/fwdllm" bench-federation --task edge-agent/tasks/bbc.toml --agents 4 --minutes 10 \
    --sim-clients 0 --out-dir "$out/demo-run" --out "$out/demo.json"
fi

# Federated instruction tuning (AG News description -> title), 8 agents.
if [ "${SFT:-1}" = 1 ]; then
  echo "== bench-federation ag_news_headline (sft), 8 agents, ${SFT_MINUTES:-10} minutes"
  "$bin/fwdllm" bench-federation --task edge-agent/tasks/ag_news_headline.toml --agents 8 \
    --perturbations 4 --minutes "${SFT_MINUTES:-10}" --sim-clients 0 --out-dir "$out/sft-run" --out "$out/sft.json"
fi
sft_args=()
if [ -f "$out/sft.json" ]; then sft_args=(--sft "$out/sft.json"); fi

"$bin/learning_report" "${sft_args[@]}" --bbc-local "$out/bbc-local/metrics.json" \
  --ag-news-local "$out/ag_news-local/metrics.json" --fed-dir "$out/fed" --demo "$out/demo.json" \
  --out target/bench/learning.json --png target/bench/learning_noniid.png
