"""OWL — Outlier Weighed Layerwise sparsity (Yin et al. 2024).

Per decoder block l, the layerwise outlier distribution D_l is the percentage of Wanda scores
|W_ij| * ||X_j|| (over all linears of the block, concatenated) above M times their mean. Blocks with
more outliers keep more weights: densities are mapped linearly onto
[1 - s - lambda, 1 - s + lambda],

    d_l = 2 lambda (D_l - min D) / (max D - min D);
    d_l <- d_l - mean(d) + (1 - s);   s_l = 1 - d_l

(reference: TRIM/OWL `prune_wanda_outlier`). The scores come from a dense walk over the calibration
activations already captured for pruning (one forward per block; no second data sampling or
capture).
"""

from __future__ import annotations

import torch

from trimprune.algo.allocation.base import Allocation, clip_to_mean


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """100 * fraction of scores above m * mean (all linears of a block together)."""
    return outlier_ratios(scores, [m])[0]


def outlier_ratios(scores: list[torch.Tensor], ms: list[float]) -> list[float]:
    """`outlier_ratio` for several thresholds M, the scores concatenated once."""
    flat = torch.cat([s.flatten().float() for s in scores])
    mean = flat.mean()
    return [float((flat > mean * m).sum()) / flat.numel() * 100.0 for m in ms]


def owl_block_sparsities(
    ratios: list[float],
    sparsity: float,
    lam: float,
    block_numels: list[int] | None = None,
    upper: float = 0.99,
) -> list[float]:
    """Map outlier ratios D_l to block sparsities (more outliers -> less sparsity)."""
    d = torch.tensor(ratios, dtype=torch.float64)
    span = d.max() - d.min()
    dens = (d - d.min()) * (1.0 / span * lam * 2) if span > 0 else torch.zeros_like(d)
    dens = dens - dens.mean() + (1.0 - sparsity)
    s = 1.0 - dens
    if block_numels is None:
        block_numels = [1] * len(ratios)
    w = torch.tensor(block_numels, dtype=torch.float64)
    return clip_to_mean(s, w, sparsity, 0.0, upper).tolist()


def owl_from_ratios(
    ratios: list[float], owl_m: float, lam: float, sparsity: float, numels, block_of
) -> Allocation:
    """The OWL allocation from the blocks' outlier ratios at threshold `owl_m`."""
    n_blocks = len(ratios)
    block_numels = [sum(n for k, n in numels.items() if block_of[k] == b) for b in range(n_blocks)]
    per_block = owl_block_sparsities(ratios, sparsity, lam, block_numels)
    per_linear = {k: per_block[block_of[k]] for k in numels}
    return Allocation(
        "owl",
        sparsity,
        per_linear,
        numels,
        block_of,
        details={"outlier_ratio": list(ratios), "owl_m": owl_m, "owl_lambda": lam},
    )
