"""Importance scorers: magnitude, Wanda, SparseGPT."""
from .base import Member, Outcome, Scorer, Target
from .magnitude import Magnitude
from .sparsegpt import SparseGPT
from .wanda import Wanda


def make_scorer(config) -> Scorer:
    if config.scorer == "magnitude":
        return Magnitude()
    if config.scorer == "wanda":
        return Wanda()
    return SparseGPT(blocksize=config.blocksize, percdamp=config.percdamp)


__all__ = ["Member", "Outcome", "Scorer", "Target", "Magnitude", "Wanda", "SparseGPT", "make_scorer"]
