"""Layer-wise sparsity allocation: one target sparsity per prunable linear.

Every method returns an `Allocation` whose parameter-weighted mean equals the requested global
sparsity (exactly, up to float rounding); a `file:` allocation must have that mean within
`MEAN_TOLERANCE`, or, with no sparsity given, sets the target to its own mean (`resolve_sparsity`).
"""

from __future__ import annotations

import dataclasses

from trimprune.algo.allocation.base import (
    MEAN_TOLERANCE,
    Allocation,
    from_file,
    read_allocation_file,
    weighted_mean,
)
from trimprune.config import PruneConfig
from trimprune.core.model import weight_2d


def linear_sizes(adapter) -> tuple[dict[str, int], dict[str, int]]:
    """(full linear name -> weight count, full linear name -> block index) for `adapter`'s blocks,
    in model order."""
    numels, block_of = {}, {}
    for i in range(adapter.num_blocks):
        for n, mod in adapter.linears(i).items():
            full = adapter.full_name(i, n)
            numels[full] = weight_2d(mod).numel()
            block_of[full] = i
    return numels, block_of


def resolve_sparsity(config: PruneConfig, adapter) -> PruneConfig:
    """With `--allocation file:PATH`: the file read against the model's linears (every block or
    linear named, values in [0, 1), the parameter-weighted mean within `MEAN_TOLERANCE` of
    `config.sparsity`); when no sparsity was given (None), the config with the file's mean as its
    target. Other configs are returned as they are."""
    a = config.allocation
    if not a.method.startswith("file:"):
        return config
    alloc = from_file(a.method[5:], config.sparsity, *linear_sizes(adapter))
    return (
        config
        if config.sparsity is not None
        else dataclasses.replace(config, sparsity=alloc.requested)
    )


__all__ = [
    "Allocation",
    "MEAN_TOLERANCE",
    "linear_sizes",
    "read_allocation_file",
    "resolve_sparsity",
    "weighted_mean",
]
