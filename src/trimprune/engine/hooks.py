"""Forward hooks that feed each linear's input to its `InputStats` during a block's forward."""

from __future__ import annotations

import torch
from torch import nn

from trimprune.algo.stats import InputStats, StatsNeeds
from trimprune.core.moe import ExpertLinear
from trimprune.core.ranks import SOLO, Ranks
from trimprune.core.runtime import EAGER, Executor


class StopForward(Exception):
    """Raised by a hook once every linear of interest has seen its input (the rest of the block is
    not needed)."""


class BlockHooks:
    """Forward hooks on the linears of one block. On the first batch it groups the linears by
    the identity of their input tensor; afterwards each group's statistics get each batch once.

    With ``stop`` the forward stops once every linear of ``only`` has seen its input (input
    re-calculation only needs the block up to the group being pruned)."""

    def __init__(
        self,
        linears: dict[str, nn.Module],
        needs: StatsNeeds,
        device: torch.device,
        total_tokens: int | None = None,
        only: set[str] | None = None,
        stop: bool = False,
        ex: Executor = EAGER,
        ranks: Ranks = SOLO,
        token_offset: int = 0,
        seq: int = 1,
    ):
        self.linears = linears
        self.seq = seq  # tokens per calibration sequence (routed experts' last tokens)
        self.ranks, self.token_offset = ranks, token_offset
        self.needs = needs
        self.device = device
        self.ex = ex
        self.total_tokens = total_tokens
        self.only = set(linears) if only is None else set(only)
        self.group_of: dict[str, int] = {}
        self.groups: list[list[str]] = []
        self.stats: list[InputStats] = []
        self._first_batch_inputs: list[tuple[torch.Tensor, int]] = []
        self._done: set[int] = set()
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._seen_names: set[str] = set()
        self.stop_when_seen: set[str] | None = set(self.only) if stop and only is not None else None
        # experts: the tokens the router sent to each (not the rows with `calibrate_all`)
        self.routed: dict[str, int] = {}

    def __enter__(self):
        for name, mod in self.linears.items():
            if name in self.only:
                self._handles.append(mod.register_forward_hook(self._make_hook(name)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._first_batch_inputs.clear()
        return False

    def _make_hook(self, name: str):
        def hook(module, inputs, output):
            x = inputs[0]
            gid = self.group_of.get(name)
            if gid is None:
                for t, g in self._first_batch_inputs:
                    if t is x:
                        gid = g
                        break
                if gid is None:
                    gid = len(self.groups)
                    self.groups.append([])
                    self.stats.append(
                        InputStats(
                            x.shape[-1],
                            self.device,
                            self.needs,
                            self.total_tokens,
                            torch.float64 if x.dtype == torch.float64 else torch.float32,
                            self.ex,
                            self.token_offset,
                        )
                    )
                    self._first_batch_inputs.append((x, gid))
                self.group_of[name] = gid
                self.groups[gid].append(name)
            routed = module.routed if isinstance(module, ExpertLinear) else None
            if routed is not None:  # per linear: experts may share one input (every token)
                n = x.shape[0] if routed.routed is None else routed.routed
                self.routed[name] = self.routed.get(name, 0) + int(n)
            if gid not in self._done:
                if routed is None:
                    self.stats[gid].add(x.detach())
                else:  # an expert: the tokens the router sent to it
                    self.stats[gid].add_routed(
                        x.detach(), routed.positions, routed.batch_tokens, self.seq
                    )
                self._done.add(gid)
            self._seen_names.add(name)
            if self.stop_when_seen is not None and self.stop_when_seen <= self._seen_names:
                raise StopForward

        return hook

    def reduce(self) -> BlockHooks:
        """After the forward: the statistics summed over the ranks (data-parallel runs)."""
        for st in self.stats:
            st.reduce(self.ranks)
        experts = [n for n in self.routed_names() if n in self.routed]
        if self.ranks.parallel and experts:
            counts = torch.tensor(
                [self.routed[n] for n in experts], dtype=torch.int64, device=self.device
            )
            self.routed.update(zip(experts, self.ranks.sum_(counts).tolist()))
        return self

    def routed_names(self) -> list[str]:
        """The experts' linears among the hooked ones, in model order."""
        return [
            n for n, m in self.linears.items() if n in self.only and isinstance(m, ExpertLinear)
        ]

    def next_batch(self) -> None:
        self._done.clear()
        self._seen_names.clear()
        self._first_batch_inputs.clear()

    def stats_for(self, name: str) -> InputStats:
        return self.stats[self.group_of[name]].finalize()
