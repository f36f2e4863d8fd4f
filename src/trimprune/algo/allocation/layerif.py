"""LayerIF (Askari et al. 2025, "LayerIF: Estimating Layer Quality for Large Language Models using
Influence Functions"): layer quality from influence functions, mapped to layer-wise sparsities.

For a group of weights l (a block's prunable linears, or one linear with `--layerif-per-linear`),
training examples z_i (calibration sequences, i = 1..n) with loss gradients g_i = grad_l l(z_i),
and the gradient of the validation loss v = grad_l L_val (the mean over the held-out sequences of
their per-sequence losses), the influence of z_i on the validation loss through l is (Koh & Liang
2017; DataInf, Kwon et al. 2023, eq. 2 restricted to one layer):

    I_l(z_i) = - v^T (H_l + lambda_l I)^{-1} g_i

positive when up-weighting z_i would raise the validation loss (a harmful example), negative when
it would lower it. Two forms of the inverse Hessian (`--layerif-hessian`):

- `identity` (TracIn at the final checkpoint / Hessian-free influence): H_l + lambda_l I := I, so
  I_l(z_i) = - v . g_i.
- `datainf` (DataInf, eq. 3-5): H_l ~ (1/n) sum_i g_i g_i^T, and the inverse of the damped average
  is replaced by the average of the damped rank-one inverses (exact by Sherman-Morrison):

      (1/n) sum_i (lambda_l I + g_i g_i^T)^{-1} v = (1/lambda_l) (v - (1/n) sum_i c_i g_i),
      c_i = (g_i . v) / (lambda_l + ||g_i||^2),

  so I_l(z_k) = -(1/lambda_l) (v . g_k - (1/n) u . g_k) with u = sum_i c_i g_i, and the damping
  lambda_l = `--layerif-damping` x (1 / (n d_l)) sum_i ||g_i||^2 (DataInf's 0.1 x the mean squared
  gradient entry; d_l the number of weights in l).

Layer score (LayerIF, `--layerif-score positive`): the cumulative positive influence
S_l = sum_i max(0, I_l(z_i)), the total harm the training examples do to the validation loss
through l. The paper reads a low S_l as a layer less sensitive to the training data, i.e. more
stable and better trained; we follow its mapping, AlphaPruning's
(`alphapruning.alpha_from_metrics`): S_l takes the place of the heavy-tail alpha (where a small
alpha also means a well-trained layer), so the layer with the least cumulative positive influence
is pruned least (s (1 - eps)) and the one with the most is pruned most (s (1 + eps)), then scaled
to the exact parameter-weighted mean and kept in [0, 0.99] (`--alpha-eps`, `--alpha-mapping`).

Where the calibration and validation sequences come from one distribution, nearly every training
example helps the validation loss (I_l(z_i) < 0), so many layers score S_l = 0 and share the lowest
sparsity, while the few with any harmful example take the rest. `--layerif-score signed` keeps the
helpful mass too: S_l = sum_i I_l(z_i) (with the identity Hessian, -n v . mean_i g_i), same
mapping, so the layer the training data help most is pruned least. The allocation warns
(`zero_score_warning`) when half of the groups or more score exactly 0 under `positive`.

This module is plain tensor code on the per-example reductions (dot products and squared norms per
group, float64); the gradients come from `engine.influence`.
"""

from __future__ import annotations

import dataclasses

import torch

from trimprune.algo.allocation.base import Allocation
from trimprune.config import LAYERIF_HESSIANS as HESSIANS
from trimprune.config import LAYERIF_SCORES as SCORES

METRIC = "layerif"


def tracin_influence(v_dot_g: torch.Tensor) -> torch.Tensor:
    """I(z_i) = - v . g_i for every training example (identity Hessian)."""
    return -v_dot_g.double()


def datainf_damping(sq_norms: torch.Tensor, dim: int, factor: float) -> float:
    """lambda_l = factor x (1 / (n d_l)) sum_i ||g_i||^2 (DataInf's damping); a tiny floor keeps a
    group whose gradients are all zero finite."""
    lam = factor * float(sq_norms.double().mean()) / max(int(dim), 1)
    return max(lam, 1e-30)


def datainf_coefficients(
    v_dot_g: torch.Tensor, sq_norms: torch.Tensor, lam: float | torch.Tensor
) -> torch.Tensor:
    """c_i = (g_i . v) / (lambda + ||g_i||^2): u = sum_i c_i g_i (`lam` a number, or one per
    column of `v_dot_g`)."""
    return v_dot_g.double() / (lam + sq_norms.double())


def datainf_influence(v_dot_g: torch.Tensor, u_dot_g: torch.Tensor, lam: float) -> torch.Tensor:
    """I(z_k) = -(1/lambda) (v . g_k - (1/n) u . g_k), n = the number of training examples."""
    n = v_dot_g.numel()
    return -(v_dot_g.double() - u_dot_g.double() / n) / lam


def influences(
    grads: torch.Tensor, v: torch.Tensor, hessian: str, damping: float = 0.1
) -> torch.Tensor:
    """The influences I(z_i) of one group from its whole per-example gradient matrix `grads` (n x
    d) and validation gradient `v` (d): the same reductions the streaming engine makes, for small
    groups and tests."""
    g, v = grads.double(), v.double()
    vd = g @ v
    if hessian == "identity":
        return tracin_influence(vd)
    if hessian != "datainf":
        raise ValueError(f"unknown LayerIF Hessian {hessian!r}: use {', '.join(HESSIANS)}")
    sq = (g * g).sum(1)
    lam = datainf_damping(sq, g.shape[1], damping)
    u = datainf_coefficients(vd, sq, lam) @ g
    return datainf_influence(vd, g @ u, lam)


def positive_influence(infl: torch.Tensor) -> float:
    """S_l = sum_i max(0, I_l(z_i)) (LayerIF's layer score: low = better trained)."""
    return float(infl.double().clamp_min(0).sum())


def layer_score(infl: torch.Tensor, score: str) -> float:
    """A group's score from its influences I_l(z_i): `positive` sum_i max(0, I_l(z_i)) (the
    paper's), `signed` sum_i I_l(z_i)."""
    if score == "positive":
        return positive_influence(infl)
    if score != "signed":
        raise ValueError(f"unknown LayerIF score {score!r}: use {', '.join(SCORES)}")
    return float(infl.double().sum())


def zero_score_warning(scores: dict[str, float], score: str) -> str | None:
    """The report's note when half of the groups or more have no positive influence at all (they
    then share the lowest sparsity); None otherwise, and always for `signed`."""
    zero = sum(1 for v in scores.values() if v == 0.0)
    if score != "positive" or not scores or 2 * zero < len(scores):
        return None
    return (
        f"LayerIF: {zero} of {len(scores)} groups have no positive influence (S_l = 0) and share "
        "the lowest sparsity; the calibration and validation sequences agree too closely for the "
        "positive-part score: --layerif-score signed ranks them by their total influence"
    )


def layerif_allocation(
    scores: dict[str, float],
    eps: float,
    mapping: str,
    sparsity: float,
    numels: dict[str, int],
    block_of: dict[str, int],
    details: dict | None = None,
) -> Allocation:
    """Per-linear scores S (a block's score repeated on each of its linears when scored per block)
    -> sparsities by AlphaPruning's mapping (`alpha_from_metrics`: linear onto [s(1-eps),
    s(1+eps)], larger S pruned more, the exact parameter-weighted mean, bounds [0, 0.99])."""
    from trimprune.algo.allocation.alphapruning import alpha_from_metrics

    alloc = alpha_from_metrics(
        {k: {METRIC: float(scores[k])} for k in numels},
        METRIC,
        eps,
        mapping,
        sparsity,
        numels,
        block_of,
    )
    d = {k: v for k, v in alloc.details.items() if k not in ("metric", "from_cache")}
    d.update(details or {})
    kind = d.get("score_kind", "positive")
    d["score"] = (
        "cumulative positive influence S_l (larger: pruned more)"
        if kind == "positive"
        else "total signed influence S_l (larger: pruned more)"
    )
    note = zero_score_warning(d.get("scores", {}), kind)
    if note:
        d["warning"] = note
    return dataclasses.replace(alloc, method="layerif", details=d)
