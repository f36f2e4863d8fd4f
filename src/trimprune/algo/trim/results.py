"""What a TRIM search returns: `SearchTensors` on the device, a `SearchSummary` per linear once read
to the host (`summarize`), and `TrimResult` for direct callers of the search."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from trimprune.algo.trim.settings import TrimSettings
from trimprune.core.records import SearchSummary

log = logging.getLogger("trimprune")


@dataclass
class SearchTensors:
    """The searches of P linears, on the device. Per linear: the final integer counts (rows,), the
    chosen sparsity vector x (rows,), the layer metric at uniform sparsity, every rate's best metric
    (-inf where not evaluated) and iteration, the length of the improving prefix of the positive and
    of the negative rates, the chosen rate (index into `all_lrs`, -1: uniform), the final
    allocation's layer metric, the variance of the row cosines after and before, its min / mean /
    max row sparsity, and whether the counts hit the exact total within the bounds."""

    counts: torch.Tensor
    x: torch.Tensor
    baseline: torch.Tensor
    rate_metrics: torch.Tensor
    rate_iters: torch.Tensor
    positive_prefix: torch.Tensor
    negative_prefix: torch.Tensor
    choice: torch.Tensor
    final_metric: torch.Tensor
    row_var_after: torch.Tensor
    row_var_before: torch.Tensor
    row_min: torch.Tensor
    row_mean: torch.Tensor
    row_max: torch.Tensor
    ok: torch.Tensor

    def summary_tensors(self) -> dict[str, torch.Tensor]:
        """The fields a `SearchSummary` is made of (what is read to the host)."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("counts", "x")
        }


def summarize(host: dict[str, torch.Tensor], j: int, settings: TrimSettings) -> SearchSummary:
    """Linear j's `SearchSummary` from host copies of `SearchTensors.summary_tensors()`."""
    lrs = settings.all_lrs
    L, Lp = len(lrs), len(settings.lrs)
    bm, bit = host["rate_metrics"][j].tolist(), host["rate_iters"][j].tolist()
    a_pos, a_neg, choice = (
        int(host[k][j]) for k in ("positive_prefix", "negative_prefix", "choice")
    )
    cand = {lrs[i]: bm[i] for i in range(min(a_pos + 1, Lp))}
    if not 0 <= choice < Lp and L > Lp:  # the negative rates were tried
        cand.update({lrs[Lp + i]: bm[Lp + i] for i in range(min(a_neg + 1, L - Lp))})
    if not bool(host["ok"][j]):
        log.warning("TRIM: a row allocation missed the exact total or the bounds (used as is)")
    base = float(host["baseline"][j])
    kept = choice >= 0
    return SearchSummary(
        baseline_metric=base,
        best_metric=bm[choice] if kept else base,
        final_metric=float(host["final_metric"][j]),
        lr=lrs[choice] if kept else None,
        best_iter=int(bit[choice]) if kept else 0,
        row_quality_var_before=float(host["row_var_before"][j]),
        row_quality_var_after=float(host["row_var_after"][j]),
        row_sparsity_min=float(host["row_min"][j]),
        row_sparsity_mean=float(host["row_mean"][j]),
        row_sparsity_max=float(host["row_max"][j]),
        lr_candidates=cand,
    )


@dataclass(frozen=True)
class TrimResult:
    """One linear's search, read to the host (`TrimSearch.run_many`)."""

    summary: SearchSummary
    counts: torch.Tensor  # pruned weights per row (final, integer, exact total)
    search_sparsities: torch.Tensor  # the chosen x, before the exact projection

    learning_rate = property(lambda self: self.summary.lr)
    baseline_metric = property(lambda self: self.summary.baseline_metric)
    best_metric = property(lambda self: self.summary.best_metric)
    final_metric = property(lambda self: self.summary.final_metric)
    best_iter = property(lambda self: self.summary.best_iter)
    candidates = property(lambda self: self.summary.lr_candidates)
