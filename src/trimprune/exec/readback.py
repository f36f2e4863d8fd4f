"""Deferred host copies: device tensors copied to the host without making the host wait.

`stage(tensors, then)` takes a tensor tree (a dataclass, dict, list or tuple of tensors, nested:
`core.runtime.map_tensors`), concatenates its tensors into two buffers (numbers as float64, bytes as
uint8: the bit-packed masks), starts their copies into pinned host memory on the current stream and
records an event; the returned `Staged` is a `Deferred` whose `result()` waits for the event (if the
copy is not done yet), splits the buffers back into the tree's tensors (their dtypes and shapes)
and returns `then(the tree with host tensors)`. On the CPU the same path runs without copies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from trimprune.core.runtime import Deferred, map_tensors, tensor_leaves


@dataclass(frozen=True)
class _Slot:
    """Where a tensor of the staged tree was: its index among the tree's tensors, dtype, shape."""

    index: int
    dtype: torch.dtype
    shape: torch.Size


class Staged(Deferred):
    def __init__(self, tensors, then: Callable[[object], object]):
        self._then = then
        self._done = False
        self._value = None
        leaves = tensor_leaves(tensors)
        slots = iter(range(len(leaves)))
        # the tree without its tensors (holding it keeps no device memory alive)
        self._skeleton = map_tensors(tensors, lambda t: _Slot(next(slots), t.dtype, t.shape))
        device = next((t.device for t in leaves if t.is_cuda), torch.device("cpu"))
        self._numbers = [i for i, t in enumerate(leaves) if t.dtype != torch.uint8]
        self._bytes = [i for i, t in enumerate(leaves) if t.dtype == torch.uint8]
        nums = [
            leaves[i].reshape(-1).to(device, torch.float64, non_blocking=True)
            for i in self._numbers
        ]
        byts = [leaves[i].reshape(-1).to(device, non_blocking=True) for i in self._bytes]
        self._sizes = [t.numel() for t in leaves]
        self._flat: list[torch.Tensor | None] | None = [
            torch.cat(nums) if nums else None,
            torch.cat(byts) if byts else None,
        ]
        self._event = None
        if device.type == "cuda":
            host = []
            for t in self._flat:
                if t is not None:
                    h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                    h.copy_(t, non_blocking=True)
                    t = h
                host.append(t)
            self._flat = host
            self._event = torch.cuda.Event()
            self._event.record()

    def ready(self) -> bool:
        return self._done or self._event is None or self._event.query()

    def result(self):
        if not self._done:
            if self._event is not None:
                self._event.synchronize()
            self._value = self._then(self._split())
            self._done, self._flat, self._event, self._skeleton = True, None, None, None
        return self._value

    def _split(self):
        assert self._flat is not None  # split before the result is kept
        nums, byts = self._flat
        out: dict[int, torch.Tensor] = {}
        if nums is not None:
            for i, part in zip(self._numbers, nums.split([self._sizes[i] for i in self._numbers])):
                out[i] = part
        if byts is not None:
            # copies into pageable memory by numpy: torch's CPU copy_ wakes its thread pool (tens of
            # ms on some GPU hosts), and clone() of pinned memory allocates pinned memory, which
            # waits for the device
            for i, part in zip(self._bytes, byts.split([self._sizes[i] for i in self._bytes])):
                out[i] = torch.from_numpy(part.numpy().copy())

        def rebuild(slot: _Slot) -> torch.Tensor:
            part = out[slot.index].view(slot.shape)
            return part if slot.dtype == torch.uint8 else part.to(slot.dtype)

        return map_tensors(self._skeleton, rebuild, leaf=_Slot)


def stage(tensors, then: Callable[[object], object]) -> Staged:
    return Staged(tensors, then)
