"""TRIM — Targeted Row-wise Iterative Metric-driven pruning (Beck, Rudman & Eickhoff 2025).

For a linear W with layer target sparsity s and a per-row importance order, TRIM searches a
per-row sparsity vector x (mean s):

    x_0 = s;  for t = 1..T:  q = dimwise_quality(Y, Y'(x_{t-1}))            (Sec. 3, Eq. 2-4)
                             d = 2 lr (q - min q) / (max q - min q + 1e-6);  x_t = x_{t-1} + d - mean(d)
                             x_t = clip(x_t, 0, 0.95);  x_t = x_t - mean(x_t) + s
    keep the x_t with the best layer metric; learning rates are tried upward (0.01 ... 0.16,
    stopping at the first that does not improve), then negative ones if none beats uniform.

Here the learning rates of a sweep run either as one batched computation (a leading candidate
dimension, replayed as a CUDA graph on small matrices) or, for large matrices, one after the other
with the reference's early stop (same result, fewer FLOPs); every mask comes from one sort per
matrix (`row_ranks`) by comparison, and nothing leaves the device inside the iterations. The chosen
vector is finally projected exactly onto {x in [0, x_max]^rows : mean(x) = s} and rounded to integer
counts whose total is round(s*rows*in).
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
    # learning rates evaluated "parallel" (one batched sweep, CUDA-graph replay: small matrices),
    # "sequential" (stop at the first that does not improve: fewer FLOPs for large ones), or "auto"
    lr_search: str = "auto"

    @classmethod
    def from_config(cls, cfg) -> "TrimSettings":
        return cls(iterations=cfg.trim_iterations, layer_metric=cfg.trim_metric, dim_metric=cfg.trim_dim_metric,
                   lrs=tuple(cfg.trim_lrs), neg_lrs=tuple(cfg.trim_neg_lrs), forbid_neg_lr=cfg.trim_forbid_neg_lr,
                   max_row_sparsity=cfg.trim_max_row_sparsity,
                   rounding="floor" if cfg.trim_inputs == "last-token" else "exact",
                   lr_search=cfg.trim_lr_search)


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
    row_sparsity: tuple              # min, mean, max of the final row sparsities

    def summary(self) -> dict:
        lo, mean, hi = self.row_sparsity
        return {"baseline_metric": self.baseline_metric, "best_metric": self.best_metric,
                "final_metric": self.final_metric, "lr": self.learning_rate, "best_iter": self.best_iter,
                "row_quality_var_before": self.start_var, "row_quality_var_after": self.end_var,
                "row_sparsity_min": lo, "row_sparsity_mean": mean, "row_sparsity_max": hi,
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
    """TRIM searches for P linears of one shape at once (leading dimension P), on a Gram or explicit
    evaluator (quality.py). All learning rates of a sweep are a second batch dimension L."""

    def __init__(self, settings: TrimSettings):
        self.cfg = settings

    # ---------------------------------------------------------------- sync-free tensor code
    def _counts(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """Per-row pruned counts for sparsity vectors x (..., rows) inside the search: floor as the
        reference, or (default) round-half-even, which is unbiased, so candidates are compared at
        the same sparsity up to a few weights (the final allocation is made exact separately)."""
        if self.cfg.rounding == "floor":
            return (n * x).long()                       # reference: (width * sparsities).long()
        kmax = int(self.cfg.max_row_sparsity * n + 1e-9)
        return torch.round(x.double() * n).clamp_(0, kmax).long()

    def _evaluate(self, ev, ranks, x):
        """x: (P, L, rows) -> (layer metric (P, L), dim quality (P, L, rows), row cosine (P, L, rows))."""
        k = self._counts(x, ranks.shape[-1])
        st = ev.stats_from_counts(k, ranks)
        lm = layer_metric(self.cfg.layer_metric, st)
        dq = dim_metric(self.cfg.dim_metric, st)
        cos = dq if self.cfg.dim_metric == "cosim" else dim_metric("cosim", st)
        return lm, dq, cos

    def _iterate(self, ev, ranks, s3, base_lm, base_dq, lrs):
        """The TRIM iterations for every learning rate of `lrs` (L,) at once, from the uniform
        allocation s3 (P, 1, 1) with layer metric base_lm (P, 1) and dimension-wise quality base_dq
        (P, 1, rows). Per rate: the best x, its metric (the baseline when nothing beat it), iteration."""
        P, rows, _ = ranks.shape
        L = lrs.shape[0]
        lr = lrs.to(torch.float64).view(1, L, 1)
        x = s3.expand(P, L, rows).clone()
        best_x = x.clone()
        best_m = base_lm.expand(P, L).clone()
        best_it = torch.zeros(P, L, dtype=torch.long, device=ranks.device)
        dq = base_dq.expand(P, L, rows)
        for it in range(self.cfg.iterations):
            lo = dq.amin(-1, keepdim=True)
            hi = dq.amax(-1, keepdim=True)
            d = (dq - lo) / (hi - lo + 1e-6) * (lr * 2)
            d = d - d.mean(-1, keepdim=True)
            x = (x.double() + d).to(torch.float32)     # reference: fp32 x += float64 step
            x = x.clamp(0.0, self.cfg.max_row_sparsity)
            x = x - x.mean(-1, keepdim=True) + s3
            m, dq, _ = self._evaluate(ev, ranks, x)
            better = m > best_m
            best_m = torch.where(better, m, best_m)
            best_x = torch.where(better.unsqueeze(-1), x, best_x)
            best_it = torch.where(better, torch.full_like(best_it, it), best_it)
        return best_x, best_m, best_it

    def _start(self, make_ev, W, src, ranks, s):
        """The evaluator for P linears, and the uniform allocation s3 (P, 1, 1) with its layer metric,
        dimension-wise quality and row cosine. s: (P,) tensor."""
        ev = make_ev(src)
        ev.prepare(W)
        P, rows, _ = ranks.shape
        s3 = s.to(torch.float32).view(P, 1, 1)
        return (ev, s3) + self._evaluate(ev, ranks, s3.expand(P, 1, rows))

    def _sweep(self, make_ev, W, src, ranks, s, lrs):
        """Uniform baseline and every learning rate of one sweep for P linears. Pure tensor code, no
        host synchronisation, so it can be captured as a CUDA graph.
        W (P, rows, in), ranks (P, rows, in), s (P,), lrs (L,)."""
        ev, s3, base_lm, base_dq, base_cos = self._start(make_ev, W, src, ranks, s)
        best_x, best_m, best_it = self._iterate(ev, ranks, s3, base_lm, base_dq, lrs)
        return base_lm[:, 0], base_cos[:, 0], best_x, best_m, best_it

    def _parallel(self, make_ev, key, W, src, ranks, s, lrs):
        dev = W.device
        inputs = {"W": W, "src": src, "ranks": ranks, "s": torch.tensor(s, dtype=torch.float64, device=dev),
                  "lrs": torch.tensor(lrs, dtype=torch.float64, device=dev)}

        def fn(W, src, ranks, s, lrs):
            return self._sweep(make_ev, W, src, ranks, s, lrs)

        if GRAPHS.usable(dev, len(lrs) * W.numel()):
            full_key = ("trim", key, tuple(W.shape), tuple(src.shape), src.stride(0) == 0, W.dtype, src.dtype,
                        len(lrs), self.cfg)
            return tuple(o.clone() for o in GRAPHS.run(full_key, fn, inputs))
        return fn(**inputs)

    def _sequential(self, make_ev, W, src, ranks, s, lrs):
        """The reference's order: one learning rate after the other, each linear stopping at its first
        rate that does not improve on the previous one. Same results as the parallel sweep (the
        rates it skips are exactly those the parallel sweep evaluates and then ignores), fewer
        FLOPs; used where the matrices are large enough to be compute-bound."""
        P, rows, _ = ranks.shape
        L = len(lrs)
        dev = W.device
        ev, s3, base_lm, base_dq, base_cos = self._start(make_ev, W, src, ranks, torch.tensor(s, device=dev))
        bx = s3.expand(P, L, rows).clone()
        bm = [[-math.inf] * L for _ in range(P)]
        bit = [[0] * L for _ in range(P)]
        prev = [-math.inf] * P
        active, cur = list(range(P)), (list(range(P)), ev, ranks)
        for j, lr in enumerate(lrs):
            if not active:
                break
            t = torch.tensor(active, device=dev)
            if active != cur[0]:
                sub = make_ev(src[t])
                sub.prepare(W[t])
                cur = (list(active), sub, ranks[t])
            x, m, it = self._iterate(cur[1], cur[2], s3[t], base_lm[t], base_dq[t],
                                     torch.tensor([lr], dtype=torch.float64, device=dev))
            ml, il = m[:, 0].tolist(), it[:, 0].tolist()
            nxt = []
            for a, p in enumerate(active):
                bx[p, j] = x[a, 0]
                bm[p][j] = ml[a]
                bit[p][j] = il[a]
                if ml[a] > prev[p]:
                    prev[p] = ml[a]
                    nxt.append(p)
            active = nxt
        return (base_lm[:, 0], base_cos[:, 0], bx, torch.tensor(bm, dtype=torch.float64, device=dev),
                torch.tensor(bit, device=dev))

    def _run_sweep(self, make_ev, key, W, src, ranks, s, lrs):
        mode = self.cfg.lr_search
        if mode == "auto":
            mode = "parallel" if GRAPHS.usable(W.device, len(lrs) * W.numel()) else "sequential"
        if mode == "parallel":
            return self._parallel(make_ev, key, W, src, ranks, s, lrs)
        return self._sequential(make_ev, W, src, ranks, s, lrs)

    def _final_counts(self, x: torch.Tensor, n: int, totals: list[int]) -> torch.Tensor:
        """Exact integer allocation (P, rows): every row in [0, floor(0.95 in)], totals exact."""
        kmax = int(self.cfg.max_row_sparsity * n + 1e-9)
        if self.cfg.rounding == "exact":
            y = x.double() * n
            k0 = torch.floor(y + 1e-9).clamp(0, kmax)
            rem = torch.tensor(totals, dtype=torch.float64, device=x.device).unsqueeze(1) - k0.sum(-1, keepdim=True)
            frac = y - k0
            key = torch.where(rem >= 0, torch.where(k0 < kmax, frac, torch.full_like(frac, -math.inf)),
                              torch.where(k0 > 0, -frac, torch.full_like(frac, -math.inf)))
            rank = torch.empty(x.shape, dtype=torch.long, device=x.device)
            rank.scatter_(-1, torch.sort(key, dim=-1, descending=True, stable=True)[1],
                          torch.arange(x.shape[-1], device=x.device).expand(x.shape))
            k = (k0 + torch.sign(rem) * (rank < rem.abs()).double()).long()
            ok = (k.sum(-1) == torch.tensor(totals, device=x.device)) & (k.min(-1).values >= 0) & \
                 (k.max(-1).values <= kmax)
            ok = ok.tolist()
        else:
            k, ok = torch.zeros(x.shape, dtype=torch.long, device=x.device), [False] * x.shape[0]
        for p in range(x.shape[0]):
            if not ok[p]:      # reference rounding or a pathological vector: exact projection, then round
                k[p] = exact_counts(x[p], totals[p] / (x.shape[-1] * n), n, self.cfg.max_row_sparsity, totals[p])
        return k

    # ---------------------------------------------------------------- driver
    @torch.no_grad()
    def run_many(self, make_ev, key, W: torch.Tensor, src: torch.Tensor, ranks: torch.Tensor, s: list[float],
                 totals: list[int]) -> list[TrimResult]:
        """Search row sparsities for P linears of one shape: W (P, rows, in), `src` (P, ...) the Gram
        matrices or explicit inputs that `make_ev(src)` turns into an evaluator (`key` names that
        evaluator for graph caching), ranks = row_ranks(importance) (P, rows, in), s the targets,
        totals the numbers of weights each matrix must lose (the scorer's own count, so TRIM and the
        scorer alone compare at equal sparsity)."""
        P, rows, n = ranks.shape
        base_lm, base_cos, bx, bm, bit = self._run_sweep(make_ev, key, W, src, ranks, s, self.cfg.lrs)
        host = torch.cat([base_lm.unsqueeze(1), bm, bit.to(bm.dtype)], 1).tolist()     # one transfer
        L = bm.shape[1]
        baseline = [h[0] for h in host]
        sweeps = [(tuple(self.cfg.lrs), list(range(P)), (bx, [h[1:1 + L] for h in host],
                                                          [[int(v) for v in h[1 + L:]] for h in host]))]
        best = [{"metric": baseline[p], "x": None, "lr": None, "it": 0} for p in range(P)]
        candidates = [dict() for _ in range(P)]
        neg = tuple(self.cfg.neg_lrs) if not self.cfg.forbid_neg_lr else ()
        while sweeps:
            lrs, idx, (bx, bm, bit) = sweeps.pop(0)
            for j, p in enumerate(idx):
                prev = float("-inf")
                for lr, m in zip(lrs, bm[j]):           # what the sequential reference evaluates
                    candidates[p][lr] = m
                    if not m > prev:
                        break
                    prev = m
                i = _pick(bm[j], best[p]["metric"])
                if i is not None:
                    best[p] = {"metric": bm[j][i], "x": bx[j, i], "lr": lrs[i], "it": bit[j][i]}
            if lrs == tuple(self.cfg.lrs) and neg:
                todo = [p for p in range(P) if best[p]["lr"] is None]   # negative rates only if no positive helped
                if todo:
                    t = torch.tensor(todo, device=W.device)
                    o = self._run_sweep(make_ev, key, W[t], src[t], ranks[t], [s[p] for p in todo], neg)
                    sweeps.append((neg, todo, (o[2], o[3].tolist(), o[4].tolist())))
        search_x = torch.stack([b["x"] if b["x"] is not None else torch.full((rows,), s[p], device=W.device)
                                for p, b in enumerate(best)])
        counts = self._final_counts(search_x, n, totals)
        ev = make_ev(src)
        ev.prepare(W)
        st = ev.stats_from_counts(counts.unsqueeze(1), ranks)
        x = counts.double() / n
        fin = torch.stack([layer_metric(self.cfg.layer_metric, st)[:, 0], dim_metric("cosim", st)[:, 0].var(-1),
                           base_cos.var(-1), x.amin(-1), x.mean(-1), x.amax(-1)]).tolist()
        return [TrimResult(counts=counts[p], search_sparsities=search_x[p], baseline_metric=baseline[p],
                           best_metric=float(best[p]["metric"]), final_metric=fin[0][p],
                           learning_rate=best[p]["lr"], best_iter=int(best[p]["it"]), start_var=fin[2][p],
                           end_var=fin[1][p], candidates=candidates[p],
                           row_sparsity=(fin[3][p], fin[4][p], fin[5][p])) for p in range(P)]

    def run(self, make_ev, key, W: torch.Tensor, src: torch.Tensor, ranks: torch.Tensor, s: float,
            total: int | None = None) -> TrimResult:
        """One linear: W (rows, in), src (in, in) Gram or (in, T) inputs, ranks (rows, in)."""
        rows, n = ranks.shape
        total = int(round(s * rows * n)) if total is None else int(total)
        return self.run_many(make_ev, key, W.unsqueeze(0), src.unsqueeze(0), ranks.unsqueeze(0), [s], [total])[0]
