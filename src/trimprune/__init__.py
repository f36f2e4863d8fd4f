"""trimprune: one-shot extreme-sparsity pruning of LLMs with TRIM row-wise sparsity.

The names below load on first use, so `import trimprune` (and the command line) starts without
torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "PruneConfig": ".config",
    "ScorerConfig": ".config",
    "AllocationConfig": ".config",
    "CalibConfig": ".config",
    "TrimConfig": ".config",
    "RunConfig": ".config",
    "SearchConfig": ".config",
    "TrimpruneError": ".errors",
    "NonFiniteError": ".errors",
    "PruneResult": ".api",
    "prune": ".api",
    "load_model": ".io.models",
    "LoadedModel": ".io.models",
    "ModelSource": ".io.models",
    "ModelAdapter": ".io.models",
    "perplexity": ".io.evaluate",
    "load_masks": ".io.export",
    "load_pruned": ".io.compact",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'trimprune' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
