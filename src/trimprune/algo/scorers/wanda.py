"""Wanda (Sun et al. 2024): S_ij = |W_ij| * ||X_j||_2, compared within each output row (Eq. 1)."""

from __future__ import annotations

from trimprune.algo.scorers.base import Scorer


class Wanda(Scorer):
    name = "wanda"

    def importance(self, weight, stats):
        return weight.abs() * stats.wanda_norm().to(weight.device).unsqueeze(0)
