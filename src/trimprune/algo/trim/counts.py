"""TRIM's integer allocation: row sparsities -> per-row pruned counts with an exact total.

The chosen vector of row sparsities is projected exactly onto {x in [0, x_max]^rows : mean(x) = s}
and rounded to integer counts whose total is the scorer's own number of pruned weights, so TRIM and
the scorer alone are compared at equal sparsity.
"""

from __future__ import annotations

import math

import torch


def project_capped_mean(x: torch.Tensor, s, cap: float, iters: int = 64) -> torch.Tensor:
    """Euclidean projection of each x (..., n) onto {y in [0, cap]^n : mean(y) = s}: y = clip(x -
    tau, 0, cap) with tau found by bisection (mean(clip(x - tau)) is monotone in tau). `s` a float
    or one per vector; no host synchronisation (64 halvings exhaust float64)."""
    x = x.double()
    s = torch.as_tensor(s, dtype=torch.float64, device=x.device)
    s = s.unsqueeze(-1) if s.dim() else s
    lo = x.amin(-1, keepdim=True) - cap
    hi = x.amax(-1, keepdim=True)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        above = (x - mid).clamp(0.0, cap).mean(-1, keepdim=True) > s
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
    return (x - 0.5 * (lo + hi)).clamp(0.0, cap)


def capped_counts(x: torch.Tensor, n: int, totals: torch.Tensor, cap: float):
    """Integer pruned-counts (P, rows) from row sparsities x (P, rows) of matrices with n inputs:
    every row in [0, floor(cap n)], row sums exactly `totals` (P,). Project the fractions onto the
    capped set with the right mean (TRIM's re-centred vectors can leave the bounds), floor, then
    hand the remainder to the rows with the largest fractional parts (take it from the smallest when
    the floors overshoot). After the projection the remainder is below the number of rows that can
    take one more weight, so one round suffices; `ok` (P,) guards the float arithmetic. No host
    synchronisation."""
    P, rows = x.shape
    kmax = int(cap * n + 1e-9)
    tot = totals.to(torch.float64).unsqueeze(1)
    y = project_capped_mean(x, tot[:, 0] / (rows * n), kmax / n) * n
    k0 = torch.floor(y + 1e-9).clamp(0, kmax)
    rem = tot - k0.sum(-1, keepdim=True)
    frac = y - k0
    key = torch.where(
        rem >= 0,
        torch.where(k0 < kmax, frac, torch.full_like(frac, -math.inf)),
        torch.where(k0 > 0, -frac, torch.full_like(frac, -math.inf)),
    )
    rank = torch.empty(x.shape, dtype=torch.long, device=x.device)
    rank.scatter_(
        -1,
        torch.sort(key, dim=-1, descending=True, stable=True)[1],
        torch.arange(rows, device=x.device).expand(P, rows),
    )
    k = (k0 + torch.sign(rem) * (rank < rem.abs()).double()).long()
    ok = (k.sum(-1) == totals) & (k.amin(-1) >= 0) & (k.amax(-1) <= kmax)
    return k, ok


def exact_counts(
    x: torch.Tensor, s: float, in_features: int, cap: float, total: int | None = None
) -> torch.Tensor:
    """`capped_counts` for one vector of row sparsities x (rows,), on the host, with the total
    round(s * rows * in) unless given; should the one round miss (float edge cases), the remaining
    weights are handed out one round after another by the same rule."""
    device = x.device
    x = x.detach().cpu()
    rows = x.numel()
    kmax = int(cap * in_features + 1e-9)
    if total is None:
        total = int(round(s * rows * in_features))
    if not 0 <= total <= rows * kmax:
        raise ValueError(f"sparsity {s} is not reachable with rows capped at {kmax}/{in_features}")
    k, ok = capped_counts(x.reshape(1, rows), in_features, torch.tensor([total]), cap)
    k = k[0]
    if not bool(ok[0]):
        k = _repair_counts(x, k, total, in_features, kmax)
    return k.to(device)


def _repair_counts(x: torch.Tensor, k: torch.Tensor, total: int, n: int, kmax: int) -> torch.Tensor:
    """Counts k (rows,) brought into [0, kmax] and to the exact total, by the rule of
    `capped_counts` repeated until nothing is left (host code, for the rare case one round did not
    suffice)."""
    k = k.clamp(0, kmax)
    frac = project_capped_mean(x, total / (x.numel() * n), kmax / n) * n - k.double()
    while True:
        rem = total - int(k.sum())
        if rem == 0:
            return k
        if rem > 0:
            pri = torch.where(k < kmax, frac, torch.full_like(frac, -math.inf))
            idx = torch.sort(pri, descending=True, stable=True)[1][
                : min(rem, int((k < kmax).sum()))
            ]
            k[idx] += 1
        else:
            pri = torch.where(k > 0, frac, torch.full_like(frac, math.inf))
            idx = torch.sort(pri, stable=True)[1][: min(-rem, int((k > 0).sum()))]
            k[idx] -= 1
        frac[idx] = 0.0
