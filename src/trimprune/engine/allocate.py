"""The allocation a config names, built against the model (OWL walks the captured activations)."""

from __future__ import annotations

import torch

from trimprune.algo.allocation import linear_sizes
from trimprune.algo.allocation.base import Allocation, from_file, uniform
from trimprune.algo.allocation.owl import outlier_ratios, owl_from_ratios
from trimprune.algo.scorers import Wanda
from trimprune.algo.stats import StatsNeeds
from trimprune.config import AllocationConfig, PruneConfig
from trimprune.core.model import weight_2d
from trimprune.core.moe import MoeCalibration, calibrate_all
from trimprune.core.runtime import EAGER, Executor
from trimprune.engine.walk import BlockRun, Streams, StreamUpdate, moe_calibration, walk


@torch.no_grad()
def owl_ratios(
    ms: list[float],
    adapter,
    captured,
    offload: bool | str,
    ex: Executor = EAGER,
    progress=False,
    moe: MoeCalibration | None = None,
) -> dict[float, list[float]]:
    """One dense walk over the captured calibration activations: per block, the Wanda scores of all
    its linears give the outlier ratio D_l for every threshold in `ms` (M -> [D_l per block])."""
    needs = StatsNeeds(sqnorm=True)
    ms = list(dict.fromkeys(float(m) for m in ms))
    ratios: list[list[float]] = []

    def visit(run: BlockRun) -> StreamUpdate:
        hooks = run.hooks(needs, ex)
        with hooks, calibrate_all(run.moe.mode == "all"):
            out = run.forward(run.streams.main, on_batch_end=hooks.next_batch)
        hooks.reduce()
        run.complete_experts(hooks, needs, ex)
        run.check_statistics(hooks, ex)
        scores = [
            Wanda().importance(weight_2d(mod).float(), hooks.stats_for(n))
            for n, mod in run.linears.items()
        ]
        ratios.append(outlier_ratios(scores, ms))
        return StreamUpdate(main=out)  # the dense block's outputs feed the next block

    walk(
        adapter,
        captured,
        Streams(captured.hidden),
        visit,
        offload=offload,
        progress=progress,
        desc="OWL scores",
        ex=ex,
        moe=moe,
    )
    return {m: [r[j] for r in ratios] for j, m in enumerate(ms)}


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


def build_allocation(
    config: PruneConfig, adapter, captured, ex: Executor = EAGER, progress=False
) -> Allocation:
    """The allocation `config.allocation` names, for the linears of `adapter`'s blocks (OWL walks
    the captured calibration activations through the dense model)."""
    numels, block_of = linear_sizes(adapter)
    a, s = config.allocation, config.sparsity
    if a.method == "uniform":
        assert s is not None  # PruneConfig requires --sparsity unless the allocation is a file
        return uniform(s, numels, block_of)
    if a.method.startswith("file:"):
        return from_file(a.method[5:], s, numels, block_of)
    assert s is not None  # PruneConfig requires --sparsity unless the allocation is a file
    if a.method == "atp":
        from trimprune.algo.allocation.atp import atp_allocation

        return atp_allocation(a.atp_beta, s, numels, block_of)
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
