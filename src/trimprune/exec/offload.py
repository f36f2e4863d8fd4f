"""Offloaded blocks and hidden states: copies that overlap the compute, and blocks staged from
storage.

`BlockStager` (`--offload cpu`, and the GPU half of `--offload disk`): parameters in pinned host
memory, the next block copied ahead. While block i is processed on the compute stream, block i+1's
parameters are copied to the GPU on a side stream (pinned memory makes the copies asynchronous); the
compute stream waits for that copy only when block i+1 starts. When a block is done its parameters
(pruned in place) are copied back into the same pinned host tensors on the compute stream; `flush`
waits for those copies before the host reads the weights. At most two blocks are on the GPU at a
time.

`BatchMover`: hidden-state batches stored in (pinned) host memory. While the block runs on batch j,
batch j+1 is copied to the GPU on one side stream, and each output is copied back to host memory on
another as soon as it is computed, so the compute stream never waits for a transfer it did not need.
The host reads the outputs only after the device is synchronised (the end of a pass over the
batches).

`StoredBlocks` (`--offload disk`): the blocks' modules hold meta tensors; a `BlockStorage`
(`io.diskmodel.DiskBlocks`) holds their parameters. One I/O thread reads blocks ahead into host
memory (pinned for a GPU) and writes finished blocks back when the storage keeps them (the pruning
walk); a block's parameters are installed into its modules only for its visit and dropped after it.
With the GPU copy-ahead, blocks i and i+1 are in host memory while block i runs and block i+2 is
being read; at most one finished block waits to be written.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol, cast

import torch
from torch import nn


def _tensors(block: nn.Module) -> list[torch.Tensor]:
    """The block's parameters and buffers (what `Module.to` would move)."""
    return [p for p in block.parameters()] + [b for b in block.buffers()]


def pin(module: nn.Module) -> None:
    """Move the module's host parameters and buffers into pinned memory (once; `load_model` does it
    for an offloaded model on a GPU machine, else each block is pinned when it is first copied)."""
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
        self.stream.wait_stream(
            torch.cuda.current_stream(self.device)
        )  # the host tensors are up to date
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
            g.record_stream(compute)  # made on the side stream, used on this one
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
            assert nxt is not None  # stored is not empty
            x, done = nxt
            if j + 1 < len(stored):
                nxt = self._ahead(stored[j + 1])
            compute.wait_event(done)
            x.record_stream(compute)  # made on the side stream, used on this one
            yield x

    def store(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` copied to pinned host memory on the side stream, after the work that computed
        it."""
        self.down.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.down):
            out = tensor.to("cpu", non_blocking=True)
        tensor.record_stream(self.down)
        return out


# ------------------------------------------------------------------------------------- from storage
class BlockStorage(Protocol):
    """Where the parameters of offloaded blocks live between their visits
    (`io.diskmodel.DiskBlocks`)."""

    def read(
        self, index: int, empty: Callable[..., torch.Tensor] = torch.empty
    ) -> dict[str, torch.Tensor]:
        """Block `index`'s parameters (names inside the block) as new host tensors made by
        `empty`."""

    def writes(self, index: int) -> bool:
        """Whether block `index` is written back when released."""

    def write(self, index: int, state: dict[str, torch.Tensor]) -> None:
        """Keep block `index`'s final state (its `state_dict`, host tensors)."""


def _pinned_empty(*shape, dtype: torch.dtype) -> torch.Tensor:
    """A host tensor in pinned memory (its copies to the GPU are asynchronous)."""
    return torch.empty(*shape, dtype=dtype, pin_memory=True)


def _install(block: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """The block's parameters become `tensors` (new Parameters: a meta parameter's data cannot be
    replaced)."""
    for name, t in tensors.items():
        path, _, attr = name.rpartition(".")
        mod = block.get_submodule(path) if path else block
        old = cast(nn.Parameter, mod._parameters[attr])
        mod._parameters[attr] = nn.Parameter(t, requires_grad=old.requires_grad)


def _drop(block: nn.Module) -> None:
    """The block's parameters become meta tensors again (their memory is freed once nothing else
    holds it)."""
    for mod in block.modules():
        for attr, p in mod._parameters.items():
            if p is not None and p.device.type != "meta":
                mod._parameters[attr] = nn.Parameter(
                    torch.empty_like(p, device="meta"), requires_grad=p.requires_grad
                )


def _load_trim():
    """glibc's `malloc_trim`, or None elsewhere."""
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _load_trim()


def return_free_memory() -> None:
    """Hand the heap's free pages back to the system (glibc). A block's tensors below glibc's mmap
    threshold (up to 32 MiB) come from the heap; read on one thread and freed on another block after
    block, their space is reused only in part, and the resident set would grow by most of a block
    per block."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def materialised(block: nn.Module) -> bool:
    """Whether any of the block's parameters holds memory (is not on the meta device)."""
    return any(p.device.type != "meta" for p in block.parameters())


class StoredBlocks:
    """Blocks whose parameters live in a `BlockStorage`: read ahead on one I/O thread, installed
    into the block's modules for a visit (`fetch`), handed back after it (`release`: written in the
    background when the storage keeps the block, and dropped from the modules at once)."""

    def __init__(self, storage: BlockStorage, pin: bool = False):
        self.storage, self.pin = storage, pin
        self.io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trimprune-io")
        self.reads: dict[int, Future] = {}
        self.pending_writes: list[Future] = []
        self.installed: dict[int, nn.Module] = {}

    def read_ahead(self, blocks, index: int) -> None:
        """Start reading block `index` (if it exists and is neither read nor being read)."""
        if index < len(blocks) and index not in self.reads and index not in self.installed:
            self.reads[index] = self.io.submit(
                self.storage.read, index, _pinned_empty if self.pin else torch.empty
            )

    def fetch(self, blocks, index: int) -> nn.Module:
        """Block `index` with its parameters in host memory (waits for its read, started now unless
        ahead)."""
        if index not in self.installed:
            self.read_ahead(blocks, index)
            _install(blocks[index], self.reads.pop(index).result())
            self.installed[index] = blocks[index]
        return blocks[index]

    def release(self, blocks, index: int, ready: Callable[[], None] | None = None) -> None:
        """Block `index` is done: its state is written on the I/O thread when the storage keeps it
        (first waiting for `ready()`: the copies back to host memory), and its parameters are
        dropped."""
        block = self.installed.pop(index, blocks[index])
        if self.storage.writes(index):
            state = {k: v.detach() for k, v in block.state_dict().items()}
            self._raise_failed_write()
            while (
                len(self.pending_writes) > 1
            ):  # at most one block waits behind the one being written
                self.pending_writes.pop(0).result()
            self.pending_writes.append(self.io.submit(self._write, index, state, ready))
            _drop(block)
        else:
            _drop(block)
            return_free_memory()

    def _write(self, index: int, state: dict[str, torch.Tensor], ready) -> None:
        if ready is not None:
            ready()
        self.storage.write(index, state)
        state.clear()
        return_free_memory()

    def _raise_failed_write(self) -> None:
        while self.pending_writes and self.pending_writes[0].done():
            self.pending_writes.pop(0).result()

    def close(self) -> None:
        """Wait for the writes (raising the first error), forget the reads ahead and drop the blocks
        still installed (a walk that stopped early)."""
        try:
            for f in self.reads.values():
                f.cancel()
            while self.pending_writes:
                self.pending_writes.pop(0).result()
        finally:
            self.io.shutdown(wait=True)
            self.reads.clear()
            for block in self.installed.values():
                _drop(block)
            self.installed.clear()
