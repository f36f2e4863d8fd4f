"""TRIM — Targeted Row-wise Iterative Metric-driven pruning (Beck, Rudman & Eickhoff 2025).

For a linear W with layer target sparsity s and a per-row importance order, TRIM searches a
per-row sparsity vector x (mean s):

    x_0 = s;  for t = 1..T:  q = dimwise_quality(Y, Y'(x_{t-1}))            (Sec. 3, Eq. 2-4)
                             d = 2 lr (q - min q) / (max q - min q + 1e-6)
                             x_t = x_{t-1} + d - mean(d)
                             x_t = clip(x_t, 0, 0.95);  x_t = x_t - mean(x_t) + s
    keep the x_t with the best layer metric; learning rates are tried upward (0.01 ... 0.16,
    stopping at the first that does not improve), then negative ones if none beats uniform.

P linears of one shape are searched at once (leading dimension P). The learning rates run either as
one batch (a candidate dimension L: the whole search of a shape class is one computation that the
executor may replay as a graph on a side stream), or one after the other with the reference's early
stop (same result, fewer FLOPs; for large matrices). When the evaluator reads each candidate's
statistics from prefix tables, every rate, the negative ones included, is one batch; otherwise the
negative rates are a second batch, run only where a linear needs them. Masks compare the row ranks
of one sort per matrix with the counts, and nothing is read to the host inside the iterations. The
chosen vector is finally made an exact integer allocation (`counts.capped_counts`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch

from trimprune.algo.trim.counts import capped_counts, exact_counts
from trimprune.algo.trim.metrics import dim_metric, layer_metric
from trimprune.algo.trim.results import SearchTensors, TrimResult, summarize
from trimprune.algo.trim.settings import TrimSettings
from trimprune.core.runtime import EAGER, Executor, Launched

if TYPE_CHECKING:
    from trimprune.algo.trim.evaluators import ExplicitSpec, GramSpec, ObsSpec


@dataclass
class SearchBatch:
    """P linears of one shape: weights W (P, rows, in), the evaluator's source (Gram matrices,
    inputs or OBS tables; `spec.build(src)` makes the evaluator), row ranks of the importance (P,
    rows, in), the targets and the number of weights each must lose (the scorer's own count, so TRIM
    and the scorer alone compare at equal sparsity)."""

    spec: GramSpec | ExplicitSpec | ObsSpec
    W: torch.Tensor
    src: torch.Tensor
    ranks: torch.Tensor
    sparsity: list[float]
    totals: list[int]


def improving_prefix(m: torch.Tensor) -> torch.Tensor:
    """The reference's learning-rate sweep stops at the first rate whose metric is not above the
    previous one. For metrics m (P, L) in the order tried: how many rates form the strictly
    increasing prefix (P,). The rates evaluated are the prefix and the one that ended it; the one
    kept is the prefix's last, if it beats uniform (`kept_rate`)."""
    prev = torch.cat([torch.full_like(m[:, :1], -math.inf), m[:, :-1]], 1)
    return (m > prev).long().cummin(1).values.sum(1)


def kept_rate(m: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
    """Index of the learning rate the reference keeps for metrics m (P, L), or -1 when none beats
    the baseline (P,): along a strictly increasing prefix the best is its last element."""
    a = improving_prefix(m)
    last = (a - 1).clamp(min=0)
    val = m.gather(1, last.unsqueeze(1)).squeeze(1)
    return torch.where((a > 0) & (val > baseline), last, torch.full_like(last, -1))


def search_counts(x: torch.Tensor, n: int, settings: TrimSettings) -> torch.Tensor:
    """Per-row pruned counts for sparsity vectors x (..., rows) inside the search: floor as the
    reference, or (default) round-half-even, which is unbiased, so candidates are compared at the
    same sparsity up to a few weights (the final allocation is made exact separately)."""
    if settings.rounding == "floor":
        return (n * x).long()  # reference: (width * sparsities).long()
    kmax = int(settings.max_row_sparsity * n + 1e-9)
    return torch.round(x.double() * n).clamp_(0, kmax).long()


def evaluate(ev, ranks: torch.Tensor, x: torch.Tensor, settings: TrimSettings):
    """x: (P, L, rows) -> (layer metric (P, L), dim quality (P, L, rows), row cosine (P, L,
    rows))."""
    st = ev.stats_from_counts(search_counts(x, ranks.shape[-1], settings), ranks)
    lm = layer_metric(settings.layer_metric, st)
    dq = dim_metric(settings.dim_metric, st)
    cos = dq if settings.dim_metric == "cosim" else dim_metric("cosim", st)
    return lm, dq, cos


def iterate(
    ev,
    ranks: torch.Tensor,
    s3: torch.Tensor,
    base_lm: torch.Tensor,
    base_dq: torch.Tensor,
    lrs: torch.Tensor,
    settings: TrimSettings,
):
    """The TRIM iterations (module docstring) for every learning rate of `lrs` (L,) at once, from
    the uniform allocation s3 (P, 1, 1) with layer metric base_lm (P, 1) and dimension-wise quality
    base_dq (P, 1, rows). Per rate: the best x (P, L, rows), its metric (P, L; the baseline when
    nothing beat it) and iteration (P, L)."""
    P, rows, _ = ranks.shape
    L = lrs.shape[0]
    lr = lrs.to(torch.float64).view(1, L, 1)
    x = s3.expand(P, L, rows).clone()
    best_x = x.clone()
    best_m = base_lm.expand(P, L).clone()
    best_it = torch.zeros(P, L, dtype=torch.long, device=ranks.device)
    dq = base_dq.expand(P, L, rows)
    lr2 = lr * 2
    for it in range(settings.iterations):
        lo, hi = torch.aminmax(dq, dim=-1, keepdim=True)
        d = (dq - lo) / (hi - lo + 1e-6) * lr2
        d = d - d.mean(-1, keepdim=True)
        x = (x.double() + d).to(torch.float32)  # reference: fp32 x += float64 step
        x = x.clamp(0.0, settings.max_row_sparsity)
        # the reference's float32 mean; with exact counts a float64 one, which does not depend on
        # the summation order (a fast path may sum in its own order)
        mean = (
            x.mean(-1, keepdim=True)
            if settings.rounding == "floor"
            else x.mean(-1, keepdim=True, dtype=torch.float64).to(torch.float32)
        )
        x = x - mean + s3
        m, dq, _ = evaluate(ev, ranks, x, settings)
        better = m > best_m
        best_m = torch.where(better, m, best_m)
        best_x = torch.where(better.unsqueeze(-1), x, best_x)
        best_it = torch.where(better, it, best_it)
    return best_x, best_m, best_it


@dataclass
class PendingSearch:
    """A launched search: collect it with `TrimSearch.finish`."""

    batch: SearchBatch
    s: torch.Tensor  # targets (P,) on the device
    totals: torch.Tensor  # (P,) on the device
    size: int  # elements of the batched search (the executor's capture decision)
    launched: Launched | None = (
        None  # -> (SearchTensors, (x, metric, iteration) of the rates evaluated)
    )
    neg_open: bool = (
        False  # only the positive rates were evaluated; the negative ones may be needed
    )


class TrimSearch:
    """TRIM searches for batches of linears of one shape (`SearchBatch`)."""

    def __init__(self, settings: TrimSettings, ex: Executor = EAGER):
        self.cfg = settings
        self.ex = ex

    @property
    def all_lrs(self) -> tuple:
        return self.cfg.all_lrs

    def _start(self, spec, W, src, ranks, s):
        """The evaluator for P linears, and the uniform allocation s3 (P, 1, 1) with its layer
        metric, dimension-wise quality and row cosine. s: (P,) tensor."""
        ev = spec.build(src, self.ex)
        ev.prepare(W)
        P, rows, _ = ranks.shape
        s3 = s.to(torch.float32).view(P, 1, 1)
        return (ev, s3) + evaluate(ev, ranks, s3.expand(P, 1, rows), self.cfg)

    def _iterate(self, ev, ranks, s3, base_lm, base_dq, lrs):
        return self.ex.call(iterate, ev, ranks, s3, base_lm, base_dq, lrs, self.cfg)

    def _whole(self, spec, W, src, ranks, s, lrs, totals, done=None):
        """Uniform baseline, the learning rates `lrs` as one batch, the reference's choice and the
        exact final allocation for P linears. `done` = (x, metric, iteration) of rates evaluated
        before (the positive ones, when the negative ones follow); rates not evaluated count as
        -inf. No host synchronisation. W (P, rows, in), ranks (P, rows, in), s (P,), lrs (L,),
        totals (P,). -> (SearchTensors, (x, metric, iteration) of the rates evaluated)."""
        ev, s3, base_lm, base_dq, base_cos = self._start(spec, W, src, ranks, s)
        bx, bm, bit = self._iterate(ev, ranks, s3, base_lm, base_dq, lrs)
        if done is not None:
            bx, bm, bit = (torch.cat([a, b], 1) for a, b in zip(done, (bx, bm, bit)))
        P, L, rows = bx.shape
        pad = len(self.all_lrs) - L
        evaluated = (bx[:, :L], bm[:, :L], bit[:, :L])
        if pad:
            bx = torch.cat([bx, s3.expand(P, pad, rows)], 1)
            bm = torch.cat([bm, bm.new_full((P, pad), -math.inf)], 1)
            bit = torch.cat([bit, bit.new_zeros(P, pad)], 1)
        return self._conclude(ev, ranks, s3, base_lm, base_cos, bx, bm, bit, totals), evaluated

    def _sequential(self, spec, W, src, ranks, s, totals) -> SearchTensors:
        """The reference's order: one learning rate after the other, each linear stopping at its
        first rate that does not improve on the previous one, negative rates only for linears that
        no positive rate improved. Same results as `_whole` (the rates it skips are exactly those
        the batch evaluates and then ignores), fewer FLOPs; for matrices large enough to be
        compute-bound."""
        P, rows, _ = ranks.shape
        dev = W.device
        lrs = self.all_lrs
        L, Lp = len(lrs), len(self.cfg.lrs)
        ev, s3, base_lm, base_dq, base_cos = self._start(spec, W, src, ranks, s)
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
                    sub = spec.build(src[t], self.ex)
                    sub.prepare(W[t])
                    cur = (list(active), sub, ranks[t])
                x, m, it = self._iterate(
                    cur[1], cur[2], s3[t], base_lm[t], base_dq[t], lr_t[j : j + 1]
                )
                bx[t, j], bm[t, j], bit[t, j] = x[:, 0], m[:, 0], it[:, 0]
                going = (improving_prefix(bm[t, j0 : j + 1]) == j + 1 - j0).tolist()
                active = [p for p, g in zip(active, going) if g]
            if j0 == 0 and L > Lp:
                none = (kept_rate(bm[:, :Lp], base_lm[:, 0]) < 0).tolist()
                todo = [p for p in range(P) if none[p]]
                if todo:
                    sweeps.append((Lp, L, todo))
        return self._conclude(ev, ranks, s3, base_lm, base_cos, bx, bm, bit, totals)

    def _conclude(self, ev, ranks, s3, base_lm, base_cos, bx, bm, bit, totals) -> SearchTensors:
        """The kept rate of each linear (a positive one, else a negative one, else uniform), its x,
        the exact integer allocation and its statistics."""
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
        return SearchTensors(
            counts=counts,
            x=x,
            baseline=base,
            rate_metrics=bm,
            rate_iters=bit,
            positive_prefix=a_pos,
            negative_prefix=a_neg,
            choice=choice,
            row_var_before=base_cos[:, 0].var(-1),
            ok=ok,
            **self._final_stats(ev, ranks, counts),
        )

    def _final_stats(self, ev, ranks, counts) -> dict[str, torch.Tensor]:
        """The layer metric, the variance of the row cosines and the min / mean / max row sparsity
        of `counts` (P, rows)."""
        st = ev.stats_from_counts(counts.unsqueeze(1), ranks)
        xf = counts.double() / ranks.shape[-1]
        return {
            "final_metric": layer_metric(self.cfg.layer_metric, st)[:, 0],
            "row_var_after": dim_metric("cosim", st)[:, 0].var(-1),
            "row_min": xf.amin(-1),
            "row_mean": xf.mean(-1),
            "row_max": xf.amax(-1),
        }

    # ---------------------------------------------------------------- driver
    @torch.no_grad()
    def launch(self, batch: SearchBatch) -> PendingSearch:
        """Start the search of a batch; `finish` collects it. The batch holds the positive rates;
        the negative ones, needed by few linears, are a second batch that `finish` starts where
        needed (unless candidates are cheap: then every rate is in the first)."""
        W = batch.W
        dev = W.device
        # candidates read from prefix tables cost no matrix product: every rate, the negative ones
        # included, is then one batch, whatever the matrix size
        cheap = batch.spec.build(batch.src, self.ex).counts_from_tables(W.shape[-2])
        size = len(self.all_lrs) * W.numel()
        mode = self.cfg.lr_search
        if mode == "auto":
            mode = "parallel" if self.ex.captures(dev, size) or cheap else "sequential"
        p = PendingSearch(
            batch,
            self.ex.to_device(batch.sparsity, torch.float64, dev),
            self.ex.to_device(batch.totals, torch.long, dev),
            size,
        )
        if mode == "sequential":
            p.launched = Launched(
                (self._sequential(batch.spec, W, batch.src, batch.ranks, p.s, p.totals), None)
            )
            return p
        p.launched = self._batch(p, self.all_lrs if cheap else tuple(self.cfg.lrs), cheap)
        p.neg_open = not cheap and len(self.all_lrs) > len(self.cfg.lrs)
        return p

    def _batch(self, p: PendingSearch, lrs: tuple, tables: bool, done=None) -> Launched:
        """Launch the batched search over `lrs`; `tables`: the evaluator reads prefix tables (part
        of the key: it changes the work)."""
        b = p.batch
        inputs = {
            "W": b.W,
            "src": b.src,
            "ranks": b.ranks,
            "s": p.s,
            "totals": p.totals,
            "lrs": self.ex.to_device(lrs, torch.float64, b.W.device),
        }
        if done is not None:
            inputs.update(zip(("done_x", "done_m", "done_it"), done))

        def fn(W, src, ranks, s, lrs, totals, **d):
            return self._whole(
                b.spec,
                W,
                src,
                ranks,
                s,
                lrs,
                totals,
                (d["done_x"], d["done_m"], d["done_it"]) if d else None,
            )

        key = (
            "trim",
            b.spec,
            lrs,
            tables,
            tuple(b.W.shape),
            tuple(b.src.shape),
            b.src.stride(0) == 0,
            b.W.dtype,
            b.src.dtype,
            self.cfg,
        )
        return self.ex.launch(key, fn, inputs, p.size)

    @torch.no_grad()
    def finish(self, pending: list[PendingSearch]) -> list[SearchTensors]:
        """The searches' results, on the device: the current stream waits for them, the host does
        not, unless some linears must decide on the negative rates there (searches without prefix
        tables)."""
        outs = [cast(Launched, p.launched).result() for p in pending]
        if not any(p.neg_open for p in pending):
            return [found for found, _ in outs]
        return self._finish_on_host(pending, outs)

    def _finish_on_host(self, pending: list[PendingSearch], outs: list) -> list[SearchTensors]:
        """Read every search's choice (one transfer), run the negative rates for the linears no
        positive rate improved, and repair allocations that missed the exact total (rare float edge
        cases)."""
        found = [f for f, _ in outs]
        host = self._read_choices(found)
        neg = tuple(self.all_lrs[len(self.cfg.lrs) :])
        redo = [i for i, p in enumerate(pending) if p.neg_open and any(c < 0 for c, _ in host[i])]
        again = [self._batch(pending[i], neg, False, done=outs[i][1]) for i in redo]
        for i, a in zip(redo, again):
            found[i] = a.result()[0]
        for i, h in zip(redo, self._read_choices([found[i] for i in redo])):
            host[i] = h
        return [self._repaired(p, f, [ok for _, ok in h]) for p, f, h in zip(pending, found, host)]

    @staticmethod
    def _read_choices(found: list[SearchTensors]) -> list[list[tuple[int, bool]]]:
        flat = (
            torch.cat([torch.stack([f.choice.double(), f.ok.double()], 1) for f in found]).tolist()
            if found
            else []
        )
        out, i = [], 0
        for f in found:
            n = f.choice.shape[0]
            out.append([(int(c), bool(ok)) for c, ok in flat[i : i + n]])
            i += n
        return out

    def _repaired(self, p: PendingSearch, found: SearchTensors, ok: list[bool]) -> SearchTensors:
        """Linears whose counts missed the exact total: exact projection and rounding on the host
        (`counts.exact_counts`), then their final statistics measured again."""
        bad = [j for j, good in enumerate(ok) if not good]
        if not bad:
            return found
        b = p.batch
        _, rows, n = b.ranks.shape
        counts = found.counts.clone()
        for j in bad:
            counts[j] = exact_counts(
                found.x[j], b.totals[j] / (rows * n), n, self.cfg.max_row_sparsity, b.totals[j]
            )
        ev = b.spec.build(b.src, self.ex)
        ev.prepare(b.W)
        fix = self._final_stats(ev, b.ranks, counts)
        idx = torch.tensor(bad, device=counts.device)
        fixed = {}
        for name, v in fix.items():
            fixed[name] = getattr(found, name).clone()
            fixed[name][idx] = v[idx]
        ok_t = found.ok.clone()
        ok_t[idx] = True
        return dataclasses.replace(found, counts=counts, ok=ok_t, **fixed)

    def run_many(
        self,
        spec,
        W: torch.Tensor,
        src: torch.Tensor,
        ranks: torch.Tensor,
        s: list[float],
        totals: list[int],
    ) -> list[TrimResult]:
        """Search row sparsities for P linears of one shape (arguments as `SearchBatch`) and read
        the results to the host."""
        found = self.finish([self.launch(SearchBatch(spec, W, src, ranks, list(s), list(totals)))])[
            0
        ]
        host = {k: v.cpu() for k, v in found.summary_tensors().items()}
        return [
            TrimResult(summarize(host, j, self.cfg), found.counts[j], found.x[j])
            for j in range(W.shape[0])
        ]

    def run(
        self,
        spec,
        W: torch.Tensor,
        src: torch.Tensor,
        ranks: torch.Tensor,
        s: float,
        total: int | None = None,
    ) -> TrimResult:
        """One linear: W (rows, in), src (in, in) Gram or (in, T) inputs, ranks (rows, in)."""
        rows, n = ranks.shape
        total = int(round(s * rows * n)) if total is None else int(total)
        return self.run_many(
            spec, W.unsqueeze(0), src.unsqueeze(0), ranks.unsqueeze(0), [s], [total]
        )[0]
