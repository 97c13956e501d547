#!/usr/bin/env bash
# Does discriminative perturbation sampling help? Runs local forward-gradient training with plain
# random directions (1 candidate) and with C candidates per direction, same seeds, same number of
# steps, and writes target/bench/discriminative.json: held-out accuracy/loss at every evaluation,
# the mean training loss of the last 40 steps, and wall time, per run and averaged over seeds.
#
# Usage: scripts/bench-discriminative.sh [STEPS] [CANDIDATES] [SEEDS...]
#   defaults: 160 steps, 8 candidates, seeds 1 2 (about 70 minutes on 2 idle cores).
# Needs the release build `make bench` does (target/release or $BIN_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-160}
cands=${2:-8}
if [ $# -gt 2 ]; then shift 2; seeds=("$@"); else seeds=(1 2); fi
bin=${BIN_DIR:-target/release}/fwdllm-agent
[ -x "$bin" ] || { echo "no $bin: build it first (see the bench target in the Makefile)" >&2; exit 1; }
out=target/bench/discriminative
mkdir -p "$out"
for seed in "${seeds[@]}"; do
  for c in 1 "$cands"; do
    echo "== seed $seed, $c candidate(s), $steps steps"
    "$bin" train-local --max-steps "$steps" --max-wall-s 0 --seed "$seed" \
      --discriminative-candidates "$c" --dev-every 40 --heldout-every 40 --no-progress \
      --out "$out/seed$seed-c$c"
  done
done
python3 - "$out" "$cands" "${seeds[@]}" <<'PY'
import csv, json, sys
out, cands, seeds = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
runs = []
for seed in seeds:
    for c in (1, cands):
        d = f"{out}/seed{seed}-c{c}"
        m = json.load(open(f"{d}/metrics.json"))
        rows = list(csv.DictReader(open(f"{d}/steps.csv")))
        tail = [float(r["train_loss"]) for r in rows[-40:]]
        held = [e for e in m["evals"] if e["split"] == "heldout"]
        runs.append({
            "seed": int(seed), "candidates": c, "steps": m["steps"], "wall_s": m["wall_s"],
            "zero_shot_accuracy": m["zero_shot"]["accuracy"],
            "heldout": [{"step": e["step"], "accuracy": e["accuracy"], "loss": e["loss"]} for e in held],
            "final_heldout_accuracy": held[-1]["accuracy"], "final_heldout_loss": held[-1]["loss"],
            "train_loss_last40": sum(tail) / len(tail),
        })
def mean(c, key):
    xs = [r[key] for r in runs if r["candidates"] == c]
    return sum(xs) / len(xs)
report = {"candidates": cands, "seeds": [int(s) for s in seeds], "runs": runs}
for c, name in ((1, "plain"), (cands, "discriminative")):
    for key in ("final_heldout_accuracy", "final_heldout_loss", "train_loss_last40", "wall_s"):
        report[f"{name}_{key}"] = mean(c, key)
json.dump(report, open("target/bench/discriminative.json", "w"), indent=2)
for r in runs:
    print(f"seed {r['seed']} c={r['candidates']}: held-out " +
          " ".join(f"{h['step']}:{h['accuracy']:.3f}/{h['loss']:.3f}" for h in r["heldout"]) +
          f", train loss (last 40) {r['train_loss_last40']:.4f}, {r['wall_s']:.0f} s")
for name in ("plain", "discriminative"):
    print(f"{name}: held-out acc {report[name + '_final_heldout_accuracy']:.4f}, "
          f"loss {report[name + '_final_heldout_loss']:.4f}, "
          f"train loss {report[name + '_train_loss_last40']:.4f}")
print("wrote target/bench/discriminative.json")
PY
