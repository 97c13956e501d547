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
    if name == "TIED":
        return Tied()
    m = re.fullmatch(r"NE(\d+)", name)
    if m:  # norms n1, n2 of layers 0..L-1 only (no final norm)
        for l in range(int(m.group(1))):
            for k in ("n1", "n2"):
                ad.norm[(l, k)] = torch.zeros(C.D).requires_grad_(True)
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


class _TiedNorms:
    """Norm deltas computed from the shared parameters: delta(l,k) = t * RMS(w0_lk) + a_lk * w0_lk."""

    def __init__(self, owner):
        self.o = owner

    def __contains__(self, k):
        return k in self.o.keys

    def __getitem__(self, k):
        i = self.o.keys.index(k)
        w0 = self.o.w0[i]
        return self.o.t * self.o.rms[i] + self.o.a[i] * w0

    def items(self):
        return []

    def __iter__(self):
        return iter([])


class Tied(C.Adapter):
    """One 576-vector shared by every norm (in units of each norm's RMS) plus one scalar per
    norm (a relative change of the whole norm): 576 + 61 values."""

    def __init__(self):
        super().__init__()
        self.keys = [(l, k) for l in range(C.N_LAYER) for k in ("n1", "n2")] + [("final",)]
        self.w0 = []
        m = _MODEL[0]  # set by train_fg2.py
        for k in self.keys:
            self.w0.append(m.final_norm if k == ("final",) else m.W[k[0]][k[1]])
        self.rms = [float(w.pow(2).mean().sqrt()) for w in self.w0]
        self.t = torch.zeros(C.D).requires_grad_(True)
        self.a = torch.zeros(len(self.keys)).requires_grad_(True)
        self.norm = _TiedNorms(self)

    def params(self):
        return [self.t, self.a]

    def min_layer(self):
        return 0


_MODEL = [None]
