"""Magnitude pruning: importance |W_ij|, one threshold per matrix (the papers' baseline)."""

from __future__ import annotations

import torch

from trimprune.algo import masks as M
from trimprune.algo.scorers.base import Scorer, Target


class Magnitude(Scorer):
    name = "magnitude"
    alone_is_uniform_rows = False  # one threshold per matrix

    def pruned_count(self, rows: int, cols: int, sparsity: float) -> int:
        return int(round(sparsity * rows * cols))  # one count per matrix

    def importance(self, weight, stats=None):
        return weight.abs()

    def select(self, scores: torch.Tensor, target: Target) -> torch.Tensor:
        if target.nm is None and target.row_counts is None:
            return M.matrix_mask(scores, target.sparsity)
        return super().select(scores, target)
