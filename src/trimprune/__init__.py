"""trimprune: one-shot extreme-sparsity pruning of LLMs with TRIM row-wise sparsity."""
__version__ = "0.1.0"

from .api import PruneResult, prune  # noqa: E402
from .config import (AllocationConfig, CalibConfig, PruneConfig, RunConfig, ScorerConfig,  # noqa: E402
                     TrimConfig)
from .errors import TrimpruneError  # noqa: E402
from .io.compact import load_pruned  # noqa: E402
from .io.evaluate import perplexity  # noqa: E402
from .io.export import load_masks  # noqa: E402
from .io.models import ModelAdapter, load_model  # noqa: E402

__all__ = ["PruneConfig", "ScorerConfig", "AllocationConfig", "CalibConfig", "TrimConfig", "RunConfig",
           "PruneResult", "prune", "load_model", "perplexity", "ModelAdapter", "TrimpruneError", "load_masks",
           "load_pruned", "__version__"]
