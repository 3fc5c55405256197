"""A float64 oracle of DESIGN §1, written from the text for the tests.

It deliberately does NOT import ``sgg_fast.guidance``: it forms the vectors g1, g2, g3 of
each segment explicitly (no α/β collapse), in float64, and runs AdamW on g3 per tensor.

The two degenerate cases of DESIGN §1.4b are decided relative to ``eps``, the precision of the
statistics the backends compute (float32 by default), with the design's constant 16:
``sin²(g, r) <= 16·eps`` is "g ∥ r" (λ3 = 1 then removes all of g: g1 = 0), and
``‖w‖² <= 16·eps`` disables the direction blend (g2 = g1).
"""

from __future__ import annotations

import math

import torch

F64 = torch.float64


class Oracle:
    """Simulates SGGAdamW on float64 copies.

    ``groups``: list of dicts with ``params`` (list of tensors: the initial values) and every
    setting of SGGAdamW (``lr``, ``betas``, ..., ``granularity``). ``step(grads)`` takes one
    gradient (or None) per parameter, in group order.
    """

    def __init__(self, groups: list[dict], sources: list[torch.Tensor | None] | None = None,
                 eps: float = 2.0 ** -23):
        self.tol = 16.0 * eps
        self.groups = [dict(g) for g in groups]
        self.params = [p.detach().to(F64).clone() for g in groups for p in g["params"]]
        self.owner = [gi for gi, g in enumerate(groups) for _ in g["params"]]
        n = len(self.params)
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = [0] * n
        self.ref = [torch.zeros_like(p) for p in self.params]
        if sources is not None:
            self.ref = [torch.zeros_like(p) if s is None else s.detach().to(F64).clone()
                        for p, s in zip(self.params, sources)]
        self.nu: dict = {}          # per segment key; absent = not initialised
        self.stats: list[dict] = []  # per segment of the last step
        self.skipped = False

    def _segments(self, active: list[int]):
        segs, glob = [], None
        for gi, g in enumerate(self.groups):
            mine = [i for i in active if self.owner[i] == gi]
            if g["granularity"] == "global":
                if glob is None:
                    glob = ("global", gi, [])
                    segs.append(glob)
                glob[2].extend(mine)
            elif g["granularity"] == "tensor":
                segs.extend((("tensor", i), gi, [i]) for i in mine)
            elif mine:
                segs.append((("group", gi), gi, mine))
        return [s for s in segs if s[2]]

    def guide(self, grads: list[torch.Tensor | None]):
        """The guided gradient g3 per active tensor, the new ν, the stats rows and the skip flag."""
        active = [i for i, g in enumerate(grads) if g is not None]
        G = {i: grads[i].detach().to(F64).reshape(-1) for i in active}
        segs = self._segments(active)
        guided, new_nu, stats = {}, {}, []
        bad = False
        for key, gi, idx in segs:
            h = self.groups[gi]
            cat = lambda xs: torch.cat([x.reshape(-1) for x in xs]) if xs else torch.zeros(0, dtype=F64)
            g = cat([G[i] for i in idx])
            mode = h["reference"]
            r = cat([self.m[i] if mode == "momentum" else self.ref[i] for i in idx])
            p = cat([self.params[i] for i in idx])
            gg, rr, gr, pp = (g * g).sum(), (r * r).sum(), (g * r).sum(), (p * p).sum()
            if not all(math.isfinite(float(x)) for x in (gg, rr, gr, pp)):
                bad = True
            l1, l2, l3 = h["lambda_dir"], h["lambda_mag"], h["lambda_align"]
            # A. alignment
            c = -l3 * gr / rr if (rr > 0 and gr < 0) else 0.0
            g1 = g + c * r
            if c != 0 and l3 == 1 and 1 - float(gr) ** 2 / (float(gg) * float(rr)) <= self.tol:
                g1 = torch.zeros_like(g)  # g ∥ r: nothing is left
            # B. direction
            n1, nr = g1.norm(), r.norm()
            g2 = g1
            if rr > 0 and n1 > 0:
                w = (1 - l1) * g1 / n1 + l1 * r / nr
                if (w * w).sum() > self.tol:
                    g2 = n1 * w / w.norm()
            n2 = g2.norm()
            # C. magnitude
            tau = math.inf
            if h["mag_mode"] == "absolute":
                tau = h["max_norm"]
            elif h["mag_mode"] == "relative":
                if key in self.nu:
                    tau = h["mag_ratio"] * self.nu[key]
            else:
                tau = h["mag_ratio"] * max(math.sqrt(float(pp)), 1e-3)
            s = (1 - l2) + l2 * tau / float(n2) if float(n2) > tau else 1.0
            g3 = s * g2
            n3 = g3.norm()
            if h["mag_mode"] == "relative":
                if key in self.nu:
                    new_nu[key] = h["mag_beta"] * self.nu[key] + (1 - h["mag_beta"]) * float(n3)
                elif math.isfinite(float(n2)) and float(n2) > 0:
                    new_nu[key] = float(n2)
            off = 0
            for i in idx:
                k = self.params[i].numel()
                guided[i] = g3[off:off + k].reshape(self.params[i].shape)
                off += k
            ng, nrr = math.sqrt(float(gg)), math.sqrt(float(rr))
            cos = float(gr) / (ng * nrr) if ng > 0 and nrr > 0 else 0.0
            stats.append(dict(grad_norm=ng, ref_norm=nrr, cos=cos, conflict=float(gr < 0),
                              guided_norm=float(n3), mag_scale=s, dir_penalty=1 - cos,
                              mag_penalty=0.0 if math.isinf(tau) else 0.5 * max(0.0, float(n2) - tau) ** 2))
        for st in stats:
            st["skipped"] = bad
        return guided, new_nu, stats, bad

    def step(self, grads: list[torch.Tensor | None]):
        active = [i for i, g in enumerate(grads) if g is not None]
        G = {i: grads[i].detach().to(F64) for i in active}
        guided, new_nu, self.stats, bad = self.guide(grads)
        self.skipped = bad
        if bad:
            return
        self.nu.update(new_nu)
        for i in active:
            h = self.groups[self.owner[i]]
            lr, (b1, b2), eps, wd = h["lr"], h["betas"], h["eps"], h["weight_decay"]
            u = guided[i]
            mode = h["reference"]
            if mode == "ema":
                self.ref[i] = h["ref_beta"] * self.ref[i] + (1 - h["ref_beta"]) * G[i]
            self.t[i] += 1
            t = self.t[i]
            self.m[i] = b1 * self.m[i] + (1 - b1) * u
            self.v[i] = b2 * self.v[i] + (1 - b2) * u * u
            self.params[i] = self.params[i] * (1 - lr * wd)
            self.params[i] = self.params[i] - (lr / (1 - b1 ** t)) * self.m[i] / (
                self.v[i].sqrt() / math.sqrt(1 - b2 ** t) + eps)
