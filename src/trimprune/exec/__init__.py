"""How the algorithms run: executors (eager, CUDA graphs and side streams), registered fast paths
(Triton kernels), deferred host copies and profiling phases. The algorithms (`trimprune.algo`)
never import this package; it registers its fast paths against their pure functions."""

from trimprune.exec.executor import CudaExecutor, EagerExecutor, make_executor
from trimprune.exec.profiling import Phases

__all__ = ["CudaExecutor", "EagerExecutor", "Phases", "make_executor"]
