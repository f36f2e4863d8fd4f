"""The allocation a config names, built against the model (OWL walks the captured activations)."""

from __future__ import annotations

import dataclasses

import torch

from trimprune.algo.allocation import linear_sizes
from trimprune.algo.allocation.base import Allocation, from_file, uniform
from trimprune.algo.allocation.expert import Expert, apply_experts
from trimprune.algo.allocation.owl import outlier_ratios, owl_from_ratios
from trimprune.algo.scorers import Wanda
from trimprune.algo.stats import StatsNeeds
from trimprune.config import AllocationConfig, PruneConfig
from trimprune.core.model import weight_2d
from trimprune.core.moe import ExpertLinear, MoeCalibration, calibrate_all
from trimprune.core.runtime import EAGER, Executor
from trimprune.engine.walk import BlockRun, Streams, StreamUpdate, moe_calibration, walk


@torch.no_grad()
def dense_scores(
    ms: list[float],
    adapter,
    captured,
    offload: bool | str,
    ex: Executor = EAGER,
    progress=False,
    moe: MoeCalibration | None = None,
    experts_m: float | None = None,
    experts: bool = False,
) -> tuple[dict[float, list[float]], list[list[Expert]]]:
    """One dense walk over the captured calibration activations: per block, the Wanda scores of all
    its linears give the outlier ratio D_l for every threshold in `ms` (M -> [D_l per block]);
    with `experts`, each MoE block's experts (`algo.allocation.expert.Expert`: routed tokens
    summed over the ranks, counted before any `--moe-min-tokens` fallback; the outlier ratio of
    each expert's projections at `experts_m`, when given) per block (empty for a dense block)."""
    needs = StatsNeeds(sqnorm=True)
    ms = list(dict.fromkeys(float(m) for m in ms))
    ratios: list[list[float]] = []
    found: list[list[Expert]] = []

    def visit(run: BlockRun) -> StreamUpdate:
        hooks = run.hooks(needs, ex)
        with hooks, calibrate_all(run.moe.mode == "all"):
            out = run.forward(run.streams.main, on_batch_end=hooks.next_batch)
        hooks.reduce()
        routed = dict(hooks.routed)  # before the fallback's forward, which adds none
        run.complete_experts(hooks, needs, ex)
        run.check_statistics(hooks, ex)
        scores = {
            n: Wanda().importance(weight_2d(mod).float(), hooks.stats_for(n))
            for n, mod in run.linears.items()
            if ms or (experts and experts_m is not None and isinstance(mod, ExpertLinear))
        }
        if ms:
            ratios.append(outlier_ratios(list(scores.values()), ms))
        if experts:
            found.append(_experts_of(run, adapter, routed, scores, experts_m))
        return StreamUpdate(main=out)  # the dense block's outputs feed the next block

    walk(
        adapter,
        captured,
        Streams(captured.hidden),
        visit,
        offload=offload,
        progress=progress,
        desc="OWL scores" if ms else "expert routing",
        ex=ex,
        moe=moe,
    )
    return {m: [r[j] for r in ratios] for j, m in enumerate(ms)}, found


def _experts_of(run: BlockRun, adapter, routed, scores, m: float | None) -> list[Expert]:
    """The experts of `run`'s block, in model order."""
    members: dict[str, list[str]] = {}
    for n, mod in run.linears.items():
        if isinstance(mod, ExpertLinear):
            members.setdefault(n.rsplit(".", 1)[0], []).append(n)
    out = []
    for key, names in members.items():
        ratio = outlier_ratios([scores[n] for n in names], [m])[0] if m is not None else 0.0
        out.append(
            Expert(
                tuple(adapter.full_name(run.index, n) for n in names),
                key.rsplit(".", 1)[0],
                int(routed.get(names[0], 0)),
                ratio,
            )
        )
    return out


def owl_ratios(
    ms: list[float],
    adapter,
    captured,
    offload: bool | str,
    ex: Executor = EAGER,
    progress=False,
    moe: MoeCalibration | None = None,
) -> dict[float, list[float]]:
    """`dense_scores`' outlier ratios per block, for every threshold in `ms`."""
    return dense_scores(ms, adapter, captured, offload, ex, progress, moe)[0]


def owl_allocation(
    config: AllocationConfig,
    sparsity: float,
    adapter,
    captured,
    numels,
    block_of,
    offload: bool | str,
    ex: Executor = EAGER,
    progress=False,
    moe: MoeCalibration | None = None,
) -> Allocation:
    """The outlier ratios of one dense walk (`owl_ratios`), then the mapping above."""
    ratios = owl_ratios([config.owl_m], adapter, captured, offload, ex, progress, moe)[
        float(config.owl_m)
    ]
    return owl_from_ratios(ratios, config.owl_m, config.owl_lambda, sparsity, numels, block_of)


def layerif_scores_of(
    config: PruneConfig, model, adapter, ids: torch.Tensor, device, progress=False
) -> tuple[dict[str, float], dict]:
    """LayerIF's per-linear scores (`engine.influence.layerif_scores`): the last
    `--layerif-holdout` of the sequences `ids` are the validation set, the others the training
    examples of the influence functions."""
    from trimprune.engine.influence import layerif_scores
    from trimprune.errors import TrimpruneError

    a = config.allocation
    n = int(ids.shape[0])
    k = a.layerif_holdout or max(1, n // 8)
    if k >= n:
        raise TrimpruneError(
            f"{{layerif_holdout}} {k} leaves none of the {n} calibration sequences as training "
            "examples: use more {nsamples} or a smaller {layerif_holdout}"
        )
    return layerif_scores(
        model,
        adapter,
        ids[: n - k],
        ids[n - k :],
        device,
        a.layerif_hessian,
        a.layerif_damping,
        a.layerif_per_linear,
        progress,
        score=a.layerif_score,
    )


def layerif_allocation(
    config: PruneConfig, model, adapter, ids: torch.Tensor, device, numels, block_of, progress=False
) -> Allocation:
    """`--allocation layerif`: `layerif_scores_of`, mapped by AlphaPruning's mapping
    (`algo.allocation.layerif`)."""
    from trimprune.algo.allocation.layerif import layerif_allocation as from_scores

    a, s = config.allocation, config.sparsity
    assert s is not None
    scores, details = layerif_scores_of(config, model, adapter, ids, device, progress)
    return from_scores(scores, a.alpha_eps, a.alpha_mapping, s, numels, block_of, details)


# allocations `build_allocation` reads from the captured calibration activations (a dense walk):
# cheap to compute again from other sequences, unlike the learned ones (Lua-LLM, LayerIF)
FROM_ACTIVATIONS = ("owl", "expert")


def build_allocation(
    config: PruneConfig,
    adapter,
    captured,
    ex: Executor = EAGER,
    progress=False,
    model=None,
    ids: torch.Tensor | None = None,
) -> Allocation:
    """The allocation `config.allocation` names, for the linears of `adapter`'s blocks (OWL walks
    the captured calibration activations through the dense model; LayerIF and Lua-LLM
    backpropagate the calibration sequences `ids` through `model`)."""
    numels, block_of = linear_sizes(adapter)
    a, s = config.allocation, config.sparsity
    if a.method == "expert":
        return expert_allocation(config, adapter, captured, numels, block_of, ex, progress)
    if a.method == "uniform":
        assert s is not None  # PruneConfig requires --sparsity unless the allocation is a file
        return uniform(s, numels, block_of)
    if a.method.startswith("file:"):
        return from_file(a.method[5:], s, numels, block_of)
    assert s is not None  # PruneConfig requires --sparsity unless the allocation is a file
    if a.method == "atp":
        from trimprune.algo.allocation.atp import atp_allocation

        return atp_allocation(a.atp_beta, s, numels, block_of)
    if a.method == "layerif":
        if model is None or ids is None:
            raise ValueError("--allocation layerif needs the model and the calibration ids")
        return layerif_allocation(
            config, model, adapter, ids, captured.exec_device, numels, block_of, progress
        )
    if a.method == "lua":
        if model is None or ids is None:
            raise ValueError("--allocation lua needs the model and the calibration ids")
        from trimprune.engine.lua import lua_allocation_of

        return lua_allocation_of(config, model, adapter, captured, ids, ex, progress)
    if a.method == "search":
        raise ValueError(
            "--allocation search is decided by the search driver (trimprune.search), not here"
        )
    if a.method == "owl":
        return owl_allocation(
            a,
            s,
            adapter,
            captured,
            numels,
            block_of,
            config.run.offload,
            ex,
            progress,
            moe_calibration(config),
        )
    from trimprune.algo.allocation.alphapruning import BlockVisit, alpha_allocation

    visit = BlockVisit(ex, captured.exec_device) if config.run.offload else None
    return alpha_allocation(a, s, adapter, numels, block_of, captured.exec_device, progress, visit)


def expert_allocation(
    config: PruneConfig,
    adapter,
    captured,
    numels,
    block_of,
    ex: Executor = EAGER,
    progress=False,
) -> Allocation:
    """`--allocation expert`: the layer-wise rule of `--expert-layerwise`, then each MoE block's
    experts redistributed by routing frequency (and outlier ratio) around their mean
    (`algo.allocation.expert`). One dense walk gives the routing (and OWL's ratios)."""
    a, s = config.allocation, config.sparsity
    assert s is not None
    base_rule = a.expert_layerwise
    ms = [a.owl_m] if base_rule == "owl" else []
    ratios, experts = dense_scores(
        ms,
        adapter,
        captured,
        config.run.offload,
        ex,
        progress,
        moe_calibration(config),
        experts_m=a.owl_m if a.expert_beta > 0 else None,
        experts=True,
    )
    if base_rule == "owl":
        base = owl_from_ratios(ratios[float(a.owl_m)], a.owl_m, a.owl_lambda, s, numels, block_of)
    else:
        layerwise = dataclasses.replace(config, allocation=dataclasses.replace(a, method=base_rule))
        base = build_allocation(layerwise, adapter, captured, ex, progress)
    return apply_experts(base, experts, a.expert_lambda, a.expert_beta)
