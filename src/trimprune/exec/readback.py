"""Deferred host copies: named device tensors copied to the host without making the host wait.

`stage(tensors, then)` concatenates the tensors into two buffers (numbers as float64, bytes as
uint8: the bit-packed masks), starts their copies into pinned host memory on the current stream and
records an event; the returned `Staged` is a `Deferred` whose `result()` waits for the event (if the
copy is not done yet), splits the buffers back into the named tensors (their dtypes and shapes) and
returns `then(host tensors)`. On the CPU the same path runs without copies.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from trimprune.core.runtime import Deferred


class Staged(Deferred):
    def __init__(
        self, tensors: dict[str, torch.Tensor], then: Callable[[dict[str, torch.Tensor]], object]
    ):
        self._then = then
        self._done = False
        self._value = None
        device = next((t.device for t in tensors.values() if t.is_cuda), torch.device("cpu"))
        self._numbers = [
            (k, t.dtype, t.shape) for k, t in tensors.items() if t.dtype != torch.uint8
        ]
        self._bytes = [(k, t.shape) for k, t in tensors.items() if t.dtype == torch.uint8]
        nums = [
            tensors[k].reshape(-1).to(device, torch.float64, non_blocking=True)
            for k, _, _ in self._numbers
        ]
        byts = [tensors[k].reshape(-1).to(device, non_blocking=True) for k, _ in self._bytes]
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
            self._done, self._flat, self._event = True, None, None
        return self._value

    def _split(self) -> dict[str, torch.Tensor]:
        assert self._flat is not None  # split before the result is kept
        nums, byts = self._flat
        out = {}
        if nums is not None:
            for (k, dtype, shape), part in zip(
                self._numbers, nums.split([s.numel() for _, _, s in self._numbers])
            ):
                out[k] = part.view(shape).to(dtype)
        if byts is not None:
            # copies into pageable memory by numpy: torch's CPU copy_ wakes its thread pool (tens of
            # ms on some GPU hosts), and clone() of pinned memory allocates pinned memory, which
            # waits for the device
            for (k, shape), part in zip(
                self._bytes, byts.split([s.numel() for _, s in self._bytes])
            ):
                out[k] = torch.from_numpy(part.numpy().copy()).view(shape)
        return out


def stage(
    tensors: dict[str, torch.Tensor], then: Callable[[dict[str, torch.Tensor]], object]
) -> Staged:
    return Staged(tensors, then)
