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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from trimprune.core.model import ModelAdapter
from trimprune.core.ranks import SOLO, Ranks
from trimprune.core.runtime import EAGER, Executor


class _StopCapture(Exception):
    pass


@dataclass
class Captured:
    """Inputs of block 0 for every batch (and for the block-safeguard subset), and each block's call
    arguments per batch shape."""

    hidden: list[torch.Tensor]  # one (B, L, H) tensor per batch (this rank's share)
    subset: torch.Tensor | None  # (S, L, H): the block-safeguard subset, or None
    block_args: list[dict]  # per block: {(B, L): (args, kwargs)}
    store_device: torch.device
    exec_device: torch.device
    n_tokens: int  # calibration tokens of all ranks (the subset not counted)
    ranks: Ranks = SOLO  # the processes of a data-parallel run
    token_offset: int = 0  # tokens of the ranks before this one

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
def blocks_replaced(adapter: ModelAdapter, replacements: Sequence[nn.Module]):
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
def capture(
    model: nn.Module,
    adapter: ModelAdapter,
    batches: list[torch.Tensor],
    exec_device: torch.device,
    offload: bool = False,
    subset: torch.Tensor | None = None,
    ex: Executor = EAGER,
    ranks: Ranks = SOLO,
    keep_on_device: bool = False,
) -> Captured:
    """Record block-0 inputs for every batch (this rank's share of the calibration sequences) and
    every block's call arguments. `subset`: token ids of the block safeguard's sequences (this
    rank's share), whose block-0 inputs are kept as one batch. With `offload` the hidden states are
    stored in host memory unless `keep_on_device`."""
    n = adapter.num_blocks
    sinks: list[dict[str, Any]] = [dict() for _ in range(n)]
    inputs: list[torch.Tensor] = []
    store = torch.device("cpu") if offload and not keep_on_device else exec_device
    recorders = [_Recorder(i, n - 1, sinks[i], inputs if i == 0 else None) for i in range(n)]
    has_subset = subset is not None and subset.shape[0] > 0
    if has_subset:
        assert subset is not None
        batches = batches + [subset]
    config: Any = model.config
    use_cache = getattr(config, "use_cache", None)
    config.use_cache = False
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
            config.use_cache = use_cache
    memo: dict = {}
    block_args = [{k: _to_device(v, exec_device, memo) for k, v in s.items()} for s in sinks]
    if offload and store.type == "cpu" and exec_device.type == "cuda":
        hidden = [ex.pinned(h) for h in hidden]
    sub = hidden.pop() if has_subset else None
    counts = ranks.counts(sum(h.shape[0] * h.shape[1] for h in hidden), exec_device)
    return Captured(
        hidden=hidden,
        subset=sub,
        block_args=block_args,
        store_device=store,
        exec_device=exec_device,
        n_tokens=sum(counts),
        ranks=ranks,
        token_offset=sum(counts[: ranks.rank]),
    )
