"""Small matrix helpers shared by the statistics and the TRIM metrics."""

from __future__ import annotations

import torch


def mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b (2-D, or batched 3-D) with a float32 result. For half-precision inputs every product is
    exact in float32, so this is their float32 product; `trimprune.exec` registers the fast path
    that keeps half inputs on tensor cores with float32 accumulation and output (same up to
    summation order)."""
    return torch.matmul(a.float(), b.float())
