"""The processes of a data-parallel prune (`torch.distributed`, started by `torchrun`), or one
process.

The calibration sequences are split into contiguous shares, one per rank (`Ranks.share`); every rank
runs every block on its share. What is a sum over tokens is summed over ranks with all-reduce: the
input statistics (Wanda norms, Gram matrices, token counts; OWL's outlier ratios follow from them),
the block safeguard's squared errors, the evaluation NLL. Token subsets (TRIM's last tokens or
sampled tokens) are gathered in rank order, which is their order in a single process.

The per-linear work of a block (TRIM searches, masks, SparseGPT's reconstruction) is split across
ranks by `Ranks.assign` and each result is broadcast from the rank that computed it, so that every
rank holds the same pruned weights without repeating the work. With one process every operation
here is the identity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> Ranks:
        """The default process group's ranks, or a single process when none is initialised."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return SOLO

    @property
    def parallel(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Whether this is the rank that writes outputs and prints progress."""
        return self.rank == 0

    def share(self, n: int, rank: int | None = None) -> slice:
        """This rank's contiguous share of `n` items; the first `n % world` ranks hold one more."""
        r = self.rank if rank is None else rank
        q, extra = divmod(n, self.world)
        start = r * q + min(r, extra)
        return slice(start, start + q + (r < extra))

    def assign(self, costs: list[int]) -> list[int]:
        """The rank that does each of the items: largest cost first, to the least loaded rank (the
        lowest rank on ties); the same on every rank."""
        load = [0] * self.world
        owner = [0] * len(costs)
        for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
            r = min(range(self.world), key=lambda k: (load[k], k))
            owner[i] = r
            load[r] += costs[i]
        return owner

    # ------------------------------------------------------------------ collectives
    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """In place: the sum of `t` over ranks (the same bits on every rank)."""
        if self.parallel:
            dist.all_reduce(t)
        return t

    def sum_int(self, n: int, device) -> int:
        return (
            int(self.sum_(torch.tensor([n], dtype=torch.int64, device=device)).item())
            if self.parallel
            else n
        )

    def counts(self, n: int, device) -> list[int]:
        """`n` of every rank, in rank order."""
        if not self.parallel:
            return [n]
        out = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(self.world)]
        dist.all_gather(out, torch.tensor([n], dtype=torch.int64, device=device))
        return [int(x.item()) for x in out]

    def broadcast_(self, t: torch.Tensor, src: int) -> torch.Tensor:
        """In place: `t` of rank `src` on every rank. A non-contiguous `t` (a transposed or strided
        expert's view into its fused parameter, `core.moe.ExpertLinear`) goes through a contiguous
        copy: the collectives write whole buffers."""
        if self.parallel:
            if t.is_contiguous():
                dist.broadcast(t, src)
            else:
                buf = t.contiguous()
                dist.broadcast(buf, src)
                t.copy_(buf)
        return t

    def cat(self, t: torch.Tensor) -> torch.Tensor:
        """The rows (dim 0) of every rank's `t`, concatenated in rank order (shares may differ in
        size)."""
        if not self.parallel:
            return t
        sizes = self.counts(t.shape[0], t.device)
        buf = [t.new_empty((max(sizes),) + tuple(t.shape[1:])) for _ in range(self.world)]
        pad = t.new_zeros((max(sizes),) + tuple(t.shape[1:]))
        pad[: t.shape[0]] = t
        dist.all_gather(buf, pad)
        return torch.cat([b[:s] for b, s in zip(buf, sizes)], 0)

    def gather(self, obj) -> list:
        """Every rank's `obj` (host objects exchanged between this run's own processes), in rank
        order."""
        if not self.parallel:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.parallel:
            dist.barrier()


SOLO = Ranks()
