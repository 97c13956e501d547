"""Forward-gradient runs (exact-JVP stand-in for fd1) with more layouts and estimators.
Derived from train_fg.py (same directions seed scheme, same update rule and L2 clamp 40 when all
options are off). Loss evaluations are counted in batch-8 equivalents: a step with n directions on
a batch of size b costs (n+1)*b/8 (what the engine's one-sided difference spends).

Layouts (regex):
  N<L>        additive deltas on the RMSNorm gains of layers L..29 (n1, n2) + the final norm
  NF          the final norm only
  SD<L>       per-channel output scale y *= (1+s) on ffn_down of layers L..29 (576 per layer)
  SOD<L>      same on attn_output and ffn_down
  NSOD<L>     N<L> + SOD<L>
  D1B<L>      rank-1, B-only LoRA on ffn_down of layers L..29 (B5d = D1B0)
  any name of common.LAYOUTS
Direction scaling (--scale), applied to norm-gain values only (other values keep unit):
  unit: v ~ N(0,1); abs: v_i ~ N(0,1)*|w0_i| (relative / multiplicative); rms: v ~ N(0,1)*rms(w0)
  per tensor. --scale-all applies abs/rms to nothing else (scales are already relative).
Estimator options: --batch, --sched const|cos|lin (decay to --lr-min-frac), --gnorm (divide each
projected derivative g_k by the running RMS of g, EMA 0.99, bias corrected), --clip c (clip g_k to
+-c * running RMS), --mom beta (EMA momentum on the committed update), --clamp (update L2 clamp).
"""
import argparse
import json
import math
import os

import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import common as C

ap = argparse.ArgumentParser()
ap.add_argument("layout")
ap.add_argument("n", type=int)
ap.add_argument("lr", type=float)
ap.add_argument("budget", type=int)
ap.add_argument("--batch", type=int, default=8)
ap.add_argument("--scale", default="unit", choices=["unit", "abs", "rms"])
ap.add_argument("--sched", default="const", choices=["const", "cos", "lin"])
ap.add_argument("--lr-min-frac", type=float, default=0.1)
ap.add_argument("--warm", type=int, default=0, help="warm-up evaluations (linear)")
ap.add_argument("--gnorm", action="store_true")
ap.add_argument("--clip", type=float, default=0.0)
ap.add_argument("--mom", type=float, default=0.0)
ap.add_argument("--clamp", type=float, default=40.0)
ap.add_argument("--guide", type=float, default=0.0, help="share alpha of each direction's variance along the running mean of committed updates (cone sampling)")
ap.add_argument("--guide-beta", type=float, default=0.95)
ap.add_argument("--guide-gain", type=float, default=0.0, help="variance along the guide (default alpha*D: the step along it is amplified ~alpha*D)")
ap.add_argument("--every", type=int, default=1000)
ap.add_argument("--held-every", type=int, default=1, help="held-out at every k-th evaluation (and the last)")
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--seed", type=int, default=1)
ap.add_argument("--tag", default="")
a = ap.parse_args()
torch.set_num_threads(a.threads)
BASE_REF = 4.162031479101282  # reference zero-shot held-out NLL (F32)

os.makedirs(C.OUT, exist_ok=True)
tag = (f"fg2_{a.layout}_{a.scale}_n{a.n}_b{a.batch}_lr{a.lr:g}_{a.sched}"
       + ("_gn" if a.gnorm else "") + (f"_clip{a.clip:g}" if a.clip else "")
       + (f"_mom{a.mom:g}" if a.mom else "") + (f"_clamp{a.clamp:g}" if a.clamp != 40 else "")
       + (f"_guide{a.guide:g}b{a.guide_beta:g}" + (f"g{a.guide_gain:g}" if a.guide_gain else "") if a.guide else "") + (f"_s{a.seed}" if a.seed != 1 else "") + f"_e{a.budget}" + a.tag)
log = open(f"{C.OUT}/{tag}.jsonl", "w")

model = C.Llama(C.get_weights())
ex = C.keyed(C.get_data())


from build_layout import build


import build_layout as _bl
_bl._MODEL[0] = model  # the TIED layouts read the base gains
ad = build(a.layout)
first = ad.min_layer()
lo = 0
for lvl in sorted(C.CACHE_LEVELS):
    if lvl <= first:
        lo = lvl
cache = C.HiddenCache.load() if lo > 0 else None
dev_b = [C.Batch(model, b, lo, cache) for b in C.batches_of(ex["dev"], 8)]
held_b = [C.Batch(model, b, lo, cache) for b in C.batches_of(ex["heldout"], 8)]
params = ad.params()
sizes = [p.numel() for p in params]
Dn = sum(sizes)

# per-value direction scale
inv = {}
for k, t in ad.norm.items():
    inv[id(t)] = ("norm", k)
parts = []
for p in params:
    kind = inv.get(id(p))
    if kind is None or a.scale == "unit":
        parts.append(torch.ones(p.numel()))
        continue
    k = kind[1]
    w0 = model.final_norm if k == ("final",) else model.W[k[0]][k[1]]
    if a.scale == "abs":
        parts.append(w0.abs().clone())
    else:
        parts.append(torch.full((p.numel(),), float(w0.pow(2).mean().sqrt())))
dscale = torch.cat(parts)
print(tag, "trainable", Dn, "first adapted layer", first, "tail from", lo,
      "dscale mean", round(float(dscale.mean()), 4), flush=True)


def add_(vec, scale):
    with torch.no_grad():
        o = 0
        for p, s in zip(params, sizes):
            p.add_(vec[o:o + s].view_as(p), alpha=scale)
            o += s


evals, step, t_train, t0 = 0, 0, 0.0, time.time()
n_eval = 0
dev0 = None
loss_ema = None
per_step = (a.n + 1) * a.batch / 8.0


def evaluate(final=False):
    global n_eval, dev0
    t = time.time()
    d = C.eval_nll(model, ad, None, lo, prepared=dev_b)
    if dev0 is None:
        dev0 = d
    h = None
    if final or n_eval % a.held_every == 0:
        h = C.eval_nll(model, ad, None, lo, prepared=held_b)
    n_eval += 1
    rec = dict(step=step, evals=evals, dev=d, heldout=h,
               drop=None if h is None else (BASE_REF - h) / BASE_REF,
               dev_drop=(dev0 - d) / dev0, train_loss_ema=loss_ema,
               train_s=t_train, s_per_eval=t_train / max(evals, 1), wall_s=time.time() - t0,
               eval_s=time.time() - t, upd_norm=upd_norm, g_rms=g_rms, lr_t=lr_t)
    log.write(json.dumps(rec) + "\n")
    log.flush()
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()}), flush=True)
    if not (d == d) or d > 4.5:
        print("diverged", flush=True)
        log.write(json.dumps(dict(diverged=True, evals=evals)) + "\n")
        sys.exit(0)


def lr_at(e):
    f = e / a.budget
    if a.sched == "const":
        m = 1.0
    elif a.sched == "cos":
        m = a.lr_min_frac + (1 - a.lr_min_frac) * 0.5 * (1 + math.cos(math.pi * f))
    else:
        m = 1.0 - (1 - a.lr_min_frac) * f
    if a.warm and e < a.warm:
        m *= (e + per_step) / a.warm
    return a.lr * m


upd_norm, g_rms, lr_t = None, None, a.lr
evaluate()
next_eval = a.every
gen = C.train_batches(ex["train"], bs=a.batch)
g2, g2n = 0.0, 0
mom = torch.zeros(Dn) if a.mom else None
gm = torch.zeros(Dn)  # EMA of committed updates in z-space (update / dscale), for --guide
while evals + per_step <= a.budget + 1e-9:
    t = time.time()
    b = C.Batch(model, next(gen), lo, cache)
    g = torch.Generator().manual_seed(a.seed * 1_000_003 + step)
    Z = torch.randn(a.n, Dn, generator=g)
    if a.guide and step > 0 and gm.norm() > 0:
        mhat = gm / gm.norm()
        zeta = torch.randn(a.n, 1, generator=g)
        gain = a.guide_gain if a.guide_gain else a.guide * Dn
        Z = math.sqrt(1 - a.guide) * Z + math.sqrt(gain) * zeta * mhat
    V = Z * dscale
    loss = b.loss(model, ad)
    gr = torch.autograd.grad(loss, params)
    gk = V @ torch.cat([x.reshape(-1) for x in gr])
    lv = loss.item()
    loss_ema = lv if loss_ema is None else 0.98 * loss_ema + 0.02 * lv
    with torch.no_grad():
        # running RMS of the projected derivatives
        g2 = 0.99 * g2 + 0.01 * float(gk.pow(2).mean())
        g2n += 1
        g_rms = math.sqrt(g2 / (1 - 0.99 ** g2n))
        if a.clip:
            gk = gk.clamp(-a.clip * g_rms, a.clip * g_rms)
        if a.gnorm:
            gk = gk / g_rms
        lr_t = lr_at(evals)
        u = (gk @ V) * (-lr_t / a.n)
        if mom is not None:
            mom.mul_(a.mom).add_(u, alpha=1 - a.mom)
            u = mom.clone()
        un = u.norm().item()
        if un > a.clamp:
            u *= a.clamp / un
        upd_norm = min(un, a.clamp)
        add_(u, 1.0)
        if a.guide:
            gm.mul_(a.guide_beta).add_(u / dscale, alpha=1 - a.guide_beta)
    t_train += time.time() - t
    step += 1
    evals += per_step
    last = evals + per_step > a.budget + 1e-9
    if evals >= next_eval or last:
        evaluate(final=last)
        next_eval += a.every
