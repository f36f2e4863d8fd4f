"""Mask construction shared by every scorer. A mask is a bool tensor shaped like the weight
(out_features, in_features); True marks a weight that is pruned (set to zero)."""

from __future__ import annotations

import numpy as np
import torch


def row_ranks(scores: torch.Tensor) -> torch.Tensor:
    """rank[r, c] = position of column c in row r sorted by ascending importance (stable sort,
    ties keep column order, as in the Wanda reference). One sort per matrix; any per-row
    sparsity vector then gives its mask by a comparison (`mask_from_counts`)."""
    order = torch.sort(scores, dim=1, stable=True)[1]
    dt = torch.int32 if scores.shape[1] < 2**31 else torch.int64  # half the memory traffic of int64
    ranks = torch.empty(order.shape, dtype=dt, device=scores.device)
    ranks.scatter_(
        1, order, torch.arange(scores.shape[1], device=scores.device, dtype=dt).expand_as(order)
    )
    return ranks


def mask_from_counts(ranks: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Prune the counts[r] least important weights of each row r (counts may carry leading
    batch dimensions: ranks (R, C), counts (..., R) -> mask (..., R, C))."""
    return ranks < counts.unsqueeze(-1)


def per_row_count(in_features: int, sparsity: float) -> int:
    """Weights pruned per row for a uniform per-row sparsity: round(sparsity * in_features)."""
    return int(round(sparsity * in_features))


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per-row selection (Wanda): exactly k = round(sparsity * in) lowest scores of every row, ties
    broken by column order (the first k of a stable ascending sort, `row_mask_by_sort`). Found from
    the k-th smallest score of each row: the scores below it, then the first of those equal to it
    until k are pruned (no sort of the matrix: less memory and time)."""
    k = per_row_count(scores.shape[1], sparsity)
    if k == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    kth = scores.kthvalue(k, dim=1, keepdim=True).values
    below = scores < kth
    tie = scores == kth
    room = k - below.sum(1, keepdim=True, dtype=torch.int32)  # >= 1: the k-th value itself ties
    return below | (tie & (tie.cumsum(1, dtype=torch.int32) <= room))


def row_mask_by_sort(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """`row_mask` by a stable sort of every row (the Wanda reference's way; the reference in
    tests)."""
    k = per_row_count(scores.shape[1], sparsity)
    order = torch.sort(scores, dim=1, stable=True)[1][:, :k]
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask.scatter_(1, order, True)
    return mask


def matrix_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """One threshold per matrix (magnitude baseline): exactly round(sparsity * numel) lowest
    scores."""
    k = int(round(sparsity * scores.numel()))
    flat = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        idx = torch.sort(scores.flatten(), stable=True)[1][:k]
        flat[idx] = True
    return flat.view_as(scores)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M: in every group of M consecutive input weights of a row, prune the N lowest scores."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"in_features {cols} is not a multiple of M={m}")
    g = scores.reshape(rows, cols // m, m)
    idx = torch.topk(g, n, dim=2, largest=False)[1]
    mask = torch.zeros_like(g, dtype=torch.bool)
    mask.scatter_(2, idx, True)
    return mask.reshape(rows, cols)


def is_nm(mask: torch.Tensor, n: int, m: int) -> bool:
    rows, cols = mask.shape
    return bool((mask.reshape(rows, cols // m, m).sum(-1) == n).all())


_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
_BITS_ON: dict = {}  # a copy per device (a host-to-device copy each time would synchronise)


def pack_mask(mask: torch.Tensor, to_cpu: bool = True) -> torch.Tensor:
    """Bit-pack a bool mask into uint8 on its own device (8 weights per byte, big-endian bit order,
    identical to numpy.packbits of the flattened mask); returns a CPU tensor (or, with to_cpu=False,
    leaves it on the mask's device)."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    if flat.device.type != "cpu" and flat.device not in _BITS_ON:
        _BITS_ON[flat.device] = _BITS.to(flat.device)
    bits = _BITS if flat.device.type == "cpu" else _BITS_ON[flat.device]
    packed = (flat.view(-1, 8) * bits).sum(1, dtype=torch.uint8)
    return packed.cpu() if to_cpu else packed


def unpack_mask(packed: torch.Tensor, shape) -> torch.Tensor:
    n = int(np.prod(shape))
    bits = np.unpackbits(packed.cpu().numpy())[:n]
    return torch.from_numpy(bits.astype(np.bool_)).reshape(tuple(shape))
