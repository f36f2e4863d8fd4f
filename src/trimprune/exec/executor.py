"""Executors: how the algorithms' tensor work runs (see `algo.executor` for the seam).

- `EagerExecutor`: as written, with profiling phases and deferred records (CPU, or a GPU with the
  speed machinery off).
- `CudaExecutor`: graph replay of small static computations (`graphs.GraphCache`, captured on the
  second use), side streams for launched computations, registered fast paths (`fastpaths`,
  `kernels`), small host-to-device copies through pinned memory, and host copies that do not make the
  host wait (`readback`), offloaded blocks in pinned memory copied ahead on a side stream, host-stored
  hidden-state batches copied ahead and back on side streams (`offload`).
  `TRIMPRUNE_CUDA_GRAPHS=0` / `TRIMPRUNE_TRITON=0` / `TRIMPRUNE_PREFETCH=0` turn graphs / kernels /
  the copies ahead off.
"""
from __future__ import annotations

import os

import torch

from ..algo.executor import Executor, Launched
from . import fastpaths, kernels, readback
from .graphs import MAX_ELEMENTS, GraphCache
from .offload import BatchMover, BlockStager
from .profiling import Phases


class EagerExecutor(Executor):
    def __init__(self, phases: Phases | None = None):
        self.phases = phases if phases is not None else Phases()

    def phase(self, name: str):
        return self.phases.phase(name)

    def defer(self, tensors, then):
        return readback.stage(tensors, then)


class SideStreamLaunched(Launched):
    """A computation replayed on a side stream: `result()` makes the current stream wait for it."""

    def __init__(self, value, event, inputs: dict):
        super().__init__(value)
        self._event, self._inputs = event, inputs       # inputs stay referenced until the side stream is done

    def result(self):
        if self._event is not None:
            torch.cuda.current_stream().wait_event(self._event)
            self._event = self._inputs = None
        return self._value


def _device_of(inputs: dict) -> torch.device:
    return next(v.device for v in inputs.values() if isinstance(v, torch.Tensor))


class CudaExecutor(EagerExecutor):
    def __init__(self, device: torch.device, phases: Phases | None = None, graphs: bool | None = None):
        super().__init__(phases)
        if graphs is None:
            graphs = os.environ.get("TRIMPRUNE_CUDA_GRAPHS", "1") != "0"
        self.graphs = GraphCache() if graphs else None
        self.prefetch = os.environ.get("TRIMPRUNE_PREFETCH", "1") != "0"
        self.stager: BlockStager | None = None          # made on the first offloaded block
        self.mover: BatchMover | None = None            # made on the first host-stored batches
        fastpaths.probe_out_dtype(torch.device(device))      # once, outside any graph capture

    def captures(self, device: torch.device, size: int) -> bool:
        return self.graphs is not None and device.type == "cuda" and size <= MAX_ELEMENTS

    def close(self) -> None:
        if self.graphs is not None:
            self.graphs.clear()
        if self.stager is not None:
            self.stager.flush()

    def resident(self, blocks, index, device):
        if not self.prefetch or torch.device(device).type != "cuda":
            return super().resident(blocks, index, device)
        if self.stager is None:
            self.stager = BlockStager(device)
        if index == 0:                       # a new walk: nothing copied ahead is current
            self.stager.ahead.clear()
        return self.stager.resident(blocks, index)

    def _moves(self, device: torch.device) -> bool:
        if not self.prefetch or torch.device(device).type != "cuda":
            return False
        if self.mover is None:
            self.mover = BatchMover(device)
        return True

    def batches(self, stored, device):
        if not stored or stored[0].device.type != "cpu" or not self._moves(device):
            return super().batches(stored, device)
        return self.mover.batches(stored)

    def store(self, tensor, device):
        if tensor.device.type != "cuda" or torch.device(device).type != "cpu" or not self._moves(tensor.device):
            return super().store(tensor, device)
        return self.mover.store(tensor)

    def run(self, key, fn, inputs, size):
        if not self.captures(_device_of(inputs), size):
            return fn(**inputs)
        return self.graphs.run(key, fn, inputs)

    def launch(self, key, fn, inputs, size) -> Launched:
        if not self.captures(_device_of(inputs), size):
            return Launched(fn(**inputs))
        value, event = self.graphs.run_async(key, fn, inputs)
        return SideStreamLaunched(value, event, inputs)

    def accelerates(self, pure_fn, *args, **kwargs) -> bool:
        return fastpaths.find(pure_fn, args, kwargs) is not None

    def call(self, pure_fn, *args, **kwargs):
        fp = fastpaths.find(pure_fn, args, kwargs)
        if fp is None:
            return pure_fn(*args, **kwargs)
        try:
            return fp.impl(*args, **kwargs)
        except Exception as e:      # noqa: BLE001 - a kernel's compile / launch error: the pure function is exact too
            if fp.backend != "triton":
                raise
            kernels.disable(e)
            return pure_fn(*args, **kwargs)

    def pinned(self, tensor: torch.Tensor) -> torch.Tensor:
        """In pinned memory, so its copies to the GPU can overlap other work."""
        return tensor.pin_memory()

    def to_device(self, values, dtype, device):
        """Through pinned memory, so the copy does not wait for the work already queued (a copy from
        pageable memory synchronises)."""
        t = torch.tensor(values, dtype=dtype)
        if torch.device(device).type != "cuda":
            return t.to(device)
        return t.pin_memory().to(device, non_blocking=True)


def make_executor(device: torch.device | str, profile: str = "time") -> EagerExecutor:
    """The executor for computing on `device`: `CudaExecutor` on a GPU, else eager."""
    device = torch.device(device)
    phases = Phases(profile)
    if device.type == "cuda":
        return CudaExecutor(device, phases)
    return EagerExecutor(phases)
