"""Layouts of train_fg2.py (see its docstring)."""
import re

import torch

import common as C


def build(name):
    if name in C.LAYOUTS:
        return C.layout(name)[0]
    ad = C.Adapter()
    if name == "NF":
        ad.norm[("final",)] = torch.zeros(C.D).requires_grad_(True)
        return ad
    m = re.fullmatch(r"(N|SD|SOD|NSOD|D1B)(\d+)", name)
    if not m:
        raise SystemExit(f"unknown layout {name}")
    kind, L = m.group(1), int(m.group(2))
    layers = range(L, C.N_LAYER)
    if kind in ("N", "NSOD"):
        for l in layers:
            for k in ("n1", "n2"):
                ad.norm[(l, k)] = torch.zeros(C.D).requires_grad_(True)
        ad.norm[("final",)] = torch.zeros(C.D).requires_grad_(True)
    if kind in ("SD", "SOD", "NSOD"):
        for l in layers:
            for p in (["o", "down"] if kind != "SD" else ["down"]):
                ad.oscale[(l, p)] = torch.zeros(C.SHAPES[p][0]).requires_grad_(True)
    if kind == "D1B":
        ad.lora = C.make_adapter(layers, ["down"], 1, False, seed=0).lora
    return ad
