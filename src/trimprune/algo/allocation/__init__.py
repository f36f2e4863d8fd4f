"""Layer-wise sparsity allocation: one target sparsity per prunable linear.

Every method returns an `Allocation` whose parameter-weighted mean equals the requested global
sparsity (exactly, up to float rounding); a `file:` allocation must have that mean within
`MEAN_TOLERANCE`, or, with no sparsity given, sets the target to its own mean (`resolve_sparsity`).
"""
from __future__ import annotations

import dataclasses

from ...config import PruneConfig
from ...io.models import weight_2d
from ..executor import EAGER, Executor
from .base import MEAN_TOLERANCE, Allocation, from_file, read_allocation_file, uniform, weighted_mean


def linear_sizes(adapter) -> tuple[dict[str, int], dict[str, int]]:
    """(full linear name -> weight count, full linear name -> block index) for `adapter`'s blocks, in model
    order."""
    numels, block_of = {}, {}
    for i in range(adapter.num_blocks):
        for n, mod in adapter.linears(i).items():
            full = adapter.full_name(i, n)
            numels[full] = weight_2d(mod).numel()
            block_of[full] = i
    return numels, block_of


def resolve_sparsity(config: PruneConfig, adapter) -> PruneConfig:
    """With `--allocation file:PATH`: the file read against the model's linears (every block or linear
    named, values in [0, 1), the parameter-weighted mean within `MEAN_TOLERANCE` of `config.sparsity`);
    when no sparsity was given (None), the config with the file's mean as its target. Other configs are
    returned as they are."""
    a = config.allocation
    if not a.method.startswith("file:"):
        return config
    alloc = from_file(a.method[5:], config.sparsity, *linear_sizes(adapter))
    return config if config.sparsity is not None else dataclasses.replace(config, sparsity=alloc.requested)


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


__all__ = ["Allocation", "MEAN_TOLERANCE", "build_allocation", "linear_sizes", "read_allocation_file",
           "resolve_sparsity", "weighted_mean"]
