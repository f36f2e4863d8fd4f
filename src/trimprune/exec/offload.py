"""Offloaded blocks and hidden states on a GPU: copies that overlap the compute.

`BlockStager`: parameters in pinned host memory, the next block copied ahead.

While block i is processed on the compute stream, block i+1's parameters are copied to the GPU on a
side stream (pinned memory makes the copies asynchronous); the compute stream waits for that copy only
when block i+1 starts. When a block is done its parameters (pruned in place) are copied back into the
same pinned host tensors on the compute stream; `flush` waits for those copies before the host reads
the weights. At most two blocks are on the GPU at a time.

`BatchMover`: hidden-state batches stored in (pinned) host memory. While the block runs on batch j,
batch j+1 is copied to the GPU on one side stream, and each output is copied back to host memory on
another as soon as it is computed, so the compute stream never waits for a transfer it did not need.
The host reads the outputs only after the device is synchronised (the end of a pass over the batches).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn


def _tensors(block: nn.Module) -> list[torch.Tensor]:
    """The block's parameters and buffers (what `Module.to` would move)."""
    return [p for p in block.parameters()] + [b for b in block.buffers()]


def pin(module: nn.Module) -> None:
    """Move the module's host parameters and buffers into pinned memory (once; `load_model` does it for
    an offloaded model on a GPU machine, else each block is pinned when it is first copied)."""
    for t in _tensors(module):
        if t.device.type == "cpu" and not t.is_pinned():
            t.data = t.data.pin_memory()


class BlockStager:
    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device)
        self.ahead: dict[int, tuple[torch.cuda.Event, list[torch.Tensor]]] = {}
        self.pending = False

    def _upload(self, block: nn.Module):
        pin(block)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))   # the host tensors are up to date
        with torch.cuda.stream(self.stream):
            on_gpu = [t.data.to(self.device, non_blocking=True) for t in _tensors(block)]
            done = torch.cuda.Event()
            done.record(self.stream)
        return done, on_gpu

    @contextlib.contextmanager
    def resident(self, blocks, index: int):
        block = blocks[index]
        done, on_gpu = self.ahead.pop(index, None) or self._upload(block)
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(done)
        tensors = _tensors(block)
        host = [t.data for t in tensors]
        for t, g in zip(tensors, on_gpu):
            g.record_stream(compute)           # made on the side stream, used on this one
            t.data = g
        if index + 1 < len(blocks):
            self.ahead[index + 1] = self._upload(blocks[index + 1])
        try:
            yield block
        finally:
            for t, h in zip(tensors, host):
                h.copy_(t.data, non_blocking=True)
                t.data = h
            self.pending = True

    def flush(self) -> None:
        """Wait for the copies back to host memory."""
        if self.pending:
            torch.cuda.current_stream(self.device).synchronize()
            self.pending = False
        self.ahead.clear()


class BatchMover:
    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.up = torch.cuda.Stream(self.device)
        self.down = torch.cuda.Stream(self.device)

    def _ahead(self, h: torch.Tensor):
        with torch.cuda.stream(self.up):
            x = h.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.up)
        return x, done

    def batches(self, stored: list[torch.Tensor]):
        """Each host-stored batch on the GPU, the next one already on its way."""
        compute = torch.cuda.current_stream(self.device)
        nxt = self._ahead(stored[0]) if stored else None
        for j in range(len(stored)):
            x, done = nxt
            if j + 1 < len(stored):
                nxt = self._ahead(stored[j + 1])
            compute.wait_event(done)
            x.record_stream(compute)           # made on the side stream, used on this one
            yield x

    def store(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` copied to pinned host memory on the side stream, after the work that computed it."""
        self.down.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.down):
            out = tensor.to("cpu", non_blocking=True)
        tensor.record_stream(self.down)
        return out
