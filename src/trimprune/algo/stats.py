"""Per-input statistics gathered by forward hooks during the calibration walk.

Linears that read the same input tensor (q/k/v, gate/up) share one `InputStats`, so the
Wanda norms and the Gram matrix X^T X are accumulated once per distinct input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from trimprune.core.linalg import mm_f32
from trimprune.core.ranks import Ranks
from trimprune.core.runtime import EAGER, Executor


@dataclass
class StatsNeeds:
    """What the scorers / TRIM / allocators of this run need from the inputs."""

    sqnorm: bool = True  # sum_t x_tj^2 per input feature j (Wanda, OWL)
    gram: bool = False  # G = sum_t x_t x_t^T in float32 (SparseGPT, TRIM on all tokens)
    last_token: bool = False  # last token of every sequence (TRIM reference mode)
    sample: int = 0  # a seeded uniform subsample of N tokens (TRIM sample:N)
    seed: int = 0


TILE = 2048  # Gram tiles for wide inputs: only the upper block triangle is computed


def gram_tiles(n: int, cuda: bool) -> list[tuple[int, int]]:
    if not cuda or n < 2 * TILE:
        return [(0, n)]
    t = n // TILE
    edges = [round(i * n / t) for i in range(t + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _gram_update(
    gram: torch.Tensor, x: torch.Tensor, tiles: list[tuple[int, int]], ex: Executor
) -> None:
    """gram += x^T x accumulated in float32 (float64 for float64 inputs). With several tiles only
    the upper block triangle is accumulated; `InputStats.finalize` mirrors it.

    The batch's product is finished before it is added (not `addmm_`, which folds the running sum
    into the product's rounding): the sum over batches is then the same whether one process holds
    them all or several processes hold one each and all-reduce."""
    if len(tiles) == 1 and (x.dtype == gram.dtype or not x.is_cuda):
        xf = x.to(gram.dtype)
        gram.add_(xf.t() @ xf)
        return
    for i, (a0, a1) in enumerate(tiles):
        for b0, b1 in tiles[i:]:
            gram[a0:a1, b0:b1].add_(
                ex.call(mm_f32, x[:, a0:a1].t(), x[:, b0:b1])
                if gram.dtype == torch.float32
                else x[:, a0:a1].t().to(gram.dtype) @ x[:, b0:b1].to(gram.dtype)
            )


class InputStats:
    """Accumulates statistics of one input stream X (tokens x in_features), and memoises what is
    derived from them (`derived`)."""

    def __init__(
        self,
        in_features: int,
        device: torch.device,
        needs: StatsNeeds,
        total_tokens: int | None = None,
        dtype: torch.dtype = torch.float32,
        ex: Executor = EAGER,
        token_offset: int = 0,
    ):
        self.in_features = in_features
        self.dtype = dtype  # float32, or float64 for float64 models
        self.device = device
        self.needs = needs
        self.ex = ex
        self.n_tokens = 0  # rows added (a routed expert: the tokens sent to it)
        self._seen = 0  # tokens of the batches added so far (positions of the token sample)
        self._offset = token_offset  # tokens of the ranks before this one (data-parallel runs)
        self._derived: dict = {}
        self.sqnorm = torch.zeros(in_features, dtype=dtype, device=device) if needs.sqnorm else None
        self.gram = (
            torch.zeros(in_features, in_features, dtype=dtype, device=device)
            if needs.gram
            else None
        )
        self._last: list[torch.Tensor] = []
        self._sample: list[torch.Tensor] = []
        self._sample_pos = None
        self._tiles = gram_tiles(in_features, torch.device(device).type == "cuda")
        self._final = False
        if needs.sample:
            if not total_tokens:
                raise ValueError("sample statistics need the total number of calibration tokens")
            g = torch.Generator().manual_seed(needs.seed)
            k = min(needs.sample, total_tokens)
            self._sample_pos = torch.sort(torch.randperm(total_tokens, generator=g)[:k])[0]

    def add(self, x: torch.Tensor) -> None:
        """Add a batch of inputs (batch x seq x in_features, or tokens x in_features; leading
        dimensions beyond the batch are folded into it, e.g. DeepSeek's (batch, 1, seq, rank))."""
        if x.dim() == 2:
            x = x.unsqueeze(0)
        elif x.dim() > 3:
            x = x.reshape(-1, x.shape[-2], x.shape[-1])
        b, seq, c = x.shape
        flat = x.reshape(-1, c)
        last = x[:, -1, :] if self.needs.last_token else None
        self._add(flat, None, b * seq, last)

    def add_routed(
        self, x: torch.Tensor, positions: torch.Tensor, batch_tokens: int, seq: int
    ) -> None:
        """Add the rows `x` a routed expert saw in one batch of `batch_tokens` tokens
        (`positions`: their places in the flattened batch; sequences of `seq` tokens). Its last
        tokens are the routed last tokens of sequences; its token sample the routed sampled
        tokens."""
        flat = x.reshape(-1, x.shape[-1])
        last = flat[positions % seq == seq - 1] if self.needs.last_token else None
        self._add(flat, positions, batch_tokens, last)

    def _add(
        self, flat: torch.Tensor, positions: torch.Tensor | None, batch_tokens: int, last
    ) -> None:
        if self.sqnorm is not None:
            self.sqnorm.add_(
                torch.linalg.vector_norm(flat, ord=2, dim=0, dtype=self.dtype).square()
            )
        if self.gram is not None:
            _gram_update(self.gram, flat, self._tiles, self.ex)
            self._final = False
            self._derived.clear()
        if last is not None:
            self._last.append(last.to(self.dtype))
        if self._sample_pos is not None:
            lo, hi = self._offset + self._seen, self._offset + self._seen + batch_tokens
            pos = self._sample_pos[(self._sample_pos >= lo) & (self._sample_pos < hi)] - lo
            if pos.numel() and positions is None:
                self._sample.append(flat[pos.to(flat.device)].to(self.dtype))
            elif positions is not None and pos.numel():  # the routed rows among the sampled ones
                rows = torch.isin(positions, pos.to(positions.device))
                self._sample.append(flat[rows].to(self.dtype))
        self.n_tokens += flat.shape[0]
        self._seen += batch_tokens

    def reduce(self, ranks: Ranks) -> None:
        """Sum the statistics over the ranks of a data-parallel run (before `finalize`); gather the
        kept tokens in rank order."""
        if not ranks.parallel:
            return
        for t in (self.sqnorm, self.gram):
            if t is not None:
                ranks.sum_(t)
        self.n_tokens = ranks.sum_int(self.n_tokens, self.device)
        kept = ([self._last] if self.needs.last_token else []) + (
            [self._sample] if self._sample_pos is not None else []
        )
        for rows in kept:
            local = (
                torch.cat(rows, 0)
                if rows
                else torch.zeros(0, self.in_features, dtype=self.dtype, device=self.device)
            )
            rows[:] = [ranks.cat(local)]
        self._derived.clear()

    def finalize(self) -> InputStats:
        """Mirror the upper block triangle of a tiled Gram matrix (idempotent)."""
        if self.gram is not None and not self._final and len(self._tiles) > 1:
            for i, (a0, a1) in enumerate(self._tiles):
                for b0, b1 in self._tiles[i + 1 :]:
                    self.gram[b0:b1, a0:a1] = self.gram[a0:a1, b0:b1].t()
        self._final = True
        return self

    # ------------------------------------------------------------------ views
    def wanda_norm(self) -> torch.Tensor:
        """||X_j||_2 per input feature j (Wanda's activation norm)."""
        assert self.sqnorm is not None
        return self.sqnorm.sqrt()

    def explicit_inputs(self, mode: str) -> torch.Tensor:
        """(in_features, T) matrix of kept input vectors: last tokens or the token subsample."""
        rows = self._last if mode == "last-token" else self._sample
        return torch.cat(rows, 0).t().contiguous()

    def kept_tokens(self, mode: str) -> int:
        """Tokens TRIM measures on in `mode` ("all", "last-token" or "sample"): fewer for a routed
        expert than for a dense linear."""
        if mode == "all":
            return self.n_tokens
        return sum(int(r.shape[0]) for r in (self._last if mode == "last-token" else self._sample))

    def derived(self, key, make: Callable[[], Any]):
        """make(), computed once per key while these statistics stay unchanged (e.g. SparseGPT's
        inverse Hessian factor, which the linears reading this input share)."""
        if key not in self._derived:
            self._derived[key] = make()
        return self._derived[key]

    def has_derived(self, key) -> bool:
        """Whether `derived(key, ...)` was computed already (a batched computation fills in the
        others)."""
        return key in self._derived
