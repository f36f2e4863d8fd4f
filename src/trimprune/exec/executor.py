"""Executors: how the algorithms' tensor work runs (see `core.runtime` for the seam).

- `EagerExecutor`: as written, with profiling phases and deferred records (CPU, or a GPU with the
  speed machinery off).
- `CudaExecutor`: graph replay of small static computations (`graphs.GraphCache`, captured on the
  second use), side streams for launched computations, registered fast paths (`fastpaths`,
  `kernels`), small host-to-device copies through pinned memory, and host copies that do not make
  the host wait (`readback`), offloaded blocks in pinned memory copied ahead on a side stream,
  host-stored hidden-state batches copied ahead and back on side streams (`offload`).
  `TRIMPRUNE_CUDA_GRAPHS=0` / `TRIMPRUNE_TRITON=0` / `TRIMPRUNE_PREFETCH=0` turn graphs / kernels /
  the copies ahead off.

Both take a `storage` (`--offload disk`): the blocks' parameters are then read from it before their
visit and handed back after it (`offload.StoredBlocks`), around the residency above.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import torch

from trimprune.core.runtime import Executor, Launched
from trimprune.exec import fastpaths, kernels, readback
from trimprune.exec.graphs import MAX_ELEMENTS, GraphCache
from trimprune.exec.offload import BatchMover, BlockStager, BlockStorage, StoredBlocks
from trimprune.exec.profiling import Phases


class EagerExecutor(Executor):
    def __init__(self, phases: Phases | None = None, storage: BlockStorage | None = None):
        self.phases = phases if phases is not None else Phases()
        self.stored = StoredBlocks(storage, pin=self._pins()) if storage is not None else None

    def phase(self, name: str):
        return self.phases.phase(name)

    def defer(self, tensors, then):
        return readback.stage(tensors, then)

    def close(self) -> None:
        if self.stored is not None:
            self.stored.close()

    # ------------------------------------------------------------------ offloaded blocks
    def resident(self, blocks, index, device):
        if self.stored is None:
            return self._resident(blocks, index, device)
        return self._stored_resident(blocks, index, device)

    def _resident(self, blocks, index, device):
        """Block `index` on `device` while it is processed, its parameters in host memory before and
        after."""
        return Executor.resident(self, blocks, index, device)

    def _pins(self) -> bool:
        """Whether blocks read from storage go to pinned host memory."""
        return False

    def _copies_ahead(self, device) -> bool:
        """Whether `_resident` copies block i+1 to `device` while block i is processed (it must then
        be in host memory when block i starts)."""
        return False

    def _copied_back(self, device) -> Callable[[], None] | None:
        """After `_resident`: a wait for the block's copies back to host memory (None: they are
        complete)."""
        return None

    @contextlib.contextmanager
    def _stored_resident(self, blocks, index, device):
        """`_resident` for blocks whose parameters live in storage: read (ahead), installed,
        released after."""
        assert self.stored is not None  # only called with storage
        ahead = self._copies_ahead(device)
        self.stored.fetch(blocks, index)
        if ahead and index + 1 < len(blocks):
            self.stored.fetch(blocks, index + 1)
        self.stored.read_ahead(blocks, index + (2 if ahead else 1))
        with self._resident(blocks, index, device) as block:
            yield block
        self.stored.release(blocks, index, self._copied_back(device))


class SideStreamLaunched(Launched):
    """A computation replayed on a side stream: `result()` makes the current stream wait for it."""

    def __init__(self, value, event, inputs: dict):
        super().__init__(value)
        self._event = event
        self._inputs: dict | None = inputs  # referenced until the side stream is done

    def result(self):
        if self._event is not None:
            torch.cuda.current_stream().wait_event(self._event)
            self._event = self._inputs = None
        return self._value


def _device_of(inputs: dict) -> torch.device:
    return next(v.device for v in inputs.values() if isinstance(v, torch.Tensor))


class CudaExecutor(EagerExecutor):
    def __init__(
        self,
        device: torch.device,
        phases: Phases | None = None,
        graphs: bool | None = None,
        storage: BlockStorage | None = None,
    ):
        super().__init__(phases, storage)
        if graphs is None:
            graphs = os.environ.get("TRIMPRUNE_CUDA_GRAPHS", "1") != "0"
        self.graphs = GraphCache() if graphs else None
        self.prefetch = os.environ.get("TRIMPRUNE_PREFETCH", "1") != "0"
        self.stager: BlockStager | None = None  # made on the first offloaded block
        self.mover: BatchMover | None = None  # made on the first host-stored batches
        fastpaths.probe_out_dtype(torch.device(device))  # once, outside any graph capture

    def captures(self, device: torch.device, size: int) -> bool:
        return self.graphs is not None and device.type == "cuda" and size <= MAX_ELEMENTS

    def close(self) -> None:
        if self.graphs is not None:
            self.graphs.clear()
        if self.stager is not None:
            self.stager.flush()
        super().close()

    def _pins(self) -> bool:
        return True

    def _copies_ahead(self, device) -> bool:
        return self.prefetch and torch.device(device).type == "cuda"

    def _copied_back(self, device):
        if torch.device(device).type != "cuda":
            return None
        done = torch.cuda.Event()
        done.record(
            torch.cuda.current_stream(device)
        )  # after the copies back, queued on this stream
        return done.synchronize

    def _resident(self, blocks, index, device):
        if not self.prefetch or torch.device(device).type != "cuda":
            return Executor.resident(self, blocks, index, device)
        if self.stager is None:
            self.stager = BlockStager(device)
        if index == 0:  # a new walk: nothing copied ahead is current
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
        assert self.mover is not None  # made by _moves
        return self.mover.batches(stored)

    def store(self, tensor, device):
        if (
            tensor.device.type != "cuda"
            or torch.device(device).type != "cpu"
            or not self._moves(tensor.device)
        ):
            return super().store(tensor, device)
        assert self.mover is not None  # made by _moves
        return self.mover.store(tensor)

    def run(self, key, fn, inputs, size):
        if not self.captures(_device_of(inputs), size):
            return fn(**inputs)
        assert self.graphs is not None  # captures() checked it
        return self.graphs.run(key, fn, inputs)

    def launch(self, key, fn, inputs, size) -> Launched:
        if not self.captures(_device_of(inputs), size):
            return Launched(fn(**inputs))
        assert self.graphs is not None  # captures() checked it
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
        except Exception as e:  # noqa: BLE001 - a kernel's compile / launch error: the pure function is exact too
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


def make_executor(
    device: torch.device | str, profile: str = "time", storage: BlockStorage | None = None
) -> EagerExecutor:
    """The executor for computing on `device`: `CudaExecutor` on a GPU, else eager. `storage`: where
    the offloaded blocks' parameters live (`--offload disk`)."""
    device = torch.device(device)
    phases = Phases(profile)
    if device.type == "cuda":
        return CudaExecutor(device, phases, storage=storage)
    return EagerExecutor(phases, storage)
