"""Backprop reference run: one layout, AdamW (or SGD) at a constant lr, batch 8.
usage: train_bp.py LAYOUT LR STEPS [EVAL_EVERY] [OPT] [THREADS]
Writes OUT/bp_<layout>_<opt><lr>.jsonl (one line per evaluation) and .pt (final adapter)."""
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import common as C
from build_layout import build

name, lr, steps = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
every = int(sys.argv[4]) if len(sys.argv) > 4 else 50
opt_name = sys.argv[5] if len(sys.argv) > 5 else "adamw"
torch.set_num_threads(int(sys.argv[6]) if len(sys.argv) > 6 else 2)
torch.manual_seed(0)
os.makedirs(C.OUT, exist_ok=True)
tag = f"bp_{name}_{opt_name}{lr:g}" + os.environ.get("TAG", "")
log_path = f"{C.OUT}/{tag}.jsonl"

model = C.Llama(C.get_weights())
ex = C.keyed(C.get_data())
ad = build(name)
lo = max([0] + [l for l in C.CACHE_LEVELS if l <= ad.min_layer()])
cache = C.HiddenCache.load() if lo > 0 else None
dev_b = [C.Batch(model, b, lo, cache) for b in C.batches_of(ex["dev"], 8)]
held_b = [C.Batch(model, b, lo, cache) for b in C.batches_of(ex["heldout"], 8)]
params = ad.params()
opt = (torch.optim.AdamW(params, lr=lr) if opt_name == "adamw" else torch.optim.SGD(params, lr=lr))
print(tag, "trainable", ad.n_trainable(), "first layer", lo, flush=True)

log = open(log_path, "w")
t_train, t0, run_loss, run_n = 0.0, time.time(), 0.0, 0


def evaluate(step):
    t = time.time()
    d = C.eval_nll(model, ad, None, lo, prepared=dev_b)
    h = C.eval_nll(model, ad, None, lo, prepared=held_b)
    rec = dict(step=step, dev=d, heldout=h, drop=(C.ZERO_SHOT_PROJECT - h) / C.ZERO_SHOT_PROJECT,
               train_loss=run_loss / max(run_n, 1), train_s=t_train, wall_s=time.time() - t0,
               eval_s=time.time() - t, s_per_step=t_train / max(step, 1))
    log.write(json.dumps(rec) + "\n")
    log.flush()
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()}), flush=True)
    return rec


evaluate(0)
gen = C.train_batches(ex["train"])
for step in range(1, steps + 1):
    t = time.time()
    b = C.Batch(model, next(gen), lo, cache)
    loss = b.loss(model, ad)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    t_train += time.time() - t
    run_loss += loss.item()
    run_n += 1
    if step % every == 0 or step == steps:
        evaluate(step)
        run_loss, run_n = 0.0, 0
torch.save({"layout": name, "lora": {k: [a.detach(), b.detach(), s] for k, (a, b, s) in ad.lora.items()},
            "norm": {k: v.detach() for k, v in ad.norm.items()}}, f"{C.OUT}/{tag}.pt")
