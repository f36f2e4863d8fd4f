"""TRIM — Targeted Row-wise Iterative Metric-driven pruning (Beck, Rudman & Eickhoff 2025).

For a linear W with layer target sparsity s and a per-row importance order, TRIM searches a
per-row sparsity vector x (mean s):

    x_0 = s;  for t = 1..T:  q = dimwise_quality(Y, Y'(x_{t-1}))            (Sec. 3, Eq. 2-4)
                             d = 2 lr (q - min q) / (max q - min q + 1e-6);  x_t = x_{t-1} + d - mean(d)
                             x_t = clip(x_t, 0, 0.95);  x_t = x_t - mean(x_t) + s
    keep the x_t with the best layer metric; learning rates are tried upward (0.01 ... 0.16,
    stopping at the first that does not improve), then negative ones if none beats uniform.

Here the learning rates run either as one batched computation (a leading candidate dimension; on
small matrices the whole search of a shape class, choice and final counts included, is one CUDA
graph, and the classes of a block overlap on side streams) or, for large matrices, one after the
other with the reference's early stop (same result, fewer FLOPs). When the evaluator reads each
candidate's statistics from prefix tables (quality.GramEvaluator on small GPU matrices, the OBS
proxy), all rates, negative ones included, are one batch, and on the GPU the iterations are one
fused kernel (kernels.trim_iterations); otherwise the negative rates are a second batch, run only
where a linear needs them. Every mask comes from one sort per matrix
(`row_ranks`) by comparison, and nothing leaves the device inside the iterations. The chosen vector
is finally projected exactly onto {x in [0, x_max]^rows : mean(x) = s} and rounded to integer
counts whose total is round(s*rows*in).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from .graphs import GRAPHS, host_to_device
from .kernels import fused_iterations_ok, run_or_fallback, trim_iterations
from .quality import dim_metric, layer_metric

log = logging.getLogger("trimprune")


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


def project_capped_mean(x: torch.Tensor, s, cap: float, iters: int = 64) -> torch.Tensor:
    """Euclidean projection of each x (..., n) onto {y in [0, cap]^n : mean(y) = s}: y = clip(x - tau, 0, cap)
    with tau found by bisection (mean(clip(x - tau)) is monotone in tau). `s` a float or one per vector;
    no host synchronisation (64 halvings exhaust float64)."""
    x = x.double()
    s = torch.as_tensor(s, dtype=torch.float64, device=x.device)
    s = s.unsqueeze(-1) if s.dim() else s
    lo = x.amin(-1, keepdim=True) - cap
    hi = x.amax(-1, keepdim=True)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        above = (x - mid).clamp(0.0, cap).mean(-1, keepdim=True) > s
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
    return (x - 0.5 * (lo + hi)).clamp(0.0, cap)


def capped_counts(x: torch.Tensor, n: int, totals: torch.Tensor, cap: float):
    """Integer pruned-counts (P, rows) from row sparsities x (P, rows) of matrices with n inputs: every
    row in [0, floor(cap n)], row sums exactly `totals` (P,). Project the fractions onto the capped
    set with the right mean (TRIM's re-centred vectors can leave the bounds), floor, then hand the
    remainder to the rows with the largest fractional parts (take it from the smallest when the
    floors overshoot). After the projection the remainder is below the number of rows that can take
    one more weight, so one round suffices; `ok` (P,) guards the float arithmetic. No host
    synchronisation."""
    P, rows = x.shape
    kmax = int(cap * n + 1e-9)
    tot = totals.to(torch.float64).unsqueeze(1)
    y = project_capped_mean(x, tot[:, 0] / (rows * n), kmax / n) * n
    k0 = torch.floor(y + 1e-9).clamp(0, kmax)
    rem = tot - k0.sum(-1, keepdim=True)
    frac = y - k0
    key = torch.where(rem >= 0, torch.where(k0 < kmax, frac, torch.full_like(frac, -math.inf)),
                      torch.where(k0 > 0, -frac, torch.full_like(frac, -math.inf)))
    rank = torch.empty(x.shape, dtype=torch.long, device=x.device)
    rank.scatter_(-1, torch.sort(key, dim=-1, descending=True, stable=True)[1],
                  torch.arange(rows, device=x.device).expand(P, rows))
    k = (k0 + torch.sign(rem) * (rank < rem.abs()).double()).long()
    ok = (k.sum(-1) == totals) & (k.amin(-1) >= 0) & (k.amax(-1) <= kmax)
    return k, ok


def exact_counts(x: torch.Tensor, s: float, in_features: int, cap: float, total: int | None = None) -> torch.Tensor:
    """`capped_counts` for one vector of row sparsities x (rows,), on the host, with the total
    round(s * rows * in) unless given; should the one round miss (float edge cases), the remaining
    weights are handed out one round after another by the same rule."""
    device = x.device
    x = x.detach().cpu()
    rows = x.numel()
    kmax = int(cap * in_features + 1e-9)
    if total is None:
        total = int(round(s * rows * in_features))
    if not 0 <= total <= rows * kmax:
        raise ValueError(f"sparsity {s} is not reachable with rows capped at {kmax}/{in_features}")
    k, ok = capped_counts(x.reshape(1, rows), in_features, torch.tensor([total]), cap)
    k = k[0]
    if not bool(ok[0]):
        k = _repair_counts(x, k, total, in_features, kmax)
    return k.to(device)


def _repair_counts(x: torch.Tensor, k: torch.Tensor, total: int, n: int, kmax: int) -> torch.Tensor:
    """Counts k (rows,) brought into [0, kmax] and to the exact total, by the rule of `capped_counts`
    repeated until nothing is left (host code, for the rare case one round did not suffice)."""
    k = k.clamp(0, kmax)
    frac = project_capped_mean(x, total / (x.numel() * n), kmax / n) * n - k.double()
    while True:
        rem = total - int(k.sum())
        if rem == 0:
            return k
        if rem > 0:
            pri = torch.where(k < kmax, frac, torch.full_like(frac, -math.inf))
            idx = torch.sort(pri, descending=True, stable=True)[1][:min(rem, int((k < kmax).sum()))]
            k[idx] += 1
        else:
            pri = torch.where(k > 0, frac, torch.full_like(frac, math.inf))
            idx = torch.sort(pri, stable=True)[1][:min(-rem, int((k > 0).sum()))]
            k[idx] -= 1
        frac[idx] = 0.0


def improving_prefix(m: torch.Tensor) -> torch.Tensor:
    """The reference's learning-rate sweep stops at the first rate whose metric is not above the
    previous one. For metrics m (P, L) in the order tried: how many rates form the strictly
    increasing prefix (P,). The rates evaluated are the prefix and the one that ended it; the one
    kept is the prefix's last, if it beats uniform (`kept_rate`)."""
    prev = torch.cat([torch.full_like(m[:, :1], -math.inf), m[:, :-1]], 1)
    return (m > prev).long().cummin(1).values.sum(1)


def kept_rate(m: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
    """Index of the learning rate the reference keeps for metrics m (P, L), or -1 when none beats the
    baseline (P,): along a strictly increasing prefix the best is its last element."""
    a = improving_prefix(m)
    last = (a - 1).clamp(min=0)
    val = m.gather(1, last.unsqueeze(1)).squeeze(1)
    return torch.where((a > 0) & (val > baseline), last, torch.full_like(last, -1))


@dataclass
class _Pending:
    """A TRIM search launched for P linears; `TrimSearch.finish` turns it into TrimResults."""
    out: tuple                 # counts (P, rows), search x (P, rows), packed (P, K), then bx, bm, bit of the rates
    event: object              # CUDA event after the work (side-stream graph replay), or None
    args: tuple                # (make_ev, key, W, src, ranks, s tensor, totals, totals tensor)
    keep: dict                 # inputs referenced until the side stream is done
    neg_open: bool = False     # only the positive rates were evaluated; the negative ones may be needed


@dataclass
class TrimHandle:
    """One linear's search result as `TrimSearch.finish(defer=True)` returns it: the final counts and
    the packed statistics stay on the device, so the caller can go on queueing work that depends on
    them; `TrimSearch.resolve` turns the packed row, once read, into a TrimResult. `result` is set
    when the search was read already (its negative rates had to be decided on the host)."""
    pending: _Pending
    index: int
    result: TrimResult | None = None

    @property
    def counts(self) -> torch.Tensor:
        return self.result.counts if self.result is not None else self.pending.out[0][self.index]

    @property
    def packed(self) -> torch.Tensor:
        """(K,) float64 on the device: baseline | metrics | iterations | TrimSearch._TAIL."""
        return self.pending.out[2][self.index]

    def metric(self, which: str) -> torch.Tensor:
        """The baseline (uniform) or final layer metric as a 0-dim device tensor."""
        if self.result is not None:
            v = self.result.baseline_metric if which == "baseline" else self.result.final_metric
            return torch.tensor(v, dtype=torch.float64, device=self.counts.device)
        return self.packed[0] if which == "baseline" else self.packed[-TrimSearch._TAIL + 3]


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
        P, _, n = ranks.shape
        tables = getattr(ev, "count_tables", lambda: None)()
        if (tables is not None and self.cfg.rounding == "exact"
                and fused_iterations_ok(ranks.device, self.cfg.layer_metric, self.cfg.dim_metric)):
            kmax = int(self.cfg.max_row_sparsity * n + 1e-9)
            return run_or_fallback(
                lambda: trim_iterations(tables, ev.yy, s3.view(P), base_lm[:, 0], base_dq[:, 0],
                                        lrs.to(torch.float64), self.cfg.iterations, self.cfg.max_row_sparsity, kmax,
                                        ev.T, self.cfg.layer_metric, self.cfg.dim_metric),
                lambda: self._iterate_tensors(ev, ranks, s3, base_lm, base_dq, lrs))
        return self._iterate_tensors(ev, ranks, s3, base_lm, base_dq, lrs)

    def _iterate_tensors(self, ev, ranks, s3, base_lm, base_dq, lrs):
        P, rows, _ = ranks.shape
        L = lrs.shape[0]
        lr = lrs.to(torch.float64).view(1, L, 1)
        x = s3.expand(P, L, rows).clone()
        best_x = x.clone()
        best_m = base_lm.expand(P, L).clone()
        best_it = torch.zeros(P, L, dtype=torch.long, device=ranks.device)
        dq = base_dq.expand(P, L, rows)
        lr2 = lr * 2
        for it in range(self.cfg.iterations):
            lo, hi = torch.aminmax(dq, dim=-1, keepdim=True)
            d = (dq - lo) / (hi - lo + 1e-6) * lr2
            d = d - d.mean(-1, keepdim=True)
            x = (x.double() + d).to(torch.float32)     # reference: fp32 x += float64 step
            x = x.clamp(0.0, self.cfg.max_row_sparsity)
            # the reference's float32 mean; with exact counts a float64 one, which does not depend on
            # the summation order (the fused kernel sums in its own order)
            mean = x.mean(-1, keepdim=True) if self.cfg.rounding == "floor" else \
                x.mean(-1, keepdim=True, dtype=torch.float64).to(torch.float32)
            x = x - mean + s3
            m, dq, _ = self._evaluate(ev, ranks, x)
            better = m > best_m
            best_m = torch.where(better, m, best_m)
            best_x = torch.where(better.unsqueeze(-1), x, best_x)
            best_it = torch.where(better, it, best_it)
        return best_x, best_m, best_it

    def _start(self, make_ev, W, src, ranks, s):
        """The evaluator for P linears, and the uniform allocation s3 (P, 1, 1) with its layer metric,
        dimension-wise quality and row cosine. s: (P,) tensor."""
        ev = make_ev(src)
        ev.prepare(W)
        P, rows, _ = ranks.shape
        s3 = s.to(torch.float32).view(P, 1, 1)
        return (ev, s3) + self._evaluate(ev, ranks, s3.expand(P, 1, rows))

    @property
    def all_lrs(self) -> tuple:
        """The positive rates, then the negative ones (tried only when no positive rate beats uniform)."""
        return tuple(self.cfg.lrs) + (() if self.cfg.forbid_neg_lr else tuple(self.cfg.neg_lrs))

    def _whole(self, make_ev, W, src, ranks, s, lrs, totals, done=None):
        """Uniform baseline, the learning rates `lrs` as one batch, the reference's choice and the
        exact final allocation for P linears. `done` = (x, metric, iteration) of rates evaluated
        before (the positive ones, when the negative ones follow); rates not evaluated count as -inf.
        Pure tensor code with no host synchronisation: captured as one CUDA graph on small matrices.
        W (P, rows, in), ranks (P, rows, in), s (P,), lrs (L,), totals (P,)."""
        ev, s3, base_lm, base_dq, base_cos = self._start(make_ev, W, src, ranks, s)
        bx, bm, bit = self._iterate(ev, ranks, s3, base_lm, base_dq, lrs)
        if done is not None:
            bx, bm, bit = (torch.cat([a, b], 1) for a, b in zip(done, (bx, bm, bit)))
        P, L, rows = bx.shape
        pad = len(self.all_lrs) - L
        if pad:
            bx = torch.cat([bx, s3.expand(P, pad, rows)], 1)
            bm = torch.cat([bm, bm.new_full((P, pad), -math.inf)], 1)
            bit = torch.cat([bit, bit.new_zeros(P, pad)], 1)
        return self._conclude(ev, ranks, s3, base_lm, base_cos, bx, bm, bit, totals) + (bx[:, :L], bm[:, :L],
                                                                                        bit[:, :L])

    def _sequential(self, make_ev, W, src, ranks, s, totals):
        """The reference's order: one learning rate after the other, each linear stopping at its first
        rate that does not improve on the previous one, negative rates only for linears that no
        positive rate improved. Same results as `_whole` (the rates it skips are exactly those the
        batch evaluates and then ignores), fewer FLOPs; for matrices large enough to be compute-bound."""
        P, rows, _ = ranks.shape
        dev = W.device
        lrs = self.all_lrs
        L, Lp = len(lrs), len(self.cfg.lrs)
        ev, s3, base_lm, base_dq, base_cos = self._start(make_ev, W, src, ranks, s)
        bx = s3.expand(P, L, rows).clone()
        bm = torch.full((P, L), -math.inf, dtype=torch.float64, device=dev)
        bit = torch.zeros(P, L, dtype=torch.long, device=dev)
        lr_t = torch.tensor(lrs, dtype=torch.float64, device=dev)
        sweeps = [(0, Lp, list(range(P)))]
        cur = (list(range(P)), ev, ranks)
        while sweeps:
            j0, j1, active = sweeps.pop(0)
            for j in range(j0, j1):
                if not active:
                    break
                t = torch.tensor(active, device=dev)
                if active != cur[0]:
                    sub = make_ev(src[t])
                    sub.prepare(W[t])
                    cur = (list(active), sub, ranks[t])
                x, m, it = self._iterate(cur[1], cur[2], s3[t], base_lm[t], base_dq[t], lr_t[j:j + 1])
                bx[t, j], bm[t, j], bit[t, j] = x[:, 0], m[:, 0], it[:, 0]
                going = (improving_prefix(bm[t, j0:j + 1]) == j + 1 - j0).tolist()
                active = [p for p, g in zip(active, going) if g]
            if j0 == 0 and L > Lp:
                none = (kept_rate(bm[:, :Lp], base_lm[:, 0]) < 0).tolist()
                todo = [p for p in range(P) if none[p]]
                if todo:
                    sweeps.append((Lp, L, todo))
        return self._conclude(ev, ranks, s3, base_lm, base_cos, bx, bm, bit, totals)

    # packed per-linear results (one host transfer): baseline | metrics (L) | iterations (L) |
    # positive prefix, negative prefix, choice | final metric, row-cosine var after, before,
    # row sparsity min, mean, max | counts ok
    _TAIL = 10

    def _conclude(self, ev, ranks, s3, base_lm, base_cos, bx, bm, bit, totals):
        """The kept rate of each linear (a positive one, else a negative one, else uniform), its x,
        the exact integer allocation and its statistics. -> counts (P, rows), x (P, rows), packed."""
        P, rows, n = ranks.shape
        L, Lp = bm.shape[1], len(self.cfg.lrs)
        base = base_lm[:, 0]
        a_pos = improving_prefix(bm[:, :Lp])
        choice = kept_rate(bm[:, :Lp], base)
        a_neg = torch.zeros_like(a_pos)
        if L > Lp:
            a_neg = improving_prefix(bm[:, Lp:])
            neg = kept_rate(bm[:, Lp:], base)
            choice = torch.where(choice >= 0, choice, torch.where(neg >= 0, neg + Lp, neg))
        pick = bx.gather(1, choice.clamp(min=0).view(P, 1, 1).expand(P, 1, rows)).squeeze(1)
        x = torch.where((choice >= 0).unsqueeze(-1), pick, s3[:, 0].expand(P, rows))
        counts, ok = capped_counts(x, n, totals, self.cfg.max_row_sparsity)
        fin = self._final_stats(ev, ranks, counts)
        tail = torch.cat([torch.stack([a_pos.double(), a_neg.double(), choice.double()], 1), fin[:, :2],
                          base_cos[:, 0].var(-1).unsqueeze(1), fin[:, 2:], ok.double().unsqueeze(1)], 1)
        return counts, x, torch.cat([base.unsqueeze(1), bm, bit.double(), tail], 1)

    def _final_stats(self, ev, ranks, counts) -> torch.Tensor:
        """(P, 5): layer metric, variance of the row cosines, min / mean / max row sparsity of `counts`."""
        st = ev.stats_from_counts(counts.unsqueeze(1), ranks)
        xf = counts.double() / ranks.shape[-1]
        return torch.stack([layer_metric(self.cfg.layer_metric, st)[:, 0], dim_metric("cosim", st)[:, 0].var(-1),
                            xf.amin(-1), xf.mean(-1), xf.amax(-1)], 1)

    # ---------------------------------------------------------------- driver
    @torch.no_grad()
    def launch(self, make_ev, key, W: torch.Tensor, src: torch.Tensor, ranks: torch.Tensor, s: list[float],
               totals: list[int]) -> _Pending:
        """Start the search for P linears of one shape (arguments as `run_many`). The batched search
        on a GPU is a CUDA graph replayed on a side stream, so the searches of a block's shape classes
        overlap on the device; `finish` collects them. The batch holds the positive rates; the
        negative ones, needed by few linears, are a second batch that `finish` starts where needed."""
        dev = W.device
        # candidates read from prefix tables cost no matrix product: every rate, the negative ones
        # included, is then one batch, whatever the matrix size
        cheap = getattr(make_ev(src), "counts_from_tables", lambda rows: False)(W.shape[-2])
        graph = GRAPHS.usable(dev, len(self.all_lrs) * W.numel())
        mode = self.cfg.lr_search
        if mode == "auto":
            mode = "parallel" if graph or cheap else "sequential"
        s_t = host_to_device(s, torch.float64, dev)
        tot_t = host_to_device(totals, torch.long, dev)
        args = (make_ev, key, W, src, ranks, s_t, totals, tot_t)
        if mode == "sequential":
            return _Pending(self._sequential(make_ev, W, src, ranks, s_t, tot_t), None, args, {})
        pending = self._batch(args, self.all_lrs if cheap else tuple(self.cfg.lrs), graph, cheap)
        pending.neg_open = not cheap and len(self.all_lrs) > len(self.cfg.lrs)
        return pending

    def _batch(self, args, lrs, graph, tables: bool, done=None) -> _Pending:
        """Launch the batched search over `lrs`; `tables`: the evaluator reads prefix tables (part of the
        graph's key: it changes the captured work)."""
        make_ev, key, W, src, ranks, s_t, _, tot_t = args
        inputs = {"W": W, "src": src, "ranks": ranks, "s": s_t, "totals": tot_t,
                  "lrs": host_to_device(lrs, torch.float64, W.device)}
        if done is not None:
            inputs.update(zip(("done_x", "done_m", "done_it"), done))

        def fn(W, src, ranks, s, lrs, totals, **d):
            return self._whole(make_ev, W, src, ranks, s, lrs, totals,
                               (d["done_x"], d["done_m"], d["done_it"]) if d else None)

        if graph:
            full_key = ("trim", key, lrs, tables, tuple(W.shape), tuple(src.shape), src.stride(0) == 0, W.dtype,
                        src.dtype, self.cfg)
            out, event = GRAPHS.run_async(full_key, fn, inputs)
            return _Pending(out, event, args, inputs)
        return _Pending(fn(**inputs), None, args, {})

    @torch.no_grad()
    def finish(self, pending: list[_Pending], defer: bool = False) -> list[list]:
        """Wait for launched searches and read their results (one host transfer; a second one when
        some linears needed the negative rates). With `defer`, TrimHandles: nothing is read where no
        negative rate is left open (the current stream just waits for the searches), so the host
        does not wait for the device; `resolve` reads them later."""
        if not pending:
            return []
        if defer and not any(p.neg_open for p in pending):
            self._wait(pending)
            return [[TrimHandle(p, j) for j in range(p.out[2].shape[0])] for p in pending]
        out = self._finish_now(pending)
        if defer:
            return [[TrimHandle(p, j, r) for j, r in enumerate(rs)] for p, rs in zip(pending, out)]
        return out

    def _finish_now(self, pending: list[_Pending]) -> list[list[TrimResult]]:
        host = self._collect(pending)
        Lp, T = len(self.cfg.lrs), self._TAIL
        redo = [i for i, p in enumerate(pending) if p.neg_open and any(h[-T + 2] < 0 for h in host[i])]
        if redo:
            neg = tuple(self.all_lrs[Lp:])
            # only searches without tables leave the negative rates open (`launch`)
            again = [self._batch(pending[i].args, neg, pending[i].event is not None, False, done=pending[i].out[3:])
                     for i in redo]
            for i, p, h in zip(redo, again, self._collect(again)):
                pending[i], host[i] = p, h
        return [self._results(p, h) for p, h in zip(pending, host)]

    @staticmethod
    def _wait(pending: list[_Pending]) -> None:
        """Make the current stream wait for searches replayed on side streams."""
        for p in pending:
            if p.event is not None:
                torch.cuda.current_stream().wait_event(p.event)

    @classmethod
    def _collect(cls, pending: list[_Pending]) -> list[list[list[float]]]:
        cls._wait(pending)
        flat = torch.cat([p.out[2] for p in pending]).tolist()      # one transfer
        out, i = [], 0
        for p in pending:
            n = p.out[2].shape[0]
            out.append(flat[i:i + n])
            i += n
        return out

    def _results(self, p: _Pending, host: list[list[float]]) -> list[TrimResult]:
        make_ev, _, W, src, ranks, _, totals, _ = p.args
        counts, x = p.out[:2]
        P, rows, n = ranks.shape
        T = self._TAIL
        bad = [j for j, h in enumerate(host) if not h[-1]]
        if bad:     # a pathological vector: exact projection and rounding on the host, then re-measure
            counts = counts.clone()
            for j in bad:
                counts[j] = exact_counts(x[j], totals[j] / (rows * n), n, self.cfg.max_row_sparsity, totals[j])
            ev = make_ev(src)
            ev.prepare(W)
            fix = self._final_stats(ev, ranks, counts).tolist()
            for j in bad:
                h = host[j]
                h[-T + 3], h[-T + 4] = fix[j][0], fix[j][1]
                h[-T + 6:-1] = fix[j][2:]
        return [self._result(counts[j], x[j], h) for j, h in enumerate(host)]

    def _result(self, counts: torch.Tensor, x: torch.Tensor, h: list[float]) -> TrimResult:
        """A TrimResult from one linear's packed row `h` (read to the host)."""
        lrs = self.all_lrs
        L, Lp, T = len(lrs), len(self.cfg.lrs), self._TAIL
        base, bm, bit = h[0], h[1:1 + L], h[1 + L:1 + 2 * L]
        a_pos, a_neg, choice = (int(v) for v in h[-T:-T + 3])
        fin, end_var, start_var, lo, mean, hi = h[-T + 3:-1]
        cand = {lrs[i]: bm[i] for i in range(min(a_pos + 1, Lp))}
        if not 0 <= choice < Lp and L > Lp:      # the negative rates were tried
            cand.update({lrs[Lp + i]: bm[Lp + i] for i in range(min(a_neg + 1, L - Lp))})
        kept = choice >= 0
        return TrimResult(counts=counts, search_sparsities=x, baseline_metric=base,
                          best_metric=bm[choice] if kept else base, final_metric=fin,
                          learning_rate=lrs[choice] if kept else None,
                          best_iter=int(bit[choice]) if kept else 0, start_var=start_var, end_var=end_var,
                          candidates=cand, row_sparsity=(lo, mean, hi))

    def resolve(self, handle: TrimHandle, row: list[float]) -> TrimResult:
        """The TrimResult of a deferred handle, from its packed row read to the host. Its counts were
        used as they are: `ok` (last entry) false would mean they missed the exact total, which the
        projection in `capped_counts` rules out; it is reported, not repaired, as the block's outputs
        were computed with them."""
        if handle.result is not None:
            return handle.result
        p, j = handle.pending, handle.index
        res = self._result(p.out[0][j], p.out[1][j], row)
        if not row[-1]:
            log.warning("TRIM: a row allocation missed the exact total or the bounds (used as is)")
        return res

    def run_many(self, make_ev, key, W: torch.Tensor, src: torch.Tensor, ranks: torch.Tensor, s: list[float],
                 totals: list[int]) -> list[TrimResult]:
        """Search row sparsities for P linears of one shape: W (P, rows, in), `src` (P, ...) the Gram
        matrices or explicit inputs that `make_ev(src)` turns into an evaluator (`key` names that
        evaluator for graph caching), ranks = row_ranks(importance) (P, rows, in), s the targets,
        totals the numbers of weights each matrix must lose (the scorer's own count, so TRIM and the
        scorer alone compare at equal sparsity)."""
        return self.finish([self.launch(make_ev, key, W, src, ranks, s, totals)])[0]

    def run(self, make_ev, key, W: torch.Tensor, src: torch.Tensor, ranks: torch.Tensor, s: float,
            total: int | None = None) -> TrimResult:
        """One linear: W (rows, in), src (in, in) Gram or (in, T) inputs, ranks (rows, in)."""
        rows, n = ranks.shape
        total = int(round(s * rows * n)) if total is None else int(total)
        return self.run_many(make_ev, key, W.unsqueeze(0), src.unsqueeze(0), ranks.unsqueeze(0), [s], [total])[0]
