"""The layer-sequential calibration walk, and every hidden-state stream it carries.

1. `capture`: run the model on the calibration batches with every decoder block replaced by a
   recorder. Block 0's recorder keeps the hidden states it receives; every recorder keeps the
   positional and keyword arguments its block is called with (attention masks, position
   embeddings, cache flags — Gemma-style models pass different ones to different blocks), and the
   last one stops the forward. Nothing model-specific is needed.
2. `walk`: for each block, in order: move it to the compute device (offload), check that its
   parameters and the hidden states entering it are finite (`finite.check_walk_step`), hand it to a
   visitor as a `BlockRun` (statistics with hooks, pruning), then recompute the block's outputs with
   the pruned weights and feed them to the next block.

The streams (`Streams`): the calibration batches through the pruned model (`main`) and, for TRIM's
block safeguard, a subset of the calibration sequences followed through the dense model
(`subset_dense`) and through the pruned model (`subset_pruned`).
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..algo.executor import EAGER, Executor
from ..algo.ranks import SOLO, Ranks
from ..io.models import ModelAdapter
from ..io.progress import BlockProgress, Progress
from .finite import check_statistics, check_walk_step
from .finite import extrema as _extrema
from .stats import BlockHooks, StatsNeeds, StopForward


class _StopCapture(Exception):
    pass


@dataclass
class Captured:
    """Inputs of block 0 for every batch (and for the block-safeguard subset), and each block's call
    arguments per batch shape."""

    hidden: list[torch.Tensor]                       # one (B, L, H) tensor per batch (this rank's share)
    subset: torch.Tensor | None                      # (S, L, H): the block-safeguard subset, or None
    block_args: list[dict]                           # per block: {(B, L): (args, kwargs)}
    store_device: torch.device
    exec_device: torch.device
    n_tokens: int                                    # calibration tokens of all ranks (the subset not counted)
    ranks: Ranks = SOLO                              # the processes of a data-parallel run
    token_offset: int = 0                            # tokens of the ranks before this one

    def args_for(self, block_index: int, hidden: torch.Tensor):
        return self.block_args[block_index][tuple(hidden.shape[:2])]


class _Recorder(nn.Module):
    def __init__(self, index: int, last: int, sink: dict, inputs_sink: list | None):
        super().__init__()
        self.index, self.last, self.sink, self.inputs_sink = index, last, sink, inputs_sink

    def forward(self, hidden_states=None, *args, **kwargs):
        if hidden_states is None:
            hidden_states = kwargs.pop("hidden_states")
        key = tuple(hidden_states.shape[:2])
        if self.inputs_sink is not None:
            self.inputs_sink.append(hidden_states)
        if key not in self.sink:
            self.sink[key] = (args, kwargs)
        if self.index == self.last:
            raise _StopCapture
        return hidden_states


def _to_device(obj, device, memo: dict):
    """Move tensors inside (nested) args to `device`, keeping shared objects shared."""
    if isinstance(obj, torch.Tensor):
        k = id(obj)
        if k not in memo:
            memo[k] = obj.to(device)
        return memo[k]
    if isinstance(obj, tuple):
        return tuple(_to_device(o, device, memo) for o in obj)
    if isinstance(obj, list):
        return [_to_device(o, device, memo) for o in obj]
    if isinstance(obj, dict):
        return {k: _to_device(v, device, memo) for k, v in obj.items()}
    return obj


@contextlib.contextmanager
def blocks_replaced(adapter: ModelAdapter, replacements: list[nn.Module]):
    original = list(adapter.blocks)
    try:
        for i, r in enumerate(replacements):
            adapter.blocks[i] = r
        yield
    finally:
        for i, b in enumerate(original):
            adapter.blocks[i] = b


@contextlib.contextmanager
def non_block_modules_on(model: nn.Module, device: torch.device, enabled: bool):
    """With offload, move everything but the decoder blocks (embeddings, rotary tables, final norm)
    to the compute device. Call it while the blocks are replaced: the real blocks are then outside
    the module tree and stay where they are."""
    if not enabled:
        yield
        return
    model.to(device)
    try:
        yield
    finally:
        model.to("cpu")


@torch.no_grad()
def capture(model: nn.Module, adapter: ModelAdapter, batches: list[torch.Tensor], exec_device: torch.device,
            offload: bool = False, subset: torch.Tensor | None = None, ex: Executor = EAGER,
            ranks: Ranks = SOLO, keep_on_device: bool = False) -> Captured:
    """Record block-0 inputs for every batch (this rank's share of the calibration sequences) and every
    block's call arguments. `subset`: token ids of the block safeguard's sequences (this rank's share),
    whose block-0 inputs are kept as one batch. With `offload` the hidden states are stored in host
    memory unless `keep_on_device`."""
    n = adapter.num_blocks
    sinks = [dict() for _ in range(n)]
    inputs: list[torch.Tensor] = []
    store = torch.device("cpu") if offload and not keep_on_device else exec_device
    recorders = [_Recorder(i, n - 1, sinks[i], inputs if i == 0 else None) for i in range(n)]
    has_subset = subset is not None and subset.shape[0] > 0
    if has_subset:
        batches = batches + [subset]
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False
    hidden = []
    try:
        with blocks_replaced(adapter, recorders), non_block_modules_on(model, exec_device, offload):
            for ids in batches:
                inputs.clear()
                try:
                    model(input_ids=ids.to(exec_device), use_cache=False)
                except _StopCapture:
                    pass
                h = inputs[0]
                hidden.append(h.to(store, non_blocking=True) if offload else h)
    finally:
        if use_cache is not None:
            model.config.use_cache = use_cache
    memo: dict = {}
    block_args = [{k: _to_device(v, exec_device, memo) for k, v in s.items()} for s in sinks]
    if offload and store.type == "cpu" and exec_device.type == "cuda":
        hidden = [ex.pinned(h) for h in hidden]
    sub = hidden.pop() if has_subset else None
    counts = ranks.counts(sum(h.shape[0] * h.shape[1] for h in hidden), exec_device)
    return Captured(hidden=hidden, subset=sub, block_args=block_args, store_device=store, exec_device=exec_device,
                    n_tokens=sum(counts), ranks=ranks, token_offset=sum(counts[:ranks.rank]))


def block_forward(block: nn.Module, captured: Captured, index: int, hidden: torch.Tensor) -> torch.Tensor:
    args, kwargs = captured.args_for(index, hidden)
    out = block(hidden, *args, **kwargs)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out


@torch.no_grad()
def forward_block_all(block: nn.Module, captured: Captured, index: int, hidden: list[torch.Tensor],
                      on_batch_end: Callable[[], None] | None = None, keep_outputs: bool = True,
                      extrema: list[torch.Tensor] | None = None, ex: Executor = EAGER):
    """Run one block over every stored batch; returns the outputs (stored like the inputs). `extrema`:
    collects each output's (min, max) (`finite.extrema`), computed on the compute device. The batches
    go to the compute device and back through `ex.batches` / `ex.store`."""
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
    """The hidden states entering the current block: the calibration batches through the pruned model,
    and the block safeguard's subset through the dense and through the pruned model (empty without it)."""

    main: list[torch.Tensor]
    subset_dense: list[torch.Tensor] = field(default_factory=list)
    subset_pruned: list[torch.Tensor] = field(default_factory=list)


@dataclass
class StreamUpdate:
    """What a visitor hands back to the walk: the block's outputs on a stream when it computed them with
    the block's final weights (None: the walk computes them)."""

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
    path: str = ""                                   # the block's module name, e.g. model.layers.3
    ex: Executor = EAGER                             # moves the stored batches to the compute device and back

    def forward(self, hidden: list[torch.Tensor], on_batch_end=None, keep_outputs: bool = True,
                extrema: list[torch.Tensor] | None = None) -> list:
        return forward_block_all(self.module, self.captured, self.index, hidden, on_batch_end, keep_outputs, extrema,
                                 self.ex)

    def statistics(self, needs: StatsNeeds, ex: Executor = EAGER, only: set[str] | None = None,
                   stop: bool = False) -> BlockHooks:
        """The statistics of the linears' inputs (of `only`, stopping the forward once they are seen
        with `stop`) over the main stream, from one forward with hooks (summed over the ranks); checked to be
        finite."""
        c = self.captured
        hooks = BlockHooks(self.linears, needs, c.exec_device, total_tokens=c.n_tokens, only=only, stop=stop, ex=ex,
                           ranks=c.ranks, token_offset=c.token_offset)
        with hooks:
            self.forward(self.streams.main, on_batch_end=hooks.next_batch, keep_outputs=False)
        hooks.reduce()
        self.check_statistics(hooks, ex)
        return hooks

    def check_statistics(self, hooks: BlockHooks, ex: Executor = EAGER) -> None:
        """Stop (`NonFiniteError`, naming the linears) if the Wanda norms or Gram matrices are not finite."""
        with ex.phase("finite checks"):
            check_statistics(hooks, self.path, self.index, self.streams.main[0].dtype)

    def dense_subset(self) -> list[torch.Tensor]:
        """The block (still dense) on the dense model's subset stream."""
        return self.forward(self.streams.subset_dense)

    def pruned_subset(self) -> list[torch.Tensor]:
        """The block, with its current weights, on the pruned model's subset stream."""
        return self.forward(self.streams.subset_pruned)


def walk(adapter: ModelAdapter, captured: Captured, streams: Streams,
         visit: Callable[[BlockRun], StreamUpdate | None], offload: bool = False, progress=True,
         desc: str = "pruning", ex: Executor = EAGER, start: int = 0,
         after_block: Callable[[int, Streams], None] | None = None) -> Streams:
    """Layer-sequential walk. `visit(run)` collects statistics and prunes; then the block's outputs are
    recomputed with its final weights (unless the visitor returned them) and fed to block i+1.
    `progress`: a `BlockProgress` (the caller closes it), or what `Progress.of` takes.
    `start`: the first block visited (`streams` are then the states entering it: a resumed run);
    `after_block(i, streams)`: called once block i is done, with the streams entering block i+1 (checkpoints).

    NaN / Inf never passes: as each block is loaded, its parameters and the hidden states entering it
    on the main stream are checked (one reduction per tensor, one host read per block), and the last
    block's outputs at the end; a `NonFiniteError` names the tensor."""
    own = not isinstance(progress, BlockProgress)
    blocks = Progress.of(progress).blocks(adapter.num_blocks, desc) if own else progress
    main_extrema = None                     # extrema of streams.main, when the recompute computed them
    for i in range(start, adapter.num_blocks):
        block = adapter.blocks[i]
        with ex.resident(adapter.blocks, i, captured.exec_device) if offload else contextlib.nullcontext():
            with ex.phase("finite checks"):
                check_walk_step(adapter, i, streams.main, main_extrema)
            run = BlockRun(i, block, adapter.linears(i), captured, streams, f"{adapter.blocks_name}.{i}", ex)
            upd = visit(run) or StreamUpdate()
            main, main_extrema = upd.main, None
            if main is None:
                main_extrema = []
                with ex.phase("recompute"):
                    main = run.forward(streams.main, extrema=main_extrema)
            streams = Streams(main, streams.subset_dense if upd.subset_dense is None else upd.subset_dense,
                              streams.subset_pruned if upd.subset_pruned is None else upd.subset_pruned)
        if after_block is not None:
            after_block(i, streams)
        blocks.step(i)
    with ex.phase("finite checks"):
        check_walk_step(adapter, adapter.num_blocks, streams.main, main_extrema)
    if own:
        blocks.close()
    return streams
