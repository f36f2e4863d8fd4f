"""Layer-wise sparsity allocation: one target sparsity per prunable linear.

Every method returns an `Allocation` whose parameter-weighted mean equals the requested global
sparsity (exactly, up to float rounding), except `file:` which is taken as written.
"""
from .base import Allocation, weighted_mean

__all__ = ["Allocation", "weighted_mean"]
