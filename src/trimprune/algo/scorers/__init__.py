"""Importance scorers: magnitude, Wanda, SparseGPT."""

from trimprune.algo.scorers.base import Member, Outcome, Scorer, Target
from trimprune.algo.scorers.magnitude import Magnitude
from trimprune.algo.scorers.sparsegpt import SparseGPT
from trimprune.algo.scorers.wanda import Wanda
from trimprune.config import ScorerConfig
from trimprune.core.runtime import EAGER, Executor


def make_scorer(config: ScorerConfig, ex: Executor = EAGER) -> Scorer:
    if config.name == "magnitude":
        return Magnitude()
    if config.name == "wanda":
        return Wanda()
    return SparseGPT(blocksize=config.blocksize, percdamp=config.percdamp, ex=ex)


__all__ = [
    "Member",
    "Outcome",
    "Scorer",
    "Target",
    "Magnitude",
    "Wanda",
    "SparseGPT",
    "make_scorer",
]
