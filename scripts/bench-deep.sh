#!/usr/bin/env bash
# Issue 24's local SFT figures -> target/bench/deep.json:
#   sft_local_nll_rel_drop, sft_local_loss_evaluations, sft_local_wall_s  train-local on the
#     headline task with the shipped recipe (TrainConfig::sft_recipe: the RMSNorm gains of every
#     layer), adapter chosen on dev, 200 held-out examples, WALL_S of training (default 3300 s,
#     so that the whole run with its evaluations stays inside 60 minutes);
#   target/bench/deep.png  held-out and dev NLL of that run against evaluations and wall seconds;
#   sft_eval_cost_ratio  seconds per loss evaluation of the recipe over the previous tail recipe
#     (TrainConfig::sft_tail_recipe), each timed over steps 2..STEPS of a short run, one run after
#     the other in this script;
#   sft_fed_nll_rel_drop, sft_fed_commits, sft_fed_wall_s  (FED=1) `fwdllm bench-federation` on the
#     headline task with 8 agents and the recipe's layout, FED_MINUTES of training (default 50, so
#     that set-up and the final evaluations stay inside 60 minutes), the exported version (best
#     on dev) scored on the 200 held-out examples.
# Usage: scripts/bench-deep.sh  (about 70 minutes on 2 idle cores; THREADS=2 WALL_S=3300 STEPS=4;
#   LOCAL=0 skips the hour-long local run, FED=1 adds the hour-long federated one; LOCAL=0 alone
#   writes the cost keys only, ~10 minutes)
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

if [ "${FED:-0}" = 1 ]; then
  echo "== bench-federation, 8 agents, shipped recipe, ${FED_MINUTES:-50} minutes of training"
  "${BIN_DIR:-target/release}/fwdllm" bench-federation --task "$task" --agents 8 \
    --minutes "${FED_MINUTES:-50}" --eval-every 10 --sim-clients 0 --out-dir "$out/fed" \
    --out "$out/fed.json" > "$out/fed.log" 2>&1
  tail -n 4 "$out/fed.log" | sed 's/^/   /'
fi

python3 - "$out" "$recipe_s" "$tail_s" "$threads" "${LOCAL:-1}" "${FED:-0}" <<'EOF'
import json, sys
out, recipe_s, tail_s, threads = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
local = sys.argv[5] == "1"
fed = sys.argv[6] == "1"
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
})
try:
    f = json.load(open(f"{out}/fed.json")) if fed else None
except FileNotFoundError:
    f = None
if f:
    report.update({
        "sft_fed_nll_rel_drop": f["sft_nll_rel_drop"],
        "sft_fed_agents": f["agents"],
        "sft_fed_commits": f["commits"],
        "sft_fed_perturbations": f["perturbations"],
        "sft_fed_train_wall_s": f["train_wall_s"],
        "sft_fed_wall_s": f["wall_s"],
        "sft_fed_zero_shot_nll": f["zero_shot_nll"],
        "sft_fed_selected_version": f["selected_version"],
        "sft_fed_selected_nll": f["selected_nll"],
        "sft_fed_replica_hashes_equal": f["replica_hashes_equal"],
    })
else:
    report["sft_fed_nll_rel_drop_absent"] = "the federated run was skipped (FED=0) or failed: see target/bench/deep/fed.log"
json.dump(report, open("target/bench/deep.json", "w"), indent=2)
print(json.dumps({k: v for k, v in report.items() if not isinstance(v, list)}, indent=2))
EOF
