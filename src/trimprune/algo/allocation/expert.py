"""Expert-aware allocation: within each mixture-of-experts block, a sparsity per expert from how
often the router sends tokens to it (and, optionally, from its outlier ratio), the block's
parameter-weighted mean kept exactly. No published rule: the mapping is OWL's (Yin et al. 2024)
applied to the experts of one block, with routing frequency as the main score.

Per MoE block with experts e = 1..E (grouped by their experts module g, of E_g experts and C_g
routed token-slots over the calibration set: top-k routing counts each token k times) and c_e
routed calibration tokens:

    phi_e = log((c_e + 1/2) / (C_g + E_g / 2))                 smoothed log routing share
    o_e   = OWL's outlier ratio of the Wanda scores of e's projections (concatenated; threshold M)
    s_e   = (1 - beta) n(phi)_e + beta n(o)_e                   n(x) = (x - min x) / (max x - min x)
    s_e   = 0 for an expert never routed                        (n = 0 when max x = min x)
    t_e   = T - 2 lambda (s_e - sum_e w_e s_e / sum_e w_e)      w_e: weights of e's projections

then `clip_to_mean` (shift): every t_e in [0, UPPER] and sum_e w_e t_e = T sum_e w_e, T being the
parameter-weighted mean of the experts' sparsities under the layer-wise rule (`--expert-layerwise`,
uniform by default). The least scoring expert (rarely routed, few outliers) is pruned hardest; an
expert never routed gets the block's highest sparsity. With nothing clipped the experts span
T +- lambda at most (OWL's lambda: the spread is 2 lambda); lambda = 0 (or equal scores) gives every
expert T. The other linears of the block (attention, shared experts, routers are never pruned,
dense MLPs) keep the layer-wise rule's sparsity, so the block's parameter-weighted mean, and the
model's, are the layer-wise rule's. Every projection of an expert gets the expert's sparsity. Dense
blocks, and dense models, are the layer-wise rule unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from trimprune.algo.allocation.base import Allocation, clip_to_mean

UPPER = 0.99


@dataclass(frozen=True)
class Expert:
    """One expert of a MoE block, as the allocation sees it."""

    linears: tuple[str, ...]  # full names of its projections
    group: str  # its experts module (routing shares are taken within it)
    routed: int  # calibration tokens the router sent to it (summed over ranks)
    outlier: float = 0.0  # OWL outlier ratio of its projections' Wanda scores, percent


def _normalised(x: torch.Tensor) -> torch.Tensor:
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 0 else torch.zeros_like(x)


def routing_feature(experts: Sequence[Expert]) -> list[float]:
    """phi_e = log((c_e + 1/2) / (C_g + E_g / 2)): the smoothed log share of its group's routed
    token-slots (finite for an expert never routed)."""
    tot: dict[str, int] = {}
    num: dict[str, int] = {}
    for x in experts:
        tot[x.group] = tot.get(x.group, 0) + x.routed
        num[x.group] = num.get(x.group, 0) + 1
    return [math.log((x.routed + 0.5) / (tot[x.group] + num[x.group] / 2)) for x in experts]


def expert_scores(experts: Sequence[Expert], beta: float) -> list[float]:
    """s_e in [0, 1] (higher: kept denser); 0 for an expert never routed."""
    phi = _normalised(torch.tensor(routing_feature(experts), dtype=torch.float64))
    s = (1.0 - beta) * phi
    if beta > 0:
        s = s + beta * _normalised(torch.tensor([x.outlier for x in experts], dtype=torch.float64))
    never = torch.tensor([x.routed == 0 for x in experts])
    return torch.where(never, torch.zeros_like(s), s).tolist()


def expert_sparsities(
    experts: Sequence[Expert],
    weights: Sequence[int],
    target: float,
    lam: float,
    beta: float = 0.0,
    upper: float = UPPER,
) -> list[float]:
    """t_e (see the module's docstring): weighted mean exactly `target`, each in [0, upper]."""
    if not experts:
        return []
    s = torch.tensor(expert_scores(experts, beta), dtype=torch.float64)
    w = torch.tensor(list(weights), dtype=torch.float64)
    if lam == 0 or bool((s == s[0]).all()):
        return [float(target)] * len(experts)
    t = target - 2.0 * lam * (s - (s * w).sum() / w.sum())
    return clip_to_mean(t, w, target, 0.0, upper).tolist()


def apply_experts(
    base: Allocation, blocks: Sequence[Sequence[Expert]], lam: float, beta: float
) -> Allocation:
    """`base` (a layer-wise allocation) with the experts of each block (`blocks[b]`, empty for a
    dense block) redistributed by `expert_sparsities` around their mean under `base`."""
    per = dict(base.per_linear)
    per_expert: dict[str, float] = {}
    for experts in blocks:
        if not experts:
            continue
        w = [sum(base.numels[k] for k in x.linears) for x in experts]
        target = sum(base.per_linear[k] * base.numels[k] for x in experts for k in x.linears) / sum(
            w
        )
        for x, t in zip(experts, expert_sparsities(experts, w, target, lam, beta)):
            for k in x.linears:
                per[k] = t
            per_expert[x.linears[0].rsplit(".", 1)[0]] = t
    details = dict(base.details) | {
        "layerwise": base.method,
        "expert_lambda": lam,
        "expert_beta": beta,
        "per_expert": per_expert,
        "routed_tokens": {
            x.linears[0].rsplit(".", 1)[0]: x.routed for experts in blocks for x in experts
        },
    }
    return Allocation(
        "expert", base.requested, per, dict(base.numels), dict(base.block_of), details
    )
