#!/usr/bin/env bash
# Issue 16's recipe sweep: layout x estimator on BBC and AG News, each run given the same wall
# budget -> target/bench/recipes.json, target/bench/recipes.png (held-out accuracy against
# training seconds and against loss evaluations) and a table on stdout.
#
# Recipes (train-local flags; everything else is the task's and the recipe's default):
#   lora-b        LoRA B, rank 2, q+v, layers 26-29 (TrainConfig::default: 4 directions, batch 8)
#   lora-ab       the same layers with A and B trainable
#   lora-b+head   LoRA B and the verbalizer head rows, block-wise perturbation
#   head-64x8     head rows only, 64 directions on batches of 8 (the previous head estimator)
#   head-1024x32  head rows only, 1,024 directions on batches of 32 (the shipped recipe)
#
# Usage: scripts/bench-recipes.sh        (32 minutes on 2 idle cores with the defaults, 2026-12-05)
#   env (defaults): TASKS="bbc ag_news"  RECIPES="<all five>"  WALL_S=180  BIN_DIR=target/release
# A recipe's first pass over its data includes the frozen prefix (cached on disk afterwards):
# the plot's x axis is training time, evaluations excluded, so a warm cache favours a later run.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${BIN_DIR:-target/release}
for b in fwdllm-agent recipe_report; do
  [ -x "$bin/$b" ] || { echo "no $bin/$b: run 'make bench-recipes' (it builds first)" >&2; exit 1; }
done
read -r -a tasks <<< "${TASKS:-bbc ag_news}"
read -r -a recipes <<< "${RECIPES:-lora-b lora-ab lora-b+head head-64x8 head-1024x32}"
wall=${WALL_S:-180}
out=target/bench/recipes
mkdir -p "$out"

for task in "${tasks[@]}"; do
  for r in "${recipes[@]}"; do
    case $r in
      lora-b) args=(--trainable b --heldout-every 25 --dev-every 25) ;;
      lora-ab) args=(--trainable ab --heldout-every 25 --dev-every 25) ;;
      lora-b+head) args=(--blockwise --heldout-every 25 --dev-every 25) ;;
      head-64x8) args=(--head-only --directions 64 --batch 8 --heldout-every 200 --dev-every 100) ;;
      head-1024x32) args=(--heldout-every 200 --dev-every 100) ;;
      *) echo "unknown recipe $r" >&2; exit 1 ;;
    esac
    echo "== $task $r (${wall} s)"
    "$bin/fwdllm-agent" train-local --task "edge-agent/tasks/$task.toml" --threads 2 \
      --max-wall-s "$wall" --no-progress "${args[@]}" --out "$out/$task-$r" > "$out/$task-$r.log" 2>&1 \
      || { echo "   failed: see $out/$task-$r.log" >&2; }
    tail -n 1 "$out/$task-$r.log" | sed 's/^/   /'
  done
done

"$bin/recipe_report" --dir "$out" --out target/bench/recipes.json --png target/bench/recipes.png
