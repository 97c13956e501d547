#!/usr/bin/env bash
# Issue 24's local SFT figures -> target/bench/deep.json:
#   sft_local_nll_rel_drop, sft_local_loss_evaluations, sft_local_wall_s  train-local on the
#     headline task with the shipped recipe (TrainConfig::sft_recipe: the RMSNorm gains of every
#     layer), adapter chosen on dev, 200 held-out examples, WALL_S of training (default 3300 s,
#     so that the whole run with its evaluations stays inside 60 minutes);
#   target/bench/deep.png  held-out and dev NLL of that run against evaluations and wall seconds;
#   sft_eval_cost_ratio  seconds per loss evaluation of the recipe over the previous tail recipe
#     (TrainConfig::sft_tail_recipe), each timed over steps 2..STEPS of a short run, one run after
#     the other in this script.
# Usage: scripts/bench-deep.sh  (about 70 minutes on 2 idle cores; THREADS=2 WALL_S=3300 STEPS=4;
#   LOCAL=0 skips the hour-long run and writes the cost keys only, ~10 minutes)
# Run it on an otherwise idle machine: llama.cpp's threads spin.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${BIN_DIR:-target/release}/fwdllm-agent
[ -x "$bin" ] || { echo "no $bin: run 'make bench-deep' (it builds first)" >&2; exit 1; }
threads=${THREADS:-2}
wall=${WALL_S:-3300}
steps=${STEPS:-4}
out=target/bench/deep
mkdir -p "$out"
task=edge-agent/tasks/ag_news_headline.toml
common=(--task "$task" --threads "$threads" --no-progress)

# Seconds per loss evaluation from steps.csv (step,wall_s,loss_evaluations,...): steps 2..last,
# so that the first step's one-off costs (prefix states, tail model) stay out.
per_eval() {
  awk -F, 'NR == 3 { w0 = $2; e0 = $3 } NR > 3 { w1 = $2; e1 = $3 } END { printf "%.6f", (w1 - w0) / (e1 - e0) }' "$1"
}

echo "== cost per loss evaluation: recipe vs tail recipe ($steps steps each)"
# The recipe's layout with 16 directions per step: the cost of one evaluation does not depend on
# how many a step takes, and short steps keep this part to minutes.
"$bin" train-local "${common[@]}" --max-steps "$steps" --dev-every 0 --heldout-every 0 \
  --f1-examples 0 --modules attn_norm,ffn_norm --layers 0..30 --directions 16 \
  --discriminative-candidates 1 --lr 0.03 --out "$out/cost-recipe" > "$out/cost-recipe.log" 2>&1
"$bin" train-local "${common[@]}" --max-steps "$steps" --dev-every 0 --heldout-every 0 \
  --f1-examples 0 --modules attn_v,attn_output,ffn_down --layers 27..30 --trainable b \
  --directions 8 --lr 1 --lr-half-life 400 --out "$out/cost-tail" > "$out/cost-tail.log" 2>&1
recipe_s=$(per_eval "$out/cost-recipe/steps.csv")
tail_s=$(per_eval "$out/cost-tail/steps.csv")
echo "   recipe $recipe_s s, tail recipe $tail_s s per evaluation"

if [ "${LOCAL:-1}" = 1 ]; then
  echo "== train-local, shipped recipe, ${wall} s of training"
  "$bin" train-local "${common[@]}" --max-wall-s "$wall" --out "$out/local" > "$out/local.log" 2>&1
  tail -n 6 "$out/local.log" | sed 's/^/   /'
  # The curves (held-out and dev NLL against evaluations and wall seconds) -> deep.png.
  "${BIN_DIR:-target/release}/deep_plot" --metrics "$out/local/metrics.json" --png target/bench/deep.png
fi

python3 - "$out" "$recipe_s" "$tail_s" "$threads" "${LOCAL:-1}" <<'EOF'
import json, sys
out, recipe_s, tail_s, threads = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
local = sys.argv[5] == "1"
report = {}
try:
    m = json.load(open(f"{out}/local/metrics.json")) if local else None
except FileNotFoundError:
    m = None
if m:
    report.update({
        "sft_local_nll_rel_drop": m["sft_nll_rel_drop"],
        "sft_local_loss_evaluations": m["loss_evaluations"],
        "sft_local_wall_s": m["wall_s"],
        "sft_local_zero_shot_nll": m["zero_shot"]["nll"],
        "sft_local_heldout_nll": m["final_heldout"]["nll"],
        "sft_local_curve": [e for e in m["evals"] if e["split"].startswith("heldout")],
        "sft_local_samples": m["final_heldout"]["samples"],
    })
else:
    report["sft_local_absent"] = "the local run was skipped (LOCAL=0) or failed: see target/bench/deep/local.log"
report.update({
    "sft_eval_s_recipe": recipe_s,
    "sft_eval_s_tail_recipe": tail_s,
    "sft_eval_cost_ratio": recipe_s / tail_s,
    "threads": threads,
    "sft_fed_nll_rel_drop_absent": "not measured by this script: the federated SFT run is `fwdllm bench-federation --task edge-agent/tasks/ag_news_headline.toml` (README)",
})
json.dump(report, open("target/bench/deep.json", "w"), indent=2)
print(json.dumps({k: v for k, v in report.items() if not isinstance(v, list)}, indent=2))
EOF
