"""The block walk: each decoder block in order, visited with its inputs, then recomputed.

For each block: move it to the compute device (offload), check that its parameters and the hidden
states entering it are finite (`core.finite.check_walk_step`), hand it to a visitor as a `BlockRun`
(statistics with hooks, pruning), then recompute the block's outputs with the pruned weights and
feed them to the next block.

The streams (`Streams`): the calibration batches through the pruned model (`main`) and, for TRIM's
block safeguard, a subset of the calibration sequences followed through the dense model
(`subset_dense`) and through the pruned model (`subset_pruned`).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn

from trimprune.algo.stats import StatsNeeds
from trimprune.config import PruneConfig
from trimprune.core.finite import check_dense_outputs, check_statistics, check_walk_step
from trimprune.core.finite import extrema as _extrema
from trimprune.core.model import ModelAdapter
from trimprune.core.moe import ExpertLinear, MoeCalibration, calibrate_all
from trimprune.core.progress import BlockProgress, Progress
from trimprune.core.runtime import EAGER, Executor
from trimprune.engine.capture import Captured
from trimprune.engine.hooks import BlockHooks, StopForward


def moe_calibration(config: PruneConfig) -> MoeCalibration:
    return MoeCalibration(config.calib.moe, config.calib.moe_min_tokens)


def block_forward(
    block: nn.Module, captured: Captured, index: int, hidden: torch.Tensor
) -> torch.Tensor:
    args, kwargs = captured.args_for(index, hidden)
    out = block(hidden, *args, **kwargs)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out


@torch.no_grad()
def forward_block_all(
    block: nn.Module,
    captured: Captured,
    index: int,
    hidden: list[torch.Tensor],
    on_batch_end: Callable[[], None] | None = None,
    keep_outputs: bool = True,
    extrema: list[torch.Tensor] | None = None,
    ex: Executor = EAGER,
):
    """Run one block over every stored batch; returns the outputs (stored like the inputs).
    `extrema`: collects each output's (min, max) (`finite.extrema`), computed on the compute device.
    The batches go to the compute device and back through `ex.batches` / `ex.store`."""
    outs = []
    dev = captured.exec_device
    for x in ex.batches(hidden, dev):
        try:
            y = block_forward(block, captured, index, x)
        except StopForward:
            y = None
        if on_batch_end is not None:
            on_batch_end()
        if extrema is not None and y is not None:
            extrema.append(_extrema(y))
        if keep_outputs:
            outs.append(ex.store(y, captured.store_device) if y is not None else None)
    if keep_outputs and captured.store_device.type == "cpu" and dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return outs


@dataclass
class Streams:
    """The hidden states entering the current block: the calibration batches through the pruned
    model, and the block safeguard's subset through the dense and through the pruned model (empty
    without it)."""

    main: list[torch.Tensor]
    subset_dense: list[torch.Tensor] = field(default_factory=list)
    subset_pruned: list[torch.Tensor] = field(default_factory=list)


@dataclass
class StreamUpdate:
    """What a visitor hands back to the walk: the block's outputs on a stream when it computed them
    with the block's final weights (None: the walk computes them)."""

    main: list[torch.Tensor] | None = None
    subset_dense: list[torch.Tensor] | None = None
    subset_pruned: list[torch.Tensor] | None = None


@dataclass
class BlockRun:
    """One block of the walk: the module, its prunable linears and the streams entering it."""

    index: int
    module: nn.Module
    linears: OrderedDict[str, nn.Module]
    captured: Captured
    streams: Streams
    path: str = ""  # the block's module name, e.g. model.layers.3
    ex: Executor = EAGER  # moves the stored batches to the compute device and back
    moe: MoeCalibration = field(default_factory=MoeCalibration)
    # experts whose statistics came from every token (fewer routed tokens than moe.min_tokens):
    # linear name in the block -> its routed tokens
    moe_fallback: dict[str, int] = field(default_factory=dict)

    def forward(
        self,
        hidden: list[torch.Tensor],
        on_batch_end=None,
        keep_outputs: bool = True,
        extrema: list[torch.Tensor] | None = None,
    ) -> list:
        return forward_block_all(
            self.module,
            self.captured,
            self.index,
            hidden,
            on_batch_end,
            keep_outputs,
            extrema,
            self.ex,
        )

    def statistics(
        self,
        needs: StatsNeeds,
        ex: Executor = EAGER,
        only: set[str] | None = None,
        stop: bool = False,
    ) -> BlockHooks:
        """The statistics of the linears' inputs (of `only`, stopping the forward once they are seen
        with `stop`) over the main stream, from one forward with hooks (summed over the ranks);
        checked to be finite. Without `stop` the block's outputs are checked too
        (`core.finite.check_dense_outputs`): called before the block's weights change, this is
        the float16 overflow check, at the cost of one reduction per batch."""
        hooks = self.hooks(needs, ex, only, stop)
        outputs: list[torch.Tensor] | None = None if stop else []
        with hooks, calibrate_all(self.moe.mode == "all"):
            self.forward(
                self.streams.main,
                on_batch_end=hooks.next_batch,
                keep_outputs=False,
                extrema=outputs,
            )
        hooks.reduce()
        if outputs:
            with ex.phase("finite checks"):
                dtype = self.streams.main[0].dtype
                check_dense_outputs(self.path, self.index, outputs, dtype)
        self.complete_experts(hooks, needs, ex)
        self.check_statistics(hooks, ex)
        return hooks

    def hooks(
        self, needs: StatsNeeds, ex: Executor, only: set[str] | None = None, stop: bool = False
    ) -> BlockHooks:
        """Hooks gathering the statistics of this block's linears (of `only`) on the main
        stream."""
        c = self.captured
        return BlockHooks(
            self.linears,
            needs,
            c.exec_device,
            total_tokens=c.n_tokens,
            only=only,
            stop=stop,
            ex=ex,
            ranks=c.ranks,
            token_offset=c.token_offset,
            seq=self.streams.main[0].shape[1] if self.streams.main[0].dim() == 3 else 1,
        )

    def complete_experts(self, hooks: BlockHooks, needs: StatsNeeds, ex: Executor) -> None:
        """Experts that saw fewer than `moe.min_tokens` routed tokens: their statistics are
        gathered again from every token (one more forward, over those experts only) and they
        are listed in `moe_fallback`."""
        if self.moe.mode != "routed":
            return
        starved = {
            n: hooks.stats[g].n_tokens
            for n, g in hooks.group_of.items()
            if isinstance(self.linears[n], ExpertLinear)
            and hooks.stats[g].n_tokens < self.moe.min_tokens
        }
        if not starved:
            return
        experts = [cast(ExpertLinear, self.linears[n]) for n in starved]
        forced = {(x.owner, x.expert) for x in experts}
        again = self.hooks(needs, ex, only=set(starved), stop=True)
        with again, calibrate_all(forced=forced):
            self.forward(self.streams.main, on_batch_end=again.next_batch, keep_outputs=False)
        again.reduce()
        for n in starved:
            hooks.stats[hooks.group_of[n]] = again.stats[again.group_of[n]]
        self.moe_fallback.update(starved)

    def check_statistics(self, hooks: BlockHooks, ex: Executor = EAGER) -> None:
        """Stop (`NonFiniteError`, naming the linears) if the Wanda norms or Gram matrices are not
        finite."""
        with ex.phase("finite checks"):
            check_statistics(hooks, self.path, self.index, self.streams.main[0].dtype)

    def dense_subset(self) -> list[torch.Tensor]:
        """The block (still dense) on the dense model's subset stream."""
        return self.forward(self.streams.subset_dense)

    def pruned_subset(self) -> list[torch.Tensor]:
        """The block, with its current weights, on the pruned model's subset stream."""
        return self.forward(self.streams.subset_pruned)


def walk(
    adapter: ModelAdapter,
    captured: Captured,
    streams: Streams,
    visit: Callable[[BlockRun], StreamUpdate | None],
    offload: bool | str = False,
    progress=True,
    desc: str = "pruning",
    ex: Executor = EAGER,
    start: int = 0,
    after_block: Callable[[int, Streams], None] | None = None,
    moe: MoeCalibration | None = None,
) -> Streams:
    """Layer-sequential walk. `visit(run)` collects statistics and prunes; then the block's outputs
    are recomputed with its final weights (unless the visitor returned them) and fed to block i+1.
    `progress`: a `BlockProgress` (the caller closes it), or what `Progress.of` takes.
    `start`: the first block visited (`streams` are then the states entering it: a resumed run);
    `after_block(i, streams)`: called once block i is done, with the streams entering block i+1
    (resume states). `moe`: where experts' statistics come from.

    NaN / Inf never passes: as each block is loaded, its parameters and the hidden states entering
    it on the main stream are checked (one reduction per tensor, one host read per block), and the
    last block's outputs at the end; a `NonFiniteError` names the tensor."""
    own = not isinstance(progress, BlockProgress)
    blocks = Progress.of(progress).blocks(adapter.num_blocks, desc) if own else progress
    # extrema of streams.main, when the recompute computed them
    main_extrema: list[torch.Tensor] | None = None
    for i in range(start, adapter.num_blocks):
        block = adapter.blocks[i]
        with (
            ex.resident(adapter.blocks, i, captured.exec_device)
            if offload
            else contextlib.nullcontext()
        ):
            with ex.phase("finite checks"):
                check_walk_step(adapter, i, streams.main, main_extrema)
            run = BlockRun(
                i,
                block,
                adapter.linears(i),
                captured,
                streams,
                f"{adapter.blocks_name}.{i}",
                ex,
                moe or MoeCalibration(),
            )
            upd = visit(run) or StreamUpdate()
            main, main_extrema = upd.main, None
            if main is None:
                main_extrema = []
                with ex.phase("recompute"):
                    main = run.forward(streams.main, extrema=main_extrema)
            streams = Streams(
                main,
                streams.subset_dense if upd.subset_dense is None else upd.subset_dense,
                streams.subset_pruned if upd.subset_pruned is None else upd.subset_pruned,
            )
        if after_block is not None:
            after_block(i, streams)
        blocks.step(i)
    with ex.phase("finite checks"):
        check_walk_step(adapter, adapter.num_blocks, streams.main, main_extrema)
    if own:
        blocks.close()
    return streams
