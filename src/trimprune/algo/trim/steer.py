"""TRIM steering a reconstructing scorer (SparseGPT): row weights on its saliency.

SparseGPT chooses, in each column block, the smallest saliencies of the whole block, after the
updates of the blocks before. Fixed per-row counts (TRIM's allocation as a mask scorer takes it)
remove that freedom and lose more than good counts gain (docs' results page, "TRIM with
SparseGPT"). Here TRIM steers the selection instead: row r's saliency is multiplied by exp(z_r),
the matrix keeps SparseGPT's own pruned count, and TRIM's iteration (`search` module docstring)
runs on z, every candidate solved by the scorer and measured on its reconstructed weights:

    z_0 = 0 (the scorer alone);  for t = 1..T:  q = dimwise_quality(Y, Y'(z_{t-1}))   (Eq. 2-4)
                                 d = 2 lr (q - min q) / (max q - min q + 1e-6)
                                 z_t = z_{t-1} - (d - mean(d))

Rows whose outputs keep their quality get a lower weight, so they lose more weights. All positive
learning rates run at once (one scorer call per iteration solves every rate of every linear); the
best candidate over rates and iterations is kept only if its layer metric beats the scorer alone's
(z = 0), so a steered linear is never worse than the scorer alone on the layer metric.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from trimprune.algo.scorers import Member, Outcome, Scorer
from trimprune.algo.stats import InputStats
from trimprune.algo.trim.metrics import dim_metric, layer_metric
from trimprune.algo.trim.results import SearchTensors
from trimprune.algo.trim.settings import TrimSettings


@dataclass
class Steered:
    """One searched linear: TRIM's outcome (the best candidate, or the scorer alone's when none
    beat it), the scorer alone's, both layer metrics (0-dim float64), whether TRIM's was kept, and
    the search's tensors for the records (P = 1)."""

    trim: Outcome
    alone: Outcome
    trim_metric: torch.Tensor
    alone_metric: torch.Tensor
    keep: torch.Tensor
    tensors: SearchTensors


@dataclass
class _Track:
    """The search state of one linear: its name, its evaluator, z per rate (L, rows), the
    dimension-wise quality of the last candidates, the best z, metric and iteration per rate, and
    the scorer alone's layer metric (1,) and row cosines (1, rows)."""

    name: str
    ev: Any
    z: torch.Tensor
    dq: torch.Tensor
    best_z: torch.Tensor
    best_m: torch.Tensor
    best_it: torch.Tensor
    alone_m: torch.Tensor
    alone_cos: torch.Tensor


def _scaled(members: list[Member], zs: list[torch.Tensor | None]) -> list[Member]:
    """The members with row scales exp(z) (None: the scorer alone)."""
    return [
        m if z is None else Member(m.name, m.weight, replace(m.target, row_scale=torch.exp(z)))
        for m, z in zip(members, zs)
    ]


def _measure(ev, weights: torch.Tensor, settings: TrimSettings):
    """Layer metric (C,), dimension-wise quality and row cosine (C, rows) of weights (C, rows,
    in)."""
    st = ev.stats_from_weight(weights)
    dq = dim_metric(settings.dim_metric, st)
    cos = dq if settings.dim_metric == "cosim" else dim_metric("cosim", st)
    return layer_metric(settings.layer_metric, st), dq, cos


def steer_groups(
    scorer: Scorer,
    groups: Sequence[tuple[list[Member], InputStats | None]],
    searched: Callable[[Member], bool],
    measure: Callable[[int], Any],
    settings: TrimSettings,
) -> tuple[list[list[Outcome]], dict[str, Steered]]:
    """The scorer alone's outcomes of every member of the groups, and the steered search (module
    docstring) of the members `searched` says yes to. `measure(g)`: a new evaluator of group g's
    inputs (`prepare` binds it to one member's weight here)."""
    groups = list(groups)
    alone = scorer.prune_groups(groups)
    L = len(settings.lrs)
    tracks: dict[str, _Track] = {}
    for g, (ms, _) in enumerate(groups):
        for m, o in zip(ms, alone[g]):
            if searched(m):
                tracks[m.name] = _start(m, o, measure(g), L, settings)
    if not tracks:
        return alone, {}
    dev = next(iter(tracks.values())).z.device
    lr2 = (2 * torch.tensor(settings.lrs, dtype=torch.float64, device=dev)).unsqueeze(1)
    for it in range(settings.iterations):
        for t in tracks.values():
            lo, hi = torch.aminmax(t.dq, dim=-1, keepdim=True)
            d = (t.dq.double() - lo) / (hi - lo + 1e-6) * lr2
            t.z = t.z - (d - d.mean(-1, keepdim=True))
        outs = _solve(scorer, groups, tracks, lambda t: list(t.z))
        for g, (ms, _) in enumerate(groups):
            for k, m in enumerate(ms):
                if m.name in tracks:
                    w = torch.stack([outs[g * L + c][k].weight for c in range(L)])
                    _record(tracks[m.name], w, it + 1, settings)
    return alone, _conclude(scorer, groups, tracks, alone, settings)


def _start(m: Member, alone: Outcome, ev, L: int, settings: TrimSettings) -> _Track:
    """A linear's search state at z = 0 for L rates, from the scorer alone's outcome."""
    ev.prepare(m.weight)
    lm, dq, cos = _measure(ev, alone.weight.unsqueeze(0), settings)
    z = torch.zeros(L, m.weight.shape[0], dtype=torch.float64, device=m.weight.device)
    best_it = torch.zeros(L, dtype=torch.long, device=z.device)
    return _Track(
        m.name, ev, z, dq.expand(L, -1), z.clone(), lm.expand(L).clone(), best_it, lm, cos
    )


def _record(t: _Track, weights: torch.Tensor, it: int, settings: TrimSettings) -> None:
    """Measure the candidates of every rate (L, rows, in) and keep each rate's best."""
    lm, t.dq, _ = _measure(t.ev, weights, settings)
    better = lm > t.best_m
    t.best_m = torch.where(better, lm, t.best_m)
    t.best_z = torch.where(better.unsqueeze(1), t.z, t.best_z)
    t.best_it = torch.where(better, it, t.best_it)


def _solve(scorer: Scorer, groups, tracks: dict[str, _Track], zs_of) -> list[list[Outcome]]:
    """One scorer call: every group once per candidate (`zs_of(track)`: a list of z, one per
    candidate), the members not searched as the scorer alone."""
    C = len(zs_of(next(iter(tracks.values()))))
    asked = []
    for ms, st in groups:
        for c in range(C):
            zs = [zs_of(tracks[m.name])[c] if m.name in tracks else None for m in ms]
            asked.append((_scaled(ms, zs), st))
    return scorer.prune_groups(asked)


def _conclude(
    scorer: Scorer, groups, tracks: dict[str, _Track], alone, settings: TrimSettings
) -> dict[str, Steered]:
    """Each searched linear's best candidate over the rates, solved once more (the solver is
    deterministic), kept where it beats the scorer alone."""
    rate = {n: torch.argmax(t.best_m) for n, t in tracks.items()}
    outs = _solve(scorer, groups, tracks, lambda t: [t.best_z[rate[t.name]]])
    found = {}
    Lall = len(settings.all_lrs)
    for g, (ms, _) in enumerate(groups):
        for k, m in enumerate(ms):
            t = tracks.get(m.name)
            if t is None:
                continue
            best, j = outs[g][k], rate[m.name]
            keep = t.best_m[j] > t.alone_m[0]
            lm, _, cos = _measure(t.ev, best.weight.unsqueeze(0), settings)
            metric = torch.where(keep, lm[0], t.alone_m[0]).double()
            trim = Outcome(
                weight=torch.where(keep, best.weight, alone[g][k].weight),
                mask=torch.where(keep, best.mask, alone[g][k].mask),
                info=best.info,
            )
            found[m.name] = Steered(
                trim,
                alone[g][k],
                metric,
                t.alone_m[0].double(),
                keep,
                _tensors(t, trim.mask, keep, j, cos, Lall),
            )
    return found


def _tensors(
    t: _Track, mask: torch.Tensor, keep: torch.Tensor, j: torch.Tensor, cos, Lall: int
) -> SearchTensors:
    """The records' view of a steered search (P = 1): every positive rate evaluated, no negative
    one; the chosen rate -1 when the scorer alone was kept."""
    cols = mask.shape[1]
    counts = mask.sum(1)
    x = counts.double() / cols
    L = t.best_m.shape[0]
    metrics = torch.cat([t.best_m.double(), t.best_m.new_full((Lall - L,), -math.inf).double()])
    iters = torch.cat([t.best_it, t.best_it.new_zeros(Lall - L)])
    dev = mask.device

    def one(v) -> torch.Tensor:
        return torch.as_tensor(v, device=dev).reshape(1)

    final_cos = torch.where(keep, cos[0], t.alone_cos[0])
    return SearchTensors(
        counts=counts.unsqueeze(0),
        x=x.unsqueeze(0),
        baseline=t.alone_m.double().reshape(1),
        rate_metrics=metrics.unsqueeze(0),
        rate_iters=iters.unsqueeze(0),
        positive_prefix=one(L),
        negative_prefix=one(-1),
        choice=torch.where(keep, j, -1).reshape(1),
        final_metric=torch.where(keep, t.best_m[j], t.alone_m[0]).double().reshape(1),
        row_var_after=final_cos.double().var().reshape(1),
        row_var_before=t.alone_cos[0].double().var().reshape(1),
        row_min=x.min().reshape(1),
        row_mean=x.mean().reshape(1),
        row_max=x.max().reshape(1),
        ok=one(True),
    )
