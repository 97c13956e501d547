"""One row per fg2 run: last held-out drop (vs 4.1620), best dev drop, final dev drop, s/eval."""
import glob, json, os, sys
OUT = os.environ.get("SFTREF_DIR", "/tmp/sftref") + "/out"
rows = []
for f in sorted(glob.glob(f"{OUT}/fg2_*.jsonl"), key=os.path.getmtime):
    recs = [json.loads(l) for l in open(f) if l.strip()]
    div = any(r.get("diverged") for r in recs)
    recs = [r for r in recs if "dev" in r]
    if not recs:
        continue
    last = recs[-1]
    held = [r for r in recs if r.get("heldout") is not None]
    lh = held[-1] if held else None
    bestd = max(recs, key=lambda r: r["dev_drop"])
    rows.append((os.path.basename(f)[4:-6], int(last["evals"]),
                 None if lh is None else round(100 * lh["drop"], 2), None if lh is None else int(lh["evals"]),
                 round(100 * last["dev_drop"], 2), round(100 * bestd["dev_drop"], 2), int(bestd["evals"]),
                 round(last["s_per_eval"], 4), "DIVERGED" if div else ""))
print("| run | evals | held-out drop % (@evals) | dev drop % final | best dev drop % (@evals) | train s/eval | note |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r[0]} | {r[1]} | {r[2]} (@{r[3]}) | {r[4]} | {r[5]} (@{r[6]}) | {r[7]} | {r[8]} |")
