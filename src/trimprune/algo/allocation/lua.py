"""The pure parts of `--allocation lua`: a learned per-linear sparsity, after Lua-LLM (Lu et al.,
NeurIPS 2025, "Lua-LLM: Learning Unstructured-Sparsity Allocation for Large Language Models").

Each weight gets a unit rank within its row from the scorer's importance (`unit_ranks`: the least
important weight of a row near 0, the most important near 1; the paper's importance scores in
[0, 1]). Linear l has a threshold t_l, its sparsity. The soft top-k mask of Lua-LLM's Eq. 7 is

    M_ij = sigmoid((r_ij - t_l) / tau)                                             (`soft_mask`)

so that as tau -> 0 it is the scorer's per-row mask at sparsity t_l (round(t_l * in) weights of
each row pruned), and for tau > 0 it is differentiable in t_l. The thresholds minimise
KL(dense || masked) per predicted token of the calibration sequences (the paper's task loss, with
the dense model as the teacher), by Adam, each step followed by the projection onto the budget
(`project`: every t_l in [0, UPPER], the parameter-weighted mean exactly the target; the paper's
regulariser L_reg holds the budget only approximately). The learned t are then the per-linear
targets of the usual layer-wise prune (`lua_allocation`).

Lua-LLM also learns thresholds per output row (intra-layer allocation); here the row-wise
allocation is TRIM's (`--trim`), so the thresholds are per linear.
"""

from __future__ import annotations

import torch

from trimprune.algo.allocation.base import Allocation, clip_to_mean
from trimprune.algo.masks import row_ranks

UPPER = 0.99


def unit_ranks(importance: torch.Tensor) -> torch.Tensor:
    """r[i, j] = (rank of weight j in row i by ascending importance + 1/2) / in_features, in (0, 1)
    (`algo.masks.row_ranks`: one stable sort, ties keep column order). A threshold t then has
    exactly round(t * in) ranks below it in every row (t * in not a half-integer)."""
    return (row_ranks(importance).float() + 0.5) / importance.shape[1]


def soft_mask(ranks: torch.Tensor, threshold: torch.Tensor, tau: float) -> torch.Tensor:
    """M = sigmoid((r - t) / tau): near 0 for the weights ranked below the threshold (pruned), near
    1 above it (Lua-LLM's soft top-k, Eq. 7)."""
    return torch.sigmoid((ranks.float() - threshold) / tau)


def hard_mask(ranks: torch.Tensor, threshold: float) -> torch.Tensor:
    """The limit tau -> 0 of `soft_mask`: True where pruned."""
    return ranks.float() < threshold


def project(t: torch.Tensor, numels: torch.Tensor, sparsity: float) -> torch.Tensor:
    """The thresholds shifted by one constant and clipped into [0, UPPER] so that their
    parameter-weighted mean is exactly `sparsity` (`clip_to_mean`, mode shift)."""
    out = clip_to_mean(t.detach().double().cpu(), numels.double().cpu(), sparsity, 0.0, UPPER)
    return torch.as_tensor(out, dtype=t.dtype).to(t.device)


def kl_per_token(dense_logp: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(dense || masked) per predicted token: the mean over positions of
    sum_v p_dense(v) (log p_dense(v) - log p_masked(v))."""
    logq = torch.log_softmax(logits.float(), dim=-1)
    return (dense_logp.exp() * (dense_logp - logq)).sum(-1).mean()


def lua_allocation(
    thresholds: dict[str, float],
    sparsity: float,
    numels: dict[str, int],
    block_of: dict[str, int],
    details: dict | None = None,
    strength: float = 1.0,
) -> Allocation:
    """The learned thresholds as the per-linear targets, made exact once more (`project`) in
    float64: the parameter-weighted mean is the requested sparsity, every target in [0, UPPER].
    `strength` a scales the learned deviations, s_l = S + a (t_l - S), before the projection (the
    search's `lua_strength`; 0 is uniform)."""
    names = list(numels)
    t = torch.tensor([thresholds[k] for k in names], dtype=torch.float64)
    t = sparsity + strength * (t - sparsity)
    w = torch.tensor([numels[k] for k in names], dtype=torch.float64)
    exact = clip_to_mean(t, w, sparsity, 0.0, UPPER)
    per = {k: float(v) for k, v in zip(names, exact)}
    return Allocation("lua", sparsity, per, dict(numels), dict(block_of), dict(details or {}))
