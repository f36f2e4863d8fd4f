"""Layer-wise sparsity allocation: one target sparsity per prunable linear.

Every method returns an `Allocation` whose parameter-weighted mean equals the requested global
sparsity (exactly, up to float rounding), except `file:` which is taken as written.
"""
from __future__ import annotations

from ...config import PruneConfig
from ...io.models import weight_2d
from ..executor import EAGER, Executor
from .base import Allocation, from_file, uniform, weighted_mean


def linear_sizes(adapter) -> tuple[dict[str, int], dict[str, int]]:
    """(full linear name -> weights, full linear name -> block index), in model order."""
    numels, block_of = {}, {}
    for i in range(adapter.num_blocks):
        for n, mod in adapter.linears(i).items():
            full = adapter.full_name(i, n)
            numels[full] = weight_2d(mod).numel()
            block_of[full] = i
    return numels, block_of


def build_allocation(config: PruneConfig, adapter, captured, ex: Executor = EAGER,
                     progress=False) -> Allocation:
    """The allocation `config.allocation` names, for the linears of `adapter`'s blocks (OWL walks the
    captured calibration activations through the dense model)."""
    numels, block_of = linear_sizes(adapter)
    a, s = config.allocation, config.sparsity
    if a.method == "uniform":
        return uniform(s, numels, block_of)
    if a.method.startswith("file:"):
        return from_file(a.method[5:], s, numels, block_of)
    if a.method == "atp":
        from .atp import atp_allocation
        return atp_allocation(a.atp_beta, s, numels, block_of)
    if a.method == "search":
        raise ValueError("--allocation search is decided by the search driver (trimprune.search), not here")
    if a.method == "owl":
        from .owl import owl_allocation
        return owl_allocation(a, s, adapter, captured, numels, block_of, config.run.offload, ex, progress)
    from .alphapruning import BlockVisit, alpha_allocation
    visit = BlockVisit(ex, captured.exec_device) if config.run.offload else None
    return alpha_allocation(a, s, adapter, numels, block_of, captured.exec_device, progress, visit)


__all__ = ["Allocation", "build_allocation", "linear_sizes", "weighted_mean"]
