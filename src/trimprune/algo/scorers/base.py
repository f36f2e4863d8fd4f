"""Scorer interface: an importance score per weight, and a pruning rule for a target."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trimprune.algo import masks as M
from trimprune.algo.stats import InputStats
from trimprune.core.records import Reconstruction


@dataclass
class Target:
    """What one linear must be pruned to: one sparsity for the matrix, or per-row counts of
    pruned weights (TRIM), or an N:M pattern. `row_scale` (rows,) multiplies each row's saliency in
    a reconstructing scorer's selection of the whole matrix (TRIM steering SparseGPT,
    `algo.trim.steer`); the matrix keeps its pruned count."""

    sparsity: float
    row_counts: torch.Tensor | None = None
    nm: tuple[int, int] | None = None
    ranks: torch.Tensor | None = None  # row_ranks(importance) when already computed (TRIM), reused
    row_scale: torch.Tensor | None = None


@dataclass
class Member:
    """A linear to prune inside a group of linears that read the same input."""

    name: str
    weight: torch.Tensor  # (out, in) float32 copy of the dense weight
    target: Target


@dataclass
class Outcome:
    weight: torch.Tensor  # pruned (and, for SparseGPT, reconstructed) weight, float32
    mask: torch.Tensor  # True = pruned
    info: Reconstruction | None = None


class Scorer:
    """Base class. Subclasses implement `importance` (higher = keep); `select` turns scores into a
    mask for a target. The default selection is per output row (Wanda's comparison group)."""

    name = "base"
    needs_gram = False
    reconstructs = False  # changes the kept weights (SparseGPT)
    selects_by_row_ranks = True  # with row counts, the mask is row_ranks(importance) < counts
    alone_is_uniform_rows = (
        True  # alone, it prunes round(s * in) per row (Wanda's comparison group)
    )

    def importance(self, weight: torch.Tensor, stats: InputStats | None) -> torch.Tensor:
        raise NotImplementedError

    def pruned_count(self, rows: int, cols: int, sparsity: float) -> int:
        """Weights this scorer prunes in a (rows, cols) matrix at a uniform target (per-row
        selection: round(sparsity * cols) in every row)."""
        return rows * M.per_row_count(cols, sparsity)

    def select(self, scores: torch.Tensor, target: Target) -> torch.Tensor:
        if target.nm is not None:
            return M.nm_mask(scores, *target.nm)
        if target.row_counts is not None:
            return M.mask_from_counts(M.row_ranks(scores), target.row_counts.to(scores.device))
        return M.row_mask(scores, target.sparsity)

    def prune_group(self, members: list[Member], stats: InputStats | None) -> list[Outcome]:
        out = []
        for m in members:
            t = m.target
            if (
                t.ranks is not None
                and t.nm is None
                and (t.row_counts is not None or self.alone_is_uniform_rows)
            ):
                # made on the ranks' device: a host tensor copied there would wait for all queued
                # work
                k = (
                    t.row_counts.to(t.ranks.device, t.ranks.dtype)
                    if t.row_counts is not None
                    else torch.full(
                        (t.ranks.shape[0],),
                        M.per_row_count(t.ranks.shape[1], t.sparsity),
                        dtype=t.ranks.dtype,
                        device=t.ranks.device,
                    )
                )
                mask = M.mask_from_counts(t.ranks, k)
            else:
                mask = self.select(self.importance(m.weight, stats), t)
            out.append(Outcome(weight=m.weight.masked_fill(mask, 0.0), mask=mask))
        return out

    def prepare(self, stats: list[InputStats], device: torch.device) -> None:
        """Compute ahead, for many statistics at once, what `importance` derives from each
        (SparseGPT's inverse factors, before TRIM's searches ask for them one linear at a time).
        Nothing by default."""

    def prune_groups(
        self, groups: list[tuple[list[Member], InputStats | None]]
    ) -> list[list[Outcome]]:
        """`prune_group` of each (members, statistics) pair, in order; a group without members has
        no outcomes. Scorers that solve several groups at once (SparseGPT) override it."""
        return [self.prune_group(ms, st) if ms else [] for ms, st in groups]
