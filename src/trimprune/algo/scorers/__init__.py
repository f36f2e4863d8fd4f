"""Importance scorers: magnitude, Wanda, SparseGPT."""
from ...config import ScorerConfig
from ..executor import EAGER, Executor
from .base import Member, Outcome, Scorer, Target
from .magnitude import Magnitude
from .sparsegpt import SparseGPT
from .wanda import Wanda


def make_scorer(config: ScorerConfig, ex: Executor = EAGER) -> Scorer:
    if config.name == "magnitude":
        return Magnitude()
    if config.name == "wanda":
        return Wanda()
    return SparseGPT(blocksize=config.blocksize, percdamp=config.percdamp, ex=ex)


__all__ = ["Member", "Outcome", "Scorer", "Target", "Magnitude", "Wanda", "SparseGPT", "make_scorer"]
