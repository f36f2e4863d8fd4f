"""The pure parts of `--allocation search`: the search space, a trial's parameters -> per-block
profile -> an allocation with the exact parameter-weighted mean and the bounds of the other
allocations.

The driver (`trimprune.search`) asks Optuna's TPE for the parameters of each trial (through
`suggest`, which only calls `trial.suggest_categorical` / `trial.suggest_float`: Optuna is not
imported here), prunes with `allocation_for(params, ...)` and scores the model on held-out
calibration sequences.

Search space (`--search-space`, a comma list):
- `rules`: the closed-form allocations and their parameters: OWL (M from `OWL_M_GRID`, lambda),
  AlphaPruning (metric, eps; the mapping of `--alpha-mapping`), ATP (beta);
- `free`: a smooth profile over depth, `N_CHEB` Chebyshev coefficients c_k on x_l = 2 l / (L - 1) -
  1: s_l = S + sum_k c_k T_k(x_l) (k = 1..N_CHEB; T_0 would only move the mean, which is fixed);
- `trim`: TRIM on or off, per trial;
- `experts` (models with MoE blocks): the expert-aware redistribution within MoE blocks
  (`algo.allocation.expert`) on top of the trial's profile, lambda in `EXPERT_LAMBDA` and beta in
  `EXPERT_BETA` (warm starts: lambda 0, the profile alone);
- `layerif`: LayerIF (`algo.allocation.layerif`; its scores computed once per study with the
  `--layerif-*` settings), its range epsilon `layerif_eps` in `ALPHA_EPS` (the mapping of
  `--alpha-mapping`);
- `lua`: Lua-LLM (`algo.allocation.lua`; its thresholds trained once per study with the `--lua-*`
  settings), the strength `lua_strength` in `LUA_STRENGTH` that scales their deviations from the
  target (1: as learned, 0: uniform).
Each trial first picks its family (`family`: owl, alphapruning, atp, layerif, lua or free) as a
categorical. Every
profile ends with `clip_to_mean`: blocks in [0, UPPER] and the parameter-weighted mean exactly the
target, as OWL, AlphaPruning and ATP do on their own. A new study starts with `warm_starts`: uniform
(a free profile of zeros) and the rules with the config's parameters, so the search's best is never
worse than those on its own objective.
"""

from __future__ import annotations

from typing import Protocol

import torch

from trimprune.algo.allocation.atp import atp_block_sparsities, block_numels_of
from trimprune.algo.allocation.base import Allocation, clip_to_mean
from trimprune.algo.allocation.expert import Expert, apply_experts
from trimprune.config import ALPHA_METRICS

UPPER = 0.99
RULES = ("owl", "alphapruning", "atp")
OWL_M_GRID = (3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0)  # OWL's paper tried M in {3, 5, 7, 10}
OWL_LAMBDA = (0.0, 0.25)  # its paper: lambda in [0.02, 0.2]
ALPHA_EPS = (0.0, 0.5)
ATP_BETA = (0.0, 0.6)
N_CHEB = 4
CHEB_RANGE = (-0.1, 0.1)
EXPERT_LAMBDA = (0.0, 0.25)
EXPERT_BETA = (0.0, 1.0)
LUA_STRENGTH = (0.0, 2.0)


def families(spaces) -> list[str]:
    """The families a trial chooses from."""
    out = []
    if "rules" in spaces:
        out += list(RULES)
    if "layerif" in spaces:
        out.append("layerif")
    if "lua" in spaces:
        out.append("lua")
    if "free" in spaces:
        out.append("free")
    return out


def suggest(trial, spaces, trim_default: bool, moe: bool = False) -> dict:
    """A trial's parameters (Optuna's define-by-run: the parameters of the chosen family only;
    expert lambda and beta with `experts` on a model with MoE blocks, `moe`)."""
    fam = trial.suggest_categorical("family", families(spaces))
    if fam == "owl":
        trial.suggest_categorical("owl_m", list(OWL_M_GRID))
        trial.suggest_float("owl_lambda", *OWL_LAMBDA)
    elif fam == "alphapruning":
        trial.suggest_categorical("alpha_metric", list(ALPHA_METRICS))
        trial.suggest_float("alpha_eps", *ALPHA_EPS)
    elif fam == "atp":
        trial.suggest_float("atp_beta", *ATP_BETA)
    elif fam == "layerif":
        trial.suggest_float("layerif_eps", *ALPHA_EPS)
    elif fam == "lua":
        trial.suggest_float("lua_strength", *LUA_STRENGTH)
    else:
        for k in range(1, N_CHEB + 1):
            trial.suggest_float(f"c{k}", *CHEB_RANGE)
    if "trim" in spaces:
        trial.suggest_categorical("trim", [False, True])
    if "experts" in spaces and moe:
        trial.suggest_float("expert_lambda", *EXPERT_LAMBDA)
        trial.suggest_float("expert_beta", *EXPERT_BETA)
    params = dict(trial.params)
    params.setdefault("trim", trim_default)
    return params


def _clamp(v: float, lo_hi: tuple[float, float]) -> float:
    return min(max(float(v), lo_hi[0]), lo_hi[1])


def warm_starts(spaces, allocation, trim_default: bool, moe: bool = False) -> list[dict]:
    """The first trials of a new study: uniform (with `free`) and OWL, AlphaPruning and ATP with the
    parameters of `allocation` (an `AllocationConfig`; with `rules`), LayerIF with its epsilon
    (`--alpha-eps`; with `layerif`), Lua-LLM as learned (strength 1; with `lua`), clamped into the
    search's ranges; with `experts` on a MoE
    model, each with expert lambda 0 (the profile alone)."""
    out = []
    if "free" in spaces:
        out.append({"family": "free"} | {f"c{k}": 0.0 for k in range(1, N_CHEB + 1)})
    if "rules" in spaces:
        m = float(allocation.owl_m) if float(allocation.owl_m) in OWL_M_GRID else 5.0
        out += [
            {"family": "owl", "owl_m": m, "owl_lambda": _clamp(allocation.owl_lambda, OWL_LAMBDA)},
            {
                "family": "alphapruning",
                "alpha_metric": allocation.alpha_metric,
                "alpha_eps": _clamp(allocation.alpha_eps, ALPHA_EPS),
            },
            {"family": "atp", "atp_beta": _clamp(allocation.atp_beta, ATP_BETA)},
        ]
    if "layerif" in spaces:
        out.append({"family": "layerif", "layerif_eps": _clamp(allocation.alpha_eps, ALPHA_EPS)})
    if "lua" in spaces:
        out.append({"family": "lua", "lua_strength": 1.0})
    if "trim" in spaces:
        out = [p | {"trim": bool(trim_default)} for p in out]
    if "experts" in spaces and moe:
        out = [p | {"expert_lambda": 0.0, "expert_beta": 0.0} for p in out]
    return out


def chebyshev_profile(coeffs: list[float], n_blocks: int) -> list[float]:
    """sum_k c_k T_k(x_l), k = 1.., at x_l = 2 l / (L - 1) - 1 (x = 0 for one block)."""
    if n_blocks == 1:
        x = torch.zeros(1, dtype=torch.float64)
    else:
        x = torch.arange(n_blocks, dtype=torch.float64) * (2.0 / (n_blocks - 1)) - 1.0
    t_prev, t = torch.ones_like(x), x.clone()
    out = torch.zeros_like(x)
    for c in coeffs:  # T_1, T_2, ... by the recurrence T_{k+1} = 2 x T_k - T_{k-1}
        out += float(c) * t
        t_prev, t = t, 2 * x * t - t_prev
    return out.tolist()


def free_block_sparsities(
    coeffs: list[float], sparsity: float, block_numels: list[int], upper: float = UPPER
) -> list[float]:
    s = torch.tensor(chebyshev_profile(coeffs, len(block_numels)), dtype=torch.float64) + sparsity
    return clip_to_mean(
        s, torch.tensor(block_numels, dtype=torch.float64), sparsity, 0.0, upper
    ).tolist()


class RuleSources(Protocol):
    """What the rules need from the model: OWL's outlier ratios per block for a threshold M (from a
    dense walk, cached), AlphaPruning's per-linear metrics (from the weights, cached), and the
    experts of every block with their routed tokens (from the same dense walk; only asked for a
    trial with expert parameters), LayerIF's per-linear scores (only asked for a `layerif`
    trial) and Lua-LLM's learned thresholds (only asked for a `lua` trial)."""

    def owl_ratios(self, m: float) -> list[float]: ...

    def alpha_metrics(self) -> dict[str, dict]: ...

    def experts(self) -> list[list[Expert]]: ...

    def layerif_scores(self) -> dict[str, float]: ...

    def lua_thresholds(self) -> dict[str, float]: ...


def allocation_for(
    params: dict,
    sparsity: float,
    numels: dict[str, int],
    block_of: dict[str, int],
    sources: RuleSources,
    alpha_mapping: str = "block_wise",
) -> Allocation:
    """The allocation of a trial's parameters (`suggest`), method "search", with the parameters in
    its details."""
    from trimprune.algo.allocation.alphapruning import alpha_from_metrics
    from trimprune.algo.allocation.owl import owl_from_ratios

    fam = params["family"]
    blocks = block_numels_of(numels, block_of)
    if fam == "owl":
        per = owl_from_ratios(
            sources.owl_ratios(params["owl_m"]),
            params["owl_m"],
            params["owl_lambda"],
            sparsity,
            numels,
            block_of,
        ).per_linear
    elif fam == "alphapruning":
        per = alpha_from_metrics(
            sources.alpha_metrics(),
            params["alpha_metric"],
            params["alpha_eps"],
            alpha_mapping,
            sparsity,
            numels,
            block_of,
        ).per_linear
    elif fam == "layerif":
        from trimprune.algo.allocation.layerif import layerif_allocation

        per = layerif_allocation(
            sources.layerif_scores(),
            params["layerif_eps"],
            alpha_mapping,
            sparsity,
            numels,
            block_of,
        ).per_linear
    elif fam == "lua":
        from trimprune.algo.allocation.lua import lua_allocation

        per = lua_allocation(
            sources.lua_thresholds(),
            sparsity,
            numels,
            block_of,
            strength=params["lua_strength"],
        ).per_linear
    elif fam == "atp":
        pb = atp_block_sparsities(len(blocks), sparsity, params["atp_beta"], blocks)
        per = {k: pb[block_of[k]] for k in numels}
    elif fam == "free":
        pb = free_block_sparsities(
            [params[f"c{k}"] for k in range(1, N_CHEB + 1)], sparsity, blocks
        )
        per = {k: pb[block_of[k]] for k in numels}
    else:
        raise ValueError(f"unknown search family {fam!r}")
    if "expert_lambda" in params:
        base = Allocation(fam, sparsity, per, numels, block_of)
        per = apply_experts(
            base, sources.experts(), params["expert_lambda"], params["expert_beta"]
        ).per_linear
    return Allocation(
        "search", sparsity, per, numels, block_of, details={"family": fam, "params": dict(params)}
    )
