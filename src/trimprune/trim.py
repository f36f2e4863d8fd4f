"""TRIM — Targeted Row-wise Iterative Metric-driven pruning (Beck, Rudman & Eickhoff 2025).

For a linear W with layer target sparsity s and a per-row importance order, TRIM searches a
per-row sparsity vector x (mean s):

    x_0 = s;  for t = 1..T:  q = dimwise_quality(Y, Y'(x_{t-1}))            (Sec. 3, Eq. 2-4)
                             d = 2 lr (q - min q) / (max q - min q + 1e-6);  x_t = x_{t-1} + d - mean(d)
                             x_t = clip(x_t, 0, 0.95);  x_t = x_t - mean(x_t) + s
    keep the x_t with the best layer metric; learning rates are tried upward (0.01 ... 0.16,
    stopping at the first that does not improve), then negative ones if none beats uniform.

Here all learning rates of a sweep run as one batched computation (a leading candidate dimension),
every mask comes from one sort per matrix (`row_ranks`) by comparison, and nothing leaves the device
inside the iterations. The chosen vector is finally projected exactly onto
{x in [0, x_max]^rows : mean(x) = s} and rounded to integer counts whose total is round(s*rows*in).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .graphs import GRAPHS
from .quality import dim_metric, layer_metric


@dataclass(frozen=True)
class TrimSettings:
    iterations: int = 10
    layer_metric: str = "cosim_flat"
    dim_metric: str = "cosim"
    lrs: tuple = (0.01, 0.02, 0.04, 0.08, 0.12, 0.16)
    neg_lrs: tuple = (-0.01, -0.02, -0.04)
    forbid_neg_lr: bool = False
    max_row_sparsity: float = 0.95
    # how a sparsity vector becomes per-row counts inside the search:
    #   "floor": floor(in * x_r) as the reference (non-uniform vectors then prune fewer weights);
    #   "exact": largest-remainder rounding to exactly the scorer's number of pruned weights, so
    #            every candidate is compared at the same sparsity.
    rounding: str = "exact"

    @classmethod
    def from_config(cls, cfg) -> "TrimSettings":
        return cls(iterations=cfg.trim_iterations, layer_metric=cfg.trim_metric, dim_metric=cfg.trim_dim_metric,
                   lrs=tuple(cfg.trim_lrs), neg_lrs=tuple(cfg.trim_neg_lrs), forbid_neg_lr=cfg.trim_forbid_neg_lr,
                   max_row_sparsity=cfg.trim_max_row_sparsity,
                   rounding="floor" if cfg.trim_inputs == "last-token" else "exact")


@dataclass
class TrimResult:
    counts: torch.Tensor            # pruned weights per row (final, integer, exact total)
    search_sparsities: torch.Tensor  # best x of the search, before the exact projection
    baseline_metric: float           # layer metric of the uniform per-row allocation
    best_metric: float               # best layer metric found by the search
    final_metric: float              # layer metric of the final (projected, rounded) allocation
    learning_rate: float | None
    best_iter: int
    start_var: float                 # variance of per-row cosine at uniform sparsity
    end_var: float                   # ... at the final allocation
    candidates: dict                 # lr -> best metric of that lr (as evaluated)

    def summary(self, in_features: int) -> dict:
        x = self.counts.double() / in_features
        return {"baseline_metric": self.baseline_metric, "best_metric": self.best_metric,
                "final_metric": self.final_metric, "lr": self.learning_rate, "best_iter": self.best_iter,
                "row_quality_var_before": self.start_var, "row_quality_var_after": self.end_var,
                "row_sparsity_min": float(x.min()), "row_sparsity_mean": float(x.mean()),
                "row_sparsity_max": float(x.max()),
                "lr_candidates": {str(k): v for k, v in self.candidates.items()}}


def project_capped_mean(x: torch.Tensor, s: float, cap: float, iters: int = 100) -> torch.Tensor:
    """Euclidean projection of x onto {y in [0, cap]^n : mean(y) = s}: y = clip(x - tau, 0, cap)
    with tau found by bisection (mean(clip(x - tau)) is monotone in tau)."""
    x = x.double()
    lo = (x.min() - cap).item()
    hi = (x.max()).item()
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if (x - mid).clamp(0.0, cap).mean().item() > s:
            lo = mid
        else:
            hi = mid
    return (x - 0.5 * (lo + hi)).clamp(0.0, cap)


def exact_counts(x: torch.Tensor, s: float, in_features: int, cap: float, total: int | None = None) -> torch.Tensor:
    """Integer pruned-counts per row from fractions x, with every row in [0, floor(cap * in)] and the
    total exactly `total` (default round(s * rows * in)): project onto the capped set (with the
    integer cap), floor, then hand the remaining weights to the rows with the largest remainders."""
    device = x.device
    x = x.detach().cpu()
    rows = x.numel()
    kmax = int(cap * in_features + 1e-9)
    if total is None:
        total = int(round(s * rows * in_features))
    if not 0 <= total <= rows * kmax:
        raise ValueError(f"sparsity {s} is not reachable with rows capped at {kmax}/{in_features}")
    y = project_capped_mean(x, total / (rows * in_features), kmax / in_features) * in_features
    k = torch.floor(y + 1e-9).long().clamp_(0, kmax)
    frac = y - k.double()
    while True:
        rem = total - int(k.sum())
        if rem == 0:
            break
        if rem > 0:
            pri = torch.where(k < kmax, frac, torch.full_like(frac, -math.inf))
            idx = torch.sort(pri, descending=True, stable=True)[1][:min(rem, int((k < kmax).sum()))]
            k[idx] += 1
        else:
            pri = torch.where(k > 0, frac, torch.full_like(frac, math.inf))
            idx = torch.sort(pri, stable=True)[1][:min(-rem, int((k > 0).sum()))]
            k[idx] -= 1
        frac[idx] = 0.0
    return k.to(device)


def _pick(metrics: list[float], baseline: float) -> int | None:
    """Reference sweep semantics: go through the learning rates in order, stop at the first whose
    metric is not above the previous one; return the index of the best accepted one (> baseline)."""
    best, best_i, prev = baseline, None, float("-inf")
    for i, m in enumerate(metrics):
        if m > best:
            best, best_i = m, i
        if m > prev:
            prev = m
        else:
            break
    return best_i


class TrimSearch:
    """One TRIM search for one linear, on a Gram or explicit evaluator (quality.py)."""

    def __init__(self, settings: TrimSettings):
        self.cfg = settings

    # ---------------------------------------------------------------- sync-free tensor code
    def _counts(self, x: torch.Tensor, n: int, total: torch.Tensor) -> torch.Tensor:
        """Per-row pruned counts (L, rows) for sparsity vectors x (L, rows), on device, no sync."""
        if self.cfg.rounding == "floor":
            return (n * x).long()                       # reference: (width * sparsities).long()
        kmax = int(self.cfg.max_row_sparsity * n + 1e-9)
        y = x.double() * n
        k0 = torch.floor(y + 1e-9).clamp(0, kmax)
        rem = total - k0.sum(-1, keepdim=True)          # weights still to hand out (may be < 0)
        frac = y - k0
        up = torch.where(k0 < kmax, frac, torch.full_like(frac, -math.inf))
        down = torch.where(k0 > 0, frac, torch.full_like(frac, math.inf))
        ar = torch.arange(x.shape[-1], device=x.device).expand(x.shape)
        rank_up = torch.empty(x.shape, dtype=torch.long, device=x.device)
        rank_up.scatter_(-1, torch.sort(up, dim=-1, descending=True, stable=True)[1], ar)
        rank_dn = torch.empty_like(rank_up)
        rank_dn.scatter_(-1, torch.sort(down, dim=-1, stable=True)[1], ar)
        return (k0 + (rank_up < rem).double() - (rank_dn < -rem).double()).long()

    def _evaluate(self, ev, ranks, x, total):
        """x: (L, rows) -> (layer metric (L,), dim quality (L, rows), per-row cosine (L, rows))."""
        k = self._counts(x, ranks.shape[1], total)
        st = ev.stats_from_mask(ranks.unsqueeze(0) < k.unsqueeze(-1))
        lm = layer_metric(self.cfg.layer_metric, st)
        dq = dim_metric(self.cfg.dim_metric, st)
        cos = dq if self.cfg.dim_metric == "cosim" else dim_metric("cosim", st)
        return lm, dq, cos

    def _sweep(self, make_ev, W, src, ranks, s, total, lrs):
        """Baseline and all learning rates of one sweep in parallel (candidate dim L). Pure tensor
        code without host synchronisation, so it can be captured as a CUDA graph."""
        ev = make_ev(src)
        ev.prepare(W)
        rows = ranks.shape[0]
        L = lrs.shape[0]
        x0 = s.to(torch.float32).expand(1, rows)
        base_lm, base_dq, base_cos = self._evaluate(ev, ranks, x0, total)
        lr = lrs.to(torch.float64).unsqueeze(1)
        x = s.to(torch.float32).expand(L, rows).clone()
        best_x = x.clone()
        best_m = base_lm.expand(L).clone()
        best_it = torch.zeros(L, dtype=torch.long, device=W.device)
        dq = base_dq.expand(L, rows)
        for it in range(self.cfg.iterations):
            lo = dq.amin(-1, keepdim=True)
            hi = dq.amax(-1, keepdim=True)
            d = (dq - lo) / (hi - lo + 1e-6) * (lr * 2)
            d = d - d.mean(-1, keepdim=True)
            x = (x.double() + d).to(torch.float32)     # reference: fp32 x += float64 step
            x = x.clamp(0.0, self.cfg.max_row_sparsity)
            x = x - x.mean(-1, keepdim=True) + s.to(torch.float32)
            m, dq, _ = self._evaluate(ev, ranks, x, total)
            better = m > best_m
            best_m = torch.where(better, m, best_m)
            best_x = torch.where(better.unsqueeze(1), x, best_x)
            best_it = torch.where(better, torch.full_like(best_it, it), best_it)
        return base_lm, base_cos, best_x, best_m, best_it

    def _run_sweep(self, make_ev, key, W, src, ranks, s, total, lrs):
        dev = W.device
        inputs = {"W": W, "src": src, "ranks": ranks,
                  "s": torch.tensor(s, dtype=torch.float64, device=dev),
                  "total": torch.tensor(total, dtype=torch.float64, device=dev),
                  "lrs": torch.tensor(lrs, dtype=torch.float64, device=dev)}

        def fn(W, src, ranks, s, total, lrs):
            return self._sweep(make_ev, W, src, ranks, s, total, lrs)

        if GRAPHS.usable(dev, len(lrs) * W.numel()):
            full_key = ("trim", key, tuple(W.shape), tuple(src.shape), W.dtype, src.dtype, len(lrs), self.cfg)
            out = GRAPHS.run(full_key, fn, inputs)
            return tuple(o.clone() for o in out)
        return fn(**inputs)

    # ---------------------------------------------------------------- driver
    @torch.no_grad()
    def run(self, make_ev, key, W: torch.Tensor, src: torch.Tensor, ranks: torch.Tensor, s: float,
            total: int | None = None) -> TrimResult:
        """Search row sparsities for W (rows, in). `make_ev(src)` builds the evaluator from `src` (the Gram
        matrix, or explicit inputs); `key` names the evaluator kind for graph caching. `ranks` =
        row_ranks(importance). `total`: weights to prune in the matrix (default round(s * numel)); the
        scorer passes the count it would prune by itself, so TRIM and the scorer alone compare at equal
        sparsity."""
        rows, n = ranks.shape
        total = int(round(s * rows * n)) if total is None else int(total)
        base_lm, base_cos, bx, bm, bit = self._run_sweep(make_ev, key, W, src, ranks, s, total, self.cfg.lrs)
        baseline = float(base_lm[0])
        best = {"metric": baseline, "x": None, "lr": None, "it": 0}
        candidates = {}
        sweeps = [(tuple(self.cfg.lrs), (bx, bm, bit))]
        if not self.cfg.forbid_neg_lr and self.cfg.neg_lrs:
            sweeps.append((tuple(self.cfg.neg_lrs), None))
        for si, (lrs, out) in enumerate(sweeps):
            if si > 0 and best["lr"] is not None:
                break                                    # negative rates only if no positive one helped
            if out is None:
                out = self._run_sweep(make_ev, key, W, src, ranks, s, total, lrs)[2:]
            bx, bm_t, bit_t = out
            bm, bit = bm_t.tolist(), bit_t.tolist()
            prev = float("-inf")
            for lr, m in zip(lrs, bm):                   # what the sequential reference evaluates
                candidates[lr] = m
                if not m > prev:
                    break
                prev = m
            i = _pick(bm, best["metric"])
            if i is not None:
                best = {"metric": bm[i], "x": bx[i], "lr": lrs[i], "it": bit[i]}
        search_x = best["x"] if best["x"] is not None else torch.full((rows,), s, device=W.device)
        total_t = torch.tensor(total, dtype=torch.float64, device=W.device)
        counts = None
        if self.cfg.rounding == "exact":
            counts = self._counts(search_x.unsqueeze(0), n, total_t)[0]
            if int(counts.sum()) != total or int(counts.min()) < 0:
                counts = None
        if counts is None:                              # reference rounding: project exactly, then round
            counts = exact_counts(search_x, s, n, self.cfg.max_row_sparsity, total)
        ev = make_ev(src)
        ev.prepare(W)
        st = ev.stats_from_mask(ranks < counts.unsqueeze(1))
        fin = torch.stack([layer_metric(self.cfg.layer_metric, st).reshape(()),
                           dim_metric("cosim", st).var(), base_cos[0].var()]).tolist()
        return TrimResult(counts=counts, search_sparsities=search_x.clone(), baseline_metric=baseline,
                          best_metric=float(best["metric"]), final_metric=fin[0],
                          learning_rate=best["lr"], best_iter=int(best["it"]),
                          start_var=fin[2], end_var=fin[1], candidates=candidates)
