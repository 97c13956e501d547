"""Seconds per loss evaluation (batch 8, no_grad) and per JVP step (forward+backward) for the
layouts of train_fg2.py, through the tail from the deepest cached level <= the first adapted layer.
Same train batches for every row; median.  usage: bench2.py THREADS REPS LAYOUT..."""
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import common as C

torch.set_num_threads(int(sys.argv[1]))
reps = int(sys.argv[2])
names = sys.argv[3:]
import importlib.util
model = C.Llama(C.get_weights())
ex = C.keyed(C.get_data())
cache = C.HiddenCache.load()
raw = C.batches_of(ex["train"][: 8 * reps], 8)
out = {}


def timeit(fn):
    fn(raw[0])
    ts = []
    for b in raw:
        t = time.perf_counter()
        fn(b)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


spec = importlib.util.spec_from_file_location("fg2build", os.path.join(os.path.dirname(__file__), "build_layout.py"))
bl = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bl)
for name in names:
    ad = bl.build(name)
    first = ad.min_layer()
    lo = max([0] + [l for l in C.CACHE_LEVELS if l <= first])
    with torch.no_grad():
        for A, B, s in ad.lora.values():
            B.normal_(0, 1e-3)
        for p in ad.params():
            if p.abs().sum() == 0:
                p.normal_(0, 1e-3)
    params = ad.params()

    def fwd(b):
        with torch.no_grad():
            C.Batch(model, b, lo, cache).loss(model, ad)

    def step(b):
        torch.autograd.grad(C.Batch(model, b, lo, cache).loss(model, ad), params)

    r = dict(trainable=ad.n_trainable(), tail_from=lo, eval_s=timeit(fwd), jvp_step_s=timeit(step))
    out[name] = r
    print(name, json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}), flush=True)
json.dump(out, open(f"{C.OUT}/bench2_{'_'.join(names)}.json", "w"), indent=1)
