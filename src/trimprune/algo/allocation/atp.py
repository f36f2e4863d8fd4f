"""ATP — sparsity rising linearly with depth (Huang, Zhang, Zheng, Chao & Ji, "Determining
Layer-wise Sparsity for Large Language Models Through a Theoretical Perspective", ICML 2025, arXiv
2502.14770).

ATP derives from the "reconstruction error explosion" (errors of early blocks grow through the later
ones) that block sparsities should form a monotonically increasing arithmetic progression with mean
S; one common difference is then the only hyperparameter (the paper grid-searches it per model and
sparsity). Here the progression is parametrised by its total rise `beta` (`--atp-beta`), the
sparsity of the last block minus that of the first, so that one value means the same profile on any
depth:

    s_l = S + beta * (l / (L - 1) - 1/2),      l = 0 .. L-1   (s_l = S when L = 1)

i.e. ATP's common difference is beta / (L - 1) (0.2 on a 32-block model: 0.0065 per block). Then, as
for OWL and AlphaPruning, `clip_to_mean` (shift) keeps every block in [0, 0.99] with the parameter-
weighted mean exactly S (a no-op when the blocks have equal sizes and nothing leaves the bounds).
Every linear of a block gets the block's sparsity. The default beta 0.2 is ours (between OWL's
default range 2 * 0.08 and AlphaPruning's 2 * 0.3 * S at S = 0.7); `--allocation search` searches
it.
"""

from __future__ import annotations

import torch

from trimprune.algo.allocation.base import Allocation, clip_to_mean

UPPER = 0.99


def atp_profile(n_blocks: int, beta: float) -> list[float]:
    """The offsets from the mean of the progression: beta * (l / (L - 1) - 1/2)."""
    if n_blocks <= 1:
        return [0.0] * n_blocks
    return [beta * (i / (n_blocks - 1) - 0.5) for i in range(n_blocks)]


def atp_block_sparsities(
    n_blocks: int,
    sparsity: float,
    beta: float,
    block_numels: list[int] | None = None,
    upper: float = UPPER,
) -> list[float]:
    """Block sparsities: the progression around `sparsity`, clipped to [0, upper] with the exact
    weighted mean."""
    s = torch.tensor(atp_profile(n_blocks, beta), dtype=torch.float64) + sparsity
    w = torch.tensor(
        block_numels if block_numels is not None else [1] * n_blocks, dtype=torch.float64
    )
    return clip_to_mean(s, w, sparsity, 0.0, upper).tolist()


def block_numels_of(numels: dict[str, int], block_of: dict[str, int]) -> list[int]:
    n = max(block_of.values()) + 1
    out = [0] * n
    for k, v in numels.items():
        out[block_of[k]] += v
    return out


def atp_allocation(
    beta: float, sparsity: float, numels: dict[str, int], block_of: dict[str, int]
) -> Allocation:
    blocks = block_numels_of(numels, block_of)
    per_block = atp_block_sparsities(len(blocks), sparsity, beta, blocks)
    return Allocation(
        "atp",
        sparsity,
        {k: per_block[block_of[k]] for k in numels},
        numels,
        block_of,
        details={"atp_beta": beta, "common_difference": beta / max(len(blocks) - 1, 1)},
    )
