"""trimprune: one-shot extreme-sparsity pruning of LLMs with TRIM row-wise sparsity."""
__version__ = "0.1.0"

from .config import PruneConfig  # noqa: E402
from .errors import TrimpruneError  # noqa: E402
from .evaluate import perplexity  # noqa: E402
from .models import ModelAdapter, load_model  # noqa: E402
from .pipeline import PruneResult, prune  # noqa: E402
from .export import load_masks  # noqa: E402

__all__ = ["PruneConfig", "PruneResult", "prune", "load_model", "perplexity", "ModelAdapter", "TrimpruneError",
           "load_masks", "__version__"]
