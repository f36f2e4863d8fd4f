"""TRIM's two safeguards: TRIM's allocation must not lose to the scorer alone.

- Per linear: a linear keeps TRIM's allocation only if the layer metric of TRIM's (reconstructed)
  weights is at least that of the scorer alone's.
- Per block: a block keeps TRIM only if its output on the safeguard's subset of the calibration
  sequences (followed through the pruned model) is at least as close, in squared error, to the dense
  model's block output (followed through the dense model) as with the scorer alone in every
  searched linear.

Both choices are made on the device (`torch.where`), so nothing waits for the host; the block
choice is made on the host only when the block outputs are kept off the device (offload).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch

from trimprune.algo.scorers import Member, Outcome, Scorer
from trimprune.algo.trim.metrics import layer_metric
from trimprune.algo.trim.results import SearchTensors
from trimprune.config import TrimConfig
from trimprune.core.model import set_weight_2d
from trimprune.core.ranks import SOLO, Ranks


@dataclass
class Found:
    """One linear's search within its batch."""

    tensors: SearchTensors
    index: int

    @property
    def counts(self) -> torch.Tensor:
        return self.tensors.counts[self.index]


@dataclass
class TrimChoice:
    """A searched linear after its own safeguard (device tensors): the chosen outcome and the scorer
    alone's (for the block safeguard; None when nothing compares against them), both layer metrics
    and the choice, the solver info of TRIM's and of the scorer alone's outcome."""

    found: Found
    chosen: Outcome | None
    alone: Outcome | None
    trim_metric: torch.Tensor  # 0-dim float64
    alone_metric: torch.Tensor  # 0-dim float64 (TRIM's own metric when the safeguard is off)
    keep: torch.Tensor  # 0-dim bool: the linear keeps TRIM
    infos: tuple  # solver info of TRIM's outcome and of the scorer alone's

    def settled(self) -> TrimChoice:
        """Without the outcomes (the weight is set): what the records need when no block safeguard
        follows."""
        return dataclasses.replace(self, chosen=None, alone=None)


def linear_safeguard(
    m: Member,
    found: Found,
    trim: Outcome,
    alone: Outcome | None,
    config: TrimConfig,
    scorer: Scorer,
    exact_rounding: bool,
    measure: Callable[[], Any],
) -> TrimChoice:
    """The per-linear safeguard. For mask scorers that select by row ranks, TRIM's mask is the
    search's own final allocation, so its metric is the search's; reconstructed weights (SparseGPT)
    are measured with `measure()` (the group's evaluator). The scorer alone's metric is the search's
    uniform baseline where the scorer alone prunes uniformly per row (and the search rounds
    exactly), else measured."""
    same_rows = scorer.selects_by_row_ranks and not scorer.reconstructs
    base_is_uniform = scorer.alone_is_uniform_rows and exact_rounding
    cand = [] if same_rows else [trim.weight]
    if config.safeguard and not base_is_uniform:
        assert alone is not None  # made whenever the safeguard is on
        cand.append(alone.weight)
    vals = None
    if cand:
        ev = measure()
        ev.prepare(m.weight)
        vals = layer_metric(config.metric, ev.stats_from_weight(torch.stack(cand)))
    t = found.tensors
    t_metric = t.final_metric[found.index] if same_rows else cast(torch.Tensor, vals)[0]
    chosen, a_metric = trim, t_metric
    keep = torch.ones((), dtype=torch.bool, device=t_metric.device)
    if config.safeguard:
        assert alone is not None  # made whenever the safeguard is on
        a_metric = t.baseline[found.index] if base_is_uniform else cast(torch.Tensor, vals)[-1]
        keep = t_metric >= a_metric
        chosen = Outcome(
            weight=torch.where(keep, trim.weight, alone.weight),
            mask=torch.where(keep, trim.mask, alone.mask),
            info=trim.info,
        )
    return TrimChoice(
        found,
        chosen,
        alone,
        t_metric,
        a_metric,
        keep,
        (trim.info, alone.info if alone is not None else None),
    )


@dataclass
class BlockSafeguard:
    """The block safeguard's comparison: squared errors with TRIM and with the scorer alone (2,),
    the choice (a 0-dim bool tensor on the device, or a bool when decided on the host), the
    linears."""

    errors: torch.Tensor
    keep: torch.Tensor | bool
    names: list[str]

    def choose(self, with_trim: torch.Tensor, alone: torch.Tensor) -> torch.Tensor:
        if isinstance(self.keep, bool):
            return with_trim if self.keep else alone
        return torch.where(self.keep, with_trim, alone)


def _squared_error(
    out: list[torch.Tensor], dense: list[torch.Tensor], ranks: Ranks, device
) -> torch.Tensor:
    """sum ||out - dense||^2 in float64, over the subset sequences of every rank."""
    if not out:  # a rank whose share of the subset is empty
        return ranks.sum_(torch.zeros((), dtype=torch.float64, device=device))
    return ranks.sum_(
        torch.stack(
            [
                (o.float() - d.to(o.device).float()).square().sum(dtype=torch.float64)
                for o, d in zip(out, dense)
            ]
        ).sum()
    )


def block_safeguard(
    run,
    linears: dict[str, tuple[torch.Tensor, torch.Tensor]],
    dense_out: list[torch.Tensor],
    alone_out: list[torch.Tensor] | None,
    ranks: Ranks = SOLO,
) -> tuple[list[torch.Tensor], BlockSafeguard | None]:
    """Compare the block with TRIM (the linears' chosen weights, set already) and with the scorer
    alone in the searched `linears` (name -> (chosen weight, scorer-alone weight)) against the dense
    model's outputs `dense_out`, set the weights of the better, and return its outputs on the pruned
    model's subset stream. `alone_out`: the scorer-alone block's outputs, when computed already. The
    errors are summed over the ranks, so every rank makes the same choice."""
    if not linears:
        return run.pruned_subset(), None
    dev = run.captured.exec_device
    out_trim = run.pruned_subset()
    e_trim = _squared_error(out_trim, dense_out, ranks, dev)
    if alone_out is None:
        for name, (_, alone) in linears.items():
            set_weight_2d(run.linears[name], alone)
        alone_out = run.pruned_subset()
    e_alone = _squared_error(alone_out, dense_out, ranks, dev)
    keep_t = e_trim <= e_alone
    keep: torch.Tensor | bool = keep_t
    # outputs stored off the device: decide now
    if not all(o.device == keep_t.device for o in out_trim):
        keep = bool(keep)
    safeguard = BlockSafeguard(torch.stack([e_trim, e_alone]), keep, sorted(linears))
    for name, (chosen, alone) in linears.items():
        set_weight_2d(run.linears[name], safeguard.choose(chosen.to(alone.dtype), alone))
    return [safeguard.choose(a, b) for a, b in zip(out_trim, alone_out)], safeguard
